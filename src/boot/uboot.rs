//! U-Boot boot backend: RAUC's U-Boot variables in the U-Boot environment
//! ([`super::ubootenv`]), so a RAUC boot script keeps working.
//!
//! | variable                     | meaning                                         |
//! |------------------------------|-------------------------------------------------|
//! | `BOOT_ORDER`                 | slots to try, space separated, primary first     |
//! | `BOOT_A_LEFT`, `BOOT_B_LEFT` | boot attempts left (0–9); the script decrements |
//!
//! A slot is bootable when it is in `BOOT_ORDER` and has attempts left; the
//! primary is the first such slot. Setting the primary is one environment
//! write (`BOOT_ORDER` and the counter together). The bootloader half is
//! `boot-backends/uboot/boot.cmd`; its README states the contract, including
//! how the script drops a slot that used up its tries from `BOOT_ORDER` so
//! that it is never booted again (no boot-loop after a fallback).

use crate::boot::ubootenv::{EnvStore, Vars};
use crate::boot::{BootBackend, BootSlotInfo, BootState};
use crate::slot::SlotName;
use anyhow::{bail, Result};

/// The U-Boot backend over one environment store.
pub struct UbootBackend {
    store: EnvStore,
    tries: u32,
}

fn left_var(slot: SlotName) -> String {
    format!("BOOT_{slot}_LEFT")
}

impl UbootBackend {
    /// Opens the environment and checks it can be read, so a corrupt or
    /// missing environment stops a run before anything is written.
    pub fn open(store: EnvStore, tries: u32) -> Result<UbootBackend> {
        let b = UbootBackend { store, tries };
        let mut vars = b.store.load()?.vars;
        b.order(&vars)?;
        for s in [SlotName::A, SlotName::B] {
            b.left(&vars, s)?;
            vars.insert(left_var(s), "9".into());
        }
        // The largest environment abup can write must fit, so a full
        // environment is refused here, before an install writes anything.
        vars.insert("BOOT_ORDER".into(), "A B".into());
        crate::boot::ubootenv::encode(&vars, b.store.size, Some(0))?;
        Ok(b)
    }

    /// The slots in `BOOT_ORDER`, refusing values the script would misread.
    fn order(&self, vars: &Vars) -> Result<Vec<SlotName>> {
        let raw = vars.get("BOOT_ORDER").map(String::as_str).unwrap_or("");
        let mut order = Vec::new();
        for w in raw.split_whitespace() {
            let s: SlotName = w.parse().map_err(|_| {
                anyhow::anyhow!(
                    "BOOT_ORDER={raw:?} in {} names {w:?}, not A or B; fix it with \
                     fw_setenv BOOT_ORDER \"A B\"",
                    self.store.describe()
                )
            })?;
            if order.contains(&s) {
                bail!(
                    "BOOT_ORDER={raw:?} in {} names {s} twice; fix it with fw_setenv",
                    self.store.describe()
                );
            }
            order.push(s);
        }
        Ok(order)
    }

    fn left(&self, vars: &Vars, slot: SlotName) -> Result<u32> {
        let name = left_var(slot);
        match vars.get(&name) {
            None => Ok(0),
            Some(v) => match v.parse::<u32>() {
                Ok(n) if n <= 9 && v.len() == 1 => Ok(n),
                _ => bail!(
                    "{name}={v:?} in {} is not a count from 0 to 9; fix it with fw_setenv {name} 0",
                    self.store.describe()
                ),
            },
        }
    }

    /// Loads, applies `change` to the variables and stores them, unless
    /// nothing changed (a no-op writes nothing).
    fn edit(&mut self, change: impl FnOnce(&Self, &mut Vars) -> Result<()>) -> Result<()> {
        let loaded = self.store.load()?;
        let mut vars = loaded.vars.clone();
        change(self, &mut vars)?;
        if vars != loaded.vars {
            self.store.store(&loaded, &vars)?;
        }
        Ok(())
    }

    fn set_order(vars: &mut Vars, order: &[SlotName]) {
        let text: Vec<String> = order.iter().map(|s| s.to_string()).collect();
        vars.insert("BOOT_ORDER".into(), text.join(" "));
    }
}

impl BootBackend for UbootBackend {
    fn name(&self) -> &'static str {
        "uboot"
    }

    fn primary(&self) -> Result<Option<SlotName>> {
        let vars = self.store.load()?.vars;
        for s in self.order(&vars)? {
            if self.left(&vars, s)? > 0 {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    fn set_primary(&mut self, slot: SlotName) -> Result<()> {
        let tries = self.tries;
        self.edit(|b, vars| {
            let mut order = b.order(vars)?;
            order.retain(|&s| s != slot);
            order.insert(0, slot);
            Self::set_order(vars, &order);
            vars.insert(left_var(slot), tries.to_string());
            Ok(())
        })
    }

    /// What boot.cmd boots: the first slot in `BOOT_ORDER` with tries left;
    /// when none has any, the first in `BOOT_ORDER` without counting, and
    /// with `BOOT_ORDER` empty, A. (boot.cmd does not skip a slot whose
    /// kernel is missing: it stops there.)
    fn next_boot(&self, _findable: &dyn Fn(SlotName) -> bool) -> Result<Option<SlotName>> {
        let vars = self.store.load()?.vars;
        if let Some(s) = self.primary()? {
            return Ok(Some(s));
        }
        Ok(Some(
            self.order(&vars)?.first().copied().unwrap_or(SlotName::A),
        ))
    }

    fn state(&self, slot: SlotName) -> Result<BootSlotInfo> {
        let vars = self.store.load()?.vars;
        let left = self.left(&vars, slot)?;
        Ok(BootSlotInfo {
            ok: self.order(&vars)?.contains(&slot) && left > 0,
            tries_left: Some(left),
        })
    }

    fn set_state(&mut self, slot: SlotName, state: BootState) -> Result<()> {
        let tries = self.tries;
        self.edit(|b, vars| {
            let mut order = b.order(vars)?;
            match state {
                BootState::Good => {
                    if !order.contains(&slot) {
                        order.push(slot);
                    }
                    vars.insert(left_var(slot), tries.to_string());
                }
                BootState::Bad => {
                    order.retain(|&s| s != slot);
                    vars.insert(left_var(slot), "0".into());
                }
            }
            Self::set_order(vars, &order);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::ubootenv::{encode, FileCopy};
    use std::path::Path;

    fn store_at(path: &Path, vars: &[(&str, &str)]) -> EnvStore {
        let v: Vars = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        std::fs::write(path, encode(&v, 0x400, None).unwrap()).unwrap();
        EnvStore::new(
            0x400,
            vec![Box::new(FileCopy {
                path: path.into(),
                offset: 0,
            })],
        )
        .unwrap()
    }

    #[test]
    fn rauc_variables() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("env");
        let store = store_at(
            &p,
            &[
                ("BOOT_ORDER", "A B"),
                ("BOOT_A_LEFT", "3"),
                ("BOOT_B_LEFT", "0"),
            ],
        );
        let mut b = UbootBackend::open(store, 3).unwrap();
        assert_eq!(b.primary().unwrap(), Some(SlotName::A));
        assert!(!b.state(SlotName::B).unwrap().ok);
        b.set_state(SlotName::B, BootState::Bad).unwrap();
        let vars = b.store.load().unwrap().vars;
        assert_eq!(vars["BOOT_ORDER"], "A");
        b.set_primary(SlotName::B).unwrap();
        let vars = b.store.load().unwrap().vars;
        assert_eq!(vars["BOOT_ORDER"], "B A");
        assert_eq!(vars["BOOT_B_LEFT"], "3");
        assert_eq!(b.primary().unwrap(), Some(SlotName::B));
        // The script used all of B's tries: A boots next.
        let loaded = b.store.load().unwrap();
        let mut v = loaded.vars.clone();
        v.insert("BOOT_B_LEFT".into(), "0".into());
        b.store.store(&loaded, &v).unwrap();
        assert_eq!(b.primary().unwrap(), Some(SlotName::A));
        let any = |_: SlotName| true;
        assert_eq!(b.next_boot(&any).unwrap(), Some(SlotName::A));
        // No tries left anywhere: boot.cmd boots the first in BOOT_ORDER
        // without counting, and A when BOOT_ORDER is empty.
        for (order, next) in [
            ("B A", SlotName::B),
            ("A B", SlotName::A),
            ("", SlotName::A),
        ] {
            let loaded = b.store.load().unwrap();
            let mut v = loaded.vars.clone();
            v.insert("BOOT_ORDER".into(), order.into());
            v.insert("BOOT_A_LEFT".into(), "0".into());
            v.insert("BOOT_B_LEFT".into(), "0".into());
            b.store.store(&loaded, &v).unwrap();
            assert_eq!(b.primary().unwrap(), None);
            assert_eq!(
                b.next_boot(&any).unwrap(),
                Some(next),
                "BOOT_ORDER={order:?}"
            );
        }
        let loaded = b.store.load().unwrap();
        let mut v = loaded.vars.clone();
        v.insert("BOOT_ORDER".into(), "B A".into());
        v.insert("BOOT_A_LEFT".into(), "3".into());
        v.insert("BOOT_B_LEFT".into(), "0".into());
        b.store.store(&loaded, &v).unwrap();
        let before = std::fs::read(&p).unwrap();
        b.set_state(SlotName::A, BootState::Good).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), before, "no-op must not write");
    }

    #[test]
    fn malformed_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (k, v) in [
            ("BOOT_ORDER", "A C"),
            ("BOOT_ORDER", "A A"),
            ("BOOT_A_LEFT", "0x3"),
        ] {
            let p = dir.path().join("env");
            let store = store_at(&p, &[("BOOT_ORDER", "A B"), (k, v)]);
            let e = UbootBackend::open(store, 3)
                .and_then(|b| b.state(SlotName::A).map(|_| ()))
                .unwrap_err();
            assert!(format!("{e:#}").contains("fw_setenv"), "{e:#}");
        }
    }
}
