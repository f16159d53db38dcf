//! Gather (store) and scatter (retrieve) of one 256-token chunk of a Llama-3.1-8B-like cache
//! (32 layers, 8 KV heads x 128, bf16, block 16) between engine shm and a 32 MiB object in the
//! L1 arena, for the NHD and HND layouts, on one thread and across the copy pool, next to a
//! plain memcpy of 32 MiB from the same shm into the same object.
//!
//! The object must be arena memory, not a `Vec`: glibc's `rep movsb` path is much slower on
//! some CPUs when source and destination are a few bytes apart modulo 4 KiB, which a malloc'd
//! buffer (16 bytes past a page) against page-aligned shm is (BENCHMARKS.md).

use std::hint::black_box;

use std::time::Duration;

use connector_protocol::{ChunkHash, ObjectKey};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cwm::bench::kv::{BenchKv, KvGeometry, KvShape};
use cwm::engine_mem::shm::ShmKv;
use cwm::engine_mem::EngineMemory;
use cwm::store::{L1Config, L1Store, Reservation};
use rayon::prelude::*;

const CHUNK: u64 = 256;

/// A raw object pointer shared by the tasks of one copy (each writes its own section).
#[derive(Clone, Copy)]
struct Object(*mut u8);
// SAFETY: the pointer is only offset and handed to the section copies, which write disjoint
// sections of an object that outlives the parallel loop.
unsafe impl Send for Object {}
// SAFETY: as for Send: shared references only compute section addresses.
unsafe impl Sync for Object {}

impl Object {
    fn at(self, offset: usize) -> *mut u8 {
        // SAFETY: callers pass section offsets, all inside the object.
        unsafe { self.0.add(offset) }
    }
}

fn transfer(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunk_32MiB");
    for shape in [KvShape::Nhd, KvShape::Hnd] {
        let geometry = KvGeometry {
            shape,
            layers: 32,
            blocks: 64,
            block_size: 16,
            heads: 8,
            content: 256,
        };
        let mut kv = BenchKv::create("criterion", geometry).expect("create shm");
        kv.fill_pattern(7);
        let engine = ShmKv::open(&kv.descriptors(), Some(shape.hint())).expect("open");
        // Blocks of one chunk, not adjacent, as a busy engine hands them out.
        let blocks: Vec<u32> = (0..16).map(|i| 3 + 3 * i).collect();
        engine.check_blocks(&blocks).expect("in range");
        let bytes = geometry.object_bytes(CHUNK);
        let l1 = L1Store::new(&L1Config {
            capacity_bytes: bytes,
            lock_ttl: Duration::from_secs(60),
        })
        .expect("arena");
        let key = ObjectKey {
            model: "bench".into(),
            kv_rank: 0,
            object_group: 0,
            chunk_hash: ChunkHash([0; 32]),
            cache_salt: "".into(),
        };
        let Reservation::Reserved(mut object) = l1.reserve(&key, bytes) else {
            panic!("no space for one object")
        };
        object.copy_from_slice(&vec![1; bytes as usize]);
        let obj = Object(object.as_mut_ptr());
        let layers = geometry.layers;
        let section = |l: u64| engine.section_offset(0, l, CHUNK);
        g.throughput(Throughput::Bytes(bytes));
        let name = format!("{shape:?}");
        g.bench_function(BenchmarkId::new("gather_1_thread", &name), |b| {
            b.iter(|| {
                for l in 0..layers {
                    // SAFETY: checked blocks; each section lies inside `object`.
                    unsafe { engine.gather_section(0, l, &blocks, obj.at(section(l))) }
                }
            })
        });
        g.bench_function(BenchmarkId::new("gather_pool", &name), |b| {
            b.iter(|| {
                (0..layers).into_par_iter().for_each(|l| {
                    // SAFETY: as above; one task per section.
                    unsafe { engine.gather_section(0, l, &blocks, obj.at(section(l))) }
                })
            })
        });
        g.bench_function(BenchmarkId::new("scatter_1_thread", &name), |b| {
            b.iter(|| {
                for l in 0..layers {
                    // SAFETY: checked blocks; sections read from `object`.
                    unsafe { engine.scatter_section(0, l, &blocks, 0, obj.at(section(l))) }
                }
            })
        });
        g.bench_function(BenchmarkId::new("scatter_pool", &name), |b| {
            b.iter(|| {
                (0..layers).into_par_iter().for_each(|l| {
                    // SAFETY: as above; tasks write disjoint engine rows.
                    unsafe { engine.scatter_section(0, l, &blocks, 0, obj.at(section(l))) }
                })
            })
        });
        let shm = black_box(kv.seg.as_mut_ptr());
        g.bench_function(BenchmarkId::new("memcpy_1_thread", &name), |b| {
            // SAFETY: the segment holds more than `bytes`; the object is `bytes` long.
            b.iter(|| unsafe { std::ptr::copy_nonoverlapping(shm, obj.0, bytes as usize) })
        });
        drop(object);
    }
    g.finish();
}

criterion_group!(benches, transfer);
criterion_main!(benches);
