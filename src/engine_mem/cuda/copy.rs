//! Enqueueing a transfer's copies on a stream: the copy engines only, no kernels. Runs come
//! from the same plan as the shm backend (`engine_mem::plan`), are coalesced where both sides are
//! contiguous, split at pinned-piece boundaries, then either handed to `cuMemcpyBatchAsync`
//! (driver 12.8+) in calls of at most `max_batch` copies, or issued one `cuMemcpy*Async` each.
//!
//! Batching is bounded and optional because real drivers misbehave with it: vLLM saw a
//! segfault at 51,828 descriptors in one call and hangs on repeated submission (Blackwell),
//! lmdeploy turned it off on sm_100, and on a device that cannot use registered host pointers
//! (attribute 91 = 0, seen on WSL2) a batch copy from pinned L1 is an illegal address that
//! kills the context. So: at most `MAX_BATCH` copies per call (`CWM_CUDA_MAX_BATCH` overrides);
//! a batch call that fails is re-issued as per-run copies (copies are idempotent: neither side
//! changes meanwhile) and the instance stops batching; `CWM_CUDA_COPY=per-run` turns batching
//! off everywhere; a device with attribute 91 = 0 never batches.

use std::sync::OnceLock;

use cudarc::driver::sys;

use super::driver::{check, Device, Driver};
use super::error::CudaError;

/// Most copies handed to one `cuMemcpyBatchAsync` call. A 256-token chunk of a 32-layer model
/// in vLLM's NHD layout is ~1k runs, so one call per chunk at most; far below the 51,828 at
/// which vLLM saw the driver crash. Not measured on a GPU yet (none was available): the
/// per-call cost is a few microseconds, so a lower cap costs little.
pub const MAX_BATCH: usize = 1024;
/// `per-run` forces one `cuMemcpy*Async` per run; `auto` (default) batches where it is safe.
pub const COPY_ENV: &str = "CWM_CUDA_COPY";
/// Overrides `MAX_BATCH` (a positive integer).
pub const MAX_BATCH_ENV: &str = "CWM_CUDA_MAX_BATCH";

/// The operator's switches, read once (a bad value is an error in the log and the default).
struct Switches {
    per_run: bool,
    max_batch: usize,
}

fn switches() -> &'static Switches {
    static S: OnceLock<Switches> = OnceLock::new();
    S.get_or_init(|| {
        let per_run = match std::env::var(COPY_ENV).as_deref() {
            Err(_) | Ok("auto") | Ok("") => false,
            Ok("per-run") => true,
            Ok(other) => {
                tracing::error!("{COPY_ENV}={other:?} is not `auto` or `per-run`: using auto");
                false
            }
        };
        let max_batch = match std::env::var(MAX_BATCH_ENV) {
            Err(_) => MAX_BATCH,
            Ok(v) => match v.parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => {
                    tracing::error!(
                        "{MAX_BATCH_ENV}={v:?} is not a positive integer: using {MAX_BATCH}"
                    );
                    MAX_BATCH
                }
            },
        };
        Switches { per_run, max_batch }
    })
}

/// How copies are enqueued on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// `cuMemcpyBatchAsync`, at most this many copies per call.
    Batch(usize),
    /// One `cuMemcpy*Async` per run, for this reason.
    PerRun(&'static str),
}

/// The batching decision for `device` under driver `drv` and the operator's switches.
pub fn batching(drv: &Driver, device: &Device) -> Batching {
    let s = switches();
    if !drv.has_batch_copy() {
        Batching::PerRun("driver older than 12.8")
    } else if s.per_run {
        Batching::PerRun("CWM_CUDA_COPY=per-run")
    } else if !device.host_pointer_for_registered_mem {
        Batching::PerRun("device cannot use host pointers for registered memory (attribute 91)")
    } else {
        Batching::Batch(s.max_batch)
    }
}

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

/// Enqueue every run on `stream`: in batches of at most `max_batch` when given, else (or once
/// a batch call failed) one call per run. `Ok(Some(error))`: a batch call failed and its runs
/// and all later ones were enqueued per run instead.
pub(super) fn enqueue(
    stream: sys::CUstream,
    dir: Direction,
    runs: &[Run],
    max_batch: Option<usize>,
) -> Result<Option<CudaError>, CudaError> {
    let Some(max) = max_batch else {
        return enqueue_runs(stream, dir, runs).map(|_| None);
    };
    for (i, batch) in runs.chunks(max.max(1)).enumerate() {
        if let Err(e) = enqueue_batch(stream, dir, batch) {
            // Copies of the failed call that did get enqueued copy the same bytes again.
            enqueue_runs(stream, dir, &runs[i * max.max(1)..])?;
            return Ok(Some(e));
        }
    }
    Ok(None)
}

/// One `cuMemcpy*Async` per run.
fn enqueue_runs(stream: sys::CUstream, dir: Direction, runs: &[Run]) -> Result<(), CudaError> {
    for r in runs {
        // SAFETY: `r.dev` lies inside an engine mapping and `r.host` inside an L1 object that
        // the caller keeps alive (and does not reuse) until the stream completed; `stream` is
        // this instance's live stream, its device's context current on this thread.
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

fn enqueue_batch(stream: sys::CUstream, dir: Direction, runs: &[Run]) -> Result<(), CudaError> {
    let host = runs.iter().map(|r| r.host as sys::CUdeviceptr);
    let dev = runs.iter().map(|r| r.dev);
    let (mut dsts, mut srcs): (Vec<sys::CUdeviceptr>, Vec<sys::CUdeviceptr>) = match dir {
        Direction::ToHost => (host.collect(), dev.collect()),
        Direction::ToDevice => (dev.collect(), host.collect()),
    };
    let mut sizes: Vec<usize> = runs.iter().map(|r| r.len).collect();
    // One attribute for all: the source is read in stream order (after the engine's event).
    // SAFETY: CUmemcpyAttributes is a plain C struct (enums, ints) for which all-zero bytes
    // are valid values; every field that matters is set below.
    let mut attr: sys::CUmemcpyAttributes = unsafe { std::mem::zeroed() };
    attr.srcAccessOrder = sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
    let mut attr_idx = 0usize;
    let mut fail = usize::MAX;
    // SAFETY: the three arrays hold `runs.len()` entries each and outlive the call, which
    // reads them before returning; one attribute applies from index 0 (attr_idx = 0,
    // numAttrs = 1); the addresses stay valid until the stream completed (see enqueue_runs).
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
    check(r, "cuMemcpyBatchAsync").map_err(|e| CudaError::BatchCopy {
        index: fail,
        source: Box::new(e),
    })
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

/// The GPU copy plan (the plan's runs, coalesced, split at pinned pieces) moves exactly the
/// bytes the shm backend's gather and scatter move, on the layouts engines register.
#[cfg(test)]
mod plan_tests {
    use super::super::pinned::split_at;
    use super::*;
    use crate::engine_mem::shm::{ShmKv, ShmSegment};
    use crate::engine_mem::{plan, EngineMemory};
    use connector_protocol::{IpcDescriptor, TensorMetadata};

    const NB: u64 = 12;
    const BS: u64 = 4;
    const NH: u64 = 3;
    const C: u64 = 8;

    /// (name, hint, shape, stride, elements per layer).
    type TestLayout = (&'static str, Option<&'static str>, Vec<u64>, Vec<u64>, u64);

    /// NHD, HND, two-major, FlashInfer (K/V second), and NHD with padded blocks (strides that are not the packed ones).
    fn layouts() -> Vec<TestLayout> {
        let nhd = vec![BS * NH * C, NH * C, C, 1];
        vec![
            (
                "nhd",
                Some("NHD"),
                vec![NB, BS, NH, C],
                nhd,
                NB * BS * NH * C,
            ),
            (
                "hnd",
                Some("HND"),
                vec![NB, NH, BS, C],
                vec![NH * BS * C, BS * C, C, 1],
                NB * BS * NH * C,
            ),
            (
                "two",
                None,
                vec![2, NB, BS, NH, C],
                vec![NB * BS * NH * C, BS * NH * C, NH * C, C, 1],
                2 * NB * BS * NH * C,
            ),
            (
                "flashinfer",
                None,
                vec![NB, 2, BS, NH, C],
                vec![2 * BS * NH * C, BS * NH * C, NH * C, C, 1],
                2 * NB * BS * NH * C,
            ),
            (
                "pad",
                Some("NHD"),
                vec![NB, BS, NH, C],
                vec![BS * NH * C + 16, NH * C, C, 1],
                NB * (BS * NH * C + 16),
            ),
        ]
    }

    /// Two layers of the layout in one segment, filled with a pattern.
    fn engine(tag: &str, t: &TestLayout) -> (ShmSegment, ShmKv) {
        let name = format!("/cwm_plan_{}_{tag}", std::process::id());
        let seg = ShmSegment::create(&name, 2 * t.4 * 2).unwrap();
        let n = seg.len() as usize;
        // SAFETY: the segment was just created by this test, `n` bytes long, mapped until
        // `seg` drops, and nothing else maps it yet.
        let bytes = unsafe { std::slice::from_raw_parts_mut(seg.as_mut_ptr(), n) };
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i * 31 % 253) as u8;
        }
        let d: Vec<IpcDescriptor> = (0..2)
            .map(|l| IpcDescriptor::CpuShm {
                shm_name: name.clone(),
                nbytes: seg.len(),
                metadata: TensorMetadata {
                    dtype: "bfloat16".into(),
                    shape: t.2.clone(),
                    stride: t.3.clone(),
                    storage_offset: l * t.4,
                    device_uuid: "cpu".into(),
                },
            })
            .collect();
        let kv = ShmKv::open(&d, t.1).unwrap();
        (seg, kv)
    }

    /// Run the GPU plan of one chunk with memcpy (engine addresses are host addresses here),
    /// pinned pieces of `piece` bytes from the object's start.
    fn run_plan(
        kv: &ShmKv,
        seg: &ShmSegment,
        blocks: &[u32],
        skip: Option<usize>,
        object: *mut u8,
        piece: usize,
    ) {
        let l = kv.layout();
        let mut runs = vec![];
        for (plane, layer, off) in plan::sections(l, blocks.len() as u64 * BS) {
            let wanted = |j: usize, b: u32| skip.is_none_or(|s| j >= s && b != 0);
            plan::for_each_run(
                l,
                seg.as_mut_ptr() as usize,
                plane,
                layer,
                blocks,
                wanted,
                |e, o, n| {
                    runs.push(Run {
                        dev: e as u64,
                        host: object as usize + off + o,
                        len: n,
                    })
                },
            );
        }
        coalesce(&mut runs);
        for r in runs {
            split_at(
                object as usize,
                piece,
                r.host,
                r.len,
                // SAFETY: the plan's runs lie inside the segment (engine side, a live mapping)
                // and the object (`n` bytes, alive for the call); they are different
                // allocations, so the ranges do not overlap.
                &mut |off, host, len| unsafe {
                    let dev = (r.dev as usize + off) as *mut u8;
                    match skip {
                        None => std::ptr::copy_nonoverlapping(dev, host as *mut u8, len),
                        Some(_) => std::ptr::copy_nonoverlapping(host as *const u8, dev, len),
                    }
                },
            );
        }
    }

    #[test]
    fn gpu_plan_moves_the_bytes_gather_and_scatter_move() {
        for t in layouts() {
            let (seg_a, kv) = engine(&format!("{}_a", t.0), &t);
            let (seg_b, kv_b) = engine(&format!("{}_b", t.0), &t);
            let blocks: Vec<u32> = vec![7, 0, 3, 11];
            let chunk = BS * blocks.len() as u64;
            let l = kv.layout();
            let n = l.object_bytes(chunk) as usize;
            // Store: the shm gather and the GPU plan fill an object identically.
            let (mut want, mut got) = (vec![0u8; n], vec![0u8; n]);
            for (plane, layer, off) in plan::sections(l, chunk) {
                // SAFETY: `want` is `object_bytes(chunk)` long and each section, from `off`,
                // fits inside it (the plan's sections tile the object).
                unsafe { kv.gather_section(plane, layer, &blocks, want.as_mut_ptr().add(off)) };
            }
            // Pieces of 100 bytes: runs cross piece boundaries.
            run_plan(&kv, &seg_a, &blocks, None, got.as_mut_ptr(), 100);
            assert_eq!(want, got, "{}: gather", t.0);
            // Retrieve with a skip and a null block: both write the same engine bytes.
            let mut obj: Vec<u8> = (0..n).map(|i| (i % 249) as u8 ^ 0x5a).collect();
            for (plane, layer, off) in plan::sections(l, chunk) {
                // SAFETY: as for the gather: `obj` is one whole object, each section inside it.
                unsafe { kv.scatter_section(plane, layer, &blocks, 2, obj.as_ptr().add(off)) };
            }
            run_plan(&kv_b, &seg_b, &blocks, Some(2), obj.as_mut_ptr(), 64);
            let bytes = |s: &ShmSegment| {
                // SAFETY: the segment is mapped for `len()` bytes while `s` lives, and no copy
                // writes it any more.
                unsafe { std::slice::from_raw_parts(s.as_mut_ptr(), s.len() as usize) }.to_vec()
            };
            assert_eq!(bytes(&seg_a), bytes(&seg_b), "{}: scatter", t.0);
        }
    }
}
