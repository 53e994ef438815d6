//! What `boot-backends/grub/grub.cfg` needs from a slot, checked and set up
//! by abup before it activates one, and checked again by `status`.
//!
//! GRUB 2.06 (Debian 12) cannot search by GPT partition label, so grub.cfg
//! finds slot X by its filesystem label `abup-X` (`search --label`) and boots
//! `/boot/vmlinuz` from it (plus `/boot/initrd.img` when that exists). abup
//! sets that label on every install, tarball or raw image, and refuses to
//! activate a slot whose kernel grub.cfg would not find.

use crate::mount::{Access, TempMount};
use crate::slot::SlotName;
use crate::util::run;
use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// The kernel grub.cfg boots, inside the slot.
pub const KERNEL: &str = "/boot/vmlinuz";
/// The initramfs grub.cfg loads when it exists, inside the slot.
pub const INITRD: &str = "/boot/initrd.img";

/// The filesystem label grub.cfg searches for slot `slot`.
pub fn fs_label(slot: SlotName) -> String {
    format!("abup-{slot}")
}

/// The label of the ext2/3/4 filesystem on `dev`, or None when `dev` holds
/// no ext2/3/4 filesystem. Read from the superblock, without mounting.
pub fn ext_label(dev: &Path) -> Result<Option<String>> {
    let mut sb = [0u8; 2048];
    fs::File::open(dev)
        .and_then(|mut f| f.read_exact(&mut sb))
        .with_context(|| format!("reading the superblock of {}", dev.display()))?;
    if sb[1024 + 0x38..1024 + 0x3a] != [0x53, 0xef] {
        return Ok(None);
    }
    let raw = &sb[1024 + 0x78..1024 + 0x88];
    let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    Ok(Some(String::from_utf8_lossy(&raw[..len]).into_owned()))
}

/// Labels the new slot on `dev` (not mounted) `abup-SLOT` and checks that it
/// holds the kernel grub.cfg boots. Returns what it did.
pub fn prepare(slot: SlotName, dev: &Path) -> Result<String> {
    let want = fs_label(slot);
    let shown = dev.display();
    let label = match ext_label(dev)? {
        Some(l) => l,
        None => bail!(
            "slot {slot} ({shown}) holds no ext2/3/4 filesystem, so GRUB's grub.cfg cannot find \
             it: it searches for the filesystem label {want}, which abup sets only on ext2/3/4; \
             build the image as ext4, or ship the root filesystem as a tarball; slot {slot} \
             stays marked bad"
        ),
    };
    let relabelled = if label != want {
        run(
            &format!("labelling slot {slot} {want}"),
            Command::new("e2label").arg(dev).arg(&want),
        )?;
        format!(" (was {label:?})")
    } else {
        String::new()
    };
    let m = TempMount::ext4(dev, Access::ReadOnly)
        .with_context(|| format!("mounting slot {slot} ({shown}) to check its kernel"))?;
    let found = boot_files(m.path());
    m.unmount()?;
    match found {
        Ok(what) => Ok(format!(
            "filesystem labelled {want}{relabelled}; {what}, as grub.cfg boots it"
        )),
        Err(why) => bail!(
            "slot {slot} ({shown}): {why}; GRUB's grub.cfg boots {KERNEL} (and {INITRD} when \
             it exists) from the slot, so the device would not start it: put the kernel there \
             in the image (a symlink inside the image is fine) and build the bundle again; slot \
             {slot} stays marked bad"
        ),
    }
}

/// Why grub.cfg would not find slot `slot` on `dev`, or None when it would
/// (or when that cannot be told: a slot that cannot be mounted here).
pub fn unfindable(slot: SlotName, dev: &Path, mounted_at: Option<&Path>) -> Option<String> {
    let want = fs_label(slot);
    match ext_label(dev) {
        Ok(Some(l)) if l == want => {}
        Ok(Some(l)) => {
            return Some(format!(
                "its filesystem is labelled {l:?}, not {want}, so GRUB does not find it"
            ))
        }
        Ok(None) => return Some("it holds no ext2/3/4 filesystem GRUB can find".to_string()),
        Err(_) => return None,
    }
    let check = |root: &Path| boot_files(root).err();
    match mounted_at {
        Some(root) => check(root),
        None => {
            let m = TempMount::ext4(dev, Access::ReadOnly).ok()?;
            let why = check(m.path());
            m.unmount().ok()?;
            why
        }
    }
}

/// Checks the kernel (and any initramfs link) under `root`, resolving
/// symlinks inside `root` as GRUB does. Returns what it found, or why not.
fn boot_files(root: &Path) -> std::result::Result<String, String> {
    let kernel = match resolve_in(root, KERNEL) {
        Some(p) if p.is_file() => p,
        _ => return Err(format!("no kernel at {KERNEL}")),
    };
    let size = fs::metadata(&kernel).map(|m| m.len()).unwrap_or(0);
    let mut what = format!("kernel {KERNEL} ({size} bytes)");
    let initrd_there = fs::symlink_metadata(root.join(&INITRD[1..])).is_ok();
    if initrd_there {
        match resolve_in(root, INITRD) {
            Some(p) if p.is_file() => what += &format!(" and initramfs {INITRD}"),
            _ => return Err(format!("{INITRD} is there but does not lead to a file")),
        }
    }
    Ok(what)
}

/// Resolves `path` inside `root`, following symlinks with `root` as `/`.
fn resolve_in(root: &Path, path: &str) -> Option<PathBuf> {
    let mut todo: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .rev()
        .collect();
    let mut at = PathBuf::new();
    let mut hops = 0;
    while let Some(comp) = todo.pop() {
        match comp.as_str() {
            "." => continue,
            ".." => {
                at.pop();
                continue;
            }
            _ => {}
        }
        let next = at.join(&comp);
        let meta = fs::symlink_metadata(root.join(&next)).ok()?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = fs::read_link(root.join(&next)).ok()?;
            if target.is_absolute() {
                at = PathBuf::new();
            }
            for c in target.components().rev() {
                match c {
                    Component::Normal(n) => todo.push(n.to_string_lossy().into_owned()),
                    Component::ParentDir => todo.push("..".to_string()),
                    _ => {}
                }
            }
        } else {
            at = next;
        }
    }
    Some(root.join(at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn kernel_links_resolve_inside_the_slot() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("boot")).unwrap();
        assert_eq!(boot_files(root), Err(format!("no kernel at {KERNEL}")));
        fs::write(root.join("boot/vmlinuz-6.1"), b"kernel").unwrap();
        // Absolute links point into the slot, not the host.
        symlink("/boot/vmlinuz-6.1", root.join("boot/vmlinuz")).unwrap();
        assert_eq!(boot_files(root).unwrap(), "kernel /boot/vmlinuz (6 bytes)");
        symlink("../etc/passwd", root.join("boot/initrd.img")).unwrap();
        assert!(boot_files(root)
            .unwrap_err()
            .contains("does not lead to a file"));
        fs::remove_file(root.join("boot/initrd.img")).unwrap();
        symlink("initrd.img", root.join("boot/initrd.img")).unwrap();
        assert!(boot_files(root).is_err(), "a link loop is not a file");
        fs::remove_file(root.join("boot/initrd.img")).unwrap();
        fs::write(root.join("boot/initrd.img-6.1"), b"i").unwrap();
        symlink("initrd.img-6.1", root.join("boot/initrd.img")).unwrap();
        assert!(boot_files(root)
            .unwrap()
            .ends_with("and initramfs /boot/initrd.img"));
    }

    #[test]
    fn labels_are_read_from_the_superblock() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
        assert_eq!(ext_label(&img).unwrap(), None);
        run(
            "mkfs",
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "abup-B"])
                .arg(&img),
        )
        .unwrap();
        assert_eq!(ext_label(&img).unwrap().as_deref(), Some("abup-B"));
        assert_eq!(fs_label(SlotName::B), "abup-B");
    }
}
