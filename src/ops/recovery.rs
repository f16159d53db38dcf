//! A restarted cwm and the engines it served before.
//!
//! - **Restored**: every `register_kv_cache` in the journal (`journal`) is parsed and opened
//!   again, before the MP port answers its first request, through the parser and checks of a
//!   live registration (a `cpu_shm` segment by name, CUDA IPC handles through the CUDA
//!   backend). One that no longer opens (engine gone, segment removed, no GPU) is dropped: its
//!   entry is removed, it is logged and counted. A restored instance counts as heard from by
//!   heartbeats, so if its engine is dead it is reaped after `--worker-reap-timeout-secs`.
//!   Engine-driven contexts are restored when L1 adopted the pool they were answered
//!   (`engine_driven::restore`).
//! - **Prompted**: an engine cwm does not know (dropped above, reaped) still pings with its
//!   instance id. The first
//!   such ping is answered `false`, later ones `true`: LMCache's heartbeat then sees an
//!   unhealthy -> healthy edge and runs its recovery callback, which re-registers the KV caches
//!   (and, engine-driven, maps the new pool). Its stores and retrieves are skipped from the
//!   `false` until that re-registration: at most two heartbeat intervals.

use std::collections::HashSet;

use parking_lot::Mutex;

use super::command::Command;
use super::journal::{Entry, Journal, Kind};
use super::register::RegisterKvCache;
use super::Cwm;
use crate::limits::for_log;

/// Most unknown instance ids remembered as prompted; past it the set starts over (an engine
/// then sees one more `false`).
const MAX_PROMPTED: usize = 1 << 16;

/// Instance ids whose heartbeat was answered `false` to make their connector re-register.
#[derive(Default)]
pub struct Prompts {
    prompted: Mutex<HashSet<u64>>,
}

impl Prompts {
    /// The answer to a ping from an instance cwm does not know: `false` the first time, so the
    /// connector's recovery runs on its next (`true`) ping; `true` after that, so a connector
    /// whose re-registration cwm cannot use is not kept unhealthy forever.
    pub fn ping_unknown(&self, id: u64) -> bool {
        let mut prompted = self.prompted.lock();
        if prompted.contains(&id) {
            return true;
        }
        if prompted.len() >= MAX_PROMPTED {
            prompted.clear();
        }
        prompted.insert(id);
        tracing::warn!(
            instance_id = id,
            "ping from an instance cwm does not know (cwm restarted, or the instance was \
             reaped): answered false so its connector re-registers on its next heartbeat"
        );
        false
    }
}

/// What a start restored from the journal.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Restored {
    /// Registrations reopened and serving (engine-driven contexts included).
    pub restored: usize,
    /// Of those, engine-driven contexts (their pool adopted).
    pub engine_driven: usize,
    /// Entries that no longer open (engine or segment gone, no GPU) or were refused: removed.
    pub dropped: usize,
    /// Files that are not valid entries (corrupt, foreign): ignored and removed.
    pub corrupt: usize,
}

impl Cwm {
    /// Use `journal` for this sidecar's registrations (once; later calls are ignored).
    pub fn attach_journal(&self, journal: Journal) {
        let _ = self.journal.set(journal);
    }

    /// Whether registrations are journaled (a registration journal is attached).
    pub fn journaled(&self) -> bool {
        self.journal.get().is_some()
    }

    /// Reopen every journaled registration (see the module doc). Call before serving.
    pub fn restore_registrations(&self) -> Restored {
        let mut out = Restored::default();
        let Some(journal) = self.journal.get() else {
            return out;
        };
        let (entries, rejected) = match journal.entries() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(
                    dir = %journal.dir().display(),
                    "cannot read the registration journal, nothing restored: {e}"
                );
                return out;
            }
        };
        for r in &rejected {
            tracing::warn!(
                file = %r.path.display(),
                "registration journal entry ignored and removed: {}",
                r.reason
            );
        }
        out.corrupt = rejected.len();
        for entry in entries {
            let id = entry.instance_id;
            let restored = match entry.kind {
                Kind::KvCache => self.restore_one(&entry),
                Kind::EngineDriven => self.restore_engine_driven(&entry),
            };
            match restored {
                Ok(()) => {
                    out.restored += 1;
                    out.engine_driven += usize::from(entry.kind == Kind::EngineDriven);
                }
                Err(reason) => {
                    out.dropped += 1;
                    tracing::warn!(
                        instance_id = id,
                        "journaled registration dropped (its engine re-registers when it next \
                         pings): {}",
                        for_log(&reason)
                    );
                    if let Err(e) = journal.remove(id) {
                        tracing::error!(instance_id = id, "cannot remove journal entry: {e}");
                    }
                }
            }
        }
        out
    }

    fn restore_one(&self, entry: &Entry) -> Result<(), String> {
        let id = entry.instance_id;
        let frames: Vec<&[u8]> = entry.frames.iter().map(Vec::as_slice).collect();
        if frames.len() != Kind::KvCache.frames() {
            return Err(format!("{} frames", frames.len()));
        }
        let r = RegisterKvCache::parse(&frames).map_err(|e| e.to_string())?;
        if r.instance_id != id {
            return Err(format!(
                "the entry names instance {}, its file {id}",
                r.instance_id
            ));
        }
        if self.registry.contains(id) {
            return Ok(());
        }
        let opened = self.open_registration(&r).map_err(|e| e.to_string())?;
        if let Err(reason) = &opened.kv {
            return Err(reason.clone());
        }
        self.install(id, &r.model_name, opened, true);
        Ok(())
    }

    /// Journal a registration cwm serves (a failure is logged: it then does not survive a
    /// restart, and the engine re-registers when prompted).
    pub(super) fn journal_registration(&self, r: &RegisterKvCache) {
        let Some(journal) = self.journal.get() else {
            return;
        };
        let Some(frames) = r.to_frames() else {
            return;
        };
        if let Err(e) = journal.record(Kind::KvCache, r.instance_id, &frames) {
            tracing::error!(
                instance_id = r.instance_id,
                "cannot journal the registration (it will not survive a restart): {e}"
            );
        }
    }

    /// Remove the journal entries of instances cwm forgot (unregistered or reaped).
    pub(super) fn forget_journaled(&self, ids: &[u64]) {
        let Some(journal) = self.journal.get() else {
            return;
        };
        for &id in ids {
            if let Err(e) = journal.remove(id) {
                tracing::error!(instance_id = id, "cannot remove journal entry: {e}");
            }
        }
    }
}
