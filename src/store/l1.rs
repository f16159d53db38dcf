//! L1: the in-memory object store. Objects live in one `Arena`; an index maps each
//! `ObjectKey` to its extent and state.
//!
//! Rules this module owns:
//! - an object is visible (lookups, reads) only after `WriteGuard::commit`, i.e. once its bytes
//!   are complete; an abandoned write frees its space;
//! - a key already present (being written or committed) is never stored twice;
//! - eviction takes the least recently used object that is neither read-locked by a lookup
//!   (locks expire after a TTL, the safety net for clients that vanish) nor being read;
//! - bytes are copied outside the index lock; the lock is held only for bookkeeping.
//!
//! The arena may be a shared-memory pool (`L1Store::new_shared`): then every object's extent
//! offset (`WriteGuard::pool_offset`, `ReadGuard::pool_offset`) is where an engine that mapped
//! the pool finds the object's bytes, and the same rules hold for the engine's copies as for
//! cwm's own: it may write only under a `WriteGuard`, read only under a `ReadGuard`. Since an
//! engine maps those pages read-write, no Rust reference ever covers an object's bytes: guards
//! copy in and out through raw pointers (`copy_from_slice`, `copy_to`, `to_vec`, `as_ptr`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use connector_protocol::ObjectKey;
use parking_lot::Mutex;

use super::arena::{Arena, Extent, ExtentAllocator};
use super::leases::PoolLeases;
use super::quota::{self, QuotaTier, Quotas};

#[derive(Debug, Clone)]
pub struct L1Config {
    pub capacity_bytes: u64,
    /// How long a lookup's read lock protects an object from eviction if never released.
    pub lock_ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Writing,
    Ready,
}

#[derive(Debug)]
struct Entry {
    extent: Extent,
    len: u64,
    state: State,
    /// Read locks taken by lookups (released by retrieve / free_lookup_locks, or expired).
    locks: u32,
    locks_expire: Instant,
    /// Reads in progress (a `ReadGuard` alive); memory safety, never expires.
    active_reads: u32,
    lru_tick: u64,
    /// Bytes per element of what the object holds (steers the tiers' compression).
    itemsize: u8,
}

impl Entry {
    /// Read locks still in force (all of them lapse together at `locks_expire`).
    fn live_locks(&self, now: Instant) -> u32 {
        if now < self.locks_expire {
            self.locks
        } else {
            0
        }
    }

    fn locked(&self, now: Instant) -> bool {
        self.live_locks(now) > 0
    }

    fn evictable(&self, now: Instant) -> bool {
        self.state == State::Ready && self.active_reads == 0 && !self.locked(now)
    }
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<ObjectKey, Entry>,
    lru: BTreeMap<u64, ObjectKey>,
    next_tick: u64,
    used_bytes: u64,
    /// Bytes each salt's objects occupy (allocation units), for its quota.
    salt_bytes: HashMap<Arc<str>, u64>,
}

impl Index {
    fn touch(&mut self, key: &ObjectKey) {
        let tick = self.next_tick;
        if let Some(e) = self.entries.get_mut(key) {
            if e.state == State::Ready {
                self.lru.remove(&e.lru_tick);
                e.lru_tick = tick;
                self.lru.insert(tick, key.clone());
                self.next_tick += 1;
            }
        }
    }

    fn remove(&mut self, key: &ObjectKey, alloc: &mut ExtentAllocator) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        if e.state == State::Ready {
            self.lru.remove(&e.lru_tick);
        }
        self.used_bytes -= e.extent.len;
        if let Some(b) = self.salt_bytes.get_mut(&key.cache_salt) {
            *b -= e.extent.len;
            if *b == 0 {
                self.salt_bytes.remove(&key.cache_salt);
            }
        }
        alloc.free(e.extent);
        Some(e)
    }

    fn salt_used(&self, salt: &str) -> u64 {
        self.salt_bytes.get(salt).copied().unwrap_or(0)
    }

    /// The least recently used evictable object of `salt`.
    fn salt_victim(&self, salt: &str, now: Instant) -> Option<ObjectKey> {
        self.lru
            .values()
            .find(|k| {
                &*k.cache_salt == salt && self.entries.get(*k).is_some_and(|e| e.evictable(now))
            })
            .cloned()
    }
}

/// Counters exported as metrics.
#[derive(Debug, Default)]
pub struct L1Counters {
    pub committed_objects: AtomicU64,
    pub committed_bytes: AtomicU64,
    pub evicted_objects: AtomicU64,
    pub evicted_bytes: AtomicU64,
    pub no_space: AtomicU64,
    /// Times the shared pool could not get memory from /dev/shm (it stops growing then).
    pub pool_backing_failures: AtomicU64,
    /// Bytes `[0, n)` of the arena committed ahead of use (`store::populate`).
    pub populated_bytes: AtomicU64,
    /// Objects evicted to keep their salt within its quota (also in `evicted_*`).
    pub quota_evicted_objects: AtomicU64,
    /// Reservations refused: the salt was at its quota with nothing of its own evictable.
    pub quota_refused: AtomicU64,
}

/// What L1 holds now (the traffic counters are `L1Counters`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L1Occupancy {
    pub objects: usize,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
}

pub struct L1Store {
    arena: Arena,
    inner: Mutex<(Index, ExtentAllocator)>,
    /// A shared pool's slot leases (`store::leases`), and the ranges inherited as leased.
    leases: Option<PoolLeases>,
    lock_ttl: Duration,
    pub counters: L1Counters,
    /// Per-salt byte budgets, enforced in `reserve` (`store::quota`).
    pub quotas: Arc<Quotas>,
}

/// Outcome of `reserve`.
pub enum Reservation {
    /// Space reserved; write the bytes, then commit.
    Reserved(WriteGuard),
    /// The key is already stored or being stored: nothing to do.
    Present,
    /// No space even after evicting everything evictable.
    NoSpace,
}

/// The shared-memory pool behind a shared L1: what an engine needs to map it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInfo {
    /// POSIX shm name, without the leading `/`.
    pub shm_name: String,
    /// Bytes of slots (the object has `arena::POOL_TAIL` more).
    pub size: u64,
    /// The object's inode: the very pool an engine mapped (`Arena::adopt` checks it).
    pub ino: u64,
    /// Taken over from a previous cwm (`adopt_shared`).
    pub adopted: bool,
}

impl L1Store {
    /// L1 in private anonymous memory.
    pub fn new(config: &L1Config) -> std::io::Result<Arc<L1Store>> {
        Ok(Self::with_arena(Arena::new(config.capacity_bytes)?, config))
    }

    /// L1 in a POSIX shared-memory pool engines can map (`pool()` says where); `shm_name`
    /// `None` picks `cwm_l1_<pid>_<n>`. See `Arena::shared`.
    pub fn new_shared(config: &L1Config, shm_name: Option<&str>) -> std::io::Result<Arc<L1Store>> {
        Ok(Self::with_arena(
            Arena::shared(shm_name, config.capacity_bytes)?,
            config,
        ))
    }

    /// L1 in a pool a previous cwm left behind (`Arena::adopt`). Nothing of its contents is
    /// trusted: L1 starts empty, except that extents still leased to an engine stay out of use
    /// until their leases expire (`store::leases`).
    pub fn adopt_shared(config: &L1Config, name: &str, ino: u64) -> std::io::Result<Arc<L1Store>> {
        Ok(Self::with_arena(
            Arena::adopt(name, config.capacity_bytes, ino)?,
            config,
        ))
    }

    /// L1 in a given arena (e.g. `Arena::shared_in` for benchmarks).
    pub fn with_arena(arena: Arena, config: &L1Config) -> Arc<L1Store> {
        let mut alloc = ExtentAllocator::new(arena.len());
        let leases = arena.tail().map(|(base, len)| {
            // SAFETY: the tail is mapped, page-aligned, for as long as the arena (and so the
            // store that owns both) lives.
            let (leases, held) = unsafe { PoolLeases::open(base, len, arena.len()) };
            for extent in held {
                let taken = alloc.take(extent);
                debug_assert!(taken, "merged leases overlap nothing else");
            }
            leases
        });
        if let Some(bytes) = leases
            .as_ref()
            .map(PoolLeases::quarantined_bytes)
            .filter(|&b| b > 0)
        {
            tracing::warn!(
                pool = arena.shm_name(),
                bytes,
                "slots of the adopted L1 pool were still leased to engines when the previous \
                 cwm stopped: kept out of use until those leases expire"
            );
        }
        Arc::new(L1Store {
            arena,
            inner: Mutex::new((Index::default(), alloc)),
            leases,
            lock_ttl: config.lock_ttl,
            counters: L1Counters::default(),
            quotas: Arc::default(),
        })
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.arena.len()
    }

    /// The whole arena's address and length (to register it with a GPU driver).
    pub fn memory(&self) -> (*mut u8, u64) {
        (self.arena.base(), self.arena.len())
    }

    /// The shared pool, if L1 lives in one.
    pub fn pool(&self) -> Option<PoolInfo> {
        Some(PoolInfo {
            shm_name: self.arena.shm_name()?.to_string(),
            size: self.arena.len(),
            ino: self.arena.pool_ino()?,
            adopted: self.arena.adopted(),
        })
    }

    /// Commit the arena's pages in `[from, to)` ahead of use (see `Arena::populate`).
    pub fn populate(&self, from: u64, to: u64) -> std::io::Result<()> {
        self.arena.populate(Extent {
            offset: from,
            len: to - from,
        })
    }

    /// Remove the shared pool's name (shutdown). Mappings, ours included, stay valid.
    pub fn unlink_pool(&self) {
        self.arena.unlink();
    }

    /// Keep the shared pool's name past this process, for the next cwm to adopt.
    pub fn retain_pool(&self) {
        self.arena.retain_name();
    }

    /// Record that an engine may copy into or out of the `len` bytes at pool offset `offset`
    /// for up to `ttl` (an engine-driven prepare), so a cwm adopting the pool after a crash
    /// keeps them out of use. `None`: no lease can be recorded (no shared pool, or its table
    /// is full), and the slot must not be handed out.
    pub fn lease(self: &Arc<Self>, offset: u64, len: u64, ttl: Duration) -> Option<Lease> {
        let extent = Extent {
            offset,
            len: ExtentAllocator::rounded(len),
        };
        let record = self.leases.as_ref()?.table().grant(extent, ttl)?;
        Some(Lease {
            store: self.clone(),
            record,
        })
    }

    /// Give back inherited leased ranges whose leases have expired; the bytes given back.
    pub fn expire_inherited_leases(&self) -> u64 {
        let Some(leases) = &self.leases else {
            return 0;
        };
        let expired = leases.expire_inherited();
        if expired.is_empty() {
            return 0;
        }
        let mut guard = self.inner.lock();
        expired
            .into_iter()
            .map(|e| {
                guard.1.free(e);
                e.len
            })
            .sum()
    }

    /// Bytes of inherited leased ranges still kept out of use.
    pub fn quarantined_bytes(&self) -> u64 {
        self.leases
            .as_ref()
            .map_or(0, PoolLeases::quarantined_bytes)
    }

    /// Reserve `len` bytes for `key`, evicting LRU objects if needed.
    pub fn reserve(self: &Arc<Self>, key: &ObjectKey, len: u64) -> Reservation {
        // A shared pool gets its memory from /dev/shm as it grows; if that fails, the pool is
        // capped where it is and the reservation retried (now evicting instead of growing).
        for _ in 0..2 {
            let reservation = self.reserve_extent(key, len);
            let Reservation::Reserved(w) = &reservation else {
                return reservation;
            };
            let extent = Extent {
                offset: w.offset,
                len: ExtentAllocator::rounded(len),
            };
            match self.arena.ensure_backed(extent) {
                Ok(()) => return reservation,
                Err(e) => {
                    drop(reservation);
                    let backed = self.arena.backed_bytes();
                    self.inner.lock().1.limit_to(backed);
                    if self.counters.pool_backing_failures.fetch_add(1, Relaxed) == 0 {
                        tracing::error!(
                            pool = self.arena.shm_name(),
                            capacity = self.arena.len(),
                            usable = backed,
                            "L1 pool cannot grow: /dev/shm has no room ({e}); L1 is capped at \
                             what it has. Enlarge /dev/shm (docker: --shm-size) or lower \
                             --l1-size-gb"
                        );
                    }
                }
            }
        }
        self.counters.no_space.fetch_add(1, Relaxed);
        Reservation::NoSpace
    }

    fn reserve_extent(self: &Arc<Self>, key: &ObjectKey, len: u64) -> Reservation {
        let mut guard = self.inner.lock();
        let (index, alloc) = &mut *guard;
        if index.entries.contains_key(key) {
            return Reservation::Present;
        }
        if ExtentAllocator::rounded(len) > alloc.usable() {
            self.counters.no_space.fetch_add(1, Relaxed);
            return Reservation::NoSpace;
        }
        let now = Instant::now();
        if let Some(limit) = self.quotas.limit(QuotaTier::L1, &key.cache_salt) {
            // Over its quota, a salt makes room among its own objects only.
            let need = ExtentAllocator::rounded(len);
            while index.salt_used(&key.cache_salt) + need > limit {
                let Some(victim) = index.salt_victim(&key.cache_salt, now) else {
                    self.counters.quota_refused.fetch_add(1, Relaxed);
                    return Reservation::NoSpace;
                };
                if let Some(e) = index.remove(&victim, alloc) {
                    self.counters.evicted_objects.fetch_add(1, Relaxed);
                    self.counters.evicted_bytes.fetch_add(e.len, Relaxed);
                    self.counters.quota_evicted_objects.fetch_add(1, Relaxed);
                }
            }
        }
        // Evictions of one reservation walk the LRU once: what was skipped (locked or being
        // read) stays unevictable while the lock is held, so the next victim is searched after
        // the last one, not from the front again.
        let mut after = 0;
        let extent = loop {
            if let Some(extent) = alloc.allocate(len) {
                break extent;
            }
            let victim = index
                .lru
                .range(after..)
                .find(|(_, k)| index.entries.get(*k).is_some_and(|e| e.evictable(now)))
                .map(|(tick, k)| (*tick, k.clone()));
            let Some((tick, victim)) = victim else {
                self.counters.no_space.fetch_add(1, Relaxed);
                return Reservation::NoSpace;
            };
            after = tick + 1;
            if let Some(e) = index.remove(&victim, alloc) {
                self.counters.evicted_objects.fetch_add(1, Relaxed);
                self.counters.evicted_bytes.fetch_add(e.len, Relaxed);
            }
        };
        index.used_bytes += extent.len;
        *index.salt_bytes.entry(key.cache_salt.clone()).or_insert(0) += extent.len;
        index.entries.insert(
            key.clone(),
            Entry {
                extent,
                len,
                state: State::Writing,
                locks: 0,
                locks_expire: now,
                active_reads: 0,
                lru_tick: 0,
                itemsize: 1,
            },
        );
        Reservation::Reserved(WriteGuard {
            store: self.clone(),
            key: Some(key.clone()),
            ptr: self.arena.ptr(extent),
            offset: extent.offset,
            len,
            itemsize: 1,
        })
    }

    /// Whether `key` is committed.
    pub fn contains(&self, key: &ObjectKey) -> bool {
        self.inner
            .lock()
            .0
            .entries
            .get(key)
            .is_some_and(|e| e.state == State::Ready)
    }

    /// Count the leading chunks for which every object (all ranks) is committed, and take
    /// `readers` read locks on each object of that prefix, atomically. `chunks[i]` holds the
    /// keys of chunk `i` for every rank.
    pub fn lock_prefix(&self, chunks: &[Vec<ObjectKey>], readers: u32) -> usize {
        let mut guard = self.inner.lock();
        let index = &mut guard.0;
        let hit = chunks
            .iter()
            .take_while(|keys| {
                keys.iter().all(|k| {
                    index
                        .entries
                        .get(k)
                        .is_some_and(|e| e.state == State::Ready)
                })
            })
            .count();
        let now = Instant::now();
        let expire = now + self.lock_ttl;
        for key in chunks[..hit].iter().flatten() {
            let e = index.entries.get_mut(key).expect("checked above");
            e.locks = e.live_locks(now).saturating_add(readers);
            e.locks_expire = expire;
            index.touch(key);
        }
        hit
    }

    /// Release up to `n` read locks on each of `keys` (missing keys are ignored).
    pub fn unlock<'a>(&self, keys: impl IntoIterator<Item = &'a ObjectKey>, n: u32) {
        let mut guard = self.inner.lock();
        for key in keys {
            if let Some(e) = guard.0.entries.get_mut(key) {
                e.locks = e.locks.saturating_sub(n);
            }
        }
    }

    /// Refresh the LRU position of `keys`.
    pub fn touch<'a>(&self, keys: impl IntoIterator<Item = &'a ObjectKey>) {
        let mut guard = self.inner.lock();
        for key in keys {
            guard.0.touch(key);
        }
    }

    /// Pin a committed object for reading; `None` if absent or not yet committed.
    pub fn read(self: &Arc<Self>, key: &ObjectKey) -> Option<ReadGuard> {
        let mut guard = self.inner.lock();
        let index = &mut guard.0;
        let e = index
            .entries
            .get_mut(key)
            .filter(|e| e.state == State::Ready)?;
        e.active_reads += 1;
        let (extent, len, itemsize) = (e.extent, e.len, e.itemsize);
        index.touch(key);
        Some(ReadGuard {
            store: self.clone(),
            key: key.clone(),
            ptr: self.arena.ptr(extent),
            offset: extent.offset,
            len,
            itemsize,
        })
    }

    /// Drop committed objects. Without `force`, read-locked objects stay; objects being read
    /// or written always stay (their memory is in use). Returns the number dropped.
    pub fn clear(&self, force: bool) -> usize {
        let mut guard = self.inner.lock();
        let (index, alloc) = &mut *guard;
        let now = Instant::now();
        let victims: Vec<ObjectKey> = index
            .entries
            .iter()
            .filter(|(_, e)| {
                e.state == State::Ready && e.active_reads == 0 && (force || !e.locked(now))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in &victims {
            index.remove(k, alloc);
        }
        victims.len()
    }

    pub fn occupancy(&self) -> L1Occupancy {
        let guard = self.inner.lock();
        L1Occupancy {
            objects: guard
                .0
                .entries
                .values()
                .filter(|e| e.state == State::Ready)
                .count(),
            used_bytes: guard.0.used_bytes,
            capacity_bytes: self.arena.len(),
        }
    }

    /// Bytes each salt's objects occupy, largest first.
    pub fn salt_usage(&self) -> Vec<(Arc<str>, u64)> {
        quota::largest_first(&self.inner.lock().0.salt_bytes)
    }

    /// Read-lock count of `key` (expired locks count as 0). For tests and status.
    pub fn lock_count(&self, key: &ObjectKey) -> u32 {
        let now = Instant::now();
        self.inner
            .lock()
            .0
            .entries
            .get(key)
            .map_or(0, |e| e.live_locks(now))
    }
}

/// Exclusive access to a reserved, not yet visible object.
/// An engine's lease on a slot (`L1Store::lease`); ends when dropped.
pub struct Lease {
    store: Arc<L1Store>,
    record: u32,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(leases) = &self.store.leases {
            leases.table().release(self.record);
        }
    }
}

pub struct WriteGuard {
    store: Arc<L1Store>,
    key: Option<ObjectKey>,
    ptr: *mut u8,
    offset: u64,
    len: u64,
    itemsize: u8,
}

// SAFETY: the reserved extent belongs to this guard alone until commit or drop, and the
// guard keeps the store (and so the arena) alive; it is only reached through raw pointers.
unsafe impl Send for WriteGuard {}
// SAFETY: as above; `&WriteGuard` exposes the extent only as a raw pointer.
unsafe impl Sync for WriteGuard {}

impl WriteGuard {
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Byte offset of the object in the arena (in the shared pool, if L1 is one).
    pub fn pool_offset(&self) -> u64 {
        self.offset
    }

    pub fn key(&self) -> &ObjectKey {
        self.key.as_ref().expect("uncommitted guard has its key")
    }

    /// Copy `src` (exactly `len()` bytes) into the object.
    pub fn copy_from_slice(&mut self, src: &[u8]) {
        assert_eq!(src.len(), self.len as usize, "object is {} bytes", self.len);
        // SAFETY: the extent is `len` bytes inside the arena, reserved for this guard alone;
        // `src` is ordinary memory, so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr, src.len()) }
    }

    /// Bytes per element of what the object holds (dtype size; 1 until told).
    pub fn set_itemsize(&mut self, itemsize: u8) {
        self.itemsize = itemsize;
    }

    /// Copy `source`'s bytes and element size in (objects of equal length), pointer to
    /// pointer: either may lie in the shared pool, which engines map read-write.
    pub fn copy_from(&mut self, source: &ReadGuard) {
        self.itemsize = source.itemsize;
        assert_eq!(
            self.len, source.len,
            "copy between objects of different sizes"
        );
        // SAFETY: both extents are `len` bytes inside the arena, ours reserved for this guard
        // alone and the source pinned by its guard; distinct keys never share an extent.
        unsafe { std::ptr::copy_nonoverlapping(source.ptr, self.ptr, self.len as usize) }
    }

    /// Publish the object: from now on lookups and reads see it.
    pub fn commit(mut self) {
        let key = self.key.take().expect("commit once");
        let store = &self.store;
        let mut guard = store.inner.lock();
        let index = &mut guard.0;
        if let Some(e) = index.entries.get_mut(&key) {
            e.state = State::Ready;
            e.itemsize = self.itemsize;
            e.lru_tick = index.next_tick;
            index.lru.insert(index.next_tick, key);
            index.next_tick += 1;
        }
        store.counters.committed_objects.fetch_add(1, Relaxed);
        store.counters.committed_bytes.fetch_add(self.len, Relaxed);
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut guard = self.store.inner.lock();
            let (index, alloc) = &mut *guard;
            index.remove(&key, alloc);
        }
    }
}

/// A committed object pinned for reading; it cannot be evicted or cleared while this lives.
pub struct ReadGuard {
    store: Arc<L1Store>,
    key: ObjectKey,
    ptr: *const u8,
    offset: u64,
    len: u64,
    itemsize: u8,
}

// SAFETY: the guard pins a committed, immutable object (`active_reads`) and keeps the store
// alive; the object is only reached through raw pointers.
unsafe impl Send for ReadGuard {}
// SAFETY: as above; any number of readers may copy out of an immutable object at once.
unsafe impl Sync for ReadGuard {}

impl ReadGuard {
    pub fn key(&self) -> &ObjectKey {
        &self.key
    }

    /// Bytes per element of what the object holds.
    pub fn itemsize(&self) -> u8 {
        self.itemsize
    }

    /// Start of the object's bytes, for raw copies (`len()` bytes, pinned while we live).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Copy the object (exactly `len()` bytes) into `out`.
    pub fn copy_to(&self, out: &mut [u8]) {
        assert_eq!(out.len(), self.len as usize, "object is {} bytes", self.len);
        // SAFETY: the object is `len` bytes inside the arena, committed (so no cwm writer) and
        // pinned by `active_reads` while we live; `out` is ordinary memory.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, out.as_mut_ptr(), out.len()) }
    }

    /// The object's bytes, copied out.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0; self.len as usize];
        self.copy_to(&mut out);
        out
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Byte offset of the object in the arena (in the shared pool, if L1 is one).
    pub fn pool_offset(&self) -> u64 {
        self.offset
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut guard = self.store.inner.lock();
        if let Some(e) = guard.0.entries.get_mut(&self.key) {
            e.active_reads -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use connector_protocol::ChunkHash;

    fn key(n: u8, salt: &str) -> ObjectKey {
        ObjectKey {
            model: "m".into(),
            kv_rank: 0x01000100,
            object_group: 0,
            chunk_hash: ChunkHash([n; 32]),
            cache_salt: salt.into(),
        }
    }

    fn store(pages: u64, ttl: Duration) -> Arc<L1Store> {
        L1Store::new(&L1Config {
            capacity_bytes: pages * 4096,
            lock_ttl: ttl,
        })
        .unwrap()
    }

    fn put(s: &Arc<L1Store>, k: &ObjectKey, byte: u8) -> bool {
        match s.reserve(k, 4096) {
            Reservation::Reserved(mut w) => {
                w.copy_from_slice(&[byte; 4096]);
                w.commit();
                true
            }
            _ => false,
        }
    }

    #[test]
    fn invisible_until_committed_and_never_stored_twice() {
        let s = store(4, Duration::from_secs(60));
        let k = key(1, "");
        let Reservation::Reserved(mut w) = s.reserve(&k, 4096) else {
            panic!("no space")
        };
        assert!(!s.contains(&k) && s.read(&k).is_none());
        assert!(matches!(s.reserve(&k, 4096), Reservation::Present));
        w.copy_from_slice(&[7; 4096]);
        w.commit();
        assert_eq!(s.read(&k).unwrap().to_vec(), [7u8; 4096]);
        assert!(matches!(s.reserve(&k, 4096), Reservation::Present));
    }

    #[test]
    fn a_tenant_over_its_quota_evicts_only_its_own_chunks() {
        let s = store(16, Duration::from_secs(60));
        let unit = ExtentAllocator::rounded(4096);
        s.quotas.set(QuotaTier::L1, "alice", 2 * unit);
        // bob fills part of L1 first, then alice stores four chunks within a 2-chunk quota.
        for n in 0..4 {
            assert!(put(&s, &key(100 + n, "bob"), n));
        }
        for n in 0..4 {
            assert!(put(&s, &key(n, "alice"), n), "alice's chunk {n} refused");
        }
        for n in 0..4 {
            assert!(
                s.contains(&key(100 + n, "bob")),
                "bob's chunk {n} was evicted"
            );
        }
        assert!(!s.contains(&key(0, "alice")) && !s.contains(&key(1, "alice")));
        assert!(s.contains(&key(2, "alice")) && s.contains(&key(3, "alice")));
        assert_eq!(s.counters.quota_evicted_objects.load(Relaxed), 2);
        let usage: HashMap<String, u64> = s
            .salt_usage()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(usage["alice"], 2 * unit);
        assert_eq!(usage["bob"], 4 * unit);

        // With its own chunks locked, a tenant at its quota is refused, and still evicts no one.
        assert_eq!(
            s.lock_prefix(&[vec![key(2, "alice")], vec![key(3, "alice")]], 1),
            2
        );
        assert!(!put(&s, &key(9, "alice"), 9));
        assert_eq!(s.counters.quota_refused.load(Relaxed), 1);
        assert_eq!(s.occupancy().objects, 6);

        // A raised quota takes effect at the next store; removing it lifts the bound.
        s.quotas.set(QuotaTier::L1, "alice", 3 * unit);
        assert!(put(&s, &key(9, "alice"), 9));
        assert!(s.quotas.remove(QuotaTier::L1, "alice"));
        assert!(put(&s, &key(10, "alice"), 10));
        assert_eq!(s.occupancy().objects, 8);
    }

    #[test]
    fn abandoned_write_frees_space() {
        let s = store(1, Duration::from_secs(60));
        let Reservation::Reserved(w) = s.reserve(&key(1, ""), 4096) else {
            panic!()
        };
        drop(w);
        assert_eq!(s.occupancy().used_bytes, 0);
        assert!(put(&s, &key(2, ""), 1));
    }

    #[test]
    fn evicts_lru_but_not_locked_or_read() {
        let s = store(3, Duration::from_secs(60));
        let (a, b, c, d) = (key(1, ""), key(2, ""), key(3, ""), key(4, ""));
        assert!(put(&s, &a, 1) && put(&s, &b, 2) && put(&s, &c, 3));
        // a is oldest but locked by a lookup; b is being read; so c must go.
        assert_eq!(s.lock_prefix(&[vec![a.clone()]], 1), 1);
        let reading = s.read(&b).unwrap();
        assert!(put(&s, &d, 4));
        assert!(s.contains(&a) && s.contains(&b) && !s.contains(&c) && s.contains(&d));
        assert_eq!(reading.to_vec()[0], 2);
        // Everything pinned now: no space, nothing corrupted.
        assert_eq!(s.lock_prefix(&[vec![d.clone()]], 1), 1);
        assert!(!put(&s, &c, 9));
        assert_eq!(s.counters.no_space.load(Relaxed), 1);
        drop(reading);
        assert!(put(&s, &c, 3), "b evictable once the read ended");
        assert!(!s.contains(&b));
    }

    #[test]
    fn locks_expire_after_ttl() {
        let s = store(1, Duration::from_millis(20));
        let a = key(1, "");
        assert!(put(&s, &a, 1));
        s.lock_prefix(&[vec![a.clone()]], 2);
        assert_eq!(s.lock_count(&a), 2);
        assert!(!put(&s, &key(2, ""), 2));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(s.lock_count(&a), 0);
        assert!(put(&s, &key(2, ""), 2));
    }

    #[test]
    fn lock_prefix_needs_every_rank_and_stops_at_first_gap() {
        let s = store(8, Duration::from_secs(60));
        let r0 = |n| key(n, "");
        let r1 = |n| ObjectKey {
            kv_rank: 0x02010201,
            ..key(n, "")
        };
        for k in [r0(1), r1(1), r0(2), r0(3), r1(3)] {
            assert!(put(&s, &k, 1));
        }
        let chunks = vec![vec![r0(1), r1(1)], vec![r0(2), r1(2)], vec![r0(3), r1(3)]];
        assert_eq!(s.lock_prefix(&chunks, 1), 1);
        assert_eq!((s.lock_count(&r0(1)), s.lock_count(&r0(3))), (1, 0));
        s.unlock([&r0(1), &r1(1)], 5);
        assert_eq!(s.lock_count(&r0(1)), 0);
    }

    #[test]
    fn slots_leased_when_a_cwm_died_stay_out_of_use_until_their_leases_expire() {
        use super::super::arena::ALIGN;
        let dir = tempfile::tempdir().unwrap();
        let name = format!("cwm_test_leases_{}", std::process::id());
        let config = L1Config {
            capacity_bytes: 4 * ALIGN,
            lock_ttl: Duration::from_secs(60),
        };
        // The dead cwm: it leased slots 0 (long) and 1 (short), and slot 2 whose lease ended.
        let arena = Arena::shared_in(dir.path(), Some(&name), 4 * ALIGN).unwrap();
        let ino = arena.pool_ino().unwrap();
        let (base, len) = arena.tail().unwrap();
        // SAFETY: the tail is mapped while `arena` lives; the table is dropped first.
        let (leases, _) = unsafe { PoolLeases::open(base, len, arena.len()) };
        let at = |page: u64, len: u64| Extent {
            offset: page * ALIGN,
            len,
        };
        leases
            .table()
            .grant(at(0, ALIGN), Duration::from_secs(600))
            .unwrap();
        leases
            .table()
            .grant(at(1, ALIGN), Duration::from_millis(300))
            .unwrap();
        let ended = leases
            .table()
            .grant(at(2, ALIGN), Duration::from_secs(600))
            .unwrap();
        leases.table().release(ended);
        drop(leases);
        arena.retain_name();
        drop(arena);

        let s = L1Store::with_arena(
            Arena::adopt_in(dir.path(), &name, 4 * ALIGN, ino).unwrap(),
            &config,
        );
        assert_eq!(s.quarantined_bytes(), 2 * ALIGN);
        let reserve = |n: u8| match s.reserve(&key(n, ""), ALIGN) {
            Reservation::Reserved(w) => Some(w),
            _ => None,
        };
        let (a, b) = (reserve(1).unwrap(), reserve(2).unwrap());
        let mut offsets = [a.pool_offset(), b.pool_offset()];
        offsets.sort();
        assert_eq!(offsets, [2 * ALIGN, 3 * ALIGN], "only the unleased slots");
        assert!(reserve(3).is_none(), "the leased slots are not free");
        assert_eq!(s.expire_inherited_leases(), 0, "nothing expired yet");
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(s.expire_inherited_leases(), ALIGN, "slot 1's lease expired");
        assert_eq!(s.quarantined_bytes(), ALIGN);
        let c = reserve(3).expect("slot 1 is back in use");
        assert_eq!(c.pool_offset(), ALIGN);
        assert!(reserve(4).is_none(), "slot 0 is still leased");
        drop((a, b, c));
        s.unlink_pool();
    }

    #[test]
    fn shared_store_objects_sit_at_their_pool_offsets() {
        let name = format!("cwm_test_l1_{}", std::process::id());
        let s = L1Store::new_shared(
            &L1Config {
                capacity_bytes: 4 * 4096,
                lock_ttl: Duration::from_secs(60),
            },
            Some(&name),
        )
        .unwrap();
        let file = std::fs::File::open(format!("/dev/shm/{name}")).unwrap();
        assert_eq!(
            s.pool(),
            Some(PoolInfo {
                shm_name: name.clone(),
                size: 4 * 4096,
                ino: std::os::unix::fs::MetadataExt::ino(&file.metadata().unwrap()),
                adopted: false,
            })
        );
        // SAFETY: a read-only view of the test's own pool; the test reads it only after the
        // writes it checks have been committed.
        let view = unsafe { memmap2::Mmap::map(&file).unwrap() };
        assert!(put(&s, &key(1, ""), 1));
        let Reservation::Reserved(mut w) = s.reserve(&key(2, ""), 100) else {
            panic!()
        };
        let offset = w.pool_offset() as usize;
        assert_eq!(offset % 4096, 0);
        w.copy_from_slice(&[9; 100]);
        assert_eq!(&view[offset..offset + 100], &[9u8; 100][..]);
        w.commit();
        let r = s.read(&key(2, "")).unwrap();
        assert_eq!((r.pool_offset() as usize, r.len()), (offset, 100));
        drop(r);
        s.unlink_pool();
        assert!(!std::path::Path::new(&format!("/dev/shm/{name}")).exists());
        assert!(
            put(&s, &key(3, ""), 3),
            "L1 works on after the name is gone"
        );
    }

    #[test]
    fn a_full_dev_shm_caps_the_pool_and_eviction_takes_over() {
        let name = format!("cwm_test_l1_full_{}", std::process::id());
        let s = L1Store::new_shared(
            &L1Config {
                capacity_bytes: 8 * 4096,
                lock_ttl: Duration::from_secs(60),
            },
            Some(&name),
        )
        .unwrap();
        s.arena.limit_room(3 * 4096);
        for n in 1..=3 {
            assert!(put(&s, &key(n, ""), n));
        }
        assert_eq!(s.counters.pool_backing_failures.load(Relaxed), 0);
        // The fourth object has no memory behind it: the pool is capped at 3 pages and the
        // oldest object makes room instead.
        assert!(put(&s, &key(4, ""), 4));
        assert_eq!(s.counters.pool_backing_failures.load(Relaxed), 1);
        assert!(!s.contains(&key(1, "")) && s.contains(&key(4, "")));
        assert_eq!(s.read(&key(4, "")).unwrap().pool_offset(), 0);
        assert!(put(&s, &key(5, ""), 5));
        assert_eq!(s.counters.pool_backing_failures.load(Relaxed), 1);
        assert_eq!(s.occupancy().objects, 3);
        // Locked objects cannot make room: no space, and nothing beyond the cap is touched.
        let chunks: Vec<Vec<ObjectKey>> = (3..=5).map(|n| vec![key(n, "")]).collect();
        assert_eq!(s.lock_prefix(&chunks, 1), 3);
        assert!(matches!(s.reserve(&key(6, ""), 4096), Reservation::NoSpace));
    }

    #[test]
    fn salt_separates_objects() {
        let s = store(4, Duration::from_secs(60));
        assert!(put(&s, &key(1, "alice"), 1));
        assert!(!s.contains(&key(1, "bob")) && !s.contains(&key(1, "")));
        assert!(put(&s, &key(1, "bob"), 2));
        assert_eq!(s.read(&key(1, "alice")).unwrap().to_vec()[0], 1);
    }

    #[test]
    fn clear_keeps_locked_unless_forced() {
        let s = store(4, Duration::from_secs(60));
        let (a, b) = (key(1, ""), key(2, ""));
        assert!(put(&s, &a, 1) && put(&s, &b, 2));
        s.lock_prefix(&[vec![a.clone()]], 1);
        assert_eq!(s.clear(false), 1);
        assert!(s.contains(&a) && !s.contains(&b));
        assert_eq!(s.clear(true), 1);
        assert_eq!(
            s.occupancy(),
            L1Occupancy {
                objects: 0,
                used_bytes: 0,
                capacity_bytes: 4 * 4096
            }
        );
    }
}
