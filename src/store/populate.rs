//! Committing L1 ahead of use, so no store pays a page fault per 4 KiB it writes.
//!
//! `Eager` (the default) commits the bottom `lead` of the arena (a quarter, at least 1 GiB) at
//! start, before the sidecar serves, at normal priority, so the first requests of a fresh
//! process find committed memory (the allocator hands out low offsets first); a thread then
//! commits the rest, bottom up, until the whole budget is committed. Measured (`cwm bench
//! --realistic`): committing only a lead beyond the stores' high-water mark, in the background
//! alone, lost the race to a burst of stores, which then faulted every page of the third and
//! fourth 512 MiB requests (150-430 ms instead of 45).
//!
//! That thread runs at normal priority, unlike the rest of `crate::background`: at nice 19 it
//! was starved by the copies while stores waited on the pages it was committing (a priority
//! inversion: the fourth 512 MiB store of a fresh 2 GiB L1 took 250-1050 ms instead of 45,
//! 2026-12-02). It is start-up work, once per process, at most one core for ~0.3 s per GiB.
//!
//! `Lazy` leaves pages to be committed by the first store that touches them (the kernel's
//! default).

use std::str::FromStr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use super::L1Store;

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

/// What is committed before the sidecar serves: a quarter of L1, at least 1 GiB (all of it
/// for a smaller L1).
pub fn lead(capacity: u64) -> u64 {
    (capacity / 4).max(1 << 30).min(capacity)
}

/// Commit the first `lead` of `l1` now, then the rest in the background; the thread ends when
/// `l1` is dropped, when the whole arena is committed, or when memory runs out (stores then
/// commit pages as they touch them).
pub fn start(l1: &Arc<L1Store>) -> JoinHandle<()> {
    let started = std::time::Instant::now();
    let first = commit(l1, 0, lead(l1.capacity_bytes()));
    if let Some(bytes) = first {
        tracing::info!(
            bytes,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "L1 committed ahead of the first store (the rest follows in the background)"
        );
    }
    let weak = Arc::downgrade(l1);
    std::thread::Builder::new()
        .name("cwm-l1-populate".into())
        .spawn(move || {
            let Some(mut done) = first else { return };
            loop {
                let Some(l1) = weak.upgrade() else { return };
                let capacity = l1.capacity_bytes();
                if done >= capacity {
                    tracing::debug!(bytes = done, "L1 fully committed");
                    return;
                }
                match commit(&l1, done, (done + STEP).min(capacity)) {
                    Some(end) => done = end,
                    None => return,
                }
            }
        })
        .expect("spawn the L1 populator")
}

/// Commit `[from, to)` and count it: `Some(to)`, or `None` (logged) when that failed.
fn commit(l1: &L1Store, from: u64, to: u64) -> Option<u64> {
    match l1.populate(from, to) {
        Ok(()) => {
            l1.counters.populated_bytes.store(to, Relaxed);
            Some(to)
        }
        Err(e) => {
            tracing::warn!(
                committed = from,
                "stopped committing L1 ahead of use: {e}; stores commit pages as they go"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefault::thread_minor_faults;
    use crate::store::arena::Arena;
    use crate::store::{L1Config, Reservation};
    use crate::test_support::within;
    use connector_protocol::ObjectKey;
    use std::time::Duration;

    /// Far beyond what population takes on a busy machine; reached only by a populator that
    /// never stops.
    const LIMIT: Duration = Duration::from_secs(300);

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
        within(LIMIT, "population", || {
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
        });
    }

    #[test]
    fn the_lead_is_committed_before_start_returns_and_the_rest_follows() {
        within(LIMIT, "population", || {
            assert_eq!(lead(8 << 30), 2 << 30);
            assert_eq!(lead(2 << 30), 1 << 30);
            assert_eq!(lead(256 << 20), 256 << 20);
            let l1 = shared_l1("lead", 2 << 30);
            let populator = start(&l1);
            // No waiting: what the first stores of a fresh sidecar use is already committed.
            assert!(l1.counters.populated_bytes.load(Relaxed) >= 1 << 30);
            let faults = faults_storing(&l1, 16, 4 << 20);
            assert!(faults < 16 * 1024 / 100, "{faults} faults for 16384 pages");
            populator.join().unwrap();
            assert_eq!(l1.counters.populated_bytes.load(Relaxed), 2 << 30);
        });
    }

    #[test]
    fn population_stops_when_l1_goes() {
        within(LIMIT, "population", || {
            let l1 = shared_l1("stop", 4 << 30);
            let populator = start(&l1);
            drop(l1);
            populator.join().unwrap();
        });
    }
}
