//! Custom boot backend: any bootloader, through an executable that speaks
//! RAUC's custom-backend interface.
//!
//! | call                          | prints (stdout)        |
//! |-------------------------------|------------------------|
//! | `CMD get-primary`             | `A`, `B` or `none`     |
//! | `CMD set-primary SLOT`        | nothing                |
//! | `CMD get-state SLOT`          | `good` or `bad`        |
//! | `CMD set-state SLOT good|bad` | nothing                |
//!
//! Exit status 0 means success; anything on stderr is shown with a failure.
//! Each call runs with a time limit (the process is killed when it runs
//! over) and its output is parsed strictly: exactly one expected word and a
//! newline, nothing else. `ABUP_BOOT_TRIES` in the environment carries
//! `boot.tries` for scripts that count attempts. The example in
//! `boot-backends/custom/` drives a GRUB environment with `grub-editenv`.

use crate::boot::{BootBackend, BootSlotInfo, BootState};
use crate::slot::SlotName;
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Most output read from one call; the interface needs a few bytes.
const MAX_OUTPUT: u64 = 64 << 10;

/// The custom backend: one executable.
pub struct CustomBackend {
    command: PathBuf,
    timeout: Duration,
    tries: u32,
}

impl CustomBackend {
    /// Checks the executable exists, and that it answers `get-primary`, so a
    /// broken script stops a run before anything is written.
    pub fn open(command: &Path, timeout: Duration, tries: u32) -> Result<CustomBackend> {
        let meta = std::fs::metadata(command).with_context(|| {
            format!(
                "{} does not exist; check boot.custom.command in the config",
                command.display()
            )
        })?;
        use std::os::unix::fs::PermissionsExt;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            bail!(
                "{} is not an executable file; chmod +x it or fix boot.custom.command",
                command.display()
            );
        }
        let b = CustomBackend {
            command: command.to_path_buf(),
            timeout,
            tries,
        };
        b.primary()?;
        Ok(b)
    }

    /// Runs `command args…` with the time limit; returns its stdout.
    fn call(&self, args: &[&str]) -> Result<String> {
        let shown = format!("{} {}", self.command.display(), args.join(" "));
        let mut child = Command::new(&self.command)
            .args(args)
            // Its own process group, so a timeout kills what it started too.
            .process_group(0)
            .env("ABUP_BOOT_TRIES", self.tries.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {shown}"))?;
        // Read both pipes on threads so a chatty script cannot block.
        let mut out_pipe = child.stdout.take().context("no stdout pipe")?;
        let mut err_pipe = child.stderr.take().context("no stderr pipe")?;
        let out = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = (&mut out_pipe).take(MAX_OUTPUT).read_to_end(&mut v);
            v
        });
        let err = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = (&mut err_pipe).take(MAX_OUTPUT).read_to_end(&mut v);
            v
        });
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child
                .try_wait()
                .with_context(|| format!("waiting for {shown}"))?
            {
                break st;
            }
            if start.elapsed() > self.timeout {
                let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                bail!(
                    "{shown} did not finish within {} s and was killed; fix the script or raise \
                     boot.custom.timeout",
                    self.timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = out.join().unwrap_or_default();
        let err = err.join().unwrap_or_default();
        if !status.success() {
            bail!(
                "{shown} exited with {}: {}",
                crate::util::exit_text(&status),
                String::from_utf8_lossy(&err).trim()
            );
        }
        String::from_utf8(out).with_context(|| format!("{shown} printed bytes that are not UTF-8"))
    }

    /// Runs a query and requires exactly one of `words` (plus a newline).
    fn query(&self, args: &[&str], words: &[&str]) -> Result<String> {
        let out = self.call(args)?;
        let word = out.strip_suffix('\n').unwrap_or(&out);
        if !words.contains(&word) {
            bail!(
                "{} {} printed {:?}; expected exactly one of {} and a newline",
                self.command.display(),
                args.join(" "),
                out.chars().take(80).collect::<String>(),
                words.join(", ")
            );
        }
        Ok(word.to_string())
    }

    /// Runs a command that must print nothing.
    fn action(&self, args: &[&str]) -> Result<()> {
        let out = self.call(args)?;
        if !out.is_empty() {
            bail!(
                "{} {} printed {:?}; it must print nothing",
                self.command.display(),
                args.join(" "),
                out.chars().take(80).collect::<String>()
            );
        }
        Ok(())
    }
}

impl BootBackend for CustomBackend {
    fn name(&self) -> &'static str {
        "custom"
    }

    fn primary(&self) -> Result<Option<SlotName>> {
        match self.query(&["get-primary"], &["A", "B", "none"])?.as_str() {
            "none" => Ok(None),
            s => Ok(Some(s.parse()?)),
        }
    }

    fn set_primary(&mut self, slot: SlotName) -> Result<()> {
        self.action(&["set-primary", slot.as_str()])
    }

    fn state(&self, slot: SlotName) -> Result<BootSlotInfo> {
        let s = self.query(&["get-state", slot.as_str()], &["good", "bad"])?;
        Ok(BootSlotInfo {
            ok: s == "good",
            tries_left: None,
        })
    }

    fn set_state(&mut self, slot: SlotName, state: BootState) -> Result<()> {
        let word = match state {
            BootState::Good => "good",
            BootState::Bad => "bad",
        };
        self.action(&["set-state", slot.as_str(), word])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("boot.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn strict_parsing_failures_and_time_limit() {
        let dir = tempfile::tempdir().unwrap();
        let ok = script(
            dir.path(),
            r#"case "$1" in get-primary) echo B;; get-state) echo good;; *) exit 0;; esac"#,
        );
        let mut b = CustomBackend::open(&ok, Duration::from_secs(5), 3).unwrap();
        assert_eq!(b.primary().unwrap(), Some(SlotName::B));
        assert!(b.state(SlotName::A).unwrap().ok);
        b.set_primary(SlotName::A).unwrap();
        for (body, want) in [
            ("echo ' B'", "expected exactly one of A, B, none"),
            ("printf 'B\\nA\\n'", "expected exactly one of A, B, none"),
            ("echo C", "expected exactly one of A, B, none"),
            ("echo oops >&2; exit 4", "exited with 4: oops"),
            ("sleep 5", "did not finish within 1 s"),
        ] {
            let p = script(dir.path(), body);
            let e = CustomBackend::open(&p, Duration::from_secs(1), 3)
                .err()
                .unwrap();
            assert!(format!("{e:#}").contains(want), "{body}: {e:#}");
        }
        let chatty = script(
            dir.path(),
            r#"case "$1" in get-primary) echo A;; *) echo done;; esac"#,
        );
        let mut b = CustomBackend::open(&chatty, Duration::from_secs(5), 3).unwrap();
        let e = b.set_primary(SlotName::B).unwrap_err();
        assert!(format!("{e:#}").contains("must print nothing"), "{e:#}");
        let missing = dir.path().join("nope");
        assert!(CustomBackend::open(&missing, Duration::from_secs(1), 3).is_err());
    }
}
