//! `throughput`: M concurrent bulk streams, client → (proxy → agent | naive relay | nothing) →
//! sink, for a fixed time. Reports GB/s and GB per CPU-second of the middle box (from /proc).
//! Every path is TLS from the client: `direct` is one TLS hop to the sink, `naive` terminates and
//! re-encrypts (tokio + tokio-rustls), `proxy` is Gatehouse (TLS in, tunnel TLS out).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use gatehouse_agent::dataplane::session_proto::{
    self, ALPN_TCP, PROXY_SERVER_NAME, SessionRequest, SessionResponse,
};
use gatehouse_controlplane::tls::{Trust, client_config_with_alpn};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fleet::UserCreds;
use crate::procstat;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    Proxy,
    Direct,
    Naive,
}

#[derive(Debug, Serialize)]
pub struct ThroughputReport {
    pub scenario: &'static str,
    pub path: Path,
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

/// A TLS sink: accepts connections and discards what arrives (or echoes it, with `echo`).
pub fn start_sink(bind: &str, echo: bool) -> anyhow::Result<(SocketAddr, String, String, String)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let cert =
        rcgen::CertificateParams::new(vec!["sink.bench".to_string()])?.signed_by(&key, &issuer)?;
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
                            while let Ok(n) = tls.read(&mut buf).await {
                                if n == 0 {
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

pub async fn client_stream(
    path: Path,
    target: &str,
    user: Option<&UserCreds>,
    sink_ca: &str,
    stream_idx: usize,
    app: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    match path {
        Path::Proxy => {
            let user = user.context("proxy path needs a user")?;
            let cfg = client_config_with_alpn(
                &Trust::CaPem(user.ca.clone()),
                Some((&user.cert, &user.key)),
                &[ALPN_TCP],
            )?;
            let tcp = tokio::net::TcpStream::connect(target).await?;
            tcp.set_nodelay(true)?;
            let mut tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(
                    rustls::pki_types::ServerName::try_from(PROXY_SERVER_NAME)?,
                    tcp,
                )
                .await?;
            let req = SessionRequest {
                target: format!("{app}@sim-{}", stream_idx % 2),
                login: String::new(),
            };
            tls.write_all(&session_proto::encode(&req)).await?;
            let mut buf = BytesMut::new();
            loop {
                if let Some(resp) = session_proto::decode::<SessionResponse>(&mut buf)? {
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
        Path::Direct | Path::Naive => {
            let cfg = rustls::ClientConfig::builder_with_provider(
                gatehouse_controlplane::tls::provider(),
            )
            .with_safe_default_protocol_versions()?
            .with_root_certificates({
                let mut roots = rustls::RootCertStore::empty();
                for c in gatehouse_controlplane::tls::certs_from_pem(sink_ca)? {
                    roots.add(c)?;
                }
                roots
            })
            .with_no_client_auth();
            let tcp = tokio::net::TcpStream::connect(target).await?;
            tcp.set_nodelay(true)?;
            Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(rustls::pki_types::ServerName::try_from("sink.bench")?, tcp)
                .await?)
        }
    }
}

/// Run `streams` bulk senders against `target` for `duration`; `middle_pid` is the process in
/// the middle whose CPU counts (proxy or relay).
pub async fn run(
    path: Path,
    target: &str,
    user: Option<&UserCreds>,
    sink_ca: &str,
    streams: usize,
    duration: Duration,
    middle_pid: Option<u32>,
) -> anyhow::Result<ThroughputReport> {
    let mut conns = Vec::with_capacity(streams);
    for i in 0..streams {
        conns.push(
            client_stream(path, target, user, sink_ca, i, "sink")
                .await
                .with_context(|| format!("opening stream {i}"))?,
        );
    }
    let total = Arc::new(AtomicU64::new(0));
    let cpu0 = middle_pid.and_then(procstat::cpu_seconds);
    let gen0 = procstat::self_cpu_seconds().unwrap_or(0.0);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for mut tls in conns {
        let total = Arc::clone(&total);
        tasks.push(tokio::spawn(async move {
            let chunk = vec![0x5Au8; CHUNK];
            while Instant::now() < deadline {
                if tls.write_all(&chunk).await.is_err() {
                    break;
                }
                total.fetch_add(CHUNK as u64, Ordering::Relaxed);
            }
            let _ = tls.shutdown().await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = match (cpu0, middle_pid.and_then(procstat::cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let gen_cpu = procstat::self_cpu_seconds().unwrap_or(0.0) - gen0;
    let bytes = total.load(Ordering::Relaxed);
    let gb = bytes as f64 / 1e9;
    Ok(ThroughputReport {
        scenario: "throughput",
        path,
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
        "throughput {:<6} streams {:>3}  {:>6.3} GB/s  {per_cpu}  (generator {:.1} CPU-s{})",
        format!("{:?}", r.path).to_lowercase(),
        r.streams,
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
