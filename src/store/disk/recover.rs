//! Recovery: opening L2 rebuilds its index from the checkpoint plus a forward scan of what
//! was appended after it, and truncates a torn tail (a crash mid-append).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use connector_protocol::ObjectKey;
use parking_lot::Mutex;

use super::checkpoint::{self, Checkpoint};
use super::salts::SaltLedger;
use super::storage::{SegmentFile, Storage};
use super::{DiskConfig, DiskCounters, DiskError, DiskStore, Location, SegmentState, State};
use crate::store::record::{self, decode_header};
use crate::store::seal::Sealer;

impl<S: Storage> DiskStore<S> {
    /// Open the store: load the checkpoint, scan every segment forward from where the
    /// checkpoint left it, truncate a torn tail.
    pub fn open(storage: S, config: DiskConfig) -> Result<DiskStore<S>, DiskError> {
        let started = Instant::now();
        let mut state = State {
            index: HashMap::new(),
            pins: HashMap::new(),
            segments: HashMap::new(),
            active: None,
            next_id: 0,
            used_bytes: 0,
            salts: SaltLedger::default(),
            tick: 0,
            dirty: false,
            last_sync: Instant::now(),
        };
        let counters = DiskCounters::default();
        let checkpoint = match storage.read_checkpoint()? {
            Some(bytes) => match checkpoint::decode(&bytes) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(
                        "ignoring L2 checkpoint ({e}); rebuilding the index by scanning"
                    );
                    Checkpoint::default()
                }
            },
            None => Checkpoint::default(),
        };
        let ids = storage.segments()?;
        let last = ids.last().copied();
        // Each segment's checkpointed entries, grouped in one pass (not one pass per segment).
        let mut checkpointed: HashMap<u32, Vec<(ObjectKey, Location)>> = HashMap::new();
        for (key, loc) in checkpoint.entries {
            checkpointed
                .entry(loc.segment)
                .or_default()
                .push((key, loc));
        }
        for &id in &ids {
            let file = Arc::new(storage.open(id)?);
            let file_len = file.len();
            let mut keys = HashSet::new();
            let mut at = 0;
            // Trust the checkpoint's entries for this segment if the file still covers them.
            if let Some(&scanned) = checkpoint.scanned.get(&id) {
                if scanned <= file_len {
                    for (key, loc) in checkpointed.remove(&id).unwrap_or_default() {
                        keys.insert(key.clone());
                        state.insert(&key, loc);
                    }
                    at = scanned;
                }
            }
            // Replay forward.
            while at < file_len {
                let head = file.read(at, record::FIXED as u64 + record::MAX_KEY as u64 + 4)?;
                match decode_header(&head, at) {
                    Ok(h) if at + h.record_len() <= file_len => {
                        let loc = Location {
                            segment: id,
                            offset: at,
                            record_len: h.record_len(),
                            raw_len: h.raw_len,
                        };
                        // This segment is not in `state.segments` yet: its keys are `keys`.
                        state.insert(&h.key, loc);
                        keys.insert(h.key);
                        at += loc.record_len;
                    }
                    result => {
                        let why = result.err().map_or_else(
                            || "record runs past the end".to_string(),
                            |e| e.to_string(),
                        );
                        if Some(id) == last {
                            tracing::warn!(
                                segment = id,
                                offset = at,
                                dropped = file_len - at,
                                "L2: truncating torn tail ({why})"
                            );
                            file.truncate(at)?;
                        } else {
                            tracing::error!(segment = id, offset = at, "L2: unreadable record in a sealed segment, ignoring the rest of it ({why})");
                            counters.corrupt_records.fetch_add(1, Relaxed);
                        }
                        break;
                    }
                }
            }
            state.segments.insert(
                id,
                SegmentState {
                    file,
                    keys,
                    last_access: 0,
                },
            );
        }
        state.dirty = false;
        state.next_id = last.map_or(0, |l| l + 1);
        state.active = last;
        let store = DiskStore {
            storage,
            config,
            sealer: Sealer::default(),
            state: Mutex::new(state),
            writer: Mutex::new(()),
            counters,
            last_checkpoint: Mutex::new(Instant::now()),
            quotas: Arc::default(),
        };
        let stats = store.occupancy();
        tracing::info!(
            records = stats.records,
            segments = stats.segments,
            bytes = stats.used_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "L2 opened"
        );
        Ok(store)
    }
}
