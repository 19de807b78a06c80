//! The "naive relay" baseline: what a quick implementation of a TLS-terminating relay gets. One
//! tokio task per connection: accept TLS (tokio-rustls), dial the upstream over TLS, and
//! `copy_bidirectional`. Prints `LISTENING <addr>` once ready.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Naive per-connection tokio + tokio-rustls TLS relay (benchmark baseline)")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    #[arg(long)]
    upstream: String,
    /// Server certificate and key (PEM files) presented to clients.
    #[arg(long)]
    cert: std::path::PathBuf,
    #[arg(long)]
    key: std::path::PathBuf,
    /// CA (PEM file) and name the upstream is verified with.
    #[arg(long)]
    upstream_ca: std::path::PathBuf,
    #[arg(long, default_value = "sink.bench")]
    upstream_name: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The same crypto provider and suite order as Gatehouse, so the comparison is the relay's.
    let provider = gatehouse_controlplane::tls::provider();
    let certs = rustls_pemfile::certs(&mut std::fs::read(&args.cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut std::fs::read(&args.key)?.as_slice())?
        .context("no key")?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::fs::read(&args.upstream_ca)?.as_slice()) {
        roots.add(c?)?;
    }
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = rustls::pki_types::ServerName::try_from(args.upstream_name.clone())?;
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("LISTENING {}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        let (acceptor, connector, name, upstream) = (
            acceptor.clone(),
            connector.clone(),
            name.clone(),
            args.upstream.clone(),
        );
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(mut down) = acceptor.accept(tcp).await else {
                return;
            };
            let Ok(up_tcp) = tokio::net::TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = up_tcp.set_nodelay(true);
            let Ok(mut up) = connector.connect(name, up_tcp).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
        });
    }
}
