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
//! Written off the store path: entries are encoded in order where the index changes (a sealed
//! entry is bound to its offset) and written by the journal's own background thread, so a
//! store never waits for the disk. It would: an append that grows the file waits for the file
//! system's journal commit, and that commit first flushes L2's freshly written data (ext4's
//! ordered mode), 24–35 ms measured on a warm request's path (BENCHMARKS.md §12.5).
//!
//! Durability: each entry is one `write` to the file, made moments after the store that caused
//! it, so it survives a crash of cwm (kill -9) unless the crash came within those moments, when
//! the write-behind (which waits for a quiet engine) has not written the entry's chunks to L2
//! either; a clean stop writes and fsyncs everything queued. After a power loss the newest
//! entries may be missing, as may L2's newest records.
//!
//! Sealed (version 2, with `--encryption-key-file`): each entry's tokens are sealed with the
//! entry's cache_salt key for this kind (`store::seal::BlobKind::SessionJournal`), bound to
//! the entry's offset in the file and its clear fields (model, salt, world size, time, base
//! chain and length, token count), so an entry cannot be moved, reordered or re-pointed. The
//! file's version follows the server: it is rewritten at every start. An entry that does not
//! open (no key, another key) is skipped, and so is every later entry of its session (they
//! may extend the chain it held), counted in `Replay::unopened`; never guessed. A journal with
//! such entries is not compacted away: it is set aside whole (`set_aside`, as
//! `sessions.journal.unopened-<ms>`) and every start replays the journals set aside before its
//! own, removing each one once a start opened all of it, so a start under the wrong key (or
//! none) loses no session for the next start under the right one.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::le::{self, LeReader, PutLe};
use crate::store::seal::{BlobKind, Sealer};

const MAGIC: &[u8; 4] = b"CWMS";
/// Entries with their tokens in the clear.
const VERSION: u16 = 1;
/// Entries with their tokens sealed.
const SEALED_VERSION: u16 = 2;
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

/// The open journal: entries are encoded here, in order, and written by its `Writer`.
pub struct Journal {
    sealer: Sealer,
    writer: Writer,
    bytes: u64,
    compacted_bytes: u64,
}

/// What the journal's thread does, in the order it was asked.
enum Work {
    /// Append an encoded entry.
    Append(Vec<u8>),
    /// Replace the file with these bytes (a compaction), durably.
    Replace(Vec<u8>),
    /// Fsync what was written, and answer.
    Sync(mpsc::Sender<io::Result<()>>),
}

/// The journal's background thread and the way to it. Dropping it writes everything queued.
struct Writer {
    work: Option<mpsc::Sender<Work>>,
    thread: Option<JoinHandle<()>>,
    /// Set when a write failed: the thread writes nothing more.
    failed: Arc<AtomicBool>,
}

impl Writer {
    fn start(path: PathBuf, file: File) -> Writer {
        let (tx, rx) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let stop = failed.clone();
        let thread = crate::background::spawn("cwm-session-journal", move || {
            write_all_asked(&path, file, &rx, &stop)
        });
        Writer {
            work: Some(tx),
            thread: Some(thread),
            failed,
        }
    }

    fn send(&self, work: Work) -> io::Result<()> {
        let stopped = || io::Error::other("the journal's writer stopped after a failed write");
        if self.failed.load(Relaxed) {
            return Err(stopped());
        }
        let tx = self.work.as_ref().expect("open until dropped");
        tx.send(work).map_err(|_| stopped())
    }

    /// Wait until everything asked before is written, then fsync it.
    fn sync(&self) -> io::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Work::Sync(tx))?;
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::other("the journal's writer stopped")))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.work.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The journal's thread: do what is asked, in order, until the journal is dropped; after a
/// failed write, nothing more (logged once; `Journal::append` then reports it).
fn write_all_asked(path: &Path, mut file: File, work: &mpsc::Receiver<Work>, failed: &AtomicBool) {
    for w in work {
        let result = match w {
            Work::Sync(answer) => {
                let _ = answer.send(if failed.load(Relaxed) {
                    Err(io::Error::other("an earlier write failed"))
                } else {
                    file.sync_data()
                });
                continue;
            }
            _ if failed.load(Relaxed) => continue,
            Work::Append(entry) => file.write_all(&entry),
            Work::Replace(whole) => write_whole(path, &whole).map(|f| file = f),
        };
        if let Err(e) = result {
            tracing::error!(path = %path.display(), "session journal: write failed: {e}");
            failed.store(true, Relaxed);
        }
    }
}

/// What a replay read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replay {
    pub entries: usize,
    /// Bytes after the last good entry (a torn or corrupt tail), dropped.
    pub dropped_bytes: u64,
    /// Sealed entries skipped: they did not open, or followed one of their session's that
    /// did not.
    pub unopened: usize,
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `t` at the journal's precision (milliseconds since the epoch).
pub fn to_millis(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis(t))
}

/// Entry `e` as the bytes to write at `offset` in the file: its tokens sealed when `sealer`
/// has a key (the file is then version 2).
pub fn encode(e: &Entry, sealer: &Sealer, offset: u64) -> io::Result<Vec<u8>> {
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
    let tokens: Vec<u8> = e.suffix.iter().flat_map(|t| t.to_le_bytes()).collect();
    let aad = tokens_aad(offset, &b[4..]);
    match sealer.seal_blob(BlobKind::SessionJournal, &e.cache_salt, &aad, &tokens) {
        Some(sealed) => b.extend_from_slice(&sealed),
        None => b.extend_from_slice(&tokens),
    }
    if b.len() + 4 > MAX_ENTRY_BYTES {
        return Err(too_big());
    }
    let len = b.len() as u32; // the fields after the length, and the CRC
    b[..4].copy_from_slice(&len.to_le_bytes());
    le::seal(&mut b);
    Ok(b)
}

/// What a sealed entry's tokens are bound to: the entry's offset in the file and its clear
/// fields (the bytes from the model name to the token count).
fn tokens_aad(offset: u64, clear: &[u8]) -> Vec<u8> {
    [&offset.to_le_bytes()[..], clear].concat()
}

/// Entries of `b` (a whole journal file) up to the first that is not intact; sealed ones
/// opened with `sealer`, those that do not open skipped (with the rest of their session).
pub fn decode(b: &[u8], sealer: &Sealer) -> Result<(Vec<Entry>, Replay), String> {
    let mut r = LeReader::new(b);
    if r.array::<4>().as_ref() != Some(MAGIC) {
        return Err("not a session journal (bad magic)".into());
    }
    let sealed = match r.u16() {
        Some(VERSION) => false,
        Some(SEALED_VERSION) => true,
        v => {
            return Err(format!(
                "session journal version {v:?}; this cwm reads {VERSION} and {SEALED_VERSION}"
            ))
        }
    };
    r.u16();
    let mut entries = Vec::new();
    let mut locked = HashSet::new();
    let mut unopened = 0;
    let mut at = HEADER;
    while at < b.len() {
        let Some((len, mut e, fields)) = entry(&b[at..], sealed) else {
            break;
        };
        if sealed {
            let session = (e.model.clone(), e.cache_salt.clone());
            let aad = tokens_aad(at as u64, fields.clear);
            let opened = (!locked.contains(&session))
                .then(|| {
                    sealer
                        .open_blob(BlobKind::SessionJournal, &e.cache_salt, &aad, fields.tokens)
                        .ok()
                })
                .flatten();
            match opened.filter(|t| t.len() % 4 == 0) {
                Some(tokens) => e.suffix = tokens_of(&tokens),
                None => {
                    locked.insert(session);
                    unopened += 1;
                    at += len;
                    continue;
                }
            }
        }
        at += len;
        entries.push(e);
    }
    let replay = Replay {
        entries: entries.len(),
        dropped_bytes: (b.len() - at) as u64,
        unopened,
    };
    Ok((entries, replay))
}

fn tokens_of(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

/// An entry's bytes a sealed file needs to open its tokens.
struct Fields<'a> {
    /// From the model name to the token count.
    clear: &'a [u8],
    /// The token field as stored (sealed: nonce, ciphertext, tag).
    tokens: &'a [u8],
}

/// One entry at the front of `b` and its size, if intact; with `sealed`, its tokens are left
/// to open (`Fields`).
fn entry(b: &[u8], sealed: bool) -> Option<(usize, Entry, Fields<'_>)> {
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
    let clear_len = fields.len() - 4 - r.remaining();
    let stored = n.checked_mul(4)?.checked_add(if sealed {
        crate::store::seal::OVERHEAD
    } else {
        0
    })?;
    let tokens = r.bytes(stored)?;
    r.is_empty().then_some(())?;
    let suffix = if sealed {
        Vec::new()
    } else {
        tokens_of(tokens)
    };
    let e = Entry {
        model,
        cache_salt,
        world_size,
        updated,
        base: (index != NO_BASE).then_some((index, base_len)),
        suffix,
    };
    let clear = &fields[4..4 + clear_len];
    Some((whole.len(), e, Fields { clear, tokens }))
}

fn header(sealer: &Sealer) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.put_u16(if sealer.is_on() {
        SEALED_VERSION
    } else {
        VERSION
    });
    b.put_u16(0);
    b
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What the journals set aside from `path` are named: its file name and this, then the time.
const SET_ASIDE: &str = ".unopened-";

fn set_aside_prefix(path: &Path) -> String {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    format!("{name}{SET_ASIDE}")
}

/// Move the journal at `path` aside, whole, because some of its entries did not open: it
/// becomes `<path>.unopened-<ms since the epoch>`, replayed by every later start (see
/// `set_aside_files`) until one opens all of it. Returns its new path.
pub fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let prefix = set_aside_prefix(path);
    // The next free name from now on: never over one set aside before (the L2 directory's
    // lock keeps other writers out).
    let to = (millis(SystemTime::now())..)
        .map(|ms| path.with_file_name(format!("{prefix}{ms:020}")))
        .find(|to| !to.exists())
        .expect("a free name");
    fs::rename(path, &to)?;
    sync_dir(dir_of(path))?;
    Ok(to)
}

/// The journals set aside from `path`, oldest first.
pub fn set_aside_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    let prefix = set_aside_prefix(path);
    let mut out = Vec::new();
    let listing = match fs::read_dir(dir_of(path)) {
        Ok(listing) => listing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for item in listing {
        let item = item?;
        if item.file_name().to_string_lossy().starts_with(&prefix) {
            out.push(item.path());
        }
    }
    out.sort();
    Ok(out)
}

/// The directory `path` is in (the working directory for a bare file name).
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// A whole journal file holding `entries`.
fn encode_whole(entries: &[Entry], sealer: &Sealer) -> io::Result<Vec<u8>> {
    let mut b = header(sealer);
    for e in entries {
        let encoded = encode(e, sealer, b.len() as u64)?;
        b.extend_from_slice(&encoded);
    }
    Ok(b)
}

/// Replace the file at `path` with `whole`: written as `….tmp`, fsynced, renamed over it, the
/// directory fsynced. Returns it open for appends.
fn write_whole(path: &Path, whole: &[u8]) -> io::Result<File> {
    let tmp = path.with_extension("journal.tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(whole)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir_of(path))?;
    OpenOptions::new().append(true).open(path)
}

impl Journal {
    /// The entries in `path` (none if there is no file yet), to replay before `create`.
    pub fn read(path: &Path, sealer: &Sealer) -> io::Result<(Vec<Entry>, Replay)> {
        match fs::read(path) {
            Ok(b) => decode(&b, sealer).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Default::default()),
            Err(e) => Err(e),
        }
    }

    /// Replace the file at `path` with `entries` (the whole index), durably (here, before
    /// returning), and open it for appends; sealed (version 2) when `sealer` has a key.
    pub fn create(path: &Path, entries: &[Entry], sealer: Sealer) -> io::Result<Journal> {
        let whole = encode_whole(entries, &sealer)?;
        let file = write_whole(path, &whole)?;
        Ok(Journal {
            writer: Writer::start(path.to_path_buf(), file),
            sealer,
            bytes: whole.len() as u64,
            compacted_bytes: whole.len() as u64,
        })
    }

    /// Queue entry `e` for writing. Returns whether the journal should now be compacted; an
    /// error if it cannot be encoded or an earlier write failed.
    pub fn append(&mut self, e: &Entry) -> io::Result<bool> {
        let b = encode(e, &self.sealer, self.bytes)?;
        let len = b.len() as u64;
        self.writer.send(Work::Append(b))?;
        self.bytes += len;
        Ok(self.bytes > 2 * self.compacted_bytes + COMPACT_SLACK)
    }

    /// Queue the journal's rewrite as `entries` (the whole index).
    pub fn compact(&mut self, entries: &[Entry]) -> io::Result<()> {
        let whole = encode_whole(entries, &self.sealer)?;
        let len = whole.len() as u64;
        self.writer.send(Work::Replace(whole))?;
        (self.bytes, self.compacted_bytes) = (len, len);
        Ok(())
    }

    /// Write everything queued and make it durable (a clean stop).
    pub fn sync(&self) -> io::Result<()> {
        self.writer.sync()
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
        let mut j = Journal::create(&path, std::slice::from_ref(&a), Sealer::default()).unwrap();
        j.append(&b).unwrap();
        j.sync().unwrap();
        let (got, replay) = Journal::read(&path, &Sealer::default()).unwrap();
        assert_eq!(got, vec![a.clone(), b.clone()]);
        assert_eq!(replay.dropped_bytes, 0);

        // A crash in the middle of an append: the good entries stay, the tail is dropped.
        let whole = fs::read(&path).unwrap();
        fs::write(&path, &whole[..whole.len() - 5]).unwrap();
        let (got, replay) = Journal::read(&path, &Sealer::default()).unwrap();
        assert_eq!(got, vec![a]);
        assert!(replay.dropped_bytes > 0);
    }

    #[test]
    fn every_flipped_byte_ends_the_replay_there() {
        let plain = Sealer::default();
        let entry = encode(&entry(None, vec![1, 2, 3]), &plain, HEADER as u64).unwrap();
        let b = [header(&plain), entry].concat();
        for i in HEADER..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x40;
            let (got, replay) = decode(&bad, &plain).unwrap();
            assert!(got.is_empty(), "byte {i}: {got:?}");
            assert_eq!(replay.dropped_bytes as usize, b.len() - HEADER);
        }
        assert!(decode(b"CWMX\x01\0\0\0", &plain).is_err());
    }

    fn keyed(byte: u8) -> Sealer {
        use crate::store::seal::{ServerKey, KEY_LEN};
        Sealer::new(Some(ServerKey::from_bytes([byte; KEY_LEN])))
    }

    #[test]
    fn sealed_entries_hide_their_tokens_and_skip_their_session_when_they_do_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.journal");
        let a = entry(None, (1000..1300).collect());
        let b = entry(Some((0, 256)), vec![7, 8, 9]);
        let other = Entry {
            cache_salt: "bob".into(),
            ..entry(None, vec![5; 16])
        };
        let mut j = Journal::create(&path, std::slice::from_ref(&a), keyed(1)).unwrap();
        j.append(&b).unwrap();
        j.append(&other).unwrap();
        j.sync().unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(&bytes[4..6], &SEALED_VERSION.to_le_bytes());
        let run: Vec<u8> = (1000..1004u32).flat_map(u32::to_le_bytes).collect();
        assert!(!bytes.windows(run.len()).any(|w| w == run));
        let (got, replay) = decode(&bytes, &keyed(1)).unwrap();
        assert_eq!(got, vec![a.clone(), b, other]);
        assert_eq!(replay.unopened, 0);
        for wrong in [keyed(2), Sealer::default()] {
            let (got, replay) = decode(&bytes, &wrong).unwrap();
            assert!(got.is_empty());
            assert_eq!((replay.unopened, replay.dropped_bytes), (3, 0));
            // alice's second entry is skipped unopened: her first did not open.
            assert_eq!(wrong.stats().unopened_journal_entries, 2);
        }
        // Entries moved to other offsets (the first one cut out) do not open.
        let first =
            HEADER + u32::from_le_bytes(bytes[HEADER..HEADER + 4].try_into().unwrap()) as usize + 4;
        let moved = [&bytes[..HEADER], &bytes[first..]].concat();
        let (got, replay) = decode(&moved, &keyed(1)).unwrap();
        assert_eq!((got, replay.unopened), (vec![], 2));
        // A plain journal is read by a server with a key.
        let plain = dir.path().join("plain.journal");
        Journal::create(&plain, std::slice::from_ref(&a), Sealer::default()).unwrap();
        assert_eq!(Journal::read(&plain, &keyed(1)).unwrap().0, vec![a]);
    }

    #[test]
    fn growth_asks_for_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(&dir.path().join("j"), &[], Sealer::default()).unwrap();
        let big = entry(None, vec![0; 100_000]);
        let asked: Vec<bool> = (0..7).map(|_| j.append(&big).unwrap()).collect();
        assert_eq!(asked, [false, false, true, true, true, true, true]);
        j.compact(&[big]).unwrap();
        assert!(!j.append(&entry(None, vec![1])).unwrap());
    }
}
