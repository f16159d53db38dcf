//! The LMCache multiprocess (MP) wire protocol, as spoken by LMCache 0.5.6's client and
//! vLLM 0.33's `LMCacheMPConnector`: ZMQ multipart frames carrying msgspec-msgpack documents.
//!
//! This crate owns the bytes on the wire and the cache identity derived from them. It does no
//! I/O and knows nothing of tokio, ZMQ sockets or storage: every function is pure, so decoders
//! can be property-tested and fuzzed. The spec lives in `shared/protocol/lmcache-mp.md`.

#![forbid(unsafe_code)]

pub mod codec;
mod de;
pub mod error;
pub mod frame;
pub mod hash;
pub mod ipc;
pub mod key;
pub mod lm;
pub mod op;
mod reader;
pub mod types;

pub use error::DecodeError;
pub use frame::{Reply, Request};
pub use hash::{ChunkHash, TokenHasher, NONE_HASH};
pub use ipc::{CudaStorageHandle, IpcDescriptor, TensorMetadata, TorchRefCounter};
pub use key::{
    checked_kv_rank, kv_rank, validate_cache_salt, validate_model_name, KeyError, ObjectKey,
};
pub use op::Op;
pub use types::*;
