//! Engine-driven transfers, vLLM's default on CPU: `register_kv_cache_engine_driven_context`,
//! `prepare_store` / `commit_store`, `prepare_retrieve` / `commit_retrieve`,
//! `unregister_kv_cache_engine_driven_context`.
//!
//! The engine copies the KV itself, into and out of a shared-memory pool cwm owns. That pool is
//! L1's own arena (`L1Store::new_shared`): a slot handed out by a prepare *is* an L1 object, at
//! its extent offset, so the engine's copy is the only copy (docs/ENGINE_DRIVEN.md says why).
//!
//! - `prepare_store` reserves L1 objects (`WriteGuard`s) for the chunks not stored yet and
//!   answers their slots; they stay invisible to lookups until `commit_store` publishes them.
//! - `prepare_retrieve` pins the objects a lookup locked (`ReadGuard`s, so nothing evicts them
//!   while the engine reads) and answers their slots; `commit_retrieve` unpins them and releases
//!   one lookup read lock per object, as `retrieve` does.
//! - Every pending prepare has a deadline. The sweeper releases expired ones, and unregistering
//!   (or reaping) the instance releases all of its own, so a worker that vanishes between a
//!   prepare and its commit leaks no slot and no lock.
//!
//! Only the shared-memory mode is served. A context is answered with the pool's name; without a
//! pool (`--no-engine-driven`) it is answered with an empty name, which puts the client in its
//! pickle mode, and every pickle payload is refused: stores and retrieves then fail cleanly.
//!
//! Here: the commands (parse, run, answer). The registrations and pending prepares they act on:
//! `state`.

use crate::limits::for_log;
use std::sync::Arc;
use std::time::Instant;

use connector_protocol::ipc::dtype_itemsize;
use connector_protocol::{
    codec, IpcCacheServerKey, Op, PrepareRetrieveContext, PrepareRetrieveResponse,
    PrepareStoreContext, PrepareStoreResponse, RegisterEngineDrivenContextPayload,
    RegisterEngineDrivenContextResponse,
};
use parking_lot::Mutex;
use thiserror::Error;

mod restore;
mod state;

pub use self::restore::{journaled_pool, PoolRef};
pub use self::state::{EngineDriven, EngineDrivenContext, Released};
use self::state::{PendingRetrieve, PendingStore, TransferKey};
use super::command::{decode_key, Answer, Command};
use super::registry::Liveness;
use super::{Cwm, OpError, TransferError};
use crate::store::{ReadGuard, Reservation};

#[derive(Debug, Error)]
pub enum EngineDrivenError {
    #[error("engine-driven context {field} = {value}: expected {expected}")]
    Payload {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("one chunk object needs {object_bytes} bytes but the L1 pool has {pool_bytes}")]
    ObjectTooLarge { object_bytes: u64, pool_bytes: u64 },
    #[error(
        "every slot lease of the L1 pool is taken (too many prepares waiting for their commit)"
    )]
    LeasesFull,
}

/// `register_kv_cache_engine_driven_context`: a worker that copies KV itself, through cwm's
/// shared-memory pool. Answered with the pool's name and size (an empty name: no pool).
pub struct RegisterContext {
    pub payload: RegisterEngineDrivenContextPayload,
    /// The payload frame as received (journaled).
    pub raw: Vec<u8>,
}

impl Command for RegisterContext {
    const OP: Op = Op::RegisterKvCacheEngineDrivenContext;
    type Answer = RegisterEngineDrivenContextResponse;

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        Ok(RegisterContext {
            payload: codec::decode("RegisterEngineDrivenContextPayload", f[0])?,
            raw: f[0].to_vec(),
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<Self::Answer, OpError> {
        cwm.register_engine_driven_context(&self.payload, &self.raw)
    }

    /// An empty name puts the client in pickle mode, which then fails cleanly op by op.
    fn failed() -> Self::Answer {
        RegisterEngineDrivenContextResponse::default()
    }
}

/// `unregister_kv_cache_engine_driven_context`: forget the worker, releasing its prepares.
pub struct UnregisterContext {
    pub instance_id: u64,
}

impl Command for UnregisterContext {
    const OP: Op = Op::UnregisterKvCacheEngineDrivenContext;
    type Answer = ();

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        Ok(UnregisterContext {
            instance_id: codec::decode_u64("instance_id", f[0])?,
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<(), OpError> {
        cwm.unregister_engine_driven_context(self.instance_id);
        Ok(())
    }

    fn failed() {}
}

/// `prepare_store`: reserve L1 slots for the key's chunks not stored yet.
pub struct PrepareStore {
    pub key: IpcCacheServerKey,
    pub instance_id: u64,
}

/// `prepare_store`'s answer: the slots to copy into, or none at all (the client then copies
/// into buffers of its own and its `commit_store` fails).
pub enum PrepareStoreAnswer {
    Slots(PrepareStoreResponse),
    Unavailable,
}

impl Answer for PrepareStoreAnswer {
    fn into_payload(self) -> Option<Vec<u8>> {
        Some(match self {
            PrepareStoreAnswer::Slots(r) => codec::encode(&r),
            PrepareStoreAnswer::Unavailable => PrepareStoreResponse::encode_unavailable(),
        })
    }
}

impl Command for PrepareStore {
    const OP: Op = Op::PrepareStore;
    const TRANSFER: bool = true;
    type Answer = PrepareStoreAnswer;

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        Ok(PrepareStore {
            key: decode_key(f[0])?,
            instance_id: codec::decode_u64("instance_id", f[1])?,
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<PrepareStoreAnswer, OpError> {
        cwm.prepare_store(&self.key, self.instance_id)
            .map(PrepareStoreAnswer::Slots)
    }

    fn failed() -> PrepareStoreAnswer {
        PrepareStoreAnswer::Unavailable
    }
}

/// `commit_store`: the engine wrote the prepared slots; publish them. `cpu_data` is the
/// pickle-mode payload, which cwm refuses (only its size is kept, for the log).
pub struct CommitStore {
    pub key: IpcCacheServerKey,
    pub instance_id: u64,
    pub inline_bytes: usize,
}

impl Command for CommitStore {
    const OP: Op = Op::CommitStore;
    const TRANSFER: bool = true;
    type Answer = bool;

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        Ok(CommitStore {
            key: decode_key(f[0])?,
            instance_id: codec::decode_u64("instance_id", f[1])?,
            inline_bytes: codec::decode_bin("cpu_data", f[2])?.len(),
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<bool, OpError> {
        cwm.commit_store(&self.key, self.instance_id, self.inline_bytes)
    }

    fn failed() -> bool {
        false
    }
}

/// `prepare_retrieve`: pin the key's cached chunks and hand out their slots.
pub struct PrepareRetrieve {
    pub key: IpcCacheServerKey,
    pub instance_id: u64,
}

impl Command for PrepareRetrieve {
    const OP: Op = Op::PrepareRetrieve;
    const TRANSFER: bool = true;
    type Answer = PrepareRetrieveResponse;

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        Ok(PrepareRetrieve {
            key: decode_key(f[0])?,
            instance_id: codec::decode_u64("instance_id", f[1])?,
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<PrepareRetrieveResponse, OpError> {
        cwm.prepare_retrieve(&self.key, self.instance_id)
    }

    fn failed() -> PrepareRetrieveResponse {
        PrepareRetrieveResponse::default()
    }
}

/// `commit_retrieve`: the engine copied the slots out; unpin them.
pub struct CommitRetrieve {
    pub key: IpcCacheServerKey,
    pub instance_id: u64,
}

impl Command for CommitRetrieve {
    const OP: Op = Op::CommitRetrieve;
    const TRANSFER: bool = true;
    type Answer = bool;

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        Ok(CommitRetrieve {
            key: decode_key(f[0])?,
            instance_id: codec::decode_u64("instance_id", f[1])?,
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<bool, OpError> {
        cwm.commit_retrieve(&self.key, self.instance_id)
    }

    fn failed() -> bool {
        false
    }
}

impl Cwm {
    fn register_engine_driven_context(
        &self,
        payload: &RegisterEngineDrivenContextPayload,
        raw: &[u8],
    ) -> Result<RegisterEngineDrivenContextResponse, OpError> {
        let Some(pool) = self.tiers.pool() else {
            tracing::error!(
                instance_id = payload.instance_id,
                "engine-driven context refused: cwm runs with --no-engine-driven (no shared L1 \
                 pool). The worker falls back to pickle transfers, which cwm does not serve: its \
                 stores and retrieves will fail. Run cwm with --engine-driven, or set \
                 lmcache.mp.mp_transfer_mode=lmcache_driven in vLLM"
            );
            return Ok(RegisterEngineDrivenContextResponse::default());
        };
        let answer = RegisterEngineDrivenContextResponse {
            shm_name: pool.shm_name.clone(),
            pool_size: pool.size,
        };
        if let Some(existing) = self.engine_driven.get(payload.instance_id) {
            existing.liveness.lock().touch(false);
            tracing::debug!(
                instance_id = payload.instance_id,
                "re-register: already registered"
            );
            return Ok(answer);
        }
        let ctx = self.engine_driven_context(payload, pool.size)?;
        tracing::info!(
            instance_id = ctx.id,
            model = %for_log(&ctx.model),
            world_size = ctx.world_size,
            shape = ?ctx.shape,
            dtype = %ctx.dtype,
            object_bytes = ctx.object_bytes,
            pool = %pool.shm_name,
            "registered engine-driven context"
        );
        let id = ctx.id;
        self.engine_driven.insert(ctx);
        self.journal_engine_driven(id, raw, &pool);
        Ok(answer)
    }

    /// Validate a registration and derive the chunk object's shape and size.
    fn engine_driven_context(
        &self,
        p: &RegisterEngineDrivenContextPayload,
        pool_bytes: u64,
    ) -> Result<EngineDrivenContext, OpError> {
        let bad = |field, value: &dyn std::fmt::Display, expected| EngineDrivenError::Payload {
            field,
            value: value.to_string(),
            expected,
        };
        connector_protocol::validate_model_name(&p.model_name)?;
        if !(1..=255).contains(&p.world_size) {
            return Err(bad("world_size", &p.world_size, "1..=255").into());
        }
        let itemsize = dtype_itemsize(&p.dtype_str)
            .ok_or_else(|| bad("dtype_str", &p.dtype_str, "a torch dtype name"))?;
        if p.num_layers == 0 {
            return Err(bad("num_layers", &p.num_layers, "at least 1").into());
        }
        if p.hidden_dim_size == 0 {
            return Err(bad("hidden_dim_size", &p.hidden_dim_size, "at least 1").into());
        }
        let chunk = self.settings.chunk_size as u64;
        // Clients from before the field existed mean one slot per token of the chunk.
        let slots = p.num_physical_slots.unwrap_or(chunk);
        if slots == 0 {
            return Err(bad("num_physical_slots", &slots, "at least 1").into());
        }
        if slots != chunk {
            tracing::warn!(
                instance_id = p.instance_id,
                slots,
                chunk,
                "engine-driven objects of {slots} slots per {chunk}-token chunk: they differ in \
                 size from store/retrieve objects and are never shared with them"
            );
        }
        let shape = if p.use_mla {
            vec![p.num_layers as u64, slots, p.hidden_dim_size]
        } else {
            vec![2, p.num_layers as u64, slots, p.hidden_dim_size]
        };
        let object_bytes = shape
            .iter()
            .try_fold(itemsize as u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad("shape", &format!("{shape:?}"), "a size that fits in u64"))?;
        if object_bytes > pool_bytes {
            return Err(EngineDrivenError::ObjectTooLarge {
                object_bytes,
                pool_bytes,
            }
            .into());
        }
        Ok(EngineDrivenContext {
            id: p.instance_id,
            model: p.model_name.as_str().into(),
            world_size: p.world_size,
            shape,
            dtype: p.dtype_str.clone(),
            itemsize: itemsize as u8,
            object_bytes,
            liveness: Mutex::new(Liveness::new()),
        })
    }

    fn unregister_engine_driven_context(&self, id: u64) {
        self.forget_journaled(&[id]);
        match self.engine_driven.remove(id, &self.tiers) {
            None => tracing::warn!(
                instance_id = id,
                "unregister_kv_cache_engine_driven_context: unknown instance"
            ),
            Some(released) => tracing::info!(
                instance_id = id,
                pending_stores = released.stores,
                pending_retrieves = released.retrieves,
                "unregistered engine-driven context"
            ),
        }
    }

    /// The registered context for a transfer, checked against the key; refreshes liveness.
    fn transfer_context(
        &self,
        key: &IpcCacheServerKey,
        instance_id: u64,
    ) -> Result<(Arc<EngineDrivenContext>, TransferKey), OpError> {
        self.check_identity(key)?;
        let ctx = self
            .engine_driven
            .get(instance_id)
            .ok_or(TransferError::UnknownInstance(instance_id))?;
        ctx.liveness.lock().touch(false);
        if *ctx.model != *key.model_name || ctx.world_size != key.world_size {
            return Err(TransferError::Identity {
                model: key.model_name.clone(),
                world_size: key.world_size,
                reg_model: ctx.model.to_string(),
                reg_world_size: ctx.world_size,
            }
            .into());
        }
        let objects = self.range_keys(key)?;
        Ok((
            ctx,
            TransferKey {
                instance_id,
                request_id: key.request_id.clone(),
                objects,
            },
        ))
    }

    fn pending_deadline(&self) -> Instant {
        Instant::now() + self.settings.engine_driven_ttl
    }

    fn prepare_store(
        &self,
        key: &IpcCacheServerKey,
        instance_id: u64,
    ) -> Result<PrepareStoreResponse, OpError> {
        let (ctx, tkey) = self.transfer_context(key, instance_id)?;
        // A repeated prepare (the client gave up waiting and asked again) starts over: the
        // old reservation would otherwise make every chunk look "being stored".
        let replaced = self.engine_driven.stores.lock().remove(&tkey);
        drop(replaced);
        let mut context = PrepareStoreContext::default();
        let (mut writes, mut leases) = (Vec::new(), Vec::new());
        let ttl = self.settings.engine_driven_ttl;
        for (i, object) in tkey.objects.iter().enumerate() {
            match self.tiers.reserve(object, ctx.object_bytes) {
                Reservation::Reserved(w) => {
                    // Leased before it is answered: a cwm adopting the pool after a crash
                    // keeps the slot out of use while the engine may still write it.
                    let Some(lease) = self.tiers.lease(w.pool_offset(), ctx.object_bytes, ttl)
                    else {
                        tracing::warn!(key = ?object, "{}: chunk not stored", EngineDrivenError::LeasesFull);
                        continue;
                    };
                    context.slots.push(ctx.slot(w.pool_offset()));
                    context.chunk_indices.push(i as u32);
                    writes.push(w);
                    leases.push(lease);
                }
                Reservation::Present => {}
                Reservation::NoSpace => tracing::warn!(
                    key = ?object,
                    bytes = ctx.object_bytes,
                    "L1 full of locked objects: chunk not stored"
                ),
            }
        }
        if !writes.is_empty() {
            let pending = PendingStore {
                writes,
                _leases: leases,
                deadline: self.pending_deadline(),
            };
            self.engine_driven.stores.lock().insert(tkey, pending);
        }
        Ok(PrepareStoreResponse { context })
    }

    /// Publish the objects `prepare_store` reserved for this key. `false` when there is no
    /// such reservation (never prepared, already committed, expired, or its instance gone) and
    /// for pickle payloads, which cwm does not take (the reservation, if any, is dropped: a
    /// client sending its data inline never writes the slots).
    fn commit_store(
        &self,
        key: &IpcCacheServerKey,
        instance_id: u64,
        inline_bytes: usize,
    ) -> Result<bool, OpError> {
        let (ctx, tkey) = self.transfer_context(key, instance_id)?;
        let pending = self.engine_driven.stores.lock().remove(&tkey);
        if inline_bytes > 0 {
            tracing::warn!(
                instance_id,
                bytes = inline_bytes,
                "commit_store with an inline (pickle) payload: cwm serves only the shared-memory \
                 mode; refused"
            );
            return Ok(false);
        }
        let Some(pending) = pending else {
            tracing::debug!(
                instance_id,
                request_id = %key.request_id,
                "commit_store without a pending prepare_store"
            );
            return Ok(false);
        };
        let objects = pending.writes.len() as u64;
        // Like `store`: committed objects go behind to L2.
        self.tiers.commit(pending.writes, ctx.itemsize);
        self.counters
            .record_store(objects, objects * ctx.object_bytes);
        self.record_chain(key);
        Ok(true)
    }

    fn prepare_retrieve(
        &self,
        key: &IpcCacheServerKey,
        instance_id: u64,
    ) -> Result<PrepareRetrieveResponse, OpError> {
        let (ctx, tkey) = self.transfer_context(key, instance_id)?;
        // A repeated prepare replaces the pin; its lock is released once, by the commit.
        let replaced = self.engine_driven.retrieves.lock().remove(&tkey);
        drop(replaced);
        let reads: Vec<Option<ReadGuard>> =
            tkey.objects.iter().map(|k| self.tiers.read(k)).collect();
        // As in `retrieve`: on failure the lookup's lock on each object read is released now.
        let fail = |reads: &[Option<ReadGuard>]| {
            self.tiers
                .unlock(reads.iter().flatten().map(ReadGuard::key), 1);
        };
        if let Some(missing) = reads.iter().position(Option::is_none) {
            fail(&reads);
            self.counters.record_retrieve_miss();
            return Err(TransferError::Missing(missing).into());
        }
        let reads: Vec<ReadGuard> = reads.into_iter().flatten().collect();
        if let Some(bad) = reads.iter().find(|g| g.len() as u64 != ctx.object_bytes) {
            let err = OpError::ObjectSize {
                key: bad.key().clone(),
                got: bad.len(),
                want: ctx.object_bytes as usize,
            };
            self.tiers.unlock(reads.iter().map(ReadGuard::key), 1);
            return Err(err);
        }
        let ttl = self.settings.engine_driven_ttl;
        let leases: Option<Vec<_>> = reads
            .iter()
            .map(|g| self.tiers.lease(g.pool_offset(), g.len() as u64, ttl))
            .collect();
        let Some(leases) = leases else {
            self.tiers.unlock(reads.iter().map(ReadGuard::key), 1);
            return Err(EngineDrivenError::LeasesFull.into());
        };
        let slots = reads.iter().map(|g| ctx.slot(g.pool_offset())).collect();
        let pending = PendingRetrieve {
            reads,
            _leases: leases,
            deadline: self.pending_deadline(),
        };
        self.engine_driven.retrieves.lock().insert(tkey, pending);
        Ok(PrepareRetrieveResponse {
            success: true,
            data: Vec::new(),
            context: PrepareRetrieveContext { slots },
        })
    }

    /// The engine has copied the slots `prepare_retrieve` handed out: unpin them and release
    /// one lookup read lock per object. `false` when nothing was pending for this key.
    fn commit_retrieve(&self, key: &IpcCacheServerKey, instance_id: u64) -> Result<bool, OpError> {
        let (_, tkey) = self.transfer_context(key, instance_id)?;
        let Some(pending) = self.engine_driven.retrieves.lock().remove(&tkey) else {
            return Ok(false);
        };
        self.tiers.unlock(&tkey.objects, 1);
        let first = key.start as usize / self.settings.chunk_size;
        self.lookup_locks_released(&key.request_id, first..first + tkey.objects.len());
        let (objects, bytes) = (
            pending.reads.len() as u64,
            pending.reads.iter().map(|g| g.len() as u64).sum(),
        );
        drop(pending);
        self.counters.record_retrieve(objects, bytes);
        Ok(true)
    }
}
