//! Auto-save: a session (cache_salt) idle for a while after new chunks were stored has its
//! newest chain frozen as its auto-save window, replacing the previous one atomically
//! (`Windows::freeze_locked` with the window it replaces).
//!
//! - **On for whom**: every session when `--auto-save-idle-secs N` is above 0; a session's own
//!   setting (`session_autosave`: on or off, window name, idle seconds) wins. Own settings are
//!   persisted beside L2 (`<l2>/autosave.json`, replaced crash-safely), as the session index is.
//! - **Idle**: no store, engine-driven commit or thaw has touched any chain of the salt for the
//!   idle time (the session index's `updated`, newest chain of the salt over all models).
//! - **New chunks**: the salt's newest chain differs (model, world size, tokens) from the one
//!   last saved. After a restart, an auto-save window already holding that chain counts as
//!   saved, so a restart re-saves nothing. A chain a thaw installed is not new chunks (it is in
//!   a window already): a session thawed into is saved once it stores more.
//! - **Races**: a save runs under the windows' op lock, like freeze and delete. A delete of the
//!   auto-save window wins until the session stores new chunks: the chain it held counts as
//!   saved; a delete that lands before the save of a newer chain is followed by that save,
//!   which creates the window again. A thaw reads one version of the manifest, whole.
//! - **Names**: `default_name`. A name held by a window that is not this session's auto-save
//!   (frozen by hand, a clone, another session's) is never replaced: the save fails, counted.
//!
//! Runs on `cwm-autosave` (background priority, `serve`); the freeze's parallel work runs on
//! the background pool, never the foreground one.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::freeze::FreezeMeta;
use parking_lot::Mutex;

use super::catalog::Window;
use super::{
    validate_name, validate_session, AutoSaveRequest, AutoSaveSetting, FreezeReport, WindowError,
    Windows,
};
use crate::config::MAX_AUTO_SAVE_IDLE_SECS;
use crate::session::{Chain, SessionIndex};
pub use crate::status::AutoSaveStats;

/// The tag every auto-save window carries (`window_list {"tag": "autosave"}`).
pub const TAG: &str = "autosave";
/// Idle seconds of a session turned on by `session_autosave` while the server default is off.
pub const DEFAULT_IDLE_SECS: u64 = 60;
/// Sessions that may have a setting of their own.
pub const MAX_OWN_SETTINGS: usize = crate::session::MAX_SESSIONS;
const FILE: &str = "autosave.json";
const FORMAT: &str = "cwm-autosave";
const VERSION: u32 = 1;
/// A failed save of the same chain is tried again after this long (or at once after new chunks).
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// Longest failure text kept for `/status`.
const MAX_FAILURE_TEXT: usize = 512;

/// The auto-save window name of `salt` when none was set: `autosave-<salt>` when that is a
/// window name (the salt is 1 to 55 of A-Z a-z 0-9 _ . -), else `autosave.` and 16 hex digits
/// of the salt's blake3 hash (the empty salt too). The two forms never collide.
pub fn default_name(salt: &str) -> String {
    let plain = format!("autosave-{salt}");
    if !salt.is_empty() && validate_name(&plain).is_ok() {
        plain
    } else {
        format!("autosave.{}", &blake3::hash(salt.as_bytes()).to_hex()[..16])
    }
}

/// A session's own setting, as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Own {
    enabled: bool,
    #[serde(default)]
    window_name: Option<String>,
    #[serde(default)]
    idle_secs: Option<u64>,
}

/// `<l2>/autosave.json`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsFile {
    format: String,
    version: u32,
    sessions: BTreeMap<String, Own>,
}

/// The chain a session's last save froze (or tried to), and when.
struct Done {
    chain: Chain,
    /// Saved, or skipped: not tried again until the session has a new newest chain.
    settled: bool,
    at: std::time::Instant,
}

fn same_chain(a: &Chain, b: &Chain) -> bool {
    a.model == b.model && a.world_size == b.world_size && a.tokens == b.tokens
}

/// Whether `w` is an auto-save of session `salt` (frozen by it, not a clone), which a save may
/// replace.
fn is_autosave_of(w: &Window, salt: &str) -> bool {
    w.tags.iter().any(|t| t == TAG) && w.source_session == salt && w.cloned_from.is_none()
}

/// Whether `w` is `setting`'s auto-save holding `chain` already.
fn holds(w: &Window, setting: &AutoSaveSetting, chain: &Chain) -> bool {
    is_autosave_of(w, &setting.session_id)
        && w.model == *chain.model
        && w.world_size == chain.world_size
        && w.tokens[..] == chain.tokens[..]
}

/// How a save of a session's chain ended.
enum Outcome {
    Saved,
    /// Nothing of the chain was cached any more.
    Skipped,
    Failed(String),
}

/// Auto-save's settings, what it did per session, and its counts.
pub struct AutoSave {
    /// Idle seconds of every session without its own setting; 0: off.
    default_idle_secs: u64,
    own: Mutex<BTreeMap<String, Own>>,
    /// Where own settings are persisted (none without L2).
    path: Option<PathBuf>,
    done: Mutex<HashMap<String, Done>>,
    saves: AtomicU64,
    skipped: AtomicU64,
    failures: AtomicU64,
    last_failure: Mutex<Option<String>>,
}

impl AutoSave {
    /// Settings persisted in `dir` (when given) and the server default.
    pub(super) fn open(default_idle_secs: u64, dir: Option<&Path>) -> AutoSave {
        let path = dir.map(|d| d.join(FILE));
        let own = path.as_deref().map(read_settings).unwrap_or_default();
        if !own.is_empty() {
            tracing::info!(
                sessions = own.len(),
                "auto-save settings of sessions loaded"
            );
        }
        AutoSave {
            default_idle_secs,
            own: Mutex::new(own),
            path,
            done: Mutex::new(HashMap::new()),
            saves: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_failure: Mutex::new(None),
        }
    }

    /// Whether any session may be auto-saved (the server default or a session's own "on").
    fn active(&self) -> bool {
        self.default_idle_secs > 0 || self.own.lock().values().any(|o| o.enabled)
    }

    /// What applies to `salt`.
    pub fn setting(&self, salt: &str) -> AutoSaveSetting {
        let own = self.own.lock().get(salt).cloned();
        let idle = |own: Option<u64>| {
            own.unwrap_or(match self.default_idle_secs {
                0 => DEFAULT_IDLE_SECS,
                n => n,
            })
        };
        AutoSaveSetting {
            session_id: salt.to_string(),
            enabled: own
                .as_ref()
                .map_or(self.default_idle_secs > 0, |o| o.enabled),
            window_name: own
                .as_ref()
                .and_then(|o| o.window_name.clone())
                .unwrap_or_else(|| default_name(salt)),
            idle_secs: idle(own.as_ref().and_then(|o| o.idle_secs)),
            own_setting: own.is_some(),
        }
    }

    /// Give `req.session_id` its own setting, persisted before it applies. Bad input changes
    /// nothing.
    pub(super) fn set(&self, req: &AutoSaveRequest) -> Result<AutoSaveSetting, WindowError> {
        validate_session(&req.session_id)?;
        if let Some(name) = &req.window_name {
            validate_name(name)?;
        }
        if let Some(idle) = req.idle_secs {
            if !(1..=MAX_AUTO_SAVE_IDLE_SECS).contains(&idle) {
                return Err(WindowError::InvalidArgument(
                    "idle_secs",
                    format!("{idle}: 1 to {MAX_AUTO_SAVE_IDLE_SECS} seconds"),
                ));
            }
        }
        let path = self.path.as_deref().ok_or(WindowError::NoDisk)?;
        let mut own = self.own.lock();
        if !own.contains_key(&req.session_id) && own.len() >= MAX_OWN_SETTINGS {
            return Err(WindowError::InvalidArgument(
                "session_id",
                format!("{MAX_OWN_SETTINGS} sessions have their own auto-save setting already"),
            ));
        }
        let mut next = own.clone();
        next.insert(
            req.session_id.clone(),
            Own {
                enabled: req.enabled,
                window_name: req.window_name.clone(),
                idle_secs: req.idle_secs,
            },
        );
        write_settings(path, &next)?;
        *own = next;
        drop(own);
        let setting = self.setting(&req.session_id);
        tracing::info!(
            session = setting.session_id,
            enabled = setting.enabled,
            window = setting.window_name,
            idle_secs = setting.idle_secs,
            "auto-save setting of a session changed"
        );
        Ok(setting)
    }

    /// Whether `chain`, the newest of its session, should be saved now under `setting`:
    /// enabled, idle long enough, and not the chain last saved (or last failed, recently).
    fn due(&self, setting: &AutoSaveSetting, chain: &Chain, now: SystemTime) -> bool {
        if !setting.enabled {
            return false;
        }
        let idle = now.duration_since(chain.updated).unwrap_or_default();
        if idle < Duration::from_secs(setting.idle_secs) {
            return false;
        }
        match self.done.lock().get(&setting.session_id) {
            Some(d) if same_chain(&d.chain, chain) => !d.settled && d.at.elapsed() >= RETRY_AFTER,
            _ => true,
        }
    }

    fn record(&self, salt: &str, chain: Chain, outcome: Outcome) {
        match &outcome {
            Outcome::Saved => self.saves.fetch_add(1, Relaxed),
            Outcome::Skipped => self.skipped.fetch_add(1, Relaxed),
            Outcome::Failed(e) => {
                let mut text = format!("session {salt:?}: {e}");
                let cut = (0..=MAX_FAILURE_TEXT.min(text.len()))
                    .rev()
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(0);
                text.truncate(cut);
                *self.last_failure.lock() = Some(text);
                self.failures.fetch_add(1, Relaxed)
            }
        };
        self.remember(salt, chain, outcome);
    }

    /// What was last done for `salt`: a chain saved or skipped is not tried again; a failed
    /// one after `RETRY_AFTER`.
    fn remember(&self, salt: &str, chain: Chain, outcome: Outcome) {
        let mut done = self.done.lock();
        if done.len() >= MAX_OWN_SETTINGS && !done.contains_key(salt) {
            // Bounded like the session index: forgetting only costs a save that finds the
            // window already holds its chain.
            done.clear();
        }
        done.insert(
            salt.to_string(),
            Done {
                chain,
                settled: !matches!(outcome, Outcome::Failed(_)),
                at: std::time::Instant::now(),
            },
        );
    }

    /// A thaw installed `tokens` of `model` under `salt`: when that is now the session's newest
    /// chain, it is no new chunks (it is in a window already), so it is not saved.
    pub(super) fn thawed(&self, chains: &SessionIndex, salt: &str, model: &str, tokens: &[u32]) {
        if let Some(c) = chains.newest(salt) {
            if *c.model == *model && c.tokens[..] == *tokens {
                self.remember(salt, c, Outcome::Saved);
            }
        }
    }

    pub fn stats(&self) -> AutoSaveStats {
        let own = self.own.lock();
        AutoSaveStats {
            default_idle_secs: self.default_idle_secs,
            sessions_on: own.values().filter(|o| o.enabled).count(),
            sessions_off: own.values().filter(|o| !o.enabled).count(),
            saves: self.saves.load(Relaxed),
            skipped: self.skipped.load(Relaxed),
            failures: self.failures.load(Relaxed),
            last_failure: self.last_failure.lock().clone(),
        }
    }
}

fn read_settings(path: &Path) -> BTreeMap<String, Own> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(e) => {
            tracing::error!(path = %path.display(), "auto-save settings unreadable ({e}): none applied");
            return BTreeMap::new();
        }
    };
    let parsed = serde_json::from_slice::<SettingsFile>(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|f| {
            if f.format != FORMAT || f.version != VERSION {
                return Err(format!(
                    "format {} version {}, this build reads {FORMAT} version {VERSION}",
                    f.format, f.version
                ));
            }
            let bad = f.sessions.iter().find(|(salt, o)| {
                validate_session(salt).is_err()
                    || o.window_name
                        .as_deref()
                        .is_some_and(|n| validate_name(n).is_err())
                    || o.idle_secs
                        .is_some_and(|i| !(1..=MAX_AUTO_SAVE_IDLE_SECS).contains(&i))
            });
            match bad {
                Some((salt, _)) => Err(format!("session {salt:?}: invalid setting")),
                None => Ok(f.sessions),
            }
        });
    parsed.unwrap_or_else(|e| {
        tracing::error!(path = %path.display(), "auto-save settings skipped: {e}");
        BTreeMap::new()
    })
}

/// Replace the settings file crash-safely (as a window manifest).
fn write_settings(path: &Path, own: &BTreeMap<String, Own>) -> std::io::Result<()> {
    let file = SettingsFile {
        format: FORMAT.into(),
        version: VERSION,
        sessions: own.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    super::catalog::replace_file(path, &bytes)
}

impl Windows {
    /// Set a session's own auto-save (`session_autosave`).
    pub fn set_autosave(&self, req: &AutoSaveRequest) -> Result<AutoSaveSetting, WindowError> {
        self.disk()?;
        self.autosave.set(req)
    }

    /// Save every session that is due now (`cwm-autosave` calls this every few hundred ms).
    /// Returns how many saves were tried.
    pub fn autosave_tick(&self) -> usize {
        if self.catalog.is_none() || !self.autosave.active() {
            return 0;
        }
        let now = SystemTime::now();
        let mut tried = 0;
        for chain in self.cwm.chains.newest_per_salt() {
            let setting = self.autosave.setting(&chain.cache_salt);
            if self.autosave.due(&setting, &chain, now) {
                tried += 1;
                self.autosave_session(&setting, chain);
            }
        }
        tried
    }

    /// Freeze `chain` as `setting`'s window, replacing its previous auto-save.
    fn autosave_session(&self, setting: &AutoSaveSetting, chain: Chain) {
        let (salt, name) = (&setting.session_id, &setting.window_name);
        // Saved before a restart: known without the op lock (or a round trip to the fleet).
        if self.get(name).is_some_and(|w| holds(&w, setting, &chain)) {
            return self.autosave.remember(salt, chain, Outcome::Saved);
        }
        let result = crate::background::pool().install(|| self.save_replacing(setting, &chain));
        let outcome = match result {
            Ok(Some(r)) => {
                tracing::info!(
                    "auto-saved session {salt:?} as window {name:?}: {} tokens, {} chunks, in {:.0} ms",
                    r.window.tokens,
                    r.window.chunks,
                    r.elapsed_ms
                );
                Outcome::Saved
            }
            Ok(None) => return self.autosave.remember(salt, chain, Outcome::Saved),
            // Its chunks left every tier: nothing to save until the session stores more.
            Err(WindowError::NothingStored(_)) => {
                tracing::debug!("auto-save of session {salt:?}: no chunk of it is cached");
                Outcome::Skipped
            }
            Err(e) => {
                tracing::warn!("auto-save of session {salt:?} as window {name:?} failed: {e}");
                Outcome::Failed(e.to_string())
            }
        };
        self.autosave.record(salt, chain, outcome);
    }

    /// Under the op lock: the window named by `setting` replaced by `chain` frozen, or created.
    /// None when it already holds `chain`.
    fn save_replacing(
        &self,
        setting: &AutoSaveSetting,
        chain: &Chain,
    ) -> Result<Option<FreezeReport>, WindowError> {
        let (_, catalog) = self.disk()?;
        let _serial = self.op_lock.lock();
        self.sync_locked();
        let name = &setting.window_name;
        let existing = catalog.get(name);
        if let Some(w) = &existing {
            if !is_autosave_of(w, &setting.session_id) {
                return Err(WindowError::Taken(name.clone()));
            }
            if holds(w, setting, chain) {
                return Ok(None);
            }
        }
        let meta = FreezeMeta {
            name: name.clone(),
            session: setting.session_id.clone(),
            description: format!("auto-save of session {:?}", setting.session_id),
            tags: vec![TAG.to_string()],
        };
        self.freeze_locked(chain, meta, existing).map(Some)
    }

    pub fn autosave_stats(&self) -> AutoSaveStats {
        self.autosave.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_window_names_and_never_collide() {
        assert_eq!(default_name("chat-42"), "autosave-chat-42");
        let long = "x".repeat(56);
        for salt in ["", "a b", "é", long.as_str(), "a.b_c-d"] {
            let n = default_name(salt);
            validate_name(&n).unwrap();
        }
        assert!(default_name("").starts_with("autosave."));
        assert!(default_name(&long).starts_with("autosave."));
        assert_ne!(default_name(""), default_name("a b"));
        assert_eq!(default_name(&"y".repeat(55)).len(), 64);
    }

    #[test]
    fn settings_persist_and_bad_input_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = AutoSave::open(0, Some(dir.path()));
        assert!(!a.active());
        let off = a.setting("s");
        assert!(!off.enabled && !off.own_setting);
        assert_eq!(off.idle_secs, DEFAULT_IDLE_SECS);
        let req = |enabled, name: Option<&str>, idle| AutoSaveRequest {
            session_id: "s".into(),
            enabled,
            window_name: name.map(Into::into),
            idle_secs: idle,
        };
        let on = a.set(&req(true, Some("mine"), Some(5))).unwrap();
        assert_eq!(
            (on.enabled, on.window_name.as_str(), on.idle_secs),
            (true, "mine", 5)
        );
        assert!(a.active());
        for bad in [req(false, Some("a b"), None), req(false, None, Some(0))] {
            assert!(a.set(&bad).is_err());
        }
        assert!(a
            .set(&AutoSaveRequest {
                session_id: "a/b".into(),
                ..req(true, None, None)
            })
            .is_err());
        assert_eq!(a.setting("s"), on, "refused settings change nothing");
        let again = AutoSave::open(7, Some(dir.path()));
        assert_eq!(again.setting("s"), on, "persisted");
        let other = again.setting("t");
        assert!(other.enabled && other.idle_secs == 7 && !other.own_setting);
        assert_eq!(other.window_name, "autosave-t");
        assert!(AutoSave::open(0, None).set(&req(true, None, None)).is_err());
    }
}
