//! The host-memory backend: an engine's KV cache in POSIX shared-memory segments (`cpu_shm`
//! descriptors).
//!
//! A segment is opened by name (`/dev/shm/<name>`, which is what `shm_open` resolves to on
//! Linux) and mapped shared, read-write, for the lifetime of the registration. The engine may
//! unlink the name meanwhile; the mapping stays valid. Memory is accessed through raw pointers
//! because the engine writes it concurrently: no Rust reference ever covers it.
//!
//! The name comes from the client, so `open` maps only what an engine can legitimately have
//! created with `shm_open`: the final component is not followed if it is a symlink
//! (`O_NOFOLLOW`: a link to an ordinary file would have cwm write client bytes into that
//! file), the object must be a regular file on a tmpfs (the shared-memory filesystem), and it
//! must not be a live cwm L1 pool (cwm's own or another's: each holds an exclusive `flock` on
//! its pool, see `store::arena`), whose bytes belong to other tenants' chunks.
//!
//! A copy is split into (chunk, plane, layer) sections that run in parallel on the rayon pool;
//! each section is one task's alone, on both sides.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use connector_protocol::IpcDescriptor;
use memmap2::{MmapOptions, MmapRaw};
use rayon::prelude::*;

use super::checksum::{self, Checksums};
use super::warm::WarmGate;
use super::{plan, Device, EngineMemError, EngineMemory, Gather, KvLayout, Scatter};

/// An engine's KV cache in shared-memory segments: the mappings plus the layout.
pub struct ShmKv {
    layout: KvLayout,
    /// Base pointer of each layer's storage (segment start; add `layout.layer_offsets[l]`).
    layer_base: Vec<*mut u8>,
    _segments: Vec<Arc<ShmSegment>>,
    warm: Arc<WarmGate>,
}

// SAFETY: the pointers target shared mappings owned by `_segments`, which live as long as
// `self`; they are only dereferenced for bound-checked copies, never as references.
unsafe impl Send for ShmKv {}
// SAFETY: as above; `&ShmKv` hands out no access that is not a raw copy.
unsafe impl Sync for ShmKv {}

/// A section's object-side pointer, moved to the rayon task that alone copies it.
#[derive(Clone, Copy)]
struct Section(*mut u8);
// SAFETY: each section is a disjoint range of an object pinned for the copy's duration, and
// exactly one task touches it.
unsafe impl Send for Section {}
// SAFETY: as above.
unsafe impl Sync for Section {}

impl ShmKv {
    /// Open every descriptor (one mapping per distinct segment) and derive the layout.
    pub fn open(
        descriptors: &[IpcDescriptor],
        kv_layout_hint: Option<&str>,
    ) -> Result<ShmKv, EngineMemError> {
        let mut segments: HashMap<&str, Arc<ShmSegment>> = HashMap::new();
        let mut layer_segments = Vec::with_capacity(descriptors.len());
        let mut metadata = Vec::with_capacity(descriptors.len());
        for d in descriptors {
            let IpcDescriptor::CpuShm {
                shm_name,
                nbytes,
                metadata: m,
            } = d
            else {
                return Err(EngineMemError::UnsupportedKind(d.kind().to_string()));
            };
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
        Ok(ShmKv {
            layout,
            layer_base,
            _segments: unique,
            warm: Default::default(),
        })
    }

    /// Bytes of the object section of one (plane, layer) for a chunk of `blocks`.
    pub fn section_bytes(&self, blocks: usize) -> usize {
        (blocks as u64 * self.layout.block_size * self.layout.row_bytes()) as usize
    }

    /// Byte offset of the (plane, layer) section in an object of `chunk_tokens` tokens.
    pub fn section_offset(&self, plane: u64, layer: u64, chunk_tokens: u64) -> usize {
        plan::section_offset(&self.layout, plane, layer, chunk_tokens)
    }

    /// Copy the `(plane, layer)` rows of `blocks` from the engine into `section`
    /// (`section_bytes(blocks.len())` bytes, token-major).
    ///
    /// # Safety
    /// `blocks` must have passed `check_blocks`, `section` must be valid for writes of
    /// `section_bytes(blocks.len())` bytes and not overlap engine memory.
    pub unsafe fn gather_section(&self, plane: u64, layer: u64, blocks: &[u32], section: *mut u8) {
        let copy = |engine: *mut u8, object: usize, len: usize| {
            // SAFETY: `for_each_run` yields in-bounds engine runs and object offsets inside
            // the section (the caller's contract), and the two do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(engine, section.add(object), len) }
        };
        // SAFETY: the caller checked `blocks` and the indices (this function's contract),
        // which is what `for_each_run` requires.
        unsafe { self.for_each_run(plane, layer, blocks, |_, _| true, copy) };
    }

    /// Copy `section` into the `(plane, layer)` rows of `blocks`, leaving the first
    /// `skip_blocks` blocks of the list and every null block (id 0) untouched.
    ///
    /// # Safety
    /// As for `gather_section`, with `section` valid for reads.
    pub unsafe fn scatter_section(
        &self,
        plane: u64,
        layer: u64,
        blocks: &[u32],
        skip_blocks: usize,
        section: *const u8,
    ) {
        let copy = |engine: *mut u8, object: usize, len: usize| {
            // SAFETY: as in `gather_section`, reading the section and writing the engine.
            unsafe { std::ptr::copy_nonoverlapping(section.add(object), engine, len) }
        };
        let wanted = |j: usize, b: u32| j >= skip_blocks && b != 0;
        // SAFETY: as in `gather_section`: the caller's checked blocks meet `for_each_run`'s
        // contract.
        unsafe { self.for_each_run(plane, layer, blocks, wanted, copy) };
    }

    /// Run `copy(object_index, plane, layer, section)` for every (plane, layer) section of
    /// `objects` (each its blocks and its base address) in parallel: one task per section.
    /// Callers check each object's size against its blocks first.
    fn for_each_section<'b>(
        &self,
        objects: impl Iterator<Item = (&'b [u32], *mut u8)>,
        copy: impl Fn(usize, u64, u64, *mut u8) + Sync,
    ) {
        let sections: Vec<(usize, u64, u64, Section)> = objects
            .enumerate()
            .flat_map(|(i, (blocks, base))| {
                let chunk_tokens = blocks.len() as u64 * self.layout.block_size;
                // SAFETY: section offsets lie inside the object (callers checked its size).
                plan::sections(&self.layout, chunk_tokens)
                    .map(move |(p, l, off)| (i, p, l, Section(unsafe { base.add(off) })))
            })
            .collect();
        sections
            .par_iter()
            .for_each(|&(i, p, l, s)| copy(i, p, l, s.0));
    }

    /// The plan's runs of the (plane, layer) rows of the blocks `wanted(index, id)` selects:
    /// `f(engine_ptr, object_offset, len)`.
    ///
    /// # Safety
    /// `blocks` must have passed `check_blocks` and `plane`/`layer` be in range: registration
    /// checked that every layer's span, which covers every such run, lies in its segment.
    unsafe fn for_each_run(
        &self,
        plane: u64,
        layer: u64,
        blocks: &[u32],
        wanted: impl Fn(usize, u32) -> bool,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) {
        let base = self.layer_base[layer as usize] as usize;
        plan::for_each_run(
            &self.layout,
            base,
            plane,
            layer,
            blocks,
            wanted,
            |e, o, n| f(e as *mut u8, o, n),
        );
    }
}

impl EngineMemory for ShmKv {
    fn layout(&self) -> &KvLayout {
        &self.layout
    }

    fn device(&self) -> Device {
        Device::Host
    }

    fn warm_up(&self) -> Option<super::WarmUp> {
        let segments = self._segments.clone();
        let warming = self.warm.begin();
        // On the caller's thread, not the copy pool, which a first store may be using.
        Some(Box::new(move || {
            let _warming = warming;
            segments.iter().try_fold(0, |n, s| {
                // SAFETY: the Arc keeps the mapping alive; populate changes no byte.
                unsafe { crate::prefault::populate(s.as_mut_ptr(), s.len() as usize)? };
                Ok(n + s.len())
            })
        }))
    }

    fn gather(&self, chunks: &[Gather<'_>], _event: &[u8]) -> Result<Vec<u8>, EngineMemError> {
        for c in chunks {
            self.check_copy(c.blocks, c.object.len())?;
        }
        // SAFETY (per section): blocks were bound-checked above; `dst` is this task's own
        // section of a reserved object, `section_bytes(blocks.len())` long.
        let objects = chunks.iter().map(|c| (c.blocks, c.object.as_mut_ptr()));
        self.for_each_section(objects, |i, p, l, dst| {
            // SAFETY: see above: checked blocks, and `dst` is this task's own section.
            unsafe { self.gather_section(p, l, chunks[i].blocks, dst) }
        });
        Ok(Vec::new())
    }

    fn scatter(&self, chunks: &[Scatter<'_>], _event: &[u8]) -> Result<Vec<u8>, EngineMemError> {
        for c in chunks {
            self.check_copy(c.blocks, c.object.len())?;
        }
        // Writes fault page by page: let a running warm-up map them first (`warm`).
        self.warm.wait();
        // SAFETY (per section): bound-checked blocks; `src` is a section of an object pinned
        // by its `ReadGuard` for the duration of the copy.
        let objects = chunks
            .iter()
            .map(|c| (c.blocks, c.object.as_ptr() as *mut u8));
        self.for_each_section(objects, |i, p, l, src| {
            let c = &chunks[i];
            // SAFETY: see above: checked blocks, and `src` a section of a pinned object.
            unsafe { self.scatter_section(p, l, c.blocks, c.skip_blocks, src) }
        });
        Ok(Vec::new())
    }

    fn checksums(
        &self,
        blocks: &[u32],
        chunk_blocks: usize,
        layerwise: bool,
    ) -> Result<Checksums, EngineMemError> {
        self.check_blocks(blocks)?;
        Ok(checksum::block_checksums(
            &self.layout,
            blocks,
            chunk_blocks,
            layerwise,
            &|layer, offset, len, out| {
                // SAFETY: `block_checksums` asks only for runs of the registered view of
                // checked blocks, which registration proved lie inside the layer's segment.
                let src = unsafe {
                    self.layer_base[layer].add(self.layout.layer_offsets[layer] as usize + offset)
                };
                let start = out.len();
                out.reserve(len);
                // SAFETY: `out` has room for `len` more bytes; raw copy, since the engine may
                // write its memory concurrently.
                unsafe {
                    std::ptr::copy_nonoverlapping(src, out.as_mut_ptr().add(start), len);
                    out.set_len(start + len);
                }
            },
        ))
    }
}

pub struct ShmSegment {
    name: String,
    map: MmapRaw,
    /// Unlink the name when dropped (segments cwm created itself).
    owned: bool,
}

impl ShmSegment {
    /// Map `nbytes` of the segment `name` (with or without the leading `/`).
    pub fn open(name: &str, nbytes: u64) -> Result<ShmSegment, EngineMemError> {
        let path = shm_path(name)?;
        let open_err = |e: std::io::Error| EngineMemError::ShmOpen {
            name: name.to_string(),
            reason: e.to_string(),
        };
        let file = open_engine_object(&path).map_err(open_err)?;
        let actual = file.metadata().map_err(open_err)?.len();
        if actual < nbytes || nbytes == 0 {
            return Err(EngineMemError::ShmSize {
                name: name.to_string(),
                nbytes,
                actual,
            });
        }
        let map = MmapOptions::new()
            .len(nbytes as usize)
            .map_raw(&file)
            .map_err(open_err)?;
        Ok(ShmSegment {
            name: name.to_string(),
            map,
            owned: false,
        })
    }

    /// Create a new zero-filled segment `name` of `nbytes` (fails if the name exists); it is
    /// unlinked when dropped.
    pub fn create(name: &str, nbytes: u64) -> Result<ShmSegment, EngineMemError> {
        let path = shm_path(name)?;
        let open_err = |e: std::io::Error| EngineMemError::ShmOpen {
            name: name.to_string(),
            reason: e.to_string(),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(open_err)?;
        let mapped = file
            .set_len(nbytes)
            .and_then(|_| MmapOptions::new().len(nbytes as usize).map_raw(&file));
        match mapped {
            Ok(map) => Ok(ShmSegment {
                name: name.to_string(),
                map,
                owned: true,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(open_err(e))
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }
}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        if self.owned {
            if let Ok(path) = shm_path(&self.name) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Open `path` read-write if it is an engine's shared-memory object: not a symlink, a regular
/// file, on a tmpfs, and not locked by a live cwm L1 pool. Errors say which check failed.
fn open_engine_object(path: &Path) -> io::Result<File> {
    let refuse = |why: &str| io::Error::new(io::ErrorKind::PermissionDenied, why.to_string());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        // O_NONBLOCK: opening a FIFO or device must not block or have side effects before
        // the checks below refuse it.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refuse("it is a symbolic link; cwm maps only shm objects"),
            _ => e,
        })?;
    if !file.metadata()?.file_type().is_file() {
        return Err(refuse("not a regular file"));
    }
    // SAFETY: statfs is a C struct of integers: all-zero is a valid value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor we own and a zeroed out-struct.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The width of `f_type` and of the constant differs between targets.
    #[allow(clippy::unnecessary_cast)]
    let tmpfs = fs.f_type as i64 == libc::TMPFS_MAGIC as i64;
    if !tmpfs {
        return Err(refuse(
            "not on a tmpfs (the shared-memory filesystem); cwm maps only shm objects",
        ));
    }
    // A live L1 pool holds an exclusive flock for its lifetime: a shared one cannot be had.
    // SAFETY: plain syscalls on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0 {
        return Err(refuse(
            "it is the L1 pool of a running cwm, not an engine's KV cache",
        ));
    }
    // SAFETY: releases the shared lock just taken on a descriptor we own.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
    Ok(file)
}

/// `/dev/shm/<name>` for a POSIX shm name with or without its leading `/`.
fn shm_path(name: &str) -> Result<PathBuf, EngineMemError> {
    let bare = name.strip_prefix('/').unwrap_or(name);
    if bare.is_empty() || bare.contains('/') || bare.contains('\0') {
        return Err(EngineMemError::ShmName(name.to_string()));
    }
    Ok(PathBuf::from("/dev/shm").join(bare))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_shm_objects_open() {
        let name = format!("cwm_test_fifo_{}", std::process::id());
        let path = std::path::Path::new("/dev/shm").join(&name);
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = ShmSegment::open(&name, 1).err().map(|e| e.to_string());
        let _ = std::fs::remove_file(&path);
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("not a regular file")),
            "{e:?}"
        );
    }

    #[test]
    fn create_open_share_and_unlink() {
        let name = format!("/cwm_test_shm_{}", std::process::id());
        let created = ShmSegment::create(&name, 8192).unwrap();
        assert!(
            ShmSegment::create(&name, 8192).is_err(),
            "create is exclusive"
        );
        let opened = ShmSegment::open(&name, 8192).unwrap();
        // SAFETY: offset 5000 is inside both 8192-byte mappings of the same object, both live.
        unsafe {
            *created.as_mut_ptr().add(5000) = 42;
            assert_eq!(
                *opened.as_mut_ptr().add(5000),
                42,
                "both mappings see the same memory"
            );
        }
        assert!(matches!(
            ShmSegment::open(&name, 8193),
            Err(EngineMemError::ShmSize { .. })
        ));
        drop(created);
        assert!(ShmSegment::open(&name, 8192).is_err(), "unlinked on drop");
        assert!(matches!(
            ShmSegment::open("/a/b", 1),
            Err(EngineMemError::ShmName(_))
        ));
    }
}
