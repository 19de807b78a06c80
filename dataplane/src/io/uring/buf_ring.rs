//! The ring of provided receive buffers (`IORING_REGISTER_PBUF_RING`): memory shared with the
//! kernel, which takes a buffer from it only when data arrives for a receive. Each slot has
//! room in front (`headroom`) where a TLS record split across receives is completed in place.

use std::alloc::Layout;
use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types;

/// A ring of provided receive buffers (`IORING_REGISTER_PBUF_RING`).
pub(super) struct BufRing {
    /// Page-aligned array of `entries` ring entries shared with the kernel.
    pub(super) ring: *mut types::BufRingEntry,
    pub(super) entries: u16,
    /// `entries` slots of `headroom + size` bytes; the kernel writes into the last `size`.
    pub(super) data: *mut u8,
    pub(super) size: usize,
    pub(super) headroom: usize,
    pub(super) tail: Cell<u16>,
}

impl BufRing {
    fn ring_layout(entries: u16) -> io::Result<Layout> {
        Layout::from_size_align(
            usize::from(entries) * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)
    }

    fn data_layout(entries: u16, slot: usize) -> io::Result<Layout> {
        Layout::from_size_align(usize::from(entries) * slot, 4096).map_err(io::Error::other)
    }

    fn slot(&self) -> usize {
        self.headroom + self.size
    }

    pub(super) fn new(entries: u16, size: usize, headroom: usize) -> io::Result<Self> {
        let ring_layout = Self::ring_layout(entries)?;
        let data_layout = Self::data_layout(entries, headroom + size)?;
        // SAFETY: both layouts have non-zero size; null results are checked.
        let ring = unsafe { std::alloc::alloc_zeroed(ring_layout) }.cast::<types::BufRingEntry>();
        if ring.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        // Not zeroed: pages the kernel never fills are never touched (RSS grows with use).
        // SAFETY: as above.
        let data = unsafe { std::alloc::alloc(data_layout) };
        if data.is_null() {
            // SAFETY: allocated above with this layout.
            unsafe { std::alloc::dealloc(ring.cast(), ring_layout) };
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let r = Self {
            ring,
            entries,
            data,
            size,
            headroom,
            tail: Cell::new(0),
        };
        for bid in 0..entries {
            r.put(bid);
        }
        r.publish();
        Ok(r)
    }

    /// Queue buffer `bid` at the tail (visible to the kernel after [`Self::publish`]).
    pub(super) fn put(&self, bid: u16) {
        let tail = self.tail.get();
        let idx = usize::from(tail & (self.entries - 1));
        // SAFETY: idx < entries; the entry is ours until the tail moves past it.
        let entry = unsafe { &mut *self.ring.add(idx) };
        // SAFETY: bid < entries, so the buffer lies inside `data`.
        let at = usize::from(bid) * self.slot() + self.headroom;
        entry.set_addr(unsafe { self.data.add(at) } as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail.set(tail.wrapping_add(1));
    }

    pub(super) fn publish(&self) {
        // SAFETY: the tail field overlays the first entry's reserved field (the kernel ABI);
        // the kernel reads it concurrently, hence the atomic release store.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail.get(), Ordering::Release);
        }
    }

    /// Give buffer `bid` back to the kernel.
    pub(super) fn recycle(&self, bid: u16) {
        if bid < self.entries {
            self.put(bid);
            self.publish();
        }
    }

    /// Buffer `bid`'s slot: `headroom` bytes, then the `len` bytes the kernel wrote.
    #[allow(clippy::mut_from_ref)]
    pub(super) fn slot_mut(&self, bid: u16, len: usize) -> &mut [u8] {
        if bid >= self.entries {
            return &mut [];
        }
        let len = self.headroom + len.min(self.size);
        // SAFETY: the kernel filled buffer `bid` and handed it to us with the completion; it
        // does not touch the slot again until we recycle it, and only one completion (one
        // caller) holds a given `bid` at a time.
        unsafe {
            std::slice::from_raw_parts_mut(self.data.add(usize::from(bid) * self.slot()), len)
        }
    }

    /// The `len` bytes the kernel wrote into buffer `bid`.
    pub(super) fn filled(&self, bid: u16, len: usize) -> &[u8] {
        self.slot_mut(bid, len)
            .get(self.headroom..)
            .unwrap_or_default()
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if let (Ok(ring_layout), Ok(data_layout)) = (
            Self::ring_layout(self.entries),
            Self::data_layout(self.entries, self.slot()),
        ) {
            // SAFETY: allocated in `new` with these layouts; the ring is unregistered (or its
            // io_uring closed and drained) before the driver drops this.
            unsafe {
                std::alloc::dealloc(self.ring.cast(), ring_layout);
                std::alloc::dealloc(self.data, data_layout);
            }
        }
    }
}

impl BufRing {
    /// Ring entry `idx` as the kernel would read it: (buffer address, length, buffer id).
    #[cfg(test)]
    pub(super) fn entry(&self, idx: u16) -> (u64, u32, u16) {
        let idx = usize::from(idx & (self.entries - 1));
        // SAFETY: idx < entries; tests read entries no kernel is using.
        let e = unsafe { &*self.ring.add(idx) };
        (e.addr(), e.len(), e.bid())
    }

    /// The tail as published to the kernel.
    #[cfg(test)]
    pub(super) fn published_tail(&self) -> u16 {
        // SAFETY: as in `publish`.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring).cast_mut();
            AtomicU16::from_ptr(tail).load(Ordering::Acquire)
        }
    }

    /// Where buffer `bid`'s bytes start (past its headroom).
    #[cfg(test)]
    pub(super) fn buffer_addr(&self, bid: u16) -> u64 {
        self.data as u64 + (usize::from(bid) * self.slot() + self.headroom) as u64
    }
}
