//! Arbitrary bytes as a session recording (what Auth receives from agents and what `gsh play`
//! and `verify` read): never a panic, in any pieces; a failure names a chunk at or before the
//! bytes read, and the reader never consumes more than it was given.
#![no_main]

use gatehouse_recording::{Reader, scan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut r = Reader::new();
    for piece in data.chunks(split) {
        r.push(piece);
        loop {
            match r.next_chunk() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    assert!(e.chunk().is_some());
                    break;
                }
            }
        }
    }
    assert!(r.consumed() as usize <= data.len());
    let _ = r.finish();
    let s = scan(data);
    assert!(s.reader.consumed() as usize <= data.len());
});
