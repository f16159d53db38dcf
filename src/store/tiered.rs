//! The tiers together: L1 in memory, optionally L2 on disk behind it.
//!
//! Policy owned here: every object committed to L1 by a store is queued for L2 (write-behind)
//! without ever delaying the store's reply — the queue is bounded in bytes and drops work,
//! counted and logged, rather than block; the write-behind thread and compression run at
//! background priority (`crate::background`), never on the foreground pool; L2 hits
//! are promoted into L1 before anyone may read them; the index is checkpointed periodically
//! and at shutdown.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use connector_protocol::ObjectKey;
use parking_lot::Mutex;
use rayon::prelude::*;

use super::codec::{self, CompressionPolicy};
use super::disk::storage::FsStorage;
use super::disk::DiskStore;
use super::{L1Store, Reservation};
use crate::background;

pub type Disk = DiskStore<FsStorage>;

#[derive(Debug, Default)]
pub struct WriteBehindCounters {
    pub queued_bytes: AtomicU64,
    pub enqueued: AtomicU64,
    pub dropped: AtomicU64,
    pub written: AtomicU64,
    /// Evicted from L1 before it could be written.
    pub missed: AtomicU64,
    pub failed: AtomicU64,
}

struct Job {
    key: ObjectKey,
    bytes: u64,
    itemsize: u8,
}

pub struct Tiers {
    pub l1: Arc<L1Store>,
    pub l2: Option<Arc<Disk>>,
    pub write_behind: Arc<WriteBehindCounters>,
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    queue_limit: u64,
    worker: Mutex<Option<JoinHandle<()>>>,
    last_drop_log: Mutex<Option<Instant>>,
}

impl Tiers {
    pub fn memory_only(l1: Arc<L1Store>) -> Tiers {
        Tiers {
            l1,
            l2: None,
            write_behind: Arc::default(),
            queue: Mutex::new(None),
            queue_limit: 0,
            worker: Mutex::new(None),
            last_drop_log: Mutex::new(None),
        }
    }

    /// L1 with L2 behind it; starts the write-behind worker.
    pub fn with_disk(
        l1: Arc<L1Store>,
        l2: Arc<Disk>,
        compression: CompressionPolicy,
        queue_limit: u64,
    ) -> Tiers {
        let (tx, rx) = mpsc::channel();
        let counters: Arc<WriteBehindCounters> = Arc::default();
        let worker = {
            let (l1, l2, counters) = (l1.clone(), l2.clone(), counters.clone());
            background::spawn("cwm-write-behind", move || {
                write_behind(rx, l1, l2, counters, compression)
            })
        };
        Tiers {
            l1,
            l2: Some(l2),
            write_behind: counters,
            queue: Mutex::new(Some(tx)),
            queue_limit,
            worker: Mutex::new(Some(worker)),
            last_drop_log: Mutex::new(None),
        }
    }

    /// Queue freshly committed L1 objects for L2. Never blocks.
    pub fn committed(
        &self,
        keys: impl IntoIterator<Item = ObjectKey>,
        object_bytes: u64,
        itemsize: u8,
    ) {
        let queue = self.queue.lock();
        let Some(tx) = queue.as_ref() else { return };
        let c = &self.write_behind;
        for key in keys {
            if c.queued_bytes.load(Relaxed) + object_bytes > self.queue_limit {
                c.dropped.fetch_add(1, Relaxed);
                let mut last = self.last_drop_log.lock();
                if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    *last = Some(Instant::now());
                    tracing::warn!(
                        queued_bytes = c.queued_bytes.load(Relaxed),
                        limit = self.queue_limit,
                        dropped_total = c.dropped.load(Relaxed),
                        "L2 write-behind queue full: dropping writes (disk slower than stores)"
                    );
                }
                continue;
            }
            c.queued_bytes.fetch_add(object_bytes, Relaxed);
            c.enqueued.fetch_add(1, Relaxed);
            if tx
                .send(Job {
                    key,
                    bytes: object_bytes,
                    itemsize,
                })
                .is_err()
            {
                c.queued_bytes.fetch_sub(object_bytes, Relaxed);
            }
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

    /// Stop the write-behind worker after it drained its queue, and checkpoint L2.
    pub fn shutdown(&self) {
        self.queue.lock().take();
        if let Some(w) = self.worker.lock().take() {
            let _ = w.join();
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
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(job) => Some(job),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut batch: Vec<Job> = first.into_iter().collect();
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
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
    let compressed: Vec<_> = background::pool().install(|| {
        batch
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
            .collect()
    });
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
