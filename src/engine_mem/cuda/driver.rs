//! The CUDA driver, loaded at run time: `libcuda.so` is looked for once, on first use, and a
//! host without it gets a clear error instead of a crash. cwm is written against the 12.8 API
//! (cudarc's `cuda-12080` bindings) and checks the driver's version before calling anything
//! newer than 12.0.
//!
//! Every thread binds the device's primary context before it calls the driver (`Device::bind`):
//! lanes, the sweep thread that drops reaped engines and the HTTP pool all may. A device's
//! primary context is retained on its first `bind`, i.e. when an engine on that device
//! registers (not at load: a context costs hundreds of MiB of GPU memory that vLLM already
//! budgeted), with `CU_CTX_SCHED_BLOCKING_SYNC` set first so a waiting thread sleeps instead of
//! spinning a core. A device whose context cannot be retained is disabled alone, with its reason.

use std::ffi::CStr;
use std::sync::OnceLock;

use cudarc::driver::sys::{self, CUresult};

use super::error::CudaError;

/// Oldest driver cwm accepts (the `_v2` entry points and `cuMemHostRegister` flags it uses).
pub const MIN_DRIVER: i32 = 12000;
/// First driver with `cuMemcpyBatchAsync`.
pub const BATCH_DRIVER: i32 = 12080;

/// `CU_CTX_SCHED_BLOCKING_SYNC`: a thread waiting on the device blocks instead of spinning.
const CU_CTX_SCHED_BLOCKING_SYNC: u32 = 4;

/// One GPU this process can see.
pub struct Device {
    pub ordinal: i32,
    /// Canonical lowercase 8-4-4-4-12 form, without `GPU-` (what LMCache's metadata carries).
    pub uuid: String,
    pub name: String,
    pub total_mem: u64,
    /// `CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM` (91): whether a registered
    /// host pointer is a valid address for the device. `cuMemcpyBatchAsync` passes L1's host
    /// pointers as they are, so batching is off where this is false (seen on WSL2).
    pub host_pointer_for_registered_mem: bool,
    dev: sys::CUdevice,
    /// The primary context, retained on first use; an error disables this device only.
    ctx: OnceLock<Result<Context, CudaError>>,
}

#[derive(Clone, Copy)]
struct Context(sys::CUcontext);

// SAFETY: a CUcontext is an opaque handle to a process-wide driver object; the driver allows
// making it current from any thread, and cwm never mutates through the pointer itself.
unsafe impl Send for Context {}
// SAFETY: as for Send: the handle is only passed by value to thread-safe driver calls.
unsafe impl Sync for Context {}

impl Device {
    /// Make this device's primary context current on the calling thread, retaining it first
    /// if no thread did yet.
    pub fn bind(&self) -> Result<(), CudaError> {
        let ctx = self.context()?;
        // SAFETY: `ctx` was returned by cuDevicePrimaryCtxRetain and is never released while
        // the process runs, so it is a live context handle.
        check(unsafe { sys::cuCtxSetCurrent(ctx.0) }, "cuCtxSetCurrent")
    }

    /// Whether this device's context was retained (an engine on it registered), and if that
    /// failed, why.
    pub fn context_state(&self) -> Option<Result<(), CudaError>> {
        self.ctx
            .get()
            .map(|r| r.as_ref().map(|_| ()).map_err(Clone::clone))
    }

    fn context(&self) -> Result<Context, CudaError> {
        self.ctx
            .get_or_init(|| {
                let r = retain_primary(self.dev).map_err(|e| CudaError::DeviceDisabled {
                    ordinal: self.ordinal,
                    uuid: self.uuid.clone(),
                    source: Box::new(e),
                });
                match &r {
                    Ok(_) => tracing::info!(device = self.ordinal, "retained the GPU's context"),
                    Err(e) => tracing::error!("{e}"),
                }
                r
            })
            .clone()
    }
}

/// Set `BLOCKING_SYNC` on the device's primary context, then retain it.
fn retain_primary(dev: sys::CUdevice) -> Result<Context, CudaError> {
    // SAFETY: `dev` came from cuDeviceGet; setting the primary context's flags takes no
    // pointers. Since CUDA 11 it also succeeds when the context is already active.
    let flags = check(
        unsafe { sys::cuDevicePrimaryCtxSetFlags_v2(dev, CU_CTX_SCHED_BLOCKING_SYNC) },
        "cuDevicePrimaryCtxSetFlags_v2",
    );
    if let Err(e) = flags {
        tracing::warn!("waits on this GPU may spin a CPU core: {e}");
    }
    let mut ctx = std::ptr::null_mut();
    check(
        // SAFETY: `ctx` is a valid out-pointer for one CUcontext and `dev` a device handle from
        // cuDeviceGet; the retained context is never released while the process runs.
        unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) },
        "cuDevicePrimaryCtxRetain",
    )?;
    Ok(Context(ctx))
}

pub struct Driver {
    /// `cuDriverGetVersion`, e.g. 12080 for 12.8.
    pub version: i32,
    pub devices: Vec<Device>,
}

impl Driver {
    /// Whether `cuMemcpyBatchAsync` may be called.
    pub fn has_batch_copy(&self) -> bool {
        self.version >= BATCH_DRIVER
    }

    /// The local device with this UUID (as LMCache writes it, `GPU-` prefix tolerated).
    pub fn device_by_uuid(&self, uuid: &str) -> Result<&Device, CudaError> {
        let want = uuid
            .strip_prefix("GPU-")
            .unwrap_or(uuid)
            .to_ascii_lowercase();
        self.devices
            .iter()
            .find(|d| d.uuid == want)
            .ok_or_else(|| CudaError::UnknownDevice {
                uuid: uuid.to_string(),
                seen: self.devices.iter().map(|d| d.uuid.clone()).collect(),
            })
    }
}

/// The driver, loaded on first call; the same error every time if it cannot be.
pub fn driver() -> Result<&'static Driver, CudaError> {
    static DRIVER: OnceLock<Result<Driver, CudaError>> = OnceLock::new();
    DRIVER.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Driver, CudaError> {
    // cudarc panics on a missing library, so look first.
    // SAFETY: only tries to load libcuda (dlopen); calls nothing in it.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    // SAFETY: libcuda is present (checked above, so cudarc's loader does not panic) and
    // `cuInit` is the first call. The same holds for every driver call below and in
    // `open_device`, whose out-pointers are live locals of the types the calls write.
    check(unsafe { sys::cuInit(0) }, "cuInit")?;
    let mut version = 0;
    check(
        // SAFETY: see above; `version` is a live i32.
        unsafe { sys::cuDriverGetVersion(&mut version) },
        "cuDriverGetVersion",
    )?;
    if version < MIN_DRIVER {
        return Err(CudaError::DriverTooOld {
            found: version,
            need: MIN_DRIVER,
        });
    }
    let mut count = 0;
    check(
        // SAFETY: the driver is initialized; `count` is a live i32.
        unsafe { sys::cuDeviceGetCount(&mut count) },
        "cuDeviceGetCount",
    )?;
    let devices = (0..count).map(open_device).collect::<Result<_, _>>()?;
    Ok(Driver { version, devices })
}

fn open_device(ordinal: i32) -> Result<Device, CudaError> {
    let mut dev = 0;
    check(
        // SAFETY: called from `load` after `cuInit`, with `ordinal` below the device count.
        unsafe { sys::cuDeviceGet(&mut dev, ordinal) },
        "cuDeviceGet",
    )?;
    let mut uuid = sys::CUuuid { bytes: [0; 16] };
    check(
        // SAFETY: `dev` came from `cuDeviceGet`; `uuid` is a live CUuuid.
        unsafe { sys::cuDeviceGetUuid_v2(&mut uuid, dev) },
        "cuDeviceGetUuid_v2",
    )?;
    let mut name = [0 as std::ffi::c_char; 256];
    check(
        // SAFETY: the driver writes at most `name.len()` bytes, NUL included, into `name`.
        unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev) },
        "cuDeviceGetName",
    )?;
    let mut total = 0usize;
    check(
        // SAFETY: `dev` came from `cuDeviceGet`; `total` is a live usize.
        unsafe { sys::cuDeviceTotalMem_v2(&mut total, dev) },
        "cuDeviceTotalMem_v2",
    )?;
    let mut host_ptr = 0;
    check(
        // SAFETY: `host_ptr` is a valid out-pointer for one int; reading an attribute needs no
        // context.
        unsafe {
            sys::cuDeviceGetAttribute(
                &mut host_ptr,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM,
                dev,
            )
        },
        "cuDeviceGetAttribute(CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM)",
    )?;
    Ok(Device {
        ordinal,
        uuid: uuid_str(&uuid.bytes.map(|b| b as u8)),
        // SAFETY: `cuDeviceGetName` succeeded, so `name` holds a NUL-terminated string within
        // its 256 bytes.
        name: unsafe { CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
        total_mem: total as u64,
        host_pointer_for_registered_mem: host_ptr != 0,
        dev,
        ctx: OnceLock::new(),
    })
}

/// `12080` → `"12.8"`.
pub fn version_str(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// 16 bytes as `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn uuid_str(b: &[u8; 16]) -> String {
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `Ok` on `CUDA_SUCCESS`, else an error naming the call and the driver's reason.
pub fn check(r: CUresult, what: &'static str) -> Result<(), CudaError> {
    if r == CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut s: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: `check` is only called on a result of a driver call, so the library is loaded;
    // on success `s` points at a static NUL-terminated string owned by the driver, checked
    // for null before it is read.
    let text =
        if unsafe { sys::cuGetErrorString(r, &mut s) } == CUresult::CUDA_SUCCESS && !s.is_null() {
            // SAFETY: as above: a non-null static C string from the driver.
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        } else {
            String::new()
        };
    Err(CudaError::Call {
        call: what,
        code: r,
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_and_version_forms() {
        let b: [u8; 16] = std::array::from_fn(|i| (i * 17) as u8);
        assert_eq!(uuid_str(&b), "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(version_str(12080), "12.8");
        assert_eq!(version_str(13000), "13.0");
    }
}
