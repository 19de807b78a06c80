//! The watch stream: what proxies cache (proxies, CAs, cluster settings, roles), as a snapshot
//! and then changes, resumable without a gap.
//!
//! Every change this Auth hears (its own writes and, on PostgreSQL, other Auths' through
//! `LISTEN`) becomes an entry of one numbered log, kept in memory for the last
//! `RING_CAPACITY` entries. A stream's cursor is `EPOCH:N` (this Auth's random epoch, the
//! number of entries already reflected). A stream resumed with a cursor of this epoch whose
//! entries are all still in memory gets exactly those; any other (another Auth, a restart, too
//! far behind, a listener that missed notifications) gets a fresh snapshot. Either way the
//! watcher ends up with what the database holds, with nothing skipped.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tonic::Status;

use super::call::{Call, Done, Failure};
use super::{AuthState, now_secs, store_status};
use crate::proto::{self, watch_event::Type};
use crate::resources::{ResourceKind, Verb};
use crate::storage::Change;

/// Entries kept for resumption (a watcher further behind gets a snapshot).
pub(crate) const RING_CAPACITY: usize = 4096;
/// How often a quiet stream says it is alive.
pub const KEEPALIVE: Duration = Duration::from_secs(5);

/// The kinds a stream may watch.
pub const KINDS: [&str; 6] = [
    "proxy",
    "cert_authority",
    "role",
    "cluster_settings",
    "trusted_cluster",
    "lock",
];

/// One entry of the log.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Body {
    Put(proto::WatchItem),
    Delete(proto::WatchItem),
    /// Changes may have been missed: every watcher takes a new snapshot.
    Reset,
}

impl Body {
    fn kind(&self) -> Option<&str> {
        match self {
            Body::Put(i) | Body::Delete(i) => Some(&i.kind),
            Body::Reset => None,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    pub(crate) body: Body,
}

/// Where a new stream starts.
#[derive(Debug)]
pub(crate) enum Start {
    /// These entries, then the live ones after them.
    Replay(Vec<Arc<Entry>>),
    /// A snapshot that reflects every entry before `N`.
    Snapshot(u64),
}

/// The numbered log of the last entries: pure, no I/O.
#[derive(Debug, Default)]
pub(crate) struct Ring {
    /// The number the next entry gets.
    next: u64,
    entries: VecDeque<Arc<Entry>>,
}

impl Ring {
    pub(crate) fn push(&mut self, body: Body, capacity: usize) -> Arc<Entry> {
        let entry = Arc::new(Entry {
            seq: self.next,
            body,
        });
        self.next += 1;
        self.entries.push_back(Arc::clone(&entry));
        while self.entries.len() > capacity {
            self.entries.pop_front();
        }
        entry
    }

    /// Where a stream that has seen every entry before `resume` starts.
    pub(crate) fn start(&self, resume: Option<u64>) -> Start {
        let oldest = self.entries.front().map_or(self.next, |e| e.seq);
        match resume {
            Some(n) if n <= self.next && n >= oldest => Start::Replay(
                self.entries
                    .iter()
                    .filter(|e| e.seq >= n)
                    .cloned()
                    .collect(),
            ),
            _ => Start::Snapshot(self.next),
        }
    }
}

/// `EPOCH:N`.
pub(crate) fn cursor(epoch: &str, n: u64) -> String {
    format!("{epoch}:{n}")
}

/// The `N` of a cursor of `epoch`; `None` for an empty, foreign or malformed one.
pub(crate) fn parse_cursor(epoch: &str, cursor: &str) -> Option<u64> {
    let (e, n) = cursor.rsplit_once(':')?;
    if e != epoch {
        return None;
    }
    n.parse().ok()
}

/// This Auth's log of changes, fed by the store's announcements.
#[derive(Debug)]
pub(crate) struct WatchHub {
    epoch: String,
    ring: Mutex<Ring>,
    live: broadcast::Sender<Arc<Entry>>,
}

impl WatchHub {
    /// A hub fed from `state`'s store until `state` is dropped.
    pub(crate) fn start(state: Weak<AuthState>) -> Arc<Self> {
        let (live, _) = broadcast::channel(1024);
        let hub = Arc::new(Self {
            epoch: format!("{:016x}", rand::random::<u64>()),
            ring: Mutex::default(),
            live,
        });
        let changes = state.upgrade().map(|s| s.store.changes());
        if let Some(changes) = changes {
            tokio::spawn(feed(Arc::downgrade(&hub), state, changes));
        }
        hub
    }

    fn push(&self, body: Body) {
        if let Ok(mut ring) = self.ring.lock() {
            let entry = ring.push(body, RING_CAPACITY);
            // Sent under the lock: a stream subscribing in `subscribe` sees every entry
            // numbered from its start on, in order.
            let _ = self.live.send(entry);
        }
    }

    /// A receiver of live entries and where the stream starts, taken together.
    fn subscribe(&self, resume: Option<u64>) -> (broadcast::Receiver<Arc<Entry>>, Start) {
        match self.ring.lock() {
            Ok(ring) => (self.live.subscribe(), ring.start(resume)),
            Err(_) => (self.live.subscribe(), Start::Snapshot(u64::MAX)),
        }
    }
}

/// Turn each announced change into an entry (reading what it touched), until the Auth is gone.
async fn feed(
    hub: Weak<WatchHub>,
    state: Weak<AuthState>,
    mut changes: broadcast::Receiver<Change>,
) {
    loop {
        let change = changes.recv().await;
        let (Some(hub), Some(state)) = (hub.upgrade(), state.upgrade()) else {
            return;
        };
        // A CA rotated (through this Auth or another): this Auth signs with the new key, and
        // watchers hear of both keys.
        if let Ok(Change::CertAuthority(_)) = &change {
            let body = match state.reload_cas().await {
                Ok(()) => {
                    for it in ca_items(&state) {
                        hub.push(Body::Put(it));
                    }
                    continue;
                }
                Err(_) => Body::Reset,
            };
            hub.push(body);
            continue;
        }
        let body = match change {
            Ok(Change::CertAuthority(_)) => Body::Reset,
            Ok(Change::Proxy(name)) => match state.store.get_proxy(&name, now_secs()).await {
                Ok(Some(spec)) => Body::Put(item("proxy", &name, spec)),
                Ok(None) => Body::Delete(item("proxy", &name, String::new())),
                Err(_) => Body::Reset,
            },
            Ok(Change::Role(name)) => match state.store.get_role(&name).await {
                Ok(Some(role)) => match serde_json::to_string(&role) {
                    Ok(doc) => Body::Put(item("role", &name, doc)),
                    Err(_) => Body::Reset,
                },
                Ok(None) => Body::Delete(item("role", &name, String::new())),
                Err(_) => Body::Reset,
            },
            Ok(Change::TrustedCluster(name)) => match state.store.get_trust(&name).await {
                Ok(Some(row)) => Body::Put(trust_item(&row)),
                Ok(None) => Body::Delete(item("trusted_cluster", &name, String::new())),
                Err(_) => Body::Reset,
            },
            Ok(Change::Lock(name)) => match state.store.get_lock(&name, now_secs()).await {
                Ok(Some(doc)) => Body::Put(item("lock", &name, doc)),
                Ok(None) => Body::Delete(item("lock", &name, String::new())),
                Err(_) => Body::Reset,
            },
            Ok(Change::Everything) | Err(broadcast::error::RecvError::Lagged(_)) => Body::Reset,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        hub.push(body);
    }
}

/// A trust record as watchers get it: `{"side": …, "spec": {…}}` (public CAs, the proxy
/// address, the role map).
fn trust_item(row: &crate::storage::TrustRow) -> proto::WatchItem {
    let spec: serde_json::Value = serde_json::from_str(&row.spec).unwrap_or_default();
    item(
        "trusted_cluster",
        &row.name,
        serde_json::json!({ "side": row.side, "spec": spec }).to_string(),
    )
}

fn item(kind: &str, name: &str, resource: String) -> proto::WatchItem {
    proto::WatchItem {
        kind: kind.into(),
        name: name.into(),
        resource,
    }
}

/// The CAs as watchers get them: for the SSH CAs the signing key (`ssh_public_key`), every
/// key trusted now (`ssh_public_keys`) and when the previous one stops being trusted
/// (`previous_until`, 0: none); for the X.509 CA the signer (`cert_pem`), the bundle trusted now
/// (`trusted_pem`) and `previous_until`.
fn ca_items(state: &AuthState) -> Vec<proto::WatchItem> {
    use super::authorities::SshKind;
    let ssh = |kind: SshKind| {
        let keys = state.trusted_ssh(kind);
        serde_json::json!({
            "ssh_public_key": keys.first(),
            "ssh_public_keys": keys,
            "previous_until": state.previous_until(kind),
        })
        .to_string()
    };
    vec![
        item("cert_authority", "user", ssh(SshKind::User)),
        item("cert_authority", "host", ssh(SshKind::Host)),
        item("cert_authority", "tls", {
            let tls = state.tls.load();
            serde_json::json!({
                "cert_pem": tls.signer().cert_pem(),
                "trusted_pem": tls.trusted_pem(now_secs()),
                "previous_until": tls.previous_until(),
            })
            .to_string()
        }),
    ]
}

/// Everything of `kinds` as the store holds it now.
async fn snapshot(state: &AuthState, kinds: &[String]) -> Result<Vec<proto::WatchItem>, Status> {
    let mut items = Vec::new();
    for kind in kinds {
        match kind.as_str() {
            "proxy" => {
                for (name, spec) in state
                    .store
                    .list_proxies(now_secs())
                    .await
                    .map_err(store_status)?
                {
                    items.push(item("proxy", &name, spec));
                }
            }
            "role" => {
                for role in state.store.list_roles().await.map_err(store_status)? {
                    let doc = serde_json::to_string(&role).map_err(super::internal)?;
                    items.push(item("role", &role.metadata.name, doc));
                }
            }
            "cert_authority" => items.extend(ca_items(state)),
            "trusted_cluster" => {
                for row in state.store.list_trust().await.map_err(store_status)? {
                    items.push(trust_item(&row));
                }
            }
            "lock" => {
                for doc in state
                    .store
                    .list_locks(now_secs())
                    .await
                    .map_err(store_status)?
                {
                    let name = serde_json::from_str::<crate::locks::Lock>(&doc)
                        .map(|l| l.name)
                        .unwrap_or_default();
                    items.push(item("lock", &name, doc));
                }
            }
            "cluster_settings" => {
                let c = &state.recording_config;
                items.push(item(
                    "cluster_settings",
                    "cluster",
                    serde_json::json!({
                        "cluster": state.cluster,
                        "recording_mode": c.mode.as_str(),
                        "recording_on_failure": c.on_failure.as_str(),
                        "locking_mode": state.locking_mode.as_str(),
                    })
                    .to_string(),
                ));
            }
            _ => {}
        }
    }
    Ok(items)
}

pub(crate) type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::WatchEvent, Status>> + Send>>;

/// `Watch`: checks each kind against the caller's roles, then streams from a task of its own.
pub(super) async fn watch(
    call: Call,
    r: proto::WatchRequest,
) -> Result<Done<WatchStream>, Failure> {
    if r.kinds.is_empty() {
        return Err(Status::invalid_argument(format!(
            "kinds: name at least one of {}",
            KINDS.join(", ")
        ))
        .into());
    }
    for kind in &r.kinds {
        let (resource, verb) = match kind.as_str() {
            "proxy" => (ResourceKind::Node, Verb::List),
            "role" => (ResourceKind::Role, Verb::List),
            "cert_authority" | "cluster_settings" => (ResourceKind::CertAuthority, Verb::Read),
            "trusted_cluster" => (ResourceKind::TrustedCluster, Verb::Read),
            "lock" => (ResourceKind::Lock, Verb::List),
            other => {
                return Err(Status::invalid_argument(format!(
                    "kinds: unknown kind `{other}`; expected {}",
                    KINDS.join(", ")
                ))
                .into());
            }
        };
        call.authorize(resource, verb)?;
    }
    let state = Arc::clone(&call.state);
    let hub = state.watch_hub();
    let resume = parse_cursor(&hub.epoch, &r.resume);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(serve(state, hub, r.kinds, resume, tx));
    let stream: WatchStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(Done::read(stream))
}

type Out = mpsc::Sender<Result<proto::WatchEvent, Status>>;

fn event(kind: Type, items: Vec<proto::WatchItem>, cursor: String) -> proto::WatchEvent {
    proto::WatchEvent {
        r#type: kind as i32,
        items,
        cursor,
    }
}

/// Send a snapshot reflecting every entry before `n`; false if the watcher is gone.
async fn send_snapshot(
    state: &AuthState,
    hub: &WatchHub,
    kinds: &[String],
    n: u64,
    tx: &Out,
) -> bool {
    let msg = match snapshot(state, kinds).await {
        Ok(items) => Ok(event(Type::Snapshot, items, cursor(&hub.epoch, n))),
        Err(status) => Err(status),
    };
    let failed = msg.is_err();
    tx.send(msg).await.is_ok() && !failed
}

/// One stream: its start (replay or snapshot), then live entries of its kinds and keepalives,
/// until the watcher goes away.
async fn serve(
    state: Arc<AuthState>,
    hub: Arc<WatchHub>,
    kinds: Vec<String>,
    resume: Option<u64>,
    tx: Out,
) {
    let mut stopping = state.stopping();
    if *stopping.borrow_and_update() {
        return;
    }
    let (mut live, start) = hub.subscribe(resume);
    // Entries numbered below this are reflected in what the watcher holds.
    let mut next = match start {
        Start::Snapshot(n) => {
            if !send_snapshot(&state, &hub, &kinds, n, &tx).await {
                return;
            }
            n
        }
        Start::Replay(entries) => {
            let mut next = resume.unwrap_or(0);
            for e in entries {
                match send_entry(&state, &hub, &kinds, &e, &tx).await {
                    Some(n) => next = n,
                    None => return,
                }
            }
            next
        }
    };
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.tick().await;
    loop {
        tokio::select! {
            got = live.recv() => match got {
                Ok(e) if e.seq < next => {}
                Ok(e) => match send_entry(&state, &hub, &kinds, &e, &tx).await {
                    Some(n) => next = n,
                    None => return,
                },
                // Too slow a watcher: start it over from a snapshot.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let (rx, start) = hub.subscribe(None);
                    live = rx;
                    let Start::Snapshot(n) = start else { return };
                    if !send_snapshot(&state, &hub, &kinds, n, &tx).await {
                        return;
                    }
                    next = n;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = keepalive.tick() => {
                if tx.send(Ok(event(Type::Keepalive, vec![], cursor(&hub.epoch, next)))).await.is_err() {
                    return;
                }
            }
            () = tx.closed() => return,
            _ = stopping.changed() => return,
        }
    }
}

/// Send `e` if the stream watches its kind (a reset is a snapshot); the next number, or
/// `None` when the watcher is gone.
async fn send_entry(
    state: &AuthState,
    hub: &WatchHub,
    kinds: &[String],
    e: &Entry,
    tx: &Out,
) -> Option<u64> {
    let next = e.seq + 1;
    let watched = e.body.kind().is_none_or(|k| kinds.iter().any(|w| w == k));
    if !watched {
        return Some(next);
    }
    let sent = match &e.body {
        Body::Put(i) => tx
            .send(Ok(event(
                Type::Put,
                vec![i.clone()],
                cursor(&hub.epoch, next),
            )))
            .await
            .is_ok(),
        Body::Delete(i) => tx
            .send(Ok(event(
                Type::Delete,
                vec![i.clone()],
                cursor(&hub.epoch, next),
            )))
            .await
            .is_ok(),
        Body::Reset => send_snapshot(state, hub, kinds, next, tx).await,
    };
    sent.then_some(next)
}

/// `HeartbeatProxy`: only a proxy announces itself, under the name its certificate gives.
pub(super) async fn heartbeat_proxy(
    call: Call,
    r: proto::HeartbeatProxyRequest,
) -> Result<Done<proto::HeartbeatProxyResponse>, Failure> {
    let caller = call.caller()?;
    let id = &caller.identity;
    if id.kind != crate::identity::IdentityKind::Node || !id.roles.iter().any(|r| r == "@proxy") {
        return Err(Status::permission_denied(format!(
            "`{}` is not a proxy: only proxies announce themselves",
            id.name
        ))
        .into());
    }
    let name = id.name.clone();
    if r.leaving {
        call.state
            .store
            .delete_proxy(&name)
            .await
            .map_err(store_status)?;
        return Ok(Done::read(proto::HeartbeatProxyResponse {}));
    }
    if r.addr.is_empty() || r.addr.len() > 255 || !r.addr.contains(':') {
        return Err(Status::invalid_argument(
            "addr: the host:port agents dial to reach this proxy",
        )
        .into());
    }
    if r.leaves.len() > 10_000 {
        return Err(Status::invalid_argument("leaves: at most 10,000").into());
    }
    for leaf in &r.leaves {
        crate::resources::validate_name(leaf)
            .map_err(|m| Status::invalid_argument(format!("leaves: `{leaf}`: {m}")))?;
    }
    let expires = now_secs() + i64::from(r.ttl_seconds.clamp(5, 600));
    let spec = serde_json::json!({
        "name": name,
        "addr": r.addr,
        "expires": expires,
        "leaves": r.leaves,
    })
    .to_string();
    call.state
        .store
        .upsert_proxy(&name, &spec, expires)
        .await
        .map_err(store_status)?;
    Ok(Done::read(proto::HeartbeatProxyResponse {}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(name: &str) -> Body {
        Body::Put(item("proxy", name, "{}".into()))
    }

    #[test]
    fn a_resume_inside_the_ring_replays_exactly_the_missed_entries() {
        let mut ring = Ring::default();
        assert!(matches!(ring.start(None), Start::Snapshot(0)));
        // An empty log: resuming at 0 replays nothing (and is no gap).
        assert!(matches!(ring.start(Some(0)), Start::Replay(ref v) if v.is_empty()));
        for i in 0..10 {
            ring.push(put(&format!("p{i}")), 4);
        }
        // Entries 6..10 are kept.
        match ring.start(Some(7)) {
            Start::Replay(v) => assert_eq!(v.iter().map(|e| e.seq).collect::<Vec<_>>(), [7, 8, 9]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(ring.start(Some(10)), Start::Replay(ref v) if v.is_empty()));
        // Too far behind, or from the future (another Auth's numbers): a snapshot.
        assert!(matches!(ring.start(Some(5)), Start::Snapshot(10)));
        assert!(matches!(ring.start(Some(11)), Start::Snapshot(10)));
        assert!(matches!(ring.start(None), Start::Snapshot(10)));
    }

    #[test]
    fn cursors_of_another_epoch_or_malformed_are_not_resumed() {
        assert_eq!(parse_cursor("ab", &cursor("ab", 42)), Some(42));
        assert_eq!(parse_cursor("ab", &cursor("cd", 42)), None);
        for bad in ["", "ab", "ab:", "ab:x", ":1", "ab:-1"] {
            assert_eq!(parse_cursor("ab", bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        /// Wherever a watcher resumes, it gets the entries from there on, in order, or a
        /// snapshot: never a gap.
        #[test]
        fn resumption_never_skips(pushes in 0usize..50, cap in 1usize..20, resume in 0u64..60) {
            let mut ring = Ring::default();
            for i in 0..pushes {
                ring.push(put(&i.to_string()), cap);
            }
            match ring.start(Some(resume)) {
                Start::Replay(v) => {
                    let seqs: Vec<u64> = v.iter().map(|e| e.seq).collect();
                    let want: Vec<u64> = (resume..pushes as u64).collect();
                    proptest::prop_assert_eq!(seqs, want);
                }
                Start::Snapshot(n) => proptest::prop_assert_eq!(n, pushes as u64),
            }
        }
    }
}
