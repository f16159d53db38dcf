//! Committing L1 ahead of use, so no store pays a page fault per 4 KiB it writes.
//!
//! `Eager` (the default) starts a background-priority thread that commits the arena from the
//! bottom up (the allocator hands out low offsets first, and best fit prefers the committed,
//! already-freed extents below the untouched tail) and keeps the committed range `ahead` bytes
//! beyond the highest offset any store has reached, until the whole arena is committed. Start
//! is not delayed, and memory is taken as L1 grows toward its budget, not all at once. `Lazy`
//! leaves pages to be committed by the first store that touches them (the kernel's default).

use std::str::FromStr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::L1Store;
use crate::background;

/// When L1's pages are committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L1Populate {
    /// Ahead of use, in the background.
    #[default]
    Eager,
    /// On first touch, by the store that writes the page.
    Lazy,
}

impl FromStr for L1Populate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "eager" => Ok(L1Populate::Eager),
            "lazy" => Ok(L1Populate::Lazy),
            other => Err(format!("{other:?}: expected eager or lazy")),
        }
    }
}

/// Commit at most this much per step (so the thread notices a dropped store promptly).
const STEP: u64 = 64 << 20;
/// How often an idle populator checks whether stores moved closer to its edge.
const POLL: Duration = Duration::from_millis(20);

/// How far beyond the stores' high-water mark L1 is kept committed: a quarter of L1, at least
/// 1 GiB (all of it for a smaller L1).
pub fn lead(capacity: u64) -> u64 {
    (capacity / 4).max(1 << 30).min(capacity)
}

/// Start committing `l1` ahead of use; the thread ends when `l1` is dropped, when the whole
/// arena is committed, or when memory runs out (stores then commit pages as they touch them).
pub fn start(l1: &Arc<L1Store>) -> JoinHandle<()> {
    let weak = Arc::downgrade(l1);
    background::spawn("cwm-l1-populate", move || {
        let mut done = 0u64;
        loop {
            let Some(l1) = weak.upgrade() else { return };
            let capacity = l1.capacity_bytes();
            if done >= capacity {
                tracing::debug!(bytes = done, "L1 fully committed");
                return;
            }
            let target = (l1.high_water() + lead(capacity)).min(capacity);
            if done >= target {
                drop(l1);
                std::thread::sleep(POLL);
                continue;
            }
            let end = (done + STEP).min(target);
            if let Err(e) = l1.populate(done, end) {
                tracing::warn!(
                    committed = done,
                    "stopped committing L1 ahead of use: {e}; stores commit pages as they go"
                );
                return;
            }
            done = end;
            l1.counters.populated_bytes.store(done, Relaxed);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefault::thread_minor_faults;
    use crate::store::arena::Arena;
    use crate::store::{L1Config, Reservation};
    use connector_protocol::ObjectKey;

    fn key(i: u64) -> ObjectKey {
        ObjectKey {
            model: "m".into(),
            kv_rank: 0,
            object_group: 0,
            chunk_hash: connector_protocol::ChunkHash([i as u8; 32]),
            cache_salt: "".into(),
        }
    }

    /// Minor faults this thread takes storing `n` fresh objects of `len` bytes.
    fn faults_storing(l1: &Arc<L1Store>, n: u64, len: u64) -> u64 {
        let data = vec![0xa5u8; len as usize];
        let before = thread_minor_faults();
        for i in 0..n {
            let Reservation::Reserved(mut w) = l1.reserve(&key(i), len) else {
                panic!("no room for object {i}");
            };
            w.copy_from_slice(&data);
            w.commit();
        }
        thread_minor_faults() - before
    }

    fn shared_l1(tag: &str, capacity: u64) -> Arc<L1Store> {
        let name = format!("cwm_test_populate_{tag}_{}", std::process::id());
        let arena = Arena::shared(Some(&name), capacity).unwrap();
        L1Store::with_arena(
            arena,
            &L1Config {
                capacity_bytes: capacity,
                lock_ttl: Duration::from_secs(60),
            },
        )
    }

    #[test]
    fn stores_after_population_take_no_page_faults() {
        let (n, len) = (16u64, 4u64 << 20);
        let pages = n * len / 4096;
        // Lazy: every page of every fresh object faults once (the count this work removes).
        let lazy = shared_l1("lazy", 128 << 20);
        let lazy_faults = faults_storing(&lazy, n, len);
        assert!(
            lazy_faults >= pages / 2,
            "{lazy_faults} faults for {pages} pages"
        );
        // Eager: the populator commits ahead; once it is done, stores take (almost) none.
        let eager = shared_l1("eager", 128 << 20);
        let populator = start(&eager);
        populator.join().unwrap();
        assert_eq!(eager.counters.populated_bytes.load(Relaxed), 128 << 20);
        let eager_faults = faults_storing(&eager, n, len);
        assert!(
            eager_faults < pages / 100,
            "{eager_faults} faults for {pages} pages"
        );
    }

    #[test]
    fn population_keeps_its_lead_and_stops_when_l1_goes() {
        assert_eq!(lead(8 << 30), 2 << 30);
        assert_eq!(lead(2 << 30), 1 << 30);
        assert_eq!(lead(256 << 20), 256 << 20);
        let l1 = shared_l1("stop", 2 << 30);
        let populator = start(&l1);
        while l1.counters.populated_bytes.load(Relaxed) < 1 << 30 {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(POLL * 3);
        // No store yet: committed exactly the lead, not the whole arena.
        assert_eq!(l1.counters.populated_bytes.load(Relaxed), 1 << 30);
        drop(l1);
        populator.join().unwrap();
    }
}
