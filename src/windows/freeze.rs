//! Freezing a window: a session's chain made durable, pinned and named (and published to
//! the fleet when a tier keeps a shared catalog).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use connector_protocol::ObjectKey;
use rayon::prelude::*;

use super::*;

impl Windows {
    pub fn freeze(&self, req: &FreezeRequest) -> Result<FreezeReport, WindowError> {
        let started = Instant::now();
        validate_name(&req.window_name)?;
        validate_session(&req.session_id)?;
        let description = req.description.clone().unwrap_or_default();
        let tags = req.tags.clone().unwrap_or_default();
        validate_meta(&description, &tags)?;
        let (tiers, catalog) = self.disk()?;
        let _serial = self.op_lock.lock();
        self.sync_locked();
        if catalog.contains(&req.window_name) {
            return Err(WindowError::Taken(req.window_name.clone()));
        }
        let chain = self
            .cwm
            .chains
            .newest(&req.session_id)
            .ok_or_else(|| WindowError::NothingStored(req.session_id.clone()))?;
        let cs = self.cwm.settings.chunk_size;
        let hashes = self
            .cwm
            .hasher
            .chunk_hashes(&chain.tokens, 0, chain.tokens.len());
        let mut w = Window {
            format: catalog::FORMAT.into(),
            version: catalog::VERSION,
            name: req.window_name.clone(),
            model: chain.model.to_string(),
            world_size: chain.world_size,
            chunk_size: cs,
            source_session: req.session_id.clone(),
            session_id: req.session_id.clone(),
            data_salt: req.session_id.clone(),
            tokens: Vec::new(),
            chunk_hashes: Vec::new(),
            raw_bytes: 0,
            stored_bytes: 0,
            created_at: unix_now(),
            last_thawed_at: None,
            description,
            tags,
            cloned_from: None,
            fleet: false,
        };
        let n = self.cached_prefix(&w, &hashes, &req.session_id);
        if n == 0 {
            return Err(WindowError::NothingStored(req.session_id.clone()));
        }
        w.tokens = chain.tokens[..n * cs].to_vec();
        w.chunk_hashes = hashes[..n].iter().map(|h| h.to_hex()).collect();
        let keys = w.data_keys();
        // Within the salt's durable quotas, or refused before anything is written or pinned.
        tiers
            .admit_window(&w.data_salt, &keys)
            .map_err(|source| WindowError::OverQuota {
                name: w.name.clone(),
                source,
            })?;
        // What a tier holds already is pinned first: writing the rest may drop the salt's
        // oldest unpinned records (its L2 quota), never pinned ones.
        let held: Vec<bool> = keys.iter().map(|k| tiers.pin(k)).collect();
        let mut pinned: Vec<&ObjectKey> = held_keys(&keys, &held, true).collect();
        let unpin_all = |pinned: &[&ObjectKey]| pinned.iter().for_each(|k| tiers.unpin(k));
        // Then the rest durable (in parallel: compression dominates), then pinned.
        let written = AtomicUsize::new(0);
        let rest: Vec<&ObjectKey> = held_keys(&keys, &held, false).collect();
        if let Err(e) = rest.par_iter().try_for_each(|k| {
            if tiers.make_durable(k)? {
                written.fetch_add(1, Relaxed);
            }
            Ok::<(), WindowError>(())
        }) {
            unpin_all(&pinned);
            return Err(e);
        }
        for k in rest {
            // A record reclaimed since it was written is written again, once.
            let ok = tiers.pin(k) || (tiers.make_durable(k).is_ok() && tiers.pin(k));
            if !ok {
                unpin_all(&pinned);
                return Err(WindowError::Vanished(Box::new(k.clone())));
            }
            pinned.push(k);
        }
        if let Err(e) = tiers.sync() {
            unpin_all(&pinned);
            return Err(e.into());
        }
        let infos: Vec<_> = keys.iter().filter_map(|k| tiers.record_info(k)).collect();
        w.raw_bytes = infos.iter().map(|i| i.raw_len).sum();
        w.stored_bytes = infos.iter().map(|i| i.record_len).sum();
        w.fleet = self.fleet().is_some();
        // Fleet-wide first (records, then the manifest if the name is free everywhere).
        if let Err(e) = self.publish(&w, true) {
            unpin_all(&pinned);
            return Err(e);
        }
        if let Err(e) = catalog.insert(w.clone()) {
            unpin_all(&pinned);
            return Err(e.into());
        }
        self.pins
            .lock()
            .insert(w.name.clone(), pinned.into_iter().cloned().collect());
        tracing::info!(
            window = w.name,
            session = w.source_session,
            tokens = w.tokens.len(),
            chunks = n,
            "window frozen"
        );
        Ok(FreezeReport {
            window: WindowSummary::from(&w),
            written_now: written.into_inner(),
            tokens_left_out: chain.tokens.len() - n * cs,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}

/// Those of `keys` whose `held` flag is `want`.
fn held_keys<'a>(
    keys: &'a [ObjectKey],
    held: &'a [bool],
    want: bool,
) -> impl Iterator<Item = &'a ObjectKey> {
    keys.iter()
        .zip(held)
        .filter(move |(_, &h)| h == want)
        .map(|(k, _)| k)
}
