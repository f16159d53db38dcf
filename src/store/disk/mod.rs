//! L2: the disk tier. Append-only segment files of records (`store::record`), an
//! in-memory index rebuilt at open from a checkpoint plus a forward scan of what was appended
//! after it, and segment-level LRU reclaim within a byte budget.
//!
//! Guarantees: a record is indexed only once fully appended; a read verifies the header and
//! payload checksums and the key before decompressing, and a record failing any check is
//! dropped from the index, counted and reported as a miss — never served. A torn tail (a crash
//! mid-append) is truncated at open. Pinned records (frozen windows) survive reclaim: they are
//! copied forward into the active segment before their old segment is deleted.
//!
//! Here: the store's state, appends, reads and pins. Opening (recovery): `recover`; reclaim
//! and `clear`: `reclaim`; the index checkpoint (format and writing): `checkpoint`; the `Tier`
//! contract: `tier`; files: `storage`.

pub mod checkpoint;
pub mod dir_lock;
mod reclaim;
mod recover;
mod salts;
pub mod storage;
mod tier;

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use connector_protocol::ObjectKey;
use parking_lot::Mutex;
use thiserror::Error;

use self::salts::SaltLedger;
use self::storage::{SegmentFile, Storage};
use crate::store::codec::{self, CompressionPolicy};
use crate::store::quota::{OverQuota, QuotaTier, Quotas};
use crate::store::record::{decode_header, Record, RecordError};
use crate::store::seal::{SealError, Sealer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fsync after every record (slowest, loses nothing acknowledged by the disk).
    Always,
    /// fsync at most this often (a crash of the machine loses at most this window).
    Interval(Duration),
    /// leave it to the OS.
    Never,
}

#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub capacity_bytes: u64,
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
    pub compression: CompressionPolicy,
}

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("disk I/O: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("record of {need} bytes does not fit the L2 budget of {capacity} bytes (pinned data leaves {free} free)")]
    Full { need: u64, capacity: u64, free: u64 },
    #[error("stored record holds key {found:?}, index expected {want:?}")]
    KeyMismatch {
        want: Box<ObjectKey>,
        found: Box<ObjectKey>,
    },
    #[error("stored object is {found} bytes, caller expected {want}")]
    Length { want: u64, found: u64 },
    #[error("corrupt payload: {0}")]
    Codec(#[from] codec::CodecError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("checkpoint: {0}")]
    Checkpoint(&'static str),
    #[error(transparent)]
    OverQuota(#[from] OverQuota),
}

/// Where a record lives: what the index holds per key, and the checkpoint persists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub segment: u32,
    pub offset: u64,
    pub record_len: u64,
    pub raw_len: u64,
}

struct SegmentState<F> {
    file: Arc<F>,
    /// Keys whose records live here.
    keys: HashSet<ObjectKey>,
    last_access: u64,
}

struct State<F> {
    index: HashMap<ObjectKey, Location>,
    pins: HashMap<ObjectKey, u32>,
    segments: HashMap<u32, SegmentState<F>>,
    active: Option<u32>,
    next_id: u32,
    used_bytes: u64,
    /// What each salt holds, for its quota.
    salts: SaltLedger,
    tick: u64,
    dirty: bool,
    last_sync: Instant,
}

impl<F> State<F> {
    /// Index `key`'s record at `loc`, replacing an older one: the one way into the index.
    fn insert(&mut self, key: &ObjectKey, loc: Location) {
        self.remove(key);
        let pinned = self.pins.contains_key(key);
        self.index.insert(key.clone(), loc);
        self.used_bytes += loc.record_len;
        self.salts.added(key, &loc, pinned);
        if let Some(seg) = self.segments.get_mut(&loc.segment) {
            seg.keys.insert(key.clone());
        }
        self.dirty = true;
    }

    /// Drop `key` from the index (its record stays in its segment until that is reclaimed).
    fn remove(&mut self, key: &ObjectKey) -> Option<Location> {
        let loc = self.index.remove(key)?;
        self.used_bytes -= loc.record_len;
        self.salts.removed(key, &loc, self.pins.contains_key(key));
        if let Some(seg) = self.segments.get_mut(&loc.segment) {
            seg.keys.remove(key);
        }
        self.dirty = true;
        Some(loc)
    }
}

#[derive(Debug, Default)]
pub struct DiskCounters {
    pub written_records: AtomicU64,
    pub written_raw_bytes: AtomicU64,
    pub written_stored_bytes: AtomicU64,
    pub read_records: AtomicU64,
    pub read_bytes: AtomicU64,
    pub corrupt_records: AtomicU64,
    pub reclaimed_segments: AtomicU64,
    pub reclaimed_records: AtomicU64,
    pub write_errors: AtomicU64,
    /// Records dropped to keep their salt within its L2 quota.
    pub quota_dropped_records: AtomicU64,
    /// Writes refused: the salt was at its L2 quota with too little of its own to drop.
    pub quota_refused: AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskStats {
    pub records: usize,
    pub segments: usize,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub pinned: usize,
}

pub struct DiskStore<S: Storage> {
    storage: S,
    config: DiskConfig,
    /// Seals what `write` encodes and opens what `read` decodes (`store::seal`).
    sealer: Sealer,
    state: Mutex<State<S::File>>,
    /// Held across every disk write (append, fsync on the write path, segment rotation and
    /// reclaim, clear): one writer at a time, while `state` is only ever held for bookkeeping.
    writer: Mutex<()>,
    pub counters: DiskCounters,
    last_checkpoint: Mutex<Instant>,
    /// Per-salt byte budgets; L2's own (`QuotaTier::L2`) are enforced on every append.
    quotas: Arc<Quotas>,
}

impl<S: Storage> DiskStore<S> {
    /// Seal the records `write` encodes, open sealed ones on `read` (`--encryption-key-file`).
    pub fn sealed_with(mut self, sealer: Sealer) -> Self {
        self.sealer = sealer;
        self
    }

    /// Keep each salt within its L2 quota in `quotas` (shared with L1 and the admin surface).
    pub fn bounded_by(mut self, quotas: Arc<Quotas>) -> Self {
        self.quotas = quotas;
        self
    }
    pub fn contains(&self, key: &ObjectKey) -> bool {
        self.state.lock().index.contains_key(key)
    }

    /// Raw (decompressed) length of a stored object.
    pub fn raw_len(&self, key: &ObjectKey) -> Option<u64> {
        self.state.lock().index.get(key).map(|l| l.raw_len)
    }

    /// Bytes the record of `key` takes on disk (header and payload).
    pub fn record_len(&self, key: &ObjectKey) -> Option<u64> {
        self.state.lock().index.get(key).map(|l| l.record_len)
    }

    /// Compress and append `raw` under `key` (no-op if present).
    pub fn write(&self, key: &ObjectKey, raw: &[u8], itemsize: u8) -> Result<(), DiskError> {
        if self.contains(key) {
            return Ok(());
        }
        let record = self
            .sealer
            .encode(key, raw, itemsize, self.config.compression);
        self.append_record(key, &record)
    }

    /// Append an encoded record of `key` (`store::record`; no-op if present).
    pub fn append_record(&self, key: &ObjectKey, record: &[u8]) -> Result<(), DiskError> {
        let h = decode_header(record, 0)?;
        if h.key != *key || h.record_len() != record.len() as u64 {
            return Err(DiskError::KeyMismatch {
                want: Box::new(key.clone()),
                found: Box::new(h.key),
            });
        }
        let (record_len, raw_len) = (h.record_len(), h.raw_len);
        let stored_len = h.stored_len;
        // Disk I/O runs under `writer` only; `state` is held for bookkeeping alone, so what the
        // index answers (lookups, on the request path) never waits on an append or an fsync.
        let _writer = self.writer.lock();
        if self.state.lock().index.contains_key(key) {
            return Ok(());
        }
        self.make_salt_room(&key.cache_salt, record_len)?;
        self.make_room(record_len)?;
        let (id, file) = self.active_segment(record_len)?;
        let offset = file.append(&[record]).inspect_err(|_| {
            self.counters.write_errors.fetch_add(1, Relaxed);
        })?;
        let sync_now = match self.config.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval(d) => self.state.lock().last_sync.elapsed() >= d,
            FsyncPolicy::Never => false,
        };
        if sync_now {
            traced_sync(&*file, "write path")?;
            self.state.lock().last_sync = Instant::now();
        } else if matches!(self.config.fsync, FsyncPolicy::Interval(_)) {
            // Written out now, while the engines are quiet (write-behind puts then), rather
            // than all at once by the interval's fsync whenever it comes: that fsync took
            // 34 ms beside a warm request (BENCHMARKS.md §12.5).
            file.start_writeback(offset, record_len);
        }
        let mut st = self.state.lock();
        st.tick += 1;
        let tick = st.tick;
        st.segments
            .get_mut(&id)
            .expect("active segment")
            .last_access = tick;
        st.insert(
            key,
            Location {
                segment: id,
                offset,
                record_len,
                raw_len,
            },
        );
        self.counters.written_records.fetch_add(1, Relaxed);
        self.counters.written_raw_bytes.fetch_add(raw_len, Relaxed);
        self.counters
            .written_stored_bytes
            .fetch_add(stored_len, Relaxed);
        Ok(())
    }

    /// The segment to append `record_len` bytes to, rotating when the active one is full.
    /// Caller holds `writer`.
    fn active_segment(&self, record_len: u64) -> Result<(u32, Arc<S::File>), DiskError> {
        let active = {
            let st = self.state.lock();
            st.active.map(|id| (id, st.segments[&id].file.clone()))
        };
        if let Some((id, file)) = active {
            let len = file.len();
            if len == 0 || len + record_len <= self.config.segment_bytes {
                return Ok((id, file));
            }
            file.sync()?;
        }
        let id = self.state.lock().next_id;
        let file = Arc::new(self.storage.create(id)?);
        let mut st = self.state.lock();
        st.next_id += 1;
        st.active = Some(id);
        let last_access = st.tick;
        st.segments.insert(
            id,
            SegmentState {
                file: file.clone(),
                keys: HashSet::new(),
                last_access,
            },
        );
        Ok((id, file))
    }

    /// Read, verify and decompress `key` into `out` (exactly its raw length); returns the
    /// record's itemsize. A record that fails verification is dropped from the index.
    pub fn read(&self, key: &ObjectKey, out: &mut [u8]) -> Result<u8, DiskError> {
        let mut itemsize = 0;
        self.read_with(key, Some(out.len() as u64), |record, _| {
            itemsize = record.header.itemsize;
            Ok(self.sealer.decode_into(record, out)?)
        })?;
        Ok(itemsize)
    }

    /// The record of `key` as stored, verified.
    pub fn read_record(&self, key: &ObjectKey) -> Result<Vec<u8>, DiskError> {
        let mut verbatim = Vec::new();
        self.read_with(key, None, |_, bytes| {
            verbatim = bytes.to_vec();
            Ok(())
        })?;
        Ok(verbatim)
    }

    /// Read and verify the record of `key`, then hand it to `use_record`. A record failing
    /// any check is dropped from the index. A `raw_len` other than the record's is the caller's
    /// error: refused from the index, before any read, and the record kept.
    fn read_with(
        &self,
        key: &ObjectKey,
        raw_len: Option<u64>,
        use_record: impl FnOnce(&Record<'_>, &[u8]) -> Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        let (loc, file) = {
            let mut st = self.state.lock();
            let Some(loc) = st.index.get(key).copied() else {
                return Err(DiskError::Io(io::Error::from(io::ErrorKind::NotFound)));
            };
            if let Some(want) = raw_len.filter(|&want| want != loc.raw_len) {
                return Err(DiskError::Length {
                    want,
                    found: loc.raw_len,
                });
            }
            st.tick += 1;
            let tick = st.tick;
            let pinned = st.pins.contains_key(key);
            st.salts.used(key, &loc, pinned);
            let seg = st
                .segments
                .get_mut(&loc.segment)
                .expect("indexed segment exists");
            seg.last_access = tick;
            (loc, seg.file.clone())
        };
        let result = (|| {
            let bytes = file.read(loc.offset, loc.record_len)?;
            let record = Record::parse(&bytes, loc.offset)?;
            if record.header.key != *key {
                return Err(DiskError::KeyMismatch {
                    want: Box::new(key.clone()),
                    found: Box::new(record.header.key),
                });
            }
            use_record(&record, &bytes)
        })();
        match &result {
            Ok(()) => {
                self.counters.read_records.fetch_add(1, Relaxed);
                self.counters.read_bytes.fetch_add(loc.raw_len, Relaxed);
            }
            Err(e) => {
                tracing::error!(
                    ?key,
                    segment = loc.segment,
                    offset = loc.offset,
                    "L2: dropping unreadable record: {e}"
                );
                self.counters.corrupt_records.fetch_add(1, Relaxed);
                self.forget(key);
            }
        }
        result
    }

    fn forget(&self, key: &ObjectKey) {
        self.state.lock().remove(key);
    }

    /// Protect `key` from reclaim (reference counted).
    pub fn pin(&self, key: &ObjectKey) -> bool {
        let mut st = self.state.lock();
        let Some(loc) = st.index.get(key).copied() else {
            return false;
        };
        let n = st.pins.entry(key.clone()).or_default();
        *n += 1;
        if *n == 1 {
            st.salts.pinned(key, &loc, true);
        }
        true
    }

    pub fn unpin(&self, key: &ObjectKey) {
        let mut st = self.state.lock();
        let Some(n) = st.pins.get_mut(key) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            st.pins.remove(key);
            if let Some(loc) = st.index.get(key).copied() {
                st.salts.pinned(key, &loc, false);
            }
        }
    }

    /// fsync the active segment.
    pub fn sync_active(&self) -> Result<(), DiskError> {
        let file = {
            let mut st = self.state.lock();
            st.last_sync = Instant::now();
            st.active
                .and_then(|id| st.segments.get(&id))
                .map(|s| s.file.clone())
        };
        if let Some(f) = file {
            traced_sync(&*f, "interval")?;
        }
        Ok(())
    }

    /// Whether a sync is due under the interval policy.
    pub fn sync_due(&self) -> bool {
        match self.config.fsync {
            FsyncPolicy::Interval(d) => self.state.lock().last_sync.elapsed() >= d,
            _ => false,
        }
    }

    /// Bytes each salt's records take, largest first.
    pub fn salt_usage(&self) -> Vec<(Arc<str>, u64)> {
        self.state.lock().salts.largest_first()
    }

    /// Whether pinning `records` (keys of `salt`, each with the bytes its record will take if
    /// L2 lacks it) keeps the salt's pinned bytes within its L2 quota. Records pinned already
    /// count once.
    pub fn admit_pins(&self, salt: &str, records: &[(ObjectKey, u64)]) -> Result<(), OverQuota> {
        let st = self.state.lock();
        let (_, pinned) = st.salts.usage(salt);
        let need: u64 = records
            .iter()
            .filter(|(k, _)| !st.pins.contains_key(k) || !st.index.contains_key(k))
            .map(|(k, estimate)| st.index.get(k).map_or(*estimate, |l| l.record_len))
            .sum();
        self.quotas.admit(QuotaTier::L2, salt, pinned, need)
    }

    pub fn occupancy(&self) -> DiskStats {
        let st = self.state.lock();
        DiskStats {
            records: st.index.len(),
            segments: st.segments.len(),
            used_bytes: st.used_bytes,
            capacity_bytes: self.config.capacity_bytes,
            pinned: st.pins.len(),
        }
    }
}

#[cfg(test)]
mod tests;

/// fsync a segment, its duration logged for `cwm::trace` (`CWM_LOG=info,cwm::trace=debug`) so
/// a slow foreground op can be lined up against it; `why`: the write path or the interval.
fn traced_sync(file: &impl SegmentFile, why: &'static str) -> io::Result<()> {
    let started = Instant::now();
    file.sync()?;
    tracing::debug!(
        target: "cwm::trace",
        why,
        sync_us = started.elapsed().as_micros() as u64,
        "L2 fsync"
    );
    Ok(())
}
