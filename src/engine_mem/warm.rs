//! The gate between an engine cache's warm-up and the copies that write its memory.
//!
//! Warming up maps a newly registered cache into cwm (`EngineMemory::warm_up`) so copies take
//! no page faults. Measured with `cwm bench --realistic`, 512 MiB requests right after
//! registration (2-core machine, 2026-12-02):
//! - A retrieve writes engine memory, and a write fault maps one page: with no warm-up the
//!   first retrieve took 107–123 ms instead of 41–49. So a retrieve waits here for a running
//!   warm-up.
//! - A store only reads engine memory, and a read fault maps 16 pages (the kernel's
//!   fault-around): with no warm-up the first store took 49–64 ms; waiting here, 65–99 ms;
//!   beside a warm-up at nice 19, 75–163 ms. So a store does not wait, and the warm-up runs
//!   on one thread of its own, at normal priority, off the copy pool (first store 59–86 ms,
//!   first retrieve 41–49 ms).

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

/// Whether a warm-up is running.
#[derive(Default)]
pub struct WarmGate {
    warming: Mutex<bool>,
    done: Condvar,
}

impl WarmGate {
    /// Mark a warm-up running until the guard drops (when it finished, failed, panicked or
    /// never ran).
    pub fn begin(self: &Arc<Self>) -> Warming {
        *self.warming.lock() = true;
        Warming(self.clone())
    }

    /// Return once no warm-up is running.
    pub fn wait(&self) {
        let mut warming = self.warming.lock();
        while *warming {
            self.done.wait(&mut warming);
        }
    }
}

/// A running warm-up; dropping it opens the gate.
pub struct Warming(Arc<WarmGate>);

impl Drop for Warming {
    fn drop(&mut self) {
        *self.0.warming.lock() = false;
        self.0.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::test_support::within;

    /// Far beyond what these take; reached only by a gate that never opens.
    const LIMIT: Duration = Duration::from_secs(60);

    #[test]
    fn waits_for_a_running_warm_up_and_only_then() {
        within(LIMIT, "the warm gate", || {
            let gate = Arc::new(WarmGate::default());
            gate.wait(); // none running: returns at once
            let warming = gate.begin();
            let finished = Arc::new(AtomicBool::new(false));
            let waiter = {
                let (gate, finished) = (gate.clone(), finished.clone());
                std::thread::spawn(move || {
                    gate.wait();
                    finished.load(Ordering::SeqCst)
                })
            };
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                !waiter.is_finished(),
                "a transfer went ahead of the warm-up"
            );
            finished.store(true, Ordering::SeqCst);
            drop(warming);
            assert!(waiter.join().unwrap(), "released before the warm-up ended");
            gate.wait();
        });
    }

    #[test]
    fn a_warm_up_that_never_runs_opens_the_gate() {
        within(LIMIT, "the warm gate", || {
            let gate = Arc::new(WarmGate::default());
            drop(gate.begin());
            gate.wait();
        });
    }
}
