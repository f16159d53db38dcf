//! The session index journal: every change to the session index appended to one file beside
//! L2 (`<l2 dir>/sessions.journal`), so a restarted cwm — after a clean stop or a kill -9 —
//! still knows which token chains each session stored and can freeze them (issue 24).
//!
//! Append-only and checksummed: a file header, then entries, each its length, its fields and a
//! CRC-32 (docs/FORMATS.md "Session index journal"). An entry is a delta: the chain it extends
//! (its position in the session, as the index holds it at that moment) and only the new tokens,
//! so a long conversation costs its tokens once, not once per turn. Replaying the entries in
//! order through the index's own update rebuilds the same index, because that update depends
//! on nothing but its inputs and the index.
//!
//! Compacted: at start (after replay) and whenever the file has grown past twice its last
//! compacted size (plus `COMPACT_SLACK`), the index is written whole to a new file — oldest
//! session first, each session's chains oldest first, every chain in full — which is fsynced
//! and renamed over the old one. The file therefore stays within a small multiple of what the
//! bounded index holds. Replay stops at the first entry that is torn or fails its checksum (a
//! crash mid-append); everything before it is kept, and compaction drops the rest.
//!
//! Durability: each entry is one `write` to the file, so it survives a crash of cwm (kill -9);
//! after a power loss the newest entries may be missing, as may L2's newest records.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::le::{self, LeReader, PutLe};

const MAGIC: &[u8; 4] = b"CWMS";
const VERSION: u16 = 1;
const HEADER: usize = 8;
/// An entry larger than this is refused on write and ends a replay (16 M tokens).
const MAX_ENTRY_BYTES: usize = 64 << 20;
/// Growth allowed beyond twice the compacted size before compacting again.
const COMPACT_SLACK: u64 = 1 << 20;
/// `base_index` of an entry that starts a new chain.
const NO_BASE: u8 = u8::MAX;

/// One change: `tokens = chain[base_index].tokens[..base_len] ++ suffix` was recorded for
/// (model, cache_salt) at `updated`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub model: String,
    pub cache_salt: String,
    pub world_size: u32,
    pub updated: SystemTime,
    /// The chain of the session this extends (its position, newest first) and how many of
    /// its tokens; None for a new chain.
    pub base: Option<(u8, u32)>,
    pub suffix: Vec<u32>,
}

/// The open journal: appends go to `file`.
pub struct Journal {
    path: PathBuf,
    file: File,
    bytes: u64,
    compacted_bytes: u64,
}

/// What a replay read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replay {
    pub entries: usize,
    /// Bytes after the last good entry (a torn or corrupt tail), dropped.
    pub dropped_bytes: u64,
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `t` at the journal's precision (milliseconds since the epoch).
pub fn to_millis(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis(t))
}

pub fn encode(e: &Entry) -> io::Result<Vec<u8>> {
    let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "journal entry too large");
    let mut b = Vec::with_capacity(40 + e.model.len() + e.cache_salt.len() + 4 * e.suffix.len());
    b.put_u32(0); // length, filled below
    for s in [&e.model, &e.cache_salt] {
        b.put_u16(u16::try_from(s.len()).map_err(|_| too_big())?);
        b.extend_from_slice(s.as_bytes());
    }
    b.put_u32(e.world_size);
    b.put_u64(millis(e.updated));
    let (index, len) = e.base.unwrap_or((NO_BASE, 0));
    b.push(index);
    b.put_u32(len);
    b.put_u32(u32::try_from(e.suffix.len()).map_err(|_| too_big())?);
    for t in &e.suffix {
        b.put_u32(*t);
    }
    if b.len() + 4 > MAX_ENTRY_BYTES {
        return Err(too_big());
    }
    let len = b.len() as u32; // the fields after the length, and the CRC
    b[..4].copy_from_slice(&len.to_le_bytes());
    le::seal(&mut b);
    Ok(b)
}

/// Entries of `b` (a whole journal file) up to the first that is not intact.
pub fn decode(b: &[u8]) -> Result<(Vec<Entry>, Replay), String> {
    let mut r = LeReader::new(b);
    if r.array::<4>().as_ref() != Some(MAGIC) {
        return Err("not a session journal (bad magic)".into());
    }
    match r.u16() {
        Some(VERSION) => {}
        v => {
            return Err(format!(
                "session journal version {v:?}; this cwm reads {VERSION}"
            ))
        }
    }
    r.u16();
    let mut entries = Vec::new();
    let mut at = HEADER;
    while at < b.len() {
        let Some(e) = entry(&b[at..]) else { break };
        at += e.0;
        entries.push(e.1);
    }
    let replay = Replay {
        entries: entries.len(),
        dropped_bytes: (b.len() - at) as u64,
    };
    Ok((entries, replay))
}

/// One entry at the front of `b` and its size, if intact.
fn entry(b: &[u8]) -> Option<(usize, Entry)> {
    let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    if len > MAX_ENTRY_BYTES {
        return None;
    }
    let whole = b.get(..4 + len)?;
    let fields = le::unseal(whole)?;
    let mut r = LeReader::new(&fields[4..]);
    let mut text = || {
        let n = r.u16()? as usize;
        String::from_utf8(r.bytes(n)?.to_vec()).ok()
    };
    let (model, cache_salt) = (text()?, text()?);
    let world_size = r.u32()?;
    let updated = UNIX_EPOCH + Duration::from_millis(r.u64()?);
    let (index, base_len) = (r.u8()?, r.u32()?);
    let n = r.u32()? as usize;
    let suffix = r
        .bytes(n.checked_mul(4)?)?
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    r.is_empty().then_some(())?;
    let e = Entry {
        model,
        cache_salt,
        world_size,
        updated,
        base: (index != NO_BASE).then_some((index, base_len)),
        suffix,
    };
    Some((whole.len(), e))
}

fn header() -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.put_u16(VERSION);
    b.put_u16(0);
    b
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Journal {
    /// The entries in `path` (none if there is no file yet), to replay before `create`.
    pub fn read(path: &Path) -> io::Result<(Vec<Entry>, Replay)> {
        match fs::read(path) {
            Ok(b) => decode(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Default::default()),
            Err(e) => Err(e),
        }
    }

    /// Replace the file at `path` with `entries` (the whole index), durably, and open it for
    /// appends.
    pub fn create(path: &Path, entries: &[Entry]) -> io::Result<Journal> {
        let tmp = path.with_extension("journal.tmp");
        let mut b = header();
        for e in entries {
            b.extend_from_slice(&encode(e)?);
        }
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&b)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            bytes: b.len() as u64,
            compacted_bytes: b.len() as u64,
        })
    }

    /// Append one entry. True when the file has grown enough to be compacted.
    pub fn append(&mut self, e: &Entry) -> io::Result<bool> {
        let b = encode(e)?;
        self.file.write_all(&b)?;
        self.bytes += b.len() as u64;
        Ok(self.bytes > 2 * self.compacted_bytes + COMPACT_SLACK)
    }

    /// Rewrite the journal as `entries` (the whole index).
    pub fn compact(&mut self, entries: &[Entry]) -> io::Result<()> {
        *self = Journal::create(&self.path, entries)?;
        Ok(())
    }

    /// Make what was appended durable (a clean stop).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(base: Option<(u8, u32)>, suffix: Vec<u32>) -> Entry {
        Entry {
            model: "m".into(),
            cache_salt: "alice".into(),
            world_size: 2,
            updated: UNIX_EPOCH + Duration::from_millis(1_765_000_000_123),
            base,
            suffix,
        }
    }

    #[test]
    fn entries_round_trip_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.journal");
        let a = entry(None, (0..300).collect());
        let b = entry(Some((0, 256)), vec![7, 8, 9]);
        let mut j = Journal::create(&path, std::slice::from_ref(&a)).unwrap();
        j.append(&b).unwrap();
        let (got, replay) = Journal::read(&path).unwrap();
        assert_eq!(got, vec![a.clone(), b.clone()]);
        assert_eq!(replay.dropped_bytes, 0);

        // A crash in the middle of an append: the good entries stay, the tail is dropped.
        let whole = fs::read(&path).unwrap();
        fs::write(&path, &whole[..whole.len() - 5]).unwrap();
        let (got, replay) = Journal::read(&path).unwrap();
        assert_eq!(got, vec![a]);
        assert!(replay.dropped_bytes > 0);
    }

    #[test]
    fn every_flipped_byte_ends_the_replay_there() {
        let b = [header(), encode(&entry(None, vec![1, 2, 3])).unwrap()].concat();
        for i in HEADER..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x40;
            let (got, replay) = decode(&bad).unwrap();
            assert!(got.is_empty(), "byte {i}: {got:?}");
            assert_eq!(replay.dropped_bytes as usize, b.len() - HEADER);
        }
        assert!(decode(b"CWMX\x01\0\0\0").is_err());
    }

    #[test]
    fn growth_asks_for_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(&dir.path().join("j"), &[]).unwrap();
        let big = entry(None, vec![0; 100_000]);
        let asked: Vec<bool> = (0..7).map(|_| j.append(&big).unwrap()).collect();
        assert_eq!(asked, [false, false, true, true, true, true, true]);
        j.compact(&[big]).unwrap();
        assert!(!j.append(&entry(None, vec![1])).unwrap());
    }
}
