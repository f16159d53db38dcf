//! POSIX shared-memory segments registered by an engine (`cpu_shm` descriptors).
//!
//! A segment is opened by name (`/dev/shm/<name>`, which is what `shm_open` resolves to on
//! Linux) and mapped shared, read-write, for the lifetime of the registration. The engine may
//! unlink the name meanwhile; the mapping stays valid. Memory is accessed through raw pointers
//! because the engine writes it concurrently: no Rust reference ever covers it.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(open_err)?;
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
