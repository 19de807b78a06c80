//! The ALPN protocol names the Proxy's one public port routes by. (`gatehouse-auth`, passed
//! through to Auth, is Auth's own: `gatehouse_controlplane::identity::ALPN_AUTH`.)

/// An agent's reverse tunnel: every session a stream inside the tunnel's one connection.
pub const TUNNEL: &[u8] = b"gatehouse-tunnel";
/// The tunnel over QUIC with each session on a QUIC stream of its own; offered first on QUIC,
/// beside [`TUNNEL`].
pub const TUNNEL_STREAMS: &[u8] = b"gatehouse-tunnel-streams";
/// A user's SSH session: after the session request, SSH end to end with the agent.
pub const SSH: &[u8] = b"gatehouse-ssh";
/// A user's session to a TCP app behind an agent.
pub const TCP: &[u8] = b"gatehouse-tcp";
