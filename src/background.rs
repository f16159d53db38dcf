//! Background work: threads that must never take a core from a store or a retrieve.
//!
//! L2 compression, write-behind and checkpoints run here, at the lowest CPU priority (nice 19
//! per thread), on a small pool of bounded size. The foreground (request threads and the
//! global rayon pool that runs store/retrieve copies and prefetch) keeps its normal priority,
//! so under load the scheduler gives background threads only what the foreground leaves idle.
//! Not here: committing L1 and engine memory ahead of use (`store::populate`,
//! `engine_mem::warm`), which the foreground waits for, so at nice 19 it would be a priority
//! inversion.

use std::sync::OnceLock;
use std::thread::JoinHandle;

/// Most threads the background pool runs at once.
const MAX_THREADS: usize = 2;

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
}
