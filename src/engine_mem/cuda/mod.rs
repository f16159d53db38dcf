//! Engine KV memory on a GPU (`cuda` descriptors; `cuda_raw` is refused by `engine_mem::open`,
//! see `CUDA_RAW_REFUSED`): the allocations opened over
//! CUDA IPC, one stream per registered instance, and transfers between those blocks and L1
//! through the copy engines, ordered by the engine's events (spec §2.3, §3.5).
//!
//! A transfer waits (with a deadline) until the engine's event completed, enqueues its copies
//! and waits (with a deadline) until they completed before it returns: a store's objects are
//! committed (visible to lookups) only after their bytes landed, and a retrieve's L1 objects
//! stay pinned until they were read. The reply's event handle is empty (`events`).
//!
//! A wait that expires marks the instance broken (its later transfers fail at once). If the
//! engine's event expired nothing was enqueued, and the reaper or unregister unmaps the engine
//! as usual. If cwm's own copies expired (the GPU stopped), `EngineMemError::CopiesRunning`
//! tells the caller to leak the L1 objects involved, and the instance leaks its stream and
//! mappings when dropped, so a late copy can never land in reused memory.

pub mod copy;
pub mod device_alloc;
pub mod driver;
pub mod error;
pub mod events;
pub mod mapping;
pub mod pinned;
pub mod ref_counter;
pub mod wait;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use connector_protocol::{IpcDescriptor, TensorMetadata};
use cudarc::driver::sys;
use parking_lot::Mutex;

pub use copy::{Batching, Direction, Run};
pub use device_alloc::DeviceAlloc;
use driver::{check, Device, Driver};
pub use error::CudaError;
use mapping::MappingRef;
pub use pinned::PinnedHost;
use ref_counter::RefCounter;
use wait::WaitError;

use super::checksum::Checksums;
use super::{plan, EngineMemError, EngineMemory, Gather, KvLayout, Scatter};

/// What `open` found: the engine, and per layer the device address of its storage and how
/// many bytes from there the descriptor allows.
struct Opened<'a> {
    engine: CudaEngine,
    layer_base: Vec<usize>,
    layer_limit: Vec<u64>,
    metadata: Vec<&'a TensorMetadata>,
}

/// An engine's KV cache in GPU memory: the backend behind `cuda` descriptors.
pub struct CudaKv {
    layout: KvLayout,
    /// Device address of each layer's storage (add `layout.layer_offsets[l]`).
    layer_base: Vec<usize>,
    engine: CudaEngine,
}

impl CudaKv {
    /// Open the descriptors' allocations (one mapping per allocation per device) and derive
    /// the layout; copies go through `pinned` L1 when given.
    pub fn open(
        descriptors: &[IpcDescriptor],
        kv_layout_hint: Option<&str>,
        pinned: Option<Arc<PinnedHost>>,
    ) -> Result<CudaKv, EngineMemError> {
        let opened = open(descriptors, pinned)?;
        let layout = KvLayout::from_tensors(&opened.metadata, kv_layout_hint)?;
        within(&layout, &opened.layer_limit)?;
        Ok(CudaKv {
            layout,
            layer_base: opened.layer_base,
            engine: opened.engine,
        })
    }

    /// KV blocks laid out as `tensors` describe (one per layer, offsets from the allocation's
    /// start) in device memory this process allocated: copied to and from L1 exactly as an
    /// engine's blocks opened over IPC are (the same plan, coalescing, pinned pieces, stream
    /// and waits). `cwm bench tiers` measures the GPU path with it; engines' memory only ever
    /// arrives through `open`.
    pub fn in_allocation(
        alloc: Arc<DeviceAlloc>,
        tensors: &[TensorMetadata],
        kv_layout_hint: Option<&str>,
        pinned: Option<Arc<PinnedHost>>,
    ) -> Result<CudaKv, EngineMemError> {
        let drv = driver::driver().map_err(EngineMemError::CudaUnavailable)?;
        let metadata: Vec<&TensorMetadata> = tensors.iter().collect();
        let layout = KvLayout::from_tensors(&metadata, kv_layout_hint)?;
        within(&layout, &vec![alloc.len() as u64; tensors.len()])?;
        let layer_base = vec![alloc.ptr() as usize; tensors.len()];
        let mut engine = CudaEngine::new(drv, alloc.device(), pinned, Vec::new(), Vec::new())
            .map_err(EngineMemError::Cuda)?;
        engine.allocation = Some(alloc);
        Ok(CudaKv {
            layout,
            layer_base,
            engine,
        })
    }

    /// The plan's runs for one chunk's sections: (engine address, object address, len).
    fn runs(&self, blocks: &[u32], object: usize, skip: Option<usize>, out: &mut Vec<Run>) {
        let chunk_tokens = blocks.len() as u64 * self.layout.block_size;
        for (plane, layer, off) in plan::sections(&self.layout, chunk_tokens) {
            let base = self.layer_base[layer as usize];
            let wanted = |j: usize, b: u32| skip.is_none_or(|skip| j >= skip && b != 0);
            plan::for_each_run(
                &self.layout,
                base,
                plane,
                layer,
                blocks,
                wanted,
                |e, o, n| {
                    out.push(Run {
                        dev: e as u64,
                        host: object + off + o,
                        len: n,
                    })
                },
            );
        }
    }
}

impl EngineMemory for CudaKv {
    fn layout(&self) -> &KvLayout {
        &self.layout
    }

    fn device(&self) -> super::Device {
        super::Device::Cuda(self.engine.device.ordinal as u32)
    }

    fn gather(&self, chunks: &[Gather<'_>], event: &[u8]) -> Result<Vec<u8>, EngineMemError> {
        let mut runs = Vec::new();
        for c in chunks {
            self.check_copy(c.blocks, c.object.len())?;
            self.runs(c.blocks, c.object.as_mut_ptr() as usize, None, &mut runs);
        }
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        self.engine.transfer(Direction::ToHost, event, runs)
    }

    fn scatter(&self, chunks: &[Scatter<'_>], event: &[u8]) -> Result<Vec<u8>, EngineMemError> {
        let mut runs = Vec::new();
        for c in chunks {
            self.check_copy(c.blocks, c.object.len())?;
            let object = c.object.as_ptr() as usize;
            self.runs(c.blocks, object, Some(c.skip_blocks), &mut runs);
        }
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        self.engine.transfer(Direction::ToDevice, event, runs)
    }

    fn checksums(&self, _: &[u32], _: usize, _: bool) -> Result<Checksums, EngineMemError> {
        Err(EngineMemError::Cuda(CudaError::NoChecksums))
    }
}

/// Whether each layer's view spans no more than the bytes its storage allows (`limits`).
fn within(layout: &KvLayout, limits: &[u64]) -> Result<(), EngineMemError> {
    for (layer, (&len, &span)) in limits.iter().zip(&layout.layer_spans).enumerate() {
        if span > len {
            return Err(EngineMemError::OutOfSegment { layer, span, len });
        }
    }
    Ok(())
}

/// A registered instance's GPU memory.
pub struct CudaEngine {
    device: &'static Device,
    stream: Mutex<Stream>,
    batching: Batching,
    /// A batch call failed once: this instance copies per run from then on.
    batch_failed: AtomicBool,
    /// Why this instance no longer transfers (a wait expired).
    broken: OnceLock<CudaError>,
    /// cwm's own copies did not complete in time: leak the stream and mappings on drop.
    copies_running: AtomicBool,
    pinned: Option<Arc<PinnedHost>>,
    mappings: Vec<MappingRef>,
    /// torch's IPC ref counters of the descriptors, released once the mappings are closed.
    ref_counters: Vec<RefCounter>,
    /// Device memory of this process the blocks live in, instead of mappings (`in_allocation`).
    allocation: Option<Arc<DeviceAlloc>>,
}

struct Stream(sys::CUstream);
// SAFETY: a CUstream is an opaque driver handle usable from any thread whose current context
// is the stream's; every use binds the device first, and the Mutex serializes them.
unsafe impl Send for Stream {}

impl CudaEngine {
    /// An instance on `device` with its own stream, copying through `pinned` L1 when given.
    fn new(
        drv: &Driver,
        device: &'static Device,
        pinned: Option<Arc<PinnedHost>>,
        mappings: Vec<MappingRef>,
        ref_counters: Vec<RefCounter>,
    ) -> Result<CudaEngine, CudaError> {
        device.bind()?;
        let mut stream = std::ptr::null_mut();
        // CU_STREAM_NON_BLOCKING: never ordered behind the legacy default stream.
        check(
            // SAFETY: the device's context is bound just above; `stream` is a live out-pointer.
            unsafe { sys::cuStreamCreate(&mut stream, 1) },
            "cuStreamCreate",
        )?;
        Ok(CudaEngine {
            device,
            stream: Mutex::new(Stream(stream)),
            batching: copy::batching(drv, device),
            batch_failed: AtomicBool::new(false),
            broken: OnceLock::new(),
            copies_running: AtomicBool::new(false),
            pinned,
            mappings,
            ref_counters,
            allocation: None,
        })
    }

    /// Whether copies use pinned L1 (false: pinning failed, which was logged and counted).
    pub fn pinned(&self) -> bool {
        self.pinned.is_some()
    }

    /// Why this instance no longer transfers, if it does not.
    pub fn broken(&self) -> Option<&CudaError> {
        self.broken.get()
    }

    /// Wait until the engine's `event` completed, copy `runs`, wait until they completed, and
    /// return the reply's event handle (always empty: nothing is left running).
    pub fn transfer(
        &self,
        dir: Direction,
        event: &[u8],
        mut runs: Vec<Run>,
    ) -> Result<Vec<u8>, EngineMemError> {
        if let Some(why) = self.broken() {
            return Err(EngineMemError::Cuda(CudaError::Broken(Box::new(
                why.clone(),
            ))));
        }
        copy::coalesce(&mut runs);
        if let Some(p) = &self.pinned {
            let mut split = Vec::with_capacity(runs.len());
            for r in &runs {
                p.split(r.host, r.len, |off, host, len| {
                    split.push(Run {
                        dev: r.dev + off as u64,
                        host,
                        len,
                    })
                });
            }
            runs = split;
        }
        let stream = self.stream.lock();
        self.device.bind().map_err(EngineMemError::Cuda)?;
        // Nothing is enqueued before the engine's event completed.
        events::wait_engine(event).map_err(|e| self.failed(e))?;
        let max_batch = match self.batching {
            Batching::Batch(n) if !self.batch_failed.load(Ordering::Relaxed) => Some(n),
            _ => None,
        };
        let enqueued = copy::enqueue(stream.0, dir, &runs, max_batch);
        if let Ok(Some(e)) = &enqueued {
            if !self.batch_failed.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    device = self.device.ordinal,
                    "cuMemcpyBatchAsync failed, this instance copies per run from now on: {e}"
                );
            }
        }
        // Whatever was enqueued must complete before the caller frees or commits.
        // SAFETY: `stream.0` is this instance's live stream and its device's context is
        // current on this thread (bound above).
        let completed = wait::poll("cwm's copies", wait::budget(), || unsafe {
            sys::cuStreamQuery(stream.0)
        });
        if let Err(WaitError::Expired(e)) = completed {
            self.copies_running.store(true, Ordering::SeqCst);
            let _ = self.broken.set(e.clone());
            tracing::error!(
                device = self.device.ordinal,
                "{e}: the instance is broken; its L1 objects, stream and mappings are leaked so \
                 that a late copy cannot land in reused memory"
            );
            return Err(EngineMemError::CopiesRunning(e));
        }
        enqueued.map_err(EngineMemError::Cuda)?;
        completed.map_err(|e| EngineMemError::Cuda(e.error()))?;
        Ok(Vec::new())
    }

    /// The error for a failed wait on the engine's event; one that expired breaks the instance.
    fn failed(&self, e: WaitError) -> EngineMemError {
        match e {
            WaitError::Expired(e) => {
                let _ = self.broken.set(e.clone());
                tracing::error!(
                    device = self.device.ordinal,
                    "{e}: the engine died or stalled; this instance is broken (nothing was \
                     copied) and is unmapped when it unregisters or is reaped"
                );
                EngineMemError::Cuda(CudaError::NowBroken(Box::new(e)))
            }
            WaitError::Failed(e) => EngineMemError::Cuda(e),
        }
    }
}

impl Drop for CudaEngine {
    fn drop(&mut self) {
        if self.device.bind().is_err() {
            return;
        }
        if self.copies_running.load(Ordering::SeqCst) {
            // SAFETY: the stream is live (destroyed only below) and its context is current.
            let idle = unsafe { sys::cuStreamQuery(self.stream.get_mut().0) }
                == sys::CUresult::CUDA_SUCCESS;
            if !idle {
                tracing::error!(
                    device = self.device.ordinal,
                    "copies still running at unregister: the engine mappings stay open"
                );
                // Nor are torch's ref counters released: the memory is still in use.
                std::mem::forget(std::mem::take(&mut self.mappings));
                std::mem::forget(self.allocation.take());
                return;
            }
        }
        // SAFETY: the stream is live and destroyed only here; queued work (none, unless
        // copies_running) still completes after the call, as the driver documents.
        unsafe { sys::cuStreamDestroy_v2(self.stream.get_mut().0) };
        // As torch's consumer does: close the mappings, then release the shares.
        drop(std::mem::take(&mut self.mappings));
        ref_counter::release_all(&self.ref_counters);
    }
}

/// Open `cuda` descriptors (all on one device): one mapping per allocation.
fn open<'a>(
    descriptors: &'a [IpcDescriptor],
    pinned: Option<Arc<PinnedHost>>,
) -> Result<Opened<'a>, EngineMemError> {
    let cuda = EngineMemError::Cuda;
    let drv = driver::driver().map_err(EngineMemError::CudaUnavailable)?;
    let mut device: Option<&'static Device> = None;
    let mut mappings: Vec<MappingRef> = Vec::new();
    let mut layer_base = Vec::with_capacity(descriptors.len());
    let mut layer_limit = Vec::with_capacity(descriptors.len());
    let mut metadata = Vec::with_capacity(descriptors.len());
    let mut ref_counters = Vec::new();
    for (layer, d) in descriptors.iter().enumerate() {
        if let IpcDescriptor::Cuda { handle, .. } = d {
            if let Some(rc) = &handle.ref_counter {
                let rc = RefCounter::parse(rc)
                    .map_err(|source| cuda(CudaError::BadRefCounter { layer, source }))?;
                ref_counters.push(rc);
            }
        }
    }
    for (layer, d) in descriptors.iter().enumerate() {
        let (handle, offset, limit, m) = match d {
            IpcDescriptor::Cuda { handle, metadata } => (
                &handle.mem_handle,
                handle.storage_offset_bytes,
                handle.storage_size,
                metadata,
            ),
            other => return Err(EngineMemError::UnsupportedKind(other.kind().to_string())),
        };
        let dev = drv.device_by_uuid(&m.device_uuid).map_err(cuda)?;
        match device {
            Some(first) if first.ordinal != dev.ordinal => {
                return Err(cuda(CudaError::MixedDevices {
                    layer,
                    device: dev.ordinal,
                    first: first.ordinal,
                }))
            }
            _ => device = Some(dev),
        }
        let idx = match mappings
            .iter()
            .position(|mr| mr.key() == (dev.ordinal, handle))
        {
            Some(i) => i,
            None => {
                mappings.push(MappingRef::open(dev, handle).map_err(cuda)?);
                mappings.len() - 1
            }
        };
        let mr = &mappings[idx];
        if offset.checked_add(limit).is_none_or(|end| end > mr.size) {
            return Err(cuda(CudaError::OutsideAllocation {
                layer,
                offset,
                limit,
                size: mr.size,
            }));
        }
        layer_base.push((mr.base + offset) as usize);
        layer_limit.push(limit);
        metadata.push(m);
    }
    let device = device.ok_or(cuda(CudaError::NoLayers))?;
    if let Some(d) = descriptors.first() {
        sync_registration_event(device, d).map_err(cuda)?;
    }
    Ok(Opened {
        engine: CudaEngine::new(drv, device, pinned, mappings, ref_counters).map_err(cuda)?,
        layer_base,
        layer_limit,
        metadata,
    })
}

/// A `cuda` handle's producer event (torch's `event_sync_required`): waited on once, now,
/// with the same deadline as a transfer's.
fn sync_registration_event(device: &Device, d: &IpcDescriptor) -> Result<(), CudaError> {
    let IpcDescriptor::Cuda { handle, .. } = d else {
        return Ok(());
    };
    let (Some(ev), true) = (&handle.event_handle, handle.event_sync_required) else {
        return Ok(());
    };
    device.bind()?;
    events::wait_engine(ev).map_err(|e| CudaError::RegistrationEvent(Box::new(e.error())))
}

/// The GPU an engine's descriptors name (their first layer's device UUID).
pub fn engine_device(descriptors: &[IpcDescriptor]) -> Result<&'static Device, CudaError> {
    let drv = driver::driver()?;
    let uuid = match descriptors.first() {
        Some(IpcDescriptor::Cuda { metadata, .. }) => &metadata.device_uuid,
        _ => return Err(CudaError::NoGpuDescriptors),
    };
    drv.device_by_uuid(uuid)
}
