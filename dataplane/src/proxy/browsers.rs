//! Browsers on the public port. A connection that negotiates HTTP (`h2`, `http/1.1`, or no ALPN)
//! is the web UI's ([`super::admission::Admission::Browser`]): the worker bridges its TLS stream
//! to one end of an in-memory pipe and hands the other end to the [`Browsers`] the daemon set
//! (the `gatehouse-web` crate), which serves HTTP on a multi-threaded runtime. The data plane
//! stays free of HTTP; the bridge costs one copy each way, bounded by the pipe's buffer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes in flight each way between the worker and the web UI, at most (back-pressure beyond).
pub(crate) const PIPE_BYTES: usize = 64 * 1024;

/// A browser's connection, TLS already terminated.
#[derive(Debug)]
pub struct BrowserConn {
    /// Plaintext HTTP both ways.
    pub io: tokio::io::DuplexStream,
    pub remote: SocketAddr,
    /// Whether ALPN chose HTTP/2 (else HTTP/1.1).
    pub http2: bool,
}

/// Whoever serves browsers: called on a proxy worker's thread, so it must not block (hand the
/// connection to a runtime of its own).
pub trait Browsers: Send + Sync + 'static {
    fn accept(&self, conn: BrowserConn);
}

/// Set once, when the daemon has started the web UI.
pub(crate) type BrowserSlot = Arc<std::sync::OnceLock<Arc<dyn Browsers>>>;

/// After the web UI has answered and closed, how long (and how much) the browser's unread bytes
/// are read and dropped before the socket closes: closing with unread bytes makes the kernel
/// reset the connection, and a reset can destroy the answer (a 413 for a body too large) before
/// the browser reads it. As web servers do ("lingering close").
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// Copy both ways between the browser's TLS stream and the web UI's end of the pipe until the
/// web UI is done; the browser's direction failing (the UI closed its end) never cuts short the
/// answer on its way out.
pub(crate) async fn bridge<T, P>(tls: T, pipe: P)
where
    T: AsyncRead + AsyncWrite + Unpin,
    P: AsyncRead + AsyncWrite + Unpin,
{
    let (mut tls_in, mut tls_out) = tokio::io::split(tls);
    let (mut pipe_in, mut pipe_out) = tokio::io::split(pipe);
    let down = async {
        let _ = tokio::io::copy(&mut pipe_in, &mut tls_out).await;
        let _ = tls_out.shutdown().await;
    };
    let mut up_done = false;
    {
        let up = async {
            let _ = tokio::io::copy(&mut tls_in, &mut pipe_out).await;
            let _ = pipe_out.shutdown().await;
        };
        tokio::pin!(up);
        tokio::pin!(down);
        tokio::select! {
            () = &mut up => {
                up_done = true;
                down.await;
            }
            () = &mut down => {}
        }
    }
    if !up_done {
        let mut sink = [0u8; 16 * 1024];
        let _ = tokio::time::timeout(LINGER, async {
            let mut seen = 0;
            while seen < LINGER_BYTES {
                match tls_in.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen += n,
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The UI answers and closes while the browser is still sending: the answer arrives whole.
    #[tokio::test]
    async fn an_early_answer_reaches_the_browser_whole() {
        let (browser, proxy_side) = tokio::io::duplex(4096);
        let (ui_side, mut ui) = tokio::io::duplex(PIPE_BYTES);
        let bridge = tokio::spawn(bridge(proxy_side, ui_side));
        let (mut b_in, mut b_out) = tokio::io::split(browser);
        let sender = tokio::spawn(async move {
            let big = vec![b'a'; 512 * 1024];
            let _ = b_out.write_all(&big).await;
        });
        let mut first = [0u8; 1024];
        ui.read_exact(&mut first).await.unwrap();
        ui.write_all(b"HTTP/1.1 413 Payload Too Large\r\n\r\n")
            .await
            .unwrap();
        drop(ui);
        let mut answer = Vec::new();
        b_in.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"HTTP/1.1 413 Payload Too Large\r\n\r\n");
        sender.await.unwrap();
        bridge.await.unwrap();
    }
}

/// Connections the web UI opens to this proxy's own port on a browser's behalf (web
/// terminals), by their local address: the proxy credits such a session to the browser's
/// address (audit, the agent's view, the per-address SSH throttle) instead of its own. Only a
/// socket this process holds can come from a registered address, so nobody else can claim one.
#[derive(Debug, Default)]
pub struct LocalClients {
    map: std::sync::Mutex<std::collections::HashMap<SocketAddr, SocketAddr>>,
    /// Registrations in force: with none (no web terminal opening), a session's lookup takes
    /// no lock.
    live: std::sync::atomic::AtomicUsize,
}

impl LocalClients {
    /// Credit connections from `local` to `client` until the guard is dropped.
    pub fn register(self: &Arc<Self>, local: SocketAddr, client: SocketAddr) -> LocalClient {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(local, client);
        self.live.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        LocalClient {
            clients: Arc::clone(self),
            local,
        }
    }

    /// The client a connection from `remote` is on behalf of, if the web UI registered it.
    pub fn client_of(&self, remote: SocketAddr) -> Option<SocketAddr> {
        if self.live.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return None;
        }
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&remote)
            .copied()
    }
}

/// A registration of [`LocalClients`]; dropped, the address is the proxy's own again.
#[derive(Debug)]
pub struct LocalClient {
    clients: Arc<LocalClients>,
    local: SocketAddr,
}

impl Drop for LocalClient {
    fn drop(&mut self) {
        self.clients
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.local);
        self.clients
            .live
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}
