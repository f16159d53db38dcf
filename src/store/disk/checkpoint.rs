//! The index checkpoint `index.ckpt`, format version 1 (docs/FORMATS.md): what the index held
//! and how far each segment was covered, so an open scans only what was appended after it.

use std::collections::HashMap;

use connector_protocol::ObjectKey;

use super::{DiskError, Location};
use crate::store::record;

pub const MAGIC: &[u8; 4] = b"CWMI";
pub const VERSION: u16 = 1;

/// A decoded checkpoint.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Bytes of each segment the entries cover (a scan resumes there).
    pub scanned: HashMap<u32, u64>,
    pub entries: Vec<(ObjectKey, Location)>,
}

/// Checkpoint format v1: magic "CWMI", version u16, segment count u32, (id u32, scanned u64)*,
/// entry count u64, (segment u32, offset u64, record_len u64, raw_len u64, key len u16, key)*,
/// crc32 of everything before it. Keys use the record key encoding.
pub fn encode(index: &HashMap<ObjectKey, Location>, scanned: &HashMap<u32, u64>) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + index.len() * 120);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(scanned.len() as u32).to_le_bytes());
    for (id, len) in scanned {
        b.extend_from_slice(&id.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
    }
    b.extend_from_slice(&(index.len() as u64).to_le_bytes());
    for (key, loc) in index {
        b.extend_from_slice(&loc.segment.to_le_bytes());
        b.extend_from_slice(&loc.offset.to_le_bytes());
        b.extend_from_slice(&loc.record_len.to_le_bytes());
        b.extend_from_slice(&loc.raw_len.to_le_bytes());
        let k = record::encode_key_bytes(key);
        b.extend_from_slice(&(k.len() as u16).to_le_bytes());
        b.extend_from_slice(&k);
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode(b: &[u8]) -> Result<Checkpoint, DiskError> {
    let bad = DiskError::Checkpoint;
    if b.len() < 4 + 2 + 4 + 8 + 4 || &b[..4] != MAGIC {
        return Err(bad("bad magic or too short"));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
        return Err(bad("checksum mismatch"));
    }
    if u16::from_le_bytes(body[4..6].try_into().unwrap()) != VERSION {
        return Err(bad("unknown version"));
    }
    let mut at = 6;
    let mut take = |n: usize| -> Result<&[u8], DiskError> {
        let s = body.get(at..at + n).ok_or(bad("truncated"))?;
        at += n;
        Ok(s)
    };
    let u32_of = |s: &[u8]| u32::from_le_bytes(s.try_into().unwrap());
    let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap());
    let mut c = Checkpoint::default();
    for _ in 0..u32_of(take(4)?) {
        let id = u32_of(take(4)?);
        c.scanned.insert(id, u64_of(take(8)?));
    }
    let n = u64_of(take(8)?);
    for _ in 0..n {
        let segment = u32_of(take(4)?);
        let offset = u64_of(take(8)?);
        let record_len = u64_of(take(8)?);
        let raw_len = u64_of(take(8)?);
        let klen = u16::from_le_bytes(take(2)?.try_into().unwrap()) as usize;
        let key = record::decode_key_bytes(take(klen)?).ok_or(bad("bad key"))?;
        c.entries.push((
            key,
            Location {
                segment,
                offset,
                record_len,
                raw_len,
            },
        ));
    }
    Ok(c)
}
