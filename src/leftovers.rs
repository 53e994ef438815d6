//! Leftovers of an older abup run, cleaned up at the start of the next one.
//!
//! abup versions before the private mount namespace (see [`crate::mount`])
//! mounted slots and the boot partition under `/tmp/abup-mount-*`, visible
//! system-wide, over loop devices attached without autoclear: a killed run
//! left both behind, and the next install refused to touch the mounted slot
//! until a person unmounted it. A run holding the disk lock
//! ([`crate::lock`]) calls [`clean`] before it opens the disk:
//!
//! - mounts in the namespace abup was started in, at `/tmp/abup-mount-*` or
//!   at `/run/abup/mnt-<pid>/…` of a process that is gone, whose device
//!   reaches the configured disk's bytes, are unmounted (lazily if busy),
//!   there and in abup's own namespace (a copy of every mount that existed
//!   when it was made), and their directories removed;
//! - loop devices over the configured disk covering exactly one of its
//!   partitions, as abup attached them, are detached, but only when nobody
//!   uses them: not self-clearing, no partitions or holders, not mounted or
//!   claimed anywhere (an exclusive open succeeds), open in no process, and
//!   backing no other loop device. A loop device someone uses is never
//!   touched.
//!
//! Cleaning is best effort: what it could not clean is reported, and the
//! install's own checks then refuse a slot that is still mounted.

use crate::disk::Disk;
use crate::mount::{self, MountInfo};
use crate::util;
use nix::mount::MntFlags;
use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Cleans the leftovers of earlier runs on `disk` (see the module docs) and
/// says what it did, one line per mount or loop device. A disk that cannot
/// be opened is left to the caller to report.
pub fn clean(disk: &Path) -> Vec<String> {
    let Ok(disk) = Disk::open(disk) else {
        return Vec::new();
    };
    let mut notes = Vec::new();
    clean_mounts(&disk, &mut notes);
    clean_loops(&disk, &mut notes);
    notes
}

fn clean_mounts(disk: &Disk, notes: &mut Vec<String>) {
    let devs: Vec<u64> = disk
        .alias_devices()
        .iter()
        .filter_map(|d| fs::metadata(d).ok())
        .filter(|m| m.file_type().is_block_device())
        .map(|m| m.rdev())
        .collect();
    let Ok(mounts) = mount::host_mounts() else {
        return;
    };
    for m in mounts.iter().rev() {
        let dev = nix::sys::stat::makedev(m.major, m.minor);
        if !devs.contains(&dev) || !is_leftover_dir(&m.mount_point) {
            continue;
        }
        notes.push(match unmount(m) {
            Ok(how) => format!(
                "{how} {} from {}, left by an earlier run",
                m.source,
                m.mount_point.display()
            ),
            Err(e) => format!("could not clean up a mount left by an earlier run: {e:#}"),
        });
    }
}

/// Whether `dir` is a mount point only a gone abup process could have made.
fn is_leftover_dir(dir: &Path) -> bool {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if dir.parent() == Some(Path::new("/tmp")) && name.starts_with("abup-mount-") {
        return true;
    }
    let Ok(rest) = dir.strip_prefix(mount::RUNTIME_DIR) else {
        return false;
    };
    let Some(pid) = rest
        .iter()
        .next()
        .and_then(|c| c.to_str())
        .and_then(|c| c.strip_prefix("mnt-"))
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return false;
    };
    !mount::pid_alive(pid)
}

/// Unmounts `m` in the namespace abup was started in and in its own, and
/// removes the mount point; returns how ("unmounted" or "lazily detached").
fn unmount(m: &MountInfo) -> anyhow::Result<&'static str> {
    let dir = &m.mount_point;
    let step = format!("unmounting {} from {}", m.source, dir.display());
    let how = if mount::host_namespace().is_some() {
        // abup's namespace was copied from the system's: drop the copy, so
        // that it keeps neither the filesystem nor its device busy.
        let _ = nix::mount::umount2(dir, MntFlags::MNT_DETACH);
        if util::run(&step, in_host_namespace(Command::new("umount").arg(dir))).is_ok() {
            "unmounted"
        } else {
            util::run(
                &step,
                in_host_namespace(Command::new("umount").arg("--lazy").arg(dir)),
            )?;
            "lazily detached"
        }
    } else if nix::mount::umount2(dir, MntFlags::empty()).is_ok() {
        "unmounted"
    } else {
        nix::mount::umount2(dir, MntFlags::MNT_DETACH)
            .map_err(|e| anyhow::anyhow!("{step}: {e}"))?;
        "lazily detached"
    };
    // Plain rmdir: never a recursive delete near a filesystem.
    let _ = fs::remove_dir(dir);
    if let Some(parent) = dir.parent().filter(|p| p.starts_with(mount::RUNTIME_DIR)) {
        let _ = fs::remove_dir(parent);
    }
    Ok(how)
}

/// Makes `cmd` run in the mount namespace abup was started in.
fn in_host_namespace(cmd: &mut Command) -> &mut Command {
    if let Some(ns) = mount::host_namespace() {
        let fd = ns.as_raw_fd();
        // SAFETY: between fork and exec only setns(2) is called, which is
        // async-signal-safe; the fd stays open until exec.
        unsafe {
            cmd.pre_exec(move || {
                if nix::libc::setns(fd, nix::libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
    }
    cmd
}

fn clean_loops(disk: &Disk, notes: &mut Vec<String>) {
    let Ok(canon) = fs::canonicalize(&disk.path) else {
        return;
    };
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return;
    };
    let read = |p: PathBuf| fs::read_to_string(p).map(|s| s.trim().to_string());
    let num = |p: PathBuf| read(p).ok().and_then(|s| s.parse::<u64>().ok());
    let loops: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let backing = read(e.path().join("loop/backing_file")).ok()?;
            Some((name, PathBuf::from(backing)))
        })
        .collect();
    for (name, backing) in &loops {
        if backing != &canon {
            continue;
        }
        let sys = Path::new("/sys/block").join(name);
        let node = Path::new("/dev").join(name);
        let range = (
            num(sys.join("loop/offset")),
            num(sys.join("loop/sizelimit")),
        );
        let Some(part) = disk
            .partitions
            .iter()
            .find(|p| range == (Some(p.start), Some(p.size)))
        else {
            continue;
        };
        let in_use = read(sys.join("loop/autoclear")).is_ok_and(|a| a == "1")
            || has_entries(&sys.join("holders"))
            || fs::read_dir(&sys)
                .into_iter()
                .flatten()
                .flatten()
                .any(|c| c.path().join("partition").exists())
            || loops.iter().any(|(_, b)| b == &node);
        if in_use {
            continue;
        }
        // An exclusive open fails while the device is mounted (in any
        // namespace) or claimed, and keeps it from being mounted meanwhile.
        let Ok(probe) = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_EXCL)
            .open(&node)
        else {
            continue;
        };
        let Ok(rdev) = probe.metadata().map(|m| m.rdev()) else {
            continue;
        };
        if open_elsewhere(rdev, probe.as_raw_fd()) {
            continue;
        }
        // SAFETY: LOOP_CLR_FD takes no argument.
        let cleared = unsafe { mount::loop_clr_fd(probe.as_raw_fd()) };
        notes.push(match cleared {
            Ok(_) => format!(
                "detached {} (partition {} of {}), left by an earlier run",
                node.display(),
                part.number,
                disk.path.display()
            ),
            Err(e) => format!(
                "could not detach {}, left by an earlier run: {e}",
                node.display()
            ),
        });
    }
}

fn has_entries(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// Whether any process other than this one's `own_fd` has the block
/// device `rdev` open.
fn open_elsewhere(rdev: u64, own_fd: i32) -> bool {
    let me = std::process::id().to_string();
    let Ok(procs) = fs::read_dir("/proc") else {
        return true;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if pid == me && fd.file_name().to_string_lossy() == own_fd.to_string() {
                continue;
            }
            let Ok(meta) = fs::metadata(fd.path()) else {
                continue;
            };
            if meta.file_type().is_block_device() && meta.rdev() == rdev {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_mount_points() {
        assert!(is_leftover_dir(Path::new("/tmp/abup-mount-x1Yz")));
        assert!(!is_leftover_dir(Path::new("/tmp/abup-mount-x/sub")));
        assert!(!is_leftover_dir(Path::new("/tmp/other")));
        assert!(!is_leftover_dir(Path::new("/mnt/abup-mount-x")));
        // pid 0 is never a process; our own directory is never a leftover.
        assert!(is_leftover_dir(Path::new("/run/abup/mnt-0/m-abc")));
        let own = format!("/run/abup/mnt-{}/m-abc", std::process::id());
        assert!(!is_leftover_dir(Path::new(&own)));
        assert!(!is_leftover_dir(Path::new("/run/abup/disk-1.lock")));
    }
}
