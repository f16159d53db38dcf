//! Golden tests: every message the real LMCache 0.5.6 client sent during the capture
//! (`tests/fixtures/captured_frames.json`, copied from `shared/protocol/reference/`) is decoded
//! into typed values, the values are checked field by field, and re-encoded values must equal the
//! captured payload frames byte for byte. The responses the client accepted (spec §2.4, end) are
//! encoded and compared with the bytes given there.

use connector_protocol::codec::{self, decode};
use connector_protocol::frame::{decode_incoming, Incoming, StreamControl};
use connector_protocol::ipc::{decode_descriptor_list, encode_descriptor_list};
use connector_protocol::*;

struct Message {
    op: String,
    frames: Vec<Vec<u8>>,
}

fn load() -> Vec<Message> {
    let text = include_str!("fixtures/captured_frames.json");
    let json: serde_json::Value = serde_json::from_str(text).expect("fixture is JSON");
    json.as_array()
        .expect("a list of messages")
        .iter()
        .map(|m| Message {
            op: m["op"].as_str().unwrap().to_string(),
            frames: m["frames"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| hex::decode(f.as_str().unwrap()).unwrap())
                .collect(),
        })
        .collect()
}

fn h(s: &str) -> Vec<u8> {
    let clean: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(clean).unwrap()
}

/// Build msgpack bytes from a notation mixing hex bytes and quoted fixstr-content:
/// `a7 "context"` → `a7 63 6f 6e 74 65 78 74`.
fn wire(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(q) = rest.find('"') {
        out.extend(h(&rest[..q]));
        let end = rest[q + 1..].find('"').unwrap() + q + 1;
        out.extend_from_slice(&rest.as_bytes()[q + 1..end]);
        rest = &rest[end + 1..];
    }
    out.extend(h(rest));
    out
}

fn lookup_key(worker_id: Option<u32>) -> IpcCacheServerKey {
    IpcCacheServerKey {
        model_name: "m".into(),
        world_size: 1,
        worker_id,
        token_ids: vec![1, 2, 3, 4],
        start: 0,
        end: 0,
        request_id: "req-1".into(),
        cache_salt: String::new(),
        request_configs: None,
        num_kv_readers: 1,
    }
}

/// Decode a key payload, compare with `expected`, and check the re-encoding is byte-exact.
fn check_key(frame: &[u8], expected: &IpcCacheServerKey) {
    assert_eq!(frame.len(), 126, "the captured key is 126 bytes");
    let key: IpcCacheServerKey = decode("key", frame).unwrap();
    assert_eq!(&key, expected);
    assert_eq!(codec::encode(&key), frame, "key re-encoding");
}

fn check_u64(frame: &[u8], v: u64) {
    assert_eq!(codec::decode_u64("int", frame).unwrap(), v);
    assert_eq!(codec::encode_u64(v), frame);
}

fn check_str(frame: &[u8], v: &str) {
    assert_eq!(codec::decode_str("str", frame).unwrap(), v);
    assert_eq!(codec::encode_str(v), frame);
}

const STUB: &[u8] = b"stub_ipc_handle";

/// Decode and re-encode every payload of one captured request.
fn check_request(op: &Op, p: &[&[u8]]) {
    match op {
        Op::GetChunkSize | Op::GetExperimental | Op::Noop => assert!(p.is_empty()),
        Op::Ping => {
            let v = codec::decode_opt_u64("instance_id", p[0]).unwrap();
            match v {
                None => assert_eq!(codec::encode_nil(), p[0]),
                Some(id) => {
                    assert_eq!(id, (1u64 << 62) - 1);
                    assert_eq!(codec::encode_u64(id), p[0]);
                }
            }
        }
        Op::RegisterKvCache => {
            check_u64(p[0], 7);
            let descs = decode_descriptor_list(p[1]).unwrap();
            assert_eq!(p[1].len(), 147);
            let metadata = TensorMetadata {
                dtype: "bfloat16".into(),
                shape: vec![4, 16, 2, 16],
                stride: vec![512, 32, 16, 1],
                storage_offset: 0,
                device_uuid: "cpu".into(),
            };
            assert_eq!(metadata.byte_span(), Some(4096));
            assert_eq!(
                descs,
                vec![IpcDescriptor::CpuShm {
                    shm_name: "/lmcache_kv_1234_0".into(),
                    nbytes: 4096,
                    metadata,
                }]
            );
            assert_eq!(descs[0].kind(), "cpu_shm");
            assert_eq!(
                encode_descriptor_list(&descs),
                p[1],
                "descriptor list re-encoding"
            );
            check_str(p[2], "m");
            check_u64(p[3], 1);
            check_str(p[4], "vllm");
            let hints: LayoutHints = decode("layout_hints", p[5]).unwrap();
            assert_eq!(
                hints,
                LayoutHints {
                    kv_layout: Some("NHD".into())
                }
            );
            assert_eq!(codec::encode(&hints), p[5]);
            assert_eq!(p[5], wire(r#"81 a9 "kv_layout" a3 "NHD""#));
            let groups: Vec<EngineGroupInfo> = decode("engine_group_infos", p[6]).unwrap();
            assert_eq!(
                groups,
                vec![EngineGroupInfo {
                    engine_group_id: 0,
                    layer_indices: vec![0],
                    tokens_per_block: 16,
                    sw_size_tokens: -1,
                    extra_object_group_tag: 0,
                    recurrent_state: false,
                }]
            );
            assert_eq!(p[6].len(), 110);
            assert_eq!(
                codec::encode(&groups),
                p[6],
                "EngineGroupInfo list re-encoding"
            );
        }
        Op::Lookup | Op::FreeLookupLocks => {
            check_key(p[0], &lookup_key(None));
            check_u64(p[1], 1);
        }
        Op::QueryPrefetchStatus | Op::EndSession => check_str(p[0], "req-1"),
        Op::WaitPrefetchStatus => {
            check_str(p[0], "req-1");
            assert_eq!(codec::decode_f64("timeout", p[1]).unwrap(), 1.5);
            assert_eq!(codec::encode_f64(1.5), p[1]);
        }
        Op::Store | Op::Retrieve => {
            check_key(p[0], &lookup_key(Some(0)));
            check_u64(p[1], 7);
            assert_eq!(codec::decode_block_ids(p[2]).unwrap(), vec![vec![3]]);
            assert_eq!(codec::encode_block_ids(&[vec![3]]), p[2]);
            assert_eq!(codec::decode_bin("event", p[3]).unwrap(), STUB);
            assert_eq!(codec::encode_bin(STUB), p[3]);
            if *op == Op::Retrieve {
                check_u64(p[4], 0);
            }
        }
        Op::ReportBlockAllocation => {
            check_u64(p[0], 99);
            check_str(p[1], "m");
            let records: Vec<BlockAllocationRecord> = decode("records", p[2]).unwrap();
            assert_eq!(
                records,
                vec![BlockAllocationRecord {
                    req_id: "req-1".into(),
                    new_block_ids: vec![3],
                    new_token_ids: vec![1, 2],
                }]
            );
            assert_eq!(codec::encode(&records), p[2]);
        }
        Op::Clear => {
            assert!(!codec::decode_bool("force", p[0]).unwrap());
            assert_eq!(codec::encode_bool(false), p[0]);
        }
        Op::RegisterKvCacheEngineDrivenContext => {
            let payload: RegisterEngineDrivenContextPayload = decode("payload", p[0]).unwrap();
            assert_eq!(
                payload,
                RegisterEngineDrivenContextPayload {
                    instance_id: 7,
                    model_name: "m".into(),
                    world_size: 1,
                    block_size: 16,
                    num_layers: 4,
                    hidden_dim_size: 32,
                    dtype_str: "bfloat16".into(),
                    use_mla: false,
                    num_physical_slots: Some(256),
                }
            );
            assert_eq!(codec::encode(&payload), p[0]);
        }
        Op::PrepareStore | Op::PrepareRetrieve | Op::CommitRetrieve => {
            check_key(p[0], &lookup_key(Some(0)));
            check_u64(p[1], 7);
        }
        Op::CommitStore => {
            check_key(p[0], &lookup_key(Some(0)));
            check_u64(p[1], 7);
            assert_eq!(codec::decode_bin("data", p[2]).unwrap(), b"");
            assert_eq!(codec::encode_bin(b""), p[2]);
        }
        Op::UnregisterKvCache | Op::UnregisterKvCacheEngineDrivenContext => check_u64(p[0], 7),
        Op::SubscribeKvEvents => {
            check_u64(p[0], 7);
            check_str(p[1], "m");
            check_u64(p[2], 0);
            check_u64(p[3], 1024);
        }
        other => panic!("no golden check for {other:?}"),
    }
}

#[test]
fn every_captured_message_decodes_and_reencodes() {
    let messages = load();
    assert_eq!(messages.len(), 25);
    let mut requests = 0;
    let mut controls = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let frames: Vec<&[u8]> = m.frames.iter().map(Vec::as_slice).collect();
        match decode_incoming(&frames).unwrap_or_else(|e| panic!("message {i} ({}): {e}", m.op)) {
            Incoming::Request(req) => {
                requests += 1;
                assert_eq!(req.op.name(), m.op, "message {i}");
                assert_eq!(req.uid, m.frames[0].as_slice());
                // The op frame the client sent is what we would encode for that op.
                assert_eq!(req.op.to_frame(), m.frames[1], "op frame of {}", m.op);
                let arity = req.op.arity().expect("every captured op has a known arity");
                assert_eq!(arity, frames.len() - 2, "arity of {}", m.op);
                let payloads = req.expect(arity).unwrap();
                assert!(req.expect(arity + 1).is_err());
                assert_eq!(req.expect_arity().unwrap(), payloads);
                check_request(&req.op, payloads);
                // The uid is a msgpack int counting from 0.
                assert_eq!(codec::decode_u64("uid", req.uid).unwrap(), i as u64);
                // Replies echo uid and op frames verbatim.
                let reply = Reply::to(&req, None);
                assert_eq!(reply.frames(), vec![&m.frames[0][..], &m.frames[1][..]]);
                let reply = Reply::to(&req, Some(vec![0xc3]));
                assert_eq!(reply.frames().len(), 3);
            }
            Incoming::Control { uid, control } => {
                assert_eq!(m.op, "stream-control");
                assert_eq!(uid, [0x16]);
                controls.push(control);
            }
        }
    }
    assert_eq!(requests, 23);
    assert_eq!(
        controls,
        vec![Some(StreamControl::Ack), Some(StreamControl::Cancel)]
    );
}

#[test]
fn captured_op_frames_map_to_the_right_ops() {
    let expected: &[(&str, Op, &str)] = &[
        ("get_chunk_size", Op::GetChunkSize, "15"),
        ("get_experimental", Op::GetExperimental, "20"),
        ("ping", Op::Ping, "16"),
        ("noop", Op::Noop, "18"),
        ("register_kv_cache", Op::RegisterKvCache, "01"),
        ("lookup", Op::Lookup, "08"),
        ("query_prefetch_status", Op::QueryPrefetchStatus, "09"),
        ("wait_prefetch_status", Op::WaitPrefetchStatus, "0a"),
        ("free_lookup_locks", Op::FreeLookupLocks, "0c"),
        ("store", Op::Store, "06"),
        ("retrieve", Op::Retrieve, "07"),
        ("end_session", Op::EndSession, "0d"),
        ("report_block_allocation", Op::ReportBlockAllocation, "17"),
        ("clear", Op::Clear, "14"),
        (
            "register_kv_cache_engine_driven_context",
            Op::RegisterKvCacheEngineDrivenContext,
            "0e",
        ),
        ("prepare_store", Op::PrepareStore, "10"),
        ("commit_store", Op::CommitStore, "11"),
        ("prepare_retrieve", Op::PrepareRetrieve, "12"),
        ("commit_retrieve", Op::CommitRetrieve, "13"),
        (
            "unregister_kv_cache_engine_driven_context",
            Op::UnregisterKvCacheEngineDrivenContext,
            "0f",
        ),
        ("unregister_kv_cache", Op::UnregisterKvCache, "02"),
        (
            "subscribe_kv_events",
            Op::SubscribeKvEvents,
            "b37375627363726962655f6b765f6576656e7473",
        ),
    ];
    for (name, op, frame) in expected {
        assert_eq!(Op::from_frame(&h(frame)).unwrap(), *op, "{name}");
        assert_eq!(op.to_frame(), h(frame), "{name}");
        assert_eq!(op.name(), *name);
        assert_eq!(Op::from_name(name), *op);
    }
}

#[test]
fn responses_match_the_bytes_the_client_accepted() {
    // store/retrieve success with no pending event.
    assert_eq!(TransferResult::DONE.encode(), h("92 c4 00 c3"));
    assert_eq!(TransferResult::FAILED.encode(), h("92 c4 00 c2"));
    assert_eq!(
        TransferResult::decode(&h("92 c4 00 c3")).unwrap(),
        TransferResult::DONE
    );
    // prepare_store with nothing to write.
    assert_eq!(
        codec::encode(&PrepareStoreResponse::default()),
        wire(r#"81 a7 "context" 82 a5 "slots" 90 ad "chunk_indices" 90"#)
    );
    // prepare_store that offers no slots at all (failure: the client falls back and commits).
    assert_eq!(
        PrepareStoreResponse::encode_unavailable(),
        wire(r#"81 a7 "context" 80"#)
    );
    // prepare_retrieve failure.
    let failed = PrepareRetrieveResponse {
        success: false,
        ..Default::default()
    };
    assert_eq!(
        codec::encode(&failed),
        wire(r#"83 a7 "success" c2 a4 "data" c4 00 a7 "context" 80"#)
    );
    // engine-driven registration in pickle mode (empty name, size 0).
    assert_eq!(
        codec::encode(&RegisterEngineDrivenContextResponse::default()),
        wire(r#"82 a8 "shm_name" a0 a9 "pool_size" 00"#)
    );
    assert_eq!(codec::encode_u64(256), h("cd 01 00")); // get_chunk_size
    assert_eq!(codec::encode_str_list(&[]), h("90")); // get_experimental
    assert_eq!(codec::encode_bool(true), h("c3")); // ping, commit_*
    assert_eq!(codec::encode_str("OK"), wire(r#"a2 "OK""#)); // noop
    assert_eq!(codec::encode_u64(2), h("02")); // query_prefetch_status
    assert_eq!(
        codec::encode_str_list(&["kv_event_stream"]),
        wire(r#"91 af "kv_event_stream""#)
    );
}

#[test]
fn shm_mode_responses_encode_with_slots() {
    let slot = ShmSlot {
        offset: 4096,
        length: 64,
        shape: vec![2, 4, 256, 32],
        dtype: "bfloat16".into(),
    };
    let slot_bytes = wire(
        r#"84 a6 "offset" cd 10 00 a6 "length" 40 a5 "shape" 94 02 04 cd 01 00 20 a5 "dtype" a8 "bfloat16""#,
    );
    assert_eq!(codec::encode(&slot), slot_bytes);
    let resp = PrepareStoreResponse {
        context: PrepareStoreContext {
            slots: vec![slot.clone()],
            chunk_indices: vec![0],
        },
    };
    let mut want = wire(r#"81 a7 "context" 82 a5 "slots" 91"#);
    want.extend(&slot_bytes);
    want.extend(wire(r#"ad "chunk_indices" 91 00"#));
    assert_eq!(codec::encode(&resp), want);
    assert_eq!(decode::<PrepareStoreResponse>("resp", &want).unwrap(), resp);

    let resp = PrepareRetrieveResponse {
        success: true,
        data: Vec::new(),
        context: PrepareRetrieveContext { slots: vec![slot] },
    };
    let mut want = wire(r#"83 a7 "success" c3 a4 "data" c4 00 a7 "context" 81 a5 "slots" 91"#);
    want.extend(&slot_bytes);
    assert_eq!(codec::encode(&resp), want);
    assert_eq!(
        decode::<PrepareRetrieveResponse>("resp", &want).unwrap(),
        resp
    );

    let resp = RegisterEngineDrivenContextResponse {
        shm_name: "lmcache_l1_pool_1".into(),
        pool_size: 1 << 30,
    };
    assert_eq!(
        codec::encode(&resp),
        wire(r#"82 a8 "shm_name" b1 "lmcache_l1_pool_1" a9 "pool_size" ce 40 00 00 00"#)
    );
}

#[test]
fn transfer_result_with_an_event_handle() {
    let r = TransferResult {
        event: vec![0xab; 64],
        ok: true,
    };
    let mut want = h("92 c4 40");
    want.extend([0xab; 64]);
    want.push(0xc3);
    assert_eq!(r.encode(), want);
    assert_eq!(TransferResult::decode(&want).unwrap(), r);
    // A str where bytes are expected, a wrong arity and trailing bytes are rejected.
    assert!(TransferResult::decode(&h("92 a0 c3")).is_err());
    assert!(TransferResult::decode(&h("93 c4 00 c3 c3")).is_err());
    assert!(TransferResult::decode(&h("92 c4 00 c3 00")).is_err());
}
