//! The server's share of a scheduler lookup, without the transport: decoding the
//! `IPCCacheServerKey` of a 4096-token request, and `Cwm::handle` of a whole `lookup`
//! (decode, hash chain, rank keys, read locks, session) plus `query_prefetch_status`.
//! `cwm bench` measures the same through ZMQ; the difference is the transport.

use std::hint::black_box;
use std::sync::Arc;

use connector_protocol::frame::{decode_incoming, Incoming};
use connector_protocol::{codec, IpcCacheServerKey, Op};
use criterion::{criterion_group, criterion_main, Criterion};
use cwm::bench::kv::{BenchKv, KvGeometry, KvShape};
use cwm::client::MpClient;
use cwm::config::Config;
use cwm::ops::Cwm;
use cwm::serve::Sidecar;

const TOKENS: u32 = 4096;

fn key(worker_id: Option<u32>) -> IpcCacheServerKey {
    IpcCacheServerKey {
        model_name: "bench/model".into(),
        world_size: 1,
        worker_id,
        token_ids: (0..TOKENS)
            .map(|t| t.wrapping_mul(2_654_435_761) % 128_256)
            .collect(),
        start: 0,
        end: TOKENS as u64,
        request_id: "bench-lookup".into(),
        cache_salt: String::new(),
        request_configs: None,
        num_kv_readers: 1,
    }
}

/// Answer one request the way the socket thread does, from its frames.
fn handle(cwm: &Arc<Cwm>, op: Op, payloads: &[Vec<u8>]) -> Option<Vec<u8>> {
    let uid = codec::encode_u64(1);
    let op_frame = op.to_frame();
    let mut frames: Vec<&[u8]> = vec![&uid, &op_frame];
    frames.extend(payloads.iter().map(Vec::as_slice));
    match decode_incoming(&frames).expect("well-formed") {
        Incoming::Request(req) => cwm.handle(&req),
        Incoming::Control { .. } => unreachable!("not a control frame"),
    }
}

fn lookup(c: &mut Criterion) {
    let sidecar = Sidecar::start(&Config {
        host: "127.0.0.1".into(),
        port: 0,
        l1_size_gb: 0.25,
        l2_size_gb: 0.0,
        ..Config::default()
    })
    .expect("sidecar");
    // A small model: the lookup's cost depends on the chunk count, not on the object size.
    let kv = BenchKv::create(
        "lookup",
        KvGeometry {
            shape: KvShape::Nhd,
            layers: 2,
            blocks: TOKENS as u64 / 16 + 1,
            block_size: 16,
            heads: 1,
            content: 16,
        },
    )
    .expect("shm");
    let mut client = MpClient::connect(&sidecar.mp_endpoint).expect("connect");
    client
        .register_kv_cache(
            1,
            &kv.descriptors(),
            "bench/model",
            1,
            Some("NHD"),
            &kv.groups(),
        )
        .expect("register");
    let blocks = vec![(1..=TOKENS / 16).collect::<Vec<u32>>()];
    assert!(client.store(&key(Some(0)), 1, &blocks).expect("store").ok);

    let lookup_key = key(None);
    let frame = codec::encode(&lookup_key);
    let mut g = c.benchmark_group("lookup_4096_tokens");
    g.bench_function("client_encode_key", |b| {
        b.iter(|| codec::encode(black_box(&lookup_key)))
    });
    g.bench_function("server_decode_key", |b| {
        b.iter(|| codec::decode::<IpcCacheServerKey>("key", black_box(&frame)).expect("decodes"))
    });
    let cwm = &sidecar.cwm;
    let lookup_payloads = [frame.clone(), codec::encode_u64(1)];
    let query_payloads = [codec::encode_str("bench-lookup")];
    let free_payloads = [frame.clone(), codec::encode_u64(1)];
    g.bench_function("server_handle_lookup_and_query", |b| {
        b.iter(|| {
            handle(cwm, Op::Lookup, &lookup_payloads);
            let hit = handle(cwm, Op::QueryPrefetchStatus, &query_payloads).expect("answer");
            assert_eq!(codec::decode_u64("hit", &hit).expect("u64"), 16);
            // Give the read locks back, untimed work a scheduler does too.
            handle(cwm, Op::FreeLookupLocks, &free_payloads);
        })
    });
    g.finish();
    drop(client);
    sidecar.stop();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
