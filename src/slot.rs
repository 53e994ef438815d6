//! Slots A and B: names, and finding which one the running system booted from.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One of the two root slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SlotName {
    A,
    B,
}

impl SlotName {
    pub const ALL: [SlotName; 2] = [SlotName::A, SlotName::B];

    /// The other slot of the pair.
    pub fn other(self) -> SlotName {
        match self {
            SlotName::A => SlotName::B,
            SlotName::B => SlotName::A,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SlotName::A => "A",
            SlotName::B => "B",
        }
    }
}

impl fmt::Display for SlotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SlotName {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "A" | "a" => Ok(SlotName::A),
            "B" | "b" => Ok(SlotName::B),
            _ => bail!("unknown slot {s:?}: slots are named A and B"),
        }
    }
}

/// What identifies a slot when looking for the booted one.
#[derive(Clone, Debug)]
pub struct SlotIdentity<'a> {
    pub name: SlotName,
    pub partlabel: &'a str,
    /// Lowercase PARTUUID.
    pub partuuid: &'a str,
    /// Device number of the slot's block device.
    pub rdev: u64,
}

/// Finds the booted slot from the kernel command line: `abup.slot=X`,
/// `root=PARTUUID=…`, `root=PARTLABEL=…` or `root=/dev/…` (compared by
/// device number through `rdev_of`). Returns None when the command line
/// names neither slot.
pub fn booted_from_cmdline(
    cmdline: &str,
    slots: &[SlotIdentity<'_>],
    rdev_of: impl Fn(&str) -> Option<u64>,
) -> Option<SlotName> {
    let mut root = None;
    for word in cmdline.split_whitespace() {
        if let Some(v) = word.strip_prefix("abup.slot=") {
            if let Ok(s) = v.parse() {
                return Some(s);
            }
        } else if let Some(v) = word.strip_prefix("root=") {
            root = Some(v); // the kernel uses the last root=
        }
    }
    let root = root?;
    slots
        .iter()
        .find(|s| {
            if let Some(u) = root.strip_prefix("PARTUUID=") {
                u.eq_ignore_ascii_case(s.partuuid)
            } else if let Some(l) = root.strip_prefix("PARTLABEL=") {
                l == s.partlabel
            } else if root.starts_with("/dev/") {
                rdev_of(root) == Some(s.rdev)
            } else {
                false
            }
        })
        .map(|s| s.name)
}

/// Finds the booted slot from the device that holds `/` (`root_dev` is the
/// `st_dev` of `/`).
pub fn booted_from_root_dev(root_dev: u64, slots: &[SlotIdentity<'_>]) -> Option<SlotName> {
    slots.iter().find(|s| s.rdev == root_dev).map(|s| s.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Vec<SlotIdentity<'static>> {
        vec![
            SlotIdentity {
                name: SlotName::A,
                partlabel: "rootA",
                partuuid: "11111111-2222-3333-4444-555555555555",
                rdev: 0x0703,
            },
            SlotIdentity {
                name: SlotName::B,
                partlabel: "rootB",
                partuuid: "aaaaaaaa-2222-3333-4444-555555555555",
                rdev: 0x0704,
            },
        ]
    }

    #[test]
    fn detects_booted_slot_from_each_cmdline_form() {
        let no_dev = |_: &str| None;
        let cases = [
            ("quiet abup.slot=B root=/dev/sda1", Some(SlotName::B)),
            (
                "root=PARTUUID=AAAAAAAA-2222-3333-4444-555555555555 ro",
                Some(SlotName::B),
            ),
            ("root=PARTLABEL=rootA rw", Some(SlotName::A)),
            ("root=PARTLABEL=other", None),
            ("console=ttyS0", None),
            (
                "root=PARTLABEL=rootB root=PARTLABEL=rootA",
                Some(SlotName::A),
            ),
        ];
        for (cmdline, want) in cases {
            assert_eq!(
                booted_from_cmdline(cmdline, &ids(), no_dev),
                want,
                "{cmdline}"
            );
        }
        let dev = |p: &str| (p == "/dev/loop4").then_some(0x0704);
        assert_eq!(
            booted_from_cmdline("root=/dev/loop4", &ids(), dev),
            Some(SlotName::B)
        );
        assert_eq!(booted_from_cmdline("root=/dev/vda", &ids(), dev), None);
    }

    #[test]
    fn detects_booted_slot_from_root_device() {
        assert_eq!(booted_from_root_dev(0x0703, &ids()), Some(SlotName::A));
        assert_eq!(booted_from_root_dev(0xfe00, &ids()), None);
    }
}
