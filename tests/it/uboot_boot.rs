//! Real U-Boot boots: Debian's `u-boot-qemu` (qemu_arm64) under
//! `qemu-system-aarch64 -M virt` boots the slots abup installs, with
//! `boot-backends/uboot/boot.cmd` (built into boot.scr with mkimage)
//! unchanged, an arm64 Debian cloud kernel and a busybox initramfs per slot
//! that prints the slot and version it booted (and panics for a broken
//! version). abup runs on the host against the same disk image between
//! boots, with the booted slot the console printed.
//!
//! Scenarios: install v2 → B boots; mark-good → B again; a panicking v3 in A
//! → tried `tries` times → falls back to B; no boot-loop once B ran out of
//! tries too; an install killed mid-write → the old slot boots.
//!
//! The kernel and busybox packages come from the cache tests/run.sh fills
//! (`/var/cache/abup-tests`, `apt-get download` of arm64 packages).

use crate::util::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where tests/run.sh leaves the packages (`ABUP_TEST_CACHE` overrides).
fn cache() -> PathBuf {
    std::env::var_os("ABUP_TEST_CACHE").map_or("/var/cache/abup-tests".into(), PathBuf::from)
}
const UBOOT_BIN: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";

/// Unpacks the newest cached `.deb` whose name starts with `prefix` (once)
/// and returns the directory.
fn unpacked(prefix: &str) -> PathBuf {
    let cache = cache();
    let mut debs: Vec<PathBuf> = fs::read_dir(&cache)
        .unwrap_or_else(|e| panic!("{}: {e}; run tests/run.sh, which fills it", cache.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with(prefix) && n.ends_with("_arm64.deb")
        })
        .collect();
    debs.sort();
    let deb = debs.pop().unwrap_or_else(|| {
        panic!(
            "no {prefix}*_arm64.deb in {}; run tests/run.sh",
            cache.display()
        )
    });
    let dir = deb.with_extension("unpacked");
    if !dir.exists() {
        let tmp = deb.with_extension("unpacking");
        let _ = fs::remove_dir_all(&tmp);
        sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp));
        fs::rename(&tmp, &dir).unwrap();
    }
    dir
}

fn kernel() -> PathBuf {
    let dir = unpacked("linux-image-").join("boot");
    fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .expect("no vmlinuz in the arm64 kernel package")
}

/// The /init of every test slot's initramfs.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev 2>/dev/null
slot=$(/bin/busybox sed -n 's/.*abup\.slot=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "ABUP-BOOTED slot=$slot version=$(/bin/busybox cat /etc/abup-version)"
if [ -e /etc/abup-panic ]; then
    echo "ABUP-PANIC"
    exit 1
fi
echo "ABUP-POWEROFF"
/bin/busybox poweroff -f
"#;

/// A root filesystem tree for a slot: kernel, initramfs, os-release.
fn slot_tree(dir: &Path, version: &str, panics: bool) {
    let boot = dir.join("boot");
    fs::create_dir_all(&boot).unwrap();
    fs::copy(kernel(), boot.join("vmlinuz")).unwrap();
    write(
        dir,
        "etc/os-release",
        &format!("VERSION={version}\n"),
        0o644,
    );
    // The initramfs: static arm64 busybox, /dev/console, /init.
    let r = dir.with_extension("initramfs");
    let _ = fs::remove_dir_all(&r);
    for d in ["bin", "dev", "etc", "proc"] {
        fs::create_dir_all(r.join(d)).unwrap();
    }
    fs::copy(
        unpacked("busybox-static_").join("bin/busybox"),
        r.join("bin/busybox"),
    )
    .unwrap();
    write(&r, "init", INIT, 0o755);
    write(&r, "etc/abup-version", &format!("{version}\n"), 0o644);
    if panics {
        write(&r, "etc/abup-panic", "", 0o644);
    }
    sh(Command::new("mknod")
        .args(["-m", "600"])
        .arg(r.join("dev/console"))
        .args(["c", "5", "1"]));
    sh(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}",
        s(&r),
        s(&boot.join("initrd.img"))
    )));
    // The staging tree sits beside the mount point, outside any temp dir.
    fs::remove_dir_all(&r).expect("removing the initramfs staging tree");
}

/// One QEMU run: from power-on until the guest powers off (through any
/// reboots in between), with the serial console it printed.
struct Run {
    console: String,
    secs: f64,
}

impl Run {
    /// `(slot, version)` of every boot that reached the initramfs.
    fn boots(&self) -> Vec<(String, String)> {
        self.console
            .lines()
            .filter_map(|l| l.trim().strip_prefix("ABUP-BOOTED "))
            .map(|l| {
                let f = |k: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(k))
                        .unwrap_or("")
                        .to_string()
                };
                (f("slot="), f("version="))
            })
            .collect()
    }

    fn u_boot_lines(&self) -> Vec<&str> {
        self.console
            .lines()
            .filter(|l| l.starts_with("abup: "))
            .collect()
    }
}

fn boot(disk: &Path, work: &Path, max: Duration) -> Run {
    let log = work.join("console.log");
    let _ = fs::remove_file(&log);
    let start = Instant::now();
    let mut child = Command::new("qemu-system-aarch64")
        .args(["-M", "virt", "-cpu", "cortex-a57", "-m", "512", "-smp", "1"])
        .args(["-display", "none", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", s(&log)))
        .args(["-bios", UBOOT_BIN])
        .arg("-drive")
        .arg(format!("if=none,file={},format=raw,id=d", s(disk)))
        .args(["-device", "virtio-blk-device,drive=d"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting qemu-system-aarch64 (install qemu-system-arm)");
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > max {
            let _ = child.kill();
            let _ = child.wait();
            let console = fs::read_to_string(&log).unwrap_or_default();
            panic!("the VM did not power off within {max:?}; console:\n{console}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let raw = fs::read(&log).unwrap_or_default();
    let run = Run {
        console: String::from_utf8_lossy(&raw).replace('\r', ""),
        secs: start.elapsed().as_secs_f64(),
    };
    eprintln!(
        "uboot boot: {:.1} s, boots {:?}, U-Boot said {:?}",
        run.secs,
        run.boots(),
        run.u_boot_lines()
    );
    run
}

/// What a killed abup leaves behind (its mounts of slots and the loop
/// devices under them, ours to release since our child made them).
fn release_after_kill(image: &Path) {
    std::thread::sleep(Duration::from_millis(500));
    for lo in loops_over(image) {
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        for l in mounts.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dash = f.iter().position(|&x| x == "-").unwrap();
            if Path::new(f[dash + 2]) == lo {
                let _ = Command::new("umount").arg(f[4]).status();
            }
        }
        let _ = Command::new("losetup").arg("-d").arg(&lo).status();
    }
}

fn printenv(env: &Env) -> std::collections::BTreeMap<String, String> {
    fw_printenv(&env.disk, &env.root, UbootLoc::FatRedundant)
}

#[test]
fn uboot_real_boots_install_fallback_and_no_boot_loop() {
    let mut env = Env::builder().uboot(UbootLoc::FatRedundant).build();
    // tries = 2: a broken slot is tried twice before U-Boot falls back.
    env.opts.tries = 2;
    env.write_config(&env.config, &env.opts);
    let work = env.root.clone();
    let image = env.disk.image.clone();

    // The bootloader half: boot.scr from the repo's boot.cmd, on the FAT
    // boot partition that distro_bootcmd scans (legacy-bootable flag).
    let cmd = Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-backends/uboot/boot.cmd");
    let scr = work.join("boot.scr");
    sh(Command::new("mkimage")
        .args(["-A", "arm64", "-T", "script", "-C", "none", "-d"])
        .arg(&cmd)
        .arg(&scr));
    {
        let lo = env.disk.attach("boot", false);
        sh(Command::new("mcopy")
            .arg("-i")
            .arg(lo.path())
            .arg(&scr)
            .arg("::boot.scr"));
    }
    sh(Command::new("sgdisk").args(["-A", "1:set:2"]).arg(&image));
    // Slot A runs 1.0.0.
    {
        let m = env.disk.mount("rootA", true);
        slot_tree(m.path(), "1.0.0", false);
    }
    let bundle = |version: &str, panics: bool| {
        let tree = work.join(format!("tree-{version}"));
        slot_tree(&tree, version, panics);
        env.bundle(Source::Rootfs(&tree), version, "zstd")
    };
    let long = Duration::from_secs(300);

    // 0. A boots; U-Boot counts the try in the redundant env on FAT.
    let r = boot(&image, &work, long);
    assert_eq!(r.boots(), [("A".into(), "1.0.0".into())], "{}", r.console);
    assert_eq!(printenv(&env)["BOOT_A_LEFT"], "2");
    env.abup(&["--booted-slot", "A", "mark-good"]).ok();

    // 1. install v2 from A → B boots, one try used.
    let v2 = bundle("2.0.0", false);
    env.install_ok("A", &v2, &[]);
    assert_eq!(printenv(&env)["BOOT_ORDER"], "B A");
    let r = boot(&image, &work, long);
    assert_eq!(r.boots(), [("B".into(), "2.0.0".into())], "{}", r.console);
    assert_eq!(printenv(&env)["BOOT_B_LEFT"], "1");
    let st = env.status(Some("B"));
    assert_eq!(st["slots"]["B"]["tries_left"], 1, "{st:#}");
    assert_eq!(st["slots"]["B"]["state"], "trying");

    // 2. mark-good resets the counter; B keeps booting.
    env.abup(&["--booted-slot", "B", "mark-good"]).ok();
    assert_eq!(printenv(&env)["BOOT_B_LEFT"], "2");
    let r = boot(&image, &work, long);
    assert_eq!(r.boots(), [("B".into(), "2.0.0".into())], "{}", r.console);
    env.abup(&["--booted-slot", "B", "mark-good"]).ok();

    // 3. A v3 that panics, installed into A: tried twice, then U-Boot falls
    //    back to B on its own (the VM reboots through the panics).
    let v3 = bundle("3.0.0", true);
    env.install_ok("B", &v3, &[]);
    let r = boot(&image, &work, Duration::from_secs(480));
    assert_eq!(
        r.boots(),
        [
            ("A".into(), "3.0.0".into()),
            ("A".into(), "3.0.0".into()),
            ("B".into(), "2.0.0".into())
        ],
        "{}",
        r.console
    );
    assert_eq!(r.console.matches("ABUP-PANIC").count(), 2);
    let after = printenv(&env);
    assert_eq!(after["BOOT_ORDER"], "B", "A used its tries: dropped");
    assert_eq!(after["BOOT_B_LEFT"], "1");
    let st = env.status(Some("B"));
    assert_eq!(st["primary"], "B", "{st:#}");
    assert_eq!(st["slots"]["A"]["bootable"], false, "{st:#}");

    // 4. No boot-loop: B is never marked good again. It boots counted once
    //    more, then uncounted; the broken A never again.
    let r = boot(&image, &work, long);
    assert_eq!(r.boots(), [("B".into(), "2.0.0".into())], "{}", r.console);
    assert_eq!(printenv(&env)["BOOT_B_LEFT"], "0");
    // No slot has tries left: status names the slot U-Boot boots uncounted
    // (the boot below proves it), with no "nothing bootable" warning.
    let st = env.status(Some("B"));
    assert_eq!(st["primary"], "B", "{st:#}");
    assert!(
        !st["warnings"].to_string().contains("no slot it can boot"),
        "{st:#}"
    );
    let r = boot(&image, &work, long);
    assert_eq!(r.boots(), [("B".into(), "2.0.0".into())], "{}", r.console);
    assert!(
        r.console.contains("no slot has tries left"),
        "{}",
        r.console
    );
    env.abup(&["--booted-slot", "B", "mark-good"]).ok();

    // 5. An install into A killed while it writes: B boots.
    let v4 = bundle("4.0.0", false);
    let mut child = Command::new(abup_bin())
        .args([
            "--config",
            s(&env.config),
            "--booted-slot",
            "B",
            "install",
            s(&v4),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::{BufRead, BufReader};
        let out = BufReader::new(child.stdout.take().unwrap());
        for line in out.lines() {
            if line.unwrap().starts_with("==> write") {
                break;
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the install finished before it was killed"
    );
    release_after_kill(&image);
    assert_eq!(printenv(&env)["BOOT_ORDER"], "B", "A was marked bad first");
    let r = boot(&image, &work, long);
    assert_eq!(r.boots(), [("B".into(), "2.0.0".into())], "{}", r.console);
}
