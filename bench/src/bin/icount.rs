//! The instruction-count benchmark's workload, run under `valgrind --tool=callgrind` by
//! `scripts/icount` (instructions do not depend on the other tenants of a noisy machine, wall
//! time does). Fixed work, no I/O: encode and decode 100,000 data frames, then move 16 MiB through
//! two tunnel connections in memory (the forwarding path's state-machine cost).

use std::hint::black_box;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use gatehouse_proto::tunnel::{Config, Connection, Event, Frame, Side};

fn codec() -> usize {
    let frame = Frame::Data {
        stream: 2,
        data: Bytes::from(vec![7u8; 1024]),
    };
    let mut wire = BytesMut::with_capacity(64 * 1024);
    let mut decoded = 0;
    for _ in 0..100_000 {
        frame.encode(&mut wire);
        while let Ok(Some(f)) = Frame::decode(&mut wire, 1 << 20) {
            decoded += black_box(f).encoded_len();
        }
    }
    decoded
}

fn forward(total: usize) -> Result<usize, String> {
    let now = Instant::now();
    let mut proxy = Connection::new(Side::Listener, Config::default(), now);
    let mut agent = Connection::new(Side::Dialer, Config::default(), now);
    let step = |from: &mut Connection, to: &mut Connection| -> Result<(), String> {
        if let Some(b) = from.poll_transmit() {
            to.handle_input(&b, now).map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    step(&mut proxy, &mut agent)?;
    step(&mut agent, &mut proxy)?;
    let id = proxy
        .open("tcp:sink", Bytes::new())
        .map_err(|e| e.to_string())?;
    step(&mut proxy, &mut agent)?;
    agent.accept(id).map_err(|e| e.to_string())?;
    step(&mut agent, &mut proxy)?;
    let chunk = vec![0x42u8; 32 * 1024];
    let (mut sent, mut received) = (0, 0);
    while received < total {
        if sent < total {
            sent += proxy.send(id, &chunk).map_err(|e| e.to_string())?;
        }
        step(&mut proxy, &mut agent)?;
        while let Some(ev) = agent.poll_event() {
            if let Event::Data { data, .. } = ev {
                received += data.len();
                agent.consumed(id, data.len(), now);
            }
        }
        step(&mut agent, &mut proxy)?;
        while proxy.poll_event().is_some() {}
    }
    Ok(received)
}

fn main() {
    let decoded = codec();
    match forward(16 << 20) {
        Ok(n) => println!("decoded {decoded} bytes of frames; forwarded {n} bytes"),
        Err(e) => {
            eprintln!("icount: {e}");
            std::process::exit(1);
        }
    }
}
