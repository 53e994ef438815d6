//! The device as abup sees it: config, disk, the two slots, the booted slot,
//! the boot backend and the slot records, opened once per run.
//!
//! [`System::status`] combines what the bootloader says (bootable, tries
//! left) with abup's records (version, bundle, blessed) into one truthful
//! state per slot.

use crate::boot::{self, BootBackend, OpenBackend};
use crate::config::SystemConfig;
use crate::disk::{self, Disk, PartDevice, PartInfo};
use crate::slot::{self, SlotIdentity, SlotName};
use crate::state::{Content, Records, StateStore};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

/// One slot, resolved to a device.
pub struct Slot {
    pub name: SlotName,
    pub part: PartInfo,
    pub dev: PartDevice,
}

/// Everything a run needs about the device.
pub struct System {
    pub cfg: SystemConfig,
    pub booted: Option<SlotName>,
    pub store: StateStore,
    // Drop order: the backend (and its mount) before the slot devices and disk.
    pub boot: OpenBackend,
    pub slots: [Slot; 2],
    pub disk: Disk,
}

impl System {
    /// Opens the disk, the slots and the backend. `booted` overrides
    /// detection (for tests and special setups).
    pub fn open(cfg: SystemConfig, booted: Option<SlotName>) -> Result<System> {
        let disk = Disk::open(&cfg.disk)?;
        disk.check_distinct(&cfg.named_partitions())?;
        let slot = |name: SlotName| -> Result<Slot> {
            let part = disk
                .find(cfg.slot(name))
                .with_context(|| format!("finding slot {name}"))?
                .clone();
            let dev = disk.device(&part)?;
            Ok(Slot { name, part, dev })
        };
        let slots = [slot(SlotName::A)?, slot(SlotName::B)?];
        let detected = match booted {
            Some(b) => Some(b),
            None => detect_booted(&slots)?,
        };
        let boot = boot::open(&cfg.boot, cfg.boot_tries, &disk, detected)?;
        // What the bootloader says it started comes before the command line.
        let booted = match booted {
            Some(b) => Some(b),
            None => boot.backend.booted()?.or(detected),
        };
        Ok(System {
            store: StateStore::new(&cfg.state_dir),
            cfg,
            booted,
            boot,
            slots,
            disk,
        })
    }

    pub fn slot(&self, name: SlotName) -> &Slot {
        &self.slots[name as usize]
    }

    /// The boot backend, for a change (the boot partition is made
    /// writable first). Reads go through `self.boot.backend`.
    pub fn backend(&mut self) -> Result<&mut dyn BootBackend> {
        self.boot.writable()
    }

    /// Resolves a slot argument: `booted`, `other`, `A` or `B`.
    pub fn resolve(&self, which: &str) -> Result<SlotName> {
        match which {
            "booted" | "other" => {
                let b = self.booted.with_context(|| {
                    format!(
                        "'{which}' needs the booted slot, but the running system was not booted from slot A or B; name the slot (A or B) or pass --booted-slot"
                    )
                })?;
                Ok(if which == "booted" { b } else { b.other() })
            }
            s => s
                .parse()
                .with_context(|| "expected booted, other, A or B".to_string()),
        }
    }

    /// The combined status of both slots, with what the bootloader will
    /// actually start next (slots it cannot find are skipped, as it skips
    /// them) and any mismatch worth a person's attention.
    pub fn status(&self) -> Result<Status> {
        let records = self.store.load()?;
        let backend = self.boot.backend.as_ref();
        let mut slots = BTreeMap::new();
        let mut unfindable = [None, None];
        for s in &self.slots {
            let mounted = self.disk.mount_point(&s.part, &s.dev).ok().flatten();
            unfindable[s.name as usize] =
                backend.unfindable(s.name, &s.dev.path, mounted.as_deref());
        }
        let next = backend.next_boot(&|s| unfindable[s as usize].is_none())?;
        let mut warnings = Vec::new();
        for s in &self.slots {
            let info = backend.state(s.name)?;
            let rec = records.get(s.name);
            // An interrupted install left nothing usable: no version to show.
            let complete = rec.filter(|r| r.content == Content::Installed);
            let why = unfindable[s.name as usize].clone();
            if let (true, Some(why)) = (info.ok, &why) {
                warnings.push(format!(
                    "slot {} is marked bootable but the bootloader skips it: {why}",
                    s.name
                ));
            }
            // Out of tries, yet what the bootloader starts next: it falls
            // back to a slot without tries when no slot has any
            // (systemd-boot, U-Boot; GRUB then boots nothing).
            let last_resort = !info.ok && next == Some(s.name);
            if last_resort {
                warnings.push(format!(
                    "no slot has tries left: the bootloader starts slot {} anyway, as its last \
                     resort; run `abup mark-good` there once it works, or `abup mark-active` \
                     for a slot that does",
                    s.name
                ));
            }
            slots.insert(
                s.name.to_string(),
                SlotStatus {
                    state: if last_resort {
                        LAST_RESORT
                    } else {
                        slot_state(
                            info.ok,
                            self.booted == Some(s.name),
                            rec.map(|r| (r.content, r.good && !r.inactive, r.inactive)),
                        )
                    },
                    version: complete.map(|r| r.version.clone()),
                    bundle_sha256: complete.map(|r| r.bundle_sha256.clone()),
                    installed_at: complete.map(|r| r.installed_at),
                    device: s.dev.path.display().to_string(),
                    partlabel: s.part.label.clone(),
                    partuuid: s.part.partuuid.clone(),
                    bootable: info.ok,
                    // The bootloader makes no attempt on a slot it won't boot.
                    tries_left: if info.ok { info.tries_left } else { Some(0) },
                    unfindable: why,
                },
            );
        }
        match (self.booted, next) {
            (_, None) => warnings.push(
                "the bootloader has no slot it can boot: it will wait in its menu; \
                 run `abup mark-active A` or `abup mark-active B` for a slot that works"
                    .to_string(),
            ),
            (Some(b), Some(n)) if b != n => {
                let trying = slots.get(n.as_str()).is_some_and(|st| st.state == "trying");
                warnings.push(if trying {
                    format!("slot {n} is activated and starts on the next boot (booted: {b})")
                } else {
                    format!("the bootloader will start slot {n} next, not the booted slot {b}")
                });
            }
            _ => {}
        }
        Ok(Status {
            compatible: self.cfg.compatible.clone(),
            booted: self.booted,
            primary: next,
            backend: backend.name().to_string(),
            slots,
            running: crate::lock::running(&self.cfg.disk),
            last_run: crate::runlog::load(&self.cfg.state_dir),
            pending_data: crate::migrate::data::pending(&self.cfg.state_dir)?,
            warnings,
        })
    }

    /// The records, for steps that read and write them.
    pub fn records(&self) -> Result<Records> {
        self.store.load()
    }
}

/// The state of a slot that used its tries but is what the bootloader
/// starts next all the same, because no slot has tries left.
pub const LAST_RESORT: &str = "last-resort";

/// The state shown for a slot the bootloader does not start as its last
/// resort ([`LAST_RESORT`]).
///
/// - `empty`: no known complete install (never installed, or an install was
///   interrupted) and not booted.
/// - `inactive`: installed with `--no-activate`, not made bootable since.
/// - `bad`: holds an install the bootloader will not boot.
/// - `trying`: activated by an install, not yet blessed by `mark-good`.
/// - `good`: bootable and blessed (or installed before abup kept records).
pub fn slot_state(
    bootable: bool,
    booted: bool,
    record: Option<(Content, bool, bool)>,
) -> &'static str {
    match record {
        Some((Content::Incomplete, _, _)) => "empty",
        Some((Content::Installed, _, true)) if !bootable => "inactive",
        None if !bootable && !booted => "empty",
        _ if !bootable => "bad",
        Some((Content::Installed, false, _)) => "trying",
        _ => "good",
    }
}

/// `abup status` output.
#[derive(Debug, Serialize)]
pub struct Status {
    pub compatible: String,
    pub booted: Option<SlotName>,
    pub primary: Option<SlotName>,
    pub backend: String,
    pub slots: BTreeMap<String, SlotStatus>,
    /// The run holding the disk's lock right now, if any.
    pub running: Option<crate::lock::RunInfo>,
    /// How the last run that held the lock ended (or that it is running).
    pub last_run: Option<crate::runlog::LastRun>,
    /// Data a new slot's migrations staged, waiting for its `mark-good`.
    pub pending_data: Option<crate::migrate::data::Pending>,
    /// Mismatches: booted is not what starts next, a bootable slot the
    /// bootloader cannot find, nothing bootable.
    pub warnings: Vec<String>,
}

/// One slot in `abup status`.
#[derive(Debug, Serialize)]
pub struct SlotStatus {
    pub state: &'static str,
    pub version: Option<String>,
    pub bundle_sha256: Option<String>,
    pub installed_at: Option<u64>,
    pub device: String,
    pub partlabel: String,
    pub partuuid: String,
    pub bootable: bool,
    pub tries_left: Option<u32>,
    /// Why the bootloader would not find or boot this slot, if it would not.
    pub unfindable: Option<String>,
}

/// Finds the booted slot from `/proc/cmdline`, then from the device of `/`.
fn detect_booted(slots: &[Slot; 2]) -> Result<Option<SlotName>> {
    let mut ids = Vec::new();
    for s in slots {
        ids.push(SlotIdentity {
            name: s.name,
            partlabel: &s.part.label,
            partuuid: &s.part.partuuid,
            rdev: disk::rdev(&s.dev.path)?,
        });
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(b) = slot::booted_from_cmdline(&cmdline, &ids, |p| disk::rdev(p.as_ref()).ok()) {
        return Ok(Some(b));
    }
    let root_dev = std::fs::metadata("/")
        .context("reading the device of /")?
        .dev();
    Ok(slot::booted_from_root_dev(root_dev, &ids))
}

/// Refuses to go on unless running as root.
pub fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root: run it with sudo or as root");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_states() {
        use Content::*;
        assert_eq!(slot_state(false, false, None), "empty");
        assert_eq!(slot_state(true, true, None), "good");
        assert_eq!(slot_state(false, true, None), "bad");
        assert_eq!(
            slot_state(true, false, Some((Incomplete, false, false))),
            "empty"
        );
        assert_eq!(
            slot_state(true, false, Some((Installed, false, false))),
            "trying"
        );
        assert_eq!(
            slot_state(true, false, Some((Installed, true, false))),
            "good"
        );
        assert_eq!(
            slot_state(false, false, Some((Installed, true, false))),
            "bad"
        );
        assert_eq!(
            slot_state(false, false, Some((Installed, false, true))),
            "inactive"
        );
    }
}
