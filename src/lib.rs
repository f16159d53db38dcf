//! cwm: a KV-cache sidecar for vLLM — a drop-in LMCache MP server with a native tensor store.
//!
//! Dependencies point one way: `server → ops → {engine_mem, store}`; `store` knows nothing of
//! the wire, `connector_protocol` knows nothing of the rest.

pub mod background;
pub mod bench;
pub mod client;
pub mod config;
pub mod doctor;
pub mod engine_mem;
pub mod limits;
pub mod log_every;
pub mod mcp;
pub mod metrics;
pub mod ops;
pub mod prefault;
pub mod sample;
pub mod serve;
pub mod server;
pub mod session;
pub mod shm_leftovers;
pub mod status;
pub mod store;
pub mod tenant;
#[cfg(test)]
mod test_support;
pub mod windows;
