//! Carrying a device's configuration and data across an update: preserve
//! rules, migrations shipped in the new image, and data staged until the new
//! slot is blessed.
//!
//! - [`rules`]: what the config and the image say to preserve.
//! - [`tree`]: contained path resolution (nothing followed out of a root).
//! - [`preserve`]: copying per rule, with owner, mode, timestamps, xattrs.
//! - [`run`]: running the image's migrations in a confined mount namespace.
//! - [`data`]: the data partition's staging area, committed by `mark-good`.
//!
//! The install's `preserve` and `migrate` steps are [`preserve_step`] and
//! [`migrate_step`]; both read the "old root": the running system's `/`,
//! `preserve.from` when set, or in a rescue system the primary slot mounted
//! read-only.

pub mod data;
pub mod preserve;
pub mod rules;
pub mod run;
pub mod tree;

use crate::mount::{Access, TempMount};
use crate::report::Done;
use crate::slot::SlotName;
use crate::state::Content;
use crate::system::System;
use anyhow::{Context, Result};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use rules::{Origin, RawRule, Rule};
use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use tree::Tree;

/// Folder of the new root holding its migrations (`NN-name` executables).
pub const MIGRATE_DIR: &str = "usr/lib/abup/migrate.d";

/// The config's rules: `preserve.paths` (shorthand, every default) first,
/// then `[[preserve.rule]]` tables.
pub fn config_rules(paths: Vec<PathBuf>, rules: Vec<RawRule>) -> Result<Vec<Rule>> {
    let short = paths
        .into_iter()
        .map(|p| RawRule::shorthand(p).validate("preserve.paths", Origin::Config));
    let full = rules
        .into_iter()
        .map(|r| r.validate("preserve.rule", Origin::Config));
    short.chain(full).collect()
}

/// The root preserve rules and migrations read the device's files from.
pub struct OldRoot {
    pub path: PathBuf,
    /// Says where it came from, for the report.
    pub what: String,
    _mount: Option<TempMount>,
}

/// Finds the old root, or says why there is none.
pub fn old_root(sys: &System, target: SlotName) -> Result<std::result::Result<OldRoot, String>> {
    if let Some(from) = &sys.cfg.preserve_from {
        return Ok(Ok(OldRoot {
            path: from.clone(),
            what: from.display().to_string(),
            _mount: None,
        }));
    }
    if sys.booted.is_some() {
        return Ok(Ok(OldRoot {
            path: PathBuf::from("/"),
            what: "/".to_string(),
            _mount: None,
        }));
    }
    // A rescue system's own / is not the device's: use the slot the
    // bootloader would start, read-only.
    let primary = sys.boot.backend.primary()?.filter(|p| *p != target);
    let Some(p) = primary else {
        return Ok(Err(format!(
            "rescue system and no slot other than {target} is primary: nothing to read the device's files from; set preserve.from to the old root"
        )));
    };
    let dev = &sys.slot(p).dev.path;
    match TempMount::ext4(dev, Access::ReadOnly) {
        Ok(m) => Ok(Ok(OldRoot {
            path: m.path().to_path_buf(),
            what: format!("slot {p} (primary, mounted read-only)"),
            _mount: Some(m),
        })),
        Err(e) => Ok(Err(format!(
            "rescue system: the primary slot {p} ({}) could not be mounted read-only ({e:#}); nothing read from it; set preserve.from to the old root",
            dev.display()
        ))),
    }
}

/// The version recorded for the slot being replaced as the running one.
pub fn old_version(sys: &System, target: SlotName) -> Result<Option<String>> {
    let reference = match sys.booted {
        Some(b) => Some(b),
        None => sys.boot.backend.primary()?,
    }
    .filter(|r| *r != target);
    let records = sys.records()?;
    Ok(reference
        .and_then(|r| records.get(r))
        .filter(|r| r.content == Content::Installed)
        .map(|r| r.version.clone()))
}

/// Whether the new root holds anything this module acts on.
fn has_image_parts(new: &Tree) -> Result<bool> {
    let lib = new.dir(Path::new("usr/lib/abup"), false)?;
    Ok(match lib {
        Some(fd) => {
            let names = tree::list(fd.as_raw_fd()).context("listing /usr/lib/abup")?;
            names
                .iter()
                .any(|n| n == "preserve.toml" || n == "migrate.d")
        }
        None => false,
    })
}

/// The new root, mounted read-write: the writer's mount for tarballs; for a
/// raw image, an ext4 mount when preserve rules need one or the image holds
/// rules or migrations (probed read-only first, so that an image with
/// neither is never mounted read-write).
fn mount_new_root(
    sys: &System,
    target: SlotName,
    mounted: Option<TempMount>,
) -> Result<Option<TempMount>> {
    if let Some(m) = mounted {
        return Ok(Some(m));
    }
    let dev = &sys.slot(target).dev.path;
    if sys.cfg.preserve.is_empty() {
        let Ok(probe) = TempMount::ext4(dev, Access::ReadOnly) else {
            return Ok(None);
        };
        let needed = has_image_parts(&Tree::open(probe.path(), "new root")?)?;
        probe.unmount()?;
        if !needed {
            return Ok(None);
        }
    }
    TempMount::ext4(dev, Access::ReadWrite)
        .with_context(|| {
            format!(
                "mounting the new raw image on {} read-write to preserve files and run migrations (needs an ext4 image; empty the preserve rules to install others)",
                dev.display()
            )
        })
        .map(Some)
}

/// Reads the image's own preserve rules, if it has any.
fn image_rules(new: &Tree) -> Result<Vec<Rule>> {
    let path = Path::new(rules::IMAGE_RULES);
    let Some(dir) = new.dir(path.parent().unwrap_or(Path::new("")), false)? else {
        return Ok(Vec::new());
    };
    let name = path.file_name().unwrap_or_default();
    let fd = match nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(Vec::new()),
        Err(e) => {
            return Err(e).with_context(|| format!("opening /{} in the new root", path.display()))
        }
    };
    // SAFETY: a fresh descriptor.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut text = String::new();
    file.take(1 << 20)
        .read_to_string(&mut text)
        .with_context(|| format!("reading /{} in the new root", path.display()))?;
    rules::parse_image_rules(&text)
        .with_context(|| format!("the image's /{} (fix the image)", path.display()))
}

/// The install's `preserve` step. Returns the new root, still mounted, for
/// the `migrate` step.
pub fn preserve_step(
    sys: &System,
    target: SlotName,
    mounted: Option<TempMount>,
) -> Result<Done<Option<TempMount>>> {
    let Some(new) = mount_new_root(sys, target, mounted)? else {
        return Ok(Done::unchanged(
            None,
            "no preserve rules, and the raw image holds none (or is not ext4)",
        ));
    };
    let new_tree = Tree::open(new.path(), "new root")?;
    let from_image = image_rules(&new_tree)?;
    let n_image = from_image.len();
    let all: Vec<Rule> = from_image
        .into_iter()
        .chain(sys.cfg.preserve.iter().cloned())
        .collect();
    if all.is_empty() {
        return Ok(Done::unchanged(Some(new), "no preserve rules"));
    }
    let old = match old_root(sys, target)? {
        Ok(o) => o,
        Err(why) => return Ok(Done::unchanged(Some(new), why)),
    };
    let old_tree = Tree::open(&old.path, "old root")?;
    let out = preserve::apply(&all, &old_tree, &new_tree)?;
    let mut comment = format!("copied {} path(s) from {}", out.copied.len(), old.what);
    if !out.copied.is_empty() {
        comment += &format!(": {}", out.copied.join(", "));
    }
    if n_image > 0 {
        comment += &format!(" ({n_image} rule(s) from the image)");
    }
    if !out.kept_image.is_empty() {
        comment += &format!("; the image's copy kept: {}", out.kept_image.join(", "));
    }
    if !out.missing.is_empty() {
        comment += &format!("; skipped missing: {}", out.missing.join(", "));
    }
    crate::mount::sync_fs(new.path())?;
    Ok(if out.entries == 0 {
        Done::unchanged(Some(new), comment)
    } else {
        Done::changed(Some(new), comment)
    })
}

/// The install's `migrate` step: runs the new image's migrations in their
/// sandbox, stages the data they wrote, and unmounts the new root.
///
/// The data partition is only read while migrations run: they write into
/// [`SCRATCH`] on the new root, shown to them as the staging area, and only
/// once every migration succeeded is that copied to the data partition's
/// staging area. A failing or hanging migration thus leaves the data
/// partition's block device as it was. Any failure aborts before the flip.
pub fn migrate_step(
    sys: &System,
    target: SlotName,
    new_version: &str,
    mounted: Option<TempMount>,
) -> Result<Done<()>> {
    let Some(new) = mounted else {
        return Ok(Done::unchanged(
            (),
            "the raw image holds no migrations (or is not ext4)",
        ));
    };
    // Data an earlier install staged for the target is stale: the target
    // was marked bad before it was written. Its record goes now, its
    // directory at the next staging.
    data::forget(sys, target)?;
    let new_tree = Tree::open(new.path(), "new root")?;
    let names = run::list(&new_tree)?;
    if names.is_empty() {
        drop(new_tree);
        new.unmount()?;
        return Ok(Done::unchanged(
            (),
            format!("no migrations in /{MIGRATE_DIR}"),
        ));
    }
    let view = data::DataMount::open_to_read(sys)?;
    let scratch = match &view {
        Some(_) => Some(fresh_scratch(&new_tree)?),
        None => None,
    };
    let ran = run_all(
        sys,
        target,
        new_version,
        &new,
        &new_tree,
        &names,
        view.as_ref().map(|v| v.path()),
        scratch.as_ref(),
    );
    let closed = view.map(|v| v.close()).transpose();
    let staged = match (&ran, &scratch) {
        (Ok(_), Some(s)) => data::stage(sys, target, new_version, s),
        _ => Ok(Vec::new()),
    };
    drop(scratch);
    let cleaned = tree::remove_at(new_tree.fd(), OsStr::new(SCRATCH))
        .with_context(|| format!("removing /{SCRATCH} from the new root"));
    let (ran, old_what) = ran?;
    let staged = staged?;
    closed?;
    cleaned?;
    drop(new_tree);
    new.unmount()?;
    let list: Vec<String> = ran
        .iter()
        .map(|r| format!("{} ({:.1} s)", r.name, r.secs))
        .collect();
    let mut comment = format!(
        "ran {} migration(s) (old root: {old_what}): {}",
        ran.len(),
        list.join(", ")
    );
    if !staged.is_empty() {
        comment += &format!(
            "; data staged for slot {target}: {} (committed by `abup mark-good`, discarded on fallback)",
            staged.join(", ")
        );
    }
    Ok(Done::changed((), comment))
}

/// Where migrations' data changes collect on the new root while they run.
pub const SCRATCH: &str = ".abup-data-staging";

/// An empty [`SCRATCH`] directory on the new root (one the image brought
/// is removed first).
fn fresh_scratch(new: &Tree) -> Result<Tree> {
    let name = OsStr::new(SCRATCH);
    let creating = || format!("creating /{SCRATCH} on the new root for the staged data");
    tree::remove_at(new.fd(), name).with_context(creating)?;
    nix::sys::stat::mkdirat(Some(new.fd()), name, Mode::from_bits_truncate(0o755))
        .with_context(creating)?;
    new.subtree(name, "staged data")
}

#[allow(clippy::too_many_arguments)]
fn run_all(
    sys: &System,
    target: SlotName,
    new_version: &str,
    new: &TempMount,
    new_tree: &Tree,
    names: &[String],
    data: Option<&Path>,
    scratch: Option<&Tree>,
) -> Result<(Vec<run::Ran>, String)> {
    let old = old_root(sys, target)?;
    let (old_path, old_what) = match &old {
        Ok(o) => (Some(o.path.as_path()), o.what.clone()),
        Err(why) => (None, why.clone()),
    };
    let mut vars = vec![
        ("ABUP_NEW_VERSION".to_string(), new_version.to_string()),
        ("ABUP_TARGET_SLOT".to_string(), target.to_string()),
    ];
    if let Some(v) = old_version(sys, target)? {
        vars.push(("ABUP_OLD_VERSION".to_string(), v));
    }
    let sb = run::Sandbox {
        new_root: new.path(),
        old_root: old_path,
        data,
        staging: scratch,
        vars,
        timeout: sys.cfg.migrate_timeout,
    };
    let mut ran = Vec::new();
    for n in names {
        ran.push(run::run(&sb, new_tree, n)?);
    }
    Ok((ran, old_what))
}
