//! Boot files on the shared boot partition (issue 8): updated with the
//! rootfs as one transaction, protected files left alone, space checked
//! before any write, every fail point killed with SIGKILL and recovered,
//! errors undone at once, and the files following the slot that boots
//! after a fallback — on ext4 (the partition also holding the grubenv) and
//! on FAT (unmounted, through mtools, beside the U-Boot environment).

use crate::util::*;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fs {
    Ext4,
    Fat,
}

/// Files abup or the bootloader keep on the partition, not boot files.
fn ignored(path: &str) -> bool {
    path.starts_with("abup-boot/")
        || path.starts_with("grub/")
        || path.starts_with("lost+found/")
        || path == "uboot.env"
        || path == "uboot-redund.env"
}

type Files = BTreeMap<String, Vec<u8>>;

fn files(set: &[(&str, &str)]) -> Files {
    set.iter()
        .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
        .collect()
}

/// The files the device ships with (slot A's, before abup managed them).
const FACTORY: &[(&str, &str)] = &[
    ("kernel.img", "kernel 1\n"),
    ("dtbs/board.dtb", "dtb 1\n"),
    ("config.txt", "edited on the device\n"),
    ("unmanaged.bin", "not in any bundle\n"),
];

/// The boot files of bundle 2.0.0.
const V2: &[(&str, &str)] = &[
    ("kernel.img", "kernel 2\n"),
    ("dtbs/board.dtb", "dtb 2\n"),
    ("overlays/new.dtbo", "overlay 2\n"),
    ("config.txt", "vendor default\n"),
    ("cmdline.txt", "root=PARTLABEL=rootB\n"),
];

/// The boot files of bundle 3.0.0: one changed, one removed.
const V3: &[(&str, &str)] = &[
    ("kernel.img", "kernel 3\n"),
    ("dtbs/board.dtb", "dtb 2\n"),
    ("config.txt", "vendor default\n"),
    ("cmdline.txt", "root=PARTLABEL=rootA\n"),
];

/// What the partition must hold with `set` live (protected config.txt and
/// the unmanaged file stay as the device had them).
fn expected(set: &[(&str, &str)]) -> Files {
    let mut f = files(set);
    f.insert("config.txt".into(), b"edited on the device\n".to_vec());
    f.insert("unmanaged.bin".into(), b"not in any bundle\n".to_vec());
    f
}

struct World {
    env: Env,
    fs: Fs,
}

impl World {
    fn new(fs: Fs) -> World {
        let env = match fs {
            Fs::Ext4 => Env::builder().grub(GrubLoc::Partition).build(),
            Fs::Fat => Env::builder().uboot(UbootLoc::FatRedundant).build(),
        };
        let w = World { env, fs };
        for (p, c) in FACTORY {
            w.put(p, c.as_bytes());
        }
        let cfg = w.env.config_with(|o| {
            o.extra = "[boot_files]\npartlabel = \"boot\"\nprotected = [\"config.txt\"]\n".into();
        });
        fs::copy(&cfg, &w.env.config).unwrap();
        w
    }

    /// Writes a file onto the boot partition from outside abup.
    fn put(&self, rel: &str, data: &[u8]) {
        match self.fs {
            Fs::Ext4 => {
                let m = self.env.disk.mount("boot", true);
                let p = m.path().join(rel);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(p, data).unwrap();
            }
            Fs::Fat => {
                let lo = self.env.disk.attach("boot", false);
                let src = self.env.path("put");
                fs::write(&src, data).unwrap();
                if let Some((dir, _)) = rel.rsplit_once('/') {
                    let _ = mtools("mmd", lo.path(), &[&format!("::/{dir}")]);
                }
                mtools("mcopy", lo.path(), &["-o", s(&src), &format!("::/{rel}")]).unwrap();
                sh(Command::new("blockdev").arg("--flushbufs").arg(lo.path()));
            }
        }
    }

    /// Every boot file on the partition, by path.
    fn boot_files(&self) -> Files {
        self.all_files()
            .into_iter()
            .filter(|(p, _)| !ignored(p))
            .collect()
    }

    /// Every file on the partition, abup's own included.
    fn all_files(&self) -> Files {
        let mut out = Files::new();
        match self.fs {
            Fs::Ext4 => {
                let m = self.env.disk.mount("boot", false);
                walk(m.path(), m.path(), &mut out);
            }
            Fs::Fat => {
                let lo = self.env.disk.attach("boot", true);
                sh(Command::new("blockdev").arg("--flushbufs").arg(lo.path()));
                let list = mtools("mdir", lo.path(), &["-/", "-b", "::/"]).unwrap();
                for line in String::from_utf8_lossy(&list).lines() {
                    let Some(rel) = line.strip_prefix("::/") else {
                        continue;
                    };
                    if rel.is_empty() || rel.ends_with('/') {
                        continue;
                    }
                    let data = mtools("mcopy", lo.path(), &[line, "-"]).unwrap();
                    out.insert(rel.to_string(), data);
                }
            }
        }
        out
    }

    fn bundle(&self, version: &str, set: &[(&str, &str)]) -> PathBuf {
        let dir = self.env.path("boot-files");
        for (p, c) in set {
            write(&dir, p, c, 0o644);
        }
        self.bundle_from(version, &dir)
    }

    fn bundle_from(&self, version: &str, boot: &Path) -> PathBuf {
        let out = self.env.path("bundle.abup");
        self.create(version, boot, &out).ok();
        out
    }

    /// `abup bundle create` with boot files, signed.
    fn create(&self, version: &str, boot: &Path, out: &Path) -> Run {
        let root = self.env.path("rootfs");
        simple_rootfs(&root, version);
        write(&root, "boot/vmlinuz", "test kernel\n", 0o644);
        run_abup(
            &strings(&[
                "bundle",
                "create",
                "--rootfs",
                s(&root),
                "--boot-files",
                s(boot),
                "--version",
                version,
                "--compatible",
                COMPATIBLE,
                "--key",
                s(&self.env.secret),
                "-o",
                s(out),
            ]),
            None,
        )
    }

    fn primary(&self, booted: &str) -> String {
        let st = self.env.status(Some(booted));
        st["primary"].as_str().unwrap_or("none").to_string()
    }

    /// Makes the bootloader give up on `slot`, as after failed boots.
    fn give_up_on(&self, slot: &str) {
        match self.fs {
            Fs::Ext4 => self.env.grub_set(&[&format!("{slot}_TRY=3")]),
            Fs::Fat => fw_setenv(
                &self.env.disk,
                &self.env.root,
                UbootLoc::FatRedundant,
                &format!("BOOT_{slot}_LEFT"),
                "0",
            ),
        }
    }

    fn install_armed(
        &self,
        booted: &str,
        bundle: &Path,
        failpoints: &str,
    ) -> (Option<i32>, Option<i32>, String) {
        let out = Command::new(abup_bin())
            .args([
                "--config",
                s(&self.env.config),
                "--json",
                "--booted-slot",
                booted,
            ])
            .args(["install", s(bundle)])
            .env("ABUP_FAILPOINTS", failpoints)
            .env_remove("ABUP_CONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("running abup");
        (
            out.status.code(),
            out.status.signal(),
            format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Files) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        if e.file_type().unwrap().is_dir() {
            walk(root, &p, out);
        } else {
            out.insert(rel, fs::read(&p).unwrap());
        }
    }
}

fn mtools(tool: &str, dev: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new(tool)
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(dev)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    match out.status.success() {
        true => Ok(out.stdout),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[track_caller]
fn assert_files(got: &Files, want: &Files, what: &str) {
    let show = |f: &Files| {
        f.iter()
            .map(|(p, c)| format!("  {p}: {:?}", String::from_utf8_lossy(c)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        got == want,
        "{what}:\ngot:\n{}\nwant:\n{}",
        show(got),
        show(want)
    );
}

/// Update with the rootfs, protected file untouched, status shows the
/// pairs, a `rollback` and a bootloader fallback each restore the set of
/// the slot that boots.
fn updates_and_follows_fallbacks(fs: Fs) {
    let w = World::new(fs);
    let v2 = w.bundle("2.0.0", V2);
    // `check` looks at the boot partition's free space and writes nothing.
    let boot_before = w.env.disk.sha256_of_partition("boot");
    let run = w.env.abup(&["--booted-slot", "A", "check", s(&v2)]);
    run.ok();
    assert!(
        run.stdout.contains("boot files fit the boot partition"),
        "{run}"
    );
    assert_eq!(w.env.disk.sha256_of_partition("boot"), boot_before);
    let report = w.env.install_ok("A", &v2, &[]);
    assert!(
        step_comment(&report, "boot-files").contains("boot files changed"),
        "{report}"
    );
    assert_files(&w.boot_files(), &expected(V2), "after installing 2.0.0");
    assert_eq!(w.primary("A"), "B");
    let st = w.env.status(Some("A"));
    assert_eq!(st["boot_files"]["live"], "B", "{st}");
    assert_eq!(st["boot_files"]["sets"]["B"]["version"], "2.0.0", "{st}");
    assert_eq!(st["boot_files"]["sets"]["A"]["version"], "", "{st}");
    assert_eq!(st["boot_files"]["interrupted"], false, "{st}");
    let text = w.env.abup(&["--booted-slot", "A", "status"]);
    text.ok();
    assert!(text.stdout.contains("boot files: slot B's"), "{text}");

    // The bootloader gives up on B: the next run on A restores A's set.
    w.give_up_on("B");
    let st = w.env.status(Some("A"));
    assert_eq!(st["primary"], "A", "{st}");
    assert_eq!(st["boot_files"]["live"], "A", "{st}");
    assert_eq!(st["last_run"]["command"], "install", "{st}");
    assert_files(&w.boot_files(), &expected(FACTORY), "after the fallback");

    // Back to B by hand: its set is kept, so it comes back too.
    w.env.abup(&["--booted-slot", "A", "mark-active", "B"]).ok();
    assert_files(&w.boot_files(), &expected(V2), "after mark-active B");

    // B boots and is blessed; `rollback` from it returns to A's files.
    w.env.abup(&["--booted-slot", "B", "mark-good"]).ok();
    let rb = w.env.abup(&["--booted-slot", "B", "rollback"]);
    rb.ok();
    assert!(rb.stdout.contains("boot files are back"), "{rb}");
    assert_eq!(w.primary("B"), "A");
    assert_files(&w.boot_files(), &expected(FACTORY), "after rollback");
    let r = w.env.abup(&["--booted-slot", "B", "recover"]);
    r.ok();
    assert!(r.stdout.contains("nothing to recover"), "{r}");
}

/// Installs 2.0.0 into B and boots it, so the crash matrix runs 3.0.0 from
/// a managed set (with a removal).
fn world_on_v2(fs: Fs) -> World {
    let w = World::new(fs);
    let v2 = w.bundle("2.0.0", V2);
    w.env.install_ok("A", &v2, &[]);
    w.env.abup(&["--booted-slot", "B", "mark-good"]).ok();
    assert_files(&w.boot_files(), &expected(V2), "2.0.0 installed");
    w
}

/// Every boot-file fail point, with the hit that matters.
const POINTS: &[&str] = &[
    "bootfiles:journal-stage",
    "bootfiles:write",
    "bootfiles:write@2",
    "bootfiles:journal-switch",
    "bootfiles:backup",
    "bootfiles:rename",
    "bootfiles:backup@2",
    "bootfiles:rename@2",
    "bootfiles:remove",
    "bootfiles:record",
    "bootfiles:journal-clear",
    "bootfiles:done",
];

fn crash_matrix(fs: Fs) {
    let w = world_on_v2(fs);
    let v3 = w.bundle("3.0.0", V3);
    let old = expected(V2);
    let new = expected(V3);
    for point in POINTS {
        let (name, nth) = point.split_once('@').unwrap_or((point, "1"));
        let (code, signal, out) = w.install_armed("B", &v3, &format!("{name}=kill@{nth}"));
        assert_eq!(
            signal,
            Some(9),
            "{point}: abup was not killed ({code:?}):\n{out}"
        );
        // Every file is wholly its old or its new content.
        let now = w.boot_files();
        for path in old.keys().chain(new.keys()) {
            let got = now.get(path);
            assert!(
                got == old.get(path) || got == new.get(path),
                "{point}: {path} is neither old nor new: {:?}",
                got.map(|c| String::from_utf8_lossy(c).into_owned())
            );
        }
        // The next run of any kind finishes or undoes the transaction; the
        // flip never happened, so B (whose set is 2.0.0) still boots.
        let st = w.env.status(Some("B"));
        assert_eq!(st["primary"], "B", "{point}: {st}");
        assert_eq!(st["boot_files"]["live"], "B", "{point}: {st}");
        assert_eq!(st["boot_files"]["interrupted"], false, "{point}: {st}");
        assert_files(
            &w.boot_files(),
            &old,
            &format!("{point}: after the next run"),
        );
        let left: Vec<String> = w
            .all_files()
            .into_keys()
            .filter(|p| p.ends_with(".abup-new") || p == "abup-boot/journal.json")
            .collect();
        assert!(left.is_empty(), "{point}: left behind: {left:?}");
    }
    // And a plain install then completes.
    w.env.install_ok("B", &v3, &[]);
    assert_files(&w.boot_files(), &new, "3.0.0 installed after the crashes");
    assert_eq!(w.primary("B"), "A");
}

/// A crash left without a following run is found by `abup recover`.
fn recover_verb_and_error_undo(fs: Fs) {
    let w = world_on_v2(fs);
    let v3 = w.bundle("3.0.0", V3);
    let (_, signal, out) = w.install_armed("B", &v3, "bootfiles:rename=kill@2");
    assert_eq!(signal, Some(9), "{out}");
    assert!(w.all_files().contains_key("abup-boot/journal.json"));
    let r = w.env.abup(&["--booted-slot", "B", "recover"]);
    r.ok();
    assert!(
        r.stdout.contains("undid an interrupted boot-files update"),
        "{r}"
    );
    assert_files(&w.boot_files(), &expected(V2), "after recover");

    // A journal cut off while it was written (FAT has no atomic rename; a
    // power cut there): no live file had changed, the staged ones go.
    let (_, signal, out) = w.install_armed("B", &v3, "bootfiles:journal-switch=kill");
    assert_eq!(signal, Some(9), "{out}");
    let all = w.all_files();
    assert!(all.keys().any(|p| p.ends_with(".abup-new")), "{all:?}");
    let journal = &all["abup-boot/journal.json"];
    w.put("abup-boot/journal.json", &journal[..journal.len() / 2]);
    let r = w.env.abup(&["--booted-slot", "B", "recover"]);
    r.ok();
    assert!(r.stdout.contains("cut off while it began"), "{r}");
    let left: Vec<String> = w
        .all_files()
        .into_keys()
        .filter(|p| p.ends_with(".abup-new") || p.starts_with("abup-boot/journal"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_files(&w.boot_files(), &expected(V2), "after a torn journal");

    // Killed while undoing after an error: the next run undoes the rest.
    let (_, signal, out) =
        w.install_armed("B", &v3, "bootfiles:rename=eio@2,bootfiles:undo=kill@2");
    assert_eq!(signal, Some(9), "{out}");
    let st = w.env.status(Some("B"));
    assert_eq!(st["boot_files"]["interrupted"], false, "{st}");
    assert_files(&w.boot_files(), &expected(V2), "after a kill while undoing");

    // An I/O error in the step puts the old set back at once.
    let (code, _, out) = w.install_armed("B", &v3, "bootfiles:rename=eio@2");
    assert_ne!(code, Some(0), "{out}");
    assert!(
        out.contains("the previous boot files were put back"),
        "{out}"
    );
    assert!(!w.all_files().contains_key("abup-boot/journal.json"));
    assert_files(&w.boot_files(), &expected(V2), "after an I/O error");
    assert_eq!(w.primary("B"), "B");
}

fn out_of_space_refused(fs: Fs) {
    let w = World::new(fs);
    let dir = w.env.path("big-boot");
    write(&dir, "kernel.img", "k\n", 0o644);
    let f = fs::File::create(dir.join("huge.bin")).unwrap();
    f.set_len((BOOT_MIB + 4) * MIB).unwrap();
    let bundle = w.bundle_from("2.0.0", &dir);
    let before = w.env.snapshot();
    let slot_b = w.env.disk.sha256_of_partition("rootB");
    let files_before = w.all_files();
    let run = w.env.abup(&["--booted-slot", "A", "install", s(&bundle)]);
    let err = run.failed(3, &["boot partition has", "bytes free"]);
    assert!(err.contains("free space on it"), "{err}");
    w.env.assert_untouched(&before);
    assert_eq!(
        w.env.disk.sha256_of_partition("rootB"),
        slot_b,
        "slot B was written"
    );
    assert_files(
        &w.all_files(),
        &files_before,
        "the boot partition after the refusal",
    );
}

/// New files that fit, but not with the backups of the files they replace:
/// refused in the boot-files step before its first write to the partition.
fn backups_counted(fs: Fs) {
    let w = World::new(fs);
    let big = vec![7u8; 10 << 20];
    w.put("kernel.img", &big);
    let dir = w.env.path("boot-8m");
    write(&dir, "kernel.img", "", 0o644);
    fs::write(dir.join("kernel.img"), vec![8u8; 8 << 20]).unwrap();
    let bundle = w.bundle_from("2.0.0", &dir);
    let env_before = w.env.boot_env_bytes();
    let files_before = w.all_files();
    let run = w.env.abup(&["--booted-slot", "A", "install", s(&bundle)]);
    let err = run.failed(
        1,
        &["boot partition has", "backups of the files they replace"],
    );
    assert!(err.contains("boot-files"), "{err}");
    assert_files(
        &w.all_files(),
        &files_before,
        "the boot partition after the refusal",
    );
    let st = w.env.status(Some("A"));
    assert_eq!(st["primary"], "A", "{st}");
    assert!(
        w.env.boot_env_bytes() == env_before,
        "the boot settings changed"
    );
}

/// What a bootloader reads from an ext4 partition: its bytes as the disk
/// holds them, through `debugfs -c` (no journal replay, as GRUB and U-Boot).
fn bootloader_view(w: &World, rel: &str) -> Option<String> {
    let part = w.env.disk.part("boot");
    ext4_view(&w.env.disk.image, part.start, part.size, &w.env.root, rel)
}

/// The file `rel` of the ext4 filesystem at `offset..offset+size` of
/// `image`, as a bootloader reads it (no journal replay); None if missing.
pub(crate) fn ext4_view(
    image: &Path,
    offset: u64,
    size: u64,
    tmp: &Path,
    rel: &str,
) -> Option<String> {
    let copy = tmp.join("boot-view.img");
    let bytes = fs::read(image).unwrap();
    fs::write(&copy, &bytes[offset as usize..(offset + size) as usize]).unwrap();
    let out = Command::new("debugfs")
        .arg("-c")
        .arg("-R")
        .arg(format!("cat /{rel}"))
        .arg(&copy)
        .output()
        .unwrap();
    let _ = fs::remove_file(&copy);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (!String::from_utf8_lossy(&out.stderr).contains("not found")).then_some(text)
}

/// With the boot partition mounted (a running device's /boot), the new set
/// is where a bootloader reads it as soon as abup returns: the journal was
/// checkpointed, not left for the next mount to replay.
#[test]
fn ext4_boot_files_reach_the_bootloaders_view_while_mounted() {
    let w = World::new(Fs::Ext4);
    let v2 = w.bundle("2.0.0", V2);
    let boot = w.env.disk.mount("boot", true);
    w.env.install_ok("A", &v2, &[]);
    for (path, content) in V2.iter().filter(|(p, _)| *p != "config.txt") {
        assert_eq!(
            bootloader_view(&w, path).as_deref(),
            Some(*content),
            "{path} as the bootloader reads it"
        );
        assert_eq!(
            fs::read_to_string(boot.path().join(path)).unwrap(),
            *content
        );
    }
    w.env.abup(&["--booted-slot", "A", "mark-bad", "B"]).ok();
    assert_eq!(
        bootloader_view(&w, "kernel.img").as_deref(),
        Some("kernel 1\n")
    );
    assert_eq!(bootloader_view(&w, "overlays/new.dtbo"), None);
}

/// `--no-activate` keeps the new set aside; `mark-active` brings it in.
fn no_activate_keeps_the_set_for_later(fs: Fs) {
    let w = World::new(fs);
    let v2 = w.bundle("2.0.0", V2);
    let report = w.env.install_ok("A", &v2, &["--no-activate"]);
    assert!(
        step_comment(&report, "boot-files").contains("go live when slot B is activated"),
        "{report}"
    );
    assert_files(&w.boot_files(), &expected(FACTORY), "after --no-activate");
    let st = w.env.status(Some("A"));
    assert_eq!(st["boot_files"]["live"], "A", "{st}");
    assert_eq!(st["boot_files"]["sets"]["B"]["version"], "2.0.0", "{st}");
    w.env.abup(&["--booted-slot", "A", "mark-active", "B"]).ok();
    assert_files(&w.boot_files(), &expected(V2), "after mark-active B");
    w.env.abup(&["--booted-slot", "A", "mark-active", "A"]).ok();
    assert_files(&w.boot_files(), &expected(FACTORY), "after mark-active A");
}

/// Each scenario runs on ext4 and on FAT.
macro_rules! on_both {
    ($($scenario:ident: $ext4:ident, $fat:ident;)*) => {$(
        #[test]
        fn $ext4() {
            $scenario(Fs::Ext4);
        }
        #[test]
        fn $fat() {
            $scenario(Fs::Fat);
        }
    )*};
}

on_both! {
    updates_and_follows_fallbacks: ext4_boot_files_update_and_follow_fallbacks, fat_boot_files_update_and_follow_fallbacks;
    crash_matrix: ext4_boot_files_survive_sigkill_at_every_fail_point, fat_boot_files_survive_sigkill_at_every_fail_point;
    recover_verb_and_error_undo: ext4_recover_verb_and_errors_undo, fat_recover_verb_and_errors_undo;
    backups_counted: ext4_backups_count_in_the_space_check, fat_backups_count_in_the_space_check;
    out_of_space_refused: ext4_out_of_space_is_refused_before_any_write, fat_out_of_space_is_refused_before_any_write;
    no_activate_keeps_the_set_for_later: ext4_no_activate_keeps_the_boot_files_for_later, fat_no_activate_keeps_the_boot_files_for_later;
}

#[test]
fn bad_boot_files_input_is_refused_with_one_line() {
    let w = World::new(Fs::Ext4);
    let v2 = w.bundle("2.0.0", V2);
    let before = w.env.snapshot();
    let slot_b = w.env.disk.sha256_of_partition("rootB");

    // A bundle with boot files on a device whose config has none.
    let plain = w.env.config_with(|_| {});
    for verb in ["install", "check"] {
        let run = w
            .env
            .abup_with(&plain, &["--booted-slot", "A", verb, s(&v2)], None);
        run.failed(3, &["carries boot files", "[boot_files]"]);
    }

    // Config mistakes.
    for (extra, needle) in [
        (
            "[boot_files]\npartlabel = \"boot\"\nprotected = [\"../x\"]\n",
            "without '..'",
        ),
        (
            "[boot_files]\npartlabel = \"boot\"\nfilesystem = \"btrfs\"\n",
            "not one of auto, ext4, fat",
        ),
        ("[boot_files]\n", "exactly one of partlabel or partuuid"),
        ("[boot_files]\npartlabel = \"nope\"\n", "nope"),
    ] {
        let cfg = w.env.config_with(|o| o.extra = extra.into());
        let run = w
            .env
            .abup_with(&cfg, &["--booted-slot", "A", "install", s(&v2)], None);
        assert_ne!(run.code, 0, "{run}");
        assert!(run.stderr.contains(needle), "{extra}: {run}");
        assert_eq!(run.stderr.trim().lines().count(), 1, "{run}");
    }
    let cfg = w.env.config_with(|o| {
        o.extra = "[boot_files]\npartlabel = \"boot\"\nfilesystem = \"fat\"\n".into()
    });
    let run = w
        .env
        .abup_with(&cfg, &["--booted-slot", "A", "install", s(&v2)], None);
    run.failed(3, &["boot_files.filesystem says Fat"]);
    w.env.assert_untouched(&before);
    assert_eq!(w.env.disk.sha256_of_partition("rootB"), slot_b);

    // A symlink, or abup's own names, cannot go into a bundle's boot files.
    let dir = w.env.path("bad-boot");
    write(&dir, "kernel.img", "k\n", 0o644);
    std::os::unix::fs::symlink("kernel.img", dir.join("link.img")).unwrap();
    let out = w.env.path("bad.abup");
    let run = w.create("2.0.0", &dir, &out);
    assert_ne!(run.code, 0, "{run}");
    assert!(run.stderr.contains("link.img"), "{run}");
    assert!(!out.exists());
}
