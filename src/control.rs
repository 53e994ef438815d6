//! The verbs that read or steer slots without installing: `status`,
//! `mark-good`, `mark-bad`, `mark-active` and `rollback`.
//!
//! Each loads the system, changes at most one slot through the boot backend
//! and its record, and says what it did in one line.

use crate::boot::BootState;
use crate::migrate::data;
use crate::slot::SlotName;
use crate::state::Content;
use crate::system::{Status, System};
use anyhow::{bail, Result};

/// Prints the status as text for a person.
pub fn format_status(st: &Status) -> String {
    let name = |s: Option<SlotName>| s.map_or("none".to_string(), |s| s.to_string());
    let mut out = format!(
        "compatible: {}\nbooted:     {}\nprimary:    {}\nbackend:    {}\n",
        st.compatible,
        name(st.booted),
        name(st.primary),
        st.backend
    );
    for (slot, s) in &st.slots {
        let mut flags = Vec::new();
        if st.booted.map(|b| b.to_string()).as_deref() == Some(slot.as_str()) {
            flags.push("booted");
        }
        if st.primary.map(|b| b.to_string()).as_deref() == Some(slot.as_str()) {
            flags.push("primary");
        }
        out += &format!(
            "slot {slot}: {}{}\n  version: {}\n  bundle:  {}\n  device:  {} (PARTLABEL={}, PARTUUID={})\n",
            s.state,
            if flags.is_empty() {
                String::new()
            } else {
                format!(" ({})", flags.join(", "))
            },
            s.version.as_deref().unwrap_or("unknown"),
            s.bundle_sha256.as_deref().unwrap_or("unknown"),
            s.device,
            s.partlabel,
            s.partuuid
        );
        if let Some(t) = s.tries_left {
            out += &format!("  tries left: {t}\n");
        }
        if let Some(why) = &s.unfindable {
            out += &format!("  not bootable: {why}\n");
        }
    }
    for w in &st.warnings {
        out += &format!("warning: {w}\n");
    }
    if let Some(r) = &st.running {
        out += &format!("run in progress: {r}\n");
    }
    if let Some(l) = &st.last_run {
        out += &format!(
            "last run: {}\n",
            crate::runlog::describe(l, st.running.is_some())
        );
    }
    if let Some(p) = &st.pending_data {
        out += &format!(
            "staged data: for slot {} (version {}): {}; committed by `abup mark-good` of slot {}, discarded if it falls back\n",
            p.slot,
            p.version,
            p.entries.join(", "),
            p.slot
        );
    }
    out
}

/// `mark-good`: the slot booted fine; make it bootable with a fresh counter
/// and record that it was blessed.
pub fn mark_good(sys: &mut System, slot: SlotName) -> Result<String> {
    refuse_incomplete(sys, slot)?;
    set_state(sys, slot, BootState::Good)?;
    let staged = data::commit(sys, slot)?;
    Ok(data::with_note(format!("slot {slot} marked good"), staged))
}

/// `mark-bad`: the bootloader must not boot the slot.
pub fn mark_bad(sys: &mut System, slot: SlotName) -> Result<String> {
    set_state(sys, slot, BootState::Bad)?;
    let staged = data::discard(sys, slot, "marked bad")?;
    Ok(data::with_note(format!("slot {slot} marked bad"), staged))
}

/// `mark-active`: boot the slot next, with a fresh try counter.
pub fn mark_active(sys: &mut System, slot: SlotName) -> Result<String> {
    refuse_incomplete(sys, slot)?;
    sys.backend()?.set_primary(slot)?;
    sys.store.update(slot, |r| {
        if let Some(r) = r {
            r.inactive = false;
        }
    })?;
    Ok(format!("slot {slot} is now primary"))
}

/// Sets the slot's state in the bootloader and whether its record is blessed.
fn set_state(sys: &mut System, slot: SlotName, state: BootState) -> Result<()> {
    sys.backend()?.set_state(slot, state)?;
    sys.store.update(slot, |r| {
        if let Some(r) = r {
            r.good = state == BootState::Good;
            r.inactive = false;
        }
    })
}

/// Refuses to make a slot bootable when an install into it was interrupted.
fn refuse_incomplete(sys: &System, slot: SlotName) -> Result<()> {
    if sys
        .records()?
        .get(slot)
        .is_some_and(|r| r.content == Content::Incomplete)
    {
        bail!("slot {slot} holds an incomplete install; install a bundle into it first");
    }
    Ok(())
}

/// `rollback`: make the other slot primary, if it holds a good install.
pub fn rollback(sys: &mut System) -> Result<String> {
    // Relative to the booted slot; in a rescue system, to the primary one.
    let from = match sys.booted {
        Some(b) => b,
        None => match sys.boot.backend.primary()? {
            Some(p) => p,
            None => bail!("no slot is bootable and none is booted; use mark-active A or B"),
        },
    };
    let to = from.other();
    let st = sys.status()?;
    let state = st.slots[to.as_str()].state;
    if state != "good" {
        bail!(
            "slot {to} holds no good install (state {state}); rollback needs a good slot to return to"
        );
    }
    sys.backend()?.set_primary(to)?;
    let staged = data::discard(sys, from, "rolled back from it")?;
    Ok(data::with_note(
        format!("slot {to} is now primary; reboot to start it"),
        staged,
    ))
}
