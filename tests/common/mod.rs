//! Shared fixtures for the integration tests: a sidecar on a free port and engine-like KV
//! caches in real POSIX shared memory.

#![allow(dead_code)]

pub mod http;
pub mod mcp;
pub mod pool;
pub mod redis;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use connector_protocol::{
    CudaStorageHandle, EngineGroupInfo, IpcCacheServerKey, IpcDescriptor, TensorMetadata,
};
use cwm::client::MpClient;
use cwm::config::Config;
use cwm::engine_mem::shm::ShmSegment;
use cwm::serve::Sidecar;

pub const CS: u64 = 256;

pub fn sidecar(config: Config) -> Sidecar {
    Sidecar::start(&Config {
        host: "127.0.0.1".into(),
        port: 0,
        http_port: 0,
        ..config
    })
    .expect("sidecar starts")
}

/// Memory only: 256 MiB of L1, no disk tier.
pub fn small_config() -> Config {
    Config {
        l1_size_gb: 0.25,
        l2_size_gb: 0.0,
        ..Config::default()
    }
}

/// L1 plus an L2 in `dir`.
pub fn disk_config(dir: &std::path::Path) -> Config {
    Config {
        l1_size_gb: 0.25,
        l2_size_gb: 1.0,
        l2_path: dir.to_path_buf(),
        ..Config::default()
    }
}

/// A small tokio runtime for the MCP and HTTP clients of a test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Wait until write-behind has written `n` objects to the tiers behind L1.
pub fn wait_written(s: &Sidecar, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.cwm.tiers.stats().write_behind.written < n {
        assert!(
            Instant::now() < deadline,
            "write-behind did not write {n} objects"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET `path` on the sidecar's HTTP port (plain HTTP/1.1 from loopback): the whole response.
pub fn http_get(s: &Sidecar, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(s.http_addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    out
}

pub fn client(s: &Sidecar) -> MpClient {
    MpClient::connect(&s.mp_endpoint).expect("connect")
}

/// The physical layout an engine registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[NB, BS, NH, C]`, hint NHD (vLLM 0.33 on GPU).
    Nhd,
    /// `[NB, NH, BS, C]`, hint HND (vLLM on CPU).
    Hnd,
    /// `[2, NB, BS, NH, HS]`, no hint.
    TwoMajor,
}

/// A KV cache of `layers` layers in one shm segment, per-layer `storage_offset`s.
pub struct TestKv {
    pub seg: ShmSegment,
    pub layout: Layout,
    pub layers: u64,
    pub blocks: u64,
    pub bs: u64,
    pub heads: u64,
    /// Elements of one head's content (C, or HS for the two-major layout).
    pub content: u64,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl TestKv {
    pub fn new(
        layout: Layout,
        layers: u64,
        blocks: u64,
        bs: u64,
        heads: u64,
        content: u64,
    ) -> TestKv {
        let name = format!(
            "/cwm_it_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let planes = if layout == Layout::TwoMajor { 2 } else { 1 };
        let size = planes * blocks * bs * heads * content * 2 * layers;
        let seg = ShmSegment::create(&name, size).expect("create shm segment");
        TestKv {
            seg,
            layout,
            layers,
            blocks,
            bs,
            heads,
            content,
        }
    }

    fn layer_elems(&self) -> u64 {
        let planes = if self.layout == Layout::TwoMajor {
            2
        } else {
            1
        };
        planes * self.blocks * self.bs * self.heads * self.content
    }

    pub fn bytes(&self) -> u64 {
        self.layer_elems() * 2 * self.layers
    }

    pub fn descriptors(&self) -> Vec<IpcDescriptor> {
        let (nb, bs, nh, c) = (self.blocks, self.bs, self.heads, self.content);
        let (shape, stride) = match self.layout {
            Layout::Nhd => (vec![nb, bs, nh, c], vec![bs * nh * c, nh * c, c, 1]),
            Layout::Hnd => (vec![nb, nh, bs, c], vec![nh * bs * c, bs * c, c, 1]),
            Layout::TwoMajor => (
                vec![2, nb, bs, nh, c],
                vec![nb * bs * nh * c, bs * nh * c, nh * c, c, 1],
            ),
        };
        (0..self.layers)
            .map(|l| IpcDescriptor::CpuShm {
                shm_name: self.seg.name().to_string(),
                nbytes: self.bytes(),
                metadata: TensorMetadata {
                    dtype: "bfloat16".into(),
                    shape: shape.clone(),
                    stride: stride.clone(),
                    storage_offset: l * self.layer_elems(),
                    device_uuid: "cpu".into(),
                },
            })
            .collect()
    }

    pub fn hint(&self) -> Option<&'static str> {
        match self.layout {
            Layout::Nhd => Some("NHD"),
            Layout::Hnd => Some("HND"),
            Layout::TwoMajor => None,
        }
    }

    pub fn groups(&self) -> Vec<EngineGroupInfo> {
        vec![EngineGroupInfo {
            engine_group_id: 0,
            layer_indices: (0..self.layers as u32).collect(),
            tokens_per_block: self.bs as u32,
            sw_size_tokens: -1,
            extra_object_group_tag: 0,
            recurrent_state: false,
        }]
    }

    /// Byte offset of element (plane, layer, block, token, head, 0).
    fn offset(&self, plane: u64, layer: u64, block: u64, token: u64, head: u64) -> u64 {
        let (nb, bs, nh, c) = (self.blocks, self.bs, self.heads, self.content);
        let in_layer = match self.layout {
            Layout::Nhd => ((block * bs + token) * nh + head) * c,
            Layout::Hnd => ((block * nh + head) * bs + token) * c,
            Layout::TwoMajor => (((plane * nb + block) * bs + token) * nh + head) * c,
        };
        (layer * self.layer_elems() + in_layer) * 2
    }

    pub fn planes(&self) -> u64 {
        if self.layout == Layout::TwoMajor {
            2
        } else {
            1
        }
    }

    /// The content of one (plane, layer, block, token, head) as bytes.
    pub fn head(&self, plane: u64, layer: u64, block: u64, token: u64, head: u64) -> Vec<u8> {
        let off = self.offset(plane, layer, block, token, head) as usize;
        let n = (self.content * 2) as usize;
        // SAFETY: `offset` addresses a head inside the segment, `content * 2` bytes long, and
        // the segment lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.seg.as_mut_ptr().add(off), n).to_vec() }
    }

    /// Everything stored for one block (all planes, layers, tokens, heads), in logical order.
    pub fn block(&self, block: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for p in 0..self.planes() {
            for l in 0..self.layers {
                for t in 0..self.bs {
                    for h in 0..self.heads {
                        out.extend(self.head(p, l, block, t, h));
                    }
                }
            }
        }
        out
    }

    /// Fill every byte with a value derived from its logical position and `seed`, so equal
    /// logical content gives equal bytes whatever the physical layout.
    pub fn fill(&self, seed: u64) {
        for p in 0..self.planes() {
            for l in 0..self.layers {
                for b in 0..self.blocks {
                    for t in 0..self.bs {
                        for h in 0..self.heads {
                            let off = self.offset(p, l, b, t, h) as usize;
                            for i in 0..(self.content * 2) as usize {
                                let v = (seed.wrapping_mul(31)
                                    ^ (p * 7 + l * 131 + b * 1009 + t * 17 + h * 3 + i as u64 * 5))
                                    as u8;
                                // SAFETY: byte `i` of a head inside the live segment.
                                unsafe { *self.seg.as_mut_ptr().add(off + i) = v };
                            }
                        }
                    }
                }
            }
        }
    }

    pub fn fill_byte(&self, v: u8) {
        // SAFETY: the whole segment, `bytes()` long, alive as long as `self`.
        unsafe { std::ptr::write_bytes(self.seg.as_mut_ptr(), v, self.bytes() as usize) }
    }
}

/// Register instance `id` with one `cuda` descriptor (a made-up handle): cwm records it, and its
/// transfers fail because this build cannot open CUDA memory.
pub fn register_cuda(c: &mut MpClient, id: u64, model: &str) {
    let md = TensorMetadata {
        dtype: "bfloat16".into(),
        shape: vec![4, 16, 1, 16],
        stride: vec![256, 16, 16, 1],
        storage_offset: 0,
        device_uuid: "00000000-0000-0000-0000-000000000000".into(),
    };
    let handle = CudaStorageHandle {
        device: 0,
        mem_handle: [7; 64],
        storage_size: 2048,
        storage_offset_bytes: 0,
        event_handle: None,
        event_sync_required: false,
        ref_counter: None,
    };
    c.register_kv_cache(
        id,
        &[IpcDescriptor::Cuda {
            handle,
            metadata: md,
        }],
        model,
        1,
        Some("NHD"),
        &TestKv::new(Layout::Nhd, 1, 4, 16, 1, 16).groups(),
    )
    .unwrap();
}

#[allow(clippy::too_many_arguments)]
pub fn key(
    model: &str,
    salt: &str,
    tokens: &[u32],
    worker_id: Option<u32>,
    world_size: u32,
    start: u64,
    end: u64,
    request_id: &str,
) -> IpcCacheServerKey {
    IpcCacheServerKey {
        model_name: model.into(),
        world_size,
        worker_id,
        token_ids: tokens.to_vec(),
        start,
        end,
        request_id: request_id.into(),
        cache_salt: salt.into(),
        request_configs: None,
        num_kv_readers: 1,
    }
}

/// Register `kv` as instance `id` of `model` (one rank).
pub fn register_kv(c: &mut MpClient, model: &str, id: u64, kv: &TestKv) {
    c.register_kv_cache(id, &kv.descriptors(), model, 1, kv.hint(), &kv.groups())
        .unwrap();
}

/// One request's block ids: `n` blocks from `first`.
pub fn blocks(first: u32, n: u32) -> Vec<Vec<u32>> {
    vec![(first..first + n).collect()]
}

pub fn tokens(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| seed.wrapping_mul(100_003).wrapping_add(i))
        .collect()
}

/// `lookup`, then `query_prefetch_status` until it answers (a lookup promoting from L2 answers
/// "not yet" first): the chunks hit.
pub fn lookup_hits(c: &mut MpClient, key: &IpcCacheServerKey) -> u64 {
    c.lookup(key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(hits) = c.poll_prefetch_status(&key.request_id).unwrap() {
            return hits;
        }
        assert!(
            Instant::now() < deadline,
            "lookup {} never finished",
            key.request_id
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
