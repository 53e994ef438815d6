//! One abup run at a time per device.
//!
//! Runs that change slots or boot settings (install, mark-*, rollback) hold
//! an exclusive `flock` on `lock` in the state directory for their whole
//! duration. The kernel drops the lock when the holder exits, however it
//! exits, so a crashed run never leaves a stale lock behind. The file holds
//! the holder's pid and verb, so a refused run can say who is running.

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Held while a run may change the device; released on drop.
pub struct RunLock {
    _lock: Flock<File>,
    pub path: PathBuf,
}

impl RunLock {
    /// Takes the lock in `state_dir` for `verb`, or refuses at once if
    /// another run holds it.
    pub fn acquire(state_dir: &Path, verb: &str) -> Result<RunLock> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating state directory {}", state_dir.display()))?;
        let path = state_dir.join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "unknown" } else { holder };
                bail!(
                    "another abup run holds {} ({holder}); wait for it to finish",
                    path.display()
                );
            }
            Err((_, e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        };
        lock.set_len(0)
            .and_then(|_| lock.rewind())
            .and_then(|_| writeln!(lock, "pid {} running {verb}", std::process::id()))
            .with_context(|| format!("writing lock file {}", path.display()))?;
        Ok(RunLock { _lock: lock, path })
    }
}

/// A run holding the lock, as `status` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Running {
    pub pid: u32,
    /// What the holder wrote in the lock file (verb, step, since …).
    pub info: String,
}

impl Running {
    pub fn describe(&self) -> String {
        format!("pid {}: {}", self.pid, self.info)
    }
}

/// The run holding the lock in `state_dir`, if any. Reads `/proc/locks`
/// instead of taking the lock, so that asking never makes a starting run
/// fail, and so that it works without root.
pub fn in_progress(state_dir: &Path) -> Option<Running> {
    use std::os::unix::fs::MetadataExt;
    let path = state_dir.join("lock");
    let meta = std::fs::metadata(&path).ok()?;
    let (major, minor) = (
        nix::sys::stat::major(meta.dev()),
        nix::sys::stat::minor(meta.dev()),
    );
    let want = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid = locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
        (f.len() >= 6 && f[1] == "FLOCK" && f[5] == want)
            .then(|| f[4].parse::<u32>().ok())
            .flatten()
    })?;
    let info = std::fs::read_to_string(&path)
        .map(|t| t.trim().to_string())
        .unwrap_or_default();
    Some(Running { pid, info })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path(), "install").unwrap();
        let err = format!(
            "{:#}",
            RunLock::acquire(dir.path(), "mark-good").err().unwrap()
        );
        assert!(
            err.contains(&format!("pid {} running install", std::process::id())),
            "{err}"
        );
        let running = in_progress(dir.path()).expect("the held lock shows in /proc/locks");
        assert_eq!(running.pid, std::process::id());
        assert!(running.info.contains("install"), "{running:?}");
        drop(first);
        assert!(in_progress(dir.path()).is_none());
        RunLock::acquire(dir.path(), "mark-good").unwrap();
    }
}
