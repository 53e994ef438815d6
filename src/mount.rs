//! Temporary mounts and loop devices, both as RAII guards.
//!
//! abup mounts slots only for short, well-defined jobs: extracting a new root
//! filesystem, copying preserved files across, reading an old slot. Each job
//! holds a [`TempMount`] and the mount goes away when the guard does, even on
//! an error path or a panic. [`LoopDevice`] does the same for disk-image files
//! (tests, and installing onto an image instead of a real disk).
//!
//! [`mount_point_of`] answers "is this block device mounted anywhere?", which
//! the installer asks before it formats or overwrites a slot.

use anyhow::{bail, Context, Result};
use nix::mount::{MntFlags, MsFlags};
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use crate::util::run;

/// Whether a [`TempMount`] may be written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Mounted read-write.
    ReadWrite,
    /// Mounted read-only (`MS_RDONLY`).
    ReadOnly,
}

/// A block device mounted at a fresh temporary directory.
///
/// The mount is always `nosuid,nodev`: abup reads and writes files through it,
/// it never runs programs or opens device nodes from a slot. (Creating device
/// nodes with `mknod` still works on a `nodev` mount.)
///
/// Call [`TempMount::unmount`] to sync, unmount and see errors. Dropping the
/// guard unmounts as well, falling back to a lazy detach (`MNT_DETACH`) if the
/// filesystem is busy, so that a panic leaks no mount. The mount point
/// directory is removed with a plain `rmdir` only after the filesystem is
/// gone: a recursive delete could otherwise empty the slot.
#[derive(Debug)]
pub struct TempMount {
    dev: PathBuf,
    /// The mount point. `None` once the guard has been cleaned up.
    dir: Option<PathBuf>,
}

impl TempMount {
    /// Mounts `dev` (a filesystem of type `fstype`, e.g. `"ext4"`) at a new
    /// temporary directory.
    pub fn mount(dev: &Path, fstype: &str, access: Access) -> Result<TempMount> {
        let tmp = tempfile::Builder::new()
            .prefix("abup-mount-")
            .tempdir()
            .context("creating a temporary mount point")?;
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if access == Access::ReadOnly {
            flags |= MsFlags::MS_RDONLY;
        }
        let mounted = nix::mount::mount(Some(dev), tmp.path(), Some(fstype), flags, None::<&str>);
        // From here on the directory is ours to remove (non-recursively):
        // TempDir's own Drop would delete recursively, which must never run
        // against a mounted filesystem.
        let dir = tmp.keep();
        if let Err(e) = mounted {
            let _ = fs::remove_dir(&dir);
            return Err(e).with_context(|| {
                format!("mounting {} ({fstype}) at {}", dev.display(), dir.display())
            });
        }
        Ok(TempMount {
            dev: dev.to_path_buf(),
            dir: Some(dir),
        })
    }

    /// Mounts `dev` as ext4, the filesystem of abup's root slots.
    pub fn ext4(dev: &Path, access: Access) -> Result<TempMount> {
        TempMount::mount(dev, "ext4", access)
    }

    /// The directory the filesystem is mounted at.
    pub fn path(&self) -> &Path {
        // `dir` is only `None` after `unmount` consumed the guard or during
        // Drop, where `path` cannot be called.
        self.dir.as_deref().unwrap_or(Path::new(""))
    }

    /// The block device that is mounted.
    pub fn device(&self) -> &Path {
        &self.dev
    }

    /// Flushes the filesystem (`syncfs`), unmounts it and removes the mount
    /// point. Any failure is reported; if unmounting fails, Drop still
    /// detaches the mount lazily so that nothing stays mounted.
    pub fn unmount(mut self) -> Result<()> {
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        sync_fs(&dir)?;
        nix::mount::umount2(&dir, MntFlags::empty())
            .with_context(|| format!("unmounting {} from {}", self.dev.display(), dir.display()))?;
        self.dir = None;
        fs::remove_dir(&dir).with_context(|| format!("removing mount point {}", dir.display()))?;
        Ok(())
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else {
            return;
        };
        // Best effort: nobody can see errors here, so try hard and warn.
        let _ = sync_fs(&dir);
        let unmounted = nix::mount::umount2(&dir, MntFlags::empty())
            .or_else(|_| nix::mount::umount2(&dir, MntFlags::MNT_DETACH));
        match unmounted {
            Ok(()) => {
                let _ = fs::remove_dir(&dir);
            }
            Err(e) => eprintln!(
                "warning: {} is still mounted at {}: {e}",
                self.dev.display(),
                dir.display()
            ),
        }
    }
}

/// Flushes the filesystem that contains `dir` with one `syncfs` call.
pub fn sync_fs(dir: &Path) -> Result<()> {
    let f = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    nix::unistd::syncfs(f.as_raw_fd())
        .with_context(|| format!("syncing filesystem at {}", dir.display()))
}

/// One line of `/proc/self/mountinfo`, reduced to what abup needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Major number of the mounted device (field 3).
    pub major: u64,
    /// Minor number of the mounted device (field 3).
    pub minor: u64,
    /// Directory of the filesystem that is mounted (field 4; `/` unless a
    /// bind mount of a subdirectory).
    pub root: PathBuf,
    /// Where it is mounted (field 5), with octal escapes decoded.
    pub mount_point: PathBuf,
    /// Filesystem type (first field after the `-` separator).
    pub fstype: String,
    /// Mount source, e.g. `/dev/vda3` (second field after `-`).
    pub source: String,
}

/// Parses the text of `/proc/<pid>/mountinfo` (see proc(5)).
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountInfo>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            parse_mountinfo_line(line)
                .with_context(|| format!("parsing mountinfo line {}: {line:?}", i + 1))
        })
        .collect()
}

fn parse_mountinfo_line(line: &str) -> Result<MountInfo> {
    let fields: Vec<&str> = line.split(' ').collect();
    if fields.len() < 10 {
        bail!("expected at least 10 fields, found {}", fields.len());
    }
    let (major, minor) = fields[2]
        .split_once(':')
        .context("field 3 is not major:minor")?;
    let major = major.parse().context("parsing the major number")?;
    let minor = minor.parse().context("parsing the minor number")?;
    // Optional fields (shared:N, master:N …) end with a lone "-".
    let sep = fields[6..]
        .iter()
        .position(|f| *f == "-")
        .map(|p| p + 6)
        .context("no \"-\" separator after the optional fields")?;
    let fstype = fields.get(sep + 1).context("no filesystem type")?;
    let source = fields.get(sep + 2).context("no mount source")?;
    Ok(MountInfo {
        major,
        minor,
        root: PathBuf::from(unescape(fields[3])),
        mount_point: PathBuf::from(unescape(fields[4])),
        fstype: unescape(fstype),
        source: unescape(source),
    })
}

/// Decodes the kernel's octal escapes (`\040` for space, `\011` tab, `\012`
/// newline, `\134` backslash). Mount points may contain any byte; the few
/// that are not valid UTF-8 are kept as raw bytes.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if let Some(byte) = octal_escape(&b[i..]) {
            out.push(byte);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    match String::from_utf8(out) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

/// The byte encoded by a `\NNN` escape at the start of `b`, if there is one.
fn octal_escape(b: &[u8]) -> Option<u8> {
    match b {
        [b'\\', d @ ..] if d.len() >= 3 && d[..3].iter().all(|c| (b'0'..=b'7').contains(c)) => {
            let v = d[..3].iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
            u8::try_from(v).ok()
        }
        _ => None,
    }
}

/// Returns the first mount point of the block device `dev`, or `None` if it
/// is not mounted in this mount namespace.
///
/// Devices are compared by number (the `rdev` of `dev` against field 3 of
/// `/proc/self/mountinfo`), so any name for the device works:
/// `/dev/vda3`, `/dev/disk/by-partlabel/rootfs-b`, a loop partition.
pub fn mount_point_of(dev: &Path) -> Result<Option<PathBuf>> {
    let meta = fs::metadata(dev).with_context(|| format!("reading {}", dev.display()))?;
    if !meta.file_type().is_block_device() {
        bail!("{} is not a block device", dev.display());
    }
    let rdev = meta.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mounts = parse_mountinfo(&text).with_context(|| format!("reading {}", path.display()))?;
    Ok(mounts
        .into_iter()
        .find(|m| m.major == major && m.minor == minor)
        .map(|m| m.mount_point))
}

/// A loop device attached to a file, detached again when dropped.
///
/// Used to treat disk images as disks (tests, installing onto an image) and,
/// with `offset`/`sizelimit`, to expose one partition of an image without
/// relying on partition scanning.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    attached: bool,
}

impl LoopDevice {
    /// Attaches `file` to the first free loop device (`losetup -f --show`),
    /// optionally starting at byte `offset`, limited to `sizelimit` bytes and
    /// with a logical `sector_size` (512 or 4096).
    ///
    /// `losetup -f` races with other processes grabbing the same free device,
    /// so a failed attempt is retried a few times before giving up.
    pub fn attach(
        file: &Path,
        offset: Option<u64>,
        sizelimit: Option<u64>,
        sector_size: Option<u32>,
    ) -> Result<LoopDevice> {
        let step = format!("attaching {} to a loop device", file.display());
        let mut last_err = None;
        for attempt in 0..5 {
            if attempt > 0 {
                thread::sleep(Duration::from_millis(100 * attempt));
            }
            let mut cmd = Command::new("losetup");
            cmd.arg("--find").arg("--show");
            if let Some(o) = offset {
                cmd.arg("--offset").arg(o.to_string());
            }
            if let Some(s) = sizelimit {
                cmd.arg("--sizelimit").arg(s.to_string());
            }
            if let Some(s) = sector_size {
                cmd.arg("--sector-size").arg(s.to_string());
            }
            cmd.arg(file);
            match run(&step, &mut cmd) {
                Ok(out) => {
                    let path = PathBuf::from(out.trim());
                    if path.as_os_str().is_empty() {
                        bail!("{step}: losetup printed no device name");
                    }
                    return Ok(LoopDevice {
                        path,
                        attached: true,
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("{step}: no attempt made")))
    }

    /// The loop device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Detaches the loop device (`losetup -d`), reporting errors.
    pub fn detach(mut self) -> Result<()> {
        self.attached = false;
        run(
            &format!("detaching loop device {}", self.path.display()),
            Command::new("losetup").arg("--detach").arg(&self.path),
        )
        .map(drop)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if !self.attached {
            return;
        }
        let step = format!("detaching loop device {}", self.path.display());
        if let Err(e) = run(
            &step,
            Command::new("losetup").arg("--detach").arg(&self.path),
        ) {
            eprintln!("warning: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
35 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
80 22 7:3 / /tmp/abup-mount-x\\040y rw,nosuid,nodev - ext4 /dev/loop3 rw
81 22 259:5 /sub /mnt/bind rw,relatime - ext4 /dev/loop0p1 rw,errors=remount-ro
";

    #[test]
    fn parses_mountinfo_fields() {
        let m = parse_mountinfo(SAMPLE).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[0],
            MountInfo {
                major: 253,
                minor: 1,
                root: "/".into(),
                mount_point: "/".into(),
                fstype: "ext4".into(),
                source: "/dev/vda1".into(),
            }
        );
        assert_eq!((m[1].major, m[1].minor), (0, 21));
        assert_eq!(m[1].fstype, "proc");
        // No optional fields before the separator.
        assert_eq!(m[2].fstype, "ext4");
        assert_eq!(m[2].source, "/dev/loop3");
        assert_eq!(m[3].root, PathBuf::from("/sub"));
        assert_eq!(m[3].mount_point, PathBuf::from("/mnt/bind"));
    }

    #[test]
    fn decodes_octal_escapes() {
        let m = parse_mountinfo(SAMPLE).unwrap();
        assert_eq!(m[2].mount_point, PathBuf::from("/tmp/abup-mount-x y"));
        assert_eq!(unescape(r"a\011b\012c\134d"), "a\tb\nc\\d");
        // Not an escape: left alone.
        assert_eq!(unescape(r"a\9b\"), r"a\9b\");
        assert_eq!(unescape(r"\04"), r"\04");
    }

    #[test]
    fn rejects_malformed_mountinfo() {
        let err = parse_mountinfo("22 1 253:1 / / rw shared:1 ext4 /dev/vda1 rw\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
        assert!(parse_mountinfo("22 1 2531 / / rw - ext4 /dev/vda1 rw x\n").is_err());
        assert!(parse_mountinfo("short line\n").is_err());
        assert!(parse_mountinfo("").unwrap().is_empty());
    }

    #[test]
    fn mount_point_of_rejects_non_block_devices() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let err = mount_point_of(f.path()).unwrap_err();
        assert!(err.to_string().contains("is not a block device"), "{err:#}");
    }

    /// A 32 MiB image file on a loop device with a fresh ext4 on it.
    fn ext4_loop() -> (tempfile::NamedTempFile, LoopDevice) {
        let img = tempfile::NamedTempFile::new().unwrap();
        img.as_file().set_len(32 << 20).unwrap();
        let lo = LoopDevice::attach(img.path(), None, None, None).unwrap();
        run(
            "formatting test device",
            Command::new("mkfs.ext4").args(["-F", "-q"]).arg(lo.path()),
        )
        .unwrap();
        (img, lo)
    }

    #[test]
    fn temp_mount_mounts_and_unmounts() {
        let (_img, lo) = ext4_loop();
        assert_eq!(mount_point_of(lo.path()).unwrap(), None);

        let m = TempMount::ext4(lo.path(), Access::ReadWrite).unwrap();
        let dir = m.path().to_path_buf();
        assert_eq!(mount_point_of(lo.path()).unwrap(), Some(dir.clone()));
        fs::write(dir.join("hello"), b"hi").unwrap();
        m.unmount().unwrap();
        assert_eq!(mount_point_of(lo.path()).unwrap(), None);
        assert!(!dir.exists(), "mount point directory is removed");

        // The data made it to the device; read-only mounts refuse writes.
        let m = TempMount::ext4(lo.path(), Access::ReadOnly).unwrap();
        assert_eq!(fs::read(m.path().join("hello")).unwrap(), b"hi");
        let err = fs::write(m.path().join("other"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS));
        m.unmount().unwrap();
    }

    #[test]
    fn drop_unmounts_even_when_busy() {
        let (_img, lo) = ext4_loop();
        let m = TempMount::ext4(lo.path(), Access::ReadWrite).unwrap();
        let dir = m.path().to_path_buf();
        // An open file keeps the filesystem busy: Drop must fall back to a
        // lazy detach rather than leave the mount behind.
        let busy = File::create(dir.join("busy")).unwrap();
        drop(m);
        assert_eq!(mount_point_of(lo.path()).unwrap(), None);
        drop(busy);

        let m = TempMount::ext4(lo.path(), Access::ReadWrite).unwrap();
        let dir = m.path().to_path_buf();
        drop(m);
        assert!(!dir.exists());
    }

    #[test]
    fn mount_error_names_device_and_removes_mount_point() {
        let img = tempfile::NamedTempFile::new().unwrap();
        img.as_file().set_len(1 << 20).unwrap();
        let lo = LoopDevice::attach(img.path(), None, None, None).unwrap();
        // Not formatted: mounting must fail with the device in the message.
        let err = TempMount::ext4(lo.path(), Access::ReadOnly).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with(&format!("mounting {}", lo.path().display())),
            "{msg}"
        );
    }

    #[test]
    fn loop_device_offset_and_sizelimit() {
        let img = tempfile::NamedTempFile::new().unwrap();
        img.as_file().set_len(8 << 20).unwrap();
        let lo = LoopDevice::attach(img.path(), Some(1 << 20), Some(2 << 20), Some(512)).unwrap();
        let size = fs::File::open(lo.path())
            .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
            .unwrap();
        assert_eq!(size, 2 << 20);
        lo.detach().unwrap();
        // A device still open elsewhere (udev probing it) is detached when
        // closed, so give the kernel a moment.
        let mut out = String::new();
        for _ in 0..50 {
            out = run(
                "listing loop devices",
                Command::new("losetup").arg("--associated").arg(img.path()),
            )
            .unwrap();
            if out.trim().is_empty() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(out.trim(), "", "image still attached after detach");
    }
}
