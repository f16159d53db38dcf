//! L2: the disk tier. Append-only segment files of records (`store::record`), an
//! in-memory index rebuilt at open from a checkpoint plus a forward scan of what was appended
//! after it, and segment-level LRU reclaim within a byte budget.
//!
//! Guarantees: a record is indexed only once fully appended; a read verifies the header and
//! payload checksums and the key before decompressing, and a record failing any check is
//! dropped from the index, counted and reported as a miss — never served. A torn tail (a crash
//! mid-append) is truncated at open. Pinned records (frozen windows) survive reclaim: they are
//! copied forward into the active segment before their old segment is deleted.

pub mod checkpoint;
pub mod dir_lock;
pub mod storage;

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use connector_protocol::ObjectKey;
use parking_lot::Mutex;
use thiserror::Error;

use self::checkpoint::Checkpoint;
use self::storage::{SegmentFile, Storage};
use crate::store::codec::{self, CompressionPolicy};
use crate::store::record::{self, decode_header, Record, RecordError};
use crate::store::seal::{SealError, Sealer};
use crate::store::tier::{RecordInfo, Tier, TierError, TierStats};
use crate::store::WriteGuard;

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
    tick: u64,
    dirty: bool,
    last_sync: Instant,
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
}

/// How often `maintain` persists the index.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

impl<S: Storage> DiskStore<S> {
    /// Open the store: load the checkpoint, scan every segment forward from where the
    /// checkpoint left it, truncate a torn tail.
    pub fn open(storage: S, config: DiskConfig) -> Result<DiskStore<S>, DiskError> {
        let started = Instant::now();
        let mut state = State {
            index: HashMap::new(),
            pins: HashMap::new(),
            segments: HashMap::new(),
            active: None,
            next_id: 0,
            used_bytes: 0,
            tick: 0,
            dirty: false,
            last_sync: Instant::now(),
        };
        let counters = DiskCounters::default();
        let checkpoint = match storage.read_checkpoint()? {
            Some(bytes) => match checkpoint::decode(&bytes) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(
                        "ignoring L2 checkpoint ({e}); rebuilding the index by scanning"
                    );
                    Checkpoint::default()
                }
            },
            None => Checkpoint::default(),
        };
        let ids = storage.segments()?;
        let last = ids.last().copied();
        // Each segment's checkpointed entries, grouped in one pass (not one pass per segment).
        let mut checkpointed: HashMap<u32, Vec<(ObjectKey, Location)>> = HashMap::new();
        for (key, loc) in checkpoint.entries {
            checkpointed
                .entry(loc.segment)
                .or_default()
                .push((key, loc));
        }
        for &id in &ids {
            let file = Arc::new(storage.open(id)?);
            let file_len = file.len();
            let mut keys = HashSet::new();
            let mut at = 0;
            // Trust the checkpoint's entries for this segment if the file still covers them.
            if let Some(&scanned) = checkpoint.scanned.get(&id) {
                if scanned <= file_len {
                    for (key, loc) in checkpointed.remove(&id).unwrap_or_default() {
                        state.used_bytes += loc.record_len;
                        keys.insert(key.clone());
                        state.index.insert(key, loc);
                    }
                    at = scanned;
                }
            }
            // Replay forward.
            while at < file_len {
                let head = file.read(at, record::FIXED as u64 + record::MAX_KEY as u64 + 4)?;
                match decode_header(&head, at) {
                    Ok(h) if at + h.record_len() <= file_len => {
                        let loc = Location {
                            segment: id,
                            offset: at,
                            record_len: h.record_len(),
                            raw_len: h.raw_len,
                        };
                        if let Some(old) = state.index.insert(h.key.clone(), loc) {
                            state.used_bytes -= old.record_len;
                            if let Some(s) = state.segments.get_mut(&old.segment) {
                                s.keys.remove(&h.key);
                            }
                        }
                        state.used_bytes += loc.record_len;
                        keys.insert(h.key);
                        at += loc.record_len;
                    }
                    result => {
                        let why = result.err().map_or_else(
                            || "record runs past the end".to_string(),
                            |e| e.to_string(),
                        );
                        if Some(id) == last {
                            tracing::warn!(
                                segment = id,
                                offset = at,
                                dropped = file_len - at,
                                "L2: truncating torn tail ({why})"
                            );
                            file.truncate(at)?;
                        } else {
                            tracing::error!(segment = id, offset = at, "L2: unreadable record in a sealed segment, ignoring the rest of it ({why})");
                            counters.corrupt_records.fetch_add(1, Relaxed);
                        }
                        break;
                    }
                }
            }
            state.segments.insert(
                id,
                SegmentState {
                    file,
                    keys,
                    last_access: 0,
                },
            );
        }
        state.next_id = last.map_or(0, |l| l + 1);
        state.active = last;
        let store = DiskStore {
            storage,
            config,
            sealer: Sealer::default(),
            state: Mutex::new(state),
            writer: Mutex::new(()),
            counters,
            last_checkpoint: Mutex::new(Instant::now()),
        };
        let stats = store.stats();
        tracing::info!(
            records = stats.records,
            segments = stats.segments,
            bytes = stats.used_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "L2 opened"
        );
        Ok(store)
    }

    /// Seal the records `write` encodes, open sealed ones on `read` (`--encryption-key-file`).
    pub fn sealed_with(mut self, sealer: Sealer) -> Self {
        self.sealer = sealer;
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
            file.sync()?;
            self.state.lock().last_sync = Instant::now();
        }
        let mut st = self.state.lock();
        st.tick += 1;
        let tick = st.tick;
        let seg = st.segments.get_mut(&id).expect("active segment");
        seg.keys.insert(key.clone());
        seg.last_access = tick;
        st.index.insert(
            key.clone(),
            Location {
                segment: id,
                offset,
                record_len,
                raw_len,
            },
        );
        st.used_bytes += record_len;
        st.dirty = true;
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

    /// Reclaim least recently used sealed segments until `need` more bytes fit the budget.
    /// Caller holds `writer`; segment reads, appends and deletes run outside `state`.
    fn make_room(&self, need: u64) -> Result<(), DiskError> {
        let capacity = self.config.capacity_bytes;
        let full = |st: &State<S::File>| st.used_bytes + need > capacity;
        // Candidates: the sealed segments of now, least recently used first. Segments created
        // while moving pinned records forward are never candidates of this round.
        let mut candidates = {
            let st = self.state.lock();
            if !full(&st) {
                return Ok(());
            }
            let mut c: Vec<(u64, u32)> = st
                .segments
                .iter()
                .filter(|(id, _)| Some(**id) != st.active)
                .map(|(id, s)| (s.last_access, *id))
                .collect();
            c.sort_unstable();
            c.into_iter().map(|(_, id)| id)
        };
        loop {
            let (victim, file, pinned) = {
                let st = self.state.lock();
                if !full(&st) {
                    return Ok(());
                }
                let Some((victim, seg)) = candidates
                    .by_ref()
                    .find_map(|id| st.segments.get(&id).map(|s| (id, s)))
                else {
                    return Err(DiskError::Full {
                        need,
                        capacity,
                        free: capacity.saturating_sub(st.used_bytes),
                    });
                };
                let pinned: Vec<ObjectKey> = seg
                    .keys
                    .iter()
                    .filter(|k| st.pins.contains_key(*k))
                    .cloned()
                    .collect();
                if pinned.len() == seg.keys.len() {
                    continue; // nothing to gain
                }
                (victim, seg.file.clone(), pinned)
            };
            // Pinned records move forward first; if that fails the segment stays as it is.
            for key in &pinned {
                let Some(loc) = self.state.lock().index.get(key).copied() else {
                    continue;
                };
                let bytes = file.read(loc.offset, loc.record_len)?;
                let (id, active) = self.active_segment(loc.record_len)?;
                let offset = active.append(&[&bytes])?;
                let mut st = self.state.lock();
                if st.index.contains_key(key) {
                    let seg = st.segments.get_mut(&id).expect("active");
                    seg.keys.insert(key.clone());
                    st.index.insert(
                        key.clone(),
                        Location {
                            segment: id,
                            offset,
                            ..loc
                        },
                    );
                }
            }
            let dropped = {
                let mut st = self.state.lock();
                let seg = &st.segments[&victim];
                // Pinned since the move above (a window froze meanwhile): keep the segment.
                if seg.keys.iter().any(|k| {
                    st.pins.contains_key(k) && st.index.get(k).is_some_and(|l| l.segment == victim)
                }) {
                    continue;
                }
                let seg = st.segments.remove(&victim).expect("victim exists");
                let mut dropped = 0;
                for key in &seg.keys {
                    if st.index.get(key).is_some_and(|l| l.segment == victim) {
                        let loc = st.index.remove(key).expect("indexed");
                        st.used_bytes -= loc.record_len;
                        dropped += 1;
                    }
                }
                st.dirty = true;
                dropped
            };
            let moved = pinned.len();
            let unpinned = dropped;
            // A moved record keeps its byte count: the copy replaces the one deleted here.
            let active = {
                let st = self.state.lock();
                st.active.map(|id| st.segments[&id].file.clone())
            };
            if let Some(active) = active {
                active.sync()?;
            }
            self.storage.remove(victim)?;
            self.counters.reclaimed_segments.fetch_add(1, Relaxed);
            self.counters
                .reclaimed_records
                .fetch_add(unpinned as u64, Relaxed);
            tracing::debug!(
                segment = victim,
                dropped = unpinned,
                moved,
                "L2: reclaimed segment"
            );
        }
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
        let mut st = self.state.lock();
        if let Some(loc) = st.index.remove(key) {
            st.used_bytes -= loc.record_len;
            if let Some(seg) = st.segments.get_mut(&loc.segment) {
                seg.keys.remove(key);
            }
            st.dirty = true;
        }
    }

    /// Protect `key` from reclaim (reference counted).
    pub fn pin(&self, key: &ObjectKey) -> bool {
        let mut st = self.state.lock();
        if !st.index.contains_key(key) {
            return false;
        }
        *st.pins.entry(key.clone()).or_default() += 1;
        true
    }

    pub fn unpin(&self, key: &ObjectKey) {
        let mut st = self.state.lock();
        if let Some(n) = st.pins.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                st.pins.remove(key);
            }
        }
    }

    /// fsync the active segment.
    pub fn sync(&self) -> Result<(), DiskError> {
        let file = {
            let mut st = self.state.lock();
            st.last_sync = Instant::now();
            st.active
                .and_then(|id| st.segments.get(&id))
                .map(|s| s.file.clone())
        };
        if let Some(f) = file {
            f.sync()?;
        }
        Ok(())
    }

    /// Sync, then persist the index so the next open needs to scan only what comes after.
    pub fn checkpoint(&self) -> Result<(), DiskError> {
        self.sync()?;
        let bytes = {
            // No append may sit between its bytes and its index entry while segment lengths
            // and the index are captured together.
            let _writer = self.writer.lock();
            let mut st = self.state.lock();
            if !st.dirty {
                return Ok(());
            }
            st.dirty = false;
            let scanned: HashMap<u32, u64> = st
                .segments
                .iter()
                .map(|(id, s)| (*id, s.file.len()))
                .collect();
            checkpoint::encode(&st.index, &scanned)
        };
        self.storage.write_checkpoint(&bytes)?;
        Ok(())
    }

    /// Whether a sync is due under the interval policy.
    pub fn sync_due(&self) -> bool {
        match self.config.fsync {
            FsyncPolicy::Interval(d) => self.state.lock().last_sync.elapsed() >= d,
            _ => false,
        }
    }

    pub fn stats(&self) -> DiskStats {
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

impl<S: Storage> DiskStore<S> {
    /// Drop every record no pin protects: from the index at once, and sealed segments left
    /// with no record are deleted. Returns the number of records dropped.
    pub fn clear(&self) -> Result<usize, DiskError> {
        let _writer = self.writer.lock();
        let mut st = self.state.lock();
        let State {
            index,
            pins,
            segments,
            active,
            used_bytes,
            dirty,
            ..
        } = &mut *st;
        let victims: Vec<ObjectKey> = index
            .keys()
            .filter(|k| !pins.contains_key(*k))
            .cloned()
            .collect();
        for key in &victims {
            if let Some(loc) = index.remove(key) {
                *used_bytes -= loc.record_len;
                if let Some(seg) = segments.get_mut(&loc.segment) {
                    seg.keys.remove(key);
                }
            }
        }
        let empty: Vec<u32> = segments
            .iter()
            .filter(|(id, s)| s.keys.is_empty() && Some(**id) != *active)
            .map(|(id, _)| *id)
            .collect();
        for id in &empty {
            segments.remove(id);
        }
        *dirty |= !victims.is_empty();
        drop(st);
        for id in empty {
            self.storage.remove(id)?;
        }
        Ok(victims.len())
    }
}

impl<S: Storage> Tier for DiskStore<S> {
    fn name(&self) -> &'static str {
        "L2"
    }

    fn contains(&self, keys: &[ObjectKey]) -> Vec<bool> {
        let st = self.state.lock();
        keys.iter().map(|k| st.index.contains_key(k)).collect()
    }

    fn info(&self, key: &ObjectKey) -> Option<RecordInfo> {
        self.state.lock().index.get(key).map(|l| RecordInfo {
            raw_len: l.raw_len,
            record_len: l.record_len,
        })
    }

    fn read_into(&self, key: &ObjectKey, object: &mut WriteGuard) -> Result<(), TierError> {
        // Decoded into private memory, then copied in: no reference may cover pool pages.
        let mut raw = vec![0; object.len()];
        let itemsize = self
            .read(key, &mut raw)
            .map_err(|e| TierError::new("L2", e))?;
        object.copy_from_slice(&raw);
        object.set_itemsize(itemsize);
        Ok(())
    }

    fn record(&self, key: &ObjectKey) -> Result<Vec<u8>, TierError> {
        self.read_record(key).map_err(|e| TierError::new("L2", e))
    }

    fn put(&self, key: &ObjectKey, record: &[u8]) -> Result<(), TierError> {
        self.append_record(key, record)
            .map_err(|e| TierError::new("L2", e))
    }

    fn pin(&self, key: &ObjectKey) -> bool {
        DiskStore::pin(self, key)
    }

    fn unpin(&self, key: &ObjectKey) {
        DiskStore::unpin(self, key)
    }

    fn sync(&self) -> Result<(), TierError> {
        DiskStore::sync(self).map_err(|e| TierError::new("L2", e))
    }

    fn clear(&self) -> Result<usize, TierError> {
        DiskStore::clear(self).map_err(|e| TierError::new("L2", e))
    }

    fn stats(&self) -> TierStats {
        let s = DiskStore::stats(self);
        let c = &self.counters;
        TierStats {
            records: s.records,
            segments: s.segments,
            used_bytes: s.used_bytes,
            capacity_bytes: s.capacity_bytes,
            pinned_records: s.pinned,
            read_records: c.read_records.load(Relaxed),
            read_bytes: c.read_bytes.load(Relaxed),
            written_records: c.written_records.load(Relaxed),
            written_raw_bytes: c.written_raw_bytes.load(Relaxed),
            written_stored_bytes: c.written_stored_bytes.load(Relaxed),
            corrupt_records: c.corrupt_records.load(Relaxed),
            reclaimed_segments: c.reclaimed_segments.load(Relaxed),
            reclaimed_records: c.reclaimed_records.load(Relaxed),
            write_errors: c.write_errors.load(Relaxed),
        }
    }

    /// fsync when the interval policy says so; persist the index every 30 s.
    fn maintain(&self) {
        if self.sync_due() {
            if let Err(e) = DiskStore::sync(self) {
                tracing::error!("L2 fsync failed: {e}");
            }
        }
        let mut last = self.last_checkpoint.lock();
        if last.elapsed() >= CHECKPOINT_EVERY {
            *last = Instant::now();
            if let Err(e) = self.checkpoint() {
                tracing::error!("L2 checkpoint failed: {e}");
            }
        }
    }

    fn close(&self) -> Result<(), TierError> {
        self.checkpoint().map_err(|e| TierError::new("L2", e))
    }
}

#[cfg(test)]
mod tests;
