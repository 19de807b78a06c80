//! QUIC as an agent transport (quinn): the same tunnel protocol over QUIC. The proxy listens for
//! it on UDP at its public port; certificates, ALPN and the identity checks are the TLS
//! listener's. The tunnel's own frames (hello, pings, heartbeats, go-away) run on the first
//! bidirectional stream the agent opens; with `gatehouse-tunnel-streams`, which both ends offer
//! first, each session is a QUIC stream of its own that the proxy opens (`mux::native`), and an
//! agent that offers only `gatehouse-tunnel` gets every session inside that first stream.
//!
//! What QUIC adds: the connection's independence from the client's address (a changing agent
//! address, NAT rebinding or roaming, keeps the tunnel); a way in for agents that only have UDP
//! out; and, with sessions on streams of their own, a lost packet holds back only the sessions
//! whose data it carried, where over TCP it holds back every session in the tunnel. It does not
//! move more bytes over loss: quinn's congestion control (cubic) cuts its window at every random
//! loss, as TCP's cubic does. Over an emulated lossy link (`loadgen link`) QUIC tunnels moved
//! what TLS tunnels on cubic did, and far less than TLS tunnels on BBR (decision 0007;
//! `docs/measurements.md`, "QUIC on a lossy link" and "Each session on a QUIC stream of its
//! own").

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;

use gatehouse_controlplane::identity::PROXY_SERVER_NAME;
use gatehouse_proto::alpn::{TUNNEL as ALPN_TUNNEL, TUNNEL_STREAMS as ALPN_TUNNEL_STREAMS};

/// A tunnel's byte stream over QUIC.
pub type QuicStream = tokio::io::Join<quinn::RecvStream, quinn::SendStream>;

/// How an agent reaches the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelTransport {
    /// TCP + TLS 1.3 (the default).
    #[default]
    Tls,
    /// QUIC (UDP) at the proxy's port.
    Quic,
}

impl std::str::FromStr for TunnelTransport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tls" | "tcp" => Ok(Self::Tls),
            "quic" => Ok(Self::Quic),
            other => Err(format!(
                "unknown tunnel transport `{other}` (expected tls or quic)"
            )),
        }
    }
}

impl std::fmt::Display for TunnelTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tls => "tls",
            Self::Quic => "quic",
        })
    }
}

/// Sessions a tunnel may have open at once on streams of their own, as inside the tunnel
/// (`tunnel::Config::max_streams`).
pub(crate) const MAX_SESSIONS: u32 = 4096;
/// What an agent allows the proxy at first. quinn keeps state for every stream the peer may
/// open from the start, so the agent raises the allowance as sessions open
/// (`mux::native`), doubling up to [`MAX_SESSIONS`].
pub(crate) const FIRST_SESSIONS: u32 = 64;

/// Transport settings for long-lived tunnels carrying bulk sessions: windows large enough for
/// a few MB in flight, keep-alives so idle tunnels survive NAT timeouts.
/// `peer_streams`: the bidirectional streams the peer may open at once. The proxy opens the
/// sessions; an agent opens only the tunnel's own stream, so the proxy allows it that one and
/// no more (an agent cannot make the proxy hold half-sent session streams).
fn transport(peer_streams: u32) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(8 * 1024 * 1024))
        .receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024))
        .send_window(16 * 1024 * 1024)
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(peer_streams))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .keep_alive_interval(Some(Duration::from_secs(15)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(60)) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// The proxy's QUIC server config, from its TLS server config (same certificate, same client
/// verification), offering only the tunnel protocol.
pub(crate) fn server_config(tls: &rustls::ServerConfig) -> Result<quinn::ServerConfig, String> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN_TUNNEL_STREAMS.to_vec(), ALPN_TUNNEL.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| format!("QUIC needs TLS 1.3 with AES-128-GCM: {e}"))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(1));
    Ok(cfg)
}

/// Length of the connection IDs the proxy issues (quinn's default).
const CID_LEN: usize = 8;

/// QUIC endpoints a proxy runs, at most: one per worker, each named by one byte of its
/// connection IDs.
pub(crate) const MAX_ENDPOINTS: usize = 256;

/// The proxy's connection IDs: random but for their first byte, which names the worker whose
/// endpoint holds the connection. The kernel's steering program ([`bind_endpoints`]) reads it,
/// so every packet of a connection reaches that worker from whatever address it comes: a tunnel
/// survives NAT rebinding and roaming although each worker has a socket of its own. (The byte
/// is the same in every ID of a connection, which tells an on-path observer one of
/// `MAX_ENDPOINTS` values across a migration; the rest is fresh randomness per ID.)
#[derive(Debug, Clone, Copy)]
struct WorkerCids {
    worker: u8,
}

impl quinn::ConnectionIdGenerator for WorkerCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; CID_LEN];
        rand::thread_rng().fill_bytes(&mut id);
        id[0] = self.worker;
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Endpoint settings for worker `worker` (index into the sockets of [`bind_endpoints`]).
pub(crate) fn endpoint_config(worker: usize) -> quinn::EndpointConfig {
    let worker = u8::try_from(worker % MAX_ENDPOINTS).unwrap_or_default();
    let mut cfg = quinn::EndpointConfig::default();
    cfg.cid_generator(move || Box::new(WorkerCids { worker }));
    cfg
}

/// Bind `n` UDP sockets (at most [`MAX_ENDPOINTS`]) to `addr`, one per worker, in one
/// `SO_REUSEPORT` group whose steering program sends each datagram to the socket its
/// destination connection ID names (see [`WorkerCids`]): the first byte of the ID, modulo `n`.
/// A client's first Initial carries an ID of its own choosing, so it lands on a worker picked by
/// that ID's first byte, whose endpoint then issues IDs naming itself; datagrams too short to
/// hold an ID go to the first socket. `addr`'s port 0 picks one port for all.
pub(crate) fn bind_endpoints(
    addr: SocketAddr,
    n: usize,
) -> std::io::Result<Vec<std::net::UdpSocket>> {
    let n = n.clamp(1, MAX_ENDPOINTS);
    let mut addr = addr;
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        s.set_reuse_port(true)?;
        if !size_buffers(&s) && sockets.is_empty() {
            tracing::warn!(
                receive = s.recv_buffer_size().unwrap_or(0) / 2,
                send = s.send_buffer_size().unwrap_or(0) / 2,
                wanted = UDP_BUFFER,
                "QUIC: the UDP sockets' buffers are smaller than wanted (raise \
                 net.core.rmem_max and net.core.wmem_max, or grant CAP_NET_ADMIN); bursts of \
                 new connections may be dropped"
            );
        }
        s.bind(&addr.into())?;
        if let Some(a) = s.local_addr()?.as_socket() {
            addr = a;
        }
        if sockets.is_empty() && n > 1 {
            // The group's program, attached before the others join: a datagram never meets
            // the kernel's default (hash of the addresses) spread.
            steer_by_connection_id(&s, n)?;
        }
        sockets.push(std::net::UdpSocket::from(s));
    }
    Ok(sockets)
}

/// Receive and send buffer each QUIC socket asks for. The kernel's default (net.core.rmem_default,
/// 208 KiB here: about 90 full-size datagrams) overflows when thousands of agents dial at once
/// (a proxy restart), and every Initial dropped costs its agent a retransmission timeout of a
/// second; a socket serving many connections needs room for their bursts. quic-go asks 7 MiB.
pub(crate) const UDP_BUFFER: usize = 8 << 20;

/// Ask for [`UDP_BUFFER`] both ways. `SO_RCVBUF`/`SO_SNDBUF` are capped at
/// net.core.{r,w}mem_max; with `CAP_NET_ADMIN` the `FORCE` variants are not. Whether the socket
/// got that much.
fn size_buffers(socket: &socket2::Socket) -> bool {
    // (The kernel reports twice what was set: its bookkeeping overhead.)
    type Size = fn(&socket2::Socket) -> std::io::Result<usize>;
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    let ways: [(Size, libc::c_int); 2] = [
        (socket2::Socket::recv_buffer_size, libc::SO_RCVBUFFORCE),
        (socket2::Socket::send_buffer_size, libc::SO_SNDBUFFORCE),
    ];
    let [recv, send] = ways.map(|(size, force)| {
        if size(socket).unwrap_or(0) < UDP_BUFFER {
            let _ = force_buffer(socket, force);
        }
        size(socket).unwrap_or(0) >= UDP_BUFFER
    });
    recv && send
}

/// `SO_RCVBUFFORCE` or `SO_SNDBUFFORCE` to [`UDP_BUFFER`].
#[allow(unsafe_code)]
fn force_buffer(socket: &socket2::Socket, option: libc::c_int) -> std::io::Result<()> {
    let size = libc::c_int::try_from(UDP_BUFFER).map_err(std::io::Error::other)?;
    // SAFETY: the value is a plain `c_int`, all the option reads.
    unsafe { set_socket_option(socket, option, &size) }
}

/// `setsockopt(SOL_SOCKET, option, value)`, the option's length being `value`'s size.
///
/// # Safety
///
/// Whatever `value` refers to (the program behind a `sock_fprog`) must be valid for the call.
#[allow(unsafe_code)]
unsafe fn set_socket_option<T>(
    socket: &socket2::Socket,
    option: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `value` is a live reference of `size_of::<T>()` bytes for the call; the caller
    // vouches for what it points to.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(value).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(0),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Attach the classic BPF program that picks a socket of the reuseport group by connection ID.
/// The kernel runs it on the UDP payload; its result indexes the group's sockets in bind order.
#[allow(unsafe_code)]
fn steer_by_connection_id(socket: &socket2::Socket, n: usize) -> std::io::Result<()> {
    let n = u32::try_from(n).map_err(std::io::Error::other)?;
    let ins = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: u16::try_from(code).unwrap_or_default(),
        jt,
        jf,
        k,
    };
    let mut program = [
        // A = payload[0]: the header form (long headers set the top bit).
        ins(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 0),
        ins(libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K, 0, 2, 0x80),
        // Long header: flags, version (4), DCID length, then the DCID at offset 6.
        ins(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 6),
        ins(libc::BPF_JMP | libc::BPF_JA, 0, 0, 1),
        // Short header: flags, then the DCID at offset 1.
        ins(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 1),
        ins(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, 0, 0, n),
        ins(libc::BPF_RET | libc::BPF_A, 0, 0, 0),
    ];
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).unwrap_or_default(),
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies the
    // program during `setsockopt` and checks it.
    unsafe { set_socket_option(socket, libc::SO_ATTACH_REUSEPORT_CBPF, &prog) }
}

/// An agent's QUIC client config, from its TLS client config (its node certificate).
pub fn client_config(tls: &rustls::ClientConfig) -> Result<quinn::ClientConfig, String> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN_TUNNEL_STREAMS.to_vec(), ALPN_TUNNEL.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| format!("QUIC needs TLS 1.3 with AES-128-GCM: {e}"))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(FIRST_SESSIONS));
    Ok(cfg)
}

/// A client endpoint bound to `local` (port 0 for any), its socket's buffers sized as the
/// proxy's are (one endpoint may carry many tunnels: loadgen's simulated agents share one per
/// thread).
pub fn client_endpoint(local: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(local),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // (An agent's one connection needs no more than the default: no warning when refused.)
    let _ = size_buffers(&s);
    s.bind(&local.into())?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        std::net::UdpSocket::from(s),
        Arc::new(quinn::TokioRuntime),
    )
}

/// Dial the proxy at `addr` and open the tunnel's stream. The connection must be kept (dropping
/// it closes the tunnel).
pub async fn dial(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: &str,
) -> std::io::Result<(quinn::Connection, QuicStream)> {
    let target = tokio::net::lookup_host(addr)
        .await?
        .find(|a| a.is_ipv4() == endpoint.local_addr().map(|l| l.is_ipv4()).unwrap_or(true))
        .ok_or_else(|| std::io::Error::other(format!("no address for {addr}")))?;
    let conn = endpoint
        .connect_with(config, target, PROXY_SERVER_NAME)
        .map_err(std::io::Error::other)?
        .await
        .map_err(std::io::Error::other)?;
    let (send, recv) = conn.open_bi().await.map_err(std::io::Error::other)?;
    Ok((conn, tokio::io::join(recv, send)))
}

/// Whether `conn` negotiated sessions on QUIC streams of their own ([`ALPN_TUNNEL_STREAMS`]):
/// then both ends call [`crate::mux::Tunnel::attach_quic`].
pub fn session_streams(conn: &quinn::Connection) -> bool {
    peer(conn).0.as_deref() == Some(ALPN_TUNNEL_STREAMS)
}

/// The negotiated ALPN protocol and the client's certificate chain of an accepted connection.
pub(crate) fn peer(
    conn: &quinn::Connection,
) -> (
    Option<Vec<u8>>,
    Option<rustls::pki_types::CertificateDer<'static>>,
) {
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    let cert = conn
        .peer_identity()
        .and_then(|p| {
            p.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.into_iter().next());
    (alpn, cert)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    /// Which of `sockets` receives a datagram (each waits at most a second).
    fn receiver(sockets: &[UdpSocket]) -> Option<usize> {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let mut buf = [0u8; 64];
        while std::time::Instant::now() < deadline {
            for (i, s) in sockets.iter().enumerate() {
                if s.recv_from(&mut buf).is_ok() {
                    return Some(i);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    /// The proxy's sockets, and a client endpoint's, get [`UDP_BUFFER`] each way, or as much
    /// as net.core.{r,w}mem_max allows a process without `CAP_NET_ADMIN`.
    #[test]
    fn udp_sockets_ask_for_room_for_bursts() {
        let limit = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0)
        };
        let (rmax, wmax) = (limit("rmem_max"), limit("wmem_max"));
        for s in bind_endpoints("127.0.0.1:0".parse().unwrap(), 2).unwrap() {
            let s = socket2::SockRef::from(&s);
            assert!(s.recv_buffer_size().unwrap() >= UDP_BUFFER.min(rmax));
            assert!(s.send_buffer_size().unwrap() >= UDP_BUFFER.min(wmax));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let e = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
            assert!(e.local_addr().unwrap().port() != 0);
        });
        // (quinn keeps the client's socket to itself; the same `size_buffers` sized it.)
        if has_net_admin() {
            // With CAP_NET_ADMIN (CI runs as root) the FORCE variants pass the limits.
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
            assert!(
                size_buffers(&s),
                "CAP_NET_ADMIN gets the whole buffer whatever the limits"
            );
        }
    }

    /// Whether this process has `CAP_NET_ADMIN` (bit 12 of `CapEff` in `/proc/self/status`).
    fn has_net_admin() -> bool {
        std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .is_some_and(|caps| caps & (1 << 12) != 0)
        })
    }

    #[test]
    fn datagrams_reach_the_worker_their_connection_id_names() {
        let sockets = bind_endpoints("127.0.0.1:0".parse().unwrap(), 4).unwrap();
        let addr = sockets[0].local_addr().unwrap();
        for s in &sockets {
            assert_eq!(s.local_addr().unwrap(), addr, "one port for all");
            s.set_nonblocking(true).unwrap();
        }
        // One client address for every datagram: the kernel's own hash would send them all to
        // the same socket.
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        for (cid_first, worker) in [(0u8, 0), (1, 1), (2, 2), (3, 3), (6, 2), (255, 3)] {
            let mut cid = [0xAAu8; CID_LEN];
            cid[0] = cid_first;
            let mut short = vec![0x40];
            short.extend_from_slice(&cid);
            short.extend_from_slice(&[0; 20]);
            client.send_to(&short, addr).unwrap();
            assert_eq!(
                receiver(&sockets),
                Some(worker),
                "short header, ID {cid_first}"
            );
            let mut long = vec![0xC0, 0, 0, 0, 1, CID_LEN as u8];
            long.extend_from_slice(&cid);
            long.extend_from_slice(&[0; 40]);
            client.send_to(&long, addr).unwrap();
            assert_eq!(
                receiver(&sockets),
                Some(worker),
                "long header, ID {cid_first}"
            );
        }
        // Too short to hold an ID: the first socket.
        client.send_to(&[0x40], addr).unwrap();
        assert_eq!(receiver(&sockets), Some(0));
    }

    #[test]
    fn connection_ids_name_their_worker() {
        let mut g = WorkerCids { worker: 3 };
        let a = quinn::ConnectionIdGenerator::generate_cid(&mut g);
        let b = quinn::ConnectionIdGenerator::generate_cid(&mut g);
        assert_eq!((a.len(), a[0], b[0]), (CID_LEN, 3, 3));
        assert_ne!(a, b);
    }
}
