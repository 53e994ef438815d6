//! Test helpers: loop devices and mounts as guards, GPT test disks built with
//! the real tools, config files, rootfs trees, bundles made with the real
//! `abup` CLI, and a runner for the built binary.
//!
//! Loop devices are shared by everything on the machine, so attaching is
//! serialised inside this process (one mutex) and retried, device numbers are
//! never assumed, and every device is detached by its guard's `Drop`.

#![allow(dead_code)]

use serde_json::Value;
use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The device type every test config and (unless a test says otherwise)
/// every test bundle uses.
pub const COMPATIBLE: &str = "abup-test-board";

/// One MiB.
pub const MIB: u64 = 1 << 20;

/// Partition sizes of every test disk, in MiB: boot, rootA, rootB, data.
pub const BOOT_MIB: u64 = 32;
pub const SLOT_MIB: u64 = 64;
pub const DATA_MIB: u64 = 8;

/// The grubenv every test disk starts with, as `grub-editenv list` shows it.
pub const INITIAL_ENV: &[(&str, &str)] = &[
    ("ORDER", "A B"),
    ("A_OK", "1"),
    ("A_TRY", "0"),
    ("A_GOOD", "1"),
    ("B_OK", "0"),
    ("B_TRY", "0"),
    ("B_GOOD", "0"),
    ("ABUP_MAX_TRIES", "3"),
];

/// Serialises loop-device allocation within this test binary.
static LOOP_LOCK: Mutex<()> = Mutex::new(());

/// Loop devices currently held by guards of this process, so that a leak
/// check can tell them from devices abup left behind.
static HELD_LOOPS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock poisons it; the data is
    // still fine for everyone else.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `cmd`, panicking with its output when it fails; returns stdout.
#[track_caller]
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails the test early, with a clear message, when not run as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "abup's integration tests need root (loop devices, mounts, mknod): run them as root"
    );
}

// ---------------------------------------------------------------------------
// Loop devices and mounts
// ---------------------------------------------------------------------------

/// How to attach a loop device.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopOpts {
    pub offset: Option<u64>,
    pub size: Option<u64>,
    pub sector: Option<u32>,
    pub read_only: bool,
}

/// A loop device attached by this process; detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// `losetup --find --show [opts] file`, serialised and retried.
    pub fn attach(file: &Path, opts: LoopOpts) -> LoopDevice {
        let _guard = lock(&LOOP_LOCK);
        let mut last = String::new();
        for attempt in 0..10u64 {
            if attempt > 0 {
                thread::sleep(Duration::from_millis(50 * attempt));
            }
            let mut cmd = Command::new("losetup");
            cmd.arg("--find").arg("--show");
            if let Some(o) = opts.offset {
                cmd.arg("--offset").arg(o.to_string());
            }
            if let Some(s) = opts.size {
                cmd.arg("--sizelimit").arg(s.to_string());
            }
            if let Some(s) = opts.sector {
                cmd.arg("--sector-size").arg(s.to_string());
            }
            if opts.read_only {
                cmd.arg("--read-only");
            }
            cmd.arg(file);
            let out = cmd.output().expect("running losetup");
            let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !name.is_empty() {
                let path = PathBuf::from(name);
                lock(&HELD_LOOPS).push(path.clone());
                let lo = LoopDevice { path };
                clear_stale_partitions(&lo.path);
                return lo;
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
        }
        panic!("attaching {} to a loop device: {last}", file.display());
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // One attempt only: a busy device is detached by the kernel on its
        // last close (autoclear), and retrying a failed detach could hit a
        // device number someone else has attached since.
        let _guard = lock(&LOOP_LOCK);
        match Command::new("losetup")
            .arg("--detach")
            .arg(&self.path)
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: detaching {}: {}",
                self.path.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("warning: detaching {}: {e}", self.path.display()),
        }
        lock(&HELD_LOOPS).retain(|p| p != &self.path);
    }
}

/// The kernel partitions of block device `dev` (`loop3p1`, …), from sysfs.
pub fn kernel_partitions_of(dev: &Path) -> Vec<String> {
    let name = dev.file_name().unwrap_or_default().to_string_lossy();
    fs::read_dir(Path::new("/sys/class/block").join(&*name))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("partition").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Removes kernel partitions a freshly attached loop device carries over
/// from an earlier user of its number: partitions added with `partx -a` or
/// `addpart` outlive a detach. Left there, they reach bytes of this test's
/// image that the test does not expect (abup refuses such a stale node, and
/// a test reading through one reads the wrong range).
fn clear_stale_partitions(dev: &Path) {
    let left = remove_kernel_partitions(dev);
    assert!(
        left.is_empty(),
        "{} came with kernel partitions of an earlier user that cannot be removed: {left:?}",
        dev.display()
    );
}

/// Removes the kernel partitions of block device `dev` (`partx -d`) and
/// returns those still there after about 10 s of retrying: a partition
/// briefly held (a slow unmount, a dying child) cannot be removed yet, and
/// one left behind outlives the loop device's detach and reaches into the
/// next user's image.
pub fn remove_kernel_partitions(dev: &Path) -> Vec<String> {
    for attempt in 0..20u64 {
        if kernel_partitions_of(dev).is_empty() {
            break;
        }
        let _ = Command::new("partx")
            .arg("-d")
            .arg(dev)
            .stderr(Stdio::null())
            .status();
        if kernel_partitions_of(dev).is_empty() {
            break;
        }
        thread::sleep(Duration::from_millis(50 * (attempt + 1)));
    }
    kernel_partitions_of(dev)
}

/// Loop devices attached to `backing` (a file or block device), as
/// `losetup --associated` lists them.
pub fn loops_over(backing: &Path) -> Vec<PathBuf> {
    let out = sh(Command::new("losetup")
        .args(["--noheadings", "--output", "NAME", "--associated"])
        .arg(backing));
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// Loop devices over `backing` that no guard of this process holds: what
/// abup left behind. The kernel finishes a deferred detach on last close,
/// after it has torn down the mount namespace of an abup that exited (work
/// it does in the background, seconds later on a loaded machine): wait up to
/// 20 s for that.
pub fn leaked_loops(backing: &Path) -> Vec<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held = lock(&HELD_LOOPS).clone();
        let leaked: Vec<PathBuf> = loops_over(backing)
            .into_iter()
            .filter(|l| !held.contains(l))
            .collect();
        if leaked.is_empty() || Instant::now() > deadline {
            return leaked;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A filesystem mounted at a fresh directory; unmounted on drop.
///
/// A busy mount is waited for (up to a minute), not detached lazily at once:
/// a lazily detached filesystem lives on, journal in use and data not
/// written back, until its last user lets go, and then writes it all out.
/// A test reading the partition meanwhile saw a dirty journal (`e2label`:
/// "Journal flags inconsistent"), and a slot hashed meanwhile changed later
/// by itself. What holds a mount here is short-lived (a child forked by
/// another test thread holds copies of open files until it execs, which
/// takes seconds on a loaded machine). A read-write mount is first made
/// read-only, which flushes it and marks its journal clean on disk whatever
/// still holds it.
#[derive(Debug)]
pub struct Mount {
    dir: PathBuf,
    rw: bool,
}

impl Mount {
    /// Mounts the ext4 on `dev`, read-only unless `rw`.
    pub fn ext4(dev: &Path, rw: bool) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("abup-test-mnt-")
            .tempdir()
            .expect("creating a mount point")
            .keep();
        let out = Command::new("mount")
            .args(["-t", "ext4", "-o", if rw { "rw" } else { "ro" }])
            .arg(dev)
            .arg(&dir)
            .output()
            .expect("running mount");
        if !out.status.success() {
            let _ = fs::remove_dir(&dir);
            panic!(
                "mounting {} at {}: {}",
                dev.display(),
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Mount { dir, rw }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        let deadline = Instant::now() + Duration::from_secs(60);
        // Syscalls, not mount(8)/umount(8): spawning a process would fork
        // this one, and the fork would hold the files other threads have open.
        let remount_ro = || {
            mount(
                None::<&str>,
                &self.dir,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
        };
        if self.rw {
            loop {
                match remount_ro() {
                    Ok(()) => break,
                    Err(nix::errno::Errno::EBUSY) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(100))
                    }
                    Err(e) => {
                        eprintln!("warning: remounting {} read-only: {e}", self.dir.display());
                        break;
                    }
                }
            }
        }
        loop {
            match umount2(&self.dir, MntFlags::empty()) {
                Ok(()) => {
                    // Never a recursive delete: that could empty a
                    // filesystem that is still mounted.
                    let _ = fs::remove_dir(&self.dir);
                    return;
                }
                Err(nix::errno::Errno::EBUSY) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(100))
                }
                Err(e) => {
                    let _ = umount2(&self.dir, MntFlags::MNT_DETACH);
                    eprintln!(
                        "warning: lazily unmounted {} ({e}): it is written out when its last user goes",
                        self.dir.display()
                    );
                    return;
                }
            }
        }
    }
}

/// A partition of a test disk attached to a loop device and mounted.
/// Field order matters: the mount goes before the loop device.
pub struct PartMount {
    pub mount: Mount,
    pub lo: LoopDevice,
}

impl PartMount {
    pub fn path(&self) -> &Path {
        self.mount.path()
    }
}

// ---------------------------------------------------------------------------
// Test disks
// ---------------------------------------------------------------------------

/// One GPT partition as sgdisk reports it.
#[derive(Clone, Debug)]
pub struct Part {
    pub number: u32,
    pub label: String,
    /// Lowercase unique partition GUID.
    pub partuuid: String,
    /// Byte offset.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A sparse GPT disk image with partitions `boot`, `rootA`, `rootB` and
/// `data`, optionally attached whole to a loop device (4096-byte sectors).
pub struct TestDisk {
    pub image: PathBuf,
    pub sector: u32,
    pub parts: Vec<Part>,
    /// With 4096-byte sectors, the image attached whole; abup gets this.
    pub whole: Option<LoopDevice>,
    /// Kernel partition nodes were added with `partx -a` (removed on drop).
    pub partx: bool,
}

impl Drop for TestDisk {
    fn drop(&mut self) {
        // Those `partx -a` added, or a test's own (addpart).
        if let Some(w) = &self.whole {
            let left = remove_kernel_partitions(w.path());
            if !left.is_empty() {
                eprintln!(
                    "warning: kernel partitions left on {}: {left:?}",
                    w.path().display()
                );
            }
        }
    }
}

impl TestDisk {
    /// Creates the image in `dir` and partitions it with sgdisk, on the image
    /// file (512-byte sectors) or on a loop device over it (4096).
    pub fn create(dir: &Path, sector: u32) -> TestDisk {
        let image = dir.join("disk.img");
        let total = MIB + (BOOT_MIB + 2 * SLOT_MIB + DATA_MIB) * MIB + MIB;
        fs::File::create(&image)
            .and_then(|f| f.set_len(total))
            .expect("creating the disk image");
        let whole = (sector != 512).then(|| {
            LoopDevice::attach(
                &image,
                LoopOpts {
                    sector: Some(sector),
                    ..LoopOpts::default()
                },
            )
        });
        let dev = whole
            .as_ref()
            .map_or(image.clone(), |w| w.path().to_path_buf());
        sh(Command::new("sgdisk")
            .args(["-o"])
            .args(["-n", &format!("1:0:+{BOOT_MIB}M"), "-c", "1:boot"])
            .args(["-n", &format!("2:0:+{SLOT_MIB}M"), "-c", "2:rootA"])
            .args(["-n", &format!("3:0:+{SLOT_MIB}M"), "-c", "3:rootB"])
            .args(["-n", &format!("4:0:+{DATA_MIB}M"), "-c", "4:data"])
            .arg(&dev));
        let print = sh(Command::new("sgdisk").arg("-p").arg(&dev));
        assert!(
            print.contains(&format!("Sector size (logical): {sector} bytes"))
                || print.contains(&format!("Sector size (logical/physical): {sector}/")),
            "sgdisk does not see {sector}-byte sectors:\n{print}"
        );
        let parts = (1..=4)
            .map(|n| {
                let info = sh(Command::new("sgdisk")
                    .arg("-i")
                    .arg(n.to_string())
                    .arg(&dev));
                parse_sgdisk_info(n, &info, u64::from(sector))
            })
            .collect();
        TestDisk {
            image,
            sector,
            parts,
            whole,
            partx: false,
        }
    }

    /// What abup's `disk.device` names: the image file, or the loop device
    /// holding it whole.
    pub fn device(&self) -> PathBuf {
        self.whole
            .as_ref()
            .map_or(self.image.clone(), |w| w.path().to_path_buf())
    }

    pub fn part(&self, label: &str) -> &Part {
        self.parts
            .iter()
            .find(|p| p.label == label)
            .unwrap_or_else(|| panic!("no partition {label} on the test disk"))
    }

    /// Drops the page cache of a whole-disk loop device, so that reads see
    /// what abup wrote through other devices stacked on it.
    fn flush(&self) {
        if let Some(w) = &self.whole {
            sh(Command::new("blockdev").arg("--flushbufs").arg(w.path()));
        }
    }

    /// Attaches the partition to a loop device over its byte range.
    pub fn attach(&self, label: &str, read_only: bool) -> LoopDevice {
        self.flush();
        let p = self.part(label);
        LoopDevice::attach(
            &self.device(),
            LoopOpts {
                offset: Some(p.start),
                size: Some(p.size),
                sector: Some(self.sector),
                read_only,
            },
        )
    }

    /// Mounts the partition's ext4 (read-only unless `rw`).
    pub fn mount(&self, label: &str, rw: bool) -> PartMount {
        let lo = self.attach(label, !rw);
        let mount = Mount::ext4(lo.path(), rw);
        PartMount { mount, lo }
    }

    /// `mkfs.ext4` on the partition.
    pub fn mkfs(&self, label: &str) {
        let lo = self.attach(label, false);
        sh(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", label])
            .arg(lo.path()));
    }

    /// Hex SHA-256 of the first `len` bytes of the partition.
    pub fn sha256_prefix(&self, label: &str, len: u64) -> String {
        self.flush();
        let p = self.part(label);
        assert!(len <= p.size);
        sha256_range(&self.device(), p.start, len)
    }

    /// Hex SHA-256 of the whole partition: proves a slot stayed byte-identical.
    pub fn sha256_of_partition(&self, label: &str) -> String {
        self.sha256_prefix(label, self.part(label).size)
    }

    /// Copies the partition's bytes into `dest` (read as the hashes read
    /// it), so that a later change can be shown block by block.
    pub fn save_partition(&self, label: &str, dest: &Path) {
        self.flush();
        let p = self.part(label);
        fs::write(dest, read_range(&self.device(), p.start, p.size)).expect("saving a partition");
    }

    /// Which 4 KiB blocks of the partition differ from the copy `saved`
    /// made, with the first bytes of each before and after: what a failed
    /// "slot unchanged" assertion shows.
    pub fn changed_blocks(&self, label: &str, saved: &Path) -> String {
        self.flush();
        let p = self.part(label);
        let now = read_range(&self.device(), p.start, p.size);
        let before = fs::read(saved).expect("reading a saved partition");
        let mut out = String::new();
        let mut n = 0;
        for (i, (a, b)) in before.chunks(4096).zip(now.chunks(4096)).enumerate() {
            if a == b {
                continue;
            }
            n += 1;
            if n <= 16 {
                let first = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0);
                let at = first & !15;
                let hex = |c: &[u8]| {
                    c[at..(at + 32).min(c.len())]
                        .iter()
                        .map(|x| format!("{x:02x}"))
                        .collect::<String>()
                };
                out += &format!(
                    "block {i} (byte {}): first difference at +{first}\n  was {}\n  now {}\n",
                    i * 4096,
                    hex(a),
                    hex(b)
                );
            }
        }
        format!(
            "{n} of {} blocks of {label} changed\n{out}",
            before.len() / 4096
        )
    }

    /// Adds kernel partition nodes for the whole-disk loop device (`partx -a`).
    pub fn add_kernel_partitions(&mut self) {
        let w = self
            .whole
            .as_ref()
            .expect("partx needs a whole-disk loop device");
        // Partitions an earlier user of this loop number left in the kernel
        // were cleared when it was attached (they would make `partx -a` fail).
        sh(Command::new("partx").arg("-a").arg(w.path()));
        self.partx = true;
        // devtmpfs creates the nodes asynchronously.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(1..=4).all(|n| self.kernel_node(n).exists()) {
            assert!(
                Instant::now() < deadline,
                "partx -a made no partition nodes"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The kernel node of partition `n` of the whole-disk loop device.
    pub fn kernel_node(&self, n: u32) -> PathBuf {
        let w = self.whole.as_ref().expect("no whole-disk loop device");
        PathBuf::from(format!("{}p{n}", w.path().display()))
    }
}

fn parse_sgdisk_info(number: u32, info: &str, sector: u64) -> Part {
    let field = |name: &str| -> String {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("sgdisk -i {number}: no {name:?} in\n{info}"))
            .trim()
            .to_string()
    };
    let first_word = |s: String| -> u64 {
        s.split_whitespace()
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("sgdisk -i {number}: cannot parse {s:?}"))
    };
    let label = field("Partition name:").trim_matches('\'').to_string();
    Part {
        number,
        label,
        partuuid: field("Partition unique GUID:").to_ascii_lowercase(),
        start: first_word(field("First sector:")) * sector,
        size: first_word(field("Partition size:")) * sector,
    }
}

/// Hex SHA-256 of `len` bytes of `path` from `offset` (dd | sha256sum:
/// much faster than hashing in an unoptimised test build).
pub fn sha256_range(path: &Path, offset: u64, len: u64) -> String {
    let flags = dd_iflags(path);
    let script = format!(
        "set -o pipefail; dd if=\"$1\" bs=1M skip={offset} count={len} {flags} status=none | sha256sum"
    );
    let out = sh(Command::new("bash")
        .args(["-c", &script, "sha256_range"])
        .arg(path));
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// dd's input flags for byte offsets, reading a block device past its page
/// cache (O_DIRECT): what is on the device, not what a cache remembers.
fn dd_iflags(path: &Path) -> &'static str {
    if fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) {
        "iflag=skip_bytes,count_bytes,direct"
    } else {
        "iflag=skip_bytes,count_bytes"
    }
}

/// `len` bytes of `path` from `offset`, read as [`sha256_range`] reads them.
pub fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let flags = dd_iflags(path);
    let out = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["bs=1M", &format!("skip={offset}"), &format!("count={len}")])
        .args([flags, "status=none"])
        .output()
        .expect("running dd");
    assert!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Hex SHA-256 of a whole file.
pub fn sha256_file(path: &Path) -> String {
    let out = sh(Command::new("sha256sum").arg(path));
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

// ---------------------------------------------------------------------------
// Grub environment
// ---------------------------------------------------------------------------

/// `grub-editenv FILE create`, then `set` each of `vars`.
pub fn grub_editenv_init(path: &Path, vars: &[(&str, &str)]) {
    sh(Command::new("grub-editenv").arg(path).arg("create"));
    let args: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
    sh(Command::new("grub-editenv")
        .arg(path)
        .arg("set")
        .args(&args));
}

/// `grub-editenv FILE list`, parsed.
pub fn grub_editenv_list(path: &Path) -> BTreeMap<String, String> {
    let out = sh(Command::new("grub-editenv").arg(path).arg("list"));
    out.lines()
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("grub-editenv list printed {l:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The variables as a map, for comparing with [`grub_editenv_list`].
pub fn env_map(vars: &[(&str, &str)]) -> BTreeMap<String, String> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `vars` with some values replaced.
pub fn env_with(base: &[(&str, &str)], changes: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut m = env_map(base);
    for (k, v) in changes {
        m.insert(k.to_string(), v.to_string());
    }
    m
}

// ---------------------------------------------------------------------------
// Running abup
// ---------------------------------------------------------------------------

/// The built binary.
pub fn abup_bin() -> &'static str {
    env!("CARGO_BIN_EXE_abup")
}

/// One finished run of abup.
#[derive(Debug)]
pub struct Run {
    pub args: Vec<String>,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(args: Vec<String>, out: std::process::Output) -> Run {
        Run {
            args,
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics with everything abup printed unless it exited 0.
    #[track_caller]
    pub fn ok(&self) -> &Run {
        assert_eq!(self.code, 0, "abup {:?} failed:\n{self}", self.args);
        self
    }

    /// Stdout parsed as one JSON document, or for the verbs that stream
    /// JSON lines (install, check, queue, apply-queued), its last line: the
    /// run report.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .or_else(|e| {
                let last = self.stdout.lines().rev().find(|l| !l.trim().is_empty());
                last.map_or(Err(e), serde_json::from_str)
            })
            .unwrap_or_else(|e| panic!("stdout of abup {:?} is not JSON ({e}):\n{self}", self.args))
    }

    /// Checks a failed run: the exit code, and stderr being exactly one line
    /// `error: …` that contains each of `needles`. Returns that line.
    #[track_caller]
    pub fn failed(&self, code: i32, needles: &[&str]) -> String {
        assert_eq!(
            self.code, code,
            "abup {:?}: unexpected exit code:\n{self}",
            self.args
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "abup {:?}: stderr should be one `error:` line:\n{self}",
            self.args
        );
        let line = lines[0];
        assert!(
            line.starts_with("error: "),
            "stderr does not start with `error: `:\n{self}"
        );
        for n in needles {
            assert!(
                line.to_lowercase().contains(&n.to_lowercase()),
                "the error should mention {n:?}:\n{line}"
            );
        }
        line.to_string()
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs abup with `args`, feeding `stdin` through a pipe when given.
pub fn run_abup(args: &[String], stdin: Option<Vec<u8>>) -> Run {
    let mut cmd = Command::new(abup_bin());
    cmd.args(args)
        .env_remove("ABUP_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().expect("starting abup");
    let writer = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        // Written from a thread so that a full stdout pipe cannot deadlock
        // us; abup may stop reading early (a refused bundle): ignore EPIPE.
        thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let out = child.wait_with_output().expect("waiting for abup");
    if let Some(w) = writer {
        w.join().expect("stdin writer thread");
    }
    Run::from_output(args.to_vec(), out)
}

fn strings<S: AsRef<str>>(args: &[S]) -> Vec<String> {
    args.iter().map(|a| a.as_ref().to_string()).collect()
}

/// Path as &str (every test path is UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

// ---------------------------------------------------------------------------
// The test environment: disk, config, keys, running system
// ---------------------------------------------------------------------------

/// Where the GRUB environment block lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrubLoc {
    /// `grub/grubenv` on the `boot` partition, which abup mounts.
    Partition,
    /// A file in the test's temp dir (`boot.grub.envfile`).
    File,
}

/// The config file's variable parts.
#[derive(Clone, Debug)]
pub struct ConfigOpts {
    /// The `[slots.B]` body, e.g. `partlabel = "rootB"`.
    pub slot_b: String,
    pub preserve: Vec<String>,
    pub trusted: Vec<PathBuf>,
    pub tries: u32,
    /// `preserve.from`; None leaves the key out (abup's default).
    pub from: Option<PathBuf>,
    /// TOML appended at the end (e.g. `[[preserve.rule]]`, `[data]` tables).
    pub extra: String,
}

/// How to build an [`Env`].
pub struct EnvBuilder {
    sector: u32,
    grub: GrubLoc,
    uboot: Option<UbootLoc>,
    custom: bool,
    preserve: Vec<String>,
    slot_b_by_uuid: bool,
    kernel_partitions: bool,
}

impl EnvBuilder {
    pub fn sector(mut self, s: u32) -> Self {
        self.sector = s;
        self
    }
    pub fn grub(mut self, g: GrubLoc) -> Self {
        self.grub = g;
        self
    }
    /// The custom backend running boot-backends/custom/abup-boot-grubenv
    /// on the grubenv file (`GrubLoc::File`).
    pub fn custom(mut self) -> Self {
        self.custom = true;
        self.grub = GrubLoc::File;
        self
    }
    /// The U-Boot backend instead of GRUB, with its environment at `u`.
    pub fn uboot(mut self, u: UbootLoc) -> Self {
        self.uboot = Some(u);
        self
    }
    pub fn preserve(mut self, paths: &[&str]) -> Self {
        self.preserve = paths.iter().map(|p| p.to_string()).collect();
        self
    }
    pub fn slot_b_by_uuid(mut self) -> Self {
        self.slot_b_by_uuid = true;
        self
    }
    /// 4096-byte sectors with kernel partition nodes (`partx -a`).
    pub fn kernel_partitions(mut self) -> Self {
        self.kernel_partitions = true;
        self
    }

    pub fn build(self) -> Env {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("abup-it-")
            .tempdir()
            .expect("creating a temp dir");
        let root = dir.path().to_path_buf();
        let mut disk = TestDisk::create(&root, self.sector);
        if self.kernel_partitions {
            disk.add_kernel_partitions();
        }

        // Slot A: the "booted" system.
        disk.mkfs("rootA");
        {
            let m = disk.mount("rootA", true);
            let tree = m.path();
            write(
                tree,
                "etc/os-release",
                "NAME=abup-test\nVERSION=0.9.0\n",
                0o644,
            );
            write(tree, "etc/hostname", "slot-a-image\n", 0o644);
            write(tree, "usr/bin/hello", "#!/bin/sh\necho A\n", 0o755);
            write(tree, "boot/vmlinuz", "slot A kernel\n", 0o644);
        }
        // Labelled as grub.cfg searches for it.
        {
            let lo = disk.attach("rootA", false);
            sh(Command::new("e2label").arg(lo.path()).arg("abup-A"));
        }
        // Slot B starts out holding garbage-free zeros; boot holds the env.
        disk.mkfs("boot");
        {
            let m = disk.mount("boot", true);
            fs::create_dir_all(m.path().join("grub")).unwrap();
            grub_editenv_init(&m.path().join("grub/grubenv"), INITIAL_ENV);
        }
        if let Some(u) = self.uboot {
            uboot_env_init(&disk, &root, u, UBOOT_INITIAL_ENV);
        }
        let envfile = root.join("grubenv");
        if self.grub == GrubLoc::File {
            grub_editenv_init(&envfile, INITIAL_ENV);
        }
        if self.custom {
            let script = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("boot-backends/custom/abup-boot-grubenv");
            write(
                &root,
                "custom-boot",
                &format!(
                    "#!/bin/sh\nABUP_GRUBENV={} exec {} \"$@\"\n",
                    s(&envfile),
                    s(&script)
                ),
                0o755,
            );
        }

        // The running system whose files `preserve` carries over.
        let running = root.join("running-root");
        write(&running, "etc/hostname", "device-42\n", 0o644);
        write(
            &running,
            "etc/machine-id",
            "0123456789abcdef0123456789abcdef\n",
            0o444,
        );
        write(
            &running,
            "etc/ssh/ssh_host_ed25519_key",
            "PRIVATE KEY OF DEVICE 42\n",
            0o600,
        );
        write(
            &running,
            "etc/ssh/ssh_host_ed25519_key.pub",
            "ssh-ed25519 AAAA device-42\n",
            0o644,
        );
        std::os::unix::fs::symlink(
            "../usr/share/zoneinfo/Europe/Berlin",
            running.join("etc/localtime"),
        )
        .unwrap();

        let secret = root.join("release.key");
        let public = root.join("release.pub");
        keygen(&secret, &public);

        let slot_b = if self.slot_b_by_uuid {
            // Upper case on purpose: PARTUUIDs compare case-insensitively.
            format!(
                "partuuid = \"{}\"",
                disk.part("rootB").partuuid.to_ascii_uppercase()
            )
        } else {
            "partlabel = \"rootB\"".to_string()
        };
        let opts = ConfigOpts {
            slot_b,
            preserve: self.preserve,
            trusted: vec![public.clone()],
            tries: 3,
            from: Some(running.clone()),
            extra: String::new(),
        };
        let env = Env {
            disk,
            opts,
            config: root.join("system.toml"),
            state_dir: root.join("state"),
            envfile,
            grub: self.grub,
            uboot: self.uboot,
            custom: self.custom,
            running,
            secret,
            public: public.clone(),
            counter: Cell::new(0),
            root,
            _dir: dir,
        };
        env.write_config(&env.config, &env.opts);
        env
    }
}

/// One test's world: a disk image, a config, a key pair, a running system.
/// Field order matters: the disk (loop devices) goes before the temp dir.
pub struct Env {
    pub disk: TestDisk,
    /// The options `config` was written with; `config_with` starts from them.
    pub opts: ConfigOpts,
    pub root: PathBuf,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub envfile: PathBuf,
    pub grub: GrubLoc,
    /// Set when the env uses the U-Boot backend (then `grub` is unused).
    pub uboot: Option<UbootLoc>,
    /// Set when the env uses the custom backend over `envfile`.
    pub custom: bool,
    pub running: PathBuf,
    pub secret: PathBuf,
    pub public: PathBuf,
    counter: Cell<u32>,
    _dir: TempDir,
}

impl Env {
    pub fn builder() -> EnvBuilder {
        EnvBuilder {
            sector: 512,
            grub: GrubLoc::Partition,
            uboot: None,
            custom: false,
            preserve: vec![
                "/etc/hostname".into(),
                "/etc/ssh".into(),
                "/etc/machine-id".into(),
            ],
            slot_b_by_uuid: false,
            kernel_partitions: false,
        }
    }

    /// The default world: 512-byte sectors, grubenv on the boot partition,
    /// the usual preserve list.
    pub fn new() -> Env {
        Env::builder().build()
    }

    /// A fresh path in the temp dir.
    pub fn path(&self, stem: &str) -> PathBuf {
        let n = self.counter.get() + 1;
        self.counter.set(n);
        self.root.join(format!("{stem}-{n}"))
    }

    /// The config options of this env (what `config` was written with).
    pub fn config_opts(&self) -> ConfigOpts {
        self.opts.clone()
    }

    /// Writes a config file in exactly the documented shape.
    pub fn write_config(&self, path: &Path, o: &ConfigOpts) {
        let q = |p: &Path| format!("{:?}", s(p));
        let grub = match self.grub {
            GrubLoc::Partition => "partlabel = \"boot\"\npath = \"grub/grubenv\"".to_string(),
            GrubLoc::File => format!("envfile = {}", q(&self.envfile)),
        };
        let (backend, grub) = match self.uboot {
            None if self.custom => (
                "custom",
                format!(
                    "[boot.custom]\ncommand = {}\ntimeout = 20",
                    q(&self.root.join("custom-boot"))
                ),
            ),
            None => ("grub", format!("[boot.grub]\n{grub}")),
            Some(u) => ("uboot", format!("[boot.uboot]\n{}", u.config(&self.root))),
        };
        let list = |v: Vec<String>| v.join(", ");
        let text = format!(
            r#"compatible = "{COMPATIBLE}"
state_dir = {state}
[disk]
device = {device}
[slots.A]
partlabel = "rootA"
[slots.B]
{slot_b}
[boot]
backend = "{backend}"
tries = {tries}
{grub}
[keys]
trusted = [{trusted}]
[preserve]
paths = [{paths}]
{from}{extra}"#,
            state = q(&self.state_dir),
            device = q(&self.disk.device()),
            slot_b = o.slot_b,
            tries = o.tries,
            trusted = list(o.trusted.iter().map(|p| q(p)).collect()),
            paths = list(o.preserve.iter().map(|p| format!("{p:?}")).collect()),
            from = o
                .from
                .as_ref()
                .map_or(String::new(), |p| format!("from = {}\n", q(p))),
            extra = o.extra,
        );
        fs::write(path, text).expect("writing the config");
    }

    /// Writes a config with `change` applied to the defaults; returns its path.
    pub fn config_with(&self, change: impl FnOnce(&mut ConfigOpts)) -> PathBuf {
        let mut o = self.config_opts();
        change(&mut o);
        let path = self.path("system.toml");
        self.write_config(&path, &o);
        path
    }

    /// Runs `abup --config <config> ARGS…` and checks that abup left no loop
    /// device attached to the test disk.
    pub fn abup(&self, args: &[&str]) -> Run {
        self.abup_with(&self.config, args, None)
    }

    /// Like [`Env::abup`], feeding `stdin` through a pipe.
    pub fn abup_stdin(&self, args: &[&str], stdin: Vec<u8>) -> Run {
        self.abup_with(&self.config, args, Some(stdin))
    }

    /// Runs abup with another config file.
    pub fn abup_with(&self, config: &Path, args: &[&str], stdin: Option<Vec<u8>>) -> Run {
        let mut all = vec!["--config".to_string(), s(config).to_string()];
        all.extend(strings(args));
        let run = run_abup(&all, stdin);
        let leaked = leaked_loops(&self.disk.device());
        assert!(
            leaked.is_empty(),
            "abup {all:?} left loop devices attached to {}: {leaked:?}\n{run}",
            self.disk.device().display()
        );
        run
    }

    /// `install` with `--json`, booted from `booted`; checks success and
    /// returns the run report.
    #[track_caller]
    pub fn install_ok(&self, booted: &str, bundle: &Path, extra: &[&str]) -> Value {
        let mut args = vec!["--json", "--booted-slot", booted, "install", s(bundle)];
        args.extend_from_slice(extra);
        let run = self.abup(&args);
        run.ok();
        let report = run.json();
        assert_eq!(report["result"], "success", "{run}");
        assert_eq!(report["exit_code"], 0, "{run}");
        report
    }

    /// `status --json` with the given booted slot (or none).
    #[track_caller]
    pub fn status(&self, booted: Option<&str>) -> Value {
        let mut args = vec!["--json"];
        if let Some(b) = booted {
            args.extend(["--booted-slot", b]);
        }
        args.push("status");
        let run = self.abup(&args);
        run.ok();
        run.json()
    }

    /// The raw bytes of the GRUB environment block.
    pub fn grubenv_bytes(&self) -> Vec<u8> {
        match self.grub {
            GrubLoc::File => fs::read(&self.envfile).expect("reading the grubenv file"),
            GrubLoc::Partition => {
                let m = self.disk.mount("boot", false);
                fs::read(m.path().join("grub/grubenv")).expect("reading grub/grubenv")
            }
        }
    }

    /// The raw bytes of the boot environment: the grubenv, or the U-Boot
    /// environment's copies one after the other.
    pub fn boot_env_bytes(&self) -> Vec<u8> {
        match self.uboot {
            None => self.grubenv_bytes(),
            Some(u) => uboot_env_bytes(&self.disk, &self.root, u),
        }
    }

    /// `grub-editenv FILE set VARS…` on the environment block, as GRUB's
    /// `save_env` would change it.
    pub fn grub_set(&self, vars: &[&str]) {
        match self.grub {
            GrubLoc::File => {
                sh(Command::new("grub-editenv")
                    .arg(&self.envfile)
                    .arg("set")
                    .args(vars));
            }
            GrubLoc::Partition => {
                let boot = self.disk.mount("boot", true);
                sh(Command::new("grub-editenv")
                    .arg(boot.path().join("grub/grubenv"))
                    .arg("set")
                    .args(vars));
            }
        }
    }

    /// `grub-editenv list` of the environment block (on a copy, so the boot
    /// partition is only ever mounted read-only).
    pub fn grubenv(&self) -> BTreeMap<String, String> {
        let copy = self.path("grubenv-copy");
        fs::write(&copy, self.grubenv_bytes()).unwrap();
        grub_editenv_list(&copy)
    }

    /// What a refused or failed install must leave alone: slot A's bytes and
    /// the grubenv bytes.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            slot_a: self.disk.sha256_of_partition("rootA"),
            grubenv: self.boot_env_bytes(),
        }
    }

    #[track_caller]
    pub fn assert_untouched(&self, before: &Snapshot) {
        assert_eq!(
            self.disk.sha256_of_partition("rootA"),
            before.slot_a,
            "slot A (the booted slot) changed"
        );
        let now = self.boot_env_bytes();
        assert!(
            now == before.grubenv,
            "the grubenv changed:\nbefore: {}\nafter:  {}",
            String::from_utf8_lossy(&before.grubenv).trim_end_matches('#'),
            String::from_utf8_lossy(&now).trim_end_matches('#')
        );
    }

    /// Builds a bundle with the real CLI, signed with this env's key.
    pub fn bundle(&self, source: Source<'_>, version: &str, compression: &str) -> PathBuf {
        self.bundle_opts(source, version, compression, Some(&self.secret), COMPATIBLE)
    }

    /// Builds a bundle with full control over key and compatible.
    pub fn bundle_opts(
        &self,
        source: Source<'_>,
        version: &str,
        compression: &str,
        key: Option<&Path>,
        compatible: &str,
    ) -> PathBuf {
        let out = self.path("bundle.abup");
        make_bundle(source, version, compression, key, compatible, &out);
        out
    }

    /// A small signed tar bundle from [`simple_rootfs`].
    pub fn simple_bundle(&self, version: &str) -> PathBuf {
        let dir = self.path("rootfs");
        simple_rootfs(&dir, version);
        self.bundle(Source::Rootfs(&dir), version, "zstd")
    }
}

/// Slot A hash and grubenv bytes before a run.
pub struct Snapshot {
    pub slot_a: String,
    pub grubenv: Vec<u8>,
}

// ---------------------------------------------------------------------------
// Keys, rootfs trees, bundles
// ---------------------------------------------------------------------------

/// `abup keygen --secret S --public P`.
pub fn keygen(secret: &Path, public: &Path) {
    run_abup(
        &strings(&["keygen", "--secret", s(secret), "--public", s(public)]),
        None,
    )
    .ok();
}

/// What a bundle is built from.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    Rootfs(&'a Path),
    Tarball(&'a Path),
    Image(&'a Path),
}

/// `abup bundle create …`.
pub fn make_bundle(
    source: Source<'_>,
    version: &str,
    compression: &str,
    key: Option<&Path>,
    compatible: &str,
    out: &Path,
) {
    if let Source::Rootfs(dir) = source {
        // Every slot holds the kernel grub.cfg boots, or install refuses it.
        if fs::symlink_metadata(dir.join("boot/vmlinuz")).is_err() {
            write(dir, "boot/vmlinuz", "test kernel\n", 0o644);
        }
    }
    let (flag, path) = match source {
        Source::Rootfs(p) => ("--rootfs", p),
        Source::Tarball(p) => ("--tarball", p),
        Source::Image(p) => ("--image", p),
    };
    let mut args = strings(&[
        "bundle",
        "create",
        flag,
        s(path),
        "--version",
        version,
        "--compatible",
        compatible,
        "--compression",
        compression,
        "-o",
        s(out),
    ]);
    if let Some(k) = key {
        args.extend(strings(&["--key", s(k)]));
    }
    run_abup(&args, None).ok();
}

/// Writes `content` to `root/rel` with `mode`, creating parent directories.
pub fn write(root: &Path, rel: &str, content: &str, mode: u32) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, content).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

/// A minimal root filesystem: os-release naming `version`, a default
/// hostname and ssh key the device's own must replace, a program and a
/// `bin -> usr/bin` symlink.
pub fn simple_rootfs(dir: &Path, version: &str) {
    write(
        dir,
        "etc/os-release",
        &format!("NAME=abup-test\nVERSION={version}\n"),
        0o644,
    );
    write(dir, "etc/hostname", "image-default\n", 0o644);
    write(
        dir,
        "etc/ssh/ssh_host_ed25519_key",
        "IMAGE DEFAULT KEY\n",
        0o600,
    );
    write(dir, "etc/ssh/sshd_config", "PermitRootLogin no\n", 0o644);
    write(dir, "usr/bin/hello", "#!/bin/sh\necho hello\n", 0o755);
    // The kernel grub.cfg boots: install refuses a slot without one.
    write(dir, "boot/vmlinuz", "test kernel\n", 0o644);
    fs::create_dir_all(dir.join("usr/share/zoneinfo/Europe")).unwrap();
    write(
        dir,
        "usr/share/zoneinfo/Europe/Berlin",
        "TZif-berlin",
        0o644,
    );
    write(dir, "usr/share/zoneinfo/UTC", "TZif-utc", 0o644);
    std::os::unix::fs::symlink("usr/bin", dir.join("bin")).unwrap();
    std::os::unix::fs::symlink("../usr/share/zoneinfo/UTC", dir.join("etc/localtime")).unwrap();
}

/// Everything we want a tar payload to carry. `with_cap` tells whether
/// `security.capability` could be set here.
pub struct RichTree {
    pub with_cap: bool,
    /// SHA-256 of `usr/lib/big.bin`, a few MiB of random bytes.
    pub big_sha256: String,
}

/// The raw bytes of a v2 file capability with cap_net_raw permitted and
/// effective (what `setcap cap_net_raw+ep` writes).
pub const CAP_NET_RAW_EP: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// `system.posix_acl_access` of `u::rw-,u:1234:rw-,g::r--,m::rw-,o::r--`.
pub const ACL_FILE: [u8; 44] = [
    2, 0, 0, 0, //
    0x01, 0, 6, 0, 0xff, 0xff, 0xff, 0xff, //
    0x02, 0, 6, 0, 0xd2, 0x04, 0, 0, //
    0x04, 0, 4, 0, 0xff, 0xff, 0xff, 0xff, //
    0x10, 0, 6, 0, 0xff, 0xff, 0xff, 0xff, //
    0x20, 0, 4, 0, 0xff, 0xff, 0xff, 0xff,
];

/// `system.posix_acl_default` of `u::rwx,u:1234:rwx,g::r-x,m::rwx,o::r-x`.
pub const ACL_DEFAULT_DIR: [u8; 44] = [
    2, 0, 0, 0, //
    0x01, 0, 7, 0, 0xff, 0xff, 0xff, 0xff, //
    0x02, 0, 7, 0, 0xd2, 0x04, 0, 0, //
    0x04, 0, 5, 0, 0xff, 0xff, 0xff, 0xff, //
    0x10, 0, 7, 0, 0xff, 0xff, 0xff, 0xff, //
    0x20, 0, 5, 0, 0xff, 0xff, 0xff, 0xff,
];

/// A path longer than the 100 bytes a plain ustar header holds.
pub const LONG_NAME: &str = "usr/share/a-rather-long-directory-name-for-testing-ustar-limits/and-another-nested-directory-level/file-with-a-long-name.txt";

/// [`simple_rootfs`] plus owners, modes, setuid, hard links, device nodes,
/// a FIFO, xattrs, a fixed mtime and a long path.
pub fn rich_rootfs(dir: &Path, version: &str) -> RichTree {
    simple_rootfs(dir, version);
    use std::os::unix::fs::{chown, lchown, symlink};
    // Owner before mode: chown clears setuid bits and capabilities.
    write(dir, "etc/secret.conf", "owned by 1234:5678\n", 0o640);
    chown(dir.join("etc/secret.conf"), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(
        dir.join("etc/secret.conf"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();

    write(dir, "usr/bin/suid-tool", "#!/bin/sh\nid\n", 0o755);
    fs::set_permissions(
        dir.join("usr/bin/suid-tool"),
        fs::Permissions::from_mode(0o4755),
    )
    .unwrap();

    fs::create_dir_all(dir.join("srv/app")).unwrap();
    chown(dir.join("srv/app"), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(dir.join("srv/app"), fs::Permissions::from_mode(0o750)).unwrap();

    write(dir, "usr/lib/libfoo.so.1", "ELF pretend library\n", 0o644);
    fs::hard_link(
        dir.join("usr/lib/libfoo.so.1"),
        dir.join("usr/lib/libfoo-hardlink.so.1"),
    )
    .unwrap();
    symlink("libfoo.so.1", dir.join("usr/lib/libfoo.so")).unwrap();
    lchown(dir.join("usr/lib/libfoo.so"), Some(1234), Some(5678)).unwrap();

    fs::create_dir_all(dir.join("dev")).unwrap();
    sh(Command::new("mknod")
        .arg(dir.join("dev/null"))
        .args(["c", "1", "3"]));
    fs::set_permissions(dir.join("dev/null"), fs::Permissions::from_mode(0o666)).unwrap();
    fs::create_dir_all(dir.join("run")).unwrap();
    sh(Command::new("mkfifo").arg(dir.join("run/initctl")));
    fs::set_permissions(dir.join("run/initctl"), fs::Permissions::from_mode(0o600)).unwrap();

    write(dir, "etc/tagged", "has xattrs\n", 0o644);
    xattr::set(dir.join("etc/tagged"), "user.test", b"hello").unwrap();

    write(dir, "usr/bin/ping", "#!/bin/sh\necho ping\n", 0o755);
    let with_cap = xattr::set(
        dir.join("usr/bin/ping"),
        "security.capability",
        &CAP_NET_RAW_EP,
    )
    .is_ok();

    write(dir, "etc/fixed-mtime", "old\n", 0o644);
    sh(Command::new("touch")
        .args(["-h", "-d", "@1600000000"])
        .arg(dir.join("etc/fixed-mtime")));

    write(dir, LONG_NAME, "long\n", 0o644);
    write(dir, "empty", "", 0o644);

    // Random data spanning several stream buffers, with an odd length.
    let big = dir.join("usr/lib/big.bin");
    sh(Command::new("head")
        .args(["-c", &(3 * MIB + 4321).to_string(), "/dev/urandom"])
        .stdout(fs::File::create(&big).unwrap()));
    RichTree {
        with_cap,
        big_sha256: sha256_file(&big),
    }
}

/// Bundle facts from `abup bundle info --json`.
pub fn bundle_info(bundle: &Path) -> Value {
    let run = run_abup(&strings(&["--json", "bundle", "info", s(bundle)]), None);
    run.ok();
    run.json()
}

/// The byte range of the rootfs payload's stored bytes within the bundle
/// file, from the layout `abup bundle info --json` shows.
pub fn payload_range(bundle: &Path) -> std::ops::Range<u64> {
    let info = bundle_info(bundle);
    let p = &info["layout"]["payloads"][0];
    assert_eq!(p["name"], "rootfs", "{info:#}");
    let offset = p["offset"].as_u64().expect("payload offset in bundle info");
    let length = p["length"].as_u64().expect("payload length in bundle info");
    assert_eq!(
        length,
        info["manifest"]["payloads"][0]["stored_size"]
            .as_u64()
            .unwrap()
    );
    offset..offset + length
}

/// The steps of a run report as (name, state) pairs.
pub fn steps(report: &Value) -> Vec<(String, String)> {
    report["steps"]
        .as_array()
        .expect("steps in the report")
        .iter()
        .map(|s| {
            (
                s["step"].as_str().unwrap_or_default().to_string(),
                s["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The state of one step of a run report.
#[track_caller]
pub fn step_state(report: &Value, name: &str) -> String {
    steps(report)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, st)| st)
        .unwrap_or_else(|| panic!("no step {name} in {report:#}"))
}

/// The comment of one step of a run report.
#[track_caller]
pub fn step_comment(report: &Value, name: &str) -> String {
    report["steps"]
        .as_array()
        .expect("steps in the report")
        .iter()
        .find(|s| s["step"] == name)
        .and_then(|s| s["comment"].as_str())
        .unwrap_or_else(|| panic!("no step {name} in {report:#}"))
        .to_string()
}

/// The install steps, in order.
pub const INSTALL_STEPS: [&str; 12] = [
    "load-config",
    "verify-bundle",
    "inspect-system",
    "check",
    "mark-bad",
    "write",
    "verify",
    "preserve",
    "migrate",
    "boot-files",
    "record",
    "activate",
];

/// Step names of a report.
pub fn step_names(report: &Value) -> Vec<String> {
    steps(report).into_iter().map(|(n, _)| n).collect()
}

/// Asserts the set of names in a directory listing (ignoring lost+found).
pub fn names_in(dir: &Path) -> HashSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lost+found")
        .collect()
}

// ---------------------------------------------------------------------------
// U-Boot environments, checked with the real fw_printenv / fw_setenv
// ---------------------------------------------------------------------------

/// The U-Boot environment every U-Boot test disk starts with.
pub const UBOOT_INITIAL_ENV: &[(&str, &str)] = &[
    ("BOOT_ORDER", "A B"),
    ("BOOT_A_LEFT", "3"),
    ("BOOT_B_LEFT", "0"),
];

/// Size of the test U-Boot environments (as on the QEMU board's FAT).
pub const UBOOT_ENV_SIZE: usize = 0x4000;

/// Where a test's U-Boot environment lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UbootLoc {
    /// `uboot.env` + `uboot-redund.env` on the FAT boot partition
    /// (unmounted: abup rewrites their clusters in place).
    FatRedundant,
    /// `uboot.env` alone on the FAT boot partition.
    FatSingle,
    /// Two copies at offsets 0x10000 and 0x20000 of a raw "flash" image,
    /// configured through an `fw_env.config`.
    FlashOffsets,
}

impl UbootLoc {
    fn files(self) -> &'static [&'static str] {
        match self {
            UbootLoc::FatRedundant => &["uboot.env", "uboot-redund.env"],
            UbootLoc::FatSingle => &["uboot.env"],
            UbootLoc::FlashOffsets => &[],
        }
    }

    /// The `[boot.uboot]` body.
    pub fn config(self, root: &Path) -> String {
        match self {
            UbootLoc::FatRedundant => format!(
                "partlabel = \"boot\"\npath = \"uboot.env\"\nredundant_path = \"uboot-redund.env\"\nsize = {UBOOT_ENV_SIZE:#x}"
            ),
            UbootLoc::FatSingle => {
                format!("partlabel = \"boot\"\npath = \"uboot.env\"\nsize = {UBOOT_ENV_SIZE:#x}")
            }
            UbootLoc::FlashOffsets => {
                format!("fw_env_config = {:?}", s(&root.join("fw_env.config")))
            }
        }
    }

    fn redundant(self) -> bool {
        self != UbootLoc::FatSingle
    }
}

/// Makes the boot partition FAT with the env files, or the flash image.
pub fn uboot_env_init(disk: &TestDisk, root: &Path, u: UbootLoc, vars: &[(&str, &str)]) {
    let text: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    let vars_file = root.join("uboot-vars.txt");
    fs::write(&vars_file, text).unwrap();
    let image = root.join("uboot-env.bin");
    let mut cmd = Command::new("mkenvimage");
    if u.redundant() {
        cmd.arg("-r");
    }
    sh(cmd
        .args(["-p", "0", "-s", &UBOOT_ENV_SIZE.to_string(), "-o"])
        .arg(&image)
        .arg(&vars_file));
    if u == UbootLoc::FlashOffsets {
        let flash = root.join("flash.img");
        let env = fs::read(&image).unwrap();
        let mut data = vec![0xffu8; 0x30000];
        data[0x10000..0x10000 + env.len()].copy_from_slice(&env);
        data[0x20000..0x20000 + env.len()].copy_from_slice(&env);
        fs::write(&flash, data).unwrap();
        fs::write(
            root.join("fw_env.config"),
            format!(
                "# test flash\n{f} 0x10000 {UBOOT_ENV_SIZE:#x}\n{f} 0x20000 {UBOOT_ENV_SIZE:#x}\n",
                f = s(&flash)
            ),
        )
        .unwrap();
        return;
    }
    let lo = disk.attach("boot", false);
    // -I: a reused loop number may still show another user's partitions.
    sh(Command::new("mkfs.vfat")
        .args(["-I", "-n", "BOOT"])
        .arg(lo.path()));
    for f in u.files() {
        sh(Command::new("mcopy")
            .arg("-i")
            .arg(lo.path())
            .arg(&image)
            .arg(format!("::{f}")));
    }
    flushbufs(lo.path());
}

/// Writes back and drops the page cache of a loop device: a loop number
/// reused from another user may otherwise serve stale blocks, and blocks
/// written through it must reach the image before it is detached.
fn flushbufs(dev: &Path) {
    sh(Command::new("blockdev").arg("--flushbufs").arg(dev));
}

/// Copies the env out of the disk into plain files and writes an
/// `fw_env.config` for them; returns the config's path.
fn uboot_env_export(disk: &TestDisk, root: &Path, u: UbootLoc) -> PathBuf {
    if u == UbootLoc::FlashOffsets {
        return root.join("fw_env.config");
    }
    let dir = root.join("uboot-export");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let lo = disk.attach("boot", true);
    flushbufs(lo.path());
    let mut cfg = String::new();
    for f in u.files() {
        let out = dir.join(f);
        sh(Command::new("mcopy")
            .arg("-i")
            .arg(lo.path())
            .arg(format!("::{f}"))
            .arg(&out));
        cfg += &format!("{} 0x0 {UBOOT_ENV_SIZE:#x}\n", s(&out));
    }
    fs::write(dir.join("fw_env.config"), cfg).unwrap();
    dir.join("fw_env.config")
}

/// The bytes of every copy of the environment, one after the other.
pub fn uboot_env_bytes(disk: &TestDisk, root: &Path, u: UbootLoc) -> Vec<u8> {
    let cfg = uboot_env_export(disk, root, u);
    let mut all = Vec::new();
    for line in fs::read_to_string(cfg).unwrap().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || f[0].starts_with('#') {
            continue;
        }
        let off = u64::from_str_radix(f[1].trim_start_matches("0x"), 16).unwrap();
        let data = fs::read(f[0]).unwrap();
        all.extend_from_slice(&data[off as usize..off as usize + UBOOT_ENV_SIZE]);
    }
    all
}

/// `fw_printenv` of the test's U-Boot environment.
pub fn fw_printenv(disk: &TestDisk, root: &Path, u: UbootLoc) -> BTreeMap<String, String> {
    let cfg = uboot_env_export(disk, root, u);
    let out = sh(Command::new("fw_printenv").arg("-c").arg(&cfg));
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `fw_setenv NAME VALUE` on the test's U-Boot environment (as U-Boot's
/// boot script would change it), written back to the disk.
pub fn fw_setenv(disk: &TestDisk, root: &Path, u: UbootLoc, name: &str, value: &str) {
    let cfg = uboot_env_export(disk, root, u);
    sh(Command::new("fw_setenv")
        .arg("-c")
        .arg(&cfg)
        .args([name, value]));
    if u == UbootLoc::FlashOffsets {
        return;
    }
    let lo = disk.attach("boot", false);
    for f in u.files() {
        sh(Command::new("mcopy")
            .arg("-o")
            .arg("-i")
            .arg(lo.path())
            .arg(root.join("uboot-export").join(f))
            .arg(format!("::{f}")));
    }
    flushbufs(lo.path());
}
