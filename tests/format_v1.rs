//! The v1 on-disk formats (docs/FORMATS.md), pinned by files that an encoder independent of
//! this crate wrote from the documentation (tests/fixtures/format-v1/make_fixtures.py): L2
//! segments, the index checkpoint, a window manifest and a `.cwmx` export, with records of
//! every codec. Every later build must read them; a format change adds a version and its own
//! fixtures beside these, never rewrites them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use connector_protocol::{ChunkHash, ObjectKey};
use cwm::config::Config;
use cwm::store::codec::{Codec, CompressionPolicy};
use cwm::store::disk::checkpoint;
use cwm::store::disk::storage::FsStorage;
use cwm::store::disk::{DiskConfig, DiskStore, FsyncPolicy, Location};
use cwm::store::record::{self, Record};
use cwm::windows::export::WindowFile;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v1")
}

/// One stored object as the fixture maker describes it in objects.json.
struct Object {
    name: String,
    key: ObjectKey,
    codec: Codec,
    itemsize: u8,
    raw: Vec<u8>,
    segment: u32,
    offset: u64,
    record_len: u64,
}

fn objects() -> Vec<Object> {
    let text = std::fs::read_to_string(fixtures().join("objects.json")).expect("objects.json");
    let doc: Value = serde_json::from_str(&text).expect("objects.json parses");
    let str_of = |v: &Value| v.as_str().expect("a string").to_string();
    let int_of = |v: &Value| v.as_u64().expect("an integer");
    doc["objects"]
        .as_array()
        .expect("an objects list")
        .iter()
        .map(|o| {
            let k = &o["key"];
            Object {
                name: str_of(&o["name"]),
                key: ObjectKey {
                    model: str_of(&k["model"]).into(),
                    kv_rank: int_of(&k["kv_rank"]) as u32,
                    object_group: int_of(&k["object_group"]) as u32,
                    chunk_hash: ChunkHash::from_hex(&str_of(&k["chunk_hash"]))
                        .expect("64 hex digits"),
                    cache_salt: str_of(&k["cache_salt"]).into(),
                },
                codec: Codec::from_code(int_of(&o["codec"]) as u8).expect("a known codec"),
                itemsize: int_of(&o["itemsize"]) as u8,
                raw: hex::decode(str_of(&o["raw"])).expect("hex"),
                segment: int_of(&o["segment"]) as u32,
                offset: int_of(&o["offset"]),
                record_len: int_of(&o["record_len"]),
            }
        })
        .collect()
}

fn segment(id: u32) -> Vec<u8> {
    std::fs::read(fixtures().join(format!("l2/seg-{id:08}.cwm"))).expect("segment fixture")
}

fn record_of(o: &Object) -> Vec<u8> {
    let seg = segment(o.segment);
    seg[o.offset as usize..(o.offset + o.record_len) as usize].to_vec()
}

/// A copy of the fixture L2 directory (opening one takes its lock and may write to it).
fn l2_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("l2"), dir.path());
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A data directory opened the way `cwm windows` opens one.
fn open_offline(dir: &Path) -> cwm::windows::Windows {
    let config = Config {
        l2_path: dir.to_path_buf(),
        l2_size_gb: 1.0,
        ..Config::default()
    };
    cwm::serve::open_offline(&config).expect("the data directory opens")
}

#[test]
fn the_fixtures_cover_every_codec_and_plane_layout() {
    let objects = objects();
    for codec in [Codec::Raw, Codec::Zstd, Codec::ZstdPlanes] {
        assert!(
            objects.iter().any(|o| o.codec == codec),
            "no fixture of {codec:?}"
        );
    }
    // Codec 2's flags byte: plane H zstd (bit 0), plane L zstd (bit 1); all four occur.
    let mut flags: Vec<u8> = objects
        .iter()
        .filter(|o| o.codec == Codec::ZstdPlanes)
        .map(|o| {
            let r = record_of(o);
            let h = record::decode_header(&r, 0).unwrap();
            r[h.header_len as usize]
        })
        .collect();
    flags.sort();
    assert_eq!(flags, [0, 1, 2, 3]);
}

#[test]
fn segments_hold_the_documented_records() {
    let objects = objects();
    for id in [0, 1] {
        let seg = segment(id);
        let here: Vec<&Object> = objects.iter().filter(|o| o.segment == id).collect();
        let mut at = 0u64;
        for o in &here {
            assert_eq!(at, o.offset, "{}: record offset", o.name);
            let r = Record::parse(&seg[at as usize..(at + o.record_len) as usize], at)
                .unwrap_or_else(|e| panic!("{}: {e}", o.name));
            let h = &r.header;
            assert_eq!(h.key, o.key, "{}: key", o.name);
            assert_eq!(
                (h.codec, h.itemsize, h.raw_len, h.record_len()),
                (o.codec, o.itemsize, o.raw.len() as u64, o.record_len),
                "{}: codec, itemsize, raw and record length",
                o.name
            );
            let mut out = vec![0xAA; o.raw.len()];
            r.decode_into(&mut out)
                .unwrap_or_else(|e| panic!("{}: {e}", o.name));
            assert!(out == o.raw, "{}: decoded bytes differ", o.name);
            at += o.record_len;
        }
        assert_eq!(
            at,
            seg.len() as u64,
            "segment {id} has bytes past its records"
        );
    }
}

#[test]
fn encoding_reproduces_the_fixture_bytes() {
    for o in objects() {
        let fixture = record_of(&o);
        let h = record::decode_header(&fixture, 0).unwrap();
        let payload = &fixture[h.header_len as usize..];
        // The header of any codec, given the same payload.
        let header =
            record::encode_header(&o.key, o.codec, o.itemsize, o.raw.len() as u64, payload);
        assert!(
            header == fixture[..h.header_len as usize],
            "{}: the encoded header differs from the fixture",
            o.name
        );
        // A raw record, whole: what cwm writes with compression off.
        if o.codec == Codec::Raw {
            let encoded = record::encode(&o.key, &o.raw, o.itemsize, CompressionPolicy::DISABLED);
            assert!(encoded == fixture, "{}: the encoded record differs", o.name);
        }
    }
}

#[test]
fn the_checkpoint_lists_segment_zero() {
    let bytes = std::fs::read(fixtures().join("l2/index.ckpt")).unwrap();
    let c = checkpoint::decode(&bytes).expect("the checkpoint decodes");
    let seg0 = segment(0).len() as u64;
    assert_eq!(c.scanned, HashMap::from([(0, seg0)]));
    let mut want: Vec<(ObjectKey, Location)> = objects()
        .into_iter()
        .filter(|o| o.segment == 0)
        .map(|o| {
            let loc = Location {
                segment: 0,
                offset: o.offset,
                record_len: o.record_len,
                raw_len: o.raw.len() as u64,
            };
            (o.key, loc)
        })
        .collect();
    let mut got = c.entries.clone();
    want.sort_by_key(|(_, l)| l.offset);
    got.sort_by_key(|(_, l)| l.offset);
    assert_eq!(got, want);
    // Encoding what was decoded gives the same bytes (one segment, entries in file order).
    let index: HashMap<ObjectKey, Location> = c.entries.iter().cloned().collect();
    let again = checkpoint::decode(&checkpoint::encode(&index, &c.scanned)).unwrap();
    let mut again_entries = again.entries;
    again_entries.sort_by_key(|(_, l)| l.offset);
    assert_eq!((again.scanned, again_entries), (c.scanned, got));
}

#[test]
fn an_l2_directory_opens_and_serves_every_object() {
    let dir = l2_copy();
    let disk = DiskStore::open(
        FsStorage::open(dir.path()).unwrap(),
        DiskConfig {
            capacity_bytes: 1 << 30,
            segment_bytes: 1 << 20,
            fsync: FsyncPolicy::Never,
            compression: CompressionPolicy::default(),
        },
    )
    .expect("the fixture directory opens");
    let objects = objects();
    let stats = disk.occupancy();
    assert_eq!((stats.records, stats.segments), (objects.len(), 2));
    for o in &objects {
        let mut out = vec![0xAA; o.raw.len()];
        let itemsize = disk
            .read(&o.key, &mut out)
            .unwrap_or_else(|e| panic!("{}: {e}", o.name));
        assert_eq!(itemsize, o.itemsize, "{}: itemsize", o.name);
        assert!(out == o.raw, "{}: bytes differ", o.name);
        assert!(
            disk.read_record(&o.key).unwrap() == record_of(o),
            "{}: record",
            o.name
        );
    }
    assert_eq!(
        disk.counters
            .corrupt_records
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

fn trip_objects() -> Vec<Object> {
    objects()
        .into_iter()
        .filter(|o| o.name.starts_with("trip "))
        .collect()
}

#[test]
fn the_window_manifest_loads_and_exports_to_the_fixture_file() {
    let dir = l2_copy();
    let windows = open_offline(dir.path());
    let w = windows.get("trip").expect("window trip is in the catalog");
    assert_eq!(
        (w.model.as_str(), w.world_size, w.chunk_size, w.chunks()),
        ("fixture/Model-1B", 2, 4, 2)
    );
    assert_eq!(w.tokens, (101..109).collect::<Vec<u32>>());
    assert_eq!(
        (
            w.source_session.as_str(),
            w.session_id.as_str(),
            w.data_salt.as_str()
        ),
        ("chat-7", "trip-session", "trip-data")
    );
    assert_eq!(
        (w.created_at, w.last_thawed_at, w.fleet),
        (1765000000, None, false)
    );
    let trip = trip_objects();
    let keys: Vec<ObjectKey> = trip.iter().map(|o| o.key.clone()).collect();
    assert_eq!(
        w.data_keys(),
        keys,
        "the manifest names the records in order"
    );
    assert_eq!(
        (w.raw_bytes, w.stored_bytes),
        (
            trip.iter().map(|o| o.raw.len() as u64).sum(),
            trip.iter().map(|o| o.record_len).sum()
        )
    );
    for k in &keys {
        assert!(windows.cwm.tiers.durable(k), "{k:?} is in L2");
    }
    // An export copies records verbatim and writes the manifest as read: the fixture's bytes.
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("trip.cwmx");
    windows.export("trip", &path).expect("export");
    let fixture = std::fs::read(fixtures().join("trip.cwmx")).unwrap();
    assert!(
        std::fs::read(&path).unwrap() == fixture,
        "the export differs from the fixture trip.cwmx"
    );
}

#[test]
fn the_export_imports_into_an_empty_directory() {
    let file = WindowFile::read(&fixtures().join("trip.cwmx"), Some("trip.imported"))
        .expect("the fixture export verifies");
    let dir = tempfile::tempdir().unwrap();
    let windows = open_offline(dir.path());
    let summary = windows.import(&file).expect("import");
    assert_eq!(summary.name, "trip.imported");
    let w = windows.get("trip.imported").unwrap();
    let trip = trip_objects();
    assert_eq!(
        w.data_keys(),
        trip.iter().map(|o| o.key.clone()).collect::<Vec<_>>()
    );
    for o in &trip {
        let stored = windows
            .cwm
            .tiers
            .export_record(&o.key)
            .expect("record in L2");
        assert!(
            stored == record_of(o),
            "{}: imported record differs",
            o.name
        );
    }
}
