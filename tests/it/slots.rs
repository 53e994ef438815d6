//! The slot verbs after an install: mark-good, mark-bad, mark-active and
//! rollback, and `install --no-activate`. Every change is checked with the
//! real `grub-editenv list` and with `abup status`.

use crate::util::*;
use serde_json::{json, Value};
use std::process::Command;

#[test]
fn mark_good_mark_bad_mark_active_and_rollback_round_trip() {
    round_trip(Env::new());
}

/// The same verbs through the custom backend, running the shipped example
/// script (boot-backends/custom/abup-boot-grubenv) on a grubenv: it keeps
/// GRUB's variables with the grub backend's meaning, so the grubenv must
/// come out the same.
#[test]
fn custom_backend_round_trip_with_the_grubenv_example() {
    round_trip(Env::builder().custom().build());
}

fn round_trip(env: Env) {
    // The custom interface has no try counter: status shows none.
    let tries = |n: u32| (!env.custom).then_some(n);
    let bundle = env.simple_bundle("1.0.0");
    env.install_ok("A", &bundle, &[]);
    let installed = env_with(
        INITIAL_ENV,
        &[("ORDER", "B A"), ("B_OK", "1"), ("B_TRY", "0")],
    );
    assert_eq!(env.grubenv(), installed);

    // Still running A: the other slot B is only "trying", so there is no
    // good install to roll back to.
    let before = env.snapshot();
    let run = env.abup(&["--booted-slot", "A", "rollback"]);
    run.failed(3, &["slot B", "trying"]);
    env.assert_untouched(&before);

    // GRUB boots B once (it counts the attempt), B comes up and blesses itself.
    env.grub_set(&["B_TRY=1"]);
    let st = env.status(Some("B"));
    assert_eq!(st["slots"]["B"]["tries_left"], json!(tries(2)), "{st:#}");
    assert_eq!(st["slots"]["B"]["state"], "trying");
    env.abup(&["--booted-slot", "B", "mark-good"]).ok();
    assert_eq!(
        env.grubenv(),
        env_with(
            INITIAL_ENV,
            &[
                ("ORDER", "B A"),
                ("B_OK", "1"),
                ("B_TRY", "0"),
                ("B_GOOD", "1")
            ]
        ),
        "mark-good must reset B_TRY and commit B"
    );
    let st = env.status(Some("B"));
    assert_eq!(st["booted"], "B");
    assert_eq!(st["primary"], "B");
    assert_eq!(st["slots"]["B"]["state"], "good", "{st:#}");
    // GRUB counts no tries for a committed slot (and the custom interface
    // has no counter).
    assert_eq!(st["slots"]["B"]["tries_left"], Value::Null);
    assert_eq!(st["slots"]["A"]["state"], "good", "{st:#}");

    // Roll back from B to A (good from before abup kept records).
    env.abup(&["--booted-slot", "B", "rollback"]).ok();
    assert_eq!(
        env.grubenv(),
        env_with(
            INITIAL_ENV,
            &[
                ("ORDER", "A B"),
                ("B_OK", "1"),
                ("B_TRY", "0"),
                ("B_GOOD", "1")
            ]
        )
    );
    assert_eq!(env.status(Some("B"))["primary"], "A");

    // mark-bad B: GRUB must never boot it.
    env.abup(&["--booted-slot", "A", "mark-bad", "B"]).ok();
    assert_eq!(
        env.grubenv(),
        env_with(
            INITIAL_ENV,
            &[("ORDER", "A B"), ("B_OK", "0"), ("B_TRY", "0")]
        )
    );
    let st = env.status(Some("A"));
    assert_eq!(st["slots"]["B"]["state"], "bad", "{st:#}");
    assert_eq!(st["slots"]["B"]["bootable"], false);
    assert_eq!(st["primary"], "A");

    // mark-active B: first in ORDER, bootable, fresh counter.
    env.abup(&["--booted-slot", "A", "mark-active", "B"]).ok();
    assert_eq!(env.grubenv(), installed);
    let st = env.status(Some("A"));
    assert_eq!(st["primary"], "B");
    assert_eq!(st["slots"]["B"]["state"], "trying", "{st:#}");

    // "other" resolves against the booted slot.
    env.abup(&["--booted-slot", "A", "mark-good", "other"]).ok();
    assert_eq!(env.status(Some("A"))["slots"]["B"]["state"], "good");

    // Now A can roll back to the good B... and it already is primary.
    env.abup(&["--booted-slot", "A", "rollback"]).ok();
    assert_eq!(
        env.grubenv(),
        env_with(
            INITIAL_ENV,
            &[
                ("ORDER", "B A"),
                ("B_OK", "1"),
                ("B_TRY", "0"),
                ("B_GOOD", "1")
            ]
        )
    );

    // Bad slot names and "booted" without a booted slot are usage errors
    // that change nothing.
    let before = env.snapshot();
    let bad = env.abup(&["mark-bad", "C"]);
    assert_eq!(bad.code, 2, "a bad slot name is a usage error:\n{bad}");
    assert!(bad.stderr.contains("'C'"), "{bad}");
    env.abup(&["mark-good"]).failed(3, &["--booted-slot"]);
    env.assert_untouched(&before);
}

#[test]
fn no_activate_leaves_the_boot_order_alone() {
    // The grubenv in a plain file (boot.grub.envfile) this time.
    let env = Env::builder().grub(GrubLoc::File).build();
    let boot_partition_env = {
        let m = env.disk.mount("boot", false);
        std::fs::read(m.path().join("grub/grubenv")).unwrap()
    };
    let bundle = env.simple_bundle("1.0.0");
    let report = env.install_ok("A", &bundle, &["--no-activate"]);
    assert_eq!(step_names(&report), INSTALL_STEPS);
    assert_eq!(step_state(&report, "write"), "changed");
    assert_eq!(step_state(&report, "activate"), "unchanged", "{report:#}");
    // B was marked bad before it was written and stays so until activated.
    assert_eq!(env.grubenv(), env_map(INITIAL_ENV));
    let st = env.status(Some("A"));
    assert_eq!(st["primary"], "A");
    assert_eq!(st["slots"]["B"]["version"], "1.0.0");
    assert_eq!(st["slots"]["B"]["bootable"], false);
    assert_eq!(st["slots"]["B"]["tries_left"], 0);
    {
        let b = env.disk.mount("rootB", false);
        assert!(std::fs::read_to_string(b.path().join("etc/os-release"))
            .unwrap()
            .contains("VERSION=1.0.0"));
    }

    env.abup(&["--booted-slot", "A", "mark-active", "B"]).ok();
    assert_eq!(
        env.grubenv(),
        env_with(
            INITIAL_ENV,
            &[("ORDER", "B A"), ("B_OK", "1"), ("B_TRY", "0")]
        )
    );
    assert_eq!(env.status(Some("A"))["slots"]["B"]["state"], "trying");

    // abup only ever touched the configured envfile.
    let m = env.disk.mount("boot", false);
    assert_eq!(
        std::fs::read(m.path().join("grub/grubenv")).unwrap(),
        boot_partition_env
    );
}

/// GRUB counts boot attempts in B_TRY; once they reach ABUP_MAX_TRIES the
/// slot is no longer bootable and the bootloader falls back to A.
#[test]
fn exhausted_boot_attempts_fall_back_to_the_good_slot() {
    let env = Env::new();
    let bundle = env.simple_bundle("1.0.0");
    env.install_ok("A", &bundle, &[]);
    let set_try = |n: &str| {
        let boot = env.disk.mount("boot", true);
        sh(Command::new("grub-editenv")
            .arg(boot.path().join("grub/grubenv"))
            .args(["set", &format!("B_TRY={n}")]));
    };
    set_try("2");
    let st = env.status(Some("A"));
    assert_eq!(st["primary"], "B");
    assert_eq!(st["slots"]["B"]["tries_left"], 1, "{st:#}");
    set_try("3");
    // The device is back on A after the third failed boot of B.
    let st = env.status(Some("A"));
    assert_eq!(st["primary"], "A", "{st:#}");
    assert_eq!(st["slots"]["B"]["bootable"], false);
    assert_eq!(st["slots"]["B"]["state"], "bad", "{st:#}");
    assert_eq!(st["slots"]["B"]["tries_left"], 0);
    assert_eq!(st["slots"]["B"]["version"], "1.0.0");

    // Nothing good to roll back to; A blesses itself; B can be retried.
    env.abup(&["--booted-slot", "A", "rollback"])
        .failed(3, &["slot B"]);
    let run = env.abup(&["--json", "--booted-slot", "A", "mark-good"]);
    run.ok();
    let out = run.json();
    assert_eq!(out["slot"], "A", "{out:#}");
    assert_eq!(out["result"], "success");
    assert_eq!(
        env.grubenv(),
        env_with(
            INITIAL_ENV,
            &[("ORDER", "B A"), ("B_OK", "1"), ("B_TRY", "3")]
        )
    );
    env.abup(&["--booted-slot", "A", "mark-active", "B"]).ok();
    assert_eq!(
        env.grubenv(),
        env_with(
            INITIAL_ENV,
            &[("ORDER", "B A"), ("B_OK", "1"), ("B_TRY", "0")]
        )
    );
    assert_eq!(env.status(Some("A"))["slots"]["B"]["state"], "trying");
}

/// mark-bad skips its write only when the grubenv already says "bad": a
/// stale `B_GOOD=1` beside `B_OK=0` (a hand edit) must not survive into
/// the flip, where it would commit the new install before it ever booted.
#[test]
fn a_stale_good_flag_on_the_spare_is_cleared_before_the_write() {
    let env = Env::new();
    env.grub_set(&["B_GOOD=1"]);
    let bundle = env.simple_bundle("1.0.0");
    let report = env.install_ok("A", &bundle, &[]);
    let comment = step_comment(&report, "mark-bad");
    assert!(comment.contains("slot B marked bad in"), "{report:#}");
    let vars = env.grubenv();
    assert_eq!(
        vars.get("B_GOOD").map(String::as_str),
        Some("0"),
        "{vars:?}"
    );
    assert_eq!(vars.get("B_OK").map(String::as_str), Some("1"), "{vars:?}");
    let st = env.status(Some("A"));
    assert_eq!(st["slots"]["B"]["state"], "trying", "{st:#}");
    assert_eq!(st["slots"]["B"]["tries_left"], 3, "{st:#}");
}
