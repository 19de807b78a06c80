//! `leaves`: trusted clusters at scale. A root and a leaf cluster (each Auth and proxy as
//! processes); the leaf trusts the root; N simulated agents (own joined identities) hold tunnels
//! to the leaf's proxy; a root user lists the leaf's nodes through the root's proxy (timed, as
//! `gsh ls --cluster leaf` does). Then L simulated leaves (each its own CA, trusted through
//! `ValidateTrustedCluster`) hold a tunnel each to the root's proxy: the root proxy's memory per
//! leaf tunnel, beside the agents' 8.4 KiB.

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use gatehouse_controlplane::ca::{SshCa, TlsCa, TlsUsage};
use gatehouse_controlplane::client::AuthEndpoint;
use gatehouse_controlplane::host::HostIdentity;
use gatehouse_controlplane::identity::{Identity, IdentityKind, PROXY_SERVER_NAME};
use gatehouse_controlplane::proto;
use gatehouse_controlplane::tls::{Trust, client_config_with_alpn};
use gatehouse_proto::alpn;
use gatehouse_proto::session::{self, SessionRequest, SessionResponse};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fleet::{Fleet, gctl, new_token};
use crate::procstat;

#[derive(Debug, Clone)]
pub struct LeavesConfig {
    pub leaves: usize,
    pub agents: usize,
    pub lists: usize,
}

#[derive(Debug, Serialize)]
pub struct LeavesReport {
    pub scenario: &'static str,
    pub leaf_agents: usize,
    pub nodes_listed: usize,
    pub lists: usize,
    pub list_p50_ms: f64,
    pub list_max_ms: f64,
    pub simulated_leaves: usize,
    pub leaf_tunnels_held: u64,
    pub root_proxy_rss_before_kib: u64,
    /// After the leaves were trusted, before their tunnels.
    pub root_proxy_rss_trusted_kib: u64,
    pub root_proxy_rss_after_kib: u64,
    pub root_proxy_kib_per_trusted_leaf: f64,
    pub root_proxy_kib_per_leaf_tunnel: f64,
}

/// `gsh ls --cluster leaf` as the root user: the node count.
async fn list_leaf(root: &Fleet) -> anyhow::Result<usize> {
    let u = &root.user;
    let config = client_config_with_alpn(
        &Trust::CaPem(u.ca.clone()),
        Some((&u.cert, &u.key)),
        &[alpn::SSH],
    )?;
    let tcp = tokio::net::TcpStream::connect(&root.proxy_addr).await?;
    let name = rustls::pki_types::ServerName::try_from(PROXY_SERVER_NAME)?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let req = SessionRequest {
        target: "@nodes".into(),
        login: String::new(),
        cluster: "leaf".into(),
        on_behalf: None,
    };
    tls.write_all(&session::encode(&req)).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let resp = loop {
        if let Some(r) = session::decode::<SessionResponse>(&mut buf)? {
            break r;
        }
        anyhow::ensure!(tls.read_buf(&mut buf).await? > 0, "closed before an answer");
    };
    anyhow::ensure!(resp.ok, "{}", resp.error);
    let mut body = buf.to_vec();
    tls.read_to_end(&mut body).await?;
    let nodes: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
    Ok(nodes.len())
}

pub async fn run(cfg: LeavesConfig) -> anyhow::Result<LeavesReport> {
    let root = Fleet::spawn_named("127.0.0.2", 0, &[], None, "root").await?;
    let leaf = Fleet::spawn_named("127.0.0.3", 0, &[], None, "leaf").await?;
    let root_auth = root.dir().join("auth");
    let token = new_token(&root_auth, "trusted_cluster")?;
    let doc = leaf.dir().join("trust.toml");
    std::fs::write(
        &doc,
        format!(
            "kind = \"trusted_cluster\"\n[metadata]\nname = \"root\"\n[spec]\nproxy_addr = \"{}\"\ntoken = \"{token}\"\nca_pin = \"{}\"\nrole_map = [ {{ remote = \"access\", local = [\"access\"] }} ]\n",
            root.proxy_addr, root.pin
        ),
    )?;
    gctl(
        &leaf.dir().join("auth"),
        &["create", "-f", &doc.display().to_string()],
    )?;

    // N agents on the leaf, each its own identity.
    eprintln!("leaves: joining {} agents to the leaf", cfg.agents);
    let ids = leaf.join_agents(cfg.agents).await?;
    let path = leaf.dir().join("ids.json");
    crate::fleet::save_identities(&ids, &path)?;
    let mut worker =
        crate::fleet::spawn_worker_agents(&path, cfg.agents, &leaf.proxy_addr, "127.0.0.20", &[])?;
    if let Some(out) = worker.stdout.take() {
        std::thread::spawn(move || for _ in BufReader::new(out).lines().map_while(Result::ok) {});
    }
    let mut admin = leaf.admin_client().await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = admin
            .list_nodes(proto::ListNodesRequest {})
            .await
            .map(|r| r.into_inner().nodes.len())
            .unwrap_or(0);
        if n >= cfg.agents {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the leaf lists {n} of {} nodes",
            cfg.agents
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Listed through the root (once the leaf's tunnel is up), timed.
    let deadline = Instant::now() + Duration::from_secs(60);
    while list_leaf(&root).await.is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the leaf never became reachable through the root"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut nodes_listed = 0;
    for _ in 0..cfg.lists.max(1) {
        let t0 = Instant::now();
        nodes_listed = list_leaf(&root).await?;
        let _ = hist.record(t0.elapsed().as_micros() as u64);
    }
    let _ = worker.kill();
    let _ = worker.wait();

    // L simulated leaves, each trusted by the root and holding one tunnel to its proxy.
    let pid = root.proxy.pid();
    let rss0 = procstat::rss_kib(pid).unwrap_or(0);
    let mut anon = AuthEndpoint {
        addr: root.proxy_addr.clone(),
        trust: Trust::Pin(root.pin.clone()),
        identity: None,
    }
    .connect()
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let out = gctl(
        &root_auth,
        &[
            "tokens",
            "add",
            "--type",
            "trusted_cluster",
            "--uses",
            &cfg.leaves.to_string(),
            "--ttl",
            "1h",
        ],
    )?;
    let many = out
        .split("Join token (shown once): ")
        .nth(1)
        .and_then(|r| r.lines().next())
        .map(|t| t.trim().to_string())
        .context("gctl printed no token")?;
    let root_ca = root.user.ca.clone();
    let ssh_ca = SshCa::generate()?.public_line();
    let now = time::OffsetDateTime::now_utc();
    let mut leaf_ids = Vec::with_capacity(cfg.leaves);
    for i in 0..cfg.leaves {
        let name = format!("sim-leaf-{i}");
        let ca = TlsCa::generate(&name, now)?;
        anon.validate_trusted_cluster(proto::ValidateTrustedClusterRequest {
            token: many.clone(),
            leaf_cluster: name.clone(),
            root_cluster: "root".into(),
            leaf_cas: Some(proto::ClusterCas {
                user_ca_ssh: ssh_ca.clone(),
                host_ca_ssh: ssh_ca.clone(),
                tls_ca_pem: ca.cert_pem().to_owned(),
                ..Default::default()
            }),
        })
        .await
        .map_err(|s| anyhow::anyhow!("trusting {name}: {}", s.message()))?;
        let identity = Identity {
            kind: IdentityKind::Node,
            name: format!("proxy-{name}"),
            roles: vec!["@proxy".into()],
            logins: vec![],
            traits: Default::default(),
            cluster: name.clone(),
            route_to_cluster: name.clone(),
            bot: None,
            expires: (now + time::Duration::hours(2)).unix_timestamp(),
        };
        let (cert, key) = ca.issue_with_new_key(&identity, TlsUsage::ServerAndClient, &[], now)?;
        leaf_ids.push(HostIdentity {
            host_id: name.clone(),
            host_name: name.clone(),
            cluster: name,
            ssh_key: String::new(),
            ssh_cert: String::new(),
            tls_cert: cert.pem(),
            tls_key: key.serialize_pem(),
            ca_pem: root_ca.clone(),
            ssh_user_ca: vec![],
            ssh_host_ca: vec![],
        });
    }
    // The root's proxy learns of them through the watch stream (each costs it a verifier for
    // the leaf's CA and the trust record): measured apart from the tunnels.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_trusted = procstat::rss_kib(pid).unwrap_or(0);
    let stats = Arc::new(crate::sim_agent::AgentStats::default());
    crate::sim_agent::spawn(
        leaf_ids,
        cfg.leaves,
        root.proxy_addr.parse()?,
        "127.0.0.30".parse()?,
        Arc::clone(&stats),
        gatehouse_dataplane::io::quic::TunnelTransport::Tls,
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = loop {
        let c = stats.connected.load(std::sync::atomic::Ordering::Relaxed);
        let f = stats.failed.load(std::sync::atomic::Ordering::Relaxed);
        if c + f >= cfg.leaves as u64 || Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss1 = procstat::rss_kib(pid).unwrap_or(0);
    Ok(LeavesReport {
        scenario: "leaves",
        leaf_agents: cfg.agents,
        nodes_listed,
        lists: cfg.lists.max(1),
        list_p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        list_max_ms: hist.max() as f64 / 1000.0,
        simulated_leaves: cfg.leaves,
        leaf_tunnels_held: held,
        root_proxy_rss_before_kib: rss0,
        root_proxy_rss_trusted_kib: rss_trusted,
        root_proxy_rss_after_kib: rss1,
        root_proxy_kib_per_trusted_leaf: rss_trusted.saturating_sub(rss0) as f64
            / cfg.leaves.max(1) as f64,
        root_proxy_kib_per_leaf_tunnel: rss1.saturating_sub(rss_trusted) as f64
            / held.max(1) as f64,
    })
}

pub fn print(r: &LeavesReport) {
    println!(
        "scenario        leaves: a leaf with {} agents behind a root; {} simulated leaves at the root's proxy",
        r.leaf_agents, r.simulated_leaves
    );
    println!(
        "listing         {} nodes through the root, {} times: p50 {:.1} ms, max {:.1} ms",
        r.nodes_listed, r.lists, r.list_p50_ms, r.list_max_ms
    );
    println!(
        "leaf tunnels    {} of {} held; root proxy RSS {} → {} (trusted) → {} KiB: {:.1} KiB per trusted leaf, {:.1} KiB per leaf tunnel",
        r.leaf_tunnels_held,
        r.simulated_leaves,
        r.root_proxy_rss_before_kib,
        r.root_proxy_rss_trusted_kib,
        r.root_proxy_rss_after_kib,
        r.root_proxy_kib_per_trusted_leaf,
        r.root_proxy_kib_per_leaf_tunnel
    );
}
