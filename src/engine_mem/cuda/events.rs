//! The engine's CUDA events (spec §3.5).
//!
//! The engine sends the handle of an interprocess event it recorded after writing (store) or
//! before reusing (retrieve) its KV blocks. cwm imports it and polls it on the host with a
//! deadline (`wait`) before it enqueues any copy, so a dead or stalled engine leaves nothing
//! queued behind its event.
//!
//! cwm replies with an EMPTY event handle: every copy has completed before the reply is sent,
//! and LMCache 0.5.6's client treats an empty handle as "the remote side submitted no device
//! work" (`DeviceMessagingFuture._on_raw_future_complete` imports an event only when the bytes
//! are non-empty), so there is no exported event whose lifetime could end before the client
//! imports it.

use cudarc::driver::sys;

use super::driver::check;
use super::error::CudaError;
use super::wait::{self, WaitError};

/// Length of an `isolated_ipc` timeline-semaphore handle (`!B64sQQ`).
pub const SEMAPHORE_HANDLE: usize = 81;

/// An imported engine event; destroyed when dropped.
struct Imported(sys::CUevent);

impl Drop for Imported {
    fn drop(&mut self) {
        // SAFETY: the event was returned by cuIpcOpenEventHandle, is destroyed only here, and
        // no stream refers to it (cwm only queries it from the host).
        unsafe { sys::cuEventDestroy_v2(self.0) };
    }
}

/// Wait (at most `wait::budget()`) until the engine's event `handle` completed (empty: nothing
/// to wait for). The caller's device context must be current.
pub(super) fn wait_engine(handle: &[u8]) -> Result<(), WaitError> {
    match handle.len() {
        0 => Ok(()),
        64 => {
            let h = sys::CUipcEventHandle {
                reserved: std::array::from_fn(|i| handle[i] as std::ffi::c_char),
            };
            let mut ev = std::ptr::null_mut();
            // SAFETY: `ev` is a valid out-pointer; the handle is passed by value.
            check(
                // SAFETY: the caller bound the device's context; `h` is a by-value 64-byte
                // handle (an invalid one is an error, not UB) and `ev` a live out-pointer.
                unsafe { sys::cuIpcOpenEventHandle(&mut ev, h) },
                "cuIpcOpenEventHandle",
            )
            .map_err(WaitError::Failed)?;
            let ev = Imported(ev);
            // SAFETY: `ev.0` is the live event imported above (destroyed when `ev` drops,
            // after the poll).
            wait::poll("the engine's event", wait::budget(), || unsafe {
                sys::cuEventQuery(ev.0)
            })
        }
        SEMAPHORE_HANDLE => Err(WaitError::Failed(CudaError::SemaphoreEvent)),
        n => Err(WaitError::Failed(CudaError::EventHandleLength(n))),
    }
}
