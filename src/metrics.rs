//! Prometheus text exposition of the sidecar's counters (`GET /metrics`). Reads the counters
//! the ops and stores already keep; owns no state.

use std::fmt::Write;

use crate::ops::Cwm;
use crate::status::{self, Health, TierStats};
use crate::tenant::TOP_SALTS;

/// A salt as a Prometheus label value (escaped; the empty salt is `_default`).
fn label_value(salt: &str) -> String {
    if salt.is_empty() {
        return crate::store::quota::DEFAULT_SALT_NAME.into();
    }
    salt.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Render every series in the Prometheus text format, version 0.0.4.
pub fn render(cwm: &Cwm, health: &Health) -> String {
    let mut out = String::with_capacity(8192);
    let s = status::cache_stats(cwm);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP cwm_{name} {help}\n# TYPE cwm_{name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "cwm_{name} {v}");
            } else {
                let _ = writeln!(out, "cwm_{name}{{{labels}}} {v}");
            }
        }
    };
    let ops = cwm.counters.snapshot();
    let calls: Vec<(String, f64)> = ops
        .iter()
        .map(|(op, st)| (format!("op=\"{op}\""), st.calls as f64))
        .collect();
    let errors: Vec<(String, f64)> = ops
        .iter()
        .map(|(op, st)| (format!("op=\"{op}\""), st.errors as f64))
        .collect();
    let secs: Vec<(String, f64)> = ops
        .iter()
        .map(|(op, st)| (format!("op=\"{op}\""), st.total_micros as f64 / 1e6))
        .collect();
    for (name, help, v) in [
        ("ops_total", "Requests handled, per operation (MP ops; lm_* on the lm:// port)", calls),
        ("op_errors_total", "Requests that failed, per operation (MP ops; lm_* on the lm:// port)", errors),
        (
            "op_seconds_total",
            "Time spent handling requests, per operation (divide by cwm_ops_total for the mean latency)",
            secs,
        ),
    ] {
        let samples: Vec<(&str, f64)> = v.iter().map(|(l, x)| (l.as_str(), *x)).collect();
        metric(name, "counter", help, &samples);
    }
    let c = |v: u64| v as f64;
    metric(
        "lookup_chunks_total",
        "counter",
        "Chunks asked for by lookups",
        &[("", c(s.lookup_chunks))],
    );
    metric(
        "lookup_hit_chunks_total",
        "counter",
        "Chunks lookups found (prefix hits)",
        &[("", c(s.lookup_hit_chunks))],
    );
    metric(
        "lookup_hit_ratio",
        "gauge",
        "Hit chunks over looked-up chunks since start",
        &[("", s.hit_rate)],
    );
    metric(
        "stored_objects_total",
        "counter",
        "Objects stored from engines",
        &[("", c(s.stored_objects))],
    );
    metric(
        "stored_bytes_total",
        "counter",
        "Bytes stored from engines",
        &[("", c(s.stored_bytes))],
    );
    metric(
        "retrieved_objects_total",
        "counter",
        "Objects retrieved into engines",
        &[("", c(s.retrieved_objects))],
    );
    metric(
        "retrieved_bytes_total",
        "counter",
        "Bytes retrieved into engines",
        &[("", c(s.retrieved_bytes))],
    );
    metric(
        "retrieve_misses_total",
        "counter",
        "Retrieves that found a chunk missing",
        &[("", c(s.retrieve_misses))],
    );
    // Per-tier series: L1's value, and each configured tier's by its name (`tier="l2"`).
    let tier_labels: Vec<String> = s
        .tiers
        .iter()
        .map(|t| format!("tier=\"{}\"", t.name.to_lowercase()))
        .collect();
    type Of = fn(&TierStats) -> u64;
    let rows: [(&str, &str, &str, u64, Of); 7] = [
        (
            "tier_objects",
            "gauge",
            "Objects held per tier",
            s.l1.objects as u64,
            |t| t.records as u64,
        ),
        (
            "tier_used_bytes",
            "gauge",
            "Bytes used per tier",
            s.l1.used_bytes,
            |t| t.used_bytes,
        ),
        (
            "tier_capacity_bytes",
            "gauge",
            "Byte budget per tier",
            s.l1.capacity_bytes,
            |t| t.capacity_bytes,
        ),
        (
            "tier_read_bytes_total",
            "counter",
            "Bytes read per tier (L1: retrieved into engines; L2, L3: read and decoded)",
            s.retrieved_bytes,
            |t| t.read_bytes,
        ),
        (
            "tier_written_bytes_total",
            "counter",
            "Bytes written per tier (L2: raw bytes before compression)",
            s.l1.committed_bytes,
            |t| t.written_raw_bytes,
        ),
        (
            "tier_hits_total",
            "counter",
            "Objects served per tier (L1: retrieved; L2, L3: read into L1)",
            s.retrieved_objects,
            |t| t.read_records,
        ),
        (
            "tier_evicted_objects_total",
            "counter",
            "Objects evicted per tier (L2: records in reclaimed segments)",
            s.l1.evicted_objects,
            |t| t.reclaimed_records,
        ),
    ];
    for (name, kind, help, l1, of) in rows {
        let mut samples = vec![("tier=\"l1\"", c(l1))];
        samples.extend(
            tier_labels
                .iter()
                .zip(&s.tiers)
                .map(|(label, t)| (label.as_str(), c(of(t)))),
        );
        metric(name, kind, help, &samples);
    }
    metric(
        "l1_evicted_bytes_total",
        "counter",
        "Bytes evicted from L1",
        &[("", c(s.l1.evicted_bytes))],
    );
    metric(
        "l1_no_space_total",
        "counter",
        "L1 reservations that found no evictable space",
        &[("", c(s.l1.no_space))],
    );
    metric(
        "l1_quota_evicted_objects_total",
        "counter",
        "L1 objects evicted to keep their cache_salt within its quota",
        &[("", c(s.l1.quota_evicted_objects))],
    );
    metric(
        "l1_quota_refused_total",
        "counter",
        "L1 reservations refused: the cache_salt was at its quota with nothing of its own evictable",
        &[("", c(s.l1.quota_refused))],
    );
    // Per tier, bytes of the `TOP_SALTS` largest salts and `_other`: bounded label sets.
    for usage in &s.tenants {
        let mut per_salt: Vec<(String, f64)> = usage
            .top
            .iter()
            .map(|u| {
                (
                    format!("cache_salt=\"{}\"", label_value(&u.cache_salt)),
                    c(u.bytes),
                )
            })
            .collect();
        if usage.salts > usage.top.len() {
            per_salt.push(("cache_salt=\"_other\"".into(), c(usage.other_bytes)));
        }
        let per_salt: Vec<(&str, f64)> = per_salt.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            &format!("{}_salt_bytes", usage.tier.to_lowercase()),
            "gauge",
            &format!(
                "{} bytes per cache_salt (the {TOP_SALTS} largest; the rest summed as _other; \
                 _default: no salt{})",
                usage.tier,
                if usage.tier == "L3" {
                    "; the whole fleet's, from the ledgers in Redis"
                } else {
                    ""
                }
            ),
            &per_salt,
        );
    }
    // Each tier's own figures, as `cwm_<tier>_<figure>` (`cwm_l2_segments`, `cwm_l3_up`).
    for t in &s.tiers {
        let tier = t.name.to_lowercase();
        for f in &t.figures {
            let kind = if f.gauge { "gauge" } else { "counter" };
            metric(
                &format!("{tier}_{}", f.name),
                kind,
                f.help,
                &[("", c(f.value))],
            );
        }
    }
    let wb = &s.write_behind;
    metric(
        "write_behind_queue_bytes",
        "gauge",
        "Bytes waiting for write-behind (to every tier behind L1)",
        &[("", c(wb.queued_bytes))],
    );
    metric(
        "write_behind_enqueued_total",
        "counter",
        "Objects queued for the tiers behind L1",
        &[("", c(wb.enqueued))],
    );
    metric(
        "write_behind_dropped_total",
        "counter",
        "Objects not queued because the queue was full",
        &[("", c(wb.dropped))],
    );
    metric(
        "write_behind_written_total",
        "counter",
        "Objects written to the tiers behind L1 by write-behind",
        &[("", c(wb.written))],
    );
    metric(
        "write_behind_missed_total",
        "counter",
        "Objects evicted from L1 before write-behind reached them",
        &[("", c(wb.missed))],
    );
    metric(
        "write_behind_failed_total",
        "counter",
        "Write-behind writes that failed for good (not for lack of space: those are held)",
        &[("", c(wb.failed))],
    );
    metric(
        "write_behind_stalls_total",
        "counter",
        "Times a tier behind L1 ran out of space (write-behind then holds its writes and retries)",
        &[("", c(wb.stalls))],
    );
    metric(
        "write_behind_held",
        "gauge",
        "Objects whose write waits for a tier behind L1 to have space again",
        &[("", c(wb.held))],
    );
    metric(
        "write_behind_retried_total",
        "counter",
        "Objects written after waiting for space",
        &[("", c(wb.retried))],
    );
    metric(
        "write_behind_yields_total",
        "counter",
        "Times write-behind waited for the engines to be quiet before reading or writing",
        &[("", c(wb.yields))],
    );
    metric(
        "write_behind_yielded_seconds_total",
        "counter",
        "Time write-behind spent waiting for the engines to be quiet",
        &[("", wb.yielded_ms as f64 / 1000.0)],
    );
    metric(
        "write_behind_deferred_max_total",
        "counter",
        "Times write-behind wrote anyway because an object had waited its longest for busy engines",
        &[("", c(wb.deferred_max))],
    );
    let e = &s.encryption;
    metric(
        "encryption_enabled",
        "gauge",
        "1 when records behind L1 are sealed (--encryption-key-file)",
        &[("", f64::from(u8::from(e.enabled)))],
    );
    metric(
        "sealed_records_total",
        "counter",
        "Records sealed for L2, L3 and window exports",
        &[("", c(e.sealed_records))],
    );
    metric(
        "opened_records_total",
        "counter",
        "Sealed records opened",
        &[("", c(e.opened_records))],
    );
    metric(
        "unopened_records_total",
        "counter",
        "Sealed records that did not open, served as misses: no key configured, or another \
         key or salt (a key change, a record moved, tampering)",
        &[
            ("reason=\"no_key\"", c(e.unopened_no_key)),
            ("reason=\"wrong_key\"", c(e.unopened_wrong_key)),
        ],
    );
    metric(
        "unopened_metadata_total",
        "counter",
        "Sealed window manifests and session journal entries that did not open (no key or \
         another key): windows listed as unreadable, journal entries skipped",
        &[
            ("kind=\"window_manifest\"", c(e.unopened_manifests)),
            ("kind=\"session_journal\"", c(e.unopened_journal_entries)),
        ],
    );
    let h = health;
    metric(
        "windows",
        "gauge",
        "Context windows in the catalog",
        &[("", h.windows as f64)],
    );
    metric(
        "sessions",
        "gauge",
        "Sessions with cached token chains",
        &[("", h.sessions as f64)],
    );
    metric(
        "registered_instances",
        "gauge",
        "Engine instances registered",
        &[("", h.registered_instances as f64)],
    );
    metric(
        "engine_driven_contexts",
        "gauge",
        "Engine-driven workers registered (or restored with their pool)",
        &[("", h.engine_driven_contexts as f64)],
    );
    metric(
        "l1_quarantined_bytes",
        "gauge",
        "Bytes of the L1 pool a previous cwm leased to engines, kept out of use until the leases expire",
        &[("", h.l1_quarantined_bytes as f64)],
    );
    let a = &h.auto_save;
    metric(
        "autosaves_total",
        "counter",
        "Session auto-saves, per result (saved: a window created or replaced; skipped: nothing of the session cached any more)",
        &[
            ("result=\"saved\"", c(a.saves)),
            ("result=\"skipped\"", c(a.skipped)),
            ("result=\"failed\"", c(a.failures)),
        ],
    );
    metric(
        "autosave_default_idle_seconds",
        "gauge",
        "Idle seconds before a session without its own setting is auto-saved (0: off)",
        &[("", c(a.default_idle_secs))],
    );
    metric(
        "autosave_sessions",
        "gauge",
        "Sessions with their own auto-save setting, per setting",
        &[
            ("setting=\"on\"", a.sessions_on as f64),
            ("setting=\"off\"", a.sessions_off as f64),
        ],
    );
    let gpu = cwm.gpu_status();
    metric(
        "l1_pinned_bytes",
        "gauge",
        "L1 bytes registered with the CUDA driver for GPU copies",
        &[("", gpu.l1_pinned_bytes as f64)],
    );
    metric(
        "l1_pin_failed",
        "gauge",
        "1 if pinning L1 for GPU copies stopped short (copies from the rest run from pageable memory)",
        &[("", f64::from(u8::from(gpu.l1_pin_error.is_some())))],
    );
    metric(
        "gpu_engine_mappings",
        "gauge",
        "Engine GPU allocations opened over CUDA IPC",
        &[("", gpu.engine_mappings as f64)],
    );
    metric(
        "uptime_seconds",
        "gauge",
        "Seconds since the sidecar started",
        &[("", h.uptime_secs as f64)],
    );
    let refused: Vec<(String, f64)> = crate::limits::Limit::all()
        .iter()
        .map(|l| (format!("limit=\"{}\"", l.name()), l.count() as f64))
        .collect();
    let samples: Vec<(&str, f64)> = refused.iter().map(|(l, x)| (l.as_str(), *x)).collect();
    metric(
        "refused_total",
        "counter",
        "Requests or replies refused by a limit (docs/SECURITY.md), per limit",
        &samples,
    );
    out
}
