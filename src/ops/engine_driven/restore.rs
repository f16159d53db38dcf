//! Engine-driven contexts across a restart of cwm (docs/ENGINE_DRIVEN.md, "After a restart").
//!
//! The engine maps cwm's L1 pool by name and keeps mapping it across a restart of cwm, so a
//! context is worth restoring only together with that very pool. Each context is journaled
//! with the pool it was answered (name, size, inode). At start `journaled_pool` names that pool
//! for `Tiers::open` to adopt (`Arena::adopt`: the same object, checked by inode, trusted for
//! nothing it holds); then every journaled context of exactly the pool L1 now lives in is
//! restored through the checks of a live registration. A context of any other pool (adoption
//! failed, L1 resized, the pool removed) is dropped and its engine re-registers when prompted
//! (`recovery`), as before there was a journal.

use std::path::Path;

use connector_protocol::{codec, RegisterEngineDrivenContextPayload};

use super::super::journal::{Entry, Journal, Kind};
use super::super::Cwm;
use crate::store::l1::PoolInfo;

/// The pool an engine-driven context was answered, as journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRef {
    pub name: String,
    pub size: u64,
    pub ino: u64,
}

impl PoolRef {
    fn of(pool: &PoolInfo) -> PoolRef {
        PoolRef {
            name: pool.shm_name.clone(),
            size: pool.size,
            ino: pool.ino,
        }
    }

    /// Whether `pool` is this very pool.
    pub fn is(&self, pool: &PoolInfo) -> bool {
        *self == PoolRef::of(pool)
    }
}

/// A journal entry's frames: the payload as received, the pool's name, its size and inode.
fn entry_frames(payload: &[u8], pool: &PoolInfo) -> Vec<Vec<u8>> {
    let mut ids = pool.size.to_le_bytes().to_vec();
    ids.extend_from_slice(&pool.ino.to_le_bytes());
    vec![payload.to_vec(), pool.shm_name.as_bytes().to_vec(), ids]
}

/// The payload and pool of an engine-driven entry, or why it is not one.
fn parse_entry(entry: &Entry) -> Result<(RegisterEngineDrivenContextPayload, PoolRef), String> {
    let [payload, name, ids] = entry.frames.as_slice() else {
        return Err(format!("{} frames", entry.frames.len()));
    };
    let payload: RegisterEngineDrivenContextPayload =
        codec::decode("RegisterEngineDrivenContextPayload", payload).map_err(|e| e.to_string())?;
    if payload.instance_id != entry.instance_id {
        return Err(format!(
            "the entry names instance {}, its file {}",
            payload.instance_id, entry.instance_id
        ));
    }
    let name = String::from_utf8(name.clone()).map_err(|_| "the pool name is not UTF-8")?;
    let [size, ino] = [0, 8].map(|at| {
        ids.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    });
    let (Some(size), Some(ino), 16) = (size, ino, ids.len()) else {
        return Err(format!("the pool frame has {} bytes, not 16", ids.len()));
    };
    Ok((payload, PoolRef { name, size, ino }))
}

/// The pool the journal in `dir` says engine-driven engines map, for L1 to adopt: read before
/// L2's lock is held, so nothing in the journal is changed. With entries of several pools
/// (which one cwm never writes), the one most contexts name.
pub fn journaled_pool(dir: &Path) -> Option<PoolRef> {
    let mut pools: Vec<(PoolRef, usize)> = Vec::new();
    for entry in Journal::peek(dir) {
        if entry.kind != Kind::EngineDriven {
            continue;
        }
        let Ok((_, pool)) = parse_entry(&entry) else {
            continue;
        };
        match pools.iter_mut().find(|(p, _)| *p == pool) {
            Some((_, n)) => *n += 1,
            None => pools.push((pool, 1)),
        }
    }
    pools.into_iter().max_by_key(|(_, n)| *n).map(|(p, _)| p)
}

impl Cwm {
    /// Journal a context cwm now serves, with the pool it was answered (a failure is logged:
    /// the context then does not survive a restart, and its engine re-registers when prompted).
    pub(super) fn journal_engine_driven(&self, instance_id: u64, payload: &[u8], pool: &PoolInfo) {
        let Some(journal) = self.journal.get() else {
            return;
        };
        let frames = entry_frames(payload, pool);
        if let Err(e) = journal.record(Kind::EngineDriven, instance_id, &frames) {
            tracing::error!(
                instance_id,
                "cannot journal the engine-driven context (it will not survive a restart): {e}"
            );
        }
    }

    /// Restore a journaled context if L1 lives in the very pool it was answered.
    pub(in crate::ops) fn restore_engine_driven(&self, entry: &Entry) -> Result<(), String> {
        let (payload, journaled) = parse_entry(entry)?;
        let Some(pool) = self.tiers.pool() else {
            return Err("cwm runs without a shared L1 pool (--no-engine-driven)".into());
        };
        if !pool.adopted || !journaled.is(&pool) {
            return Err(format!(
                "its engine maps pool {:?} (inode {}, {} bytes), which cwm could not adopt: L1 \
                 is a new pool {:?}",
                journaled.name, journaled.ino, journaled.size, pool.shm_name
            ));
        }
        if self.engine_driven.get(entry.instance_id).is_some() {
            return Ok(());
        }
        let ctx = self
            .engine_driven_context(&payload, pool.size)
            .map_err(|e| e.to_string())?;
        // A restored worker counts as having pinged: if its engine is gone, it is reaped after
        // the reap timeout for workers that ping.
        ctx.liveness.lock().touch(true);
        self.engine_driven.insert(ctx);
        Ok(())
    }
}
