//! The U-Boot backend on loopback disks: the same install / mark-good /
//! mark-bad / rollback sequence as the GRUB tests, run once per place the
//! environment can live (redundant and single files on an unmounted FAT
//! boot partition, two copies at offsets of a flash image named by an
//! `fw_env.config`), every step checked with the real `fw_printenv`, and
//! U-Boot's own writes made with the real `fw_setenv`. Then bad
//! environments, and every cut point of a torn redundant write.

use crate::util::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

fn vars(list: &[(&str, &str)]) -> BTreeMap<String, String> {
    env_map(list)
}

fn printenv(env: &Env) -> BTreeMap<String, String> {
    fw_printenv(&env.disk, &env.root, env.uboot.unwrap())
}

fn setenv(env: &Env, name: &str, value: &str) {
    fw_setenv(&env.disk, &env.root, env.uboot.unwrap(), name, value);
}

fn slot_verbs_round_trip(loc: UbootLoc) {
    let env = Env::builder().uboot(loc).build();
    assert_eq!(printenv(&env), vars(UBOOT_INITIAL_ENV));
    let st = env.status(Some("A"));
    assert_eq!(st["backend"], "uboot");
    assert_eq!(st["primary"], "A");
    assert_eq!(st["slots"]["B"]["bootable"], false);

    let bundle = env.simple_bundle("1.0.0");
    let report = env.install_ok("A", &bundle, &[]);
    assert_eq!(step_state(&report, "activate"), "changed", "{report:#}");
    let installed = vars(&[
        ("BOOT_ORDER", "B A"),
        ("BOOT_A_LEFT", "3"),
        ("BOOT_B_LEFT", "3"),
    ]);
    assert_eq!(printenv(&env), installed);

    // Still on A, B only "trying": no rollback, nothing written.
    let before = env.snapshot();
    env.abup(&["--booted-slot", "A", "rollback"])
        .failed(3, &["slot B", "trying"]);
    env.assert_untouched(&before);

    // U-Boot boots B once (the script decrements before booting).
    setenv(&env, "BOOT_B_LEFT", "2");
    let st = env.status(Some("B"));
    assert_eq!(st["slots"]["B"]["tries_left"], 2, "{st:#}");
    assert_eq!(st["slots"]["B"]["state"], "trying");
    env.abup(&["--booted-slot", "B", "mark-good"]).ok();
    assert_eq!(printenv(&env), installed, "mark-good resets BOOT_B_LEFT");
    let st = env.status(Some("B"));
    assert_eq!(st["slots"]["B"]["state"], "good", "{st:#}");
    assert_eq!(st["primary"], "B");

    env.abup(&["--booted-slot", "B", "rollback"]).ok();
    assert_eq!(
        printenv(&env),
        vars(&[
            ("BOOT_ORDER", "A B"),
            ("BOOT_A_LEFT", "3"),
            ("BOOT_B_LEFT", "3")
        ])
    );
    assert_eq!(env.status(Some("B"))["primary"], "A");

    env.abup(&["--booted-slot", "A", "mark-bad", "B"]).ok();
    assert_eq!(
        printenv(&env),
        vars(&[
            ("BOOT_ORDER", "A"),
            ("BOOT_A_LEFT", "3"),
            ("BOOT_B_LEFT", "0")
        ])
    );
    let st = env.status(Some("A"));
    assert_eq!(st["slots"]["B"]["state"], "bad", "{st:#}");

    env.abup(&["--booted-slot", "A", "mark-active", "B"]).ok();
    assert_eq!(printenv(&env), installed);

    // B used up its tries: U-Boot boots A, abup's primary says so.
    setenv(&env, "BOOT_B_LEFT", "0");
    let st = env.status(Some("A"));
    assert_eq!(st["primary"], "A", "{st:#}");
    assert_eq!(st["slots"]["B"]["state"], "bad");
    env.abup(&["--booted-slot", "A", "rollback"])
        .failed(3, &["slot B"]);
}

#[test]
fn uboot_fat_redundant_slot_verbs() {
    slot_verbs_round_trip(UbootLoc::FatRedundant);
}

#[test]
fn uboot_fat_single_slot_verbs() {
    slot_verbs_round_trip(UbootLoc::FatSingle);
}

#[test]
fn uboot_flash_offsets_slot_verbs() {
    slot_verbs_round_trip(UbootLoc::FlashOffsets);
}

/// Flips a byte inside copy `n` (0 or 1) of the flash image.
fn damage_flash_copy(env: &Env, n: usize) {
    let flash = env.root.join("flash.img");
    let mut data = fs::read(&flash).unwrap();
    data[0x10000 * (n + 1) + 100] ^= 0x55;
    fs::write(&flash, data).unwrap();
}

#[test]
fn uboot_one_broken_copy_still_reads_the_other() {
    let env = Env::builder().uboot(UbootLoc::FlashOffsets).build();
    // fw_setenv makes copy 1 current; then break it: copy 0 is what's left.
    setenv(&env, "BOOT_A_LEFT", "2");
    damage_flash_copy(&env, 1);
    assert_eq!(printenv(&env), vars(UBOOT_INITIAL_ENV));
    assert_eq!(env.status(Some("A"))["slots"]["A"]["tries_left"], 3);
    // The install writes the broken copy; fw_printenv reads the result.
    let bundle = env.simple_bundle("1.0.0");
    env.install_ok("A", &bundle, &[]);
    assert_eq!(
        printenv(&env),
        vars(&[
            ("BOOT_ORDER", "B A"),
            ("BOOT_A_LEFT", "3"),
            ("BOOT_B_LEFT", "3")
        ])
    );
}

#[test]
fn uboot_bad_environments_are_refused_and_nothing_is_flipped() {
    let env = Env::builder().uboot(UbootLoc::FlashOffsets).build();
    let bundle = env.simple_bundle("1.0.0");
    let flash = env.root.join("flash.img");
    let cfg = env.root.join("fw_env.config");
    let good_flash = fs::read(&flash).unwrap();
    let good_cfg = fs::read(&cfg).unwrap();

    // Both CRCs broken.
    damage_flash_copy(&env, 0);
    damage_flash_copy(&env, 1);
    let before = env.snapshot();
    let slot_b = env.disk.sha256_of_partition("rootB");
    let err = env
        .abup(&["--booted-slot", "A", "install", s(&bundle)])
        .failed(3, &["uboot backend", "no valid U-Boot environment", "CRC"]);
    assert!(err.contains("fw_setenv"), "{err}");
    env.assert_untouched(&before);
    assert_eq!(env.disk.sha256_of_partition("rootB"), slot_b);
    env.abup(&["--booted-slot", "A", "mark-good"])
        .failed(3, &["no valid U-Boot environment"]);
    env.assert_untouched(&before);

    // Truncated: the flash image ends inside the second copy.
    fs::write(&flash, &good_flash[..0x20000 + 0x1000]).unwrap();
    let err = env
        .abup(&["--booted-slot", "A", "install", s(&bundle)])
        .failed(3, &["uboot backend", "truncated"]);
    assert!(err.contains("0x20000"), "{err}");
    assert_eq!(fs::read(&flash).unwrap(), &good_flash[..0x21000]);

    // An environment too small for the variables: a 0x20-byte environment
    // holds the initial variables only if nothing grows.
    fs::write(&flash, &good_flash).unwrap();
    let tiny: String = "BOOT_ORDER=A B\n".into();
    let tiny_file = env.root.join("tiny.txt");
    fs::write(&tiny_file, tiny).unwrap();
    let tiny_env = env.root.join("tiny.env");
    sh(std::process::Command::new("mkenvimage")
        .args(["-r", "-p", "0", "-s", "24", "-o"])
        .arg(&tiny_env)
        .arg(&tiny_file));
    fs::write(
        &cfg,
        format!(
            "{f} 0x0 24\n{f} 0x18 24\n",
            f = s(&env.root.join("tiny-flash"))
        ),
    )
    .unwrap();
    let t = fs::read(&tiny_env).unwrap();
    fs::write(env.root.join("tiny-flash"), [t.clone(), t].concat()).unwrap();
    let tiny_before = fs::read(env.root.join("tiny-flash")).unwrap();
    let err = env
        .abup(&["--booted-slot", "A", "install", s(&bundle)])
        .failed(3, &["uboot backend", "bigger"]);
    assert!(!err.contains("success"), "{err}");
    assert_eq!(fs::read(env.root.join("tiny-flash")).unwrap(), tiny_before);

    // A missing fw_env.config names itself.
    fs::remove_file(&cfg).unwrap();
    env.abup(&["--booted-slot", "A", "status"])
        .failed(3, &["fw_env.config", "uboot backend"]);
    fs::write(&cfg, good_cfg).unwrap();
    env.abup(&["--booted-slot", "A", "status"]).ok();
}

/// A redundant write cut off after any number of bytes (a power cut or a
/// kill mid-write) leaves an environment fw_printenv reads, holding either
/// the old variables or the new ones, and abup reads the same.
#[test]
fn uboot_torn_redundant_write_leaves_a_valid_environment() {
    let env = Env::builder().uboot(UbootLoc::FlashOffsets).build();
    let flash = env.root.join("flash.img");
    let old = fs::read(&flash).unwrap();
    let old_vars = printenv(&env);
    env.abup(&["--booted-slot", "A", "mark-bad", "A"]).ok();
    let new = fs::read(&flash).unwrap();
    let new_vars = printenv(&env);
    assert_ne!(old_vars, new_vars);
    // Exactly one copy changed: the stale one.
    let copy =
        |d: &[u8], n: usize| d[0x10000 * (n + 1)..0x10000 * (n + 1) + UBOOT_ENV_SIZE].to_vec();
    let changed: Vec<usize> = (0..2).filter(|&n| copy(&old, n) != copy(&new, n)).collect();
    assert_eq!(changed.len(), 1, "a redundant write must touch one copy");
    let start = 0x10000 * (changed[0] + 1);
    let mut cuts: Vec<usize> = (0..=UBOOT_ENV_SIZE).step_by(512).collect();
    cuts.extend([1, 4, 5, 6, 100, UBOOT_ENV_SIZE - 1]);
    let mut saw_old = 0;
    for cut in cuts {
        let mut torn = old.clone();
        torn[start..start + cut].copy_from_slice(&new[start..start + cut]);
        fs::write(&flash, &torn).unwrap();
        let got = printenv(&env);
        let st = env.status(Some("A"));
        if got == old_vars {
            saw_old += 1;
            assert_eq!(st["slots"]["A"]["bootable"], true, "cut {cut}: {st:#}");
        } else {
            assert_eq!(got, new_vars, "cut {cut}");
            assert_eq!(st["slots"]["A"]["bootable"], false, "cut {cut}: {st:#}");
        }
    }
    assert!(saw_old > 0);
}

/// A custom backend script that fails, hangs or prints garbage stops the
/// install with the script's name and problem: slot A, the grubenv and the
/// spare stay byte-identical, nothing is flipped.
#[test]
fn custom_backend_bad_scripts_change_nothing() {
    let env = Env::builder().custom().build();
    let bundle = env.simple_bundle("1.0.0");
    let script = env.root.join("custom-boot");
    let spare = env.disk.sha256_of_partition("rootB");
    let fast = env.path("system.toml");
    fs::write(
        &fast,
        fs::read_to_string(&env.config)
            .unwrap()
            .replace("timeout = 20", "timeout = 1"),
    )
    .unwrap();
    let before = env.snapshot();
    for (body, code, want) in [
        ("echo broken >&2; exit 3", 3, "exited with 3: broken"),
        ("sleep 30", 3, "did not finish within 1 s"),
        ("echo 'primary is A'", 3, "expected exactly one of A, B, none"),
        (
            // Answers queries, fails to write: the install stops at mark-bad.
            "case \"$1\" in get-primary) echo A;; get-state) echo good;; *) echo no >&2; exit 5;; esac",
            1,
            "exited with 5: no",
        ),
    ] {
        write(&env.root, "custom-boot", &format!("#!/bin/sh\n{body}\n"), 0o755);
        let started = std::time::Instant::now();
        let err = env
            .abup_with(&fast, &["--booted-slot", "A", "install", s(&bundle)], None)
            .failed(code, &["custom backend", want]);
        assert!(err.contains(s(&script)), "{err}");
        assert!(started.elapsed().as_secs() < 15, "{body}: took {:?}", started.elapsed());
        env.assert_untouched(&before);
        assert_eq!(env.disk.sha256_of_partition("rootB"), spare, "{body}");
    }
}

/// The shipped systemd units load cleanly (`systemd-analyze verify`, no
/// warnings), with ExecStart pointed at the built abup.
#[test]
fn systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = ["abup-mark-good.service", "abup-health-check.service"];
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("boot-backends/systemd");
    for u in units {
        let text = fs::read_to_string(src.join(u)).unwrap();
        assert!(
            text.contains("/usr/bin/abup") || u.contains("health"),
            "{u}"
        );
        fs::write(
            dir.path().join(u),
            text.replace("/usr/bin/abup", abup_bin()),
        )
        .unwrap();
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(units.map(|u| dir.path().join(u)))
        .output()
        .expect("running systemd-analyze (install systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}
