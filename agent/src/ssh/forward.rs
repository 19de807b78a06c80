//! Port forwarding: local (`ssh -L`, and `ssh -D`, whose SOCKS server runs in the client: both
//! arrive as `direct-tcpip` channels) and remote (`ssh -R`: a `tcpip-forward` request, the agent
//! listens on the node and opens a `forwarded-tcpip` channel per connection).
//!
//! The agent decides from the certificate it verified, never from what the client asks:
//! `permit-port-forwarding` (any role saying `port_forwarding = false` leaves it out) allows
//! forwarding at all, and a remote forward listens on loopback unless the certificate carries
//! `remote-forward-any@gatehouse.dev` (the roles' `remote_forward_bind = "any"`), as OpenSSH's
//! `GatewayPorts no` does. Ports below 1024 are only the root login's to listen on. A connection
//! holds at most [`MAX_FORWARDED_CHANNELS`] forwarded channels and [`MAX_REMOTE_LISTENERS`]
//! listeners; past that each request is refused with a reason, and the connection's other
//! channels carry on.
//!
//! Every forward and every refusal is a `port.forward` audit event (user, login, node, source,
//! direction, address, and the reason when refused).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use russh::server::Msg;
use russh::{Channel, ChannelOpenFailure};

use super::SshNode;

/// Forwarded channels (both directions) one connection may hold at once.
pub(crate) const MAX_FORWARDED_CHANNELS: usize = 256;
/// Remote-forward listeners one connection may hold.
pub(crate) const MAX_REMOTE_LISTENERS: usize = 16;
/// How long the agent tries to reach a local forward's target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the verified certificate allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ForwardPermits {
    pub port_forwarding: bool,
    pub remote_any: bool,
    /// The login is root (who alone may listen below port 1024).
    pub root_login: bool,
}

/// A refused forward: the SSH failure to answer with and the reason, for the client and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    pub code: u32,
    pub reason: String,
}

impl Refused {
    fn prohibited(reason: impl Into<String>) -> Self {
        Self {
            code: 1,
            reason: reason.into(),
        }
    }

    fn shortage(reason: impl Into<String>) -> Self {
        Self {
            code: 4,
            reason: reason.into(),
        }
    }

    /// The channel-open failure, its reason in words the client prints.
    pub(crate) fn failure(&self) -> ChannelOpenFailure {
        ChannelOpenFailure::Other {
            code: self.code,
            reason: self.reason.clone(),
        }
    }
}

const NOT_PERMITTED: &str =
    "port forwarding is not allowed by your roles (the certificate lacks permit-port-forwarding)";

/// May a `direct-tcpip` channel to `host:port` open? The target as a connectable pair.
pub(crate) fn check_local(
    permits: ForwardPermits,
    host: &str,
    port: u32,
    active: usize,
) -> Result<(String, u16), Refused> {
    if !permits.port_forwarding {
        return Err(Refused::prohibited(NOT_PERMITTED));
    }
    if active >= MAX_FORWARDED_CHANNELS {
        return Err(Refused::shortage(format!(
            "too many forwarded channels on this connection (at most {MAX_FORWARDED_CHANNELS})"
        )));
    }
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Refused::prohibited(format!("invalid port {port}")))?;
    let well_formed = !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_' | '%'));
    if !well_formed {
        return Err(Refused::prohibited("invalid target host name"));
    }
    Ok((host.to_owned(), port))
}

/// Where a `tcpip-forward` for `address:port` listens, if it may.
pub(crate) fn check_remote(
    permits: ForwardPermits,
    address: &str,
    port: u32,
    listeners: usize,
) -> Result<SocketAddr, Refused> {
    if !permits.port_forwarding {
        return Err(Refused::prohibited(NOT_PERMITTED));
    }
    if listeners >= MAX_REMOTE_LISTENERS {
        return Err(Refused::shortage(format!(
            "too many remote forwards on this connection (at most {MAX_REMOTE_LISTENERS})"
        )));
    }
    let port =
        u16::try_from(port).map_err(|_| Refused::prohibited(format!("invalid port {port}")))?;
    if port != 0 && port < 1024 && !permits.root_login {
        return Err(Refused::prohibited(format!(
            "port {port} is privileged: only the root login may listen on it"
        )));
    }
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let ip = if !permits.remote_any {
        loopback
    } else {
        match address {
            "" | "*" | "0.0.0.0" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            "localhost" => loopback,
            other => other
                .parse::<IpAddr>()
                .map_err(|_| Refused::prohibited(format!("invalid listen address `{other}`")))?,
        }
    };
    Ok(SocketAddr::new(ip, port))
}

/// Who a connection's forwards are for, for the audit trail.
#[derive(Debug, Clone)]
pub(crate) struct ForwardWho {
    pub key_id: String,
    pub login: String,
    pub source_addr: String,
}

/// One forward request's context: the node, who asks, what their certificate allows.
#[derive(Debug, Clone)]
pub(crate) struct ForwardCtx {
    pub node: Arc<SshNode>,
    pub who: ForwardWho,
    pub permits: ForwardPermits,
}

/// The forwards of one connection: the count of live forwarded channels and the remote
/// listeners, stopped when the connection ends (dropped with its handler).
#[derive(Debug, Default)]
pub(crate) struct Forwards {
    active: Arc<AtomicUsize>,
    listeners: HashMap<(String, u32), tokio::task::JoinHandle<()>>,
}

impl Drop for Forwards {
    fn drop(&mut self) {
        for (_, task) in self.listeners.drain() {
            task.abort();
        }
    }
}

/// Holds one forwarded channel's place in the connection's count.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Forwards {
    fn take_slot(&self) -> Slot {
        self.active.fetch_add(1, Ordering::AcqRel);
        Slot(Arc::clone(&self.active))
    }

    /// A `direct-tcpip` channel: connect to the target from the node, then answer and splice.
    /// The connect runs in a task of its own, so a slow target holds up no other channel.
    pub(crate) fn open_local(
        &self,
        ctx: ForwardCtx,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        reply: russh::server::ChannelOpenHandle,
    ) {
        let ForwardCtx { node, who, permits } = ctx;
        let address = format!("{host}:{port}");
        let target = check_local(permits, host, port, self.active.load(Ordering::Acquire));
        let (host, port) = match target {
            Ok(t) => t,
            Err(refused) => {
                audit(&node, &who, "local", &address, Some(&refused.reason));
                tokio::spawn(reply.reject(refused.failure()));
                return;
            }
        };
        let slot = self.take_slot();
        tokio::spawn(async move {
            let connected = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio::net::TcpStream::connect((host.as_str(), port)),
            )
            .await;
            let tcp = match connected {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => {
                    let reason = format!("could not connect to {address} from the node: {e}");
                    audit(&node, &who, "local", &address, Some(&reason));
                    reply
                        .reject(ChannelOpenFailure::Other { code: 2, reason })
                        .await;
                    return;
                }
                Err(_) => {
                    let reason = format!("connecting to {address} from the node timed out");
                    audit(&node, &who, "local", &address, Some(&reason));
                    reply
                        .reject(ChannelOpenFailure::Other { code: 2, reason })
                        .await;
                    return;
                }
            };
            let _ = tcp.set_nodelay(true);
            reply.accept().await;
            audit(&node, &who, "local", &address, None);
            splice(channel, tcp, slot).await;
        });
    }

    /// A `tcpip-forward` request: listen on the node and open a `forwarded-tcpip` channel to the
    /// client for each connection. `port` 0 asks for any port; the chosen one is written back.
    pub(crate) async fn listen_remote(
        &mut self,
        ctx: ForwardCtx,
        address: &str,
        port: &mut u32,
        handle: russh::server::Handle,
    ) -> bool {
        let ForwardCtx { node, who, permits } = ctx;
        let (node, who) = (&node, &who);
        let requested = format!("{address}:{port}");
        let bind = match check_remote(permits, address, *port, self.listeners.len()) {
            Ok(b) => b,
            Err(refused) => {
                audit(node, who, "remote", &requested, Some(&refused.reason));
                return false;
            }
        };
        let listener = match tokio::net::TcpListener::bind(bind).await {
            Ok(l) => l,
            Err(e) => {
                let reason = format!("could not listen on {bind}: {e}");
                audit(node, who, "remote", &requested, Some(&reason));
                return false;
            }
        };
        let bound = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        if *port == 0 {
            *port = u32::from(bound);
        }
        audit(node, who, "remote", &format!("{}:{bound}", bind.ip()), None);
        let key = (address_key(address), *port);
        let (address, announced) = (address.to_owned(), *port);
        let active = Arc::clone(&self.active);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if active.load(Ordering::Acquire) >= MAX_FORWARDED_CHANNELS {
                    // The client's side is full: this connection is refused, the listener stays.
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let slot = Slot(Arc::clone(&active));
                let handle = handle.clone();
                let address = address.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let opened = handle
                        .channel_open_forwarded_tcpip(
                            address,
                            announced,
                            peer.ip().to_string(),
                            u32::from(peer.port()),
                        )
                        .await;
                    if let Ok(channel) = opened {
                        splice(channel, tcp, slot).await;
                    }
                });
            }
        });
        if let Some(old) = self.listeners.insert(key, task) {
            old.abort();
        }
        true
    }

    /// A `cancel-tcpip-forward`: stop listening (channels already open carry on).
    pub(crate) fn cancel_remote(&mut self, address: &str, port: u32) -> bool {
        match self.listeners.remove(&(address_key(address), port)) {
            Some(task) => {
                task.abort();
                true
            }
            None => false,
        }
    }
}

fn address_key(address: &str) -> String {
    address.chars().take(255).collect()
}

/// Copy both ways between a forwarded channel and its TCP connection until both end.
async fn splice(channel: Channel<Msg>, mut tcp: tokio::net::TcpStream, _slot: Slot) {
    let mut stream = channel.into_stream();
    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
}

/// `port.forward`, for a forward that opened or one that was refused (`refused`: why).
fn audit(node: &SshNode, who: &ForwardWho, direction: &str, address: &str, refused: Option<&str>) {
    let address: String = address.chars().take(300).collect();
    match refused {
        Some(reason) => tracing::warn!(
            user = %who.key_id,
            login = %who.login,
            direction,
            %address,
            "ssh: port forward refused: {reason}"
        ),
        None => tracing::info!(
            user = %who.key_id,
            login = %who.login,
            direction,
            %address,
            "ssh: port forward"
        ),
    }
    let mut data = serde_json::json!({
        "user": who.key_id,
        "login": who.login,
        "node": node.config.node_name,
        "source_addr": who.source_addr,
        "direction": direction,
        "address": address,
        "success": refused.is_none(),
    });
    if let (Some(reason), Some(obj)) = (refused, data.as_object_mut()) {
        obj.insert("reason".into(), serde_json::json!(reason));
    }
    node.audit.emit("port.forward", &who.key_id, data);
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOWED: ForwardPermits = ForwardPermits {
        port_forwarding: true,
        remote_any: false,
        root_login: false,
    };

    #[test]
    fn local_forwards_need_the_permit_a_place_and_a_sane_target() {
        assert_eq!(
            check_local(ALLOWED, "127.0.0.1", 8080, 0),
            Ok(("127.0.0.1".into(), 8080))
        );
        assert_eq!(
            check_local(ALLOWED, "db.internal", 5432, 10),
            Ok(("db.internal".into(), 5432))
        );
        let denied = ForwardPermits {
            port_forwarding: false,
            ..ALLOWED
        };
        let r = check_local(denied, "127.0.0.1", 80, 0).unwrap_err();
        assert_eq!(r.code, 1);
        assert!(r.reason.contains("permit-port-forwarding"), "{}", r.reason);
        let full = check_local(ALLOWED, "127.0.0.1", 80, MAX_FORWARDED_CHANNELS).unwrap_err();
        assert_eq!(full.code, 4);
        for (host, port) in [("", 80), ("a b", 80), ("x\0y", 80), ("h", 0), ("h", 70_000)] {
            assert!(
                check_local(ALLOWED, host, port, 0).is_err(),
                "{host:?}:{port}"
            );
        }
        assert!(check_local(ALLOWED, &"a".repeat(256), 80, 0).is_err());
    }

    #[test]
    fn remote_forwards_listen_on_loopback_unless_the_certificate_says_any() {
        let lo = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        // Whatever the client asks, loopback.
        for asked in ["", "*", "0.0.0.0", "localhost", "10.1.2.3"] {
            assert_eq!(
                check_remote(ALLOWED, asked, 18022, 0),
                Ok(lo(18022)),
                "{asked}"
            );
        }
        assert_eq!(check_remote(ALLOWED, "", 0, 0), Ok(lo(0)), "any free port");
        let any = ForwardPermits {
            remote_any: true,
            ..ALLOWED
        };
        assert_eq!(
            check_remote(any, "*", 18022, 0),
            Ok("0.0.0.0:18022".parse().unwrap())
        );
        assert_eq!(check_remote(any, "localhost", 18022, 0), Ok(lo(18022)));
        assert_eq!(
            check_remote(any, "127.0.0.5", 18022, 0),
            Ok("127.0.0.5:18022".parse().unwrap())
        );
        assert!(check_remote(any, "not an address", 18022, 0).is_err());
        // Privileged ports are root's.
        let r = check_remote(ALLOWED, "", 80, 0).unwrap_err();
        assert!(r.reason.contains("privileged"), "{}", r.reason);
        let root = ForwardPermits {
            root_login: true,
            ..ALLOWED
        };
        assert_eq!(check_remote(root, "", 80, 0), Ok(lo(80)));
        // Not permitted, or too many listeners.
        let denied = ForwardPermits {
            port_forwarding: false,
            ..ALLOWED
        };
        assert!(check_remote(denied, "", 18022, 0).is_err());
        assert_eq!(
            check_remote(ALLOWED, "", 18022, MAX_REMOTE_LISTENERS)
                .unwrap_err()
                .code,
            4
        );
        assert!(check_remote(ALLOWED, "", 70_000, 0).is_err());
    }
}
