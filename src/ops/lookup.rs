//! `lookup`, `query_prefetch_status`, `wait_prefetch_status`, `free_lookup_locks`,
//! `end_session`: the scheduler's view of what is cached, and the read locks that keep a hit
//! servable until the worker retrieves it.
//!
//! A lookup counts the leading chunks available for every kv_rank in L1 or L2. When all of them
//! are already in L1 (and there is no L3 to ask about the rest) it read-locks them
//! (`num_kv_readers` per object) and is done at once. Otherwise a prefetch job on the bulk pool
//! promotes the L2 hits into L1, asks L3 about the chunks past them in one batch and fetches
//! the prefix found there, and only then counts and locks the resident prefix; until it
//! finishes `query_prefetch_status` answers "not yet" (no payload). The socket thread never
//! waits for disk or Redis. A result is handed out exactly once; later queries answer 0. Retrieves
//! release one lock per object they read, `free_lookup_locks` the rest; the store's lock TTL
//! covers clients that vanish.

use crate::limits::for_log;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use connector_protocol::{codec, IpcCacheServerKey, ObjectKey, Op};
use parking_lot::{Condvar, Mutex};

use super::command::{decode_key, Command};
use super::{Cwm, OpError};
use crate::store::tiered::Tiers;

/// `lookup`: how many leading chunks of the key's tokens are cached for every rank. Answered
/// by `query_prefetch_status` / `wait_prefetch_status`; the hit chunks stay read-locked.
pub struct Lookup {
    pub key: IpcCacheServerKey,
    /// The engine's tensor-parallel size (the key's `world_size` is what counts).
    pub tp_size: u64,
}

impl Command for Lookup {
    const OP: Op = Op::Lookup;
    type Answer = ();

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        Ok(Lookup {
            key: decode_key(f[0])?,
            tp_size: codec::decode_u64("tp_size", f[1])?,
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<(), OpError> {
        cwm.lookup(&self.key)
    }

    fn failed() {}
}

/// The hit count of a request's last lookup: no payload while its prefetch runs.
pub struct QueryPrefetchStatus {
    pub request_id: String,
}

impl Command for QueryPrefetchStatus {
    const OP: Op = Op::QueryPrefetchStatus;
    type Answer = Option<u64>;

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        Ok(QueryPrefetchStatus {
            request_id: codec::decode_str("request_id", f[0])?.to_string(),
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<Option<u64>, OpError> {
        Ok(cwm.query_prefetch_status(&self.request_id))
    }

    fn failed() -> Option<u64> {
        Some(0)
    }
}

/// Like `query_prefetch_status`, waiting up to `timeout` for a running prefetch.
pub struct WaitPrefetchStatus {
    pub request_id: String,
    pub timeout: Duration,
}

impl Command for WaitPrefetchStatus {
    const OP: Op = Op::WaitPrefetchStatus;
    const TRANSFER: bool = true;
    type Answer = Option<u64>;

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        let timeout = codec::decode_f64("timeout", f[1])?;
        Ok(WaitPrefetchStatus {
            request_id: codec::decode_str("request_id", f[0])?.to_string(),
            timeout: Duration::try_from_secs_f64(timeout).unwrap_or(Duration::ZERO),
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<Option<u64>, OpError> {
        Ok(cwm.wait_prefetch_status(&self.request_id, self.timeout))
    }

    fn failed() -> Option<u64> {
        Some(0)
    }
}

/// Release the lookup read locks of the key's chunk range that no retrieve released.
pub struct FreeLookupLocks {
    pub key: IpcCacheServerKey,
}

impl Command for FreeLookupLocks {
    const OP: Op = Op::FreeLookupLocks;
    type Answer = ();

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        // The second frame (the worker count) is not needed: the lookup recorded its readers.
        Ok(FreeLookupLocks {
            key: decode_key(f[0])?,
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<(), OpError> {
        cwm.free_lookup_locks(&self.key);
        Ok(())
    }

    fn failed() {}
}

/// The request finished: forget its session.
pub struct EndSession {
    pub request_id: String,
}

impl Command for EndSession {
    const OP: Op = Op::EndSession;
    type Answer = ();

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        Ok(EndSession {
            request_id: codec::decode_str("request_id", f[0])?.to_string(),
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<(), OpError> {
        cwm.end_session(&self.request_id);
        Ok(())
    }

    fn failed() {}
}

/// What a lookup found for one request.
struct LookupRecord {
    /// Keys of every chunk of the looked-up range, for every rank.
    chunks: Arc<Vec<Vec<ObjectKey>>>,
    readers: u32,
    hit: usize,
    /// Read locks this lookup still holds on each object of hit chunk `i` (it took `readers`;
    /// retrieves and `free_lookup_locks` give them back).
    held: Vec<u32>,
}

impl LookupRecord {
    fn new(chunks: Arc<Vec<Vec<ObjectKey>>>, readers: u32, hit: usize) -> LookupRecord {
        LookupRecord {
            chunks,
            readers,
            hit,
            held: vec![readers; hit],
        }
    }

    /// Release up to `n` of the locks still held on the hit chunks in `range`.
    fn release(&mut self, tiers: &Tiers, range: Range<usize>, n: u32) {
        let end = range.end.min(self.hit);
        for i in range.start.min(end)..end {
            let k = self.held[i].min(n);
            if k > 0 {
                tiers.unlock(&self.chunks[i], k);
                self.held[i] -= k;
            }
        }
    }

    /// Note that `n` locks on the hit chunks in `range` were released by someone else (a
    /// retrieve gives back one per object it read).
    fn released(&mut self, range: Range<usize>, n: u32) {
        let end = range.end.min(self.hit);
        for held in &mut self.held[range.start.min(end)..end] {
            *held = held.saturating_sub(n);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    /// A prefetch job with this id is promoting L2 hits.
    Running(u64),
    /// The hit count, not yet handed out.
    Done(usize),
}

#[derive(Default)]
struct Session {
    lookup: Option<LookupRecord>,
    status: Option<Status>,
    last_seen: Option<Instant>,
}

/// Request sessions, keyed by vLLM request id.
#[derive(Default)]
pub struct Sessions {
    by_request: Mutex<HashMap<String, Session>>,
    /// Signalled whenever a prefetch job finishes (for `wait_prefetch_status`).
    finished: Condvar,
    next_job: AtomicU64,
}

impl Sessions {
    pub fn len(&self) -> usize {
        self.by_request.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drop sessions idle for longer than `ttl` (their locks expire on their own).
    pub fn expire(&self, now: Instant, ttl: Duration) -> usize {
        let mut map = self.by_request.lock();
        let before = map.len();
        map.retain(|_, s| {
            s.last_seen
                .is_some_and(|t| now.saturating_duration_since(t) <= ttl)
        });
        before - map.len()
    }
}

impl Cwm {
    fn lookup(self: &Arc<Self>, key: &IpcCacheServerKey) -> Result<(), OpError> {
        let Some((chunks, readers)) = self.lookup_plan(key) else {
            self.set_session(key, None, Status::Done(0));
            return Ok(());
        };
        // The prefix available in L1 or a tier's index. Past it, a tier that keeps no index
        // (L3) may hold more: only a prefetch job asks it, never this thread.
        let located = self.tiers.locate(&chunks);
        let available = located.len();
        let probe = self.tiers.unknown_beyond(&chunks, available);
        if located.iter().all(|&resident| resident) && !probe {
            let hit = self.tiers.lock_prefix(&chunks, readers);
            self.counters.record_lookup(chunks.len(), hit);
            self.set_session(
                key,
                Some(LookupRecord::new(chunks, readers, hit)),
                Status::Done(hit),
            );
            return Ok(());
        }
        let job = self.sessions.next_job.fetch_add(1, Ordering::Relaxed);
        let request_id = key.request_id.clone();
        self.set_session(
            key,
            Some(LookupRecord::new(chunks.clone(), readers, 0)),
            Status::Running(job),
        );
        let cwm = self.clone();
        rayon::spawn(move || {
            let found = cwm.tiers.promote_prefix(&chunks, available);
            let hit = cwm.tiers.lock_prefix(&chunks[..found], readers);
            cwm.counters.record_lookup(chunks.len(), hit);
            cwm.finish_prefetch(&request_id, job, hit, &chunks, readers);
        });
        Ok(())
    }

    /// Chunk keys for every rank, or None when the lookup can only answer 0.
    fn lookup_plan(&self, key: &IpcCacheServerKey) -> Option<(Arc<Vec<Vec<ObjectKey>>>, u32)> {
        if key.num_kv_readers == 0 {
            tracing::warn!(request_id = %for_log(&key.request_id), "lookup with num_kv_readers 0 (a client older than LMCache 0.5): answering 0 hits");
            return None;
        }
        if let Err(e) = self.check_identity(key) {
            tracing::warn!(request_id = %for_log(&key.request_id), "lookup: {}", for_log(&e));
            return None;
        }
        if !self.registry.serves(&key.model_name, key.world_size)
            && !self.engine_driven.serves(&key.model_name, key.world_size)
        {
            return None;
        }
        let end = key.end.min(key.token_ids.len() as u64) as usize;
        let hashes = self.hasher.chunk_hashes(&key.token_ids, 0, end);
        let chunks = hashes
            .iter()
            .map(|h| {
                (0..key.world_size)
                    .map(|rank| self.object_key(key, rank, *h))
                    .collect()
            })
            .collect();
        Some((Arc::new(chunks), key.num_kv_readers))
    }

    fn set_session(&self, key: &IpcCacheServerKey, record: Option<LookupRecord>, status: Status) {
        let mut sessions = self.sessions.by_request.lock();
        let session = sessions.entry(key.request_id.clone()).or_default();
        session.last_seen = Some(Instant::now());
        session.status = Some(status);
        if let Some(record) = record {
            // A new lookup of the request replaces the last one: give back what that one still
            // holds (a prefetch still running releases its own when it finds itself replaced).
            if let Some(mut old) = session.lookup.replace(record) {
                old.release(&self.tiers, 0..old.hit, u32::MAX);
            }
        }
    }

    /// A retrieve of `request_id` read the chunks `range` and released one lock per object.
    pub(super) fn lookup_locks_released(&self, request_id: &str, range: Range<usize>) {
        let mut sessions = self.sessions.by_request.lock();
        if let Some(r) = sessions.get_mut(request_id).and_then(|s| s.lookup.as_mut()) {
            r.released(range, 1);
        }
    }

    fn finish_prefetch(
        &self,
        request_id: &str,
        job: u64,
        hit: usize,
        chunks: &[Vec<ObjectKey>],
        readers: u32,
    ) {
        let mut sessions = self.sessions.by_request.lock();
        match sessions.get_mut(request_id) {
            Some(s) if s.status == Some(Status::Running(job)) => {
                s.status = Some(Status::Done(hit));
                if let Some(r) = s.lookup.as_mut() {
                    *r = LookupRecord::new(r.chunks.clone(), readers, hit);
                }
            }
            // The session ended or a newer lookup replaced this one: nobody will retrieve.
            _ => self.tiers.unlock(chunks[..hit].iter().flatten(), readers),
        }
        drop(sessions);
        self.sessions.finished.notify_all();
    }

    /// The hit count of the request's last lookup: `None` while its prefetch runs, then the
    /// count once; 0 when unknown or already handed out.
    fn query_prefetch_status(&self, request_id: &str) -> Option<u64> {
        let mut sessions = self.sessions.by_request.lock();
        Self::take_status(&mut sessions, request_id)
    }

    fn take_status(sessions: &mut HashMap<String, Session>, request_id: &str) -> Option<u64> {
        let Some(s) = sessions.get_mut(request_id) else {
            return Some(0);
        };
        match s.status {
            Some(Status::Running(_)) => None,
            Some(Status::Done(hit)) => {
                s.status = None;
                Some(hit as u64)
            }
            None => Some(0),
        }
    }

    /// Like `query_prefetch_status`, but waits up to `timeout` for a running prefetch.
    fn wait_prefetch_status(&self, request_id: &str, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout.min(Duration::from_secs(300));
        let mut sessions = self.sessions.by_request.lock();
        loop {
            if let Some(hit) = Self::take_status(&mut sessions, request_id) {
                return Some(hit);
            }
            if self
                .sessions
                .finished
                .wait_until(&mut sessions, deadline)
                .timed_out()
            {
                return Self::take_status(&mut sessions, request_id);
            }
        }
    }

    fn free_lookup_locks(&self, key: &IpcCacheServerKey) {
        let cs = self.settings.chunk_size as u64;
        if key.start >= key.end {
            return;
        }
        let mut sessions = self.sessions.by_request.lock();
        let Some(s) = sessions.get_mut(&key.request_id) else {
            return;
        };
        if matches!(s.status, Some(Status::Running(_))) {
            return;
        }
        let Some(record) = s.lookup.as_mut() else {
            return;
        };
        let readers = record.readers;
        record.release(
            &self.tiers,
            (key.start / cs) as usize..(key.end / cs) as usize,
            readers,
        );
    }

    fn end_session(&self, request_id: &str) {
        self.chains.end_request(request_id);
        let session = self.sessions.by_request.lock().remove(request_id);
        if let Some(record) = session.and_then(|s| s.lookup) {
            self.tiers
                .touch(record.chunks[..record.hit].iter().flatten());
        }
    }
}
