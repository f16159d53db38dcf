//! POSIX shared-memory segments registered by an engine (`cpu_shm` descriptors).
//!
//! A segment is opened by name (`/dev/shm/<name>`, which is what `shm_open` resolves to on
//! Linux) and mapped shared, read-write, for the lifetime of the registration. The engine may
//! unlink the name meanwhile; the mapping stays valid. Memory is accessed through raw pointers
//! because the engine writes it concurrently: no Rust reference ever covers it.

use std::fs::OpenOptions;
use std::path::PathBuf;

use memmap2::{MmapOptions, MmapRaw};

use super::EngineMemError;

pub struct ShmSegment {
    name: String,
    map: MmapRaw,
}

impl ShmSegment {
    /// Map `nbytes` of the segment `name` (with or without the leading `/`).
    pub fn open(name: &str, nbytes: u64) -> Result<ShmSegment, EngineMemError> {
        let bare = name.strip_prefix('/').unwrap_or(name);
        if bare.is_empty() || bare.contains('/') || bare.contains('\0') {
            return Err(EngineMemError::ShmName(name.to_string()));
        }
        let path = PathBuf::from("/dev/shm").join(bare);
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
        })
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
