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
//!
//! Auto-save (`autosave`) freezes idle sessions, each replacing its previous auto-save window
//! atomically (`freeze`).
//!
//! Here: the errors, `Windows` (open, clone, delete). Requests and reports: `api`; freeze:
//! `freeze`; thaw: `thaw`; list, status, sessions, health: `status`; manifests: `catalog`;
//! window files: `export`; the fleet-wide catalog: `fleet`.

mod api;
pub mod autosave;
pub mod catalog;
pub mod export;
mod fleet;
mod freeze;
mod status;
mod thaw;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use connector_protocol::{validate_cache_salt, ObjectKey};
use parking_lot::Mutex;
use thiserror::Error;

pub use self::api::*;

use crate::ops::Cwm;
pub use crate::status::{CacheStats, Health, L1Stats, TierStats, WriteBehindStats};
use crate::store::quota::OverQuota;
use crate::store::tier::TierError;
use crate::store::tiered::{DurableError, Tiers};
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
    #[error("cannot freeze window {name:?}: {source}; nothing was written or pinned (raise the quota with PUT /quota/{{cache_salt}} or quota_set, or delete a window of this session)")]
    OverQuota {
        name: String,
        #[source]
        source: OverQuota,
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
    /// Sessions saved when idle (`autosave`).
    autosave: autosave::AutoSave,
    /// The fleet's sealed manifests that did not open here, by name (their bytes: reported
    /// and counted once per version, `fleet`).
    fleet_unreadable: Mutex<HashMap<String, Vec<u8>>>,
}

impl Windows {
    /// Open the catalog in `<l2 dir>/windows` (when L2 is on) and re-pin every window's records.
    /// `auto_save_idle_secs`: the server's auto-save default (0: off unless a session's own
    /// setting says on).
    pub fn open(
        cwm: Arc<Cwm>,
        l2_dir: Option<&Path>,
        auto_save_idle_secs: u64,
    ) -> Result<Windows, WindowError> {
        let l2_dir = l2_dir.filter(|_| cwm.tiers.has_lower());
        let sealer = cwm.tiers.sealer().clone();
        let catalog = match l2_dir {
            Some(dir) => Some(Catalog::open(&dir.join("windows"), sealer)?),
            None => None,
        };
        let w = Windows {
            cwm,
            catalog,
            started: Instant::now(),
            op_lock: Mutex::new(()),
            pins: Mutex::new(HashMap::new()),
            fleet_unreadable: Mutex::new(HashMap::new()),
            autosave: autosave::AutoSave::open(auto_save_idle_secs, l2_dir),
        };
        if let Some(cat) = &w.catalog {
            for win in cat.every_manifest() {
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
            let unreadable = cat.unreadable().len();
            tracing::info!(windows = cat.len(), unreadable, "window catalog loaded");
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

    /// Window `name` to read: unknown, or unreadable (sealed under another key) with why.
    fn find(&self, name: &str) -> Result<Window, WindowError> {
        let (_, catalog) = self.disk()?;
        catalog.find(name).map_err(|e| match e {
            CatalogError::Unknown(name) => WindowError::Unknown(name),
            e => e.into(),
        })
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

    pub fn clone_window(&self, req: &CloneRequest) -> Result<WindowSummary, WindowError> {
        validate_name(&req.source_window)?;
        validate_name(&req.new_window_name)?;
        if let Some(s) = &req.new_session_id {
            validate_session(s)?;
        }
        let (tiers, catalog) = self.disk()?;
        let _serial = self.op_lock.lock();
        self.sync_locked();
        let src = self.find(&req.source_window)?;
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
        self.publish(&w, false, fleet::Manifest::Create)?;
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
        let (_, catalog) = self.disk()?;
        let _serial = self.op_lock.lock();
        self.sync_locked();
        if !catalog.contains(&req.window_name) {
            return Err(WindowError::Unknown(req.window_name.clone()));
        }
        // Out of the fleet's catalog first, so every node sees the delete.
        self.unpublish(&req.window_name)?;
        let w = catalog.remove(&req.window_name)?;
        let pins = self.pins.lock().remove(&w.name).unwrap_or_default();
        let released = self.release(&w, pins);
        let shared = w.data_keys().len() - released;
        tracing::info!(window = w.name, "window deleted");
        Ok(DeleteReport {
            window_name: w.name.clone(),
            chunks: w.chunks(),
            records_released: released,
            records_shared: shared,
        })
    }

    /// Give up `pins`, the L2 pins of `w`, a window that has just left the catalog or been
    /// replaced there, and let L3 expire its records that no window in the catalog names any
    /// more. How many of its records no window names now.
    fn release(&self, w: &Window, pins: Vec<ObjectKey>) -> usize {
        for k in &pins {
            self.cwm.tiers.unpin(k);
        }
        let named: HashSet<ObjectKey> = self
            .catalog
            .as_ref()
            .map(|c| {
                c.every_manifest()
                    .iter()
                    .flat_map(Window::data_keys)
                    .collect()
            })
            .unwrap_or_default();
        let released: Vec<ObjectKey> = w
            .data_keys()
            .into_iter()
            .filter(|k| !named.contains(k))
            .collect();
        self.release_in_l3(&released);
        released.len()
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
