//! The small exchange that opens a user session on the `gatehouse-ssh` and `gatehouse-tcp`
//! ALPNs, after TLS and before raw bytes: one length-prefixed JSON request from the client and
//! one length-prefixed JSON answer from the Proxy. Pure encode/decode with a size cap.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

pub const MAX_MESSAGE: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRequest {
    /// For SSH: a node name, host id or label selector. For TCP: `APP` or `APP@NODE`.
    pub target: String,
    /// For SSH: the login the client intends to use (for audit; the agent enforces access).
    #[serde(default)]
    pub login: String,
    /// A trusted leaf cluster to reach the target in (empty: this proxy's cluster).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster: String,
    /// Sent by a leaf cluster's proxy for a root cluster's user (taken from a proxy's
    /// certificate only; anyone else's is ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf: Option<OnBehalf>,
}

/// The user a leaf's proxy opens a session for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnBehalf {
    pub user: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub source_addr: String,
    /// The cluster the user belongs to (the root).
    pub cluster: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<String>,
    /// The node that serves the session.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_id: String,
    /// For an SSH session: the cluster's host CA keys trusted now (OpenSSH public key lines),
    /// so a client keeps its `known_hosts` current through a host CA rotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_ca: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("message of {0} bytes exceeds {MAX_MESSAGE}")]
    TooLarge(usize),
    #[error("message is not valid JSON: {0}")]
    Json(String),
}

pub fn encode<T: Serialize>(msg: &T) -> Bytes {
    let json = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = BytesMut::with_capacity(4 + json.len());
    out.put_u32(json.len() as u32);
    out.put_slice(&json);
    out.freeze()
}

/// Decode one message from the front of `buf` if complete; consumes it.
pub fn decode<T: for<'de> Deserialize<'de>>(buf: &mut BytesMut) -> Result<Option<T>, MessageError> {
    let Some(len_bytes) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len_bytes.try_into().unwrap_or([0xFF; 4])) as usize;
    if len > MAX_MESSAGE {
        return Err(MessageError::TooLarge(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    let body = buf.split_to(len);
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| MessageError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Arbitrary bytes from a client decode to a request, an error or a wait, never a panic,
        /// and a wait never holds more than one message's worth.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..MAX_MESSAGE + 64)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode::<SessionRequest>(&mut buf) {}
            proptest::prop_assert!(buf.len() <= 4 + MAX_MESSAGE + 64);
        }

        /// Requests sent back to back and read in pieces of any size decode to the same requests.
        #[test]
        fn requests_in_any_pieces(
            reqs in proptest::collection::vec(("\\PC{0,60}", "\\PC{0,20}"), 1..6),
            cuts in proptest::collection::vec(1usize..200, 1..40),
        ) {
            let sent: Vec<SessionRequest> = reqs
                .into_iter()
                .map(|(target, login)| SessionRequest {
                    target,
                    login,
                    cluster: String::new(),
                    on_behalf: None,
                })
                .collect();
            let wire: Vec<u8> = sent.iter().flat_map(|r| encode(r).to_vec()).collect();
            let (mut buf, mut got, mut at) = (BytesMut::new(), Vec::new(), 0);
            for cut in cuts.iter().cycle() {
                if at >= wire.len() {
                    break;
                }
                let end = (at + cut).min(wire.len());
                buf.extend_from_slice(&wire[at..end]);
                at = end;
                while let Some(r) = decode::<SessionRequest>(&mut buf).unwrap() {
                    got.push(r);
                }
            }
            proptest::prop_assert_eq!(got, sent);
        }
    }

    #[test]
    fn roundtrip_partial_and_bad() {
        let req = SessionRequest {
            target: "web1".into(),
            login: "alice".into(),
            cluster: String::new(),
            on_behalf: None,
        };
        let wire = encode(&req);
        let mut buf = BytesMut::new();
        for b in wire.iter() {
            assert_eq!(decode::<SessionRequest>(&mut buf).unwrap(), None);
            buf.put_u8(*b);
        }
        assert_eq!(decode::<SessionRequest>(&mut buf).unwrap(), Some(req));
        let mut big = BytesMut::from(&[0u8, 1, 0, 0][..]);
        assert_eq!(
            decode::<SessionRequest>(&mut big),
            Err(MessageError::TooLarge(65536))
        );
        let mut junk = BytesMut::from(&[0u8, 0, 0, 2, b'{', b'x'][..]);
        assert!(matches!(
            decode::<SessionRequest>(&mut junk),
            Err(MessageError::Json(_))
        ));
    }
}
