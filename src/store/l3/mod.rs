//! L3: Redis or Redis Cluster, shared by a fleet of sidecars.
//!
//! Values are records (`store::record`: header with the full key, codec, checksums), so every
//! tier verifies integrity the same way; a value that fails its checks or carries another key
//! is a miss (counted, logged), never served. Keys: `keys`. Connections, deadlines and
//! reconnection: `link`.
//!
//! L3 is a `Tier` behind L1 for the write path: write-behind hands it every committed object's
//! record (`put`), which it queues (bounded in bytes, never blocking) for a worker that pushes
//! batches of concurrent SETs with a TTL (cache data); frozen windows are pushed without one.
//! It does not fit the trait's read contract (`contains` and `info` answer from memory, and
//! Redis is remote): it answers "not held" there, and the facade reads it through the batched
//! calls below, from prefetch jobs only. Read path: `existing` checks existence of a whole
//! lookup's missing chunks at once (one pipeline per node: `batch`), then `promote` fetches the
//! leading present ones (spread over the connections) and installs them in L1.

pub mod batch;
pub mod catalog;
pub mod config;
pub mod keys;
pub mod link;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

use connector_protocol::ObjectKey;
use parking_lot::Mutex;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use self::config::{L3Config, WritePolicy};
use self::keys::KeyLayout;
use self::link::{Link, LinkError, LinkStatus};
use super::codec::{Codec, CompressionPolicy};
use super::record::Record;
use super::tier::{RecordInfo, Tier, TierError, TierStats};
use super::{L1Store, Reservation, WriteGuard};

#[derive(Debug, Default)]
pub struct L3Counters {
    /// Keys asked about by lookups, and those found.
    pub exists_checked: AtomicU64,
    pub exists_found: AtomicU64,
    pub read_records: AtomicU64,
    pub read_bytes: AtomicU64,
    /// Values that failed verification or carried another key: served as misses.
    pub corrupt_records: AtomicU64,
    pub written_records: AtomicU64,
    pub written_bytes: AtomicU64,
    pub write_errors: AtomicU64,
    /// Operations that failed for the link (down, timeout).
    pub link_errors: AtomicU64,
}

/// What `/status` and `cache_stats` show about L3.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct L3Stats {
    pub link: LinkStatus,
    pub namespace: String,
    pub write: String,
    pub exists_checked: u64,
    pub exists_found: u64,
    pub read_records: u64,
    pub read_bytes: u64,
    pub corrupt_records: u64,
    pub written_records: u64,
    pub written_bytes: u64,
    pub write_errors: u64,
    pub link_errors: u64,
    pub write_behind_queued_bytes: u64,
    pub write_behind_dropped: u64,
    /// Pipelines (and single commands) sent by batches: a lookup costs one per node.
    pub round_trips: u64,
}

pub struct L3 {
    link: Arc<Link>,
    keys: KeyLayout,
    config: L3Config,
    compression: CompressionPolicy,
    pub counters: Arc<L3Counters>,
    queue: Mutex<Option<mpsc::Sender<Queued>>>,
    queue_bytes: AtomicU64,
    dropped: AtomicU64,
    last_drop_log: Mutex<Option<Instant>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

/// Records per write-behind batch.
pub const BATCH: usize = 16;

/// A record waiting for Redis, under its key.
type Queued = (ObjectKey, Vec<u8>);

impl L3 {
    /// Connects lazily: a Redis absent at start is a link that is down, not an error.
    pub fn open(config: L3Config, compression: CompressionPolicy) -> anyhow::Result<Arc<L3>> {
        config.validate()?;
        let link = Arc::new(Link::new(&config)?);
        let (tx, rx) = mpsc::channel();
        let l3 = Arc::new(L3 {
            link,
            keys: KeyLayout::new(&config.namespace),
            config,
            compression,
            counters: Arc::default(),
            queue: Mutex::new(Some(tx)),
            queue_bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_drop_log: Mutex::new(None),
            worker: Mutex::new(None),
        });
        let worker = {
            let l3 = l3.clone();
            std::thread::Builder::new()
                .name("cwm-l3-write".into())
                .spawn(move || l3.write_behind(rx))?
        };
        *l3.worker.lock() = Some(worker);
        tracing::info!(
            endpoints = ?l3.config.endpoints_redacted(),
            namespace = %l3.config.namespace,
            write = ?l3.config.write,
            "L3 Redis tier configured"
        );
        Ok(l3)
    }

    pub fn keys(&self) -> &KeyLayout {
        &self.keys
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Queue a cache record for Redis (write policy `always`). Never blocks: beyond the queue's
    /// bytes, or while Redis is down, the record is dropped and counted.
    fn enqueue(&self, key: &ObjectKey, record: &[u8]) {
        if self.config.write != WritePolicy::Always {
            return;
        }
        let n = record.len() as u64;
        let queue = self.queue.lock();
        let Some(tx) = queue.as_ref() else { return };
        if !self.link.usable() || self.queue_bytes.load(Relaxed) + n > self.config.queue_bytes {
            self.drop_records(1);
            return;
        }
        self.queue_bytes.fetch_add(n, Relaxed);
        if tx.send((key.clone(), record.to_vec())).is_err() {
            self.queue_bytes.fetch_sub(n, Relaxed);
        }
    }

    /// Count records given up, logging at most every 10 s.
    fn drop_records(&self, n: u64) {
        self.dropped.fetch_add(n, Relaxed);
        let mut last = self.last_drop_log.lock();
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            *last = Some(Instant::now());
            tracing::warn!(
                dropped_total = self.dropped.load(Relaxed),
                "L3 write-behind is dropping records (Redis slower than stores, or unreachable)"
            );
        }
    }

    /// Which of `keys` exist in Redis: one concurrent batch (pipelined per node). Empty while
    /// the link is down.
    pub fn existing(&self, keys: &[ObjectKey]) -> HashSet<ObjectKey> {
        if keys.is_empty() {
            return HashSet::new();
        }
        let found = self
            .link
            .batch(self.per_chunk("EXISTS", keys))
            .and_then(|replies| {
                replies
                    .iter()
                    .map(|v| {
                        redis::from_redis_value_ref::<bool>(v)
                            .map_err(|e| LinkError::from(redis::RedisError::from(e)))
                    })
                    .collect::<Result<Vec<bool>, LinkError>>()
            });
        self.counters
            .exists_checked
            .fetch_add(keys.len() as u64, Relaxed);
        match found {
            Ok(found) => {
                let set: HashSet<ObjectKey> = keys
                    .iter()
                    .zip(found)
                    .filter(|(_, f)| *f)
                    .map(|(k, _)| k.clone())
                    .collect();
                self.counters
                    .exists_found
                    .fetch_add(set.len() as u64, Relaxed);
                set
            }
            Err(e) => {
                self.link_error(&e);
                HashSet::new()
            }
        }
    }

    /// Fetch `keys` (one concurrent batch), verify each value and install it in L1. Returns the
    /// keys now resident in L1. A value failing verification is counted and skipped.
    pub fn promote(&self, l1: &Arc<L1Store>, keys: &[ObjectKey]) -> HashSet<ObjectKey> {
        let values = match self.fetch(keys) {
            Ok(v) => v,
            Err(e) => {
                self.link_error(&e);
                return HashSet::new();
            }
        };
        keys.par_iter()
            .zip(values)
            .filter_map(|(key, value)| {
                let value = value?;
                self.install(l1, key, &value).then(|| key.clone())
            })
            .collect()
    }

    /// `command` once per key, on the key's chunk record.
    fn per_chunk(&self, command: &str, keys: &[ObjectKey]) -> Vec<redis::Cmd> {
        keys.iter()
            .map(|k| {
                let mut c = redis::cmd(command);
                c.arg(self.keys.chunk(k));
                c
            })
            .collect()
    }

    /// The raw values of `keys` (None where absent), in one concurrent batch.
    fn fetch(&self, keys: &[ObjectKey]) -> Result<Vec<Option<Vec<u8>>>, LinkError> {
        self.link
            .spread(self.per_chunk("GET", keys))?
            .into_iter()
            .map(|v| {
                redis::from_redis_value::<Option<Vec<u8>>>(v)
                    .map_err(|e| LinkError::from(redis::RedisError::from(e)))
            })
            .collect()
    }

    fn decode(&self, r: &Record) -> Result<Vec<u8>, crate::store::seal::SealError> {
        let mut raw = vec![0; r.header.raw_len as usize];
        self.config.sealer.decode_into(r, &mut raw)?;
        Ok(raw)
    }

    /// Verify a value fetched for `key` and copy its object into L1.
    fn install(&self, l1: &Arc<L1Store>, key: &ObjectKey, value: &[u8]) -> bool {
        let r = match Record::parse(value, 0) {
            Ok(r) if r.header.key == *key => r,
            Ok(r) => return self.corrupt(key, &format!("value carries key {:?}", r.header.key)),
            Err(e) => return self.corrupt(key, &e.to_string()),
        };
        match l1.reserve(key, r.header.raw_len) {
            Reservation::Present => true,
            Reservation::NoSpace => false,
            // A raw payload (verified by `parse`) goes straight in; a compressed one is decoded
            // into private memory first: no reference may cover pool pages.
            Reservation::Reserved(mut w) if r.header.codec == Codec::Raw && !r.header.sealed => {
                if r.payload.len() as u64 != r.header.raw_len {
                    return self.corrupt(key, "raw payload length differs from the raw length");
                }
                w.copy_from_slice(r.payload);
                self.installed(w, &r);
                true
            }
            Reservation::Reserved(mut w) => match self.decode(&r) {
                Ok(raw) => {
                    w.copy_from_slice(&raw);
                    self.installed(w, &r);
                    true
                }
                Err(e) => self.corrupt(key, &e.to_string()),
            },
        }
    }

    fn installed(&self, mut w: WriteGuard, r: &Record) {
        w.set_itemsize(r.header.itemsize);
        w.commit();
        self.counters.read_records.fetch_add(1, Relaxed);
        self.counters
            .read_bytes
            .fetch_add(r.header.raw_len, Relaxed);
    }

    fn corrupt(&self, key: &ObjectKey, why: &str) -> bool {
        self.counters.corrupt_records.fetch_add(1, Relaxed);
        tracing::error!(?key, "L3: ignoring a value that fails verification: {why}");
        false
    }

    /// Encode `raw` as the record stored for `key`.
    pub fn record(&self, key: &ObjectKey, raw: &[u8], itemsize: u8) -> Vec<u8> {
        self.config
            .sealer
            .encode(key, raw, itemsize, self.compression)
    }

    /// Write records in one concurrent batch: cache data with the TTL and only where absent
    /// (so a window's record never gets one), window data (`ttl` false) unconditionally and
    /// without a TTL. Returns how many were written.
    pub fn put(&self, records: Vec<(ObjectKey, Vec<u8>)>, ttl: bool) -> Result<usize, LinkError> {
        if records.is_empty() {
            return Ok(0);
        }
        let ttl_secs = self.ttl_secs();
        let bytes: u64 = records.iter().map(|(_, r)| r.len() as u64).sum();
        let n = records.len();
        let cmds: Vec<redis::Cmd> = records
            .into_iter()
            .map(|(k, v)| {
                let mut c = redis::cmd("SET");
                c.arg(self.keys.chunk(&k)).arg(v);
                if ttl {
                    c.arg("EX").arg(ttl_secs).arg("NX");
                }
                c
            })
            .collect();
        match self.link.spread(cmds) {
            Ok(_) => {
                self.link.note_write_ok();
                self.counters.written_records.fetch_add(n as u64, Relaxed);
                self.counters.written_bytes.fetch_add(bytes, Relaxed);
                Ok(n)
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Relaxed);
                match &e {
                    LinkError::Redis(r) if r.code() == Some("OOM") => self.link.note_full(r),
                    _ => self.link_error(&e),
                }
                Err(e)
            }
        }
    }

    fn ttl_secs(&self) -> u64 {
        self.config.ttl.as_secs().max(1)
    }

    fn link_error(&self, e: &LinkError) {
        self.counters.link_errors.fetch_add(1, Relaxed);
        tracing::debug!("L3: {e}");
    }

    fn write_behind(&self, rx: mpsc::Receiver<Queued>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let bytes: u64 = batch.iter().map(|(_, r)| r.len() as u64).sum();
            let n = batch.len() as u64;
            if !self.link.usable() {
                // Down: give the batch up rather than let the queue fill behind a dead link.
                self.drop_records(n);
            } else {
                let _ = self.put(batch, true);
            }
            self.queue_bytes.fetch_sub(bytes, Relaxed);
        }
    }

    pub fn stats(&self) -> L3Stats {
        let c = &self.counters;
        L3Stats {
            link: self.link.status(),
            namespace: self.config.namespace.clone(),
            write: format!("{:?}", self.config.write).to_lowercase(),
            exists_checked: c.exists_checked.load(Relaxed),
            exists_found: c.exists_found.load(Relaxed),
            read_records: c.read_records.load(Relaxed),
            read_bytes: c.read_bytes.load(Relaxed),
            corrupt_records: c.corrupt_records.load(Relaxed),
            written_records: c.written_records.load(Relaxed),
            written_bytes: c.written_bytes.load(Relaxed),
            write_errors: c.write_errors.load(Relaxed),
            link_errors: c.link_errors.load(Relaxed),
            write_behind_queued_bytes: self.queue_bytes.load(Relaxed),
            write_behind_dropped: self.dropped.load(Relaxed),
            round_trips: self.link.batches().round_trips.load(Relaxed),
        }
    }

    /// Stop write-behind after it drained its queue.
    pub fn shutdown(&self) {
        self.queue.lock().take();
        if let Some(w) = self.worker.lock().take() {
            let _ = w.join();
        }
    }
}

/// The write path of the tier trait. Reads go through `existing` / `promote` (batched, remote):
/// `contains` and `info` must answer from memory, so L3 answers "not held" there.
impl Tier for L3 {
    fn name(&self) -> &'static str {
        "L3"
    }

    fn contains(&self, keys: &[ObjectKey]) -> Vec<bool> {
        vec![false; keys.len()]
    }

    fn info(&self, _key: &ObjectKey) -> Option<RecordInfo> {
        None
    }

    fn read_into(&self, key: &ObjectKey, _object: &mut WriteGuard) -> Result<(), TierError> {
        Err(TierError::new(
            "L3",
            LinkError::NotLocal(Box::new(key.clone())),
        ))
    }

    fn record(&self, key: &ObjectKey) -> Result<Vec<u8>, TierError> {
        Err(TierError::new(
            "L3",
            LinkError::NotLocal(Box::new(key.clone())),
        ))
    }

    fn put(&self, key: &ObjectKey, record: &[u8]) -> Result<(), TierError> {
        self.enqueue(key, record);
        Ok(())
    }

    fn pin(&self, _key: &ObjectKey) -> bool {
        false
    }

    fn unpin(&self, _key: &ObjectKey) {}

    fn sync(&self) -> Result<(), TierError> {
        Ok(())
    }

    /// The fleet's shared cache is not one node's to clear.
    fn clear(&self) -> Result<usize, TierError> {
        Ok(0)
    }

    fn stats(&self) -> TierStats {
        let c = &self.counters;
        TierStats {
            read_records: c.read_records.load(Relaxed),
            read_bytes: c.read_bytes.load(Relaxed),
            written_records: c.written_records.load(Relaxed),
            written_stored_bytes: c.written_bytes.load(Relaxed),
            corrupt_records: c.corrupt_records.load(Relaxed),
            write_errors: c.write_errors.load(Relaxed),
            ..TierStats::default()
        }
    }

    fn close(&self) -> Result<(), TierError> {
        self.shutdown();
        Ok(())
    }
}
