//! Session recordings: agents upload chunks (acknowledged by offset, resumable, idempotent),
//! users list and read them as their roles allow, and the cluster's recording settings.

use std::sync::Arc;

use serde_json::json;
use tonic::Status;

use super::call::{Audit, Call, Caller, Done, Event, Failure};
use super::{internal, store_status};
use crate::identity::IdentityKind;
use crate::proto;
use crate::rbac::Scope;
use crate::recordings::RecordingStore;
use crate::resources::{ResourceKind, Verb};
use crate::storage::{RecordingFilter, RecordingRow};
use gatehouse_recording::{Chunk, ChunkHeader, ChunkKind, HEADER_LEN, Reader};

/// The most one upload may carry.
const MAX_UPLOAD: usize = 4 * 1024 * 1024;
/// The most one read returns.
const MAX_READ: u32 = 4 * 1024 * 1024;
const DEFAULT_READ: u32 = 1024 * 1024;

fn now_ms() -> i64 {
    super::now_nanos() / 1_000_000
}

fn store(call: &Call) -> Result<&RecordingStore, Status> {
    call.state
        .recording_store
        .as_ref()
        .ok_or_else(|| Status::failed_precondition("this Auth server keeps no session recordings"))
}

fn check_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(Status::invalid_argument(
            "recording id: 1-64 letters, digits and dashes",
        ));
    }
    Ok(())
}

pub(super) fn info(r: &RecordingRow) -> proto::RecordingInfo {
    proto::RecordingInfo {
        id: r.id.clone(),
        user: r.user.clone(),
        login: r.login.clone(),
        node: r.node.clone(),
        kind: r.kind.clone(),
        command: r.command.clone(),
        started_unix_ms: r.started_ms,
        duration_ms: u64::try_from(r.duration_ms).unwrap_or(0),
        state: r.state.clone(),
        bytes: u64::try_from(r.next_offset).unwrap_or(0),
        reason: r.reason.clone(),
    }
}

pub(super) async fn settings(
    call: Call,
    _r: proto::GetClusterSettingsRequest,
) -> Result<Done<proto::GetClusterSettingsResponse>, Failure> {
    call.caller()?;
    let c = &call.state.recording_config;
    Ok(Done::read(proto::GetClusterSettingsResponse {
        recording_mode: c.mode.as_str().into(),
        recording_on_failure: c.on_failure.as_str().into(),
    }))
}

/// The first chunk of a new recording: its metadata, checked against the uploader.
fn first_row(id: &str, data: &[u8], caller: &Caller, now: i64) -> Result<RecordingRow, Status> {
    let mut reader = Reader::new();
    reader.push(data);
    match reader.next_chunk() {
        Ok(Some(Chunk::Data { .. })) => {}
        Ok(_) => {
            return Err(Status::invalid_argument(
                "a recording starts with a whole data chunk",
            ));
        }
        Err(e) => return Err(Status::invalid_argument(format!("recording {id}: {e}"))),
    }
    let meta = reader
        .meta()
        .ok_or_else(|| Status::invalid_argument("the first chunk has no session start"))?;
    if meta.id != id {
        return Err(Status::invalid_argument(format!(
            "the recording's first chunk names `{}`, not `{id}`",
            meta.id
        )));
    }
    if caller.identity.kind == IdentityKind::Node && meta.node_id != caller.identity.name {
        return Err(Status::permission_denied(format!(
            "host `{}` may upload only its own recordings (this one names `{}`)",
            caller.identity.name, meta.node_id
        )));
    }
    Ok(RecordingRow {
        id: id.to_owned(),
        user: meta.user.clone(),
        login: meta.login.clone(),
        node: meta.node.clone(),
        node_id: meta.node_id.clone(),
        kind: match meta.kind {
            gatehouse_recording::SessionKind::Interactive => "interactive".into(),
            gatehouse_recording::SessionKind::Exec => "exec".into(),
        },
        command: meta.command.clone().unwrap_or_default(),
        started_ms: i64::try_from(meta.started_unix_ms).unwrap_or(0),
        updated_ms: now,
        duration_ms: 0,
        state: "live".into(),
        next_offset: 0,
        next_seq: 0,
        reason: String::new(),
    })
}

/// Whole chunks in `data`, continuing at `seq`: the next sequence number, whether the last one
/// is the trailer, and the time of the last chunk.
fn walk_chunks(data: &[u8], mut seq: u64) -> Result<(u64, bool, u64), String> {
    let mut at = 0usize;
    let mut time = 0;
    while at < data.len() {
        let rest = data.get(at..).unwrap_or_default();
        let h = ChunkHeader::parse(rest).map_err(|e| format!("chunk {seq}: {e}"))?;
        let total = HEADER_LEN + h.payload_len as usize;
        let payload = rest
            .get(HEADER_LEN..total)
            .ok_or_else(|| format!("chunk {seq}: cut short (uploads carry whole chunks)"))?;
        if !h.check(payload) {
            return Err(format!("chunk {seq}: checksum mismatch"));
        }
        if h.seq != seq {
            return Err(format!("chunk {}: where {seq} was due", h.seq));
        }
        time = h.time_ms;
        at += total;
        if h.kind == ChunkKind::Trailer {
            if at != data.len() {
                return Err("bytes after the trailer".into());
            }
            return Ok((seq, true, time));
        }
        seq += 1;
    }
    Ok((seq, false, time))
}

fn ack(next_offset: i64, complete: bool) -> proto::UploadRecordingResponse {
    proto::UploadRecordingResponse {
        next_offset: u64::try_from(next_offset).unwrap_or(0),
        complete,
        watchers: vec![],
    }
}

pub(super) async fn upload(
    call: Call,
    r: proto::UploadRecordingRequest,
) -> Result<Done<proto::UploadRecordingResponse>, Failure> {
    let caller = call.caller()?;
    let recordings = store(&call)?;
    check_id(&r.id)?;
    if r.data.len() > MAX_UPLOAD {
        return Err(Status::invalid_argument("at most 4 MiB per upload").into());
    }
    let lock = call.state.recording_lock(&r.id);
    let _guard = lock.lock().await;
    let db = &call.state.store;
    let now = now_ms();
    let row = match db.get_recording(&r.id).await.map_err(store_status)? {
        Some(row) => row,
        None if r.offset != 0 => return Ok(Done::read(ack(0, false))),
        None => {
            let row = first_row(&r.id, &r.data, caller, now)?;
            db.insert_recording(&row).await.map_err(store_status)?;
            row
        }
    };
    if caller.identity.kind == IdentityKind::Node && row.node_id != caller.identity.name {
        return Err(Status::permission_denied(format!(
            "host `{}` may upload only its own recordings",
            caller.identity.name
        ))
        .into());
    }
    if row.state != "live" {
        return Ok(Done::read(ack(row.next_offset, true)));
    }
    let next = u64::try_from(row.next_offset).unwrap_or(0);
    // Resent bytes Auth already has are skipped; a gap makes the agent resend from `next`.
    if r.offset > next || r.offset + r.data.len() as u64 <= next {
        return Ok(Done::read(ack(row.next_offset, false)));
    }
    let new = r
        .data
        .get(usize::try_from(next - r.offset).unwrap_or(usize::MAX)..)
        .unwrap_or_default();
    let seq = u64::try_from(row.next_seq).unwrap_or(0);
    let (next_seq, trailer, time) = walk_chunks(new, seq)
        .map_err(|e| Status::invalid_argument(format!("recording {}: {e}", r.id)))?;
    recordings
        .append(&r.id, next, new)
        .await
        .map_err(|e| Status::unavailable(format!("cannot store the recording: {e}")))?;
    let end = next + new.len() as u64;
    let end_i = i64::try_from(end).unwrap_or(i64::MAX);
    db.advance_recording(
        &r.id,
        row.next_offset,
        end_i,
        i64::try_from(next_seq).unwrap_or(i64::MAX),
        i64::try_from(time).unwrap_or(0),
        now,
    )
    .await
    .map_err(store_status)?;
    if !trailer {
        let mut response = ack(end_i, false);
        response.watchers = call.state.watchers_of(&r.id);
        return Ok(Done::audited(
            response,
            Audit::Nothing("a recording's chunks: session.upload when it is whole"),
        ));
    }
    let event = finish(&call, recordings, &row).await?;
    Ok(Done::audited(ack(end_i, true), Audit::Events(vec![event])))
}

/// The trailer is in: verify the whole recording, keep it as an object, mark it done.
async fn finish(
    call: &Call,
    recordings: &RecordingStore,
    row: &RecordingRow,
) -> Result<Event, Status> {
    let scan = recordings.scan_staging(&row.id).await.map_err(internal)?;
    if let Some(e) = scan.error {
        return Err(Status::invalid_argument(format!(
            "recording {} does not verify: {e}",
            row.id
        )));
    }
    let (Some(meta), Some(trailer)) = (scan.reader.meta(), scan.reader.trailer()) else {
        return Err(Status::invalid_argument(
            "a recording without start or trailer",
        ));
    };
    // Any host key trusted now: a recording may end during a host CA rotation.
    let cas: Vec<ssh_key::PublicKey> = call
        .state
        .trusted_ssh(super::authorities::SshKind::Host)
        .iter()
        .filter_map(|l| ssh_key::PublicKey::from_openssh(l).ok())
        .collect();
    let signed_by = gatehouse_recording::verify_trailer(meta, trailer, &cas).map_err(|e| {
        Status::invalid_argument(format!("recording {} does not verify: {e}", row.id))
    })?;
    let bytes = recordings.keep(&row.id).await.map_err(|e| {
        Status::unavailable(format!(
            "cannot keep the recording in {}: {e}",
            recordings.describe()
        ))
    })?;
    let state = if trailer.complete {
        "complete"
    } else {
        "incomplete"
    };
    let reason = trailer.reason.clone().unwrap_or_default();
    call.state
        .store
        .finish_recording(
            &row.id,
            state,
            i64::try_from(trailer.duration_ms).unwrap_or(0),
            &reason,
            now_ms(),
        )
        .await
        .map_err(store_status)?;
    Ok(Event::new(
        "session.upload",
        &row.user,
        json!({
            "session_id": row.id,
            "recording": row.id,
            "user": row.user,
            "login": row.login,
            "node": row.node,
            "complete": trailer.complete,
            "reason": trailer.reason,
            "chunks": trailer.chunks,
            "bytes": bytes,
            "sha256": trailer.sha256,
            "signed_by": signed_by,
        }),
    ))
}

/// Who may see which recordings: everyone's, or only the caller's own.
fn scope(caller: &Caller, verb: Verb) -> Result<Scope, Status> {
    caller
        .roles
        .scope(ResourceKind::Session, verb)
        .map_err(|e| Status::permission_denied(e.to_string()))
}

pub(super) async fn list(
    call: Call,
    r: proto::ListRecordingsRequest,
) -> Result<Done<proto::ListRecordingsResponse>, Failure> {
    let caller = call.caller()?;
    store(&call)?;
    let mut filter = RecordingFilter {
        user: (!r.user.is_empty()).then(|| r.user.clone()),
        node: (!r.node.is_empty()).then(|| r.node.clone()),
        since_ms: r.since_unix_ms,
        live_only: r.live,
        limit: r.limit,
    };
    if scope(caller, Verb::List)? == Scope::Own {
        if filter
            .user
            .as_ref()
            .is_some_and(|u| *u != caller.identity.name)
        {
            return Ok(Done::read(proto::ListRecordingsResponse::default()));
        }
        filter.user = Some(caller.identity.name.clone());
    }
    let rows = call
        .state
        .store
        .list_recordings(&filter)
        .await
        .map_err(store_status)?;
    Ok(Done::read(proto::ListRecordingsResponse {
        recordings: rows.iter().map(info).collect(),
    }))
}

pub(super) async fn read(
    call: Call,
    r: proto::ReadRecordingRequest,
) -> Result<Done<proto::ReadRecordingResponse>, Failure> {
    let caller = call.caller()?;
    let recordings = store(&call)?;
    check_id(&r.id)?;
    let own = scope(caller, Verb::Read)? == Scope::Own;
    let row = call
        .state
        .store
        .get_recording(&r.id)
        .await
        .map_err(store_status)?
        .ok_or_else(|| Status::not_found(format!("no recording `{}`", r.id)))?;
    if own && row.user != caller.identity.name {
        return Err(Status::permission_denied(format!(
            "user `{}` may read only the recordings of their own sessions",
            caller.identity.name
        ))
        .into());
    }
    if r.join {
        if row.state != "live" {
            return Err(Status::failed_precondition(format!(
                "session {} has ended ({}); play its recording instead",
                row.id, row.state
            ))
            .into());
        }
        if !caller.roles.cert_permissions().join_sessions {
            return Err(Status::permission_denied(format!(
                "user `{}` may not watch live sessions: no role sets join_sessions",
                caller.identity.name
            ))
            .into());
        }
        call.state.watch(&row.id, &caller.identity.name);
    }
    let size = u64::try_from(row.next_offset).unwrap_or(0);
    let max = match r.max_bytes {
        0 => DEFAULT_READ,
        n => n.min(MAX_READ),
    };
    let start = r.offset.min(size);
    let end = start.saturating_add(u64::from(max)).min(size);
    let data = if start < end {
        recordings
            .read(&row.id, row.state == "live", start..end)
            .await
            .map_err(|e| Status::unavailable(format!("cannot read the recording: {e}")))?
    } else {
        Vec::new()
    };
    let response = proto::ReadRecordingResponse {
        data,
        size,
        info: Some(info(&row)),
    };
    if r.offset != 0 {
        return Ok(Done::read(response));
    }
    let event = Event::new(
        if r.join {
            "session.join"
        } else {
            "recording.read"
        },
        &caller.identity.name,
        json!({
            "session_id": row.id,
            "recording": row.id,
            "reader": caller.identity.name,
            "user": row.user,
            "node": row.node,
            "state": row.state,
        }),
    );
    Ok(Done::audited(response, Audit::Events(vec![event])))
}

/// The lock one recording's uploads take.
pub(super) type RecordingLock = Arc<tokio::sync::Mutex<()>>;

/// A watcher who has not read for this long has left.
const WATCH_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Live sessions' watchers, by recording id, with when each last read.
#[derive(Debug, Default)]
pub(super) struct Watchers(
    std::collections::HashMap<String, std::collections::BTreeMap<String, std::time::Instant>>,
);

impl Watchers {
    pub(super) fn watch(&mut self, id: &str, user: &str, now: std::time::Instant) {
        self.0
            .entry(id.to_owned())
            .or_default()
            .insert(user.to_owned(), now);
    }

    pub(super) fn of(&mut self, id: &str, now: std::time::Instant) -> Vec<String> {
        self.0.retain(|_, users| {
            users.retain(|_, at| now.duration_since(*at) < WATCH_TTL);
            !users.is_empty()
        });
        self.0
            .get(id)
            .map(|u| u.keys().cloned().collect())
            .unwrap_or_default()
    }
}
