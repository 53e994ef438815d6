//! The event sink: everything a run says while it runs — steps starting and
//! ending, byte progress of long steps, named lifecycle events — goes through
//! one [`Events`] handle, and every output reads from it: the text lines for
//! a person, the TTY progress bar, the JSON-lines stream for a device cloud
//! (`--json`), and the run report kept in the history.
//!
//! Long steps get a [`Progress`] handle (cheap to clone, `Send`) and call
//! [`Progress::set`] or wrap their reader in [`Progress::reader`]; they need
//! not know who is listening.

use crate::report::{RunReport, StepState};
use serde::Serialize;
use std::io::{IsTerminal, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Named events in the life of an update, modelled on the release events
/// device clouds know (pending, forcing, retrying, updated, failed), plus
/// the boot side, detected by abup on its next run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventName {
    /// An install has passed its checks and is about to write.
    Pending,
    /// An install goes on despite a policy (`--force`, `--allow-downgrade`).
    Forcing,
    /// A queued update is tried again after an earlier attempt failed.
    Retrying,
    /// An install finished: the new slot is written, verified and recorded.
    Updated,
    /// An install failed.
    Failed,
    /// The slot the last install activated is now the booted one.
    BootedNewSlot,
    /// `mark-good` blessed a slot.
    MarkedGood,
    /// The slot the last install activated did not stay booted: the
    /// bootloader fell back to the old one.
    FellBack,
}

impl EventName {
    pub fn as_str(self) -> &'static str {
        match self {
            EventName::Pending => "pending",
            EventName::Forcing => "forcing",
            EventName::Retrying => "retrying",
            EventName::Updated => "updated",
            EventName::Failed => "failed",
            EventName::BootedNewSlot => "booted-new-slot",
            EventName::MarkedGood => "marked-good",
            EventName::FellBack => "fell-back",
        }
    }
}

/// One named event, as kept in the report and the history.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct NamedEvent {
    pub name: EventName,
    /// Unix seconds.
    pub time: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub message: String,
}

/// What a run says, in order. With `--json` each is one line on stdout,
/// tagged by `type`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Event<'a> {
    /// A step begins.
    StepStarted { step: &'a str, time: u64 },
    /// Bytes done in a long step; `total` when known.
    Progress {
        step: &'a str,
        done: u64,
        total: Option<u64>,
        bytes_per_sec: u64,
        eta_s: Option<u64>,
    },
    /// A step ended.
    StepFinished {
        step: &'a str,
        state: StepState,
        comment: &'a str,
        duration_ms: u64,
    },
    /// A named lifecycle event.
    Event(&'a NamedEvent),
    /// The run report, always last.
    Report(&'a RunReport),
}

/// Something that listens to a run's events.
pub trait Sink: Send {
    fn emit(&mut self, event: &Event);
}

/// How much a person wants to see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

/// The handle every part of a run emits through. Clones share the sinks.
#[derive(Clone, Default)]
pub struct Events {
    sinks: Arc<Mutex<Vec<Box<dyn Sink>>>>,
}

impl Events {
    /// The sinks for a command-line run: with `json`, JSON lines on stdout
    /// and human lines on stderr; without, human lines on stdout. A progress
    /// bar on stderr when stderr is a terminal.
    pub fn for_cli(json: bool, verbosity: Verbosity) -> Events {
        let events = Events::default();
        let tty = std::io::stderr().is_terminal();
        events.add(Box::new(TextSink {
            to_stderr: json,
            verbosity,
            bar: tty && verbosity > Verbosity::Quiet,
            last_line: None,
        }));
        if tty && verbosity > Verbosity::Quiet {
            events.add(Box::new(BarSink { bar: None }));
        }
        if json {
            events.add(Box::new(JsonSink { last: None }));
        }
        events.add(Box::new(LockSink { last: None }));
        events
    }

    /// No output at all (library use, unit tests).
    pub fn silent() -> Events {
        Events::default()
    }

    pub fn add(&self, sink: Box<dyn Sink>) {
        self.lock().push(sink);
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Box<dyn Sink>>> {
        // A sink that panicked leaves its data usable for the others.
        self.sinks.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn emit(&self, event: &Event) {
        for s in self.lock().iter_mut() {
            s.emit(event);
        }
    }

    /// A progress handle for `step`, with the total when known.
    pub fn progress(&self, step: &str, total: Option<u64>) -> Progress {
        Progress {
            inner: Arc::new(Mutex::new(ProgressState {
                events: self.clone(),
                step: step.to_string(),
                total,
                done: 0,
                start: Instant::now(),
                last: None,
                emitted: None,
            })),
        }
    }
}

/// Reports the bytes done of one long step. Cheap to clone; emits at most
/// ten times a second (and always the first and the last update).
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Mutex<ProgressState>>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

struct ProgressState {
    events: Events,
    step: String,
    total: Option<u64>,
    done: u64,
    start: Instant,
    last: Option<Instant>,
    /// The count last emitted: the same count is never emitted twice.
    emitted: Option<u64>,
}

impl Progress {
    /// A handle that goes nowhere.
    pub fn none() -> Progress {
        Events::silent().progress("", None)
    }

    /// Sets the bytes done so far.
    pub fn set(&self, done: u64) {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        st.done = done;
        let now = Instant::now();
        let finished = st.total.is_some_and(|t| done >= t) && st.emitted != Some(done);
        let due = st
            .last
            .is_none_or(|l| now.duration_since(l) >= Duration::from_millis(100));
        if due || finished {
            st.last = Some(now);
            st.emit();
        }
    }

    /// Sets the total once it is known.
    pub fn set_total(&self, total: Option<u64>) {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        st.total = total;
    }

    /// Adds `n` bytes.
    pub fn add(&self, n: u64) {
        let done = self.inner.lock().map(|s| s.done).unwrap_or(0);
        self.set(done + n);
    }

    /// Emits the current count now (at the end of a step whose total was
    /// unknown, or not reached).
    pub fn flush(&self) {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if st.emitted != Some(st.done) {
            st.emit();
        }
    }

    /// Wraps a reader so that every byte read counts as progress.
    pub fn reader<R: Read>(&self, inner: R) -> ProgressReader<R> {
        ProgressReader {
            inner,
            progress: self.clone(),
            count: 0,
        }
    }
}

impl ProgressState {
    fn emit(&mut self) {
        self.emitted = Some(self.done);
        let secs = self.start.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            (self.done as f64 / secs) as u64
        } else {
            0
        };
        let eta_s = match self.total {
            Some(t) if rate > 0 => Some(t.saturating_sub(self.done) / rate),
            _ => None,
        };
        self.events.emit(&Event::Progress {
            step: &self.step,
            done: self.done,
            total: self.total,
            bytes_per_sec: rate,
            eta_s,
        });
    }
}

/// A reader that reports the bytes read through it to a [`Progress`].
pub struct ProgressReader<R> {
    inner: R,
    progress: Progress,
    count: u64,
}

impl<R: Read> Read for ProgressReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.count += n as u64;
            self.progress.set(self.count);
        }
        Ok(n)
    }
}

impl<R: crate::write::pipeline::Blocks> crate::write::pipeline::Blocks for ProgressReader<R> {
    fn next_block(&mut self) -> std::io::Result<&[u8]> {
        let b = self.inner.next_block()?;
        if !b.is_empty() {
            self.count += b.len() as u64;
            self.progress.set(self.count);
        }
        Ok(b)
    }
}

/// Human-readable byte count: 1.5 MiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Step lines for a person: `==> step`, then `    state: comment`; on a
/// pipe, a progress line every few seconds for long steps.
struct TextSink {
    to_stderr: bool,
    verbosity: Verbosity,
    /// A progress bar shows progress: no progress lines.
    bar: bool,
    last_line: Option<Instant>,
}

impl TextSink {
    fn line(&self, text: &str) {
        // Best effort: a closed pipe must not fail the run.
        if self.to_stderr {
            let _ = writeln!(std::io::stderr(), "{text}");
        } else {
            let _ = writeln!(std::io::stdout(), "{text}");
        }
    }
}

impl Sink for TextSink {
    fn emit(&mut self, event: &Event) {
        if self.verbosity == Verbosity::Quiet {
            return;
        }
        match event {
            Event::StepStarted { step, .. } => {
                self.last_line = None;
                self.line(&format!("==> {step}"));
            }
            Event::StepFinished {
                state,
                comment,
                duration_ms,
                ..
            } => {
                if self.verbosity == Verbosity::Verbose {
                    self.line(&format!("    {state} ({duration_ms} ms): {comment}"));
                } else {
                    self.line(&format!("    {state}: {comment}"));
                }
            }
            Event::Progress {
                done,
                total,
                bytes_per_sec,
                eta_s,
                ..
            } => {
                if self.bar {
                    return;
                }
                let now = Instant::now();
                let every = if self.verbosity == Verbosity::Verbose {
                    Duration::from_secs(1)
                } else {
                    Duration::from_secs(5)
                };
                match self.last_line {
                    // The first update opens the step's clock.
                    None => self.last_line = Some(now),
                    Some(l) if now.duration_since(l) >= every => {
                        self.last_line = Some(now);
                        self.line(&format!(
                            "    {}",
                            progress_text(*done, *total, Some((*bytes_per_sec, *eta_s)))
                        ));
                    }
                    Some(_) => {}
                }
            }
            Event::Event(e) => {
                if self.verbosity == Verbosity::Verbose {
                    self.line(&format!("    event {}: {}", e.name.as_str(), e.message));
                }
            }
            Event::Report(_) => {}
        }
    }
}

/// `120.0 MiB of 390.0 MiB (30%), 45.1 MiB/s, 6 s left`.
pub fn progress_text(
    done: u64,
    total: Option<u64>,
    rate_eta: Option<(u64, Option<u64>)>,
) -> String {
    let mut s = human_bytes(done);
    if let Some(t) = total {
        let pct = (done as f64 * 100.0 / t.max(1) as f64).min(100.0);
        s += &format!(" of {} ({pct:.0}%)", human_bytes(t));
    }
    if let Some((rate, eta)) = rate_eta {
        s += &format!(", {}/s", human_bytes(rate));
        if let Some(e) = eta {
            s += &format!(", {e} s left");
        }
    }
    s
}

/// A progress bar on stderr (bytes, rate, time left) for long steps, when
/// stderr is a terminal.
struct BarSink {
    bar: Option<indicatif::ProgressBar>,
}

impl Sink for BarSink {
    fn emit(&mut self, event: &Event) {
        match event {
            Event::Progress {
                step, done, total, ..
            } => {
                let bar = self.bar.get_or_insert_with(|| new_bar(step, *total));
                // An estimated total (a directory's size) may be passed.
                if bar.length().is_some_and(|l| *done > l) {
                    bar.set_length(*done);
                }
                bar.set_position(*done);
            }
            Event::StepFinished { .. } | Event::Report(_) => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
            }
            _ => {}
        }
    }
}

fn new_bar(step: &str, total: Option<u64>) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let (bar, template) = match total {
        Some(t) => (
            ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr()),
            "    {prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        ),
        None => (
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            "    {prefix} {spinner} {bytes} {binary_bytes_per_sec} {elapsed}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(step.to_string());
    bar
}

/// One JSON object per line on stdout; progress at most once a second per
/// step (plus its first and last update).
struct JsonSink {
    last: Option<(String, Instant)>,
}

impl Sink for JsonSink {
    fn emit(&mut self, event: &Event) {
        if let Event::Progress {
            step, done, total, ..
        } = event
        {
            let now = Instant::now();
            let last_of_step = total.is_some_and(|t| *done >= t);
            let due = match &self.last {
                Some((s, at)) if s == step => now.duration_since(*at) >= Duration::from_secs(1),
                _ => true,
            };
            if !due && !last_of_step {
                return;
            }
            self.last = Some((step.to_string(), now));
        }
        if let Ok(line) = serde_json::to_string(event) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

/// Keeps the byte progress in the run lock's info, for `status` (at most
/// once a second; the lock file lives on a tmpfs).
struct LockSink {
    last: Option<Instant>,
}

impl Sink for LockSink {
    fn emit(&mut self, event: &Event) {
        if let Event::Progress { done, total, .. } = event {
            let now = Instant::now();
            let last_of_step = total.is_some_and(|t| *done >= t);
            if last_of_step
                || self
                    .last
                    .is_none_or(|l| now.duration_since(l) >= Duration::from_secs(1))
            {
                self.last = Some(now);
                crate::lock::note_progress(*done, *total);
            }
        }
    }
}

/// Collects events in memory (tests, and callers that want them back).
#[derive(Clone, Default)]
pub struct Recorder {
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Sink for Recorder {
    fn emit(&mut self, event: &Event) {
        if let Ok(line) = serde_json::to_string(event) {
            self.lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reader_reports_every_byte_and_the_end() {
        let events = Events::silent();
        let rec = Recorder::default();
        events.add(Box::new(rec.clone()));
        let p = events.progress("write", Some(10));
        let mut r = p.reader(&b"0123456789"[..]);
        let mut out = Vec::new();
        let mut buf = [0u8; 3];
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, b"0123456789");
        let lines = rec.lines.lock().unwrap();
        let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
        assert_eq!(last["type"], "progress");
        assert_eq!(last["done"], 10);
        assert_eq!(last["total"], 10);
        // Throttled: the first read and the last, not every read.
        assert_eq!(lines.len(), 2, "{lines:?}");
    }

    #[test]
    fn progress_text_reads_well() {
        assert_eq!(
            progress_text(3 << 20, Some(4 << 20), Some((1 << 20, Some(1)))),
            "3.0 MiB of 4.0 MiB (75%), 1.0 MiB/s, 1 s left"
        );
        assert_eq!(human_bytes(512), "512 B");
    }
}
