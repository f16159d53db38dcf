//! LMCache's classic remote-server wire (`remote_url: "lm://host:port"`), as LMCache 0.5.6's
//! `LMCServerConnector` speaks it and its reference server (`python -m lmcache.v1.server`)
//! answers it (spec: `shared/protocol/lmcache-remote-and-vllm.md` §1).
//!
//! Plain TCP. Every request is a fixed 186-byte [`ClientHeader`] (a PUT's is followed by
//! `length` raw bytes); every reply is a fixed 36-byte [`ServerHeader`] (a GET hit's is followed
//! by `length` bytes). PUT and LIST get no reply. All integers are 4-byte little-endian.
//!
//! The two headers order their words differently: `location` is word 4 of the client header,
//! before the shape, but word 8 of the server header, after it. They are two types here, each
//! with its own layout, so neither direction can put it in the other's slot.
//!
//! A header is validated as the reference server's `deserialize` does (an unknown command,
//! format, dtype or location code, a key that is not UTF-8 or does not parse as a
//! `CacheEngineKey`): it raises there, and the server closes the connection without a reply.

use std::fmt;

use thiserror::Error;

/// Bytes of a request header: 9 words and the 150-byte key field.
pub const CLIENT_HEADER_LEN: usize = 4 * 9 + KEY_FIELD_LEN;
/// Bytes of a reply header: 9 words.
pub const SERVER_HEADER_LEN: usize = 4 * 9;
/// The key field: the key's UTF-8, right-padded with spaces.
pub const KEY_FIELD_LEN: usize = 150;

/// The request kinds (`ClientCommand`, an `IntEnum` starting at 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Put = 1,
    Get = 2,
    Exist = 3,
    List = 4,
    Health = 5,
}

impl Command {
    pub fn from_code(code: i32) -> Option<Command> {
        Some(match code {
            1 => Command::Put,
            2 => Command::Get,
            3 => Command::Exist,
            4 => Command::List,
            5 => Command::Health,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Command::Put => "put",
            Command::Get => "get",
            Command::Exist => "exist",
            Command::List => "list",
            Command::Health => "health",
        }
    }
}

/// `ServerReturnCode.SUCCESS`.
pub const SUCCESS: i32 = 200;
/// `ServerReturnCode.FAIL`.
pub const FAIL: i32 = 400;

/// Largest `MemoryFormat` value (`HS_TD`).
const MAX_FORMAT: i32 = 8;
/// Largest dtype code (`float8_e5m2`).
const MAX_DTYPE: i32 = 8;
/// Largest location code (`LocalDiskBackend`).
const MAX_LOCATION: i32 = 2;

/// What an object is: memory format, dtype code and shape padded to 4 dimensions, as a PUT
/// describes it and a GET hit echoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TensorMeta {
    pub fmt: i32,
    pub dtype: i32,
    pub shape: [i32; 4],
}

impl TensorMeta {
    /// What GET, EXIST and HEALTH requests carry, and every reply but a GET hit:
    /// `KV_2LTD`, float16, `[0, 0, 0, 0]`.
    pub const PLACEHOLDER: TensorMeta = TensorMeta {
        fmt: 1,
        dtype: 2,
        shape: [0; 4],
    };

    /// The dtype code as the reference server writes it back: code 1 (`torch.half`) decodes to
    /// the same object as float16, which encodes as 2.
    pub fn echoed(self) -> TensorMeta {
        TensorMeta {
            dtype: if self.dtype == 1 { 2 } else { self.dtype },
            ..self
        }
    }

    /// Bytes of one element of the dtype (1 for the 1-byte types and for none).
    pub fn itemsize(self) -> u8 {
        match self.dtype {
            1..=3 => 2,
            4 => 4,
            5 => 8,
            _ => 1,
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LmError {
    #[error("unknown command {0}")]
    Command(i32),
    #[error("unknown memory format {0}")]
    Format(i32),
    #[error("unknown dtype code {0}")]
    Dtype(i32),
    #[error("unknown location code {0}")]
    Location(i32),
    #[error("negative payload length {0}")]
    Length(i32),
    #[error("the key field is not UTF-8")]
    KeyUtf8,
    #[error("malformed key: {0}")]
    Key(&'static str),
}

/// A request header, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHeader {
    pub command: Command,
    /// Payload bytes that follow (PUT); the other commands' is not read.
    pub length: u32,
    pub meta: TensorMeta,
    pub location: i32,
    pub key: Key,
}

fn word(b: &[u8], i: usize) -> i32 {
    i32::from_le_bytes(b[4 * i..4 * i + 4].try_into().expect("4 bytes"))
}

impl ClientHeader {
    /// A request for `key` with the placeholder metadata (how the client sends GET and EXIST).
    pub fn placeholder(command: Command, key: Key) -> ClientHeader {
        ClientHeader {
            command,
            length: 0,
            meta: TensorMeta::PLACEHOLDER,
            location: 0,
            key,
        }
    }

    pub fn decode(b: &[u8; CLIENT_HEADER_LEN]) -> Result<ClientHeader, LmError> {
        let code = word(b, 0);
        let command = Command::from_code(code).ok_or(LmError::Command(code))?;
        let length = word(b, 1);
        let meta = TensorMeta {
            fmt: word(b, 2),
            dtype: word(b, 3),
            shape: [word(b, 5), word(b, 6), word(b, 7), word(b, 8)],
        };
        let location = word(b, 4);
        if !(0..=MAX_FORMAT).contains(&meta.fmt) {
            return Err(LmError::Format(meta.fmt));
        }
        if !(0..=MAX_DTYPE).contains(&meta.dtype) {
            return Err(LmError::Dtype(meta.dtype));
        }
        if !(0..=MAX_LOCATION).contains(&location) {
            return Err(LmError::Location(location));
        }
        let length = u32::try_from(length).map_err(|_| LmError::Length(length))?;
        let text = std::str::from_utf8(&b[36..]).map_err(|_| LmError::KeyUtf8)?;
        Ok(ClientHeader {
            command,
            length,
            meta,
            location,
            key: Key::parse(text)?,
        })
    }

    /// The 186 bytes (the key must fit the field: at most 150 bytes).
    pub fn encode(&self) -> [u8; CLIENT_HEADER_LEN] {
        let mut b = [b' '; CLIENT_HEADER_LEN];
        let m = &self.meta;
        let words = [
            self.command as i32,
            self.length as i32,
            m.fmt,
            m.dtype,
            self.location,
            m.shape[0],
            m.shape[1],
            m.shape[2],
            m.shape[3],
        ];
        for (i, w) in words.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        let key = self.key.as_str().as_bytes();
        b[36..36 + key.len()].copy_from_slice(key);
        b
    }
}

/// A reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerHeader {
    pub code: i32,
    /// Payload bytes that follow (a GET hit).
    pub length: u32,
    pub meta: TensorMeta,
    /// Always 0 from the reference server; the client ignores it.
    pub location: i32,
}

impl ServerHeader {
    /// SUCCESS without a payload: EXIST found, HEALTH.
    pub const OK: ServerHeader = ServerHeader::placeholder(SUCCESS);
    /// FAIL: EXIST or GET missed.
    pub const MISS: ServerHeader = ServerHeader::placeholder(FAIL);

    const fn placeholder(code: i32) -> ServerHeader {
        ServerHeader {
            code,
            length: 0,
            meta: TensorMeta::PLACEHOLDER,
            location: 0,
        }
    }

    /// A GET hit: `length` bytes of an object PUT with `meta` follow.
    pub fn hit(length: u32, meta: TensorMeta) -> ServerHeader {
        ServerHeader {
            code: SUCCESS,
            length,
            meta: meta.echoed(),
            location: 0,
        }
    }

    pub fn encode(&self) -> [u8; SERVER_HEADER_LEN] {
        let m = &self.meta;
        let words = [
            self.code,
            self.length as i32,
            m.fmt,
            m.dtype,
            m.shape[0],
            m.shape[1],
            m.shape[2],
            m.shape[3],
            self.location,
        ];
        let mut b = [0u8; SERVER_HEADER_LEN];
        for (i, w) in words.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// Decode a reply (the client's side; cwm's tests read cwm's replies with it).
    pub fn decode(b: &[u8; SERVER_HEADER_LEN]) -> Result<ServerHeader, LmError> {
        let length = word(b, 1);
        Ok(ServerHeader {
            code: word(b, 0),
            length: u32::try_from(length).map_err(|_| LmError::Length(length))?,
            meta: TensorMeta {
                fmt: word(b, 2),
                dtype: word(b, 3),
                shape: [word(b, 4), word(b, 5), word(b, 6), word(b, 7)],
            },
            location: word(b, 8),
        })
    }
}

/// The dtype words of `CacheEngineKey` strings (`TORCH_DTYPE_TO_STR_DTYPE`).
const KEY_DTYPES: [&str; 14] = [
    "half",
    "bfloat16",
    "float",
    "double",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
    "fp8_e4m3fn",
    "fp8_e4m3fnuz",
    "fp8_e5m2",
    "fp8_e5m2fnuz",
];

/// A `CacheEngineKey` (or `LayerCacheEngineKey`) string:
/// `<model>@<world_size>@<worker_id>@<chunk hash hex>@<dtype>[@<layer>][@<tag>%<value>]...`,
/// checked as LMCache's `parse_cache_key` parses it. The whole string is the identity: two keys
/// are the same object only if every field (tags, layer, dtype) is the same.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key {
    text: Box<str>,
    model_len: usize,
    world_size: u32,
    worker_id: u32,
}

impl Key {
    /// Parse the key field's text: surrounding whitespace is stripped (the client pads with
    /// spaces; Python's `str.strip`, so NUL padding is not whitespace and fails to parse).
    pub fn parse(field: &str) -> Result<Key, LmError> {
        let text = field.trim_matches(is_python_space);
        let parts: Vec<&str> = text.split('@').collect();
        if parts.len() < 5 {
            return Err(LmError::Key("fewer than 5 '@'-separated parts"));
        }
        let decimal = |s: &str| {
            (!s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u32>().ok())
                .flatten()
        };
        let world_size = decimal(parts[1]).ok_or(LmError::Key("world_size is not a number"))?;
        let worker_id = decimal(parts[2]).ok_or(LmError::Key("worker_id is not a number"))?;
        let hash = parts[3].strip_prefix('-').unwrap_or(parts[3]);
        if hash.is_empty() || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(LmError::Key("chunk hash is not hexadecimal"));
        }
        if !KEY_DTYPES.contains(&parts[4]) {
            return Err(LmError::Key("unknown dtype word"));
        }
        // A sixth part of digits is a layer id (`LayerCacheEngineKey`); every tag is name%value.
        let first_tag = if parts.len() >= 6 && decimal(parts[5]).is_some() {
            6
        } else {
            5
        };
        if parts[first_tag.min(parts.len())..]
            .iter()
            .any(|t| !t.contains('%'))
        {
            return Err(LmError::Key("a tag without '%'"));
        }
        Ok(Key {
            model_len: parts[0].len(),
            text: text.into(),
            world_size,
            worker_id,
        })
    }

    /// The key as the client wrote it (without the padding).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The model name (may be empty or contain `/`).
    pub fn model(&self) -> &str {
        &self.text[..self.model_len]
    }

    pub fn world_size(&self) -> u32 {
        self.world_size
    }

    pub fn worker_id(&self) -> u32 {
        self.worker_id
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.text)
    }
}

/// Python's `str.isspace`: Unicode whitespace plus the ASCII separators 0x1c..=0x1f.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(words: [i32; 9], key: &str) -> [u8; CLIENT_HEADER_LEN] {
        let mut b = [b' '; CLIENT_HEADER_LEN];
        for (i, w) in words.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        b[36..36 + key.len()].copy_from_slice(key.as_bytes());
        b
    }

    #[test]
    fn keys_parse_as_lmcache_parses_them() {
        let k = Key::parse("Qwen/Qwen3-8B@2@1@-5f3a9c@half@user%alice   ").unwrap();
        assert_eq!(k.as_str(), "Qwen/Qwen3-8B@2@1@-5f3a9c@half@user%alice");
        assert_eq!(
            (k.model(), k.world_size(), k.worker_id()),
            ("Qwen/Qwen3-8B", 2, 1)
        );
        Key::parse("m@1@0@ff@bfloat16@7").unwrap();
        Key::parse("m@1@0@ff@bfloat16@7@a%b@c%").unwrap();
        Key::parse("@1@0@ff@bfloat16").unwrap();
        for bad in [
            "m@1@0@ff",
            "m@x@0@ff@half",
            "m@1@-1@ff@half",
            "m@1@0@fg@half",
            "m@1@0@-@half",
            "m@1@0@ff@float16",
            "m@1@0@ff@half@notatag",
            "m@1@0@ff@half@7@notatag",
            "m@1@0@ff@half\0\0",
        ] {
            assert!(Key::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_header_with_an_unknown_code_is_refused() {
        let key = "m@1@0@ff@half";
        let ok = [1, 8, 1, 3, 0, 2, 2, 1, 1];
        let h = ClientHeader::decode(&header(ok, key)).unwrap();
        assert_eq!((h.command, h.length), (Command::Put, 8));
        assert_eq!(h.meta.shape, [2, 2, 1, 1]);
        assert_eq!(ClientHeader::decode(&h.encode()).unwrap(), h);
        let with = |i: usize, v: i32| {
            let mut w = ok;
            w[i] = v;
            ClientHeader::decode(&header(w, key))
        };
        assert_eq!(with(0, 0), Err(LmError::Command(0)));
        assert_eq!(with(0, 6), Err(LmError::Command(6)));
        assert_eq!(with(1, -1), Err(LmError::Length(-1)));
        assert_eq!(with(2, 9), Err(LmError::Format(9)));
        assert_eq!(with(3, 9), Err(LmError::Dtype(9)));
        assert_eq!(with(4, 3), Err(LmError::Location(3)));
        let mut b = header(ok, key);
        b[40] = 0xff;
        assert_eq!(ClientHeader::decode(&b), Err(LmError::KeyUtf8));
    }

    #[test]
    fn location_is_word_four_of_a_request_and_word_eight_of_a_reply() {
        let h = ClientHeader {
            location: 2,
            ..ClientHeader::placeholder(Command::Get, Key::parse("m@1@0@ff@half").unwrap())
        };
        assert_eq!(word(&h.encode(), 4), 2);
        let r = ServerHeader {
            location: 2,
            ..ServerHeader::hit(
                4,
                TensorMeta {
                    fmt: 1,
                    dtype: 1,
                    shape: [5, 6, 7, 8],
                },
            )
        };
        let b = r.encode();
        assert_eq!(
            (0..9).map(|i| word(&b, i)).collect::<Vec<_>>(),
            [200, 4, 1, 2, 5, 6, 7, 8, 2],
            "dtype code 1 is echoed as 2, as the reference server does"
        );
        assert_eq!(ServerHeader::decode(&b).unwrap(), r);
    }
}
