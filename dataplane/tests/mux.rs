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

use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_dataplane::mux::{OpenError, Tunnel, TunnelEvent};
use gatehouse_proto::tunnel::{Config, Connection, Event, Side, code};
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

/// An "agent" that echoes every stream back, and rejects target "nope". The echo reads, then
/// writes what it read before reading again, through a pipe of `app_pipe` bytes each way.
fn spawn_echo_agent(agent: Tunnel, mut events: gatehouse_dataplane::mux::Events, app_pipe: usize) {
    tokio::task::spawn_local(async move {
        while let Some(ev) = events.recv().await {
            if let TunnelEvent::Incoming { stream, target, .. } = ev {
                if target == "nope" {
                    agent.reject(stream, code::NOT_FOUND, "no such target `nope`");
                    continue;
                }
                let handle = agent.accept(stream).unwrap();
                tokio::task::spawn_local(async move {
                    let (a, mut b) = tokio::io::duplex(app_pipe);
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

/// A proxy's tunnel and an echo agent's ([`spawn_echo_agent`]) over an in-memory pipe of
/// `pipe` bytes each way, each driven by a task of its own.
struct EchoPair {
    proxy: Tunnel,
    /// Kept for as long as the pair is (nothing reads the proxy's events in these tests).
    _proxy_events: gatehouse_dataplane::mux::Events,
    proxy_run: tokio::task::JoinHandle<String>,
    agent_run: tokio::task::JoinHandle<String>,
}

fn echo_pair(config: Config, pipe: usize, app_pipe: usize) -> EchoPair {
    let (t1, t2) = tokio::io::duplex(pipe);
    let (proxy, proxy_events) = Tunnel::new(Side::Listener, config.clone());
    let (agent, agent_events) = Tunnel::new(Side::Dialer, config);
    let p = proxy.clone();
    let proxy_run = tokio::task::spawn_local(async move { p.run(t1).await });
    let a = agent.clone();
    let agent_run = tokio::task::spawn_local(async move { a.run(t2).await });
    spawn_echo_agent(agent, agent_events, app_pipe);
    EchoPair {
        proxy,
        _proxy_events: proxy_events,
        proxy_run,
        agent_run,
    }
}

#[test]
fn ten_mib_round_trip_with_half_close_and_small_windows() {
    run_local(async {
        let config = Config {
            initial_window: 32 * 1024,
            max_frame: 8 * 1024,
            ..Config::default()
        };
        let pair = echo_pair(config, 16 * 1024, 64 * 1024);
        let proxy = &pair.proxy;

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

/// An application that answers while it reads (an echo, a shell running `cat`) stops reading
/// while its answers are not read. The splice must read them while its own write to the
/// application waits, or both wait for ever: here the pipe to the application holds 1 KiB
/// each way, so any chunk larger than that fills both.
#[test]
fn an_application_that_answers_while_it_reads_is_read_while_written_to() {
    run_local(async {
        let pair = echo_pair(Config::default(), 64 * 1024, 1024);
        let proxy = &pair.proxy;
        let stream = proxy.open("echo", Bytes::new()).await.unwrap();
        let (user, user_end) = tokio::io::duplex(64 * 1024);
        let splice = tokio::task::spawn_local(stream.splice(user, Bytes::new()));
        let payload: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = tokio::io::split(user_end);
        let writer = async {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let ((), read) = tokio::join!(writer, r.read_to_end(&mut got));
        read.unwrap();
        assert!(
            got == payload,
            "{} of {} bytes echoed",
            got.len(),
            payload.len()
        );
        let stats = splice.await.unwrap();
        assert_eq!((stats.to_tunnel, stats.from_tunnel), (1 << 20, 1 << 20));
        assert!(!stats.reset);
    });
}

/// Drive a sans-IO `Connection` over `io` until `until` accepts one of its events.
async fn pump_until(
    conn: &mut Connection,
    io: &mut tokio::io::DuplexStream,
    mut until: impl FnMut(&Event) -> bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(b) = conn.poll_transmit() {
            io.write_all(&b).await.unwrap();
        }
        while let Some(ev) = conn.poll_event() {
            if until(&ev) {
                return;
            }
        }
        let n = io.read(&mut buf).await.unwrap();
        assert!(n > 0, "the tunnel closed");
        conn.handle_input(&buf[..n], Instant::now()).unwrap();
    }
}

/// The proxy's side, frame by frame, opens a stream to the agent and sends `total` bytes; the
/// agent's application reads them to the end and then closes its side, so the stream ends by the
/// agent's own action while its tunnel waits for input. `idle` sees the agent's tunnel before the
/// stream opens. Returns the agent's tunnel once the application is done.
async fn stream_to_an_agent_app(
    total: usize,
    app_pipe: usize,
    idle: impl FnOnce(&Tunnel),
) -> Tunnel {
    let (near, mut far) = tokio::io::duplex(1024 * 1024);
    let (agent, mut events) = Tunnel::new(Side::Dialer, Config::default());
    let a = agent.clone();
    tokio::task::spawn_local(async move { a.run(near).await });
    let app_done = std::rc::Rc::new(tokio::sync::Notify::new());
    {
        let (agent, app_done) = (agent.clone(), app_done.clone());
        tokio::task::spawn_local(async move {
            while let Some(ev) = events.recv().await {
                if let TunnelEvent::Incoming { stream, .. } = ev {
                    let handle = agent.accept(stream).unwrap();
                    let (a, mut b) = tokio::io::duplex(app_pipe);
                    let app_done = app_done.clone();
                    let app = async move {
                        let mut got = Vec::new();
                        b.read_to_end(&mut got).await.unwrap();
                        assert_eq!(got.len(), total);
                        b.shutdown().await.unwrap();
                    };
                    tokio::join!(handle.splice(a, Bytes::new()), app);
                    app_done.notify_one();
                }
            }
        });
    }
    let mut proxy = Connection::new(Side::Listener, Config::default(), Instant::now());
    pump_until(&mut proxy, &mut far, |e| matches!(e, Event::Ready)).await;
    idle(&agent);
    let id = proxy.open("sink", Bytes::new()).unwrap();
    pump_until(&mut proxy, &mut far, |e| {
        matches!(e, Event::Accepted { .. })
    })
    .await;
    let data = vec![7u8; total];
    let mut sent = 0;
    while sent < data.len() {
        sent += proxy.send(id, &data[sent..]).unwrap();
        if sent < data.len() {
            pump_until(&mut proxy, &mut far, |e| {
                matches!(e, Event::Writable { .. })
            })
            .await;
        }
    }
    proxy.finish(id).unwrap();
    pump_until(&mut proxy, &mut far, |e| {
        matches!(e, Event::Finished { .. })
    })
    .await;
    app_done.notified().await;
    agent
}

#[test]
fn a_tunnel_reads_into_its_input_buffer_only_while_streams_are_open() {
    run_local(async {
        let agent = stream_to_an_agent_app(300_000, 64 * 1024, |agent| {
            assert_eq!(
                agent.input_capacity(),
                0,
                "an idle tunnel holds no input buffer"
            );
        })
        .await;
        // The agent's reader was waiting in a read into its input buffer when the stream
        // ended; nothing more arrives, yet the buffer is released.
        for _ in 0..100 {
            if agent.open_streams() == 0 && agent.input_capacity() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(agent.open_streams(), 0);
        assert_eq!(
            agent.input_capacity(),
            0,
            "idle again: the input buffer is released"
        );
    });
}

/// While the stream's reader keeps up, the tunnel's reads reuse one input buffer: the payloads
/// a read handed out are taken (and dropped) before the next read, which then finds the
/// allocation free again rather than allocating a fresh one per read.
#[test]
fn a_busy_tunnel_reuses_its_input_buffer_while_the_reader_keeps_up() {
    run_local(async {
        let total = 16 * 1024 * 1024;
        // (The application's pipe takes a whole read's payloads at once.)
        let agent = stream_to_an_agent_app(total, 1024 * 1024, |_| {}).await;
        let allocations = agent.input_allocations();
        // ~256 reads of up to 64 KiB; the first read allocates, and a read that comes while a
        // payload is still queued for the application may too.
        assert!(
            allocations <= 16,
            "{allocations} fresh input buffers for {total} bytes"
        );
    });
}

#[test]
fn rejection_reason_reaches_the_opener_and_other_streams_continue() {
    run_local(async {
        let pair = echo_pair(Config::default(), 64 * 1024, 64 * 1024);
        let proxy = &pair.proxy;
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
        let EchoPair {
            proxy,
            proxy_run,
            agent_run,
            _proxy_events,
        } = echo_pair(Config::default(), 64 * 1024, 64 * 1024);
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
