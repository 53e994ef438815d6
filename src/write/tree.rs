//! The new root's namespace as a tar stream builds it, kept in memory.
//!
//! A tarball payload is extracted onto a freshly formatted filesystem that
//! nothing else writes to, so what is at any path inside it follows from the
//! archive alone. [`Tree`] records every object the entries make and decides
//! each entry's fate from that record: which real (symlink-free) directory it
//! lands in, which missing parents to create, whether an earlier object must
//! be replaced, and whether it must be refused. Paths through symlinks are
//! resolved here, inside the root, never by the kernel.
//!
//! Both the extractor (`write::tar`) and the validation pass `bundle create`
//! runs (`write::tar::validate`) drive the same [`Tree`], so a bundle is
//! refused at creation exactly when its install would be refused, across
//! entries (a path whose parent was earlier made a symlink, a directory
//! replaced by a file, symlink loops, hard links to nothing). And the
//! extractor needs no `stat` calls to find out what is on disk.
//!
//! Limits: symlinks are followed only in parent positions and only when they
//! stay inside the root: absolute targets and `..` above the root are
//! refused, as are more than [`MAX_FOLLOWS`] symlinks in one path (a loop).

use anyhow::{bail, ensure, Context, Result};
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::path::{Component, Path, PathBuf};

/// Most symlinks followed while resolving one path (Linux's own limit).
pub const MAX_FOLLOWS: usize = 40;

/// What is at a path of the new root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory.
    Dir,
    /// A symbolic link and its target.
    Symlink(PathBuf),
    /// Anything else: a regular file, device node or FIFO.
    Other,
}

/// Where an entry goes and what must happen first. Paths are relative to
/// the root and hold no symlink, `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The entry's own path (the root itself is the empty path).
    pub path: PathBuf,
    /// Missing parent directories to create first, outermost first.
    pub mkdirs: Vec<PathBuf>,
    /// A non-directory is at `path` and must be removed first.
    pub replace: bool,
    /// For a directory entry: it exists already (is kept).
    pub exists: bool,
}

/// The objects of the new root, by path.
#[derive(Debug, Default)]
pub struct Tree {
    nodes: HashMap<PathBuf, Node>,
    /// Real paths of the non-directories this archive made so far: a second
    /// entry at one of them is a duplicate (refused), while a non-directory
    /// that was there before the archive ([`Tree::scan`]) is replaced.
    from_archive: HashSet<PathBuf>,
}

impl Tree {
    /// The namespace of a freshly formatted ext4: an empty root holding
    /// `lost+found`.
    pub fn fresh_ext4() -> Tree {
        let mut tree = Tree::default();
        tree.nodes.insert(PathBuf::from("lost+found"), Node::Dir);
        tree
    }

    /// The namespace of what `root` already holds (once, at the start).
    pub fn scan(root: &Path) -> Result<Tree> {
        let mut tree = Tree::default();
        let mut todo = vec![PathBuf::new()];
        while let Some(dir) = todo.pop() {
            let full = root.join(&dir);
            let entries =
                fs::read_dir(&full).with_context(|| format!("reading {}", full.display()))?;
            for entry in entries {
                let entry = entry.with_context(|| format!("reading {}", full.display()))?;
                let rel = dir.join(entry.file_name());
                let kind = entry
                    .file_type()
                    .with_context(|| format!("reading {}", entry.path().display()))?;
                let node = if kind.is_dir() {
                    todo.push(rel.clone());
                    Node::Dir
                } else if kind.is_symlink() {
                    let target = fs::read_link(entry.path())
                        .with_context(|| format!("reading {}", entry.path().display()))?;
                    Node::Symlink(target)
                } else {
                    Node::Other
                };
                tree.nodes.insert(rel, node);
            }
        }
        Ok(tree)
    }

    /// What is at `path` (a resolved path).
    pub fn get(&self, path: &Path) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// Resolves the directory `dir` (relative to the root, as written in
    /// the archive) to a real path, following symlinks that stay inside the
    /// root. Missing directories are added to `mkdirs` (and recorded) when
    /// `create` is set, else refused.
    fn resolve_dir(
        &mut self,
        dir: &Path,
        create: bool,
        mkdirs: &mut Vec<PathBuf>,
    ) -> Result<PathBuf> {
        let mut real = PathBuf::new();
        // Components still to walk, last first.
        let mut todo: Vec<OsString> = dir
            .components()
            .rev()
            .map(|c| c.as_os_str().to_owned())
            .collect();
        let mut follows = 0;
        while let Some(part) = todo.pop() {
            match Path::new(&part).components().next() {
                None | Some(Component::CurDir) => continue,
                Some(Component::ParentDir) => {
                    ensure!(real.pop(), "{} leads outside the root", dir.display());
                    continue;
                }
                Some(Component::RootDir | Component::Prefix(_)) => {
                    bail!("{} leads outside the root", dir.display())
                }
                Some(Component::Normal(_)) => {}
            }
            let next = real.join(&part);
            match self.nodes.get(&next) {
                Some(Node::Dir) => real = next,
                Some(Node::Symlink(target)) => {
                    follows += 1;
                    ensure!(
                        follows <= MAX_FOLLOWS,
                        "{} has too many levels of symlinks (a loop?)",
                        dir.display()
                    );
                    ensure!(
                        target.is_relative(),
                        "symlink {} -> {} leads outside the root",
                        next.display(),
                        target.display()
                    );
                    // Relative to the symlink's own directory, `real`.
                    todo.extend(target.components().rev().map(|c| c.as_os_str().to_owned()));
                }
                Some(Node::Other) => bail!("{} is not a directory", next.display()),
                None if create => {
                    self.nodes.insert(next.clone(), Node::Dir);
                    mkdirs.push(next.clone());
                    real = next;
                }
                None => bail!("{} does not exist", next.display()),
            }
        }
        Ok(real)
    }

    /// Decides where the directory entry `rel` goes; records it.
    pub fn dir(&mut self, rel: &Path) -> Result<Step> {
        let mut step = self.place(rel)?;
        match self.nodes.get(&step.path) {
            Some(Node::Dir) => step.exists = true,
            Some(_) => bail!("{} exists and is not a directory", step.path.display()),
            None => {
                self.nodes.insert(step.path.clone(), Node::Dir);
            }
        }
        Ok(step)
    }

    /// Decides where the non-directory entry `rel` goes (an earlier
    /// non-directory there is replaced); records it as `node`.
    pub fn leaf(&mut self, rel: &Path, node: Node) -> Result<Step> {
        let mut step = self.place(rel)?;
        match self.nodes.get(&step.path) {
            Some(Node::Dir) => bail!("{} exists and is a directory", step.path.display()),
            Some(_) if self.from_archive.contains(&step.path) => bail!(
                "{} appears twice in the archive; rebuild the payload without duplicate entries",
                step.path.display()
            ),
            Some(_) => step.replace = true,
            None => {}
        }
        self.from_archive.insert(step.path.clone());
        self.nodes.insert(step.path.clone(), node);
        Ok(step)
    }

    /// Decides where the hard link `rel` to `to` (both as in the archive)
    /// goes; returns the step and the real path of the object linked to,
    /// which must already exist and not be a directory. `None` when the link
    /// names itself (nothing to do).
    pub fn hard_link(&mut self, rel: &Path, to: &Path) -> Result<Option<(Step, PathBuf)>> {
        let name = to
            .file_name()
            .with_context(|| format!("{} has no file name", to.display()))?;
        let parent = to.parent().unwrap_or(Path::new(""));
        let source = self
            .resolve_dir(parent, false, &mut Vec::new())
            .with_context(|| format!("resolving the link target {}", to.display()))?
            .join(name);
        let node = match self.nodes.get(&source) {
            None => bail!(
                "the link target {} is not in the archive before the link",
                to.display()
            ),
            Some(Node::Dir) => bail!("the link target {} is a directory", to.display()),
            Some(node) => node.clone(),
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        let file = rel
            .file_name()
            .with_context(|| format!("{} has no file name", rel.display()))?;
        // A dry resolution (nothing created): a link to itself changes
        // nothing; errors are left for `leaf` to report.
        let same = matches!(
            self.resolve_dir(parent, false, &mut Vec::new()),
            Ok(p) if p.join(file) == source
        );
        if same {
            return Ok(None);
        }
        let step = self.leaf(rel, node)?;
        Ok(Some((step, source)))
    }

    /// The real path of the entry `rel` with its parents resolved (and the
    /// missing ones recorded for creation).
    fn place(&mut self, rel: &Path) -> Result<Step> {
        let mut mkdirs = Vec::new();
        let path = match (rel.parent(), rel.file_name()) {
            (Some(parent), Some(name)) => self.resolve_dir(parent, true, &mut mkdirs)?.join(name),
            _ => PathBuf::new(),
        };
        Ok(Step {
            path,
            mkdirs,
            replace: false,
            exists: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn follows_symlinks_inside_the_root_only() {
        let mut t = Tree::fresh_ext4();
        t.dir(&p("usr")).unwrap();
        t.dir(&p("usr/lib")).unwrap();
        t.leaf(&p("lib"), Node::Symlink(p("usr/lib"))).unwrap();
        let step = t.leaf(&p("lib/libc.so"), Node::Other).unwrap();
        assert_eq!(step.path, p("usr/lib/libc.so"));
        assert!(step.mkdirs.is_empty());
        // Missing parents are created, once.
        let step = t.leaf(&p("a/b/c"), Node::Other).unwrap();
        assert_eq!(
            (step.path, step.mkdirs),
            (p("a/b/c"), vec![p("a"), p("a/b")])
        );
        assert!(t.leaf(&p("a/b/d"), Node::Other).unwrap().mkdirs.is_empty());
        // `..` inside the root is fine; above it is not.
        t.leaf(&p("usr/lib/up"), Node::Symlink(p("../../a")))
            .unwrap();
        assert_eq!(t.leaf(&p("lib/up/x"), Node::Other).unwrap().path, p("a/x"));
        t.leaf(&p("out"), Node::Symlink(p("../.."))).unwrap();
        let err = t.leaf(&p("out/x"), Node::Other).unwrap_err().to_string();
        assert_eq!(err, "out leads outside the root");
        t.leaf(&p("abs"), Node::Symlink(p("/etc"))).unwrap();
        let err = t.leaf(&p("abs/x"), Node::Other).unwrap_err().to_string();
        assert_eq!(err, "symlink abs -> /etc leads outside the root");
        t.leaf(&p("l1"), Node::Symlink(p("l2"))).unwrap();
        t.leaf(&p("l2"), Node::Symlink(p("l1"))).unwrap();
        let err = t.leaf(&p("l1/x"), Node::Other).unwrap_err().to_string();
        assert!(err.contains("too many levels of symlinks"), "{err}");
    }

    #[test]
    fn refuses_kind_changes() {
        let mut t = Tree::fresh_ext4();
        t.dir(&p("d")).unwrap();
        assert!(t.dir(&p("d")).unwrap().exists);
        let err = t
            .leaf(&p("d"), Node::Symlink(p("/")))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "d exists and is a directory");
        assert!(!t.leaf(&p("f"), Node::Other).unwrap().replace);
        let err = t.leaf(&p("f"), Node::Other).unwrap_err().to_string();
        assert!(err.starts_with("f appears twice in the archive"), "{err}");
        let err = t.dir(&p("f")).unwrap_err().to_string();
        assert_eq!(err, "f exists and is not a directory");
        let err = t.leaf(&p("f/x"), Node::Other).unwrap_err().to_string();
        assert_eq!(err, "f is not a directory");
        let err = t
            .leaf(&p("lost+found"), Node::Other)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "lost+found exists and is a directory");
    }

    #[test]
    fn a_file_already_in_the_root_is_replaced_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), b"old").unwrap();
        let mut t = Tree::scan(dir.path()).unwrap();
        assert!(t.leaf(&p("f"), Node::Other).unwrap().replace);
        assert!(t.leaf(&p("f"), Node::Other).is_err());
    }

    #[test]
    fn hard_links_need_an_earlier_non_directory() {
        let mut t = Tree::fresh_ext4();
        t.leaf(&p("f"), Node::Other).unwrap();
        t.dir(&p("d")).unwrap();
        let (step, to) = t.hard_link(&p("d/h"), &p("f")).unwrap().unwrap();
        assert_eq!((step.path, to), (p("d/h"), p("f")));
        assert!(t.hard_link(&p("f"), &p("f")).unwrap().is_none());
        let err = format!("{:#}", t.hard_link(&p("h2"), &p("nope")).unwrap_err());
        assert_eq!(
            err,
            "the link target nope is not in the archive before the link"
        );
        let err = format!("{:#}", t.hard_link(&p("h3"), &p("d")).unwrap_err());
        assert_eq!(err, "the link target d is a directory");
        t.leaf(&p("s"), Node::Symlink(p("/etc"))).unwrap();
        let err = format!("{:#}", t.hard_link(&p("h4"), &p("s/passwd")).unwrap_err());
        assert!(
            err.ends_with("symlink s -> /etc leads outside the root"),
            "{err}"
        );
        // A hard link to a symlink is a symlink.
        t.hard_link(&p("s2"), &p("s")).unwrap();
        assert_eq!(t.get(&p("s2")), Some(&Node::Symlink(p("/etc"))));
    }
}
