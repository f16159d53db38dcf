//! What the sidecar reports about itself: the cache's counters and tiers (`/status`,
//! `/metrics`, the MCP `cache_stats` tool) and its health. Plain data, serializable, built from
//! `ops` and `store`; the transports and `metrics` render it, `windows` adds its own counts.

use std::sync::atomic::Ordering::Relaxed;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ops::Cwm;

/// L1's figures (the store's own report, serialized as is).
pub type L1Stats = crate::store::tiered::L1Report;
/// The disk tier's figures.
pub type L2Stats = crate::store::tier::TierStats;
pub use crate::store::l3::L3Stats;
pub use crate::store::seal::SealStats;
pub use crate::store::tiered::WriteBehindStats;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CacheStats {
    pub lookup_chunks: u64,
    pub lookup_hit_chunks: u64,
    pub lookup_miss_chunks: u64,
    pub hit_rate: f64,
    pub stored_objects: u64,
    pub stored_bytes: u64,
    pub retrieved_objects: u64,
    pub retrieved_bytes: u64,
    pub retrieve_misses: u64,
    pub l1: L1Stats,
    pub l2: Option<L2Stats>,
    pub write_behind: WriteBehindStats,
    /// The Redis tier: its link (up/down, incidents), reads, writes, corrupt values.
    pub l3: Option<L3Stats>,
    /// Encryption at rest (`--encryption-key-file`): records sealed, opened, and refused.
    #[serde(default)]
    pub encryption: SealStats,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub uptime_secs: u64,
    pub chunk_size: usize,
    pub l2_enabled: bool,
    pub windows: usize,
    pub sessions: usize,
    pub registered_instances: usize,
}

/// The counters and every tier's figures, now.
pub fn cache_stats(cwm: &Cwm) -> CacheStats {
    let c = &cwm.counters;
    let t = cwm.tiers.stats();
    let lookups = c.lookup_chunks.load(Relaxed);
    let hits = c.lookup_hit_chunks.load(Relaxed);
    CacheStats {
        lookup_chunks: lookups,
        lookup_hit_chunks: hits,
        lookup_miss_chunks: lookups.saturating_sub(hits),
        hit_rate: if lookups > 0 {
            hits as f64 / lookups as f64
        } else {
            0.0
        },
        stored_objects: c.stored_objects.load(Relaxed),
        stored_bytes: c.stored_bytes.load(Relaxed),
        retrieved_objects: c.retrieved_objects.load(Relaxed),
        retrieved_bytes: c.retrieved_bytes.load(Relaxed),
        retrieve_misses: c.retrieve_misses.load(Relaxed),
        l1: t.l1,
        l2: t
            .lower
            .into_iter()
            .find(|(name, _)| *name == "L2")
            .map(|(_, s)| s),
        write_behind: t.write_behind,
        l3: cwm.tiers.l3().map(|l3| l3.stats()),
        encryption: cwm.tiers.sealer().stats(),
    }
}
