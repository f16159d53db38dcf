//! Engine KV memory on a GPU (`cuda` and `cuda_raw` descriptors): the allocations opened over
//! CUDA IPC, one stream per registered instance, and transfers between those blocks and L1
//! through the copy engines, ordered by the engine's events (spec §2.3, §3.5).
//!
//! A transfer waits on the engine's event, enqueues its copies, records an exported event and
//! synchronizes before it returns: a store's objects are committed (visible to lookups) only
//! after their bytes landed, and a retrieve's L1 objects stay pinned until they were read.

pub mod copy;
pub mod driver;
pub mod events;
pub mod mapping;
pub mod pinned;

use std::sync::Arc;

use connector_protocol::{IpcDescriptor, TensorMetadata};
use cudarc::driver::sys;
use parking_lot::Mutex;

pub use copy::{Direction, Run};
use driver::{check, Device};
use mapping::MappingRef;
pub use pinned::PinnedHost;

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

/// An engine's KV cache in GPU memory: the backend behind `cuda` / `cuda_raw` descriptors.
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
        for (layer, (&len, &span)) in opened
            .layer_limit
            .iter()
            .zip(&layout.layer_spans)
            .enumerate()
        {
            if span > len {
                return Err(EngineMemError::OutOfSegment { layer, span, len });
            }
        }
        Ok(CudaKv {
            layout,
            layer_base: opened.layer_base,
            engine: opened.engine,
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
        Err(EngineMemError::Cuda(
            "checksums of GPU memory are not supported (cwm does not read engine memory on the \
             CPU)"
                .to_string(),
        ))
    }
}

/// A registered instance's GPU memory.
pub struct CudaEngine {
    device: &'static Device,
    stream: Mutex<Stream>,
    batch: bool,
    pinned: Option<Arc<PinnedHost>>,
    _mappings: Vec<MappingRef>,
}

struct Stream(sys::CUstream);
// SAFETY: a CUstream is a driver handle usable from any thread that binds its context; every
// use binds the device first, and the Mutex around it keeps one thread using it at a time.
unsafe impl Send for Stream {}

impl CudaEngine {
    /// Whether copies use pinned L1 (false: pinning failed, which was logged and counted).
    pub fn pinned(&self) -> bool {
        self.pinned.is_some()
    }

    /// Wait on the engine's `event`, copy `runs`, and return the handle of the completion
    /// event (already complete when this returns).
    pub fn transfer(
        &self,
        dir: Direction,
        event: &[u8],
        mut runs: Vec<Run>,
    ) -> Result<Vec<u8>, EngineMemError> {
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
        let waited = events::wait_engine(stream.0, event).map_err(EngineMemError::Cuda)?;
        let enqueued = copy::enqueue(stream.0, dir, &runs, self.batch)
            .and_then(|_| events::record_exported(self.device, stream.0));
        // Whatever happened, nothing may still be copying when the caller frees or commits.
        let synced = check(
            // SAFETY: the stream is live (destroyed only in Drop) and locked by this thread,
            // with its device's context bound above.
            unsafe { sys::cuStreamSynchronize(stream.0) },
            "cuStreamSynchronize",
        );
        drop(waited);
        let handle = enqueued.map_err(EngineMemError::Cuda)?;
        synced.map_err(EngineMemError::Cuda)?;
        Ok(handle)
    }
}

impl Drop for CudaEngine {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: `&mut self`: no transfer is running on the stream (each synchronizes
            // before it returns), and it is destroyed once, here.
            unsafe { sys::cuStreamDestroy_v2(self.stream.get_mut().0) };
        }
    }
}

/// Open `cuda` / `cuda_raw` descriptors (all on one device): one mapping per allocation.
fn open<'a>(
    descriptors: &'a [IpcDescriptor],
    pinned: Option<Arc<PinnedHost>>,
) -> Result<Opened<'a>, EngineMemError> {
    let cuda = |e: String| EngineMemError::Cuda(e);
    let drv = driver::driver().map_err(EngineMemError::CudaUnavailable)?;
    let mut device: Option<&'static Device> = None;
    let mut mappings: Vec<MappingRef> = Vec::new();
    let mut layer_base = Vec::with_capacity(descriptors.len());
    let mut layer_limit = Vec::with_capacity(descriptors.len());
    let mut metadata = Vec::with_capacity(descriptors.len());
    for (layer, d) in descriptors.iter().enumerate() {
        let (handle, offset, limit, m) = match d {
            IpcDescriptor::Cuda { handle, metadata } => (
                &handle.mem_handle,
                handle.storage_offset_bytes,
                handle.storage_size,
                metadata,
            ),
            IpcDescriptor::CudaRaw {
                ipc_handle,
                alloc_offset,
                nbytes,
                metadata,
            } => (ipc_handle, *alloc_offset, *nbytes, metadata),
            other => return Err(EngineMemError::UnsupportedKind(other.kind().to_string())),
        };
        let dev = drv.device_by_uuid(&m.device_uuid).map_err(cuda)?;
        match device {
            Some(first) if first.ordinal != dev.ordinal => {
                return Err(cuda(format!(
                    "layer {layer} is on GPU {} but layer 0 on GPU {}: one instance must \
                     register one device",
                    dev.ordinal, first.ordinal
                )))
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
            return Err(cuda(format!(
                "layer {layer}: bytes [{offset}, +{limit}) lie outside its {}-byte allocation",
                mr.size
            )));
        }
        layer_base.push((mr.base + offset) as usize);
        layer_limit.push(limit);
        metadata.push(m);
    }
    let device = device.ok_or_else(|| cuda("no layers registered".to_string()))?;
    if let Some(d) = descriptors.first() {
        sync_registration_event(device, d).map_err(cuda)?;
    }
    device.bind().map_err(cuda)?;
    let mut stream = std::ptr::null_mut();
    // CU_STREAM_NON_BLOCKING: never ordered behind the legacy default stream.
    check(
        // SAFETY: the device's context is bound just above; `stream` is a live out-pointer.
        unsafe { sys::cuStreamCreate(&mut stream, 1) },
        "cuStreamCreate",
    )
    .map_err(cuda)?;
    Ok(Opened {
        engine: CudaEngine {
            device,
            stream: Mutex::new(Stream(stream)),
            batch: drv.has_batch_copy(),
            pinned,
            _mappings: mappings,
        },
        layer_base,
        layer_limit,
        metadata,
    })
}

/// A `cuda` handle's producer event (torch's `event_sync_required`): waited on once, now.
fn sync_registration_event(device: &Device, d: &IpcDescriptor) -> Result<(), String> {
    let IpcDescriptor::Cuda { handle, .. } = d else {
        return Ok(());
    };
    let (Some(ev), true) = (&handle.event_handle, handle.event_sync_required) else {
        return Ok(());
    };
    device.bind()?;
    let h = sys::CUipcEventHandle {
        reserved: ev.map(|b| b as std::ffi::c_char),
    };
    let mut e = std::ptr::null_mut();
    check(
        // SAFETY: the context is bound; `h` is a by-value handle (an unknown one is an error)
        // and `e` a live out-pointer.
        unsafe { sys::cuIpcOpenEventHandle(&mut e, h) },
        "cuIpcOpenEventHandle",
    )?;
    // SAFETY: `e` was opened just above and is destroyed only after this returns.
    let r = check(unsafe { sys::cuEventSynchronize(e) }, "cuEventSynchronize");
    // SAFETY: `e` is ours alone (opened here, never shared) and destroyed once.
    unsafe { sys::cuEventDestroy_v2(e) };
    r
}

/// Pin `[base, base + len)` (the L1 arena) with the first device's context. `piece` is the
/// registration size (`pinned::MAX_PIECE` in production).
pub fn pin_host(base: *mut u8, len: u64, piece: u64) -> Result<PinnedHost, String> {
    let drv = driver::driver()?;
    let dev = drv
        .devices
        .first()
        .ok_or_else(|| "no CUDA device to pin L1 with".to_string())?;
    PinnedHost::register(dev, base, len, piece)
}
