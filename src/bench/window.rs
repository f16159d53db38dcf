//! `cwm bench --window`: a context window of `--tokens` tokens stored through the protocol,
//! frozen into L2, and thawed back into L1 after a restart, the way an agent would use it.
//!
//! Thaws are timed two ways: *cold*, after the sidecar restarted and the segment files were
//! dropped from the page cache (`posix_fadvise(DONTNEED)`, so the disk is read), and *warm*,
//! with L1 emptied but the segments still cached (decompression and copy only). The last thaw
//! is checked end to end: a lookup under the window's session hits every chunk and a retrieve
//! into a second cache gives back the stored bytes exactly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use connector_protocol::IpcCacheServerKey;

use super::kv::{BenchKv, KvGeometry};
use super::mp::MODEL;
use super::{gbps, Samples};
use crate::client::MpClient;
use crate::config::Config;
use crate::serve::Sidecar;
use crate::windows::{FreezeRequest, ThawRequest};

/// The session (cache_salt) and window name the bench stores and freezes under.
const SESSION: &str = "cwm-bench-window";

#[derive(Debug, Clone, serde::Serialize)]
pub struct WindowResults {
    pub l2_path: PathBuf,
    pub geometry: KvGeometry,
    pub tokens: u64,
    pub chunks: usize,
    /// Bytes of the window in L1 (uncompressed).
    pub raw_bytes: u64,
    /// Bytes of its records on disk.
    pub stored_bytes: u64,
    /// The protocol store that put the conversation into L1.
    pub store: Duration,
    /// `window_freeze`: every chunk made durable in L2 (fsynced).
    pub freeze: Duration,
    /// Thaws after a restart with the segments out of the page cache.
    pub thaw_cold: Samples,
    /// Thaws with L1 emptied, segments in the page cache.
    pub thaw_warm: Samples,
    pub checks: Vec<String>,
}

pub struct WindowConfig {
    pub geometry: KvGeometry,
    pub tokens: u64,
    pub repeats: usize,
    pub l2_path: PathBuf,
    pub base: Config,
}

/// Run the window bench; `between` runs between thaws, outside the timings.
pub fn run(cfg: &WindowConfig, between: &mut dyn FnMut()) -> anyhow::Result<WindowResults> {
    let g = cfg.geometry;
    let raw_gib = (cfg.tokens * g.object_bytes(1)) as f64 / (1u64 << 30) as f64;
    let config = Config {
        host: "127.0.0.1".into(),
        port: 0,
        http_port: 0,
        l1_size_gb: (raw_gib * 1.1 * 4.0).ceil() / 4.0 + 0.25,
        l2_path: cfg.l2_path.clone(),
        l2_size_gb: cfg.base.l2_size_gb.max(raw_gib * 2.0 + 1.0),
        ..cfg.base.clone()
    };
    let mut src = BenchKv::create("window-src", g).context("create the source KV cache")?;
    src.fill_bf16_normal(0x5eed);
    let src_id = (std::process::id() as u64) << 16 | 0x100;
    let blocks: Vec<Vec<u32>> = vec![(1..=(cfg.tokens / g.block_size) as u32).collect()];
    let tokens: Vec<u32> = (0..cfg.tokens as u32)
        .map(|t| t.wrapping_mul(2_654_435_761) % 128_256)
        .collect();
    let key = |request_id: &str, worker_id| IpcCacheServerKey {
        model_name: MODEL.into(),
        world_size: 1,
        worker_id,
        token_ids: tokens.clone(),
        start: 0,
        end: cfg.tokens,
        request_id: request_id.into(),
        cache_salt: SESSION.into(),
        request_configs: None,
        num_kv_readers: 1,
    };
    let connect = |s: &Sidecar| -> anyhow::Result<MpClient> {
        let mut c = MpClient::connect(&s.mp_endpoint)?;
        c.timeout = Duration::from_secs(600);
        Ok(c)
    };

    // Store the conversation and freeze it.
    let sidecar = Sidecar::start(&config).context("start the in-process cwm")?;
    let (store, freeze, summary) = {
        let mut c = connect(&sidecar)?;
        let hint = Some(g.shape.hint());
        c.register_kv_cache(src_id, &src.descriptors(), MODEL, 1, hint, &src.groups())?;
        let t = Instant::now();
        ensure!(
            c.store(&key("window-store", Some(0)), src_id, &blocks)?.ok,
            "store of the {}-token conversation failed",
            cfg.tokens
        );
        let store = t.elapsed();
        let _ = sidecar.windows.delete(&crate::windows::DeleteRequest {
            window_name: SESSION.into(),
        });
        let t = Instant::now();
        let frozen = sidecar
            .windows
            .freeze(&FreezeRequest {
                session_id: SESSION.into(),
                window_name: SESSION.into(),
                description: Some("cwm bench --window".into()),
                ..Default::default()
            })
            .context("window_freeze")?;
        (store, t.elapsed(), frozen.window)
    };
    sidecar.stop();

    let thaw = |s: &Sidecar| -> anyhow::Result<Duration> {
        let t = Instant::now();
        let r = s
            .windows
            .thaw(
                &ThawRequest {
                    window_name: SESSION.into(),
                    new_session_id: None,
                },
                &|_, _| {},
            )
            .context("window_thaw")?;
        let took = t.elapsed();
        ensure!(
            r.complete && r.chunks_ready == summary.chunks,
            "thaw made {} of {} chunks ready",
            r.chunks_ready,
            summary.chunks
        );
        ensure!(
            r.tiers.l2 == summary.chunks as u64,
            "thaw read {} of {} chunks from L2 ({:?}): not a thaw from disk",
            r.tiers.l2,
            summary.chunks,
            r.tiers
        );
        Ok(took)
    };
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let mut last: Option<Sidecar> = None;
    for _ in 0..cfg.repeats.max(1) {
        if let Some(s) = last.take() {
            s.stop();
        }
        between();
        drop_page_cache(&cfg.l2_path)?;
        let s = Sidecar::start(&config).context("restart the in-process cwm")?;
        cold.push(thaw(&s)?);
        s.cwm.tiers.evict_l1(true);
        between();
        warm.push(thaw(&s)?);
        last = Some(s);
    }
    let s = last.expect("at least one repeat");
    let checks = check_retrieve(&s, &src, &blocks, &key("window-check", None), connect(&s)?);
    s.stop();
    Ok(WindowResults {
        l2_path: cfg.l2_path.clone(),
        geometry: g,
        tokens: cfg.tokens,
        chunks: summary.chunks,
        raw_bytes: summary.raw_bytes,
        stored_bytes: summary.stored_bytes,
        store,
        freeze,
        thaw_cold: Samples::new(cold),
        thaw_warm: Samples::new(warm),
        checks: checks?,
    })
}

/// After a thaw: a lookup under the session hits every chunk and a retrieve into a fresh
/// cache of the same layout returns the stored bytes.
fn check_retrieve(
    s: &Sidecar,
    src: &BenchKv,
    blocks: &[Vec<u32>],
    lookup_key: &IpcCacheServerKey,
    mut c: MpClient,
) -> anyhow::Result<Vec<String>> {
    // cwm answers lookups only for a model some engine registered.
    let mut dst = BenchKv::create("window-dst", src.geometry).context("create the check cache")?;
    dst.fill_byte(0);
    let dst_id = (std::process::id() as u64) << 16 | 0x101;
    let g = src.geometry;
    c.register_kv_cache(
        dst_id,
        &dst.descriptors(),
        MODEL,
        1,
        Some(g.shape.hint()),
        &dst.groups(),
    )?;
    let chunks = lookup_key.token_ids.len() as u64 / s.cwm.settings.chunk_size as u64;
    c.lookup(lookup_key)?;
    let hit = c.query_prefetch_status(&lookup_key.request_id)?;
    ensure!(
        hit == chunks,
        "lookup after thaw hit {hit} of {chunks} chunks"
    );
    let key = IpcCacheServerKey {
        worker_id: Some(0),
        ..lookup_key.clone()
    };
    ensure!(
        c.retrieve(&key, dst_id, blocks, 0)?.ok,
        "retrieve after thaw failed"
    );
    if let Some((layer, block, byte)) = dst.first_difference(src, &blocks[0]) {
        bail!(
            "thawed bytes differ from the stored ones: layer {layer}, block {block}, byte {byte}"
        );
    }
    let _ = c.unregister_kv_cache(dst_id);
    Ok(vec![format!(
        "after the last thaw: lookup hit {hit} of {chunks} chunks; retrieved == stored, {} blocks x {} layers byte for byte",
        blocks[0].len(),
        g.layers
    )])
}

/// Evict every file under `dir` from the page cache (written back first), so the next read
/// comes from the disk. Pages mapped by a live process stay: call it with no sidecar running.
fn drop_page_cache(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            drop_page_cache(&path)?;
        } else {
            super::disk::drop_cached(&path)?;
        }
    }
    Ok(())
}

/// What `cwm bench --window` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WindowReport {
    pub machine: super::Machine,
    pub unix_time: u64,
    /// The yardstick: one chunk object copied with memcpy (measured between thaws).
    pub memcpy: super::memcpy::MemcpyResults,
    pub window: WindowResults,
}

impl WindowReport {
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let (m, w) = (&self.machine, &self.window);
        let g = w.geometry;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "cwm bench --window: freeze a context window to L2, thaw it back into L1"
        );
        let _ = writeln!(
            out,
            "  machine   {}, {} cores, {:.1} GiB, load {}",
            m.cpu, m.cores, m.memory_gib, m.load_average
        );
        let _ = writeln!(
            out,
            "  window    {} tokens, {} chunks, {} layers x {} KV heads x {} head dim bf16 ({:?}); {:.2} GiB raw, {:.2} GiB on disk (ratio {:.3}) in {}",
            w.tokens,
            w.chunks,
            g.layers,
            g.heads,
            g.content / 2,
            g.shape,
            w.raw_bytes as f64 / (1u64 << 30) as f64,
            w.stored_bytes as f64 / (1u64 << 30) as f64,
            w.stored_bytes as f64 / w.raw_bytes.max(1) as f64,
            w.l2_path.display()
        );
        let _ = writeln!(
            out,
            "  store     {:.0} ms ({:.2} GB/s) through the protocol; freeze {:.0} ms ({:.2} GB/s raw, fsynced)",
            ms(w.store),
            gbps(w.raw_bytes, w.store),
            ms(w.freeze),
            gbps(w.raw_bytes, w.freeze)
        );
        for (what, s) in [("thaw cold", &w.thaw_cold), ("thaw warm", &w.thaw_warm)] {
            let _ = writeln!(
                out,
                "  {what} {:.3} s median ({:.3}-{:.3}) over {}: {:.2} GB/s raw",
                s.median().as_secs_f64(),
                s.min().as_secs_f64(),
                s.max().as_secs_f64(),
                s.len(),
                gbps(w.raw_bytes, s.median())
            );
        }
        let _ = writeln!(
            out,
            "            cold: restarted sidecar, segments evicted from the page cache; warm: L1 emptied, segments cached"
        );
        let _ = writeln!(
            out,
            "  memcpy    {:.2} GB/s 1 thread, {:.2} GB/s on {} threads ({} MiB object, median)",
            gbps(self.memcpy.bytes, self.memcpy.single_thread.median()),
            gbps(self.memcpy.bytes, self.memcpy.multi_thread.median()),
            self.memcpy.threads,
            self.memcpy.bytes >> 20
        );
        for c in &w.checks {
            let _ = writeln!(out, "  check     {c}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::kv::KvShape;

    #[test]
    fn a_small_window_freezes_and_thaws_byte_exact() {
        let dir = tempfile::tempdir().unwrap();
        let geometry = KvGeometry {
            shape: KvShape::Hnd,
            layers: 2,
            blocks: 512 / 16 + 1,
            block_size: 16,
            heads: 2,
            content: 32,
        };
        let mut between = 0;
        let r = run(
            &WindowConfig {
                geometry,
                tokens: 512,
                repeats: 2,
                l2_path: dir.path().to_path_buf(),
                base: Config::default(),
            },
            &mut || between += 1,
        )
        .unwrap();
        assert_eq!((r.chunks, r.raw_bytes), (2, 2 * geometry.object_bytes(256)));
        assert!(r.stored_bytes > 0 && r.stored_bytes <= r.raw_bytes + 4096);
        assert_eq!((r.thaw_cold.len(), r.thaw_warm.len(), between), (2, 2, 4));
        assert_eq!(r.checks.len(), 1, "{:?}", r.checks);
    }
}
