//! Access to an engine's paged KV memory: open what it registered, and copy chunks between its
//! blocks and store objects (gather on store, scatter on retrieve).
//!
//! Owns bounds: every block id is checked against the registered geometry before any byte moves,
//! and the geometry is checked against the mapped segment sizes at registration, so a bad
//! request can fail but can never read or write outside what the engine registered.

pub mod checksum;
pub mod cuda;
pub mod layout;
pub mod shm;

use std::collections::HashMap;
use std::sync::Arc;

use connector_protocol::IpcDescriptor;
use thiserror::Error;

pub use cuda::Direction;
use cuda::{CudaEngine, PinnedHost, Run};
pub use layout::{BlockShape, KvLayout, LayoutError};
use rayon::prelude::*;
use shm::ShmSegment;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EngineMemError {
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("one registration mixes GPU and {0:?} descriptors")]
    MixedKinds(String),
    #[error("descriptor kind {0} is not supported")]
    UnsupportedKind(String),
    #[error("shm name {0:?} is not a valid POSIX shm name")]
    ShmName(String),
    #[error("cannot open shm segment {name:?}: {reason}")]
    ShmOpen { name: String, reason: String },
    #[error("shm segment {name:?} has {actual} bytes, descriptor says {nbytes}")]
    ShmSize {
        name: String,
        nbytes: u64,
        actual: u64,
    },
    #[error("layer {layer} spans {span} bytes but its segment has {len}")]
    OutOfSegment { layer: usize, span: u64, len: u64 },
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("block id {block} out of range (the cache has {num_blocks} blocks)")]
    BlockId { block: u32, num_blocks: u64 },
}

/// An engine's registered KV cache: mapped memory plus its layout.
pub struct EngineKv {
    pub layout: KvLayout,
    /// Address of each layer's storage (add `layout.layer_offsets[l]`): a host address in a
    /// shm mapping, or a device address in a CUDA IPC mapping.
    layer_base: Vec<usize>,
    memory: Memory,
}

/// Who owns the memory `layer_base` points into (kept alive as long as `self`).
enum Memory {
    Shm(#[allow(dead_code)] Vec<Arc<ShmSegment>>),
    Cuda(CudaEngine),
}

/// One (plane, layer) section of one chunk to copy: its blocks, how many leading blocks to
/// leave untouched (retrieve), and the section's address in an L1 object.
#[derive(Clone, Copy)]
pub struct SectionCopy<'a> {
    pub plane: u64,
    pub layer: u64,
    pub blocks: &'a [u32],
    pub skip_blocks: usize,
    pub object: *mut u8,
}

// Each section is written by exactly one task; the caller owns the objects.
unsafe impl Send for SectionCopy<'_> {}
unsafe impl Sync for SectionCopy<'_> {}

impl EngineKv {
    /// Open every descriptor (one mapping per distinct segment or allocation) and derive the
    /// layout. GPU descriptors copy through `pinned` L1 when it is given.
    pub fn open(
        descriptors: &[IpcDescriptor],
        kv_layout_hint: Option<&str>,
    ) -> Result<EngineKv, EngineMemError> {
        Self::open_with(descriptors, kv_layout_hint, None)
    }

    /// Whether the descriptors name GPU memory.
    pub fn is_gpu(descriptors: &[IpcDescriptor]) -> bool {
        matches!(
            descriptors.first(),
            Some(IpcDescriptor::Cuda { .. } | IpcDescriptor::CudaRaw { .. })
        )
    }

    /// As `open`, with the pinned L1 GPU copies use.
    pub fn open_with(
        descriptors: &[IpcDescriptor],
        kv_layout_hint: Option<&str>,
        pinned: Option<Arc<PinnedHost>>,
    ) -> Result<EngineKv, EngineMemError> {
        if Self::is_gpu(descriptors) {
            let opened = cuda::open(descriptors, pinned)?;
            let layout = KvLayout::from_tensors(&opened.metadata, kv_layout_hint)?;
            check_spans(&layout, &opened.layer_limit)?;
            return Ok(EngineKv {
                layout,
                layer_base: opened.layer_base,
                memory: Memory::Cuda(opened.engine),
            });
        }
        let mut segments: HashMap<&str, Arc<ShmSegment>> = HashMap::new();
        let mut layer_segments = Vec::with_capacity(descriptors.len());
        let mut metadata = Vec::with_capacity(descriptors.len());
        for d in descriptors {
            match d {
                IpcDescriptor::CpuShm {
                    shm_name,
                    nbytes,
                    metadata: m,
                } => {
                    let seg = match segments.get(shm_name.as_str()) {
                        Some(s) => s.clone(),
                        None => {
                            let s = Arc::new(ShmSegment::open(shm_name, *nbytes)?);
                            segments.insert(shm_name, s.clone());
                            s
                        }
                    };
                    layer_segments.push(seg);
                    metadata.push(m);
                }
                IpcDescriptor::Cuda { .. } | IpcDescriptor::CudaRaw { .. } => {
                    return Err(EngineMemError::MixedKinds(d.kind().to_string()))
                }
                IpcDescriptor::Unsupported { kind } if kind == "cuda_vmm" => {
                    return Err(EngineMemError::UnsupportedKind(
                        "cuda_vmm (LMCache's VMM IPC mode, use_vmm_api): register with the \
                         default CUDA IPC mode instead"
                            .to_string(),
                    ))
                }
                IpcDescriptor::Unsupported { kind } => {
                    return Err(EngineMemError::UnsupportedKind(kind.clone()))
                }
            }
        }
        let layout = KvLayout::from_tensors(&metadata, kv_layout_hint)?;
        let lens: Vec<u64> = layer_segments.iter().map(|s| s.len()).collect();
        check_spans(&layout, &lens)?;
        let layer_base = layer_segments
            .iter()
            .map(|s| s.as_mut_ptr() as usize)
            .collect();
        let mut unique: Vec<Arc<ShmSegment>> = segments.into_values().collect();
        unique.sort_by(|a, b| a.name().cmp(b.name()));
        Ok(EngineKv {
            layout,
            layer_base,
            memory: Memory::Shm(unique),
        })
    }

    /// The GPU engine, if this memory is on a GPU (the CPU cannot read it).
    pub fn gpu(&self) -> Option<&CudaEngine> {
        match &self.memory {
            Memory::Cuda(e) => Some(e),
            Memory::Shm(_) => None,
        }
    }

    /// Host address of a layer's storage (shm engines only).
    pub(crate) fn host_base(&self, layer: usize) -> *mut u8 {
        debug_assert!(self.gpu().is_none(), "GPU memory has no host address");
        self.layer_base[layer] as *mut u8
    }

    /// Copy every section between the engine and L1 objects: `ToHost` gathers (store),
    /// `ToDevice` scatters (retrieve), leaving each section's first `skip_blocks` blocks and
    /// every null block untouched. `event` is the engine's event handle (GPU engines wait on
    /// it; shm engines ignore it). Returns the completion event handle to reply with (empty:
    /// complete).
    ///
    /// # Safety
    /// Every section's blocks passed `check_blocks`; each `object` is valid for writes (gather)
    /// or reads (scatter) of `section_bytes(blocks.len())` bytes, not shared between sections,
    /// and lies in L1 (pinned for GPU copies when pinning succeeded).
    pub unsafe fn copy_sections(
        &self,
        dir: Direction,
        sections: &[SectionCopy],
        event: &[u8],
    ) -> Result<Vec<u8>, EngineMemError> {
        match &self.memory {
            Memory::Shm(_) => {
                sections.par_iter().for_each(|s| match dir {
                    Direction::ToHost => self.gather(s.plane, s.layer, s.blocks, s.object),
                    Direction::ToDevice => {
                        self.scatter(s.plane, s.layer, s.blocks, s.skip_blocks, s.object)
                    }
                });
                Ok(Vec::new())
            }
            Memory::Cuda(gpu) => self.gpu_transfer(gpu, dir, sections, event),
        }
    }

    unsafe fn gpu_transfer(
        &self,
        gpu: &CudaEngine,
        dir: Direction,
        sections: &[SectionCopy],
        event: &[u8],
    ) -> Result<Vec<u8>, EngineMemError> {
        if sections.is_empty() {
            return Ok(Vec::new());
        }
        let mut runs = Vec::new();
        for s in sections {
            self.runs(s, dir == Direction::ToDevice, &mut runs);
        }
        gpu.transfer(dir, event, runs)
    }

    /// The copy plan of one section as (engine address, object address, len) runs: the same
    /// plan `gather`/`scatter` execute on shm engines.
    pub fn runs(&self, s: &SectionCopy, retrieve: bool, out: &mut Vec<Run>) {
        let object = s.object as usize;
        let skip = if retrieve { s.skip_blocks } else { 0 };
        // SAFETY: only addresses are computed; nothing is dereferenced.
        unsafe {
            self.for_each_run(
                s.plane,
                s.layer,
                s.blocks,
                |j, b| !retrieve || (j >= skip && b != 0),
                |engine, off, len| {
                    out.push(Run {
                        dev: engine as u64,
                        host: object + off,
                        len,
                    })
                },
            )
        }
    }

    pub fn check_blocks(&self, blocks: &[u32]) -> Result<(), EngineMemError> {
        let num_blocks = self.layout.num_blocks;
        match blocks.iter().find(|&&b| b as u64 >= num_blocks) {
            Some(&block) => Err(EngineMemError::BlockId { block, num_blocks }),
            None => Ok(()),
        }
    }

    /// Bytes of the object section of one (plane, layer) for a chunk of `blocks`.
    pub fn section_bytes(&self, blocks: usize) -> usize {
        (blocks as u64 * self.layout.block_size * self.layout.row_bytes()) as usize
    }

    /// Byte offset of the (plane, layer) section in an object of `chunk_tokens` tokens.
    pub fn section_offset(&self, plane: u64, layer: u64, chunk_tokens: u64) -> usize {
        ((plane * self.layout.num_layers + layer) * chunk_tokens * self.layout.row_bytes()) as usize
    }

    /// Copy the `(plane, layer)` rows of `blocks` from the engine into `section`
    /// (`section_bytes(blocks.len())` bytes, token-major).
    ///
    /// # Safety
    /// `blocks` must have passed `check_blocks`, `section` must be valid for writes of
    /// `section_bytes(blocks.len())` bytes and not overlap engine memory.
    pub unsafe fn gather(&self, plane: u64, layer: u64, blocks: &[u32], section: *mut u8) {
        self.for_each_run(
            plane,
            layer,
            blocks,
            |_, _| true,
            |engine, object, len| {
                std::ptr::copy_nonoverlapping(engine as *const u8, section.add(object), len)
            },
        );
    }

    /// Copy `section` into the `(plane, layer)` rows of `blocks`, leaving the first
    /// `skip_blocks` blocks of the list and every null block (id 0) untouched.
    ///
    /// # Safety
    /// As for `gather`, with `section` valid for reads.
    pub unsafe fn scatter(
        &self,
        plane: u64,
        layer: u64,
        blocks: &[u32],
        skip_blocks: usize,
        section: *const u8,
    ) {
        self.for_each_run(
            plane,
            layer,
            blocks,
            |j, b| j >= skip_blocks && b != 0,
            |engine, object, len| {
                std::ptr::copy_nonoverlapping(section.add(object), engine as *mut u8, len)
            },
        );
    }

    /// Visit every contiguous run of the (plane, layer) rows of the blocks `wanted(index, id)`
    /// selects: `f(engine_address, object_offset, len)`.
    unsafe fn for_each_run(
        &self,
        plane: u64,
        layer: u64,
        blocks: &[u32],
        wanted: impl Fn(usize, u32) -> bool,
        mut f: impl FnMut(usize, usize, usize),
    ) {
        let l = &self.layout;
        let base = self.layer_base[layer as usize]
            + (l.layer_offsets[layer as usize] + plane * l.plane_stride) as usize;
        let row = l.row_bytes() as usize;
        let bs = l.block_size as usize;
        let shape = l.block_shape();
        for (j, &b) in blocks.iter().enumerate() {
            if !wanted(j, b) {
                continue;
            }
            let block = base + (b as u64 * l.block_stride) as usize;
            let object = j * bs * row;
            match shape {
                BlockShape::Contiguous => f(block, object, bs * row),
                BlockShape::RowMajor => {
                    for t in 0..bs {
                        f(block + t * l.token_stride as usize, object + t * row, row)
                    }
                }
                BlockShape::Strided => {
                    // Token-major, as the object is: its side then moves sequentially and
                    // only the engine side jumps (~10-20% faster than head-major on HND;
                    // BENCHMARKS.md).
                    let hb = l.head_bytes as usize;
                    for t in 0..bs {
                        let token = block + t * l.token_stride as usize;
                        for h in 0..l.num_heads as usize {
                            f(
                                token + h * l.head_stride as usize,
                                object + t * row + h * hb,
                                hb,
                            )
                        }
                    }
                }
            }
        }
    }
}

/// Every layer's view fits in the bytes its descriptor allows.
fn check_spans(layout: &KvLayout, limits: &[u64]) -> Result<(), EngineMemError> {
    for (layer, (&len, &span)) in limits.iter().zip(&layout.layer_spans).enumerate() {
        if span > len {
            return Err(EngineMemError::OutOfSegment { layer, span, len });
        }
    }
    Ok(())
}
