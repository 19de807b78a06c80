//! The tunnel driver over in-memory pipes: streams spliced to byte streams carry data both ways
//! intact, half-close propagates, rejections carry their reason, and a dead tunnel ends its
//! streams.

// Test code: a failing unwrap or panic is a failing test, which is the point.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use bytes::Bytes;
use gatehouse_dataplane::mux::{OpenError, Tunnel, TunnelEvent};
use gatehouse_dataplane::tunnel::{Config, Side, code};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn run_local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .expect("test timed out")
    })
}

/// An "agent" that echoes every stream back, and rejects target "nope".
fn spawn_echo_agent(agent: Tunnel, mut events: gatehouse_dataplane::mux::Events) {
    tokio::task::spawn_local(async move {
        while let Some(ev) = events.recv().await {
            if let TunnelEvent::Incoming { stream, target, .. } = ev {
                if target == "nope" {
                    agent.reject(stream, code::NOT_FOUND, "no such target `nope`");
                    continue;
                }
                let handle = agent.accept(stream).unwrap();
                tokio::task::spawn_local(async move {
                    let (a, mut b) = tokio::io::duplex(64 * 1024);
                    let echo = async move {
                        let mut buf = vec![0u8; 8192];
                        loop {
                            let n = b.read(&mut buf).await.unwrap();
                            if n == 0 {
                                b.shutdown().await.unwrap();
                                break;
                            }
                            b.write_all(&buf[..n]).await.unwrap();
                        }
                    };
                    tokio::join!(handle.splice(a, Bytes::new()), echo);
                });
            }
        }
    });
}

#[test]
fn ten_mib_round_trip_with_half_close_and_small_windows() {
    run_local(async {
        let config = Config {
            initial_window: 32 * 1024,
            max_frame: 8 * 1024,
            ..Config::default()
        };
        let (t1, t2) = tokio::io::duplex(16 * 1024);
        let (proxy, _proxy_events) = Tunnel::new(Side::Listener, config.clone());
        let (agent, agent_events) = Tunnel::new(Side::Dialer, config);
        {
            let p = proxy.clone();
            tokio::task::spawn_local(async move { p.run(t1).await });
            let a = agent.clone();
            tokio::task::spawn_local(async move { a.run(t2).await });
        }
        spawn_echo_agent(agent, agent_events);

        let stream = proxy.open("echo", Bytes::from_static(b"{}")).await.unwrap();
        let (user, mut user_end) = tokio::io::duplex(64 * 1024);
        let splice = tokio::task::spawn_local(stream.splice(user, Bytes::from_static(b"first:")));
        let payload: Vec<u8> = (0..10 * 1024 * 1024u32)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let expected: Vec<u8> = b"first:"
            .iter()
            .copied()
            .chain(payload.iter().copied())
            .collect();
        let (mut r, mut w) = tokio::io::split(&mut user_end);
        let writer = async {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let reader = async {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(writer, reader);
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "echoed bytes differ");
        let stats = splice.await.unwrap();
        assert_eq!(stats.to_tunnel, expected.len() as u64);
        assert_eq!(stats.from_tunnel, expected.len() as u64);
        assert!(!stats.reset);
        assert_eq!(proxy.open_streams(), 0);
    });
}

#[test]
fn rejection_reason_reaches_the_opener_and_other_streams_continue() {
    run_local(async {
        let (t1, t2) = tokio::io::duplex(64 * 1024);
        let (proxy, _pe) = Tunnel::new(Side::Listener, Config::default());
        let (agent, ae) = Tunnel::new(Side::Dialer, Config::default());
        let p = proxy.clone();
        tokio::task::spawn_local(async move { p.run(t1).await });
        let a = agent.clone();
        tokio::task::spawn_local(async move { a.run(t2).await });
        spawn_echo_agent(agent, ae);
        let err = proxy.open("nope", Bytes::new()).await.unwrap_err();
        assert_eq!(
            err,
            OpenError::Rejected {
                code: code::NOT_FOUND,
                message: "no such target `nope`".into()
            }
        );
        let s = proxy.open("echo", Bytes::new()).await.unwrap();
        let (user, mut end) = tokio::io::duplex(1024);
        tokio::task::spawn_local(s.splice(user, Bytes::new()));
        end.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        end.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    });
}

#[test]
fn a_dead_tunnel_ends_its_streams_and_refuses_new_ones() {
    run_local(async {
        let (t1, t2) = tokio::io::duplex(64 * 1024);
        let (proxy, _pe) = Tunnel::new(Side::Listener, Config::default());
        let (agent, ae) = Tunnel::new(Side::Dialer, Config::default());
        let p = proxy.clone();
        let proxy_run = tokio::task::spawn_local(async move { p.run(t1).await });
        let a = agent.clone();
        let agent_run = tokio::task::spawn_local(async move { a.run(t2).await });
        spawn_echo_agent(agent, ae);
        let s = proxy.open("echo", Bytes::new()).await.unwrap();
        let (user, mut end) = tokio::io::duplex(1024);
        let splice = tokio::task::spawn_local(s.splice(user, Bytes::new()));
        // Kill the agent's side of the transport.
        agent_run.abort();
        let reason = proxy_run.await.unwrap();
        assert!(
            reason.contains("closed") || reason.contains("failed"),
            "{reason}"
        );
        let stats = splice.await.unwrap();
        assert!(stats.reset);
        let mut buf = Vec::new();
        end.read_to_end(&mut buf).await.unwrap();
        assert!(matches!(
            proxy.open("echo", Bytes::new()).await,
            Err(OpenError::Closed(_)) | Err(OpenError::Stream(_))
        ));
    });
}
