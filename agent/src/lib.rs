//! Agent services. Join, tunnel client and the SSH node service arrive with the reverse-tunnel issue.
pub use gatehouse_dataplane as dataplane;
