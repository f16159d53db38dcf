//! The window catalog: one JSON manifest per window in `<l2 dir>/windows/`, replaced crash-safely
//! (write `NAME.json.tmp`, fsync, rename, fsync the directory). A manifest names everything
//! needed to find the window's chunks in L2 and to bring them back: model, world size, the
//! salt its records are stored under, the token ids and the blake3 chunk hashes (the chunk key
//! of rank r is `(model, kv_rank(world_size, r), object_group 0, hash, data_salt)`).
//!
//! Format versioned (`version`, see docs/FORMATS.md); a manifest of an unknown version or one
//! that does not parse is skipped with an error in the log, never half-loaded.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use connector_protocol::{kv_rank, ChunkHash, ObjectKey};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "cwm-window";
pub const VERSION: u32 = 1;

/// A frozen context window, as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub format: String,
    pub version: u32,
    pub name: String,
    pub model: String,
    pub world_size: u32,
    /// Tokens per chunk the hashes were computed with.
    pub chunk_size: usize,
    /// The session (cache_salt) the window was frozen from.
    pub source_session: String,
    /// The salt a thaw without `new_session_id` installs the chunks under.
    pub session_id: String,
    /// The salt the window's L2 records are stored under (shared by clones).
    pub data_salt: String,
    pub tokens: Vec<u32>,
    /// blake3 chunk hashes (hex), one per chunk, in order.
    pub chunk_hashes: Vec<String>,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
    pub last_thawed_at: Option<u64>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub cloned_from: Option<String>,
    /// Published to L3 (Redis): the fleet-wide catalog there is its truth, and a node drops
    /// it when it leaves Redis (deleted on another node).
    #[serde(default)]
    pub fleet: bool,
}

impl Window {
    pub fn chunks(&self) -> usize {
        self.chunk_hashes.len()
    }

    pub fn hashes(&self) -> Vec<ChunkHash> {
        self.chunk_hashes
            .iter()
            .filter_map(|h| ChunkHash::from_hex(h))
            .collect()
    }

    /// Keys of chunk `c` for every rank, under `salt`.
    pub fn keys_of(&self, hash: ChunkHash, salt: &str) -> Vec<ObjectKey> {
        let (model, salt): (Arc<str>, Arc<str>) = (self.model.as_str().into(), salt.into());
        (0..self.world_size)
            .map(|rank| ObjectKey {
                model: model.clone(),
                kv_rank: kv_rank(self.world_size, rank),
                object_group: 0,
                chunk_hash: hash,
                cache_salt: salt.clone(),
            })
            .collect()
    }

    /// Every L2 record key the window references (chunk-major, rank-minor).
    pub fn data_keys(&self) -> Vec<ObjectKey> {
        self.hashes()
            .into_iter()
            .flat_map(|h| self.keys_of(h, &self.data_salt))
            .collect()
    }

    /// Whether `other` is this window in the same version: everything equal but the time of
    /// its last thaw and where it was published.
    pub fn same_version(&self, other: &Window) -> bool {
        let bare = |w: &Window| Window {
            last_thawed_at: None,
            fleet: false,
            ..w.clone()
        };
        bare(self) == bare(other)
    }

    /// Structural checks of a manifest read from disk or an import.
    pub fn check(&self) -> Result<(), String> {
        if self.format != FORMAT || self.version != VERSION {
            return Err(format!(
                "format {} version {}, this build reads {FORMAT} version {VERSION}",
                self.format, self.version
            ));
        }
        super::validate_name(&self.name).map_err(|e| e.to_string())?;
        if self.world_size == 0 || self.world_size > 255 {
            return Err(format!("world_size {} outside 1..=255", self.world_size));
        }
        if self.hashes().len() != self.chunk_hashes.len() {
            return Err("a chunk hash is not 64 hex digits".into());
        }
        if self.chunk_size == 0 || self.tokens.len() != self.chunk_hashes.len() * self.chunk_size {
            return Err(format!(
                "{} tokens for {} chunks of {}",
                self.tokens.len(),
                self.chunk_hashes.len(),
                self.chunk_size
            ));
        }
        for salt in [&self.data_salt, &self.session_id, &self.source_session] {
            connector_protocol::validate_cache_salt(salt).map_err(|e| e.to_string())?;
        }
        connector_protocol::validate_model_name(&self.model).map_err(|e| e.to_string())?;
        Ok(())
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Windows by name, mirrored in one manifest file each.
pub struct Catalog {
    dir: PathBuf,
    windows: Mutex<BTreeMap<String, Window>>,
}

impl Catalog {
    /// Load every manifest of `dir` (created if missing); leftover temp files are removed.
    pub fn open(dir: &Path) -> io::Result<Catalog> {
        fs::create_dir_all(dir)?;
        let mut windows = BTreeMap::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".json.tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let parsed = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Window>(&b).map_err(|e| e.to_string()))
                .and_then(|w| w.check().map(|()| w));
            match parsed {
                Ok(w) if format!("{}.json", w.name) == name => {
                    windows.insert(w.name.clone(), w);
                }
                Ok(w) => tracing::error!(
                    path = %path.display(),
                    window = w.name,
                    "window manifest's name does not match its file: skipped"
                ),
                Err(e) => {
                    tracing::error!(path = %path.display(), "unreadable window manifest skipped: {e}")
                }
            }
        }
        Ok(Catalog {
            dir: dir.to_path_buf(),
            windows: Mutex::new(windows),
        })
    }

    pub fn get(&self, name: &str) -> Option<Window> {
        self.windows.lock().get(name).cloned()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.windows.lock().contains_key(name)
    }

    pub fn all(&self) -> Vec<Window> {
        self.windows.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.windows.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Persist a new window. Fails (changing nothing) if the name is taken.
    pub fn insert(&self, w: Window) -> Result<(), CatalogError> {
        let mut windows = self.windows.lock();
        if windows.contains_key(&w.name) {
            return Err(CatalogError::Taken(w.name));
        }
        self.persist(&w)?;
        windows.insert(w.name.clone(), w);
        Ok(())
    }

    /// Replace an existing window's manifest (e.g. `last_thawed_at`).
    pub fn update(&self, w: Window) -> Result<(), CatalogError> {
        let mut windows = self.windows.lock();
        if !windows.contains_key(&w.name) {
            return Err(CatalogError::Unknown(w.name));
        }
        self.persist(&w)?;
        windows.insert(w.name.clone(), w);
        Ok(())
    }

    /// Record a thaw of `w` at `at` (unix seconds) if the catalog still holds that version of
    /// it; a window replaced or deleted since the thaw read it is left as it is. Whether it did.
    pub fn mark_thawed(&self, w: &Window, at: u64) -> Result<bool, CatalogError> {
        let mut windows = self.windows.lock();
        let Some(current) = windows.get(&w.name).filter(|c| c.same_version(w)) else {
            return Ok(false);
        };
        let marked = Window {
            last_thawed_at: Some(at),
            ..current.clone()
        };
        self.persist(&marked)?;
        windows.insert(marked.name.clone(), marked);
        Ok(true)
    }

    pub fn remove(&self, name: &str) -> Result<Window, CatalogError> {
        let mut windows = self.windows.lock();
        if !windows.contains_key(name) {
            return Err(CatalogError::Unknown(name.to_string()));
        }
        fs::remove_file(self.path(name))?;
        sync_dir(&self.dir)?;
        Ok(windows.remove(name).expect("checked"))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn persist(&self, w: &Window) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(w).map_err(io::Error::other)?;
        replace_file(&self.path(&w.name), &bytes)
    }
}

/// Replace the file at `path` with `bytes` crash-safely: `<path>.tmp` written and fsynced,
/// renamed over `path`, the directory fsynced. A reader sees the old bytes or the new, whole.
pub(super) fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("window name {0:?} is taken")]
    Taken(String),
    #[error("no window named {0:?}")]
    Unknown(String),
    #[error("window catalog I/O: {0}")]
    Io(#[from] io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn window(name: &str) -> Window {
        let h = ChunkHash([7; 32]).to_hex();
        Window {
            format: FORMAT.into(),
            version: VERSION,
            name: name.into(),
            model: "m".into(),
            world_size: 2,
            chunk_size: 4,
            source_session: "s".into(),
            session_id: "s".into(),
            data_salt: "s".into(),
            tokens: vec![1, 2, 3, 4],
            chunk_hashes: vec![h],
            raw_bytes: 10,
            stored_bytes: 5,
            created_at: 1,
            last_thawed_at: None,
            description: "d".into(),
            tags: vec!["t".into()],
            cloned_from: None,
            fleet: false,
        }
    }

    #[test]
    fn persists_across_reopen_and_skips_garbage() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Catalog::open(dir.path()).unwrap();
            c.insert(window("a")).unwrap();
            assert!(matches!(c.insert(window("a")), Err(CatalogError::Taken(_))));
            c.insert(window("b.v2")).unwrap();
            let mut w = c.get("a").unwrap();
            w.last_thawed_at = Some(9);
            c.update(w).unwrap();
            c.remove("b.v2").unwrap();
            // A thaw of a version replaced since is not recorded on the new one.
            let old = c.get("a").unwrap();
            let mut new = window("a");
            new.tokens = vec![5, 6, 7, 8];
            c.update(new.clone()).unwrap();
            assert!(!c.mark_thawed(&old, 10).unwrap());
            assert!(c.mark_thawed(&new, 11).unwrap());
            c.update(Window {
                last_thawed_at: Some(9),
                ..old
            })
            .unwrap();
        }
        std::fs::write(dir.path().join("junk.json"), b"{not json").unwrap();
        std::fs::write(dir.path().join("x.json.tmp"), b"half").unwrap();
        let c = Catalog::open(dir.path()).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c.get("a").unwrap().last_thawed_at, Some(9));
        assert!(!dir.path().join("x.json.tmp").exists());
        let keys = c.get("a").unwrap().data_keys();
        assert_eq!(keys.len(), 2);
        assert_ne!(keys[0].kv_rank, keys[1].kv_rank);
    }
}
