//! A write-behind queue: objects committed to L1 wait here for a slower tier (L2's disk, L3's
//! Redis). Bounded in bytes, never blocking: when the tier falls behind, work is dropped,
//! counted, and logged at most every 10 s, so a store reply is never delayed by a tier.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use connector_protocol::ObjectKey;
use parking_lot::Mutex;

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

/// One object to write: read back from L1 by the tier's worker.
pub struct Job {
    pub key: ObjectKey,
    pub bytes: u64,
    pub itemsize: u8,
}

pub struct WriteQueue {
    /// Which tier, for the log.
    tier: &'static str,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    limit: u64,
    pub counters: Arc<WriteBehindCounters>,
    last_drop_log: Mutex<Option<Instant>>,
}

impl WriteQueue {
    /// A queue of at most `limit` bytes and the receiving end for the tier's worker.
    pub fn new(tier: &'static str, limit: u64) -> (WriteQueue, mpsc::Receiver<Job>) {
        let (tx, rx) = mpsc::channel();
        let q = WriteQueue {
            tier,
            tx: Mutex::new(Some(tx)),
            limit,
            counters: Arc::default(),
            last_drop_log: Mutex::new(None),
        };
        (q, rx)
    }

    /// Queue freshly committed L1 objects. Never blocks.
    pub fn push(&self, keys: impl IntoIterator<Item = ObjectKey>, object_bytes: u64, itemsize: u8) {
        let tx = self.tx.lock();
        let Some(tx) = tx.as_ref() else { return };
        let c = &self.counters;
        for key in keys {
            if c.queued_bytes.load(Relaxed) + object_bytes > self.limit {
                self.dropped(1);
                continue;
            }
            c.queued_bytes.fetch_add(object_bytes, Relaxed);
            c.enqueued.fetch_add(1, Relaxed);
            let job = Job {
                key,
                bytes: object_bytes,
                itemsize,
            };
            if tx.send(job).is_err() {
                c.queued_bytes.fetch_sub(object_bytes, Relaxed);
            }
        }
    }

    /// Count `n` jobs given up (queue full, or the tier unreachable), logging at most every 10 s.
    pub fn dropped(&self, n: u64) {
        let c = &self.counters;
        c.dropped.fetch_add(n, Relaxed);
        let mut last = self.last_drop_log.lock();
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            *last = Some(Instant::now());
            tracing::warn!(
                tier = self.tier,
                queued_bytes = c.queued_bytes.load(Relaxed),
                limit = self.limit,
                dropped_total = c.dropped.load(Relaxed),
                "write-behind is dropping writes (the tier is slower than stores, or unreachable)"
            );
        }
    }

    /// A job left the queue (written, failed or dropped).
    pub fn done(&self, job: &Job) {
        self.counters.queued_bytes.fetch_sub(job.bytes, Relaxed);
    }

    /// Stop accepting work; the worker drains what is queued and sees the channel close.
    pub fn close(&self) {
        self.tx.lock().take();
    }
}

/// The next batch of at most `max` jobs, waiting up to `wait` for the first; empty on timeout,
/// `None` once the queue is closed and drained.
pub fn recv_batch(rx: &mpsc::Receiver<Job>, max: usize, wait: Duration) -> Option<Vec<Job>> {
    let first = match rx.recv_timeout(wait) {
        Ok(job) => job,
        Err(mpsc::RecvTimeoutError::Timeout) => return Some(Vec::new()),
        Err(mpsc::RecvTimeoutError::Disconnected) => return None,
    };
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    Some(batch)
}
