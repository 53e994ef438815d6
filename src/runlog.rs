//! How the last run that held the lock ended, so that `abup status` can say
//! it after a lost terminal, a kill or a power cut.
//!
//! `last-run.json` in the state directory is written when a run takes the
//! lock (`result: "running"`), its `step` is updated at each step boundary
//! (renamed into place, not synced: cheap, and a power cut at worst shows
//! an earlier step), and it is written durably when the run ends, with the
//! result, exit code, failing step, error and signal. A record still saying
//! `running` while no process holds the lock is a run that was killed or
//! lost its power. The format is one JSON object; unknown fields are kept
//! when abup rewrites it, so later versions can add to it.

use crate::lock::RunInfo;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const FILE_NAME: &str = "last-run.json";

/// The record of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastRun {
    pub verb: String,
    /// `running` while it runs; then `success`, `failed`, `refused`,
    /// `interrupted` or `flip-unconfirmed` (see the exit-code table).
    pub result: String,
    /// The step it was in when it ended (or is in).
    pub step: String,
    /// The signal that stopped it, or a hang-up it ignored (`SIGHUP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub pid: u32,
    /// Unix seconds.
    pub started_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    /// Fields written by a later abup, kept on rewrite.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// This process's run, once it holds the lock.
static RUN: Mutex<Option<(PathBuf, LastRun)>> = Mutex::new(None);

fn file(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

fn save(state_dir: &Path, rec: &LastRun, durable: bool) -> anyhow::Result<()> {
    let mut text = serde_json::to_vec_pretty(rec)?;
    text.push(b'\n');
    let path = file(state_dir);
    if durable {
        crate::util::write_atomic(&path, &text)
    } else {
        let tmp = state_dir.join(format!(".{FILE_NAME}.{}", std::process::id()));
        std::fs::write(&tmp, &text)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}

/// Records that a run started (called once it holds the lock).
pub fn started(state_dir: &Path, info: &RunInfo) {
    let extra = load(state_dir).map(|r| r.extra).unwrap_or_default();
    let rec = LastRun {
        verb: info.verb.clone(),
        result: "running".into(),
        step: info.step.clone(),
        signal: None,
        exit_code: None,
        error: None,
        pid: info.pid,
        started_at: info.since,
        finished_at: None,
        extra,
    };
    // Best effort: the record is for people; a run that cannot write its
    // state directory fails at its first real write anyway.
    let _ = save(state_dir, &rec, true);
    *RUN.lock().unwrap_or_else(|e| e.into_inner()) = Some((state_dir.to_path_buf(), rec));
}

/// Notes the step this run is in.
pub fn note_step(step: &str) {
    let mut run = RUN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((dir, rec)) = run.as_mut() {
        if rec.finished_at.is_none() {
            rec.step = step.to_string();
            let _ = save(dir, rec, false);
        }
    }
}

/// How a run ended, for [`finish`].
pub struct Outcome<'a> {
    pub exit_code: i32,
    pub error: Option<&'a anyhow::Error>,
    /// The failed step, when the run knows it.
    pub failed_step: Option<String>,
}

/// Records how this run ended, durably. Does nothing if the run never took
/// the lock (refused before it, or a verb that does not lock).
pub fn finish(o: Outcome<'_>) {
    use crate::report::*;
    let mut run = RUN.lock().unwrap_or_else(|e| e.into_inner());
    let Some((dir, rec)) = run.as_mut() else {
        return;
    };
    rec.result = match o.exit_code {
        EXIT_OK => "success",
        EXIT_FAILED => "failed",
        EXIT_INTERRUPTED => "interrupted",
        EXIT_FLIP_UNCONFIRMED => "flip-unconfirmed",
        _ => "refused",
    }
    .into();
    rec.exit_code = Some(o.exit_code);
    if let Some(s) = o.failed_step {
        rec.step = s;
    }
    rec.error = o.error.map(|e| format!("{e:#}"));
    rec.signal = match o.error.and_then(crate::signal::interrupted_by) {
        Some(i) => Some(i.name().to_string()),
        None if crate::signal::hangup_ignored() => Some("SIGHUP".to_string()),
        None => None,
    };
    rec.finished_at = Some(crate::state::now());
    let _ = save(dir, rec, true);
}

/// The last run's record in `state_dir`, if there is a readable one.
pub fn load(state_dir: &Path) -> Option<LastRun> {
    let text = std::fs::read(file(state_dir)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(secs: u64) -> String {
    format!("{} UTC", crate::history::utc(secs))
}

/// One line for `status`: how the last run ended, or that it is running.
pub fn describe(rec: &LastRun, in_progress: bool) -> String {
    let mut s = format!("{} ", rec.verb);
    match rec.result.as_str() {
        "running" if in_progress => {
            s += &format!("running, step {}", rec.step);
        }
        "running" => {
            s += &format!(
                "did not finish: killed or lost power during step {}",
                rec.step
            );
        }
        r => {
            s += r;
            if r != "success" {
                s += &format!(" at step {}", rec.step);
            }
            if let Some(sig) = &rec.signal {
                s += &format!(" ({sig})");
            }
            if let Some(c) = rec.exit_code {
                s += &format!(", exit code {c}");
            }
        }
    }
    s += &format!(", started {}", utc(rec.started_at));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_466_007), "2026-11-23 20:33:27 UTC");
    }

    #[test]
    fn unknown_fields_are_kept() {
        let text = r#"{"verb":"install","result":"success","step":"activate","pid":1,
            "started_at":5,"history":[1,2]}"#;
        let rec: LastRun = serde_json::from_str(text).unwrap();
        assert_eq!(rec.extra["history"], serde_json::json!([1, 2]));
        let back = serde_json::to_value(&rec).unwrap();
        assert_eq!(back["history"], serde_json::json!([1, 2]));
        assert!(describe(&rec, false).starts_with("install success, started 1970"));
    }
}
