//! The EFI system partition as the systemd-boot backend needs it: list a
//! directory, read a small file, rename a file. Nothing else: abup never
//! creates, rewrites or deletes a file on the ESP.
//!
//! The ESP is FAT. On a running device it is mounted (by the kernel, or a
//! FUSE driver such as `fusefat`), and abup works through the mount. In a
//! rescue system or on an image it is not, and this kernel may not be able
//! to mount FAT at all, so abup works on the partition itself with mtools
//! (`mdir`, `mcopy`, `mren`), never both at once: a partition the kernel
//! has mounted, or a FUSE mount naming the device as its source
//! (`-o fsname=/dev/…`), is always used through its mount.
//!
//! Why renames only: a rename within one directory is the one change FAT
//! makes in a single directory-entry update (long name and short name sit
//! in the same directory cluster), and it is how systemd-boot itself counts
//! tries. Its crash windows are stated in `boot-backends/systemd-boot/README.md`.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the ESP's files are reached.
pub enum Esp {
    /// Through a mount (or any directory holding the ESP's files).
    Mounted { dir: PathBuf, shown: String },
    /// On the unmounted FAT partition `dev`, through mtools.
    Fat { dev: PathBuf, shown: String },
}

impl Esp {
    /// Names the ESP in messages.
    pub fn describe(&self) -> &str {
        match self {
            Esp::Mounted { shown, .. } | Esp::Fat { shown, .. } => shown,
        }
    }

    /// The names of the regular files in directory `rel` (relative to the
    /// ESP's root), or None when the directory does not exist.
    pub fn list(&self, rel: &str) -> Result<Option<Vec<String>>> {
        match self {
            Esp::Mounted { dir, .. } => {
                let path = dir.join(rel);
                let rd = match std::fs::read_dir(&path) {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e).with_context(|| format!("listing {}", path.display())),
                };
                let mut names = Vec::new();
                for e in rd {
                    let e = e.with_context(|| format!("listing {}", path.display()))?;
                    if e.file_type().is_ok_and(|t| t.is_file()) {
                        names.push(e.file_name().to_string_lossy().into_owned());
                    }
                }
                names.sort();
                Ok(Some(names))
            }
            Esp::Fat { dev, shown } => {
                let what = format!("listing {rel} on {shown}");
                let Some(stdout) =
                    mtools_output(&what, "mdir", dev, &["-b", &format!("::/{rel}")])?
                else {
                    return Ok(None);
                };
                let prefix = format!("::/{rel}/");
                let mut names: Vec<String> = String::from_utf8_lossy(&stdout)
                    .lines()
                    .filter_map(|l| l.strip_prefix(&prefix))
                    .filter(|n| !n.is_empty() && !n.ends_with('/'))
                    .map(str::to_string)
                    .collect();
                names.sort();
                Ok(Some(names))
            }
        }
    }

    /// The bytes of file `rel`, or None when it does not exist.
    pub fn read(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        match self {
            Esp::Mounted { dir, .. } => {
                let path = dir.join(rel);
                match std::fs::read(&path) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
                }
            }
            Esp::Fat { dev, shown } => {
                let what = format!("reading {rel} on {shown}");
                mtools_output(&what, "mcopy", dev, &["-n", &format!("::/{rel}"), "-"])
            }
        }
    }

    /// Whether file `rel` exists (as systemd-boot checks an entry's kernel).
    pub fn exists(&self, rel: &str) -> Result<bool> {
        match self {
            Esp::Mounted { dir, .. } => Ok(dir.join(rel).is_file()),
            Esp::Fat { dev, shown } => {
                let out = mtools("mdir", dev)
                    .args(["-b", &format!("::/{rel}")])
                    .output()
                    .with_context(|| format!("looking for {rel} on {shown}: starting mdir"))?;
                Ok(out.status.success()
                    && String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .any(|l| !l.ends_with('/')))
            }
        }
    }

    /// Renames `dir/from` to `dir/to` (which must not exist) and flushes
    /// the change to the disk.
    pub fn rename(&self, dir: &str, from: &str, to: &str) -> Result<()> {
        let what = format!("renaming {dir}/{from} to {to} on {}", self.describe());
        // Fail points: `esp-rename:NEW` before any rename; during the flip
        // also `flip-before-rename` and `flip-after-rename` (the crash
        // matrix's names: before the new name exists, and after, before it
        // is flushed).
        let flip = crate::signal::flipping();
        let point = |p: &str| crate::failpoint::hit(p).with_context(|| what.clone());
        point(&format!("esp-rename:{to}"))?;
        if flip {
            point("flip-before-rename")?;
        }
        match self {
            Esp::Mounted { dir: root, .. } => {
                let d = root.join(dir);
                let (old, new) = (d.join(from), d.join(to));
                // FAT names compare without case: `to` may differ from
                // `from` only in case, which is no clash.
                if new.exists() && !from.eq_ignore_ascii_case(to) {
                    bail!("{what}: {} exists already", new.display());
                }
                let renamed = std::fs::rename(&old, &new).map_err(|e| {
                    let hint = if e.raw_os_error() == Some(nix::libc::ENOSPC) {
                        "the ESP is full: free space on it and retry"
                    } else {
                        "check that the ESP is mounted writable and has free space (a FAT \
                         directory grows by a cluster when it fills up)"
                    };
                    anyhow::anyhow!("{what}: {e}; {hint}")
                });
                renamed?;
                if flip {
                    point("flip-after-rename")?;
                }
                // Flush: the directory (kernel FAT), else the filesystem
                // (FUSE drivers may not implement fsync on directories).
                let dirf =
                    File::open(&d).with_context(|| format!("{what}: opening {}", d.display()))?;
                if dirf.sync_all().is_err() {
                    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dirf))
                        .with_context(|| format!("{what}: syncing the ESP"))?;
                }
                Ok(())
            }
            Esp::Fat { dev, .. } => {
                let out = mtools("mren", dev)
                    .args([format!("::/{dir}/{from}"), format!("::/{dir}/{to}")])
                    .stdin(std::process::Stdio::null())
                    .output()
                    .with_context(|| format!("{what}: starting mren (install mtools)"))?;
                if !out.status.success() {
                    let err = quiet(&String::from_utf8_lossy(&out.stderr));
                    if err.contains("Disk full") {
                        bail!("{what}: mren: {err}; the ESP is full: free space on it and retry");
                    }
                    bail!("{what}: mren failed: {err}");
                }
                if flip {
                    point("flip-after-rename")?;
                }
                File::open(dev)
                    .and_then(|f| f.sync_all())
                    .with_context(|| format!("{what}: flushing {}", dev.display()))
            }
        }
    }
}

/// An mtools command on `dev`, without its checks of the partition's
/// geometry (a partition device or loop device has none).
fn mtools(tool: &str, dev: &Path) -> Command {
    let mut c = Command::new(tool);
    c.env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(dev);
    c
}

/// The stdout of an mtools command that reads, or None when it says the
/// file or directory is not there.
fn mtools_output(what: &str, tool: &str, dev: &Path, args: &[&str]) -> Result<Option<Vec<u8>>> {
    let out = mtools(tool, dev)
        .args(args)
        .output()
        .with_context(|| format!("{what}: starting {tool} (install mtools)"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("not found") {
            return Ok(None);
        }
        bail!("{what}: {tool} failed: {}", quiet(&err));
    }
    Ok(Some(out.stdout))
}

/// mtools' stderr without its harmless geometry notices.
fn quiet(stderr: &str) -> String {
    stderr
        .replace(
            "Could not get geometry of device (Inappropriate ioctl for device)",
            "",
        )
        .trim()
        .to_string()
}

/// The mount point of a FUSE filesystem whose source is one of `devs`
/// (FUSE mounts carry no device number, so [`crate::mount::mount_point_of`]
/// cannot see them; a FUSE driver names its device only through `-o
/// fsname=`).
pub fn fuse_mount_of(devs: &[PathBuf]) -> Result<Option<PathBuf>> {
    let want: Vec<PathBuf> = devs
        .iter()
        .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()))
        .collect();
    Ok(crate::mount::host_mounts()?
        .into_iter()
        .find(|m| {
            m.fstype.starts_with("fuse")
                && std::fs::canonicalize(&m.source).is_ok_and(|p| want.contains(&p))
        })
        .map(|m| m.mount_point))
}
