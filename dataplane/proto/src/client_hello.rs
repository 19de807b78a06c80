//! Reading the ALPN protocols out of a TLS ClientHello without terminating TLS, so the Proxy can
//! pass `gatehouse-auth` connections through to Auth byte for byte (the client's certificate
//! then authenticates to Auth itself) and terminate everything else. Pure: bytes in, answer out.

/// What the bytes seen so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// More bytes are needed (at most `MAX_HELLO` in total).
    NeedMore,
    /// A ClientHello; its ALPN protocols (empty if it offered none) and SNI.
    Hello {
        alpn: Vec<Vec<u8>>,
        sni: Option<String>,
    },
    /// Not TLS, or a malformed ClientHello.
    NotTls(&'static str),
}

/// The most we read before deciding (a ClientHello fits one record, ≤ 16 KiB + header).
pub const MAX_HELLO: usize = 16 * 1024 + 5;

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.buf.get(..n)?, self.buf.get(n..)?);
        self.buf = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).and_then(|b| b.first().copied())
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|b| b.iter().fold(0u16, |a, x| (a << 8) | u16::from(*x)))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| b.iter().fold(0usize, |a, x| (a << 8) | usize::from(*x)))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// Inspect the first bytes of a connection.
pub fn peek(bytes: &[u8]) -> Peek {
    let mut r = Reader { buf: bytes };
    let Some(content_type) = r.u8() else {
        return Peek::NeedMore;
    };
    if content_type != 0x16 {
        return Peek::NotTls("not a TLS handshake record");
    }
    let Some(_version) = r.u16() else {
        return Peek::NeedMore;
    };
    let Some(len) = r.u16() else {
        return Peek::NeedMore;
    };
    if len as usize > 16 * 1024 {
        return Peek::NotTls("record too long");
    }
    let Some(record) = r.take(len as usize) else {
        return Peek::NeedMore;
    };
    let mut h = Reader { buf: record };
    let Some(msg_type) = h.u8() else {
        return Peek::NotTls("empty record");
    };
    if msg_type != 0x01 {
        return Peek::NotTls("first handshake message is not a ClientHello");
    }
    let Some(msg_len) = h.u24() else {
        return Peek::NotTls("truncated");
    };
    // A ClientHello split over several records is legal but never sent by the clients we serve.
    let Some(body) = h.take(msg_len) else {
        return Peek::NotTls("ClientHello spans records");
    };
    match parse_client_hello(body) {
        Some(p) => p,
        None => Peek::NotTls("malformed ClientHello"),
    }
}

fn parse_client_hello(body: &[u8]) -> Option<Peek> {
    let mut b = Reader { buf: body };
    b.u16()?; // legacy version
    b.take(32)?; // random
    b.vec8()?; // session id
    b.vec16()?; // cipher suites
    b.vec8()?; // compression methods
    let mut alpn = Vec::new();
    let mut sni = None;
    if b.buf.is_empty() {
        return Some(Peek::Hello { alpn, sni });
    }
    let mut exts = Reader { buf: b.vec16()? };
    while !exts.buf.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        match ty {
            0x0010 => {
                let mut list = Reader {
                    buf: Reader { buf: data }.vec16()?,
                };
                while !list.buf.is_empty() {
                    alpn.push(list.vec8()?.to_vec());
                }
            }
            0x0000 => {
                let mut list = Reader {
                    buf: Reader { buf: data }.vec16()?,
                };
                while !list.buf.is_empty() {
                    let kind = list.u8()?;
                    let name = list.vec16()?;
                    if kind == 0 {
                        sni = std::str::from_utf8(name).ok().map(str::to_owned);
                    }
                }
            }
            _ => {}
        }
    }
    Some(Peek::Hello { alpn, sni })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn real_client_hello(alpn: &[&[u8]], sni: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_alpn_and_sni_from_a_rustls_client_hello() {
        let hello = real_client_hello(&[b"gatehouse-auth", b"h2"], "proxy.example");
        assert_eq!(
            peek(&hello),
            Peek::Hello {
                alpn: vec![b"gatehouse-auth".to_vec(), b"h2".to_vec()],
                sni: Some("proxy.example".into())
            }
        );
        for n in 0..hello.len() {
            assert!(
                matches!(peek(&hello[..n]), Peek::NeedMore),
                "prefix of {n} bytes"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Whatever a client sends first, the peek answers (no panic); a hello is only reported
        /// once its whole record is in.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..MAX_HELLO + 64)) {
            if let Peek::Hello { .. } = peek(&bytes) {
                let len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
                proptest::prop_assert!(bytes.len() >= 5 + len);
            }
        }

        /// Any ALPN list and server name a rustls client offers reads back exactly, and a byte
        /// flipped anywhere in the hello still gets an answer, never a panic.
        #[test]
        fn reads_back_what_rustls_offers(
            alpn in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 1..40), 1..6),
            labels in proptest::collection::vec("[a-z][a-z0-9]{0,14}", 1..5),
            flip in proptest::prelude::any::<proptest::sample::Index>(),
            bit in 0u8..8,
        ) {
            let sni = labels.join(".");
            let protocols: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
            let mut hello = real_client_hello(&protocols, &sni);
            proptest::prop_assert_eq!(peek(&hello), Peek::Hello { alpn: alpn.clone(), sni: Some(sni) });
            let at = flip.index(hello.len());
            hello[at] ^= 1 << bit;
            let _ = peek(&hello);
        }
    }

    #[test]
    fn refuses_non_tls() {
        assert!(matches!(peek(b"GET / HTTP/1.1\r\n"), Peek::NotTls(_)));
        assert!(matches!(peek(b"SSH-2.0-OpenSSH_9.2\r\n"), Peek::NotTls(_)));
        assert!(matches!(
            peek(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]),
            Peek::NotTls(_)
        ));
    }
}
