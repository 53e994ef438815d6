//! The install transaction, as a short sequence of named steps.
//!
//! Nothing is written before the checks return a [`Plan`]. Then: the spare
//! slot is marked bad (and its record set to incomplete) before it is
//! touched; the payload is streamed onto it and verified; preserved paths are
//! copied in and the image's migrations run; the slot's record is written;
//! and only then is the spare made primary — the only flip, and the last write.

use crate::bundle::manifest::{Manifest, Payload, PayloadKind, ROOTFS};
use crate::bundle::parallel::{parallel_payload_reader, ParallelChunks};
use crate::bundle::reader::{
    open_bundle, read_header, read_trailer, BundleHeader, BundleStream, PayloadReader,
};
use crate::config::SystemConfig;
use crate::events::{EventName, Events};
use crate::lock::RunLock;
use crate::mount::TempMount;
use crate::report::{Done, FlipUnconfirmed, Reporter, StepKind::*};
use crate::slot::SlotName;
use crate::state::{self, Content, SlotRecord};
use crate::system::{self, System};
use crate::write::pipeline::{BlockRead, ReadAhead};
use crate::{bundle, migrate, seal, write};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// What the user asked for.
#[derive(Clone, Debug, Default)]
pub struct InstallOptions {
    /// The bundle file, or `-` for stdin.
    pub bundle: PathBuf,
    pub allow_downgrade: bool,
    /// Rewrite the slot even if it already holds this bundle.
    pub force: bool,
    /// Stop before the flip.
    pub no_activate: bool,
    /// The slot to write; required when not booted from A or B.
    pub target: Option<SlotName>,
    /// Overrides booted-slot detection.
    pub booted: Option<SlotName>,
    /// `abup check`: run every check, read the whole bundle against its
    /// hashes, and write nothing (no lock file, no record, no history).
    pub check_only: bool,
}

/// The validated decision of what to do, made before any write.
#[derive(Debug)]
pub struct Plan {
    pub target: SlotName,
    /// The target already holds this exact bundle: skip to the flip.
    pub already_installed: bool,
}

/// Runs the install transaction, reporting each step to `rep`, and ends
/// with the `updated` or `failed` event.
pub fn install(cfg_path: &Path, opts: &InstallOptions, rep: &mut Reporter) -> Result<()> {
    let result = transaction(cfg_path, opts, rep);
    let slot = rep.report.target_slot.clone();
    match &result {
        _ if opts.check_only => {}
        Ok(()) => rep.event(EventName::Updated, slot, "install finished"),
        Err(e) => rep.event(EventName::Failed, slot, format!("{e:#}")),
    }
    result
}

fn transaction(cfg_path: &Path, opts: &InstallOptions, rep: &mut Reporter) -> Result<()> {
    let (cfg, _lock) = rep.step("load-config", Check, || {
        system::require_root("abup install")?;
        let cfg = SystemConfig::load(cfg_path)?;
        state::refuse_on_slot(&cfg)?;
        if opts.check_only {
            return Ok(Done::unchanged(
                (cfg, None),
                format!("read {}", cfg_path.display()),
            ));
        }
        let lock = RunLock::acquire(&cfg, "install")?;
        let comment = format!(
            "read {}; holding {}",
            cfg_path.display(),
            lock.path.display()
        );
        Ok(Done::unchanged((cfg, Some(lock)), comment))
    })?;
    if !opts.check_only {
        rep.history_dir = Some(cfg.state_dir.clone());
    }
    let (input, header) = rep.step("verify-bundle", Check, || {
        open_and_verify(&cfg, &opts.bundle)
    })?;
    let manifest = header.manifest.clone();
    rep.report.version = Some(manifest.version.to_string());
    rep.report.bundle_sha256 = Some(header.bundle_sha256.clone());
    let mut sys = rep.step("inspect-system", Check, || {
        // Before the disk is opened and long before "is the slot mounted?".
        let cleaned = match opts.check_only {
            true => Vec::new(),
            false => crate::leftovers::clean(&cfg.disk),
        };
        let mut sys = System::open(cfg, opts.booted)?;
        let booted = sys
            .booted
            .map_or("none (rescue system)".to_string(), |b| b.to_string());
        let mut comment = format!("booted slot: {booted}");
        let settled = match opts.check_only {
            true => Vec::new(),
            false => crate::bootfiles::settle(&mut sys)?,
        };
        let fell_back = match opts.check_only {
            true => None,
            false => migrate::data::settle(&sys)?,
        };
        for c in cleaned.into_iter().chain(settled).chain(fell_back) {
            comment = format!("{comment}; {c}");
        }
        Ok(Done::unchanged(sys, comment))
    })?;
    rep.report.booted_slot = sys.booted.map(|b| b.to_string());
    for e in crate::history::detect(&sys) {
        rep.event(e.name, e.slot.clone(), e.message);
    }
    let Input { reader, file_len } = input;
    if opts.check_only {
        let plan = rep.step("check", Check, || {
            check_all(&mut sys, &header, opts, file_len)
        })?;
        rep.report.target_slot = Some(plan.target.to_string());
        let events = rep.events.clone();
        return rep.step("verify-payload", Check, || {
            verify_payloads(reader, &header, &events)
        });
    }
    let (plan, rootfs) = rep.step("check", Check, || {
        let done = check_all(&mut sys, &header, opts, file_len)?;
        if done.value.already_installed {
            return Ok(Done {
                value: (done.value, None),
                state: done.state,
                comment: done.comment,
            });
        }
        // The first chunk is read and checked against the signed hash list
        // here, before anything is written: a corrupt or spliced stream is
        // refused before the spare is marked bad.
        let rootfs: RootfsReader = parallel_payload_reader(reader, &header, ROOTFS)?;
        Ok(Done {
            value: (done.value, Some(rootfs)),
            state: done.state,
            comment: format!(
                "{}; first chunk of the rootfs payload verified",
                done.comment
            ),
        })
    })?;
    rep.report.target_slot = Some(plan.target.to_string());
    let target = plan.target;
    announce(rep, &plan, opts, &header);

    if let (false, Some(reader)) = (plan.already_installed, rootfs) {
        rep.step("mark-bad", Write, || mark_bad(&mut sys, target, &header))?;
        let payload = manifest.rootfs().clone();
        let events = rep.events.clone();
        let (new_root, ahead) = rep.step("write", Write, || {
            // Reading and checking chunks run on their own threads, and
            // decompression on others, while this one writes.
            let mut ahead = if reader.decodes_ahead() {
                ReadAhead::inline(reader)
            } else {
                ReadAhead::start(reader).context("starting the decompression thread")?
            };
            let progress = events.progress("write", Some(payload.size));
            let done = write_payload(&sys, target, &payload, &mut progress.reader(&mut ahead))?;
            progress.flush();
            Ok(Done {
                value: (done.value, ahead),
                state: done.state,
                comment: done.comment,
            })
        })?;
        // Finishing drains and checks the payload; the step reports it.
        let finished = ahead
            .into_inner()
            .map_err(anyhow::Error::from)
            .and_then(|reader| reader.finish())
            .and_then(|stored| Ok(stored.into_inner()?));
        let new_boot = rep.step("verify", Write, || {
            let mut stream = finished?;
            let boot = crate::bootfiles::read_payload(&mut stream, &header)?;
            read_trailer(&mut stream)?;
            Ok(Done::unchanged(
                boot,
                format!(
                    "{} chunks of stored bytes matched the signed hash list; {} bytes uncompressed as declared; end marker read",
                    payload.chunk_count(),
                    payload.size,
                ),
            ))
        })?;
        let new_root = rep.step("preserve", Write, || {
            migrate::preserve_step(&sys, target, new_root)
        })?;
        rep.step("migrate", Write, || {
            migrate::migrate_step(&sys, target, &manifest.version.to_string(), new_root)
        })?;
        rep.step("boot-files", Write, || {
            boot_files(&mut sys, target, new_boot.as_ref(), opts.no_activate)
        })?;
        rep.step("record", Write, || {
            if payload.kind == PayloadKind::Tar {
                seal::write(&sys.slot(target).dev.path, &header.bundle_sha256)?;
            }
            record(&sys, target, &header, opts.no_activate)
        })?;
    } else {
        let why = format!(
            "slot {target} already holds bundle {} (version {}); pass --force to rewrite it",
            short(&header.bundle_sha256),
            manifest.version
        );
        for step in ["mark-bad", "write", "verify", "preserve", "migrate"] {
            rep.skip(step, &why);
        }
        rep.step("boot-files", Write, || {
            boot_files(&mut sys, target, None, opts.no_activate)
        })?;
        rep.skip("record", &why);
    }

    if opts.no_activate {
        rep.skip(
            "activate",
            &format!("--no-activate: slot {target} stays inactive; run `abup mark-active {target}` to boot it"),
        );
        return Ok(());
    }
    rep.step("activate", Write, || activate(&mut sys, target))?;
    rep.report.activated_slot = Some(target.to_string());
    Ok(())
}

/// `abup check`: every chunk of every payload, the decompressed sizes and
/// hashes and the end marker, read and checked; nothing written.
fn verify_payloads(
    reader: BundleStream,
    header: &BundleHeader,
    events: &Events,
) -> Result<Done<()>> {
    let stored: u64 = header.manifest.payloads.iter().map(|p| p.stored_size).sum();
    let progress = events.progress("verify-payload", Some(stored));
    crate::bundle::reader::check_payloads(&mut progress.reader(reader), header)?;
    progress.flush();
    Ok(Done::unchanged(
        (),
        format!(
            "{stored} stored bytes matched the signed hash lists, sizes and hashes as declared; nothing written"
        ),
    ))
}

/// The `pending` event, and `forcing` when a policy is overridden.
fn announce(rep: &mut Reporter, plan: &Plan, opts: &InstallOptions, header: &BundleHeader) {
    let slot = Some(plan.target.to_string());
    let v = &header.manifest.version;
    rep.event(
        EventName::Pending,
        slot.clone(),
        format!("installing version {v} into slot {}", plan.target),
    );
    if opts.force && !plan.already_installed {
        rep.event(
            EventName::Forcing,
            slot.clone(),
            "--force: rewriting the slot whatever it holds",
        );
    }
    if opts.allow_downgrade {
        rep.event(
            EventName::Forcing,
            slot,
            "--allow-downgrade: the version policy does not apply",
        );
    }
}

/// The bundle stream and how many bytes the file holds, when it is a file.
pub struct Input {
    reader: BundleStream,
    file_len: Option<u64>,
}

/// The rootfs payload's decompressed bytes, from chunks checked on other
/// threads.
type RootfsReader = PayloadReader<ParallelChunks<BundleStream>>;

fn open_and_verify(cfg: &SystemConfig, bundle: &Path) -> Result<Done<(Input, BundleHeader)>> {
    if bundle != Path::new("-") {
        // The input survives a lost terminal: finish rather than stop.
        crate::signal::complete_on_hangup();
    }
    let (reader, file_len) = open_bundle(bundle)?;
    let mut input = Input { reader, file_len };
    let header = read_header(&mut input.reader)
        .with_context(|| format!("reading bundle {}", bundle.display()))?;
    if cfg.trusted_keys.is_empty() {
        bail!("no trusted keys configured; add the public key that signs your bundles to keys.trusted in the config");
    }
    let keys = bundle::keys::load_verifying_keys(&cfg.trusted_keys)?;
    let key_id = header.verify(&keys)?;
    let comment = format!(
        "bundle {} version {} for {:?}, signed by key {key_id}",
        short(&header.bundle_sha256),
        header.manifest.version,
        header.manifest.compatible
    );
    Ok(Done::unchanged((input, header), comment))
}

/// [`check`], then whether the bundle's boot files can go on the boot
/// partition (read only).
fn check_all(
    sys: &mut System,
    header: &BundleHeader,
    opts: &InstallOptions,
    file_len: Option<u64>,
) -> Result<Done<Plan>> {
    let mut done = check(sys, header, opts, file_len)?;
    if let Some(fits) = crate::bootfiles::check(sys, header)? {
        done.comment = format!("{}; {fits}", done.comment);
    }
    Ok(done)
}

/// Every sanity check, in order; returns the plan or the first refusal.
fn check(
    sys: &System,
    header: &BundleHeader,
    opts: &InstallOptions,
    file_len: Option<u64>,
) -> Result<Done<Plan>> {
    let m: &Manifest = &header.manifest;
    if m.compatible != sys.cfg.compatible {
        bail!(
            "bundle is for {:?} but this device is {:?}; use a bundle built with --compatible {}",
            m.compatible,
            sys.cfg.compatible,
            sys.cfg.compatible
        );
    }
    if let Some(len) = file_len {
        let want = header.layout.length;
        if len < want {
            bail!("bundle is truncated: the manifest declares {want} bytes but the file has {len}; download it again");
        }
        if len > want {
            bail!(
                "bundle has {} unexpected bytes after its end; download it again",
                len - want
            );
        }
    }
    let target = match (sys.booted, opts.target) {
        (Some(b), Some(t)) if t == b => bail!(
            "slot {t} is the booted slot; abup only writes the other slot ({})",
            b.other()
        ),
        (_, Some(t)) => t,
        (Some(b), None) => b.other(),
        (None, None) => bail!(
            "the running system was not booted from slot A or B (a rescue system?); name the slot to write with --target-slot A or B"
        ),
    };
    let slot = sys.slot(target);
    if let Some(at) = sys.disk.mount_point(&slot.part, &slot.dev)? {
        bail!(
            "slot {target} ({}) is mounted at {}; unmount it first",
            slot.dev.path.display(),
            at.display()
        );
    }
    // Every boot variable is valid before anything is written (a block
    // abup could not write back is refused here, not at mark-bad).
    sys.boot.backend.state(target)?;
    let records = sys.records()?;
    // The version policy compares against the running system, or in a
    // rescue system against the slot the bootloader would start.
    let reference = match sys.booted {
        Some(b) => Some(b),
        None => sys.boot.backend.primary()?,
    }
    .filter(|r| *r != target);
    let current = reference
        .and_then(|r| records.get(r))
        .filter(|r| r.content == Content::Installed)
        .map(|r| semver::Version::parse(&r.version))
        .transpose()
        .context("reading the recorded version of the running slot")?;
    let version_note = match &current {
        Some(cur) if !is_newer(&m.version, cur) && !opts.allow_downgrade => bail!(
            "bundle version {} is not newer than the running version {cur}{}; pass --allow-downgrade to install it anyway",
            m.version,
            if m.version.cmp_precedence(cur).is_eq() && m.version != *cur {
                " (build metadata after '+' does not make a version newer)"
            } else {
                ""
            }
        ),
        Some(cur) => format!("version {} (running {cur})", m.version),
        None => format!("version {} (running version unknown)", m.version),
    };
    let payload = m.rootfs();
    let need = needed_bytes(payload, slot.part.size);
    if need.is_none_or(|need| need > slot.part.size) {
        let need = need.map_or("more than 2^64".to_string(), |n| n.to_string());
        bail!(
            "payload needs {need} bytes but slot {target} ({}) has {}; use a larger partition or a smaller image",
            slot.dev.path.display(),
            slot.part.size
        );
    }
    // The record alone is not trusted: the slot must show it, too.
    let recorded = !opts.force
        && records.get(target).is_some_and(|r| {
            r.content == Content::Installed && r.bundle_sha256 == header.bundle_sha256
        });
    let already_installed =
        recorded && seal::holds(&slot.dev.path, m.rootfs(), &header.bundle_sha256)?;
    Ok(Done::unchanged(
        Plan {
            target,
            already_installed,
        },
        format!(
            "compatible {:?}, {version_note}, target slot {target} ({}) free and large enough{}",
            m.compatible,
            slot.dev.path.display(),
            if recorded && !already_installed {
                "; its record names this bundle but the slot does not show it: writing it again"
            } else {
                ""
            }
        ),
    ))
}

/// SemVer 2.0 precedence (§11): build metadata is ignored, so
/// `1.0.0+build.9` is not newer than `1.0.0`. (`Version`'s `Ord` orders
/// build metadata too, for sorting; it must not decide upgrades.)
fn is_newer(new: &semver::Version, current: &semver::Version) -> bool {
    new.cmp_precedence(current).is_gt()
}

/// Bytes of the slot a payload needs: a raw image its size; a tarball its
/// files plus room for the filesystem's own structures (inode tables and
/// journal, about 5% and a few MiB). `None` when the sum does not fit a
/// u64 (a hostile `installed_size`), which no slot can hold.
fn needed_bytes(p: &Payload, slot_size: u64) -> Option<u64> {
    match p.kind {
        PayloadKind::Raw => Some(p.size),
        PayloadKind::Tar => p
            .installed_size
            .unwrap_or(p.size)
            .checked_add(slot_size / 20)?
            .checked_add(8 << 20),
    }
}

fn mark_bad(sys: &mut System, target: SlotName, header: &BundleHeader) -> Result<Done<()>> {
    let was_ok = !sys.boot.backend.is_marked_bad(target)?;
    // A slot the environment already marks bad needs no write (which would
    // remount the boot partition read-write for nothing).
    if was_ok {
        sys.backend()?
            .set_state(target, crate::boot::BootState::Bad)?;
    }
    sys.store.update(target, |r| {
        *r = Some(slot_record(header, Content::Incomplete))
    })?;
    let how = if was_ok {
        "marked bad"
    } else {
        "was already marked bad"
    };
    Ok(Done::changed(
        (),
        format!(
            "slot {target} {how} in {}; its record set to incomplete",
            sys.boot.backend.name()
        ),
    ))
}

/// Streams the payload onto the slot. Returns the mounted new root for
/// tarball payloads.
fn write_payload(
    sys: &System,
    target: SlotName,
    payload: &Payload,
    reader: &mut dyn BlockRead,
) -> Result<Done<Option<TempMount>>> {
    let dev = &sys.slot(target).dev.path;
    let start = std::time::Instant::now();
    let (what, mount) = match payload.kind {
        PayloadKind::Raw => {
            let capacity = write::device_size(dev)?;
            let s = write::write_image(reader, dev, capacity, Some(payload.size))?;
            (format!("{} bytes ({})", s.bytes, s.describe()), None)
        }
        PayloadKind::Tar => {
            let (m, s) = write::tar::write_tar(reader, dev, &fs_label(sys, target))?;
            let what = format!("{} files ({} bytes of file data)", s.files, s.bytes);
            (what, Some(m))
        }
    };
    let secs = start.elapsed().as_secs_f64();
    Ok(Done::changed(
        mount,
        format!(
            "{} payload ({}) written to {}: {what} in {secs:.1} s",
            payload.kind,
            payload.compression,
            dev.display(),
        ),
    ))
}

/// The ext4 label of a freshly formatted slot: `abup-A` / `abup-B`, what
/// the shipped grub.cfg searches for.
fn fs_label(_sys: &System, target: SlotName) -> String {
    crate::boot::grubslot::fs_label(target)
}

/// Makes the written slot findable by the bootloader's shipped config and
/// checks it holds what that config boots (the last check before the flip).
/// Then installs the bundle's files for the shared boot partition, if it
/// has any, as one transaction ([`crate::bootfiles`]).
fn boot_files(
    sys: &mut System,
    target: SlotName,
    new: Option<&crate::bootfiles::NewFiles>,
    no_activate: bool,
) -> Result<Done<()>> {
    let dev = &sys.slot(target).dev.path;
    let mut comment = sys.boot.backend.prepare_slot(target, dev)?;
    if let Some(files) = new {
        let opened = crate::bootfiles::open(sys, true)?
            .context("the bundle carries boot files but the config has no [boot_files]")?;
        let done = match no_activate {
            true => opened.stage(target, files),
            false => opened.install(target, files),
        }
        .context("updating the boot files")?;
        comment = format!("{comment}; {done}");
    }
    Ok(Done::changed((), comment))
}

/// The record of a slot holding (or being written with) `header`'s bundle.
fn slot_record(header: &BundleHeader, content: Content) -> SlotRecord {
    SlotRecord {
        content,
        version: header.manifest.version.to_string(),
        compatible: header.manifest.compatible.clone(),
        bundle_sha256: header.bundle_sha256.clone(),
        installed_at: state::now(),
        good: false,
        inactive: false,
        extra: Default::default(),
    }
}

fn record(
    sys: &System,
    target: SlotName,
    header: &BundleHeader,
    no_activate: bool,
) -> Result<Done<()>> {
    sys.store.update(target, |r| {
        *r = Some(SlotRecord {
            inactive: no_activate,
            ..slot_record(header, Content::Installed)
        })
    })?;
    Ok(Done::changed(
        (),
        format!(
            "slot {target} recorded as version {}",
            header.manifest.version
        ),
    ))
}

/// The flip: makes `target` primary with a fresh try counter. Once begun it
/// completes (signals no longer stop the run); an error once the new
/// settings may be in place is reported as [`FlipUnconfirmed`].
fn activate(sys: &mut System, target: SlotName) -> Result<Done<()>> {
    let before = (sys.boot.backend.primary()?, sys.boot.backend.state(target)?);
    crate::signal::flip_begun();
    if let Err(e) = sys.backend()?.set_primary(target) {
        let now = sys.boot.backend.primary().ok().flatten();
        let flipped = e.downcast_ref::<crate::util::Replaced>().is_some()
            || (now == Some(target) && before.0 != Some(target));
        return Err(if flipped {
            e.context(FlipUnconfirmed)
        } else {
            e
        });
    }
    let after = (sys.boot.backend.primary()?, sys.boot.backend.state(target)?);
    let tries = after
        .1
        .tries_left
        .map_or(String::new(), |t| format!(" with {t} tries"));
    let comment =
        format!("slot {target} is primary{tries}; reboot to start it, then run `abup mark-good`");
    Ok(if before == after {
        Done::unchanged((), comment)
    } else {
        Done::changed((), comment)
    })
}

fn short(hex: &str) -> &str {
    &hex[..hex.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_policy_follows_semver_precedence() {
        let v = |s: &str| semver::Version::parse(s).unwrap();
        // Build metadata has no precedence, in either direction.
        assert!(!is_newer(&v("1.0.0+build.9"), &v("1.0.0")));
        assert!(!is_newer(&v("1.0.0"), &v("1.0.0+build.9")));
        assert!(!is_newer(&v("1.0.0+b"), &v("1.0.0+a")));
        // A pre-release comes before its release; numeric identifiers
        // compare as numbers.
        assert!(!is_newer(&v("1.0.0-rc.1"), &v("1.0.0")));
        assert!(is_newer(&v("1.0.0"), &v("1.0.0-rc.1")));
        assert!(is_newer(&v("1.0.0-rc.10"), &v("1.0.0-rc.9")));
        assert!(is_newer(&v("1.0.0-rc.1"), &v("1.0.0-beta.11")));
        assert!(is_newer(&v("1.10.0"), &v("1.9.99")));
        assert!(is_newer(&v("1.0.1+a"), &v("1.0.0+z")));
    }
}
