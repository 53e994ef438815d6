//! Small helpers shared by every module: running external commands with a
//! named step, and atomic file replacement.
//!
//! Every external tool abup calls (mkfs.ext4, losetup, mount, partx …) goes
//! through [`run`], so that errors and progress always say which step ran what.

use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Runs `cmd` for the named `step` and returns its stdout.
///
/// A non-zero exit becomes an error of the form
/// `{step}: {program args…} exited with 1: {stderr}`.
///
/// The command dies with abup (`PR_SET_PDEATHSIG`): a killed abup must not
/// leave a `mkfs.ext4` writing to a slot that the next run formats again.
pub fn run(step: &str, cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}").replace('"', "");
    die_with_abup(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("{step}: starting {shown}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{step}: {shown} exited with {}: {}",
            out.status
                .code()
                .map_or("a signal".to_string(), |c| c.to_string()),
            stderr.trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes `cmd` die with abup (`PR_SET_PDEATHSIG`), and not start at all
/// if abup is already gone.
pub fn die_with_abup(cmd: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // abup died before prctl took effect: do not start at all.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        })
    };
}

/// Marks an error of [`write_atomic`] after its rename: the new content is
/// in place, only its durability is unconfirmed.
#[derive(Debug, Clone)]
pub struct Replaced(pub std::path::PathBuf);

impl std::fmt::Display for Replaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} was replaced but not confirmed durable",
            self.0.display()
        )
    }
}

/// How a process ended, for messages: "1", or "a signal".
pub fn exit_text(status: &std::process::ExitStatus) -> String {
    status
        .code()
        .map_or("a signal".to_string(), |c| c.to_string())
}

/// Replaces `path` with `data` atomically: write a temporary file beside it,
/// fsync it, rename it over `path`, then fsync the directory. A reader (or a
/// power cut) sees either the old content or the new, never a mix. An error
/// after the rename carries [`Replaced`].
///
/// Fail points (see [`crate::failpoint`]), with `F` the file name:
/// `write:F`, `fsync:F`, `before-rename:F`, `rename:F`, `after-rename:F`,
/// `fsync-dir:F`; and `flip-before-rename` / `flip-after-rename` while the
/// flip is being written.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let flip = crate::signal::flipping();
    let point = |p: &str| crate::failpoint::hit(&format!("{p}:{name}"));
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".abup-tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    point("write")
        .and_then(|_| tmp.write_all(data))
        .and_then(|_| point("fsync"))
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    if let Ok(meta) = fs::metadata(path) {
        // Keep the mode of the file we replace (tempfile creates 0600).
        fs::set_permissions(tmp.path(), meta.permissions())
            .with_context(|| format!("setting mode of {}", tmp.path().display()))?;
    }
    point("before-rename")?;
    if flip {
        crate::failpoint::hit("flip-before-rename")?;
    }
    point("rename").with_context(|| format!("renaming temporary file over {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("renaming temporary file over {}", path.display()))?;
    let after = || -> std::io::Result<()> {
        if flip {
            crate::failpoint::hit("flip-after-rename")?;
        }
        point("after-rename")?;
        point("fsync-dir")?;
        File::open(dir).and_then(|d| d.sync_all())
    };
    after()
        .with_context(|| format!("syncing directory {}", dir.display()))
        .context(Replaced(path.to_path_buf()))?;
    Ok(())
}
