//! Agent services: the reverse tunnel to the Proxy with heartbeats and jittered reconnects
//! (`runner`), the SSH node service (`ssh`), TCP apps authorized here (`apps`), the audit spool (`spool`) and session
//! recordings (`recording`); `role` starts them all as a daemon role.

pub mod apps;
mod authorities;
pub mod backoff;
pub mod recording;
pub mod role;
pub mod runner;
pub mod spool;
pub mod ssh;
mod trust;
