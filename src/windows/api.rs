//! The requests and reports of the window operations (the JSON schemas of the MCP tools).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::catalog::{Unreadable, Window};

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
    /// Set when the window's manifest is sealed and does not open with this server's key
    /// (or it has none): why. Such a window cannot be thawed, cloned or exported here (its
    /// description and tags are sealed too); it can be deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

impl From<&Unreadable> for WindowSummary {
    fn from(u: &Unreadable) -> Self {
        let w = &u.window;
        WindowSummary {
            tokens: w.chunks() * w.chunk_size,
            unreadable: Some(u.reason.to_string()),
            ..WindowSummary::from(w)
        }
    }
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
            unreadable: None,
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
    /// Whether `window_freeze` would keep anything of this chain now (some leading chunk is
    /// cached) and fit the session's durable quotas.
    pub freezable: bool,
    /// Why a freeze of it would be refused for the session's quota (L2, L3), if it would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_quota: Option<String>,
    /// Where each of its chunks is, in order (on every rank).
    pub chunk_tiers: Vec<ChunkTiers>,
    /// Unix seconds.
    pub updated_at: u64,
}

/// Where one chunk of a chain is held, on every rank of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ChunkTiers {
    pub l1: bool,
    pub l2: bool,
    /// In Redis (probed in one batch); none without L3 or while it is unreachable. A freeze
    /// keeps only chunks in L1 or L2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l3: Option<bool>,
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

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AutoSaveRequest {
    /// The session (cache_salt) whose auto-save is set.
    pub session_id: String,
    /// Auto-save this session (true) or never (false), whatever `--auto-save-idle-secs` says.
    pub enabled: bool,
    /// Name of its auto-save window; default `autosave-<session_id>` (see the README).
    #[serde(default)]
    pub window_name: Option<String>,
    /// Idle seconds before a save (1 to 604800); default `--auto-save-idle-secs`, else 60.
    #[serde(default)]
    pub idle_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AutoSaveSetting {
    pub session_id: String,
    /// Whether the session is auto-saved.
    pub enabled: bool,
    /// The window its auto-save replaces.
    pub window_name: String,
    /// Seconds the session must be idle after new chunks before a save.
    pub idle_secs: u64,
    /// The session has its own setting (`session_autosave`), else the server's default applies.
    pub own_setting: bool,
}
