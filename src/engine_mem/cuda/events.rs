//! CUDA events across processes, as LMCache's client expects them (spec §3.5).
//!
//! The engine sends the handle of an interprocess event it recorded after writing (store) or
//! before reusing (retrieve) its KV blocks: the copy stream waits on it before touching engine
//! memory. cwm answers with the handle of its own `Interprocess | DisableTiming` event, recorded
//! after the copies; the last `KEEP` exported events stay alive so the engine can still open
//! one after the reply.

use std::collections::VecDeque;

use cudarc::driver::sys;
use parking_lot::Mutex;

use super::driver::{check, Device};

const CU_EVENT_DISABLE_TIMING: u32 = 2;
const CU_EVENT_INTERPROCESS: u32 = 4;
/// Exported events kept alive (LMCache keeps 2048).
const KEEP: usize = 2048;
/// Length of an `isolated_ipc` timeline-semaphore handle (`!B64sQQ`).
const SEMAPHORE_HANDLE: usize = 81;

/// An imported engine event; destroyed when dropped (after the stream consumed the wait).
pub struct Imported(sys::CUevent);

impl Drop for Imported {
    fn drop(&mut self) {
        // SAFETY: the event was opened by `cuIpcOpenEventHandle` and is destroyed once, here;
        // the driver defers the destruction until the stream's wait on it has completed.
        unsafe { sys::cuEventDestroy_v2(self.0) };
    }
}

/// Make `stream` wait on the engine's event `handle` (empty: nothing to wait for).
pub(super) fn wait_engine(
    stream: sys::CUstream,
    handle: &[u8],
) -> Result<Option<Imported>, String> {
    match handle.len() {
        0 => Ok(None),
        64 => {
            let h = sys::CUipcEventHandle {
                reserved: std::array::from_fn(|i| handle[i] as std::ffi::c_char),
            };
            let mut ev = std::ptr::null_mut();
            check(
                // SAFETY: the caller bound the device's context; `h` is a by-value 64-byte
                // handle (an invalid one is an error, not UB) and `ev` a live out-pointer.
                unsafe { sys::cuIpcOpenEventHandle(&mut ev, h) },
                "cuIpcOpenEventHandle",
            )?;
            let ev = Imported(ev);
            check(
                // SAFETY: `stream` is the engine's live stream (its lock is held by the caller)
                // and `ev` the event just opened, kept alive by `Imported` until after the sync.
                unsafe { sys::cuStreamWaitEvent(stream, ev.0, 0) },
                "cuStreamWaitEvent",
            )?;
            Ok(Some(ev))
        }
        SEMAPHORE_HANDLE => Err("the engine sent an isolated_ipc timeline-semaphore event \
             (81 bytes), which cwm does not support yet: use the default CUDA IPC mode \
             (lmcache.mp.isolated_ipc off)"
            .to_string()),
        n => Err(format!(
            "event_ipc_handle of {n} bytes: expected 64 (cudaIpcEventHandle_t) or empty"
        )),
    }
}

struct Exported {
    device: &'static Device,
    event: sys::CUevent,
}

// SAFETY: a CUevent is a driver handle usable from any thread that binds its context, and
// `record_exported` binds `device` before destroying an old one.
unsafe impl Send for Exported {}

static EXPORTED: Mutex<VecDeque<Exported>> = Mutex::new(VecDeque::new());

/// Record an interprocess event on `stream` after what was enqueued; its 64-byte handle.
pub(super) fn record_exported(
    device: &'static Device,
    stream: sys::CUstream,
) -> Result<Vec<u8>, String> {
    let mut ev = std::ptr::null_mut();
    check(
        // SAFETY: the caller bound `device`'s context; `ev` is a live out-pointer.
        unsafe { sys::cuEventCreate(&mut ev, CU_EVENT_INTERPROCESS | CU_EVENT_DISABLE_TIMING) },
        "cuEventCreate",
    )?;
    let exported = Exported { device, event: ev };
    let mut h = sys::CUipcEventHandle { reserved: [0; 64] };
    // SAFETY: `ev` was just created in the bound context and `stream` is the caller's locked,
    // live stream.
    let r = check(unsafe { sys::cuEventRecord(ev, stream) }, "cuEventRecord").and_then(|_| {
        check(
            // SAFETY: `ev` is a live interprocess event; `h` is a live 64-byte out-handle.
            unsafe { sys::cuIpcGetEventHandle(&mut h, ev) },
            "cuIpcGetEventHandle",
        )
    });
    if let Err(e) = r {
        // SAFETY: `ev` was created above and never handed out (no handle was exported).
        unsafe { sys::cuEventDestroy_v2(ev) };
        return Err(e);
    }
    let mut kept = EXPORTED.lock();
    kept.push_back(exported);
    while kept.len() > KEEP {
        let old = kept.pop_front().expect("non-empty");
        // Long complete: every copy is synchronized before its reply.
        if old.device.bind().is_ok() {
            // SAFETY: `old` was popped from the queue, so this is its only destruction, with
            // its device's context bound; an engine still opening its handle gets an error.
            unsafe { sys::cuEventDestroy_v2(old.event) };
        }
    }
    Ok(h.reserved.map(|b| b as u8).to_vec())
}
