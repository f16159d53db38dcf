//! `cwm doctor`: what this host offers the sidecar (CUDA driver and GPUs, pinned-memory limit,
//! `/dev/shm`, transparent huge pages) and what cwm will do with it. Read-only: it loads the
//! driver, lists devices and reads limits, and changes nothing.

use std::fmt::Write;

use crate::engine_mem::cuda::copy::{self, Batching};
use crate::engine_mem::cuda::driver::{self, version_str};
use crate::engine_mem::cuda::wait;

/// An environment variable's value, or `default` when unset.
fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// The report, one finding per line, each followed by what cwm does about it.
pub fn report(l1_bytes: u64) -> String {
    let mut out = String::new();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let _ = writeln!(out, "cwm doctor (L1 budget {:.1} GiB)", gib(l1_bytes));
    match driver::driver() {
        Ok(d) => {
            let _ = writeln!(
                out,
                "CUDA driver: {} ({} device{})",
                version_str(d.version),
                d.devices.len(),
                if d.devices.len() == 1 { "" } else { "s" }
            );
            for dev in &d.devices {
                let _ =
                    writeln!(
                    out,
                    "  GPU {}: {} uuid {} memory {:.1} GiB, host pointers for registered memory \
                     (attribute 91): {}",
                    dev.ordinal,
                    dev.name,
                    dev.uuid,
                    gib(dev.total_mem),
                    if dev.host_pointer_for_registered_mem { "yes" } else { "no" }
                );
                let copies = match copy::batching(d, dev) {
                    Batching::Batch(n) => {
                        format!("cuMemcpyBatchAsync, at most {n} copies per call")
                    }
                    Batching::PerRun(why) => format!("cuMemcpyAsync per contiguous run ({why})"),
                };
                let _ = writeln!(out, "    -> copies use {copies}");
            }
            let _ = writeln!(
                out,
                "  -> GPU engines (cuda descriptors) on these devices are served; a GPU's context \
                 is retained (BLOCKING_SYNC) when the first engine on it registers; switches: \
                 {}={} (auto | per-run), {}={} (default {}), {}={} (seconds a transfer waits \
                 for the engine's event and for its copies, default {})",
                copy::COPY_ENV,
                env_or(copy::COPY_ENV, "auto"),
                copy::MAX_BATCH_ENV,
                env_or(copy::MAX_BATCH_ENV, &copy::MAX_BATCH.to_string()),
                copy::MAX_BATCH,
                wait::WAIT_ENV,
                wait::budget().as_secs_f64(),
                wait::DEFAULT_WAIT.as_secs()
            );
        }
        Err(e) => {
            let _ = writeln!(out, "CUDA: {e}");
            let _ = writeln!(
                out,
                "  -> CPU engines (cpu_shm, engine-driven) are served; GPU registrations are \
                 answered with this reason"
            );
        }
    }
    let _ = writeln!(out, "pinned memory limit (ulimit -l): {}", memlock());
    let _ = writeln!(
        out,
        "  -> when the first GPU engine registers, a background thread registers L1 with the \
         driver (cuMemHostRegister, 1 GiB pieces): all of it with --l1-populate eager, only \
         what L1's objects occupy with lazy; copies from what is not pinned yet run from \
         pageable memory; if pinning fails cwm says so in its log, /status and /metrics \
         (cwm_l1_pin_failed); raise the limit (docker: --ulimit memlock=-1) if it does"
    );
    match shm_size() {
        Some((total, free)) => {
            let _ = writeln!(
                out,
                "/dev/shm: {:.1} GiB, {:.1} GiB free",
                gib(total),
                gib(free)
            );
            let verdict = if free >= l1_bytes {
                "holds the engine-driven L1 pool"
            } else {
                "too small for the engine-driven L1 pool: lower --l1-size-gb, enlarge /dev/shm \
                 (docker: --shm-size), or run with --no-engine-driven"
            };
            let _ = writeln!(out, "  -> {verdict}");
        }
        None => {
            let _ = writeln!(out, "/dev/shm: not available");
            let _ = writeln!(
                out,
                "  -> engine-driven mode and cpu_shm engines cannot work; use --no-engine-driven"
            );
        }
    }
    let leftovers = crate::shm_leftovers::find(std::path::Path::new("/dev/shm"));
    if !leftovers.is_empty() {
        let _ = writeln!(
            out,
            "/dev/shm: {}",
            crate::shm_leftovers::summary(&leftovers)
        );
    }
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let _ = writeln!(out, "transparent huge pages: {thp}");
    let _ = writeln!(
        out,
        "  -> private L1 is advised MADV_HUGEPAGE ({})",
        if thp.contains("[never]") {
            "no effect while THP is off"
        } else {
            "fewer TLB misses on large copies"
        }
    );
    out
}

fn memlock() -> String {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a live rlimit the call fills.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return "unknown".into();
    }
    let show = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            format!("{} KiB", v / 1024)
        }
    };
    format!("{} (hard {})", show(r.rlim_cur), show(r.rlim_max))
}

/// Size and free bytes of /dev/shm.
fn shm_size() -> Option<(u64, u64)> {
    let path = std::ffi::CString::new("/dev/shm").ok()?;
    // SAFETY: statvfs is a C struct of integers: all-zero is a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path that outlives the call, and a live struct to fill.
    if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let f = s.f_frsize as u64;
    Some((s.f_blocks as u64 * f, s.f_bavail as u64 * f))
}
