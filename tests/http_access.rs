//! Who may use the HTTP port (docs/SECURITY.md), through a real HTTP client (reqwest) and a
//! real MCP client (rmcp): loopback `Host` and `Origin` on every route, the bearer token, the
//! refusal to serve HTTP beyond loopback without one, and the per-request limits.

mod common;

use common::*;
use cwm::client::MpClient;
use cwm::config::Config;
use cwm::limits::{Limit, MAX_CHECKSUM_BLOCKS, MAX_MCP_SESSIONS};
use cwm::serve::Sidecar;
use reqwest::StatusCode;

const MODEL: &str = "http-model";
const TOKEN: &str = "a-test-token-0123456789";

struct Http {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    base: String,
}

impl Http {
    fn new(s: &Sidecar) -> Http {
        Http {
            rt: runtime(),
            client: reqwest::Client::new(),
            base: format!("http://{}", s.http_addr),
        }
    }

    /// Send `method path` with `headers` (and `body`); the status and the body.
    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, String) {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.rt.block_on(async {
            let r = req.send().await.expect("the request gets an answer");
            (r.status(), r.text().await.unwrap())
        })
    }

    fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> (StatusCode, String) {
        self.send(reqwest::Method::POST, path, headers, body)
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
        self.send(reqwest::Method::GET, path, headers, "")
    }
}

/// Store one chunk and return a function telling whether it is still cached.
fn store_one_chunk(s: &Sidecar) -> (MpClient, TestKv, impl Fn(&mut MpClient, &str) -> u64) {
    let mut c = client(s);
    let kv = TestKv::new(Layout::Nhd, 1, 40, 16, 1, 16);
    kv.fill(9);
    c.register_kv_cache(1, &kv.descriptors(), MODEL, 1, kv.hint(), &kv.groups())
        .unwrap();
    let t = tokens(5, 256);
    assert!(
        c.store(
            &key(MODEL, "", &t, Some(0), 1, 0, 256, "s"),
            1,
            &[(1..17).collect()]
        )
        .unwrap()
        .ok
    );
    let cached = move |c: &mut MpClient, rid: &str| {
        let hits = lookup_hits(c, &key(MODEL, "", &t, None, 1, 0, 256, rid));
        c.free_lookup_locks(&key(MODEL, "", &t, None, 1, 0, 256, rid))
            .unwrap();
        hits
    };
    (c, kv, cached)
}

/// DNS rebinding: a page at evil.example resolving to 127.0.0.1 sends `Host: evil.example`.
/// Before the access layer, `POST /cache/clear` answered any Host and cleared the cache.
#[test]
fn a_foreign_host_is_refused_on_every_route_and_clears_nothing() {
    let s = sidecar(small_config());
    let (mut c, _kv, cached) = store_one_chunk(&s);
    let http = Http::new(&s);
    let before = Limit::HttpHost.count();
    let evil = [
        ("Host", "evil.example:8080"),
        ("Content-Type", "text/plain"),
    ];
    assert_eq!(
        http.post("/cache/clear", &evil, "").0,
        StatusCode::FORBIDDEN
    );
    for path in ["/status", "/metrics", "/healthcheck", "/mcp"] {
        let (status, body) = http.get(path, &evil);
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert!(body.contains("not a loopback name"), "{path}: {body}");
    }
    assert!(Limit::HttpHost.count() >= before + 5);
    assert_eq!(cached(&mut c, "after-evil"), 1, "the cache was cleared");
    // The same request with a loopback Host (what LMCache's CLI and bench send) clears.
    for host in ["127.0.0.1:8080", "localhost", "[::1]:1"] {
        assert_eq!(
            http.get("/status", &[("Host", host)]).0,
            StatusCode::OK,
            "{host}"
        );
    }
    assert_eq!(
        http.post("/cache/clear", &[("Content-Type", "application/json")], "")
            .0,
        StatusCode::OK
    );
    assert_eq!(cached(&mut c, "after-clear"), 0, "a loopback clear clears");
}

/// Any web page the operator opens can POST to 127.0.0.1 with `Content-Type: text/plain`
/// (no CORS preflight); the browser says where it comes from in `Origin`.
#[test]
fn a_cross_site_post_is_refused_and_clears_nothing() {
    let s = sidecar(small_config());
    let (mut c, _kv, cached) = store_one_chunk(&s);
    let http = Http::new(&s);
    let before = Limit::HttpOrigin.count();
    for origin in [
        "http://evil.example",
        "null",
        "file://",
        "https://127.0.0.1.evil.example",
    ] {
        let (status, body) = http.post(
            "/cache/clear",
            &[("Origin", origin), ("Content-Type", "text/plain")],
            r#"{"tier":"l1","force":true}"#,
        );
        assert_eq!(status, StatusCode::FORBIDDEN, "{origin}: {body}");
        assert!(body.contains("cross-origin"), "{body}");
    }
    assert!(Limit::HttpOrigin.count() >= before + 4);
    assert_eq!(
        http.get("/mcp", &[("Origin", "http://evil.example")]).0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        cached(&mut c, "after-cross-site"),
        1,
        "the cache was cleared"
    );
    // A page served from loopback itself is same-site.
    let (status, _) = http.post("/cache/clear", &[("Origin", "http://localhost:3000")], "");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cached(&mut c, "after-clear"), 0);
}

fn with_token() -> Config {
    Config {
        http_token: Some(TOKEN.into()),
        ..small_config()
    }
}

#[test]
fn with_a_token_every_route_but_healthcheck_needs_it() {
    let s = sidecar(with_token());
    let (mut c, _kv, cached) = store_one_chunk(&s);
    let http = Http::new(&s);
    let bearer = format!("Bearer {TOKEN}");
    let before = Limit::HttpToken.count();
    for auth in [None, Some("Bearer wrong-token-0123456789"), Some(TOKEN)] {
        let h: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        for path in ["/status", "/metrics", "/mcp"] {
            let (status, body) = http.get(path, &h);
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} {auth:?}: {body}");
        }
        assert_eq!(
            http.post("/cache/clear", &h, "").0,
            StatusCode::UNAUTHORIZED
        );
    }
    assert!(Limit::HttpToken.count() >= before + 12);
    assert_eq!(cached(&mut c, "unauthorized"), 1, "the cache was cleared");
    assert_eq!(
        http.get("/healthcheck", &[]).0,
        StatusCode::OK,
        "probes need no token"
    );
    let auth = [("Authorization", bearer.as_str())];
    let (status, metrics) = http.get("/metrics", &auth);
    assert_eq!(status, StatusCode::OK);
    assert!(
        metrics.contains("cwm_refused_total{limit=\"http_token\"}"),
        "{metrics}"
    );
    assert_eq!(http.post("/cache/clear", &auth, "").0, StatusCode::OK);
    assert_eq!(cached(&mut c, "authorized"), 0);
}

#[test]
fn the_mcp_client_and_cwm_mcp_need_the_token() {
    use std::io::{BufRead, BufReader, Write};
    let s = sidecar(with_token());
    let rt = runtime();
    let url = format!("http://{}/mcp", s.http_addr);
    let refused = rt.block_on(cwm::mcp::connect(&url, None));
    assert!(
        refused.is_err(),
        "an MCP client without the token connected"
    );
    let wrong = rt.block_on(cwm::mcp::connect(&url, Some("wrong-token-0123456789")));
    assert!(wrong.is_err(), "an MCP client with a wrong token connected");
    let client = rt
        .block_on(cwm::mcp::connect(&url, Some(TOKEN)))
        .expect("the MCP client connects with the token");
    let tools = rt.block_on(client.list_all_tools()).unwrap();
    assert!(tools.iter().any(|t| t.name == "window_list"));
    rt.block_on(client.cancel()).unwrap();

    // `cwm mcp` forwards the token from CWM_HTTP_TOKEN (and --http-token): without it the
    // forwarder cannot reach the sidecar and exits with an error.
    let run = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cwm"));
        cmd.args(["mcp", "--url", &url])
            .env_remove("CWM_HTTP_TOKEN")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(t) = token {
            cmd.env("CWM_HTTP_TOKEN", t);
        }
        let mut child = cmd.spawn().expect("cwm mcp starts");
        let mut stdin = child.stdin.take().unwrap();
        // A forwarder without the token may have exited already (a broken pipe here): what it
        // printed is checked below.
        let _ = writeln!(
            stdin,
            r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocolVersion":"2025-06-18","capabilities":{{}},"clientInfo":{{"name":"t","version":"0"}}}}}}"#
        );
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        (line, String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (line, stderr) = run(None);
    assert!(
        !line.contains("\"result\""),
        "answered without the token: {line}"
    );
    assert!(stderr.contains("cannot reach the cwm sidecar"), "{stderr}");
    let (line, stderr) = run(Some(TOKEN));
    assert!(
        line.contains("\"result\""),
        "no initialize result: {line} {stderr}"
    );
}

/// Bound beyond loopback, HTTP needs a token: cwm refuses to start without one (before it
/// binds anything).
#[test]
fn serving_beyond_loopback_without_a_token_is_refused() {
    for host in ["0.0.0.0", "192.0.2.1", "::", "my-host.example"] {
        let config = Config {
            host: host.into(),
            port: 0,
            http_port: 0,
            ..small_config()
        };
        let e = Sidecar::start(&config)
            .err()
            .expect("started without a token");
        let e = e.to_string();
        assert!(
            e.contains("http_token") || e.contains("--http-token"),
            "{host}: {e}"
        );
    }
    for host in ["localhost", "127.0.0.1", "::1", "[::1]"] {
        let config = Config {
            host: host.into(),
            ..small_config()
        };
        config.validate().unwrap_or_else(|e| panic!("{host}: {e}"));
    }
    let short = Config {
        http_token: Some("short".into()),
        ..small_config()
    };
    assert!(short
        .validate()
        .unwrap_err()
        .to_string()
        .contains("http_token"));
}

/// 100,000 block ids took 20 s of CPU; more than MAX_CHECKSUM_BLOCKS are refused up front.
#[test]
fn checksums_refuse_more_block_ids_than_the_limit() {
    let s = sidecar(small_config());
    let (_c, _kv, _cached) = store_one_chunk(&s);
    let http = Http::new(&s);
    let ids = |n: usize| format!("[{}]", vec!["1"; n].join(","));
    let before = Limit::ChecksumBlocks.count();
    let (status, body) = http.post(
        "/cache/checksums",
        &[("Content-Type", "application/json")],
        &format!(
            r#"{{"block_ids":{},"chunk_size":16,"instance_id":1}}"#,
            ids(MAX_CHECKSUM_BLOCKS + 1)
        ),
    );
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body.contains(&MAX_CHECKSUM_BLOCKS.to_string()), "{body}");
    assert_eq!(Limit::ChecksumBlocks.count(), before + 1);
    let (status, body) = http.post(
        "/cache/checksums",
        &[],
        &format!(
            r#"{{"block_ids":{},"chunk_size":16,"instance_id":1}}"#,
            ids(32)
        ),
    );
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Each MCP session holds a worker and ~54 KB until it is closed or expires.
#[test]
fn new_mcp_sessions_are_refused_at_the_cap() {
    let s = sidecar(small_config());
    let http = Http::new(&s);
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}"#;
    let headers = [
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
    ];
    for i in 0..MAX_MCP_SESSIONS {
        let (status, body) = http.post("/mcp", &headers, init);
        assert_eq!(status, StatusCode::OK, "session {i}: {body}");
    }
    let before = Limit::McpSessions.count();
    let (status, body) = http.post("/mcp", &headers, init);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("MCP sessions are open"), "{body}");
    assert_eq!(Limit::McpSessions.count(), before + 1);
}
