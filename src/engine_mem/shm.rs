//! POSIX shared-memory segments registered by an engine (`cpu_shm` descriptors).
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

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};

use super::EngineMemError;

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
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor we own and a zeroed out-struct.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if fs.f_type as i64 != libc::TMPFS_MAGIC as i64 {
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
