//! The system config file (TOML) turned into a validated [`SystemConfig`].
//!
//! Raw serde structs mirror the file and refuse unknown keys; [`SystemConfig`]
//! is what the rest of abup sees: every path absolute, every choice an enum,
//! every "one of these two" resolved. The README documents every key.

use crate::slot::SlotName;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Component, Path, PathBuf};

/// Where the config is read from when neither `--config` nor `ABUP_CONFIG` is set.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/abup/system.toml";

/// Largest config file accepted; a config is a few hundred bytes.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A GPT partition named by label or by unique partition GUID (PARTUUID).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartRef {
    Label(String),
    Uuid(String),
}

impl std::fmt::Display for PartRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartRef::Label(l) => write!(f, "PARTLABEL={l}"),
            PartRef::Uuid(u) => write!(f, "PARTUUID={u}"),
        }
    }
}

/// Where the GRUB environment block lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrubEnvLocation {
    /// A path in the running system (e.g. `/boot/grub/grubenv`).
    File(PathBuf),
    /// A file on a partition of the disk that abup mounts (ext4) while it works.
    Partition { part: PartRef, path: PathBuf },
}

/// Where the U-Boot environment lives (one or two copies, same size).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UbootEnvLocation {
    /// An `fw_env.config` naming the copies, read when the backend opens.
    FwEnvConfig(PathBuf),
    /// Copies in files or block devices of the running system, at offsets.
    Direct {
        size: usize,
        copies: Vec<(PathBuf, u64)>,
    },
    /// Files on a partition of the disk (FAT or ext4, mounted or not),
    /// rewritten in place.
    Partition {
        part: PartRef,
        size: usize,
        files: Vec<PathBuf>,
    },
}

/// Where the EFI system partition is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EspLocation {
    /// A directory of the running system where the ESP is mounted.
    Mounted(PathBuf),
    /// A partition of the disk: used through its mount if mounted, else
    /// through mtools.
    Partition(PartRef),
}

/// The boot backend, chosen once from the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootConfig {
    Grub {
        env: GrubEnvLocation,
    },
    Uboot {
        env: UbootEnvLocation,
    },
    /// systemd-boot entries on the EFI system partition.
    SystemdBoot {
        esp: EspLocation,
        /// Where efivarfs is mounted (LoaderEntrySelected, LoaderEntryDefault).
        efivars: PathBuf,
    },
    /// An executable with RAUC's custom-backend interface.
    Custom {
        command: PathBuf,
        timeout: std::time::Duration,
    },
}

/// The validated system configuration.
#[derive(Clone, Debug)]
pub struct SystemConfig {
    /// The file this was read from (for messages).
    pub source: PathBuf,
    /// Device type; a bundle must carry exactly this compatible string.
    pub compatible: String,
    /// A block device, or a disk-image file that abup attaches to loop devices.
    pub disk: PathBuf,
    /// GPT partitions of slots A and B.
    pub slot_a: PartRef,
    pub slot_b: PartRef,
    pub boot: BootConfig,
    /// Boot attempts a newly activated slot gets before the bootloader falls back.
    pub boot_tries: u32,
    /// Public keys whose signatures are trusted.
    pub trusted_keys: Vec<PathBuf>,
    /// Preserve rules (`preserve.paths` and `[[preserve.rule]]`), in order.
    pub preserve: Vec<crate::migrate::rules::Rule>,
    /// Root that preserved paths are read from, when set in the config.
    /// Unset means the running system's `/`, which abup uses only when the
    /// system was booted from a slot (never a rescue system's own files).
    pub preserve_from: Option<PathBuf>,
    /// Directory holding abup's records of what each slot holds.
    pub state_dir: PathBuf,
    /// The data partition whose changes migrations stage until mark-good.
    pub data: Option<PartRef>,
    /// Time limit of each migration.
    pub migrate_timeout: std::time::Duration,
    /// The shared boot partition whose files bundles may update
    /// (`[boot_files]`); None: bundles with boot files are refused.
    pub boot_files: Option<BootFilesConfig>,
}

/// `[boot_files]`: where the shared boot partition is and which of its
/// files are edited on the device (see [`crate::bootfiles`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootFilesConfig {
    pub part: PartRef,
    /// The filesystem the partition must have, when the config says.
    pub filesystem: Option<crate::bootpart::FsKind>,
    /// Files (relative to the partition's root) never replaced or removed
    /// once they exist on the device; installed only when missing.
    pub protected: Vec<String>,
}

impl SystemConfig {
    /// The partition of `slot`.
    pub fn slot(&self, slot: SlotName) -> &PartRef {
        match slot {
            SlotName::A => &self.slot_a,
            SlotName::B => &self.slot_b,
        }
    }

    /// Every partition of the disk the config names, with its key: the
    /// slots, any boot partition and the data partition.
    /// [`crate::disk::Disk::check_distinct`] makes sure they are different
    /// partitions; add new ones here.
    pub fn named_partitions(&self) -> Vec<(&'static str, &PartRef)> {
        let mut named = vec![("slots.A", &self.slot_a), ("slots.B", &self.slot_b)];
        match &self.boot {
            BootConfig::Grub {
                env: GrubEnvLocation::Partition { part, .. },
            } => named.push(("boot.grub", part)),
            BootConfig::Uboot {
                env: UbootEnvLocation::Partition { part, .. },
            } => named.push(("boot.uboot", part)),
            BootConfig::SystemdBoot {
                esp: EspLocation::Partition(part),
                ..
            } => named.push(("boot.systemd-boot", part)),
            BootConfig::Grub { .. }
            | BootConfig::Uboot { .. }
            | BootConfig::SystemdBoot { .. }
            | BootConfig::Custom { .. } => {}
        }
        if let Some(data) = &self.data {
            named.push(("data", data));
        }
        // The boot files may share the partition of the boot environment.
        if let Some(b) = self
            .boot_files
            .as_ref()
            .filter(|b| !named.iter().any(|n| *n.1 == b.part))
        {
            named.push(("boot_files", &b.part));
        }
        named
    }

    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<SystemConfig> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "config {} does not exist; pass --config or set ABUP_CONFIG to use another file",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("reading config {}", path.display())),
        };
        if meta.len() > MAX_CONFIG_BYTES {
            bail!(
                "reading config {}: file is larger than {MAX_CONFIG_BYTES} bytes",
                path.display()
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(&text, path).with_context(|| format!("config {}", path.display()))
    }

    /// Parses and validates config text; `source` is only used in messages.
    pub fn parse(text: &str, source: &Path) -> Result<SystemConfig> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{}", e.to_string().trim().replace('\n', " ")))?;
        let slot_a = raw.slots.a.into_ref("slots.A")?;
        let slot_b = raw.slots.b.into_ref("slots.B")?;
        if slot_a == slot_b {
            bail!("slots.A and slots.B name the same partition ({slot_a})");
        }
        let boot_tries = raw.boot.tries.unwrap_or(3);
        if !(1..=9).contains(&boot_tries) {
            bail!("boot.tries must be between 1 and 9, not {boot_tries}");
        }
        let other_tables = [
            ("grub", raw.boot.grub.is_some()),
            ("uboot", raw.boot.uboot.is_some()),
            ("custom", raw.boot.custom.is_some()),
            ("systemd-boot", raw.boot.systemd_boot.is_some()),
        ];
        if let Some((t, _)) = other_tables
            .iter()
            .find(|(t, set)| *set && *t != raw.boot.backend)
            .filter(|_| other_tables.iter().any(|(t, _)| *t == raw.boot.backend))
        {
            bail!(
                "boot.{t} is set but boot.backend is {:?}; remove [boot.{t}] or set backend = {t:?}",
                raw.boot.backend
            );
        }
        let boot = match raw.boot.backend.as_str() {
            "grub" => {
                let g = raw.boot.grub.unwrap_or_default();
                let env = match (g.envfile, g.partlabel, g.partuuid) {
                    (Some(f), None, None) => {
                        if g.path.is_some() {
                            bail!(
                                "boot.grub.path is only used with boot.grub.partlabel or partuuid"
                            );
                        }
                        GrubEnvLocation::File(absolute("boot.grub.envfile", f)?)
                    }
                    (None, label, uuid) if label.is_some() || uuid.is_some() => {
                        let part = PartSpec {
                            partlabel: label,
                            partuuid: uuid,
                        }
                        .into_ref("boot.grub")?;
                        let path = g.path.unwrap_or_else(|| PathBuf::from("grub/grubenv"));
                        let path = relative_inside("boot.grub.path", &path)?;
                        GrubEnvLocation::Partition { part, path }
                    }
                    (None, None, None) => {
                        GrubEnvLocation::File(PathBuf::from("/boot/grub/grubenv"))
                    }
                    _ => bail!(
                        "boot.grub: set either envfile, or partlabel/partuuid (with path), not both"
                    ),
                };
                BootConfig::Grub { env }
            }
            "uboot" => BootConfig::Uboot {
                env: uboot_location(raw.boot.uboot.unwrap_or_default())?,
            },
            "systemd-boot" => {
                let c = raw.boot.systemd_boot.unwrap_or_default();
                let esp = match (c.esp, c.partlabel, c.partuuid) {
                    (Some(p), None, None) => EspLocation::Mounted(absolute("boot.systemd-boot.esp", p)?),
                    (None, label, uuid) if label.is_some() || uuid.is_some() => {
                        EspLocation::Partition(
                            PartSpec {
                                partlabel: label,
                                partuuid: uuid,
                            }
                            .into_ref("boot.systemd-boot")?,
                        )
                    }
                    (None, None, None) => EspLocation::Mounted(PathBuf::from("/boot/efi")),
                    _ => bail!("boot.systemd-boot: set either esp, or partlabel/partuuid, not both"),
                };
                BootConfig::SystemdBoot {
                    esp,
                    efivars: absolute(
                        "boot.systemd-boot.efivars",
                        c.efivars
                            .unwrap_or_else(|| PathBuf::from("/sys/firmware/efi/efivars")),
                    )?,
                }
            }
            "custom" => {
                let c = raw.boot.custom.context(
                    "boot.custom.command must name the executable of the custom backend",
                )?;
                let secs = c.timeout.unwrap_or(10);
                if !(1..=600).contains(&secs) {
                    bail!("boot.custom.timeout must be between 1 and 600 seconds, not {secs}");
                }
                BootConfig::Custom {
                    command: absolute("boot.custom.command", c.command)?,
                    timeout: std::time::Duration::from_secs(secs),
                }
            }
            other => bail!(
                "boot.backend {other:?} is not supported; supported backends: grub, uboot, systemd-boot, custom"
            ),
        };
        if raw.compatible.trim().is_empty() {
            bail!("compatible must not be empty");
        }
        let preserve = crate::migrate::config_rules(raw.preserve.paths, raw.preserve.rule)?;
        let migrate_timeout = match raw.migrate.timeout_secs.unwrap_or(300) {
            0 => bail!("migrate.timeout_secs must be at least 1"),
            s => std::time::Duration::from_secs(s),
        };
        let boot_files = boot_files_beside(&boot, raw.boot_files)?;
        Ok(SystemConfig {
            source: source.to_path_buf(),
            compatible: raw.compatible,
            disk: absolute("disk.device", raw.disk.device)?,
            slot_a,
            slot_b,
            boot,
            boot_tries,
            trusted_keys: raw
                .keys
                .trusted
                .into_iter()
                .map(|p| absolute("keys.trusted", p))
                .collect::<Result<_>>()?,
            preserve,
            preserve_from: raw
                .preserve
                .from
                .map(|p| absolute("preserve.from", p))
                .transpose()?,
            state_dir: absolute(
                "state_dir",
                raw.state_dir
                    .unwrap_or_else(|| PathBuf::from("/var/lib/abup")),
            )?,
            data: raw.data.map(|d| d.into_ref("data")).transpose()?,
            migrate_timeout,
            boot_files,
        })
    }
}

/// Resolves `[boot.uboot]`: an fw_env.config, copies at paths, or files on
/// a partition. Without any key, `/etc/fw_env.config` as fw_printenv does.
fn uboot_location(u: RawUboot) -> Result<UbootEnvLocation> {
    let size = |s: Option<u64>| -> Result<usize> {
        let s = s.context("boot.uboot.size must be set (the environment size, e.g. 0x4000)")?;
        usize::try_from(s)
            .ok()
            .filter(|&s| (16..=16 << 20).contains(&s))
            .with_context(|| format!("boot.uboot.size {s:#x} must be between 0x10 and 16 MiB"))
    };
    let part = u.partlabel.is_some() || u.partuuid.is_some();
    match (u.fw_env_config, u.envfile, part) {
        (Some(f), None, false) => {
            if u.size.is_some() || u.path.is_some() || u.redundant_path.is_some() {
                bail!("boot.uboot.fw_env_config names the copies and sizes; set nothing else");
            }
            Ok(UbootEnvLocation::FwEnvConfig(absolute(
                "boot.uboot.fw_env_config",
                f,
            )?))
        }
        (None, Some(f), false) => {
            let mut copies = vec![(absolute("boot.uboot.envfile", f)?, u.offset.unwrap_or(0))];
            match (u.redundant_envfile, u.redundant_offset) {
                (None, None) => {}
                (file, offset) => copies.push((
                    absolute(
                        "boot.uboot.redundant_envfile",
                        file.unwrap_or_else(|| copies[0].0.clone()),
                    )?,
                    offset.unwrap_or(0),
                )),
            }
            if copies.len() == 2 && copies[0] == copies[1] {
                bail!("boot.uboot: the two copies are at the same place; set redundant_offset");
            }
            Ok(UbootEnvLocation::Direct {
                size: size(u.size)?,
                copies,
            })
        }
        (None, None, true) => {
            let part = PartSpec {
                partlabel: u.partlabel,
                partuuid: u.partuuid,
            }
            .into_ref("boot.uboot")?;
            let mut files = vec![relative_inside(
                "boot.uboot.path",
                &u.path.unwrap_or_else(|| PathBuf::from("uboot.env")),
            )?];
            if let Some(r) = u.redundant_path {
                files.push(relative_inside("boot.uboot.redundant_path", &r)?);
            }
            if files.len() == 2 && files[0] == files[1] {
                bail!("boot.uboot: path and redundant_path must differ");
            }
            Ok(UbootEnvLocation::Partition {
                part,
                size: size(u.size)?,
                files,
            })
        }
        (None, None, false) => Ok(UbootEnvLocation::FwEnvConfig(PathBuf::from(
            "/etc/fw_env.config",
        ))),
        _ => bail!(
            "boot.uboot: set one of fw_env_config, envfile, or partlabel/partuuid (with path)"
        ),
    }
}

/// Resolves `[boot_files]` next to the boot backend: it may share the
/// partition of a GRUB or U-Boot environment, not systemd-boot's ESP (whose
/// backend keeps its own handle on it).
fn boot_files_beside(
    boot: &BootConfig,
    raw: Option<RawBootFiles>,
) -> Result<Option<BootFilesConfig>> {
    let Some(b) = raw.map(boot_files).transpose()? else {
        return Ok(None);
    };
    if let BootConfig::SystemdBoot {
        esp: EspLocation::Partition(p),
        ..
    } = boot
    {
        if *p == b.part {
            bail!("boot_files names the systemd-boot ESP ({p}); abup does not update boot files on that partition yet: put them on another one");
        }
    }
    Ok(Some(b))
}

/// Resolves `[boot_files]`.
fn boot_files(b: RawBootFiles) -> Result<BootFilesConfig> {
    let part = PartSpec {
        partlabel: b.partlabel,
        partuuid: b.partuuid,
    }
    .into_ref("boot_files")?;
    let filesystem = match b.filesystem.as_deref() {
        None | Some("auto") => None,
        Some("ext4") => Some(crate::bootpart::FsKind::Ext4),
        Some("fat" | "vfat") => Some(crate::bootpart::FsKind::Fat),
        Some(other) => bail!("boot_files.filesystem {other:?} is not one of auto, ext4, fat"),
    };
    let protected = b
        .protected
        .iter()
        .map(|p| {
            let p = relative_inside("boot_files.protected", p)?;
            crate::bootfiles::clean_path(&p.to_string_lossy())
                .with_context(|| format!("boot_files.protected {}", p.display()))
        })
        .collect::<Result<_>>()?;
    Ok(BootFilesConfig {
        part,
        filesystem,
        protected,
    })
}

/// Requires an absolute path without `..` (config paths never need one).
fn absolute(key: &str, p: PathBuf) -> Result<PathBuf> {
    if !p.is_absolute() {
        bail!("{key}: {} must be an absolute path", p.display());
    }
    if p.components().any(|c| c == Component::ParentDir) {
        bail!("{key}: {} must not contain '..'", p.display());
    }
    Ok(p)
}

/// Requires a relative path that stays inside its base directory.
fn relative_inside(key: &str, p: &Path) -> Result<PathBuf> {
    if p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
        bail!(
            "{key}: {} must be relative to the partition's root, without '..'",
            p.display()
        );
    }
    Ok(p.to_path_buf())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    compatible: String,
    state_dir: Option<PathBuf>,
    disk: RawDisk,
    slots: RawSlots,
    boot: RawBoot,
    #[serde(default)]
    keys: RawKeys,
    #[serde(default)]
    preserve: RawPreserve,
    data: Option<PartSpec>,
    #[serde(default)]
    migrate: RawMigrate,
    boot_files: Option<RawBootFiles>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBootFiles {
    partlabel: Option<String>,
    partuuid: Option<String>,
    filesystem: Option<String>,
    #[serde(default)]
    protected: Vec<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    device: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlots {
    #[serde(rename = "A")]
    a: PartSpec,
    #[serde(rename = "B")]
    b: PartSpec,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PartSpec {
    partlabel: Option<String>,
    partuuid: Option<String>,
}

impl PartSpec {
    fn into_ref(self, key: &str) -> Result<PartRef> {
        match (self.partlabel, self.partuuid) {
            (Some(l), None) if !l.is_empty() => Ok(PartRef::Label(l)),
            (None, Some(u)) => {
                let u = u.to_ascii_lowercase();
                if uuid_shape_ok(&u) {
                    Ok(PartRef::Uuid(u))
                } else {
                    bail!("{key}.partuuid {u:?} is not a GUID like 0fc63daf-8483-4772-8e79-3d69d8477de4")
                }
            }
            _ => bail!("{key}: set exactly one of partlabel or partuuid"),
        }
    }
}

fn uuid_shape_ok(u: &str) -> bool {
    let parts: Vec<&str> = u.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBoot {
    backend: String,
    tries: Option<u32>,
    grub: Option<RawGrub>,
    uboot: Option<RawUboot>,
    custom: Option<RawCustom>,
    #[serde(rename = "systemd-boot")]
    systemd_boot: Option<RawSdBoot>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSdBoot {
    esp: Option<PathBuf>,
    partlabel: Option<String>,
    partuuid: Option<String>,
    efivars: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCustom {
    command: PathBuf,
    timeout: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUboot {
    fw_env_config: Option<PathBuf>,
    envfile: Option<PathBuf>,
    offset: Option<u64>,
    redundant_envfile: Option<PathBuf>,
    redundant_offset: Option<u64>,
    size: Option<u64>,
    partlabel: Option<String>,
    partuuid: Option<String>,
    path: Option<PathBuf>,
    redundant_path: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGrub {
    envfile: Option<PathBuf>,
    partlabel: Option<String>,
    partuuid: Option<String>,
    path: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    #[serde(default)]
    trusted: Vec<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPreserve {
    #[serde(default)]
    paths: Vec<PathBuf>,
    from: Option<PathBuf>,
    #[serde(default)]
    rule: Vec<crate::migrate::rules::RawRule>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMigrate {
    timeout_secs: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_files_may_not_share_the_systemd_boot_esp() {
        let text = |table: &str| {
            format!(
                "compatible = \"c\"\n[disk]\ndevice = \"/dev/sda\"\n[slots.A]\npartlabel = \"a\"\n[slots.B]\npartlabel = \"b\"\n[boot]\nbackend = \"systemd-boot\"\n[boot.systemd-boot]\npartlabel = \"esp\"\n[boot_files]\n{table}\n"
            )
        };
        let e = SystemConfig::parse(&text("partlabel = \"esp\""), Path::new("t")).unwrap_err();
        assert!(format!("{e:#}").contains("systemd-boot ESP"), "{e:#}");
        let c = SystemConfig::parse(&text("partlabel = \"boot\""), Path::new("t")).unwrap();
        assert_eq!(c.boot_files.unwrap().part, PartRef::Label("boot".into()));
    }

    const FULL: &str = r#"
compatible = "acme-gw"
state_dir = "/data/abup"
[disk]
device = "/dev/mmcblk0"
[slots.A]
partlabel = "rootA"
[slots.B]
partuuid = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
[boot]
backend = "grub"
tries = 2
[boot.grub]
partlabel = "boot"
path = "EFI/grubenv"
[keys]
trusted = ["/etc/abup/keys/release.pub"]
[preserve]
paths = ["/etc/hostname", "/etc/ssh"]
"#;

    #[test]
    fn parses_full_example() {
        let c = SystemConfig::parse(FULL, Path::new("t.toml")).unwrap();
        assert_eq!(c.compatible, "acme-gw");
        assert_eq!(c.slot_a, PartRef::Label("rootA".into()));
        assert_eq!(
            c.slot_b,
            PartRef::Uuid("0fc63daf-8483-4772-8e79-3d69d8477de4".into())
        );
        assert_eq!(c.boot_tries, 2);
        assert_eq!(
            c.boot,
            BootConfig::Grub {
                env: GrubEnvLocation::Partition {
                    part: PartRef::Label("boot".into()),
                    path: "EFI/grubenv".into()
                }
            }
        );
        assert_eq!(c.preserve_from, None);
        assert_eq!(c.state_dir, Path::new("/data/abup"));
    }

    #[test]
    fn uboot_locations() {
        let with = |table: &str| {
            let text = FULL
                .replace("backend = \"grub\"", "backend = \"uboot\"")
                .replace(
                    "[boot.grub]\npartlabel = \"boot\"\npath = \"EFI/grubenv\"",
                    table,
                );
            SystemConfig::parse(&text, Path::new("t")).map(|c| c.boot)
        };
        assert_eq!(
            with("").unwrap(),
            BootConfig::Uboot {
                env: UbootEnvLocation::FwEnvConfig("/etc/fw_env.config".into())
            }
        );
        assert_eq!(
            with("[boot.uboot]\npartlabel = \"boot\"\nredundant_path = \"uboot-redund.env\"\nsize = 0x4000").unwrap(),
            BootConfig::Uboot {
                env: UbootEnvLocation::Partition {
                    part: PartRef::Label("boot".into()),
                    size: 0x4000,
                    files: vec!["uboot.env".into(), "uboot-redund.env".into()]
                }
            }
        );
        assert_eq!(
            with("[boot.uboot]\nenvfile = \"/dev/mmcblk0\"\noffset = 0x3000\nredundant_offset = 0x7000\nsize = 0x4000").unwrap(),
            BootConfig::Uboot {
                env: UbootEnvLocation::Direct {
                    size: 0x4000,
                    copies: vec![("/dev/mmcblk0".into(), 0x3000), ("/dev/mmcblk0".into(), 0x7000)]
                }
            }
        );
        for (table, want) in [
            ("[boot.uboot]\nenvfile = \"/x\"", "size must be set"),
            ("[boot.uboot]\nenvfile = \"/x\"\nsize = 4", "between"),
            (
                "[boot.uboot]\nenvfile = \"/x\"\nredundant_offset = 0\nsize = 64",
                "same place",
            ),
            (
                "[boot.uboot]\nenvfile = \"/x\"\npartlabel = \"b\"\nsize = 64",
                "set one of",
            ),
            (
                "[boot.uboot]\nfw_env_config = \"/e\"\nsize = 64",
                "set nothing else",
            ),
            ("[boot.grub]\nenvfile = \"/g\"", "boot.grub is set"),
        ] {
            let err = format!("{:#}", with(table).unwrap_err());
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }

    #[test]
    fn refuses_bad_configs() {
        let cases = [
            (
                FULL.replace("grub\"\ntries", "lilo\"\ntries"),
                "not supported",
            ),
            (FULL.replace("state_dir", "stat_dir"), "unknown field"),
            (FULL.replace("/etc/ssh", "etc/ssh"), "absolute"),
            (FULL.replace("/etc/ssh", "/etc/../ssh"), "'..'"),
            (FULL.replace("EFI/grubenv", "/EFI/grubenv"), "relative"),
            (FULL.replace("tries = 2", "tries = 0"), "between 1 and 9"),
            (FULL.replace("8E79", "8E7"), "GUID"),
            (
                FULL.replace(
                    "partuuid = \"0FC63DAF-8483-4772-8E79-3D69D8477DE4\"",
                    "partlabel = \"rootA\"",
                ),
                "same partition",
            ),
        ];
        for (text, want) in cases {
            let err = format!(
                "{:#}",
                SystemConfig::parse(&text, Path::new("t")).unwrap_err()
            );
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }
}
