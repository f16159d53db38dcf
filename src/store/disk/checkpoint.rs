//! The index checkpoint `index.ckpt`, format version 1 (docs/FORMATS.md): what the index held
//! and how far each segment was covered, so an open scans only what was appended after it.

use std::collections::HashMap;
use std::time::Duration;

use connector_protocol::ObjectKey;

use super::storage::{SegmentFile, Storage};
use super::{DiskError, DiskStore, Location};
use crate::store::le::{self, LeReader, PutLe};
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
    b.put_u16(VERSION);
    b.put_u32(scanned.len() as u32);
    for (&id, &len) in scanned {
        b.put_u32(id);
        b.put_u64(len);
    }
    b.put_u64(index.len() as u64);
    for (key, loc) in index {
        b.put_u32(loc.segment);
        b.put_u64(loc.offset);
        b.put_u64(loc.record_len);
        b.put_u64(loc.raw_len);
        let k = record::encode_key_bytes(key);
        b.put_u16(k.len() as u16);
        b.extend_from_slice(&k);
    }
    le::seal(&mut b);
    b
}

pub fn decode(b: &[u8]) -> Result<Checkpoint, DiskError> {
    let bad = DiskError::Checkpoint;
    if b.len() < 4 + 2 + 4 + 8 + 4 || &b[..4] != MAGIC {
        return Err(bad("bad magic or too short"));
    }
    let body = le::unseal(b).ok_or(bad("checksum mismatch"))?;
    let mut r = LeReader::new(&body[4..]);
    if r.u16() != Some(VERSION) {
        return Err(bad("unknown version"));
    }
    let truncated = || bad("truncated");
    let mut c = Checkpoint::default();
    for _ in 0..r.u32().ok_or_else(truncated)? {
        let id = r.u32().ok_or_else(truncated)?;
        c.scanned.insert(id, r.u64().ok_or_else(truncated)?);
    }
    let n = r.u64().ok_or_else(truncated)?;
    for _ in 0..n {
        let (Some(segment), Some(offset), Some(record_len), Some(raw_len), Some(klen)) =
            (r.u32(), r.u64(), r.u64(), r.u64(), r.u16())
        else {
            return Err(truncated());
        };
        let key_bytes = r.bytes(klen as usize).ok_or_else(truncated)?;
        let key = record::decode_key_bytes(key_bytes).ok_or(bad("bad key"))?;
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

/// How often `maintain` persists the index.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

impl<S: Storage> DiskStore<S> {
    /// Sync, then persist the index so the next open needs to scan only what comes after.
    pub fn checkpoint(&self) -> Result<(), DiskError> {
        self.sync_active()?;
        let bytes = {
            // No append may sit between its bytes and its index entry while segment lengths
            // and the index are captured together.
            let _writer = self.writer.lock();
            let mut st = self.state.lock();
            if !st.dirty {
                return Ok(());
            }
            st.dirty = false;
            let scanned: HashMap<u32, u64> = st
                .segments
                .iter()
                .map(|(id, s)| (*id, s.file.len()))
                .collect();
            encode(&st.index, &scanned)
        };
        self.storage.write_checkpoint(&bytes)?;
        Ok(())
    }
}
