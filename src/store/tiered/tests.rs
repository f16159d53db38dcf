use std::time::{Duration, Instant};

use connector_protocol::ChunkHash;

use super::*;
use crate::store::disk::storage::MemStorage;
use crate::store::disk::FsyncPolicy;
use crate::store::L1Config;

const OBJECT: u64 = 64 << 10;

fn key(n: u8) -> ObjectKey {
    ObjectKey {
        model: "m".into(),
        kv_rank: 0x01000100,
        object_group: 0,
        chunk_hash: ChunkHash([n; 32]),
        cache_salt: "s".into(),
    }
}

/// Bytes different for every `n` (and every position).
fn object(n: u8) -> Vec<u8> {
    (0..OBJECT as usize)
        .map(|i| (i as u8).wrapping_mul(31) ^ n)
        .collect()
}

/// L1 of `l1_objects` objects over an L2 in memory that can play a full disk.
fn tiers(l1_objects: u64) -> (Tiers, Arc<MemStorage>) {
    let l1 = L1Store::new(&L1Config {
        capacity_bytes: l1_objects * OBJECT,
        lock_ttl: Duration::from_secs(60),
    })
    .unwrap();
    let mem = Arc::new(MemStorage::default());
    let compression = CompressionPolicy {
        enabled: true,
        level: 1,
    };
    let disk = DiskStore::open(
        mem.clone(),
        DiskConfig {
            capacity_bytes: 1 << 30,
            segment_bytes: 1 << 20,
            fsync: FsyncPolicy::Never,
            compression,
        },
    )
    .unwrap();
    let tiers = Tiers::with_tiers(
        l1,
        vec![Arc::new(disk)],
        compression,
        Default::default(),
        1 << 30,
    );
    (tiers, mem)
}

fn store(t: &Tiers, n: u8) {
    let Reservation::Reserved(mut w) = t.reserve(&key(n), OBJECT) else {
        panic!("no room in L1 for object {n}")
    };
    w.copy_from_slice(&object(n));
    t.commit([w], 2);
}

fn wait_for(what: &str, t: &Tiers, done: impl Fn(&WriteBehindStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let wb = t.stats().write_behind;
        if done(&wb) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {wb:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every object in `ns` reads back from L2 (L1 emptied first) as exactly what was stored.
fn assert_in_l2(t: &Tiers, ns: impl IntoIterator<Item = u8>) {
    t.evict_l1(true);
    for n in ns {
        assert!(t.durable(&key(n)), "object {n} is not in L2");
        assert_eq!(
            t.install(&key(n), &key(n)).unwrap(),
            Installed::FromLower(OBJECT)
        );
        assert!(t.read(&key(n)).unwrap().to_vec() == object(n), "object {n}");
    }
}

/// Issue 12: a write-behind refused with ENOSPC was counted failed and never written, even
/// once the disk had room again.
#[test]
fn writes_refused_for_lack_of_space_are_retried_once_space_returns() {
    let (t, disk) = tiers(16);
    disk.set_full(true);
    for n in 0..4 {
        store(&t, n);
    }
    wait_for("every write tried once", &t, |_| {
        disk.refused_appends() >= 4
    });
    // Still full for a while: retried with backoff, one incident, nothing given up.
    let refused = disk.refused_appends();
    wait_for("a retry while full", &t, |_| {
        disk.refused_appends() > refused
    });
    let wb = t.stats().write_behind;
    assert_eq!((wb.written, wb.failed, wb.missed), (0, 0, 0), "{wb:?}");
    assert_eq!((wb.stalls, wb.held), (1, 4), "{wb:?}");
    assert_eq!(
        wb.queued_bytes,
        4 * OBJECT,
        "held writes stay counted in the queue"
    );
    assert!(!t.durable(&key(0)));

    disk.set_full(false);
    wait_for("held writes written once space returned", &t, |wb| {
        wb.written == 4
    });
    let wb = t.stats().write_behind;
    assert_eq!(
        (
            wb.failed,
            wb.missed,
            wb.held,
            wb.retried,
            wb.stalls,
            wb.queued_bytes
        ),
        (0, 0, 0, 4, 1, 0),
        "{wb:?}"
    );
    assert_in_l2(&t, 0..4);

    // A later write goes straight through.
    store(&t, 9);
    wait_for("a write after the stall", &t, |wb| wb.written == 5);
    assert_eq!(t.stats().write_behind.retried, 4);
    assert_in_l2(&t, [9]);
}

/// Held writes keep only keys: an object L1 evicts while the disk is full is dropped from
/// them and counted as missed (its queue bytes released); the rest are written later.
#[test]
fn held_writes_of_objects_l1_evicted_are_dropped_and_counted() {
    let (t, disk) = tiers(4);
    disk.set_full(true);
    for n in 0..4 {
        store(&t, n);
    }
    wait_for("the first four held", &t, |wb| wb.held == 4);
    // Four more evict the first four from L1.
    for n in 4..8 {
        store(&t, n);
    }
    wait_for("the evicted ones forgotten", &t, |wb| {
        wb.missed == 4 && wb.held == 4
    });
    let wb = t.stats().write_behind;
    assert_eq!((wb.held, wb.queued_bytes), (4, 4 * OBJECT), "{wb:?}");

    disk.set_full(false);
    wait_for("the rest written", &t, |wb| wb.written == 4);
    let wb = t.stats().write_behind;
    assert_eq!(
        (wb.failed, wb.missed, wb.held, wb.queued_bytes),
        (0, 4, 0, 0),
        "{wb:?}"
    );
    for n in 0..4 {
        assert!(
            !t.durable(&key(n)),
            "evicted object {n} cannot have been written"
        );
    }
    assert_in_l2(&t, 4..8);
}

/// A clear during a stall cancels the held writes: nothing stored before it reaches L2 after.
#[test]
fn a_clear_cancels_held_writes() {
    let (t, disk) = tiers(16);
    disk.set_full(true);
    for n in 0..3 {
        store(&t, n);
    }
    wait_for("held", &t, |wb| wb.held == 3);
    t.clear(true);
    disk.set_full(false);
    wait_for("the queue emptied", &t, |wb| {
        wb.queued_bytes == 0 && wb.held == 0
    });
    store(&t, 7);
    wait_for("a write after the clear", &t, |wb| wb.written == 1);
    for n in 0..3 {
        assert!(
            !t.durable(&key(n)),
            "object {n} stored before the clear reached L2"
        );
    }
    assert_eq!(t.stats().write_behind.missed, 0, "cancelled is not missed");
}
