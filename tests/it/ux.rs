//! The user-facing contract of issue 10: the `--json` event stream, the run
//! history and its events across a slot switch, queued updates with retry,
//! exit codes, status without root, generated completions and man pages,
//! and the papercuts (`bundle create -o`, `action` names, usage errors).

use crate::util::*;
use serde_json::Value;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// Every stdout line of a `--json` install, parsed; panics on a line that
/// is not one JSON object.
#[track_caller]
fn stream(run: &Run) -> Vec<Value> {
    run.stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l:?}\n{run}"))
        })
        .collect()
}

/// Checks the stream's shape: each step starts, then finishes, in the order
/// of the final report; progress only inside a started step; the report is
/// the last line and agrees with the step events. Returns the report.
#[track_caller]
fn check_stream(lines: &[Value]) -> Value {
    let report = lines.last().expect("an empty stream").clone();
    assert_eq!(report["type"], "report", "the last line is the report");
    let mut open: Option<String> = None;
    let mut finished = Vec::new();
    for l in &lines[..lines.len() - 1] {
        match l["type"].as_str().unwrap() {
            "step-started" => {
                assert!(open.is_none(), "{l} started inside {open:?}");
                open = Some(l["step"].as_str().unwrap().to_string());
            }
            "step-finished" => {
                let step = l["step"].as_str().unwrap();
                assert_eq!(open.as_deref(), Some(step), "{l} finished unstarted");
                open = None;
                finished.push((step.to_string(), l["state"].as_str().unwrap().to_string()));
            }
            "progress" => {
                assert_eq!(
                    open.as_deref(),
                    l["step"].as_str(),
                    "progress outside its step: {l}"
                );
            }
            "event" => {}
            other => panic!("unknown event type {other}: {l}"),
        }
    }
    assert!(open.is_none(), "step {open:?} never finished");
    assert_eq!(finished, steps(&report), "step events and report disagree");
    report
}

/// An uncompressed 8 MiB ext4 image bundle: several chunks, so that a byte
/// flipped in the middle is found during the write (exit 1), not at check.
fn image_bundle(env: &Env, version: &str, compression: &str) -> std::path::PathBuf {
    let img = env.path("rootfs.img");
    let f = fs::File::create(&img).unwrap();
    f.set_len(8 * MIB).unwrap();
    // Holding the kernel grub.cfg boots, or install refuses to activate it.
    let tree = env.path("image-tree");
    write(&tree, "boot/vmlinuz", "test kernel\n", 0o644);
    sh(Command::new("mkfs.ext4").args(["-q", "-F", "-d", s(&tree), s(&img)]));
    env.bundle(Source::Image(&img), version, compression)
}

/// A copy of `bundle` with one byte flipped in the middle of its payload.
fn corrupted(env: &Env, bundle: &Path) -> std::path::PathBuf {
    let range = payload_range(bundle);
    let mut bytes = fs::read(bundle).unwrap();
    bytes[((range.start + range.end) / 2) as usize] ^= 0xff;
    let bad = env.path("corrupt.abup");
    fs::write(&bad, &bytes).unwrap();
    bad
}

/// Field `key` of every object in the JSON array `v`.
fn field<'a>(v: &'a Value, key: &str) -> Vec<&'a str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e[key].as_str().unwrap())
        .collect()
}

/// A signed bundle for another device type: refused at check.
fn other_board_bundle(env: &Env) -> std::path::PathBuf {
    let dir = env.path("rootfs");
    simple_rootfs(&dir, "2.0.0");
    env.bundle_opts(
        Source::Rootfs(&dir),
        "2.0.0",
        "zstd",
        Some(&env.secret.clone()),
        "another-board",
    )
}

fn event_names(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l["type"] == "event")
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn json_stream_on_success_is_ordered_and_complete() {
    let env = Env::new();
    // An image payload of 8 MiB, so that the write has bytes to count.
    let bundle = image_bundle(&env, "2.0.0", "zstd");

    let run = env.abup(&["--json", "--booted-slot", "A", "install", s(&bundle)]);
    run.ok();
    let lines = stream(&run);
    let report = check_stream(&lines);
    assert_eq!(report["result"], "success");
    assert_eq!(report["exit_code"], 0);
    assert_eq!(report["command"], "install");
    assert_eq!(report["version"], "2.0.0");
    assert_eq!(report["target_slot"], "B");
    assert_eq!(report["activated_slot"], "B");
    assert_eq!(report["booted_slot"], "A");
    assert_eq!(step_names(&report), INSTALL_STEPS);
    // Progress of the write, rising to exactly the payload's size.
    let progress: Vec<&Value> = lines.iter().filter(|l| l["type"] == "progress").collect();
    assert!(!progress.is_empty(), "no progress events:\n{run}");
    let done: Vec<u64> = progress
        .iter()
        .map(|p| p["done"].as_u64().unwrap())
        .collect();
    assert!(done.windows(2).all(|w| w[0] < w[1]), "{done:?}");
    let last = progress.last().unwrap();
    assert_eq!(last["step"], "write");
    assert_eq!(last["done"], 8 * MIB);
    assert_eq!(last["total"], 8 * MIB);
    // pending once the checks passed, before anything was written;
    // updated at the very end.
    assert_eq!(event_names(&lines), ["pending", "updated"]);
    let pos = |pred: &dyn Fn(&Value) -> bool| lines.iter().position(pred).unwrap();
    let pending = pos(&|l| l["name"] == "pending");
    let mark_bad = pos(&|l| l["type"] == "step-started" && l["step"] == "mark-bad");
    let activated = pos(&|l| l["type"] == "step-finished" && l["step"] == "activate");
    let updated = pos(&|l| l["name"] == "updated");
    assert!(pending < mark_bad && activated < updated, "{run}");
    // The report keeps them too.
    assert_eq!(field(&report["events"], "name"), ["pending", "updated"]);
    // Human step lines went to stderr.
    assert!(run.stderr.contains("==> write"), "{run}");
}

#[test]
fn json_stream_is_complete_on_each_kind_of_failure() {
    let env = Env::new();
    // Refused at check: nothing pending, nothing written.
    let other = other_board_bundle(&env);
    let before = env.snapshot();
    let run = env.abup(&["--json", "--booted-slot", "A", "install", s(&other)]);
    assert_eq!(run.code, 3, "{run}");
    let lines = stream(&run);
    let report = check_stream(&lines);
    assert_eq!(report["result"], "failed");
    assert_eq!(report["exit_code"], 3);
    assert_eq!(report["failed_step"], "check");
    assert_eq!(event_names(&lines), ["failed"]);
    env.assert_untouched(&before);

    // Failed during the write: a payload corrupt after its first chunk.
    let bundle = image_bundle(&env, "2.0.0", "none");
    let bad = corrupted(&env, &bundle);
    let run = env.abup(&["--json", "--booted-slot", "A", "install", s(&bad)]);
    assert_eq!(run.code, 1, "{run}");
    let lines = stream(&run);
    let report = check_stream(&lines);
    assert_eq!(report["exit_code"], 1);
    let failed = report["failed_step"].as_str().unwrap();
    assert!(failed == "write" || failed == "verify", "{report:#}");
    assert_eq!(event_names(&lines), ["pending", "failed"]);
    env.assert_untouched(&before);

    // A bad config: the first step fails, and the stream still ends with
    // the report.
    let broken = env.path("broken.toml");
    fs::write(&broken, "compatible = 1\n").unwrap();
    let run = env.abup_with(
        &broken,
        &["--json", "--booted-slot", "A", "install", s(&bundle)],
        None,
    );
    assert_eq!(run.code, 3, "{run}");
    let report = check_stream(&stream(&run));
    assert_eq!(report["failed_step"], "load-config");

    // Every run that got as far as reading the config is in the history.
    let hist = env.abup(&["--json", "history"]);
    hist.ok();
    let runs = hist.json();
    let codes: Vec<i64> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["exit_code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [3, 1], "{hist}");
}

#[test]
fn history_and_events_across_a_slot_switch() {
    let env = Env::new();
    let bundle = env.simple_bundle("2.0.0");
    env.install_ok("A", &bundle, &[]);
    // "Reboot" into B; the mark-good unit blesses it and abup notices the
    // new slot came up.
    env.abup(&["--booted-slot", "B", "mark-good"]).ok();
    let v2 = env.simple_bundle("3.0.0");
    env.install_ok("B", &v2, &[]);

    let run = env.abup(&["--json", "history"]);
    run.ok();
    let runs = run.json();
    assert_eq!(field(&runs, "command"), ["install", "mark-good", "install"]);
    assert_eq!(runs[0]["booted_slot"], "A");
    assert_eq!(runs[1]["booted_slot"], "B");
    assert_eq!(runs[2]["target_slot"], "A");
    assert!(runs[0]["duration_ms"].is_u64() && runs[0]["started_at"].as_u64() > Some(0));

    // `history N` is the last N runs.
    let last = env.abup(&["--json", "history", "1"]);
    let last = last.json();
    assert_eq!(last.as_array().unwrap().len(), 1);
    assert_eq!(last[0]["version"], "3.0.0");

    let ev = env.abup(&["--json", "events"]);
    ev.ok();
    let ev = ev.json();
    assert_eq!(
        field(&ev, "name"),
        [
            "pending",
            "updated",
            "booted-new-slot",
            "marked-good",
            "pending",
            "updated"
        ]
    );
    // And for a person.
    let text = env.abup(&["history"]);
    text.ok();
    assert_eq!(text.stdout.lines().count(), 3, "{text}");
    assert!(text.stdout.contains("mark-good"), "{text}");
    let text = env.abup(&["events"]);
    assert!(
        text.stdout
            .contains("booted-new-slot  booted slot B (version 2.0.0)"),
        "{text}"
    );
}

#[test]
fn a_fallback_is_detected_on_the_next_run() {
    let env = Env::new();
    let bundle = env.simple_bundle("2.0.0");
    env.install_ok("A", &bundle, &[]);
    // B never came up healthy: GRUB used its three tries and fell back to A.
    {
        let boot = env.disk.mount("boot", true);
        sh(Command::new("grub-editenv")
            .arg(boot.path().join("grub/grubenv"))
            .args(["set", "B_TRY=3"]));
    }
    // Back on A, the mark-good unit runs.
    env.abup(&["--booted-slot", "A", "mark-good"]).ok();
    let ev = env.abup(&["--json", "events"]).json();
    assert_eq!(
        field(&ev, "name")[2..],
        ["fell-back", "marked-good"],
        "{ev:#}"
    );
    assert_eq!(ev[2]["slot"], "B");
    assert_eq!(ev[2]["version"], "2.0.0");
    // Only once.
    env.abup(&["--booted-slot", "A", "mark-good"]).ok();
    let ev = env.abup(&["--json", "events"]).json();
    let names = field(&ev, "name");
    assert_eq!(names.iter().filter(|n| **n == "fell-back").count(), 1);
}

#[test]
fn queue_apply_and_retry_until_it_goes_through() {
    let env = Env::new();
    let bundle = env.simple_bundle("2.0.0");
    // Nothing queued: nothing to do.
    let run = env.abup(&["--booted-slot", "A", "apply-queued"]);
    assert_eq!(run.code, 7, "{run}");

    let run = env.abup(&["--json", "queue", s(&bundle)]);
    run.ok();
    let staged = env.state_dir.join("queued.abup");
    assert_eq!(sha256_file(&staged), sha256_file(&bundle));
    let before = env.snapshot();
    assert_eq!(env.status(Some("A"))["slots"]["B"]["state"], "empty");

    // A corrupt bundle is refused at queue time and does not replace it.
    let range = payload_range(&bundle);
    let mut bytes = fs::read(&bundle).unwrap();
    bytes[(range.start + 10) as usize] ^= 1;
    let bad = env.path("bad.abup");
    fs::write(&bad, &bytes).unwrap();
    let run = env.abup(&["queue", s(&bad)]);
    assert_eq!(run.code, 3, "{run}");
    assert_eq!(sha256_file(&staged), sha256_file(&bundle));

    // First attempt fails: slot B is in use (mounted).
    env.disk.mkfs("rootB");
    let attempt = {
        let _busy = env.disk.mount("rootB", false);
        env.abup(&["--json", "--booted-slot", "A", "apply-queued"])
    };
    assert_eq!(attempt.code, 3, "{attempt}");
    assert!(staged.exists(), "a failed attempt keeps the update queued");
    env.assert_untouched(&before);

    // The next boot tries again and it goes through.
    let run = env.abup(&["--json", "--booted-slot", "A", "apply-queued"]);
    run.ok();
    let lines = stream(&run);
    let report = check_stream(&lines);
    assert_eq!(report["command"], "apply-queued");
    assert_eq!(event_names(&lines), ["retrying", "pending", "updated"]);
    assert!(!staged.exists());
    let st = env.status(Some("A"));
    assert_eq!(st["primary"], "B");
    assert_eq!(st["slots"]["B"]["version"], "2.0.0");
    // And then there is nothing left to do.
    assert_eq!(env.abup(&["--booted-slot", "A", "apply-queued"]).code, 7);
}

#[test]
fn check_runs_every_check_and_writes_nothing() {
    let env = Env::new();
    let bundle = env.simple_bundle("2.0.0");
    let before = env.snapshot();
    let b_before = env.disk.sha256_of_partition("rootB");
    let run = env.abup(&["--json", "--booted-slot", "A", "check", s(&bundle)]);
    run.ok();
    let report = check_stream(&stream(&run));
    assert_eq!(
        step_names(&report),
        [
            "load-config",
            "verify-bundle",
            "inspect-system",
            "check",
            "verify-payload"
        ]
    );
    env.assert_untouched(&before);
    assert_eq!(env.disk.sha256_of_partition("rootB"), b_before);
    assert!(
        !env.state_dir.join("history.jsonl").exists() && !env.state_dir.join("lock").exists(),
        "check wrote into the state directory"
    );

    // A corrupt payload is found without writing.
    let range = payload_range(&bundle);
    let mut bytes = fs::read(&bundle).unwrap();
    bytes[(range.start + 10) as usize] ^= 1;
    let bad = env.path("bad.abup");
    fs::write(&bad, &bytes).unwrap();
    let run = env.abup(&["--booted-slot", "A", "check", s(&bad)]);
    run.failed(3, &["verify-payload"]);
    assert_eq!(env.disk.sha256_of_partition("rootB"), b_before);
}

#[test]
fn documented_exit_codes() {
    let env = Env::new();
    // 0
    env.abup(&["--booted-slot", "A", "status"]).ok();
    // 2: every bad argument, whoever notices it.
    for args in [
        &["--booted-slot", "A", "mark-good", "C"][..],
        &["mark-bad", "x"],
        &["install", "--target-slot", "C", "b"],
        &["install"],
        &["history", "many"],
        &["--no-such-flag", "status"],
        &["completions", "tcsh"],
    ] {
        let run = env.abup(args);
        assert_eq!(run.code, 2, "{args:?}:\n{run}");
    }
    // 3: refused before anything was written.
    let other = other_board_bundle(&env);
    assert_eq!(
        env.abup(&["--booted-slot", "A", "install", s(&other)]).code,
        3
    );
    // 1: failed during the write.
    let bad = corrupted(&env, &image_bundle(&env, "2.0.0", "none"));
    assert_eq!(
        env.abup(&["--booted-slot", "A", "install", s(&bad)]).code,
        1
    );
    // 7: nothing to do.
    assert_eq!(env.abup(&["--booted-slot", "A", "apply-queued"]).code, 7);
}

#[test]
fn papercuts() {
    let env = Env::new();
    // bundle create -o refuses to overwrite unless --force.
    let dir = env.path("rootfs");
    simple_rootfs(&dir, "2.0.0");
    let out = env.path("out.abup");
    fs::write(&out, "precious").unwrap();
    let create = |extra: &[&str]| {
        let mut args = vec![
            "bundle",
            "create",
            "--rootfs",
            s(&dir),
            "--version",
            "2.0.0",
            "--compatible",
            COMPATIBLE,
            "--key",
            s(&env.secret),
            "-o",
            s(&out),
        ];
        args.extend_from_slice(extra);
        run_abup(
            &args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            None,
        )
    };
    create(&[]).failed(3, &["already exists", "--force"]);
    assert_eq!(fs::read_to_string(&out).unwrap(), "precious");
    create(&["--force"]).ok();
    assert_eq!(bundle_info(&out)["manifest"]["version"], "2.0.0");

    // bundle info without --key says the signature was not checked.
    let info = run_abup(&["bundle".into(), "info".into(), s(&out).into()], None);
    info.ok();
    assert!(info.stdout.contains("not verified; pass --key"), "{info}");
    let info = run_abup(
        &[
            "bundle".into(),
            "info".into(),
            s(&out).into(),
            "--key".into(),
            s(&env.public).into(),
        ],
        None,
    );
    assert!(info.stdout.contains("(verified:"), "{info}");

    // --no-activate: the written slot is inactive, not bad.
    env.install_ok("A", &out, &["--no-activate"]);
    assert_eq!(env.status(Some("A"))["slots"]["B"]["state"], "inactive");

    // JSON action names the verb.
    for (verb, slot) in [("mark-active", "B"), ("mark-good", "B"), ("mark-bad", "B")] {
        let run = env.abup(&["--json", "--booted-slot", "A", verb, slot]);
        run.ok();
        assert_eq!(run.json()["action"], verb, "{run}");
    }

    // -q: only the result line of the report.
    let v3 = env.simple_bundle("3.0.0");
    let run = env.abup(&["-q", "--booted-slot", "A", "install", s(&v3)]);
    run.ok();
    assert_eq!(run.stdout.trim().lines().count(), 1, "{run}");
    assert!(run.stdout.starts_with("result: success"), "{run}");

    // disk.device naming a partition.
    let env4k = Env::builder().sector(4096).kernel_partitions().build();
    let part = env4k.disk.kernel_node(2);
    let cfg = env4k.config_with(|_| {});
    let text = fs::read_to_string(&cfg).unwrap();
    let dev = s(&env4k.disk.device()).to_string();
    fs::write(&cfg, text.replace(&dev, s(&part))).unwrap();
    let run = env4k.abup_with(&cfg, &["--booted-slot", "A", "status"], None);
    run.failed(3, &["is partition 2", "whole disk"]);
}

#[test]
fn completions_and_man_pages_are_generated_from_the_cli() {
    let run = run_abup(&["completions".into(), "bash".into()], None);
    run.ok();
    assert!(run.stdout.contains("complete -F _abup"), "{run}");
    assert!(run.stdout.contains("apply-queued"), "{run}");
    let run = run_abup(&["completions".into(), "zsh".into()], None);
    assert!(run.stdout.starts_with("#compdef abup"), "{run}");
    let run = run_abup(&["manpage".into()], None);
    run.ok();
    assert!(
        run.stdout.starts_with(".ie"),
        "{}",
        &run.stdout[..80.min(run.stdout.len())]
    );
    assert!(run.stdout.contains(".TH abup 1"), "{run}");
    assert!(run.stdout.contains("mark\\-good"), "{run}");
    let dir = tempfile::tempdir().unwrap();
    run_abup(
        &["manpage".into(), "--out-dir".into(), s(dir.path()).into()],
        None,
    )
    .ok();
    for page in ["abup.1", "abup-install.1", "abup-status.1", "abup-queue.1"] {
        assert!(dir.path().join(page).exists(), "{page} missing");
    }
}

/// Runs abup as the unprivileged user `nobody`.
fn as_nobody(args: &[&str]) -> Run {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            abup_bin(),
        ])
        .args(args)
        .env_remove("ABUP_CONFIG")
        .output()
        .expect("running setpriv");
    Run {
        args: args.iter().map(|a| a.to_string()).collect(),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn open_up(mut p: &Path) {
    // The test's temp dir is private to root; let `nobody` read the config
    // and the state directory, as on a device.
    while let Some(parent) = p.parent() {
        if p == Path::new("/tmp") || parent == p {
            break;
        }
        let mode = fs::metadata(p).unwrap().permissions().mode();
        fs::set_permissions(p, fs::Permissions::from_mode(mode | 0o755)).unwrap();
        p = parent;
    }
}

#[test]
fn status_without_root_shows_what_it_can_and_says_what_needs_root() {
    let env = Env::new();
    let bundle = env.simple_bundle("2.0.0");
    env.install_ok("A", &bundle, &[]);
    open_up(&env.state_dir);
    open_up(&env.config);
    for f in fs::read_dir(&env.state_dir).unwrap() {
        let p = f.unwrap().path();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    }
    let cfg = s(&env.config).to_string();
    let run = as_nobody(&["--config", &cfg, "--json", "status"]);
    assert_eq!(run.code, 0, "{run}");
    let st: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(st["slots"]["B"]["version"], "2.0.0", "{st:#}");
    assert_eq!(st["slots"]["B"]["recorded"], "installed");
    assert_eq!(st["last_run"]["command"], "install");
    assert_eq!(st["last_run"]["result"], "success");
    assert_eq!(st["run_in_progress"], Value::Null);
    assert!(st["note"].as_str().unwrap().contains("need root"), "{st:#}");
    let run = as_nobody(&["--config", &cfg, "status"]);
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains("sudo abup status"), "{run}");
    assert!(run.stdout.contains("last run:   install success"), "{run}");
    assert!(!run.stderr.contains("Permission denied"), "{run}");
    // History and events read without root too.
    let run = as_nobody(&["--config", &cfg, "history"]);
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains("install 2.0.0 into B"), "{run}");
    // Changing anything still needs root, and says so.
    as_nobody(&["--config", &cfg, "mark-good", "A"]).failed(3, &["needs root"]);
}

#[test]
fn status_shows_the_run_in_progress() {
    // The grubenv in a plain file: status opens no second mount of the boot
    // partition beside the running install's.
    let env = Env::builder().grub(GrubLoc::File).build();
    let bundle = image_bundle(&env, "2.0.0", "none");
    let bytes = fs::read(&bundle).unwrap();
    let range = payload_range(&bundle);
    // A slow sender: abup gets the header and 3 MiB of the 8 MiB payload,
    // then waits for more in the middle of the write.
    let mut child = Command::new(abup_bin())
        .args([
            "--config",
            s(&env.config),
            "--booted-slot",
            "A",
            "install",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let cut = (range.start + 3 * MIB) as usize;
    {
        use std::io::Write;
        stdin.write_all(&bytes[..cut]).unwrap();
        stdin.flush().unwrap();
    }
    // Not env.abup: the running install's own loop devices are attached.
    let status = |json: bool| {
        let mut args = vec!["--config", s(&env.config), "--booted-slot", "A", "status"];
        if json {
            args.insert(0, "--json");
        }
        run_abup(
            &args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            None,
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let st = loop {
        let st = status(true).json();
        let r = &st["run_in_progress"];
        if (r["step"] == "write" && r["progress"]["done"].as_u64() > Some(0))
            || std::time::Instant::now() > deadline
        {
            break st;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let r = &st["run_in_progress"];
    assert_eq!(r["pid"], child.id(), "{st:#}");
    assert_eq!(r["verb"], "install", "{st:#}");
    assert_eq!(r["step"], "write", "{st:#}");
    assert_eq!(r["progress"]["total"], 8 * MIB, "{st:#}");
    let done = r["progress"]["done"].as_u64().unwrap();
    assert!(done > 0 && done <= 3 * MIB, "{st:#}");
    assert!(r["since"].as_u64() > Some(0));
    let text = status(false);
    assert!(
        text.stdout.contains("running:    pid") && text.stdout.contains("step write ("),
        "{text}"
    );
    // Send the rest; it finishes, and status says so.
    {
        use std::io::Write;
        stdin.write_all(&bytes[cut..]).unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
    let st = env.status(Some("A"));
    assert!(st["run_in_progress"].is_null(), "{st:#}");
    assert_eq!(st["last_run"]["result"], "success");
}
