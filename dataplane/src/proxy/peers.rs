//! The proxies of the cluster as this proxy tells its agents: agents keep a tunnel to every
//! proxy, so users reach any agent through any proxy (see docs/decisions/0020). The set comes
//! from Auth's watch stream; each tunnel sends it to its agent when the tunnel comes up and,
//! when it changed since, with the next heartbeat the agent sends (every 10 s).

use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// At most this many proxies are announced (and accepted by agents).
pub const MAX_PROXIES: usize = 64;

/// What a proxy sends its agents in a heartbeat frame.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyAnnouncement {
    /// `host:port` agents dial to reach each proxy directly, this one included.
    pub proxies: Vec<String>,
    /// Which of them is the proxy sending this: an agent that reached it another way (a
    /// balancer's address) does not dial it a second time.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub this: String,
}

impl ProxyAnnouncement {
    /// Parse what a proxy sent: at most `MAX_PROXIES` addresses of the form `host:port`,
    /// each at most 255 bytes; anything else is refused whole.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let a: Self = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if a.proxies.len() > MAX_PROXIES {
            return Err(format!(
                "{} proxies; at most {MAX_PROXIES}",
                a.proxies.len()
            ));
        }
        for p in &a.proxies {
            let port = p.rsplit_once(':').map(|(_, port)| port.parse::<u16>());
            if p.len() > 255 || !matches!(port, Some(Ok(_))) {
                return Err(format!("`{p}` is not a host:port"));
            }
        }
        Ok(a)
    }
}

/// The current announcement, versioned so that each tunnel sends it once per change.
#[derive(Debug, Default)]
pub struct ProxySet {
    version: AtomicU64,
    payload: ArcSwap<Bytes>,
    this: ArcSwap<String>,
}

impl ProxySet {
    /// This proxy's own address among those announced.
    pub fn set_self(&self, addr: String) {
        self.this.store(std::sync::Arc::new(addr));
    }

    /// Announce `proxies` from now on (nothing if they are the ones announced).
    pub fn set(&self, mut proxies: Vec<String>) {
        proxies.sort();
        proxies.dedup();
        proxies.truncate(MAX_PROXIES);
        let this = String::clone(&self.this.load());
        let payload = Bytes::from(
            serde_json::to_vec(&ProxyAnnouncement { proxies, this }).unwrap_or_default(),
        );
        if **self.payload.load() == payload {
            return;
        }
        self.payload.store(std::sync::Arc::new(payload));
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// The announcement if its version is newer than `sent` (and the new version).
    pub(crate) fn newer_than(&self, sent: u64) -> Option<(u64, Bytes)> {
        let v = self.version.load(Ordering::Acquire);
        (v > sent).then(|| (v, Bytes::clone(&self.payload.load())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_change_is_sent_once_and_the_same_set_is_no_change() {
        let s = ProxySet::default();
        assert!(s.newer_than(0).is_none());
        s.set_self("b:1".into());
        s.set(vec!["b:1".into(), "a:2".into()]);
        let (v, p) = s.newer_than(0).unwrap();
        let a = ProxyAnnouncement::parse(&p).unwrap();
        assert_eq!(a.proxies, ["a:2", "b:1"]);
        assert_eq!(a.this, "b:1");
        assert!(s.newer_than(v).is_none());
        s.set(vec!["a:2".into(), "b:1".into(), "a:2".into()]);
        assert!(s.newer_than(v).is_none());
        s.set(vec!["a:2".into()]);
        assert!(s.newer_than(v).is_some());
    }

    #[test]
    fn malformed_announcements_are_refused() {
        for bad in [
            &b"not json"[..],
            br#"{"proxies":["no-port"]}"#,
            br#"{"proxies":["h:99999"]}"#,
            br#"{"proxies":"x"}"#,
        ] {
            assert!(ProxyAnnouncement::parse(bad).is_err());
        }
        let many: Vec<String> = (0..=MAX_PROXIES).map(|i| format!("h:{i}")).collect();
        let json = serde_json::to_vec(&ProxyAnnouncement {
            proxies: many,
            this: String::new(),
        })
        .unwrap();
        assert!(ProxyAnnouncement::parse(&json).is_err());
        assert_eq!(
            ProxyAnnouncement::parse(br#"{"proxies":["[::1]:3080","h:1"]}"#)
                .unwrap()
                .proxies
                .len(),
            2
        );
    }
}
