//! The L1 arena registered with the driver (`cuMemHostRegister`, PORTABLE), so copies run on
//! the copy engines at full speed. Registered piece by piece, bottom up, by a background thread
//! (`engine_mem::pin_l1`), never on a registration's thread; a copy never spans two pieces, and
//! a copy from a piece not registered yet runs from pageable memory (slower, correct). Not
//! write-combined: the CPU reads L1 for compression and the disk tier.

use std::sync::atomic::{AtomicUsize, Ordering};

use cudarc::driver::sys;

use super::driver::{check, Device};
use super::error::CudaError;

/// Largest single registration.
pub const MAX_PIECE: u64 = 64 << 30;
/// The pieces the background pinning registers one at a time (a copy is split where it
/// crosses one: rare at this size).
pub const DEFAULT_PIECE: u64 = 1 << 30;
const CU_MEMHOSTREGISTER_PORTABLE: u32 = 1;

pub struct PinnedHost {
    device: &'static Device,
    base: usize,
    len: usize,
    piece: usize,
    /// Pieces registered so far, from the bottom: `[base, base + pinned * piece)`.
    pinned: AtomicUsize,
}

// SAFETY: PinnedHost holds plain addresses (usize) of memory the L1 store owns, a counter and
// a `&'static Device`; nothing in it is tied to the thread that registered it (driver
// registrations are process-wide).
unsafe impl Send for PinnedHost {}
// SAFETY: `&PinnedHost` reads those addresses and the atomic counter; `pin_next` registers
// the next piece and publishes it with a release store (one pinning thread calls it).
unsafe impl Sync for PinnedHost {}

impl PinnedHost {
    /// `[base, base + len)`, to be registered in pieces of `piece` bytes (at most
    /// `MAX_PIECE`) by `pin_next`; nothing is registered yet.
    pub fn new(device: &'static Device, base: *mut u8, len: u64, piece: u64) -> PinnedHost {
        PinnedHost {
            device,
            base: base as usize,
            len: len as usize,
            piece: piece.clamp(4096, MAX_PIECE) as usize,
            pinned: AtomicUsize::new(0),
        }
    }

    /// Register the next piece (the caller is the one pinning thread). `Ok(false)`: all are.
    pub fn pin_next(&self) -> Result<bool, CudaError> {
        let i = self.pinned.load(Ordering::Acquire);
        let done = i * self.piece;
        if done >= self.len {
            return Ok(false);
        }
        let n = self.piece.min(self.len - done);
        self.device.bind()?;
        check(
            // SAFETY: the context is bound; the driver only pins and maps the pages of
            // `[base + done, +n)`, inside the L1 arena, and fails (no UB) on memory that is
            // not mapped. Nothing is read or written through the pointer here.
            unsafe {
                sys::cuMemHostRegister_v2(
                    (self.base + done) as *mut std::ffi::c_void,
                    n,
                    CU_MEMHOSTREGISTER_PORTABLE,
                )
            },
            "cuMemHostRegister_v2",
        )
        .map_err(|e| CudaError::Pin {
            len: self.len,
            done,
            piece: n,
            source: Box::new(e),
        })?;
        // Copies see the piece as pinned only once it is.
        self.pinned.store(i + 1, Ordering::Release);
        Ok(true)
    }

    /// Bytes registered so far (from the bottom).
    pub fn pinned_bytes(&self) -> u64 {
        (self.pinned.load(Ordering::Acquire) * self.piece).min(self.len) as u64
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn piece(&self) -> u64 {
        self.piece as u64
    }

    pub fn pieces(&self) -> usize {
        self.len.div_ceil(self.piece)
    }

    /// Split the host range `[host, host + len)` where it crosses a piece boundary (pinned
    /// or not yet: each piece is one registration or none).
    pub fn split(&self, host: usize, len: usize, mut f: impl FnMut(usize, usize, usize)) {
        split_at(self.base, self.piece, host, len, &mut f)
    }
}

/// `f(offset into the range, host address, len)` for each piece of `[host, host + len)`,
/// pieces being `piece`-byte windows from `base`.
pub(super) fn split_at(
    base: usize,
    piece: usize,
    host: usize,
    len: usize,
    f: &mut impl FnMut(usize, usize, usize),
) {
    let mut off = 0;
    while off < len {
        let at = host + off;
        let room = match at.checked_sub(base) {
            Some(rel) => piece - rel % piece,
            None => len - off,
        };
        let n = room.min(len - off);
        f(off, at, n);
        off += n;
    }
}

fn unregister(base: usize, len: usize, piece: usize) {
    let mut done = 0;
    while done < len {
        // SAFETY: `base + done` is the start of a piece `pin_next` registered (pieces are
        // `piece` bytes from `base`), each unregistered once; the caller bound the context.
        unsafe { sys::cuMemHostUnregister((base + done) as *mut std::ffi::c_void) };
        done += piece.min(len - done);
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            unregister(self.base, self.pinned_bytes() as usize, self.piece);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_at;

    #[test]
    fn splits_only_at_piece_boundaries() {
        let mut got = vec![];
        split_at(1000, 100, 1050, 220, &mut |o, h, n| got.push((o, h, n)));
        assert_eq!(got, vec![(0, 1050, 50), (50, 1100, 100), (150, 1200, 70)]);
        got.clear();
        split_at(1000, 100, 1100, 100, &mut |o, h, n| got.push((o, h, n)));
        assert_eq!(got, vec![(0, 1100, 100)]);
    }
}
