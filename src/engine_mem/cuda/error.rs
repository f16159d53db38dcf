//! What goes wrong with CUDA, typed: a failed driver call keeps its name and result code, and
//! every other refusal says what the user can do about it.

use cudarc::driver::sys::CUresult;
use thiserror::Error;

use super::driver::version_str;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CudaError {
    /// A driver call returned an error (`text` is the driver's description, if it has one).
    #[error("{call} failed: {code:?} ({}) {text}", *code as i32)]
    Call {
        call: &'static str,
        code: CUresult,
        text: String,
    },
    #[error(
        "no CUDA driver: libcuda.so was not found (install the NVIDIA driver, or run cwm where \
         the engine's GPUs are visible; in a container use the NVIDIA container toolkit)"
    )]
    NoDriver,
    #[error(
        "CUDA driver {} is too old: cwm needs {} or newer (upgrade the NVIDIA driver)",
        version_str(*found),
        version_str(*need)
    )]
    DriverTooOld { found: i32, need: i32 },
    #[error(
        "device UUID {uuid:?} not found among this host's GPUs {seen:?}: cwm must run on the \
         engine's host and see its GPU (check CUDA_VISIBLE_DEVICES and the container's --gpus)"
    )]
    UnknownDevice { uuid: String, seen: Vec<String> },
    #[error(
        "GPU {ordinal} ({uuid}) is disabled for this run: {source}; engines on other GPUs are \
         served"
    )]
    DeviceDisabled {
        ordinal: i32,
        uuid: String,
        source: Box<CudaError>,
    },
    #[error("no CUDA device to pin L1 with")]
    NoDevice,
    #[error(
        "layer {layer} is on GPU {device} but layer 0 on GPU {first}: one instance must \
         register one device"
    )]
    MixedDevices {
        layer: usize,
        device: i32,
        first: i32,
    },
    #[error("layer {layer}: bytes [{offset}, +{limit}) lie outside its {size}-byte allocation")]
    OutsideAllocation {
        layer: usize,
        offset: u64,
        limit: u64,
        size: u64,
    },
    #[error("a copy of bytes [{at}, +{len}) lies outside a {size}-byte device allocation")]
    OutsideDeviceAlloc { at: usize, len: usize, size: usize },
    #[error(
        "checksums of GPU memory are not supported (cwm does not read engine memory on the CPU)"
    )]
    NoChecksums,
    #[error("no layers registered")]
    NoLayers,
    #[error("cuIpcOpenMemHandle returned {ptr:#x}, inside an allocation starting at {base:#x}")]
    NotAllocationStart { ptr: u64, base: u64 },
    #[error(
        "the engine sent an isolated_ipc timeline-semaphore event (81 bytes), which cwm does \
         not support yet: use the default CUDA IPC mode (lmcache.mp.isolated_ipc off)"
    )]
    SemaphoreEvent,
    #[error("event_ipc_handle of {0} bytes: expected 64 (cudaIpcEventHandle_t) or empty")]
    EventHandleLength(usize),
    #[error(
        "pinning L1 failed at byte {done} of {len} (a {piece}-byte piece): {source} (check \
         `ulimit -l` and the container's memlock limit)"
    )]
    Pin {
        len: usize,
        done: usize,
        piece: usize,
        source: Box<CudaError>,
    },
    #[error("{what}: not complete after {:.1} s ({})", *budget_ms as f64 / 1e3, super::wait::WAIT_ENV)]
    Timeout { what: &'static str, budget_ms: u64 },
    #[error("this instance is broken ({0}); re-register it")]
    Broken(Box<CudaError>),
    #[error("{0}; the instance is now broken")]
    NowBroken(Box<CudaError>),
    #[error("the registration's event: {0}")]
    RegistrationEvent(Box<CudaError>),
    #[error("layer {layer}: {source}")]
    BadRefCounter {
        layer: usize,
        source: super::ref_counter::RefCounterError,
    },
    #[error("no GPU descriptors")]
    NoGpuDescriptors,
    #[error("{source} (copy {index})")]
    BatchCopy {
        index: usize,
        source: Box<CudaError>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_errors_keep_their_cause_and_read_as_before() {
        let call = CudaError::Call {
            call: "cuMemHostRegister_v2",
            code: CUresult::CUDA_ERROR_OUT_OF_MEMORY,
            text: "out of memory".into(),
        };
        let pin = CudaError::Pin {
            len: 1 << 30,
            done: 0,
            piece: 1 << 20,
            source: Box::new(call.clone()),
        };
        let text = pin.to_string();
        assert!(
            text.starts_with("pinning L1 failed at byte 0 of 1073741824"),
            "{text}"
        );
        assert!(text.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{text}");
        assert!(text.contains("ulimit -l"), "{text}");
        let broken = CudaError::Broken(Box::new(CudaError::NowBroken(Box::new(
            CudaError::Timeout {
                what: "the engine's event",
                budget_ms: 1500,
            },
        ))));
        assert_eq!(
            broken.to_string(),
            "this instance is broken (the engine's event: not complete after 1.5 s \
             (CWM_CUDA_WAIT_SECS); the instance is now broken); re-register it"
        );
        let CudaError::Broken(inner) = broken else {
            unreachable!()
        };
        assert!(
            matches!(*inner, CudaError::NowBroken(_)),
            "the cause is kept, typed"
        );
    }
}
