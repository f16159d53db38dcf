//! The registration journal: every usable `register_kv_cache` and engine-driven context kept
//! on disk beside L2 (`<l2 dir>/registrations/<instance id, 16 hex digits>.reg`, `.edc`), so a
//! restarted cwm serves the engines it served without waiting for them to notice the restart
//! (`recovery`).
//!
//! One file per instance, written whole under a temporary name, fsynced and renamed over the
//! old one (then the directory fsynced), removed on unregister and when the reaper forgets the
//! instance. A file holds frames behind a checksummed header (docs/FORMATS.md "Registration
//! journal entry"): a `register_kv_cache`'s seven argument frames as the MP protocol carries
//! them; an engine-driven context's payload frame as received, with the name, size and inode of
//! the pool it was answered (`Kind`). Nothing in it is trusted: a restore parses the frames with
//! the same parser and goes through the same checks as a live registration. The directory is
//! covered by L2's exclusive lock, so one cwm at a time writes it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

const MAGIC: &[u8; 4] = b"CWMJ";
const VERSION: u16 = 1;
/// Header: magic, version, frame count, payload length, CRC-32.
const HEADER: usize = 16;
/// Larger entries are refused on write and on read (65 536 descriptors of ~200 bytes fit).
pub const MAX_ENTRY_BYTES: usize = 64 << 20;

/// What an entry journals; each kind has its own file extension and frame count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `register_kv_cache`: its seven argument frames.
    KvCache,
    /// `register_kv_cache_engine_driven_context`: the payload frame, the pool's name, and the
    /// pool's size and inode (two little-endian u64).
    EngineDriven,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::KvCache, Kind::EngineDriven];

    pub const fn frames(self) -> usize {
        match self {
            Kind::KvCache => 7,
            Kind::EngineDriven => 3,
        }
    }

    const fn ext(self) -> &'static str {
        match self {
            Kind::KvCache => "reg",
            Kind::EngineDriven => "edc",
        }
    }

    fn of(path: &Path) -> Option<Kind> {
        let ext = path.extension()?;
        Kind::ALL.into_iter().find(|k| ext == k.ext())
    }
}

/// The journal directory. Writes are serialized (registrations are rare).
pub struct Journal {
    dir: PathBuf,
    writes: Mutex<()>,
}

/// One journaled registration: its kind and instance id (from the file name) and its frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub instance_id: u64,
    pub frames: Vec<Vec<u8>>,
}

/// A file of the journal that is not a valid entry: ignored, removed, and reported.
#[derive(Debug)]
pub struct Rejected {
    pub path: PathBuf,
    pub reason: String,
}

impl Journal {
    /// Open (creating, mode 0700) the journal directory; leftovers of interrupted writes go.
    pub fn open(dir: &Path) -> io::Result<Journal> {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        for e in fs::read_dir(dir)? {
            let path = e?.path();
            if path.extension().is_some_and(|x| x == "tmp") {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(Journal {
            dir: dir.to_path_buf(),
            writes: Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, kind: Kind, instance_id: u64) -> PathBuf {
        self.dir.join(format!("{instance_id:016x}.{}", kind.ext()))
    }

    /// Write (or replace) the entry of `instance_id`; durable when this returns.
    pub fn record(&self, kind: Kind, instance_id: u64, frames: &[Vec<u8>]) -> io::Result<()> {
        let bytes = encode(kind, frames)?;
        let _w = self.writes.lock();
        let path = self.path(kind, instance_id);
        let tmp = path.with_extension("tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)
    }

    /// Remove the entry of `instance_id`, of either kind; `false` if there was none.
    pub fn remove(&self, instance_id: u64) -> io::Result<bool> {
        let _w = self.writes.lock();
        let mut removed = false;
        for kind in Kind::ALL {
            match fs::remove_file(self.path(kind, instance_id)) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    /// Every valid entry (sorted by instance id), and the files that are not one. Invalid
    /// files are removed: they can never be restored, and would be reported at every start.
    pub fn entries(&self) -> io::Result<(Vec<Entry>, Vec<Rejected>)> {
        let mut entries = Vec::new();
        let mut rejected = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let path = e?.path();
            let Some(kind) = Kind::of(&path) else {
                continue;
            };
            match read_entry(kind, &path) {
                Ok(entry) => entries.push(entry),
                Err(reason) => {
                    let _ = fs::remove_file(&path);
                    rejected.push(Rejected { path, reason });
                }
            }
        }
        entries.sort_by_key(|e| e.instance_id);
        Ok((entries, rejected))
    }
}

impl Journal {
    /// The valid entries in `dir`, read without changing anything: for a look before L2's lock
    /// is held (another cwm may own the directory). Unreadable files are skipped.
    pub fn peek(dir: &Path) -> Vec<Entry> {
        let Ok(read) = fs::read_dir(dir) else {
            return Vec::new();
        };
        read.flatten()
            .filter_map(|e| {
                let path = e.path();
                read_entry(Kind::of(&path)?, &path).ok()
            })
            .collect()
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The file's bytes for `frames` of a `kind` entry (see docs/FORMATS.md).
pub fn encode(kind: Kind, frames: &[Vec<u8>]) -> io::Result<Vec<u8>> {
    let payload_len: usize = frames.iter().map(|f| 4 + f.len()).sum();
    let want = kind.frames();
    if frames.len() != want || HEADER + payload_len > MAX_ENTRY_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a {kind:?} journal entry is {want} frames of at most {MAX_ENTRY_BYTES} bytes in \
                 all (got {} frames, {payload_len} bytes)",
                frames.len()
            ),
        ));
    }
    let mut b = Vec::with_capacity(HEADER + payload_len);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(want as u16).to_le_bytes());
    b.extend_from_slice(&(payload_len as u32).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    for f in frames {
        b.extend_from_slice(&(f.len() as u32).to_le_bytes());
        b.extend_from_slice(f);
    }
    let crc = checksum(&b);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    Ok(b)
}

/// CRC-32 of the header's first 12 bytes and the payload.
fn checksum(b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..12]);
    h.update(&b[HEADER..]);
    h.finalize()
}

/// The frames of a `kind` entry's bytes, or why they are not one.
pub fn decode(kind: Kind, b: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    if b.len() < HEADER {
        return Err(format!("{} bytes, shorter than the header", b.len()));
    }
    if &b[..4] != MAGIC {
        return Err("bad magic".into());
    }
    let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let version = u16_at(4);
    if version != VERSION {
        return Err(format!("version {version}, this cwm reads {VERSION}"));
    }
    let count = u16_at(6) as usize;
    let payload_len = u32_at(8) as usize;
    if count != kind.frames() || b.len() != HEADER + payload_len {
        return Err(format!(
            "{count} frames, payload {payload_len} bytes in a file of {}",
            b.len()
        ));
    }
    if checksum(b) != u32_at(12) {
        return Err("checksum mismatch".into());
    }
    let mut frames = Vec::with_capacity(count);
    let mut at = HEADER;
    for i in 0..count {
        let len = b
            .get(at..at + 4)
            .map(|_| u32_at(at) as usize)
            .ok_or_else(|| format!("frame {i} runs past the end"))?;
        let frame = b
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| format!("frame {i} runs past the end"))?;
        frames.push(frame.to_vec());
        at += 4 + len;
    }
    if at != b.len() {
        return Err(format!("{} bytes after the last frame", b.len() - at));
    }
    Ok(frames)
}

fn read_entry(kind: Kind, path: &Path) -> Result<Entry, String> {
    let instance_id = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| s.len() == 16)
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or("the file name is not an instance id")?;
    let len = fs::symlink_metadata(path).map_err(|e| e.to_string())?.len();
    if len > MAX_ENTRY_BYTES as u64 {
        return Err(format!("{len} bytes, above the {MAX_ENTRY_BYTES} limit"));
    }
    let bytes = read_no_follow(path).map_err(|e| e.to_string())?;
    let frames = decode(kind, &bytes)?;
    Ok(Entry {
        kind,
        instance_id,
        frames,
    })
}

fn read_no_follow(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let mut b = Vec::new();
    io::Read::read_to_end(&mut f, &mut b)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KV: Kind = Kind::KvCache;

    fn frames() -> Vec<Vec<u8>> {
        (0..KV.frames() as u8)
            .map(|i| vec![i; i as usize * 3])
            .collect()
    }

    #[test]
    fn entries_round_trip_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.record(KV, 7, &frames()).unwrap();
        j.record(KV, u64::MAX, &frames()).unwrap();
        let (entries, rejected) = j.entries().unwrap();
        assert!(rejected.is_empty());
        assert_eq!(
            entries.iter().map(|e| e.instance_id).collect::<Vec<_>>(),
            [7, u64::MAX]
        );
        assert_eq!(entries[0].frames, frames());
        assert!(j.remove(7).unwrap());
        assert!(!j.remove(7).unwrap());
        assert_eq!(j.entries().unwrap().0.len(), 1);
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let good = encode(KV, &frames()).unwrap();
        assert_eq!(decode(KV, &good).unwrap(), frames());
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(decode(KV, &bad).is_err(), "byte {i} flipped was accepted");
        }
        for cut in 0..good.len() {
            assert!(
                decode(KV, &good[..cut]).is_err(),
                "cut at {cut} was accepted"
            );
        }
    }

    #[test]
    fn bad_files_are_rejected_removed_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.record(KV, 1, &frames()).unwrap();
        let mut bytes = encode(KV, &frames()).unwrap();
        bytes[20] ^= 1;
        fs::write(dir.path().join("0000000000000002.reg"), &bytes).unwrap();
        fs::write(
            dir.path().join("not-an-id.reg"),
            encode(KV, &frames()).unwrap(),
        )
        .unwrap();
        fs::write(dir.path().join("0000000000000003.tmp"), b"half").unwrap();
        fs::write(dir.path().join("README"), b"kept").unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert!(!dir.path().join("0000000000000003.tmp").exists());
        let (entries, rejected) = j.entries().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(!dir.path().join("0000000000000002.reg").exists());
        assert!(dir.path().join("README").exists());
    }

    #[test]
    fn kinds_keep_their_own_files_and_frame_counts() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let ed = vec![b"payload".to_vec(), b"pool".to_vec(), vec![1; 16]];
        j.record(Kind::EngineDriven, 9, &ed).unwrap();
        j.record(KV, 8, &frames()).unwrap();
        assert!(j.record(Kind::EngineDriven, 9, &frames()).is_err());
        assert!(dir.path().join("0000000000000009.edc").exists());
        let (entries, rejected) = j.entries().unwrap();
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(
            entries
                .iter()
                .map(|e| (e.kind, e.instance_id))
                .collect::<Vec<_>>(),
            [(KV, 8), (Kind::EngineDriven, 9)]
        );
        assert_eq!(entries[1].frames, ed);
        // An entry of one kind under the other's extension is refused.
        fs::copy(
            dir.path().join("0000000000000009.edc"),
            dir.path().join("0000000000000007.reg"),
        )
        .unwrap();
        assert_eq!(j.entries().unwrap().1.len(), 1);
        assert!(j.remove(9).unwrap());
        assert_eq!(j.entries().unwrap().0.len(), 1);
    }

    #[test]
    fn wrong_frame_counts_are_refused_on_write() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.record(KV, 1, &frames()[..6]).is_err());
        assert!(j.entries().unwrap().0.is_empty());
    }
}
