//! L2 throughput: write-behind (parallel compression + append) and thaw-style parallel
//! read + verify + decompress of many chunks, on KV-like bf16 data in a temp directory.
//! Compare with `memcpy` and the disk numbers in docs/COMPRESSION.md.

use std::sync::Arc;

use connector_protocol::{ChunkHash, ObjectKey};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cwm::sample::Rng;
use cwm::store::codec::CompressionPolicy;
use cwm::store::disk::storage::FsStorage;
use cwm::store::disk::{DiskConfig, DiskStore, FsyncPolicy};
use cwm::store::record;
use rayon::prelude::*;

const CHUNKS: usize = 16;
const CHUNK_BYTES: usize = 8 << 20;

/// bf16 values shaped like attention KV: per-channel slow sinusoids plus noise.
fn kv_like(seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut out = Vec::with_capacity(CHUNK_BYTES);
    for i in 0..CHUNK_BYTES / 2 {
        let channel = (i % 128) as f32;
        let token = (i / 128) as f32;
        let noise = ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2;
        let v = (token * 0.01 + channel).sin() * (1.0 + channel / 64.0) + noise;
        out.extend_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
    }
    out
}

fn key(n: usize) -> ObjectKey {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&(n as u64).to_le_bytes());
    ObjectKey {
        model: "bench".into(),
        kv_rank: 0x0100_0100,
        object_group: 0,
        chunk_hash: ChunkHash(h),
        cache_salt: "".into(),
    }
}

fn open(dir: &std::path::Path, policy: CompressionPolicy) -> DiskStore<FsStorage> {
    let config = DiskConfig {
        capacity_bytes: 1 << 40,
        segment_bytes: 256 << 20,
        fsync: FsyncPolicy::Never,
        compression: policy,
    };
    DiskStore::open(FsStorage::open(dir).unwrap(), config).unwrap()
}

fn bench(c: &mut Criterion) {
    let data: Vec<Vec<u8>> = (0..CHUNKS).map(|i| kv_like(i as u64 + 1)).collect();
    let total = (CHUNKS * CHUNK_BYTES) as u64;
    for (name, policy) in [
        (
            "zstd1",
            CompressionPolicy {
                enabled: true,
                level: 1,
            },
        ),
        (
            "raw",
            CompressionPolicy {
                enabled: false,
                level: 1,
            },
        ),
    ] {
        let mut g = c.benchmark_group(format!("l2_{name}"));
        g.sample_size(10).throughput(Throughput::Bytes(total));
        // Write-behind: compress a batch on the pool, append in order.
        g.bench_function("write_behind", |b| {
            b.iter_batched(
                || tempfile::tempdir().unwrap(),
                |dir| {
                    let disk = open(dir.path(), policy);
                    let records: Vec<_> = data
                        .par_iter()
                        .enumerate()
                        .map(|(i, raw)| record::encode(&key(i), raw, 2, policy))
                        .collect();
                    for (i, record) in records.iter().enumerate() {
                        disk.append_record(&key(i), record).unwrap();
                    }
                    dir
                },
                criterion::BatchSize::PerIteration,
            )
        });
        // Thaw: read + verify + decompress every chunk, in parallel (page cache warm).
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(open(dir.path(), policy));
        for (i, raw) in data.iter().enumerate() {
            disk.write(&key(i), raw, 2).unwrap();
        }
        let stats = disk.occupancy();
        eprintln!(
            "{name}: {} chunks of {} MiB stored in {} bytes (ratio {:.3})",
            CHUNKS,
            CHUNK_BYTES >> 20,
            stats.used_bytes,
            stats.used_bytes as f64 / total as f64
        );
        let mut outs: Vec<Vec<u8>> = (0..CHUNKS).map(|_| vec![0u8; CHUNK_BYTES]).collect();
        g.bench_function("read_parallel", |b| {
            b.iter(|| {
                outs.par_iter_mut().enumerate().for_each(|(i, out)| {
                    disk.read(&key(i), out).unwrap();
                });
            })
        });
        assert_eq!(outs[3], data[3], "thaw must be byte-exact");
        g.finish();
    }
    // The memory bound for comparison: copying the same bytes.
    let mut g = c.benchmark_group("l2_memcpy");
    g.sample_size(10).throughput(Throughput::Bytes(total));
    let mut dst: Vec<Vec<u8>> = (0..CHUNKS).map(|_| vec![0u8; CHUNK_BYTES]).collect();
    g.bench_function("copy_parallel", |b| {
        b.iter(|| {
            dst.par_iter_mut()
                .zip(&data)
                .for_each(|(d, s)| d.copy_from_slice(s))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
