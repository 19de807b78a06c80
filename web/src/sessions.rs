//! Web sessions, sans-IO (the caller passes `now`). A login makes one: the user's short-lived
//! certificates (the proxy holds them for the browser, which only ever sees an opaque token), a
//! CSRF token, and an expiry no later than the certificates'. The token is 256 random bits sent
//! once in the cookie; only its SHA-256 is kept, so a memory dump or a log shows no usable
//! token. Logout removes the session: the cookie is worth nothing after, here or anywhere.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// At most this many live sessions per proxy; past it, expired ones are swept and a login that
/// still finds no room is refused (a bound, not an eviction of someone's session).
pub const MAX_SESSIONS: usize = 10_000;

/// What a web session holds besides its token.
#[derive(Debug)]
pub struct WebSession<C> {
    pub user: String,
    pub roles: Vec<String>,
    pub logins: Vec<String>,
    /// Unix seconds; the certificates' expiry at the latest.
    pub expires: i64,
    /// Sent back by the page on every state-changing request (`X-CSRF-Token`) and WebSocket.
    pub csrf: String,
    /// The user's credentials (generic so the store stays testable without certificates).
    pub creds: C,
}

/// Why a session was not created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("too many web sessions on this proxy; try again later")]
    Full,
}

/// The live sessions of one proxy.
#[derive(Debug)]
pub struct Sessions<C> {
    by_hash: HashMap<[u8; 32], Arc<WebSession<C>>>,
    max: usize,
}

impl<C> Default for Sessions<C> {
    fn default() -> Self {
        Self::with_capacity(MAX_SESSIONS)
    }
}

/// A new random token (URL-safe base64 of 32 bytes).
pub fn new_token() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compare two secrets without an early exit.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<C> Sessions<C> {
    pub fn with_capacity(max: usize) -> Self {
        Self {
            by_hash: HashMap::new(),
            max,
        }
    }

    /// Keep `session`; its token comes back (the only time it exists in the clear here).
    pub fn insert(&mut self, session: WebSession<C>, now: i64) -> Result<String, StoreError> {
        if self.by_hash.len() >= self.max {
            self.sweep(now);
        }
        if self.by_hash.len() >= self.max {
            return Err(StoreError::Full);
        }
        let token = new_token();
        self.by_hash.insert(hash(&token), Arc::new(session));
        Ok(token)
    }

    /// The session of `token`, if it exists and has not expired at `now` (an expired one is
    /// dropped).
    pub fn get(&mut self, token: &str, now: i64) -> Option<Arc<WebSession<C>>> {
        let key = hash(token);
        match self.by_hash.get(&key) {
            Some(s) if s.expires > now => Some(Arc::clone(s)),
            Some(_) => {
                self.by_hash.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Revoke: the token is worthless from now on. True if it was live.
    pub fn remove(&mut self, token: &str) -> bool {
        self.by_hash.remove(&hash(token)).is_some()
    }

    /// Drop every expired session.
    pub fn sweep(&mut self, now: i64) {
        self.by_hash.retain(|_, s| s.expires > now);
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(expires: i64) -> WebSession<()> {
        WebSession {
            user: "alice".into(),
            roles: vec![],
            logins: vec![],
            expires,
            csrf: new_token(),
            creds: (),
        }
    }

    #[test]
    fn a_token_works_until_expiry_or_logout_only() {
        let mut s = Sessions::default();
        let t = s.insert(session(100), 0).unwrap();
        assert!(s.get(&t, 99).is_some());
        assert!(s.get(&t, 100).is_none(), "expired at its second");
        assert!(s.is_empty(), "an expired session is dropped when seen");
        let t = s.insert(session(100), 0).unwrap();
        assert!(s.remove(&t));
        assert!(s.get(&t, 1).is_none());
        assert!(!s.remove(&t));
        assert!(s.get("a token of another cluster", 1).is_none());
        assert!(s.get("", 1).is_none());
    }

    #[test]
    fn the_store_is_bounded_and_sweeps_before_refusing() {
        let mut s = Sessions::with_capacity(2);
        s.insert(session(10), 0).unwrap();
        let live = s.insert(session(1000), 0).unwrap();
        assert_eq!(s.insert(session(1000), 5).err(), Some(StoreError::Full));
        // At 20 the first has expired: swept, room for one.
        assert!(s.insert(session(1000), 20).is_ok());
        assert_eq!(s.insert(session(1000), 20).err(), Some(StoreError::Full));
        assert!(s.get(&live, 20).is_some());
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn tokens_are_unique_and_compared_in_full() {
        let a = new_token();
        assert_eq!(a.len(), 43);
        assert_ne!(a, new_token());
        assert!(same_secret(&a, &a.clone()));
        assert!(!same_secret(&a, &a[..42]));
        assert!(!same_secret(&a, &new_token()));
    }
}
