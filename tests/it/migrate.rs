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

/// Sets grubenv variables as GRUB's own `save_env` would (the env lives on
/// the boot partition in the default test world).
fn set_grubenv(env: &Env, vars: &[(&str, &str)]) {
    let boot = env.disk.mount("boot", true);
    let mut cmd = Command::new("grub-editenv");
    cmd.arg(boot.path().join("grub/grubenv")).arg("set");
    for (k, v) in vars {
        cmd.arg(format!("{k}={v}"));
    }
    sh(&mut cmd);
}

/// Formats the data partition and writes `files` (path, content) on it.
fn data_partition(env: &Env, files: &[(&str, &str)]) {
    env.disk.mkfs("data");
    let d = env.disk.mount("data", true);
    for (path, content) in files {
        write(d.path(), path, content, 0o644);
    }
}

/// Every path of the data partition with its type, mode, owner and content
/// hash (abup's own staging directory and lost+found left out): what the
/// old slot sees of its data.
fn data_tree(env: &Env) -> String {
    let d = env.disk.mount("data", false);
    sh(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . -path ./lost+found -prune -o -path ./.abup-staging -prune -o -printf '%p %y %m %U:%G %s\n' -exec sh -c 'test -f \"$1\" && sha256sum \"$1\" || true' _ {{}} \\; | LC_ALL=C sort",
        s(d.path())
    )))
}

/// Every path under `dir` with type, inode, mode, owner, size, mtime,
/// ctime and, for files, a content hash: any change to a file, its metadata
/// (xattrs included, through the ctime) or the directories shows.
fn tree_strict(dir: &Path) -> String {
    sh(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . -printf '%p %y %i %m %U:%G %s %T@ %C@\n' -exec sh -c 'test -f \"$1\" && sha256sum \"$1\" || true' _ {{}} \\; | LC_ALL=C sort",
        s(dir)
    )))
}

/// The data partition as the old slot must find it after a refused or
/// failed install: its block device byte for byte.
fn data_bytes(env: &Env) -> String {
    env.disk.sha256_of_partition("data")
}

/// A config with the data partition.
fn data_config(env: &Env) -> std::path::PathBuf {
    env.config_with(|o| o.extra = "[data]\npartlabel = \"data\"\n".to_string())
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

// ---------------------------------------------------------------------------
// Migrations shipped in the image, and data staging
// ---------------------------------------------------------------------------

/// Programs the test migrations use, as busybox applets.
const APPLETS: &[&str] = &[
    "sh", "awk", "tr", "sed", "md5sum", "mkdir", "chmod", "chown", "mv", "cat", "echo", "printf",
    "ls", "sleep", "touch", "mknod", "mount", "rm", "test", "[", "setsid",
];

/// A rootfs for `version` holding busybox (the image's /bin/sh) and the
/// migrations `(name, script)`.
fn rootfs_with_migrations(
    env: &Env,
    version: &str,
    migrations: &[(&str, &str)],
) -> std::path::PathBuf {
    let dir = env.path("rootfs");
    simple_rootfs(&dir, version);
    let bin = dir.join("usr/bin");
    fs::copy("/bin/busybox", bin.join("busybox")).expect("copying /bin/busybox (busybox-static)");
    for a in APPLETS {
        symlink("busybox", bin.join(a)).unwrap();
    }
    for (name, script) in migrations {
        write(
            &dir,
            &format!("usr/lib/abup/migrate.d/{name}"),
            script,
            0o755,
        );
    }
    dir
}

fn fixture_wifi_migration() -> String {
    read(&Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/migrations/wifi-to-networkmanager/usr/lib/abup/migrate.d/10-wifi-to-networkmanager"))
}

/// The keyfile as NetworkManager's own parser reads it (`nmcli --offline`
/// prints the connection it parsed); fails if NetworkManager refuses it.
fn nmcli_reads(keyfile: &Path) -> String {
    let nmcli = std::env::var("ABUP_TEST_NMCLI").unwrap_or_else(|_| "nmcli".to_string());
    let out = Command::new(&nmcli)
        .args([
            "--offline",
            "connection",
            "modify",
            "connection.autoconnect-priority",
            "0",
        ])
        .stdin(fs::File::open(keyfile).unwrap())
        .output()
        .unwrap_or_else(|e| panic!("running {nmcli} (tests/run.sh provides it): {e}"));
    assert!(
        out.status.success(),
        "NetworkManager refuses {}: {}",
        keyfile.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The key=value lines of a keyfile section.
fn keyfile_section(text: &str, section: &str) -> Vec<String> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('[') {
            inside = line == format!("[{section}]");
        } else if inside && !line.is_empty() {
            out.push(line.to_string());
        }
    }
    out
}

#[test]
fn the_wifi_example_turns_legacy_json_into_networkmanager_keyfiles() {
    let env = Env::new();
    let legacy = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/migrations/wifi-to-networkmanager/legacy-config.json");
    write(
        &env.running,
        "etc/legacy/config.json",
        &read(&legacy),
        0o600,
    );
    let script = fixture_wifi_migration();
    let dir = rootfs_with_migrations(&env, "2.0.0", &[("10-wifi-to-networkmanager", &script)]);
    let bundle = env.bundle(Source::Rootfs(&dir), "2.0.0", "zstd");
    let before = env.disk.sha256_of_partition("rootA");
    let report = install_with(&env, &env.config, &bundle);
    assert_eq!(step_state(&report, "migrate"), "changed", "{report:#}");
    assert!(
        step_comment(&report, "migrate").contains("10-wifi-to-networkmanager"),
        "{report:#}"
    );
    assert_eq!(env.grubenv()["ORDER"], "B A");

    let b = env.disk.mount("rootB", false);
    let conns = b.path().join("etc/NetworkManager/system-connections");
    assert_eq!(mode_owner(&conns), (0o700, 0, 0));
    let mut names: Vec<String> = names_in(&conns).into_iter().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "Caf____Backroom_.nmconnection",
            "Guest.nmconnection",
            "Home_Network.nmconnection",
            "Legacy_Office.nmconnection"
        ],
        "one keyfile per valid network; the one with a 3-character PSK is skipped"
    );
    for n in &names {
        assert_eq!(mode_owner(&conns.join(n)), (0o600, 0, 0), "{n}");
    }
    let home = read(&conns.join("Home_Network.nmconnection"));
    let conn = keyfile_section(&home, "connection");
    assert!(conn.contains(&"id=Home Network".to_string()), "{home}");
    assert!(conn.contains(&"type=wifi".to_string()), "{home}");
    assert!(
        conn.iter().any(|l| l.starts_with("uuid=") && l.len() == 41),
        "{home}"
    );
    assert_eq!(
        keyfile_section(&home, "wifi"),
        ["mode=infrastructure", "ssid=Home Network"]
    );
    assert_eq!(
        keyfile_section(&home, "wifi-security"),
        ["key-mgmt=wpa-psk", "psk=correct horse battery"]
    );
    assert_eq!(keyfile_section(&home, "ipv4"), ["method=auto"]);

    let cafe = read(&conns.join("Caf____Backroom_.nmconnection"));
    assert_eq!(
        keyfile_section(&cafe, "wifi"),
        [
            "mode=infrastructure",
            "ssid=Café \"Backroom\"",
            "hidden=true"
        ],
        "\\u00e9 decoded to UTF-8, quotes unescaped, hidden kept"
    );
    assert_eq!(
        keyfile_section(&cafe, "wifi-security"),
        ["key-mgmt=wpa-psk", "psk=back\\\\slash-key"],
        "a backslash is escaped as GKeyFile wants"
    );
    let guest = read(&conns.join("Guest.nmconnection"));
    assert!(
        keyfile_section(&guest, "wifi-security").is_empty(),
        "an open network has no security section: {guest}"
    );
    let office = read(&conns.join("Legacy_Office.nmconnection"));
    assert!(office.contains("psk=legacy-secret-1"), "{office}");

    // NetworkManager's own keyfile parser reads every file back the same.
    let cafe_bytes: String = "Café \"Backroom\""
        .bytes()
        .map(|b| format!("{b};"))
        .collect();
    for (file, want) in [
        (
            "Home_Network.nmconnection",
            &[
                "type=wifi",
                "ssid=Home Network",
                "psk=correct horse battery",
            ][..],
        ),
        (
            "Caf____Backroom_.nmconnection",
            &[
                "hidden=true",
                &format!("ssid={cafe_bytes}"),
                "psk=back\\\\slash-key",
            ][..],
        ),
        ("Guest.nmconnection", &["ssid=Guest", "method=auto"][..]),
        (
            "Legacy_Office.nmconnection",
            &["ssid=Legacy Office", "key-mgmt=wpa-psk"][..],
        ),
    ] {
        let parsed = nmcli_reads(&conns.join(file));
        for w in want {
            assert!(
                parsed.lines().any(|l| l == *w),
                "nmcli read {file} without {w:?}:\n{parsed}"
            );
        }
        assert_eq!(
            parsed.contains("[wifi-security]"),
            file != "Guest.nmconnection",
            "{parsed}"
        );
    }
    drop(b);
    assert_eq!(
        env.disk.sha256_of_partition("rootA"),
        before,
        "the old root changed"
    );
}

/// A failing and a hanging migration: the install fails with exit 1 before
/// the flip, and the error names the migration and shows its output.
#[test]
fn a_failing_or_hanging_migration_leaves_the_boot_settings_unflipped() {
    let env = Env::new();
    data_partition(&env, &[("app/db.json", "{\"schema\": 1}\n")]);
    let data_at_start = data_tree(&env);
    let data_block = data_bytes(&env);
    let before = env.snapshot();
    let dir = rootfs_with_migrations(
        &env,
        "2.0.0",
        &[
            ("10-ok", "#!/bin/sh\necho first ran > /etc/first-ran\necho staged > \"$ABUP_DATA_STAGING/from-10\"\n"),
            (
                "20-broken",
                "#!/bin/sh\necho staged > \"$ABUP_DATA_STAGING/half-done\"\necho \"checking $ABUP_OLD_VERSION -> $ABUP_NEW_VERSION\"\necho 'cannot convert /etc/app.conf' >&2\nexit 3\n",
            ),
        ],
    );
    let bundle = env.bundle(Source::Rootfs(&dir), "2.0.0", "zstd");
    let data = env.config_with(|o| o.extra = "[data]\npartlabel = \"data\"\n".to_string());
    let run = env.abup_with(&data, &["--booted-slot", "A", "install", s(&bundle)], None);
    run.failed(
        1,
        &[
            "migrate",
            "20-broken",
            "exited with 3",
            "cannot convert /etc/app.conf",
            "-> 2.0.0",
        ],
    );
    env.assert_untouched(&before);
    assert_eq!(data_tree(&env), data_at_start, "the data changed");
    assert_eq!(
        data_bytes(&env),
        data_block,
        "the data partition's block device changed"
    );
    {
        let d = env.disk.mount("data", false);
        assert!(!d.path().join(".abup-staging").exists(), "staged data kept");
    }
    let st = env.status(Some("A"));
    assert_eq!(st["primary"], "A", "{st:#}");
    assert_ne!(st["slots"]["B"]["state"], "trying", "{st:#}");

    let config = env.config_with(|o| {
        o.extra = "[data]\npartlabel = \"data\"\n[migrate]\ntimeout_secs = 2\n".to_string()
    });
    let long = sleep_secs(0);
    let dir = rootfs_with_migrations(
        &env,
        "2.0.1",
        &[(
            "10-hangs",
            &format!("#!/bin/sh\necho waiting forever\necho half > \"$ABUP_DATA_STAGING/half\"\nsleep {long} &\nsleep {long}\n"),
        )],
    );
    let bundle = env.bundle(Source::Rootfs(&dir), "2.0.1", "zstd");
    let start = std::time::Instant::now();
    let run = env.abup_with(
        &config,
        &["--booted-slot", "A", "install", s(&bundle)],
        None,
    );
    run.failed(1, &["10-hangs", "time limit of 2 s", "waiting forever"]);
    assert!(
        start.elapsed().as_secs() < 60,
        "the time limit did not stop it"
    );
    env.assert_untouched(&before);
    assert_eq!(
        sleepers(long),
        0,
        "the migration's processes were not all killed"
    );
    assert_eq!(data_tree(&env), data_at_start, "the data changed");
    assert_eq!(
        data_bytes(&env),
        data_block,
        "a hanging migration changed the data partition's block device"
    );
}

/// What a migration may not do: write the old root or the live data, make
/// device nodes, mount, or see the host.
#[test]
fn a_migration_is_confined_to_the_new_root_and_the_staging_area() {
    let env = Env::new();
    data_partition(&env, &[("app/db.json", "{\"schema\": 1}\n")]);
    let host_marker = env.root.join("host-only-marker");
    fs::write(&host_marker, "host\n").unwrap();
    let probe = format!(
        r#"#!/bin/sh
try() {{ if "$@" 2>/dev/null; then echo "ALLOWED $*"; else echo "denied $*"; fi; }}
{{
try touch "$ABUP_OLD_ROOT/etc/pwned"
try touch "$ABUP_DATA/pwned"
try mknod /dev/sdz b 8 0
try mount -t tmpfs none /mnt
try cat {marker}
try ls /proc/1/root
try touch "$ABUP_DATA_STAGING/staged-ok"
try touch /etc/new-root-ok
echo "old=$ABUP_OLD_ROOT data=$ABUP_DATA staging=$ABUP_DATA_STAGING new=$ABUP_NEW_ROOT slot=$ABUP_TARGET_SLOT"
}} > /etc/probe.txt
"#,
        marker = s(&host_marker)
    );
    let dir = rootfs_with_migrations(&env, "2.0.0", &[("10-probe", &probe)]);
    fs::create_dir_all(dir.join("mnt")).unwrap();
    let bundle = env.bundle(Source::Rootfs(&dir), "2.0.0", "zstd");
    let config = env.config_with(|o| o.extra = "[data]\npartlabel = \"data\"\n".to_string());
    let run = env.abup_with(
        &config,
        &["--json", "--booted-slot", "A", "install", s(&bundle)],
        None,
    );
    run.ok();
    let b = env.disk.mount("rootB", false);
    let probe = read(&b.path().join("etc/probe.txt"));
    for line in probe
        .lines()
        .filter(|l| l.starts_with("ALLOWED") || l.starts_with("denied"))
    {
        let allowed = line.starts_with("ALLOWED");
        let should = line.contains("staging-ok")
            || line.contains("staged-ok")
            || line.contains("new-root-ok");
        assert_eq!(allowed, should, "{line}\n{probe}");
    }
    assert_eq!(
        probe.lines().filter(|l| l.starts_with("denied")).count(),
        6,
        "{probe}"
    );
    assert!(
        probe.contains("old=/run/abup/old-root data=/run/abup/data staging=/run/abup/data-staging new=/ slot=B"),
        "{probe}"
    );
    assert!(!env.running.join("etc/pwned").exists());
    drop(b);
    assert_eq!(fs::read_to_string(&host_marker).unwrap(), "host\n");
    // The staged file waits on the data partition; the live data is as it was
    // apart from the staging area.
    let d = env.disk.mount("data", false);
    assert!(!d.path().join("pwned").exists());
    assert!(d.path().join(".abup-staging/B/staged-ok").exists());
    assert_eq!(read(&d.path().join("app/db.json")), "{\"schema\": 1}\n");
}

/// Data staged by the new slot's migration: invisible to the old slot until
/// `mark-good` of the new slot commits it; discarded when the bootloader
/// falls back, leaving the old slot's data as it left it.
#[test]
fn staged_data_is_committed_on_mark_good_and_discarded_on_fallback() {
    let migration = r#"#!/bin/sh
set -e
mkdir -p "$ABUP_DATA_STAGING/app"
sed 's/"schema": 1/"schema": 2/' "$ABUP_DATA/app/db.json" > "$ABUP_DATA_STAGING/app/db.json"
echo "converted to schema 2"
"#;
    // After a fallback, the first abup run of any kind on the old slot
    // discards: `status` (as a boot unit may run it), `mark-good`, an
    // install.
    for first_run in [None, Some("status"), Some("mark-good"), Some("install")] {
        let env = Env::new();
        data_partition(
            &env,
            &[
                ("app/db.json", "{\"schema\": 1}\n"),
                ("app/uploads/a.bin", "A\n"),
                ("keep.txt", "untouched\n"),
            ],
        );
        let data_at_start = data_tree(&env);
        let config = env.config_with(|o| o.extra = "[data]\npartlabel = \"data\"\n".to_string());
        let dir = rootfs_with_migrations(&env, "2.0.0", &[("10-schema", migration)]);
        let bundle = env.bundle(Source::Rootfs(&dir), "2.0.0", "zstd");
        let report = install_with(&env, &config, &bundle);
        assert!(
            step_comment(&report, "migrate").contains("data staged for slot B: app"),
            "{report:#}"
        );
        let (live, staged) = {
            let d = env.disk.mount("data", false);
            (
                read(&d.path().join("app/db.json")),
                read(&d.path().join(".abup-staging/B/app/db.json")),
            )
        };
        assert_eq!(
            live, "{\"schema\": 1}\n",
            "the live data changed before mark-good"
        );
        assert_eq!(staged, "{\"schema\": 2}\n");
        let st = env.abup_with(&config, &["--json", "--booted-slot", "A", "status"], None);
        st.ok();
        let st = st.json();
        assert_eq!(st["pending_data"]["slot"], "B", "{st:#}");
        assert_eq!(st["pending_data"]["entries"][0], "app", "{st:#}");
        let text = env.abup_with(&config, &["--booted-slot", "A", "status"], None);
        assert!(text.stdout.contains("staged data: for slot B"), "{text}");

        let Some(first_run) = first_run else {
            // The new slot boots and is blessed.
            let run = env.abup_with(&config, &["--booted-slot", "B", "mark-good"], None);
            run.ok();
            assert!(run.stdout.contains("committed"), "{run}");
            let d = env.disk.mount("data", false);
            assert_eq!(read(&d.path().join("app/db.json")), "{\"schema\": 2}\n");
            assert!(
                !d.path().join("app/uploads").exists(),
                "app was replaced as a whole"
            );
            assert_eq!(read(&d.path().join("keep.txt")), "untouched\n");
            assert!(!d.path().join(".abup-staging/B").exists());
            continue;
        };
        // The new slot never gets blessed: its tries run out and GRUB falls
        // back to A (as grub.cfg does), then abup runs on A.
        {
            let d = env.disk.mount("data", false);
            assert!(d.path().join(".abup-staging/B").exists());
        }
        set_grubenv(&env, &[("ORDER", "B A"), ("B_OK", "0"), ("B_TRY", "3")]);
        let said = match first_run {
            "status" => {
                let st = env.abup_with(&config, &["--json", "--booted-slot", "A", "status"], None);
                st.ok();
                assert!(st.json()["pending_data"].is_null(), "{st}");
                st.stderr.clone()
            }
            "mark-good" => {
                let run = env.abup_with(&config, &["--booted-slot", "A", "mark-good"], None);
                run.ok();
                run.stdout.clone()
            }
            _ => {
                let report = install_with(&env, &config, &env.simple_bundle("3.0.0"));
                step_comment(&report, "inspect-system").to_string()
            }
        };
        assert!(
            said.contains(
                "discarded the data staged by version 2.0.0 for slot B (the bootloader fell back from it)"
            ),
            "{first_run}: {said}"
        );
        let d = env.disk.mount("data", false);
        assert_eq!(read(&d.path().join("app/db.json")), "{\"schema\": 1}\n");
        assert_eq!(read(&d.path().join("app/uploads/a.bin")), "A\n");
        assert!(!d.path().join(".abup-staging/B").exists());
        drop(d);
        assert_eq!(
            data_tree(&env),
            data_at_start,
            "{first_run}: the old slot's data changed"
        );
        let st = env.abup_with(&config, &["--json", "--booted-slot", "A", "status"], None);
        assert!(st.json()["pending_data"].is_null(), "{st}");
        assert!(!st.stderr.contains("discarded"), "{st}");
    }
}

/// Every kind of bad input, with a data partition configured and an image
/// whose migrations stage data: a clear error, nothing flipped, and the
/// booted slot, the boot settings and the data partition's block device
/// byte-identical.
#[test]
fn bad_input_leaves_the_booted_slot_and_the_data_partition_byte_identical() {
    let env = Env::new();
    data_partition(&env, &[("app/db.json", "{\"schema\": 1}\n")]);
    let data_block = data_bytes(&env);
    let before = env.snapshot();
    let stage = "#!/bin/sh\nset -e\necho v2 > \"$ABUP_DATA_STAGING/db\"\n";
    let dir = rootfs_with_migrations(&env, "2.0.0", &[("10-stage", stage)]);
    let good_image = env.bundle(Source::Rootfs(&dir), "2.0.0", "zstd");
    let with_rules = |rules: &str| {
        env.config_with(|o| {
            o.preserve = vec![];
            o.extra = format!("[data]\npartlabel = \"data\"\n{rules}");
        })
    };
    let check = |what: &str, config: &Path, bundle: &Path, code: i32, needles: &[&str]| {
        let run = env.abup_with(config, &["--booted-slot", "A", "install", s(bundle)], None);
        run.failed(code, needles);
        env.assert_untouched(&before);
        assert_eq!(
            data_bytes(&env),
            data_block,
            "{what}: the data partition's block device changed"
        );
        let st = env.status(Some("A"));
        assert_eq!(st["primary"], "A", "{what}: {st:#}");
        assert!(st["pending_data"].is_null(), "{what}: {st:#}");
    };

    // A rule with `..`.
    let config = with_rules("[[preserve.rule]]\npath = \"/etc/../etc/shadow\"\n");
    check(
        "rule with ..",
        &config,
        &good_image,
        3,
        &["preserve.rule", "'..'"],
    );

    // A symlink out of the old root.
    let hostname = env.running.join("etc/hostname");
    let saved = read(&hostname);
    fs::remove_file(&hostname).unwrap();
    symlink("../../../../../../../../../../etc/passwd", &hostname).unwrap();
    let config =
        with_rules("[[preserve.rule]]\npath = \"/etc/hostname\"\nsymlinks = \"resolve\"\n");
    check(
        "old-root symlink out",
        &config,
        &good_image,
        1,
        &["/etc/hostname", "leads outside the old root"],
    );
    fs::remove_file(&hostname).unwrap();
    fs::write(&hostname, saved).unwrap();

    // A symlink out of the new root, in an image that would stage data.
    let dir = rootfs_with_migrations(&env, "2.0.0", &[("10-stage", stage)]);
    fs::remove_dir_all(dir.join("etc")).unwrap();
    symlink("../../../../../../../../../../tmp", dir.join("etc")).unwrap();
    let escaping = env.bundle(Source::Rootfs(&dir), "2.0.0", "zstd");
    let config = with_rules("[[preserve.rule]]\npath = \"/etc/ssh/ssh_host_ed25519_key\"\n");
    check(
        "new-root symlink out",
        &config,
        &escaping,
        1,
        &["preserve", "leads outside the new root"],
    );

    // Migrations writing where they may not, after staging data: the live
    // data, the old root, a device node.
    let config = with_rules("");
    for (name, body, needle) in [
        (
            "20-writes-live-data",
            "echo pwned > \"$ABUP_DATA/app/db.json\"",
            "Read-only file system",
        ),
        (
            "20-writes-old-root",
            "touch \"$ABUP_OLD_ROOT/etc/pwned\"",
            "Read-only file system",
        ),
        ("20-makes-a-disk-node", "mknod /dev/sdz b 8 0", "mknod"),
    ] {
        let script = format!("#!/bin/sh\nset -e\n{body}\necho not reached\n");
        let dir = rootfs_with_migrations(&env, "2.0.0", &[("10-stage", stage), (name, &script)]);
        let bundle = env.bundle(Source::Rootfs(&dir), "2.0.0", "zstd");
        check(
            name,
            &config,
            &bundle,
            1,
            &["migrate", name, "exited with", needle],
        );
        assert!(!env.running.join("etc/pwned").exists());
    }

    // The same image without the bad input stages its data: the checks
    // above could have seen a change.
    install_with(&env, &config, &good_image);
    assert_ne!(data_bytes(&env), data_block, "staging wrote nothing");
}

/// A data partition the running system has mounted read-write (as at
/// /data): abup mounts it again and writes nothing through it until the
/// migrations succeeded. A failing migration leaves every path, inode, mode,
/// owner, size, mtime and ctime as it was; a succeeding one stages beside
/// the live data.
#[test]
fn a_data_partition_the_running_system_has_mounted_keeps_its_tree() {
    let env = Env::builder().sector(4096).kernel_partitions().build();
    let node = env.disk.kernel_node(env.disk.part("data").number);
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "data"])
        .arg(&node));
    let live = Mount::ext4(&node, true);
    write(live.path(), "app/db.json", "{\"schema\": 1}\n", 0o600);
    xattr::set(live.path().join("app/db.json"), "user.kept", b"1").unwrap();
    sh(&mut Command::new("sync"));
    let tree_at_start = tree_strict(live.path());
    let before = env.snapshot();
    let config = data_config(&env);
    let dir = rootfs_with_migrations(
        &env,
        "2.0.0",
        &[
            (
                "10-stage",
                "#!/bin/sh\necho v2 > \"$ABUP_DATA_STAGING/db\"\n",
            ),
            (
                "20-fails",
                "#!/bin/sh\necho 'no space for the index' >&2\nexit 4\n",
            ),
        ],
    );
    let bundle = env.bundle(Source::Rootfs(&dir), "2.0.0", "zstd");
    let run = env.abup_with(
        &config,
        &["--booted-slot", "A", "install", s(&bundle)],
        None,
    );
    run.failed(1, &["20-fails", "exited with 4", "no space for the index"]);
    env.assert_untouched(&before);
    assert_eq!(
        tree_strict(live.path()),
        tree_at_start,
        "the mounted data partition changed"
    );

    let dir = rootfs_with_migrations(
        &env,
        "2.0.0",
        &[(
            "10-stage",
            "#!/bin/sh\nset -e\ntest \"$(cat $ABUP_DATA/app/db.json)\" = '{\"schema\": 1}'\necho v2 > \"$ABUP_DATA_STAGING/db\"\n",
        )],
    );
    let bundle = env.bundle(Source::Rootfs(&dir), "2.0.0", "zstd");
    let report = install_with(&env, &config, &bundle);
    assert!(
        step_comment(&report, "migrate").contains("data staged for slot B: db"),
        "{report:#}"
    );
    assert_eq!(read(&live.path().join(".abup-staging/B/db")), "v2\n");
    assert_eq!(read(&live.path().join("app/db.json")), "{\"schema\": 1}\n");
}

/// A `sleep` duration no other test process uses (other test runs on the
/// machine run the same migrations): the `ps` checks count only ours.
fn sleep_secs(n: u32) -> u32 {
    1_000_000 + (std::process::id() % 100_000) * 10 + n
}

/// How many processes run `sleep <secs>` on the machine.
fn sleepers(secs: u32) -> usize {
    let out = sh(Command::new("ps").args(["-eo", "args"]));
    out.lines()
        .filter(|l| l.trim() == format!("sleep {secs}"))
        .count()
}

/// The time limit kills everything a migration started, also processes
/// that left its process group and session (`setsid`), and a migration that
/// succeeds leaves nothing running behind it.
#[test]
fn the_time_limit_kills_what_a_migration_started_even_in_a_new_session() {
    let env = Env::new();
    let config = env.config_with(|o| o.extra = "[migrate]\ntimeout_secs = 2\n".to_string());
    let (a, b, c, d) = (sleep_secs(1), sleep_secs(2), sleep_secs(3), sleep_secs(4));
    let dir = rootfs_with_migrations(
        &env,
        "2.0.0",
        &[(
            "10-hangs",
            &format!("#!/bin/sh\nsetsid sleep {b} &\n( setsid sh -c 'sleep {c} & sleep {c}' & )\necho spawned\nsleep {a}\n"),
        )],
    );
    let bundle = env.bundle(Source::Rootfs(&dir), "2.0.0", "zstd");
    let before = env.snapshot();
    let run = env.abup_with(
        &config,
        &["--booted-slot", "A", "install", s(&bundle)],
        None,
    );
    run.failed(1, &["10-hangs", "time limit of 2 s", "spawned"]);
    env.assert_untouched(&before);
    for secs in [a, b, c] {
        assert_eq!(sleepers(secs), 0, "`sleep {secs}` outlived the time limit");
    }

    // A migration that succeeds while a detached process still runs.
    let dir = rootfs_with_migrations(
        &env,
        "2.0.1",
        &[(
            "10-detaches",
            &format!("#!/bin/sh\nsetsid sleep {d} &\necho detached > /etc/detached\n"),
        )],
    );
    let bundle = env.bundle(Source::Rootfs(&dir), "2.0.1", "zstd");
    install_with(&env, &config, &bundle);
    assert_eq!(sleepers(d), 0, "a detached process outlived its migration");
}

/// Staged data waits for the slot it was staged for: `status` and other
/// runs before the reboot, or before `mark-active` of a slot installed with
/// `--no-activate`, keep it.
#[test]
fn staged_data_waits_for_its_slot_until_it_falls_back() {
    let env = Env::new();
    data_partition(&env, &[("app/db.json", "{\"schema\": 1}\n")]);
    let config = data_config(&env);
    let dir = rootfs_with_migrations(
        &env,
        "2.0.0",
        &[(
            "10-schema",
            "#!/bin/sh\necho '{\"schema\": 2}' > \"$ABUP_DATA_STAGING/db.json\"\n",
        )],
    );
    let bundle = env.bundle(Source::Rootfs(&dir), "2.0.0", "zstd");
    let run = env.abup_with(
        &config,
        &["--booted-slot", "A", "install", "--no-activate", s(&bundle)],
        None,
    );
    run.ok();
    for _ in 0..2 {
        let st = env.abup_with(&config, &["--json", "--booted-slot", "A", "status"], None);
        st.ok();
        assert_eq!(st.json()["pending_data"]["slot"], "B", "{st}");
        assert!(!st.stderr.contains("discarded"), "{st}");
    }
    // Activated, and before the reboot: still waiting.
    env.abup_with(&config, &["--booted-slot", "A", "mark-active", "B"], None)
        .ok();
    let st = env.abup_with(&config, &["--json", "--booted-slot", "A", "status"], None);
    assert_eq!(st.json()["pending_data"]["slot"], "B", "{st}");
    let text = env.abup_with(&config, &["--booted-slot", "A", "status"], None);
    assert!(
        text.stdout
            .contains("staged data: for slot B (version 2.0.0): db.json"),
        "{text}"
    );
    // B boots and is blessed.
    let run = env.abup_with(&config, &["--booted-slot", "B", "mark-good"], None);
    run.ok();
    assert!(run.stdout.contains("committed"), "{run}");
    let d = env.disk.mount("data", false);
    assert_eq!(read(&d.path().join("db.json")), "{\"schema\": 2}\n");
}
