//! `DeviceIPCWrapper`: msgpack ext type 1 whose data is a tagged `WireIPCData` map (spec §2.3).
//!
//! `register_kv_cache` carries an array of these, one per layer tensor. Descriptors are parsed
//! into typed values; kinds cwm cannot open (`cuda_vmm`, `musa`, `npu`) decode to
//! `IpcDescriptor::Unsupported` so the caller can answer with a clear error.

use serde::{Deserialize, Serialize};

use crate::codec::{write_array_len, write_bin, write_map_len, write_sint, write_str, write_uint};
use crate::reader::{check_document, Int, Reader};
use crate::DecodeError;

/// The ext type code of `DeviceIPCWrapper`.
pub const EXT_DEVICE_IPC_WRAPPER: i8 = 1;

/// `TensorMetadata`: a strided view on the shared storage. Strides and offset in elements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
        dtype_itemsize(&self.dtype)
    }

    /// Bytes from the storage start to one past the last element:
    /// `itemsize * (storage_offset + 1 + Σ (size-1)*stride)`; 0 for an empty tensor.
    /// `None` on overflow or unknown dtype.
    /// Also `None` when `shape` and `stride` have different lengths.
    pub fn byte_span(&self) -> Option<u64> {
        let isz = self.itemsize()? as u64;
        if self.shape.len() != self.stride.len() {
            return None;
        }
        if self.shape.contains(&0) {
            return Some(0);
        }
        let mut last = self.storage_offset.checked_add(1)?;
        for (&size, &stride) in self.shape.iter().zip(&self.stride) {
            last = last.checked_add((size - 1).checked_mul(stride)?)?;
        }
        last.checked_mul(isz)
    }

    /// Number of elements (`None` on overflow).
    pub fn numel(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
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
    /// torch's IPC reference counter for this share (`_share_cuda_()` items 4 and 5): the
    /// producer set it to 1 and keeps the storage's memory parked until it is 0 again; the
    /// consumer decrements it once when it stops using the memory. `None` when nil.
    pub ref_counter: Option<TorchRefCounter>,
}

/// Where torch keeps one share's reference count: the shared-memory object `name` (torch's
/// `/torch_<pid>_<rand>_<n>`), `int64` slot `offset` after a 64-byte header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchRefCounter {
    pub name: Vec<u8>,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpcDescriptor {
    /// A POSIX shm segment (`/dev/shm/<name without />`) of `nbytes`; the tensor is a view.
    CpuShm {
        shm_name: String,
        nbytes: u64,
        metadata: TensorMetadata,
    },
    Cuda {
        handle: CudaStorageHandle,
        metadata: TensorMetadata,
    },
    CudaRaw {
        ipc_handle: [u8; 64],
        alloc_offset: u64,
        nbytes: u64,
        metadata: TensorMetadata,
    },
    /// A known-but-unsupported or unknown kind (`cuda_vmm`, `musa`, `npu`, …).
    Unsupported { kind: String },
}

impl IpcDescriptor {
    /// The wire tag (`"cpu_shm"`, `"cuda"`, `"cuda_raw"`, or the unsupported kind's tag).
    pub fn kind(&self) -> &str {
        match self {
            IpcDescriptor::CpuShm { .. } => "cpu_shm",
            IpcDescriptor::Cuda { .. } => "cuda",
            IpcDescriptor::CudaRaw { .. } => "cuda_raw",
            IpcDescriptor::Unsupported { kind } => kind,
        }
    }

    pub fn metadata(&self) -> Option<&TensorMetadata> {
        match self {
            IpcDescriptor::CpuShm { metadata, .. }
            | IpcDescriptor::Cuda { metadata, .. }
            | IpcDescriptor::CudaRaw { metadata, .. } => Some(metadata),
            IpcDescriptor::Unsupported { .. } => None,
        }
    }
}

/// Bytes per element of a torch dtype name (without `torch.`; aliases accepted).
pub fn dtype_itemsize(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "bool" | "uint8" | "int8" | "float8_e4m3fn" | "float8_e4m3fnuz" | "float8_e5m2"
        | "float8_e5m2fnuz" | "float8_e8m0fnu" | "float4_e2m1fn_x2" | "quint8" | "qint8"
        | "quint4x2" | "quint2x4" | "bits8" => 1,
        "float16" | "half" | "bfloat16" | "int16" | "short" | "uint16" | "bits16" => 2,
        "float32" | "float" | "int32" | "int" | "uint32" | "complex32" | "chalf" | "qint32" => 4,
        "float64" | "double" | "int64" | "long" | "uint64" | "complex64" | "cfloat" => 8,
        "complex128" | "cdouble" => 16,
        _ => return None,
    })
}

const WHAT: &str = "kv_cache descriptors";

/// Most tensors one `register_kv_cache` may describe (models have a few hundred layer
/// tensors). Bounds what one frame of tiny descriptors can make the server hold in memory.
pub const MAX_KV_TENSORS: usize = 1 << 16;

/// Decode `list[DeviceIPCWrapper]`: a msgpack array of ext-1 values. Errors name the index of
/// the bad element. A `cuda` handle with an expandable-segment payload ('e') or a wrong length
/// is an error. Metadata maps reject unknown fields (the reference uses forbid_unknown_fields).
///
/// Supported descriptors (`cpu_shm`, `cuda`, `cuda_raw`) must also be consistent: `version`
/// is 1, no unknown or duplicate keys, a known dtype, `shape` and `stride` of equal length, and
/// the view's `byte_span` within the descriptor's byte range (`nbytes`, or the storage size of
/// a `cuda` handle), so a server can map the view without further bound checks. Other tags
/// decode to `Unsupported` (their content is not validated beyond being a map with str keys).
pub fn decode_descriptor_list(frame: &[u8]) -> Result<Vec<IpcDescriptor>, DecodeError> {
    let mut r = Reader::new(WHAT, frame);
    let n = r.array_len("kv_cache")?;
    if n > MAX_KV_TENSORS {
        return Err(r.err(format!(
            "kv_cache: {n} tensors, at most {MAX_KV_TENSORS} are accepted"
        )));
    }
    let mut out = r.vec_for(n);
    for i in 0..n {
        let p = format!("kv_cache[{i}]");
        let (ty, data) = r.ext(&p)?;
        if ty != EXT_DEVICE_IPC_WRAPPER {
            return Err(r.err(format!(
                "{p}: msgpack ext type {ty}, expected {EXT_DEVICE_IPC_WRAPPER} (DeviceIPCWrapper)"
            )));
        }
        out.push(decode_descriptor(&p, data)?);
    }
    r.finish()?;
    Ok(out)
}

fn err(reason: String) -> DecodeError {
    DecodeError::payload(WHAT, reason)
}

/// Re-home an error from a nested decoder under the descriptor's path.
fn nested(p: &str, e: DecodeError) -> DecodeError {
    match e {
        DecodeError::Payload { reason, .. } => err(format!("{p}: {reason}")),
        other => other,
    }
}

/// The entries of one descriptor map: key → raw value bytes.
struct Fields<'a> {
    p: &'a str,
    kind: &'a str,
    entries: Vec<(&'a str, &'a [u8])>,
}

impl<'a> Fields<'a> {
    fn check_allowed(&self, allowed: &[&str]) -> Result<(), DecodeError> {
        for (k, _) in &self.entries {
            if !allowed.contains(k) {
                return Err(err(format!(
                    "{}: unknown field {k:?} in a {:?} descriptor (expected {allowed:?})",
                    self.p, self.kind
                )));
            }
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<&'a [u8], DecodeError> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                err(format!(
                    "{}: missing field {key:?} of a {:?} descriptor",
                    self.p, self.kind
                ))
            })
    }

    fn reader(&self, key: &str) -> Result<Reader<'a>, DecodeError> {
        Ok(Reader::new(WHAT, self.get(key)?))
    }

    fn uint(&self, key: &str) -> Result<u64, DecodeError> {
        self.reader(key)?.uint(&format!("{}.{key}", self.p))
    }

    fn str(&self, key: &str) -> Result<&'a str, DecodeError> {
        self.reader(key)?.str(&format!("{}.{key}", self.p))
    }

    fn bin(&self, key: &str) -> Result<&'a [u8], DecodeError> {
        self.reader(key)?.bin(&format!("{}.{key}", self.p))
    }

    fn version(&self) -> Result<(), DecodeError> {
        let v = self
            .reader("version")?
            .int(&format!("{}.version", self.p))?;
        if v != Int::U(1) {
            return Err(err(format!("{}.version: expected 1, got {v}", self.p)));
        }
        Ok(())
    }

    fn metadata(&self) -> Result<TensorMetadata, DecodeError> {
        let raw = self.get("metadata")?;
        let m: TensorMetadata = crate::codec::decode(WHAT, raw)
            .map_err(|e| nested(&format!("{}.metadata", self.p), e))?;
        if m.shape.len() != m.stride.len() {
            return Err(err(format!(
                "{}.metadata: shape has {} dims but stride has {}",
                self.p,
                m.shape.len(),
                m.stride.len()
            )));
        }
        if m.itemsize().is_none() {
            return Err(err(format!(
                "{}.metadata.dtype: unknown dtype {:?}",
                self.p, m.dtype
            )));
        }
        Ok(m)
    }

    fn check_span(
        &self,
        m: &TensorMetadata,
        limit: u64,
        limit_name: &str,
    ) -> Result<(), DecodeError> {
        match m.byte_span() {
            Some(span) if span <= limit => Ok(()),
            Some(span) => Err(err(format!(
                "{}: the view spans {span} bytes (shape {:?}, stride {:?}, storage_offset {}, {}) \
                 but {limit_name} is {limit}",
                self.p, m.shape, m.stride, m.storage_offset, m.dtype
            ))),
            None => Err(err(format!(
                "{}.metadata: byte span of shape {:?} stride {:?} overflows u64",
                self.p, m.shape, m.stride
            ))),
        }
    }
}

fn decode_descriptor(p: &str, data: &[u8]) -> Result<IpcDescriptor, DecodeError> {
    check_document(WHAT, data).map_err(|e| nested(p, e))?;
    let mut r = Reader::new(WHAT, data);
    let n = r.map_len(p)?;
    let mut entries: Vec<(&str, &[u8])> = r.vec_for(n);
    for _ in 0..n {
        let k = r.str(&format!("{p} (a descriptor key)"))?;
        if entries.iter().any(|(seen, _)| *seen == k) {
            return Err(err(format!("{p}: duplicate field {k:?}")));
        }
        let v = r.value_slice(&format!("{p}.{k}"))?;
        entries.push((k, v));
    }
    r.finish()?;
    let tag = entries.iter().find(|(k, _)| *k == "type").map(|(_, v)| *v);
    let Some(tag) = tag else {
        return Err(err(format!("{p}: descriptor map has no \"type\" tag")));
    };
    let kind = Reader::new(WHAT, tag).str(&format!("{p}.type"))?;
    let f = Fields { p, kind, entries };
    match kind {
        "cpu_shm" => {
            f.check_allowed(&["type", "shm_name", "nbytes", "version", "metadata"])?;
            f.version()?;
            let shm_name = f.str("shm_name")?.to_string();
            let nbytes = f.uint("nbytes")?;
            let metadata = f.metadata()?;
            f.check_span(&metadata, nbytes, "nbytes")?;
            Ok(IpcDescriptor::CpuShm {
                shm_name,
                nbytes,
                metadata,
            })
        }
        "cuda" => {
            f.check_allowed(&["type", "handle", "version", "metadata"])?;
            f.version()?;
            let handle = decode_cuda_handle(&format!("{p}.handle"), f.get("handle")?)?;
            let metadata = f.metadata()?;
            f.check_span(
                &metadata,
                handle.storage_size,
                "the storage size (handle[2])",
            )?;
            Ok(IpcDescriptor::Cuda { handle, metadata })
        }
        "cuda_raw" => {
            f.check_allowed(&[
                "type",
                "ipc_handle",
                "alloc_offset",
                "nbytes",
                "version",
                "metadata",
            ])?;
            f.version()?;
            let raw = f.bin("ipc_handle")?;
            let ipc_handle: [u8; 64] = raw.try_into().map_err(|_| {
                err(format!(
                    "{p}.ipc_handle: expected 64 bytes (cudaIpcMemHandle_t), got {}",
                    raw.len()
                ))
            })?;
            let alloc_offset = f.uint("alloc_offset")?;
            let nbytes = f.uint("nbytes")?;
            let metadata = f.metadata()?;
            f.check_span(&metadata, nbytes, "nbytes")?;
            Ok(IpcDescriptor::CudaRaw {
                ipc_handle,
                alloc_offset,
                nbytes,
                metadata,
            })
        }
        other => Ok(IpcDescriptor::Unsupported {
            kind: other.to_string(),
        }),
    }
}

/// The torch `_share_cuda_()` 8-tuple (spec §2.3).
fn decode_cuda_handle(p: &str, raw: &[u8]) -> Result<CudaStorageHandle, DecodeError> {
    let mut r = Reader::new(WHAT, raw);
    let n = r.array_len(p)?;
    if n != 8 {
        return Err(err(format!(
            "{p}: expected an array of 8 (torch _share_cuda_ tuple), got {n} elements"
        )));
    }
    let device = r.sint(&format!("{p}[0] (device)"))?;
    let f1 = format!("{p}[1] (storage handle)");
    let storage = if r.nil(&f1)? { None } else { Some(r.bin(&f1)?) };
    let storage_size = r.uint(&format!("{p}[2] (storage size)"))?;
    let storage_offset_bytes = r.uint(&format!("{p}[3] (storage offset)"))?;
    let f4 = format!("{p}[4] (ref counter name)");
    let ref_name = if r.nil(&f4)? {
        None
    } else {
        Some(r.bin(&f4)?.to_vec())
    };
    let ref_offset = r.uint(&format!("{p}[5] (ref counter offset)"))?;
    let f6 = format!("{p}[6] (event handle)");
    let event = if r.nil(&f6)? { None } else { Some(r.bin(&f6)?) };
    let f7 = format!("{p}[7] (event_sync_required)");
    let event_sync_required = if r.nil(&f7)? { false } else { r.bool(&f7)? };
    r.finish()?;

    let Some(storage) = storage else {
        return Err(err(format!("{f1}: is nil, expected a cudaIpcMemHandle_t")));
    };
    let mem = match storage.len() {
        64 => storage,
        66 if matches!(storage[0], 2 | 3) && storage[1] == b'c' => &storage[2..],
        66 if matches!(storage[0], 2 | 3) && storage[1] == b'e' => {
            return Err(err(format!(
                "{f1}: an expandable-segment handle (version {}, type 'e') is not supported; \
                 disable PYTORCH_CUDA_ALLOC_CONF=expandable_segments",
                storage[0]
            )))
        }
        len if len >= 2 && storage[1] == b'e' => {
            return Err(err(format!(
                "{f1}: an expandable-segment handle (version {}, type 'e', {len} bytes) is not supported",
                storage[0]
            )))
        }
        len => {
            let head = &storage[..len.min(2)];
            return Err(err(format!(
                "{f1}: expected 64 bytes or a version 2/3 'c' header + 64 bytes (66), got {len} \
                 bytes starting {}",
                hex::encode(head)
            )));
        }
    };
    let mem_handle: [u8; 64] = mem
        .try_into()
        .map_err(|_| err(format!("{f1}: bad length")))?;
    let event_handle = match event {
        None => None,
        Some([]) => None,
        Some(ev) => Some(<[u8; 64]>::try_from(ev).map_err(|_| {
            err(format!(
                "{f6}: expected 64 bytes (cudaIpcEventHandle_t), got {}",
                ev.len()
            ))
        })?),
    };
    if event_sync_required && event_handle.is_none() {
        return Err(err(format!("{f7}: is true but no event handle was sent")));
    }
    Ok(CudaStorageHandle {
        device,
        mem_handle,
        storage_size,
        storage_offset_bytes,
        event_handle,
        event_sync_required,
        ref_counter: ref_name
            .filter(|n| !n.is_empty())
            .map(|name| TorchRefCounter {
                name,
                offset: ref_offset,
            }),
    })
}

/// Encode a descriptor list exactly as the real client does (key order: `type`, own fields,
/// `version` (=1), `metadata`; ext8/ext16/ext32 by length). `Unsupported` cannot be encoded
/// and panics (tests only build supported kinds). The `cuda` handle is encoded as torch 2.14
/// does: version 3, type 'c' header + 64 bytes; no ref counter is encoded as nil and 0.
pub fn encode_descriptor_list(descriptors: &[IpcDescriptor]) -> Vec<u8> {
    let mut out = Vec::new();
    write_array_len(&mut out, descriptors.len());
    for d in descriptors {
        let data = encode_descriptor(d);
        let len = u32::try_from(data.len()).expect("descriptor larger than 4 GiB");
        rmp::encode::write_ext_meta(&mut out, len, EXT_DEVICE_IPC_WRAPPER)
            .expect("writing to a Vec cannot fail");
        out.extend_from_slice(&data);
    }
    out
}

fn encode_descriptor(d: &IpcDescriptor) -> Vec<u8> {
    let mut out = Vec::with_capacity(192);
    let metadata = match d {
        IpcDescriptor::CpuShm {
            shm_name,
            nbytes,
            metadata,
        } => {
            write_map_len(&mut out, 5);
            write_str(&mut out, "type");
            write_str(&mut out, "cpu_shm");
            write_str(&mut out, "shm_name");
            write_str(&mut out, shm_name);
            write_str(&mut out, "nbytes");
            write_uint(&mut out, *nbytes);
            metadata
        }
        IpcDescriptor::Cuda { handle, metadata } => {
            write_map_len(&mut out, 4);
            write_str(&mut out, "type");
            write_str(&mut out, "cuda");
            write_str(&mut out, "handle");
            write_array_len(&mut out, 8);
            write_sint(&mut out, handle.device);
            let mut storage = Vec::with_capacity(66);
            storage.extend_from_slice(&[3, b'c']);
            storage.extend_from_slice(&handle.mem_handle);
            write_bin(&mut out, &storage);
            write_uint(&mut out, handle.storage_size);
            write_uint(&mut out, handle.storage_offset_bytes);
            match &handle.ref_counter {
                Some(rc) => {
                    write_bin(&mut out, &rc.name);
                    write_uint(&mut out, rc.offset);
                }
                None => {
                    out.push(0xc0);
                    write_uint(&mut out, 0);
                }
            }
            match &handle.event_handle {
                Some(ev) => write_bin(&mut out, ev),
                None => out.push(0xc0),
            }
            out.push(if handle.event_sync_required {
                0xc3
            } else {
                0xc2
            });
            metadata
        }
        IpcDescriptor::CudaRaw {
            ipc_handle,
            alloc_offset,
            nbytes,
            metadata,
        } => {
            write_map_len(&mut out, 6);
            write_str(&mut out, "type");
            write_str(&mut out, "cuda_raw");
            write_str(&mut out, "ipc_handle");
            write_bin(&mut out, ipc_handle);
            write_str(&mut out, "alloc_offset");
            write_uint(&mut out, *alloc_offset);
            write_str(&mut out, "nbytes");
            write_uint(&mut out, *nbytes);
            metadata
        }
        IpcDescriptor::Unsupported { kind } => {
            panic!("cannot encode an unsupported IPC descriptor kind {kind:?}")
        }
    };
    write_str(&mut out, "version");
    write_uint(&mut out, 1);
    write_str(&mut out, "metadata");
    out.extend_from_slice(&crate::codec::encode(metadata));
    out
}
