//! L1 pinned for GPU copies without stalling a registration or committing memory the operator
//! did not ask for (issue 23 item 5).
//!
//! Pinning (`cuMemHostRegister`) faults in and locks every page it covers: ~0.1-0.3 s per GiB,
//! minutes for a large L1, and pinned pages can never be reclaimed. So the first GPU
//! registration only starts a thread that pins L1 bottom up, one piece (1 GiB) at a time, and
//! returns at once; copies from a piece not pinned yet run from pageable memory (the driver
//! stages them: slower, correct). How far it pins follows what the operator asked to commit:
//! - `--l1-populate eager` (the default): all of L1 is committed at start anyway, so all of it
//!   is pinned, in the background.
//! - `--l1-populate lazy`: only the pieces wholly below what L1's objects occupy (the allocator
//!   hands out low offsets first), re-checked every `POLL`; pinning never commits a page the
//!   stores did not.
//!
//! A failure stops the pinning where it is (logged, in `/status` and `/metrics`); what was
//! pinned stays pinned.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::cuda::driver::Device;
use super::cuda::pinned::{self, PinnedHost};

/// Tests: pin L1 in pieces of this many bytes (so copies cross piece boundaries and partial
/// pinning shows with a small L1).
pub const PIECE_ENV: &str = "CWM_CUDA_PIN_PIECE_BYTES";
/// How often the pinning thread looks at L1's occupancy again (`InUse`): reading it walks
/// L1's index under its lock (`l1_occupancy`), so not often.
const POLL: Duration = Duration::from_secs(1);

/// How much of L1 to pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinScope {
    /// All of it (L1 is committed ahead of use).
    All,
    /// What L1's objects occupy, as it grows (L1 is committed on use).
    InUse,
}

/// L1's pinning, under way in the background.
pub struct L1Pinning {
    host: Arc<PinnedHost>,
    error: OnceLock<String>,
    finished: AtomicBool,
}

impl L1Pinning {
    /// The pinned arena, for copies (pieces not pinned yet copy from pageable memory).
    pub fn host(&self) -> &Arc<PinnedHost> {
        &self.host
    }

    pub fn pinned_bytes(&self) -> u64 {
        self.host.pinned_bytes()
    }

    /// Why pinning stopped short, if it did.
    pub fn error(&self) -> Option<&str> {
        self.error.get().map(String::as_str)
    }

    /// Whether all of L1 is pinned, or pinning failed.
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }
}

/// Start pinning `[base, base + len)` with `device`'s context (PORTABLE: every context sees
/// it); `in_use()` says how many bytes from `base` L1's objects occupy (read for `InUse`).
pub fn start(
    device: &'static Device,
    base: *mut u8,
    len: u64,
    scope: PinScope,
    in_use: impl Fn() -> u64 + Send + 'static,
) -> Arc<L1Pinning> {
    let piece = std::env::var(PIECE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(pinned::DEFAULT_PIECE);
    let pinning = Arc::new(L1Pinning {
        host: Arc::new(PinnedHost::new(device, base, len, piece)),
        error: OnceLock::new(),
        finished: AtomicBool::new(false),
    });
    let weak = Arc::downgrade(&pinning);
    let spawned = std::thread::Builder::new()
        .name("cwm-l1-pin".into())
        .spawn(move || run(weak, scope, in_use));
    if let Err(e) = spawned {
        fail(&pinning, format!("cannot start the pinning thread: {e}"));
    }
    pinning
}

/// The pinning thread: pin the next piece whenever it lies wholly below the target; end when
/// all is pinned, pinning failed, or L1's pinning was dropped.
fn run(weak: std::sync::Weak<L1Pinning>, scope: PinScope, in_use: impl Fn() -> u64) {
    let started = Instant::now();
    loop {
        let Some(p) = weak.upgrade() else { return };
        let host = &p.host;
        let done = host.pinned_bytes();
        if done >= host.len() {
            tracing::info!(
                bytes = host.len(),
                pieces = host.pieces(),
                ms = started.elapsed().as_secs_f64() * 1e3,
                "L1 pinned for GPU copies (in the background)"
            );
            p.finished.store(true, Ordering::Release);
            return;
        }
        let target = match scope {
            PinScope::All => host.len(),
            PinScope::InUse => in_use().min(host.len()),
        };
        let next_end = (done + host.piece()).min(host.len());
        if next_end <= target {
            if let Err(e) = host.pin_next() {
                fail(&p, e.to_string());
                return;
            }
            continue;
        }
        drop(p);
        std::thread::sleep(POLL);
    }
}

fn fail(p: &L1Pinning, e: String) {
    tracing::error!(
        pinned = p.pinned_bytes(),
        "L1 is NOT pinned beyond byte {}: GPU copies from the rest run from pageable memory \
         (slower): {e}",
        p.pinned_bytes()
    );
    let _ = p.error.set(e);
    p.finished.store(true, Ordering::Release);
}
