//! What the sidecar reports about itself: the cache's counters and tiers (`/status`,
//! `/metrics`, the MCP `cache_stats` tool) and its health. Plain data, serializable, built from
//! `ops` and `store`; the transports and `metrics` render it, `windows` adds its own counts.

use std::sync::atomic::Ordering::Relaxed;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ops::Cwm;
use crate::tenant::{self, TierUsage};

pub use crate::store::seal::SealStats;
pub use crate::store::tier::TierStats;
pub use crate::store::tiered::{L1Stats, WriteBehindStats};

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
    /// Every configured tier behind L1, in order, by name ("L2": the disk; "L3": Redis, with
    /// its link), each with the figures of its own.
    pub tiers: Vec<TierStats>,
    pub write_behind: WriteBehindStats,
    /// Encryption at rest (`--encryption-key-file`): records sealed, opened, and refused.
    #[serde(default)]
    pub encryption: SealStats,
    /// Who uses each tier (L1 first): the largest cache_salts and the rest together.
    #[serde(default)]
    pub tenants: Vec<TierUsage>,
}

impl CacheStats {
    /// The figures of the tier named `name` ("L2"), if configured.
    pub fn tier(&self, name: &str) -> Option<&TierStats> {
        self.tiers.iter().find(|t| t.name == name)
    }
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
    /// Engine-driven workers registered (or restored with their pool).
    #[serde(default)]
    pub engine_driven_contexts: usize,
    /// Bytes of the L1 pool still leased to engines by a previous cwm (`store::leases`).
    #[serde(default)]
    pub l1_quarantined_bytes: u64,
    /// Session auto-save: its default, the sessions with their own setting, what it did.
    #[serde(default)]
    pub auto_save: AutoSaveStats,
}

/// What session auto-save did since the start (no per-session figures: bounded).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct AutoSaveStats {
    /// `--auto-save-idle-secs`: idle seconds before a session without its own setting is
    /// saved; 0: off for those.
    pub default_idle_secs: u64,
    /// Sessions turned on by `session_autosave`.
    pub sessions_on: usize,
    /// Sessions turned off by `session_autosave`.
    pub sessions_off: usize,
    /// Auto-saves written (each a window created or replaced).
    pub saves: u64,
    /// Sessions due a save with none of their newest chain cached any more (nothing saved).
    pub skipped: u64,
    /// Auto-saves that failed (the name held by another window, I/O, L3), tried again after
    /// 30 s or new chunks.
    pub failures: u64,
    /// The last failure, with its session.
    pub last_failure: Option<String>,
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
        tiers: t.lower,
        write_behind: t.write_behind,
        encryption: cwm.tiers.sealer().stats(),
        tenants: tenant::usage(&cwm.tiers),
    }
}
