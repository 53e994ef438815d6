//! The `abup` binary: parse, run, print `error: …`, exit with a code.

use abup::cli::{Cli, Command};
use abup::{commands, report};
use clap::Parser;

fn main() {
    let cli = Cli::parse();
    let code = match commands::run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = report::exit_code(&e);
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
                println!("{v}");
            }
            code
        }
    };
    std::process::exit(code);
}
