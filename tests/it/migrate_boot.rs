//! Data staging across real boots: a migration's staged data is committed
//! when the new slot, booted by GRUB under QEMU, runs `abup mark-good`, and
//! discarded when GRUB falls back from a broken slot and the old slot's
//! first abup run (`status`) sees it, leaving the old slot's data as it
//! was.
//!
//! Uses the GRUB real-boot rig of `grub_boot` (UEFI). Installs run on the
//! host with the data partition configured (`[data]`), as they would from
//! the running system: the test mounts the data partition (the state
//! directory lives there, as the VM's abup reads it) through the kernel
//! partition node of a loop device over the whole image, and abup opens
//! that same node, so both mounts share one filesystem.

use super::grub_boot::{Rig, COMPATIBLE};
use super::qemu::Firmware;
use super::util::{self, make_bundle, sh, LoopDevice, LoopOpts, Mount, Source};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The image as one loop device with kernel partition nodes (`partx -a`);
/// the nodes go (`partx -d`) before the device is detached.
struct WholeDisk {
    lo: Option<LoopDevice>,
}

impl WholeDisk {
    fn attach(img: &Path) -> WholeDisk {
        let lo = LoopDevice::attach(img, LoopOpts::default());
        sh(Command::new("partx").arg("-a").arg(lo.path()));
        let disk = WholeDisk { lo: Some(lo) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !disk.node(6).exists() {
            assert!(
                Instant::now() < deadline,
                "partx -a made no partition nodes"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        disk
    }

    fn path(&self) -> &Path {
        self.lo.as_ref().map(|l| l.path()).unwrap()
    }

    fn node(&self, n: u32) -> PathBuf {
        PathBuf::from(format!("{}p{n}", self.path().display()))
    }
}

impl Drop for WholeDisk {
    fn drop(&mut self) {
        let left = util::remove_kernel_partitions(self.path());
        if !left.is_empty() {
            eprintln!("warning: kernel partitions left: {left:?}");
        }
        self.lo.take();
    }
}

/// `abup ARGS` on the host with the data partition configured, `tries` boot
/// tries.
fn abup_with_data(rig: &Rig, tries: u32, args: &[&str]) -> util::Run {
    let disk = WholeDisk::attach(&rig.img);
    let data = Mount::ext4(&disk.node(6), true);
    let cfg = rig.host_config_on(
        disk.path(),
        data.path(),
        tries,
        "[data]\npartlabel = \"data\"\n",
    );
    let mut all = vec!["--config".to_string(), s(&cfg).to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    let run = util::run_abup(&all, None);
    drop(data);
    run
}

/// A bundle whose slot config has the data partition and whose migration
/// rewrites `app/db.json` to `schema` into the staging area.
fn staging_bundle(rig: &Rig, version: &str, panics: bool, schema: u32) -> PathBuf {
    let root = rig.rootfs(version, panics, true);
    let cfg = root.join("etc/abup/system.toml");
    let text = fs::read_to_string(&cfg).unwrap() + "[data]\npartlabel = \"data\"\n";
    fs::write(&cfg, text).unwrap();
    let dir = root.join("usr/lib/abup/migrate.d");
    fs::create_dir_all(&dir).unwrap();
    let m = dir.join("10-schema");
    fs::write(
        &m,
        format!(
            "#!/bin/busybox sh\nset -e\nbusybox mkdir -p \"$ABUP_DATA_STAGING/app\"\n\
             busybox sed 's/\"schema\": [0-9]*/\"schema\": {schema}/' \"$ABUP_DATA/app/db.json\" \
             > \"$ABUP_DATA_STAGING/app/db.json\"\necho \"schema {schema} staged\"\n"
        ),
    )
    .unwrap();
    fs::set_permissions(&m, fs::Permissions::from_mode(0o755)).unwrap();
    let out = rig.dir.join(format!("v{version}-staging.abup"));
    make_bundle(
        Source::Rootfs(&root),
        version,
        "zstd",
        Some(&rig.secret),
        COMPATIBLE,
        &out,
    );
    out
}

/// `app/db.json` on the data partition, and whether `.abup-staging/<slot>`
/// holds anything.
fn data_view(rig: &Rig, slot: &str) -> (String, Option<String>) {
    let lo = rig.part_loop("data");
    let m = Mount::ext4(lo.path(), false);
    let live = fs::read_to_string(m.path().join("app/db.json")).unwrap();
    let staged =
        fs::read_to_string(m.path().join(format!(".abup-staging/{slot}/app/db.json"))).ok();
    (live, staged)
}

#[test]
fn staged_data_is_committed_by_a_real_boot_and_discarded_after_a_real_fallback() {
    let mut rig = Rig::new(Firmware::Uefi);
    // Factory: v1 into A, booted and blessed.
    let v1 = rig.bundle("1.0.0", false, true, false);
    rig.abup_host(3, &["install", "--target-slot", "A", s(&v1)])
        .ok();
    rig.script("abup mark-good");
    rig.boot_expect("A", "1.0.0");
    {
        let lo = rig.part_loop("data");
        let m = Mount::ext4(lo.path(), true);
        util::write(m.path(), "app/db.json", "{\"schema\": 1}\n", 0o600);
    }

    // v2 into B from the running A: its migration stages schema 2.
    let v2 = staging_bundle(&rig, "2.0.0", false, 2);
    abup_with_data(&rig, 3, &["install", "--booted-slot", "A", s(&v2)]).ok();
    assert_eq!(
        data_view(&rig, "B"),
        (
            "{\"schema\": 1}\n".to_string(),
            Some("{\"schema\": 2}\n".to_string())
        ),
        "staged beside the live data"
    );
    // B boots and blesses itself: the staged data is committed.
    rig.script("abup mark-good\nabup status");
    let b = rig.boot_expect("B", "2.0.0");
    assert!(
        b.text()
            .contains("committed the data staged by version 2.0.0 (app)"),
        "mark-good in the VM:\n{}",
        b.text()
    );
    assert_eq!(
        data_view(&rig, "B"),
        ("{\"schema\": 2}\n".to_string(), None)
    );

    // A broken v3 into A with one try; its migration stages schema 3.
    let v3 = staging_bundle(&rig, "3.0.0", true, 3);
    abup_with_data(&rig, 1, &["install", "--booted-slot", "B", s(&v3)]).ok();
    assert_eq!(
        data_view(&rig, "A"),
        (
            "{\"schema\": 2}\n".to_string(),
            Some("{\"schema\": 3}\n".to_string())
        )
    );
    rig.boot_panics("A", "3.0.0");
    // GRUB falls back to B; B's first abup run discards A's staged data.
    rig.script("abup status");
    let b = rig.boot_expect("B", "2.0.0");
    assert!(
        b.text().contains(
            "discarded the data staged by version 3.0.0 for slot A (the bootloader fell back from it)"
        ),
        "status in the VM after the fallback:\n{}",
        b.text()
    );
    assert_eq!(
        data_view(&rig, "A"),
        ("{\"schema\": 2}\n".to_string(), None),
        "B's data is as B left it"
    );
}
