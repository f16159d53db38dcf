//! The native tensor store: L1 in memory and the tiers behind it (`tier::Tier`: the disk
//! and Redis), behind one facade (`tiered::Tiers`). Knows nothing of ZMQ, MCP, vLLM or engine
//! memory: it stores bytes under `ObjectKey`s.

pub mod arena;
pub mod codec;
pub mod disk;
pub mod l1;
pub mod l3;
pub mod le;
pub mod leases;
pub mod populate;
pub mod quota;
pub mod record;
pub mod seal;
pub mod tier;
pub mod tiered;

pub use l1::{L1Config, L1Store, ReadGuard, Reservation, WriteGuard};
