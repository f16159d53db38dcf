//! The registration journal: every usable `register_kv_cache` kept on disk beside L2
//! (`<l2 dir>/registrations/<instance id, 16 hex digits>.reg`), so a restarted cwm reopens the
//! engines it served without waiting for them to notice the restart (`recovery`).
//!
//! One file per instance, written whole under a temporary name, fsynced and renamed over the
//! old one (then the directory fsynced), removed on unregister and when the reaper forgets the
//! instance. A file holds the request's seven argument frames, as the MP protocol carries them,
//! behind a checksummed header (docs/FORMATS.md "Registration journal entry"). Nothing in it is
//! trusted: a restore parses the frames with the same parser and opens the memory through the
//! same checks as a live `register_kv_cache`. The directory is covered by L2's exclusive lock,
//! so one cwm at a time writes it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

const MAGIC: &[u8; 4] = b"CWMJ";
const VERSION: u16 = 1;
/// Header: magic, version, frame count, payload length, CRC-32.
const HEADER: usize = 16;
/// `register_kv_cache` has seven arguments.
pub const FRAMES: usize = 7;
/// Larger entries are refused on write and on read (65 536 descriptors of ~200 bytes fit).
pub const MAX_ENTRY_BYTES: usize = 64 << 20;
const EXT: &str = "reg";

/// The journal directory. Writes are serialized (registrations are rare).
pub struct Journal {
    dir: PathBuf,
    writes: Mutex<()>,
}

/// One journaled registration: its instance id (from the file name) and argument frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
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

    fn path(&self, instance_id: u64) -> PathBuf {
        self.dir.join(format!("{instance_id:016x}.{EXT}"))
    }

    /// Write (or replace) the entry of `instance_id`; durable when this returns.
    pub fn record(&self, instance_id: u64, frames: &[Vec<u8>]) -> io::Result<()> {
        let bytes = encode(frames)?;
        let _w = self.writes.lock();
        let path = self.path(instance_id);
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

    /// Remove the entry of `instance_id`; `false` if there was none.
    pub fn remove(&self, instance_id: u64) -> io::Result<bool> {
        let _w = self.writes.lock();
        match fs::remove_file(self.path(instance_id)) {
            Ok(()) => sync_dir(&self.dir).map(|()| true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every valid entry (sorted by instance id), and the files that are not one. Invalid
    /// files are removed: they can never be restored, and would be reported at every start.
    pub fn entries(&self) -> io::Result<(Vec<Entry>, Vec<Rejected>)> {
        let mut entries = Vec::new();
        let mut rejected = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let path = e?.path();
            if path.extension().is_none_or(|x| x != EXT) {
                continue;
            }
            match read_entry(&path) {
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

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The file's bytes for `frames` (see docs/FORMATS.md).
pub fn encode(frames: &[Vec<u8>]) -> io::Result<Vec<u8>> {
    let payload_len: usize = frames.iter().map(|f| 4 + f.len()).sum();
    if frames.len() != FRAMES || HEADER + payload_len > MAX_ENTRY_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a journal entry is {FRAMES} frames of at most {MAX_ENTRY_BYTES} bytes in all \
                 (got {} frames, {payload_len} bytes)",
                frames.len()
            ),
        ));
    }
    let mut b = Vec::with_capacity(HEADER + payload_len);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(FRAMES as u16).to_le_bytes());
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

/// The frames of an entry's bytes, or why they are not one.
pub fn decode(b: &[u8]) -> Result<Vec<Vec<u8>>, String> {
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
    if count != FRAMES || b.len() != HEADER + payload_len {
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

fn read_entry(path: &Path) -> Result<Entry, String> {
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
    let frames = decode(&bytes)?;
    Ok(Entry {
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

    fn frames() -> Vec<Vec<u8>> {
        (0..FRAMES as u8).map(|i| vec![i; i as usize * 3]).collect()
    }

    #[test]
    fn entries_round_trip_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.record(7, &frames()).unwrap();
        j.record(u64::MAX, &frames()).unwrap();
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
        let good = encode(&frames()).unwrap();
        assert_eq!(decode(&good).unwrap(), frames());
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "byte {i} flipped was accepted");
        }
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut} was accepted");
        }
    }

    #[test]
    fn bad_files_are_rejected_removed_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.record(1, &frames()).unwrap();
        let mut bytes = encode(&frames()).unwrap();
        bytes[20] ^= 1;
        fs::write(dir.path().join("0000000000000002.reg"), &bytes).unwrap();
        fs::write(dir.path().join("not-an-id.reg"), encode(&frames()).unwrap()).unwrap();
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
    fn wrong_frame_counts_are_refused_on_write() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.record(1, &frames()[..6]).is_err());
        assert!(j.entries().unwrap().0.is_empty());
    }
}
