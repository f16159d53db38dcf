//! Portable window files: `cwm windows export NAME FILE` / `cwm windows import FILE`.
//!
//! One file per window, format version 1 (docs/FORMATS.md):
//!
//! ```text
//! magic "CWMX" | version u16 LE = 1 | reserved u16 = 0
//! manifest length u32 LE | manifest (the catalog's JSON for the window)
//! record count u32 LE | per record: length u64 LE, then one L2 disk record (header + payload)
//! crc32 (u32 LE) of every byte before it
//! ```
//!
//! Records appear chunk-major, rank-minor, exactly the window's data keys in order; each
//! keeps its own header and payload checksums, and the trailing crc covers the whole file. An
//! import verifies everything before it writes a byte to L2.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;

use super::catalog::{unix_now, Window};
use super::{validate_name, WindowError, WindowSummary, Windows};
use crate::store::record::Record;

pub const MAGIC: &[u8; 4] = b"CWMX";
pub const VERSION: u16 = 1;

fn bad(what: impl Into<String>) -> WindowError {
    WindowError::Export(what.into())
}

impl Windows {
    /// Write window `name` to `path` (replaced atomically). Returns the file's size.
    pub fn export(&self, name: &str, path: &Path) -> Result<u64, WindowError> {
        validate_name(name)?;
        let (l2, catalog) = self.disk()?;
        let w = catalog
            .get(name)
            .ok_or_else(|| WindowError::Unknown(name.to_string()))?;
        let manifest = serde_json::to_vec_pretty(&w).map_err(|e| bad(e.to_string()))?;
        let keys = w.data_keys();
        let tmp = path.with_extension("cwmx.tmp");
        let mut out = Crc32Writer::new(BufWriter::new(File::create(&tmp)?));
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(&0u16.to_le_bytes())?;
        out.write_all(&(manifest.len() as u32).to_le_bytes())?;
        out.write_all(&manifest)?;
        out.write_all(&(keys.len() as u32).to_le_bytes())?;
        for key in &keys {
            if l2.record_info(key).is_none() {
                return Err(bad(format!(
                    "window {name:?}: record {key:?} is missing from L2"
                )));
            }
            let record = l2.export_record(key)?;
            out.write_all(&(record.len() as u64).to_le_bytes())?;
            out.write_all(&record)?;
        }
        let crc = out.crc.clone().finalize();
        let mut inner = out.inner;
        inner.write_all(&crc.to_le_bytes())?;
        let file = inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let size = file.metadata()?.len();
        fs::rename(&tmp, path)?;
        Ok(size)
    }

    /// Import a window file (read and verified by `WindowFile::read`) into this store.
    /// Nothing is written unless everything verified; a taken name changes nothing.
    pub fn import(&self, file: &WindowFile) -> Result<WindowSummary, WindowError> {
        let (mut w, records) = parse(&file.bytes)?;
        w.name = file.name.clone();
        let path = &file.path;
        let (l2, catalog) = self.disk()?;
        let _serial = self.op_lock.lock();
        if catalog.contains(&w.name) {
            return Err(WindowError::Taken(w.name));
        }
        let mut pinned = Vec::with_capacity(records.len());
        let result = (|| {
            for (key, record) in &records {
                l2.import_record(key, record)?;
                if !l2.pin(key) {
                    return Err(WindowError::Vanished(Box::new(key.clone())));
                }
                pinned.push(key.clone());
            }
            l2.sync()?;
            w.created_at = unix_now();
            w.last_thawed_at = None;
            catalog.insert(w.clone())?;
            Ok(())
        })();
        if let Err(e) = result {
            pinned.iter().for_each(|k| l2.unpin(k));
            return Err(e);
        }
        self.pins.lock().insert(w.name.clone(), pinned);
        tracing::info!(window = w.name, path = %path.display(), "window imported");
        Ok(WindowSummary::from(&w))
    }
}

/// A window file read and verified, with the name it will be imported under. Reading it
/// needs no data directory, so a bad file or name is refused before one is opened (or
/// created).
pub struct WindowFile {
    path: std::path::PathBuf,
    bytes: Vec<u8>,
    name: String,
}

impl WindowFile {
    /// Read and verify `path`; import it as `new_name` or the name it was exported under.
    pub fn read(path: &Path, new_name: Option<&str>) -> Result<WindowFile, WindowError> {
        let bytes = fs::read(path)?;
        let (w, _) = parse(&bytes)?;
        let name = match new_name {
            Some(n) => {
                validate_name(n)?;
                n.to_string()
            }
            None => w.name,
        };
        Ok(WindowFile {
            path: path.to_path_buf(),
            bytes,
            name,
        })
    }
}

/// Verify a whole window file and split it into its manifest and its records (each verified,
/// with its key).
#[allow(clippy::type_complexity)]
fn parse(b: &[u8]) -> Result<(Window, Vec<(connector_protocol::ObjectKey, &[u8])>), WindowError> {
    if b.len() < 16 || &b[..4] != MAGIC {
        return Err(bad("not a cwm window file (bad magic)"));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(bad("window file checksum mismatch: the file is damaged"));
    }
    let version = u16::from_le_bytes(body[4..6].try_into().expect("2 bytes"));
    if version != VERSION {
        return Err(bad(format!(
            "window file version {version}, this build reads {VERSION}"
        )));
    }
    let mut at = 8usize;
    let mut take = |n: usize| -> Result<&[u8], WindowError> {
        let s = body
            .get(at..at.checked_add(n).ok_or_else(|| bad("truncated"))?)
            .ok_or_else(|| bad("window file truncated"))?;
        at += n;
        Ok(s)
    };
    let mlen = u32::from_le_bytes(take(4)?.try_into().expect("4")) as usize;
    let w: Window =
        serde_json::from_slice(take(mlen)?).map_err(|e| bad(format!("window manifest: {e}")))?;
    w.check()
        .map_err(|e| bad(format!("window manifest: {e}")))?;
    let keys = w.data_keys();
    let n = u32::from_le_bytes(take(4)?.try_into().expect("4")) as usize;
    if n != keys.len() {
        return Err(bad(format!(
            "{n} records for a window of {} chunk objects",
            keys.len()
        )));
    }
    let mut records = Vec::with_capacity(n);
    for want in &keys {
        let len = u64::from_le_bytes(take(8)?.try_into().expect("8")) as usize;
        let rec = take(len)?;
        let r = Record::parse(rec, 0).map_err(|e| bad(e.to_string()))?;
        if r.header.key != *want {
            return Err(bad(format!(
                "record for {want:?} does not match the manifest"
            )));
        }
        records.push((r.header.key, rec));
    }
    if at != body.len() {
        return Err(bad("trailing bytes after the last record"));
    }
    Ok((w, records))
}

/// A writer that keeps a running crc32 of what passes through.
struct Crc32Writer<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Crc32Writer<W> {
    fn new(inner: W) -> Self {
        Crc32Writer {
            inner,
            crc: crc32fast::Hasher::new(),
        }
    }
}

impl<W: Write> Write for Crc32Writer<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage_without_panicking() {
        for b in [&b""[..], b"CWMX", b"XXXXxxxxxxxxxxxxxxxxxx", &[0u8; 64][..]] {
            assert!(parse(b).is_err());
        }
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&(u32::MAX).to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let e = parse(&b).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
