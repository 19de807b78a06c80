//! Session recordings for `gsh` and `gctl`: list, play in the terminal, export (asciicast v2,
//! text), verify, and watch a live session. Every read streams: chunks are decoded as they
//! arrive from Auth, so playback starts at once whatever the recording's size.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use gatehouse_controlplane::client::Client;
use gatehouse_controlplane::proto;
use gatehouse_controlplane::recording_stream::{self, AsyncEvents, SinkError, StreamError};
use gatehouse_recording::export::{Asciicast, Text};
use gatehouse_recording::play::{PlayOptions, Player, Step};
use gatehouse_recording::{SessionMeta, Timed};

use crate::{fmt_time, print_table, rpc_error};

/// `gsh recordings ls` / `gctl recordings ls`.
pub async fn ls(
    client: &mut Client,
    user: Option<String>,
    node: Option<String>,
    since: Option<Duration>,
    live: bool,
    format: &str,
) -> anyhow::Result<()> {
    let since_unix_ms = since.map_or(0, |d| {
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        i64::try_from(now).unwrap_or(0) - i64::try_from(d.as_millis()).unwrap_or(0)
    });
    let list = client
        .list_recordings(proto::ListRecordingsRequest {
            user: user.unwrap_or_default(),
            node: node.unwrap_or_default(),
            since_unix_ms,
            limit: 0,
            live,
        })
        .await
        .map_err(rpc_error)?
        .into_inner()
        .recordings;
    if format == "json" {
        let v: Vec<_> = list
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id, "user": r.user, "login": r.login, "node": r.node,
                    "kind": r.kind, "command": r.command, "started_unix_ms": r.started_unix_ms,
                    "duration_ms": r.duration_ms, "state": r.state, "bytes": r.bytes,
                    "reason": r.reason,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                fmt_time(r.started_unix_ms / 1000),
                humantime::format_duration(Duration::from_secs(r.duration_ms / 1000)).to_string(),
                r.user.clone(),
                format!("{}@{}", r.login, r.node),
                if r.command.is_empty() {
                    r.kind.clone()
                } else {
                    r.command.clone()
                },
                r.state.clone(),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "STARTED",
            "DURATION",
            "USER",
            "LOGIN@NODE",
            "SESSION",
            "STATE",
        ],
        &rows,
    );
    Ok(())
}

/// [`recording_stream::stream`] with Auth's refusals worded as the CLI words them.
async fn stream<F: AsyncEvents>(
    client: &mut Client,
    id: &str,
    join: bool,
    each: F,
) -> anyhow::Result<(proto::RecordingInfo, gatehouse_recording::Reader)> {
    recording_stream::stream(client, id, join, each)
        .await
        .map_err(|e| match e {
            StreamError::Rpc(s) => rpc_error(s),
            e => anyhow::anyhow!(e),
        })
}

/// Plays events to the terminal with their timing.
struct Play {
    player: Player,
    out: std::io::Stdout,
}

impl AsyncEvents for Play {
    async fn events(
        &mut self,
        _meta: Option<&SessionMeta>,
        events: &[Timed],
    ) -> Result<(), SinkError> {
        for t in events {
            let Some(step) = self.player.step(t) else {
                continue;
            };
            match step {
                Step::Print { wait_ms, bytes } => {
                    if wait_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                    }
                    let mut out = self.out.lock();
                    out.write_all(bytes)?;
                    out.flush()?;
                }
                Step::Resize { wait_ms, .. } | Step::Joined { wait_ms, .. } => {
                    if wait_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                    }
                }
            }
        }
        Ok(())
    }
}

/// `gsh play ID`: in the terminal, at once, with the recording's timing.
pub async fn play(client: &mut Client, id: &str, opts: PlayOptions) -> anyhow::Result<()> {
    let play = Play {
        player: Player::new(opts),
        out: std::io::stdout(),
    };
    let (info, _) = stream(client, id, false, play).await?;
    if info.state == "incomplete" {
        eprintln!("\r\ngsh: recording {id} is incomplete: {}", info.reason);
    }
    Ok(())
}

/// `gsh join ID`: the live output of a session as it happens (read-only).
pub async fn watch(client: &mut Client, id: &str) -> anyhow::Result<()> {
    let play = Play {
        player: Player::new(PlayOptions {
            // What happened before joining is printed at once; from here, as it comes.
            speed: 1.0,
            skip_idle: true,
            from_ms: u64::MAX,
        }),
        out: std::io::stdout(),
    };
    let (info, _) = stream(client, id, true, play).await?;
    eprintln!("\r\ngsh: session {id} ended ({})", info.state);
    Ok(())
}

enum Format {
    Asciicast(Option<Asciicast>),
    Text(Text),
}

struct Export<W: Write> {
    format: Format,
    out: W,
}

impl<W: Write> AsyncEvents for Export<W> {
    async fn events(
        &mut self,
        meta: Option<&SessionMeta>,
        events: &[Timed],
    ) -> Result<(), SinkError> {
        match &mut self.format {
            Format::Asciicast(enc) => {
                let enc = match enc {
                    Some(e) => e,
                    None => {
                        let meta = meta.context("the recording has no session start")?;
                        self.out.write_all(Asciicast::header(meta).as_bytes())?;
                        enc.insert(Asciicast::new(meta))
                    }
                };
                for t in events {
                    if let Some(line) = enc.event(t) {
                        self.out.write_all(line.as_bytes())?;
                    }
                }
            }
            Format::Text(enc) => {
                for t in events {
                    self.out.write_all(&enc.event(t))?;
                }
            }
        }
        Ok(())
    }
}

/// `gsh recordings export ID --format asciicast|text [-o FILE]`.
pub async fn export(
    client: &mut Client,
    id: &str,
    format: &str,
    output: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let format = match format {
        "asciicast" | "cast" => Format::Asciicast(None),
        "text" | "txt" => Format::Text(Text::default()),
        other => bail!("--format {other}: use asciicast or text"),
    };
    let out: Box<dyn Write> = match output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let mut export = Export { format, out };
    let (info, _) = stream(client, id, false, &mut export).await?;
    export.out.flush()?;
    if info.state == "incomplete" {
        eprintln!("gsh: recording {id} is incomplete: {}", info.reason);
    }
    Ok(())
}

struct Discard;

impl AsyncEvents for Discard {
    async fn events(&mut self, _: Option<&SessionMeta>, _: &[Timed]) -> Result<(), SinkError> {
        Ok(())
    }
}

/// `gctl recordings verify ID`: every chunk's checksum and order, the digest, and the recording
/// agent's signature against the cluster's host CA.
pub async fn verify(client: &mut Client, id: &str) -> anyhow::Result<()> {
    let (info, reader) = stream(client, id, false, Discard).await?;
    if info.state == "live" {
        bail!("recording {id} is still being recorded; verify it once the session has ended");
    }
    let host_ca = client
        .export_authorities(proto::ExportAuthoritiesRequest {
            r#type: "host".into(),
        })
        .await
        .map_err(rpc_error)?
        .into_inner()
        .text;
    let cas: Vec<ssh_key::PublicKey> = host_ca
        .lines()
        .filter_map(|l| {
            // `@cert-authority * <key> <comment>`
            let key = l
                .split_whitespace()
                .skip(2)
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            ssh_key::PublicKey::from_openssh(&key).ok()
        })
        .collect();
    if cas.is_empty() {
        bail!("Auth returned no host CA key to verify against");
    }
    let (Some(meta), Some(trailer)) = (reader.meta(), reader.trailer()) else {
        bail!("recording {id}: no session start or no trailer");
    };
    let signer = gatehouse_recording::verify_trailer(meta, trailer, &cas)
        .map_err(|e| anyhow::anyhow!("recording {id}: {e}"))?;
    println!(
        "recording {id}: OK — {} chunks, {} bytes, sha256 {}, signed by host {signer} ({}); {}",
        trailer.chunks,
        trailer.data_bytes,
        trailer.sha256,
        meta.node,
        if trailer.complete {
            "complete".to_string()
        } else {
            format!("INCOMPLETE: {}", trailer.reason.clone().unwrap_or_default())
        }
    );
    Ok(())
}
