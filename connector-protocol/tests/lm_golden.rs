//! Golden tests of the `lm://` wire against traffic captured between LMCache 0.5.6's own remote
//! connector (`CreateConnector("lm://…")` with a LocalCPUBackend) and LMCache's own reference
//! server (`fixtures/lm_remote_frames.json`, recorded by `tests/e2e/capture_lm_frames.py`):
//! every request the client sent decodes, re-encodes to the same bytes, and the reply headers
//! cwm builds for it equal the reference server's byte for byte.

use connector_protocol::lm::*;

struct Step {
    name: String,
    key: String,
    request: Vec<u8>,
    reply: Vec<u8>,
}

fn steps() -> Vec<Step> {
    let text = include_str!("fixtures/lm_remote_frames.json");
    let json: serde_json::Value = serde_json::from_str(text).expect("fixture is JSON");
    json["steps"]
        .as_array()
        .expect("a list of steps")
        .iter()
        .map(|s| Step {
            name: s["name"].as_str().unwrap().into(),
            key: s["key"].as_str().unwrap().into(),
            request: hex::decode(s["request"].as_str().unwrap()).unwrap(),
            reply: hex::decode(s["reply"].as_str().unwrap()).unwrap(),
        })
        .collect()
}

fn headers(bytes: &[u8]) -> (ClientHeader, &[u8]) {
    let h: &[u8; CLIENT_HEADER_LEN] = bytes[..CLIENT_HEADER_LEN].try_into().unwrap();
    let header = ClientHeader::decode(h).expect("the real client's header decodes");
    assert_eq!(&header.encode(), h, "re-encoded header differs");
    (header, &bytes[CLIENT_HEADER_LEN..])
}

#[test]
fn every_captured_request_decodes_and_re_encodes_byte_for_byte() {
    let steps = steps();
    assert_eq!(steps.len(), 13);
    for s in &steps {
        let (h, rest) = headers(&s.request);
        assert_eq!(h.key.as_str(), s.key, "{}", s.name);
        assert_eq!(h.location, 0, "{}", s.name);
        let want = match s.name.split('_').next().unwrap() {
            "put" => Command::Put,
            "get" => Command::Get,
            "exist" => Command::Exist,
            "health" => Command::Health,
            "list" => Command::List,
            other => panic!("unexpected step {other}"),
        };
        assert_eq!(h.command, want, "{}", s.name);
        match h.command {
            Command::Put => {
                assert_eq!(h.length as usize, rest.len(), "{}: payload follows", s.name);
                assert_ne!(h.meta, TensorMeta::PLACEHOLDER);
            }
            Command::List => {
                assert!(
                    rest.len() == CLIENT_HEADER_LEN,
                    "LIST is followed by a HEALTH"
                );
                assert_eq!(headers(rest).0.command, Command::Health);
            }
            _ => {
                assert_eq!(
                    (h.length, h.meta),
                    (0, TensorMeta::PLACEHOLDER),
                    "{}",
                    s.name
                );
                assert!(rest.is_empty(), "{}", s.name);
            }
        }
    }
}

#[test]
fn the_captured_keys_carry_model_rank_tags_and_layer() {
    let keys: Vec<Key> = steps().iter().map(|s| headers(&s.request).0.key).collect();
    let tagged = keys
        .iter()
        .find(|k| k.model() == "Qwen/Qwen3-8B")
        .expect("the tagged key");
    assert_eq!((tagged.world_size(), tagged.worker_id()), (2, 1));
    assert_eq!(tagged.as_str(), "Qwen/Qwen3-8B@2@1@-5f3a9c@half@user%alice");
    assert!(keys.iter().any(|k| k.as_str() == "m@1@0@ff@float@7"));
}

#[test]
fn reply_headers_equal_the_reference_servers() {
    let mut put: Option<TensorMeta> = None;
    let mut compared = 0;
    for s in steps() {
        let (h, rest) = headers(&s.request);
        let reply = match h.command {
            Command::Put => {
                put = Some(h.meta);
                assert!(s.reply.is_empty(), "PUT gets no reply");
                continue;
            }
            Command::Get if s.name.ends_with("miss") => ServerHeader::MISS,
            Command::Exist if s.name.ends_with("miss") => ServerHeader::MISS,
            Command::Get => ServerHeader::hit(
                (s.reply.len() - SERVER_HEADER_LEN) as u32,
                put.expect("a PUT came first"),
            ),
            Command::Exist | Command::Health | Command::List => ServerHeader::OK,
        };
        assert_eq!(
            hex::encode(reply.encode()),
            hex::encode(&s.reply[..SERVER_HEADER_LEN]),
            "{}",
            s.name
        );
        let decoded =
            ServerHeader::decode(s.reply[..SERVER_HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(decoded, reply, "{}", s.name);
        if h.command == Command::List {
            assert_eq!(rest.len(), CLIENT_HEADER_LEN, "one reply, for the HEALTH");
        }
        compared += 1;
    }
    assert_eq!(compared, 10);
}
