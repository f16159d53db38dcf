//! The GPU path end to end through the CUDA driver stand-in (`tests/cuda-sim/libcuda.c`): a real
//! `cwm serve` process loads the stand-in as `libcuda.so`, and this test plays the engine. It
//! registers `cuda` and `cuda_raw` descriptors (encoded as LMCache 0.5.6 encodes them; the
//! interop suite checks the encoding against LMCache's own types), stores, looks up, retrieves
//! into other blocks and compares bytes, then unregisters (or lets the reaper drop the worker)
//! and checks every mapping was closed.
//!
//! The stand-in proves call sequences and byte placement, not GPU speed. It counts a violation
//! when cwm touches engine memory before the engine's event fired, copies outside a mapping,
//! opens an allocation twice or destroys an exported event before it completed; every test
//! checks there were none. A lookup that sees a chunk while its copy is still queued fails
//! `lookups_never_see_a_chunk_before_its_copy_completed`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use connector_protocol::ipc::encode_descriptor_list;
use connector_protocol::{
    CudaStorageHandle, EngineGroupInfo, IpcCacheServerKey, IpcDescriptor, TensorMetadata,
};
use cwm::client::MpClient;
use cwm::engine_mem::shm::ShmSegment;

mod common;
use common::{free_port, lookup_hits, tokens};

const MODEL: &str = "sim-model";
const UUID0: [u8; 16] = [
    0x3f, 0x2a, 0x9c, 0x1e, 0x0b, 0x7d, 0x4e, 0x5f, 0x8a, 0x6b, 0x1c, 0x2d, 0x3e, 0x4f, 0x5a, 0x6b,
];
const UUID0_STR: &str = "3f2a9c1e-0b7d-4e5f-8a6b-1c2d3e4f5a6b";
const UUID1: [u8; 16] = [0x11; 16];
const UUID1_STR: &str = "11111111-1111-1111-1111-111111111111";
/// L1 of the sidecars here, and the pinned-piece size (so copies cross piece boundaries).
const L1_BYTES: u64 = 64 << 20;
const PIECE: u64 = 16 << 20;

static NEXT: AtomicU64 = AtomicU64::new(0);

fn uniq(what: &str) -> String {
    format!(
        "/cwmsim_{what}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Build the stand-in once per test run (gcc is the only requirement).
fn sim_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda-sim/libcuda.c");
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cuda-sim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lib = dir.join("libcuda.so.1");
        let out = Command::new("gcc")
            .args(["-shared", "-fPIC", "-O1", "-Wall", "-o"])
            .arg(&lib)
            .arg(&src)
            .args(["-pthread", "-lrt"])
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run gcc to build the CUDA stand-in ({e}): install gcc")
            });
        assert!(
            out.status.success(),
            "building the CUDA stand-in failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::os::unix::fs::symlink("libcuda.so.1", dir.join("libcuda.so")).unwrap();
        dir
    })
}

fn now_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a live timespec the call fills.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The stand-in's shared state (`struct sim_state` in libcuda.c; offsets mirrored here).
struct Sim {
    seg: ShmSegment,
}

mod off {
    pub const DRIVER_VERSION: usize = 8;
    pub const NUM_DEVICES: usize = 16;
    pub const UUIDS: usize = 24;
    pub const COPY_DELAY_US: usize = 88;
    pub const ENGINE_BUSY_UNTIL: usize = 104;
    pub const VIOLATIONS: usize = 112;
    pub const OPEN_MAPPINGS: usize = 120;
    pub const OPENS: usize = 128;
    pub const PINNED_BYTES: usize = 144;
    pub const HOST_REGISTERS: usize = 152;
    pub const PAGEABLE_COPIES: usize = 160;
    pub const COPIES_DONE: usize = 168;
    pub const COPIES_PENDING: usize = 176;
    pub const BATCH_CALLS: usize = 184;
    pub const ENGINE_WAITS: usize = 192;
    pub const INJECT_CODE: usize = 208;
    pub const INJECT_COUNT: usize = 216;
    pub const INJECT_FN: usize = 224;
    pub const VIOLATION: usize = 288;
    pub const MAX_BATCH: usize = 8736;
    pub const BLOCKING_WAITS: usize = 8744;
    pub const CTX_RETAINS: usize = 8752;
    pub const CTX_FLAGS: usize = 8784;
    pub const BATCH_MAX_SEEN: usize = 8816;
    pub const PAGEABLE_BLOCKING: usize = 8824;
    pub const PIN_HOLD: usize = 8832;
    pub const PIN_WAITING: usize = 8840;
    pub const EVENT_OPENS: usize = 8848;
    pub const DEAD_OWNER_EVENTS: usize = 8856;
    pub const SIZE: u64 = 8864;
}

/// cwm's documented cap on copies per `cuMemcpyBatchAsync` call; the stand-in refuses more.
const CWM_MAX_BATCH: u64 = 1024;

impl Sim {
    fn new(driver_version: u64) -> Sim {
        let seg = ShmSegment::create(&uniq("state"), off::SIZE).unwrap();
        let sim = Sim { seg };
        // SAFETY: the magic and both UUIDs land at their offsets inside the SIZE-byte state
        // segment, created just above; the stand-in library has not opened it yet.
        unsafe {
            std::ptr::copy_nonoverlapping(b"CWMCUSIM".as_ptr(), sim.seg.as_mut_ptr(), 8);
            std::ptr::copy_nonoverlapping(UUID0.as_ptr(), sim.seg.as_mut_ptr().add(off::UUIDS), 16);
            std::ptr::copy_nonoverlapping(
                UUID1.as_ptr(),
                sim.seg.as_mut_ptr().add(off::UUIDS + 16),
                16,
            );
        }
        sim.set(off::DRIVER_VERSION, driver_version);
        sim.set(off::NUM_DEVICES, 2);
        sim.set(off::MAX_BATCH, CWM_MAX_BATCH);
        sim
    }

    fn word(&self, at: usize) -> &AtomicU64 {
        // SAFETY: callers pass the `off` constants: 8-aligned offsets inside the segment
        // (page-aligned), which lives as long as `&self`; the stand-in only touches these
        // words atomically.
        unsafe { &*(self.seg.as_mut_ptr().add(at) as *const AtomicU64) }
    }

    fn get(&self, at: usize) -> u64 {
        self.word(at).load(Ordering::SeqCst)
    }

    fn set(&self, at: usize, v: u64) {
        self.word(at).store(v, Ordering::SeqCst)
    }

    /// Make the next `count` calls of `func` fail with CUDA error `code`.
    fn inject(&self, func: &str, code: u64, count: u64) {
        // SAFETY: the 64-byte name field at INJECT_FN lies inside the segment; test names are
        // shorter than 64 bytes, so the copy stays in it and leaves a NUL.
        unsafe {
            let p = self.seg.as_mut_ptr().add(off::INJECT_FN);
            std::ptr::write_bytes(p, 0, 64);
            std::ptr::copy_nonoverlapping(func.as_ptr(), p, func.len());
        }
        self.set(off::INJECT_CODE, code);
        self.set(off::INJECT_COUNT, count);
    }

    /// An engine event that fires `delay` from now; engine memory is "being written" until then.
    fn engine_event(&self, delay: Duration) -> Vec<u8> {
        let fire = now_ns() + delay.as_nanos() as u64;
        self.set(off::ENGINE_BUSY_UNTIL, fire);
        let mut h = vec![0u8; 64];
        h[..8].copy_from_slice(b"CWMSIMEV");
        h[8..16].copy_from_slice(&fire.to_ne_bytes());
        h
    }

    /// An engine event of process `owner` that fires `delay` from now, unless `owner` exits
    /// first (then it never fires, and it cannot be opened any more).
    fn owned_engine_event(&self, delay: Duration, owner: u32) -> Vec<u8> {
        let mut h = self.engine_event(delay);
        h[16..20].copy_from_slice(&owner.to_ne_bytes());
        h
    }

    /// An engine event that never fires: the engine died or stalls after sending it.
    fn dead_engine_event(&self) -> Vec<u8> {
        self.set(off::ENGINE_BUSY_UNTIL, u64::MAX);
        let mut h = vec![0u8; 64];
        h[..8].copy_from_slice(b"CWMSIMEV");
        h[8..16].copy_from_slice(&u64::MAX.to_ne_bytes());
        h
    }

    /// The reply's event: cwm synchronized before replying, so it is empty (LMCache's client
    /// then imports nothing, and no exported event can be destroyed before it is imported).
    fn assert_no_event(&self, handle: &[u8]) {
        assert!(
            handle.is_empty(),
            "cwm replied with a {}-byte event handle although its copies completed",
            handle.len()
        );
    }

    fn assert_clean(&self) {
        // SAFETY: the stand-in writes a NUL-terminated message into the zeroed VIOLATION field,
        // which lies inside the live segment.
        let msg = unsafe {
            std::ffi::CStr::from_ptr(self.seg.as_mut_ptr().add(off::VIOLATION) as *const _)
        };
        assert_eq!(
            self.get(off::VIOLATIONS),
            0,
            "the CUDA stand-in saw a violation: {}",
            msg.to_string_lossy()
        );
    }

    fn wait_for(&self, at: usize, want: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.get(at) != want {
            assert!(
                Instant::now() < deadline,
                "{what}: {} != {want}",
                self.get(at)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A `cwm serve` process that loads the stand-in as its CUDA driver.
struct Server {
    child: Child,
    endpoint: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(sim: Option<&Sim>, extra: &[&str]) -> Server {
        Server::start_env(sim, extra, &[])
    }

    fn start_env(sim: Option<&Sim>, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("cwm.log");
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cwm"));
        cmd.args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()]);
        if !extra.contains(&"--l1-size-gb") {
            cmd.args([
                "--l1-size-gb",
                &(L1_BYTES as f64 / (1u64 << 30) as f64).to_string(),
            ]);
        }
        cmd.args([
            "--l2-size-gb",
            "0",
            "--http-port",
            "0",
            "--no-engine-driven",
        ])
        .args(extra)
        .env("CWM_LOG", "info")
        .env(cwm::ops::PIN_PIECE_ENV, PIECE.to_string())
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
        match sim {
            Some(sim) => {
                cmd.env("LD_LIBRARY_PATH", sim_dir())
                    .env("CWM_CUDA_SIM", sim.seg.name());
            }
            None => {
                cmd.env("LD_LIBRARY_PATH", dir.path())
                    .env_remove("CWM_CUDA_SIM");
            }
        }
        let child = cmd.spawn().unwrap();
        let endpoint = format!("tcp://127.0.0.1:{port}");
        let mut c = MpClient::connect(&endpoint).unwrap();
        c.get_chunk_size().unwrap();
        Server {
            child,
            endpoint,
            log,
            _dir: dir,
        }
    }

    fn client(&self) -> MpClient {
        MpClient::connect(&self.endpoint).unwrap()
    }

    fn log(&self) -> String {
        let mut s = String::new();
        std::fs::File::open(&self.log)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    }

    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "cwm's log never said {needle:?}; it has:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Geometry of the engines here: vLLM 0.33's per-layer `[NB, BS, NH, C]` bf16 views of one
/// allocation.
const LAYERS: u64 = 4;
const NB: u64 = 40;
const BS: u64 = 16;
const NH: u64 = 2;
const C: u64 = 64;
const BLOCK_BYTES: u64 = BS * NH * C * 2;
const LAYER_BYTES: u64 = NB * BLOCK_BYTES;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Cuda,
    CudaRaw,
}

/// An engine's KV cache in "device memory": the stand-in's shm allocation.
struct GpuKv {
    seg: ShmSegment,
}

impl GpuKv {
    fn new() -> GpuKv {
        GpuKv {
            seg: ShmSegment::create(&uniq("kv"), LAYERS * LAYER_BYTES).unwrap(),
        }
    }

    fn handle(&self) -> [u8; 64] {
        let mut h = [0u8; 64];
        h[..8].copy_from_slice(b"CWMSIMMH");
        let name = self.seg.name().as_bytes();
        h[8..8 + name.len()].copy_from_slice(name);
        h
    }

    fn descriptors(&self, kind: Kind, uuid: &str) -> Vec<IpcDescriptor> {
        descriptors(kind, self.handle(), uuid)
    }

    fn fill(&self, seed: u64) {
        let n = (LAYERS * LAYER_BYTES) as usize;
        // SAFETY: the segment is LAYERS * LAYER_BYTES long and lives as long as `self`; no copy
        // runs while a test fills it.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.seg.as_mut_ptr(), n) };
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for b in bytes {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }

    fn block(&self, layer: u64, block: u64) -> Vec<u8> {
        let at = (layer * LAYER_BYTES + block * BLOCK_BYTES) as usize;
        // SAFETY: block `block` of layer `layer` lies inside the segment, read after the copies
        // that wrote it completed.
        unsafe { std::slice::from_raw_parts(self.seg.as_mut_ptr().add(at), BLOCK_BYTES as usize) }
            .to_vec()
    }
}

/// The descriptors a vLLM 0.33 worker registers for one allocation of `LAYERS` layer views
/// (`cuda`: torch's storage share of the whole allocation, layers at element offsets;
/// `cuda_raw`: the allocation handle, each layer at its byte offset).
fn descriptors(kind: Kind, handle: [u8; 64], uuid: &str) -> Vec<IpcDescriptor> {
    let layer_elems = LAYER_BYTES / 2;
    (0..LAYERS)
        .map(|l| {
            let metadata = |storage_offset| TensorMetadata {
                dtype: "bfloat16".into(),
                shape: vec![NB, BS, NH, C],
                stride: vec![BS * NH * C, NH * C, C, 1],
                storage_offset,
                device_uuid: uuid.into(),
            };
            match kind {
                Kind::Cuda => IpcDescriptor::Cuda {
                    handle: CudaStorageHandle {
                        device: 0,
                        mem_handle: handle,
                        storage_size: LAYERS * LAYER_BYTES,
                        storage_offset_bytes: 0,
                        event_handle: None,
                        event_sync_required: false,
                        ref_counter: None,
                    },
                    metadata: metadata(l * layer_elems),
                },
                Kind::CudaRaw => IpcDescriptor::CudaRaw {
                    ipc_handle: handle,
                    alloc_offset: l * LAYER_BYTES,
                    nbytes: LAYER_BYTES,
                    metadata: metadata(0),
                },
            }
        })
        .collect()
}

fn groups() -> Vec<EngineGroupInfo> {
    vec![EngineGroupInfo {
        engine_group_id: 0,
        layer_indices: (0..LAYERS as u32).collect(),
        tokens_per_block: BS as u32,
        sw_size_tokens: -1,
        extra_object_group_tag: 0,
        recurrent_state: false,
    }]
}

fn register(c: &mut MpClient, id: u64, descs: &[IpcDescriptor]) {
    // What goes on the wire is exactly LMCache's encoding of these descriptors.
    let frame = encode_descriptor_list(descs);
    assert_eq!(
        connector_protocol::ipc::decode_descriptor_list(&frame).unwrap(),
        descs
    );
    c.register_kv_cache(id, descs, MODEL, 1, Some("NHD"), &groups())
        .unwrap();
}

fn key(tokens: &[u32], end: u64, rid: &str, worker: Option<u32>) -> IpcCacheServerKey {
    common::key(MODEL, "", tokens, worker, 1, 0, end, rid)
}

/// Store one 256-token chunk of prompt `seed` from blocks 1..=16 of instance `id`, the copy
/// waiting on the engine's `event`; whether cwm reports it stored.
fn store_after_event(c: &mut MpClient, id: u64, seed: u32, rid: &str, event: &[u8]) -> bool {
    let blocks: Vec<u32> = (1..=16).collect();
    c.store_after(
        &key(&tokens(seed, 256), 256, rid, Some(0)),
        id,
        std::slice::from_ref(&blocks),
        event,
    )
    .unwrap()
    .ok
}

/// A sidecar on a fresh stand-in with `driver_version`, and a client.
fn gpu_server(driver_version: u64, extra: &[&str]) -> (Sim, Server, MpClient) {
    let sim = Sim::new(driver_version);
    let server = Server::start(Some(&sim), extra);
    let c = server.client();
    (sim, server, c)
}

/// Store the 512 tokens `toks` from `blocks` of instance 1, after an engine event that fires in
/// `delay_ms`; the store succeeds and its reply carries no event.
fn store_ok(
    sim: &Sim,
    server: &Server,
    c: &mut MpClient,
    toks: &[u32],
    blocks: &[u32],
    delay_ms: u64,
) {
    let stored = c
        .store_after(
            &key(toks, 512, "s", Some(0)),
            1,
            &[blocks.to_vec()],
            &sim.engine_event(Duration::from_millis(delay_ms)),
        )
        .unwrap();
    assert!(stored.ok, "store failed: {}", server.log());
    sim.assert_no_event(&stored.event);
}

/// Store 2 chunks (32 blocks) from `src`, retrieve them into other blocks of `dst`, skipping
/// the first `skip` tokens, and compare every block of every layer.
fn round_trip(driver_version: u64) {
    let kind = Kind::Cuda;
    let (sim, server, mut c) = gpu_server(driver_version, &[]);
    let (src, dst) = (GpuKv::new(), GpuKv::new());
    src.fill(1);
    dst.fill(2);
    register(&mut c, 1, &src.descriptors(kind, UUID0_STR));
    register(&mut c, 2, &dst.descriptors(kind, UUID0_STR));
    assert_eq!(sim.get(off::OPENS), 2, "one mapping per allocation");
    sim.wait_for(
        off::PINNED_BYTES,
        L1_BYTES,
        "all of L1 pinned (in the background)",
    );
    assert_eq!(sim.get(off::HOST_REGISTERS), L1_BYTES / PIECE, "in pieces");
    let toks = tokens(5, 512);
    let src_blocks: Vec<u32> = (1..=32).collect();
    let dst_blocks: Vec<u32> = (8..40).rev().collect();

    store_ok(&sim, &server, &mut c, &toks, &src_blocks, 150);
    assert!(
        sim.get(off::ENGINE_WAITS) >= 1,
        "the copy waited on the engine's event"
    );
    assert_eq!(lookup_hits(&mut c, &key(&toks, 512, "l", None)), 2);

    let skip_blocks = 3;
    let before: Vec<Vec<u8>> = (0..LAYERS)
        .flat_map(|l| dst_blocks[..skip_blocks].iter().map(move |&b| (l, b)))
        .map(|(l, b)| dst.block(l, b as u64))
        .collect();
    let got = c
        .retrieve_after(
            &key(&toks, 512, "l", Some(0)),
            2,
            std::slice::from_ref(&dst_blocks),
            &sim.engine_event(Duration::from_millis(100)),
            skip_blocks as u64 * BS,
        )
        .unwrap();
    assert!(got.ok, "retrieve failed: {}", server.log());
    sim.assert_no_event(&got.event);
    for l in 0..LAYERS {
        for (j, (&s, &d)) in src_blocks.iter().zip(&dst_blocks).enumerate() {
            if j < skip_blocks {
                continue;
            }
            assert_eq!(
                src.block(l, s as u64),
                dst.block(l, d as u64),
                "layer {l} block {j}"
            );
        }
    }
    let after: Vec<Vec<u8>> = (0..LAYERS)
        .flat_map(|l| dst_blocks[..skip_blocks].iter().map(move |&b| (l, b)))
        .map(|(l, b)| dst.block(l, b as u64))
        .collect();
    assert_eq!(before, after, "skipped blocks untouched");
    assert_eq!(
        sim.get(off::PAGEABLE_COPIES),
        0,
        "every copy from pinned L1"
    );
    if driver_version >= 12080 {
        assert!(
            sim.get(off::BATCH_CALLS) >= 2,
            "cuMemcpyBatchAsync on 12.8+"
        );
    } else {
        assert_eq!(
            sim.get(off::BATCH_CALLS),
            0,
            "no cuMemcpyBatchAsync before 12.8"
        );
    }

    assert_eq!(
        sim.get(off::BLOCKING_WAITS),
        0,
        "every wait polls with a deadline"
    );
    c.unregister_kv_cache(1).unwrap();
    c.unregister_kv_cache(2).unwrap();
    sim.wait_for(off::OPEN_MAPPINGS, 0, "mappings closed on unregister");
    sim.assert_clean();
}

#[test]
fn cuda_descriptors_round_trip_with_batched_copies() {
    round_trip(12080);
}

#[test]
fn cuda_descriptors_round_trip_with_per_run_copies_before_12_8() {
    round_trip(12040);
}

/// `cuda_raw` comes only from LMCache's isolated_ipc mode, whose events cwm cannot wait on:
/// refused at registration with the reason, nothing opened.
#[test]
fn cuda_raw_is_refused_at_registration_with_the_reason() {
    let (sim, server, mut c) = gpu_server(12080, &[]);
    let kv = GpuKv::new();
    register(&mut c, 1, &kv.descriptors(Kind::CudaRaw, UUID0_STR));
    server.wait_log("cuda_raw (LMCache's isolated_ipc mode)");
    let stored = c
        .store_after(
            &key(&tokens(61, 256), 256, "s", Some(0)),
            1,
            &[(1..=16).collect()],
            &[],
        )
        .unwrap();
    assert!(!stored.ok);
    assert_eq!(sim.get(off::OPENS), 0, "nothing opened");
    sim.assert_clean();
}

#[test]
fn one_mapping_per_allocation_closed_by_the_last_unregister_or_the_reaper() {
    let (sim, _server, mut c) = gpu_server(12080, &["--worker-registration-grace-secs", "2"]);
    let kv = GpuKv::new();
    register(&mut c, 1, &kv.descriptors(Kind::Cuda, UUID0_STR));
    register(&mut c, 2, &kv.descriptors(Kind::Cuda, UUID0_STR));
    assert_eq!(sim.get(off::OPENS), 1, "both instances share one mapping");
    c.unregister_kv_cache(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sim.get(off::OPEN_MAPPINGS), 1, "still used by instance 2");
    // Instance 2 never pings: the reaper drops it after the grace period, closing the mapping
    // from the sweep thread (which must bind the device's context first).
    sim.wait_for(off::OPEN_MAPPINGS, 0, "the reaper closes the last mapping");
    sim.assert_clean();
}

#[test]
fn lookups_never_see_a_chunk_before_its_copy_completed() {
    let (sim, server, mut c) = gpu_server(12040, &[]);
    let kv = GpuKv::new();
    kv.fill(3);
    register(&mut c, 1, &kv.descriptors(Kind::Cuda, UUID0_STR));
    sim.set(off::COPY_DELAY_US, 20_000); // every queued copy lands 20 ms after the previous
    let toks = tokens(9, 256);
    let event = sim.engine_event(Duration::from_millis(50));
    let mut storer = server.client();
    let store_key = key(&toks, 256, "s", Some(0));
    let store = std::thread::spawn(move || {
        storer
            .store_after(&store_key, 1, &[(1..=16).collect()], &event)
            .unwrap()
    });
    let (mut misses_while_copying, mut n) = (0, 0);
    while !store.is_finished() {
        n += 1;
        let pending = sim.get(off::COPIES_PENDING);
        let hits = lookup_hits(&mut c, &key(&toks, 256, &format!("l{n}"), None));
        if hits > 0 {
            assert_eq!(
                sim.get(off::COPIES_PENDING),
                0,
                "a lookup saw the chunk while its copy was still queued"
            );
        } else if pending > 0 {
            misses_while_copying += 1;
        }
    }
    assert!(store.join().unwrap().ok);
    assert!(misses_while_copying > 0, "the lookups raced the copy");
    assert_eq!(lookup_hits(&mut c, &key(&toks, 256, "after", None)), 1);
    assert!(sim.get(off::COPIES_DONE) > 0);
    sim.assert_clean();
}

#[test]
fn gpu_registrations_fail_with_the_cause_named() {
    let (sim, server, mut c) = gpu_server(12080, &[]);
    let kv = GpuKv::new();
    kv.fill(4);
    let toks = tokens(11, 256);
    let store = |c: &mut MpClient, id: u64, event: &[u8]| {
        c.store_after(
            &key(&toks, 256, "s", Some(0)),
            id,
            &[(1..=16).collect()],
            event,
        )
        .unwrap()
        .ok
    };

    // A device this host does not have.
    register(
        &mut c,
        1,
        &kv.descriptors(Kind::Cuda, "99999999-0000-0000-0000-000000000000"),
    );
    assert!(!store(&mut c, 1, &[]));
    server.wait_log("not found among this host's GPUs");

    // Layers on two devices.
    let mut mixed = kv.descriptors(Kind::Cuda, UUID0_STR);
    mixed[1] = descriptors(Kind::Cuda, kv.handle(), UUID1_STR).remove(1);
    register(&mut c, 2, &mixed);
    assert!(!store(&mut c, 2, &[]));
    server.wait_log("one instance must register one device");

    // The driver refuses the handle: no mapping is left behind.
    sim.inject("cuIpcOpenMemHandle_v2", 400, 1);
    register(&mut c, 3, &kv.descriptors(Kind::Cuda, UUID0_STR));
    assert!(!store(&mut c, 3, &[]));
    server.wait_log("cuIpcOpenMemHandle_v2 failed: CUDA_ERROR_INVALID_HANDLE");

    // A registration that works, then an isolated_ipc (timeline semaphore) event.
    register(&mut c, 4, &kv.descriptors(Kind::Cuda, UUID0_STR));
    assert!(!store(&mut c, 4, &[0u8; 81]));
    server.wait_log("isolated_ipc");
    assert!(store(
        &mut c,
        4,
        &sim.engine_event(Duration::from_millis(10))
    ));
    for id in 1..=4 {
        c.unregister_kv_cache(id).unwrap();
    }
    sim.wait_for(off::OPEN_MAPPINGS, 0, "every mapping closed");
    assert_eq!(c.get_chunk_size().unwrap(), 256, "still serving");
    sim.assert_clean();
}

#[test]
fn a_failed_pin_is_loud_and_copies_still_complete() {
    let sim = Sim::new(12080);
    sim.inject("cuMemHostRegister_v2", 2, 1); // CUDA_ERROR_OUT_OF_MEMORY on the 1st piece
    let server = Server::start(Some(&sim), &[]);
    let mut c = server.client();
    let (src, dst) = (GpuKv::new(), GpuKv::new());
    src.fill(6);
    register(&mut c, 1, &src.descriptors(Kind::Cuda, UUID0_STR));
    register(&mut c, 2, &dst.descriptors(Kind::Cuda, UUID0_STR));
    server.wait_log("L1 is NOT pinned");
    assert_eq!(sim.get(off::PINNED_BYTES), 0);
    let toks = tokens(12, 256);
    let blocks: Vec<u32> = (1..=16).collect();
    assert!(
        c.store_after(
            &key(&toks, 256, "s", Some(0)),
            1,
            std::slice::from_ref(&blocks),
            &[]
        )
        .unwrap()
        .ok
    );
    assert_eq!(lookup_hits(&mut c, &key(&toks, 256, "l", None)), 1);
    assert!(
        c.retrieve_after(
            &key(&toks, 256, "l", Some(0)),
            2,
            std::slice::from_ref(&blocks),
            &[],
            0
        )
        .unwrap()
        .ok
    );
    assert_eq!(src.block(2, 5), dst.block(2, 5));
    assert!(
        sim.get(off::PAGEABLE_COPIES) > 0,
        "copies ran from pageable memory"
    );
    sim.assert_clean();
}

#[test]
fn without_a_driver_gpu_registrations_get_a_clear_error_and_cpu_serving_goes_on() {
    // No libcuda at all (unless the host has a real one; then the stand-in's absence of
    // CWM_CUDA_SIM does not matter and the real driver answers).
    let host_has_driver = Command::new("sh")
        .args(["-c", "ldconfig -p | grep -q 'libcuda\\.so'"])
        .status()
        .is_ok_and(|s| s.success());
    let server = Server::start(None, &[]);
    let mut c = server.client();
    let kv = GpuKv::new();
    register(&mut c, 1, &kv.descriptors(Kind::Cuda, UUID0_STR));
    let toks = tokens(13, 256);
    assert!(
        !c.store_after(
            &key(&toks, 256, "s", Some(0)),
            1,
            &[(1..=16).collect()],
            &[]
        )
        .unwrap()
        .ok
    );
    if host_has_driver {
        server.wait_log("registered KV cache cannot be served");
    } else {
        server.wait_log("no CUDA driver: libcuda.so was not found");
    }
    assert_eq!(c.get_chunk_size().unwrap(), 256);
}

/// With a sim but no `CWM_CUDA_SIM`, the stand-in behaves as a driver with no device.
#[test]
fn a_driver_without_devices_is_named() {
    let sim = Sim::new(12080);
    sim.set(off::NUM_DEVICES, 0);
    let server = Server::start(Some(&sim), &[]);
    let mut c = server.client();
    let kv = GpuKv::new();
    register(&mut c, 1, &kv.descriptors(Kind::Cuda, UUID0_STR));
    server.wait_log("not found among this host's GPUs []");
    sim.assert_clean();
}

/// The descriptors these tests register are byte for byte LMCache 0.5.6's: the fixture is
/// written by LMCache's own wire types and encoder (tests/interop/test_cuda_descriptors.py,
/// which also checks it in the interop suite).
#[test]
fn descriptors_are_lmcache_bytes() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("cuda-sim/descriptors.json")).unwrap();
    let mut handle = [0u8; 64];
    let name = b"CWMSIMMH/cwmsim_kv_fixture";
    handle[..name.len()].copy_from_slice(name);
    for (kind, tag) in [(Kind::Cuda, "cuda"), (Kind::CudaRaw, "cuda_raw")] {
        let ours = encode_descriptor_list(&descriptors(kind, handle, UUID0_STR));
        assert_eq!(hex::encode(&ours), fixture[tag].as_str().unwrap(), "{tag}");
    }
}

#[test]
fn doctor_lists_the_devices() {
    let sim = Sim::new(12080);
    let out = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .arg("doctor")
        .env("LD_LIBRARY_PATH", sim_dir())
        .env("CWM_CUDA_SIM", sim.seg.name())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("CUDA driver: 12.8 (2 devices)"), "{text}");
    assert!(
        text.contains(&format!("GPU 0: cwm cuda-sim GPU 0 uuid {UUID0_STR}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("GPU 1: cwm cuda-sim GPU 1 uuid {UUID1_STR}")),
        "{text}"
    );
    assert!(
        text.contains("cuMemcpyBatchAsync, at most 1024 copies per call"),
        "{text}"
    );
    assert!(text.contains("(attribute 91): yes"), "{text}");
    assert!(text.contains("CWM_CUDA_COPY=auto"), "{text}");
    assert!(text.contains("CWM_CUDA_WAIT_SECS=30"), "{text}");
    // Attribute 91 = 0 and the per-run switch, as the operator sees them.
    let out = Command::new(env!("CARGO_BIN_EXE_cwm"))
        .arg("doctor")
        .env("LD_LIBRARY_PATH", sim_dir())
        .env("CWM_CUDA_SIM", sim.seg.name())
        .env("CWM_CUDA_SIM_ATTR91", "1,0")
        .env("CWM_CUDA_MAX_BATCH", "64")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("at most 64 copies per call"), "{text}");
    assert!(text.contains("(attribute 91): no"), "{text}");
    assert!(
        text.contains("cuMemcpyAsync per contiguous run (device cannot use host pointers"),
        "{text}"
    );
    assert_eq!(sim.get(off::CTX_RETAINS), 0, "doctor retains no context");
    assert!(text.contains("ulimit -l"), "{text}");
    assert!(text.contains("/dev/shm"), "{text}");
}

/// `cwm bench tiers --json`, small and quick (L2 and the GPU at 2 and 4 MiB, one run, no
/// window), with the stand-in as its CUDA driver or with none: the report, and the chart.
fn bench_tiers(sim: Option<&Sim>) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("chart.svg");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cwm"));
    cmd.args([
        "bench",
        "tiers",
        "--json",
        "--sizes-mib",
        "2,4",
        "--round-mib",
        "8",
    ])
    .args([
        "--rounds",
        "1",
        "--tokens",
        "256",
        "--no-window",
        "--l2-path",
    ])
    .arg(dir.path().join("l2"))
    .arg("--chart")
    .arg(&chart);
    match sim {
        Some(sim) => cmd
            .env("LD_LIBRARY_PATH", sim_dir())
            .env("CWM_CUDA_SIM", sim.seg.name()),
        None => cmd
            .env("LD_LIBRARY_PATH", dir.path())
            .env_remove("CWM_CUDA_SIM"),
    };
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "cwm bench tiers failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)));
    (report, std::fs::read_to_string(chart).unwrap())
}

/// The figures of `tier` in a `cwm bench tiers` report.
fn figures_of<'a>(report: &'a serde_json::Value, tier: &str) -> Vec<&'a serde_json::Value> {
    report["figures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["tier"] == tier)
        .collect()
}

#[test]
fn bench_tiers_measures_the_gpu_path_next_to_cumemcpy_and_names_the_stand_in() {
    let sim = Sim::new(12080);
    let (report, chart) = bench_tiers(Some(&sim));
    let gpu = figures_of(&report, "GPU stand-in");
    let named: Vec<String> = gpu
        .iter()
        .map(|f| format!("{} {}", f["op"], f["value_bytes"]))
        .collect();
    assert_eq!(gpu.len(), 4, "D2H and H2D at 2 and 4 MiB: {named:?}");
    for (mib, op, limit) in [
        (2u64, "D2H (gather into L1)", "cuMemcpyDtoH, pinned"),
        (2, "H2D (scatter from L1)", "cuMemcpyHtoD, pinned"),
        (4, "D2H (gather into L1)", "cuMemcpyDtoH, pinned"),
        (4, "H2D (scatter from L1)", "cuMemcpyHtoD, pinned"),
    ] {
        let f = gpu
            .iter()
            .find(|f| f["op"] == op && f["value_bytes"] == mib << 20)
            .unwrap_or_else(|| panic!("no {op} of {mib} MiB: {named:?}"));
        assert_eq!(f["bytes_per_run"], 8u64 << 20, "{f}");
        assert_eq!(f["runs"], 1, "{f}");
        assert!(f["p50_gbps"].as_f64().unwrap() > 0.0, "{f}");
        assert_eq!(f["limit"]["name"], limit, "{f}");
        assert!(f["limit"]["gbps"].as_f64().unwrap() > 0.0, "{f}");
    }
    assert!(
        figures_of(&report, "GPU").is_empty(),
        "the stand-in is no GPU"
    );
    assert_eq!(report["gpu"]["stand_in"], true, "{}", report["gpu"]);
    assert_eq!(report["gpu"]["device"], "cwm cuda-sim GPU 0");
    let checks: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .filter(|c| c.starts_with("GPU stand-in:") && c.contains("byte for byte"))
        .collect();
    assert_eq!(checks.len(), 2, "one per chunk size: {}", report["checks"]);
    assert!(
        !report["skipped"].to_string().contains("GPU"),
        "{}",
        report["skipped"]
    );
    assert!(chart.contains("GPU stand-in D2H"), "a bar per GPU figure");
    assert!(chart.contains("CUDA driver stand-in"), "the chart says so");
    // cwm's copies went through the stand-in's streams, batched (driver 12.8), from pinned
    // L1; the limit's are counted as copies too.
    assert!(sim.get(off::BATCH_CALLS) > 0);
    assert!(sim.get(off::COPIES_DONE) >= 4 * 2 * 8);
    assert_eq!(sim.get(off::COPIES_PENDING), 0);
    sim.assert_clean();
}

#[test]
fn bench_tiers_without_a_cuda_driver_says_why_the_gpu_is_not_measured() {
    let (report, _) = bench_tiers(None);
    let skipped = report["skipped"].to_string();
    if report["gpu"].is_null() {
        assert!(
            skipped.contains("GPU: not measured: no CUDA driver"),
            "{skipped}"
        );
        assert!(
            !report["figures"].to_string().contains("GPU"),
            "{}",
            report["figures"]
        );
    } else {
        // A host with a real driver finds it whatever LD_LIBRARY_PATH says: GPU figures.
        assert_eq!(report["gpu"]["stand_in"], false, "{}", report["gpu"]);
        assert_eq!(figures_of(&report, "GPU").len(), 4, "{}", report["figures"]);
    }
    assert!(
        !figures_of(&report, "L2").is_empty(),
        "the other tiers still run"
    );
}

/// Register two instances on `uuid`, store 2 chunks from scattered blocks of one, retrieve
/// them into other scattered blocks of the other, and compare every block of every layer.
/// Returns the client and both caches (still registered as instances 1 and 2).
fn scattered_round_trip(sim: &Sim, server: &Server, uuid: &str, seed: u64) -> MpClient {
    let mut c = server.client();
    let (src, dst) = (GpuKv::new(), GpuKv::new());
    src.fill(seed);
    dst.fill(seed + 1);
    register(&mut c, 1, &src.descriptors(Kind::Cuda, uuid));
    register(&mut c, 2, &dst.descriptors(Kind::Cuda, uuid));
    let toks = tokens(seed as u32, 512);
    // Every other block: no two runs coalesce, so 4 layers x 32 blocks = 128 runs a transfer.
    let src_blocks: Vec<u32> = (0..32).map(|b| 1 + 2 * (b % 19) + b / 19).collect();
    let dst_blocks: Vec<u32> = (8..40).rev().collect();
    store_ok(sim, server, &mut c, &toks, &src_blocks, 20);
    let got = c
        .retrieve_after(
            &key(&toks, 512, "l", Some(0)),
            2,
            std::slice::from_ref(&dst_blocks),
            &sim.engine_event(Duration::from_millis(20)),
            0,
        )
        .unwrap();
    assert!(got.ok, "retrieve failed: {}", server.log());
    for l in 0..LAYERS {
        for (j, (&s, &d)) in src_blocks.iter().zip(&dst_blocks).enumerate() {
            assert_eq!(
                src.block(l, s as u64),
                dst.block(l, d as u64),
                "layer {l} block {j}"
            );
        }
    }
    c
}

#[test]
fn batches_are_bounded_and_a_failed_batch_falls_back_to_per_run_copies() {
    let sim = Sim::new(12080);
    // A "driver" that takes at most 16 copies per call, and cwm told so.
    sim.set(off::MAX_BATCH, 16);
    let server = Server::start_env(Some(&sim), &[], &[("CWM_CUDA_MAX_BATCH", "16")]);
    let mut c = scattered_round_trip(&sim, &server, UUID0_STR, 21);
    let calls = sim.get(off::BATCH_CALLS);
    assert!(
        calls >= 2 * 128 / 16,
        "128 runs a transfer in calls of 16: {calls}"
    );
    assert!(sim.get(off::BATCH_MAX_SEEN) <= 16);
    sim.assert_clean();

    // The next batch call fails: the transfer completes per run, and the instance stays so.
    sim.inject("cuMemcpyBatchAsync", 1, 1);
    let toks = tokens(22, 256);
    let blocks: Vec<u32> = (0..16).map(|b| 1 + 2 * b).collect();
    let stored = c
        .store_after(
            &key(&toks, 256, "s2", Some(0)),
            1,
            std::slice::from_ref(&blocks),
            &[],
        )
        .unwrap();
    assert!(stored.ok, "store failed: {}", server.log());
    server.wait_log("copies per run from now on");
    assert_eq!(sim.get(off::BATCH_CALLS), calls, "no batch call succeeded");
    let done = sim.get(off::COPIES_DONE);
    assert!(
        c.store_after(
            &key(&tokens(23, 256), 256, "s3", Some(0)),
            1,
            std::slice::from_ref(&blocks),
            &[]
        )
        .unwrap()
        .ok
    );
    assert_eq!(sim.get(off::BATCH_CALLS), calls, "per run from then on");
    assert!(sim.get(off::COPIES_DONE) > done);
    assert_eq!(lookup_hits(&mut c, &key(&toks, 256, "l2", None)), 1);
    sim.assert_clean();
}

#[test]
fn no_batching_where_attribute_91_is_0_or_the_switch_says_per_run() {
    // Device 0 cannot use host pointers for registered memory (WSL2): a batch copy from
    // pinned L1 there is an illegal address (a violation in the stand-in).
    let sim = Sim::new(12080);
    let server = Server::start_env(Some(&sim), &[], &[("CWM_CUDA_SIM_ATTR91", "0,1")]);
    scattered_round_trip(&sim, &server, UUID0_STR, 31);
    assert_eq!(sim.get(off::BATCH_CALLS), 0);
    sim.wait_for(off::PINNED_BYTES, L1_BYTES, "L1 still pinned");
    sim.assert_clean();
    drop(server);

    let sim = Sim::new(12080);
    let server = Server::start_env(Some(&sim), &[], &[("CWM_CUDA_COPY", "per-run")]);
    scattered_round_trip(&sim, &server, UUID1_STR, 33);
    assert_eq!(sim.get(off::BATCH_CALLS), 0);
    sim.assert_clean();
}

#[test]
fn an_engine_event_that_never_fires_breaks_only_its_instance_and_the_reaper_unmaps_it() {
    let sim = Sim::new(12080);
    let server = Server::start_env(
        Some(&sim),
        &["--worker-registration-grace-secs", "3"],
        &[("CWM_CUDA_WAIT_SECS", "1")],
    );
    let mut c = server.client();
    let (dead, live) = (GpuKv::new(), GpuKv::new());
    live.fill(41);
    register(&mut c, 1, &dead.descriptors(Kind::Cuda, UUID0_STR));
    register(&mut c, 2, &live.descriptors(Kind::Cuda, UUID0_STR));
    let store = |c: &mut MpClient, id: u64, rid: &str, event: &[u8]| {
        store_after_event(c, id, 40 + id as u32, rid, event)
    };
    // The old code waited in cuStreamSynchronize forever: the client's 10 s timeout fails it.
    let t = Instant::now();
    assert!(!store(&mut c, 1, "s", &sim.dead_engine_event()));
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    server.wait_log("the engine died or stalled");
    assert_eq!(sim.get(off::COPIES_DONE), 0, "nothing was copied");
    // Broken: its next transfer fails at once, even with an event that fired.
    sim.set(off::ENGINE_BUSY_UNTIL, 0);
    assert!(!store(&mut c, 1, "s2", &[]));
    server.wait_log("this instance is broken");
    // The other instance on the same GPU is unaffected.
    assert!(store(&mut c, 2, "s3", &[]));
    // Nobody pings: the reaper drops both and unmaps their memory.
    sim.wait_for(
        off::OPEN_MAPPINGS,
        0,
        "the reaper unmaps the broken instance",
    );
    assert_eq!(sim.get(off::BLOCKING_WAITS), 0);
    sim.assert_clean();
}

#[test]
fn contexts_are_retained_lazily_per_device_with_blocking_sync_and_a_failing_device_is_alone() {
    let sim = Sim::new(12080);
    // The first context retain fails: the first device an engine registers on.
    sim.inject("cuDevicePrimaryCtxRetain", 2, 1);
    let server = Server::start(Some(&sim), &[]);
    let mut c = server.client();
    let kv = GpuKv::new();
    kv.fill(51);
    register(&mut c, 1, &kv.descriptors(Kind::Cuda, UUID1_STR));
    server.wait_log("GPU 1 (11111111-1111-1111-1111-111111111111) is disabled");
    c.unregister_kv_cache(1).unwrap();
    // Device 0 still works, and only its context was retained, with BLOCKING_SYNC set first.
    scattered_round_trip(&sim, &server, UUID0_STR, 52);
    assert_eq!(sim.get(off::CTX_RETAINS), 1, "device 0 retained once");
    assert_eq!(sim.get(off::CTX_FLAGS), 4, "CU_CTX_SCHED_BLOCKING_SYNC");
    assert_eq!(
        sim.get(off::CTX_RETAINS + 8),
        0,
        "device 1: its one try failed"
    );
    sim.wait_for(off::PINNED_BYTES, L1_BYTES, "L1 pinned with device 0");
    sim.assert_clean();
}

/// torch's IPC ref-counter object (`at::RefcountedMapAllocator`: 64-byte header, then 10,000
/// int64 slots), as the engine process creates it.
struct TorchRefCounters {
    seg: ShmSegment,
}

impl TorchRefCounters {
    const BYTES: u64 = 64 + 8 * 10_000;

    fn new() -> TorchRefCounters {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("/torch_{}_{}_{n}", std::process::id(), 4242);
        TorchRefCounters {
            seg: ShmSegment::create(&name, Self::BYTES).unwrap(),
        }
    }

    fn slot(&self, i: u64) -> &AtomicU64 {
        // SAFETY: i < 10,000: the 8-aligned slot lies inside the segment, which lives as long
        // as `&self`; cwm only updates it atomically.
        unsafe { &*(self.seg.as_mut_ptr().add((64 + 8 * i) as usize) as *const AtomicU64) }
    }

    /// `descs` with torch's ref counter set: descriptor `l` shares slot `first + l`, set to 1
    /// as `_share_cuda_()` does.
    fn share(&self, mut descs: Vec<IpcDescriptor>, first: u64) -> Vec<IpcDescriptor> {
        for (l, d) in descs.iter_mut().enumerate() {
            let IpcDescriptor::Cuda { handle, .. } = d else {
                unreachable!()
            };
            let slot = first + l as u64;
            self.slot(slot).store(1, Ordering::SeqCst);
            handle.ref_counter = Some(connector_protocol::TorchRefCounter {
                name: self.seg.name().as_bytes().to_vec(),
                offset: slot,
            });
        }
        descs
    }

    fn wait_released(&self, slots: std::ops::Range<u64>, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while slots
            .clone()
            .any(|s| self.slot(s).load(Ordering::SeqCst) != 0)
        {
            assert!(
                Instant::now() < deadline,
                "{what}: slots {slots:?} not all 0"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn torch_ref_counters_are_released_once_when_the_mappings_close() {
    let sim = Sim::new(12080);
    let server = Server::start_env(Some(&sim), &["--worker-registration-grace-secs", "3"], &[]);
    let mut c = server.client();
    let rc = TorchRefCounters::new();
    let (a, b) = (GpuKv::new(), GpuKv::new());
    // Two instances share one allocation's memory under their own counters (as two shares do).
    register(
        &mut c,
        1,
        &rc.share(a.descriptors(Kind::Cuda, UUID0_STR), 0),
    );
    register(
        &mut c,
        2,
        &rc.share(b.descriptors(Kind::Cuda, UUID0_STR), 10),
    );
    assert!(
        c.store_after(
            &key(&tokens(61, 256), 256, "s", Some(0)),
            1,
            &[(1..=16).collect()],
            &[]
        )
        .unwrap()
        .ok,
        "{}",
        server.log()
    );
    for s in (0..LAYERS).chain(10..10 + LAYERS) {
        assert_eq!(
            rc.slot(s).load(Ordering::SeqCst),
            1,
            "held while registered"
        );
    }
    c.unregister_kv_cache(1).unwrap();
    rc.wait_released(0..LAYERS, "unregister releases the shares");
    assert_eq!(
        rc.slot(10).load(Ordering::SeqCst),
        1,
        "the other instance's"
    );
    // The reaper (nobody pings) releases the other's; none goes below 0.
    rc.wait_released(10..10 + LAYERS, "the reaper releases the shares");
    sim.wait_for(off::OPEN_MAPPINGS, 0, "every mapping closed");
    assert!((0..20).all(|s| rc.slot(s).load(Ordering::SeqCst) == 0));

    // A counter that is not torch's is refused at registration, with the reason; nothing is
    // written anywhere.
    let mut bad = a.descriptors(Kind::Cuda, UUID0_STR);
    let IpcDescriptor::Cuda { handle, .. } = &mut bad[2] else {
        unreachable!()
    };
    handle.ref_counter = Some(connector_protocol::TorchRefCounter {
        name: sim.seg.name().as_bytes().to_vec(),
        offset: 1,
    });
    register(&mut c, 3, &bad);
    server.wait_log("is not torch's /torch_<pid>_<rand>_<n>");
    sim.assert_clean();
}

#[test]
fn pageable_copies_block_the_caller_as_the_driver_documents() {
    // Pinning fails: every copy is from pageable L1, run by the stand-in inside the call.
    let sim = Sim::new(12080);
    sim.inject("cuMemHostRegister_v2", 2, 1);
    let server = Server::start_env(Some(&sim), &[], &[("CWM_CUDA_COPY", "per-run")]);
    let c = scattered_round_trip(&sim, &server, UUID0_STR, 71);
    drop(c);
    let (pageable, blocking) = (
        sim.get(off::PAGEABLE_COPIES),
        sim.get(off::PAGEABLE_BLOCKING),
    );
    assert!(pageable > 0, "copies ran from pageable memory");
    assert_eq!(
        blocking, pageable,
        "each of them inside its cuMemcpy*Async call"
    );
    assert_eq!(sim.get(off::COPIES_PENDING), 0);
    sim.assert_clean();
}

/// A child process standing in for an engine: it owns the events it "exported".
fn engine_process() -> Child {
    Command::new("sleep").arg("60").spawn().unwrap()
}

#[test]
fn an_engine_that_exits_holding_its_event_fails_the_transfer_by_deadline_and_is_reaped() {
    let sim = Sim::new(12080);
    let server = Server::start_env(
        Some(&sim),
        &["--worker-registration-grace-secs", "3"],
        &[("CWM_CUDA_WAIT_SECS", "3")],
    );
    let mut c = server.client();
    let kv = GpuKv::new();
    register(&mut c, 1, &kv.descriptors(Kind::Cuda, UUID0_STR));
    register(&mut c, 2, &kv.descriptors(Kind::Cuda, UUID0_STR));
    let store = |c: &mut MpClient, id: u64, rid: &str, event: &[u8]| {
        store_after_event(c, id, 80 + id as u32, rid, event)
    };

    // The engine exits after cwm imported its event, before the event fired (it would have
    // fired within the wait budget): the event never fires, the wait ends at its deadline.
    let mut engine = engine_process();
    let event = sim.owned_engine_event(Duration::from_millis(1500), engine.id());
    let opens = sim.get(off::EVENT_OPENS);
    let waiting = std::thread::scope(|s| {
        let t = s.spawn(|| store(&mut c, 1, "s", &event));
        sim.wait_for(off::EVENT_OPENS, opens + 1, "cwm imported the event");
        engine.kill().unwrap();
        engine.wait().unwrap();
        t.join().unwrap()
    });
    assert!(!waiting, "a transfer behind a dead engine's event failed");
    assert!(sim.get(off::DEAD_OWNER_EVENTS) >= 1, "{}", server.log());
    server.wait_log("the engine died or stalled");
    assert_eq!(sim.get(off::COPIES_DONE), 0, "nothing was copied");

    // An event whose owner is already gone cannot be opened: that transfer fails at once.
    sim.set(off::ENGINE_BUSY_UNTIL, 0);
    let event = sim.owned_engine_event(Duration::ZERO, engine.id());
    assert!(!store(&mut c, 2, "s2", &event));
    server.wait_log("cuIpcOpenEventHandle failed");
    // Nobody pings: the reaper drops both instances and closes the shared mapping.
    sim.wait_for(off::OPEN_MAPPINGS, 0, "the reaper unmaps the dead engine");
    assert_eq!(sim.get(off::BLOCKING_WAITS), 0);
    sim.assert_clean();
}

/// Store `chunks` 256-token chunks of `kv` (instance `id`, blocks 1..=16) under fresh tokens.
fn store_chunks(c: &mut MpClient, server: &Server, id: u64, seed: u32, chunks: u32) {
    for i in 0..chunks {
        let stored = c
            .store_after(
                &key(&tokens(seed + i, 256), 256, &format!("s{i}"), Some(0)),
                id,
                &[(1..=16).collect()],
                &[],
            )
            .unwrap();
        assert!(stored.ok, "store failed: {}", server.log());
    }
}

#[test]
fn pinning_runs_in_the_background_and_never_stalls_a_registration() {
    let sim = Sim::new(12080);
    // The driver's pinning takes "forever": the old code pinned inside the first
    // register_kv_cache, which then never answered (the client timed out).
    sim.set(off::PIN_HOLD, 1);
    let server = Server::start(Some(&sim), &[]);
    let mut c = server.client();
    let (src, dst) = (GpuKv::new(), GpuKv::new());
    src.fill(91);
    register(&mut c, 1, &src.descriptors(Kind::Cuda, UUID0_STR));
    register(&mut c, 2, &dst.descriptors(Kind::Cuda, UUID0_STR));
    sim.wait_for(
        off::PIN_WAITING,
        1,
        "the pinning thread waits in the driver",
    );
    // Meanwhile transfers copy from pageable memory, byte-exact.
    let toks = tokens(92, 256);
    let blocks: Vec<u32> = (1..=16).collect();
    assert!(
        c.store_after(
            &key(&toks, 256, "s", Some(0)),
            1,
            std::slice::from_ref(&blocks),
            &[]
        )
        .unwrap()
        .ok
    );
    assert!(
        c.retrieve_after(
            &key(&toks, 256, "l", Some(0)),
            2,
            std::slice::from_ref(&blocks),
            &[],
            0
        )
        .unwrap()
        .ok
    );
    assert_eq!(src.block(3, 7), dst.block(3, 7));
    assert_eq!(sim.get(off::PINNED_BYTES), 0);
    assert!(sim.get(off::PAGEABLE_COPIES) > 0, "copies from pageable L1");
    // The driver finishes: all of L1 is pinned, and later copies use it.
    sim.set(off::PIN_HOLD, 0);
    sim.wait_for(
        off::PINNED_BYTES,
        L1_BYTES,
        "all of L1 pinned in the background",
    );
    server.wait_log("L1 pinned for GPU copies (in the background)");
    let pageable = sim.get(off::PAGEABLE_COPIES);
    store_chunks(&mut c, &server, 1, 93, 2);
    assert_eq!(
        sim.get(off::PAGEABLE_COPIES),
        pageable,
        "every copy from pinned L1"
    );
    sim.assert_clean();
}

#[test]
fn with_lazy_populate_only_what_l1_uses_is_pinned() {
    const SMALL_PIECE: u64 = 256 << 10;
    let sim = Sim::new(12080);
    let server = Server::start_env(
        Some(&sim),
        &["--l1-populate", "lazy"],
        &[(cwm::ops::PIN_PIECE_ENV, &SMALL_PIECE.to_string())],
    );
    let mut c = server.client();
    let kv = GpuKv::new();
    kv.fill(95);
    register(&mut c, 1, &kv.descriptors(Kind::Cuda, UUID0_STR));
    // Nothing stored: nothing committed, nothing pinned (the old code pinned, and so
    // committed, all of L1 here).
    assert_eq!(
        sim.get(off::PINNED_BYTES),
        0,
        "pinned before L1 held anything"
    );
    // Four 256 KiB chunks: pinning follows what L1 holds, piece by piece.
    store_chunks(&mut c, &server, 1, 96, 4);
    let deadline = Instant::now() + Duration::from_secs(15);
    while sim.get(off::PINNED_BYTES) < 2 * SMALL_PIECE {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let pinned = sim.get(off::PINNED_BYTES);
    assert!(
        pinned <= 4 * SMALL_PIECE,
        "{pinned} bytes pinned for 1 MiB of objects in a {L1_BYTES}-byte L1"
    );
    assert_eq!(pinned % SMALL_PIECE, 0, "whole pieces");
    sim.assert_clean();
}

/// Measurement, not a check (BENCHMARKS.md): how long the first GPU registration takes with a
/// large L1, and how long pinning it takes in the background. `CWM_BENCH_L1_GB` (default 4)
/// and `CWM_BENCH_POPULATE` (eager or lazy) choose the L1.
#[test]
#[ignore = "measurement: run by hand, see BENCHMARKS.md"]
fn measure_registration_time_with_a_large_l1() {
    let gb: f64 = std::env::var("CWM_BENCH_L1_GB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4.0);
    let populate = std::env::var("CWM_BENCH_POPULATE").unwrap_or_else(|_| "eager".into());
    let sim = Sim::new(12080);
    let t = Instant::now();
    let server = Server::start_env(
        Some(&sim),
        &["--l1-size-gb", &gb.to_string(), "--l1-populate", &populate],
        &[(cwm::ops::PIN_PIECE_ENV, &(1u64 << 30).to_string())],
    );
    let started = t.elapsed();
    let mut c = server.client();
    let kv = GpuKv::new();
    let t = Instant::now();
    register(&mut c, 1, &kv.descriptors(Kind::Cuda, UUID0_STR));
    let registered = t.elapsed();
    let l1 = (gb * (1u64 << 30) as f64) as u64;
    let mut pinned_after = None;
    if populate == "eager" {
        let deadline = Instant::now() + Duration::from_secs(600);
        while sim.get(off::PINNED_BYTES) < l1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        pinned_after = Some(t.elapsed());
    }
    println!(
        "L1 {gb} GiB ({populate}): sidecar ready in {:.0} ms; register_kv_cache answered in \
         {:.1} ms; L1 pinned ({} bytes) {} ms after it",
        started.as_secs_f64() * 1e3,
        registered.as_secs_f64() * 1e3,
        sim.get(off::PINNED_BYTES),
        pinned_after.map_or("-".to_string(), |d| format!("{:.0}", d.as_secs_f64() * 1e3))
    );
    for line in server.log().lines().filter(|l| l.contains("pinned")) {
        println!("{line}");
    }
    sim.assert_clean();
}

/// The real-GPU scripts (tests/gpu/) cannot run here, but they compile, and their sizing
/// (`--plan`) and argument checks run without torch or a GPU.
#[test]
fn gpu_scripts_compile_and_plan_without_a_gpu() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gpu");
    let py = |args: &[&str], env: &[(&str, &str)]| {
        Command::new("python3")
            .args(args)
            .current_dir(&dir)
            .envs(env.iter().copied())
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 ({e})"))
    };
    let out = py(
        &["-m", "py_compile", "gpu_stress.py", "gpu_roundtrip.py"],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = py(&["gpu_stress.py", "--plan"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("65536 tokens"), "{text}");
    assert!(text.contains("4,194,304 runs per transfer"), "{text}");
    let out = py(
        &["gpu_stress.py", "--plan"],
        &[("CWM_GPU_HND_TOKENS", "100")],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a multiple of 256"));
    let out = py(&["gpu_stress.py", "--only", "hnd,nope"], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario"));
    let out = Command::new("bash")
        .arg(dir.join("run.sh"))
        .env_remove("CWM_GPU_TESTS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "run.sh without CWM_GPU_TESTS=1");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not run"));
}
