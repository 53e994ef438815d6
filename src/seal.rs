//! Evidence, in a slot itself, of the bundle abup installed there.
//!
//! `slots.json` lives in the state directory, which is easier to write than
//! a slot: if the "already installed" shortcut trusted it alone, whoever can
//! write that file could make abup flip to a slot holding anything. So the
//! shortcut is taken only when the slot itself agrees:
//!
//! - **tar slots**: after the payload was verified and preserved files
//!   copied in, abup sets the xattr [`XATTR`] on the root directory of the
//!   fresh ext4 to a digest of the bundle hash and the filesystem UUID that
//!   `mkfs.ext4` picked at random. An interrupted install never has it; an
//!   older install has another bundle's; an image cannot ship it (it cannot
//!   know the UUID). It is set after the migrations ran, just before the
//!   record; checking it mounts the slot read-only.
//! - **raw slots**: the slot's first `size` bytes must hash to the signed
//!   `sha256` of the payload. A raw image that was changed afterwards
//!   (preserved files copied in, or booted) no longer matches: it is
//!   rewritten, which is always safe.
//!
//! Anything else (no filesystem, no xattr, a read error) means "not shown
//! to hold the bundle": the install writes the slot again.

use crate::bundle::manifest::{Payload, PayloadKind};
use crate::mount::{Access, TempMount};
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The extended attribute on a tar slot's root directory.
pub const XATTR: &str = "trusted.abup.seal";

/// The seal of `bundle_sha256` on a filesystem with UUID `fs_uuid`.
fn seal_value(bundle_sha256: &str, fs_uuid: &[u8; 16]) -> String {
    let mut h = Sha256::new();
    h.update(b"abup-seal-v1\0");
    h.update(bundle_sha256.as_bytes());
    h.update(fs_uuid);
    hex::encode(h.finalize())
}

/// The UUID in the ext2/3/4 superblock on `dev`, if it holds one.
fn ext4_uuid(dev: &Path) -> Result<Option<[u8; 16]>> {
    let mut sb = [0u8; 1024];
    let mut f = File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    f.seek(SeekFrom::Start(1024))
        .and_then(|_| f.read_exact(&mut sb))
        .with_context(|| format!("reading the superblock of {}", dev.display()))?;
    if sb[0x38..0x3a] != [0x53, 0xef] {
        return Ok(None);
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&sb[0x68..0x78]);
    Ok(Some(uuid))
}

/// Seals the freshly written, verified tar slot on `dev` (not mounted) as
/// holding `bundle_sha256`: the last write to the slot before its record.
pub fn write(dev: &Path, bundle_sha256: &str) -> Result<()> {
    let uuid = ext4_uuid(dev)?
        .with_context(|| format!("sealing {}: no ext4 superblock", dev.display()))?;
    let m = TempMount::ext4(dev, Access::ReadWrite)
        .with_context(|| format!("sealing {}", dev.display()))?;
    xattr::set(m.path(), XATTR, seal_value(bundle_sha256, &uuid).as_bytes())
        .with_context(|| format!("sealing {}: setting {XATTR}", dev.display()))?;
    m.unmount()
}

/// Whether the slot on `dev` shows that it holds `payload` of the bundle
/// `bundle_sha256`, written by abup and complete.
pub fn holds(dev: &Path, payload: &Payload, bundle_sha256: &str) -> Result<bool> {
    match payload.kind {
        PayloadKind::Tar => {
            let Some(uuid) = ext4_uuid(dev)? else {
                return Ok(false);
            };
            let Ok(m) = TempMount::ext4(dev, Access::ReadOnly) else {
                return Ok(false);
            };
            let seal = xattr::get(m.path(), XATTR).ok().flatten();
            m.unmount()?;
            Ok(seal.as_deref() == Some(seal_value(bundle_sha256, &uuid).as_bytes()))
        }
        PayloadKind::Raw => {
            let f = File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
            let mut hasher = Sha256::new();
            let n = std::io::copy(&mut f.take(payload.size), &mut hasher)
                .with_context(|| format!("reading {}", dev.display()))?;
            Ok(n == payload.size && hex::encode(hasher.finalize()) == payload.sha256)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_binds_bundle_and_filesystem() {
        let a = seal_value(&"ab".repeat(32), &[1; 16]);
        assert_eq!(a.len(), 64);
        assert_ne!(a, seal_value(&"ab".repeat(32), &[2; 16]));
        assert_ne!(a, seal_value(&"cd".repeat(32), &[1; 16]));
    }

    #[test]
    fn reads_the_ext4_uuid_and_refuses_other_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        File::create(&img).unwrap().set_len(8 << 20).unwrap();
        assert_eq!(ext4_uuid(&img).unwrap(), None);
        let uuid = "0fc63daf-8483-4772-8e79-3d69d8477de4";
        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-U", uuid])
            .arg(&img)
            .status()
            .unwrap();
        assert!(ok.success());
        let want: Vec<u8> = hex::decode(uuid.replace('-', "")).unwrap();
        assert_eq!(ext4_uuid(&img).unwrap().unwrap().to_vec(), want);
    }
}
