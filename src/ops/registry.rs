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

/// When a worker was last heard from, and whether it ever pinged (which picks the reap
/// window).
pub struct Liveness {
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

/// A registered worker as the roster tracks it.
pub trait Member {
    fn id(&self) -> u64;
    /// The `(model, world_size)` it can serve; `None` for a registration cwm cannot use.
    fn serves(&self) -> Option<(Arc<str>, u32)>;
    fn liveness(&self) -> &Mutex<Liveness>;
}

impl Member for Instance {
    fn id(&self) -> u64 {
        self.id
    }

    fn serves(&self) -> Option<(Arc<str>, u32)> {
        self.kv
            .is_ok()
            .then(|| (self.model.clone(), self.world_size))
    }

    fn liveness(&self) -> &Mutex<Liveness> {
        &self.liveness
    }
}

/// Registered workers of one kind by instance id: which `(model, world_size)` pairs some usable
/// one serves (lookups answer 0 otherwise), and the reaping of those gone silent. The one
/// mechanism behind `register_kv_cache` instances and engine-driven contexts.
pub struct Roster<T> {
    members: RwLock<HashMap<u64, Arc<T>>>,
    models: Mutex<HashMap<(Arc<str>, u32), usize>>,
}

impl<T> Default for Roster<T> {
    fn default() -> Self {
        Roster {
            members: RwLock::default(),
            models: Mutex::default(),
        }
    }
}

/// `register_kv_cache` instances.
pub type Registry = Roster<Instance>;

impl<T: Member> Roster<T> {
    pub fn get(&self, id: u64) -> Option<Arc<T>> {
        self.members.read().get(&id).cloned()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.members.read().contains_key(&id)
    }

    /// Add a member; if its id is taken, the existing one stays and is returned.
    pub fn insert(&self, member: T) -> Arc<T> {
        let mut members = self.members.write();
        if let Some(existing) = members.get(&member.id()) {
            return existing.clone();
        }
        if let Some(pair) = member.serves() {
            *self.models.lock().entry(pair).or_default() += 1;
        }
        let member = Arc::new(member);
        members.insert(member.id(), member.clone());
        member
    }

    pub fn remove(&self, id: u64) -> Option<Arc<T>> {
        let removed = self.members.write().remove(&id)?;
        if let Some(pair) = removed.serves() {
            let mut models = self.models.lock();
            if let Some(n) = models.get_mut(&pair) {
                *n -= 1;
                if *n == 0 {
                    models.remove(&pair);
                }
            }
        }
        Some(removed)
    }

    /// Whether some usable member serves `(model, world_size)`.
    pub fn serves(&self, model: &str, world_size: u32) -> bool {
        self.models
            .lock()
            .contains_key(&(Arc::from(model), world_size))
    }

    /// The member was heard from (`pinged`: by a heartbeat).
    pub fn touch(&self, id: u64, pinged: bool) {
        if let Some(m) = self.get(id) {
            m.liveness().lock().touch(pinged);
        }
    }

    pub fn len(&self) -> usize {
        self.members.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remove members that went silent; returns their ids.
    pub fn reap(&self, now: Instant, policy: ReapPolicy) -> Vec<u64> {
        let stale: Vec<u64> = self
            .members
            .read()
            .values()
            .filter(|m| m.liveness().lock().stale(now, policy))
            .map(|m| m.id())
            .collect();
        for id in &stale {
            self.remove(*id);
        }
        stale
    }
}
