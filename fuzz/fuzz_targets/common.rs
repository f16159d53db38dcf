//! Shared by the fuzz targets: the input format and the re-encoding oracles.

use connector_protocol::codec;
use connector_protocol::ipc::{decode_descriptor_list, encode_descriptor_list};
use connector_protocol::IpcDescriptor;
use serde::{de::DeserializeOwned, Serialize};

/// Split the fuzz input into frames: each frame is a little-endian u16 length followed by that
/// many bytes; a length running past the end takes the rest of the input.
pub fn split_frames(mut data: &[u8]) -> Vec<&[u8]> {
    let mut frames = Vec::new();
    while data.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
        let rest = &data[2..];
        let (frame, tail) = rest.split_at(len.min(rest.len()));
        frames.push(frame);
        data = tail;
    }
    frames
}

/// Decode a typed payload; when it decodes, its encoding must decode again to the same bytes.
pub fn typed<T: DeserializeOwned + Serialize>(what: &'static str, frame: &[u8]) {
    if let Ok(v) = codec::decode::<T>(what, frame) {
        let bytes = codec::encode(&v);
        let again: T = codec::decode(what, &bytes)
            .unwrap_or_else(|e| panic!("{what}: our own encoding does not decode: {e}"));
        assert_eq!(
            codec::encode(&again),
            bytes,
            "{what}: re-encoding is not stable"
        );
    }
}

/// Decode a descriptor list; supported lists must survive encode → decode → encode.
pub fn descriptors(frame: &[u8]) {
    if let Ok(list) = decode_descriptor_list(frame) {
        if list
            .iter()
            .any(|d| matches!(d, IpcDescriptor::Unsupported { .. }))
        {
            return;
        }
        let bytes = encode_descriptor_list(&list);
        let again = decode_descriptor_list(&bytes)
            .unwrap_or_else(|e| panic!("descriptor list: our own encoding does not decode: {e}"));
        assert_eq!(again, list, "descriptor list changed in a round trip");
        assert_eq!(encode_descriptor_list(&again), bytes);
    }
}
