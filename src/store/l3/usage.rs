//! What this sidecar wrote to L3, per salt, for `/status`, `/metrics` and L3 quotas. Redis
//! keeps no index here and other sidecars of a fleet write too, so this counts only this
//! process's own writes: a cache record's bytes until its TTL runs out (kept in time buckets, at
//! most `BUCKETS` per salt, so memory does not grow with the writes; a chunk written again
//! after it left L1 counts again), a window's records (written without a TTL) until the window
//! releases them. It forgets everything at a restart, and never sees Redis evict or another
//! sidecar write: it can overstate what a salt holds in Redis, or understate it fleet-wide.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use connector_protocol::ObjectKey;
use parking_lot::Mutex;

use crate::store::quota;

/// Time buckets of cache writes per salt.
const BUCKETS: u32 = 256;

pub struct WrittenBytes {
    ttl: Duration,
    bucket: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    salts: HashMap<Arc<str>, SaltWrites>,
    /// Window records written without a TTL, and their bytes.
    kept: HashMap<ObjectKey, u64>,
}

#[derive(Default)]
struct SaltWrites {
    /// Bytes of cache records written, by when their bucket began; oldest first.
    cache: VecDeque<(Instant, u64)>,
    /// Their sum, plus the bytes of `kept` records of this salt.
    bytes: u64,
    kept_bytes: u64,
}

impl WrittenBytes {
    /// Counting cache writes for `ttl` (the TTL they are written with).
    pub fn new(ttl: Duration) -> WrittenBytes {
        WrittenBytes {
            ttl,
            bucket: (ttl / BUCKETS).max(Duration::from_millis(10)),
            inner: Mutex::default(),
        }
    }

    /// `salt`'s bytes now, and those of them windows keep.
    pub fn usage(&self, salt: &str) -> (u64, u64) {
        let mut inner = self.inner.lock();
        let now = Instant::now();
        inner.salts.get_mut(salt).map_or((0, 0), |s| {
            self.expire(s, now);
            (s.bytes, s.kept_bytes)
        })
    }

    /// Whether `key` is a window record written here without a TTL.
    pub fn is_kept(&self, key: &ObjectKey) -> bool {
        self.inner.lock().kept.contains_key(key)
    }

    /// Every salt's bytes, largest first.
    pub fn largest_first(&self) -> Vec<(Arc<str>, u64)> {
        let mut inner = self.inner.lock();
        let now = Instant::now();
        inner.salts.values_mut().for_each(|s| self.expire(s, now));
        inner.salts.retain(|_, s| s.bytes > 0);
        quota::largest_first(inner.salts.iter().map(|(k, s)| (k, &s.bytes)))
    }

    /// A cache record of `bytes` was written under `salt` with the TTL.
    pub fn cached(&self, salt: &Arc<str>, bytes: u64) {
        let mut inner = self.inner.lock();
        let s = inner.salts.entry(salt.clone()).or_default();
        self.add_cache(s, bytes, Instant::now());
    }

    /// A window's record was written without a TTL.
    pub fn kept(&self, key: &ObjectKey, bytes: u64) {
        let mut inner = self.inner.lock();
        let old = inner.kept.insert(key.clone(), bytes).unwrap_or(0);
        let s = inner.salts.entry(key.cache_salt.clone()).or_default();
        s.bytes = s.bytes + bytes - old;
        s.kept_bytes = s.kept_bytes + bytes - old;
    }

    /// Window records named by no window any more: they expire like cache data from now.
    pub fn released(&self, keys: &[ObjectKey]) {
        let mut inner = self.inner.lock();
        let now = Instant::now();
        for key in keys {
            let Some(bytes) = inner.kept.remove(key) else {
                continue;
            };
            let s = inner.salts.entry(key.cache_salt.clone()).or_default();
            s.bytes -= bytes;
            s.kept_bytes -= bytes;
            self.add_cache(s, bytes, now);
        }
    }

    fn add_cache(&self, s: &mut SaltWrites, bytes: u64, now: Instant) {
        self.expire(s, now);
        match s.cache.back_mut() {
            Some((began, b)) if now.duration_since(*began) < self.bucket => *b += bytes,
            _ => s.cache.push_back((now, bytes)),
        }
        s.bytes += bytes;
    }

    /// Forget the buckets whose every write's TTL has run out.
    fn expire(&self, s: &mut SaltWrites, now: Instant) {
        while let Some(&(began, b)) = s.cache.front() {
            if now.duration_since(began) < self.ttl + self.bucket {
                break;
            }
            s.cache.pop_front();
            s.bytes -= b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8, salt: &str) -> ObjectKey {
        ObjectKey {
            model: "m".into(),
            kv_rank: 0,
            object_group: 0,
            chunk_hash: connector_protocol::ChunkHash([n; 32]),
            cache_salt: salt.into(),
        }
    }

    #[test]
    fn cache_writes_count_until_their_ttl_runs_out_and_windows_until_released() {
        let w = WrittenBytes::new(Duration::from_millis(200));
        w.cached(&"alice".into(), 100);
        w.kept(&key(1, "alice"), 10);
        w.kept(&key(1, "alice"), 10);
        w.cached(&"bob".into(), 7);
        assert_eq!(w.usage("alice"), (110, 10));
        assert!(w.is_kept(&key(1, "alice")));
        assert_eq!(w.largest_first()[0], ("alice".into(), 110));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(w.usage("alice"), (10, 10), "the cache write expired");
        w.released(&[key(1, "alice")]);
        assert_eq!(w.usage("alice"), (10, 0));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(w.usage("alice"), (0, 0));
        assert!(w.largest_first().is_empty());
    }
}
