//! The exclusive lock on an L2 data directory. Whoever writes the directory (`cwm serve`,
//! `cwm windows import/export/list`) holds it for as long as it has the directory open; a
//! second opener is refused with the holder's pid instead of both appending to the same
//! segments and checkpoint (one's restart then dropped the other's acknowledged chunks).
//!
//! The lock is an `flock` on the file `LOCK` in the directory, which also records the
//! holder's pid and command line for the refusal message. The kernel drops the lock when the
//! holder exits, however it exits, so a crash never leaves the directory locked.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// Held for its lifetime; dropping it releases the directory.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Take `dir`'s lock, or fail with `ResourceBusy` naming the process that holds it.
    pub fn acquire(dir: &Path) -> io::Result<DirLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)?;
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e);
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                "another process (it has not written its pid yet)".to_string()
            } else {
                crate::limits::for_log(holder)
            };
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "{} is in use by {holder}; stop it first (a data directory has one \
                     writer at a time) or use another --l2-path",
                    dir.display()
                ),
            ));
        }
        let cmd: Vec<String> = std::env::args().take(3).collect();
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "pid {} ({})", std::process::id(), cmd.join(" "))?;
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        let e = DirLock::acquire(dir.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy);
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }
}
