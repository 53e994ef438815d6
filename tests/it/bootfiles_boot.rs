//! Boot files under a real GRUB (issue 8): a bundle changes a file GRUB
//! reads from the boot partition (its grub.cfg, which adds
//! `abup.bootset=N` to the kernel command line), the new slot panics, GRUB
//! falls back, and the old slot's abup puts its own boot files back: the
//! next boot shows the old set on /proc/cmdline. Uses the GRUB harness of
//! tests/it/grub_boot.rs (UEFI, Debian's GRUB 2.06, the repo's grub.cfg).

use super::bootfiles::ext4_view;
use super::grub_boot::Rig;
use super::qemu::Firmware;
use super::util::{self, Mount};
use std::fs;
use std::path::{Path, PathBuf};

const COMPATIBLE: &str = "abup-qemu-pc";
const BOOT_FILES: &str = "[boot_files]\npartlabel = \"boot\"\n";

/// A boot-files directory whose grub/grub.cfg is the repo's, marked `n`.
fn boot_set(rig: &Rig, n: u32) -> PathBuf {
    let dir = rig.dir.join(format!("boot-set-{n}"));
    let cfg = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-backends/grub/grub.cfg"),
    )
    .unwrap();
    fs::create_dir_all(dir.join("grub")).unwrap();
    fs::write(
        dir.join("grub/grub.cfg"),
        format!("set ABUP_CMDLINE=\"$ABUP_CMDLINE abup.bootset={n}\"\n{cfg}"),
    )
    .unwrap();
    dir
}

/// A bundle whose slot config has `[boot_files]`, with boot set `n`.
fn bundle(rig: &Rig, version: &str, panics: bool, n: u32) -> PathBuf {
    let root = rig.rootfs(version, panics, true);
    let cfg = root.join("etc/abup/system.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(&cfg, format!("{text}{BOOT_FILES}")).unwrap();
    let out = rig.dir.join(format!("bootset-v{version}.abup"));
    let args: Vec<String> = [
        "bundle",
        "create",
        "--rootfs",
        s(&root),
        "--boot-files",
        s(&boot_set(rig, n)),
        "--version",
        version,
        "--compatible",
        COMPATIBLE,
        "--key",
        s(&rig.secret),
        "-o",
        s(&out),
    ]
    .map(String::from)
    .to_vec();
    util::run_abup(&args, None).ok();
    out
}

/// abup on the host, with the data partition mounted and `[boot_files]`.
fn abup_host(rig: &Rig, tries: u32, args: &[&str]) -> util::Run {
    let lo = rig.part_loop("data");
    let m = Mount::ext4(lo.path(), true);
    let cfg = rig.host_config(m.path(), tries);
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(&cfg, format!("{text}{BOOT_FILES}")).unwrap();
    let mut all = vec!["--config".to_string(), s(&cfg).to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    util::run_abup(&all, None)
}

/// The first line of grub.cfg as GRUB reads it (no journal replay).
fn grub_cfg_mark(rig: &Rig) -> String {
    let (offset, size) = rig.parts["boot"];
    let cfg = ext4_view(&rig.img, offset, size, &rig.dir, "grub/grub.cfg").unwrap_or_default();
    cfg.lines().next().unwrap_or("").to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn grub_boots_each_slot_with_its_own_boot_files() {
    let mut rig = Rig::new(Firmware::Uefi);
    // v1 with boot set 1 into A, from a rescue system; it boots with it.
    let v1 = bundle(&rig, "1.0.0", false, 1);
    abup_host(&rig, 1, &["install", "--target-slot", "A", s(&v1)]).ok();
    assert!(
        grub_cfg_mark(&rig).contains("bootset=1"),
        "{}",
        grub_cfg_mark(&rig)
    );
    rig.script("abup mark-good");
    let b = rig.boot_expect("A", "1.0.0");
    assert!(
        b.text().contains("abup.bootset=1"),
        "console:\n{}",
        b.text()
    );

    // A panicking v2 with boot set 2 into B: GRUB reads set 2 and tries B.
    let v2 = bundle(&rig, "2.0.0", true, 2);
    abup_host(&rig, 1, &["install", "--booted-slot", "A", s(&v2)]).ok();
    assert!(
        grub_cfg_mark(&rig).contains("bootset=2"),
        "{}",
        grub_cfg_mark(&rig)
    );
    rig.script("abup recover");
    rig.boot_panics("B", "2.0.0");

    // GRUB falls back to A (still through set 2's grub.cfg); abup there
    // puts A's boot files back, and the next boot shows set 1.
    let b = rig.boot_expect("A", "1.0.0");
    assert!(
        b.text().contains("abup.bootset=2"),
        "console:\n{}",
        b.text()
    );
    assert!(
        b.text().contains("boot files are back"),
        "console:\n{}",
        b.text()
    );
    assert!(
        grub_cfg_mark(&rig).contains("bootset=1"),
        "{}",
        grub_cfg_mark(&rig)
    );
    rig.script("");
    let b = rig.boot_expect("A", "1.0.0");
    assert!(
        b.text().contains("abup.bootset=1"),
        "console:\n{}",
        b.text()
    );
    assert!(
        !b.text().contains("abup.bootset=2"),
        "console:\n{}",
        b.text()
    );
}
