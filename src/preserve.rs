//! Carrying configured paths from the running system into the new root.
//!
//! Each path is copied with `cp -a` (owner, mode, timestamps, xattrs; a
//! symlink stays a symlink). The running system's copy replaces the image's.
//! A path missing on the running system is skipped and reported. The copy
//! never writes through a symlink of the new root that leads outside it.

use crate::util::run;
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What [`copy_preserved`] did.
#[derive(Debug, Default)]
pub struct Preserved {
    pub copied: Vec<PathBuf>,
    pub missing: Vec<PathBuf>,
}

/// Copies each of `paths` (absolute, as seen by the running system) from
/// `from` (the running system's root) into `new_root`.
pub fn copy_preserved(paths: &[PathBuf], from: &Path, new_root: &Path) -> Result<Preserved> {
    let mut done = Preserved::default();
    let root = fs::canonicalize(new_root)
        .with_context(|| format!("resolving new root {}", new_root.display()))?;
    for path in paths {
        let rel = path.strip_prefix("/").unwrap_or(path);
        let src = from.join(rel);
        match fs::symlink_metadata(&src) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                done.missing.push(path.clone());
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", src.display())),
        }
        let dst = root.join(rel);
        let parent = dst.parent().unwrap_or(&root);
        fs::create_dir_all(parent)
            .with_context(|| format!("creating {} in the new root", parent.display()))?;
        let real_parent =
            fs::canonicalize(parent).with_context(|| format!("resolving {}", parent.display()))?;
        if !real_parent.starts_with(&root) {
            bail!(
                "preserving {}: its parent directory in the new root leads outside it (to {}); fix the image or the preserve list",
                path.display(),
                real_parent.display()
            );
        }
        let dst = real_parent.join(dst.file_name().unwrap_or_default());
        match fs::symlink_metadata(&dst) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&dst),
            Ok(_) => fs::remove_file(&dst),
            Err(_) => Ok(()),
        }
        .with_context(|| format!("replacing {} in the new root", dst.display()))?;
        run(
            &format!("preserving {}", path.display()),
            Command::new("cp")
                .arg("-a")
                .arg("--no-target-directory")
                .arg(&src)
                .arg(&dst),
        )?;
        done.copied.push(path.clone());
    }
    Ok(done)
}
