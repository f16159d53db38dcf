//! Write-behind: the one queue that feeds every tier behind L1. Stores queue what they
//! committed (never blocking: the queue is bounded in bytes and drops work, counted and
//! logged); a worker on the background pool (`crate::background`: nice 19) drains it in
//! batches, encodes each object once and hands each tier the batch's records in one `put`.
//! A tier out of space stalls it (writes held, retried with backoff); a `clear` cancels what
//! is queued.
//!
//! It yields to the engines (`background::yield_to_foreground`): before it reads an object out
//! of L1 and before each tier's `put` it waits until no engine op has run for
//! `background::QUIET`, at most until `MAX_DEFER` after the object was queued, so a warm
//! request never runs beside it while a continuously busy engine still gets its writes done.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use connector_protocol::ObjectKey;
use parking_lot::{Mutex, MutexGuard};
use rayon::prelude::*;

use super::stats::WriteBehindStats;
use crate::background;
use crate::log_every::LogEvery;
use crate::store::codec::CompressionPolicy;
use crate::store::seal::Sealer;
use crate::store::tier::{Presence, Tier, TierError};
use crate::store::L1Store;

#[derive(Debug, Default)]
struct Counters {
    queued_bytes: AtomicU64,
    enqueued: AtomicU64,
    dropped: AtomicU64,
    written: AtomicU64,
    /// Evicted from L1 before it could be written.
    missed: AtomicU64,
    failed: AtomicU64,
    /// Times a tier behind L1 ran out of space (one per incident, however many writes wait).
    stalls: AtomicU64,
    /// Objects waiting for a tier to have space again (now).
    held: AtomicU64,
    /// Objects written after waiting for space.
    retried: AtomicU64,
    /// Times it waited for the engines to be quiet, and for how long in all (µs).
    yields: AtomicU64,
    yielded_us: AtomicU64,
    /// Times it stopped waiting because an object had waited `MAX_DEFER`.
    deferred_max: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> WriteBehindStats {
        WriteBehindStats {
            queued_bytes: self.queued_bytes.load(Relaxed),
            enqueued: self.enqueued.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            written: self.written.load(Relaxed),
            missed: self.missed.load(Relaxed),
            failed: self.failed.load(Relaxed),
            stalls: self.stalls.load(Relaxed),
            held: self.held.load(Relaxed),
            retried: self.retried.load(Relaxed),
            yields: self.yields.load(Relaxed),
            yielded_ms: self.yielded_us.load(Relaxed) / 1000,
            deferred_max: self.deferred_max.load(Relaxed),
        }
    }
}

struct Job {
    key: ObjectKey,
    bytes: u64,
    /// When it was queued: it yields to the engines until `MAX_DEFER` after this.
    queued_at: Instant,
    /// The clear generation it was queued in: a `clear` since cancels it.
    generation: u64,
    /// The tiers behind L1 (bit i: `lower[i]`) still to write it to.
    pending: u32,
    /// Whether it waited for space already.
    held: bool,
    /// Whether some tier refused it for good.
    failed: bool,
}

/// What `clear` shares with write-behind: the generation stamped on every queued job (a job
/// of an older generation was cancelled by a clear), and the fence that keeps a write to the
/// tiers behind and a clear apart, so nothing written before a clear survives it.
#[derive(Default)]
struct Generation {
    current: AtomicU64,
    fence: Mutex<()>,
}

/// The queue's sending side, its worker, and what `clear` and `stats` ask of them.
pub(super) struct WriteBehindQueue {
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    limit: u64,
    counters: Arc<Counters>,
    generation: Arc<Generation>,
    worker: Mutex<Option<JoinHandle<()>>>,
    drops_logged: LogEvery,
}

impl WriteBehindQueue {
    /// A queue of at most `limit` bytes feeding `lower` from `l1`, its worker started when
    /// some tier is behind L1.
    pub(super) fn start(
        l1: &Arc<L1Store>,
        lower: &[Arc<dyn Tier>],
        compression: CompressionPolicy,
        sealer: Sealer,
        limit: u64,
    ) -> WriteBehindQueue {
        assert!(lower.len() <= 32, "a job's pending tiers are bits of a u32");
        let counters: Arc<Counters> = Arc::default();
        let generation: Arc<Generation> = Arc::default();
        let (queue, worker) = if lower.is_empty() {
            (None, None)
        } else {
            let (tx, rx) = mpsc::channel();
            let worker = WriteBehind {
                l1: l1.clone(),
                lower: lower.to_vec(),
                counters: counters.clone(),
                generation: generation.clone(),
                compression,
                sealer,
            };
            let worker = background::spawn("cwm-write-behind", move || worker.run(rx));
            (Some(tx), Some(worker))
        };
        WriteBehindQueue {
            queue: Mutex::new(queue),
            limit,
            counters,
            generation,
            worker: Mutex::new(worker),
            drops_logged: LogEvery::new(),
        }
    }

    pub(super) fn stats(&self) -> WriteBehindStats {
        self.counters.snapshot()
    }

    /// Cancel everything queued: returns the fence, held until the caller's clear is done, so
    /// no write to the tiers behind runs meanwhile.
    pub(super) fn cancel(&self) -> MutexGuard<'_, ()> {
        let fence = self.generation.fence.lock();
        self.generation.current.fetch_add(1, Relaxed);
        fence
    }

    /// Stop the worker after it drained the queue.
    pub(super) fn stop(&self) {
        self.queue.lock().take();
        if let Some(w) = self.worker.lock().take() {
            let _ = w.join();
        }
    }

    /// Queue freshly committed L1 objects for the tiers behind. Never blocks.
    pub(super) fn enqueue(&self, committed: Vec<(ObjectKey, u64)>) {
        let queue = self.queue.lock();
        let Some(tx) = queue.as_ref() else { return };
        let c = &self.counters;
        let generation = self.generation.current.load(Relaxed);
        for (key, object_bytes) in committed {
            if c.queued_bytes.load(Relaxed) + object_bytes > self.limit {
                c.dropped.fetch_add(1, Relaxed);
                if self.drops_logged.due() {
                    tracing::warn!(
                        queued_bytes = c.queued_bytes.load(Relaxed),
                        limit = self.limit,
                        dropped_total = c.dropped.load(Relaxed),
                        "write-behind queue full: dropping writes (the tiers behind L1 are \
                         slower than stores)"
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
                    queued_at: Instant::now(),
                    generation,
                    pending: u32::MAX,
                    held: false,
                    failed: false,
                })
                .is_err()
            {
                c.queued_bytes.fetch_sub(object_bytes, Relaxed);
            }
        }
    }
}

const BATCH: usize = 8;
/// The longest write-behind defers an object's write for busy engines; then it writes anyway.
const MAX_DEFER: Duration = Duration::from_secs(2);
/// How long the worker waits for work before it runs the tiers' housekeeping anyway.
const IDLE: Duration = Duration::from_millis(200);
/// The first wait before retrying a tier that ran out of space; each failed retry doubles it,
/// up to `LAST_RETRY`.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(5);

/// The write-behind worker: drains the queue in batches, encodes each object once (on the
/// background pool) and hands the record to every tier behind L1.
///
/// A tier that refuses a write for lack of space (`TierError::out_of_space`) starts a stall:
/// the write is held (its key only: the object stays in L1 and is read again for the retry),
/// everything queued behind it waits too, and one write is retried with backoff until the tier
/// takes it; then the held writes go out in order. Held writes still count in the queue's byte
/// limit, so a long stall drops new work (counted) rather than growing memory; a held write
/// whose object L1 evicted, or that a clear cancelled, is forgotten (evictions count as missed).
struct WriteBehind {
    l1: Arc<L1Store>,
    lower: Vec<Arc<dyn Tier>>,
    counters: Arc<Counters>,
    generation: Arc<Generation>,
    compression: CompressionPolicy,
    sealer: Sealer,
}

/// A tier behind L1 is out of space: since when, and when to try again.
struct Stall {
    since: Instant,
    wait: Duration,
    next_try: Instant,
}

impl Stall {
    fn new() -> Stall {
        let now = Instant::now();
        Stall {
            since: now,
            wait: FIRST_RETRY,
            next_try: now + FIRST_RETRY,
        }
    }

    fn back_off(&mut self) {
        self.wait = (self.wait * 2).min(LAST_RETRY);
        self.next_try = Instant::now() + self.wait;
    }
}

/// What one `write_batch` did.
#[derive(Default)]
struct BatchOutcome {
    /// Jobs some tier refused for lack of space, still pending for those tiers, in order.
    held: Vec<Job>,
    /// The first out-of-space error, for the stall's one log line.
    out_of_space: Option<TierError>,
    /// Jobs every tier took.
    written: usize,
}

impl WriteBehind {
    fn run(self, rx: mpsc::Receiver<Job>) {
        // Received and not yet written, oldest first (each still counted in `queued_bytes`).
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut stall: Option<Stall> = None;
        let mut maintained = Instant::now();
        loop {
            let idle = match &stall {
                Some(s) => s
                    .next_try
                    .saturating_duration_since(Instant::now())
                    .min(IDLE),
                None if !waiting.is_empty() => Duration::ZERO,
                None => IDLE,
            };
            match rx.recv_timeout(idle) {
                Ok(job) => waiting.push_back(job),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            // A batch's worth; while stalled, everything queued (keys only, bounded by bytes).
            while stall.is_some() || waiting.len() < BATCH {
                match rx.try_recv() {
                    Ok(job) => waiting.push_back(job),
                    Err(_) => break,
                }
            }
            self.step(&mut waiting, &mut stall);
            let held = if stall.is_some() {
                // Everything waiting now waits for space (counted `retried` once written),
                // whether it was tried before the stall began or queued during it.
                waiting.iter_mut().for_each(|job| job.held = true);
                waiting.len()
            } else {
                0
            };
            self.counters.held.store(held as u64, Relaxed);
            // Housekeeping (L2's interval fsync, its checkpoint) yields to the engines too.
            if background::foreground_quiet() || maintained.elapsed() >= MAX_DEFER {
                maintained = Instant::now();
                for tier in &self.lower {
                    tier.maintain();
                }
            }
        }
        self.finish(waiting);
    }

    /// Write the oldest waiting jobs: a batch; while stalled, once the wait is over, one job as
    /// a probe, after forgetting the jobs whose objects are gone.
    fn step(&self, waiting: &mut VecDeque<Job>, stall: &mut Option<Stall>) {
        let n = match stall {
            None => BATCH,
            Some(s) if Instant::now() >= s.next_try => {
                self.forget_gone(waiting);
                1
            }
            Some(_) => return,
        };
        let batch: Vec<Job> = waiting.drain(..n.min(waiting.len())).collect();
        let outcome = if batch.is_empty() {
            BatchOutcome::default()
        } else {
            self.write_batch(batch)
        };
        if let Some(e) = outcome.out_of_space {
            for job in outcome.held.into_iter().rev() {
                waiting.push_front(job);
            }
            match stall {
                Some(s) => s.back_off(),
                None => {
                    self.counters.stalls.fetch_add(1, Relaxed);
                    tracing::warn!(
                        waiting = waiting.len(),
                        "write-behind: {e}; holding writes for the tiers behind L1 and \
                         retrying every {FIRST_RETRY:?} to {LAST_RETRY:?} until there is space \
                         (the objects stay in L1; what L1 evicts meanwhile is not written)"
                    );
                    *stall = Some(Stall::new());
                }
            }
        } else if let Some(s) = stall {
            // A probe that found its object gone taught nothing: the next one goes at once.
            if outcome.written > 0 || waiting.is_empty() {
                tracing::info!(
                    stalled_ms = s.since.elapsed().as_millis() as u64,
                    waiting = waiting.len(),
                    "write-behind: the tiers behind L1 take writes again; writing the held ones"
                );
                *stall = None;
            }
        }
    }

    /// Drop waiting jobs a clear cancelled or whose object L1 evicted (counted as missed),
    /// releasing their queue bytes.
    fn forget_gone(&self, waiting: &mut VecDeque<Job>) {
        let c = &self.counters;
        let generation = self.generation.current.load(Relaxed);
        waiting.retain(|job| {
            let cancelled = job.generation != generation;
            let keep = !cancelled && self.l1.contains(&job.key);
            if !keep {
                c.queued_bytes.fetch_sub(job.bytes, Relaxed);
                if !cancelled {
                    c.missed.fetch_add(1, Relaxed);
                }
            }
            keep
        });
    }

    /// At shutdown: write what still waits. If a tier is out of space, what it refused and
    /// everything behind it is given up (counted as failed, one log line): those objects were
    /// in L1 only.
    fn finish(&self, mut waiting: VecDeque<Job>) {
        let c = &self.counters;
        while !waiting.is_empty() {
            let batch = waiting.drain(..BATCH.min(waiting.len())).collect();
            let outcome = self.write_batch(batch);
            if let Some(e) = outcome.out_of_space {
                let lost: Vec<Job> = outcome.held.into_iter().chain(waiting.drain(..)).collect();
                for job in &lost {
                    c.queued_bytes.fetch_sub(job.bytes, Relaxed);
                }
                c.failed.fetch_add(lost.len() as u64, Relaxed);
                tracing::error!(
                    objects = lost.len(),
                    "write-behind stopped with objects not written to the tiers behind L1: {e}"
                );
                break;
            }
        }
        c.held.store(0, Relaxed);
    }

    /// Wait for the engines to be quiet, at most until `MAX_DEFER` after `queued_at`
    /// (counted).
    fn yield_to_engines(&self, queued_at: Instant) {
        let deadline = queued_at + MAX_DEFER;
        let waited = background::yield_to_foreground(deadline);
        if !waited.is_zero() {
            let c = &self.counters;
            c.yields.fetch_add(1, Relaxed);
            c.yielded_us.fetch_add(waited.as_micros() as u64, Relaxed);
            if Instant::now() >= deadline {
                c.deferred_max.fetch_add(1, Relaxed);
            }
        }
    }

    /// The tiers of `pending` (a job's), with their bits.
    fn pending(&self, pending: u32) -> impl Iterator<Item = (u32, &Arc<dyn Tier>)> {
        self.lower
            .iter()
            .enumerate()
            .map(|(i, t)| (1u32 << i, t))
            .filter(move |(bit, _)| pending & bit != 0)
    }

    fn write_batch(&self, batch: Vec<Job>) -> BatchOutcome {
        // The whole batch runs under the clear fence: a `clear` waits for it, so no object
        // write-behind is still reading (which L1's clear must leave in place) survives it.
        let _fence = self.generation.fence.lock();
        let c = &self.counters;
        let cancelled = |job: &Job| job.generation != self.generation.current.load(Relaxed);
        let started = Instant::now();
        let records: Vec<Option<Vec<u8>>> = background::pool().install(|| {
            batch
                .par_iter()
                .map(|job| {
                    let keys = std::slice::from_ref(&job.key);
                    let held =
                        |t: &Arc<dyn Tier>| matches!(t.may_contain(keys)[0], Presence::Held(_));
                    if cancelled(job) || self.pending(job.pending).all(|(_, t)| held(t)) {
                        return None;
                    }
                    self.yield_to_engines(job.queued_at);
                    let Some(object) = self.l1.read(&job.key) else {
                        c.missed.fetch_add(1, Relaxed);
                        return None;
                    };
                    Some(self.sealer.encode(
                        &job.key,
                        &object.to_vec(),
                        object.itemsize(),
                        self.compression,
                    ))
                })
                .collect()
        });
        let encoded = started.elapsed();
        let mut outcome = BatchOutcome::default();
        let mut written: Vec<(Job, Vec<u8>)> = Vec::with_capacity(batch.len());
        for (job, record) in batch.into_iter().zip(records) {
            match record.filter(|_| !cancelled(&job)) {
                Some(record) => written.push((job, record)),
                None => {
                    c.queued_bytes.fetch_sub(job.bytes, Relaxed);
                }
            }
        }
        // Each tier gets the batch's records it still lacks in one put.
        for (i, tier) in self.lower.iter().enumerate() {
            let bit = 1u32 << i;
            let mine: Vec<usize> = (0..written.len())
                .filter(|&j| written[j].0.pending & bit != 0)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let records: Vec<(&ObjectKey, &[u8])> = mine
                .iter()
                .map(|&j| (&written[j].0.key, written[j].1.as_slice()))
                .collect();
            let oldest = mine.iter().map(|&j| written[j].0.queued_at).min();
            self.yield_to_engines(oldest.expect("mine is not empty"));
            let put_started = Instant::now();
            let results = tier.put(&records);
            trace_put(
                tier.name(),
                &records,
                started,
                encoded,
                put_started.elapsed(),
            );
            for (&j, result) in mine.iter().zip(results) {
                let job = &mut written[j].0;
                match result {
                    Ok(()) => job.pending &= !bit,
                    Err(e) if e.out_of_space() => {
                        outcome.out_of_space.get_or_insert(e);
                    }
                    // Refused to keep its salt within its quota there: that tier counted it.
                    Err(e) if e.over_quota() => {
                        job.pending &= !bit;
                        tracing::debug!(key = ?job.key, "{e}");
                    }
                    Err(e) => {
                        job.pending &= !bit;
                        job.failed = true;
                        tracing::error!(key = ?job.key, "{} write failed: {e}", tier.name());
                    }
                }
            }
        }
        for (mut job, _) in written {
            if self.pending(job.pending).next().is_some() {
                job.held = true;
                outcome.held.push(job);
                continue;
            }
            c.queued_bytes.fetch_sub(job.bytes, Relaxed);
            if job.failed {
                c.failed.fetch_add(1, Relaxed);
            } else {
                c.written.fetch_add(1, Relaxed);
                outcome.written += 1;
                if job.held {
                    c.retried.fetch_add(1, Relaxed);
                }
            }
        }
        outcome
    }
}

/// One tier's `put` of a write-behind batch for `cwm::trace` (`CWM_LOG=info,cwm::trace=debug`):
/// when the batch started, how long encoding it took and how long the tier took, so a slow
/// foreground op can be lined up against the background work running beside it.
fn trace_put(
    tier: &str,
    records: &[(&ObjectKey, &[u8])],
    started: Instant,
    encoded: Duration,
    put: Duration,
) {
    tracing::debug!(
        target: "cwm::trace",
        tier,
        objects = records.len(),
        record_bytes = records.iter().map(|(_, r)| r.len()).sum::<usize>(),
        encode_us = encoded.as_micros() as u64,
        put_us = put.as_micros() as u64,
        total_us = started.elapsed().as_micros() as u64,
        "write-behind batch written"
    );
}
