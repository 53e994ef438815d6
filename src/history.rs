//! The run history: every run that may change the device (install, check,
//! queue, apply-queued, mark-*, rollback) keeps its report, one JSON line per
//! run, in `history.jsonl` in the state directory — on the data partition by
//! default, so it survives slot switches. The file keeps the last
//! [`MAX_RUNS`] runs.
//!
//! The boot side of an update (did the new slot come up? did the bootloader
//! fall back?) happens while abup is not running; [`boot_events`] detects it
//! on the next run by comparing the last activation in the history with the
//! booted slot and the bootloader's view.

use crate::events::{EventName, NamedEvent};
use crate::report::RunReport;
use crate::slot::SlotName;
use crate::util::write_atomic;
use anyhow::{Context, Result};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Runs kept in the history.
pub const MAX_RUNS: usize = 100;

const FILE_NAME: &str = "history.jsonl";

fn file(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Appends one run; trims the file to the last [`MAX_RUNS`] runs.
pub fn append(state_dir: &Path, report: &RunReport) -> Result<()> {
    let path = file(state_dir);
    let line = serde_json::to_string(report).context("encoding the run report")?;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating state directory {}", state_dir.display()))?;
    let mut runs = read_lines(&path)?;
    if runs.len() + 1 > MAX_RUNS {
        runs.push(line);
        let keep = runs.split_off(runs.len() - MAX_RUNS);
        let mut text = keep.join("\n");
        text.push('\n');
        return write_atomic(&path, text.as_bytes())
            .with_context(|| format!("trimming run history {}", path.display()));
    }
    // A line torn by a power cut must not swallow this one.
    let torn = std::fs::read(&path).is_ok_and(|t| t.last().is_some_and(|b| *b != b'\n'));
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening run history {}", path.display()))?;
    let sep = if torn { "\n" } else { "" };
    writeln!(f, "{sep}{line}")
        .and_then(|_| f.sync_data())
        .with_context(|| format!("writing run history {}", path.display()))
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading run history {}", path.display())),
    }
}

/// All runs kept, oldest first. A line that does not parse (a torn write
/// after a power cut) is skipped.
pub fn load(state_dir: &Path) -> Result<Vec<RunReport>> {
    Ok(read_lines(&file(state_dir))?
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Every named event in the history, oldest first.
pub fn events(runs: &[RunReport]) -> Vec<(&RunReport, &NamedEvent)> {
    runs.iter()
        .flat_map(|r| r.events.iter().map(move |e| (r, e)))
        .collect()
}

/// What the bootloader says now about the slot the last install activated.
pub struct BootView {
    pub booted: Option<SlotName>,
    pub primary: Option<SlotName>,
    /// Whether the activated slot is still bootable with tries left.
    pub activated_bootable: bool,
}

/// The boot-side events since the last activation, detected now: the new
/// slot is booted (`booted-new-slot`), or the bootloader fell back to the
/// old one (`fell-back`). Each activation yields at most one of them.
/// `view` is asked for the bootloader's state of the activated slot.
pub fn boot_events(
    runs: &[RunReport],
    view: impl FnOnce(SlotName) -> Result<BootView>,
) -> Result<Vec<NamedEvent>> {
    let Some(i) = runs.iter().rposition(|r| r.activated_slot.is_some()) else {
        return Ok(Vec::new());
    };
    let act = &runs[i];
    // Later runs that settled it, or changed the boot settings by hand.
    let settled = runs[i + 1..].iter().any(|r| {
        r.events
            .iter()
            .any(|e| matches!(e.name, EventName::BootedNewSlot | EventName::FellBack))
            || (r.result == "success"
                && matches!(r.command.as_str(), "mark-bad" | "mark-active" | "rollback"))
    });
    let Some(target) = act
        .activated_slot
        .as_deref()
        .and_then(|s| s.parse::<SlotName>().ok())
    else {
        return Ok(Vec::new());
    };
    let from = act
        .booted_slot
        .as_deref()
        .and_then(|s| s.parse::<SlotName>().ok());
    if settled || from == Some(target) {
        return Ok(Vec::new());
    }
    let v = view(target)?;
    let version = act.version.clone();
    let what = version
        .as_deref()
        .map_or(String::new(), |v| format!(" (version {v})"));
    let event = |name, message: String| NamedEvent {
        name,
        time: crate::state::now(),
        slot: Some(target.to_string()),
        version: version.clone(),
        message,
    };
    if v.booted == Some(target) {
        return Ok(vec![event(
            EventName::BootedNewSlot,
            format!("booted slot {target}{what}, activated by {}", act.command),
        )]);
    }
    if v.booted.is_some()
        && v.booted == from
        && (!v.activated_bootable || v.primary != Some(target))
    {
        return Ok(vec![event(
            EventName::FellBack,
            format!(
                "slot {target}{what} did not stay booted: the bootloader fell back to slot {}",
                v.booted.map_or("?".to_string(), |b| b.to_string())
            ),
        )]);
    }
    Ok(Vec::new())
}

/// [`boot_events`] for the opened system, best effort: a history or
/// bootloader that cannot be read yields no events (the run goes on).
pub fn detect(sys: &crate::system::System) -> Vec<NamedEvent> {
    let Ok(runs) = load(&sys.cfg.state_dir) else {
        return Vec::new();
    };
    let backend = sys.boot.backend.as_ref();
    boot_events(&runs, |target| {
        let info = backend.state(target)?;
        Ok(BootView {
            booted: sys.booted,
            primary: backend.primary()?,
            activated_bootable: info.ok && info.tries_left != Some(0),
        })
    })
    .unwrap_or_default()
}

/// `2026-11-23 20:41:07` (UTC) from Unix seconds.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One line per run, for a person.
pub fn format_runs(runs: &[RunReport]) -> String {
    let mut out = String::new();
    for r in runs {
        let mut what = r.command.clone();
        if let Some(v) = &r.version {
            what += &format!(" {v}");
        }
        if let Some(t) = &r.target_slot {
            what += &format!(" into {t}");
        } else if let Some(a) = &r.activated_slot {
            what += &format!(" {a}");
        }
        let mut line = format!(
            "{}  {what:30}  {} (exit {}) in {:.1} s",
            utc(r.started_at),
            r.result,
            r.exit_code,
            r.duration_ms as f64 / 1000.0
        );
        if let Some(e) = &r.error {
            line += &format!(": {e}");
        }
        if !r.events.is_empty() {
            let names: Vec<_> = r.events.iter().map(|e| e.name.as_str()).collect();
            line += &format!(" [{}]", names.join(", "));
        }
        out += &line;
        out.push('\n');
    }
    if runs.is_empty() {
        out += "no runs recorded yet\n";
    }
    out
}

/// One line per event, for a person.
pub fn format_events(events: &[(&RunReport, &NamedEvent)]) -> String {
    let mut out = String::new();
    for (r, e) in events {
        out += &format!(
            "{}  {:16} {}  ({})\n",
            utc(e.time),
            e.name.as_str(),
            e.message,
            r.command
        );
    }
    if events.is_empty() {
        out += "no events recorded yet\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(command: &str, booted: &str, activated: Option<&str>) -> RunReport {
        RunReport {
            command: command.into(),
            result: "success".into(),
            version: Some("2.0.0".into()),
            booted_slot: Some(booted.into()),
            activated_slot: activated.map(str::to_string),
            ..RunReport::default()
        }
    }

    fn view(booted: SlotName, primary: SlotName, ok: bool) -> BootView {
        BootView {
            booted: Some(booted),
            primary: Some(primary),
            activated_bootable: ok,
        }
    }

    #[test]
    fn boot_events_after_an_activation() {
        use SlotName::*;
        let runs = vec![run("install", "A", Some("B"))];
        // Not rebooted yet: nothing.
        assert!(boot_events(&runs, |_| Ok(view(A, B, true)))
            .unwrap()
            .is_empty());
        let e = boot_events(&runs, |_| Ok(view(B, B, true))).unwrap();
        assert_eq!(e[0].name, EventName::BootedNewSlot);
        let e = boot_events(&runs, |_| Ok(view(A, A, false))).unwrap();
        assert_eq!(e[0].name, EventName::FellBack);
        // Once detected, never again.
        let mut later = run("mark-good", "B", None);
        later.events = e;
        let runs = vec![runs[0].clone(), later];
        assert!(boot_events(&runs, |_| Ok(view(B, B, true)))
            .unwrap()
            .is_empty());
        // A rollback by hand is no fallback.
        let runs = vec![run("install", "A", Some("B")), run("mark-bad", "A", None)];
        assert!(boot_events(&runs, |_| Ok(view(A, A, false)))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn history_is_bounded_and_skips_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..MAX_RUNS + 5 {
            let mut r = run("install", "A", None);
            r.exit_code = i as i32;
            append(dir.path(), &r).unwrap();
        }
        let runs = load(dir.path()).unwrap();
        assert_eq!(runs.len(), MAX_RUNS);
        assert_eq!(runs[0].exit_code, 5);
        let mut f = OpenOptions::new()
            .append(true)
            .open(file(dir.path()))
            .unwrap();
        write!(f, "{{\"command\":\"inst").unwrap();
        assert_eq!(load(dir.path()).unwrap().len(), MAX_RUNS);
        append(dir.path(), &run("rollback", "A", None)).unwrap();
        let runs = load(dir.path()).unwrap();
        assert_eq!(runs.last().unwrap().command, "rollback");
    }

    #[test]
    fn utc_formats_known_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
    }
}
