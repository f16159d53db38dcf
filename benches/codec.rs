//! L2 payload codecs on 32 MiB of 16-bit KV-like data: ratio, compress and decompress
//! throughput (single thread), and decompress on 2 threads over two independent 16 MiB halves.
//! Results and the defaults they led to: docs/COMPRESSION.md.
//!
//! `cargo bench -p cwm --bench codec`. Before criterion's timings it prints a summary table
//! with best-of-N throughputs, which hold up better than means on a shared, busy machine.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cwm::sample::{bf16, Rng};
use cwm::store::codec::{compress, decompress, Codec, CompressionPolicy};

const SIZE: usize = 32 << 20;

/// f32 → IEEE fp16, round to nearest (finite inputs; overflow → inf, tiny → subnormal or 0).
fn fp16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    let mant = b & 0x7f_ffff;
    if exp >= 31 {
        return sign | 0x7c00;
    }
    if exp <= 0 {
        if exp < -10 {
            return sign;
        }
        let m = mant | 0x80_0000;
        let shift = (14 - exp) as u32;
        let half = (m >> shift) + ((m >> (shift - 1)) & 1);
        return sign | half as u16;
    }
    let h = ((exp as u32) << 10) | (mant >> 13);
    sign | (h + ((mant >> 12) & 1)) as u16
}

fn to_bytes(values: impl Iterator<Item = u16>) -> Vec<u8> {
    let mut v: Vec<u8> = values.flat_map(u16::to_le_bytes).collect();
    v.truncate(SIZE);
    v
}

fn bf16_normal() -> Vec<u8> {
    cwm::sample::bf16_normal(SIZE, 0x9e37_79b9_7f4a_7c15)
}

fn fp16_normal() -> Vec<u8> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    to_bytes((0..SIZE / 2).map(|_| fp16(rng.normal())))
}

/// Activation-like bf16: token-major [tokens, 1024 channels], each channel a slowly varying
/// sinusoid with its own amplitude, frequency, phase and offset, plus small noise.
fn bf16_activations() -> Vec<u8> {
    const CHANNELS: usize = 1024;
    let mut rng = Rng(0xd1b5_4a32_d192_ed03);
    let params: Vec<[f64; 4]> = (0..CHANNELS)
        .map(|_| {
            [
                0.25 + 2.0 * rng.uniform(),            // amplitude
                0.001 + 0.05 * rng.uniform(),          // radians per token
                std::f64::consts::TAU * rng.uniform(), // phase
                rng.uniform() * 2.0 - 1.0,             // offset
            ]
        })
        .collect();
    let tokens = SIZE / 2 / CHANNELS;
    let mut values = Vec::with_capacity(SIZE / 2);
    for t in 0..tokens {
        for &[amp, freq, phase, offset] in &params {
            let x = amp * (freq * t as f64 + phase).sin() + offset;
            values.push(bf16(x as f32 + 0.02 * rng.normal()));
        }
    }
    to_bytes(values.into_iter())
}

fn random_bytes() -> Vec<u8> {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    (0..SIZE / 8)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect()
}

/// The variants measured: (name, itemsize passed to `compress`, policy). Itemsize 1 forces one
/// zstd frame; itemsize 2 takes the byte planes when they pay.
fn variants() -> Vec<(&'static str, usize, CompressionPolicy)> {
    let at = |level| CompressionPolicy {
        enabled: true,
        level,
    };
    vec![
        ("raw", 2, CompressionPolicy::DISABLED),
        ("zstd-1", 1, at(1)),
        ("zstd-3", 1, at(3)),
        ("planes-1", 2, at(1)),
        ("planes-3", 2, at(3)),
    ]
}

fn datasets() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("bf16-normal", bf16_normal()),
        ("bf16-activations", bf16_activations()),
        ("fp16-normal", fp16_normal()),
        ("random-bytes", random_bytes()),
    ]
}

/// GB/s of `SIZE` raw bytes for the fastest of `runs` runs of `f`.
fn best_gbps(runs: usize, mut f: impl FnMut()) -> f64 {
    let best = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min);
    SIZE as f64 / best / 1e9
}

fn two_threads() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("2-thread pool")
}

/// The table in docs/COMPRESSION.md.
fn summary(datasets: &[(&'static str, Vec<u8>)]) {
    let pool = two_threads();
    let mut dst = vec![0u8; SIZE];
    let src = &datasets[0].1;
    let memcpy = best_gbps(20, || dst.copy_from_slice(black_box(src)));
    println!("summary: memcpy 32 MiB: {memcpy:.2} GB/s (best of 20)");
    println!(
        "summary: | data | variant | codec | stored/raw | compress GB/s | decompress GB/s | \
         decompress 2 threads GB/s |"
    );
    for (data_name, raw) in datasets {
        let (lo_half, hi_half) = raw.split_at(SIZE / 2);
        for (variant, itemsize, policy) in variants() {
            let (codec, stored) = compress(raw, itemsize, policy);
            let halves = [
                compress(lo_half, itemsize, policy),
                compress(hi_half, itemsize, policy),
            ];
            let comp = best_gbps(5, || {
                black_box(compress(black_box(raw), itemsize, policy));
            });
            let decomp = best_gbps(20, || {
                decompress(codec, &stored, &mut dst).expect("decodes")
            });
            let (out_lo, out_hi) = dst.split_at_mut(SIZE / 2);
            let par = best_gbps(20, || {
                pool.install(|| {
                    rayon::join(|| decode(&halves[0], out_lo), || decode(&halves[1], out_hi))
                });
            });
            assert!(dst == *raw, "{data_name} {variant} round trip");
            println!(
                "summary: | {data_name} | {variant} | {codec:?} | {:.3} | {comp:.3} | {decomp:.2} | \
                 {par:.2} |",
                stored.len() as f64 / raw.len() as f64
            );
        }
    }
}

fn codecs(c: &mut Criterion) {
    let datasets = datasets();
    summary(&datasets);
    let pool = two_threads();

    let src = random_bytes();
    let mut dst = vec![0u8; SIZE];
    let mut g = c.benchmark_group("codec");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::BytesDecimal(SIZE as u64));
    g.bench_function("memcpy_32MiB", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src)))
    });

    for (data_name, raw) in &datasets {
        let (lo_half, hi_half) = raw.split_at(SIZE / 2);
        for (variant, itemsize, policy) in variants() {
            let id = |op: &str| BenchmarkId::new(format!("{data_name}/{op}"), variant);
            let (codec, stored) = compress(raw, itemsize, policy);
            let halves = [
                compress(lo_half, itemsize, policy),
                compress(hi_half, itemsize, policy),
            ];

            g.bench_function(id("compress"), |b| {
                b.iter(|| compress(black_box(raw), itemsize, policy))
            });
            g.bench_function(id("decompress"), |b| {
                b.iter(|| decompress(codec, black_box(&stored), &mut dst).expect("decodes"))
            });
            let (out_lo, out_hi) = dst.split_at_mut(SIZE / 2);
            g.bench_function(id("decompress_2threads"), |b| {
                b.iter(|| {
                    pool.install(|| {
                        rayon::join(|| decode(&halves[0], out_lo), || decode(&halves[1], out_hi))
                    })
                })
            });
            assert!(dst == *raw, "{data_name} {variant} round trip");
        }
    }
    g.finish();
}

fn decode((codec, stored): &(Codec, Vec<u8>), out: &mut [u8]) {
    decompress(*codec, black_box(stored), out).expect("decodes")
}

criterion_group!(benches, codecs);
criterion_main!(benches);
