//! Recordings for the page, as asciicast v2 (the same encoder as `gsh recordings export`):
//! `GET /v1/webapi/recordings/{id}/cast` streams a recording as it is read from Auth (the player
//! starts on the first lines, and the file plays in `asciinema` too); `/v1/webapi/ws/join` sends
//! a live session's lines as they happen, as `gsh join` shows them (Auth audits the join and
//! tells the participants).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use gatehouse_controlplane::recording_stream::{self, AsyncEvents, SinkError, StreamError};
use gatehouse_recording::export::Asciicast;
use gatehouse_recording::{SessionMeta, Timed};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::api::{ApiError, session};
use crate::{App, guard};

/// Lines in flight to a slow reader, at most (back-pressure on the read from Auth).
const LINES_IN_FLIGHT: usize = 64;

/// Encodes events to asciicast lines and hands them to `send`.
struct CastSink<F> {
    enc: Option<Asciicast>,
    send: F,
}

impl<F, Fut> AsyncEvents for CastSink<F>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    async fn events(
        &mut self,
        meta: Option<&SessionMeta>,
        events: &[Timed],
    ) -> Result<(), SinkError> {
        let enc = match &mut self.enc {
            Some(e) => e,
            None => {
                let meta = meta.ok_or("the recording has no session start")?;
                if !(self.send)(Asciicast::header(meta)).await {
                    return Err("the reader went away".into());
                }
                self.enc.insert(Asciicast::new(meta))
            }
        };
        for t in events {
            if let Some(line) = enc.event(t)
                && !(self.send)(line).await
            {
                return Err("the reader went away".into());
            }
        }
        Ok(())
    }
}

fn valid_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.len() > 128
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(ApiError::bad_request("not a recording id"));
    }
    Ok(())
}

pub(crate) async fn cast(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    valid_id(&id)?;
    let s = session(&app, &headers)?;
    let mut client = app.client(&s).await?;
    // The first read answers whether the user may see it (and whether it exists) with a status.
    let first = client
        .read_recording(gatehouse_controlplane::proto::ReadRecordingRequest {
            id: id.clone(),
            offset: 0,
            max_bytes: 1,
            join: false,
        })
        .await
        .map_err(|e| ApiError::from_status(&e))?;
    drop(first);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(LINES_IN_FLIGHT);
    tokio::spawn(async move {
        let tx2 = tx.clone();
        let sink = CastSink {
            enc: None,
            send: move |line: String| {
                let tx = tx2.clone();
                async move { tx.send(Ok(Bytes::from(line))).await.is_ok() }
            },
        };
        if let Err(e) = recording_stream::stream(&mut client, &id, false, sink).await {
            let msg = match e {
                StreamError::Sink(_) => return,
                e => e.to_string(),
            };
            let _ = tx.send(Err(std::io::Error::other(msg))).await;
        }
    });
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let mut resp = body.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-asciicast"),
    );
    Ok(resp)
}

#[derive(Debug, Deserialize)]
pub(crate) struct JoinQuery {
    id: String,
    csrf: Option<String>,
}

pub(crate) async fn join(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<JoinQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    valid_id(&q.id)?;
    let s = session(&app, &headers)?;
    guard::check_websocket(&headers, q.csrf.as_deref(), &s.csrf)?;
    let client = app.client(&s).await?;
    Ok(ws
        .max_message_size(4096)
        .on_upgrade(move |socket| watch(socket, client, q.id)))
}

async fn watch(ws: WebSocket, mut client: gatehouse_controlplane::client::Client, id: String) {
    let ws = Arc::new(tokio::sync::Mutex::new(ws));
    let out = Arc::clone(&ws);
    let sink = CastSink {
        enc: None,
        send: move |line: String| {
            let out = Arc::clone(&out);
            async move {
                out.lock()
                    .await
                    .send(Message::Text(line.into()))
                    .await
                    .is_ok()
            }
        },
    };
    let end = match recording_stream::stream(&mut client, &id, true, sink).await {
        Ok((info, _)) => serde_json::json!({ "type": "end", "state": info.state }),
        Err(StreamError::Sink(_)) => return,
        Err(StreamError::Rpc(s)) => serde_json::json!({ "type": "error", "message": s.message() }),
        Err(e) => serde_json::json!({ "type": "error", "message": e.to_string() }),
    };
    let mut ws = ws.lock().await;
    let _ = ws.send(Message::Text(end.to_string().into())).await;
    let _ = ws.send(Message::Close(None)).await;
}
