//! The engine-driven state: registered workers (contexts) and the prepares waiting for their
//! commit, with their release by unregister and by the sweeper. The commands that change it
//! are in the parent module.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use connector_protocol::{ObjectKey, ShmSlot};
use parking_lot::Mutex;

use crate::ops::registry::{Liveness, Member, ReapPolicy, Roster};
use crate::store::l1::Lease;
use crate::store::tiered::Tiers;
use crate::store::{ReadGuard, WriteGuard};

/// One registered engine-driven worker: the shape of its chunk objects.
pub struct EngineDrivenContext {
    pub id: u64,
    pub model: Arc<str>,
    pub world_size: u32,
    /// `[2, layers, slots, hidden]`, or `[layers, slots, hidden]` for single-plane formats
    /// (MLA and fused K/V; the wire calls that `use_mla`).
    pub shape: Vec<u64>,
    pub dtype: String,
    pub itemsize: u8,
    pub object_bytes: u64,
    pub(super) liveness: Mutex<Liveness>,
}

impl Member for EngineDrivenContext {
    fn id(&self) -> u64 {
        self.id
    }

    fn serves(&self) -> Option<(Arc<str>, u32)> {
        Some((self.model.clone(), self.world_size))
    }

    fn liveness(&self) -> &Mutex<Liveness> {
        &self.liveness
    }
}

impl EngineDrivenContext {
    pub(super) fn slot(&self, offset: u64) -> ShmSlot {
        ShmSlot {
            offset,
            length: self.object_bytes,
            shape: self.shape.clone(),
            dtype: self.dtype.clone(),
        }
    }
}

/// Which prepare a commit completes: the instance, the request, and the exact objects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct TransferKey {
    pub(super) instance_id: u64,
    pub(super) request_id: String,
    pub(super) objects: Vec<ObjectKey>,
}

/// A prepared store: the reserved objects and the engine's leases on their slots (both end
/// when this is dropped: committed, expired, or its instance gone).
pub(super) struct PendingStore {
    pub(super) writes: Vec<WriteGuard>,
    /// Held for their `Drop`, which ends the leases.
    pub(super) _leases: Vec<Lease>,
    pub(super) deadline: Instant,
}

/// A prepared retrieve: the pinned objects and the engine's leases on their slots.
pub(super) struct PendingRetrieve {
    pub(super) reads: Vec<ReadGuard>,
    /// Held for their `Drop`, which ends the leases.
    pub(super) _leases: Vec<Lease>,
    pub(super) deadline: Instant,
}

/// Engine-driven registrations and the prepares waiting for their commit.
#[derive(Default)]
pub struct EngineDriven {
    pub(super) contexts: Roster<EngineDrivenContext>,
    pub(super) stores: Mutex<HashMap<TransferKey, PendingStore>>,
    pub(super) retrieves: Mutex<HashMap<TransferKey, PendingRetrieve>>,
}

/// What the sweeper or an unregister released.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    pub stores: usize,
    pub retrieves: usize,
}

impl EngineDriven {
    pub fn get(&self, id: u64) -> Option<Arc<EngineDrivenContext>> {
        self.contexts.get(id)
    }

    pub fn len(&self) -> usize {
        self.contexts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.contexts.is_empty()
    }

    /// Whether some engine-driven worker serves `(model, world_size)` (lookups answer 0 else).
    pub fn serves(&self, model: &str, world_size: u32) -> bool {
        self.contexts.serves(model, world_size)
    }

    /// Prepares waiting for a commit: (stores, retrieves).
    pub fn pending(&self) -> (usize, usize) {
        (self.stores.lock().len(), self.retrieves.lock().len())
    }

    pub fn touch(&self, id: u64, pinged: bool) {
        self.contexts.touch(id, pinged);
    }

    pub(super) fn insert(&self, ctx: EngineDrivenContext) -> Arc<EngineDrivenContext> {
        self.contexts.insert(ctx)
    }

    /// Forget instance `id` and release every prepare it left pending.
    pub fn remove(&self, id: u64, tiers: &Tiers) -> Option<Released> {
        self.contexts.remove(id)?;
        Some(self.release_where(tiers, |k, _| k.instance_id == id))
    }

    /// Release pending prepares matching `pred(key, deadline)`: reservations are dropped (their
    /// space freed), reads unpinned with their lookup lock released, as a commit would.
    fn release_where(
        &self,
        tiers: &Tiers,
        pred: impl Fn(&TransferKey, Instant) -> bool,
    ) -> Released {
        let stores: Vec<PendingStore> = {
            let mut map = self.stores.lock();
            let keys: Vec<TransferKey> = map
                .iter()
                .filter(|(k, p)| pred(k, p.deadline))
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        let retrieves: Vec<(TransferKey, PendingRetrieve)> = {
            let mut map = self.retrieves.lock();
            let keys: Vec<TransferKey> = map
                .iter()
                .filter(|(k, p)| pred(k, p.deadline))
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| map.remove(&k).map(|p| (k, p)))
                .collect()
        };
        let released = Released {
            stores: stores.len(),
            retrieves: retrieves.len(),
        };
        for (key, pending) in retrieves {
            drop(pending);
            tiers.unlock(&key.objects, 1);
        }
        drop(stores);
        released
    }

    /// Release prepares past their deadline, and forget workers silent for too long.
    pub fn sweep(&self, now: Instant, policy: ReapPolicy, tiers: &Tiers) -> (Released, Vec<u64>) {
        let expired = self.release_where(tiers, |_, deadline| deadline <= now);
        let stale = self.contexts.reap(now, policy);
        for &id in &stale {
            self.release_where(tiers, |k, _| k.instance_id == id);
        }
        (expired, stale)
    }
}
