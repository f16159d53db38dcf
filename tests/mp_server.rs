//! End-to-end behaviour of `cwm serve`'s MP server through real ZMQ and real shared memory.

mod common;

use common::*;
use connector_protocol::{codec, Op, TransferResult};
use cwm::config::Config;

const MODEL: &str = "it-model";

fn register(c: &mut cwm::client::MpClient, id: u64, kv: &TestKv, world_size: u32) {
    c.register_kv_cache(
        id,
        &kv.descriptors(),
        MODEL,
        world_size,
        kv.hint(),
        &kv.groups(),
    )
    .unwrap();
}

/// Store 2 chunks from `src` blocks 1..=32, look up, retrieve into `dst` blocks 40..72.
fn roundtrip(src_layout: Layout, dst_layout: Layout) {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let (src, dst) = (
        TestKv::new(src_layout, 3, 80, 16, 2, 32),
        TestKv::new(dst_layout, 3, 80, 16, 2, 32),
    );
    src.fill(1);
    dst.fill_byte(0xEE);
    register(&mut c, 1, &src, 1);
    register(&mut c, 2, &dst, 1);
    let t = tokens(7, 600);
    assert_eq!(
        c.store(
            &key(MODEL, "", &t, Some(0), 1, 0, 512, "r"),
            1,
            &blocks(1, 32)
        )
        .unwrap(),
        TransferResult::DONE
    );
    c.lookup(&key(MODEL, "", &t, None, 1, 0, 512, "r")).unwrap();
    assert_eq!(c.query_prefetch_status("r").unwrap(), 2);
    assert_eq!(
        c.query_prefetch_status("r").unwrap(),
        0,
        "a lookup result is handed out once"
    );
    assert!(
        c.retrieve(
            &key(MODEL, "", &t, Some(0), 1, 0, 512, "r"),
            2,
            &blocks(40, 32),
            0
        )
        .unwrap()
        .ok
    );
    for j in 0..32 {
        assert_eq!(
            src.block(1 + j),
            dst.block(40 + j),
            "{src_layout:?}->{dst_layout:?} block {j}"
        );
    }
    assert_eq!(
        dst.block(39),
        vec![0xEE; dst.block(39).len()],
        "neighbours untouched"
    );
    assert_eq!(dst.block(72), vec![0xEE; dst.block(72).len()]);
}

#[test]
fn roundtrip_nhd() {
    roundtrip(Layout::Nhd, Layout::Nhd);
}

#[test]
fn roundtrip_hnd() {
    roundtrip(Layout::Hnd, Layout::Hnd);
}

#[test]
fn roundtrip_two_major() {
    roundtrip(Layout::TwoMajor, Layout::TwoMajor);
}

#[test]
fn objects_are_canonical_across_layouts() {
    roundtrip(Layout::Nhd, Layout::Hnd);
    roundtrip(Layout::Hnd, Layout::Nhd);
}

#[test]
fn retrieve_skips_prefix_blocks_and_never_writes_block_zero() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let (src, dst) = (
        TestKv::new(Layout::Nhd, 2, 64, 16, 2, 32),
        TestKv::new(Layout::Nhd, 2, 64, 16, 2, 32),
    );
    src.fill(3);
    dst.fill_byte(0xEE);
    register(&mut c, 1, &src, 1);
    register(&mut c, 2, &dst, 1);
    let t = tokens(9, 512);
    // Chunk 1 is all null blocks: it must not be stored.
    let mut b = blocks(1, 16);
    b[0].extend([0; 16]);
    assert!(
        c.store(&key(MODEL, "", &t, Some(0), 1, 0, 512, "r"), 1, &b)
            .unwrap()
            .ok
    );
    c.lookup(&key(MODEL, "", &t, None, 1, 0, 512, "r")).unwrap();
    assert_eq!(
        c.query_prefetch_status("r").unwrap(),
        1,
        "the null chunk was not stored"
    );
    // Retrieve chunk 0 into blocks [0, 20..35]: skip 48 tokens = 3 blocks; block 0 never written.
    let mut into = vec![0u32];
    into.extend(20..35);
    assert!(
        c.retrieve(
            &key(MODEL, "", &t, Some(0), 1, 0, 256, "r"),
            2,
            &[into.clone()],
            48
        )
        .unwrap()
        .ok
    );
    let untouched = vec![0xEE; dst.block(0).len()];
    assert_eq!(dst.block(0), untouched, "null block written");
    for (j, &b) in into.iter().enumerate().skip(1) {
        if j < 3 {
            assert_eq!(dst.block(b as u64), untouched, "skipped block {j} written");
        } else {
            assert_eq!(dst.block(b as u64), src.block(1 + j as u64), "block {j}");
        }
    }
}

#[test]
fn salt_and_model_isolate_objects() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let kv = TestKv::new(Layout::Nhd, 1, 40, 16, 1, 16);
    kv.fill(5);
    register(&mut c, 1, &kv, 1);
    c.register_kv_cache(
        2,
        &kv.descriptors(),
        "other-model",
        1,
        kv.hint(),
        &kv.groups(),
    )
    .unwrap();
    let t = tokens(11, 256);
    assert!(
        c.store(
            &key(MODEL, "alice", &t, Some(0), 1, 0, 256, "s"),
            1,
            &blocks(1, 16)
        )
        .unwrap()
        .ok
    );
    for (model, salt, want) in [
        (MODEL, "alice", 1),
        (MODEL, "bob", 0),
        (MODEL, "", 0),
        ("other-model", "alice", 0),
    ] {
        c.lookup(&key(model, salt, &t, None, 1, 0, 256, "q"))
            .unwrap();
        assert_eq!(
            c.query_prefetch_status("q").unwrap(),
            want,
            "model {model} salt {salt:?}"
        );
    }
    // A retrieve under another salt fails rather than serving alice's bytes.
    assert!(
        !c.retrieve(
            &key(MODEL, "bob", &t, Some(0), 1, 0, 256, "q"),
            1,
            &blocks(20, 16),
            0
        )
        .unwrap()
        .ok
    );
    // An invalid salt is refused.
    assert!(
        !c.store(
            &key(MODEL, "a/b", &t, Some(0), 1, 0, 256, "s"),
            1,
            &blocks(1, 16)
        )
        .unwrap()
        .ok
    );
}

#[test]
fn tensor_parallel_hits_need_every_rank() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let (r0, r1) = (
        TestKv::new(Layout::Nhd, 2, 40, 16, 1, 16),
        TestKv::new(Layout::Nhd, 2, 40, 16, 1, 16),
    );
    r0.fill(1);
    r1.fill(2);
    register(&mut c, 10, &r0, 2);
    register(&mut c, 11, &r1, 2);
    let t = tokens(13, 512);
    let lookup = |c: &mut cwm::client::MpClient| {
        c.lookup(&key(MODEL, "", &t, None, 2, 0, 512, "tp"))
            .unwrap();
        c.query_prefetch_status("tp").unwrap()
    };
    assert!(
        c.store(
            &key(MODEL, "", &t, Some(0), 2, 0, 512, "tp"),
            10,
            &blocks(1, 32)
        )
        .unwrap()
        .ok
    );
    assert_eq!(lookup(&mut c), 0, "rank 1 missing");
    assert!(
        c.store(
            &key(MODEL, "", &t, Some(1), 2, 0, 256, "tp"),
            11,
            &blocks(1, 16)
        )
        .unwrap()
        .ok
    );
    assert_eq!(lookup(&mut c), 1, "only chunk 0 has both ranks");
    // Each rank gets its own bytes back.
    r0.fill_byte(0);
    r1.fill_byte(0);
    let (want0, want1) = (
        TestKv::new(Layout::Nhd, 2, 40, 16, 1, 16),
        TestKv::new(Layout::Nhd, 2, 40, 16, 1, 16),
    );
    want0.fill(1);
    want1.fill(2);
    assert!(
        c.retrieve(
            &key(MODEL, "", &t, Some(0), 2, 0, 256, "tp"),
            10,
            &blocks(1, 16),
            0
        )
        .unwrap()
        .ok
    );
    assert!(
        c.retrieve(
            &key(MODEL, "", &t, Some(1), 2, 0, 256, "tp"),
            11,
            &blocks(1, 16),
            0
        )
        .unwrap()
        .ok
    );
    assert_eq!(r0.block(5), want0.block(5));
    assert_eq!(r1.block(5), want1.block(5));
    assert_ne!(r0.block(5), r1.block(5));
}

#[test]
fn failures_answer_false_and_change_nothing() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let kv = TestKv::new(Layout::Nhd, 1, 40, 16, 1, 16);
    kv.fill(1);
    register(&mut c, 1, &kv, 1);
    let t = tokens(17, 512);
    let k = key(MODEL, "", &t, Some(0), 1, 0, 512, "f");
    assert_eq!(
        c.store(&k, 99, &blocks(1, 32)).unwrap(),
        TransferResult::FAILED,
        "unknown instance"
    );
    assert!(
        !c.store(&k, 1, &blocks(1, 5)).unwrap().ok,
        "short block list"
    );
    assert!(
        !c.store(&k, 1, &[(1..33).collect(), (1..33).collect()])
            .unwrap()
            .ok,
        "two groups for one"
    );
    assert!(
        !c.store(&k, 1, &[(30..62).collect()]).unwrap().ok,
        "block id beyond the cache"
    );
    assert!(
        !c.store(
            &key(MODEL, "", &t, Some(0), 1, 0, 300, "f"),
            1,
            &blocks(1, 32)
        )
        .unwrap()
        .ok,
        "unaligned end"
    );
    assert!(
        !c.store(
            &key(MODEL, "", &t, Some(0), 1, 0, 768, "f"),
            1,
            &blocks(1, 48)
        )
        .unwrap()
        .ok,
        "end past tokens"
    );
    assert!(
        !c.retrieve(&k, 1, &blocks(1, 32), 0).unwrap().ok,
        "nothing stored"
    );
    c.lookup(&key(MODEL, "", &t, None, 1, 0, 512, "f")).unwrap();
    assert_eq!(
        c.query_prefetch_status("f").unwrap(),
        0,
        "no failed store left anything behind"
    );
    assert_eq!(s.cwm.tiers.l1_occupancy().objects, 0);
    assert_eq!(c.query_prefetch_status("never-looked-up").unwrap(), 0);
}

/// `kv`'s descriptors, pointing at the shm object `name` instead of its own segment.
fn descriptors_named(kv: &TestKv, name: &str) -> Vec<connector_protocol::IpcDescriptor> {
    kv.descriptors()
        .into_iter()
        .map(|d| match d {
            connector_protocol::IpcDescriptor::CpuShm {
                nbytes, metadata, ..
            } => connector_protocol::IpcDescriptor::CpuShm {
                shm_name: name.to_string(),
                nbytes,
                metadata,
            },
            other => other,
        })
        .collect()
}

/// Store one chunk of `salt` from `honest` (blocks 1..=16), then try to retrieve it into
/// instance 2, registered with descriptors naming `target`. Returns whether that retrieve
/// succeeded; the chunk still reads back byte-exact into `honest` afterwards.
fn retrieve_into_foreign_object(s: &cwm::serve::Sidecar, target: &str, salt: &str) -> bool {
    let mut c = client(s);
    let honest = TestKv::new(Layout::Nhd, 2, 40, 16, 1, 64);
    honest.fill(3);
    register(&mut c, 1, &honest, 1);
    let t = tokens(41, 256);
    let k = |rid| key(MODEL, salt, &t, Some(0), 1, 0, 256, rid);
    assert!(c.store(&k("s"), 1, &blocks(1, 16)).unwrap().ok);
    let stored: Vec<Vec<u8>> = (1..=16).map(|b| honest.block(b)).collect();
    c.register_kv_cache(
        2,
        &descriptors_named(&honest, target),
        MODEL,
        1,
        honest.hint(),
        &honest.groups(),
    )
    .unwrap();
    assert_eq!(
        lookup_hits(&mut c, &key(MODEL, salt, &t, None, 1, 0, 256, "l")),
        1
    );
    let foreign = c.retrieve(&k("x"), 2, &blocks(1, 16), 0).unwrap().ok;
    honest.fill_byte(0);
    assert_eq!(
        lookup_hits(&mut c, &key(MODEL, salt, &t, None, 1, 0, 256, "m")),
        1
    );
    assert!(c.retrieve(&k("y"), 1, &blocks(1, 16), 0).unwrap().ok);
    let back: Vec<Vec<u8>> = (1..=16).map(|b| honest.block(b)).collect();
    assert!(back == stored, "the stored chunk changed");
    foreign
}

/// A client registering a symlink in /dev/shm that points at an ordinary file must not make
/// cwm write into that file (cwm often runs as root in containers).
#[test]
fn a_symlink_registered_as_kv_cache_is_refused_and_its_target_unchanged() {
    let s = sidecar(small_config());
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    let original = vec![0x5a_u8; 1 << 20];
    std::fs::write(&victim, &original).unwrap();
    let link = format!("cwm_it_link_{}", std::process::id());
    let link_path = std::path::Path::new("/dev/shm").join(&link);
    let _ = std::fs::remove_file(&link_path);
    std::os::unix::fs::symlink(&victim, &link_path).unwrap();
    let wrote = retrieve_into_foreign_object(&s, &link, "tenant-a");
    let _ = std::fs::remove_file(&link_path);
    assert!(!wrote, "a retrieve through the symlink succeeded");
    assert!(
        std::fs::read(&victim).unwrap() == original,
        "the symlink's target file was written"
    );
}

/// cwm's own L1 pool registered as an engine KV cache: a retrieve into it would overwrite
/// other tenants' chunks, which cwm then serves to their owners.
#[test]
fn cwm_own_l1_pool_registered_as_kv_cache_is_refused() {
    let pool = format!("cwm_it_pool_{}", std::process::id());
    let s = sidecar(Config {
        engine_driven: true,
        shm_name: Some(pool.clone()),
        ..small_config()
    });
    assert!(
        !retrieve_into_foreign_object(&s, &pool, "tenant-b"),
        "a retrieve into cwm's own L1 pool succeeded"
    );
}

#[test]
fn cuda_descriptors_are_refused_cleanly() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    register_cuda(&mut c, 5, MODEL);
    let t = tokens(1, 256);
    assert!(
        !c.store(
            &key(MODEL, "", &t, Some(0), 1, 0, 256, "c"),
            5,
            &blocks(1, 16)
        )
        .unwrap()
        .ok
    );
    assert_eq!(c.get_chunk_size().unwrap(), 256, "still serving");
}

/// An undecodable message with an 8 MiB op frame used to be answered with that frame echoed
/// back (and logged verbatim): a client that never read its replies could grow cwm's memory by
/// the size of what it sent. Frames longer than any real uid or op are not echoed.
#[test]
fn huge_uid_or_op_frames_are_not_echoed() {
    let s = sidecar(small_config());
    let c = client(&s);
    let before = cwm::limits::Limit::MpEcho.count();
    c.send_raw(&[vec![0x05], vec![b'x'; 8 << 20]]).unwrap();
    c.send_raw(&[vec![0x0b], Op::GetChunkSize.to_frame()])
        .unwrap();
    let r = c
        .recv_raw()
        .unwrap()
        .expect("the valid request is answered");
    assert_eq!(r[0], vec![0x0b], "the huge frame was echoed first");
    assert_eq!(cwm::limits::Limit::MpEcho.count(), before + 1);
}

#[test]
fn malformed_frames_are_answered_and_the_server_goes_on() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let send = |c: &cwm::client::MpClient, frames: Vec<Vec<u8>>| {
        c.send_raw(&frames).unwrap();
        c.recv_raw().unwrap()
    };
    // Garbage op frame: echoed with no payload.
    let r = send(&c, vec![vec![0x05], vec![0xc1, 0xff]]).expect("answered");
    assert_eq!(r, vec![vec![0x05], vec![0xc1, 0xff]]);
    // Unknown op name: answered with no payload.
    let r = send(&c, vec![vec![0x06], codec::encode_str("frobnicate")]).expect("answered");
    assert_eq!(r.len(), 2);
    // Store with a bad key and with the wrong arity: (b"", False).
    let store = Op::Store.to_frame();
    for payloads in [
        vec![vec![0xc1], vec![1], vec![0x90], vec![0xc4, 0]],
        vec![vec![0x90]],
    ] {
        let mut frames = vec![vec![0x07], store.clone()];
        frames.extend(payloads);
        let r = send(&c, frames).expect("answered");
        assert_eq!(r[2], TransferResult::FAILED.encode());
    }
    // Retrieve with a truncated payload and query with a non-string: failure values.
    let r = send(&c, vec![vec![0x08], Op::Retrieve.to_frame(), vec![0x8a]]).expect("answered");
    assert_eq!(
        TransferResult::decode(&r[2]).unwrap(),
        TransferResult::FAILED
    );
    let r = send(
        &c,
        vec![vec![0x09], Op::QueryPrefetchStatus.to_frame(), vec![0x01]],
    )
    .expect("answered");
    assert_eq!(r[2], vec![0x00]);
    // A lone frame cannot be answered (no uid to echo) but does not hurt.
    c.send_raw(&[vec![0x01]]).unwrap();
    assert_eq!(c.get_chunk_size().unwrap(), 256);
    assert!(c.ping(None).unwrap());
}

#[test]
fn golden_requests_get_golden_replies() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/connector-protocol/tests/fixtures/captured_frames.json"
    ))
    .unwrap();
    let messages: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let s = sidecar(small_config());
    let c = client(&s);
    let expected: &[(&str, Option<&str>)] = &[
        ("get_chunk_size", Some("cd0100")),
        ("get_experimental", Some("90")),
        ("ping", Some("c3")),
        ("noop", Some("a24f4b")),
        ("lookup", None),
        ("query_prefetch_status", Some("00")),
        ("free_lookup_locks", None),
        ("end_session", None),
        ("report_block_allocation", None),
        ("clear", None),
        ("unregister_kv_cache", None),
        ("store", Some("92c400c2")),
        ("retrieve", Some("92c400c2")),
    ];
    let frames_of = |m: &serde_json::Value| -> Vec<Vec<u8>> {
        m["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| hex::decode(f.as_str().unwrap()).unwrap())
            .collect()
    };
    // The golden pings name an instance this server does not know: cwm answers the first ping
    // of such an instance false, so a connector re-registers (issue 20; LMCache answers true
    // always). Sent once here, they are answered true below, as the golden replies have it.
    for m in messages.iter().filter(|m| m["op"] == "ping") {
        let frames = frames_of(m);
        c.send_raw(&frames).unwrap();
        c.recv_raw().unwrap().expect("ping answered");
    }
    let mut checked = 0;
    for m in &messages {
        let op = m["op"].as_str().unwrap();
        let Some((_, want)) = expected.iter().find(|(name, _)| *name == op) else {
            continue;
        };
        let frames = frames_of(m);
        c.send_raw(&frames).unwrap();
        let reply = c
            .recv_raw()
            .unwrap()
            .unwrap_or_else(|| panic!("{op} not answered"));
        assert_eq!(
            &reply[..2],
            &frames[..2],
            "{op}: uid and op echoed verbatim"
        );
        assert_eq!(reply.get(2).map(hex::encode).as_deref(), *want, "{op}");
        checked += 1;
    }
    assert!(
        checked >= expected.len(),
        "only {checked} golden messages checked"
    );
}

#[test]
fn lookup_locks_keep_hits_servable_until_released() {
    // L1 holds exactly 2 objects of this shape (2 layers x 256 tokens x 32 bytes = 16 KiB).
    let s = sidecar(Config {
        l1_size_gb: 32.0 * 1024.0 / (1u64 << 30) as f64,
        ..small_config()
    });
    let mut c = client(&s);
    let kv = TestKv::new(Layout::Nhd, 2, 40, 16, 1, 16);
    kv.fill(1);
    register(&mut c, 1, &kv, 1);
    // Store a one-chunk request from blocks 1..17 of instance 1.
    let store = |c: &mut cwm::client::MpClient, t: &[u32], rid: &str| {
        c.store(
            &key(MODEL, "", t, Some(0), 1, 0, 256, rid),
            1,
            &blocks(1, 16),
        )
        .unwrap()
        .ok
    };
    let (a, b, x) = (tokens(1, 256), tokens(2, 256), tokens(3, 256));
    assert!(store(&mut c, &a, "a"));
    assert!(store(&mut c, &b, "b"));
    c.lookup(&key(MODEL, "", &a, None, 1, 0, 256, "a")).unwrap();
    assert_eq!(c.query_prefetch_status("a").unwrap(), 1);
    // a is the LRU object but locked: storing x evicts b.
    assert!(store(&mut c, &x, "x"));
    c.lookup(&key(MODEL, "", &b, None, 1, 0, 256, "b")).unwrap();
    assert_eq!(c.query_prefetch_status("b").unwrap(), 0, "b was evicted");
    assert!(
        c.retrieve(
            &key(MODEL, "", &a, Some(0), 1, 0, 256, "a"),
            1,
            &blocks(20, 16),
            0
        )
        .unwrap()
        .ok,
        "a survived"
    );
    // The retrieve released a's lock (and made it most recent): two new stores evict x, then a.
    let y = tokens(4, 256);
    assert!(store(&mut c, &b, "b"));
    assert!(store(&mut c, &y, "y"));
    c.lookup(&key(MODEL, "", &a, None, 1, 0, 256, "a2"))
        .unwrap();
    assert_eq!(
        c.query_prefetch_status("a2").unwrap(),
        0,
        "a evicted once unlocked"
    );
    c.free_lookup_locks(&key(MODEL, "", &a, None, 1, 0, 256, "a2"))
        .unwrap();
    c.end_session("a").unwrap();
    c.clear(false).unwrap();
    assert_eq!(s.cwm.tiers.l1_occupancy().objects, 0);
}

#[test]
fn four_concurrent_clients() {
    let s = sidecar(small_config());
    std::thread::scope(|scope| {
        for i in 0..4u32 {
            let s = &s;
            scope.spawn(move || {
                let mut c = client(s);
                let (src, dst) = (
                    TestKv::new(Layout::Hnd, 2, 40, 16, 2, 16),
                    TestKv::new(Layout::Hnd, 2, 40, 16, 2, 16),
                );
                src.fill(100 + i as u64);
                register(&mut c, 100 + i as u64 * 2, &src, 1);
                register(&mut c, 101 + i as u64 * 2, &dst, 1);
                for round in 0..5u32 {
                    let t = tokens(1000 * i + round, 512);
                    let salt = format!("tenant-{i}");
                    let rid = format!("c{i}-{round}");
                    assert!(
                        c.store(
                            &key(MODEL, &salt, &t, Some(0), 1, 0, 512, &rid),
                            100 + i as u64 * 2,
                            &blocks(1, 32)
                        )
                        .unwrap()
                        .ok
                    );
                    c.lookup(&key(MODEL, &salt, &t, None, 1, 0, 512, &rid))
                        .unwrap();
                    assert_eq!(c.query_prefetch_status(&rid).unwrap(), 2);
                    dst.fill_byte(0);
                    assert!(
                        c.retrieve(
                            &key(MODEL, &salt, &t, Some(0), 1, 0, 512, &rid),
                            101 + i as u64 * 2,
                            &blocks(1, 32),
                            0
                        )
                        .unwrap()
                        .ok
                    );
                    assert_eq!(src.block(7), dst.block(7));
                    c.end_session(&rid).unwrap();
                }
            });
        }
    });
}

#[test]
fn clients_reconnect_after_a_restart() {
    let first = sidecar(small_config());
    let port: u16 = first
        .mp_endpoint
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mut c = client(&first);
    assert_eq!(c.get_chunk_size().unwrap(), 256);
    first.stop();
    let second = Sidecar::start(&Config {
        host: "127.0.0.1".into(),
        port,
        http_port: 0,
        ..small_config()
    })
    .unwrap();
    let kv = TestKv::new(Layout::Nhd, 1, 40, 16, 1, 16);
    register(&mut c, 1, &kv, 1);
    let t = tokens(5, 256);
    assert!(
        c.store(
            &key(MODEL, "", &t, Some(0), 1, 0, 256, "r"),
            1,
            &blocks(1, 16)
        )
        .unwrap()
        .ok
    );
    c.lookup(&key(MODEL, "", &t, None, 1, 0, 256, "r")).unwrap();
    assert_eq!(c.query_prefetch_status("r").unwrap(), 1);
    drop(second);
}

use cwm::serve::Sidecar;

/// A second lookup of the same request replaces the first, and gives back the locks the first
/// still holds, no more (before: each repeat added `num_kv_readers` locks that stayed until the
/// TTL). Locks another request holds on the same objects are left alone.
#[test]
fn a_repeated_lookup_releases_what_the_first_still_holds() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    let kv = TestKv::new(Layout::Nhd, 2, 40, 16, 1, 16);
    kv.fill(1);
    register(&mut c, 1, &kv, 1);
    let t = tokens(5, 256);
    let k = |worker, rid| key(MODEL, "", &t, worker, 1, 0, 256, rid);
    assert!(c.store(&k(Some(0), "store"), 1, &blocks(1, 16)).unwrap().ok);
    let object = connector_protocol::ObjectKey {
        model: MODEL.into(),
        kv_rank: connector_protocol::kv_rank(1, 0),
        object_group: 0,
        chunk_hash: s.cwm.hasher.chunk_hashes(&t, 0, 256)[0],
        cache_salt: "".into(),
    };
    let locks = || s.cwm.tiers.lock_count(&object);
    for _ in 0..3 {
        assert_eq!(lookup_hits(&mut c, &k(None, "q")), 1);
    }
    assert_eq!(locks(), 1, "one lookup's lock, not three");
    // Another request locks the object too; q's retrieve gives back q's lock.
    assert_eq!(lookup_hits(&mut c, &k(None, "p")), 1);
    assert!(
        c.retrieve(&k(Some(0), "q"), 1, &blocks(20, 16), 0)
            .unwrap()
            .ok
    );
    assert_eq!(locks(), 1, "p's lock");
    // q holds nothing now: looking it up again must not release p's lock.
    assert_eq!(lookup_hits(&mut c, &k(None, "q")), 1);
    assert_eq!(lookup_hits(&mut c, &k(None, "q")), 1);
    assert_eq!(locks(), 2, "p's lock and q's newest");
    c.free_lookup_locks(&k(None, "q")).unwrap();
    c.free_lookup_locks(&k(None, "q")).unwrap();
    assert_eq!(locks(), 1, "freeing twice releases q's lock once");
}

/// The commands are transport-free: a front end that is not the MP protocol (`lm://`) builds
/// them as plain values and runs them on the same `Cwm`, and what one transport stored the
/// other finds, byte for byte.
#[test]
fn commands_built_without_msgpack_share_the_store_with_the_mp_protocol() {
    use cwm::ops::{Command, QueryPrefetchStatus, Retrieve, Store, WaitPrefetchStatus};

    let s = sidecar(small_config());
    let mut c = client(&s);
    let (src, dst) = (
        TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32),
        TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32),
    );
    src.fill(11);
    dst.fill_byte(0xEE);
    register(&mut c, 1, &src, 1);
    register(&mut c, 2, &dst, 1);
    let t = tokens(21, 512);

    // Stored by a command value (no frames), found and retrieved over MP.
    let stored = Store {
        key: key(MODEL, "", &t, Some(0), 1, 0, 512, "direct"),
        instance_id: 1,
        block_ids: blocks(1, 32),
        event: Vec::new(),
    }
    .run(&s.cwm)
    .unwrap();
    assert_eq!(stored, TransferResult::DONE);
    assert_eq!(
        lookup_hits(&mut c, &key(MODEL, "", &t, None, 1, 0, 512, "mp")),
        2
    );
    assert!(
        c.retrieve(
            &key(MODEL, "", &t, Some(0), 1, 0, 512, "mp"),
            2,
            &blocks(33, 32),
            0
        )
        .unwrap()
        .ok
    );
    for j in 0..32 {
        assert_eq!(src.block(1 + j), dst.block(33 + j), "block {j}");
    }

    // Stored over MP, looked up and retrieved by command values.
    let t2 = tokens(22, 256);
    assert!(
        c.store(
            &key(MODEL, "", &t2, Some(0), 1, 0, 256, "mp2"),
            1,
            &blocks(40, 16)
        )
        .unwrap()
        .ok
    );
    cwm::ops::Lookup {
        key: key(MODEL, "", &t2, None, 1, 0, 256, "direct2"),
        tp_size: 1,
    }
    .run(&s.cwm)
    .unwrap();
    let hits = WaitPrefetchStatus {
        request_id: "direct2".into(),
        timeout: std::time::Duration::from_secs(10),
    }
    .run(&s.cwm)
    .unwrap();
    assert_eq!(hits, Some(1));
    let again = QueryPrefetchStatus {
        request_id: "direct2".into(),
    };
    assert_eq!(again.run(&s.cwm).unwrap(), Some(0), "handed out once");
    let retrieved = Retrieve {
        key: key(MODEL, "", &t2, Some(0), 1, 0, 256, "direct2"),
        instance_id: 2,
        block_ids: blocks(1, 16),
        event: Vec::new(),
        skip_first_n_tokens: 0,
    }
    .run(&s.cwm)
    .unwrap();
    assert!(retrieved.ok);
    for j in 0..16 {
        assert_eq!(src.block(40 + j), dst.block(1 + j), "block {j}");
    }

    // A command's failure is a typed value too: a miss is an error, answered as FAILED on MP.
    let miss = Retrieve {
        key: key(MODEL, "", &tokens(23, 256), Some(0), 1, 0, 256, "none"),
        instance_id: 2,
        block_ids: blocks(1, 16),
        event: Vec::new(),
        skip_first_n_tokens: 0,
    }
    .run(&s.cwm);
    assert!(miss.is_err());
    assert_eq!(<Retrieve as Command>::failed(), TransferResult::FAILED);
}

/// Ops cwm does not serve are answered with no payload and counted under one name, so made-up
/// op names cannot grow the per-op counters (a hostile client once could, one entry per name).
#[test]
fn unknown_ops_are_answered_and_counted_under_one_name() {
    let s = sidecar(small_config());
    let before = s.cwm.counters.snapshot().len();
    for i in 0..1000 {
        let name = format!("made_up_op_{i}");
        let req = connector_protocol::Request {
            uid: b"u",
            op_frame: b"x",
            op: Op::from_name(&name),
            payloads: vec![],
        };
        assert_eq!(s.cwm.handle(&req), None);
    }
    let after = s.cwm.counters.snapshot();
    assert!(
        after.len() <= before + 1,
        "{} op counters after 1000 made-up names",
        after.len()
    );
    assert_eq!(s.cwm.counters.op(Op::StoreQ.static_name()).calls, 0);
    assert_eq!(s.cwm.counters.op("<other>").calls, 1000);
}

/// Issue 12: a client that sends requests and never reads the replies. Its replies queue in
/// cwm only up to the ROUTER's send high-water mark (`limits::MP_SEND_HWM`); past it every
/// reply to that client is dropped and counted (`cwm_refused_total{limit="mp_reply_queue"}`),
/// so the queue stops growing however much it sends. The server stays up for everyone else,
/// and every reply is either delivered or counted as dropped, none lost silently.
#[test]
fn a_client_that_never_reads_its_replies_cannot_grow_the_reply_queue() {
    use cwm::limits::Limit;
    let s = sidecar(small_config());
    // Small buffers on the client's side; the kernel's loopback buffers still hold ~10^5 of
    // these small replies before anything backs up into cwm.
    let ctx = zmq::Context::new();
    let hog = ctx.socket(zmq::DEALER).unwrap();
    hog.set_linger(0).unwrap();
    hog.set_rcvhwm(10).unwrap();
    hog.set_rcvbuf(4096).unwrap();
    hog.connect(&s.mp_endpoint).unwrap();
    let op = Op::GetChunkSize.to_frame();
    let mut sent = 0u64;
    let mut send = |n: u64| {
        for _ in 0..n {
            hog.send_multipart([codec::encode_u64(sent), op.clone()], 0)
                .unwrap();
            sent += 1;
        }
        sent
    };
    // Returns once cwm handled `total` requests of this test and sent (or dropped) their
    // replies: it handles a fresh client's request only after that.
    let handled = |total: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while s.cwm.counters.op("get_chunk_size").calls < total {
            assert!(
                std::time::Instant::now() < deadline,
                "cwm handled {} of {total} requests",
                s.cwm.counters.op("get_chunk_size").calls
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut fresh = client(&s);
        assert!(fresh.ping(None).unwrap(), "a fresh client is answered");
    };
    let dropped_before = Limit::MpReplyQueue.count();
    let dropped = || Limit::MpReplyQueue.count() - dropped_before;

    // Until replies are dropped: past every buffer on the way and the high-water mark.
    let mut first = 0;
    while dropped() == 0 {
        assert!(
            first < 2_000_000,
            "no reply of {first} to a client that never reads was dropped: the queue grows \
             without bound"
        );
        first = send(20_000);
        handled(first);
    }
    let after_first = dropped();
    assert!(
        first - after_first >= cwm::limits::MP_SEND_HWM as u64,
        "cwm dropped replies before {} were queued: {} of {first} dropped",
        cwm::limits::MP_SEND_HWM as u64,
        after_first
    );

    // The queue is full now: further replies are dropped, none is queued. The kernel may still
    // take a few more off the queue meanwhile (loopback send buffers grow by themselves, up to
    // tcp_wmem's limit), so batches are sent until one is dropped whole; what was queued after
    // the first drop must stay within what those buffers hold (~10^5 of these replies).
    let mut queued_since_first = 0;
    let total = loop {
        let before = dropped();
        let end = send(5_000);
        handled(end);
        let queued = 5_000 - (dropped() - before);
        if queued == 0 {
            break end;
        }
        queued_since_first += queued;
        assert!(
            queued_since_first <= 200_000,
            "replies were queued past the high-water mark: {queued_since_first} since the first \
             drop, the last batch {queued} of 5000"
        );
    };
    let metrics = cwm::metrics::render(&s.cwm, &s.windows.health());
    let exported: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("cwm_refused_total{limit=\"mp_reply_queue\"} "))
        .expect("the drops are exported")
        .parse()
        .unwrap();
    assert!(exported as u64 >= dropped(), "{exported} exported");

    // Reading now gets exactly the replies that were not dropped, in order.
    let (mut received, mut last) = (0u64, None);
    while hog.poll(zmq::POLLIN, 2000).unwrap() > 0 {
        let reply = hog.recv_multipart(0).unwrap();
        let uid = codec::decode_u64("uid", &reply[0]).unwrap();
        assert!(last < Some(uid), "reply {uid} after {last:?}");
        last = Some(uid);
        received += 1;
    }
    assert_eq!(
        received + dropped(),
        total,
        "every reply is delivered or counted as dropped"
    );
    eprintln!(
        "{total} requests, {} replies dropped ({after_first} before the last {} requests), \
         {received} delivered",
        dropped(),
        total - first
    );
    let mut c = client(&s);
    assert_eq!(c.get_chunk_size().unwrap(), 256);
}
