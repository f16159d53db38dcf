//! The `lm://` port (`--lm-port`, LMCache's classic remote-server protocol) end to end over
//! TCP: the traffic LMCache 0.5.6's own client exchanged with LMCache's own server, replayed
//! against cwm and answered with the same bytes; objects across a restart (from L2); keys that
//! differ in any field never alias; hostile and truncated requests drop only their client;
//! many clients at once.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{disk_config, sidecar, small_config};
use connector_protocol::lm::*;
use cwm::config::Config;
use cwm::limits::Limit;
use cwm::serve::Sidecar;

fn lm_sidecar(config: Config) -> Sidecar {
    sidecar(Config {
        lm_port: Some(0),
        ..config
    })
}

/// A blocking `lm://` client, as LMCache's: one request at a time on one connection.
struct Lm(TcpStream);

impl Lm {
    fn connect(s: &Sidecar) -> Lm {
        let addr: SocketAddr = s.lm_addr.expect("lm:// port on");
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Lm(stream)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }

    fn reply(&mut self) -> ServerHeader {
        let mut b = [0u8; SERVER_HEADER_LEN];
        self.0.read_exact(&mut b).expect("a reply header");
        ServerHeader::decode(&b).unwrap()
    }

    fn put(&mut self, key: &str, meta: TensorMeta, payload: &[u8]) {
        let h = ClientHeader {
            length: payload.len() as u32,
            meta,
            ..ClientHeader::placeholder(Command::Put, Key::parse(key).unwrap())
        };
        self.send(&h.encode());
        self.send(payload);
    }

    fn ask(&mut self, command: Command, key: &str) -> ServerHeader {
        let h = ClientHeader::placeholder(command, Key::parse(key).unwrap());
        self.send(&h.encode());
        self.reply()
    }

    fn exists(&mut self, key: &str) -> bool {
        self.ask(Command::Exist, key).code == SUCCESS
    }

    fn get(&mut self, key: &str) -> Option<(TensorMeta, Vec<u8>)> {
        let r = self.ask(Command::Get, key);
        if r.code != SUCCESS {
            assert_eq!(r, ServerHeader::MISS);
            return None;
        }
        let mut payload = vec![0u8; r.length as usize];
        self.0.read_exact(&mut payload).unwrap();
        Some((r.meta, payload))
    }

    /// The server closed this connection (EOF, or a reset).
    fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

const BF16: TensorMeta = TensorMeta {
    fmt: 1,
    dtype: 3,
    shape: [2, 4, 16, 8],
};

fn payload(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

struct Step {
    name: String,
    request: Vec<u8>,
    reply: Vec<u8>,
}

fn captured() -> Vec<Step> {
    let text = include_str!("../connector-protocol/tests/fixtures/lm_remote_frames.json");
    let json: serde_json::Value = serde_json::from_str(text).unwrap();
    json["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Step {
            name: s["name"].as_str().unwrap().into(),
            request: hex::decode(s["request"].as_str().unwrap()).unwrap(),
            reply: hex::decode(s["reply"].as_str().unwrap()).unwrap(),
        })
        .collect()
}

/// The whole captured conversation, request by request: cwm's replies are the reference
/// server's, byte for byte (payloads of GET hits included; PUT and LIST answer nothing).
#[test]
fn cwm_answers_the_captured_client_traffic_with_the_reference_servers_bytes() {
    let s = lm_sidecar(small_config());
    let mut connector = Lm::connect(&s);
    let mut raw = Lm::connect(&s);
    for step in captured() {
        // The connector's steps came over its one connection, HEALTH and LIST over another.
        let c = if step.name.starts_with("health") || step.name.starts_with("list") {
            &mut raw
        } else {
            &mut connector
        };
        c.send(&step.request);
        let mut got = vec![0u8; step.reply.len()];
        c.0.read_exact(&mut got).unwrap();
        assert_eq!(hex::encode(&got), hex::encode(&step.reply), "{}", step.name);
    }
    // Nothing more came: PUT and LIST were not answered.
    for c in [&mut connector, &mut raw] {
        c.0.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut extra = [0u8; 1];
        assert!(c.0.read(&mut extra).is_err(), "an unexpected reply");
        c.0.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        assert_eq!(c.ask(Command::Health, "m@1@0@0@half"), ServerHeader::OK);
    }
    assert_eq!(s.cwm.counters.op("lm_put").calls, 3);
    assert_eq!(s.cwm.counters.op("lm_get").calls, 4);
    assert_eq!(s.cwm.counters.op("lm_exist").calls, 4);
    assert_eq!(s.cwm.counters.op("lm_list").calls, 1);
    assert_eq!(s.cwm.counters.op("lm_health").calls, 4);
    let metrics = cwm::metrics::render(&s.cwm, &s.windows.health());
    assert!(
        metrics.contains("cwm_ops_total{op=\"lm_get\"} 4"),
        "{metrics}"
    );
}

#[test]
fn a_get_returns_the_bytes_and_metadata_put_and_keys_differing_anywhere_never_alias() {
    let s = lm_sidecar(small_config());
    let mut c = Lm::connect(&s);
    let keys = [
        "meta-llama/Llama-3.1-8B-Instruct@1@0@1a2b@bfloat16",
        "meta-llama/Llama-3.1-8B-Instruct@1@0@-1a2b@bfloat16",
        "meta-llama/Llama-3.1-8B-Instruct@2@0@1a2b@bfloat16",
        "meta-llama/Llama-3.1-8B-Instruct@2@1@1a2b@bfloat16",
        "meta-llama/Llama-3.1-8B-Instruct@1@0@1a2b@half",
        "meta-llama/Llama-3.1-8B-Instruct@1@0@1a2b@bfloat16@3",
        "meta-llama/Llama-3.1-8B-Instruct@1@0@1a2b@bfloat16@user%alice",
        "meta-llama/Llama-3.1-8B-Instruct@1@0@1a2b@bfloat16@user%bob",
        "other/model@1@0@1a2b@bfloat16",
    ];
    for (i, k) in keys.iter().enumerate() {
        assert!(!c.exists(k));
        assert!(c.get(k).is_none());
        let meta = TensorMeta {
            shape: [2, 4, 16, 8 + i as i32],
            ..BF16
        };
        c.put(k, meta, &payload(i as u8, 1000 + 16 * i));
    }
    for (i, k) in keys.iter().enumerate() {
        assert!(c.exists(k), "{k}");
        let (meta, bytes) = c.get(k).unwrap();
        assert_eq!(meta.shape, [2, 4, 16, 8 + i as i32], "{k}");
        assert_eq!((meta.fmt, meta.dtype), (1, 3));
        assert!(bytes == payload(i as u8, 1000 + 16 * i), "{k}: other bytes");
    }
    // An object PUT with dtype code 1 (torch.half) is echoed as 2, as the reference does;
    // a second PUT of a stored key keeps the first.
    let k = "m@1@0@ff@half";
    c.put(k, TensorMeta { dtype: 1, ..BF16 }, b"first!");
    c.put(k, BF16, b"second");
    let (meta, bytes) = c.get(k).unwrap();
    assert_eq!((meta.dtype, &bytes[..]), (2, &b"first!"[..]));
    // An empty payload is an object too.
    c.put("m@1@0@fe@half", BF16, b"");
    assert_eq!(c.get("m@1@0@fe@half").unwrap().1, b"");
}

#[test]
fn keys_cwm_cannot_store_under_miss_and_keep_the_connection() {
    let s = lm_sidecar(small_config());
    let mut c = Lm::connect(&s);
    // LMCache parses these (an empty model, a rank beyond the world size); cwm cannot key them.
    for k in ["@1@0@ff@half", "m@1@3@ff@half"] {
        c.put(k, BF16, b"payload");
        assert!(!c.exists(k));
        assert!(c.get(k).is_none());
    }
    assert_eq!(s.cwm.counters.op("lm_put").errors, 2);
    assert_eq!(c.ask(Command::Health, "m@1@0@ff@half"), ServerHeader::OK);
}

#[test]
fn objects_are_found_again_in_l2_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<String> = (0..4).map(|i| format!("m/x@1@0@{i:x}7@bfloat16")).collect();
    {
        let s = lm_sidecar(disk_config(dir.path()));
        let mut c = Lm::connect(&s);
        for (i, k) in keys.iter().enumerate() {
            c.put(k, BF16, &payload(i as u8, 64 << 10));
        }
        assert!(c.exists(&keys[3]), "the PUTs were handled");
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.cwm.tiers.stats().write_behind.written < 4 {
            assert!(
                Instant::now() < deadline,
                "write-behind did not write 4 objects"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s.stop();
    }
    let s = lm_sidecar(disk_config(dir.path()));
    assert_eq!(s.cwm.tiers.l1_occupancy().objects, 0, "L1 starts empty");
    let mut c = Lm::connect(&s);
    for (i, k) in keys.iter().enumerate() {
        assert!(c.exists(k), "{k} on disk");
        let (meta, bytes) = c.get(k).expect("read back from L2");
        assert_eq!(meta, BF16);
        assert!(bytes == payload(i as u8, 64 << 10), "{k}: other bytes");
    }
    assert_eq!(s.cwm.tiers.l1_occupancy().objects, 4, "promoted into L1");
    assert!(c.get("m/x@1@0@ff@bfloat16").is_none());
}

/// Bytes of a header with these words and key field (not checked: hostile input).
fn raw_header(words: [i32; 9], key: &[u8]) -> Vec<u8> {
    let mut b = vec![b' '; CLIENT_HEADER_LEN];
    for (i, w) in words.iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
    b[36..36 + key.len()].copy_from_slice(key);
    b
}

#[test]
fn a_malformed_or_truncated_request_drops_only_its_client() {
    let s = lm_sidecar(small_config());
    let mut good = Lm::connect(&s);
    good.put("m@1@0@aa@half", BF16, b"kept");
    let key = b"m@1@0@bb@half";
    let ok = [2, 0, 1, 2, 0, 0, 0, 0, 0];
    let with = |i: usize, v: i32| {
        let mut w = ok;
        w[i] = v;
        raw_header(w, key)
    };
    let mut nul_padded = raw_header(ok, key);
    nul_padded[36 + key.len()..].fill(0);
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("unknown command", with(0, 9)),
        ("command 0", with(0, 0)),
        ("negative length", with(1, -5)),
        ("unknown format", with(2, 99)),
        ("unknown dtype", with(3, -1)),
        ("unknown location", with(4, 7)),
        ("non-UTF-8 key", raw_header(ok, b"m@1@0@\xff@half")),
        ("unparsable key", raw_header(ok, b"just-a-name")),
        ("NUL-padded key", nul_padded),
        ("truncated header", raw_header(ok, key)[..100].to_vec()),
        (
            "truncated PUT payload",
            [
                raw_header([1, 1000, 1, 3, 0, 10, 0, 0, 0], key),
                vec![7; 10],
            ]
            .concat(),
        ),
        ("garbage", vec![0xab; 4096]),
    ];
    let before = Limit::LmFrame.count();
    for (what, bytes) in &hostile {
        let mut bad = Lm::connect(&s);
        bad.send(bytes);
        // A truncated request is complete only when the client gives up on it.
        bad.0.shutdown(Shutdown::Write).unwrap();
        assert!(bad.closed_by_server(), "{what}: connection left open");
        assert_eq!(
            good.ask(Command::Health, "m@1@0@aa@half"),
            ServerHeader::OK,
            "{what}: the other client is not served"
        );
    }
    assert!(Limit::LmFrame.count() >= before + hostile.len() as u64);
    assert!(
        !good.exists("m@1@0@bb@half"),
        "a truncated PUT stores nothing"
    );
    assert_eq!(good.get("m@1@0@aa@half").unwrap().1, b"kept");
    assert_eq!(
        Lm::connect(&s).ask(Command::Health, "m@1@0@aa@half"),
        ServerHeader::OK,
        "a new client is served after the hostile ones"
    );
}

#[test]
fn an_object_larger_than_l1_is_read_and_dropped_and_the_connection_stays_in_step() {
    let s = lm_sidecar(Config {
        l1_size_gb: 8.0 / 1024.0,
        engine_driven: false,
        ..small_config()
    });
    let mut c = Lm::connect(&s);
    let before = Limit::LmObjectSize.count();
    c.put("m@1@0@1@half", BF16, &vec![1u8; 9 << 20]);
    assert!(!c.exists("m@1@0@1@half"));
    assert!(Limit::LmObjectSize.count() > before);
    c.put("m@1@0@2@half", BF16, b"small");
    assert_eq!(c.get("m@1@0@2@half").unwrap().1, b"small");
}

#[test]
fn many_clients_at_once_each_read_back_their_own_bytes() {
    let s = lm_sidecar(small_config());
    std::thread::scope(|scope| {
        for t in 0..16u8 {
            let s = &s;
            scope.spawn(move || {
                let mut c = Lm::connect(s);
                for i in 0..20u32 {
                    let k = format!("m@16@{}@{:x}@bfloat16", t % 16, i);
                    let p = payload(t ^ i as u8, 4096 + i as usize);
                    c.put(&k, BF16, &p);
                    assert!(c.exists(&k));
                    assert!(c.get(&k).unwrap().1 == p, "client {t} key {i}");
                }
            });
        }
    });
    assert_eq!(s.cwm.counters.op("lm_put").calls, 320);
    assert_eq!(s.cwm.counters.op("lm_get").errors, 0);
}

#[test]
fn the_lm_port_is_off_unless_configured_and_reads_from_the_config_file() {
    let s = sidecar(small_config());
    assert!(s.lm_addr.is_none());
    let c: Config = toml::from_str("lm_port = 65432\n").unwrap();
    assert_eq!(c.lm_port, Some(65432));
    assert_eq!(Config::default().lm_port, None);
}

#[test]
fn connections_beyond_the_cap_are_closed_and_served_again_once_one_leaves() {
    let s = lm_sidecar(small_config());
    let mut open: Vec<Lm> = (0..cwm::limits::LM_MAX_CONNECTIONS)
        .map(|_| Lm::connect(&s))
        .collect();
    // Every one of them is served (answered in order, so all are accepted by now).
    for c in &mut open {
        assert_eq!(c.ask(Command::Health, "m@1@0@ff@half"), ServerHeader::OK);
    }
    let before = Limit::LmConnections.count();
    let mut extra = Lm::connect(&s);
    assert!(
        extra.closed_by_server(),
        "a connection beyond the cap was kept"
    );
    assert!(Limit::LmConnections.count() > before);
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = Lm::connect(&s);
        let h = ClientHeader::placeholder(Command::Health, Key::parse("m@1@0@ff@half").unwrap());
        c.send(&h.encode());
        let mut b = [0u8; SERVER_HEADER_LEN];
        if c.0.read_exact(&mut b).is_ok() {
            assert_eq!(ServerHeader::decode(&b).unwrap(), ServerHeader::OK);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no connection served after one left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
