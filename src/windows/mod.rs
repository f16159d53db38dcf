//! Context windows: a session's KV chunks made durable under a name, and brought back later
//! exactly (no recompute), under the same or a new session (cache_salt).
//!
//! Transport-free: the MCP tools (`crate::mcp`) and the HTTP admin call these operations.
//!
//! - `freeze`: the session's newest chain → the longest prefix of chunks present on every
//!   rank (L1 or L2) → each chunk written to L2 now if write-behind has not yet → L2 synced →
//!   every record pinned → manifest persisted (`catalog`).
//! - `thaw`: manifest → chunks read in parallel (from L1 when the records are still resident,
//!   else L2) → installed in L1 under the target salt, so the next request with that salt and
//!   prefix hits in full.
//! - `clone`: a new manifest naming the same L2 records (no byte copy) with its own default
//!   session. Records stay under the salt they were frozen from (`data_salt`); a thaw re-keys
//!   them to the target salt as it installs them in L1. Each window pins every record it
//!   names (reference-counted in L2), so deleting either window never breaks the other; a
//!   record becomes reclaimable once no window names it.
//!
//! Catalog-changing operations are serialized by one lock so pins and manifests agree.

pub mod catalog;
pub mod export;
mod fleet;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use connector_protocol::{validate_cache_salt, ObjectKey};
use parking_lot::Mutex;
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ops::Cwm;
use crate::status;
pub use crate::status::{CacheStats, Health, L1Stats, TierStats, WriteBehindStats};
use crate::store::tier::TierError;
use crate::store::tiered::{DurableError, InstallError, Installed, Tiers};
use catalog::{unix_now, Catalog, CatalogError, Window};

#[derive(Debug, Error)]
pub enum WindowError {
    #[error("invalid window name {0:?}: names are 1 to 64 of A-Z a-z 0-9 _ . -, starting with a letter, digit or _")]
    InvalidName(String),
    #[error("invalid session_id {0:?}: {1}")]
    InvalidSalt(String, String),
    #[error("invalid {0}: {1}")]
    InvalidArgument(&'static str, String),
    #[error("no window named {0:?}")]
    Unknown(String),
    #[error("window name {0:?} is taken")]
    Taken(String),
    #[error("nothing stored for session {0:?}: no chunk of it is cached (store a request with this cache_salt first)")]
    NothingStored(String),
    #[error("context windows need the L2 disk tier (set --l2-size-gb above 0)")]
    NoDisk,
    #[error("window {name:?} was frozen with chunk size {window}, this server uses {server}")]
    ChunkSize {
        name: String,
        window: usize,
        server: usize,
    },
    #[error("chunk {0:?} left the cache while freezing; freeze again")]
    Vanished(Box<ObjectKey>),
    #[error("window {name:?}: none of its {chunks} chunks could be loaded ({reason})")]
    ThawFailed {
        name: String,
        chunks: usize,
        reason: String,
    },
    #[error(transparent)]
    Tier(#[from] TierError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{0}")]
    Export(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Fleet(String),
}

impl From<DurableError> for WindowError {
    fn from(e: DurableError) -> Self {
        match e {
            DurableError::NoTier => WindowError::NoDisk,
            DurableError::Vanished(key) => WindowError::Vanished(key),
            DurableError::Tier(e) => WindowError::Tier(e),
        }
    }
}

/// Window names: `^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$`. A name is a file name in the data
/// directory (`windows/<name>.json`) and an argument of `cwm windows`: `.`, `..`, hidden
/// names and names that read as options (`-x`) are refused.
pub fn validate_name(name: &str) -> Result<(), WindowError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(WindowError::InvalidName(name.to_string()))
    }
}

/// Session ids are cache salts, as LMCache allows them.
pub fn validate_session(salt: &str) -> Result<(), WindowError> {
    validate_cache_salt(salt).map_err(|e| WindowError::InvalidSalt(salt.to_string(), e.to_string()))
}

fn validate_meta(description: &str, tags: &[String]) -> Result<(), WindowError> {
    if description.len() > 4096 {
        return Err(WindowError::InvalidArgument(
            "description",
            format!("{} bytes, at most 4096", description.len()),
        ));
    }
    if tags.len() > 32 {
        return Err(WindowError::InvalidArgument(
            "tags",
            format!("{} tags, at most 32", tags.len()),
        ));
    }
    if let Some(t) = tags
        .iter()
        .find(|t| t.is_empty() || t.len() > 64 || t.chars().any(char::is_control))
    {
        return Err(WindowError::InvalidArgument(
            "tag",
            format!("{t:?}: 1 to 64 printable characters"),
        ));
    }
    Ok(())
}

// ----- requests and results (JSON schemas for the MCP tools) ---------------------------------

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct FreezeRequest {
    /// The session to freeze: the cache_salt its requests carry.
    pub session_id: String,
    /// Name of the new window: 1 to 64 of A-Z a-z 0-9 _ . -
    pub window_name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct WindowSummary {
    pub name: String,
    pub model: String,
    pub world_size: u32,
    /// Default session (cache_salt) a thaw installs the chunks under.
    pub session_id: String,
    /// Session the window was frozen from.
    pub source_session: String,
    pub tokens: usize,
    pub chunks: usize,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
    pub last_thawed_at: Option<u64>,
    pub description: String,
    pub tags: Vec<String>,
    pub cloned_from: Option<String>,
}

impl From<&Window> for WindowSummary {
    fn from(w: &Window) -> Self {
        WindowSummary {
            name: w.name.clone(),
            model: w.model.clone(),
            world_size: w.world_size,
            session_id: w.session_id.clone(),
            source_session: w.source_session.clone(),
            tokens: w.tokens.len(),
            chunks: w.chunks(),
            raw_bytes: w.raw_bytes,
            stored_bytes: w.stored_bytes,
            created_at: w.created_at,
            last_thawed_at: w.last_thawed_at,
            description: w.description.clone(),
            tags: w.tags.clone(),
            cloned_from: w.cloned_from.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct FreezeReport {
    pub window: WindowSummary,
    /// Chunks written to L2 by the freeze itself (the rest were already there).
    pub written_now: usize,
    /// Tokens of the session's newest chain that were not cached on every rank (not frozen).
    pub tokens_left_out: usize,
    pub elapsed_ms: f64,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct ThawRequest {
    pub window_name: String,
    /// Install under this session (cache_salt) instead of the window's own.
    #[serde(default)]
    pub new_session_id: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct TierReads {
    /// Objects copied from L1 (the window's records were still resident).
    pub l1: u64,
    /// Objects read (and verified, decompressed) from L2.
    pub l2: u64,
    /// Objects already resident under the target session: nothing to do.
    pub already_resident: u64,
    /// Objects read (and verified) from L3, Redis (then copied like L1 reads).
    #[serde(default)]
    pub l3: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ThawReport {
    pub window_name: String,
    pub session_id: String,
    pub model: String,
    /// Leading tokens a request with this session and prefix will hit.
    pub tokens_ready: usize,
    pub tokens: usize,
    pub chunks_ready: usize,
    pub chunks: usize,
    /// Bytes installed in L1 (decompressed).
    pub bytes: u64,
    pub tiers: TierReads,
    pub complete: bool,
    pub elapsed_ms: f64,
    pub gb_per_s: f64,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct CloneRequest {
    pub source_window: String,
    pub new_window_name: String,
    /// Default session of the clone (else the source's).
    #[serde(default)]
    pub new_session_id: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct ListRequest {
    #[serde(default)]
    pub tag: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub name_prefix: Option<String>,
    /// Windows to skip (paging), default 0.
    #[serde(default)]
    pub offset: Option<usize>,
    /// Page size, default 50, at most 500.
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct WindowList {
    /// Windows matching the filter (all pages).
    pub total: usize,
    pub windows: Vec<WindowSummary>,
    /// Offset of the next page, if any.
    pub next_offset: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct StatusRequest {
    #[serde(default)]
    pub window_name: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct WindowStatus {
    pub window: WindowSummary,
    /// Chunks whose records (every rank) are in L2.
    pub chunks_in_l2: usize,
    /// Leading chunks resident in L1 under the window's session: a request hits them now.
    pub chunks_resident: usize,
    /// Chunks whose records (every rank) are in L3, Redis; null without L3 or while it is
    /// unreachable.
    pub chunks_in_l3: Option<usize>,
    /// Chunks whose records are gone (the window cannot fully thaw).
    pub chunks_missing: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ChainStatus {
    pub model: String,
    pub world_size: u32,
    pub tokens: usize,
    pub chunks: usize,
    /// Leading chunks cached on every rank (L1 or L2): what a freeze would keep.
    pub chunks_cached: usize,
    /// Unix seconds.
    pub updated_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SessionStatus {
    pub session_id: String,
    /// Stored token chains, newest first.
    pub chains: Vec<ChainStatus>,
    /// Windows frozen from this session.
    pub windows: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct StatusReport {
    pub window: Option<WindowStatus>,
    pub session: Option<SessionStatus>,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct DeleteRequest {
    pub window_name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DeleteReport {
    pub window_name: String,
    pub chunks: usize,
    /// Records no other window names: reclaimable by L2 from now on.
    pub records_released: usize,
    /// Records still pinned by other windows (clones).
    pub records_shared: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SessionInfo {
    pub session_id: String,
    pub model: String,
    pub world_size: u32,
    pub chains: usize,
    pub newest_tokens: usize,
    pub open_requests: usize,
    pub updated_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionInfo>,
}

// ----- the operations -------------------------------------------------------------------------

/// Context windows over one sidecar's stores.
pub struct Windows {
    pub cwm: Arc<Cwm>,
    catalog: Option<Catalog>,
    started: Instant,
    /// Serializes freeze / clone / delete / import: pins and manifests change together.
    op_lock: Mutex<()>,
    /// The L2 pins each window holds (a record missing at startup is not pinned, so it must
    /// not be unpinned on delete either: the count may belong to another window).
    pins: Mutex<HashMap<String, Vec<ObjectKey>>>,
}

impl Windows {
    /// Open the catalog in `<l2 dir>/windows` (when L2 is on) and re-pin every window's records.
    pub fn open(cwm: Arc<Cwm>, l2_dir: Option<&Path>) -> Result<Windows, WindowError> {
        let catalog = match l2_dir {
            Some(dir) if cwm.tiers.has_lower() => Some(Catalog::open(&dir.join("windows"))?),
            _ => None,
        };
        let w = Windows {
            cwm,
            catalog,
            started: Instant::now(),
            op_lock: Mutex::new(()),
            pins: Mutex::new(HashMap::new()),
        };
        if let Some(cat) = &w.catalog {
            for win in cat.all() {
                let keys = win.data_keys();
                let pinned: Vec<ObjectKey> = keys
                    .iter()
                    .filter(|k| w.cwm.tiers.pin(k))
                    .cloned()
                    .collect();
                let missing = keys.len() - pinned.len();
                w.pins.lock().insert(win.name.clone(), pinned);
                if missing > 0 {
                    tracing::error!(
                        window = win.name,
                        missing,
                        records = keys.len(),
                        "window records missing from L2: it cannot fully thaw"
                    );
                }
            }
            tracing::info!(windows = cat.len(), "window catalog loaded");
        }
        Ok(w)
    }

    /// The tiers and the catalog, when windows can be durable (a tier behind L1).
    fn disk(&self) -> Result<(&Tiers, &Catalog), WindowError> {
        match &self.catalog {
            Some(cat) if self.cwm.tiers.has_lower() => Ok((&self.cwm.tiers, cat)),
            _ => Err(WindowError::NoDisk),
        }
    }

    pub fn get(&self, name: &str) -> Option<Window> {
        self.catalog.as_ref()?.get(name)
    }

    /// Leading chunks of `hashes` whose every rank is in L1 or L2 under `salt`.
    fn cached_prefix(
        &self,
        w: &Window,
        hashes: &[connector_protocol::ChunkHash],
        salt: &str,
    ) -> usize {
        hashes
            .iter()
            .take_while(|h| {
                w.keys_of(**h, salt)
                    .iter()
                    .all(|k| self.cwm.tiers.available(k))
            })
            .count()
    }

    pub fn freeze(&self, req: &FreezeRequest) -> Result<FreezeReport, WindowError> {
        let started = Instant::now();
        validate_name(&req.window_name)?;
        validate_session(&req.session_id)?;
        let description = req.description.clone().unwrap_or_default();
        let tags = req.tags.clone().unwrap_or_default();
        validate_meta(&description, &tags)?;
        let (tiers, catalog) = self.disk()?;
        let _serial = self.op_lock.lock();
        self.sync_locked();
        if catalog.contains(&req.window_name) {
            return Err(WindowError::Taken(req.window_name.clone()));
        }
        let chain = self
            .cwm
            .chains
            .newest(&req.session_id)
            .ok_or_else(|| WindowError::NothingStored(req.session_id.clone()))?;
        let cs = self.cwm.settings.chunk_size;
        let hashes = self
            .cwm
            .hasher
            .chunk_hashes(&chain.tokens, 0, chain.tokens.len());
        let mut w = Window {
            format: catalog::FORMAT.into(),
            version: catalog::VERSION,
            name: req.window_name.clone(),
            model: chain.model.to_string(),
            world_size: chain.world_size,
            chunk_size: cs,
            source_session: req.session_id.clone(),
            session_id: req.session_id.clone(),
            data_salt: req.session_id.clone(),
            tokens: Vec::new(),
            chunk_hashes: Vec::new(),
            raw_bytes: 0,
            stored_bytes: 0,
            created_at: unix_now(),
            last_thawed_at: None,
            description,
            tags,
            cloned_from: None,
            fleet: false,
        };
        let n = self.cached_prefix(&w, &hashes, &req.session_id);
        if n == 0 {
            return Err(WindowError::NothingStored(req.session_id.clone()));
        }
        w.tokens = chain.tokens[..n * cs].to_vec();
        w.chunk_hashes = hashes[..n].iter().map(|h| h.to_hex()).collect();
        let keys = w.data_keys();
        // Durable first (in parallel: compression dominates), then pinned.
        let written = AtomicUsize::new(0);
        keys.par_iter().try_for_each(|k| {
            if tiers.make_durable(k)? {
                written.fetch_add(1, Relaxed);
            }
            Ok::<(), WindowError>(())
        })?;
        let mut pinned: Vec<&ObjectKey> = Vec::with_capacity(keys.len());
        let unpin_all = |pinned: &[&ObjectKey]| pinned.iter().for_each(|k| tiers.unpin(k));
        for k in &keys {
            // A record reclaimed since it was written is written again, once.
            let ok = tiers.pin(k) || (tiers.make_durable(k).is_ok() && tiers.pin(k));
            if !ok {
                unpin_all(&pinned);
                return Err(WindowError::Vanished(Box::new(k.clone())));
            }
            pinned.push(k);
        }
        if let Err(e) = tiers.sync() {
            unpin_all(&pinned);
            return Err(e.into());
        }
        let infos: Vec<_> = keys.iter().filter_map(|k| tiers.record_info(k)).collect();
        w.raw_bytes = infos.iter().map(|i| i.raw_len).sum();
        w.stored_bytes = infos.iter().map(|i| i.record_len).sum();
        w.fleet = self.fleet().is_some();
        // Fleet-wide first (records, then the manifest if the name is free everywhere).
        if let Err(e) = self.publish(&w, true) {
            unpin_all(&pinned);
            return Err(e);
        }
        if let Err(e) = catalog.insert(w.clone()) {
            unpin_all(&pinned);
            return Err(e.into());
        }
        self.pins
            .lock()
            .insert(w.name.clone(), pinned.into_iter().cloned().collect());
        tracing::info!(
            window = w.name,
            session = w.source_session,
            tokens = w.tokens.len(),
            chunks = n,
            "window frozen"
        );
        Ok(FreezeReport {
            window: WindowSummary::from(&w),
            written_now: written.into_inner(),
            tokens_left_out: chain.tokens.len() - n * cs,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Load the window's chunks into L1 under its session or `new_session_id`. `progress` is
    /// called with (chunks done, chunks) as chunks complete, from the loading threads.
    pub fn thaw(
        &self,
        req: &ThawRequest,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<ThawReport, WindowError> {
        let started = Instant::now();
        validate_name(&req.window_name)?;
        if let Some(s) = &req.new_session_id {
            validate_session(s)?;
        }
        let (tiers, catalog) = self.disk()?;
        self.sync();
        let mut w = catalog
            .get(&req.window_name)
            .ok_or_else(|| WindowError::Unknown(req.window_name.clone()))?;
        let cs = self.cwm.settings.chunk_size;
        if w.chunk_size != cs {
            return Err(WindowError::ChunkSize {
                name: w.name,
                window: w.chunk_size,
                server: cs,
            });
        }
        // Records frozen on another node: from Redis into L1, then copied like L1 hits.
        let from_l3 = self.fetch_from_l3(&w.data_keys());
        let target = req.new_session_id.clone().unwrap_or(w.session_id.clone());
        let hashes = w.hashes();
        let total = hashes.len();
        let done = AtomicUsize::new(0);
        let (from_l1, from_l2, resident, bytes) = (
            AtomicU64::new(0),
            AtomicU64::new(0),
            AtomicU64::new(0),
            AtomicU64::new(0),
        );
        let last_error: Mutex<Option<String>> = Mutex::new(None);
        let loaded: Vec<bool> = hashes
            .par_iter()
            .map(|h| {
                let data = w.keys_of(*h, &w.data_salt);
                let dest = w.keys_of(*h, &target);
                let ok = data
                    .iter()
                    .zip(&dest)
                    .all(|(src, dst)| match tiers.install(src, dst) {
                        Ok(Installed::Resident) => {
                            resident.fetch_add(1, Relaxed);
                            true
                        }
                        Ok(Installed::FromL1(len)) => {
                            from_l1.fetch_add(1, Relaxed);
                            bytes.fetch_add(len, Relaxed);
                            true
                        }
                        Ok(Installed::FromLower(len)) => {
                            from_l2.fetch_add(1, Relaxed);
                            bytes.fetch_add(len, Relaxed);
                            true
                        }
                        Err(e) => {
                            *last_error.lock() = Some(match e {
                                InstallError::Missing(_) => format!("record {src:?} is not in L2"),
                                e => e.to_string(),
                            });
                            false
                        }
                    });
                progress(done.fetch_add(1, Relaxed) + 1, total);
                ok
            })
            .collect();
        let ready = loaded.iter().take_while(|ok| **ok).count();
        if ready == 0 && total > 0 {
            return Err(WindowError::ThawFailed {
                name: w.name,
                chunks: total,
                reason: last_error.into_inner().unwrap_or_default(),
            });
        }
        let tokens_ready = ready * cs;
        self.cwm.chains.record(
            &w.model,
            w.world_size,
            &target,
            &w.tokens[..tokens_ready],
            None,
        );
        w.last_thawed_at = Some(unix_now());
        if let Err(e) = catalog.update(w.clone()) {
            tracing::warn!(window = w.name, "could not record the thaw time: {e}");
        }
        let elapsed = started.elapsed().as_secs_f64();
        let bytes = bytes.into_inner();
        tracing::info!(
            window = w.name,
            session = target,
            tokens_ready,
            bytes,
            "window thawed"
        );
        Ok(ThawReport {
            window_name: w.name.clone(),
            session_id: target,
            model: w.model.clone(),
            tokens_ready,
            tokens: w.tokens.len(),
            chunks_ready: ready,
            chunks: total,
            bytes,
            tiers: TierReads {
                l1: from_l1.into_inner(),
                l2: from_l2.into_inner(),
                already_resident: resident.into_inner(),
                l3: from_l3,
            },
            complete: ready == total,
            elapsed_ms: elapsed * 1e3,
            gb_per_s: if elapsed > 0.0 {
                bytes as f64 / elapsed / 1e9
            } else {
                0.0
            },
        })
    }

    pub fn clone_window(&self, req: &CloneRequest) -> Result<WindowSummary, WindowError> {
        validate_name(&req.source_window)?;
        validate_name(&req.new_window_name)?;
        if let Some(s) = &req.new_session_id {
            validate_session(s)?;
        }
        let (tiers, catalog) = self.disk()?;
        let _serial = self.op_lock.lock();
        self.sync_locked();
        let src = catalog
            .get(&req.source_window)
            .ok_or_else(|| WindowError::Unknown(req.source_window.clone()))?;
        if catalog.contains(&req.new_window_name) {
            return Err(WindowError::Taken(req.new_window_name.clone()));
        }
        let mut w = src.clone();
        w.name = req.new_window_name.clone();
        w.session_id = req.new_session_id.clone().unwrap_or(src.session_id.clone());
        w.created_at = unix_now();
        w.last_thawed_at = None;
        w.cloned_from = Some(src.name.clone());
        w.fleet = self.fleet().is_some();
        self.publish(&w, false)?;
        let pinned: Vec<ObjectKey> = w.data_keys().into_iter().filter(|k| tiers.pin(k)).collect();
        if let Err(e) = catalog.insert(w.clone()) {
            pinned.iter().for_each(|k| tiers.unpin(k));
            return Err(e.into());
        }
        self.pins.lock().insert(w.name.clone(), pinned);
        Ok(WindowSummary::from(&w))
    }

    pub fn delete(&self, req: &DeleteRequest) -> Result<DeleteReport, WindowError> {
        validate_name(&req.window_name)?;
        let (tiers, catalog) = self.disk()?;
        let _serial = self.op_lock.lock();
        self.sync_locked();
        if !catalog.contains(&req.window_name) {
            return Err(WindowError::Unknown(req.window_name.clone()));
        }
        // Out of the fleet's catalog first, so every node sees the delete.
        self.unpublish(&req.window_name)?;
        let w = catalog.remove(&req.window_name)?;
        let others: HashSet<ObjectKey> = catalog.all().iter().flat_map(|o| o.data_keys()).collect();
        let keys = w.data_keys();
        for k in self.pins.lock().remove(&w.name).unwrap_or_default() {
            tiers.unpin(&k);
        }
        let released: Vec<ObjectKey> = keys
            .iter()
            .filter(|k| !others.contains(*k))
            .cloned()
            .collect();
        self.release_in_l3(&released);
        let shared = keys.len() - released.len();
        tracing::info!(window = w.name, "window deleted");
        Ok(DeleteReport {
            window_name: w.name.clone(),
            chunks: w.chunks(),
            records_released: keys.len() - shared,
            records_shared: shared,
        })
    }

    pub fn list(&self, req: &ListRequest) -> Result<WindowList, WindowError> {
        self.sync();
        let Some(catalog) = &self.catalog else {
            return Ok(WindowList {
                total: 0,
                windows: Vec::new(),
                next_offset: None,
            });
        };
        let offset = req.offset.unwrap_or(0);
        let limit = req.limit.unwrap_or(50);
        if limit == 0 || limit > 500 {
            return Err(WindowError::InvalidArgument(
                "limit",
                format!("{limit}: 1..=500"),
            ));
        }
        let matching: Vec<Window> = catalog
            .all()
            .into_iter()
            .filter(|w| req.tag.as_ref().is_none_or(|t| w.tags.contains(t)))
            .filter(|w| req.model.as_ref().is_none_or(|m| &w.model == m))
            .filter(|w| {
                req.name_prefix
                    .as_ref()
                    .is_none_or(|p| w.name.starts_with(p.as_str()))
            })
            .collect();
        let total = matching.len();
        let windows: Vec<WindowSummary> = matching
            .iter()
            .skip(offset)
            .take(limit)
            .map(WindowSummary::from)
            .collect();
        let next = offset + windows.len();
        Ok(WindowList {
            total,
            windows,
            next_offset: (next < total).then_some(next),
        })
    }

    pub fn status(&self, req: &StatusRequest) -> Result<StatusReport, WindowError> {
        if req.window_name.is_none() && req.session_id.is_none() {
            return Err(WindowError::InvalidArgument(
                "request",
                "give window_name or session_id".into(),
            ));
        }
        self.sync();
        let window = match &req.window_name {
            Some(name) => {
                validate_name(name)?;
                let w = self
                    .get(name)
                    .ok_or_else(|| WindowError::Unknown(name.clone()))?;
                Some(self.window_status(&w))
            }
            None => None,
        };
        let session = match &req.session_id {
            Some(s) => {
                validate_session(s)?;
                Some(self.session_status(s))
            }
            None => None,
        };
        Ok(StatusReport { window, session })
    }

    fn window_status(&self, w: &Window) -> WindowStatus {
        let tiers = &self.cwm.tiers;
        let hashes = w.hashes();
        let in_l2 = hashes
            .iter()
            .filter(|h| {
                w.keys_of(**h, &w.data_salt)
                    .iter()
                    .all(|k| tiers.durable(k))
            })
            .count();
        let resident = hashes
            .iter()
            .take_while(|h| {
                w.keys_of(**h, &w.session_id)
                    .iter()
                    .all(|k| tiers.resident(k))
            })
            .count();
        let in_l3 = self.chunks_in_l3(w);
        WindowStatus {
            window: WindowSummary::from(w),
            chunks_in_l2: in_l2,
            chunks_resident: resident,
            chunks_in_l3: in_l3,
            chunks_missing: hashes.len() - in_l2.max(in_l3.unwrap_or(0)),
        }
    }

    fn session_status(&self, salt: &str) -> SessionStatus {
        let cs = self.cwm.settings.chunk_size;
        let chains = self
            .cwm
            .chains
            .chains(salt)
            .into_iter()
            .map(|c| {
                let hashes = self.cwm.hasher.chunk_hashes(&c.tokens, 0, c.tokens.len());
                let probe = Window {
                    model: c.model.to_string(),
                    world_size: c.world_size,
                    ..probe_window()
                };
                ChainStatus {
                    model: c.model.to_string(),
                    world_size: c.world_size,
                    tokens: c.tokens.len(),
                    chunks: c.tokens.len() / cs,
                    chunks_cached: self.cached_prefix(&probe, &hashes, salt),
                    updated_at: secs(c.updated),
                }
            })
            .collect();
        let windows = self
            .catalog
            .as_ref()
            .map(|c| {
                c.all()
                    .into_iter()
                    .filter(|w| w.source_session == salt)
                    .map(|w| w.name)
                    .collect()
            })
            .unwrap_or_default();
        SessionStatus {
            session_id: salt.to_string(),
            chains,
            windows,
        }
    }

    pub fn session_list(&self) -> SessionList {
        SessionList {
            sessions: self
                .cwm
                .chains
                .list()
                .into_iter()
                .map(|s| SessionInfo {
                    session_id: s.cache_salt.to_string(),
                    model: s.model.to_string(),
                    world_size: s.world_size,
                    chains: s.chains,
                    newest_tokens: s.newest_tokens,
                    open_requests: s.open_requests,
                    updated_at: secs(s.updated),
                })
                .collect(),
        }
    }

    pub fn cache_stats(&self) -> CacheStats {
        status::cache_stats(&self.cwm)
    }

    pub fn health(&self) -> Health {
        Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_secs: self.started.elapsed().as_secs(),
            chunk_size: self.cwm.settings.chunk_size,
            l2_enabled: self.cwm.tiers.has_lower(),
            windows: self.catalog.as_ref().map_or(0, Catalog::len),
            sessions: self.cwm.chains.len(),
            registered_instances: self.cwm.registry.len(),
        }
    }
}

/// A window shell used to derive chunk keys for a session chain.
fn probe_window() -> Window {
    Window {
        format: catalog::FORMAT.into(),
        version: catalog::VERSION,
        name: String::new(),
        model: String::new(),
        world_size: 1,
        chunk_size: 0,
        source_session: String::new(),
        session_id: String::new(),
        data_salt: String::new(),
        tokens: Vec::new(),
        chunk_hashes: Vec::new(),
        raw_bytes: 0,
        stored_bytes: 0,
        created_at: 0,
        last_thawed_at: None,
        description: String::new(),
        tags: Vec::new(),
        cloned_from: None,
        fleet: false,
    }
}

fn secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "chat-1.v2_x", &"x".repeat(64), "_x", "9.", "a..b"] {
            validate_name(ok).unwrap();
        }
        // `.`, `..` and hidden names become odd files (`windows/..json`); `-` reads as an
        // option of `cwm windows`.
        for bad in [
            "",
            "a b",
            "a/b",
            &"x".repeat(65),
            "é",
            "a\0",
            ".",
            "..",
            ".hidden",
            "-",
            "-rf",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_session("a/b").is_err());
        validate_session("").unwrap();
    }
}
