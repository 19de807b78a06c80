//! Arbitrary bytes as the session request a client sends after TLS: never a panic, nothing
//! over the size cap accepted, and a decoded request re-encodes to one that decodes the same.
#![no_main]

use bytes::BytesMut;
use gatehouse_proto::session::{MAX_MESSAGE, SessionRequest, SessionResponse, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(req)) = decode::<SessionRequest>(&mut buf) {
        assert!(data.len() - buf.len() <= 4 + MAX_MESSAGE);
        let mut again = BytesMut::from(&encode(&req)[..]);
        assert_eq!(decode::<SessionRequest>(&mut again), Ok(Some(req)));
    }
    let mut buf = BytesMut::from(data);
    let _ = decode::<SessionResponse>(&mut buf);
});
