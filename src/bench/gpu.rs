//! The GPU figures of `cwm bench tiers`: cwm's own GPU transfer path next to the plain
//! `cuMemcpy` limit of the same bytes, on the first GPU the CUDA driver shows.
//!
//! - cwm's path is `CudaKv` (`engine_mem::cuda`), the code a store and a retrieve run: the
//!   copy plan of the engine's paged blocks, coalescing, pieces of pinned L1, the batched or
//!   per-run `cuMemcpy*Async` on the instance's stream, and the poll until it completed. D2H
//!   gathers every chunk of a run into L1 objects in one call (a store); H2D scatters them
//!   back into the blocks (a retrieve). Only where the blocks live differs from serving:
//!   device memory this process allocated (`CudaKv::in_allocation`) instead of an engine's
//!   allocation opened over IPC, which a process cannot open from itself.
//! - The limit is one synchronous `cuMemcpyDtoH` / `cuMemcpyHtoD` per chunk of the same
//!   bytes, contiguous, between the same device memory and pinned host memory.
//!
//! The blocks are those of the L1 figure's model (Llama-3.1-8B-like: 2 MiB per 16-token block
//! over all layers, NHD), a chunk being `--sizes-mib` rounded up to whole blocks, and each
//! chunk's blocks interleaved with the other chunks' as a paged cache scatters them. Every
//! byte moved is checked outside the timings: the objects a gather filled against the blocks,
//! the blocks a scatter wrote back, and the limit's copies likewise.
//!
//! The CUDA driver stand-in of the tests (`tests/cuda-sim/libcuda.c`) names its devices
//! "cwm cuda-sim GPU <n>": on it the figures time the stand-in's memcpy, not a GPU, and the
//! report says so (`Gpu::stand_in`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use connector_protocol::ObjectKey;

use super::kv::{BenchKv, KvGeometry};
use super::tiers::key;
use super::Samples;
use crate::engine_mem::cuda::driver::{self, Device};
use crate::engine_mem::cuda::{CudaError, CudaKv, DeviceAlloc, PinnedHost};
use crate::engine_mem::{EngineMemory, Gather, Scatter};
use crate::store::arena::Arena;
use crate::store::{L1Config, L1Store, ReadGuard, Reservation};

/// What the stand-in calls its devices (`cuDeviceGetName` in tests/cuda-sim/libcuda.c).
pub const STAND_IN_DEVICE: &str = "cwm cuda-sim GPU";

/// The GPU the figures ran on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Gpu {
    pub device: String,
    pub driver: String,
    /// The CUDA driver stand-in of the tests, not a GPU: its figures are no GPU numbers.
    pub stand_in: bool,
}

impl Gpu {
    /// What the report says of it.
    pub fn line(&self) -> String {
        let what = format!("{}, CUDA driver {}", self.device, self.driver);
        if self.stand_in {
            format!(
                "{what}: the CUDA driver stand-in (tests/cuda-sim), not a GPU: its figures time \
                 a test library's memcpy"
            )
        } else {
            what
        }
    }

    /// The tier name of its figures.
    pub fn tier(&self) -> &'static str {
        if self.stand_in {
            "GPU stand-in"
        } else {
            "GPU"
        }
    }
}

/// The first GPU the driver shows, or why there is none.
pub fn first_device() -> Result<(&'static Device, Gpu), CudaError> {
    let drv = driver::driver()?;
    let device = drv.devices.first().ok_or(CudaError::NoDevice)?;
    let gpu = Gpu {
        device: device.name.clone(),
        driver: driver::version_str(drv.version),
        stand_in: device.name.starts_with(STAND_IN_DEVICE),
    };
    Ok((device, gpu))
}

/// Runs of one chunk size: through cwm's path and the limit, `bytes` each.
pub struct GpuFigures {
    pub chunk_bytes: u64,
    pub bytes: u64,
    pub d2h: Samples,
    pub h2d: Samples,
    pub limit_d2h: Samples,
    pub limit_h2d: Samples,
    pub check: String,
}

/// `rounds` runs of moving about `round_bytes` in chunks of `chunk_mib` MiB of `model`'s
/// blocks from the GPU into L1 and back, and the same bytes with plain `cuMemcpy`.
pub fn measure(
    device: &'static Device,
    model: KvGeometry,
    chunk_mib: u64,
    round_bytes: u64,
    rounds: usize,
) -> anyhow::Result<GpuFigures> {
    let block_all_layers = model.layers * model.block_bytes();
    let per_chunk = (chunk_mib << 20).div_ceil(block_all_layers).max(1);
    let chunk_bytes = per_chunk * block_all_layers;
    let chunks = (round_bytes / chunk_bytes).max(1);
    // Block 0 is vLLM's null block, never written by a retrieve: chunks use blocks 1 on.
    let geometry = KvGeometry {
        blocks: chunks * per_chunk + 1,
        ..model
    };
    let bytes = geometry.bytes();
    // Chunk i holds blocks 1 + i, 1 + i + chunks, 1 + i + 2 * chunks, ...
    let blocks: Vec<Vec<u32>> = (0..chunks)
        .map(|i| {
            (0..per_chunk)
                .map(|j| (1 + j * chunks + i) as u32)
                .collect()
        })
        .collect();

    let mut original = BenchKv::create("gpu", geometry)?;
    original.fill_pattern(chunk_mib);
    let mut back = BenchKv::create("gpu-back", geometry)?;
    let alloc = Arc::new(DeviceAlloc::new(device, bytes as usize)?);
    let l1 = L1Store::new(&L1Config {
        capacity_bytes: (chunks + 1) * chunk_bytes,
        lock_ttl: Duration::from_secs(600),
    })?;
    let (l1_base, l1_len) = l1.memory();
    let pinned_l1 = Arc::new(pin(device, l1_base, l1_len)?);
    // Pinned host memory of the limit's copies.
    let arena = Arena::new(bytes)?;
    ensure!(
        arena.len() == bytes,
        "GPU: {bytes} bytes are not whole pages"
    );
    // Declared after the arena: unregistered before it is unmapped (as pinned L1 before L1).
    let _pinned_host = pin(device, arena.base(), bytes)?;
    // SAFETY: the arena's mapping is `bytes` long (checked above), lives until the end of this
    // function, and only this slice touches it.
    let host = unsafe { std::slice::from_raw_parts_mut(arena.base(), bytes as usize) };
    let kv = CudaKv::in_allocation(
        alloc.clone(),
        &geometry.tensors(),
        Some(geometry.shape.hint()),
        Some(pinned_l1.clone()),
    )?;

    let (mut d2h, mut h2d, mut limit_d2h, mut limit_h2d) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let chunk = chunk_bytes as usize;
    // What every figure moves per run: the chunks' bytes (the limit's, from the start of the
    // allocation, in chunk-sized copies).
    let moved = chunks as usize * chunk;
    let all_blocks: Vec<u32> = (1..geometry.blocks as u32).collect();
    for round in 0..rounds {
        alloc.copy_from_host(0, original.bytes())?;
        // The limit, D2H.
        let t = Instant::now();
        for (i, piece) in host[..moved].chunks_mut(chunk).enumerate() {
            alloc.copy_to_host(i * chunk, piece)?;
        }
        limit_d2h.push(t.elapsed());
        ensure!(
            host[..moved] == original.bytes()[..moved],
            "GPU: cuMemcpyDtoH read back other bytes than the device holds"
        );

        // cwm, D2H: every chunk gathered into an L1 object, in one transfer.
        let keys: Vec<ObjectKey> = (0..chunks as usize)
            .map(|i| key(chunk_bytes, round, i))
            .collect();
        let objects = keys
            .iter()
            .map(|k| match l1.reserve(k, chunk_bytes) {
                Reservation::Reserved(w) => Ok(w),
                _ => Err(anyhow::anyhow!(
                    "GPU: no room in the bench's L1 for a chunk"
                )),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let gathers: Vec<Gather> = objects
            .iter()
            .zip(&blocks)
            .map(|(object, blocks)| Gather { blocks, object })
            .collect();
        let t = Instant::now();
        kv.gather(&gathers, &[])?;
        d2h.push(t.elapsed());
        drop(gathers);
        for mut object in objects {
            object.set_itemsize(2);
            object.commit();
        }
        let read: Vec<ReadGuard> = keys
            .iter()
            .map(|k| l1.read(k).context("GPU: a gathered object left L1"))
            .collect::<anyhow::Result<_>>()?;
        for (object, blocks) in read.iter().zip(&blocks) {
            check_object(&original, object, blocks)?;
        }

        // cwm, H2D: the blocks cleared, then every object scattered back, in one transfer.
        host.fill(0);
        alloc.copy_from_host(0, host)?;
        let scatters: Vec<Scatter> = read
            .iter()
            .zip(&blocks)
            .map(|(object, blocks)| Scatter {
                blocks,
                skip_blocks: 0,
                object,
            })
            .collect();
        let t = Instant::now();
        kv.scatter(&scatters, &[])?;
        h2d.push(t.elapsed());
        alloc.copy_to_host(0, back.bytes_mut())?;
        if let Some((layer, block, at)) = original.first_difference(&back, &all_blocks) {
            anyhow::bail!(
                "GPU: the scatter wrote other bytes at layer {layer}, block {block}, byte {at}"
            );
        }

        // The limit, H2D, into cleared device memory.
        host.copy_from_slice(original.bytes());
        back.fill_byte(0);
        alloc.copy_from_host(0, back.bytes())?;
        let t = Instant::now();
        for (i, piece) in host[..moved].chunks(chunk).enumerate() {
            alloc.copy_from_host(i * chunk, piece)?;
        }
        limit_h2d.push(t.elapsed());
        alloc.copy_to_host(0, back.bytes_mut())?;
        ensure!(
            back.bytes()[..moved] == original.bytes()[..moved],
            "GPU: cuMemcpyHtoD wrote other bytes than it was given"
        );
    }
    Ok(GpuFigures {
        chunk_bytes,
        bytes: moved as u64,
        d2h: Samples::new(d2h),
        h2d: Samples::new(h2d),
        limit_d2h: Samples::new(limit_d2h),
        limit_h2d: Samples::new(limit_h2d),
        check: format!(
            "{chunks} chunks of {} MiB per run (blocks per chunk: {per_chunk}, interleaved): gathered \
             objects, scattered blocks and both cuMemcpy copies compared byte for byte",
            chunk_bytes >> 20
        ),
    })
}

/// `[base, base + len)` registered with the driver, as cwm pins L1.
fn pin(device: &'static Device, base: *mut u8, len: u64) -> Result<PinnedHost, CudaError> {
    let pinned = PinnedHost::new(device, base, len, len);
    while pinned.pin_next()? {}
    Ok(pinned)
}

/// Whether `object` holds `blocks` of every layer of `kv`, in canonical order (NHD: a block's
/// tokens are one run, so layer by layer, block by block).
fn check_object(kv: &BenchKv, object: &ReadGuard, blocks: &[u32]) -> anyhow::Result<()> {
    let mut bytes = vec![0u8; object.len()];
    object.copy_to(&mut bytes);
    let g = &kv.geometry;
    let block = g.block_bytes() as usize;
    for layer in 0..g.layers {
        for (j, &b) in blocks.iter().enumerate() {
            let at = (layer as usize * blocks.len() + j) * block;
            ensure!(
                bytes[at..at + block] == *kv.block(layer, b as u64),
                "GPU: the gather put other bytes than block {b} of layer {layer} into its object"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::kv::KvShape;

    /// The gather's check finds a wrong byte anywhere in an object, and passes the right one.
    #[test]
    fn an_object_is_checked_against_its_blocks_byte_for_byte() {
        let g = KvGeometry {
            shape: KvShape::Nhd,
            layers: 3,
            blocks: 6,
            block_size: 4,
            heads: 2,
            content: 8,
        };
        let mut kv = BenchKv::create("gpu-check", g).unwrap();
        kv.fill_pattern(7);
        let blocks = [5u32, 2];
        let mut canonical = Vec::new();
        for layer in 0..g.layers {
            for &b in &blocks {
                canonical.extend_from_slice(kv.block(layer, b as u64));
            }
        }
        let l1 = L1Store::new(&L1Config {
            capacity_bytes: 1 << 20,
            lock_ttl: Duration::from_secs(60),
        })
        .unwrap();
        let object = |n: usize, bytes: &[u8]| {
            let k = key(0, 0, n);
            let Reservation::Reserved(mut w) = l1.reserve(&k, bytes.len() as u64) else {
                panic!("no room")
            };
            w.copy_from_slice(bytes);
            w.commit();
            l1.read(&k).unwrap()
        };
        check_object(&kv, &object(0, &canonical), &blocks).unwrap();
        for at in [0, canonical.len() / 2 + 1, canonical.len() - 1] {
            let mut wrong = canonical.clone();
            wrong[at] ^= 1;
            let e = check_object(&kv, &object(1 + at, &wrong), &blocks).unwrap_err();
            assert!(e.to_string().contains("other bytes than block"), "{e}");
        }
        let swapped = [2u32, 5];
        assert!(check_object(&kv, &object(9999, &canonical), &swapped).is_err());
    }
}
