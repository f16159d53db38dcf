//! The tiers together: L1 in memory, optionally L2 on disk and L3 in Redis behind it.
//!
//! Policy owned here: every object committed to L1 by a store is queued for L2 (write-behind)
//! without ever delaying the store's reply — the queue is bounded in bytes and drops work,
//! counted and logged, rather than block; compression runs on the bulk (rayon) pool; L2 hits
//! are promoted into L1 before anyone may read them; the index is checkpointed periodically
//! and at shutdown. L3 gets the same committed objects through its own queue (`l3`), and a
//! lookup's chunks missing from L1 and L2 are looked for there in one batch.

use std::collections::HashSet;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use connector_protocol::ObjectKey;
use parking_lot::Mutex;
use rayon::prelude::*;
use std::sync::atomic::Ordering::Relaxed;

use super::codec::{self, CompressionPolicy};
use super::disk::storage::FsStorage;
use super::disk::DiskStore;
use super::l3::L3;
pub use super::write_queue::WriteBehindCounters;
use super::write_queue::{recv_batch, Job, WriteQueue};
use super::{L1Store, Reservation};

pub type Disk = DiskStore<FsStorage>;

pub struct Tiers {
    pub l1: Arc<L1Store>,
    pub l2: Option<Arc<Disk>>,
    /// The shared Redis tier behind L1 and L2.
    pub l3: Option<Arc<L3>>,
    pub write_behind: Arc<WriteBehindCounters>,
    queue: Option<WriteQueue>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Tiers {
    pub fn memory_only(l1: Arc<L1Store>) -> Tiers {
        Tiers {
            l1,
            l2: None,
            l3: None,
            write_behind: Arc::default(),
            queue: None,
            worker: Mutex::new(None),
        }
    }

    /// L1 with L2 behind it; starts the write-behind worker.
    pub fn with_disk(
        l1: Arc<L1Store>,
        l2: Arc<Disk>,
        compression: CompressionPolicy,
        queue_limit: u64,
    ) -> Tiers {
        let (queue, rx) = WriteQueue::new("l2", queue_limit);
        let worker = {
            let (l1, l2, counters) = (l1.clone(), l2.clone(), queue.counters.clone());
            std::thread::Builder::new()
                .name("cwm-write-behind".into())
                .spawn(move || write_behind(rx, l1, l2, counters, compression))
                .expect("spawn write-behind thread")
        };
        Tiers {
            l1,
            l2: Some(l2),
            l3: None,
            write_behind: queue.counters.clone(),
            queue: Some(queue),
            worker: Mutex::new(Some(worker)),
        }
    }

    /// Put the Redis tier behind the others.
    pub fn with_l3(mut self, l3: Arc<L3>) -> Tiers {
        self.l3 = Some(l3);
        self
    }

    /// Queue freshly committed L1 objects for L2 and L3. Never blocks.
    pub fn committed(
        &self,
        keys: impl IntoIterator<Item = ObjectKey>,
        object_bytes: u64,
        itemsize: u8,
    ) {
        match (&self.queue, &self.l3) {
            (Some(q), Some(l3)) => {
                let keys: Vec<ObjectKey> = keys.into_iter().collect();
                l3.committed(keys.iter().cloned(), object_bytes, itemsize);
                q.push(keys, object_bytes, itemsize);
            }
            (Some(q), None) => q.push(keys, object_bytes, itemsize),
            (None, Some(l3)) => l3.committed(keys, object_bytes, itemsize),
            (None, None) => {}
        }
    }

    /// Whether every rank's object of a chunk is in L1 or L2.
    pub fn available(&self, key: &ObjectKey) -> bool {
        self.l1.contains(key) || self.l2.as_ref().is_some_and(|d| d.contains(key))
    }

    /// Make `key` resident in L1, reading it from L2 if needed. False if it is in neither,
    /// L1 has no room, or the L2 record failed verification.
    pub fn promote(&self, key: &ObjectKey) -> bool {
        if self.l1.contains(key) {
            return true;
        }
        let Some(l2) = &self.l2 else { return false };
        let Some(len) = l2.raw_len(key) else {
            return false;
        };
        match self.l1.reserve(key, len) {
            Reservation::Present => true,
            Reservation::NoSpace => false,
            Reservation::Reserved(mut w) => match l2.read(key, w.as_mut_slice()) {
                Ok(()) => {
                    w.commit();
                    true
                }
                Err(_) => false,
            },
        }
    }

    /// Make the leading chunks of a lookup resident in L1 (each chunk: one key per rank). The
    /// first `local` chunks are known to be in L1 or L2; past them, the keys in neither are
    /// checked in L3 in one batch, and the prefix found there is fetched. L2 hits are promoted
    /// in parallel. Returns the length of the prefix now found in some tier (`lock_prefix`
    /// then counts what is actually resident).
    pub fn promote_prefix(&self, chunks: &[Vec<ObjectKey>], local: usize) -> usize {
        let mut end = local;
        let mut from_l3 = HashSet::new();
        if let Some(l3) = self.l3.as_ref().filter(|_| local < chunks.len()) {
            let tail = &chunks[local..];
            let remote: Vec<ObjectKey> = tail
                .iter()
                .flatten()
                .filter(|k| !self.available(k))
                .cloned()
                .collect();
            let found = l3.existing(&remote);
            let n = tail
                .iter()
                .take_while(|keys| keys.iter().all(|k| found.contains(k) || self.available(k)))
                .count();
            let wanted: Vec<ObjectKey> = tail[..n]
                .iter()
                .flatten()
                .filter(|k| found.contains(*k))
                .cloned()
                .collect();
            from_l3 = l3.promote(&self.l1, &wanted);
            end += n;
        }
        chunks[..end]
            .par_iter()
            .flatten()
            .filter(|k| !from_l3.contains(*k))
            .for_each(|k| {
                self.promote(k);
            });
        end
    }

    /// Stop the write-behind workers after they drained their queues, and checkpoint L2.
    pub fn shutdown(&self) {
        if let Some(q) = &self.queue {
            q.close();
        }
        if let Some(w) = self.worker.lock().take() {
            let _ = w.join();
        }
        if let Some(l3) = &self.l3 {
            l3.shutdown();
        }
        if let Some(l2) = &self.l2 {
            if let Err(e) = l2.checkpoint() {
                tracing::error!("L2 checkpoint at shutdown failed: {e}");
            }
        }
    }
}
impl Drop for Tiers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

const BATCH: usize = 8;
const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

fn write_behind(
    rx: mpsc::Receiver<Job>,
    l1: Arc<L1Store>,
    l2: Arc<Disk>,
    c: Arc<WriteBehindCounters>,
    compression: CompressionPolicy,
) {
    let mut last_checkpoint = Instant::now();
    while let Some(batch) = recv_batch(&rx, BATCH, Duration::from_millis(200)) {
        if !batch.is_empty() {
            write_batch(&batch, &l1, &l2, &c, compression);
        }
        if l2.sync_due() {
            if let Err(e) = l2.sync() {
                tracing::error!("L2 fsync failed: {e}");
            }
        }
        if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            last_checkpoint = Instant::now();
            if let Err(e) = l2.checkpoint() {
                tracing::error!("L2 checkpoint failed: {e}");
            }
        }
    }
}

fn write_batch(
    batch: &[Job],
    l1: &Arc<L1Store>,
    l2: &Disk,
    c: &WriteBehindCounters,
    compression: CompressionPolicy,
) {
    let compressed: Vec<_> = batch
        .par_iter()
        .map(|job| {
            if l2.contains(&job.key) {
                return None;
            }
            let Some(object) = l1.read(&job.key) else {
                c.missed.fetch_add(1, Relaxed);
                return None;
            };
            let raw = object.as_slice();
            let (codec, payload) = codec::compress(raw, job.itemsize as usize, compression);
            Some((codec, payload, raw.len() as u64))
        })
        .collect();
    for (job, result) in batch.iter().zip(compressed) {
        c.queued_bytes.fetch_sub(job.bytes, Relaxed);
        let Some((codec, payload, raw_len)) = result else {
            continue;
        };
        match l2.write_compressed(&job.key, codec, job.itemsize, raw_len, &payload) {
            Ok(()) => {
                c.written.fetch_add(1, Relaxed);
            }
            Err(e) => {
                c.failed.fetch_add(1, Relaxed);
                tracing::error!(key = ?job.key, "L2 write failed: {e}");
            }
        }
    }
}
