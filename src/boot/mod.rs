//! Boot backends: the one trait abup uses to read and flip boot settings.
//!
//! Four operations, as in RAUC: primary / set primary / state / set state.
//! The backend is chosen once from the config ([`crate::config::BootConfig`])
//! by [`open`]; nothing else in abup knows which bootloader is in use.

pub mod bootfile;
pub mod custom;
pub mod esp;
pub mod grub;
pub mod grubslot;
pub mod systemd_boot;
pub mod uboot;
pub mod ubootenv;

use crate::slot::SlotName;
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::Path;

/// What the bootloader knows about one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BootSlotInfo {
    /// The bootloader may boot this slot (GRUB: `X_OK=1`).
    pub ok: bool,
    /// Boot attempts left before the bootloader falls back, when it counts.
    pub tries_left: Option<u32>,
}

/// A slot state that can be set in the bootloader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootState {
    /// Bootable; resets the try counter (used by `mark-good`).
    Good,
    /// Never booted by the bootloader (used before overwriting a slot).
    Bad,
}

/// A bootloader's boot settings.
///
/// Implementations must write atomically and must not write at all when a
/// call changes nothing, so that a refused install leaves the environment
/// byte-identical.
pub trait BootBackend {
    /// Short name used as the prefix of errors ("grub backend: …").
    fn name(&self) -> &'static str;
    /// The slot the bootloader will try first, if any is bootable.
    fn primary(&self) -> Result<Option<SlotName>>;
    /// Makes `slot` the first to boot, bootable, with a fresh try counter.
    /// This is the flip: one atomic write.
    fn set_primary(&mut self, slot: SlotName) -> Result<()>;
    /// Reads what the bootloader knows about `slot`.
    fn state(&self, slot: SlotName) -> Result<BootSlotInfo>;
    /// Marks `slot` good (bootable, counter reset) or bad (never booted).
    fn set_state(&mut self, slot: SlotName, state: BootState) -> Result<()>;

    /// Makes a freshly written slot (on `dev`, not mounted) findable by the
    /// bootloader's shipped configuration and checks it holds what that
    /// configuration boots; refuses, with the fix, a slot it would not
    /// boot. Called before the flip. Returns what it checked or changed.
    fn prepare_slot(&self, _slot: SlotName, _dev: &Path) -> Result<String> {
        Ok("nothing to check for this bootloader".to_string())
    }

    /// Why the bootloader could not find or boot `slot` on `dev` (mounted at
    /// `mounted_at`, if it is), or None when it can or cannot tell.
    fn unfindable(
        &self,
        _slot: SlotName,
        _dev: &Path,
        _mounted_at: Option<&Path>,
    ) -> Option<String> {
        None
    }

    /// The slot the bootloader starts next, given which slots it can find.
    fn next_boot(&self, findable: &dyn Fn(SlotName) -> bool) -> Result<Option<SlotName>> {
        Ok(self.primary()?.filter(|s| findable(*s)))
    }

    /// The slot the bootloader says it started this time, when it tells
    /// (systemd-boot: the `LoaderEntrySelected` EFI variable). None: ask the
    /// kernel command line.
    fn booted(&self) -> Result<Option<SlotName>> {
        Ok(None)
    }

    /// True when the environment already says of `slot` what
    /// `set_state(slot, Bad)` would write, so marking it bad needs no write.
    /// A slot that is merely not bootable now (out of tries) is not enough
    /// where the backend keeps more state than that (GRUB's `X_GOOD`).
    fn is_marked_bad(&self, slot: SlotName) -> Result<bool> {
        Ok(!self.state(slot)?.ok)
    }
}

use crate::config::{BootConfig, EspLocation, GrubEnvLocation, UbootEnvLocation};
use crate::disk::Disk;
use crate::mount::TempMount;

/// A backend opened from the config, with whatever it keeps mounted while
/// it is in use (the boot partition holding the GRUB environment, say).
pub struct OpenBackend {
    // Field order matters: the backend is dropped before its mount.
    pub backend: Box<dyn BootBackend>,
    /// Kept mounted while the backend is in use; unmounted on drop.
    pub mount: Option<TempMount>,
    /// The partition device under that mount (a loop device abup attached,
    /// for image files); detached after the unmount.
    pub device: Option<crate::disk::PartDevice>,
    /// The boot partition, for backends that keep files there.
    pub part: Option<crate::bootpart::BootPart>,
    /// The mount was remounted read-write by [`OpenBackend::writable`].
    read_write: bool,
}

impl OpenBackend {
    /// The backend, for a change: the boot partition is mounted read-only
    /// while abup only reads (status, checks, refusals leave it
    /// byte-identical) and remounted read-write here, before the first write.
    pub fn writable(&mut self) -> Result<&mut dyn BootBackend> {
        if let Some(m) = self.mount.as_ref().filter(|_| !self.read_write) {
            m.remount_rw()
                .map_err(|e| e.context("grub backend: making the boot partition writable"))?;
            self.read_write = true;
        }
        Ok(self.backend.as_mut())
    }
}

/// Builds the configured backend. This is the only place that looks at
/// which bootloader is configured.
/// `booted` is the running slot, if known (for the fixes errors suggest).
pub fn open(
    cfg: &BootConfig,
    tries: u32,
    disk: &Disk,
    booted: Option<SlotName>,
) -> Result<OpenBackend> {
    match cfg {
        BootConfig::Grub { env } => {
            let (path, name, mount, device) = match env {
                GrubEnvLocation::File(p) => (p.clone(), grub::EnvName::file(p), None, None),
                GrubEnvLocation::Partition { part, path } => {
                    let info = disk.find(part)?;
                    let dev = disk.device(info)?;
                    // Mounting a filesystem a second time through another
                    // device (a second loop over the same bytes) would give
                    // two writers one filesystem: use the existing mount.
                    if let Some(at) = disk.mount_point(info, &dev)? {
                        let p = at.join(path);
                        (p.clone(), grub::EnvName::file(&p), None, Some(dev))
                    } else {
                        let m = TempMount::ext4(&dev.path, crate::mount::Access::ReadOnly)
                            .map_err(|e| {
                                e.context(format!(
                                    "grub backend: mounting boot partition {part} ({})",
                                    dev.path.display()
                                ))
                            })?;
                        let name = grub::EnvName::on_partition(&dev.path, path);
                        (m.path().join(path), name, Some(m), Some(dev))
                    }
                }
            };
            Ok(OpenBackend {
                backend: Box::new(grub::GrubBackend::open_named(&path, name, tries, booted)?),
                mount,
                device,
                read_write: false,
                part: None,
            })
        }
        BootConfig::Custom { command, timeout } => open_custom(command, *timeout, tries),
        BootConfig::SystemdBoot { esp, efivars } => {
            let (esp, device) =
                open_esp(esp, disk).map_err(|e| e.context("systemd-boot backend"))?;
            let backend = systemd_boot::SdBootBackend::open(esp, efivars, tries)
                .map_err(|e| e.context("systemd-boot backend"))?;
            Ok(OpenBackend {
                backend: Box::new(Named(backend)),
                mount: None,
                device,
                part: None,
                read_write: false,
            })
        }
        BootConfig::Uboot { env } => {
            let (store, part) = uboot_store(env, disk).map_err(|e| e.context("uboot backend"))?;
            let backend =
                uboot::UbootBackend::open(store, tries).map_err(|e| e.context("uboot backend"))?;
            Ok(OpenBackend {
                backend: Box::new(Named(backend)),
                mount: None,
                device: None,
                part,
                read_write: false,
            })
        }
    }
}

/// Finds the ESP: a mounted directory, or a partition of the disk, used
/// through its mount (kernel or FUSE) when it has one, else through mtools.
fn open_esp(loc: &EspLocation, disk: &Disk) -> Result<(esp::Esp, Option<crate::disk::PartDevice>)> {
    match loc {
        EspLocation::Mounted(dir) => {
            let meta = std::fs::metadata(dir).map_err(|e| {
                anyhow::anyhow!(
                    "the ESP directory {} cannot be read ({e}): mount the ESP there, or set \
                     [boot.systemd-boot] partlabel to reach it unmounted",
                    dir.display()
                )
            })?;
            let parent = dir.parent().unwrap_or(dir);
            let parent_dev =
                std::fs::metadata(parent).map(|m| std::os::unix::fs::MetadataExt::dev(&m));
            if !meta.is_dir()
                || parent_dev.is_ok_and(|d| d == std::os::unix::fs::MetadataExt::dev(&meta))
            {
                bail!(
                    "{} is not a mount point: mount the ESP there (abup does not write to a \
                     directory of the root filesystem in its place)",
                    dir.display()
                );
            }
            let shown = format!("the ESP at {}", dir.display());
            Ok((
                esp::Esp::Mounted {
                    dir: dir.clone(),
                    shown,
                },
                None,
            ))
        }
        EspLocation::Partition(part) => {
            let info = disk.find(part)?;
            let dev = disk.device(info)?;
            let shown = format!("the ESP {part} ({})", dev.path.display());
            let mounted = match disk.mount_point(info, &dev)? {
                Some(m) => Some(m),
                None => {
                    let mut devs = disk.overlapping_loops(info)?;
                    devs.push(dev.path.clone());
                    esp::fuse_mount_of(&devs)?
                }
            };
            let esp = match mounted {
                Some(dir) => esp::Esp::Mounted {
                    shown: format!("{shown}, mounted at {}", dir.display()),
                    dir,
                },
                None => esp::Esp::Fat {
                    dev: dev.path.clone(),
                    shown,
                },
            };
            Ok((esp, Some(dev)))
        }
    }
}

/// Builds the custom backend (an executable named in the config).
fn open_custom(
    command: &std::path::Path,
    timeout: std::time::Duration,
    tries: u32,
) -> Result<OpenBackend> {
    let backend = custom::CustomBackend::open(command, timeout, tries)
        .map_err(|e| e.context("custom backend"))?;
    Ok(OpenBackend {
        backend: Box::new(Named(backend)),
        mount: None,
        device: None,
        part: None,
        read_write: false,
    })
}

/// Puts "<name> backend: " before every error of the backend it wraps, so
/// backends need not repeat it in each message.
struct Named<B: BootBackend>(B);

impl<B: BootBackend> Named<B> {
    fn ctx<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| e.context(format!("{} backend", self.0.name())))
    }
}

impl<B: BootBackend> BootBackend for Named<B> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn primary(&self) -> Result<Option<SlotName>> {
        self.ctx(self.0.primary())
    }
    fn set_primary(&mut self, slot: SlotName) -> Result<()> {
        let r = self.0.set_primary(slot);
        self.ctx(r)
    }
    fn state(&self, slot: SlotName) -> Result<BootSlotInfo> {
        self.ctx(self.0.state(slot))
    }
    fn set_state(&mut self, slot: SlotName, state: BootState) -> Result<()> {
        let r = self.0.set_state(slot, state);
        self.ctx(r)
    }
    fn prepare_slot(&self, slot: SlotName, dev: &Path) -> Result<String> {
        self.ctx(self.0.prepare_slot(slot, dev))
    }
    fn unfindable(&self, slot: SlotName, dev: &Path, mounted_at: Option<&Path>) -> Option<String> {
        self.0.unfindable(slot, dev, mounted_at)
    }
    fn next_boot(&self, findable: &dyn Fn(SlotName) -> bool) -> Result<Option<SlotName>> {
        self.ctx(self.0.next_boot(findable))
    }
    fn booted(&self) -> Result<Option<SlotName>> {
        self.ctx(self.0.booted())
    }
    fn is_marked_bad(&self, slot: SlotName) -> Result<bool> {
        self.ctx(self.0.is_marked_bad(slot))
    }
}

/// One copy of a U-Boot environment in a file on the boot partition.
struct PartCopy(crate::bootpart::PartFile);

impl ubootenv::EnvIo for PartCopy {
    fn read(&self, len: usize) -> Result<Vec<u8>> {
        self.0.read_at(0, len)
    }
    fn write(&self, data: &[u8]) -> Result<()> {
        self.0.write_at(0, data)
    }
    fn describe(&self) -> String {
        self.0.describe().to_string()
    }
}

/// Resolves where the U-Boot environment is into its copies (and the boot
/// partition handle they need while in use).
fn uboot_store(
    env: &UbootEnvLocation,
    disk: &Disk,
) -> Result<(ubootenv::EnvStore, Option<crate::bootpart::BootPart>)> {
    use anyhow::Context;
    let files = |size: usize, copies: Vec<(std::path::PathBuf, u64)>| {
        let copies = copies
            .into_iter()
            .map(|(path, offset)| {
                Box::new(ubootenv::FileCopy { path, offset }) as Box<dyn ubootenv::EnvIo>
            })
            .collect();
        ubootenv::EnvStore::new(size, copies)
    };
    match env {
        UbootEnvLocation::FwEnvConfig(cfg) => {
            let text = std::fs::read_to_string(cfg).with_context(|| {
                format!(
                    "reading {}: create it as for fw_printenv, or set [boot.uboot] in the config",
                    cfg.display()
                )
            })?;
            let lines = ubootenv::parse_fw_env_config(&text, cfg)?;
            let size = lines[0].size;
            Ok((
                files(
                    size,
                    lines.into_iter().map(|l| (l.path, l.offset)).collect(),
                )?,
                None,
            ))
        }
        UbootEnvLocation::Direct { size, copies } => Ok((files(*size, copies.clone())?, None)),
        UbootEnvLocation::Partition {
            part,
            size,
            files: names,
        } => {
            let bp = crate::bootpart::BootPart::open(disk, part)?;
            let copies = names
                .iter()
                .map(|n| Ok(Box::new(PartCopy(bp.file(n)?)) as Box<dyn ubootenv::EnvIo>))
                .collect::<Result<Vec<_>>>()?;
            Ok((ubootenv::EnvStore::new(*size, copies)?, Some(bp)))
        }
    }
}
