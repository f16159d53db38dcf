//! The disk's own limit: a sequential write (then fsync) and a sequential read of a file in
//! the directory the L2 tier uses, with `O_DIRECT` so neither the page cache nor its writeback
//! flatters the figure. A filesystem that refuses `O_DIRECT` (tmpfs) is measured through the
//! page cache instead, written back and dropped before the read, and the result says so.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

/// Bytes per `write`/`read` call: large enough for a disk's sequential rate.
const PIECE: usize = 4 << 20;
/// `O_DIRECT` wants buffers, offsets and lengths aligned to the logical block size.
const ALIGN: usize = 4096;

#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskLimit {
    pub bytes: u64,
    pub write: Duration,
    pub read: Duration,
    /// `O_DIRECT`, or why the page cache was used instead.
    pub method: String,
}

/// A page-aligned buffer of `PIECE` bytes with a non-zero pattern.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new() -> Aligned {
        let layout = std::alloc::Layout::from_size_align(PIECE, ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size; a null result is handled right below.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        let mut a = Aligned { ptr, layout };
        for (i, b) in a.bytes_mut().iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31) ^ 0x5a;
        }
        a
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of `PIECE` bytes owned by `self`, initialised in
        // `new` before any call reads it.
        unsafe { std::slice::from_raw_parts(self.ptr, PIECE) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, PIECE) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout and freed only here.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Write `bytes` (rounded up to whole pieces) sequentially into a scratch file under `dir`,
/// fsync, read them back, remove the file.
pub fn measure(dir: &Path, bytes: u64) -> anyhow::Result<DiskLimit> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("cwm-bench-disk-{}.tmp", std::process::id()));
    let result = measure_at(&path, bytes);
    let _ = std::fs::remove_file(&path);
    result
}

fn measure_at(path: &Path, bytes: u64) -> anyhow::Result<DiskLimit> {
    let pieces = bytes.div_ceil(PIECE as u64).max(1);
    let mut buf = Aligned::new();
    let open = |direct: bool, write: bool| {
        let mut o = OpenOptions::new();
        if write {
            o.write(true).create(true).truncate(true);
        } else {
            o.read(true);
        }
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    };
    let (mut f, method) = match open(true, true) {
        Ok(f) => (f, "O_DIRECT".to_string()),
        Err(e) => (
            open(false, true).with_context(|| format!("create {}", path.display()))?,
            format!("page cache, written back and dropped before the read (O_DIRECT: {e})"),
        ),
    };
    let direct = method == "O_DIRECT";
    let t = Instant::now();
    for _ in 0..pieces {
        f.write_all(buf.bytes()).context("write the scratch file")?;
    }
    f.sync_all().context("fsync the scratch file")?;
    let write = t.elapsed();
    drop(f);
    if !direct {
        drop_cached(path)?;
    }
    let mut f = open(direct, false).with_context(|| format!("open {}", path.display()))?;
    let t = Instant::now();
    for _ in 0..pieces {
        f.read_exact(buf.bytes_mut())
            .context("read the scratch file")?;
    }
    let read = t.elapsed();
    Ok(DiskLimit {
        bytes: pieces * PIECE as u64,
        write,
        read,
        method,
    })
}

/// Evict `path` from the page cache (written back first).
pub fn drop_cached(path: &Path) -> anyhow::Result<()> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    f.sync_all()?;
    // SAFETY: a plain syscall on a file descriptor owned by `f`, alive for the call.
    let rc = unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    anyhow::ensure!(rc == 0, "posix_fadvise({}) failed: {rc}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_real_file_and_removes_it() {
        let dir = std::env::temp_dir().join(format!("cwm-disk-limit-{}", std::process::id()));
        let r = measure(&dir, 5 << 20).unwrap();
        assert_eq!(
            r.bytes,
            2 * PIECE as u64,
            "5 MiB rounds up to two 4 MiB pieces"
        );
        assert!(r.write > Duration::ZERO && r.read > Duration::ZERO);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "scratch file left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
