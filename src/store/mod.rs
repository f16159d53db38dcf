//! The native tensor store. L1 (memory) for now; the disk and Redis tiers join here.
//! Knows nothing of ZMQ, MCP or vLLM: it stores bytes under `ObjectKey`s.

pub mod arena;
pub mod codec;
pub mod disk;
pub mod l1;
pub mod populate;
pub mod tiered;

pub use l1::{L1Config, L1Store, ReadGuard, Reservation, WriteGuard};
