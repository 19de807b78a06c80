//! A running session: the child process, its I/O pumps, signals and the end-of-session report.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use russh::server::Msg;
use russh::{ChannelId, ChannelWriteHalf, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{Notify, mpsc, watch};

use super::SshNode;
use super::process::{LoginUser, Program, build_command, session_env};
use super::signals::{sig_name, signal_from_ssh, signal_to_ssh};
use crate::recording::SessionRecording;
use gatehouse_recording::{EndInfo, Event, SessionKind, SessionMeta, Stream as RecStream};

/// Client input queued for the child beyond this many bytes stalls the connection until the
/// child reads (russh re-opens the receive window by itself, so this is the only brake).
const MAX_QUEUED_INPUT: usize = 16 * 1024 * 1024;
/// After a PTY session's process exits, how long to wait for the rest of its output.
const PTY_DRAIN: Duration = Duration::from_secs(2);
/// After a hang-up, how long a session has to exit before it is killed.
const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// A `pty-req`, remembered until the shell or command starts.
#[derive(Debug, Clone)]
pub(crate) struct PtyParams {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
}

fn pty_size(cols: u32, rows: u32) -> pty_process::Size {
    let clamp = |v: u32, default: u16| match u16::try_from(v) {
        Ok(0) | Err(_) => default,
        Ok(v) => v,
    };
    pty_process::Size::new(clamp(rows, 24), clamp(cols, 80))
}

enum Input {
    Data(Bytes),
    Resize(pty_process::Size),
}

#[derive(Default)]
struct InputBudget {
    queued: AtomicUsize,
    drained: Notify,
}

/// Who and what, for the audit trail.
#[derive(Debug, Clone)]
pub(crate) struct SessionInfo {
    pub key_id: String,
    pub login: String,
    pub source_addr: String,
    pub session_id: String,
}

/// A started session. Dropping it (channel closed, connection gone) hangs the session up.
pub(crate) struct Running {
    input: Option<mpsc::UnboundedSender<Input>>,
    /// The child's stdin pipe (not with a PTY), written straight from the client's data while
    /// nothing is queued: no copy, no hand-off to the pump. The pump holds it too, for what
    /// had to be queued; the child sees EOF once both let go.
    stdin: Option<Arc<pipe::Sender>>,
    budget: Arc<InputBudget>,
    pgid: Option<Pid>,
    exited: Arc<AtomicBool>,
    /// Set once the pump has reported the end and closed the channel.
    done: Arc<AtomicBool>,
    has_pty: bool,
    bytes_in: Arc<AtomicU64>,
    recording: Option<Arc<SessionRecording>>,
    _hangup: watch::Sender<()>,
}

impl Running {
    /// Hand client data to the child's input: straight into its stdin pipe as far as the pipe
    /// takes it while nothing is queued (only this task queues, so order holds), and the rest
    /// queued for the pump.
    pub async fn send_data(&self, data: &[u8]) {
        self.bytes_in
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let Some(tx) = &self.input else {
            return;
        };
        let mut rest = data;
        if let Some(stdin) = &self.stdin
            && self.budget.queued.load(Ordering::Acquire) == 0
        {
            while !rest.is_empty() {
                match stdin.try_write(rest) {
                    Ok(n) => rest = rest.get(n..).unwrap_or_default(),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    // The child closed its input: what it will not read is dropped, as before.
                    Err(_) => return,
                }
            }
            if rest.is_empty() {
                return;
            }
        }
        self.budget.queued.fetch_add(rest.len(), Ordering::AcqRel);
        if tx.send(Input::Data(Bytes::copy_from_slice(rest))).is_err() {
            return;
        }
        while self.budget.queued.load(Ordering::Acquire) > MAX_QUEUED_INPUT && !tx.is_closed() {
            let drained = self.budget.drained.notified();
            let _ = tokio::time::timeout(Duration::from_millis(200), drained).await;
        }
    }

    /// The client will send no more input: close the child's stdin. A terminal has no EOF of its
    /// own (the client sends ^D as data), so a PTY session ignores it.
    pub fn eof(&mut self) {
        if !self.has_pty {
            self.input = None;
            self.stdin = None;
        }
    }

    pub fn resize(&self, cols: u32, rows: u32) -> bool {
        if let Some(rec) = &self.recording
            && self.has_pty
        {
            rec.record(&Event::Resize { cols, rows });
        }
        match &self.input {
            Some(tx) if self.has_pty => tx.send(Input::Resize(pty_size(cols, rows))).is_ok(),
            _ => false,
        }
    }

    /// The session ended and its channel was closed from this side. russh does not tell the
    /// handler when the client confirms that close, so the handler prunes finished sessions.
    pub fn finished(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Forward a signal to the session's process group.
    pub fn signal(&self, sig: &Sig) -> Result<(), String> {
        let Some(signal) = signal_from_ssh(sig) else {
            return Err(format!("unknown signal {sig:?}"));
        };
        if self.exited.load(Ordering::Acquire) {
            return Err("the session has exited".into());
        }
        let pgid = self.pgid.ok_or("the session has no process group")?;
        nix::sys::signal::killpg(pgid, signal).map_err(|e| e.to_string())
    }
}

/// Everything a session needs to start.
pub(crate) struct StartRequest<'a> {
    pub node: Arc<SshNode>,
    pub info: SessionInfo,
    pub user: &'a LoginUser,
    pub program: Program,
    pub pty: Option<&'a PtyParams>,
    pub client_env: &'a [(String, String)],
    pub write: ChannelWriteHalf<Msg>,
    pub handle: russh::server::Handle,
    pub channel: ChannelId,
}

enum ChildIo {
    Pipes {
        stdin: Option<Arc<pipe::Sender>>,
        stdout: Option<tokio::process::ChildStdout>,
        stderr: Option<tokio::process::ChildStderr>,
    },
    Pty(pty_process::Pty),
}

/// Start recording a shell or exec session (subsystems are audited, not recorded). The error
/// says why the session may not start.
fn begin_recording(req: &StartRequest<'_>) -> Result<Option<Arc<SessionRecording>>, String> {
    let Some(recs) = &req.node.recordings else {
        return Ok(None);
    };
    let command = match &req.program {
        Program::Shell => None,
        Program::Exec(c) => Some(String::from_utf8_lossy(c).into_owned()),
        Program::Subsystem { .. } => return Ok(None),
    };
    let meta = SessionMeta {
        id: req.info.session_id.clone(),
        cluster: req.node.config.cluster.clone(),
        user: req.info.key_id.clone(),
        login: req.info.login.clone(),
        node: req.node.config.node_name.clone(),
        node_id: req.node.config.host_cert.key_id().to_owned(),
        kind: if req.pty.is_some() {
            SessionKind::Interactive
        } else {
            SessionKind::Exec
        },
        command,
        term: req.pty.map(|p| p.term.clone()),
        cols: req.pty.map_or(0, |p| p.cols),
        rows: req.pty.map_or(0, |p| p.rows),
        started_unix_ms: crate::recording::now_ms(),
        source_addr: req.info.source_addr.clone(),
    };
    recs.begin(meta)
        .map_err(|e| format!("the session was not started: its recording cannot be written ({e})"))
}

/// Why a session did not start.
#[derive(Debug)]
pub(crate) enum StartError {
    /// The request cannot be served (no PTY, no such program): the request fails.
    Failed(String),
    /// The session may not run (its recording cannot be written): the request is accepted and
    /// the session ends at once with this on the client's stderr and exit status 254, so the
    /// user reads why (OpenSSH prints nothing of a failed request's data).
    Refused(String),
}

/// Spawn the session's process and its pumps.
pub(crate) fn start(req: StartRequest<'_>) -> Result<Running, StartError> {
    let recording = begin_recording(&req).map_err(StartError::Refused)?;
    start_recorded(req, recording).map_err(StartError::Failed)
}

/// [`start`] once the recording (if any) has begun. The error is a reason fit for the client's log.
fn start_recorded(
    req: StartRequest<'_>,
    recording: Option<Arc<SessionRecording>>,
) -> Result<Running, String> {
    let term = req.pty.map(|p| p.term.as_str());
    let env = session_env(req.user, term, req.client_env, &req.info.session_id);
    let mut cmd = build_command(req.user, &req.program, &env)?;
    let (mut child, io) = match req.pty {
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
            let mut child = cmd.spawn().map_err(|e| format!("could not start: {e}"))?;
            let stdin = match child.stdin.take() {
                Some(stdin) => {
                    let fd = stdin
                        .into_owned_fd()
                        .map_err(|e| format!("could not set up the process's input: {e}"))?;
                    widen_pipe(&fd);
                    Some(Arc::new(pipe::Sender::from_owned_fd(fd).map_err(|e| {
                        format!("could not set up the process's input: {e}")
                    })?))
                }
                None => None,
            };
            let io = ChildIo::Pipes {
                stdin: stdin.clone(),
                stdout: child.stdout.take(),
                stderr: child.stderr.take(),
            };
            (child, io)
        }
        Some(params) => {
            let (pty, pts) =
                pty_process::open().map_err(|e| format!("could not allocate a PTY: {e}"))?;
            pty.resize(pty_size(params.cols, params.rows))
                .map_err(|e| format!("could not size the PTY: {e}"))?;
            if req.user.switch {
                std::os::unix::fs::fchown(&pts, Some(req.user.uid), None)
                    .map_err(|e| format!("could not hand the PTY to the login user: {e}"))?;
            }
            // pty-process makes the child a session leader with the PTY as controlling terminal.
            let child = pty_process::Command::from(cmd)
                .spawn(pts)
                .map_err(|e| format!("could not start: {e}"))?;
            (child, ChildIo::Pty(pty))
        }
    };
    let pgid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw);
    audit_start(&req.node, &req.info, &req.program, req.pty.is_some());
    let (input_tx, input_rx) = mpsc::unbounded_channel();
    let (hangup_tx, hangup_rx) = watch::channel(());
    let budget = Arc::new(InputBudget::default());
    let exited = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let bytes_in = Arc::new(AtomicU64::new(0));
    let has_pty = matches!(io, ChildIo::Pty(_));
    let pump = Pump {
        node: req.node,
        info: req.info,
        write: req.write,
        handle: req.handle,
        channel: req.channel,
        pgid,
        exited: exited.clone(),
        done: done.clone(),
        bytes_in: bytes_in.clone(),
        hangup: hangup_rx,
        started: tokio::time::Instant::now(),
        recording: recording.clone(),
    };
    let budget_for_pump = budget.clone();
    let stdin = match &io {
        ChildIo::Pipes { stdin, .. } => stdin.clone(),
        ChildIo::Pty(_) => None,
    };
    tokio::spawn(async move {
        pump.run(&mut child, io, input_rx, budget_for_pump).await;
    });
    Ok(Running {
        input: Some(input_tx),
        stdin,
        budget,
        pgid,
        exited,
        done,
        has_pty,
        bytes_in,
        recording,
        _hangup: hangup_tx,
    })
}

/// `session.start` (and `exec`): emitted once the process runs, before its pump can end it.
fn audit_start(node: &SshNode, info: &SessionInfo, program: &Program, tty: bool) {
    tracing::info!(
        user = %info.key_id,
        login = %info.login,
        session_id = %info.session_id,
        source_addr = %info.source_addr,
        tty,
        "ssh: session started"
    );
    node.audit.emit(
        "session.start",
        &info.key_id,
        serde_json::json!({
            "user": info.key_id,
            "login": info.login,
            "node": node.config.node_name,
            "source_addr": info.source_addr,
            "session_id": info.session_id,
            "tty": tty,
        }),
    );
    if let Program::Subsystem { name, .. } = program {
        node.audit.emit(
            "subsystem",
            &info.key_id,
            serde_json::json!({
                "user": info.key_id,
                "login": info.login,
                "node": node.config.node_name,
                "source_addr": info.source_addr,
                "session_id": info.session_id,
                "subsystem": name,
            }),
        );
    }
    if let Program::Exec(command) = program {
        node.audit.emit(
            "exec",
            &info.key_id,
            serde_json::json!({
                "user": info.key_id,
                "login": info.login,
                "node": node.config.node_name,
                "source_addr": info.source_addr,
                "session_id": info.session_id,
                "command": String::from_utf8_lossy(command),
            }),
        );
    }
}

struct Pump {
    node: Arc<SshNode>,
    info: SessionInfo,
    write: ChannelWriteHalf<Msg>,
    handle: russh::server::Handle,
    channel: ChannelId,
    pgid: Option<Pid>,
    exited: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    bytes_in: Arc<AtomicU64>,
    hangup: watch::Receiver<()>,
    started: tokio::time::Instant,
    recording: Option<Arc<SessionRecording>>,
}

/// Resolves when the session's recording failed and the cluster ends such sessions.
async fn refused(rec: Option<&SessionRecording>) -> String {
    match rec {
        Some(r) => r.refused().await,
        None => std::future::pending().await,
    }
}

/// Resolves once the session's [`Running`] is dropped.
async fn hung_up(rx: &mut watch::Receiver<()>) {
    while rx.changed().await.is_ok() {}
}

fn signal_group(pgid: Option<Pid>, signal: Signal) {
    if let Some(pgid) = pgid {
        let _ = nix::sys::signal::killpg(pgid, signal);
    }
}

async fn copy_out<R, W>(
    mut from: R,
    mut to: W,
    counter: Arc<AtomicU64>,
    rec: Option<(Arc<SessionRecording>, RecStream)>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 32 * 1024];
    let mut open = true;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if let Some((rec, stream)) = &rec
            && let Some(chunk) = buf.get(..n)
        {
            rec.record_data(*stream, chunk);
        }
        // Once the channel is gone keep reading (and discarding) so the child never blocks.
        if open
            && let Some(chunk) = buf.get(..n)
            && to.write_all(chunk).await.is_err()
        {
            open = false;
        }
    }
}

/// The child's stdin pipe holds this much: a bulk upload then wakes the reader once per many
/// packets instead of once per 32 KiB packet, and the reader takes bigger reads.
const STDIN_PIPE_SIZE: i32 = 1 << 20;

/// Enlarge a pipe to [`STDIN_PIPE_SIZE`]; where the system's limits refuse (an unprivileged
/// agent past `fs.pipe-user-pages-soft`), it keeps the default size.
fn widen_pipe(fd: &std::os::fd::OwnedFd) {
    if let Err(e) = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(STDIN_PIPE_SIZE)) {
        tracing::debug!("ssh: the session's input pipe keeps its default size: {e}");
    }
}

/// Write all of `data` to a pipe shared with the session's handler.
async fn write_all_shared(stdin: &pipe::Sender, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        stdin.writable().await?;
        match stdin.try_write(data) {
            Ok(n) => data = data.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn copy_in_pipe(
    stdin: Arc<pipe::Sender>,
    mut rx: mpsc::UnboundedReceiver<Input>,
    budget: Arc<InputBudget>,
) {
    while let Some(msg) = rx.recv().await {
        if let Input::Data(data) = msg {
            let ok = write_all_shared(&stdin, &data).await.is_ok();
            budget.queued.fetch_sub(data.len(), Ordering::AcqRel);
            budget.drained.notify_waiters();
            if !ok {
                break;
            }
        }
    }
    // Dropping stdin here is the child's EOF.
}

async fn copy_in_pty(
    mut pty: pty_process::OwnedWritePty,
    mut rx: mpsc::UnboundedReceiver<Input>,
    budget: Arc<InputBudget>,
) {
    let mut open = true;
    while let Some(msg) = rx.recv().await {
        match msg {
            Input::Data(data) => {
                if open {
                    open = pty.write_all(&data).await.is_ok();
                }
                budget.queued.fetch_sub(data.len(), Ordering::AcqRel);
                budget.drained.notify_waiters();
            }
            Input::Resize(size) => {
                let _ = pty.resize(size);
            }
        }
    }
}

impl Pump {
    async fn run(
        mut self,
        child: &mut tokio::process::Child,
        io: ChildIo,
        input: mpsc::UnboundedReceiver<Input>,
        budget: Arc<InputBudget>,
    ) {
        let bytes_out = Arc::new(AtomicU64::new(0));
        let mut outputs = Vec::new();
        let is_pty = matches!(io, ChildIo::Pty(_));
        match io {
            ChildIo::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                if let Some(stdin) = stdin {
                    tokio::spawn(copy_in_pipe(stdin, input, budget));
                }
                if let Some(stdout) = stdout {
                    let w = self.write.make_writer();
                    let rec = self.recording.clone().map(|r| (r, RecStream::Stdout));
                    outputs.push(tokio::spawn(copy_out(stdout, w, bytes_out.clone(), rec)));
                }
                if let Some(stderr) = stderr {
                    let w = self.write.make_writer_ext(Some(1));
                    let rec = self.recording.clone().map(|r| (r, RecStream::Stderr));
                    outputs.push(tokio::spawn(copy_out(stderr, w, bytes_out.clone(), rec)));
                }
            }
            ChildIo::Pty(pty) => {
                let (reader, writer) = pty.into_split();
                tokio::spawn(copy_in_pty(writer, input, budget));
                let w = self.write.make_writer();
                let rec = self.recording.clone().map(|r| (r, RecStream::Output));
                outputs.push(tokio::spawn(copy_out(reader, w, bytes_out.clone(), rec)));
            }
        }

        if let Some(rec) = &self.recording {
            // Lines for the participants (who joined to watch) go to the terminal's stderr.
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            rec.set_notices(tx);
            let mut w = self.write.make_writer_ext(Some(1));
            tokio::spawn(async move {
                while let Some(line) = rx.recv().await {
                    if w.write_all(line.as_bytes()).await.is_err() {
                        break;
                    }
                    let _ = w.flush().await;
                }
            });
        }
        let mut hung_up_early = false;
        let mut ended_because = None;
        let recording = self.recording.clone();
        let status = tokio::select! {
            s = child.wait() => s.ok(),
            () = hung_up(&mut self.hangup) => {
                hung_up_early = true;
                self.hang_up(child).await
            }
            why = refused(recording.as_deref()) => {
                let message = format!("\r\ngatehouse: this session is ended: its recording cannot be written ({why})\r\n");
                let _ = self.write.make_writer_ext(Some(1)).write_all(message.as_bytes()).await;
                tracing::warn!(session_id = %self.info.session_id, reason = %why, "ssh: session ended: recording failed (on_failure = refuse)");
                ended_because = Some(format!("its recording cannot be written ({why})"));
                self.hang_up(child).await
            }
        };
        self.exited.store(true, Ordering::Release);

        // The rest of the output: pipes until every holder closes them (as sshd does); a PTY
        // until it reports the terminal gone, bounded for background holders.
        if !hung_up_early {
            let drain = async {
                for out in &mut outputs {
                    let _ = out.await;
                }
            };
            tokio::select! {
                () = drain => {}
                () = hung_up(&mut self.hangup) => hung_up_early = true,
                () = tokio::time::sleep(PTY_DRAIN), if is_pty => {}
            }
        }
        for out in &outputs {
            out.abort();
        }

        if !hung_up_early {
            self.report_exit(status).await;
        }
        if let Some(rec) = &self.recording {
            rec.finish(EndInfo {
                exit_status: status
                    .and_then(|s| s.code())
                    .and_then(|c| u32::try_from(c).ok()),
                exit_signal: status
                    .and_then(|s| s.signal())
                    .map(|s| sig_name(&signal_to_ssh(s))),
                reason: ended_because,
                ended_unix_ms: crate::recording::now_ms(),
            });
        }
        self.done.store(true, Ordering::Release);
        self.audit_end(status, bytes_out.load(Ordering::Relaxed));
    }

    /// The channel or connection went away: SIGHUP the process group, then SIGKILL it.
    async fn hang_up(&self, child: &mut tokio::process::Child) -> Option<ExitStatus> {
        signal_group(self.pgid, Signal::SIGHUP);
        if let Ok(Ok(status)) = tokio::time::timeout(HANGUP_GRACE, child.wait()).await {
            return Some(status);
        }
        signal_group(self.pgid, Signal::SIGKILL);
        let _ = child.start_kill();
        tokio::time::timeout(HANGUP_GRACE, child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    async fn report_exit(&self, status: Option<ExitStatus>) {
        let _ = self.write.eof().await;
        match status {
            Some(s) => {
                if let Some(code) = s.code() {
                    let _ = self
                        .write
                        .exit_status(u32::try_from(code).unwrap_or(255))
                        .await;
                } else if let Some(sig) = s.signal() {
                    let _ = self
                        .handle
                        .exit_signal_request(
                            self.channel,
                            signal_to_ssh(sig),
                            s.core_dumped(),
                            String::new(),
                            "en".into(),
                        )
                        .await;
                }
            }
            None => {
                let _ = self.write.exit_status(255).await;
            }
        }
        let _ = self.write.close().await;
    }

    fn audit_end(&self, status: Option<ExitStatus>, bytes_out: u64) {
        let exit_code = status.and_then(|s| s.code());
        let exit_signal = status
            .and_then(|s| s.signal())
            .map(|s| sig_name(&signal_to_ssh(s)));
        let duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        tracing::info!(
            user = %self.info.key_id,
            login = %self.info.login,
            session_id = %self.info.session_id,
            ?exit_code,
            ?exit_signal,
            bytes_in,
            bytes_out,
            duration_ms,
            "ssh: session ended"
        );
        self.node.audit.emit(
            "session.end",
            &self.info.key_id,
            serde_json::json!({
                "user": self.info.key_id,
                "login": self.info.login,
                "node": self.node.config.node_name,
                "source_addr": self.info.source_addr,
                "session_id": self.info.session_id,
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
                "duration_ms": duration_ms,
                "exit_code": exit_code,
                "exit_signal": exit_signal,
                "recording": self.recording.as_ref().map(|r| r.id()),
                "recording_failure": self.recording.as_ref().and_then(|r| r.failure()),
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pty_sizes_are_clamped() {
        let s = pty_size(0, 100_000);
        assert_eq!(
            format!("{s:?}"),
            format!("{:?}", pty_process::Size::new(24, 80))
        );
    }
}
