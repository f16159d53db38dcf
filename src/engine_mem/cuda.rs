//! The CUDA backend slot (`cuda` / `cuda_raw` descriptors). This build has no CUDA support, so
//! opening one is a clear error; the instance is still recorded and its transfers fail with
//! that reason. A build with a CUDA backend replaces `open` with one returning its
//! `EngineMemory`.

use connector_protocol::IpcDescriptor;

use super::{EngineMemError, EngineMemory};

pub(super) fn open(
    descriptors: &[IpcDescriptor],
    _kv_layout_hint: Option<&str>,
) -> Result<Box<dyn EngineMemory>, EngineMemError> {
    let kind = descriptors.first().map_or("cuda", |d| d.kind());
    Err(EngineMemError::CudaUnavailable(kind.to_string()))
}
