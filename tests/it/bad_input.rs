//! Imposters and refusals: every verification gets a corrupt or hostile
//! input. Each test checks the exit code (3 when refused before anything was
//! written, 1 when caught while streaming), that stderr is one `error:` line
//! naming the problem, and that the booted slot A and the grubenv are
//! byte-identical afterwards.

use crate::util::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A copy of `bundle` with the byte at `at` inverted.
fn flipped(env: &Env, bundle: &Path, at: u64) -> PathBuf {
    let mut bytes = fs::read(bundle).unwrap();
    bytes[at as usize] ^= 0xff;
    let out = env.path("flipped.abup");
    fs::write(&out, bytes).unwrap();
    out
}

/// Installs `bundle` from booted A without --json (so stderr holds only the
/// error line).
fn install(env: &Env, bundle: &Path) -> Run {
    env.abup(&["--booted-slot", "A", "install", s(bundle)])
}

#[test]
fn flipped_byte_in_a_compressed_tar_payload() {
    let env = Env::new();
    let dir = env.path("rootfs");
    rich_rootfs(&dir, "1.0.0");
    let bundle = env.bundle(Source::Rootfs(&dir), "1.0.0", "zstd");
    let range = payload_range(&bundle);
    let bad = flipped(&env, &bundle, (range.start + range.end) / 2);
    let before = env.snapshot();

    let line = install(&env, &bad).failed(1, &["corrupt"]);
    assert!(
        line.starts_with("error: write: ") || line.starts_with("error: verify: "),
        "the failing step should be write or verify: {line}"
    );
    // B was not bootable before, so marking it bad changed nothing either.
    env.assert_untouched(&before);
    let st = env.status(Some("A"));
    assert_eq!(
        st["slots"]["B"]["state"], "empty",
        "a half-written slot is empty: {st:#}"
    );
    assert!(st["slots"]["B"]["version"].is_null(), "{st:#}");
    assert_eq!(st["slots"]["B"]["tries_left"], 0, "{st:#}");
    assert_eq!(st["primary"], "A");

    // The JSON report says the same.
    let run = env.abup(&["--json", "--booted-slot", "A", "install", s(&bad)]);
    assert_eq!(run.code, 1, "{run}");
    let report = run.json();
    assert_eq!(report["result"], "failed");
    assert_eq!(report["exit_code"], 1);
    let failed = report["failed_step"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(failed == "write" || failed == "verify", "{report:#}");
    let last = steps(&report).pop().unwrap();
    assert_eq!(last, (failed, "failed".to_string()), "{report:#}");
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("corrupt")),
        "{report:#}"
    );
    assert!(!step_names(&report).contains(&"activate".to_string()));
    // A half-written slot cannot be activated or blessed by hand.
    env.abup(&["--booted-slot", "A", "mark-active", "B"])
        .failed(3, &["incomplete"]);
    env.abup(&["--booted-slot", "A", "mark-good", "B"])
        .failed(3, &["incomplete"]);
    assert!(
        run.stderr
            .lines()
            .last()
            .unwrap_or_default()
            .starts_with("error: "),
        "{run}"
    );
    env.assert_untouched(&before);
}

/// The first chunk is checked against the signed hash list before the spare
/// is touched: a flip there is refused with exit 3 and slot B unchanged.
#[test]
fn flipped_byte_in_the_first_chunk_is_refused_before_writing() {
    let env = Env::new();
    let img = env.path("rootfs.ext4");
    let tree = env.path("tree");
    simple_rootfs(&tree, "1.0.0");
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("8M"));
    let bundle = env.bundle(Source::Image(&img), "1.0.0", "none");
    let range = payload_range(&bundle);
    assert_eq!(range.end - range.start, 8 * MIB);
    let bad = flipped(&env, &bundle, range.start + 1024 + 56); // the ext4 superblock magic
    let before = env.snapshot();
    let slot_b = env.disk.sha256_of_partition("rootB");

    let line = install(&env, &bad).failed(3, &["chunk 0", "does not match its signed hash"]);
    assert!(line.starts_with("error: check: "), "{line}");
    env.assert_untouched(&before);
    assert_eq!(env.disk.sha256_of_partition("rootB"), slot_b);
    assert_eq!(env.status(Some("A"))["slots"]["B"]["state"], "empty");

    // A flip in a later chunk stops the write at that chunk (exit 1).
    let bad = flipped(&env, &bundle, range.start + 5 * MIB + 3);
    let line = install(&env, &bad).failed(1, &["chunk 5", "does not match its signed hash"]);
    assert!(line.starts_with("error: write: "), "{line}");
    env.assert_untouched(&before);
    assert_eq!(env.status(Some("A"))["slots"]["B"]["state"], "empty");
}

#[test]
fn truncated_bundle_file_is_refused_and_truncated_stream_fails() {
    let env = Env::new();
    let dir = env.path("rootfs");
    rich_rootfs(&dir, "1.0.0");
    let bundle = env.bundle(Source::Rootfs(&dir), "1.0.0", "zstd");
    let range = payload_range(&bundle);
    let mut bytes = fs::read(&bundle).unwrap();
    bytes.truncate(((range.start + range.end) / 2) as usize);
    let cut = env.path("truncated.abup");
    fs::write(&cut, &bytes).unwrap();
    let before = env.snapshot();

    // A file's length is checked against the manifest before writing.
    let line = install(&env, &cut).failed(3, &["truncated"]);
    assert!(line.starts_with("error: check: "), "{line}");
    env.assert_untouched(&before);

    // A pipe has no length: the cut is found while streaming.
    let run = env.abup_stdin(&["--booted-slot", "A", "install", "-"], bytes);
    run.failed(1, &["truncated"]);
    env.assert_untouched(&before);
    assert_eq!(env.status(Some("A"))["slots"]["B"]["state"], "empty");

    // Cut inside the header: refused before anything is written.
    let head = fs::read(&bundle).unwrap()[..40].to_vec();
    let run = env.abup_stdin(&["--booted-slot", "A", "install", "-"], head);
    run.failed(3, &["truncated"]);
    env.assert_untouched(&before);
}

#[test]
fn bundle_signed_by_an_untrusted_key() {
    let env = Env::new();
    let (other_secret, other_public) = (env.path("other.key"), env.path("other.pub"));
    keygen(&other_secret, &other_public);
    let dir = env.path("rootfs");
    simple_rootfs(&dir, "1.0.0");
    let bundle = env.bundle_opts(
        Source::Rootfs(&dir),
        "1.0.0",
        "zstd",
        Some(&other_secret),
        COMPATIBLE,
    );
    let before = env.snapshot();
    install(&env, &bundle).failed(3, &["signature", "does not verify"]);
    env.assert_untouched(&before);
}

#[test]
fn unsigned_bundle() {
    let env = Env::new();
    let dir = env.path("rootfs");
    simple_rootfs(&dir, "1.0.0");
    let bundle = env.bundle_opts(Source::Rootfs(&dir), "1.0.0", "zstd", None, COMPATIBLE);
    let before = env.snapshot();
    install(&env, &bundle).failed(3, &["not signed"]);
    env.assert_untouched(&before);
}

#[test]
fn tampered_manifest_breaks_the_signature() {
    let env = Env::new();
    let bundle = env.simple_bundle("1.0.0");
    let mut bytes = fs::read(&bundle).unwrap();
    let at = bytes
        .windows(7)
        .position(|w| w == b"\"1.0.0\"")
        .expect("version string in the manifest");
    bytes[at + 1] = b'9'; // "9.0.0": a tempting upgrade
    let bad = env.path("tampered.abup");
    fs::write(&bad, bytes).unwrap();
    let before = env.snapshot();
    install(&env, &bad).failed(3, &["signature"]);
    env.assert_untouched(&before);
}

#[test]
fn not_a_bundle_at_all() {
    let env = Env::new();
    let junk = env.path("junk.abup");
    fs::write(&junk, b"#!/bin/sh\necho this is not a bundle\n").unwrap();
    let before = env.snapshot();
    install(&env, &junk).failed(3, &["not an abup bundle"]);
    let run = env.abup_stdin(&["--booted-slot", "A", "install", "-"], Vec::new());
    run.failed(3, &["empty"]);
    env.assert_untouched(&before);
}

#[test]
fn bundle_for_another_device() {
    let env = Env::new();
    let dir = env.path("rootfs");
    simple_rootfs(&dir, "1.0.0");
    let bundle = env.bundle_opts(
        Source::Rootfs(&dir),
        "1.0.0",
        "zstd",
        Some(&env.secret.clone()),
        "another-board",
    );
    let before = env.snapshot();
    install(&env, &bundle).failed(3, &["another-board", COMPATIBLE]);
    env.assert_untouched(&before);

    // The JSON report of a refusal: failed at check, nothing written.
    let run = env.abup(&["--json", "--booted-slot", "A", "install", s(&bundle)]);
    assert_eq!(run.code, 3, "{run}");
    let report = run.json();
    assert_eq!(report["result"], "failed");
    assert_eq!(report["exit_code"], 3);
    assert_eq!(report["failed_step"], "check");
    assert_eq!(
        steps(&report),
        [
            ("load-config", "unchanged"),
            ("verify-bundle", "unchanged"),
            ("inspect-system", "unchanged"),
            ("check", "failed"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert!(report["error"]
        .as_str()
        .is_some_and(|e| e.contains("another-board")));
    env.assert_untouched(&before);
}

#[test]
fn downgrade_is_refused_unless_allowed() {
    let env = Env::new();
    let v2 = env.simple_bundle("2.0.0");
    let v1 = env.simple_bundle("1.0.0");
    env.install_ok("A", &v2, &[]);
    // The device reboots into B and blesses it.
    env.abup(&["--booted-slot", "B", "mark-good"]).ok();
    let before = env.snapshot();
    let slot_b = env.disk.sha256_of_partition("rootB");

    let run = env.abup(&["--booted-slot", "B", "install", s(&v1)]);
    run.failed(3, &["1.0.0", "2.0.0", "--allow-downgrade"]);
    // The same version is no upgrade either.
    let run = env.abup(&["--booted-slot", "B", "install", s(&v2)]);
    run.failed(3, &["not newer"]);
    env.assert_untouched(&before);
    assert_eq!(
        env.disk.sha256_of_partition("rootB"),
        slot_b,
        "booted slot B changed"
    );

    let report = env.install_ok("B", &v1, &["--allow-downgrade"]);
    assert_eq!(report["target_slot"], "A");
    assert_eq!(report["version"], "1.0.0");
    assert_eq!(
        env.disk.sha256_of_partition("rootB"),
        slot_b,
        "booted slot B changed"
    );
    assert_eq!(
        env.grubenv(),
        env_with(
            INITIAL_ENV,
            &[
                ("ORDER", "A B"),
                ("B_OK", "1"),
                ("B_GOOD", "1"),
                ("A_OK", "1"),
                ("A_TRY", "0"),
                ("A_GOOD", "0")
            ]
        )
    );
    let st = env.status(Some("B"));
    assert_eq!(st["slots"]["A"]["version"], "1.0.0");
    assert_eq!(st["slots"]["A"]["state"], "trying");
    assert_eq!(st["slots"]["B"]["state"], "good");
}

#[test]
fn raw_image_larger_than_the_slot() {
    let env = Env::new();
    let img = env.path("huge.ext4");
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .arg(format!("{}M", SLOT_MIB + 1)));
    let bundle = env.bundle(Source::Image(&img), "1.0.0", "zstd");
    let before = env.snapshot();
    install(&env, &bundle).failed(3, &["slot B", "payload needs"]);
    env.assert_untouched(&before);
    assert_eq!(env.status(Some("A"))["slots"]["B"]["state"], "empty");
}

#[test]
fn config_naming_a_missing_partition() {
    let env = Env::new();
    let bundle = env.simple_bundle("1.0.0");
    let cfg = env.config_with(|c| c.slot_b = "partlabel = \"nope\"".into());
    let before = env.snapshot();
    let run = env.abup_with(&cfg, &["--booted-slot", "A", "install", s(&bundle)], None);
    run.failed(3, &["nope"]);
    env.assert_untouched(&before);
    let run = env.abup_with(&cfg, &["--booted-slot", "A", "status"], None);
    run.failed(3, &["nope"]);
}

/// Mounting B (read-only, as a curious admin would) must stop an install.
fn refused_while_mounted(env: &Env, dev: &Path) {
    let bundle = env.simple_bundle("1.0.0");
    let before = env.snapshot();
    let slot_b = env.disk.sha256_of_partition("rootB");
    {
        let m = Mount::ext4(dev, false);
        let run = install(env, &bundle);
        run.failed(3, &["mounted", s(m.path())]);
    }
    env.assert_untouched(&before);
    assert_eq!(
        env.disk.sha256_of_partition("rootB"),
        slot_b,
        "slot B was written while mounted"
    );
}

/// A recognisable filesystem on slot B.
fn format_b(env: &Env) {
    env.disk.mkfs("rootB");
    let m = env.disk.mount("rootB", true);
    write(m.path(), "etc/hostname", "mounted-b\n", 0o644);
}

#[test]
fn target_slot_mounted_on_a_kernel_partition_node() {
    let env = Env::builder().sector(4096).kernel_partitions().build();
    format_b(&env);
    refused_while_mounted(&env, &env.disk.kernel_node(3));
}

/// With a disk-image file (or a loop disk without partition nodes), abup
/// reaches each slot through a loop device it attaches itself, so it must
/// also notice a mount of the same byte range through any other device, or
/// it reformats a mounted filesystem underneath its users.
#[test]
fn target_slot_mounted_through_another_loop_device() {
    let env = Env::new();
    format_b(&env);
    let lo = env.disk.attach("rootB", true);
    refused_while_mounted(&env, lo.path());
}

/// A kernel partition node over other bytes than the GPT gives its
/// partition (a stale kernel table: the disk repartitioned, or a loop number
/// reused, without a re-read) is refused: writing slot B through it would
/// write elsewhere, here into the booted slot A.
#[test]
fn stale_kernel_partition_node_is_refused() {
    let env = Env::builder().sector(4096).build();
    let bundle = env.simple_bundle("1.0.0");
    let whole = env.disk.device();
    let a = env.disk.part("rootA");
    // The kernel's partition 3 over slot A's bytes (addpart counts 512-byte
    // units); the test disk removes it on drop.
    sh(Command::new("addpart")
        .arg(&whole)
        .arg("3")
        .arg((a.start / 512).to_string())
        .arg((a.size / 512).to_string()));
    let before = env.snapshot();
    let slot_b = env.disk.sha256_of_partition("rootB");
    let line = install(&env, &bundle).failed(3, &["stale", "partx -u", "rootB"]);
    assert!(line.contains(&format!("{}p3", whole.display())), "{line}");
    env.assert_untouched(&before);
    assert_eq!(env.disk.sha256_of_partition("rootB"), slot_b);
    // Once the kernel's table matches the disk, the same install goes through.
    sh(Command::new("partx").arg("-u").arg(&whole));
    install(&env, &bundle).ok();
}

#[test]
fn trailing_garbage_after_the_bundle() {
    let env = Env::new();
    let bundle = env.simple_bundle("1.0.0");
    let mut bytes = fs::read(&bundle).unwrap();
    bytes.extend_from_slice(b"GARBAGE");
    let long = env.path("long.abup");
    fs::write(&long, &bytes).unwrap();
    let before = env.snapshot();
    let line = install(&env, &long).failed(3, &["unexpected bytes"]);
    assert!(line.starts_with("error: check: "), "{line}");
    env.assert_untouched(&before);
    // Through a pipe it is only seen after the payload.
    env.abup_stdin(&["--booted-slot", "A", "install", "-"], bytes)
        .failed(1, &["after the bundle end marker"]);
    env.assert_untouched(&before);
    assert_eq!(env.status(Some("A"))["slots"]["B"]["state"], "empty");
}

#[test]
fn tar_payload_too_large_for_the_slot_is_refused_before_writing() {
    let env = Env::new();
    let dir = env.path("rootfs");
    simple_rootfs(&dir, "1.0.0");
    // Zeros compress to almost nothing, but take their full size on ext4.
    let big = dir.join("usr/share/big.bin");
    fs::File::create(&big)
        .and_then(|f| f.set_len((SLOT_MIB - 6) * MIB))
        .unwrap();
    let bundle = env.bundle(Source::Rootfs(&dir), "1.0.0", "zstd");
    let before = env.snapshot();
    let line = install(&env, &bundle).failed(3, &["slot B", "payload needs"]);
    assert!(line.starts_with("error: check: "), "{line}");
    env.assert_untouched(&before);
}

#[test]
fn usage_errors_exit_2_and_a_missing_config_exits_3() {
    for args in [
        vec!["install"],
        vec!["--booted-slot", "C", "status"],
        vec!["install", "--target-slot", "X", "b.abup"],
        vec!["no-such-verb"],
    ] {
        let run = run_abup(
            &args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            None,
        );
        assert_eq!(run.code, 2, "abup {args:?}:\n{run}");
    }
    let run = run_abup(
        &[
            "--config".to_string(),
            "/nonexistent/abup.toml".to_string(),
            "status".to_string(),
        ],
        None,
    );
    run.failed(3, &["/nonexistent/abup.toml", "--config"]);

    // With --json, stdout carries the failure too, for a cloud reading it.
    let run = run_abup(
        &["--config", "/nonexistent/abup.toml", "--json", "mark-good"].map(String::from),
        None,
    );
    let line = run.failed(3, &["/nonexistent/abup.toml"]);
    let v = run.json();
    assert_eq!(v["result"], "failed");
    assert_eq!(v["exit_code"], 3);
    assert_eq!(format!("error: {}", v["error"].as_str().unwrap()), line);
}

#[test]
fn target_slot_mounted_through_a_loop_over_the_image_behind_a_loop_disk() {
    // abup is given /dev/loopN (4096-byte sectors); B is mounted through a
    // loop device over the image file itself, not over /dev/loopN.
    let env = Env::builder().sector(4096).build();
    format_b(&env);
    let p = env.disk.part("rootB");
    let lo = LoopDevice::attach(
        &env.disk.image,
        LoopOpts {
            offset: Some(p.start),
            size: Some(p.size),
            sector: Some(4096),
            read_only: true,
        },
    );
    refused_while_mounted(&env, lo.path());
}

/// Two installs must never run at once. Without a lock, a second install
/// runs while the first waits for the end of its bundle stream: the second
/// rewrites slot B, the first then records its own version for it, and both
/// mount the boot partition at once (through two loop devices), which
/// damages it.
#[test]
fn a_second_install_is_refused_while_one_is_running() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    use std::sync::mpsc;
    use std::time::Duration;

    let env = Env::builder().preserve(&[]).build();
    let image = |version: &str| {
        let tree = env.path("tree");
        simple_rootfs(&tree, version);
        let img = env.path("rootfs.ext4");
        sh(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&img)
            .arg("8M"));
        img
    };
    let (img1, img2) = (image("1.0.0"), image("2.0.0"));
    let first_bundle = env.bundle(Source::Image(&img1), "1.0.0", "zstd");
    let second_bundle = env.bundle(Source::Image(&img2), "2.0.0", "zstd");
    let before = env.snapshot();

    // The first install reads its bundle from a pipe that stays open: it
    // writes slot B, then waits in `verify` for the end of the stream.
    let mut first = Command::new(abup_bin())
        .args([
            "--config",
            s(&env.config),
            "--json",
            "--booted-slot",
            "A",
            "install",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting abup");
    let mut pipe = first.stdin.take().unwrap();
    let stderr = first.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all += &line;
            all.push('\n');
        }
        all
    });
    pipe.write_all(&fs::read(&first_bundle).unwrap()).unwrap();
    pipe.flush().unwrap();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line == "==> verify" => break,
            Ok(_) => {}
            Err(e) => {
                // End its stream rather than kill it, so that it unmounts
                // and detaches what it attached.
                drop(pipe);
                let _ = first.wait();
                panic!(
                    "the first install never reached verify ({e}): {}",
                    reader.join().unwrap()
                );
            }
        }
    }
    // Let it settle in its blocking read.
    std::thread::sleep(Duration::from_millis(300));

    // The second install runs in a thread: should it wait for a lock
    // instead of refusing, close the first one's stream after a while so
    // that the first can finish and release it.
    let second_args: Vec<String> = [
        "--config",
        s(&env.config),
        "--booted-slot",
        "A",
        "install",
        s(&second_bundle),
    ]
    .map(String::from)
    .to_vec();
    let second = std::thread::spawn(move || run_abup(&second_args, None));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !second.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(pipe);
    let second = second.join().unwrap();
    let first_out = first
        .wait_with_output()
        .expect("waiting for the first install");
    let first_err = reader.join().unwrap();
    assert!(
        first_out.status.success(),
        "the first install failed:\n{}\n{first_err}",
        String::from_utf8_lossy(&first_out.stdout)
    );
    assert!(leaked_loops(&env.disk.device()).is_empty());
    assert!(
        second.code == 0 || second.code == 4,
        "the second install should be refused (4, lock held) or wait its turn (0):\n{second}"
    );

    let mut problems = Vec::new();
    // What status says slot B holds must be what it holds.
    let st = env.status(Some("A"));
    let recorded = st["slots"]["B"]["version"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let actual = {
        let b = env.disk.mount("rootB", false);
        fs::read_to_string(b.path().join("etc/os-release")).unwrap()
    };
    if !actual.contains(&format!("VERSION={recorded}\n")) {
        problems.push(format!(
            "status says slot B holds version {recorded}, but it holds:\n{actual}"
        ));
    }
    // The boot partition must have survived.
    {
        let boot = env.disk.attach("boot", true);
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(boot.path())
            .output()
            .unwrap();
        if !fsck.status.success() {
            problems.push(format!(
                "e2fsck finds the boot partition damaged:\n{}",
                String::from_utf8_lossy(&fsck.stdout)
            ));
        }
    }
    if env.disk.sha256_of_partition("rootA") != before.slot_a {
        problems.push("slot A changed".to_string());
    }
    assert!(
        problems.is_empty(),
        "two installs ran at once (second install exited {}):\n{}\n--- second install ---\n{second}",
        second.code,
        problems.join("\n")
    );
}

#[test]
fn missing_grubenv_is_refused_and_not_created() {
    let env = Env::builder().grub(GrubLoc::File).build();
    fs::remove_file(&env.envfile).unwrap();
    let bundle = env.simple_bundle("1.0.0");
    let slot_a = env.disk.sha256_of_partition("rootA");
    install(&env, &bundle).failed(3, &["grub", "does not exist", "grub-editenv"]);
    assert!(!env.envfile.exists(), "abup must not invent a grubenv");
    assert_eq!(env.disk.sha256_of_partition("rootA"), slot_a);
}

#[test]
fn corrupt_slot_records_are_refused() {
    let env = Env::new();
    let bundle = env.simple_bundle("1.0.0");
    fs::create_dir_all(&env.state_dir).unwrap();
    fs::write(env.state_dir.join("slots.json"), "{ not json").unwrap();
    let before = env.snapshot();
    install(&env, &bundle).failed(3, &["slot records"]);
    env.assert_untouched(&before);
    assert_eq!(
        fs::read_to_string(env.state_dir.join("slots.json")).unwrap(),
        "{ not json"
    );
}
