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
pub(super) fn enqueue(
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

/// The GPU copy plan (the shm path's runs, coalesced, split at pinned pieces) moves exactly the
/// bytes the shm path's gather and scatter move, on the layouts engines register.
#[cfg(test)]
mod plan_tests {
    use super::super::pinned::split_at;
    use super::*;
    use crate::engine_mem::shm::ShmSegment;
    use crate::engine_mem::{EngineKv, SectionCopy};
    use connector_protocol::{IpcDescriptor, TensorMetadata};

    const NB: u64 = 12;
    const BS: u64 = 4;
    const NH: u64 = 3;
    const C: u64 = 8;

    /// (name, hint, shape, stride) of one layer's view: NHD, HND, two-major, and NHD with
    /// padded blocks (a stride the engine sends that is not the packed one).
    /// (name, hint, shape, stride, elements per layer).
    type TestLayout = (&'static str, Option<&'static str>, Vec<u64>, Vec<u64>, u64);

    fn layouts() -> Vec<TestLayout> {
        vec![
            (
                "nhd",
                Some("NHD"),
                vec![NB, BS, NH, C],
                vec![BS * NH * C, NH * C, C, 1],
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
                "pad",
                Some("NHD"),
                vec![NB, BS, NH, C],
                vec![BS * NH * C + 16, NH * C, C, 1],
                NB * (BS * NH * C + 16),
            ),
        ]
    }

    fn engine(
        tag: &str,
        hint: Option<&str>,
        shape: &[u64],
        stride: &[u64],
        layer: u64,
    ) -> (ShmSegment, EngineKv) {
        let name = format!("/cwm_plan_{}_{tag}", std::process::id());
        let seg = ShmSegment::create(&name, 2 * layer * 2).unwrap();
        let bytes = unsafe { std::slice::from_raw_parts_mut(seg.as_mut_ptr(), seg.len() as usize) };
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i * 31 % 253) as u8;
        }
        let d: Vec<IpcDescriptor> = (0..2)
            .map(|l| IpcDescriptor::CpuShm {
                shm_name: name.clone(),
                nbytes: seg.len(),
                metadata: TensorMetadata {
                    dtype: "bfloat16".into(),
                    shape: shape.to_vec(),
                    stride: stride.to_vec(),
                    storage_offset: l * layer,
                    device_uuid: "cpu".into(),
                },
            })
            .collect();
        let kv = EngineKv::open(&d, hint).unwrap();
        (seg, kv)
    }

    /// Execute the GPU plan of `sections` with memcpy (engine addresses are host addresses
    /// here), pieces of `piece` bytes from `base`.
    fn run_plan(
        kv: &EngineKv,
        sections: &[SectionCopy],
        dir: Direction,
        base: usize,
        piece: usize,
    ) {
        let mut runs = vec![];
        for s in sections {
            kv.runs(s, dir == Direction::ToDevice, &mut runs);
        }
        let before = runs.len();
        coalesce(&mut runs);
        assert!(runs.len() <= before);
        for r in runs {
            split_at(base, piece, r.host, r.len, &mut |off, host, len| unsafe {
                let dev = (r.dev as usize + off) as *mut u8;
                match dir {
                    Direction::ToHost => std::ptr::copy_nonoverlapping(dev, host as *mut u8, len),
                    Direction::ToDevice => {
                        std::ptr::copy_nonoverlapping(host as *const u8, dev, len)
                    }
                }
            });
        }
    }

    fn sections<'a>(
        kv: &EngineKv,
        blocks: &'a [u32],
        skip: usize,
        object: *mut u8,
        chunk: u64,
    ) -> Vec<SectionCopy<'a>> {
        let l = &kv.layout;
        (0..l.planes)
            .flat_map(|p| (0..l.num_layers).map(move |layer| (p, layer)))
            .map(|(plane, layer)| SectionCopy {
                plane,
                layer,
                blocks,
                skip_blocks: skip,
                object: unsafe { object.add(kv.section_offset(plane, layer, chunk)) },
            })
            .collect()
    }

    #[test]
    fn gpu_plan_moves_the_bytes_gather_and_scatter_move() {
        for (tag, hint, shape, stride, layer_elems) in layouts() {
            let (_a, kv) = engine(&format!("{tag}_a"), hint, &shape, &stride, layer_elems);
            let (_b, kv_gpu) = engine(&format!("{tag}_b"), hint, &shape, &stride, layer_elems);
            let blocks: Vec<u32> = vec![7, 0, 3, 11];
            let chunk = BS * blocks.len() as u64;
            let n = kv.layout.object_bytes(chunk) as usize;
            // Store: the shm gather and the GPU plan fill an object identically.
            let (mut want, mut got) = (vec![0u8; n], vec![0u8; n]);
            unsafe {
                let secs = sections(&kv, &blocks, 0, want.as_mut_ptr(), chunk);
                kv.copy_sections(Direction::ToHost, &secs, &[]).unwrap();
            }
            let secs = sections(&kv, &blocks, 0, got.as_mut_ptr(), chunk);
            // Pieces of 100 bytes: every run crosses boundaries.
            run_plan(&kv, &secs, Direction::ToHost, got.as_ptr() as usize, 100);
            assert_eq!(want, got, "{tag}: gather");
            // Retrieve with a skip and a null block: both write the same engine bytes.
            let obj: Vec<u8> = (0..n).map(|i| (i % 249) as u8 ^ 0x5a).collect();
            let mut obj2 = obj.clone();
            unsafe {
                let secs = sections(&kv, &blocks, 2, obj.as_ptr() as *mut u8, chunk);
                kv.copy_sections(Direction::ToDevice, &secs, &[]).unwrap();
            }
            let secs = sections(&kv_gpu, &blocks, 2, obj2.as_mut_ptr(), chunk);
            run_plan(
                &kv_gpu,
                &secs,
                Direction::ToDevice,
                obj2.as_ptr() as usize,
                64,
            );
            let bytes = |s: &ShmSegment| {
                unsafe { std::slice::from_raw_parts(s.as_mut_ptr(), s.len() as usize) }.to_vec()
            };
            assert_eq!(bytes(&_a), bytes(&_b), "{tag}: scatter");
        }
    }
}
