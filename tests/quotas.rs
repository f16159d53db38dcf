//! Tenant quotas (issue 24, L1): set, read and removed over HTTP (`/quota/{cache_salt}`),
//! enforced on stores through the MP protocol: a tenant over its quota evicts its own oldest
//! chunks and never another tenant's; bad input is refused and changes nothing.

mod common;

use common::http::Http;
use common::*;
use reqwest::StatusCode;

const MODEL: &str = "quota-model";

/// Store prompt `seed` (one 256-token chunk from blocks 1..=16) under `salt`.
fn store(c: &mut cwm::client::MpClient, salt: &str, seed: u32) -> bool {
    let t = tokens(seed, 256);
    c.store(
        &key(MODEL, salt, &t, Some(0), 1, 0, 256, "s"),
        1,
        &[(1..17).collect()],
    )
    .unwrap()
    .ok
}

fn hits(c: &mut cwm::client::MpClient, salt: &str, seed: u32) -> u64 {
    let t = tokens(seed, 256);
    lookup_hits(
        c,
        &key(MODEL, salt, &t, None, 1, 0, 256, &format!("q{salt}{seed}")),
    )
}

#[test]
fn a_tenant_over_its_quota_evicts_only_its_own_chunks() {
    let s = sidecar(small_config());
    let http = Http::new(&s);
    let mut c = client(&s);
    let kv = TestKv::new(Layout::Nhd, 1, 40, 16, 1, 16);
    kv.fill(3);
    c.register_kv_cache(1, &kv.descriptors(), MODEL, 1, kv.hint(), &kv.groups())
        .unwrap();

    for seed in 100..104 {
        assert!(store(&mut c, "bob", seed));
    }
    assert!(store(&mut c, "alice", 0));
    let unit = http.used("alice");
    assert!(unit > 0);
    let limit_gb = (2 * unit) as f64 / (1u64 << 30) as f64;
    let (st, v) = http.put(
        "/quota/alice",
        &format!(r#"{{"limit_gb": {limit_gb}, "tier": "l1"}}"#),
    );
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["limit_bytes"].as_u64(), Some(2 * unit), "{v}");

    for seed in 1..4 {
        assert!(store(&mut c, "alice", seed), "alice's store {seed} refused");
        assert!(http.used("alice") <= 2 * unit, "alice above her quota");
    }
    for seed in 100..104 {
        assert_eq!(
            hits(&mut c, "bob", seed),
            1,
            "bob's chunk {seed} was evicted"
        );
    }
    let alice: Vec<u64> = (0..4).map(|seed| hits(&mut c, "alice", seed)).collect();
    assert_eq!(alice, [0, 0, 1, 1], "alice keeps her two newest chunks");

    let (st, v) = http.get("/quota");
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["quotas"][0]["cache_salt"], "alice", "{v}");
    assert_eq!(v["usage"]["salts"], 2, "{v}");
    let (_, metrics) = http.get("/metrics");
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(
        metrics.contains("cwm_l1_quota_evicted_objects_total 2"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "cwm_l1_salt_bytes{{cache_salt=\"alice\"}} {}",
        2 * unit
    )));

    // Removed: alice may grow again.
    let (st, _) = http.delete("/quota/alice");
    assert_eq!(st, StatusCode::OK);
    assert_eq!(http.delete("/quota/alice").0, StatusCode::NOT_FOUND);
    assert!(store(&mut c, "alice", 4));
    assert_eq!(http.used("alice"), 3 * unit);
}

#[test]
fn bad_quota_requests_are_refused_and_change_nothing() {
    let s = sidecar(small_config());
    let http = Http::new(&s);
    for (path, body, want) in [
        (
            "/quota/alice",
            r#"{"limit_gb": -1}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            "/quota/alice",
            r#"{"limit_gb": 1, "tier": "l2"}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            "/quota/alice",
            r#"{"limit_gb": 1, "tier": "l9"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/quota/alice",
            r#"{"limit": 1}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("/quota/alice", "not json", StatusCode::UNPROCESSABLE_ENTITY),
        ("/quota/a@b", r#"{"limit_gb": 1}"#, StatusCode::BAD_REQUEST),
    ] {
        let (st, v) = http.put(path, body);
        assert_eq!(st, want, "PUT {path} {body}: {v}");
    }
    let (_, v) = http.get("/quota");
    assert_eq!(v["quotas"], serde_json::json!([]), "nothing was set: {v}");
    // `_default` is the empty salt.
    assert_eq!(
        http.put("/quota/_default", r#"{"limit_gb": 0.5}"#).0,
        StatusCode::OK
    );
    let (_, v) = http.get("/quota/_default");
    assert_eq!(v["quota"]["limit_bytes"].as_u64(), Some(1 << 29), "{v}");
    assert_eq!(v["cache_salt"], "_default");
}

/// The MCP tools reach the same limits as the HTTP routes, and refuse the same bad input.
#[test]
fn quotas_over_mcp_are_the_same_limits_as_over_http() {
    use common::mcp::call;
    use serde_json::json;

    let s = sidecar(small_config());
    let http = Http::new(&s);
    let rt = &http.rt;
    let url = format!("http://{}/mcp", s.http_addr);
    let m = rt
        .block_on(cwm::mcp::connect(&url, None))
        .expect("MCP client connects");
    let mut c = client(&s);
    let kv = TestKv::new(Layout::Nhd, 1, 40, 16, 1, 16);
    kv.fill(5);
    c.register_kv_cache(1, &kv.descriptors(), MODEL, 1, kv.hint(), &kv.groups())
        .unwrap();
    assert!(store(&mut c, "alice", 0));
    let unit = http.used("alice");

    for (args, why) in [
        (json!({"cache_salt": "alice", "limit_gb": -1}), "limit_gb"),
        (
            json!({"cache_salt": "alice", "limit_gb": 1, "tier": "l2"}),
            "no such tier",
        ),
        (json!({"cache_salt": "a@b", "limit_gb": 1}), "cache_salt"),
        (json!({"cache_salt": "alice", "limit": 1}), ""),
    ] {
        let err = call(rt, &m, "quota_set", args.clone()).expect_err(&format!("{args} refused"));
        assert!(err.contains(why), "{args}: {err}");
    }
    assert_eq!(http.get("/quota").1["quotas"], json!([]), "nothing was set");

    // One chunk's worth, over MCP: enforced on the next stores, visible over HTTP.
    let limit_gb = unit as f64 / (1u64 << 30) as f64;
    let set = call(
        rt,
        &m,
        "quota_set",
        json!({"cache_salt": "alice", "limit_gb": limit_gb}),
    )
    .unwrap();
    assert_eq!(set["limit_bytes"].as_u64(), Some(unit), "{set}");
    assert_eq!(
        http.get("/quota/alice").1["quota"]["limit_bytes"].as_u64(),
        Some(unit)
    );
    for seed in 1..3 {
        assert!(store(&mut c, "alice", seed));
    }
    let got = call(rt, &m, "quota_get", json!({"cache_salt": "alice"})).unwrap();
    assert_eq!(got["usage"]["l1_bytes"].as_u64(), Some(unit), "{got}");
    assert_eq!(got["usage"]["l1_bytes"].as_u64(), Some(http.used("alice")));
    let (_, listed) = http.get("/quota");
    assert_eq!(call(rt, &m, "quota_list", json!({})).unwrap(), listed);

    let deleted = call(rt, &m, "quota_delete", json!({"cache_salt": "alice"})).unwrap();
    assert_eq!(deleted["quota"], serde_json::Value::Null, "{deleted}");
    let err = call(rt, &m, "quota_delete", json!({"cache_salt": "alice"})).unwrap_err();
    assert!(err.contains("no quota of its own"), "{err}");
    assert!(store(&mut c, "alice", 3));
    assert_eq!(http.used("alice"), 2 * unit, "the limit is gone");
    rt.block_on(m.cancel()).unwrap();
}
