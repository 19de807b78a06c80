//! A send's bytes: a buffer from the thread's pool, written into directly (a TLS stream
//! encrypts into it), owned by the send operation while the kernel reads it.

use std::cell::RefCell;

use gatehouse_proto::pool;

/// One send buffer: what a connection queues while a send is in flight, at most.
pub(super) const SEND_BUF: usize = 192 * 1024;
/// Send buffers kept per thread for reuse (initialized once, never freed while in the pool).
const SEND_POOL_MAX: usize = 16;

thread_local! {
    static SEND_POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Bytes on their way to a socket: a buffer from the thread's pool, written into directly
/// (a TLS stream encrypts into it), owned by the send operation while the kernel reads it.
#[derive(Debug)]
pub(crate) struct SendBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl SendBuf {
    pub(super) fn from_pool() -> Self {
        let data = pool::take(&SEND_POOL, SEND_BUF);
        Self {
            data,
            start: 0,
            end: 0,
        }
    }

    /// Free room at the end, to write into and then [`Self::commit`].
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        self.data.get_mut(self.end..).unwrap_or_default()
    }

    pub(crate) fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.data.len());
    }

    /// Take back the last `n` committed bytes (returned as a copy).
    pub(crate) fn uncommit(&mut self, n: usize) -> Vec<u8> {
        let from = self.end.saturating_sub(n).max(self.start);
        let bytes = self.data.get(from..self.end).unwrap_or_default().to_vec();
        self.end = from;
        bytes
    }

    pub(super) fn pending(&self) -> &[u8] {
        self.data.get(self.start..self.end).unwrap_or_default()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.end == self.start
    }

    pub(super) fn advance(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }
}

impl Drop for SendBuf {
    fn drop(&mut self) {
        if self.data.len() == SEND_BUF {
            pool::give(&SEND_POOL, SEND_POOL_MAX, std::mem::take(&mut self.data));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bookkeeping a short send relies on: what was sent is skipped, the rest stays in order,
    /// and what a writer takes back comes off the end.
    #[test]
    fn a_partly_sent_buffer_keeps_the_rest_in_order() {
        let mut b = SendBuf::from_pool();
        assert!(b.is_empty());
        let room = b.spare().len();
        assert_eq!(room, SEND_BUF);
        b.spare()[..10].copy_from_slice(b"0123456789");
        b.commit(10);
        assert_eq!(b.pending(), b"0123456789");
        b.advance(3);
        assert_eq!((b.len(), b.pending()), (7, &b"3456789"[..]));
        assert_eq!(b.uncommit(2), b"89");
        assert_eq!(b.pending(), b"34567");
        // Taking back more than is pending stops at what was not sent yet.
        assert_eq!(b.uncommit(100), b"34567");
        assert!(b.is_empty());
        // Advancing or committing past the end clamps.
        b.commit(usize::MAX / 2);
        assert_eq!(b.len(), SEND_BUF - 3);
        b.advance(usize::MAX / 2);
        assert!(b.is_empty());
    }
}
