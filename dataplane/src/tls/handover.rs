//! Moving a handshaken server connection to another core: the socket as a std value, the TLS
//! state and the bytes already received, as plain parts a channel can carry. The Proxy moves a
//! user's session to the worker that owns its target's tunnel this way.

use std::io;

use bytes::Bytes;
use rustls::server::UnbufferedServerConnection;

use super::incoming::Buffers;
use super::side::{Engine, Handshake};
use super::stream::TlsStream;
use crate::io::socket::Socket;

/// An accepted, handshaken TLS connection as movable parts.
pub struct TlsParts {
    pub socket: std::net::TcpStream,
    tls: Engine<UnbufferedServerConnection>,
    handshake: Handshake,
    /// Plaintext already read from the TLS session but not yet consumed by the application.
    pub leftover: Bytes,
    buffers: Buffers,
}

impl std::fmt::Debug for TlsParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsParts")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl TlsStream {
    /// Take the stream apart to move it to another thread.
    pub fn into_parts(self, leftover: Bytes) -> io::Result<TlsParts> {
        let (socket, received) = self.io.into_std()?;
        let mut buffers = self.buf;
        // Ciphertext the backend received but TLS has not seen yet goes after the partial
        // record it continues.
        buffers.incoming.extend_from_slice(&received);
        Ok(TlsParts {
            socket,
            tls: self.tls,
            handshake: self.handshake,
            leftover,
            buffers,
        })
    }

    /// Rebuild on the current thread's runtime.
    pub fn from_parts(parts: TlsParts) -> io::Result<(Self, Bytes)> {
        let io = Socket::from_std(parts.socket)?;
        Ok((
            Self {
                io,
                tls: parts.tls,
                handshake: parts.handshake,
                // (Already decided, one way or the other.)
                take_over: false,
                buf: parts.buffers,
                read_eof: false,
                failed: None,
                sent_close_notify: false,
                stored_unprocessed: true,
            },
            parts.leftover,
        ))
    }
}
