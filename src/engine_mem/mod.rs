//! Access to an engine's paged KV memory: open what it registered, and copy chunks between its
//! blocks and store objects (gather on store, scatter on retrieve).
//!
//! Owns bounds: every block id is checked against the registered geometry before any byte moves,
//! and the geometry is checked against the mapped segment sizes at registration, so a bad
//! request can fail but can never read or write outside what the engine registered.

pub mod checksum;
pub mod layout;
pub mod shm;

use std::collections::HashMap;
use std::sync::Arc;

use connector_protocol::IpcDescriptor;
use thiserror::Error;

pub use layout::{BlockShape, KvLayout, LayoutError};
use shm::ShmSegment;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EngineMemError {
    #[error("CUDA unavailable: cwm cannot open {0:?} descriptors on this machine (no CUDA support in this build or no driver)")]
    CudaUnavailable(String),
    #[error("descriptor kind {0:?} is not supported")]
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
    /// Base pointer of each layer's storage (segment start; add `layout.layer_offsets[l]`).
    layer_base: Vec<*mut u8>,
    _segments: Vec<Arc<ShmSegment>>,
}

// The pointers target shared mappings owned by `_segments`, which live as long as `self`.
unsafe impl Send for EngineKv {}
unsafe impl Sync for EngineKv {}

impl EngineKv {
    /// Open every descriptor (one mapping per distinct segment) and derive the layout.
    pub fn open(
        descriptors: &[IpcDescriptor],
        kv_layout_hint: Option<&str>,
    ) -> Result<EngineKv, EngineMemError> {
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
                    return Err(EngineMemError::CudaUnavailable(d.kind().to_string()))
                }
                IpcDescriptor::Unsupported { kind } => {
                    return Err(EngineMemError::UnsupportedKind(kind.clone()))
                }
            }
        }
        let layout = KvLayout::from_tensors(&metadata, kv_layout_hint)?;
        for (layer, (seg, &span)) in layer_segments.iter().zip(&layout.layer_spans).enumerate() {
            if span > seg.len() {
                return Err(EngineMemError::OutOfSegment {
                    layer,
                    span,
                    len: seg.len(),
                });
            }
        }
        let layer_base = layer_segments.iter().map(|s| s.as_mut_ptr()).collect();
        let mut unique: Vec<Arc<ShmSegment>> = segments.into_values().collect();
        unique.sort_by(|a, b| a.name().cmp(b.name()));
        Ok(EngineKv {
            layout,
            layer_base,
            _segments: unique,
        })
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
            |engine, object, len| std::ptr::copy_nonoverlapping(engine, section.add(object), len),
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
            |engine, object, len| std::ptr::copy_nonoverlapping(section.add(object), engine, len),
        );
    }

    /// Visit every contiguous run of the (plane, layer) rows of the blocks `wanted(index, id)`
    /// selects: `f(engine_ptr, object_offset, len)`.
    unsafe fn for_each_run(
        &self,
        plane: u64,
        layer: u64,
        blocks: &[u32],
        wanted: impl Fn(usize, u32) -> bool,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) {
        let l = &self.layout;
        let base = self.layer_base[layer as usize]
            .add((l.layer_offsets[layer as usize] + plane * l.plane_stride) as usize);
        let row = l.row_bytes() as usize;
        let bs = l.block_size as usize;
        let shape = l.block_shape();
        for (j, &b) in blocks.iter().enumerate() {
            if !wanted(j, b) {
                continue;
            }
            let block = base.add((b as u64 * l.block_stride) as usize);
            let object = j * bs * row;
            match shape {
                BlockShape::Contiguous => f(block, object, bs * row),
                BlockShape::RowMajor => {
                    for t in 0..bs {
                        f(
                            block.add(t * l.token_stride as usize),
                            object + t * row,
                            row,
                        )
                    }
                }
                BlockShape::Strided => {
                    // Token-major, as the object is: its side then moves sequentially and
                    // only the engine side jumps (~10-20% faster than head-major on HND;
                    // BENCHMARKS.md).
                    let hb = l.head_bytes as usize;
                    for t in 0..bs {
                        let token = block.add(t * l.token_stride as usize);
                        for h in 0..l.num_heads as usize {
                            f(
                                token.add(h * l.head_stride as usize),
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
