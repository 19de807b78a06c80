//! Session recordings on the agent: each SSH shell or exec session the agent serves is written
//! as it runs (`gatehouse-recording`'s format) to a spool file in the data dir, one chunk at
//! least every second, and uploaded to Auth as it grows (`upload.rs`). A file is deleted only
//! after Auth has acknowledged its trailer. Recordings a crash left open are sealed as
//! incomplete at the next start.
//!
//! Bounds: a recording holds one chunk's pending events in memory (≤ 48 KiB); files are opened
//! to append a chunk and closed again, so open files do not grow with sessions; the spool has a
//! byte quota. A recording that cannot be written (quota, full disk) is audited, counted, and
//! handled as the cluster's `recording.on_failure` says.

mod upload;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gatehouse_recording::{Codec, EndInfo, Event, SessionMeta, Signer, Writer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

use crate::ssh::AuditSink;
pub(crate) use upload::spawn_uploader;

/// How often pending events are checked against their deadline.
const FLUSH_TICK: Duration = Duration::from_millis(100);
/// While someone watches a session (`gsh join`), its events wait at most this long.
const WATCHED_FLUSH_MS: u64 = 100;
/// A trailer may exceed the quota by this much: a recording can always be sealed.
const TRAILER_ALLOWANCE: u64 = 64 * 1024;

/// What the cluster says about recording (from Auth; defaults until it has been asked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub record: bool,
    pub refuse_on_failure: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            record: true,
            refuse_on_failure: false,
        }
    }
}

/// `gatehouse_agent_recording_*`.
#[derive(Debug, Default)]
pub struct RecordingMetrics {
    pub active: Gauge,
    pub spool_bytes: Gauge,
    pub chunks_written: Counter,
    pub bytes_uploaded: Counter,
    pub uploaded: Counter,
    pub failures: Counter,
}

impl RecordingMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let r = registry.sub_registry_with_prefix("gatehouse_agent_recording");
        r.register("active", "Sessions being recorded", self.active.clone());
        r.register(
            "spool_bytes",
            "Bytes of recordings on disk waiting for Auth",
            self.spool_bytes.clone(),
        );
        r.register(
            "chunks_written",
            "Recording chunks written to the spool",
            self.chunks_written.clone(),
        );
        r.register(
            "bytes_uploaded",
            "Recording bytes Auth acknowledged",
            self.bytes_uploaded.clone(),
        );
        r.register(
            "uploaded",
            "Recordings Auth has whole and verified",
            self.uploaded.clone(),
        );
        r.register(
            "failures",
            "Recordings that could not be written (quota, disk) or that Auth refused",
            self.failures.clone(),
        );
    }
}

/// The agent's recordings: the spool directory, the quota, the signer, the active recordings.
pub struct Recordings {
    dir: PathBuf,
    quota: u64,
    used: AtomicU64,
    settings: Mutex<Settings>,
    /// Swapped when the host certificate is renewed.
    signer: arc_swap::ArcSwap<Signer>,
    audit: Arc<dyn AuditSink>,
    active: Mutex<HashMap<String, Weak<SessionRecording>>>,
    wake: Notify,
    pub metrics: RecordingMetrics,
}

impl std::fmt::Debug for Recordings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recordings")
            .field("dir", &self.dir)
            .field("quota", &self.quota)
            .finish_non_exhaustive()
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

thread_local! {
    /// One zstd context per thread, shared by every recording flushed on it.
    static CODEC: std::cell::RefCell<Option<Codec>> = const { std::cell::RefCell::new(None) };
}

fn with_codec<T>(f: impl FnOnce(&mut Codec) -> T) -> Option<T> {
    CODEC.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Codec::new().ok();
        }
        c.as_mut().map(f)
    })
}

/// Why a recording could not be written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecordingFailure {
    #[error("the agent's recording spool is full ({used} of {quota} bytes waiting for Auth)")]
    Quota { used: u64, quota: u64 },
    #[error("the agent cannot write the recording: {0}")]
    Io(String),
}

impl Recordings {
    /// Sign recordings that end from now on with this (renewed) host certificate.
    pub fn set_host_certificate(&self, certificate: String) {
        let key = self.signer.load().key.clone();
        self.signer.store(Arc::new(Signer { key, certificate }));
    }

    /// Open the spool in `dir`, seal what a crash left open, and start the flush timer.
    pub fn open(
        dir: &Path,
        quota: u64,
        signer: Signer,
        audit: Arc<dyn AuditSink>,
    ) -> std::io::Result<Arc<Self>> {
        gatehouse_controlplane::files::create_private_dir(dir)?;
        let recs = Arc::new(Self {
            dir: dir.to_owned(),
            quota,
            used: AtomicU64::new(0),
            settings: Mutex::new(Settings::default()),
            signer: arc_swap::ArcSwap::from_pointee(signer),
            audit,
            active: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            metrics: RecordingMetrics::default(),
        });
        let mut used = 0;
        for (id, path) in recs.spooled()? {
            if let Err(e) = recs.seal_if_open(&id, &path) {
                tracing::error!(recording = %id, error = %e, "recording: cannot seal a recording left open");
            }
            used += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        }
        recs.used.store(used, Ordering::Relaxed);
        recs.metrics.spool_bytes.set(used as i64);
        let weak = Arc::downgrade(&recs);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(recs) = weak.upgrade() else { return };
                recs.flush_due();
            }
        });
        Ok(recs)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn settings(&self) -> Settings {
        self.settings.lock().map(|s| *s).unwrap_or_default()
    }

    pub(crate) fn set_settings(&self, s: Settings) {
        if let Ok(mut cur) = self.settings.lock() {
            if *cur != s {
                tracing::info!(
                    record = s.record,
                    refuse_on_failure = s.refuse_on_failure,
                    "recording: cluster settings"
                );
            }
            *cur = s;
        }
    }

    /// The spool's recordings (`<id>.rec`), oldest name first.
    fn spooled(&self) -> std::io::Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "rec")
                && let Some(id) = path.file_stem().and_then(|s| s.to_str())
            {
                out.push((id.to_owned(), path.clone()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn is_active(&self, id: &str) -> bool {
        self.active
            .lock()
            .map(|a| a.get(id).is_some_and(|w| w.strong_count() > 0))
            .unwrap_or(false)
    }

    /// A recording without its trailer (the agent was killed mid-session): cut a torn last
    /// chunk, then append a trailer saying it is incomplete, signed like any other.
    fn seal_if_open(&self, id: &str, path: &Path) -> std::io::Result<()> {
        let scan = gatehouse_recording::scan_from(std::fs::File::open(path)?)?;
        if scan.reader.trailer_seen() {
            return Ok(());
        }
        let keep = scan.reader.consumed();
        let Some(writer) = Writer::resume(&scan.reader) else {
            // Not one whole chunk with the session's start: nothing was recorded. Kept aside,
            // never deleted.
            self.quarantine(id, path, "no whole chunk with the session's start");
            return Ok(());
        };
        let reason = "the agent stopped before the session ended; output after the last chunk written is missing";
        let trailer = with_codec(|c| {
            writer.finish(
                now_ms(),
                None,
                false,
                Some(reason.into()),
                c,
                &self.signer.load(),
            )
        })
        .ok_or_else(|| std::io::Error::other("no zstd context"))?
        .map_err(std::io::Error::other)?;
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(keep)?;
        drop(f);
        append(path, &trailer)?;
        tracing::warn!(recording = %id, bytes = keep, "recording: sealed a recording a stop left open (incomplete)");
        self.audit.emit(
            "recording.recovered",
            "",
            serde_json::json!({ "session_id": id, "recording": id, "bytes": keep, "reason": reason }),
        );
        Ok(())
    }

    /// Move a recording out of the upload queue, keeping its bytes.
    fn quarantine(&self, id: &str, path: &Path, reason: &str) {
        let dir = self.dir.join("quarantine");
        let moved = gatehouse_controlplane::files::create_private_dir(&dir)
            .and_then(|()| std::fs::rename(path, dir.join(format!("{id}.rec"))));
        let _ = std::fs::remove_file(self.dir.join(format!("{id}.ack")));
        self.metrics.failures.inc();
        tracing::error!(recording = %id, reason, moved = moved.is_ok(), "recording: kept aside in quarantine/");
        self.audit.emit(
            "recording.failed",
            "",
            serde_json::json!({ "session_id": id, "recording": id, "reason": reason, "kept_in": dir.display().to_string() }),
        );
    }

    /// Start recording a session, if the cluster records. `Err` when the recording cannot be
    /// written and the cluster refuses such sessions.
    pub fn begin(
        self: &Arc<Self>,
        meta: SessionMeta,
    ) -> Result<Option<Arc<SessionRecording>>, RecordingFailure> {
        let settings = self.settings();
        if !settings.record {
            return Ok(None);
        }
        let id = meta.id.clone();
        let mut writer = Writer::new(&meta, now_ms());
        let rec = Arc::new(SessionRecording {
            id: id.clone(),
            path: self.dir.join(format!("{id}.rec")),
            owner: Arc::clone(self),
            writer: Mutex::new(None),
            failed: AtomicBool::new(false),
            refuse: settings.refuse_on_failure,
            refused: Notify::new(),
            failure: Mutex::new(None),
            watchers: Mutex::new(std::collections::BTreeSet::new()),
            watched: AtomicBool::new(false),
            notices: Mutex::new(None),
        });
        // The start goes to disk at once: a spool that cannot take it fails here, before the
        // session starts.
        let first = with_codec(|c| writer.flush(c))
            .flatten()
            .unwrap_or_default();
        if let Err(e) = rec.write(&first, false) {
            self.failed(&id, &e);
            if settings.refuse_on_failure {
                return Err(e);
            }
            return Ok(None);
        }
        if let Ok(mut w) = rec.writer.lock() {
            *w = Some(writer);
        }
        if let Ok(mut a) = self.active.lock() {
            a.retain(|_, w| w.strong_count() > 0);
            a.insert(id, Arc::downgrade(&rec));
            self.metrics.active.set(a.len() as i64);
        }
        Ok(Some(rec))
    }

    fn failed(&self, id: &str, e: &RecordingFailure) {
        self.metrics.failures.inc();
        tracing::error!(recording = %id, error = %e, "recording: cannot write");
        self.audit.emit(
            "recording.failed",
            "",
            serde_json::json!({ "session_id": id, "recording": id, "reason": e.to_string() }),
        );
    }

    /// Auth says who watches the live session `id`: tell its participants about newcomers
    /// and flush its chunks sooner while anyone watches.
    pub(crate) fn set_watchers(&self, id: &str, watchers: &[String]) {
        let rec = self
            .active
            .lock()
            .ok()
            .and_then(|a| a.get(id).and_then(Weak::upgrade));
        if let Some(rec) = rec {
            rec.set_watchers(watchers);
        }
    }

    /// Flush every recording whose oldest pending event is due (a second; less when watched).
    fn flush_due(&self) {
        let now = now_ms();
        let active: Vec<Arc<SessionRecording>> = match self.active.lock() {
            Ok(mut a) => {
                a.retain(|_, w| w.strong_count() > 0);
                self.metrics.active.set(a.len() as i64);
                a.values().filter_map(Weak::upgrade).collect()
            }
            Err(_) => return,
        };
        for rec in active {
            rec.flush_if_due(now);
        }
    }

    fn reserve(&self, len: u64, trailer: bool) -> Result<(), RecordingFailure> {
        let limit = if trailer {
            self.quota.saturating_add(TRAILER_ALLOWANCE)
        } else {
            self.quota
        };
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur.saturating_add(len) > limit {
                return Err(RecordingFailure::Quota {
                    used: cur,
                    quota: self.quota,
                });
            }
            match self.used.compare_exchange_weak(
                cur,
                cur + len,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.metrics.spool_bytes.set((cur + len) as i64);
                    return Ok(());
                }
                Err(now) => cur = now,
            }
        }
    }

    fn release(&self, len: u64) {
        let prev = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(len))
            })
            .unwrap_or(0);
        self.metrics
            .spool_bytes
            .set(prev.saturating_sub(len) as i64);
    }
}

fn append(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).append(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(bytes)
}

/// One session's recording. Shared by the session's output pumps; the last event is `finish`.
pub struct SessionRecording {
    id: String,
    path: PathBuf,
    owner: Arc<Recordings>,
    writer: Mutex<Option<Writer>>,
    failed: AtomicBool,
    refuse: bool,
    refused: Notify,
    failure: Mutex<Option<String>>,
    watchers: Mutex<std::collections::BTreeSet<String>>,
    watched: AtomicBool,
    /// Lines for the session's participants (written to their terminal by the session).
    notices: Mutex<Option<tokio::sync::mpsc::UnboundedSender<String>>>,
}

impl std::fmt::Debug for SessionRecording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRecording")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SessionRecording {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Append chunk bytes to the spool file (quota first; a trailer may go a little over).
    fn write(&self, bytes: &[u8], trailer: bool) -> Result<(), RecordingFailure> {
        if bytes.is_empty() {
            return Ok(());
        }
        let len = bytes.len() as u64;
        self.owner.reserve(len, trailer)?;
        if let Err(e) = append(&self.path, bytes) {
            self.owner.release(len);
            let what = if e.kind() == std::io::ErrorKind::StorageFull {
                format!("the disk is full ({})", self.owner.dir.display())
            } else {
                e.to_string()
            };
            return Err(RecordingFailure::Io(what));
        }
        self.owner.metrics.chunks_written.inc();
        self.owner.wake.notify_one();
        Ok(())
    }

    /// A write failed: from here the session is unrecorded (its recording is sealed as
    /// incomplete if the trailer still fits), and with `refuse` the session is ended.
    fn fail(&self, writer: Option<Writer>, e: RecordingFailure) {
        if self.failed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.owner.failed(&self.id, &e);
        if let Ok(mut f) = self.failure.lock() {
            *f = Some(e.to_string());
        }
        if let Some(w) = writer {
            let reason = format!("recording stopped: {e}");
            let trailer = with_codec(|c| {
                w.finish(
                    now_ms(),
                    None,
                    false,
                    Some(reason),
                    c,
                    &self.owner.signer.load(),
                )
            });
            if let Some(Ok(t)) = trailer {
                let _ = self.write(&t, true);
            }
        }
        if self.refuse {
            self.refused.notify_one();
        }
    }

    fn flush_locked(&self, slot: &mut Option<Writer>) {
        let Some(w) = slot.as_mut() else { return };
        let before = w.checkpoint();
        let Some(bytes) = with_codec(|c| w.flush(c)).flatten() else {
            return;
        };
        if let Err(e) = self.write(&bytes, false) {
            // The chunk is not on disk: the trailer must not count it.
            w.restore(before);
            let writer = slot.take();
            self.fail(writer, e);
        }
    }

    fn flush_if_due(&self, now: u64) {
        let watched = self.watched.load(Ordering::Relaxed);
        if let Ok(mut slot) = self.writer.lock()
            && slot
                .as_ref()
                .and_then(Writer::deadline)
                .map(|d| {
                    if watched {
                        d.saturating_sub(gatehouse_recording::FLUSH_AFTER_MS) + WATCHED_FLUSH_MS
                    } else {
                        d
                    }
                })
                .is_some_and(|d| d <= now)
        {
            self.flush_locked(&mut slot);
        }
    }

    /// Where to send lines for the session's participants.
    pub fn set_notices(&self, tx: tokio::sync::mpsc::UnboundedSender<String>) {
        if let Ok(mut n) = self.notices.lock() {
            *n = Some(tx);
        }
    }

    fn set_watchers(&self, now: &[String]) {
        self.watched.store(!now.is_empty(), Ordering::Relaxed);
        let Ok(mut cur) = self.watchers.lock() else {
            return;
        };
        for user in now {
            if cur.insert(user.clone()) {
                self.record(&Event::Joined { user: user.clone() });
                tracing::info!(recording = %self.id, watcher = %user, "recording: someone is watching the session");
                if let Ok(n) = self.notices.lock()
                    && let Some(tx) = n.as_ref()
                {
                    let _ = tx.send(format!(
                        "\r\n[gatehouse: {user} joined to watch this session]\r\n"
                    ));
                }
            }
        }
        cur.retain(|u| now.contains(u));
    }

    /// Record output now, from the bytes read.
    pub fn record_data(&self, stream: gatehouse_recording::Stream, data: &[u8]) {
        let Ok(mut slot) = self.writer.lock() else {
            return;
        };
        let Some(w) = slot.as_mut() else { return };
        w.record_data(now_ms(), stream, data);
        if w.wants_flush() {
            self.flush_locked(&mut slot);
        }
    }

    /// Record an event now (a resize, someone joining).
    pub fn record(&self, event: &Event) {
        let Ok(mut slot) = self.writer.lock() else {
            return;
        };
        let Some(w) = slot.as_mut() else { return };
        w.record(now_ms(), event);
        if w.wants_flush() {
            self.flush_locked(&mut slot);
        }
    }

    /// The session ended: its end, the last chunk and the signed trailer.
    pub fn finish(&self, end: EndInfo) {
        let writer = self.writer.lock().ok().and_then(|mut s| s.take());
        let Some(w) = writer else { return };
        let bytes = with_codec(|c| {
            w.finish(
                now_ms(),
                Some(end),
                true,
                None,
                c,
                &self.owner.signer.load(),
            )
        });
        match bytes {
            Some(Ok(b)) => {
                if let Err(e) = self.write(&b, true) {
                    self.fail(None, e);
                }
            }
            Some(Err(e)) => self.fail(None, RecordingFailure::Io(e.to_string())),
            None => self.fail(None, RecordingFailure::Io("no zstd context".into())),
        }
        if let Ok(mut a) = self.owner.active.lock() {
            a.remove(&self.id);
            self.owner.metrics.active.set(a.len() as i64);
        }
    }

    /// Why the recording failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Resolves when the recording failed and the cluster ends such sessions, with why.
    pub async fn refused(&self) -> String {
        loop {
            if self.refuse && self.failed.load(Ordering::Acquire) {
                return self.failure().unwrap_or_default();
            }
            self.refused.notified().await;
        }
    }
}

/// Read a recording's whole chunks from `offset`, at most about `max` bytes (at least one
/// chunk): what one upload carries.
pub(crate) fn whole_chunks(path: &Path, offset: u64, max: usize) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    f.take((max + gatehouse_recording::HEADER_LEN + gatehouse_recording::MAX_PAYLOAD) as u64)
        .read_to_end(&mut buf)?;
    let mut at = 0usize;
    while let Some(rest) = buf.get(at..) {
        let Ok(h) = gatehouse_recording::ChunkHeader::parse(rest) else {
            break;
        };
        let total = gatehouse_recording::HEADER_LEN + h.payload_len as usize;
        if rest.len() < total || (at > 0 && at + total > max) {
            break;
        }
        at += total;
    }
    buf.truncate(at);
    Ok(buf)
}
