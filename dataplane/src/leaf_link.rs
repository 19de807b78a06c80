//! On a leaf cluster's proxy: a reverse tunnel to each trusted root's proxy (the agents'
//! tunnel protocol and reconnect rules), and what the root sends over it. A root user's session
//! arrives as a stream `session:ssh:TARGET` or `session:tcp:APP` with the user in its metadata;
//! the link opens the same session on this proxy's own port, on the user's behalf, so the target
//! is resolved, handed to the right core and carried to the agent exactly as a local session is
//! (the agent authorizes the user's SSH certificate by the root's role map). A refusal goes back
//! to the root as the stream's refusal, with the reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gatehouse_controlplane::client::AuthEndpoint;
use gatehouse_controlplane::identity::PROXY_SERVER_NAME;
use gatehouse_controlplane::tls::{Trust, client_config_with_alpn};
use gatehouse_proto::alpn;
use gatehouse_proto::session::{self, OnBehalf, SessionRequest, SessionResponse};
use gatehouse_proto::tunnel::{Side, code};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::mux::{Tunnel, TunnelEvent};
use crate::tls::TlsStream;

/// A root cluster to keep a tunnel to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RootTarget {
    pub(crate) name: String,
    pub(crate) proxy_addr: String,
    pub(crate) ca_pem: String,
}

/// Each trusted root's role map, by root name.
pub(crate) type RoleMaps = Arc<Mutex<BTreeMap<String, gatehouse_controlplane::role_map::RoleMap>>>;

/// What every link shares.
struct Link {
    /// This proxy's identity (certificate, key PEM), kept current by its renewals, and where
    /// Auth is.
    identity: Arc<Mutex<AuthEndpoint>>,
    /// This cluster's name, and each trusted root's role map (for listings).
    cluster: String,
    role_maps: Arc<Mutex<BTreeMap<String, gatehouse_controlplane::role_map::RoleMap>>>,
    /// This cluster's CA and this proxy's own port, for the sessions opened on it.
    own_ca: String,
    own_addr: SocketAddr,
}

/// Start the links' thread; it follows `roots` until the process ends.
pub(crate) fn spawn(
    roots: tokio::sync::watch::Receiver<Vec<RootTarget>>,
    role_maps: RoleMaps,
    identity: Arc<Mutex<AuthEndpoint>>,
    (cluster, own_ca): (String, String),
    own_addr: SocketAddr,
) -> std::io::Result<()> {
    let own_addr = if own_addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], own_addr.port()))
    } else {
        own_addr
    };
    std::thread::Builder::new()
        .name("leaf-links".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let local = tokio::task::LocalSet::new();
            let link = std::rc::Rc::new(Link {
                identity,
                cluster,
                role_maps,
                own_ca,
                own_addr,
            });
            local.block_on(&rt, manage(roots, link));
        })?;
    Ok(())
}

/// One dial loop per root; a root whose target changed gets a new one, a removed root none.
async fn manage(mut roots: tokio::sync::watch::Receiver<Vec<RootTarget>>, link: std::rc::Rc<Link>) {
    let mut loops: BTreeMap<String, (RootTarget, tokio::task::JoinHandle<()>)> = BTreeMap::new();
    loop {
        let want = roots.borrow_and_update().clone();
        loops.retain(|name, (target, l)| {
            let keep = want.iter().any(|w| w == target);
            if !keep {
                tracing::info!(root = %name, "proxy: no longer a leaf of this root; its tunnel ends");
                l.abort();
            }
            keep
        });
        for target in want {
            if !loops.contains_key(&target.name) {
                let l =
                    tokio::task::spawn_local(dial_loop(std::rc::Rc::clone(&link), target.clone()));
                loops.insert(target.name.clone(), (target, l));
            }
        }
        if roots.changed().await.is_err() {
            return;
        }
    }
}

async fn dial_loop(link: std::rc::Rc<Link>, root: RootTarget) {
    let mut attempt: u32 = 0;
    loop {
        let started = Instant::now();
        match dial(&link, &root).await {
            Ok(tls) => {
                tracing::info!(root = %root.name, proxy = %root.proxy_addr, "proxy: tunnel to the root cluster up");
                let reason = serve(&link, tls).await;
                tracing::warn!(root = %root.name, %reason, "proxy: tunnel to the root cluster down; reconnecting");
                if started.elapsed() > Duration::from_secs(30) {
                    attempt = 0;
                }
            }
            Err(e) => {
                tracing::warn!(root = %root.name, proxy = %root.proxy_addr, error = %e, attempt, "proxy: cannot reach the root cluster's proxy");
            }
        }
        let delay = backoff(attempt, rand::random::<f64>());
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(delay).await;
    }
}

/// The agents' reconnect rule: full jitter over 250 ms doubling to 8 s.
fn backoff(attempt: u32, jitter: f64) -> Duration {
    let cap = Duration::from_millis(250)
        .saturating_mul(1u32 << attempt.min(5))
        .min(Duration::from_secs(8));
    cap.mul_f64(jitter.clamp(0.0, 1.0))
}

fn current_identity(link: &Link) -> std::io::Result<(String, String)> {
    link.identity
        .lock()
        .ok()
        .and_then(|e| e.identity.clone())
        .ok_or_else(|| std::io::Error::other("this proxy has no identity"))
}

type ClientTls = TlsStream<rustls::client::UnbufferedClientConnection>;

/// TLS to a proxy's public port (`addr`), trusting `ca_pem`, as this proxy, offering `alpn`;
/// 10 s for the connection and 10 s for the handshake.
async fn dial_proxy(
    link: &Link,
    addr: &str,
    ca_pem: &str,
    alpn_id: &'static [u8],
) -> std::io::Result<ClientTls> {
    let timed_out =
        |what: &str| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} timed out"));
    let (cert, key) = current_identity(link)?;
    let config = client_config_with_alpn(
        &Trust::CaPem(ca_pem.to_owned()),
        Some((&cert, &key)),
        &[alpn_id],
    )
    .map_err(std::io::Error::other)?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| timed_out("connect"))??;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(PROXY_SERVER_NAME)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tokio::time::timeout(
        Duration::from_secs(10),
        TlsStream::connect(tcp, config, name),
    )
    .await
    .map_err(|_| timed_out("TLS handshake"))?
}

async fn dial(link: &Link, root: &RootTarget) -> std::io::Result<ClientTls> {
    dial_proxy(link, &root.proxy_addr, &root.ca_pem, alpn::TUNNEL).await
}

/// Hold the tunnel: a heartbeat every 10 s (the root ends the tunnel when trust is removed),
/// each stream the root opens served on this proxy's own port.
async fn serve(link: &std::rc::Rc<Link>, tls: ClientTls) -> String {
    let (tunnel, mut events) = Tunnel::new(Side::Dialer, Default::default());
    let heartbeat = {
        let tunnel = tunnel.clone();
        tokio::task::spawn_local(async move {
            loop {
                tunnel.send_heartbeat(Bytes::from_static(b"{}"));
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        })
    };
    let dispatcher = {
        let (tunnel, link) = (tunnel.clone(), std::rc::Rc::clone(link));
        tokio::task::spawn_local(async move {
            while let Some(ev) = events.recv().await {
                if let TunnelEvent::Incoming {
                    stream,
                    target,
                    metadata,
                } = ev
                {
                    let (tunnel, link) = (tunnel.clone(), std::rc::Rc::clone(&link));
                    tokio::task::spawn_local(async move {
                        relay(&link, &tunnel, stream, &target, &metadata).await;
                    });
                }
            }
        })
    };
    let reason = tunnel.run(tls).await;
    heartbeat.abort();
    dispatcher.abort();
    reason
}

/// What a root sends: (ALPN, the session request to make on the user's behalf).
pub(crate) fn session_of(
    target: &str,
    metadata: &[u8],
) -> Result<(&'static [u8], SessionRequest), String> {
    let (alpn, rest) = if let Some(t) = target.strip_prefix("session:ssh:") {
        (alpn::SSH, t)
    } else if let Some(t) = target.strip_prefix("session:tcp:") {
        (alpn::TCP, t)
    } else {
        return Err(format!("a leaf's proxy serves no `{target}`"));
    };
    let meta: serde_json::Value =
        serde_json::from_slice(metadata).map_err(|e| format!("session metadata: {e}"))?;
    let field = |k: &str| {
        meta.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let user = field("user");
    let cluster = field("cluster");
    if user.is_empty() || cluster.is_empty() {
        return Err("session metadata names no user or cluster".into());
    }
    let roles = meta
        .get("roles")
        .and_then(|r| r.as_array())
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok((
        alpn,
        SessionRequest {
            target: rest.to_owned(),
            login: field("login"),
            cluster: String::new(),
            on_behalf: Some(OnBehalf {
                user,
                roles,
                source_addr: field("source_addr"),
                cluster,
            }),
        },
    ))
}

async fn relay(link: &Link, tunnel: &Tunnel, stream: u32, target: &str, metadata: &[u8]) {
    if target == "list:nodes" {
        list_nodes(link, tunnel, stream, metadata).await;
        return;
    }
    let (alpn_id, request) = match session_of(target, metadata) {
        Ok(s) => s,
        Err(e) => {
            tunnel.reject(stream, code::NOT_FOUND, &e);
            return;
        }
    };
    match open_local(link, alpn_id, &request).await {
        Ok((tls, resp, leftover)) if resp.ok => {
            let Ok(handle) = tunnel.accept(stream) else {
                return;
            };
            handle.splice(tls, leftover).await;
        }
        Ok((_, resp, _)) => tunnel.reject(stream, code::REFUSED, &resp.error),
        Err(e) => tunnel.reject(
            stream,
            code::UNAVAILABLE,
            &format!("the leaf's proxy could not open the session: {e}"),
        ),
    }
}

/// `gsh ls --cluster`: this cluster's nodes (as Auth lists them), as a JSON array, to a root
/// user whose roles map to some role here.
async fn list_nodes(link: &Link, tunnel: &Tunnel, stream: u32, metadata: &[u8]) {
    let meta: serde_json::Value = serde_json::from_slice(metadata).unwrap_or_default();
    let root = meta
        .get("cluster")
        .and_then(|c| c.as_str())
        .unwrap_or_default();
    let roles: Vec<String> = meta
        .get("roles")
        .and_then(|r| r.as_array())
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mapped = link
        .role_maps
        .lock()
        .ok()
        .and_then(|m| m.get(root).map(|map| map.map(&roles)))
        .unwrap_or_default();
    if mapped.is_empty() {
        let here = link.cluster.as_str();
        tunnel.reject(
            stream,
            code::REFUSED,
            &format!(
                "none of your roles ({}) maps to a role in cluster {here}",
                roles.join(", ")
            ),
        );
        return;
    }
    let endpoint = link.identity.lock().ok().map(|e| e.clone());
    let listed = async {
        let mut c = endpoint
            .ok_or_else(|| "this proxy has no Auth endpoint".to_owned())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        c.list_nodes(gatehouse_controlplane::proto::ListNodesRequest {})
            .await
            .map_err(|s| s.message().to_owned())
    }
    .await;
    let nodes = match listed {
        Ok(r) => r.into_inner().nodes,
        Err(e) => {
            tunnel.reject(stream, code::UNAVAILABLE, &format!("the leaf's Auth: {e}"));
            return;
        }
    };
    let json: Vec<serde_json::Value> = nodes
        .iter()
        .map(|n| {
            serde_json::json!({
                "name": n.name,
                "host_id": n.host_id,
                "labels": n.labels,
                "addresses": n.addresses,
                "services": n.services,
            })
        })
        .collect();
    let body = serde_json::to_vec(&json).unwrap_or_default();
    let Ok(handle) = tunnel.accept(stream) else {
        return;
    };
    let (mut near, far) = tokio::io::duplex(64 * 1024);
    tokio::task::spawn_local(async move {
        let _ = near.write_all(&body).await;
        let _ = near.shutdown().await;
        // Hold our end until the root has read everything.
        let mut sink = [0u8; 64];
        while near.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    });
    handle.splice(far, Bytes::new()).await;
}

type LocalSession = (ClientTls, SessionResponse, Bytes);

/// Open `request` on this proxy's own port as this proxy (on the user's behalf).
async fn open_local(
    link: &Link,
    alpn_id: &'static [u8],
    request: &SessionRequest,
) -> std::io::Result<LocalSession> {
    let addr = link.own_addr.to_string();
    let mut tls = dial_proxy(link, &addr, &link.own_ca, alpn_id).await?;
    tls.write_all(&session::encode(request)).await?;
    let mut buf = BytesMut::with_capacity(1024);
    let resp = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Some(r) = session::decode::<SessionResponse>(&mut buf)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?
            {
                return Ok::<_, std::io::Error>(r);
            }
            if tls.read_buf(&mut buf).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the session closed before an answer",
                ));
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 15 s"))??;
    Ok((tls, resp, buf.split().freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_roots_stream_becomes_a_session_request_on_the_users_behalf() {
        let meta = br#"{"user":"alice","login":"ubuntu","roles":["access"],"source_addr":"10.0.0.9:5000","cluster":"root"}"#;
        let (a, r) = session_of("session:ssh:web", meta).unwrap();
        assert_eq!(a, alpn::SSH);
        assert_eq!((r.target.as_str(), r.login.as_str()), ("web", "ubuntu"));
        let who = r.on_behalf.unwrap();
        assert_eq!((who.user.as_str(), who.cluster.as_str()), ("alice", "root"));
        assert_eq!(who.roles, ["access"]);
        let (a, r) = session_of("session:tcp:grafana@web", meta).unwrap();
        assert_eq!((a, r.target.as_str()), (alpn::TCP, "grafana@web"));
        assert!(session_of("ssh", meta).is_err());
        assert!(session_of("session:ssh:web", b"not json").is_err());
        assert!(session_of("session:ssh:web", br#"{"login":"x"}"#).is_err());
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        assert_eq!(backoff(0, 1.0), Duration::from_millis(250));
        assert_eq!(backoff(20, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(3, 0.0), Duration::ZERO);
    }
}
