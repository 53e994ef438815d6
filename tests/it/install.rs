//! Successful installs: every payload kind and compression, every way of
//! feeding the bundle, both sector sizes, the rescue system, reinstalls and
//! preserved files. Each test checks the new slot's content through a
//! read-only mount, the GRUB environment through the real `grub-editenv`,
//! and that the booted slot A stayed byte-identical.

use crate::util::*;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

/// The grubenv after a successful install into B from A.
fn env_after_install_into_b() -> std::collections::BTreeMap<String, String> {
    env_with(
        INITIAL_ENV,
        &[("ORDER", "B A"), ("B_OK", "1"), ("B_TRY", "0")],
    )
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

fn owner(p: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid())
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// Checks everything [`rich_rootfs`] put in the tree arrived in `root`.
fn check_rich_tree(root: &Path, tree: &RichTree, version: &str) {
    assert!(read(&root.join("etc/os-release")).contains(&format!("VERSION={version}")));

    let secret = root.join("etc/secret.conf");
    assert_eq!(read(&secret), "owned by 1234:5678\n");
    assert_eq!(mode(&secret), 0o640, "mode of etc/secret.conf");
    assert_eq!(owner(&secret), (1234, 5678), "owner of etc/secret.conf");

    assert_eq!(
        mode(&root.join("usr/bin/suid-tool")),
        0o4755,
        "setuid bit lost"
    );
    assert_eq!(mode(&root.join("usr/bin/hello")), 0o755);

    let app = root.join("srv/app");
    assert!(app.is_dir());
    assert_eq!(mode(&app), 0o750, "mode of directory srv/app");
    assert_eq!(owner(&app), (1234, 5678), "owner of directory srv/app");

    let lib = fs::metadata(root.join("usr/lib/libfoo.so.1")).unwrap();
    let link = fs::metadata(root.join("usr/lib/libfoo-hardlink.so.1")).unwrap();
    assert_eq!(lib.ino(), link.ino(), "hard link pair must share one inode");
    assert_eq!(lib.nlink(), 2);
    assert_eq!(
        read(&root.join("usr/lib/libfoo-hardlink.so.1")),
        "ELF pretend library\n"
    );

    let so = root.join("usr/lib/libfoo.so");
    assert!(fs::symlink_metadata(&so).unwrap().file_type().is_symlink());
    assert_eq!(fs::read_link(&so).unwrap(), Path::new("libfoo.so.1"));
    assert_eq!(
        owner(&so),
        (1234, 5678),
        "owner of symlink usr/lib/libfoo.so"
    );
    assert_eq!(
        fs::read_link(root.join("bin")).unwrap(),
        Path::new("usr/bin")
    );

    let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(
        null.file_type().is_char_device(),
        "dev/null is not a char device"
    );
    let rdev = null.rdev();
    assert_eq!(
        (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)),
        (1, 3),
        "device numbers of dev/null"
    );
    assert_eq!(null.mode() & 0o7777, 0o666);

    let fifo = fs::symlink_metadata(root.join("run/initctl")).unwrap();
    assert!(fifo.file_type().is_fifo(), "run/initctl is not a FIFO");
    assert_eq!(fifo.mode() & 0o7777, 0o600);

    assert_eq!(
        xattr::get(root.join("etc/tagged"), "user.test")
            .unwrap()
            .as_deref(),
        Some(&b"hello"[..]),
        "xattr user.test lost"
    );
    if tree.with_cap {
        assert_eq!(
            xattr::get(root.join("usr/bin/ping"), "security.capability")
                .unwrap()
                .as_deref(),
            Some(&CAP_NET_RAW_EP[..]),
            "file capability (security.capability) lost"
        );
    }

    assert_eq!(
        sha256_file(&root.join("usr/lib/big.bin")),
        tree.big_sha256,
        "content of the 3 MiB random file"
    );

    let old = fs::metadata(root.join("etc/fixed-mtime")).unwrap();
    assert_eq!(old.mtime(), 1_600_000_000, "mtime of etc/fixed-mtime");

    assert_eq!(
        read(&root.join(LONG_NAME)),
        "long\n",
        "file with a >100 byte path"
    );
    assert_eq!(fs::metadata(root.join("empty")).unwrap().len(), 0);
}

/// Report fields every successful install into `slot` has.
fn check_success_report(report: &serde_json::Value, bundle: &Path, version: &str, slot: &str) {
    assert_eq!(report["command"], "install");
    assert_eq!(report["result"], "success");
    assert_eq!(report["exit_code"], 0);
    assert_eq!(report["version"], version);
    assert_eq!(report["target_slot"], slot);
    assert_eq!(
        report["bundle_sha256"],
        bundle_info(bundle)["bundle_sha256"],
        "the report and `bundle info` disagree on the bundle's hash"
    );
    assert!(
        report.get("failed_step").is_none_or(|v| v.is_null()),
        "{report:#}"
    );
    assert!(
        report.get("error").is_none_or(|v| v.is_null()),
        "{report:#}"
    );
    for s in report["steps"].as_array().unwrap() {
        assert!(s["comment"].is_string() && s["duration_ms"].is_u64(), "{s}");
    }
}

#[test]
fn tar_payload_from_a_rootfs_dir_keeps_every_file_kind() {
    let env = Env::new();
    let dir = env.path("rootfs");
    let tree = rich_rootfs(&dir, "1.0.0");
    let bundle = env.bundle(Source::Rootfs(&dir), "1.0.0", "zstd");
    let slot_a = env.disk.sha256_of_partition("rootA");

    let report = env.install_ok("A", &bundle, &[]);
    check_success_report(&report, &bundle, "1.0.0", "B");
    assert_eq!(step_names(&report), INSTALL_STEPS);
    for (step, want) in [
        ("load-config", "unchanged"),
        ("verify-bundle", "unchanged"),
        ("inspect-system", "unchanged"),
        ("check", "unchanged"),
        ("mark-bad", "changed"),
        ("write", "changed"),
        ("preserve", "changed"),
        ("record", "changed"),
        ("activate", "changed"),
    ] {
        assert_eq!(step_state(&report, step), want, "step {step}: {report:#}");
    }

    {
        let b = env.disk.mount("rootB", false);
        let label = sh(Command::new("e2label").arg(b.lo.path()));
        assert_eq!(label.trim(), "abup-B", "ext4 label grub.cfg searches for");
        check_rich_tree(b.path(), &tree, "1.0.0");
        // Preserved from the running system, replacing the image's file.
        assert_eq!(read(&b.path().join("etc/hostname")), "device-42\n");
    }
    assert_eq!(env.grubenv(), env_after_install_into_b());
    assert_eq!(
        env.disk.sha256_of_partition("rootA"),
        slot_a,
        "booted slot A changed"
    );

    let st = env.status(Some("A"));
    assert_eq!(st["compatible"], COMPATIBLE);
    assert_eq!(st["booted"], "A");
    assert_eq!(st["primary"], "B");
    assert_eq!(st["backend"], "grub");
    let b = &st["slots"]["B"];
    assert_eq!(b["state"], "trying", "{st:#}");
    assert_eq!(b["version"], "1.0.0");
    assert_eq!(b["bundle_sha256"], report["bundle_sha256"]);
    assert!(
        b["installed_at"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000),
        "{st:#}"
    );
    assert_eq!(b["bootable"], true);
    assert_eq!(b["tries_left"], 3);
    assert_eq!(b["partlabel"], "rootB");
    assert_eq!(b["partuuid"], env.disk.part("rootB").partuuid.as_str());
    let a = &st["slots"]["A"];
    assert_eq!(a["state"], "good", "{st:#}");
    assert!(a["version"].is_null(), "{st:#}");
    assert_eq!(a["partlabel"], "rootA");
}

#[test]
fn gzip_tarball_made_by_gnu_tar() {
    let env = Env::new();
    let dir = env.path("rootfs");
    let tree = rich_rootfs(&dir, "1.1.0");
    let tarball = env.path("rootfs.tar.gz");
    sh(Command::new("tar")
        .args([
            "--create",
            "--gzip",
            "--format=posix",
            "--xattrs",
            "--xattrs-include=*",
        ])
        .args(["--numeric-owner", "--file"])
        .arg(&tarball)
        .arg("-C")
        .arg(&dir)
        .arg("."));
    let bundle = env.bundle(Source::Tarball(&tarball), "1.1.0", "gzip");
    let info = bundle_info(&bundle);
    assert_eq!(info["manifest"]["payloads"][0]["kind"], "tar");
    assert_eq!(info["manifest"]["payloads"][0]["compression"], "gzip");
    let slot_a = env.disk.sha256_of_partition("rootA");

    let report = env.install_ok("A", &bundle, &[]);
    check_success_report(&report, &bundle, "1.1.0", "B");
    {
        let b = env.disk.mount("rootB", false);
        check_rich_tree(b.path(), &tree, "1.1.0");
        assert_eq!(mode(b.path()), 0o755, "mode of the new root directory");
        assert_eq!(owner(b.path()), (0, 0), "owner of the new root directory");
    }
    assert_eq!(env.grubenv(), env_after_install_into_b());
    assert_eq!(env.disk.sha256_of_partition("rootA"), slot_a);
}

/// Makes an ext4 image of `size` holding a [`simple_rootfs`] of `version`.
fn ext4_image(env: &Env, version: &str, size: &str) -> std::path::PathBuf {
    let tree = env.path("image-tree");
    simple_rootfs(&tree, version);
    let img = env.path("rootfs.ext4");
    sh(Command::new("mkfs.ext4")
        // Already labelled as grub.cfg searches for slot B, so abup writes
        // it byte for byte (another label is changed after the write).
        .args(["-q", "-F", "-L", "abup-B", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg(size));
    img
}

#[test]
fn raw_image_payload_zstd_and_gzip() {
    // No preserved paths: the slot must then hold the image byte for byte.
    let env = Env::builder().preserve(&[]).build();
    let img = ext4_image(&env, "2.0.0", "24M");
    let bundle = env.bundle(Source::Image(&img), "2.0.0", "zstd");
    let info = bundle_info(&bundle);
    assert_eq!(info["manifest"]["payloads"][0]["kind"], "raw");
    assert_eq!(info["manifest"]["payloads"][0]["size"], 24 * MIB);
    let slot_a = env.disk.sha256_of_partition("rootA");

    let report = env.install_ok("A", &bundle, &[]);
    check_success_report(&report, &bundle, "2.0.0", "B");
    assert_eq!(step_state(&report, "write"), "changed");
    assert_eq!(step_state(&report, "preserve"), "unchanged");
    assert_eq!(
        env.disk.sha256_prefix("rootB", 24 * MIB),
        sha256_file(&img),
        "slot B does not start with the image, byte for byte"
    );
    assert_eq!(env.grubenv(), env_after_install_into_b());

    // gzip, into the same slot, this time with preserved files copied into
    // the written image.
    let img2 = ext4_image(&env, "2.1.0", "24M");
    let gz = env.bundle(Source::Image(&img2), "2.1.0", "gzip");
    let cfg = env.config_with(|o| {
        o.preserve = ["/etc/hostname", "/etc/ssh", "/etc/machine-id"]
            .map(String::from)
            .to_vec()
    });
    let run = env.abup_with(
        &cfg,
        &["--json", "--booted-slot", "A", "install", s(&gz)],
        None,
    );
    run.ok();
    let report = run.json();
    check_success_report(&report, &gz, "2.1.0", "B");
    assert_eq!(step_state(&report, "preserve"), "changed");
    {
        let b = env.disk.mount("rootB", false);
        assert!(read(&b.path().join("etc/os-release")).contains("VERSION=2.1.0"));
        assert_eq!(read(&b.path().join("etc/hostname")), "device-42\n");
        let key = b.path().join("etc/ssh/ssh_host_ed25519_key");
        assert_eq!(read(&key), "PRIVATE KEY OF DEVICE 42\n");
        assert_eq!(mode(&key), 0o600);
    }
    assert_eq!(env.grubenv(), env_after_install_into_b());
    assert_eq!(env.disk.sha256_of_partition("rootA"), slot_a);
    assert_eq!(env.status(Some("A"))["slots"]["B"]["version"], "2.1.0");
}

#[test]
fn install_from_stdin_with_slot_named_by_partuuid() {
    let env = Env::builder().slot_b_by_uuid().build();
    let bundle = env.simple_bundle("1.2.0");
    let bytes = fs::read(&bundle).unwrap();
    let slot_a = env.disk.sha256_of_partition("rootA");

    let run = env.abup_stdin(&["--json", "--booted-slot", "A", "install", "-"], bytes);
    run.ok();
    let report = run.json();
    check_success_report(&report, &bundle, "1.2.0", "B");
    assert_eq!(step_names(&report), INSTALL_STEPS);
    {
        let b = env.disk.mount("rootB", false);
        assert!(read(&b.path().join("etc/os-release")).contains("VERSION=1.2.0"));
        assert_eq!(
            fs::read_link(b.path().join("bin")).unwrap(),
            Path::new("usr/bin")
        );
    }
    assert_eq!(env.grubenv(), env_after_install_into_b());
    assert_eq!(env.disk.sha256_of_partition("rootA"), slot_a);
    let st = env.status(Some("A"));
    assert_eq!(st["slots"]["B"]["state"], "trying");
    assert_eq!(
        st["slots"]["B"]["partuuid"],
        env.disk.part("rootB").partuuid.as_str()
    );
}

#[test]
fn disk_with_4096_byte_sectors() {
    let env = Env::builder().sector(4096).build();
    let dir = env.path("rootfs");
    let tree = rich_rootfs(&dir, "3.0.0");
    let bundle = env.bundle(Source::Rootfs(&dir), "3.0.0", "zstd");
    let slot_a = env.disk.sha256_of_partition("rootA");

    let report = env.install_ok("A", &bundle, &[]);
    check_success_report(&report, &bundle, "3.0.0", "B");
    {
        let b = env.disk.mount("rootB", false);
        check_rich_tree(b.path(), &tree, "3.0.0");
        assert_eq!(read(&b.path().join("etc/hostname")), "device-42\n");
    }
    assert_eq!(env.grubenv(), env_after_install_into_b());
    assert_eq!(env.disk.sha256_of_partition("rootA"), slot_a);
    let st = env.status(Some("A"));
    assert_eq!(st["primary"], "B");
    assert_eq!(st["slots"]["B"]["state"], "trying");
    assert_eq!(st["slots"]["B"]["version"], "3.0.0");
}

#[test]
fn rescue_system_needs_target_slot() {
    let env = Env::new();
    let bundle = env.simple_bundle("1.0.0");

    // Not booted from A or B (the test host): status says so.
    let st = env.status(None);
    assert!(st["booted"].is_null(), "{st:#}");
    assert_eq!(st["primary"], "A");

    let before = env.snapshot();
    let run = env.abup(&["install", s(&bundle)]);
    run.failed(3, &["--target-slot"]);
    env.assert_untouched(&before);

    // Naming the booted slot as the target is refused too.
    let run = env.abup(&[
        "--booted-slot",
        "A",
        "install",
        "--target-slot",
        "A",
        s(&bundle),
    ]);
    run.failed(3, &["slot A"]);
    env.assert_untouched(&before);

    let run = env.abup(&["--json", "install", "--target-slot", "B", s(&bundle)]);
    run.ok();
    let report = run.json();
    check_success_report(&report, &bundle, "1.0.0", "B");
    assert_eq!(env.grubenv(), env_after_install_into_b());
    assert_eq!(env.disk.sha256_of_partition("rootA"), before.slot_a);
    let b = env.disk.mount("rootB", false);
    assert!(read(&b.path().join("etc/os-release")).contains("VERSION=1.0.0"));
}

#[test]
fn rescue_install_reads_the_primary_slot_not_the_rescue_systems_own_files() {
    let env = Env::new();
    let bundle = env.simple_bundle("1.0.0");
    // preserve.from unset: the running system's / would be the rescue
    // system's (here the test host's) own root.
    let config = env.config_with(|o| o.from = None);
    let run = env.abup_with(
        &config,
        &["--json", "install", "--target-slot", "B", s(&bundle)],
        None,
    );
    run.ok();
    let report = run.json();
    // The old root is then the primary slot A, mounted read-only by abup.
    assert_eq!(step_state(&report, "preserve"), "changed");
    assert!(
        step_comment(&report, "preserve").contains("slot A (primary, mounted read-only)"),
        "{report:#}"
    );
    let b = env.disk.mount("rootB", false);
    assert_eq!(read(&b.path().join("etc/hostname")), "slot-a-image\n");
    assert!(!b.path().join("etc/machine-id").exists());
}

#[test]
fn reinstalling_the_same_bundle_skips_the_write_unless_forced() {
    let env = Env::new();
    let bundle = env.simple_bundle("1.0.0");
    env.install_ok("A", &bundle, &[]);
    let grubenv = env.grubenv_bytes();
    let slot_b = env.disk.sha256_of_partition("rootB");

    let report = env.install_ok("A", &bundle, &[]);
    assert_eq!(step_names(&report), INSTALL_STEPS, "{report:#}");
    for step in [
        "mark-bad", "write", "verify", "preserve", "migrate", "record",
    ] {
        assert_eq!(
            step_state(&report, step),
            "unchanged",
            "step {step}: {report:#}"
        );
    }
    assert_eq!(step_state(&report, "activate"), "unchanged", "{report:#}");
    assert_eq!(report["target_slot"], "B");
    assert_eq!(
        env.grubenv_bytes(),
        grubenv,
        "a no-op reinstall rewrote the grubenv"
    );
    assert_eq!(
        env.disk.sha256_of_partition("rootB"),
        slot_b,
        "a no-op reinstall wrote slot B"
    );

    let report = env.install_ok("A", &bundle, &["--force"]);
    assert_eq!(step_names(&report), INSTALL_STEPS);
    assert_eq!(step_state(&report, "mark-bad"), "changed", "{report:#}");
    assert_eq!(step_state(&report, "write"), "changed", "{report:#}");
    assert_eq!(step_state(&report, "activate"), "changed", "{report:#}");
    assert_eq!(env.grubenv(), env_after_install_into_b());
    let b = env.disk.mount("rootB", false);
    assert!(read(&b.path().join("etc/os-release")).contains("VERSION=1.0.0"));
}

#[test]
fn preserved_paths_arrive_with_content_mode_and_links() {
    let env = Env::builder()
        .preserve(&[
            "/etc/hostname",
            "/etc/ssh",
            "/etc/machine-id",
            "/etc/localtime",
            "/etc/not-on-this-device",
        ])
        .build();
    let bundle = env.simple_bundle("1.0.0");
    let report = env.install_ok("A", &bundle, &[]);
    assert_eq!(step_state(&report, "preserve"), "changed");
    let comment = step_comment(&report, "preserve");
    assert!(
        comment.contains("/etc/not-on-this-device"),
        "the preserve step should name the missing path: {comment}"
    );

    let b = env.disk.mount("rootB", false);
    let root = b.path();
    assert_eq!(read(&root.join("etc/hostname")), "device-42\n");
    let key = root.join("etc/ssh/ssh_host_ed25519_key");
    assert_eq!(read(&key), "PRIVATE KEY OF DEVICE 42\n");
    assert_eq!(mode(&key), 0o600, "mode of the preserved ssh host key");
    assert_eq!(owner(&key), (0, 0));
    assert_eq!(mode(&root.join("etc/ssh/ssh_host_ed25519_key.pub")), 0o644);
    // The running system's /etc/ssh is merged into the image's: the
    // image's new sshd_config stays beside the device's keys.
    let mut want = names_in(&env.running.join("etc/ssh"));
    want.insert("sshd_config".to_string());
    assert_eq!(names_in(&root.join("etc/ssh")), want);
    assert_eq!(
        read(&root.join("etc/ssh/sshd_config")),
        "PermitRootLogin no\n"
    );
    assert_eq!(
        read(&root.join("etc/machine-id")),
        "0123456789abcdef0123456789abcdef\n"
    );
    assert_eq!(mode(&root.join("etc/machine-id")), 0o444);
    let lt = root.join("etc/localtime");
    assert!(
        fs::symlink_metadata(&lt).unwrap().file_type().is_symlink(),
        "a preserved symlink must stay a symlink"
    );
    assert_eq!(
        fs::read_link(&lt).unwrap(),
        Path::new("../usr/share/zoneinfo/Europe/Berlin")
    );
    assert!(!root.join("etc/not-on-this-device").exists());
    // Files the image brought and nobody preserved are the image's.
    assert!(read(&root.join("etc/os-release")).contains("VERSION=1.0.0"));
}

/// A tarball made with GNU tar `--sparse --format=posix` (PAX sparse files,
/// as found in rootfs trees with e.g. /var/log/lastlog) must either be
/// refused by `bundle create`, or install with the file's content intact:
/// a bundle that builds fine and then fails on every device is a trap.
#[test]
fn pax_sparse_tarball_is_refused_at_create_or_installs_correctly() {
    let env = Env::new();
    let dir = env.path("rootfs");
    simple_rootfs(&dir, "1.0.0");
    let sparse = dir.join("var/log/lastlog");
    fs::create_dir_all(sparse.parent().unwrap()).unwrap();
    fs::File::create(&sparse)
        .and_then(|f| f.set_len(4 * MIB))
        .unwrap();
    sh(Command::new("dd")
        .args([
            "if=/dev/urandom",
            "bs=4096",
            "count=2",
            "seek=300",
            "conv=notrunc",
            "status=none",
        ])
        .arg(format!("of={}", s(&sparse))));
    let want = sha256_file(&sparse);
    let tarball = env.path("rootfs.tar.gz");
    sh(Command::new("tar")
        .args([
            "--create",
            "--gzip",
            "--sparse",
            "--format=posix",
            "--numeric-owner",
            "--file",
        ])
        .arg(&tarball)
        .arg("-C")
        .arg(&dir)
        .arg("."));

    let out = env.path("sparse.abup");
    let create = run_abup(
        &[
            "bundle",
            "create",
            "--tarball",
            s(&tarball),
            "--version",
            "1.0.0",
            "--compatible",
            COMPATIBLE,
            "--compression",
            "zstd",
            "--key",
            s(&env.secret),
            "-o",
            s(&out),
        ]
        .map(String::from),
        None,
    );
    if create.code != 0 {
        create.failed(create.code, &["sparse"]);
        return;
    }
    let run = env.abup(&["--booted-slot", "A", "install", s(&out)]);
    assert_eq!(
        run.code, 0,
        "`bundle create` accepted the tarball, but the install fails:\n{run}"
    );
    let b = env.disk.mount("rootB", false);
    assert_eq!(sha256_file(&b.path().join("var/log/lastlog")), want);
}

/// `bundle create --rootfs` packs with GNU tar `--acls`, which writes
/// `SCHILY.acl.access` PAX records whose values span several lines. PAX
/// records are length-prefixed; an extractor that splits them at newlines
/// ("malformed pax extension") fails on every device for any rootfs with an
/// ACL, although the bundle built fine.
#[test]
fn posix_acls_survive_install() {
    let env = Env::new();
    let dir = env.path("rootfs");
    simple_rootfs(&dir, "1.0.0");
    write(&dir, "etc/acl-file", "acl\n", 0o644);
    fs::create_dir_all(dir.join("srv/shared")).unwrap();
    xattr::set(
        dir.join("etc/acl-file"),
        "system.posix_acl_access",
        &ACL_FILE,
    )
    .expect("setting an access ACL on the source tree");
    xattr::set(
        dir.join("srv/shared"),
        "system.posix_acl_default",
        &ACL_DEFAULT_DIR,
    )
    .expect("setting a default ACL on the source tree");
    let bundle = env.bundle(Source::Rootfs(&dir), "1.0.0", "zstd");

    let run = env.abup(&["--booted-slot", "A", "install", s(&bundle)]);
    run.ok();
    let b = env.disk.mount("rootB", false);
    assert_eq!(
        xattr::get(b.path().join("etc/acl-file"), "system.posix_acl_access")
            .unwrap()
            .as_deref(),
        Some(&ACL_FILE[..]),
        "access ACL of etc/acl-file"
    );
    assert_eq!(
        xattr::get(b.path().join("srv/shared"), "system.posix_acl_default")
            .unwrap()
            .as_deref(),
        Some(&ACL_DEFAULT_DIR[..]),
        "default ACL of srv/shared"
    );
}

/// An xattr value may contain newline bytes (any binary value may); its PAX
/// record must still be read by its length, not split at the newline.
#[test]
fn xattr_values_with_newlines_survive_install() {
    let env = Env::new();
    let dir = env.path("rootfs");
    simple_rootfs(&dir, "1.0.0");
    write(&dir, "etc/notes", "x\n", 0o644);
    xattr::set(dir.join("etc/notes"), "user.note", b"line one\nline two").unwrap();
    fs::create_dir_all(dir.join("srv/tagged")).unwrap();
    xattr::set(
        dir.join("srv/tagged"),
        "user.bin",
        &[0x0a, 0x00, 0xff, 0x0a],
    )
    .unwrap();
    let bundle = env.bundle(Source::Rootfs(&dir), "1.0.0", "zstd");

    let run = env.abup(&["--booted-slot", "A", "install", s(&bundle)]);
    run.ok();
    let b = env.disk.mount("rootB", false);
    assert_eq!(
        xattr::get(b.path().join("etc/notes"), "user.note")
            .unwrap()
            .as_deref(),
        Some(&b"line one\nline two"[..])
    );
    assert_eq!(
        xattr::get(b.path().join("srv/tagged"), "user.bin")
            .unwrap()
            .as_deref(),
        Some(&[0x0a, 0x00, 0xff, 0x0a][..])
    );
}
