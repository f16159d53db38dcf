//! Named manifests in Redis: one hash (`KeyLayout::windows`) of name → bytes, so listing,
//! reading, creating (only if absent) and deleting are single-key commands, atomic on a
//! cluster too. The store knows nothing of what a manifest says; `crate::windows` does.
//! Also: giving data keys back their cache TTL once no manifest names them.

use std::collections::HashMap;

use connector_protocol::ObjectKey;

use super::link::LinkError;
use super::L3;

impl L3 {
    /// Every manifest, by name.
    pub fn manifests(&self) -> Result<HashMap<String, Vec<u8>>, LinkError> {
        let key = self.keys().windows();
        self.link()
            .run(move |mut c| async move {
                c.query::<HashMap<String, Vec<u8>>>(redis::cmd("HGETALL").arg(key))
                    .await
            })
            .inspect_err(|e| self.link_error(e))
    }

    /// Create manifest `name`; false if the name is taken.
    pub fn publish_manifest(&self, name: &str, manifest: Vec<u8>) -> Result<bool, LinkError> {
        let (key, name) = (self.keys().windows(), name.to_string());
        self.link()
            .run(move |mut c| async move {
                c.query::<bool>(redis::cmd("HSETNX").arg(key).arg(name).arg(manifest))
                    .await
            })
            .inspect_err(|e| self.link_error(e))
    }

    /// Delete manifest `name`; false if there was none.
    pub fn remove_manifest(&self, name: &str) -> Result<bool, LinkError> {
        let (key, name) = (self.keys().windows(), name.to_string());
        self.link()
            .run(move |mut c| async move {
                c.query::<bool>(redis::cmd("HDEL").arg(key).arg(name)).await
            })
            .inspect_err(|e| self.link_error(e))
    }

    /// Give `keys` the cache TTL again (their window is gone): `volatile-lru` may evict them.
    pub fn release(&self, keys: &[ObjectKey]) -> Result<(), LinkError> {
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
