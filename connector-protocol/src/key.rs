//! Cache identity: `ObjectKey` (spec §4.1) and the rules for the strings in it.

use std::{fmt, sync::Arc};

use thiserror::Error;

use crate::ChunkHash;

/// `kv_rank = (ws << 24) | (rank << 16) | (ws << 8) | rank` (each field 8 bits).
///
/// Inputs are truncated to 8 bits; use [`checked_kv_rank`] to reject out-of-range values.
pub fn kv_rank(world_size: u32, worker_id: u32) -> u32 {
    let ws = world_size & 0xff;
    let rank = worker_id & 0xff;
    (ws << 24) | (rank << 16) | (ws << 8) | rank
}

/// [`kv_rank`] with range checks: `world_size` in `1..=255`, `worker_id < world_size`.
pub fn checked_kv_rank(world_size: u32, worker_id: u32) -> Result<u32, KeyError> {
    if (1..=255).contains(&world_size) && worker_id < world_size {
        Ok(kv_rank(world_size, worker_id))
    } else {
        Err(KeyError::Rank {
            world_size,
            worker_id,
        })
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KeyError {
    #[error("cache_salt {0:?} is longer than 128 characters")]
    SaltTooLong(String),
    #[error("cache_salt {0:?} contains {1:?}: salts may not contain @ / \\ or NUL")]
    SaltChar(String, char),
    #[error("model_name {0:?} contains '@' or NUL, or is empty")]
    ModelName(String),
    #[error("world_size {world_size} / worker_id {worker_id} out of range (world_size 1..=255, worker_id < world_size)")]
    Rank { world_size: u32, worker_id: u32 },
}

/// ≤ 128 characters, none of `@ / \ NUL` (empty is the default salt and valid).
/// Length is counted in characters (Unicode scalar values), as Python's `len(str)` does.
pub fn validate_cache_salt(salt: &str) -> Result<(), KeyError> {
    if let Some(c) = salt.chars().find(|c| matches!(c, '@' | '/' | '\\' | '\0')) {
        return Err(KeyError::SaltChar(salt.to_string(), c));
    }
    if salt.chars().count() > 128 {
        return Err(KeyError::SaltTooLong(salt.to_string()));
    }
    Ok(())
}

/// Non-empty, no `@` or NUL.
pub fn validate_model_name(model: &str) -> Result<(), KeyError> {
    if model.is_empty() || model.contains(['@', '\0']) {
        return Err(KeyError::ModelName(model.to_string()));
    }
    Ok(())
}

/// The identity of one stored chunk object.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub model: Arc<str>,
    pub kv_rank: u32,
    pub object_group: u32,
    pub chunk_hash: ChunkHash,
    pub cache_salt: Arc<str>,
}

impl ObjectKey {
    /// The native-connector string form `<model>@<kv_rank:08x>@<group:x>@<hash hex>[@<salt>]`.
    /// The salt part is omitted when the salt is empty.
    pub fn to_canonical_string(&self) -> String {
        let mut s = format!(
            "{}@{:08x}@{:x}@{}",
            self.model,
            self.kv_rank,
            self.object_group,
            self.chunk_hash.to_hex()
        );
        if !self.cache_salt.is_empty() {
            s.push('@');
            s.push_str(&self.cache_salt);
        }
        s
    }

    /// Parse the canonical string form back (None if malformed).
    /// Only the exact form `to_canonical_string` produces is accepted (lowercase hex, 8-digit
    /// kv_rank, no leading zeros in the group, valid model name and salt, no empty salt part).
    pub fn parse_canonical(s: &str) -> Option<ObjectKey> {
        let mut parts = s.split('@');
        let model = parts.next()?;
        let rank = parts.next()?;
        let group = parts.next()?;
        let hash = parts.next()?;
        let salt = parts.next();
        if parts.next().is_some() || rank.len() != 8 {
            return None;
        }
        let is_hex = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_hex(rank) || !is_hex(group) {
            return None;
        }
        let key = ObjectKey {
            model: Arc::from(model),
            kv_rank: u32::from_str_radix(rank, 16).ok()?,
            object_group: u32::from_str_radix(group, 16).ok()?,
            chunk_hash: ChunkHash::from_hex(hash)?,
            cache_salt: Arc::from(salt.unwrap_or("")),
        };
        if salt == Some("") || validate_model_name(model).is_err() {
            return None;
        }
        validate_cache_salt(&key.cache_salt).ok()?;
        // Reject non-canonical spellings (uppercase hex, leading zeros).
        (key.to_canonical_string() == s).then_some(key)
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_canonical_string())
    }
}
