//! The tiers together, behind one closed facade: L1 in memory, and the tiers behind it
//! (`store::tier::Tier`: the disk, Redis) in order, each driven only through that contract.
//! Write-behind: `write_behind`; what the tiers report: `stats`.
//!
//! Policy owned here: `reserve` is the one door into L1 (where admission will live); every
//! object committed to L1 by a store is queued for the tiers behind (write-behind) without ever
//! delaying the store's reply — the queue is bounded in bytes and drops work, counted and
//! logged, rather than block; each object is encoded once, on the background pool
//! (`crate::background`: nice 19, never the foreground rayon pool), and the same record goes
//! to every tier; hits behind L1 are promoted into L1 before anyone may read
//! them; lookups only ever ask tiers what they hold in memory, and leave the tiers that keep no
//! index (`Presence::Unknown`) to prefetch jobs, which probe and fetch a whole prefix at once.

mod stats;
mod write_behind;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use connector_protocol::ObjectKey;
use rayon::prelude::*;
use thiserror::Error;

pub use self::stats::{L1Stats, TiersStats, WriteBehindStats};
use self::write_behind::WriteBehindQueue;
use super::codec::CompressionPolicy;
use super::disk::storage::FsStorage;
use super::disk::{DiskConfig, DiskError, DiskStore};
use super::l1::{L1Config, L1Occupancy, Lease, PoolInfo};
use super::l3::config::L3Config;
use super::l3::{L3Error, L3};
use super::populate::{self, L1Populate};
use super::quota::{BySalt, OverQuota, QuotaTier, Quotas};
use super::record;
use super::seal::Sealer;
use super::tier::{Fetched, Presence, RecordInfo, Tier, TierError, WindowCatalog};
use super::{L1Store, ReadGuard, Reservation, WriteGuard};

/// Where L1 keeps its memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L1Memory {
    /// Private anonymous memory.
    Private,
    /// A POSIX shared-memory pool engines can map (engine-driven mode); `None` picks a name.
    Shared(Option<String>),
}

/// A pool left behind that L1 should take over (`Arena::adopt`) instead of making a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptPool {
    pub name: String,
    pub ino: u64,
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
    /// With a shared L1: the pool engines still map, to adopt if it can be (else a new pool).
    pub adopt_pool: Option<AdoptPool>,
    /// Whether L1's pages are committed ahead of use (`populate`).
    pub l1_populate: L1Populate,
    /// Bytes each salt may occupy on a tier unless it has a quota of its own there
    /// (`store::quota`); a tier not named has no default limit.
    pub quota_per_salt: Vec<(QuotaTier, u64)>,
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
    #[error("cannot set up L3")]
    L3(#[from] L3Error),
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
    /// The fleet's window catalog, when a tier behind L1 keeps one (`Tier::window_catalog`).
    window_catalog: Option<Arc<dyn WindowCatalog>>,
    compression: CompressionPolicy,
    sealer: Sealer,
    write_behind: WriteBehindQueue,
}

impl Tiers {
    /// L1 in the pool `config.adopt_pool` names, if it can be adopted (why not is logged).
    fn adopt_pool(config: &TiersConfig) -> Option<Arc<L1Store>> {
        let pool = config.adopt_pool.as_ref()?;
        match L1Store::adopt_shared(&config.l1, &pool.name, pool.ino) {
            Ok(l1) => {
                tracing::info!(
                    pool = %pool.name,
                    "adopted the L1 pool engines still map (its contents are not trusted: L1 \
                     starts empty)"
                );
                Some(l1)
            }
            Err(e) => {
                tracing::warn!(
                    pool = %pool.name,
                    "cannot adopt the L1 pool engines mapped, making a new one (they \
                     re-register when prompted): {e}"
                );
                None
            }
        }
    }

    /// Build every configured tier: L1, then the tiers behind it in order, one line each (the
    /// one line a new tier adds is here), and start write-behind when some tier is behind L1.
    pub fn open(config: &TiersConfig) -> Result<Tiers, OpenError> {
        let bytes = config.l1.capacity_bytes;
        let l1 = match &config.l1_memory {
            L1Memory::Private => {
                L1Store::new(&config.l1).map_err(|source| OpenError::L1 { bytes, source })?
            }
            L1Memory::Shared(name) => Self::adopt_pool(config)
                .map_or_else(|| L1Store::new_shared(&config.l1, name.as_deref()), Ok)
                .map_err(|source| OpenError::Pool {
                    bytes,
                    name: name.clone(),
                    source,
                })?,
        };
        for &(tier, bytes) in &config.quota_per_salt {
            l1.quotas.set_default(tier, Some(bytes));
        }
        let quotas = &l1.quotas;
        if config.l1_populate == L1Populate::Eager {
            // Detached: it ends when L1 is dropped or fully committed.
            populate::start(&l1);
        }
        let compression = config
            .l2
            .as_ref()
            .map_or_else(CompressionPolicy::default, |l2| l2.disk.compression);
        // Every tier seals what it is given to keep and opens what it reads with the tiers'
        // sealer.
        let sealer = &config.sealer;
        let mut lower: Vec<Arc<dyn Tier>> = Vec::new();
        lower.extend(
            config
                .l2
                .as_ref()
                .map(|c| open_disk(c, sealer, quotas))
                .transpose()?,
        );
        lower.extend(
            (config.l3.clone())
                .map(|c| {
                    L3::open(L3Config {
                        sealer: sealer.clone(),
                        quotas: quotas.clone(),
                        ..c
                    })
                })
                .transpose()?
                .map(|t| t as _),
        );
        Ok(Tiers::with_tiers(
            l1,
            lower,
            compression,
            sealer.clone(),
            config.write_queue_bytes,
        ))
    }

    /// L1 over `l1` with `lower` behind it (tests and benches that build tiers by hand).
    pub fn with_tiers(
        l1: Arc<L1Store>,
        lower: Vec<Arc<dyn Tier>>,
        compression: CompressionPolicy,
        sealer: Sealer,
        queue_limit: u64,
    ) -> Tiers {
        let write_behind =
            WriteBehindQueue::start(&l1, &lower, compression, sealer.clone(), queue_limit);
        let window_catalog = lower.iter().find_map(|t| t.clone().window_catalog());
        Tiers {
            l1,
            lower,
            window_catalog,
            compression,
            sealer,
            write_behind,
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
        self.write_behind.enqueue(committed);
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

    /// The tiers here a quota can name: L1, then each tier behind it.
    pub fn quota_tiers(&self) -> Vec<QuotaTier> {
        std::iter::once(QuotaTier::L1)
            .chain(self.lower.iter().filter_map(|t| QuotaTier::named(t.name())))
            .collect()
    }

    /// Bytes each salt occupies on every tier here (as far as the tier counts them), largest
    /// first.
    pub fn usage_by_tier(&self) -> Vec<(QuotaTier, BySalt)> {
        std::iter::once((QuotaTier::L1, self.l1.salt_usage()))
            .chain(
                self.lower
                    .iter()
                    .filter_map(|t| QuotaTier::named(t.name()).map(|q| (q, t.salt_usage()))),
            )
            .collect()
    }

    /// Whether a window of `salt` naming `keys` fits the salt's quota on every tier behind L1,
    /// with what its windows keep there already. A key no tier holds yet counts as the largest
    /// record its L1 object can make. Changes nothing.
    pub fn admit_window(&self, salt: &str, keys: &[ObjectKey]) -> Result<(), OverQuota> {
        let records: Vec<(ObjectKey, u64)> = keys
            .iter()
            .map(|k| {
                let len = self.record_info(k).map(|i| i.record_len).or_else(|| {
                    self.l1
                        .read(k)
                        .map(|g| record::max_record_len(k, g.len() as u64))
                });
                (k.clone(), len.unwrap_or(0))
            })
            .collect();
        self.lower
            .iter()
            .try_for_each(|t| t.admit_window(salt, &records))
    }

    pub fn l1_occupancy(&self) -> L1Occupancy {
        self.l1.occupancy()
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

    /// Keep the shared pool's name past this process, for the next cwm to adopt.
    pub fn retain_pool(&self) {
        self.l1.retain_pool()
    }

    /// Lease a pool slot to an engine for `ttl` (`L1Store::lease`).
    pub fn lease(&self, offset: u64, len: u64, ttl: Duration) -> Option<Lease> {
        self.l1.lease(offset, len, ttl)
    }

    /// Bytes of inherited leased slots still kept out of use.
    pub fn quarantined_bytes(&self) -> u64 {
        self.l1.quarantined_bytes()
    }

    /// Give back inherited leased slots whose leases expired (`L1Store::expire_inherited_leases`).
    pub fn expire_inherited_leases(&self) -> u64 {
        self.l1.expire_inherited_leases()
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

    /// Whether every one of `keys` is in the index of some tier behind L1.
    fn held_behind(&self, keys: &[ObjectKey]) -> bool {
        let mut held = vec![false; keys.len()];
        for tier in &self.lower {
            for (h, p) in held.iter_mut().zip(tier.may_contain(keys)) {
                *h |= matches!(p, Presence::Held(_));
            }
        }
        held.iter().all(|&h| h)
    }

    /// Whether the chunk past the first `located` of `chunks` may be in a tier that keeps no
    /// index (`Presence::Unknown`): only a probe can tell, so only a prefetch job asks.
    pub fn unknown_beyond(&self, chunks: &[Vec<ObjectKey>], located: usize) -> bool {
        chunks.get(located).is_some_and(|keys| {
            self.lower
                .iter()
                .any(|t| t.may_contain(keys).contains(&Presence::Unknown))
        })
    }

    /// Make the leading chunks of a lookup resident in L1 (each chunk: one key per rank). The
    /// first `local` chunks are known to be in L1 or a tier's index; past them, the keys in
    /// none are probed in the tiers that keep no index, in one batch per tier, and the prefix
    /// found there is fetched. Local hits are promoted in parallel. Returns the length of the
    /// prefix now found in some tier (`lock_prefix` then counts what is actually resident).
    /// Waits on I/O: prefetch jobs only.
    pub fn promote_prefix(&self, chunks: &[Vec<ObjectKey>], local: usize) -> usize {
        let (found, fetched) = self.fetch_prefix(&chunks[local.min(chunks.len())..]);
        let end = local + found;
        chunks[..end]
            .par_iter()
            .flatten()
            .filter(|k| !fetched.contains(*k))
            .for_each(|k| {
                self.promote(k);
            });
        end
    }

    /// Probe the tiers that keep no index for the keys of `tail` available nowhere else, and
    /// fetch the leading chunks found in full. Returns how many chunks lead, and the keys now
    /// resident from those tiers.
    fn fetch_prefix(&self, tail: &[Vec<ObjectKey>]) -> (usize, HashSet<ObjectKey>) {
        let remote: Vec<ObjectKey> = tail
            .iter()
            .flatten()
            .filter(|k| !self.available(k))
            .cloned()
            .collect();
        // Key → the first tier (by index) that holds it.
        let mut found: HashMap<ObjectKey, usize> = HashMap::new();
        for (i, tier) in self.lower.iter().enumerate() {
            let unknown: Vec<ObjectKey> = remote
                .iter()
                .zip(tier.may_contain(&remote))
                .filter(|(k, p)| *p == Presence::Unknown && !found.contains_key(*k))
                .map(|(k, _)| k.clone())
                .collect();
            if unknown.is_empty() {
                continue;
            }
            let held = tier.probe(&unknown);
            for (k, held) in unknown.into_iter().zip(held) {
                if held {
                    found.insert(k, i);
                }
            }
        }
        let n = tail
            .iter()
            .take_while(|keys| {
                keys.iter()
                    .all(|k| found.contains_key(k) || self.available(k))
            })
            .count();
        let mut fetched = HashSet::new();
        for (i, tier) in self.lower.iter().enumerate() {
            let wanted: Vec<ObjectKey> = tail[..n]
                .iter()
                .flatten()
                .filter(|k| found.get(*k) == Some(&i))
                .cloned()
                .collect();
            if !wanted.is_empty() {
                fetched.extend(self.fetch_from(tier, &wanted));
            }
        }
        (n, fetched)
    }

    /// Fetch `keys` from `tier` into L1 (under their own keys) and publish them; the keys now
    /// resident.
    fn fetch_from(&self, tier: &Arc<dyn Tier>, keys: &[ObjectKey]) -> Vec<ObjectKey> {
        let reserve = |key: &ObjectKey, len: u64| self.l1.reserve(key, len);
        tier.fetch(keys, &reserve)
            .into_iter()
            .zip(keys)
            .filter_map(|(fetched, key)| match fetched {
                Fetched::Read(object) => {
                    object.commit();
                    Some(key.clone())
                }
                Fetched::Resident => Some(key.clone()),
                Fetched::Missing | Fetched::NoSpace | Fetched::Failed(_) => None,
            })
            .collect()
    }

    /// Make those of `keys` that no tier's index holds resident in L1 from the tiers that keep
    /// no index (verified), in one batch per tier; how many were read from them. Waits on I/O.
    pub fn fetch_unknown(&self, keys: &[ObjectKey]) -> u64 {
        let mut fetched: HashSet<ObjectKey> = HashSet::new();
        for tier in &self.lower {
            // One batched question per tier; only keys it cannot tell of are checked further.
            let unknown: Vec<ObjectKey> = keys
                .iter()
                .zip(tier.may_contain(keys))
                .filter(|(k, p)| {
                    *p == Presence::Unknown && !fetched.contains(*k) && !self.available(k)
                })
                .map(|(k, _)| k.clone())
                .collect();
            if !unknown.is_empty() {
                fetched.extend(self.fetch_from(tier, &unknown));
            }
        }
        fetched.len() as u64
    }

    /// Whether some tier holds `key`, asking the tiers that keep no index (may wait on I/O).
    pub fn exists(&self, key: &ObjectKey) -> bool {
        let keys = std::slice::from_ref(key);
        self.available(key)
            || self
                .lower
                .iter()
                .any(|t| t.may_contain(keys)[0] == Presence::Unknown && t.probe(keys)[0])
    }

    /// The fleet's window catalog, when a tier keeps one.
    pub fn window_catalog(&self) -> Option<&Arc<dyn WindowCatalog>> {
        self.window_catalog.as_ref()
    }

    /// Whether `key` is in L1 or the index of a tier behind it.
    pub fn available(&self, key: &ObjectKey) -> bool {
        self.l1.contains(key) || self.held_behind(std::slice::from_ref(key))
    }

    /// Whether `key` is in the index of a tier behind L1 (durable).
    pub fn durable(&self, key: &ObjectKey) -> bool {
        !self.lower.is_empty() && self.held_behind(std::slice::from_ref(key))
    }

    /// The first tier behind L1 whose index holds `key`, with the record's sizes.
    fn holder(&self, key: &ObjectKey) -> Option<(&Arc<dyn Tier>, RecordInfo)> {
        let keys = std::slice::from_ref(key);
        self.lower
            .iter()
            .find_map(|t| match t.may_contain(keys)[0] {
                Presence::Held(info) => Some((t, info)),
                Presence::Absent | Presence::Unknown => None,
            })
    }

    /// Sizes of `key`'s record in the first tier behind L1 that holds it.
    pub fn record_info(&self, key: &ObjectKey) -> Option<RecordInfo> {
        self.holder(key).map(|(_, info)| info)
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
    /// under another salt): copied from L1 if `src` is resident, else fetched from the first
    /// tier whose index holds it that reads it back verified.
    pub fn install(&self, src: &ObjectKey, dst: &ObjectKey) -> Result<Installed, InstallError> {
        if self.l1.contains(dst) {
            return Ok(Installed::Resident);
        }
        if src != dst {
            if let Some(g) = self.l1.read(src) {
                let len = g.len() as u64;
                return match self.l1.reserve(dst, len) {
                    Reservation::Present => Ok(Installed::Resident),
                    Reservation::NoSpace => Err(InstallError::NoSpace),
                    Reservation::Reserved(mut slot) => {
                        slot.copy_from(&g);
                        slot.commit();
                        Ok(Installed::FromL1(len))
                    }
                };
            }
        }
        let keys = std::slice::from_ref(src);
        let reserve = |_: &ObjectKey, len: u64| self.l1.reserve(dst, len);
        let mut last = None;
        for tier in &self.lower {
            if !matches!(tier.may_contain(keys)[0], Presence::Held(_)) {
                continue;
            }
            match tier.fetch(keys, &reserve).pop() {
                Some(Fetched::Read(object)) => {
                    let len = object.len() as u64;
                    object.commit();
                    return Ok(Installed::FromLower(len));
                }
                Some(Fetched::Resident) => return Ok(Installed::Resident),
                Some(Fetched::NoSpace) => return Err(InstallError::NoSpace),
                Some(Fetched::Failed(e)) => last = Some(e),
                Some(Fetched::Missing) | None => {}
            }
        }
        Err(last.map_or_else(|| InstallError::Missing(Box::new(src.clone())), Into::into))
    }

    /// Keep `record` (of `key`) in every tier behind L1.
    fn put_everywhere(&self, key: &ObjectKey, record: &[u8]) -> Result<(), TierError> {
        for tier in &self.lower {
            tier.put(&[(key, record)])
                .pop()
                .expect("a put answers for each record")?;
        }
        Ok(())
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
                self.put_everywhere(key, &record)?;
                Ok(true)
            }
            None if self.durable(key) => Ok(false),
            None => Err(DurableError::Vanished(Box::new(key.clone()))),
        }
    }

    /// The record of `key` verbatim, from the first tier behind L1 whose index holds it.
    pub fn export_record(&self, key: &ObjectKey) -> Result<Vec<u8>, DurableError> {
        let (tier, _) = self
            .holder(key)
            .ok_or_else(|| DurableError::Vanished(Box::new(key.clone())))?;
        Ok(tier.record(key)?)
    }

    /// The record of `key`: encoded from L1 when resident, else a tier's verbatim.
    pub fn record_of(&self, key: &ObjectKey) -> Result<Vec<u8>, DurableError> {
        match self.l1.read(key) {
            Some(g) => Ok(self
                .sealer
                .encode(key, &g.to_vec(), g.itemsize(), self.compression)),
            None => self.export_record(key),
        }
    }

    /// Keep a verified record (from a window file) in every tier behind L1.
    pub fn import_record(&self, key: &ObjectKey, record: &[u8]) -> Result<(), DurableError> {
        if self.lower.is_empty() {
            return Err(DurableError::NoTier);
        }
        Ok(self.put_everywhere(key, record)?)
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
        let _fence = self.write_behind.cancel();
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

    /// Stop the write-behind worker after it drained its queue, and close the tiers behind.
    pub fn shutdown(&self) {
        self.write_behind.stop();
        for tier in &self.lower {
            if let Err(e) = tier.close() {
                tracing::error!("closing {} at shutdown failed: {e}", tier.name());
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
fn open_disk(
    config: &L2Config,
    sealer: &Sealer,
    quotas: &Arc<Quotas>,
) -> Result<Arc<dyn Tier>, OpenError> {
    let path = config.path.clone();
    let storage = FsStorage::open(&path).map_err(|source| OpenError::L2Dir {
        path: path.clone(),
        source,
    })?;
    let disk = DiskStore::open(storage, config.disk.clone())
        .map_err(|source| OpenError::L2 { path, source })?;
    Ok(Arc::new(
        disk.sealed_with(sealer.clone()).bounded_by(quotas.clone()),
    ))
}

#[cfg(test)]
mod tests;
