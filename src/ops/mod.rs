//! What each request does, independent of the transport. Every op is a command (`command`):
//! typed arguments parsed in the op's own file, run against `Cwm`. `Cwm::handle` takes a
//! decoded MP request and returns the reply payload (`None` = no payload frame).
//!
//! Every request gets an answer: a handler error is logged and turned into the op's failure
//! value (`(b"", false)` for store/retrieve, `0` for status queries, no payload otherwise).

mod admin;
pub mod command;
mod counters;
pub mod engine_driven;
pub mod journal;
mod lookup;
pub mod recovery;
mod register;
pub mod registry;
pub mod remote;
mod transfer;

use crate::limits::for_log;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use connector_protocol::{
    validate_cache_salt, validate_model_name, DecodeError, IpcCacheServerKey, KeyError, ObjectKey,
    Request, TokenHasher,
};
use thiserror::Error;

pub use admin::{Clear, GetChunkSize, GetExperimental, Noop, Ping, ReportBlockAllocation};
pub use command::{failure_reply, is_transfer, Answer, Command};
pub use counters::OpCounters;
pub use engine_driven::{
    journaled_pool, CommitRetrieve, CommitStore, EngineDriven, EngineDrivenError, PoolRef,
    PrepareRetrieve, PrepareStore, RegisterContext, UnregisterContext,
};
pub use lookup::{
    EndSession, FreeLookupLocks, Lookup, QueryPrefetchStatus, Sessions, WaitPrefetchStatus,
};
pub use recovery::{Prompts, Restored};
pub use register::{GpuStatus, RegisterKvCache, UnregisterKvCache, PIN_PIECE_ENV};
pub use registry::{ReapPolicy, Registry, Roster};
pub use transfer::{Retrieve, Store, TransferError};

use crate::engine_mem::pin_l1::{L1Pinning, PinScope};
use crate::session::SessionIndex;
use crate::store::tiered::Tiers;

#[derive(Debug, Clone)]
pub struct Settings {
    pub chunk_size: usize,
    /// Idle sessions are dropped after this long.
    pub session_ttl: Duration,
    pub reap: ReapPolicy,
    /// An engine-driven prepare not committed within this long is released.
    pub engine_driven_ttl: Duration,
    /// How much of L1 the GPU path pins (all of it when L1 is committed ahead of use).
    pub pin_l1: PinScope,
}

#[derive(Debug, Error)]
pub enum OpError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error(transparent)]
    EngineDriven(#[from] EngineDrivenError),
    #[error("object {key:?} has {got} bytes, the engine layout needs {want}")]
    ObjectSize {
        key: ObjectKey,
        got: usize,
        want: usize,
    },
}

/// The sidecar's state: settings, the store, registered engines and request sessions.
pub struct Cwm {
    pub settings: Settings,
    pub hasher: TokenHasher,
    pub tiers: Tiers,
    pub registry: Registry,
    /// Engine-driven workers and their pending prepares.
    pub engine_driven: EngineDriven,
    pub sessions: Sessions,
    pub counters: OpCounters,
    /// Token chains stored per (model, cache_salt), for context windows.
    pub chains: SessionIndex,
    /// L1's registration with the CUDA driver, started in the background when the first GPU
    /// engine registers (GPU copies from what is not pinned yet run from pageable memory).
    pub gpu_l1: OnceLock<Arc<L1Pinning>>,
    /// Where registrations are journaled (beside L2; none without L2).
    pub journal: OnceLock<journal::Journal>,
    /// Unknown instances whose ping was answered `false` so that they re-register.
    pub prompts: Prompts,
    /// This `Cwm` (for background work that must not keep it alive).
    me: std::sync::Weak<Cwm>,
}

impl Cwm {
    pub fn new(settings: Settings, tiers: Tiers) -> Arc<Cwm> {
        Arc::new_cyclic(|me| Cwm {
            me: me.clone(),
            hasher: TokenHasher::new(settings.chunk_size),
            settings,
            tiers,
            registry: Registry::default(),
            engine_driven: EngineDriven::default(),
            sessions: Sessions::default(),
            counters: OpCounters::default(),
            chains: SessionIndex::default(),
            gpu_l1: OnceLock::new(),
            journal: OnceLock::new(),
            prompts: Prompts::default(),
        })
    }

    /// Answer one request. Never panics on bad input; always returns the reply payload.
    pub fn handle(self: &Arc<Self>, req: &Request<'_>) -> Option<Vec<u8>> {
        // Counted under the op's static name: a client cannot grow the table with made-up ops.
        let name = req.op.static_name();
        let started = Instant::now();
        let Some(route) = command::route(&req.op) else {
            tracing::warn!(
                op = %for_log(req.op.name()),
                payloads = req.payloads.len(),
                "operation not supported by cwm: answered with no payload"
            );
            self.counters.record_op(name, started.elapsed());
            return None;
        };
        let result = req
            .expect_arity()
            .map_err(OpError::from)
            .and_then(|frames| route.run(self, frames));
        self.counters.record_op(name, started.elapsed());
        match result {
            Ok(payload) => payload,
            Err(e) => {
                self.counters.record_error(name);
                if matches!(e, OpError::Transfer(TransferError::Missing(_))) {
                    tracing::debug!(op = name, "{}", for_log(&e));
                } else {
                    tracing::warn!(op = name, "{}", for_log(&e));
                }
                route.failed()
            }
        }
    }

    /// The key names a model and tenant cwm may store under.
    fn check_identity(&self, key: &IpcCacheServerKey) -> Result<(), KeyError> {
        validate_model_name(&key.model_name)?;
        validate_cache_salt(&key.cache_salt)?;
        if key.world_size == 0
            || key.world_size > 255
            || key.worker_id.is_some_and(|w| w >= key.world_size)
        {
            return Err(KeyError::Rank {
                world_size: key.world_size,
                worker_id: key.worker_id.unwrap_or(0),
            });
        }
        Ok(())
    }

    /// Periodic housekeeping: expire idle sessions and engine-driven prepares never committed,
    /// reap silent instances.
    pub fn sweep(&self) {
        let now = Instant::now();
        let sessions = self.sessions.expire(now, self.settings.session_ttl);
        let reaped = self.registry.reap(now, self.settings.reap);
        self.forget_journaled(&reaped);
        let (expired, reaped_ed) = self
            .engine_driven
            .sweep(now, self.settings.reap, &self.tiers);
        self.forget_journaled(&reaped_ed);
        let unquarantined = self.tiers.expire_inherited_leases();
        if unquarantined > 0 {
            tracing::info!(
                bytes = unquarantined,
                "slots still leased when the previous cwm stopped: their leases expired, back in use"
            );
        }
        if sessions > 0 || !reaped.is_empty() || !reaped_ed.is_empty() {
            tracing::info!(
                sessions,
                ?reaped,
                ?reaped_ed,
                "expired idle sessions and silent instances"
            );
        }
        if expired != engine_driven::Released::default() {
            tracing::warn!(
                stores = expired.stores,
                retrieves = expired.retrieves,
                "released engine-driven prepares never committed"
            );
        }
    }
}
