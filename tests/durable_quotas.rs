//! Tenant quotas on the durable tiers (issue 24): L2 and L3 budgets per cache_salt set over
//! HTTP and MCP, enforced on write-behind (a tenant over its L2 quota drops its own least
//! recently used records, never another tenant's; over its L3 quota, counted fleet-wide in
//! Redis, too), at freeze (refused, nothing left behind), rebuilt at a restart; and
//! `window_status {session_id}` telling where each chunk of a chain is and whether a freeze
//! would succeed.

mod common;

use std::time::{Duration, Instant};

use common::http::{gb, Http};
use common::mcp::call;
use common::redis::{RedisCluster, RedisServer};
use common::*;
use cwm::client::MpClient;
use cwm::config::Config;
use cwm::serve::Sidecar;
use reqwest::StatusCode;
use serde_json::{json, Value};

const MODEL: &str = "dq-model";

fn kv() -> TestKv {
    let kv = TestKv::new(Layout::Nhd, 1, 80, 16, 1, 16);
    kv.fill(9);
    kv
}

/// Store one 256-token chunk (prompt `seed`, blocks 1..=16) under `salt`.
fn store(c: &mut MpClient, salt: &str, seed: u32) {
    let t = tokens(seed, 256);
    assert!(
        c.store(
            &key(MODEL, salt, &t, Some(0), 1, 0, 256, "s"),
            1,
            &blocks(1, 16)
        )
        .unwrap()
        .ok,
        "store of {salt}/{seed}"
    );
}

/// Store a chain of `chunks` chunks (prompt `seed`) under `salt` in one request.
fn store_chain(c: &mut MpClient, salt: &str, seed: u32, chunks: u32) {
    let t = tokens(seed, 256 * chunks as usize);
    let end = t.len() as u64;
    assert!(
        c.store(
            &key(MODEL, salt, &t, Some(0), 1, 0, end, "c"),
            1,
            &blocks(1, 16 * chunks)
        )
        .unwrap()
        .ok
    );
}

fn hits(c: &mut MpClient, salt: &str, seed: u32) -> u64 {
    let t = tokens(seed, 256);
    lookup_hits(
        c,
        &key(MODEL, salt, &t, None, 1, 0, 256, &format!("q{salt}{seed}")),
    )
}

fn start(config: Config) -> (Sidecar, Http, MpClient, TestKv) {
    let s = sidecar(config);
    let http = Http::new(&s);
    let mut c = client(&s);
    let kv = kv();
    register_kv(&mut c, MODEL, 1, &kv);
    (s, http, c, kv)
}

/// The entry of `tier` in a `GET /quota/{salt}` answer.
fn tier_of<'a>(q: &'a Value, tier: &str) -> &'a Value {
    q["tiers"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["tier"] == tier))
        .unwrap_or_else(|| panic!("no {tier} in {q}"))
}

/// An MCP client (rmcp, streamable HTTP) of `s`.
fn mcp(http: &Http, s: &Sidecar) -> common::mcp::Mcp {
    let url = format!("http://{}/mcp", s.http_addr);
    http.rt
        .block_on(cwm::mcp::connect(&url, None))
        .expect("MCP client connects")
}

fn set_quota(http: &Http, salt: &str, tier: &str, bytes: u64) -> Value {
    let (st, v) = http.put(
        &format!("/quota/{salt}"),
        &format!(r#"{{"limit_gb": {}, "tier": "{tier}"}}"#, gb(bytes)),
    );
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["limit_bytes"].as_u64(), Some(bytes), "{v}");
    assert_eq!(v["tier"], tier, "{v}");
    v
}

/// Wait, bounded, until `salt`'s usage on `tier` satisfies `ok`; the usage.
fn wait_usage(http: &Http, salt: &str, tier: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let used = http.used_on(salt, tier);
        if ok(used) {
            return used;
        }
        assert!(
            Instant::now() < deadline,
            "{salt}'s {tier} usage stays at {used}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_tenant_filling_its_l2_quota_drops_only_its_own_oldest_records() {
    let dir = tempfile::tempdir().unwrap();
    let (s, http, mut c, _kv) = start(disk_config(dir.path()));
    for seed in 100..104 {
        store(&mut c, "bob", seed);
    }
    store(&mut c, "alice", 0);
    wait_written(&s, 5);
    let unit = http.used_on("alice", "l2");
    let bob = http.used_on("bob", "l2");
    assert!(unit > 0 && bob > 0);

    set_quota(&http, "alice", "l2", 2 * unit);
    for seed in 1..4 {
        store(&mut c, "alice", seed);
    }
    wait_written(&s, 8);
    assert_eq!(
        http.used_on("alice", "l2"),
        2 * unit,
        "alice within 2 chunks"
    );
    assert_eq!(http.used_on("bob", "l2"), bob, "bob's records untouched");
    assert_eq!(http.metric("cwm_l2_quota_dropped_records_total"), 2);
    assert_eq!(http.metric("cwm_l2_quota_refused_total"), 0);
    // From L2 alone: bob keeps all four, alice her two newest.
    s.cwm.tiers.evict_l1(true);
    for seed in 100..104 {
        assert_eq!(hits(&mut c, "bob", seed), 1, "bob's chunk {seed} is gone");
    }
    let alice: Vec<u64> = (0..4).map(|seed| hits(&mut c, "alice", seed)).collect();
    assert_eq!(alice, [0, 0, 1, 1], "alice keeps her two newest chunks");

    // Lowered at run time: the next write takes her down to one chunk.
    set_quota(&http, "alice", "l2", unit);
    store(&mut c, "alice", 4);
    wait_written(&s, 9);
    assert_eq!(http.used_on("alice", "l2"), unit);
    assert_eq!(http.used_on("bob", "l2"), bob);

    // The report: each tier's limit and usage, the tenants in /status and /metrics.
    let (_, q) = http.get("/quota/alice");
    let l2 = tier_of(&q, "l2");
    assert_eq!(l2["limit"]["limit_bytes"].as_u64(), Some(unit), "{q}");
    assert_eq!(q["quota"], Value::Null, "no L1 limit: {q}");
    let (_, list) = http.get("/quota");
    assert_eq!(list["quotas"][0]["tier"], "l2", "{list}");
    let (_, status) = http.get("/status");
    let tenants = status["cache"]["tenants"]
        .as_array()
        .unwrap_or_else(|| panic!("no tenants in /status: {status}"));
    let l2_tenants = tenants.iter().find(|t| t["tier"] == "L2").unwrap();
    assert_eq!(l2_tenants["top"][0]["cache_salt"], "bob", "{l2_tenants}");
    assert_eq!(l2_tenants["salts"], 2);
    let (_, metrics) = http.get("/metrics");
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics.contains(&format!("cwm_l2_salt_bytes{{cache_salt=\"alice\"}} {unit}")),
        "{metrics}"
    );

    // Removed on L2 only (and only once): she may grow again.
    let (st, v) = http.delete("/quota/alice?tier=l2");
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["removed"], json!(["l2"]));
    assert_eq!(http.delete("/quota/alice?tier=l2").0, StatusCode::NOT_FOUND);
    store(&mut c, "alice", 5);
    wait_written(&s, 10);
    assert_eq!(http.used_on("alice", "l2"), 2 * unit);
}

/// Over MCP: a freeze over the salt's L2 quota is refused with the reason and changes nothing;
/// one within it pins the window, whose records the quota then never drops.
#[test]
fn a_freeze_over_the_durable_quota_fails_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (s, http, mut c, _kv) = start(disk_config(dir.path()));
    let rt = &http.rt;
    let m = mcp(&http, &s);
    store_chain(&mut c, "S", 7, 4);
    wait_written(&s, 4);
    let chain = http.used_on("S", "l2");
    let l2 = |http: &Http| {
        let (_, st) = http.get("/status");
        st["cache"]["tiers"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["name"] == "L2").cloned())
            .unwrap_or_else(|| panic!("no L2 in /status: {st}"))
    };
    let before = l2(&http);

    let set = call(
        rt,
        &m,
        "quota_set",
        json!({"cache_salt": "S", "limit_gb": gb(chain / 2), "tier": "l2"}),
    )
    .unwrap();
    assert_eq!(set["tier"], "l2", "{set}");
    let status = call(rt, &m, "window_status", json!({"session_id": "S"})).unwrap();
    let ch = &status["session"]["chains"][0];
    assert_eq!(ch["freezable"], false, "{status}");
    assert!(
        ch["over_quota"].as_str().unwrap().contains("L2 quota"),
        "{status}"
    );
    let err = call(
        rt,
        &m,
        "window_freeze",
        json!({"session_id": "S", "window_name": "w"}),
    )
    .expect_err("a freeze over the L2 quota is refused");
    assert!(
        err.contains("over its L2 quota") && err.contains("nothing was written or pinned"),
        "{err}"
    );
    assert_eq!(call(rt, &m, "window_list", json!({})).unwrap()["total"], 0);
    let after = l2(&http);
    assert_eq!(after["pinned_records"], 0, "nothing pinned: {after}");
    assert_eq!(
        after["records"], before["records"],
        "nothing written or dropped"
    );
    assert_eq!(after["written_records"], before["written_records"]);
    assert!(!dir.path().join("windows").join("w.json").exists());

    // Within the quota (exactly): frozen, pinned.
    call(
        rt,
        &m,
        "quota_set",
        json!({"cache_salt": "S", "limit_gb": gb(chain), "tier": "l2"}),
    )
    .unwrap();
    let r = call(
        rt,
        &m,
        "window_freeze",
        json!({"session_id": "S", "window_name": "w"}),
    )
    .unwrap();
    assert_eq!(r["window"]["chunks"], 4, "{r}");
    assert_eq!(l2(&http)["pinned_records"], 4);
    // The salt is full of pinned records: its next write is refused for L2, nothing dropped.
    store(&mut c, "S", 99);
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.metric("cwm_l2_quota_refused_total") < 1 {
        assert!(
            Instant::now() < deadline,
            "the write over the quota was not refused"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(http.used_on("S", "l2"), chain);
    assert_eq!(l2(&http)["pinned_records"], 4);
    assert_eq!(http.metric("cwm_l2_quota_dropped_records_total"), 0);
    rt.block_on(m.cancel()).unwrap();
}

#[test]
fn l2_usage_and_default_quotas_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = {
        let (s, http, mut c, _kv) = start(disk_config(dir.path()));
        for seed in 0..3 {
            store(&mut c, "alice", seed);
        }
        for seed in 100..102 {
            store(&mut c, "bob", seed);
        }
        wait_written(&s, 5);
        (http.used_on("alice", "l2"), http.used_on("bob", "l2"))
    };
    let unit = alice / 3;
    // Restarted with a default L2 quota of two of alice's chunks for every salt.
    let (s, http, mut c, _kv) = start(Config {
        l2_quota_gb_per_salt: gb(2 * unit),
        ..disk_config(dir.path())
    });
    assert_eq!(http.used_on("alice", "l2"), alice, "rebuilt from the index");
    assert_eq!(http.used_on("bob", "l2"), bob);
    let (_, q) = http.get("/quota/alice");
    let l2 = tier_of(&q, "l2");
    assert_eq!(l2["limit"]["explicit"], false, "{q}");
    assert_eq!(l2["limit"]["limit_bytes"].as_u64(), Some(2 * unit), "{q}");
    store(&mut c, "alice", 3);
    wait_written(&s, 1);
    assert_eq!(
        http.used_on("alice", "l2"),
        2 * unit,
        "alice back within her quota"
    );
    assert_eq!(http.used_on("bob", "l2"), bob, "bob's records untouched");
}

#[test]
fn window_status_shows_where_each_chunk_is_and_what_is_freezable() {
    let dir = tempfile::tempdir().unwrap();
    let (s, http, mut c, _kv) = start(disk_config(dir.path()));
    let rt = &http.rt;
    let m = mcp(&http, &s);
    let chain = |m: &common::mcp::Mcp, tokens: u64| -> Value {
        let st = call(rt, m, "window_status", json!({"session_id": "W"})).unwrap();
        st["session"]["chains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["tokens"] == tokens)
            .unwrap_or_else(|| panic!("no chain of {tokens} tokens: {st}"))
            .clone()
    };
    let places = |ch: &Value| -> Vec<(bool, bool)> {
        ch["chunk_tiers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["l1"] == true, t["l2"] == true))
            .collect()
    };
    store_chain(&mut c, "W", 3, 4);
    wait_written(&s, 4);
    let ch = chain(&m, 1024);
    assert_eq!(
        (ch["chunks"].as_u64(), ch["chunks_cached"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(ch["freezable"], true, "{ch}");
    assert_eq!(places(&ch), vec![(true, true); 4]);
    assert!(ch["chunk_tiers"][0].get("l3").is_none(), "no L3 here: {ch}");

    // Out of L1: still freezable from L2.
    s.cwm.tiers.evict_l1(true);
    let ch = chain(&m, 1024);
    assert_eq!(places(&ch), vec![(false, true); 4]);
    assert_eq!(ch["freezable"], true);

    // The salt's L2 quota drops its oldest records for a new chunk: the chain's head is gone.
    let used = http.used_on("W", "l2");
    set_quota(&http, "W", "l2", used - 1);
    store(&mut c, "W", 50);
    wait_written(&s, 5);
    let ch = chain(&m, 1024);
    let p = places(&ch);
    let gone = p.iter().take_while(|&&(l1, l2)| !l1 && !l2).count();
    assert!(gone >= 1, "{ch}");
    assert!(p[gone..].iter().all(|&(l1, l2)| !l1 && l2), "{ch}");
    assert_eq!(ch["chunks_cached"], 0, "{ch}");
    assert_eq!(ch["freezable"], false, "{ch}");
    let newest = chain(&m, 256);
    assert_eq!(places(&newest), vec![(true, true)]);
    assert_eq!(newest["freezable"], true, "{newest}");
    rt.block_on(m.cancel()).unwrap();
}

/// A sidecar on `redis` (memory only, so L3 is the only tier behind L1), with a KV registered.
fn start_on(redis: &RedisServer, config: Config) -> (Sidecar, Http, MpClient, TestKv) {
    start(Config {
        l3_url: Some(redis.url()),
        l3_timeout_ms: 2000,
        ..config
    })
}

/// How many chunk records of `salt` Redis holds (read with redis-cli, not through cwm).
fn records_in_redis(redis: &RedisServer, salt: &str) -> usize {
    redis.chunk_keys(Some(salt)).len()
}

#[test]
fn an_l3_quota_evicts_the_salts_least_recently_used_records_never_anothers() {
    let redis = RedisServer::start();
    let (s, http, mut c, _kv) = start_on(&redis, small_config());
    store(&mut c, "bob", 100);
    let unit = wait_usage(&http, "bob", "l3", |u| u > 0);
    // Same-length salts: records of the same size.
    set_quota(&http, "ann", "l3", 2 * unit + unit / 2);
    store(&mut c, "ann", 0);
    store(&mut c, "ann", 1);
    wait_written(&s, 3);
    // Chunk 0 read back from Redis (L1 emptied, no L2): now more recent than chunk 1.
    s.cwm.tiers.evict_l1(true);
    assert_eq!(hits(&mut c, "ann", 0), 1, "ann's chunk 0 from L3");
    store(&mut c, "ann", 2);
    wait_written(&s, 4);
    s.cwm.tiers.evict_l1(true);
    let ann: Vec<u64> = [1, 2]
        .iter()
        .map(|&seed| hits(&mut c, "ann", seed))
        .collect();
    assert_eq!(
        ann,
        [0, 1],
        "the least recently used (1) went, not the oldest (0)"
    );
    assert_eq!(http.used_on("ann", "l3"), 2 * unit);
    assert_eq!(records_in_redis(&redis, "ann"), 2);
    assert_eq!(http.metric("cwm_l3_quota_evicted_records_total"), 1);
    assert_eq!(http.metric("cwm_l3_quota_refused_total"), 0);
    assert_eq!(records_in_redis(&redis, "bob"), 1, "bob's record untouched");
    assert_eq!(http.used_on("bob", "l3"), unit);

    // Lowered at run time: the next write takes her down to one record.
    set_quota(&http, "ann", "l3", unit);
    store(&mut c, "ann", 3);
    wait_written(&s, 5);
    assert_eq!(http.used_on("ann", "l3"), unit);
    assert_eq!(records_in_redis(&redis, "ann"), 1);
    assert_eq!(records_in_redis(&redis, "bob"), 1);
    // /status and /metrics report the fleet's usage.
    let (_, status) = http.get("/status");
    let l3 = status["cache"]["tenants"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["tier"] == "L3").cloned())
        .unwrap_or_else(|| panic!("no L3 tenants in /status: {status}"));
    assert_eq!(l3["salts"], 2, "{l3}");
    let (_, metrics) = http.get("/metrics");
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains(&format!("cwm_l3_salt_bytes{{cache_salt=\"ann\"}} {unit}")),
        "{metrics}"
    );
}

/// Two sidecars on one Redis, each writing the same salt at once: the salt's L3 quota holds for
/// the two together (each alone would keep its own limit's worth).
#[test]
fn two_sidecars_on_one_redis_share_a_salts_l3_quota() {
    let redis = RedisServer::start();
    let (a, http_a, mut ca, _kv_a) = start_on(&redis, small_config());
    let (b, http_b, mut cb, _kv_b) = start_on(&redis, small_config());
    store(&mut ca, "bob", 100);
    let unit = wait_usage(&http_a, "bob", "l3", |u| u > 0);
    for http in [&http_a, &http_b] {
        set_quota(http, "ann", "l3", 3 * unit);
    }
    std::thread::scope(|t| {
        t.spawn(|| (0..6).for_each(|seed| store(&mut ca, "ann", seed)));
        t.spawn(|| (10..16).for_each(|seed| store(&mut cb, "ann", seed)));
    });
    wait_written(&a, 7);
    wait_written(&b, 6);
    assert_eq!(
        records_in_redis(&redis, "ann"),
        3,
        "within the quota fleet-wide"
    );
    for http in [&http_a, &http_b] {
        assert_eq!(
            http.used_on("ann", "l3"),
            3 * unit,
            "the same usage on both"
        );
        assert_eq!(http.used_on("bob", "l3"), unit);
    }
    let evicted = http_a.metric("cwm_l3_quota_evicted_records_total")
        + http_b.metric("cwm_l3_quota_evicted_records_total");
    assert_eq!(evicted, 9, "12 written, 3 kept");
    assert_eq!(records_in_redis(&redis, "bob"), 1, "bob's record untouched");
}

/// Records Redis lost on its own (evicted, expired) leave the salt's usage: chosen for eviction
/// they only correct the count, and those whose TTL ran out are forgotten.
#[test]
fn records_redis_lost_leave_the_salts_l3_usage() {
    let redis = RedisServer::start();
    let (s, http, mut c, _kv) = start_on(
        &redis,
        Config {
            l3_ttl_secs: 3,
            ..small_config()
        },
    );
    store(&mut c, "ann", 0);
    wait_written(&s, 1);
    let unit = http.used_on("ann", "l3");
    set_quota(&http, "ann", "l3", unit);
    // Gone behind the ledger's back, as maxmemory would evict it.
    let gone = redis.chunk_keys(Some("ann"));
    assert_eq!(redis.cli(&["DEL", &gone[0]]).trim(), "1");
    store(&mut c, "ann", 1);
    wait_written(&s, 2);
    assert_eq!(
        http.used_on("ann", "l3"),
        unit,
        "the lost record is not counted"
    );
    assert_eq!(records_in_redis(&redis, "ann"), 1);
    // Its TTL runs out: usage 0 (bounded wait: Redis expires it within 3 s).
    wait_usage(&http, "ann", "l3", |u| u == 0);
    assert_eq!(records_in_redis(&redis, "ann"), 0);
}

/// On a Redis Cluster: a salt's ledger is one slot while its records spread over the masters,
/// and its L3 quota holds.
#[test]
fn an_l3_quota_holds_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let (s, http, mut c, _kv) = start(Config {
        l3_cluster: Some(cluster.seeds()),
        l3_timeout_ms: 2000,
        ..small_config()
    });
    store(&mut c, "ann", 0);
    let unit = wait_usage(&http, "ann", "l3", |u| u > 0);
    set_quota(&http, "ann", "l3", 2 * unit);
    for seed in 1..6 {
        store(&mut c, "ann", seed);
    }
    wait_written(&s, 6);
    let held: usize = cluster
        .nodes
        .iter()
        .map(|n| records_in_redis(n, "ann"))
        .sum();
    assert_eq!(held, 2, "within the quota: {:?}", cluster.sizes());
    assert_eq!(http.used_on("ann", "l3"), 2 * unit);
    assert_eq!(http.metric("cwm_l3_quota_evicted_records_total"), 4);
}

/// A window's records in Redis count against the salt's L3 quota and are never evicted for it:
/// a freeze over the quota is refused, one within it keeps its records, a write they leave no
/// room for is refused (and its record deleted again); once the window is deleted its records
/// are the salt's cache data again, evicted least recently used first.
#[test]
fn windows_count_against_the_l3_quota_and_are_never_evicted_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let (s, http, mut c, _kv) = start_on(&redis, disk_config(dir.path()));
    let rt = &http.rt;
    let m = mcp(&http, &s);
    store_chain(&mut c, "S", 7, 4);
    wait_written(&s, 4);
    let chain = http.used_on("S", "l3");
    assert_eq!(records_in_redis(&redis, "S"), 4);
    set_quota(&http, "S", "l3", chain / 2);
    let err = call(
        rt,
        &m,
        "window_freeze",
        json!({"session_id": "S", "window_name": "w"}),
    )
    .expect_err("a freeze over the L3 quota is refused");
    assert!(err.contains("over its L3 quota"), "{err}");

    set_quota(&http, "S", "l3", chain);
    call(
        rt,
        &m,
        "window_freeze",
        json!({"session_id": "S", "window_name": "w"}),
    )
    .unwrap();
    assert_eq!(
        http.used_on("S", "l3"),
        chain,
        "the window's records, counted once"
    );
    store(&mut c, "S", 99);
    wait_written(&s, 5);
    assert_eq!(http.metric("cwm_l3_quota_refused_total"), 1);
    assert_eq!(http.metric("cwm_l3_quota_evicted_records_total"), 0);
    assert_eq!(
        records_in_redis(&redis, "S"),
        4,
        "the refused record deleted again"
    );
    assert_eq!(http.used_on("S", "l3"), chain);

    call(rt, &m, "window_delete", json!({"window_name": "w"})).unwrap();
    store(&mut c, "S", 100);
    wait_written(&s, 6);
    assert_eq!(http.metric("cwm_l3_quota_evicted_records_total"), 1);
    assert_eq!(records_in_redis(&redis, "S"), 4);
    assert_eq!(http.used_on("S", "l3"), chain);
    rt.block_on(m.cancel()).unwrap();
}
