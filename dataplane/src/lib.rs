//! The Proxy data plane: the tunnel protocol (sans-IO, both ends), and from here on the per-core
//! Proxy that routes user sessions to agents' tunnels.

pub mod tunnel;

pub use gatehouse_controlplane as controlplane;
