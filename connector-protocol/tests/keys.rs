//! `IPCCacheServerKey` and friends beyond the capture: non-default values produced by the wire
//! mirror (`fixtures/mirror_vectors.json`), tolerant decoding (unknown keys, missing defaulted
//! fields) and strict rejection of bad values.

use connector_protocol::codec::{self, decode};
use connector_protocol::*;
use rmpv::Value;

fn vectors() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/mirror_vectors.json")).unwrap()
}

fn vector(name: &str) -> Vec<u8> {
    hex::decode(vectors()[name].as_str().unwrap()).unwrap()
}

fn reason(e: DecodeError) -> String {
    match e {
        DecodeError::Payload { reason, .. } => reason,
        other => panic!("expected a payload error, got {other:?}"),
    }
}

#[test]
fn full_key_from_the_mirror() {
    let bytes = vector("key_full");
    let key: IpcCacheServerKey = decode("key", &bytes).unwrap();
    let tokens: Vec<u32> = vectors()["key_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        key.model_name,
        "meta-llama/Llama-3.1-8B##lmcache-dcp-layout-v1-d2-interleave1"
    );
    assert_eq!(key.world_size, 4);
    assert_eq!(key.worker_id, Some(3));
    assert_eq!(key.token_ids, tokens);
    assert_eq!(key.token_ids[8], u32::MAX);
    assert_eq!((key.start, key.end), (256, 512));
    assert_eq!(key.request_id, "cmpl-9f8e");
    assert_eq!(key.cache_salt, "tenant-a");
    assert_eq!(key.num_kv_readers, 2);
    let configs = key.request_configs.as_ref().unwrap();
    let get = |k: &str| {
        configs
            .as_map()
            .unwrap()
            .iter()
            .find(|(kk, _)| kk.as_str() == Some(k))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("lmcache.tag.user"), Some(Value::from("alice")));
    assert_eq!(get("lmcache.priority"), Some(Value::from(2)));
    assert_eq!(
        get("nested"),
        Some(Value::Map(vec![(
            Value::from("x"),
            Value::Array(vec![Value::F64(1.5), Value::Nil, Value::Boolean(true)])
        )]))
    );
    // Every int width of the token list and the dynamic request_configs re-encode exactly.
    assert_eq!(codec::encode(&key), bytes);
}

#[test]
fn engine_groups_from_the_mirror() {
    let bytes = vector("engine_groups");
    let groups: Vec<EngineGroupInfo> = decode("groups", &bytes).unwrap();
    assert_eq!(
        groups,
        vec![
            EngineGroupInfo {
                engine_group_id: 0,
                layer_indices: (0..40).collect(),
                tokens_per_block: 16,
                sw_size_tokens: -1,
                extra_object_group_tag: 0,
                recurrent_state: false,
            },
            EngineGroupInfo {
                engine_group_id: 1,
                layer_indices: vec![40, 41],
                tokens_per_block: 32,
                sw_size_tokens: 4096,
                extra_object_group_tag: 3,
                recurrent_state: true,
            },
        ]
    );
    assert_eq!(codec::encode(&groups), bytes);
}

#[test]
fn uid_and_hash_vectors_from_the_mirror() {
    assert_eq!(vector("uid_300"), codec::encode_u64(300));
    for v in vectors()["hash_vectors"].as_array().unwrap() {
        let tokens: Vec<u32> = v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let end = v["end"].as_u64().map_or(usize::MAX, |e| e as usize);
        let start = v["start"].as_u64().unwrap() as usize;
        let hasher = TokenHasher::new(v["chunk"].as_u64().unwrap() as usize);
        let got: Vec<String> = hasher
            .chunk_hashes(&tokens, start, end)
            .iter()
            .map(ChunkHash::to_hex)
            .collect();
        let want: Vec<String> = v["hashes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_string())
            .collect();
        assert!(!want.is_empty());
        assert_eq!(got, want);
    }
}

/// msgpack of a map given as (key, value) pairs.
fn map(entries: Vec<(&str, Value)>) -> Vec<u8> {
    let v = Value::Map(
        entries
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    );
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &v).unwrap();
    out
}

fn tokens(t: &[i64]) -> Value {
    Value::Array(t.iter().map(|&x| Value::from(x)).collect())
}

fn base_key() -> Vec<(&'static str, Value)> {
    vec![
        ("model_name", "m".into()),
        ("world_size", 1.into()),
        ("worker_id", Value::Nil),
        ("token_ids", tokens(&[1, 2, 3, 4])),
        ("start", 0.into()),
        ("end", 0.into()),
        ("request_id", "req-1".into()),
        ("cache_salt", "".into()),
        ("request_configs", Value::Nil),
        ("num_kv_readers", 1.into()),
    ]
}

#[test]
fn key_with_an_unknown_field_decodes() {
    let mut fields = base_key();
    fields.insert(
        3,
        (
            "future_field",
            Value::Map(vec![("a".into(), Value::Array(vec![1.into()]))]),
        ),
    );
    fields.push(("another", Value::Binary(vec![1, 2])));
    let key: IpcCacheServerKey = decode("key", &map(fields)).unwrap();
    let plain: IpcCacheServerKey = decode("key", &map(base_key())).unwrap();
    assert_eq!(key, plain);
}

#[test]
fn key_with_missing_defaulted_fields_decodes() {
    let bytes = map(vec![
        ("model_name", "m".into()),
        ("world_size", 2.into()),
        ("token_ids", tokens(&[5, 6])),
    ]);
    let key: IpcCacheServerKey = decode("key", &bytes).unwrap();
    assert_eq!(
        key,
        IpcCacheServerKey {
            model_name: "m".into(),
            world_size: 2,
            worker_id: None,
            token_ids: vec![5, 6],
            start: 0,
            end: 0,
            request_id: String::new(),
            cache_salt: String::new(),
            request_configs: None,
            num_kv_readers: 1,
        }
    );
}

#[test]
fn key_with_fields_in_another_order_decodes() {
    let mut fields = base_key();
    fields.reverse();
    let key: IpcCacheServerKey = decode("key", &map(fields)).unwrap();
    assert_eq!(key.token_ids, vec![1, 2, 3, 4]);
}

#[test]
fn bad_keys_are_errors() {
    let with = |name: &str, v: Value| {
        let fields = base_key()
            .into_iter()
            .map(|(k, old)| (k, if k == name { v.clone() } else { old }))
            .collect();
        map(fields)
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (with("token_ids", tokens(&[1, -1])), "-1"),
        (with("token_ids", tokens(&[1, 1 << 32])), "4294967296"),
        (
            with("token_ids", Value::Array(vec![Value::Boolean(true)])),
            "bool",
        ),
        (with("token_ids", Value::Array(vec![Value::F64(1.0)])), "1"),
        (with("world_size", "1".into()), "string"),
        (with("worker_id", (-3).into()), "-3"),
        (with("model_name", 5.into()), "5"),
        (
            map(base_key()
                .into_iter()
                .filter(|(k, _)| *k != "model_name")
                .collect()),
            "model_name",
        ),
        (
            map(base_key()
                .into_iter()
                .filter(|(k, _)| *k != "token_ids")
                .collect()),
            "token_ids",
        ),
    ];
    for (bytes, want) in cases {
        let e = reason(decode::<IpcCacheServerKey>("key", &bytes).unwrap_err());
        assert!(e.contains(want), "{e:?} should mention {want:?}");
    }
    // Not a map, trailing bytes, truncation.
    assert!(decode::<IpcCacheServerKey>("key", &[0x90]).is_err());
    let mut bytes = map(base_key());
    bytes.push(0xc0);
    assert!(reason(decode::<IpcCacheServerKey>("key", &bytes).unwrap_err()).contains("trailing"));
    let bytes = map(base_key());
    for n in 0..bytes.len() {
        assert!(decode::<IpcCacheServerKey>("key", &bytes[..n]).is_err());
    }
}

#[test]
fn other_maps_fill_defaults_and_ignore_unknown_keys() {
    let g: EngineGroupInfo = decode(
        "g",
        &map(vec![("engine_group_id", 2.into()), ("new", 1.into())]),
    )
    .unwrap();
    assert_eq!(
        g,
        EngineGroupInfo {
            engine_group_id: 2,
            layer_indices: vec![],
            tokens_per_block: 0,
            sw_size_tokens: -1,
            extra_object_group_tag: 0,
            recurrent_state: false,
        }
    );
    let hints: LayoutHints = decode(
        "h",
        &map(vec![
            ("num_kv_heads", 8.into()),
            ("kv_layout", "HND".into()),
        ]),
    )
    .unwrap();
    assert_eq!(hints.kv_layout.as_deref(), Some("HND"));
    let hints: LayoutHints = decode("h", &[0x80]).unwrap();
    assert_eq!(hints, LayoutHints::default());
    assert_eq!(codec::encode(&hints), vec![0x80]);
    let p: RegisterEngineDrivenContextPayload = decode(
        "p",
        &map(vec![
            ("instance_id", 1.into()),
            ("model_name", "m".into()),
            ("world_size", 1.into()),
            ("block_size", 16.into()),
            ("num_layers", 2.into()),
            ("hidden_dim_size", 64.into()),
            ("dtype_str", "float16".into()),
            ("use_mla", true.into()),
        ]),
    )
    .unwrap();
    assert_eq!(p.num_physical_slots, None);
    assert!(p.use_mla);
    let r: BlockAllocationRecord = decode("r", &map(vec![("req_id", "x".into())])).unwrap();
    assert!(r.new_block_ids.is_empty() && r.new_token_ids.is_empty());
}

#[test]
fn a_long_key_round_trips() {
    // 128k tokens, ~0.5 MB on the wire: decode and re-encode without trouble.
    let key = IpcCacheServerKey {
        model_name: "m".into(),
        world_size: 1,
        worker_id: Some(0),
        token_ids: (0..131_072u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect(),
        start: 0,
        end: 131_072,
        request_id: "r".into(),
        cache_salt: String::new(),
        request_configs: None,
        num_kv_readers: 1,
    };
    let bytes = codec::encode(&key);
    assert!(bytes.len() > 4 * 131_072);
    assert_eq!(decode::<IpcCacheServerKey>("key", &bytes).unwrap(), key);
}

#[test]
fn token_ids_in_any_int_format() {
    // Non-minimal and signed formats holding valid u32 values are accepted (msgspec would
    // accept them too); the fast path and the general path agree.
    let raw = [
        "05",                         // fixint
        "cc 05",                      // u8
        "cd 00 05",                   // u16
        "ce 00 00 00 05",             // u32
        "cf 00 00 00 00 00 00 00 05", // u64
        "d0 05",                      // i8
        "d1 00 05",                   // i16
        "d2 00 00 00 05",             // i32
        "d3 00 00 00 00 00 00 00 05", // i64
    ];
    let mut arr = vec![0xdc, 0x00, raw.len() as u8];
    for r in raw {
        arr.extend(hex::decode(r.replace(' ', "")).unwrap());
    }
    let mut bytes = vec![0x83];
    bytes.extend(codec::encode_str("model_name"));
    bytes.extend(codec::encode_str("m"));
    bytes.extend(codec::encode_str("world_size"));
    bytes.push(0x01);
    bytes.extend(codec::encode_str("token_ids"));
    bytes.extend(&arr);
    let key: IpcCacheServerKey = decode("key", &bytes).unwrap();
    assert_eq!(key.token_ids, vec![5; raw.len()]);
    // The error names the element with its index.
    let bad = map(vec![
        ("model_name", "m".into()),
        ("world_size", 1.into()),
        ("token_ids", tokens(&[1, 2, -7])),
    ]);
    assert_eq!(
        decode::<IpcCacheServerKey>("key", &bad)
            .unwrap_err()
            .to_string(),
        "bad key: token_ids[2]: expected an int in 0..=4294967295, got -7"
    );
    // Truncated inside the array.
    let mut cut = map(vec![
        ("model_name", "m".into()),
        ("world_size", 1.into()),
        ("token_ids", tokens(&[1, 300, 70_000])),
    ]);
    cut.truncate(cut.len() - 2);
    assert!(decode::<IpcCacheServerKey>("key", &cut).is_err());
}

#[test]
fn token_ids_also_decode_with_rmp_serde() {
    // The fast path is only an optimisation of our decoder; other serde deserializers still work.
    let bytes = vector("key_full");
    let ours: IpcCacheServerKey = decode("key", &bytes).unwrap();
    let theirs: IpcCacheServerKey = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(ours, theirs);
}
