//! Real boots of abup's GRUB backend: Debian's GRUB 2.06 under OVMF (UEFI)
//! and SeaBIOS (BIOS) in QEMU, `boot-backends/grub/grub.cfg` unchanged, a
//! Debian cloud kernel, and abup running inside the VM for `status`,
//! `mark-good` and `rollback` (booted-slot detection against a real
//! /proc/cmdline and root device). Installs run on the host against the
//! disk image between boots, as a rescue system or factory would.
//!
//! The disk comes from `tests/qemu/grub-disk.sh`; each slot is a tarball or
//! raw-image bundle holding the kernel, busybox, `tests/qemu/slot-init.sh`
//! as /sbin/init, and abup with its libraries. The init runs
//! `/data/run.sh` from the data partition (written by the test before each
//! boot) and powers off. GRUB's own view of the environment block is read
//! from the image without journal replay (`debugfs -c`).
//!
//! By hand: `cargo test --test tests grub_boot::uefi -- --nocapture`
//! (or `grub_boot::bios`), as root; ABUP_QEMU_KEEP=1 keeps the work dir.

use super::qemu::{self, Boot, Ended, Firmware, Vm};
use super::util::{self, keygen, make_bundle, sh, LoopDevice, LoopOpts, Mount, Source};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub(crate) const COMPATIBLE: &str = "abup-qemu-pc";
const BOOTED: &str = "ABUP-BOOTED";
const PANIC: &str = "ABUP-PANIC";
/// grub.cfg found no slot to boot and waits in its menu.
const NO_SLOT: &str = "abup: no bootable slot";

/// One disk image and everything the scenarios need around it (also used
/// by the boot-files scenario, tests/it/bootfiles_boot.rs).
pub(crate) struct Rig {
    pub(crate) dir: PathBuf,
    pub(crate) img: PathBuf,
    firmware: Firmware,
    kernel: PathBuf,
    abup_small: PathBuf,
    pub(crate) secret: PathBuf,
    pub(crate) public: PathBuf,
    pub(crate) parts: BTreeMap<String, (u64, u64)>,
    /// The `[boot]` section of abup's configs; GRUB's own by default.
    pub(crate) boot_toml: BootToml,
    boots: u32,
    boot_secs: f64,
}

impl Rig {
    pub(crate) fn new(firmware: Firmware) -> Rig {
        util::require_root();
        let dir = tempfile::Builder::new()
            .prefix("abup-qemu-")
            .tempdir()
            .unwrap()
            .keep();
        let img = dir.join("disk.img");
        sh(Command::new(qemu::scripts().join("grub-disk.sh")).arg(&img));
        let kdir = qemu::fetch_kernel("amd64");
        // The debug build is ~50 MB; the copy in the slots needs no symbols.
        let abup_small = dir.join("abup");
        sh(Command::new("objcopy")
            .arg("--strip-debug")
            .arg(util::abup_bin())
            .arg(&abup_small));
        let (secret, public) = (dir.join("release.key"), dir.join("release.pub"));
        keygen(&secret, &public);
        let mut parts = BTreeMap::new();
        for line in sh(Command::new("sgdisk").arg("-p").arg(&img)).lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.len() >= 7 && w[0].parse::<u32>().is_ok() {
                let start: u64 = w[1].parse().unwrap();
                let end: u64 = w[2].parse().unwrap();
                parts.insert(w[6].to_string(), (start * 512, (end - start + 1) * 512));
            }
        }
        Rig {
            dir,
            img,
            firmware,
            kernel: qemu::kernel_image(&kdir),
            abup_small,
            secret,
            public,
            parts,
            boot_toml: BootToml::grub(),
            boots: 0,
            boot_secs: 0.0,
        }
    }

    pub(crate) fn part_loop(&self, label: &str) -> LoopDevice {
        let (offset, size) = self.parts[label];
        LoopDevice::attach(
            &self.img,
            LoopOpts {
                offset: Some(offset),
                size: Some(size),
                ..LoopOpts::default()
            },
        )
    }

    /// The host's config: the image as the disk, the state directory on
    /// the image's data partition (mounted at `data`), `tries` boot tries.
    pub(crate) fn host_config(&self, data: &Path, tries: u32) -> PathBuf {
        self.host_config_on(&self.img, data, tries, "")
    }

    /// [`Rig::host_config`] with `disk` as the disk and `extra` TOML
    /// appended.
    pub(crate) fn host_config_on(
        &self,
        disk: &Path,
        data: &Path,
        tries: u32,
        extra: &str,
    ) -> PathBuf {
        let path = self.dir.join(format!("host-{tries}-{}.toml", extra.len()));
        fs::write(
            &path,
            format!(
                "compatible = \"{COMPATIBLE}\"\nstate_dir = \"{}/abup\"\n[disk]\ndevice = \"{}\"\n\
                 [slots.A]\npartlabel = \"rootA\"\n[slots.B]\npartlabel = \"rootB\"\n\
                 {}[keys]\ntrusted = [\"{}\"]\n{extra}",
                data.display(),
                disk.display(),
                self.boot_toml.section(tries, &self.boot_toml.host),
                self.public.display()
            ),
        )
        .unwrap();
        path
    }

    /// A slot root: kernel, busybox, the init, abup and its config.
    pub(crate) fn rootfs(&self, version: &str, panics: bool, kernel: bool) -> PathBuf {
        let root = self.dir.join(format!("rootfs-{version}"));
        let _ = fs::remove_dir_all(&root);
        for d in [
            "bin", "sbin", "etc/abup", "dev", "proc", "sys", "run", "tmp", "data", "boot",
            "usr/bin",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        if kernel {
            fs::copy(&self.kernel, root.join("boot/vmlinuz")).unwrap();
        }
        fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
        fs::copy(qemu::scripts().join("slot-init.sh"), root.join("sbin/init")).unwrap();
        fs::write(root.join("etc/abup-version"), format!("{version}\n")).unwrap();
        if panics {
            fs::write(root.join("etc/abup-panic"), "").unwrap();
        }
        copy_with_libs(&self.abup_small, &root, "usr/bin/abup");
        fs::copy(&self.public, root.join("etc/abup/release.pub")).unwrap();
        fs::write(
            root.join("etc/abup/system.toml"),
            format!(
                "compatible = \"{COMPATIBLE}\"\nstate_dir = \"/data/abup\"\n[disk]\n\
                 device = \"/dev/nvme0n1\"\n[slots.A]\npartlabel = \"rootA\"\n[slots.B]\n\
                 partlabel = \"rootB\"\n{}[keys]\ntrusted = [\"/etc/abup/release.pub\"]\n",
                self.boot_toml.section(3, &self.boot_toml.slot)
            ),
        )
        .unwrap();
        root
    }

    pub(crate) fn bundle(&self, version: &str, panics: bool, kernel: bool, raw: bool) -> PathBuf {
        let root = self.rootfs(version, panics, kernel);
        let out = self.dir.join(format!("v{version}.abup"));
        if raw {
            // An ext4 image with a label of its own: abup relabels it.
            let image = self.dir.join(format!("v{version}.ext4"));
            let _ = fs::remove_file(&image);
            sh(Command::new("mkfs.ext4")
                .args(["-q", "-L", "rootfs", "-d"])
                .arg(&root)
                .arg(&image)
                .arg("64M"));
            self.signed_bundle(Source::Image(&image), version, &out);
        } else if !kernel {
            // A tarball made by GNU tar (a rootfs directory would get a
            // test kernel added by make_bundle).
            let tar = self.dir.join(format!("v{version}.tar"));
            sh(Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&tar)
                .arg("."));
            self.signed_bundle(Source::Tarball(&tar), version, &out);
        } else {
            self.signed_bundle(Source::Rootfs(&root), version, &out);
        }
        out
    }

    /// `out`: a zstd bundle of `source` for the rig's device, signed with
    /// the rig's release key.
    pub(crate) fn signed_bundle(&self, source: Source, version: &str, out: &Path) {
        make_bundle(source, version, "zstd", Some(&self.secret), COMPATIBLE, out);
    }

    /// Runs abup on the host with the data partition mounted.
    pub(crate) fn abup_host(&self, tries: u32, args: &[&str]) -> util::Run {
        let lo = self.part_loop("data");
        let m = Mount::ext4(lo.path(), true);
        let cfg = self.host_config(m.path(), tries);
        let mut all = vec!["--config".to_string(), cfg.display().to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        util::run_abup(&all, None)
    }

    /// Writes the commands the next boot runs (none when empty).
    pub(crate) fn script(&self, body: &str) {
        let lo = self.part_loop("data");
        let m = Mount::ext4(lo.path(), true);
        let p = m.path().join("run.sh");
        if body.is_empty() {
            let _ = fs::remove_file(&p);
        } else {
            fs::write(&p, format!("export PATH=/usr/bin:$PATH\n{body}\n")).unwrap();
        }
    }

    /// The grubenv as GRUB reads it (see [`grub_view`]).
    pub(crate) fn grub_view(&self) -> BTreeMap<String, String> {
        let (offset, size) = self.parts["boot"];
        grub_view(&self.img, offset, size, &self.dir)
    }

    fn boot(&mut self, stop_at: &[&str]) -> Boot {
        let vm = Vm::x86_64(&self.img, self.firmware, &self.dir);
        // GRUB waiting in its menu never ends by itself: stop there too.
        let b = vm.boot(&[stop_at, &[NO_SLOT]].concat());
        self.boots += 1;
        self.boot_secs += b.secs;
        let at = |m: &str| b.secs_to(m).map_or("-".to_string(), |t| format!("{t:.1}"));
        eprintln!(
            "[{:?} boot {}: {:.1} s (GRUB picks at {}, kernel at {}, init at {}), {:?}] {}",
            self.firmware,
            self.boots,
            b.secs,
            at("abup: booting slot"),
            at("Linux version"),
            at(BOOTED),
            b.ended,
            b.text()
                .lines()
                .filter_map(|l| l.find("abup:").or(l.find("ABUP-")).map(|i| &l[i..]))
                .map(|l| l.split(" cmdline=").next().unwrap_or(l))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        b
    }

    /// Boots and expects `slot` running `version`, the script run and a
    /// clean power-off.
    pub(crate) fn boot_expect(&mut self, slot: &str, version: &str) -> Boot {
        let b = self.boot(&[PANIC]);
        let booted = b.lines_with(BOOTED);
        assert_eq!(booted.len(), 1, "one boot, console:\n{}", b.timeline());
        assert!(
            booted[0].starts_with(&format!("{BOOTED} slot={slot} version={version} ")),
            "expected slot {slot} version {version}: {}\nconsole:\n{}",
            booted[0],
            b.timeline()
        );
        assert_eq!(b.ended, Ended::Exited, "console:\n{}", b.timeline());
        assert!(
            b.text().contains("ABUP-POWEROFF"),
            "console:\n{}",
            b.timeline()
        );
        b
    }

    /// Boots until the console shows `at`, then kills QEMU there: a power
    /// cut.
    fn power_cut(&mut self, at: &str) -> Boot {
        let b = self.boot(&[at, PANIC]);
        assert_eq!(
            b.ended,
            Ended::Stopped(at.to_string()),
            "console:\n{}",
            b.timeline()
        );
        b
    }

    /// Boots a slot that panics: stopped at its marker, a power cut during
    /// a failing boot.
    pub(crate) fn boot_panics(&mut self, slot: &str, version: &str) {
        let b = self.boot(&[PANIC]);
        assert_eq!(
            b.ended,
            Ended::Stopped(PANIC.to_string()),
            "console:\n{}",
            b.timeline()
        );
        let booted = b.lines_with(BOOTED);
        assert!(
            booted.len() == 1
                && booted[0].starts_with(&format!("{BOOTED} slot={slot} version={version} ")),
            "expected the broken slot {slot} {version}: {booted:?}"
        );
    }
}

/// The `[boot]` section of the rig's abup configs, on the host and in the
/// slots (`tries` is filled in per run).
#[derive(Clone, Debug)]
pub(crate) struct BootToml {
    pub(crate) backend: &'static str,
    /// The backend's own sub-section on the host, and in the slots.
    pub(crate) host: String,
    pub(crate) slot: String,
}

impl BootToml {
    /// The grub backend on the boot partition, on the host and in the VM.
    fn grub() -> BootToml {
        let grub = "[boot.grub]\npartlabel = \"boot\"\npath = \"grub/grubenv\"\n".to_string();
        BootToml {
            backend: "grub",
            host: grub.clone(),
            slot: grub,
        }
    }

    fn section(&self, tries: u32, sub: &str) -> String {
        format!(
            "[boot]\nbackend = \"{}\"\ntries = {tries}\n{sub}",
            self.backend
        )
    }
}

/// Copies the executable `bin` to `to` inside `root`, with the libraries
/// `ldd` says it loads (at their own paths).
pub(crate) fn copy_with_libs(bin: &Path, root: &Path, to: &str) {
    let dest = root.join(to);
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    fs::copy(bin, &dest).unwrap();
    for lib in sh(Command::new("ldd").arg(bin))
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = root.join(&lib[1..]);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(lib, &to).unwrap();
    }
}

/// The grubenv as GRUB reads it: the boot partition's bytes as the disk
/// holds them (the image file, which a loop device writes through), read
/// with `debugfs -c`, which does not replay the journal (nor does GRUB).
pub fn grub_view(img: &Path, offset: u64, size: u64, tmp: &Path) -> BTreeMap<String, String> {
    use std::io::{Read, Seek, SeekFrom};
    let copy = tmp.join("boot-view.img");
    let mut f = fs::File::open(img).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; size as usize];
    f.read_exact(&mut buf).unwrap();
    fs::write(&copy, buf).unwrap();
    let env = tmp.join("grubenv-view");
    let _ = fs::remove_file(&env);
    sh(Command::new("debugfs")
        .arg("-c")
        .arg("-R")
        .arg(format!("dump /grub/grubenv {}", env.display()))
        .arg(&copy));
    let list = util::grub_editenv_list(&env);
    let _ = fs::remove_file(&env);
    let _ = fs::remove_file(&copy);
    list
}

/// abup's writes are where GRUB reads them as soon as abup returns, also
/// while the boot partition stays mounted (no unmount flushes them):
/// mark-bad before the write, the flip, mark-good, mark-bad.
#[test]
fn grubenv_writes_reach_grubs_view_while_the_boot_partition_stays_mounted() {
    let env = util::Env::new();
    let boot = env.disk.mount("boot", true);
    let part = env.disk.part("boot");
    let view = || grub_view(&env.disk.image, part.start, part.size, &env.root);
    let mounted = || util::grub_editenv_list(&boot.path().join("grub/grubenv"));
    assert_eq!(view(), mounted());

    env.install_ok("A", &env.simple_bundle("1.0.0"), &[]);
    env_has(&view(), &[("ORDER", "B A"), ("B_OK", "1"), ("B_GOOD", "0")]);
    assert_eq!(view(), mounted());
    env.abup(&["--booted-slot", "B", "mark-good"]).ok();
    env_has(&view(), &[("B_GOOD", "1"), ("B_TRY", "0")]);
    env.abup(&["--booted-slot", "A", "mark-bad", "B"]).ok();
    env_has(&view(), &[("B_OK", "0"), ("B_GOOD", "0")]);
    assert_eq!(view(), mounted());
}

/// Checks variables as grub.cfg reads them: one of the contract's
/// variables missing from the block means its default (`ORDER="A B"`,
/// `ABUP_MAX_TRIES=3`, every other `0`; boot-backends/grub/README.md).
pub(crate) fn env_has(env: &BTreeMap<String, String>, want: &[(&str, &str)]) {
    for (k, v) in want {
        let default = match *k {
            "ORDER" => Some("A B"),
            "ABUP_MAX_TRIES" => Some("3"),
            "A_OK" | "A_TRY" | "A_GOOD" | "B_OK" | "B_TRY" | "B_GOOD" => Some("0"),
            _ => None,
        };
        assert_eq!(
            env.get(*k).map(String::as_str).or(default),
            Some(*v),
            "GRUB's view of {k} (whole block: {env:?})"
        );
    }
}

/// The slot grub.cfg picks from these variables (contract defaults for
/// missing ones), ignoring whether it can find the slot: the first in
/// `ORDER` with `X_OK=1` and either `X_GOOD=1` or `X_TRY < ABUP_MAX_TRIES`.
/// Written from boot-backends/grub/README.md, not from abup's own code.
pub(crate) fn grub_picks(env: &BTreeMap<String, String>) -> Option<String> {
    let get = |k: &str, d: &str| env.get(k).cloned().unwrap_or_else(|| d.to_string());
    let max: u32 = get("ABUP_MAX_TRIES", "3").parse().unwrap();
    get("ORDER", "A B")
        .split(' ')
        .find(|x| {
            get(&format!("{x}_OK"), "0") == "1"
                && (get(&format!("{x}_GOOD"), "0") == "1"
                    || get(&format!("{x}_TRY"), "0").parse::<u32>().unwrap() < max)
        })
        .map(str::to_string)
}

fn scenarios(firmware: Firmware) {
    let started = Instant::now();
    let mut rig = Rig::new(firmware);

    // Factory: v1 into A from a "rescue system"; it boots, is blessed.
    rig.abup_host(
        3,
        &[
            "install",
            "--target-slot",
            "A",
            s(&rig.bundle("1.0.0", false, true, false)),
        ],
    )
    .ok();
    env_has(
        &rig.grub_view(),
        &[("ORDER", "A B"), ("A_OK", "1"), ("A_TRY", "0")],
    );
    rig.script("abup mark-good");
    rig.boot_expect("A", "1.0.0");
    env_has(
        &rig.grub_view(),
        &[("A_OK", "1"), ("A_GOOD", "1"), ("A_TRY", "0")],
    );

    // v2 into B: B boots (try 1), mark-good inside the VM, reboot: still B,
    // and no try is counted any more.
    let v2 = rig.bundle("2.0.0", false, true, false);
    rig.abup_host(3, &["install", "--booted-slot", "A", s(&v2)])
        .ok();
    env_has(
        &rig.grub_view(),
        &[
            ("ORDER", "B A"),
            ("B_OK", "1"),
            ("B_TRY", "0"),
            ("B_GOOD", "0"),
        ],
    );
    // Power cuts during the first boots of the new slot: once GRUB counted
    // the try, and once the slot's init is up. Each counts a try (B is not
    // committed yet), and GRUB's view, read without journal replay, still
    // picks B; the third try then boots it.
    for (n, at) in [("1", "abup: slot B, try 1 of 3"), ("2", BOOTED)] {
        rig.power_cut(at);
        let view = rig.grub_view();
        env_has(&view, &[("ORDER", "B A"), ("B_OK", "1"), ("B_TRY", n)]);
        assert_eq!(grub_picks(&view).as_deref(), Some("B"), "{view:?}");
    }
    rig.script("abup status\nabup mark-good\nabup status --json");
    let b = rig.boot_expect("B", "2.0.0");
    assert!(
        b.text().contains("abup: slot B, try 3 of 3"),
        "{}",
        b.text()
    );
    assert!(
        b.text().contains("booted:     B"),
        "abup status in the VM:\n{}",
        b.text()
    );
    env_has(&rig.grub_view(), &[("B_GOOD", "1"), ("B_TRY", "0")]);
    rig.script("");
    rig.boot_expect("B", "2.0.0");
    env_has(&rig.grub_view(), &[("B_GOOD", "1"), ("B_TRY", "0")]);

    // A panicking v3 into A with 2 tries: tried twice, then B again.
    rig.abup_host(
        2,
        &[
            "install",
            "--booted-slot",
            "B",
            s(&rig.bundle("3.0.0", true, true, false)),
        ],
    )
    .ok();
    rig.boot_panics("A", "3.0.0");
    env_has(&rig.grub_view(), &[("A_TRY", "1")]);
    rig.boot_panics("A", "3.0.0");
    let view = rig.grub_view();
    env_has(&view, &[("A_TRY", "2")]);
    assert_eq!(grub_picks(&view).as_deref(), Some("B"), "{view:?}");
    rig.boot_expect("B", "2.0.0");

    // The boot-loop case: 1 try, fallback, then reboots without mark-good:
    // the good slot keeps booting, the broken one is never tried again.
    rig.abup_host(
        1,
        &[
            "install",
            "--booted-slot",
            "B",
            "--allow-downgrade",
            s(&rig.bundle("3.1.0", true, true, true)),
        ],
    )
    .ok();
    rig.boot_panics("A", "3.1.0");
    // Power cuts during the first boots after the fallback: GRUB writes
    // nothing for the good slot, so its view stays as it was, B.
    let fell_back = rig.grub_view();
    assert_eq!(
        grub_picks(&fell_back).as_deref(),
        Some("B"),
        "{fell_back:?}"
    );
    for at in ["abup: slot B (good)", BOOTED] {
        rig.power_cut(at);
        assert_eq!(rig.grub_view(), fell_back, "cut at {at:?}");
    }
    rig.script("abup status");
    let b = rig.boot_expect("B", "2.0.0");
    assert!(
        b.text().contains("primary:    B"),
        "status after the fallback:\n{}",
        b.text()
    );
    rig.boot_expect("B", "2.0.0");
    env_has(
        &rig.grub_view(),
        &[("A_TRY", "1"), ("ABUP_MAX_TRIES", "1"), ("B_GOOD", "1")],
    );

    // A slot without a kernel: install refuses to flip, B stays primary.
    let before = rig.grub_view();
    let r = rig.abup_host(
        3,
        &[
            "install",
            "--booted-slot",
            "B",
            s(&rig.bundle("4.0.0", false, false, false)),
        ],
    );
    r.failed(1, &["no kernel at /boot/vmlinuz"]);
    // A used its one try, so abup had no need to mark it bad before
    // writing it (GRUB would not boot it); it stays unbootable.
    let after = rig.grub_view();
    assert_eq!(after.get("ORDER"), before.get("ORDER"));
    assert_eq!(grub_picks(&after).as_deref(), Some("B"), "{after:?}");

    // An install killed while it writes: the old slot boots.
    let v5 = rig.bundle("5.0.0", false, true, false);
    {
        let lo = rig.part_loop("data");
        let m = Mount::ext4(lo.path(), true);
        let cfg = rig.host_config(m.path(), 3);
        // A real SIGKILL in the middle of the extraction (a fail point of
        // the test build: abup kills itself after the 5th archive member).
        let out = Command::new(util::abup_bin())
            .args(["--config", s(&cfg), "install", "--booted-slot", "B", s(&v5)])
            .env("ABUP_FAILPOINTS", "extract-member=kill@5")
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(9), "abup was not killed: {out:?}");
    }
    // What the killed abup left mounted or attached over this image.
    qemu::release_after_kill(&rig.img);
    // (ORDER is still "A B" from the boot-loop case: A is just not bootable.)
    let view = rig.grub_view();
    assert_eq!(grub_picks(&view).as_deref(), Some("B"), "{view:?}");
    rig.script("abup status");
    rig.boot_expect("B", "2.0.0");

    // v6 (a raw image) into A, boots; rollback inside the VM: B boots.
    rig.abup_host(
        3,
        &[
            "install",
            "--booted-slot",
            "B",
            "--allow-downgrade",
            s(&rig.bundle("6.0.0", false, true, true)),
        ],
    )
    .ok();
    rig.script("abup status\nabup rollback\nabup status");
    let b = rig.boot_expect("A", "6.0.0");
    assert!(b.text().contains("booted:     A"), "{}", b.text());
    // rollback flips ORDER; A stays bootable but second.
    env_has(
        &rig.grub_view(),
        &[("ORDER", "B A"), ("B_OK", "1"), ("B_GOOD", "1")],
    );
    rig.script("");
    rig.boot_expect("B", "2.0.0");

    eprintln!(
        "[{firmware:?}] {} boots, {:.0} s booting, {:.0} s in all",
        rig.boots,
        rig.boot_secs,
        started.elapsed().as_secs_f64()
    );
}

impl Drop for Rig {
    /// The work dir (disk image, bundles) goes, pass or fail, unless
    /// ABUP_QEMU_KEEP is set.
    fn drop(&mut self) {
        if std::env::var_os("ABUP_QEMU_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("kept {}", self.dir.display());
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every scenario under OVMF (UEFI), on one disk image.
#[test]
fn uefi() {
    scenarios(Firmware::Uefi);
}

/// Every scenario under SeaBIOS (legacy BIOS), on one disk image.
#[test]
fn bios() {
    scenarios(Firmware::Bios);
}

/// The two ways to make a grubenv write visible to GRUB, measured side by
/// side on the same mounted ext4 boot partition (a measurement, not a speed
/// assertion): abup's in-place overwrite + fdatasync, against a new file
/// renamed over the old one + fsync + a journal checkpoint with
/// FIFREEZE/FITHAW (`fsfreeze`, as OSTree does for /boot). Both must leave
/// GRUB's view (no journal replay) equal to what was written; a rename
/// without the checkpoint is shown for contrast.
#[test]
fn grubenv_durability_methods_measured() {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let env = util::Env::new();
    let boot = env.disk.mount("boot", true);
    let part = env.disk.part("boot");
    let view = || grub_view(&env.disk.image, part.start, part.size, &env.root);
    let path = boot.path().join("grub/grubenv");
    let block = |i: u32| {
        let mut b = format!("# GRUB Environment Block\nN={i}\n").into_bytes();
        b.resize(1024, b'#');
        b
    };
    let rounds = 50;

    let t = Instant::now();
    for i in 0..rounds {
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&block(i), 0).unwrap();
        f.sync_data().unwrap();
    }
    let in_place = t.elapsed().as_secs_f64() / f64::from(rounds);
    assert_eq!(
        view().get("N").map(String::as_str),
        Some(&*(rounds - 1).to_string())
    );

    let rename = |i: u32| {
        let tmp = boot.path().join("grub/grubenv.new");
        let mut f = fs::File::create(&tmp).unwrap();
        f.write_all(&block(i)).unwrap();
        f.sync_all().unwrap();
        fs::rename(&tmp, &path).unwrap();
        fs::File::open(boot.path().join("grub"))
            .unwrap()
            .sync_all()
            .unwrap();
    };
    let t = Instant::now();
    for i in 0..rounds {
        rename(1000 + i);
        sh(Command::new("fsfreeze").arg("-f").arg(boot.path()));
        sh(Command::new("fsfreeze").arg("-u").arg(boot.path()));
    }
    let frozen = t.elapsed().as_secs_f64() / f64::from(rounds);
    assert_eq!(
        view().get("N").map(String::as_str),
        Some(&*(1000 + rounds - 1).to_string())
    );

    rename(5000);
    let unchecked = view().get("N").cloned();

    eprintln!(
        "grubenv durability, {rounds} writes each: in place + fdatasync {:.2} ms/write; \
         rename + fsync + FIFREEZE/FITHAW {:.2} ms/write (ratio {:.1}); rename without \
         checkpoint: GRUB reads N={unchecked:?} after writing N=5000",
        in_place * 1e3,
        frozen * 1e3,
        frozen / in_place
    );
}

/// Blocks abup could not write back as GRUB reads them, or with any abup
/// variable out of range, are refused in the checks (exit 3) before
/// anything is written; a symlinked grubenv on the boot partition is never
/// followed (its target, a file outside, stays untouched).
#[test]
fn hostile_grubenvs_are_refused_before_any_write() {
    let env = util::Env::new();
    let bundle = env.simple_bundle("1.0.0");
    let block = |body: &str, size: usize| {
        let mut b = format!("# GRUB Environment Block\n{body}").into_bytes();
        b.resize(size, b'#');
        b
    };
    let good =
        "ORDER=A B\nA_OK=1\nA_TRY=0\nA_GOOD=1\nB_OK=0\nB_TRY=0\nB_GOOD=0\nABUP_MAX_TRIES=3\n";
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (block(good, 1000), "is 1000 bytes"),
        (block(good, 2048), "is 2048 bytes"),
        (block(&good.replace("A_OK=1", "A_OK=2"), 1024), "A_OK=\"2\""),
        (block(&good.replace("A B", "A A"), 1024), "ORDER=\"A A\""),
        (block(&good.replace("A B", "A"), 1024), "ORDER=\"A\""),
        (block(&good.replace("A B", "C"), 1024), "ORDER=\"C\""),
        (
            block(&good.replace("A_TRY=0", "A_TRY=01"), 1024),
            "A_TRY=\"01\"",
        ),
        (
            block(&good.replace("B_TRY=0", "B_TRY=x"), 1024),
            "B_TRY=\"x\"",
        ),
        (
            block(&good.replace("B_GOOD=0", "B_GOOD=yes"), 1024),
            "B_GOOD=\"yes\"",
        ),
        (
            block(&good.replace("TRIES=3", "TRIES=0"), 1024),
            "ABUP_MAX_TRIES=\"0\"",
        ),
        (
            block(&good.replace("TRIES=3", "TRIES=10"), 1024),
            "ABUP_MAX_TRIES=\"10\"",
        ),
        (block(&format!("{good}A_OK=1\n"), 1024), "more than once"),
        (good.as_bytes().to_vec(), "bytes"),
    ];
    for (bytes, want) in cases {
        {
            let m = env.disk.mount("boot", true);
            fs::write(m.path().join("grub/grubenv"), &bytes).unwrap();
        }
        let before = env.snapshot();
        let run = env.abup(&["--booted-slot", "A", "install", s(&bundle)]);
        let line = run.failed(3, &[want]);
        assert!(
            !line.contains("/tmp/abup-mount"),
            "names a temporary mount: {line}"
        );
        env.assert_untouched(&before);
        env.abup(&["--booted-slot", "A", "mark-bad", "B"])
            .failed(3, &[want]);
        env.assert_untouched(&before);
    }

    // A symlink on the boot partition pointing outside it.
    let outside = env.root.join("outside-grubenv");
    fs::write(&outside, block(good, 1024)).unwrap();
    {
        let m = env.disk.mount("boot", true);
        let p = m.path().join("grub/grubenv");
        fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&outside, &p).unwrap();
    }
    let slot_a = env.disk.sha256_of_partition("rootA");
    env.abup(&["--booted-slot", "A", "install", s(&bundle)])
        .failed(3, &["is a symlink"]);
    env.abup(&["--booted-slot", "A", "mark-bad", "B"])
        .failed(3, &["is a symlink"]);
    assert_eq!(fs::read(&outside).unwrap(), block(good, 1024));
    assert_eq!(env.disk.sha256_of_partition("rootA"), slot_a);

    // A missing block: the fix names the partition, not abup's temporary
    // mount, and puts the booted slot first.
    {
        let m = env.disk.mount("boot", true);
        fs::remove_file(m.path().join("grub/grubenv")).unwrap();
    }
    let line = env.abup(&["--booted-slot", "B", "status"]).failed(
        3,
        &["does not exist", "on the boot partition", "ORDER=\"B A\""],
    );
    assert!(!line.contains("/tmp/"), "{line}");
    assert!(line.contains("mount /dev/"), "{line}");
}

/// `status` says what GRUB starts next: a slot marked bootable that GRUB
/// cannot find (no filesystem labelled abup-B, or no kernel) is skipped, as
/// grub.cfg skips it, and flagged.
#[test]
fn status_shows_what_grub_boots_next() {
    let env = util::Env::new();
    let set = |vars: &[&str]| {
        let m = env.disk.mount("boot", true);
        sh(Command::new("grub-editenv")
            .arg(m.path().join("grub/grubenv"))
            .arg("set")
            .args(vars));
    };
    // B first and bootable, but it holds nothing GRUB can find.
    set(&["ORDER=B A", "B_OK=1", "B_TRY=0"]);
    let st = env.status(Some("A"));
    assert_eq!(st["primary"], "A", "{st:#}");
    let why = st["slots"]["B"]["unfindable"].as_str().unwrap_or_default();
    assert!(why.contains("no ext2/3/4 filesystem"), "{st:#}");
    let warnings = st["warnings"].to_string();
    assert!(
        warnings.contains("slot B is marked bootable but the bootloader skips it"),
        "{st:#}"
    );

    // A filesystem labelled abup-B without a kernel: still skipped.
    {
        let lo = env.disk.attach("rootB", false);
        sh(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "abup-B"])
            .arg(lo.path()));
    }
    let st = env.status(Some("A"));
    assert_eq!(st["primary"], "A", "{st:#}");
    assert!(
        st["slots"]["B"]["unfindable"]
            .to_string()
            .contains("no kernel at /boot/vmlinuz"),
        "{st:#}"
    );

    // With a kernel it is what GRUB starts next, and status says so.
    {
        let m = env.disk.mount("rootB", true);
        util::write(m.path(), "boot/vmlinuz", "kernel\n", 0o644);
    }
    let st = env.status(Some("A"));
    assert_eq!(st["primary"], "B", "{st:#}");
    assert_eq!(st["slots"]["B"]["unfindable"], serde_json::Value::Null);
    assert!(
        st["warnings"].to_string().contains("start slot B next"),
        "{st:#}"
    );

    // Slot A labelled otherwise and B out of tries: nothing to boot.
    set(&["B_TRY=3"]);
    {
        let lo = env.disk.attach("rootA", false);
        sh(Command::new("e2label").arg(lo.path()).arg("rootA"));
    }
    let st = env.status(Some("A"));
    assert_eq!(st["primary"], serde_json::Value::Null, "{st:#}");
    assert!(
        st["warnings"].to_string().contains("no slot it can boot"),
        "{st:#}"
    );
}
