//! The tunnel protocol: frames ([`frame`]) and the connection state machine ([`conn`]), both
//! sans-IO. Agents dial the Proxy and hold one tunnel; user sessions are streams inside it.

pub mod conn;
pub mod frame;
pub mod input;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;

pub use conn::{Config, ConnError, Connection, Event, Framed, Side, StreamError, code};
pub use frame::{Frame, FrameError, HEADER_LEN, Header, StreamId};
pub use input::Input;
