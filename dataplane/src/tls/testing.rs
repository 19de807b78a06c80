//! Test and fuzz support for the TLS layer, in no production build: a throwaway CA, in-memory
//! handshakes between rustls' unbuffered connections whose records [`super::records`] then
//! takes over, and the record layer's entry points for the fuzz targets in `fuzz/` (cargo
//! feature `fuzzing`).

/// A CA and a certificate with a fresh key signed by it: (cert PEM, key PEM).
#[cfg(test)]
pub(crate) struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub(crate) pem: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test support: a failure is a failed test
impl Ca {
    pub(crate) fn new(cn: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }
    pub(crate) fn leaf(&self, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// In-memory handshakes between rustls' unbuffered connections: for the tests and the fuzz
/// targets, which take the records over from them.
pub(crate) mod in_memory {
    use std::sync::Arc;

    use rustls::client::UnbufferedClientConnection;
    use rustls::pki_types::ServerName;
    use rustls::server::UnbufferedServerConnection;
    use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
    use rustls::{ClientConfig, ServerConfig};

    use crate::tls::records::{RecordError, Records};
    use crate::tls::side::TlsSide;

    /// Drive one side of an unbuffered rustls connection over `incoming` until it waits for
    /// the peer: records it sends go to `out`, application data it receives to `data`. True
    /// once its handshake is complete.
    pub(crate) fn pump<C: TlsSide>(
        c: &mut C,
        incoming: &mut Vec<u8>,
        out: &mut Vec<u8>,
        data: &mut Vec<u8>,
    ) -> Result<bool, RecordError> {
        loop {
            let UnbufferedStatus { discard, state } = c.process(incoming);
            let done = match state? {
                ConnectionState::EncodeTlsData(mut e) => {
                    let mut buf = vec![0u8; 64 * 1024];
                    let n = e
                        .encode(&mut buf)
                        .map_err(|_| RecordError::Keys("a handshake flight over 64 KiB"))?;
                    out.extend_from_slice(buf.get(..n).unwrap_or_default());
                    None
                }
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    None
                }
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        data.extend_from_slice(record?.payload);
                    }
                    None
                }
                ConnectionState::BlockedHandshake => Some(false),
                ConnectionState::WriteTraffic(_) => Some(true),
                _ => {
                    return Err(RecordError::Unexpected(
                        "a state a handshake does not reach",
                    ));
                }
            };
            incoming.drain(..discard);
            if let Some(done) = done {
                return Ok(done);
            }
        }
    }

    /// A client and a server of `name` with complete handshakes, and the server's records to
    /// the client (its session tickets) not yet delivered.
    pub(crate) fn handshake(
        server: &Arc<ServerConfig>,
        client: &Arc<ClientConfig>,
        name: &str,
    ) -> Result<
        (
            UnbufferedClientConnection,
            UnbufferedServerConnection,
            Vec<u8>,
        ),
        RecordError,
    > {
        let name = ServerName::try_from(name.to_owned())
            .map_err(|_| RecordError::Keys("not a server name"))?;
        let mut c = UnbufferedClientConnection::new(Arc::clone(client), name)?;
        let mut s = UnbufferedServerConnection::new(Arc::clone(server))?;
        let (mut c2s, mut s2c, mut data) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..8 {
            let client_done = pump(&mut c, &mut s2c, &mut c2s, &mut data)?;
            let server_done = pump(&mut s, &mut c2s, &mut s2c, &mut data)?;
            if client_done && server_done && c2s.is_empty() {
                if !data.is_empty() {
                    return Err(RecordError::Unexpected("data during the handshake"));
                }
                return Ok((c, s, s2c));
            }
        }
        Err(RecordError::Unexpected("the handshake did not complete"))
    }

    /// Hand one side's records over to [`Records`].
    pub(crate) fn take_over<C: TlsSide>(c: C) -> Result<Records<C::Data>, RecordError> {
        let (secrets, kernel) = c.into_kernel()?;
        Records::new(secrets, kernel, C::TICKETS)
    }
}

/// The record layer for the fuzz targets in `fuzz/` (cargo feature `fuzzing`, off everywhere
/// else; not an API): a client and a server after a real handshake in memory, which seal
/// records for each other, well-formed or with whatever inner plaintext an authenticated but
/// hostile peer could send, and open them in place or into a reader's buffer.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use std::sync::{Arc, OnceLock};

    use bytes::BytesMut;
    use gatehouse_controlplane::ca::TlsCa;
    use gatehouse_controlplane::identity::PROXY_SERVER_NAME;
    use gatehouse_controlplane::tls::{Trust, client_config_with_alpn, server_config_with_alpn};
    use rustls::client::ClientConnectionData;
    use rustls::server::ServerConnectionData;
    use rustls::{ClientConfig, ServerConfig};

    use super::in_memory;
    pub use crate::tls::records::RecordError;
    use crate::tls::records::{OVERHEAD, Opened, Records};

    /// Most plaintext in one record.
    pub const MAX_PLAINTEXT: usize = crate::tls::records::MAX_PLAINTEXT;

    /// One end of the pair.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum End {
        Client,
        Server,
    }

    impl End {
        pub fn peer(self) -> Self {
            match self {
                Self::Client => Self::Server,
                Self::Server => Self::Client,
            }
        }
    }

    /// What one opened record held.
    #[derive(Debug)]
    pub enum Read<'a> {
        Data(&'a [u8]),
        /// A key update, a session ticket or user_canceled.
        Control,
        /// close_notify.
        Closed,
    }

    impl<'a> From<Opened<'a>> for Read<'a> {
        fn from(o: Opened<'a>) -> Self {
            match o {
                Opened::Data(d) => Self::Data(d),
                Opened::Control => Self::Control,
                Opened::Closed => Self::Closed,
            }
        }
    }

    /// Configs made once per process (key generation is the slow part).
    fn configs() -> Result<&'static (Arc<ServerConfig>, Arc<ClientConfig>), RecordError> {
        static CONFIGS: OnceLock<Option<(Arc<ServerConfig>, Arc<ClientConfig>)>> = OnceLock::new();
        CONFIGS
            .get_or_init(|| {
                let now = time::OffsetDateTime::now_utc();
                let ca = TlsCa::generate("fuzz", now).ok()?;
                let sans = [PROXY_SERVER_NAME.to_owned()];
                let ttl = std::time::Duration::from_secs(3600);
                let (cert, key) = ca.issue_server_cert("fuzz", &sans, ttl, now).ok()?;
                let mut server = (*server_config_with_alpn(
                    ca.cert_pem(),
                    &cert.pem(),
                    &key.serialize_pem(),
                    &[b"t"],
                )
                .ok()?)
                .clone();
                server.send_tls13_tickets = 0;
                let trust = Trust::CaPem(ca.cert_pem().to_owned());
                let client = client_config_with_alpn(&trust, None, &[b"t"]).ok()?;
                Some((Arc::new(server), client))
            })
            .as_ref()
            .ok_or(RecordError::Keys("the fuzzing configs could not be made"))
    }

    /// A client's and a server's record layers after one handshake.
    pub struct Pair {
        client: Records<ClientConnectionData>,
        server: Records<ServerConnectionData>,
    }

    /// `$body` with `$r` bound to the record layer of `$end`.
    macro_rules! with_end {
        ($self:ident, $end:expr, |$r:ident| $body:expr) => {
            match $end {
                End::Client => {
                    let $r = &mut $self.client;
                    $body
                }
                End::Server => {
                    let $r = &mut $self.server;
                    $body
                }
            }
        };
    }

    impl Pair {
        pub fn new() -> Result<Self, RecordError> {
            let (server, client) = configs()?;
            let (c, s, pending) = in_memory::handshake(server, client, PROXY_SERVER_NAME)?;
            if !pending.is_empty() {
                return Err(RecordError::Unexpected("tickets without being configured"));
            }
            Ok(Self {
                client: in_memory::take_over(c)?,
                server: in_memory::take_over(s)?,
            })
        }

        /// `end` replaces its sending key after this many records (at least one).
        pub fn set_key_update_interval(&mut self, end: End, records: u64) {
            with_end!(self, end, |r| r.set_key_update_interval(records));
        }

        /// Seal application data from `end` with [`Records::seal`]'s gathering, into
        /// destinations of `room` bytes per call, appending the records to `out`. False if a
        /// destination that small took nothing.
        pub fn seal(
            &mut self,
            end: End,
            bufs: &[&[u8]],
            room: usize,
            out: &mut Vec<u8>,
        ) -> Result<bool, RecordError> {
            let mut skip = 0;
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            let mut dst = vec![0u8; room];
            while skip < total {
                let mut left = skip;
                let slices: Vec<std::io::IoSlice<'_>> = bufs
                    .iter()
                    .map(|b| {
                        let k = left.min(b.len());
                        left -= k;
                        std::io::IoSlice::new(b.get(k..).unwrap_or_default())
                    })
                    .collect();
                let (taken, written) =
                    with_end!(self, end, |r| r.seal(&slices, total - skip, &mut dst))?;
                out.extend_from_slice(dst.get(..written).unwrap_or_default());
                if taken == 0 {
                    return Ok(false);
                }
                skip += taken;
            }
            Ok(true)
        }

        /// One record from `end` whose inner plaintext is `content`, then `inner_type`, then
        /// `padding` zeros, verbatim: whatever its type, size and content.
        pub fn seal_raw(
            &mut self,
            end: End,
            content: &[u8],
            inner_type: u8,
            padding: usize,
            out: &mut Vec<u8>,
        ) -> Result<(), RecordError> {
            let record = with_end!(self, end, |r| r.seal_padded(inner_type, content, padding))?;
            out.extend_from_slice(&record);
            Ok(())
        }

        /// A key update from `end`, asking for one back or not.
        pub fn key_update(
            &mut self,
            end: End,
            request: bool,
            out: &mut Vec<u8>,
        ) -> Result<(), RecordError> {
            let mut dst = [0u8; 5 + OVERHEAD];
            let n = with_end!(self, end, |r| r.update_tx_key(&mut dst, request))?;
            out.extend_from_slice(dst.get(..n).unwrap_or_default());
            Ok(())
        }

        /// close_notify from `end`.
        pub fn close(&mut self, end: End, out: &mut BytesMut) {
            with_end!(self, end, |r| r.push_alert(out, None));
        }

        /// `end` opens the record at the front of `input` in place (0 bytes while incomplete);
        /// what it answers (a key update) goes to `replies`.
        pub fn open<'a>(
            &mut self,
            end: End,
            input: &'a mut [u8],
            replies: &mut BytesMut,
        ) -> Result<(usize, Read<'a>), RecordError> {
            let (n, opened) = with_end!(self, end, |r| r.open(input, replies))?;
            Ok((n, opened.into()))
        }

        /// `end` opens the record at the front of `input` into `out`, if it is all there and
        /// `out` has room.
        pub fn open_to<'o>(
            &mut self,
            end: End,
            input: &[u8],
            out: &'o mut [u8],
            replies: &mut BytesMut,
        ) -> Result<Option<(usize, Read<'o>)>, RecordError> {
            let r = with_end!(self, end, |r| r.open_to(input, out, replies))?;
            Ok(r.map(|(n, opened)| (n, opened.into())))
        }
    }
}
