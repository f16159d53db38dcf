//! msgpack codecs for scalar parameters and results, and the generic typed decode/encode.
//!
//! Decoding is lenient where the reference casts (`int`/`bool` params, `mq.py:91-114`): a bool
//! is not accepted as an int, but any msgpack int width is. Encoding is byte-exact with
//! msgspec (smallest int format, float64, bin for bytes, str for str).

use serde::{de::DeserializeOwned, Serialize};

use crate::reader::{check_document, Int, Reader};
use crate::DecodeError;

/// Decode a typed payload (maps by field name, unknown keys ignored, defaults filled).
///
/// The frame must be exactly one msgpack document (no trailing bytes) nested at most 64 levels;
/// it is validated before serde sees it, so malformed input never reaches a recursive decoder.
pub fn decode<T: DeserializeOwned>(what: &'static str, frame: &[u8]) -> Result<T, DecodeError> {
    check_document(what, frame)?;
    rmp_serde::from_slice(frame).map_err(|e| DecodeError::payload(what, e))
}

/// Encode a typed value as msgspec does (structs as maps with field names, in declaration order).
///
/// Panics only if `T`'s `Serialize` impl itself fails (never for the types of this crate).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("msgpack encoding into a Vec cannot fail")
}

fn whole<'a, T>(
    what: &'static str,
    frame: &'a [u8],
    f: impl FnOnce(&mut Reader<'a>) -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    let mut r = Reader::new(what, frame);
    let v = f(&mut r)?;
    r.finish()?;
    Ok(v)
}

pub fn decode_u64(what: &'static str, frame: &[u8]) -> Result<u64, DecodeError> {
    whole(what, frame, |r| r.uint("value"))
}

/// `int | None` (e.g. `ping(instance_id)`).
pub fn decode_opt_u64(what: &'static str, frame: &[u8]) -> Result<Option<u64>, DecodeError> {
    whole(what, frame, |r| {
        if r.nil("value")? {
            Ok(None)
        } else {
            r.uint("value").map(Some)
        }
    })
}

/// A signed int (e.g. a cursor that may be `-1`); any msgpack int that fits `i64`.
pub fn decode_i64(what: &'static str, frame: &[u8]) -> Result<i64, DecodeError> {
    whole(what, frame, |r| r.sint("value"))
}

pub fn decode_bool(what: &'static str, frame: &[u8]) -> Result<bool, DecodeError> {
    whole(what, frame, |r| r.bool("value"))
}

/// A float; msgpack ints are accepted too (Python `1` for `1.0`).
pub fn decode_f64(what: &'static str, frame: &[u8]) -> Result<f64, DecodeError> {
    whole(what, frame, |r| r.float("value"))
}

pub fn decode_str<'a>(what: &'static str, frame: &'a [u8]) -> Result<&'a str, DecodeError> {
    whole(what, frame, |r| r.str("value"))
}

/// msgpack `bin` (a str where bytes are expected is rejected, as msgspec does).
pub fn decode_bin<'a>(what: &'static str, frame: &'a [u8]) -> Result<&'a [u8], DecodeError> {
    whole(what, frame, |r| r.bin("value"))
}

/// `list[list[int]]`: one block-id list per KV group. Ids must fit u32.
pub fn decode_block_ids(frame: &[u8]) -> Result<Vec<Vec<u32>>, DecodeError> {
    whole("block_ids", frame, |r| {
        let groups = r.array_len("block_ids")?;
        let mut out = Vec::with_capacity(groups);
        for g in 0..groups {
            let n = r.array_len(&format!("block_ids[{g}]"))?;
            let mut ids = Vec::with_capacity(n);
            for i in 0..n {
                // Field names are formatted only on error (hot path: thousands of ids per call).
                let v = r.int("block id").map_err(|e| at_index(e, g, i))?;
                let id = match v {
                    Int::U(u) => u32::try_from(u).ok(),
                    Int::I(x) => u32::try_from(x).ok(),
                };
                let id = id.ok_or_else(|| {
                    DecodeError::payload(
                        "block_ids",
                        format!("block_ids[{g}][{i}]: expected an int in 0..=4294967295, got {v}"),
                    )
                })?;
                ids.push(id);
            }
            out.push(ids);
        }
        Ok(out)
    })
}

fn at_index(e: DecodeError, g: usize, i: usize) -> DecodeError {
    match e {
        DecodeError::Payload { what, reason } => DecodeError::Payload {
            what,
            reason: format!("block_ids[{g}][{i}]: {reason}"),
        },
        other => other,
    }
}

/// Encode `list[list[int]]` (smallest int formats).
pub fn encode_block_ids(groups: &[Vec<u32>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + groups.iter().map(|g| 3 + g.len() * 3).sum::<usize>());
    write_array_len(&mut out, groups.len());
    for g in groups {
        write_array_len(&mut out, g.len());
        for &id in g {
            write_uint(&mut out, u64::from(id));
        }
    }
    out
}

pub(crate) fn write_uint(out: &mut Vec<u8>, v: u64) {
    rmp::encode::write_uint(out, v).expect("writing to a Vec cannot fail");
}

pub(crate) fn write_sint(out: &mut Vec<u8>, v: i64) {
    rmp::encode::write_sint(out, v).expect("writing to a Vec cannot fail");
}

pub(crate) fn write_str(out: &mut Vec<u8>, v: &str) {
    rmp::encode::write_str(out, v).expect("writing to a Vec cannot fail");
}

pub(crate) fn write_bin(out: &mut Vec<u8>, v: &[u8]) {
    rmp::encode::write_bin(out, v).expect("writing to a Vec cannot fail");
}

pub(crate) fn write_array_len(out: &mut Vec<u8>, n: usize) {
    let n = u32::try_from(n).expect("msgpack arrays hold at most 2^32-1 elements");
    rmp::encode::write_array_len(out, n).expect("writing to a Vec cannot fail");
}

pub(crate) fn write_map_len(out: &mut Vec<u8>, n: usize) {
    let n = u32::try_from(n).expect("msgpack maps hold at most 2^32-1 entries");
    rmp::encode::write_map_len(out, n).expect("writing to a Vec cannot fail");
}

pub fn encode_u64(v: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    write_uint(&mut out, v);
    out
}

/// A signed int, smallest format (`-1` → `ff`).
pub fn encode_i64(v: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    write_sint(&mut out, v);
    out
}

pub fn encode_bool(v: bool) -> Vec<u8> {
    vec![if v { 0xc3 } else { 0xc2 }]
}

/// `None` as a payload (`c0`). The reference never sends it: it omits the payload frame.
pub fn encode_nil() -> Vec<u8> {
    vec![0xc0]
}

/// float64, as msgspec encodes Python floats.
pub fn encode_f64(v: f64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    rmp::encode::write_f64(&mut out, v).expect("writing to a Vec cannot fail");
    out
}

pub fn encode_str(v: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() + 5);
    write_str(&mut out, v);
    out
}

/// `bytes` → msgpack bin.
pub fn encode_bin(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() + 5);
    write_bin(&mut out, v);
    out
}

/// `list[str]` (e.g. `get_experimental` → `[]` = `90`).
pub fn encode_str_list(v: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + v.iter().map(|s| s.len() + 5).sum::<usize>());
    write_array_len(&mut out, v.len());
    for s in v {
        write_str(&mut out, s);
    }
    out
}
