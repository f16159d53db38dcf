//! What each request does, independent of the transport. `Cwm::handle` takes a decoded
//! request and returns the reply payload (`None` = no payload frame).
//!
//! Every request gets an answer: a handler error is logged and turned into the op's failure
//! value (`(b"", false)` for store/retrieve, `0` for status queries, no payload otherwise).

mod counters;
pub mod engine_driven;
mod lookup;
mod register;
pub mod registry;
mod transfer;

use crate::limits::for_log;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use connector_protocol::{
    codec, validate_cache_salt, validate_model_name, DecodeError, IpcCacheServerKey, KeyError,
    ObjectKey, Op, PrepareRetrieveResponse, PrepareStoreResponse,
    RegisterEngineDrivenContextResponse, Request, TokenHasher, TransferResult,
};
use thiserror::Error;

pub use counters::OpCounters;
pub use engine_driven::{EngineDriven, EngineDrivenError};
pub use lookup::Sessions;
pub use register::{GpuStatus, PIN_PIECE_ENV};
pub use registry::{ReapPolicy, Registry, Roster};
pub use transfer::TransferError;

use crate::engine_mem::cuda::PinnedHost;
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
    /// L1 registered with the CUDA driver, done when the first GPU engine registers; the
    /// error if pinning failed (GPU copies then run from pageable memory, loudly).
    pub gpu_l1: OnceLock<Result<Arc<PinnedHost>, String>>,
}

/// Ops that copy engine memory or may wait: run off the socket thread, in order per client.
pub fn is_transfer(op: &Op) -> bool {
    matches!(
        op,
        Op::Store
            | Op::Retrieve
            | Op::PrepareStore
            | Op::CommitStore
            | Op::PrepareRetrieve
            | Op::CommitRetrieve
            | Op::WaitPrefetchStatus
    )
}

impl Cwm {
    pub fn new(settings: Settings, tiers: Tiers) -> Arc<Cwm> {
        Arc::new(Cwm {
            hasher: TokenHasher::new(settings.chunk_size),
            settings,
            tiers,
            registry: Registry::default(),
            engine_driven: EngineDriven::default(),
            sessions: Sessions::default(),
            counters: OpCounters::default(),
            chains: SessionIndex::default(),
            gpu_l1: OnceLock::new(),
        })
    }

    /// Answer one request. Never panics on bad input; always returns the reply payload.
    pub fn handle(self: &Arc<Self>, req: &Request<'_>) -> Option<Vec<u8>> {
        let started = Instant::now();
        let result = self.dispatch(req);
        self.counters.record_op(req.op.name(), started.elapsed());
        match result {
            Ok(payload) => payload,
            Err(e) => {
                self.counters.record_error(req.op.name());
                if matches!(e, OpError::Transfer(TransferError::Missing(_))) {
                    tracing::debug!(op = req.op.name(), "{}", for_log(&e));
                } else {
                    tracing::warn!(op = req.op.name(), "{}", for_log(&e));
                }
                failure_reply(&req.op)
            }
        }
    }

    fn dispatch(self: &Arc<Self>, req: &Request<'_>) -> Result<Option<Vec<u8>>, OpError> {
        use codec::*;
        let p = |n: usize| -> Result<&[&[u8]], OpError> { Ok(req.expect(n)?) };
        Ok(match &req.op {
            Op::GetChunkSize => {
                p(0)?;
                Some(encode_u64(self.settings.chunk_size as u64))
            }
            Op::GetExperimental => {
                p(0)?;
                Some(encode_str_list(&[]))
            }
            Op::Noop => {
                p(0)?;
                Some(encode_str("OK"))
            }
            Op::Ping => {
                if let Some(id) = decode_opt_u64("instance_id", p(1)?[0])? {
                    if let Some(inst) = self.registry.get(id) {
                        inst.touch(true);
                    }
                    self.engine_driven.touch(id, true);
                }
                Some(encode_bool(true))
            }
            Op::RegisterKvCache => {
                self.register_kv_cache(p(7)?)?;
                None
            }
            Op::UnregisterKvCache => {
                let id = decode_u64("instance_id", p(1)?[0])?;
                if self.registry.remove(id).is_none() {
                    tracing::warn!(instance_id = id, "unregister_kv_cache: unknown instance");
                } else {
                    tracing::info!(instance_id = id, "unregistered");
                }
                None
            }
            Op::Store => {
                let f = p(4)?;
                let key = Self::decode_key(f[0])?;
                let id = decode_u64("instance_id", f[1])?;
                let blocks = decode_block_ids(f[2])?;
                let event = decode_bin("event_ipc_handle", f[3])?;
                let event = self.store(&key, id, &blocks, event)?;
                Some(TransferResult { event, ok: true }.encode())
            }
            Op::Retrieve => {
                let f = p(5)?;
                let key = Self::decode_key(f[0])?;
                let id = decode_u64("instance_id", f[1])?;
                let blocks = decode_block_ids(f[2])?;
                let event = decode_bin("event_ipc_handle", f[3])?;
                let skip = decode_u64("skip_first_n_tokens", f[4])?;
                let event = self.retrieve(&key, id, &blocks, event, skip)?;
                Some(TransferResult { event, ok: true }.encode())
            }
            Op::Lookup => {
                let f = p(2)?;
                let key = Self::decode_key(f[0])?;
                decode_u64("tp_size", f[1])?;
                self.lookup(&key)?;
                None
            }
            Op::QueryPrefetchStatus => self
                .query_prefetch_status(decode_str("request_id", p(1)?[0])?)
                .map(encode_u64),
            Op::WaitPrefetchStatus => {
                let f = p(2)?;
                let timeout = decode_f64("timeout", f[1])?;
                let timeout = Duration::try_from_secs_f64(timeout).unwrap_or(Duration::ZERO);
                self.wait_prefetch_status(decode_str("request_id", f[0])?, timeout)
                    .map(encode_u64)
            }
            Op::FreeLookupLocks => {
                let f = p(2)?;
                self.free_lookup_locks(&Self::decode_key(f[0])?);
                None
            }
            Op::EndSession => {
                self.end_session(decode_str("request_id", p(1)?[0])?);
                None
            }
            Op::ReportBlockAllocation => {
                p(3)?;
                None
            }
            Op::RegisterKvCacheEngineDrivenContext => {
                let payload = engine_driven::decode_payload(p(1)?[0])?;
                Some(encode(&self.register_engine_driven_context(&payload)?))
            }
            Op::UnregisterKvCacheEngineDrivenContext => {
                self.unregister_engine_driven_context(decode_u64("instance_id", p(1)?[0])?);
                None
            }
            Op::PrepareStore => {
                let f = p(2)?;
                let key = Self::decode_key(f[0])?;
                let id = decode_u64("instance_id", f[1])?;
                Some(encode(&self.prepare_store(&key, id)?))
            }
            Op::CommitStore => {
                let f = p(3)?;
                let key = Self::decode_key(f[0])?;
                let id = decode_u64("instance_id", f[1])?;
                let data = decode_bin("cpu_data", f[2])?;
                Some(encode_bool(self.commit_store(&key, id, data)?))
            }
            Op::PrepareRetrieve => {
                let f = p(2)?;
                let key = Self::decode_key(f[0])?;
                let id = decode_u64("instance_id", f[1])?;
                Some(encode(&self.prepare_retrieve(&key, id)?))
            }
            Op::CommitRetrieve => {
                let f = p(2)?;
                let key = Self::decode_key(f[0])?;
                let id = decode_u64("instance_id", f[1])?;
                Some(encode_bool(self.commit_retrieve(&key, id)?))
            }
            Op::Clear => {
                let force = decode_bool("force", p(1)?[0])?;
                let cleared = self.tiers.clear(force);
                tracing::info!(force, l1 = cleared.l1, lower = cleared.lower, "clear");
                None
            }
            other => {
                tracing::warn!(
                    op = other.name(),
                    payloads = req.payloads.len(),
                    "operation not supported by cwm: answered with no payload"
                );
                None
            }
        })
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
        let (expired, reaped_ed) = self
            .engine_driven
            .sweep(now, self.settings.reap, &self.tiers);
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

/// What an op answers when it fails, so the client never waits forever.
pub fn failure_reply(op: &Op) -> Option<Vec<u8>> {
    match op {
        Op::Store | Op::Retrieve => Some(TransferResult::FAILED.encode()),
        Op::QueryPrefetchStatus | Op::WaitPrefetchStatus => Some(codec::encode_u64(0)),
        Op::Ping | Op::CommitStore | Op::CommitRetrieve => Some(codec::encode_bool(false)),
        // An empty name puts the client in pickle mode, which then fails cleanly op by op.
        Op::RegisterKvCacheEngineDrivenContext => Some(codec::encode(
            &RegisterEngineDrivenContextResponse::default(),
        )),
        Op::PrepareStore => Some(PrepareStoreResponse::encode_unavailable()),
        Op::PrepareRetrieve => Some(codec::encode(&PrepareRetrieveResponse::default())),
        Op::GetChunkSize => None,
        _ => None,
    }
}
