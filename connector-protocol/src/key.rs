//! Cache identity: `ObjectKey` (spec §4.1) and the rules for the strings in it.

use std::{fmt, sync::Arc};

use thiserror::Error;

use crate::ChunkHash;

/// `kv_rank = (ws << 24) | (rank << 16) | (ws << 8) | rank` (each field 8 bits).
pub fn kv_rank(world_size: u32, worker_id: u32) -> u32 {
    todo!()
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
pub fn validate_cache_salt(salt: &str) -> Result<(), KeyError> {
    todo!()
}

/// Non-empty, no `@` or NUL.
pub fn validate_model_name(model: &str) -> Result<(), KeyError> {
    todo!()
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
    pub fn to_canonical_string(&self) -> String {
        todo!()
    }

    /// Parse the canonical string form back (None if malformed).
    pub fn parse_canonical(s: &str) -> Option<ObjectKey> {
        todo!()
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_canonical_string())
    }
}
