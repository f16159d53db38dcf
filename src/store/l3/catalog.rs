//! L3 as the fleet's `WindowCatalog`. Named manifests in Redis: one hash
//! (`KeyLayout::windows`) of name → bytes, so listing, reading, creating (only if absent) and
//! replacing and deleting are single-key commands, atomic on a cluster too. The store knows nothing of what
//! a manifest says; `crate::windows` does. Also: a window's records kept without a TTL, and
//! given back their cache TTL once no manifest names them.

use std::collections::{HashMap, HashSet};

use connector_protocol::ObjectKey;

use super::link::LinkError;
use super::L3;
use crate::store::tier::{TierError, WindowCatalog};

fn tier_error(e: LinkError) -> TierError {
    TierError::new("L3", e)
}

impl WindowCatalog for L3 {
    fn reachable(&self) -> bool {
        self.link().usable()
    }

    fn manifests(&self) -> Result<HashMap<String, Vec<u8>>, TierError> {
        self.all_manifests().map_err(tier_error)
    }

    fn publish(&self, name: &str, manifest: Vec<u8>) -> Result<bool, TierError> {
        self.publish_manifest(name, manifest).map_err(tier_error)
    }

    fn replace(&self, name: &str, manifest: Vec<u8>) -> Result<(), TierError> {
        self.replace_manifest(name, manifest).map_err(tier_error)
    }

    fn remove(&self, name: &str) -> Result<bool, TierError> {
        self.remove_manifest(name).map_err(tier_error)
    }

    fn keep(&self, records: Vec<(ObjectKey, Vec<u8>)>) -> Result<usize, TierError> {
        self.set(records, false).map_err(tier_error)
    }

    fn release(&self, keys: &[ObjectKey]) -> Result<(), TierError> {
        self.expire(keys).map_err(tier_error)?;
        self.released(keys).map_err(tier_error)
    }

    fn present(&self, keys: &[ObjectKey]) -> HashSet<ObjectKey> {
        self.existing(keys)
    }
}

impl L3 {
    /// Every manifest, by name.
    fn all_manifests(&self) -> Result<HashMap<String, Vec<u8>>, LinkError> {
        let key = self.keys().windows();
        self.link()
            .run(move |mut c| async move {
                c.query::<HashMap<String, Vec<u8>>>(redis::cmd("HGETALL").arg(key))
                    .await
            })
            .inspect_err(|e| self.link_error(e))
    }

    /// Create manifest `name`; false if the name is taken.
    fn publish_manifest(&self, name: &str, manifest: Vec<u8>) -> Result<bool, LinkError> {
        let (key, name) = (self.keys().windows(), name.to_string());
        self.link()
            .run(move |mut c| async move {
                c.query::<bool>(redis::cmd("HSETNX").arg(key).arg(name).arg(manifest))
                    .await
            })
            .inspect_err(|e| self.link_error(e))
    }

    /// Set manifest `name` (HSET: one field of one hash, so a reader gets one version whole).
    fn replace_manifest(&self, name: &str, manifest: Vec<u8>) -> Result<(), LinkError> {
        let (key, name) = (self.keys().windows(), name.to_string());
        self.link()
            .run(move |mut c| async move {
                c.query::<()>(redis::cmd("HSET").arg(key).arg(name).arg(manifest))
                    .await
            })
            .inspect_err(|e| self.link_error(e))
    }

    /// Delete manifest `name`; false if there was none.
    fn remove_manifest(&self, name: &str) -> Result<bool, LinkError> {
        let (key, name) = (self.keys().windows(), name.to_string());
        self.link()
            .run(move |mut c| async move {
                c.query::<bool>(redis::cmd("HDEL").arg(key).arg(name)).await
            })
            .inspect_err(|e| self.link_error(e))
    }

    /// Give `keys` the cache TTL again (their window is gone): `volatile-lru` may evict them.
    fn expire(&self, keys: &[ObjectKey]) -> Result<(), LinkError> {
        let ttl = self.ttl_secs();
        let cmds = keys
            .iter()
            .map(|k| {
                let mut c = redis::cmd("EXPIRE");
                c.arg(self.keys().chunk(k)).arg(ttl);
                c
            })
            .collect();
        self.link()
            .batch(cmds)
            .map(|_| ())
            .inspect_err(|e| self.link_error(e))
    }
}
