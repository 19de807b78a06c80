//! The rustls side of the TLS stream: the one trait over rustls' unbuffered server and client
//! connections, and who protects a connection's records — rustls (during the handshake, and
//! for good on TLS 1.2) or our own record layer ([`super::records`], TLS 1.3 after it).

use std::io;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::CertificateDer;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{UnbufferedConnectionCommon, UnbufferedStatus};
use rustls::{ExtractedSecrets, HandshakeKind};

use super::records::{Records, TicketSink};

/// One side of an unbuffered rustls connection: the server or the client.
pub trait TlsSide:
    std::ops::DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> + Send + 'static
{
    type Data;
    /// Records produced as the handshake completes wait for the first write (the server's
    /// session tickets: one send less per connection). Never on a client, whose last flight
    /// completes the handshake for the peer.
    const HOLDS_RECORDS_AFTER_HANDSHAKE: bool;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    /// Hand the records over after the handshake (see `tls::records`).
    fn into_kernel(self)
    -> Result<(ExtractedSecrets, KernelConnection<Self::Data>), rustls::Error>;
    /// What becomes of a session ticket the peer sends after the handshake.
    const TICKETS: TicketSink<Self::Data>;
}

impl TlsSide for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    const HOLDS_RECORDS_AFTER_HANDSHAKE: bool = true;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(
        self,
    ) -> Result<(ExtractedSecrets, KernelConnection<ServerConnectionData>), rustls::Error> {
        self.dangerous_into_kernel_connection()
    }
    const TICKETS: TicketSink<ServerConnectionData> = |_, _| {
        Err(rustls::Error::General(
            "a client sent a session ticket".into(),
        ))
    };
}

impl TlsSide for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    const HOLDS_RECORDS_AFTER_HANDSHAKE: bool = false;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(
        self,
    ) -> Result<(ExtractedSecrets, KernelConnection<ClientConnectionData>), rustls::Error> {
        self.dangerous_into_kernel_connection()
    }
    const TICKETS: TicketSink<ClientConnectionData> =
        |kernel, ticket| kernel.handle_new_session_ticket(ticket);
}

/// Who protects a connection's records.
pub(super) enum Engine<C: TlsSide> {
    /// rustls: during the handshake, and for good on TLS 1.2 or with a config that does not
    /// allow secret extraction.
    Rustls(Box<C>),
    /// Our own record layer (TLS 1.3 after the handshake).
    Records(Box<Records<C::Data>>),
}

/// What the handshake settled, kept for the application after rustls hands the records over.
#[derive(Debug, Default)]
pub(super) struct Handshake {
    pub(super) alpn: Option<Vec<u8>>,
    pub(super) kind: Option<HandshakeKind>,
    pub(super) peer_certificates: Option<Vec<CertificateDer<'static>>>,
}

pub(super) fn tls_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}
