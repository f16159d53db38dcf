//! L1 bookkeeping: what the store adds around the bytes it copies.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use connector_protocol::{ChunkHash, ObjectKey};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cwm::store::{L1Config, L1Store, Reservation};

const OBJECT: u64 = 32 << 20;

fn key(n: u64, rank: u32) -> ObjectKey {
    let mut hash = [0u8; 32];
    hash[..8].copy_from_slice(&n.to_le_bytes());
    ObjectKey {
        model: "bench/llama-3.1-8b".into(),
        kv_rank: rank,
        object_group: 0,
        chunk_hash: ChunkHash(hash),
        cache_salt: "".into(),
    }
}

fn store(objects: u64) -> Arc<L1Store> {
    L1Store::new(&L1Config {
        capacity_bytes: objects * OBJECT,
        lock_ttl: Duration::from_secs(300),
    })
    .expect("reserve the arena")
}

fn reserve_commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("l1");
    // 64 slots of 32 MiB, never written: steady state evicts the LRU object per reserve.
    let s = store(64);
    let mut n = 0u64;
    g.bench_function("reserve_commit_32MiB_bookkeeping", |b| {
        b.iter(|| {
            n += 1;
            match s.reserve(&key(n, 0), OBJECT) {
                Reservation::Reserved(w) => w.commit(),
                _ => panic!("no space"),
            }
        })
    });

    // The same with the object's bytes written: what a store costs at most per object.
    let s = store(4);
    let src = vec![0x5au8; OBJECT as usize];
    g.throughput(Throughput::Bytes(OBJECT));
    g.bench_function("reserve_write_commit_32MiB", |b| {
        b.iter(|| {
            n += 1;
            match s.reserve(&key(n, 0), OBJECT) {
                Reservation::Reserved(mut w) => {
                    w.copy_from_slice(&src);
                    w.commit()
                }
                _ => panic!("no space"),
            }
        })
    });
    g.throughput(Throughput::Elements(1));
    let k = key(n, 0);
    g.bench_function("read_pin_unpin", |b| {
        b.iter(|| black_box(s.read(&k).expect("present").len()))
    });
    g.finish();
}

fn lock_prefix(c: &mut Criterion) {
    let mut g = c.benchmark_group("l1_lock_prefix");
    for ranks in [1u32, 8] {
        let s = store(16 * ranks as u64 + 1);
        let chunks: Vec<Vec<ObjectKey>> = (0..16)
            .map(|n| (0..ranks).map(|r| key(n, r)).collect())
            .collect();
        for k in chunks.iter().flatten() {
            match s.reserve(k, 4096) {
                Reservation::Reserved(w) => w.commit(),
                _ => panic!("no space"),
            }
        }
        g.bench_function(format!("16_chunks_x_{ranks}_ranks_lock_unlock"), |b| {
            b.iter(|| {
                assert_eq!(s.lock_prefix(black_box(&chunks), 1), 16);
                s.unlock(chunks.iter().flatten(), 1);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, reserve_commit, lock_prefix);
criterion_main!(benches);
