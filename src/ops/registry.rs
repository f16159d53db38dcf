//! Registered engine instances (`register_kv_cache`): their KV memory, and which
//! `(model, world_size)` pairs have a usable registration (lookups answer 0 otherwise).
//!
//! An instance that registered something cwm cannot serve (CUDA here, several engine groups,
//! an odd layout) is still recorded, so its stores and retrieves answer `false` with the
//! reason in the log instead of corrupting anything.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::engine_mem::EngineKv;

pub struct Instance {
    pub id: u64,
    pub model: Arc<str>,
    pub world_size: u32,
    /// The engine memory, or why this instance cannot transfer.
    pub kv: Result<EngineKv, String>,
    liveness: Mutex<Liveness>,
}

struct Liveness {
    last_seen: Instant,
    pinged: bool,
}

impl Instance {
    pub fn new(id: u64, model: &str, world_size: u32, kv: Result<EngineKv, String>) -> Instance {
        Instance {
            id,
            model: model.into(),
            world_size,
            kv,
            liveness: Mutex::new(Liveness {
                last_seen: Instant::now(),
                pinged: false,
            }),
        }
    }

    pub fn touch(&self, pinged: bool) {
        let mut l = self.liveness.lock();
        l.last_seen = Instant::now();
        l.pinged |= pinged;
    }
}

/// How long a silent instance is kept: `after_ping` once it has pinged, else `never_pinged`.
#[derive(Debug, Clone, Copy)]
pub struct ReapPolicy {
    pub after_ping: Duration,
    pub never_pinged: Duration,
}

#[derive(Default)]
pub struct Registry {
    instances: RwLock<HashMap<u64, Arc<Instance>>>,
    models: Mutex<HashMap<(Arc<str>, u32), usize>>,
}

impl Registry {
    pub fn get(&self, id: u64) -> Option<Arc<Instance>> {
        self.instances.read().get(&id).cloned()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.instances.read().contains_key(&id)
    }

    /// Add an instance; returns false (and keeps the existing one) if the id is taken.
    pub fn insert(&self, instance: Instance) -> bool {
        let mut instances = self.instances.write();
        if instances.contains_key(&instance.id) {
            return false;
        }
        if instance.kv.is_ok() {
            *self
                .models
                .lock()
                .entry((instance.model.clone(), instance.world_size))
                .or_default() += 1;
        }
        instances.insert(instance.id, Arc::new(instance));
        true
    }

    pub fn remove(&self, id: u64) -> Option<Arc<Instance>> {
        let removed = self.instances.write().remove(&id)?;
        if removed.kv.is_ok() {
            let mut models = self.models.lock();
            let key = (removed.model.clone(), removed.world_size);
            if let Some(n) = models.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    models.remove(&key);
                }
            }
        }
        Some(removed)
    }

    /// Whether some usable instance serves `(model, world_size)`.
    pub fn serves(&self, model: &str, world_size: u32) -> bool {
        self.models
            .lock()
            .contains_key(&(Arc::from(model), world_size))
    }

    pub fn len(&self) -> usize {
        self.instances.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Unregister instances that went silent; returns their ids.
    pub fn reap(&self, now: Instant, policy: ReapPolicy) -> Vec<u64> {
        let stale: Vec<u64> = self
            .instances
            .read()
            .values()
            .filter(|i| {
                let l = i.liveness.lock();
                let limit = if l.pinged {
                    policy.after_ping
                } else {
                    policy.never_pinged
                };
                now.saturating_duration_since(l.last_seen) > limit
            })
            .map(|i| i.id)
            .collect();
        for id in &stale {
            self.remove(*id);
        }
        stale
    }
}
