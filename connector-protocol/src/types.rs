//! Payload and result types of the core operations (spec §2.2), as serde structs.
//!
//! Dataclass/Struct types are msgpack maps keyed by field name; decoding ignores unknown keys
//! and fills defaults; encoding writes every field in declaration order so the bytes equal the
//! real client's (checked against the captured frames). Decode with [`crate::codec::decode`]
//! and encode with [`crate::codec::encode`]; `rmp_serde::from_slice` would be more lenient
//! (arrays for structs, bin for str) and less helpful in its errors.

use serde::{Deserialize, Serialize};

/// `IPCCacheServerKey`: which tokens a request is about, for which model/rank/tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpcCacheServerKey {
    pub model_name: String,
    pub world_size: u32,
    #[serde(default)]
    pub worker_id: Option<u32>,
    /// The whole token sequence of the request, not only `[start, end)`.
    #[serde(deserialize_with = "crate::de::u32_array::deserialize")]
    pub token_ids: Vec<u32>,
    #[serde(default)]
    pub start: u64,
    #[serde(default)]
    pub end: u64,
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub cache_salt: String,
    /// Opaque per-request config; not identity. Kept only to re-encode faithfully.
    #[serde(default)]
    pub request_configs: Option<rmpv::Value>,
    /// Read locks a lookup must take per object; 0 means an old client. When the field is
    /// absent we default to 1 (the non-MLA value); the Python dataclass defaults to 0, which
    /// the reference server rejects for lookups. The stock client always sends it.
    #[serde(default = "one")]
    pub num_kv_readers: u32,
}

fn one() -> u32 {
    1
}

/// `EngineGroupInfo`: one KV group of the engine (a single one for non-hybrid models).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineGroupInfo {
    pub engine_group_id: u32,
    #[serde(default)]
    pub layer_indices: Vec<u32>,
    #[serde(default)]
    pub tokens_per_block: u32,
    #[serde(default = "minus_one")]
    pub sw_size_tokens: i64,
    #[serde(default)]
    pub extra_object_group_tag: i64,
    #[serde(default)]
    pub recurrent_state: bool,
}

fn minus_one() -> i64 {
    -1
}

/// `LayoutHints` (a TypedDict, all keys optional). vLLM sends `{"kv_layout": "NHD"|"HND"|…}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutHints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_layout: Option<String>,
}

/// `BlockAllocationRecord` (observability only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockAllocationRecord {
    pub req_id: String,
    #[serde(default)]
    pub new_block_ids: Vec<u32>,
    #[serde(default)]
    pub new_token_ids: Vec<u32>,
}

/// `RegisterEngineDrivenContextPayload` (engine-driven mode, CPU workers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterEngineDrivenContextPayload {
    pub instance_id: u64,
    pub model_name: String,
    pub world_size: u32,
    pub block_size: u32,
    pub num_layers: u32,
    pub hidden_dim_size: u64,
    pub dtype_str: String,
    #[serde(default)]
    pub use_mla: bool,
    #[serde(default)]
    pub num_physical_slots: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterEngineDrivenContextResponse {
    pub shm_name: String,
    pub pool_size: u64,
}

/// One slot of the server-owned shm pool (engine-driven SHM mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmSlot {
    pub offset: u64,
    pub length: u64,
    pub shape: Vec<u64>,
    pub dtype: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareStoreContext {
    #[serde(default)]
    pub slots: Vec<ShmSlot>,
    #[serde(default)]
    pub chunk_indices: Vec<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareStoreResponse {
    pub context: PrepareStoreContext,
}

impl PrepareStoreResponse {
    /// `{"context": {}}`: no slot list at all. Unlike empty lists (which tell the client every
    /// chunk is already stored, so it reports success without copying), this makes the client
    /// copy into buffers of its own and send `commit_store`, whose `false` reports the failure.
    pub fn encode_unavailable() -> Vec<u8> {
        let mut out = vec![0x81, 0xa7];
        out.extend_from_slice(b"context");
        out.push(0x80);
        out
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareRetrieveContext {
    /// Omitted when empty: the failure reply's `context` is `{}` (`80`), as the reference's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slots: Vec<ShmSlot>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareRetrieveResponse {
    pub success: bool,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub context: PrepareRetrieveContext,
}

/// The `(bytes, bool)` result of store/retrieve: a completion event handle (empty = nothing
/// pending, the copy is complete) and success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferResult {
    pub event: Vec<u8>,
    pub ok: bool,
}

impl TransferResult {
    pub const FAILED: TransferResult = TransferResult {
        event: Vec::new(),
        ok: false,
    };
    pub const DONE: TransferResult = TransferResult {
        event: Vec::new(),
        ok: true,
    };

    /// `92 c4 LL <event> c3|c2`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.event.len() + 8);
        crate::codec::write_array_len(&mut out, 2);
        crate::codec::write_bin(&mut out, &self.event);
        out.push(if self.ok { 0xc3 } else { 0xc2 });
        out
    }

    /// Decode `[bin, bool]` (what the client decodes; used by tests and tools).
    pub fn decode(frame: &[u8]) -> Result<TransferResult, crate::DecodeError> {
        let mut r = crate::reader::Reader::new("transfer result", frame);
        let n = r.array_len("result")?;
        if n != 2 {
            return Err(r.err(format!(
                "result: expected an array of 2 ([bytes, bool]), got {n} elements"
            )));
        }
        let event = r.bin("result[0] (event handle)")?.to_vec();
        let ok = r.bool("result[1] (success)")?;
        r.finish()?;
        Ok(TransferResult { event, ok })
    }
}
