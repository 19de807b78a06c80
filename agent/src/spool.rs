//! The agent's audit spool: every event is appended (and synced) to a file in the data dir
//! before anything else happens, and a sender delivers the file to Auth in batches. While Auth
//! is unreachable events wait on disk; after a crash the sender resumes from the last delivered
//! offset. Delivery is at least once; Auth deduplicates by event id.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

const MAX_BATCH: usize = 500;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpooledEvent {
    pub event_id: String,
    pub event_type: String,
    pub time_nanos: i64,
    pub actor: String,
    pub source_addr: String,
    pub data: serde_json::Value,
}

#[derive(Debug)]
struct Files {
    log: std::fs::File,
    len: u64,
}

/// Append side and delivery state, shared by the session code and the sender.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    files: Mutex<Files>,
    wake: Notify,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool io: {0}")]
    Io(#[from] std::io::Error),
    #[error("spool lock poisoned")]
    Poisoned,
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl Spool {
    pub fn open(dir: &Path) -> Result<Arc<Self>, SpoolError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("events.jsonl");
        let mut opts = std::fs::OpenOptions::new();
        opts.create(true).append(true).read(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let log = opts.open(&path)?;
        let len = log.metadata()?.len();
        Ok(Arc::new(Self {
            dir: dir.to_owned(),
            files: Mutex::new(Files { log, len }),
            wake: Notify::new(),
        }))
    }

    /// Durably record an event; returns once it is on disk.
    pub fn emit(
        &self,
        event_type: &str,
        actor: &str,
        source_addr: &str,
        data: serde_json::Value,
    ) -> Result<(), SpoolError> {
        let ev = SpooledEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            event_type: event_type.to_owned(),
            time_nanos: now_nanos(),
            actor: actor.to_owned(),
            source_addr: source_addr.to_owned(),
            data,
        };
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        {
            let mut f = self.files.lock().map_err(|_| SpoolError::Poisoned)?;
            f.log.write_all(&line)?;
            f.log.sync_data()?;
            f.len += line.len() as u64;
        }
        self.wake.notify_one();
        Ok(())
    }

    fn offset_path(&self) -> PathBuf {
        self.dir.join("events.offset")
    }

    fn read_offset(&self) -> u64 {
        std::fs::read_to_string(self.offset_path())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn write_offset(&self, offset: u64) -> Result<(), SpoolError> {
        let tmp = self.dir.join("events.offset.tmp");
        std::fs::write(&tmp, offset.to_string())?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(tmp, self.offset_path())?;
        Ok(())
    }

    /// Undelivered events from the saved offset: up to `MAX_BATCH`, and the offset after them.
    pub fn pending(&self) -> Result<(Vec<SpooledEvent>, u64), SpoolError> {
        let offset = self.read_offset();
        let mut file = std::fs::File::open(self.dir.join("events.jsonl"))?;
        let len = file.metadata()?.len();
        if offset >= len {
            return Ok((vec![], offset));
        }
        file.seek(SeekFrom::Start(offset))?;
        let mut reader = BufReader::new(file.take(len - offset));
        let mut events = Vec::new();
        let mut pos = offset;
        let mut line = String::new();
        while events.len() < MAX_BATCH {
            line.clear();
            let n = reader.read_line(&mut line)?;
            if n == 0 || !line.ends_with('\n') {
                break; // end, or a line still being written
            }
            pos += n as u64;
            match serde_json::from_str::<SpooledEvent>(line.trim_end()) {
                Ok(ev) => events.push(ev),
                Err(e) => tracing::warn!(error = %e, "spool: skipping a corrupt line"),
            }
        }
        Ok((events, pos))
    }

    /// Mark everything before `offset` delivered; empties the files once all is delivered.
    pub fn delivered(&self, offset: u64) -> Result<(), SpoolError> {
        let mut f = self.files.lock().map_err(|_| SpoolError::Poisoned)?;
        if offset >= f.len {
            f.log.set_len(0)?;
            f.log.sync_all()?;
            f.len = 0;
            self.write_offset(0)?;
        } else {
            self.write_offset(offset)?;
        }
        Ok(())
    }

    pub fn undelivered_bytes(&self) -> u64 {
        let len = self.files.lock().map(|f| f.len).unwrap_or(0);
        len.saturating_sub(self.read_offset())
    }

    /// Wait until something new is emitted or `timeout` passes.
    pub async fn wait(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.wake.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_until_delivered_and_resume_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        for i in 0..3 {
            spool
                .emit("exec", "alice", "127.0.0.1", serde_json::json!({ "n": i }))
                .unwrap();
        }
        let (batch, next) = spool.pending().unwrap();
        assert_eq!(batch.len(), 3);
        // Delivery fails: nothing is marked. A new process sees the same events.
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        let (again, next2) = spool.pending().unwrap();
        assert_eq!(again, batch);
        assert_eq!(next, next2);
        spool
            .emit("exec", "alice", "127.0.0.1", serde_json::json!({ "n": 3 }))
            .unwrap();
        spool.delivered(next).unwrap();
        let (rest, end) = spool.pending().unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].data["n"], 3);
        spool.delivered(end).unwrap();
        assert_eq!(spool.undelivered_bytes(), 0);
        assert!(spool.pending().unwrap().0.is_empty());
        assert_eq!(
            std::fs::metadata(dir.path().join("events.jsonl"))
                .unwrap()
                .len(),
            0
        );
    }
}
