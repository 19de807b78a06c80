//! The uploader: sends each spooled recording's new chunks to Auth as they are written, from
//! the offset Auth last acknowledged (kept in `<id>.ack`), and deletes a recording only once
//! Auth says it has the whole of it, verified. While Auth is unreachable, recordings wait on
//! disk and the uploader retries with backoff; a recording Auth refuses as corrupt is kept aside
//! (`quarantine/`), never deleted.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse_controlplane::proto;

use super::{Recordings, Settings, whole_chunks};
use crate::role::AuthLink;

/// One upload carries about this much.
const BATCH: usize = 1024 * 1024;
const SETTINGS_EVERY: Duration = Duration::from_secs(30);
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// Passes over the spool are at least this far apart, so a busy session's chunks go up in
/// batches (one request, one acknowledgement) rather than one by one.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(15);

fn ack_path(dir: &Path, id: &str) -> std::path::PathBuf {
    dir.join(format!("{id}.ack"))
}

fn read_ack(dir: &Path, id: &str) -> u64 {
    std::fs::read_to_string(ack_path(dir, id))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Not synced: a lost or torn acknowledgement only makes the agent resend what Auth has, which
/// Auth skips.
fn write_ack(dir: &Path, id: &str, offset: u64) -> std::io::Result<()> {
    std::fs::write(ack_path(dir, id), offset.to_string())
}

enum Outcome {
    /// Auth took some bytes (or had them).
    Progress,
    /// Nothing new to send.
    Idle,
    /// Auth is unreachable or failed: try again later.
    Retry(String),
}

/// Start the uploader (and the cluster settings refresh) on the current runtime.
pub(crate) fn spawn_uploader(
    recs: Arc<Recordings>,
    auth: Arc<AuthLink>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(500);
        let mut settings_at: Option<Instant> = None;
        loop {
            let pass_started = Instant::now();
            if settings_at.is_none_or(|t| t.elapsed() >= SETTINGS_EVERY)
                && refresh_settings(&recs, &auth).await
            {
                settings_at = Some(Instant::now());
            }
            let mut progressed = false;
            let mut retry = None;
            match recs.spooled() {
                Ok(list) => {
                    for (id, path) in list {
                        match upload_one(&recs, &auth, &id, &path).await {
                            Outcome::Progress => progressed = true,
                            Outcome::Idle => {}
                            Outcome::Retry(e) => {
                                retry = Some(e);
                                break;
                            }
                        }
                    }
                }
                Err(e) => retry = Some(format!("cannot list the spool: {e}")),
            }
            if let Some(e) = retry {
                auth.forget().await;
                tracing::warn!(error = %e, retry_in = ?backoff, "recording: upload paused; recordings stay on disk");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            backoff = Duration::from_millis(500);
            if !progressed {
                let _ = tokio::time::timeout(IDLE_WAIT, recs.wake.notified()).await;
            }
            if let Some(rest) = MIN_PASS_INTERVAL.checked_sub(pass_started.elapsed()) {
                tokio::time::sleep(rest).await;
            }
        }
    })
}

async fn refresh_settings(recs: &Recordings, auth: &AuthLink) -> bool {
    let Ok(mut client) = auth.client().await else {
        return false;
    };
    match client
        .get_cluster_settings(proto::GetClusterSettingsRequest {})
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            recs.set_settings(Settings {
                record: r.recording_mode != "off",
                refuse_on_failure: r.recording_on_failure == "refuse",
            });
            true
        }
        Err(_) => false,
    }
}

async fn upload_one(recs: &Recordings, auth: &AuthLink, id: &str, path: &Path) -> Outcome {
    let dir = recs.dir();
    let offset = read_ack(dir, id);
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(_) => return Outcome::Idle,
    };
    let active = recs.is_active(id);
    // An active recording with nothing new waits; a finished one whose bytes Auth all has is
    // asked once more (with nothing) whether it is complete.
    if offset >= len && active {
        return Outcome::Idle;
    }
    let data = {
        let path = path.to_owned();
        match tokio::task::spawn_blocking(move || whole_chunks(&path, offset, BATCH)).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => return Outcome::Retry(format!("reading recording {id}: {e}")),
            Err(e) => return Outcome::Retry(e.to_string()),
        }
    };
    if data.is_empty() && active {
        return Outcome::Idle;
    }
    let sent = data.len() as u64;
    let mut client = match auth.client().await {
        Ok(c) => c,
        Err(e) => return Outcome::Retry(e),
    };
    let reply = client
        .upload_recording(proto::UploadRecordingRequest {
            id: id.to_owned(),
            offset,
            data,
        })
        .await;
    match reply {
        Ok(r) => {
            let r = r.into_inner();
            if r.next_offset > offset {
                recs.metrics.bytes_uploaded.inc_by(r.next_offset - offset);
            }
            if active {
                recs.set_watchers(id, &r.watchers);
            }
            if r.complete {
                let _ = std::fs::remove_file(path);
                let _ = std::fs::remove_file(ack_path(dir, id));
                recs.release(len);
                recs.metrics.uploaded.inc();
                tracing::info!(recording = %id, bytes = len, "recording: uploaded whole and verified");
                return Outcome::Progress;
            }
            if let Err(e) = write_ack(dir, id, r.next_offset) {
                return Outcome::Retry(format!("cannot keep the upload's offset: {e}"));
            }
            if r.next_offset == offset && sent == 0 {
                Outcome::Idle
            } else {
                Outcome::Progress
            }
        }
        Err(s) => match s.code() {
            // Auth looked at the bytes and refused them: retrying cannot help.
            tonic::Code::InvalidArgument | tonic::Code::PermissionDenied => {
                recs.quarantine(id, path, &format!("Auth refused it: {}", s.message()));
                Outcome::Progress
            }
            _ => Outcome::Retry(format!("{}: {}", s.code(), s.message())),
        },
    }
}
