//! Real boots under QEMU (TCG, no KVM here), for the bootloader tests: a VM
//! runner that reads the serial console as it comes and can stop the VM at
//! a marker, plus the kernel download and initramfs builder scripts in
//! `tests/qemu/`. Backend-neutral, the one runner of every real-boot test:
//! GRUB (tests/it/grub_boot.rs and the tests built on its rig) with OVMF and
//! SeaBIOS, systemd-boot with OVMF, U-Boot (tests/it/uboot_boot.rs) with its
//! own QEMU arguments.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The repo's `tests/qemu/` directory.
pub fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qemu")
}

/// A Debian kernel unpacked by `tests/qemu/fetch-kernel.sh` (cached in
/// /var/cache/abup-tests): the directory holding `boot/vmlinuz-*` and
/// `lib/modules/`.
pub fn fetch_kernel(arch: &str) -> PathBuf {
    let out = super::util::sh(Command::new(scripts().join("fetch-kernel.sh")).arg(arch));
    PathBuf::from(out.trim())
}

/// The kernel image inside a directory from [`fetch_kernel`].
pub fn kernel_image(kdir: &Path) -> PathBuf {
    std::fs::read_dir(kdir.join("boot"))
        .expect("reading the kernel's boot directory")
        .map(|e| e.unwrap().path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("vmlinuz-") || n.starts_with("vmlinux-")
        })
        .expect("a vmlinuz-* in the unpacked kernel")
}

/// Builds a busybox initramfs with `tests/qemu/mkinitramfs.sh`: `init` as
/// /init, the kernel's virtio disk modules, and `files` with their libraries.
pub fn build_initramfs(kdir: &Path, init: &Path, out: &Path, files: &[&Path]) {
    let mut cmd = Command::new(scripts().join("mkinitramfs.sh"));
    cmd.arg(kdir).arg(init).arg(out).args(files);
    super::util::sh(&mut cmd);
}

/// Releases what a killed abup left over `image`: the mounts of its loop
/// devices (lazily: a killed process may leave them busy a moment) and the
/// devices. Loop devices a guard of this test process holds stay.
pub fn release_after_kill(image: &Path) {
    for lo in super::util::leaked_loops(image) {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        for l in mounts.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dash = f.iter().position(|&x| x == "-").unwrap();
            if Path::new(f[dash + 2]) == lo {
                let _ = Command::new("umount").arg("-l").arg(f[4]).status();
            }
        }
        let _ = Command::new("losetup").arg("-d").arg(&lo).status();
    }
}

/// How long one boot may take before it is killed: about 20 times a quiet
/// boot here (11-18 s under TCG). A starved QEMU is that slow: one UEFI
/// boot held to 10% of a core (a cgroup CPU quota, like a loaded shared
/// machine) took 109 s to power-off, and the former 150 s limit was one
/// reason boots "never reached init". Only a boot that hangs reaches it.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(360);

/// A boot whose console stays silent this long has stalled. A quiet boot
/// here is never silent for more than a few seconds (OVMF's start, ~5 s, is
/// the longest gap), and starved to 10% of a core about ten times that.
pub const STALL: Duration = Duration::from_secs(150);

/// A QEMU test's work directory (disk image, bundles, firmware variables):
/// removed on drop, pass or fail, unless `ABUP_QEMU_KEEP` is set.
pub struct WorkDir(PathBuf);

impl WorkDir {
    pub fn new(prefix: &str) -> WorkDir {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("creating a work dir")
            .keep();
        WorkDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::env::var_os("ABUP_QEMU_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            eprintln!("kept {}", self.0.display());
        }
    }
}

/// PC firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// OVMF (package ovmf), with a fresh copy of its variable store.
    Uefi,
    /// SeaBIOS, QEMU's default.
    Bios,
}

/// How a boot ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// QEMU exited by itself (the guest powered off, or rebooted with
    /// `-no-reboot`).
    Exited,
    /// The console printed this marker and the VM was killed there.
    Stopped(String),
    /// Nothing of the above before the timeout; the VM was killed.
    TimedOut,
    /// The console was silent for [`STALL`]; the VM was killed.
    Stalled,
}

/// One boot: the console output, when each part of it arrived, and how it
/// ended.
#[derive(Debug)]
pub struct Boot {
    pub console: String,
    pub ended: Ended,
    pub secs: f64,
    /// (end of a chunk of `console` in bytes, seconds since QEMU started
    /// when it arrived), in order.
    pub arrivals: Vec<(usize, f64)>,
    /// Earlier tries of this boot that stalled (see [`Vm::boot`]), each as
    /// its [`Boot::timeline`].
    pub stalled_tries: Vec<String>,
}

impl Boot {
    /// The console without carriage returns and terminal escapes.
    pub fn text(&self) -> String {
        clean(&self.console)
    }

    /// The lines of the console that start with `prefix`.
    pub fn lines_with(&self, prefix: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter_map(|l| l.find(prefix).map(|i| l[i..].to_string()))
            .collect()
    }

    /// Seconds after QEMU started at which the console held byte `end`.
    fn arrived(&self, end: usize) -> f64 {
        self.arrivals
            .iter()
            .find(|(e, _)| *e >= end)
            .map_or(self.secs, |(_, t)| *t)
    }

    /// Seconds after QEMU started at which `marker` first showed on the
    /// console (escapes removed).
    pub fn secs_to(&self, marker: &str) -> Option<f64> {
        let (text, ends) = clean_mapped(&self.console);
        text.find(marker)
            .map(|i| self.arrived(ends[i + marker.len() - 1]))
    }

    /// One line on how the boot ended: the first thing a failing test
    /// prints, so that even a cut-off log tells a hang from a wrong slot.
    pub fn summary(&self) -> String {
        let last = self.arrivals.last().map_or(0.0, |a| a.1);
        let text = self.text();
        let line = text.lines().rev().find(|l| !l.trim().is_empty());
        format!(
            "boot ended {:?} after {:.1} s ({} stalled tries before); last console output at {last:.1} s: {:?}",
            self.ended,
            self.secs,
            self.stalled_tries.len(),
            line.unwrap_or("").trim()
        )
    }

    /// The console, cleaned, each line prefixed with when it arrived
    /// (`[  12.3] …`): where a slow or stuck boot spent its time. Starts
    /// with the [`summary`](Self::summary).
    pub fn timeline(&self) -> String {
        let mut out = self.summary() + "\n";
        let mut at = 0;
        for line in self.console.split_inclusive('\n') {
            at += line.len();
            let text = clean(line);
            let text = text.trim_end();
            if !text.is_empty() {
                out += &format!("[{:6.1}] {text}\n", self.arrived(at));
            }
        }
        out
    }
}

impl Boot {
    /// Checks that this boot printed exactly one `{marker} slot={slot}
    /// version={version} …` line (the test slots' inits print one) and
    /// ended as `ended`; the console is in the message otherwise.
    #[track_caller]
    pub fn assert_booted(&self, marker: &str, slot: &str, version: &str, ended: &Ended) {
        assert_eq!(&self.ended, ended, "console:\n{}", self.timeline());
        let booted = self.lines_with(marker);
        let want = format!("{marker} slot={slot} version={version}");
        assert!(
            booted.len() == 1
                && (booted[0].trim_end() == want || booted[0].starts_with(&format!("{want} "))),
            "expected slot {slot} version {version}, got {booted:?}; console:\n{}",
            self.timeline()
        );
    }
}

/// Removes `\r` and ANSI escape sequences.
pub fn clean(s: &str) -> String {
    clean_mapped(s).0
}

/// [`clean`], and for each byte of the result the offset in `s` just after
/// the character it came from.
fn clean_mapped(s: &str) -> (String, Vec<usize>) {
    let mut out = String::with_capacity(s.len());
    let mut ends = Vec::with_capacity(s.len());
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '\r' => {}
            '\u{1b}' => {
                if chars.peek().map(|&(_, n)| n) == Some('[') {
                    chars.next();
                    while let Some(&(_, n)) = chars.peek() {
                        chars.next();
                        if n.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            c => {
                out.push(c);
                ends.resize(out.len(), i + c.len_utf8());
            }
        }
    }
    (out, ends)
}

/// A QEMU virtual machine: the program and its arguments, the serial
/// console on stdout.
#[derive(Clone, Debug)]
pub struct Vm {
    pub program: String,
    pub args: Vec<String>,
    /// A boot taking longer than this is killed.
    pub timeout: Duration,
    /// The files the guest writes (disk images, firmware variables). Each
    /// boot first copies them aside; when the boot stalls (an emulator
    /// hang: no console output for [`STALL`]), they are put back as they
    /// were before it and the boot runs once more, so a retry starts from
    /// exactly the same disk and the test still sees one boot.
    pub writable: Vec<PathBuf>,
    /// A console silent this long means a stall ([`STALL`]).
    pub stall: Duration,
    /// Let the guest reboot (one run then spans every boot until it powers
    /// off: U-Boot's fallback after panics); by default a reboot ends the
    /// run (`-no-reboot`).
    pub reboot: bool,
}

impl Vm {
    /// Any QEMU: `program` (e.g. `qemu-system-aarch64`) with its machine,
    /// firmware and disk arguments; [`boot`](Self::boot) adds the console
    /// and no-reboot ones. Timeout [`BOOT_TIMEOUT`].
    pub fn new<S: Into<String>>(program: &str, args: impl IntoIterator<Item = S>) -> Vm {
        Vm {
            program: program.to_string(),
            args: args.into_iter().map(Into::into).collect(),
            timeout: BOOT_TIMEOUT,
            writable: Vec::new(),
            stall: STALL,
            reboot: false,
        }
    }

    /// An x86_64 PC (q35, 512 MiB) booting `disk` (raw) through `firmware`,
    /// the disk on NVMe (built into Debian's cloud kernel, so no initramfs
    /// is needed to mount a slot). `work` holds the OVMF variable store.
    pub fn x86_64(disk: &Path, firmware: Firmware, work: &Path) -> Vm {
        let mut args: Vec<String> = ["-machine", "q35", "-m", "512", "-smp", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if firmware == Firmware::Uefi {
            let vars = work.join("OVMF_VARS.fd");
            if !vars.exists() {
                std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars)
                    .expect("copying OVMF_VARS_4M.fd (install ovmf)");
            }
            args.extend([
                "-drive".to_string(),
                "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd".to_string(),
                "-drive".to_string(),
                format!("if=pflash,format=raw,file={}", vars.display()),
            ]);
        }
        args.extend([
            "-drive".to_string(),
            format!("file={},if=none,id=disk0,format=raw", disk.display()),
            "-device".to_string(),
            "nvme,serial=abup0,drive=disk0".to_string(),
        ]);
        let mut vm = Vm::new("qemu-system-x86_64", args);
        vm.writable.push(disk.to_path_buf());
        if firmware == Firmware::Uefi {
            vm.writable.push(work.join("OVMF_VARS.fd"));
        }
        vm
    }

    /// Boots once: runs QEMU with the serial console on stdout, no display,
    /// `-no-reboot` (a reboot ends the run) unless [`reboot`](Self::reboot),
    /// until it exits, the console shows one of `stop_at` (then it is
    /// killed: a power cut), or the timeout. A boot that stalls is retried
    /// once from the [`writable`](Self::writable) files as they were before
    /// it; the stalled try is kept in [`Boot::stalled_tries`]. QEMU is killed
    /// on the way out whatever happens, a panic of the test included.
    pub fn boot(&self, stop_at: &[&str]) -> Boot {
        let saved: Vec<(PathBuf, PathBuf)> = self
            .writable
            .iter()
            .map(|f| {
                let copy = PathBuf::from(format!("{}.before-boot", f.display()));
                super::util::sh(Command::new("cp").arg("--sparse=always").arg(f).arg(&copy));
                (f.clone(), copy)
            })
            .collect();
        let mut stalled = Vec::new();
        let boot = loop {
            let mut b = self.run(stop_at);
            if b.ended != Ended::Stalled || !stalled.is_empty() {
                b.stalled_tries = stalled;
                break b;
            }
            eprintln!(
                "[QEMU stalled: {}; putting back {} file(s) as they were before this boot and booting again]",
                b.summary(),
                saved.len()
            );
            stalled.push(b.timeline());
            for (f, copy) in &saved {
                super::util::sh(Command::new("cp").arg("--sparse=always").arg(copy).arg(f));
            }
        };
        for (_, copy) in saved {
            let _ = std::fs::remove_file(copy);
        }
        boot
    }

    /// One run of QEMU for [`boot`](Self::boot).
    fn run(&self, stop_at: &[&str]) -> Boot {
        let start = Instant::now();
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            // -nographic (not -display none): SeaBIOS then mirrors its and
            // GRUB's screen to the serial port too.
            .args(["-nographic", "-monitor", "none", "-net", "none"]);
        if !self.reboot {
            cmd.arg("-no-reboot");
        }
        let mut qemu = KillOnDrop(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {} (install qemu): {e}", self.program)),
        );
        let child = &mut qemu.0;
        // The console as it arrives, with when each chunk came.
        let out = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        let reader = {
            let out = out.clone();
            let mut stdout = child.stdout.take().unwrap();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut o = out.lock().unwrap();
                    o.0.extend_from_slice(&buf[..n]);
                    let end = o.0.len();
                    o.1.push((end, start.elapsed().as_secs_f64()));
                }
            })
        };
        // Markers are searched in the cleaned console (SeaBIOS mirrors the
        // screen with escapes between words), only from where the last look
        // ended (less a marker's length), and only when something arrived.
        let overlap = stop_at.iter().map(|m| m.len()).max().unwrap_or(0);
        let (mut raw_seen, mut clean_seen) = (0, 0);
        let ended = loop {
            if child.try_wait().unwrap().is_some() {
                break Ended::Exited;
            }
            let found = {
                let o = out.lock().unwrap();
                if o.0.len() == raw_seen {
                    None
                } else {
                    raw_seen = o.0.len();
                    let text = clean(&String::from_utf8_lossy(&o.0));
                    let mut from = clean_seen.min(text.len()).saturating_sub(overlap);
                    while !text.is_char_boundary(from) {
                        from -= 1;
                    }
                    clean_seen = text.len();
                    stop_at.iter().find(|m| text[from..].contains(**m)).copied()
                }
            };
            if let Some(m) = found {
                break Ended::Stopped(m.to_string());
            }
            if start.elapsed() > self.timeout {
                break Ended::TimedOut;
            }
            let last = out.lock().unwrap().1.last().map_or(0.0, |a| a.1);
            if start.elapsed().as_secs_f64() - last > self.stall.as_secs_f64() {
                break Ended::Stalled;
            }
            thread::sleep(Duration::from_millis(100));
        };
        // Every end but its own exit is a kill; the console reader ends
        // once QEMU is gone.
        if ended != Ended::Exited {
            let _ = child.kill();
            let _ = child.wait();
        }
        let secs = start.elapsed().as_secs_f64();
        let _ = reader.join();
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let (bytes, arrivals) = std::mem::take(&mut *out.lock().unwrap());
        let mut console = String::from_utf8_lossy(&bytes).into_owned();
        if !err.trim().is_empty() {
            console += &format!("\n[qemu stderr] {err}");
        }
        Boot {
            console,
            ended,
            secs,
            arrivals,
            stalled_tries: Vec::new(),
        }
    }
}

/// A stalled boot is retried once, from the guest's files as they were
/// before it: the stand-in "emulator" writes to its disk and hangs silently
/// the first time, and the second time finds the disk as it was.
#[test]
fn a_stalled_boot_is_retried_from_the_disk_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, "clean\n").unwrap();
    let tries = dir.path().join("tries");
    let fake = dir.path().join("fake-qemu");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho try >> {tries}\necho booting\n\
             if [ $(wc -l < {tries}) = 1 ]; then echo dirty > {disk}; exec sleep 60; fi\n\
             echo \"DISK $(cat {disk})\"\n",
            tries = tries.display(),
            disk = disk.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut vm = Vm::new(fake.to_str().unwrap(), Vec::<String>::new());
    vm.writable.push(disk.clone());
    vm.stall = Duration::from_secs(2);
    let boot = vm.boot(&[]);
    assert_eq!(boot.ended, Ended::Exited, "{}", boot.timeline());
    assert_eq!(boot.stalled_tries.len(), 1, "{}", boot.timeline());
    assert!(boot.text().contains("DISK clean"), "{}", boot.timeline());
    assert!(
        boot.stalled_tries[0].contains("Stalled"),
        "{}",
        boot.stalled_tries[0]
    );
    assert!(!Path::new(&format!("{}.before-boot", disk.display())).exists());
}

/// A QEMU process, killed and reaped when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The kernel download and the initramfs builder work together: a busybox
/// initramfs loads the kernel's virtio disk modules (after their
/// dependencies) and sees its disk.
#[test]
fn initramfs_loads_the_virtio_disk_stack() {
    super::util::require_root();
    let dir = tempfile::tempdir().unwrap();
    let kdir = fetch_kernel("amd64");
    let init = dir.path().join("init");
    std::fs::write(
        &init,
        "#!/bin/sh\nmount -t proc proc /proc\nmount -t devtmpfs dev /dev\n\
         for m in $(cat /etc/modules); do insmod $m; done\nsleep 1\n\
         echo \"INITRAMFS-DISK $(ls /dev/vda)\"\npoweroff -f\n",
    )
    .unwrap();
    let initrd = dir.path().join("initrd.gz");
    build_initramfs(&kdir, &init, &initrd, &[]);
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let vm = Vm::new(
        "qemu-system-x86_64",
        [
            "-machine".to_string(),
            "q35".into(),
            "-m".into(),
            "512".into(),
            "-kernel".into(),
            kernel_image(&kdir).display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            "console=ttyS0 panic=1 no_timer_check quiet".into(),
            "-drive".into(),
            format!("file={},if=virtio,format=raw", disk.display()),
        ],
    );
    // Run to the init's power-off: stopping at the marker could cut the
    // line before the device name (seen under load: "INITRAMFS-DISK /").
    let boot = vm.boot(&[]);
    assert!(
        boot.text().contains("INITRAMFS-DISK /dev/vda"),
        "{:?}:\n{}",
        boot.ended,
        boot.text()
    );
}
