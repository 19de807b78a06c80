//! Arbitrary bytes as the start of a connection: the ClientHello reader never panics, and a
//! hello that arrives in pieces is never decided on early: each prefix needs more bytes or
//! already gives the answer the whole gives.
#![no_main]

use gatehouse_proto::client_hello::{Peek, peek};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = peek(data);
    // Every prefix either needs more or already says the same as the whole.
    for cut in [data.len() / 2, data.len().saturating_sub(1)] {
        match peek(&data[..cut]) {
            Peek::NeedMore => {}
            early => assert_eq!(early, whole, "a prefix of {cut} bytes decided differently"),
        }
    }
});
