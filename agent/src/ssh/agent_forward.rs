//! Agent forwarding (`ssh -A`): the session's processes reach the user's ssh-agent on the
//! client through a socket on the node.
//!
//! Allowed by the certificate's `permit-agent-forwarding` (the roles' `forward_agent`, off in
//! the presets). The socket lives in a directory of its own (0700, owned by the login user) under
//! the system's temporary directory, so only that user (and root) can use it; its path goes to
//! the session as `SSH_AUTH_SOCK`. Each connection to it opens an `auth-agent@openssh.com`
//! channel to the client. The directory is removed, and the listener stopped, when the session's
//! channel closes or the connection ends.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use rand::Rng;

/// At most this many agent connections at once per session.
const MAX_AGENT_CONNECTIONS: usize = 32;

/// A session's forwarded agent socket; dropping it stops the listener and removes the directory.
#[derive(Debug)]
pub(crate) struct AgentSocket {
    dir: PathBuf,
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl AgentSocket {
    /// Listen for the login `uid:gid` and forward each connection to the client's agent.
    pub(crate) fn start(uid: u32, gid: u32, handle: russh::server::Handle) -> Result<Self, String> {
        let suffix: String = rand::thread_rng()
            .sample_iter(&rand::distributions::Alphanumeric)
            .take(12)
            .map(char::from)
            .collect();
        let dir = std::env::temp_dir().join(format!("gatehouse-agent-{suffix}"));
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let cleanup = |e: String| {
            let _ = std::fs::remove_dir_all(&dir);
            e
        };
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| cleanup(format!("securing {}: {e}", dir.display())))?;
        let path = dir.join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path)
            .map_err(|e| cleanup(format!("listening on {}: {e}", path.display())))?;
        // The socket and its directory belong to the login user (a no-op when the agent runs as
        // that user): the session's processes can connect, other users cannot reach the path.
        for p in [&path, &dir] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid))
                .map_err(|e| cleanup(format!("handing {} to the login: {e}", p.display())))?;
        }
        let live = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            use std::sync::atomic::Ordering;
            while let Ok((mut conn, _)) = listener.accept().await {
                if live.load(Ordering::Acquire) >= MAX_AGENT_CONNECTIONS {
                    continue;
                }
                live.fetch_add(1, Ordering::AcqRel);
                let (handle, live) = (handle.clone(), live.clone());
                tokio::spawn(async move {
                    if let Ok(channel) = handle.channel_open_agent().await {
                        let mut stream = channel.into_stream();
                        let _ = tokio::io::copy_bidirectional(&mut stream, &mut conn).await;
                    }
                    live.fetch_sub(1, Ordering::AcqRel);
                });
            }
        });
        Ok(Self { dir, path, task })
    }

    /// The value of `SSH_AUTH_SOCK` for the session.
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for AgentSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
