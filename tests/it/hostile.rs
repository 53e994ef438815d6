//! The hostile corpus: configs, state files and bundles made the way an
//! attacker (or a very unlucky admin) would, each run through the real CLI.
//!
//! Every case checks the same contract: a clear one-line `error:`, a
//! non-zero exit, and nothing outside the target touched — the booted slot
//! A, the whole boot partition (abup opens it read-only until it must
//! write), the data partition, and a canary directory on the host that the
//! hostile inputs aim at.

use crate::util::*;
use serde_json::Value;
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
fn a_slot_that_is_the_boot_or_data_partition_is_refused() {
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
    // The data partition, named in [data] by label or by GUID.
    let data_guid = env.disk.part("data").partuuid.clone();
    for data in [
        "partlabel = \"data\"".to_string(),
        format!("partuuid = \"{data_guid}\""),
    ] {
        let cfg = env.config_with(|c| {
            c.slot_b = "partlabel = \"data\"".into();
            c.extra = format!("[data]\n{data}\n");
        });
        let run = env.abup_with(&cfg, &["--booted-slot", "A", "install", s(&bundle)], None);
        run.failed(3, &["slots.B", "data", "same partition"]);
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
        // Written by a newer abup in a format this one cannot read.
        (
            format!(r#"{{"format":99,"A":{}}}"#, record("1.0.0")).into_bytes(),
            &["slot records", "newer abup"],
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

// ---------------------------------------------------------------------------
// Hostile bundles, written here from FORMAT.md (not by `bundle create`, which
// refuses most of them) and signed with the trusted release key: what a
// careless or compromised build pipeline could ship.
// ---------------------------------------------------------------------------

/// Chunk size of forged bundles: the smallest allowed, so that even small
/// payloads have several chunks.
const CHUNK: usize = 4096;

fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}

/// The parts of a format-2 bundle, to be assembled (or mis-assembled).
struct Parts {
    manifest: Vec<u8>,
    signature: Vec<u8>,
    hash_list: Vec<u8>,
    payload: Vec<u8>,
}

impl Parts {
    /// A signed manifest for one `rootfs` payload of `kind`, stored
    /// uncompressed, after `edit` changed the manifest JSON.
    fn new(env: &Env, kind: &str, payload: &[u8], edit: impl FnOnce(&mut Value)) -> Parts {
        use sha2::{Digest, Sha256};
        let hash_list: Vec<u8> = payload
            .chunks(CHUNK)
            .flat_map(|c| Sha256::digest(c).to_vec())
            .collect();
        let mut m = serde_json::json!({
            "format": 2,
            "compatible": COMPATIBLE,
            "version": "1.0.0",
            "created": 1,
            "payloads": [{
                "name": "rootfs",
                "kind": kind,
                "compression": "none",
                "size": payload.len(),
                "sha256": sha256_hex(payload),
                "stored_size": payload.len(),
                "chunk_size": CHUNK,
                "chunk_hashes": sha256_hex(&hash_list),
            }]
        });
        edit(&mut m);
        let manifest = serde_json::to_vec_pretty(&m).unwrap();
        Parts {
            signature: sign(env, &manifest),
            manifest,
            hash_list,
            payload: payload.to_vec(),
        }
    }

    /// The bundle bytes, laid out as FORMAT.md says.
    fn bytes(&self) -> Vec<u8> {
        let mut out = b"ABUPBNDL".to_vec();
        out.extend_from_slice(&2u32.to_le_bytes());
        out.extend_from_slice(&(self.manifest.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.manifest);
        out.extend_from_slice(&(self.signature.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.signature);
        out.extend_from_slice(&self.hash_list);
        out.resize(out.len().next_multiple_of(4096), 0);
        out.extend_from_slice(&self.payload);
        out.extend_from_slice(b"ABUPEND\0");
        out
    }

    fn write(&self, env: &Env) -> PathBuf {
        let path = env.path("forged.abup");
        fs::write(&path, self.bytes()).unwrap();
        path
    }
}

/// The signature block over `manifest` with the env's release key.
fn sign(env: &Env, manifest: &[u8]) -> Vec<u8> {
    let key = abup::bundle::load_signing_key(&env.secret).unwrap();
    abup::bundle::SignatureInfo::sign(&key, manifest)
        .to_bytes()
        .unwrap()
}

/// One ustar header block (plus data and padding) with the name and link
/// bytes exactly as given: no tar library would write most of these.
fn tar_entry(out: &mut Vec<u8>, name: &str, kind: u8, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_mode(if kind == b'5' { 0o755 } else { 0o644 });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    h.set_size(data.len() as u64);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
}

/// A tar entry: name, type flag, link name, data.
type Entry<'a> = (&'a str, u8, &'a str, &'a [u8]);

/// A tar archive of `entries` after a sane `etc/`.
fn tar_of(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    tar_entry(&mut out, "etc/", b'5', "", b"");
    tar_entry(&mut out, "etc/os-release", b'0', "", b"VERSION=1.0.0\n");
    for (name, kind, link, data) in entries {
        tar_entry(&mut out, name, *kind, link, data);
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

/// Installs `bundle` from booted A and checks the contract: exit `code`, one
/// error line with `needles`, nothing outside slot B touched, and slot B
/// not bootable and shown as empty.
#[track_caller]
fn refused(env: &Env, canary: &Canary, bundle: &Path, code: i32, needles: &[&str]) -> String {
    let before = world(env, canary);
    let line = env
        .abup(&["--booted-slot", "A", "install", s(bundle)])
        .failed(code, needles);
    assert_same_world(env, canary, &before);
    let st = env.status(Some("A"));
    assert_eq!(st["slots"]["B"]["state"], "empty", "{st:#}");
    assert_eq!(st["slots"]["B"]["bootable"], false, "{st:#}");
    assert_eq!(st["primary"], "A", "{st:#}");
    line
}

#[test]
fn tarballs_that_escape_the_new_root_are_refused_and_escape_nothing() {
    let (env, canary) = setup();
    let target = canary.dir.join("pwned");
    let abs = s(&target).to_string();
    let up = format!("{}{}", "../".repeat(16), abs.trim_start_matches('/'));
    let dir = s(&canary.dir).to_string();
    let keep = s(&canary.dir.join("keep.txt")).to_string();
    let evil = b"pwned\n" as &[u8];
    let through_up = format!("etc/up{abs}");
    let link_up = format!("{}{}", "../".repeat(16), keep.trim_start_matches('/'));
    let cases: Vec<(&str, Vec<Entry<'_>>)> = vec![
        ("traversal", vec![(&up, b'0', "", evil)]),
        ("absolute path", vec![(&abs, b'0', "", evil)]),
        (
            "symlink to an absolute dir, then a file through it",
            vec![
                ("etc/evil", b'2', &dir, b""),
                ("etc/evil/pwned", b'0', "", evil),
            ],
        ),
        (
            "symlink climbing out, then a file through it",
            vec![
                ("etc/up", b'2', "../../../../../../../../../..", b""),
                (&through_up, b'0', "", evil),
            ],
        ),
        (
            "hard link to a host file",
            vec![("etc/shadow", b'1', &keep, b"")],
        ),
        (
            "hard link climbing out",
            vec![("etc/shadow", b'1', &link_up, b"")],
        ),
    ];
    for (what, entries) in cases {
        let tar = tar_of(&entries);
        let bundle = Parts::new(&env, "tar", &tar, |_| {}).write(&env);
        let before = world(&env, &canary);
        let run = env.abup(&["--booted-slot", "A", "install", s(&bundle)]);
        assert_ne!(run.code, 0, "{what}: installed\n{run}");
        let line = run.failed(run.code, &[]);
        assert!(line.len() > 20, "{what}: {line}");
        assert_same_world(&env, &canary, &before);
        assert!(!target.exists(), "{what}: wrote {}", target.display());
        let st = env.status(Some("A"));
        assert_ne!(st["slots"]["B"]["state"], "trying", "{what}: {st:#}");
        assert_eq!(st["primary"], "A", "{what}: {st:#}");

        // `bundle create` reads tarballs as the installer does: it refuses
        // the same archive before signing anything.
        let tarball = env.path("hostile.tar");
        fs::write(&tarball, &tar).unwrap();
        let out = env.path("never.abup");
        let args = format!(
            "bundle create --tarball {} --version 1.0.0 --compatible {COMPATIBLE} --key {} -o {}",
            s(&tarball),
            s(&env.secret),
            s(&out)
        );
        let run = run_abup(&args.split(' ').map(String::from).collect::<Vec<_>>(), None);
        assert_ne!(run.code, 0, "{what}: bundle create accepted it\n{run}");
        assert!(
            !out.exists(),
            "{what}: bundle create left {}",
            out.display()
        );
    }
    assert_eq!(canary.contents(), world(&env, &canary).canary);
}

#[test]
fn sizes_that_lie_are_refused() {
    let (env, canary) = setup();
    let tar = tar_of(&[("etc/hostname", b'0', "", b"device\n")]);

    // A tar header claiming more data than the archive holds.
    let mut short = Vec::new();
    tar_entry(&mut short, "etc/big", b'0', "", b"");
    let at = short.len() - 512;
    let mut h = tar::Header::from_byte_slice(&short[at..]).clone();
    h.set_size(1 << 20);
    h.set_cksum();
    short[at..].copy_from_slice(h.as_bytes());
    short.extend_from_slice(&[b'x'; 512]);
    let bundle = Parts::new(&env, "tar", &short, |_| {}).write(&env);
    refused(&env, &canary, &bundle, 1, &["tar"]);

    // The manifest's size larger or smaller than the payload's bytes (the
    // stored bytes and hash list are genuine).
    for size in [tar.len() as u64 + 1, tar.len() as u64 - 512, u64::MAX] {
        let parts = Parts::new(&env, "tar", &tar, |m| {
            m["payloads"][0]["size"] = size.into();
            m["payloads"][0]["stored_size"] = size.into();
        });
        let run = env.abup(&["--booted-slot", "A", "install", s(&parts.write(&env))]);
        assert_ne!(run.code, 0, "size {size}: {run}");
        run.failed(run.code, &[]);
    }
    // installed_size near 2^64 (the fit check used to wrap).
    let parts = Parts::new(&env, "tar", &tar, |m| {
        m["payloads"][0]["installed_size"] = u64::MAX.into();
    });
    refused(&env, &canary, &parts.write(&env), 3, &["slot B"]);
    // A raw image bigger than the slot, declared honestly: refused first.
    let parts = Parts::new(&env, "raw", &tar, |m| {
        m["payloads"][0]["size"] = (SLOT_MIB * MIB + 4096).into();
        m["payloads"][0]["stored_size"] = (SLOT_MIB * MIB + 4096).into();
    });
    refused(&env, &canary, &parts.write(&env), 3, &[]);
}

#[test]
fn misassembled_bundles_are_refused_before_writing() {
    let (env, canary) = setup();
    let tar = tar_of(&[("etc/hostname", b'0', "", b"device\n")]);
    let parts = Parts::new(&env, "tar", &tar, |_| {});
    let good = parts.bytes();

    // Signature block and manifest swapped.
    let swapped = Parts {
        manifest: parts.signature.clone(),
        signature: parts.manifest.clone(),
        hash_list: parts.hash_list.clone(),
        payload: parts.payload.clone(),
    };
    let p = swapped.write(&env);
    refused(&env, &canary, &p, 3, &["manifest"]);

    // Hash list after the payload instead of before it.
    let mut late = Parts {
        hash_list: Vec::new(),
        ..Parts::new(&env, "tar", &tar, |_| {})
    }
    .bytes();
    let end = late.len() - 8;
    late.splice(end..end, parts.hash_list.iter().copied());
    let p = env.path("late.abup");
    fs::write(&p, &late).unwrap();
    refused(&env, &canary, &p, 3, &[]);

    // The payload before the header.
    let header_len = good.len() - tar.len() - 8;
    let mut reordered = tar.clone();
    reordered.extend_from_slice(&good[..header_len]);
    reordered.extend_from_slice(b"ABUPEND\0");
    let p = env.path("payload-first.abup");
    fs::write(&p, &reordered).unwrap();
    refused(&env, &canary, &p, 3, &["bundle"]);

    // Garbage after the end marker: from a file and from a pipe.
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"GARBAGE");
    let p = env.path("trailing.abup");
    fs::write(&p, &trailing).unwrap();
    refused(&env, &canary, &p, 3, &["after its end"]);
    let before = world(&env, &canary);
    let run = env.abup_stdin(&["--booted-slot", "A", "install", "-"], trailing);
    assert_ne!(run.code, 0, "{run}");
    run.failed(run.code, &["end"]);
    assert_same_world(&env, &canary, &before);
    assert_ne!(env.status(Some("A"))["slots"]["B"]["state"], "trying");

    // The end marker missing or wrong.
    let mut cut = good.clone();
    cut.truncate(good.len() - 8);
    let p = env.path("no-end.abup");
    fs::write(&p, &cut).unwrap();
    refused(&env, &canary, &p, 3, &["truncated"]);
    let mut bad_end = good.clone();
    let n = bad_end.len();
    bad_end[n - 1] = b'!';
    let p = env.path("bad-end.abup");
    fs::write(&p, &bad_end).unwrap();
    let run = env.abup(&["--booted-slot", "A", "install", s(&p)]);
    assert_ne!(run.code, 0, "{run}");
    assert_ne!(env.status(Some("A"))["slots"]["B"]["state"], "trying");
}

#[test]
fn signatures_that_do_not_belong_are_refused() {
    let (env, canary) = setup();
    let tar = tar_of(&[
        ("etc/hostname", b'0', "", b"device\n"),
        // The kernel grub.cfg boots: without it install refuses to activate.
        ("boot/vmlinuz", b'0', "", b"kernel\n"),
    ]);
    let genuine = Parts::new(&env, "tar", &tar, |_| {});

    // A valid signature, over another manifest (same key).
    let other = Parts::new(&env, "tar", &tar, |m| m["version"] = "9.9.9".into());
    let stolen = Parts {
        signature: genuine.signature.clone(),
        ..other
    };
    refused(&env, &canary, &stolen.write(&env), 3, &["signature"]);

    // The manifest changed by one byte after signing.
    let mut edited = Parts::new(&env, "tar", &tar, |_| {});
    let at = edited
        .manifest
        .windows(5)
        .position(|w| w == b"1.0.0")
        .unwrap();
    edited.manifest[at] = b'2';
    refused(&env, &canary, &edited.write(&env), 3, &["signature"]);

    // Signed by a key that is not trusted, claiming the trusted key's id.
    let (rogue_secret, rogue_public) = (env.path("rogue.key"), env.path("rogue.pub"));
    keygen(&rogue_secret, &rogue_public);
    let key = abup::bundle::load_signing_key(&rogue_secret).unwrap();
    let trusted_id = abup::bundle::key_id(&abup::bundle::load_verifying_key(&env.public).unwrap());
    let mut sig: Value = serde_json::from_slice(
        &abup::bundle::SignatureInfo::sign(&key, &genuine.manifest)
            .to_bytes()
            .unwrap(),
    )
    .unwrap();
    sig["key_id"] = trusted_id.into();
    let rogue = Parts {
        signature: serde_json::to_vec(&sig).unwrap(),
        ..Parts::new(&env, "tar", &tar, |_| {})
    };
    refused(&env, &canary, &rogue.write(&env), 3, &["signature"]);

    // Unsigned.
    let unsigned = Parts {
        signature: Vec::new(),
        ..Parts::new(&env, "tar", &tar, |_| {})
    };
    refused(&env, &canary, &unsigned.write(&env), 3, &["not signed"]);

    // And the genuine one installs: the forger writes real bundles.
    env.install_ok("A", &genuine.write(&env), &[]);
}

/// Duplicate entries are refused, naming the path; in any case nothing is
/// ever written through an earlier symlink of the same name.
#[test]
fn duplicate_entries_never_write_through_an_earlier_symlink() {
    let (env, canary) = setup();
    let target = canary.dir.join("pwned");
    let abs = s(&target).to_string();
    let tar = tar_of(&[
        ("etc/passwd", b'2', &abs, b""),
        ("etc/passwd", b'0', "", b"root:x:0:0::/root:/bin/sh\n"),
        ("etc/hostname", b'0', "", b"first\n"),
        ("etc/hostname", b'0', "", b"second\n"),
        ("boot/vmlinuz", b'0', "", b"kernel\n"),
    ]);
    let bundle = Parts::new(&env, "tar", &tar, |_| {}).write(&env);
    let before = world(&env, &canary);
    let run = env.abup(&["--booted-slot", "A", "install", "--no-activate", s(&bundle)]);
    assert!(
        !target.exists(),
        "wrote {} through a symlink\n{run}",
        target.display()
    );
    assert_same_world(&env, &canary, &before);
    run.failed(1, &["etc/passwd", "appears twice"]);
}

// ---------------------------------------------------------------------------
// State-directory trust (item 12): the "already installed" shortcut
// ---------------------------------------------------------------------------

/// Rewrites slot B's record to claim it holds `bundle`.
fn forge_record_of_b(env: &Env, bundle: &Path) {
    let records = env.state_dir.join("slots.json");
    let mut v: Value = serde_json::from_slice(&fs::read(&records).unwrap()).unwrap();
    v["B"]["bundle_sha256"] = bundle_info(bundle)["bundle_sha256"].clone();
    v["B"]["version"] = bundle_info(bundle)["manifest"]["version"].clone();
    fs::write(&records, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn a_forged_record_does_not_skip_writing_a_tar_slot() {
    let env = Env::new();
    let v1 = env.simple_bundle("1.0.0");
    let v2 = env.simple_bundle("2.0.0");
    env.install_ok("A", &v1, &["--no-activate"]);

    // The genuine record and the slot agree: the shortcut is taken.
    let report = env.install_ok("A", &v1, &["--no-activate"]);
    assert_eq!(step_state(&report, "write"), "unchanged", "{report:#}");

    // Whoever can write the state dir claims B already holds 2.0.0.
    forge_record_of_b(&env, &v2);
    let report = env.install_ok("A", &v2, &["--no-activate"]);
    assert_eq!(step_state(&report, "write"), "changed", "{report:#}");
    assert!(
        step_comment(&report, "check").contains("does not show it"),
        "{report:#}"
    );
    let m = env.disk.mount("rootB", false);
    let release = fs::read_to_string(m.path().join("etc/os-release")).unwrap();
    assert!(release.contains("VERSION=2.0.0"), "{release}");
    drop(m);

    // A record rewritten from "incomplete" to "installed" after an
    // interrupted install: the slot has no seal for it either.
    let v3 = env.simple_bundle("3.0.0");
    let records = env.state_dir.join("slots.json");
    let mut v: Value = serde_json::from_slice(&fs::read(&records).unwrap()).unwrap();
    v["B"]["bundle_sha256"] = bundle_info(&v3)["bundle_sha256"].clone();
    v["B"]["content"] = "installed".into();
    fs::write(&records, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let report = env.install_ok("A", &v3, &["--no-activate"]);
    assert_eq!(step_state(&report, "write"), "changed", "{report:#}");
}

#[test]
fn a_raw_slot_is_compared_with_the_signed_hash_before_the_shortcut() {
    let env = Env::builder().preserve(&[]).build();
    let img = env.path("rootfs.ext4");
    let tree = env.path("tree");
    simple_rootfs(&tree, "1.0.0");
    // Labelled as grub.cfg searches for slot B, so the slot is the image
    // byte for byte (abup relabels any other label after the write).
    sh(std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "abup-B", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("8M"));
    let bundle = env.bundle(Source::Image(&img), "1.0.0", "zstd");
    env.install_ok("A", &bundle, &["--no-activate"]);
    let report = env.install_ok("A", &bundle, &["--no-activate"]);
    assert_eq!(step_state(&report, "write"), "unchanged", "{report:#}");

    // One byte of the slot changed behind abup's back (inside the image).
    let b = env.disk.attach("rootB", false);
    let mut f = fs::OpenOptions::new().write(true).open(b.path()).unwrap();
    use std::io::{Seek, SeekFrom, Write};
    f.seek(SeekFrom::Start(4 * MIB + 17)).unwrap();
    f.write_all(b"!").unwrap();
    f.sync_all().unwrap();
    drop(f);
    drop(b);
    let report = env.install_ok("A", &bundle, &["--no-activate"]);
    assert_eq!(step_state(&report, "write"), "changed", "{report:#}");
    assert_eq!(
        env.disk.sha256_prefix("rootB", 8 * MIB),
        sha256_file(&img),
        "the slot holds the image again"
    );
}
