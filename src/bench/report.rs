//! What the bench prints: the machine it ran on and the figures, as a table or JSON.

use std::fmt::Write;
use std::time::Duration;

use super::memcpy::MemcpyResults;
use super::mp::MpResults;
use super::{gbps, Samples};

/// Goals from the issue: store and retrieve at this fraction of single-thread memcpy or more,
/// and a lookup p50 under this.
pub const BANDWIDTH_GOAL: f64 = 0.6;
pub const LOOKUP_P50_GOAL: Duration = Duration::from_micros(200);

#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub transparent_hugepages: String,
    /// `/proc/loadavg` when the bench started: other work on the machine skews every figure.
    pub load_average: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let mut cpu = field("model name").unwrap_or_else(|| "unknown CPU".into());
        if let (Some(family), Some(model)) = (field("cpu family"), field("model")) {
            let _ = write!(cpu, " (family {family}, model {model})");
        }
        let memory_kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: memory_kib / (1u64 << 20) as f64,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            transparent_hugepages: read("/sys/kernel/mm/transparent_hugepage/enabled")
                .trim()
                .to_string(),
            load_average: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub machine: Machine,
    pub server: String,
    pub unix_time: u64,
    pub memcpy: MemcpyResults,
    pub mp: MpResults,
}

impl Report {
    /// Median GB/s of `s` over the single-thread memcpy median.
    fn ratio(&self, s: &Samples) -> f64 {
        let base = gbps(self.memcpy.bytes, self.memcpy.single_thread.median());
        gbps(self.mp.request_bytes, s.median()) / base
    }

    pub fn table(&self) -> String {
        let (m, mp) = (&self.machine, &self.mp);
        let g = &mp.geometry;
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(
            w,
            "cwm bench: store / lookup / retrieve through the LMCache MP protocol"
        );
        let _ = writeln!(
            w,
            "  machine   {}, {} cores, {:.1} GiB RAM, Linux {}, THP {}, load {}",
            m.cpu, m.cores, m.memory_gib, m.kernel, m.transparent_hugepages, m.load_average
        );
        let _ = writeln!(w, "  server    {} at {}", self.server, mp.endpoint);
        let _ = writeln!(
            w,
            "  request   {} tokens = {} chunks x {:.1} MiB = {:.1} MiB; {} layers, {} KV heads x {}, bf16, block {}, {:?} layout",
            mp.chunks * mp.chunk_size,
            mp.chunks,
            mib(mp.object_bytes),
            mib(mp.request_bytes),
            g.layers,
            g.heads,
            g.content / 2,
            g.block_size,
            g.shape,
        );
        let _ = writeln!(
            w,
            "  samples   {} timed rounds after 1 untimed, {} lookups, {} memcpy copies (before and between rounds); GB = 1e9 bytes",
            mp.store.len(),
            mp.lookup_query.len(),
            self.memcpy.single_thread.len()
        );
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "  {:<34}{:>11}{:>11}{:>12}{:>14}",
            "bandwidth", "median", "best", "median time", "vs memcpy 1T"
        );
        let bw_row = |w: &mut String, name: &str, bytes: u64, s: &Samples, ratio: f64| {
            let _ = writeln!(
                w,
                "  {:<34}{:>6.2} GB/s{:>6.2} GB/s{:>9.1} ms{:>13.0}%",
                name,
                gbps(bytes, s.median()),
                gbps(bytes, s.min()),
                s.median().as_secs_f64() * 1e3,
                ratio * 100.0
            );
        };
        let mc = &self.memcpy;
        let base = gbps(mc.bytes, mc.single_thread.median());
        bw_row(w, "memcpy, 1 thread", mc.bytes, &mc.single_thread, 1.0);
        bw_row(
            w,
            &format!("memcpy, {} threads", mc.threads),
            mc.bytes,
            &mc.multi_thread,
            gbps(mc.bytes, mc.multi_thread.median()) / base,
        );
        bw_row(
            w,
            "store (engine -> L1)",
            mp.request_bytes,
            &mp.store,
            self.ratio(&mp.store),
        );
        bw_row(
            w,
            "retrieve (L1 -> engine)",
            mp.request_bytes,
            &mp.retrieve,
            self.ratio(&mp.retrieve),
        );
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "  {:<34}{:>11}{:>11}{:>12}",
            "latency (µs)", "p50", "p99", "mean"
        );
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        for (name, s) in [
            ("lookup + query_prefetch_status", &mp.lookup_query),
            ("  lookup", &mp.lookup),
            ("  query_prefetch_status", &mp.query),
        ] {
            let _ = writeln!(
                w,
                "  {:<34}{:>11.1}{:>11.1}{:>12.1}",
                name,
                us(s.median()),
                us(s.quantile(0.99)),
                us(s.mean())
            );
        }
        if let Some(sv) = &mp.server {
            let _ = writeln!(w);
            let _ = writeln!(
                w,
                "  server-side mean: store {:.1} ms of {:.1} ms round trip, retrieve {:.1} ms of {:.1} ms, lookup {:.1} µs of {:.1} µs",
                sv.store_us / 1e3,
                us(mp.store.mean()) / 1e3,
                sv.retrieve_us / 1e3,
                us(mp.retrieve.mean()) / 1e3,
                sv.lookup_us,
                us(mp.lookup.mean()),
            );
        }
        let _ = writeln!(w);
        for c in &mp.checks {
            let _ = writeln!(w, "  checked   {c}");
        }
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        let (rs, rr) = (self.ratio(&mp.store), self.ratio(&mp.retrieve));
        let p50 = mp.lookup_query.median();
        let _ = writeln!(
            w,
            "  goals     store {:.0}% / retrieve {:.0}% of 1-thread memcpy (>= {:.0}%): {}; lookup+query p50 {:.0} µs (< {} µs): {}",
            rs * 100.0,
            rr * 100.0,
            BANDWIDTH_GOAL * 100.0,
            verdict(rs >= BANDWIDTH_GOAL && rr >= BANDWIDTH_GOAL),
            us(p50),
            LOOKUP_P50_GOAL.as_micros(),
            verdict(p50 < LOOKUP_P50_GOAL),
        );
        out
    }
}
