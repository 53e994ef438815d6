//! The run report: every step of a run ends `unchanged`, `changed` or
//! `failed`, with a comment, like the update release runs users know from
//! device clouds. Steps are printed as they run; the report is printed at the
//! end, as a table or (with `--json`) as one JSON document on stdout.
//!
//! A failed step is attached to the error as [`StepFailed`], from which
//! `main` derives the exit code: a failure before any write is a refusal.

use anyhow::Result;
use serde::Serialize;
use std::fmt;
use std::io::Write;
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

/// How a step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub step: String,
    pub state: StepState,
    pub comment: String,
    pub duration_ms: u64,
}

/// The whole run.
#[derive(Clone, Debug, Default, Serialize)]
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

/// The exit code for an error returned by a run.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    match err.downcast_ref::<StepFailed>() {
        Some(s) if !s.refused => EXIT_FAILED,
        Some(_) => EXIT_REFUSED,
        None => EXIT_REFUSED,
    }
}

/// Runs steps, prints them as they go, and collects the report.
pub struct Reporter {
    pub report: RunReport,
    json: bool,
    writes_started: bool,
}

impl Reporter {
    /// `json`: progress goes to stderr and the final report is JSON on stdout.
    pub fn new(command: &str, json: bool) -> Reporter {
        Reporter {
            report: RunReport {
                command: command.to_string(),
                ..RunReport::default()
            },
            json,
            writes_started: false,
        }
    }

    fn progress(&self, line: &str) {
        // Progress is best effort: a closed pipe must not fail the install.
        if self.json {
            let _ = writeln!(std::io::stderr(), "{line}");
        } else {
            let _ = writeln!(std::io::stdout(), "{line}");
        }
    }

    /// Runs one named step.
    pub fn step<T>(
        &mut self,
        name: &str,
        kind: StepKind,
        f: impl FnOnce() -> Result<Done<T>>,
    ) -> Result<T> {
        if kind == StepKind::Write {
            self.writes_started = true;
        }
        self.progress(&format!("==> {name}"));
        let start = Instant::now();
        let result = f();
        let duration_ms = start.elapsed().as_millis() as u64;
        match result {
            Ok(done) => {
                self.progress(&format!("    {}: {}", done.state, done.comment));
                self.report.steps.push(StepReport {
                    step: name.to_string(),
                    state: done.state,
                    comment: done.comment,
                    duration_ms,
                });
                Ok(done.value)
            }
            Err(e) => {
                let msg = format!("{e:#}");
                self.progress(&format!("    failed: {msg}"));
                self.report.steps.push(StepReport {
                    step: name.to_string(),
                    state: StepState::Failed,
                    comment: msg,
                    duration_ms,
                });
                Err(e.context(StepFailed {
                    step: name.to_string(),
                    refused: !self.writes_started,
                }))
            }
        }
    }

    /// Records a step that was not needed, as unchanged.
    pub fn skip(&mut self, name: &str, comment: &str) {
        self.progress(&format!("==> {name}\n    unchanged: {comment}"));
        self.report.steps.push(StepReport {
            step: name.to_string(),
            state: StepState::Unchanged,
            comment: comment.to_string(),
            duration_ms: 0,
        });
    }

    /// Closes the report with the run's outcome and prints it.
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
            }
        }
        let out = if self.json {
            serde_json::to_string_pretty(&self.report).unwrap_or_default()
        } else {
            self.table()
        };
        let _ = writeln!(std::io::stdout(), "{out}");
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
        let mut r = Reporter::new("install", true);
        r.step("check", StepKind::Check, || Ok(Done::unchanged((), "ok")))
            .unwrap();
        let e = r
            .step::<()>("verify", StepKind::Check, || Err(anyhow!("bad signature")))
            .unwrap_err();
        assert_eq!(exit_code(&e), EXIT_REFUSED);
        assert_eq!(format!("{e:#}"), "verify: bad signature");

        let mut r = Reporter::new("install", true);
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
