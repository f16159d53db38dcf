//! Session auto-save end to end, every tool through rmcp's MCP client: an idle session is saved
//! as `autosave-<session>` and thaws byte-exact; a second burst replaces the save atomically
//! (the old version until the new one is durable, then the new one); off by default, on and off
//! per session (persisted); an auto-save racing thaws and deletes of its window never serves
//! wrong bytes or half a window. Every wait is bounded.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::mcp::{call, Mcp};
use common::*;
use cwm::client::MpClient;
use cwm::config::Config;
use cwm::serve::Sidecar;
use serde_json::{json, Value};

const MODEL: &str = "autosave-model";
/// Blocks of 16 tokens per chunk of 256.
const BLOCKS_PER_CHUNK: u32 = 16;

fn mcp(rt: &tokio::runtime::Runtime, s: &Sidecar) -> Mcp {
    let url = format!("http://{}/mcp", s.http_addr);
    rt.block_on(cwm::mcp::connect(&url, None))
        .expect("MCP client connects")
}

fn kv() -> TestKv {
    TestKv::new(Layout::Nhd, 4, 160, 16, 2, 32)
}

/// An engine KV that thawed windows are retrieved into, registered as instance `id`.
struct Dest {
    kv: TestKv,
    id: u64,
}

fn dest(id: u64) -> Dest {
    Dest { kv: kv(), id }
}

/// One version of a session's context: its tokens, stored from the source blocks at `first`.
#[derive(Debug, Clone, PartialEq)]
struct Conversation {
    tokens: Vec<u32>,
    first_block: u32,
    chunks: u32,
}

impl Conversation {
    fn new(seed: u32, first_block: u32, chunks: u32) -> Conversation {
        Conversation {
            tokens: tokens(seed, chunks as usize * CS as usize + 40),
            first_block,
            chunks,
        }
    }

    fn end(&self) -> u64 {
        self.chunks as u64 * CS
    }

    fn key(
        &self,
        salt: &str,
        worker: Option<u32>,
        rid: &str,
    ) -> connector_protocol::IpcCacheServerKey {
        key(MODEL, salt, &self.tokens, worker, 1, 0, self.end(), rid)
    }

    /// Store it under `salt` as instance 1 (the source KV), as vLLM would after a prefill.
    fn store(&self, c: &mut MpClient, salt: &str, rid: &str) {
        let blocks = blocks(self.first_block, self.chunks * BLOCKS_PER_CHUNK);
        assert!(
            c.store(&self.key(salt, Some(0), rid), 1, &blocks)
                .unwrap()
                .ok
        );
    }

    /// Chunks a lookup under `salt` hits.
    fn hits(&self, c: &mut MpClient, salt: &str, rid: &str) -> u64 {
        lookup_hits(c, &self.key(salt, None, rid))
    }

    /// Retrieve it under `salt` into instance 2 (the destination KV) and compare every block
    /// with the source's.
    fn assert_retrieves_exact(
        &self,
        c: &mut MpClient,
        salt: &str,
        rid: &str,
        src: &TestKv,
        dst: &Dest,
    ) {
        dst.kv.fill_byte(0);
        let n = self.chunks * BLOCKS_PER_CHUNK;
        let r = c
            .retrieve(&self.key(salt, Some(0), rid), dst.id, &blocks(1, n), 0)
            .unwrap();
        assert!(r.ok, "retrieve under {salt:?}");
        for j in 0..n as u64 {
            assert!(
                src.block(self.first_block as u64 + j) == dst.kv.block(1 + j),
                "salt {salt:?}: block {j} differs from what was stored"
            );
        }
    }
}

/// Which of `versions` a lookup under `salt` finds in full (checked byte-exact); none if none.
/// Finding two, or part of one, fails.
fn thawed_version(
    c: &mut MpClient,
    salt: &str,
    versions: &[&Conversation],
    src: &TestKv,
    dst: &Dest,
) -> Option<usize> {
    let mut found = None;
    for (i, v) in versions.iter().enumerate() {
        let rid = format!("{salt}-v{i}");
        let hits = v.hits(c, salt, &rid);
        if hits == 0 {
            continue;
        }
        assert_eq!(hits, v.chunks as u64, "half of version {i} under {salt:?}");
        assert!(found.is_none(), "two versions under {salt:?}");
        v.assert_retrieves_exact(c, salt, &rid, src, dst);
        found = Some(i);
    }
    found
}

fn auto_save(rt: &tokio::runtime::Runtime, m: &Mcp) -> Value {
    call(rt, m, "health", json!({})).unwrap()["auto_save"].clone()
}

/// Wait (at most 20 s) until `saves` auto-saves were written.
fn wait_saves(rt: &tokio::runtime::Runtime, m: &Mcp, saves: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = auto_save(rt, m);
        if a["saves"].as_u64().unwrap() >= saves {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{saves} auto-saves never came: {a}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Thaw `window` under `salt` over MCP: the report, or the tool's error text.
fn thaw(rt: &tokio::runtime::Runtime, m: &Mcp, window: &str, salt: &str) -> Result<Value, String> {
    call(
        rt,
        m,
        "window_thaw",
        json!({"window_name": window, "new_session_id": salt}),
    )
}

/// `session_autosave` over MCP with `args`.
fn session_autosave(rt: &tokio::runtime::Runtime, m: &Mcp, args: Value) -> Result<Value, String> {
    call(rt, m, "session_autosave", args)
}

fn autosaves(rt: &tokio::runtime::Runtime, m: &Mcp) -> Vec<Value> {
    let list = call(rt, m, "window_list", json!({"tag": "autosave"})).unwrap();
    list["windows"].as_array().unwrap().clone()
}

/// A runtime for the MCP client, a data directory, the source KV filled from `seed`, and a
/// destination registered as instance 2.
fn fixture(seed: u64) -> (tokio::runtime::Runtime, tempfile::TempDir, TestKv, Dest) {
    let src = kv();
    src.fill(seed);
    (runtime(), tempfile::tempdir().unwrap(), src, dest(2))
}

fn config(dir: &std::path::Path, idle_secs: u64) -> Config {
    Config {
        auto_save_idle_secs: idle_secs,
        ..disk_config(dir)
    }
}

/// A sidecar with the source KV registered as instance 1 and the destinations as theirs.
fn start(config: Config, src: &TestKv, dst: &[&Dest]) -> (Sidecar, MpClient) {
    let s = sidecar(config);
    let mut c = client(&s);
    register_kv(&mut c, MODEL, 1, src);
    for d in dst {
        register_kv(&mut c, MODEL, d.id, &d.kv);
    }
    (s, c)
}

#[test]
fn an_idle_session_is_auto_saved_and_a_second_burst_replaces_it_atomically() {
    let (rt, dir, src, dst) = fixture(7);
    let (s, mut c) = start(config(dir.path(), 2), &src, &[&dst]);
    let m = mcp(&rt, &s);
    let first = Conversation::new(1, 1, 2);
    let second = Conversation::new(2, 41, 4);
    let versions = [&first, &second];

    first.store(&mut c, "S", "r1");
    wait_saves(&rt, &m, 1);
    let saved = autosaves(&rt, &m);
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_eq!(saved[0]["name"], "autosave-S");
    assert_eq!(saved[0]["tokens"], 512);
    assert_eq!(saved[0]["session_id"], "S");
    let r = thaw(&rt, &m, "autosave-S", "T1").unwrap();
    assert_eq!(r["complete"], true, "{r}");
    assert_eq!(thawed_version(&mut c, "T1", &versions, &src, &dst), Some(0));

    // A second burst: until its auto-save is durable, the first version is what thaws.
    second.store(&mut c, "S", "r2");
    let r = thaw(&rt, &m, "autosave-S", "T2").unwrap();
    assert_eq!(r["tokens_ready"], 512, "the old version, whole: {r}");
    assert_eq!(thawed_version(&mut c, "T2", &versions, &src, &dst), Some(0));
    wait_saves(&rt, &m, 2);
    let saved = autosaves(&rt, &m);
    assert_eq!(saved.len(), 1, "replaced, not added: {saved:?}");
    assert_eq!(saved[0]["tokens"], 1024);
    let r = thaw(&rt, &m, "autosave-S", "T3").unwrap();
    assert_eq!(r["tokens_ready"], 1024, "{r}");
    assert_eq!(thawed_version(&mut c, "T3", &versions, &src, &dst), Some(1));
    let st = call(
        &rt,
        &m,
        "window_status",
        json!({"window_name": "autosave-S"}),
    )
    .unwrap();
    assert_eq!(st["window"]["chunks_in_l2"], 4, "{st}");
    assert_eq!(st["window"]["chunks_missing"], 0, "{st}");
    let stats = call(&rt, &m, "cache_stats", json!({})).unwrap();
    assert_eq!(
        stats["tiers"][0]["pinned_records"], 4,
        "the first version's records were released: {stats}"
    );

    // An ordinary window: clone, thaw the clone, delete the auto-save.
    call(
        &rt,
        &m,
        "window_clone",
        json!({"source_window": "autosave-S", "new_window_name": "kept", "new_session_id": "K"}),
    )
    .unwrap();
    call(
        &rt,
        &m,
        "window_delete",
        json!({"window_name": "autosave-S"}),
    )
    .unwrap();
    call(&rt, &m, "window_thaw", json!({"window_name": "kept"})).unwrap();
    assert_eq!(thawed_version(&mut c, "K", &versions, &src, &dst), Some(1));

    // Counted, and nothing more is saved while the session is idle with no new chunks.
    std::thread::sleep(Duration::from_millis(2600));
    let a = auto_save(&rt, &m);
    assert_eq!(a["saves"], 2, "{a}");
    assert_eq!(a["failures"], 0, "{a}");
    assert_eq!(a["default_idle_secs"], 2);
    let metrics = http_get(&s, "/metrics");
    for series in [
        "cwm_autosaves_total{result=\"saved\"} 2",
        "cwm_autosaves_total{result=\"failed\"} 0",
        "cwm_autosave_default_idle_seconds 2",
    ] {
        assert!(metrics.contains(series), "metrics lack {series:?}");
    }
    assert!(http_get(&s, "/status").contains("\"auto_save\""));
    rt.block_on(m.cancel()).ok();
}

#[test]
fn auto_save_is_off_by_default_and_set_per_session_over_mcp() {
    let (rt, dir, src, dst) = fixture(9);
    let one = Conversation::new(3, 1, 2);
    let other = Conversation::new(4, 41, 2);
    {
        let (s, mut c) = start(disk_config(dir.path()), &src, &[&dst]);
        let m = mcp(&rt, &s);
        // Bad input: a clear error, and nothing changes.
        for (args, want) in [
            (
                json!({"session_id": "S", "enabled": true, "window_name": "a b"}),
                "invalid window name",
            ),
            (
                json!({"session_id": "S", "enabled": true, "idle_secs": 0}),
                "idle_secs",
            ),
            (
                json!({"session_id": "a/b", "enabled": true}),
                "invalid session_id",
            ),
        ] {
            let e = session_autosave(&rt, &m, args.clone()).expect_err("must fail");
            assert!(e.contains(want), "{args}: {e:?} should say {want:?}");
        }
        assert_eq!(auto_save(&rt, &m)["sessions_on"], 0);

        let r = session_autosave(
            &rt,
            &m,
            json!({"session_id": "S", "enabled": true, "window_name": "mine", "idle_secs": 1}),
        )
        .unwrap();
        assert_eq!(
            r,
            json!({"session_id": "S", "enabled": true, "window_name": "mine", "idle_secs": 1, "own_setting": true})
        );
        one.store(&mut c, "S", "r1");
        other.store(&mut c, "U", "r2");
        wait_saves(&rt, &m, 1);
        // U would be due by now if auto-save were on by default.
        std::thread::sleep(Duration::from_millis(1500));
        let saved = autosaves(&rt, &m);
        assert_eq!(saved.len(), 1, "only the session turned on: {saved:?}");
        assert_eq!(saved[0]["name"], "mine");
        assert_eq!(auto_save(&rt, &m)["saves"], 1);
        rt.block_on(m.cancel()).ok();
        s.stop();
    }
    // The setting survives a restart; the chain already saved is not saved again.
    let (s, mut c) = start(disk_config(dir.path()), &src, &[&dst]);
    let m = mcp(&rt, &s);
    std::thread::sleep(Duration::from_millis(1500));
    let a = auto_save(&rt, &m);
    assert_eq!(
        (a["sessions_on"].as_u64(), a["saves"].as_u64()),
        (Some(1), Some(0)),
        "{a}"
    );
    // Turned off: new chunks are not saved.
    session_autosave(&rt, &m, json!({"session_id": "S", "enabled": false})).unwrap();
    other.store(&mut c, "S", "r3");
    std::thread::sleep(Duration::from_millis(1500));
    let a = auto_save(&rt, &m);
    assert_eq!(
        (a["sessions_off"].as_u64(), a["saves"].as_u64()),
        (Some(1), Some(0)),
        "{a}"
    );
    rt.block_on(m.cancel()).ok();
}

#[test]
fn a_session_turned_off_is_not_auto_saved_when_every_other_is() {
    let (rt, dir, src, dst) = fixture(11);
    let (s, mut c) = start(config(dir.path(), 1), &src, &[&dst]);
    let m = mcp(&rt, &s);
    session_autosave(&rt, &m, json!({"session_id": "S", "enabled": false})).unwrap();
    let hand = Conversation::new(5, 1, 2);
    hand.store(&mut c, "S", "r1");
    // A window frozen by hand under V's auto-save name: V's auto-save never replaces it.
    call(
        &rt,
        &m,
        "window_freeze",
        json!({"session_id": "S", "window_name": "autosave-V"}),
    )
    .unwrap();
    let u = Conversation::new(6, 41, 2);
    u.store(&mut c, "U", "r2");
    Conversation::new(7, 81, 2).store(&mut c, "V", "r3");
    wait_saves(&rt, &m, 1);
    std::thread::sleep(Duration::from_millis(1500));
    let saved = autosaves(&rt, &m);
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_eq!(saved[0]["name"], "autosave-U");
    let a = auto_save(&rt, &m);
    assert_eq!(
        (a["saves"].as_u64(), a["failures"].as_u64()),
        (Some(1), Some(1)),
        "{a}"
    );
    assert!(a["last_failure"].as_str().unwrap().contains("taken"), "{a}");
    thaw(&rt, &m, "autosave-V", "H").unwrap();
    assert_eq!(
        thawed_version(&mut c, "H", &[&hand], &src, &dst),
        Some(0),
        "the hand-frozen window is intact"
    );
    thaw(&rt, &m, "autosave-U", "T").unwrap();
    assert_eq!(thawed_version(&mut c, "T", &[&u], &src, &dst), Some(0));
    rt.block_on(m.cancel()).ok();
}

/// The race the issue names: while an auto-save of a new burst is due, one thread thaws the
/// window again and again (each into a fresh session, then checks what it finds there) and
/// another deletes it at a random moment (every third round none: the save replaces the last
/// version under the thaws). Every thaw gets one version whole and byte-exact, or "no window
/// named"; afterwards the window is gone (the delete came after the save: delete wins) or
/// holds the newest burst (the save came after the delete and made it again, or replaced the
/// last), never the previous burst.
#[test]
fn an_auto_save_racing_thaws_and_deletes_of_its_window_never_serves_wrong_bytes() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    // Two thawing threads, each retrieving into its own destination.
    let (src, dst) = (kv(), [dest(2), dest(3)]);
    src.fill(13);
    let (s, mut c) = start(disk_config(dir.path()), &src, &[&dst[0], &dst[1]]);
    let m = mcp(&rt, &s);
    // Only S: the sessions thawed into must not be saved themselves.
    session_autosave(
        &rt,
        &m,
        json!({"session_id": "S", "enabled": true, "idle_secs": 1}),
    )
    .unwrap();
    let a = Conversation::new(7, 1, 2);
    let b = Conversation::new(8, 41, 2);
    let versions = [&a, &b];
    let mut seed = 12345u64;
    let (mut gone, mut remade, mut thaws) = (0, 0, 0);
    const ROUNDS: usize = 18;
    for round in 0..ROUNDS {
        let newest = round % 2;
        versions[newest].store(&mut c, "S", &format!("burst{round}"));
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let delete_after = Duration::from_millis(500 + (seed >> 33) % 1300);
        // Every third round no delete: the save replaces the last version under the thaws.
        let delete = round % 3 != 2;
        let saved = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let thaw_until_saved = |who: usize| {
                let mut c = client(&s);
                let mut n = 0;
                let mut after_save = 0;
                while after_save < 5 {
                    if saved.load(Ordering::SeqCst) {
                        after_save += 1;
                    }
                    let salt = format!("T{round}-{who}-{n}");
                    n += 1;
                    match thaw(&rt, &m, "autosave-S", &salt) {
                        Ok(r) => {
                            assert_eq!(r["complete"], true, "half a window: {r}");
                            assert_eq!(r["tokens_ready"], 512, "{r}");
                            let v = thawed_version(&mut c, &salt, &versions, &src, &dst[who]);
                            assert!(v.is_some(), "thaw {r} left nothing under {salt}");
                        }
                        Err(e) => assert!(e.contains("no window named"), "thaw failed: {e}"),
                    }
                }
                n
            };
            let thawers: Vec<_> = (0..2)
                .map(|who| scope.spawn(move || thaw_until_saved(who)))
                .collect();
            scope.spawn(|| {
                if !delete {
                    return;
                }
                std::thread::sleep(delete_after);
                if let Err(e) = call(
                    &rt,
                    &m,
                    "window_delete",
                    json!({"window_name": "autosave-S"}),
                ) {
                    assert!(e.contains("no window named"), "delete failed: {e}");
                }
            });
            wait_saves(&rt, &m, round as u64 + 1);
            saved.store(true, Ordering::SeqCst);
            thaws += thawers
                .into_iter()
                .map(|t| t.join().unwrap())
                .sum::<usize>();
        });
        let status = call(
            &rt,
            &m,
            "window_status",
            json!({"window_name": "autosave-S"}),
        );
        match status {
            Err(e) => {
                assert!(e.contains("no window named"), "{e}");
                assert!(delete, "round {round}: no delete, yet the window is gone");
                gone += 1;
            }
            Ok(st) => {
                assert_eq!(st["window"]["chunks_missing"], 0, "{st}");
                let salt = format!("check{round}");
                thaw(&rt, &m, "autosave-S", &salt).unwrap();
                assert_eq!(
                    thawed_version(&mut c, &salt, &versions, &src, &dst[0]),
                    Some(newest),
                    "round {round}: the window holds an older burst"
                );
                remade += 1;
            }
        }
    }
    assert_eq!(auto_save(&rt, &m)["failures"], 0);
    eprintln!("{ROUNDS} rounds, {thaws} thaws: deleted after the save {gone}, saved after the delete {remade}");
    rt.block_on(m.cancel()).ok();
}
