//! Reading a recording from Auth as a stream of events: chunk by chunk over `ReadRecording`,
//! each data chunk's events handed to an [`AsyncEvents`] sink as it arrives, so playback starts
//! at once whatever the recording's size. With `join`, a live session is followed until it ends
//! (Auth tells its agent, which sends its output sooner and tells the participants). The whole
//! recording is checked as it is read; a damaged one fails naming the chunk. `gsh`, `gctl` and
//! the web UI read recordings through this one path.

use std::time::Duration;

use gatehouse_recording::{Chunk, Reader, SessionMeta, Timed};

use crate::client::Client;
use crate::proto;

/// How often a live session being watched is asked for its new bytes.
pub const LIVE_POLL: Duration = Duration::from_millis(100);
/// Bytes asked for per call.
pub const READ_BYTES: u32 = 1024 * 1024;

/// What a sink's failure carries.
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// Why reading a recording stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Rpc(#[from] tonic::Status),
    #[error("recording {id}: {message}")]
    Damaged { id: String, message: String },
    #[error("{0}")]
    Sink(SinkError),
}

/// What a reader of a recording does with each chunk's events.
#[allow(async_fn_in_trait)]
pub trait AsyncEvents {
    async fn events(
        &mut self,
        meta: Option<&SessionMeta>,
        events: &[Timed],
    ) -> Result<(), SinkError>;
}

impl<T: AsyncEvents> AsyncEvents for &mut T {
    async fn events(
        &mut self,
        meta: Option<&SessionMeta>,
        events: &[Timed],
    ) -> Result<(), SinkError> {
        (**self).events(meta, events).await
    }
}

/// Read recording `id` (following it while live, with `join`) into `each`; the recording's
/// last known state and the reader (metadata, trailer) come back.
pub async fn stream<F>(
    client: &mut Client,
    id: &str,
    join: bool,
    mut each: F,
) -> Result<(proto::RecordingInfo, Reader), StreamError>
where
    F: AsyncEvents,
{
    let damaged = |e: gatehouse_recording::Error| StreamError::Damaged {
        id: id.to_owned(),
        message: e.to_string(),
    };
    let mut reader = Reader::new();
    let mut offset = 0u64;
    let mut info;
    loop {
        let r = client
            .read_recording(proto::ReadRecordingRequest {
                id: id.to_owned(),
                offset,
                max_bytes: READ_BYTES,
                join,
            })
            .await?
            .into_inner();
        info = r.info.unwrap_or_default();
        offset += r.data.len() as u64;
        reader.push(&r.data);
        loop {
            match reader.next_chunk() {
                Ok(Some(Chunk::Data { events, .. })) => {
                    let meta = reader.meta().cloned();
                    each.events(meta.as_ref(), &events)
                        .await
                        .map_err(StreamError::Sink)?;
                }
                Ok(Some(Chunk::Trailer(_))) => {}
                Ok(None) => break,
                Err(e) => return Err(damaged(e)),
            }
        }
        if offset < r.size && !r.data.is_empty() {
            continue;
        }
        if join && info.state == "live" {
            tokio::time::sleep(LIVE_POLL).await;
            continue;
        }
        break;
    }
    if info.state != "live" {
        reader.finish().map_err(damaged)?;
    }
    Ok((info, reader))
}
