//! Engine allocations opened with `cuIpcOpenMemHandle`: one mapping per (device, handle) for
//! the whole process, shared by every layer and instance that names it and closed when the last
//! of them is dropped (unregister, or the reaper dropping a silent worker). An unclosed mapping
//! would pin a dead engine's GPU memory.

use std::collections::HashMap;

use cudarc::driver::sys;
use parking_lot::Mutex;

use super::driver::{check, Device};
use super::error::CudaError;

type Key = (i32, [u8; 64]);

struct Open {
    base: u64,
    size: u64,
    refs: usize,
}

static OPEN: Mutex<Option<HashMap<Key, Open>>> = Mutex::new(None);

/// One holder's reference to an opened allocation.
pub struct MappingRef {
    key: Key,
    device: &'static Device,
    /// Device address of the allocation's start and its size (`cuMemGetAddressRange`).
    pub base: u64,
    pub size: u64,
}

impl MappingRef {
    /// The (device ordinal, IPC handle) this refers to.
    pub fn key(&self) -> (i32, &[u8; 64]) {
        (self.key.0, &self.key.1)
    }

    /// Open (or share) the allocation behind `handle` on `device`.
    pub fn open(device: &'static Device, handle: &[u8; 64]) -> Result<MappingRef, CudaError> {
        let key = (device.ordinal, *handle);
        let mut open = OPEN.lock();
        let open = open.get_or_insert_with(HashMap::new);
        if let Some(m) = open.get_mut(&key) {
            m.refs += 1;
            return Ok(MappingRef {
                key,
                device,
                base: m.base,
                size: m.size,
            });
        }
        device.bind()?;
        let mut ptr = 0;
        let h = sys::CUipcMemHandle {
            reserved: handle.map(|b| b as std::ffi::c_char),
        };
        // CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
        check(
            // SAFETY: the device's context is bound; `h` is a by-value handle (an unknown one
            // is an error) and `ptr` a live out-pointer.
            unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, h, 1) },
            "cuIpcOpenMemHandle_v2",
        )?;
        let (mut base, mut size) = (0, 0usize);
        if let Err(e) = check(
            // SAFETY: `ptr` is the device address just opened; `base` and `size` are live
            // out-pointers.
            unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) },
            "cuMemGetAddressRange_v2",
        ) {
            // SAFETY: `ptr` was opened above and is not yet shared (not in OPEN): closed once.
            unsafe { sys::cuIpcCloseMemHandle(ptr) };
            return Err(e);
        }
        // The handle names the allocation's start; anything else is not an IPC handle we know.
        if base != ptr {
            // SAFETY: as above: opened here, not yet shared, closed once.
            unsafe { sys::cuIpcCloseMemHandle(ptr) };
            return Err(CudaError::NotAllocationStart { ptr, base });
        }
        open.insert(
            key,
            Open {
                base,
                size: size as u64,
                refs: 1,
            },
        );
        Ok(MappingRef {
            key,
            device,
            base,
            size: size as u64,
        })
    }
}

impl Drop for MappingRef {
    fn drop(&mut self) {
        let mut open = OPEN.lock();
        let Some(open) = open.as_mut() else { return };
        let Some(m) = open.get_mut(&self.key) else {
            return;
        };
        m.refs -= 1;
        if m.refs == 0 {
            open.remove(&self.key);
            let r = self.device.bind().and_then(|_| {
                check(
                    // SAFETY: the last reference is gone (refs reached 0 and the entry left
                    // OPEN under its lock), so no holder copies through `base` any more; the
                    // context is bound.
                    unsafe { sys::cuIpcCloseMemHandle(self.base) },
                    "cuIpcCloseMemHandle",
                )
            });
            match r {
                Ok(()) => tracing::info!(
                    device = self.device.ordinal,
                    base = self.base,
                    "closed engine mapping"
                ),
                Err(e) => tracing::error!(
                    device = self.device.ordinal,
                    "closing an engine mapping: {e}"
                ),
            }
        }
    }
}

/// How many engine allocations are open (for `/status`).
pub fn open_count() -> usize {
    OPEN.lock().as_ref().map_or(0, HashMap::len)
}
