//! Tar writer: a root filesystem as a tar stream, extracted onto a freshly
//! formatted ext4 slot.
//!
//! The `tar` crate does the careful part for regular files, hard links and
//! symlinks (`unpack_in` refuses paths that leave the root, also through
//! symlinks). It does not create device nodes or FIFOs, sets no mtimes or
//! xattrs on directories and applies directory metadata immediately, so this
//! module walks the entries itself:
//!
//! - directories are created at once, but their owner, mode, xattrs and mtime
//!   are applied after the last entry (creating children changes a
//!   directory's mtime); the entry `./` does this for the root itself;
//! - character and block devices and FIFOs are made with `mknod`;
//! - everything else goes through `Entry::unpack_in` with owners, modes,
//!   mtimes and `SCHILY.xattr.*` records (GNU tar `--xattrs`) preserved.
//!
//! Limits: entries are handled in archive order, in one pass; absolute paths,
//! `..`, PAX-format sparse files (`GNU.sparse.*`, written by GNU tar
//! `--format=posix --sparse`) and entry types without a filesystem meaning are
//! refused, naming the entry. Old GNU sparse entries are supported. Mtimes
//! are whole seconds (the ustar field; PAX sub-second times are ignored).
//! Data is made durable by one `syncfs` at the end.

use anyhow::{bail, Context, Result};
use nix::fcntl::AtFlags;
use nix::sys::stat::{
    fchmodat, makedev, mknod, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, Gid, Uid};
use std::ffi::OsString;
use std::fs;
use std::io::{BufReader, ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use super::WriteStats;
use crate::mount::{sync_fs, Access, TempMount};
use crate::util::run;

/// Read buffer between the (decompressing) payload stream and the tar parser.
const READ_BUFFER: usize = 1 << 20;

/// Longest ext4 volume label, in bytes.
const MAX_LABEL: usize = 16;

/// Formats `dev` as a fresh ext4 filesystem labelled `label`. Inode tables
/// and the journal are initialised lazily, so this takes seconds, not
/// minutes, on a large slot.
pub fn format_ext4(dev: &Path, label: &str) -> Result<()> {
    if label.len() > MAX_LABEL {
        bail!("ext4 label {label:?} is longer than {MAX_LABEL} bytes");
    }
    run(
        &format!("formatting slot {}", dev.display()),
        Command::new("mkfs.ext4")
            .args(["-F", "-q", "-L", label])
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
            .arg(dev),
    )?;
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
/// xattrs, hard links, symlinks, device nodes and FIFOs; then syncs the
/// filesystem once.
pub fn extract_tar(reader: &mut dyn Read, root: &Path) -> Result<WriteStats> {
    let root = root
        .canonicalize()
        .with_context(|| format!("resolving {}", root.display()))?;
    let mut archive = ::tar::Archive::new(BufReader::with_capacity(READ_BUFFER, reader));
    // Set once here; every entry inherits these (ownership can only be set on
    // the archive).
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_mask(0);
    archive.set_overwrite(true);

    let mut stats = WriteStats::default();
    let mut dirs = Vec::new();
    let mut last = String::from("(start of archive)");
    let entries = archive.entries().context("reading the tar stream")?;
    for entry in entries {
        let mut entry =
            entry.with_context(|| format!("reading the tar stream after entry {last}"))?;
        last = entry_name(&entry);
        extract_entry(&mut entry, &root, &mut dirs, &mut stats)?;
    }
    // Archive order: metadata changes on a child never touch its parent's
    // mtime, and as root, restrictive parent modes do not get in the way.
    for dir in &dirs {
        finish_dir(dir).with_context(|| format!("extracting tar entry {}", dir.name))?;
    }
    sync_fs(&root)?;
    Ok(stats)
}

/// Owner, mode, mtime and xattrs of an entry, applied by this module rather
/// than by the tar crate.
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

fn entry_name<R: Read>(entry: &::tar::Entry<'_, R>) -> String {
    String::from_utf8_lossy(&entry.path_bytes()).into_owned()
}

fn extract_entry<R: Read>(
    entry: &mut ::tar::Entry<'_, R>,
    root: &Path,
    dirs: &mut Vec<Meta>,
    stats: &mut WriteStats,
) -> Result<()> {
    let kind = entry.header().entry_type();
    if kind.is_pax_global_extensions() {
        // Archive-wide defaults or comments (e.g. from `git archive`); the
        // records abup honours are all per entry.
        return Ok(());
    }
    let name = entry_name(entry);
    let xattrs = pax_xattrs(entry, &name)?;
    let rel = relative(
        &entry
            .path()
            .with_context(|| format!("reading the path of tar entry {name}"))?,
        &name,
    )?;

    if kind.is_dir() {
        let meta = |path| header_meta(entry, &name, path, xattrs);
        if rel.as_os_str().is_empty() {
            dirs.push(meta(root.to_path_buf())?);
            return Ok(());
        }
        let path =
            create_dir(root, &rel).with_context(|| format!("extracting tar entry {name}"))?;
        dirs.push(meta(path)?);
        stats.files += 1;
        return Ok(());
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
    if let Some(node) = node {
        let rdev = if node == SFlag::S_IFIFO {
            0
        } else {
            let header = entry.header();
            let major = header.device_major();
            let minor = header.device_minor();
            match (major, minor) {
                (Ok(Some(major)), Ok(Some(minor))) => makedev(major.into(), minor.into()),
                _ => bail!("refusing tar entry {name}: it has no valid device number"),
            }
        };
        let placeholder = PathBuf::new();
        let meta = header_meta(entry, &name, placeholder, xattrs)?;
        make_node(root, &rel, node, rdev, meta)
            .with_context(|| format!("extracting tar entry {name}"))?;
        stats.files += 1;
        return Ok(());
    }

    let is_data = kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse();
    if !(is_data || kind.is_hard_link() || kind.is_symlink()) {
        bail!(
            "refusing tar entry {name}: unsupported entry type {:?} ({:?})",
            kind,
            char::from(kind.as_byte())
        );
    }
    if kind.is_hard_link() {
        let target = entry
            .link_name()
            .with_context(|| format!("reading the link target of tar entry {name}"))?
            .with_context(|| format!("refusing tar entry {name}: hard link without a target"))?;
        relative(&target, &name)?;
    }
    let unpacked = entry
        .unpack_in(root)
        .with_context(|| format!("extracting tar entry {name}"))?;
    if !unpacked {
        bail!("refusing tar entry {name}: it escapes the root");
    }
    if kind.is_symlink() {
        // The tar crate sets xattrs on regular files only; symlinks can carry
        // security.* ones (SELinux labels).
        let path = root.join(&rel);
        for (key, value) in &xattrs {
            set_xattr(&path, key, value).with_context(|| format!("extracting tar entry {name}"))?;
        }
    }
    if is_data {
        stats.bytes += entry.size();
    }
    stats.files += 1;
    Ok(())
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

/// The `SCHILY.xattr.*` records of an entry; refuses PAX sparse files, which
/// the tar crate would extract as their raw sparse map plus data.
fn pax_xattrs<R: Read>(
    entry: &mut ::tar::Entry<'_, R>,
    name: &str,
) -> Result<Vec<(OsString, Vec<u8>)>> {
    let mut xattrs = Vec::new();
    let Some(exts) = entry
        .pax_extensions()
        .with_context(|| format!("reading PAX records of tar entry {name}"))?
    else {
        return Ok(xattrs);
    };
    let mut sparse_name = None;
    let mut sparse = false;
    for ext in exts {
        let ext = ext.with_context(|| format!("reading PAX records of tar entry {name}"))?;
        let key = ext.key_bytes();
        if key.starts_with(b"GNU.sparse.") {
            sparse = true;
            if key == b"GNU.sparse.name" {
                sparse_name = Some(String::from_utf8_lossy(ext.value_bytes()).into_owned());
            }
        } else if let Some(attr) = key.strip_prefix(b"SCHILY.xattr.") {
            xattrs.push((
                std::ffi::OsStr::from_bytes(attr).to_owned(),
                ext.value_bytes().to_vec(),
            ));
        }
    }
    if sparse {
        bail!(
            "refusing tar entry {}: PAX sparse files are not supported; \
             create the archive without --sparse or with --format=gnu",
            sparse_name.as_deref().unwrap_or(name)
        );
    }
    Ok(xattrs)
}

fn header_meta<R: Read>(
    entry: &::tar::Entry<'_, R>,
    name: &str,
    path: PathBuf,
    xattrs: Vec<(OsString, Vec<u8>)>,
) -> Result<Meta> {
    let header = entry.header();
    let bad = |what: &str| format!("refusing tar entry {name}: invalid {what} in header");
    let id = |v: u64, what: &str| u32::try_from(v).with_context(|| bad(what));
    Ok(Meta {
        name: name.to_string(),
        path,
        mode: header.mode().with_context(|| bad("mode"))? & 0o7777,
        uid: id(header.uid().with_context(|| bad("uid"))?, "uid")?,
        gid: id(header.gid().with_context(|| bad("gid"))?, "gid")?,
        mtime: i64::try_from(header.mtime().with_context(|| bad("mtime"))?)
            .with_context(|| bad("mtime"))?,
        xattrs,
    })
}

/// Makes sure the parent directories of `rel` exist inside `root`, creating
/// missing ones, and returns the parent. A symlink on the way is followed
/// only if it resolves to a directory inside `root`.
fn prepare_parent(root: &Path, rel: &Path) -> Result<PathBuf> {
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
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?
            }
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
    Ok(prepare_parent(root, rel)?.join(file))
}

/// Creates the directory `rel` (an existing one is kept); its metadata is
/// applied later by [`finish_dir`].
fn create_dir(root: &Path, rel: &Path) -> Result<PathBuf> {
    let path = target(root, rel)?;
    match fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("{} exists and is not a directory", path.display()),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    Ok(path)
}

/// Creates a device node or FIFO, replacing a non-directory in its way, and
/// applies its metadata.
fn make_node(root: &Path, rel: &Path, kind: SFlag, rdev: u64, mut meta: Meta) -> Result<()> {
    meta.path = target(root, rel)?;
    let path = &meta.path;
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => bail!("{} exists and is a directory", path.display()),
        Ok(_) => fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?,
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    // The umask may strip bits here; apply_meta sets the exact mode.
    mknod(
        path,
        kind,
        Mode::from_bits_truncate(meta.mode & 0o777),
        rdev,
    )
    .with_context(|| format!("creating device node {}", path.display()))?;
    apply_meta(&meta)
}

/// Applies deferred directory metadata, if the directory is still one.
fn finish_dir(meta: &Meta) -> Result<()> {
    let m = fs::symlink_metadata(&meta.path)
        .with_context(|| format!("reading {}", meta.path.display()))?;
    if !m.is_dir() {
        bail!("{} is no longer a directory", meta.path.display());
    }
    apply_meta(meta)
}

/// Sets owner, then mode (chown clears setuid/setgid), then xattrs (chown
/// also clears security.capability), then mtime, without following a
/// symlink at `meta.path`.
fn apply_meta(meta: &Meta) -> Result<()> {
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
    // Never a symlink here: directories, device nodes and FIFOs only.
    fchmodat(
        None,
        path,
        Mode::from_bits_truncate(meta.mode),
        FchmodatFlags::FollowSymlink,
    )
    .with_context(|| format!("setting mode of {} to {:04o}", path.display(), meta.mode))?;
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
        run(
            "creating test archive",
            Command::new("tar")
                .args(["--create", "--format=posix", "--sparse", "-C"])
                .arg(&src)
                .arg("-f")
                .arg(&archive)
                .arg("./sparse"),
        )
        .unwrap();
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
        let archive = work.path().join("sparse.tar");
        run(
            "creating test archive",
            Command::new("tar")
                .args(["--create", "--format=gnu", "--sparse", "-C"])
                .arg(&src)
                .arg("-f")
                .arg(&archive)
                .arg("./sparse"),
        )
        .unwrap();
        let root = work.path().join("root");
        fs::create_dir(&root).unwrap();
        let stats = extract_tar(&mut File::open(&archive).unwrap(), &root).unwrap();
        assert_eq!(
            stats,
            WriteStats {
                bytes: 1 << 20,
                files: 1
            }
        );
        assert_eq!(
            fs::read(root.join("sparse")).unwrap(),
            fs::read(src.join("sparse")).unwrap()
        );
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
}
