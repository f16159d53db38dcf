//! Device memory this process allocates itself. cwm's serving path never does (an engine's KV
//! arrives over IPC: `mapping`); `cwm bench tiers` does, for blocks that `CudaKv::in_allocation`
//! copies as it copies an engine's, and for the plain `cuMemcpy` limit beside them.

use cudarc::driver::sys;

use super::driver::{check, Device};
use super::error::CudaError;

/// `len` bytes of device memory on one GPU, freed when dropped.
pub struct DeviceAlloc {
    device: &'static Device,
    ptr: sys::CUdeviceptr,
    len: usize,
}

impl DeviceAlloc {
    pub fn new(device: &'static Device, len: usize) -> Result<DeviceAlloc, CudaError> {
        device.bind()?;
        let mut ptr = 0;
        check(
            // SAFETY: the device's context is current (bound above); `ptr` is a live
            // out-pointer for one device address.
            unsafe { sys::cuMemAlloc_v2(&mut ptr, len) },
            "cuMemAlloc_v2",
        )?;
        Ok(DeviceAlloc { device, ptr, len })
    }

    pub fn device(&self) -> &'static Device {
        self.device
    }

    /// The allocation's device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `host.len()` bytes from byte `at` of the allocation into `host`: one synchronous
    /// `cuMemcpyDtoH` (no stream, no plan: the limit a transfer is compared with).
    pub fn copy_to_host(&self, at: usize, host: &mut [u8]) -> Result<(), CudaError> {
        self.check_range(at, host.len())?;
        self.device.bind()?;
        check(
            // SAFETY: `[ptr + at, +len)` lies inside this live allocation (checked above) and
            // `host` is a live exclusive slice of `len` bytes; the call returns once the copy
            // is done, so nothing touches either afterwards. The context is current.
            unsafe {
                sys::cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), self.ptr + at as u64, host.len())
            },
            "cuMemcpyDtoH_v2",
        )
    }

    /// `host` into the allocation from byte `at`: one synchronous `cuMemcpyHtoD`.
    pub fn copy_from_host(&self, at: usize, host: &[u8]) -> Result<(), CudaError> {
        self.check_range(at, host.len())?;
        self.device.bind()?;
        check(
            // SAFETY: as in `copy_to_host`, reading `host` instead of writing it.
            unsafe { sys::cuMemcpyHtoD_v2(self.ptr + at as u64, host.as_ptr().cast(), host.len()) },
            "cuMemcpyHtoD_v2",
        )
    }

    fn check_range(&self, at: usize, len: usize) -> Result<(), CudaError> {
        match at.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(CudaError::OutsideDeviceAlloc {
                at,
                len,
                size: self.len,
            }),
        }
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: `ptr` came from cuMemAlloc_v2 and is freed only here; whoever copied
            // through it (a `CudaKv` holds it in an `Arc`) waited for its copies first.
            unsafe { sys::cuMemFree_v2(self.ptr) };
        }
    }
}
