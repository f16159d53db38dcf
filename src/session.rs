//! The session index: for each (model, cache_salt), the token chains stored under it, newest
//! first. A chain is a chunk-aligned token prefix; its chunk keys per rank follow from the
//! tokens (blake3 chunk hashes, salt in the key) and are derived when needed.
//!
//! Fed by the store path (one call per committed store) and by `thaw`; `end_session` drops
//! the request's bookkeeping. Bounded: at most `MAX_CHAINS` per session and `MAX_SESSIONS`
//! sessions (the least recently updated is dropped). Knows nothing of the stores.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;

/// Chains kept per session.
pub const MAX_CHAINS: usize = 8;
/// Sessions kept in memory.
pub const MAX_SESSIONS: usize = 4096;
/// Request ids remembered for `end_session`.
const MAX_REQUESTS: usize = 16384;

/// One stored token chain of a session.
#[derive(Debug, Clone)]
pub struct Chain {
    pub model: Arc<str>,
    pub world_size: u32,
    pub cache_salt: Arc<str>,
    /// Chunk-aligned token prefix that was stored.
    pub tokens: Arc<Vec<u32>>,
    pub updated: SystemTime,
}

#[derive(Debug, Clone)]
pub struct SessionSummary {
    pub model: Arc<str>,
    pub cache_salt: Arc<str>,
    pub chains: usize,
    pub newest_tokens: usize,
    pub world_size: u32,
    pub updated: SystemTime,
    pub open_requests: usize,
}

#[derive(Default)]
struct Session {
    chains: VecDeque<Chain>,
    tick: u64,
    open_requests: usize,
}

type SessionKey = (Arc<str>, Arc<str>);

#[derive(Default)]
struct Inner {
    sessions: HashMap<SessionKey, Session>,
    requests: HashMap<String, SessionKey>,
    tick: u64,
}

#[derive(Default)]
pub struct SessionIndex {
    inner: Mutex<Inner>,
}

impl SessionIndex {
    /// Record that `tokens` (chunk-aligned) are stored for (model, salt). A chain that is a
    /// prefix of `tokens` is extended; a chain that already covers them moves to the front.
    pub fn record(
        &self,
        model: &str,
        world_size: u32,
        cache_salt: &str,
        tokens: &[u32],
        request_id: Option<&str>,
    ) {
        if tokens.is_empty() {
            return;
        }
        let mut inner = self.inner.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let key: SessionKey = (model.into(), cache_salt.into());
        if !inner.sessions.contains_key(&key) && inner.sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = inner
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.tick)
                .map(|(k, _)| k.clone())
            {
                inner.sessions.remove(&oldest);
            }
        }
        if let Some(rid) = request_id {
            if !inner.requests.contains_key(rid) {
                if inner.requests.len() >= MAX_REQUESTS {
                    inner.requests.clear();
                }
                inner.requests.insert(rid.to_string(), key.clone());
                inner.sessions.entry(key.clone()).or_default().open_requests += 1;
            }
        }
        let session = inner.sessions.entry(key.clone()).or_default();
        session.tick = tick;
        let now = SystemTime::now();
        let found = session.chains.iter().position(|c| {
            c.world_size == world_size
                && (tokens.starts_with(&c.tokens) || c.tokens.starts_with(tokens))
        });
        let chain = match found.and_then(|i| session.chains.remove(i)) {
            Some(mut c) => {
                if tokens.len() > c.tokens.len() {
                    c.tokens = Arc::new(tokens.to_vec());
                }
                c.updated = now;
                c
            }
            None => Chain {
                model: key.0.clone(),
                world_size,
                cache_salt: key.1.clone(),
                tokens: Arc::new(tokens.to_vec()),
                updated: now,
            },
        };
        session.chains.push_front(chain);
        session.chains.truncate(MAX_CHAINS);
    }

    /// A request of the session ended (`end_session`).
    pub fn end_request(&self, request_id: &str) {
        let mut inner = self.inner.lock();
        if let Some(key) = inner.requests.remove(request_id) {
            if let Some(s) = inner.sessions.get_mut(&key) {
                s.open_requests = s.open_requests.saturating_sub(1);
            }
        }
    }

    /// The newest chain stored under `cache_salt`, over all models.
    pub fn newest(&self, cache_salt: &str) -> Option<Chain> {
        let inner = self.inner.lock();
        inner
            .sessions
            .iter()
            .filter(|((_, salt), _)| &**salt == cache_salt)
            .filter_map(|(_, s)| s.chains.front())
            .max_by_key(|c| c.updated)
            .cloned()
    }

    /// Every chain of `cache_salt`, newest first.
    pub fn chains(&self, cache_salt: &str) -> Vec<Chain> {
        let inner = self.inner.lock();
        let mut out: Vec<Chain> = inner
            .sessions
            .iter()
            .filter(|((_, salt), _)| &**salt == cache_salt)
            .flat_map(|(_, s)| s.chains.iter().cloned())
            .collect();
        out.sort_by_key(|c| std::cmp::Reverse(c.updated));
        out
    }

    /// Every session, most recently updated first.
    pub fn list(&self) -> Vec<SessionSummary> {
        let inner = self.inner.lock();
        let mut out: Vec<(u64, SessionSummary)> = inner
            .sessions
            .iter()
            .filter_map(|((model, salt), s)| {
                let newest = s.chains.front()?;
                Some((
                    s.tick,
                    SessionSummary {
                        model: model.clone(),
                        cache_salt: salt.clone(),
                        chains: s.chains.len(),
                        newest_tokens: newest.tokens.len(),
                        world_size: newest.world_size,
                        updated: newest.updated,
                        open_requests: s.open_requests,
                    },
                ))
            })
            .collect();
        out.sort_by_key(|(tick, _)| std::cmp::Reverse(*tick));
        out.into_iter().map(|(_, s)| s).collect()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extends_chains_and_keeps_newest_first() {
        let idx = SessionIndex::default();
        let a: Vec<u32> = (0..512).collect();
        idx.record("m", 1, "s", &a[..256], Some("r1"));
        idx.record("m", 1, "s", &a, Some("r1"));
        assert_eq!(
            idx.chains("s").len(),
            1,
            "a prefix is extended, not duplicated"
        );
        assert_eq!(idx.newest("s").unwrap().tokens.len(), 512);
        // A shorter prefix of an existing chain only touches it.
        idx.record("m", 1, "s", &a[..256], None);
        assert_eq!(idx.newest("s").unwrap().tokens.len(), 512);
        let b: Vec<u32> = (1000..1256).collect();
        idx.record("m", 1, "s", &b, Some("r2"));
        let chains = idx.chains("s");
        assert_eq!(chains.len(), 2);
        assert_eq!(chains[0].tokens[0], 1000, "newest first");
        assert!(idx.newest("other").is_none());
        assert_eq!(idx.list()[0].open_requests, 2);
        idx.end_request("r1");
        assert_eq!(idx.list()[0].open_requests, 1);
    }

    #[test]
    fn bounded_per_session() {
        let idx = SessionIndex::default();
        for i in 0..(MAX_CHAINS as u32 + 5) {
            let t: Vec<u32> = (i * 1000..i * 1000 + 256).collect();
            idx.record("m", 1, "s", &t, None);
        }
        assert_eq!(idx.chains("s").len(), MAX_CHAINS);
        assert_eq!(
            idx.newest("s").unwrap().tokens[0],
            (MAX_CHAINS as u32 + 4) * 1000
        );
    }
}
