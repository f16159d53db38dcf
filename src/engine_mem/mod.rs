//! Access to an engine's paged KV memory: open what it registered, and copy chunks between its
//! blocks and L1 objects (gather on store, scatter on retrieve).
//!
//! Owns bounds: every block id is checked against the registered geometry before any byte moves,
//! and the geometry is checked against the memory's size at registration, so a bad request can
//! fail but can never read or write outside what the engine registered.
//!
//! Backends: `shm` (host memory in POSIX shared-memory segments, `cpu_shm` descriptors) and
//! `cuda` (`cuda` / `cuda_raw` descriptors: GPU memory over CUDA IPC, the driver loaded at run
//! time). `open` is the one door: it picks the backend by descriptor kind. Both run the same copy
//! plan (`plan`: block ids + strides -> byte runs).

pub mod checksum;
pub mod cuda;
pub mod layout;
pub(crate) mod plan;
pub mod shm;

use std::fmt;

use std::sync::Arc;

use connector_protocol::IpcDescriptor;
use thiserror::Error;

use cuda::PinnedHost;

use crate::store::{ReadGuard, WriteGuard};
pub use checksum::Checksums;
pub use layout::{BlockShape, KvLayout, LayoutError};

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EngineMemError {
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    #[error("CUDA: {0}")]
    Cuda(String),
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
    #[error("descriptors mix kinds {first:?} and {other:?}: one engine's layers live in one kind of memory")]
    MixedKinds { first: String, other: String },
    #[error("no descriptors: the engine registered no KV memory")]
    NoDescriptors,
    #[error("object has {got} bytes, {blocks} blocks of this engine's layout need {want}")]
    ObjectSize {
        got: usize,
        want: usize,
        blocks: usize,
    },
}

/// Where an engine's KV memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// Host memory (shared-memory segments).
    Host,
    /// A CUDA device, by ordinal.
    Cuda(u32),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Host => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// One chunk of a store: the engine blocks holding its tokens, in order, and the reserved L1
/// object they are copied into.
pub struct Gather<'a> {
    pub blocks: &'a [u32],
    pub object: &'a WriteGuard,
}

/// One chunk of a retrieve: the engine blocks to fill, in order, the first `skip_blocks` of
/// them left untouched (the engine already has those tokens), and the L1 object read from.
pub struct Scatter<'a> {
    pub blocks: &'a [u32],
    pub skip_blocks: usize,
    pub object: &'a ReadGuard,
}

/// An engine's registered KV memory, whatever holds it.
///
/// A backend is a file in `engine_mem/` implementing this trait, plus one arm in [`open`]
/// naming the descriptor kind it opens. It owns how copies are split and run (the shm backend
/// fans sections out over the rayon pool; a device backend would queue them on a stream and
/// wait on the engine's `event` first). Objects are canonical (`KvLayout::object_bytes`), so
/// every backend shares cache entries with every other.
pub trait EngineMemory: Send + Sync {
    /// The geometry derived from the registered tensors.
    fn layout(&self) -> &KvLayout;

    /// Where the memory lives.
    fn device(&self) -> Device;

    /// Every id in range, or the first that is not.
    fn check_blocks(&self, blocks: &[u32]) -> Result<(), EngineMemError> {
        let num_blocks = self.layout().num_blocks;
        match blocks.iter().find(|&&b| b as u64 >= num_blocks) {
            Some(&block) => Err(EngineMemError::BlockId { block, num_blocks }),
            None => Ok(()),
        }
    }

    /// Copy each chunk's blocks into its object. `event` is the engine's IPC event handle for
    /// the store (empty when it sent none): work the engine queued before it must be complete
    /// before the copy reads. Returns the handle of an event that completes with the copy, for
    /// the reply (empty: nothing pending). The copy has completed when this returns.
    fn gather(&self, chunks: &[Gather<'_>], event: &[u8]) -> Result<Vec<u8>, EngineMemError>;

    /// Copy each chunk's object into its blocks; null blocks (id 0) are never written. As
    /// `gather` for `event` and the result.
    fn scatter(&self, chunks: &[Scatter<'_>], event: &[u8]) -> Result<Vec<u8>, EngineMemError>;

    /// LMCache's `/cache/checksums` digests of `blocks`, `chunk_blocks` per chunk.
    fn checksums(
        &self,
        blocks: &[u32],
        chunk_blocks: usize,
        layerwise: bool,
    ) -> Result<Checksums, EngineMemError>;

    /// Checks shared by every backend before a copy: ids in range, objects the right size.
    fn check_copy(&self, blocks: &[u32], object_len: usize) -> Result<(), EngineMemError> {
        self.check_blocks(blocks)?;
        let l = self.layout();
        let want = l.object_bytes(blocks.len() as u64 * l.block_size) as usize;
        if object_len != want {
            return Err(EngineMemError::ObjectSize {
                got: object_len,
                want,
                blocks: blocks.len(),
            });
        }
        Ok(())
    }
}

/// Whether the descriptors name GPU memory (which copies through pinned L1).
pub fn is_gpu(descriptors: &[IpcDescriptor]) -> bool {
    matches!(
        descriptors.first(),
        Some(IpcDescriptor::Cuda { .. } | IpcDescriptor::CudaRaw { .. })
    )
}

/// Open an engine's registered memory with the backend for its descriptors' kind.
pub fn open(
    descriptors: &[IpcDescriptor],
    kv_layout_hint: Option<&str>,
) -> Result<Box<dyn EngineMemory>, EngineMemError> {
    open_with(descriptors, kv_layout_hint, None)
}

/// As `open`; GPU backends copy through `pinned` L1 when given (else from pageable memory).
pub fn open_with(
    descriptors: &[IpcDescriptor],
    kv_layout_hint: Option<&str>,
    pinned: Option<Arc<PinnedHost>>,
) -> Result<Box<dyn EngineMemory>, EngineMemError> {
    let first = descriptors.first().ok_or(EngineMemError::NoDescriptors)?;
    if let Some(other) = descriptors.iter().find(|d| d.kind() != first.kind()) {
        return Err(EngineMemError::MixedKinds {
            first: first.kind().to_string(),
            other: other.kind().to_string(),
        });
    }
    match first {
        IpcDescriptor::CpuShm { .. } => {
            Ok(Box::new(shm::ShmKv::open(descriptors, kv_layout_hint)?))
        }
        IpcDescriptor::Cuda { .. } | IpcDescriptor::CudaRaw { .. } => Ok(Box::new(
            cuda::CudaKv::open(descriptors, kv_layout_hint, pinned)?,
        )),
        IpcDescriptor::Unsupported { kind } if kind == "cuda_vmm" => {
            Err(EngineMemError::UnsupportedKind(
                "cuda_vmm (LMCache's VMM IPC mode, use_vmm_api): register with the default \
                 CUDA IPC mode instead"
                    .to_string(),
            ))
        }
        IpcDescriptor::Unsupported { kind } => Err(EngineMemError::UnsupportedKind(kind.clone())),
    }
}
