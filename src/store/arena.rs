//! The L1 memory arena: one mapping of the L1 budget, carved into page-aligned extents by a
//! best-fit allocator with coalescing.
//!
//! One mapping (instead of an allocation per object) means a freed object's pages are reused
//! already faulted in, so steady-state stores copy at memory speed with no page faults, and the
//! whole pool can be registered with CUDA (pinned) or shared with an engine as one region.
//! The arena only hands out byte ranges; what lives in them is the store's business.
//!
//! The mapping is either private anonymous memory or a POSIX shared-memory object cwm creates
//! (`/dev/shm/<name>`, mode 0600) so that engines can map the very same pages (engine-driven
//! transfers: an object's extent offset is the slot offset the engine copies into or out of).
//! A shared arena owns its name: it holds an exclusive `flock` on it for its lifetime (which is
//! how a later cwm tells a live pool from one a crashed cwm left behind), unlinks it on drop or
//! `unlink`, and backs its pages with tmpfs blocks (`fallocate`) before an extent is handed out,
//! so a full `/dev/shm` shows up as "no space" in the store instead of a SIGBUS in whoever
//! touches the page first.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

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
    /// No extent may end above this (the arena could not back more); `capacity` normally.
    limit: u64,
    by_offset: BTreeMap<u64, u64>,
    by_size: BTreeSet<(u64, u64)>,
    free_bytes: u64,
}

impl ExtentAllocator {
    pub fn new(capacity: u64) -> Self {
        let capacity = capacity - capacity % ALIGN;
        let mut a = ExtentAllocator {
            capacity,
            limit: capacity,
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

    /// The most bytes an allocation can ever get: the capacity, or less once `limit_to` ran.
    pub fn usable(&self) -> u64 {
        self.limit
    }

    /// Never again hand out bytes at or above `limit` (rounded down to a page).
    pub fn limit_to(&mut self, limit: u64) {
        self.limit = self.limit.min(limit - limit % ALIGN);
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
        let limit = self.limit;
        let &(size, offset) = self
            .by_size
            .range((need, 0)..)
            .find(|&&(_, offset)| offset + need <= limit)?;
        self.remove_free(offset, size);
        if size > need {
            self.insert_free(offset + need, size - need);
        }
        Some(Extent { offset, len: need })
    }

    /// Take exactly `extent` out of the free space (it must lie inside one free range): for a
    /// range someone else may still be using, such as a slot an engine leased from a cwm that
    /// died (`store::leases`). `false`, and nothing changes, if any byte of it is not free.
    pub fn take(&mut self, extent: Extent) -> bool {
        let Extent { offset, len } = extent;
        if len == 0 || offset % ALIGN != 0 || len % ALIGN != 0 {
            return false;
        }
        let Some((&start, &size)) = self.by_offset.range(..=offset).next_back() else {
            return false;
        };
        if start + size < offset + len {
            return false;
        }
        self.remove_free(start, size);
        if offset > start {
            self.insert_free(start, offset - start);
        }
        if start + size > offset + len {
            self.insert_free(offset + len, start + size - offset - len);
        }
        true
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

/// The mapped memory behind the allocator. Anonymous pages are committed lazily on first touch
/// (`MAP_NORESERVE`), so a large budget costs nothing until it is used; a shared pool's pages
/// are committed by `ensure_backed` before an extent is used.
pub struct Arena {
    base: NonNull<u8>,
    len: usize,
    /// Mapped bytes after `len`: a shared pool's `POOL_TAIL` (0 for anonymous memory).
    tail: usize,
    pool: Option<SharedPool>,
}

/// The POSIX shm object behind a shared arena.
struct SharedPool {
    /// The name engines open (no leading `/`).
    name: String,
    path: PathBuf,
    /// Open for the arena's lifetime: carries the `flock` that marks the pool as live.
    file: File,
    /// The object's inode: which pool an engine mapped, across restarts of cwm.
    ino: u64,
    /// Taken over from a cwm that died or stopped with engines attached (`adopt`).
    adopted: bool,
    /// Leave the name when dropped (engines that map it expect the next cwm to adopt it).
    keep: AtomicBool,
    /// Bytes `[0, backed)` have tmpfs blocks allocated.
    backed: AtomicU64,
    grow: Mutex<()>,
    unlinked: AtomicBool,
    /// Tests: pretend /dev/shm is full above this many bytes.
    #[cfg(test)]
    room: AtomicU64,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("len", &self.len)
            .field("shm_name", &self.shm_name())
            .finish()
    }
}

// SAFETY: the arena is plain memory owned by this value (unmapped on drop); it hands out raw
// pointers only, and who may touch which extent is decided by the store's locks.
unsafe impl Send for Arena {}
// SAFETY: as above; `&Arena` gives no access but raw pointers.
unsafe impl Sync for Arena {}

/// Prefix of the pool names cwm picks itself: `cwm_l1_<pid>_<n>`.
pub const POOL_PREFIX: &str = "cwm_l1_";
/// The `<n>` of the next pool (and private build name) this process picks.
static NEXT_POOL: AtomicU64 = AtomicU64::new(0);
/// The directory where Linux keeps POSIX shared-memory objects.
const SHM_DIR: &str = "/dev/shm";
/// Backing grows in steps of at least this much, so `fallocate` is not called per object.
const GROW_STEP: u64 = 64 << 20;
/// Bytes a shared pool's object has after its slots, for cwm's own bookkeeping that must
/// outlive a crash of cwm as long as the pool does (the slot leases, `store::leases`). Never
/// part of a slot; engines map it with the rest of the object and leave it alone.
pub const POOL_TAIL: u64 = 1 << 20;

impl Arena {
    /// Private anonymous memory of `len` bytes (rounded down to a page, at least one page).
    pub fn new(len: u64) -> io::Result<Arena> {
        let len = Self::round_len(len);
        // SAFETY: a fresh private anonymous mapping; checked for MAP_FAILED in `finish_map`.
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
        Self::finish_map(ptr, len, None)
    }

    /// A POSIX shared-memory object of `len` bytes that engines can map by name.
    ///
    /// `name` (without `/`) is used as given; `None` picks `cwm_l1_<pid>_<n>` and first removes
    /// pools of that form left behind by cwm processes that died. An existing object of the
    /// same name is replaced only if no live arena holds it (its `flock` is free); otherwise
    /// this fails with `AddrInUse`.
    pub fn shared(name: Option<&str>, len: u64) -> io::Result<Arena> {
        Self::shared_in(Path::new(SHM_DIR), name, len)
    }

    /// `shared`, with the object in `dir` instead of /dev/shm. Engines find pools only in
    /// /dev/shm (that is where `shm_open` looks); this is for benchmarks comparing tmpfs mounts
    /// (e.g. one with `huge=always`) and for tests.
    pub fn shared_in(dir: &Path, name: Option<&str>, len: u64) -> io::Result<Arena> {
        let len = Self::round_len(len);
        match name {
            Some(n) => {
                let bare = n.strip_prefix('/').unwrap_or(n);
                if bare.is_empty() || bare.len() > 255 || bare.contains(['/', '\0']) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("shm name {n:?}: expected a non-empty name without '/' or NUL"),
                    ));
                }
                Self::publish(dir, bare.to_string(), len)
            }
            None => {
                remove_stale_pools(dir);
                // Processes in other PID namespaces that share /dev/shm (containers with
                // `--ipc host`: every cwm there is pid 1) pick the same `<pid>`: a name held
                // by a live pool is skipped for the next `<n>`.
                let mut tries = 0;
                loop {
                    let name = format!(
                        "{POOL_PREFIX}{}_{}",
                        std::process::id(),
                        NEXT_POOL.fetch_add(1, Ordering::Relaxed)
                    );
                    match Self::publish(dir, name, len) {
                        Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < 64 => tries += 1,
                        other => return other,
                    }
                }
            }
        }
    }

    /// Build the pool `name` in `dir` and map it (see `shared`).
    fn publish(dir: &Path, name: String, len: usize) -> io::Result<Arena> {
        let path = dir.join(&name);
        // Build the object under a private name, lock it, size it, and only then give it its
        // public name (a hard link fails if the name exists, never replacing a live pool): a
        // pool is never visible under its name without its lock.
        let tmp = dir.join(format!(
            ".{POOL_PREFIX}tmp_{}_{}",
            std::process::id(),
            NEXT_POOL.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            // Another PID namespace's cwm building under the same private name.
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => io::Error::new(io::ErrorKind::AddrInUse, e),
                _ => e,
            })?;
        let published = (|| {
            lock_exclusive(&file)?;
            file.set_len(len as u64 + POOL_TAIL)?;
            fallocate(file.as_raw_fd(), len as u64, POOL_TAIL)?;
            for _ in 0..3 {
                match std::fs::hard_link(&tmp, &path) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        if !remove_if_stale(&path)? {
                            return Err(io::Error::new(
                                io::ErrorKind::AddrInUse,
                                format!("shm pool {path:?} is in use by a running cwm"),
                            ));
                        }
                        tracing::warn!(?path, "replaced a stale L1 pool left by a dead cwm");
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("shm pool {path:?} keeps reappearing"),
            ))
        })();
        let _ = std::fs::remove_file(&tmp);
        published?;
        Self::map_pool(name, path, file, len, false)
    }

    /// Take over the pool `name` (in /dev/shm) that a cwm which died, or stopped with engines
    /// attached, left behind: the very object engines still map, checked to be it (`ino`, as
    /// journaled when they registered), of `len` bytes (as `shared` rounds them), this user's
    /// own and private, and not held by a live cwm. Its bytes are left as they are, and its
    /// name stays when the arena is dropped (`unlink` removes it).
    pub fn adopt(name: &str, len: u64, ino: u64) -> io::Result<Arena> {
        Self::adopt_in(Path::new(SHM_DIR), name, len, ino)
    }

    /// `adopt`, with the object in `dir` (tests).
    pub fn adopt_in(dir: &Path, name: &str, len: u64, ino: u64) -> io::Result<Arena> {
        let len = Self::round_len(len);
        let refuse = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        if name.is_empty() || name.contains(['/', '\0']) {
            return Err(refuse(format!("{name:?} is not a pool name")));
        }
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)?;
        let meta = file.metadata()?;
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if !meta.is_file() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
            return Err(refuse(format!(
                "{path:?} is not a private pool of this user (mode {:o}, uid {})",
                meta.mode() & 0o7777,
                meta.uid()
            )));
        }
        if meta.ino() != ino {
            return Err(refuse(format!(
                "{path:?} is another object than the engines mapped (inode {}, journaled {ino})",
                meta.ino()
            )));
        }
        if meta.len() != len as u64 + POOL_TAIL {
            return Err(refuse(format!(
                "{path:?} has {} bytes, an L1 of this size needs {}",
                meta.len(),
                len as u64 + POOL_TAIL
            )));
        }
        lock_exclusive(&file).map_err(|e| match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("shm pool {path:?} is in use by a running cwm"),
            ),
            _ => e,
        })?;
        Self::map_pool(name.to_string(), path, file, len, true)
    }

    /// Map a locked, sized pool object: its `len` bytes of slots and its `POOL_TAIL`.
    fn map_pool(
        name: String,
        path: PathBuf,
        file: File,
        len: usize,
        adopted: bool,
    ) -> io::Result<Arena> {
        let ino = file.metadata()?.ino();
        // SAFETY: mapping `len + POOL_TAIL` bytes of a file of that size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + POOL_TAIL as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        let pool = SharedPool {
            name,
            path,
            file,
            ino,
            adopted,
            keep: AtomicBool::new(adopted),
            backed: AtomicU64::new(0),
            grow: Mutex::new(()),
            unlinked: AtomicBool::new(false),
            #[cfg(test)]
            room: AtomicU64::new(u64::MAX),
        };
        Self::finish_map(ptr, len, Some(pool))
    }

    /// The bytes an arena asked for `len` has: whole `ALIGN` units, at least one.
    pub fn round_len(len: u64) -> usize {
        (len - len % ALIGN).max(ALIGN) as usize
    }

    fn finish_map(
        ptr: *mut libc::c_void,
        len: usize,
        pool: Option<SharedPool>,
    ) -> io::Result<Arena> {
        if ptr == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            if let Some(pool) = pool.as_ref().filter(|p| !p.adopted) {
                let _ = std::fs::remove_file(&pool.path);
            }
            return Err(e);
        }
        let tail = if pool.is_some() {
            POOL_TAIL as usize
        } else {
            0
        };
        // Huge pages cut TLB misses on multi-MiB copies; advisory, so failure is fine (tmpfs
        // honours it only when /sys/kernel/mm/transparent_hugepage/shmem_enabled allows).
        // SAFETY: `ptr`/`len` are exactly the mapping just created; madvise changes no bytes.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        Ok(Arena {
            base: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len,
            tail,
            pool,
        })
    }

    /// Start of the mapping.
    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The shm name engines open, if this arena is a shared pool.
    pub fn shm_name(&self) -> Option<&str> {
        self.pool.as_ref().map(|p| p.name.as_str())
    }

    /// The shared pool's inode (what `adopt` checks), if this arena is one.
    pub fn pool_ino(&self) -> Option<u64> {
        self.pool.as_ref().map(|p| p.ino)
    }

    /// Whether this arena took over a pool left behind (`adopt`).
    pub fn adopted(&self) -> bool {
        self.pool.as_ref().is_some_and(|p| p.adopted)
    }

    /// The shared pool's `POOL_TAIL` bytes after its slots, if this arena is one.
    pub fn tail(&self) -> Option<(*mut u8, usize)> {
        // SAFETY: the tail is mapped right after the slots (`map_pool`).
        (self.tail > 0).then(|| (unsafe { self.base.as_ptr().add(self.len) }, self.tail))
    }

    /// Keep the pool's name when this arena is dropped: engines still map it and the next cwm
    /// adopts it. `unlink` still removes it.
    pub fn retain_name(&self) {
        if let Some(pool) = &self.pool {
            pool.keep.store(true, Ordering::Release);
        }
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

    /// Make sure `extent` has memory behind it. Anonymous memory always has; a shared pool
    /// allocates tmpfs blocks up to the extent's end (in `GROW_STEP`s) and fails with the OS
    /// error (ENOSPC when /dev/shm is full) if it cannot.
    pub fn ensure_backed(&self, extent: Extent) -> io::Result<()> {
        let Some(pool) = &self.pool else {
            return Ok(());
        };
        let end = extent.offset + extent.len;
        if end <= pool.backed.load(Ordering::Acquire) {
            return Ok(());
        }
        let _grow = pool.grow.lock();
        let backed = pool.backed.load(Ordering::Acquire);
        if end <= backed {
            return Ok(());
        }
        let fd = pool.file.as_raw_fd();
        let grow = |to: u64| {
            #[cfg(test)]
            if to > pool.room.load(Ordering::Relaxed) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            fallocate(fd, backed, to - backed)
        };
        // A whole step if there is room, else exactly what this extent needs.
        let step = (backed + GROW_STEP).min(self.len as u64).max(end);
        let new_backed = match grow(step) {
            Ok(()) => step,
            Err(_) if step > end => {
                grow(end)?;
                end
            }
            Err(e) => return Err(e),
        };
        pool.backed.store(new_backed, Ordering::Release);
        Ok(())
    }

    /// Commit `extent`'s pages now (backing them first if the arena is a shared pool), so the
    /// first store into them takes no page faults. Contents are left as they are: safe while
    /// the extent is in use.
    pub fn populate(&self, extent: Extent) -> io::Result<()> {
        self.ensure_backed(extent)?;
        // SAFETY: `ptr` checks the extent lies inside our mapping, which lives as long as self.
        unsafe { crate::prefault::populate(self.ptr(extent), extent.len as usize) }
    }

    /// Bytes `[0, n)` of the pool known to be backed (the whole arena if anonymous).
    pub fn backed_bytes(&self) -> u64 {
        self.pool
            .as_ref()
            .map_or(self.len as u64, |p| p.backed.load(Ordering::Acquire))
    }

    /// Tests: behave as if /dev/shm had room for only `bytes` of this pool.
    #[cfg(test)]
    pub(crate) fn limit_room(&self, bytes: u64) {
        if let Some(pool) = &self.pool {
            pool.room.store(bytes, Ordering::Relaxed);
        }
    }

    /// Remove the pool's name (engines can no longer open it; existing mappings stay valid
    /// until unmapped). Idempotent; nothing to do for anonymous memory.
    pub fn unlink(&self) {
        if let Some(pool) = &self.pool {
            if !pool.unlinked.swap(true, Ordering::AcqRel) {
                // Remove the name only while it still names our object.
                let ours = pool.file.metadata().map(|m| m.ino()).ok();
                let named = std::fs::metadata(&pool.path).map(|m| m.ino()).ok();
                if ours.is_some() && ours == named {
                    let _ = std::fs::remove_file(&pool.path);
                }
            }
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if !self
            .pool
            .as_ref()
            .is_some_and(|p| p.keep.load(Ordering::Acquire))
        {
            self.unlink();
        }
        // SAFETY: the mapping was created in `new`/`map_pool` with this length, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len + self.tail) };
    }
}

fn fallocate(fd: i32, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain syscall on a descriptor we own.
    let rc = unsafe { libc::fallocate(fd, 0, offset as libc::off_t, len as libc::off_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn lock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Remove `path` if no live arena holds it (its `flock` can be taken). Returns whether the
/// name is gone; `false` means a live cwm owns it.
fn remove_if_stale(path: &Path) -> io::Result<bool> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    match lock_exclusive(&file) {
        Ok(()) => {
            // Still the object we locked? Then nobody owns it: remove the name.
            let ino = file.metadata()?.ino();
            if std::fs::metadata(path).map(|m| m.ino()).ok() == Some(ino) {
                std::fs::remove_file(path).or_else(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
            }
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Remove `cwm_l1_<pid>_<n>` pools nobody holds (their `flock` is free: the cwm that made them
/// is gone, however it died) and half-built `.cwm_l1_tmp_<pid>_<n>` ones whose process is gone.
/// What a killed cwm leaves behind would otherwise hold its memory in /dev/shm forever.
pub fn remove_stale_pools(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let tmp_prefix = format!(".{POOL_PREFIX}tmp_");
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let (rest, building) = match name.strip_prefix(POOL_PREFIX) {
            Some(rest) => (rest, false),
            None => match name.strip_prefix(&tmp_prefix) {
                Some(rest) => (rest, true),
                None => continue,
            },
        };
        let Some(pid) = rest.split('_').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // A pool is published under its name only once locked, so for those the lock alone
        // tells; one still being built is not locked yet, so its builder must be gone too.
        if building && process_alive(pid) {
            continue;
        }
        if let Ok(true) = remove_if_stale(&entry.path()) {
            tracing::warn!(pool = name, pid, "removed an L1 pool left by a dead cwm");
            removed += 1;
        }
    }
    removed
}

/// Whether `pid` runs (a zombie does not: it has closed its files and released its locks).
fn process_alive(pid: i32) -> bool {
    if pid as u32 == std::process::id() {
        return true;
    }
    // SAFETY: signal 0 only checks whether the process exists.
    let exists = unsafe { libc::kill(pid, 0) } == 0
        || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
        });
    exists && !matches!(state, Some('Z' | 'X'))
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
    fn limit_keeps_extents_below_it() {
        let mut a = ExtentAllocator::new(8 * ALIGN);
        let x = a.allocate(ALIGN).unwrap();
        a.limit_to(3 * ALIGN + 17);
        assert_eq!(a.usable(), 3 * ALIGN);
        assert_eq!(a.allocate(2 * ALIGN).unwrap().offset, ALIGN);
        assert!(a.allocate(ALIGN).is_none(), "the rest lies above the limit");
        a.free(x);
        assert_eq!(a.allocate(ALIGN).unwrap().offset, 0);
    }

    fn pool_name(tag: &str) -> String {
        format!("cwm_test_pool_{}_{tag}", std::process::id())
    }

    #[test]
    fn shared_pool_is_mappable_by_name_private_and_unlinked_on_drop() {
        use std::os::unix::fs::PermissionsExt;
        let name = pool_name("share");
        let arena = Arena::shared(Some(&name), 4 * ALIGN).unwrap();
        assert_eq!(arena.shm_name(), Some(name.as_str()));
        let path = Path::new(SHM_DIR).join(&name);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            meta.len(),
            4 * ALIGN + POOL_TAIL,
            "the slots, then the lease table"
        );
        let extent = Extent {
            offset: ALIGN,
            len: ALIGN,
        };
        arena.ensure_backed(extent).unwrap();
        assert!(arena.backed_bytes() >= 2 * ALIGN);
        // Another process would open the name and map it: the same pages.
        let other = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // SAFETY: the test owns the file; the only other mapping is the arena's, and the
        // test reads through one after writing through the other, never concurrently.
        let map = unsafe { memmap2::MmapMut::map_mut(&other).unwrap() };
        // SAFETY: byte 5 of an extent the arena backed just above.
        unsafe { *arena.ptr(extent).add(5) = 42 };
        assert_eq!(map[ALIGN as usize + 5], 42);
        assert_eq!(
            Arena::shared(Some(&name), ALIGN).unwrap_err().kind(),
            io::ErrorKind::AddrInUse,
            "a live pool is never replaced"
        );
        drop(arena);
        assert!(!path.exists(), "unlinked on drop");
        assert_eq!(map[ALIGN as usize + 5], 42, "mappings outlive the name");
    }

    #[test]
    fn a_stale_pool_of_the_same_name_is_replaced() {
        let name = pool_name("stale");
        let path = Path::new(SHM_DIR).join(&name);
        std::fs::write(&path, b"left behind by a crashed cwm").unwrap();
        let arena = Arena::shared(Some(&format!("/{name}")), 2 * ALIGN).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            2 * ALIGN + POOL_TAIL
        );
        arena.unlink();
        assert!(!path.exists());
        arena.unlink();
    }

    #[test]
    fn a_pool_left_behind_is_adopted_only_as_the_object_engines_map() {
        let dir = tempfile::tempdir().unwrap();
        let name = pool_name("adopt");
        let arena = Arena::shared_in(dir.path(), Some(&name), 4 * ALIGN).unwrap();
        let ino = arena.pool_ino().unwrap();
        arena
            .populate(Extent {
                offset: 0,
                len: ALIGN,
            })
            .unwrap();
        // SAFETY: our own mapping, nothing else uses it.
        unsafe { arena.base().write_bytes(7, 16) };
        let live = Arena::adopt_in(dir.path(), &name, 4 * ALIGN, ino).unwrap_err();
        assert_eq!(
            live.kind(),
            io::ErrorKind::AddrInUse,
            "held by a live cwm: {live}"
        );
        arena.retain_name();
        drop(arena);
        let path = dir.path().join(&name);
        assert!(path.exists(), "a retained name outlives the arena");

        let wrong_ino = Arena::adopt_in(dir.path(), &name, 4 * ALIGN, ino + 1).unwrap_err();
        assert!(
            wrong_ino.to_string().contains("another object"),
            "{wrong_ino}"
        );
        let wrong_len = Arena::adopt_in(dir.path(), &name, 8 * ALIGN, ino).unwrap_err();
        assert!(wrong_len.to_string().contains("bytes"), "{wrong_len}");
        let adopted = Arena::adopt_in(dir.path(), &name, 4 * ALIGN, ino).unwrap();
        assert!(adopted.adopted());
        assert_eq!(adopted.shm_name(), Some(name.as_str()));
        // SAFETY: our own mapping, at least a page long.
        let kept = unsafe { *adopted.base().add(15) };
        assert_eq!(kept, 7, "bytes are left as they were");
        drop(adopted);
        assert!(path.exists(), "an adopted pool keeps its name when dropped");
        let adopted = Arena::adopt_in(dir.path(), &name, 4 * ALIGN, ino).unwrap();
        adopted.unlink();
        assert!(!path.exists(), "unlink removes it");
        drop(adopted);

        let other = dir.path().join("loose");
        std::fs::write(&other, vec![0; (4 * ALIGN + POOL_TAIL) as usize]).unwrap();
        std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let ino = std::fs::metadata(&other).unwrap().ino();
        let open = Arena::adopt_in(dir.path(), "loose", 4 * ALIGN, ino).unwrap_err();
        assert!(open.to_string().contains("not a private pool"), "{open}");
    }

    #[test]
    fn take_removes_exactly_a_free_range() {
        let mut a = ExtentAllocator::new(8 * ALIGN);
        let e = Extent {
            offset: 2 * ALIGN,
            len: 3 * ALIGN,
        };
        assert!(a.take(e));
        assert!(!a.take(e), "already taken");
        assert!(
            !a.take(Extent {
                offset: ALIGN,
                len: 2 * ALIGN
            }),
            "overlaps it"
        );
        assert_eq!(a.free_bytes(), 5 * ALIGN);
        let got: Vec<Extent> = std::iter::from_fn(|| a.allocate(ALIGN)).collect();
        assert_eq!(got.len(), 5);
        assert!(got
            .iter()
            .all(|g| g.offset + g.len <= e.offset || g.offset >= e.offset + e.len));
        a.free(e);
        assert_eq!(a.free_bytes(), 3 * ALIGN);
    }

    #[test]
    fn stale_default_pools_are_removed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let me = std::process::id();
        for n in [
            format!("{POOL_PREFIX}{dead}_0"),
            format!("{POOL_PREFIX}{me}_0"),
            format!(".{POOL_PREFIX}tmp_{dead}_3"),
            format!(".{POOL_PREFIX}tmp_{me}_4"),
            "unrelated".to_string(),
        ] {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        // A pool someone holds is live, whatever its name says.
        let held = dir.path().join(format!("{POOL_PREFIX}{dead}_9"));
        std::fs::write(&held, b"x").unwrap();
        let holder = File::open(&held).unwrap();
        lock_exclusive(&holder).unwrap();
        assert_eq!(remove_stale_pools(dir.path()), 3);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = vec![
            format!(".{POOL_PREFIX}tmp_{me}_4"),
            format!("{POOL_PREFIX}{dead}_9"),
            "unrelated".to_string(),
        ];
        want.sort();
        assert_eq!(
            left, want,
            "an unlocked pool is stale; one being built by a live process is not"
        );
    }

    #[test]
    fn a_default_name_held_by_a_live_pool_is_skipped() {
        // What a cwm in another container (also pid 1, same /dev/shm) looks like from here:
        // the next default names exist, locked.
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let next = NEXT_POOL.load(Ordering::Relaxed);
        let mut holders = Vec::new();
        for n in next..next + 4 {
            for name in [
                format!("{POOL_PREFIX}{me}_{n}"),
                format!(".{POOL_PREFIX}tmp_{me}_{n}"),
            ] {
                let path = dir.path().join(name);
                std::fs::write(&path, b"x").unwrap();
                let f = File::open(&path).unwrap();
                lock_exclusive(&f).unwrap();
                holders.push(f);
            }
        }
        let arena = Arena::shared_in(dir.path(), None, ALIGN).unwrap();
        let name = arena.shm_name().unwrap().to_string();
        assert!(name.starts_with(&format!("{POOL_PREFIX}{me}_")), "{name}");
        for held in &holders {
            assert_eq!(
                held.metadata().unwrap().len(),
                1,
                "a live pool was replaced"
            );
        }
        assert!(dir.path().join(&name).exists());
        drop(holders);
    }

    #[test]
    fn zombies_are_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not reaped yet: a zombie once it has exited.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while process_alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "child {pid} still alive"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.wait().unwrap();
        assert!(!process_alive(pid));
        assert!(process_alive(std::process::id() as i32));
    }

    #[test]
    fn arena_memory_is_writable() {
        let arena = Arena::new(2 * ALIGN).unwrap();
        let p = arena.ptr(Extent {
            offset: ALIGN,
            len: ALIGN,
        });
        // SAFETY: `p` is an extent of ALIGN bytes inside the live arena, used by nothing else.
        unsafe {
            std::ptr::write_bytes(p, 0xAB, ALIGN as usize);
            assert_eq!(*p.add(17), 0xAB);
        }
    }
}
