//! The hostile corpus: configs, state files and bundles made the way an
//! attacker (or a very unlucky admin) would, each run through the real CLI.
//!
//! Every case checks the same contract: a clear one-line `error:`, a
//! non-zero exit, and nothing outside the target touched — the booted slot
//! A, the whole boot partition (abup opens it read-only until it must
//! write), the data partition, and a canary directory on the host that the
//! hostile inputs aim at.

use crate::util::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// A directory on the host, outside every test disk, that hostile inputs
/// try to write into. It holds one file; nothing may change it.
struct Canary {
    dir: PathBuf,
}

impl Canary {
    fn new() -> Canary {
        let dir = tempfile::Builder::new()
            .prefix("abup-canary-")
            .tempdir_in("/tmp")
            .expect("creating the canary dir")
            .keep();
        fs::write(dir.join("keep.txt"), "canary\n").unwrap();
        Canary { dir }
    }

    /// Every path under the canary dir with its content (or "dir"/"link").
    fn contents(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for e in fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                let rel = p.strip_prefix(base).unwrap().to_path_buf();
                let ft = fs::symlink_metadata(&p).unwrap().file_type();
                if ft.is_dir() {
                    out.insert(rel, b"dir".to_vec());
                    walk(&p, base, out);
                } else if ft.is_symlink() {
                    out.insert(rel, b"link".to_vec());
                } else {
                    out.insert(rel, fs::read(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.dir, &self.dir, &mut out);
        out
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What no refused or failed run may change.
struct World {
    /// SHA-256 of whole partitions: the booted slot, boot and data.
    parts: Vec<(&'static str, String)>,
    grubenv: Vec<u8>,
    canary: BTreeMap<PathBuf, Vec<u8>>,
}

fn world(env: &Env, canary: &Canary) -> World {
    World {
        parts: ["rootA", "boot", "data"]
            .into_iter()
            .map(|p| (p, env.disk.sha256_of_partition(p)))
            .collect(),
        grubenv: env.grubenv_bytes(),
        canary: canary.contents(),
    }
}

#[track_caller]
fn assert_same_world(env: &Env, canary: &Canary, before: &World) {
    let now = world(env, canary);
    for ((name, a), (_, b)) in before.parts.iter().zip(&now.parts) {
        assert_eq!(a, b, "partition {name} changed");
    }
    assert!(now.grubenv == before.grubenv, "the grubenv changed");
    assert_eq!(now.canary, before.canary, "the host canary dir changed");
}

/// An env whose grubenv is on the boot partition, plus a canary.
fn setup() -> (Env, Canary) {
    (Env::new(), Canary::new())
}

// ---------------------------------------------------------------------------
// Partition identity (issue 9, item 1)
// ---------------------------------------------------------------------------

#[test]
fn one_partition_named_by_label_and_by_guid_is_refused() {
    let (env, canary) = setup();
    let bundle = env.simple_bundle("1.0.0");
    let guid_of_a = env.disk.part("rootA").partuuid.to_ascii_uppercase();
    let cfg = env.config_with(|c| c.slot_b = format!("partuuid = \"{guid_of_a}\""));
    let before = world(&env, &canary);

    // Booted from A: slot B would be A itself.
    let run = env.abup_with(
        &cfg,
        &["--booted-slot", "A", "install", "--no-activate", s(&bundle)],
        None,
    );
    run.failed(
        3,
        &["slots.A", "slots.B", "same partition", "fix the config"],
    );
    assert_same_world(&env, &canary, &before);

    // A rescue system (booted from neither slot) told to write B: that
    // would overwrite A, the only bootable slot.
    let run = env.abup_with(
        &cfg,
        &["install", "--target-slot", "B", "--no-activate", s(&bundle)],
        None,
    );
    run.failed(3, &["same partition"]);
    let run = env.abup_with(
        &cfg,
        &["--json", "install", "--target-slot", "B", s(&bundle)],
        None,
    );
    assert_eq!(run.code, 3, "{run}");
    assert_eq!(run.json()["failed_step"], "inspect-system", "{run}");
    assert_same_world(&env, &canary, &before);

    // Every verb that opens the system refuses the same config.
    for verb in [&["status"][..], &["mark-bad", "B"], &["mark-active", "B"]] {
        let mut args = vec!["--booted-slot", "A"];
        args.extend_from_slice(verb);
        env.abup_with(&cfg, &args, None)
            .failed(3, &["same partition"]);
    }
    assert_same_world(&env, &canary, &before);
    assert!(
        !env.state_dir.join("slots.json").exists(),
        "no record may be written"
    );
}

#[test]
fn a_slot_that_is_the_boot_partition_is_refused() {
    let (env, canary) = setup();
    let bundle = env.simple_bundle("1.0.0");
    let before = world(&env, &canary);
    for slot_b in [
        "partlabel = \"boot\"".to_string(),
        format!("partuuid = \"{}\"", env.disk.part("boot").partuuid),
    ] {
        let cfg = env.config_with(|c| c.slot_b = slot_b);
        let run = env.abup_with(&cfg, &["--booted-slot", "A", "install", s(&bundle)], None);
        run.failed(3, &["slots.B", "boot.grub", "same partition"]);
    }
    assert_same_world(&env, &canary, &before);
}

// ---------------------------------------------------------------------------
// Version policy (item 5)
// ---------------------------------------------------------------------------

#[test]
fn build_metadata_does_not_make_a_version_newer() {
    let (env, canary) = setup();
    let v1 = env.simple_bundle("1.0.0");
    let v1_build = env.simple_bundle("1.0.0+build.9");
    env.install_ok("A", &v1, &[]);
    env.abup(&["--booted-slot", "B", "mark-good"]).ok();
    // From here B is booted: A is the spare.
    let slot_b = env.disk.sha256_of_partition("rootB");
    let env_before = env.grubenv_bytes();
    let canary_before = canary.contents();

    let line = env
        .abup(&["--booted-slot", "B", "install", s(&v1_build)])
        .failed(
            3,
            &[
                "1.0.0+build.9",
                "not newer",
                "build metadata",
                "--allow-downgrade",
            ],
        );
    assert!(line.starts_with("error: check: "), "{line}");
    assert_eq!(env.disk.sha256_of_partition("rootB"), slot_b);
    assert!(env.grubenv_bytes() == env_before, "the grubenv changed");
    assert_eq!(canary.contents(), canary_before);

    let report = env.install_ok("B", &v1_build, &["--allow-downgrade"]);
    assert_eq!(report["target_slot"], "A");
    assert_eq!(report["version"], "1.0.0+build.9");
}

// ---------------------------------------------------------------------------
// Broken configs
// ---------------------------------------------------------------------------

#[test]
fn broken_configs_are_refused_before_anything_is_touched() {
    let (env, canary) = setup();
    let bundle = env.simple_bundle("1.0.0");
    let good = fs::read_to_string(&env.config).unwrap();
    let before = world(&env, &canary);
    let cases: Vec<(String, &[&str])> = vec![
        (
            good.replace("[slots.A]", "[slots.C]"),
            &["unknown field", "C"],
        ),
        (
            good.replace("tries = 3", "tries = 3\nretries = 5"),
            &["unknown field", "retries"],
        ),
        (good.replace("tries = 3", "tries = 0"), &["between 1 and 9"]),
        (good.replace("tries = 3", "tries = -1"), &["tries"]),
        (
            good.replace("tries = 3", "tries = 99999999999999999999"),
            &["tries"],
        ),
        (good.replace("tries = 3", "tries = \"3\""), &["tries"]),
        (
            good.replace("tries = 3", "tries = 3\ntries = 4"),
            &["duplicate"],
        ),
        (
            good.replace("backend = \"grub\"", "backend = \"lilo\""),
            &["lilo", "not supported"],
        ),
        (
            good.replace("partlabel = \"rootB\"", "partlabel = \"\""),
            &["slots.B"],
        ),
        (
            good.replace(
                "partlabel = \"rootB\"",
                "partlabel = \"rootB\"\npartuuid = \"0fc63daf-8483-4772-8e79-3d69d8477de4\"",
            ),
            &["slots.B", "exactly one"],
        ),
        (
            good.replace("partlabel = \"rootB\"", "partuuid = \"not-a-guid\""),
            &["GUID"],
        ),
        (
            good.replace("partlabel = \"rootB\"", "partlabel = \"rootA\""),
            &["same partition"],
        ),
        (
            good.replace("path = \"grub/grubenv\"", "path = \"../../etc/grubenv\""),
            &["boot.grub.path", ".."],
        ),
        (
            good.replace("path = \"grub/grubenv\"", "path = \"/etc/grubenv\""),
            &["boot.grub.path"],
        ),
        (
            good.replace("compatible = ", "compatible = \"\"\n#"),
            &["compatible"],
        ),
        (
            good.replace("paths = [", "paths = [\"/\", "),
            &["preserve.paths", "whole new root"],
        ),
        (
            good.replace("paths = [", "paths = [\"etc/relative\", "),
            &["preserve.paths", "absolute"],
        ),
        (good.replace("[disk]", "[disk]\n[disk]"), &["disk"]),
        ("compatible = \"x\"\n".to_string(), &["missing field"]),
        (String::new(), &["missing field"]),
        ("\u{0}\u{1}garbage = [[[".to_string(), &["config"]),
    ];
    for (text, needles) in cases {
        let cfg = env.path("broken.toml");
        fs::write(&cfg, &text).unwrap();
        let run = env.abup_with(&cfg, &["--booted-slot", "A", "install", s(&bundle)], None);
        let line = run.failed(3, needles);
        assert!(
            line.contains(s(&cfg)),
            "the error should name the file: {line}"
        );
        env.abup_with(&cfg, &["--booted-slot", "A", "status"], None)
            .failed(3, needles);
    }
    // Not UTF-8, too large, a directory.
    let cfg = env.path("latin1.toml");
    fs::write(&cfg, b"compatible = \"caf\xe9\"\n").unwrap();
    env.abup_with(&cfg, &["--booted-slot", "A", "status"], None)
        .failed(3, &["config"]);
    let cfg = env.path("huge.toml");
    fs::write(&cfg, vec![b'#'; 2 << 20]).unwrap();
    env.abup_with(&cfg, &["--booted-slot", "A", "status"], None)
        .failed(3, &["larger than"]);
    let cfg = env.path("dir.toml");
    fs::create_dir(&cfg).unwrap();
    env.abup_with(&cfg, &["--booted-slot", "A", "status"], None)
        .failed(3, &["config"]);
    assert_same_world(&env, &canary, &before);
    assert!(!env.state_dir.join("slots.json").exists());
}

// ---------------------------------------------------------------------------
// Broken state files (item 12)
// ---------------------------------------------------------------------------

#[test]
fn broken_state_files_are_refused_and_left_alone() {
    let (env, canary) = setup();
    let bundle = env.simple_bundle("1.0.0");
    let before = world(&env, &canary);
    fs::create_dir_all(&env.state_dir).unwrap();
    let records = env.state_dir.join("slots.json");
    let record = |version: &str| {
        format!(
            r#"{{"content":"installed","version":"{version}","compatible":"{COMPATIBLE}","bundle_sha256":"{}","installed_at":1,"good":true}}"#,
            "ab".repeat(32)
        )
    };
    let cases: Vec<(Vec<u8>, &[&str])> = vec![
        (b"{ not json".to_vec(), &["slot records"]),
        (b"\x00\xff\xfe garbage".to_vec(), &["slot records"]),
        (b"null".to_vec(), &["slot records"]),
        (br#"{"A": 5}"#.to_vec(), &["slot records"]),
        (
            format!(r#"{{"A":{},"C":{}}}"#, record("1.0.0"), record("1.0.0")).into_bytes(),
            &["slot records"],
        ),
        // A record the running version cannot be read from.
        (
            format!(r#"{{"A":{}}}"#, record("not-a-version")).into_bytes(),
            &["recorded version"],
        ),
        (
            format!(
                r#"{{"A":{}}}"#,
                record("1.0.0").replace("installed\"", "halfway\"")
            )
            .into_bytes(),
            &["slot records"],
        ),
        (vec![b' '; 100 << 10], &["too large"]),
    ];
    for (bytes, needles) in cases {
        fs::write(&records, &bytes).unwrap();
        let run = env.abup(&["--booted-slot", "A", "install", s(&bundle)]);
        run.failed(3, needles);
        assert_eq!(
            fs::read(&records).unwrap(),
            bytes,
            "abup rewrote slots.json"
        );
        assert_same_world(&env, &canary, &before);
    }
    // slots.json that is a directory.
    fs::remove_file(&records).unwrap();
    fs::create_dir(&records).unwrap();
    env.abup(&["--booted-slot", "A", "install", s(&bundle)])
        .failed(3, &["slots.json"]);
    assert_same_world(&env, &canary, &before);
}

// ---------------------------------------------------------------------------
// Read-only where abup only reads (item 12)
// ---------------------------------------------------------------------------

#[test]
fn refusals_and_status_leave_the_boot_partition_byte_identical() {
    let (env, canary) = setup();
    let other_device = env.bundle_opts(
        Source::Rootfs(&{
            let d = env.path("rootfs");
            simple_rootfs(&d, "1.0.0");
            d
        }),
        "1.0.0",
        "zstd",
        Some(&env.secret),
        "another-board",
    );
    let boot = env.disk.sha256_of_partition("boot");
    let before = world(&env, &canary);
    env.abup(&["--booted-slot", "A", "install", s(&other_device)])
        .failed(3, &["another-board"]);
    env.status(Some("A"));
    env.abup(&["status"]).ok();
    assert_eq!(env.disk.sha256_of_partition("boot"), boot);
    assert_same_world(&env, &canary, &before);
}
