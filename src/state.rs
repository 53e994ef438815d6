//! abup's record of what each slot holds: version, bundle hash, whether it
//! was blessed by `mark-good`.
//!
//! The bootloader only knows "bootable or not"; this record is what lets
//! `status` name versions and tell "trying" from "good". It is one JSON file
//! (`slots.json`) in the configured state directory, replaced atomically, so
//! a power cut leaves either the old record or the new one. Before a slot is
//! overwritten its record is set to `incomplete`, and only after its payload
//! is verified is it set to `installed`.
//!
//! The file must live where both slots read it (a data or boot partition,
//! see `state_dir`): after a fallback, an older abup reads what a newer one
//! wrote. So it carries a format number ([`FORMAT`]): fields a later abup
//! adds are kept when this one rewrites the file, a file without the number
//! (abup before it had one) reads as format 1, and a file of a newer,
//! incompatible format is refused with a message rather than misread.

use crate::slot::SlotName;
use crate::util::write_atomic;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "slots.json";

/// The format of `slots.json` this abup writes. Raise it only for changes an
/// older abup would misread; adding a field needs no new number (unknown
/// fields are kept).
pub const FORMAT: u32 = 1;

/// Whether a slot's content is complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Content {
    /// An install started writing and has not finished verifying.
    Incomplete,
    /// The payload was written and verified.
    Installed,
}

/// What abup knows of one slot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub content: Content,
    pub version: String,
    pub compatible: String,
    pub bundle_sha256: String,
    /// Unix seconds when the install finished (or started, while incomplete).
    pub installed_at: u64,
    /// Set by `mark-good` after a healthy boot; cleared by a new install.
    pub good: bool,
    /// Installed with `--no-activate` and not made bootable since: status
    /// shows `inactive`, not `bad`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inactive: bool,
    /// Fields written by a later abup, kept on rewrite.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Records of both slots.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Records {
    /// The file's format ([`FORMAT`]); 0 when read from a file without one.
    #[serde(default)]
    pub format: u32,
    #[serde(rename = "A", default)]
    pub a: Option<SlotRecord>,
    #[serde(rename = "B", default)]
    pub b: Option<SlotRecord>,
    /// Fields written by a later abup, kept on rewrite.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Records {
    pub fn get(&self, slot: SlotName) -> Option<&SlotRecord> {
        match slot {
            SlotName::A => self.a.as_ref(),
            SlotName::B => self.b.as_ref(),
        }
    }

    pub fn get_mut(&mut self, slot: SlotName) -> &mut Option<SlotRecord> {
        match slot {
            SlotName::A => &mut self.a,
            SlotName::B => &mut self.b,
        }
    }
}

/// The record file in a state directory.
#[derive(Clone, Debug)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: &Path) -> StateStore {
        StateStore {
            dir: dir.to_path_buf(),
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Reads the records; a missing file means nothing is recorded yet.
    pub fn load(&self) -> Result<Records> {
        let path = self.file();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Records::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if text.len() > 64 * 1024 {
            bail!(
                "reading {}: file is too large to be a slot record",
                path.display()
            );
        }
        let records: Records = serde_json::from_slice(&text).with_context(|| {
            format!(
                "parsing slot records {}: fix or remove the file (status will then show versions as unknown)",
                path.display()
            )
        })?;
        if records.format > FORMAT {
            bail!(
                "reading slot records {}: written by a newer abup (format {}; this abup reads format {FORMAT} and older); install a newer abup to change slots",
                path.display(),
                records.format
            );
        }
        Ok(records)
    }

    /// Replaces the records atomically, creating the state directory if needed.
    pub fn save(&self, records: &Records) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating state directory {}", self.dir.display()))?;
        let records = Records {
            format: FORMAT,
            ..records.clone()
        };
        let mut text = serde_json::to_vec_pretty(&records).context("encoding slot records")?;
        text.push(b'\n');
        write_atomic(&self.file(), &text)
            .with_context(|| format!("recording slot state in {}", self.dir.display()))
    }

    /// Loads, applies `f` to the record of `slot`, and saves.
    pub fn update(&self, slot: SlotName, f: impl FnOnce(&mut Option<SlotRecord>)) -> Result<()> {
        let mut r = self.load()?;
        f(r.get_mut(slot));
        self.save(&r)
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Refuses a `state_dir` on slot A or B (the default `/var/lib/abup` is on
/// the running root): after a fallback the other slot's abup would read its
/// own, stale records. The state directory (or its nearest existing parent)
/// must live on a partition both slots mount. A disk that cannot be read is
/// left for the install's own checks to report.
pub fn refuse_on_slot(cfg: &crate::config::SystemConfig) -> Result<()> {
    let Ok(disk) = crate::disk::Disk::open(&cfg.disk) else {
        return Ok(());
    };
    for name in [SlotName::A, SlotName::B] {
        let Ok(part) = disk.find(cfg.slot(name)) else {
            continue;
        };
        if disk.holds(part, &cfg.state_dir)? {
            bail!(
                "state_dir {} is on slot {name}, so after a fallback the other slot would read stale records; set state_dir in the config to a directory on a partition both slots mount (the data or boot partition)",
                cfg.state_dir.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_updates_one_slot() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(&dir.path().join("nested"));
        assert_eq!(store.load().unwrap(), Records::default());
        let rec = SlotRecord {
            content: Content::Installed,
            version: "1.2.3".into(),
            compatible: "c".into(),
            bundle_sha256: "ab".repeat(32),
            installed_at: 7,
            good: false,
            inactive: false,
            extra: BTreeMap::new(),
        };
        store
            .update(SlotName::B, |r| *r = Some(rec.clone()))
            .unwrap();
        let got = store.load().unwrap();
        assert_eq!(got.get(SlotName::B), Some(&rec));
        assert_eq!(got.get(SlotName::A), None);
        std::fs::write(dir.path().join("nested/slots.json"), "{").unwrap();
        assert!(format!("{:#}", store.load().unwrap_err()).contains("parsing slot records"));
    }

    /// A file as abup wrote it before records had a format number.
    const UNVERSIONED: &str = r#"{
  "A": null,
  "B": {
    "content": "installed",
    "version": "2.0.0",
    "compatible": "board",
    "bundle_sha256": "abab",
    "installed_at": 1700000000,
    "good": true
  }
}
"#;

    #[test]
    fn reads_the_unversioned_format_and_writes_format_1() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), UNVERSIONED).unwrap();
        let store = StateStore::new(dir.path());
        let r = store.load().unwrap();
        assert_eq!(r.format, 0);
        assert_eq!(r.get(SlotName::B).unwrap().version, "2.0.0");
        store
            .update(SlotName::B, |r| r.as_mut().unwrap().good = false)
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(FILE_NAME)).unwrap()).unwrap();
        assert_eq!(v["format"], 1);
        assert_eq!(v["B"]["good"], false);
    }

    #[test]
    fn unknown_fields_survive_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let text = UNVERSIONED
            .replacen("{\n", "{\n  \"format\": 1,\n  \"history\": [1, 2],\n", 1)
            .replace("\"good\": true", "\"good\": true, \"signed_by\": \"k1\"");
        std::fs::write(dir.path().join(FILE_NAME), text).unwrap();
        let store = StateStore::new(dir.path());
        store
            .update(SlotName::B, |r| r.as_mut().unwrap().good = false)
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(FILE_NAME)).unwrap()).unwrap();
        assert_eq!(v["history"], serde_json::json!([1, 2]));
        assert_eq!(v["B"]["signed_by"], "k1");
        assert_eq!(v["B"]["good"], false);
    }

    #[test]
    fn a_newer_format_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let text = UNVERSIONED.replacen("{\n", "{\n  \"format\": 2,\n", 1);
        std::fs::write(dir.path().join(FILE_NAME), &text).unwrap();
        let store = StateStore::new(dir.path());
        let err = format!("{:#}", store.load().unwrap_err());
        assert!(err.contains("newer abup (format 2"), "{err}");
        assert!(store.update(SlotName::B, |_| {}).is_err());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap(),
            text
        );
    }
}
