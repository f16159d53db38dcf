//! `cwm bench tiers`: one sitting over every configured tier, each figure next to this
//! machine's own limit for the same work, measured in the same run:
//!
//! | tier   | what is timed                                               | limit                      |
//! |--------|-------------------------------------------------------------|----------------------------|
//! | L1     | store and retrieve of a request through the MP protocol     | memcpy, all cores          |
//! | L2     | the write-behind's work: encode, compress, append, fsync    | O_DIRECT sequential write  |
//! | L2     | read, verify, decompress; page cache dropped / warm         | O_DIRECT read / memcpy     |
//! | L3     | put and get through cwm's Redis path (`--l3 URL`)           | redis-benchmark SET / GET  |
//! | window | freeze, thaw after a restart (cold), thaw with L1 emptied   | disk write / read / memcpy |
//! | GPU    | D2H / H2D of paged blocks through cwm's copy path (`gpu`)   | cuMemcpyDtoH / HtoD, pinned|
//!
//! The L2 write is one thread's work (the write-behind compresses a batch on up to two
//! background threads); an L2 read is one thread's too, so its warm limit is a one-thread
//! memcpy. The GPU figures need a CUDA driver and a GPU; without them the report says why, and
//! on the tests' CUDA driver stand-in they are labelled so (tier `GPU stand-in`).
//!
//! L2, L3 and the GPU run at every `--sizes-mib` value (or chunk) size (a 256-token chunk is
//! 0.5 MiB for a small model, 32 MiB for Llama-3.1-8B); L1 and the window at the `--tokens`
//! request of a Llama-3.1-8B-like model. Each part is an existing bench (`mp`, `l3`, `window`) or the L2
//! store itself; this file only runs them in one sitting and reports them together: a table,
//! `--json`, and an SVG chart (`--chart`). Progress goes to stderr: a bar on a terminal, a
//! line per step otherwise. Figures are reported, never asserted.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use connector_protocol::{kv_rank, ChunkHash, ObjectKey};

use super::chart::{self, Bar};
use super::kv::KvShape;
use super::memcpy::Baseline;
use super::mp::MpConfig;
use super::report::Machine;
use super::{disk, gbps, gpu, l3, mp, unix_time, window, Samples};
use crate::config::Config;
use crate::serve::Sidecar;
use crate::store::disk::storage::FsStorage;
use crate::store::disk::DiskStore;
use crate::store::seal::{Sealer, ServerKey};

#[derive(Debug, Clone, clap::Args)]
pub struct TiersArgs {
    /// Value sizes of the L2 and L3 figures, in MiB.
    #[arg(long, value_delimiter = ',', default_value = "2,8,32")]
    pub sizes_mib: Vec<u64>,
    /// Bytes written and read per value size and run, in MiB.
    #[arg(long, default_value_t = 256)]
    pub round_mib: u64,
    /// Timed runs of every figure.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Tokens of the L1 and window request (Llama-3.1-8B-like: 32 layers, 8 KV heads, head
    /// dim 128, bf16: 128 KiB per token).
    #[arg(long, default_value_t = 4096)]
    pub tokens: u64,
    /// Directory of the L2 and window figures and of the disk limit [default: a directory
    /// under the system's temp dir, removed afterwards]. Put it on the disk L2 will use.
    #[arg(long)]
    pub l2_path: Option<PathBuf>,
    /// Also measure L3 against this Redis (and redis-benchmark next to it).
    #[arg(long, value_name = "URL")]
    pub l3: Option<String>,
    /// Skip the window figures (freeze, cold and warm thaw).
    #[arg(long)]
    pub no_window: bool,
    /// Also measure L2 with its records sealed under this key file (`cwm serve
    /// --encryption-key-file`): every L2 figure again, as tier `L2 sealed`, in the same sitting.
    #[arg(long, value_name = "PATH")]
    pub encryption_key_file: Option<PathBuf>,
    /// Where to write the SVG chart.
    #[arg(long, default_value = "cwm-bench-tiers.svg")]
    pub chart: PathBuf,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// A limit a figure is compared with.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Limit {
    pub name: String,
    pub gbps: f64,
}

/// One measured figure: throughput of `runs` runs each moving `bytes_per_run` bytes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figure {
    pub tier: String,
    pub op: String,
    /// Size of one value (a chunk's record, an L3 value) or of the request.
    pub value_bytes: u64,
    pub bytes_per_run: u64,
    pub runs: usize,
    pub p50_gbps: f64,
    /// The 90th-percentile run from the slow side.
    pub p90_gbps: f64,
    pub worst_gbps: f64,
    pub limit: Option<Limit>,
}

impl Figure {
    fn new(tier: &str, op: &str, value_bytes: u64, bytes: u64, s: &Samples) -> Figure {
        Figure {
            tier: tier.into(),
            op: op.into(),
            value_bytes,
            bytes_per_run: bytes,
            runs: s.len(),
            p50_gbps: gbps(bytes, s.median()),
            p90_gbps: gbps(bytes, s.quantile(0.9)),
            worst_gbps: gbps(bytes, s.max()),
            limit: None,
        }
    }

    fn against(mut self, name: impl Into<String>, gbps: f64) -> Figure {
        self.limit = Some(Limit {
            name: name.into(),
            gbps,
        });
        self
    }

    fn label(&self) -> String {
        format!("{} {} ({})", self.tier, self.op, mib(self.value_bytes))
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TiersReport {
    pub machine: Machine,
    pub unix_time: u64,
    pub l2_path: PathBuf,
    pub disk_method: String,
    pub figures: Vec<Figure>,
    /// The GPU of the GPU figures, if there was one.
    pub gpu: Option<gpu::Gpu>,
    /// Tiers not measured, and why (never silently left out).
    pub skipped: Vec<String>,
    pub checks: Vec<String>,
    pub chart: PathBuf,
}

/// Steps of the sitting, for the progress display.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: usize,
    done: usize,
}

impl Progress {
    fn new(total: usize) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
                )
                .expect("valid template"),
            );
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Progress {
            bar,
            total,
            done: 0,
        }
    }

    fn step(&mut self, what: &str) {
        self.done += 1;
        match &self.bar {
            Some(b) => {
                b.set_position(self.done as u64 - 1);
                b.set_message(what.to_string());
            }
            None => eprintln!("[{}/{}] {what}", self.done, self.total),
        }
    }

    fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

fn mib(bytes: u64) -> String {
    let m = bytes as f64 / (1u64 << 20) as f64;
    if m >= 1.0 {
        format!("{m:.0} MiB")
    } else {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    }
}

/// Run the sitting, print the report, write the chart.
pub fn run(args: &TiersArgs) -> anyhow::Result<()> {
    ensure!(
        !args.sizes_mib.is_empty(),
        "--sizes-mib needs at least one size"
    );
    ensure!(
        args.sizes_mib.iter().all(|&m| m > 0 && m <= args.round_mib),
        "every --sizes-mib value must be between 1 and --round-mib ({})",
        args.round_mib
    );
    if let Some(dir) = args.chart.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create the chart's directory {}", dir.display()))?;
    }
    let machine = Machine::detect();
    let (root, temporary) = super::scratch_dir(&args.l2_path, "tiers");
    std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    let result = sitting(args, machine, &root);
    if temporary {
        let _ = std::fs::remove_dir_all(&root);
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    std::fs::write(&args.chart, chart_svg(&report))
        .with_context(|| format!("write the chart to {}", args.chart.display()))?;
    Ok(())
}

fn sitting(
    args: &TiersArgs,
    machine: Machine,
    root: &std::path::Path,
) -> anyhow::Result<TiersReport> {
    let mp_cfg = MpConfig {
        tokens: args.tokens,
        layers: 32,
        heads: 8,
        head_dim: 128,
        block_size: 16,
        shape: KvShape::Nhd,
        iterations: args.rounds.max(1),
        lookups: 100,
    };
    let request_bytes = mp_cfg.geometry().object_bytes(args.tokens);
    let mut l2_variants = vec![("L2", Sealer::default())];
    if let Some(path) = &args.encryption_key_file {
        l2_variants.push(("L2 sealed", Sealer::new(Some(ServerKey::load(path)?))));
    }
    let gpu = gpu::first_device();
    let steps = 3
        + args.sizes_mib.len() * l2_variants.len()
        + usize::from(args.l3.is_some())
        + usize::from(!args.no_window)
        + gpu.as_ref().map_or(1, |_| args.sizes_mib.len());
    let mut progress = Progress::new(steps);
    let (mut figures, mut skipped, mut checks) = (Vec::new(), Vec::new(), Vec::new());

    progress.step("memcpy: the yardstick");
    let mut baseline = Baseline::new(request_bytes as usize);
    for _ in 0..args.rounds.max(1) {
        baseline.measure();
    }

    progress.step("disk: O_DIRECT sequential write and read");
    let round_bytes = args.round_mib << 20;
    let limits = (0..args.rounds.max(1))
        .map(|_| disk::measure(root, round_bytes))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let limit = limits[0].clone();
    // The median of the runs: a shared disk's rate moves from one run to the next.
    let disk_write = gbps(
        limit.bytes,
        Samples::new(limits.iter().map(|l| l.write).collect()).median(),
    );
    let disk_read = gbps(
        limit.bytes,
        Samples::new(limits.iter().map(|l| l.read).collect()).median(),
    );

    progress.step("L1: store and retrieve through the MP protocol");
    let mp = l1_protocol(&mp_cfg, request_bytes, &mut || baseline.measure())?;
    checks.extend(mp.checks.iter().map(|c| format!("L1: {c}")));
    let memcpy = baseline.results();
    let memcpy_gbps = gbps(memcpy.bytes, memcpy.single_thread.median());
    // L1 copies and a thaw fan out over the copy pool; an L2 read runs on one thread.
    let memcpy_pool = format!("memcpy, {} threads", memcpy.threads);
    let memcpy_pool_gbps = gbps(memcpy.bytes, memcpy.multi_thread.median());
    for (op, s) in [("store", &mp.store), ("retrieve", &mp.retrieve)] {
        figures.push(
            Figure::new("L1", op, mp.request_bytes, mp.request_bytes, s)
                .against(&memcpy_pool, memcpy_pool_gbps),
        );
    }

    for (&size, (tier, sealer)) in args
        .sizes_mib
        .iter()
        .flat_map(|s| l2_variants.iter().map(move |v| (s, v)))
    {
        progress.step(&format!(
            "{tier}: {size} MiB records: write, cold read, warm read"
        ));
        let l2 = l2_records(root, size << 20, round_bytes, args.rounds.max(1), sealer)?;
        checks.push(format!("{tier}: {}", l2.check));
        figures.push(
            Figure::new(
                tier,
                "write (encode+compress+append+fsync)",
                size << 20,
                l2.bytes,
                &l2.write,
            )
            .against(format!("disk write, {}", limit.method), disk_write),
        );
        figures.push(
            Figure::new(
                tier,
                "read cold (disk+verify+decompress)",
                size << 20,
                l2.bytes,
                &l2.cold,
            )
            .against(format!("disk read, {}", limit.method), disk_read),
        );
        figures.push(
            Figure::new(
                tier,
                "read warm (page cache)",
                size << 20,
                l2.bytes,
                &l2.warm,
            )
            .against("memcpy, 1 thread", memcpy_gbps),
        );
    }

    match &args.l3 {
        Some(url) => {
            progress.step("L3: put and get through Redis, redis-benchmark beside");
            let defaults = Config::default();
            let r = l3::run(&l3::L3BenchConfig {
                url: url.clone(),
                value_mib: args.sizes_mib.clone(),
                round_bytes,
                rounds: args.rounds.max(1),
                connections: defaults.l3_connections,
                timeout: Duration::from_millis(defaults.l3_timeout_ms),
                redis_benchmark: true,
            })?;
            for v in &r.values {
                let bytes = v.values_per_round as u64 * v.value_bytes;
                let put = Figure::new("L3", "put", v.value_bytes, bytes, &v.put);
                let get = Figure::new("L3", "get", v.value_bytes, bytes, &v.get);
                figures.push(match v.raw_set_gbps {
                    Some(g) => put.against("redis-benchmark SET", g),
                    None => put,
                });
                figures.push(match v.raw_get_gbps {
                    Some(g) => get.against("redis-benchmark GET", g),
                    None => get,
                });
            }
        }
        None => skipped.push("L3: not configured (pass --l3 redis://HOST:PORT)".into()),
    }

    if args.no_window {
        skipped.push("window: --no-window".into());
    } else {
        progress.step("window: freeze, cold thaw after a restart, warm thaw");
        let w = window::run(
            &window::WindowConfig {
                geometry: mp_cfg.geometry(),
                tokens: args.tokens,
                repeats: args.rounds.max(1),
                l2_path: root.join("window"),
                base: Config::default(),
            },
            &mut || {},
        )?;
        checks.extend(w.checks.iter().map(|c| format!("window: {c}")));
        let one = Samples::new(vec![w.freeze]);
        figures.push(
            Figure::new(
                "window",
                "freeze (to L2, fsynced)",
                w.raw_bytes,
                w.raw_bytes,
                &one,
            )
            .against(format!("disk write, {}", limit.method), disk_write),
        );
        figures.push(
            Figure::new(
                "window",
                "thaw cold",
                w.raw_bytes,
                w.raw_bytes,
                &w.thaw_cold,
            )
            .against(format!("disk read, {}", limit.method), disk_read),
        );
        figures.push(
            Figure::new(
                "window",
                "thaw warm",
                w.raw_bytes,
                w.raw_bytes,
                &w.thaw_warm,
            )
            .against(&memcpy_pool, memcpy_pool_gbps),
        );
    }

    let gpu = match gpu {
        Ok((device, info)) => {
            let tier = info.tier();
            for &size in &args.sizes_mib {
                progress.step(&format!(
                    "{tier}: {size} MiB chunks: D2H and H2D through cwm's copy path, cuMemcpy beside"
                ));
                let g = gpu::measure(
                    device,
                    mp_cfg.geometry(),
                    size,
                    round_bytes,
                    args.rounds.max(1),
                )
                .with_context(|| format!("{tier}, {size} MiB chunks"))?;
                checks.push(format!("{tier}: {}", g.check));
                figures.push(
                    Figure::new(tier, "D2H (gather into L1)", g.chunk_bytes, g.bytes, &g.d2h)
                        .against("cuMemcpyDtoH, pinned", gbps(g.bytes, g.limit_d2h.median())),
                );
                figures.push(
                    Figure::new(
                        tier,
                        "H2D (scatter from L1)",
                        g.chunk_bytes,
                        g.bytes,
                        &g.h2d,
                    )
                    .against("cuMemcpyHtoD, pinned", gbps(g.bytes, g.limit_h2d.median())),
                );
            }
            Some(info)
        }
        Err(e) => {
            progress.step("GPU: not measured");
            skipped.push(format!("GPU: not measured: {e}"));
            None
        }
    };
    progress.finish();

    Ok(TiersReport {
        machine,
        unix_time: unix_time(),
        l2_path: root.to_path_buf(),
        disk_method: limit.method,
        figures,
        gpu,
        skipped,
        checks,
        chart: args.chart.clone(),
    })
}

/// The protocol bench against a fresh in-process cwm, memory only (L1 alone).
fn l1_protocol(
    cfg: &MpConfig,
    request_bytes: u64,
    between: &mut dyn FnMut(),
) -> anyhow::Result<mp::MpResults> {
    let gib = request_bytes as f64 / (1u64 << 30) as f64;
    let sidecar = Sidecar::start(&Config {
        host: "127.0.0.1".into(),
        port: 0,
        http_port: 0,
        l1_size_gb: (gib * 2.0 * 4.0).ceil() / 4.0 + 0.25,
        l2_size_gb: 0.0,
        ..Config::default()
    })
    .context("start the in-process cwm")?;
    let r = mp::run(cfg, &sidecar.mp_endpoint, Some(&sidecar.cwm), between);
    sidecar.stop();
    r
}

struct L2Figures {
    bytes: u64,
    write: Samples,
    cold: Samples,
    warm: Samples,
    check: String,
}

/// `rounds` runs of: write `round_bytes` of `value`-byte KV-like records into a fresh L2 store
/// the way the write-behind does (compress, checksum, append) and fsync; read them all back
/// with the page cache dropped, then again warm. Every read is checked byte for byte (outside
/// the timings). Records are sealed (and opened) by `sealer` when it has a key.
fn l2_records(
    root: &std::path::Path,
    value: u64,
    round_bytes: u64,
    rounds: usize,
    sealer: &Sealer,
) -> anyhow::Result<L2Figures> {
    let n = round_bytes.div_ceil(value).max(1) as usize;
    let raw = crate::sample::bf16_normal(value as usize, value);
    let dir = root.join(format!("l2-{}", mib(value).replace(' ', "")));
    let defaults = Config::default();
    let mut disk_cfg = defaults.l2_disk_config();
    disk_cfg.capacity_bytes = disk_cfg.capacity_bytes.max(4 * round_bytes);
    let (mut write, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    let mut out = vec![0u8; value as usize];
    let mut stored = 0u64;
    for round in 0..rounds {
        let _ = std::fs::remove_dir_all(&dir);
        let storage = FsStorage::open(&dir).with_context(|| format!("open {}", dir.display()))?;
        let store = DiskStore::open(storage, disk_cfg.clone())?.sealed_with(sealer.clone());
        let keys: Vec<ObjectKey> = (0..n).map(|i| key(value, round, i)).collect();
        let t = Instant::now();
        for k in &keys {
            store.write(k, &raw, 2)?;
        }
        store.sync_active()?;
        write.push(t.elapsed());
        stored = store
            .counters
            .written_stored_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        for segment in std::fs::read_dir(&dir)? {
            let path = segment?.path();
            if path.is_file() {
                disk::drop_cached(&path)?;
            }
        }
        for pass in [&mut cold, &mut warm] {
            let mut took = Duration::ZERO;
            for k in &keys {
                out.fill(0);
                let t = Instant::now();
                store.read(k, &mut out)?;
                took += t.elapsed();
                ensure!(out == raw, "L2 read back other bytes than written");
            }
            pass.push(took);
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(L2Figures {
        bytes: n as u64 * value,
        write: Samples::new(write),
        cold: Samples::new(cold),
        warm: Samples::new(warm),
        check: format!(
            "L2 {}: {n} records per run read back byte for byte, cold and warm; stored {:.1}% of raw (zstd)",
            mib(value),
            100.0 * stored as f64 / (n as u64 * value) as f64
        ),
    })
}

/// The key of object `i` of run `round` of `value`-byte objects.
pub(super) fn key(value: u64, round: usize, i: usize) -> ObjectKey {
    let mut h = blake3::Hasher::new();
    for x in [value, round as u64, i as u64] {
        h.update(&x.to_le_bytes());
    }
    ObjectKey {
        model: "cwm-bench-tiers".into(),
        kv_rank: kv_rank(1, 0),
        object_group: 0,
        chunk_hash: ChunkHash(*h.finalize().as_bytes()),
        cache_salt: "".into(),
    }
}

fn chart_svg(r: &TiersReport) -> String {
    let bars: Vec<Bar> = r
        .figures
        .iter()
        .map(|f| Bar {
            label: f.label(),
            value: f.p50_gbps,
            worst: (f.runs > 1).then_some(f.worst_gbps),
            limit: f.limit.as_ref().map(|l| l.gbps),
            limit_label: f.limit.as_ref().map_or(String::new(), |l| l.name.clone()),
        })
        .collect();
    chart::svg(
        "cwm bench tiers: GB/s per tier and value size, next to the machine's limit",
        &format!(
            "{}, {} cores, {:.0} GiB; disk: {}{}",
            r.machine.cpu,
            r.machine.cores,
            r.machine.memory_gib,
            r.disk_method,
            r.gpu
                .as_ref()
                .map_or(String::new(), |g| format!("; {}", g.line()))
        ),
        &bars,
    )
}

impl TiersReport {
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "cwm bench tiers — {} ({} cores, {:.1} GiB, kernel {}, load {})",
            m.cpu, m.cores, m.memory_gib, m.kernel, m.load_average
        );
        let _ = writeln!(
            s,
            "L2 directory: {} (disk limit: {})",
            self.l2_path.display(),
            self.disk_method
        );
        if let Some(g) = &self.gpu {
            let _ = writeln!(s, "GPU: {}", g.line());
        }
        let _ = writeln!(
            s,
            "\n{:<12} {:<40} {:>8} {:>5} {:>8} {:>8} {:>8}  {:>8}  limit",
            "tier", "op", "value", "runs", "p50", "p90", "worst", "limit"
        );
        let _ = writeln!(
            s,
            "{:<12} {:<40} {:>8} {:>5} {:>8} {:>8} {:>8}  {:>8}",
            "", "", "", "", "GB/s", "GB/s", "GB/s", "GB/s"
        );
        for f in &self.figures {
            let (lg, ln) = f
                .limit
                .as_ref()
                .map_or(("-".to_string(), String::new()), |l| {
                    (format!("{:.2}", l.gbps), l.name.clone())
                });
            let _ = writeln!(
                s,
                "{:<12} {:<40} {:>8} {:>5} {:>8.2} {:>8.2} {:>8.2}  {:>8}  {}",
                f.tier,
                f.op,
                mib(f.value_bytes),
                f.runs,
                f.p50_gbps,
                f.p90_gbps,
                f.worst_gbps,
                lg,
                ln
            );
        }
        for k in &self.skipped {
            let _ = writeln!(s, "skipped: {k}");
        }
        for c in &self.checks {
            let _ = writeln!(s, "check: {c}");
        }
        let _ = writeln!(s, "chart: {}", self.chart.display());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small sitting end to end: every configured tier has its figures next to a limit, the
    /// ones not configured are named, and the chart has a bar per figure.
    #[test]
    fn a_small_sitting_reports_every_tier() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("cwm-tiers-test-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let key = root.join("key");
        std::fs::write(&key, "ab".repeat(32)).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let args = TiersArgs {
            sizes_mib: vec![1, 2],
            round_mib: 4,
            rounds: 2,
            tokens: 256,
            l2_path: Some(root.clone()),
            l3: None,
            no_window: false,
            encryption_key_file: Some(key),
            chart: root.join("chart.svg"),
            json: false,
        };
        let r = sitting(&args, Machine::detect(), &root).unwrap();
        let _ = std::fs::remove_dir_all(&root);
        let names: Vec<String> = r.figures.iter().map(Figure::label).collect();
        let gpu = r
            .figures
            .iter()
            .filter(|f| f.tier.starts_with("GPU"))
            .count();
        assert_eq!(r.figures.len() - gpu, 2 + 3 * 2 * 2 + 3, "{names:?}");
        assert_eq!(gpu, if r.gpu.is_some() { 2 * 2 } else { 0 }, "{names:?}");
        for tier in ["L1", "L2", "L2 sealed", "window"] {
            assert!(
                r.figures.iter().any(|f| f.tier == tier),
                "no {tier} figure: {names:?}"
            );
        }
        for f in &r.figures {
            assert!(f.p50_gbps > 0.0 && f.worst_gbps <= f.p50_gbps, "{f:?}");
            assert!(f.limit.as_ref().is_some_and(|l| l.gbps > 0.0), "{f:?}");
        }
        assert!(
            r.skipped
                .iter()
                .any(|s| s.starts_with("L3: not configured")),
            "{:?}",
            r.skipped
        );
        assert_eq!(
            r.skipped.iter().any(|s| s.starts_with("GPU: not measured")),
            r.gpu.is_none(),
            "{:?}",
            r.skipped
        );
        assert!(
            r.checks
                .iter()
                .any(|c| c.contains("read back byte for byte")),
            "{:?}",
            r.checks
        );
        let svg = chart_svg(&r);
        assert_eq!(svg.matches(r##"fill="#2b6cb0""##).count(), r.figures.len());
        let l2_write = format!("{:<12} write", "L2");
        assert!(r.table().contains(&l2_write), "{}", r.table());
    }
}
