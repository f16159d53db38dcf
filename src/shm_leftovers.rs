//! Shared-memory segments that LMCache's connector left behind: `/dev/shm/lmcache_kv_<pid>_<n>`
//! (a CPU engine's KV cache, migrated to shm so the server can map it) whose process is gone.
//! vLLM's connector does not unlink them at shutdown, so each engine run leaves its whole KV
//! cache's size in /dev/shm, which the engine-driven L1 pool needs. cwm did not create them and
//! never deletes them: `cwm doctor` and the start line name them, with their size.
//!
//! "Gone" means no process of that pid in cwm's pid namespace: a cwm in a container that
//! shares /dev/shm but not the pid namespace with its engines sees live engines as gone, which
//! the report says.

use std::path::Path;

/// The name prefix the LMCache 0.5.6 client gives its KV segments (`CpuShmTensorWrapper`).
pub const PREFIX: &str = "lmcache_kv_";

/// One segment whose creating process is gone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Leftover {
    pub name: String,
    pub pid: u32,
    pub bytes: u64,
}

/// Segments in `dir` (normally /dev/shm) named `lmcache_kv_<pid>_...` whose pid is not running.
pub fn find(dir: &Path) -> Vec<Leftover> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Leftover> = read
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let pid = pid_of(&name)?;
            let meta = e.metadata().ok()?;
            (meta.is_file() && !running(pid)).then_some(Leftover {
                bytes: meta.len(),
                name,
                pid,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The pid in `lmcache_kv_<pid>_<rest>`.
fn pid_of(name: &str) -> Option<u32> {
    let (pid, _) = name.strip_prefix(PREFIX)?.split_once('_')?;
    pid.parse().ok().filter(|&p| p > 0)
}

/// Whether a process of this pid exists (in this pid namespace).
fn running(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// One line for logs and `cwm doctor`: how many, how large, which.
pub fn summary(found: &[Leftover]) -> String {
    let total: u64 = found.iter().map(|l| l.bytes).sum();
    let names: Vec<String> = found
        .iter()
        .map(|l| format!("{} ({:.1} MiB)", l.name, l.bytes as f64 / (1 << 20) as f64))
        .collect();
    format!(
        "{} segment(s) of LMCache engines no longer running in this pid namespace hold {:.2} \
         GiB of /dev/shm: {}. cwm did not create them and leaves them; remove them (rm \
         /dev/shm/{PREFIX}<pid>_*) once you know their engines are gone",
        found.len(),
        total as f64 / (1u64 << 30) as f64,
        names.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_dead_pids_are_found_with_their_size_and_nothing_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let dead = (1u32 << 22) + 12345; // above the default pid_max (4 194 304)
        let mine = std::process::id();
        let write = |name: &str, len: usize| std::fs::write(dir.path().join(name), vec![0; len]);
        write(&format!("{PREFIX}{dead}_0"), 4096).unwrap();
        write(&format!("{PREFIX}{mine}_0"), 10).unwrap();
        write("cwm_l1_1_0", 10).unwrap();
        write(&format!("{PREFIX}notapid_0"), 10).unwrap();
        let found = find(dir.path());
        assert_eq!(
            found,
            [Leftover {
                name: format!("{PREFIX}{dead}_0"),
                pid: dead,
                bytes: 4096
            }]
        );
        assert!(summary(&found).contains(&format!("{PREFIX}{dead}_0")));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
    }
}
