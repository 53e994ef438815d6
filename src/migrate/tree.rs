//! Contained access to a directory tree (the old root or the new root): every
//! path is resolved component by component from a directory handle, and no
//! symlink is ever followed out of the tree.
//!
//! Why not plain paths: the new root is an image anyone could have built and
//! the old root a device's files; `etc -> /somewhere` in either must never
//! make abup read or create anything outside. So:
//! - directories are walked with `openat(O_NOFOLLOW)`, missing ones created
//!   with `mkdirat` on the handle of their (already contained) parent;
//! - a symlink met on the way is interpreted as it would be inside the tree
//!   (an absolute target starts at the tree's root) and opened with
//!   `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`; a target that climbs
//!   above the root with `..`, or that does not exist inside the tree, is
//!   refused — never followed, never created;
//! - files are created beside their final name and renamed into place.

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, readlinkat, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// An open directory tree: the handle every path inside it is resolved from.
pub struct Tree {
    fd: OwnedFd,
    /// The tree's real path (for turning handles back into paths).
    real: PathBuf,
    /// "old root" or "new root", for messages.
    pub what: &'static str,
}

/// What a name in a directory is, without following it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Device nodes and FIFOs (copied with mknod).
    Node,
    Socket,
}

pub fn kind_of(st: &FileStat) -> Kind {
    match SFlag::from_bits_truncate(st.st_mode & libc::S_IFMT) {
        SFlag::S_IFREG => Kind::File,
        SFlag::S_IFDIR => Kind::Dir,
        SFlag::S_IFLNK => Kind::Symlink,
        SFlag::S_IFSOCK => Kind::Socket,
        _ => Kind::Node,
    }
}

/// Opens `name` in `dir` as a directory, without following a symlink.
pub fn open_dir_at(dir: RawFd, name: &OsStr) -> nix::Result<OwnedFd> {
    let fd = openat(
        Some(dir),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Stats `name` in `dir` without following it; `None` when it does not exist.
pub fn lstat_at(dir: RawFd, name: &OsStr) -> nix::Result<Option<FileStat>> {
    match fstatat(Some(dir), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The names in directory `dir` (without `.` and `..`), sorted.
pub fn list(dir: RawFd) -> nix::Result<Vec<OsString>> {
    let mut d = nix::dir::Dir::openat(
        Some(dir),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for e in d.iter() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Removes `name` in `dir` and, for a directory, everything below it, never
/// following a symlink.
pub fn remove_at(dir: RawFd, name: &OsStr) -> nix::Result<()> {
    match lstat_at(dir, name)? {
        None => Ok(()),
        Some(st) if kind_of(&st) == Kind::Dir => {
            let sub = open_dir_at(dir, name)?;
            for child in list(sub.as_raw_fd())? {
                remove_at(sub.as_raw_fd(), &child)?;
            }
            unlinkat(Some(dir), name, UnlinkatFlags::RemoveDir)
        }
        Some(_) => unlinkat(Some(dir), name, UnlinkatFlags::NoRemoveDir),
    }
}

/// Splits an absolute or relative path into its names; refuses `..`.
pub fn names(path: &Path) -> Result<Vec<&OsStr>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            _ => bail!("{} must not contain '..'", path.display()),
        }
    }
    Ok(out)
}

impl Tree {
    /// Opens the tree rooted at `path`.
    pub fn open(path: &Path, what: &'static str) -> Result<Tree> {
        let real = std::fs::canonicalize(path)
            .with_context(|| format!("resolving the {what} {}", path.display()))?;
        let fd = nix::fcntl::open(
            &real,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening the {what} {}", real.display()))?;
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Tree { fd, real, what })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The directory `name` of this tree (a real directory, never followed
    /// through a symlink) as a tree of its own.
    pub fn subtree(&self, name: &OsStr, what: &'static str) -> Result<Tree> {
        let real = self.real.join(name);
        let fd = open_dir_at(self.fd(), name)
            .with_context(|| format!("opening the {what} {}", real.display()))?;
        Ok(Tree { fd, real, what })
    }

    /// The tree's path on the host.
    pub fn path(&self) -> &Path {
        &self.real
    }

    /// Where handle `fd` sits inside the tree (e.g. `etc/ssh`).
    pub fn inner_path(&self, fd: RawFd) -> Result<PathBuf> {
        let at = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .context("reading /proc/self/fd (is /proc mounted?)")?;
        match at.strip_prefix(&self.real) {
            Ok(p) => Ok(p.to_path_buf()),
            Err(_) => bail!(
                "{} resolved outside the {} (to {})",
                self.what,
                self.what,
                at.display()
            ),
        }
    }

    /// Opens directory `rel` of the tree. Missing directories are created
    /// (root-owned, 0755) when `create` is set, else `None` is returned.
    pub fn dir(&self, rel: &Path, create: bool) -> Result<Option<OwnedFd>> {
        let dup = nix::unistd::dup(self.fd()).context("duplicating a descriptor")?;
        // SAFETY: dup returned a fresh descriptor.
        let mut cur = unsafe { OwnedFd::from_raw_fd(dup) };
        let mut shown = PathBuf::from("/");
        for name in names(rel)? {
            shown.push(name);
            let st = lstat_at(cur.as_raw_fd(), name)
                .with_context(|| format!("reading {} in the {}", shown.display(), self.what))?;
            let next = match st.map(|s| kind_of(&s)) {
                None if create => {
                    mkdirat(Some(cur.as_raw_fd()), name, Mode::from_bits_truncate(0o755))
                        .with_context(|| {
                            format!("creating {} in the {}", shown.display(), self.what)
                        })?;
                    open_dir_at(cur.as_raw_fd(), name)
                }
                None => return Ok(None),
                Some(Kind::Dir) => open_dir_at(cur.as_raw_fd(), name),
                Some(Kind::Symlink) => {
                    let target = self.follow(cur.as_raw_fd(), name, &shown, true)?;
                    openat(
                        Some(target.as_raw_fd()),
                        ".",
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    // SAFETY: a fresh descriptor.
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
                }
                Some(_) => bail!(
                    "{} in the {} is not a directory; fix the image or the rule",
                    shown.display(),
                    self.what
                ),
            }
            .with_context(|| format!("opening {} in the {}", shown.display(), self.what))?;
            cur = next;
        }
        Ok(Some(cur))
    }

    /// Follows the symlink `name` in directory `parent` (shown to the user as
    /// `shown`) inside the tree, and returns an `O_PATH` handle of its
    /// target. Refuses a target that climbs out of the tree or that does not
    /// exist inside it.
    pub fn follow(
        &self,
        parent: RawFd,
        name: &OsStr,
        shown: &Path,
        want_dir: bool,
    ) -> Result<OwnedFd> {
        let target = PathBuf::from(
            readlinkat(Some(parent), name)
                .with_context(|| format!("reading symlink {}", shown.display()))?,
        );
        let base = if target.is_absolute() {
            PathBuf::new()
        } else {
            self.inner_path(parent)?
        };
        let mut inside = Vec::new();
        for c in base.join(&target).components() {
            match c {
                Component::Normal(n) => inside.push(n.to_os_string()),
                Component::ParentDir if inside.pop().is_none() => {
                    bail!(
                        "{} in the {} is a symlink to {}, which leads outside the {}; abup never follows it: fix the image or the preserve rule",
                        shown.display(),
                        self.what,
                        target.display(),
                        self.what
                    );
                }
                _ => {}
            }
        }
        let rel: PathBuf = inside.iter().collect();
        let rel = if rel.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            rel
        };
        let mut flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
        if want_dir {
            flags |= OFlag::O_DIRECTORY;
        }
        let how = OpenHow::new()
            .flags(flags)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        match openat2(self.fd(), &rel, how) {
            // SAFETY: a fresh descriptor.
            Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            Err(Errno::ENOENT) => bail!(
                "{} in the {} is a symlink to {}, which does not exist inside the {}; abup never follows it out: fix the image, the device or the preserve rule",
                shown.display(),
                self.what,
                target.display(),
                self.what
            ),
            Err(Errno::ENOTDIR) => bail!(
                "{} in the {} is a symlink to {}, which is not a directory",
                shown.display(),
                self.what,
                target.display()
            ),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "following symlink {} in the {}",
                    shown.display(),
                    self.what
                )
            }),
        }
    }
}

/// Reopens an `O_PATH` handle for reading (a directory or a regular file).
pub fn reopen(fd: RawFd, st: &FileStat) -> nix::Result<OwnedFd> {
    let mut flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
    if kind_of(st) == Kind::Dir {
        flags |= OFlag::O_DIRECTORY;
    }
    let fd = nix::fcntl::open(format!("/proc/self/fd/{fd}").as_str(), flags, Mode::empty())?;
    // SAFETY: a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let again = fstat(fd.as_raw_fd())?;
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
        return Err(Errno::ESTALE);
    }
    Ok(fd)
}
