//! SIGINT, SIGTERM and SIGHUP stop a run at the next safe point.
//!
//! [`install`] replaces the signals' default action (die on the spot) with a
//! handler that only records which signal came. The long loops (writers,
//! extractor, preserve) and every step boundary call [`check`], which turns
//! a recorded signal into an [`Interrupted`] error: the run then unwinds
//! through the same guards as any other error (mounts unmounted, loop devices
//! detached, the spare left marked bad and recorded incomplete) and exits
//! with [`crate::report::EXIT_INTERRUPTED`].
//!
//! Once the flip has begun ([`flip_begun`]), signals are no longer acted on:
//! the flip is one atomic write and it completes.
//!
//! SIGHUP (a lost terminal or SSH session) is special: when the bundle comes
//! from a file, the input is intact and nobody needs to be asked anything,
//! so the run completes ([`complete_on_hangup`]); when it comes from stdin
//! the caller that feeds it is gone, so the run stops like on SIGTERM.
//! Either way `abup status` shows afterwards how the run ended.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// The last signal received, 0 for none.
static PENDING: OnceLock<Arc<AtomicUsize>> = OnceLock::new();
/// Set once the flip has begun: from then on the run completes.
static FLIPPING: AtomicBool = AtomicBool::new(false);
/// Set when a hang-up is not a reason to stop (the bundle is a file).
static IGNORE_HUP: AtomicBool = AtomicBool::new(false);
/// Set when a hang-up was received and ignored, for the last-run record.
static HUP_SEEN: AtomicBool = AtomicBool::new(false);

/// The run was stopped by a signal before the flip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted {
    pub signal: i32,
}

impl Interrupted {
    /// The signal's name, e.g. `SIGTERM`.
    pub fn name(&self) -> &'static str {
        name(self.signal)
    }
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "interrupted by {}; nothing was flipped, the booted slot and the boot settings are as before; run the install again",
            self.name()
        )
    }
}

impl std::error::Error for Interrupted {}

/// The name of one of the signals abup handles.
pub fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        signal_hook::consts::SIGKILL => "SIGKILL",
        _ => "a signal",
    }
}

/// Installs the handlers for SIGINT, SIGTERM and SIGHUP. Called once, early
/// in `main`, by verbs that change the device.
///
/// A second SIGINT or SIGTERM takes the default action (the process ends at
/// once), for a run stuck where no check is reached, such as a read from a
/// stalled stdin; the private mount namespace and self-detaching loop
/// devices still leave nothing behind.
pub fn install() -> std::io::Result<()> {
    let pending = PENDING.get_or_init(|| Arc::new(AtomicUsize::new(0)));
    let again = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_default(sig, Arc::clone(&again))?;
        signal_hook::flag::register(sig, Arc::clone(&again))?;
    }
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        signal_hook::flag::register_usize(sig, Arc::clone(pending), sig as usize)?;
    }
    Ok(())
}

/// Tells the handler that a hang-up must not stop this run (the bundle is
/// read from a file, see the module docs).
pub fn complete_on_hangup() {
    IGNORE_HUP.store(true, Ordering::SeqCst);
}

/// The signal that should stop the run now, if any.
pub fn pending() -> Option<i32> {
    let sig = PENDING.get()?.load(Ordering::SeqCst) as i32;
    if sig == 0 || FLIPPING.load(Ordering::SeqCst) {
        return None;
    }
    if sig == SIGHUP && IGNORE_HUP.load(Ordering::SeqCst) {
        HUP_SEEN.store(true, Ordering::SeqCst);
        return None;
    }
    Some(sig)
}

/// Whether any handled signal has arrived, acted on or not.
pub fn received() -> bool {
    PENDING.get().is_some_and(|p| p.load(Ordering::SeqCst) != 0)
}

/// Whether a hang-up came and was ignored because the run completes anyway.
pub fn hangup_ignored() -> bool {
    HUP_SEEN.load(Ordering::SeqCst)
        || (IGNORE_HUP.load(Ordering::SeqCst)
            && PENDING
                .get()
                .is_some_and(|p| p.load(Ordering::SeqCst) as i32 == SIGHUP))
}

/// Returns [`Interrupted`] if a signal asks the run to stop.
pub fn check() -> anyhow::Result<()> {
    match pending() {
        Some(signal) => Err(Interrupted { signal }.into()),
        None => Ok(()),
    }
}

/// [`check`] for code behind a `Read`: the [`Interrupted`] travels inside
/// the `io::Error`, where [`interrupted_by`] finds it.
pub fn check_io() -> std::io::Result<()> {
    match pending() {
        Some(signal) => Err(std::io::Error::other(Interrupted { signal })),
        None => Ok(()),
    }
}

/// Marks the start of the flip: signals no longer stop the run.
pub fn flip_begun() {
    FLIPPING.store(true, Ordering::SeqCst);
}

/// Whether the flip has begun.
pub fn flipping() -> bool {
    FLIPPING.load(Ordering::SeqCst)
}

/// The signal that stopped a run, from its error chain.
pub fn interrupted_by(err: &anyhow::Error) -> Option<Interrupted> {
    err.chain().find_map(|e| {
        e.downcast_ref::<Interrupted>().copied().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<Interrupted>())
                .copied()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_is_found_under_context() {
        let e = anyhow::Error::from(Interrupted { signal: SIGTERM }).context("writing rootfs");
        assert_eq!(interrupted_by(&e).map(|i| i.name()), Some("SIGTERM"));
        assert!(format!("{e:#}").contains("interrupted by SIGTERM"));
        assert_eq!(interrupted_by(&anyhow::anyhow!("other")), None);
        // Through a reader: inside an io::Error, under context.
        let io = std::io::Error::other(Interrupted { signal: SIGINT });
        let e = anyhow::Error::from(io).context("reading the payload for /dev/x");
        assert_eq!(interrupted_by(&e).map(|i| i.name()), Some("SIGINT"));
        let plain = anyhow::Error::from(std::io::Error::other("bad chunk"));
        assert_eq!(interrupted_by(&plain), None);
    }
}
