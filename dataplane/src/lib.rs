//! The Proxy data plane. The tunnel protocol and the per-core Proxy arrive with the reverse-tunnel issue;
//! for now this crate only re-exports the control-plane client the Proxy will use.
pub use gatehouse_controlplane as controlplane;
