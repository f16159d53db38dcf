//! L2 as a `Tier` behind L1 (`store::tier`): the contract in terms of the store's own
//! operations.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use connector_protocol::ObjectKey;
use rayon::prelude::*;

use super::checkpoint::CHECKPOINT_EVERY;
use super::storage::Storage;
use super::{DiskError, DiskStore};
use crate::store::quota::OverQuota;
use crate::store::tier::{
    Fetched, Figure, Presence, RecordInfo, Reserve, Tier, TierError, TierStats,
};
use crate::store::Reservation;

impl<S: Storage> DiskStore<S> {
    /// Read and verify `key` into an L1 object from `reserve`.
    fn fetch_one(&self, key: &ObjectKey, reserve: Reserve) -> Fetched {
        let Some(raw_len) = self.raw_len(key) else {
            return Fetched::Missing;
        };
        let mut object = match reserve(key, raw_len) {
            Reservation::Reserved(object) => object,
            Reservation::Present => return Fetched::Resident,
            Reservation::NoSpace => return Fetched::NoSpace,
        };
        // Decoded into private memory, then copied in: no reference may cover pool pages.
        let mut raw = vec![0; object.len()];
        match self.read(key, &mut raw) {
            Ok(itemsize) => {
                object.copy_from_slice(&raw);
                object.set_itemsize(itemsize);
                Fetched::Read(object)
            }
            Err(e) => Fetched::Failed(TierError::new("L2", e)),
        }
    }
}

impl<S: Storage> Tier for DiskStore<S> {
    fn name(&self) -> &'static str {
        "L2"
    }

    fn may_contain(&self, keys: &[ObjectKey]) -> Vec<Presence> {
        let st = self.state.lock();
        keys.iter()
            .map(|k| match st.index.get(k) {
                Some(l) => Presence::Held(RecordInfo {
                    raw_len: l.raw_len,
                    record_len: l.record_len,
                }),
                None => Presence::Absent,
            })
            .collect()
    }

    fn fetch(&self, keys: &[ObjectKey], reserve: Reserve) -> Vec<Fetched> {
        keys.par_iter()
            .map(|k| self.fetch_one(k, reserve))
            .collect()
    }

    fn record(&self, key: &ObjectKey) -> Result<Vec<u8>, TierError> {
        self.read_record(key).map_err(|e| TierError::new("L2", e))
    }

    fn put(&self, records: &[(&ObjectKey, &[u8])]) -> Vec<Result<(), TierError>> {
        records
            .iter()
            .map(|(key, record)| {
                self.append_record(key, record).map_err(|e| match e {
                    DiskError::OverQuota(refused) => TierError::new("L2", refused),
                    e => TierError::new("L2", e),
                })
            })
            .collect()
    }

    fn salt_usage(&self) -> Vec<(Arc<str>, u64)> {
        DiskStore::salt_usage(self)
    }

    fn admit_window(&self, salt: &str, records: &[(ObjectKey, u64)]) -> Result<(), OverQuota> {
        self.admit_pins(salt, records)
    }

    fn pin(&self, key: &ObjectKey) -> bool {
        DiskStore::pin(self, key)
    }

    fn unpin(&self, key: &ObjectKey) {
        DiskStore::unpin(self, key)
    }

    fn sync(&self) -> Result<(), TierError> {
        self.sync_active().map_err(|e| TierError::new("L2", e))
    }

    fn clear(&self) -> Result<usize, TierError> {
        self.clear_unpinned().map_err(|e| TierError::new("L2", e))
    }

    fn stats(&self) -> TierStats {
        let s = self.occupancy();
        let c = &self.counters;
        TierStats {
            name: self.name().into(),
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
            link: None,
            figures: vec![
                Figure::counter(
                    "stored_bytes_total",
                    "Payload bytes written to L2 after compression",
                    c.written_stored_bytes.load(Relaxed),
                ),
                Figure::counter(
                    "corrupt_records_total",
                    "L2 records that failed verification and were dropped",
                    c.corrupt_records.load(Relaxed),
                ),
                Figure::counter(
                    "write_errors_total",
                    "L2 append failures",
                    c.write_errors.load(Relaxed),
                ),
                Figure::gauge("segments", "L2 segment files", s.segments as u64),
                Figure::gauge(
                    "pinned_records",
                    "L2 records pinned by windows",
                    s.pinned as u64,
                ),
                Figure::counter(
                    "quota_dropped_records_total",
                    "L2 records dropped to keep their cache_salt within its L2 quota",
                    c.quota_dropped_records.load(Relaxed),
                ),
                Figure::counter(
                    "quota_refused_total",
                    "L2 writes refused: the cache_salt was at its L2 quota with too little of \
                     its own to drop",
                    c.quota_refused.load(Relaxed),
                ),
                Figure::counter(
                    "reclaimed_segments_total",
                    "L2 segments reclaimed",
                    c.reclaimed_segments.load(Relaxed),
                ),
            ],
        }
    }

    /// fsync when the interval policy says so; persist the index every 30 s.
    fn maintain(&self) {
        if self.sync_due() {
            if let Err(e) = self.sync_active() {
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
