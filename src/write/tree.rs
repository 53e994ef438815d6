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
//! Memory: one record of 24 bytes per object, its name (and a symlink's
//! target) in one shared byte arena, and a 4-byte slot in a hash index by
//! (parent, name): about 50 bytes per archive entry, so a tree of 50,000
//! entries takes under 3 MiB (a map of full paths took four times that, and
//! it is the one part of an install that grows with the payload).
//!
//! Limits: symlinks are followed only in parent positions and only when they
//! stay inside the root: absolute targets and `..` above the root are
//! refused, as are more than [`MAX_FOLLOWS`] symlinks in one path (a loop).
//! At most 4 GiB of names and 4 billion objects (refused beyond).

use anyhow::{bail, ensure, Context, Result};
use hashbrown::HashTable;
use std::collections::hash_map::RandomState;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::hash::BuildHasher;
use std::os::unix::ffi::OsStrExt;
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

/// An object's id: its index in [`Tree::recs`]; the root is 0.
type Id = u32;

const ROOT: Id = 0;

/// What kind of object a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    Symlink,
    Other,
}

/// One object of the new root. Names and symlink targets are byte ranges
/// of [`Tree::arena`].
#[derive(Debug, Clone, Copy)]
struct Rec {
    parent: Id,
    name: u32,
    name_len: u32,
    target: u32,
    target_len: u32,
    kind: Kind,
    /// A non-directory this archive made: a second entry at its path is a
    /// duplicate (refused), while a non-directory that was there before the
    /// archive ([`Tree::scan`]) is replaced.
    from_archive: bool,
}

/// The objects of the new root, as records indexed by (parent, name).
pub struct Tree {
    recs: Vec<Rec>,
    arena: Vec<u8>,
    /// Ids of every object but the root, by hash of (parent, name).
    index: HashTable<Id>,
    hasher: RandomState,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tree({} objects)", self.recs.len())
    }
}

impl Default for Tree {
    fn default() -> Tree {
        let root = Rec {
            parent: ROOT,
            name: 0,
            name_len: 0,
            target: 0,
            target_len: 0,
            kind: Kind::Dir,
            from_archive: false,
        };
        Tree {
            recs: vec![root],
            arena: Vec::new(),
            index: HashTable::new(),
            hasher: RandomState::new(),
        }
    }
}

impl Tree {
    /// The namespace of a freshly formatted ext4: an empty root holding
    /// `lost+found`.
    pub fn fresh_ext4() -> Tree {
        let mut tree = Tree::default();
        tree.insert(ROOT, OsStr::new("lost+found"), &Node::Dir, false)
            .expect("one name fits");
        tree
    }

    /// The namespace of what `root` already holds (once, at the start).
    pub fn scan(root: &Path) -> Result<Tree> {
        let mut tree = Tree::default();
        let mut todo = vec![(PathBuf::new(), ROOT)];
        while let Some((dir, id)) = todo.pop() {
            let full = root.join(&dir);
            let entries =
                fs::read_dir(&full).with_context(|| format!("reading {}", full.display()))?;
            for entry in entries {
                let entry = entry.with_context(|| format!("reading {}", full.display()))?;
                let name = entry.file_name();
                let kind = entry
                    .file_type()
                    .with_context(|| format!("reading {}", entry.path().display()))?;
                let node = if kind.is_dir() {
                    Node::Dir
                } else if kind.is_symlink() {
                    let target = fs::read_link(entry.path())
                        .with_context(|| format!("reading {}", entry.path().display()))?;
                    Node::Symlink(target)
                } else {
                    Node::Other
                };
                let child = tree.insert(id, &name, &node, false)?;
                if node == Node::Dir {
                    todo.push((dir.join(&name), child));
                }
            }
        }
        Ok(tree)
    }

    fn hash(&self, parent: Id, name: &[u8]) -> u64 {
        self.hasher.hash_one((parent, name))
    }

    fn name_of(&self, rec: &Rec) -> &[u8] {
        &self.arena[rec.name as usize..(rec.name + rec.name_len) as usize]
    }

    /// The child `name` of the directory `parent`.
    fn child(&self, parent: Id, name: &[u8]) -> Option<Id> {
        let hash = self.hash(parent, name);
        self.index
            .find(hash, |&id| {
                let rec = &self.recs[id as usize];
                rec.parent == parent && self.name_of(rec) == name
            })
            .copied()
    }

    /// Appends `bytes` to the arena; returns where they start.
    fn store(&mut self, bytes: &[u8]) -> Result<(u32, u32)> {
        let start = u32::try_from(self.arena.len()).ok();
        let len = u32::try_from(bytes.len()).ok();
        let end = self.arena.len().checked_add(bytes.len());
        match (start, len, end.and_then(|e| u32::try_from(e).ok())) {
            (Some(start), Some(len), Some(_)) => {
                self.arena.extend_from_slice(bytes);
                Ok((start, len))
            }
            _ => bail!("the archive's names take more than 4 GiB"),
        }
    }

    /// Sets what `id` is.
    fn set_node(&mut self, id: Id, node: &Node) -> Result<()> {
        let (kind, target) = match node {
            Node::Dir => (Kind::Dir, (0, 0)),
            Node::Other => (Kind::Other, (0, 0)),
            Node::Symlink(t) => (Kind::Symlink, self.store(t.as_os_str().as_bytes())?),
        };
        let rec = &mut self.recs[id as usize];
        rec.kind = kind;
        (rec.target, rec.target_len) = target;
        Ok(())
    }

    /// Records the new object `name` in the directory `parent`.
    fn insert(&mut self, parent: Id, name: &OsStr, node: &Node, from_archive: bool) -> Result<Id> {
        let id = Id::try_from(self.recs.len())
            .ok()
            .filter(|&id| id < Id::MAX)
            .context("the archive holds more than 4 billion objects")?;
        let (start, len) = self.store(name.as_bytes())?;
        self.recs.push(Rec {
            parent,
            name: start,
            name_len: len,
            target: 0,
            target_len: 0,
            kind: Kind::Other,
            from_archive,
        });
        self.set_node(id, node)?;
        let hash = self.hash(parent, name.as_bytes());
        let (recs, arena, hasher) = (&self.recs, &self.arena, &self.hasher);
        self.index.insert_unique(hash, id, |&other| {
            let rec = &recs[other as usize];
            let name = &arena[rec.name as usize..(rec.name + rec.name_len) as usize];
            hasher.hash_one((rec.parent, name))
        });
        Ok(id)
    }

    /// What `id` is.
    fn node(&self, id: Id) -> Node {
        let rec = &self.recs[id as usize];
        match rec.kind {
            Kind::Dir => Node::Dir,
            Kind::Other => Node::Other,
            Kind::Symlink => {
                let t = &self.arena[rec.target as usize..(rec.target + rec.target_len) as usize];
                Node::Symlink(PathBuf::from(OsStr::from_bytes(t)))
            }
        }
    }

    /// The object at `path` (a real path relative to the root).
    fn lookup(&self, path: &Path) -> Option<Id> {
        let mut id = ROOT;
        for part in path.iter() {
            id = self.child(id, part.as_bytes())?;
        }
        Some(id)
    }

    /// What is at `path` (a resolved path).
    pub fn get(&self, path: &Path) -> Option<Node> {
        self.lookup(path).map(|id| self.node(id))
    }

    /// Resolves the directory `dir` (relative to the root, as written in
    /// the archive) to a real path and its id, following symlinks that stay
    /// inside the root. Missing directories are added to `mkdirs` (and
    /// recorded) when `create` is set, else refused.
    fn resolve_dir(
        &mut self,
        dir: &Path,
        create: bool,
        mkdirs: &mut Vec<PathBuf>,
    ) -> Result<(PathBuf, Id)> {
        let mut real = PathBuf::new();
        let mut id = ROOT;
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
                    id = self.recs[id as usize].parent;
                    continue;
                }
                Some(Component::RootDir | Component::Prefix(_)) => {
                    bail!("{} leads outside the root", dir.display())
                }
                Some(Component::Normal(_)) => {}
            }
            let next = real.join(&part);
            match self.child(id, part.as_bytes()) {
                Some(child) => match self.node(child) {
                    Node::Dir => (real, id) = (next, child),
                    Node::Symlink(target) => {
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
                    Node::Other => bail!("{} is not a directory", next.display()),
                },
                None if create => {
                    id = self.insert(id, &part, &Node::Dir, false)?;
                    mkdirs.push(next.clone());
                    real = next;
                }
                None => bail!("{} does not exist", next.display()),
            }
        }
        Ok((real, id))
    }

    /// Decides where the directory entry `rel` goes; records it.
    pub fn dir(&mut self, rel: &Path) -> Result<Step> {
        let (mut step, at) = self.place(rel)?;
        let Some((parent, name)) = at else {
            step.exists = true;
            return Ok(step);
        };
        match self.child(parent, name.as_bytes()) {
            Some(id) if self.recs[id as usize].kind == Kind::Dir => step.exists = true,
            Some(_) => bail!("{} exists and is not a directory", step.path.display()),
            None => {
                self.insert(parent, &name, &Node::Dir, false)?;
            }
        }
        Ok(step)
    }

    /// Decides where the non-directory entry `rel` goes (an earlier
    /// non-directory there is replaced); records it as `node`.
    pub fn leaf(&mut self, rel: &Path, node: Node) -> Result<Step> {
        let (mut step, at) = self.place(rel)?;
        let Some((parent, name)) = at else {
            bail!("the root exists and is a directory");
        };
        match self.child(parent, name.as_bytes()) {
            Some(id) => {
                let rec = self.recs[id as usize];
                if rec.kind == Kind::Dir {
                    bail!("{} exists and is a directory", step.path.display());
                }
                if rec.from_archive {
                    bail!(
                        "{} appears twice in the archive; rebuild the payload without duplicate entries",
                        step.path.display()
                    );
                }
                step.replace = true;
                self.recs[id as usize].from_archive = true;
                self.set_node(id, &node)?;
            }
            None => {
                self.insert(parent, &name, &node, true)?;
            }
        }
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
        let (dir, dir_id) = self
            .resolve_dir(parent, false, &mut Vec::new())
            .with_context(|| format!("resolving the link target {}", to.display()))?;
        let source = dir.join(name);
        let node = match self.child(dir_id, name.as_bytes()).map(|id| self.node(id)) {
            None => bail!(
                "the link target {} is not in the archive before the link",
                to.display()
            ),
            Some(Node::Dir) => bail!("the link target {} is a directory", to.display()),
            Some(node) => node,
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        let file = rel
            .file_name()
            .with_context(|| format!("{} has no file name", rel.display()))?;
        // A dry resolution (nothing created): a link to itself changes
        // nothing; errors are left for `leaf` to report.
        let same = matches!(
            self.resolve_dir(parent, false, &mut Vec::new()),
            Ok((p, _)) if p.join(file) == source
        );
        if same {
            return Ok(None);
        }
        let step = self.leaf(rel, node)?;
        Ok(Some((step, source)))
    }

    /// The real path of the entry `rel` with its parents resolved (and the
    /// missing ones recorded for creation), and its parent's id and its own
    /// name (`None` for the root itself).
    fn place(&mut self, rel: &Path) -> Result<(Step, Option<(Id, OsString)>)> {
        let mut mkdirs = Vec::new();
        let (path, at) = match (rel.parent(), rel.file_name()) {
            (Some(parent), Some(name)) => {
                let (dir, id) = self.resolve_dir(parent, true, &mut mkdirs)?;
                (dir.join(name), Some((id, name.to_owned())))
            }
            _ => (PathBuf::new(), None),
        };
        let step = Step {
            path,
            mkdirs,
            replace: false,
            exists: false,
        };
        Ok((step, at))
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
        assert_eq!(t.get(&p("s2")), Some(Node::Symlink(p("/etc"))));
    }
}
