//! The pipelined write path seen from outside: a signal stops an install
//! whose input stalled in the middle of the payload (the reader thread is
//! stuck in a read that never returns, so the consumer must notice).
//! (Skipping blocks already identical on the target is not built yet.)

use crate::util::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// A rootfs whose payload spans several 1 MiB chunks: 6 MiB that do not
/// compress.
fn big_rootfs(env: &Env) -> std::path::PathBuf {
    let dir = env.path("rootfs");
    simple_rootfs(&dir, "2.0.0");
    let mut noise = vec![0u8; 6 << 20];
    getrandom::getrandom(&mut noise).unwrap();
    fs::write(dir.join("noise.bin"), noise).unwrap();
    dir
}

#[test]
fn sigterm_stops_an_install_whose_stdin_stalls_mid_payload() {
    let env = Env::new();
    let dir = big_rootfs(&env);
    let bundle = env.bundle(Source::Rootfs(&dir), "2.0.0", "none");
    let payload = payload_range(&bundle);
    let before = env.snapshot();
    let bytes = fs::read(&bundle).unwrap();
    // The header and the first 2.5 MiB of the payload; then nothing more.
    let cut = (payload.start + (5 << 19)) as usize;
    assert!(cut < payload.end as usize);

    let mut child = Command::new(abup_bin())
        .arg("--config")
        .arg(&env.config)
        .args(["--json", "--booted-slot", "A", "install", "-", "--force"])
        .env_remove("ABUP_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&bytes[..cut]).unwrap();
    // stdin stays open: abup's reader waits for bytes that never come.

    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut lines = Vec::new();
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if l.contains("\"step-started\"") && l.contains("\"write\"") {
                let _ = tx.send(());
            }
            lines.push(l);
        }
        lines
    });
    let mut err = child.stderr.take().unwrap();
    let errs = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("the install reaches its write step");
    // Let the pipeline run dry on the missing bytes, then stop it.
    thread::sleep(Duration::from_secs(1));
    kill(pid, Signal::SIGTERM).unwrap();

    // A run that never notices the signal is killed for good after a
    // generous wait, and the test fails.
    let (done_tx, done_rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let status = child.wait().unwrap();
        let _ = done_tx.send(());
        status
    });
    let noticed = done_rx.recv_timeout(Duration::from_secs(60)).is_ok();
    if !noticed {
        let _ = kill(pid, Signal::SIGKILL);
    }
    let status = waiter.join().unwrap();
    drop(stdin);
    let lines = reader.join().unwrap();
    let stderr = errs.join().unwrap();
    assert!(
        noticed,
        "SIGTERM was not acted on within 60 s\n{}\n{stderr}",
        lines.join("\n")
    );
    assert_eq!(status.code(), Some(5), "{}\n{stderr}", lines.join("\n"));
    let report: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(report["failed_step"], "write", "{report:#}");
    let msg = report["error"].as_str().unwrap_or_default();
    assert!(msg.contains("interrupted by SIGTERM"), "{msg}");
    assert!(!msg.contains("corrupt"), "{msg}");
    env.assert_untouched(&before);
    let st = env.status(Some("A"));
    assert_eq!(st["last_run"]["signal"], "SIGTERM", "{st:#}");
    assert_eq!(st["last_run"]["exit_code"], 5, "{st:#}");
    assert_eq!(st["primary"], "A", "{st:#}");
    // And the next install from the whole bundle goes through.
    env.install_ok("A", &bundle, &[]);
}
