//! Engine-driven transfers (vLLM's CPU default) end to end: a raw client sends the ops, maps
//! cwm's shared-memory L1 pool by name and copies chunk bytes into and out of the slots it is
//! given, as LMCache's `EngineDrivenContextShm` does.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::pool::{chunk_bytes, Pool};
use common::*;
use connector_protocol::{
    codec, kv_rank, ObjectKey, Op, PrepareStoreResponse, RegisterEngineDrivenContextPayload,
    RegisterEngineDrivenContextResponse, TokenHasher,
};
use cwm::client::MpClient;
use cwm::config::Config;
use cwm::serve::Sidecar;

const MODEL: &str = "ed-model";
const LAYERS: u32 = 3;
const HIDDEN: u64 = 128;

fn payload(instance_id: u64, world_size: u32, use_mla: bool) -> RegisterEngineDrivenContextPayload {
    RegisterEngineDrivenContextPayload {
        instance_id,
        model_name: MODEL.into(),
        world_size,
        block_size: 16,
        num_layers: LAYERS,
        hidden_dim_size: HIDDEN,
        dtype_str: "bfloat16".into(),
        use_mla,
        num_physical_slots: Some(CS),
    }
}

/// Bytes of one chunk object for `payload(.., use_mla)`.
fn object_bytes(use_mla: bool) -> u64 {
    let planes = if use_mla { 1 } else { 2 };
    planes * LAYERS as u64 * CS * HIDDEN * 2
}

fn object_key(t: &[u32], chunk: usize, world_size: u32, rank: u32) -> ObjectKey {
    ObjectKey {
        model: MODEL.into(),
        kv_rank: kv_rank(world_size, rank),
        object_group: 0,
        chunk_hash: TokenHasher::new(CS as usize).chunk_hashes(t, 0, t.len())[chunk],
        cache_salt: "".into(),
    }
}

fn hits(c: &mut MpClient, t: &[u32], world_size: u32, end: u64, rid: &str) -> u64 {
    lookup_hits(c, &key(MODEL, "", t, None, world_size, 0, end, rid))
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Register, prepare_store `[start, end)`, write each slot with `chunk_bytes`, commit.
fn ed_store(c: &mut MpClient, pool: &Pool, id: u64, t: &[u32], start: u64, end: u64) -> Vec<u32> {
    ed_store_salted(c, pool, id, "", t, start, end)
}

/// `ed_store` under `salt`.
fn ed_store_salted(
    c: &mut MpClient,
    pool: &Pool,
    id: u64,
    salt: &str,
    t: &[u32],
    start: u64,
    end: u64,
) -> Vec<u32> {
    let k = key(MODEL, salt, t, Some(0), 1, start, end, "store");
    let prepared = c.prepare_store(&k, id).unwrap().context;
    for (slot, &i) in prepared.slots.iter().zip(&prepared.chunk_indices) {
        pool.write(slot, &chunk_bytes(start / CS + i as u64, slot.length));
    }
    if !prepared.slots.is_empty() {
        assert!(c.commit_store(&k, id, b"").unwrap());
    }
    prepared.chunk_indices
}

#[test]
fn store_then_retrieve_through_the_pool_byte_exact() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let answer = c
        .register_engine_driven_context(&payload(7, 1, false))
        .unwrap();
    assert_eq!(
        answer.pool_size,
        s.cwm.tiers.l1_occupancy().capacity_bytes,
        "pool = the L1 budget"
    );
    assert_eq!(
        Some(answer.shm_name.clone()),
        s.cwm.tiers.pool().map(|p| p.shm_name)
    );
    let pool = Pool::open(&answer);
    let t = tokens(1, 600);
    let k = key(MODEL, "", &t, Some(0), 1, 0, 512, "r");

    let prepared = c.prepare_store(&k, 7).unwrap().context;
    assert_eq!(prepared.chunk_indices, vec![0, 1]);
    let len = object_bytes(false);
    for slot in &prepared.slots {
        assert_eq!(slot.shape, vec![2, LAYERS as u64, CS, HIDDEN]);
        assert_eq!((slot.length, slot.dtype.as_str()), (len, "bfloat16"));
        assert_eq!(slot.offset % 4096, 0);
    }
    let (a, b) = (&prepared.slots[0], &prepared.slots[1]);
    assert!(
        a.offset + len <= b.offset || b.offset + len <= a.offset,
        "slots overlap"
    );
    assert_eq!(
        hits(&mut c, &t, 1, 512, "early"),
        0,
        "invisible before commit"
    );
    pool.write(a, &chunk_bytes(0, len));
    pool.write(b, &chunk_bytes(1, len));
    assert!(c.commit_store(&k, 7, b"").unwrap());
    assert!(!c.commit_store(&k, 7, b"").unwrap(), "committed once");
    assert_eq!(s.cwm.engine_driven.pending(), (0, 0));
    assert_eq!(
        c.prepare_store(&k, 7).unwrap(),
        PrepareStoreResponse::default(),
        "nothing left to write: empty lists, the client skips commit_store"
    );

    assert_eq!(hits(&mut c, &t, 1, 512, "r"), 2);
    let got = c.prepare_retrieve(&k, 7).unwrap();
    assert!(got.success && got.data.is_empty());
    // The slots are the L1 objects themselves: where the engine wrote them.
    assert_eq!(got.context.slots, prepared.slots);
    assert_eq!(pool.read(&got.context.slots[0]), chunk_bytes(0, len));
    assert_eq!(pool.read(&got.context.slots[1]), chunk_bytes(1, len));
    let keys = [object_key(&t, 0, 1, 0), object_key(&t, 1, 1, 0)];
    assert_eq!(s.cwm.tiers.lock_count(&keys[0]), 1);
    assert!(c.commit_retrieve(&k, 7).unwrap());
    assert_eq!(
        s.cwm.tiers.lock_count(&keys[0]),
        0,
        "one lookup lock released"
    );
    assert_eq!(s.cwm.tiers.lock_count(&keys[1]), 0);
    assert!(
        !c.commit_retrieve(&k, 7).unwrap(),
        "nothing pending any more"
    );
    assert_eq!(
        s.cwm
            .counters
            .stored_objects
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn a_partial_hit_writes_only_the_missing_chunks() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let pool = Pool::open(
        &c.register_engine_driven_context(&payload(7, 1, false))
            .unwrap(),
    );
    let t = tokens(2, 768);
    assert_eq!(ed_store(&mut c, &pool, 7, &t, 256, 512), vec![0]);
    // [0, 768): chunk 1 is stored, chunks 0 and 2 are not.
    assert_eq!(ed_store(&mut c, &pool, 7, &t, 0, 768), vec![0, 2]);
    assert_eq!(hits(&mut c, &t, 1, 768, "r"), 3);
    let got = c
        .prepare_retrieve(&key(MODEL, "", &t, Some(0), 1, 0, 768, "r"), 7)
        .unwrap();
    for (n, slot) in got.context.slots.iter().enumerate() {
        assert_eq!(
            pool.read(slot),
            chunk_bytes(n as u64, slot.length),
            "chunk {n}"
        );
    }
}

#[test]
fn single_plane_objects_have_the_mla_shape() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let pool = Pool::open(
        &c.register_engine_driven_context(&payload(3, 1, true))
            .unwrap(),
    );
    let t = tokens(3, 256);
    let prepared = c
        .prepare_store(&key(MODEL, "", &t, Some(0), 1, 0, 256, "r"), 3)
        .unwrap()
        .context;
    assert_eq!(prepared.slots[0].shape, vec![LAYERS as u64, CS, HIDDEN]);
    assert_eq!(prepared.slots[0].length, object_bytes(true));
    pool.write(&prepared.slots[0], &chunk_bytes(0, object_bytes(true)));
}

/// What an engine-driven worker copies for one chunk of `kv` (blocks `blocks`): LMCache's
/// chunk object, `[planes, layers, tokens, heads * content]`, token-major.
fn canonical_object(kv: &TestKv, blocks: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in 0..kv.planes() {
        for l in 0..kv.layers {
            for &b in blocks {
                for t in 0..kv.bs {
                    for h in 0..kv.heads {
                        out.extend(kv.head(p, l, b, t, h));
                    }
                }
            }
        }
    }
    out
}

/// The two transfer modes store the same bytes for the same model, so a chunk stored by one is
/// served by the other (vLLM on CPU in engine-driven mode next to one in lmcache_driven mode).
fn modes_share_objects(layout: Layout) {
    let s = sidecar(small_config());
    let mut c = client(&s);
    // 2 layers, 2 heads of 32 content elements: hidden 64.
    let (src, dst) = (
        TestKv::new(layout, 2, 40, 16, 2, 32),
        TestKv::new(layout, 2, 40, 16, 2, 32),
    );
    src.fill(5);
    dst.fill_byte(0xEE);
    for (id, kv) in [(1, &src), (2, &dst)] {
        c.register_kv_cache(id, &kv.descriptors(), MODEL, 1, kv.hint(), &kv.groups())
            .unwrap();
    }
    let single_plane = layout != Layout::TwoMajor;
    let answer = c
        .register_engine_driven_context(&RegisterEngineDrivenContextPayload {
            num_layers: 2,
            hidden_dim_size: 2 * 32,
            use_mla: single_plane,
            ..payload(9, 1, single_plane)
        })
        .unwrap();
    let pool = Pool::open(&answer);

    // lmcache_driven store -> engine-driven retrieve.
    let t = tokens(4, 256);
    let k = key(MODEL, "", &t, Some(0), 1, 0, 256, "a");
    assert!(c.store(&k, 1, &[(1..17).collect()]).unwrap().ok);
    assert_eq!(hits(&mut c, &t, 1, 256, "a"), 1);
    let got = c.prepare_retrieve(&k, 9).unwrap();
    assert!(got.success);
    let want = canonical_object(&src, &(1..17).collect::<Vec<_>>());
    assert_eq!(got.context.slots[0].length as usize, want.len());
    assert!(
        pool.read(&got.context.slots[0]) == want,
        "{layout:?}: object bytes differ"
    );
    assert!(c.commit_retrieve(&k, 9).unwrap());

    // engine-driven store -> lmcache_driven retrieve.
    let u = tokens(5, 256);
    let k = key(MODEL, "", &u, Some(0), 1, 0, 256, "b");
    let prepared = c.prepare_store(&k, 9).unwrap().context;
    pool.write(
        &prepared.slots[0],
        &canonical_object(&src, &(17..33).collect::<Vec<_>>()),
    );
    assert!(c.commit_store(&k, 9, b"").unwrap());
    assert_eq!(hits(&mut c, &u, 1, 256, "b"), 1);
    assert!(c.retrieve(&k, 2, &[(20..36).collect()], 0).unwrap().ok);
    for j in 0..16 {
        assert_eq!(src.block(17 + j), dst.block(20 + j), "{layout:?} block {j}");
    }
}

#[test]
fn modes_share_objects_hnd_fused() {
    modes_share_objects(Layout::Hnd);
}

#[test]
fn modes_share_objects_nhd_fused() {
    modes_share_objects(Layout::Nhd);
}

#[test]
fn modes_share_objects_split_kv() {
    modes_share_objects(Layout::TwoMajor);
}

#[test]
fn objects_of_another_size_are_never_served() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let pool = Pool::open(
        &c.register_engine_driven_context(&payload(1, 1, false))
            .unwrap(),
    );
    c.register_engine_driven_context(&payload(2, 1, true))
        .unwrap();
    let t = tokens(6, 256);
    ed_store(&mut c, &pool, 1, &t, 0, 256);
    assert_eq!(hits(&mut c, &t, 1, 256, "r"), 1);
    let k = key(MODEL, "", &t, Some(0), 1, 0, 256, "r");
    assert!(!c.prepare_retrieve(&k, 2).unwrap().success, "half the size");
    assert_eq!(
        s.cwm.tiers.lock_count(&object_key(&t, 0, 1, 0)),
        0,
        "lock released"
    );
}

#[test]
fn commit_without_prepare_answers_false() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    c.register_engine_driven_context(&payload(7, 1, false))
        .unwrap();
    let t = tokens(7, 256);
    let k = key(MODEL, "", &t, Some(0), 1, 0, 256, "r");
    assert!(!c.commit_store(&k, 7, b"").unwrap());
    assert!(!c.commit_retrieve(&k, 7).unwrap());
    // A prepare for another request (or range) is not this key's.
    let other = key(MODEL, "", &t, Some(0), 1, 0, 256, "other");
    assert_eq!(c.prepare_store(&other, 7).unwrap().context.slots.len(), 1);
    assert!(!c.commit_store(&k, 7, b"").unwrap());
    assert!(c.commit_store(&other, 7, b"").unwrap());
}

#[test]
fn commit_with_inline_data_answers_false_and_drops_the_reservation() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    c.register_engine_driven_context(&payload(7, 1, false))
        .unwrap();
    let t = tokens(8, 512);
    let k = key(MODEL, "", &t, Some(0), 1, 0, 512, "r");
    assert_eq!(c.prepare_store(&k, 7).unwrap().context.slots.len(), 2);
    assert!(s.cwm.tiers.l1_occupancy().used_bytes > 0);
    // What LMCache's pickle context sends (e.g. when the worker could not map the pool).
    assert!(!c
        .commit_store(&k, 7, b"\x80\x04\x95pickled tensors")
        .unwrap());
    assert_eq!(s.cwm.engine_driven.pending(), (0, 0));
    assert_eq!(
        s.cwm.tiers.l1_occupancy().used_bytes,
        0,
        "reservation dropped"
    );
    assert!(!c.commit_store(&k, 7, b"").unwrap());
    assert_eq!(hits(&mut c, &t, 1, 512, "r"), 0);
}

#[test]
fn prepare_retrieve_of_a_missing_chunk_fails_and_releases_the_locks() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let pool = Pool::open(
        &c.register_engine_driven_context(&payload(7, 1, false))
            .unwrap(),
    );
    let t = tokens(9, 512);
    ed_store(&mut c, &pool, 7, &t, 0, 256);
    assert_eq!(hits(&mut c, &t, 1, 512, "r"), 1);
    let k = key(MODEL, "", &t, Some(0), 1, 0, 512, "r");
    let got = c.prepare_retrieve(&k, 7).unwrap();
    assert!(!got.success && got.context.slots.is_empty());
    assert_eq!(s.cwm.tiers.lock_count(&object_key(&t, 0, 1, 0)), 0);
    assert_eq!(s.cwm.engine_driven.pending(), (0, 0));
    assert!(!c.commit_retrieve(&k, 7).unwrap());
    // Golden failure reply, as LMCache's reference answers it.
    let raw = c
        .call(
            Op::PrepareRetrieve,
            &[codec::encode(&k), codec::encode_u64(7)],
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        raw,
        [
            &[0x83, 0xa7][..],
            b"success",
            &[0xc2, 0xa4],
            b"data",
            &[0xc4, 0x00, 0xa7],
            b"context",
            &[0x80]
        ]
        .concat()
    );
}

#[test]
fn unknown_instances_and_bad_keys_fail_cleanly() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    c.register_engine_driven_context(&payload(7, 1, false))
        .unwrap();
    let t = tokens(10, 512);
    let k = key(MODEL, "", &t, Some(0), 1, 0, 512, "r");
    let unavailable = PrepareStoreResponse::encode_unavailable();
    let prepare = |c: &mut MpClient, k: &connector_protocol::IpcCacheServerKey, id: u64| {
        c.call(Op::PrepareStore, &[codec::encode(k), codec::encode_u64(id)])
            .unwrap()
            .unwrap()
    };
    assert_eq!(prepare(&mut c, &k, 8), unavailable, "unknown instance");
    let mut bad = k.clone();
    bad.end = 300;
    assert_eq!(prepare(&mut c, &bad, 7), unavailable, "unaligned range");
    bad = k.clone();
    bad.model_name = "other".into();
    assert_eq!(
        prepare(&mut c, &bad, 7),
        unavailable,
        "not the registered model"
    );
    bad = k.clone();
    bad.worker_id = None;
    assert_eq!(prepare(&mut c, &bad, 7), unavailable, "no worker rank");
    assert!(!c.prepare_retrieve(&k, 8).unwrap().success);
    assert!(!c.commit_store(&k, 8, b"").unwrap());
    assert!(!c.commit_retrieve(&k, 8).unwrap());
    assert_eq!(s.cwm.tiers.l1_occupancy().used_bytes, 0);
}

#[test]
fn a_repeated_prepare_starts_over() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    c.register_engine_driven_context(&payload(7, 1, false))
        .unwrap();
    let t = tokens(11, 256);
    let k = key(MODEL, "", &t, Some(0), 1, 0, 256, "r");
    assert_eq!(
        c.prepare_store(&k, 7).unwrap().context.chunk_indices,
        vec![0]
    );
    assert_eq!(
        c.prepare_store(&k, 7).unwrap().context.chunk_indices,
        vec![0],
        "a retry gets the chunk again, not 'being stored'"
    );
    assert_eq!(s.cwm.tiers.l1_occupancy().used_bytes, object_bytes(false));
    assert!(c.commit_store(&k, 7, b"").unwrap());
    assert_eq!(s.cwm.tiers.l1_occupancy().objects, 1);
}

#[test]
fn uncommitted_prepares_expire_and_free_their_space() {
    let s = sidecar(Config {
        engine_driven_ttl_secs: 1,
        ..small_config()
    });
    let mut c = client(&s);
    let pool = Pool::open(
        &c.register_engine_driven_context(&payload(7, 1, false))
            .unwrap(),
    );
    let (t, u) = (tokens(12, 256), tokens(13, 256));
    // u is stored and looked up; its retrieve is prepared but never committed.
    ed_store(&mut c, &pool, 7, &u, 0, 256);
    assert_eq!(hits(&mut c, &u, 1, 256, "u"), 1);
    let ku = key(MODEL, "", &u, Some(0), 1, 0, 256, "u");
    assert!(c.prepare_retrieve(&ku, 7).unwrap().success);
    // t's store is prepared but never committed (the worker died mid-copy).
    let k = key(MODEL, "", &t, Some(0), 1, 0, 256, "r");
    assert_eq!(c.prepare_store(&k, 7).unwrap().context.slots.len(), 1);
    let other = key(MODEL, "", &t, Some(0), 1, 0, 256, "other");
    assert!(
        c.prepare_store(&other, 7).unwrap().context.slots.is_empty(),
        "being stored by the first request"
    );
    assert_eq!(
        s.cwm.tiers.l1_occupancy().used_bytes,
        2 * object_bytes(false)
    );
    assert_eq!(s.cwm.engine_driven.pending(), (1, 1));

    wait_until(
        "the sweeper releases both prepares",
        Duration::from_secs(5),
        || s.cwm.engine_driven.pending() == (0, 0),
    );
    assert_eq!(
        s.cwm.tiers.l1_occupancy().used_bytes,
        object_bytes(false),
        "t's reservation freed"
    );
    assert_eq!(
        s.cwm.tiers.lock_count(&object_key(&u, 0, 1, 0)),
        0,
        "u's lock released"
    );
    assert!(!c.commit_store(&k, 7, b"").unwrap(), "too late");
    assert!(!c.commit_retrieve(&ku, 7).unwrap());
    assert_eq!(hits(&mut c, &t, 1, 256, "t"), 0);
    assert_eq!(
        c.prepare_store(&other, 7).unwrap().context.slots.len(),
        1,
        "the chunk can be stored again"
    );
    // u is neither locked nor pinned any more: clear drops it.
    c.clear(false).unwrap();
    assert_eq!(s.cwm.tiers.l1_occupancy().objects, 0);
}

#[test]
fn unregister_releases_everything_of_the_instance() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let pool = Pool::open(
        &c.register_engine_driven_context(&payload(7, 1, false))
            .unwrap(),
    );
    c.register_engine_driven_context(&payload(8, 1, false))
        .unwrap();
    let (t, u, v) = (tokens(14, 256), tokens(15, 256), tokens(16, 256));
    ed_store(&mut c, &pool, 7, &u, 0, 256);
    assert_eq!(hits(&mut c, &u, 1, 256, "u"), 1);
    let ku = key(MODEL, "", &u, Some(0), 1, 0, 256, "u");
    assert!(c.prepare_retrieve(&ku, 7).unwrap().success);
    let k = key(MODEL, "", &t, Some(0), 1, 0, 256, "t");
    assert_eq!(c.prepare_store(&k, 7).unwrap().context.slots.len(), 1);
    // Another instance's prepare is not touched.
    let kv = key(MODEL, "", &v, Some(0), 1, 0, 256, "v");
    assert_eq!(c.prepare_store(&kv, 8).unwrap().context.slots.len(), 1);
    assert_eq!(s.cwm.engine_driven.pending(), (2, 1));

    c.unregister_engine_driven_context(7).unwrap();
    assert_eq!(s.cwm.engine_driven.pending(), (1, 0));
    assert_eq!(s.cwm.tiers.lock_count(&object_key(&u, 0, 1, 0)), 0);
    assert_eq!(
        s.cwm.tiers.l1_occupancy().used_bytes,
        2 * object_bytes(false),
        "u and v's reservation"
    );
    assert!(!c.commit_store(&k, 7, b"").unwrap());
    assert!(!c.prepare_retrieve(&ku, 7).unwrap().success);
    assert!(c.commit_store(&kv, 8, b"").unwrap());
    // Unregistering twice (or an unknown id) is answered too.
    c.unregister_engine_driven_context(7).unwrap();
    // The model stays served while instance 8 is registered, then no longer.
    assert_eq!(hits(&mut c, &u, 1, 256, "u2"), 1);
    c.free_lookup_locks(&key(MODEL, "", &u, None, 1, 0, 256, "u2"))
        .unwrap();
    c.unregister_engine_driven_context(8).unwrap();
    assert_eq!(hits(&mut c, &u, 1, 256, "u3"), 0);
    assert!(s.cwm.engine_driven.is_empty());
}

#[test]
fn a_silent_worker_is_reaped_with_its_pending_prepares() {
    let s = sidecar(Config {
        worker_reap_timeout_secs: 1,
        ..small_config()
    });
    let mut c = client(&s);
    c.register_engine_driven_context(&payload(7, 1, false))
        .unwrap();
    assert!(c.ping(Some(7)).unwrap());
    let t = tokens(17, 512);
    let k = key(MODEL, "", &t, Some(0), 1, 0, 512, "r");
    assert_eq!(c.prepare_store(&k, 7).unwrap().context.slots.len(), 2);
    wait_until(
        "the silent worker is reaped",
        Duration::from_secs(6),
        || s.cwm.engine_driven.is_empty(),
    );
    assert_eq!(s.cwm.engine_driven.pending(), (0, 0));
    assert_eq!(s.cwm.tiers.l1_occupancy().used_bytes, 0);
}

#[test]
fn tensor_parallel_hits_need_every_rank() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let pool = Pool::open(
        &c.register_engine_driven_context(&payload(10, 2, false))
            .unwrap(),
    );
    c.register_engine_driven_context(&payload(11, 2, false))
        .unwrap();
    let t = tokens(18, 256);
    let store = |c: &mut MpClient, id: u64, rank: u32| {
        let k = key(MODEL, "", &t, Some(rank), 2, 0, 256, "tp");
        let prepared = c.prepare_store(&k, id).unwrap().context;
        pool.write(
            &prepared.slots[0],
            &chunk_bytes(rank as u64, object_bytes(false)),
        );
        assert!(c.commit_store(&k, id, b"").unwrap());
    };
    store(&mut c, 10, 0);
    assert_eq!(hits(&mut c, &t, 2, 256, "q1"), 0, "rank 1 missing");
    store(&mut c, 11, 1);
    assert_eq!(hits(&mut c, &t, 2, 256, "q2"), 1);
    for (id, rank) in [(10, 0), (11, 1)] {
        let k = key(MODEL, "", &t, Some(rank), 2, 0, 256, "q2");
        let got = c.prepare_retrieve(&k, id).unwrap();
        assert_eq!(
            pool.read(&got.context.slots[0]),
            chunk_bytes(rank as u64, object_bytes(false)),
            "rank {rank} reads its own object"
        );
        assert!(c.commit_retrieve(&k, id).unwrap());
    }
}

#[test]
fn re_registering_answers_the_same_pool() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let first = c
        .register_engine_driven_context(&payload(7, 1, false))
        .unwrap();
    let again = c
        .register_engine_driven_context(&payload(7, 1, false))
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(s.cwm.engine_driven.len(), 1);
    // Golden reply bytes: {shm_name, pool_size}.
    let raw = c
        .call(
            Op::RegisterKvCacheEngineDrivenContext,
            &[codec::encode(&payload(7, 1, false))],
        )
        .unwrap()
        .unwrap();
    let mut want = vec![0x82, 0xa8];
    want.extend(b"shm_name");
    want.push(0xa0 | first.shm_name.len() as u8);
    want.extend(first.shm_name.as_bytes());
    want.push(0xa9);
    want.extend(b"pool_size");
    want.extend(codec::encode_u64(first.pool_size));
    assert_eq!(raw, want);
}

#[test]
fn invalid_registrations_are_answered_with_pickle_mode() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let pickle = RegisterEngineDrivenContextResponse::default();
    for bad in [
        RegisterEngineDrivenContextPayload {
            dtype_str: "float7".into(),
            ..payload(1, 1, false)
        },
        RegisterEngineDrivenContextPayload {
            num_layers: 0,
            ..payload(1, 1, false)
        },
        RegisterEngineDrivenContextPayload {
            hidden_dim_size: 1 << 40,
            ..payload(1, 1, false)
        },
        RegisterEngineDrivenContextPayload {
            model_name: "a@b".into(),
            ..payload(1, 1, false)
        },
    ] {
        assert_eq!(
            c.register_engine_driven_context(&bad).unwrap(),
            pickle,
            "{bad:?}"
        );
    }
    assert!(s.cwm.engine_driven.is_empty());
    // A malformed payload frame is answered too (not left without a reply).
    let raw = c
        .call(
            Op::RegisterKvCacheEngineDrivenContext,
            &[codec::encode_u64(3)],
        )
        .unwrap()
        .unwrap();
    assert_eq!(raw, codec::encode(&pickle));
}

#[test]
fn without_engine_driven_the_worker_gets_pickle_mode_and_clean_failures() {
    let s = sidecar(Config {
        engine_driven: false,
        ..small_config()
    });
    assert!(s.cwm.tiers.pool().is_none());
    let mut c = client(&s);
    let answer = c
        .register_engine_driven_context(&payload(7, 1, false))
        .unwrap();
    assert_eq!(answer, RegisterEngineDrivenContextResponse::default());
    let t = tokens(19, 256);
    let k = key(MODEL, "", &t, Some(0), 1, 0, 256, "r");
    let raw = c
        .call(Op::PrepareStore, &[codec::encode(&k), codec::encode_u64(7)])
        .unwrap()
        .unwrap();
    assert_eq!(raw, PrepareStoreResponse::encode_unavailable());
    assert!(!c.commit_store(&k, 7, b"pickle").unwrap());
    assert!(!c.prepare_retrieve(&k, 7).unwrap().success);
    assert!(!c.commit_retrieve(&k, 7).unwrap());
}

#[test]
fn the_pool_is_unlinked_when_the_sidecar_stops() {
    let s = sidecar(small_config());
    let name = s.cwm.tiers.pool().unwrap().shm_name;
    let path = Path::new("/dev/shm").join(&name);
    assert!(path.exists());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    s.stop();
    assert!(!path.exists(), "{path:?} still there");
}

#[test]
fn a_named_pool_is_exclusive_while_its_cwm_runs() {
    let name = format!("cwm_it_named_pool_{}", std::process::id());
    let config = Config {
        shm_name: Some(format!("/{name}")),
        ..small_config()
    };
    let first = sidecar(config.clone());
    assert_eq!(first.cwm.tiers.pool().unwrap().shm_name, name);
    let err = Sidecar::start(&Config {
        host: "127.0.0.1".into(),
        port: 0,
        ..config.clone()
    })
    .err()
    .expect("a second cwm cannot take a live pool");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(first);
    // Left behind by a cwm that was killed: a later one replaces it.
    std::fs::write(Path::new("/dev/shm").join(&name), b"stale").unwrap();
    let second = sidecar(config);
    assert_eq!(
        std::fs::metadata(Path::new("/dev/shm").join(&name))
            .unwrap()
            .len(),
        second.cwm.tiers.l1_occupancy().capacity_bytes + cwm::store::arena::POOL_TAIL
    );
}

/// Engine-driven stores are written behind to L2 like `store`'s, and a restarted cwm (a new
/// pool: the engine unregistered, so nothing maps the old one) promotes them from disk into
/// its pool for an engine-driven retrieve.
#[test]
fn engine_driven_chunks_survive_a_restart_through_l2() {
    let dir = tempfile::tempdir().unwrap();
    let t = tokens(20, 600);
    let len = object_bytes(false);
    let first_pool = {
        let s = sidecar(disk_config(dir.path()));
        let mut c = client(&s);
        let answer = c
            .register_engine_driven_context(&payload(7, 1, false))
            .unwrap();
        let pool = Pool::open(&answer);
        assert_eq!(ed_store(&mut c, &pool, 7, &t, 0, 512), vec![0, 1]);
        wait_until(
            "write-behind wrote both chunks",
            Duration::from_secs(20),
            || s.cwm.tiers.stats().write_behind.written >= 2,
        );
        c.unregister_engine_driven_context(7).unwrap();
        s.stop();
        answer.shm_name
    };
    let s = sidecar(disk_config(dir.path()));
    assert_eq!(s.cwm.tiers.l1_occupancy().objects, 0, "L1 starts empty");
    let mut c = client(&s);
    let answer = c
        .register_engine_driven_context(&payload(8, 1, false))
        .unwrap();
    assert_ne!(answer.shm_name, first_pool, "a new pool");
    let pool = Pool::open(&answer);
    assert_eq!(
        hits(&mut c, &t, 1, 512, "r"),
        2,
        "found on disk, promoted into the pool"
    );
    let k = key(MODEL, "", &t, Some(0), 1, 0, 512, "r");
    let got = c.prepare_retrieve(&k, 8).unwrap();
    assert!(got.success);
    for (n, slot) in got.context.slots.iter().enumerate() {
        assert_eq!(pool.read(slot), chunk_bytes(n as u64, len), "chunk {n}");
    }
    assert!(c.commit_retrieve(&k, 8).unwrap());
}

/// vLLM's CPU default mode feeds the session index like `store` does: an engine-driven
/// conversation can be frozen as a window, and after a restart thawed into the new pool,
/// where an engine-driven retrieve reads it back byte-exact.
#[test]
fn engine_driven_sessions_freeze_and_thaw() {
    use cwm::windows::{FreezeRequest, ThawRequest};
    let dir = tempfile::tempdir().unwrap();
    let (salt, t, len) = ("agent-ed", tokens(21, 700), object_bytes(false));
    {
        let s = sidecar(disk_config(dir.path()));
        let mut c = client(&s);
        let pool = Pool::open(
            &c.register_engine_driven_context(&payload(7, 1, false))
                .unwrap(),
        );
        assert_eq!(
            ed_store_salted(&mut c, &pool, 7, salt, &t, 0, 512),
            vec![0, 1]
        );
        let frozen = s
            .windows
            .freeze(&FreezeRequest {
                session_id: salt.into(),
                window_name: "ed-window".into(),
                ..Default::default()
            })
            .expect("an engine-driven session freezes");
        assert_eq!(frozen.tokens_left_out, 0);
        s.stop();
    }
    let s = sidecar(disk_config(dir.path()));
    let mut c = client(&s);
    let pool = Pool::open(
        &c.register_engine_driven_context(&payload(8, 1, false))
            .unwrap(),
    );
    let thawed = s
        .windows
        .thaw(
            &ThawRequest {
                window_name: "ed-window".into(),
                new_session_id: None,
            },
            &|_, _| {},
        )
        .expect("thaws");
    assert_eq!((thawed.chunks_ready, thawed.tokens_ready), (2, 512));
    let k = key(MODEL, salt, &t, Some(0), 1, 0, 512, "r");
    c.lookup(&k).unwrap();
    assert_eq!(
        c.query_prefetch_status("r").unwrap(),
        2,
        "thawed chunks are in L1"
    );
    let got = c.prepare_retrieve(&k, 8).unwrap();
    assert!(got.success);
    for (n, slot) in got.context.slots.iter().enumerate() {
        assert_eq!(pool.read(slot), chunk_bytes(n as u64, len), "chunk {n}");
    }
    assert!(c.commit_retrieve(&k, 8).unwrap());
}

/// A frozen window's records say the element size of what they hold (docs/FORMATS.md), and an
/// export carries L2's records verbatim. Before: freeze wrote `itemsize = 2` whatever the
/// dtype, and export decompressed and recompressed every record (with zstd, here where L2
/// stores raw) under that same 2.
#[test]
fn frozen_and_exported_records_keep_the_dtype_and_the_bytes() {
    use cwm::store::codec::Codec;
    use cwm::store::record::Record;
    use cwm::windows::FreezeRequest;
    let dir = tempfile::tempdir().unwrap();
    let s = sidecar(Config {
        // Write-behind drops everything: the freeze writes every record itself.
        l2_write_queue_mb: 0,
        l2_compression: "none".into(),
        ..disk_config(dir.path())
    });
    let mut c = client(&s);
    let fp32 = RegisterEngineDrivenContextPayload {
        dtype_str: "float32".into(),
        ..payload(7, 1, false)
    };
    let pool = Pool::open(&c.register_engine_driven_context(&fp32).unwrap());
    let (salt, t) = ("fp32-agent", tokens(33, 512));
    assert_eq!(
        ed_store_salted(&mut c, &pool, 7, salt, &t, 0, 512),
        vec![0, 1]
    );
    assert_eq!(s.cwm.tiers.stats().write_behind.written, 0);
    s.windows
        .freeze(&FreezeRequest {
            session_id: salt.into(),
            window_name: "fp32".into(),
            ..Default::default()
        })
        .expect("freezes");
    let file = dir.path().join("fp32.cwmx");
    s.windows.export("fp32", &file).expect("exports");
    // The window file: magic, version, reserved, manifest, record count, (length, record)*.
    let b = std::fs::read(&file).unwrap();
    let mlen = u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize;
    let mut at = 12 + mlen;
    let n = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    at += 4;
    assert_eq!(n, 2);
    for chunk in 0..n {
        let len = u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize;
        let r = Record::parse(&b[at + 8..at + 8 + len], 0).unwrap();
        assert_eq!(
            (r.header.itemsize, r.header.codec),
            (4, Codec::Raw),
            "chunk {chunk}: float32 elements, stored raw as L2 stores them"
        );
        assert_eq!(
            r.payload,
            chunk_bytes(chunk as u64, 2 * object_bytes(false))
        );
        at += 8 + len;
    }
}
