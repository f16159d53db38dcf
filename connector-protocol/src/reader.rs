//! A small, panic-free msgpack reader over a borrowed slice.
//!
//! Every accessor checks bounds and types and reports errors as `DecodeError::Payload` naming
//! the payload (`what`), the field and the offending value. Used for the hand-written decoders
//! (scalars, block ids, descriptors) and to validate a whole document (depth-limited, no trailing
//! bytes) before handing it to `rmp_serde`.

use rmp::Marker;

use crate::DecodeError;

/// Maximum nesting of arrays/maps/ext accepted anywhere. The real client never nests deeper than
/// ~6; the limit keeps recursive decoders (ours, serde's, rmpv's) far from stack exhaustion.
pub(crate) const MAX_DEPTH: usize = 64;

/// A decoded msgpack integer (msgpack ints are u64 or i64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Int {
    U(u64),
    I(i64),
}

impl std::fmt::Display for Int {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Int::U(v) => write!(f, "{v}"),
            Int::I(v) => write!(f, "{v}"),
        }
    }
}

/// The msgpack type family of a marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Nil,
    Bool,
    Int,
    Float,
    Str,
    Bin,
    Array,
    Map,
    Ext,
    Reserved,
}

impl Kind {
    #[inline]
    pub(crate) fn of(m: Marker) -> Kind {
        match m {
            Marker::Null => Kind::Nil,
            Marker::True | Marker::False => Kind::Bool,
            Marker::FixPos(_)
            | Marker::FixNeg(_)
            | Marker::U8
            | Marker::U16
            | Marker::U32
            | Marker::U64
            | Marker::I8
            | Marker::I16
            | Marker::I32
            | Marker::I64 => Kind::Int,
            Marker::F32 | Marker::F64 => Kind::Float,
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => Kind::Str,
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => Kind::Bin,
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => Kind::Array,
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => Kind::Map,
            Marker::FixExt1
            | Marker::FixExt2
            | Marker::FixExt4
            | Marker::FixExt8
            | Marker::FixExt16
            | Marker::Ext8
            | Marker::Ext16
            | Marker::Ext32 => Kind::Ext,
            Marker::Reserved => Kind::Reserved,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Nil => "nil",
            Kind::Bool => "bool",
            Kind::Int => "int",
            Kind::Float => "float",
            Kind::Str => "str",
            Kind::Bin => "bin",
            Kind::Array => "array",
            Kind::Map => "map",
            Kind::Ext => "ext",
            Kind::Reserved => "reserved byte 0xc1",
        }
    }
}

/// Human-readable msgpack type of a marker, for error messages.
pub(crate) fn marker_kind(m: Marker) -> &'static str {
    Kind::of(m).name()
}

#[derive(Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(what: &'static str, buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0, what }
    }

    pub(crate) fn err(&self, reason: impl ToString) -> DecodeError {
        DecodeError::payload(self.what, reason)
    }

    /// Advance past a one-byte value whose marker was peeked.
    #[inline]
    pub(crate) fn skip_byte(&mut self) {
        self.pos = (self.pos + 1).min(self.buf.len());
    }

    /// A copy at the current position (for look-ahead).
    pub(crate) fn clone_at(&self) -> Reader<'a> {
        self.clone()
    }

    /// `"field: "`, or nothing for an empty field name (the caller adds its own context).
    fn at(field: &str) -> String {
        if field.is_empty() {
            String::new()
        } else {
            format!("{field}: ")
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// An empty `Vec` for `n` elements whose count came from the wire, with room reserved for
    /// at most as many as the bytes left could hold at `size_of::<T>()` each: the reservation
    /// never exceeds the input's own size, however large `n` claims to be. Elements beyond it
    /// grow the `Vec` as they actually decode (each consuming input).
    pub(crate) fn vec_for<T>(&self, n: usize) -> Vec<T> {
        Vec::with_capacity(n.min(self.remaining() / std::mem::size_of::<T>().max(1)))
    }

    /// Error unless the whole input was consumed (msgspec rejects trailing bytes).
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.err(format!(
                "{} trailing byte(s) after the msgpack document at offset {}",
                self.remaining(),
                self.pos
            )))
        }
    }

    #[inline]
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "{}truncated input, needs {n} byte(s) at offset {} but only {} left",
                Self::at(field),
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    #[inline]
    fn be(&mut self, n: usize, field: &str) -> Result<u64, DecodeError> {
        let b = self.take(n, field)?;
        Ok(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }

    #[inline]
    pub(crate) fn peek_marker(&self, field: &str) -> Result<Marker, DecodeError> {
        match self.buf.get(self.pos) {
            Some(&b) => Ok(Marker::from_u8(b)),
            None => Err(self.err(format!(
                "{}unexpected end of input at offset {}",
                Self::at(field),
                self.pos
            ))),
        }
    }

    #[inline]
    pub(crate) fn marker(&mut self, field: &str) -> Result<Marker, DecodeError> {
        let m = self.peek_marker(field)?;
        self.pos += 1;
        Ok(m)
    }

    /// `got` was just consumed: describe it (with its value for scalars) in the error.
    fn unexpected(&self, field: &str, expected: &str, _got: Marker) -> DecodeError {
        let what = self.describe_at(self.pos.saturating_sub(1));
        self.err(format!(
            "{}expected {expected}, got {what}",
            Self::at(field)
        ))
    }

    /// The type of the value starting at `pos`, with the value itself for scalars.
    pub(crate) fn describe_at(&self, pos: usize) -> String {
        let mut p = Reader {
            buf: self.buf,
            pos,
            what: self.what,
        };
        let Ok(m) = p.peek_marker("") else {
            return "end of input".into();
        };
        match marker_kind(m) {
            "nil" => "nil".into(),
            "int" => p
                .int("")
                .map_or_else(|_| "an int".into(), |v| format!("int {v}")),
            "str" => p.str("").map_or_else(
                |_| "a str".into(),
                |s| {
                    let short: String = s.chars().take(40).collect();
                    let more = if short.len() < s.len() { "…" } else { "" };
                    format!("str {short:?}{more}")
                },
            ),
            "bool" => p
                .bool("")
                .map_or_else(|_| "a bool".into(), |b| format!("bool {b}")),
            "float" => p
                .float("")
                .map_or_else(|_| "a float".into(), |v| format!("float {v}")),
            "bin" => p
                .bin("")
                .map_or_else(|_| "bin".into(), |b| format!("bin of {} bytes", b.len())),
            "array" => "an array".into(),
            "map" => "a map".into(),
            "ext" => "an ext value".into(),
            other => other.into(),
        }
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    /// Length of a str/bin/ext payload or the element count of an array/map after `m`.
    fn len_after(&mut self, m: Marker, field: &str) -> Result<Option<usize>, DecodeError> {
        let n = match m {
            Marker::FixStr(n) => u64::from(n),
            Marker::FixArray(n) | Marker::FixMap(n) => u64::from(n),
            Marker::Str8 | Marker::Bin8 => self.be(1, field)?,
            Marker::Str16 | Marker::Bin16 | Marker::Array16 | Marker::Map16 => self.be(2, field)?,
            Marker::Str32 | Marker::Bin32 | Marker::Array32 | Marker::Map32 => self.be(4, field)?,
            _ => return Ok(None),
        };
        usize::try_from(n)
            .map(Some)
            .map_err(|_| self.err(format!("{}length {n} too large", Self::at(field))))
    }

    /// Any msgpack int.
    #[inline]
    pub(crate) fn int(&mut self, field: &str) -> Result<Int, DecodeError> {
        // Fast path: positive fixint (most token ids below 128 and all small fields).
        if let Some(&b) = self.buf.get(self.pos) {
            if b < 0x80 {
                self.pos += 1;
                return Ok(Int::U(u64::from(b)));
            }
        }
        self.int_slow(field)
    }

    /// Elements of an array of ints that must fit u32 (token ids, block ids). The header has
    /// been read; `n` elements follow. `Err((index, reason))` names the bad element.
    pub(crate) fn u32_elements(&mut self, n: usize) -> Result<Vec<u32>, (usize, DecodeError)> {
        let mut out = self.vec_for(n);
        for i in 0..n {
            let b = self.buf[self.pos..].first().copied();
            let rest = &self.buf[self.pos..];
            // Fast paths for the formats msgspec uses for u32 values.
            let v = match (b, rest.len()) {
                (Some(b @ 0..=0x7f), _) => {
                    self.pos += 1;
                    u32::from(b)
                }
                (Some(0xcc), 2..) => {
                    self.pos += 2;
                    u32::from(rest[1])
                }
                (Some(0xcd), 3..) => {
                    self.pos += 3;
                    u32::from(u16::from_be_bytes([rest[1], rest[2]]))
                }
                (Some(0xce), 5..) => {
                    self.pos += 5;
                    u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]])
                }
                _ => {
                    let v = self.int("").map_err(|e| (i, e))?;
                    let ok = match v {
                        Int::U(u) => u32::try_from(u).ok(),
                        Int::I(x) => u32::try_from(x).ok(),
                    };
                    ok.ok_or_else(|| {
                        (
                            i,
                            self.err(format!("expected an int in 0..=4294967295, got {v}")),
                        )
                    })?
                }
            };
            out.push(v);
        }
        Ok(out)
    }

    fn int_slow(&mut self, field: &str) -> Result<Int, DecodeError> {
        let m = self.marker(field)?;
        Ok(match m {
            Marker::FixPos(v) => Int::U(u64::from(v)),
            Marker::FixNeg(v) => Int::I(i64::from(v)),
            Marker::U8 => Int::U(self.be(1, field)?),
            Marker::U16 => Int::U(self.be(2, field)?),
            Marker::U32 => Int::U(self.be(4, field)?),
            Marker::U64 => Int::U(self.be(8, field)?),
            Marker::I8 => Int::I(i64::from(self.be(1, field)? as u8 as i8)),
            Marker::I16 => Int::I(i64::from(self.be(2, field)? as u16 as i16)),
            Marker::I32 => Int::I(i64::from(self.be(4, field)? as u32 as i32)),
            Marker::I64 => Int::I(self.be(8, field)? as i64),
            other => return Err(self.unexpected(field, "an int", other)),
        })
    }

    /// A non-negative int (`u64`).
    #[inline]
    pub(crate) fn uint(&mut self, field: &str) -> Result<u64, DecodeError> {
        match self.int(field)? {
            Int::U(v) => Ok(v),
            Int::I(v) if v >= 0 => Ok(v as u64),
            Int::I(v) => Err(self.err(format!(
                "{}expected a non-negative int, got {v}",
                Self::at(field)
            ))),
        }
    }

    /// A signed int that fits `i64`.
    pub(crate) fn sint(&mut self, field: &str) -> Result<i64, DecodeError> {
        match self.int(field)? {
            Int::I(v) => Ok(v),
            Int::U(v) => i64::try_from(v).map_err(|_| {
                self.err(format!(
                    "{}expected an int that fits i64, got {v}",
                    Self::at(field)
                ))
            }),
        }
    }

    pub(crate) fn bool(&mut self, field: &str) -> Result<bool, DecodeError> {
        match self.marker(field)? {
            Marker::True => Ok(true),
            Marker::False => Ok(false),
            other => Err(self.unexpected(field, "a bool", other)),
        }
    }

    /// True (and consumed) if the next value is nil.
    pub(crate) fn nil(&mut self, field: &str) -> Result<bool, DecodeError> {
        if self.peek_marker(field)? == Marker::Null {
            self.pos += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    pub(crate) fn float(&mut self, field: &str) -> Result<f64, DecodeError> {
        match self.peek_marker(field)? {
            Marker::F32 => {
                self.pos += 1;
                Ok(f64::from(f32::from_bits(self.be(4, field)? as u32)))
            }
            Marker::F64 => {
                self.pos += 1;
                Ok(f64::from_bits(self.be(8, field)?))
            }
            m if Kind::of(m) == Kind::Int => match self.int(field)? {
                Int::U(v) => Ok(v as f64),
                Int::I(v) => Ok(v as f64),
            },
            other => Err(self.unexpected(field, "a float or an int", other)),
        }
    }

    pub(crate) fn str(&mut self, field: &str) -> Result<&'a str, DecodeError> {
        let m = self.marker(field)?;
        match m {
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                let n = self.len_after(m, field)?.unwrap_or(0);
                let start = self.pos;
                let b = self.take(n, field)?;
                std::str::from_utf8(b).map_err(|e| {
                    self.err(format!(
                        "{}str at offset {start} is not valid UTF-8 ({e})",
                        Self::at(field)
                    ))
                })
            }
            other => Err(self.unexpected(field, "a str", other)),
        }
    }

    pub(crate) fn bin(&mut self, field: &str) -> Result<&'a [u8], DecodeError> {
        let m = self.marker(field)?;
        match m {
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
                let n = self.len_after(m, field)?.unwrap_or(0);
                self.take(n, field)
            }
            other => Err(self.unexpected(field, "bin (bytes)", other)),
        }
    }

    /// An array header; the count is checked against the bytes left (each element ≥ 1 byte).
    pub(crate) fn array_len(&mut self, field: &str) -> Result<usize, DecodeError> {
        let m = self.marker(field)?;
        match m {
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let n = self.len_after(m, field)?.unwrap_or(0);
                if n > self.remaining() {
                    return Err(self.err(format!(
                        "{}array claims {n} elements but only {} byte(s) are left",
                        Self::at(field),
                        self.remaining()
                    )));
                }
                Ok(n)
            }
            other => Err(self.unexpected(field, "an array", other)),
        }
    }

    /// A map header; the count is checked against the bytes left (each entry ≥ 2 bytes).
    pub(crate) fn map_len(&mut self, field: &str) -> Result<usize, DecodeError> {
        let m = self.marker(field)?;
        match m {
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                let n = self.len_after(m, field)?.unwrap_or(0);
                if n > self.remaining() / 2 {
                    return Err(self.err(format!(
                        "{}map claims {n} entries but only {} byte(s) are left",
                        Self::at(field),
                        self.remaining()
                    )));
                }
                Ok(n)
            }
            other => Err(self.unexpected(field, "a map", other)),
        }
    }

    /// An ext value: `(type, data)`.
    pub(crate) fn ext(&mut self, field: &str) -> Result<(i8, &'a [u8]), DecodeError> {
        let m = self.marker(field)?;
        let n = match m {
            Marker::FixExt1 => 1,
            Marker::FixExt2 => 2,
            Marker::FixExt4 => 4,
            Marker::FixExt8 => 8,
            Marker::FixExt16 => 16,
            Marker::Ext8 => self.be(1, field)? as usize,
            Marker::Ext16 => self.be(2, field)? as usize,
            Marker::Ext32 => usize::try_from(self.be(4, field)?)
                .map_err(|_| self.err(format!("{}ext length too large", Self::at(field))))?,
            other => return Err(self.unexpected(field, "an ext value", other)),
        };
        let ty = self.take(1, field)?[0] as i8;
        let data = self.take(n, field)?;
        Ok((ty, data))
    }

    /// Skip one complete value (depth-limited), returning its raw bytes.
    pub(crate) fn value_slice(&mut self, field: &str) -> Result<&'a [u8], DecodeError> {
        let start = self.pos;
        self.skip(field, 0)?;
        Ok(&self.buf[start..self.pos])
    }

    fn skip(&mut self, field: &str, depth: usize) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(self.err(format!(
                "{}nesting deeper than {MAX_DEPTH} levels",
                Self::at(field)
            )));
        }
        // Iterative over siblings, recursive only into containers.
        let m = self.marker(field)?;
        match m {
            Marker::Null | Marker::True | Marker::False | Marker::FixPos(_) | Marker::FixNeg(_) => {
            }
            Marker::U8 | Marker::I8 => {
                self.take(1, field)?;
            }
            Marker::U16 | Marker::I16 => {
                self.take(2, field)?;
            }
            Marker::U32 | Marker::I32 | Marker::F32 => {
                self.take(4, field)?;
            }
            Marker::U64 | Marker::I64 | Marker::F64 => {
                self.take(8, field)?;
            }
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                let n = self.len_after(m, field)?.unwrap_or(0);
                let b = self.take(n, field)?;
                if std::str::from_utf8(b).is_err() {
                    return Err(self.err(format!("{}a str is not valid UTF-8", Self::at(field))));
                }
            }
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
                let n = self.len_after(m, field)?.unwrap_or(0);
                self.take(n, field)?;
            }
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                self.pos -= 1;
                let n = self.array_len(field)?;
                for _ in 0..n {
                    // Fast path for arrays of ints (token ids): no recursion for scalars.
                    match self.buf.get(self.pos) {
                        Some(&(0..=0x7f | 0xe0..=0xff)) => self.pos += 1,
                        Some(0xcc | 0xd0) if self.remaining() >= 2 => self.pos += 2,
                        Some(0xcd | 0xd1) if self.remaining() >= 3 => self.pos += 3,
                        Some(0xce | 0xd2) if self.remaining() >= 5 => self.pos += 5,
                        _ => self.skip(field, depth + 1)?,
                    }
                }
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                self.pos -= 1;
                let n = self.map_len(field)?;
                for _ in 0..n {
                    self.skip(field, depth + 1)?;
                    self.skip(field, depth + 1)?;
                }
            }
            Marker::FixExt1
            | Marker::FixExt2
            | Marker::FixExt4
            | Marker::FixExt8
            | Marker::FixExt16
            | Marker::Ext8
            | Marker::Ext16
            | Marker::Ext32 => {
                self.pos -= 1;
                self.ext(field)?;
            }
            Marker::Reserved => {
                return Err(self.err(format!(
                    "{}reserved byte 0xc1 at offset {} is not msgpack",
                    Self::at(field),
                    self.pos - 1
                )))
            }
        }
        Ok(())
    }
}

/// Check that `frame` is exactly one well-formed msgpack document, nested at most
/// [`MAX_DEPTH`] levels.
pub(crate) fn check_document(what: &'static str, frame: &[u8]) -> Result<(), DecodeError> {
    let mut r = Reader::new(what, frame);
    r.value_slice("document")?;
    r.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(hex_str: &str) -> Result<(), DecodeError> {
        check_document("doc", &hex::decode(hex_str.replace(' ', "")).unwrap())
    }

    #[test]
    fn well_formed_documents() {
        for ok in [
            "c0",
            "c2",
            "c3",
            "00",
            "7f",
            "e0",
            "ff",
            "cc ff",
            "cd 01 00",
            "ce 00 01 00 00",
            "cf 00 00 00 01 00 00 00 00",
            "d0 80",
            "d1 80 00",
            "d2 80 00 00 00",
            "d3 80 00 00 00 00 00 00 00",
            "ca 3f c0 00 00",
            "cb 3f f8 00 00 00 00 00 00",
            "a0",
            "a3 61 62 63",
            "d9 01 61",
            "da 00 01 61",
            "db 00 00 00 01 61",
            "c4 00",
            "c5 00 01 00",
            "c6 00 00 00 01 00",
            "90",
            "92 01 02",
            "dc 00 01 01",
            "dd 00 00 00 01 01",
            "80",
            "81 a1 61 01",
            "de 00 01 01 02",
            "df 00 00 00 01 01 02",
            "d4 01 00",
            "d5 01 00 00",
            "d6 01 00 00 00 00",
            "d7 01 00 00 00 00 00 00 00 00",
            "c7 00 01",
            "c8 00 01 01 00",
            "c9 00 00 00 00 01",
        ] {
            assert_eq!(doc(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn malformed_documents() {
        for bad in [
            "",
            "c1",
            "cc",
            "cd 01",
            "a3 61 62",
            "92 01",
            "81 a1 61",
            "c4 02 00",
            "a2 ff fe",
            "00 00",
            "dd ff ff ff ff 00",
            "df ff ff ff ff",
            "c9 ff ff ff ff 01",
            "d4 01",
        ] {
            assert!(doc(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nesting_is_limited() {
        let mut deep = vec![0x91; MAX_DEPTH];
        deep.push(0xc0);
        assert_eq!(check_document("doc", &deep), Ok(()));
        let mut deeper = vec![0x91; MAX_DEPTH + 1];
        deeper.push(0xc0);
        let e = check_document("doc", &deeper).unwrap_err().to_string();
        assert!(e.contains("nesting deeper"), "{e}");
        // Far too deep: an error, not a stack overflow.
        let mut huge = vec![0x81, 0xa0];
        for _ in 0..100_000 {
            huge.extend([0x81, 0xa0]);
        }
        huge.push(0xc0);
        assert!(check_document("doc", &huge).is_err());
    }

    #[test]
    fn ints_of_every_width() {
        let read = |h: &str| Reader::new("t", &hex::decode(h.replace(' ', "")).unwrap()).int("x");
        assert_eq!(read("05"), Ok(Int::U(5)));
        assert_eq!(read("e0"), Ok(Int::I(-32)));
        assert_eq!(read("cf ff ff ff ff ff ff ff ff"), Ok(Int::U(u64::MAX)));
        assert_eq!(read("d3 80 00 00 00 00 00 00 00"), Ok(Int::I(i64::MIN)));
        assert_eq!(read("d0 ff"), Ok(Int::I(-1)));
        assert_eq!(read("d1 7f ff"), Ok(Int::I(32767)));
        assert!(read("c3")
            .unwrap_err()
            .to_string()
            .contains("expected an int, got bool true"));
    }

    #[test]
    fn describe_values() {
        let r = Reader::new("t", b"\xa3abc");
        assert_eq!(r.describe_at(0), "str \"abc\"");
        assert_eq!(r.describe_at(4), "end of input");
    }
}
