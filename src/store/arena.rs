//! The L1 memory arena: one anonymous mapping of the L1 budget, carved into page-aligned
//! extents by a best-fit allocator with coalescing.
//!
//! One mapping (instead of an allocation per object) means a freed object's pages are reused
//! already faulted in, so steady-state stores copy at memory speed with no page faults, and the
//! whole pool can later be registered with CUDA (pinned) or shared with an engine as one region.
//! The arena only hands out byte ranges; what lives in them is the store's business.

use std::collections::{BTreeMap, BTreeSet};
use std::ptr::NonNull;

/// Allocation granularity: a page, so every object starts page-aligned (good for copies, DMA
/// and for sharing slots with an engine).
pub const ALIGN: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// Best-fit free-extent allocator over `[0, capacity)`. Pure bookkeeping, no memory.
#[derive(Debug)]
pub struct ExtentAllocator {
    capacity: u64,
    by_offset: BTreeMap<u64, u64>,
    by_size: BTreeSet<(u64, u64)>,
    free_bytes: u64,
}

impl ExtentAllocator {
    pub fn new(capacity: u64) -> Self {
        let capacity = capacity - capacity % ALIGN;
        let mut a = ExtentAllocator {
            capacity,
            by_offset: BTreeMap::new(),
            by_size: BTreeSet::new(),
            free_bytes: 0,
        };
        if capacity > 0 {
            a.insert_free(0, capacity);
        }
        a
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    /// Bytes an allocation of `len` really takes.
    pub fn rounded(len: u64) -> u64 {
        len.max(1).div_ceil(ALIGN) * ALIGN
    }

    pub fn allocate(&mut self, len: u64) -> Option<Extent> {
        let need = Self::rounded(len);
        let &(size, offset) = self.by_size.range((need, 0)..).next()?;
        self.remove_free(offset, size);
        if size > need {
            self.insert_free(offset + need, size - need);
        }
        Some(Extent { offset, len: need })
    }

    /// Return an extent obtained from `allocate`, merging it with free neighbours.
    pub fn free(&mut self, extent: Extent) {
        let (mut offset, mut len) = (extent.offset, extent.len);
        debug_assert!(offset + len <= self.capacity);
        if let Some((&prev_off, &prev_len)) = self.by_offset.range(..offset).next_back() {
            debug_assert!(prev_off + prev_len <= offset, "double free of {extent:?}");
            if prev_off + prev_len == offset {
                self.remove_free(prev_off, prev_len);
                offset = prev_off;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.by_offset.get(&(offset + len)) {
            self.remove_free(offset + len, next_len);
            len += next_len;
        }
        self.insert_free(offset, len);
    }

    fn insert_free(&mut self, offset: u64, len: u64) {
        self.by_offset.insert(offset, len);
        self.by_size.insert((len, offset));
        self.free_bytes += len;
    }

    fn remove_free(&mut self, offset: u64, len: u64) {
        self.by_offset.remove(&offset);
        self.by_size.remove(&(len, offset));
        self.free_bytes -= len;
    }
}

/// The mapped memory behind the allocator. Pages are committed lazily on first touch
/// (`MAP_NORESERVE`), so a large budget costs nothing until it is used.
pub struct Arena {
    base: NonNull<u8>,
    len: usize,
}

// The arena is plain memory; who may touch which extent is decided by the store's locks.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

impl Arena {
    pub fn new(len: u64) -> std::io::Result<Arena> {
        let len = (len - len % ALIGN).max(ALIGN) as usize;
        // SAFETY: a fresh private anonymous mapping; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // Huge pages cut TLB misses on multi-MiB copies; advisory, so failure is fine.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        Ok(Arena {
            base: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len,
        })
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw pointer to the start of `extent`.
    ///
    /// # Panics
    /// If the extent lies outside the arena (a bookkeeping bug, never input-driven).
    pub fn ptr(&self, extent: Extent) -> *mut u8 {
        assert!(
            extent.offset + extent.len <= self.len as u64,
            "extent {extent:?} outside arena"
        );
        // SAFETY: in bounds, checked above.
        unsafe { self.base.as_ptr().add(extent.offset as usize) }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this length and is unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allocates_best_fit_and_coalesces() {
        let mut a = ExtentAllocator::new(10 * ALIGN);
        let x = a.allocate(ALIGN).unwrap();
        let y = a.allocate(3 * ALIGN - 1).unwrap();
        let z = a.allocate(ALIGN).unwrap();
        assert_eq!((x.offset, y.offset, z.offset), (0, ALIGN, 4 * ALIGN));
        assert_eq!(y.len, 3 * ALIGN);
        a.free(y);
        // Best fit: a 1-page request goes to the tail? No: the smallest hole that fits is y's.
        let w = a.allocate(ALIGN).unwrap();
        assert_eq!(w.offset, ALIGN);
        assert!(
            a.allocate(6 * ALIGN).is_none(),
            "only 5 free pages at the tail"
        );
        a.free(x);
        a.free(w);
        a.free(z);
        assert_eq!(a.free_bytes(), 10 * ALIGN);
        assert_eq!(
            a.allocate(10 * ALIGN).unwrap().offset,
            0,
            "everything merged back"
        );
    }

    proptest! {
        #[test]
        fn never_overlaps_and_frees_everything(ops in proptest::collection::vec((1u64..5 * ALIGN, any::<bool>()), 1..200)) {
            let mut a = ExtentAllocator::new(64 * ALIGN);
            let mut live: Vec<Extent> = Vec::new();
            for (len, free_one) in ops {
                if free_one && !live.is_empty() {
                    let e = live.swap_remove(len as usize % live.len());
                    a.free(e);
                } else if let Some(e) = a.allocate(len) {
                    for o in &live {
                        prop_assert!(e.offset + e.len <= o.offset || o.offset + o.len <= e.offset);
                    }
                    prop_assert_eq!(e.offset % ALIGN, 0);
                    live.push(e);
                }
                let used: u64 = live.iter().map(|e| e.len).sum();
                prop_assert_eq!(used + a.free_bytes(), a.capacity());
            }
            for e in live { a.free(e); }
            prop_assert_eq!(a.allocate(64 * ALIGN).map(|e| e.len), Some(64 * ALIGN));
        }
    }

    #[test]
    fn arena_memory_is_writable() {
        let arena = Arena::new(2 * ALIGN).unwrap();
        let p = arena.ptr(Extent {
            offset: ALIGN,
            len: ALIGN,
        });
        unsafe {
            std::ptr::write_bytes(p, 0xAB, ALIGN as usize);
            assert_eq!(*p.add(17), 0xAB);
        }
    }
}
