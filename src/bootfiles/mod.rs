//! Files on a boot partition shared by both slots (kernels, device trees,
//! firmware, boot scripts), updated as a transaction that is never left
//! half-done, and kept paired with the slot they belong to.
//!
//! # What a bundle carries
//! An optional signed `boot-files` payload after the rootfs: a tar archive
//! of regular files and directories, chunk-verified like the rootfs and
//! held in memory (at most [`MAX_PAYLOAD`] bytes) until the boot-files step.
//!
//! # On the partition
//! ```text
//! abup-boot/sets.json     which set is live, and each slot's set (path → SHA-256)
//! abup-boot/journal.json  present only while a transaction is under way
//! abup-boot/switching     present once live files may have changed
//! abup-boot/keep-A/…      slot A's files that differ from the live set
//! abup-boot/keep-B/…      (the backups a transaction makes, kept for a fallback)
//! <file>.abup-new         a new file staged beside its target
//! ```
//!
//! # The transaction (install: from the live set to the new slot's set)
//! 1. Plan: every file of the new set and of the live set, with its SHA-256
//!    now and after; unchanged and protected files are left out. Refuse,
//!    before any write, when free space < new files + backups + margin.
//! 2. Journal (written once, never rewritten), then each new file written
//!    and fsynced as `<file>.abup-new`; then the empty marker
//!    `abup-boot/switching` (one directory entry: both sets are complete).
//! 3. In order — new files first, then replaced files with the boot
//!    configuration files (`*.txt`, `*.cfg`, `*.conf`, `*.scr`, …) last,
//!    then removals — each old file is kept in `keep-<old slot>/` and the
//!    staged file renamed over it (ext4: atomic; every name is the old or
//!    the new file at every moment) and directories fsynced.
//! 4. `sets.json` names the new slot's set live; the journal is removed;
//!    on ext4 a freeze/thaw checkpoints the journal, so that a bootloader,
//!    which reads the filesystem without replaying it, sees the new set.
//!
//! On FAT, where a rename is not crash-atomic, nothing is renamed: the
//! staged copy is copied over the target and stays, with the backup, until
//! the journal is cleared. Both sets are complete on the partition from the
//! switch on, the journal lists every file's old and new SHA-256, and the
//! switch is committed by one small write (`sets.json`), as in balena's
//! fatrw and bootupd: recovery checks each file by its hash and rewrites a
//! torn one from the intact copy.
//!
//! # Recovery and fallback
//! Every run that opens the system with the run lock ([`settle`]: install,
//! mark-*, rollback, status, recover) first finishes or undoes a journal:
//! a journal whose new set `sets.json` already names live is finished,
//! any other is undone (the boot settings still select the old slot, since
//! the flip comes after the boot-files step). An error inside the step undoes
//! at once. Then the live set is made the set of the slot the boot settings
//! select next: after a fallback (the bootloader gave up on the new slot,
//! or `rollback`) that slot's set is restored from its `keep-` copy by the
//! same transaction.
//!
//! # Not activated
//! An install with `--no-activate` keeps the new set in `keep-<slot>/`
//! without touching the live files; activating the slot brings it in.
//!
//! # Protected files
//! Files named in `boot_files.protected` (edited on the device, such as
//! `config.txt`) are never replaced, removed or backed up once they exist;
//! a protected file the partition lacks is installed from the bundle.

pub mod tree;

use crate::bootpart::BootPart;
use crate::bundle::manifest::BOOT_FILES;
use crate::bundle::reader::{payload_reader, BundleHeader};
use crate::config::{BootConfig, BootFilesConfig, GrubEnvLocation, UbootEnvLocation};
use crate::failpoint;
use crate::slot::SlotName;
use crate::system::System;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use tree::{sha256, Tree};

/// abup's directory on the boot partition.
pub const AREA: &str = "abup-boot";
const SETS: &str = "abup-boot/sets.json";
const JOURNAL: &str = "abup-boot/journal.json";
/// Written once every new file is staged: from then on live files change.
const SWITCHING: &str = "abup-boot/switching";
/// Suffix of a staged new file beside its target.
const STAGED: &str = ".abup-new";
/// The largest boot-files payload accepted (it is held in memory).
pub const MAX_PAYLOAD: u64 = 512 << 20;
/// Room left free beyond what the transaction needs.
const MARGIN: u64 = 1 << 20;

/// Checks a path from a bundle or the config: relative, `/`-separated, no
/// `.`/`..`/empty parts, no control characters, outside abup's own area.
pub fn clean_path(raw: &str) -> Result<String> {
    let trimmed = raw.trim_start_matches("./").trim_end_matches('/');
    let parts: Vec<&str> = trimmed.split('/').collect();
    if trimmed.is_empty()
        || raw.starts_with('/')
        || parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\\'))
        || trimmed.chars().any(char::is_control)
    {
        bail!("{raw:?} is not a plain relative path inside the boot partition");
    }
    if parts[0].eq_ignore_ascii_case(AREA) || trimmed.ends_with(STAGED) {
        bail!("{raw:?} is a name abup keeps for itself on the boot partition");
    }
    Ok(trimmed.to_string())
}

/// Refuses, at `bundle create`, a boot-files directory a device would
/// refuse: anything but regular files and directories, or names abup keeps.
pub fn check_source(dir: &std::path::Path) -> Result<()> {
    fn walk(root: &std::path::Path, dir: &std::path::Path) -> Result<()> {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("reading {}", dir.display()))?;
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap_or(&path);
            clean_path(&rel.to_string_lossy())?;
            let t = e
                .file_type()
                .with_context(|| format!("reading {}", path.display()))?;
            if t.is_dir() {
                walk(root, &path)?;
            } else if !t.is_file() {
                bail!(
                    "{} is not a regular file or directory; a boot partition (often FAT) holds only those",
                    path.display()
                );
            }
        }
        Ok(())
    }
    walk(dir, dir)
}

/// The boot files of one bundle, checked and in memory.
#[derive(Debug, Default)]
pub struct NewFiles {
    pub version: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

/// Reads the `boot-files` payload, if the bundle has one, from `r`
/// positioned at its first stored byte (just after the rootfs payload).
pub fn read_payload<R: Read>(r: &mut R, header: &BundleHeader) -> Result<Option<NewFiles>> {
    if header.manifest.payload(BOOT_FILES).is_none() {
        return Ok(None);
    }
    let mut reader = payload_reader(&mut *r, header, BOOT_FILES)?;
    let mut files = BTreeMap::new();
    {
        let mut ar = tar::Archive::new(&mut reader);
        for entry in ar.entries().context("reading the boot-files payload")? {
            let mut entry = entry.context("reading the boot-files payload")?;
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            if matches!(raw.as_str(), "." | "./") {
                continue;
            }
            let path = clean_path(&raw).context("boot-files payload")?;
            match entry.header().entry_type() {
                tar::EntryType::Directory => continue,
                tar::EntryType::Regular | tar::EntryType::Continuous => {}
                other => bail!(
                    "boot-files payload: {path} is a {other:?} entry; a boot partition holds regular files and directories only"
                ),
            }
            let mut data = Vec::new();
            entry
                .read_to_end(&mut data)
                .with_context(|| format!("reading {path} from the boot-files payload"))?;
            if files.insert(path.clone(), data).is_some() {
                bail!("boot-files payload: {path} appears twice");
            }
        }
    }
    reader.finish()?;
    Ok(Some(NewFiles {
        version: header.manifest.version.to_string(),
        files,
    }))
}

/// One slot's set of boot files.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BootSet {
    /// The version of the bundle it came with ("" when found on the
    /// partition before abup managed it).
    pub version: String,
    /// Path → hex SHA-256 of every file of the set abup manages.
    pub files: BTreeMap<String, String>,
    /// Fields written by a later abup, kept on rewrite.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl BootSet {
    /// A short identifier of the set's content.
    pub fn id(&self) -> String {
        let text: String = self
            .files
            .iter()
            .map(|(p, h)| format!("{p} {h}\n"))
            .collect();
        sha256(text.as_bytes())[..12].to_string()
    }
}

/// `abup-boot/sets.json`: which slot's set is live, and each slot's set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sets {
    #[serde(default)]
    pub format: u32,
    /// The slot whose set the partition holds.
    #[serde(default)]
    pub live: Option<SlotName>,
    #[serde(rename = "A", default, skip_serializing_if = "Option::is_none")]
    pub a: Option<BootSet>,
    #[serde(rename = "B", default, skip_serializing_if = "Option::is_none")]
    pub b: Option<BootSet>,
    /// Fields written by a later abup, kept on rewrite.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Sets {
    pub fn get(&self, s: SlotName) -> Option<&BootSet> {
        match s {
            SlotName::A => self.a.as_ref(),
            SlotName::B => self.b.as_ref(),
        }
    }
    fn get_mut(&mut self, s: SlotName) -> &mut Option<BootSet> {
        match s {
            SlotName::A => &mut self.a,
            SlotName::B => &mut self.b,
        }
    }
}

/// One file the transaction changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Entry {
    path: String,
    /// SHA-256 before (None: the file did not exist).
    old: Option<String>,
    /// SHA-256 after (None: the file is removed).
    new: Option<String>,
}

/// `abup-boot/journal.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Journal {
    format: u32,
    from: SlotName,
    to: SlotName,
    /// In the order they are switched.
    entries: Vec<Entry>,
    /// The set `to` gets when the transaction completes.
    set: BootSet,
}

fn keep_dir(slot: SlotName) -> String {
    format!("{AREA}/keep-{slot}")
}

fn kept(slot: SlotName, path: &str) -> String {
    format!("{}/{path}", keep_dir(slot))
}

fn staged(path: &str) -> String {
    format!("{path}{STAGED}")
}

/// Writes a small record so that a crash leaves the old or the new one.
fn write_record(tree: &Tree, rel: &str, value: &impl Serialize) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).context("serializing a boot-files record")?;
    bytes.push(b'\n');
    if tree.atomic_rename() {
        let tmp = format!("{rel}.tmp");
        tree.write(&tmp, &bytes)?;
        tree.install(&tmp, rel)
    } else {
        tree.write(rel, &bytes)
    }
}

fn load_sets(tree: &Tree) -> Result<Sets> {
    match tree.read(SETS)? {
        None => Ok(Sets::default()),
        Some(b) => serde_json::from_slice(&b).with_context(|| {
            format!(
                "reading {}: not a boot-files record; move it away to start the record anew",
                tree.show(SETS)
            )
        }),
    }
}

fn load_journal(tree: &Tree) -> Result<Option<Journal>> {
    match tree.read(JOURNAL)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b).map(Some).with_context(|| {
            format!(
                "reading {}: the journal of an interrupted boot-files update is damaged; check the boot files by hand, then remove it",
                tree.show(JOURNAL)
            )
        }),
    }
}

/// A change with the new content.
struct Change {
    entry: Entry,
    data: Option<Vec<u8>>,
}

/// Boot configuration files go last among replacements: they name the
/// other files, which are then already in place.
fn is_config(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    [".txt", ".cfg", ".conf", ".scr", ".env", ".ini"]
        .iter()
        .any(|e| name.ends_with(e))
}

/// Orders changes: additions, replacements (configuration last), removals.
fn order(mut changes: Vec<Change>) -> Vec<Change> {
    changes.sort_by_key(|c| {
        let e = &c.entry;
        let rank = match (&e.old, &e.new) {
            (None, _) => 0,
            (Some(_), Some(_)) if !is_config(&e.path) => 1,
            (Some(_), Some(_)) => 2,
            (Some(_), None) => 3,
        };
        (rank, e.path.clone())
    });
    changes
}

/// The boot partition opened for the boot files.
pub struct Opened {
    pub tree: Tree,
    protected: Vec<String>,
    // Kept open (mounted) while in use.
    _part: Option<BootPart>,
}

/// Which partition the boot files are on, reached through what the boot
/// backend already holds open when it is the same partition (a second loop
/// device or mount over the same bytes would give two caches one
/// filesystem). None when the config has no `[boot_files]`.
pub fn open(sys: &mut System, write: bool) -> Result<Option<Opened>> {
    let Some(bf) = sys.cfg.boot_files.clone() else {
        return Ok(None);
    };
    let ctx =
        |e: anyhow::Error| e.context(format!("boot files: opening boot partition {}", bf.part));
    open_inner(sys, &bf, write).map(Some).map_err(ctx)
}

fn open_inner(sys: &mut System, bf: &BootFilesConfig, write: bool) -> Result<Opened> {
    let shared_grub = matches!(&sys.cfg.boot, BootConfig::Grub { env: GrubEnvLocation::Partition { part, .. } } if *part == bf.part);
    let shared_uboot = matches!(&sys.cfg.boot, BootConfig::Uboot { env: UbootEnvLocation::Partition { part, .. } } if *part == bf.part);
    let (tree, dev, own) = if shared_grub {
        if write {
            sys.boot.writable()?;
        }
        let dev = sys
            .boot
            .device
            .as_ref()
            .context("the boot backend holds no device for it")?;
        let dir = match &sys.boot.mount {
            Some(m) => m.path().to_path_buf(),
            None => {
                let info = sys.disk.find(&bf.part)?;
                sys.disk
                    .mount_point(info, dev)?
                    .context("it is not mounted")?
            }
        };
        (Tree::Dir(dir), dev.path.clone(), None)
    } else if shared_uboot {
        let bp = sys
            .boot
            .part
            .as_ref()
            .context("the boot backend holds no handle on it")?;
        (tree_of(bp), bp.device().to_path_buf(), None)
    } else {
        let access = match write {
            true => crate::mount::Access::ReadWrite,
            false => crate::mount::Access::ReadOnly,
        };
        let bp = BootPart::open_with(&sys.disk, &bf.part, access)?;
        let dev = bp.device().to_path_buf();
        (tree_of(&bp), dev, Some(bp))
    };
    if let Some(want) = bf.filesystem {
        let have = crate::bootpart::fs_kind(&dev)?;
        if have != want {
            bail!("it holds {have:?}, but boot_files.filesystem says {want:?}; fix the config");
        }
    }
    Ok(Opened {
        tree,
        protected: bf.protected.clone(),
        _part: own,
    })
}

fn tree_of(bp: &BootPart) -> Tree {
    match bp.dir() {
        Some(d) => Tree::Dir(d.to_path_buf()),
        None => Tree::Fat(bp.device().to_path_buf()),
    }
}

impl Opened {
    fn protected_here(&self, path: &str) -> Result<bool> {
        Ok(self.protected.iter().any(|p| p == path) && self.tree.hash(path)?.is_some())
    }

    /// Refuses, before any write, a transaction that does not fit.
    fn check_space(&self, changes: &[Change]) -> Result<()> {
        let (free, unit) = self.tree.free_space()?;
        let round = |n: u64| n.div_ceil(unit) * unit;
        let mut need = MARGIN + 4 * unit;
        for c in changes {
            let new = c.data.as_ref().map_or(0, |d| round(d.len() as u64));
            // Staged copy + backup of the old file (+ the copy over the
            // target on FAT, which does not rename).
            need += new + if self.tree.atomic_rename() { 0 } else { new };
            if c.entry.old.is_some() {
                let old = self.tree.read(&c.entry.path)?.map_or(0, |d| d.len() as u64);
                need += round(old);
            }
        }
        if need > free {
            bail!(
                "the boot partition has {free} bytes free but updating its files needs {need} (new files, backups of the files they replace and a margin); free space on it or make the boot files smaller"
            );
        }
        Ok(())
    }

    /// Plans the install of `new` as the set of slot `to`.
    fn plan_install(
        &self,
        sets: &Sets,
        from: SlotName,
        new: &NewFiles,
    ) -> Result<(Vec<Change>, BootSet, BootSet)> {
        let live: BTreeSet<String> = match (sets.live, sets.get(from)) {
            (Some(l), Some(s)) if l == from => s.files.keys().cloned().collect(),
            _ => BTreeSet::new(),
        };
        let mut changes = Vec::new();
        let mut set = BootSet {
            version: new.version.clone(),
            ..BootSet::default()
        };
        // The set of `from` when abup has none recorded: what is there now.
        let mut found = BootSet::default();
        let paths: BTreeSet<&String> = new.files.keys().chain(live.iter()).collect();
        for path in paths {
            let protected = self.protected.iter().any(|p| p == path);
            let old = self.tree.hash(path)?;
            if protected && old.is_some() {
                continue;
            }
            if let Some(h) = &old {
                found.files.insert(path.clone(), h.clone());
            }
            let data = new.files.get(path).cloned();
            let want = data.as_ref().map(|d| sha256(d));
            if let (Some(h), false) = (&want, protected) {
                set.files.insert(path.clone(), h.clone());
            }
            if old != want {
                changes.push(Change {
                    entry: Entry {
                        path: path.clone(),
                        old,
                        new: want,
                    },
                    data,
                });
            }
        }
        Ok((changes, set, found))
    }

    /// Plans going back from the live set to `target`'s, from its kept copy.
    fn plan_restore(&self, sets: &Sets, live: SlotName, target: SlotName) -> Result<Vec<Change>> {
        let want = sets
            .get(target)
            .with_context(|| format!("no boot-file set is recorded for slot {target}"))?;
        let live_files = sets.get(live).map(|s| s.files.clone()).unwrap_or_default();
        let paths: BTreeSet<&String> = want.files.keys().chain(live_files.keys()).collect();
        let mut changes = Vec::new();
        for path in paths {
            if self.protected_here(path)? {
                continue;
            }
            let old = self.tree.hash(path)?;
            let new = want.files.get(path).cloned();
            if old == new {
                continue;
            }
            let data = match &new {
                Some(h) => {
                    let d = self
                        .tree
                        .read(&kept(target, path))?
                        .filter(|d| sha256(d) == *h);
                    Some(d.with_context(|| {
                        format!(
                            "the boot files of slot {target} are not all kept on the boot partition ({path} is missing or changed in {}); reinstall slot {target}",
                            keep_dir(target)
                        )
                    })?)
                }
                None => None,
            };
            changes.push(Change {
                entry: Entry {
                    path: path.clone(),
                    old,
                    new,
                },
                data,
            });
        }
        Ok(changes)
    }

    /// Runs the transaction from `from`'s live set to `to`'s set `set`;
    /// undoes it on any error. `sets` is written with `to` live at the end.
    fn apply(
        &self,
        mut sets: Sets,
        from: SlotName,
        to: SlotName,
        changes: Vec<Change>,
        set: BootSet,
    ) -> Result<usize> {
        self.check_space(&changes)?;
        let changes = order(changes);
        let n = changes.len();
        let journal = Journal {
            format: 1,
            from,
            to,
            entries: changes.iter().map(|c| c.entry.clone()).collect(),
            set: set.clone(),
        };
        // Stale backups of the live set's slot go first.
        self.tree.remove_tree(&keep_dir(from))?;
        failpoint!("bootfiles:journal-stage");
        write_record(&self.tree, JOURNAL, &journal)?;
        let result = (|| -> Result<()> {
            for c in &changes {
                if let Some(d) = &c.data {
                    failpoint!("bootfiles:write");
                    self.tree.write(&staged(&c.entry.path), d)?;
                }
            }
            failpoint!("bootfiles:journal-switch");
            self.tree.write(SWITCHING, b"")?;
            for c in &changes {
                let p = &c.entry.path;
                if c.entry.old.is_some() {
                    failpoint!("bootfiles:backup");
                    self.tree.keep(p, &kept(from, p))?;
                }
                if c.data.is_some() {
                    failpoint!("bootfiles:rename");
                    self.tree.install(&staged(p), p)?;
                } else {
                    failpoint!("bootfiles:remove");
                    self.tree.remove(p)?;
                }
            }
            sets.format = 1;
            sets.live = Some(to);
            *sets.get_mut(to) = Some(set);
            failpoint!("bootfiles:record");
            write_record(&self.tree, SETS, &sets)?;
            Ok(())
        })();
        if let Err(e) = result {
            return Err(match self.undo(&journal) {
                Ok(()) => e.context("the previous boot files were put back"),
                Err(u) => e.context(format!(
                    "putting the previous boot files back failed too ({u:#}); the next abup run retries"
                )),
            });
        }
        self.finish(&journal)?;
        Ok(n)
    }

    /// Removes what a completed transaction leaves: staged copies, the
    /// journal, the now-live set's old backups.
    fn finish(&self, j: &Journal) -> Result<()> {
        for e in j.entries.iter().filter(|e| e.new.is_some()) {
            self.tree.remove(&staged(&e.path))?;
        }
        self.tree.remove(SWITCHING)?;
        failpoint!("bootfiles:journal-clear");
        self.tree.remove(JOURNAL)?;
        if j.to != j.from {
            self.tree.remove_tree(&keep_dir(j.to))?;
        }
        self.tree.checkpoint()?;
        failpoint!("bootfiles:done");
        Ok(())
    }

    /// Puts every file of the journal back as it was, checking each by hash.
    fn undo(&self, j: &Journal) -> Result<()> {
        for e in j.entries.iter().rev() {
            failpoint!("bootfiles:undo");
            let now = self.tree.hash(&e.path)?;
            if now == e.old {
                continue;
            }
            match &e.old {
                None => self.tree.remove(&e.path)?,
                Some(h) => {
                    let data = self
                        .tree
                        .read(&kept(j.from, &e.path))?
                        .filter(|d| sha256(d) == *h)
                        .with_context(|| {
                            format!(
                                "{} has no intact backup in {}",
                                self.tree.show(&e.path),
                                keep_dir(j.from)
                            )
                        })?;
                    if self.tree.atomic_rename() {
                        let tmp = staged(&e.path);
                        self.tree.write(&tmp, &data)?;
                        self.tree.install(&tmp, &e.path)?;
                    } else {
                        self.tree.write(&e.path, &data)?;
                    }
                }
            }
        }
        for e in j.entries.iter().filter(|e| e.new.is_some()) {
            self.tree.remove(&staged(&e.path))?;
        }
        self.tree.remove(SWITCHING)?;
        self.tree.remove(JOURNAL)?;
        self.tree.checkpoint()
    }

    /// Finishes or undoes a journal left by a crash; says what it did.
    pub fn recover(&self) -> Result<Option<String>> {
        // Records a crash cut off before their rename (the old one stands).
        for rel in [SETS, JOURNAL] {
            self.tree.remove(&format!("{rel}.tmp"))?;
        }
        let j = match load_journal(&self.tree) {
            Ok(Some(j)) => j,
            Ok(None) => {
                // A crash after the journal was removed left the marker.
                self.tree.remove(SWITCHING)?;
                return Ok(None);
            }
            // Cut while the journal itself was written (FAT, power loss):
            // no live file was touched yet, only staged copies exist.
            Err(_) if self.tree.hash(SWITCHING)?.is_none() => {
                let mut n = 0;
                for p in self.tree.list()? {
                    if p.ends_with(STAGED) {
                        self.tree.remove(&p)?;
                        n += 1;
                    }
                }
                self.tree.remove(JOURNAL)?;
                return Ok(Some(format!(
                    "removed a boot-files update cut off while it began ({n} staged files); no boot file had changed"
                )));
            }
            Err(e) => return Err(e),
        };
        let sets = load_sets(&self.tree)?;
        let done = sets.live == Some(j.to) && sets.get(j.to).is_some_and(|s| *s == j.set);
        let n = j.entries.len();
        if done {
            self.finish(&j)?;
            Ok(Some(format!(
                "finished an interrupted boot-files update: the boot partition holds slot {}'s {n} changed files",
                j.to
            )))
        } else {
            self.undo(&j)?;
            Ok(Some(format!(
                "undid an interrupted boot-files update: the boot partition holds slot {}'s files again ({n} checked)",
                j.from
            )))
        }
    }

    /// Installs `new` as slot `to`'s boot files (the install's step).
    pub fn install(&self, to: SlotName, new: &NewFiles) -> Result<String> {
        let mut sets = load_sets(&self.tree)?;
        let from = sets.live.unwrap_or(to.other());
        let (changes, set, found) = self.plan_install(&sets, from, new)?;
        if sets.get(from).is_none() || sets.live.is_none() {
            // First managed update: what is there now is `from`'s set.
            *sets.get_mut(from) = Some(found);
            sets.live = Some(from);
        }
        if from != to {
            // `to`'s earlier set is gone with the slot it belonged to.
            *sets.get_mut(to) = None;
        }
        let n = self.apply(sets, from, to, changes, set.clone())?;
        Ok(format!(
            "{n} boot files changed on the boot partition (set {} of slot {to}, {} files; slot {from}'s kept for a fallback)",
            set.id(),
            set.files.len()
        ))
    }

    /// Keeps `new` as slot `to`'s set without making it live (an install
    /// with `--no-activate`): its files that differ from the live ones go
    /// to `keep-<to>/`, so activating the slot later brings them in.
    pub fn stage(&self, to: SlotName, new: &NewFiles) -> Result<String> {
        let mut sets = load_sets(&self.tree)?;
        let from = sets.live.unwrap_or(to.other());
        if from == to {
            return self.install(to, new);
        }
        let (changes, set, found) = self.plan_install(&sets, from, new)?;
        self.check_space(&changes)?;
        if sets.live.is_none() {
            *sets.get_mut(from) = Some(found);
            sets.live = Some(from);
        }
        // No half-kept set is ever recorded: the record goes first.
        *sets.get_mut(to) = None;
        write_record(&self.tree, SETS, &sets)?;
        self.tree.remove_tree(&keep_dir(to))?;
        for c in &changes {
            if let Some(d) = &c.data {
                failpoint!("bootfiles:write");
                self.tree.write(&kept(to, &c.entry.path), d)?;
            }
        }
        *sets.get_mut(to) = Some(set.clone());
        failpoint!("bootfiles:record");
        write_record(&self.tree, SETS, &sets)?;
        self.tree.checkpoint()?;
        Ok(format!(
            "boot files of slot {to} kept on the boot partition (set {}, {} files); they go live when slot {to} is activated",
            set.id(),
            set.files.len()
        ))
    }

    /// Makes the live set the one of `slot` (the slot that boots next),
    /// from its kept copy. None when it already is or nothing is recorded.
    pub fn follow(&self, slot: SlotName) -> Result<Option<String>> {
        let sets = load_sets(&self.tree)?;
        let Some(live) = sets.live else {
            return Ok(None);
        };
        if live == slot {
            return Ok(None);
        }
        let Some(set) = sets.get(slot).cloned() else {
            return Ok(Some(format!(
                "slot {slot} boots next but has no recorded boot files; the boot partition keeps slot {live}'s"
            )));
        };
        let changes = self.plan_restore(&sets, live, slot)?;
        let n = self.apply(sets, live, slot, changes, set.clone())?;
        Ok(Some(format!(
            "slot {slot} boots next: its boot files are back on the boot partition (set {}, {n} files changed)",
            set.id()
        )))
    }

    /// The record, for `status`.
    pub fn sets(&self) -> Result<(Sets, bool)> {
        let interrupted = self.tree.hash(JOURNAL)?.is_some();
        Ok((load_sets(&self.tree)?, interrupted))
    }
}

/// Run at the start of every locked run and after a change of the boot
/// settings: finishes or undoes an interrupted transaction, then makes the
/// boot files those of the slot the bootloader starts next. Returns what it
/// did, one line each.
pub fn settle(sys: &mut System) -> Result<Vec<String>> {
    if !unsettled(sys)? {
        return Ok(Vec::new());
    }
    let next = sys.boot.backend.primary()?;
    let Some(opened) = open(sys, true)? else {
        return Ok(Vec::new());
    };
    let mut notes = Vec::new();
    notes.extend(opened.recover().context("boot files: recovering")?);
    if let Some(slot) = next {
        notes.extend(
            opened
                .follow(slot)
                .context("boot files: following the boot settings")?,
        );
    }
    Ok(notes)
}

/// Whether [`settle`] has something to do: an interrupted transaction, or
/// a live set that is not the one of the slot that boots next (read only).
pub fn unsettled(sys: &mut System) -> Result<bool> {
    let next = sys.boot.backend.primary()?;
    let Some(opened) = open(sys, false)? else {
        return Ok(false);
    };
    let (sets, interrupted) = opened.sets()?;
    Ok(interrupted
        || opened.tree.hash(SWITCHING)?.is_some()
        || matches!((sets.live, next), (Some(l), Some(n)) if l != n && sets.get(n).is_some()))
}

/// The boot-files part of `status`: the live slot, each slot's set, and
/// whether a transaction is under way.
#[derive(Debug, Serialize)]
pub struct Status {
    pub live: Option<SlotName>,
    pub sets: BTreeMap<String, SetStatus>,
    pub interrupted: bool,
}

/// One slot's boot-file set in `status`.
#[derive(Debug, Serialize)]
pub struct SetStatus {
    pub id: String,
    pub version: String,
    pub files: usize,
}

/// Reads the boot-files record for `status` (None without `[boot_files]`).
pub fn status(sys: &mut System) -> Result<Option<Status>> {
    let Some(opened) = open(sys, false)? else {
        return Ok(None);
    };
    let (sets, interrupted) = opened.sets()?;
    let mut out = BTreeMap::new();
    for s in SlotName::ALL {
        if let Some(set) = sets.get(s) {
            out.insert(
                s.to_string(),
                SetStatus {
                    id: set.id(),
                    version: set.version.clone(),
                    files: set.files.len(),
                },
            );
        }
    }
    Ok(Some(Status {
        live: sets.live,
        sets: out,
        interrupted,
    }))
}

/// Used by the check step: the bundle's boot files can be installed here.
pub fn check(sys: &mut System, header: &BundleHeader) -> Result<Option<String>> {
    let Some(p) = header.manifest.payload(BOOT_FILES) else {
        return Ok(None);
    };
    if sys.cfg.boot_files.is_none() {
        bail!("the bundle carries boot files but the config has no [boot_files] section; add one naming the boot partition (see README), or use a bundle without --boot-files");
    }
    if p.size > MAX_PAYLOAD {
        bail!(
            "the bundle's boot files are {} bytes; abup holds them in memory and takes at most {MAX_PAYLOAD}; rebuild the bundle with fewer boot files",
            p.size
        );
    }
    let opened = open(sys, false)?.context("boot files are not configured")?;
    let (free, _) = opened.tree.free_space()?;
    let need = p.installed_size.unwrap_or(p.size) + MARGIN;
    if need > free {
        bail!(
            "the boot partition has {free} bytes free but the bundle's boot files need at least {need}; free space on it or make the boot files smaller"
        );
    }
    Ok(Some(format!(
        "boot files fit the boot partition ({free} bytes free)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        assert_eq!(clean_path("./overlays/a.dtbo").unwrap(), "overlays/a.dtbo");
        assert_eq!(clean_path("config.txt").unwrap(), "config.txt");
        for bad in [
            "",
            "/etc/x",
            "a/../b",
            "a//b",
            "abup-boot/sets.json",
            "x.abup-new",
            "a\nb",
            ".",
        ] {
            assert!(clean_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn configuration_files_switch_last_and_removals_after() {
        let c = |p: &str, old: bool, new: bool| Change {
            entry: Entry {
                path: p.into(),
                old: old.then(|| "o".into()),
                new: new.then(|| "n".into()),
            },
            data: new.then(Vec::new),
        };
        let got: Vec<String> = order(vec![
            c("gone.dtb", true, false),
            c("config.txt", true, true),
            c("kernel.img", true, true),
            c("new.dtbo", false, true),
        ])
        .into_iter()
        .map(|c| c.entry.path)
        .collect();
        assert_eq!(got, ["new.dtbo", "kernel.img", "config.txt", "gone.dtb"]);
    }
}
