//! The run report: every step of a run ends `unchanged`, `changed` or
//! `failed`, with a comment, like the update release runs users know from
//! device clouds. Steps, progress and named events go through the event sink
//! ([`crate::events`]) as they happen; the report is printed at the end, as a
//! table or (with `--json`) as the last JSON line on stdout, and kept in the
//! run history ([`crate::history`]).
//!
//! A failed step is attached to the error as [`StepFailed`], from which
//! `main` derives the exit code (see [`exit_code`] and the table in the
//! README): a failure before any write is a refusal.

use crate::events::{Event, EventName, Events, NamedEvent, Verbosity};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Exit code: the run succeeded.
pub const EXIT_OK: i32 = 0;
/// Exit code: a step failed after abup began writing (the booted slot and
/// the boot settings are intact; the spare slot may be partly written).
pub const EXIT_FAILED: i32 = 1;
/// Exit code: command-line usage error (from clap).
pub const EXIT_USAGE: i32 = 2;
/// Exit code: refused before anything was written (bad bundle, bad config,
/// failed sanity check).
pub const EXIT_REFUSED: i32 = 3;
/// Exit code: another abup run holds the lock on this disk; nothing was
/// written. Try again when it has finished.
pub const EXIT_LOCKED: i32 = 4;
/// Exit code: stopped by SIGINT, SIGTERM or SIGHUP before the flip; nothing
/// was flipped (the booted slot and the boot settings are intact; the spare
/// may be marked bad and recorded incomplete).
pub const EXIT_INTERRUPTED: i32 = 5;
/// Exit code: the flip was written (the boot settings may already select the
/// new slot) but could not be confirmed durable, e.g. syncing the directory
/// after the rename failed. Check `abup status` before rebooting.
pub const EXIT_FLIP_UNCONFIRMED: i32 = 6;

/// Marks an error that happened once the flip's new boot settings were in
/// place: the outcome is [`EXIT_FLIP_UNCONFIRMED`], never "settings intact".
#[derive(Debug, Clone, Copy)]
pub struct FlipUnconfirmed;

impl fmt::Display for FlipUnconfirmed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the new boot settings were written but not confirmed durable; run `abup status` and check the boot settings before rebooting",
        )
    }
}
/// Exit code: there was nothing to do (`apply-queued` with no queued bundle).
pub const EXIT_NOTHING_TO_DO: i32 = 7;

/// Gives an error after new boot settings were renamed into place (the
/// [`crate::util::Replaced`] mark) the unconfirmed-flip outcome: it can no
/// longer claim "nothing changed".
pub fn flip_outcome(e: anyhow::Error) -> anyhow::Error {
    if e.downcast_ref::<crate::util::Replaced>().is_some() {
        e.context(FlipUnconfirmed)
    } else {
        e
    }
}

/// `println!` that ignores a closed or broken stdout: output never panics.
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `print!` that ignores a closed or broken stdout.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

/// `eprintln!` that ignores a closed or broken stderr.
#[macro_export]
macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// How a step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    /// Ran without error and changed nothing on the device.
    Unchanged,
    /// Ran without error and changed something on the device.
    Changed,
    /// Ran with an error; the comment says what went wrong.
    Failed,
}

impl fmt::Display for StepState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StepState::Unchanged => "unchanged",
            StepState::Changed => "changed",
            StepState::Failed => "failed",
        })
    }
}

/// Whether a step may write to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// Reads and checks only.
    Check,
    /// May write; a failure from here on is not a refusal.
    Write,
}

/// One step's entry in the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepReport {
    pub step: String,
    pub state: StepState,
    pub comment: String,
    pub duration_ms: u64,
}

/// The whole run. Fields after `exit_code` were added for the history;
/// readers of the older report can ignore them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunReport {
    pub command: String,
    /// "success" or "failed".
    pub result: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_slot: Option<String>,
    pub steps: Vec<StepReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub exit_code: i32,
    /// The signal that stopped the run, or a hang-up it ignored (`SIGHUP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// Unix seconds when the run started.
    pub started_at: u64,
    /// How long the run took.
    pub duration_ms: u64,
    /// The slot the running system was booted from, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub booted_slot: Option<String>,
    /// The slot this run made primary, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activated_slot: Option<String>,
    /// Named events of the run (pending, updated, fell-back …).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<NamedEvent>,
}

/// The value of a finished step, with how it ended.
pub struct Done<T> {
    pub value: T,
    pub state: StepState,
    pub comment: String,
}

impl<T> Done<T> {
    pub fn changed(value: T, comment: impl Into<String>) -> Done<T> {
        Done {
            value,
            state: StepState::Changed,
            comment: comment.into(),
        }
    }

    pub fn unchanged(value: T, comment: impl Into<String>) -> Done<T> {
        Done {
            value,
            state: StepState::Unchanged,
            comment: comment.into(),
        }
    }
}

/// Context attached to the error of a failed step.
#[derive(Debug, Clone)]
pub struct StepFailed {
    pub step: String,
    /// True when no write step had started: nothing on the device changed.
    pub refused: bool,
}

impl fmt::Display for StepFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.step)
    }
}

/// The exit code for an error returned by a run: an unconfirmed flip, then
/// an interruption, then a held lock, then failed-after-writing, else refused.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err.downcast_ref::<FlipUnconfirmed>().is_some() {
        return EXIT_FLIP_UNCONFIRMED;
    }
    if crate::signal::interrupted_by(err).is_some() {
        return EXIT_INTERRUPTED;
    }
    if err.downcast_ref::<crate::lock::Held>().is_some() {
        return EXIT_LOCKED;
    }
    match err.downcast_ref::<StepFailed>() {
        Some(s) if !s.refused => EXIT_FAILED,
        Some(_) => EXIT_REFUSED,
        None => EXIT_REFUSED,
    }
}

/// Runs steps, sends them to the event sink as they go, and collects the
/// report.
pub struct Reporter {
    pub report: RunReport,
    /// Where everything the run says goes.
    pub events: Events,
    verbosity: Verbosity,
    json: bool,
    writes_started: bool,
    started: Instant,
    /// The state directory whose history keeps this run, once known.
    pub history_dir: Option<PathBuf>,
}

impl Reporter {
    /// `json`: the final report is the last JSON line on stdout.
    pub fn new(command: &str, events: Events, json: bool, verbosity: Verbosity) -> Reporter {
        Reporter {
            report: RunReport {
                command: command.to_string(),
                started_at: crate::state::now(),
                ..RunReport::default()
            },
            events,
            verbosity,
            json,
            writes_started: false,
            started: Instant::now(),
            history_dir: None,
        }
    }

    /// A reporter that prints nothing (library use, tests).
    pub fn silent(command: &str) -> Reporter {
        Reporter::new(command, Events::silent(), false, Verbosity::Quiet)
    }

    /// Runs one named step.
    pub fn step<T>(
        &mut self,
        name: &str,
        kind: StepKind,
        f: impl FnOnce() -> Result<Done<T>>,
    ) -> Result<T> {
        crate::lock::note_step(name);
        self.events.emit(&Event::StepStarted {
            step: name,
            time: crate::state::now(),
        });
        let start = Instant::now();
        // A signal stops the run at a step boundary, before the step runs;
        // a fail point named `after-<step>` fires once it has run.
        let result = crate::signal::check().and_then(|()| {
            if kind == StepKind::Write {
                self.writes_started = true;
            }
            let done = f()?;
            crate::failpoint::hit(&format!("after-{name}"))?;
            Ok(done)
        });
        let duration_ms = start.elapsed().as_millis() as u64;
        let (state, comment, value) = match result {
            Ok(done) => (done.state, done.comment, Ok(done.value)),
            Err(e) => (StepState::Failed, format!("{e:#}"), Err(e)),
        };
        self.events.emit(&Event::StepFinished {
            step: name,
            state,
            comment: &comment,
            duration_ms,
        });
        self.report.steps.push(StepReport {
            step: name.to_string(),
            state,
            comment,
            duration_ms,
        });
        value.map_err(|e| {
            e.context(StepFailed {
                step: name.to_string(),
                refused: !self.writes_started,
            })
        })
    }

    /// Records a step that was not needed, as unchanged.
    pub fn skip(&mut self, name: &str, comment: &str) {
        self.step(name, StepKind::Check, || Ok(Done::unchanged((), comment)))
            .unwrap_or_default();
    }

    /// Records and emits a named event.
    pub fn event(&mut self, name: EventName, slot: Option<String>, message: impl Into<String>) {
        let e = NamedEvent {
            name,
            time: crate::state::now(),
            slot,
            version: self.report.version.clone(),
            message: message.into(),
        };
        self.events.emit(&Event::Event(&e));
        self.report.events.push(e);
    }

    /// Closes the report with the run's outcome, prints it, and keeps it in
    /// the history when the state directory is known.
    pub fn finish(&mut self, outcome: &Result<()>) {
        match outcome {
            Ok(()) => {
                self.report.result = "success".into();
                self.report.exit_code = EXIT_OK;
            }
            Err(e) => {
                self.report.result = "failed".into();
                self.report.exit_code = exit_code(e);
                self.report.failed_step = e.downcast_ref::<StepFailed>().map(|s| s.step.clone());
                self.report.error = Some(format!("{e:#}"));
                self.report.signal = crate::signal::interrupted_by(e).map(|i| i.name().into());
            }
        }
        if self.report.signal.is_none() && crate::signal::hangup_ignored() {
            self.report.signal = Some("SIGHUP".into());
        }
        self.report.duration_ms = self.started.elapsed().as_millis() as u64;
        if let Some(dir) = &self.history_dir {
            if let Err(e) = crate::history::append(dir, &self.report) {
                // The run itself is done; losing its history entry must not
                // change its outcome.
                let _ = writeln!(std::io::stderr(), "warning: {e:#}");
            }
        }
        self.events.emit(&Event::Report(&self.report));
        if !self.json {
            let table = self.table();
            let out = match self.verbosity {
                Verbosity::Quiet => table.lines().last().unwrap_or_default().to_string(),
                _ => table,
            };
            let _ = writeln!(std::io::stdout(), "{out}");
        }
    }

    fn table(&self) -> String {
        let r = &self.report;
        let mut s = format!("\nRun report: {}", r.command);
        if let Some(v) = &r.version {
            s += &format!(" {v}");
        }
        if let Some(t) = &r.target_slot {
            s += &format!(" into slot {t}");
        }
        s.push('\n');
        let width = r.steps.iter().map(|st| st.step.len()).max().unwrap_or(0);
        for st in &r.steps {
            s += &format!(
                "  {:width$}  {:9}  {}\n",
                st.step,
                st.state.to_string(),
                st.comment
            );
        }
        let count = |want| r.steps.iter().filter(|st| st.state == want).count();
        s += &format!(
            "result: {} ({} changed, {} unchanged, {} failed)",
            r.result,
            count(StepState::Changed),
            count(StepState::Unchanged),
            count(StepState::Failed)
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::anyhow;

    #[test]
    fn failure_before_writes_is_a_refusal_and_after_is_not() {
        let mut r = Reporter::silent("install");
        r.step("check", StepKind::Check, || Ok(Done::unchanged((), "ok")))
            .unwrap();
        let e = r
            .step::<()>("verify", StepKind::Check, || Err(anyhow!("bad signature")))
            .unwrap_err();
        assert_eq!(exit_code(&e), EXIT_REFUSED);
        assert_eq!(format!("{e:#}"), "verify: bad signature");

        let mut r = Reporter::silent("install");
        r.step("mark-bad", StepKind::Write, || Ok(Done::changed((), "x")))
            .unwrap();
        let e = r
            .step::<()>("verify", StepKind::Check, || {
                Err(anyhow!("sha256 mismatch"))
            })
            .unwrap_err();
        assert_eq!(exit_code(&e), EXIT_FAILED);
        r.finish(&Err(e));
        assert_eq!(r.report.failed_step.as_deref(), Some("verify"));
        assert_eq!(r.report.steps[1].state, StepState::Failed);
        assert_eq!(r.report.exit_code, EXIT_FAILED);
    }
}
