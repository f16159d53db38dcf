//! `store` and `retrieve`: copy chunks between an engine's paged KV memory and L1 objects.
//!
//! Both validate everything (instance, range, block lists, block ids) before a byte moves, then
//! hand the chunks to the instance's engine memory (`engine_mem::EngineMemory`), which runs the
//! copy. A store publishes each object only after it is written; a retrieve reads objects
//! pinned for the duration of the copy and then releases the lookup's read locks.

use std::sync::Arc;

use connector_protocol::{codec, kv_rank, IpcCacheServerKey, ObjectKey, Op, TransferResult};
use thiserror::Error;

use super::command::{decode_key, Command};
use super::{Cwm, OpError};
use crate::engine_mem::{EngineMemError, EngineMemory, Gather, Scatter};
use crate::store::{ReadGuard, Reservation, WriteGuard};

#[derive(Debug, Error)]
pub enum TransferError {
    #[error("instance {0} is not registered")]
    UnknownInstance(u64),
    #[error("instance {id} cannot transfer: {reason}")]
    Unusable { id: u64, reason: String },
    #[error("key has no worker_id (store/retrieve need the worker's rank)")]
    NoWorker,
    #[error("range [{start}, {end}) of {tokens} tokens is not chunk-aligned to {chunk_size} or out of bounds")]
    Range {
        start: u64,
        end: u64,
        tokens: usize,
        chunk_size: usize,
    },
    #[error("{got} block-id lists for {want} registered KV group(s)")]
    Groups { got: usize, want: usize },
    #[error("{got} block ids for {chunks} chunk(s), need {need}")]
    ShortBlocks {
        got: usize,
        chunks: usize,
        need: usize,
    },
    #[error(transparent)]
    Engine(#[from] EngineMemError),
    #[error("chunk {0} of the range is not cached")]
    Missing(usize),
    #[error("model/world_size {model}/{world_size} does not match instance registration {reg_model}/{reg_world_size}")]
    Identity {
        model: String,
        world_size: u32,
        reg_model: String,
        reg_world_size: u32,
    },
}

/// `store`: copy the chunks of the key's token range from the engine's blocks into L1.
pub struct Store {
    pub key: IpcCacheServerKey,
    pub instance_id: u64,
    /// Block ids per KV group, covering the range.
    pub block_ids: Vec<Vec<u32>>,
    /// The engine's event to wait for before copying (a CUDA IPC event handle; empty on CPU).
    pub event: Vec<u8>,
}

impl Command for Store {
    const OP: Op = Op::Store;
    const TRANSFER: bool = true;
    type Answer = TransferResult;

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        Ok(Store {
            key: decode_key(f[0])?,
            instance_id: codec::decode_u64("instance_id", f[1])?,
            block_ids: codec::decode_block_ids(f[2])?,
            event: codec::decode_bin("event_ipc_handle", f[3])?.to_vec(),
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<TransferResult, OpError> {
        let event = cwm.store(&self.key, self.instance_id, &self.block_ids, &self.event)?;
        Ok(TransferResult { event, ok: true })
    }

    fn failed() -> TransferResult {
        TransferResult::FAILED
    }
}

/// `retrieve`: copy the key's cached chunks into the engine's blocks, skipping the first
/// `skip_first_n_tokens` (blocks the engine already holds).
pub struct Retrieve {
    pub key: IpcCacheServerKey,
    pub instance_id: u64,
    pub block_ids: Vec<Vec<u32>>,
    pub event: Vec<u8>,
    pub skip_first_n_tokens: u64,
}

impl Command for Retrieve {
    const OP: Op = Op::Retrieve;
    const TRANSFER: bool = true;
    type Answer = TransferResult;

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        Ok(Retrieve {
            key: decode_key(f[0])?,
            instance_id: codec::decode_u64("instance_id", f[1])?,
            block_ids: codec::decode_block_ids(f[2])?,
            event: codec::decode_bin("event_ipc_handle", f[3])?.to_vec(),
            skip_first_n_tokens: codec::decode_u64("skip_first_n_tokens", f[4])?,
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<TransferResult, OpError> {
        let event = cwm.retrieve(
            &self.key,
            self.instance_id,
            &self.block_ids,
            &self.event,
            self.skip_first_n_tokens,
        )?;
        Ok(TransferResult { event, ok: true })
    }

    fn failed() -> TransferResult {
        TransferResult::FAILED
    }
}

/// A validated request: the chunks of `[start, end)` with their keys and block-id slices.
struct Plan<'a> {
    keys: Vec<ObjectKey>,
    blocks: &'a [u32],
    blocks_per_chunk: usize,
}

impl Cwm {
    /// Object keys of the chunks `[start, end)` of this worker's rank (`store`, `retrieve`
    /// and the engine-driven ops alike).
    pub(super) fn range_keys(
        &self,
        key: &IpcCacheServerKey,
    ) -> Result<Vec<ObjectKey>, TransferError> {
        let cs = self.settings.chunk_size;
        let rank = key.worker_id.ok_or(TransferError::NoWorker)?;
        let (start, end, tokens) = (key.start as usize, key.end as usize, key.token_ids.len());
        if start % cs != 0 || end % cs != 0 || start > end || end > tokens {
            return Err(TransferError::Range {
                start: key.start,
                end: key.end,
                tokens,
                chunk_size: cs,
            });
        }
        Ok(self
            .hasher
            .chunk_hashes(&key.token_ids, start, end)
            .iter()
            .map(|h| self.object_key(key, rank, *h))
            .collect())
    }

    fn plan<'a>(
        &self,
        key: &IpcCacheServerKey,
        kv: &dyn EngineMemory,
        block_ids: &'a [Vec<u32>],
    ) -> Result<Plan<'a>, TransferError> {
        let keys = self.range_keys(key)?;
        let [blocks] = block_ids else {
            return Err(TransferError::Groups {
                got: block_ids.len(),
                want: 1,
            });
        };
        let blocks_per_chunk = self.settings.chunk_size / kv.layout().block_size as usize;
        let need = keys.len() * blocks_per_chunk;
        if blocks.len() < need {
            return Err(TransferError::ShortBlocks {
                got: blocks.len(),
                chunks: keys.len(),
                need,
            });
        }
        let blocks = &blocks[..need];
        kv.check_blocks(blocks)?;
        Ok(Plan {
            keys,
            blocks,
            blocks_per_chunk,
        })
    }

    fn instance_kv(
        &self,
        key: &IpcCacheServerKey,
        instance_id: u64,
    ) -> Result<std::sync::Arc<super::registry::Instance>, TransferError> {
        let inst = self
            .registry
            .get(instance_id)
            .ok_or(TransferError::UnknownInstance(instance_id))?;
        inst.touch(false);
        if let Err(reason) = &inst.kv {
            return Err(TransferError::Unusable {
                id: instance_id,
                reason: reason.clone(),
            });
        }
        if *inst.model != *key.model_name || inst.world_size != key.world_size {
            return Err(TransferError::Identity {
                model: key.model_name.clone(),
                world_size: key.world_size,
                reg_model: inst.model.to_string(),
                reg_world_size: inst.world_size,
            });
        }
        Ok(inst)
    }

    fn store(
        &self,
        key: &IpcCacheServerKey,
        instance_id: u64,
        block_ids: &[Vec<u32>],
        event: &[u8],
    ) -> Result<Vec<u8>, OpError> {
        self.check_identity(key)?;
        let inst = self.instance_kv(key, instance_id)?;
        let kv = inst.kv.as_deref().expect("checked usable");
        let plan = self.plan(key, kv, block_ids)?;
        let chunk_tokens = self.settings.chunk_size as u64;
        let object_bytes = kv.layout().object_bytes(chunk_tokens);
        // Reserve every chunk that needs writing; present and null chunks are skipped, and a
        // chunk that finds no space is skipped too (the store still succeeds, as in LMCache).
        let mut writes: Vec<(usize, WriteGuard)> = Vec::new();
        for (c, key) in plan.keys.iter().enumerate() {
            if plan.chunk_blocks(c).iter().all(|&b| b == 0) {
                continue;
            }
            match self.tiers.reserve(key, object_bytes) {
                Reservation::Reserved(w) => writes.push((c, w)),
                Reservation::Present => {}
                Reservation::NoSpace => tracing::warn!(
                    ?key,
                    bytes = object_bytes,
                    "L1 full of locked objects: chunk not stored"
                ),
            }
        }
        let chunks: Vec<Gather> = writes
            .iter()
            .map(|(c, w)| Gather {
                blocks: plan.chunk_blocks(*c),
                object: w,
            })
            .collect();
        // Returns once the copy completed: only then are the objects committed (visible).
        let done = match kv.gather(&chunks, event) {
            Err(e @ EngineMemError::CopiesRunning(_)) => {
                // A late copy may still write them: never reuse these reservations.
                drop(chunks);
                std::mem::forget(writes);
                return Err(TransferError::from(e).into());
            }
            r => r.map_err(TransferError::from)?,
        };
        drop(chunks);
        let stored = writes.len();
        self.tiers.commit(
            writes.into_iter().map(|(_, w)| w),
            kv.layout().itemsize as u8,
        );
        self.counters
            .record_store(stored as u64, stored as u64 * object_bytes);
        self.record_chain(key);
        Ok(done)
    }

    /// Tell the session index that `key`'s tokens are stored (the chain a window freezes).
    pub(super) fn record_chain(&self, key: &IpcCacheServerKey) {
        let end = (key.end as usize).min(key.token_ids.len());
        self.chains.record(
            &key.model_name,
            key.world_size,
            &key.cache_salt,
            &key.token_ids[..end],
            Some(&key.request_id),
        );
    }

    fn retrieve(
        &self,
        key: &IpcCacheServerKey,
        instance_id: u64,
        block_ids: &[Vec<u32>],
        event: &[u8],
        skip_tokens: u64,
    ) -> Result<Vec<u8>, OpError> {
        self.check_identity(key)?;
        let inst = self.instance_kv(key, instance_id)?;
        let kv = inst.kv.as_deref().expect("checked usable");
        let plan = self.plan(key, kv, block_ids)?;
        let reads: Vec<Option<ReadGuard>> = plan.keys.iter().map(|k| self.tiers.read(k)).collect();
        // One lookup lock per object read is released whatever happens next.
        let first = key.start as usize / self.settings.chunk_size;
        let release = || {
            self.tiers
                .unlock(reads.iter().flatten().map(|g| g.key()), 1);
            self.lookup_locks_released(&key.request_id, first..first + reads.len());
        };
        if let Some(missing) = reads.iter().position(Option::is_none) {
            release();
            self.counters.record_retrieve_miss();
            return Err(TransferError::Missing(missing).into());
        }
        let skip_blocks = (skip_tokens / kv.layout().block_size) as usize;
        let chunks: Vec<Scatter> = reads
            .iter()
            .enumerate()
            .map(|(c, g)| Scatter {
                blocks: plan.chunk_blocks(c),
                skip_blocks: skip_blocks.saturating_sub(c * plan.blocks_per_chunk),
                object: g.as_ref().expect("all present"),
            })
            .collect();
        // Returns once the copy completed: only then are the objects unpinned.
        let copied = kv.scatter(&chunks, event);
        release();
        if let Err(e @ EngineMemError::CopiesRunning(_)) = copied {
            // A late copy may still read them: keep them pinned for good.
            drop(chunks);
            std::mem::forget(reads);
            return Err(TransferError::from(e).into());
        }
        let done = copied.map_err(TransferError::from)?;
        let bytes = reads.iter().flatten().map(|g| g.len() as u64).sum();
        self.counters.record_retrieve(reads.len() as u64, bytes);
        Ok(done)
    }

    pub(super) fn object_key(
        &self,
        key: &IpcCacheServerKey,
        rank: u32,
        hash: connector_protocol::ChunkHash,
    ) -> ObjectKey {
        ObjectKey {
            model: key.model_name.as_str().into(),
            kv_rank: kv_rank(key.world_size, rank),
            object_group: 0,
            chunk_hash: hash,
            cache_salt: key.cache_salt.as_str().into(),
        }
    }
}

impl Plan<'_> {
    /// The engine blocks of chunk `c`.
    fn chunk_blocks(&self, c: usize) -> &[u32] {
        &self.blocks[c * self.blocks_per_chunk..(c + 1) * self.blocks_per_chunk]
    }
}
