//! Background work: threads that must never take a core from a store or a retrieve.
//!
//! L2 compression, write-behind and checkpoints run here, at the lowest CPU priority (nice 19
//! per thread), on a small pool of bounded size. The foreground (request threads and the
//! global rayon pool that runs store/retrieve copies and prefetch) keeps its normal priority,
//! so under load the scheduler gives background threads only what the foreground leaves idle.
//!
//! Priority alone is not enough on a small machine: a nice-19 thread that is on a core when an
//! engine thread wakes still runs out its slice, and its memory traffic slows the engine's
//! forward pass on the other core (measured: BENCHMARKS.md, "The disk tier's TTFT tail"). So
//! work that can wait also *yields*: every engine op marks the foreground busy while it runs
//! ([`foreground_op`]), and [`yield_to_foreground`] waits until no op has run for [`QUIET`],
//! up to a deadline the caller sets, so a request's whole life (its ops and the forward pass
//! between them) runs without background work beside it, and a continuously busy engine still
//! gets its write-behind done, late rather than never.
//! Not here: committing L1 and engine memory ahead of use (`store::populate`,
//! `engine_mem::warm`), which the foreground waits for, so at nice 19 it would be a priority
//! inversion.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most threads the background pool runs at once.
const MAX_THREADS: usize = 2;

/// How long after an engine's last op background work may start. The gaps inside one request
/// (a client's poll, the scheduler step, the forward pass before `end_session`) are shorter on
/// the engines measured; the gap between requests of a waiting user is longer.
pub const QUIET: Duration = Duration::from_millis(50);

/// Engine ops running now, and when the last one began or ended: what background work yields
/// to. One per process ([`foreground_op`], [`yield_to_foreground`]); tests make their own.
pub struct Foreground {
    in_flight: AtomicUsize,
    /// When the last op began or ended: ns since `epoch`, plus one (0: no op yet).
    last_op: AtomicU64,
    epoch: OnceLock<Instant>,
}

static FOREGROUND: Foreground = Foreground::new();

impl Foreground {
    pub const fn new() -> Foreground {
        Foreground {
            in_flight: AtomicUsize::new(0),
            last_op: AtomicU64::new(0),
            epoch: OnceLock::new(),
        }
    }

    fn now(&self) -> Duration {
        self.epoch.get_or_init(Instant::now).elapsed()
    }

    fn stamp(&self) {
        self.last_op
            .fetch_max(self.now().as_nanos() as u64 + 1, Relaxed);
    }

    /// Mark an op in progress until the returned value is dropped.
    pub fn op(&self) -> ForegroundOp<'_> {
        self.in_flight.fetch_add(1, Relaxed);
        self.stamp();
        ForegroundOp(self)
    }

    /// How long background work should wait before looking again: zero when no op is in
    /// flight and none ran within [`QUIET`].
    pub fn wait_needed(&self) -> Duration {
        if self.in_flight.load(Relaxed) > 0 {
            return QUIET / 10;
        }
        match self.last_op.load(Relaxed) {
            0 => Duration::ZERO,
            last => {
                let since = self.now().saturating_sub(Duration::from_nanos(last - 1));
                QUIET.saturating_sub(since)
            }
        }
    }

    /// Wait until `wait_needed` is zero or until `deadline`, whichever comes first. Returns
    /// how long it waited.
    pub fn yield_until_quiet(&self, deadline: Instant) -> Duration {
        let started = Instant::now();
        loop {
            let nap = self.wait_needed();
            let now = Instant::now();
            if nap.is_zero() || now >= deadline {
                return started.elapsed();
            }
            std::thread::sleep(nap.min(deadline - now));
        }
    }
}

impl Default for Foreground {
    fn default() -> Foreground {
        Foreground::new()
    }
}

/// An op in progress (see [`Foreground::op`]).
pub struct ForegroundOp<'a>(&'a Foreground);

impl Drop for ForegroundOp<'_> {
    fn drop(&mut self) {
        self.0.stamp();
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Mark an engine op (an MP or `lm://` request being handled) in progress until the returned
/// value is dropped: background work that yields waits while one runs and for [`QUIET`] after.
pub fn foreground_op() -> ForegroundOp<'static> {
    FOREGROUND.op()
}

/// Whether no engine op is in flight and none has run for [`QUIET`] (never waits).
pub fn foreground_quiet() -> bool {
    FOREGROUND.wait_needed().is_zero()
}

/// Wait until no engine op is in flight and none has run for [`QUIET`], or until `deadline`,
/// whichever comes first. Returns how long it waited (zero when the engines were quiet).
pub fn yield_to_foreground(deadline: Instant) -> Duration {
    FOREGROUND.yield_until_quiet(deadline)
}

/// Lower the calling thread to the lowest normal priority (nice 19). Best effort: a failure is
/// logged once and the thread runs on at its current priority.
pub fn lower_current_thread() {
    // SAFETY: plain syscalls on the calling thread; `setpriority` with a thread id affects
    // only that thread on Linux.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19)
    };
    if rc != 0 {
        static ONCE: OnceLock<()> = OnceLock::new();
        ONCE.get_or_init(|| {
            tracing::warn!(
                "cannot lower a background thread's priority: {}",
                std::io::Error::last_os_error()
            )
        });
    }
}

/// The nice value of the calling thread.
pub fn current_thread_nice() -> i32 {
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t)
    }
}

/// Run `f` on a new named thread at background priority.
pub fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            lower_current_thread();
            f()
        })
        .expect("spawn a background thread")
}

/// The background rayon pool (at most `MAX_THREADS`, at most half the cores, at least one).
pub fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads((cores / 2).clamp(1, MAX_THREADS))
            .thread_name(|i| format!("cwm-bg-{i}"))
            .start_handler(|_| lower_current_thread())
            .build()
            .expect("build the background pool")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_threads_run_at_nice_19_and_the_caller_is_untouched() {
        let before = current_thread_nice();
        assert_eq!(spawn("t-bg", current_thread_nice).join().unwrap(), 19);
        assert_eq!(pool().install(current_thread_nice), 19);
        assert_eq!(current_thread_nice(), before);
        assert!(pool().current_num_threads() <= MAX_THREADS);
    }

    #[test]
    fn background_work_waits_for_a_quiet_foreground_up_to_its_deadline() {
        let fg = Foreground::new();
        assert_eq!(fg.wait_needed(), Duration::ZERO, "nothing ran yet");
        // An op in flight holds background work back until the deadline.
        let op = fg.op();
        assert!(fg.wait_needed() > Duration::ZERO);
        let waited = fg.yield_until_quiet(Instant::now() + Duration::from_millis(120));
        assert!(
            waited >= Duration::from_millis(120),
            "waited {waited:?} beside a running op"
        );
        assert!(
            waited < Duration::from_secs(5),
            "waited {waited:?}: deadline ignored"
        );
        // After the op ends, background work waits out the quiet period, then goes.
        drop(op);
        let need = fg.wait_needed();
        assert!(
            need > Duration::ZERO && need <= QUIET,
            "{need:?} after the op"
        );
        let waited = fg.yield_until_quiet(Instant::now() + Duration::from_secs(30));
        assert!(waited >= need, "waited {waited:?}, needed {need:?}");
        assert_eq!(fg.wait_needed(), Duration::ZERO, "quiet again");
    }
}
