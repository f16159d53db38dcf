//! torch's CUDA IPC reference counters, released when cwm closes a share.
//!
//! Each `UntypedStorage._share_cuda_()` gives the share a fresh `int64` slot in a shared-memory
//! object of torch's (`/torch_<pid>_<rand>_<n>`, made by `at::RefcountedMapAllocator`: a
//! 64-byte header, then `CUDA_IPC_REF_COUNTER_FILE_SIZE` = 10,000 slots) and sets it to 1.
//! When the engine frees the storage, torch parks its memory in a "limbo" until the slot is 0
//! again. The consumer decrements the slot once when it stops using the memory: torch's
//! `_new_shared_cuda` deleter (which LMCache's reference server uses to open `cuda`
//! descriptors) does so after closing the IPC mapping, and `_release_ipc_counter` does so at
//! once for a storage that was already open. cwm does the same per descriptor when the
//! instance's mappings are closed (unregister or reaper), never while copies may still run.
//!
//! A bad descriptor never makes cwm write outside the slot: the name must be torch's pattern,
//! the object exactly torch's size, the slot inside it; a slot already at 0 is left alone (the
//! producer reads it as unsigned, so -1 would park the memory forever). Failures are logged,
//! never fatal (torch, too, releases "on a best effort basis": the producer may have exited).

use std::sync::atomic::{AtomicI64, Ordering};

use connector_protocol::TorchRefCounter;
use thiserror::Error;

use crate::engine_mem::shm::ShmSegment;

/// torch's `map_alloc_alignment`: the header before the slots.
const HEADER: u64 = 64;
/// torch's `CUDA_IPC_REF_COUNTER_FILE_SIZE`.
const SLOTS: u64 = 10_000;
/// The object's exact size.
pub const FILE_BYTES: u64 = HEADER + 8 * SLOTS;

/// Why a counter was refused at registration or not released.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RefCounterError {
    #[error("ref counter name {0:?} is not torch's /torch_<pid>_<rand>_<n>")]
    Name(String),
    #[error("ref counter offset {0} is outside torch's {SLOTS} slots")]
    Offset(u64),
    #[error("{name}: {reason} (the engine exited?)")]
    Gone { name: String, reason: String },
    #[error("{name} has {size} bytes, not torch's {FILE_BYTES}: left alone")]
    Size { name: String, size: u64 },
    #[error("{name} slot {slot} is already {value}: left alone")]
    Released { name: String, slot: u64, value: i64 },
}

/// A share's counter, checked and ready to release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefCounter {
    name: String,
    slot: u64,
}

impl RefCounter {
    /// Check a descriptor's counter: torch's name pattern and a slot inside the object.
    pub fn parse(rc: &TorchRefCounter) -> Result<RefCounter, RefCounterError> {
        let name = std::str::from_utf8(&rc.name)
            .ok()
            .filter(|n| is_torch_name(n))
            .ok_or_else(|| RefCounterError::Name(String::from_utf8_lossy(&rc.name).into()))?;
        if rc.offset >= SLOTS {
            return Err(RefCounterError::Offset(rc.offset));
        }
        Ok(RefCounter {
            name: name.to_string(),
            slot: rc.offset,
        })
    }

    /// Decrement the slot once (torch's consumer deleter); returns the value left.
    pub fn release(&self) -> Result<i64, RefCounterError> {
        let gone = |reason: String| RefCounterError::Gone {
            name: self.name.clone(),
            reason,
        };
        let path = format!("/dev/shm/{}", &self.name[1..]);
        let size = std::fs::symlink_metadata(&path)
            .map_err(|e| gone(e.to_string()))?
            .len();
        if size != FILE_BYTES {
            return Err(RefCounterError::Size {
                name: self.name.clone(),
                size,
            });
        }
        let seg = ShmSegment::open(&self.name, FILE_BYTES).map_err(|e| gone(e.to_string()))?;
        let at = (HEADER + 8 * self.slot) as usize;
        // SAFETY: `at + 8 <= FILE_BYTES` (slot < SLOTS), the mapping is FILE_BYTES long and
        // page-aligned, so the 8-aligned slot lies inside it and lives while `seg` does; torch
        // updates it only as a whole int64, and the CAS below is atomic against any writer.
        let slot = unsafe { &*(seg.as_mut_ptr().add(at) as *const AtomicI64) };
        let mut v = slot.load(Ordering::SeqCst);
        loop {
            if v <= 0 {
                return Err(RefCounterError::Released {
                    name: self.name.clone(),
                    slot: self.slot,
                    value: v,
                });
            }
            match slot.compare_exchange(v, v - 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Ok(v - 1),
                Err(now) => v = now,
            }
        }
    }
}

/// `/torch_<digits>_<digits>_<digits>` (at::NewProcessWideShmHandle).
fn is_torch_name(n: &str) -> bool {
    let Some(rest) = n.strip_prefix("/torch_") else {
        return false;
    };
    let parts: Vec<&str> = rest.split('_').collect();
    n.len() <= 255
        && parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Release every counter, logging what could not be released.
pub fn release_all(counters: &[RefCounter]) {
    for rc in counters {
        match rc.release() {
            Ok(left) => {
                tracing::debug!(name = %rc.name, slot = rc.slot, left, "released torch's IPC ref counter")
            }
            Err(e) => tracing::warn!("torch's IPC ref counter not released: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(name: &str, offset: u64) -> TorchRefCounter {
        TorchRefCounter {
            name: name.as_bytes().to_vec(),
            offset,
        }
    }

    #[test]
    fn only_torch_names_and_slots_inside_the_file_are_accepted() {
        assert!(RefCounter::parse(&rc("/torch_12_34_0", 9_999)).is_ok());
        for bad in [
            "/torch_12_34",
            "/torch_12_34_0_1",
            "/torch_1a_34_0",
            "/torch__34_0",
            "torch_12_34_0",
            "/torch_12_34_0/../x",
            "/cwm_l1",
        ] {
            let e = RefCounter::parse(&rc(bad, 0)).unwrap_err();
            assert_eq!(e, RefCounterError::Name(bad.into()));
            assert!(e.to_string().contains("not torch's"), "{bad}: {e}");
        }
        let e = RefCounter::parse(&rc("/torch_1_2_3", 10_000)).unwrap_err();
        assert_eq!(e, RefCounterError::Offset(10_000));
        let bytes = TorchRefCounter {
            name: vec![0xff, b'/'],
            offset: 0,
        };
        assert!(RefCounter::parse(&bytes).is_err());
    }

    #[test]
    fn release_decrements_its_slot_once_and_never_below_zero() {
        let name = format!("/torch_{}_77_{}", std::process::id(), line!());
        let seg = ShmSegment::create(&name, FILE_BYTES).unwrap();
        let word = |slot: u64| {
            // SAFETY: slot < SLOTS: inside the FILE_BYTES segment, which outlives the use.
            unsafe { &*(seg.as_mut_ptr().add((HEADER + 8 * slot) as usize) as *const AtomicI64) }
        };
        word(5).store(2, Ordering::SeqCst);
        let c = RefCounter::parse(&rc(&name, 5)).unwrap();
        assert_eq!(c.release(), Ok(1));
        assert_eq!(c.release(), Ok(0));
        assert!(matches!(
            c.release(),
            Err(RefCounterError::Released { value: 0, .. })
        ));
        assert_eq!(word(5).load(Ordering::SeqCst), 0);
        assert_eq!(word(4).load(Ordering::SeqCst), 0, "neighbours untouched");
        assert_eq!(word(6).load(Ordering::SeqCst), 0, "neighbours untouched");
        // The header (torch's own map refcount) is never written.
        // SAFETY: byte 0 of the live segment.
        assert_eq!(unsafe { *seg.as_mut_ptr() }, 0);
    }

    #[test]
    fn a_file_of_another_size_or_a_missing_one_is_left_alone() {
        let name = format!("/torch_{}_78_{}", std::process::id(), line!());
        let seg = ShmSegment::create(&name, FILE_BYTES + 8).unwrap();
        let c = RefCounter::parse(&rc(&name, 0)).unwrap();
        let e = c.release().unwrap_err();
        assert!(
            matches!(e, RefCounterError::Size { size, .. } if size == FILE_BYTES + 8),
            "{e}"
        );
        drop(seg);
        let e = c.release().unwrap_err();
        assert!(matches!(e, RefCounterError::Gone { .. }), "{e}");
        assert!(e.to_string().contains("engine exited"), "{e}");
    }
}
