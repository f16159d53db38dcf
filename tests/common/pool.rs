//! The engine's side of an engine-driven pool: cwm's shared-memory L1 mapped by name, slots
//! written and read through it, as LMCache's `EngineDrivenContextShm` does.

use std::path::Path;

use connector_protocol::{RegisterEngineDrivenContextResponse, ShmSlot};
use memmap2::MmapRaw;

/// The engine's view of the pool: the shm object mapped by name, as the worker maps it.
pub struct Pool {
    map: MmapRaw,
}

impl Pool {
    pub fn open(answer: &RegisterEngineDrivenContextResponse) -> Pool {
        assert!(
            !answer.shm_name.is_empty() && answer.pool_size > 0,
            "{answer:?}"
        );
        let name = answer.shm_name.trim_start_matches('/');
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(Path::new("/dev/shm").join(name))
            .expect("the pool opens by name");
        // The object may be longer than its slots (cwm keeps its slot leases after them).
        assert!(file.metadata().unwrap().len() >= answer.pool_size);
        Pool {
            map: MmapRaw::map_raw(&file).unwrap(),
        }
    }

    pub fn write(&self, slot: &ShmSlot, bytes: &[u8]) {
        assert_eq!(bytes.len() as u64, slot.length);
        assert!(slot.offset + slot.length <= self.map.len() as u64);
        // SAFETY: the slot lies inside the mapping (asserted above) and is the engine's own
        // (the sidecar handed it out for this store and does not touch it until committed).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(slot.offset as usize),
                bytes.len(),
            )
        }
    }

    pub fn read(&self, slot: &ShmSlot) -> Vec<u8> {
        assert!(slot.offset + slot.length <= self.map.len() as u64);
        // SAFETY: the slot lies inside the mapping (asserted above) and is held for this read
        // by the sidecar (a retrieve slot), so nothing writes it meanwhile.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().add(slot.offset as usize),
                slot.length as usize,
            )
            .to_vec()
        }
    }
}

/// Distinct content for chunk `n`.
pub fn chunk_bytes(n: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7 ^ n.wrapping_mul(97)) as u8)
        .collect()
}
