//! The yardstick: how fast this machine copies the same number of bytes with a plain `memcpy`,
//! on one thread and on every thread of the copy pool, between two pre-faulted buffers.
//!
//! The bench measures it before the protocol rounds and again between them, so on a shared
//! machine the baseline sees the same neighbours as the rounds it is compared with.

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

/// Two buffers of the bench's byte count and the copy times measured so far.
pub struct Baseline {
    src: Vec<u8>,
    dst: Vec<u8>,
    single: Vec<Duration>,
    multi: Vec<Duration>,
}

impl Baseline {
    pub fn new(bytes: usize) -> Baseline {
        // Non-zero fills commit every page now, so no copy below pays for a page fault.
        Baseline {
            src: vec![0x5a; bytes],
            dst: vec![0xa5; bytes],
            single: Vec::new(),
            multi: Vec::new(),
        }
    }

    /// One copy on this thread, then one across the rayon pool (the pool the server uses).
    pub fn measure(&mut self) {
        let (src, dst) = (&self.src, &mut self.dst);
        self.single.push(timed(|| dst.copy_from_slice(src)));
        std::hint::black_box(&mut *dst);
        self.multi.push(timed(|| {
            dst.par_chunks_mut(PIECE)
                .zip(src.par_chunks(PIECE))
                .for_each(|(d, s)| d.copy_from_slice(s))
        }));
        std::hint::black_box(&mut *dst);
    }

    pub fn results(self) -> MemcpyResults {
        assert!(self.dst == self.src, "memcpy baseline copied wrong bytes");
        MemcpyResults {
            bytes: self.src.len() as u64,
            single_thread: Samples::new(self.single),
            threads: rayon::current_num_threads(),
            multi_thread: Samples::new(self.multi),
        }
    }
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}
