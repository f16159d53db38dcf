//! The version 2 record (a sealed record: docs/FORMATS.md), pinned by files that an encoder
//! independent of this crate wrote from the documentation with Python's `cryptography`
//! (tests/fixtures/format-v2/make_fixtures.py): AES-256-GCM under HKDF-SHA256 per-salt keys,
//! the documented associated data, and a version 1 record in the same segment. Likewise the
//! sealed window manifest and session journal (version 2 of each,
//! tests/fixtures/format-v2-metadata/make_fixtures.py).

use std::path::{Path, PathBuf};

use connector_protocol::{ChunkHash, ObjectKey};
use cwm::store::codec::{Codec, CompressionPolicy};
use cwm::store::disk::storage::FsStorage;
use cwm::store::disk::{DiskConfig, DiskError, DiskStore, FsyncPolicy};
use cwm::store::record::{self, Record};
use cwm::store::seal::{SealError, Sealer, ServerKey};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v2")
}

struct Object {
    name: String,
    key: ObjectKey,
    codec: Codec,
    itemsize: u8,
    raw: Vec<u8>,
    nonce: Option<[u8; 12]>,
    offset: usize,
    record_len: usize,
}

fn objects() -> Vec<Object> {
    let text = std::fs::read_to_string(fixtures().join("objects.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let s = |v: &Value| v.as_str().expect("a string").to_string();
    let n = |v: &Value| v.as_u64().expect("an integer");
    doc["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let k = &o["key"];
            Object {
                name: s(&o["name"]),
                key: ObjectKey {
                    model: s(&k["model"]).into(),
                    kv_rank: n(&k["kv_rank"]) as u32,
                    object_group: n(&k["object_group"]) as u32,
                    chunk_hash: ChunkHash::from_hex(&s(&k["chunk_hash"])).unwrap(),
                    cache_salt: s(&k["cache_salt"]).into(),
                },
                codec: Codec::from_code(n(&o["codec"]) as u8).unwrap(),
                itemsize: n(&o["itemsize"]) as u8,
                raw: hex::decode(s(&o["raw"])).unwrap(),
                nonce: o["nonce"]
                    .as_str()
                    .map(|h| hex::decode(h).unwrap().try_into().unwrap()),
                offset: n(&o["offset"]) as usize,
                record_len: n(&o["record_len"]) as usize,
            }
        })
        .collect()
}

/// The fixture's server key (a test key, committed; not loaded through `ServerKey::load`,
/// which would refuse the file's checked-out mode).
fn fixture_key() -> ServerKey {
    let text = std::fs::read_to_string(fixtures().join("key.hex")).unwrap();
    let bytes: [u8; 32] = hex::decode(text.trim()).unwrap().try_into().unwrap();
    ServerKey::from_bytes(bytes)
}

fn segment() -> Vec<u8> {
    std::fs::read(fixtures().join("l2/seg-00000000.cwm")).unwrap()
}

fn decode(sealer: &Sealer, bytes: &[u8]) -> Result<Vec<u8>, SealError> {
    let r = Record::parse(bytes, 0).expect("checksums verify without the key");
    let mut out = vec![0xAA; r.header.raw_len as usize];
    sealer.decode_into(&r, &mut out).map(|()| out)
}

#[test]
fn sealed_records_open_with_the_fixture_key_and_no_other() {
    let seg = segment();
    let (sealer, other, none) = (
        Sealer::new(Some(fixture_key())),
        Sealer::new(Some(ServerKey::from_bytes([0x41; 32]))),
        Sealer::default(),
    );
    for o in objects() {
        let bytes = &seg[o.offset..o.offset + o.record_len];
        let h = record::decode_header(bytes, 0).unwrap();
        assert_eq!(
            (&h.key, h.codec, h.itemsize, h.raw_len, h.sealed),
            (
                &o.key,
                o.codec,
                o.itemsize,
                o.raw.len() as u64,
                o.nonce.is_some()
            ),
            "{}: header",
            o.name
        );
        assert!(decode(&sealer, bytes).unwrap() == o.raw, "{}", o.name);
        if o.nonce.is_some() {
            assert!(
                matches!(decode(&other, bytes), Err(SealError::WrongKey { .. })),
                "{}: another key",
                o.name
            );
            assert!(
                matches!(decode(&none, bytes), Err(SealError::NoKey { .. })),
                "{}: no key",
                o.name
            );
        } else {
            // Version 1: readable whatever the key.
            assert!(decode(&other, bytes).unwrap() == o.raw, "{}", o.name);
            assert!(decode(&none, bytes).unwrap() == o.raw, "{}", o.name);
        }
    }
    assert_eq!(other.stats().unopened_wrong_key, 4);
    assert_eq!(none.stats().unopened_no_key, 4);
}

#[test]
fn sealing_with_the_fixture_nonce_reproduces_the_fixture_bytes() {
    let seg = segment();
    let sealer = Sealer::new(Some(fixture_key()));
    for o in objects() {
        let Some(nonce) = o.nonce else { continue };
        // The fixture's zstd frame is the CLI's: compare the header layout and the raw codec.
        if o.codec != Codec::Raw {
            continue;
        }
        let encoded = sealer
            .encode_with_nonce(
                &o.key,
                &o.raw,
                o.itemsize,
                CompressionPolicy::DISABLED,
                nonce,
            )
            .unwrap();
        assert!(
            encoded == seg[o.offset..o.offset + o.record_len],
            "{}: the sealed record differs from the fixture",
            o.name
        );
    }
}

#[test]
fn an_l2_directory_of_sealed_records_serves_them_with_the_key_only() {
    let open = |sealer: Sealer| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            fixtures().join("l2/seg-00000000.cwm"),
            dir.path().join("seg-00000000.cwm"),
        )
        .unwrap();
        let disk = DiskStore::open(
            FsStorage::open(dir.path()).unwrap(),
            DiskConfig {
                capacity_bytes: 1 << 30,
                segment_bytes: 1 << 20,
                fsync: FsyncPolicy::Never,
                compression: CompressionPolicy::default(),
            },
        )
        .expect("the fixture directory opens (no key needed to scan)")
        .sealed_with(sealer);
        (dir, disk)
    };
    let objects = objects();
    let (_dir, disk) = open(Sealer::new(Some(fixture_key())));
    assert_eq!(disk.occupancy().records, objects.len());
    for o in &objects {
        let mut out = vec![0; o.raw.len()];
        assert_eq!(disk.read(&o.key, &mut out).unwrap(), o.itemsize);
        assert!(out == o.raw, "{}: bytes differ", o.name);
        // Verbatim records (window exports) stay sealed.
        let verbatim = disk.read_record(&o.key).unwrap();
        assert_eq!(
            record::decode_header(&verbatim, 0).unwrap().sealed,
            o.nonce.is_some()
        );
    }
    let (_dir, keyless) = open(Sealer::default());
    for o in &objects {
        let mut out = vec![0; o.raw.len()];
        match keyless.read(&o.key, &mut out) {
            Ok(_) => assert!(o.nonce.is_none() && out == o.raw, "{}", o.name),
            Err(e) => {
                assert!(
                    matches!(e, DiskError::Seal(SealError::NoKey { .. })),
                    "{}: {e}",
                    o.name
                );
                assert!(e.to_string().contains("--encryption-key-file"), "{e}");
                assert!(out.iter().all(|&b| b == 0), "no bytes of a miss");
            }
        }
    }
    assert_eq!(
        keyless
            .counters
            .corrupt_records
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
}

fn metadata_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v2-metadata")
}

#[test]
fn a_sealed_manifest_and_journal_written_from_the_documentation_open_with_the_key_only() {
    use cwm::session::journal::Journal;
    use cwm::windows::catalog::Catalog;
    use std::time::{Duration, UNIX_EPOCH};
    let text = std::fs::read_to_string(metadata_fixtures().join("expected.json")).unwrap();
    let expected: Value = serde_json::from_str(&text).unwrap();
    let tokens = |v: &Value| -> Vec<u32> {
        let a = v.as_array().expect("an array");
        a.iter().map(|t| t.as_u64().unwrap() as u32).collect()
    };
    let key = || Sealer::new(Some(fixture_key()));
    let other = || Sealer::new(Some(ServerKey::from_bytes([0x41; 32])));

    // The manifest, from a copy of the fixture's directory (opening may tidy a directory).
    let dir = tempfile::tempdir().unwrap();
    let windows = dir.path().join("windows");
    std::fs::create_dir(&windows).unwrap();
    let manifest = metadata_fixtures().join("windows/trip.json");
    std::fs::copy(&manifest, windows.join("trip.json")).unwrap();
    let w = Catalog::open(&windows, key()).unwrap().get("trip").unwrap();
    let want = &expected["window"];
    assert_eq!(w.tokens, tokens(&want["tokens"]));
    assert_eq!(w.description, want["description"].as_str().unwrap());
    assert_eq!(w.tags, ["travel"]);
    assert_eq!((w.chunks(), w.data_keys().len(), w.version), (2, 4, 1));
    for sealer in [other(), Sealer::default()] {
        let c = Catalog::open(&windows, sealer.clone()).unwrap();
        assert!(c.get("trip").is_none() && c.contains("trip"));
        assert_eq!(c.unreadable().len(), 1);
        assert_eq!(sealer.stats().unopened_manifests, 1);
    }

    // The journal.
    let path = metadata_fixtures().join("sessions.journal");
    let (entries, replay) = Journal::read(&path, &key()).unwrap();
    assert_eq!((replay.unopened, replay.dropped_bytes), (0, 0));
    let want = expected["journal"].as_array().unwrap();
    assert_eq!(entries.len(), want.len());
    for (e, w) in entries.iter().zip(want) {
        assert_eq!(e.cache_salt, w["cache_salt"].as_str().unwrap());
        assert_eq!(e.world_size as u64, w["world_size"].as_u64().unwrap());
        let ms = w["updated_ms"].as_u64().unwrap();
        assert_eq!(e.updated, UNIX_EPOCH + Duration::from_millis(ms));
        let base = w["base"]
            .as_array()
            .map(|b| (b[0].as_u64().unwrap() as u8, b[1].as_u64().unwrap() as u32));
        assert_eq!(e.base, base);
        assert_eq!(e.suffix, tokens(&w["suffix"]));
    }
    for sealer in [other(), Sealer::default()] {
        let (entries, replay) = Journal::read(&path, &sealer).unwrap();
        assert!(entries.is_empty());
        assert_eq!(
            replay.unopened, 3,
            "alice's delta is skipped with her first entry"
        );
    }
}
