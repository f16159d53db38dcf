//! Fuzz the L2 disk record reader and the segment scan / recovery of `DiskStore::open`.
//!
//! Input: byte 0 is a flags byte, the rest depends on it (see `Plan`):
//!
//! * bit 3 clear ("raw"): the rest is up to 4 sections, each a u16 LE length and that many
//!   bytes (a length past the end takes the rest): segment files 0..n, then, with bit 1, the
//!   checkpoint file `index.ckpt`.
//! * bit 3 set ("generated"): the rest is a small script. A `DiskStore` over a `MemStorage`
//!   writes real records (raw, zstd and byte-plane payloads, segment rotation, checkpoints),
//!   then the store's files are taken out, byte edits / truncations / a simulated crash from
//!   the script are applied, and the result is reopened. This reaches deep states without a
//!   committed corpus.
//!
//! With bit 0 the record checksums along each segment's scan chain are recomputed after the
//! edits (and with bit 2 the checkpoint's), so the fuzzer gets past the CRCs to the lengths,
//! codecs and keys behind them.
//!
//! Checked, for every input:
//! 1. `decode_header` at every offset of every segment, and `verify_payload` behind each
//!    header that decodes: no panic; a decoded header agrees field by field with the bytes,
//!    its header length lies inside the input, its key re-encodes to the stored key bytes,
//!    and `verify_payload` accepts exactly a payload of the stated length whose CRC matches.
//! 2. `DiskStore::open` on those files never panics; every key the store then claims to hold
//!    either fails to read (an error, and the key is dropped) or reads back bytes equal to the
//!    decompressed payload of a record with that key whose header and payload CRCs verify
//!    somewhere in the files. A read with the wrong buffer length is refused. After recovery
//!    the store still works: new writes (with pins and reclaim under a small budget) read
//!    back exactly.
#![no_main]

use std::collections::HashSet;
use std::sync::Arc;

use connector_protocol::{ChunkHash, ObjectKey};
use cwm::store::codec::{self, CompressionPolicy};
use cwm::store::record::{
    decode_header, decode_key_bytes, encode_key_bytes, verify_payload, RecordError, FIXED, MAGIC,
    VERSION,
};
use cwm::store::disk::storage::{MemStorage, SegmentFile, Storage};
use cwm::store::disk::{DiskConfig, DiskError, DiskStore, FsyncPolicy};
use libfuzzer_sys::fuzz_target;

/// Largest raw length the harness allocates a read buffer for.
const MAX_READ: u64 = 1 << 20;

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes(b[i..i + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
}

/// Reads the script; past the end every read is 0.
struct Cursor<'a>(&'a [u8]);
impl Cursor<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn key(n: u8, salt: &str) -> ObjectKey {
    ObjectKey {
        model: "fuzz/model".into(),
        kv_rank: 0x0001_0001,
        object_group: u32::from(n % 2),
        chunk_hash: ChunkHash([n; 32]),
        cache_salt: salt.into(),
    }
}

// ------------------------------------------------------------------------------------------
// Part 1: the record reader on its own.

/// `decode_header` at every offset of `seg` (also with a far-away offset label), and
/// `verify_payload` behind every header that decodes.
fn check_reader(seg: &[u8]) {
    for o in 0..=seg.len() {
        let b = &seg[o..];
        for label in [o as u64, u64::MAX - o as u64] {
            match decode_header(b, label) {
                Ok(h) => check_header(b, label, &h),
                Err(e) => check_error(b, label, &e),
            }
        }
    }
}

fn check_header(b: &[u8], label: u64, h: &cwm::store::record::RecordHeader) {
    // Everything the header claims is in the bytes it was decoded from.
    assert!(b.len() >= FIXED, "decoded from {} bytes", b.len());
    assert_eq!(b[0..4], MAGIC);
    assert_eq!(u16_at(b, 4), VERSION);
    let k = usize::from(u16_at(b, 8));
    let hl = FIXED + k + 4;
    assert_eq!(h.header_len, hl as u64, "header length");
    assert!(
        hl <= b.len(),
        "header of {hl} bytes decoded from {} bytes",
        b.len()
    );
    assert_eq!(h.codec.code(), b[6]);
    assert_eq!(h.itemsize, b[7]);
    assert_eq!(h.raw_len, u64_at(b, 12));
    assert_eq!(h.stored_len, u64_at(b, 20));
    assert_eq!(h.payload_crc, u32_at(b, 28));
    assert_eq!(
        crc32fast::hash(&b[..FIXED + k]),
        u32_at(b, FIXED + k),
        "header crc"
    );
    let key_bytes = &b[FIXED..FIXED + k];
    assert_eq!(
        encode_key_bytes(&h.key),
        key_bytes,
        "key does not re-encode to its bytes"
    );
    assert_eq!(decode_key_bytes(key_bytes).as_ref(), Some(&h.key));
    if let Some(total) = h.header_len.checked_add(h.stored_len) {
        assert_eq!(h.record_len(), total);
    }

    // verify_payload accepts exactly S bytes with the right CRC.
    let tail = &b[hl..];
    let want_ok = |p: &[u8]| p.len() as u64 == h.stored_len && crc32fast::hash(p) == h.payload_crc;
    let r = verify_payload(h, tail, label);
    assert_eq!(
        r.is_ok(),
        want_ok(tail),
        "verify_payload on the whole tail: {r:?}"
    );
    if let Err(e) = &r {
        check_offset(e, label);
    }
    if h.stored_len <= tail.len() as u64 {
        let p = &tail[..h.stored_len as usize];
        let r = verify_payload(h, p, label);
        assert_eq!(r.is_ok(), crc32fast::hash(p) == h.payload_crc, "{r:?}");
        if let Some((_, shorter)) = p.split_last() {
            assert!(matches!(
                verify_payload(h, shorter, label),
                Err(RecordError::Short { .. })
            ));
        }
    } else {
        assert!(matches!(r, Err(RecordError::Short { .. })), "{r:?}");
    }
}

fn check_offset(e: &RecordError, label: u64) {
    let offset = match *e {
        RecordError::Short { offset, .. }
        | RecordError::Magic { offset, .. }
        | RecordError::Version { offset, .. }
        | RecordError::HeaderCrc { offset }
        | RecordError::PayloadCrc { offset }
        | RecordError::Malformed { offset, .. } => offset,
    };
    assert_eq!(offset, label, "{e}");
    let _ = e.to_string();
}

fn check_error(b: &[u8], label: u64, e: &RecordError) {
    check_offset(e, label);
    match *e {
        RecordError::Short { have, need, .. } => {
            assert_eq!(have, b.len() as u64);
            assert!(have < need, "{e}");
        }
        RecordError::Magic { found, .. } => assert!(found != MAGIC && b[..4] == found),
        RecordError::Version { found, .. } => assert!(found != VERSION),
        _ => {}
    }
}

// ------------------------------------------------------------------------------------------
// Building the files.

/// Recompute payload and header CRCs along the scan chain from offset 0.
fn repair_records(seg: &mut [u8]) {
    let mut at = 0usize;
    while seg.len().saturating_sub(at) >= FIXED && seg[at..at + 4] == MAGIC {
        let r = &mut seg[at..];
        let k = usize::from(u16_at(r, 8));
        let hl = FIXED + k + 4;
        if r.len() < hl {
            return;
        }
        let s = u64_at(r, 20);
        let end = (hl as u64).checked_add(s).filter(|&e| e <= r.len() as u64);
        if let Some(end) = end {
            let crc = crc32fast::hash(&r[hl..end as usize]);
            r[28..32].copy_from_slice(&crc.to_le_bytes());
        }
        let crc = crc32fast::hash(&r[..FIXED + k]);
        r[FIXED + k..hl].copy_from_slice(&crc.to_le_bytes());
        match end {
            Some(end) if end > 0 => at += end as usize,
            _ => return,
        }
    }
}

fn repair_checkpoint(c: &mut [u8]) {
    if c.len() >= 4 {
        let n = c.len() - 4;
        let crc = crc32fast::hash(&c[..n]);
        c[n..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Keys named by a checkpoint (format v1, docs/FORMATS.md), as far as it parses.
fn checkpoint_keys(c: &[u8], out: &mut Vec<ObjectKey>) {
    let mut r = Cursor(c.get(6..).unwrap_or(&[]));
    let segs = u32::from_le_bytes([r.u8(), r.u8(), r.u8(), r.u8()]);
    for _ in 0..segs.min(1 << 16) {
        r.bytes(12);
    }
    let n = u64::from_le_bytes(r.bytes(8).try_into().unwrap_or([0; 8]));
    for _ in 0..n.min(1 << 16) {
        if r.is_empty() {
            return;
        }
        r.bytes(28);
        let klen = usize::from(r.u16());
        if let Some(k) = decode_key_bytes(r.bytes(klen)) {
            out.push(k);
        }
    }
}

struct Files {
    segments: Vec<(u32, Vec<u8>)>,
    checkpoint: Option<Vec<u8>>,
    /// Keys the harness wrote, to look up besides those found in the files.
    keys: Vec<ObjectKey>,
}

fn config(c: &mut Cursor) -> DiskConfig {
    DiskConfig {
        capacity_bytes: 512 + u64::from(c.u16()) * 4,
        segment_bytes: 256 + u64::from(c.u16() % 8192),
        fsync: FsyncPolicy::Never,
        compression: CompressionPolicy {
            enabled: c.u8() & 1 == 0,
            level: 1,
        },
    }
}

/// A payload: compressible bf16-like values, a zero run, or input bytes repeated.
fn payload(c: &mut Cursor, len: usize, kind: u8) -> Vec<u8> {
    match kind % 3 {
        0 => {
            let seed = c.u8();
            (0..len)
                .map(|i| {
                    if i % 2 == 1 {
                        0x3f
                    } else {
                        (i as u8).wrapping_mul(seed)
                    }
                })
                .collect()
        }
        1 => vec![c.u8(); len],
        _ => {
            let src = c.bytes(64).to_vec();
            if src.is_empty() {
                vec![0; len]
            } else {
                src.iter().copied().cycle().take(len).collect()
            }
        }
    }
}

fn take_files(storage: &Arc<MemStorage>) -> Vec<(u32, Vec<u8>)> {
    storage
        .segments()
        .unwrap()
        .into_iter()
        .map(|id| {
            let f = storage.open(id).unwrap();
            (id, f.read(0, f.len()).unwrap().to_vec())
        })
        .collect()
}

/// Generated mode: write real records, then damage the files.
fn generate(c: &mut Cursor) -> Files {
    let storage = Arc::new(MemStorage::default());
    let mut cfg = config(c);
    cfg.capacity_bytes = 1 << 30; // no reclaim while building
    let store = DiskStore::open(storage.clone(), cfg).expect("open empty");
    let mut keys = Vec::new();
    for _ in 0..=(c.u8() % 8) {
        let k = key(c.u8() % 6, if c.u8() & 1 == 0 { "" } else { "salt" });
        let kind = c.u8();
        let len = usize::from(c.u16() % 3000);
        let itemsize = [2u8, 1, 4][usize::from(kind / 3 % 3)];
        let raw = payload(c, len, kind);
        store.write(&k, &raw, itemsize).expect("write");
        keys.push(k);
        if c.u8() & 1 == 1 {
            store.checkpoint().expect("checkpoint");
        }
    }
    drop(store);
    // A crash that keeps only part of what was written (nothing was synced: FsyncPolicy::Never,
    // but rotation and checkpoints sync).
    let crash = c.u8();
    if crash & 1 == 1 {
        storage.crash(u64::from(crash >> 1) * 16);
    }
    let mut segments = take_files(&storage);
    let mut checkpoint = storage.read_checkpoint().unwrap();
    // Edits: (target, offset u16, xor); xor 0 truncates there instead.
    for _ in 0..(c.u8() % 8) {
        let target = c.u8();
        let offset = usize::from(c.u16());
        let x = c.u8();
        let file = if target as usize >= segments.len() {
            match checkpoint.as_mut() {
                Some(cp) => cp,
                None => continue,
            }
        } else {
            &mut segments[target as usize].1
        };
        if file.is_empty() {
            continue;
        }
        let at = offset % file.len();
        if x == 0 {
            file.truncate(at);
        } else {
            file[at] ^= x;
        }
    }
    Files {
        segments,
        checkpoint,
        keys,
    }
}

fn raw_files(c: &mut Cursor, n: usize, with_checkpoint: bool) -> Files {
    let mut take = || {
        let len = usize::from(c.u16());
        c.bytes(len).to_vec()
    };
    let segments = (0..n as u32).map(|id| (id, take())).collect();
    let checkpoint = with_checkpoint.then(take);
    Files {
        segments,
        checkpoint,
        keys: Vec::new(),
    }
}

// ------------------------------------------------------------------------------------------
// Part 2: the store over those files.

/// Every verified record with key `k` in the files, decompressed to `len` bytes.
fn verified_contents(files: &Files, k: &ObjectKey, len: usize) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    for (_, seg) in &files.segments {
        for o in 0..seg.len() {
            let Ok(h) = decode_header(&seg[o..], o as u64) else {
                continue;
            };
            if h.key != *k {
                continue;
            }
            let rest = &seg[o + h.header_len as usize..];
            let Some(p) = rest.get(..h.stored_len.min(rest.len() as u64 + 1) as usize) else {
                continue;
            };
            if verify_payload(&h, p, o as u64).is_err() {
                continue;
            }
            let mut out = vec![0; len];
            if codec::decompress(h.codec, p, &mut out).is_ok() {
                found.push(out);
            }
        }
    }
    found
}

/// Read every key the store holds; a successful read must be a verified record's bytes.
fn check_reads<S: Storage>(store: &DiskStore<S>, files: &Files, keys: &[ObjectKey]) {
    for k in keys {
        let (Some(raw_len), Some(_)) = (store.raw_len(k), store.record_len(k)) else {
            assert!(!store.contains(k));
            continue;
        };
        if raw_len > MAX_READ {
            continue;
        }
        let len = raw_len as usize;
        // A wrong-length buffer is refused and the key kept.
        let mut wrong = vec![0; len + 1];
        assert!(matches!(
            store.read(k, &mut wrong),
            Err(DiskError::Length { .. })
        ));
        assert!(store.contains(k), "a wrong-length read dropped the key");
        let mut out = vec![0; len];
        match store.read(k, &mut out) {
            Ok(_) => {
                let ok = verified_contents(files, k, len);
                assert!(
                    ok.iter().any(|v| *v == out),
                    "read of {k:?} ({len} bytes) returned bytes no verified record holds"
                );
            }
            Err(e) => {
                let _ = e.to_string();
                assert!(!store.contains(k), "a failed read ({e}) kept the key");
            }
        }
    }
}

fn run(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut c = Cursor(rest);
    let mut files = if flags & 8 != 0 {
        generate(&mut c)
    } else {
        raw_files(&mut c, 1 + usize::from(flags >> 4 & 3), flags & 2 != 0)
    };
    if flags & 1 != 0 {
        for (_, seg) in &mut files.segments {
            repair_records(seg);
        }
    }
    if flags & 4 != 0 {
        if let Some(cp) = files.checkpoint.as_mut() {
            repair_checkpoint(cp);
        }
    }

    // Part 1.
    for (_, seg) in &files.segments {
        check_reader(seg);
    }

    // Part 2.
    let storage = Arc::new(MemStorage::default());
    for (id, seg) in &files.segments {
        storage.create(*id).unwrap().append(&[seg]).unwrap();
    }
    if let Some(cp) = &files.checkpoint {
        storage.write_checkpoint(cp).unwrap();
    }
    let mut keys: Vec<ObjectKey> = files.keys.clone();
    for (_, seg) in &files.segments {
        for o in 0..seg.len() {
            if let Ok(h) = decode_header(&seg[o..], 0) {
                keys.push(h.key);
            }
        }
    }
    if let Some(cp) = &files.checkpoint {
        checkpoint_keys(cp, &mut keys);
    }
    let mut seen = HashSet::new();
    keys.retain(|k| seen.insert(k.clone()));

    let cfg = config(&mut c);
    let Ok(store) = DiskStore::open(storage.clone(), cfg) else {
        return;
    };
    let _ = store.stats();
    check_reads(&store, &files, &keys);

    // The recovered store keeps working: pin some keys, write new records under a small
    // budget (reclaim moves pinned records forward), read everything back.
    for k in keys.iter().take(usize::from(c.u8() % 4)) {
        store.pin(k);
    }
    let mut written = Vec::new();
    for i in 0..(c.u8() % 6) {
        let k = key(100 + i, "after");
        let kind = c.u8();
        let len = usize::from(c.u16() % 2048);
        let raw = payload(&mut c, len, kind);
        if store.contains(&k) {
            continue; // the files already hold this key
        }
        match store.write(&k, &raw, 2) {
            Ok(()) => written.push((k, raw)),
            Err(DiskError::Full { .. }) => {}
            Err(e) => panic!("write after recovery failed: {e}"),
        }
    }
    for (k, raw) in &written {
        if !store.contains(k) {
            continue; // reclaimed
        }
        let mut out = vec![0; raw.len()];
        store
            .read(k, &mut out)
            .unwrap_or_else(|e| panic!("fresh record {k:?} unreadable: {e}"));
        assert_eq!(&out, raw);
    }
    let _ = store.checkpoint();
    let current = take_files(&storage);
    let files_now = Files {
        segments: current,
        checkpoint: None,
        keys: Vec::new(),
    };
    check_reads(&store, &files_now, &keys);
}

fuzz_target!(|data: &[u8]| run(data));
