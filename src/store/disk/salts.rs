//! What each salt holds in L2: its bytes, the bytes windows pin, and its unpinned records least
//! recently used first, so a salt over its L2 quota drops its own least recently used records
//! and nobody else's. Kept beside the index by `State`'s insert and remove (so it is rebuilt
//! with the index at open), by the pins and by reads.
//!
//! Recency costs no clock of its own: a record's place is where it was appended (segment ids
//! and offsets only grow), and a read moves it just after the newest append so far, behind
//! every earlier read of it (`Recency`). Reads are remembered in memory only: after a restart
//! the order is the append order again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use connector_protocol::ObjectKey;

use super::Location;
use crate::store::quota;

/// A record's place in its salt's eviction order: appended at (segment, offset, 0), or read
/// last when the newest append was at (segment, offset), as the `n`th read since: (.., n).
type Recency = (u32, u64, u64);

#[derive(Debug, Default)]
pub(super) struct SaltLedger {
    salts: HashMap<Arc<str>, SaltRecords>,
    /// The newest append, and the reads since it: the place a read moves a record to.
    clock: Recency,
    /// Records read since they were appended, by where they were appended: their place now.
    read: HashMap<(u32, u64), Recency>,
}

#[derive(Debug, Default)]
struct SaltRecords {
    bytes: u64,
    pinned_bytes: u64,
    /// Unpinned records by `Recency`: least recently used first.
    evictable: BTreeMap<Recency, (ObjectKey, u64)>,
}

impl SaltLedger {
    /// `key`'s record at `loc` joined the index.
    pub(super) fn added(&mut self, key: &ObjectKey, loc: &Location, pinned: bool) {
        let appended = (loc.segment, loc.offset, 0);
        self.clock = self.clock.max(appended);
        let s = self.salts.entry(key.cache_salt.clone()).or_default();
        s.bytes += loc.record_len;
        if pinned {
            s.pinned_bytes += loc.record_len;
        } else {
            s.evictable.insert(appended, (key.clone(), loc.record_len));
        }
    }

    /// `key`'s record at `loc` was read: its salt's most recently used now.
    pub(super) fn used(&mut self, key: &ObjectKey, loc: &Location, pinned: bool) {
        let Some(s) = self.salts.get_mut(&key.cache_salt).filter(|_| !pinned) else {
            return;
        };
        let at = (loc.segment, loc.offset);
        let place = self.read.get(&at).copied().unwrap_or((at.0, at.1, 0));
        let Some(entry) = s.evictable.remove(&place) else {
            return;
        };
        self.clock.2 += 1;
        s.evictable.insert(self.clock, entry);
        self.read.insert(at, self.clock);
    }

    /// `key`'s record at `loc` left the index.
    pub(super) fn removed(&mut self, key: &ObjectKey, loc: &Location, pinned: bool) {
        let Some(s) = self.salts.get_mut(&key.cache_salt) else {
            return;
        };
        s.bytes -= loc.record_len;
        let at = (loc.segment, loc.offset);
        let place = self.read.remove(&at).unwrap_or((at.0, at.1, 0));
        if pinned {
            s.pinned_bytes -= loc.record_len;
        } else {
            s.evictable.remove(&place);
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

    /// The least recently used unpinned records of `salt` whose removal brings its bytes to
    /// `target` or below; `None` if all of them together do not.
    pub(super) fn least_recent_down_to(&self, salt: &str, target: u64) -> Option<Vec<ObjectKey>> {
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
