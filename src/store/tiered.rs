//! The tiers together, behind one closed facade: L1 in memory, and the tiers behind it
//! (`store::tier::Tier`: the disk today) in order.
//!
//! Policy owned here: `reserve` is the one door into L1 (where admission will live); every
//! object committed to L1 by a store is queued for the tiers behind (write-behind) without ever
//! delaying the store's reply — the queue is bounded in bytes and drops work, counted and
//! logged, rather than block; each object is encoded once, on the background pool
//! (`crate::background`: nice 19, never the foreground rayon pool), and the same record goes
//! to every tier; hits behind L1 are promoted into L1 before anyone may read
//! them; lookups only ever ask tiers what they hold in memory.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use connector_protocol::ObjectKey;
use parking_lot::Mutex;
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::codec::CompressionPolicy;
use super::disk::storage::FsStorage;
use super::disk::{DiskConfig, DiskError, DiskStore};
use super::l1::{L1Config, L1Counters, L1Occupancy, PoolInfo};
use super::l3::config::L3Config;
use super::l3::L3;
use super::populate::{self, L1Populate};
use super::quota::Quotas;
use super::seal::Sealer;
use super::tier::{RecordInfo, Tier, TierError, TierStats};
use super::{L1Store, ReadGuard, Reservation, WriteGuard};
use crate::background;

/// Where L1 keeps its memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L1Memory {
    /// Private anonymous memory.
    Private,
    /// A POSIX shared-memory pool engines can map (engine-driven mode); `None` picks a name.
    Shared(Option<String>),
}

/// The disk tier's place and policy.
#[derive(Debug, Clone)]
pub struct L2Config {
    pub path: PathBuf,
    pub disk: DiskConfig,
}

/// Everything `Tiers::open` builds the tiers from.
#[derive(Debug, Clone)]
pub struct TiersConfig {
    pub l1: L1Config,
    pub l1_memory: L1Memory,
    /// Whether L1's pages are committed ahead of use (`populate`).
    pub l1_populate: L1Populate,
    /// L1 bytes each salt may occupy unless it has a quota of its own (`store::quota`).
    pub l1_quota_per_salt: Option<u64>,
    pub l2: Option<L2Config>,
    /// Redis (or a Redis Cluster) behind L2, shared by a fleet of sidecars.
    pub l3: Option<L3Config>,
    /// Bytes of committed objects the write-behind queue may hold before it drops work.
    pub write_queue_bytes: u64,
    /// Seals every record written behind L1, opens them when read (`store::seal`).
    pub sealer: Sealer,
}

#[derive(Debug, Error)]
pub enum OpenError {
    #[error("cannot reserve {bytes} bytes for L1: {source}")]
    L1 { bytes: u64, source: std::io::Error },
    #[error("cannot create the shared-memory L1 pool ({bytes} bytes in /dev/shm{}): {source}", .name.as_deref().map(|n| format!(", name {n:?}")).unwrap_or_default())]
    Pool {
        bytes: u64,
        name: Option<String>,
        source: std::io::Error,
    },
    #[error("cannot open L2 directory {}: {source}", .path.display())]
    L2Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open L2 at {}: {source}", .path.display())]
    L2 { path: PathBuf, source: DiskError },
    #[error("cannot set up L3: {0}")]
    L3(String),
}

#[derive(Debug, Default)]
struct WriteBehindCounters {
    queued_bytes: AtomicU64,
    enqueued: AtomicU64,
    dropped: AtomicU64,
    written: AtomicU64,
    /// Evicted from L1 before it could be written.
    missed: AtomicU64,
    failed: AtomicU64,
    /// Times a tier behind L1 ran out of space (one per incident, however many writes wait).
    stalls: AtomicU64,
    /// Objects waiting for a tier to have space again (now).
    held: AtomicU64,
    /// Objects written after waiting for space.
    retried: AtomicU64,
}

/// Write-behind's traffic so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WriteBehindStats {
    pub queued_bytes: u64,
    pub enqueued: u64,
    pub dropped: u64,
    pub written: u64,
    pub missed: u64,
    /// Writes that failed for good (not for lack of space: those are held and retried).
    pub failed: u64,
    /// Times a tier behind L1 ran out of space: write-behind then holds its writes (the keys;
    /// the objects stay in L1) and retries with backoff until space returns.
    pub stalls: u64,
    /// Objects held for a retry now, while a tier is out of space.
    pub held: u64,
    /// Objects written after being held.
    pub retried: u64,
}

/// L1's occupancy and traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
// Its name in the JSON schemas of `/status` and `cache_stats`, kept stable.
#[serde(rename = "L1Stats")]
pub struct L1Report {
    pub objects: usize,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub committed_objects: u64,
    pub committed_bytes: u64,
    pub evicted_objects: u64,
    pub evicted_bytes: u64,
    pub no_space: u64,
    /// Objects evicted to keep a salt within its quota, and reservations refused at one.
    #[serde(default)]
    pub quota_evicted_objects: u64,
    #[serde(default)]
    pub quota_refused: u64,
}

/// Every tier's figures at one moment.
#[derive(Debug, Clone, Default)]
pub struct TiersStats {
    pub l1: L1Report,
    /// The tiers behind L1, in order, by name.
    pub lower: Vec<(&'static str, TierStats)>,
    pub write_behind: WriteBehindStats,
}

/// Where `install` found an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// The target key was resident already.
    Resident,
    /// Copied from another L1 object (`bytes`).
    FromL1(u64),
    /// Read from a tier behind L1 (`bytes`).
    FromLower(u64),
}

#[derive(Debug, Error)]
pub enum InstallError {
    #[error("record {0:?} is in no tier")]
    Missing(Box<ObjectKey>),
    #[error("L1 has no room")]
    NoSpace,
    #[error(transparent)]
    Tier(#[from] TierError),
}

struct Job {
    key: ObjectKey,
    bytes: u64,
    /// The clear generation it was queued in: a `clear` since cancels it.
    generation: u64,
    /// The tiers behind L1 (bit i: `lower[i]`) still to write it to.
    pending: u32,
    /// Whether it waited for space already.
    held: bool,
    /// Whether some tier refused it for good.
    failed: bool,
}

/// What `clear` shares with write-behind: the generation stamped on every queued job (a job
/// of an older generation was cancelled by a clear), and the fence that keeps a write to the
/// tiers behind and a clear apart, so nothing written before a clear survives it.
#[derive(Default)]
struct Generation {
    current: AtomicU64,
    fence: Mutex<()>,
}

/// What `clear` dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleared {
    pub l1: usize,
    /// Records dropped from the tiers behind L1.
    pub lower: usize,
}

/// L1 and the tiers behind it. Fields are private: callers go through the operations below.
pub struct Tiers {
    l1: Arc<L1Store>,
    lower: Vec<Arc<dyn Tier>>,
    /// L3 again (it is also in `lower` for write-behind): lookups and thaws read it in batches.
    l3: Option<Arc<L3>>,
    compression: CompressionPolicy,
    sealer: Sealer,
    write_behind: Arc<WriteBehindCounters>,
    generation: Arc<Generation>,
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    queue_limit: u64,
    worker: Mutex<Option<JoinHandle<()>>>,
    last_drop_log: Mutex<Option<Instant>>,
}

impl Tiers {
    /// Build every configured tier: L1, then the disk tier behind it when configured (the one
    /// line a new tier adds is here), and start write-behind when some tier is behind L1.
    pub fn open(config: &TiersConfig) -> Result<Tiers, OpenError> {
        let bytes = config.l1.capacity_bytes;
        let l1 =
            match &config.l1_memory {
                L1Memory::Private => {
                    L1Store::new(&config.l1).map_err(|source| OpenError::L1 { bytes, source })?
                }
                L1Memory::Shared(name) => L1Store::new_shared(&config.l1, name.as_deref())
                    .map_err(|source| OpenError::Pool {
                        bytes,
                        name: name.clone(),
                        source,
                    })?,
            };
        l1.quotas.set_default(config.l1_quota_per_salt);
        if config.l1_populate == L1Populate::Eager {
            // Detached: it ends when L1 is dropped or fully committed.
            populate::start(&l1);
        }
        let mut lower: Vec<Arc<dyn Tier>> = Vec::new();
        let mut compression = CompressionPolicy::default();
        if let Some(l2) = &config.l2 {
            lower.push(Arc::new(open_disk(l2)?.sealed_with(config.sealer.clone())));
            compression = l2.disk.compression;
        }
        let l3 = match &config.l3 {
            Some(c) => {
                let c = L3Config {
                    sealer: config.sealer.clone(),
                    ..c.clone()
                };
                let l3 = L3::open(c, compression).map_err(|e| OpenError::L3(e.to_string()))?;
                lower.push(l3.clone());
                Some(l3)
            }
            None => None,
        };
        let sealer = config.sealer.clone();
        let mut tiers = Tiers::with_tiers(l1, lower, compression, sealer, config.write_queue_bytes);
        tiers.l3 = l3;
        Ok(tiers)
    }

    /// L1 over `l1` with `lower` behind it (tests and benches that build tiers by hand).
    pub fn with_tiers(
        l1: Arc<L1Store>,
        lower: Vec<Arc<dyn Tier>>,
        compression: CompressionPolicy,
        sealer: Sealer,
        queue_limit: u64,
    ) -> Tiers {
        assert!(lower.len() <= 32, "a job's pending tiers are bits of a u32");
        let counters: Arc<WriteBehindCounters> = Arc::default();
        let generation: Arc<Generation> = Arc::default();
        let (queue, worker) = if lower.is_empty() {
            (None, None)
        } else {
            let (tx, rx) = mpsc::channel();
            let worker = WriteBehind {
                l1: l1.clone(),
                lower: lower.clone(),
                counters: counters.clone(),
                generation: generation.clone(),
                compression,
                sealer: sealer.clone(),
            };
            let worker = background::spawn("cwm-write-behind", move || worker.run(rx));
            (Some(tx), Some(worker))
        };
        Tiers {
            l1,
            lower,
            l3: None,
            compression,
            sealer,
            write_behind: counters,
            generation,
            queue: Mutex::new(queue),
            queue_limit,
            worker: Mutex::new(worker),
            last_drop_log: Mutex::new(None),
        }
    }

    // ----- L1 ---------------------------------------------------------------------------------

    /// Reserve `len` bytes of L1 for `key` (evicting if needed): the one way into L1.
    pub fn reserve(&self, key: &ObjectKey, len: u64) -> Reservation {
        self.l1.reserve(key, len)
    }

    /// Publish written objects (elements of `itemsize` bytes) and queue them for the tiers
    /// behind L1. Never blocks on those tiers.
    pub fn commit(&self, writes: impl IntoIterator<Item = WriteGuard>, itemsize: u8) {
        let mut committed = Vec::new();
        for mut w in writes {
            let (key, bytes) = (w.key().clone(), w.len() as u64);
            w.set_itemsize(itemsize);
            w.commit();
            committed.push((key, bytes));
        }
        self.queue_write_behind(committed);
    }

    /// Pin a committed L1 object for reading.
    pub fn read(&self, key: &ObjectKey) -> Option<ReadGuard> {
        self.l1.read(key)
    }

    /// Count the leading chunks resident for every rank and read-lock them (see
    /// `L1Store::lock_prefix`).
    pub fn lock_prefix(&self, chunks: &[Vec<ObjectKey>], readers: u32) -> usize {
        self.l1.lock_prefix(chunks, readers)
    }

    /// Release up to `n` lookup read locks on each of `keys`.
    pub fn unlock<'a>(&self, keys: impl IntoIterator<Item = &'a ObjectKey>, n: u32) {
        self.l1.unlock(keys, n)
    }

    /// Refresh the L1 recency of `keys`.
    pub fn touch<'a>(&self, keys: impl IntoIterator<Item = &'a ObjectKey>) {
        self.l1.touch(keys)
    }

    /// Whether `key` is committed in L1.
    pub fn resident(&self, key: &ObjectKey) -> bool {
        self.l1.contains(key)
    }

    /// Read-lock count of `key` in L1 (expired locks count as 0).
    pub fn lock_count(&self, key: &ObjectKey) -> u32 {
        self.l1.lock_count(key)
    }

    /// Encryption at rest: its counters for `/status` and `/metrics`.
    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// Per-salt byte budgets of L1 (the admin surface sets them; L1 enforces them).
    pub fn quotas(&self) -> &Quotas {
        &self.l1.quotas
    }

    /// Bytes of L1 each salt occupies, largest first.
    pub fn salt_usage(&self) -> Vec<(Arc<str>, u64)> {
        self.l1.salt_usage()
    }

    pub fn l1_stats(&self) -> L1Occupancy {
        self.l1.stats()
    }

    /// L1's whole memory (address, length), to register it with a GPU driver.
    pub fn l1_memory(&self) -> (*mut u8, u64) {
        self.l1.memory()
    }

    /// The shared pool, if L1 lives in one.
    pub fn pool(&self) -> Option<PoolInfo> {
        self.l1.pool()
    }

    /// Remove the shared pool's name (shutdown). Mappings stay valid.
    pub fn unlink_pool(&self) {
        self.l1.unlink_pool()
    }

    // ----- across tiers -----------------------------------------------------------------------

    /// Whether some tier is behind L1.
    pub fn has_lower(&self) -> bool {
        !self.lower.is_empty()
    }

    /// For each chunk (its keys for every rank), in order, up to the first chunk some rank of
    /// which no tier holds: whether every rank of it is resident in L1. Asks the tiers behind
    /// only what they hold in memory (never waits on I/O).
    pub fn locate(&self, chunks: &[Vec<ObjectKey>]) -> Vec<bool> {
        let mut located = Vec::with_capacity(chunks.len());
        for keys in chunks {
            let missing: Vec<ObjectKey> = keys
                .iter()
                .filter(|k| !self.l1.contains(k))
                .cloned()
                .collect();
            if missing.is_empty() {
                located.push(true);
            } else if self.held_behind(&missing) {
                located.push(false);
            } else {
                break;
            }
        }
        located
    }

    /// Whether every one of `keys` is in some tier behind L1.
    fn held_behind(&self, keys: &[ObjectKey]) -> bool {
        let mut held = vec![false; keys.len()];
        for tier in &self.lower {
            for (h, c) in held.iter_mut().zip(tier.contains(keys)) {
                *h |= c;
            }
        }
        held.iter().all(|&h| h)
    }

    /// The Redis tier, when configured.
    pub fn l3(&self) -> Option<&Arc<L3>> {
        self.l3.as_ref()
    }

    /// Make the leading chunks of a lookup resident in L1 (each chunk: one key per rank). The
    /// first `local` chunks are known to be in L1 or a local tier; past them, the keys in none
    /// are checked in L3 in one batch, and the prefix found there is fetched. Local hits are
    /// promoted in parallel. Returns the length of the prefix now found in some tier
    /// (`lock_prefix` then counts what is actually resident). Waits on I/O: prefetch jobs only.
    pub fn promote_prefix(&self, chunks: &[Vec<ObjectKey>], local: usize) -> usize {
        let mut end = local;
        let mut from_l3 = HashSet::new();
        if let Some(l3) = self.l3.as_ref().filter(|_| local < chunks.len()) {
            let tail = &chunks[local..];
            let remote: Vec<ObjectKey> = tail
                .iter()
                .flatten()
                .filter(|k| !self.available(k))
                .cloned()
                .collect();
            let found = l3.existing(&remote);
            let n = tail
                .iter()
                .take_while(|keys| keys.iter().all(|k| found.contains(k) || self.available(k)))
                .count();
            let wanted: Vec<ObjectKey> = tail[..n]
                .iter()
                .flatten()
                .filter(|k| found.contains(*k))
                .cloned()
                .collect();
            from_l3 = l3.promote(&self.l1, &wanted);
            end += n;
        }
        chunks[..end]
            .par_iter()
            .flatten()
            .filter(|k| !from_l3.contains(*k))
            .for_each(|k| {
                self.promote(k);
            });
        end
    }

    /// Make those of `keys` that are in no local tier resident in L1 from L3 (verified);
    /// how many were read from it.
    pub fn promote_from_l3(&self, keys: &[ObjectKey]) -> u64 {
        let Some(l3) = &self.l3 else { return 0 };
        let missing: Vec<ObjectKey> = keys
            .iter()
            .filter(|k| !self.available(k))
            .cloned()
            .collect();
        if missing.is_empty() {
            return 0;
        }
        l3.promote(&self.l1, &missing).len() as u64
    }

    /// Whether `key` is in L1 or a tier behind it.
    pub fn available(&self, key: &ObjectKey) -> bool {
        self.l1.contains(key) || self.held_behind(std::slice::from_ref(key))
    }

    /// Whether `key` is in a tier behind L1 (durable).
    pub fn durable(&self, key: &ObjectKey) -> bool {
        !self.lower.is_empty() && self.held_behind(std::slice::from_ref(key))
    }

    /// Sizes of `key`'s record in the first tier behind L1 that holds it.
    pub fn record_info(&self, key: &ObjectKey) -> Option<RecordInfo> {
        self.lower.iter().find_map(|t| t.info(key))
    }

    /// Make `key` resident in L1, reading it from a tier behind if needed. False if it is in
    /// none, L1 has no room, or every stored copy failed verification.
    pub fn promote(&self, key: &ObjectKey) -> bool {
        matches!(
            self.install(key, key),
            Ok(Installed::Resident | Installed::FromLower(_) | Installed::FromL1(_))
        )
    }

    /// Make the object of `src` resident in L1 under `dst` (the same key, or the same chunk
    /// under another salt): copied from L1 if `src` is resident, else read from a tier behind.
    pub fn install(&self, src: &ObjectKey, dst: &ObjectKey) -> Result<Installed, InstallError> {
        if self.l1.contains(dst) {
            return Ok(Installed::Resident);
        }
        let in_l1 = if src == dst { None } else { self.l1.read(src) };
        let len = match &in_l1 {
            Some(g) => g.len() as u64,
            None => self
                .lower
                .iter()
                .find_map(|t| t.info(src).map(|i| i.raw_len))
                .ok_or_else(|| InstallError::Missing(Box::new(src.clone())))?,
        };
        let mut slot = match self.l1.reserve(dst, len) {
            Reservation::Present => return Ok(Installed::Resident),
            Reservation::NoSpace => return Err(InstallError::NoSpace),
            Reservation::Reserved(slot) => slot,
        };
        if let Some(g) = &in_l1 {
            slot.copy_from(g);
            slot.commit();
            return Ok(Installed::FromL1(len));
        }
        let mut last = None;
        for tier in &self.lower {
            if tier.info(src).is_none() {
                continue;
            }
            match tier.read_into(src, &mut slot) {
                Ok(()) => {
                    slot.commit();
                    return Ok(Installed::FromLower(len));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or_else(|| InstallError::Missing(Box::new(src.clone())), Into::into))
    }

    /// Write `key` to every tier behind L1 now, from L1, unless a tier holds it; true if
    /// written now. `Ok(false)` too when it is no longer in L1 but some tier holds it.
    pub fn make_durable(&self, key: &ObjectKey) -> Result<bool, DurableError> {
        if self.lower.is_empty() {
            return Err(DurableError::NoTier);
        }
        if self.durable(key) {
            return Ok(false);
        }
        match self.l1.read(key) {
            Some(object) => {
                let record =
                    self.sealer
                        .encode(key, &object.to_vec(), object.itemsize(), self.compression);
                for tier in &self.lower {
                    tier.put(key, &record)?;
                }
                Ok(true)
            }
            None if self.durable(key) => Ok(false),
            None => Err(DurableError::Vanished(Box::new(key.clone()))),
        }
    }

    /// The record of `key` verbatim, from the first tier behind L1 that holds it.
    pub fn export_record(&self, key: &ObjectKey) -> Result<Vec<u8>, DurableError> {
        let tier = self
            .lower
            .iter()
            .find(|t| t.info(key).is_some())
            .ok_or_else(|| DurableError::Vanished(Box::new(key.clone())))?;
        Ok(tier.record(key)?)
    }

    /// Keep a verified record (from a window file) in every tier behind L1.
    pub fn import_record(&self, key: &ObjectKey, record: &[u8]) -> Result<(), DurableError> {
        if self.lower.is_empty() {
            return Err(DurableError::NoTier);
        }
        for tier in &self.lower {
            tier.put(key, record)?;
        }
        Ok(())
    }

    /// Protect `key` from eviction and `clear` in every tier behind L1 that holds it (reference
    /// counted); false if none does.
    pub fn pin(&self, key: &ObjectKey) -> bool {
        let mut pinned = false;
        for tier in &self.lower {
            pinned |= tier.pin(key);
        }
        pinned
    }

    pub fn unpin(&self, key: &ObjectKey) {
        for tier in &self.lower {
            tier.unpin(key);
        }
    }

    /// Make everything written to the tiers behind L1 durable.
    pub fn sync(&self) -> Result<(), TierError> {
        self.lower.iter().try_for_each(|t| t.sync())
    }

    /// Empty the cache of everything no window pins: L1 (read-locked objects too with
    /// `force`; objects being read or written always stay), every unpinned record of the tiers
    /// behind, and the write-behind queue (cancelled, so nothing stored before the clear
    /// reaches a tier after it).
    pub fn clear(&self, force: bool) -> Cleared {
        let _fence = self.generation.fence.lock();
        self.generation.current.fetch_add(1, Relaxed);
        let mut cleared = Cleared {
            l1: self.l1.clear(force),
            lower: 0,
        };
        for tier in &self.lower {
            match tier.clear() {
                Ok(n) => cleared.lower += n,
                Err(e) => tracing::error!("clear: {e}"),
            }
        }
        cleared
    }

    /// Drop L1's objects as eviction would (read-locked ones too with `force`); the tiers
    /// behind keep theirs. For tests and benchmarks that need reads to come from behind L1.
    pub fn evict_l1(&self, force: bool) -> usize {
        self.l1.clear(force)
    }

    pub fn stats(&self) -> TiersStats {
        let s = self.l1.stats();
        let c: &L1Counters = &self.l1.counters;
        let wb = &self.write_behind;
        TiersStats {
            l1: L1Report {
                objects: s.objects,
                used_bytes: s.used_bytes,
                capacity_bytes: s.capacity_bytes,
                committed_objects: c.committed_objects.load(Relaxed),
                committed_bytes: c.committed_bytes.load(Relaxed),
                evicted_objects: c.evicted_objects.load(Relaxed),
                evicted_bytes: c.evicted_bytes.load(Relaxed),
                no_space: c.no_space.load(Relaxed),
                quota_evicted_objects: c.quota_evicted_objects.load(Relaxed),
                quota_refused: c.quota_refused.load(Relaxed),
            },
            lower: self.lower.iter().map(|t| (t.name(), t.stats())).collect(),
            write_behind: WriteBehindStats {
                queued_bytes: wb.queued_bytes.load(Relaxed),
                enqueued: wb.enqueued.load(Relaxed),
                dropped: wb.dropped.load(Relaxed),
                written: wb.written.load(Relaxed),
                missed: wb.missed.load(Relaxed),
                failed: wb.failed.load(Relaxed),
                stalls: wb.stalls.load(Relaxed),
                held: wb.held.load(Relaxed),
                retried: wb.retried.load(Relaxed),
            },
        }
    }

    /// Stop the write-behind worker after it drained its queue, and close the tiers behind.
    pub fn shutdown(&self) {
        self.queue.lock().take();
        if let Some(w) = self.worker.lock().take() {
            let _ = w.join();
        }
        for tier in &self.lower {
            if let Err(e) = tier.close() {
                tracing::error!("closing {} at shutdown failed: {e}", tier.name());
            }
        }
    }

    /// Queue freshly committed L1 objects for the tiers behind. Never blocks.
    fn queue_write_behind(&self, committed: Vec<(ObjectKey, u64)>) {
        let queue = self.queue.lock();
        let Some(tx) = queue.as_ref() else { return };
        let c = &self.write_behind;
        let generation = self.generation.current.load(Relaxed);
        for (key, object_bytes) in committed {
            if c.queued_bytes.load(Relaxed) + object_bytes > self.queue_limit {
                c.dropped.fetch_add(1, Relaxed);
                let mut last = self.last_drop_log.lock();
                if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    *last = Some(Instant::now());
                    tracing::warn!(
                        queued_bytes = c.queued_bytes.load(Relaxed),
                        limit = self.queue_limit,
                        dropped_total = c.dropped.load(Relaxed),
                        "write-behind queue full: dropping writes (the tiers behind L1 are \
                         slower than stores)"
                    );
                }
                continue;
            }
            c.queued_bytes.fetch_add(object_bytes, Relaxed);
            c.enqueued.fetch_add(1, Relaxed);
            if tx
                .send(Job {
                    key,
                    bytes: object_bytes,
                    generation,
                    pending: u32::MAX,
                    held: false,
                    failed: false,
                })
                .is_err()
            {
                c.queued_bytes.fetch_sub(object_bytes, Relaxed);
            }
        }
    }
}

impl Drop for Tiers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[derive(Debug, Error)]
pub enum DurableError {
    #[error("no tier behind L1 (set --l2-size-gb above 0)")]
    NoTier,
    #[error("chunk {0:?} left the cache")]
    Vanished(Box<ObjectKey>),
    #[error(transparent)]
    Tier(#[from] TierError),
}

/// The disk tier at `config.path`.
fn open_disk(config: &L2Config) -> Result<DiskStore<FsStorage>, OpenError> {
    let path = config.path.clone();
    let storage = FsStorage::open(&path).map_err(|source| OpenError::L2Dir {
        path: path.clone(),
        source,
    })?;
    DiskStore::open(storage, config.disk.clone()).map_err(|source| OpenError::L2 { path, source })
}

const BATCH: usize = 8;
/// How long the worker waits for work before it runs the tiers' housekeeping anyway.
const IDLE: Duration = Duration::from_millis(200);
/// The first wait before retrying a tier that ran out of space; each failed retry doubles it,
/// up to `LAST_RETRY`.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(5);

/// The write-behind worker: drains the queue in batches, encodes each object once (on the
/// background pool) and hands the record to every tier behind L1.
///
/// A tier that refuses a write for lack of space (`TierError::out_of_space`) starts a stall:
/// the write is held (its key only: the object stays in L1 and is read again for the retry),
/// everything queued behind it waits too, and one write is retried with backoff until the tier
/// takes it; then the held writes go out in order. Held writes still count in the queue's byte
/// limit, so a long stall drops new work (counted) rather than growing memory; a held write
/// whose object L1 evicted, or that a clear cancelled, is forgotten (evictions count as missed).
struct WriteBehind {
    l1: Arc<L1Store>,
    lower: Vec<Arc<dyn Tier>>,
    counters: Arc<WriteBehindCounters>,
    generation: Arc<Generation>,
    compression: CompressionPolicy,
    sealer: Sealer,
}

/// A tier behind L1 is out of space: since when, and when to try again.
struct Stall {
    since: Instant,
    wait: Duration,
    next_try: Instant,
}

impl Stall {
    fn new() -> Stall {
        let now = Instant::now();
        Stall {
            since: now,
            wait: FIRST_RETRY,
            next_try: now + FIRST_RETRY,
        }
    }

    fn back_off(&mut self) {
        self.wait = (self.wait * 2).min(LAST_RETRY);
        self.next_try = Instant::now() + self.wait;
    }
}

/// What one `write_batch` did.
#[derive(Default)]
struct BatchOutcome {
    /// Jobs some tier refused for lack of space, still pending for those tiers, in order.
    held: Vec<Job>,
    /// The first out-of-space error, for the stall's one log line.
    out_of_space: Option<TierError>,
    /// Jobs every tier took.
    written: usize,
}

impl WriteBehind {
    fn run(self, rx: mpsc::Receiver<Job>) {
        // Received and not yet written, oldest first (each still counted in `queued_bytes`).
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut stall: Option<Stall> = None;
        loop {
            let idle = match &stall {
                Some(s) => s
                    .next_try
                    .saturating_duration_since(Instant::now())
                    .min(IDLE),
                None if !waiting.is_empty() => Duration::ZERO,
                None => IDLE,
            };
            match rx.recv_timeout(idle) {
                Ok(job) => waiting.push_back(job),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            // A batch's worth; while stalled, everything queued (keys only, bounded by bytes).
            while stall.is_some() || waiting.len() < BATCH {
                match rx.try_recv() {
                    Ok(job) => waiting.push_back(job),
                    Err(_) => break,
                }
            }
            self.step(&mut waiting, &mut stall);
            // Everything waiting during a stall is held (counted in `held`, and in `retried`
            // once written), whether or not it was tried before the stall began.
            if stall.is_some() {
                waiting.iter_mut().for_each(|job| job.held = true);
            }
            let held = if stall.is_some() { waiting.len() } else { 0 };
            self.counters.held.store(held as u64, Relaxed);
            for tier in &self.lower {
                tier.maintain();
            }
        }
        self.finish(waiting);
    }

    /// Write the oldest waiting jobs: a batch; while stalled, once the wait is over, one job as
    /// a probe, after forgetting the jobs whose objects are gone.
    fn step(&self, waiting: &mut VecDeque<Job>, stall: &mut Option<Stall>) {
        let n = match stall {
            None => BATCH,
            Some(s) if Instant::now() >= s.next_try => {
                self.forget_gone(waiting);
                1
            }
            Some(_) => return,
        };
        let batch: Vec<Job> = waiting.drain(..n.min(waiting.len())).collect();
        let outcome = if batch.is_empty() {
            BatchOutcome::default()
        } else {
            self.write_batch(batch)
        };
        if let Some(e) = outcome.out_of_space {
            for job in outcome.held.into_iter().rev() {
                waiting.push_front(job);
            }
            match stall {
                Some(s) => s.back_off(),
                None => {
                    self.counters.stalls.fetch_add(1, Relaxed);
                    tracing::warn!(
                        waiting = waiting.len(),
                        "write-behind: {e}; holding writes for the tiers behind L1 and \
                         retrying every {FIRST_RETRY:?} to {LAST_RETRY:?} until there is space \
                         (the objects stay in L1; what L1 evicts meanwhile is not written)"
                    );
                    *stall = Some(Stall::new());
                }
            }
        } else if let Some(s) = stall {
            // A probe that found its object gone taught nothing: the next one goes at once.
            if outcome.written > 0 || waiting.is_empty() {
                tracing::info!(
                    stalled_ms = s.since.elapsed().as_millis() as u64,
                    waiting = waiting.len(),
                    "write-behind: the tiers behind L1 take writes again; writing the held ones"
                );
                *stall = None;
            }
        }
    }

    /// Drop waiting jobs a clear cancelled or whose object L1 evicted (counted as missed),
    /// releasing their queue bytes.
    fn forget_gone(&self, waiting: &mut VecDeque<Job>) {
        let c = &self.counters;
        let generation = self.generation.current.load(Relaxed);
        waiting.retain(|job| {
            let cancelled = job.generation != generation;
            let keep = !cancelled && self.l1.contains(&job.key);
            if !keep {
                c.queued_bytes.fetch_sub(job.bytes, Relaxed);
                if !cancelled {
                    c.missed.fetch_add(1, Relaxed);
                }
            }
            keep
        });
    }

    /// At shutdown: write what still waits. If a tier is out of space, what it refused and
    /// everything behind it is given up (counted as failed, one log line): those objects were
    /// in L1 only.
    fn finish(&self, mut waiting: VecDeque<Job>) {
        let c = &self.counters;
        while !waiting.is_empty() {
            let batch = waiting.drain(..BATCH.min(waiting.len())).collect();
            let outcome = self.write_batch(batch);
            if let Some(e) = outcome.out_of_space {
                let lost: Vec<Job> = outcome.held.into_iter().chain(waiting.drain(..)).collect();
                for job in &lost {
                    c.queued_bytes.fetch_sub(job.bytes, Relaxed);
                }
                c.failed.fetch_add(lost.len() as u64, Relaxed);
                tracing::error!(
                    objects = lost.len(),
                    "write-behind stopped with objects not written to the tiers behind L1: {e}"
                );
                break;
            }
        }
        c.held.store(0, Relaxed);
    }

    /// The tiers of `pending` (a job's), with their bits.
    fn pending(&self, pending: u32) -> impl Iterator<Item = (u32, &Arc<dyn Tier>)> {
        self.lower
            .iter()
            .enumerate()
            .map(|(i, t)| (1u32 << i, t))
            .filter(move |(bit, _)| pending & bit != 0)
    }

    fn write_batch(&self, batch: Vec<Job>) -> BatchOutcome {
        // The whole batch runs under the clear fence: a `clear` waits for it, so no object
        // write-behind is still reading (which L1's clear must leave in place) survives it.
        let _fence = self.generation.fence.lock();
        let c = &self.counters;
        let cancelled = |job: &Job| job.generation != self.generation.current.load(Relaxed);
        let records: Vec<Option<Vec<u8>>> = background::pool().install(|| {
            batch
                .par_iter()
                .map(|job| {
                    let keys = std::slice::from_ref(&job.key);
                    if cancelled(job) || self.pending(job.pending).all(|(_, t)| t.contains(keys)[0])
                    {
                        return None;
                    }
                    let Some(object) = self.l1.read(&job.key) else {
                        c.missed.fetch_add(1, Relaxed);
                        return None;
                    };
                    Some(self.sealer.encode(
                        &job.key,
                        &object.to_vec(),
                        object.itemsize(),
                        self.compression,
                    ))
                })
                .collect()
        });
        let mut outcome = BatchOutcome::default();
        for (mut job, record) in batch.into_iter().zip(records) {
            let Some(record) = record.filter(|_| !cancelled(&job)) else {
                c.queued_bytes.fetch_sub(job.bytes, Relaxed);
                continue;
            };
            let mut taken = 0;
            for (bit, tier) in self.pending(job.pending) {
                match tier.put(&job.key, &record) {
                    Ok(()) => taken |= bit,
                    Err(e) if e.out_of_space() => {
                        outcome.out_of_space.get_or_insert(e);
                    }
                    Err(e) => {
                        taken |= bit;
                        job.failed = true;
                        tracing::error!(key = ?job.key, "{} write failed: {e}", tier.name());
                    }
                }
            }
            job.pending &= !taken;
            if self.pending(job.pending).next().is_some() {
                job.held = true;
                outcome.held.push(job);
                continue;
            }
            c.queued_bytes.fetch_sub(job.bytes, Relaxed);
            if job.failed {
                c.failed.fetch_add(1, Relaxed);
            } else {
                c.written.fetch_add(1, Relaxed);
                outcome.written += 1;
                if job.held {
                    c.retried.fetch_add(1, Relaxed);
                }
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests;
