//! New SSH sessions per source address, throttled at the proxy: a token bucket per address,
//! sans-IO (callers pass `now`). A burst is allowed (a user opening a handful of shells, an
//! `ansible` run), a sustained flood from one address is not: each session past the rate is
//! refused with the time to wait, before it costs an agent an SSH handshake.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The rate new sessions from one address may keep up, and how many may come at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SessionRate {
    /// Sessions per second, sustained; 0 turns throttling off.
    pub per_second: u32,
    /// Sessions at once above the rate.
    pub burst: u32,
}

impl Default for SessionRate {
    fn default() -> Self {
        Self {
            per_second: 16,
            burst: 64,
        }
    }
}

/// Addresses remembered at most; past that the fullest buckets (idle addresses) are forgotten.
const MAX_ADDRESSES: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of every address seen recently.
#[derive(Debug)]
pub(crate) struct Throttle {
    rate: SessionRate,
    buckets: HashMap<IpAddr, Bucket>,
}

impl Throttle {
    pub(crate) fn new(rate: SessionRate) -> Self {
        Self {
            rate,
            buckets: HashMap::new(),
        }
    }

    /// May a new session from `addr` start at `now`? If not, how long until one may.
    pub(crate) fn admit(&mut self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.rate.per_second == 0 {
            return Ok(());
        }
        let per_second = f64::from(self.rate.per_second);
        let capacity = f64::from(self.rate.burst.max(1));
        if self.buckets.len() >= MAX_ADDRESSES && !self.buckets.contains_key(&addr) {
            self.forget_idle(now, per_second, capacity);
        }
        let bucket = self.buckets.entry(addr).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(capacity);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / per_second))
        }
    }

    /// Drop the addresses whose buckets have refilled (they would start full anyway).
    fn forget_idle(&mut self, now: Instant, per_second: f64, capacity: f64) {
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens + elapsed * per_second < capacity
        });
        if self.buckets.len() >= MAX_ADDRESSES {
            // A flood of distinct addresses: start over rather than grow.
            self.buckets.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_a_flood_waits_and_addresses_are_apart() {
        let t0 = Instant::now();
        let mut t = Throttle::new(SessionRate {
            per_second: 10,
            burst: 5,
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..5 {
            assert!(t.admit(a, t0).is_ok());
        }
        let wait = t.admit(a, t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Another address has its own bucket.
        assert!(t.admit(b, t0).is_ok());
        // A tenth of a second later one more session from `a` may start, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert!(t.admit(a, t1).is_ok());
        assert!(t.admit(a, t1).is_err());
        // Sustained at the rate, every session passes.
        for i in 1..=50u64 {
            assert!(t.admit(a, t1 + Duration::from_millis(100 * i)).is_ok());
        }
    }

    #[test]
    fn zero_turns_it_off_and_many_addresses_do_not_grow_it() {
        let t0 = Instant::now();
        let mut off = Throttle::new(SessionRate {
            per_second: 0,
            burst: 0,
        });
        for _ in 0..1000 {
            assert!(off.admit("10.0.0.1".parse().unwrap(), t0).is_ok());
        }
        let mut t = Throttle::new(SessionRate::default());
        for i in 0..(MAX_ADDRESSES as u32 + 1000) {
            let ip = IpAddr::from(i.to_be_bytes());
            assert!(t.admit(ip, t0).is_ok());
        }
        assert!(t.buckets.len() <= MAX_ADDRESSES);
    }
}
