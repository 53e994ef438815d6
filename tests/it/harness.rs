//! The test harness's own guarantee, the one the other tests' "slot A is
//! byte-identical" assertions rest on: what the harness wrote to a slot is
//! on the disk, clean and final, once its mount guard is gone, even when
//! something held the mount busy for a while (on a loaded machine, a child
//! forked by another test thread holds copies of open files for seconds
//! before it execs).

use crate::util::*;
use std::fs;
use std::process::{Command, Stdio};

/// The features line of `dumpe2fs -h` for the slot's filesystem.
fn features(env: &Env, label: &str) -> String {
    let lo = env.disk.attach(label, true);
    let out = sh(Command::new("dumpe2fs").arg("-h").arg(lo.path()));
    out.lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_slot_written_through_the_harness_is_final_when_its_busy_mount_goes() {
    let env = Env::new();
    env.disk.mkfs("rootB");
    let m = env.disk.mount("rootB", true);
    write(m.path(), "etc/written-by-the-test", "content\n", 0o644);
    // A process inside the mount for longer than the 2 s the guard once
    // waited before detaching lazily.
    let mut holder = Command::new("sleep")
        .arg("4")
        .current_dir(m.path())
        .stdin(Stdio::null())
        .spawn()
        .expect("running sleep");
    drop(m);
    // Clean on disk, unmounted for good (not detached to be written out
    // whenever the holder goes).
    let f = features(&env, "rootB");
    let _ = holder.wait();
    assert!(f.contains("has_journal"), "{f}");
    assert!(!f.contains("needs_recovery"), "journal still in use: {f}");
    assert!(leaked_loops(&env.disk.image).is_empty());
    let m = env.disk.mount("rootB", false);
    assert_eq!(
        fs::read_to_string(m.path().join("etc/written-by-the-test")).unwrap(),
        "content\n"
    );
}
