//! Applying preserve rules: copying paths of the old root into the new root
//! with owner, mode, timestamps and xattrs, through [`Tree`] handles only.
//!
//! Files, symlinks and device nodes are created under a temporary name in
//! their final directory and renamed into place; directories are merged or
//! replaced as the rule says. Nothing is read or created outside either root.

use super::rules::{DirMode, Missing, Origin, Rule, Symlinks, Wins};
use super::tree::{self, kind_of, list, lstat_at, open_dir_at, remove_at, Kind, Tree};
use anyhow::{bail, Context, Result};
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fchmod, fchmodat, fstat, futimens, mkdirat, mknodat, utimensat};
use nix::sys::stat::{FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, symlinkat, Gid, Uid};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use xattr::FileExt;

/// Deepest directory nesting copied (guards against symlink loops when
/// resolving symlinks inside a copied directory).
const MAX_DEPTH: usize = 64;

/// What applying the rules did, path by path.
#[derive(Debug, Default)]
pub struct Outcome {
    pub copied: Vec<String>,
    pub missing: Vec<String>,
    /// Paths where the image's copy won.
    pub kept_image: Vec<String>,
    /// Files, directories, symlinks and nodes written.
    pub entries: u64,
}

/// Applies `rules` in order, from `old` into `new`.
pub fn apply(rules: &[Rule], old: &Tree, new: &Tree) -> Result<Outcome> {
    let mut out = Outcome::default();
    for rule in rules {
        let from = match rule.origin {
            Origin::Config => "preserve rule",
            Origin::Image => "the image's preserve rule",
        };
        apply_rule(rule, old, new, &mut out)
            .with_context(|| format!("{from} {}", rule.path.display()))?;
    }
    Ok(out)
}

/// Copies every entry of `from` into `to` as it is (symlinks kept,
/// directories replaced, owner, mode, timestamps and xattrs kept); returns
/// the number of entries written.
pub fn copy_all(from: &Tree, to: &Tree) -> Result<u64> {
    let rule = Rule {
        path: PathBuf::from("/"),
        missing: Missing::Error,
        symlinks: Symlinks::Keep,
        wins: Wins::Device,
        directory: DirMode::Replace,
        origin: Origin::Image,
    };
    let mut c = Copier {
        old: from,
        to: to.what,
        rule: &rule,
        entries: 0,
        kept: false,
    };
    for name in list(from.fd()).with_context(|| format!("listing {}", from.path().display()))? {
        crate::signal::check()?;
        let shown = Path::new("/").join(&name);
        let Some(st) = lstat_at(from.fd(), &name)
            .with_context(|| format!("reading {} in the {}", shown.display(), from.what))?
        else {
            continue;
        };
        let src = Source::at(from, &rule, from.fd(), &name, st, &shown)?;
        c.copy(&src, to.fd(), &name, &shown, 0)?;
    }
    Ok(c.entries)
}

fn apply_rule(rule: &Rule, old: &Tree, new: &Tree, out: &mut Outcome) -> Result<()> {
    let paths = expand(old, &rule.path)?;
    if paths.is_empty() {
        return missing(rule, &rule.path, old, out);
    }
    for path in paths {
        crate::signal::check()?;
        crate::failpoint!("preserve-path");
        let shown = Path::new("/").join(&path);
        let (parent, name) = match (path.parent(), path.file_name()) {
            (Some(p), Some(n)) => (p, n),
            _ => bail!("{} names no file", shown.display()),
        };
        let Some(src_dir) = old.dir(parent, false)? else {
            missing(rule, &shown, old, out)?;
            continue;
        };
        let Some(st) = lstat_at(src_dir.as_raw_fd(), name)
            .with_context(|| format!("reading {} in the old root", shown.display()))?
        else {
            missing(rule, &shown, old, out)?;
            continue;
        };
        let src = Source::at(old, rule, src_dir.as_raw_fd(), name, st, &shown)?;
        let dst_dir = new
            .dir(parent, true)?
            .context("opening the new root's directory")?;
        let mut c = Copier {
            old,
            to: new.what,
            rule,
            entries: 0,
            kept: false,
        };
        c.copy(&src, dst_dir.as_raw_fd(), name, &shown, 0)?;
        out.entries += c.entries;
        if c.kept && c.entries == 0 {
            out.kept_image.push(shown.display().to_string());
        } else {
            out.copied.push(shown.display().to_string());
        }
    }
    Ok(())
}

fn missing(rule: &Rule, shown: &Path, old: &Tree, out: &mut Outcome) -> Result<()> {
    match rule.missing {
        Missing::Skip => {
            out.missing.push(shown.display().to_string());
            Ok(())
        }
        Missing::Error => bail!(
            "{} does not exist in the old root {}; create it there or set missing = \"skip\" in the rule",
            shown.display(),
            old.path().display()
        ),
    }
}

/// The rule's path with its glob components matched against the old root
/// (names starting with `.` only match a pattern that starts with `.`).
fn expand(old: &Tree, pattern: &Path) -> Result<Vec<PathBuf>> {
    let mut found = vec![PathBuf::new()];
    for name in tree::names(pattern)? {
        let text = name.to_string_lossy();
        if !super::rules::is_pattern(&text) {
            found.iter_mut().for_each(|p| p.push(name));
            continue;
        }
        let pat = glob::Pattern::new(&text)?;
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: true,
        };
        let mut next = Vec::new();
        for dir in &found {
            let Some(fd) = old.dir(dir, false)? else {
                continue;
            };
            for n in list(fd.as_raw_fd())
                .with_context(|| format!("listing /{} in the old root", dir.display()))?
            {
                if pat.matches_with(&n.to_string_lossy(), opts) {
                    next.push(dir.join(n));
                }
            }
        }
        found = next;
    }
    Ok(found)
}

/// An entry of the old root, opened for copying.
struct Source {
    st: FileStat,
    /// A readable handle (files and directories).
    fd: Option<OwnedFd>,
    /// A kept symlink's target.
    link: Option<OsString>,
}

impl Source {
    /// The entry `name` of directory `dir`, with stat `st` (not followed);
    /// resolves a symlink when the rule says so.
    fn at(
        old: &Tree,
        rule: &Rule,
        dir: RawFd,
        name: &OsStr,
        st: FileStat,
        shown: &Path,
    ) -> Result<Source> {
        let reading = || format!("reading {} in the {}", shown.display(), old.what);
        match kind_of(&st) {
            Kind::Symlink if rule.symlinks == Symlinks::Resolve => {
                let path_fd = old.follow(dir, name, shown, false)?;
                let st = fstat(path_fd.as_raw_fd()).with_context(reading)?;
                let fd = match kind_of(&st) {
                    Kind::File | Kind::Dir => {
                        Some(tree::reopen(path_fd.as_raw_fd(), &st).with_context(reading)?)
                    }
                    _ => None,
                };
                Ok(Source { st, fd, link: None })
            }
            Kind::Symlink => Ok(Source {
                st,
                fd: None,
                link: Some(nix::fcntl::readlinkat(Some(dir), name).with_context(reading)?),
            }),
            Kind::Dir => Ok(Source {
                st,
                fd: Some(open_dir_at(dir, name).with_context(reading)?),
                link: None,
            }),
            Kind::File => {
                let fd = openat(
                    Some(dir),
                    name,
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
                    Mode::empty(),
                )
                .with_context(reading)?;
                // SAFETY: a fresh descriptor.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                Ok(Source {
                    st,
                    fd: Some(fd),
                    link: None,
                })
            }
            Kind::Node | Kind::Socket => Ok(Source {
                st,
                fd: None,
                link: None,
            }),
        }
    }
}

struct Copier<'a> {
    old: &'a Tree,
    /// What is written to, for messages.
    to: &'static str,
    rule: &'a Rule,
    entries: u64,
    /// Some entry of the image was kept because the image wins.
    kept: bool,
}

impl Copier<'_> {
    /// Copies `src` to `name` in the new root's directory `dst`.
    fn copy(
        &mut self,
        src: &Source,
        dst: RawFd,
        name: &OsStr,
        shown: &Path,
        depth: usize,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            bail!(
                "{} is nested more than {MAX_DEPTH} directories deep (a symlink loop?)",
                shown.display()
            );
        }
        let to = self.to;
        let writing = || format!("writing {} in the {}", shown.display(), to);
        let existing = lstat_at(dst, name)
            .with_context(writing)?
            .map(|s| kind_of(&s));
        let image_wins = self.rule.wins == Wins::Image;
        let kind = kind_of(&src.st);
        if kind == Kind::Dir {
            let merge = self.rule.directory == DirMode::Merge;
            let (dir, created) = match existing {
                Some(Kind::Dir) if merge || image_wins => {
                    (open_dir_at(dst, name).with_context(writing)?, false)
                }
                Some(_) if image_wins => {
                    self.kept = true;
                    return Ok(());
                }
                Some(_) => {
                    remove_at(dst, name).with_context(writing)?;
                    (self.mkdir(dst, name).with_context(writing)?, true)
                }
                None => (self.mkdir(dst, name).with_context(writing)?, true),
            };
            if existing == Some(Kind::Dir) && image_wins && !merge {
                self.kept = true;
                return Ok(());
            }
            let src_fd = src.fd.as_ref().context("directory without a handle")?;
            for child in list(src_fd.as_raw_fd())
                .with_context(|| format!("listing {} in the {}", shown.display(), self.old.what))?
            {
                let child_shown = shown.join(&child);
                let Some(st) = lstat_at(src_fd.as_raw_fd(), &child).with_context(|| {
                    format!("reading {} in the {}", child_shown.display(), self.old.what)
                })?
                else {
                    continue;
                };
                if kind_of(&st) == Kind::Socket {
                    continue;
                }
                let child_src = Source::at(
                    self.old,
                    self.rule,
                    src_fd.as_raw_fd(),
                    &child,
                    st,
                    &child_shown,
                )?;
                self.copy(&child_src, dir.as_raw_fd(), &child, &child_shown, depth + 1)?;
            }
            if created || !image_wins {
                let file = File::from(dir);
                set_meta(&file, src, true).with_context(writing)?;
            } else {
                self.kept = true;
            }
            self.entries += u64::from(created);
            return Ok(());
        }
        if kind == Kind::Socket {
            return Ok(());
        }
        if existing.is_some() && image_wins {
            self.kept = true;
            return Ok(());
        }
        if existing == Some(Kind::Dir) {
            remove_at(dst, name).with_context(writing)?;
        }
        let tmp = OsString::from(format!(".abup-preserve-{}", std::process::id()));
        let _ = remove_at(dst, &tmp);
        self.create(src, dst, &tmp).with_context(writing)?;
        renameat(Some(dst), tmp.as_os_str(), Some(dst), name).with_context(writing)?;
        self.entries += 1;
        Ok(())
    }

    fn mkdir(&self, dst: RawFd, name: &OsStr) -> nix::Result<OwnedFd> {
        mkdirat(Some(dst), name, Mode::from_bits_truncate(0o700))?;
        open_dir_at(dst, name)
    }

    /// Creates the non-directory `src` as `tmp` in `dst`, with its metadata.
    fn create(&self, src: &Source, dst: RawFd, tmp: &OsStr) -> Result<()> {
        let st = &src.st;
        match (kind_of(st), &src.link) {
            (Kind::Symlink, Some(target)) => {
                symlinkat(target.as_os_str(), Some(dst), tmp)?;
                set_meta_at(dst, tmp, st, false)?;
            }
            (Kind::File, _) => {
                let fd = openat(
                    Some(dst),
                    tmp,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )?;
                // SAFETY: a fresh descriptor.
                let mut out = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                let input = src.fd.as_ref().context("file without a handle")?;
                let mut input = File::from(input.try_clone()?);
                std::io::copy(&mut input, &mut out)?;
                set_meta(&out, src, false)?;
                out.sync_all()?;
            }
            (Kind::Node, _) => {
                let kind = SFlag::from_bits_truncate(st.st_mode & libc::S_IFMT);
                mknodat(
                    Some(dst),
                    tmp,
                    kind,
                    Mode::from_bits_truncate(0o600),
                    st.st_rdev,
                )?;
                set_meta_at(dst, tmp, st, true)?;
            }
            _ => bail!("unexpected file type"),
        }
        Ok(())
    }
}

/// Owner, (for nodes) mode, and timestamps of `st` onto `name` in `dir`,
/// never following a symlink.
fn set_meta_at(dir: RawFd, name: &OsStr, st: &FileStat, chmod: bool) -> nix::Result<()> {
    fchownat(
        Some(dir),
        name,
        Some(Uid::from_raw(st.st_uid)),
        Some(Gid::from_raw(st.st_gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )?;
    if chmod {
        // A device node or FIFO: not a symlink, so following is harmless.
        fchmodat(
            Some(dir),
            name,
            Mode::from_bits_truncate(st.st_mode & 0o7777),
            FchmodatFlags::FollowSymlink,
        )?;
    }
    let (atime, mtime) = times(st);
    utimensat(
        Some(dir),
        name,
        &atime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
}

fn times(st: &FileStat) -> (TimeSpec, TimeSpec) {
    (
        TimeSpec::new(st.st_atime, st.st_atime_nsec),
        TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
    )
}

/// Owner, mode, xattrs and timestamps of `src` onto the open `dst` (in this
/// order: chown clears setuid bits and file capabilities).
fn set_meta(dst: &File, src: &Source, is_dir: bool) -> Result<()> {
    let st = &src.st;
    let fd = dst.as_raw_fd();
    fchown(
        fd,
        Some(Uid::from_raw(st.st_uid)),
        Some(Gid::from_raw(st.st_gid)),
    )?;
    fchmod(fd, Mode::from_bits_truncate(st.st_mode & 0o7777))?;
    if let Some(sfd) = &src.fd {
        let sfile = File::from(sfd.try_clone()?);
        for name in sfile.list_xattr().context("listing xattrs")? {
            if let Some(value) = sfile.get_xattr(&name).context("reading an xattr")? {
                dst.set_xattr(&name, &value)
                    .with_context(|| format!("setting xattr {}", name.to_string_lossy()))?;
            }
        }
    }
    let (atime, mtime) = times(st);
    futimens(fd, &atime, &mtime)?;
    if is_dir {
        dst.sync_all()?;
    }
    Ok(())
}
