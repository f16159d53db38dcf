//! Encryption at rest (`--encryption-key-file`) end to end: what lands in L2 segment files, in
//! Redis and in a `.cwmx` export holds no plaintext of a chunk (and, without a key, the same
//! search finds it: the searches can fail); stored chunks come back byte-exact after a restart
//! and from a second server with the same key; another key, no key, or a value moved under
//! another salt is a counted miss, never bytes; records written before the key stay
//! readable; a key file others may read, or a malformed one, stops the start.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::redis::*;
use common::*;
use cwm::client::MpClient;
use cwm::config::Config;
use cwm::serve::Sidecar;
use cwm::store::l3::keys::KeyLayout;
use cwm::store::record::{self, FLAG_SEALED};

const MODEL: &str = "crypt-model";
/// Tokens per test conversation: 4 chunks.
const TOKENS: usize = 1024;

/// A key file of 64 hex digits derived from `seed`, mode 0600.
fn key_file(dir: &Path, seed: u8) -> PathBuf {
    let path = dir.join(format!("key-{seed}"));
    let hex: String = (0..32u8)
        .map(|i| format!("{:02x}", i.wrapping_mul(37) ^ seed))
        .collect();
    std::fs::write(&path, format!("{hex}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// L1 and an uncompressed L2 in `dir` (uncompressed, so a record that is not sealed holds the
/// chunk's bytes as they are), sealed with `key` when given.
fn config(dir: &Path, key: Option<&Path>) -> Config {
    Config {
        l2_compression: "none".into(),
        encryption_key_file: key.map(Path::to_path_buf),
        ..disk_config(dir)
    }
}

/// An engine's KV cache of pseudo-random bytes (blake3's output stream): any 128 bytes of it
/// occur once, so finding them in a file means that chunk is there in the clear.
/// (`TestKv::fill`'s positional pattern repeats across blocks.)
fn kv() -> TestKv {
    let kv = TestKv::new(Layout::Nhd, 2, 200, 16, 2, 32);
    let mut bytes = vec![0; kv.bytes() as usize];
    blake3::Hasher::new()
        .update(b"cwm encryption test KV")
        .finalize_xof()
        .fill(&mut bytes);
    // SAFETY: the segment is `bytes()` long and lives as long as `kv`; no one else maps it yet.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), kv.seg.as_mut_ptr(), bytes.len()) };
    kv
}

/// Bytes that open the first chunk's object (plane 0, layer 0, its first token: both heads)
/// of a store from block `first`: what a plaintext record of it holds verbatim.
fn needle(kv: &TestKv, first: u64) -> Vec<u8> {
    [kv.head(0, 0, first, 0, 0), kv.head(0, 0, first, 0, 1)].concat()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every L2 segment file of `dir`, concatenated.
fn segments(dir: &Path) -> Vec<u8> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwm"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no segment in {}", dir.display());
    names
        .iter()
        .flat_map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// Copy the files of an L2 directory (segments, checkpoint) into a fresh one.
fn copy_l2(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    to
}

fn store(c: &mut MpClient, salt: &str, t: &[u32], first: u32) {
    let k = key(MODEL, salt, t, Some(0), 1, 0, t.len() as u64, "store");
    assert!(
        c.store(&k, 1, &blocks(first, t.len() as u32 / 16))
            .unwrap()
            .ok
    );
}

fn lookup(c: &mut MpClient, salt: &str, t: &[u32], rid: &str) -> u64 {
    lookup_hits(c, &key(MODEL, salt, t, None, 1, 0, t.len() as u64, rid))
}

/// Retrieve all of `t` under `salt` into `dst` from block 100; whether it succeeded, and
/// whether `dst` then equals `src` from block `first`.
fn retrieve(
    c: &mut MpClient,
    salt: &str,
    t: &[u32],
    src: &TestKv,
    first: u64,
    dst: &TestKv,
) -> (bool, bool) {
    dst.fill_byte(0);
    let n = t.len() as u32 / 16;
    let k = key(MODEL, salt, t, Some(0), 1, 0, t.len() as u64, "retrieve");
    let ok = c.retrieve(&k, 2, &blocks(100, n), 0).unwrap().ok;
    let same = (0..u64::from(n)).all(|j| src.block(first + j) == dst.block(100 + j));
    (ok, same)
}

/// Store one conversation under `salt` in a fresh sidecar on `dir` and stop it once L2 holds it.
fn store_and_stop(dir: &Path, key: Option<&Path>, src: &TestKv, salt: &str, t: &[u32]) {
    let s = sidecar(config(dir, key));
    let mut c = client(&s);
    register_kv(&mut c, MODEL, 1, src);
    store(&mut c, salt, t, 1);
    wait_written(&s, 4);
    s.stop();
}

#[test]
fn l2_segments_hold_no_plaintext_and_a_restart_with_the_key_reads_them_back() {
    let keys = tempfile::tempdir().unwrap();
    let k = key_file(keys.path(), 1);
    let (src, dst) = (kv(), kv());
    let t = tokens(11, TOKENS);
    for sealed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let key = sealed.then_some(k.as_path());
        store_and_stop(dir.path(), key, &src, "tenant-a", &t);
        assert_eq!(
            contains(&segments(dir.path()), &needle(&src, 1)),
            !sealed,
            "plaintext of the chunk in the segments (sealed: {sealed})"
        );
        let s = sidecar(config(dir.path(), key));
        let mut c = client(&s);
        register_kv(&mut c, MODEL, 2, &dst);
        assert_eq!(lookup(&mut c, "tenant-a", &t, "l"), 4, "found in L2");
        assert_eq!(
            retrieve(&mut c, "tenant-a", &t, &src, 1, &dst),
            (true, true),
            "byte-exact after the restart (sealed: {sealed})"
        );
        let e = s.windows.cache_stats().encryption;
        assert_eq!(e.enabled, sealed);
        assert_eq!(e.opened_records, if sealed { 4 } else { 0 });
        assert_eq!((e.unopened_no_key, e.unopened_wrong_key), (0, 0));
        s.stop();
    }
}

#[test]
fn another_key_or_no_key_makes_old_records_counted_misses_never_bytes() {
    let keys = tempfile::tempdir().unwrap();
    let (a, b) = (key_file(keys.path(), 1), key_file(keys.path(), 2));
    let (src, dst) = (kv(), kv());
    let t = tokens(12, TOKENS);
    let dir = tempfile::tempdir().unwrap();
    store_and_stop(dir.path(), Some(&a), &src, "tenant-a", &t);
    for (key, what) in [(Some(b.as_path()), "another key"), (None, "no key")] {
        let copy = copy_l2(dir.path());
        let s = sidecar(config(copy.path(), key));
        assert_eq!(
            s.windows.cache_stats().tier("L2").unwrap().records,
            4,
            "{what}"
        );
        let mut c = client(&s);
        register_kv(&mut c, MODEL, 2, &dst);
        assert_eq!(lookup(&mut c, "tenant-a", &t, "l"), 0, "{what}: a miss");
        let (ok, _) = retrieve(&mut c, "tenant-a", &t, &src, 1, &dst);
        assert!(!ok, "{what}: the retrieve fails");
        assert!(
            (0..64).all(|j| dst.block(100 + j).iter().all(|&x| x == 0)),
            "{what}: no bytes reach the engine"
        );
        let stats = s.windows.cache_stats();
        let e = &stats.encryption;
        let unopened = if key.is_some() {
            e.unopened_wrong_key
        } else {
            e.unopened_no_key
        };
        assert!(unopened >= 1, "{what}: counted ({e:?})");
        assert_eq!(e.opened_records, 0, "{what}");
        assert!(
            stats.tier("L2").unwrap().corrupt_records >= 1,
            "{what}: dropped from L2's index like any unreadable record"
        );
        let metrics = cwm::metrics::render(&s.cwm, &s.windows.health());
        let reason = if key.is_some() { "wrong_key" } else { "no_key" };
        assert!(
            metrics.contains(&format!(
                "cwm_unopened_records_total{{reason=\"{reason}\"}} {unopened}"
            )),
            "{what}: in /metrics"
        );
        s.stop();
    }
    // The records were intact: the right key still reads them.
    let s = sidecar(config(dir.path(), Some(&a)));
    let mut c = client(&s);
    register_kv(&mut c, MODEL, 2, &dst);
    assert_eq!(lookup(&mut c, "tenant-a", &t, "l"), 4);
    assert_eq!(
        retrieve(&mut c, "tenant-a", &t, &src, 1, &dst),
        (true, true)
    );
    s.stop();
}

#[test]
fn records_written_before_the_key_stay_readable_and_new_ones_are_sealed() {
    let keys = tempfile::tempdir().unwrap();
    let k = key_file(keys.path(), 3);
    let (src, dst) = (kv(), kv());
    let (old, new) = (tokens(13, TOKENS), tokens(14, TOKENS));
    let dir = tempfile::tempdir().unwrap();
    store_and_stop(dir.path(), None, &src, "tenant-a", &old);
    let s = sidecar(config(dir.path(), Some(&k)));
    let mut c = client(&s);
    register_kv(&mut c, MODEL, 1, &src);
    // Stored from blocks 65..: its chunks differ from the old conversation's.
    store(&mut c, "tenant-a", &new, 65);
    wait_written(&s, 4);
    s.cwm.tiers.evict_l1(true);
    register_kv(&mut c, MODEL, 2, &dst);
    assert_eq!(lookup(&mut c, "tenant-a", &old, "old"), 4);
    assert_eq!(
        retrieve(&mut c, "tenant-a", &old, &src, 1, &dst),
        (true, true),
        "version 1 records read with a key configured"
    );
    assert_eq!(s.windows.cache_stats().encryption.sealed_records, 4);
    s.stop();
    let bytes = segments(dir.path());
    assert!(
        contains(&bytes, &needle(&src, 1)),
        "the old records are as they were"
    );
    assert!(
        !contains(&bytes, &needle(&src, 65)),
        "the new ones are sealed"
    );
}

#[test]
fn redis_values_hold_no_plaintext_and_only_a_server_with_the_key_reads_them() {
    let redis = RedisServer::start();
    let keys = tempfile::tempdir().unwrap();
    let (k, other) = (key_file(keys.path(), 4), key_file(keys.path(), 5));
    let (src, dst) = (kv(), kv());
    let t = tokens(15, TOKENS);
    let l3 = |dir: Option<&Path>, key: &Path| Config {
        l3_url: Some(redis.url()),
        l3_timeout_ms: 2000,
        l2_compression: "none".into(),
        encryption_key_file: Some(key.to_path_buf()),
        ..match dir {
            Some(d) => disk_config(d),
            None => small_config(),
        }
    };
    // Writer: L2 and L3, uncompressed.
    let dir = tempfile::tempdir().unwrap();
    let writer = sidecar(l3(Some(dir.path()), &k));
    let mut c = client(&writer);
    register_kv(&mut c, MODEL, 1, &src);
    store(&mut c, "alice", &t, 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    let chunk_keys = || redis.chunk_keys(None);
    while chunk_keys().len() < 4 {
        assert!(
            Instant::now() < deadline,
            "write-behind never reached Redis"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut values = Vec::new();
    for name in chunk_keys() {
        // The value as a plain client reads it: one record, sealed, no chunk bytes in it.
        let value = redis.cli_raw(&["GET", &name]);
        let h = record::decode_header(&value, 0).expect("a record");
        assert!(h.sealed, "{name}: sealed");
        assert!(value.len() as u64 > h.raw_len, "{name}: the whole value");
        assert!(!contains(&value, &needle(&src, 1)), "{name}: plaintext");
        values.push(value);
    }
    writer.stop();
    // A second server with the key, memory only: every chunk from Redis, byte-exact.
    let reader = sidecar(l3(None, &k));
    let mut c = client(&reader);
    register_kv(&mut c, MODEL, 2, &dst);
    assert_eq!(lookup(&mut c, "alice", &t, "r"), 4);
    assert_eq!(retrieve(&mut c, "alice", &t, &src, 1, &dst), (true, true));
    // The values moved under another salt (key sections rewritten, checksums recomputed,
    // stored under that salt's Redis keys) do not open there.
    for value in &values {
        let h = record::decode_header(value, 0).unwrap();
        let payload = &value[h.header_len as usize..];
        let mut moved_key = h.key.clone();
        moved_key.cache_salt = "bob".into();
        let mut moved = record::encode_header_flagged(
            &moved_key,
            h.codec,
            h.itemsize,
            h.raw_len,
            payload,
            FLAG_SEALED,
        );
        moved.extend_from_slice(payload);
        let redis_key = String::from_utf8(KeyLayout::new("cwm").chunk(&moved_key)).unwrap();
        set_raw(&redis, &redis_key, &moved);
    }
    let hits = lookup(&mut c, "bob", &t, "bob");
    assert_eq!(hits, 0, "a value moved to another salt is a miss");
    let e = reader.windows.cache_stats().encryption;
    assert!(
        e.unopened_wrong_key >= 1,
        "the moved value was read and refused ({e:?})"
    );
    reader.stop();
    // A server with another key: misses, counted.
    let stranger = sidecar(l3(None, &other));
    let mut c = client(&stranger);
    register_kv(&mut c, MODEL, 3, &dst);
    assert_eq!(lookup(&mut c, "alice", &t, "s"), 0);
    let stats = stranger.windows.cache_stats();
    assert!(stats.encryption.unopened_wrong_key >= 1);
    assert!(stats.tier("L3").unwrap().corrupt_records >= 1);
    stranger.stop();
}

/// `SET name value` with a binary value (redis-cli reads the last argument from stdin).
fn set_raw(redis: &RedisServer, name: &str, value: &[u8]) {
    use std::io::Write;
    let mut child = Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &redis.port.to_string(),
            "-x",
            "SET",
            name,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{INSTALL} ({e})"));
    child.stdin.take().unwrap().write_all(value).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
}

#[test]
fn a_window_export_holds_no_plaintext() {
    use cwm::windows::FreezeRequest;
    let keys = tempfile::tempdir().unwrap();
    let k = key_file(keys.path(), 6);
    let src = kv();
    let t = tokens(16, TOKENS);
    for sealed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let s = sidecar(config(dir.path(), sealed.then_some(k.as_path())));
        let mut c = client(&s);
        register_kv(&mut c, MODEL, 1, &src);
        store(&mut c, "tenant-w", &t, 1);
        s.windows
            .freeze(&FreezeRequest {
                session_id: "tenant-w".into(),
                window_name: "w".into(),
                ..Default::default()
            })
            .expect("freezes");
        let file = dir.path().join("w.cwmx");
        s.windows.export("w", &file).expect("exports");
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(
            contains(&bytes, &needle(&src, 1)),
            !sealed,
            "plaintext of the chunk in the export (sealed: {sealed})"
        );
        s.stop();
    }
}

/// `cwm serve` with `args` and `env`: it must exit (not serve) with a message containing
/// `expect` on stderr.
fn refused_at_start(args: &[&str], env: &[(&str, &str)], expect: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--http-port",
            "0",
            "--l1-size-gb",
            "0.25",
            "--l2-size-gb",
            "0",
            "--no-engine-driven",
        ])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cwm starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cwm serve started despite {args:?} {env:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{args:?}: exit status {status}");
    assert!(stderr.contains(expect), "{args:?}: stderr {stderr:?}");
}

#[test]
fn a_key_file_others_may_read_or_a_malformed_one_stops_the_start() {
    let keys = tempfile::tempdir().unwrap();
    let k = key_file(keys.path(), 7);
    let shown = k.to_str().unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o640)).unwrap();
    refused_at_start(&["--encryption-key-file", shown], &[], "chmod 600");
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o604)).unwrap();
    refused_at_start(&[], &[("CWM_ENCRYPTION_KEY_FILE", shown)], "mode 0604");
    let short = keys.path().join("short");
    std::fs::write(&short, "abcdef\n").unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    refused_at_start(
        &["--encryption-key-file", short.to_str().unwrap()],
        &[],
        "expected 64 hex digits",
    );
    refused_at_start(
        &["--encryption-key-file", "/nonexistent/cwm-key"],
        &[],
        "/nonexistent/cwm-key",
    );
    // The library refuses the same way, and a good key starts.
    let dir = tempfile::tempdir().unwrap();
    let e = Sidecar::start(&Config {
        port: 0,
        http_port: 0,
        ..config(dir.path(), Some(&k))
    })
    .err()
    .expect("refused");
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o400)).unwrap();
    sidecar(config(dir.path(), Some(&k))).stop();
}

// ----- window manifests and the session journal (issue 24, "nothing a tenant stored") ----

/// Eight consecutive token ids of `t`, as each format cwm writes them would hold them: u32
/// little-endian (the session journal) and a JSON array's elements (manifests: local files,
/// Redis, exports), searched with whitespace removed.
struct TokenNeedles {
    binary: Vec<u8>,
    json: Vec<u8>,
}

impl TokenNeedles {
    fn of(t: &[u32]) -> TokenNeedles {
        let run = &t[300..308];
        TokenNeedles {
            binary: run.iter().flat_map(|x| x.to_le_bytes()).collect(),
            json: run
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
                .into_bytes(),
        }
    }

    /// Whether `bytes` hold the run in either encoding.
    fn found_in(&self, bytes: &[u8]) -> bool {
        let squeezed: Vec<u8> = bytes
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        contains(bytes, &self.binary) || contains(&squeezed, &self.json)
    }

    /// Every file under `dir` (recursively) that holds the run.
    fn files_under(&self, dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                found.extend(self.files_under(&p));
            } else if self.found_in(&std::fs::read(&p).unwrap()) {
                found.push(p);
            }
        }
        found
    }

    /// Every Redis key whose value (a string, or a hash's fields and values) holds the run.
    fn redis_keys(&self, redis: &RedisServer) -> Vec<String> {
        let names = redis.cli(&["--scan", "--pattern", "*"]);
        assert!(!names.trim().is_empty(), "Redis holds nothing");
        names
            .lines()
            .filter(|name| {
                let value = match redis.cli(&["TYPE", name]).trim() {
                    "hash" => redis.cli_raw(&["HGETALL", name]),
                    _ => redis.cli_raw(&["GET", name]),
                };
                self.found_in(&value)
            })
            .map(String::from)
            .collect()
    }
}

/// L2 in `dir` and L3 on `redis`, sealed with `key` when given.
fn fleet_config(dir: &Path, redis: &RedisServer, key: Option<&Path>) -> Config {
    Config {
        l3_url: Some(redis.url()),
        l3_timeout_ms: 2000,
        ..config(dir, key)
    }
}

/// Store `t` under `salt` from block 1, freeze it as window `name` (published to L3 when the
/// config has it), export it into `dir`, and stop cleanly.
fn freeze_export_and_stop(cfg: Config, src: &TestKv, salt: &str, t: &[u32], name: &str) {
    use cwm::windows::FreezeRequest;
    let dir = cfg.l2_path.clone();
    let s = sidecar(cfg);
    let mut c = client(&s);
    register_kv(&mut c, MODEL, 1, src);
    store(&mut c, salt, t, 1);
    wait_written(&s, 4);
    s.windows
        .freeze(&FreezeRequest {
            session_id: salt.into(),
            window_name: name.into(),
            description: Some("notes about the tenant's secret project".into()),
            ..Default::default()
        })
        .expect("freezes");
    s.windows
        .export(name, &dir.join(format!("{name}.cwmx")))
        .expect("exports");
    s.stop();
}

fn thaw(s: &Sidecar, name: &str, session: &str) -> Result<cwm::windows::ThawReport, String> {
    s.windows
        .thaw(
            &cwm::windows::ThawRequest {
                window_name: name.into(),
                new_session_id: Some(session.into()),
            },
            &|_, _| {},
        )
        .map_err(|e| e.to_string())
}

/// A fresh server on `cfg` thaws window `name` under a new session and serves it byte-exact.
fn thaws_byte_exact(cfg: Config, name: &str, src: &TestKv, t: &[u32]) {
    let s = sidecar(cfg);
    let dst = kv();
    let mut c = client(&s);
    register_kv(&mut c, MODEL, 2, &dst);
    thaw(&s, name, "thawed").expect("thaws");
    assert_eq!(lookup(&mut c, "thawed", t, "t"), 4);
    assert_eq!(retrieve(&mut c, "thawed", t, src, 1, &dst), (true, true));
    s.stop();
}

#[test]
fn with_a_key_no_file_or_redis_value_holds_the_token_ids_and_another_key_reads_none() {
    let redis = RedisServer::start();
    let keys = tempfile::tempdir().unwrap();
    let (k, other) = (key_file(keys.path(), 7), key_file(keys.path(), 8));
    let src = kv();
    let t = tokens(17, TOKENS);
    let needles = TokenNeedles::of(&t);

    // Without a key the token ids are on disk and in Redis: the searches can fail.
    let plain = tempfile::tempdir().unwrap();
    freeze_export_and_stop(
        fleet_config(plain.path(), &redis, None),
        &src,
        "tenant-m",
        &t,
        "w-plain",
    );
    let found = needles.files_under(plain.path());
    for f in ["windows/w-plain.json", "sessions.journal", "w-plain.cwmx"] {
        assert!(
            found.contains(&plain.path().join(f)),
            "{f} holds the tokens without a key: {found:?}"
        );
    }
    assert!(!needles.redis_keys(&redis).is_empty());
    redis.cli(&["FLUSHALL"]);

    // With a key: no file under the state directory, no Redis value.
    let dir = tempfile::tempdir().unwrap();
    let sealed = |key: &Path| fleet_config(dir.path(), &redis, Some(key));
    freeze_export_and_stop(sealed(&k), &src, "tenant-m", &t, "w");
    assert_eq!(needles.files_under(dir.path()), Vec::<PathBuf>::new());
    assert_eq!(needles.redis_keys(&redis), Vec::<String>::new());
    let manifest = std::fs::read_to_string(dir.path().join("windows/w.json")).unwrap();
    assert!(manifest.contains("\"version\": 2"), "{manifest}");
    assert!(
        !manifest.contains("secret project"),
        "the description is sealed"
    );
    thaws_byte_exact(sealed(&k), "w", &src, &t);

    // Another key: the window is listed as unreadable with the reason, never thawed; the
    // journal's entries are skipped and counted; the fleet's copy is skipped too.
    let s = sidecar(sealed(&other));
    let list = s
        .windows
        .list(&cwm::windows::ListRequest::default())
        .unwrap();
    assert_eq!(list.total, 1);
    let w = &list.windows[0];
    assert_eq!((w.name.as_str(), w.chunks), ("w", 4));
    let reason = w.unreadable.as_deref().expect("listed as unreadable");
    assert!(
        reason.contains("does not open with this server's key"),
        "{reason}"
    );
    assert!(w.description.is_empty() && w.tags.is_empty());
    let e = thaw(&s, "w", "x").unwrap_err();
    assert!(e.contains("unreadable"), "{e}");
    let e = s.windows.cache_stats().encryption;
    assert!(
        e.unopened_manifests >= 2,
        "local and fleet manifests ({e:?})"
    );
    assert!(e.unopened_journal_entries >= 1, "{e:?}");
    assert!(
        s.windows.session_list().sessions.is_empty(),
        "no chain restored from entries that did not open"
    );
    s.stop();

    // The right key again: the window was left as it was.
    thaws_byte_exact(sealed(&k), "w", &src, &t);
    // And so was the session the other key's start could not open: its journal was set aside
    // whole, not compacted away, so an agent that never froze still finds its context.
    let s = sidecar(sealed(&k));
    let sessions = s.windows.session_list().sessions;
    assert!(
        sessions.iter().any(|x| x.session_id == "tenant-m"),
        "{sessions:?}"
    );
    s.stop();
}

#[test]
fn an_unsealed_manifest_and_journal_are_read_by_a_server_with_a_key() {
    use cwm::windows::FreezeRequest;
    let keys = tempfile::tempdir().unwrap();
    let k = key_file(keys.path(), 9);
    let src = kv();
    let t = tokens(18, TOKENS);
    let needles = TokenNeedles::of(&t);
    let dir = tempfile::tempdir().unwrap();
    freeze_export_and_stop(config(dir.path(), None), &src, "tenant-o", &t, "old");
    assert!(needles.found_in(&std::fs::read(dir.path().join("sessions.journal")).unwrap()));

    let s = sidecar(config(dir.path(), Some(&k)));
    let list = s.windows.list(&Default::default()).unwrap();
    assert_eq!(list.windows[0].unreadable, None);
    assert_eq!(list.windows[0].tokens, TOKENS);
    // The journal was read (the session's chain freezes again) and rewritten sealed.
    s.windows
        .freeze(&FreezeRequest {
            session_id: "tenant-o".into(),
            window_name: "again".into(),
            ..Default::default()
        })
        .expect("the restored chain freezes");
    assert!(!needles.found_in(&std::fs::read(dir.path().join("sessions.journal")).unwrap()));
    s.stop();
    thaws_byte_exact(config(dir.path(), Some(&k)), "old", &src, &t);
    thaws_byte_exact(config(dir.path(), Some(&k)), "again", &src, &t);
    // The thaw recorded its time, so the old manifest was rewritten, sealed this time.
    assert_eq!(
        needles.files_under(&dir.path().join("windows")),
        Vec::<PathBuf>::new()
    );
    // The old export, imported by a fresh server with the key.
    let fresh = tempfile::tempdir().unwrap();
    let s = sidecar(config(fresh.path(), Some(&k)));
    let file =
        cwm::windows::export::WindowFile::read(&dir.path().join("old.cwmx"), Some("imported"))
            .unwrap();
    s.windows.import(&file).expect("imports");
    s.stop();
    thaws_byte_exact(config(fresh.path(), Some(&k)), "imported", &src, &t);
    assert_eq!(needles.files_under(fresh.path()), Vec::<PathBuf>::new());
}
