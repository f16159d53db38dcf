//! Where segment bytes live. `Storage` is a directory of append-only segment files plus an
//! atomically replaced checkpoint; `FsStorage` is the real one (reads through `memmap2`),
//! `MemStorage` keeps written and synced bytes apart so tests can simulate a crash that loses
//! everything not yet synced, or tears the last write, and can play a full disk.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use memmap2::Mmap;
use parking_lot::{Mutex, RwLock};

/// Bytes read from a segment: a window of a mapping, or an owned buffer.
pub enum SegmentBytes {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Vec<u8>),
}

impl Deref for SegmentBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            SegmentBytes::Mapped { map, start, len } => &map[*start..*start + *len],
            SegmentBytes::Owned(v) => v,
        }
    }
}

/// One append-only segment file.
pub trait SegmentFile: Send + Sync + 'static {
    /// Bytes written so far (synced or not).
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Append `parts` back to back; returns the offset of the first byte. On error nothing of
    /// this append remains.
    fn append(&self, parts: &[&[u8]]) -> io::Result<u64>;
    fn sync(&self) -> io::Result<()>;
    /// Start writing `len` bytes at `offset` to the device and return without waiting: what
    /// was appended does not pile up as dirty pages for the next fsync (or the kernel's own
    /// flush) to write all at once, beside a foreground transfer. A hint: errors show at the
    /// next fsync.
    fn start_writeback(&self, _offset: u64, _len: u64) {}
    fn truncate(&self, len: u64) -> io::Result<()>;
    /// Up to `len` bytes at `offset` (fewer at the end of the file).
    fn read(&self, offset: u64, len: u64) -> io::Result<SegmentBytes>;
}

pub trait Storage: Send + Sync + 'static {
    type File: SegmentFile;
    /// Ids of the existing segments, ascending.
    fn segments(&self) -> io::Result<Vec<u32>>;
    fn open(&self, id: u32) -> io::Result<Self::File>;
    fn create(&self, id: u32) -> io::Result<Self::File>;
    fn remove(&self, id: u32) -> io::Result<()>;
    /// Replace the checkpoint atomically and durably.
    fn write_checkpoint(&self, bytes: &[u8]) -> io::Result<()>;
    fn read_checkpoint(&self) -> io::Result<Option<Vec<u8>>>;
}

// ---------------------------------------------------------------------------------------------

/// Segments as files `seg-XXXXXXXX.cwm` in a directory, checkpoint `index.ckpt`. Holds the
/// directory's exclusive lock (`DirLock`) while open.
pub struct FsStorage {
    dir: PathBuf,
    _lock: super::dir_lock::DirLock,
}

impl FsStorage {
    /// Open (creating it if needed) and lock `dir`; fails naming the holder if another
    /// process has it open.
    pub fn open(dir: &Path) -> io::Result<FsStorage> {
        fs::create_dir_all(dir)?;
        Ok(FsStorage {
            dir: dir.to_path_buf(),
            _lock: super::dir_lock::DirLock::acquire(dir)?,
        })
    }

    fn segment_path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("seg-{id:08}.cwm"))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

impl Storage for FsStorage {
    type File = FsSegment;

    fn segments(&self) -> io::Result<Vec<u32>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name
                .strip_prefix("seg-")
                .and_then(|s| s.strip_suffix(".cwm"))
                .and_then(|s| s.parse().ok())
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    fn open(&self, id: u32) -> io::Result<FsSegment> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.segment_path(id))?;
        FsSegment::new(file)
    }

    fn create(&self, id: u32) -> io::Result<FsSegment> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.segment_path(id))?;
        self.sync_dir()?;
        FsSegment::new(file)
    }

    fn remove(&self, id: u32) -> io::Result<()> {
        fs::remove_file(self.segment_path(id))
    }

    fn write_checkpoint(&self, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join("index.ckpt.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, self.dir.join("index.ckpt"))?;
        self.sync_dir()
    }

    fn read_checkpoint(&self) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.dir.join("index.ckpt")) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

pub struct FsSegment {
    file: File,
    len: Mutex<u64>,
    map: RwLock<Option<Arc<Mmap>>>,
}

impl FsSegment {
    fn new(file: File) -> io::Result<FsSegment> {
        let len = file.metadata()?.len();
        Ok(FsSegment {
            file,
            len: Mutex::new(len),
            map: RwLock::new(None),
        })
    }
}

impl SegmentFile for FsSegment {
    fn len(&self) -> u64 {
        *self.len.lock()
    }

    fn append(&self, parts: &[&[u8]]) -> io::Result<u64> {
        let mut len = self.len.lock();
        let start = *len;
        let mut at = start;
        for p in parts {
            if let Err(e) = self.file.write_all_at(p, at) {
                let _ = self.file.set_len(start);
                return Err(e);
            }
            at += p.len() as u64;
        }
        *len = at;
        Ok(start)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        // SAFETY: a plain syscall on a descriptor this segment owns; SYNC_FILE_RANGE_WRITE
        // alone starts the writes and does not wait for them.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    fn truncate(&self, new_len: u64) -> io::Result<()> {
        let mut len = self.len.lock();
        self.file.set_len(new_len)?;
        *len = new_len;
        *self.map.write() = None;
        Ok(())
    }

    fn read(&self, offset: u64, len: u64) -> io::Result<SegmentBytes> {
        let file_len = self.len();
        let end = offset.saturating_add(len).min(file_len);
        if offset >= end {
            return Ok(SegmentBytes::Owned(Vec::new()));
        }
        let current = self.map.read().clone();
        let map = match current {
            Some(m) if m.len() as u64 >= end => m,
            _ => {
                // SAFETY: the file is only appended to or truncated below indexed data by this
                // process; bytes below `end` are never changed while mapped.
                let m = Arc::new(unsafe { Mmap::map(&self.file)? });
                *self.map.write() = Some(m.clone());
                m
            }
        };
        if (map.len() as u64) < end {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "segment shorter than its length",
            ));
        }
        Ok(SegmentBytes::Mapped {
            map,
            start: offset as usize,
            len: (end - offset) as usize,
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// In-memory storage that remembers what was synced, for crash tests.
#[derive(Default)]
pub struct MemStorage {
    segments: Mutex<BTreeMap<u32, Arc<MemSegmentData>>>,
    checkpoint: Mutex<Option<Vec<u8>>>,
    disk: Arc<Disk>,
}

/// The device under every segment: full or not, and how many appends it refused.
#[derive(Default)]
struct Disk {
    full: AtomicBool,
    refused: AtomicU64,
}

#[derive(Default)]
pub struct MemSegmentData {
    bytes: Mutex<Vec<u8>>,
    synced: Mutex<u64>,
}

#[derive(Clone)]
pub struct MemSegment {
    data: Arc<MemSegmentData>,
    disk: Arc<Disk>,
}

impl MemStorage {
    /// Simulate a crash: every segment loses its unsynced bytes except the first
    /// `keep_unsynced` of them (a torn write). Segments created but never synced survive
    /// empty-or-torn too (the directory entry is durable in `FsStorage::create`).
    pub fn crash(&self, keep_unsynced: u64) {
        for seg in self.segments.lock().values() {
            let synced = *seg.synced.lock();
            let mut b = seg.bytes.lock();
            let keep = (synced + keep_unsynced).min(b.len() as u64);
            b.truncate(keep as usize);
        }
    }

    /// Flip one bit of a segment (corruption tests).
    pub fn flip(&self, id: u32, offset: u64) {
        let segs = self.segments.lock();
        let mut b = segs[&id].bytes.lock();
        b[offset as usize] ^= 0x10;
    }

    /// Play a full disk: while set, every append fails with `ENOSPC` and leaves nothing.
    pub fn set_full(&self, full: bool) {
        self.disk.full.store(full, Relaxed);
    }

    /// Appends refused because the disk was full.
    pub fn refused_appends(&self) -> u64 {
        self.disk.refused.load(Relaxed)
    }

    fn segment(&self, data: Arc<MemSegmentData>) -> MemSegment {
        MemSegment {
            data,
            disk: self.disk.clone(),
        }
    }

    pub fn segment_len(&self, id: u32) -> u64 {
        self.segments
            .lock()
            .get(&id)
            .map_or(0, |s| s.bytes.lock().len() as u64)
    }
}

impl Storage for Arc<MemStorage> {
    type File = MemSegment;

    fn segments(&self) -> io::Result<Vec<u32>> {
        Ok(self.segments.lock().keys().copied().collect())
    }

    fn open(&self, id: u32) -> io::Result<MemSegment> {
        self.segments
            .lock()
            .get(&id)
            .cloned()
            .map(|d| self.segment(d))
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn create(&self, id: u32) -> io::Result<MemSegment> {
        let mut segs = self.segments.lock();
        if segs.contains_key(&id) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        let d = Arc::new(MemSegmentData::default());
        segs.insert(id, d.clone());
        Ok(self.segment(d))
    }

    fn remove(&self, id: u32) -> io::Result<()> {
        self.segments
            .lock()
            .remove(&id)
            .map(|_| ())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn write_checkpoint(&self, bytes: &[u8]) -> io::Result<()> {
        *self.checkpoint.lock() = Some(bytes.to_vec());
        Ok(())
    }

    fn read_checkpoint(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(self.checkpoint.lock().clone())
    }
}

impl SegmentFile for MemSegment {
    fn len(&self) -> u64 {
        self.data.bytes.lock().len() as u64
    }

    fn append(&self, parts: &[&[u8]]) -> io::Result<u64> {
        if self.disk.full.load(Relaxed) {
            self.disk.refused.fetch_add(1, Relaxed);
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let mut b = self.data.bytes.lock();
        let start = b.len() as u64;
        for p in parts {
            b.extend_from_slice(p);
        }
        Ok(start)
    }

    fn sync(&self) -> io::Result<()> {
        *self.data.synced.lock() = self.data.bytes.lock().len() as u64;
        Ok(())
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.data.bytes.lock().truncate(len as usize);
        let mut s = self.data.synced.lock();
        *s = (*s).min(len);
        Ok(())
    }

    fn read(&self, offset: u64, len: u64) -> io::Result<SegmentBytes> {
        let b = self.data.bytes.lock();
        let end = offset.saturating_add(len).min(b.len() as u64);
        Ok(SegmentBytes::Owned(if offset < end {
            b[offset as usize..end as usize].to_vec()
        } else {
            Vec::new()
        }))
    }
}
