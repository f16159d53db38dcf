//! What windows report: list, status of windows and sessions, sessions, cache figures,
//! health.

use connector_protocol::ObjectKey;

use super::catalog::{Catalog, Window};
use super::{
    probe_window, secs, validate_name, validate_session, ChainStatus, ChunkTiers, ListRequest,
    SessionInfo, SessionList, SessionStatus, StatusReport, StatusRequest, WindowError, WindowList,
    WindowStatus, WindowSummary, Windows,
};
use crate::status::{self, CacheStats, Health};

impl Windows {
    pub fn list(&self, req: &ListRequest) -> Result<WindowList, WindowError> {
        self.sync();
        let Some(catalog) = &self.catalog else {
            return Ok(WindowList {
                total: 0,
                windows: Vec::new(),
                next_offset: None,
            });
        };
        let offset = req.offset.unwrap_or(0);
        let limit = req.limit.unwrap_or(50);
        if limit == 0 || limit > 500 {
            return Err(WindowError::InvalidArgument(
                "limit",
                format!("{limit}: 1..=500"),
            ));
        }
        let unreadable = catalog.unreadable();
        let mut matching: Vec<WindowSummary> = catalog
            .all()
            .iter()
            .map(WindowSummary::from)
            .chain(unreadable.iter().map(WindowSummary::from))
            .filter(|w| req.tag.as_ref().is_none_or(|t| w.tags.contains(t)))
            .filter(|w| req.model.as_ref().is_none_or(|m| &w.model == m))
            .filter(|w| {
                req.name_prefix
                    .as_ref()
                    .is_none_or(|p| w.name.starts_with(p.as_str()))
            })
            .collect();
        matching.sort_by(|a, b| a.name.cmp(&b.name));
        let total = matching.len();
        let windows: Vec<WindowSummary> = matching.into_iter().skip(offset).take(limit).collect();
        let next = offset + windows.len();
        Ok(WindowList {
            total,
            windows,
            next_offset: (next < total).then_some(next),
        })
    }

    pub fn status(&self, req: &StatusRequest) -> Result<StatusReport, WindowError> {
        if req.window_name.is_none() && req.session_id.is_none() {
            return Err(WindowError::InvalidArgument(
                "request",
                "give window_name or session_id".into(),
            ));
        }
        self.sync();
        let window = match &req.window_name {
            Some(name) => {
                validate_name(name)?;
                let w = self.find(name)?;
                Some(self.window_status(&w))
            }
            None => None,
        };
        let session = match &req.session_id {
            Some(s) => {
                validate_session(s)?;
                Some(self.session_status(s))
            }
            None => None,
        };
        Ok(StatusReport { window, session })
    }

    fn window_status(&self, w: &Window) -> WindowStatus {
        let tiers = &self.cwm.tiers;
        let hashes = w.hashes();
        let in_l2 = hashes
            .iter()
            .filter(|h| {
                w.keys_of(**h, &w.data_salt)
                    .iter()
                    .all(|k| tiers.durable(k))
            })
            .count();
        let resident = hashes
            .iter()
            .take_while(|h| {
                w.keys_of(**h, &w.session_id)
                    .iter()
                    .all(|k| tiers.resident(k))
            })
            .count();
        let in_l3 = self.chunks_in_l3(w);
        WindowStatus {
            window: WindowSummary::from(w),
            chunks_in_l2: in_l2,
            chunks_resident: resident,
            chunks_in_l3: in_l3,
            chunks_missing: hashes.len() - in_l2.max(in_l3.unwrap_or(0)),
        }
    }

    fn session_status(&self, salt: &str) -> SessionStatus {
        let cs = self.cwm.settings.chunk_size;
        let chains = self
            .cwm
            .chains
            .chains(salt)
            .into_iter()
            .map(|c| {
                let hashes = self.cwm.hasher.chunk_hashes(&c.tokens, 0, c.tokens.len());
                let probe = Window {
                    model: c.model.to_string(),
                    world_size: c.world_size,
                    ..probe_window()
                };
                let chunks = c.tokens.len() / cs;
                let keys: Vec<Vec<ObjectKey>> = hashes
                    .iter()
                    .take(chunks)
                    .map(|h| probe.keys_of(*h, salt))
                    .collect();
                let cached = self.cached_prefix(&probe, &hashes, salt);
                let over_quota = (self.cwm.tiers)
                    .admit_window(salt, &keys[..cached.min(keys.len())].concat())
                    .err()
                    .map(|e| e.to_string());
                ChainStatus {
                    model: c.model.to_string(),
                    world_size: c.world_size,
                    tokens: c.tokens.len(),
                    chunks,
                    chunks_cached: cached,
                    freezable: cached > 0 && over_quota.is_none(),
                    over_quota,
                    chunk_tiers: self.chunk_tiers(&keys),
                    updated_at: secs(c.updated),
                }
            })
            .collect();
        let windows = self
            .catalog
            .as_ref()
            .map(|c| {
                c.all()
                    .into_iter()
                    .filter(|w| w.source_session == salt)
                    .map(|w| w.name)
                    .collect()
            })
            .unwrap_or_default();
        SessionStatus {
            session_id: salt.to_string(),
            chains,
            windows,
        }
    }

    /// Where each chunk (its keys on every rank) is held: L1, L2's index, and Redis (one
    /// batch of existence checks, when L3 is reachable).
    fn chunk_tiers(&self, chunks: &[Vec<ObjectKey>]) -> Vec<ChunkTiers> {
        let tiers = &self.cwm.tiers;
        let in_l3 = self
            .fleet()
            .filter(|f| f.reachable())
            .map(|f| f.present(&chunks.concat()));
        chunks
            .iter()
            .map(|keys| ChunkTiers {
                l1: keys.iter().all(|k| tiers.resident(k)),
                l2: keys.iter().all(|k| tiers.durable(k)),
                l3: in_l3
                    .as_ref()
                    .map(|found| keys.iter().all(|k| found.contains(k))),
            })
            .collect()
    }

    pub fn session_list(&self) -> SessionList {
        SessionList {
            sessions: self
                .cwm
                .chains
                .list()
                .into_iter()
                .map(|s| SessionInfo {
                    session_id: s.cache_salt.to_string(),
                    model: s.model.to_string(),
                    world_size: s.world_size,
                    chains: s.chains,
                    newest_tokens: s.newest_tokens,
                    open_requests: s.open_requests,
                    updated_at: secs(s.updated),
                })
                .collect(),
        }
    }

    pub fn cache_stats(&self) -> CacheStats {
        status::cache_stats(&self.cwm)
    }

    pub fn health(&self) -> Health {
        Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_secs: self.started.elapsed().as_secs(),
            chunk_size: self.cwm.settings.chunk_size,
            l2_enabled: self.cwm.tiers.has_lower(),
            windows: self.catalog.as_ref().map_or(0, Catalog::len),
            sessions: self.cwm.chains.len(),
            registered_instances: self.cwm.registry.len(),
            engine_driven_contexts: self.cwm.engine_driven.len(),
            l1_quarantined_bytes: self.cwm.tiers.quarantined_bytes(),
            auto_save: self.autosave_stats(),
        }
    }
}
