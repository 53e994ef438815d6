//! Real systemd-boot boots: Debian 12's `systemd-boot-efi` (252) as
//! `EFI/BOOT/BOOTX64.EFI` under OVMF in QEMU, `loader.conf` and the two
//! entries of `boot-backends/systemd-boot/` (with console options added),
//! a Debian cloud kernel on the ESP mounting the slot abup wrote
//! (`root=PARTLABEL=rootX`), and a busybox /sbin/init in each slot that
//! prints the slot, its version and the `LoaderEntrySelected` EFI variable,
//! then powers off (or panics, for a broken version). abup runs on the host
//! between boots against the same disk image, with the ESP unmounted
//! (mtools), as a rescue system or factory would.
//!
//! Scenarios (tries = 2): install v1 → A boots and systemd-boot counts the
//! try; mark-good; install v2 → B boots; an install killed mid-write → the
//! old slot boots; a panicking v3 → tried twice, then B boots, and again
//! (no boot-loop). After each boot the entry names on the ESP are what
//! systemd-boot's renames make of them, and `abup status` on the host says
//! which slot boots next before the boot proves it.
//!
//! By hand: `cargo test --test tests sdboot_boot -- --nocapture`, as root;
//! ABUP_QEMU_KEEP=1 keeps the work dir.

use super::qemu::{self, Boot, Ended, Firmware, Vm};
use super::util::{self, keygen, make_bundle, sh, Source};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const COMPATIBLE: &str = "abup-qemu-sdboot";
const BOOTED: &str = "ABUP-BOOTED";
const PANIC: &str = "ABUP-PANIC";
const SDBOOT_EFI: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// The slots' /sbin/init.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t tmpfs tmpfs /run
/bin/busybox mkdir -p /run/bin
/bin/busybox --install -s /run/bin
export PATH=/run/bin
mount -t devtmpfs dev /dev
exec </dev/ttyS0 >/dev/ttyS0 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
insmod /lib/efivarfs.ko 2>/dev/null
mount -t efivarfs efivarfs /sys/firmware/efi/efivars
sel=$(tail -c +5 /sys/firmware/efi/efivars/LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f | tr -d '\000')
slot=$(sed -n 's/.*abup\.slot=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "ABUP-BOOTED slot=$slot version=$(cat /etc/abup-version) selected=$sel"
if [ -e /etc/abup-panic ]; then
    echo "ABUP-PANIC: this version is broken on purpose"
    echo c >/proc/sysrq-trigger
fi
echo "ABUP-POWEROFF"
sync
poweroff -f
"#;

struct Rig {
    dir: PathBuf,
    img: PathBuf,
    esp_offset: u64,
    kdir: PathBuf,
    secret: PathBuf,
    public: PathBuf,
    config: PathBuf,
    boots: u32,
    boot_secs: f64,
    // Last: removed after everything that lives in it.
    _work: qemu::WorkDir,
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

impl Rig {
    fn new(tries: u32) -> Rig {
        util::require_root();
        let work = qemu::WorkDir::new("abup-sdboot-");
        let dir = work.path().to_path_buf();
        let img = dir.join("disk.img");
        fs::File::create(&img).unwrap().set_len(240 << 20).unwrap();
        sh(Command::new("sgdisk")
            .args(["--clear", "-n", "1:0:+48M", "-t", "1:EF00", "-c", "1:esp"])
            .args(["-n", "2:0:+80M", "-c", "2:rootA"])
            .args(["-n", "3:0:+80M", "-c", "3:rootB"])
            .arg(&img));
        let info = sh(Command::new("sgdisk").args(["-i", "1"]).arg(&img));
        let first: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("First sector: "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap();
        let kdir = qemu::fetch_kernel("amd64");
        let rig = Rig {
            esp_offset: first * 512,
            config: dir.join("system.toml"),
            secret: dir.join("release.key"),
            public: dir.join("release.pub"),
            kdir,
            img,
            dir,
            _work: work,
            boots: 0,
            boot_secs: 0.0,
        };
        keygen(&rig.secret, &rig.public);
        rig.make_esp();
        fs::create_dir_all(rig.dir.join("efivars")).unwrap();
        fs::write(
            &rig.config,
            format!(
                "compatible = \"{COMPATIBLE}\"\nstate_dir = \"{}\"\n[disk]\ndevice = \"{}\"\n\
                 [slots.A]\npartlabel = \"rootA\"\n[slots.B]\npartlabel = \"rootB\"\n\
                 [boot]\nbackend = \"systemd-boot\"\ntries = {tries}\n[boot.systemd-boot]\n\
                 partlabel = \"esp\"\nefivars = \"{}\"\n[keys]\ntrusted = [\"{}\"]\n",
                s(&rig.dir.join("state")),
                s(&rig.img),
                s(&rig.dir.join("efivars")),
                s(&rig.public)
            ),
        )
        .unwrap();
        rig
    }

    /// `-i IMAGE@@OFFSET`: mtools on the ESP inside the image file, without
    /// a loop device (so nothing stale sits in a block device's cache).
    fn mtools(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(format!(
            "{}@@{}",
            s(&self.img),
            self.esp_offset
        ));
        c
    }

    /// FAT ESP: systemd-boot, the repo's loader.conf and example entries
    /// (plus the console options this VM needs), the kernel and an empty
    /// initramfs for each slot.
    fn make_esp(&self) {
        let esp = self.dir.join("esp.img");
        let _ = fs::remove_file(&esp);
        sh(Command::new("mkfs.vfat")
            .args(["-C", "-n", "ESP"])
            .arg(&esp)
            .arg((48 * 1024).to_string()));
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-backends/systemd-boot");
        let put = |from: &Path, to: &str| {
            sh(Command::new("mcopy")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(&esp)
                .arg(from)
                .arg(format!("::/{to}")));
        };
        for d in [
            "EFI",
            "EFI/BOOT",
            "loader",
            "loader/entries",
            "abup",
            "abup/a",
            "abup/b",
        ] {
            sh(Command::new("mmd")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(&esp)
                .arg(format!("::/{d}")));
        }
        put(Path::new(SDBOOT_EFI), "EFI/BOOT/BOOTX64.EFI");
        put(&src.join("loader.conf"), "loader/loader.conf");
        let initrd = self.dir.join("empty-initrd.img");
        sh(Command::new("sh").arg("-c").arg(format!(
            "printf '' | cpio -o -H newc 2>/dev/null | gzip > {}",
            s(&initrd)
        )));
        let kernel = qemu::kernel_image(&self.kdir);
        for (slot, entry) in [("a", "abup-1-a.conf"), ("b", "abup-0-b+0.conf")] {
            let text = fs::read_to_string(src.join("entries").join(entry)).unwrap();
            let text = format!("{text}options console=ttyS0 no_timer_check rootwait\n");
            let f = self.dir.join(entry);
            fs::write(&f, text).unwrap();
            put(&f, &format!("loader/entries/{entry}"));
            put(&kernel, &format!("abup/{slot}/vmlinuz"));
            put(&initrd, &format!("abup/{slot}/initrd.img"));
        }
        // Into partition 1 of the disk image.
        sh(Command::new("dd")
            .arg(format!("if={}", s(&esp)))
            .arg(format!("of={}", s(&self.img)))
            .args(["bs=1M", "conv=notrunc,fsync"])
            .arg(format!("seek={}", self.esp_offset))
            .arg("oflag=seek_bytes"));
        fs::remove_file(&esp).unwrap();
    }

    /// The entry file names on the ESP, sorted.
    fn entries(&self) -> Vec<String> {
        let out = sh(self.mtools("mdir").args(["-b", "::/loader/entries"]));
        let mut v: Vec<String> = out
            .lines()
            .filter_map(|l| l.strip_prefix("::/loader/entries/"))
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    fn rootfs(&self, version: &str, panics: bool) -> PathBuf {
        let root = self.dir.join(format!("rootfs-{version}"));
        let _ = fs::remove_dir_all(&root);
        for d in [
            "bin", "sbin", "lib", "etc", "dev", "proc", "sys", "run", "boot",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
        util::write(&root, "sbin/init", INIT, 0o755);
        let ko = sh(Command::new("find")
            .arg(self.kdir.join("lib/modules"))
            .args(["-name", "efivarfs.ko"]));
        fs::copy(ko.trim(), root.join("lib/efivarfs.ko")).unwrap();
        fs::write(root.join("etc/abup-version"), format!("{version}\n")).unwrap();
        if panics {
            fs::write(root.join("etc/abup-panic"), "").unwrap();
        }
        root
    }

    fn bundle(&self, version: &str, panics: bool) -> PathBuf {
        let root = self.rootfs(version, panics);
        let out = self.dir.join(format!("v{version}.abup"));
        make_bundle(
            Source::Rootfs(&root),
            version,
            "zstd",
            Some(&self.secret),
            COMPATIBLE,
            &out,
        );
        out
    }

    fn abup(&self, args: &[&str]) -> util::Run {
        let mut all = vec!["--config".to_string(), s(&self.config).to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        util::run_abup(&all, None)
    }

    /// abup's status on the host, booted from `booted`.
    fn status(&self, booted: &str) -> serde_json::Value {
        let r = self.abup(&["--json", "--booted-slot", booted, "status"]);
        r.ok();
        r.json()
    }

    fn boot(&mut self) -> Boot {
        let mut vm = Vm::x86_64(&self.img, Firmware::Uefi, &self.dir);
        // Generous: this machine is shared and QEMU runs without KVM.
        vm.timeout = Duration::from_secs(400);
        let b = vm.boot(&[PANIC]);
        self.boots += 1;
        self.boot_secs += b.secs;
        eprintln!(
            "[systemd-boot boot {}: {:.1} s, {:?}] {}",
            self.boots,
            b.secs,
            b.ended,
            b.lines_with("ABUP-").join(" | ")
        );
        b
    }

    /// Boots and expects `slot` with `version`, chosen through `entry`
    /// (LoaderEntrySelected), and a clean power-off.
    fn boot_expect(&mut self, slot: &str, version: &str, entry: &str) {
        let b = self.boot();
        b.assert_booted(BOOTED, slot, version, &Ended::Exited);
        assert!(
            b.lines_with(BOOTED)[0]
                .trim_end()
                .ends_with(&format!(" selected={entry}")),
            "expected entry {entry}: {:?}",
            b.lines_with(BOOTED)
        );
        assert!(b.text().contains("ABUP-POWEROFF"), "console:\n{}", b.text());
    }

    /// Boots a slot that panics; the VM is stopped there (a crash).
    fn boot_panics(&mut self, slot: &str, version: &str) {
        let b = self.boot();
        b.assert_booted(BOOTED, slot, version, &Ended::Stopped(PANIC.to_string()));
    }
}

fn names(list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

#[track_caller]
fn next_is(st: &serde_json::Value, slot: &str) {
    assert_eq!(st["primary"], slot, "{st:#}");
}

#[test]
fn sdboot_boot_uefi_install_fallback_no_loop_interrupted() {
    let started = Instant::now();
    let mut rig = Rig::new(2);
    assert_eq!(rig.entries(), names(&["abup-0-b+0.conf", "abup-1-a.conf"]));

    // v1 into A from a "rescue system"; A boots with a try counted.
    let v1 = rig.bundle("1.0.0", false);
    rig.abup(&["install", "--target-slot", "A", s(&v1)]).ok();
    assert_eq!(
        rig.entries(),
        names(&["abup-0-b+0.conf", "abup-1-a+2.conf"])
    );
    rig.boot_expect("A", "1.0.0", "abup-1-a+2.conf");
    assert_eq!(
        rig.entries(),
        names(&["abup-0-b+0.conf", "abup-1-a+1-1.conf"])
    );
    rig.abup(&["--booted-slot", "A", "mark-good"]).ok();
    assert_eq!(rig.entries(), names(&["abup-0-b+0.conf", "abup-1-a.conf"]));

    // v2 into B: B boots; blessed, it boots without counting.
    let v2 = rig.bundle("2.0.0", false);
    rig.abup(&["--booted-slot", "A", "install", s(&v2)]).ok();
    assert_eq!(rig.entries(), names(&["abup-1-a.conf", "abup-2-b+2.conf"]));
    next_is(&rig.status("A"), "B");
    rig.boot_expect("B", "2.0.0", "abup-2-b+2.conf");
    assert_eq!(
        rig.entries(),
        names(&["abup-1-a.conf", "abup-2-b+1-1.conf"])
    );
    rig.abup(&["--booted-slot", "B", "mark-good"]).ok();
    assert_eq!(rig.entries(), names(&["abup-1-a.conf", "abup-2-b.conf"]));

    // An install into A killed while it writes: A was marked bad first,
    // B boots.
    let v4 = rig.bundle("4.0.0", false);
    {
        let out = Command::new(util::abup_bin())
            .args([
                "--config",
                s(&rig.config),
                "--booted-slot",
                "B",
                "install",
                s(&v4),
            ])
            .env("ABUP_FAILPOINTS", "extract-member=kill@3")
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(9), "abup was not killed: {out:?}");
    }
    assert_eq!(rig.entries(), names(&["abup-1-a+0.conf", "abup-2-b.conf"]));
    next_is(&rig.status("B"), "B");
    rig.boot_expect("B", "2.0.0", "abup-2-b.conf");

    // A panicking v3 in A: tried twice (systemd-boot counts down), then B
    // boots, and keeps booting.
    let v3 = rig.bundle("3.0.0", true);
    rig.abup(&["--booted-slot", "B", "install", s(&v3)]).ok();
    assert_eq!(rig.entries(), names(&["abup-2-b.conf", "abup-3-a+2.conf"]));
    next_is(&rig.status("B"), "A");
    rig.boot_panics("A", "3.0.0");
    assert_eq!(
        rig.entries(),
        names(&["abup-2-b.conf", "abup-3-a+1-1.conf"])
    );
    rig.boot_panics("A", "3.0.0");
    assert_eq!(
        rig.entries(),
        names(&["abup-2-b.conf", "abup-3-a+0-2.conf"])
    );
    let st = rig.status("B");
    next_is(&st, "B");
    assert_eq!(st["slots"]["A"]["state"], "bad", "{st:#}");
    rig.boot_expect("B", "2.0.0", "abup-2-b.conf");
    rig.boot_expect("B", "2.0.0", "abup-2-b.conf");
    assert_eq!(
        rig.entries(),
        names(&["abup-2-b.conf", "abup-3-a+0-2.conf"])
    );

    eprintln!(
        "[systemd-boot] {} boots, {:.0} s booting, {:.0} s in all",
        rig.boots,
        rig.boot_secs,
        started.elapsed().as_secs_f64()
    );
}
