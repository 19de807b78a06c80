//! The audit log: events agents and proxies emit (validated, attributed to who delivered them,
//! deduplicated by id, stored durably) and searches over it.

use serde_json::json;
use tonic::Status;

use super::call::{Audit, Call, Done, Failure};
use super::store_status;
use crate::proto;
use crate::storage::{EventFilter, StoredEvent};

const MAX_EVENT_BATCH: usize = 1000;
const MAX_EVENT_DATA: usize = 64 * 1024;

fn event_proto(e: StoredEvent) -> proto::AuditEvent {
    proto::AuditEvent {
        event_id: e.event_id,
        r#type: e.event_type,
        time_nanos: e.time_nanos,
        actor: e.actor,
        source_addr: e.source_addr,
        data_json: e.data,
        id: e.id,
        cluster: e.cluster,
    }
}

pub(super) async fn emit(
    call: Call,
    r: proto::EmitEventsRequest,
) -> Result<Done<proto::EmitEventsResponse>, Failure> {
    let caller = call.caller()?;
    if r.events.len() > MAX_EVENT_BATCH {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_EVENT_BATCH} events per batch"
        ))
        .into());
    }
    let mut batch = Vec::with_capacity(r.events.len());
    for (i, e) in r.events.into_iter().enumerate() {
        if e.event_id.is_empty()
            || e.event_id.len() > 128
            || e.r#type.is_empty()
            || e.r#type.len() > 64
        {
            return Err(Status::invalid_argument(format!(
                "events[{i}]: event_id (1-128) and type (1-64) are required"
            ))
            .into());
        }
        if e.data_json.len() > MAX_EVENT_DATA {
            return Err(Status::invalid_argument(format!(
                "events[{i}].data_json: larger than 64 KiB"
            ))
            .into());
        }
        let mut data: serde_json::Value = if e.data_json.is_empty() {
            json!({})
        } else {
            serde_json::from_str(&e.data_json)
                .map_err(|err| Status::invalid_argument(format!("events[{i}].data_json: {err}")))?
        };
        let Some(obj) = data.as_object_mut() else {
            return Err(Status::invalid_argument(format!(
                "events[{i}].data_json: must be a JSON object"
            ))
            .into());
        };
        // Who delivered the event is recorded by Auth, not claimed by the emitter.
        obj.insert("emitted_by".into(), json!(caller.identity.name));
        batch.push(StoredEvent {
            id: 0,
            event_id: e.event_id,
            time_nanos: e.time_nanos,
            event_type: e.r#type,
            actor: e.actor,
            source_addr: e.source_addr,
            cluster: call.state.cluster.clone(),
            data: data.to_string(),
        });
    }
    let (accepted, duplicates) = call.state.audit_writer().submit(batch).await?;
    call.state.metrics.audit_events.inc_by(accepted as u64);
    call.state
        .metrics
        .audit_duplicates
        .inc_by(duplicates as u64);
    Ok(Done::audited(
        proto::EmitEventsResponse {
            accepted,
            duplicates,
        },
        // The events are the record: they were stored above, durably, before this answer.
        Audit::Nothing("the events are the record"),
    ))
}

/// The queue of emitted event batches, written by one task: all batches waiting are one
/// transaction, each answered with its own (accepted, duplicates).
pub(crate) type AuditWriter = super::group_commit::GroupCommit<Vec<StoredEvent>, (u32, u32)>;

/// Batches of emitted events per transaction.
const MAX_GROUPS: usize = 256;

/// Start the audit writer on the current runtime.
pub(crate) fn audit_writer(state: std::sync::Weak<super::AuthState>) -> AuditWriter {
    AuditWriter::start(MAX_GROUPS, move |groups: Vec<Vec<StoredEvent>>| {
        let state = state.upgrade();
        async move {
            let state = state?;
            Some(
                state
                    .store
                    .append_event_groups(&groups)
                    .await
                    .map_err(|e| e.to_string()),
            )
        }
    })
}

pub(super) async fn search(
    call: Call,
    r: proto::SearchEventsRequest,
) -> Result<Done<proto::SearchEventsResponse>, Failure> {
    let filter = EventFilter {
        from_nanos: r.from_nanos,
        to_nanos: r.to_nanos,
        types: r.types,
        actor: Some(r.actor).filter(|a| !a.is_empty()),
        after_id: r.after_id,
        limit: r.limit,
        newest_first: r.newest_first,
    };
    let events = call
        .state
        .store
        .search_events(&filter)
        .await
        .map_err(store_status)?;
    Ok(Done::read(proto::SearchEventsResponse {
        events: events.into_iter().map(event_proto).collect(),
    }))
}
