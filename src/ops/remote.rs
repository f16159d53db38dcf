//! Objects of LMCache's remote-server protocol (`lm://`, `connector_protocol::lm`): what a PUT,
//! GET and EXIST do, whatever transport brought them.
//!
//! An object is stored like every chunk: one L1 object, committed, written behind to L2 (and
//! L3 when configured) as a checksummed record, so it survives restarts and is evicted by L1's
//! LRU. Its store key is derived from the whole `CacheEngineKey` string ([`object_key`]): the
//! model and rank are kept as they are, the chunk hash is a blake3 of the full string (model,
//! world size, worker, chunk hash, dtype, layer, tags) under its own derivation context, and
//! the object group is [`REMOTE_OBJECT_GROUP`], so two different strings never share an object
//! and no `lm://` object can alias a chunk stored over the MP protocol.
//!
//! The object's bytes are a small header (what a GET hit must echo: format, dtype, shape; and
//! the key string itself, compared on every read) followed by the payload, at an offset that
//! is a multiple of 8 so the payload's elements stay aligned for the byte-plane codec:
//!
//! ```text
//! offset size field
//!  0      4   magic "CWLM"
//!  4      4   memory format (i32 LE)
//!  8      4   dtype code (i32 LE)
//! 12     16   shape, 4 × i32 LE
//! 28      2   key length K (u16 LE, at most 150)
//! 30      K   key string (UTF-8)
//! ...         zero padding to P = round_up(30 + K, 8)
//!  P          payload
//! ```
//!
//! These are plain command structs like the MP ops' (`super::command`), but they do not
//! implement `Command`: that trait parses MP payload frames and answers MP payloads, and no MP
//! op carries them.

use std::sync::Arc;

use connector_protocol::lm::{Key, TensorMeta, KEY_FIELD_LEN};
use connector_protocol::{checked_kv_rank, validate_model_name, ChunkHash, KeyError, ObjectKey};
use thiserror::Error;

use super::Cwm;
use crate::store::Reservation;

/// The object group of every `lm://` object ("lm"); MP chunks use the KV group index (0).
pub const REMOTE_OBJECT_GROUP: u32 = u32::from_be_bytes(*b"\0\0lm");

const MAGIC: [u8; 4] = *b"CWLM";
const FIXED: usize = 30;

#[derive(Debug, Error)]
pub enum RemoteError {
    /// A key LMCache accepts but cwm cannot store under (an empty model name, a rank beyond
    /// 255): a PUT is not stored, a GET or EXIST misses.
    #[error("lm:// key {key:?}: {source}")]
    Identity { key: String, source: KeyError },
    #[error("L1 has no room for an lm:// object of {0} bytes (everything else is locked)")]
    NoSpace(u64),
    #[error("stored lm:// object {key:?} is unreadable: {what}")]
    Corrupt { key: String, what: &'static str },
}

/// The store key of an `lm://` key (see the module docs).
pub fn object_key(key: &Key) -> Result<ObjectKey, RemoteError> {
    let identity = |source| RemoteError::Identity {
        key: key.as_str().into(),
        source,
    };
    validate_model_name(key.model()).map_err(identity)?;
    let kv_rank = checked_kv_rank(key.world_size(), key.worker_id()).map_err(identity)?;
    let mut h = blake3::Hasher::new_derive_key("cwm 2026 lm:// remote-server object key v1");
    h.update(key.as_str().as_bytes());
    Ok(ObjectKey {
        model: key.model().into(),
        kv_rank,
        object_group: REMOTE_OBJECT_GROUP,
        chunk_hash: ChunkHash(*h.finalize().as_bytes()),
        cache_salt: "".into(),
    })
}

fn payload_offset(key_len: usize) -> usize {
    (FIXED + key_len).next_multiple_of(8)
}

/// PUT: store `length` bytes described by `meta` under `key`. The transport appends the
/// payload to [`RemotePut::buffer`] (already holding the object header), so the bytes are
/// copied once more only, into L1.
pub struct RemotePut {
    pub key: Key,
    meta: TensorMeta,
    object: Vec<u8>,
}

impl RemotePut {
    pub fn new(key: Key, meta: TensorMeta) -> RemotePut {
        let k = key.as_str().as_bytes();
        debug_assert!(k.len() <= KEY_FIELD_LEN, "a decoded key fits its field");
        let mut object = Vec::with_capacity(payload_offset(k.len()));
        object.extend_from_slice(&MAGIC);
        object.extend_from_slice(&meta.fmt.to_le_bytes());
        object.extend_from_slice(&meta.dtype.to_le_bytes());
        for d in meta.shape {
            object.extend_from_slice(&d.to_le_bytes());
        }
        object.extend_from_slice(&(k.len() as u16).to_le_bytes());
        object.extend_from_slice(k);
        object.resize(payload_offset(k.len()), 0);
        RemotePut { key, meta, object }
    }

    /// The object so far: append the payload.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.object
    }

    pub fn payload_len(&self) -> usize {
        self.object.len() - payload_offset(self.key.as_str().len())
    }

    /// Store the object; false if it was already stored (the first write stays, as for MP
    /// chunks: a key names its content).
    pub fn run(self, cwm: &Arc<Cwm>) -> Result<bool, RemoteError> {
        let key = object_key(&self.key)?;
        let len = self.object.len() as u64;
        match cwm.tiers.reserve(&key, len) {
            Reservation::Present => Ok(false),
            Reservation::NoSpace => Err(RemoteError::NoSpace(len)),
            Reservation::Reserved(mut w) => {
                w.copy_from_slice(&self.object);
                cwm.tiers.commit([w], self.meta.itemsize().min(4));
                cwm.counters.record_store(1, self.payload_len() as u64);
                Ok(true)
            }
        }
    }
}

/// A stored object, read back: what a GET hit echoes and sends.
pub struct RemoteObject {
    pub meta: TensorMeta,
    object: Vec<u8>,
    offset: usize,
}

impl RemoteObject {
    pub fn payload(&self) -> &[u8] {
        &self.object[self.offset..]
    }

    /// Decode an object's bytes stored under `key`, checking that they are `key`'s.
    fn decode(key: &Key, object: Vec<u8>) -> Result<RemoteObject, RemoteError> {
        let corrupt = |what| RemoteError::Corrupt {
            key: key.as_str().into(),
            what,
        };
        if object.len() < FIXED || object[..4] != MAGIC {
            return Err(corrupt("no lm:// object header"));
        }
        let word = |i: usize| i32::from_le_bytes(object[i..i + 4].try_into().expect("4 bytes"));
        let meta = TensorMeta {
            fmt: word(4),
            dtype: word(8),
            shape: [word(12), word(16), word(20), word(24)],
        };
        let key_len = u16::from_le_bytes([object[28], object[29]]) as usize;
        let offset = payload_offset(key_len);
        if key_len > KEY_FIELD_LEN || object.len() < offset {
            return Err(corrupt("truncated header"));
        }
        if &object[FIXED..FIXED + key_len] != key.as_str().as_bytes() {
            return Err(corrupt("stored under another key"));
        }
        Ok(RemoteObject {
            meta,
            object,
            offset,
        })
    }
}

/// GET: the object stored under `key`, from L1 or read back into it from L2 or L3.
pub struct RemoteGet {
    pub key: Key,
}

impl RemoteGet {
    pub fn run(self, cwm: &Arc<Cwm>) -> Result<Option<RemoteObject>, RemoteError> {
        let key = object_key(&self.key)?;
        let tiers = &cwm.tiers;
        let guard = tiers
            .read(&key)
            .or_else(|| tiers.promote(&key).then(|| tiers.read(&key)).flatten())
            .or_else(|| {
                (tiers.fetch_unknown(std::slice::from_ref(&key)) > 0)
                    .then(|| tiers.read(&key))
                    .flatten()
            });
        let Some(guard) = guard else {
            cwm.counters.record_retrieve_miss();
            return Ok(None);
        };
        let object = RemoteObject::decode(&self.key, guard.to_vec())?;
        cwm.counters
            .record_retrieve(1, object.payload().len() as u64);
        Ok(Some(object))
    }
}

/// EXIST: whether some tier holds `key`'s object (L3 asked only when no local tier has it).
pub struct RemoteExists {
    pub key: Key,
}

impl RemoteExists {
    pub fn run(self, cwm: &Arc<Cwm>) -> Result<bool, RemoteError> {
        let key = object_key(&self.key)?;
        Ok(cwm.tiers.exists(&key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Key {
        Key::parse(s).unwrap()
    }

    #[test]
    fn every_field_of_the_key_is_part_of_the_store_key() {
        let base = object_key(&key("m@2@1@ff@half")).unwrap();
        assert_eq!(base.model.as_ref(), "m");
        assert_eq!(base.kv_rank, connector_protocol::kv_rank(2, 1));
        assert_eq!(base.object_group, REMOTE_OBJECT_GROUP);
        for other in [
            "n@2@1@ff@half",
            "m@2@0@ff@half",
            "m@3@1@ff@half",
            "m@2@1@fe@half",
            "m@2@1@-ff@half",
            "m@2@1@ff@bfloat16",
            "m@2@1@ff@half@0",
            "m@2@1@ff@half@u%a",
            "m@2@1@ff@half@u%b",
        ] {
            assert_ne!(object_key(&key(other)).unwrap(), base, "{other}");
        }
        assert_eq!(object_key(&key("m@2@1@ff@half  ")).unwrap(), base);
    }

    #[test]
    fn keys_cwm_cannot_store_under_are_identity_errors() {
        for k in ["@1@0@ff@half", "m@1@1@ff@half", "m@256@0@ff@half"] {
            assert!(
                matches!(object_key(&key(k)), Err(RemoteError::Identity { .. })),
                "{k}"
            );
        }
    }

    #[test]
    fn an_object_decodes_only_under_its_own_key() {
        let meta = TensorMeta {
            fmt: 1,
            dtype: 3,
            shape: [2, 4, 1, 1],
        };
        let k = key("model/x@1@0@abc@bfloat16@tag%v");
        let mut put = RemotePut::new(k.clone(), meta);
        assert_eq!(put.buffer().len() % 8, 0);
        put.buffer().extend_from_slice(&[7u8; 16]);
        assert_eq!(put.payload_len(), 16);
        let object = put.object.clone();
        let got = RemoteObject::decode(&k, object.clone()).unwrap();
        assert_eq!((got.meta, got.payload()), (meta, &[7u8; 16][..]));
        assert!(
            RemoteObject::decode(&key("model/x@1@0@abd@bfloat16@tag%v"), object.clone()).is_err()
        );
        assert!(RemoteObject::decode(&k, object[..20].to_vec()).is_err());
        let mut bad = object;
        bad[0] = b'X';
        assert!(RemoteObject::decode(&k, bad).is_err());
    }
}
