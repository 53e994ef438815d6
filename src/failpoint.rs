//! Named fail points, so tests can crash or fail abup at exact moments.
//!
//! `failpoint!("name")` marks a point (a step boundary, a place inside a
//! long step, either side of the flip's rename). Test builds read
//! `ABUP_FAILPOINTS`, a comma-separated list of `name=action[@n]`:
//!
//! - `kill`: the process kills itself with SIGKILL, a real crash;
//! - `eio`: the point returns an I/O error (EIO), as a failing disk would;
//! - `sigterm`, `sigint`, `sighup`: the process sends itself that signal
//!   (the handler records it, as if it came from outside);
//! - `stall`: prints `abup: failpoint NAME reached` on stderr and waits (up
//!   to 60 s) for a signal, so a test can signal the process there;
//! - `@n`: act on the n-th time the point is reached (default: the first).
//!
//! Only builds with debug assertions (`cargo build`, `cargo test`) honour the
//! variable; a release build ignores it, so a device cannot be made to crash
//! through its environment.

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The environment variable that arms fail points.
pub const ENV: &str = "ABUP_FAILPOINTS";

/// Marks a fail point; evaluates to `()` or returns the injected error from
/// the enclosing function (which returns `anyhow::Result` or `io::Result`).
#[macro_export]
macro_rules! failpoint {
    ($name:expr) => {
        $crate::failpoint::hit($name)?
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Kill,
    Eio,
    Signal(i32),
    Stall,
}

#[derive(Debug, Clone)]
struct Point {
    name: String,
    action: Action,
    nth: u64,
}

fn parse(spec: &str) -> Vec<Point> {
    spec.split(',')
        .filter_map(|item| {
            let (name, rest) = item.trim().split_once('=')?;
            let (action, nth) = match rest.split_once('@') {
                Some((a, n)) => (a, n.parse().ok()?),
                None => (rest, 1),
            };
            let action = match action {
                "kill" => Action::Kill,
                "eio" => Action::Eio,
                "sigterm" => Action::Signal(nix::libc::SIGTERM),
                "sigint" => Action::Signal(nix::libc::SIGINT),
                "sighup" => Action::Signal(nix::libc::SIGHUP),
                "stall" => Action::Stall,
                _ => return None,
            };
            Some(Point {
                name: name.to_string(),
                action,
                nth,
            })
        })
        .collect()
}

fn armed() -> &'static [Point] {
    static POINTS: OnceLock<Vec<Point>> = OnceLock::new();
    POINTS.get_or_init(|| {
        if !cfg!(debug_assertions) {
            return Vec::new();
        }
        std::env::var(ENV).map(|s| parse(&s)).unwrap_or_default()
    })
}

/// Reaches the fail point `name`: does what `ABUP_FAILPOINTS` says, if
/// anything. Returns the injected error for `eio`.
pub fn hit(name: &str) -> io::Result<()> {
    let points = armed();
    if points.is_empty() {
        return Ok(());
    }
    static HITS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);
    let count = {
        let mut hits = HITS.lock().unwrap_or_else(|e| e.into_inner());
        let n = hits
            .get_or_insert_with(HashMap::new)
            .entry(name.to_string())
            .or_insert(0);
        *n += 1;
        *n
    };
    let Some(p) = points.iter().find(|p| p.name == name && p.nth == count) else {
        return Ok(());
    };
    match p.action {
        Action::Kill => {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            // raise(SIGKILL) does not return; be sure anyway.
            std::process::abort();
        }
        Action::Eio => Err(io::Error::other(format!(
            "{} (fail point {name})",
            io::Error::from_raw_os_error(nix::libc::EIO)
        ))),
        Action::Signal(sig) => {
            // SAFETY: raise only delivers a signal to this thread.
            unsafe { nix::libc::raise(sig) };
            Ok(())
        }
        Action::Stall => {
            let _ = writeln!(io::stderr(), "abup: failpoint {name} reached");
            let until = Instant::now() + Duration::from_secs(60);
            while !crate::signal::received() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_actions_and_counts() {
        let p = parse("a=kill, b=eio@3,c=sigterm,d=bogus,e,f=stall@x,g=stall");
        let got: Vec<_> = p
            .iter()
            .map(|p| (p.name.as_str(), p.action, p.nth))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", Action::Kill, 1),
                ("b", Action::Eio, 3),
                ("c", Action::Signal(nix::libc::SIGTERM), 1),
                ("g", Action::Stall, 1),
            ]
        );
    }
}
