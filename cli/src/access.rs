//! Reaching nodes through the Proxy: `gsh ls`, `gsh ssh`, `gsh proxy ssh` (OpenSSH
//! ProxyCommand), `gsh proxy tcp` and `gsh config`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use gatehouse_controlplane::identity::PROXY_SERVER_NAME;
use gatehouse_controlplane::proto;
use gatehouse_controlplane::tls::{Trust, client_config_with_alpn};
use gatehouse_proto::alpn::{SSH as ALPN_SSH, TCP as ALPN_TCP};
use gatehouse_proto::session::{self, SessionRequest, SessionResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    Profile, SSH_CERT_FILE, SSH_KEY_FILE, connect, identity_endpoint, print_table, rpc_error,
};

type ProxyStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

fn proxy_of(profile: &Profile) -> anyhow::Result<String> {
    profile
        .proxy_addr
        .clone()
        .context("this profile has no proxy; log in with `gsh login --proxy HOST:PORT`")
}

fn read(dir: &Path, name: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(dir.join(name))
        .with_context(|| format!("reading {} (run gsh login)", dir.join(name).display()))
}

/// The files a client config was built from, and the config.
type CachedConfig = ([String; 4], Arc<rustls::ClientConfig>);

/// The client config for the profile's current certificate and `alpn`: built once and reused
/// while the files stay the same, so the connections of one process (`gsh proxy tcp` opens
/// one per local connection) resume their TLS session instead of repeating the certificate
/// signatures. A `gsh login` that renews the certificate changes the files and so the config.
fn proxy_client_config(dir: &Path, alpn: &[u8]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    static CACHE: std::sync::Mutex<Option<CachedConfig>> = std::sync::Mutex::new(None);
    let (ca, crt, tls_key) = (
        read(dir, "ca.pem")?,
        read(dir, "tls.crt")?,
        read(dir, "tls.key")?,
    );
    let key = [ca, crt, tls_key, hex::encode(alpn)];
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((k, config)) = cache.as_ref()
        && *k == key
    {
        return Ok(Arc::clone(config));
    }
    let [ca, crt, tls_key, _] = &key;
    let config = client_config_with_alpn(&Trust::CaPem(ca.clone()), Some((crt, tls_key)), &[alpn])?;
    *cache = Some((key, Arc::clone(&config)));
    Ok(config)
}

/// TLS to the Proxy with the user's certificate, for `alpn`.
async fn dial_proxy(dir: &Path, profile: &Profile, alpn: &[u8]) -> anyhow::Result<ProxyStream> {
    let addr = proxy_of(profile)?;
    let config = proxy_client_config(dir, alpn)?;
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .with_context(|| format!("cannot reach the proxy at {addr}"))?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(PROXY_SERVER_NAME)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(&config))
        .connect(name, tcp)
        .await
        .with_context(|| {
            format!("TLS with the proxy at {addr} failed (expired certificate? run gsh login)")
        })?;
    Ok(tls)
}

/// Ask the Proxy for a session; returns the stream, the answer and bytes that followed it.
async fn open_session(
    dir: &Path,
    profile: &Profile,
    alpn: &[u8],
    request: &SessionRequest,
) -> anyhow::Result<(ProxyStream, SessionResponse, Bytes)> {
    let mut tls = dial_proxy(dir, profile, alpn).await?;
    tls.write_all(&session::encode(request)).await?;
    tls.flush().await?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if let Some(resp) = session::decode::<SessionResponse>(&mut buf)? {
            return Ok((tls, resp, buf.freeze()));
        }
        if tls.read_buf(&mut buf).await? == 0 {
            bail!(
                "the proxy closed the connection without answering (is your certificate still valid? run gsh status)"
            );
        }
    }
}

fn refusal(resp: &SessionResponse) -> anyhow::Error {
    anyhow::anyhow!("{}", resp.error)
}

/// Copy both ways between the session and (reader, writer) until both directions end.
async fn bridge<R, W>(
    tls: ProxyStream,
    leftover: Bytes,
    mut input: R,
    mut output: W,
) -> anyhow::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(tls);
    output.write_all(&leftover).await?;
    output.flush().await?;
    let up = async {
        // Large reads become large writes: TLS records of full size, few syscalls.
        let mut input = tokio::io::BufReader::with_capacity(256 * 1024, &mut input);
        let r = tokio::io::copy_buf(&mut input, &mut wr).await;
        let _ = wr.shutdown().await;
        r
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            output.write_all(buf.get(..n).unwrap_or_default()).await?;
            output.flush().await?;
        }
        let _ = output.shutdown().await;
        Ok::<_, std::io::Error>(())
    };
    // When the node closes the session, stop even if our input is still open (a terminal).
    tokio::select! {
        r = down => r?,
        r = async { let r = up.await; std::future::pending::<()>().await; r } => { r?; }
    }
    Ok(())
}

/// `gsh proxy ssh [--cluster LEAF] LOGIN@HOST:PORT`: HOST may carry the `.CLUSTER` (or
/// `.LEAF`) suffix OpenSSH users type.
pub async fn proxy_ssh(dir: &Path, spec: &str, cluster: Option<&str>) -> anyhow::Result<()> {
    let profile = Profile::load(dir)?;
    let (login, rest) = spec.rsplit_once('@').unwrap_or(("", spec));
    let host = match rest.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => rest,
    };
    let cluster = cluster.filter(|c| *c != profile.cluster);
    let suffix = format!(".{}", cluster.unwrap_or(&profile.cluster));
    let target = host.strip_suffix(&suffix).unwrap_or(host);
    let req = SessionRequest {
        target: target.to_owned(),
        login: login.to_owned(),
        cluster: cluster.unwrap_or_default().to_owned(),
        on_behalf: None,
    };
    let (tls, resp, leftover) = open_session(dir, &profile, ALPN_SSH, &req).await?;
    if !resp.ok {
        return Err(refusal(&resp));
    }
    // The host CA keys the proxy says are trusted now (a rotation adds one, its end drops one):
    // written before OpenSSH can check the host certificate, which needs bytes from the bridge.
    if cluster.is_none() && !resp.host_ca.is_empty() {
        crate::clusters::trust_own_hosts(dir, &profile, &resp.host_ca)?;
    }
    bridge(
        tls,
        leftover,
        crate::stdio::stdin(),
        crate::stdio::stdout()?,
    )
    .await
}

/// `gsh proxy tcp APP --listen ADDR`: forward local connections to an app behind the Proxy.
pub async fn proxy_tcp(dir: &Path, app: &str, listen: &str) -> anyhow::Result<()> {
    let profile = Profile::load(dir)?;
    proxy_of(&profile)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!(
        "Forwarding {} -> app {app} through {}",
        listener.local_addr()?,
        proxy_of(&profile)?
    );
    loop {
        let (local, peer) = listener.accept().await?;
        let (dir, profile, app) = (dir.to_owned(), profile.clone(), app.to_owned());
        tokio::spawn(async move {
            let req = SessionRequest {
                target: app.clone(),
                login: String::new(),
                cluster: String::new(),
                on_behalf: None,
            };
            match open_session(&dir, &profile, ALPN_TCP, &req).await {
                Ok((tls, resp, leftover)) if resp.ok => {
                    let _ = local.set_nodelay(true);
                    let (r, w) = local.into_split();
                    if let Err(e) = bridge(tls, leftover, r, w).await {
                        eprintln!("gsh: {peer}: {e:#}");
                    }
                }
                Ok((_, resp, _)) => eprintln!("gsh: {peer}: {}", resp.error),
                Err(e) => eprintln!("gsh: {peer}: {e:#}"),
            }
        });
    }
}

async fn nodes(dir: &Path, profile: &Profile) -> anyhow::Result<Vec<proto::Node>> {
    let mut client = connect(&identity_endpoint(dir, &profile.auth_addr)?).await?;
    Ok(client
        .list_nodes(proto::ListNodesRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner()
        .nodes)
}

fn matches(node: &proto::Node, selector: &[(String, String)]) -> bool {
    selector.iter().all(|(k, v)| node.labels.get(k) == Some(v))
}

fn parse_selector(items: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    items
        .iter()
        .flat_map(|i| i.split(','))
        .filter(|i| !i.is_empty())
        .map(|i| {
            i.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .with_context(|| format!("`{i}`: expected KEY=VALUE"))
        })
        .collect()
}

/// A leaf cluster's nodes, through this cluster's proxy and the leaf's tunnel.
async fn leaf_nodes(dir: &Path, profile: &Profile, leaf: &str) -> anyhow::Result<Vec<proto::Node>> {
    let req = SessionRequest {
        target: "@nodes".into(),
        login: String::new(),
        cluster: leaf.to_owned(),
        on_behalf: None,
    };
    let (mut tls, resp, leftover) = open_session(dir, profile, ALPN_SSH, &req).await?;
    if !resp.ok {
        return Err(refusal(&resp));
    }
    let mut body = leftover.to_vec();
    tls.read_to_end(&mut body).await?;
    let v: Vec<serde_json::Value> =
        serde_json::from_slice(&body).context("the leaf's node list is not JSON")?;
    Ok(v.into_iter()
        .map(|n| {
            let text = |k: &str| {
                n.get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned()
            };
            let value = |k: &str| n.get(k).cloned().unwrap_or_default();
            proto::Node {
                name: text("name"),
                host_id: text("host_id"),
                labels: serde_json::from_value(value("labels")).unwrap_or_default(),
                services: serde_json::from_value(value("services")).unwrap_or_default(),
                ..Default::default()
            }
        })
        .collect())
}

/// What `gsh ls` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    Nodes,
    Apps,
}

/// `gsh ls [--apps] [--cluster LEAF] [labels]`.
pub async fn ls(
    dir: &Path,
    labels: &[String],
    what: Listing,
    format: &str,
    cluster: Option<&str>,
) -> anyhow::Result<()> {
    let profile = Profile::load(dir)?;
    let selector = parse_selector(labels)?;
    let all = match cluster.filter(|c| *c != profile.cluster) {
        Some(leaf) => leaf_nodes(dir, &profile, leaf).await?,
        None => nodes(dir, &profile).await?,
    };
    if what == Listing::Apps {
        return ls_apps(&all, &selector, format);
    }
    let mut list: Vec<proto::Node> = all.into_iter().filter(|n| matches(n, &selector)).collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    if format == "json" {
        let v: Vec<_> = list
            .iter()
            .map(|n| serde_json::json!({ "name": n.name, "host_id": n.host_id, "labels": n.labels, "services": n.services }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|n| {
            let mut labels: Vec<String> =
                n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            vec![
                n.name.clone(),
                n.host_id.clone(),
                labels.join(","),
                n.services.join(","),
            ]
        })
        .collect();
    print_table(&["Node", "Host id", "Labels", "Services"], &rows);
    Ok(())
}

/// `gsh ls --apps`: one row per app Auth says the user's roles reach, by the app's labels.
fn ls_apps(
    nodes: &[proto::Node],
    selector: &[(String, String)],
    format: &str,
) -> anyhow::Result<()> {
    let mut rows: Vec<(&proto::App, &proto::Node)> = nodes
        .iter()
        .flat_map(|n| n.apps.iter().map(move |a| (a, n)))
        .filter(|(a, _)| selector.iter().all(|(k, v)| a.labels.get(k) == Some(v)))
        .collect();
    rows.sort_by(|a, b| (&a.0.name, &a.1.name).cmp(&(&b.0.name, &b.1.name)));
    if format == "json" {
        let v: Vec<_> = rows
            .iter()
            .map(|(a, n)| serde_json::json!({ "app": a.name, "node": n.name, "host_id": n.host_id, "labels": a.labels }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(a, n)| {
            let mut labels: Vec<String> =
                a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            vec![a.name.clone(), n.name.clone(), labels.join(",")]
        })
        .collect();
    print_table(&["App", "Node", "Labels"], &table);
    Ok(())
}

fn gsh_exe() -> String {
    std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "gsh".into())
}

fn proxy_command(dir: &Path, cluster: Option<&str>) -> String {
    let via = cluster
        .map(|c| format!(" --cluster {c}"))
        .unwrap_or_default();
    format!(
        "\"{}\" --identity \"{}\" proxy ssh{via} %r@%h:%p",
        gsh_exe(),
        dir.display()
    )
}

/// `gsh ssh [--cluster LEAF] [login@]target [command]` runs OpenSSH through `gsh proxy ssh`.
pub async fn ssh(
    dir: &Path,
    target: &str,
    command: &[String],
    tty: bool,
    cluster: Option<&str>,
) -> anyhow::Result<i32> {
    let profile = Profile::load(dir)?;
    proxy_of(&profile)?;
    let cluster = cluster.filter(|c| *c != profile.cluster);
    if let Some(leaf) = cluster {
        let leaves = crate::clusters::leaves(dir, &profile).await?;
        if !leaves.iter().any(|l| l.name == leaf) {
            bail!(
                "`{leaf}` is not a leaf cluster of {} (gsh clusters lists them)",
                profile.cluster
            );
        }
        crate::clusters::trust_leaf_hosts(dir, &profile, &leaves)?;
        if target.contains('=') {
            bail!("label selectors reach this cluster's nodes only; name the node in `{leaf}`");
        }
    }
    let (login, node) = match target.rsplit_once('@') {
        Some((l, n)) => (l.to_owned(), n.to_owned()),
        None => (
            std::env::var("USER").unwrap_or_else(|_| "root".into()),
            target.to_owned(),
        ),
    };
    // A label selector names no host the host certificate could match: resolve it first.
    let host = if cluster.is_some() {
        node
    } else if node.contains('=') {
        let selector = parse_selector(std::slice::from_ref(&node))?;
        let found: Vec<proto::Node> = nodes(dir, &profile)
            .await?
            .into_iter()
            .filter(|n| matches(n, &selector))
            .collect();
        match found.as_slice() {
            [one] => one.name.clone(),
            [] => bail!("no node matches `{node}`"),
            many => bail!(
                "`{node}` matches {} nodes: {}",
                many.len(),
                many.iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    } else {
        node
    };
    let mut cmd = std::process::Command::new("ssh");
    cmd.args(openssh_options(dir, cluster));
    if tty {
        cmd.arg("-t");
    }
    cmd.arg("-l").arg(&login).arg(&host);
    if !command.is_empty() {
        cmd.arg("--").args(command);
    }
    run_openssh(cmd, "ssh").await
}

/// The ciphers OpenSSH clients use with the cluster's nodes, best first. OpenSSH's own default
/// puts chacha20-poly1305 first (fast without AES instructions); the agents' AES-GCM runs on the
/// CPU's AES instructions, several times faster per byte there, so AES-GCM leads and
/// chacha20-poly1305 stays for a client without them.
pub const CIPHERS: &str =
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com";

/// The OpenSSH client options that reach the cluster's nodes through the proxy with the
/// profile's certificate, whatever the user's own ssh config says.
fn openssh_options(dir: &Path, cluster: Option<&str>) -> Vec<std::ffi::OsString> {
    let opt = |o: String| ["-o".into(), o.into()];
    let mut args: Vec<std::ffi::OsString> = vec!["-F".into(), "/dev/null".into()];
    for o in [
        "BatchMode=yes".to_string(),
        "StrictHostKeyChecking=yes".to_string(),
        "IdentitiesOnly=yes".to_string(),
        format!("Ciphers={CIPHERS}"),
        "LogLevel=ERROR".to_string(),
        format!("ProxyCommand={}", proxy_command(dir, cluster)),
        format!("UserKnownHostsFile={}", dir.join("known_hosts").display()),
        format!("IdentityFile={}", dir.join(SSH_KEY_FILE).display()),
        format!("CertificateFile={}", dir.join(SSH_CERT_FILE).display()),
    ] {
        args.extend(opt(o));
    }
    args
}

/// Run an OpenSSH client program to its end, passing its exit code on.
async fn run_openssh(mut cmd: std::process::Command, what: &'static str) -> anyhow::Result<i32> {
    // The terminal belongs to the client now; wait for it off the runtime's thread.
    let status = tokio::task::spawn_blocking(move || cmd.status())
        .await?
        .with_context(|| format!("running the OpenSSH client `{what}` (is it installed?)"))?;
    Ok(status.code().unwrap_or(255))
}

/// `gsh scp [scp options] SOURCE… TARGET`: OpenSSH's `scp` through the proxy, with the same
/// arguments as `scp` itself (`[login@]node:path` for remote files; SFTP by default, `-O` for the
/// legacy protocol).
pub async fn scp(dir: &Path, args: &[String]) -> anyhow::Result<i32> {
    let profile = Profile::load(dir)?;
    proxy_of(&profile)?;
    let mut cmd = std::process::Command::new("scp");
    cmd.args(openssh_options(dir, None)).args(args);
    run_openssh(cmd, "scp").await
}

/// `gsh config`: an OpenSSH config block for the cluster.
pub async fn config(dir: &Path) -> anyhow::Result<()> {
    let profile = Profile::load(dir)?;
    proxy_of(&profile)?;
    // Without the node list the block still covers `*.<cluster>`; say why the names are missing.
    let mut names: Vec<String> = match nodes(dir, &profile).await {
        Ok(ns) => ns.into_iter().map(|n| n.name).collect(),
        Err(e) => {
            eprintln!(
                "gsh config: could not list nodes ({e:#}); only *.{} is covered",
                profile.cluster
            );
            Vec::new()
        }
    };
    names.sort();
    names.dedup();
    let mut hosts = vec![format!("*.{}", profile.cluster)];
    hosts.extend(names);
    // Leaf clusters: `Host *.LEAF`, through this cluster's proxy; their host CAs join
    // known_hosts.
    let leaves = match crate::clusters::leaves(dir, &profile).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gsh config: could not list leaf clusters ({e:#})");
            Vec::new()
        }
    };
    crate::clusters::trust_leaf_hosts(dir, &profile, &leaves)?;
    for leaf in &leaves {
        println!(
            "# Leaf cluster {leaf} through {cluster}'s proxy\n\
             Host *.{leaf}\n    ProxyCommand {pc}\n    UserKnownHostsFile \"{kh}\"\n    IdentityFile \"{key}\"\n    CertificateFile \"{cert}\"\n    IdentitiesOnly yes\n    Ciphers {CIPHERS}\n",
            leaf = leaf.name,
            cluster = profile.cluster,
            pc = proxy_command(dir, Some(&leaf.name)),
            kh = dir.join("known_hosts").display(),
            key = dir.join(SSH_KEY_FILE).display(),
            cert = dir.join(SSH_CERT_FILE).display(),
        );
    }
    println!(
        "# Gatehouse cluster {cluster} (generated by `gsh config`): add to ~/.ssh/config\n\
         Host {hosts}\n    ProxyCommand {pc}\n    UserKnownHostsFile \"{kh}\"\n    IdentityFile \"{key}\"\n    CertificateFile \"{cert}\"\n    IdentitiesOnly yes\n    Ciphers {CIPHERS}\n",
        cluster = profile.cluster,
        hosts = hosts.join(" "),
        pc = proxy_command(dir, None),
        kh = dir.join("known_hosts").display(),
        key = dir.join(SSH_KEY_FILE).display(),
        cert = dir.join(SSH_CERT_FILE).display(),
    );
    Ok(())
}
