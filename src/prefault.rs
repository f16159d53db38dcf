//! Committing memory before the hot path touches it.
//!
//! A page touched for the first time costs a minor fault (the kernel finds, zeroes and maps
//! it: ~0.25 µs per 4 KiB, one per 4 KiB copied). `populate` takes those faults up front —
//! `MADV_POPULATE_WRITE` (Linux 5.14+) where the kernel has it, else a touch loop — without
//! changing a byte, so it is safe on memory others are using concurrently.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};

const PAGE: usize = 4096;

/// Fault in `[ptr, ptr + len)` writable, leaving its contents as they are.
///
/// # Safety
/// The range must be mapped readable and writable for the duration of the call.
pub unsafe fn populate(ptr: *mut u8, len: usize) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // madvise wants a page-aligned start.
    let misalign = ptr as usize % PAGE;
    let (start, len) = (ptr.wrapping_sub(misalign), len + misalign);
    // SAFETY: the caller guarantees the mapping; populate never changes contents.
    if unsafe { libc::madvise(start.cast(), len, libc::MADV_POPULATE_WRITE) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    // An older kernel: touch every page with an atomic add of zero (a write that changes
    // nothing, even if someone writes the same byte concurrently).
    let mut off = 0;
    while off < len {
        // SAFETY: in the caller's mapped range; a byte is always aligned for AtomicU8.
        unsafe { AtomicU8::from_ptr(start.add(off)) }.fetch_add(0, Ordering::Relaxed);
        off += PAGE;
    }
    Ok(())
}

/// Minor page faults the calling thread has taken so far.
pub fn thread_minor_faults() -> u64 {
    // SAFETY: rusage is a C struct of integers and timevals: all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live rusage the call fills; RUSAGE_THREAD reads only this thread.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    ru.ru_minflt as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh_pages(len: usize) -> *mut u8 {
        // SAFETY: a fresh anonymous mapping, checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // No huge pages: count 4 KiB faults.
        // SAFETY: `[p, p + len)` is the mapping just created; the advice changes no contents.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        p.cast()
    }

    fn faults_writing(p: *mut u8, len: usize) -> u64 {
        let before = thread_minor_faults();
        // SAFETY: callers pass a private mapping of `len` bytes from `fresh_pages`.
        unsafe { std::ptr::write_bytes(p, 7, len) };
        thread_minor_faults() - before
    }

    #[test]
    fn populated_memory_takes_no_faults_and_keeps_its_bytes() {
        let len = 16 << 20;
        let pages = (len / PAGE) as u64;
        // The unpopulated control faults once per page: the counter sees what we claim to save.
        let cold = fresh_pages(len);
        assert!(faults_writing(cold, len) >= pages / 2);
        let warm = fresh_pages(len);
        // SAFETY: byte 5 of the `len`-byte private mapping just made.
        unsafe { *warm.add(5) = 42 };
        // SAFETY: `[warm + 1, warm + len)` is inside that mapping, readable and writable.
        unsafe { populate(warm.add(1), len - 1) }.unwrap();
        // SAFETY: as above, byte 5 of the live mapping.
        assert_eq!(unsafe { *warm.add(5) }, 42, "populate changed a byte");
        let faults = faults_writing(warm, len);
        assert!(
            faults < pages / 100,
            "{faults} faults after populate ({pages} pages)"
        );
        // SAFETY: both mappings came from `fresh_pages(len)` and are not used after this.
        unsafe {
            libc::munmap(cold.cast(), len);
            libc::munmap(warm.cast(), len);
        }
    }
}
