//! The record: one stored object as every tier behind L1 stores it, and as window files carry
//! it (format versions 1 and 2, documented in docs/FORMATS.md). Encoded once, by write-behind
//! or a window freeze, and copied verbatim between tiers and files.
//!
//! ```text
//! offset size field
//!  0      4   magic "CWMR"
//!  4      2   format version (u16 LE): 1, or 2 when flags are set
//!  6      1   codec (0 raw, 1 zstd, 2 zstd byte planes)
//!  7      1   itemsize of the stored elements (1, 2, 4; the byte-plane split needs 2)
//!  8      2   key length K (u16 LE)
//! 10      2   version 1: reserved, 0; version 2: flags (bit 0: sealed)
//! 12      8   raw length (u64 LE): bytes after decompression
//! 20      8   stored length S (u64 LE): payload bytes on disk
//! 28      4   crc32 of the payload
//! 32      K   key: kv_rank u32 LE, object_group u32 LE, chunk hash [32],
//!             model length u16 LE, model UTF-8, salt length u16 LE, salt UTF-8
//! 32+K    4   crc32 of bytes [0, 32+K)
//! 36+K    S   payload
//! ```
//!
//! A record is valid only if the magic, version, header crc and payload crc all match; a
//! reader never hands out bytes from a record that fails any check.
//!
//! A sealed record (version 2, flag bit 0; `store::seal` owns the cryptography) has the same
//! header; its payload is the codec's payload encrypted, `nonce ++ ciphertext ++ tag`, and the
//! payload crc covers those stored bytes, so every check here still runs without the key.
//! `Record::decode_into` refuses a sealed record: only `seal::Sealer` opens one.

use std::sync::Arc;

use connector_protocol::{ChunkHash, ObjectKey};
use thiserror::Error;

use crate::store::codec::{self, Codec, CodecError, CompressionPolicy};
use crate::store::le::{self, LeReader, PutLe};

pub const MAGIC: [u8; 4] = *b"CWMR";
/// The version of a record without flags (every record before encryption at rest).
pub const VERSION: u16 = 1;
/// The version of a record with flags (a sealed record).
pub const VERSION_FLAGGED: u16 = 2;
/// Flag bit: the payload is sealed (`store::seal`).
pub const FLAG_SEALED: u16 = 1;
/// Every flag this build knows; a version 2 record with another bit set is refused.
const FLAGS_KNOWN: u16 = FLAG_SEALED;
/// Bytes before the key.
pub const FIXED: usize = 32;
/// Largest key we write or accept (model + salt + 44 fixed bytes).
pub const MAX_KEY: usize = 4096;
/// Largest raw or stored payload a header may claim (1 TiB): far beyond any chunk, and small
/// enough that offsets and lengths computed from a header can never overflow.
pub const MAX_PAYLOAD: u64 = 1 << 40;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RecordError {
    #[error("record at {offset}: truncated ({have} bytes, need {need})")]
    Short { offset: u64, have: u64, need: u64 },
    #[error("record at {offset}: bad magic {found:02x?}")]
    Magic { offset: u64, found: [u8; 4] },
    #[error("record at {offset}: format version {found}, this build reads {VERSION} and {VERSION_FLAGGED}")]
    Version { offset: u64, found: u16 },
    #[error("record at {offset}: header checksum mismatch")]
    HeaderCrc { offset: u64 },
    #[error("record at {offset}: payload checksum mismatch")]
    PayloadCrc { offset: u64 },
    #[error("record at {offset}: malformed header ({what})")]
    Malformed { offset: u64, what: &'static str },
}

/// A decoded record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    pub codec: Codec,
    pub itemsize: u8,
    pub raw_len: u64,
    pub stored_len: u64,
    pub payload_crc: u32,
    pub key: ObjectKey,
    /// The payload is sealed (version 2, `FLAG_SEALED`): only `seal::Sealer` decodes it.
    pub sealed: bool,
    /// Bytes of the header (fixed part, key, header crc): the payload starts here.
    pub header_len: u64,
}

impl RecordHeader {
    pub fn record_len(&self) -> u64 {
        // Cannot overflow: decode_header bounds both (MAX_KEY, MAX_PAYLOAD).
        self.header_len + self.stored_len
    }
}

/// The most bytes a record of `key` holding `raw_len` object bytes may take: compression never
/// grows a payload (a codec that does not shrink it stores it raw), sealing adds its nonce and
/// tag. Used to count a chunk against a quota before it is encoded.
pub fn max_record_len(key: &ObjectKey, raw_len: u64) -> u64 {
    let key_len = 8 + 32 + 4 + key.model.len() + key.cache_salt.len();
    (FIXED + key_len + 4 + crate::store::seal::OVERHEAD) as u64 + raw_len
}

/// The key section of a record (also used by the index checkpoint).
pub fn encode_key_bytes(key: &ObjectKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + key.model.len() + key.cache_salt.len());
    encode_key(key, &mut out);
    out
}

fn encode_key(key: &ObjectKey, out: &mut Vec<u8>) {
    out.put_u32(key.kv_rank);
    out.put_u32(key.object_group);
    out.extend_from_slice(&key.chunk_hash.0);
    for s in [&*key.model, &*key.cache_salt] {
        out.put_u16(s.len() as u16);
        out.extend_from_slice(s.as_bytes());
    }
}

/// Inverse of `encode_key_bytes`.
pub fn decode_key_bytes(b: &[u8]) -> Option<ObjectKey> {
    let mut r = LeReader::new(b);
    let kv_rank = r.u32()?;
    let object_group = r.u32()?;
    let chunk_hash = ChunkHash(r.array()?);
    let mut strings = [Arc::<str>::from(""), Arc::<str>::from("")];
    for s in &mut strings {
        let n = r.u16()? as usize;
        *s = std::str::from_utf8(r.bytes(n)?).ok()?.into();
    }
    r.is_empty().then(|| {
        let [model, cache_salt] = strings;
        ObjectKey {
            model,
            kv_rank,
            object_group,
            chunk_hash,
            cache_salt,
        }
    })
}

/// Serialize the header for `payload`; the record is `header ++ payload`.
pub fn encode_header(
    key: &ObjectKey,
    codec: Codec,
    itemsize: u8,
    raw_len: u64,
    payload: &[u8],
) -> Vec<u8> {
    encode_header_flagged(key, codec, itemsize, raw_len, payload, 0)
}

/// `encode_header` with `flags` (`FLAG_SEALED`): version 2 when any is set, else version 1,
/// byte for byte what `encode_header` writes.
pub fn encode_header_flagged(
    key: &ObjectKey,
    codec: Codec,
    itemsize: u8,
    raw_len: u64,
    payload: &[u8],
    flags: u16,
) -> Vec<u8> {
    let mut key_bytes = Vec::with_capacity(48 + key.model.len() + key.cache_salt.len());
    encode_key(key, &mut key_bytes);
    assert!(
        key_bytes.len() <= MAX_KEY,
        "key of {} bytes exceeds {MAX_KEY}",
        key_bytes.len()
    );
    let mut h = Vec::with_capacity(FIXED + key_bytes.len() + 4);
    h.extend_from_slice(&MAGIC);
    h.put_u16(if flags == 0 { VERSION } else { VERSION_FLAGGED });
    h.push(codec.code());
    h.push(itemsize);
    h.put_u16(key_bytes.len() as u16);
    h.put_u16(flags);
    h.put_u64(raw_len);
    h.put_u64(payload.len() as u64);
    h.put_u32(crc32fast::hash(payload));
    h.extend_from_slice(&key_bytes);
    le::seal(&mut h);
    h
}

/// The fixed part of a header (bytes `[0, FIXED)`) as read, before any check.
struct Fixed {
    magic: [u8; 4],
    version: u16,
    codec: u8,
    itemsize: u8,
    key_len: u16,
    flags: u16,
    raw_len: u64,
    stored_len: u64,
    payload_crc: u32,
}

impl Fixed {
    fn read(b: &[u8]) -> Option<Fixed> {
        let mut r = LeReader::new(b);
        Some(Fixed {
            magic: r.array()?,
            version: r.u16()?,
            codec: r.u8()?,
            itemsize: r.u8()?,
            key_len: r.u16()?,
            flags: r.u16()?,
            raw_len: r.u64()?,
            stored_len: r.u64()?,
            payload_crc: r.u32()?,
        })
    }
}

/// Decode and verify the header at the start of `b` (the bytes from `offset` on; `b` may
/// be longer than the record). Does not check the payload.
pub fn decode_header(b: &[u8], offset: u64) -> Result<RecordHeader, RecordError> {
    let short = |need: usize| RecordError::Short {
        offset,
        have: b.len() as u64,
        need: need as u64,
    };
    let Some(Fixed {
        magic,
        version,
        codec,
        itemsize,
        key_len,
        flags,
        raw_len,
        stored_len,
        payload_crc,
    }) = Fixed::read(b)
    else {
        return Err(short(FIXED));
    };
    if magic != MAGIC {
        return Err(RecordError::Magic {
            offset,
            found: magic,
        });
    }
    let key_len = key_len as usize;
    if key_len > MAX_KEY {
        return Err(RecordError::Malformed {
            offset,
            what: "key longer than MAX_KEY",
        });
    }
    let header_len = FIXED + key_len + 4;
    let Some(header) = b.get(..header_len) else {
        return Err(short(header_len));
    };
    let Some(covered) = le::unseal(header) else {
        return Err(RecordError::HeaderCrc { offset });
    };
    if version != VERSION && version != VERSION_FLAGGED {
        return Err(RecordError::Version {
            offset,
            found: version,
        });
    }
    let malformed = |what| RecordError::Malformed { offset, what };
    // Version 1 never checked its reserved field: it stays ignored there.
    let flags = if version == VERSION { 0 } else { flags };
    if flags & !FLAGS_KNOWN != 0 {
        return Err(malformed("unknown flags"));
    }
    let sealed = flags & FLAG_SEALED != 0;
    let codec = Codec::from_code(codec).ok_or(malformed("unknown codec"))?;
    let key = decode_key_bytes(&covered[FIXED..]).ok_or(malformed("bad key"))?;
    if raw_len > MAX_PAYLOAD || stored_len > MAX_PAYLOAD {
        return Err(malformed("length beyond MAX_PAYLOAD"));
    }
    Ok(RecordHeader {
        codec,
        itemsize,
        raw_len,
        stored_len,
        payload_crc,
        key,
        sealed,
        header_len: header_len as u64,
    })
}

/// Compress `raw` and encode it as one record (header ++ payload).
pub fn encode(key: &ObjectKey, raw: &[u8], itemsize: u8, policy: CompressionPolicy) -> Vec<u8> {
    let (codec, payload) = codec::compress(raw, itemsize as usize, policy);
    let mut record = encode_header(key, codec, itemsize, raw.len() as u64, &payload);
    record.extend_from_slice(&payload);
    record
}

/// A whole record, header and payload checksums verified.
#[derive(Debug)]
pub struct Record<'a> {
    pub header: RecordHeader,
    pub payload: &'a [u8],
}

impl<'a> Record<'a> {
    /// Verify the record `b` holds exactly (`offset` only labels errors).
    pub fn parse(b: &'a [u8], offset: u64) -> Result<Record<'a>, RecordError> {
        let header = decode_header(b, offset)?;
        let payload = b.get(header.header_len as usize..).unwrap_or(&[]);
        verify_payload(&header, payload, offset)?;
        Ok(Record { header, payload })
    }

    /// Decompress into `out`, which must be exactly the raw length. A sealed record is
    /// refused: `seal::Sealer::decode_into` opens it.
    pub fn decode_into(&self, out: &mut [u8]) -> Result<(), CodecError> {
        if self.header.sealed {
            return Err(CodecError::Sealed);
        }
        codec::decompress(self.header.codec, self.payload, out)
    }
}

/// Check a payload against its header.
pub fn verify_payload(h: &RecordHeader, payload: &[u8], offset: u64) -> Result<(), RecordError> {
    if payload.len() as u64 != h.stored_len {
        return Err(RecordError::Short {
            offset,
            have: payload.len() as u64,
            need: h.stored_len,
        });
    }
    if crc32fast::hash(payload) != h.payload_crc {
        return Err(RecordError::PayloadCrc { offset });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A record key under `salt` (also `seal`'s tests').
    pub(crate) fn key(salt: &str) -> ObjectKey {
        ObjectKey {
            model: "meta/Llama".into(),
            kv_rank: 0x02010201,
            object_group: 3,
            chunk_hash: ChunkHash([9; 32]),
            cache_salt: salt.into(),
        }
    }

    fn record(salt: &str, payload: &[u8]) -> Vec<u8> {
        let mut r = encode_header(&key(salt), Codec::Raw, 2, payload.len() as u64, payload);
        r.extend_from_slice(payload);
        r
    }

    #[test]
    fn round_trip() {
        let r = record("alice", b"hello world");
        let h = decode_header(&r, 0).unwrap();
        assert_eq!(
            (h.key.clone(), h.codec, h.itemsize, h.raw_len, h.stored_len),
            (key("alice"), Codec::Raw, 2, 11, 11)
        );
        assert_eq!(h.record_len() as usize, r.len());
        verify_payload(&h, &r[h.header_len as usize..], 0).unwrap();
    }

    #[test]
    fn encode_then_parse_gives_the_raw_bytes_back() {
        let raw: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let r = encode(&key("s"), &raw, 2, CompressionPolicy::default());
        let rec = Record::parse(&r, 0).unwrap();
        assert_eq!((rec.header.key.clone(), rec.header.itemsize), (key("s"), 2));
        let mut out = vec![0; raw.len()];
        rec.decode_into(&mut out).unwrap();
        assert_eq!(out, raw);
        assert!(Record::parse(&r[..r.len() - 1], 0).is_err());
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let r = record("s", &[1, 2, 3, 4, 5, 6, 7, 8]);
        for i in 0..r.len() * 8 {
            let mut bad = r.clone();
            bad[i / 8] ^= 1 << (i % 8);
            let ok = decode_header(&bad, 0).and_then(|h| {
                verify_payload(
                    &h,
                    bad.get(h.header_len as usize..h.record_len() as usize)
                        .unwrap_or(&[]),
                    0,
                )
            });
            assert!(ok.is_err(), "flip of bit {i} went unnoticed");
        }
    }

    #[test]
    fn truncation_and_wrong_magic() {
        let r = record("", &[7; 100]);
        for n in 0..r.len() {
            let ok = decode_header(&r[..n], 0).and_then(|h| {
                verify_payload(&h, r[..n].get(h.header_len as usize..).unwrap_or(&[]), 0)
            });
            assert!(ok.is_err(), "prefix of {n} bytes accepted");
        }
        let mut bad = r.clone();
        bad[..4].copy_from_slice(b"XXXX");
        assert!(matches!(
            decode_header(&bad, 5),
            Err(RecordError::Magic { offset: 5, .. })
        ));
    }

    /// A header whose checksum matches but whose lengths or key size are absurd is refused
    /// (found by the disk_record fuzz target: `stored_len = u64::MAX` overflowed `record_len`).
    #[test]
    fn absurd_lengths_with_a_valid_checksum_are_malformed() {
        let reseal = |mut h: Vec<u8>| {
            let n = h.len() - 4;
            let crc = crc32fast::hash(&h[..n]);
            h[n..].copy_from_slice(&crc.to_le_bytes());
            h
        };
        let h = encode_header(&key("s"), Codec::Raw, 2, 3, b"abc");
        for (at, value) in [(20, u64::MAX), (20, MAX_PAYLOAD + 1), (12, u64::MAX)] {
            let mut bad = h.clone();
            bad[at..at + 8].copy_from_slice(&value.to_le_bytes());
            let bad = reseal(bad);
            assert!(
                matches!(decode_header(&bad, 0), Err(RecordError::Malformed { .. })),
                "field at {at} = {value} accepted"
            );
        }
        let mut long_key = h.clone();
        long_key[8..10].copy_from_slice(&((MAX_KEY + 1) as u16).to_le_bytes());
        long_key.resize(FIXED + MAX_KEY + 1 + 4, 0);
        let long_key = reseal(long_key);
        assert!(matches!(
            decode_header(&long_key, 0),
            Err(RecordError::Malformed { .. })
        ));
    }

    /// Version 2 carries flags: `FLAG_SEALED` is read, an unknown bit refused; version 1's
    /// reserved field stays ignored (a record the v1 fixtures' writer could have set).
    #[test]
    fn flags_of_version_2_and_the_reserved_field_of_version_1() {
        let reseal = |mut h: Vec<u8>| {
            let n = h.len() - 4;
            let crc = crc32fast::hash(&h[..n]);
            h[n..].copy_from_slice(&crc.to_le_bytes());
            h
        };
        let sealed = encode_header_flagged(&key("s"), Codec::Raw, 2, 3, b"abc", FLAG_SEALED);
        assert_eq!(&sealed[4..6], &VERSION_FLAGGED.to_le_bytes());
        assert!(decode_header(&sealed, 0).unwrap().sealed);
        let mut unknown = sealed.clone();
        unknown[10] = 0b10;
        assert!(matches!(
            decode_header(&reseal(unknown), 0),
            Err(RecordError::Malformed {
                what: "unknown flags",
                ..
            })
        ));
        let mut v1 = encode_header(&key("s"), Codec::Raw, 2, 3, b"abc");
        assert_eq!(
            v1,
            encode_header_flagged(&key("s"), Codec::Raw, 2, 3, b"abc", 0)
        );
        v1[10] = 0xff;
        assert!(!decode_header(&reseal(v1), 0).unwrap().sealed);
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_header(&bytes, 0);
        }

        #[test]
        fn keys_round_trip(model in "[a-zA-Z0-9/_.-]{1,60}", salt in "[a-z0-9]{0,40}", rank in any::<u32>(), hash in any::<[u8; 32]>()) {
            let k = ObjectKey { model: model.as_str().into(), kv_rank: rank, object_group: 0, chunk_hash: ChunkHash(hash), cache_salt: salt.as_str().into() };
            let h = encode_header(&k, Codec::Zstd, 2, 10, b"xyz");
            prop_assert_eq!(decode_header(&h, 0).unwrap().key, k);
        }
    }
}
