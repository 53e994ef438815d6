//! Command-line interface: one clap struct per verb; the doc comments are
//! the `--help` text.

use crate::bundle::manifest::Compression;
use crate::slot::SlotName;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// abup: A/B partition OS updater.
///
/// Installs a signed bundle into the spare root slot, then flips the
/// bootloader to it as the last step. Exit codes: 0 success; 1 failed after
/// writing began (booted slot and boot settings intact); 2 usage error;
/// 3 refused before anything was written; see the README for the others.
#[derive(Parser, Debug)]
#[command(name = "abup", version)]
pub struct Cli {
    /// System config file.
    #[arg(long, global = true, env = "ABUP_CONFIG", default_value = crate::config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Print machine-readable JSON on stdout: for install, check and
    /// apply-queued one JSON object per line (steps, progress, events),
    /// ending with the run report; human lines go to stderr.
    #[arg(long, global = true)]
    pub json: bool,
    /// Say more: step durations, named events, progress lines every second.
    #[arg(long, short, global = true, conflicts_with = "quiet")]
    pub verbose: bool,
    /// Say less: no step lines or progress, only the result and errors.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Treat this slot as the booted one instead of detecting it from
    /// /proc/cmdline and the device of / (for tests and special setups).
    #[arg(long, global = true, value_name = "A|B")]
    pub booted_slot: Option<SlotName>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Install a bundle into the spare slot and make it primary.
    Install(InstallArgs),
    /// Show the booted and primary slot and the state of each slot.
    Status,
    /// Mark a slot good after a healthy boot (default: the booted slot).
    MarkGood {
        /// booted, other, A or B.
        #[arg(default_value = "booted", value_parser = SLOT_ARGS, ignore_case = true)]
        slot: String,
    },
    /// Mark a slot bad: the bootloader will not boot it.
    MarkBad {
        /// booted, other, A or B.
        #[arg(value_parser = SLOT_ARGS, ignore_case = true)]
        slot: String,
    },
    /// Make a slot primary with a fresh try counter.
    MarkActive {
        /// booted, other, A or B.
        #[arg(value_parser = SLOT_ARGS, ignore_case = true)]
        slot: String,
    },
    /// Make the other slot primary again, if it holds a good install.
    Rollback,
    /// Finish or undo an interrupted boot-files update, and give the boot
    /// partition the boot files of the slot that boots next.
    Recover,
    /// Generate an ed25519 key pair for signing bundles.
    Keygen {
        /// Where to write the secret key (mode 0600; never overwritten).
        #[arg(long)]
        secret: PathBuf,
        /// Where to write the public key (goes in keys.trusted on devices).
        #[arg(long)]
        public: PathBuf,
    },
    /// Create or inspect bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Run every check an install runs, without writing anything.
    Check(CheckArgs),
    /// Verify a bundle and stage it in the state directory, to be installed
    /// by `apply-queued` (at start or before shutdown, see boot-backends/systemd).
    Queue {
        /// Bundle file, or - to read it from stdin.
        bundle: PathBuf,
    },
    /// Install the queued bundle, if any; on failure it stays queued and is
    /// tried again on the next call (exit 7 when nothing is queued).
    ApplyQueued,
    /// Show the last runs (install, check, queue, mark-*, rollback), oldest first.
    History {
        /// How many runs to show.
        #[arg(default_value_t = 10)]
        count: usize,
    },
    /// Show the named events of the last runs: pending, forcing, retrying,
    /// updated, failed, booted-new-slot, marked-good, fell-back.
    Events {
        /// How many events to show.
        #[arg(default_value_t = 20)]
        count: usize,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), or write one page per verb into a directory.
    Manpage {
        /// Directory to write abup.1 and abup-VERB.1 into.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

/// What a slot argument may be.
pub const SLOT_ARGS: [&str; 4] = ["booted", "other", "A", "B"];

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Bundle file, or - to read it from stdin.
    pub bundle: PathBuf,
    /// Check as if --allow-downgrade were given.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// The slot an install would write; required in a rescue system.
    #[arg(long, value_name = "A|B")]
    pub target_slot: Option<SlotName>,
}

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// Bundle file, or - to read it from stdin.
    pub bundle: PathBuf,
    /// Install even if the bundle's version is not newer than the running one.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// Rewrite the slot even if it already holds this bundle.
    #[arg(long)]
    pub force: bool,
    /// Write and verify, but do not make the slot primary.
    #[arg(long)]
    pub no_activate: bool,
    /// The slot to write; required in a rescue system (not booted from A or B).
    #[arg(long, value_name = "A|B")]
    pub target_slot: Option<SlotName>,
}

#[derive(Subcommand, Debug)]
pub enum BundleCommand {
    /// Build a signed bundle from a rootfs directory, tarball or raw image.
    Create(CreateArgs),
    /// Print a bundle's manifest.
    Info {
        /// Bundle file, or - for stdin.
        bundle: PathBuf,
        /// Also verify the signature against this public key (repeatable).
        #[arg(long = "key")]
        keys: Vec<PathBuf>,
    },
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["rootfs", "tarball", "image"])))]
pub struct CreateArgs {
    /// A directory holding the root filesystem.
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// A rootfs tarball (plain, gzip or zstd).
    #[arg(long)]
    pub tarball: Option<PathBuf>,
    /// A raw filesystem image, written to the slot block for block.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Version of the image (SemVer 2.0, e.g. 2.1.0).
    #[arg(long)]
    pub version: semver::Version,
    /// Device type the bundle is for (must equal `compatible` in the device config).
    #[arg(long)]
    pub compatible: String,
    /// Payload compression.
    #[arg(long, default_value = "zstd")]
    pub compression: Compression,
    /// Secret key to sign with (from `abup keygen`). Devices refuse unsigned bundles.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Free-text description stored in the manifest.
    #[arg(long)]
    pub description: Option<String>,
    /// A directory of files for the shared boot partition (kernel, device
    /// trees, boot scripts), added as the signed `boot-files` payload.
    #[arg(long)]
    pub boot_files: Option<PathBuf>,
    /// Output bundle file.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub force: bool,
}
