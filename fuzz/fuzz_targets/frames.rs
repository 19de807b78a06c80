//! Arbitrary bytes through the frame decoder, whole and through the tunnel's input buffer in
//! pieces: never a panic, the same frames either way, and every frame decoded re-encodes to
//! bytes that decode to it again.
#![no_main]

use bytes::BytesMut;
use gatehouse_proto::tunnel::{Frame, Input};
use libfuzzer_sys::fuzz_target;

const MAX_FRAME: u32 = 65_536;

fuzz_target!(|data: &[u8]| {
    let Some((&piece, bytes)) = data.split_first() else {
        return;
    };
    let mut whole = Vec::new();
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(f)) = Frame::decode(&mut buf, MAX_FRAME) {
        let mut again = BytesMut::new();
        f.encode(&mut again);
        let back = Frame::decode(&mut again, MAX_FRAME);
        assert!(
            matches!(&back, Ok(Some(b)) if *b == f),
            "{f:?} re-decodes as {back:?}"
        );
        assert!(again.is_empty());
        whole.push(f);
    }
    // The same bytes in reads of `piece` bytes through the input buffer.
    let piece = usize::from(piece.max(1));
    let mut input = Input::default();
    let mut pieced = Vec::new();
    'reading: for chunk in bytes.chunks(piece) {
        let room = input.room(chunk.len());
        room[..chunk.len()].copy_from_slice(chunk);
        input.filled(chunk.len());
        loop {
            match input.decode(MAX_FRAME) {
                Ok(Some(f)) => pieced.push(f),
                Ok(None) => break,
                Err(_) => break 'reading,
            }
        }
    }
    assert_eq!(whole, pieced);
});
