//! What the tiers report: L1's occupancy and traffic, each tier behind it by name
//! (`Tier::stats`), and write-behind's counters.

use std::sync::atomic::Ordering::Relaxed;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Tiers;
use crate::store::l1::L1Counters;
use crate::store::tier::TierStats;

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
    /// Times write-behind waited for the engines to be quiet (no op for
    /// `background::QUIET`) before reading an object or writing a batch, and the total wait.
    pub yields: u64,
    pub yielded_ms: u64,
    /// Times it wrote anyway because an object had waited its longest (2 s) for busy engines.
    pub deferred_max: u64,
}

/// L1's occupancy (`L1Occupancy`, what its index holds now) and traffic (`L1Counters`), as
/// `/status`, `/metrics` and `cache_stats` report them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct L1Stats {
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
    pub l1: L1Stats,
    /// The tiers behind L1, in order (each named).
    pub lower: Vec<TierStats>,
    pub write_behind: WriteBehindStats,
}

impl Tiers {
    pub fn stats(&self) -> TiersStats {
        let s = self.l1.occupancy();
        let c: &L1Counters = &self.l1.counters;
        TiersStats {
            l1: L1Stats {
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
            lower: self.lower.iter().map(|t| t.stats()).collect(),
            write_behind: self.write_behind.stats(),
        }
    }
}
