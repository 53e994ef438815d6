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

use super::qemu::{Boot, Ended, Vm, BOOT_TIMEOUT};
use crate::util::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

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

/// `(slot, version)` of every boot of a run that reached the initramfs.
fn boots(run: &Boot) -> Vec<(String, String)> {
    run.lines_with("ABUP-BOOTED ")
        .iter()
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

/// A run of one boot, of `slot` running `version`.
#[track_caller]
fn boot_once(disk: &Path, slot: &str, version: &str) -> Boot {
    let run = boot(disk, BOOT_TIMEOUT);
    assert_eq!(
        boots(&run),
        [(slot.to_string(), version.to_string())],
        "{}",
        run.timeline()
    );
    run
}

/// One QEMU run: from power-on until the guest powers off, through any
/// reboots in between (U-Boot's fallback after panics), within `timeout`
/// (retried once from the disk as it was if it stalls, see `qemu::Vm`).
fn boot(disk: &Path, timeout: Duration) -> Boot {
    let mut vm = Vm::new(
        "qemu-system-aarch64",
        [
            "-M".to_string(),
            "virt".into(),
            "-cpu".into(),
            "cortex-a57".into(),
            "-m".into(),
            "512".into(),
            "-smp".into(),
            "1".into(),
            "-bios".into(),
            UBOOT_BIN.into(),
            "-drive".into(),
            format!("if=none,file={},format=raw,id=d", s(disk)),
            "-device".into(),
            "virtio-blk-device,drive=d".into(),
        ],
    );
    vm.reboot = true;
    vm.timeout = timeout;
    vm.writable.push(disk.to_path_buf());
    let run = vm.boot(&[]);
    assert_eq!(
        run.ended,
        Ended::Exited,
        "the VM did not power off within {timeout:?}; console:\n{}",
        run.timeline()
    );
    eprintln!(
        "uboot boot: {:.1} s, boots {:?}, U-Boot said {:?}",
        run.secs,
        boots(&run),
        run.lines_with("abup: ")
    );
    run
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

    // 0. A boots; U-Boot counts the try in the redundant env on FAT.
    boot_once(&image, "A", "1.0.0");
    assert_eq!(printenv(&env)["BOOT_A_LEFT"], "2");
    env.abup(&["--booted-slot", "A", "mark-good"]).ok();

    // 1. install v2 from A → B boots, one try used.
    let v2 = bundle("2.0.0", false);
    env.install_ok("A", &v2, &[]);
    assert_eq!(printenv(&env)["BOOT_ORDER"], "B A");
    boot_once(&image, "B", "2.0.0");
    assert_eq!(printenv(&env)["BOOT_B_LEFT"], "1");
    let st = env.status(Some("B"));
    assert_eq!(st["slots"]["B"]["tries_left"], 1, "{st:#}");
    assert_eq!(st["slots"]["B"]["state"], "trying");

    // 2. mark-good resets the counter; B keeps booting.
    env.abup(&["--booted-slot", "B", "mark-good"]).ok();
    assert_eq!(printenv(&env)["BOOT_B_LEFT"], "2");
    boot_once(&image, "B", "2.0.0");
    env.abup(&["--booted-slot", "B", "mark-good"]).ok();

    // 3. A v3 that panics, installed into A: tried twice, then U-Boot falls
    //    back to B on its own (the VM reboots through the panics).
    let v3 = bundle("3.0.0", true);
    env.install_ok("B", &v3, &[]);
    let r = boot(&image, BOOT_TIMEOUT * 3);
    assert_eq!(
        boots(&r),
        [
            ("A".into(), "3.0.0".into()),
            ("A".into(), "3.0.0".into()),
            ("B".into(), "2.0.0".into())
        ],
        "{}",
        r.timeline()
    );
    assert_eq!(r.text().matches("ABUP-PANIC").count(), 2);
    let after = printenv(&env);
    assert_eq!(after["BOOT_ORDER"], "B", "A used its tries: dropped");
    assert_eq!(after["BOOT_B_LEFT"], "1");
    let st = env.status(Some("B"));
    assert_eq!(st["primary"], "B", "{st:#}");
    assert_eq!(st["slots"]["A"]["bootable"], false, "{st:#}");

    // 4. No boot-loop: B is never marked good again. It boots counted once
    //    more, then uncounted; the broken A never again.
    boot_once(&image, "B", "2.0.0");
    assert_eq!(printenv(&env)["BOOT_B_LEFT"], "0");
    // No slot has tries left: status names the slot U-Boot boots uncounted
    // (the boot below proves it), with no "nothing bootable" warning.
    let st = env.status(Some("B"));
    assert_eq!(st["primary"], "B", "{st:#}");
    assert_eq!(st["slots"]["B"]["state"], "last-resort", "{st:#}");
    assert!(
        !st["warnings"].to_string().contains("no slot it can boot"),
        "{st:#}"
    );
    let r = boot_once(&image, "B", "2.0.0");
    assert!(
        r.text().contains("no slot has tries left"),
        "{}",
        r.timeline()
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
    super::qemu::release_after_kill(&image);
    assert_eq!(printenv(&env)["BOOT_ORDER"], "B", "A was marked bad first");
    boot_once(&image, "B", "2.0.0");
}
