//! `cwm bench`: store and retrieve bandwidth and lookup latency through the real MP protocol,
//! next to a plain memcpy of the same bytes on the same machine.
//!
//! By default the bench starts a cwm sidecar in this process on a free port (`--url` points it
//! at any other server speaking the protocol, e.g. LMCache's) and talks to it only through
//! `MpClient`, as vLLM's connector would; the in-process server additionally lends its counters
//! (time spent in the server vs in transport) and its store (checking the object layout).
//! Timings are reported, never asserted.
//!
//! Shapes: the steady state (the default, `mp`: an untimed first round, then rounds within
//! L1), `--realistic` (`realistic`: fresh servers, no warm-up, beyond L1, disk tier off and
//! on), `--window` (`window`: freeze and thaw), and `--null-server` (`null_server`: a server
//! that answers instantly, the floor a client measures against).

pub mod chart;
pub mod disk;
pub mod gpu;
pub mod kv;
pub mod l3;
pub mod memcpy;
pub mod mp;
pub mod null_server;
pub mod realistic;
mod report;
pub mod tiers;
pub mod window;

use std::time::Duration;

use anyhow::{ensure, Context};

use crate::config::Config;
use crate::serve::Sidecar;
pub use kv::KvShape;
pub use report::Machine;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Tokens per request (a multiple of the server's chunk size).
    #[arg(long, default_value_t = 4096)]
    pub tokens: u64,
    /// Model layers.
    #[arg(long, default_value_t = 32)]
    pub layers: u64,
    /// KV heads per layer (per rank).
    #[arg(long, default_value_t = 8)]
    pub kv_heads: u64,
    /// Head dimension; each token's head holds K and V, 2 x head_dim bf16 values.
    #[arg(long, default_value_t = 128)]
    pub head_dim: u64,
    /// Tokens per engine block (must divide the chunk size).
    #[arg(long, default_value_t = 16)]
    pub block_size: u64,
    /// Timed store/lookup/retrieve rounds (after one untimed warm-up and check round).
    #[arg(long, default_value_t = 10)]
    pub iterations: usize,
    /// Measure what users see instead of the steady state: four fresh in-process servers
    /// (disk tier off, on, on, off), no warm-up, `--requests` requests each back to back
    /// through an L1 smaller than them; prints first-request, p50 and p99 of store, lookup
    /// and retrieve, evictions, L2 write amplification, and the lookup floor of a null server.
    #[arg(long, conflicts_with_all = ["window", "url"])]
    pub realistic: bool,
    /// Requests per run of `--realistic` (store, lookup, retrieve each).
    #[arg(long, default_value_t = 16)]
    pub requests: usize,
    /// Pause between the requests of `--realistic` in ms, outside the timings [default: back
    /// to back, the worst case for the disk tier].
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
    /// Serve the MP protocol on 127.0.0.1:PORT with instant, empty answers (every lookup a
    /// miss, every transfer acknowledged without a copy) until killed: the floor a client
    /// measures against (`benches/vs_lmcache.sh` runs LMCache's bench against it).
    #[arg(long, value_name = "PORT", conflicts_with_all = ["window", "realistic", "url"])]
    pub null_server: Option<u16>,
    /// Lookup + query_prefetch_status round trips for the latency figures.
    #[arg(long, default_value_t = 1000)]
    pub lookups: usize,
    /// Engine KV layout: nhd = [NB, BS, NH, C] (vLLM on GPU), hnd = [NB, NH, BS, C] (vLLM on CPU).
    #[arg(long, value_enum, default_value_t = KvShape::Nhd)]
    pub layout: KvShape,
    /// Bench the server at this ZMQ endpoint (e.g. tcp://127.0.0.1:5555) instead of an
    /// in-process cwm. It must be able to open this machine's /dev/shm, and it is cleared
    /// (`clear(force)`) before every round.
    #[arg(long)]
    pub url: Option<String>,
    /// Transfer lanes of the in-process server [default: cwm serve's].
    #[arg(long)]
    pub lanes: Option<usize>,
    /// Threads of the copy pool (rayon) [default: one per core].
    #[arg(long)]
    pub copy_threads: Option<usize>,
    /// L1 size of the in-process server in GiB [default: twice the request; with
    /// `--realistic`, four requests].
    #[arg(long)]
    pub l1_size_gb: Option<f64>,
    /// Give the in-process server an L2 disk tier in this directory (write-behind from every
    /// store) [default: memory only]. With `--realistic`: where the L2-on runs put theirs
    /// [default: a directory under the system's temp dir]; removed after each run.
    #[arg(long)]
    pub l2_path: Option<std::path::PathBuf>,
    /// memcpy baseline copies before the rounds (one more follows every round).
    #[arg(long, default_value_t = 5)]
    pub memcpy_repeats: usize,
    /// Measure a context window instead: store `--tokens` tokens, freeze them into L2, thaw
    /// them back after a restart (`--iterations` cold and warm thaws; L2 in `--l2-path` or a
    /// fresh directory under the system's temp dir, removed afterwards).
    #[arg(long)]
    pub window: bool,
    /// Measure L3 instead: put and get of `--l3-value-mib` values through cwm's Redis path
    /// against this Redis (`--iterations` rounds of `--l3-round-mib`), next to `redis-benchmark`
    /// SET/GET of the same sizes, and the round trips of a 4096-token lookup.
    #[arg(long, value_name = "URL")]
    pub l3: Option<String>,
    /// Value sizes of the L3 bench, in MiB.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    pub l3_value_mib: Vec<u64>,
    /// Bytes put and got per L3 round, in MiB.
    #[arg(long, default_value_t = 512)]
    pub l3_round_mib: u64,
    /// Connections to Redis (and redis-benchmark clients) [default: cwm serve's].
    #[arg(long)]
    pub l3_connections: Option<usize>,
    /// Skip the redis-benchmark comparison.
    #[arg(long)]
    pub l3_no_redis_benchmark: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub part: Option<BenchPart>,
}

/// Benches run as a subcommand of `cwm bench`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchPart {
    /// Every configured tier in one sitting (L1 through the protocol, L2, L3, a window, GPU),
    /// each next to the machine's own limit, with a chart.
    Tiers(Box<tiers::TiersArgs>),
}

impl BenchArgs {
    /// The request and model the protocol bench (and the window bench) run with.
    pub fn mp_config(&self) -> mp::MpConfig {
        mp::MpConfig {
            tokens: self.tokens,
            layers: self.layers,
            heads: self.kv_heads,
            head_dim: self.head_dim,
            block_size: self.block_size,
            shape: self.layout,
            iterations: self.iterations.max(1),
            lookups: self.lookups,
        }
    }

    /// Bytes one request moves: every layer's K and V of every token.
    pub fn request_bytes(&self) -> u64 {
        self.tokens * self.layers * self.kv_heads * 2 * self.head_dim * kv::ITEMSIZE
    }

    /// `--l1-size-gb`, else `requests` requests' worth rounded up to a quarter GiB.
    fn l1_size_gb_or(&self, requests: f64) -> f64 {
        self.l1_size_gb.unwrap_or_else(|| {
            let gib = requests * self.request_bytes() as f64 / (1u64 << 30) as f64;
            (gib * 4.0).ceil() / 4.0
        })
    }
}

/// Durations of repeated runs of one thing, sorted.
#[derive(Debug, Clone, Default)]
pub struct Samples(Vec<Duration>);

impl Samples {
    pub fn new(mut v: Vec<Duration>) -> Samples {
        v.sort();
        Samples(v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn min(&self) -> Duration {
        self.0.first().copied().unwrap_or_default()
    }

    pub fn max(&self) -> Duration {
        self.0.last().copied().unwrap_or_default()
    }

    /// Nearest-rank quantile, `q` in `[0, 1]`.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let rank = (q * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    pub fn median(&self) -> Duration {
        self.quantile(0.5)
    }

    /// Every sample of `parts` in one set.
    pub fn merged<'a>(parts: impl IntoIterator<Item = &'a Samples>) -> Samples {
        Samples::new(
            parts
                .into_iter()
                .flat_map(|s| s.0.iter().copied())
                .collect(),
        )
    }

    pub fn mean(&self) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.iter().sum::<Duration>() / self.0.len() as u32
    }
}

impl serde::Serialize for Samples {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let mut st = s.serialize_struct("Samples", 6)?;
        st.serialize_field("n", &self.len())?;
        st.serialize_field("min_us", &us(self.min()))?;
        st.serialize_field("p50_us", &us(self.median()))?;
        st.serialize_field("p99_us", &us(self.quantile(0.99)))?;
        st.serialize_field("max_us", &us(self.max()))?;
        st.serialize_field("mean_us", &us(self.mean()))?;
        st.end()
    }
}

/// The directory a bench writes under: `given`, else a fresh one under the system's temp dir
/// (`true`: the caller removes it afterwards).
pub(crate) fn scratch_dir(
    given: &Option<std::path::PathBuf>,
    bench: &str,
) -> (std::path::PathBuf, bool) {
    match given {
        Some(p) => (p.clone(), false),
        None => (
            std::env::temp_dir().join(format!("cwm-bench-{bench}-{}", std::process::id())),
            true,
        ),
    }
}

/// Seconds since the Unix epoch, for a report's timestamp.
pub(crate) fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Decimal GB/s.
pub fn gbps(bytes: u64, d: Duration) -> f64 {
    if d.is_zero() {
        return 0.0;
    }
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Run the whole bench and print its report.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(BenchPart::Tiers(t)) = &args.part {
        return tiers::run(t);
    }
    if let Some(n) = args.copy_threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("configure the copy pool")?;
    }
    if let Some(url) = &args.l3 {
        return run_l3(args, url);
    }
    let machine = Machine::detect();
    if let Some(port) = args.null_server {
        return serve_null(port);
    }
    if args.window {
        return run_window(args, machine);
    }
    if args.realistic {
        return run_realistic(args, machine);
    }
    // The yardstick first, while nothing else holds memory or cores, then between rounds.
    let mut baseline = memcpy::Baseline::new(args.request_bytes() as usize);
    for _ in 0..args.memcpy_repeats.max(1) {
        baseline.measure();
    }

    let defaults = Config::default();
    let lanes = args.lanes.unwrap_or(defaults.transfer_lanes);
    let sidecar = match &args.url {
        Some(_) => None,
        None => {
            let l1_size_gb = args
                .l1_size_gb
                .unwrap_or_else(|| args.l1_size_gb_or(2.0) + 0.25);
            Some(
                Sidecar::start(&Config {
                    host: "127.0.0.1".into(),
                    port: 0,
                    http_port: 0,
                    l1_size_gb,
                    transfer_lanes: lanes,
                    l2_size_gb: if args.l2_path.is_some() {
                        defaults.l2_size_gb
                    } else {
                        0.0
                    },
                    l2_path: args.l2_path.clone().unwrap_or(defaults.l2_path.clone()),
                    ..defaults.clone()
                })
                .context("start the in-process cwm")?,
            )
        }
    };
    let endpoint = match (&args.url, &sidecar) {
        (Some(url), _) => url.clone(),
        (None, Some(s)) => s.mp_endpoint.clone(),
        (None, None) => unreachable!("a sidecar is started when no --url is given"),
    };
    let cfg = args.mp_config();
    let results = mp::run(
        &cfg,
        &endpoint,
        sidecar.as_ref().map(|s| &*s.cwm),
        &mut || baseline.measure(),
    );
    if let Some(s) = sidecar {
        s.stop();
    }
    let report = report::Report {
        machine,
        server: match &args.url {
            Some(_) => "external server".into(),
            None => format!(
                "in-process cwm ({lanes} transfer lanes, {} copy threads, {})",
                rayon::current_num_threads(),
                match &args.l2_path {
                    Some(p) => format!("L2 on disk at {}", p.display()),
                    None => "memory only".into(),
                }
            ),
        },
        unix_time: unix_time(),
        memcpy: baseline.results(),
        mp: results?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn serve_null(port: u16) -> anyhow::Result<()> {
    let server =
        null_server::NullServer::bind("127.0.0.1", port, Config::default().chunk_size as u64)?;
    // The line scripts wait for before they start their clients.
    println!("null server listening on {}", server.endpoint());
    server.run(&std::sync::atomic::AtomicBool::new(false))?;
    Ok(())
}

fn run_realistic(args: &BenchArgs, machine: Machine) -> anyhow::Result<()> {
    let defaults = Config::default();
    let (l2_root, temporary) = scratch_dir(&args.l2_path, "realistic");
    let l1_size_gb = args.l1_size_gb_or(4.0);
    let lanes = args.lanes.unwrap_or(defaults.transfer_lanes);
    let cfg = realistic::RealisticConfig {
        mp: args.mp_config(),
        requests: args.requests,
        interval: Duration::from_millis(args.interval_ms),
        l1_size_gb,
        l2_root: l2_root.clone(),
        floor_lookups: args.lookups,
        base: Config {
            transfer_lanes: lanes,
            ..defaults.clone()
        },
    };
    let mut baseline = memcpy::Baseline::new(args.request_bytes() as usize);
    let result = realistic::run(&cfg, &mut || baseline.measure());
    if temporary {
        let _ = std::fs::remove_dir_all(&l2_root);
    }
    let report = realistic::RealisticReport {
        machine,
        unix_time: unix_time(),
        server: format!(
            "in-process cwm, `cwm serve` defaults ({lanes} transfer lanes, {} copy threads, L1 populate {:?}, L2 zstd {} in {}) but L1 {l1_size_gb} GiB",
            rayon::current_num_threads(),
            defaults.l1_populate,
            defaults.l2_compression_level,
            l2_root.display()
        ),
        l1_size_gb,
        memcpy: baseline.results(),
        realistic: result?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn run_l3(args: &BenchArgs, url: &str) -> anyhow::Result<()> {
    let defaults = Config::default();
    let report = l3::run(&l3::L3BenchConfig {
        url: url.to_string(),
        value_mib: args.l3_value_mib.clone(),
        round_bytes: args.l3_round_mib << 20,
        rounds: args.iterations.max(1),
        connections: args.l3_connections.unwrap_or(defaults.l3_connections),
        timeout: Duration::from_millis(defaults.l3_timeout_ms),
        redis_benchmark: !args.l3_no_redis_benchmark,
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn run_window(args: &BenchArgs, machine: Machine) -> anyhow::Result<()> {
    ensure!(args.url.is_none(), "--window runs an in-process cwm only");
    let (l2_path, temporary) = scratch_dir(&args.l2_path, "window");
    let geometry = args.mp_config().geometry();
    let mut baseline = memcpy::Baseline::new(geometry.object_bytes(256) as usize);
    baseline.measure();
    let defaults = Config::default();
    let cfg = window::WindowConfig {
        geometry,
        tokens: args.tokens,
        repeats: args.iterations.max(1),
        l2_path: l2_path.clone(),
        base: Config {
            transfer_lanes: args.lanes.unwrap_or(defaults.transfer_lanes),
            ..defaults
        },
    };
    let result = window::run(&cfg, &mut || baseline.measure());
    if temporary {
        let _ = std::fs::remove_dir_all(&l2_path);
    }
    let report = window::WindowReport {
        machine,
        unix_time: unix_time(),
        memcpy: baseline.results(),
        window: result?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let s = Samples::new((1..=100).rev().map(Duration::from_micros).collect());
        assert_eq!(s.median(), Duration::from_micros(50));
        assert_eq!(s.quantile(0.99), Duration::from_micros(99));
        assert_eq!(
            (s.min(), s.max()),
            (Duration::from_micros(1), Duration::from_micros(100))
        );
        assert_eq!(Samples::default().quantile(0.5), Duration::ZERO);
    }

    #[test]
    fn llama_8b_request_is_512_mib() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let args = Cli::parse_from(["cwm"]).bench;
        assert_eq!(args.request_bytes(), 512 << 20);
    }
}
