//! The file operations the boot-files transaction needs, on a mounted
//! filesystem (ext4, or FAT through a FUSE mount) or on an unmounted FAT
//! filesystem through mtools (this kernel may have no vfat driver).
//!
//! Paths are relative to the partition's root, `/`-separated, already
//! checked by [`super::clean_path`]. Every write is durable when the call
//! returns: files and their directories are fsynced on a mount; on FAT
//! through mtools each call is one `mtools` process that has written its
//! changes to the device when it exits, and the device is synced after it.
//!
//! The one operation whose atomicity differs is [`Tree::install`]: on a
//! mount it is a rename over the target (atomic on ext4: the target is old
//! or new at every moment); through mtools it is a copy over the target,
//! which a power cut can tear, so the staged copy stays until the journal
//! is cleared and recovery, which checks every file by its SHA-256, finds
//! and repairs a torn target from the intact copies.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the boot partition's files are reached.
pub enum Tree {
    /// A mounted filesystem.
    Dir(PathBuf),
    /// An unmounted FAT filesystem on this device, through mtools.
    Fat(PathBuf),
}

/// Hex SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

impl Tree {
    /// Whether replacing a file by rename is crash-atomic here.
    pub fn atomic_rename(&self) -> bool {
        matches!(self, Tree::Dir(_))
    }

    fn path(&self, rel: &str) -> PathBuf {
        match self {
            Tree::Dir(d) => d.join(rel),
            Tree::Fat(_) => PathBuf::from(format!("::/{rel}")),
        }
    }

    /// Names `rel` in messages.
    pub fn show(&self, rel: &str) -> String {
        match self {
            Tree::Dir(d) => d.join(rel).display().to_string(),
            Tree::Fat(dev) => format!("{rel} on {}", dev.display()),
        }
    }

    /// Runs one mtools command on the device; Err(NotFound) when mtools
    /// says the file is not there.
    fn mtools(&self, tool: &str, args: &[&str]) -> std::result::Result<Vec<u8>, MtoolsError> {
        let Tree::Fat(dev) = self else {
            unreachable!("mtools is only used on unmounted FAT")
        };
        let mut cmd = Command::new(tool);
        cmd.env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(dev)
            .args(args);
        // A killed abup takes its mtools with it, as a power cut would:
        // no orphan keeps writing while the next run recovers.
        crate::util::die_with_abup(&mut cmd);
        let out = cmd
            .output()
            .map_err(|e| MtoolsError::Other(format!("starting {tool} (install mtools): {e}")))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if err.contains("not found") {
            return Err(MtoolsError::NotFound);
        }
        Err(MtoolsError::Other(format!(
            "{tool} {}: {err}",
            args.join(" ")
        )))
    }

    /// The file's bytes, or None when it does not exist.
    pub fn read(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        match self {
            Tree::Dir(_) => match fs::read(self.path(rel)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("reading {}", self.show(rel))),
            },
            Tree::Fat(_) => match self.mtools("mcopy", &[&format!("::/{rel}"), "-"]) {
                Ok(b) => Ok(Some(b)),
                Err(MtoolsError::NotFound) => Ok(None),
                Err(MtoolsError::Other(e)) => bail!("reading {}: {e}", self.show(rel)),
            },
        }
    }

    /// The file's SHA-256, or None when it does not exist.
    pub fn hash(&self, rel: &str) -> Result<Option<String>> {
        Ok(self.read(rel)?.map(|b| sha256(&b)))
    }

    /// Creates the directories above `rel`.
    fn parents(&self, rel: &str) -> Result<()> {
        let Some((dir, _)) = rel.rsplit_once('/') else {
            return Ok(());
        };
        match self {
            Tree::Dir(d) => {
                let mut at = d.clone();
                for c in dir.split('/') {
                    at.push(c);
                    match fs::create_dir(&at) {
                        Ok(()) => sync_dir(at.parent().unwrap_or(d))?,
                        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                        Err(e) => {
                            return Err(e).with_context(|| format!("creating {}", at.display()))
                        }
                    }
                }
                Ok(())
            }
            Tree::Fat(_) => {
                let mut at = String::new();
                for c in dir.split('/') {
                    at = if at.is_empty() {
                        c.to_string()
                    } else {
                        format!("{at}/{c}")
                    };
                    if self.mtools("mdir", &["-b", &format!("::/{at}")]).is_err() {
                        self.mtools("mmd", &[&format!("::/{at}")])
                            .map_err(|e| anyhow::anyhow!("creating {}: {e}", self.show(&at)))?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Writes `data` as `rel` (created or replaced), durably.
    pub fn write(&self, rel: &str, data: &[u8]) -> Result<()> {
        self.parents(rel)?;
        let show = || format!("writing {}", self.show(rel));
        match self {
            Tree::Dir(_) => {
                let path = self.path(rel);
                let mut f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .mode(0o644)
                    .open(&path)
                    .with_context(show)?;
                f.write_all(data).with_context(show)?;
                f.sync_all().with_context(show)?;
                sync_dir(path.parent().unwrap_or(Path::new("/")))
            }
            Tree::Fat(_) => {
                let mut tmp =
                    tempfile::NamedTempFile::new().context("creating a temporary file")?;
                tmp.write_all(data)
                    .and_then(|()| tmp.flush())
                    .context("writing a temporary file")?;
                let src = tmp.path().to_string_lossy().into_owned();
                self.mtools("mcopy", &["-o", "-D", "o", &src, &format!("::/{rel}")])
                    .map_err(|e| anyhow::anyhow!("{}: {e}", show()))?;
                self.sync()
            }
        }
    }

    /// Makes `to` hold what `from` holds: a rename on a mount (`from` is
    /// gone after), a copy through mtools (`from` stays).
    pub fn install(&self, from: &str, to: &str) -> Result<()> {
        match self {
            Tree::Dir(_) => {
                let (a, b) = (self.path(from), self.path(to));
                fs::rename(&a, &b)
                    .with_context(|| format!("renaming {} to {}", a.display(), b.display()))?;
                sync_dir(b.parent().unwrap_or(Path::new("/")))
            }
            Tree::Fat(_) => {
                let data = self
                    .read(from)?
                    .with_context(|| format!("{} is missing", self.show(from)))?;
                self.write(to, &data)
            }
        }
    }

    /// Makes `to` a copy of `from` (a hard link where the filesystem has
    /// them: no space, and the old file cannot be changed by later steps).
    pub fn keep(&self, from: &str, to: &str) -> Result<()> {
        if let Tree::Dir(_) = self {
            self.parents(to)?;
            let (a, b) = (self.path(from), self.path(to));
            self.remove(to)?;
            if fs::hard_link(&a, &b).is_ok() {
                return sync_dir(b.parent().unwrap_or(Path::new("/")));
            }
        }
        let data = self
            .read(from)?
            .with_context(|| format!("{} is missing", self.show(from)))?;
        self.write(to, &data)
    }

    /// Removes the file `rel`, if it exists.
    pub fn remove(&self, rel: &str) -> Result<()> {
        match self {
            Tree::Dir(_) => {
                let path = self.path(rel);
                match fs::remove_file(&path) {
                    Ok(()) => sync_dir(path.parent().unwrap_or(Path::new("/"))),
                    Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
                }
            }
            Tree::Fat(_) => match self.mtools("mdel", &[&format!("::/{rel}")]) {
                Ok(_) => self.sync(),
                Err(MtoolsError::NotFound) => Ok(()),
                Err(MtoolsError::Other(e)) => bail!("removing {}: {e}", self.show(rel)),
            },
        }
    }

    /// Removes the directory `rel` and everything in it, if it exists.
    pub fn remove_tree(&self, rel: &str) -> Result<()> {
        match self {
            Tree::Dir(d) => {
                let path = self.path(rel);
                match fs::remove_dir_all(&path) {
                    Ok(()) => sync_dir(d),
                    Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
                }
            }
            Tree::Fat(_) => {
                if self.mtools("mdir", &["-b", &format!("::/{rel}")]).is_err() {
                    return Ok(());
                }
                match self.mtools("mdeltree", &[&format!("::/{rel}")]) {
                    Ok(_) => self.sync(),
                    Err(MtoolsError::NotFound) => Ok(()),
                    Err(MtoolsError::Other(e)) => bail!("removing {}: {e}", self.show(rel)),
                }
            }
        }
    }

    /// Every file on the partition, by relative path.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        match self {
            Tree::Dir(d) => walk(d, d, &mut out)?,
            Tree::Fat(dev) => {
                let text = self
                    .mtools("mdir", &["-/", "-b", "::/"])
                    .map_err(|e| anyhow::anyhow!("listing {}: {e}", dev.display()))?;
                for line in String::from_utf8_lossy(&text).lines() {
                    match line.strip_prefix("::/") {
                        Some(rel) if !rel.is_empty() && !rel.ends_with('/') => {
                            out.push(rel.to_string())
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(out)
    }

    /// Free bytes, and the allocation unit files are rounded up to.
    pub fn free_space(&self) -> Result<(u64, u64)> {
        match self {
            Tree::Dir(d) => {
                let st = nix::sys::statvfs::statvfs(d.as_path())
                    .with_context(|| format!("reading the free space of {}", d.display()))?;
                let unit = st.fragment_size().max(512);
                Ok((st.blocks_available() * unit, unit))
            }
            Tree::Fat(dev) => {
                let out = self.mtools("mdir", &["::/"]).map_err(|e| {
                    anyhow::anyhow!("reading the free space of {}: {e}", dev.display())
                })?;
                let text = String::from_utf8_lossy(&out);
                let line = text
                    .lines()
                    .find(|l| l.contains("bytes free"))
                    .with_context(|| format!("mdir printed no free space for {}", dev.display()))?;
                let free: String = line
                    .split("bytes free")
                    .next()
                    .unwrap_or("")
                    .chars()
                    .filter(char::is_ascii_digit)
                    .collect();
                let free = free
                    .parse()
                    .with_context(|| format!("mdir printed {line:?} for {}", dev.display()))?;
                Ok((free, crate::bootpart::fat_cluster_bytes(dev)?))
            }
        }
    }

    /// Makes the partition's on-disk state what a bootloader reads: on a
    /// mount, a freeze and thaw (FIFREEZE/FITHAW, as `fsfreeze` does)
    /// checkpoints the ext4 journal, which GRUB and U-Boot do not replay;
    /// filesystems that cannot freeze are synced instead.
    pub fn checkpoint(&self) -> Result<()> {
        let Tree::Dir(d) = self else {
            return self.sync();
        };
        use std::os::fd::AsRawFd;
        const FIFREEZE: nix::libc::c_ulong = 0xc004_5877;
        const FITHAW: nix::libc::c_ulong = 0xc004_5878;
        let dir = File::open(d).with_context(|| format!("opening {}", d.display()))?;
        let fd = dir.as_raw_fd();
        // SAFETY: both ioctls take an int argument that the kernel ignores.
        if unsafe { nix::libc::ioctl(fd, FIFREEZE as _, 0) } != 0 {
            return nix::unistd::syncfs(fd)
                .with_context(|| format!("syncing the filesystem at {}", d.display()));
        }
        // Thawing can only fail if the filesystem was not frozen; try twice.
        for _ in 0..2 {
            // SAFETY: as above.
            if unsafe { nix::libc::ioctl(fd, FITHAW as _, 0) } == 0 {
                return Ok(());
            }
        }
        bail!(
            "thawing the filesystem at {} after its checkpoint: {}; run `fsfreeze -u {}`",
            d.display(),
            std::io::Error::last_os_error(),
            d.display()
        )
    }

    /// Flushes the device (mtools writes through the page cache).
    fn sync(&self) -> Result<()> {
        if let Tree::Fat(dev) = self {
            File::open(dev)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {}", dev.display()))?;
        }
        Ok(())
    }
}

enum MtoolsError {
    NotFound,
    Other(String),
}

impl std::fmt::Display for MtoolsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MtoolsError::NotFound => f.write_str("not found"),
            MtoolsError::Other(s) => f.write_str(s),
        }
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

/// fsyncs a directory, so the names in it are durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}
