//! No decoder reserves memory in proportion to a count it read from the wire: whatever an
//! array or map header claims, the largest single allocation while decoding a frame stays
//! within the frame's own size (plus serde's fixed 1 MiB cap on a size hint). A frame whose
//! descriptor array claimed as many elements as it had bytes used to reserve 264 bytes per
//! claimed element (a 100 MB frame asked for 27 GB and aborted the server).
//!
//! The largest allocation is measured per thread by a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use connector_protocol::codec;
use connector_protocol::ipc::decode_descriptor_list;
use connector_protocol::*;
use proptest::prelude::*;

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every method forwards to the system allocator with the caller's arguments
// unchanged, so it keeps GlobalAlloc's contract; `note` only records a size (it never
// allocates: the thread-local is a const-initialized Cell).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's layout, passed on (GlobalAlloc::alloc's contract).
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` came from this allocator, i.e. from System, with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as in `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// What the decoders may reserve beyond the frame's size: serde's cautious size hint (1 MiB).
const SLACK: usize = 1 << 20;

/// The largest single allocation while `f` runs on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|m| m.set(0));
    f();
    LARGEST.with(|m| m.get())
}

/// Every payload decoder the server runs on an incoming frame.
fn decode_with_every_decoder(frame: &[u8]) {
    let _ = decode_descriptor_list(frame);
    let _ = codec::decode_block_ids(frame);
    let _ = codec::decode::<IpcCacheServerKey>("key", frame);
    let _ = codec::decode::<LayoutHints>("layout_hints", frame);
    let _ = codec::decode::<Vec<EngineGroupInfo>>("engine_group_infos", frame);
    let _ = codec::decode::<Vec<BlockAllocationRecord>>("records", frame);
    let _ = codec::decode::<RegisterEngineDrivenContextPayload>("payload", frame);
    let _ = TransferResult::decode(frame);
}

fn assert_bounded(frame: &[u8], what: &str) {
    let largest = largest_allocation(|| decode_with_every_decoder(frame));
    assert!(
        largest <= frame.len() + SLACK,
        "{what}: a {}-byte frame made a decoder allocate {largest} bytes at once",
        frame.len()
    );
}

/// A msgpack array32 or map32 header claiming `n` elements.
fn header32(marker: u8, n: usize) -> Vec<u8> {
    let mut f = vec![marker];
    f.extend_from_slice(&(n as u32).to_be_bytes());
    f
}

/// `count` bytes after a header claiming exactly that many elements (the most `array_len`
/// lets through): the reproduction of the 27 GB reservation, at 4 MiB.
#[test]
fn a_descriptor_array_claiming_one_element_per_byte_reserves_no_more_than_the_frame() {
    let count = 4 << 20;
    let mut frame = header32(0xdd, count);
    frame.extend(std::iter::repeat_n(0xc0, count));
    assert_bounded(&frame, "array32 of nils");
    // The same inside a descriptor: an ext holding a map that claims half as many entries as
    // it has bytes (each entry needs two).
    let mut map = header32(0xdf, count / 2);
    map.extend(std::iter::repeat_n(0xc0, count));
    let mut frame = vec![0x91, 0xc9];
    frame.extend_from_slice(&(map.len() as u32).to_be_bytes());
    frame.push(1);
    frame.extend_from_slice(&map);
    assert_bounded(&frame, "descriptor map32 of nils");
}

#[test]
fn block_ids_refuse_more_groups_than_any_engine_has() {
    let n = codec::MAX_KV_GROUPS + 1;
    let mut frame = header32(0xdd, n);
    frame.extend(std::iter::repeat_n(0x90, n));
    let e = codec::decode_block_ids(&frame).unwrap_err().to_string();
    assert!(e.contains("KV cache groups"), "{e}");
    let mut frame = header32(0xdd, codec::MAX_KV_GROUPS);
    frame.extend(std::iter::repeat_n(0x90, codec::MAX_KV_GROUPS));
    assert_eq!(codec::decode_block_ids(&frame).unwrap().len(), 1024);
}

#[test]
fn descriptor_lists_refuse_more_tensors_than_any_model_has() {
    let n = ipc::MAX_KV_TENSORS + 1;
    let mut frame = header32(0xdd, n);
    // Each element a minimal ext (fixext1) so the count passes the bytes-left check.
    for _ in 0..n {
        frame.extend_from_slice(&[0xd4, 1, 0xc0]);
    }
    let e = decode_descriptor_list(&frame).unwrap_err().to_string();
    assert!(e.contains("tensors"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any container header (array16/32, map16/32, at the top or one level down) with any
    /// claimed count, followed by any bytes.
    #[test]
    fn no_claimed_count_reserves_more_than_the_frame(
        outer in prop::sample::select(vec![0xdcu8, 0xdd, 0xde, 0xdf, 0x91, 0x81]),
        inner in prop::sample::select(vec![0xdcu8, 0xdd, 0xde, 0xdf]),
        claimed in any::<u32>(),
        fill in prop::sample::select(vec![0x00u8, 0x90, 0xc0, 0xa0, 0x80]),
        len in 0usize..(256 << 10),
    ) {
        let mut frame = vec![outer];
        if matches!(outer, 0xdc | 0xde) {
            frame.extend_from_slice(&(claimed as u16).to_be_bytes());
        } else if matches!(outer, 0xdd | 0xdf) {
            frame.extend_from_slice(&claimed.to_be_bytes());
        } else {
            // fixarray/fixmap of one: the claimed count sits one level down.
            if outer == 0x81 {
                frame.extend_from_slice(&[0xa6, b's', b'h', b'a', b'p', b'e']);
            }
            frame.push(inner);
            frame.extend_from_slice(&claimed.to_be_bytes()[..if matches!(inner, 0xdc | 0xde) { 2 } else { 4 }]);
        }
        frame.extend(std::iter::repeat_n(fill, len));
        let largest = largest_allocation(|| decode_with_every_decoder(&frame));
        prop_assert!(
            largest <= frame.len() + SLACK,
            "a {}-byte frame made a decoder allocate {} bytes at once", frame.len(), largest
        );
    }
}

/// The fuzz seeds (`fuzz/seeds/`, the hostile `*claims_one_*` entries among them) replayed
/// through every decoder with the same bound, so the corpus runs without cargo-fuzz too.
#[test]
fn the_fuzz_seeds_decode_within_the_bound() {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let mut hostile = 0;
    for target in ["descriptor_list", "frame_decoder"] {
        let dir = seeds.join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}"));
        for entry in entries {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            hostile += usize::from(path.to_string_lossy().contains("claims_one_"));
            // frame_decoder inputs are frames of a little-endian u16 length and the bytes (a
            // length past the end takes the rest).
            let frames: Vec<&[u8]> = if target == "frame_decoder" {
                let (mut rest, mut frames) = (&input[..], Vec::new());
                while rest.len() >= 2 {
                    let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
                    let (frame, tail) = rest[2..].split_at(len.min(rest.len() - 2));
                    frames.push(frame);
                    rest = tail;
                }
                frames
            } else {
                vec![&input[..]]
            };
            for frame in frames {
                assert_bounded(frame, &path.display().to_string());
            }
        }
    }
    assert_eq!(hostile, 4, "the hostile seeds are missing from {seeds:?}");
}
