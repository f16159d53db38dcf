//! The tier contract: a store behind L1 that keeps records (`store::record`) under
//! `ObjectKey`s. The disk (`store::disk`) and Redis (`store::l3`) both implement all of it.
//!
//! How a tier plugs in: a file implementing `Tier`, plus one line in `Tiers::open` that builds
//! it from its config and appends it behind L1. From then on the facade
//! (`store::tiered::Tiers`) drives it like every other tier:
//!
//! - lookups ask `may_contain`, answered from the tier's memory (an index) without I/O: held
//!   (with the record's sizes), absent, or unknown (a remote tier that keeps no index);
//! - prefetch jobs and thaws `probe` a whole prefix of the unknown keys at once (may wait on
//!   I/O), then `fetch` what was found in one batch: the tier reads and verifies each record
//!   (opening a sealed one with the tiers' `store::seal::Sealer`, given to it at open) into an
//!   L1 object it gets through the facade's `reserve` (the one door into L1) and hands it back
//!   unpublished; the facade commits it;
//! - write-behind (one queue for every tier behind L1) hands it batches of encoded records,
//!   sealed already when a key is configured (`put`); windows pin what they name, `clear`
//!   drops what no window pins, and `stats` (with the tier's own name and figures) feeds
//!   `/status` and `/metrics`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use connector_protocol::ObjectKey;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::quota::OverQuota;
use super::{Reservation, WriteGuard};

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

    /// Whether the tier refused the write to keep a salt within its quota there: given up for
    /// that tier (the tier counted it), not retried.
    pub fn over_quota(&self) -> bool {
        self.source.downcast_ref::<OverQuota>().is_some()
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

/// What a tier's memory says of one key, without I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Its index holds the record.
    Held(RecordInfo),
    /// Its index does not hold it.
    Absent,
    /// It keeps no index of its own (a remote store): only `probe` can tell.
    Unknown,
}

/// The one door into L1 a fetch may use: room for an object of `len` bytes, to be read under
/// `key` (the facade decides the key it is installed under).
pub type Reserve<'a> = &'a (dyn Fn(&ObjectKey, u64) -> Reservation + Sync);

/// What a fetch did with one key.
pub enum Fetched {
    /// Read and verified into the object `reserve` gave, with the record's itemsize; not yet
    /// visible: the facade commits it.
    Read(WriteGuard),
    /// L1 held the key already (`reserve` said so).
    Resident,
    /// The tier does not hold it.
    Missing,
    /// L1 had no room.
    NoSpace,
    /// Held but unreadable (fails verification, I/O, link): counted and logged by the tier.
    Failed(TierError),
}

/// A figure of a tier's own (Prometheus `cwm_<tier>_<name>`, e.g. `cwm_l2_segments`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Figure {
    pub name: String,
    pub value: u64,
    /// A level (gauge) rather than a running total (counter).
    #[serde(skip)]
    pub gauge: bool,
    #[serde(skip)]
    pub help: &'static str,
}

impl Figure {
    pub fn counter(name: &str, help: &'static str, value: u64) -> Figure {
        Figure {
            name: name.into(),
            value,
            gauge: false,
            help,
        }
    }

    pub fn gauge(name: &str, help: &'static str, value: u64) -> Figure {
        Figure {
            gauge: true,
            ..Figure::counter(name, help, value)
        }
    }
}

/// A remote tier's connection, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LinkStatus {
    /// `up`, `down`, or `connecting` before the first answer.
    pub state: String,
    /// The servers, passwords masked.
    pub endpoints: Vec<String>,
    /// Times the link went down.
    pub incidents: u64,
    #[serde(default)]
    pub down_for_secs: Option<f64>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// The server refused writes for lack of memory and has not accepted one since.
    pub full: bool,
}

/// A tier's occupancy and traffic, for `/status`, `/metrics` and the status tools. Counters a
/// tier has no notion of stay 0 (a tier without segments reports none).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TierStats {
    /// The tier's name ("L2", "L3").
    #[serde(default)]
    pub name: String,
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
    /// A remote tier's link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkStatus>,
    /// Figures of the tier's own, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub figures: Vec<Figure>,
}

impl TierStats {
    /// The value of the tier's own figure `name`.
    pub fn figure(&self, name: &str) -> Option<u64> {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value)
    }
}

/// A store behind L1.
pub trait Tier: Send + Sync {
    /// Short name for logs, errors, `/status` and metrics ("L2").
    fn name(&self) -> &'static str;

    /// What the tier's memory says of each of `keys`, in order. Never waits on I/O: lookups
    /// call it on the request path.
    fn may_contain(&self, keys: &[ObjectKey]) -> Vec<Presence>;

    /// Which of `keys` the tier holds, asking its store in one batch: may wait on I/O (prefetch
    /// jobs, thaws and window status only). A tier that cannot answer (a link down) says
    /// "not held".
    fn probe(&self, keys: &[ObjectKey]) -> Vec<bool> {
        self.may_contain(keys)
            .into_iter()
            .map(|p| matches!(p, Presence::Held(_)))
            .collect()
    }

    /// Read and verify the records of `keys` into L1 objects got from `reserve`, in one batch,
    /// and hand them back unpublished. A record that fails verification is never copied in.
    fn fetch(&self, keys: &[ObjectKey], reserve: Reserve) -> Vec<Fetched>;

    /// The stored record of `key`, verbatim (verified).
    fn record(&self, key: &ObjectKey) -> Result<Vec<u8>, TierError>;

    /// Keep each record, the encoding of its key's object (a no-op for a key held); one result
    /// per record, in order. A put that fails for lack of space (`TierError::out_of_space`) may
    /// be repeated later: write-behind retries it.
    fn put(&self, records: &[(&ObjectKey, &[u8])]) -> Vec<Result<(), TierError>>;

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

    /// The bytes each salt's records take in this tier, largest first, as far as the tier
    /// counts them (empty: it does not).
    fn salt_usage(&self) -> Vec<(Arc<str>, u64)> {
        Vec::new()
    }

    /// Whether a window of `salt` may keep `records` here within the salt's quota on this tier
    /// (each key with the bytes its record will take if the tier lacks it), on top of what the
    /// salt's windows keep already. Changes nothing.
    fn admit_window(&self, _salt: &str, _records: &[(ObjectKey, u64)]) -> Result<(), OverQuota> {
        Ok(())
    }

    /// The fleet-wide window catalog this tier keeps, if it is shared by several sidecars.
    fn window_catalog(self: Arc<Self>) -> Option<Arc<dyn WindowCatalog>> {
        None
    }
}

/// Window manifests shared by a fleet of sidecars, and the records they name, kept by a tier
/// (Redis: `store::l3::catalog`). The store knows nothing of what a manifest says;
/// `crate::windows` does.
pub trait WindowCatalog: Send + Sync {
    /// Whether an operation would be attempted now (false while the tier is unreachable).
    fn reachable(&self) -> bool;

    /// Every manifest, by name.
    fn manifests(&self) -> Result<HashMap<String, Vec<u8>>, TierError>;

    /// Create manifest `name`; false if the name is taken.
    fn publish(&self, name: &str, manifest: Vec<u8>) -> Result<bool, TierError>;

    /// Set manifest `name` whether or not it exists, in one write (a reader gets the old or
    /// the new bytes, whole).
    fn replace(&self, name: &str, manifest: Vec<u8>) -> Result<(), TierError>;

    /// Delete manifest `name`; false if there was none.
    fn remove(&self, name: &str) -> Result<bool, TierError>;

    /// Keep the records of a window (overwriting, with no expiry); how many were written.
    fn keep(&self, records: Vec<(ObjectKey, Vec<u8>)>) -> Result<usize, TierError>;

    /// `keys` are named by no window any more: they may expire like cache data again.
    fn release(&self, keys: &[ObjectKey]) -> Result<(), TierError>;

    /// Which of `keys` the tier holds (one batch; none while unreachable).
    fn present(&self, keys: &[ObjectKey]) -> HashSet<ObjectKey>;
}
