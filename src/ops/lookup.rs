//! `lookup`, `query_prefetch_status`, `wait_prefetch_status`, `free_lookup_locks`,
//! `end_session`: the scheduler's view of what is cached, and the read locks that keep a hit
//! servable until the worker retrieves it.
//!
//! A lookup counts the leading chunks present for every kv_rank and read-locks them
//! (`num_kv_readers` per object) in one step. Its answer is handed out exactly once by
//! `query_prefetch_status`; later queries answer 0. Retrieves release one lock per object they
//! read, `free_lookup_locks` the rest; the store's lock TTL covers clients that vanish.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use connector_protocol::{codec, IpcCacheServerKey, ObjectKey};
use parking_lot::Mutex;

use super::{Cwm, OpError};

/// What a lookup found for one request.
struct LookupRecord {
    /// Keys of every chunk of the looked-up range, for every rank.
    chunks: Vec<Vec<ObjectKey>>,
    readers: u32,
    hit: usize,
}

#[derive(Default)]
struct Session {
    lookup: Option<LookupRecord>,
    /// The hit count not yet handed out by `query_prefetch_status`.
    unqueried: Option<usize>,
    last_seen: Option<Instant>,
}

/// Request sessions, keyed by vLLM request id.
#[derive(Default)]
pub struct Sessions {
    by_request: Mutex<HashMap<String, Session>>,
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
    pub(super) fn lookup(&self, key: &IpcCacheServerKey) -> Result<(), OpError> {
        let hit = self.lookup_and_lock(key);
        let mut sessions = self.sessions.by_request.lock();
        let session = sessions.entry(key.request_id.clone()).or_default();
        session.last_seen = Some(Instant::now());
        session.unqueried = Some(hit.as_ref().map_or(0, |r| r.hit));
        if let Some(record) = hit {
            session.lookup = Some(record);
        }
        Ok(())
    }

    fn lookup_and_lock(&self, key: &IpcCacheServerKey) -> Option<LookupRecord> {
        if key.num_kv_readers == 0 {
            tracing::warn!(request_id = %key.request_id, "lookup with num_kv_readers 0 (a client older than LMCache 0.5): answering 0 hits");
            return None;
        }
        if let Err(e) = self.check_identity(key) {
            tracing::warn!(request_id = %key.request_id, "lookup: {e}");
            return None;
        }
        if !self.registry.serves(&key.model_name, key.world_size)
            && !self.engine_driven.serves(&key.model_name, key.world_size)
        {
            return None;
        }
        let end = key.end.min(key.token_ids.len() as u64) as usize;
        let hashes = self.hasher.chunk_hashes(&key.token_ids, 0, end);
        let chunks: Vec<Vec<ObjectKey>> = hashes
            .iter()
            .map(|h| {
                (0..key.world_size)
                    .map(|rank| self.object_key(key, rank, *h))
                    .collect()
            })
            .collect();
        let hit = self.l1.lock_prefix(&chunks, key.num_kv_readers);
        self.counters.record_lookup(chunks.len(), hit);
        Some(LookupRecord {
            chunks,
            readers: key.num_kv_readers,
            hit,
        })
    }

    /// The hit count of the request's last lookup, once; 0 when unknown or already handed out.
    pub(super) fn query_prefetch_status(&self, request_id: &str) -> u64 {
        let mut sessions = self.sessions.by_request.lock();
        sessions
            .get_mut(request_id)
            .and_then(|s| s.unqueried.take())
            .unwrap_or(0) as u64
    }

    pub(super) fn free_lookup_locks(&self, key: &IpcCacheServerKey) {
        let cs = self.settings.chunk_size as u64;
        if key.start >= key.end {
            return;
        }
        let mut sessions = self.sessions.by_request.lock();
        let Some(record) = sessions
            .get_mut(&key.request_id)
            .and_then(|s| s.lookup.as_mut())
        else {
            return;
        };
        let from = (key.start / cs) as usize;
        let to = ((key.end / cs) as usize).min(record.hit);
        if from < to {
            self.l1
                .unlock(record.chunks[from..to].iter().flatten(), record.readers);
        }
    }

    pub(super) fn end_session(&self, request_id: &str) {
        let session = self.sessions.by_request.lock().remove(request_id);
        if let Some(record) = session.and_then(|s| s.lookup) {
            self.l1.touch(record.chunks[..record.hit].iter().flatten());
        }
    }

    pub(super) fn decode_key(frame: &[u8]) -> Result<IpcCacheServerKey, OpError> {
        Ok(codec::decode::<IpcCacheServerKey>(
            "IPCCacheServerKey",
            frame,
        )?)
    }
}
