//! The disk tier through the MP server: restart-then-hit, L2 promotion, crash safety.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use cwm::client::MpClient;

const MODEL: &str = "l2-model";

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
        register_kv(&mut c, MODEL, 1, &src);
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
    assert_eq!(s.cwm.tiers.l1_occupancy().objects, 0, "L1 starts empty");
    let mut c = client(&s);
    register_kv(&mut c, MODEL, 2, &dst);
    assert_eq!(
        lookup(&mut c, &t, 1024, "r2"),
        4,
        "all chunks found on disk"
    );
    assert_eq!(s.cwm.tiers.l1_occupancy().objects, 4, "promoted into L1");
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
    register_kv(&mut c, MODEL, 1, &kv);
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
    s.cwm.tiers.evict_l1(true);
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
    register_kv(&mut c, MODEL, 1, &src);
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
    register_kv(&mut c, MODEL, 2, &dst);
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two sidecars on one L2 directory used to both start; after both stopped and one
/// restarted, the other's acknowledged chunks were gone. The second writer (a sidecar, or
/// `cwm windows` while a sidecar runs) is now refused, naming the holder's pid.
#[test]
fn a_second_process_on_a_data_directory_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_cwm");
    let serve = |port: u16| {
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--l1-size-gb",
                "0.1",
                "--l2-size-gb",
                "1",
                "--http-port",
                "0",
            ])
            .arg("--l2-path")
            .arg(dir.path())
            .env("CWM_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    };
    let port = free_port();
    let mut first = serve(port).spawn().unwrap();
    MpClient::connect(&format!("tcp://127.0.0.1:{port}"))
        .unwrap()
        .get_chunk_size()
        .unwrap();
    let holder = format!("pid {}", first.id());
    let mut second = serve(free_port()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while second.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            second.kill().unwrap();
            first.kill().unwrap();
            panic!("a second sidecar started on the same data directory");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second sidecar started");
    assert!(stderr.contains(&holder), "does not name {holder}: {stderr}");
    // `cwm windows` (list, export and import open the directory the same way).
    let out = Command::new(bin)
        .args(["windows", "list", "--l2-path"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "cwm windows ran beside the sidecar");
    assert!(stderr.contains(&holder), "does not name {holder}: {stderr}");
    first.kill().unwrap();
    first.wait().unwrap();
    // The kernel released the lock with the process, however it ended.
    let out = Command::new(bin)
        .args(["windows", "list", "--l2-path"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `clear` empties L1 and L2 of everything no window pins and cancels queued write-behind, so
/// nothing stored before it is found after it, whatever write-behind had done by then (before:
/// a chunk whose write-behind had finished came back from disk, one still queued did not).
/// Windows are named, durable saves: they survive it.
#[test]
fn clear_empties_both_tiers_but_keeps_windows() {
    use cwm::windows::{FreezeRequest, ThawRequest};
    let dir = tempfile::tempdir().unwrap();
    let kv = TestKv::new(Layout::Nhd, 2, 200, 16, 2, 16);
    kv.fill(3);
    let s = sidecar(disk_config(dir.path()));
    let mut c = client(&s);
    register_kv(&mut c, MODEL, 1, &kv);
    let store = |c: &mut MpClient, salt: &str, t: &[u32], first: u32| {
        let k = key(MODEL, salt, t, Some(0), 1, 0, 512, "store");
        assert!(c.store(&k, 1, &blocks(first, 32)).unwrap().ok);
    };
    let l2_records = || s.windows.cache_stats().tier("L2").expect("L2 on").records;
    let wait_records = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while l2_records() < n {
            assert!(Instant::now() < deadline, "L2 never held {n} records");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let kept = tokens(1, 512);
    store(&mut c, "keep", &kept, 1);
    s.windows
        .freeze(&FreezeRequest {
            session_id: "keep".into(),
            window_name: "kept".into(),
            ..Default::default()
        })
        .expect("freezes");
    // Two chunks surely on disk, then two more that may still be queued when the clear comes.
    let (written, queued) = (tokens(2, 512), tokens(3, 512));
    store(&mut c, "", &written, 40);
    wait_records(4);
    store(&mut c, "", &queued, 80);
    c.clear(false).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.cwm.tiers.stats().write_behind.queued_bytes > 0 {
        assert!(Instant::now() < deadline, "write-behind never drained");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        lookup(&mut c, &written, 512, "a"),
        0,
        "written chunks cleared"
    );
    assert_eq!(
        lookup(&mut c, &queued, 512, "b"),
        0,
        "queued chunks cleared"
    );
    assert_eq!(l2_records(), 2, "only the window's records stay");
    let thawed = s
        .windows
        .thaw(
            &ThawRequest {
                window_name: "kept".into(),
                new_session_id: None,
            },
            &|_, _| {},
        )
        .expect("a window survives clear");
    assert_eq!(thawed.chunks_ready, 2);
    // The cache works on: a new store after the clear goes to disk as before.
    store(&mut c, "", &written, 40);
    wait_records(4);
}
