//! `cwm bench --l3 redis://…`: how fast cwm moves chunks to and from Redis, next to what
//! `redis-benchmark` moves with SET and GET of the same value size against the same server, and
//! what a lookup that misses L1/L2 costs in round trips.
//!
//! Put and get go through the L3 tier itself: `put` (write-behind's batch of records, SET with a
//! TTL) and `promote` (GET, verification, decode, copy into an L1 store). Every round is timed,
//! including the first, which also connects: the bench starts in a fresh process and warms
//! nothing up. Each round's keys are deleted afterwards (untimed), so Redis holds one round at a
//! time. Timings are reported, never asserted.

use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use connector_protocol::{kv_rank, ChunkHash, ObjectKey};

use super::report::Machine;
use super::{gbps, Samples};
use crate::store::codec::CompressionPolicy;
use crate::store::l3::config::{Endpoints, L3Config, WritePolicy};
use crate::store::l3::L3;
use crate::store::record;
use crate::store::tier::{Fetched, Tier};
use crate::store::{L1Config, L1Store};

/// Records per put and per get: write-behind's batch.
const BATCH: usize = 16;

/// Chunks of a 4096-token prefix at the default chunk size (256 tokens).
const LOOKUP_CHUNKS: usize = 16;

pub struct L3BenchConfig {
    pub url: String,
    pub value_mib: Vec<u64>,
    /// Bytes put and got per round (rounded up to whole batches).
    pub round_bytes: u64,
    pub rounds: usize,
    pub connections: usize,
    pub timeout: Duration,
    /// Also run `redis-benchmark` with the same value sizes and concurrency.
    pub redis_benchmark: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ValueResults {
    pub value_bytes: u64,
    pub values_per_round: usize,
    pub put: Samples,
    pub get: Samples,
    pub put_gbps: f64,
    pub get_gbps: f64,
    /// `redis-benchmark` SET and GET of the same value size, GB/s (None when not run).
    pub raw_set_gbps: Option<f64>,
    pub raw_get_gbps: Option<f64>,
    pub raw_command: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct L3Report {
    pub machine: Machine,
    pub unix_time: u64,
    pub server: String,
    pub connections: usize,
    pub values: Vec<ValueResults>,
    /// Round trips of the existence check of a 4096-token prefix absent from L3.
    pub lookup_chunks: usize,
    pub lookup_round_trips: u64,
}

/// A key no other bench run or sidecar uses.
fn bench_key(run: u64, value: u64, round: usize, i: usize) -> ObjectKey {
    let mut h = blake3::Hasher::new();
    for x in [run, value, round as u64, i as u64] {
        h.update(&x.to_le_bytes());
    }
    ObjectKey {
        model: "cwm-bench-l3".into(),
        kv_rank: kv_rank(1, 0),
        object_group: 0,
        chunk_hash: ChunkHash(*h.finalize().as_bytes()),
        cache_salt: "".into(),
    }
}

/// Incompressible bytes (the records are stored uncompressed anyway).
fn payload(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    out
}

pub fn run(cfg: &L3BenchConfig) -> anyhow::Result<L3Report> {
    let machine = Machine::detect();
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id());
    let l3 = L3::open(L3Config {
        endpoints: Endpoints::Single(cfg.url.clone()),
        password: std::env::var("CWM_L3_PASSWORD").ok(),
        tls_ca: None,
        namespace: format!("cwm-bench-{}", std::process::id()),
        write: WritePolicy::Never,
        timeout: cfg.timeout,
        connections: cfg.connections,
        ttl: Duration::from_secs(3600),
        sealer: Default::default(),
        quotas: Default::default(),
    })?;
    let mut values = Vec::new();
    for &mib in &cfg.value_mib {
        values.push(measure_value(&l3, cfg, run_id, mib << 20)?);
    }
    let round_trips = || l3.link().batches().round_trips.load(Relaxed);
    let before = round_trips();
    let absent: Vec<ObjectKey> = (0..LOOKUP_CHUNKS)
        .map(|i| bench_key(run_id, 0, usize::MAX, i))
        .collect();
    ensure!(
        l3.existing(&absent).is_empty() && l3.link().is_up(),
        "the lookup check failed: {:?}",
        l3.link().status()
    );
    let lookup_round_trips = round_trips() - before;
    let mut values_with_raw = Vec::new();
    for mut v in values {
        if cfg.redis_benchmark {
            let (set, get, command) = redis_benchmark(cfg, &v)?;
            v.raw_set_gbps = Some(set);
            v.raw_get_gbps = Some(get);
            v.raw_command = Some(command);
        }
        values_with_raw.push(v);
    }
    Ok(L3Report {
        machine,
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        server: crate::store::l3::config::redacted(&cfg.url),
        connections: cfg.connections,
        values: values_with_raw,
        lookup_chunks: LOOKUP_CHUNKS,
        lookup_round_trips,
    })
}

fn measure_value(
    l3: &L3,
    cfg: &L3BenchConfig,
    run_id: u64,
    value: u64,
) -> anyhow::Result<ValueResults> {
    let raw = payload(value as usize);
    let per_round = (cfg.round_bytes.div_ceil(value) as usize)
        .div_ceil(BATCH)
        .max(1)
        * BATCH;
    // L1 holds one batch of promoted values (emptied between batches).
    let l1 = L1Store::new(&L1Config {
        capacity_bytes: (BATCH as u64 + 1) * value + (64 << 20),
        lock_ttl: Duration::from_secs(60),
    })
    .context("allocate the L1 store that gets are promoted into")?;
    let (mut puts, mut gets) = (Vec::new(), Vec::new());
    for round in 0..cfg.rounds.max(1) {
        let keys: Vec<ObjectKey> = (0..per_round)
            .map(|i| bench_key(run_id, value, round, i))
            .collect();
        let mut put = Duration::ZERO;
        for batch in keys.chunks(BATCH) {
            let records = batch
                .iter()
                .map(|k| {
                    (
                        k.clone(),
                        record::encode(k, &raw, 2, CompressionPolicy::DISABLED),
                    )
                })
                .collect();
            let t = Instant::now();
            let n = l3
                .set(records, true)
                .with_context(|| format!("put {value}-byte values"))?;
            put += t.elapsed();
            ensure!(n == batch.len(), "put {n} of {} values", batch.len());
        }
        let mut get = Duration::ZERO;
        for batch in keys.chunks(BATCH) {
            let t = Instant::now();
            let reserve = |k: &ObjectKey, len: u64| l1.reserve(k, len);
            let got = l3
                .fetch(batch, &reserve)
                .into_iter()
                .filter_map(|f| match f {
                    Fetched::Read(object) => {
                        object.commit();
                        Some(())
                    }
                    _ => None,
                })
                .count();
            get += t.elapsed();
            ensure!(
                got == batch.len(),
                "got {got} of {} values back: {:?}",
                batch.len(),
                l3.link().status()
            );
            let back = l1.read(&batch[0]).context("a promoted value is in L1")?;
            ensure!(back.to_vec() == raw, "a value came back changed");
            drop(back);
            l1.clear(true);
        }
        remove(l3, &keys)?;
        puts.push(put);
        gets.push(get);
    }
    let bytes = per_round as u64 * value;
    let (put, get) = (Samples::new(puts), Samples::new(gets));
    Ok(ValueResults {
        value_bytes: value,
        values_per_round: per_round,
        put_gbps: gbps(bytes, put.median()),
        get_gbps: gbps(bytes, get.median()),
        put,
        get,
        raw_set_gbps: None,
        raw_get_gbps: None,
        raw_command: None,
    })
}

fn remove(l3: &L3, keys: &[ObjectKey]) -> anyhow::Result<()> {
    let cmds = keys
        .iter()
        .map(|k| {
            let mut c = redis::cmd("UNLINK");
            c.arg(l3.keys().chunk(k));
            c
        })
        .collect();
    l3.link().batch(cmds).context("delete the bench's keys")?;
    Ok(())
}

/// `redis-benchmark` SET and GET of `v`'s value size, as many requests as the bench's rounds
/// moved, with the same concurrency: `connections` clients, one request in flight each.
fn redis_benchmark(cfg: &L3BenchConfig, v: &ValueResults) -> anyhow::Result<(f64, f64, String)> {
    let info = redis::parse_redis_url(&cfg.url).context("parse --l3")?;
    let host = info.host_str().unwrap_or("127.0.0.1").to_string();
    let port = info.port().unwrap_or(6379).to_string();
    let requests = (v.values_per_round * cfg.rounds.max(1)).to_string();
    let args = [
        "-h",
        &host,
        "-p",
        &port,
        "-t",
        "set,get",
        "-d",
        &v.value_bytes.to_string(),
        "-n",
        &requests,
        "-c",
        &cfg.connections.to_string(),
        "-P",
        "1",
        "--csv",
    ]
    .map(String::from);
    let command = format!("redis-benchmark {}", args.join(" "));
    let out = Command::new("redis-benchmark")
        .args(&args)
        .output()
        .context("run redis-benchmark (install redis-tools, or pass --l3-no-redis-benchmark)")?;
    ensure!(
        out.status.success(),
        "{command} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = |test: &str| -> anyhow::Result<f64> {
        for line in text.lines() {
            let mut fields = line.split(',').map(|f| f.trim_matches('"'));
            if fields.next() == Some(test) {
                return fields
                    .next()
                    .and_then(|r| r.parse().ok())
                    .with_context(|| format!("redis-benchmark line {line:?}"));
            }
        }
        bail!("redis-benchmark printed no {test} line: {text}")
    };
    let gb = |rps: f64| rps * v.value_bytes as f64 / 1e9;
    Ok((gb(rps("SET")?), gb(rps("GET")?), command))
}

impl L3Report {
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(
            s,
            "machine {}, {} cores, {:.1} GiB, load {}",
            m.cpu, m.cores, m.memory_gib, m.load_average
        );
        let _ = writeln!(
            s,
            "L3 Redis at {}, {} connections, {} rounds per size (the first one connects)",
            self.server,
            self.connections,
            self.values.first().map_or(0, |v| v.put.len())
        );
        let _ = writeln!(
            s,
            "{:>9} {:>7} {:>10} {:>10} {:>12} {:>12} {:>7} {:>7}",
            "value",
            "values",
            "put GB/s",
            "get GB/s",
            "raw SET GB/s",
            "raw GET GB/s",
            "put %",
            "get %"
        );
        for v in &self.values {
            let pct = |ours: f64, raw: Option<f64>| {
                raw.map_or("-".to_string(), |r| format!("{:.0}%", 100.0 * ours / r))
            };
            let raw = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
            let _ = writeln!(
                s,
                "{:>6} MiB {:>7} {:>10.2} {:>10.2} {:>12} {:>12} {:>7} {:>7}",
                v.value_bytes >> 20,
                v.values_per_round,
                v.put_gbps,
                v.get_gbps,
                raw(v.raw_set_gbps),
                raw(v.raw_get_gbps),
                pct(v.put_gbps, v.raw_set_gbps),
                pct(v.get_gbps, v.raw_get_gbps),
            );
            let _ = writeln!(
                s,
                "           put per round min/median/max {:.3}/{:.3}/{:.3} s, get {:.3}/{:.3}/{:.3} s",
                v.put.min().as_secs_f64(),
                v.put.median().as_secs_f64(),
                v.put.max().as_secs_f64(),
                v.get.min().as_secs_f64(),
                v.get.median().as_secs_f64(),
                v.get.max().as_secs_f64(),
            );
            if let Some(c) = &v.raw_command {
                let _ = writeln!(s, "           raw: {c}");
            }
        }
        let _ = writeln!(
            s,
            "lookup of {} chunks absent from L1/L2/L3: {} round trip(s) to Redis",
            self.lookup_chunks, self.lookup_round_trips
        );
        s
    }
}
