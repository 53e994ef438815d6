//! Carrying configuration and data across an update: preserve rules (files,
//! directories, globs, symlinks, merge or replace, who wins, rules shipped
//! in the image), their containment against hostile symlinks, migrations
//! shipped in the image, and data staged until `mark-good`.
//!
//! Each test installs a real bundle onto a loopback GPT disk and inspects
//! the new slot through a read-only mount.

use crate::util::*;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn meta(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `(mode & 07777, uid, gid)` of `p`, not following a symlink.
fn mode_owner(p: &Path) -> (u32, u32, u32) {
    let m = meta(p);
    (m.mode() & 0o7777, m.uid(), m.gid())
}

/// Sets owner and mtime of `p` (not following a symlink).
fn chown_mtime(p: &Path, uid: u32, gid: u32, mtime: i64) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
    sh(Command::new("touch")
        .arg("-h")
        .arg("-d")
        .arg(format!("@{mtime}"))
        .arg(p));
}

/// A config with `rules` (TOML `[[preserve.rule]]` tables) and no
/// shorthand paths.
fn rules_config(env: &Env, rules: &str) -> std::path::PathBuf {
    env.config_with(|o| {
        o.preserve = vec![];
        o.extra = rules.to_string();
    })
}

fn install_with(env: &Env, config: &Path, bundle: &Path) -> serde_json::Value {
    let run = env.abup_with(
        config,
        &[
            "--json",
            "--booted-slot",
            "A",
            "install",
            "--force",
            s(bundle),
        ],
        None,
    );
    run.ok();
    run.json()
}

#[test]
fn identity_ssh_keys_and_connections_arrive_with_modes_owners_and_xattrs() {
    let env = Env::new();
    let run = &env.running;
    write(
        run,
        "etc/NetworkManager/system-connections/home.nmconnection",
        "[connection]\nid=home\n",
        0o600,
    );
    let conn_dir = run.join("etc/NetworkManager/system-connections");
    fs::set_permissions(&conn_dir, fs::Permissions::from_mode(0o700)).unwrap();
    let key = run.join("etc/ssh/ssh_host_ed25519_key");
    chown_mtime(&key, 0, 0, 1_500_000_000);
    write(run, "etc/app/owned.conf", "owned\n", 0o640);
    let owned = run.join("etc/app/owned.conf");
    xattr::set(&owned, "user.abup-test", b"kept").unwrap();
    chown_mtime(&owned, 1234, 5678, 1_600_000_000);
    let config = rules_config(
        &env,
        r#"
[[preserve.rule]]
path = "/etc/hostname"
missing = "error"
[[preserve.rule]]
path = "/etc/machine-id"
[[preserve.rule]]
path = "/etc/ssh/ssh_host_*"
missing = "error"
[[preserve.rule]]
path = "/etc/NetworkManager/system-connections"
[[preserve.rule]]
path = "/etc/app/owned.conf"
"#,
    );
    let bundle = env.simple_bundle("1.0.0");
    let before = env.disk.sha256_of_partition("rootA");
    let report = install_with(&env, &config, &bundle);
    assert_eq!(step_state(&report, "preserve"), "changed", "{report:#}");
    let comment = step_comment(&report, "preserve");
    for p in [
        "/etc/ssh/ssh_host_ed25519_key",
        "/etc/ssh/ssh_host_ed25519_key.pub",
        "/etc/NetworkManager/system-connections",
    ] {
        assert!(comment.contains(p), "{p} not in {comment}");
    }

    let b = env.disk.mount("rootB", false);
    let root = b.path();
    assert_eq!(read(&root.join("etc/hostname")), "device-42\n");
    assert_eq!(mode_owner(&root.join("etc/machine-id")), (0o444, 0, 0));
    let new_key = root.join("etc/ssh/ssh_host_ed25519_key");
    assert_eq!(read(&new_key), "PRIVATE KEY OF DEVICE 42\n");
    assert_eq!(mode_owner(&new_key), (0o600, 0, 0));
    assert_eq!(
        meta(&new_key).mtime(),
        1_500_000_000,
        "mtime of the host key"
    );
    assert_eq!(
        mode_owner(&root.join("etc/ssh/ssh_host_ed25519_key.pub")),
        (0o644, 0, 0)
    );
    // The glob took only the host keys: the image's sshd_config stays.
    assert_eq!(
        read(&root.join("etc/ssh/sshd_config")),
        "PermitRootLogin no\n"
    );
    let conn = root.join("etc/NetworkManager/system-connections/home.nmconnection");
    assert_eq!(read(&conn), "[connection]\nid=home\n");
    assert_eq!(mode_owner(&conn), (0o600, 0, 0));
    assert_eq!(
        mode_owner(&root.join("etc/NetworkManager/system-connections")),
        (0o700, 0, 0)
    );
    let owned = root.join("etc/app/owned.conf");
    assert_eq!(mode_owner(&owned), (0o640, 1234, 5678));
    assert_eq!(meta(&owned).mtime(), 1_600_000_000);
    assert_eq!(
        xattr::get(&owned, "user.abup-test").unwrap().as_deref(),
        Some(&b"kept"[..]),
        "xattr of a preserved file"
    );
    drop(b);
    assert_eq!(env.disk.sha256_of_partition("rootA"), before);
}

#[test]
fn directories_merge_or_replace_and_the_image_can_win() {
    let env = Env::new();
    // The device has an old sshd_config; the image brings a new one and a
    // file the device lacks (moduli).
    write(&env.running, "etc/ssh/sshd_config", "OLD CONFIG\n", 0o644);
    let dir = env.path("rootfs");
    simple_rootfs(&dir, "1.0.0");
    write(&dir, "etc/ssh/moduli", "IMAGE MODULI\n", 0o644);
    let bundle = env.bundle(Source::Rootfs(&dir), "1.0.0", "zstd");

    // Merge, image wins: the device's files the image lacks arrive, the
    // image's sshd_config and its own key stay; its hostname wins too.
    let config = rules_config(
        &env,
        r#"
[[preserve.rule]]
path = "/etc/ssh"
wins = "image"
[[preserve.rule]]
path = "/etc/hostname"
wins = "image"
"#,
    );
    let report = install_with(&env, &config, &bundle);
    let comment = step_comment(&report, "preserve");
    assert!(
        comment.contains("the image's copy kept: /etc/hostname"),
        "{comment}"
    );
    {
        let b = env.disk.mount("rootB", false);
        let r = b.path();
        assert_eq!(read(&r.join("etc/ssh/sshd_config")), "PermitRootLogin no\n");
        assert_eq!(
            read(&r.join("etc/ssh/ssh_host_ed25519_key")),
            "IMAGE DEFAULT KEY\n"
        );
        assert_eq!(
            read(&r.join("etc/ssh/ssh_host_ed25519_key.pub")),
            "ssh-ed25519 AAAA device-42\n"
        );
        assert_eq!(read(&r.join("etc/ssh/moduli")), "IMAGE MODULI\n");
        assert_eq!(read(&r.join("etc/hostname")), "image-default\n");
    }

    // Merge, device wins (the default): the device's files replace the
    // image's, and the image's files the device lacks stay.
    let config = rules_config(&env, "[[preserve.rule]]\npath = \"/etc/ssh\"\n");
    install_with(&env, &config, &bundle);
    {
        let b = env.disk.mount("rootB", false);
        let r = b.path();
        assert_eq!(read(&r.join("etc/ssh/sshd_config")), "OLD CONFIG\n");
        assert_eq!(
            read(&r.join("etc/ssh/ssh_host_ed25519_key")),
            "PRIVATE KEY OF DEVICE 42\n"
        );
        assert_eq!(read(&r.join("etc/ssh/moduli")), "IMAGE MODULI\n");
    }

    // Replace: the device's directory as a whole.
    let config = rules_config(
        &env,
        "[[preserve.rule]]\npath = \"/etc/ssh\"\ndirectory = \"replace\"\n",
    );
    install_with(&env, &config, &bundle);
    let b = env.disk.mount("rootB", false);
    assert_eq!(
        names_in(&b.path().join("etc/ssh")),
        names_in(&env.running.join("etc/ssh"))
    );
}

#[test]
fn symlinks_stay_symlinks_or_resolve_inside_the_old_root() {
    let env = Env::new();
    let run = &env.running;
    // /etc/hostname -> ../data/hostname (relative), /etc/machine-id ->
    // /var/lib/dbus/machine-id (absolute: inside the old root, not the host).
    fs::remove_file(run.join("etc/hostname")).unwrap();
    write(run, "data/hostname", "device-from-data\n", 0o640);
    symlink("../data/hostname", run.join("etc/hostname")).unwrap();
    fs::remove_file(run.join("etc/machine-id")).unwrap();
    write(run, "var/lib/dbus/machine-id", "feedfacefeedface\n", 0o444);
    symlink("/var/lib/dbus/machine-id", run.join("etc/machine-id")).unwrap();
    let config = rules_config(
        &env,
        r#"
[[preserve.rule]]
path = "/etc/hostname"
symlinks = "resolve"
[[preserve.rule]]
path = "/etc/machine-id"
symlinks = "resolve"
[[preserve.rule]]
path = "/etc/localtime"
symlinks = "keep"
"#,
    );
    let bundle = env.simple_bundle("1.0.0");
    install_with(&env, &config, &bundle);
    let b = env.disk.mount("rootB", false);
    let r = b.path();
    let host = r.join("etc/hostname");
    assert!(meta(&host).file_type().is_file(), "resolved to a file");
    assert_eq!(read(&host), "device-from-data\n");
    assert_eq!(mode_owner(&host), (0o640, 0, 0));
    assert_eq!(read(&r.join("etc/machine-id")), "feedfacefeedface\n");
    let lt = r.join("etc/localtime");
    assert!(meta(&lt).file_type().is_symlink(), "kept as a symlink");
    assert_eq!(
        fs::read_link(&lt).unwrap(),
        Path::new("../usr/share/zoneinfo/Europe/Berlin")
    );
}

#[test]
fn the_image_adds_rules_of_its_own() {
    let env = Env::new();
    write(&env.running, "var/lib/app/state.db", "app state\n", 0o600);
    let dir = env.path("rootfs");
    simple_rootfs(&dir, "1.0.0");
    write(
        &dir,
        "usr/lib/abup/preserve.toml",
        "[[rule]]\npath = \"/var/lib/app\"\nmissing = \"error\"\n",
        0o644,
    );
    let bundle = env.bundle(Source::Rootfs(&dir), "1.0.0", "zstd");
    let report = install_with(&env, &env.config, &bundle);
    let comment = step_comment(&report, "preserve");
    assert!(comment.contains("1 rule(s) from the image"), "{comment}");
    let b = env.disk.mount("rootB", false);
    assert_eq!(read(&b.path().join("var/lib/app/state.db")), "app state\n");
}

/// Issue 9 item 2: an image with `etc -> /somewhere` must not make abup
/// create `/somewhere/ssh` on the host, not even before refusing.
#[test]
fn an_image_symlink_out_of_the_new_root_is_refused_and_nothing_is_created_on_the_host() {
    let env = Env::new();
    let outside = env.root.join("host-somewhere");
    let dir = env.path("rootfs");
    write(&dir, "usr/bin/hello", "#!/bin/sh\n", 0o755);
    symlink(&outside, dir.join("etc")).unwrap();
    let bundle = env.bundle(Source::Rootfs(&dir), "1.0.0", "zstd");
    let config = rules_config(
        &env,
        "[[preserve.rule]]\npath = \"/etc/ssh/ssh_host_ed25519_key\"\n",
    );
    let before = env.snapshot();
    let run = env.abup_with(
        &config,
        &["--booted-slot", "A", "install", s(&bundle)],
        None,
    );
    run.failed(1, &["preserve", "/etc", "symlink", "new root"]);
    assert!(
        !outside.exists(),
        "abup created {} on the host",
        outside.display()
    );
    env.assert_untouched(&before);

    // Relative escapes are refused as well.
    let dir = env.path("rootfs");
    write(&dir, "usr/bin/hello", "#!/bin/sh\n", 0o755);
    symlink("../../../../../../../../../../tmp", dir.join("etc")).unwrap();
    let bundle = env.bundle(Source::Rootfs(&dir), "1.0.0", "zstd");
    let run = env.abup_with(
        &config,
        &["--booted-slot", "A", "install", s(&bundle)],
        None,
    );
    run.failed(1, &["preserve", "leads outside the new root"]);
    env.assert_untouched(&before);
}

#[test]
fn an_old_root_symlink_out_of_the_old_root_is_refused() {
    let env = Env::new();
    fs::remove_file(env.running.join("etc/hostname")).unwrap();
    symlink(
        "../../../../../../../../../../etc/passwd",
        env.running.join("etc/hostname"),
    )
    .unwrap();
    let config = rules_config(
        &env,
        "[[preserve.rule]]\npath = \"/etc/hostname\"\nsymlinks = \"resolve\"\n",
    );
    let bundle = env.simple_bundle("1.0.0");
    let before = env.snapshot();
    let run = env.abup_with(
        &config,
        &["--booted-slot", "A", "install", s(&bundle)],
        None,
    );
    run.failed(1, &["/etc/hostname", "leads outside the old root"]);
    env.assert_untouched(&before);
}

#[test]
fn bad_rules_are_refused_before_anything_is_written() {
    let env = Env::new();
    let bundle = env.simple_bundle("1.0.0");
    let before = env.snapshot();
    for (rules, needles) in [
        (
            "[[preserve.rule]]\npath = \"/etc/../etc/shadow\"\n",
            &["preserve.rule", "'..'"][..],
        ),
        (
            "[[preserve.rule]]\npath = \"/etc/x\"\nwins = \"both\"\n",
            &["unknown variant"][..],
        ),
    ] {
        let config = rules_config(&env, rules);
        let run = env.abup_with(
            &config,
            &["--booted-slot", "A", "install", s(&bundle)],
            None,
        );
        run.failed(3, needles);
        env.assert_untouched(&before);
    }
    let config = env.config_with(|o| o.preserve = vec!["/etc/../etc/shadow".into()]);
    let run = env.abup_with(
        &config,
        &["--booted-slot", "A", "install", s(&bundle)],
        None,
    );
    run.failed(3, &["preserve.paths", "'..'"]);

    // A rule that requires its source fails before the flip.
    let config = rules_config(
        &env,
        "[[preserve.rule]]\npath = \"/etc/wireguard/wg0.conf\"\nmissing = \"error\"\n",
    );
    let run = env.abup_with(
        &config,
        &["--booted-slot", "A", "install", s(&bundle)],
        None,
    );
    run.failed(1, &["/etc/wireguard/wg0.conf", "does not exist"]);
    env.assert_untouched(&before);
}
