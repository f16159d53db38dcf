//! Enqueueing a transfer's copies on a stream: the copy engines only, no kernels. Runs come
//! from the same plan as the shm path (`EngineKv::runs`), are coalesced where both sides are
//! contiguous, split at pinned-piece boundaries, then either handed to one
//! `cuMemcpyBatchAsync` (driver 12.8+) or issued one `cuMemcpy*Async` each.

use cudarc::driver::sys;

use super::driver::check;

/// One contiguous copy between engine (device) memory and a host address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub dev: u64,
    pub host: usize,
    pub len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Engine → L1 (store).
    ToHost,
    /// L1 → engine (retrieve).
    ToDevice,
}

/// Merge neighbours that continue each other on both sides (order kept).
pub fn coalesce(runs: &mut Vec<Run>) {
    let mut out: Vec<Run> = Vec::with_capacity(runs.len());
    for r in runs.drain(..) {
        match out.last_mut() {
            Some(last) if last.dev + last.len as u64 == r.dev && last.host + last.len == r.host => {
                last.len += r.len
            }
            _ => out.push(r),
        }
    }
    *runs = out;
}

/// Enqueue every run on `stream`.
pub fn enqueue(
    stream: sys::CUstream,
    dir: Direction,
    runs: &[Run],
    batch: bool,
) -> Result<(), String> {
    if runs.is_empty() {
        return Ok(());
    }
    if batch {
        return enqueue_batch(stream, dir, runs);
    }
    for r in runs {
        let res = unsafe {
            match dir {
                Direction::ToHost => {
                    sys::cuMemcpyDtoHAsync_v2(r.host as *mut _, r.dev, r.len, stream)
                }
                Direction::ToDevice => {
                    sys::cuMemcpyHtoDAsync_v2(r.dev, r.host as *const _, r.len, stream)
                }
            }
        };
        check(res, "cuMemcpyAsync")?;
    }
    Ok(())
}

fn enqueue_batch(stream: sys::CUstream, dir: Direction, runs: &[Run]) -> Result<(), String> {
    let host = runs.iter().map(|r| r.host as sys::CUdeviceptr);
    let dev = runs.iter().map(|r| r.dev);
    let (mut dsts, mut srcs): (Vec<sys::CUdeviceptr>, Vec<sys::CUdeviceptr>) = match dir {
        Direction::ToHost => (host.collect(), dev.collect()),
        Direction::ToDevice => (dev.collect(), host.collect()),
    };
    let mut sizes: Vec<usize> = runs.iter().map(|r| r.len).collect();
    // One attribute for all: the source is read in stream order (after the engine's event).
    let mut attr: sys::CUmemcpyAttributes = unsafe { std::mem::zeroed() };
    attr.srcAccessOrder = sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
    let mut attr_idx = 0usize;
    let mut fail = usize::MAX;
    let r = unsafe {
        sys::cuMemcpyBatchAsync(
            dsts.as_mut_ptr(),
            srcs.as_mut_ptr(),
            sizes.as_mut_ptr(),
            runs.len(),
            &mut attr,
            &mut attr_idx,
            1,
            &mut fail,
            stream,
        )
    };
    check(r, "cuMemcpyBatchAsync").map_err(|e| format!("{e} (copy {fail})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_only_runs_contiguous_on_both_sides() {
        let mut runs = vec![
            Run {
                dev: 0,
                host: 100,
                len: 10,
            },
            Run {
                dev: 10,
                host: 110,
                len: 10,
            },
            Run {
                dev: 20,
                host: 130,
                len: 10,
            },
            Run {
                dev: 40,
                host: 140,
                len: 10,
            },
        ];
        coalesce(&mut runs);
        assert_eq!(
            runs,
            vec![
                Run {
                    dev: 0,
                    host: 100,
                    len: 20
                },
                Run {
                    dev: 20,
                    host: 130,
                    len: 10
                },
                Run {
                    dev: 40,
                    host: 140,
                    len: 10
                },
            ]
        );
    }
}
