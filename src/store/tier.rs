//! The tier trait: a store behind L1 that keeps records (`store::record`) under `ObjectKey`s.
//!
//! How a tier plugs in: a file implementing `Tier` (disk: `store::disk`), plus one line in
//! `Tiers::open` that builds it from its config and appends it behind L1. From then on the
//! facade (`store::tiered::Tiers`) drives it like every other tier: lookups ask `contains`,
//! prefetch reads hits into reserved L1 objects with `read_into`, write-behind hands it every
//! committed object as one encoded record (`put`), windows pin what they name, `clear` drops
//! what no window pins, and `stats` feeds `/metrics`.

use connector_protocol::ObjectKey;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::WriteGuard;

#[derive(Debug, Error)]
#[error("{tier}: {source}")]
pub struct TierError {
    pub tier: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl TierError {
    pub fn new(tier: &'static str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        TierError {
            tier,
            source: Box::new(source),
        }
    }

    /// Whether the tier failed for lack of room on its device (`ENOSPC`, `EDQUOT` anywhere in
    /// the cause chain): the same write may succeed once space returns, so write-behind holds
    /// it and retries rather than giving it up.
    pub fn out_of_space(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*self.source);
        while let Some(e) = cause {
            if e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                )
            }) {
                return true;
            }
            cause = e.source();
        }
        false
    }
}

/// What a tier knows of one stored record without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordInfo {
    /// Bytes of the object once decoded.
    pub raw_len: u64,
    /// Bytes the record takes in the tier (header and payload).
    pub record_len: u64,
}

/// A tier's occupancy and traffic, for `/metrics` and the status tools. Counters a tier has
/// no notion of stay 0 (a tier without segments reports none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
// The name in the JSON schema of `/status` and the MCP `cache_stats` output (field names are
// what clients read; the definition name is kept so published schemas stay the same).
#[serde(rename = "L2Stats")]
pub struct TierStats {
    pub records: usize,
    pub segments: usize,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub pinned_records: usize,
    pub read_records: u64,
    pub read_bytes: u64,
    pub written_records: u64,
    pub written_raw_bytes: u64,
    pub written_stored_bytes: u64,
    pub corrupt_records: u64,
    pub reclaimed_segments: u64,
    pub reclaimed_records: u64,
    pub write_errors: u64,
}

/// A store behind L1.
pub trait Tier: Send + Sync {
    /// Short name for logs, errors and metrics ("L2").
    fn name(&self) -> &'static str;

    /// Which of `keys` this tier holds, in order. Answered from memory: it never waits on
    /// I/O, because lookups call it on the request path.
    fn contains(&self, keys: &[ObjectKey]) -> Vec<bool>;

    /// Sizes of the record of `key`, if held (from memory, like `contains`).
    fn info(&self, key: &ObjectKey) -> Option<RecordInfo>;

    /// Read, verify and decode `key` into `object` (exactly its raw length), and give the
    /// object the record's itemsize. A record that fails verification is never decoded into it.
    fn read_into(&self, key: &ObjectKey, object: &mut WriteGuard) -> Result<(), TierError>;

    /// The stored record of `key`, verbatim (verified).
    fn record(&self, key: &ObjectKey) -> Result<Vec<u8>, TierError>;

    /// Keep `record`, the encoding of `key`'s object (a no-op if the key is held). A put that
    /// fails for lack of space (`TierError::out_of_space`) may be repeated later: write-behind
    /// retries it.
    fn put(&self, key: &ObjectKey, record: &[u8]) -> Result<(), TierError>;

    /// Protect `key` from eviction and `clear` (reference counted); false if not held.
    fn pin(&self, key: &ObjectKey) -> bool;

    fn unpin(&self, key: &ObjectKey);

    /// Make everything `put` so far durable.
    fn sync(&self) -> Result<(), TierError>;

    /// Drop every record no pin protects; returns how many.
    fn clear(&self) -> Result<usize, TierError>;

    fn stats(&self) -> TierStats;

    /// Periodic housekeeping, called by the write-behind worker between batches.
    fn maintain(&self) {}

    /// Persist what a restart needs (called once at shutdown, after the last `put`).
    fn close(&self) -> Result<(), TierError> {
        self.sync()
    }
}
