//! Per-thread pools of same-sized byte buffers: initialized memory, zeroed once when first
//! allocated. The data plane's splice reads, tunnel input and sends go back to their thread's
//! pool when dropped, so a busy connection neither allocates (and faults in, or zeroes) a buffer
//! per read nor hands its pages back to the allocator between reads.

use std::cell::RefCell;
use std::thread::LocalKey;

/// A pool, declared with `thread_local!`; each holds buffers of one size.
pub type Pool = LocalKey<RefCell<Vec<Vec<u8>>>>;

/// A buffer of `len` bytes from `pool`, or a fresh, zeroed one.
pub fn take(pool: &'static Pool, len: usize) -> Vec<u8> {
    pool.try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()))
        .ok()
        .flatten()
        .filter(|b| b.len() == len)
        .unwrap_or_else(|| vec![0u8; len])
}

/// Give `buf` back to `pool`, which keeps at most `max`. Best effort: not during the thread's
/// teardown, and never re-entered.
pub fn give(pool: &'static Pool, max: usize, buf: Vec<u8>) {
    let _ = pool.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut()
            && p.len() < max
        {
            p.push(buf);
        }
    });
}
