//! The L1 arena registered with the driver (`cuMemHostRegister`, PORTABLE), so copies run on
//! the copy engines at full speed. Registered in pieces of at most 64 GiB (one huge
//! registration fails on recent drivers); a copy never spans two pieces. Not write-combined:
//! the CPU reads L1 for compression and the disk tier.

use cudarc::driver::sys;

use super::driver::{check, Device};

/// Largest single registration.
pub const MAX_PIECE: u64 = 64 << 30;
const CU_MEMHOSTREGISTER_PORTABLE: u32 = 1;

pub struct PinnedHost {
    device: &'static Device,
    base: usize,
    len: usize,
    piece: usize,
}

// SAFETY: PinnedHost holds plain addresses (usize) of memory the L1 store owns and a
// `&'static Device`; nothing in it is tied to the thread that registered it (driver
// registrations are process-wide).
unsafe impl Send for PinnedHost {}
// SAFETY: `&PinnedHost` only reads those addresses (`split`, `len`); unregistering needs the
// owned value (Drop).
unsafe impl Sync for PinnedHost {}

impl PinnedHost {
    /// Register `[base, base + len)` in pieces of `piece` bytes (at most `MAX_PIECE`); all or
    /// nothing.
    pub fn register(
        device: &'static Device,
        base: *mut u8,
        len: u64,
        piece: u64,
    ) -> Result<PinnedHost, String> {
        let piece = piece.clamp(4096, MAX_PIECE) as usize;
        let (base, len) = (base as usize, len as usize);
        device.bind()?;
        let mut done = 0;
        while done < len {
            let n = piece.min(len - done);
            let r = check(
                // SAFETY: the context is bound; the driver only pins and maps the pages of
                // `[base + done, +n)`, inside the caller's range, and fails (no UB) on memory
                // that is not mapped. Nothing is read or written through the pointer here.
                unsafe {
                    sys::cuMemHostRegister_v2(
                        (base + done) as *mut std::ffi::c_void,
                        n,
                        CU_MEMHOSTREGISTER_PORTABLE,
                    )
                },
                "cuMemHostRegister_v2",
            );
            if let Err(e) = r {
                unregister(base, done, piece);
                return Err(format!(
                    "pinning L1 ({len} bytes) failed at byte {done} of a {n}-byte piece: {e} \
                     (check `ulimit -l` and the container's memlock limit)"
                ));
            }
            done += n;
        }
        Ok(PinnedHost {
            device,
            base,
            len,
            piece,
        })
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pieces(&self) -> usize {
        self.len.div_ceil(self.piece)
    }

    /// Split the host range `[host, host + len)` where it crosses a piece boundary.
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
        // SAFETY: `base + done` is the start of a piece `register` registered (pieces are
        // `piece` bytes from `base`), each unregistered once; the caller bound the context.
        unsafe { sys::cuMemHostUnregister((base + done) as *mut std::ffi::c_void) };
        done += piece.min(len - done);
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            unregister(self.base, self.len, self.piece);
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
