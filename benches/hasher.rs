//! TokenHasher: the chunk-hash chain every store, retrieve and lookup computes.

use std::hint::black_box;

use connector_protocol::TokenHasher;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn chunk_hashes(c: &mut Criterion) {
    let hasher = TokenHasher::new(256);
    let mut g = c.benchmark_group("chunk_hashes");
    for tokens in [4096usize, 131_072] {
        let ids: Vec<u32> = (0..tokens as u32)
            .map(|t| t.wrapping_mul(2_654_435_761) % 128_256)
            .collect();
        g.throughput(Throughput::Elements(tokens as u64));
        g.bench_with_input(BenchmarkId::from_parameter(tokens), &ids, |b, ids| {
            b.iter(|| hasher.chunk_hashes(black_box(ids), 0, ids.len()))
        });
    }
    g.finish();
}

criterion_group!(benches, chunk_hashes);
criterion_main!(benches);
