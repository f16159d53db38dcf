//! Slot leases: the extents of the shared L1 pool that an engine may be copying into or out of
//! right now (engine-driven prepares waiting for their commit), kept where a crash of cwm
//! cannot lose them: in the pool object's own tail (`arena::POOL_TAIL`), which lives exactly as
//! long as the pool engines map.
//!
//! A cwm that adopts a pool left behind (docs/ENGINE_DRIVEN.md, "After a restart") reads the
//! table first: every extent still leased stays out of the allocator (quarantined) until its
//! lease would have expired in the old process, so a copy an engine started before the crash
//! never lands in a slot the new cwm hands out again, and no read of one sees another's store.
//!
//! A record is four little-endian u64 words: offset, length, expiry (CLOCK_BOOTTIME
//! milliseconds: shared by every process of the boot, immune to wall-clock changes) and a check
//! word over the three. It is written check-last and cleared check-first, so a cwm killed in the
//! middle leaves either a whole record or one the check refuses; a lease is recorded before its
//! slot is answered and cleared only after its transfer ended, so a refused record never
//! belonged to a slot an engine was given.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::arena::{Extent, ALIGN};

const WORDS: usize = 4;
const RECORD: usize = WORDS * 8;
/// Mixed into the check word, so an all-zero record (never written) is not valid.
const SEAL: u64 = 0x6377_6d5f_6c65_6173;

/// The lease table in a pool's tail.
pub struct LeaseTable {
    words: *const AtomicU64,
    records: usize,
    free: Mutex<Vec<u32>>,
}

// SAFETY: the table's words are atomics in a mapping that outlives it (the arena owns both);
// records are handed to one holder at a time through `free`.
unsafe impl Send for LeaseTable {}
// SAFETY: as above.
unsafe impl Sync for LeaseTable {}

/// An extent that was leased when the pool's previous cwm stopped, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub extent: Extent,
    /// CLOCK_BOOTTIME milliseconds.
    pub until_ms: u64,
    record: u32,
}

impl LeaseTable {
    /// The table in `len` bytes at `base` (a pool's tail). A fresh pool's tail is zeros: no
    /// leases. An adopted one's valid, unexpired leases within `pool_len` are returned (their
    /// records stay until `release`d); every other record is cleared.
    ///
    /// # Safety
    /// `base` must point to `len` bytes, 8-byte aligned, mapped for as long as the table lives.
    pub unsafe fn open(base: *mut u8, len: usize, pool_len: u64) -> (LeaseTable, Vec<Held>) {
        let table = LeaseTable {
            words: base.cast::<AtomicU64>().cast_const(),
            records: len / RECORD,
            free: Mutex::new(Vec::new()),
        };
        let now = now_ms();
        let mut held = Vec::new();
        let mut free = Vec::new();
        for i in (0..table.records as u32).rev() {
            match table.valid(i) {
                Some((extent, until_ms)) if until_ms > now && Self::within(extent, pool_len) => {
                    held.push(Held {
                        extent,
                        until_ms,
                        record: i,
                    })
                }
                _ => {
                    table.clear(i);
                    free.push(i);
                }
            }
        }
        *table.free.lock() = free;
        (table, held)
    }

    fn within(e: Extent, pool_len: u64) -> bool {
        e.len > 0
            && e.offset % ALIGN == 0
            && e.len % ALIGN == 0
            && e.offset
                .checked_add(e.len)
                .is_some_and(|end| end <= pool_len)
    }

    fn word(&self, record: u32, w: usize) -> &AtomicU64 {
        debug_assert!((record as usize) < self.records && w < WORDS);
        // SAFETY: in bounds of the table (`records` whole records at `words`).
        unsafe { &*self.words.add(record as usize * WORDS + w) }
    }

    fn check(offset: u64, len: u64, until: u64) -> u64 {
        (offset ^ len.rotate_left(21) ^ until.rotate_left(42) ^ SEAL)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    fn valid(&self, record: u32) -> Option<(Extent, u64)> {
        let [offset, len, until, check] =
            [0, 1, 2, 3].map(|w| self.word(record, w).load(Ordering::Acquire));
        (check == Self::check(offset, len, until)).then_some((Extent { offset, len }, until))
    }

    fn clear(&self, record: u32) {
        self.word(record, 3).store(0, Ordering::Release);
        for w in 0..3 {
            self.word(record, w).store(0, Ordering::Relaxed);
        }
    }

    /// Record that `extent` is an engine's until `ttl` from now. `None` when every record is
    /// taken: the caller must then not hand the extent out.
    pub fn grant(&self, extent: Extent, ttl: Duration) -> Option<u32> {
        let record = self.free.lock().pop()?;
        let until = now_ms().saturating_add(ttl.as_millis() as u64);
        self.word(record, 0).store(extent.offset, Ordering::Relaxed);
        self.word(record, 1).store(extent.len, Ordering::Relaxed);
        self.word(record, 2).store(until, Ordering::Relaxed);
        self.word(record, 3).store(
            Self::check(extent.offset, extent.len, until),
            Ordering::Release,
        );
        Some(record)
    }

    /// End a lease from `grant`, or a `Held` one.
    pub fn release(&self, record: u32) {
        self.clear(record);
        self.free.lock().push(record);
    }

    /// End a lease inherited from the previous cwm.
    pub fn release_held(&self, held: &Held) {
        self.release(held.record);
    }

    /// Leases that can be granted now.
    pub fn available(&self) -> usize {
        self.free.lock().len()
    }
}

/// A pool's lease table and what it inherited: the extents still leased when the previous cwm
/// stopped, kept out of the allocator until their leases expire.
pub struct PoolLeases {
    table: LeaseTable,
    quarantine: Mutex<Vec<Quarantined>>,
}

/// Inherited leases over one range (leases of one slot by several engines merge into one).
struct Quarantined {
    extent: Extent,
    until_ms: u64,
    held: Vec<Held>,
}

impl PoolLeases {
    /// The table in a pool's tail (see `LeaseTable::open`), and the extents the caller must
    /// take out of its allocator: the inherited leases, overlapping ones merged.
    ///
    /// # Safety
    /// As `LeaseTable::open`.
    pub unsafe fn open(base: *mut u8, len: usize, pool_len: u64) -> (PoolLeases, Vec<Extent>) {
        // SAFETY: forwarded.
        let (table, mut held) = unsafe { LeaseTable::open(base, len, pool_len) };
        held.sort_by_key(|h| h.extent.offset);
        let mut groups: Vec<Quarantined> = Vec::new();
        for h in held {
            match groups.last_mut() {
                Some(g) if h.extent.offset < g.extent.offset + g.extent.len => {
                    let end = (g.extent.offset + g.extent.len).max(h.extent.offset + h.extent.len);
                    g.extent.len = end - g.extent.offset;
                    g.until_ms = g.until_ms.max(h.until_ms);
                    g.held.push(h);
                }
                _ => groups.push(Quarantined {
                    extent: h.extent,
                    until_ms: h.until_ms,
                    held: vec![h],
                }),
            }
        }
        let extents = groups.iter().map(|g| g.extent).collect();
        let leases = PoolLeases {
            table,
            quarantine: Mutex::new(groups),
        };
        (leases, extents)
    }

    pub fn table(&self) -> &LeaseTable {
        &self.table
    }

    /// Inherited ranges whose leases have all expired: their records are released and their
    /// extents returned, for the caller to give back to its allocator.
    pub fn expire_inherited(&self) -> Vec<Extent> {
        let now = now_ms();
        let mut quarantine = self.quarantine.lock();
        let (done, kept): (Vec<_>, Vec<_>) = quarantine.drain(..).partition(|q| q.until_ms <= now);
        *quarantine = kept;
        done.into_iter()
            .map(|q| {
                for h in &q.held {
                    self.table.release_held(h);
                }
                q.extent
            })
            .collect()
    }

    /// Bytes of inherited ranges still kept out of use.
    pub fn quarantined_bytes(&self) -> u64 {
        self.quarantine.lock().iter().map(|q| q.extent.len).sum()
    }
}

/// Milliseconds of CLOCK_BOOTTIME: one clock for every process of this boot, counting suspend.
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(mem: &mut [u64], pool: u64) -> (LeaseTable, Vec<Held>) {
        // SAFETY: `mem` is 8-byte aligned and outlives the table in each test.
        unsafe { LeaseTable::open(mem.as_mut_ptr().cast(), mem.len() * 8, pool) }
    }

    const E: Extent = Extent {
        offset: 2 * ALIGN,
        len: 3 * ALIGN,
    };

    #[test]
    fn granted_leases_survive_a_reopen_until_released_or_expired() {
        let mut mem = vec![0u64; 4 * WORDS];
        let (t, held) = table(&mut mem, 1 << 20);
        assert!(held.is_empty());
        assert_eq!(t.available(), 4);
        t.grant(E, Duration::from_secs(60)).unwrap();
        t.grant(
            Extent {
                offset: 0,
                len: ALIGN,
            },
            Duration::ZERO,
        )
        .unwrap();
        let done = t.grant(
            Extent {
                offset: ALIGN,
                len: ALIGN,
            },
            Duration::from_secs(60),
        );
        t.release(done.unwrap());
        drop(t);
        // What a new cwm sees: the unexpired, unreleased lease only.
        let (t, held) = table(&mut mem, 1 << 20);
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!(held[0].extent, E);
        assert_eq!(t.available(), 3);
        t.release_held(&held[0]);
        drop(t);
        let (t, held) = table(&mut mem, 1 << 20);
        assert!(held.is_empty());
        assert_eq!(t.available(), 4);
    }

    #[test]
    fn a_full_table_grants_nothing() {
        let mut mem = vec![0u64; 2 * WORDS];
        let (t, _) = table(&mut mem, 1 << 20);
        assert!(t.grant(E, Duration::from_secs(1)).is_some());
        assert!(t.grant(E, Duration::from_secs(1)).is_some());
        assert!(t.grant(E, Duration::from_secs(1)).is_none());
    }

    #[test]
    fn torn_and_out_of_bounds_records_are_not_trusted() {
        let mut mem = vec![0u64; 3 * WORDS];
        let (t, _) = table(&mut mem, 1 << 20);
        let torn = t.grant(E, Duration::from_secs(60)).unwrap();
        t.grant(
            Extent {
                offset: 1 << 20,
                len: ALIGN,
            },
            Duration::from_secs(60),
        )
        .unwrap();
        t.grant(E, Duration::from_secs(60)).unwrap();
        drop(t);
        // Killed while writing the first record's length.
        mem[torn as usize * WORDS + 1] ^= 1;
        let (t, held) = table(&mut mem, 1 << 20);
        assert_eq!(
            held.len(),
            1,
            "the torn and the out-of-bounds records are dropped: {held:?}"
        );
        assert_eq!(t.available(), 2);
    }
}
