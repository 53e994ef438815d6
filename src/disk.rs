//! The disk holding slots A and B: its GPT, and partitions resolved to devices.
//!
//! The disk is either a block device or a disk-image file. The GPT is read
//! with the `gpt` crate at the disk's logical sector size (512 or 4096).
//! A partition resolves to its kernel node (`/dev/sda3`, `/dev/loop0p3`)
//! when one exists, and otherwise to a loop device over the partition's byte
//! range, attached for as long as abup runs and detached on drop. A kernel
//! node over other bytes than the GPT entry (a stale kernel table) is an
//! error: abup never writes a slot through it.

use crate::config::PartRef;
use crate::mount::LoopDevice;
use anyhow::{bail, Context, Result};
use gpt::disk::LogicalBlockSize;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// One GPT partition.
#[derive(Clone, Debug)]
pub struct PartInfo {
    /// 1-based partition number, as the kernel numbers nodes.
    pub number: u32,
    pub label: String,
    /// Unique partition GUID, lowercase (the PARTUUID).
    pub partuuid: String,
    /// Byte offset of the first sector.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A disk and its GPT partitions.
#[derive(Debug)]
pub struct Disk {
    pub path: PathBuf,
    /// True for a block device, false for a disk-image file.
    pub is_block: bool,
    pub sector_size: u64,
    pub partitions: Vec<PartInfo>,
    /// Bytes partitions may occupy: after the protective MBR, the primary
    /// GPT header and its entries, and before the backup GPT.
    pub usable: std::ops::Range<u64>,
}

/// A partition reachable as a block device.
#[derive(Debug)]
pub struct PartDevice {
    pub path: PathBuf,
    /// Set when abup attached a loop device for this partition.
    _loop: Option<LoopDevice>,
}

impl Disk {
    /// Opens `path` and reads its GPT.
    pub fn open(path: &Path) -> Result<Disk> {
        let meta = fs::metadata(path).with_context(|| {
            format!(
                "opening disk {}: check disk.device in the config",
                path.display()
            )
        })?;
        let is_block = meta.file_type().is_block_device();
        if !is_block && !meta.is_file() {
            bail!(
                "opening disk {}: not a block device or disk-image file",
                path.display()
            );
        }
        let sector_size = detect_sector_size(path, is_block)?;
        let lb = match sector_size {
            512 => LogicalBlockSize::Lb512,
            4096 => LogicalBlockSize::Lb4096,
            n => bail!(
                "reading GPT of {}: unsupported sector size {n}",
                path.display()
            ),
        };
        let gpt = gpt::GptConfig::new()
            .writable(false)
            .logical_block_size(lb)
            .open(path)
            .with_context(|| format!("reading GPT of {}", path.display()))?;
        let usable = usable_range(path, sector_size, gpt.header())?;
        let mut partitions = Vec::new();
        for (number, p) in gpt.partitions() {
            if !p.is_used() {
                continue;
            }
            partitions.push(PartInfo {
                number: *number,
                label: p.name.clone(),
                partuuid: p.part_guid.hyphenated().to_string().to_ascii_lowercase(),
                start: p
                    .bytes_start(lb)
                    .with_context(|| format!("reading GPT of {}", path.display()))?,
                size: p
                    .bytes_len(lb)
                    .with_context(|| format!("reading GPT of {}", path.display()))?,
            });
        }
        Ok(Disk {
            path: path.to_path_buf(),
            is_block,
            sector_size,
            partitions,
            usable,
        })
    }

    /// Resolves every partition the config names (`(role, reference)`, e.g.
    /// `("slots.B", PARTUUID=…)`) and refuses the set unless each is its own
    /// GPT partition inside the disk's usable area that shares no byte with
    /// any other partition. Two names for one partition (a label and a
    /// GUID), a slot that is the boot or data partition, a partition
    /// covering the GPT or the whole disk: abup would otherwise format
    /// something it must keep.
    pub fn check_distinct(&self, named: &[(&str, &PartRef)]) -> Result<()> {
        let mut found: Vec<(&str, &PartRef, &PartInfo)> = Vec::new();
        for (role, r) in named {
            let p = self.find(r).with_context(|| format!("finding {role}"))?;
            if p.start < self.usable.start || p.start.saturating_add(p.size) > self.usable.end {
                bail!(
                    "{role} ({r}) is partition {} at bytes {}..{}, outside the usable area {}..{} of {} (it covers the partition table or lies beyond the disk): fix the partition table",
                    p.number,
                    p.start,
                    p.start.saturating_add(p.size),
                    self.usable.start,
                    self.usable.end,
                    self.path.display()
                );
            }
            if let Some((other, oref, _)) = found.iter().find(|(_, _, q)| q.number == p.number) {
                bail!(
                    "{other} ({oref}) and {role} ({r}) are the same partition {} ({:?}, PARTUUID={}) of {}: each must name its own partition; fix the config",
                    p.number,
                    p.label,
                    p.partuuid,
                    self.path.display()
                );
            }
            let end = p.start + p.size;
            if let Some(q) = self
                .partitions
                .iter()
                .find(|q| q.number != p.number && q.start < end && p.start < q.start + q.size)
            {
                bail!(
                    "{role} ({r}) is partition {} at bytes {}..{}, which overlaps partition {} ({:?}) at bytes {}..{} of {}: fix the partition table",
                    p.number,
                    p.start,
                    end,
                    q.number,
                    q.label,
                    q.start,
                    q.start + q.size,
                    self.path.display()
                );
            }
            found.push((role, r, p));
        }
        Ok(())
    }

    /// Finds the partition `r` names.
    pub fn find(&self, r: &PartRef) -> Result<&PartInfo> {
        let found: Vec<&PartInfo> = self
            .partitions
            .iter()
            .filter(|p| match r {
                PartRef::Label(l) => &p.label == l,
                PartRef::Uuid(u) => &p.partuuid == u,
            })
            .collect();
        match found.as_slice() {
            [one] => Ok(one),
            [] => bail!(
                "no partition {r} on {}: check the slots in the config (partitions: {})",
                self.path.display(),
                self.partitions
                    .iter()
                    .map(|p| format!("{}={:?}", p.number, p.label))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => bail!(
                "{} partitions match {r} on {}: use partuuid to name one",
                found.len(),
                self.path.display()
            ),
        }
    }

    /// Where `part` is mounted, through its own device or through any loop
    /// device over an overlapping byte range of the same disk (a disk-image
    /// file or disk attached by someone else, with or without partition scan).
    pub fn mount_point(&self, part: &PartInfo, dev: &PartDevice) -> Result<Option<PathBuf>> {
        if let Some(m) = crate::mount::mount_point_of(&dev.path)? {
            return Ok(Some(m));
        }
        for node in self.overlapping_loops(part)? {
            if let Some(m) = crate::mount::mount_point_of(&node)? {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// Whether the filesystem holding `path` (or its nearest existing
    /// ancestor) lives on `part`: its device is the partition's kernel node
    /// or a loop device over an overlapping byte range of this disk.
    pub fn holds(&self, part: &PartInfo, path: &Path) -> Result<bool> {
        let existing = path.ancestors().find(|p| p.exists()).unwrap_or(path);
        let st_dev = fs::metadata(existing)
            .with_context(|| format!("reading {}", existing.display()))?
            .dev();
        let mut devs = self.overlapping_loops(part)?;
        if self.is_block {
            devs.extend(kernel_partition_node(&self.path, part)?);
        }
        Ok(devs.iter().any(|d| rdev(d).is_ok_and(|r| r == st_dev)))
    }

    /// Loop devices (and their partitions) over an overlapping byte range
    /// of `part`, through the disk or whatever backs it.
    pub fn overlapping_loops(&self, part: &PartInfo) -> Result<Vec<PathBuf>> {
        let disk = fs::canonicalize(&self.path)
            .with_context(|| format!("resolving {}", self.path.display()))?;
        let mut out = Vec::new();
        // The same bytes can be reached through the disk itself and through
        // whatever backs it, when the disk is a loop device (over a file or
        // another loop device): check loops over each, shifted by its offset.
        for (backing, shift) in backing_chain(&disk) {
            let range = (shift + part.start, shift + part.start + part.size);
            for (node, start, len) in loop_aliases(&backing)? {
                let end = if len == 0 { u64::MAX } else { start + len };
                if start < range.1 && range.0 < end {
                    out.push(node);
                }
            }
        }
        Ok(out)
    }

    /// Every block device through which bytes of this disk can be reached:
    /// the disk and its kernel partitions, and loop devices (and their
    /// partitions) over it or over what backs it.
    pub fn alias_devices(&self) -> Vec<PathBuf> {
        let Ok(disk) = fs::canonicalize(&self.path) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if self.is_block {
            out.push(disk.clone());
            for p in &self.partitions {
                if let Ok(Some(n)) = kernel_node(&disk, p.number) {
                    out.push(n.path);
                }
            }
        }
        for (backing, _) in backing_chain(&disk) {
            let aliases = loop_aliases(&backing).unwrap_or_default();
            out.extend(aliases.into_iter().map(|(node, _, _)| node));
        }
        out
    }

    /// Makes `part` reachable as a block device: its kernel node if the
    /// kernel created one, else a loop device over its byte range.
    pub fn device(&self, part: &PartInfo) -> Result<PartDevice> {
        if self.is_block {
            if let Some(node) = kernel_partition_node(&self.path, part)? {
                return Ok(PartDevice {
                    path: node,
                    _loop: None,
                });
            }
        }
        let lo = LoopDevice::attach(
            &self.path,
            Some(part.start),
            Some(part.size),
            Some(self.sector_size as u32),
        )
        .with_context(|| {
            format!(
                "attaching partition {} of {} to a loop device",
                part.number,
                self.path.display()
            )
        })?;
        Ok(PartDevice {
            path: lo.path().to_path_buf(),
            _loop: Some(lo),
        })
    }
}

/// The byte range GPT partitions may use: from the header's first usable LBA
/// (but never before the protective MBR, the primary header and 16 KiB of
/// entries) to its last usable LBA (but never into the backup GPT at the end
/// of the disk). A crafted header cannot widen it past the disk's own bytes.
fn usable_range(path: &Path, sector: u64, h: &gpt::header::Header) -> Result<std::ops::Range<u64>> {
    let size = fs::File::open(path)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .with_context(|| format!("reading the size of {}", path.display()))?;
    let table = sector * 2 + 16384;
    let start = h.first_usable.saturating_mul(sector).max(table);
    let end = h
        .last_usable
        .saturating_add(1)
        .saturating_mul(sector)
        .min(size.saturating_sub(table - sector));
    Ok(start..end.max(start))
}

/// The logical sector size: from sysfs for block devices; for image files,
/// where the GPT header signature sits (LBA 1 at 512 or 4096 bytes).
fn detect_sector_size(path: &Path, is_block: bool) -> Result<u64> {
    if is_block {
        let name = sys_name(path)?;
        refuse_partition(path, &name)?;
        let f = format!("/sys/class/block/{name}/queue/logical_block_size");
        let s = fs::read_to_string(&f).with_context(|| format!("reading {f}"))?;
        return s.trim().parse().with_context(|| format!("parsing {f}"));
    }
    let mut f = fs::File::open(path).with_context(|| format!("opening disk {}", path.display()))?;
    for size in [512u64, 4096] {
        let mut sig = [0u8; 8];
        f.seek(SeekFrom::Start(size))
            .and_then(|_| f.read_exact(&mut sig))
            .ok();
        if &sig == b"EFI PART" {
            return Ok(size);
        }
    }
    bail!(
        "reading GPT of {}: no GPT header at 512 or 4096 bytes; is this a GPT disk image?",
        path.display()
    )
}

/// The kernel's name of a block device (`/dev/loop3` → `loop3`), following symlinks.
/// disk.device must name the whole disk, not one of its partitions.
fn refuse_partition(path: &Path, name: &str) -> Result<()> {
    let sys = PathBuf::from("/sys/class/block").join(name);
    if let Ok(n) = fs::read_to_string(sys.join("partition")) {
        // The parent directory in sysfs is the whole disk.
        let parent = fs::canonicalize(&sys)
            .ok()
            .and_then(|p| {
                p.parent()
                    .and_then(|d| d.file_name())
                    .map(|d| d.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "the disk".to_string());
        bail!(
            "disk.device {} is partition {} of /dev/{parent}, not a disk; set disk.device to the whole disk (/dev/{parent})",
            path.display(),
            n.trim()
        );
    }
    Ok(())
}

fn sys_name(path: &Path) -> Result<String> {
    let real = fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    real.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .with_context(|| format!("resolving {}: no device name", path.display()))
}

/// A partition node the kernel made for a block device, and the byte range
/// it reaches (sysfs counts in 512-byte units whatever the sector size).
struct KernelNode {
    path: PathBuf,
    start: u64,
    size: u64,
}

/// `/dev/<child>` for the partition numbered `number` of block device `disk`,
/// as listed under `/sys/class/block/<disk>/`.
fn kernel_node(disk: &Path, number: u32) -> Result<Option<KernelNode>> {
    let name = sys_name(disk)?;
    let dir = PathBuf::from("/sys/class/block").join(&name);
    let entries = fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
    let units = |p: PathBuf| -> Result<u64> {
        let s = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let n: u64 = s
            .trim()
            .parse()
            .with_context(|| format!("parsing {}", p.display()))?;
        Ok(n * 512)
    };
    for e in entries.flatten() {
        let child = e.file_name().to_string_lossy().into_owned();
        if !child.starts_with(&name) {
            continue;
        }
        if let Ok(n) = fs::read_to_string(e.path().join("partition")) {
            if n.trim().parse::<u32>().ok() == Some(number) {
                let path = PathBuf::from("/dev").join(&child);
                if path.exists() {
                    return Ok(Some(KernelNode {
                        path,
                        start: units(e.path().join("start"))?,
                        size: units(e.path().join("size"))?,
                    }));
                }
            }
        }
    }
    Ok(None)
}

/// The kernel node of `part` on block device `disk`, when one exists and
/// reaches exactly the partition's bytes. A node over other bytes is a
/// stale kernel partition table (the disk was repartitioned, or a loop
/// device reused, without the kernel re-reading it): writing through it
/// would write somewhere else, perhaps into the booted slot, so it is an
/// error, not a fallback.
fn kernel_partition_node(disk: &Path, part: &PartInfo) -> Result<Option<PathBuf>> {
    let Some(node) = kernel_node(disk, part.number)? else {
        return Ok(None);
    };
    if (node.start, node.size) != (part.start, part.size) {
        bail!(
            "{} (the kernel's partition {} of {}) covers bytes {}..{}, but the GPT puts \
             partition {} {:?} at bytes {}..{}: the kernel's partition table is stale; \
             run `partx -u {}` (or reboot) so that it matches the disk, then run abup again",
            node.path.display(),
            part.number,
            disk.display(),
            node.start,
            node.start + node.size,
            part.number,
            part.label,
            part.start,
            part.start + part.size,
            disk.display()
        );
    }
    Ok(Some(node.path))
}

/// `disk`, then what backs it while it is a loop device, each with the byte
/// offset at which `disk`'s first byte sits in it.
fn backing_chain(disk: &Path) -> Vec<(PathBuf, u64)> {
    let mut chain = vec![(disk.to_path_buf(), 0)];
    // A loop over a loop over a file is already unusual; 8 levels is plenty.
    for _ in 0..8 {
        let (cur, shift) = chain[chain.len() - 1].clone();
        let Some(name) = cur.file_name().and_then(|n| n.to_str()) else {
            break;
        };
        let sys = PathBuf::from("/sys/block").join(name).join("loop");
        let Ok(backing) = fs::read_to_string(sys.join("backing_file")) else {
            break;
        };
        let offset: u64 = fs::read_to_string(sys.join("offset"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        chain.push((PathBuf::from(backing.trim()), shift + offset));
    }
    chain
}

/// Loop devices (and their partitions) backed by `disk`, each as
/// (device node, byte offset into `disk`, length or 0 for "to the end").
fn loop_aliases(disk: &Path) -> Result<Vec<(PathBuf, u64, u64)>> {
    let read_u64 = |p: PathBuf| -> u64 {
        fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Ok(out);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let sys = e.path();
        let Ok(backing) = fs::read_to_string(sys.join("loop/backing_file")) else {
            continue;
        };
        if Path::new(backing.trim()) != disk {
            continue;
        }
        let offset = read_u64(sys.join("loop/offset"));
        let limit = read_u64(sys.join("loop/sizelimit"));
        out.push((PathBuf::from("/dev").join(&name), offset, limit));
        for c in fs::read_dir(&sys).into_iter().flatten().flatten() {
            let child = c.file_name().to_string_lossy().into_owned();
            if child.starts_with(&name) && c.path().join("partition").exists() {
                // sysfs counts partition start and size in 512-byte units.
                let start = read_u64(c.path().join("start")) * 512;
                let size = read_u64(c.path().join("size")) * 512;
                out.push((PathBuf::from("/dev").join(&child), offset + start, size));
            }
        }
    }
    Ok(out)
}

/// The device number of a block device node.
pub fn rdev(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .rdev())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const MIB: u64 = 1 << 20;

    /// A 64 MiB GPT image file with partitions boot, rootA, rootB, data (8
    /// MiB each), after `edit` changed the entries (to overlap them, say).
    fn image(
        edit: impl FnOnce(&mut BTreeMap<u32, gpt::partition::Partition>),
    ) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(64 * MIB).unwrap();
        let mut g = gpt::GptConfig::new()
            .writable(true)
            .logical_block_size(LogicalBlockSize::Lb512)
            .change_partition_count(true)
            .create(f.path())
            .unwrap();
        for name in ["boot", "rootA", "rootB", "data"] {
            g.add_partition(name, 8 * MIB, gpt::partition_types::LINUX_FS, 0, None)
                .unwrap();
        }
        let mut parts = g.take_partitions();
        edit(&mut parts);
        g.update_partitions(parts).unwrap();
        g.write().unwrap();
        f
    }

    fn check(disk: &Disk, named: &[(&str, PartRef)]) -> Result<()> {
        let named: Vec<(&str, &PartRef)> = named.iter().map(|(k, r)| (*k, r)).collect();
        disk.check_distinct(&named)
    }

    fn label(l: &str) -> PartRef {
        PartRef::Label(l.into())
    }

    #[test]
    fn distinct_partitions_pass_and_aliases_are_refused() {
        let f = image(|_| {});
        let disk = Disk::open(f.path()).unwrap();
        let good = [
            ("slots.A", label("rootA")),
            ("slots.B", label("rootB")),
            ("boot.grub", label("boot")),
        ];
        check(&disk, &good).unwrap();

        let uuid_of_a = PartRef::Uuid(disk.find(&label("rootA")).unwrap().partuuid.clone());
        let cases = [
            // One partition named by label and by GUID.
            (
                vec![("slots.A", label("rootA")), ("slots.B", uuid_of_a.clone())],
                "are the same partition 2",
            ),
            // A slot that is the boot partition.
            (
                vec![
                    ("slots.A", label("rootA")),
                    ("slots.B", label("boot")),
                    ("boot.grub", label("boot")),
                ],
                "slots.B (PARTLABEL=boot) and boot.grub",
            ),
            (
                vec![("slots.A", uuid_of_a), ("slots.B", label("nope"))],
                "no partition PARTLABEL=nope",
            ),
        ];
        for (named, want) in cases {
            let err = format!("{:#}", check(&disk, &named).unwrap_err());
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }

    /// The error for the usual slots on an image edited by `edit`.
    fn slots_error(edit: impl FnOnce(&mut BTreeMap<u32, gpt::partition::Partition>)) -> String {
        let f = image(edit);
        let disk = Disk::open(f.path()).unwrap();
        let slots = [("slots.A", label("rootA")), ("slots.B", label("rootB"))];
        format!("{:#}", check(&disk, &slots).unwrap_err())
    }

    #[test]
    fn overlapping_and_table_covering_partitions_are_refused() {
        // rootB's entry stretched over the data partition.
        let err = slots_error(|p| p.get_mut(&3).unwrap().last_lba += 4096);
        assert!(err.contains("overlaps partition 4 (\"data\")"), "{err}");

        // rootA starting at LBA 1: it covers the GPT header (the "slot is
        // the disk itself" case).
        let err = slots_error(|p| p.get_mut(&2).unwrap().first_lba = 1);
        assert!(err.contains("outside the usable area"), "{err}");

        // Two entries with one GUID: a PARTUUID names neither for sure.
        let f = image(|p| {
            let guid = p[&2].part_guid;
            p.get_mut(&3).unwrap().part_guid = guid;
        });
        let disk = Disk::open(f.path()).unwrap();
        let uuid = PartRef::Uuid(disk.partitions[1].partuuid.clone());
        let err = format!(
            "{:#}",
            check(&disk, &[("slots.A", uuid), ("slots.B", label("data"))]).unwrap_err()
        );
        assert!(err.contains("2 partitions match"), "{err}");
    }
}
