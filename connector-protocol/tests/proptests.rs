//! Property tests: typed values survive encode → decode (and re-encoding is stable), and no
//! decoder panics on arbitrary or mutated input.

use connector_protocol::codec::{self, decode};
use connector_protocol::frame::decode_incoming;
use connector_protocol::ipc::{decode_descriptor_list, encode_descriptor_list};
use connector_protocol::*;
use proptest::prelude::*;
use rmpv::Value;

// ---- generators ----------------------------------------------------------------------------

fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::Boolean),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::F64),
        ".{0,12}".prop_map(Value::from),
        proptest::collection::vec(any::<u8>(), 0..12).prop_map(Value::Binary),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((".{0,8}".prop_map(Value::from), inner), 0..6)
                .prop_map(Value::Map),
        ]
    })
}

fn request_configs() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        proptest::collection::vec(("[a-z.]{1,16}".prop_map(Value::from), any_value()), 0..5)
            .prop_map(|m| Some(Value::Map(m))),
    ]
}

prop_compose! {
    fn any_key()(
        model_name in ".{0,40}",
        world_size in any::<u32>(),
        worker_id in any::<Option<u32>>(),
        token_ids in proptest::collection::vec(any::<u32>(), 0..600),
        start in any::<u64>(),
        end in any::<u64>(),
        request_id in ".{0,20}",
        cache_salt in ".{0,20}",
        request_configs in request_configs(),
        num_kv_readers in any::<u32>(),
    ) -> IpcCacheServerKey {
        IpcCacheServerKey {
            model_name, world_size, worker_id, token_ids, start, end, request_id, cache_salt,
            request_configs, num_kv_readers,
        }
    }
}

prop_compose! {
    fn any_group()(
        engine_group_id in any::<u32>(),
        layer_indices in proptest::collection::vec(any::<u32>(), 0..80),
        tokens_per_block in any::<u32>(),
        sw_size_tokens in any::<i64>(),
        extra_object_group_tag in any::<i64>(),
        recurrent_state in any::<bool>(),
    ) -> EngineGroupInfo {
        EngineGroupInfo {
            engine_group_id, layer_indices, tokens_per_block, sw_size_tokens,
            extra_object_group_tag, recurrent_state,
        }
    }
}

const DTYPES: &[&str] = &[
    "bfloat16",
    "float16",
    "float32",
    "float8_e4m3fn",
    "uint8",
    "int64",
];

prop_compose! {
    /// A metadata whose view fits in `span` bytes (returned alongside).
    fn any_metadata()(
        dtype in proptest::sample::select(DTYPES),
        dims in proptest::collection::vec((0u64..64, 0u64..100_000), 0..6),
        storage_offset in 0u64..1 << 40,
        device_uuid in ".{0,40}",
    ) -> (TensorMetadata, u64) {
        let m = TensorMetadata {
            dtype: dtype.to_string(),
            shape: dims.iter().map(|d| d.0).collect(),
            stride: dims.iter().map(|d| d.1).collect(),
            storage_offset,
            device_uuid,
        };
        let span = m.byte_span().expect("small dims cannot overflow");
        (m, span)
    }
}

fn any_descriptor() -> impl Strategy<Value = IpcDescriptor> {
    let cpu = (any_metadata(), ".{0,30}", 0u64..1 << 20).prop_map(
        |((metadata, span), shm_name, extra)| IpcDescriptor::CpuShm {
            shm_name,
            nbytes: span + extra,
            metadata,
        },
    );
    let cuda = (
        any_metadata(),
        any::<i64>(),
        any::<[u8; 32]>(),
        0u64..1 << 20,
        any::<u64>(),
        any::<Option<[u8; 16]>>(),
        any::<bool>(),
    )
        .prop_map(|((metadata, span), device, mem, extra, off, ev, sync)| {
            let mut mem_handle = [0u8; 64];
            mem_handle[..32].copy_from_slice(&mem);
            mem_handle[32..].copy_from_slice(&mem);
            let event_handle = ev.map(|e| std::array::from_fn(|i| e[i % 16]));
            let event_sync_required = sync && event_handle.is_some();
            IpcDescriptor::Cuda {
                handle: CudaStorageHandle {
                    device,
                    mem_handle,
                    storage_size: span + extra,
                    storage_offset_bytes: off,
                    event_handle,
                    event_sync_required,
                    ref_counter: None,
                },
                metadata,
            }
        });
    let raw = (
        any_metadata(),
        any::<[u8; 32]>(),
        any::<u64>(),
        0u64..1 << 20,
    )
        .prop_map(
            |((metadata, span), h, alloc_offset, extra)| IpcDescriptor::CudaRaw {
                ipc_handle: std::array::from_fn(|i| h[i % 32] ^ i as u8),
                alloc_offset,
                nbytes: span + extra,
                metadata,
            },
        );
    prop_oneof![cpu, cuda, raw]
}

/// A valid frame of some payload type, then damaged: truncated, bytes flipped or inserted.
fn mutated(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = valid.len().max(1);
    (
        proptest::collection::vec((0..len, any::<u8>(), 0u8..3), 1..6),
        proptest::option::weighted(0.3, 0..=len),
    )
        .prop_map(move |(edits, cut)| {
            let mut v = valid.clone();
            for (pos, byte, kind) in edits {
                let pos = pos.min(v.len());
                match kind {
                    0 if pos < v.len() => v[pos] = byte,
                    1 => v.insert(pos, byte),
                    _ if pos < v.len() => {
                        v.remove(pos);
                    }
                    _ => v.push(byte),
                }
            }
            if let Some(cut) = cut {
                v.truncate(cut);
            }
            v
        })
}

fn sample_key_bytes() -> Vec<u8> {
    hex::decode("8aaa6d6f64656c5f6e616d65a16daa776f726c645f73697a6501a9776f726b65725f6964c0a9746f6b656e5f6964739401020304a5737461727400a3656e6400aa726571756573745f6964a57265712d31aa63616368655f73616c74a0af726571756573745f636f6e66696773c0ae6e756d5f6b765f7265616465727301").unwrap()
}

fn sample_descriptor_bytes() -> Vec<u8> {
    hex::decode("91c78f0185a474797065a76370755f73686da873686d5f6e616d65b22f6c6d63616368655f6b765f313233345f30a66e6279746573cd1000a776657273696f6e01a86d6574616461746185a56474797065a862666c6f61743136a573686170659404100210a673747269646594cd0200201001ae73746f726167655f6f666673657400ab6465766963655f75756964a3637075").unwrap()
}

/// Run every decoder the server uses on one payload frame; only panics matter.
fn decode_everything(frame: &[u8]) {
    let _ = decode::<IpcCacheServerKey>("key", frame);
    let _ = decode::<Vec<EngineGroupInfo>>("groups", frame);
    let _ = decode::<LayoutHints>("hints", frame);
    let _ = decode::<Vec<BlockAllocationRecord>>("records", frame);
    let _ = decode::<RegisterEngineDrivenContextPayload>("payload", frame);
    let _ = decode::<PrepareRetrieveResponse>("resp", frame);
    let _ = decode::<TensorMetadata>("meta", frame);
    let _ = decode::<Value>("value", frame);
    let _ = decode_descriptor_list(frame);
    let _ = codec::decode_block_ids(frame);
    let _ = codec::decode_u64("u", frame);
    let _ = codec::decode_opt_u64("u", frame);
    let _ = codec::decode_i64("i", frame);
    let _ = codec::decode_bool("b", frame);
    let _ = codec::decode_f64("f", frame);
    let _ = codec::decode_str("s", frame);
    let _ = codec::decode_bin("b", frame);
    let _ = TransferResult::decode(frame);
    let _ = Op::from_frame(frame);
}

// ---- round trips ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn key_round_trips(key in any_key()) {
        let bytes = codec::encode(&key);
        let back: IpcCacheServerKey = decode("key", &bytes).unwrap();
        prop_assert_eq!(&back, &key);
        prop_assert_eq!(codec::encode(&back), bytes);
    }

    #[test]
    fn engine_groups_round_trip(groups in proptest::collection::vec(any_group(), 0..4)) {
        let bytes = codec::encode(&groups);
        let back: Vec<EngineGroupInfo> = decode("groups", &bytes).unwrap();
        prop_assert_eq!(&back, &groups);
        prop_assert_eq!(codec::encode(&back), bytes);
    }

    #[test]
    fn block_ids_round_trip(ids in proptest::collection::vec(proptest::collection::vec(any::<u32>(), 0..200), 0..4)) {
        let bytes = codec::encode_block_ids(&ids);
        prop_assert_eq!(codec::decode_block_ids(&bytes).unwrap(), ids.clone());
        // The serde encoder agrees with the hand-written one.
        prop_assert_eq!(codec::encode(&ids), bytes);
    }

    #[test]
    fn transfer_result_round_trips(event in proptest::collection::vec(any::<u8>(), 0..300), ok in any::<bool>()) {
        let r = TransferResult { event, ok };
        let bytes = r.encode();
        prop_assert_eq!(TransferResult::decode(&bytes).unwrap(), r);
    }

    #[test]
    fn descriptor_lists_round_trip(descs in proptest::collection::vec(any_descriptor(), 0..5)) {
        let bytes = encode_descriptor_list(&descs);
        let back = decode_descriptor_list(&bytes).unwrap();
        prop_assert_eq!(&back, &descs);
        prop_assert_eq!(encode_descriptor_list(&back), bytes);
    }

    #[test]
    fn scalars_round_trip(u in any::<u64>(), i in any::<i64>(), f in any::<f64>(), s in ".{0,300}", b in proptest::collection::vec(any::<u8>(), 0..300)) {
        prop_assert_eq!(codec::decode_u64("u", &codec::encode_u64(u)).unwrap(), u);
        prop_assert_eq!(codec::decode_i64("i", &codec::encode_i64(i)).unwrap(), i);
        let back = codec::decode_f64("f", &codec::encode_f64(f)).unwrap();
        prop_assert!(back == f || (back.is_nan() && f.is_nan()));
        let sb = codec::encode_str(&s);
        prop_assert_eq!(codec::decode_str("s", &sb).unwrap(), s.as_str());
        let bb = codec::encode_bin(&b);
        prop_assert_eq!(codec::decode_bin("b", &bb).unwrap(), b.as_slice());
    }

    #[test]
    fn chunk_hashes_are_a_prefix_chain(tokens in proptest::collection::vec(any::<u32>(), 0..200), cs in 1usize..40, start in 0usize..220, end in 0usize..220) {
        let h = TokenHasher::new(cs);
        let all = h.chunk_hashes(&tokens, 0, usize::MAX);
        prop_assert_eq!(all.len(), tokens.len() / cs);
        let part = h.chunk_hashes(&tokens, start, end);
        let first = start.div_ceil(cs);
        let last = tokens.len().min(end) / cs;
        let want: Vec<ChunkHash> = if first < last { all[first..last].to_vec() } else { vec![] };
        prop_assert_eq!(part, want);
    }

    #[test]
    fn object_keys_round_trip(model in "[^@\u{0}]{1,30}", rank in any::<u32>(), group in any::<u32>(), hash in any::<[u8; 32]>(), salt in "[^@/\\\\\u{0}]{0,20}") {
        let key = ObjectKey {
            model: model.as_str().into(),
            kv_rank: rank,
            object_group: group,
            chunk_hash: ChunkHash(hash),
            cache_salt: salt.as_str().into(),
        };
        prop_assert_eq!(ObjectKey::parse_canonical(&key.to_canonical_string()), Some(key));
    }
}

// ---- decoders never panic ------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn no_panic_on_arbitrary_bytes(frame in proptest::collection::vec(any::<u8>(), 0..64)) {
        decode_everything(&frame);
    }

    #[test]
    fn no_panic_on_mutated_keys(frame in mutated(sample_key_bytes())) {
        decode_everything(&frame);
    }

    #[test]
    fn no_panic_on_mutated_descriptors(frame in mutated(sample_descriptor_bytes())) {
        decode_everything(&frame);
    }

    #[test]
    fn no_panic_on_arbitrary_frames(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..12), 0..8)) {
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        if let Ok(connector_protocol::frame::Incoming::Request(req)) = decode_incoming(&refs) {
            let _ = req.expect_arity();
            for p in &req.payloads {
                decode_everything(p);
            }
        }
    }

    #[test]
    fn no_panic_on_arbitrary_msgpack_values(v in any_value()) {
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &v).unwrap();
        decode_everything(&bytes);
        // Any well-formed document decodes as a dynamic value and re-encodes identically.
        let back: Value = decode("value", &bytes).unwrap();
        let mut again = Vec::new();
        rmpv::encode::write_value(&mut again, &back).unwrap();
        prop_assert_eq!(again, bytes);
    }
}

#[test]
fn no_panic_on_adversarial_lengths() {
    for frame in [
        vec![0xdd, 0xff, 0xff, 0xff, 0xff],
        vec![0xdf, 0xff, 0xff, 0xff, 0xff],
        vec![0xc6, 0xff, 0xff, 0xff, 0xff],
        vec![0xdb, 0xff, 0xff, 0xff, 0xff],
        vec![0xc9, 0xff, 0xff, 0xff, 0xff, 0x01],
        vec![0x91, 0xc9, 0xff, 0xff, 0xff, 0xff, 0x01],
        [vec![0x91; 10_000], vec![0xc0]].concat(),
        [[0x81, 0xa0].repeat(10_000), vec![0xc0]].concat(),
    ] {
        decode_everything(&frame);
    }
}
