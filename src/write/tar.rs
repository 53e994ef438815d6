//! Tar writer: a root filesystem as a tar stream, extracted onto a freshly
//! formatted ext4 slot.
//!
//! The stream is read with [`super::pax::TarReader`], which applies PAX,
//! GNU long-name and old GNU sparse headers itself (the `tar` crate's PAX
//! parser splits records at newlines and loses multi-line ACL text and
//! binary xattr values). Every entry is then checked by [`plan`] and made
//! here, confined to the root:
//!
//! - paths are relative; absolute paths and `..` are refused, naming the
//!   entry; parent directories that are missing are created (0755), and a
//!   symlink on the way is followed only if it stays inside the root;
//! - an existing non-directory in the way is removed first, so nothing is
//!   ever written through a symlink or an earlier hard link;
//! - regular files get their data (holes kept for old GNU sparse files),
//!   then owner, mode (after the owner: chown clears setuid), xattrs (after
//!   the owner: chown clears `security.capability`) and mtime;
//! - hard links must point at a path inside the root; symlinks get owner,
//!   xattrs and mtime without following them; device nodes and FIFOs are
//!   made with `mknod`;
//! - directories are created at once, but their owner, mode, xattrs (default
//!   ACLs included) and mtime are applied after the last entry (creating
//!   children changes a directory's mtime, and an early default ACL would be
//!   inherited by children that have their own); the entry `./` does this
//!   for the root itself.
//!
//! xattrs come from `SCHILY.xattr.*` records (GNU tar `--xattrs`); POSIX
//! ACLs from `SCHILY.xattr.system.posix_acl_*` when present, else from the
//! `SCHILY.acl.*` text (GNU tar `--acls`), whose user and group names are
//! resolved on this system as GNU tar would.
//!
//! Limits: entries are handled in archive order, in one pass; PAX sparse
//! files (`GNU.sparse.*`, written by GNU tar `--format=posix --sparse`) and
//! entry types without a filesystem meaning are refused, naming the entry.
//! Old GNU sparse entries are supported. Mtimes are whole seconds. Data is
//! made durable by one `syncfs` at the end.

use anyhow::{bail, ensure, Context, Result};
use nix::fcntl::AtFlags;
use nix::sys::stat::{
    fchmodat, makedev, mknod, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, Gid, Group, Uid, User};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufReader, ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use super::pax::{encode_acl, Member, TarReader};
use super::WriteStats;
use crate::mount::{sync_fs, Access, TempMount};
use crate::util::run;

/// Read buffer between the (decompressing) payload stream and the tar parser.
const READ_BUFFER: usize = 1 << 20;

/// Longest ext4 volume label, in bytes.
const MAX_LABEL: usize = 16;

/// Formats `dev` as a fresh ext4 filesystem labelled `label`. Inode tables
/// are initialised lazily (the kernel finishes them in the background), so
/// this takes seconds, not minutes, on a large slot. The journal is zeroed:
/// a lazily initialised journal risks replaying stale blocks after a crash
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
/// numeric owners, modes (with setuid, setgid and sticky bits), mtimes,
/// xattrs and ACLs, hard links, symlinks, device nodes and FIFOs; then syncs
/// the filesystem once.
pub fn extract_tar(reader: &mut dyn Read, root: &Path) -> Result<WriteStats> {
    let root = root
        .canonicalize()
        .with_context(|| format!("resolving {}", root.display()))?;
    let mut tar = TarReader::new(BufReader::with_capacity(READ_BUFFER, reader));
    let mut stats = WriteStats::default();
    let mut dirs = Vec::new();
    while let Some(member) = tar.next_member()? {
        crate::signal::check()?;
        crate::failpoint!("extract-member");
        extract_member(&mut tar, member, &root, &mut dirs, &mut stats)?;
    }
    // Archive order: metadata changes on a child never touch its parent's
    // mtime, and as root, restrictive parent modes do not get in the way.
    for dir in &dirs {
        finish_dir(dir).with_context(|| format!("extracting tar entry {}", dir.name))?;
    }
    sync_fs(&root)?;
    Ok(stats)
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

/// Owner, mode, mtime and xattrs of an entry.
struct Meta {
    /// Entry name, for errors.
    name: String,
    /// Where the entry was created.
    path: PathBuf,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

fn extract_member<R: Read>(
    tar: &mut TarReader<R>,
    mut member: Member,
    root: &Path,
    dirs: &mut Vec<Meta>,
    stats: &mut WriteStats,
) -> Result<()> {
    let (rel, action) = plan(&member)?;
    let name = member.name.clone();
    let mut meta = Meta {
        name: name.clone(),
        path: PathBuf::new(),
        mode: member.mode,
        uid: member.uid,
        gid: member.gid,
        mtime: member.mtime,
        xattrs: member_xattrs(&mut member)?,
    };
    let extracting = || format!("extracting tar entry {name}");
    match action {
        Action::Root => {
            meta.path = root.to_path_buf();
            dirs.push(meta);
            return Ok(());
        }
        Action::Dir => {
            meta.path = create_dir(root, &rel).with_context(extracting)?;
            dirs.push(meta);
        }
        Action::File => {
            meta.path = target(root, &rel).with_context(extracting)?;
            write_file(tar, &member, &meta).with_context(extracting)?;
            stats.bytes += member.file_size;
        }
        Action::HardLink(to) => hard_link(root, &rel, &to).with_context(extracting)?,
        Action::Symlink => {
            meta.path = target(root, &rel).with_context(extracting)?;
            let link = link_target(&member)?;
            make_symlink(link, &meta).with_context(extracting)?;
        }
        Action::Node(kind, rdev) => {
            meta.path = target(root, &rel).with_context(extracting)?;
            make_node(kind, rdev, &meta).with_context(extracting)?;
        }
    }
    stats.files += 1;
    Ok(())
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

/// Resolves the parent directories of `rel` inside `root` and returns the
/// parent; missing ones are created (0755) when `create` is set. A symlink
/// on the way is followed only if it resolves to a directory inside `root`.
fn resolve_parent(root: &Path, rel: &Path, create: bool) -> Result<PathBuf> {
    let mut dir = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(dir);
    };
    for part in parent.components() {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                let real = dir
                    .canonicalize()
                    .with_context(|| format!("resolving {}", dir.display()))?;
                if !real.starts_with(root) {
                    bail!("{} leads outside the root", dir.display());
                }
                if !real.is_dir() {
                    bail!("{} is not a directory", dir.display());
                }
                dir = real;
            }
            Ok(_) => bail!("{} is not a directory", dir.display()),
            Err(e) if e.kind() == ErrorKind::NotFound && create => fs::DirBuilder::new()
                .mode(0o755)
                .create(&dir)
                .with_context(|| format!("creating {}", dir.display()))?,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        }
    }
    Ok(dir)
}

/// Final path of `rel` under `root`, its parents prepared.
fn target(root: &Path, rel: &Path) -> Result<PathBuf> {
    let file = rel
        .file_name()
        .with_context(|| format!("{} has no file name", rel.display()))?;
    Ok(resolve_parent(root, rel, true)?.join(file))
}

/// Removes a non-directory at `path`, so a new object can take its place.
fn clear(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => bail!("{} exists and is a directory", path.display()),
        Ok(_) => fs::remove_file(path).with_context(|| format!("removing {}", path.display())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Creates the directory `rel` (an existing one is kept); its metadata is
/// applied later by [`finish_dir`].
fn create_dir(root: &Path, rel: &Path) -> Result<PathBuf> {
    let path = target(root, rel)?;
    match fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("{} exists and is not a directory", path.display()),
        Err(e) if e.kind() == ErrorKind::NotFound => fs::DirBuilder::new()
            .mode(0o755)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    Ok(path)
}

/// Creates the regular file `meta.path` from the member's data (sparse
/// regions written at their offsets, holes left as holes) and applies its
/// metadata.
fn write_file<R: Read>(tar: &mut TarReader<R>, member: &Member, meta: &Meta) -> Result<()> {
    let path = &meta.path;
    clear(path)?;
    // create_new: never follows a symlink or reuses an inode.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    match &member.sparse {
        None => copy_data(tar, &mut file, member.size, path)?,
        Some(regions) => {
            for region in regions {
                file.seek(SeekFrom::Start(region.offset))
                    .with_context(|| format!("seeking in {}", path.display()))?;
                copy_data(tar, &mut file, region.len, path)?;
            }
            file.set_len(member.file_size)
                .with_context(|| format!("setting the size of {}", path.display()))?;
        }
    }
    drop(file);
    apply_meta(meta, true)
}

/// Copies `len` bytes of the current entry's data into `file`.
fn copy_data<R: Read>(
    tar: &mut TarReader<R>,
    file: &mut File,
    mut len: u64,
    path: &Path,
) -> Result<()> {
    while len > 0 {
        let chunk = tar.data(len)?;
        ensure!(
            !chunk.is_empty(),
            "the entry holds less data than its sparse map lists"
        );
        file.write_all(chunk)
            .with_context(|| format!("writing {}", path.display()))?;
        len -= chunk.len() as u64;
    }
    Ok(())
}

/// Hard-links `rel` to `to`, both relative to `root`. The link target's
/// directories must already resolve inside the root; link(2) does not
/// follow a symlink at its last component.
fn hard_link(root: &Path, rel: &Path, to: &Path) -> Result<()> {
    let source_name = to
        .file_name()
        .with_context(|| format!("{} has no file name", to.display()))?;
    let source = resolve_parent(root, to, false)?.join(source_name);
    let path = target(root, rel)?;
    if path == source {
        return Ok(());
    }
    clear(&path)?;
    fs::hard_link(&source, &path)
        .with_context(|| format!("linking {} to {}", path.display(), source.display()))
}

/// Creates the symlink `meta.path` pointing at `link` and applies its
/// owner, xattrs and mtime to the link itself.
fn make_symlink(link: &Path, meta: &Meta) -> Result<()> {
    clear(&meta.path)?;
    std::os::unix::fs::symlink(link, &meta.path)
        .with_context(|| format!("creating symlink {}", meta.path.display()))?;
    apply_meta(meta, false)
}

/// Creates a device node or FIFO, replacing a non-directory in its way, and
/// applies its metadata.
fn make_node(kind: SFlag, rdev: u64, meta: &Meta) -> Result<()> {
    let path = &meta.path;
    clear(path)?;
    // The umask may strip bits here; apply_meta sets the exact mode.
    mknod(
        path,
        kind,
        Mode::from_bits_truncate(meta.mode & 0o777),
        rdev,
    )
    .with_context(|| format!("creating device node {}", path.display()))?;
    apply_meta(meta, true)
}

/// Applies deferred directory metadata, if the directory is still one.
fn finish_dir(meta: &Meta) -> Result<()> {
    let m = fs::symlink_metadata(&meta.path)
        .with_context(|| format!("reading {}", meta.path.display()))?;
    if !m.is_dir() {
        bail!("{} is no longer a directory", meta.path.display());
    }
    apply_meta(meta, true)
}

/// Sets owner, then mode (chown clears setuid/setgid; skipped for symlinks,
/// which have none), then xattrs (chown also clears security.capability),
/// then mtime, without following a symlink at `meta.path`.
fn apply_meta(meta: &Meta, chmod: bool) -> Result<()> {
    let path = &meta.path;
    fchownat(
        None,
        path,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .with_context(|| {
        format!(
            "setting owner of {} to {}:{}",
            path.display(),
            meta.uid,
            meta.gid
        )
    })?;
    if chmod {
        // Never a symlink here: this module just created the object.
        fchmodat(
            None,
            path,
            Mode::from_bits_truncate(meta.mode),
            FchmodatFlags::FollowSymlink,
        )
        .with_context(|| format!("setting mode of {} to {:04o}", path.display(), meta.mode))?;
    }
    for (key, value) in &meta.xattrs {
        set_xattr(path, key, value)?;
    }
    let t = TimeSpec::new(meta.mtime, 0);
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink)
        .with_context(|| format!("setting mtime of {}", path.display()))?;
    Ok(())
}

/// Sets one xattr on `path` itself (`lsetxattr`).
fn set_xattr(path: &Path, key: &OsString, value: &[u8]) -> Result<()> {
    xattr::set(path, key, value).with_context(|| {
        format!(
            "setting xattr {} on {}",
            key.to_string_lossy(),
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::{mount_point_of, LoopDevice};
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
        assert!(msg.starts_with("extracting tar entry evil/fifo: "), "{msg}");
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

    #[test]
    fn refuses_pax_sparse_files() {
        let work = tempfile::tempdir().unwrap();
        let src = work.path().join("src");
        fs::create_dir(&src).unwrap();
        sparse_source(&src);
        let archive = work.path().join("sparse.tar");
        tar_with(&src, &archive, &["--format=posix", "--sparse"]);
        let root = work.path().join("root");
        fs::create_dir(&root).unwrap();
        let tar = fs::read(&archive).unwrap();
        let msg = extract_err(&tar, &root);
        assert!(
            msg.starts_with("refusing tar entry ./sparse: PAX sparse files are not supported"),
            "{msg}"
        );
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
        assert!(msg.starts_with("extracting tar entry hl: "), "{msg}");
        assert!(msg.ends_with("leads outside the root"), "{msg}");
        assert!(!root.join("hl").exists());

        // A file entry replaces a symlink instead of writing through it.
        let tar = raw_tar(&[
            ("x", T::Symlink, away.join("secret").to_str().unwrap(), b""),
            ("x", T::Regular, "", b"inside"),
        ]);
        extract_tar(&mut &tar[..], &root).unwrap();
        assert_eq!(fs::read(away.join("secret")).unwrap(), b"outside");
        assert!(lstat(&root.join("x")).is_file());
        assert_eq!(fs::read(root.join("x")).unwrap(), b"inside");
    }
}
