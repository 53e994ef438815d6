//! The systemd-boot backend on loopback disks: the boot partition is a FAT
//! ESP holding `loader/loader.conf` and one type #1 entry per slot. The
//! same install / mark-good / mark-bad / rollback sequence as for GRUB and
//! U-Boot runs once with the ESP unmounted (abup goes through mtools) and
//! once mounted with `fusefat` (this kernel has no vfat), systemd-boot's
//! own renames are made as it makes them, and every step is checked with
//! the real `bootctl list` (systemd 252): the entry it marks `(default)`
//! is the slot abup says boots next. Then bad ESPs: each is refused with
//! the fix and leaves the ESP and the slots as they were.

use crate::util::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How the test reaches the ESP, and how abup's config names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EspMode {
    /// Not mounted: `partlabel = "boot"`, abup uses mtools.
    Fat,
    /// Mounted with fusefat; the config names the mount (`esp = …`).
    Fuse,
    /// Mounted with fusefat naming its device (`-o fsname=`); the config
    /// names the partition, and abup must find and use the mount.
    FuseByPartition,
}

/// A fusefat mount of the boot partition, unmounted on drop (before its
/// loop device is detached). fusefat runs in the foreground as a child, so
/// that dropping waits until it has let go of the loop device.
pub struct FuseMount {
    dir: PathBuf,
    child: std::process::Child,
    _lo: LoopDevice,
}

impl FuseMount {
    pub fn new(env: &Env, dir: &Path, rw: bool, fsname: bool) -> FuseMount {
        let lo = env.disk.attach("boot", !rw);
        fs::create_dir_all(dir).unwrap();
        let mut opts = vec![if rw { "rw+" } else { "ro" }.to_string()];
        if fsname {
            opts.push(format!("fsname={}", s(lo.path())));
        }
        let child = Command::new("fusefat")
            .arg("-f")
            .arg("-o")
            .arg(opts.join(","))
            .arg(lo.path())
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting fusefat");
        let m = FuseMount {
            dir: dir.to_path_buf(),
            child,
            _lo: lo,
        };
        let canon = fs::canonicalize(dir).unwrap();
        for _ in 0..300 {
            let table = fs::read_to_string("/proc/self/mountinfo").unwrap();
            if table
                .lines()
                .any(|l| l.split(' ').nth(4) == Some(s(&canon)) && l.contains("fuse"))
            {
                return m;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("fusefat did not mount {}", dir.display());
    }
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(&self.dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.child.wait();
    }
}

/// A test world whose boot partition is a systemd-boot ESP.
pub struct SdEnv {
    // Field order: the mount goes before the env's loop devices and files.
    pub mount: Option<FuseMount>,
    pub env: Env,
    pub efivars: PathBuf,
}

pub const LOADER_CONF: &str = "default abup-*\ntimeout 0\n";

/// The entry of `slot` ("a"/"b"), booting the kernel at /abup/SLOT/.
pub fn entry_body(slot: &str) -> String {
    format!(
        "title abup slot {up}\nlinux /abup/{slot}/vmlinuz\ninitrd /abup/{slot}/initrd.img\noptions abup.slot={up} console=ttyS0\n",
        up = slot.to_ascii_uppercase()
    )
}

fn mtools(tool: &str, dev: &Path) -> Command {
    let mut c = Command::new(tool);
    c.env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(dev);
    c
}

/// Formats the partition on `dev` as FAT and lays out an ESP: loader.conf,
/// the kernels of both slots, and `entries` (file name, body).
pub fn make_esp(dev: &Path, entries: &[(&str, String)], extra_mkfs: &[&str]) {
    sh(Command::new("mkfs.vfat")
        .args(["-I", "-n", "ESP"])
        .args(extra_mkfs)
        .arg(dev));
    let tmp = tempfile::tempdir().unwrap();
    let put = |rel: &str, content: &[u8]| {
        let f = tmp.path().join("f");
        fs::write(&f, content).unwrap();
        sh(mtools("mcopy", dev).arg(&f).arg(format!("::/{rel}")));
    };
    for d in ["loader", "loader/entries", "abup", "abup/a", "abup/b"] {
        sh(mtools("mmd", dev).arg(format!("::/{d}")));
    }
    put("loader/loader.conf", LOADER_CONF.as_bytes());
    for slot in ["a", "b"] {
        put(
            &format!("abup/{slot}/vmlinuz"),
            format!("kernel {slot}\n").as_bytes(),
        );
        put(
            &format!("abup/{slot}/initrd.img"),
            format!("initrd {slot}\n").as_bytes(),
        );
    }
    for (name, body) in entries {
        put(&format!("loader/entries/{name}"), body.as_bytes());
    }
    sh(Command::new("blockdev").arg("--flushbufs").arg(dev));
}

/// Slot A booted and blessed, slot B never installed (no tries left).
pub fn initial_entries() -> Vec<(&'static str, String)> {
    vec![
        ("abup-1-a.conf", entry_body("a")),
        ("abup-0-b+0.conf", entry_body("b")),
    ]
}

impl SdEnv {
    pub fn new(mode: EspMode) -> SdEnv {
        SdEnv::with_entries(mode, &initial_entries(), &[])
    }

    pub fn with_entries(mode: EspMode, entries: &[(&str, String)], mkfs: &[&str]) -> SdEnv {
        let env = Env::new();
        {
            let lo = env.disk.attach("boot", false);
            make_esp(lo.path(), entries, mkfs);
        }
        let efivars = env.root.join("efivars");
        fs::create_dir_all(&efivars).unwrap();
        let mount = match mode {
            EspMode::Fat => None,
            EspMode::Fuse => Some(FuseMount::new(&env, &env.root.join("esp"), true, false)),
            EspMode::FuseByPartition => {
                Some(FuseMount::new(&env, &env.root.join("esp"), true, true))
            }
        };
        let table = match (mode, &mount) {
            (EspMode::Fuse, Some(m)) => format!("esp = {:?}", s(m.path())),
            _ => "partlabel = \"boot\"".to_string(),
        };
        let text = fs::read_to_string(&env.config).unwrap();
        let grub = "backend = \"grub\"";
        let table_old = "[boot.grub]\npartlabel = \"boot\"\npath = \"grub/grubenv\"";
        assert!(text.contains(grub) && text.contains(table_old), "{text}");
        let text = text.replace(grub, "backend = \"systemd-boot\"").replace(
            table_old,
            &format!("[boot.systemd-boot]\n{table}\nefivars = {:?}", s(&efivars)),
        );
        fs::write(&env.config, text).unwrap();
        SdEnv {
            mount,
            env,
            efivars,
        }
    }

    /// Runs `f` with the ESP's root as a directory: the fusefat mount, or a
    /// read-only fusefat mount made for the call.
    fn with_dir<T>(&self, f: impl FnOnce(&Path) -> T) -> T {
        match &self.mount {
            Some(m) => f(m.path()),
            None => {
                let m = FuseMount::new(&self.env, &self.env.path("esp-ro"), false, false);
                f(m.path())
            }
        }
    }

    /// The file names in loader/entries, sorted.
    pub fn entries(&self) -> Vec<String> {
        self.with_dir(|d| {
            let mut v: Vec<String> = fs::read_dir(d.join("loader/entries"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        })
    }

    /// Every file of the ESP with the SHA-256 of its bytes.
    pub fn snapshot(&self) -> Vec<(String, String)> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                    out.push((rel, sha256_file(&p)));
                }
            }
        }
        self.with_dir(|d| {
            let mut out = Vec::new();
            walk(d, d, &mut out);
            out.sort();
            out
        })
    }

    /// Renames an entry as systemd-boot does before booting it (or as a
    /// person fixing the ESP would).
    pub fn rename(&self, from: &str, to: &str) {
        match &self.mount {
            Some(m) => fs::rename(
                m.path().join("loader/entries").join(from),
                m.path().join("loader/entries").join(to),
            )
            .unwrap(),
            None => {
                let lo = self.env.disk.attach("boot", false);
                sh(mtools("mren", lo.path())
                    .arg(format!("::/loader/entries/{from}"))
                    .arg(format!("::/loader/entries/{to}")));
                sh(Command::new("blockdev").arg("--flushbufs").arg(lo.path()));
            }
        }
    }

    /// Deletes a file of the ESP (relative path).
    pub fn remove(&self, rel: &str) {
        match &self.mount {
            Some(m) => fs::remove_file(m.path().join(rel)).unwrap(),
            None => {
                let lo = self.env.disk.attach("boot", false);
                sh(mtools("mdel", lo.path()).arg(format!("::/{rel}")));
                sh(Command::new("blockdev").arg("--flushbufs").arg(lo.path()));
            }
        }
    }

    /// Writes (creates or replaces) a file of the ESP.
    pub fn put(&self, rel: &str, content: &str) {
        match &self.mount {
            Some(m) => fs::write(m.path().join(rel), content).unwrap(),
            None => {
                let lo = self.env.disk.attach("boot", false);
                let f = self.env.path("put");
                fs::write(&f, content).unwrap();
                sh(mtools("mcopy", lo.path())
                    .arg("-o")
                    .arg(&f)
                    .arg(format!("::/{rel}")));
                sh(Command::new("blockdev").arg("--flushbufs").arg(lo.path()));
            }
        }
    }

    /// `bootctl list` on the ESP: (entry id, file name, tries left,
    /// default?) in bootctl's order.
    pub fn bootctl(&self) -> Vec<BootctlEntry> {
        self.with_dir(bootctl_list)
    }

    /// Sets a systemd-boot EFI variable (UTF-16LE, as efivarfs shows it).
    pub fn set_efivar(&self, name: &str, value: &str) {
        let mut data = vec![7u8, 0, 0, 0];
        for u in value.encode_utf16().chain([0]) {
            data.extend_from_slice(&u.to_le_bytes());
        }
        fs::write(
            self.efivars
                .join(format!("{name}-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f")),
            data,
        )
        .unwrap();
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BootctlEntry {
    pub id: String,
    pub file: String,
    pub tries_left: Option<u32>,
    pub default: bool,
}

/// Parses `bootctl --esp-path=DIR list` (systemd 252's text output).
pub fn bootctl_list(esp: &Path) -> Vec<BootctlEntry> {
    let out = sh(Command::new("bootctl")
        .env("SYSTEMD_RELAX_ESP_CHECKS", "1")
        .arg(format!("--esp-path={}", s(esp)))
        .args(["--no-pager", "list"]));
    let mut list = Vec::new();
    for block in out.split("\n\n") {
        let mut e = BootctlEntry::default();
        for line in block.lines() {
            let Some((k, v)) = line.trim().split_once(": ") else {
                continue;
            };
            match k {
                "title" => e.default = v.contains("(default)"),
                "id" => e.id = v.to_string(),
                "source" => {
                    e.file = Path::new(v)
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                }
                "tries" => e.tries_left = v.split_whitespace().next().and_then(|n| n.parse().ok()),
                _ => {}
            }
        }
        if !e.id.is_empty() {
            list.push(e);
        }
    }
    list
}

/// The entry bootctl marks `(default)`: what systemd-boot boots next.
fn bootctl_default(sd: &SdEnv) -> BootctlEntry {
    let list = sd.bootctl();
    let d: Vec<_> = list.iter().filter(|e| e.default).collect();
    assert_eq!(d.len(), 1, "bootctl shows one default: {list:?}");
    d[0].clone()
}

/// The slot of an abup entry file name (`abup-GEN-SLOT…`).
fn slot_of(file: &str) -> String {
    file.split('-').nth(2).unwrap()[..1].to_ascii_uppercase()
}

fn names(list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Checks that abup's status and bootctl agree on what boots next and
/// on the tries left of each slot.
#[track_caller]
fn agree(sd: &SdEnv, booted: &str, next: &str) -> serde_json::Value {
    let st = sd.env.status(Some(booted));
    assert_eq!(st["backend"], "systemd-boot", "{st:#}");
    assert_eq!(st["primary"], next, "abup's next boot: {st:#}");
    let d = bootctl_default(sd);
    assert_eq!(
        slot_of(&d.file),
        next,
        "bootctl boots {d:?}, abup says {next}"
    );
    for e in sd.bootctl() {
        let slot = slot_of(&e.file);
        assert_eq!(
            st["slots"][&slot]["tries_left"],
            serde_json::json!(e.tries_left),
            "tries of {slot}: bootctl {e:?}, abup {st:#}"
        );
    }
    st
}

fn slot_verbs_round_trip(mode: EspMode) {
    let sd = SdEnv::new(mode);
    let env = &sd.env;
    assert_eq!(sd.entries(), names(&["abup-0-b+0.conf", "abup-1-a.conf"]));
    let st = agree(&sd, "A", "A");
    assert_eq!(st["slots"]["B"]["bootable"], false, "{st:#}");

    let bundle = env.simple_bundle("1.0.0");
    let report = env.install_ok("A", &bundle, &[]);
    assert_eq!(step_state(&report, "activate"), "changed", "{report:#}");
    assert_eq!(sd.entries(), names(&["abup-1-a.conf", "abup-2-b+3.conf"]));
    let st = agree(&sd, "A", "B");
    assert_eq!(st["slots"]["B"]["tries_left"], 3);

    // Still on A, B only "trying": no rollback, nothing written.
    let before = sd.snapshot();
    env.abup(&["--booted-slot", "A", "rollback"])
        .failed(3, &["slot B", "trying"]);
    assert_eq!(sd.snapshot(), before);

    // systemd-boot boots B once: it renames the entry first.
    sd.rename("abup-2-b+3.conf", "abup-2-b+2-1.conf");
    let st = agree(&sd, "B", "B");
    assert_eq!(st["slots"]["B"]["tries_left"], 2, "{st:#}");
    assert_eq!(st["slots"]["B"]["state"], "trying");
    env.abup(&["--booted-slot", "B", "mark-good"]).ok();
    assert_eq!(sd.entries(), names(&["abup-1-a.conf", "abup-2-b.conf"]));
    let st = agree(&sd, "B", "B");
    assert_eq!(st["slots"]["B"]["state"], "good", "{st:#}");
    // A second mark-good changes nothing on the ESP.
    let before = sd.snapshot();
    env.abup(&["--booted-slot", "B", "mark-good"]).ok();
    assert_eq!(sd.snapshot(), before);

    env.abup(&["--booted-slot", "B", "rollback"]).ok();
    assert_eq!(sd.entries(), names(&["abup-2-b.conf", "abup-3-a+3.conf"]));
    agree(&sd, "B", "A");

    env.abup(&["--booted-slot", "A", "mark-bad", "B"]).ok();
    assert_eq!(sd.entries(), names(&["abup-2-b+0.conf", "abup-3-a+3.conf"]));
    let st = agree(&sd, "A", "A");
    assert_eq!(st["slots"]["B"]["state"], "bad", "{st:#}");

    env.abup(&["--booted-slot", "A", "mark-active", "B"]).ok();
    assert_eq!(sd.entries(), names(&["abup-3-a+3.conf", "abup-4-b+3.conf"]));
    agree(&sd, "A", "B");

    // B used up its tries (systemd-boot renamed it three times): A boots,
    // and keeps booting: +0 sorts last however often it is tried.
    sd.rename("abup-4-b+3.conf", "abup-4-b+0-3.conf");
    let st = agree(&sd, "A", "A");
    assert_eq!(st["slots"]["B"]["state"], "bad", "{st:#}");
    env.abup(&["--booted-slot", "A", "rollback"])
        .failed(3, &["slot B"]);

    // A used up its tries too: systemd-boot boots the first entry all the
    // same (bootctl's default: B, the newer), so status calls that slot
    // its last resort, not bad, and warns; A is bad.
    sd.rename("abup-3-a+3.conf", "abup-3-a+0-3.conf");
    let st = agree(&sd, "A", "B");
    assert_eq!(st["slots"]["B"]["state"], "last-resort", "{st:#}");
    assert_eq!(st["slots"]["A"]["state"], "bad", "{st:#}");
    assert!(
        st["warnings"]
            .to_string()
            .contains("no slot has tries left: the bootloader starts slot B anyway"),
        "{st:#}"
    );
    let text = env.abup(&["--booted-slot", "A", "status"]);
    assert!(
        text.ok().stdout.contains("slot B: last-resort (primary)"),
        "{text}"
    );

    // The booted slot comes from LoaderEntrySelected when it is set
    // (systemd-boot sets it to the entry's id before renaming the file).
    sd.set_efivar("LoaderEntrySelected", "abup-3-a+3.conf");
    let st = sd.env.status(None);
    assert_eq!(st["booted"], "A", "{st:#}");
    sd.set_efivar("LoaderEntrySelected", "abup-4-b.conf");
    assert_eq!(sd.env.status(None)["booted"], "B");
}

#[test]
fn sdboot_unmounted_esp_slot_verbs() {
    slot_verbs_round_trip(EspMode::Fat);
}

#[test]
fn sdboot_fusefat_esp_slot_verbs() {
    slot_verbs_round_trip(EspMode::Fuse);
}

#[test]
fn sdboot_mounted_esp_found_by_partition() {
    // The config names the partition; abup must see the FUSE mount of it
    // and go through it (mtools on a mounted FAT would corrupt it).
    let sd = SdEnv::new(EspMode::FuseByPartition);
    let bundle = sd.env.simple_bundle("1.0.0");
    sd.env.install_ok("A", &bundle, &[]);
    assert_eq!(sd.entries(), names(&["abup-1-a.conf", "abup-2-b+3.conf"]));
    let st = agree(&sd, "A", "B");
    assert_eq!(st["slots"]["B"]["tries_left"], 3);
}

/// An install refused for a broken ESP: exit 3, the `needles` in the
/// error, the ESP and both slots unchanged.
#[track_caller]
fn refused(sd: &SdEnv, needles: &[&str]) -> String {
    let before = sd.snapshot();
    let slot_a = sd.env.disk.sha256_of_partition("rootA");
    let slot_b = sd.env.disk.sha256_of_partition("rootB");
    let bundle = sd.env.simple_bundle("1.0.0");
    let err = sd
        .env
        .abup(&["--booted-slot", "A", "install", s(&bundle)])
        .failed(3, needles);
    assert!(err.contains("systemd-boot backend"), "{err}");
    assert_eq!(sd.snapshot(), before, "the ESP changed");
    assert_eq!(sd.env.disk.sha256_of_partition("rootA"), slot_a);
    assert_eq!(sd.env.disk.sha256_of_partition("rootB"), slot_b);
    sd.env
        .abup(&["--booted-slot", "A", "mark-good"])
        .failed(3, needles);
    assert_eq!(sd.snapshot(), before, "the ESP changed");
    err
}

#[test]
fn sdboot_broken_esps_are_refused_with_the_fix() {
    let sd = SdEnv::new(EspMode::Fat);

    sd.remove("loader/loader.conf");
    refused(&sd, &["no loader/loader.conf", "default abup-*"]);

    // A default naming one slot would boot it even with no tries left.
    sd.put("loader/loader.conf", "default abup-1-a.conf\n");
    refused(
        &sd,
        &["does not match the entry of slot B", "default abup-*"],
    );
    sd.put("loader/loader.conf", "timeout 3\n");
    refused(&sd, &["sets no `default`"]);
    sd.put("loader/loader.conf", "default *\n");
    sd.put("loader/entries/debian.conf", &entry_body("a"));
    refused(&sd, &["also matches loader/entries/debian.conf"]);
    sd.remove("loader/entries/debian.conf");
    sd.put("loader/loader.conf", LOADER_CONF);

    // An entry systemd-boot would skip, a missing one, a duplicate, a
    // stray name in abup's namespace, differing sort fields.
    sd.put("loader/entries/abup-0-b+0.conf", "title B\noptions x\n");
    refused(&sd, &["abup-0-b+0.conf", "no `linux`", "README"]);
    sd.remove("loader/entries/abup-0-b+0.conf");
    refused(&sd, &["no entry for slot B"]);
    sd.put("loader/entries/abup-0-b+0.conf", &entry_body("b"));
    sd.put("loader/entries/abup-5-b.conf", &entry_body("b"));
    refused(&sd, &["two entries for slot B", "lower generation"]);
    sd.remove("loader/entries/abup-5-b.conf");
    sd.put("loader/entries/abup-b-new.conf", &entry_body("b"));
    refused(&sd, &["abup-b-new.conf", "not a slot entry name"]);
    sd.remove("loader/entries/abup-b-new.conf");
    sd.put(
        "loader/entries/abup-0-b+0.conf",
        &format!("{}version 2\n", entry_body("b")),
    );
    refused(&sd, &["differ in `version`"]);
    sd.put("loader/entries/abup-0-b+0.conf", &entry_body("b"));

    // An EFI variable that overrides loader.conf.
    sd.set_efivar("LoaderEntryDefault", "abup-1-a.conf");
    refused(&sd, &["LoaderEntryDefault", "bootctl set-default"]);
    fs::remove_dir_all(&sd.efivars).unwrap();
    fs::create_dir_all(&sd.efivars).unwrap();

    // All fixed: the install goes through.
    let bundle = sd.env.simple_bundle("1.0.0");
    sd.env.install_ok("A", &bundle, &[]);
    agree(&sd, "A", "B");
}

#[test]
fn sdboot_missing_kernel_on_the_esp_stops_the_flip() {
    let sd = SdEnv::new(EspMode::Fat);
    sd.remove("abup/b/vmlinuz");
    let before = sd.snapshot();
    let bundle = sd.env.simple_bundle("1.0.0");
    let err = sd
        .env
        .abup(&["--booted-slot", "A", "install", s(&bundle)])
        .failed(1, &["systemd-boot would skip slot B", "/abup/b/vmlinuz"]);
    assert!(err.contains("put the file there first"), "{err}");
    // B stays without tries; A is still what boots.
    assert_eq!(sd.snapshot(), before);
    agree(&sd, "A", "A");
    // status says why B would be skipped.
    let st = sd.env.status(Some("A"));
    assert!(
        st["slots"]["B"]["unfindable"]
            .as_str()
            .is_some_and(|w| w.contains("/abup/b/vmlinuz")),
        "{st:#}"
    );
}

#[test]
fn sdboot_full_esp_refuses_the_rename_and_changes_nothing() {
    full_esp(EspMode::Fat);
}

#[test]
fn sdboot_full_fusefat_esp_refuses_the_rename() {
    full_esp(EspMode::Fuse);
}

fn full_esp(mode: EspMode) {
    // 1 KiB clusters; B starts as a good older entry, so marking it bad
    // needs a longer name (one more directory slot).
    let entries = vec![
        ("abup-1-a.conf", entry_body("a")),
        ("abup-0-b.conf", entry_body("b")),
    ];
    let sd = SdEnv::with_entries(mode, &entries, &["-s", "2", "-S", "512"]);
    // Filled through mtools while nothing has it mounted.
    let mount = sd.mount.is_some();
    let mut sd = sd;
    drop(sd.mount.take());
    {
        // Fill the data area, then the entries directory with empty files
        // until FAT has no cluster left to grow it.
        let lo = sd.env.disk.attach("boot", false);
        let info = sh(&mut mtools("minfo", lo.path()));
        assert!(info.contains("cluster size: 2 sectors"), "{info}");
        let free = sh(mtools("mdir", lo.path()).arg("::/"));
        let bytes: u64 = free
            .lines()
            .find(|l| l.contains("bytes free"))
            .and_then(|l| l.split("bytes free").next())
            .map(|n| n.split_whitespace().collect::<String>().parse().unwrap())
            .unwrap();
        let big = sd.env.path("big");
        fs::File::create(&big).unwrap().set_len(bytes).unwrap();
        sh(mtools("mcopy", lo.path()).arg(&big).arg("::/fill.bin"));
        let empty = sd.env.path("empty");
        fs::write(&empty, "").unwrap();
        let mut n = 0;
        loop {
            let ok = mtools("mcopy", lo.path())
                .arg(&empty)
                .arg(format!("::/loader/entries/p{n}.txt"))
                .output()
                .unwrap()
                .status
                .success();
            if !ok {
                break;
            }
            n += 1;
            assert!(n < 10_000, "the directory never filled up");
        }
        // The failed copy may leave nothing behind; flush what was written.
        sh(Command::new("blockdev").arg("--flushbufs").arg(lo.path()));
    }
    if mount {
        sd.mount = Some(FuseMount::new(
            &sd.env,
            &sd.env.root.join("esp"),
            true,
            false,
        ));
    }
    let before = sd.snapshot();
    let slot_b = sd.env.disk.sha256_of_partition("rootB");
    let bundle = sd.env.simple_bundle("1.0.0");
    let err = sd
        .env
        .abup(&["--booted-slot", "A", "install", s(&bundle)])
        .failed(
            1,
            &[
                "systemd-boot backend",
                "renaming loader/entries/abup-0-b.conf",
            ],
        );
    assert!(err.contains("free space"), "{err}");
    assert_eq!(sd.env.disk.sha256_of_partition("rootB"), slot_b);
    if mode == EspMode::Fat {
        assert_eq!(sd.snapshot(), before, "{err}");
        agree(&sd, "A", "A");
    } else {
        // fusefat 0.1a drops the old name of a rename it cannot finish
        // (the kernel's vfat does not): slot B's entry is gone. A's entry
        // is untouched, so A still boots, and abup names what to fix.
        let now = sd.snapshot();
        let a = |snap: &[(String, String)]| {
            snap.iter()
                .find(|(n, _)| n.ends_with("abup-1-a.conf"))
                .cloned()
        };
        assert_eq!(a(&now), a(&before));
        sd.env
            .abup(&["--booted-slot", "A", "status"])
            .failed(3, &["no entry for slot B", "README"]);
    }
}

/// A crash on either side of the flip's one rename leaves an ESP that
/// systemd-boot and abup agree on: before it, A still boots (B stays
/// without tries); after it, B boots next with its fresh counter.
#[test]
fn sdboot_install_killed_around_the_flip_leaves_a_consistent_esp() {
    use std::os::unix::process::ExitStatusExt;
    for (point, entries, next) in [
        (
            "flip-before-rename",
            ["abup-0-b+0.conf", "abup-1-a.conf"],
            "A",
        ),
        (
            "flip-after-rename",
            ["abup-1-a.conf", "abup-2-b+3.conf"],
            "B",
        ),
    ] {
        let sd = SdEnv::new(EspMode::Fat);
        let bundle = sd.env.simple_bundle("1.0.0");
        let out = Command::new(abup_bin())
            .args([
                "--config",
                s(&sd.env.config),
                "--booted-slot",
                "A",
                "install",
            ])
            .arg(&bundle)
            .env("ABUP_FAILPOINTS", format!("{point}=kill"))
            .output()
            .unwrap();
        assert_eq!(out.status.signal(), Some(9), "{point}: not killed: {out:?}");
        assert!(
            leaked_loops(&sd.env.disk.device()).is_empty(),
            "{point}: loop devices left"
        );
        assert_eq!(sd.entries(), names(&entries), "{point}");
        agree(&sd, "A", next);
    }
}
