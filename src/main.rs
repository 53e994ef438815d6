//! The `abup` binary: parse, run, print `error: …`, exit with a code.

use abup::cli::{BundleCommand, Cli, Command};
use abup::report::{self, Reporter};
use abup::{bundle, cli, config::SystemConfig, control, install, lock::RunLock, system::System};
use anyhow::{Context, Result};
use clap::Parser;

fn main() {
    let cli = Cli::parse();
    let code = match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = report::exit_code(&e);
            // install's report already said it on stdout; the other verbs
            // owe a JSON reader an answer too.
            if cli.json && !matches!(cli.command, Command::Install(_)) {
                let v = serde_json::json!({
                    "result": "failed",
                    "error": format!("{e:#}"),
                    "exit_code": code,
                });
                println!("{v}");
            }
            code
        }
    };
    std::process::exit(code);
}

/// Runs one verb; returns the exit code (errors are printed by `main`).
fn run(cli: &Cli) -> Result<i32> {
    match &cli.command {
        Command::Install(a) => {
            let opts = install::InstallOptions {
                bundle: a.bundle.clone(),
                allow_downgrade: a.allow_downgrade,
                force: a.force,
                no_activate: a.no_activate,
                target: a.target_slot,
                booted: cli.booted_slot,
            };
            let mut rep = Reporter::new("install", cli.json);
            let result = install::install(&cli.config, &opts, &mut rep);
            rep.finish(&result);
            result.map(|()| report::EXIT_OK)
        }
        Command::Status => {
            let sys = open_system(cli)?;
            let st = sys.status()?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", control::format_status(&st));
            }
            Ok(report::EXIT_OK)
        }
        Command::MarkGood { slot } => mark(cli, slot, control::mark_good),
        Command::MarkBad { slot } => mark(cli, slot, control::mark_bad),
        Command::MarkActive { slot } => mark(cli, slot, control::mark_active),
        Command::Rollback => {
            let (_lock, mut sys) = open_locked(cli, "rollback")?;
            say(cli, "rollback", None, &control::rollback(&mut sys)?);
            Ok(report::EXIT_OK)
        }
        Command::Keygen { secret, public } => {
            let id = bundle::keys::generate(secret, public)?;
            say(
                cli,
                "keygen",
                None,
                &format!(
                    "wrote key {id}: secret {}, public {}",
                    secret.display(),
                    public.display()
                ),
            );
            Ok(report::EXIT_OK)
        }
        Command::Bundle(BundleCommand::Create(a)) => bundle_create(cli, a),
        Command::Bundle(BundleCommand::Info { bundle, keys }) => bundle_info(cli, bundle, keys),
    }
}

fn open_system(cli: &Cli) -> Result<System> {
    let cfg = SystemConfig::load(&cli.config)?;
    System::open(cfg, cli.booted_slot)
}

/// Opens the system for a verb that changes boot settings, holding the run lock.
fn open_locked(cli: &Cli, verb: &str) -> Result<(RunLock, System)> {
    abup::system::require_root("changing boot settings")?;
    let cfg = SystemConfig::load(&cli.config)?;
    let lock = RunLock::acquire(&cfg.state_dir, verb)?;
    Ok((lock, System::open(cfg, cli.booted_slot)?))
}

fn mark(
    cli: &Cli,
    which: &str,
    f: fn(&mut System, abup::slot::SlotName) -> Result<String>,
) -> Result<i32> {
    let (_lock, mut sys) = open_locked(cli, "mark")?;
    let slot = sys.resolve(which)?;
    let msg = f(&mut sys, slot)?;
    say(cli, "mark", Some(slot), &msg);
    Ok(report::EXIT_OK)
}

/// Prints a one-line result, or a JSON object with `--json`.
fn say(cli: &Cli, action: &str, slot: Option<abup::slot::SlotName>, msg: &str) {
    if cli.json {
        let v = serde_json::json!({ "action": action, "slot": slot, "result": "success", "message": msg });
        println!("{v}");
    } else {
        println!("{msg}");
    }
}

fn bundle_create(cli: &Cli, a: &cli::CreateArgs) -> Result<i32> {
    use bundle::create::{CreateOptions, Source};
    let source = match (&a.rootfs, &a.tarball, &a.image) {
        (Some(d), _, _) => Source::Dir(d.clone()),
        (_, Some(t), _) => Source::Tarball(t.clone()),
        (_, _, Some(i)) => Source::RawImage(i.clone()),
        _ => unreachable!("clap requires one source"),
    };
    let signing_key = a
        .key
        .as_deref()
        .map(bundle::keys::load_signing_key)
        .transpose()?;
    let opts = CreateOptions {
        source,
        version: a.version.clone(),
        compatible: a.compatible.clone(),
        compression: a.compression,
        signing_key,
        description: a.description.clone(),
        zstd_level: bundle::create::DEFAULT_ZSTD_LEVEL,
    };
    let m = bundle::create::create(&opts, &a.output)
        .with_context(|| format!("creating bundle {}", a.output.display()))?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        let p = m.rootfs();
        println!(
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

fn bundle_info(cli: &Cli, path: &std::path::Path, keys: &[std::path::PathBuf]) -> Result<i32> {
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
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let m = &h.manifest;
        println!("bundle:     {}", path.display());
        println!("sha256:     {}", h.bundle_sha256);
        println!("format:     {}", m.format);
        println!("compatible: {}", m.compatible);
        println!("version:    {}", m.version);
        if let Some(d) = &m.description {
            println!("description: {d}");
        }
        println!(
            "signed by:  {}{}",
            signed_by.as_deref().unwrap_or("nobody (unsigned)"),
            if verified.is_some() {
                " (verified: signature, every chunk and the end marker)"
            } else {
                " (not verified; pass --key to check the signature and every byte)"
            }
        );
        for p in &m.payloads {
            println!(
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
