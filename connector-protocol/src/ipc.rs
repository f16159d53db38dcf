//! `DeviceIPCWrapper`: msgpack ext type 1 whose data is a tagged `WireIPCData` map (spec §2.3).
//!
//! `register_kv_cache` carries an array of these, one per layer tensor. Descriptors are parsed
//! into typed values; kinds cwm cannot open (`cuda_vmm`, `musa`, `npu`) decode to
//! `IpcDescriptor::Unsupported` so the caller can answer with a clear error.

use serde::{Deserialize, Serialize};

use crate::DecodeError;

/// The ext type code of `DeviceIPCWrapper`.
pub const EXT_DEVICE_IPC_WRAPPER: i8 = 1;

/// `TensorMetadata`: a strided view on the shared storage. Strides and offset in elements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorMetadata {
    pub dtype: String,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
    #[serde(default)]
    pub storage_offset: u64,
    #[serde(default)]
    pub device_uuid: String,
}

impl TensorMetadata {
    /// Bytes per element of `dtype` (torch names without `torch.`), `None` if unknown.
    pub fn itemsize(&self) -> Option<usize> {
        todo!()
    }

    /// Bytes from the storage start to one past the last element:
    /// `itemsize * (storage_offset + 1 + Σ (size-1)*stride)`; 0 for an empty tensor.
    /// `None` on overflow or unknown dtype.
    pub fn byte_span(&self) -> Option<u64> {
        todo!()
    }
}

/// `cuda` descriptor's `handle`: torch's `UntypedStorage._share_cuda_()` 8-tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaStorageHandle {
    pub device: i64,
    /// The 64-byte `cudaIpcMemHandle_t` of the allocation (header of version 2/3 type 'c'
    /// stripped; a bare 64-byte handle accepted as is).
    pub mem_handle: [u8; 64],
    pub storage_size: u64,
    pub storage_offset_bytes: u64,
    /// 64-byte `cudaIpcEventHandle_t` to wait on before reading, when `event_sync_required`.
    pub event_handle: Option<[u8; 64]>,
    pub event_sync_required: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpcDescriptor {
    /// A POSIX shm segment (`/dev/shm/<name without />`) of `nbytes`; the tensor is a view.
    CpuShm { shm_name: String, nbytes: u64, metadata: TensorMetadata },
    Cuda { handle: CudaStorageHandle, metadata: TensorMetadata },
    CudaRaw { ipc_handle: [u8; 64], alloc_offset: u64, nbytes: u64, metadata: TensorMetadata },
    /// A known-but-unsupported or unknown kind (`cuda_vmm`, `musa`, `npu`, …).
    Unsupported { kind: String },
}

impl IpcDescriptor {
    pub fn kind(&self) -> &str {
        todo!()
    }

    pub fn metadata(&self) -> Option<&TensorMetadata> {
        todo!()
    }
}

/// Decode `list[DeviceIPCWrapper]`: a msgpack array of ext-1 values. Errors name the index of
/// the bad element. A `cuda` handle with an expandable-segment payload ('e') or a wrong length
/// is an error. Metadata maps reject unknown fields (the reference uses forbid_unknown_fields).
pub fn decode_descriptor_list(frame: &[u8]) -> Result<Vec<IpcDescriptor>, DecodeError> {
    todo!()
}

/// Encode a descriptor list exactly as the real client does (key order: `type`, own fields,
/// `version` (=1), `metadata`; ext8/ext16/ext32 by length). `Unsupported` cannot be encoded
/// and panics (tests only build supported kinds). The `cuda` handle is encoded as torch 2.14
/// does: version 3, type 'c' header + 64 bytes.
pub fn encode_descriptor_list(descriptors: &[IpcDescriptor]) -> Vec<u8> {
    todo!()
}
