//! Who may do what on the Proxy's one port: pure functions of what a connection offered and who
//! its certificate says it is. The I/O code (`worker`, `tunnels`) reads the ClientHello, runs
//! the handshake and then does what these decide; nothing here touches a socket or a clock.
//!
//! - Before TLS: a ClientHello offering `gatehouse-auth` is passed through to Auth byte for
//!   byte ([`front_door`]), so the client's certificate authenticates to Auth itself.
//! - After TLS: [`admit`] maps the negotiated ALPN and the peer's identity to a tunnel, a session
//!   or a refusal. An agent (a node certificate, not a proxy's) may hold a tunnel; a user or a bot
//!   may open SSH and TCP sessions; every other pairing is refused, named in the log and the metric.
//! - The identity is this cluster's and unexpired ([`verify`]), checked on every connection: a
//!   resumed TLS session presents its first handshake's certificate without a new verification,
//!   so resumption must never outlive the certificate.

use std::cell::RefCell;
use std::collections::HashMap;

use gatehouse_controlplane::identity::{ALPN_AUTH, Identity, IdentityKind};
use gatehouse_proto::alpn;

/// What to do with a new connection before any TLS is terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrontDoor {
    /// Splice it to Auth as it is (it offered `gatehouse-auth`).
    PassToAuth,
    /// Terminate TLS here.
    Terminate,
}

/// Route by the ALPN protocols a ClientHello offered.
pub(crate) fn front_door(offered: &[Vec<u8>]) -> FrontDoor {
    if offered.iter().any(|a| a == ALPN_AUTH) {
        FrontDoor::PassToAuth
    } else {
        FrontDoor::Terminate
    }
}

/// How the connection reached the Proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// TCP and TLS on the public port.
    Tls,
    /// QUIC on the public port's UDP side (agents' tunnels only).
    Quic,
}

/// A user's session kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionKind {
    Ssh,
    Tcp,
}

impl SessionKind {
    /// The ALPN name, for logs and metric labels.
    pub(crate) fn alpn(self) -> &'static str {
        match self {
            Self::Ssh => "gatehouse-ssh",
            Self::Tcp => "gatehouse-tcp",
        }
    }
}

/// Why a certificate gives no usable identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unverified {
    NoCertificate,
    NoIdentity,
    OtherCluster,
    Expired,
}

impl Unverified {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::NoCertificate => "no client certificate",
            Self::NoIdentity => "no identity in the certificate",
            Self::OtherCluster => "a certificate of another cluster",
            Self::Expired => "certificate expired",
        }
    }
}

/// What [`admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// An agent's reverse tunnel; over QUIC with `gatehouse-tunnel-streams`, each session on a
    /// QUIC stream of its own.
    Tunnel { session_streams: bool },
    /// A trusted leaf cluster's proxy holding a tunnel to this (root) cluster's proxy.
    LeafTunnel,
    /// A user's session.
    Session(SessionKind),
    /// A browser (or a script) speaking HTTP: the web UI and its API, which authenticate by
    /// session cookie, not by certificate.
    Browser,
    /// Refused; `reason` is the metric's label (`expired` or `identity`).
    Refuse { reason: &'static str },
}

/// Whether an identity opens sessions: a user's, or a Machine ID bot's, of this cluster.
fn opens_sessions(id: &Identity, own: &str) -> bool {
    id.cluster == own && matches!(id.kind, IdentityKind::User | IdentityKind::Bot)
}

fn is_proxy(id: &Identity) -> bool {
    id.kind == IdentityKind::Node && id.roles.iter().any(|r| r == "@proxy")
}

/// Whether an identity is an agent's (a node certificate of this cluster that is not a
/// proxy's).
fn is_agent(id: &Identity, own: &str) -> bool {
    id.cluster == own && id.kind == IdentityKind::Node && !is_proxy(id)
}

/// Whether an identity is one of this cluster's proxies.
pub(crate) fn is_own_proxy(id: &Identity, own: &str) -> bool {
    id.cluster == own && is_proxy(id)
}

/// Whether an identity is a proxy of another (leaf) cluster: [`verify`] lets such a one through
/// only for a trusted leaf, whose CA alone vouched for it.
fn is_leaf_proxy(id: &Identity, own: &str) -> bool {
    id.cluster != own && is_proxy(id)
}

/// Decide a handshaken connection from the ALPN it negotiated and its peer's identity.
pub(crate) fn admit(
    transport: Transport,
    alpn: Option<&[u8]>,
    peer: &Result<Identity, Unverified>,
    own: &str,
) -> Admission {
    // HTTP (negotiated, or no ALPN at all) goes to the web UI whoever the peer is: browsers
    // present no certificate, and the web API checks its own session cookie.
    if transport == Transport::Tls && is_http(alpn) {
        return Admission::Browser;
    }
    let refuse = || Admission::Refuse {
        reason: match peer {
            Err(Unverified::Expired) => "expired",
            _ => "identity",
        },
    };
    let Ok(id) = peer else {
        return refuse();
    };
    match (transport, alpn) {
        (Transport::Tls, Some(alpn::TUNNEL)) | (Transport::Quic, Some(alpn::TUNNEL))
            if is_agent(id, own) =>
        {
            Admission::Tunnel {
                session_streams: false,
            }
        }
        (Transport::Quic, Some(alpn::TUNNEL_STREAMS)) if is_agent(id, own) => Admission::Tunnel {
            session_streams: true,
        },
        (Transport::Tls, Some(alpn::TUNNEL)) if is_leaf_proxy(id, own) => Admission::LeafTunnel,
        // A proxy of this cluster opens sessions for a trusted root's users (the session
        // request names the user; the agent still authorizes by the user's SSH certificate).
        (Transport::Tls, Some(alpn::SSH)) if opens_sessions(id, own) || is_own_proxy(id, own) => {
            Admission::Session(SessionKind::Ssh)
        }
        (Transport::Tls, Some(alpn::TCP)) if opens_sessions(id, own) || is_own_proxy(id, own) => {
            Admission::Session(SessionKind::Tcp)
        }
        _ => refuse(),
    }
}

/// The ALPNs a browser negotiates: `h2`, `http/1.1`, or none.
fn is_http(alpn: Option<&[u8]>) -> bool {
    matches!(alpn, None | Some(HTTP2) | Some(HTTP1))
}

/// ALPN names of HTTP/2 and HTTP/1.1.
pub(crate) const HTTP2: &[u8] = b"h2";
pub(crate) const HTTP1: &[u8] = b"http/1.1";

/// An identity is usable if this cluster issued it, or it is the proxy of a leaf cluster this
/// one trusts now (`trusted_leaf`; the TLS verifier checked it against that leaf's CA alone),
/// and it has not expired at `now` (Unix seconds).
pub(crate) fn verify(
    id: Identity,
    cluster: &str,
    trusted_leaf: impl Fn(&str) -> bool,
    now: i64,
) -> Result<Identity, Unverified> {
    if id.cluster != cluster && !(is_proxy(&id) && trusted_leaf(&id.cluster)) {
        return Err(Unverified::OtherCluster);
    }
    if id.expires <= now {
        return Err(Unverified::Expired);
    }
    Ok(id)
}

/// The ALPN as text, for logs and metric labels.
pub(crate) fn alpn_name(alpn: Option<&[u8]>) -> String {
    alpn.map(|a| String::from_utf8_lossy(a).into_owned())
        .unwrap_or_else(|| "none".into())
}

/// Who a refused peer was, for the log line.
pub(crate) fn who(id: &Result<Identity, Unverified>) -> String {
    match id {
        Ok(i) => format!("{:?} `{}`", i.kind, i.name),
        Err(why) => why.as_str().to_owned(),
    }
}

/// Certificates' identities already parsed by this worker, by certificate (DER). A client
/// opens many sessions with one certificate, and parsing X.509 plus the identity's JSON was
/// ~3 % of the proxy's CPU per new session. Only the parse is remembered: cluster and expiry are
/// checked on every connection ([`verify`]).
const PARSED_IDENTITIES: usize = 1024;

thread_local! {
    static IDENTITIES: RefCell<HashMap<Box<[u8]>, Identity>> =
        RefCell::new(HashMap::new());
}

/// The identity in a peer's certificate (DER), parsed once per worker.
pub(crate) fn parsed_identity(cert: Option<&[u8]>) -> Result<Identity, Unverified> {
    let cert = cert.ok_or(Unverified::NoCertificate)?;
    if let Some(id) = IDENTITIES.with_borrow(|m| m.get(cert).cloned()) {
        return Ok(id);
    }
    let id = Identity::from_cert_der(cert).map_err(|_| Unverified::NoIdentity)?;
    IDENTITIES.with_borrow_mut(|m| {
        // Bounded: past the limit start over (the busy certificates come straight back).
        if m.len() >= PARSED_IDENTITIES {
            *m = HashMap::new();
        }
        m.insert(cert.into(), id.clone());
    });
    Ok(id)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn identity(kind: IdentityKind, roles: &[&str]) -> Identity {
        Identity {
            kind,
            name: "someone".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            logins: vec![],
            traits: BTreeMap::new(),
            cluster: "c1".into(),
            route_to_cluster: "c1".into(),
            bot: None,
            expires: NOW + 3600,
        }
    }

    /// The whole admission table: every ALPN the port may negotiate (and none, and a stranger's),
    /// on both transports, against every kind of peer. Anything not listed as allowed is refused.
    #[test]
    fn admission_table_alpn_by_identity_kind() {
        use Admission::{Browser, LeafTunnel, Refuse, Session, Tunnel};
        use Transport::{Quic, Tls};
        let agent = Ok(identity(IdentityKind::Node, &["@node"]));
        let proxy = Ok(identity(IdentityKind::Node, &["@proxy"]));
        let user = Ok(identity(IdentityKind::User, &["access"]));
        let bot = Ok(identity(IdentityKind::Bot, &["ci"]));
        let admin = Ok(identity(IdentityKind::Builtin, &["@admin"]));
        let expired = Err(Unverified::Expired);
        let none = Err(Unverified::NoCertificate);
        let foreign = Err(Unverified::OtherCluster);
        let garbled = Err(Unverified::NoIdentity);
        let of_leaf = |kind, roles: &[&str]| {
            let mut id = identity(kind, roles);
            id.cluster = "leaf".into();
            Ok(id)
        };
        let leaf_proxy = of_leaf(IdentityKind::Node, &["@proxy"]);
        let leaf_agent = of_leaf(IdentityKind::Node, &["@node"]);
        let leaf_user = of_leaf(IdentityKind::User, &["access"]);
        let peers: [(&str, &Result<Identity, Unverified>); 12] = [
            ("leaf proxy", &leaf_proxy),
            ("leaf agent", &leaf_agent),
            ("leaf user", &leaf_user),
            ("agent", &agent),
            ("proxy", &proxy),
            ("user", &user),
            ("bot", &bot),
            ("admin", &admin),
            ("expired", &expired),
            ("none", &none),
            ("foreign", &foreign),
            ("garbled", &garbled),
        ];
        let alpns: [Option<&[u8]>; 9] = [
            Some(alpn::TUNNEL),
            Some(alpn::TUNNEL_STREAMS),
            Some(alpn::SSH),
            Some(alpn::TCP),
            Some(ALPN_AUTH),
            Some(b"h2"),
            Some(b"http/1.1"),
            Some(b"spdy/3"),
            None,
        ];
        let identity_refusal = Refuse { reason: "identity" };
        let expected = |t: Transport, a: Option<&[u8]>, who: &str| -> Admission {
            // Browsers: any peer (the web API checks its cookie), over TLS only.
            if t == Tls && matches!(a, None | Some(b"h2") | Some(b"http/1.1")) {
                return Browser;
            }
            if who == "expired" {
                return Refuse { reason: "expired" };
            }
            match (t, a, who) {
                (Tls | Quic, Some(alpn::TUNNEL), "agent") => Tunnel {
                    session_streams: false,
                },
                (Quic, Some(alpn::TUNNEL_STREAMS), "agent") => Tunnel {
                    session_streams: true,
                },
                (Tls, Some(alpn::TUNNEL), "leaf proxy") => LeafTunnel,
                (Tls, Some(alpn::SSH), "user" | "bot" | "proxy") => Session(SessionKind::Ssh),
                (Tls, Some(alpn::TCP), "user" | "bot" | "proxy") => Session(SessionKind::Tcp),
                _ => identity_refusal,
            }
        };
        let (mut allowed, mut browsers) = (0, 0);
        for t in [Tls, Quic] {
            for a in alpns {
                for (who, peer) in peers {
                    let got = admit(t, a, peer, "c1");
                    assert_eq!(got, expected(t, a, who), "{t:?} × {} × {who}", alpn_name(a));
                    match got {
                        Refuse { .. } => {}
                        Browser => browsers += 1,
                        _ => allowed += 1,
                    }
                }
            }
        }
        // Exactly the ten pairings above are allowed, out of 2 × 9 × 12; HTTP over TLS (three
        // ALPNs, any of the 12 peers) is the web UI's.
        assert_eq!(allowed, 10);
        assert_eq!(browsers, 3 * 12);
    }

    #[test]
    fn the_auth_alpn_passes_through_before_tls_and_nothing_else_does() {
        assert_eq!(front_door(&[ALPN_AUTH.to_vec()]), FrontDoor::PassToAuth);
        assert_eq!(
            front_door(&[b"h2".to_vec(), ALPN_AUTH.to_vec()]),
            FrontDoor::PassToAuth
        );
        for other in [
            alpn::TUNNEL,
            alpn::SSH,
            alpn::TCP,
            b"h2",
            b"gatehouse-auth2",
        ] {
            assert_eq!(front_door(&[other.to_vec()]), FrontDoor::Terminate);
        }
        assert_eq!(front_door(&[]), FrontDoor::Terminate);
    }

    #[test]
    fn identities_of_another_cluster_or_past_expiry_are_unverified() {
        let id = identity(IdentityKind::User, &[]);
        let none = |_: &str| false;
        assert!(verify(id.clone(), "c1", none, NOW).is_ok());
        assert_eq!(
            verify(id.clone(), "c2", none, NOW).err(),
            Some(Unverified::OtherCluster)
        );
        assert_eq!(
            verify(id.clone(), "c1", none, id.expires).err(),
            Some(Unverified::Expired),
            "expired at the second it expires"
        );
        assert!(verify(id.clone(), "c1", none, id.expires - 1).is_ok());
        // Of a trusted leaf (c1 seen from c2), only its proxies are usable here.
        let c1 = |c: &str| c == "c1";
        assert_eq!(
            verify(id.clone(), "c2", c1, NOW).err(),
            Some(Unverified::OtherCluster)
        );
        let proxy = identity(IdentityKind::Node, &["@proxy"]);
        assert!(verify(proxy.clone(), "c2", c1, NOW).is_ok());
        assert!(verify(proxy, "c2", none, NOW).is_err());
    }

    #[test]
    fn a_certificate_without_an_identity_is_refused_not_a_panic() {
        assert_eq!(parsed_identity(None).err(), Some(Unverified::NoCertificate));
        assert_eq!(
            parsed_identity(Some(b"not DER")).err(),
            Some(Unverified::NoIdentity)
        );
    }
}
