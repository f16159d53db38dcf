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

use crate::engine_mem::EngineMemory;

pub struct Instance {
    pub id: u64,
    pub model: Arc<str>,
    pub world_size: u32,
    /// The engine memory, or why this instance cannot transfer.
    pub kv: Result<Box<dyn EngineMemory>, String>,
    liveness: Mutex<Liveness>,
}

/// When an instance was last heard from, and whether it ever pinged (which picks the reap
/// window).
pub(crate) struct Liveness {
    last_seen: Instant,
    pinged: bool,
}

impl Liveness {
    pub(crate) fn new() -> Liveness {
        Liveness {
            last_seen: Instant::now(),
            pinged: false,
        }
    }

    pub(crate) fn touch(&mut self, pinged: bool) {
        self.last_seen = Instant::now();
        self.pinged |= pinged;
    }

    /// Silent for longer than the policy allows.
    pub(crate) fn stale(&self, now: Instant, policy: ReapPolicy) -> bool {
        let limit = if self.pinged {
            policy.after_ping
        } else {
            policy.never_pinged
        };
        now.saturating_duration_since(self.last_seen) > limit
    }
}

impl Instance {
    pub fn new(
        id: u64,
        model: &str,
        world_size: u32,
        kv: Result<Box<dyn EngineMemory>, String>,
    ) -> Instance {
        Instance {
            id,
            model: model.into(),
            world_size,
            kv,
            liveness: Mutex::new(Liveness::new()),
        }
    }

    pub fn touch(&self, pinged: bool) {
        self.liveness.lock().touch(pinged);
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
            .filter(|i| i.liveness.lock().stale(now, policy))
            .map(|i| i.id)
            .collect();
        for id in &stale {
            self.remove(*id);
        }
        stale
    }
}
