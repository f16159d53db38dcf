//! The native tensor store: L1 (memory), L2 (disk), L3 (Redis), together in `tiered`.
//! Knows nothing of ZMQ, MCP or vLLM: it stores bytes under `ObjectKey`s.

pub mod arena;
pub mod codec;
pub mod disk;
pub mod l1;
pub mod l3;
pub mod tiered;
pub mod write_queue;

pub use l1::{L1Config, L1Store, ReadGuard, Reservation, WriteGuard};
