//! Thawing a window: its chunks loaded into L1, in parallel, under its session or a new one.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Instant;

use parking_lot::Mutex;
use rayon::prelude::*;

use super::catalog::unix_now;
use super::{
    validate_name, validate_session, ThawReport, ThawRequest, TierReads, WindowError, Windows,
};
use crate::store::tiered::{InstallError, Installed};

impl Windows {
    /// Load the window's chunks into L1 under its session or `new_session_id`. `progress` is
    /// called with (chunks done, chunks) as chunks complete, from the loading threads.
    pub fn thaw(
        &self,
        req: &ThawRequest,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<ThawReport, WindowError> {
        let started = Instant::now();
        validate_name(&req.window_name)?;
        if let Some(s) = &req.new_session_id {
            validate_session(s)?;
        }
        let (tiers, catalog) = self.disk()?;
        self.sync();
        let w = catalog
            .get(&req.window_name)
            .ok_or_else(|| WindowError::Unknown(req.window_name.clone()))?;
        let cs = self.cwm.settings.chunk_size;
        if w.chunk_size != cs {
            return Err(WindowError::ChunkSize {
                name: w.name,
                window: w.chunk_size,
                server: cs,
            });
        }
        // Records frozen on another node: from Redis into L1, then copied like L1 hits.
        let from_l3 = self.fetch_from_l3(&w.data_keys());
        let target = req.new_session_id.clone().unwrap_or(w.session_id.clone());
        let hashes = w.hashes();
        let total = hashes.len();
        let done = AtomicUsize::new(0);
        let (from_l1, from_l2, resident, bytes) = (
            AtomicU64::new(0),
            AtomicU64::new(0),
            AtomicU64::new(0),
            AtomicU64::new(0),
        );
        let last_error: Mutex<Option<String>> = Mutex::new(None);
        let loaded: Vec<bool> = hashes
            .par_iter()
            .map(|h| {
                let data = w.keys_of(*h, &w.data_salt);
                let dest = w.keys_of(*h, &target);
                let ok = data
                    .iter()
                    .zip(&dest)
                    .all(|(src, dst)| match tiers.install(src, dst) {
                        Ok(Installed::Resident) => {
                            resident.fetch_add(1, Relaxed);
                            true
                        }
                        Ok(Installed::FromL1(len)) => {
                            from_l1.fetch_add(1, Relaxed);
                            bytes.fetch_add(len, Relaxed);
                            true
                        }
                        Ok(Installed::FromLower(len)) => {
                            from_l2.fetch_add(1, Relaxed);
                            bytes.fetch_add(len, Relaxed);
                            true
                        }
                        Err(e) => {
                            *last_error.lock() = Some(match e {
                                InstallError::Missing(_) => format!("record {src:?} is not in L2"),
                                e => e.to_string(),
                            });
                            false
                        }
                    });
                progress(done.fetch_add(1, Relaxed) + 1, total);
                ok
            })
            .collect();
        let ready = loaded.iter().take_while(|ok| **ok).count();
        if ready == 0 && total > 0 {
            return Err(WindowError::ThawFailed {
                name: w.name,
                chunks: total,
                reason: last_error.into_inner().unwrap_or_default(),
            });
        }
        let tokens_ready = ready * cs;
        self.cwm.chains.record(
            &w.model,
            w.world_size,
            &target,
            &w.tokens[..tokens_ready],
            None,
        );
        self.autosave.thawed(
            &self.cwm.chains,
            &target,
            &w.model,
            &w.tokens[..tokens_ready],
        );
        // Only on the version thawed: one replaced or deleted meanwhile stays as it is.
        if let Err(e) = catalog.mark_thawed(&w, unix_now()) {
            tracing::warn!(window = w.name, "could not record the thaw time: {e}");
        }
        let elapsed = started.elapsed().as_secs_f64();
        let bytes = bytes.into_inner();
        tracing::info!(
            window = w.name,
            session = target,
            tokens_ready,
            bytes,
            "window thawed"
        );
        Ok(ThawReport {
            window_name: w.name.clone(),
            session_id: target,
            model: w.model.clone(),
            tokens_ready,
            tokens: w.tokens.len(),
            chunks_ready: ready,
            chunks: total,
            bytes,
            tiers: TierReads {
                l1: from_l1.into_inner(),
                l2: from_l2.into_inner(),
                already_resident: resident.into_inner(),
                l3: from_l3,
            },
            complete: ready == total,
            elapsed_ms: elapsed * 1e3,
            gb_per_s: if elapsed > 0.0 {
                bytes as f64 / elapsed / 1e9
            } else {
                0.0
            },
        })
    }
}
