//! The protocol benchmark: what a vLLM worker and scheduler see through the real MP protocol.
//!
//! Two engine instances (source and destination caches, same geometry) register with the
//! server. Each round stores a fresh request from the source, looks it up as the scheduler
//! does (`lookup` + `query_prefetch_status`) and retrieves it into the destination; the first,
//! untimed round also checks that the destination received exactly the source's bytes. Then
//! many lookups of a stored prefix measure the scheduler's latency.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use connector_protocol::IpcCacheServerKey;

use super::kv::{BenchKv, KvGeometry, KvShape};
use super::Samples;
use crate::client::MpClient;
use crate::ops::Cwm;

/// Model name the bench registers and stores under.
pub const MODEL: &str = "cwm-bench/llama-3.1-8b-like";

#[derive(Debug, Clone)]
pub struct MpConfig {
    pub tokens: u64,
    pub layers: u64,
    pub heads: u64,
    pub head_dim: u64,
    pub block_size: u64,
    pub shape: KvShape,
    pub iterations: usize,
    pub lookups: usize,
}

impl MpConfig {
    /// An engine cache that holds one request: its blocks, plus block 0, vLLM's null block,
    /// never part of a request.
    pub fn geometry(&self) -> KvGeometry {
        KvGeometry {
            shape: self.shape,
            layers: self.layers,
            blocks: self.tokens / self.block_size + 1,
            block_size: self.block_size,
            heads: self.heads,
            content: 2 * self.head_dim,
        }
    }
}

/// Mean time the server spent handling one op (between decode and reply), from its counters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerTimes {
    pub store_us: f64,
    pub retrieve_us: f64,
    pub lookup_us: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MpResults {
    pub endpoint: String,
    pub chunk_size: u64,
    pub chunks: u64,
    pub object_bytes: u64,
    /// Bytes one store (or retrieve) of the request moves: chunks x object bytes.
    pub request_bytes: u64,
    pub geometry: KvGeometry,
    pub store: Samples,
    pub retrieve: Samples,
    /// `lookup` then `query_prefetch_status`, one scheduler step.
    pub lookup_query: Samples,
    pub lookup: Samples,
    pub query: Samples,
    /// Chunks the lookup reported as hits (all of the request's).
    pub lookup_hit: u64,
    /// Server-side handling times (only for an in-process server).
    pub server: Option<ServerTimes>,
    pub checks: Vec<String>,
}

/// The timings of one store / lookup / retrieve round.
pub(super) struct Round {
    pub store: Duration,
    /// The first scheduler step after the store (`lookup` + `query_prefetch_status`).
    pub lookup: Duration,
    pub retrieve: Duration,
    pub hit: u64,
}

/// What the source engine cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SourceFill {
    /// Random bytes: cheap to make, incompressible (L2 stores them raw).
    Random,
    /// bf16 values of a normal distribution: compresses like a real cache.
    KvLike,
}

/// A client with a source and a destination engine cache registered, each holding one request:
/// what every shape of the protocol bench drives.
pub(super) struct Bench<'a> {
    pub client: MpClient,
    cfg: &'a MpConfig,
    pub chunk_size: u64,
    src_id: u64,
    dst_id: u64,
    blocks: Vec<Vec<u32>>,
}

/// Run the protocol bench against `endpoint`. `local` is the in-process server, if any: its
/// counters split time into server and transport. `between_rounds` runs after every timed
/// round, outside the timings (the bench measures its memcpy baseline there).
pub fn run(
    cfg: &MpConfig,
    endpoint: &str,
    local: Option<&Cwm>,
    between_rounds: &mut dyn FnMut(),
) -> anyhow::Result<MpResults> {
    let (mut bench, src, dst) = Bench::open(cfg, endpoint, SourceFill::Random)?;
    let block_ids = bench.blocks[0].clone();
    let geometry = cfg.geometry();
    let result = bench.measure(&src, &dst, &block_ids, geometry, local, between_rounds);
    let chunk_size = bench.chunk_size;
    bench.close();
    let _ = bench.client.clear(true);
    let (mut samples, mut checks, server) = result?;
    let chunks = cfg.tokens / chunk_size;
    let object_bytes = geometry.object_bytes(chunk_size);
    checks.insert(
        0,
        format!(
            "lookup of a stored {}-token prefix: {} of {chunks} chunks hit in every call",
            cfg.tokens, samples.hit
        ),
    );
    Ok(MpResults {
        endpoint: endpoint.to_string(),
        chunk_size,
        chunks,
        object_bytes,
        request_bytes: chunks * object_bytes,
        geometry,
        store: Samples::new(std::mem::take(&mut samples.store)),
        retrieve: Samples::new(std::mem::take(&mut samples.retrieve)),
        lookup_query: Samples::new(std::mem::take(&mut samples.lookup_query)),
        lookup: Samples::new(std::mem::take(&mut samples.lookup)),
        query: Samples::new(std::mem::take(&mut samples.query)),
        lookup_hit: samples.hit,
        server,
        checks,
    })
}

#[derive(Default)]
struct Collected {
    store: Vec<Duration>,
    retrieve: Vec<Duration>,
    lookup_query: Vec<Duration>,
    lookup: Vec<Duration>,
    query: Vec<Duration>,
    hit: u64,
}

impl<'a> Bench<'a> {
    /// Connect to `endpoint`, create the two engine caches (the source filled as `fill` says,
    /// the destination zeroed) and register them.
    pub fn open(
        cfg: &'a MpConfig,
        endpoint: &str,
        fill: SourceFill,
    ) -> anyhow::Result<(Bench<'a>, BenchKv, BenchKv)> {
        let mut client =
            MpClient::connect(endpoint).with_context(|| format!("connect to {endpoint}"))?;
        client.timeout = Duration::from_secs(120);
        let chunk_size = client
            .get_chunk_size()
            .with_context(|| format!("get_chunk_size from {endpoint}"))?;
        ensure!(
            chunk_size > 0 && cfg.tokens > 0 && cfg.tokens % chunk_size == 0,
            "--tokens {} must be a positive multiple of the server's chunk size {chunk_size}",
            cfg.tokens
        );
        ensure!(
            cfg.block_size > 0 && chunk_size % cfg.block_size == 0,
            "--block-size {} must divide the chunk size {chunk_size}",
            cfg.block_size
        );
        let geometry = cfg.geometry();
        let mut src = BenchKv::create("src", geometry).context("create the source KV cache")?;
        let mut dst =
            BenchKv::create("dst", geometry).context("create the destination KV cache")?;
        match fill {
            SourceFill::Random => src.fill_pattern(0xc0ffee),
            SourceFill::KvLike => src.fill_bf16_normal(0xc0ffee),
        }
        dst.fill_byte(0);

        // Ids unlikely to collide with real engines on a shared external server.
        let src_id = (std::process::id() as u64) << 16;
        let dst_id = src_id + 1;
        let hint = Some(cfg.shape.hint());
        for (id, kv) in [(src_id, &src), (dst_id, &dst)] {
            client
                .register_kv_cache(id, &kv.descriptors(), MODEL, 1, hint, &kv.groups())
                .with_context(|| format!("register_kv_cache({id})"))?;
        }
        let block_ids: Vec<u32> = (1..=(cfg.tokens / cfg.block_size) as u32).collect();
        let bench = Bench {
            client,
            cfg,
            chunk_size,
            src_id,
            dst_id,
            blocks: vec![block_ids],
        };
        Ok((bench, src, dst))
    }

    /// Unregister both caches.
    pub fn close(&mut self) {
        for id in [self.src_id, self.dst_id] {
            let _ = self.client.unregister_kv_cache(id);
        }
    }

    /// The engine blocks a request occupies (the same in both caches).
    pub fn block_ids(&self) -> &[u32] {
        &self.blocks[0]
    }

    fn tokens(&self, seed: u64) -> Vec<u32> {
        request_tokens(self.cfg.tokens, seed)
    }

    /// How many chunks a `query_prefetch_status` answer means (cwm answers chunks; accept
    /// tokens too, so an external server answering in tokens is read right).
    fn hit_chunks(&self, answer: u64) -> u64 {
        if answer > self.cfg.tokens / self.chunk_size {
            answer / self.chunk_size
        } else {
            answer
        }
    }

    /// Store, look up and retrieve a fresh request made from `seed`.
    pub fn round(&mut self, seed: u64) -> anyhow::Result<Round> {
        let tokens = self.tokens(seed);
        let request_id = format!("cwm-bench-{seed}");
        let transfer_key = request_key(&tokens, &request_id, Some(0));
        let lookup_key = request_key(&tokens, &request_id, None);
        let chunks = self.cfg.tokens / self.chunk_size;

        let t = Instant::now();
        let stored = self
            .client
            .store(&transfer_key, self.src_id, &self.blocks)?;
        let store = t.elapsed();
        ensure!(stored.ok, "store of request {request_id} failed");

        // LMCache's server commits a store after answering it: look up until it is visible.
        let deadline = Instant::now() + self.client.timeout;
        let mut first_step = None;
        let hit = loop {
            let (lookup, query, hit) = scheduler_step(&mut self.client, &lookup_key)?;
            first_step.get_or_insert(lookup + query);
            if self.hit_chunks(hit) == chunks {
                break hit;
            }
            self.client.free_lookup_locks(&lookup_key)?;
            ensure!(
                Instant::now() < deadline,
                "lookup after store of {request_id} found {hit}, expected all {chunks} chunks"
            );
            std::thread::sleep(Duration::from_millis(1));
        };

        let t = Instant::now();
        let retrieved = self
            .client
            .retrieve(&transfer_key, self.dst_id, &self.blocks, 0)?;
        let retrieve = t.elapsed();
        ensure!(retrieved.ok, "retrieve of request {request_id} failed");
        self.client.end_session(&request_id)?;
        Ok(Round {
            store,
            lookup: first_step.unwrap_or_default(),
            retrieve,
            hit: self.hit_chunks(hit),
        })
    }

    /// Look up and retrieve the request of `seed` (already stored) into `instance`.
    fn retrieve_again(&mut self, seed: u64, instance: u64) -> anyhow::Result<()> {
        let tokens = self.tokens(seed);
        let request_id = format!("cwm-bench-{seed}-again");
        let chunks = self.cfg.tokens / self.chunk_size;
        let (_, _, hit) =
            scheduler_step(&mut self.client, &request_key(&tokens, &request_id, None))?;
        ensure!(
            self.hit_chunks(hit) == chunks,
            "lookup of {request_id} found {hit}, expected all {chunks} chunks"
        );
        let key = request_key(&tokens, &request_id, Some(0));
        let retrieved = self.client.retrieve(&key, instance, &self.blocks, 0)?;
        ensure!(
            retrieved.ok,
            "retrieve of {request_id} into instance {instance} failed"
        );
        self.client.end_session(&request_id)?;
        Ok(())
    }

    fn measure(
        &mut self,
        src: &BenchKv,
        dst: &BenchKv,
        block_ids: &[u32],
        geometry: KvGeometry,
        local: Option<&Cwm>,
        between_rounds: &mut dyn FnMut(),
    ) -> anyhow::Result<(Collected, Vec<String>, Option<ServerTimes>)> {
        let mut checks = Vec::new();
        // Round 0: untimed; faults the store's memory in and checks the bytes end to end.
        self.client.clear(true)?;
        self.round(0)?;
        if let Some((layer, block, byte)) = dst.first_difference(src, block_ids) {
            bail!("retrieved bytes differ from the stored ones: layer {layer}, block {block}, byte {byte}");
        }
        checks.push(format!(
            "retrieved == stored: {} blocks x {} layers compared byte for byte",
            block_ids.len(),
            geometry.layers
        ));
        // The same objects retrieved into a cache of the other layout hold the same logical
        // rows: the stored form does not depend on the engine layout that wrote it.
        let other_geometry = KvGeometry {
            shape: match geometry.shape {
                KvShape::Nhd => KvShape::Hnd,
                KvShape::Hnd => KvShape::Nhd,
            },
            ..geometry
        };
        let mut other =
            BenchKv::create("other", other_geometry).context("create the other-layout KV cache")?;
        other.fill_byte(0);
        let other_id = self.dst_id + 1;
        self.client.register_kv_cache(
            other_id,
            &other.descriptors(),
            MODEL,
            1,
            Some(other_geometry.shape.hint()),
            &other.groups(),
        )?;
        let cross = self.retrieve_again(0, other_id);
        let _ = self.client.unregister_kv_cache(other_id);
        cross?;
        if let Some((layer, block, token, head)) = src.first_logical_difference(&other, block_ids) {
            bail!("retrieved into a {:?} cache, layer {layer} block {block} token {token} head {head} differs from the stored {:?} rows", other_geometry.shape, geometry.shape);
        }
        drop(other);
        checks.push(format!(
            "retrieved into a {:?} cache == stored from {:?}, row by row (layout-independent objects)",
            other_geometry.shape, geometry.shape
        ));

        let before = local.map(server_counters);
        let mut out = Collected::default();
        for i in 1..=self.cfg.iterations as u64 {
            self.client.clear(true)?;
            let r = self.round(i)?;
            out.store.push(r.store);
            out.retrieve.push(r.retrieve);
            out.hit = r.hit;
            between_rounds();
        }
        let server = local.zip(before).map(|(c, before)| {
            let after = server_counters(c);
            let mean = |i: usize| {
                let (calls, micros) = (after[i].0 - before[i].0, after[i].1 - before[i].1);
                micros as f64 / calls.max(1) as f64
            };
            ServerTimes {
                store_us: mean(0),
                retrieve_us: mean(1),
                lookup_us: mean(2),
            }
        });

        // Scheduler latency: the last round's request stays stored (clears come before rounds).
        let tokens = self.tokens(self.cfg.iterations as u64);
        let chunks = self.cfg.tokens / self.chunk_size;
        let (mut lookups, mut queries, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
        for j in 0..self.cfg.lookups {
            let key = request_key(&tokens, &format!("cwm-bench-lookup-{j}"), None);
            let (lookup, query, hit) = scheduler_step(&mut self.client, &key)?;
            ensure!(
                self.hit_chunks(hit) == chunks,
                "lookup {j} found {hit}, expected all {chunks} chunks"
            );
            out.hit = self.hit_chunks(hit);
            lookups.push(lookup);
            queries.push(query);
            pairs.push(lookup + query);
            // A scheduler that does not go on to retrieve gives its locks back.
            self.client.free_lookup_locks(&key)?;
            self.client.end_session(&key.request_id)?;
        }
        out.lookup = lookups;
        out.query = queries;
        out.lookup_query = pairs;
        Ok((out, checks, server))
    }
}

/// The token ids of the request made from `seed`: `n` ids, distinct per seed.
pub(super) fn request_tokens(n: u64, seed: u64) -> Vec<u32> {
    let base = (seed as u32).wrapping_mul(0x9e37_79b9);
    (0..n as u32).map(|t| base.wrapping_add(t)).collect()
}

/// The key of a whole request under the bench's model: a lookup key without `worker_id`, a
/// transfer key with it.
pub(super) fn request_key(
    tokens: &[u32],
    request_id: &str,
    worker_id: Option<u32>,
) -> IpcCacheServerKey {
    IpcCacheServerKey {
        model_name: MODEL.into(),
        world_size: 1,
        worker_id,
        token_ids: tokens.to_vec(),
        start: 0,
        end: tokens.len() as u64,
        request_id: request_id.into(),
        cache_salt: String::new(),
        request_configs: None,
        num_kv_readers: 1,
    }
}

/// One scheduler step as vLLM's scheduler takes it: `lookup`, then `query_prefetch_status`
/// until it answers (cwm answers the first query; LMCache answers nil while its lookup is
/// still running). Returns (lookup time, time of all queries, hit).
pub(super) fn scheduler_step(
    client: &mut MpClient,
    key: &IpcCacheServerKey,
) -> anyhow::Result<(Duration, Duration, u64)> {
    let t = Instant::now();
    client.lookup(key)?;
    let lookup = t.elapsed();
    let t = Instant::now();
    loop {
        if let Some(hit) = client.poll_prefetch_status(&key.request_id)? {
            return Ok((lookup, t.elapsed(), hit));
        }
        ensure!(
            t.elapsed() < client.timeout,
            "lookup of {} still running after {:?}",
            key.request_id,
            client.timeout
        );
    }
}

/// (calls, total µs) of store, retrieve and lookup in the server's counters.
fn server_counters(cwm: &Cwm) -> [(u64, u64); 3] {
    ["store", "retrieve", "lookup"].map(|op| {
        let s = cwm.counters.op(op);
        (s.calls, s.total_micros)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::serve::Sidecar;

    #[test]
    fn tiny_model_round_trips_through_an_in_process_server() {
        let sidecar = Sidecar::start(&Config {
            host: "127.0.0.1".into(),
            port: 0,
            http_port: 0,
            l1_size_gb: 0.0625,
            l2_size_gb: 0.0,
            ..Config::default()
        })
        .unwrap();
        let cfg = MpConfig {
            tokens: 512,
            layers: 2,
            heads: 2,
            head_dim: 16,
            block_size: 16,
            shape: KvShape::Hnd,
            iterations: 2,
            lookups: 5,
        };
        let mut between = 0;
        let r = run(&cfg, &sidecar.mp_endpoint, Some(&sidecar.cwm), &mut || {
            between += 1
        })
        .unwrap();
        assert_eq!(between, 2);
        assert_eq!((r.chunks, r.lookup_hit), (2, 2));
        assert_eq!(r.request_bytes, 512 * 2 * 2 * 32 * 2);
        assert_eq!((r.store.len(), r.retrieve.len(), r.lookup.len()), (2, 2, 5));
        assert_eq!(r.checks.len(), 3, "{:?}", r.checks);
        assert!(r.server.is_some());
    }
}
