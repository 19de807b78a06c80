//! The invariants the driver's `unsafe` relies on, checked against the real kernel on a ring of
//! the workers' shape but with very few buffers, so the edge cases come quickly:
//!
//! - the provided-buffer ring wraps its 16-bit tail (and the kernel its head) without losing or
//!   repeating a buffer;
//! - a receive that finds no buffer left (`ENOBUFS`) is asked again and loses nothing;
//! - a send the kernel takes only part of goes on with the rest, in order;
//! - a connection dropped with a receive in flight has it cancelled, its slot freed and its
//!   buffer back in the ring; one dropped with a send in flight lingers, then is cancelled.
//!
//! Each test runs only where io_uring works; CI's io_uring pass requires it
//! (`GATEHOUSE_PROXY_IO_BACKEND=io_uring`), as `io::backend::on_each_backend` does.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::buf_ring::BufRing;
use super::driver::{Kind, LINGER, Slots};
use super::{Driver, RingSize, UringStream};

/// Run `test` on this thread with a driver of `size` installed, as a worker runs.
fn on_ring<F, Fut>(size: RingSize, test: F)
where
    F: FnOnce(Rc<Driver>) -> Fut,
    Fut: Future<Output = ()>,
{
    if let Err(why) = super::probe() {
        if std::env::var("GATEHOUSE_PROXY_IO_BACKEND").as_deref() == Ok("io_uring") {
            panic!("io_uring required but unavailable: {why}");
        }
        eprintln!("io_uring test skipped: {why}");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(|| {
            if let Some(d) = super::current() {
                d.submit();
            }
        })
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let driver = Driver::install(size).unwrap();
        tokio::time::timeout(Duration::from_secs(60), test(driver))
            .await
            .expect("the test timed out");
    });
    drop(local);
    drop(rt);
    Driver::uninstall();
}

/// A connection served by `driver`, and its peer (a plain blocking socket).
fn pair(driver: &Rc<Driver>) -> (UringStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (ours, _) = listener.accept().unwrap();
    (UringStream::new(ours, Rc::clone(driver)).unwrap(), peer)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 131 + i / 7919) as u8).collect()
}

/// Wait (yielding to the runtime, which reaps) until no operation is in flight.
async fn settle(driver: &Rc<Driver>) {
    for _ in 0..2000 {
        driver.submit();
        driver.reap();
        if driver.ops.borrow().live == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{} operations still in flight", driver.ops.borrow().live);
}

/// In memory: 70,000 recycles wrap the 16-bit tail; every entry the kernel would read names
/// the buffer queued there, at that buffer's address, with its full length.
#[test]
fn the_buffer_ring_tail_wraps_without_losing_a_buffer() {
    let ring = BufRing::new(4, 64, 16).unwrap();
    assert_eq!(ring.published_tail(), 4, "all buffers offered at start");
    for bid in 0..4u16 {
        assert_eq!(ring.entry(bid), (ring.buffer_addr(bid), 64, bid));
    }
    let mut tail: u16 = 4;
    for i in 0..70_000u32 {
        let bid = (i % 4) as u16;
        ring.recycle(bid);
        assert_eq!(ring.entry(tail), (ring.buffer_addr(bid), 64, bid), "at {i}");
        tail = tail.wrapping_add(1);
        assert_eq!(ring.published_tail(), tail);
    }
    // A buffer id the ring does not have is ignored, and has no slot.
    ring.recycle(4);
    assert_eq!(ring.published_tail(), tail);
    assert!(ring.slot_mut(4, 10).is_empty());
    // A slot is the headroom and at most the buffer's size.
    assert_eq!(ring.slot_mut(1, 10).len(), 16 + 10);
    assert_eq!(ring.slot_mut(1, 1000).len(), 16 + 64);
}

#[test]
fn freed_operation_slots_are_reused() {
    let mut slots = Slots::default();
    let a = slots.insert_for_test(Kind::Recv);
    let b = slots.insert_for_test(Kind::Send);
    assert_ne!(a, b);
    assert_eq!(slots.live, 2);
    assert!(slots.remove(a).is_some());
    assert!(slots.remove(a).is_none(), "removed once");
    assert_eq!(slots.live, 1);
    assert_eq!(
        slots.insert_for_test(Kind::Accept),
        a,
        "the freed slot first"
    );
    assert_eq!(slots.live, 2);
}

/// With two buffers, 70,000 receives (each through the ring) cycle them until the ring's
/// indexes wrap past 2^16: every byte arrives once, in order.
#[test]
fn provided_buffers_wrap_around_the_ring_and_come_back() {
    let size = RingSize {
        entries: 64,
        buffers: 2,
        buffer_size: 4096,
    };
    on_ring(size, |driver| async move {
        let (mut ours, mut peer) = pair(&driver);
        const RECEIVES: usize = 70_000;
        const EACH: usize = 16;
        let sent = pattern(RECEIVES * EACH);
        let writer = {
            let sent = sent.clone();
            std::thread::spawn(move || peer.write_all(&sent).map(|()| peer))
        };
        let mut got = Vec::with_capacity(sent.len());
        let mut receives = 0;
        while got.len() < sent.len() {
            let r = std::future::poll_fn(|cx| {
                ours.poll_recv_with(cx, EACH, &[], |input| {
                    assert!(input.len() <= EACH);
                    got.extend_from_slice(input);
                })
            })
            .await
            .unwrap();
            assert!(r.is_some(), "the stream ended early");
            receives += 1;
        }
        assert_eq!(got, sent);
        assert!(receives >= RECEIVES, "{receives} receives");
        let _peer = writer.join().unwrap().unwrap();
        settle(&driver).await;
    });
}

/// With one buffer and two connections whose data arrives together, one receive finds no
/// buffer: it is asked again and gets its bytes once the other's buffer is back.
#[test]
fn a_receive_with_no_buffer_left_waits_and_loses_nothing() {
    let size = RingSize {
        entries: 64,
        buffers: 1,
        buffer_size: 4096,
    };
    on_ring(size, |driver| async move {
        let (mut a, mut pa) = pair(&driver);
        let (mut b, mut pb) = pair(&driver);
        let mut saw_no_buffer = false;
        for round in 0..50u8 {
            // Both receives wait in the kernel, then both connections get data at once.
            start_receive(&mut a);
            start_receive(&mut b);
            driver.submit();
            pa.write_all(&[round; 100]).unwrap();
            pb.write_all(&[round.wrapping_add(100); 100]).unwrap();
            // Let both complete in the kernel before either is polled (and its buffer recycled).
            std::thread::sleep(Duration::from_millis(20));
            driver.reap();
            let before = driver.no_buffers.get();
            let mut got_a = vec![0u8; 100];
            let mut got_b = vec![0u8; 100];
            a.read_exact(&mut got_a).await.unwrap();
            b.read_exact(&mut got_b).await.unwrap();
            assert_eq!(got_a, [round; 100]);
            assert_eq!(got_b, [round.wrapping_add(100); 100]);
            saw_no_buffer |= driver.no_buffers.get() > before;
        }
        assert!(saw_no_buffer, "no receive ever found the ring empty");
        settle(&driver).await;
    });
}

/// A small send buffer makes the kernel take part of each send: the rest goes out first, and
/// every byte arrives once, in order.
#[test]
fn a_short_send_goes_on_with_the_rest_in_order() {
    on_ring(RingSize::WORKER, |driver| async move {
        let (mut ours, peer) = pair(&driver);
        socket2::SockRef::from(&ours.fd)
            .set_send_buffer_size(16 * 1024)
            .unwrap();
        const TOTAL: usize = 8 << 20;
        let sent = pattern(TOTAL);
        let reader = std::thread::spawn(move || {
            let mut peer = peer;
            let mut got = Vec::with_capacity(TOTAL);
            let mut buf = vec![0u8; 256 * 1024];
            while got.len() < TOTAL {
                let n = peer.read(&mut buf).unwrap();
                assert!(n > 0, "closed early");
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        for chunk in sent.chunks(1 << 20) {
            ours.write_all(chunk).await.unwrap();
        }
        ours.flush().await.unwrap();
        let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        assert!(got == sent, "the bytes arrived changed or out of order");
        assert!(driver.short_sends.get() > 0, "no send was ever short");
        drop(ours);
        settle(&driver).await;
    });
}

/// A connection dropped while its receive waits: the receive is cancelled, its slot freed, and
/// the ring's one buffer still serves the next connection.
#[test]
fn dropping_a_connection_cancels_its_receive_and_keeps_the_buffer() {
    let size = RingSize {
        entries: 64,
        buffers: 1,
        buffer_size: 4096,
    };
    on_ring(size, |driver| async move {
        for _ in 0..20 {
            let (mut ours, mut peer) = pair(&driver);
            start_receive(&mut ours);
            driver.submit();
            assert_eq!(driver.ops.borrow().live, 1);
            drop(ours);
            // Data for the dropped connection must not take the buffer for good either.
            let _ = peer.write_all(b"late");
            settle(&driver).await;
        }
        let (mut ours, mut peer) = pair(&driver);
        peer.write_all(b"still served").unwrap();
        let mut got = [0u8; 12];
        ours.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"still served");
        drop(ours);
        settle(&driver).await;
    });
}

/// A connection dropped while its send waits for a peer that never reads: the send lingers
/// (its bytes still owned by the driver), then past its deadline it is cancelled and freed.
#[test]
fn a_send_in_flight_at_drop_lingers_then_is_cancelled() {
    on_ring(RingSize::WORKER, |driver| async move {
        let (mut ours, peer) = pair(&driver);
        socket2::SockRef::from(&peer)
            .set_recv_buffer_size(4096)
            .unwrap();
        socket2::SockRef::from(&ours.fd)
            .set_send_buffer_size(4096)
            .unwrap();
        // Write until a send waits in the ring for room the peer never makes.
        let data = pattern(64 * 1024);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut rounds = 0;
        loop {
            while let std::task::Poll::Ready(r) =
                std::pin::Pin::new(&mut ours).poll_write(&mut cx, &data)
            {
                assert!(r.unwrap() > 0);
            }
            driver.submit();
            std::thread::sleep(Duration::from_millis(20));
            driver.reap();
            let waiting = ours.send.is_some_and(|slot| {
                driver
                    .ops
                    .borrow_mut()
                    .get_mut(slot)
                    .is_some_and(|op| op.first.is_none() && !op.finished)
            });
            if waiting {
                break;
            }
            rounds += 1;
            assert!(rounds < 200, "no send ever stayed in flight");
        }
        drop(ours);
        assert_eq!(driver.lingering.borrow().len(), 1, "the send lingers");
        // Not yet past its deadline: kept.
        driver.expire_lingering(std::time::Instant::now());
        assert_eq!(driver.lingering.borrow().len(), 1);
        // Past it: cancelled; the kernel confirms and the slot is freed.
        driver.expire_lingering(std::time::Instant::now() + LINGER + Duration::from_secs(1));
        assert!(driver.lingering.borrow().is_empty());
        settle(&driver).await;
        drop(peer);
    });
}

/// Poll a read once, by hand, on a connection with nothing to read: its receive is now in the
/// ring (queued for the next submit).
fn start_receive(s: &mut UringStream) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut buf = [0u8; 64];
    let mut rb = tokio::io::ReadBuf::new(&mut buf);
    assert!(
        std::pin::Pin::new(s)
            .poll_read(&mut cx, &mut rb)
            .is_pending(),
        "nothing was sent yet"
    );
}
