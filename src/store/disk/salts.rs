//! What each salt holds in L2: its bytes, the bytes windows pin, and its unpinned records
//! oldest first (where they were appended), so a salt over its L2 quota drops its own oldest
//! records and nobody else's. Kept beside the index by `State`'s insert and remove (so it is
//! rebuilt with the index at open) and by the pins.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use connector_protocol::ObjectKey;

use super::Location;
use crate::store::quota;

#[derive(Debug, Default)]
pub(super) struct SaltLedger {
    salts: HashMap<Arc<str>, SaltRecords>,
}

#[derive(Debug, Default)]
struct SaltRecords {
    bytes: u64,
    pinned_bytes: u64,
    /// Unpinned records by where they were appended (segment ids grow): oldest first.
    evictable: BTreeMap<(u32, u64), (ObjectKey, u64)>,
}

impl SaltLedger {
    /// `key`'s record at `loc` joined the index.
    pub(super) fn added(&mut self, key: &ObjectKey, loc: &Location, pinned: bool) {
        let s = self.salts.entry(key.cache_salt.clone()).or_default();
        s.bytes += loc.record_len;
        if pinned {
            s.pinned_bytes += loc.record_len;
        } else {
            s.evictable
                .insert((loc.segment, loc.offset), (key.clone(), loc.record_len));
        }
    }

    /// `key`'s record at `loc` left the index.
    pub(super) fn removed(&mut self, key: &ObjectKey, loc: &Location, pinned: bool) {
        let Some(s) = self.salts.get_mut(&key.cache_salt) else {
            return;
        };
        s.bytes -= loc.record_len;
        if pinned {
            s.pinned_bytes -= loc.record_len;
        } else {
            s.evictable.remove(&(loc.segment, loc.offset));
        }
        if s.bytes == 0 {
            self.salts.remove(&key.cache_salt);
        }
    }

    /// A window pinned `key` (its first pin), or released it (its last).
    pub(super) fn pinned(&mut self, key: &ObjectKey, loc: &Location, pinned: bool) {
        self.removed(key, loc, !pinned);
        self.added(key, loc, pinned);
    }

    /// `salt`'s bytes, and those of them windows pin.
    pub(super) fn usage(&self, salt: &str) -> (u64, u64) {
        self.salts
            .get(salt)
            .map_or((0, 0), |s| (s.bytes, s.pinned_bytes))
    }

    /// Every salt's bytes, largest first.
    pub(super) fn largest_first(&self) -> Vec<(Arc<str>, u64)> {
        quota::largest_first(self.salts.iter().map(|(s, r)| (s, &r.bytes)))
    }

    /// The oldest unpinned records of `salt` whose removal brings its bytes to `target` or
    /// below; `None` if all of them together do not.
    pub(super) fn oldest_down_to(&self, salt: &str, target: u64) -> Option<Vec<ObjectKey>> {
        let Some(s) = self.salts.get(salt) else {
            return Some(Vec::new());
        };
        let mut bytes = s.bytes;
        let mut out = Vec::new();
        for (key, len) in s.evictable.values() {
            if bytes <= target {
                break;
            }
            bytes -= len;
            out.push(key.clone());
        }
        (bytes <= target).then_some(out)
    }
}
