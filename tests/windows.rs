//! Context windows end to end: store a conversation through the MP protocol, freeze it over
//! MCP (rmcp's client, streamable HTTP), restart the sidecar, thaw, hit and retrieve
//! byte-exact; clone under a new session; delete the original; export / import; bad inputs.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::mcp::call;
use common::*;
use cwm::client::MpClient;
use cwm::serve::Sidecar;
use rmcp::model::{CallToolRequestParams, ClientConfig};
use rmcp::service::RunningService;
use rmcp::RoleClient;
use serde_json::{json, Value};

const MODEL: &str = "win-model";

type Mcp = RunningService<RoleClient, ClientConfig>;

fn mcp(rt: &tokio::runtime::Runtime, s: &Sidecar) -> Mcp {
    let url = format!("http://{}/mcp", s.http_addr);
    rt.block_on(cwm::mcp::connect(&url, None))
        .expect("MCP client connects")
}

/// The two ways an MCP client reaches cwm.
#[derive(Debug, Clone, Copy)]
enum Transport {
    /// Streamable HTTP at the sidecar's `/mcp`.
    Http,
    /// `cwm mcp --url ...`, a stdio server the client launches, forwarding to the sidecar.
    Stdio,
}

/// An MCP client session over `transport` (with `handler` for what the server sends), and the
/// `cwm mcp` process behind a stdio one.
struct McpSession<H: rmcp::ClientHandler = ClientConfig> {
    client: RunningService<RoleClient, H>,
    forwarder: Option<tokio::process::Child>,
}

impl McpSession {
    fn open(rt: &tokio::runtime::Runtime, s: &Sidecar, transport: Transport) -> McpSession {
        McpSession::open_with(rt, s, transport, ClientConfig::default())
    }
}

impl<H: rmcp::ClientHandler> McpSession<H> {
    fn open_with(
        rt: &tokio::runtime::Runtime,
        s: &Sidecar,
        transport: Transport,
        handler: H,
    ) -> McpSession<H> {
        use rmcp::ServiceExt;
        let url = format!("http://{}/mcp", s.http_addr);
        rt.block_on(async {
            if let Transport::Http = transport {
                let http = rmcp::transport::StreamableHttpClientTransport::from_uri(url);
                return McpSession {
                    client: handler.serve(http).await.expect("MCP client connects"),
                    forwarder: None,
                };
            }
            let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cwm"))
                .args(["mcp", "--url", &url])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .expect("cwm mcp starts");
            let (stdout, stdin) = (child.stdout.take().unwrap(), child.stdin.take().unwrap());
            let client = handler
                .serve((stdout, stdin))
                .await
                .expect("MCP client connects over stdio");
            McpSession {
                client,
                forwarder: Some(child),
            }
        })
    }

    fn close(self, rt: &tokio::runtime::Runtime) {
        rt.block_on(async {
            let _ = self.client.cancel().await;
            if let Some(mut child) = self.forwarder {
                let _ = child.kill().await;
            }
        });
    }
}

fn lookup(c: &mut MpClient, salt: &str, t: &[u32], end: u64, rid: &str) -> u64 {
    lookup_hits(c, &key(MODEL, salt, t, None, 1, 0, end, rid))
}

#[allow(clippy::too_many_arguments)]
/// Retrieve `[0, end)` under `salt` into `dst` blocks from 10 and compare with `src` blocks
/// from 1.
fn assert_retrieves_exact(
    c: &mut MpClient,
    salt: &str,
    t: &[u32],
    end: u64,
    rid: &str,
    id: u64,
    src: &TestKv,
    dst: &TestKv,
) {
    dst.fill_byte(0);
    let n = (end / CS) as u32 * 16;
    assert!(
        c.retrieve(
            &key(MODEL, salt, t, Some(0), 1, 0, end, rid),
            id,
            &blocks(10, n),
            0
        )
        .unwrap()
        .ok,
        "retrieve under {salt:?}"
    );
    for j in 0..n as u64 {
        assert_eq!(
            src.block(1 + j),
            dst.block(10 + j),
            "salt {salt:?} block {j}"
        );
    }
}

fn http_post(s: &Sidecar, path: &str, body: &str) -> String {
    let mut stream = std::net::TcpStream::connect(s.http_addr).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    out
}

fn kv() -> TestKv {
    TestKv::new(Layout::Nhd, 4, 80, 16, 2, 32)
}

/// Store a conversation of 1024 tokens under `salt` in two turns, as vLLM would.
fn store_conversation(c: &mut MpClient, salt: &str, t: &[u32]) {
    assert!(
        c.store(
            &key(MODEL, salt, &t[..600], Some(0), 1, 0, 512, "turn1"),
            1,
            &blocks(1, 32)
        )
        .unwrap()
        .ok
    );
    assert!(
        c.store(
            &key(MODEL, salt, t, Some(0), 1, 512, 1024, "turn2"),
            1,
            &blocks(33, 32)
        )
        .unwrap()
        .ok
    );
    c.end_session("turn1").unwrap();
}

#[test]
fn freeze_restart_thaw_clone_delete_over_http() {
    freeze_restart_thaw_clone_delete(Transport::Http);
}

#[test]
fn freeze_restart_thaw_clone_delete_over_stdio() {
    freeze_restart_thaw_clone_delete(Transport::Stdio);
}

/// The whole story, every tool called through an MCP client over `transport`.
fn freeze_restart_thaw_clone_delete(transport: Transport) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (kv(), kv());
    src.fill(42);
    let t = tokens(77, 1100);
    {
        let s = sidecar(disk_config(dir.path()));
        let mut c = client(&s);
        register_kv(&mut c, MODEL, 1, &src);
        store_conversation(&mut c, "S", &t);
        let session = McpSession::open(&rt, &s, transport);
        let m = &session.client;
        let sessions = call(&rt, m, "session_list", json!({})).unwrap();
        assert_eq!(sessions["sessions"][0]["session_id"], "S");
        assert_eq!(sessions["sessions"][0]["newest_tokens"], 1024);
        // Freeze right away: write-behind may not have written anything yet.
        let r = call(&rt, m, "window_freeze", json!({"session_id": "S", "window_name": "chat", "description": "a chat", "tags": ["demo"]})).unwrap();
        assert_eq!(r["window"]["tokens"], 1024, "{r}");
        assert_eq!(r["window"]["chunks"], 4);
        assert!(r["window"]["stored_bytes"].as_u64().unwrap() > 0);

        // Bad inputs: errors, and nothing changes.
        let before = call(&rt, m, "window_list", json!({})).unwrap();
        for (tool, args, want) in [
            (
                "window_freeze",
                json!({"session_id": "S", "window_name": "chat"}),
                "taken",
            ),
            (
                "window_freeze",
                json!({"session_id": "nobody", "window_name": "x"}),
                "nothing stored",
            ),
            (
                "window_freeze",
                json!({"session_id": "S", "window_name": "a b"}),
                "invalid window name",
            ),
            (
                "window_freeze",
                json!({"session_id": "a/b", "window_name": "x"}),
                "invalid session_id",
            ),
            (
                "window_thaw",
                json!({"window_name": "nope"}),
                "no window named",
            ),
            (
                "window_thaw",
                json!({"window_name": "chat", "new_session_id": "bad@salt"}),
                "invalid session_id",
            ),
            (
                "window_clone",
                json!({"source_window": "chat", "new_window_name": "chat"}),
                "taken",
            ),
            (
                "window_clone",
                json!({"source_window": "nope", "new_window_name": "y"}),
                "no window named",
            ),
            (
                "window_delete",
                json!({"window_name": "nope"}),
                "no window named",
            ),
            ("window_status", json!({}), "window_name or session_id"),
            ("window_list", json!({"limit": 0}), "limit"),
        ] {
            let e =
                call(&rt, m, tool, args.clone()).expect_err(&format!("{tool} {args} must fail"));
            assert!(e.contains(want), "{tool} {args}: {e:?} should say {want:?}");
        }
        assert_eq!(call(&rt, m, "window_list", json!({})).unwrap(), before);
        let st = call(
            &rt,
            m,
            "window_status",
            json!({"window_name": "chat", "session_id": "S"}),
        )
        .unwrap();
        assert_eq!(st["window"]["chunks_in_l2"], 4, "{st}");
        assert_eq!(st["session"]["windows"][0], "chat");
        session.close(&rt);
        s.stop();
    }

    // Restart on the same L2 directory: L1 is empty, the window is still there.
    let s = sidecar(disk_config(dir.path()));
    assert_eq!(s.cwm.tiers.l1_occupancy().objects, 0);
    let session = McpSession::open(&rt, &s, transport);
    let m = &session.client;
    let mut c = client(&s);
    register_kv(&mut c, MODEL, 2, &dst);
    let list = call(&rt, m, "window_list", json!({"tag": "demo"})).unwrap();
    assert_eq!(list["total"], 1);
    assert_eq!(list["windows"][0]["name"], "chat");
    let r = call(&rt, m, "window_thaw", json!({"window_name": "chat"})).unwrap();
    assert_eq!(r["tokens_ready"], 1024, "{r}");
    assert_eq!(r["complete"], true);
    assert_eq!(r["tiers"]["l2"], 4, "read from disk: {r}");
    assert_eq!(s.cwm.tiers.l1_occupancy().objects, 4);
    assert_eq!(
        lookup(&mut c, "S", &t, 1024, "q1"),
        4,
        "every chunk hits under S"
    );
    assert_retrieves_exact(&mut c, "S", &t, 1024, "q1", 2, &src, &dst);

    // A branch under S2 shares the data; a third salt sees nothing.
    let r = call(
        &rt,
        m,
        "window_clone",
        json!({"source_window": "chat", "new_window_name": "chat.branch", "new_session_id": "S2"}),
    )
    .unwrap();
    assert_eq!(r["session_id"], "S2");
    let r = call(&rt, m, "window_thaw", json!({"window_name": "chat.branch"})).unwrap();
    assert_eq!(r["tokens_ready"], 1024);
    assert_eq!(r["session_id"], "S2");
    assert_eq!(lookup(&mut c, "S2", &t, 1024, "q2"), 4);
    assert_retrieves_exact(&mut c, "S2", &t, 1024, "q2", 2, &src, &dst);
    assert_eq!(
        lookup(&mut c, "S3", &t, 1024, "q3"),
        0,
        "a third salt sees nothing"
    );

    // Delete the original: the branch still thaws, from disk.
    let r = call(&rt, m, "window_delete", json!({"window_name": "chat"})).unwrap();
    assert_eq!(r["records_shared"], 4, "{r}");
    s.cwm.tiers.evict_l1(true);
    let r = call(&rt, m, "window_thaw", json!({"window_name": "chat.branch"})).unwrap();
    assert_eq!(r["tokens_ready"], 1024);
    assert_eq!(r["tiers"]["l2"], 4);
    assert_eq!(lookup(&mut c, "S2", &t, 1024, "q4"), 4);
    assert_retrieves_exact(&mut c, "S2", &t, 1024, "q4", 2, &src, &dst);
    // A thaw under yet another session, given at thaw time.
    let r = call(
        &rt,
        m,
        "window_thaw",
        json!({"window_name": "chat.branch", "new_session_id": "S4"}),
    )
    .unwrap();
    assert_eq!(r["tiers"]["l1"], 0);
    assert_eq!(lookup(&mut c, "S4", &t, 1024, "q5"), 4);

    let stats = call(&rt, m, "cache_stats", json!({})).unwrap();
    let l2 = &stats["tiers"][0];
    assert_eq!(l2["name"], "L2", "{stats}");
    assert!(l2["pinned_records"].as_u64().unwrap() >= 4, "{stats}");
    let health = call(&rt, m, "health", json!({})).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["windows"], 1);

    let metrics = http_get(&s, "/metrics");
    for series in [
        "HTTP/1.1 200",
        "cwm_ops_total{op=\"lookup\"}",
        "cwm_op_seconds_total{op=\"retrieve\"}",
        "cwm_tier_used_bytes{tier=\"l2\"}",
        "cwm_tier_hits_total{tier=\"l2\"}",
        "cwm_tier_evicted_objects_total{tier=\"l1\"}",
        "cwm_write_behind_queue_bytes ",
        "cwm_write_behind_dropped_total ",
        "cwm_l2_corrupt_records_total 0",
        "cwm_windows 1",
    ] {
        assert!(
            metrics.contains(series),
            "metrics lack {series:?}:\n{metrics}"
        );
    }
    assert!(http_get(&s, "/healthcheck").contains("healthy"));
    assert!(http_get(&s, "/status").contains("\"windows\":1"));
    session.close(&rt);
}

#[test]
fn windows_need_the_disk_tier() {
    let rt = runtime();
    let s = sidecar(small_config());
    let m = mcp(&rt, &s);
    let e = call(
        &rt,
        &m,
        "window_freeze",
        json!({"session_id": "S", "window_name": "w"}),
    )
    .unwrap_err();
    assert!(e.contains("L2"), "{e}");
    assert_eq!(call(&rt, &m, "window_list", json!({})).unwrap()["total"], 0);
}

/// A sidecar with the disk tier in a fresh directory, a two-turn conversation (1024 tokens,
/// 4 chunks) stored under `salt` and frozen as window `name`, and L1 emptied.
fn frozen_window(
    rt: &tokio::runtime::Runtime,
    salt: &str,
    name: &str,
) -> (tempfile::TempDir, Sidecar) {
    let dir = tempfile::tempdir().unwrap();
    let src = kv();
    src.fill(3);
    let s = sidecar(disk_config(dir.path()));
    let mut c = client(&s);
    register_kv(&mut c, MODEL, 1, &src);
    store_conversation(&mut c, salt, &tokens(5, 1100));
    let m = mcp(rt, &s);
    call(
        rt,
        &m,
        "window_freeze",
        json!({"session_id": salt, "window_name": name}),
    )
    .unwrap();
    s.cwm.tiers.evict_l1(true);
    (dir, s)
}

#[test]
fn thaw_sends_progress_notifications() {
    use rmcp::model::{ClientRequest, ProgressNotificationParam, Request};
    use rmcp::service::PeerRequestOptions;
    use rmcp::ClientHandler;
    use std::sync::{Arc, Mutex};

    type Seen = Vec<(f64, Option<f64>)>;
    #[derive(Clone, Default)]
    struct Progress(Arc<Mutex<Seen>>);
    impl ClientHandler for Progress {
        async fn on_progress(
            &self,
            params: ProgressNotificationParam,
            _context: rmcp::service::NotificationContext<RoleClient>,
        ) {
            self.0.lock().unwrap().push((params.progress, params.total));
        }
    }

    let rt = runtime();
    let (_dir, s) = frozen_window(&rt, "P", "p");

    for transport in [Transport::Http, Transport::Stdio] {
        s.cwm.tiers.evict_l1(true);
        let progress = Progress::default();
        let session = McpSession::open_with(&rt, &s, transport, progress.clone());
        let client = &session.client;
        let args = json!({"window_name": "p"}).as_object().cloned().unwrap();
        let mut options = PeerRequestOptions::no_options();
        options.meta = Some(rmcp::model::RequestMetaObject::with_progress_token(
            rmcp::model::ProgressToken(rmcp::model::NumberOrString::Number(1)),
        ));
        let reply = rt.block_on(async {
            let handle = client
                .send_cancellable_request(
                    ClientRequest::CallToolRequest(Request::new(
                        CallToolRequestParams::new("window_thaw").with_arguments(args),
                    )),
                    options,
                )
                .await
                .unwrap();
            handle.await_response().await.unwrap()
        });
        let text = format!("{reply:?}");
        assert!(text.contains("tokens_ready"), "{text}");
        // Notifications may trail the reply by a moment.
        std::thread::sleep(Duration::from_millis(200));
        let seen = progress.0.lock().unwrap().clone();
        assert!(
            !seen.is_empty(),
            "no progress notification over {transport:?}"
        );
        // rmcp hands notifications to the handler concurrently, so the order seen here is not
        // the order sent: check the values.
        let mut done: Vec<f64> = seen.iter().map(|&(d, _)| d).collect();
        done.sort_by(f64::total_cmp);
        done.dedup();
        assert_eq!(done.len(), seen.len(), "a value sent twice: {seen:?}");
        assert!(
            seen.iter().all(|&(d, t)| t == Some(4.0) && d <= 4.0) && done.last() == Some(&4.0),
            "{transport:?}: {seen:?}"
        );
        session.close(&rt);
    }
}

/// What an MCP client reads from `cwm mcp` on the wire: every progress notification of a call
/// comes before the call's reply (clients drop progress that trails it), and counts only go up.
/// A relay racing the reply, or reordering, failed this on a loaded machine (one run in four).
#[test]
fn stdio_forwarder_sends_all_progress_before_the_reply() {
    use std::io::BufRead;
    let rt = runtime();
    let (_dir, s) = frozen_window(&rt, "Q", "q");

    /// Killed and reaped however the test ends.
    struct Forwarder(std::process::Child);
    impl Drop for Forwarder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut forwarder = Forwarder(
        std::process::Command::new(env!("CARGO_BIN_EXE_cwm"))
            .args(["mcp", "--url", &format!("http://{}/mcp", s.http_addr)])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cwm mcp starts"),
    );
    let mut stdin = forwarder.0.stdin.take().unwrap();
    let mut lines = std::io::BufReader::new(forwarder.0.stdout.take().unwrap()).lines();
    let mut send = |v: Value| writeln!(stdin, "{v}").unwrap();
    let mut next = || -> Value {
        let line = lines.next().expect("cwm mcp answers").unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    send(
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "wire-test", "version": "0"}}}),
    );
    assert_eq!(next()["id"], 0);
    send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    for id in 1..=100 {
        s.cwm.tiers.evict_l1(true);
        send(
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
            "name": "window_thaw", "arguments": {"window_name": "q"},
            "_meta": {"progressToken": format!("t{id}")}}}),
        );
        let mut seen = vec![];
        let reply = loop {
            let msg = next();
            if msg["id"] == id {
                break msg;
            }
            assert_eq!(msg["method"], "notifications/progress", "{msg}");
            assert_eq!(msg["params"]["progressToken"], format!("t{id}"), "{msg}");
            seen.push(msg["params"]["progress"].as_f64().unwrap());
        };
        assert!(
            reply["result"]["structuredContent"]["tokens_ready"] == 1024,
            "{reply}"
        );
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "thaw {id}: not increasing: {seen:?}"
        );
        assert_eq!(
            seen.last(),
            Some(&4.0),
            "thaw {id}: progress before the reply: {seen:?}"
        );
    }
}

#[test]
fn stdio_forwarder_reaches_the_sidecar() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let src = kv();
    src.fill(8);
    let s = sidecar(disk_config(dir.path()));
    let mut c = client(&s);
    register_kv(&mut c, MODEL, 1, &src);
    let t = tokens(9, 1100);
    store_conversation(&mut c, "io", &t);
    let session = McpSession::open(&rt, &s, Transport::Stdio);
    let client = &session.client;
    let tools = rt.block_on(client.list_all_tools()).unwrap();
    let mut names: Vec<String> = tools.iter().map(|t| t.name.to_string()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "cache_stats",
            "health",
            "quota_delete",
            "quota_get",
            "quota_list",
            "quota_set",
            "session_autosave",
            "session_list",
            "window_clone",
            "window_delete",
            "window_freeze",
            "window_list",
            "window_status",
            "window_thaw"
        ]
    );
    let freeze = tools.iter().find(|t| t.name == "window_freeze").unwrap();
    let schema = serde_json::to_string(&freeze.input_schema).unwrap();
    assert!(
        schema.contains("session_id") && schema.contains("window_name"),
        "{schema}"
    );
    assert!(
        freeze.output_schema.is_some(),
        "structured results have a schema"
    );

    call(
        &rt,
        client,
        "window_freeze",
        json!({"session_id": "io", "window_name": "io-w"}),
    )
    .unwrap();
    let e = call(
        &rt,
        client,
        "window_thaw",
        json!({"window_name": "missing"}),
    )
    .unwrap_err();
    assert!(e.contains("no window named"), "{e}");
    s.cwm.tiers.evict_l1(true);
    let r = call(
        &rt,
        client,
        "window_thaw",
        json!({"window_name": "io-w", "new_session_id": "io2"}),
    )
    .unwrap();
    assert_eq!(r["tokens_ready"], 1024, "{r}");
    assert_eq!(lookup(&mut c, "io2", &t, 1024, "q"), 4);
    session.close(&rt);
}

/// `cwm windows export` on one data directory, `cwm windows import` on a fresh one, thaw there:
/// byte-exact. A damaged file is refused and changes nothing.
#[test]
fn export_import_moves_a_window_between_data_dirs() {
    let rt = runtime();
    let (dir, fresh, file_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (src, dst) = (kv(), kv());
    src.fill(77);
    let t = tokens(21, 1100);
    {
        let s = sidecar(disk_config(dir.path()));
        let mut c = client(&s);
        register_kv(&mut c, MODEL, 1, &src);
        store_conversation(&mut c, "E", &t);
        let m = mcp(&rt, &s);
        call(
            &rt,
            &m,
            "window_freeze",
            json!({"session_id": "E", "window_name": "travel", "tags": ["x"]}),
        )
        .unwrap();
        s.stop();
    }
    let file = file_dir.path().join("travel.cwmx");
    let cwm_cmd = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cwm"))
            .args(args)
            .env("CWM_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (ok, out) = cwm_cmd(&[
        "windows",
        "export",
        "travel",
        &path(&file),
        "--l2-path",
        &path(dir.path()),
    ]);
    assert!(ok, "{out}");
    // A damaged copy is refused, and the fresh directory gains nothing.
    let damaged = file_dir.path().join("damaged.cwmx");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&damaged, &bytes).unwrap();
    let (ok, out) = cwm_cmd(&[
        "windows",
        "import",
        &path(&damaged),
        "--l2-path",
        &path(fresh.path()),
    ]);
    assert!(!ok && out.contains("checksum"), "{out}");
    // Refused imports into a directory that does not exist yet leave no directory behind.
    let never = fresh.path().join("never-created");
    for (file, name) in [(&damaged, "fine"), (&file, ".."), (&file, "-")] {
        let (ok, out) = cwm_cmd(&[
            "windows",
            "import",
            &path(file),
            "--name",
            name,
            "--l2-path",
            &path(&never),
        ]);
        assert!(!ok, "{name}: {out}");
        assert!(
            !never.exists(),
            "a refused import ({name}) created {never:?}"
        );
    }
    let (ok, out) = cwm_cmd(&[
        "windows",
        "import",
        &path(&file),
        "--name",
        "travel.imported",
        "--l2-path",
        &path(fresh.path()),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = cwm_cmd(&["windows", "list", "--l2-path", &path(fresh.path())]);
    assert!(
        ok && out.contains("\"total\": 1") && out.contains("travel.imported"),
        "{out}"
    );

    let s = sidecar(disk_config(fresh.path()));
    let m = mcp(&rt, &s);
    let mut c = client(&s);
    register_kv(&mut c, MODEL, 2, &dst);
    let r = call(
        &rt,
        &m,
        "window_thaw",
        json!({"window_name": "travel.imported"}),
    )
    .unwrap();
    assert_eq!(r["tokens_ready"], 1024, "{r}");
    assert_eq!(r["session_id"], "E");
    assert_eq!(lookup(&mut c, "E", &t, 1024, "q"), 4);
    assert_retrieves_exact(&mut c, "E", &t, 1024, "q", 2, &src, &dst);
}

/// LMCache's `POST /cache/clear`: an empty body clears L1; another tier is a 400.
#[test]
fn cache_clear_over_http() {
    let s = sidecar(small_config());
    let src = kv();
    let mut c = client(&s);
    register_kv(&mut c, MODEL, 1, &src);
    store_conversation(&mut c, "C", &tokens(3, 1100));
    assert_eq!(s.cwm.tiers.l1_occupancy().objects, 4);
    let r = http_post(&s, "/cache/clear", r#"{"tier": "l2"}"#);
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(
        s.cwm.tiers.l1_occupancy().objects,
        4,
        "a refused clear changes nothing"
    );
    let r = http_post(&s, "/cache/clear", "");
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains(r#""cleared":{"tier":"l1"}"#),
        "{r}"
    );
    assert_eq!(s.cwm.tiers.l1_occupancy().objects, 0);
}

/// A `POST /cache/checksums` answer: status code and JSON body.
fn checksums(s: &Sidecar, body: Value) -> (u16, Value) {
    let r = http_post(s, "/cache/checksums", &body.to_string());
    let code = r[9..12].parse().unwrap();
    let (_, json) = r.split_once("\r\n\r\n").expect("an HTTP response");
    (code, serde_json::from_str(json).unwrap_or(Value::Null))
}

/// The MD5s LMCache's server computes for `ids` of `kv`, built here from `TestKv`'s own
/// addressing: per chunk, every layer's blocks in the tensor's logical order (`[2, NB, BS, NH,
/// HS]`: K plane then V plane; `[NB, NH, BS, C]`: head-major), bf16 widened to f32. With
/// `layer`, that layer's digests alone.
fn lmcache_digests(kv: &TestKv, ids: &[u32], chunk: usize, layer: Option<u64>) -> Vec<String> {
    use md5::{Digest, Md5};
    let order: Vec<(u64, u64)> = match kv.layout {
        Layout::Hnd => (0..kv.heads)
            .flat_map(|h| (0..kv.bs).map(move |t| (t, h)))
            .collect(),
        _ => (0..kv.bs)
            .flat_map(|t| (0..kv.heads).map(move |h| (t, h)))
            .collect(),
    };
    ids.chunks(chunk)
        .map(|c| {
            let mut raw = Vec::new();
            for l in (0..kv.layers).filter(|&l| layer.is_none_or(|x| x == l)) {
                for p in 0..kv.planes() {
                    for &b in c {
                        for &(t, h) in &order {
                            raw.extend(kv.head(p, l, u64::from(b), t, h));
                        }
                    }
                }
            }
            let widened: Vec<u8> = raw
                .chunks_exact(2)
                .flat_map(|x| (u32::from(u16::from_le_bytes([x[0], x[1]])) << 16).to_le_bytes())
                .collect();
            hex::encode(Md5::digest(&widened))
        })
        .collect()
}

/// LMCache's `POST /cache/checksums` (what `lmcache bench server` calls to verify a retrieve):
/// digests of the engine's blocks as LMCache's server computes them, equal for the source
/// blocks of a store and the destination blocks of its retrieve; LMCache's error answers.
#[test]
fn cache_checksums_over_http() {
    let s = sidecar(small_config());
    let mut c = client(&s);
    // lmcache bench's layout: [2, NB, BS, NH, HS] bf16, block axis 1.
    let src = TestKv::new(Layout::TwoMajor, 4, 80, 16, 2, 32);
    let dst = TestKv::new(Layout::TwoMajor, 4, 80, 16, 2, 32);
    src.fill(5);
    dst.fill_byte(0);
    register_kv(&mut c, MODEL, 1, &src);
    register_kv(&mut c, MODEL, 2, &dst);
    let t = tokens(9, 1100);
    store_conversation(&mut c, "K", &t);
    let src_ids: Vec<u32> = (1..65).collect();
    let dst_ids: Vec<u32> = (10..74).collect();
    let (code, before) = checksums(
        &s,
        json!({"block_ids": dst_ids, "chunk_size": 16, "instance_id": 2}),
    );
    assert_eq!(code, 200, "{before}");
    assert!(
        c.retrieve(
            &key(MODEL, "K", &t, Some(0), 1, 0, 1024, "r"),
            2,
            &blocks(10, 64),
            0
        )
        .unwrap()
        .ok
    );

    let want = lmcache_digests(&src, &src_ids, 16, None);
    let (code, r) = checksums(
        &s,
        json!({"block_ids": src_ids, "chunk_size": 16, "instance_id": 1, "layerwise": false}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], "success");
    assert_eq!(r["chunk_size"], 16);
    assert_eq!(r["num_chunks"], 4);
    assert_eq!(r["layerwise"], false);
    assert_eq!(r["block_id_ranges"], json!([[1, 64]]));
    assert_eq!(r["chunk_checksums"], json!(want), "source digests");
    let (code, r) = checksums(
        &s,
        json!({"block_ids": dst_ids, "chunk_size": 16, "instance_id": 2}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        r["chunk_checksums"],
        json!(want),
        "the retrieve wrote back what was stored"
    );
    assert_ne!(before["chunk_checksums"], r["chunk_checksums"]);
    assert_eq!(r["block_id_ranges"], json!([[10, 73]]));

    // Per layer, a short last chunk, ids in any order.
    let ids = [5u32, 3, 4, 9, 1];
    let (code, r) = checksums(
        &s,
        json!({"block_ids": ids, "chunk_size": 2, "instance_id": 1, "layerwise": true}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["num_chunks"], 3);
    assert_eq!(r["block_id_ranges"], json!([5, 3, 4, 9, 1]));
    for l in 0..4u64 {
        assert_eq!(
            r["chunk_checksums"][format!("layer_{l}")],
            json!(lmcache_digests(&src, &ids, 2, Some(l))),
            "layer {l}"
        );
    }

    // Rank-4 layouts (block axis 0), token-major and head-major.
    for (id, layout) in [(3, Layout::Nhd), (4, Layout::Hnd)] {
        let kv = TestKv::new(layout, 2, 8, 16, 2, 32);
        kv.fill(id);
        register_kv(&mut c, MODEL, id, &kv);
        let ids = [7u32, 0, 2];
        let (code, r) = checksums(
            &s,
            json!({"block_ids": ids, "chunk_size": 2, "instance_id": id}),
        );
        assert_eq!(code, 200, "{r}");
        assert_eq!(
            r["chunk_checksums"],
            json!(lmcache_digests(&kv, &ids, 2, None)),
            "{layout:?}"
        );
    }

    // Errors, as LMCache answers them (plus 400 for a block out of range, 501 for memory cwm
    // cannot read).
    register_cuda(&mut c, 5, MODEL);
    for (body, code, detail) in [
        (
            json!({"block_ids": [1], "chunk_size": 1, "instance_id": 99}),
            404,
            "instance_id 99 not registered",
        ),
        (
            json!({"block_ids": [], "chunk_size": 1, "instance_id": 1}),
            400,
            "block_ids is required",
        ),
        (
            json!({"block_ids": [1], "instance_id": 1}),
            400,
            "chunk_size must be positive",
        ),
        (
            json!({"block_ids": [1, 80], "chunk_size": 1, "instance_id": 1}),
            400,
            "block id 80 out of range",
        ),
        (
            json!({"block_ids": [1], "chunk_size": 1, "instance_id": 5}),
            501,
            "CUDA",
        ),
        (json!({"block_ids": "x"}), 422, "invalid body"),
    ] {
        let (got, r) = checksums(&s, body.clone());
        assert_eq!(got, code, "{body} -> {r}");
        assert!(
            r["detail"].as_str().unwrap_or("").contains(detail),
            "{body} -> {r}"
        );
    }
    assert_eq!(c.get_chunk_size().unwrap(), 256, "still serving");
}
