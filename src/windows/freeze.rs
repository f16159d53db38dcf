//! Freezing a window: a session's chain made durable, pinned and named (and published to
//! the fleet when a tier keeps a shared catalog).

use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use connector_protocol::ObjectKey;
use rayon::prelude::*;

use super::catalog::{self, unix_now, Window};
use super::fleet::Manifest;
use super::{
    validate_meta, validate_name, validate_session, FreezeReport, FreezeRequest, WindowError,
    WindowSummary, Windows,
};
use crate::session::Chain;

/// What names and describes a window being frozen.
pub(super) struct FreezeMeta {
    pub name: String,
    /// The session (cache_salt) it is frozen from and thaws into by default.
    pub session: String,
    pub description: String,
    pub tags: Vec<String>,
}

impl Windows {
    pub fn freeze(&self, req: &FreezeRequest) -> Result<FreezeReport, WindowError> {
        validate_name(&req.window_name)?;
        validate_session(&req.session_id)?;
        let description = req.description.clone().unwrap_or_default();
        let tags = req.tags.clone().unwrap_or_default();
        validate_meta(&description, &tags)?;
        let (_, catalog) = self.disk()?;
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
        let meta = FreezeMeta {
            name: req.window_name.clone(),
            session: req.session_id.clone(),
            description,
            tags,
        };
        self.freeze_locked(&chain, meta, None)
    }

    /// Freeze `chain` as a window (under the op lock): its cached prefix made durable, pinned,
    /// published to the fleet, and its manifest persisted. With `replacing` (the window of that
    /// name now), the new version takes its place atomically: readers see the old manifest
    /// whole until the new one is, and the old version's records are released only then.
    pub(super) fn freeze_locked(
        &self,
        chain: &Chain,
        meta: FreezeMeta,
        replacing: Option<Window>,
    ) -> Result<FreezeReport, WindowError> {
        let started = Instant::now();
        let (tiers, catalog) = self.disk()?;
        let cs = self.cwm.settings.chunk_size;
        let hashes = self
            .cwm
            .hasher
            .chunk_hashes(&chain.tokens, 0, chain.tokens.len());
        let mut w = Window {
            format: catalog::FORMAT.into(),
            version: catalog::VERSION,
            name: meta.name,
            model: chain.model.to_string(),
            world_size: chain.world_size,
            chunk_size: cs,
            source_session: meta.session.clone(),
            session_id: meta.session.clone(),
            data_salt: meta.session.clone(),
            tokens: Vec::new(),
            chunk_hashes: Vec::new(),
            raw_bytes: 0,
            stored_bytes: 0,
            created_at: unix_now(),
            last_thawed_at: None,
            description: meta.description,
            tags: meta.tags,
            cloned_from: None,
            fleet: false,
        };
        let n = self.cached_prefix(&w, &hashes, &meta.session);
        if n == 0 {
            return Err(WindowError::NothingStored(meta.session));
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
        // Fleet-wide first (records, then the manifest: created if the name is free
        // everywhere, or put in the old version's place).
        let manifest = match replacing {
            Some(_) => Manifest::Replace,
            None => Manifest::Create,
        };
        if let Err(e) = self.publish(&w, true, manifest) {
            unpin_all(&pinned);
            return Err(e);
        }
        let persisted = match replacing {
            Some(_) => catalog.update(w.clone()),
            None => catalog.insert(w.clone()),
        };
        if let Err(e) = persisted {
            unpin_all(&pinned);
            return Err(e.into());
        }
        let old_pins = self
            .pins
            .lock()
            .insert(w.name.clone(), pinned.into_iter().cloned().collect());
        if let Some(old) = replacing {
            self.release(&old, old_pins.unwrap_or_default());
        }
        tracing::info!(
            window = w.name,
            session = w.source_session,
            replaced = manifest == Manifest::Replace,
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
