//! Operation counters (later exported as Prometheus metrics).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::Mutex;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OpStat {
    pub calls: u64,
    pub errors: u64,
    pub total_micros: u64,
}

#[derive(Debug, Default)]
pub struct OpCounters {
    per_op: Mutex<HashMap<String, OpStat>>,
    pub lookup_chunks: AtomicU64,
    pub lookup_hit_chunks: AtomicU64,
    pub stored_objects: AtomicU64,
    pub stored_bytes: AtomicU64,
    pub retrieved_objects: AtomicU64,
    pub retrieved_bytes: AtomicU64,
    pub retrieve_misses: AtomicU64,
}

impl OpCounters {
    pub fn record_op(&self, op: &str, elapsed: Duration) {
        let mut m = self.per_op.lock();
        let s = m.entry(op.to_string()).or_default();
        s.calls += 1;
        s.total_micros += elapsed.as_micros() as u64;
    }

    pub fn record_error(&self, op: &str) {
        self.per_op.lock().entry(op.to_string()).or_default().errors += 1;
    }

    pub fn record_lookup(&self, chunks: usize, hit: usize) {
        self.lookup_chunks.fetch_add(chunks as u64, Relaxed);
        self.lookup_hit_chunks.fetch_add(hit as u64, Relaxed);
    }

    pub fn record_store(&self, objects: u64, bytes: u64) {
        self.stored_objects.fetch_add(objects, Relaxed);
        self.stored_bytes.fetch_add(bytes, Relaxed);
    }

    pub fn record_retrieve(&self, objects: u64, bytes: u64) {
        self.retrieved_objects.fetch_add(objects, Relaxed);
        self.retrieved_bytes.fetch_add(bytes, Relaxed);
    }

    pub fn record_retrieve_miss(&self) {
        self.retrieve_misses.fetch_add(1, Relaxed);
    }

    /// Every op's counters, sorted by op name.
    pub fn snapshot(&self) -> Vec<(String, OpStat)> {
        let mut v: Vec<(String, OpStat)> = self
            .per_op
            .lock()
            .iter()
            .map(|(k, s)| (k.clone(), *s))
            .collect();
        v.sort();
        v
    }

    pub fn op(&self, op: &str) -> OpStat {
        self.per_op.lock().get(op).copied().unwrap_or_default()
    }
}
