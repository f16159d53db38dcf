//! Restarting cwm under running engines (issue 20): registrations journaled beside L2 and
//! reopened at start, dropped when they no longer open, corrupt entries ignored, unknown
//! instances prompted to re-register through their heartbeat, dead engines forgotten, clean
//! stops drain write-behind. Real shared memory, the real binary where a kill is involved.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use cwm::client::MpClient;
use cwm::config::Config;

const MODEL: &str = "restart-model";

fn journal_dir(l2: &Path) -> std::path::PathBuf {
    l2.join("registrations")
}

fn journal_files(l2: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(journal_dir(l2))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `cwm serve` on `port` over L2 in `dir`, its log in `log`, L1 in private memory.
fn serve(dir: &Path, port: u16, log: &Path, extra: &[&str]) -> Child {
    let mut args = vec!["--no-engine-driven"];
    args.extend_from_slice(extra);
    serve_with(dir, port, log, &args)
}

/// `cwm serve` as `serve`, its L1 a shared pool unless `extra` says `--no-engine-driven`.
fn serve_with(dir: &Path, port: u16, log: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--l1-size-gb",
            "0.25",
            "--l2-size-gb",
            "1",
            "--http-port",
            "0",
        ])
        .args(extra)
        .arg("--l2-path")
        .arg(dir)
        .env("CWM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// The first series of a sidecar's `/metrics` on `port` whose line starts with `series` and
/// passes `pick`, as a number (0 while the sidecar does not answer).
fn metric(port: &str, series: &str, pick: impl Fn(&str) -> bool) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(format!("127.0.0.1:{port}")) else {
        return 0;
    };
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    out.lines()
        .find(|l| l.starts_with(series) && pick(l))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// L2's record count from a sidecar's `/metrics` on `port`.
fn l2_records(port: &str) -> u64 {
    metric(port, "cwm_tier_objects{", |l| {
        l.to_lowercase().contains("l2")
    })
}

/// Auto-saves a sidecar made, from its `/metrics` on `port`.
fn autosaves(port: &str) -> u64 {
    metric(port, "cwm_autosaves_total{", |l| l.contains("\"saved\""))
}

/// Acknowledged chunks reach L2 by write-behind: wait until `n` records are there.
fn wait_for_l2_records(port: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while l2_records(port) < n {
        assert!(
            Instant::now() < deadline,
            "write-behind never wrote {n} records"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Restart cwm on `l2` and `port` (its log in `log`): every 512-token request in `requests`
/// hits both of its chunks.
fn assert_found_after_restart(l2: &Path, port: u16, log: &Path, requests: &[Vec<u32>]) {
    let mut child = serve(l2, port, log, &[]);
    let mut c = MpClient::connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    c.get_chunk_size().unwrap();
    for (i, t) in requests.iter().enumerate() {
        let rid = format!("r{i}");
        assert_eq!(
            lookup_hits(&mut c, &key(MODEL, "", t, None, 1, 0, 512, &rid)),
            2,
            "request {i} after SIGTERM and restart"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// How `child` exited after a signal; a cwm that has not exited within 60 s (a hung stop) is
/// killed and fails the test instead of stalling it.
fn exit_status(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("cwm did not exit within 60 s of the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_line(log: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("cwm serving the LMCache MP protocol"))
        {
            return strip_ansi(line);
        }
        assert!(Instant::now() < deadline, "no start line in {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The log line without terminal colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// kill -9, restart on the same port and data: the engine's client (the same connection, as
/// vLLM keeps it) stores again without re-registering, and what it stored before hits.
#[test]
fn a_registration_survives_kill_9_and_the_next_store_needs_no_re_register() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let log = dir.path().join("cwm.log");
    let kv = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    kv.fill(5);
    let http = free_port().to_string();
    let mut child = serve(&dir.path().join("l2"), port, &log, &["--http-port", &http]);
    let mut c = MpClient::connect(&endpoint).unwrap();
    c.get_chunk_size().unwrap();
    register_kv(&mut c, MODEL, 41, &kv);
    assert_eq!(
        journal_files(&dir.path().join("l2")),
        ["0000000000000029.reg"]
    );
    let before = tokens(3, 512);
    assert!(
        c.store(
            &key(MODEL, "", &before, Some(0), 1, 0, 512, "s"),
            41,
            &blocks(1, 32)
        )
        .unwrap()
        .ok
    );
    wait_for_l2_records(&http, 2);
    child.kill().unwrap();
    child.wait().unwrap();

    let log2 = dir.path().join("cwm2.log");
    let mut child = serve(&dir.path().join("l2"), port, &log2, &[]);
    let line = start_line(&log2);
    assert!(line.contains("registrations_restored=1"), "{line}");
    assert!(line.contains("registrations_dropped=0"), "{line}");
    // The same client: its connection comes back by itself, no register_kv_cache.
    assert!(
        c.ping(Some(41)).unwrap(),
        "a restored instance is answered true"
    );
    let after = tokens(4, 512);
    assert!(
        c.store(
            &key(MODEL, "", &after, Some(0), 1, 0, 512, "s2"),
            41,
            &blocks(33, 32)
        )
        .unwrap()
        .ok,
        "the first store after the restart"
    );
    assert_eq!(
        lookup_hits(&mut c, &key(MODEL, "", &before, None, 1, 0, 512, "l1")),
        2
    );
    let want: Vec<Vec<u8>> = (1..33).map(|b| kv.block(b)).collect();
    kv.fill_byte(0);
    assert!(
        c.retrieve(
            &key(MODEL, "", &before, Some(0), 1, 0, 512, "l1"),
            41,
            &blocks(1, 32),
            0
        )
        .unwrap()
        .ok
    );
    for (i, b) in want.iter().enumerate() {
        assert_eq!(&kv.block(1 + i as u64), b, "block {}", 1 + i);
    }
    assert_eq!(
        lookup_hits(&mut c, &key(MODEL, "", &after, None, 1, 0, 512, "l2")),
        2
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A journaled engine whose segment is gone is dropped (entry removed, counted); its heartbeat
/// is answered false once, then true, which makes LMCache's connector re-register.
#[test]
fn a_registration_whose_segment_is_gone_is_dropped_and_its_engine_prompted() {
    let dir = tempfile::tempdir().unwrap();
    let kv = TestKv::new(Layout::Nhd, 2, 40, 16, 2, 32);
    let gone = TestKv::new(Layout::Nhd, 2, 40, 16, 2, 32);
    {
        let s = sidecar(disk_config(dir.path()));
        let mut c = client(&s);
        register_kv(&mut c, MODEL, 1, &kv);
        register_kv(&mut c, MODEL, 2, &gone);
        assert_eq!(journal_files(dir.path()).len(), 2);
    } // stopped without unregistering, as a crash would
    drop(gone); // its engine exited: the segment is unlinked
    let s = sidecar(disk_config(dir.path()));
    assert_eq!(s.restored.restored, 1);
    assert_eq!(s.restored.dropped, 1);
    assert_eq!(journal_files(dir.path()), ["0000000000000001.reg"]);
    let mut c = client(&s);
    assert!(c.ping(Some(1)).unwrap());
    assert!(
        !c.ping(Some(2)).unwrap(),
        "first ping of an unknown instance"
    );
    assert!(
        c.ping(Some(2)).unwrap(),
        "later pings: true, so recovery runs"
    );
    assert!(c.ping(None).unwrap(), "the scheduler's untracked ping");
    let t = tokens(9, 256);
    assert!(
        !c.store(
            &key(MODEL, "", &t, Some(0), 1, 0, 256, "x"),
            2,
            &blocks(1, 16)
        )
        .unwrap()
        .ok
    );
    // The connector's recovery: it re-registers (a fresh engine would have a new segment).
    let back = TestKv::new(Layout::Nhd, 2, 40, 16, 2, 32);
    register_kv(&mut c, MODEL, 2, &back);
    assert!(
        c.store(
            &key(MODEL, "", &t, Some(0), 1, 0, 256, "x"),
            2,
            &blocks(1, 16)
        )
        .unwrap()
        .ok
    );
    assert_eq!(journal_files(dir.path()).len(), 2);
}

/// Entries that are not valid (a flipped byte, a foreign file) are ignored, removed and
/// counted; the valid ones are restored.
#[test]
fn a_corrupted_journal_entry_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let a = TestKv::new(Layout::Hnd, 2, 40, 16, 2, 32);
    let b = TestKv::new(Layout::Hnd, 2, 40, 16, 2, 32);
    {
        let s = sidecar(disk_config(dir.path()));
        let mut c = client(&s);
        register_kv(&mut c, MODEL, 1, &a);
        register_kv(&mut c, MODEL, 2, &b);
    }
    let victim = journal_dir(dir.path()).join("0000000000000002.reg");
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();
    std::fs::write(
        journal_dir(dir.path()).join("0000000000000003.reg"),
        b"CWMJ",
    )
    .unwrap();
    let s = sidecar(disk_config(dir.path()));
    assert_eq!(
        (s.restored.restored, s.restored.dropped, s.restored.corrupt),
        (1, 0, 2)
    );
    assert_eq!(journal_files(dir.path()), ["0000000000000001.reg"]);
    assert!(s.cwm.registry.contains(1));
    assert!(!s.cwm.registry.contains(2));
}

/// A registration the live path would refuse is refused from the journal too: an entry
/// written by hand that names another instance than its file, or a bad model name.
#[test]
fn nothing_in_the_journal_is_trusted_beyond_a_live_registration() {
    use cwm::ops::journal::{Journal, Kind};
    use cwm::ops::RegisterKvCache;
    let dir = tempfile::tempdir().unwrap();
    let kv = TestKv::new(Layout::Nhd, 2, 40, 16, 2, 32);
    let request = |id: u64, model: &str| RegisterKvCache {
        instance_id: id,
        descriptors: kv.descriptors(),
        model_name: model.into(),
        world_size: 1,
        engine_type: "vllm".into(),
        layout_hints: connector_protocol::LayoutHints {
            kv_layout: kv.hint().map(str::to_string),
        },
        engine_groups: kv.groups(),
    };
    std::fs::create_dir_all(dir.path()).unwrap();
    let j = Journal::open(&journal_dir(dir.path())).unwrap();
    j.record(Kind::KvCache, 5, &request(6, MODEL).to_frames().unwrap())
        .unwrap();
    j.record(
        Kind::KvCache,
        7,
        &request(7, "bad@model").to_frames().unwrap(),
    )
    .unwrap();
    j.record(Kind::KvCache, 8, &request(8, MODEL).to_frames().unwrap())
        .unwrap();
    drop(j);
    let s = sidecar(disk_config(dir.path()));
    assert_eq!((s.restored.restored, s.restored.dropped), (1, 2));
    assert!(s.cwm.registry.contains(8));
    assert!(!s.cwm.registry.contains(6) && !s.cwm.registry.contains(7));
}

/// Unregister removes the entry; the reaper forgets a silent engine: its entry goes and its
/// segment is no longer mapped by cwm.
#[test]
fn unregistered_and_reaped_engines_leave_no_entry_and_no_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let s = sidecar(Config {
        worker_reap_timeout_secs: 1,
        ..disk_config(dir.path())
    });
    let mut c = client(&s);
    let (a, b) = (
        TestKv::new(Layout::Nhd, 2, 40, 16, 2, 32),
        TestKv::new(Layout::Nhd, 2, 40, 16, 2, 32),
    );
    register_kv(&mut c, MODEL, 1, &a);
    register_kv(&mut c, MODEL, 2, &b);
    c.unregister_kv_cache(1).unwrap();
    assert_eq!(journal_files(dir.path()), ["0000000000000002.reg"]);
    assert!(c.ping(Some(2)).unwrap());
    // The test maps the segment too (it is the engine here): count cwm's mapping beside it.
    let mappings = || {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| l.ends_with(b.seg.name()))
            .count()
    };
    assert_eq!(mappings(), 2, "the engine's mapping and cwm's");
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.cwm.registry.contains(2) {
        assert!(
            Instant::now() < deadline,
            "a silent engine was never reaped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(journal_files(dir.path()).is_empty(), "reaped entry left");
    // The mapping goes with the last reference (a warm-up or copy may hold one briefly).
    let deadline = Instant::now() + Duration::from_secs(20);
    while mappings() > 1 {
        assert!(
            Instant::now() < deadline,
            "the reaped engine's segment stays mapped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM right after a burst of stores: every acknowledged chunk is written behind before
/// exit, and found after a restart; the process exits 0.
#[test]
fn sigterm_drains_write_behind_so_every_acknowledged_chunk_survives() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let l2 = dir.path().join("l2");
    let kv = TestKv::new(Layout::Nhd, 4, 40, 16, 4, 64);
    let mut child = serve(
        &l2,
        port,
        &dir.path().join("a.log"),
        &["--drain-timeout-secs", "60"],
    );
    let mut c = MpClient::connect(&endpoint).unwrap();
    c.get_chunk_size().unwrap();
    register_kv(&mut c, MODEL, 1, &kv);
    let requests: Vec<Vec<u32>> = (0..24).map(|i| tokens(500 + i, 512)).collect();
    for (i, t) in requests.iter().enumerate() {
        kv.fill(i as u64);
        let k = key(MODEL, "", t, Some(0), 1, 0, 512, "w");
        assert!(c.store(&k, 1, &blocks(1, 32)).unwrap().ok);
    }
    // SAFETY: signalling our own child by its pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = exit_status(&mut child);
    assert!(status.success(), "exit after SIGTERM: {status}");
    let log = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
    assert!(log.contains("write-behind drained"), "{log}");
    assert_found_after_restart(&l2, port, &dir.path().join("b.log"), &requests);
}

/// Issue 24: the session index is journaled beside L2, so a session stored before a kill -9
/// can be frozen after it (by its session id alone, with no help from the agent) and thawed
/// byte for byte.
#[test]
fn a_session_stored_before_kill_9_can_be_frozen_after_it() {
    use common::mcp::call;
    use serde_json::json;

    let dir = tempfile::tempdir().unwrap();
    let l2 = dir.path().join("l2");
    let port = free_port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let http = free_port().to_string();
    let kv = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    kv.fill(9);
    let log = dir.path().join("cwm.log");
    let mut child = serve(&l2, port, &log, &["--http-port", &http]);
    let mut c = MpClient::connect(&endpoint).unwrap();
    c.get_chunk_size().unwrap();
    let t = tokens(11, 1024);
    store_conversation(&mut c, &kv, &http, &t);
    child.kill().unwrap();
    child.wait().unwrap();

    let log2 = dir.path().join("cwm2.log");
    let mut child = serve(&l2, port, &log2, &["--http-port", &http]);
    let line = start_line(&log2);
    assert!(line.contains("sessions_restored=1"), "{line}");
    assert!(line.contains("session_chains_restored=1"), "{line}");
    let (rt, m) = mcp_client(&http);
    let status = call(&rt, &m, "window_status", json!({"session_id": "agent"})).unwrap();
    assert!(status.to_string().contains("1024"), "{status}");
    let frozen = call(
        &rt,
        &m,
        "window_freeze",
        json!({"session_id": "agent", "window_name": "after-crash"}),
    )
    .expect("the session is freezable after kill -9");
    assert_eq!(frozen["window"]["tokens"], 1024, "{frozen}");
    thaw_exactly(&rt, &m, "after-crash", &mut c, &kv, &t);
    rt.block_on(m.cancel()).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

/// An MCP client (rmcp, streamable HTTP) of the sidecar whose HTTP port is `http`.
fn mcp_client(http: &str) -> (tokio::runtime::Runtime, common::mcp::Mcp) {
    let rt = runtime();
    let m = rt
        .block_on(cwm::mcp::connect(
            &format!("http://127.0.0.1:{http}/mcp"),
            None,
        ))
        .expect("MCP client connects");
    (rt, m)
}

/// Thaw `window` (1024 tokens `t` of session "agent", frozen from `kv`'s blocks 1..=64) into
/// session "agent2" and retrieve it into `kv` emptied: the same bytes, block for block.
fn thaw_exactly(
    rt: &tokio::runtime::Runtime,
    m: &common::mcp::Mcp,
    window: &str,
    c: &mut MpClient,
    kv: &TestKv,
    t: &[u32],
) {
    let thawed = common::mcp::call(
        rt,
        m,
        "window_thaw",
        serde_json::json!({"window_name": window, "new_session_id": "agent2"}),
    )
    .unwrap();
    assert_eq!(thawed["tokens_ready"], 1024, "{thawed}");
    let want: Vec<Vec<u8>> = (1..65).map(|b| kv.block(b)).collect();
    kv.fill_byte(0);
    let k = key(MODEL, "agent2", t, Some(0), 1, 0, 1024, "back");
    assert!(c.retrieve(&k, 7, &blocks(1, 64), 0).unwrap().ok);
    for (i, b) in want.iter().enumerate() {
        assert_eq!(&kv.block(1 + i as u64), b, "block {}", 1 + i);
    }
}

/// Store turn `turn` (0: tokens 0..512 from blocks 1..=32; 1: 512..1024 from 33..=64) of the
/// conversation `t` of session "agent" (instance 7).
fn store_turn(c: &mut MpClient, t: &[u32], turn: usize) {
    let (start, end, first) = [(0, 512, 1), (512, 1024, 33)][turn];
    let rid = format!("turn{turn}");
    let k = key(
        MODEL,
        "agent",
        &t[..end as usize],
        Some(0),
        1,
        start,
        end,
        &rid,
    );
    assert!(c.store(&k, 7, &blocks(first, 32)).unwrap().ok, "{rid}");
}

/// Store a conversation of two turns (512 tokens, then 1024: `t`) under session "agent" from
/// `kv` (blocks 1..=64, instance 7) and wait until write-behind put its 4 chunks in L2.
fn store_conversation(c: &mut MpClient, kv: &TestKv, http: &str, t: &[u32]) {
    register_kv(c, MODEL, 7, kv);
    store_turn(c, t, 0);
    store_turn(c, t, 1);
    wait_for_l2_records(http, 4);
}

/// Wait (at most 30 s) until the sidecar on `http` made `n` auto-saves.
fn wait_for_autosaves(http: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while autosaves(http) < n {
        assert!(Instant::now() < deadline, "not {n} auto-saves within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 24's "an agent that never calls window_freeze still finds its context after a crash":
/// session "agent" stores a conversation with `--auto-save-idle-secs idle`, cwm is killed with
/// SIGKILL, and restarted: it lists the auto-save window holding the whole conversation, and
/// the window thaws byte for byte. `saved_before_kill`: the whole conversation was auto-saved
/// before the kill; else only its first turn was, and the second was stored just before the
/// kill, within the idle time: the restart finds the session in its journal, sees the window
/// holds an older chain, and saves the newest.
fn autosave_survives_kill_9(idle: &str, saved_before_kill: bool) {
    let dir = tempfile::tempdir().unwrap();
    let l2 = dir.path().join("l2");
    let port = free_port();
    let http = free_port().to_string();
    let flags = ["--http-port", &http, "--auto-save-idle-secs", idle];
    let kv = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    kv.fill(9);
    let t = tokens(11, 1024);
    let mut child = serve(&l2, port, &dir.path().join("cwm.log"), &flags);
    let mut c = MpClient::connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    c.get_chunk_size().unwrap();
    if saved_before_kill {
        store_conversation(&mut c, &kv, &http, &t);
        wait_for_autosaves(&http, 1);
    } else {
        register_kv(&mut c, MODEL, 7, &kv);
        store_turn(&mut c, &t, 0);
        wait_for_autosaves(&http, 1);
        store_turn(&mut c, &t, 1);
        wait_for_l2_records(&http, 4);
        assert_eq!(autosaves(&http), 1, "the idle time ran out before the kill");
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let log = dir.path().join("cwm2.log");
    let mut child = serve(&l2, port, &log, &flags);
    let line = start_line(&log);
    assert!(line.contains("sessions_restored=1"), "{line}");
    if !saved_before_kill {
        wait_for_autosaves(&http, 1);
    }
    let (rt, m) = mcp_client(&http);
    let list = common::mcp::call(
        &rt,
        &m,
        "window_list",
        serde_json::json!({"tag": "autosave"}),
    )
    .unwrap();
    assert_eq!(list["total"], 1, "{list}");
    assert_eq!(list["windows"][0]["name"], "autosave-agent", "{list}");
    assert_eq!(list["windows"][0]["tokens"], 1024, "{list}");
    thaw_exactly(&rt, &m, "autosave-agent", &mut c, &kv, &t);
    rt.block_on(m.cancel()).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn an_auto_save_made_before_kill_9_is_listed_and_thaws_exactly_after_it() {
    autosave_survives_kill_9("1", true);
}

#[test]
fn chunks_stored_within_the_idle_time_before_kill_9_are_auto_saved_after_the_restart() {
    autosave_survives_kill_9("4", false);
}

/// A second signal during a slow drain exits at once: L3 is a Redis that accepts connections
/// and never answers (so write-behind to it waits out its 60 s deadline), SIGTERM starts the
/// drain, SIGINT while it runs makes cwm exit with status 130 without finishing it (the drain
/// alone would exit 0, drained or timed out).
#[test]
fn a_second_signal_during_a_slow_drain_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let redis = format!("redis://{}", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming().flatten() {
            held.push(conn); // accepted, never answered
        }
    });
    let port = free_port();
    let log = dir.path().join("a.log");
    let mut child = serve(
        &dir.path().join("l2"),
        port,
        &log,
        &[
            "--l3-url",
            &redis,
            "--l3-timeout-ms",
            "60000",
            "--drain-timeout-secs",
            "120",
        ],
    );
    let mut c = MpClient::connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    c.get_chunk_size().unwrap();
    let kv = TestKv::new(Layout::Nhd, 4, 40, 16, 4, 64);
    register_kv(&mut c, MODEL, 1, &kv);
    for i in 0..4u32 {
        kv.fill(u64::from(i));
        let k = key(MODEL, "", &tokens(900 + i, 512), Some(0), 1, 0, 512, "w");
        assert!(c.store(&k, 1, &blocks(1, 32)).unwrap().ok);
    }
    // SAFETY: signalling our own child by its pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("shutting down")
    {
        assert!(Instant::now() < deadline, "no shutdown line after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "cwm finished its drain although L3 never answers"
    );
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = exit_status(&mut child);
    assert_eq!(
        status.code(),
        Some(130),
        "exit after a second signal: {status}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("write-behind drained") && !text.contains("did not drain"),
        "the drain ended before the second signal: {text}"
    );
}

/// Requests a client keeps sending across SIGTERM are answered, none lost with the socket (the
/// connector never resends: a lost request waits out its timeout, a lost PREPARE_STORE kills an
/// engine): stores every 20 ms before and for 1.3 s after the signal are all acknowledged; a
/// heartbeat still busy after 1 s is answered `false` (the connector's degraded mode, so it
/// stops sending); cwm exits 0 once the client is quiet, and every acknowledged chunk is found
/// after a restart.
#[test]
fn requests_sent_across_sigterm_are_answered_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let l2 = dir.path().join("l2");
    let kv = TestKv::new(Layout::Nhd, 4, 40, 16, 4, 64);
    let log = dir.path().join("a.log");
    let mut child = serve(&l2, port, &log, &[]);
    let mut c = MpClient::connect(&endpoint).unwrap();
    c.get_chunk_size().unwrap();
    register_kv(&mut c, MODEL, 1, &kv);
    assert!(c.ping(Some(1)).unwrap());
    let mut stored = Vec::new();
    let mut signalled: Option<Instant> = None;
    while signalled.is_none_or(|s| s.elapsed() < Duration::from_millis(1300)) {
        let i = stored.len() as u32;
        if i == 5 {
            // SAFETY: signalling our own child by its pid.
            assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
            signalled = Some(Instant::now());
        }
        let t = tokens(700 + i, 512);
        kv.fill(u64::from(i));
        let k = key(MODEL, "", &t, Some(0), 1, 0, 512, "w");
        let reply = c.store(&k, 1, &blocks(1, 32));
        assert!(
            reply.as_ref().is_ok_and(|r| r.ok),
            "store {i}, {:?} after SIGTERM: {reply:?}",
            signalled.map(|s| s.elapsed())
        );
        stored.push(t);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !c.ping(Some(1)).unwrap(),
        "a heartbeat while stopping and busy is answered false"
    );
    let status = exit_status(&mut child);
    assert!(status.success(), "exit after SIGTERM: {status}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("no request for the quiet period"), "{text}");
    assert_found_after_restart(&l2, port, &dir.path().join("b.log"), &stored);
}

/// An engine-driven worker's registration: small bf16 chunk objects of `MODEL`.
fn ed_payload(instance_id: u64) -> connector_protocol::RegisterEngineDrivenContextPayload {
    connector_protocol::RegisterEngineDrivenContextPayload {
        instance_id,
        model_name: MODEL.into(),
        world_size: 1,
        block_size: 16,
        num_layers: 2,
        hidden_dim_size: 64,
        dtype_str: "bfloat16".into(),
        use_mla: false,
        num_physical_slots: Some(CS),
    }
}

/// An engine-driven worker (vLLM-CPU's default) across kill -9 and SIGTERM of cwm: the new
/// cwm adopts the very pool the worker still maps and restores its context, so the worker's
/// next store is served without a re-registration, through the same mapping, byte-exact; a
/// slot leased to it when cwm died is never handed out again while its lease runs; what was
/// stored before hits. A clean stop keeps the pool for the next cwm while an engine is
/// registered, and removes it once none is.
#[test]
fn an_engine_driven_worker_keeps_its_pool_across_kill_9_and_sigterm() {
    use common::pool::{chunk_bytes, Pool};

    let dir = tempfile::tempdir().unwrap();
    let l2 = dir.path().join("l2");
    let port = free_port();
    let http = free_port().to_string();
    let args = ["--http-port", http.as_str()];
    let mut child = serve_with(&l2, port, &dir.path().join("cwm1.log"), &args);
    let mut c = MpClient::connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    c.get_chunk_size().unwrap();
    let id = 77;
    let answer = c.register_engine_driven_context(&ed_payload(id)).unwrap();
    assert_eq!(journal_files(&l2), ["000000000000004d.edc"]);
    let pool = Pool::open(&answer);
    let store = |c: &mut MpClient, t: &[u32], rid: &str| {
        let k = key(MODEL, "", t, Some(0), 1, 0, 512, rid);
        let prepared = c.prepare_store(&k, id).unwrap().context;
        assert_eq!(
            prepared.chunk_indices,
            [0, 1],
            "{rid}: both chunks prepared"
        );
        for (slot, &i) in prepared.slots.iter().zip(&prepared.chunk_indices) {
            pool.write(
                slot,
                &chunk_bytes(u64::from(t[0]) + u64::from(i), slot.length),
            );
        }
        assert!(c.commit_store(&k, id, b"").unwrap(), "{rid}: committed");
        prepared.slots
    };
    let retrieved = |c: &mut MpClient, t: &[u32], rid: &str| {
        let k = key(MODEL, "", t, Some(0), 1, 0, 512, rid);
        assert_eq!(
            lookup_hits(c, &key(MODEL, "", t, None, 1, 0, 512, rid)),
            2,
            "{rid}"
        );
        let got = c.prepare_retrieve(&k, id).unwrap();
        assert!(got.success, "{rid}: {got:?}");
        for (i, slot) in got.context.slots.iter().enumerate() {
            let want = chunk_bytes(u64::from(t[0]) + i as u64, slot.length);
            assert!(pool.read(slot) == want, "{rid}: chunk {i} differs");
        }
        assert!(c.commit_retrieve(&k, id).unwrap());
    };
    // A store in flight when cwm dies: prepared first, so its slots are the pool's first.
    let inflight = tokens(5, 512);
    let k_inflight = key(MODEL, "", &inflight, Some(0), 1, 0, 512, "inflight");
    let leased = c.prepare_store(&k_inflight, id).unwrap().context.slots;
    assert_eq!(leased.len(), 2);
    let before = tokens(6, 512);
    store(&mut c, &before, "before");
    wait_for_l2_records(&http, 2);
    child.kill().unwrap();
    child.wait().unwrap();

    let log2 = dir.path().join("cwm2.log");
    let mut child = serve_with(&l2, port, &log2, &args);
    let line = start_line(&log2);
    assert!(line.contains("l1_pool_adopted=true"), "{line}");
    assert!(line.contains("engine_contexts_restored=1"), "{line}");
    let leased_bytes: u64 = leased.iter().map(|s| s.length.div_ceil(4096) * 4096).sum();
    assert!(
        line.contains(&format!("l1_quarantined_bytes={leased_bytes}")),
        "{line}"
    );
    assert!(c.ping(Some(id)).unwrap(), "a restored worker is known");
    // The worker's next store, through the mapping it already has, no re-registration.
    let next = tokens(7, 512);
    let slots = store(&mut c, &next, "next");
    for s in &slots {
        for l in &leased {
            assert!(
                s.offset + s.length <= l.offset || l.offset + l.length <= s.offset,
                "slot {s:?} handed out again while the dead cwm's lease on {l:?} runs"
            );
        }
    }
    retrieved(&mut c, &next, "next");
    retrieved(&mut c, &before, "before from L2");
    assert!(
        !c.commit_store(&k_inflight, id, b"").unwrap(),
        "a prepare of the dead cwm is not committed"
    );

    // SIGTERM with the worker registered: the pool stays for the next cwm.
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert!(exit_status(&mut child).success());
    let shm = Path::new("/dev/shm").join(&answer.shm_name);
    assert!(
        shm.exists(),
        "the pool an engine maps outlives a clean stop"
    );
    let log3 = dir.path().join("cwm3.log");
    let mut child = serve_with(&l2, port, &log3, &args);
    let line = start_line(&log3);
    assert!(line.contains("l1_pool_adopted=true"), "{line}");
    assert!(line.contains("engine_contexts_restored=1"), "{line}");
    let again = tokens(8, 512);
    store(&mut c, &again, "after sigterm");
    retrieved(&mut c, &again, "after sigterm");

    // Unregistered: its entry goes, and a clean stop removes the pool.
    c.unregister_engine_driven_context(id).unwrap();
    assert!(journal_files(&l2).is_empty(), "{:?}", journal_files(&l2));
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert!(exit_status(&mut child).success());
    assert!(!shm.exists(), "no engine left: the pool is removed at stop");
}

/// A silent engine-driven worker is reaped like a registered KV cache: its journal entry goes,
/// and with no engine left a stop removes the pool instead of keeping it for the next cwm.
#[test]
fn a_reaped_engine_driven_worker_leaves_no_entry_and_no_pool() {
    let dir = tempfile::tempdir().unwrap();
    let s = sidecar(Config {
        worker_reap_timeout_secs: 1,
        worker_registration_grace_secs: 1,
        ..disk_config(dir.path())
    });
    let mut c = client(&s);
    let answer = c.register_engine_driven_context(&ed_payload(3)).unwrap();
    assert_eq!(journal_files(dir.path()), ["0000000000000003.edc"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.cwm.engine_driven.get(3).is_some() {
        assert!(
            Instant::now() < deadline,
            "a silent worker was never reaped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(journal_files(dir.path()).is_empty(), "reaped entry left");
    s.stop();
    assert!(
        !Path::new("/dev/shm").join(&answer.shm_name).exists(),
        "no engine left: the pool is removed at stop"
    );
}
