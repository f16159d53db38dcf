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
pub mod pin_l1;
pub(crate) mod plan;
pub mod shm;
pub mod warm;

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
    CudaUnavailable(cuda::CudaError),
    #[error("CUDA: {0}")]
    Cuda(cuda::CudaError),
    /// The GPU did not complete cwm's copies in time: they may still land, so the caller must
    /// never reuse the L1 objects of this transfer (it leaks them).
    #[error("CUDA: {0}")]
    CopiesRunning(cuda::CudaError),
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
/// See [`EngineMemory::warm_up`]; returns the bytes it mapped.
pub type WarmUp = Box<dyn FnOnce() -> std::io::Result<u64> + Send>;

pub trait EngineMemory: Send + Sync {
    /// The geometry derived from the registered tensors.
    fn layout(&self) -> &KvLayout;

    /// Where the memory lives.
    fn device(&self) -> Device;

    /// Work that maps the engine's memory into cwm ahead of the first transfer (so copies take
    /// no page faults), to run off the request thread; `None` when there is nothing to do. It
    /// keeps the memory mapped while it runs and never changes a byte. Copies that write
    /// engine memory wait for it from the moment it is handed out until it has run (or been
    /// dropped): see `warm`.
    fn warm_up(&self) -> Option<WarmUp> {
        None
    }

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
    matches!(descriptors.first(), Some(IpcDescriptor::Cuda { .. }))
}

/// Why `cuda_raw` descriptors are refused at registration.
pub const CUDA_RAW_REFUSED: &str = "cuda_raw (LMCache's isolated_ipc mode): with it the engine \
     orders every transfer with 81-byte timeline-semaphore events, which cwm cannot wait on, so \
     every transfer would fail; register with lmcache.mp.isolated_ipc off (the default CUDA IPC \
     mode, `cuda` descriptors)";

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
        IpcDescriptor::Cuda { .. } => Ok(Box::new(cuda::CudaKv::open(
            descriptors,
            kv_layout_hint,
            pinned,
        )?)),
        IpcDescriptor::CudaRaw { .. } => Err(EngineMemError::UnsupportedKind(
            CUDA_RAW_REFUSED.to_string(),
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

#[cfg(test)]
mod warm_up_tests {
    use std::time::Duration;

    use connector_protocol::{ChunkHash, IpcDescriptor, ObjectKey, TensorMetadata};

    use super::*;
    use crate::engine_mem::shm::ShmSegment;
    use crate::prefault::thread_minor_faults;
    use crate::store::{L1Config, L1Store, Reservation};

    const NB: u64 = 64;
    const BS: u64 = 16;
    const NH: u64 = 8;
    const HS: u64 = 128;
    const LAYERS: u64 = 8;

    fn engine(tag: &str) -> (ShmSegment, Box<dyn EngineMemory>) {
        let layer = 2 * NB * BS * NH * HS; // bf16 elements per layer
        let name = format!("/cwm_warm_{}_{tag}", std::process::id());
        let seg = ShmSegment::create(&name, layer * LAYERS * 2).unwrap();
        // The engine wrote its cache: the pages exist, but not yet in the mapping cwm opens.
        // SAFETY: the whole of the segment just created, mapped while `seg` lives.
        unsafe { std::ptr::write_bytes(seg.as_mut_ptr(), 3, seg.len() as usize) };
        let d: Vec<IpcDescriptor> = (0..LAYERS)
            .map(|l| IpcDescriptor::CpuShm {
                shm_name: seg.name().to_string(),
                nbytes: seg.len(),
                metadata: TensorMetadata {
                    dtype: "bfloat16".into(),
                    shape: vec![2, NB, BS, NH, HS],
                    stride: vec![NB * BS * NH * HS, BS * NH * HS, NH * HS, HS, 1],
                    storage_offset: l * layer,
                    device_uuid: "cpu".into(),
                },
            })
            .collect();
        (seg, open(&d, None).unwrap())
    }

    /// Minor faults copying every block out of (`store`) or into the engine, on one thread, so
    /// its fault count sees them all.
    fn faults_copying(kv: &dyn EngineMemory, store: bool) -> u64 {
        let blocks: Vec<u32> = (0..NB as u32).collect();
        let len = kv.layout().object_bytes(NB * BS);
        let l1 = Arc::new(
            L1Store::new(&L1Config {
                capacity_bytes: len,
                lock_ttl: Duration::from_secs(60),
            })
            .unwrap(),
        );
        l1.populate(0, l1.capacity_bytes()).unwrap();
        let key = ObjectKey {
            model: "m".into(),
            kv_rank: 0,
            object_group: 0,
            chunk_hash: ChunkHash([1; 32]),
            cache_salt: "".into(),
        };
        let Reservation::Reserved(object) = l1.reserve(&key, len) else {
            panic!("no room")
        };
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        if store {
            return one.install(|| {
                let before = thread_minor_faults();
                let chunk = Gather {
                    blocks: &blocks,
                    object: &object,
                };
                kv.gather(&[chunk], &[]).unwrap();
                thread_minor_faults() - before
            });
        }
        object.commit();
        let read = l1.read(&key).expect("just committed");
        one.install(|| {
            let before = thread_minor_faults();
            let chunk = Scatter {
                blocks: &blocks,
                skip_blocks: 0,
                object: &read,
            };
            kv.scatter(&[chunk], &[]).unwrap();
            thread_minor_faults() - before
        })
    }

    fn faults_gathering(kv: &dyn EngineMemory) -> u64 {
        faults_copying(kv, true)
    }

    #[test]
    fn warmed_up_engine_memory_is_copied_without_page_faults() {
        let pages = 2 * NB * BS * NH * HS * 2 * LAYERS / 4096;
        let (_cold_seg, cold) = engine("cold");
        let cold_faults = faults_gathering(&*cold);
        // Reads of shared file pages fault 16 pages at a time (the kernel's fault-around).
        assert!(
            cold_faults >= pages / 32,
            "{cold_faults} faults, {pages} pages"
        );
        let (_seg, warm) = engine("warm");
        let mapped = warm.warm_up().expect("shm memory has a warm-up")().unwrap();
        assert_eq!(mapped, pages * 4096);
        let warm_faults = faults_gathering(&*warm);
        assert!(
            warm_faults < cold_faults / 10,
            "{warm_faults} faults after warm-up, {cold_faults} before"
        );
    }

    #[test]
    fn a_retrieve_during_the_warm_up_waits_for_it_and_a_store_does_not() {
        let pages = 2 * NB * BS * NH * HS * 2 * LAYERS / 4096;
        let (_seg, kv) = engine("gate");
        let mut warm_up = Some(kv.warm_up().expect("shm memory has a warm-up"));
        // A store reads: it goes ahead of the warm-up.
        let store_went_ahead = std::thread::scope(|s| {
            let store = s.spawn(|| faults_copying(&*kv, true));
            let t = std::time::Instant::now();
            while !store.is_finished() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let went_ahead = store.is_finished();
            if !went_ahead {
                warm_up.take().unwrap()().unwrap(); // release it, then fail below
            }
            went_ahead
        });
        assert!(store_went_ahead, "a store waited for the warm-up");
        let warm_up = warm_up.unwrap();
        std::thread::scope(|s| {
            let retrieve = s.spawn(|| faults_copying(&*kv, false));
            std::thread::sleep(Duration::from_millis(100));
            assert!(
                !retrieve.is_finished(),
                "the retrieve did not wait for the warm-up"
            );
            warm_up().unwrap();
            let faults = retrieve.join().unwrap();
            assert!(faults < pages / 100, "{faults} faults, {pages} pages");
        });
        // A warm-up dropped without running lets retrieves through.
        drop(kv.warm_up());
        faults_copying(&*kv, false);
    }
}
