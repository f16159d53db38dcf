//! Engine-driven transfers: are the pool's slots the L1 objects themselves (zero copy), or
//! staging buffers copied into private L1 memory? A timed run, `cargo bench --bench
//! engine_driven [-- ROUNDS]`; docs/ENGINE_DRIVEN.md records the results.
//!
//! - `store`: one chunk from the engine into L1. `zero_copy`: the engine writes the L1 object in
//!   the shared pool. `staging`: the engine writes a shared staging slot and cwm copies it into
//!   an object in private (anonymous, THP-advised) memory at commit. `engine_into_private` is
//!   the engine's copy alone into private memory: what shared memory costs a plain copy.
//! - `retrieve`: the reverse: the engine reads the object, or cwm first copies the object into
//!   a staging slot and the engine reads that.
//! - `gather_hnd`: what the shared pool costs the other mode: lmcache_driven `store`'s strided
//!   gather (vLLM's CPU HND layout, 256-byte rows) into an object in shared vs private memory.
//! - `first_touch`: a cold pool, 256 MiB written for the first time: page faults and zeroing,
//!   and for the shared pool the `fallocate` that backs it.
//!
//! Variants are interleaved round by round (in rotating order) and reported as min and median,
//! so a noisy machine shifts both sides alike. Every copy is single-threaded.
//!
//! `CWM_BENCH_SHM_DIR=/some/tmpfs` puts the shared memory there instead of /dev/shm, e.g. a
//! tmpfs mounted with `huge=always` to see what huge pages change.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::{Duration, Instant};

use connector_protocol::{ChunkHash, ObjectKey};
use cwm::store::arena::{Arena, Extent};
use cwm::store::{L1Config, L1Store, Reservation};

/// One 256-token chunk of a tiny CPU Llama (8 KiB of KV per token) and of Llama-3.1-8B
/// (128 KiB per token).
const SIZES: [(&str, usize); 2] = [("2MiB", 2 << 20), ("32MiB", 32 << 20)];

fn key(n: u64) -> ObjectKey {
    let mut hash = [0u8; 32];
    hash[..8].copy_from_slice(&n.to_le_bytes());
    ObjectKey {
        model: "bench".into(),
        kv_rank: 0x0100_0100,
        object_group: 0,
        chunk_hash: ChunkHash(hash),
        cache_salt: "".into(),
    }
}

fn config(bytes: u64) -> L1Config {
    L1Config {
        capacity_bytes: bytes,
        lock_ttl: Duration::from_secs(300),
    }
}

fn put(s: &Arc<L1Store>, n: u64, src: &[u8]) {
    match s.reserve(&key(n), src.len() as u64) {
        Reservation::Reserved(mut w) => {
            w.copy_from_slice(src);
            w.commit();
        }
        _ => panic!("no space"),
    }
}

/// L1 of 4 objects of `len` bytes, every page used once (steady state: freed objects' pages
/// are reused warm). Keys `u64::MAX - i` are the warm objects.
fn warm_store(shared: bool, len: usize) -> Arc<L1Store> {
    let c = config(4 * len as u64);
    let s = if shared {
        L1Store::with_arena(shared_arena(c.capacity_bytes), &c)
    } else {
        L1Store::new(&c).unwrap()
    };
    for i in 0..4 {
        put(&s, u64::MAX - i, &vec![1u8; len]);
    }
    s
}

fn shared_arena(len: u64) -> Arena {
    match std::env::var_os("CWM_BENCH_SHM_DIR") {
        Some(dir) => Arena::shared_in(std::path::Path::new(&dir), None, len),
        None => Arena::shared(None, len),
    }
    .unwrap()
}

/// A warm shared-memory staging slot of `len` bytes.
fn staging(len: usize) -> (Arena, *mut u8) {
    let arena = shared_arena(len as u64);
    let extent = Extent {
        offset: 0,
        len: arena.len(),
    };
    arena.ensure_backed(extent).unwrap();
    let p = arena.ptr(extent);
    // SAFETY: the arena is at least `len` bytes, backed just above, and the caller keeps it.
    unsafe { std::ptr::write_bytes(p, 1, len) };
    (arena, p)
}

fn minor_faults() -> i64 {
    // SAFETY: rusage is a C struct of integers and timevals: all-zero is a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a live rusage the call fills.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_minflt
}

/// Run every variant `rounds` times, interleaved; print min and median per variant.
fn compare(title: &str, bytes: usize, rounds: usize, variants: &mut [(&str, &mut dyn FnMut())]) {
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
    for round in 0..rounds {
        for i in 0..variants.len() {
            let v = (i + round) % variants.len();
            let t = Instant::now();
            (variants[v].1)();
            times[v].push(t.elapsed());
        }
    }
    for ((name, _), t) in variants.iter().zip(&mut times) {
        t.sort();
        let (min, med) = (t[0], t[t.len() / 2]);
        let gibs = |d: Duration| bytes as f64 / d.as_secs_f64() / (1u64 << 30) as f64;
        println!(
            "{title:<22} {name:<20} min {:>9.3} ms ({:>5.1} GiB/s)   median {:>9.3} ms ({:>5.1} GiB/s)",
            min.as_secs_f64() * 1e3,
            gibs(min),
            med.as_secs_f64() * 1e3,
            gibs(med)
        );
    }
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(40);
    for (size, len) in SIZES {
        let (private, shared) = (warm_store(false, len), warm_store(true, len));
        let (_stage_arena, stage) = staging(len);
        let engine = vec![0x5au8; len];
        let counter = Cell::new(0u64);
        let next = || {
            counter.set(counter.get() + 1);
            counter.get()
        };
        let (p, s) = (&private, &shared);
        compare(
            &format!("store/{size}"),
            len,
            rounds,
            &mut [
                ("zero_copy", &mut || put(s, next(), &engine)),
                ("staging", &mut || {
                    // SAFETY: `stage` is the `len`-byte slot `staging` made, alive for the
                    // loop; `engine` is a separate `len`-byte buffer.
                    unsafe { std::ptr::copy_nonoverlapping(engine.as_ptr(), stage, len) };
                    // SAFETY: the same slot, just written, not written again while borrowed.
                    let staged = unsafe { std::slice::from_raw_parts(stage, len) };
                    put(p, next(), staged)
                }),
                ("engine_into_private", &mut || put(p, next(), &engine)),
            ],
        );

        let (private, shared) = (warm_store(false, len), warm_store(true, len));
        let k = key(u64::MAX);
        let out = RefCell::new(vec![0u8; len]);
        compare(
            &format!("retrieve/{size}"),
            len,
            rounds,
            &mut [
                ("zero_copy", &mut || {
                    let r = shared.read(&k).unwrap();
                    r.copy_to(&mut out.borrow_mut());
                }),
                ("staging", &mut || {
                    let r = private.read(&k).unwrap();
                    // SAFETY: `r` pins a `len`-byte object; `stage` is the separate `len`-byte
                    // staging slot.
                    unsafe { std::ptr::copy_nonoverlapping(r.as_ptr(), stage, len) };
                    drop(r);
                    // SAFETY: the staging slot, just written, alive for the loop.
                    let staged = unsafe { std::slice::from_raw_parts(stage, len) };
                    out.borrow_mut().copy_from_slice(staged);
                }),
            ],
        );

        // lmcache_driven store from an HND cache [blocks, 8 heads, 32 tokens, 256 bytes]: the
        // chunk's blocks every 4th block of a 4x larger cache; rows land token-major.
        let (private, shared) = (warm_store(false, len), warm_store(true, len));
        let (row, heads, bs) = (256usize, 8usize, 32usize);
        let cache = vec![3u8; 4 * len];
        let gather = |s: &Arc<L1Store>, n: u64| {
            let Reservation::Reserved(w) = s.reserve(&key(n), len as u64) else {
                panic!("no space")
            };
            let obj = w.as_mut_ptr();
            for r in 0..len / row {
                let (tok, head) = (r / heads, r % heads);
                let (block, t) = (4 * (tok / bs), tok % bs);
                let src = ((block * heads + head) * bs + t) * row;
                // SAFETY: row `r` lies inside the reserved object of `len` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        cache[src..src + row].as_ptr(),
                        obj.add(r * row),
                        row,
                    )
                }
            }
            w.commit()
        };
        compare(
            &format!("gather_hnd/{size}"),
            len,
            rounds,
            &mut [
                ("private", &mut || gather(&private, next())),
                ("shared", &mut || gather(&shared, next())),
            ],
        );
    }

    // First touch: fresh arenas every round.
    let len: u64 = 256 << 20;
    let src = vec![7u8; 32 << 20];
    let fill = |arena: &Arena| {
        for off in (0..len).step_by(src.len()) {
            let e = Extent {
                offset: off,
                len: src.len() as u64,
            };
            arena.ensure_backed(e).unwrap();
            // SAFETY: extent `e` is `src.len()` bytes inside the arena, backed just above.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), arena.ptr(e), src.len()) };
        }
    };
    let faults = RefCell::new([0i64; 2]);
    let touch = |shared: bool| {
        let arena = if shared {
            shared_arena(len)
        } else {
            Arena::new(len).unwrap()
        };
        let before = minor_faults();
        fill(&arena);
        faults.borrow_mut()[shared as usize] = minor_faults() - before;
    };
    compare(
        "first_touch/256MiB",
        len as usize,
        (rounds / 4).max(3),
        &mut [
            ("private", &mut || touch(false)),
            ("shared", &mut || touch(true)),
        ],
    );
    let f = faults.borrow();
    println!(
        "first_touch/256MiB     minor faults: private {}, shared {}",
        f[0], f[1]
    );
}
