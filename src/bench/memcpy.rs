//! The yardstick: how fast this machine copies the same number of bytes with a plain `memcpy`,
//! on one thread and on every thread of the copy pool, between two pre-faulted buffers.

use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::Samples;

/// Pieces the multi-threaded copy is cut into (work stealing balances them).
const PIECE: usize = 4 << 20;

#[derive(Debug, Clone, serde::Serialize)]
pub struct MemcpyResults {
    pub bytes: u64,
    pub single_thread: Samples,
    pub threads: usize,
    pub multi_thread: Samples,
}

/// Copy `bytes` between two buffers `repeats` times on one thread, then `repeats` times on
/// the rayon pool (the pool the server copies with).
pub fn run(bytes: usize, repeats: usize) -> MemcpyResults {
    // Non-zero fills commit every page now, so no copy below pays for a page fault.
    let src = vec![0x5au8; bytes];
    let mut dst = vec![0xa5u8; bytes];
    let mut single = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        single.push(timed(|| dst.copy_from_slice(&src)));
        std::hint::black_box(&mut dst);
    }
    let mut multi = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        multi.push(timed(|| {
            dst.par_chunks_mut(PIECE)
                .zip(src.par_chunks(PIECE))
                .for_each(|(d, s)| d.copy_from_slice(s))
        }));
        std::hint::black_box(&mut dst);
    }
    assert!(dst == src, "memcpy baseline copied wrong bytes");
    MemcpyResults {
        bytes: bytes as u64,
        single_thread: Samples::new(single),
        threads: rayon::current_num_threads(),
        multi_thread: Samples::new(multi),
    }
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}
