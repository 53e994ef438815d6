//! The `abup` binary: parse, run, print `error: …`, exit with a code.
//!
//! Output never panics: a closed stdout or stderr (`abup status | head -1`,
//! a lost SSH session) is ignored, and the run ends as it would have.

use abup::cli::{Cli, Command};
use abup::{commands, report, runlog};
use anyhow::{Context, Result};
use clap::Parser;
use std::io::Write;

fn main() {
    let cli = Cli::parse();
    let code = match prepare(&cli).and_then(|()| commands::run(&cli)) {
        Ok(code) => {
            runlog::finish(runlog::Outcome {
                exit_code: code,
                error: None,
                failed_step: None,
            });
            code
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            let code = report::exit_code(&e);
            runlog::finish(runlog::Outcome {
                exit_code: code,
                error: Some(&e),
                failed_step: e
                    .downcast_ref::<report::StepFailed>()
                    .map(|s| s.step.clone()),
            });
            // The run-report verbs already said it on stdout; the others
            // owe a JSON reader an answer too.
            let reported = matches!(
                cli.command,
                Command::Install(_)
                    | Command::Check(_)
                    | Command::Queue { .. }
                    | Command::ApplyQueued
            );
            if cli.json && !reported {
                let v = serde_json::json!({
                    "result": "failed",
                    "error": format!("{e:#}"),
                    "exit_code": code,
                });
                let _ = writeln!(std::io::stdout(), "{v}");
            }
            code
        }
    };
    std::process::exit(code);
}

/// Before a verb that mounts or changes the device: a private mount
/// namespace (nothing it mounts outlives it) and the signal handlers.
fn prepare(cli: &Cli) -> Result<()> {
    let changes = matches!(
        cli.command,
        Command::Install(_)
            | Command::ApplyQueued
            | Command::MarkGood { .. }
            | Command::MarkBad { .. }
            | Command::MarkActive { .. }
            | Command::Rollback
    );
    let mounts = changes
        || matches!(
            cli.command,
            Command::Status | Command::Check(_) | Command::Queue { .. } | Command::History { .. }
        );
    // Without root nothing can be mounted; the verbs that need root say so.
    if mounts && nix::unistd::geteuid().is_root() {
        abup::mount::enter_private_namespace()?;
    }
    if changes {
        abup::signal::install().context("installing signal handlers")?;
    }
    Ok(())
}
