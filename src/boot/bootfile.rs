//! Files abup rewrites on the boot partition (the GRUB environment block):
//! opened without following any symlink, and rewritten in place so that a
//! bootloader that reads the filesystem without replaying its journal sees
//! the new bytes as soon as abup says they are written.
//!
//! Why in place: GRUB reads ext4 without journal replay. A new file renamed
//! over the old one is durable only through the journal (the directory entry
//! and inode live there until a checkpoint), so after a power cut GRUB still
//! reads the old block. Overwriting the file's existing data block and
//! `fdatasync`ing it changes no metadata GRUB needs: the block is where GRUB
//! already looks, which is what GRUB's own `save_env` relies on. The content
//! is one 1024-byte block; abup's variables sit in its first sector.
//!
//! Why no symlinks: the path is inside a partition anyone with write access
//! to it controls; a link there must not make abup rewrite a file elsewhere.

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path};

/// Opens `path` without following a symlink in any component (the file
/// itself included). `write` opens it read-write. `shown` names the file in
/// errors.
pub fn open_nofollow(path: &Path, write: bool, shown: &str) -> Result<File> {
    let start = if path.is_absolute() { "/" } else { "." };
    let mut dir = File::open(start).with_context(|| format!("opening {start}"))?;
    let comps: Vec<_> = path.components().collect();
    let mut walked = std::path::PathBuf::from(start);
    for (i, comp) in comps.iter().enumerate() {
        let name = match comp {
            Component::RootDir | Component::CurDir => continue,
            Component::Normal(n) => *n,
            Component::ParentDir | Component::Prefix(_) => bail!(
                "{shown}: the path {} contains `..`; give a path without it",
                path.display()
            ),
        };
        walked.push(name);
        let last = i + 1 == comps.len();
        let flags = OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | if last {
                if write {
                    OFlag::O_RDWR
                } else {
                    OFlag::O_RDONLY
                }
            } else {
                OFlag::O_RDONLY | OFlag::O_DIRECTORY
            };
        let fd = match openat(Some(dir.as_raw_fd()), name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ELOOP) | Err(Errno::ENOTDIR) if is_symlink(&walked) => bail!(
                "{shown}: {} is a symlink; abup does not follow symlinks on the boot \
                 partition: replace it with the real file or directory",
                walked.display()
            ),
            Err(e) => {
                return Err(std::io::Error::from(e))
                    .with_context(|| format!("{shown}: opening {}", walked.display()))
            }
        };
        // SAFETY: `fd` was just returned by openat and is owned by no one else.
        dir = unsafe { File::from_raw_fd(fd) };
    }
    let meta = dir
        .metadata()
        .with_context(|| format!("{shown}: reading {}", path.display()))?;
    if !meta.is_file() {
        bail!("{shown}: {} is not a regular file", path.display());
    }
    Ok(dir)
}

fn is_symlink(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
}

/// Overwrites the whole of `file` (opened read-write) with `data`, which
/// must be exactly as long as the file, then flushes it to the disk
/// (`fdatasync`). The file keeps its data blocks; nothing is renamed.
/// `name` is the file's name, for fail points.
pub fn overwrite_in_place(file: &File, name: &str, data: &[u8], shown: &str) -> Result<()> {
    let len = file
        .metadata()
        .with_context(|| format!("{shown}: reading its size"))?
        .len();
    if len != data.len() as u64 {
        bail!(
            "{shown}: is {len} bytes, not {}; nothing was written",
            data.len()
        );
    }
    // Fail points (see crate::failpoint), with F the file name: `write:F`
    // before the write, `fsync:F` between write and flush; during the flip
    // also `flip-before-rename` / `flip-after-rename` (named for the
    // crash matrix: before the new bytes are in the file, and after).
    let flip = crate::signal::flipping();
    let point = |p: &str| crate::failpoint::hit(&format!("{p}:{name}"));
    if flip {
        crate::failpoint::hit("flip-before-rename")?;
    }
    point("write")
        .and_then(|_| file.write_all_at(data, 0))
        .with_context(|| format!("{shown}: writing"))?;
    if flip {
        crate::failpoint::hit("flip-after-rename")?;
    }
    point("fsync")
        .and_then(|_| file.sync_data())
        .with_context(|| format!("{shown}: flushing to disk"))?;
    Ok(())
}

/// Creates `path` (which must not exist) with `data`, without following a
/// symlink at its last component, and flushes it and its directory.
pub fn create_new(path: &Path, data: &[u8], shown: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc_nofollow())
        .open(path)
        .with_context(|| format!("{shown}: creating {}", path.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("{shown}: writing {}", path.display()))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("{shown}: syncing directory {}", dir.display()))?;
    Ok(())
}

fn libc_nofollow() -> i32 {
    OFlag::O_NOFOLLOW.bits()
}
