//! Reclaim: segment-level LRU within the byte budget (pinned records are copied forward into
//! the active segment before their old segment is deleted), and `clear`, which drops every
//! record no pin protects.

use std::sync::atomic::Ordering::Relaxed;

use connector_protocol::ObjectKey;

use super::storage::{SegmentFile, Storage};
use super::{DiskError, DiskStore, Location, State};
use crate::store::quota::{self, QuotaTier};

impl<S: Storage> DiskStore<S> {
    /// Reclaim least recently used sealed segments until `need` more bytes fit the budget.
    /// Caller holds `writer`; segment reads, appends and deletes run outside `state`.
    pub(super) fn make_room(&self, need: u64) -> Result<(), DiskError> {
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
                    st.insert(
                        key,
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
                        st.remove(key);
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
}

impl<S: Storage> DiskStore<S> {
    /// Drop every record no pin protects (sealed segments left with no record are deleted).
    /// Returns the number of records dropped.
    pub fn clear_unpinned(&self) -> Result<usize, DiskError> {
        let _writer = self.writer.lock();
        let victims: Vec<ObjectKey> = {
            let st = self.state.lock();
            st.index
                .keys()
                .filter(|k| !st.pins.contains_key(*k))
                .cloned()
                .collect()
        };
        self.drop_records(&victims)
    }

    /// Make room for `need` more bytes of `salt` within its L2 quota by dropping its own least
    /// recently used unpinned records, never another salt's; refused (`OverQuota`, counted) with nothing
    /// dropped when they are not enough. Caller holds `writer`.
    pub(super) fn make_salt_room(&self, salt: &str, need: u64) -> Result<(), DiskError> {
        let Some(limit) = self.quotas.limit(QuotaTier::L2, salt) else {
            return Ok(());
        };
        let victims = {
            let st = self.state.lock();
            let (bytes, pinned) = st.salts.usage(salt);
            if bytes + need <= limit {
                return Ok(());
            }
            // Only its unpinned records may go: what is pinned must leave room.
            quota::fit(QuotaTier::L2, salt, limit, pinned, need)
                .inspect_err(|_| _ = self.counters.quota_refused.fetch_add(1, Relaxed))?;
            st.salts
                .least_recent_down_to(salt, limit - need)
                .expect("the unpinned records make room for what fits beside the pinned")
        };
        let dropped = self.drop_records(&victims)?;
        self.counters
            .quota_dropped_records
            .fetch_add(dropped as u64, Relaxed);
        Ok(())
    }

    /// Drop `keys` from the index; sealed segments left with no record are deleted. Returns
    /// the number of records dropped. Caller holds `writer`.
    fn drop_records(&self, keys: &[ObjectKey]) -> Result<usize, DiskError> {
        let (dropped, empty) = {
            let mut st = self.state.lock();
            let dropped = keys.iter().filter(|k| st.remove(k).is_some()).count();
            let active = st.active;
            let empty: Vec<u32> = st
                .segments
                .iter()
                .filter(|(id, s)| s.keys.is_empty() && Some(**id) != active)
                .map(|(id, _)| *id)
                .collect();
            for id in &empty {
                st.segments.remove(id);
            }
            (dropped, empty)
        };
        for id in empty {
            self.storage.remove(id)?;
        }
        Ok(dropped)
    }
}
