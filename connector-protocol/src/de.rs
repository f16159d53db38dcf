//! A serde `Deserializer` over [`Reader`]: msgspec-like strictness and error messages that name
//! the field path, the offending value and what was expected (e.g.
//! `token_ids[1]: invalid value: integer `-1`, expected u32`).
//!
//! Differences from `rmp_serde`'s decoder, all towards msgspec's behaviour: a struct must be a
//! map (not an array), struct keys must be str, `String` fields need a msgpack str (not bin),
//! byte fields need bin (not str), and unknown keys are skipped without being decoded. Input is
//! validated by `check_document` first, so recursion is bounded.

use std::borrow::Cow;
use std::fmt;

use rmp::Marker;
use serde::de::{
    self, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess, SeqAccess, VariantAccess,
    Visitor,
};

use crate::reader::{marker_kind, Int, Kind, Reader};
use crate::DecodeError;

/// The newtype name with which [`u32_array`] asks for the raw msgpack of an array.
pub(crate) const U32_ARRAY: &str = "$cwm::u32_array";

/// `#[serde(deserialize_with = "crate::de::u32_array::deserialize")]` for `Vec<u32>` fields
/// that carry many elements (token ids): with our deserializer the array is parsed by a tight
/// loop; with any other deserializer it falls back to the ordinary `Vec<u32>` impl.
pub(crate) mod u32_array {
    use serde::de::{self, Deserialize, Deserializer};
    use std::fmt;

    use crate::reader::Reader;
    use crate::DecodeError;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        d.deserialize_newtype_struct(super::U32_ARRAY, Visitor)
    }

    struct Visitor;

    impl<'de> de::Visitor<'de> for Visitor {
        type Value = Vec<u32>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array of ints in 0..=4294967295")
        }

        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Vec<u32>, D::Error> {
            Vec::<u32>::deserialize(d)
        }

        fn visit_borrowed_bytes<E: de::Error>(self, raw: &'de [u8]) -> Result<Vec<u32>, E> {
            let mut r = Reader::new("array", raw);
            let reason = |e: DecodeError| match e {
                DecodeError::Payload { reason, .. } => reason,
                other => other.to_string(),
            };
            let n = r.array_len("").map_err(|e| E::custom(reason(e)))?;
            r.u32_elements(n)
                .map_err(|(i, e)| E::custom(format!("[{i}]: {}", reason(e))))
        }
    }
}

/// An error with the path from the document root to where it happened.
#[derive(Debug)]
pub(crate) struct Error {
    /// Innermost segment first (pushed while unwinding).
    path: Vec<Seg>,
    msg: String,
}

#[derive(Debug)]
enum Seg {
    Index(usize),
    Key(String),
}

impl Error {
    fn msg(msg: impl ToString) -> Error {
        Error {
            path: Vec::new(),
            msg: msg.to_string(),
        }
    }

    fn within(mut self, seg: Seg) -> Error {
        self.path.push(seg);
        self
    }
}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Error {
        match e {
            DecodeError::Payload { reason, .. } => Error::msg(reason),
            other => Error::msg(other),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for seg in self.path.iter().rev() {
            match seg {
                Seg::Index(i) => write!(f, "[{i}]")?,
                Seg::Key(k) if first => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
            }
            first = false;
        }
        // A message that starts with an index continues the path (`token_ids[3]: …`).
        if !self.path.is_empty() && !self.msg.starts_with('[') {
            f.write_str(": ")?;
        }
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Error {
        Error::msg(msg)
    }
}

pub(crate) struct Deserializer<'a, 'r> {
    r: &'r mut Reader<'a>,
}

impl<'a, 'r> Deserializer<'a, 'r> {
    pub(crate) fn new(r: &'r mut Reader<'a>) -> Self {
        Deserializer { r }
    }

    #[inline]
    fn peek(&self) -> Result<Marker, Error> {
        Ok(self.r.peek_marker("")?)
    }

    fn expect_kind(&self, kind: Kind, expected: &str) -> Result<(), Error> {
        let m = self.peek()?;
        if Kind::of(m) == kind {
            Ok(())
        } else {
            Err(Error::msg(format!(
                "expected {expected}, got {}",
                self.r.describe_at(self.r.position())
            )))
        }
    }
}

impl<'de, 'r> de::Deserializer<'de> for &mut Deserializer<'de, 'r> {
    type Error = Error;

    #[inline]
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let m = self.peek()?;
        if let Marker::FixPos(v) = m {
            // Fast path: small ints (token ids, lengths, flags).
            self.r.skip_byte();
            return visitor.visit_u64(u64::from(v));
        }
        match Kind::of(m) {
            Kind::Nil => {
                self.r.nil("")?;
                visitor.visit_unit()
            }
            Kind::Bool => visitor.visit_bool(self.r.bool("")?),
            Kind::Int => match self.r.int("")? {
                Int::U(v) => visitor.visit_u64(v),
                Int::I(v) => visitor.visit_i64(v),
            },
            Kind::Float => {
                if m == Marker::F32 {
                    visitor.visit_f32(self.r.float("")? as f32)
                } else {
                    visitor.visit_f64(self.r.float("")?)
                }
            }
            Kind::Str => visitor.visit_borrowed_str(self.r.str("")?),
            Kind::Bin => visitor.visit_borrowed_bytes(self.r.bin("")?),
            Kind::Array => {
                let n = self.r.array_len("")?;
                visitor.visit_seq(Seq {
                    de: self,
                    left: n,
                    index: 0,
                })
            }
            Kind::Map => {
                let n = self.r.map_len("")?;
                visitor.visit_map(Map {
                    de: self,
                    left: n,
                    key: None,
                })
            }
            Kind::Ext => {
                let (ty, data) = self.r.ext("")?;
                visitor.visit_newtype_struct(ExtDeserializer { ty, data })
            }
            Kind::Reserved => Err(Error::msg(format!("{} is not msgpack", marker_kind(m)))),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.r.nil("")? {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.expect_kind(Kind::Nil, "nil")?;
        self.deserialize_any(visitor)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.expect_kind(Kind::Str, "a str")?;
        visitor.visit_borrowed_str(self.r.str("")?)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.expect_kind(Kind::Bin, "bin (bytes)")?;
        visitor.visit_borrowed_bytes(self.r.bin("")?)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        if name == U32_ARRAY && Kind::of(self.peek()?) == Kind::Array {
            // Hand the raw array to `u32_array::Visitor` (the fast token-id path).
            return visitor.visit_borrowed_bytes(self.r.value_slice("")?);
        }
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.expect_kind(Kind::Map, "a map")?;
        self.deserialize_any(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.expect_kind(Kind::Str, "a str key")?;
        visitor.visit_borrowed_str(self.r.str("")?)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        // msgspec encodes an Enum as its value; only unit variants named by a str are supported.
        self.expect_kind(Kind::Str, "a str (enum value)")?;
        let s = self.r.str("")?;
        visitor.visit_enum(UnitVariant(s))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.r.value_slice("")?;
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 seq tuple tuple_struct map
    }
}

struct Seq<'s, 'de, 'r> {
    de: &'s mut Deserializer<'de, 'r>,
    left: usize,
    index: usize,
}

impl<'de> SeqAccess<'de> for Seq<'_, 'de, '_> {
    type Error = Error;

    #[inline]
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let i = self.index;
        self.index += 1;
        seed.deserialize(&mut *self.de)
            .map(Some)
            .map_err(|e| e.within(Seg::Index(i)))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

struct Map<'s, 'de, 'r> {
    de: &'s mut Deserializer<'de, 'r>,
    left: usize,
    /// The current key, for error paths (borrowed from the input; no allocation per key).
    key: Option<Cow<'de, str>>,
}

impl<'de> MapAccess<'de> for Map<'_, 'de, '_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let mut probe = self.de.r.clone_at();
        self.key = match probe.peek_marker("") {
            Ok(m) if Kind::of(m) == Kind::Str => probe.str("").ok().map(Cow::Borrowed),
            Ok(m) => Some(Cow::Owned(format!("<{} key>", marker_kind(m)))),
            Err(_) => None,
        };
        let key = &self.key;
        seed.deserialize(&mut *self.de)
            .map(Some)
            .map_err(|e| e.within(key_seg(key)))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let key = self.key.take();
        seed.deserialize(&mut *self.de)
            .map_err(|e| e.within(key_seg(&key)))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

fn key_seg(key: &Option<Cow<'_, str>>) -> Seg {
    Seg::Key(key.as_deref().unwrap_or("<key>").to_string())
}

/// An ext value as rmpv expects it: a newtype around the tuple `(type: i8, data: bytes)`.
struct ExtDeserializer<'de> {
    ty: i8,
    data: &'de [u8],
}

impl<'de> de::Deserializer<'de> for ExtDeserializer<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(ExtSeq { ext: self, next: 0 })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

struct ExtSeq<'de> {
    ext: ExtDeserializer<'de>,
    next: u8,
}

impl<'de> SeqAccess<'de> for ExtSeq<'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        self.next += 1;
        match self.next {
            1 => seed
                .deserialize(i64::from(self.ext.ty).into_deserializer())
                .map(Some),
            2 => seed
                .deserialize(de::value::BorrowedBytesDeserializer::new(self.ext.data))
                .map(Some),
            _ => Ok(None),
        }
    }
}

struct UnitVariant<'de>(&'de str);

impl<'de> EnumAccess<'de> for UnitVariant<'de> {
    type Error = Error;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), Error> {
        let v = seed.deserialize(de::value::BorrowedStrDeserializer::<Error>::new(self.0))?;
        Ok((v, self))
    }
}

impl<'de> VariantAccess<'de> for UnitVariant<'de> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> Result<T::Value, Error> {
        Err(Error::msg(format!(
            "enum value {:?}: only unit variants are supported",
            self.0
        )))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, Error> {
        Err(Error::msg(format!(
            "enum value {:?}: only unit variants are supported",
            self.0
        )))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Error> {
        Err(Error::msg(format!(
            "enum value {:?}: only unit variants are supported",
            self.0
        )))
    }
}
