//! The session index: for each (model, cache_salt), the token chains stored under it, newest
//! first. A chain is a chunk-aligned token prefix; its chunk keys per rank follow from the
//! tokens (blake3 chunk hashes, salt in the key) and are derived when needed.
//!
//! Fed by the store path (one call per committed store) and by `thaw`; `end_session` drops
//! the request's bookkeeping. Bounded: at most `MAX_CHAINS` per session and `MAX_SESSIONS`
//! sessions (the least recently updated is dropped). Knows nothing of the stores.
//!
//! With L2, every change is also journaled beside it (`journal`), so the index survives a
//! restart or a kill -9 of cwm: `attach_journal` replays it at start.

pub mod journal;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;

use journal::{Entry, Journal, Replay};

use crate::store::seal::Sealer;

/// Chains kept per session (a journal entry names one by its position in a byte).
pub const MAX_CHAINS: usize = 8;
const _: () = assert!(MAX_CHAINS < u8::MAX as usize);
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
    /// Where changes are appended (none without L2, or after a write failed).
    journal: Option<Journal>,
}

/// What `attach_journal` restored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Restored {
    pub sessions: usize,
    pub chains: usize,
    pub replay: Replay,
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
        let key: SessionKey = (model.into(), cache_salt.into());
        // At the journal's precision, so a replay rebuilds the same times.
        let now = journal::to_millis(SystemTime::now());
        let base = inner.apply(&key, world_size, tokens, now);
        if let Some(rid) = request_id {
            if !inner.requests.contains_key(rid) {
                if inner.requests.len() >= MAX_REQUESTS {
                    inner.requests.clear();
                }
                inner.requests.insert(rid.to_string(), key.clone());
                inner.sessions.entry(key.clone()).or_default().open_requests += 1;
            }
        }
        if inner.journal.is_some() {
            let entry = Entry {
                model: model.into(),
                cache_salt: cache_salt.into(),
                world_size,
                updated: now,
                base: base.map(|(i, len)| (i, len as u32)),
                suffix: tokens[base.map_or(0, |(_, len)| len)..].to_vec(),
            };
            inner.journal_append(&entry);
        }
    }

    /// Replay the journal at `path` (if any) into this index, rewrite it compacted, and
    /// journal every change from now on, sealed when `sealer` has a key (which also opens
    /// sealed entries; those that do not open are skipped and counted). Journals an earlier
    /// start set aside are replayed first; the journal at `path` is set aside itself if some
    /// of its entries did not open, so they wait for a start with their key instead of being
    /// compacted away. Call before the index is used.
    pub fn attach_journal(&self, path: &Path, sealer: Sealer) -> std::io::Result<Restored> {
        let set_aside = journal::set_aside_files(path)?;
        let mut chains = Vec::new();
        let mut replay = Replay::default();
        let mut opened_whole = Vec::new();
        for file in set_aside.iter().map(PathBuf::as_path).chain([path]) {
            let (entries, r) = Journal::read(file, &sealer)?;
            // Each file into an index of its own: its entries name chains by their positions
            // in its own history, which another file's chains would shift.
            let mut own = Inner::default();
            own.replay(file, &entries);
            chains.extend(own.entries());
            replay.entries += r.entries;
            replay.dropped_bytes += r.dropped_bytes;
            replay.unopened += r.unopened;
            if r.unopened == 0 {
                if file != path {
                    opened_whole.push(file);
                }
            } else if file == path {
                let kept = journal::set_aside(path)?;
                tracing::error!(
                    path = %path.display(),
                    kept = %kept.display(),
                    skipped = r.unopened,
                    "session journal entries sealed under another key (or this server has no \
                     --encryption-key-file) did not open: skipped; the journal is kept whole \
                     for a start with the key that sealed them"
                );
            } else {
                tracing::warn!(
                    path = %file.display(),
                    skipped = r.unopened,
                    "a session journal set aside by an earlier start still does not open \
                     whole: kept"
                );
            }
        }
        // Every chain in full (no entry names another), oldest first: chains of several
        // files merge as if they had been recorded in that order.
        chains.sort_by_key(|e| e.updated);
        let mut inner = self.inner.lock();
        inner.replay(path, &chains);
        let whole = inner.entries();
        inner.journal = Some(Journal::create(path, &whole, sealer)?);
        for file in opened_whole {
            // Its chains are in the journal just written.
            if let Err(e) = std::fs::remove_file(file) {
                tracing::warn!(path = %file.display(), "session journal set aside: {e}");
            }
        }
        Ok(Restored {
            sessions: inner.sessions.len(),
            chains: whole.len(),
            replay,
        })
    }

    /// Make every journaled change durable (a clean stop).
    pub fn sync_journal(&self) {
        if let Some(j) = &self.inner.lock().journal {
            if let Err(e) = j.sync() {
                tracing::warn!("session journal: fsync failed: {e}");
            }
        }
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

    /// The newest chain of every salt (over all models), in one pass.
    pub fn newest_per_salt(&self) -> Vec<Chain> {
        let inner = self.inner.lock();
        let mut newest: HashMap<&str, &Chain> = HashMap::new();
        for ((_, salt), s) in &inner.sessions {
            if let Some(c) = s.chains.front() {
                let e = newest.entry(salt).or_insert(c);
                if c.updated > e.updated {
                    *e = c;
                }
            }
        }
        newest.into_values().cloned().collect()
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

impl Inner {
    /// Apply a journal's entries (read from `path`) in order, up to the first that names a
    /// chain this index does not have.
    fn replay(&mut self, path: &Path, entries: &[Entry]) {
        for e in entries {
            let key: SessionKey = (e.model.as_str().into(), e.cache_salt.as_str().into());
            let mut tokens = match e.base {
                None => Vec::new(),
                Some((i, len)) => {
                    let chain = self
                        .sessions
                        .get(&key)
                        .and_then(|s| s.chains.get(i as usize))
                        .filter(|c| c.tokens.len() >= len as usize);
                    match chain {
                        Some(c) => c.tokens[..len as usize].to_vec(),
                        None => {
                            tracing::warn!(
                                path = %path.display(),
                                "session journal entry names a chain the index does not have: \
                                 replay stopped there"
                            );
                            break;
                        }
                    }
                }
            };
            tokens.extend_from_slice(&e.suffix);
            if !tokens.is_empty() {
                self.apply(&key, e.world_size, &tokens, e.updated);
            }
        }
    }

    /// Record that `tokens` are stored for `key` at `now`: the one update of the index, used
    /// live and by a replay alike. The chain it extended or touched (its position, newest
    /// first, before the update) and how many of `tokens` that chain already had.
    fn apply(
        &mut self,
        key: &SessionKey,
        world_size: u32,
        tokens: &[u32],
        now: SystemTime,
    ) -> Option<(u8, usize)> {
        self.tick += 1;
        let tick = self.tick;
        if !self.sessions.contains_key(key) && self.sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = self
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.tick)
                .map(|(k, _)| k.clone())
            {
                self.sessions.remove(&oldest);
            }
        }
        let session = self.sessions.entry(key.clone()).or_default();
        session.tick = tick;
        let found = session.chains.iter().position(|c| {
            c.world_size == world_size
                && (tokens.starts_with(&c.tokens) || c.tokens.starts_with(tokens))
        });
        let base = found.map(|i| (i as u8, session.chains[i].tokens.len().min(tokens.len())));
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
        base
    }

    /// The whole index as journal entries that rebuild it: sessions least recently updated
    /// first, each session's chains oldest first, every chain in full.
    fn entries(&self) -> Vec<Entry> {
        let mut sessions: Vec<_> = self.sessions.iter().collect();
        sessions.sort_by_key(|(_, s)| s.tick);
        sessions
            .into_iter()
            .flat_map(|((model, salt), s)| {
                s.chains.iter().rev().map(move |c| Entry {
                    model: model.to_string(),
                    cache_salt: salt.to_string(),
                    world_size: c.world_size,
                    updated: c.updated,
                    base: None,
                    suffix: c.tokens.to_vec(),
                })
            })
            .collect()
    }

    /// Append `entry`, compacting when the file has grown enough. A failed write turns the
    /// journal off (loudly): the index goes on in memory.
    fn journal_append(&mut self, entry: &Entry) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let result = match j.append(entry) {
            Ok(true) => {
                let whole = self.entries();
                self.journal.as_mut().expect("attached").compact(&whole)
            }
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::error!(
                "session journal: write failed ({e}); sessions are no longer journaled \
                 until cwm restarts"
            );
            self.journal = None;
        }
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
        idx.record("m2", 1, "t", &b, None);
        let mut per_salt: Vec<_> = idx
            .newest_per_salt()
            .into_iter()
            .map(|c| (c.cache_salt.to_string(), c.tokens[0]))
            .collect();
        per_salt.sort();
        assert_eq!(per_salt, [("s".to_string(), 1000), ("t".to_string(), 1000)]);
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

    fn snapshot(idx: &SessionIndex) -> Vec<(String, String, u32, Vec<u32>, SystemTime)> {
        let inner = idx.inner.lock();
        inner
            .entries()
            .into_iter()
            .map(|e| (e.model, e.cache_salt, e.world_size, e.suffix, e.updated))
            .collect()
    }

    #[test]
    fn a_replayed_journal_rebuilds_the_same_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.journal");
        let idx = SessionIndex::default();
        assert_eq!(
            idx.attach_journal(&path, Sealer::default()).unwrap(),
            Restored::default()
        );
        // Conversations that grow turn by turn, branch, shrink back and overflow a session.
        let mut seed = 1u32;
        for turn in 0..400u32 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let salt = format!("s{}", seed % 5);
            let branch = (seed >> 8) % 11;
            let len = 256 * (1 + (seed >> 16) % 6) as usize;
            let t: Vec<u32> = (0..len as u32).map(|i| i + branch * 100_000).collect();
            idx.record("m", 1 + turn % 2, &salt, &t, Some(&format!("r{turn}")));
        }
        let before = snapshot(&idx);
        assert!(before.len() > 20, "{}", before.len());
        idx.sync_journal();

        let again = SessionIndex::default();
        let restored = again.attach_journal(&path, Sealer::default()).unwrap();
        assert!(snapshot(&again) == before, "the replayed index differs");
        assert_eq!(
            restored.sessions, 5,
            "one per salt (model and salt name a session)"
        );
        assert_eq!(restored.chains, before.len());
        assert_eq!(
            again.newest("s3").map(|c| c.tokens),
            idx.newest("s3").map(|c| c.tokens)
        );
        // Replay compacted the file: a third start reads the index in full chains.
        let third = SessionIndex::default();
        assert_eq!(
            third
                .attach_journal(&path, Sealer::default())
                .unwrap()
                .replay
                .entries,
            before.len()
        );
        assert!(
            snapshot(&third) == before,
            "the compacted journal rebuilds another index"
        );
    }

    fn keyed(byte: u8) -> Sealer {
        use crate::store::seal::{ServerKey, KEY_LEN};
        Sealer::new(Some(ServerKey::from_bytes([byte; KEY_LEN])))
    }

    fn starts(path: &Path, sealer: Sealer) -> (SessionIndex, Restored, usize) {
        let idx = SessionIndex::default();
        let restored = idx.attach_journal(path, sealer).unwrap();
        (idx, restored, journal::set_aside_files(path).unwrap().len())
    }

    fn firsts(idx: &SessionIndex, salt: &str) -> Vec<u32> {
        idx.chains(salt).iter().map(|c| c.tokens[0]).collect()
    }

    #[test]
    fn a_start_under_another_key_sets_the_journal_aside_for_the_right_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.journal");
        let a: Vec<u32> = (1000..1512).collect();
        let b: Vec<u32> = (2000..2256).collect();
        let (idx, _, _) = starts(&path, keyed(1));
        idx.record("m", 1, "alice", &a[..256], None);
        idx.record("m", 1, "alice", &a, None);
        drop(idx);

        // Another key: nothing opens, and the journal is kept whole, not compacted away.
        let (idx, restored, aside) = starts(&path, keyed(2));
        assert!(idx.is_empty());
        assert_eq!((restored.replay.unopened, aside), (2, 1));
        idx.record("m", 1, "bob", &b, None);
        drop(idx);
        // Again under that key: bob's chain is there; alice's journal still waits, once.
        let (idx, restored, aside) = starts(&path, keyed(2));
        assert_eq!(
            (firsts(&idx, "bob"), firsts(&idx, "alice")),
            (vec![2000], vec![])
        );
        assert_eq!((restored.replay.unopened, aside), (2, 1));
        drop(idx);

        // No key at all: alice's and bob's journals both wait; what it records is in the clear.
        let (idx, restored, aside) = starts(&path, Sealer::default());
        assert!(idx.is_empty());
        assert_eq!((restored.replay.unopened, aside), (3, 2));
        idx.record("m", 1, "alice", &b, None);
        drop(idx);

        // The right key: alice's chains are back, merged with the one recorded in the clear
        // (newest first); her sealed journal opened whole and is gone, bob's waits.
        let (idx, restored, aside) = starts(&path, keyed(1));
        assert_eq!(firsts(&idx, "alice"), vec![2000, 1000]);
        assert_eq!(idx.newest("alice").unwrap().tokens.len(), 256);
        assert_eq!(idx.chains("alice")[1].tokens.len(), 512);
        assert!(idx.chains("bob").is_empty());
        assert_eq!((restored.sessions, restored.chains), (1, 2));
        assert_eq!((restored.replay.unopened, aside), (1, 1));
        drop(idx);
        // And bob's key finds bob's chain again, while alice's (now sealed with key 1) waits.
        let (idx, _, aside) = starts(&path, keyed(2));
        assert_eq!(
            (firsts(&idx, "bob"), firsts(&idx, "alice")),
            (vec![2000], vec![])
        );
        assert_eq!(aside, 1);
    }

    #[test]
    fn compaction_while_recording_keeps_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.journal");
        let idx = SessionIndex::default();
        idx.attach_journal(&path, Sealer::default()).unwrap();
        // One growing 64k-token conversation: each turn appends only its new tokens, and the
        // file is compacted several times on the way.
        let t: Vec<u32> = (0..65_536).collect();
        for end in (256..=t.len()).step_by(256) {
            idx.record("m", 1, "long", &t[..end], None);
        }
        idx.sync_journal();
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(
            size < 4 * 65_536 * 4,
            "deltas, not whole chains: {size} bytes"
        );
        let again = SessionIndex::default();
        again.attach_journal(&path, Sealer::default()).unwrap();
        assert!(
            snapshot(&again) == snapshot(&idx),
            "the replayed index differs"
        );
        assert_eq!(again.newest("long").unwrap().tokens.len(), 65_536);
    }
}
