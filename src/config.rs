//! One `Config`: embedded defaults < TOML file (`--config` / `CWM_CONFIG`) < `CWM_*` environment
//! variables < command-line flags. Validated once, before anything starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::store::codec::CompressionPolicy;
use crate::store::disk::{DiskConfig, FsyncPolicy};
use crate::store::l3::config::{Endpoints, L3Config, WritePolicy};
use crate::store::populate::L1Populate;
use crate::store::quota::QuotaTier;
use crate::store::seal::{KeyFileError, Sealer, ServerKey};
use crate::store::tiered::{L1Memory, L2Config, TiersConfig};
use crate::store::L1Config;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Interface of the MP (ZMQ) server. `localhost` means 127.0.0.1.
    pub host: String,
    /// Port of the MP (ZMQ) server; vLLM's default is 5555.
    pub port: u16,
    /// Tokens per stored chunk; every server of a deployment must agree with vLLM's connector.
    pub chunk_size: usize,
    /// L1 memory budget in GiB.
    pub l1_size_gb: f64,
    /// When L1's pages are committed: `eager` (in the background, ahead of use, so stores
    /// take no page faults) or `lazy` (by the first store that touches them).
    pub l1_populate: L1Populate,
    /// L1 eviction policy. Only `LRU`.
    pub eviction_policy: String,
    /// Chunk hash algorithm. Only `blake3` (vLLM's default).
    pub hash_algorithm: String,
    /// Read locks taken by a lookup lapse after this many seconds if never released.
    pub lock_ttl_secs: u64,
    /// Idle request sessions are dropped after this many seconds.
    pub session_ttl_secs: u64,
    /// A registered worker silent this long after it pinged is unregistered.
    pub worker_reap_timeout_secs: u64,
    /// A registered worker that never pinged is unregistered after this long.
    pub worker_registration_grace_secs: u64,
    /// Threads running store/retrieve copies' requests (each copy also fans out across cores).
    pub transfer_lanes: usize,
    /// Serve vLLM's engine-driven transfer mode (its default on CPU): L1 lives in a POSIX
    /// shared-memory pool that engines map and copy into and out of themselves.
    pub engine_driven: bool,
    /// Name of that pool in /dev/shm (LMCache's `--shm-name`); default `cwm_l1_<pid>_<n>`.
    pub shm_name: Option<String>,
    /// An engine-driven prepare not committed within this many seconds is released.
    pub engine_driven_ttl_secs: u64,
    /// On SIGTERM/SIGINT, how long the write-behind queues of L2 and L3 may take to drain
    /// before cwm exits anyway (what is left is logged; a second signal exits at once).
    pub drain_timeout_secs: u64,
    /// Auto-save: a session (cache_salt) idle this many seconds after new chunks were stored
    /// has its newest chain frozen as its auto-save window (`autosave-<salt>`), replacing the
    /// previous one. 0: off for every session unless `session_autosave` turns it on.
    pub auto_save_idle_secs: u64,
    /// Directory of the L2 disk tier.
    pub l2_path: PathBuf,
    /// L2 disk budget in GiB; 0 turns the disk tier off.
    pub l2_size_gb: f64,
    /// Size of one L2 segment file in MiB.
    pub l2_segment_mb: u64,
    /// `zstd` or `none`.
    pub l2_compression: String,
    /// zstd level for L2 records.
    pub l2_compression_level: i32,
    /// `always`, `interval` or `never`.
    pub l2_fsync: String,
    /// Interval of the `interval` fsync policy, in milliseconds.
    pub l2_fsync_interval_ms: u64,
    /// Bytes of L1 objects that may wait for L2 before write-behind drops work, in MiB.
    pub l2_write_queue_mb: u64,
    /// Port of LMCache's classic remote-server protocol (`remote_url: "lm://host:port"`) on
    /// `host`; off unless set; 0 picks one.
    pub lm_port: Option<u16>,
    /// Port of the HTTP server (MCP at /mcp, /metrics, /status, ...) on `host`; 0 picks one.
    pub http_port: u16,
    /// Bearer token every HTTP route but /healthcheck requires (MCP included). Required when
    /// `host` is beyond loopback; optional on loopback.
    pub http_token: Option<String>,
    /// L3: one Redis, `redis://[user[:password]@]host:port[/db]` (`rediss://` for TLS). The
    /// password may instead come from `CWM_L3_PASSWORD`; it is never logged or shown.
    pub l3_url: Option<String>,
    /// L3: the seed nodes of a Redis Cluster, comma-separated URLs (instead of `l3_url`).
    pub l3_cluster: Option<String>,
    /// Prefix of every L3 key; sidecars sharing chunks and windows use the same one.
    pub l3_namespace: String,
    /// Which chunks write-behind pushes to L3: `always`, `frozen` (windows only) or `never`.
    pub l3_write: String,
    /// Deadline of one L3 operation (a batch of checks, reads or writes), in milliseconds.
    pub l3_timeout_ms: u64,
    /// Connections per Redis node.
    pub l3_connections: usize,
    /// TTL of cache chunks in L3, in seconds (window chunks have none).
    pub l3_ttl_secs: u64,
    /// MiB of stored objects that may wait for L3 before write-behind drops work.
    pub l3_write_queue_mb: u64,
    /// PEM file of the CA that signed the Redis servers' TLS certificates.
    pub l3_tls_ca: Option<PathBuf>,
    /// GiB of L1 each cache_salt may occupy unless `PUT /quota/{salt}` gave it its own limit;
    /// 0: no limit.
    pub l1_quota_gb_per_salt: f64,
    /// The same for L2 (`"tier": "l2"`): bytes of its records on disk, frozen windows included.
    pub l2_quota_gb_per_salt: f64,
    /// The same for L3 (`"tier": "l3"`): bytes this sidecar wrote to Redis for the salt.
    pub l3_quota_gb_per_salt: f64,
    /// Encryption at rest: a file of 64 hex digits (32 random bytes), readable by its owner
    /// only. Records written to L2, L3 and window exports are then sealed with a key derived
    /// per cache_salt from it (docs/FORMATS.md, version 2). Off unless set.
    pub encryption_key_file: Option<PathBuf>,
}

/// The longest idle time an auto-save may wait for (`auto_save_idle_secs`, `session_autosave`).
pub const MAX_AUTO_SAVE_IDLE_SECS: u64 = 7 * 24 * 3600;

/// The platform's state directory for cwm's data: systemd's `$STATE_DIRECTORY` when run as a
/// service (`StateDirectory=cwm`: `/var/lib/cwm`), else `$XDG_STATE_HOME/cwm`, else
/// `~/.local/state/cwm`, else `/var/lib/cwm`. Never the working directory: a run from a source
/// tree must not leave gigabytes in the checkout.
pub fn default_l2_path() -> PathBuf {
    state_dir(|name| std::env::var_os(name).filter(|v| !v.is_empty()))
}

fn state_dir(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    // systemd may list several directories, ':'-separated; the first is ours.
    if let Some(dirs) = var("STATE_DIRECTORY") {
        if let Some(first) = dirs.to_string_lossy().split(':').find(|d| !d.is_empty()) {
            return PathBuf::from(first);
        }
    }
    let absolute = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    if let Some(state) = var("XDG_STATE_HOME").and_then(absolute) {
        return state.join("cwm");
    }
    if let Some(home) = var("HOME").and_then(absolute) {
        return home.join(".local/state/cwm");
    }
    PathBuf::from("/var/lib/cwm")
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "localhost".into(),
            port: 5555,
            chunk_size: 256,
            l1_size_gb: 8.0,
            l1_populate: L1Populate::Eager,
            eviction_policy: "LRU".into(),
            hash_algorithm: "blake3".into(),
            lock_ttl_secs: 300,
            session_ttl_secs: 600,
            worker_reap_timeout_secs: 120,
            worker_registration_grace_secs: 3600,
            transfer_lanes: 4,
            engine_driven: true,
            shm_name: None,
            engine_driven_ttl_secs: 300,
            drain_timeout_secs: 30,
            auto_save_idle_secs: 0,
            l2_path: default_l2_path(),
            l2_size_gb: 32.0,
            l2_segment_mb: 256,
            l2_compression: "zstd".into(),
            l2_compression_level: 1,
            l2_fsync: "interval".into(),
            l2_fsync_interval_ms: 1000,
            l2_write_queue_mb: 1024,
            lm_port: None,
            http_port: 8080,
            http_token: None,
            l3_url: None,
            l3_cluster: None,
            l3_namespace: "cwm".into(),
            l3_write: "always".into(),
            l3_timeout_ms: 5000,
            l3_connections: 4,
            l3_ttl_secs: 86400,
            l1_quota_gb_per_salt: 0.0,
            l2_quota_gb_per_salt: 0.0,
            l3_quota_gb_per_salt: 0.0,
            l3_write_queue_mb: 1024,
            l3_tls_ca: None,
            encryption_key_file: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("invalid setting {key} = {value}: {expected}")]
    Invalid {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(transparent)]
    EncryptionKey(#[from] KeyFileError),
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, value: &dyn std::fmt::Display, expected| {
            Err(ConfigError::Invalid {
                key,
                value: value.to_string(),
                expected,
            })
        };
        if self.chunk_size == 0 || self.chunk_size > 1 << 20 {
            return invalid(
                "chunk_size",
                &self.chunk_size,
                "a positive number of tokens (256 for vLLM)",
            );
        }
        if !(self.l1_size_gb > 0.0 && self.l1_size_gb.is_finite()) {
            return invalid("l1_size_gb", &self.l1_size_gb, "a positive number of GiB");
        }
        if !self.eviction_policy.eq_ignore_ascii_case("lru") {
            return invalid("eviction_policy", &self.eviction_policy, "LRU");
        }
        if self.hash_algorithm != "blake3" {
            return invalid(
                "hash_algorithm",
                &self.hash_algorithm,
                "blake3 (vLLM's default)",
            );
        }
        if self.transfer_lanes == 0 || self.transfer_lanes > 256 {
            return invalid("transfer_lanes", &self.transfer_lanes, "1..=256");
        }
        if !(self.l2_size_gb >= 0.0 && self.l2_size_gb.is_finite()) {
            return invalid(
                "l2_size_gb",
                &self.l2_size_gb,
                "a number of GiB, 0 to turn L2 off",
            );
        }
        if self.l2_segment_mb == 0 || self.l2_segment_mb > 64 * 1024 {
            return invalid("l2_segment_mb", &self.l2_segment_mb, "1..=65536 MiB");
        }
        if !matches!(self.l2_compression.as_str(), "zstd" | "none") {
            return invalid("l2_compression", &self.l2_compression, "zstd or none");
        }
        if !(-7..=22).contains(&self.l2_compression_level) {
            return invalid(
                "l2_compression_level",
                &self.l2_compression_level,
                "a zstd level, -7..=22",
            );
        }
        if !matches!(self.l2_fsync.as_str(), "always" | "interval" | "never") {
            return invalid("l2_fsync", &self.l2_fsync, "always, interval or never");
        }
        if self.lock_ttl_secs == 0 {
            return invalid("lock_ttl_secs", &self.lock_ttl_secs, "at least 1 second");
        }
        if self.engine_driven_ttl_secs == 0 {
            return invalid(
                "engine_driven_ttl_secs",
                &self.engine_driven_ttl_secs,
                "at least 1 second",
            );
        }
        if self.http_token.is_none() && !is_loopback_host(&self.host) {
            return invalid(
                "host",
                &self.host,
                "a loopback address (localhost, 127.0.0.1, ::1) unless http_token is set: the \
                 HTTP port (MCP, /cache/clear) is bound on the same interface and needs a bearer \
                 token beyond loopback (--http-token / CWM_HTTP_TOKEN)",
            );
        }
        if let Some(token) = &self.http_token {
            if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return invalid(
                    "http_token",
                    &"(not shown)",
                    "at least 16 printable ASCII characters without spaces",
                );
            }
        }
        if self.l3_url.is_some() && self.l3_cluster.is_some() {
            return invalid(
                "l3_cluster",
                &"(set together with l3_url)",
                "either l3_url (one Redis) or l3_cluster (seed nodes), not both",
            );
        }
        if WritePolicy::parse(&self.l3_write).is_none() {
            return invalid("l3_write", &self.l3_write, "always, frozen or never");
        }
        if self.l3_timeout_ms == 0 {
            return invalid("l3_timeout_ms", &self.l3_timeout_ms, "at least 1 ms");
        }
        if !(1..=64).contains(&self.l3_connections) {
            return invalid("l3_connections", &self.l3_connections, "1..=64");
        }
        for (field, gb) in self.quota_defaults_gb() {
            if !(gb.is_finite() && gb >= 0.0) {
                return invalid(field, &gb, "a number of GiB >= 0 (0: no limit)");
            }
        }
        if self.auto_save_idle_secs > MAX_AUTO_SAVE_IDLE_SECS {
            return invalid(
                "auto_save_idle_secs",
                &self.auto_save_idle_secs,
                "0 (off) to 604800 seconds (a week)",
            );
        }
        if self.auto_save_idle_secs > 0 && !self.l2_enabled() {
            return invalid(
                "auto_save_idle_secs",
                &self.auto_save_idle_secs,
                "0 (off) without L2: auto-saves are windows, which need the L2 disk tier \
                 (l2_size_gb above 0)",
            );
        }
        if self.l3_ttl_secs == 0 {
            return invalid("l3_ttl_secs", &self.l3_ttl_secs, "at least 1 second");
        }
        if let Some(l3) = self.l3_config(None) {
            if let Err(e) = l3.validate() {
                return invalid("l3", &e, "a valid L3 setting");
            }
        }
        if let Some(name) = &self.shm_name {
            let bare = name.strip_prefix('/').unwrap_or(name);
            if bare.is_empty() || bare.len() > 255 || bare.contains(['/', '\0']) {
                return invalid(
                    "shm_name",
                    name,
                    "a POSIX shm name: non-empty, at most 255 bytes, no '/' after the first, no NUL",
                );
            }
        }
        Ok(())
    }

    pub fn l1_bytes(&self) -> u64 {
        (self.l1_size_gb * (1u64 << 30) as f64) as u64
    }

    pub fn l2_enabled(&self) -> bool {
        self.l2_size_gb > 0.0
    }

    pub fn l2_disk_config(&self) -> DiskConfig {
        DiskConfig {
            capacity_bytes: (self.l2_size_gb * (1u64 << 30) as f64) as u64,
            segment_bytes: self.l2_segment_mb << 20,
            fsync: match self.l2_fsync.as_str() {
                "always" => FsyncPolicy::Always,
                "never" => FsyncPolicy::Never,
                _ => FsyncPolicy::Interval(Duration::from_millis(self.l2_fsync_interval_ms)),
            },
            compression: self.l2_compression_policy(),
        }
    }

    pub fn l2_compression_policy(&self) -> CompressionPolicy {
        CompressionPolicy {
            enabled: self.l2_compression == "zstd",
            level: self.l2_compression_level,
        }
    }

    /// The L3 settings, when L3 is configured. `password` (from `CWM_L3_PASSWORD`) overrides
    /// the URLs' own.
    pub fn l3_config(&self, password: Option<String>) -> Option<L3Config> {
        let endpoints = match (&self.l3_url, &self.l3_cluster) {
            (Some(url), _) => Endpoints::Single(url.clone()),
            (None, Some(seeds)) => Endpoints::Cluster(
                seeds
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            ),
            (None, None) => return None,
        };
        Some(L3Config {
            endpoints,
            password,
            tls_ca: self.l3_tls_ca.clone(),
            namespace: self.l3_namespace.clone(),
            write: WritePolicy::parse(&self.l3_write).unwrap_or(WritePolicy::Always),
            timeout: Duration::from_millis(self.l3_timeout_ms),
            connections: self.l3_connections,
            ttl: Duration::from_secs(self.l3_ttl_secs),
            // `Tiers::open` gives L3 the tiers' sealer and quotas.
            sealer: Sealer::default(),
            quotas: Default::default(),
        })
    }

    /// The sealer of every record behind L1: with the key of `encryption_key_file` (read and
    /// checked here), else one that writes plain records.
    pub fn sealer(&self) -> Result<Sealer, KeyFileError> {
        let key = match &self.encryption_key_file {
            Some(path) => Some(ServerKey::load(path)?),
            None => None,
        };
        Ok(Sealer::new(key))
    }

    /// The per-salt quota defaults of L1, L2 and L3, in that order, with their fields' names.
    fn quota_defaults_gb(&self) -> [(&'static str, f64); 3] {
        [
            ("l1_quota_gb_per_salt", self.l1_quota_gb_per_salt),
            ("l2_quota_gb_per_salt", self.l2_quota_gb_per_salt),
            ("l3_quota_gb_per_salt", self.l3_quota_gb_per_salt),
        ]
    }

    /// What the tiers are built from (`Tiers::open`); reads the encryption key file.
    pub fn tiers_config(&self) -> Result<TiersConfig, ConfigError> {
        Ok(TiersConfig {
            l1: L1Config {
                capacity_bytes: self.l1_bytes(),
                lock_ttl: self.lock_ttl(),
            },
            l1_memory: if self.engine_driven {
                L1Memory::Shared(self.shm_name.clone())
            } else {
                L1Memory::Private
            },
            adopt_pool: None,
            l1_populate: self.l1_populate,
            quota_per_salt: QuotaTier::ALL
                .into_iter()
                .zip(self.quota_defaults_gb())
                .filter_map(|(tier, (_, gb))| {
                    crate::store::quota::gb_to_bytes(gb)
                        .filter(|&b| b > 0)
                        .map(|b| (tier, b))
                })
                .collect(),
            l2: self.l2_enabled().then(|| L2Config {
                path: self.l2_path.clone(),
                disk: self.l2_disk_config(),
            }),
            l3: self.l3_config(
                std::env::var("CWM_L3_PASSWORD")
                    .ok()
                    .filter(|p| !p.is_empty()),
            ),
            write_queue_bytes: self.write_queue_mb() << 20,
            sealer: self.sealer()?,
        })
    }

    /// The one write-behind queue feeds every tier behind L1: it may hold the larger of the
    /// configured tiers' allowances.
    fn write_queue_mb(&self) -> u64 {
        let l3 = self.l3_url.is_some() || self.l3_cluster.is_some();
        [
            self.l2_enabled().then_some(self.l2_write_queue_mb),
            l3.then_some(self.l3_write_queue_mb),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(self.l2_write_queue_mb)
    }

    pub fn lock_ttl(&self) -> Duration {
        Duration::from_secs(self.lock_ttl_secs)
    }

    pub fn engine_driven_ttl(&self) -> Duration {
        Duration::from_secs(self.engine_driven_ttl_secs)
    }
}

/// `localhost` or a loopback IP literal (the only hosts that need no HTTP token).
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cwm.toml");
        std::fs::write(&path, "port = 6000\nl1_size_gb = 1.5\n").unwrap();
        let c = Config::from_file(&path).unwrap();
        assert_eq!((c.port, c.l1_size_gb, c.chunk_size), (6000, 1.5, 256));
        std::fs::write(&path, "prot = 6000\n").unwrap();
        let e = Config::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("prot"), "{e}");
    }

    #[test]
    fn validation_names_the_bad_value() {
        let mut c = Config::default();
        c.validate().unwrap();
        c.eviction_policy = "ARC".into();
        assert!(c.validate().unwrap_err().to_string().contains("ARC"));
        c = Config {
            hash_algorithm: "sha256_cbor".into(),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        c = Config {
            l1_size_gb: 0.0,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        c = Config {
            shm_name: Some("/a/b".into()),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("/a/b"));
        c.shm_name = Some("/cwm_pool".into());
        c.validate().unwrap();
    }

    #[test]
    fn auto_save_is_off_by_default_set_in_the_file_and_needs_l2() {
        assert_eq!(Config::default().auto_save_idle_secs, 0);
        let c: Config = toml::from_str("auto_save_idle_secs = 30").unwrap();
        assert_eq!(c.auto_save_idle_secs, 30);
        c.validate().unwrap();
        let week = Config {
            auto_save_idle_secs: MAX_AUTO_SAVE_IDLE_SECS + 1,
            ..c.clone()
        };
        assert!(week
            .validate()
            .unwrap_err()
            .to_string()
            .contains("auto_save_idle_secs"));
        let no_l2 = Config {
            l2_size_gb: 0.0,
            ..c
        };
        assert!(no_l2.validate().unwrap_err().to_string().contains("L2"));
    }

    /// The default data directory is the platform's state directory, never the working
    /// directory (before: `./cwm-data`, which filled source checkouts).
    #[test]
    fn the_default_l2_path_is_the_state_directory() {
        assert!(Config::default().l2_path.is_absolute());
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        assert_eq!(
            state_dir(env(&[("XDG_STATE_HOME", "/s"), ("HOME", "/h")])),
            PathBuf::from("/s/cwm")
        );
        assert_eq!(
            state_dir(env(&[("XDG_STATE_HOME", "rel"), ("HOME", "/h")])),
            PathBuf::from("/h/.local/state/cwm"),
            "a relative XDG_STATE_HOME is ignored, as the spec says"
        );
        assert_eq!(
            state_dir(env(&[
                ("STATE_DIRECTORY", "/var/lib/cwm:/x"),
                ("HOME", "/h")
            ])),
            PathBuf::from("/var/lib/cwm")
        );
        assert_eq!(state_dir(env(&[])), PathBuf::from("/var/lib/cwm"));
    }

    #[test]
    fn l3_settings_are_checked_and_the_password_never_shows() {
        let mut c = Config::default();
        assert!(c.l3_config(None).is_none(), "no L3 unless configured");
        c.l3_url = Some("redis://cwm:hunter2@127.0.0.1:6379".into());
        c.validate().unwrap();
        c.l3_write = "sometimes".into();
        assert!(c.validate().unwrap_err().to_string().contains("sometimes"));
        c.l3_write = "frozen".into();
        c.l3_cluster = Some("redis://127.0.0.1:7000".into());
        assert!(c.validate().is_err(), "both l3_url and l3_cluster");
        c.l3_url = None;
        c.l3_cluster = Some("redis://a:1, redis://u:hunter2@b:2,".into());
        let l3 = c.l3_config(Some("pw2".into())).unwrap();
        assert_eq!(
            l3.endpoints_redacted(),
            ["redis://a:1", "redis://u:***@b:2"]
        );
        assert_eq!(l3.write, WritePolicy::Frozen);
        c.l3_cluster = Some("http://u:hunter2@b:2".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn engine_driven_is_on_by_default_and_can_be_turned_off_in_the_file() {
        assert!(Config::default().engine_driven);
        let c: Config = toml::from_str("engine_driven = false\nshm_name = \"pool\"\n").unwrap();
        assert!(!c.engine_driven);
        assert_eq!(c.shm_name.as_deref(), Some("pool"));
    }
}
