//! msgpack codecs for scalar parameters and results, and the generic typed decode/encode.
//!
//! Decoding is lenient where the reference casts (`int`/`bool` params, `mq.py:91-114`): a bool
//! is not accepted as an int, but any msgpack int width is. Encoding is byte-exact with
//! msgspec (smallest int format, float64, bin for bytes, str for str).

use serde::{de::DeserializeOwned, Serialize};

use crate::reader::{check_document, Reader};
use crate::DecodeError;

/// Decode a typed payload (maps by field name, unknown keys ignored, defaults filled).
///
/// The frame must be exactly one msgpack document (no trailing bytes) nested at most 64 levels;
/// it is validated before serde sees it, so malformed input never reaches a recursive decoder.
/// Strict like msgspec where it matters: structs must be maps with str keys, `String` needs a
/// msgpack str and bytes need bin. Errors name the field path, e.g.
/// `bad key: token_ids[1]: invalid value: integer `-1`, expected u32`.
pub fn decode<T: DeserializeOwned>(what: &'static str, frame: &[u8]) -> Result<T, DecodeError> {
    check_document(what, frame)?;
    let mut r = Reader::new(what, frame);
    let value = T::deserialize(&mut crate::de::Deserializer::new(&mut r))
        .map_err(|e| DecodeError::payload(what, e))?;
    r.finish()?;
    Ok(value)
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
    whole(what, frame, |r| r.uint(""))
}

/// `int | None` (e.g. `ping(instance_id)`).
pub fn decode_opt_u64(what: &'static str, frame: &[u8]) -> Result<Option<u64>, DecodeError> {
    whole(what, frame, |r| {
        if r.nil("")? {
            Ok(None)
        } else {
            r.uint("").map(Some)
        }
    })
}

/// A signed int (e.g. a cursor that may be `-1`); any msgpack int that fits `i64`.
pub fn decode_i64(what: &'static str, frame: &[u8]) -> Result<i64, DecodeError> {
    whole(what, frame, |r| r.sint(""))
}

pub fn decode_bool(what: &'static str, frame: &[u8]) -> Result<bool, DecodeError> {
    whole(what, frame, |r| r.bool(""))
}

/// A float; msgpack ints are accepted too (Python `1` for `1.0`).
pub fn decode_f64(what: &'static str, frame: &[u8]) -> Result<f64, DecodeError> {
    whole(what, frame, |r| r.float(""))
}

pub fn decode_str<'a>(what: &'static str, frame: &'a [u8]) -> Result<&'a str, DecodeError> {
    whole(what, frame, |r| r.str(""))
}

/// msgpack `bin` (a str where bytes are expected is rejected, as msgspec does).
pub fn decode_bin<'a>(what: &'static str, frame: &'a [u8]) -> Result<&'a [u8], DecodeError> {
    whole(what, frame, |r| r.bin(""))
}

/// Most KV cache groups one `block_ids` payload may carry (vLLM uses one per attention type:
/// a handful). Bounds what one frame of empty lists can make the server hold in memory.
pub const MAX_KV_GROUPS: usize = 1024;

/// `list[list[int]]`: one block-id list per KV group. Ids must fit u32.
pub fn decode_block_ids(frame: &[u8]) -> Result<Vec<Vec<u32>>, DecodeError> {
    whole("block_ids", frame, |r| {
        let groups = r.array_len("block_ids")?;
        if groups > MAX_KV_GROUPS {
            return Err(r.err(format!(
                "block_ids: {groups} KV cache groups, at most {MAX_KV_GROUPS} are accepted"
            )));
        }
        let mut out = r.vec_for(groups);
        for g in 0..groups {
            let n = r.array_len(&format!("block_ids[{g}]"))?;
            let ids = r.u32_elements(n).map_err(|(i, e)| at_index(e, g, i))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    #[test]
    fn smallest_int_formats() {
        for (v, want) in [
            (0u64, "00"),
            (127, "7f"),
            (128, "cc 80"),
            (255, "cc ff"),
            (256, "cd 01 00"),
            (65535, "cd ff ff"),
            (65536, "ce 00 01 00 00"),
            (u64::from(u32::MAX), "ce ff ff ff ff"),
            (1 << 32, "cf 00 00 00 01 00 00 00 00"),
            ((1 << 62) - 1, "cf 3f ff ff ff ff ff ff ff"),
        ] {
            assert_eq!(encode_u64(v), h(want), "{v}");
            assert_eq!(decode_u64("v", &h(want)), Ok(v));
        }
        for (v, want) in [
            (-1i64, "ff"),
            (-32, "e0"),
            (-33, "d0 df"),
            (-129, "d1 ff 7f"),
            (5, "05"),
        ] {
            assert_eq!(encode_i64(v), h(want), "{v}");
            assert_eq!(decode_i64("v", &h(want)), Ok(v));
        }
    }

    #[test]
    fn lenient_and_strict_scalars() {
        // Any int width, including signed formats holding non-negative values.
        assert_eq!(decode_u64("v", &h("d0 05")), Ok(5));
        assert_eq!(decode_u64("v", &h("cd 00 05")), Ok(5));
        // bool is not an int; negative is not a u64; trailing bytes are rejected.
        assert!(decode_u64("v", &h("c3")).is_err());
        assert!(decode_u64("v", &h("ff")).is_err());
        assert!(decode_u64("v", &h("05 05")).is_err());
        assert!(decode_u64("v", &h("")).is_err());
        assert_eq!(decode_opt_u64("v", &h("c0")), Ok(None));
        assert_eq!(decode_opt_u64("v", &h("07")), Ok(Some(7)));
        assert!(decode_opt_u64("v", &h("c2")).is_err());
        assert_eq!(decode_bool("v", &h("c3")), Ok(true));
        assert!(decode_bool("v", &h("01")).is_err());
        assert_eq!(decode_f64("v", &h("cb 3f f8 00 00 00 00 00 00")), Ok(1.5));
        assert_eq!(decode_f64("v", &h("ca 3f c0 00 00")), Ok(1.5));
        assert_eq!(decode_f64("v", &h("02")), Ok(2.0));
        assert_eq!(decode_f64("v", &h("ff")), Ok(-1.0));
        assert!(decode_f64("v", &h("a1 31")).is_err());
        assert_eq!(encode_f64(1.5), h("cb 3f f8 00 00 00 00 00 00"));
        assert_eq!(decode_str("v", &h("a5 72 65 71 2d 31")), Ok("req-1"));
        assert!(decode_str("v", &h("c4 01 61")).is_err(), "bin is not str");
        assert_eq!(decode_bin("v", &h("c4 02 61 62")), Ok(&b"ab"[..]));
        assert!(decode_bin("v", &h("a2 61 62")).is_err(), "str is not bin");
        assert!(decode_bin("v", &h("c4 03 61 62")).is_err(), "truncated");
        assert_eq!(encode_nil(), h("c0"));
        assert_eq!(encode_bin(b""), h("c4 00"));
        assert_eq!(encode_str(""), h("a0"));
        assert_eq!(encode_str(&"x".repeat(32))[..2], h("d9 20"));
    }

    #[test]
    fn block_ids() {
        assert_eq!(decode_block_ids(&h("91 91 03")), Ok(vec![vec![3]]));
        assert_eq!(decode_block_ids(&h("90")), Ok(vec![]));
        assert_eq!(
            decode_block_ids(&h("92 93 00 cc ff ce ff ff ff ff 90")),
            Ok(vec![vec![0, 255, u32::MAX], vec![]])
        );
        for (bad, want) in [
            (
                "91 91 ff",
                "block_ids[0][0]: expected an int in 0..=4294967295, got -1",
            ),
            (
                "91 92 01 cf 00 00 00 01 00 00 00 00",
                "block_ids[0][1]: expected an int in 0..=4294967295, got 4294967296",
            ),
            (
                "91 91 c3",
                "block_ids[0][0]: expected an int, got bool true",
            ),
            ("91 03", "block_ids[0]: expected an array, got int 3"),
            ("03", "expected an array"),
            ("91 91 01 00", "trailing"),
            ("92 91 01", "block_ids[1]: unexpected end of input"),
            ("dc 00 05 01", "array claims 5 elements"),
        ] {
            let e = decode_block_ids(&h(bad)).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        let ids = vec![vec![1, 2, 300, 70_000, u32::MAX], vec![0]];
        assert_eq!(decode_block_ids(&encode_block_ids(&ids)), Ok(ids));
    }

    #[test]
    fn str_lists() {
        assert_eq!(encode_str_list(&[]), h("90"));
        assert_eq!(encode_str_list(&["a", "bc"]), h("92 a1 61 a2 62 63"));
        assert_eq!(
            decode::<Vec<String>>("l", &h("92 a1 61 a2 62 63")).unwrap(),
            ["a", "bc"]
        );
    }

    #[test]
    fn typed_decode_is_strict_about_shapes() {
        #[derive(Debug, serde::Deserialize, PartialEq)]
        struct S {
            a: u32,
            #[serde(default)]
            b: Option<String>,
        }
        assert_eq!(
            decode::<S>("s", &h("81 a1 61 01")).unwrap(),
            S { a: 1, b: None }
        );
        // Unknown keys (of any shape) are skipped.
        assert_eq!(
            decode::<S>("s", &h("82 a1 7a 92 81 a0 c0 c7 01 05 00 a1 61 01")).unwrap(),
            S { a: 1, b: None }
        );
        // A struct must be a map, not an array.
        assert!(decode::<S>("s", &h("91 01")).is_err());
        // Keys must be str.
        assert!(decode::<S>("s", &h("81 00 01")).is_err());
        // Trailing bytes.
        assert!(decode::<S>("s", &h("81 a1 61 01 c0")).is_err());
        let e = decode::<S>("s", &h("82 a1 61 01 a1 62 c4 00"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "bad s: b: expected a str, got bin of 0 bytes");
    }
}
