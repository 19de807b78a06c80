//! Starting the Proxy and agent roles inside the `gatehouse` daemon, next to Auth or on their
//! own (joining with a token).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gatehouse_agent::dataplane::proxy::{Inventory, Proxy, ProxyConfig, ProxyMetrics, server_alpn};
use gatehouse_agent::dataplane::socket::IoBackend;
use gatehouse_agent::host::{HostIdentity, NewKeys};
use gatehouse_controlplane::ca::TlsUsage;
use gatehouse_controlplane::client::{AuthEndpoint, Client};
use gatehouse_controlplane::identity::{Identity, IdentityKind, PROXY_SERVER_NAME};
use gatehouse_controlplane::proto;
use gatehouse_controlplane::server::AuthService;

/// How a role that does not run beside Auth gets its identity.
#[derive(Debug, Clone, Default)]
pub struct JoinParams {
    pub token: Option<String>,
    pub ca_pin: Option<String>,
}

/// The Proxy's TLS identity: issued in-process when Auth runs here, else joined with a
/// `proxy` token and kept in `<data-dir>/proxy/`.
pub async fn proxy_identity(
    data_dir: &Path,
    local_auth: Option<&AuthService>,
    auth_addr: &str,
    join: &JoinParams,
    host_name: &str,
    sans: &[String],
) -> anyhow::Result<(String, String, String, String)> {
    if let Some(service) = local_auth {
        let state = service.state();
        let now = time::OffsetDateTime::now_utc();
        let identity = Identity {
            kind: IdentityKind::Node,
            name: format!("proxy-{host_name}"),
            roles: vec!["@proxy".into()],
            logins: vec![],
            traits: BTreeMap::from([("host_name".to_string(), vec![host_name.to_string()])]),
            cluster: state.cluster.clone(),
            route_to_cluster: state.cluster.clone(),
            expires: (now + time::Duration::days(365)).unix_timestamp(),
        };
        let mut all_sans = vec![
            PROXY_SERVER_NAME.to_string(),
            "localhost".into(),
            "127.0.0.1".into(),
        ];
        all_sans.extend(sans.iter().cloned());
        all_sans.sort();
        all_sans.dedup();
        let (cert, key) = state.tls_ca.issue_with_new_key(
            &identity,
            TlsUsage::ServerAndClient,
            &all_sans,
            now,
        )?;
        return Ok((
            cert.pem(),
            key.serialize_pem(),
            state.tls_ca.cert_pem().to_owned(),
            state.cluster.clone(),
        ));
    }
    let dir = data_dir.join("proxy");
    let id = match HostIdentity::load(&dir)? {
        Some(id) => id,
        None => {
            let token = join.token.as_deref().context(
                "a proxy without a local Auth joins with --token (a `proxy` token) and --ca-pin",
            )?;
            let pin = join
                .ca_pin
                .as_deref()
                .context("pass --ca-pin (printed by the Auth server at start)")?;
            let id = HostIdentity::join(auth_addr, pin, token, host_name, sans)
                .await
                .context("joining the cluster as a proxy")?;
            id.save(&dir)?;
            id
        }
    };
    Ok((id.tls_cert, id.tls_key, id.ca_pem, id.cluster))
}

pub struct StartedProxy {
    pub proxy: Proxy,
    pub addr: SocketAddr,
}

impl std::fmt::Debug for StartedProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartedProxy")
            .field("addr", &self.addr)
            .finish()
    }
}

#[allow(clippy::too_many_arguments)]
pub fn start_proxy(
    listen: SocketAddr,
    workers: usize,
    io_backend: IoBackend,
    quic: bool,
    tcp_congestion: Option<String>,
    auth_addr: &str,
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    cluster: &str,
    metrics: Arc<ProxyMetrics>,
) -> anyhow::Result<StartedProxy> {
    let alpn = server_alpn();
    let alpn_refs: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
    let chain = format!("{cert_pem}{ca_pem}");
    let mut tls = (*gatehouse_controlplane::tls::server_config_with_alpn(
        ca_pem, &chain, key_pem, &alpn_refs,
    )?)
    .clone();
    // One TLS 1.3 session ticket per connection, stateless (sealed with keys rustls rotates
    // every 6 hours; nothing is stored per session). A client that opens many sessions
    // (`gsh proxy tcp`, a reconnecting agent) resumes and skips the certificate signatures,
    // which are most of a full handshake's cost. The proxy checks the identity's expiry on every
    // connection, resumed or not, so a ticket never outlives its certificate; tickets die with
    // the process, and a resumption on another proxy falls back to a full handshake.
    tls.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().context("session ticket keys")?;
    tls.send_tls13_tickets = 1;
    let tls = std::sync::Arc::new(tls);
    let config = ProxyConfig {
        listen,
        workers,
        auth_addr: auth_addr.to_owned(),
        tls,
        cluster: cluster.to_owned(),
        tunnel: Default::default(),
        io_backend,
        quic,
        tcp_congestion,
    };
    let (proxy, inventories) =
        Proxy::start(config, metrics).with_context(|| format!("starting the proxy on {listen}"))?;
    let addr = proxy.local_addr;
    let endpoint = AuthEndpoint {
        addr: auth_addr.to_owned(),
        trust: gatehouse_controlplane::tls::Trust::CaPem(ca_pem.to_owned()),
        identity: Some((cert_pem.to_owned(), key_pem.to_owned())),
    };
    tokio::spawn(report_inventories(inventories, endpoint));
    Ok(StartedProxy { proxy, addr })
}

/// Batch agents' heartbeats to Auth: the latest inventory per host, every 5 s, in one call.
async fn report_inventories(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<Inventory>>,
    endpoint: AuthEndpoint,
) {
    let mut pending: HashMap<String, Inventory> = HashMap::new();
    let mut client: Option<Client> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            batch = rx.recv() => match batch {
                Some(batch) => {
                    for inv in batch {
                        pending.insert(inv.host_id.clone(), inv);
                    }
                }
                None => return,
            },
            _ = tick.tick() => {
                if pending.is_empty() {
                    continue;
                }
                if client.is_none() {
                    client = endpoint.connect().await.ok();
                }
                let Some(c) = client.as_mut() else { continue };
                let nodes = pending
                    .values()
                    .map(|i| proto::Node {
                        host_id: i.host_id.clone(),
                        name: i.name.clone(),
                        labels: i.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                        addresses: i.addresses.clone(),
                        services: i.services.clone(),
                        last_seen: 0,
                        expires: 0,
                    })
                    .collect();
                match c.upsert_nodes(proto::UpsertNodesRequest { nodes, ttl_seconds: 60 }).await {
                    Ok(_) => pending.clear(),
                    Err(e) => {
                        tracing::warn!(error = %e.message(), "proxy: cannot report heartbeats to Auth; will retry");
                        client = None;
                    }
                }
            }
        }
    }
}

/// The agent's host identity: kept in `<data-dir>/agent/`; issued in-process when Auth runs
/// here, else joined with a `node` token through the Proxy.
pub async fn agent_identity(
    data_dir: &Path,
    local_auth: Option<&AuthService>,
    proxy_addr: &str,
    join: &JoinParams,
    node_name: &str,
    addresses: &[String],
) -> anyhow::Result<HostIdentity> {
    let dir = data_dir.join("agent");
    if let Some(id) = HostIdentity::load(&dir)? {
        return Ok(id);
    }
    let id = match local_auth {
        Some(service) => {
            let keys = NewKeys::generate()?;
            let req = keys.join_request("", node_name, addresses)?;
            let ssh_pub = ssh_key::PublicKey::from_openssh(&req.ssh_public_key)?;
            gatehouse_controlplane::resources::validate_name(node_name)
                .map_err(|m| anyhow::anyhow!("node name: {m}"))?;
            let resp = service
                .issue_host(&req, &ssh_pub, false, "in-process", "127.0.0.1")
                .await
                .map_err(|s| {
                    anyhow::anyhow!("issuing the local agent's identity: {}", s.message())
                })?;
            keys.into_identity(node_name, resp)?
        }
        None => {
            let token = join
                .token
                .as_deref()
                .context("an agent joins with --token (a `node` token) and --ca-pin")?;
            let pin = join
                .ca_pin
                .as_deref()
                .context("pass --ca-pin (printed by the Auth server at start)")?;
            HostIdentity::join(proxy_addr, pin, token, node_name, addresses)
                .await
                .context("joining the cluster through the proxy")?
        }
    };
    id.save(&dir)?;
    Ok(id)
}
