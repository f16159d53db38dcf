//! The CUDA driver, loaded at run time: `libcuda.so` is looked for once, on first use, and a
//! host without it gets a clear error instead of a crash. cwm is written against the 12.8 API
//! (cudarc's `cuda-12080` bindings) and checks the driver's version before calling anything
//! newer than 12.0.
//!
//! Every thread binds the device's primary context before it calls the driver (`Device::bind`):
//! lanes, the sweep thread that drops reaped engines and the HTTP pool all may.

use std::ffi::CStr;
use std::sync::OnceLock;

use cudarc::driver::sys::{self, CUresult};

/// Oldest driver cwm accepts (the `_v2` entry points and `cuMemHostRegister` flags it uses).
pub const MIN_DRIVER: i32 = 12000;
/// First driver with `cuMemcpyBatchAsync`.
pub const BATCH_DRIVER: i32 = 12080;

/// One GPU this process can see.
pub struct Device {
    pub ordinal: i32,
    /// Canonical lowercase 8-4-4-4-12 form, without `GPU-` (what LMCache's metadata carries).
    pub uuid: String,
    pub name: String,
    pub total_mem: u64,
    ctx: sys::CUcontext,
}

// SAFETY: `ctx` is a primary context retained in `open_device` and never released (the
// `Driver` lives in a static), so the handle stays valid on every thread; the driver API is
// thread-safe and `Device` only ever passes the handle to `cuCtxSetCurrent`.
unsafe impl Send for Device {}
// SAFETY: as for Send: `&Device` exposes only `bind`, a thread-safe driver call on a handle
// that outlives the process's use of it.
unsafe impl Sync for Device {}

impl Device {
    /// Make this device's primary context current on the calling thread.
    pub fn bind(&self) -> Result<(), String> {
        // SAFETY: a `Device` exists only once the library is loaded (`driver()`), and `ctx` is
        // a retained primary context that is never released.
        check(unsafe { sys::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent")
    }
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
    pub fn device_by_uuid(&self, uuid: &str) -> Result<&Device, String> {
        let want = uuid
            .strip_prefix("GPU-")
            .unwrap_or(uuid)
            .to_ascii_lowercase();
        self.devices.iter().find(|d| d.uuid == want).ok_or_else(|| {
            let seen: Vec<&str> = self.devices.iter().map(|d| d.uuid.as_str()).collect();
            format!(
                "device UUID {uuid:?} not found among this host's GPUs {seen:?}: cwm must run on \
                 the engine's host and see its GPU (check CUDA_VISIBLE_DEVICES and the \
                 container's --gpus)"
            )
        })
    }
}

/// The driver, loaded on first call; the same error every time if it cannot be.
pub fn driver() -> Result<&'static Driver, String> {
    static DRIVER: OnceLock<Result<Driver, String>> = OnceLock::new();
    DRIVER.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Driver, String> {
    // cudarc panics on a missing library, so look first.
    // SAFETY: only tries to load libcuda (dlopen); calls nothing in it.
    if !unsafe { sys::is_culib_present() } {
        return Err(
            "no CUDA driver: libcuda.so was not found (install the NVIDIA driver, or \
                    run cwm where the engine's GPUs are visible; in a container use the NVIDIA \
                    container toolkit)"
                .to_string(),
        );
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
        return Err(format!(
            "CUDA driver {} is too old: cwm needs {} or newer (upgrade the NVIDIA driver)",
            version_str(version),
            version_str(MIN_DRIVER)
        ));
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

fn open_device(ordinal: i32) -> Result<Device, String> {
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
    let mut ctx = std::ptr::null_mut();
    check(
        // SAFETY: `dev` came from `cuDeviceGet`; the retained context is kept for the life
        // of the process (never released), which `Device`'s Send/Sync rely on.
        unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) },
        "cuDevicePrimaryCtxRetain",
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
        ctx,
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
pub fn check(r: CUresult, what: &str) -> Result<(), String> {
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
    Err(format!("{what} failed: {r:?} ({}) {text}", r as i32))
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
