//! Agent services: join (host identity), the reverse tunnel to the Proxy with heartbeats and
//! jittered reconnects, the SSH node service, TCP apps, and the audit spool.
pub use gatehouse_dataplane as dataplane;

pub mod agent;
pub mod backoff;
pub mod host;
pub mod runner;
pub mod spool;
pub mod ssh;
