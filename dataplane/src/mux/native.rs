//! Sessions as QUIC streams of their own. Over a QUIC tunnel that negotiated
//! [`gatehouse_proto::alpn::TUNNEL_STREAMS`], the tunnel protocol's first bidirectional
//! stream still carries the connection-level frames (hello, pings, heartbeats, go-away), but each
//! session opens a QUIC stream of its own instead of a stream inside the tunnel. A lost packet
//! then holds back only the sessions whose data it carried, not every session behind it in one
//! ordered byte stream; QUIC's per-stream flow control replaces the tunnel's windows.
//!
//! A session stream starts with the tunnel protocol's own frames, so there is no second format:
//! the opener writes an `Open` frame (target and metadata), the acceptor answers with `OpenOk`
//! or `OpenErr`, and after `OpenOk` the stream's bytes are the session's. The stream id inside
//! those frames means nothing here (it is 1); the tunnel's API names the session by an id of
//! its own from [`NATIVE_ID_BASE`] up, apart from the ids of streams inside the tunnel.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{OpenError, SpliceStats, StreamHandle, Tunnel, TunnelEvent};
use gatehouse_proto::tunnel::{Frame, FrameError, HEADER_LEN, StreamError, StreamId, code};

/// Ids the tunnel's API gives sessions on their own QUIC streams (streams inside the tunnel
/// count up from 1 by twos and would take 2^30 opens to get here).
pub(super) const NATIVE_ID_BASE: StreamId = 0x8000_0000;

/// The largest `Open` frame accepted: a target of up to 1 KiB and its metadata (who, from
/// where, with which roles), as inside the tunnel. Only agents accept session streams: the
/// proxy lets an agent open none but the tunnel's own (`quic::transport`).
const MAX_OPEN_FRAME: u32 = 64 * 1024;
/// The largest answer accepted (`OpenErr` with its message).
const MAX_ANSWER_FRAME: u32 = 8 * 1024;
/// How long a peer may take to send a new stream's `Open` frame.
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Bytes per read when copying between a session's QUIC stream and its socket.
const COPY_CHUNK: usize = 64 * 1024;

/// The id inside a session stream's `Open`/`OpenOk`/`OpenErr` frames.
const FRAME_STREAM: StreamId = 1;

/// One session's QUIC stream, held by its [`StreamHandle`].
pub(super) struct Native {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// The acceptor's `OpenOk` is written when the splice starts (accepting is synchronous).
    answer: bool,
    /// Spliced (or being spliced): dropping no longer resets the stream.
    done: bool,
    tunnel: Tunnel,
}

impl Drop for Native {
    fn drop(&mut self) {
        if !self.done {
            // A handle dropped without splicing (the session failed): reset, as inside the tunnel.
            let _ = self
                .send
                .reset(quinn::VarInt::from_u32(u32::from(code::CANCELLED)));
            let _ = self
                .recv
                .stop(quinn::VarInt::from_u32(u32::from(code::CANCELLED)));
        }
        if let Ok(mut inner) = self.tunnel.inner.try_borrow_mut() {
            inner.native_open = inner.native_open.saturating_sub(1);
        }
    }
}

/// One frame from the front of a QUIC stream, read exactly (nothing past it is consumed).
async fn read_frame(recv: &mut quinn::RecvStream, max: u32) -> Result<Frame, String> {
    let mut header = [0u8; HEADER_LEN];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| format!("stream ended before its frame: {e}"))?;
    let h = Frame::decode_header(&header, max)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| FrameError::Malformed("frame", "short header").to_string())?;
    let mut payload = vec![0u8; h.len];
    recv.read_exact(&mut payload)
        .await
        .map_err(|e| format!("stream ended inside its frame: {e}"))?;
    Frame::from_parts(h, Bytes::from(payload)).map_err(|e| e.to_string())
}

fn encode(frame: &Frame) -> Bytes {
    let mut out = BytesMut::new();
    frame.encode(&mut out);
    out.freeze()
}

fn quic_code(c: u16) -> quinn::VarInt {
    quinn::VarInt::from_u32(u32::from(c))
}

impl Tunnel {
    /// Carry this tunnel's sessions on QUIC streams of their own, on `conn` (the connection whose
    /// first stream [`Tunnel::run`] drives). Streams the peer opens become
    /// [`TunnelEvent::Incoming`]; [`Tunnel::open`] opens new ones. When the tunnel ends, the
    /// connection is closed with it. Call from the tunnel's thread (a local task is spawned).
    pub fn attach_quic(&self, conn: quinn::Connection) {
        self.inner.borrow_mut().quic = Some(conn.clone());
        let tunnel = self.clone();
        tokio::task::spawn_local(async move {
            while let Ok((send, recv)) = conn.accept_bi().await {
                if tunnel.is_closed() {
                    break;
                }
                let tunnel = tunnel.clone();
                tokio::task::spawn_local(async move { tunnel.incoming_native(send, recv).await });
            }
        });
    }

    /// Sessions on QUIC streams of their own (see [`Tunnel::attach_quic`]).
    pub fn has_native_streams(&self) -> bool {
        self.inner.borrow().quic.is_some()
    }

    async fn incoming_native(&self, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let open = tokio::time::timeout(OPEN_TIMEOUT, read_frame(&mut recv, MAX_OPEN_FRAME)).await;
        let (target, metadata) = match open {
            Ok(Ok(Frame::Open {
                target, metadata, ..
            })) => (target, metadata),
            Ok(Ok(other)) => {
                tracing::debug!(
                    frame = other.name(),
                    "tunnel: a session stream must start with open"
                );
                let _ = send.reset(quic_code(code::PROTOCOL));
                let _ = recv.stop(quic_code(code::PROTOCOL));
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "tunnel: bad session stream");
                let _ = send.reset(quic_code(code::PROTOCOL));
                let _ = recv.stop(quic_code(code::PROTOCOL));
                return;
            }
            Err(_) => {
                let _ = send.reset(quic_code(code::CANCELLED));
                let _ = recv.stop(quic_code(code::CANCELLED));
                return;
            }
        };
        let going_away = {
            let inner = self.inner.borrow();
            inner.closed.is_some() || inner.conn.is_draining()
        };
        if going_away {
            let answer = encode(&Frame::OpenErr {
                stream: FRAME_STREAM,
                code: code::GOING_AWAY,
                message: "tunnel is going away".into(),
            });
            let _ = send.write_all(&answer).await;
            let _ = send.finish();
            return;
        }
        let id = self.next_native_id();
        let mut inner = self.inner.borrow_mut();
        inner.native.insert(id, (send, recv));
        // Room for twice the sessions open: the allowance doubles when half of it is in use.
        let in_use = inner.native.len() + inner.native_open;
        if in_use * 2 >= inner.native_allowance as usize
            && inner.native_allowance < crate::io::quic::MAX_SESSIONS
            && let Some(conn) = &inner.quic
        {
            let more = (inner.native_allowance * 2).min(crate::io::quic::MAX_SESSIONS);
            conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(more));
            inner.native_allowance = more;
        }
        inner.events.send(TunnelEvent::Incoming {
            stream: id,
            target,
            metadata,
        });
    }

    /// Open a session on a QUIC stream of its own and wait for the peer's answer.
    pub(super) async fn open_native(
        &self,
        conn: quinn::Connection,
        target: &str,
        metadata: Bytes,
    ) -> Result<StreamHandle, OpenError> {
        if target.len() > 1024 {
            return Err(StreamError::TargetTooLong.into());
        }
        {
            let inner = self.inner.borrow();
            if let Some(reason) = &inner.closed {
                return Err(OpenError::Closed(reason.clone()));
            }
            if inner.conn.is_draining() {
                return Err(StreamError::GoingAway.into());
            }
        }
        let closed = |e: &dyn std::fmt::Display| OpenError::Closed(e.to_string());
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| closed(&e))?;
        let open = encode(&Frame::Open {
            stream: FRAME_STREAM,
            target: target.to_owned(),
            metadata,
        });
        send.write_all(&open).await.map_err(|e| closed(&e))?;
        match read_frame(&mut recv, MAX_ANSWER_FRAME).await {
            Ok(Frame::OpenOk { .. }) => {}
            Ok(Frame::OpenErr { code, message, .. }) => {
                return Err(OpenError::Rejected { code, message });
            }
            Ok(other) => {
                let _ = send.reset(quic_code(code::PROTOCOL));
                return Err(OpenError::Rejected {
                    code: code::PROTOCOL,
                    message: format!("expected open-ok, got {}", other.name()),
                });
            }
            Err(e) => {
                return Err(OpenError::Closed(e));
            }
        }
        let id = self.next_native_id();
        Ok(self.native_handle(id, send, recv, false))
    }

    fn next_native_id(&self) -> StreamId {
        let mut inner = self.inner.borrow_mut();
        let id = inner.next_native;
        inner.next_native = id.wrapping_add(1).max(NATIVE_ID_BASE);
        id
    }

    fn native_handle(
        &self,
        id: StreamId,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        answer: bool,
    ) -> StreamHandle {
        self.inner.borrow_mut().native_open += 1;
        StreamHandle {
            tunnel: self.clone(),
            id,
            notify: std::rc::Rc::default(),
            native: Some(Box::new(Native {
                send,
                recv,
                answer,
                done: false,
                tunnel: self.clone(),
            })),
        }
    }

    /// Accept a session the peer opened on a stream of its own, if `stream` is one.
    pub(super) fn accept_native(&self, stream: StreamId) -> Option<StreamHandle> {
        let (send, recv) = self.inner.borrow_mut().native.remove(&stream)?;
        Some(self.native_handle(stream, send, recv, true))
    }

    /// Refuse a session the peer opened on a stream of its own; `false` if `stream` is not one.
    pub(super) fn reject_native(&self, stream: StreamId, code: u16, message: &str) -> bool {
        let Some((mut send, _recv)) = self.inner.borrow_mut().native.remove(&stream) else {
            return false;
        };
        let answer = encode(&Frame::OpenErr {
            stream: FRAME_STREAM,
            code,
            message: message.to_owned(),
        });
        tokio::task::spawn_local(async move {
            if send.write_all(&answer).await.is_ok() {
                let _ = send.finish();
            }
        });
        true
    }

    /// The tunnel ended: its sessions' streams end with the connection.
    pub(super) fn close_native(&self, reason: &str) {
        let (conn, pending) = {
            let mut inner = self.inner.borrow_mut();
            (inner.quic.take(), std::mem::take(&mut inner.native))
        };
        drop(pending);
        if let Some(conn) = conn {
            let reason = reason.as_bytes();
            conn.close(
                quic_code(code::NO_ERROR),
                reason.get(..reason.len().min(256)).unwrap_or_default(),
            );
        }
    }
}

/// Copy both ways between a session's QUIC stream and `io` until both directions finish, or
/// either fails (then both are reset).
pub(super) async fn splice<IO: AsyncRead + AsyncWrite>(
    native: &mut Native,
    io: IO,
    leftover: Bytes,
) -> SpliceStats {
    native.done = true;
    let mut stats = SpliceStats::default();
    let Native {
        send, recv, answer, ..
    } = native;
    if *answer {
        *answer = false;
        let ok = encode(&Frame::OpenOk {
            stream: FRAME_STREAM,
        });
        if send.write_all(&ok).await.is_err() {
            let _ = recv.stop(quic_code(code::CANCELLED));
            stats.reset = true;
            return stats;
        }
    }
    let (mut rd, mut wr) = tokio::io::split(io);
    let up = async {
        let mut n = 0u64;
        if !leftover.is_empty() {
            send.write_all(&leftover).await.map_err(|_| n)?;
            n += leftover.len() as u64;
        }
        let mut buf = vec![0u8; COPY_CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => {
                    let _ = send.finish();
                    return Ok(n);
                }
                Ok(k) => {
                    send.write_all(buf.get(..k).unwrap_or_default())
                        .await
                        .map_err(|_| n)?;
                    n += k as u64;
                }
                Err(_) => return Err(n),
            }
        }
    };
    let down = async {
        let mut n = 0u64;
        loop {
            match recv.read_chunk(COPY_CHUNK, true).await {
                Ok(Some(chunk)) => {
                    wr.write_all(&chunk.bytes).await.map_err(|_| n)?;
                    wr.flush().await.map_err(|_| n)?;
                    n += chunk.bytes.len() as u64;
                }
                Ok(None) => {
                    let _ = wr.shutdown().await;
                    return Ok(n);
                }
                Err(_) => return Err(n),
            }
        }
    };
    // Both directions until both finish; the first failure ends both.
    let (up_done, down_done) = {
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (None, None);
        while up_done.is_none() || down_done.is_none() {
            tokio::select! {
                r = &mut up, if up_done.is_none() => {
                    let failed = r.is_err();
                    up_done = Some(r);
                    if failed { break; }
                }
                r = &mut down, if down_done.is_none() => {
                    let failed = r.is_err();
                    down_done = Some(r);
                    if failed { break; }
                }
            }
        }
        (up_done, down_done)
    };
    let take = |r: &Option<Result<u64, u64>>| match r {
        Some(Ok(n) | Err(n)) => *n,
        None => 0,
    };
    stats.to_tunnel = take(&up_done);
    stats.from_tunnel = take(&down_done);
    let failed = matches!(up_done, Some(Err(_)) | None) || matches!(down_done, Some(Err(_)) | None);
    if failed {
        stats.reset = true;
        let _ = send.reset(quic_code(code::CANCELLED));
        let _ = recv.stop(quic_code(code::CANCELLED));
    }
    stats
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use gatehouse_controlplane::tls::{Trust, client_config_with_alpn, server_config_with_alpn};

    use super::*;
    use crate::mux::Events;
    use gatehouse_controlplane::identity::PROXY_SERVER_NAME;
    use gatehouse_proto::alpn::{TUNNEL as ALPN_TUNNEL, TUNNEL_STREAMS as ALPN_TUNNEL_STREAMS};
    use gatehouse_proto::tunnel::{Config, Side};

    use crate::tls::testing::Ca;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// A proxy's and an agent's tunnel over one QUIC connection on loopback, each attached to
    /// it where they negotiated sessions on streams of their own. `alpns`: what the agent
    /// offers (the proxy offers both).
    async fn pair(
        alpns: &[&[u8]],
    ) -> (
        Tunnel,
        Events,
        Tunnel,
        Events,
        quinn::Connection,
        quinn::Connection,
    ) {
        let ca = Ca::new("test ca");
        let (cert, key) = ca.leaf(PROXY_SERVER_NAME);
        let server_tls = server_config_with_alpn(&ca.pem, &cert, &key, &[ALPN_TUNNEL]).unwrap();
        let server = crate::io::quic::server_config(&server_tls).unwrap();
        let proxy = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = proxy.local_addr().unwrap();
        let (ccert, ckey) = ca.leaf("agent");
        let mut tls = (*client_config_with_alpn(
            &Trust::CaPem(ca.pem.clone()),
            Some((&ccert, &ckey)),
            &[ALPN_TUNNEL],
        )
        .unwrap())
        .clone();
        let client = crate::io::quic::client_config(&tls).unwrap();
        let client = if alpns.len() == 2 {
            client
        } else {
            tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
            quinn::ClientConfig::new(Arc::new(crypto))
        };
        let endpoint = crate::io::quic::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        // The proxy's side accepts while the agent dials (the handshake needs both).
        let accepting = {
            let proxy = proxy.clone();
            tokio::task::spawn_local(async move { proxy.accept().await.unwrap().await.unwrap() })
        };
        let (agent_conn, agent_io) = crate::io::quic::dial(&endpoint, client, &addr.to_string())
            .await
            .unwrap();
        let (agent, agent_events) = Tunnel::new(Side::Dialer, Config::default());
        if crate::io::quic::session_streams(&agent_conn) {
            agent.attach_quic(agent_conn.clone());
        }
        {
            let agent = agent.clone();
            tokio::task::spawn_local(async move { agent.run(agent_io).await });
        }
        let proxy_conn = accepting.await.unwrap();
        let (send, recv) = proxy_conn.accept_bi().await.unwrap();
        let (tunnel, events) = Tunnel::new(Side::Listener, Config::default());
        if crate::io::quic::session_streams(&proxy_conn) {
            tunnel.attach_quic(proxy_conn.clone());
        }
        {
            let tunnel = tunnel.clone();
            let io = tokio::io::join(recv, send);
            tokio::task::spawn_local(async move { tunnel.run(io).await });
        }
        // The endpoints live as long as their connections need them.
        std::mem::forget((proxy, endpoint));
        (tunnel, events, agent, agent_events, proxy_conn, agent_conn)
    }

    /// The agent's side: `echo` is accepted and echoed, anything else refused.
    fn serve_agent(agent: Tunnel, mut events: Events) {
        tokio::task::spawn_local(async move {
            while let Some(ev) = events.recv().await {
                let TunnelEvent::Incoming { stream, target, .. } = ev else {
                    continue;
                };
                if target != "echo" {
                    agent.reject(stream, code::NOT_FOUND, "no such app");
                    continue;
                }
                let handle = agent.accept(stream).unwrap();
                let (app, mut peer) = tokio::io::duplex(64 * 1024);
                tokio::task::spawn_local(async move {
                    let (mut r, mut w) = tokio::io::split(&mut peer);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
                tokio::task::spawn_local(handle.splice(app, Bytes::new()));
            }
        });
    }

    /// A session from the proxy's side: `n` bytes to the echo and back, compared.
    async fn round_trip(tunnel: &Tunnel, n: usize) -> StreamId {
        let handle = tunnel
            .open("echo", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let id = handle.id();
        let (user, mut peer) = tokio::io::duplex(64 * 1024);
        let splice = tokio::task::spawn_local(handle.splice(user, Bytes::new()));
        let data = pattern(n);
        let (mut r, mut w) = tokio::io::split(&mut peer);
        let write = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let read = r.read_to_end(&mut back);
        let ((), got) = tokio::join!(write, read);
        got.unwrap();
        assert!(
            back == data,
            "echo differs ({} of {n} bytes back)",
            back.len()
        );
        let stats = splice.await.unwrap();
        assert_eq!((stats.to_tunnel, stats.from_tunnel), (n as u64, n as u64));
        assert!(!stats.reset);
        id
    }

    fn run(f: impl std::future::Future<Output = ()>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            tokio::time::timeout(Duration::from_secs(30), f)
                .await
                .expect("timed out")
        });
    }

    /// Sessions run on QUIC streams of their own, several at once, with half-close and the
    /// agent's refusals as inside the tunnel.
    #[test]
    fn sessions_run_on_quic_streams_of_their_own() {
        run(async {
            let (tunnel, _events, agent, agent_events, conn, _) =
                pair(&[ALPN_TUNNEL_STREAMS, ALPN_TUNNEL]).await;
            assert!(tunnel.has_native_streams() && agent.has_native_streams());
            serve_agent(agent, agent_events);
            let ids = futures_join(&tunnel).await;
            assert!(ids.iter().all(|&id| id >= NATIVE_ID_BASE), "{ids:?}");
            match tunnel.open("nope", Bytes::new()).await {
                Err(OpenError::Rejected { code: c, message }) => {
                    assert_eq!(c, code::NOT_FOUND);
                    assert_eq!(message, "no such app");
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
            assert_eq!(tunnel.open_streams(), 0);
            // One QUIC stream per session the proxy opened (three echoed, one refused): the
            // next one the proxy opens is its fifth. (The tunnel's own is the agent's first.)
            let (send, _recv) = conn.open_bi().await.unwrap();
            assert_eq!(send.id().index(), 4);
        });
    }

    async fn futures_join(tunnel: &Tunnel) -> Vec<StreamId> {
        let (a, b, c) = tokio::join!(
            round_trip(tunnel, 1 << 20),
            round_trip(tunnel, 100_000),
            round_trip(tunnel, 0),
        );
        vec![a, b, c]
    }

    /// The agent allows the proxy 64 session streams at first and raises that as they open:
    /// 200 held open at once all get through.
    #[test]
    fn the_agent_raises_the_session_allowance_as_sessions_open() {
        run(async {
            let (tunnel, _events, agent, agent_events, _conn, _) =
                pair(&[ALPN_TUNNEL_STREAMS, ALPN_TUNNEL]).await;
            serve_agent(agent, agent_events);
            let mut held = Vec::new();
            for _ in 0..200 {
                held.push(tunnel.open("echo", Bytes::new()).await.unwrap());
            }
            assert_eq!(tunnel.open_streams(), 200);
            drop(held);
            round_trip(&tunnel, 1000).await;
        });
    }

    /// An agent that offers only the one-stream protocol gets its sessions inside the tunnel.
    #[test]
    fn an_agent_offering_one_stream_gets_sessions_inside_the_tunnel() {
        run(async {
            let (tunnel, _events, agent, agent_events, _conn, _) = pair(&[ALPN_TUNNEL]).await;
            assert!(!tunnel.has_native_streams() && !agent.has_native_streams());
            serve_agent(agent, agent_events);
            let ids = futures_join(&tunnel).await;
            assert!(ids.iter().all(|&id| id < NATIVE_ID_BASE), "{ids:?}");
        });
    }

    /// A session stream that does not start with an open frame is reset; the tunnel and its
    /// other sessions carry on.
    #[test]
    fn a_bad_session_stream_is_reset_and_the_tunnel_carries_on() {
        run(async {
            let (tunnel, _events, agent, agent_events, conn, agent_conn) =
                pair(&[ALPN_TUNNEL_STREAMS, ALPN_TUNNEL]).await;
            serve_agent(agent, agent_events);
            // An agent may open no stream but the tunnel's own: the proxy holds none of its
            // making (a second open waits for credit that does not come).
            let second = tokio::time::timeout(Duration::from_millis(300), agent_conn.open_bi());
            assert!(
                second.await.is_err(),
                "the proxy let an agent open a second stream"
            );
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(b"not a frame at all, just bytes")
                .await
                .unwrap();
            let mut buf = [0u8; 16];
            let r = recv.read(&mut buf).await;
            assert!(
                matches!(r, Err(quinn::ReadError::Reset(c)) if c == quic_code(code::PROTOCOL)),
                "{r:?}"
            );
            // A data frame first is refused the same way.
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(&encode(&Frame::Data {
                stream: FRAME_STREAM,
                data: Bytes::from_static(b"early"),
            }))
            .await
            .unwrap();
            let r = recv.read(&mut buf).await;
            assert!(matches!(r, Err(quinn::ReadError::Reset(_))), "{r:?}");
            round_trip(&tunnel, 10_000).await;
        });
    }
}
