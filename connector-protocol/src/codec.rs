//! msgpack codecs for scalar parameters and results, and the generic typed decode/encode.
//!
//! Decoding is lenient where the reference casts (`int`/`bool` params, `mq.py:91-114`): a bool
//! is not accepted as an int, but any msgpack int width is. Encoding is byte-exact with
//! msgspec (smallest int format, float64, bin for bytes, str for str).

use serde::{de::DeserializeOwned, Serialize};

use crate::DecodeError;

/// Decode a typed payload (maps by field name, unknown keys ignored, defaults filled).
pub fn decode<T: DeserializeOwned>(what: &'static str, frame: &[u8]) -> Result<T, DecodeError> {
    todo!()
}

/// Encode a typed value as msgspec does (structs as maps with field names, in declaration order).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    todo!()
}

pub fn decode_u64(what: &'static str, frame: &[u8]) -> Result<u64, DecodeError> {
    todo!()
}

/// `int | None` (e.g. `ping(instance_id)`).
pub fn decode_opt_u64(what: &'static str, frame: &[u8]) -> Result<Option<u64>, DecodeError> {
    todo!()
}

pub fn decode_bool(what: &'static str, frame: &[u8]) -> Result<bool, DecodeError> {
    todo!()
}

/// A float; msgpack ints are accepted too (Python `1` for `1.0`).
pub fn decode_f64(what: &'static str, frame: &[u8]) -> Result<f64, DecodeError> {
    todo!()
}

pub fn decode_str<'a>(what: &'static str, frame: &'a [u8]) -> Result<&'a str, DecodeError> {
    todo!()
}

/// msgpack `bin` (a str where bytes are expected is rejected, as msgspec does).
pub fn decode_bin<'a>(what: &'static str, frame: &'a [u8]) -> Result<&'a [u8], DecodeError> {
    todo!()
}

/// `list[list[int]]`: one block-id list per KV group.
pub fn decode_block_ids(frame: &[u8]) -> Result<Vec<Vec<u32>>, DecodeError> {
    todo!()
}

pub fn encode_u64(v: u64) -> Vec<u8> {
    todo!()
}

pub fn encode_bool(v: bool) -> Vec<u8> {
    todo!()
}

pub fn encode_str(v: &str) -> Vec<u8> {
    todo!()
}

/// `list[str]` (e.g. `get_experimental` → `[]` = `90`).
pub fn encode_str_list(v: &[&str]) -> Vec<u8> {
    todo!()
}
