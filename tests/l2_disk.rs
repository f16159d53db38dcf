//! The disk tier through the MP server: restart-then-hit, L2 promotion, crash safety.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use cwm::client::MpClient;
use cwm::serve::Sidecar;

const MODEL: &str = "l2-model";

fn register(c: &mut MpClient, id: u64, kv: &TestKv) {
    c.register_kv_cache(id, &kv.descriptors(), MODEL, 1, kv.hint(), &kv.groups())
        .unwrap();
}

fn blocks(first: u32, n: u32) -> Vec<Vec<u32>> {
    vec![(first..first + n).collect()]
}

/// Wait until write-behind has written `n` objects to L2.
fn wait_written(s: &Sidecar, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while s
        .cwm
        .tiers
        .write_behind
        .written
        .load(std::sync::atomic::Ordering::Relaxed)
        < n
    {
        assert!(
            Instant::now() < deadline,
            "write-behind did not write {n} objects"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lookup(c: &mut MpClient, t: &[u32], end: u64, rid: &str) -> u64 {
    lookup_hits(c, &key(MODEL, "", t, None, 1, 0, end, rid))
}

#[test]
fn a_restart_keeps_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (
        TestKv::new(Layout::Nhd, 4, 80, 16, 2, 32),
        TestKv::new(Layout::Nhd, 4, 80, 16, 2, 32),
    );
    src.fill(42);
    let t = tokens(77, 1100);
    {
        let s = sidecar(disk_config(dir.path()));
        let mut c = client(&s);
        register(&mut c, 1, &src);
        assert!(
            c.store(
                &key(MODEL, "", &t, Some(0), 1, 0, 1024, "r"),
                1,
                &blocks(1, 64)
            )
            .unwrap()
            .ok
        );
        wait_written(&s, 4);
        s.stop();
    }
    let s = sidecar(disk_config(dir.path()));
    assert_eq!(s.cwm.tiers.l1.stats().objects, 0, "L1 starts empty");
    let mut c = client(&s);
    register(&mut c, 2, &dst);
    assert_eq!(
        lookup(&mut c, &t, 1024, "r2"),
        4,
        "all chunks found on disk"
    );
    assert_eq!(s.cwm.tiers.l1.stats().objects, 4, "promoted into L1");
    assert!(
        c.retrieve(
            &key(MODEL, "", &t, Some(0), 1, 0, 1024, "r2"),
            2,
            &blocks(10, 64),
            0
        )
        .unwrap()
        .ok
    );
    for j in 0..64 {
        assert_eq!(src.block(1 + j), dst.block(10 + j), "block {j}");
    }
    // Another salt still sees nothing.
    c.lookup(&key(MODEL, "other", &t, None, 1, 0, 1024, "r3"))
        .unwrap();
    assert_eq!(c.query_prefetch_status("r3").unwrap(), 0);
}

#[test]
fn l2_hits_extend_a_partial_l1_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let kv = TestKv::new(Layout::Hnd, 2, 80, 16, 2, 16);
    kv.fill(9);
    let s = sidecar(disk_config(dir.path()));
    let mut c = client(&s);
    register(&mut c, 1, &kv);
    let t = tokens(5, 768);
    assert!(
        c.store(
            &key(MODEL, "", &t, Some(0), 1, 0, 768, "r"),
            1,
            &blocks(1, 48)
        )
        .unwrap()
        .ok
    );
    wait_written(&s, 3);
    // Drop chunk 1 and 2 from L1 only: the lookup must fetch them back from disk.
    s.cwm.tiers.l1.clear(true);
    assert_eq!(lookup(&mut c, &t, 768, "q"), 3);
    let before = kv.block(20);
    kv.fill_byte(0);
    assert!(
        c.retrieve(
            &key(MODEL, "", &t, Some(0), 1, 0, 768, "q"),
            1,
            &blocks(1, 48),
            0
        )
        .unwrap()
        .ok
    );
    kv.fill(9);
    assert_eq!(kv.block(20), before);
}

/// SIGKILL `cwm serve` while write-behind is busy, restart it on the same data, and check that
/// every chunk a lookup reports retrieves byte-exact.
#[test]
fn sigkill_during_write_behind_never_serves_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_cwm");
    let port = free_port();
    let spawn = || {
        Command::new(bin)
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--l1-size-gb",
                "0.5",
                "--l2-size-gb",
                "2",
                "--http-port",
                "0",
            ])
            .arg("--l2-path")
            .arg(dir.path())
            .env("CWM_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let src = TestKv::new(Layout::Nhd, 8, 40, 16, 4, 128);
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let mut child = spawn();
    let mut c = MpClient::connect(&endpoint).unwrap();
    c.get_chunk_size().unwrap();
    register(&mut c, 1, &src);
    let requests: Vec<Vec<u32>> = (0..40).map(|i| tokens(1000 + i, 512)).collect();
    for (i, t) in requests.iter().enumerate() {
        src.fill(i as u64); // different bytes per request, so a mix-up cannot go unnoticed
        assert!(
            c.store(
                &key(MODEL, "", t, Some(0), 1, 0, 512, "w"),
                1,
                &blocks(1, 32)
            )
            .unwrap()
            .ok
        );
    }
    child.kill().unwrap(); // SIGKILL, mid write-behind
    child.wait().unwrap();
    let mut child = spawn();
    let mut c = MpClient::connect(&endpoint).unwrap();
    c.get_chunk_size().unwrap();
    let dst = TestKv::new(Layout::Nhd, 8, 40, 16, 4, 128);
    register(&mut c, 2, &dst);
    let mut hits = 0;
    for (i, t) in requests.iter().enumerate() {
        let rid = format!("r{i}");
        let n = lookup(&mut c, t, 512, &rid);
        if n == 0 {
            continue;
        }
        hits += n;
        dst.fill_byte(0);
        src.fill(i as u64);
        assert!(
            c.retrieve(
                &key(MODEL, "", t, Some(0), 1, 0, n * 256, &rid),
                2,
                &blocks(1, 16 * n as u32),
                0
            )
            .unwrap()
            .ok
        );
        for j in 0..16 * n {
            assert_eq!(dst.block(1 + j), src.block(1 + j), "request {i} block {j}");
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    eprintln!("{hits} chunks survived the SIGKILL");
}
