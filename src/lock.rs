//! One abup run at a time per disk, and what the running one is doing.
//!
//! Runs that change slots or boot settings (install, mark-*, rollback) hold
//! an exclusive `flock` for their whole duration on a lock file named after
//! the disk itself, `/run/abup/disk-<id>.lock`: the device number of a block
//! device, or the device and inode of a disk-image file (a loop device
//! counts as the file behind it). Two configs naming the same disk, whatever
//! their state directories, take the same lock, so exactly one proceeds. The
//! state directory's `lock` is taken as well, so two disks sharing one state
//! directory cannot mix their records either.
//!
//! The kernel drops a lock when its holder exits, however it exits, so a
//! crashed run never leaves a stale lock behind. The disk lock file holds the
//! holder's pid, verb, current step and start time as one JSON line, kept
//! current at every step: a refused run names the holder, and `status`
//! shows the run in progress ([`running`]).

use crate::config::SystemConfig;
use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What a run holding the lock is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    pub pid: u32,
    pub verb: String,
    pub step: String,
    /// Unix seconds when the run took the lock.
    pub since: u64,
    /// Bytes done (and the total, when known) of the current long step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<StepProgress>,
}

/// Byte progress of the step in [`RunInfo`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepProgress {
    pub done: u64,
    pub total: Option<u64>,
}

impl fmt::Display for RunInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {}, {}, step {}{}, since {}",
            self.pid,
            self.verb,
            self.step,
            self.progress.as_ref().map_or(String::new(), |p| format!(
                " ({})",
                crate::events::progress_text(p.done, p.total, None)
            )),
            crate::runlog::utc(self.since)
        )
    }
}

/// Another run holds the lock: the run was refused before any write.
#[derive(Debug, Clone)]
pub struct Held {
    pub path: PathBuf,
    pub holder: Option<RunInfo>,
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let holder = self
            .holder
            .as_ref()
            .map_or("holder unknown".to_string(), |h| h.to_string());
        write!(
            f,
            "another abup run holds {} ({holder}); wait for it to finish, then run this again",
            self.path.display()
        )
    }
}

impl std::error::Error for Held {}

/// Held while a run may change the device; released on drop.
pub struct RunLock {
    _disk: Flock<File>,
    _state: Flock<File>,
    /// The disk lock file.
    pub path: PathBuf,
}

/// The running process's lock file and info, so steps can be noted.
static CURRENT: Mutex<Option<(File, RunInfo)>> = Mutex::new(None);

impl RunLock {
    /// Takes the lock on `cfg`'s disk (and state directory) for `verb`, or
    /// refuses at once with [`Held`] if another run holds either.
    pub fn acquire(cfg: &SystemConfig, verb: &str) -> Result<RunLock> {
        Self::take(cfg, verb, true)
    }

    /// Like [`RunLock::acquire`], for a short repair inside a read-only verb
    /// (`status` recovering boot files): the last-run record is left as it is.
    pub fn acquire_unrecorded(cfg: &SystemConfig, verb: &str) -> Result<RunLock> {
        Self::take(cfg, verb, false)
    }

    fn take(cfg: &SystemConfig, verb: &str, record: bool) -> Result<RunLock> {
        let path = disk_lock_path(&cfg.disk)?;
        let dir = Path::new(crate::mount::RUNTIME_DIR);
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut disk = lock(&path)?;
        fs::create_dir_all(&cfg.state_dir)
            .with_context(|| format!("creating state directory {}", cfg.state_dir.display()))?;
        let state = lock(&cfg.state_dir.join("lock"))?;
        let info = RunInfo {
            pid: std::process::id(),
            verb: verb.to_string(),
            step: "start".to_string(),
            since: crate::state::now(),
            progress: None,
        };
        write_info(&mut disk, &info).with_context(|| format!("writing {}", path.display()))?;
        if let Ok(f) = disk.try_clone() {
            *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some((f, info.clone()));
        }
        if record {
            crate::runlog::started(&cfg.state_dir, &info);
        }
        Ok(RunLock {
            _disk: disk,
            _state: state,
            path,
        })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        CURRENT.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Opens and locks `path` exclusively without waiting.
fn lock(path: &Path) -> Result<Flock<File>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            Err(Held {
                path: path.to_path_buf(),
                holder: parse_info(&text),
            }
            .into())
        }
        Err((_, e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

fn parse_info(text: &str) -> Option<RunInfo> {
    serde_json::from_str(text.trim()).ok()
}

fn write_info(f: &mut File, info: &RunInfo) -> std::io::Result<()> {
    let line = serde_json::to_string(info).unwrap_or_default();
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{line}")
}

/// Notes the step the running process is in, for `status` and for a run
/// that is refused. Does nothing when no lock is held.
pub fn note_step(step: &str) {
    let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((f, info)) = cur.as_mut() {
        info.step = step.to_string();
        info.progress = None;
        let _ = write_info(f, info);
    }
    crate::runlog::note_step(step);
}

/// Notes the byte progress of the current step, for `status`. Does nothing
/// when no lock is held.
pub fn note_progress(done: u64, total: Option<u64>) {
    let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((f, info)) = cur.as_mut() {
        info.progress = Some(StepProgress { done, total });
        let _ = write_info(f, info);
    }
}

/// The lock file for the disk at `disk`: one per block device, or per
/// disk-image file (a loop device counts as its backing file).
pub fn disk_lock_path(disk: &Path) -> Result<PathBuf> {
    let id = disk_id(disk)?;
    Ok(Path::new(crate::mount::RUNTIME_DIR).join(format!("disk-{id}.lock")))
}

fn disk_id(disk: &Path) -> Result<String> {
    let meta = fs::metadata(disk).with_context(|| {
        format!(
            "opening disk {}: check disk.device in the config",
            disk.display()
        )
    })?;
    if meta.file_type().is_block_device() {
        let (major, minor) = (
            nix::sys::stat::major(meta.rdev()),
            nix::sys::stat::minor(meta.rdev()),
        );
        let backing = format!("/sys/dev/block/{major}:{minor}/loop/backing_file");
        if let Ok(file) = fs::read_to_string(backing) {
            if let Ok(m) = fs::metadata(file.trim()) {
                return Ok(format!("file-{}-{}", m.dev(), m.ino()));
            }
        }
        return Ok(format!("dev-{major}-{minor}"));
    }
    Ok(format!("file-{}-{}", meta.dev(), meta.ino()))
}

/// The run in progress on the disk at `disk`, if any: the lock file's info,
/// when a process holds the lock (as `/proc/locks` shows; looking does not
/// take the lock, so it never gets in a starting run's way).
pub fn running(disk: &Path) -> Option<RunInfo> {
    let path = disk_lock_path(disk).ok()?;
    let meta = fs::metadata(&path).ok()?;
    let locks = fs::read_to_string("/proc/locks").ok()?;
    let want = format!(
        "{:02x}:{:02x}:{}",
        nix::sys::stat::major(meta.dev()),
        nix::sys::stat::minor(meta.dev()),
        meta.ino()
    );
    let holder: u32 = locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4).and_then(|p| p.parse().ok()))
            .flatten()
    })?;
    let mut info = parse_info(&fs::read_to_string(&path).ok()?).unwrap_or(RunInfo {
        pid: holder,
        verb: "unknown".into(),
        step: "unknown".into(),
        since: 0,
        progress: None,
    });
    info.pid = holder;
    Some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, disk: &Path, state: &str) -> SystemConfig {
        let text = format!(
            r#"compatible = "c"
state_dir = "{}"
[disk]
device = "{}"
[slots.A]
partlabel = "a"
[slots.B]
partlabel = "b"
[boot]
backend = "grub"
[boot.grub]
envfile = "{}"
[keys]
trusted = []
"#,
            dir.join(state).display(),
            disk.display(),
            dir.join("grubenv").display()
        );
        let p = dir.join(format!("{state}.toml"));
        fs::write(&p, text).unwrap();
        SystemConfig::load(&p).unwrap()
    }

    #[test]
    fn one_disk_one_run_whatever_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        fs::write(&disk, b"x").unwrap();
        let a = config(dir.path(), &disk, "state-a");
        let b = config(dir.path(), &disk, "state-b");
        let first = RunLock::acquire(&a, "install").unwrap();
        note_step("write");
        let err = RunLock::acquire(&b, "mark").err().unwrap();
        let held = err.downcast_ref::<Held>().expect("a Held error");
        let holder = held.holder.as_ref().unwrap();
        assert_eq!(holder.pid, std::process::id());
        assert_eq!(holder.verb, "install");
        assert_eq!(holder.step, "write");
        let msg = format!("{err:#}");
        assert!(msg.contains("install, step write"), "{msg}");
        assert_eq!(crate::report::exit_code(&err), crate::report::EXIT_LOCKED);
        let seen = running(&disk).expect("a run in progress");
        assert_eq!(
            (seen.pid, seen.verb.as_str()),
            (std::process::id(), "install")
        );
        drop(first);
        assert_eq!(running(&disk), None);
        RunLock::acquire(&b, "mark").unwrap();
    }
}
