//! A handle on the boot partition (ext4 or FAT), for backends that keep
//! bootloader files there: read a file and rewrite it in place.
//!
//! The partition may be mounted already (a running device: its files are
//! used through that mount), or not (a rescue system, an image): ext4 is
//! then mounted for the run, while FAT, which this kernel may not be able to
//! mount, is reached without mounting: `mshowfat` (mtools) names the clusters
//! of the file, and abup rewrites those bytes of the partition in place.
//!
//! The handle itself offers only in-place rewrites of an existing file,
//! never create, grow or rename (whole-file changes go through the journal
//! of [`crate::bootfiles`], which reaches the same mount or device): on FAT a rename is not crash-atomic (the directory entry
//! and the FAT are updated separately), and an in-place rewrite of the same
//! clusters changes no metadata at all. Atomicity comes from the caller's
//! format (U-Boot's redundant environment: two copies, the stale one
//! rewritten), not from the filesystem.

use crate::config::PartRef;
use crate::disk::{Disk, PartDevice};
use crate::mount::{Access, TempMount};
use crate::util::run;
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Filesystems a boot partition can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsKind {
    Ext4,
    Fat,
}

/// An open boot partition.
pub struct BootPart {
    /// Where the filesystem is mounted, when it is; `None`: FAT via mtools.
    dir: Option<PathBuf>,
    dev: PathBuf,
    shown: String,
    // Drop order: the mount before the device it is on.
    _mount: Option<TempMount>,
    _device: PartDevice,
}

/// Reads the filesystem type from the superblock.
pub fn fs_kind(dev: &Path) -> Result<FsKind> {
    let f = File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    let mut buf = vec![0u8; 2048];
    f.read_exact_at(&mut buf, 0)
        .with_context(|| format!("reading the superblock of {}", dev.display()))?;
    if buf[1080..1082] == [0x53, 0xef] {
        return Ok(FsKind::Ext4);
    }
    if buf[510..512] == [0x55, 0xaa] && (&buf[54..57] == b"FAT" || &buf[82..87] == b"FAT32") {
        return Ok(FsKind::Fat);
    }
    bail!(
        "{} holds neither ext4 nor FAT; check the boot partition in the config",
        dev.display()
    )
}

impl BootPart {
    /// Opens partition `part` of `disk`, mounting ext4 if it is not mounted.
    pub fn open(disk: &Disk, part: &PartRef) -> Result<BootPart> {
        Self::open_with(disk, part, Access::ReadWrite)
    }

    /// Like [`BootPart::open`]; ext4 is mounted with `access` (read-only
    /// for a look that must leave the partition byte-identical).
    pub fn open_with(disk: &Disk, part: &PartRef, access: Access) -> Result<BootPart> {
        let info = disk.find(part)?;
        let device = disk.device(info)?;
        let dev = device.path.clone();
        let shown = format!("boot partition {part} ({})", dev.display());
        if let Some(at) = disk.mount_point(info, &device)? {
            return Ok(BootPart {
                dir: Some(at),
                dev,
                shown,
                _mount: None,
                _device: device,
            });
        }
        let (dir, mount) = match fs_kind(&dev)? {
            FsKind::Ext4 => {
                let m =
                    TempMount::ext4(&dev, access).with_context(|| format!("mounting {shown}"))?;
                (Some(m.path().to_path_buf()), Some(m))
            }
            FsKind::Fat => (None, None),
        };
        Ok(BootPart {
            dir,
            dev,
            shown,
            _mount: mount,
            _device: device,
        })
    }

    /// Where the filesystem is mounted; None for FAT reached through mtools.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The partition's block device.
    pub fn device(&self) -> &Path {
        &self.dev
    }

    /// Names the partition in messages.
    pub fn describe(&self) -> &str {
        &self.shown
    }

    /// Opens the existing file `rel` (relative to the partition's root).
    pub fn file(&self, rel: &Path) -> Result<PartFile> {
        match &self.dir {
            Some(d) => {
                let path = d.join(rel);
                if !path.is_file() {
                    bail!("{} has no file {}", self.shown, rel.display());
                }
                Ok(PartFile::Path(
                    path,
                    format!("{} on {}", rel.display(), self.shown),
                ))
            }
            None => fat_file(&self.dev, rel, &self.shown),
        }
    }
}

/// A file on the boot partition, read and rewritten in place.
pub enum PartFile {
    /// Through a mount (or any path).
    Path(PathBuf, String),
    /// On an unmounted FAT filesystem: the byte ranges of its clusters on
    /// the device, in file order, cut to the file's size.
    Fat {
        dev: PathBuf,
        extents: Vec<(u64, u64)>,
        shown: String,
    },
}

impl PartFile {
    /// Names the file in messages.
    pub fn describe(&self) -> &str {
        match self {
            PartFile::Path(_, s) | PartFile::Fat { shown: s, .. } => s,
        }
    }

    /// The file's size in bytes.
    pub fn size(&self) -> Result<u64> {
        match self {
            PartFile::Path(p, _) => Ok(std::fs::metadata(p)
                .with_context(|| format!("reading {}", self.describe()))?
                .len()),
            PartFile::Fat { extents, .. } => Ok(extents.iter().map(|e| e.1).sum()),
        }
    }

    /// Calls `f(device or file, position, range in buf)` for each piece of
    /// `offset..offset+len` of the file.
    fn pieces(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> std::io::Result<()>,
    ) -> Result<()> {
        if offset + len as u64 > self.size()? {
            bail!(
                "{} is truncated: it has {} bytes, {} are needed",
                self.describe(),
                self.size()?,
                offset + len as u64
            );
        }
        let io =
            |r: std::io::Result<()>| r.with_context(|| format!("accessing {}", self.describe()));
        match self {
            PartFile::Path(..) => io(f(offset, 0..len)),
            PartFile::Fat { extents, .. } => {
                let (mut file_pos, mut done) = (0u64, 0usize);
                for &(dev_pos, ext_len) in extents {
                    let want = offset + done as u64;
                    if done < len && want < file_pos + ext_len {
                        let skip = want - file_pos;
                        let n = ((ext_len - skip) as usize).min(len - done);
                        io(f(dev_pos + skip, done..done + n))?;
                        done += n;
                    }
                    file_pos += ext_len;
                }
                Ok(())
            }
        }
    }

    fn target(&self) -> &Path {
        match self {
            PartFile::Path(p, _) => p,
            PartFile::Fat { dev, .. } => dev,
        }
    }

    /// Reads `len` bytes at `offset`.
    pub fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let f =
            File::open(self.target()).with_context(|| format!("opening {}", self.describe()))?;
        let mut buf = vec![0u8; len];
        self.pieces(offset, len, |pos, r| f.read_exact_at(&mut buf[r], pos))?;
        Ok(buf)
    }

    /// Rewrites `data` at `offset`, in place, and syncs it to the device.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .open(self.target())
            .with_context(|| format!("opening {} for writing", self.describe()))?;
        self.pieces(offset, data.len(), |pos, r| f.write_all_at(&data[r], pos))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", self.describe()))
    }
}

/// The cluster size of the FAT filesystem on `dev`, in bytes.
pub fn fat_cluster_bytes(dev: &Path) -> Result<u64> {
    Ok(fat_geometry(dev)?.cluster_bytes)
}

/// FAT boot-sector geometry: where cluster `n` starts on the device.
struct FatGeometry {
    cluster_bytes: u64,
    data_start: u64,
}

fn fat_geometry(dev: &Path) -> Result<FatGeometry> {
    let f = File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, 0)
        .with_context(|| format!("reading the FAT boot sector of {}", dev.display()))?;
    let u16_at = |i: usize| u64::from(u16::from_le_bytes([b[i], b[i + 1]]));
    let bps = u16_at(11);
    let spc = u64::from(b[13]);
    let reserved = u16_at(14);
    let fats = u64::from(b[16]);
    let root_entries = u16_at(17);
    let fat_size = match u16_at(22) {
        0 => u64::from(u32::from_le_bytes([b[36], b[37], b[38], b[39]])),
        n => n,
    };
    if ![512, 1024, 2048, 4096].contains(&bps) || spc == 0 || fats == 0 || fat_size == 0 {
        bail!("{} has a damaged FAT boot sector", dev.display());
    }
    let root_sectors = (root_entries * 32).div_ceil(bps);
    Ok(FatGeometry {
        cluster_bytes: spc * bps,
        data_start: (reserved + fats * fat_size + root_sectors) * bps,
    })
}

/// Finds the clusters of `rel` on the unmounted FAT filesystem on `dev`.
fn fat_file(dev: &Path, rel: &Path, part: &str) -> Result<PartFile> {
    let shown = format!("{} on {part}", rel.display());
    let name = format!("::/{}", rel.display());
    let mtools = |tool: &str, args: &[&str]| {
        run(
            &format!("reading {shown}"),
            Command::new(tool)
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(dev)
                .args(args),
        )
    };
    let listing = mtools("mdir", &["-b", &name]).with_context(|| {
        format!(
            "{part} has no file {} (or mtools is not installed)",
            rel.display()
        )
    })?;
    if listing.lines().count() != 1 {
        bail!("{shown} is not a plain file");
    }
    // The size from the directory entry, then the cluster chain.
    let size = file_size(dev, &name, &shown)?;
    let chain = mtools("mshowfat", &[&name])?;
    let geo = fat_geometry(dev)?;
    let mut extents = Vec::new();
    let mut left = size;
    for group in chain.split('<').skip(1) {
        let group = group.split('>').next().unwrap_or("");
        let (a, b) = group.split_once('-').unwrap_or((group, group));
        let parse = |s: &str| {
            s.trim()
                .parse::<u64>()
                .with_context(|| format!("mshowfat printed {chain:?} for {shown}"))
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if a < 2 || b < a {
            bail!("mshowfat printed a bad cluster chain {chain:?} for {shown}");
        }
        let bytes = ((b - a + 1) * geo.cluster_bytes).min(left);
        extents.push((geo.data_start + (a - 2) * geo.cluster_bytes, bytes));
        left -= bytes;
    }
    if left > 0 {
        bail!("the cluster chain of {shown} is shorter than the file; run fsck.fat on it");
    }
    Ok(PartFile::Fat {
        dev: dev.to_path_buf(),
        extents,
        shown,
    })
}

/// The size of a FAT file, by reading it with `mcopy`.
fn file_size(dev: &Path, name: &str, shown: &str) -> Result<u64> {
    let out = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(dev)
        .args([name, "-"])
        .output()
        .with_context(|| format!("reading {shown}: starting mcopy"))?;
    if !out.status.success() {
        bail!(
            "reading {shown}: mcopy failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout.len() as u64)
}
