//! The window catalog: one JSON manifest per window in `<l2 dir>/windows/`, replaced crash-safely
//! (write `NAME.json.tmp`, fsync, rename, fsync the directory). A manifest names everything
//! needed to find the window's chunks in L2 and to bring them back: model, world size, the
//! salt its records are stored under, the token ids and the blake3 chunk hashes (the chunk key
//! of rank r is `(model, kv_rank(world_size, r), object_group 0, hash, data_salt)`).
//!
//! Format versioned (`version`, see docs/FORMATS.md); a manifest of an unknown version or one
//! that does not parse is skipped with an error in the log, never half-loaded.
//!
//! With `--encryption-key-file` a manifest is written as version 2 (`encode_manifest`, the one
//! encoding of local files, the fleet's catalog in Redis and exports): the tenant's data
//! (token ids, description, tags) is sealed (`store::seal`, the window's `session_id` key)
//! and bound to the fields that stay clear to find the window's records (name, salts,
//! model, world and chunk size, chunk hashes). In memory a window is always the plain shape;
//! version 1 manifests stay readable with or without a key. A version 2 manifest that does
//! not open is kept as `Unreadable` (listed with its reason, its records still pinned, its
//! name still taken; it can be deleted), never thawed.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use connector_protocol::{kv_rank, ChunkHash, ObjectKey};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::le::PutLe;
use crate::store::seal::{BlobError, BlobKind, Sealer};

pub const FORMAT: &str = "cwm-window";
/// The plain manifest, and the shape of every window in memory.
pub const VERSION: u32 = 1;
/// A manifest whose token ids, description and tags are sealed (`sealed`, hex).
pub const SEALED_VERSION: u32 = 2;
/// The fields version 2 seals.
const SEALED_FIELDS: [&str; 3] = ["tokens", "description", "tags"];

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
        self.check_clear()?;
        if self.tokens.len() != self.chunk_hashes.len() * self.chunk_size {
            return Err(format!(
                "{} tokens for {} chunks of {}",
                self.tokens.len(),
                self.chunk_hashes.len(),
                self.chunk_size
            ));
        }
        Ok(())
    }

    /// The checks of the fields a sealed manifest keeps in the clear.
    fn check_clear(&self) -> Result<(), String> {
        if self.format != FORMAT || self.version != VERSION {
            return Err(format!(
                "format {} version {}, this build reads {FORMAT} versions {VERSION} and \
                 {SEALED_VERSION}",
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
        if self.chunk_size == 0 {
            return Err("chunk_size 0".into());
        }
        for salt in [&self.data_salt, &self.session_id, &self.source_session] {
            connector_protocol::validate_cache_salt(salt).map_err(|e| e.to_string())?;
        }
        connector_protocol::validate_model_name(&self.model).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// A window whose manifest is sealed and did not open here: its clear fields (no tokens,
/// description or tags) and why.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub window: Window,
    pub reason: BlobError,
}

/// Why a manifest's bytes gave no window.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{0}")]
    Malformed(String),
    #[error("window {:?} is unreadable: {}", .0.window.name, .0.reason)]
    Unreadable(Box<Unreadable>),
}

/// The part of a manifest version 2 seals.
#[derive(Serialize, Deserialize)]
struct SealedPart {
    tokens: Vec<u32>,
    description: String,
    tags: Vec<String>,
}

/// What a sealed manifest's tag also covers (after `BlobKind::WindowManifest`'s context):
/// the clear fields that say which window and which records it belongs to.
fn manifest_aad(w: &Window) -> Vec<u8> {
    let mut b = Vec::new();
    for text in [&w.name, &w.session_id, &w.data_salt, &w.model] {
        b.put_u32(text.len() as u32);
        b.extend_from_slice(text.as_bytes());
    }
    b.put_u32(w.world_size);
    b.put_u64(w.chunk_size as u64);
    let hashes = w.hashes();
    b.put_u32(hashes.len() as u32);
    hashes.iter().for_each(|h| b.extend_from_slice(&h.0));
    b
}

/// `w` as manifest bytes (JSON): version 2 with its tenant data sealed when `sealer` has a key,
/// else version 1.
pub fn encode_manifest(w: &Window, sealer: &Sealer) -> Vec<u8> {
    let encoded = (|| {
        let part = SealedPart {
            tokens: w.tokens.clone(),
            description: w.description.clone(),
            tags: w.tags.clone(),
        };
        let plain = serde_json::to_vec(&part)?;
        let aad = manifest_aad(w);
        let Some(blob) = sealer.seal_blob(BlobKind::WindowManifest, &w.session_id, &aad, &plain)
        else {
            return serde_json::to_vec_pretty(w);
        };
        let mut v = serde_json::to_value(w)?;
        let fields = v.as_object_mut().expect("a window is a JSON object");
        SEALED_FIELDS.iter().for_each(|f| drop(fields.remove(*f)));
        fields.insert("version".into(), SEALED_VERSION.into());
        fields.insert("sealed".into(), hex::encode(blob).into());
        serde_json::to_vec_pretty(&v)
    })();
    encoded.expect("a window serializes to JSON")
}

/// A window from manifest bytes (either version), checked; a sealed one opened with `sealer`.
pub fn decode_manifest(bytes: &[u8], sealer: &Sealer) -> Result<Window, ManifestError> {
    let malformed = |e: &dyn std::fmt::Display| ManifestError::Malformed(e.to_string());
    let mut v: Value = serde_json::from_slice(bytes).map_err(|e| malformed(&e))?;
    let fields = v
        .as_object_mut()
        .ok_or_else(|| malformed(&"not a JSON object"))?;
    let blob = if fields.get("version").and_then(Value::as_u64) == Some(SEALED_VERSION.into()) {
        let hex_blob = fields.remove("sealed");
        let blob = hex_blob
            .as_ref()
            .and_then(Value::as_str)
            .and_then(|h| hex::decode(h).ok())
            .ok_or_else(|| malformed(&"version 2 manifest without a hex `sealed` field"))?;
        let placeholder = SealedPart {
            tokens: Vec::new(),
            description: String::new(),
            tags: Vec::new(),
        };
        let Value::Object(p) = serde_json::to_value(placeholder).map_err(|e| malformed(&e))? else {
            unreachable!("a struct serializes to an object")
        };
        fields.extend(p);
        fields.insert("version".into(), VERSION.into());
        Some(blob)
    } else {
        None
    };
    let mut w: Window = serde_json::from_value(v).map_err(|e| malformed(&e))?;
    let Some(blob) = blob else {
        w.check().map_err(|e| malformed(&e))?;
        return Ok(w);
    };
    w.check_clear().map_err(|e| malformed(&e))?;
    let aad = manifest_aad(&w);
    match sealer.open_blob(BlobKind::WindowManifest, &w.session_id, &aad, &blob) {
        Ok(plain) => {
            let part: SealedPart = serde_json::from_slice(&plain).map_err(|e| malformed(&e))?;
            w.tokens = part.tokens;
            w.description = part.description;
            w.tags = part.tags;
            w.check().map_err(|e| malformed(&e))?;
            Ok(w)
        }
        Err(reason) => Err(ManifestError::Unreadable(Box::new(Unreadable {
            window: w,
            reason,
        }))),
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
    sealer: Sealer,
    windows: Mutex<BTreeMap<String, Window>>,
    /// Sealed manifests that did not open here (locked after `windows`).
    unreadable: Mutex<BTreeMap<String, Unreadable>>,
}

impl Catalog {
    /// Load every manifest of `dir` (created if missing), opening sealed ones with `sealer`
    /// (which also seals what is written); leftover temp files are removed.
    pub fn open(dir: &Path, sealer: Sealer) -> io::Result<Catalog> {
        fs::create_dir_all(dir)?;
        let mut windows = BTreeMap::new();
        let mut unreadable = BTreeMap::new();
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
                .map_err(|e| ManifestError::Malformed(e.to_string()))
                .and_then(|b| decode_manifest(&b, &sealer));
            let named = |w: &Window| format!("{}.json", w.name) == name;
            match parsed {
                Ok(w) if named(&w) => {
                    windows.insert(w.name.clone(), w);
                }
                Err(ManifestError::Unreadable(u)) if named(&u.window) => {
                    tracing::error!(
                        path = %path.display(),
                        window = u.window.name,
                        "window listed as unreadable: {}", u.reason
                    );
                    unreadable.insert(u.window.name.clone(), *u);
                }
                Ok(_) | Err(ManifestError::Unreadable(_)) => tracing::error!(
                    path = %path.display(),
                    "window manifest's name does not match its file: skipped"
                ),
                Err(e) => {
                    tracing::error!(path = %path.display(), "unreadable window manifest skipped: {e}")
                }
            }
        }
        Ok(Catalog {
            dir: dir.to_path_buf(),
            sealer,
            windows: Mutex::new(windows),
            unreadable: Mutex::new(unreadable),
        })
    }

    /// Window `name`, or why there is none to use.
    pub fn find(&self, name: &str) -> Result<Window, CatalogError> {
        if let Some(w) = self.get(name) {
            return Ok(w);
        }
        match self.unreadable.lock().get(name) {
            Some(u) => Err(CatalogError::Unreadable {
                name: name.to_string(),
                reason: u.reason.clone(),
            }),
            None => Err(CatalogError::Unknown(name.to_string())),
        }
    }

    /// The windows whose sealed manifest did not open here.
    pub fn unreadable(&self) -> Vec<Unreadable> {
        self.unreadable.lock().values().cloned().collect()
    }

    /// Every window's clear fields, the unreadable ones' included (their records stay pinned
    /// and named, so the right key finds them whole).
    pub fn every_manifest(&self) -> Vec<Window> {
        let windows = self.windows.lock();
        let unreadable = self.unreadable.lock();
        let shells = unreadable.values().map(|u| &u.window);
        windows.values().chain(shells).cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<Window> {
        self.windows.lock().get(name).cloned()
    }

    /// Whether `name` is taken, by a window or an unreadable manifest.
    pub fn contains(&self, name: &str) -> bool {
        let windows = self.windows.lock();
        windows.contains_key(name) || self.unreadable.lock().contains_key(name)
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
        if windows.contains_key(&w.name) || self.unreadable.lock().contains_key(&w.name) {
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

    /// Remove window `name` (an unreadable one too: its clear fields are returned).
    pub fn remove(&self, name: &str) -> Result<Window, CatalogError> {
        let mut windows = self.windows.lock();
        let mut unreadable = self.unreadable.lock();
        if !windows.contains_key(name) && !unreadable.contains_key(name) {
            return Err(CatalogError::Unknown(name.to_string()));
        }
        fs::remove_file(self.path(name))?;
        sync_dir(&self.dir)?;
        Ok(match windows.remove(name) {
            Some(w) => w,
            None => unreadable.remove(name).expect("checked").window,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn persist(&self, w: &Window) -> io::Result<()> {
        replace_file(&self.path(&w.name), &encode_manifest(w, &self.sealer))
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
    #[error("window {name:?} is unreadable: {reason}")]
    Unreadable { name: String, reason: BlobError },
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

    fn keyed(byte: u8) -> Sealer {
        use crate::store::seal::{ServerKey, KEY_LEN};
        Sealer::new(Some(ServerKey::from_bytes([byte; KEY_LEN])))
    }

    #[test]
    fn a_sealed_manifest_holds_no_tokens_and_opens_only_with_its_key_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = window("a");
        w.tokens = vec![123_456, 234_567, 345_678, 456_789];
        w.description = "the secret plan".into();
        Catalog::open(dir.path(), keyed(1))
            .unwrap()
            .insert(w.clone())
            .unwrap();
        let text = fs::read_to_string(dir.path().join("a.json")).unwrap();
        assert!(
            text.contains("\"sealed\"") && text.contains("\"version\": 2"),
            "{text}"
        );
        for secret in ["123456", "secret plan", "\"t\""] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(
            Catalog::open(dir.path(), keyed(1)).unwrap().get("a"),
            Some(w.clone())
        );
        // The sealed part moved under another window's name does not open.
        let moved = text.replace("\"name\": \"a\"", "\"name\": \"b\"");
        fs::write(dir.path().join("b.json"), moved).unwrap();
        let c = Catalog::open(dir.path(), keyed(1)).unwrap();
        assert!(matches!(c.find("b"), Err(CatalogError::Unreadable { .. })));
        c.remove("b").unwrap();
        // Another key, or none: unreadable, its name taken, its records still named.
        for other in [keyed(2), Sealer::default()] {
            let c = Catalog::open(dir.path(), other).unwrap();
            assert!(c.get("a").is_none() && c.contains("a"));
            let e = c.find("a").unwrap_err().to_string();
            assert!(e.contains("unreadable"), "{e}");
            assert!(matches!(c.insert(window("a")), Err(CatalogError::Taken(_))));
            assert_eq!(c.every_manifest()[0].data_keys(), w.data_keys());
            assert_eq!(c.unreadable().len(), 1);
        }
        // A plain (version 1) manifest is read by a server with a key.
        let plain = Catalog::open(&dir.path().join("p"), Sealer::default()).unwrap();
        plain.insert(w.clone()).unwrap();
        let c = Catalog::open(&dir.path().join("p"), keyed(1)).unwrap();
        assert_eq!(c.get("a"), Some(w));
        // Deleting an unreadable window removes its file.
        let c = Catalog::open(dir.path(), keyed(2)).unwrap();
        assert_eq!(c.remove("a").unwrap().name, "a");
        assert!(!dir.path().join("a.json").exists());
    }

    #[test]
    fn persists_across_reopen_and_skips_garbage() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Catalog::open(dir.path(), Sealer::default()).unwrap();
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
        let c = Catalog::open(dir.path(), Sealer::default()).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c.get("a").unwrap().last_thawed_at, Some(9));
        assert!(!dir.path().join("x.json.tmp").exists());
        let keys = c.get("a").unwrap().data_keys();
        assert_eq!(keys.len(), 2);
        assert_ne!(keys[0].kv_rank, keys[1].kv_rank);
    }
}
