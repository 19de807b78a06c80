//! Login failure limiting, sans-IO: callers pass `now`. Keys are the user name and the source
//! address, limited separately, so that guessing one user's password from many addresses and
//! many users' passwords from one address are both bounded. Unknown and known users are limited
//! alike, so the limiter reveals nothing about which users exist.

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub max_failures: u32,
    pub window: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    window_start: Instant,
}

#[derive(Debug)]
pub struct LoginLimiter {
    per_user: Limit,
    per_addr: Limit,
    entries: HashMap<String, Entry>,
    max_entries: usize,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        Self::new(
            Limit {
                max_failures: 5,
                window: Duration::from_secs(300),
            },
            Limit {
                max_failures: 30,
                window: Duration::from_secs(300),
            },
        )
    }
}

impl LoginLimiter {
    pub fn new(per_user: Limit, per_addr: Limit) -> Self {
        Self {
            per_user,
            per_addr,
            entries: HashMap::new(),
            max_entries: 100_000,
        }
    }

    fn keys(user: &str, addr: &str) -> [(String, bool); 2] {
        [
            (format!("u:{}", user.to_lowercase()), true),
            (format!("a:{addr}"), false),
        ]
    }

    /// `Err(retry_after)` if either key is locked out.
    pub fn check(&self, user: &str, addr: &str, now: Instant) -> Result<(), Duration> {
        for (key, is_user) in Self::keys(user, addr) {
            let limit = if is_user {
                self.per_user
            } else {
                self.per_addr
            };
            if let Some(e) = self.entries.get(&key) {
                let ends = e.window_start + limit.window;
                if e.failures >= limit.max_failures && now < ends {
                    return Err(ends - now);
                }
            }
        }
        Ok(())
    }

    pub fn record_failure(&mut self, user: &str, addr: &str, now: Instant) {
        if self.entries.len() >= self.max_entries {
            let (u, a) = (self.per_user.window, self.per_addr.window);
            let longest = u.max(a);
            self.entries
                .retain(|_, e| now.saturating_duration_since(e.window_start) < longest);
        }
        for (key, is_user) in Self::keys(user, addr) {
            let limit = if is_user {
                self.per_user
            } else {
                self.per_addr
            };
            let e = self.entries.entry(key).or_insert(Entry {
                failures: 0,
                window_start: now,
            });
            if now.saturating_duration_since(e.window_start) >= limit.window {
                *e = Entry {
                    failures: 0,
                    window_start: now,
                };
            }
            e.failures = e.failures.saturating_add(1);
        }
    }

    /// A successful login clears the user's failures (not the address's).
    pub fn record_success(&mut self, user: &str) {
        self.entries.remove(&format!("u:{}", user.to_lowercase()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_max_failures_and_unlocks_after_window() {
        let mut l = LoginLimiter::new(
            Limit {
                max_failures: 3,
                window: Duration::from_secs(60),
            },
            Limit {
                max_failures: 100,
                window: Duration::from_secs(60),
            },
        );
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(l.check("alice", "1.2.3.4", t0).is_ok(), "attempt {i}");
            l.record_failure("alice", "1.2.3.4", t0);
        }
        let wait = l
            .check("ALICE", "5.6.7.8", t0 + Duration::from_secs(10))
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        assert!(l.check("bob", "1.2.3.4", t0).is_ok());
        assert!(
            l.check("alice", "1.2.3.4", t0 + Duration::from_secs(60))
                .is_ok()
        );
    }

    #[test]
    fn address_limit_spans_users() {
        let mut l = LoginLimiter::new(
            Limit {
                max_failures: 100,
                window: Duration::from_secs(60),
            },
            Limit {
                max_failures: 2,
                window: Duration::from_secs(60),
            },
        );
        let t0 = Instant::now();
        l.record_failure("a", "9.9.9.9", t0);
        l.record_failure("b", "9.9.9.9", t0);
        assert!(l.check("c", "9.9.9.9", t0).is_err());
        assert!(l.check("c", "8.8.8.8", t0).is_ok());
    }

    #[test]
    fn success_clears_user_failures() {
        let mut l = LoginLimiter::default();
        let t0 = Instant::now();
        for _ in 0..4 {
            l.record_failure("a", "x", t0);
        }
        l.record_success("a");
        l.record_failure("a", "x", t0);
        assert!(l.check("a", "y", t0).is_ok());
    }
}
