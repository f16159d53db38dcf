//! L3 through real Redis servers the tests start themselves: two sidecars sharing chunks,
//! salt isolation, corrupted values, Redis dying mid-burst, ACL users and TLS.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::redis::*;
use common::*;
use cwm::client::MpClient;
use cwm::config::Config;
use cwm::ops::Cwm;
use cwm::serve::Sidecar;
use cwm::store::l3::keys::KeyLayout;
use cwm::store::tier::LinkStatus;

const MODEL: &str = "l3-model";

/// What `/status` says of L3: its link, and its own figures by name.
#[derive(Debug)]
struct L3Status {
    link: LinkStatus,
    corrupt_records: u64,
    write_errors: u64,
    link_errors: u64,
    /// Records given up while the link was down.
    write_behind_dropped: u64,
    round_trips: u64,
    topology_reads: u64,
}

fn l3_status(node: &Cwm) -> L3Status {
    let stats = cwm::status::cache_stats(node);
    let t = stats.tier("L3").expect("L3 is configured");
    let figure = |name| {
        t.figure(name)
            .unwrap_or_else(|| panic!("no figure {name}: {t:?}"))
    };
    L3Status {
        link: t.link.clone().expect("L3 reports its link"),
        corrupt_records: t.corrupt_records,
        write_errors: t.write_errors,
        link_errors: figure("link_errors_total"),
        write_behind_dropped: figure("write_behind_dropped_total"),
        round_trips: figure("round_trips_total"),
        topology_reads: figure("topology_reads_total"),
    }
}

/// Memory-only sidecar config with L3 at `url`.
fn l3_config(url: &str) -> Config {
    Config {
        l3_url: Some(url.into()),
        l3_timeout_ms: 1000,
        ..small_config()
    }
}

fn wait_keys(r: &RedisServer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.chunk_keys(None).len() < n {
        assert!(
            Instant::now() < deadline,
            "write-behind did not put {n} chunks in Redis (has {:?})",
            r.chunk_keys(None)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn store(c: &mut MpClient, id: u64, salt: &str, t: &[u32], first_block: u32) -> bool {
    let n = (t.len() as u64 / CS) * CS;
    c.store(
        &key(MODEL, salt, t, Some(0), 1, 0, n, "w"),
        id,
        &blocks(first_block, (n / 16) as u32),
    )
    .unwrap()
    .ok
}

fn retrieve(c: &mut MpClient, id: u64, salt: &str, t: &[u32], chunks: u64, rid: &str) -> bool {
    c.retrieve(
        &key(MODEL, salt, t, Some(0), 1, 0, chunks * CS, rid),
        id,
        &blocks(1, (chunks * CS / 16) as u32),
        0,
    )
    .unwrap()
    .ok
}

fn lookup(c: &mut MpClient, salt: &str, t: &[u32], rid: &str) -> u64 {
    lookup_hits(c, &key(MODEL, salt, t, None, 1, 0, t.len() as u64, rid))
}

/// On sidecar `b` (a fresh engine of `src`'s geometry): the lookup hits `chunks`, and the
/// retrieve gives back `src`'s blocks byte for byte.
fn hits_byte_exact_on(b: &Sidecar, salt: &str, t: &[u32], chunks: u64, src: &TestKv) {
    let mut cb = client(b);
    let dst = TestKv::new(
        src.layout,
        src.layers,
        src.blocks,
        src.bs,
        src.heads,
        src.content,
    );
    register_kv(&mut cb, MODEL, 2, &dst);
    assert_eq!(lookup(&mut cb, salt, t, "q"), chunks);
    assert!(retrieve(&mut cb, 2, salt, t, chunks, "q"));
    for j in 0..chunks * CS / 16 {
        assert_eq!(src.block(1 + j), dst.block(1 + j), "block {j}");
    }
    assert_eq!(
        lookup(&mut cb, "another-salt", t, "q2"),
        0,
        "salts stay isolated"
    );
}

/// `cwm serve` as a process with its own empty L2 and the given extra flags.
struct Serve {
    child: Child,
    endpoint: String,
    /// Its MCP endpoint (streamable HTTP).
    mcp_url: String,
    _dir: tempfile::TempDir,
}

impl Serve {
    fn start(extra: &[&str], env: &[(&str, &str)]) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let port = free_redis_port(false);
        let http = free_redis_port(false);
        let child = Command::new(env!("CARGO_BIN_EXE_cwm"))
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--l1-size-gb",
                "0.25",
                "--l2-size-gb",
                "1",
                "--http-port",
                &http.to_string(),
            ])
            .args(["--no-engine-driven"])
            .arg("--l2-path")
            .arg(dir.path())
            .args(extra)
            .envs(env.iter().copied())
            .env("CWM_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let endpoint = format!("tcp://127.0.0.1:{port}");
        Serve {
            child,
            endpoint,
            mcp_url: format!("http://127.0.0.1:{http}/mcp"),
            _dir: dir,
        }
    }

    fn client(&self) -> MpClient {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut c = MpClient::connect(&self.endpoint).unwrap();
            c.timeout = Duration::from_millis(500);
            if c.get_chunk_size().is_ok() {
                c.timeout = Duration::from_secs(10);
                return c;
            }
            assert!(Instant::now() < deadline, "cwm serve did not start");
        }
    }

    /// Stop it and return what it logged.
    fn stop(mut self) -> String {
        self.kill();
        let mut log = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut log);
        }
        log
    }
}

impl Serve {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A failed test must not leave `cwm serve` running (it holds the test's stdout open).
impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The story of the issue: A stores, B (empty L1 and L2, its own process) hits and retrieves
/// byte-exact through Redis; another salt sees nothing; the keys carry the salt.
#[test]
fn two_sidecars_share_chunks_through_one_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let a = Serve::start(&["--l3-url", &url], &[]);
    let b = Serve::start(&["--l3-url", &url], &[]);
    let (src, dst) = (
        TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32),
        TestKv::new(Layout::Hnd, 2, 80, 16, 2, 32),
    );
    src.fill(7);
    let t = tokens(11, 1024);
    let mut ca = a.client();
    register_kv(&mut ca, MODEL, 1, &src);
    assert!(store(&mut ca, 1, "alice", &t, 1));
    wait_keys(&redis, 4);
    let keys = redis.chunk_keys(None);
    assert!(
        keys.iter().all(|k| k.ends_with(":5:alice")),
        "keys carry the salt: {keys:?}"
    );
    let mut cb = b.client();
    register_kv(&mut cb, MODEL, 2, &dst);
    assert_eq!(
        lookup(&mut cb, "bob", &t, "other-salt"),
        0,
        "salts stay isolated"
    );
    assert_eq!(lookup(&mut cb, "", &t, "no-salt"), 0, "salts stay isolated");
    assert_eq!(
        lookup(&mut cb, "alice", &t, "q"),
        4,
        "B finds A's chunks in Redis"
    );
    assert!(retrieve(&mut cb, 2, "alice", &t, 4, "q"));
    for j in 0..64 {
        assert_eq!(src.block(1 + j), dst.block(1 + j), "block {j}");
    }
    a.stop();
    b.stop();
}

/// A value whose payload was altered, and a value holding another chunk's record, are misses
/// (counted), never served.
#[test]
fn corrupted_or_misplaced_values_are_misses() {
    let redis = RedisServer::start();
    let a = sidecar(l3_config(&redis.url()));
    let b = sidecar(l3_config(&redis.url()));
    let kv = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    kv.fill(3);
    let t = tokens(21, 1024);
    let mut ca = client(&a);
    register_kv(&mut ca, MODEL, 1, &kv);
    assert!(store(&mut ca, 1, "s", &t, 1));
    wait_keys(&redis, 4);
    // Which key is which chunk: B's own key layout says.
    let hashes = b.cwm.hasher.chunk_hashes(&t, 0, 1024);
    let keys: Vec<String> = hashes
        .iter()
        .map(|h| {
            let k = connector_protocol::ObjectKey {
                model: MODEL.into(),
                kv_rank: connector_protocol::kv_rank(1, 0),
                object_group: 0,
                chunk_hash: *h,
                cache_salt: "s".into(),
            };
            String::from_utf8(KeyLayout::new("cwm").chunk(&k)).unwrap()
        })
        .collect();
    // Chunk 2: change the last payload byte. Chunk 1: chunk 3's record under chunk 1's key.
    let len: usize = redis.cli(&["STRLEN", &keys[2]]).trim().parse().unwrap();
    let at = (len - 1).to_string();
    let last = redis.cli_raw(&["GETRANGE", &keys[2], &at, &at]);
    let other = if last[0] == b'A' { "B" } else { "A" };
    assert_eq!(
        redis.cli(&["SETRANGE", &keys[2], &at, other]).trim(),
        len.to_string()
    );
    assert_eq!(
        redis.cli(&["COPY", &keys[3], &keys[1], "REPLACE"]).trim(),
        "1"
    );
    let mut cb = client(&b);
    let dst = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    register_kv(&mut cb, MODEL, 2, &dst);
    assert_eq!(lookup(&mut cb, "s", &t, "q"), 1, "only chunk 0 is servable");
    assert_eq!(
        l3_status(&b.cwm).corrupt_records,
        2,
        "the misplaced and the altered value are counted"
    );
    assert!(retrieve(&mut cb, 2, "s", &t, 1, "q"));
    for j in 0..16 {
        assert_eq!(kv.block(1 + j), dst.block(1 + j), "block {j}");
    }
    assert_eq!(b.cwm.tiers.l1_occupancy().objects, 2, "chunks 0 and 3 only");
}

/// A client of `s` with two engine caches registered: 1 to store from, 2 to retrieve into.
fn two_caches(s: &Sidecar) -> (MpClient, TestKv, TestKv) {
    let kv = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    let back = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    let mut c = client(s);
    register_kv(&mut c, MODEL, 1, &kv);
    register_kv(&mut c, MODEL, 2, &back);
    (c, kv, back)
}

/// Request `i` of `requests`, stored from `kv` filled with `i`, hits both its chunks and
/// retrieves into `back` byte-exact.
fn assert_served_from_l1(
    c: &mut MpClient,
    kv: &TestKv,
    back: &TestKv,
    salt: &str,
    requests: &[Vec<u32>],
) {
    for (i, t) in requests.iter().enumerate() {
        let rid = format!("r{i}");
        assert_eq!(lookup(c, salt, t, &rid), 2, "request {i}");
        kv.fill(i as u64);
        back.fill_byte(0);
        assert!(retrieve(c, 2, salt, t, 2, &rid));
        for j in 0..32 {
            assert_eq!(kv.block(1 + j), back.block(1 + j), "request {i} block {j}");
        }
    }
}

/// Redis killed during a burst of stores and lookups: every request is answered, nothing
/// wrong is served, the state shows in /status and /metrics, and L3 recovers after a restart.
#[test]
fn redis_killed_mid_burst_then_back() {
    let mut redis = RedisServer::start();
    // A killed Redis refuses connections at once, so the timeout only bounds a slow answer: a
    // short one (300 ms once) turned a slow but healthy answer on a loaded 2-core machine (each
    // write is now its SETs and the quota ledger's script) into a second incident.
    let s = sidecar(Config {
        l3_timeout_ms: 2000,
        ..l3_config(&redis.url())
    });
    let (mut c, kv, back) = two_caches(&s);
    let requests: Vec<Vec<u32>> = (0..30).map(|i| tokens(500 + i, 512)).collect();
    for (i, t) in requests.iter().enumerate() {
        if i == 10 {
            redis.kill();
        }
        kv.fill(i as u64);
        assert!(store(&mut c, 1, "burst", t, 1), "store {i} answered ok");
        // A lookup of something never stored: L3 is asked (or known down) and the lookup is
        // answered (the client's 10 s timeout and lookup_hits' deadline fail the test if not).
        let miss = tokens(9000 + i as u32, 512);
        assert_eq!(lookup(&mut c, "burst", &miss, &format!("m{i}")), 0);
    }
    // Everything stored is still served from L1, byte-exact.
    assert_served_from_l1(&mut c, &kv, &back, "burst", &requests);
    let status = |s: &Sidecar| l3_status(&s.windows.cwm);
    let st = status(&s);
    assert_eq!(st.link.state, "down", "{st:?}");
    assert_eq!(st.link.incidents, 1, "one incident: {st:?}");
    let metrics = cwm::metrics::render(&s.windows.cwm, &s.windows.health());
    assert!(metrics.contains("cwm_l3_up 0"), "{metrics}");
    redis.restart();
    // New stores reach the restarted Redis once the backoff lets write-behind retry.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut round = 0;
    while redis.chunk_keys(None).is_empty() {
        assert!(
            Instant::now() < deadline,
            "L3 never recovered: {:?}",
            status(&s)
        );
        round += 1;
        kv.fill(1000 + round);
        assert!(store(
            &mut c,
            1,
            "burst",
            &tokens(2000 + round as u32, 256),
            1
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = status(&s);
    assert_eq!(st.link.state, "up", "{st:?}");
    assert_eq!(st.link.incidents, 1);
    assert!(cwm::metrics::render(&s.windows.cwm, &s.windows.health()).contains("cwm_l3_up 1"));
    assert!(
        st.write_behind_dropped > 0,
        "writes while down were dropped and counted"
    );
}

/// An ACL user whose password comes from CWM_L3_PASSWORD: B finds what A stored, and the
/// password appears in neither log.
#[test]
fn acl_user_with_password_from_the_environment() {
    let redis = RedisServer::start();
    assert_eq!(
        redis
            .cli(&[
                "ACL",
                "SETUSER",
                "cwm",
                "on",
                ">Sekr1t-pw",
                "~cwm:*",
                "+@all"
            ])
            .trim(),
        "OK"
    );
    assert_eq!(
        redis.cli(&["ACL", "SETUSER", "default", "off"]).trim(),
        "OK"
    );
    let url = format!("redis://cwm@127.0.0.1:{}", redis.port);
    let env = [("CWM_L3_PASSWORD", "Sekr1t-pw")];
    let a = Serve::start(&["--l3-url", &url], &env);
    let b = Serve::start(&["--l3-url", &url], &env);
    let kv = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    kv.fill(5);
    let t = tokens(31, 512);
    let mut ca = a.client();
    register_kv(&mut ca, MODEL, 1, &kv);
    assert!(store(&mut ca, 1, "acl", &t, 1));
    let authed = |args: &[&str]| {
        let mut all = vec!["--user", "cwm", "--pass", "Sekr1t-pw", "--no-auth-warning"];
        all.extend_from_slice(args);
        redis.cli(&all)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while authed(&["--scan", "--pattern", "cwm:c1:*"]).lines().count() != 2 {
        assert!(
            Instant::now() < deadline,
            "A never wrote through the ACL user"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut cb = b.client();
    let dst = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    register_kv(&mut cb, MODEL, 2, &dst);
    assert_eq!(lookup(&mut cb, "acl", &t, "q"), 2);
    assert!(retrieve(&mut cb, 2, "acl", &t, 2, "q"));
    for j in 0..32 {
        assert_eq!(kv.block(1 + j), dst.block(1 + j), "block {j}");
    }
    let (la, lb) = (a.stop(), b.stop());
    assert!(la.contains("L3 Redis tier configured"), "{la}");
    assert!(
        !la.contains("Sekr1t") && !lb.contains("Sekr1t"),
        "password logged"
    );
    // A wrong password: the link is down, cwm still serves, and says why without the secret.
    let c = Serve::start(&["--l3-url", &url], &[("CWM_L3_PASSWORD", "wrong-Sekr1t")]);
    let mut cc = c.client();
    let kv3 = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    register_kv(&mut cc, MODEL, 3, &kv3);
    assert_eq!(lookup(&mut cc, "acl", &t, "q3"), 0);
    assert!(store(&mut cc, 3, "acl", &t, 1));
    let log = c.stop();
    assert!(log.contains("L3 Redis unreachable"), "{log}");
    assert!(!log.contains("Sekr1t"), "password logged: {log}");
}

/// TLS with a CA made here: B reads what A wrote over rediss://.
#[test]
fn tls_with_a_private_ca() {
    let (redis, ca) = RedisServer::with_tls();
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let config = Config {
        l3_tls_ca: Some(ca),
        ..l3_config(&url)
    };
    let a = sidecar(config.clone());
    let b = sidecar(config);
    let kv = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    kv.fill(8);
    let t = tokens(41, 512);
    let mut ca_ = client(&a);
    register_kv(&mut ca_, MODEL, 1, &kv);
    assert!(store(&mut ca_, 1, "tls", &t, 1));
    wait_keys(&redis, 2);
    hits_byte_exact_on(&b, "tls", &t, 2, &kv);
}

/// A 3-master cluster: chunks spread over the nodes, and B finds what A stored.
#[test]
fn two_sidecars_share_chunks_through_a_cluster() {
    let cluster = RedisCluster::start();
    let config = Config {
        l3_cluster: Some(cluster.seeds()),
        l3_timeout_ms: 2000,
        ..small_config()
    };
    let a = sidecar(config.clone());
    let b = sidecar(config);
    let kv = TestKv::new(Layout::Nhd, 2, 200, 16, 2, 16);
    kv.fill(12);
    let t = tokens(51, 3072);
    let mut ca = client(&a);
    register_kv(&mut ca, MODEL, 1, &kv);
    assert!(store(&mut ca, 1, "c", &t, 1));
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.sizes().iter().sum::<u64>() < 12 {
        assert!(Instant::now() < deadline, "sizes {:?}", cluster.sizes());
        std::thread::sleep(Duration::from_millis(20));
    }
    let sizes = cluster.sizes();
    assert!(
        sizes.iter().filter(|&&n| n > 0).count() >= 2,
        "12 chunks spread over the masters: {sizes:?}"
    );
    hits_byte_exact_on(&b, "c", &t, 12, &kv);
}

/// Freeze `session` on `s` as window `name`.
fn freeze(s: &Sidecar, session: &str, name: &str) -> cwm::windows::FreezeReport {
    s.windows
        .freeze(&cwm::windows::FreezeRequest {
            session_id: session.into(),
            window_name: name.into(),
            ..Default::default()
        })
        .unwrap()
}

/// Thaw window `name` on `s` under `new_session`.
fn thaw(s: &Sidecar, name: &str, new_session: &str) -> cwm::windows::ThawReport {
    s.windows
        .thaw(
            &cwm::windows::ThawRequest {
                window_name: name.into(),
                new_session_id: Some(new_session.into()),
            },
            &|_, _| {},
        )
        .unwrap()
}

fn window_names(s: &Sidecar) -> Vec<String> {
    s.windows
        .list(&cwm::windows::ListRequest::default())
        .unwrap()
        .windows
        .into_iter()
        .map(|w| w.name)
        .collect()
}

/// The thawed 1024-token window hits 4 chunks under `session` and retrieves into `dst`
/// (instance 2) exactly what `src` stored from block 1.
fn thawed_window_retrieves_byte_exact(
    c: &mut MpClient,
    session: &str,
    t: &[u32],
    src: &TestKv,
    dst: &TestKv,
) {
    assert_eq!(lookup(c, session, t, "q"), 4);
    assert!(retrieve(c, 2, session, t, 4, "q"));
    for j in 0..64 {
        assert_eq!(src.block(1 + j), dst.block(1 + j), "block {j}");
    }
}

/// Windows fleet-wide: frozen on A (chunks and manifest pushed to Redis, no TTL), listed,
/// inspected and thawed on B (whose L1 and L2 never saw the chunks), name taken fleet-wide,
/// and a delete on B seen by A.
#[test]
fn windows_frozen_on_one_sidecar_thaw_on_another() {
    use cwm::windows::{DeleteRequest, FreezeRequest, StatusRequest};
    let redis = RedisServer::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let with_l3 = |dir: &std::path::Path| Config {
        l3_url: Some(redis.url()),
        l3_write: "frozen".into(), // only windows go to Redis: B cannot hit by the cache path
        ..disk_config(dir)
    };
    let a = sidecar(with_l3(da.path()));
    let b = sidecar(with_l3(db.path()));
    let kv = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    kv.fill(17);
    let t = tokens(61, 1024);
    let mut ca = client(&a);
    register_kv(&mut ca, MODEL, 1, &kv);
    assert!(store(&mut ca, 1, "chat-1", &t, 1));
    assert!(
        redis.chunk_keys(None).is_empty(),
        "l3_write frozen: nothing cached in Redis"
    );
    assert_eq!(freeze(&a, "chat-1", "review").window.chunks, 4);
    let keys = redis.chunk_keys(None);
    assert_eq!(keys.len(), 4, "the window's chunks are in Redis");
    for k in &keys {
        assert_eq!(
            redis.cli(&["TTL", k]).trim(),
            "-1",
            "window data has no TTL"
        );
    }
    // B: listed, status from Redis, thaw byte-exact under a new session.
    assert_eq!(window_names(&b), ["review"]);
    let status = b
        .windows
        .status(&StatusRequest {
            window_name: Some("review".into()),
            ..Default::default()
        })
        .unwrap()
        .window
        .unwrap();
    assert_eq!((status.chunks_in_l2, status.chunks_in_l3), (0, Some(4)));
    let mut cb = client(&b);
    let dst = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    register_kv(&mut cb, MODEL, 2, &dst);
    assert_eq!(lookup(&mut cb, "chat-2", &t, "before"), 0);
    let thawed = thaw(&b, "review", "chat-2");
    assert_eq!((thawed.tokens_ready, thawed.tiers.l3), (1024, 4));
    thawed_window_retrieves_byte_exact(&mut cb, "chat-2", &t, &kv, &dst);
    // The name is taken fleet-wide.
    assert!(b
        .windows
        .freeze(&FreezeRequest {
            session_id: "chat-2".into(),
            window_name: "review".into(),
            ..Default::default()
        })
        .is_err());
    // Deleted on B: gone on A, and its data is cache again (a TTL).
    b.windows
        .delete(&DeleteRequest {
            window_name: "review".into(),
        })
        .unwrap();
    assert!(window_names(&a).is_empty());
    assert!(a.windows.get("review").is_none());
    for k in &redis.chunk_keys(None) {
        let ttl: i64 = redis.cli(&["TTL", k]).trim().parse().unwrap();
        assert!(ttl > 0, "released data gets the cache TTL: {ttl}");
    }
}

/// Wait (at most 20 s) until `s` has written `saves` auto-saves.
fn wait_autosaves(s: &Sidecar, saves: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.windows.autosave_stats().saves < saves {
        assert!(
            Instant::now() < deadline,
            "{saves} auto-saves never came: {:?}",
            s.windows.autosave_stats()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Auto-save fleet-wide: A auto-saves a session (records and manifest in Redis); B lists and
/// thaws it byte-exact; a second burst on A replaces it in Redis in one write, and B then
/// lists one window and thaws the new version only. The first version's records get the
/// cache TTL back, the new one's have none.
#[test]
fn an_auto_save_replaced_on_one_sidecar_is_replaced_on_another() {
    let redis = RedisServer::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let with_l3 = |dir: &std::path::Path, idle| Config {
        l3_url: Some(redis.url()),
        l3_write: "frozen".into(),
        auto_save_idle_secs: idle,
        ..disk_config(dir)
    };
    let a = sidecar(with_l3(da.path(), 1));
    let b = sidecar(with_l3(db.path(), 0));
    let kv = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    kv.fill(29);
    let (first, second) = (tokens(71, 1024), tokens(72, 1024));
    let mut ca = client(&a);
    register_kv(&mut ca, MODEL, 1, &kv);
    let mut cb = client(&b);
    let dst = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    register_kv(&mut cb, MODEL, 2, &dst);

    assert!(store(&mut ca, 1, "chat-1", &first, 1));
    wait_autosaves(&a, 1);
    assert_eq!(window_names(&b), ["autosave-chat-1"]);
    thaw(&b, "autosave-chat-1", "x1");
    thawed_window_retrieves_byte_exact(&mut cb, "x1", &first, &kv, &dst);
    let first_keys = redis.chunk_keys(None);
    assert_eq!(first_keys.len(), 4);

    assert!(store(&mut ca, 1, "chat-1", &second, 1));
    wait_autosaves(&a, 2);
    assert_eq!(window_names(&b), ["autosave-chat-1"], "replaced, not added");
    let r = thaw(&b, "autosave-chat-1", "x2");
    assert_eq!((r.tokens_ready, r.tiers.l3), (1024, 4), "{r:?}");
    assert_eq!(
        lookup(&mut cb, "x2", &first, "old"),
        0,
        "the old version is gone"
    );
    thawed_window_retrieves_byte_exact(&mut cb, "x2", &second, &kv, &dst);
    for k in redis.chunk_keys(None) {
        let ttl: i64 = redis.cli(&["TTL", &k]).trim().parse().unwrap();
        if first_keys.contains(&k) {
            assert!(ttl > 0, "the old version's records are cache again: {ttl}");
        } else {
            assert_eq!(ttl, -1, "the new version's records have no TTL");
        }
    }
}

/// The same fleet-wide window through a 3-master Redis Cluster: the manifest and the catalog
/// live in the cluster (their keys hash to any master), so B lists, thaws byte-exact and
/// deletes what A froze.
#[test]
fn windows_frozen_on_one_sidecar_thaw_on_another_through_a_cluster() {
    use cwm::windows::DeleteRequest;
    let cluster = RedisCluster::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let with_l3 = |dir: &std::path::Path| Config {
        l3_cluster: Some(cluster.seeds()),
        l3_timeout_ms: 2000,
        l3_write: "frozen".into(),
        ..disk_config(dir)
    };
    let a = sidecar(with_l3(da.path()));
    let b = sidecar(with_l3(db.path()));
    let kv = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    kv.fill(19);
    let t = tokens(63, 1024);
    let mut ca = client(&a);
    register_kv(&mut ca, MODEL, 1, &kv);
    assert!(store(&mut ca, 1, "chat-1", &t, 1));
    assert_eq!(cluster.sizes().iter().sum::<u64>(), 0, "nothing cached yet");
    assert_eq!(freeze(&a, "chat-1", "review").window.chunks, 4);
    assert!(
        cluster.sizes().iter().sum::<u64>() >= 4,
        "chunks and manifest in the cluster: {:?}",
        cluster.sizes()
    );
    assert_eq!(window_names(&b), ["review"]);
    let mut cb = client(&b);
    let dst = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    register_kv(&mut cb, MODEL, 2, &dst);
    let thawed = thaw(&b, "review", "chat-2");
    assert_eq!((thawed.tokens_ready, thawed.tiers.l3), (1024, 4));
    thawed_window_retrieves_byte_exact(&mut cb, "chat-2", &t, &kv, &dst);
    b.windows
        .delete(&DeleteRequest {
            window_name: "review".into(),
        })
        .unwrap();
    assert!(window_names(&a).is_empty(), "a delete on B is seen on A");
}

/// `calls` of `INFO commandstats` for `command` (lowercase), 0 when never called.
fn command_calls(r: &RedisServer, command: &str) -> u64 {
    let info = r.cli(&["INFO", "commandstats"]);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// A 4096-token prefix that misses L1 and L2 costs one round trip to Redis for its 16
/// existence checks (they are counted by Redis, so they were sent), not one per chunk.
#[test]
fn a_lookup_missing_l1_and_l2_costs_one_round_trip() {
    let redis = RedisServer::start();
    let s = sidecar(l3_config(&redis.url()));
    let kv = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    let mut c = client(&s);
    register_kv(&mut c, MODEL, 1, &kv);
    let (trips, exists) = (
        l3_status(&s.cwm).round_trips,
        command_calls(&redis, "exists"),
    );
    assert_eq!(lookup(&mut c, "rt", &tokens(71, 4096), "q"), 0);
    assert_eq!(
        command_calls(&redis, "exists") - exists,
        16,
        "one existence check per chunk reached Redis"
    );
    assert_eq!(
        l3_status(&s.cwm).round_trips - trips,
        1,
        "16 checks, one pipeline: {:?}",
        l3_status(&s.cwm)
    );
    let metrics = cwm::metrics::render(&s.windows.cwm, &s.windows.health());
    assert!(metrics.contains("cwm_l3_round_trips_total 1"), "{metrics}");
}

/// On a 3-master cluster the same lookup costs one round trip per master that owns some of
/// the prefix's keys: at most 3 for 16 chunks, and each master got its share in one pipeline.
#[test]
fn a_lookup_on_a_cluster_costs_one_round_trip_per_node() {
    let cluster = RedisCluster::start();
    let s = sidecar(Config {
        l3_cluster: Some(cluster.seeds()),
        l3_timeout_ms: 2000,
        ..small_config()
    });
    let kv = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    let mut c = client(&s);
    register_kv(&mut c, MODEL, 1, &kv);
    let exists = |cluster: &RedisCluster| -> Vec<u64> {
        cluster
            .nodes
            .iter()
            .map(|n| command_calls(n, "exists"))
            .collect()
    };
    // The first lookup also reads the slot map; the second shows the steady state.
    for round in 0..2 {
        let before = exists(&cluster);
        let trips = l3_status(&s.cwm).round_trips;
        let t = tokens(81 + round, 4096);
        assert_eq!(lookup(&mut c, "rt", &t, &format!("q{round}")), 0);
        let per_node: Vec<u64> = exists(&cluster)
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .collect();
        assert_eq!(per_node.iter().sum::<u64>(), 16, "{per_node:?}");
        let nodes = per_node.iter().filter(|&&n| n > 0).count() as u64;
        assert!(
            nodes >= 2,
            "16 chunks spread over the masters: {per_node:?}"
        );
        assert_eq!(
            l3_status(&s.cwm).round_trips - trips,
            nodes,
            "one pipeline per node that holds keys ({per_node:?})"
        );
    }
    assert_eq!(
        l3_status(&s.cwm).topology_reads,
        1,
        "the slot map was read once"
    );
}

/// A Redis that stops answering (CLIENT PAUSE): stores, hits and misses are all answered
/// within the L3 deadline plus a generous margin, L1 serves byte-exact, the link shows down in
/// /status and /metrics with the failures counted, and it comes back after the pause.
#[test]
fn a_slow_redis_delays_nothing_past_the_deadline() {
    let redis = RedisServer::start();
    let s = sidecar(Config {
        l3_timeout_ms: 300,
        ..l3_config(&redis.url())
    });
    let (mut c, kv, back) = two_caches(&s);
    let stored = tokens(91, 512);
    kv.fill(91);
    assert!(store(&mut c, 1, "slow", &stored, 1));
    wait_keys(&redis, 2);
    assert_eq!(redis.cli(&["CLIENT", "PAUSE", "6000", "ALL"]).trim(), "OK");
    let paused = Instant::now();
    // Generous: the deadline is 300 ms; nothing may wait for the 6 s pause.
    let within = Duration::from_millis(2500);
    for i in 0..4u32 {
        let t0 = Instant::now();
        kv.fill(100 + u64::from(i));
        assert!(store(&mut c, 1, "slow", &tokens(100 + i, 512), 1));
        assert_eq!(
            lookup(&mut c, "slow", &tokens(200 + i, 512), &format!("m{i}")),
            0
        );
        assert!(
            t0.elapsed() < within,
            "a store and a missing lookup took {:?} while Redis was paused",
            t0.elapsed()
        );
    }
    let t0 = Instant::now();
    kv.fill(91);
    back.fill_byte(0);
    assert_eq!(lookup(&mut c, "slow", &stored, "hit"), 2);
    assert!(retrieve(&mut c, 2, "slow", &stored, 2, "hit"));
    assert!(t0.elapsed() < within, "a hit took {:?}", t0.elapsed());
    for j in 0..32 {
        assert_eq!(kv.block(1 + j), back.block(1 + j), "block {j}");
    }
    assert!(
        paused.elapsed() < Duration::from_secs(6),
        "the checks ran while Redis was paused"
    );
    let st = l3_status(&s.cwm);
    assert_eq!(st.link.state, "down", "{st:?}");
    assert!(st.link_errors >= 1, "{st:?}");
    assert!(
        st.link
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("timed out") || e.contains("deadline")),
        "{st:?}"
    );
    let metrics = cwm::metrics::render(&s.windows.cwm, &s.windows.health());
    assert!(metrics.contains("cwm_l3_up 0"), "{metrics}");
    // After the pause: the link comes back by itself on the next lookups.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    while l3_status(&s.cwm).link.state != "up" {
        assert!(
            Instant::now() < deadline,
            "L3 never came back after the pause"
        );
        i += 1;
        lookup(&mut c, "slow", &tokens(300 + i, 512), &format!("after{i}"));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(l3_status(&s.cwm).link.incidents, 1);
}

/// A full Redis (maxmemory, noeviction: writes get OOM errors): every store is answered and
/// served from L1 byte-exact, the refused writes are counted, /status and /metrics say Redis is
/// full while the link stays up, and writes resume once Redis has room.
#[test]
fn a_full_redis_refuses_writes_and_cwm_keeps_serving() {
    let redis = RedisServer::with_args(&["--maxmemory-policy", "noeviction"]);
    let used: u64 = redis
        .cli(&["INFO", "memory"])
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Room for a few records (about 4 KiB each here), not for 20 requests of two chunks.
    let limit = (used + (48 << 10)).to_string();
    assert_eq!(
        redis.cli(&["CONFIG", "SET", "maxmemory", &limit]).trim(),
        "OK"
    );
    let s = sidecar(l3_config(&redis.url()));
    let (mut c, kv, back) = two_caches(&s);
    let requests: Vec<Vec<u32>> = (0..20).map(|i| tokens(700 + i, 512)).collect();
    for (i, t) in requests.iter().enumerate() {
        kv.fill(i as u64);
        let t0 = Instant::now();
        assert!(store(&mut c, 1, "full", t, 1), "store {i}");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "store {i} took {:?}",
            t0.elapsed()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while l3_status(&s.cwm).write_errors == 0
        || s.windows.cache_stats().write_behind.queued_bytes > 0
    {
        assert!(
            Instant::now() < deadline,
            "no write was refused: {:?}",
            l3_status(&s.cwm)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_served_from_l1(&mut c, &kv, &back, "full", &requests);
    let st = l3_status(&s.cwm);
    assert_eq!(
        (st.link.state.as_str(), st.link.full),
        ("up", true),
        "{st:?}"
    );
    assert!(st.write_errors >= 1 && st.link_errors == 0, "{st:?}");
    let metrics = cwm::metrics::render(&s.windows.cwm, &s.windows.health());
    assert!(metrics.contains("cwm_l3_full 1"), "{metrics}");
    assert!(metrics.contains("cwm_l3_up 1"), "{metrics}");
    // Room again: the next write goes through and Redis is no longer shown full.
    assert_eq!(redis.cli(&["CONFIG", "SET", "maxmemory", "0"]).trim(), "OK");
    let before = redis.chunk_keys(None).len();
    kv.fill(999);
    assert!(store(&mut c, 1, "full", &tokens(999, 512), 1));
    wait_keys(&redis, before + 2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while l3_status(&s.cwm).link.full {
        assert!(Instant::now() < deadline, "still shown full");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The story over MCP: two `cwm serve` processes share one Redis; a window frozen on A
/// through A's MCP endpoint is listed, inspected and thawed on B through B's (B's L1 and L2
/// never saw the chunks), hits byte-exact under the new session, and a delete on B is seen by A.
#[test]
fn windows_frozen_on_a_thaw_on_b_over_mcp() {
    use serde_json::json;
    let redis = RedisServer::start();
    let url = redis.url();
    let flags = ["--l3-url", url.as_str(), "--l3-write", "frozen"];
    let a = Serve::start(&flags, &[]);
    let b = Serve::start(&flags, &[]);
    let kv = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    kv.fill(23);
    let t = tokens(111, 1024);
    let mut ca = a.client();
    register_kv(&mut ca, MODEL, 1, &kv);
    assert!(store(&mut ca, 1, "chat-1", &t, 1));
    let mut cb = b.client();
    let dst = TestKv::new(Layout::Nhd, 2, 80, 16, 2, 32);
    register_kv(&mut cb, MODEL, 2, &dst);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ma = rt
        .block_on(cwm::mcp::connect(&a.mcp_url, None))
        .expect("MCP on A");
    let mb = rt
        .block_on(cwm::mcp::connect(&b.mcp_url, None))
        .expect("MCP on B");
    let r = common::mcp::call(
        &rt,
        &ma,
        "window_freeze",
        json!({"session_id": "chat-1", "window_name": "review"}),
    )
    .unwrap();
    assert_eq!(r["window"]["chunks"], 4, "{r}");
    assert_eq!(
        redis.chunk_keys(None).len(),
        4,
        "the window's chunks are in Redis"
    );
    let list = common::mcp::call(&rt, &mb, "window_list", json!({})).unwrap();
    assert_eq!(list["total"], 1, "{list}");
    assert_eq!(list["windows"][0]["name"], "review");
    let st =
        common::mcp::call(&rt, &mb, "window_status", json!({"window_name": "review"})).unwrap();
    assert_eq!(st["window"]["chunks_in_l2"], 0, "{st}");
    assert_eq!(st["window"]["chunks_in_l3"], 4, "{st}");
    assert_eq!(lookup(&mut cb, "chat-2", &t, "before"), 0);
    let r = common::mcp::call(
        &rt,
        &mb,
        "window_thaw",
        json!({"window_name": "review", "new_session_id": "chat-2"}),
    )
    .unwrap();
    assert_eq!(r["tokens_ready"], 1024, "{r}");
    assert_eq!(r["tiers"]["l3"], 4, "{r}");
    assert_eq!(lookup(&mut cb, "chat-2", &t, "q"), 4);
    assert!(retrieve(&mut cb, 2, "chat-2", &t, 4, "q"));
    for j in 0..64 {
        assert_eq!(kv.block(1 + j), dst.block(1 + j), "block {j}");
    }
    let e = common::mcp::call(
        &rt,
        &mb,
        "window_freeze",
        json!({"session_id": "chat-2", "window_name": "review"}),
    )
    .expect_err("the name is taken fleet-wide");
    assert!(e.contains("taken"), "{e}");
    common::mcp::call(&rt, &mb, "window_delete", json!({"window_name": "review"})).unwrap();
    let list = common::mcp::call(&rt, &ma, "window_list", json!({})).unwrap();
    assert_eq!(list["total"], 0, "deleted on B, gone on A: {list}");
    rt.block_on(async {
        let _ = ma.cancel().await;
        let _ = mb.cancel().await;
    });
    a.stop();
    b.stop();
}
