use std::time::{Duration, Instant};

use connector_protocol::ChunkHash;

use parking_lot::Mutex;

use super::*;
use crate::store::disk::storage::MemStorage;
use crate::store::disk::FsyncPolicy;
use crate::store::record::{self, Record};
use crate::store::tier::{Reserve, TierStats};
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

const COMPRESSION: CompressionPolicy = CompressionPolicy {
    enabled: true,
    level: 1,
};

/// L1 of `l1_objects` objects.
fn l1(l1_objects: u64) -> Arc<L1Store> {
    L1Store::new(&L1Config {
        capacity_bytes: l1_objects * OBJECT,
        lock_ttl: Duration::from_secs(60),
    })
    .unwrap()
}

type MemDisk = DiskStore<Arc<MemStorage>>;

/// An L2 in memory that can play a full disk.
fn disk() -> (Arc<MemDisk>, Arc<MemStorage>) {
    let mem = Arc::new(MemStorage::default());
    let disk = DiskStore::open(
        mem.clone(),
        DiskConfig {
            capacity_bytes: 1 << 30,
            segment_bytes: 1 << 20,
            fsync: FsyncPolicy::Never,
            compression: COMPRESSION,
        },
    )
    .unwrap();
    (Arc::new(disk), mem)
}

fn behind(l1: Arc<L1Store>, lower: Vec<Arc<dyn Tier>>) -> Tiers {
    Tiers::with_tiers(l1, lower, COMPRESSION, Default::default(), 1 << 30)
}

/// L1 of `l1_objects` objects over an L2 in memory that can play a full disk.
fn tiers(l1_objects: u64) -> (Tiers, Arc<MemStorage>) {
    let (disk, mem) = disk();
    (behind(l1(l1_objects), vec![disk]), mem)
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

// ----- what the facade asks across tiers: exists, fetch_unknown, unknown_beyond -----------------

/// A tier that keeps no index (`Presence::Unknown` for every key, as Redis): objects in
/// memory, and every key it was probed or fetched for, in order.
#[derive(Default)]
struct Remote {
    objects: Mutex<HashMap<ObjectKey, Vec<u8>>>,
    probed: Mutex<Vec<ObjectKey>>,
    fetched: Mutex<Vec<ObjectKey>>,
}

impl Remote {
    fn hold(&self, n: u8) {
        self.objects.lock().insert(key(n), object(n));
    }

    fn probed(&self) -> Vec<ObjectKey> {
        self.probed.lock().clone()
    }

    fn fetched(&self) -> Vec<ObjectKey> {
        self.fetched.lock().clone()
    }
}

impl Tier for Remote {
    fn name(&self) -> &'static str {
        "remote"
    }

    fn may_contain(&self, keys: &[ObjectKey]) -> Vec<Presence> {
        vec![Presence::Unknown; keys.len()]
    }

    fn probe(&self, keys: &[ObjectKey]) -> Vec<bool> {
        self.probed.lock().extend_from_slice(keys);
        let objects = self.objects.lock();
        keys.iter().map(|k| objects.contains_key(k)).collect()
    }

    fn fetch(&self, keys: &[ObjectKey], reserve: Reserve) -> Vec<Fetched> {
        self.fetched.lock().extend_from_slice(keys);
        keys.iter()
            .map(|k| {
                let Some(object) = self.objects.lock().get(k).cloned() else {
                    return Fetched::Missing;
                };
                match reserve(k, object.len() as u64) {
                    Reservation::Reserved(mut w) => {
                        w.copy_from_slice(&object);
                        w.set_itemsize(2);
                        Fetched::Read(w)
                    }
                    Reservation::Present => Fetched::Resident,
                    Reservation::NoSpace => Fetched::NoSpace,
                }
            })
            .collect()
    }

    fn record(&self, key: &ObjectKey) -> Result<Vec<u8>, TierError> {
        let object = self.objects.lock().get(key).cloned();
        object
            .map(|o| record::encode(key, &o, 2, COMPRESSION))
            .ok_or_else(|| {
                TierError::new("remote", std::io::Error::from(std::io::ErrorKind::NotFound))
            })
    }

    fn put(&self, records: &[(&ObjectKey, &[u8])]) -> Vec<Result<(), TierError>> {
        records
            .iter()
            .map(|(key, bytes)| {
                let r = Record::parse(bytes, 0).map_err(|e| TierError::new("remote", e))?;
                let mut object = vec![0; r.header.raw_len as usize];
                r.decode_into(&mut object)
                    .map_err(|e| TierError::new("remote", e))?;
                self.objects.lock().insert((*key).clone(), object);
                Ok(())
            })
            .collect()
    }

    fn pin(&self, key: &ObjectKey) -> bool {
        self.objects.lock().contains_key(key)
    }

    fn unpin(&self, _: &ObjectKey) {}

    fn sync(&self) -> Result<(), TierError> {
        Ok(())
    }

    fn clear(&self) -> Result<usize, TierError> {
        Ok(self.objects.lock().drain().count())
    }

    fn stats(&self) -> TierStats {
        TierStats {
            name: "remote".into(),
            records: self.objects.lock().len(),
            ..Default::default()
        }
    }
}

/// L1 (room for 64 objects), an L2 in memory behind it, and, with `remote`, a tier that keeps
/// no index behind that. Objects are placed by hand (`in_l1`, `in_l2`, `Remote::hold`), never
/// through write-behind, so each is exactly where a test put it.
struct Layers {
    tiers: Tiers,
    disk: Arc<MemDisk>,
    remote: Arc<Remote>,
}

impl Layers {
    fn new(remote: bool) -> Layers {
        let (disk, _) = disk();
        let rem = Arc::new(Remote::default());
        let mut lower: Vec<Arc<dyn Tier>> = vec![disk.clone()];
        if remote {
            lower.push(rem.clone());
        }
        Layers {
            tiers: behind(l1(64), lower),
            disk,
            remote: rem,
        }
    }

    /// Object `n` resident in L1 (committed without write-behind).
    fn in_l1(&self, n: u8) {
        let Reservation::Reserved(mut w) = self.tiers.reserve(&key(n), OBJECT) else {
            panic!("no room in L1 for object {n}")
        };
        w.copy_from_slice(&object(n));
        w.set_itemsize(2);
        w.commit();
    }

    /// Object `n`'s record in L2.
    fn in_l2(&self, n: u8) {
        let record = record::encode(&key(n), &object(n), 2, COMPRESSION);
        let put = Tier::put(&*self.disk, &[(&key(n), &record)]);
        assert!(put.iter().all(Result::is_ok), "object {n} into L2: {put:?}");
    }

    /// Whether object `n` reads back from L1 as exactly what was stored.
    fn l1_holds(&self, n: u8) -> bool {
        self.tiers
            .read(&key(n))
            .is_some_and(|g| g.to_vec() == object(n))
    }
}

// Objects by where they are: 1 in L1 only, 2 in L2 only, 3 in both, 4 in the remote tier only,
// 5 nowhere.
fn placed(remote: bool) -> Layers {
    let l = Layers::new(remote);
    l.in_l1(1);
    l.in_l2(2);
    l.in_l1(3);
    l.in_l2(3);
    l.remote.hold(4);
    l
}

#[test]
fn exists_probes_only_tiers_without_an_index_and_only_for_what_no_index_holds() {
    let l = placed(true);
    for n in [1, 2, 3] {
        assert!(l.tiers.exists(&key(n)), "object {n}");
    }
    assert_eq!(l.remote.probed(), [], "L1 and L2 answered without a probe");
    assert!(l.tiers.exists(&key(4)), "held by the remote tier only");
    assert!(!l.tiers.exists(&key(5)), "held nowhere");
    assert_eq!(l.remote.probed(), [key(4), key(5)]);
    assert!(!l.tiers.resident(&key(4)), "exists reads nothing into L1");
    assert!(!l.tiers.resident(&key(2)), "nor promotes from L2");
}

#[test]
fn exists_without_a_tier_lacking_an_index_is_l1_or_an_index() {
    let l = placed(false);
    for n in [1, 2, 3] {
        assert!(l.tiers.exists(&key(n)), "object {n}");
    }
    for n in [4, 5] {
        assert!(
            !l.tiers.exists(&key(n)),
            "object {n} is in no tier of these"
        );
    }
    assert_eq!(
        l.remote.probed(),
        [],
        "a tier not configured is never asked"
    );
}

#[test]
fn fetch_unknown_reads_only_what_no_index_holds_verified_into_l1() {
    let l = placed(true);
    let keys: Vec<ObjectKey> = (1..=5).map(key).collect();
    assert_eq!(l.tiers.fetch_unknown(&keys), 1, "object 4 alone");
    assert_eq!(l.remote.fetched(), [key(4), key(5)], "what no index holds");
    assert!(l.l1_holds(4), "fetched object 4 reads back as stored");
    assert!(!l.tiers.resident(&key(5)));
    assert!(!l.tiers.resident(&key(2)), "an L2 hit is left to promote");
    for n in [1, 3] {
        assert!(l.l1_holds(n), "object {n} untouched in L1");
    }
    assert_eq!(l.tiers.fetch_unknown(&keys), 0, "object 4 is resident now");
    assert_eq!(
        l.remote.fetched(),
        [key(4), key(5), key(5)],
        "only object 5 is asked for again"
    );
}

#[test]
fn fetch_unknown_without_a_tier_lacking_an_index_reads_nothing() {
    let l = placed(false);
    let keys: Vec<ObjectKey> = (1..=5).map(key).collect();
    assert_eq!(l.tiers.fetch_unknown(&keys), 0);
    assert_eq!(
        l.tiers.l1_occupancy().objects,
        2,
        "objects 1 and 3, as before"
    );
    assert!(l.remote.fetched().is_empty());
}

/// Chunks of two ranks each (two keys): chunk 0 in L1; chunk 1 one rank in L1, one in L2;
/// chunk 2 one rank in L2, one in the remote tier only; chunk 3 in L1.
fn chunked(remote: bool) -> (Layers, Vec<Vec<ObjectKey>>) {
    let l = Layers::new(remote);
    for n in [10, 11, 12, 30, 31] {
        l.in_l1(n);
    }
    l.in_l2(13);
    l.in_l2(20);
    l.remote.hold(21);
    let chunks = [10, 12, 20, 30].map(|n| vec![key(n), key(n + 1)]).to_vec();
    (l, chunks)
}

#[test]
fn unknown_beyond_asks_about_the_chunk_after_the_located_prefix_without_io() {
    let (l, chunks) = chunked(true);
    let located = l.tiers.locate(&chunks);
    assert_eq!(located, [true, false], "chunk 2 has a rank no index holds");
    assert!(l.tiers.unknown_beyond(&chunks, located.len()));
    assert!(
        !l.tiers.unknown_beyond(&chunks, chunks.len()),
        "nothing past the last chunk"
    );
    assert!(
        l.tiers.unknown_beyond(&chunks[..3], 2),
        "the chunk right after the prefix"
    );
    assert!(
        !l.tiers.unknown_beyond(&chunks[..2], 2),
        "a lookup ends where its chunks do"
    );
    assert_eq!(l.remote.probed(), [], "answered from memory");
    assert_eq!(l.remote.fetched(), []);
}

#[test]
fn unknown_beyond_is_false_when_every_tier_keeps_an_index() {
    let (l, chunks) = chunked(false);
    let located = l.tiers.locate(&chunks);
    assert_eq!(located, [true, false]);
    for at in 0..=chunks.len() {
        assert!(!l.tiers.unknown_beyond(&chunks, at), "chunk {at}");
    }
}

#[test]
fn promote_prefix_fetches_the_prefix_found_and_stops_at_the_first_gap() {
    let (l, mut chunks) = chunked(true);
    // Chunk 4: one rank nowhere; chunk 5: in the remote tier, past the gap.
    l.remote.hold(50);
    l.remote.hold(51);
    chunks.push(vec![key(40), key(41)]);
    chunks.push(vec![key(50), key(51)]);
    let located = l.tiers.locate(&chunks).len();
    assert_eq!(l.tiers.promote_prefix(&chunks, located), 4, "chunks 0 to 3");
    assert_eq!(
        l.remote.fetched(),
        [key(21)],
        "nothing past the gap is read"
    );
    for n in [10, 11, 12, 13, 20, 21, 30, 31] {
        assert!(
            l.l1_holds(n),
            "object {n} of the prefix is resident, as stored"
        );
    }
    for n in [40, 41, 50, 51] {
        assert!(!l.tiers.resident(&key(n)), "object {n} is past the prefix");
    }
}
