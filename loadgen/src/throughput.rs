//! `throughput`: M concurrent bulk streams, client → (proxy → agent | naive relay | nothing) →
//! sink, for a fixed time (or, `--direction download`, source → … → client). Reports GB/s and
//! GB per CPU-second of the middle box (from /proc).
//! Every path is TLS from the client: `direct` is one TLS hop to the sink, `naive` terminates and
//! re-encrypts (tokio + tokio-rustls), `proxy` is Gatehouse (TLS in, tunnel TLS out).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use gatehouse_controlplane::identity::PROXY_SERVER_NAME;
use gatehouse_controlplane::tls::{Trust, client_config_with_alpn};
use gatehouse_proto::alpn::TCP as ALPN_TCP;
use gatehouse_proto::session::{self, SessionRequest, SessionResponse};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::fleet::UserCreds;
use crate::procstat;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// Gatehouse: TLS to the Proxy, tunnel TLS to a simulated agent that discards (the
    /// proxy's I/O backend: auto, i.e. io_uring where the kernel allows it).
    Proxy,
    /// The same Proxy forced onto its epoll backend.
    ProxyEpoll,
    /// The same Proxy with `--proxy-tcp-congestion cubic` (its public port's connections on
    /// cubic whatever the host's default; everything else keeps the host's).
    ProxyCubic,
    /// The Proxy with the simulated agents' tunnels over QUIC instead of TLS.
    ProxyQuic,
    /// One TLS connection straight to the sink: the ceiling.
    Direct,
    /// A per-connection tokio + tokio-rustls relay (bench/src/bin/naive-relay.rs).
    Naive,
    /// A real OpenSSH jump host: `ssh -W` per stream through a loopback sshd (aes128-gcm).
    Openssh,
    /// rathole's TLS transport: visitor TCP in at the server, TLS data channel to its client.
    Rathole,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Proxy => "proxy",
            Path::ProxyEpoll => "proxy-epoll",
            Path::ProxyCubic => "proxy-cubic",
            Path::ProxyQuic => "proxy-quic",
            Path::Direct => "direct",
            Path::Naive => "naive",
            Path::Openssh => "openssh",
            Path::Rathole => "rathole",
        }
    }
}

/// Which way the bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Client → sink: at the proxy, TLS in, tunnel out.
    #[default]
    Upload,
    /// Source → client: at the proxy, tunnel in, TLS out.
    Download,
}

/// The first byte of a download: the TLS sink becomes a source for that connection.
pub const DOWNLOAD: u8 = b'D';

/// Where a client's streams go and how they get there.
#[derive(Clone)]
pub struct Target {
    pub path: Path,
    /// What the client connects to: the Proxy, the relay, the rathole service port or the sink
    /// itself (also the `ssh -W` destination for the OpenSSH path).
    pub addr: String,
    /// Proxy path: the user's certificate.
    pub user: Option<UserCreds>,
    /// OpenSSH path: the jump host.
    pub jump: Option<Arc<crate::openssh::Sshd>>,
}

/// Anything a client's TLS can run over: a TCP socket or an `ssh -W` child's pipes.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type ClientTls = tokio_rustls::client::TlsStream<Box<dyn Io>>;

/// The stdin/stdout of an `ssh -W` child as one duplex stream; the child dies with it.
struct ChildPipe {
    _child: tokio::process::Child,
    io: tokio::io::Join<tokio::process::ChildStdout, tokio::process::ChildStdin>,
}

impl AsyncRead for ChildPipe {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ChildPipe {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[derive(Debug, Serialize)]
pub struct ThroughputReport {
    pub scenario: &'static str,
    pub path: Path,
    pub direction: Direction,
    pub streams: usize,
    pub duration_s: f64,
    pub bytes: u64,
    pub gb_per_s: f64,
    pub middle_cpu_s: Option<f64>,
    pub gb_per_middle_cpu_s: Option<f64>,
    pub generator_cpu_s: f64,
    pub generator_saturated: bool,
}

const CHUNK: usize = 64 * 1024;

/// A TLS sink: accepts connections and discards what arrives (or echoes it, with `echo`); a
/// connection whose first byte is [`DOWNLOAD`] gets bytes instead, as fast as it reads them,
/// until it closes.
pub fn start_sink(bind: &str, echo: bool) -> anyhow::Result<(SocketAddr, String, String, String)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Distinct subjects: OpenSSL (rathole's native-tls) takes a leaf whose subject equals its
    // issuer for a self-signed certificate.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "loadgen sink CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let mut leaf = rcgen::CertificateParams::new(vec!["sink.bench".to_string()])?;
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "sink.bench");
    let cert = leaf.signed_by(&key, &issuer)?;
    let (cert_pem, key_pem, ca_pem) = (cert.pem(), key.serialize_pem(), ca_cert.pem());
    let certs = gatehouse_controlplane::tls::certs_from_pem(&cert_pem)?;
    let pkey = gatehouse_controlplane::tls::key_from_pem(&key_pem)?;
    let config =
        rustls::ServerConfig::builder_with_provider(gatehouse_controlplane::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, pkey)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let std_listener = std::net::TcpListener::bind(bind)?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    std::thread::Builder::new()
        .name("sink".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                    return;
                };
                while let Ok((tcp, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let _ = tcp.set_nodelay(true);
                        if let Ok(mut tls) = acceptor.accept(tcp).await {
                            let mut buf = vec![0u8; CHUNK];
                            let mut first = true;
                            while let Ok(n) = tls.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                                if std::mem::take(&mut first) && buf.first() == Some(&DOWNLOAD) {
                                    source(tls).await;
                                    break;
                                }
                                if echo
                                    && tls
                                        .write_all(buf.get(..n).unwrap_or_default())
                                        .await
                                        .is_err()
                                {
                                    break;
                                }
                            }
                        }
                    });
                }
            });
        })?;
    Ok((addr, cert_pem, key_pem, ca_pem))
}

/// Write to `io` until it fails (the reader went away), discarding what it sends.
pub async fn source<S: AsyncRead + AsyncWrite + Unpin>(io: S) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let drain = async move {
        let mut buf = vec![0u8; 4096];
        while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let fill = async move {
        let chunk = vec![0xA5u8; CHUNK];
        while wr.write_all(&chunk).await.is_ok() {}
    };
    // Done when writing fails; the drain alone may outlive the reader.
    tokio::select! {
        () = fill => {}
        () = async { drain.await; std::future::pending::<()>().await } => {}
    }
}

pub async fn client_stream(
    target: &Target,
    sink_ca: &str,
    stream_idx: usize,
    app: &str,
) -> anyhow::Result<ClientTls> {
    client_stream_with(target, client_config(target, sink_ca)?, stream_idx, app).await
}

/// The client's TLS config for `target`: the user's certificate and the proxy's CA on the
/// proxy paths, the sink's CA otherwise. Connections that share one config resume their TLS
/// session (rustls keeps the tickets in the config); a fresh config per connection makes
/// every handshake a full one.
pub fn client_config(target: &Target, sink_ca: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    Ok(match target.path {
        Path::Proxy | Path::ProxyEpoll | Path::ProxyCubic | Path::ProxyQuic => {
            let user = target.user.as_ref().context("proxy path needs a user")?;
            client_config_with_alpn(
                &Trust::CaPem(user.ca.clone()),
                Some((&user.cert, &user.key)),
                &[ALPN_TCP],
            )?
        }
        Path::Direct | Path::Naive | Path::Rathole | Path::Openssh => {
            client_config_with_alpn(&Trust::CaPem(sink_ca.to_owned()), None, &[])?
        }
    })
}

/// [`client_stream`] with a given client config.
pub async fn client_stream_with(
    target: &Target,
    cfg: Arc<rustls::ClientConfig>,
    stream_idx: usize,
    app: &str,
) -> anyhow::Result<ClientTls> {
    match target.path {
        Path::Proxy | Path::ProxyEpoll | Path::ProxyCubic | Path::ProxyQuic => {
            let tcp = tokio::net::TcpStream::connect(&target.addr).await?;
            tcp.set_nodelay(true)?;
            let io: Box<dyn Io> = Box::new(tcp);
            let mut tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(
                    rustls::pki_types::ServerName::try_from(PROXY_SERVER_NAME)?,
                    io,
                )
                .await?;
            let req = SessionRequest {
                target: format!("{app}@sim-{}", stream_idx % 2),
                login: String::new(),
                cluster: String::new(),
                on_behalf: None,
            };
            tls.write_all(&session::encode(&req)).await?;
            let mut buf = BytesMut::new();
            loop {
                if let Some(resp) = session::decode::<SessionResponse>(&mut buf)? {
                    anyhow::ensure!(resp.ok, "proxy refused the session: {}", resp.error);
                    break;
                }
                anyhow::ensure!(
                    tls.read_buf(&mut buf).await? > 0,
                    "proxy closed the session"
                );
            }
            Ok(tls)
        }
        Path::Direct | Path::Naive | Path::Rathole | Path::Openssh => {
            let io: Box<dyn Io> = match &target.jump {
                Some(jump) if target.path == Path::Openssh => {
                    let mut child = jump
                        .jump_command(&target.addr)
                        .spawn()
                        .context("starting ssh -W")?;
                    let stdout = child.stdout.take().context("ssh has no stdout")?;
                    let stdin = child.stdin.take().context("ssh has no stdin")?;
                    Box::new(ChildPipe {
                        _child: child,
                        io: tokio::io::join(stdout, stdin),
                    })
                }
                Some(_) | None if target.path == Path::Openssh => {
                    anyhow::bail!("the openssh path needs a jump host")
                }
                _ => {
                    let tcp = tokio::net::TcpStream::connect(&target.addr).await?;
                    tcp.set_nodelay(true)?;
                    Box::new(tcp)
                }
            };
            Ok(tokio_rustls::TlsConnector::from(cfg)
                .connect(rustls::pki_types::ServerName::try_from("sink.bench")?, io)
                .await?)
        }
    }
}

/// Run `streams` bulk senders against `target` for `duration`; `middle_pid` is the process in
/// the middle whose CPU counts (proxy or relay).
pub async fn run(
    target: &Target,
    sink_ca: &str,
    streams: usize,
    duration: Duration,
    direction: Direction,
    middle_pid: Option<u32>,
) -> anyhow::Result<ThroughputReport> {
    let path = target.path;
    let app = match direction {
        Direction::Upload => "sink",
        Direction::Download => "source",
    };
    let mut conns = Vec::with_capacity(streams);
    for i in 0..streams {
        let mut tls = client_stream(target, sink_ca, i, app)
            .await
            .with_context(|| format!("opening {} stream {i}", path.name()))?;
        if direction == Direction::Download {
            tls.write_all(&[DOWNLOAD]).await?;
            tls.flush().await?;
        }
        conns.push(tls);
    }
    let total = Arc::new(AtomicU64::new(0));
    let cpu0 = middle_pid.and_then(procstat::tree_cpu_seconds);
    let gen0 = procstat::self_cpu_seconds().unwrap_or(0.0);
    let _bar = crate::progress::timed(&format!("throughput {}", path.name()), duration);
    let started = Instant::now();
    let deadline = started + duration;
    // The middle box's CPU is read at the deadline, while every connection (and each sshd
    // child serving one) is still alive.
    let cpu_at_deadline = tokio::spawn(async move {
        tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
        middle_pid.and_then(procstat::tree_cpu_seconds)
    });
    let mut tasks = Vec::new();
    for mut tls in conns {
        let total = Arc::clone(&total);
        tasks.push(tokio::spawn(async move {
            let mut chunk = vec![0x5Au8; CHUNK];
            let mut last = Instant::now();
            while last < deadline {
                let n = match direction {
                    Direction::Upload => tls.write_all(&chunk).await.map(|()| CHUNK),
                    Direction::Download => match tls.read(&mut chunk).await {
                        Ok(0) => Err(std::io::ErrorKind::UnexpectedEof.into()),
                        r => r,
                    },
                };
                let Ok(n) = n else { break };
                total.fetch_add(n as u64, Ordering::Relaxed);
                last = Instant::now();
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), tls.shutdown()).await;
            last
        }));
    }
    let mut last = started;
    for t in tasks {
        if let Ok(t) = t.await {
            last = last.max(t);
        }
    }
    // Bytes were counted until the last write finished (just past the deadline).
    let elapsed = last.duration_since(started).as_secs_f64().max(1e-3);
    let cpu = match (cpu0, cpu_at_deadline.await.ok().flatten()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let gen_cpu = procstat::self_cpu_seconds().unwrap_or(0.0) - gen0;
    let bytes = total.load(Ordering::Relaxed);
    let gb = bytes as f64 / 1e9;
    Ok(ThroughputReport {
        scenario: "throughput",
        path,
        direction,
        streams,
        duration_s: elapsed,
        bytes,
        gb_per_s: gb / elapsed,
        middle_cpu_s: cpu,
        gb_per_middle_cpu_s: cpu.filter(|c| *c > 0.0).map(|c| gb / c),
        generator_cpu_s: gen_cpu,
        // The generator also runs the sink (and the simulated agents for the proxy path).
        generator_saturated: gen_cpu / elapsed
            > 0.95
                * std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1) as f64,
    })
}

pub fn print(r: &ThroughputReport) {
    let per_cpu = r
        .gb_per_middle_cpu_s
        .map(|g| format!("{g:.2} GB per middle-box CPU-second"))
        .unwrap_or_else(|| "n/a".into());
    println!(
        "throughput {:<11} streams {:>3}{}  {:>6.3} GB/s  {per_cpu}  (generator {:.1} CPU-s{})",
        r.path.name(),
        r.streams,
        match r.direction {
            Direction::Upload => "",
            Direction::Download => " download",
        },
        r.gb_per_s,
        r.generator_cpu_s,
        if r.generator_saturated {
            ", SATURATED"
        } else {
            ""
        }
    );
}

/// Used by the proxy path: the simulated agents that serve `tcp:sink`.
pub fn sink_ip() -> &'static str {
    "127.0.0.9"
}
