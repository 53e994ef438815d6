//! Real boots of abup's custom backend: `[boot] backend = "custom"` running
//! the shipped example `boot-backends/custom/abup-boot-grubenv` (RAUC's
//! custom-backend interface over a GRUB environment block, with
//! `grub-editenv`), and Debian's GRUB 2.06 under OVMF with
//! `boot-backends/grub/grub.cfg` unchanged booting what the script wrote.
//!
//! The script runs on both sides, unchanged: on the host for installs (the
//! boot partition mounted, `ABUP_GRUBENV` pointing into it, through a
//! two-line wrapper named as `boot.custom.command`), and inside the VM for
//! `status` and `mark-good` (each slot carries the script, `grub-editenv`
//! with its libraries and a `/bin/sh`; the VM mounts the boot partition and
//! leaves it mounted at power-off, so what GRUB reads next is what the
//! script's write left on the disk, with no unmount to flush it).
//!
//! Scenarios beyond tests/it/grub_boot.rs, whose GRUB rig this reuses: the
//! flip written by the script boots the new slot (counted); `mark-good`
//! through the script inside the VM commits it (GRUB then boots it
//! uncounted); an install killed while writing leaves the old slot booting;
//! a panicking slot is tried `tries` times (the limit reaches GRUB through
//! `ABUP_BOOT_TRIES`) and GRUB falls back on its own.

use super::grub_boot::{copy_with_libs, env_has, grub_picks, BootToml, Rig};
use super::qemu::{self, Firmware};
use super::util::{self, Mount, Source};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The example script, in the repo and inside the slots.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-backends/custom/abup-boot-grubenv")
}
const SLOT_SCRIPT: &str = "/usr/lib/abup/abup-boot-grubenv";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The GRUB rig with abup's configs naming the custom backend: on the host
/// a wrapper that [`with_host_config`] writes, in the slots the script.
fn custom_rig() -> Rig {
    let mut rig = Rig::new(Firmware::Uefi);
    let section = |command: &str| format!("[boot.custom]\ncommand = \"{command}\"\ntimeout = 60\n");
    rig.boot_toml = BootToml {
        backend: "custom",
        host: section(s(&rig.dir.join("custom-host"))),
        slot: section(SLOT_SCRIPT),
    };
    rig
}

/// Runs `f` with the host's config (`tries` boot tries): the data and boot
/// partitions mounted, and the wrapper pointing the script at the boot
/// partition's grubenv. Both are unmounted before this returns.
fn with_host_config<T>(rig: &Rig, tries: u32, f: impl FnOnce(&Path) -> T) -> T {
    let data_lo = rig.part_loop("data");
    let data = Mount::ext4(data_lo.path(), true);
    let boot_lo = rig.part_loop("boot");
    let boot = Mount::ext4(boot_lo.path(), true);
    util::write(
        &rig.dir,
        "custom-host",
        &format!(
            "#!/bin/sh\nexport ABUP_GRUBENV={}\nexec {} \"$@\"\n",
            s(&boot.path().join("grub/grubenv")),
            s(&script())
        ),
        0o755,
    );
    f(&rig.host_config(data.path(), tries))
}

/// `abup ARGS` on the host through the custom backend.
fn abup_host(rig: &Rig, tries: u32, args: &[&str]) -> util::Run {
    with_host_config(rig, tries, |cfg| {
        let mut all = vec!["--config".to_string(), s(cfg).to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        util::run_abup(&all, None)
    })
}

/// A bundle of a slot that can run the custom backend: the rig's slot plus
/// the script, `grub-editenv` and `/bin/sh`.
fn bundle(rig: &Rig, version: &str, panics: bool) -> PathBuf {
    let root = rig.rootfs(version, panics, true);
    copy_with_libs(
        Path::new("/usr/bin/grub-editenv"),
        &root,
        "usr/bin/grub-editenv",
    );
    let to = root.join(&SLOT_SCRIPT[1..]);
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(script(), &to).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    let out = rig.dir.join(format!("custom-v{version}.abup"));
    rig.signed_bundle(Source::Rootfs(&root), version, &out);
    out
}

/// The commands the next boot runs inside the VM, with the boot partition
/// mounted for the script (and left mounted through the power-off).
fn in_vm(rig: &Rig, commands: &str) {
    rig.script(&format!(
        "mkdir -p /run/boot\nmount -t ext4 \"$(findfs LABEL=boot)\" /run/boot\n\
         export ABUP_GRUBENV=/run/boot/grub/grubenv\n{commands}"
    ));
}

/// Boots `slot` running `version` (see [`Rig::boot_expect`]), the
/// commands of [`in_vm`] all succeeding; returns the console.
fn boot_ok(rig: &mut Rig, slot: &str, version: &str) -> String {
    let text = rig.boot_expect(slot, version).text();
    assert!(
        !text.contains("ABUP-RUN begin") || text.contains("ABUP-RUN end rc=0"),
        "the commands in the VM failed:\n{text}"
    );
    text
}

#[test]
fn grub_boots_what_the_custom_backend_selects() {
    let started = Instant::now();
    let mut rig = custom_rig();

    // Factory: v1 into A from the host, blessed there (A's own boots add
    // nothing here: B's below show the same).
    abup_host(
        &rig,
        3,
        &[
            "install",
            "--target-slot",
            "A",
            s(&bundle(&rig, "1.0.0", false)),
        ],
    )
    .ok();
    abup_host(&rig, 3, &["--booted-slot", "A", "mark-good"]).ok();
    env_has(
        &rig.grub_view(),
        &[
            ("ORDER", "A B"),
            ("A_OK", "1"),
            ("A_TRY", "0"),
            ("A_GOOD", "1"),
        ],
    );

    // v2 into B: the flip the script wrote makes GRUB try B (counted);
    // mark-good through the script in the VM commits it, the boot
    // partition still mounted at power-off.
    abup_host(
        &rig,
        3,
        &[
            "install",
            "--booted-slot",
            "A",
            s(&bundle(&rig, "2.0.0", false)),
        ],
    )
    .ok();
    let view = rig.grub_view();
    env_has(
        &view,
        &[
            ("ORDER", "B A"),
            ("B_OK", "1"),
            ("B_TRY", "0"),
            ("B_GOOD", "0"),
        ],
    );
    assert_eq!(grub_picks(&view).as_deref(), Some("B"), "{view:?}");
    in_vm(&rig, "abup status\nabup mark-good\nabup status");
    let text = boot_ok(&mut rig, "B", "2.0.0");
    assert!(text.contains("abup: slot B, try 1 of 3"), "{text}");
    assert!(
        text.contains("booted:     B"),
        "abup status in the VM:\n{text}"
    );
    env_has(
        &rig.grub_view(),
        &[
            ("ORDER", "B A"),
            ("B_OK", "1"),
            ("B_TRY", "0"),
            ("B_GOOD", "1"),
        ],
    );

    // An install into A killed while it writes (a fail point of the test
    // build: abup SIGKILLs itself after the 5th archive member): A was set
    // bad through the script first, and B boots, now uncounted.
    let v3 = bundle(&rig, "3.0.0", false);
    let out = with_host_config(&rig, 3, |cfg| {
        Command::new(util::abup_bin())
            .args(["--config", s(cfg), "install", "--booted-slot", "B", s(&v3)])
            .env("ABUP_FAILPOINTS", "extract-member=kill@5")
            .output()
            .unwrap()
    });
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(9), "abup was not killed: {out:?}");
    qemu::release_after_kill(&rig.img);
    let view = rig.grub_view();
    env_has(&view, &[("A_OK", "0"), ("A_GOOD", "0")]);
    assert_eq!(grub_picks(&view).as_deref(), Some("B"), "{view:?}");
    in_vm(&rig, "");
    let text = boot_ok(&mut rig, "B", "2.0.0");
    assert!(text.contains("abup: slot B (good)"), "{text}");

    // A panicking v4 into A with 2 tries: GRUB tries it twice, then falls
    // back to B on its own; abup in B sees B primary and A unbootable.
    abup_host(
        &rig,
        2,
        &[
            "install",
            "--booted-slot",
            "B",
            s(&bundle(&rig, "4.0.0", true)),
        ],
    )
    .ok();
    env_has(
        &rig.grub_view(),
        &[("ORDER", "A B"), ("A_OK", "1"), ("ABUP_MAX_TRIES", "2")],
    );
    for n in ["1", "2"] {
        rig.boot_panics("A", "4.0.0");
        env_has(&rig.grub_view(), &[("A_TRY", n)]);
    }
    in_vm(&rig, "abup status");
    let text = boot_ok(&mut rig, "B", "2.0.0");
    assert!(
        text.contains("abup: slot A used its 2 tries; not booting it again"),
        "{text}"
    );
    assert!(
        text.contains("primary:    B"),
        "abup status in the VM:\n{text}"
    );
    let st = abup_host(&rig, 2, &["--json", "--booted-slot", "B", "status"]);
    let st = st.ok().json();
    assert_eq!(st["primary"], "B", "{st:#}");
    assert_eq!(st["slots"]["A"]["bootable"], false, "{st:#}");

    eprintln!(
        "[custom backend] {:.0} s in all",
        started.elapsed().as_secs_f64()
    );
}
