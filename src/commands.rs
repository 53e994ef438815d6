//! One small function per verb, called from `main`'s `match`: each turns
//! the parsed command line into a call of the library and prints the
//! result, as text or (with `--json`) as JSON on stdout.

use crate::bundle;
use crate::cli::{self, BundleCommand, Cli, Command};
use crate::config::SystemConfig;
use crate::events::{EventName, Events, Verbosity};
use crate::history;
use crate::install::{self, InstallOptions};
use crate::lock::RunLock;
use crate::report::{self, Reporter, RunReport, StepReport, StepState};
use crate::slot::SlotName;
use crate::system::{self, System};
use crate::{control, queue};
use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Runs one verb; returns the exit code (errors are printed by `main`).
pub fn run(cli: &Cli) -> Result<i32> {
    match &cli.command {
        Command::Install(a) => {
            let opts = InstallOptions {
                bundle: a.bundle.clone(),
                allow_downgrade: a.allow_downgrade,
                force: a.force,
                no_activate: a.no_activate,
                target: a.target_slot,
                booted: cli.booted_slot,
                check_only: false,
            };
            install_run(cli, "install", &opts)
        }
        Command::Check(a) => {
            let opts = InstallOptions {
                bundle: a.bundle.clone(),
                allow_downgrade: a.allow_downgrade,
                target: a.target_slot,
                booted: cli.booted_slot,
                check_only: true,
                ..InstallOptions::default()
            };
            install_run(cli, "check", &opts)
        }
        Command::Status => status(cli),
        Command::MarkGood { slot } => control_run(cli, "mark-good", slot, control::mark_good),
        Command::MarkBad { slot } => control_run(cli, "mark-bad", slot, control::mark_bad),
        Command::MarkActive { slot } => control_run(cli, "mark-active", slot, control::mark_active),
        Command::Recover => recover(cli),
        Command::Rollback => {
            control_run(cli, "rollback", "booted", |sys, _| control::rollback(sys))
        }
        Command::Keygen { secret, public } => {
            let id = bundle::keys::generate(secret, public)?;
            let msg = format!(
                "wrote key {id}: secret {}, public {}",
                secret.display(),
                public.display()
            );
            say(cli, "keygen", None, &msg);
            Ok(report::EXIT_OK)
        }
        Command::Bundle(BundleCommand::Create(a)) => bundle_create(cli, a),
        Command::Bundle(BundleCommand::Info { bundle, keys }) => bundle_info(cli, bundle, keys),
        Command::Queue { bundle } => queue_bundle(cli, bundle),
        Command::ApplyQueued => apply_queued(cli),
        Command::History { count } => history_verb(cli, *count),
        Command::Events { count } => events_verb(cli, *count),
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a closed stdout.
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "abup", &mut buf);
            crate::out!("{}", String::from_utf8_lossy(&buf));
            Ok(report::EXIT_OK)
        }
        Command::Manpage { out_dir } => manpage(out_dir.as_deref()),
    }
}

/// How much the person at the terminal wants to see.
pub fn verbosity(cli: &Cli) -> Verbosity {
    match (cli.quiet, cli.verbose) {
        (true, _) => Verbosity::Quiet,
        (_, true) => Verbosity::Verbose,
        _ => Verbosity::Normal,
    }
}

fn reporter(cli: &Cli, command: &str) -> Reporter {
    let v = verbosity(cli);
    Reporter::new(command, Events::for_cli(cli.json, v), cli.json, v)
}

fn install_run(cli: &Cli, command: &str, opts: &InstallOptions) -> Result<i32> {
    let mut rep = reporter(cli, command);
    let result = install::install(&cli.config, opts, &mut rep);
    rep.finish(&result);
    result.map(|()| report::EXIT_OK)
}

/// `mark-*` and `rollback`: one locked change of the boot settings, kept in
/// the history with the boot-side events it noticed.
fn control_run(
    cli: &Cli,
    verb: &str,
    which: &str,
    f: impl FnOnce(&mut System, SlotName) -> Result<String>,
) -> Result<i32> {
    system::require_root("changing boot settings")?;
    let cfg = SystemConfig::load(&cli.config)?;
    let state_dir = cfg.state_dir.clone();
    let _lock = RunLock::acquire(&cfg, verb)?;
    for note in crate::leftovers::clean(&cfg.disk) {
        crate::errln!("note: {note}");
    }
    let mut sys = System::open(cfg, cli.booted_slot)?;
    for note in crate::bootfiles::settle(&mut sys)? {
        crate::errln!("note: {note}");
    }
    let slot = sys.resolve(which)?;
    let mut rec = RunReport {
        command: verb.to_string(),
        started_at: crate::state::now(),
        booted_slot: sys.booted.map(|b| b.to_string()),
        events: history::detect(&sys),
        ..RunReport::default()
    };
    let start = std::time::Instant::now();
    let result = crate::migrate::data::settle(&sys)
        .and_then(|fell_back| {
            f(&mut sys, slot).map(|m| crate::migrate::data::with_note(m, fell_back))
        })
        .map_err(report::flip_outcome)
        .map(|msg| {
            // The boot files follow the slot that now boots next.
            match crate::bootfiles::settle(&mut sys) {
                Ok(notes) => std::iter::once(msg)
                    .chain(notes)
                    .collect::<Vec<_>>()
                    .join("; "),
                Err(e) => format!("{msg}; warning: {e:#}"),
            }
        });
    let slot = match verb {
        "rollback" => slot.other(),
        _ => slot,
    };
    rec.duration_ms = start.elapsed().as_millis() as u64;
    let (state, comment) = match &result {
        Ok(m) => (StepState::Changed, m.clone()),
        Err(e) => (StepState::Failed, format!("{e:#}")),
    };
    rec.steps.push(StepReport {
        step: verb.to_string(),
        state,
        comment,
        duration_ms: rec.duration_ms,
    });
    match &result {
        Ok(_) => {
            rec.result = "success".into();
            if matches!(verb, "mark-active" | "rollback") {
                rec.activated_slot = Some(slot.to_string());
            }
            if verb == "mark-good" {
                rec.events.push(crate::events::NamedEvent {
                    name: EventName::MarkedGood,
                    time: crate::state::now(),
                    slot: Some(slot.to_string()),
                    version: sys
                        .records()
                        .ok()
                        .and_then(|r| r.get(slot).map(|r| r.version.clone())),
                    message: format!("slot {slot} marked good"),
                });
            }
        }
        Err(e) => {
            rec.result = "failed".into();
            rec.exit_code = report::exit_code(e);
            rec.error = Some(format!("{e:#}"));
        }
    }
    if let Err(e) = history::append(&state_dir, &rec) {
        crate::errln!("warning: {e:#}");
    }
    let msg = result?;
    say(cli, verb, Some(slot), &msg);
    Ok(report::EXIT_OK)
}

/// `recover`: finishes or undoes an interrupted boot-files update and makes
/// the boot files those of the slot that boots next.
fn recover(cli: &Cli) -> Result<i32> {
    system::require_root("abup recover")?;
    let cfg = SystemConfig::load(&cli.config)?;
    if cfg.boot_files.is_none() {
        say(
            cli,
            "recover",
            None,
            "nothing to recover: the config has no [boot_files]",
        );
        return Ok(report::EXIT_OK);
    }
    let _lock = RunLock::acquire(&cfg, "recover")?;
    for note in crate::leftovers::clean(&cfg.disk) {
        crate::errln!("note: {note}");
    }
    let mut sys = System::open(cfg, cli.booted_slot)?;
    let notes = crate::bootfiles::settle(&mut sys)?;
    let msg = match notes.is_empty() {
        true => "nothing to recover: no interrupted boot-files update, and the boot partition holds the boot files of the slot that boots next".to_string(),
        false => notes.join("; "),
    };
    say(cli, "recover", None, &msg);
    Ok(report::EXIT_OK)
}

/// The boot-files record for `status`, after recovering an interrupted
/// update when no other run holds the lock (status is a run of any kind).
fn boot_files_status(
    cfg: &SystemConfig,
    sys: &mut System,
) -> Result<Option<crate::bootfiles::Status>> {
    if cfg.boot_files.is_none() {
        return Ok(None);
    }
    // Only a run that has something to repair takes the lock.
    if crate::bootfiles::unsettled(sys)? {
        if let Ok(_lock) = RunLock::acquire_unrecorded(cfg, "status") {
            for note in crate::bootfiles::settle(sys)? {
                crate::errln!("note: {note}");
            }
        }
    }
    crate::bootfiles::status(sys)
}

fn format_boot_files(bf: &crate::bootfiles::Status) -> String {
    let live = bf
        .live
        .map_or("none recorded".to_string(), |s| format!("slot {s}'s"));
    let mut out = format!("boot files: {live}");
    if bf.interrupted {
        out += " (an interrupted update is pending: run `abup recover`)";
    }
    out += "
";
    for (slot, set) in &bf.sets {
        let version = match set.version.as_str() {
            "" => "found on the partition".to_string(),
            v => format!("version {v}"),
        };
        out += &format!(
            "  slot {slot}: set {} ({} files, {version})\n",
            set.id, set.files
        );
    }
    out
}

/// Prints a one-line result, or a JSON object with `--json`.
fn say(cli: &Cli, action: &str, slot: Option<SlotName>, msg: &str) {
    if cli.json {
        let v = serde_json::json!({ "action": action, "slot": slot, "result": "success", "message": msg });
        crate::outln!("{v}");
    } else if !cli.quiet {
        crate::outln!("{msg}");
    }
}

/// `status`: the slots as the bootloader and the records see them, the run
/// in progress and the last run. Without root, what can be read without
/// opening the disk, and a note saying what needs root.
fn status(cli: &Cli) -> Result<i32> {
    let cfg = SystemConfig::load(&cli.config)?;
    let state_dir = cfg.state_dir.clone();
    let root = nix::unistd::geteuid().is_root();
    let (st, boot_files) = if root {
        let mut sys = System::open(cfg.clone(), cli.booted_slot)?;
        if let Some(note) = crate::migrate::data::settle_unless_busy(&sys)? {
            crate::errln!("note: {note}");
        }
        let boot_files = boot_files_status(&cfg, &mut sys)?;
        (Some(sys.status()?), boot_files)
    } else {
        (None, None)
    };
    let mut v = match &st {
        Some(st) => serde_json::to_value(st)?,
        None => limited_status(&cfg),
    };
    if let (Some(obj), Some(bf)) = (v.as_object_mut(), &boot_files) {
        obj.insert("boot_files".into(), serde_json::to_value(bf)?);
    }
    let running = crate::lock::running(&cfg.disk);
    let mut last = history::load(&state_dir)
        .ok()
        .and_then(|runs| runs.into_iter().last());
    // A run killed (or cut off by a power loss) wrote no history: its
    // last-run record still says running while no process holds the lock.
    if let Some(killed) = crate::runlog::load(&state_dir).filter(|r| {
        r.result == "running"
            && running.is_none()
            && last.as_ref().is_none_or(|l| l.started_at <= r.started_at)
    }) {
        last = Some(RunReport {
            command: killed.verb.clone(),
            result: "did-not-finish".into(),
            started_at: killed.started_at,
            failed_step: Some(killed.step.clone()),
            error: Some(format!(
                "did not finish: killed or lost power during step {}",
                killed.step
            )),
            ..RunReport::default()
        });
    }
    if let Some(obj) = v.as_object_mut() {
        obj.insert("run_in_progress".into(), serde_json::to_value(&running)?);
        obj.insert("last_run".into(), last_run_json(last.as_ref()));
    }
    if cli.json {
        crate::outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(report::EXIT_OK);
    }
    let mut out = match &st {
        Some(st) => control::format_status(st),
        None => format_limited(&v),
    };
    if let Some(bf) = &boot_files {
        out += &format_boot_files(bf);
    }
    out += &match &running {
        Some(r) => format!("running:    {r}\n"),
        None => "running:    no abup run in progress\n".to_string(),
    };
    out += &match &last {
        Some(r) => format!(
            "last run:   {} {}{} at {} UTC{}{}\n",
            r.command,
            r.result,
            r.signal
                .as_ref()
                .map_or(String::new(), |s| format!(" ({s})")),
            history::utc(r.started_at),
            if r.result == "did-not-finish" {
                String::new()
            } else {
                format!(" (exit {})", r.exit_code)
            },
            r.error.as_ref().map_or(String::new(), |e| format!(": {e}"))
        ),
        None => "last run:   none recorded\n".to_string(),
    };
    crate::out!("{out}");
    Ok(report::EXIT_OK)
}

fn last_run_json(r: Option<&RunReport>) -> serde_json::Value {
    match r {
        Some(r) => serde_json::json!({
            "command": r.command,
            "result": r.result,
            "exit_code": r.exit_code,
            "signal": r.signal,
            "started_at": r.started_at,
            "duration_ms": r.duration_ms,
            "version": r.version,
            "target_slot": r.target_slot,
            "failed_step": r.failed_step,
            "error": r.error,
        }),
        None => serde_json::Value::Null,
    }
}

/// What a user without root can read: the config and abup's records.
const NEEDS_ROOT: &str = "booted and primary slot, bootability and tries left need root (they read the disk and the boot settings): run `sudo abup status`";

fn limited_status(cfg: &SystemConfig) -> serde_json::Value {
    let store = crate::state::StateStore::new(&cfg.state_dir);
    let (records, note) = match store.load() {
        Ok(r) => (Some(r), NEEDS_ROOT.to_string()),
        Err(e) => (None, format!("{NEEDS_ROOT}; slot records: {e:#}")),
    };
    let mut slots = serde_json::Map::new();
    for s in [SlotName::A, SlotName::B] {
        let rec = records.as_ref().and_then(|r| r.get(s));
        slots.insert(
            s.to_string(),
            serde_json::json!({
                "recorded": rec.map(|r| r.content),
                "version": rec.map(|r| r.version.clone()),
                "bundle_sha256": rec.map(|r| r.bundle_sha256.clone()),
                "installed_at": rec.map(|r| r.installed_at),
                "blessed": rec.map(|r| r.good),
            }),
        );
    }
    serde_json::json!({
        "compatible": cfg.compatible,
        "booted": null,
        "primary": null,
        "slots": slots,
        "note": note,
    })
}

fn format_limited(v: &serde_json::Value) -> String {
    let s = |x: &serde_json::Value| x.as_str().map_or("unknown".to_string(), str::to_string);
    let mut out = format!("compatible: {}\n", s(&v["compatible"]));
    for slot in ["A", "B"] {
        let r = &v["slots"][slot];
        out += &format!(
            "slot {slot}: record {}, version {}, blessed {}\n",
            s(&r["recorded"]),
            s(&r["version"]),
            r["blessed"]
                .as_bool()
                .map_or("unknown", |b| if b { "yes" } else { "no" })
        );
    }
    out += &format!("note:       {}\n", s(&v["note"]));
    out
}

fn history_verb(cli: &Cli, count: usize) -> Result<i32> {
    let cfg = SystemConfig::load(&cli.config)?;
    let runs = history::load(&cfg.state_dir)?;
    let runs = &runs[runs.len().saturating_sub(count)..];
    if cli.json {
        crate::outln!("{}", serde_json::to_string_pretty(runs)?);
    } else {
        crate::out!("{}", history::format_runs(runs));
    }
    Ok(report::EXIT_OK)
}

fn events_verb(cli: &Cli, count: usize) -> Result<i32> {
    let cfg = SystemConfig::load(&cli.config)?;
    let runs = history::load(&cfg.state_dir)?;
    let all = history::events(&runs);
    let events = &all[all.len().saturating_sub(count)..];
    if cli.json {
        let v: Vec<_> = events
            .iter()
            .map(|(r, e)| {
                let mut v = serde_json::to_value(e).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("command".into(), r.command.clone().into());
                }
                v
            })
            .collect();
        crate::outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        crate::out!("{}", history::format_events(events));
    }
    Ok(report::EXIT_OK)
}

fn manpage(out_dir: Option<&Path>) -> Result<i32> {
    let cmd = Cli::command();
    match out_dir {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .context("rendering the man page")?;
            std::io::stdout()
                .write_all(&out)
                .context("writing the man page")?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))?;
        }
    }
    Ok(report::EXIT_OK)
}

fn queue_bundle(cli: &Cli, bundle: &Path) -> Result<i32> {
    let mut rep = reporter(cli, "queue");
    let result = queue::queue(&cli.config, bundle, &mut rep);
    rep.finish(&result);
    result.map(|()| report::EXIT_OK)
}

fn apply_queued(cli: &Cli) -> Result<i32> {
    let cfg = SystemConfig::load(&cli.config)?;
    let Some(q) = queue::Queued::load(&cfg.state_dir)? else {
        if !cli.quiet {
            crate::errln!("nothing queued in {}", cfg.state_dir.display());
        }
        return Ok(report::EXIT_NOTHING_TO_DO);
    };
    let mut rep = reporter(cli, "apply-queued");
    let result = queue::apply(&cli.config, &cfg.state_dir, q, cli.booted_slot, &mut rep);
    rep.finish(&result);
    result.map(|()| report::EXIT_OK)
}

fn bundle_create(cli: &Cli, a: &cli::CreateArgs) -> Result<i32> {
    use bundle::create::{CreateOptions, Source};
    let source = match (&a.rootfs, &a.tarball, &a.image) {
        (Some(d), _, _) => Source::Dir(d.clone()),
        (_, Some(t), _) => Source::Tarball(t.clone()),
        (_, _, Some(i)) => Source::RawImage(i.clone()),
        _ => bail!("pass one of --rootfs, --tarball or --image"),
    };
    if !a.force && std::fs::symlink_metadata(&a.output).is_ok() {
        bail!(
            "{} already exists; pass --force to replace it, or choose another -o",
            a.output.display()
        );
    }
    let signing_key = a
        .key
        .as_deref()
        .map(bundle::keys::load_signing_key)
        .transpose()?;
    let v = verbosity(cli);
    let events = Events::for_cli(cli.json, v);
    events.emit(&crate::events::Event::StepStarted {
        step: "pack",
        time: crate::state::now(),
    });
    let start = std::time::Instant::now();
    let opts = CreateOptions {
        source,
        version: a.version.clone(),
        compatible: a.compatible.clone(),
        compression: a.compression,
        signing_key,
        description: a.description.clone(),
        zstd_level: bundle::create::DEFAULT_ZSTD_LEVEL,
        progress: Some(events.progress("pack", None)),
        boot_files: a.boot_files.clone(),
    };
    let result = bundle::create::create(&opts, &a.output)
        .with_context(|| format!("creating bundle {}", a.output.display()));
    let (state, comment) = match &result {
        Ok(m) => (
            StepState::Changed,
            format!(
                "{} bytes packed into {}",
                m.rootfs().size,
                a.output.display()
            ),
        ),
        Err(e) => (StepState::Failed, format!("{e:#}")),
    };
    events.emit(&crate::events::Event::StepFinished {
        step: "pack",
        state,
        comment: &comment,
        duration_ms: start.elapsed().as_millis() as u64,
    });
    let m = result?;
    if cli.json {
        crate::outln!("{}", serde_json::to_string(&m)?);
    } else {
        let p = m.rootfs();
        crate::outln!(
            "wrote {}: version {} for {:?}, {} payload ({}), {} bytes stored{}",
            a.output.display(),
            m.version,
            m.compatible,
            p.kind,
            p.compression,
            p.stored_size,
            if a.key.is_some() {
                ", signed"
            } else {
                ", UNSIGNED (devices will refuse it)"
            }
        );
    }
    Ok(report::EXIT_OK)
}

fn bundle_info(cli: &Cli, path: &Path, keys: &[PathBuf]) -> Result<i32> {
    let (mut input, _) = bundle::reader::open_bundle(path)?;
    let h = bundle::reader::read_header(&mut input)
        .with_context(|| format!("reading bundle {}", path.display()))?;
    let signed_by = h.signature.as_ref().map(|s| s.key_id.clone());
    // With keys, the whole bundle is checked: the signature, every chunk of
    // every payload, the decompressed sizes and hashes, the end marker.
    let verified = if keys.is_empty() {
        None
    } else {
        let id = h.verify(&bundle::keys::load_verifying_keys(keys)?)?;
        bundle::reader::check_payloads(&mut input, &h)
            .with_context(|| format!("checking bundle {}", path.display()))?;
        Some(id)
    };
    if cli.json {
        let v = serde_json::json!({
            "bundle_sha256": h.bundle_sha256,
            "signed_by": signed_by,
            "verified": verified.is_some(),
            "verified_key": verified,
            "manifest": h.manifest,
            "layout": h.layout.to_json(&h.manifest),
        });
        crate::outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let m = &h.manifest;
        crate::outln!("bundle:     {}", path.display());
        crate::outln!("sha256:     {}", h.bundle_sha256);
        crate::outln!("format:     {}", m.format);
        crate::outln!("compatible: {}", m.compatible);
        crate::outln!("version:    {}", m.version);
        if let Some(d) = &m.description {
            crate::outln!("description: {d}");
        }
        crate::outln!(
            "signed by:  {}{}",
            signed_by.as_deref().unwrap_or("nobody (unsigned)"),
            if verified.is_some() {
                " (verified: signature, every chunk and the end marker)"
            } else {
                " (not verified; pass --key to check the signature and every byte)"
            }
        );
        for p in &m.payloads {
            crate::outln!(
                "payload {}: {} ({}), {} bytes, sha256 {}; stored {} bytes in {} chunks of {}",
                p.name,
                p.kind,
                p.compression,
                p.size,
                p.sha256,
                p.stored_size,
                p.chunk_count(),
                p.chunk_size
            );
        }
    }
    Ok(report::EXIT_OK)
}
