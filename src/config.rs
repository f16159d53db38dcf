//! One `Config`: embedded defaults < TOML file (`--config` / `CWM_CONFIG`) < `CWM_*` environment
//! variables < command-line flags. Validated once, before anything starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::store::codec::CompressionPolicy;
use crate::store::disk::{DiskConfig, FsyncPolicy};
use crate::store::populate::L1Populate;
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
    /// Port of the HTTP server (MCP at /mcp, /metrics, /status, ...) on `host`; 0 picks one.
    pub http_port: u16,
}

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
            l2_path: default_l2_path(),
            l2_size_gb: 32.0,
            l2_segment_mb: 256,
            l2_compression: "zstd".into(),
            l2_compression_level: 1,
            l2_fsync: "interval".into(),
            l2_fsync_interval_ms: 1000,
            l2_write_queue_mb: 1024,
            http_port: 8080,
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

    /// What the tiers are built from (`Tiers::open`).
    pub fn tiers_config(&self) -> TiersConfig {
        TiersConfig {
            l1: L1Config {
                capacity_bytes: self.l1_bytes(),
                lock_ttl: self.lock_ttl(),
            },
            l1_memory: if self.engine_driven {
                L1Memory::Shared(self.shm_name.clone())
            } else {
                L1Memory::Private
            },
            l1_populate: self.l1_populate,
            l2: self.l2_enabled().then(|| L2Config {
                path: self.l2_path.clone(),
                disk: self.l2_disk_config(),
            }),
            write_queue_bytes: self.l2_write_queue_mb << 20,
        }
    }

    pub fn lock_ttl(&self) -> Duration {
        Duration::from_secs(self.lock_ttl_secs)
    }

    pub fn engine_driven_ttl(&self) -> Duration {
        Duration::from_secs(self.engine_driven_ttl_secs)
    }
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
    fn engine_driven_is_on_by_default_and_can_be_turned_off_in_the_file() {
        assert!(Config::default().engine_driven);
        let c: Config = toml::from_str("engine_driven = false\nshm_name = \"pool\"\n").unwrap();
        assert!(!c.engine_driven);
        assert_eq!(c.shm_name.as_deref(), Some("pool"));
    }
}
