//! Temporary mounts and loop devices, both as RAII guards, and the private
//! mount namespace that makes sure neither outlives abup.
//!
//! abup mounts slots only for short, well-defined jobs: extracting a new root
//! filesystem, copying preserved files across, reading an old slot. Each job
//! holds a [`TempMount`] and the mount goes away when the guard does, even on
//! an error path or a panic. [`LoopDevice`] does the same for disk-image files
//! (tests, and installing onto an image instead of a real disk).
//!
//! Guards do not run when the process is killed, so every verb that mounts
//! first calls [`enter_private_namespace`]: abup's mounts then live in a mount
//! namespace of its own, invisible to the rest of the system, and the kernel
//! unmounts them when the last process in it exits, however it exits. Loop
//! devices are attached with `LO_FLAGS_AUTOCLEAR` and held open by their
//! guard, so the kernel detaches them on last close (a mounted loop device
//! keeps a reference until its mount, and so the namespace, is gone). Mount
//! points live under [`RUNTIME_DIR`], in a directory per process; directories
//! of processes that are gone are removed at the start of the next run.
//!
//! [`mount_point_of`] answers "is this block device mounted anywhere?", which
//! the installer asks before it formats or overwrites a slot. It reads the
//! mount table of the namespace abup was started in, not abup's own, so it
//! sees the system's mounts and is not confused by abup's.

use anyhow::{bail, Context, Result};
use nix::mount::{MntFlags, MsFlags};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::Duration;

/// abup's runtime directory: mount points and run locks.
pub const RUNTIME_DIR: &str = "/run/abup";

/// `/proc/self/mountinfo` opened before unsharing: the kernel ties the open
/// file to the namespace it was opened in, so reading it again later shows
/// the system's mounts as they are now, not abup's.
static HOST_MOUNTINFO: OnceLock<Mutex<File>> = OnceLock::new();

/// The mount namespace abup was started in (`/proc/self/ns/mnt` opened
/// before unsharing), for the few jobs that must act there: see
/// [`crate::leftovers`].
static HOST_NS: OnceLock<File> = OnceLock::new();

/// Moves this process into a private mount namespace of its own (mounts made
/// from now on are invisible elsewhere and vanish with the process), after
/// keeping a view of the original namespace's mount table and removing
/// mount-point directories left by abup processes that are gone.
///
/// Needs root (CAP_SYS_ADMIN). Call it once, before anything is mounted and
/// before any thread is started.
pub fn enter_private_namespace() -> Result<()> {
    if HOST_MOUNTINFO.get().is_some() {
        return Ok(());
    }
    let host = File::open("/proc/self/mountinfo").context("opening /proc/self/mountinfo")?;
    let ns = File::open("/proc/self/ns/mnt").context("opening /proc/self/ns/mnt")?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .context("creating a private mount namespace (unshare)")?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the mount namespace private")?;
    let _ = HOST_MOUNTINFO.set(Mutex::new(host));
    let _ = HOST_NS.set(ns);
    remove_stale_mount_dirs();
    Ok(())
}

/// The mount table of the namespace abup was started in (see
/// [`enter_private_namespace`]), or of the current one if it never left it.
pub fn host_mounts() -> Result<Vec<MountInfo>> {
    let text = match HOST_MOUNTINFO.get() {
        Some(f) => {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            let mut text = String::new();
            f.rewind()
                .and_then(|_| f.read_to_string(&mut text))
                .context("reading the mount table abup was started with")?;
            text
        }
        None => {
            fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?
        }
    };
    parse_mountinfo(&text).context("reading the mount table")
}

/// The mount namespace abup was started in, if it left it.
pub fn host_namespace() -> Option<&'static File> {
    HOST_NS.get()
}

/// This process's directory for mount points: `RUNTIME_DIR/mnt-<pid>`.
fn mount_dir() -> PathBuf {
    Path::new(RUNTIME_DIR).join(format!("mnt-{}", std::process::id()))
}

/// Removes `RUNTIME_DIR/mnt-<pid>` directories whose process is gone. Only
/// empty directories are removed (`rmdir`), and only those no mount in the
/// system's namespace uses; a live abup's directories are never touched (its
/// mounts, invisible from here, would otherwise be detached).
fn remove_stale_mount_dirs() {
    let Ok(entries) = fs::read_dir(RUNTIME_DIR) else {
        return;
    };
    let mounted: Vec<PathBuf> = host_mounts()
        .map(|m| m.into_iter().map(|m| m.mount_point).collect())
        .unwrap_or_default();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("mnt-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // Any live process keeps its directory: test binaries and library
        // users mount through here too, under another name than `abup`.
        if pid_alive(pid) {
            continue;
        }
        for sub in fs::read_dir(e.path()).into_iter().flatten().flatten() {
            if !mounted.contains(&sub.path()) {
                let _ = fs::remove_dir(sub.path());
            }
        }
        let _ = fs::remove_dir(e.path());
    }
}

/// Whether process `pid` exists. Any process counts, not only one named
/// `abup`: programs linking the library (its unit tests) mount there too,
/// and a reused pid only delays the clean-up of a dead run's directory.
pub fn pid_alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether a [`TempMount`] may be written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Mounted read-write.
    ReadWrite,
    /// Mounted read-only (`MS_RDONLY`).
    ReadOnly,
}

/// A block device mounted at a fresh directory under [`RUNTIME_DIR`].
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
    /// directory under [`RUNTIME_DIR`].
    pub fn mount(dev: &Path, fstype: &str, access: Access) -> Result<TempMount> {
        let parent = mount_dir();
        fs::create_dir_all(&parent)
            .with_context(|| format!("creating mount point directory {}", parent.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix("m-")
            .tempdir_in(&parent)
            .with_context(|| format!("creating a mount point in {}", parent.display()))?;
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

    /// Remounts a read-only mount read-write, for the first write through
    /// it: until then the filesystem (superblock included) stays untouched.
    pub fn remount_rw(&self) -> Result<()> {
        nix::mount::mount(
            None::<&str>,
            self.path(),
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .with_context(|| {
            format!(
                "remounting {} read-write at {}",
                self.dev.display(),
                self.path().display()
            )
        })
    }

    /// Flushes the filesystem (`syncfs`), unmounts it and removes the mount
    /// point. Any failure is reported; if unmounting fails, Drop still
    /// detaches the mount lazily so that nothing stays mounted.
    pub fn unmount(mut self) -> Result<()> {
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        sync_fs(&dir)?;
        umount_retrying(&dir)
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
        let unmounted =
            umount_retrying(&dir).or_else(|_| nix::mount::umount2(&dir, MntFlags::MNT_DETACH));
        match unmounted {
            Ok(()) => {
                let _ = fs::remove_dir(&dir);
            }
            Err(e) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "warning: {} is still mounted at {}: {e}",
                    self.dev.display(),
                    dir.display()
                );
            }
        }
    }
}

/// `umount2(dir)`, retried for about a second while it says EBUSY.
///
/// A filesystem is briefly busy when another thread of this process forks a
/// child (the child holds copies of every fd until it execs) or a probe
/// (udev, blkid) looks at it; such holds end by themselves, so waiting beats
/// failing the step or detaching lazily.
fn umount_retrying(dir: &Path) -> nix::Result<()> {
    let mut tries = 0;
    loop {
        match nix::mount::umount2(dir, MntFlags::empty()) {
            Err(nix::errno::Errno::EBUSY) if tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
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
/// is not mounted in the mount namespace abup was started in (see
/// [`host_mounts`]; abup's own private mounts do not count).
///
/// Devices are compared by number (the `rdev` of `dev` against field 3 of
/// the mountinfo), so any name for the device works:
/// `/dev/vda3`, `/dev/disk/by-partlabel/rootfs-b`, a loop partition.
pub fn mount_point_of(dev: &Path) -> Result<Option<PathBuf>> {
    let meta = fs::metadata(dev).with_context(|| format!("reading {}", dev.display()))?;
    if !meta.file_type().is_block_device() {
        bail!("{} is not a block device", dev.display());
    }
    let rdev = meta.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let mounts = host_mounts()?;
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
///
/// The device is attached with `LO_FLAGS_AUTOCLEAR` and the guard holds it
/// open: when the guard is dropped, or the process dies however it dies, the
/// last close detaches it. Nothing needs to run for that to happen.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    /// The open device; closing it is what detaches it.
    file: Option<File>,
}

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>` (LOOP_CONFIGURE, Linux 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, LoopConfig);
nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);

impl LoopDevice {
    /// Attaches `file` to a free loop device, optionally starting at byte
    /// `offset`, limited to `sizelimit` bytes and with a logical
    /// `sector_size` (512 or 4096).
    ///
    /// Another process may grab the same free device first, so a busy
    /// device is retried with the next free one.
    pub fn attach(
        file: &Path,
        offset: Option<u64>,
        sizelimit: Option<u64>,
        sector_size: Option<u32>,
    ) -> Result<LoopDevice> {
        let step = format!("attaching {} to a loop device", file.display());
        let (backing, read_only) = match OpenOptions::new().read(true).write(true).open(file) {
            Ok(f) => (f, false),
            Err(e) if e.raw_os_error() == Some(nix::libc::EROFS) => (
                File::open(file).with_context(|| format!("{step}: opening the file"))?,
                true,
            ),
            Err(e) => return Err(e).with_context(|| format!("{step}: opening the file")),
        };
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .with_context(|| format!("{step}: opening /dev/loop-control"))?;
        let mut last_err = None;
        for attempt in 0..20 {
            if attempt > 0 {
                thread::sleep(Duration::from_millis(20 * attempt));
            }
            // SAFETY: LOOP_CTL_GET_FREE takes no argument.
            let n = match unsafe { loop_ctl_get_free(ctl.as_raw_fd()) } {
                Ok(n) => n,
                Err(e) => {
                    last_err = Some(anyhow::Error::from(e).context("finding a free loop device"));
                    continue;
                }
            };
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let dev = match OpenOptions::new().read(true).write(!read_only).open(&path) {
                Ok(d) => d,
                Err(e) => {
                    last_err =
                        Some(anyhow::Error::from(e).context(format!("opening {}", path.display())));
                    continue;
                }
            };
            let mut name = [0u8; 64];
            let shown = file.as_os_str().as_encoded_bytes();
            let len = shown.len().min(63);
            name[..len].copy_from_slice(&shown[..len]);
            let cfg = LoopConfig {
                fd: backing.as_raw_fd() as u32,
                block_size: sector_size.unwrap_or(0),
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: offset.unwrap_or(0),
                    lo_sizelimit: sizelimit.unwrap_or(0),
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: LO_FLAGS_AUTOCLEAR | if read_only { LO_FLAGS_READ_ONLY } else { 0 },
                    lo_file_name: name,
                    lo_crypt_name: [0; 64],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            // SAFETY: `cfg` is a valid loop_config that outlives the call.
            match unsafe { loop_configure(dev.as_raw_fd(), &cfg) } {
                Ok(_) => {
                    return Ok(LoopDevice {
                        path,
                        file: Some(dev),
                    })
                }
                // Someone else configured it between GET_FREE and now.
                Err(nix::errno::Errno::EBUSY) => {
                    last_err = Some(anyhow::anyhow!("{} is busy", path.display()));
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("{step}: configuring {}", path.display()))
                }
            }
        }
        Err(last_err
            .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
            .context(step))
    }

    /// The loop device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Detaches the loop device. The kernel finishes the detach when the
    /// last user closes it.
    pub fn detach(mut self) -> Result<()> {
        self.release()
            .with_context(|| format!("detaching loop device {}", self.path.display()))
    }

    fn release(&mut self) -> nix::Result<()> {
        let Some(f) = self.file.take() else {
            return Ok(());
        };
        // SAFETY: LOOP_CLR_FD takes no argument. A device still open
        // elsewhere is detached on its last close (autoclear).
        let cleared = unsafe { loop_clr_fd(f.as_raw_fd()) }.map(drop);
        drop(f);
        match cleared {
            Err(nix::errno::Errno::ENXIO) => Ok(()),
            other => other,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            let _ = writeln!(
                std::io::stderr(),
                "warning: detaching loop device {}: {e}",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::run;
    use std::process::Command;

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
