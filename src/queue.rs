//! Queued updates: `abup queue BUNDLE` verifies a bundle completely
//! (signature, device type, every payload hash) and stages it in the state
//! directory — on the data partition by default; `abup apply-queued`, run by
//! the units in `boot-backends/systemd/` at start or before shutdown,
//! installs it. A failed attempt leaves it queued, so the next boot tries
//! again (the `retrying` event) until it goes through; success removes it.
//!
//! The staged bundle is `queued.abup`, beside `queued.json` (version, bundle
//! hash, when queued, attempts so far). Both are replaced atomically.

use crate::bundle::{self, reader};
use crate::config::SystemConfig;
use crate::events::EventName;
use crate::install::{self, InstallOptions};
use crate::lock::RunLock;
use crate::report::{Done, Reporter, StepKind::*};
use crate::slot::SlotName;
use crate::util::write_atomic;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const BUNDLE: &str = "queued.abup";
const META: &str = "queued.json";

/// What is queued.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Queued {
    pub version: String,
    pub bundle_sha256: String,
    pub queued_at: u64,
    /// Install attempts so far.
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<String>,
}

impl Queued {
    /// The queued update in `state_dir`, if a complete one is there.
    pub fn load(state_dir: &Path) -> Result<Option<Queued>> {
        let meta = state_dir.join(META);
        let text = match std::fs::read(&meta) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", meta.display())),
        };
        if !state_dir.join(BUNDLE).exists() {
            return Ok(None);
        }
        let q = serde_json::from_slice(&text).with_context(|| {
            format!(
                "parsing {}: remove it and queue the bundle again",
                meta.display()
            )
        })?;
        Ok(Some(q))
    }

    fn save(&self, state_dir: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).context("encoding the queue record")?;
        write_atomic(&state_dir.join(META), &text)
            .with_context(|| format!("recording the queued update in {}", state_dir.display()))
    }
}

/// The staged bundle's path.
pub fn bundle_path(state_dir: &Path) -> PathBuf {
    state_dir.join(BUNDLE)
}

/// `abup queue`: verify the whole bundle while copying it into the state
/// directory, then publish it with one rename.
pub fn queue(cfg_path: &Path, bundle_path_in: &Path, rep: &mut Reporter) -> Result<()> {
    let (cfg, _lock) = rep.step("load-config", Check, || {
        crate::system::require_root("abup queue")?;
        let cfg = SystemConfig::load(cfg_path)?;
        let lock = RunLock::acquire(&cfg, "queue")?;
        let comment = format!("read {}", cfg_path.display());
        Ok(Done::unchanged((cfg, lock), comment))
    })?;
    rep.history_dir = Some(cfg.state_dir.clone());
    let dir = cfg.state_dir.clone();
    let events = rep.events.clone();
    let q = rep.step("stage", Check, || {
        let (input, len) = reader::open_bundle(bundle_path_in)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".abup-queue-")
            .tempfile_in(&dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        let tmp_path = tmp.path().to_path_buf();
        let progress = events.progress("stage", len);
        let mut tee = Tee {
            inner: progress.reader(input),
            out: io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut()),
        };
        let header = reader::read_header(&mut tee)
            .with_context(|| format!("reading bundle {}", bundle_path_in.display()))?;
        if cfg.trusted_keys.is_empty() {
            bail!("no trusted keys configured; add the public key that signs your bundles to keys.trusted in the config");
        }
        let keys = bundle::keys::load_verifying_keys(&cfg.trusted_keys)?;
        let key = header.verify(&keys)?;
        let m = &header.manifest;
        if m.compatible != cfg.compatible {
            bail!(
                "bundle is for {:?} but this device is {:?}; use a bundle built with --compatible {}",
                m.compatible,
                cfg.compatible,
                cfg.compatible
            );
        }
        // Every payload against its hashes, then the end marker.
        reader::check_payloads(&mut tee, &header)?;
        let mut rest = [0u8; 1];
        if tee.read(&mut rest)? != 0 {
            bail!("bundle has unexpected bytes after its end; download it again");
        }
        progress.flush();
        tee.out
            .flush()
            .with_context(|| format!("writing {}", tmp_path.display()))?;
        drop(tee);
        tmp.as_file()
            .sync_all()
            .with_context(|| format!("syncing {}", tmp_path.display()))?;
        let q = Queued {
            version: m.version.to_string(),
            bundle_sha256: header.bundle_sha256.clone(),
            queued_at: crate::state::now(),
            attempts: 0,
            last_error: None,
        };
        // Bundle first, then the record that makes it count as queued.
        tmp.persist(bundle_path(&dir))
            .with_context(|| format!("renaming the staged bundle into {}", dir.display()))?;
        q.save(&dir)?;
        let comment = format!(
            "bundle {} version {} signed by key {key} verified and queued in {}",
            &q.bundle_sha256[..12],
            q.version,
            bundle_path(&dir).display()
        );
        Ok(Done::changed(q, comment))
    })?;
    rep.report.version = Some(q.version.clone());
    rep.report.bundle_sha256 = Some(q.bundle_sha256.clone());
    rep.event(
        EventName::Pending,
        None,
        format!(
            "version {} queued; `abup apply-queued` installs it",
            q.version
        ),
    );
    Ok(())
}

/// `abup apply-queued`: install the queued bundle; keep it queued when the
/// install fails, so the next call tries again.
pub fn apply(
    cfg_path: &Path,
    state_dir: &Path,
    mut q: Queued,
    booted: Option<SlotName>,
    rep: &mut Reporter,
) -> Result<()> {
    q.attempts += 1;
    q.save(state_dir)?;
    if q.attempts > 1 {
        rep.event(
            EventName::Retrying,
            None,
            format!(
                "attempt {} to install queued version {}{}",
                q.attempts,
                q.version,
                q.last_error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" (last time: {e})"))
            ),
        );
    }
    let opts = InstallOptions {
        bundle: bundle_path(state_dir),
        booted,
        ..InstallOptions::default()
    };
    let result = install::install(cfg_path, &opts, rep);
    match &result {
        Ok(()) => {
            for f in [META, BUNDLE] {
                let p = state_dir.join(f);
                std::fs::remove_file(&p)
                    .with_context(|| format!("removing the applied {}", p.display()))?;
            }
        }
        Err(e) => {
            q.last_error = Some(format!("{e:#}"));
            q.save(state_dir)?;
        }
    }
    result
}

/// Copies everything read through it to `out`.
struct Tee<R, W> {
    inner: R,
    out: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}
