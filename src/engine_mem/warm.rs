//! The gate between an engine cache's warm-up and its transfers.
//!
//! Warming up maps a newly registered cache into cwm (`EngineMemory::warm_up`) so copies take
//! no page faults. A transfer that arrives while it runs waits for it instead of faulting the
//! same pages alongside it: the two racing for the pages made the first 512 MiB store of a
//! fresh registration 75–163 ms where it takes 45–50 ms once the warm-up (30–40 ms for
//! 514 MiB on one thread) is done (`cwm bench --realistic`, 2-core machine, 2026-12-02).

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

    #[test]
    fn waits_for_a_running_warm_up_and_only_then() {
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
    }

    #[test]
    fn a_warm_up_that_never_runs_opens_the_gate() {
        let gate = Arc::new(WarmGate::default());
        drop(gate.begin());
        gate.wait();
    }
}
