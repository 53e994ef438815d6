//! Tarball payloads keep what GNU tar keeps: nanosecond times, times before
//! 1970, sparse files (old GNU and PAX sparse) with their xattrs, large
//! xattrs on a small slot, ACLs; and hostile tarballs are refused by
//! `bundle create` with the same message the installer's extractor gives.
//!
//! Input tarballs are made by the real GNU tar from trees set up with
//! `touch`, `setfattr` and `setfacl`; results are read back with `stat`,
//! `getfattr` and `getfacl` from the slot mounted read-only.

use crate::util::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Apparent size of the sparse file: larger than the whole 64 MiB slot, so
/// the install only fits if holes are not counted.
const SPARSE_SIZE: u64 = 100 * MIB;

/// Paths of the fidelity tree whose times are compared.
const TIMED: &[&str] = &[
    "etc/ns-file",
    "etc/ns-dir",
    "etc/ns-link",
    "old/1960",
    "old",
    "var/sparse",
];

/// Builds the tree: nanosecond and pre-1970 times, a sparse file with an
/// xattr, a 3000-byte xattr, a 3900-byte one, and ACLs.
fn fidelity_tree(dir: &Path) {
    simple_rootfs(dir, "2.0.0");
    write(dir, "etc/ns-file", "ns\n", 0o644);
    fs::create_dir_all(dir.join("etc/ns-dir")).unwrap();
    std::os::unix::fs::symlink("ns-file", dir.join("etc/ns-link")).unwrap();
    write(dir, "old/1960", "old\n", 0o644);
    let sparse = dir.join("var/sparse");
    fs::create_dir_all(sparse.parent().unwrap()).unwrap();
    fs::File::create(&sparse)
        .and_then(|f| f.set_len(SPARSE_SIZE))
        .unwrap();
    sh(Command::new("dd")
        .args([
            "if=/dev/urandom",
            "bs=4096",
            "count=3",
            "seek=5000",
            "conv=notrunc",
            "status=none",
        ])
        .arg(format!("of={}", s(&sparse))));
    setfattr(&sparse, "user.sparse", "holes and all");
    write(dir, "etc/big-xattr", "x\n", 0o644);
    setfattr(&dir.join("etc/big-xattr"), "user.big", &"b".repeat(3000));
    write(dir, "etc/bigger-xattr", "x\n", 0o644);
    setfattr(
        &dir.join("etc/bigger-xattr"),
        "user.bigger",
        &"c".repeat(3900),
    );
    write(dir, "etc/acl-file", "acl\n", 0o640);
    sh(Command::new("setfacl")
        .args(["-m", "u:1234:rw-,g:4321:r--"])
        .arg(dir.join("etc/acl-file")));
    fs::create_dir_all(dir.join("srv/shared")).unwrap();
    sh(Command::new("setfacl")
        .args(["-d", "-m", "u:1234:rwx"])
        .arg(dir.join("srv/shared")));
    // Times last: the writes above change directory mtimes.
    for (path, when) in [
        ("etc/ns-file", "2021-05-06 07:08:09.123456789"),
        ("etc/ns-dir", "2019-01-02 03:04:05.000000001"),
        ("old/1960", "1960-06-15 12:00:00.5"),
        ("old", "1969-12-31 23:59:59.25"),
        ("var/sparse", "2020-02-29 12:34:56.987654321"),
    ] {
        sh(Command::new("touch")
            .args(["-h", "-d", &format!("{when} UTC")])
            .arg(dir.join(path)));
    }
    sh(Command::new("touch")
        .args(["-h", "-d", "2018-03-04 05:06:07.555555555 UTC"])
        .arg(dir.join("etc/ns-link")));
}

fn setfattr(path: &Path, name: &str, value: &str) {
    sh(Command::new("setfattr")
        .args(["-n", name, "-v", value])
        .arg(path));
}

/// `stat -c FORMAT path` (not following a symlink).
fn stat(format: &str, path: &Path) -> String {
    sh(Command::new("stat")
        .env("TZ", "UTC")
        .args(["-c", format])
        .arg(path))
    .trim()
    .to_string()
}

/// `getfattr -d -m - --absolute-names` of `path`, without the header line.
fn xattrs(path: &Path) -> String {
    let out = sh(Command::new("getfattr")
        .args(["-d", "-m", "-", "-e", "hex", "--absolute-names", "-h"])
        .arg(path));
    out.lines().skip(1).collect::<Vec<_>>().join("\n")
}

/// `getfacl -n` of `path`, without the header.
fn acl(path: &Path) -> String {
    let out = sh(Command::new("getfacl")
        .args(["-n", "--absolute-names", "-c"])
        .arg(path));
    out.trim().to_string()
}

/// GNU tar of `dir` with `args` into a new file of `env`.
fn gnu_tar(env: &Env, dir: &Path, args: &[&str]) -> PathBuf {
    let out = env.path("rootfs.tar");
    sh(Command::new("tar")
        .arg("--create")
        .args(args)
        .args(["--numeric-owner", "--file"])
        .arg(&out)
        .arg("-C")
        .arg(dir)
        .arg("."));
    out
}

/// Installs a bundle of `tarball` into slot B and returns the mounted slot.
fn install_tarball(env: &Env, tarball: &Path) -> PartMount {
    let bundle = env.bundle(Source::Tarball(tarball), "2.0.0", "zstd");
    let info = run_abup(
        &["--json", "bundle", "info", s(&bundle)].map(String::from),
        None,
    );
    info.ok();
    let installed = info.json()["manifest"]["payloads"][0]["installed_size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no installed_size in {info}"));
    assert!(
        installed < SLOT_MIB * MIB / 2,
        "installed_size {installed} counts the holes"
    );
    env.install_ok("A", &bundle, &[]);
    env.disk.mount("rootB", false)
}

/// PAX (`--format=posix`): nanosecond times, pre-1970 times, PAX sparse 1.0
/// with an xattr on the same file, xattrs of 3000 and 3900 bytes on a
/// 64 MiB slot (which mke2fs alone would give 1 KiB blocks), and ACLs.
#[test]
fn posix_tarball_keeps_times_sparse_xattrs_and_acls() {
    let env = Env::new();
    let dir = env.path("rootfs");
    fidelity_tree(&dir);
    let tarball = gnu_tar(
        &env,
        &dir,
        &[
            "--format=posix",
            "--sparse",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
        ],
    );
    let slot = install_tarball(&env, &tarball);
    let root = slot.path();
    let block = sh(Command::new("stat").args(["-f", "-c", "%S"]).arg(root));
    assert_eq!(block.trim(), "4096", "ext4 block size of a 64 MiB slot");
    for path in TIMED {
        assert_eq!(
            stat("%y", &root.join(path)),
            stat("%y", &dir.join(path)),
            "mtime of {path}"
        );
    }
    assert!(stat("%y", &root.join("etc/ns-file")).contains(".123456789"));
    assert!(stat("%y", &root.join("old")).starts_with("1969-12-31 23:59:59.25"));
    let sparse = root.join("var/sparse");
    assert_eq!(sha256_file(&sparse), sha256_file(&dir.join("var/sparse")));
    assert_eq!(stat("%s", &sparse), SPARSE_SIZE.to_string());
    let blocks: u64 = stat("%b", &sparse).parse().unwrap();
    assert!(
        blocks * 512 <= 64 << 10,
        "{blocks} blocks: holes were filled"
    );
    for path in ["var/sparse", "etc/big-xattr", "etc/bigger-xattr"] {
        let got = xattrs(&root.join(path));
        assert!(got.contains("user."), "{path}: {got}");
        assert_eq!(got, xattrs(&dir.join(path)), "xattrs of {path}");
    }
    for path in ["etc/acl-file", "srv/shared"] {
        assert_eq!(acl(&root.join(path)), acl(&dir.join(path)), "ACL of {path}");
    }
    assert!(acl(&root.join("etc/acl-file")).contains("user:1234:rw-"));
    assert!(acl(&root.join("srv/shared")).contains("default:user:1234:rwx"));
}

/// GNU format: old GNU sparse, base-256 pre-1970 mtimes, whole seconds.
#[test]
fn gnu_tarball_keeps_sparse_files_and_pre_1970_times() {
    let env = Env::new();
    let dir = env.path("rootfs");
    simple_rootfs(&dir, "2.0.0");
    let sparse = dir.join("var/sparse");
    fs::create_dir_all(sparse.parent().unwrap()).unwrap();
    fs::File::create(&sparse)
        .and_then(|f| f.set_len(SPARSE_SIZE))
        .unwrap();
    sh(Command::new("dd")
        .args(["if=/dev/urandom", "bs=4096", "count=2", "seek=777"])
        .args(["conv=notrunc", "status=none"])
        .arg(format!("of={}", s(&sparse))));
    write(&dir, "old/1901", "old\n", 0o644);
    sh(Command::new("touch")
        .args(["-d", "1901-12-14 00:00:00 UTC"])
        .arg(dir.join("old/1901")));
    let tarball = gnu_tar(&env, &dir, &["--format=gnu", "--sparse"]);
    let slot = install_tarball(&env, &tarball);
    let root = slot.path();
    assert_eq!(
        stat("%y", &root.join("old/1901")),
        "1901-12-14 00:00:00.000000000 +0000"
    );
    let got = root.join("var/sparse");
    assert_eq!(sha256_file(&got), sha256_file(&sparse));
    let blocks: u64 = stat("%b", &got).parse().unwrap();
    assert!(
        blocks * 512 <= 64 << 10,
        "{blocks} blocks: holes were filled"
    );
}

/// xattrs that no 4 KiB ext4 xattr block can hold are refused at `bundle
/// create`, naming the entry and the attribute, before a bundle exists.
#[test]
fn xattrs_too_large_for_ext4_are_refused_at_create() {
    let env = Env::new();
    // The host's own filesystem may not hold such an xattr either, so the
    // PAX record is written by hand.
    let mut b = tar::Builder::new(Vec::new());
    let huge = "h".repeat(8000);
    b.append_pax_extensions([("SCHILY.xattr.user.huge", huge.as_bytes())])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path("etc/huge").unwrap();
    h.set_size(2);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    b.append(&h, &b"x\n"[..]).unwrap();
    let tarball = env.path("huge.tar");
    fs::write(&tarball, b.into_inner().unwrap()).unwrap();
    let run = create_run(&env, &tarball);
    run.failed(
        3,
        &[
            "refusing tar entry etc/huge: its xattrs need",
            "largest: user.huge, 8000 bytes",
        ],
    );
}

/// `bundle create --tarball` for `tarball`, whatever the outcome.
fn create_run(env: &Env, tarball: &Path) -> Run {
    let out = env.path("b.abup");
    let run = run_abup(
        &[
            "bundle",
            "create",
            "--tarball",
            s(tarball),
            "--version",
            "2.0.0",
            "--compatible",
            COMPATIBLE,
            "-o",
            s(&out),
        ]
        .map(String::from),
        None,
    );
    if run.code != 0 {
        assert!(
            !out.exists(),
            "a refused bundle was left at {}",
            out.display()
        );
    }
    run
}

/// One hand-made tar entry: name, type, link target, data.
type Raw<'a> = (&'a str, tar::EntryType, &'a str, &'a [u8]);

fn raw_tar(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_gnu();
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(*kind);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        h.set_mtime(1_000_000_000);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Tarballs that install would refuse only part-way (after formatting the
/// spare) are refused by `bundle create` with the installer's own message;
/// the same stream written by the installer's tar writer onto a real,
/// freshly formatted loop device fails with the same message and writes
/// nothing outside the new root.
#[test]
fn hostile_tarballs_are_refused_at_create_as_at_install() {
    use tar::EntryType as T;
    let env = Env::new();
    let outside = env.path("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("victim"), b"untouched").unwrap();
    let away = s(&outside).to_string();
    let victim = format!("{away}/victim");
    let cases: Vec<(&str, Vec<Raw<'_>>, &str)> = vec![
        (
            "write through a symlink leaving the root",
            vec![
                ("evil", T::Symlink, &away, b""),
                ("evil/victim", T::Regular, "", b"pwned"),
            ],
            "refusing tar entry evil/victim: symlink evil -> ",
        ),
        (
            "a relative symlink above the root",
            vec![
                ("up", T::Symlink, "../../../../../..", b""),
                ("up/tmp/x", T::Regular, "", b"pwned"),
            ],
            "refusing tar entry up/tmp/x: up/tmp leads outside the root",
        ),
        (
            "a directory replaced by a symlink",
            vec![
                ("etc/", T::Directory, "", b""),
                ("etc", T::Symlink, &away, b""),
            ],
            "refusing tar entry etc: etc exists and is a directory",
        ),
        (
            "a file replaced by a directory",
            vec![("f", T::Regular, "", b"x"), ("f/", T::Directory, "", b"")],
            "refusing tar entry f/: f exists and is not a directory",
        ),
        (
            "a path through a file",
            vec![("f", T::Regular, "", b"x"), ("f/g", T::Regular, "", b"x")],
            "refusing tar entry f/g: f is not a directory",
        ),
        (
            "a symlink loop",
            vec![
                ("a", T::Symlink, "b", b""),
                ("b", T::Symlink, "a", b""),
                ("a/x", T::Regular, "", b"x"),
            ],
            "too many levels of symlinks",
        ),
        (
            "a hard link through a symlink leaving the root",
            vec![
                ("evil", T::Symlink, &away, b""),
                ("hl", T::Link, "evil/victim", b""),
            ],
            "refusing tar entry hl: resolving the link target evil/victim: symlink evil -> ",
        ),
        (
            "a hard link to a file outside",
            vec![("hl", T::Link, &victim, b"")],
            "refusing tar entry hl: absolute paths are not allowed",
        ),
        (
            "a hard link to nothing",
            vec![("hl", T::Link, "nowhere", b"")],
            "refusing tar entry hl: the link target nowhere is not in the archive before the link",
        ),
        (
            "a hard link escaping with ..",
            vec![("hl", T::Link, "../victim", b"")],
            "refusing tar entry hl: it escapes the root",
        ),
        (
            "an absolute path",
            vec![(&victim, T::Regular, "", b"pwned")],
            "absolute paths are not allowed",
        ),
    ];
    let img = env.path("slot.img");
    fs::File::create(&img)
        .and_then(|f| f.set_len(32 * MIB))
        .unwrap();
    for (what, entries, want) in cases {
        let tar_bytes = raw_tar(&entries);
        let tarball = env.path("hostile.tar");
        fs::write(&tarball, &tar_bytes).unwrap();
        let run = create_run(&env, &tarball);
        let msg = run.failed(3, &[want]);
        assert!(msg.contains(want), "{what}: {msg}");

        // The installer's writer on a real loop device.
        let lo = LoopDevice::attach(&img, LoopOpts::default());
        let err = abup::write::tar::write_tar(&mut &tar_bytes[..], lo.path(), "hostile")
            .map(|(m, _)| m.unmount())
            .expect_err(what);
        let err = format!("{err:#}");
        assert!(err.contains(want), "{what}: install said {err}");
        assert_eq!(
            fs::read(outside.join("victim")).unwrap(),
            b"untouched",
            "{what}"
        );
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1, "{what}");
    }
}
