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
        drop(first);
        RunLock::acquire(dir.path(), "mark-good").unwrap();
    }
}
