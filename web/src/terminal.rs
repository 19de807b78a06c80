//! The web terminal: a WebSocket from the page to an ordinary SSH session through the proxy's
//! own port, as the user ([`crate::ssh::connect`]), so the agent authorizes, records and audits
//! it like any `ssh`. Frames: binary both ways is the terminal's bytes; text from the page is a
//! JSON control message (`{"type":"resize","cols":…,"rows":…}`); text to the page says how the
//! session ended (`{"type":"exit","code":…}` / `{"type":"error","message":…}`).
//!
//! Bounds: a frame is at most [`MAX_MESSAGE`] (the page sends a paste in pieces); resizes are
//! applied at most every [`RESIZE_EVERY`] (the last one wins), so a flood of them costs the
//! node nothing; input waits for the SSH channel's window (back-pressure to the browser).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::{SinkExt as _, StreamExt as _};
use russh::ChannelMsg;
use serde::Deserialize;
use serde_json::json;

use crate::api::{ApiError, session};
use crate::{App, guard};

/// Largest WebSocket message accepted from the page.
pub(crate) const MAX_MESSAGE: usize = 1024 * 1024;
/// Resizes reach the node at most this often.
pub(crate) const RESIZE_EVERY: Duration = Duration::from_millis(100);
/// Largest terminal accepted.
const MAX_DIM: u32 = 1000;

#[derive(Debug, Deserialize)]
pub(crate) struct TerminalQuery {
    node: String,
    login: String,
    #[serde(default = "default_cols")]
    cols: u32,
    #[serde(default = "default_rows")]
    rows: u32,
    csrf: Option<String>,
}

fn default_cols() -> u32 {
    80
}
fn default_rows() -> u32 {
    24
}

/// A control message from the page.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum Control {
    Resize { cols: u32, rows: u32 },
}

/// Parse a control message; a size is clamped to 1..=1000.
pub(crate) fn parse_control(text: &str) -> Result<Control, String> {
    if text.len() > 1024 {
        return Err("control message too long".into());
    }
    match serde_json::from_str::<Control>(text) {
        Ok(Control::Resize { cols, rows }) => Ok(Control::Resize {
            cols: cols.clamp(1, MAX_DIM),
            rows: rows.clamp(1, MAX_DIM),
        }),
        Err(e) => Err(format!("bad control message: {e}")),
    }
}

/// Rate-limits resizes, sans-IO: offer each size as it comes; one goes out at most every
/// [`RESIZE_EVERY`], and the last offered is never lost.
#[derive(Debug, Default)]
pub(crate) struct ResizeGate {
    last_sent: Option<Instant>,
    pending: Option<(u32, u32)>,
}

impl ResizeGate {
    /// A size from the page: returns it if it may go now, else keeps it for [`Self::due`].
    pub(crate) fn offer(&mut self, size: (u32, u32), now: Instant) -> Option<(u32, u32)> {
        match self.last_sent {
            Some(t) if now.duration_since(t) < RESIZE_EVERY => {
                self.pending = Some(size);
                None
            }
            _ => {
                self.last_sent = Some(now);
                self.pending = None;
                Some(size)
            }
        }
    }

    /// When the kept size may go (none kept: never).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.pending.and(self.last_sent).map(|t| t + RESIZE_EVERY)
    }

    /// The kept size, if its time has come.
    pub(crate) fn due(&mut self, now: Instant) -> Option<(u32, u32)> {
        match self.deadline() {
            Some(d) if now >= d => {
                self.last_sent = Some(now);
                self.pending.take()
            }
            _ => None,
        }
    }
}

pub(crate) async fn upgrade(
    State(app): State<Arc<App>>,
    Extension(browser): Extension<crate::api::ClientAddr>,
    headers: HeaderMap,
    Query(q): Query<TerminalQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let s = session(&app, &headers)?;
    guard::check_websocket(&headers, q.csrf.as_deref(), &s.csrf)?;
    let permit = Arc::clone(&app.terminals)
        .try_acquire_owned()
        .map_err(|_| ApiError::unavailable("too many web terminals open on this proxy"))?;
    Ok(ws
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            run(socket, app, s, q, browser.0).await;
            drop(permit);
        }))
}

async fn say(ws: &mut WebSocket, v: serde_json::Value) {
    let _ = ws.send(Message::Text(v.to_string().into())).await;
}

async fn run(
    mut ws: WebSocket,
    app: Arc<App>,
    s: Arc<crate::Session>,
    q: TerminalQuery,
    browser: std::net::SocketAddr,
) {
    let on_behalf = app
        .config
        .local_clients
        .as_ref()
        .map(|clients| crate::ssh::OnBehalf {
            clients: Arc::clone(clients),
            browser,
        });
    let handle = match crate::ssh::connect(
        app.config.proxy_addr,
        &s.creds.id,
        &q.node,
        &q.login,
        on_behalf.as_ref(),
    )
    .await
    {
        Ok(h) => h,
        Err(e) => {
            say(
                &mut ws,
                json!({ "type": "error", "message": e.to_string() }),
            )
            .await;
            return;
        }
    };
    let channel = match open_shell(&handle, &q).await {
        Ok(c) => c,
        Err(e) => {
            say(
                &mut ws,
                json!({ "type": "error", "message": format!("opening the shell: {e}") }),
            )
            .await;
            return;
        }
    };
    let (mut read, write) = channel.split();
    let (mut to_page, mut from_page) = ws.split();
    // Page → node, in a task of its own: input waits for the channel's window without holding
    // up the output.
    let mut input = tokio::spawn(async move {
        let mut gate = ResizeGate::default();
        let gone: Option<String> = loop {
            let sleep = gate.deadline().map(tokio::time::Instant::from_std);
            let msg = tokio::select! {
                m = from_page.next() => m,
                () = async {
                    match sleep {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some((cols, rows)) = gate.due(Instant::now()) {
                        let _ = write.window_change(cols, rows, 0, 0).await;
                    }
                    continue;
                }
            };
            match msg {
                Some(Ok(Message::Binary(b))) => {
                    if write.data_bytes(b).await.is_err() {
                        break None;
                    }
                }
                Some(Ok(Message::Text(t))) => match parse_control(t.as_str()) {
                    Ok(Control::Resize { cols, rows }) => {
                        if let Some((c, r)) = gate.offer((cols, rows), Instant::now()) {
                            let _ = write.window_change(c, r, 0, 0).await;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "web terminal: control message ignored");
                    }
                },
                Some(Ok(Message::Close(_))) | None => break None,
                Some(Err(e)) => break Some(format!("the terminal's connection: {e}")),
                Some(Ok(_)) => {}
            }
        };
        let _ = write.eof().await;
        let _ = write.close().await;
        gone
    });
    // Node → page, until the session ends or the page goes (closed, or sent what it may not):
    // then the SSH connection is closed, which ends the session on the node.
    let mut exit = None;
    let mut page_gone = None;
    loop {
        let msg = tokio::select! {
            m = read.wait() => m,
            why = &mut input => {
                page_gone = Some(why.ok().flatten());
                break;
            }
        };
        match msg {
            Some(ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. })
                if to_page
                    .send(Message::Binary(bytes::Bytes::copy_from_slice(&data)))
                    .await
                    .is_err() =>
            {
                break;
            }
            Some(ChannelMsg::ExitStatus { exit_status }) => exit = Some(exit_status),
            Some(ChannelMsg::Close) | None => break,
            Some(_) => {}
        }
    }
    let end = match page_gone {
        Some(Some(why)) => json!({ "type": "error", "message": why }),
        _ => json!({ "type": "exit", "code": exit }),
    };
    let _ = to_page.send(Message::Text(end.to_string().into())).await;
    let _ = to_page.close().await;
    input.abort();
    let _ = handle
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
}

async fn open_shell(
    handle: &crate::ssh::Handle,
    q: &TerminalQuery,
) -> Result<russh::Channel<russh::client::Msg>, russh::Error> {
    let channel = handle.channel_open_session().await?;
    channel
        .request_pty(
            false,
            "xterm-256color",
            q.cols.clamp(1, MAX_DIM),
            q.rows.clamp(1, MAX_DIM),
            0,
            0,
            &[],
        )
        .await?;
    channel.request_shell(false).await?;
    Ok(channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_resizes_sends_one_per_period_and_keeps_the_last() {
        let t0 = Instant::now();
        let mut g = ResizeGate::default();
        assert_eq!(g.offer((80, 24), t0), Some((80, 24)));
        let mut sent = 1;
        // 10,000 resizes within 50 ms: none goes, the last is kept.
        for i in 0..10_000u32 {
            let at = t0 + Duration::from_micros(u64::from(i) * 5);
            if g.offer((100 + i % 7, 30), at).is_some() {
                sent += 1;
            }
        }
        assert_eq!(sent, 1);
        let last = (100 + 9_999 % 7, 30);
        assert_eq!(g.deadline(), Some(t0 + RESIZE_EVERY));
        assert_eq!(g.due(t0 + Duration::from_millis(99)), None);
        assert_eq!(g.due(t0 + RESIZE_EVERY), Some(last));
        assert_eq!(g.deadline(), None);
        assert_eq!(g.due(t0 + Duration::from_secs(5)), None);
    }

    #[test]
    fn control_messages_are_checked_and_clamped() {
        assert_eq!(
            parse_control(r#"{"type":"resize","cols":120,"rows":40}"#),
            Ok(Control::Resize {
                cols: 120,
                rows: 40
            })
        );
        assert_eq!(
            parse_control(r#"{"type":"resize","cols":0,"rows":99999}"#),
            Ok(Control::Resize {
                cols: 1,
                rows: 1000
            })
        );
        assert!(parse_control(r#"{"type":"resize","cols":-1,"rows":2}"#).is_err());
        assert!(parse_control("not json").is_err());
        assert!(parse_control(r#"{"type":"reboot"}"#).is_err());
        assert!(parse_control(&"x".repeat(5000)).is_err());
    }
}
