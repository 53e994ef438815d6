//! systemd-boot backend: one Boot Loader Specification type #1 entry per
//! slot on the ESP, with systemd's boot counting in the file name.
//!
//! ```text
//! loader/loader.conf                 default abup-*
//! loader/entries/abup-7-b+3.conf     slot B, generation 7, 3 tries left
//! loader/entries/abup-6-a.conf       slot A, generation 6, blessed
//! ```
//!
//! systemd-boot sorts entries (those with no tries left last, then by id
//! with the newest version first) and boots the first that the `default`
//! glob of `loader.conf` matches. Before each boot of an entry with a
//! counter it renames it (`+3` → `+2-1` → `+1-2` → `+0-3`); at `+0` the
//! entry sorts last, so the other slot boots, and keeps booting: no
//! boot-loop. The generation number orders the two good entries: the flip
//! is one rename giving the new slot a higher generation and a fresh
//! counter; `mark-good` drops the counter (one rename, as
//! systemd-bless-boot does); `mark-bad` sets it to `+0`.
//!
//! Why not point `default` at the primary entry: systemd-boot boots the
//! entry the pattern matches even when it has no tries left, so a pattern
//! naming one slot would boot it forever. The default must match both slot
//! entries; abup never writes `loader.conf`, it checks it.
//!
//! abup never creates, rewrites or deletes a file on the ESP: missing or
//! broken entries and a missing `loader.conf` are reported with the fix.
//! The contract is in `boot-backends/systemd-boot/README.md`.

use crate::boot::esp::Esp;
use crate::boot::{BootBackend, BootSlotInfo, BootState};
use crate::slot::SlotName;
use anyhow::{bail, Context, Result};
use std::cmp::Ordering;
use std::path::{Path, PathBuf};

const ENTRIES: &str = "loader/entries";
const LOADER_CONF: &str = "loader/loader.conf";
const README: &str = "boot-backends/systemd-boot/README.md";
/// The vendor GUID of systemd-boot's EFI variables.
const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// The parts of an abup entry's file name: `abup-GEN-SLOT[+LEFT[-DONE]].conf`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryName {
    pub generation: u64,
    pub slot: SlotName,
    /// Tries left; None: blessed (no counter).
    pub left: Option<u32>,
    pub done: u32,
}

impl EntryName {
    /// Parses a file name in abup's form, None for any other name.
    /// Only the canonical spelling is accepted (no leading zeros), so that
    /// abup and systemd-boot order names alike.
    pub fn parse(name: &str) -> Option<EntryName> {
        let lower = name.to_ascii_lowercase();
        let rest = lower.strip_prefix("abup-")?.strip_suffix(".conf")?;
        let (gen, rest) = rest.split_once('-')?;
        let number = |s: &str| -> Option<u64> {
            if s.is_empty()
                || !s.bytes().all(|b| b.is_ascii_digit())
                || (s.len() > 1 && s.starts_with('0'))
            {
                return None;
            }
            s.parse().ok()
        };
        let generation = number(gen)?;
        let (slot, counter) = match rest.split_once('+') {
            Some((s, c)) => (s, Some(c)),
            None => (rest, None),
        };
        let slot = match slot {
            "a" => SlotName::A,
            "b" => SlotName::B,
            _ => return None,
        };
        let (left, done) = match counter {
            None => (None, 0),
            Some(c) => {
                let (l, d) = match c.split_once('-') {
                    Some((l, d)) => (l, Some(d)),
                    None => (c, None),
                };
                let left = u32::try_from(number(l)?).ok()?;
                let done = match d {
                    Some(d) => u32::try_from(number(d)?).ok()?,
                    None => 0,
                };
                (Some(left), done)
            }
        };
        Some(EntryName {
            generation,
            slot,
            left,
            done,
        })
    }

    /// The file name.
    pub fn file_name(&self) -> String {
        let slot = self.slot.to_string().to_ascii_lowercase();
        let counter = match (self.left, self.done) {
            (None, _) => String::new(),
            (Some(l), 0) => format!("+{l}"),
            (Some(l), d) => format!("+{l}-{d}"),
        };
        format!("abup-{}-{slot}{counter}.conf", self.generation)
    }

    /// The entry id as systemd-boot 252 sees it (the lowercased file name)
    /// and as later versions and bootctl see it (without the counter).
    fn ids(&self) -> [String; 2] {
        let bare = EntryName {
            left: None,
            ..self.clone()
        };
        [self.file_name(), bare.file_name()]
    }

    fn bad(&self) -> bool {
        self.left == Some(0)
    }
}

/// systemd-boot's order of two abup entries: no tries left last, then the
/// newest (highest generation, then slot letter) first, then more tries
/// left, then fewer done. Other sort fields are checked equal beforehand.
fn boot_order(a: &EntryName, b: &EntryName) -> Ordering {
    a.bad()
        .cmp(&b.bad())
        .then(b.generation.cmp(&a.generation))
        .then((b.slot as u8).cmp(&(a.slot as u8)))
        .then(b.left.cmp(&a.left))
        .then(a.done.cmp(&b.done))
}

/// The keys of a type #1 entry that matter to abup.
#[derive(Debug, Default, PartialEq, Eq)]
struct Body {
    linux: Option<String>,
    efi: Option<String>,
    initrd: Vec<String>,
    sort_key: Option<String>,
    version: Option<String>,
    machine_id: Option<String>,
}

/// Splits "key value" config lines as systemd-boot does; comments and
/// blank lines skipped.
fn key_values(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines().filter_map(|l| {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            return None;
        }
        let (k, v) = l.split_once([' ', '\t']).unwrap_or((l, ""));
        Some((k, v.trim()))
    })
}

fn parse_body(text: &str) -> Body {
    let mut b = Body::default();
    for (k, v) in key_values(text) {
        let v = v.to_string();
        match k {
            "linux" => b.linux = Some(v),
            "efi" => b.efi = Some(v),
            "initrd" => b.initrd.push(v),
            "sort-key" => b.sort_key = Some(v),
            "version" => b.version = Some(v),
            "machine-id" => b.machine_id = Some(v),
            _ => {}
        }
    }
    b
}

/// An ESP path as an entry writes it (`/abup/a/vmlinuz`, `\EFI\x.efi`),
/// relative to the ESP's root.
fn esp_rel(p: &str) -> String {
    p.replace('\\', "/").trim_start_matches('/').to_string()
}

/// Glob matching as systemd-boot's `efi_fnmatch`: `*`, `?`, `[...]` with
/// ranges and `\` escapes; no negated sets.
pub fn fnmatch(pattern: &str, s: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = s.chars().collect();
    fn go(p: &[char], s: &[char]) -> bool {
        let Some((&c, rest)) = p.split_first() else {
            return s.is_empty();
        };
        match c {
            '*' => (0..=s.len()).any(|i| go(rest, &s[i..])),
            '?' => !s.is_empty() && go(rest, &s[1..]),
            '[' => {
                let Some((&h, s_rest)) = s.split_first() else {
                    return false;
                };
                let mut i = 0;
                let mut matched = false;
                let mut prev: Option<char> = None;
                loop {
                    let Some(&pc) = rest.get(i) else {
                        return false;
                    };
                    if pc == ']' && i > 0 {
                        break;
                    }
                    if pc == '\\' {
                        i += 1;
                        let Some(&e) = rest.get(i) else { return false };
                        matched |= e == h;
                        prev = Some(e);
                    } else if pc == '-' && i > 0 && prev.is_some() && rest.get(i + 1) != Some(&']')
                    {
                        i += 1;
                        let Some(&hi) = rest.get(i) else { return false };
                        if let Some(lo) = prev {
                            matched |= lo <= h && h <= hi;
                        }
                        prev = None;
                    } else {
                        matched |= pc == h;
                        prev = Some(pc);
                    }
                    i += 1;
                }
                matched && go(&rest[i + 1..], s_rest)
            }
            '\\' => match rest.split_first() {
                Some((&e, r)) => s.first() == Some(&e) && go(r, &s[1..]),
                None => false,
            },
            c => s.first() == Some(&c) && go(rest, &s[1..]),
        }
    }
    go(&p, &s)
}

/// One abup entry found on the ESP.
#[derive(Debug)]
struct Entry {
    name: EntryName,
    /// The file name as it is on the ESP (case as written).
    file: String,
    body: Body,
}

/// The ESP's abup entries, checked.
struct View {
    entries: [Entry; 2],
}

impl View {
    fn get(&self, slot: SlotName) -> &Entry {
        &self.entries[slot as usize]
    }

    /// The entries in the order systemd-boot sorts them.
    fn sorted(&self) -> Vec<&Entry> {
        let mut v: Vec<&Entry> = self.entries.iter().collect();
        v.sort_by(|a, b| boot_order(&a.name, &b.name));
        v
    }
}

/// The systemd-boot backend over an ESP.
pub struct SdBootBackend {
    esp: Esp,
    efivars: PathBuf,
    tries: u32,
}

impl SdBootBackend {
    /// Opens the ESP and checks loader.conf and both entries, so that a
    /// broken setup stops a run before anything is written.
    pub fn open(esp: Esp, efivars: &Path, tries: u32) -> Result<SdBootBackend> {
        let b = SdBootBackend {
            esp,
            efivars: efivars.to_path_buf(),
            tries,
        };
        b.load()?;
        Ok(b)
    }

    fn shown(&self) -> &str {
        self.esp.describe()
    }

    /// Reads an EFI variable of systemd-boot's vendor GUID as a string.
    fn efivar(&self, name: &str) -> Result<Option<String>> {
        let path = self.efivars.join(format!("{name}-{LOADER_GUID}"));
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        // 4 bytes of attributes, then UTF-16LE, NUL-terminated.
        let units: Vec<u16> = data
            .get(4..)
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let s = String::from_utf16(&units)
            .with_context(|| format!("{} is not UTF-16 text", path.display()))?;
        Ok(Some(s).filter(|s| !s.is_empty()))
    }

    /// Reads and checks loader.conf and the entries.
    fn load(&self) -> Result<View> {
        let shown = self.shown().to_string();
        if let Some(v) = self.efivar("LoaderEntryDefault")? {
            bail!(
                "the EFI variable LoaderEntryDefault is set to {v:?}; it overrides loader.conf, \
                 so systemd-boot would ignore what abup sets: remove it with `bootctl set-default \"\"`"
            );
        }
        let names = self.esp.list(ENTRIES)?.with_context(|| {
            format!("{shown} has no {ENTRIES} directory: create it with an entry per slot as {README} shows")
        })?;
        let mut found: [Option<Entry>; 2] = [None, None];
        let mut others = Vec::new();
        for file in names
            .iter()
            .filter(|n| n.to_ascii_lowercase().ends_with(".conf"))
        {
            let lower = file.to_ascii_lowercase();
            if lower.starts_with('.') || lower.starts_with("auto-") {
                continue;
            }
            let Some(name) = EntryName::parse(file) else {
                if lower.starts_with("abup-") {
                    bail!(
                        "{ENTRIES}/{file} on {shown} is not a slot entry name \
                         (abup-GENERATION-a|b[+LEFT[-DONE]].conf): rename or remove it"
                    );
                }
                others.push(lower);
                continue;
            };
            let rel = format!("{ENTRIES}/{file}");
            let bytes = self
                .esp
                .read(&rel)?
                .with_context(|| format!("{rel} on {shown} vanished while abup read it"))?;
            let text = String::from_utf8(bytes).map_err(|_| {
                anyhow::anyhow!("{rel} on {shown} is not UTF-8 text: restore it as {README} shows")
            })?;
            let body = parse_body(&text);
            if body.linux.is_none() && body.efi.is_none() {
                bail!(
                    "{rel} on {shown} has no `linux` (or `efi`) line, so systemd-boot skips it: \
                     restore it as {README} shows"
                );
            }
            let slot = name.slot;
            if let Some(prev) = &found[slot as usize] {
                bail!(
                    "{shown} has two entries for slot {slot}: {ENTRIES}/{} and {rel} \
                     (an interrupted rename?); remove the one with the lower generation",
                    prev.file
                );
            }
            found[slot as usize] = Some(Entry {
                name,
                file: file.clone(),
                body,
            });
        }
        let [a, b] = found;
        let missing = |s: SlotName| {
            anyhow::anyhow!(
                "{shown} has no entry for slot {s} in {ENTRIES} (abup-1-{}.conf): \
                 create it as {README} shows",
                s.to_string().to_ascii_lowercase()
            )
        };
        let a = a.ok_or_else(|| missing(SlotName::A))?;
        let b = b.ok_or_else(|| missing(SlotName::B))?;
        for (key, x, y) in [
            ("sort-key", &a.body.sort_key, &b.body.sort_key),
            ("version", &a.body.version, &b.body.version),
            ("machine-id", &a.body.machine_id, &b.body.machine_id),
        ] {
            if x != y {
                bail!(
                    "the entries {ENTRIES}/{} and {} on {shown} differ in `{key}`, which \
                     systemd-boot sorts by before abup's generation: make it the same in both \
                     (or remove it)",
                    a.file,
                    b.file
                );
            }
        }
        let view = View { entries: [a, b] };
        self.check_loader_conf(&view, &others)?;
        Ok(view)
    }

    /// loader.conf must exist and its `default` must match both slot
    /// entries and no other entry.
    fn check_loader_conf(&self, view: &View, others: &[String]) -> Result<()> {
        let shown = self.shown();
        let fix = format!("`default abup-*` ({README})");
        let bytes = self.esp.read(LOADER_CONF)?.with_context(|| {
            format!("{shown} has no {LOADER_CONF}: create it with the line {fix}")
        })?;
        let text = String::from_utf8(bytes).map_err(|_| {
            anyhow::anyhow!(
                "{LOADER_CONF} on {shown} is not UTF-8 text: rewrite it with the line {fix}"
            )
        })?;
        let default = key_values(&text)
            .filter(|(k, _)| *k == "default")
            .last()
            .map(|(_, v)| v.to_ascii_lowercase());
        let Some(pattern) = default else {
            bail!("{LOADER_CONF} on {shown} sets no `default`: add the line {fix}");
        };
        for e in &view.entries {
            if !e.name.ids().iter().all(|id| fnmatch(&pattern, id)) {
                bail!(
                    "`default {pattern}` in {LOADER_CONF} on {shown} does not match the entry \
                     of slot {} ({}), so systemd-boot could not fall back to it: set {fix}",
                    e.name.slot,
                    e.file
                );
            }
        }
        if let Some(o) = others.iter().find(|o| fnmatch(&pattern, o)) {
            bail!(
                "`default {pattern}` in {LOADER_CONF} on {shown} also matches {ENTRIES}/{o}, \
                 which systemd-boot may boot instead of a slot: set {fix}"
            );
        }
        Ok(())
    }

    /// Renames `slot`'s entry to `to`, unless it has that name already.
    fn rename(&self, view: &View, slot: SlotName, to: EntryName) -> Result<()> {
        let e = view.get(slot);
        let new = to.file_name();
        if e.file == new {
            return Ok(());
        }
        self.esp.rename(ENTRIES, &e.file, &new)
    }

    /// Why systemd-boot would skip `slot`'s entry: a file it names is
    /// missing on the ESP.
    fn missing_files(&self, view: &View, slot: SlotName) -> Result<Option<String>> {
        let e = view.get(slot);
        let files = e.body.linux.iter().chain(&e.body.efi).chain(&e.body.initrd);
        for f in files {
            if !self.esp.exists(&esp_rel(f))? {
                return Ok(Some(format!(
                    "{ENTRIES}/{} names {f}, which is not on {}",
                    e.file,
                    self.shown()
                )));
            }
        }
        Ok(None)
    }
}

impl BootBackend for SdBootBackend {
    fn name(&self) -> &'static str {
        "systemd-boot"
    }

    fn primary(&self) -> Result<Option<SlotName>> {
        let view = self.load()?;
        Ok(view
            .sorted()
            .into_iter()
            .find(|e| !e.name.bad())
            .map(|e| e.name.slot))
    }

    fn set_primary(&mut self, slot: SlotName) -> Result<()> {
        let view = self.load()?;
        if let Some(why) = self.missing_files(&view, slot)? {
            bail!("systemd-boot would skip slot {slot}: {why}; put the file there first");
        }
        let other = view.get(slot.other()).name.generation;
        let me = &view.get(slot).name;
        let fresh = EntryName {
            generation: if me.generation > other {
                me.generation
            } else {
                other + 1
            },
            slot,
            left: Some(self.tries),
            done: 0,
        };
        self.rename(&view, slot, fresh)
    }

    fn state(&self, slot: SlotName) -> Result<BootSlotInfo> {
        let view = self.load()?;
        let n = &view.get(slot).name;
        Ok(BootSlotInfo {
            ok: !n.bad(),
            tries_left: n.left,
        })
    }

    fn set_state(&mut self, slot: SlotName, state: BootState) -> Result<()> {
        let view = self.load()?;
        let n = view.get(slot).name.clone();
        let to = match state {
            BootState::Good => EntryName {
                left: None,
                done: 0,
                ..n
            },
            BootState::Bad if n.bad() => n,
            BootState::Bad => EntryName {
                left: Some(0),
                done: 0,
                ..n
            },
        };
        self.rename(&view, slot, to)
    }

    fn prepare_slot(&self, slot: SlotName, _dev: &Path) -> Result<String> {
        let view = self.load()?;
        if let Some(why) = self.missing_files(&view, slot)? {
            bail!("systemd-boot would skip slot {slot}: {why}; put the file there first");
        }
        Ok(format!(
            "systemd-boot entry {ENTRIES}/{} and the files it names are on the ESP",
            view.get(slot).file
        ))
    }

    fn unfindable(
        &self,
        slot: SlotName,
        _dev: &Path,
        _mounted_at: Option<&Path>,
    ) -> Option<String> {
        let view = self.load().ok()?;
        self.missing_files(&view, slot).ok().flatten()
    }

    /// What systemd-boot starts: the first entry in its order that it can
    /// load; with no tries left anywhere, still the first (it boots it).
    fn next_boot(&self, _findable: &dyn Fn(SlotName) -> bool) -> Result<Option<SlotName>> {
        let view = self.load()?;
        let mut loadable = Vec::new();
        for e in view.sorted() {
            if self.missing_files(&view, e.name.slot)?.is_none() {
                loadable.push(e);
            }
        }
        Ok(loadable.first().map(|e| e.name.slot))
    }

    fn booted(&self) -> Result<Option<SlotName>> {
        Ok(self
            .efivar("LoaderEntrySelected")?
            .and_then(|id| EntryName::parse(&id))
            .map(|n| n.slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_round_trip() {
        for (name, gen, slot, left, done) in [
            ("abup-1-a.conf", 1, SlotName::A, None, 0),
            ("abup-12-b+3.conf", 12, SlotName::B, Some(3), 0),
            ("abup-7-b+2-1.conf", 7, SlotName::B, Some(2), 1),
            ("abup-7-a+0-3.conf", 7, SlotName::A, Some(0), 3),
        ] {
            let n = EntryName::parse(name).unwrap();
            assert_eq!(
                (n.generation, n.slot, n.left, n.done),
                (gen, slot, left, done)
            );
            assert_eq!(n.file_name(), name);
        }
        assert_eq!(
            EntryName::parse("ABUP-3-B+1.CONF").unwrap().slot,
            SlotName::B
        );
        for bad in [
            "abup-a.conf",
            "abup-01-a.conf",
            "abup-1-c.conf",
            "abup-1-a+.conf",
            "abup-1-a+x.conf",
            "abup-1-a+1-.conf",
            "abup-1-a.conf.bak",
            "other-1-a.conf",
        ] {
            assert_eq!(EntryName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn order_puts_entries_without_tries_last_then_newest_first() {
        let n = |s: &str| EntryName::parse(s).unwrap();
        let first = |a: &str, b: &str| {
            let (x, y) = (n(a), n(b));
            if boot_order(&x, &y) == Ordering::Less {
                x.slot
            } else {
                y.slot
            }
        };
        assert_eq!(first("abup-2-b+3.conf", "abup-1-a.conf"), SlotName::B);
        assert_eq!(first("abup-2-b+0-3.conf", "abup-1-a.conf"), SlotName::A);
        assert_eq!(first("abup-10-a.conf", "abup-9-b+1-2.conf"), SlotName::A);
        assert_eq!(first("abup-3-a+0.conf", "abup-2-b+0-3.conf"), SlotName::A);
    }

    #[test]
    fn fnmatch_like_systemd_boot() {
        assert!(fnmatch("abup-*", "abup-2-b+3.conf"));
        assert!(fnmatch("abup-*.conf", "abup-2-b.conf"));
        assert!(!fnmatch("abup-*", "debian.conf"));
        assert!(fnmatch("abup-?-[ab]*", "abup-1-a.conf"));
        assert!(!fnmatch("abup-?-[ab]*", "abup-12-a.conf"));
        assert!(fnmatch("abup-[0-9]*", "abup-7-a.conf"));
        assert!(fnmatch("a\\*b", "a*b"));
        assert!(!fnmatch("a\\*b", "axb"));
        assert!(fnmatch("*", ""));
    }

    #[test]
    fn bodies_and_comments() {
        let b = parse_body("# c\ntitle x\nlinux  /abup/a/vmlinuz\ninitrd /abup/a/initrd\noptions a=b\n\nsort-key abup\n");
        assert_eq!(b.linux.as_deref(), Some("/abup/a/vmlinuz"));
        assert_eq!(b.initrd, vec!["/abup/a/initrd".to_string()]);
        assert_eq!(b.sort_key.as_deref(), Some("abup"));
        assert_eq!(esp_rel("\\EFI\\Linux\\x.efi"), "EFI/Linux/x.efi");
    }
}
