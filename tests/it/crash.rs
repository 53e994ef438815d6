//! The crash matrix: abup killed, signalled and failed at named moments of
//! an install, on a disk-image file and on a block device (a loop device
//! holding the image), and after each the device recovers by itself.
//!
//! Fail points are armed through `ABUP_FAILPOINTS` (see `src/failpoint.rs`):
//! `kill` makes abup SIGKILL itself at the point (a real crash: no guard,
//! no handler runs), `stall` parks it there so the test can send a signal
//! from outside, `eio` injects an I/O error. After each crash the test
//! checks that the booted slot is byte-identical, that the boot settings
//! select a slot whose content is complete, that `status` tells the truth
//! (versions it shows are the versions on disk, no run in progress, how the
//! last run ended), that no mount or loop device of abup is left, and that
//! the next plain install succeeds.

use crate::util::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// Where an install is killed with SIGKILL: every step boundary and the
/// inside of the long steps.
const KILL_POINTS: &[&str] = &[
    "after-mark-bad",
    "before-mkfs",
    "after-mkfs",
    // mid-payload: after the 5th archive member
    "extract-member@5",
    "after-write",
    "after-verify",
    // mid-preserve: after the first preserved path
    "preserve-path@2",
    "after-preserve",
    // during the record: slots.json written and synced, not yet renamed
    // (the 1st write of slots.json is mark-bad's)
    "before-rename:slots.json@2",
    "after-record",
    "flip-before-rename",
    "flip-after-rename",
];

const VERSION: &str = "2.0.0";

/// One finished run of abup with fail points armed.
struct Outcome {
    status: ExitStatus,
    pid: u32,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The run report: the last line of the `--json` event stream.
    fn json(&self) -> Value {
        let last = self.stdout.lines().rev().find(|l| !l.trim().is_empty());
        serde_json::from_str(last.unwrap_or_default())
            .unwrap_or_else(|e| panic!("the last stdout line is not JSON ({e}):\n{}", self))
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs abup with `ABUP_FAILPOINTS=failpoints`. With `signal`, waits until
/// the stalled point `(name, signal)` is reached and sends the signal.
fn run_armed(
    config: &Path,
    failpoints: &str,
    args: &[&str],
    stdin: Option<&Path>,
    signal: Option<(&str, Signal)>,
) -> Outcome {
    let mut cmd = Command::new(abup_bin());
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("ABUP_FAILPOINTS", failpoints)
        .env_remove("ABUP_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(match stdin {
            Some(p) => Stdio::from(fs::File::open(p).expect("opening stdin file")),
            None => Stdio::null(),
        });
    let mut child = cmd.spawn().expect("starting abup");
    let pid = child.id();
    let mut out = child.stdout.take().expect("stdout pipe");
    let stdout = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = child.stderr.take().expect("stderr pipe");
    let (tx, rx) = mpsc::channel();
    let stderr = thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all += &line;
            all.push('\n');
        }
        all
    });
    if let Some((point, sig)) = signal {
        let want = format!("failpoint {point} reached");
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) if l.contains(&want) => break,
                Ok(_) => {}
                Err(e) => {
                    let _ = child.kill();
                    panic!("abup never reached {point} ({e})");
                }
            }
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
            .expect("signalling abup");
    }
    let status = child.wait().expect("waiting for abup");
    Outcome {
        status,
        pid,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The `ABUP_FAILPOINTS` item for `point` (`name` or `name@n`) and `action`.
fn arm(point: &str, action: &str) -> String {
    match point.split_once('@') {
        Some((name, n)) => format!("{name}={action}@{n}"),
        None => format!("{point}={action}"),
    }
}

/// The install every crash interrupts: from booted A into B, `--force` so
/// that it rewrites B even when B already holds the bundle.
fn crash_args(bundle: &Path) -> Vec<&str> {
    vec![
        "--json",
        "--booted-slot",
        "A",
        "install",
        s(bundle),
        "--force",
    ]
}

/// The version in slot B's `/etc/os-release`, or None when B holds no
/// mountable root with one.
fn version_in_b(env: &Env) -> Option<String> {
    let lo = env.disk.attach("rootB", true);
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args(["-t", "ext4", "-o", "ro,noload"])
        .arg(lo.path())
        .arg(dir.path())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return None;
    }
    let text = fs::read_to_string(dir.path().join("etc/os-release")).unwrap_or_default();
    let hostname = fs::read_to_string(dir.path().join("etc/hostname")).unwrap_or_default();
    unmount(dir.path());
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("VERSION="))
        .map(str::to_string)?;
    // A complete install carries the preserved hostname too.
    Some(if hostname == "device-42\n" {
        v
    } else {
        format!("{v} (without preserved files)")
    })
}

/// Unmounts `dir`, retrying while something briefly holds it (udev, blkid).
fn unmount(dir: &Path) {
    for _ in 0..50 {
        let ok = Command::new("umount")
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    sh(Command::new("umount").arg("--lazy").arg(dir));
}

/// Mounts still visible to the system that belong to the crashed process
/// (its mount point directory) or that mount anything of the test disk.
fn mounts_left(env: &Env, pid: u32) -> Vec<String> {
    let dir = format!("/run/abup/mnt-{pid}/");
    let disk = [env.disk.image.clone(), env.disk.device()];
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            let dev = l.split(' ').nth(2).unwrap_or_default();
            let backing = fs::read_to_string(format!("/sys/dev/block/{dev}/loop/backing_file"))
                .map(|b| PathBuf::from(b.trim()))
                .ok();
            l.contains(&dir) || backing.is_some_and(|b| disk.contains(&b))
        })
        .map(str::to_string)
        .collect()
}

/// Everything that must hold after a run that crashed or was stopped.
#[track_caller]
fn check_after(env: &Env, slot_a: &str, what: &str, o: &Outcome) {
    let now = env.disk.sha256_of_partition("rootA");
    if now != slot_a {
        let changed = env
            .disk
            .changed_blocks("rootA", &env.root.join("rootA.before"));
        let again = env.disk.sha256_of_partition("rootA");
        panic!(
            "{what}: the booted slot A changed (hash read again: {})\n{changed}\n{o}",
            if again == now {
                "same"
            } else if again == slot_a {
                "as before"
            } else {
                "different"
            }
        );
    }
    let left = mounts_left(env, o.pid);
    assert!(left.is_empty(), "{what}: mounts left: {left:?}");
    // The kernel detaches a self-clearing loop device once its last user
    // (udev probing it, on a loaded machine) lets go: allow for that.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = leaked_loops(&env.disk.device());
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: loop devices left: {left:?}"
        );
    }
    let st = env.status(Some("A"));
    let in_b = version_in_b(env);
    // The boot settings select a slot whose content is complete.
    let env_vars = env.grubenv();
    let primary = st["primary"].as_str();
    match primary {
        Some("A") => {}
        Some("B") => assert_eq!(
            in_b.as_deref(),
            Some(VERSION),
            "{what}: the boot settings select B, which is not complete\n{o}"
        ),
        other => panic!("{what}: primary {other:?}, grubenv {env_vars:?}"),
    }
    // status tells the truth about B.
    let b = &st["slots"]["B"];
    if let Some(v) = b["version"].as_str() {
        assert_eq!(
            in_b.as_deref(),
            Some(v),
            "{what}: status says B holds {v}\n{st:#}"
        );
    }
    if matches!(b["state"].as_str(), Some("good" | "trying")) {
        assert_eq!(in_b.as_deref(), Some(VERSION), "{what}: {st:#}");
    }
    assert!(
        st["run_in_progress"].is_null(),
        "{what}: a run in progress? {st:#}"
    );
    assert_eq!(st["last_run"]["command"], "install", "{what}: {st:#}");
}

/// The next plain install succeeds, boots B next, and cleaned up after the
/// crashed process.
#[track_caller]
fn check_next_install(env: &Env, bundle: &Path, what: &str, crashed: u32) {
    let report = env.install_ok("A", bundle, &[]);
    assert_eq!(
        version_in_b(env).as_deref(),
        Some(VERSION),
        "{what}: {report:#}"
    );
    let vars = env.grubenv();
    assert_eq!(vars["ORDER"], "B A", "{what}: {vars:?}");
    assert_eq!(vars["B_OK"], "1", "{what}: {vars:?}");
    let st = env.status(Some("A"));
    assert_eq!(st["slots"]["B"]["state"], "trying", "{what}: {st:#}");
    assert_eq!(st["last_run"]["result"], "success", "{what}: {st:#}");
    assert!(
        !Path::new(&format!("/run/abup/mnt-{crashed}")).exists(),
        "{what}: the crashed run's mount point directory is still there"
    );
}

fn kill_matrix(env: Env, mode: &str) {
    let bundle = env.simple_bundle(VERSION);
    let slot_a = env.disk.sha256_of_partition("rootA");
    env.disk
        .save_partition("rootA", &env.root.join("rootA.before"));
    for point in KILL_POINTS {
        let what = format!("{mode}: SIGKILL at {point}");
        let o = run_armed(
            &env.config,
            &arm(point, "kill"),
            &crash_args(&bundle),
            None,
            None,
        );
        assert_eq!(o.status.signal(), Some(9), "{what}: not killed\n{o}");
        check_after(&env, &slot_a, &what, &o);
        let st = env.status(Some("A"));
        assert_eq!(st["last_run"]["result"], "did-not-finish", "{what}: {st:#}");
        let text = env.abup(&["--booted-slot", "A", "status"]);
        assert!(
            text.stdout.contains("last run:   install did-not-finish"),
            "{what}:\n{text}"
        );
        check_next_install(&env, &bundle, &what, o.pid);
    }
}

#[test]
fn sigkill_at_every_point_on_an_image_file() {
    kill_matrix(Env::new(), "image file");
}

#[test]
fn sigkill_at_every_point_on_a_block_device() {
    kill_matrix(Env::builder().sector(4096).build(), "block device");
}

fn signal_matrix(env: Env, mode: &str) {
    let bundle = env.simple_bundle(VERSION);
    let slot_a = env.disk.sha256_of_partition("rootA");
    env.disk
        .save_partition("rootA", &env.root.join("rootA.before"));
    // In the middle of the write, in the middle of preserve.
    for point in ["extract-member@4", "preserve-path@2"] {
        for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            let what = format!("{mode}: {sig} at {point}");
            let name = point.split('@').next().unwrap();
            let o = run_armed(
                &env.config,
                &arm(point, "stall"),
                &crash_args(&bundle),
                None,
                Some((name, sig)),
            );
            if sig == Signal::SIGHUP {
                // A bundle file survives a lost terminal: the run completes.
                assert_eq!(o.code(), Some(0), "{what}\n{o}");
                assert_eq!(o.json()["result"], "success", "{what}\n{o}");
                check_after(&env, &slot_a, &what, &o);
                let st = env.status(Some("A"));
                assert_eq!(st["last_run"]["signal"], "SIGHUP", "{what}: {st:#}");
                assert_eq!(st["primary"], "B", "{what}: {st:#}");
            } else {
                assert_eq!(o.code(), Some(5), "{what}\n{o}");
                let r = o.json();
                assert_eq!(r["exit_code"], 5, "{what}");
                let step = r["failed_step"].as_str().unwrap_or_default().to_string();
                let want = if point.starts_with("preserve") {
                    "preserve"
                } else {
                    "write"
                };
                assert_eq!(step, want, "{what}\n{o}");
                let err = r["error"].as_str().unwrap_or_default();
                assert!(
                    err.contains(&format!("interrupted by {sig}")),
                    "{what}: {err}"
                );
                check_after(&env, &slot_a, &what, &o);
                let st = env.status(Some("A"));
                assert_eq!(st["primary"], "A", "{what}: {st:#}");
                assert_eq!(st["slots"]["B"]["state"], "empty", "{what}: {st:#}");
                let last = &st["last_run"];
                assert_eq!(last["result"], "failed", "{what}: {st:#}");
                assert_eq!(last["signal"], sig.as_str(), "{what}: {st:#}");
                assert_eq!(last["failed_step"], want, "{what}: {st:#}");
                assert_eq!(last["exit_code"], 5, "{what}: {st:#}");
            }
            check_next_install(&env, &bundle, &what, o.pid);
        }
    }
    // From stdin, a hang-up stops the run: whoever fed it is gone.
    let what = format!("{mode}: SIGHUP while reading stdin");
    let o = run_armed(
        &env.config,
        "extract-member=stall@4",
        &["--json", "--booted-slot", "A", "install", "-", "--force"],
        Some(&bundle),
        Some(("extract-member", Signal::SIGHUP)),
    );
    assert_eq!(o.code(), Some(5), "{what}\n{o}");
    check_after(&env, &slot_a, &what, &o);
    check_next_install(&env, &bundle, &what, o.pid);
}

#[test]
fn signals_during_the_write_on_an_image_file() {
    signal_matrix(Env::new(), "image file");
}

#[test]
fn signals_during_the_write_on_a_block_device() {
    signal_matrix(Env::builder().sector(4096).build(), "block device");
}

/// Injected I/O errors: (fail point, exit code, failed step, boot settings
/// flipped to B). Order matters: until the last one, nothing flips, so the
/// grubenv keeps its first bytes (B is already marked bad, so marking it
/// bad writes nothing).
const EIO_POINTS: &[(&str, i32, &str, bool)] = &[
    ("extract-member@3", 1, "write", false),
    ("write:slots.json@2", 1, "record", false),
    ("fsync:slots.json@2", 1, "record", false),
    ("rename:slots.json@2", 1, "record", false),
    ("write:grubenv", 1, "activate", false),
    // The grubenv is rewritten in place (what GRUB reads without journal
    // replay): once written, the flip is in place, only not confirmed
    // durable until its flush.
    ("fsync:grubenv", 6, "activate", true),
];

#[test]
fn injected_io_errors_at_write_record_and_flip() {
    let env = Env::new();
    let bundle = env.simple_bundle(VERSION);
    let before = env.snapshot();
    for &(point, code, step, flipped) in EIO_POINTS {
        let what = format!("EIO at {point}");
        let o = run_armed(
            &env.config,
            &arm(point, "eio"),
            &crash_args(&bundle),
            None,
            None,
        );
        assert_eq!(o.code(), Some(code), "{what}\n{o}");
        let r = o.json();
        assert_eq!(r["exit_code"], code, "{what}");
        assert_eq!(r["failed_step"], step, "{what}\n{o}");
        let err = r["error"].as_str().unwrap_or_default();
        assert!(err.contains("Input/output error"), "{what}: {err}");
        assert_eq!(
            o.stderr.lines().last().unwrap_or_default(),
            format!("error: {err}"),
            "{what}"
        );
        check_after(&env, &before.slot_a, &what, &o);
        let st = env.status(Some("A"));
        assert_eq!(st["last_run"]["exit_code"], code, "{what}: {st:#}");
        if flipped {
            assert!(err.contains("not confirmed durable"), "{what}: {err}");
            assert_eq!(st["primary"], "B", "{what}: {st:#}");
            assert_eq!(st["slots"]["B"]["state"], "trying", "{what}: {st:#}");
        } else {
            env.assert_untouched(&before);
            assert_eq!(st["last_run"]["result"], "failed", "{what}");
            assert_ne!(st["slots"]["B"]["state"], "good", "{what}: {st:#}");
        }
    }
    check_next_install(&env, &bundle, "after the injected errors", 0);
}

/// A config with another state directory for the same disk.
fn second_config(env: &Env) -> PathBuf {
    let text = fs::read_to_string(&env.config).unwrap();
    let other = env.path("other-state");
    let text = text.replace(s(&env.state_dir), s(&other));
    assert!(text.contains(s(&other)));
    let path = env.path("other.toml");
    fs::write(&path, text).unwrap();
    path
}

#[test]
fn two_configs_on_one_disk_exactly_one_proceeds() {
    let env = Env::new();
    let bundle = env.simple_bundle(VERSION);
    let before = env.snapshot();
    let other = second_config(&env);
    // The first run parks in its write; the second is refused meanwhile.
    let config = env.config.clone();
    let b1 = bundle.clone();
    let (tx, rx) = mpsc::channel();
    let first = thread::spawn(move || {
        let mut cmd = Command::new(abup_bin());
        cmd.arg("--config")
            .arg(&config)
            .args(crash_args(&b1))
            .env("ABUP_FAILPOINTS", "after-mark-bad=stall")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let err = child.stderr.take().unwrap();
        let mut lines = BufReader::new(err).lines();
        for l in lines.by_ref().map_while(Result::ok) {
            if l.contains("failpoint after-mark-bad reached") {
                break;
            }
        }
        tx.send(child.id()).unwrap();
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        (child.wait_with_output().unwrap(), rest)
    });
    let pid = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("first run stalls");
    // (Not through `env.abup`: the first run's loop devices are attached.)
    let abup = |config: &Path, args: &[&str]| {
        let mut all = vec!["--config".to_string(), s(config).to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        run_abup(&all, None)
    };
    for config in [&other, &env.config] {
        let run = abup(
            config,
            &["--booted-slot", "A", "install", s(&bundle), "--force"],
        );
        let line = run.failed(
            4,
            &["another abup run", &format!("pid {pid}"), "step mark-bad"],
        );
        assert!(line.contains("install"), "{line}");
    }
    let run = abup(&other, &["--booted-slot", "A", "mark-good", "A"]);
    run.failed(4, &[&format!("pid {pid}")]);
    // The running install has the boot partition mounted in its own mount
    // namespace only: the system sees none of its mounts.
    let own = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert!(
        own.contains(&format!("/run/abup/mnt-{pid}/")),
        "the install mounts nothing?\n{own}"
    );
    assert_eq!(mounts_left(&env, pid), Vec::<String>::new());
    // status shows the run in progress.
    let st = abup(&env.config, &["--json", "--booted-slot", "A", "status"]).json();
    assert_eq!(st["run_in_progress"]["pid"], pid, "{st:#}");
    assert_eq!(st["run_in_progress"]["verb"], "install");
    assert_eq!(st["run_in_progress"]["step"], "mark-bad");
    let text = abup(&env.config, &["--booted-slot", "A", "status"]);
    assert!(
        text.stdout
            .contains(&format!("running:    pid {pid}, install, step mark-bad")),
        "{text}"
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let (out, _) = first.join().unwrap();
    assert_eq!(out.status.code(), Some(5));
    env.assert_untouched(&before);
    // The refused runs never wrote the other config's state directory.
    let other_state = fs::read_to_string(&other).unwrap();
    let other_dir = other_state
        .lines()
        .find_map(|l| l.strip_prefix("state_dir = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    assert!(!Path::new(&other_dir).join("slots.json").exists());
    let st = env.status(Some("A"));
    assert!(st["run_in_progress"].is_null());
    assert_eq!(st["last_run"]["result"], "failed");
    assert_eq!(st["last_run"]["signal"], "SIGTERM");
    assert_eq!(st["last_run"]["exit_code"], 5);
    // Now the other config proceeds.
    let run = env.abup_with(
        &other,
        &["--json", "--booted-slot", "A", "install", s(&bundle)],
        None,
    );
    run.ok();
}

#[test]
fn closed_stdout_is_not_a_crash() {
    let env = Env::new();
    for args in [
        vec!["status"],
        vec!["--json", "status"],
        vec!["--help"],
        vec!["completions", "bash"],
        vec!["history"],
    ] {
        let (r, w) = nix::unistd::pipe().unwrap();
        drop(r);
        let status = Command::new(abup_bin())
            .arg("--config")
            .arg(&env.config)
            .args(["--booted-slot", "A"])
            .args(&args)
            .stdout(Stdio::from(w))
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert_ne!(status.code(), Some(101), "abup {args:?} panicked");
        assert!(
            status.code() == Some(0) || status.signal().is_none(),
            "{args:?}: {status:?}"
        );
    }
    // An install whose stdout is closed completes and says so in status.
    let bundle = env.simple_bundle(VERSION);
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r);
    let status = Command::new(abup_bin())
        .arg("--config")
        .arg(&env.config)
        .args(["--booted-slot", "A", "install", s(&bundle)])
        .stdout(Stdio::from(w))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let st = env.status(Some("A"));
    assert_eq!(st["last_run"]["result"], "success", "{st:#}");
    assert_eq!(st["primary"], "B");
}

/// A loop device the test attached over the image by hand, as an older abup
/// did (no autoclear). Dropping it detaches it only while it is still
/// attached to this image: abup may have detached it, and the number may
/// belong to someone else since.
struct StrayLoop {
    dev: PathBuf,
    image: PathBuf,
}

impl StrayLoop {
    fn attach(image: &Path, p: &Part) -> StrayLoop {
        let out = sh(Command::new("losetup")
            .args(["--find", "--show", "--offset", &p.start.to_string()])
            .args(["--sizelimit", &p.size.to_string()])
            .arg(image));
        StrayLoop {
            dev: PathBuf::from(out.trim()),
            image: image.to_path_buf(),
        }
    }

    fn attached(&self) -> bool {
        let name = self.dev.file_name().unwrap().to_string_lossy().into_owned();
        fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
            .is_ok_and(|b| Path::new(b.trim()) == self.image)
    }
}

impl Drop for StrayLoop {
    fn drop(&mut self) {
        if self.attached() {
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        }
    }
}

/// A mount made by hand at `/tmp/abup-mount-*`, where older versions of
/// abup mounted, in the system's namespace. Unmounted on drop if still there.
struct StrayMount(PathBuf);

impl StrayMount {
    fn new(dev: &Path) -> StrayMount {
        let dir = tempfile::Builder::new()
            .prefix("abup-mount-")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        sh(Command::new("mount")
            .args(["-t", "ext4"])
            .arg(dev)
            .arg(&dir));
        StrayMount(dir)
    }

    fn mounted(&self) -> bool {
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(s(&self.0)))
    }
}

impl Drop for StrayMount {
    fn drop(&mut self) {
        if self.mounted() {
            unmount(&self.0);
        }
        let _ = fs::remove_dir(&self.0);
    }
}

#[test]
fn leftovers_of_an_older_run_are_cleaned_up_by_the_next_install() {
    let env = Env::new();
    let bundle = env.simple_bundle(VERSION);
    env.install_ok("A", &bundle, &[]);
    // What a killed older abup left: slot B and the boot partition mounted
    // read-write under /tmp over loop devices of its own, and a loop device
    // over slot A it no longer used.
    let image = fs::canonicalize(&env.disk.image).unwrap();
    let b = StrayLoop::attach(&image, env.disk.part("rootB"));
    let boot = StrayLoop::attach(&image, env.disk.part("boot"));
    let a = StrayLoop::attach(&image, env.disk.part("rootA"));
    let mb = StrayMount::new(&b.dev);
    let mboot = StrayMount::new(&boot.dev);
    // Someone else's loop device over the data partition, in use: kept.
    let data = StrayLoop::attach(&image, env.disk.part("data"));
    let held = fs::File::open(&data.dev).unwrap();

    let o = run_armed(&env.config, "", &crash_args(&bundle), None, None);
    assert_eq!(o.code(), Some(0), "{o}");
    let r = o.json();
    assert_eq!(r["result"], "success", "{o}");
    let comment = step_comment(&r, "inspect-system");
    for m in [&mb, &mboot] {
        assert!(!m.mounted(), "{} still mounted\n{o}", m.0.display());
        assert!(!m.0.exists(), "{} not removed", m.0.display());
        assert!(comment.contains(s(&m.0)), "{comment}");
    }
    for l in [&b, &boot, &a] {
        // abup's own self-clearing loops of this run may have reused the
        // number: the kernel detaches them once udev lets go.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while l.attached() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(!l.attached(), "{} still attached\n{o}", l.dev.display());
        assert!(
            comment.contains(&format!("detached {}", l.dev.display())),
            "{comment}"
        );
    }
    assert!(
        data.attached(),
        "a loop device in use was detached: {comment}"
    );
    assert!(!comment.contains(s(&data.dev)), "{comment}");
    drop(held);
    assert_eq!(version_in_b(&env).as_deref(), Some(VERSION));
    assert_eq!(env.grubenv()["ORDER"], "B A");
}

/// External commands die with abup (`PR_SET_PDEATHSIG`): a `mkfs.ext4`
/// still running when abup is SIGKILLed must not go on writing to the slot
/// the next run formats again. The `mkfs.ext4` found first on PATH here
/// records its pid and then waits, so that abup is killed while it runs.
#[test]
fn a_child_command_dies_with_a_killed_abup() {
    let env = Env::new();
    let bundle = env.simple_bundle(VERSION);
    let bin = env.path("bin");
    fs::create_dir_all(&bin).unwrap();
    let pidfile = env.path("mkfs.pid");
    write(
        &bin,
        "mkfs.ext4",
        &format!(
            "#!/bin/sh\necho $$ > {}.tmp\nmv {0}.tmp {0}\nexec sleep 600\n",
            s(&pidfile)
        ),
        0o755,
    );
    let path = format!("{}:{}", s(&bin), std::env::var("PATH").unwrap_or_default());
    let mut child = Command::new(abup_bin())
        .arg("--config")
        .arg(&env.config)
        .args(crash_args(&bundle))
        .env("PATH", path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !pidfile.exists() {
        assert!(std::time::Instant::now() < deadline, "mkfs.ext4 never ran");
        thread::sleep(Duration::from_millis(50));
    }
    let mkfs: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let cmdline = |pid: i32| fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    // The wrapper has become `sleep 600`, a child of abup.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cmdline(mkfs).starts_with(b"sleep\0") {
        assert!(std::time::Instant::now() < deadline, "no sleep at {mkfs}");
        thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stat = fs::read_to_string(format!("/proc/{mkfs}/stat")).unwrap_or_default();
        // Gone, or dead and not yet reaped by init.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        if stat.is_empty() || matches!(state, Some("Z" | "X")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the child command outlived the killed abup: {stat}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    // And the next install needs nobody.
    let slot_a = env.disk.sha256_of_partition("rootA");
    env.install_ok("A", &bundle, &["--force"]);
    assert_eq!(env.disk.sha256_of_partition("rootA"), slot_a);
    assert_eq!(version_in_b(&env).as_deref(), Some(VERSION));
}

/// The slot records must survive a fallback, so they may not live on a
/// slot: a `state_dir` on slot A (the booted root here) is refused before
/// anything is written, and the message says where to put it.
#[test]
fn a_state_dir_on_a_slot_is_refused() {
    let env = Env::new();
    let bundle = env.simple_bundle(VERSION);
    let before = env.snapshot();
    let on_a = env.disk.mount("rootA", false);
    let state = on_a.path().join("var/lib/abup");
    let text = fs::read_to_string(&env.config)
        .unwrap()
        .replace(s(&env.state_dir), s(&state));
    assert!(text.contains(s(&state)));
    let config = env.path("on-slot.toml");
    fs::write(&config, text).unwrap();
    let run = env.abup_with(
        &config,
        &["--booted-slot", "A", "install", s(&bundle)],
        None,
    );
    run.failed(
        3,
        &[
            &format!("state_dir {} is on slot A", state.display()),
            "both slots mount",
        ],
    );
    drop(on_a);
    env.assert_untouched(&before);
    // The same directory elsewhere is fine.
    env.install_ok("A", &bundle, &[]);
}
