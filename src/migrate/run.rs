//! Running the new image's migrations, confined.
//!
//! A migration is an executable `NN-name` in [`super::MIGRATE_DIR`] of the
//! new root. Each runs, in name order, with the new root as its `/`, so it
//! uses the new image's own shell and tools:
//!
//! - a fresh mount, PID, network, IPC and UTS namespace; the new root is
//!   `pivot_root`ed to and the host's tree detached, so nothing of the host
//!   is reachable;
//! - writable: the new root, and the data staging area at
//!   `/run/abup/data-staging`; read-only: the old root at
//!   `/run/abup/old-root` and the live data partition at `/run/abup/data`
//!   (bind mounts, not recursive); `/run` is a fresh tmpfs, `/dev` a tmpfs
//!   holding only null, zero, full, random and urandom (the new root is
//!   mounted `nodev`, so no other device node works);
//! - capabilities to mount, create device nodes, load modules, do raw I/O,
//!   reboot, trace and administer the network are dropped, with
//!   `no_new_privs`;
//! - the migration is PID 1 of its PID namespace: when it exits, is killed
//!   at the time limit, or abup dies, the kernel kills every process it
//!   started, also those that left its session (`setsid`) or double-forked.
//!
//! What is not confined: a migration runs as root with the capabilities
//! above left (chown, file ownership).

use super::tree::{self, kind_of, lstat_at, Kind, Tree};
use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the sandbox shows the old root, read-only.
pub const OLD_ROOT_AT: &str = "/run/abup/old-root";
/// Where the sandbox shows the live data partition, read-only.
pub const DATA_AT: &str = "/run/abup/data";
/// Where the sandbox shows the data staging area, writable.
pub const STAGING_AT: &str = "/run/abup/data-staging";

/// How long after the time limit abup kills a sandbox whose own watch (see
/// [`reap`]) did not end it.
const BACKSTOP: Duration = Duration::from_secs(30);

/// Lines of output kept for the report.
const TAIL_LINES: usize = 20;

/// Everything a migration run needs.
pub struct Sandbox<'a> {
    pub new_root: &'a Path,
    pub old_root: Option<&'a Path>,
    pub data: Option<&'a Path>,
    /// The staging area, held open: what is bound is checked to be this
    /// very directory, so a migration that swapped it for a symlink cannot
    /// redirect the next one's writable bind mount.
    pub staging: Option<&'a Tree>,
    /// `ABUP_*` variables besides the paths.
    pub vars: Vec<(String, String)>,
    pub timeout: Duration,
}

/// One migration that ran to success.
pub struct Ran {
    pub name: String,
    pub secs: f64,
}

/// The migrations of the new root, in order. Names must be `NN-name`.
pub fn list(new: &Tree) -> Result<Vec<String>> {
    let Some(dir) = new.dir(Path::new(super::MIGRATE_DIR), false)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for name in tree::list(dir.as_raw_fd())
        .with_context(|| format!("listing /{} in the new root", super::MIGRATE_DIR))?
    {
        let text = name.to_string_lossy().into_owned();
        if text.starts_with('.') {
            continue;
        }
        let shown = format!("/{}/{text}", super::MIGRATE_DIR);
        let b = text.as_bytes();
        if b.len() < 4 || !b[0].is_ascii_digit() || !b[1].is_ascii_digit() || b[2] != b'-' {
            bail!("migration {shown} is not named NN-name (two digits, a dash, a name); rename it in the image");
        }
        let st = lstat_at(dir.as_raw_fd(), &name)
            .with_context(|| format!("reading {shown}"))?
            .with_context(|| format!("{shown} vanished"))?;
        if kind_of(&st) != Kind::File || st.st_mode & 0o111 == 0 {
            bail!("migration {shown} is not an executable regular file; fix the image");
        }
        out.push(text);
    }
    Ok(out)
}

/// Checks that `rel` in the new root is a real directory, creating it when
/// missing (mounts must never land on a symlink the image chose).
fn real_dir(new: &Tree, rel: &str) -> Result<()> {
    match lstat_at(new.fd(), std::ffi::OsStr::new(rel))
        .with_context(|| format!("reading /{rel} in the new root"))?
    {
        Some(st) if kind_of(&st) == Kind::Dir => Ok(()),
        Some(_) => bail!("/{rel} in the new root is not a directory; migrations need it as a mount point: fix the image"),
        None => {
            new.dir(Path::new(rel), true)?;
            Ok(())
        }
    }
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).with_context(|| format!("{} holds a NUL", p.display()))
}

/// Runs migration `name` in the sandbox; its failure (exit, signal, time
/// limit) is an error naming it and showing the tail of its output.
pub fn run(sb: &Sandbox, new: &Tree, name: &str) -> Result<Ran> {
    real_dir(new, "run")?;
    real_dir(new, "dev")?;
    let root = sb.new_root.to_path_buf();
    let at = |rel: &str| cstr(&root.join(rel));
    let p = Paths {
        root: cstr(&root)?,
        run: at("run")?,
        run_abup: at("run/abup")?,
        old_at: at(&OLD_ROOT_AT[1..])?,
        data_at: at(&DATA_AT[1..])?,
        staging_at: at(&STAGING_AT[1..])?,
        dev: at("dev")?,
        nodes: ["null", "zero", "full", "random", "urandom"]
            .iter()
            .map(|n| at(&format!("dev/{n}")))
            .collect::<Result<Vec<_>>>()?,
        old: sb.old_root.map(cstr).transpose()?,
        data: sb.data.map(cstr).transpose()?,
        staging: match sb.staging {
            Some(t) => {
                let st = nix::sys::stat::fstat(t.fd()).context("reading the staging area")?;
                Some((cstr(t.path())?, t.fd(), st.st_dev, st.st_ino))
            }
            None => None,
        },
        staging_fd: CString::new(format!(
            "/proc/self/fd/{}",
            sb.staging.map_or(-1, |t| t.fd())
        ))
        .unwrap_or_default(),
        tmpfs: CString::new("tmpfs").unwrap_or_default(),
        run_opts: CString::new("mode=0755,size=16m").unwrap_or_default(),
        dot: CString::new(".").unwrap_or_default(),
        slash: CString::new("/").unwrap_or_default(),
        limit: libc::timespec {
            tv_sec: sb.timeout.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(sb.timeout.subsec_nanos() as i32),
        },
    };
    let mut log = tempfile::tempfile().context("creating a file for the migration's output")?;
    let program = PathBuf::from("/").join(super::MIGRATE_DIR).join(name);
    let mut cmd = Command::new(&program);
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/")
        .env("ABUP_MIGRATION", name)
        .env("ABUP_NEW_ROOT", "/")
        .envs(sb.vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicating the output file")?)
        .stderr(log.try_clone().context("duplicating the output file")?);
    if sb.old_root.is_some() {
        cmd.env("ABUP_OLD_ROOT", OLD_ROOT_AT);
    }
    if sb.data.is_some() {
        cmd.env("ABUP_DATA", DATA_AT);
    }
    if sb.staging.is_some() {
        cmd.env("ABUP_DATA_STAGING", STAGING_AT);
    }
    // SAFETY: the closure runs between fork and exec; it only makes raw
    // system calls on strings prepared before the fork (no allocation).
    unsafe {
        cmd.pre_exec(move || confine(&p));
    }
    let start = Instant::now();
    let shown = format!("/{}/{name}", super::MIGRATE_DIR);
    let mut child = cmd
        .spawn()
        .with_context(|| {
            format!("starting migration {shown} in its sandbox (the new root must hold its interpreter, e.g. /bin/sh)")
        })?;
    // The child reaps the migration and enforces the time limit itself
    // (see [`reap`]); this loop only watches for a signal to abup and, as a
    // backstop, for a child that overstays.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let kill_child = |child: &mut std::process::Child| {
        // The migration's namespace dies with it (PR_SET_PDEATHSIG).
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        child.wait()
    };
    let status = loop {
        if let Some(st) = child.try_wait().context("waiting for the migration")? {
            break st;
        }
        if let Err(e) = crate::signal::check() {
            let _ = kill_child(&mut child);
            return Err(e);
        }
        if start.elapsed() >= sb.timeout + BACKSTOP {
            break kill_child(&mut child).context("waiting for the migration")?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let secs = start.elapsed().as_secs_f64();
    let outcome = match (status.code(), status.signal()) {
        (Some(0), _) => {
            return Ok(Ran {
                name: name.to_string(),
                secs,
            })
        }
        (Some(c), _) => format!("exited with {c} after {secs:.1} s"),
        (None, Some(libc::SIGKILL)) if start.elapsed() >= sb.timeout => format!(
            "did not finish within its time limit of {} s and was killed with everything it started (migrate.timeout_secs)",
            sb.timeout.as_secs()
        ),
        (None, sig) => format!(
            "was killed by signal {} after {secs:.1} s",
            sig.unwrap_or_default()
        ),
    };
    let tail = tail(&mut log)?;
    bail!("migration {shown} {outcome}; the slot will not be activated; its output: {tail}")
}

/// The last lines the migration printed, on one line.
fn tail(log: &mut std::fs::File) -> Result<String> {
    let len = log.seek(SeekFrom::End(0))?;
    log.seek(SeekFrom::Start(len.saturating_sub(4096)))?;
    let mut bytes = Vec::new();
    log.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let from = lines.len().saturating_sub(TAIL_LINES);
    Ok(if lines.is_empty() {
        "(none)".to_string()
    } else {
        lines[from..].join(" | ")
    })
}

/// Paths prepared before the fork.
struct Paths {
    root: CString,
    run: CString,
    run_abup: CString,
    old_at: CString,
    data_at: CString,
    staging_at: CString,
    dev: CString,
    nodes: Vec<CString>,
    old: Option<CString>,
    data: Option<CString>,
    /// Path, descriptor number to bind it through, device and inode.
    staging: Option<(CString, libc::c_int, u64, u64)>,
    /// `/proc/self/fd/N` for the staging area's descriptor.
    staging_fd: CString,
    tmpfs: CString,
    run_opts: CString,
    dot: CString,
    slash: CString,
    /// The time limit, for [`reap`].
    limit: libc::timespec,
}

/// Capabilities dropped from the bounding set before the exec.
const DROPPED_CAPS: [libc::c_int; 12] = [
    12, // CAP_NET_ADMIN
    16, // CAP_SYS_MODULE
    17, // CAP_SYS_RAWIO
    18, // CAP_SYS_CHROOT
    19, // CAP_SYS_PTRACE
    21, // CAP_SYS_ADMIN
    22, // CAP_SYS_BOOT
    25, // CAP_SYS_TIME
    27, // CAP_MKNOD
    33, // CAP_MAC_ADMIN
    38, // CAP_PERFMON
    39, // CAP_BPF
];

fn check_fd(r: libc::c_int) -> std::io::Result<libc::c_int> {
    check(r).map(|()| r)
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets up the sandbox in the forked child (see the module docs).
fn confine(p: &Paths) -> std::io::Result<()> {
    use libc::*;
    let null = std::ptr::null::<c_char>();
    let bind = |src: &CString, dst: &CString, rw: bool| -> std::io::Result<()> {
        // SAFETY: valid C strings; plain mount(2) calls.
        unsafe {
            check(mount(
                src.as_ptr(),
                dst.as_ptr(),
                null,
                MS_BIND,
                std::ptr::null(),
            ))?;
            let mut flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV;
            if !rw {
                flags |= MS_RDONLY;
            }
            check(mount(null, dst.as_ptr(), null, flags, std::ptr::null()))
        }
    };
    // SAFETY: raw system calls on prepared C strings, in the child only.
    unsafe {
        check(setpgid(0, 0))?;
        check(unshare(
            CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID,
        ))?;
        check(mount(
            null,
            p.slash.as_ptr(),
            null,
            MS_REC | MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(mount(
            p.root.as_ptr(),
            p.root.as_ptr(),
            null,
            MS_BIND | MS_REC,
            std::ptr::null(),
        ))?;
        check(mount(
            p.tmpfs.as_ptr(),
            p.run.as_ptr(),
            p.tmpfs.as_ptr(),
            MS_NOSUID | MS_NODEV,
            p.run_opts.as_ptr().cast(),
        ))?;
        umask(0o022);
        check(mkdir(p.run_abup.as_ptr(), 0o755))?;
        for (src, dst) in [(&p.old, &p.old_at), (&p.data, &p.data_at)] {
            if let Some(src) = src {
                check(mkdir(dst.as_ptr(), 0o755))?;
                bind(src, dst, false)?;
            }
        }
        if let Some((path, fd, dev, ino)) = &p.staging {
            // Reopened in this namespace (a handle from the parent's cannot
            // be bound), not following a symlink, and checked to be the
            // directory the parent holds, then bound through the handle.
            let again = check_fd(open(
                path.as_ptr(),
                O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC,
            ))?;
            let mut st: stat = std::mem::zeroed();
            check(fstat(again, &mut st))?;
            if st.st_dev != *dev || st.st_ino != *ino {
                return Err(std::io::Error::from_raw_os_error(ESTALE));
            }
            check(dup3(again, *fd, O_CLOEXEC))?;
            check(close(again))?;
            check(mkdir(p.staging_at.as_ptr(), 0o755))?;
            bind(&p.staging_fd, &p.staging_at, true)?;
        }
        check(mount(
            p.tmpfs.as_ptr(),
            p.dev.as_ptr(),
            p.tmpfs.as_ptr(),
            MS_NOSUID | MS_NOEXEC,
            p.run_opts.as_ptr().cast(),
        ))?;
        for (node, minor) in p.nodes.iter().zip([3u32, 5, 7, 8, 9]) {
            check(mknod(node.as_ptr(), S_IFCHR | 0o666, makedev(1, minor)))?;
            check(chmod(node.as_ptr(), 0o666))?;
        }
        check(chdir(p.root.as_ptr()))?;
        check(syscall(SYS_pivot_root, p.dot.as_ptr(), p.dot.as_ptr()) as c_int)?;
        check(umount2(p.dot.as_ptr(), MNT_DETACH))?;
        check(chdir(p.slash.as_ptr()))?;
        for cap in DROPPED_CAPS {
            // EINVAL: a capability this kernel does not know.
            if prctl(PR_CAPBSET_DROP, cap as c_ulong, 0, 0, 0) < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(EINVAL) {
                    return Err(e);
                }
            }
        }
        check(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        // This process dies with abup; the migration, forked as PID 1 of
        // the new PID namespace, dies with this process, and when PID 1
        // dies the kernel kills every process of its namespace.
        check(prctl(PR_SET_PDEATHSIG, SIGKILL as c_ulong, 0, 0, 0))?;
        let pid = fork();
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            check(prctl(PR_SET_PDEATHSIG, SIGKILL as c_ulong, 0, 0, 0))?;
            return Ok(());
        }
        reap(pid, &p.limit)
    }
}

/// Seconds and nanoseconds since `start` on the monotonic clock, compared
/// with `limit`.
fn past(start: &libc::timespec, limit: &libc::timespec) -> bool {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let ns = |t: &libc::timespec| i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec);
    ns(&now) - ns(start) >= ns(limit)
}

/// The sandbox's first process, after forking the migration as PID 1 of
/// its PID namespace: waits for it and exits as it did (same exit code, or
/// killed by the same signal). At the time limit it kills the migration,
/// which takes every process of the namespace with it (`setsid` does not
/// leave a PID namespace), waits until the kernel has reaped them all, and
/// kills itself with SIGKILL. Only async-signal-safe calls: this runs
/// between fork and exec.
unsafe fn reap(pid: libc::pid_t, limit: &libc::timespec) -> ! {
    use libc::*;
    // Nothing of abup's stays open here: spawn's error pipe must close when
    // the migration's exec succeeds.
    syscall(SYS_close_range, 3 as c_uint, c_uint::MAX, 0 as c_uint);
    let no_core = rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    setrlimit(RLIMIT_CORE, &no_core);
    let mut start = timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    clock_gettime(CLOCK_MONOTONIC, &mut start);
    let nap = timespec {
        tv_sec: 0,
        tv_nsec: 20_000_000,
    };
    let mut status: c_int = 0;
    loop {
        let r = waitpid(pid, &mut status, WNOHANG);
        if r == pid {
            break;
        }
        if r < 0 && *__errno_location() != EINTR {
            _exit(127);
        }
        if past(&start, limit) {
            kill(pid, SIGKILL);
            while waitpid(pid, &mut status, 0) < 0 && *__errno_location() == EINTR {}
            kill(getpid(), SIGKILL);
        }
        nanosleep(&nap, std::ptr::null_mut());
    }
    if WIFEXITED(status) {
        _exit(WEXITSTATUS(status));
    }
    let sig = WTERMSIG(status);
    signal(sig, SIG_DFL);
    kill(getpid(), sig);
    _exit(128 + sig)
}
