//! Tar writer: a root filesystem as a tar stream, extracted onto a freshly
//! formatted ext4 slot.
//!
//! The stream is read with [`super::pax::TarReader`], which applies PAX,
//! GNU long-name and sparse headers itself (the `tar` crate's PAX parser
//! splits records at newlines and loses multi-line ACL text and binary xattr
//! values). Every entry is then checked by [`check_entry`]: first against
//! the archive alone ([`plan`]), then against what the earlier entries made
//! ([`super::tree::Tree`], the new root's namespace kept in memory). The
//! validation pass [`validate`], which `bundle create` runs, is the same
//! checks without a target, so a bundle that would be refused at install is
//! refused when it is made.
//!
//! Containment, by construction and then by the kernel:
//!
//! - paths are relative; absolute paths and `..` are refused, naming the
//!   entry; missing parent directories are created (0755); a symlink on the
//!   way is followed (in memory) only if it stays inside the root;
//! - every object is made with the `*at` calls relative to a directory fd
//!   opened one component at a time with `O_NOFOLLOW`, so the kernel refuses
//!   rather than follows a symlink the namespace did not expect; files are
//!   created `O_EXCL | O_NOFOLLOW`, and an earlier non-directory in the way
//!   is unlinked first, so nothing is ever written through a symlink or an
//!   earlier hard link;
//! - regular files get their data (holes kept for sparse files), then owner,
//!   mode (after the owner: chown clears setuid), xattrs (after the owner:
//!   chown clears `security.capability`) and atime/mtime to the nanosecond,
//!   all through the open file descriptor;
//! - hard links must point at an earlier non-directory inside the root;
//!   symlinks get owner, xattrs and times without following them; device
//!   nodes and FIFOs are made with `mknodat`;
//! - directories are created at once, but their owner, mode, xattrs (default
//!   ACLs included) and times are applied after the last entry (creating
//!   children changes a directory's mtime, and an early default ACL would be
//!   inherited by children that have their own); the entry `./` does this
//!   for the root itself.
//!
//! The slot is formatted with 4 KiB blocks and 256-byte inodes whatever its
//! size (mke2fs gives slots under 512 MiB 1 KiB blocks and 128-byte inodes,
//! where a 3000-byte xattr does not fit); all of one file's xattrs must fit
//! one 4 KiB xattr block ([`MAX_XATTR_SPACE`]), which [`check_entry`]
//! enforces. ext4's `ea_inode` (larger xattrs) is not used: GRUB 2.06 does
//! not read such a filesystem ("unknown filesystem").
//!
//! xattrs come from `SCHILY.xattr.*` records (GNU tar `--xattrs`); POSIX
//! ACLs from `SCHILY.xattr.system.posix_acl_*` when present, else from the
//! `SCHILY.acl.*` text (GNU tar `--acls`), whose user and group names are
//! resolved on this system as GNU tar would.
//!
//! Regular files of up to 64 KiB (most of a root filesystem) are made by
//! worker threads ([`super::files`]), exactly as above, while the stream
//! is read on; hard links and directory metadata wait for them.
//!
//! Limits: entries are handled in archive order, in one pass; entry types
//! without a filesystem meaning are refused, naming the entry. Data is made
//! durable by one `syncfs` at the end.

use anyhow::{bail, ensure, Context, Result};
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, futimens, makedev, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag,
    UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{
    fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Group, Uid, UnlinkatFlags, User,
};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::files::{FilePool, Job, POOL_FILE_MAX};
use super::pax::{encode_acl, Member, Region, TarReader, Time};
use super::tree::{Node, Step, Tree};
use super::WriteStats;
use crate::mount::{sync_fs, Access, TempMount};
use crate::util::run;

/// Read buffer between the (decompressing) payload stream and the tar parser.
const READ_BUFFER: usize = 256 << 10;

/// Longest ext4 volume label, in bytes.
const MAX_LABEL: usize = 16;

/// ext4 block size of a formatted slot.
pub const FS_BLOCK: u64 = 4096;

/// ext4 inode size of a formatted slot: room for the nanosecond timestamps
/// and small xattrs in the inode.
const INODE_SIZE: u32 = 256;

/// Bytes of xattr entries one ext4 xattr block holds (4 KiB less its
/// 32-byte header and 4-byte end marker): every xattr of a file must fit.
pub const MAX_XATTR_SPACE: u64 = FS_BLOCK - 32 - 4;

/// Formats `dev` as a fresh ext4 filesystem labelled `label`, with 4 KiB
/// blocks and 256-byte inodes whatever its size. Inode tables are
/// initialised lazily (the kernel finishes them in the background), so this
/// takes seconds, not minutes, on a large slot. The journal is zeroed: a
/// lazily initialised journal risks replaying stale blocks after a crash
/// for as long as it has not been overwritten once, i.e. under the new root
/// for its first stretch of life, not just during the install.
pub fn format_ext4(dev: &Path, label: &str) -> Result<()> {
    if label.len() > MAX_LABEL {
        bail!("ext4 label {label:?} is longer than {MAX_LABEL} bytes");
    }
    crate::failpoint!("before-mkfs");
    run(
        &format!("formatting slot {}", dev.display()),
        Command::new("mkfs.ext4")
            .args(["-F", "-q", "-L", label])
            .args(["-b", &FS_BLOCK.to_string(), "-I", &INODE_SIZE.to_string()])
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=0"])
            .arg(dev),
    )?;
    crate::failpoint!("after-mkfs");
    Ok(())
}

/// Formats `dev` as ext4 labelled `label`, mounts it and extracts the tar
/// stream `reader` into it.
///
/// The new root stays mounted: the caller copies preserved files into it and
/// then calls [`TempMount::unmount`].
pub fn write_tar(
    reader: &mut dyn Read,
    dev: &Path,
    label: &str,
) -> Result<(TempMount, WriteStats)> {
    format_ext4(dev, label)?;
    let mount = TempMount::ext4(dev, Access::ReadWrite)?;
    let stats = extract_tar(reader, mount.path())
        .with_context(|| format!("writing rootfs to {}", dev.display()))?;
    Ok((mount, stats))
}

/// Extracts the tar stream `reader` into the directory `root`, preserving
/// numeric owners, modes (with setuid, setgid and sticky bits), atimes and
/// mtimes to the nanosecond, xattrs and ACLs, sparse files, hard links,
/// symlinks, device nodes and FIFOs; then syncs the filesystem once.
pub fn extract_tar(reader: &mut dyn Read, root: &Path) -> Result<WriteStats> {
    let root = root
        .canonicalize()
        .with_context(|| format!("resolving {}", root.display()))?;
    let mut tree = Tree::scan(&root)?;
    let mut dirs = Dirs::open(&root)?;
    let mut tar = TarReader::new(BufReader::with_capacity(READ_BUFFER, reader));
    let mut stats = WriteStats::default();
    let mut deferred = Vec::new();
    let mut pool = FilePool::start()?;
    while let Some(mut member) = tar.next_member()? {
        crate::signal::check()?;
        crate::failpoint!("extract-member");
        let Some(entry) = check_entry(&mut tree, &member)? else {
            stats.files += 1;
            continue;
        };
        // A worker's error names its own entry, not this one.
        pool.check()?;
        if matches!(entry.action, Action::HardLink(_)) {
            // The target may be a file a worker has yet to make.
            pool.wait_all()?;
        }
        let name = member.name.clone();
        extract_member(
            &mut tar,
            &mut member,
            entry,
            &mut dirs,
            &mut pool,
            &mut deferred,
            &mut stats,
        )
        .with_context(|| format!("extracting tar entry {name}"))?;
    }
    pool.wait_all()?;
    drop(pool);
    // Archive order: metadata changes on a child never touch its parent's
    // mtime, and as root, restrictive parent modes do not get in the way.
    for meta in &deferred {
        finish_dir(&mut dirs, meta)
            .with_context(|| format!("extracting tar entry {}", meta.name))?;
    }
    sync_fs(&root)?;
    Ok(stats)
}

/// What [`validate`] found in a tar stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Validated {
    /// Archive entries (extension headers not counted).
    pub entries: u64,
    /// Bytes the entries take on a slot formatted by [`format_ext4`]:
    /// allocated data (holes of sparse files not counted) in whole blocks,
    /// plus a block for each other object.
    pub installed_size: u64,
}

/// Reads the tar stream `reader` to its end-of-archive marker and runs
/// every check extraction runs, in the same order, against an in-memory
/// fresh root: the stream is refused here exactly when [`extract_tar`] onto
/// a freshly formatted slot would refuse it (a disk error aside). Reads
/// exactly the archive's bytes, so whatever follows is left in `reader`.
pub fn validate<R: Read>(reader: R) -> Result<Validated> {
    let mut tar = TarReader::new(reader);
    let mut tree = Tree::fresh_ext4();
    let mut found = Validated::default();
    while let Some(member) = tar.next_member()? {
        let entry = check_entry(&mut tree, &member)?;
        found.entries += 1;
        let size = match entry {
            Some(Entry {
                action: Action::File,
                ..
            }) => allocated(&member),
            _ => FS_BLOCK,
        };
        found.installed_size = found
            .installed_size
            .checked_add(size)
            .context("the tar stream's installed size overflows")?;
    }
    Ok(found)
}

/// Bytes of whole blocks the data of a regular file takes: for a sparse
/// file, only the blocks its data regions touch.
pub fn allocated(member: &Member) -> u64 {
    let Some(regions) = &member.sparse else {
        return member.file_size.div_ceil(FS_BLOCK) * FS_BLOCK;
    };
    let mut blocks = 0;
    // Regions are in order and do not overlap; adjacent ones may share a
    // block, which counts once.
    let mut next_free = 0;
    for &Region { offset, len } in regions.iter().filter(|r| r.len > 0) {
        let first = (offset / FS_BLOCK).max(next_free);
        let end = (offset + len).div_ceil(FS_BLOCK);
        blocks += end.saturating_sub(first);
        next_free = next_free.max(end);
    }
    blocks * FS_BLOCK
}

/// What extracting an entry makes, decided from the archive alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Metadata for the root directory itself (the entry `./`).
    Root,
    /// A directory.
    Dir,
    /// A regular file (contiguous and old GNU sparse files included).
    File,
    /// A hard link to this path, relative to the root.
    HardLink(PathBuf),
    /// A symbolic link.
    Symlink,
    /// A device node or FIFO: its type and device number.
    Node(SFlag, u64),
}

/// Checks `member` against everything extraction refuses without looking at
/// the filesystem; returns its path relative to the root and what to make.
/// `bundle create` runs every entry through this too, so it never builds a
/// bundle that cannot install.
pub fn plan(member: &Member) -> Result<(PathBuf, Action)> {
    let name = &member.name;
    let rel = relative(&member.path, name)?;
    let kind = member.kind;
    // Old archives mark directories with a trailing slash on a file entry.
    let slash = member.path.as_os_str().as_bytes().ends_with(b"/");
    if kind.is_dir() || (kind.is_file() && slash) {
        let action = if rel.as_os_str().is_empty() {
            Action::Root
        } else {
            Action::Dir
        };
        return Ok((rel, action));
    }
    if rel.as_os_str().is_empty() {
        bail!("refusing tar entry {name}: it names the root but is not a directory");
    }
    let node = if kind.is_character_special() {
        Some(SFlag::S_IFCHR)
    } else if kind.is_block_special() {
        Some(SFlag::S_IFBLK)
    } else if kind.is_fifo() {
        Some(SFlag::S_IFIFO)
    } else {
        None
    };
    let action = if let Some(node) = node {
        let rdev = match (node, member.device) {
            (SFlag::S_IFIFO, _) => 0,
            (_, Some((major, minor))) => makedev(major.into(), minor.into()),
            (_, None) => bail!("refusing tar entry {name}: it has no valid device number"),
        };
        Action::Node(node, rdev)
    } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
        Action::File
    } else if kind.is_hard_link() {
        let target = link_target(member)?;
        let target = relative(target, name)?;
        ensure!(
            !target.as_os_str().is_empty(),
            "refusing tar entry {name}: it is a hard link to the root"
        );
        Action::HardLink(target)
    } else if kind.is_symlink() {
        link_target(member)?;
        Action::Symlink
    } else {
        bail!(
            "refusing tar entry {name}: unsupported entry type {:?} ({:?})",
            kind,
            char::from(kind.as_byte())
        );
    };
    Ok((rel, action))
}

fn link_target(member: &Member) -> Result<&Path> {
    match &member.link {
        Some(link) if !link.as_os_str().is_empty() => Ok(link),
        _ => bail!("refusing tar entry {}: link without a target", member.name),
    }
}

/// An entry that passed every check: what to make, and where.
#[derive(Debug)]
pub struct Entry {
    /// What to make.
    pub action: Action,
    /// Where, in real (symlink-free) paths of the new root.
    pub step: Step,
    /// For a hard link: the real path of the object linked to.
    pub source: Option<PathBuf>,
}

/// Runs every check extraction makes on `member`: the archive-only ones
/// ([`plan`]), the xattr space, and the ones against the namespace the
/// earlier entries built (`tree`, updated here). `None` for a hard link to
/// itself, which changes nothing.
pub fn check_entry(tree: &mut Tree, member: &Member) -> Result<Option<Entry>> {
    let (rel, action) = plan(member)?;
    let refusing = || format!("refusing tar entry {}", member.name);
    check_xattr_space(member).with_context(refusing)?;
    let mut source = None;
    let step = match &action {
        Action::Root => Step {
            path: PathBuf::new(),
            mkdirs: Vec::new(),
            replace: false,
            exists: true,
        },
        Action::Dir => tree.dir(&rel).with_context(refusing)?,
        Action::File | Action::Node(..) => tree.leaf(&rel, Node::Other).with_context(refusing)?,
        Action::Symlink => {
            let target = link_target(member)?.to_path_buf();
            tree.leaf(&rel, Node::Symlink(target))
                .with_context(refusing)?
        }
        Action::HardLink(to) => match tree.hard_link(&rel, to).with_context(refusing)? {
            None => return Ok(None),
            Some((step, from)) => {
                source = Some(from);
                step
            }
        },
    };
    Ok(Some(Entry {
        action,
        step,
        source,
    }))
}

/// Refuses a member whose xattrs cannot all be stored on the slot: ext4
/// keeps one file's xattrs in its inode and one xattr block, and this
/// requires them to fit the block alone (so they always fit).
fn check_xattr_space(member: &Member) -> Result<()> {
    // An ext4 xattr entry: 16 bytes, the name (less a known prefix) and the
    // value, each padded to 4 bytes.
    let entry = |name: &[u8], value_len: u64| {
        let short = [
            &b"system.posix_acl_access"[..],
            b"system.posix_acl_default",
            b"user.",
            b"trusted.",
            b"security.",
            b"system.",
        ]
        .iter()
        .find_map(|prefix| name.strip_prefix(*prefix))
        .unwrap_or(name);
        16 + (short.len() as u64).div_ceil(4) * 4 + value_len.div_ceil(4) * 4
    };
    let mut total = 0;
    let mut largest: Option<(&OsStr, u64)> = None;
    for (name, value) in &member.xattrs {
        total += entry(name.as_bytes(), value.len() as u64);
        if largest.is_none_or(|(_, len)| value.len() as u64 > len) {
            largest = Some((name, value.len() as u64));
        }
    }
    for (name, acl) in &member.acls {
        total += entry(name.as_bytes(), 4 + 8 * acl.len() as u64);
    }
    if total > MAX_XATTR_SPACE {
        let (name, len) = largest.unwrap_or((OsStr::new("?"), 0));
        bail!(
            "its xattrs need {total} bytes of ext4 xattr space, more than the \
             {MAX_XATTR_SPACE} bytes of one 4 KiB xattr block (largest: {}, {len} bytes); \
             shrink or drop them",
            name.to_string_lossy()
        );
    }
    Ok(())
}

/// Owner, mode, times and xattrs of an entry.
pub(super) struct Meta {
    /// Entry name, for errors.
    pub(super) name: String,
    /// Where the entry was created, relative to the root.
    pub(super) path: PathBuf,
    mode: u32,
    uid: u32,
    gid: u32,
    atime: Time,
    mtime: Time,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

impl Meta {
    /// Context for an error while setting `what` ("setting owner", ...).
    fn doing(&self, what: &str) -> String {
        let path = self.path.display();
        match what {
            "setting owner" => format!("{what} of {path} to {}:{}", self.uid, self.gid),
            "setting mode" => format!("{what} of {path} to {:04o}", self.mode),
            _ => format!("{what} of {path}"),
        }
    }

    /// Sets each xattr with `set`, naming the one that fails.
    fn set_xattrs(&self, set: impl Fn(&OsStr, &[u8]) -> std::io::Result<()>) -> Result<()> {
        for (key, value) in &self.xattrs {
            set(key, value).with_context(|| {
                format!(
                    "setting xattr {} on {}",
                    key.to_string_lossy(),
                    self.path.display()
                )
            })?;
        }
        Ok(())
    }

    fn times(&self) -> (TimeSpec, TimeSpec) {
        let t = |t: Time| TimeSpec::new(t.secs, i64::from(t.nanos));
        (t(self.atime), t(self.mtime))
    }
}

fn extract_member<R: Read>(
    tar: &mut TarReader<R>,
    member: &mut Member,
    entry: Entry,
    dirs: &mut Dirs,
    pool: &mut FilePool,
    deferred: &mut Vec<Meta>,
    stats: &mut WriteStats,
) -> Result<()> {
    let Entry {
        action,
        step,
        source,
    } = entry;
    let meta = Meta {
        name: member.name.clone(),
        path: step.path.clone(),
        mode: member.mode,
        uid: member.uid,
        gid: member.gid,
        atime: member.atime,
        mtime: member.mtime,
        xattrs: member_xattrs(member)?,
    };
    for dir in &step.mkdirs {
        let (parent, name) = dirs.parent_of(dir)?;
        mkdirat(Some(parent), name, Mode::from_bits_truncate(0o755))
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    if matches!(action, Action::Root) {
        deferred.push(meta);
        return Ok(());
    }
    let (parent, name) = dirs.parent_of(&step.path)?;
    if step.replace {
        unlinkat(Some(parent), name, UnlinkatFlags::NoRemoveDir)
            .with_context(|| format!("removing {}", step.path.display()))?;
    }
    match action {
        Action::Root => {}
        Action::Dir => {
            if !step.exists {
                mkdirat(Some(parent), name, Mode::from_bits_truncate(0o755))
                    .with_context(|| format!("creating {}", step.path.display()))?;
            }
            deferred.push(meta);
        }
        Action::File if member.sparse.is_none() && member.size <= POOL_FILE_MAX => {
            // Small: read here, made by a worker.
            let mut data = Vec::with_capacity(member.size as usize);
            while (data.len() as u64) < member.size {
                let chunk = tar.data(member.size - data.len() as u64)?;
                ensure!(
                    !chunk.is_empty(),
                    "the tar stream ends inside the entry's data"
                );
                data.extend_from_slice(chunk);
            }
            let parent = dirs.shared(step.path.parent().unwrap_or(Path::new("")))?;
            pool.submit(Job {
                parent,
                name: name.to_os_string(),
                data,
                meta,
            })?;
            stats.bytes += member.file_size;
        }
        Action::File => {
            let dir = dirs.shared(step.path.parent().unwrap_or(Path::new("")))?;
            make_file(&dir, name, &step.path, &meta, |file| {
                write_data(tar, member, file, &step.path)
            })?;
            stats.bytes += member.file_size;
        }
        Action::HardLink(_) => {
            let source = source.context("a hard link without its source")?;
            let from = dirs.open_dir(source.parent().unwrap_or(Path::new("")))?;
            let from_name = source
                .file_name()
                .context("a hard link source without a name")?;
            // open_dir leaves the chain (and `parent`) alone.
            linkat(
                Some(from.as_raw_fd()),
                from_name,
                Some(parent),
                name,
                AtFlags::empty(),
            )
            .with_context(|| format!("linking {} to {}", step.path.display(), source.display()))?;
        }
        Action::Symlink => {
            let link = link_target(member)?;
            symlinkat(link, Some(parent), name)
                .with_context(|| format!("creating symlink {}", step.path.display()))?;
            apply_meta_at(dirs, parent, name, &meta, false)?;
        }
        Action::Node(kind, rdev) => {
            // The umask may strip bits here; apply_meta_at sets the exact mode.
            mknodat(
                Some(parent),
                name,
                kind,
                Mode::from_bits_truncate(meta.mode & 0o777),
                rdev,
            )
            .with_context(|| format!("creating device node {}", step.path.display()))?;
            apply_meta_at(dirs, parent, name, &meta, true)?;
        }
    }
    stats.files += 1;
    Ok(())
}

/// Creates the regular file `name` in the directory `dir` (never through a
/// symlink, never over anything), fills it with `fill`, then sets `meta`.
pub(super) fn make_file(
    dir: &OwnedFd,
    name: &OsStr,
    path: &Path,
    meta: &Meta,
    fill: impl FnOnce(&mut File) -> Result<()>,
) -> Result<()> {
    let fd = openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: openat just returned this fd, owned by nobody else.
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    fill(&mut file)?;
    apply_meta_fd(&file, meta)
}

/// Writes the member's data into `file`: contiguous, or for a sparse file
/// each region at its offset, the holes left as holes.
fn write_data<R: Read>(
    tar: &mut TarReader<R>,
    member: &Member,
    file: &mut File,
    path: &Path,
) -> Result<()> {
    let writing = || format!("writing {}", path.display());
    match &member.sparse {
        None => {
            let mut left = member.size;
            while left > 0 {
                let chunk = tar.data(left)?;
                ensure!(
                    !chunk.is_empty(),
                    "the tar stream ends inside the entry's data"
                );
                file.write_all(chunk).with_context(writing)?;
                left -= chunk.len() as u64;
            }
        }
        Some(regions) => {
            for region in regions {
                let (mut offset, mut left) = (region.offset, region.len);
                while left > 0 {
                    let chunk = tar.data(left)?;
                    ensure!(
                        !chunk.is_empty(),
                        "the entry holds less data than its sparse map lists"
                    );
                    file.write_all_at(chunk, offset).with_context(writing)?;
                    offset += chunk.len() as u64;
                    left -= chunk.len() as u64;
                }
            }
            file.set_len(member.file_size)
                .with_context(|| format!("setting the size of {}", path.display()))?;
        }
    }
    Ok(())
}

/// Sets owner, then mode (chown clears setuid/setgid), then xattrs (chown
/// also clears security.capability), then times, through an open fd.
fn apply_meta_fd(file: &File, meta: &Meta) -> Result<()> {
    let path = &meta.path;
    let fd = file.as_raw_fd();
    fchown(
        fd,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
    )
    .with_context(|| meta.doing("setting owner"))?;
    fchmod(fd, Mode::from_bits_truncate(meta.mode)).with_context(|| meta.doing("setting mode"))?;
    meta.set_xattrs(|key, value| xattr::FileExt::set_xattr(file, key, value))?;
    let (atime, mtime) = meta.times();
    futimens(fd, &atime, &mtime).with_context(|| format!("setting times of {}", path.display()))?;
    Ok(())
}

/// Like [`apply_meta_fd`] for a symlink or device node `name` in the
/// directory `parent`, which cannot be opened: `*at` calls that do not
/// follow a symlink, and xattrs by path (`lsetxattr`, every directory on
/// the way a real one the extractor made). The mode is set only when
/// `chmod` (symlinks have none).
fn apply_meta_at(dirs: &Dirs, parent: RawFd, name: &OsStr, meta: &Meta, chmod: bool) -> Result<()> {
    let path = &meta.path;
    fchownat(
        Some(parent),
        name,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .with_context(|| meta.doing("setting owner"))?;
    if chmod {
        // Never a symlink here: this module just created the node.
        fchmodat(
            Some(parent),
            name,
            Mode::from_bits_truncate(meta.mode),
            FchmodatFlags::FollowSymlink,
        )
        .with_context(|| meta.doing("setting mode"))?;
    }
    let full = dirs.root_path.join(path);
    meta.set_xattrs(|key, value| xattr::set(&full, key, value))?;
    let (atime, mtime) = meta.times();
    utimensat(
        Some(parent),
        name,
        &atime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .with_context(|| format!("setting times of {}", path.display()))?;
    Ok(())
}

/// Applies deferred directory metadata.
fn finish_dir(dirs: &mut Dirs, meta: &Meta) -> Result<()> {
    let fd = dirs.open_dir_read(&meta.path)?;
    apply_meta_fd(&File::from(fd), meta)
}

/// Directory fds of the new root: the root's, and those of the directory
/// chain the last entries landed in (archive order keeps siblings together,
/// so most entries need no new open). Each is opened from its parent with
/// `O_NOFOLLOW`, one component at a time: a symlink where the namespace
/// expects a directory makes the open fail instead of leaving the root.
struct Dirs {
    root_path: PathBuf,
    root: Arc<OwnedFd>,
    /// Open directories: the root's child, its child, ... (shared with the
    /// files handed to workers, which keep them open).
    chain: Vec<(OsString, Arc<OwnedFd>)>,
}

const DIR_FLAGS: OFlag = OFlag::O_PATH
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

impl Dirs {
    fn open(root: &Path) -> Result<Dirs> {
        let fd = nix::fcntl::open(root, DIR_FLAGS, Mode::empty())
            .with_context(|| format!("opening {}", root.display()))?;
        Ok(Dirs {
            root_path: root.to_path_buf(),
            // SAFETY: open just returned this fd, owned by nobody else.
            root: Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }),
            chain: Vec::new(),
        })
    }

    /// The fd of the directory `dir` (a real path relative to the root),
    /// valid until the next call.
    fn get(&mut self, dir: &Path) -> Result<RawFd> {
        Ok(self.shared(dir)?.as_raw_fd())
    }

    /// The fd of the directory `dir` (a real path relative to the root),
    /// shared: it stays open as long as a holder keeps it.
    fn shared(&mut self, dir: &Path) -> Result<Arc<OwnedFd>> {
        let parts: Vec<&OsStr> = dir.iter().collect();
        let common = self
            .chain
            .iter()
            .zip(&parts)
            .take_while(|((have, _), want)| have.as_os_str() == **want)
            .count();
        self.chain.truncate(common);
        for part in &parts[common..] {
            let parent = self.chain.last().map_or(&self.root, |(_, fd)| fd);
            let fd = open_child(parent.as_raw_fd(), part, DIR_FLAGS)
                .with_context(|| format!("opening directory {}", dir.display()))?;
            self.chain.push((part.to_os_string(), Arc::new(fd)));
        }
        Ok(Arc::clone(
            self.chain.last().map_or(&self.root, |(_, fd)| fd),
        ))
    }

    /// The fd of `path`'s parent directory and `path`'s last component.
    fn parent_of<'p>(&mut self, path: &'p Path) -> Result<(RawFd, &'p OsStr)> {
        let name = path
            .file_name()
            .with_context(|| format!("{} has no file name", path.display()))?;
        let fd = self.get(path.parent().unwrap_or(Path::new("")))?;
        Ok((fd, name))
    }

    /// A new fd of the directory `dir`, independent of the chain.
    fn open_dir(&self, dir: &Path) -> Result<OwnedFd> {
        let mut fd = open_child(self.root.as_raw_fd(), OsStr::new("."), DIR_FLAGS)?;
        for part in dir.iter() {
            fd = open_child(fd.as_raw_fd(), part, DIR_FLAGS)
                .with_context(|| format!("opening directory {}", dir.display()))?;
        }
        Ok(fd)
    }

    /// The directory `dir` opened for reading (so its metadata and xattrs
    /// can be set through the fd).
    fn open_dir_read(&mut self, dir: &Path) -> Result<OwnedFd> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let (parent, name) = match dir.file_name() {
            Some(name) => (self.get(dir.parent().unwrap_or(Path::new("")))?, name),
            None => (self.root.as_raw_fd(), OsStr::new(".")),
        };
        open_child(parent, name, flags).with_context(|| format!("opening {}", dir.display()))
    }
}

/// `openat(parent, name, flags)` as an owned fd.
fn open_child(parent: RawFd, name: &OsStr, flags: OFlag) -> Result<OwnedFd> {
    let fd = openat(Some(parent), name, flags, Mode::empty())?;
    // SAFETY: openat just returned this fd, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The xattrs to set for `member`: its `SCHILY.xattr.*` records plus ACLs
/// stored only as text, converted to the kernel's xattr format.
fn member_xattrs(member: &mut Member) -> Result<Vec<(OsString, Vec<u8>)>> {
    let mut xattrs = std::mem::take(&mut member.xattrs);
    for (attr, entries) in &member.acls {
        let value = encode_acl(entries, host_id)
            .with_context(|| format!("refusing tar entry {}", member.name))?;
        xattrs.push((OsString::from(attr), value));
    }
    Ok(xattrs)
}

/// A user (or group) id by name from this system's user database.
fn host_id(user: bool, name: &str) -> Option<u32> {
    if user {
        User::from_name(name).ok().flatten().map(|u| u.uid.as_raw())
    } else {
        Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }
}

/// Turns an entry path into one relative to the root, refusing absolute
/// paths and `..`. `./` becomes the empty path.
fn relative(path: &Path, name: &str) -> Result<PathBuf> {
    let mut rel = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Prefix(_) | Component::RootDir => {
                bail!("refusing tar entry {name}: absolute paths are not allowed")
            }
            Component::ParentDir => bail!("refusing tar entry {name}: it escapes the root"),
            Component::CurDir => {}
            Component::Normal(p) => rel.push(p),
        }
    }
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::{mount_point_of, LoopDevice};
    use nix::sys::stat::mknod;
    use std::fs;
    use std::fs::File;
    use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};

    const CONTENT: &[u8] = b"hello abup\n";
    /// `security.capability` for `cap_net_raw=ep` (VFS_CAP_REVISION_2).
    const CAP_NET_RAW: [u8; 20] = [
        1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    fn chown(path: &Path, uid: u32, gid: u32) {
        fchownat(
            None,
            path,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn set_mtime(path: &Path, secs: i64) {
        let t = TimeSpec::new(secs, 0);
        utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink).unwrap();
    }

    /// Builds the reference tree; returns whether security.capability could
    /// be set on the source filesystem.
    fn build_tree(src: &Path) -> bool {
        let file = src.join("file");
        fs::write(&file, CONTENT).unwrap();
        chown(&file, 1234, 5678);
        chmod(&file, 0o640);
        set_mtime(&file, 1_600_000_000);

        let suid = src.join("suid");
        fs::write(&suid, b"#!/bin/sh\n").unwrap();
        chmod(&suid, 0o4755);

        symlink("file", src.join("link")).unwrap();
        chown(&src.join("link"), 1234, 4321);
        set_mtime(&src.join("link"), 1_500_000_000);

        fs::write(src.join("hard1"), b"linked").unwrap();
        fs::hard_link(src.join("hard1"), src.join("hard2")).unwrap();

        fs::create_dir(src.join("dev")).unwrap();
        mknod(
            &src.join("dev/null"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(1, 3),
        )
        .unwrap();
        chmod(&src.join("dev/null"), 0o666);
        set_mtime(&src.join("dev/null"), 1_400_000_000);
        mknod(
            &src.join("dev/loop9"),
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o660),
            makedev(7, 9),
        )
        .unwrap();
        chown(&src.join("dev/loop9"), 0, 6);
        chmod(&src.join("dev/loop9"), 0o660);
        mknod(
            &src.join("fifo"),
            SFlag::S_IFIFO,
            Mode::from_bits_truncate(0o600),
            0,
        )
        .unwrap();
        chown(&src.join("fifo"), 42, 43);

        let empty = src.join("empty");
        fs::create_dir(&empty).unwrap();
        chmod(&empty, 0o700);
        set_mtime(&empty, 1_234_567_890);

        // A non-empty directory: its mtime only survives if it is applied
        // after its children are created.
        fs::create_dir_all(src.join("etc/deep")).unwrap();
        fs::write(src.join("etc/deep/conf"), b"x=1\n").unwrap();
        set_mtime(&src.join("etc/deep"), 1_300_000_000);
        set_mtime(&src.join("etc"), 1_300_000_001);

        let sticky = src.join("tmp");
        fs::create_dir(&sticky).unwrap();
        chmod(&sticky, 0o1777);
        let sgid = src.join("sgid");
        fs::create_dir(&sgid).unwrap();
        chown(&sgid, 0, 50);
        chmod(&sgid, 0o2775);
        xattr::set(&sgid, "user.dir", b"on a directory").unwrap();

        let xf = src.join("xattr");
        fs::write(&xf, b"caps").unwrap();
        chmod(&xf, 0o755);
        xattr::set(&xf, "user.abup", b"test").unwrap();
        let caps = xattr::set(&xf, "security.capability", &CAP_NET_RAW).is_ok();

        chmod(src, 0o751);
        set_mtime(src, 1_111_111_111);
        caps
    }

    /// Objects in the tree above, the root excluded.
    const TREE_FILES: u64 = 16;
    /// Bytes of regular file content in the tree (hard links count once).
    const TREE_BYTES: u64 = (CONTENT.len() + 10 + 6 + 4 + 4) as u64;

    fn gnu_tar(src: &Path, out: &Path) {
        run(
            "creating test archive",
            Command::new("tar")
                .args([
                    "--create",
                    "--xattrs",
                    "--xattrs-include=*",
                    "--numeric-owner",
                ])
                .arg("-C")
                .arg(src)
                .arg("-f")
                .arg(out)
                .arg("."),
        )
        .unwrap();
    }

    fn lstat(path: &Path) -> fs::Metadata {
        fs::symlink_metadata(path).unwrap()
    }

    fn assert_meta(path: &Path, mode: u32, uid: u32, gid: u32) {
        let m = lstat(path);
        assert_eq!(m.mode() & 0o7777, mode, "mode of {}", path.display());
        assert_eq!(
            (m.uid(), m.gid()),
            (uid, gid),
            "owner of {}",
            path.display()
        );
    }

    #[test]
    fn extracts_gnu_tar_onto_fresh_ext4() {
        let work = tempfile::tempdir().unwrap();
        let src = work.path().join("src");
        fs::create_dir(&src).unwrap();
        let caps = build_tree(&src);
        let archive = work.path().join("rootfs.tar");
        gnu_tar(&src, &archive);

        let img = work.path().join("slot.img");
        File::create(&img).unwrap().set_len(64 << 20).unwrap();
        let lo = LoopDevice::attach(&img, None, None, None).unwrap();

        let mut reader = File::open(&archive).unwrap();
        let (mount, stats) = write_tar(&mut reader, lo.path(), "rootfs-b").unwrap();
        assert_eq!(
            mount_point_of(lo.path()).unwrap().as_deref(),
            Some(mount.path())
        );
        assert_eq!(
            stats,
            WriteStats {
                bytes: TREE_BYTES,
                files: TREE_FILES
            }
        );
        let root = mount.path();

        // The root entry "./" applies to the mount point itself.
        assert_meta(root, 0o751, 0, 0);
        assert_eq!(lstat(root).mtime(), 1_111_111_111);

        assert_eq!(fs::read(root.join("file")).unwrap(), CONTENT);
        assert_meta(&root.join("file"), 0o640, 1234, 5678);
        assert_eq!(lstat(&root.join("file")).mtime(), 1_600_000_000);

        assert_meta(&root.join("suid"), 0o4755, 0, 0);

        let link = root.join("link");
        assert!(lstat(&link).file_type().is_symlink());
        assert_eq!(fs::read_link(&link).unwrap(), PathBuf::from("file"));
        assert_eq!((lstat(&link).uid(), lstat(&link).gid()), (1234, 4321));
        assert_eq!(lstat(&link).mtime(), 1_500_000_000);

        let (h1, h2) = (lstat(&root.join("hard1")), lstat(&root.join("hard2")));
        assert_eq!(h1.nlink(), 2);
        assert_eq!(h1.ino(), h2.ino());
        assert_eq!(fs::read(root.join("hard2")).unwrap(), b"linked");

        let null = lstat(&root.join("dev/null"));
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), makedev(1, 3));
        assert_meta(&root.join("dev/null"), 0o666, 0, 0);
        assert_eq!(null.mtime(), 1_400_000_000);
        let blk = lstat(&root.join("dev/loop9"));
        assert!(blk.file_type().is_block_device());
        assert_eq!(blk.rdev(), makedev(7, 9));
        assert_meta(&root.join("dev/loop9"), 0o660, 0, 6);

        assert!(lstat(&root.join("fifo")).file_type().is_fifo());
        assert_meta(&root.join("fifo"), 0o600, 42, 43);

        assert_meta(&root.join("empty"), 0o700, 0, 0);
        assert_eq!(lstat(&root.join("empty")).mtime(), 1_234_567_890);
        assert_eq!(lstat(&root.join("etc/deep")).mtime(), 1_300_000_000);
        assert_eq!(lstat(&root.join("etc")).mtime(), 1_300_000_001);
        assert_meta(&root.join("tmp"), 0o1777, 0, 0);
        assert_meta(&root.join("sgid"), 0o2775, 0, 50);
        assert_eq!(
            xattr::get(root.join("sgid"), "user.dir")
                .unwrap()
                .as_deref(),
            Some(&b"on a directory"[..])
        );

        let xf = root.join("xattr");
        assert_eq!(
            xattr::get(&xf, "user.abup").unwrap().as_deref(),
            Some(&b"test"[..])
        );
        assert_meta(&xf, 0o755, 0, 0);
        if caps {
            assert_eq!(
                xattr::get(&xf, "security.capability").unwrap().as_deref(),
                Some(&CAP_NET_RAW[..])
            );
        }

        mount.unmount().unwrap();
        assert_eq!(mount_point_of(lo.path()).unwrap(), None);
        let label = run("reading label", Command::new("e2label").arg(lo.path())).unwrap();
        assert_eq!(label.trim(), "rootfs-b");
    }

    /// A tar stream with hand-made headers, for archives GNU tar would not
    /// write: `(name, type, link name, data)`.
    fn raw_tar(entries: &[(&str, ::tar::EntryType, &str, &[u8])]) -> Vec<u8> {
        let mut b = ::tar::Builder::new(Vec::new());
        for (name, kind, link, data) in entries {
            let mut h = ::tar::Header::new_gnu();
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(data.len() as u64);
            h.set_mtime(1_000_000_000);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn extract_err(tar: &[u8], root: &Path) -> String {
        let err = extract_tar(&mut &tar[..], root).unwrap_err();
        format!("{err:#}")
    }

    /// A file the kernel refuses is an error naming its entry, whether a
    /// worker made it (small) or the extractor itself (large); the files
    /// before it, and a hard link to one made by a worker, are complete.
    #[test]
    fn errors_making_files_name_the_entry() {
        for size in [10, POOL_FILE_MAX as usize + 1] {
            let root = tempfile::tempdir().unwrap();
            let long = format!("d/{}", "x".repeat(300));
            let mut b = ::tar::Builder::new(Vec::new());
            let mut add = |path: &str, kind: ::tar::EntryType, link: &str, data: &[u8]| {
                let mut h = ::tar::Header::new_gnu();
                h.set_entry_type(kind);
                h.set_mode(0o640);
                h.set_size(data.len() as u64);
                h.set_mtime(1_000_000_000);
                h.set_uid(0);
                h.set_gid(0);
                if kind == ::tar::EntryType::Link {
                    b.append_link(&mut h, path, link).unwrap();
                } else {
                    b.append_data(&mut h, path, data).unwrap();
                }
            };
            let data = vec![7u8; size];
            for i in 0..100 {
                add(&format!("d/f{i}"), ::tar::EntryType::Regular, "", &data);
            }
            add("d/h", ::tar::EntryType::Link, "d/f99", b"");
            add(&long, ::tar::EntryType::Regular, "", &data);
            add("d/after", ::tar::EntryType::Regular, "", &data);
            let tar = b.into_inner().unwrap();
            let msg = extract_err(&tar, root.path());
            assert!(
                msg.starts_with(&format!("extracting tar entry {long}: creating {long}: ")),
                "{size}: {msg}"
            );
            assert!(msg.contains("too long"), "{size}: {msg}");
            for i in 0..100 {
                let f = root.path().join(format!("d/f{i}"));
                assert_eq!(fs::read(&f).unwrap(), data, "{size}");
                assert_eq!(lstat(&f).mode() & 0o7777, 0o640, "{size}");
                assert_eq!(lstat(&f).mtime(), 1_000_000_000, "{size}");
            }
            assert_eq!(lstat(&root.path().join("d/h")).nlink(), 2, "{size}");
        }
    }

    #[test]
    fn refuses_absolute_paths() {
        use ::tar::EntryType as T;
        let root = tempfile::tempdir().unwrap();
        let tar = raw_tar(&[("/etc/abup-test", T::Regular, "", b"x")]);
        assert_eq!(
            extract_err(&tar, root.path()),
            "refusing tar entry /etc/abup-test: absolute paths are not allowed"
        );
        assert!(!Path::new("/etc/abup-test").exists());
    }

    #[test]
    fn refuses_entries_escaping_the_root() {
        use ::tar::EntryType as T;
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        fs::create_dir(&root).unwrap();
        for entry in [
            ("a/../../escaped", T::Regular, "", &b"x"[..]),
            ("../escaped", T::Directory, "", &b""[..]),
            ("../escaped", T::Fifo, "", &b""[..]),
        ] {
            let tar = raw_tar(&[entry]);
            assert_eq!(
                extract_err(&tar, &root),
                format!("refusing tar entry {}: it escapes the root", entry.0)
            );
        }
        let tar = raw_tar(&[("hl", T::Link, "../outside", b"")]);
        assert_eq!(
            extract_err(&tar, &root),
            "refusing tar entry hl: it escapes the root"
        );
        assert!(!outer.path().join("escaped").exists());
    }

    #[test]
    fn refuses_nodes_through_symlinks_leaving_the_root() {
        use ::tar::EntryType as T;
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        fs::create_dir(&root).unwrap();
        let away = outer.path().join("away");
        fs::create_dir(&away).unwrap();
        let tar = raw_tar(&[
            ("evil", T::Symlink, away.to_str().unwrap(), b""),
            ("evil/fifo", T::Fifo, "", b""),
        ]);
        let msg = extract_err(&tar, &root);
        assert!(
            msg.starts_with("refusing tar entry evil/fifo: symlink evil -> "),
            "{msg}"
        );
        assert!(msg.ends_with("leads outside the root"), "{msg}");
        assert!(!away.join("fifo").exists());

        // A symlink that stays inside the root is fine.
        let root2 = outer.path().join("root2");
        fs::create_dir_all(root2.join("real")).unwrap();
        let tar = raw_tar(&[
            ("alias", T::Symlink, "real", b""),
            ("alias/fifo", T::Fifo, "", b""),
        ]);
        extract_tar(&mut &tar[..], &root2).unwrap();
        assert!(lstat(&root2.join("real/fifo")).file_type().is_fifo());
    }

    #[test]
    fn refuses_unsupported_entry_types() {
        use ::tar::EntryType as T;
        let root = tempfile::tempdir().unwrap();
        let tar = raw_tar(&[("label", T::new(b'V'), "", b"")]);
        let msg = extract_err(&tar, root.path());
        assert!(
            msg.starts_with("refusing tar entry label: unsupported entry type"),
            "{msg}"
        );
        let tar = raw_tar(&[(".", T::Regular, "", b"x")]);
        assert_eq!(
            extract_err(&tar, root.path()),
            "refusing tar entry .: it names the root but is not a directory"
        );
    }

    /// A 1 MiB file with 5 bytes of data in the middle.
    fn sparse_source(dir: &Path) {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(dir.join("sparse"))
            .unwrap();
        f.set_len(1 << 20).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, b"data\n", 500_000).unwrap();
    }

    /// GNU tar's PAX sparse formats (0.0, 0.1 and 1.0, the default) with
    /// xattrs on the same file, which old GNU sparse cannot carry.
    #[test]
    fn extracts_pax_sparse_files_with_xattrs() {
        let work = tempfile::tempdir().unwrap();
        let src = work.path().join("src");
        fs::create_dir(&src).unwrap();
        sparse_source(&src);
        xattr::set(src.join("sparse"), "user.kept", b"with holes").unwrap();
        let want = fs::read(src.join("sparse")).unwrap();
        for version in ["0.0", "0.1", "1.0"] {
            let archive = work.path().join(format!("sparse-{version}.tar"));
            let v = format!("--sparse-version={version}");
            tar_with(
                &src,
                &archive,
                &["--format=posix", "--sparse", &v, "--xattrs"],
            );
            let root = work.path().join(format!("root-{version}"));
            fs::create_dir(&root).unwrap();
            let stats = extract_tar(&mut File::open(&archive).unwrap(), &root).unwrap();
            assert_eq!(
                stats,
                WriteStats {
                    bytes: 1 << 20,
                    files: 1
                },
                "{version}"
            );
            let got = root.join("sparse");
            assert_eq!(fs::read(&got).unwrap(), want, "{version}");
            assert!(
                lstat(&got).blocks() * 512 <= 64 << 10,
                "{version}: holes filled"
            );
            assert_eq!(
                xattr::get(&got, "user.kept").unwrap().as_deref(),
                Some(&b"with holes"[..]),
                "{version}"
            );
            assert_eq!(
                lstat(&got).mtime_nsec(),
                lstat(&src.join("sparse")).mtime_nsec()
            );
            // The installed size counts the one data block, not the holes.
            let found = validate(File::open(&archive).unwrap()).unwrap();
            assert_eq!(
                found,
                Validated {
                    entries: 2,
                    installed_size: 2 * FS_BLOCK
                },
                "{version}"
            );
        }
    }

    #[test]
    fn extracts_gnu_sparse_files() {
        let work = tempfile::tempdir().unwrap();
        let src = work.path().join("src");
        fs::create_dir(&src).unwrap();
        sparse_source(&src);
        sparse_round_trip(work.path(), &src, 1 << 20);
    }

    #[test]
    fn rejects_overlong_labels() {
        let err = format_ext4(Path::new("/dev/null"), "a-label-of-17-byt").unwrap_err();
        assert_eq!(
            err.to_string(),
            "ext4 label \"a-label-of-17-byt\" is longer than 16 bytes"
        );
    }

    #[test]
    fn format_errors_name_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let err = format_ext4(&dir.path().join("missing"), "x").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with(&format!(
                "formatting slot {}: ",
                dir.path().join("missing").display()
            )),
            "{msg}"
        );
    }

    /// Runs GNU tar `--create` on `src` (all of it) into `out` with `args`.
    /// Archives `src/sparse` with GNU tar's sparse format, extracts it into a
    /// new root under `work`, checks the content and the counts (`bytes` of
    /// file data, one file), and returns the root.
    fn sparse_round_trip(work: &Path, src: &Path, bytes: u64) -> PathBuf {
        let archive = work.join("sparse.tar");
        tar_with(src, &archive, &["--format=gnu", "--sparse"]);
        let root = work.join("root");
        fs::create_dir(&root).unwrap();
        let stats = extract_tar(&mut File::open(&archive).unwrap(), &root).unwrap();
        assert_eq!(stats, WriteStats { bytes, files: 1 });
        assert_eq!(
            fs::read(root.join("sparse")).unwrap(),
            fs::read(src.join("sparse")).unwrap()
        );
        root
    }

    fn tar_with(src: &Path, out: &Path, args: &[&str]) {
        run(
            "creating test archive",
            Command::new("tar")
                .arg("--create")
                .args(args)
                .arg("-C")
                .arg(src)
                .arg("-f")
                .arg(out)
                .arg("."),
        )
        .unwrap();
    }

    /// Writes `archive` onto a fresh 64 MiB ext4 on a loop device; unmount
    /// the returned mount before dropping the loop device.
    fn install(work: &Path, archive: &Path) -> (TempMount, LoopDevice, WriteStats) {
        let img = work.join("slot.img");
        File::create(&img).unwrap().set_len(64 << 20).unwrap();
        let lo = LoopDevice::attach(&img, None, None, None).unwrap();
        let mut reader = File::open(archive).unwrap();
        let (mount, stats) = write_tar(&mut reader, lo.path(), "rootfs-t").unwrap();
        (mount, lo, stats)
    }

    fn acl(text: &str) -> Vec<u8> {
        let entries = super::super::pax::parse_acl_text(text.as_bytes()).unwrap();
        encode_acl(&entries, |_, _| None).unwrap()
    }

    /// GNU tar stores ACLs as multi-line `SCHILY.acl.*` text (`--acls`) and,
    /// with `--xattrs-include='*'`, also as binary `system.posix_acl_*`
    /// xattrs; both forms, alone or together, must arrive intact.
    #[test]
    fn acls_survive_in_every_gnu_tar_form() {
        let work = tempfile::tempdir().unwrap();
        let src = work.path().join("src");
        fs::create_dir_all(src.join("shared/old")).unwrap();
        fs::write(src.join("shared/old/child"), b"no acl\n").unwrap();
        let file = src.join("file");
        fs::write(&file, b"acl\n").unwrap();
        chmod(&file, 0o640);
        // uid/gid 0 have names, so the text form says "user:root:r--".
        let access = acl("u::rw-,u:1234:r--,u:0:r--,g::r--,g:0:r-x,m::r-x,o::r--");
        xattr::set(&file, "system.posix_acl_access", &access).unwrap();
        let shared = src.join("shared");
        xattr::set(
            &shared,
            "system.posix_acl_access",
            &acl("u::rwx,u:1234:rwx,g::r-x,m::rwx,o::r-x"),
        )
        .unwrap();
        let default = acl("u::rwx,u:1234:rwx,g::r-x,m::rwx,o::r-x");
        xattr::set(&shared, "system.posix_acl_default", &default).unwrap();

        for (form, args) in [
            (
                "both",
                &[
                    "--xattrs",
                    "--xattrs-include=*",
                    "--acls",
                    "--numeric-owner",
                ][..],
            ),
            ("text only", &["--acls", "--numeric-owner"]),
            ("xattrs only", &["--xattrs", "--xattrs-include=*"]),
        ] {
            let archive = work.path().join("acl.tar");
            tar_with(&src, &archive, args);
            let (mount, _lo, _) = install(work.path(), &archive);
            let root = mount.path();
            for (path, attr) in [
                ("file", "system.posix_acl_access"),
                ("shared", "system.posix_acl_access"),
                ("shared", "system.posix_acl_default"),
            ] {
                assert_eq!(
                    xattr::get(root.join(path), attr).unwrap(),
                    xattr::get(src.join(path), attr).unwrap(),
                    "{form}: {attr} of {path}"
                );
            }
            // The mode's group bits are the ACL mask, whatever the order
            // in which mode and ACL were applied.
            assert_eq!(
                lstat(&root.join("file")).mode(),
                lstat(&file).mode(),
                "{form}"
            );
            // The default ACL is applied after the directory's children
            // were made, so they inherit nothing.
            for child in ["shared/old", "shared/old/child"] {
                assert_eq!(
                    xattr::get(root.join(child), "system.posix_acl_access").unwrap(),
                    None,
                    "{form}: {child}"
                );
            }
            mount.unmount().unwrap();
        }
    }

    /// PAX records are length-prefixed: values holding newlines (or text
    /// that looks like another record) are data, not structure.
    #[test]
    fn xattr_values_with_newlines_survive() {
        let work = tempfile::tempdir().unwrap();
        let src = work.path().join("src");
        fs::create_dir_all(src.join("srv/tagged")).unwrap();
        let notes = src.join("notes");
        fs::write(&notes, b"x\n").unwrap();
        let values: [(&str, &[u8]); 3] = [
            ("user.note", b"line one\nline two"),
            ("user.fake", b"\n13 path=evil\n"),
            ("user.empty", b""),
        ];
        for (key, value) in values {
            xattr::set(&notes, key, value).unwrap();
        }
        let bin = [0x0a, 0x00, 0xff, 0x0a];
        xattr::set(src.join("srv/tagged"), "user.bin", &bin).unwrap();
        let archive = work.path().join("x.tar");
        tar_with(
            &src,
            &archive,
            &["--xattrs", "--xattrs-include=*", "--numeric-owner"],
        );

        let (mount, _lo, stats) = install(work.path(), &archive);
        let root = mount.path();
        assert_eq!(stats, WriteStats { bytes: 2, files: 3 });
        for (key, value) in values {
            assert_eq!(
                xattr::get(root.join("notes"), key).unwrap().as_deref(),
                Some(value),
                "{key}"
            );
        }
        assert_eq!(
            xattr::get(root.join("srv/tagged"), "user.bin")
                .unwrap()
                .as_deref(),
            Some(&bin[..])
        );
        assert!(!root.join("evil").exists());
        mount.unmount().unwrap();
    }

    /// Paths and link targets over the 100 bytes of a ustar field arrive
    /// through GNU long-name headers (`--format=gnu`) and PAX `path` /
    /// `linkpath` records (`--format=posix`).
    #[test]
    fn long_paths_and_link_targets() {
        let work = tempfile::tempdir().unwrap();
        let src = work.path().join("src");
        let dir = format!("usr/share/{}/{}", "d".repeat(90), "e".repeat(60));
        let file = format!("{dir}/{}.txt", "f".repeat(120));
        assert!(file.len() > 255);
        fs::create_dir_all(src.join(&dir)).unwrap();
        fs::write(src.join(&file), b"long\n").unwrap();
        chown(&src.join(&file), 1234, 5678);
        set_mtime(&src.join(&file), 1_600_000_000);
        let target = format!("/{file}");
        symlink(&target, src.join("long-link")).unwrap();
        fs::hard_link(src.join(&file), src.join(format!("{dir}/hard"))).unwrap();

        for format in ["--format=gnu", "--format=posix"] {
            let archive = work.path().join("long.tar");
            tar_with(&src, &archive, &[format, "--numeric-owner"]);
            let root = work.path().join(format!("root{format}"));
            fs::create_dir(&root).unwrap();
            let stats = extract_tar(&mut File::open(&archive).unwrap(), &root).unwrap();
            assert_eq!(stats.bytes, 5, "{format}");
            assert_eq!(fs::read(root.join(&file)).unwrap(), b"long\n", "{format}");
            assert_meta(&root.join(&file), 0o644, 1234, 5678);
            assert_eq!(lstat(&root.join(&file)).mtime(), 1_600_000_000);
            assert_eq!(
                fs::read_link(root.join("long-link")).unwrap(),
                PathBuf::from(&target),
                "{format}"
            );
            let hard = lstat(&root.join(format!("{dir}/hard")));
            assert_eq!(hard.ino(), lstat(&root.join(&file)).ino(), "{format}");
            assert_eq!(hard.nlink(), 2, "{format}");
        }
    }

    #[test]
    fn extracts_gnu_sparse_files_with_extended_maps() {
        let work = tempfile::tempdir().unwrap();
        let src = work.path().join("src");
        fs::create_dir(&src).unwrap();
        // 30 islands of data: more regions than the header holds, so the
        // sparse map continues in extension blocks.
        let f = File::create(src.join("sparse")).unwrap();
        f.set_len(8 << 20).unwrap();
        for i in 0..30u64 {
            let island = format!("island {i}\n").repeat(100);
            std::os::unix::fs::FileExt::write_at(&f, island.as_bytes(), i * 250_000 + 7).unwrap();
        }
        drop(f);
        let root = sparse_round_trip(work.path(), &src, 8 << 20);
        // Holes stay holes.
        assert!(lstat(&root.join("sparse")).blocks() * 512 < 2 << 20);
    }

    #[test]
    fn never_writes_through_symlinks() {
        use ::tar::EntryType as T;
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        fs::create_dir(&root).unwrap();
        let away = outer.path().join("away");
        fs::create_dir(&away).unwrap();
        fs::write(away.join("secret"), b"outside").unwrap();

        // A hard link whose target path leaves the root through a symlink.
        let tar = raw_tar(&[
            ("evil", T::Symlink, away.to_str().unwrap(), b""),
            ("hl", T::Link, "evil/secret", b""),
        ]);
        let msg = extract_err(&tar, &root);
        assert!(
            msg.starts_with("refusing tar entry hl: resolving the link target evil/secret: "),
            "{msg}"
        );
        assert!(msg.ends_with("leads outside the root"), "{msg}");
        assert!(!root.join("hl").exists());

        // A file entry named like an earlier symlink is a duplicate: refused,
        // and nothing is written through the symlink.
        let tar = raw_tar(&[
            ("x", T::Symlink, away.join("secret").to_str().unwrap(), b""),
            ("x", T::Regular, "", b"inside"),
        ]);
        let msg = extract_err(&tar, &root);
        assert!(msg.contains("x appears twice in the archive"), "{msg}");
        assert_eq!(fs::read(away.join("secret")).unwrap(), b"outside");
    }
}
