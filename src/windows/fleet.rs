//! Windows fleet-wide, when a tier behind L1 keeps a shared `WindowCatalog` (L3: the manifests
//! in Redis, `store::l3::catalog`): its manifests are the shared truth, and each node's local
//! catalog follows them. Windows reach that tier only through this narrow handle.
//!
//! - `publish` (freeze, clone): the window's records go to Redis without a TTL, then its
//!   manifest is created there (only if the name is free fleet-wide), or, for an auto-save
//!   replacing its last version, written over the old one in one command (a reader gets one
//!   version whole). If either fails the local freeze is undone: a window is frozen everywhere
//!   or nowhere.
//! - `sync` (before list, status, thaw, freeze, clone, delete): manifests in Redis that this node
//!   does not know are added to its catalog (marked `fleet`); a fleet window replaced in Redis
//!   (an auto-save on another node) is replaced here (the new version pinned before the old
//!   is unpinned); fleet windows gone from Redis (deleted on another node) are removed here. While Redis is unreachable the local catalog
//!   answers as it is.
//! - `unpublish` (delete): the manifest leaves Redis first (so the delete is seen by all), and
//!   records no remaining window names get the cache TTL back.
//! - `fetch` (thaw): records in neither L1 nor L2 are read from Redis (verified) into L1.

use std::collections::HashSet;

use connector_protocol::ObjectKey;

use super::catalog::Window;
use super::{WindowError, Windows};
use crate::store::tier::WindowCatalog;

/// Records pushed per batch by a freeze: bounds the memory of encoded records in flight.
const PUSH_BATCH: usize = 8;

/// How `publish` puts a manifest in the fleet's catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Manifest {
    /// Only if the name is free fleet-wide (freeze, clone).
    Create,
    /// In the place of the version there, in one write (an auto-save replacing the last).
    Replace,
}

impl Windows {
    /// The fleet's catalog, when a tier keeps one.
    pub(super) fn fleet(&self) -> Option<&dyn WindowCatalog> {
        self.cwm.tiers.window_catalog().map(|c| &**c)
    }

    /// Bring the local catalog in line with the manifests in Redis. Call under `op_lock`.
    pub(super) fn sync_locked(&self) {
        let (Some(fleet), Some(catalog)) = (self.fleet(), &self.catalog) else {
            return;
        };
        let manifests = match fleet.manifests() {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("window catalog not synced with L3: {e}");
                return;
            }
        };
        let mut fleet = HashSet::new();
        for (name, bytes) in manifests {
            let w = match serde_json::from_slice::<Window>(&bytes) {
                Ok(w) if w.name == name && w.check().is_ok() => w,
                _ => {
                    tracing::error!(
                        window = name,
                        "L3: skipping a window manifest that does not parse or check"
                    );
                    continue;
                }
            };
            fleet.insert(name.clone());
            if let Some(local) = catalog.get(&name) {
                if local.fleet && !local.same_version(&w) {
                    self.adopt_replaced(&local, Window { fleet: true, ..w });
                }
            } else {
                let w = Window { fleet: true, ..w };
                let pinned = self.pin_present(&w);
                if let Err(e) = catalog.insert(w) {
                    tracing::warn!(window = name, "could not add a fleet window locally: {e}");
                    self.unpin(&pinned);
                    continue;
                }
                self.pins.lock().insert(name, pinned);
            }
        }
        for w in catalog.all() {
            if w.fleet && !fleet.contains(&w.name) && catalog.remove(&w.name).is_ok() {
                let pinned = self.pins.lock().remove(&w.name).unwrap_or_default();
                self.unpin(&pinned);
                tracing::info!(window = w.name, "window deleted on another node");
            }
        }
    }

    /// Put `w`, the fleet's new version of `old`, in its place here.
    fn adopt_replaced(&self, old: &Window, w: Window) {
        let pinned = self.pin_present(&w);
        if let Err(e) = self.catalog.as_ref().expect("synced").update(w) {
            tracing::warn!(
                window = old.name,
                "could not take the fleet's new version: {e}"
            );
            self.unpin(&pinned);
            return;
        }
        let old_pins = self.pins.lock().insert(old.name.clone(), pinned);
        self.unpin(&old_pins.unwrap_or_default());
        tracing::info!(window = old.name, "window replaced on another node");
    }

    pub(super) fn sync(&self) {
        if self.fleet().is_some() {
            let _serial = self.op_lock.lock();
            self.sync_locked();
        }
    }

    /// Push `w`'s records (when `with_data`) and create its manifest in Redis.
    pub(super) fn publish(
        &self,
        w: &Window,
        with_data: bool,
        manifest: Manifest,
    ) -> Result<(), WindowError> {
        let Some(fleet) = self.fleet() else {
            return Ok(());
        };
        let fleet_err = |e: &dyn std::fmt::Display| {
            WindowError::Fleet(format!("window {:?} not published to L3: {e}", w.name))
        };
        if with_data {
            for keys in w.data_keys().chunks(PUSH_BATCH) {
                let mut records = Vec::with_capacity(keys.len());
                for k in keys {
                    records.push((k.clone(), self.record_of(k)?));
                }
                fleet.keep(records).map_err(|e| fleet_err(&e))?;
            }
        }
        let bytes = serde_json::to_vec(&Window {
            fleet: true,
            ..w.clone()
        })
        .map_err(|e| fleet_err(&e))?;
        let created = match manifest {
            Manifest::Create => fleet.publish(&w.name, bytes),
            Manifest::Replace => fleet.replace(&w.name, bytes).map(|()| true),
        };
        match created {
            Ok(true) => Ok(()),
            Ok(false) => Err(WindowError::Taken(w.name.clone())),
            Err(e) => Err(fleet_err(&e)),
        }
    }

    /// Remove `w`'s manifest from Redis and give its records no other window names their TTL.
    /// `others`: the data keys of the windows that remain.
    pub(super) fn unpublish(&self, name: &str) -> Result<(), WindowError> {
        let Some(fleet) = self.fleet() else {
            return Ok(());
        };
        fleet
            .remove(name)
            .map(|_| ())
            .map_err(|e| WindowError::Fleet(format!("window {name:?} not deleted from L3: {e}")))
    }

    pub(super) fn release_in_l3(&self, keys: &[ObjectKey]) {
        if let Some(fleet) = self.fleet() {
            if let Err(e) = fleet.release(keys) {
                tracing::warn!("L3: records of a deleted window keep no TTL: {e}");
            }
        }
    }

    /// Make `keys` resident in L1 from the tiers that keep no index (Redis) where no tier's
    /// index holds them. Returns how many were read from those tiers.
    pub(super) fn fetch_from_l3(&self, keys: &[ObjectKey]) -> u64 {
        self.cwm.tiers.fetch_unknown(keys)
    }

    /// How many chunks of `w` have every rank's record in Redis (None without L3 or while it is
    /// unreachable).
    pub(super) fn chunks_in_l3(&self, w: &Window) -> Option<usize> {
        let fleet = self.fleet()?;
        if !fleet.reachable() {
            return None;
        }
        let found = fleet.present(&w.data_keys());
        Some(
            w.hashes()
                .iter()
                .filter(|h| {
                    w.keys_of(**h, &w.data_salt)
                        .iter()
                        .all(|k| found.contains(k))
                })
                .count(),
        )
    }

    /// The record of `key`: encoded from L1, else the local tier's verbatim.
    fn record_of(&self, key: &ObjectKey) -> Result<Vec<u8>, WindowError> {
        self.cwm
            .tiers
            .record_of(key)
            .map_err(|_| WindowError::Vanished(Box::new(key.clone())))
    }

    fn pin_present(&self, w: &Window) -> Vec<ObjectKey> {
        let t = &self.cwm.tiers;
        w.data_keys().into_iter().filter(|k| t.pin(k)).collect()
    }

    fn unpin(&self, keys: &[ObjectKey]) {
        keys.iter().for_each(|k| self.cwm.tiers.unpin(k));
    }
}
