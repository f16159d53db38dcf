//! Portable window files: `cwm windows export NAME FILE` / `cwm windows import FILE`.
//!
//! One file per window, format version 1 (docs/FORMATS.md):
//!
//! ```text
//! magic "CWMX" | version u16 LE = 1 | reserved u16 = 0
//! manifest length u32 LE | manifest (the catalog's JSON for the window: version 2, its
//!   tokens sealed, when the exporting server has a key)
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

use super::catalog::{decode_manifest, encode_manifest, unix_now, ManifestError, Window};
use super::{validate_name, WindowError, WindowSummary, Windows};
use crate::store::le::{self, CrcWriter, LeReader};
use crate::store::record::Record;
use crate::store::seal::Sealer;

pub const MAGIC: &[u8; 4] = b"CWMX";
pub const VERSION: u16 = 1;

fn bad(what: impl Into<String>) -> WindowError {
    WindowError::Export(what.into())
}

impl Windows {
    /// Write window `name` to `path` (replaced atomically). Returns the file's size.
    pub fn export(&self, name: &str, path: &Path) -> Result<u64, WindowError> {
        validate_name(name)?;
        let (tiers, _) = self.disk()?;
        let w = self.find(name)?;
        let manifest = encode_manifest(&w, tiers.sealer());
        let keys = w.data_keys();
        let tmp = path.with_extension("cwmx.tmp");
        let mut out = CrcWriter::new(BufWriter::new(File::create(&tmp)?));
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(&0u16.to_le_bytes())?;
        out.write_all(&(manifest.len() as u32).to_le_bytes())?;
        out.write_all(&manifest)?;
        out.write_all(&(keys.len() as u32).to_le_bytes())?;
        for key in &keys {
            if tiers.record_info(key).is_none() {
                return Err(bad(format!(
                    "window {name:?}: record {key:?} is missing from L2"
                )));
            }
            let record = tiers.export_record(key)?;
            out.write_all(&(record.len() as u64).to_le_bytes())?;
            out.write_all(&record)?;
        }
        let file = out.finish()?.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let size = file.metadata()?.len();
        fs::rename(&tmp, path)?;
        Ok(size)
    }

    /// Import a window file (read and verified by `WindowFile::read`) into this store.
    /// Nothing is written unless everything verified; a taken name changes nothing.
    pub fn import(&self, file: &WindowFile) -> Result<WindowSummary, WindowError> {
        let (tiers, catalog) = self.disk()?;
        let (mut w, records) = parse(&file.bytes, Some(tiers.sealer()))?;
        w.name = file.name.clone();
        let path = &file.path;
        let _serial = self.op_lock.lock();
        if catalog.contains(&w.name) {
            return Err(WindowError::Taken(w.name));
        }
        let mut pinned = Vec::with_capacity(records.len());
        let result = (|| {
            for (key, record) in &records {
                tiers.import_record(key, record)?;
                if !tiers.pin(key) {
                    return Err(WindowError::Vanished(Box::new(key.clone())));
                }
                pinned.push(key.clone());
            }
            tiers.sync()?;
            w.created_at = unix_now();
            w.last_thawed_at = None;
            catalog.insert(w.clone())?;
            Ok(())
        })();
        if let Err(e) = result {
            pinned.iter().for_each(|k| tiers.unpin(k));
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
    /// Read and verify `path`; import it as `new_name` or the name it was exported under. A
    /// sealed manifest is opened only by `Windows::import` (it holds the key).
    pub fn read(path: &Path, new_name: Option<&str>) -> Result<WindowFile, WindowError> {
        let bytes = fs::read(path)?;
        let (w, _) = parse(&bytes, None)?;
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
/// with its key). A sealed manifest is opened with `sealer` (one that does not open is an
/// error); without one, only its clear fields are read and checked.
#[allow(clippy::type_complexity)]
fn parse<'a>(
    b: &'a [u8],
    sealer: Option<&Sealer>,
) -> Result<(Window, Vec<(connector_protocol::ObjectKey, &'a [u8])>), WindowError> {
    if b.len() < 16 || &b[..4] != MAGIC {
        return Err(bad("not a cwm window file (bad magic)"));
    }
    let body =
        le::unseal(b).ok_or_else(|| bad("window file checksum mismatch: the file is damaged"))?;
    let truncated = || bad("window file truncated");
    let mut r = LeReader::new(&body[4..]);
    let version = r.u16().ok_or_else(truncated)?;
    if version != VERSION {
        return Err(bad(format!(
            "window file version {version}, this build reads {VERSION}"
        )));
    }
    r.u16().ok_or_else(truncated)?; // reserved
    let mlen = r.u32().ok_or_else(truncated)? as usize;
    let manifest = r.bytes(mlen).ok_or_else(truncated)?;
    let w = match decode_manifest(manifest, sealer.unwrap_or(&Sealer::default())) {
        Ok(w) => w,
        Err(ManifestError::Unreadable(u)) if sealer.is_none() => u.window,
        Err(e) => return Err(bad(format!("window manifest: {e}"))),
    };
    let keys = w.data_keys();
    let n = r.u32().ok_or_else(truncated)? as usize;
    if n != keys.len() {
        return Err(bad(format!(
            "{n} records for a window of {} chunk objects",
            keys.len()
        )));
    }
    let mut records = Vec::with_capacity(n);
    for want in &keys {
        let len = r.u64().ok_or_else(truncated)?;
        let rec = usize::try_from(len)
            .ok()
            .and_then(|len| r.bytes(len))
            .ok_or_else(truncated)?;
        let record = Record::parse(rec, 0).map_err(|e| bad(e.to_string()))?;
        if record.header.key != *want {
            return Err(bad(format!(
                "record for {want:?} does not match the manifest"
            )));
        }
        records.push((record.header.key, rec));
    }
    if !r.is_empty() {
        return Err(bad("trailing bytes after the last record"));
    }
    Ok((w, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage_without_panicking() {
        for b in [&b""[..], b"CWMX", b"XXXXxxxxxxxxxxxxxxxxxx", &[0u8; 64][..]] {
            assert!(parse(b, None).is_err());
        }
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&(u32::MAX).to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let e = parse(&b, None).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
