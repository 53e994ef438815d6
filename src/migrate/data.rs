//! The data partition's staging area: data changes a new slot's migrations
//! make wait there until that slot is blessed.
//!
//! Migrations write into a scratch directory of the new root while the data
//! partition (`[data]` in the config) is mounted read-only; once all of them
//! succeeded, [`stage`] copies what they wrote to `.abup-staging/<slot>/` on
//! the data partition. A failed install never writes the data partition.
//! Each top-level entry there replaces the entry
//! of the same name on the data partition when `mark-good` blesses the slot
//! (commit: the old entry is moved to `.abup-staging/<slot>.old/`, the
//! staged one renamed into place, then the old ones removed — a commit cut
//! short resumes at the next `mark-good`). The staging area is discarded by
//! `mark-bad` of the slot, by `rollback` away from it, and when any abup
//! run that opens the system ([`settle`]) finds the device running the
//! other slot while this one, activated, is no longer bootable (the
//! bootloader fell back). Until then the data partition stays
//! exactly as the old slot left it.
//!
//! A record in the state directory (`data-staging.json`) names the pending
//! slot, so `status` can show it without mounting anything.

use super::tree::{self, kind_of, list, lstat_at, remove_at, Kind, Tree};
use crate::disk::PartDevice;
use crate::mount::{Access, TempMount};
use crate::slot::SlotName;
use crate::system::System;
use anyhow::{bail, Context, Result};
use nix::fcntl::renameat;
use nix::sys::stat::{mkdirat, Mode};
use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Directory on the data partition holding the staging areas.
pub const STAGING: &str = ".abup-staging";
/// The record of pending staged data, in the state directory.
const RECORD: &str = "data-staging.json";

/// Staged data waiting for a slot to be blessed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pending {
    pub slot: SlotName,
    pub version: String,
    /// Top-level names that will replace the data partition's.
    pub entries: Vec<String>,
    pub staged_at: u64,
}

/// Reads the pending record, if any.
pub fn pending(state_dir: &Path) -> Result<Option<Pending>> {
    let path = state_dir.join(RECORD);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("reading {}; remove it if it is damaged", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn clear_record(state_dir: &Path) -> Result<()> {
    let path = state_dir.join(RECORD);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The configured data partition's device, if there is one.
fn data_device(sys: &System) -> Result<Option<(String, PartDevice)>> {
    let Some(part) = &sys.cfg.data else {
        return Ok(None);
    };
    let info = sys
        .disk
        .find(part)
        .context("finding the data partition")?
        .clone();
    Ok(Some((part.to_string(), sys.disk.device(&info)?)))
}

/// After the migrations succeeded: copies what they left in `scratch` (on
/// the new root) into `.abup-staging/<slot>` on the data partition and
/// records it. Nothing staged: the data partition is not even mounted. A
/// copy cut short is removed again. Returns the staged names.
pub fn stage(sys: &System, slot: SlotName, version: &str, scratch: &Tree) -> Result<Vec<String>> {
    let names = list(scratch.fd()).context("listing the staged data")?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let Some(dm) = DataMount::open(sys)? else {
        return Ok(Vec::new());
    };
    let copied = dm.fresh(slot).and_then(|_| {
        let to = dm
            .tree
            .subtree(OsStr::new(STAGING), "data partition")?
            .subtree(OsStr::new(slot.as_str()), "data staging area")?;
        super::preserve::copy_all(scratch, &to).with_context(|| {
            format!("copying the staged data to {STAGING}/{slot} on the data partition")
        })
    });
    let staged = match copied {
        Ok(_) => finish(sys, &dm, slot, version),
        Err(e) => match dm.remove(slot) {
            Ok(()) => Err(e),
            Err(r) => Err(e.context(format!(
                "(the partial copy {STAGING}/{slot} could not be removed either: {r:#}; remove it by hand)"
            ))),
        },
    };
    let closed = dm.close();
    let staged = staged?;
    closed?;
    Ok(staged)
}

/// The data partition, mounted read-write for the time of a job.
pub struct DataMount {
    pub tree: Tree,
    mount: TempMount,
    _dev: PartDevice,
}

impl DataMount {
    /// Mounts the configured data partition; `None` when there is none.
    pub fn open(sys: &System) -> Result<Option<DataMount>> {
        DataMount::mount(sys, Access::ReadWrite)
    }

    /// Mounts the configured data partition read-only, for migrations to
    /// read: nothing is written to its block device. When the running
    /// system has it mounted read-write, the kernel refuses a second,
    /// read-only mount (EBUSY); it is then mounted read-write, sharing the
    /// running system's mount, and abup still writes nothing through it
    /// (the sandbox sees it read-only).
    pub fn open_to_read(sys: &System) -> Result<Option<DataMount>> {
        DataMount::mount(sys, Access::ReadOnly)
    }

    fn mount(sys: &System, access: Access) -> Result<Option<DataMount>> {
        let Some((part, dev)) = data_device(sys)? else {
            return Ok(None);
        };
        let mount = match TempMount::ext4(&dev.path, access) {
            Err(e)
                if access == Access::ReadOnly
                    && e.root_cause().downcast_ref() == Some(&nix::errno::Errno::EBUSY) =>
            {
                TempMount::ext4(&dev.path, Access::ReadWrite)
            }
            m => m,
        }
        .with_context(|| format!("mounting the data partition {part}"))?;
        let tree = Tree::open(mount.path(), "data partition")?;
        Ok(Some(DataMount {
            tree,
            mount,
            _dev: dev,
        }))
    }

    pub fn path(&self) -> &Path {
        self.mount.path()
    }

    /// Syncs and unmounts, reporting errors.
    pub fn close(self) -> Result<()> {
        drop(self.tree);
        self.mount.unmount()
    }

    /// The staging directory, as a real directory (never a symlink).
    fn staging_dir(&self, create: bool) -> Result<Option<std::os::fd::OwnedFd>> {
        let name = OsStr::new(STAGING);
        match lstat_at(self.tree.fd(), name)
            .with_context(|| format!("reading {STAGING} on the data partition"))?
        {
            Some(st) if kind_of(&st) == Kind::Dir => {}
            Some(_) => bail!(
                "{STAGING} on the data partition is not a directory; remove it so abup can stage data"
            ),
            None if create => mkdirat(Some(self.tree.fd()), name, Mode::from_bits_truncate(0o700))
                .with_context(|| format!("creating {STAGING} on the data partition"))?,
            None => return Ok(None),
        }
        Ok(Some(tree::open_dir_at(self.tree.fd(), name).with_context(
            || format!("opening {STAGING} on the data partition"),
        )?))
    }

    /// An empty staging area for `slot` (a stale one is removed); returns
    /// its path on the host, for the sandbox's bind mount.
    pub fn fresh(&self, slot: SlotName) -> Result<PathBuf> {
        let dir = self.staging_dir(true)?.context("staging directory")?;
        for n in [slot.to_string(), format!("{slot}.old")] {
            remove_at(dir.as_raw_fd(), OsStr::new(&n))
                .with_context(|| format!("removing the stale {STAGING}/{n}"))?;
        }
        mkdirat(
            Some(dir.as_raw_fd()),
            slot.as_str(),
            Mode::from_bits_truncate(0o755),
        )
        .with_context(|| format!("creating {STAGING}/{slot} on the data partition"))?;
        Ok(self.path().join(STAGING).join(slot.as_str()))
    }

    /// The names staged for `slot`.
    fn staged(&self, slot: SlotName) -> Result<Vec<String>> {
        let Some(dir) = self.staging_dir(false)? else {
            return Ok(Vec::new());
        };
        let Some(st) = lstat_at(dir.as_raw_fd(), OsStr::new(slot.as_str()))? else {
            return Ok(Vec::new());
        };
        if kind_of(&st) != Kind::Dir {
            return Ok(Vec::new());
        }
        let sub = tree::open_dir_at(dir.as_raw_fd(), OsStr::new(slot.as_str()))?;
        Ok(list(sub.as_raw_fd())?
            .into_iter()
            .map(|n| n.to_string_lossy().into_owned())
            .collect())
    }

    /// Removes `slot`'s staging area.
    fn remove(&self, slot: SlotName) -> Result<()> {
        if let Some(dir) = self.staging_dir(false)? {
            for n in [slot.to_string(), format!("{slot}.old")] {
                remove_at(dir.as_raw_fd(), OsStr::new(&n))
                    .with_context(|| format!("removing {STAGING}/{n} on the data partition"))?;
            }
        }
        crate::mount::sync_fs(self.path())
    }
}

/// After the migrations: records what `slot` staged, or removes an empty
/// staging area. Returns the staged names.
pub fn finish(sys: &System, dm: &DataMount, slot: SlotName, version: &str) -> Result<Vec<String>> {
    let entries = dm.staged(slot)?;
    if entries.is_empty() {
        dm.remove(slot)?;
        if pending(&sys.cfg.state_dir)?.is_some_and(|p| p.slot == slot) {
            clear_record(&sys.cfg.state_dir)?;
        }
        return Ok(entries);
    }
    crate::mount::sync_fs(dm.path())?;
    let rec = Pending {
        slot,
        version: version.to_string(),
        entries: entries.clone(),
        staged_at: crate::state::now(),
    };
    let json = serde_json::to_vec_pretty(&rec).context("encoding the staging record")?;
    std::fs::create_dir_all(&sys.cfg.state_dir)
        .with_context(|| format!("creating {}", sys.cfg.state_dir.display()))?;
    crate::util::write_atomic(&sys.cfg.state_dir.join(RECORD), &json)?;
    Ok(entries)
}

/// `mark-good` of `slot`: moves its staged entries into place.
pub fn commit(sys: &System, slot: SlotName) -> Result<Option<String>> {
    let Some(p) = pending(&sys.cfg.state_dir)?.filter(|p| p.slot == slot) else {
        return Ok(None);
    };
    let Some(dm) = DataMount::open(sys)? else {
        return Ok(None);
    };
    let entries = dm.staged(slot)?;
    // The handles close at the end of the block, before the unmount.
    {
        let dir = dm
            .staging_dir(false)?
            .context("staging directory vanished")?;
        let dir = dir.as_raw_fd();
        let old_name = format!("{slot}.old");
        if lstat_at(dir, OsStr::new(&old_name))?.is_none() {
            mkdirat(
                Some(dir),
                old_name.as_str(),
                Mode::from_bits_truncate(0o700),
            )
            .with_context(|| format!("creating {STAGING}/{old_name}"))?;
        }
        let staged = tree::open_dir_at(dir, OsStr::new(slot.as_str()))?;
        let old = tree::open_dir_at(dir, OsStr::new(&old_name))?;
        let root = dm.tree.fd();
        for e in &entries {
            let e = OsStr::new(e);
            let moving = || {
                format!(
                    "committing staged {} on the data partition",
                    e.to_string_lossy()
                )
            };
            if lstat_at(root, e).with_context(moving)?.is_some() {
                remove_at(old.as_raw_fd(), e).with_context(moving)?;
                renameat(Some(root), e, Some(old.as_raw_fd()), e).with_context(moving)?;
            }
            renameat(Some(staged.as_raw_fd()), e, Some(root), e).with_context(moving)?;
        }
    }
    crate::mount::sync_fs(dm.path())?;
    dm.remove(slot)?;
    dm.close()?;
    clear_record(&sys.cfg.state_dir)?;
    Ok(Some(format!(
        "committed the data staged by version {} ({})",
        p.version,
        entries.join(", ")
    )))
}

/// Drops `slot`'s staged data: the data partition stays as it is.
pub fn discard(sys: &System, slot: SlotName, why: &str) -> Result<Option<String>> {
    let Some(p) = pending(&sys.cfg.state_dir)?.filter(|p| p.slot == slot) else {
        return Ok(None);
    };
    if let Some(dm) = DataMount::open(sys)? {
        dm.remove(slot)?;
        dm.close()?;
    }
    clear_record(&sys.cfg.state_dir)?;
    Ok(Some(format!(
        "discarded the data staged by version {} for slot {slot} ({why})",
        p.version
    )))
}

/// The slot whose staged data is due to be discarded because the bootloader
/// fell back from it: the device runs the other slot, and the staged slot
/// is no longer bootable although its install activated it (an install
/// with `--no-activate` waits for `mark-active`).
pub fn fallen_back(sys: &System) -> Result<Option<SlotName>> {
    let Some(p) = pending(&sys.cfg.state_dir)? else {
        return Ok(None);
    };
    if sys.booted != Some(p.slot.other()) || sys.boot.backend.state(p.slot)?.ok {
        return Ok(None);
    }
    let inactive = sys.records()?.get(p.slot).is_some_and(|r| r.inactive);
    Ok((!inactive).then_some(p.slot))
}

/// Discards staged data whose slot the bootloader fell back from (see
/// [`fallen_back`]). Every abup run that opens the system calls it, so that
/// the old slot finds its data as it left it.
pub fn settle(sys: &System) -> Result<Option<String>> {
    match fallen_back(sys)? {
        Some(slot) => discard(sys, slot, "the bootloader fell back from it"),
        None => Ok(None),
    }
}

/// [`settle`] for `status`: only when a discard is due and no other abup
/// run holds the lock (an install in progress settles at its start).
pub fn settle_unless_busy(sys: &System) -> Result<Option<String>> {
    if fallen_back(sys)?.is_none() {
        return Ok(None);
    }
    let Ok(_lock) = crate::lock::RunLock::acquire_unrecorded(&sys.cfg, "status") else {
        return Ok(None);
    };
    settle(sys)
}

/// Forgets data staged for `slot` by an earlier install attempt (its
/// directory goes at the next staging); nothing is mounted.
pub fn forget(sys: &System, slot: SlotName) -> Result<()> {
    if pending(&sys.cfg.state_dir)?.is_some_and(|p| p.slot == slot) {
        clear_record(&sys.cfg.state_dir)?;
    }
    Ok(())
}

/// `message`, with `note` appended when there is one.
pub fn with_note(message: String, note: Option<String>) -> String {
    match note {
        Some(n) => format!("{message}; {n}"),
        None => message,
    }
}
