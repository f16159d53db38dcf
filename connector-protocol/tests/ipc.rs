//! `DeviceIPCWrapper` descriptor lists: golden bytes produced by the wire-type mirror
//! (`fixtures/mirror_vectors.json`, see `fixtures/gen_mirror_vectors.py`) for the kinds the
//! capture does not cover, and hand-built malformed descriptors.

use connector_protocol::ipc::{
    decode_descriptor_list, encode_descriptor_list, EXT_DEVICE_IPC_WRAPPER,
};
use connector_protocol::{CudaStorageHandle, DecodeError, IpcDescriptor, TensorMetadata};
use rmpv::Value;

fn vectors() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/mirror_vectors.json")).unwrap()
}

fn vector(name: &str) -> Vec<u8> {
    hex::decode(vectors()[name].as_str().unwrap()).unwrap()
}

const UUID: &str = "3f2a9c1e-0b7d-4e5f-8a6b-1c2d3e4f5a6b";
const LAYER: u64 = 1000 * 16 * 8 * 256;

fn meta(offset: u64) -> TensorMetadata {
    TensorMetadata {
        dtype: "bfloat16".into(),
        shape: vec![1000, 16, 8, 256],
        stride: vec![32768, 2048, 256, 1],
        storage_offset: offset,
        device_uuid: UUID.into(),
    }
}

fn mem() -> [u8; 64] {
    std::array::from_fn(|i| i as u8)
}

fn ev() -> [u8; 64] {
    std::array::from_fn(|i| 64 + i as u8)
}

fn reason(e: DecodeError) -> String {
    match e {
        DecodeError::Payload { reason, .. } => reason,
        other => panic!("expected a payload error, got {other:?}"),
    }
}

#[test]
fn cuda_version_3_handles() {
    let bytes = vector("cuda_v3");
    let descs = decode_descriptor_list(&bytes).unwrap();
    let handle = |event_handle, event_sync_required| CudaStorageHandle {
        device: 0,
        mem_handle: mem(),
        storage_size: 4 * LAYER * 2,
        storage_offset_bytes: 512,
        event_handle,
        event_sync_required,
        ref_counter: None,
    };
    assert_eq!(
        descs,
        vec![
            IpcDescriptor::Cuda {
                handle: handle(Some(ev()), true),
                metadata: meta(0)
            },
            IpcDescriptor::Cuda {
                handle: handle(None, false),
                metadata: meta(LAYER)
            },
        ]
    );
    assert_eq!(descs[0].kind(), "cuda");
    assert_eq!(descs[1].metadata(), Some(&meta(LAYER)));
    // Byte-exact with the client (ref counter nil/0 in this vector); ext16 framing.
    assert_eq!(encode_descriptor_list(&descs), bytes);
    assert_eq!(&bytes[1..5], &[0xc8, 0x01, 0x2a, 0x01]);
}

#[test]
fn cuda_version_2_handle_with_ref_counter() {
    let descs = decode_descriptor_list(&vector("cuda_v2_with_refcounter")).unwrap();
    let IpcDescriptor::Cuda { handle, metadata } = &descs[0] else {
        panic!("{descs:?}")
    };
    assert_eq!(handle.device, 1);
    assert_eq!(handle.mem_handle, mem());
    assert_eq!(handle.storage_offset_bytes, 0);
    assert_eq!(handle.event_handle, Some(ev()));
    assert!(handle.event_sync_required);
    assert_eq!(metadata.storage_offset, 3 * LAYER);
    // torch's ref counter (the consumer decrements it when it closes the share).
    assert_eq!(
        handle.ref_counter,
        Some(connector_protocol::TorchRefCounter {
            name: b"/torch_123_456_0".to_vec(),
            offset: 7
        })
    );
}

#[test]
fn cuda_bare_64_byte_handle() {
    let descs = decode_descriptor_list(&vector("cuda_bare")).unwrap();
    let IpcDescriptor::Cuda { handle, .. } = &descs[0] else {
        panic!("{descs:?}")
    };
    assert_eq!(handle.mem_handle, mem());
    assert_eq!(handle.event_handle, None);
    assert!(!handle.event_sync_required);
}

#[test]
fn cuda_expandable_segment_handle_is_an_error() {
    let e = reason(decode_descriptor_list(&vector("cuda_expandable")).unwrap_err());
    assert!(e.contains("kv_cache[0].handle[1]"), "{e}");
    assert!(e.contains("expandable"), "{e}");
}

#[test]
fn cuda_raw() {
    let bytes = vector("cuda_raw");
    let descs = decode_descriptor_list(&bytes).unwrap();
    assert_eq!(
        descs,
        vec![IpcDescriptor::CudaRaw {
            ipc_handle: mem(),
            alloc_offset: 1 << 20,
            nbytes: LAYER * 2,
            metadata: meta(0),
        }]
    );
    assert_eq!(descs[0].kind(), "cuda_raw");
    assert_eq!(encode_descriptor_list(&descs), bytes);
}

#[test]
fn unsupported_kinds() {
    for (name, kind) in [("cuda_vmm", "cuda_vmm"), ("npu", "npu")] {
        let descs = decode_descriptor_list(&vector(name)).unwrap();
        assert_eq!(
            descs,
            vec![IpcDescriptor::Unsupported { kind: kind.into() }]
        );
        assert_eq!(descs[0].kind(), kind);
        assert_eq!(descs[0].metadata(), None);
    }
}

#[test]
fn empty_cpu_shm_tensor() {
    let bytes = vector("cpu_shm_empty");
    let descs = decode_descriptor_list(&bytes).unwrap();
    let IpcDescriptor::CpuShm {
        shm_name,
        nbytes,
        metadata,
    } = &descs[0]
    else {
        panic!()
    };
    assert_eq!((shm_name.as_str(), *nbytes), ("", 0));
    assert_eq!(metadata.byte_span(), Some(0));
    assert_eq!(encode_descriptor_list(&descs), bytes);
}

#[test]
fn empty_list() {
    assert_eq!(decode_descriptor_list(&[0x90]).unwrap(), vec![]);
    assert_eq!(encode_descriptor_list(&[]), vec![0x90]);
}

// ---- hand-built descriptors ----------------------------------------------------------------

fn s(v: &str) -> Value {
    Value::from(v)
}

fn meta_value(extra: Option<(&str, Value)>) -> Value {
    let mut m = vec![
        (s("dtype"), s("bfloat16")),
        (
            s("shape"),
            Value::Array(vec![4.into(), 16.into(), 2.into(), 16.into()]),
        ),
        (
            s("stride"),
            Value::Array(vec![512.into(), 32.into(), 16.into(), 1.into()]),
        ),
        (s("storage_offset"), 0.into()),
        (s("device_uuid"), s("cpu")),
    ];
    if let Some((k, v)) = extra {
        m.push((s(k), v));
    }
    Value::Map(m)
}

fn shm_desc(fields: Vec<(&str, Value)>) -> Value {
    Value::Map(fields.into_iter().map(|(k, v)| (s(k), v)).collect())
}

fn good_shm_fields() -> Vec<(&'static str, Value)> {
    vec![
        ("type", s("cpu_shm")),
        ("shm_name", s("/lmcache_kv_1234_0")),
        ("nbytes", 4096.into()),
        ("version", 1.into()),
        ("metadata", meta_value(None)),
    ]
}

fn list_of(descs: &[Value]) -> Vec<u8> {
    let items = descs
        .iter()
        .map(|d| {
            let mut data = Vec::new();
            rmpv::encode::write_value(&mut data, d).unwrap();
            Value::Ext(EXT_DEVICE_IPC_WRAPPER, data)
        })
        .collect();
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &Value::Array(items)).unwrap();
    out
}

fn with(
    mut fields: Vec<(&'static str, Value)>,
    key: &'static str,
    v: Option<Value>,
) -> Vec<(&'static str, Value)> {
    fields.retain(|(k, _)| *k != key);
    if let Some(v) = v {
        fields.push((key, v));
    }
    fields
}

#[test]
fn hand_built_cpu_shm_matches_the_capture() {
    let bytes = list_of(&[shm_desc(good_shm_fields())]);
    let captured = "91c78f0185a474797065a76370755f73686da873686d5f6e616d65b22f6c6d63616368655f6b765f313233345f30a66e6279746573cd1000a776657273696f6e01a86d6574616461746185a56474797065a862666c6f61743136a573686170659404100210a673747269646594cd0200201001ae73746f726167655f6f666673657400ab6465766963655f75756964a3637075";
    assert_eq!(hex::encode(&bytes), captured);
}

#[test]
fn key_order_does_not_matter() {
    let mut fields = good_shm_fields();
    fields.reverse();
    let descs = decode_descriptor_list(&list_of(&[shm_desc(fields)])).unwrap();
    assert_eq!(descs.len(), 1);
    assert_eq!(descs[0].kind(), "cpu_shm");
}

#[test]
fn malformed_descriptors_are_errors_naming_the_element() {
    let good = shm_desc(good_shm_fields());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // unknown field in the metadata (forbid_unknown_fields)
        (
            list_of(&[
                good.clone(),
                shm_desc(with(
                    good_shm_fields(),
                    "metadata",
                    Some(meta_value(Some(("extra", 1.into())))),
                )),
            ]),
            "kv_cache[1].metadata",
        ),
        // unknown field in the descriptor
        (
            list_of(&[shm_desc(with(good_shm_fields(), "extra", Some(1.into())))]),
            "unknown field \"extra\"",
        ),
        // missing field
        (
            list_of(&[shm_desc(with(good_shm_fields(), "nbytes", None))]),
            "missing field \"nbytes\"",
        ),
        // no tag
        (
            list_of(&[shm_desc(with(good_shm_fields(), "type", None))]),
            "no \"type\" tag",
        ),
        // version 2
        (
            list_of(&[shm_desc(with(good_shm_fields(), "version", Some(2.into())))]),
            "version: expected 1, got 2",
        ),
        // negative nbytes
        (
            list_of(&[shm_desc(with(
                good_shm_fields(),
                "nbytes",
                Some((-1).into()),
            ))]),
            "got -1",
        ),
        // view larger than the segment
        (
            list_of(&[shm_desc(with(
                good_shm_fields(),
                "nbytes",
                Some(4095.into()),
            ))]),
            "spans 4096 bytes",
        ),
        // shm_name as bin
        (
            list_of(&[shm_desc(with(
                good_shm_fields(),
                "shm_name",
                Some(Value::Binary(b"/x".to_vec())),
            ))]),
            "shm_name: expected a str, got bin",
        ),
        // not a map
        (list_of(&[Value::Array(vec![])]), "expected a map"),
        // unknown dtype
        (
            list_of(&[shm_desc(with(
                good_shm_fields(),
                "metadata",
                Some(Value::Map(vec![
                    (s("dtype"), s("float128")),
                    (s("shape"), Value::Array(vec![])),
                    (s("stride"), Value::Array(vec![])),
                    (s("storage_offset"), 0.into()),
                    (s("device_uuid"), s("cpu")),
                ])),
            ))]),
            "unknown dtype",
        ),
        // shape/stride rank mismatch
        (
            list_of(&[shm_desc(with(
                good_shm_fields(),
                "metadata",
                Some(Value::Map(vec![
                    (s("dtype"), s("uint8")),
                    (s("shape"), Value::Array(vec![2.into()])),
                    (s("stride"), Value::Array(vec![])),
                    (s("storage_offset"), 0.into()),
                    (s("device_uuid"), s("cpu")),
                ])),
            ))]),
            "shape has 1 dims but stride has 0",
        ),
    ];
    for (bytes, want) in cases {
        let e = reason(decode_descriptor_list(&bytes).unwrap_err());
        assert!(e.contains(want), "{e:?} should contain {want:?}");
        assert!(e.contains("kv_cache["), "{e:?} should name the element");
    }
}

#[test]
fn wrong_ext_type_and_framing() {
    let mut data = Vec::new();
    rmpv::encode::write_value(&mut data, &shm_desc(good_shm_fields())).unwrap();
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &Value::Array(vec![Value::Ext(2, data.clone())]))
        .unwrap();
    let e = reason(decode_descriptor_list(&bytes).unwrap_err());
    assert!(e.contains("ext type 2"), "{e}");
    // A plain map instead of an ext.
    let mut bytes = vec![0x91];
    bytes.extend(&data);
    assert!(reason(decode_descriptor_list(&bytes).unwrap_err()).contains("expected an ext value"));
    // Trailing bytes inside the ext data, and after the list.
    let mut padded = data.clone();
    padded.push(0xc0);
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &Value::Array(vec![Value::Ext(1, padded)])).unwrap();
    assert!(reason(decode_descriptor_list(&bytes).unwrap_err()).contains("trailing"));
    let mut bytes = list_of(&[shm_desc(good_shm_fields())]);
    bytes.push(0x00);
    assert!(reason(decode_descriptor_list(&bytes).unwrap_err()).contains("trailing"));
    // Truncated.
    let bytes = list_of(&[shm_desc(good_shm_fields())]);
    for n in 0..bytes.len() {
        assert!(
            decode_descriptor_list(&bytes[..n]).is_err(),
            "prefix of {n} bytes"
        );
    }
}

fn cuda_desc(handle: Vec<Value>) -> Value {
    Value::Map(vec![
        (s("type"), s("cuda")),
        (s("handle"), Value::Array(handle)),
        (s("version"), 1.into()),
        (s("metadata"), meta_value(None)),
    ])
}

fn handle(storage: Value, event: Value, sync: Value) -> Vec<Value> {
    vec![
        0.into(),
        storage,
        4096.into(),
        0.into(),
        Value::Nil,
        0.into(),
        event,
        sync,
    ]
}

#[test]
fn cuda_handle_variants() {
    let mut v3 = vec![3u8, b'c'];
    v3.extend(mem());
    let ok = |h| decode_descriptor_list(&list_of(&[cuda_desc(h)]));
    // bare, v3, nil sync flag (= false)
    assert!(ok(handle(
        Value::Binary(mem().to_vec()),
        Value::Nil,
        Value::Nil
    ))
    .is_ok());
    assert!(ok(handle(
        Value::Binary(v3.clone()),
        Value::Binary(ev().to_vec()),
        true.into()
    ))
    .is_ok());
    let err = |h| reason(ok(h).unwrap_err());
    // 'e' with the same length as a 'c' handle
    let mut e66 = v3.clone();
    e66[1] = b'e';
    assert!(err(handle(Value::Binary(e66), Value::Nil, false.into())).contains("expandable"));
    // unknown version
    let mut v9 = v3.clone();
    v9[0] = 9;
    assert!(err(handle(Value::Binary(v9), Value::Nil, false.into())).contains("got 66 bytes"));
    // wrong lengths
    assert!(
        err(handle(Value::Binary(vec![1; 65]), Value::Nil, false.into())).contains("got 65 bytes")
    );
    assert!(err(handle(Value::Nil, Value::Nil, false.into())).contains("is nil"));
    assert!(err(handle(
        Value::Binary(v3.clone()),
        Value::Binary(vec![0; 63]),
        true.into()
    ))
    .contains("handle[6]"));
    // sync required without an event
    assert!(err(handle(Value::Binary(v3.clone()), Value::Nil, true.into())).contains("handle[7]"));
    // 7 elements
    let mut short = handle(Value::Binary(v3.clone()), Value::Nil, false.into());
    short.pop();
    assert!(err(short).contains("array of 8"));
    // storage size smaller than the view
    let mut small = handle(Value::Binary(v3), Value::Nil, false.into());
    small[2] = 4095.into();
    assert!(err(small).contains("storage size"));
}

#[test]
fn tensor_metadata_byte_span_and_itemsize() {
    let m = |dtype: &str, shape: Vec<u64>, stride: Vec<u64>, off| TensorMetadata {
        dtype: dtype.into(),
        shape,
        stride,
        storage_offset: off,
        device_uuid: "cpu".into(),
    };
    assert_eq!(
        m("bfloat16", vec![4, 16, 2, 16], vec![512, 32, 16, 1], 0).byte_span(),
        Some(4096)
    );
    assert_eq!(
        m("bfloat16", vec![4, 16, 2, 16], vec![512, 32, 16, 1], 2048).byte_span(),
        Some(8192)
    );
    assert_eq!(m("float32", vec![], vec![], 3).byte_span(), Some(16));
    assert_eq!(
        m("float8_e4m3fn", vec![0, 5], vec![5, 1], 9).byte_span(),
        Some(0)
    );
    assert_eq!(m("float16", vec![2], vec![1, 1], 0).byte_span(), None);
    assert_eq!(m("nope", vec![2], vec![1], 0).byte_span(), None);
    assert_eq!(m("int64", vec![u64::MAX], vec![2], 0).byte_span(), None);
    assert_eq!(m("uint8", vec![3], vec![1], 0).numel(), Some(3));
    for (dtype, size) in [
        ("bfloat16", 2),
        ("float16", 2),
        ("float32", 4),
        ("float8_e5m2", 1),
        ("int64", 8),
        ("uint8", 1),
    ] {
        assert_eq!(
            m(dtype, vec![], vec![], 0).itemsize(),
            Some(size),
            "{dtype}"
        );
    }
}
