//! Reading a tar stream's headers: PAX extended-header records, GNU long
//! names and old GNU sparse maps, folded into one [`Member`] per archive
//! entry.
//!
//! This exists because the `tar` crate's PAX parser splits records at
//! newline bytes, while PAX records are length-prefixed and their values may
//! hold any byte: GNU tar's multi-line `SCHILY.acl.*` text and binary xattr
//! values (`SCHILY.xattr.system.posix_acl_access`, any user xattr with a
//! `0x0a` byte) made extraction fail or lose xattrs. The crate's raw mode
//! cannot step over old GNU sparse extension blocks or honour a PAX `size`
//! either, so [`TarReader`] reads the 512-byte blocks itself and uses
//! [`tar::Header`] only to decode header fields.
//!
//! Both the installer (`write::tar`) and `bundle create` read archives
//! through [`TarReader`], so they accept and refuse the same archives.
//!
//! Sparse files are read in every form GNU tar writes: old GNU (type `S`,
//! map in the header and extension blocks) and PAX sparse 0.0
//! (`GNU.sparse.offset`/`numbytes` records), 0.1 (`GNU.sparse.map`) and 1.0
//! (`GNU.sparse.major=1`, the map at the start of the entry's data). Times
//! keep their nanoseconds (PAX `mtime`/`atime` fractions) and may be before
//! 1970 (negative PAX times, GNU base-256 header fields).
//!
//! Limits: extension headers are at most [`MAX_EXTENSION`] bytes; global
//! (`g`) records apply to all following entries except `path`, `linkpath`
//! and `size`; unknown records (`ctime`, `comment`, `LIBARCHIVE.*`, ...) are
//! ignored. ACL names in `SCHILY.acl.*` text are kept unresolved here;
//! [`encode_acl`] resolves them.

use anyhow::{anyhow, bail, ensure, Context, Result};
use std::ffi::{OsStr, OsString};
use std::io::{ErrorKind, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use tar::{EntryType, GnuExtSparseHeader, GnuSparseHeader, Header};

/// Size of a tar block.
const BLOCK: u64 = 512;

/// Largest extension header (PAX records, GNU long name or link) accepted.
pub const MAX_EXTENSION: u64 = 1 << 20;

/// Most data regions accepted in a sparse map.
const MAX_SPARSE_REGIONS: usize = 1 << 16;

/// Buffer for member data, reused for every entry.
const DATA_BUFFER: usize = 256 << 10;

/// One PAX record: key and raw value.
pub type Record = (String, Vec<u8>);

/// Parses the data of a PAX extended header into its records, in order.
///
/// Each record is `"%d %s=%s\n"`: a decimal length counting the whole record
/// (its own digits, the space and the final newline), the key, `=` and the
/// value, which may contain any byte, newlines included. NUL bytes after the
/// last record (padding some writers leave) are ignored; anything else that
/// is not a well-formed record is an error naming its byte offset.
pub fn parse_records(data: &[u8]) -> Result<Vec<Record>> {
    ensure!(
        data.len() as u64 <= MAX_EXTENSION,
        "PAX header of {} bytes is larger than the {MAX_EXTENSION} bytes supported",
        data.len()
    );
    let mut records = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let rest = &data[pos..];
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let bad = |why: &str| anyhow!("malformed pax record at byte {pos}: {why}");
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return Err(bad("it does not start with a length"));
        }
        if rest.get(digits) != Some(&b' ') {
            return Err(bad("no space after the length"));
        }
        let len: usize = std::str::from_utf8(&rest[..digits])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("the length is out of range"))?;
        if len < digits + 3 {
            return Err(bad(&format!("length {len} is too short for a record")));
        }
        if len > rest.len() {
            return Err(bad(&format!(
                "length {len} runs past the end of the header ({} bytes left)",
                rest.len()
            )));
        }
        let record = &rest[..len];
        if record[len - 1] != b'\n' {
            return Err(bad("the record does not end with a newline"));
        }
        let body = &record[digits + 1..len - 1];
        let eq = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("no '=' in the record"))?;
        let key = std::str::from_utf8(&body[..eq]).map_err(|_| bad("the key is not UTF-8"))?;
        if key.is_empty() {
            return Err(bad("the key is empty"));
        }
        records.push((key.to_string(), body[eq + 1..].to_vec()));
        pos += len;
    }
    Ok(records)
}

/// ACL entry tags, as stored in `system.posix_acl_*` xattrs.
pub const ACL_USER_OBJ: u16 = 0x01;
/// A named user.
pub const ACL_USER: u16 = 0x02;
/// The owning group.
pub const ACL_GROUP_OBJ: u16 = 0x04;
/// A named group.
pub const ACL_GROUP: u16 = 0x08;
/// The mask.
pub const ACL_MASK: u16 = 0x10;
/// Everyone else.
pub const ACL_OTHER: u16 = 0x20;

/// Version of the `system.posix_acl_*` xattr format.
const ACL_XATTR_VERSION: u32 = 2;

/// Id stored for entries without a qualifier.
const ACL_UNDEFINED_ID: u32 = u32::MAX;

/// Who an ACL entry is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AclWho {
    /// Owner, owning group, mask or other: no qualifier.
    Nobody,
    /// A numeric user or group id.
    Id(u32),
    /// A user or group name, resolved by [`encode_acl`].
    Name(String),
}

/// One entry of a POSIX ACL in text form (`user:1234:r--`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclEntry {
    /// One of the `ACL_*` tags.
    pub tag: u16,
    /// Permission bits: 4 read, 2 write, 1 execute.
    pub perm: u16,
    /// The qualifier.
    pub who: AclWho,
}

/// Parses the text form of an ACL as GNU tar stores it in `SCHILY.acl.access`
/// and `SCHILY.acl.default` (`acl_to_text`: one entry a line, also accepted
/// comma-separated, `#` comments ignored).
pub fn parse_acl_text(text: &[u8]) -> Result<Vec<AclEntry>> {
    let text = std::str::from_utf8(text).context("the ACL text is not UTF-8")?;
    let mut entries = Vec::new();
    for raw in text.split(['\n', ',']) {
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(':').map(str::trim).collect();
        let (tag, qualifier, perm) = match fields.as_slice() {
            [tag, qualifier, perm] => (*tag, *qualifier, *perm),
            // acl_from_text accepts "mask:rwx" and "other:rwx".
            [tag @ ("mask" | "m" | "other" | "o"), perm] => (*tag, "", *perm),
            _ => bail!("malformed ACL entry {line:?}"),
        };
        let (obj, named) = match tag {
            "user" | "u" => (ACL_USER_OBJ, Some(ACL_USER)),
            "group" | "g" => (ACL_GROUP_OBJ, Some(ACL_GROUP)),
            "mask" | "m" => (ACL_MASK, None),
            "other" | "o" => (ACL_OTHER, None),
            _ => bail!("unknown tag in ACL entry {line:?}"),
        };
        let (tag, who) = match (qualifier, named) {
            ("", _) => (obj, AclWho::Nobody),
            (q, Some(named)) => match q.parse() {
                Ok(id) => (named, AclWho::Id(id)),
                Err(_) => (named, AclWho::Name(q.to_string())),
            },
            (_, None) => bail!("ACL entry {line:?} takes no qualifier"),
        };
        let mut bits = 0;
        for c in perm.chars() {
            bits |= match c {
                'r' => 4,
                'w' => 2,
                'x' => 1,
                '-' => 0,
                _ => bail!("invalid permissions in ACL entry {line:?}"),
            };
        }
        entries.push(AclEntry {
            tag,
            perm: bits,
            who,
        });
    }
    Ok(entries)
}

/// Encodes ACL entries in the `system.posix_acl_access` /
/// `system.posix_acl_default` xattr format: version 2, then (tag, perm, id)
/// little-endian, sorted by tag then id. Names are resolved with `lookup`
/// (`true` for a user, `false` for a group).
pub fn encode_acl(
    entries: &[AclEntry],
    lookup: impl Fn(bool, &str) -> Option<u32>,
) -> Result<Vec<u8>> {
    let mut resolved = Vec::with_capacity(entries.len());
    for e in entries {
        let id = match &e.who {
            AclWho::Nobody => ACL_UNDEFINED_ID,
            AclWho::Id(id) => *id,
            AclWho::Name(name) => {
                let user = e.tag == ACL_USER;
                lookup(user, name).with_context(|| {
                    format!(
                        "the ACL names {} {name:?}, which is unknown on this system; \
                         pack the tree with --xattrs --xattrs-include='*' to keep numeric ACLs",
                        if user { "user" } else { "group" }
                    )
                })?
            }
        };
        resolved.push((e.tag, e.perm, id));
    }
    resolved.sort_by_key(|&(tag, _, id)| (tag, id));
    let mut out = Vec::with_capacity(4 + 8 * resolved.len());
    out.extend_from_slice(&ACL_XATTR_VERSION.to_le_bytes());
    for (tag, perm, id) in resolved {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Ok(out)
}

/// A data region of a sparse file: where it goes in the file and how many
/// bytes of the archive data it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Offset in the extracted file.
    pub offset: u64,
    /// Length of the data.
    pub len: u64,
}

/// A point in time: seconds since 1970 (negative before) and nanoseconds
/// after them (`secs = -2, nanos = 500_000_000` is 1.5 s before 1970).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Time {
    /// Whole seconds, rounded down.
    pub secs: i64,
    /// Nanoseconds, `0..1_000_000_000`.
    pub nanos: u32,
}

/// One archive entry with its extension headers applied.
#[derive(Debug, Clone)]
pub struct Member {
    /// The path for messages (lossy UTF-8 of `path`).
    pub name: String,
    /// Entry path: PAX `path`, else the GNU long name, else the header's.
    pub path: PathBuf,
    /// Link target: PAX `linkpath`, else the GNU long link, else the header's.
    pub link: Option<PathBuf>,
    /// Entry type from the header.
    pub kind: EntryType,
    /// Permission bits, setuid, setgid and sticky included.
    pub mode: u32,
    /// Owner: PAX `uid`, else the header's.
    pub uid: u32,
    /// Group: PAX `gid`, else the header's.
    pub gid: u32,
    /// Modification time: PAX `mtime` (with its fraction), else the header's.
    pub mtime: Time,
    /// Access time: PAX `atime`, else `mtime` (as GNU tar restores it).
    pub atime: Time,
    /// Device major and minor numbers, when the header holds valid ones.
    pub device: Option<(u32, u32)>,
    /// Data bytes stored in the archive: PAX `size`, else the header's.
    pub size: u64,
    /// Size of the file it makes: `size`, or the real size of a sparse file.
    pub file_size: u64,
    /// Data regions of a sparse file (old GNU or PAX sparse), in file order.
    pub sparse: Option<Vec<Region>>,
    /// Extended attributes from `SCHILY.xattr.*` records.
    pub xattrs: Vec<(OsString, Vec<u8>)>,
    /// `SCHILY.acl.access` / `SCHILY.acl.default` text, parsed, keyed by the
    /// xattr it becomes; only for ACLs not also stored as that xattr.
    pub acls: Vec<(&'static str, Vec<AclEntry>)>,
}

/// Reads a tar stream entry by entry, applying PAX (local and global), GNU
/// long name/link and old GNU sparse headers. Reads exactly the bytes it
/// needs, so [`TarReader::into_inner`] hands back the stream just after the
/// first end-of-archive block.
pub struct TarReader<R> {
    inner: R,
    /// Data bytes of the current member not read yet.
    remaining: u64,
    /// Padding after the current member's data.
    padding: u64,
    /// Member data goes through here.
    buf: Vec<u8>,
    /// Records of PAX global headers seen so far.
    globals: Vec<Record>,
    /// The last member returned, for messages.
    last: Option<String>,
    done: bool,
}

impl<R: Read> TarReader<R> {
    /// Reads the tar stream `inner`; wrap it in a `BufReader` if its reads
    /// are expensive (headers are read 512 bytes at a time).
    pub fn new(inner: R) -> Self {
        TarReader {
            inner,
            remaining: 0,
            padding: 0,
            buf: vec![0; DATA_BUFFER],
            globals: Vec::new(),
            last: None,
            done: false,
        }
    }

    /// The stream, positioned after the last block read.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Where in the stream we are, for messages.
    fn context(&self) -> String {
        match &self.last {
            Some(name) => format!("reading the tar stream after entry {name}"),
            None => "reading the tar stream".to_string(),
        }
    }

    /// The next member, skipping what is left of the current one's data;
    /// `None` at the end of the archive.
    pub fn next_member(&mut self) -> Result<Option<Member>> {
        if self.done {
            return Ok(None);
        }
        self.skip_data().with_context(|| {
            format!(
                "reading tar entry {}",
                self.last.as_deref().unwrap_or_default()
            )
        })?;
        let mut long_name = None;
        let mut long_link = None;
        let mut local: Option<Vec<Record>> = None;
        loop {
            let header = self.read_header().with_context(|| self.context())?;
            let Some(header) = header else {
                self.done = true;
                if long_name.is_some() || long_link.is_some() || local.is_some() {
                    return Err(anyhow!(
                        "the archive ends after an extension header, without the entry it describes"
                    ))
                    .with_context(|| self.context());
                }
                return Ok(None);
            };
            let size = header
                .entry_size()
                .map_err(|e| anyhow!("invalid size in a tar header: {e}"))
                .with_context(|| self.context())?;
            match header.entry_type() {
                EntryType::XHeader => {
                    let data = self.read_extension(size, "PAX header")?;
                    let records = parse_records(&data).with_context(|| self.context())?;
                    ensure!(
                        local.is_none(),
                        "{}: two PAX headers for one entry",
                        self.context()
                    );
                    local = Some(records);
                }
                EntryType::XGlobalHeader => {
                    let data = self.read_extension(size, "PAX global header")?;
                    let records = parse_records(&data).with_context(|| self.context())?;
                    self.globals.extend(records);
                }
                EntryType::GNULongName => {
                    ensure!(
                        long_name.is_none(),
                        "{}: two GNU long names for one entry",
                        self.context()
                    );
                    long_name = Some(self.read_extension(size, "GNU long name")?);
                }
                EntryType::GNULongLink => {
                    ensure!(
                        long_link.is_none(),
                        "{}: two GNU long link names for one entry",
                        self.context()
                    );
                    long_link = Some(self.read_extension(size, "GNU long link name")?);
                }
                _ => {
                    let member = self.member(
                        &header,
                        size,
                        long_name,
                        long_link,
                        local.unwrap_or_default(),
                    )?;
                    return Ok(Some(member));
                }
            }
        }
    }

    /// Reads up to `max` bytes of the current member's data; an empty slice
    /// once all of it was read. A stream ending early is an error.
    pub fn data(&mut self, max: u64) -> Result<&[u8]> {
        let want = self.remaining.min(max).min(self.buf.len() as u64) as usize;
        if want == 0 {
            return Ok(&[]);
        }
        let got = loop {
            match self.inner.read(&mut self.buf[..want]) {
                Ok(0) => bail!("the tar stream ends inside the entry's data"),
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading the entry's data"),
            }
        };
        self.remaining -= got as u64;
        Ok(&self.buf[..got])
    }

    /// Skips the rest of the current member's data and its padding.
    fn skip_data(&mut self) -> Result<()> {
        while !self.data(u64::MAX)?.is_empty() {}
        let padding = self.padding as usize;
        self.padding = 0;
        self.inner
            .read_exact(&mut self.buf[..padding])
            .context("reading the padding after an entry")?;
        Ok(())
    }

    /// Reads one 512-byte block; `false` on a clean end of stream.
    fn read_block(&mut self, block: &mut [u8]) -> Result<bool> {
        let mut read = 0;
        while read < block.len() {
            match self.inner.read(&mut block[read..]) {
                Ok(0) if read == 0 => return Ok(false),
                Ok(0) => bail!("the tar stream ends inside a header"),
                Ok(n) => read += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// The next header with a valid checksum; `None` at an end-of-archive
    /// (zero) block or at the end of the stream.
    fn read_header(&mut self) -> Result<Option<Header>> {
        let mut header = Header::new_old();
        if !self.read_block(header.as_mut_bytes())? {
            return Ok(None);
        }
        let bytes = header.as_bytes();
        if bytes.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let stored = header
            .cksum()
            .map_err(|e| anyhow!("invalid checksum field in a tar header: {e}"))?;
        let spaces = 8 * u32::from(b' ');
        let fields = bytes[..148].iter().chain(&bytes[156..]);
        let unsigned: u32 = fields.clone().map(|&b| u32::from(b)).sum::<u32>() + spaces;
        // Some old writers summed signed bytes.
        let signed: i64 = fields.map(|&b| i64::from(b as i8)).sum::<i64>() + i64::from(spaces);
        ensure!(
            stored == unsigned || i64::from(stored) == signed,
            "tar header checksum mismatch; this is not a tar archive or it is corrupt"
        );
        Ok(Some(header))
    }

    /// Reads the data of an extension header (PAX records or a GNU long
    /// name), bounded by [`MAX_EXTENSION`].
    fn read_extension(&mut self, size: u64, what: &str) -> Result<Vec<u8>> {
        ensure!(
            size <= MAX_EXTENSION,
            "{}: {what} of {size} bytes is larger than the {MAX_EXTENSION} bytes supported",
            self.context()
        );
        let mut data = vec![0; size as usize];
        let padded = size.div_ceil(BLOCK) * BLOCK;
        let mut padding = vec![0; (padded - size) as usize];
        self.inner
            .read_exact(&mut data)
            .and_then(|()| self.inner.read_exact(&mut padding))
            .with_context(|| format!("{}: reading a {what}", self.context()))?;
        Ok(data)
    }

    /// Builds the member for `header`, applying the extension headers read
    /// before it, and sets up reading its data.
    fn member(
        &mut self,
        header: &Header,
        size: u64,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        local: Vec<Record>,
    ) -> Result<Member> {
        let records: Vec<&Record> = self
            .globals
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "path" | "linkpath" | "size"))
            .chain(&local)
            .collect();
        let value = |key: &str| last_value(records.iter().copied(), key).filter(|v| !v.is_empty());

        // PAX sparse files carry their real name in GNU.sparse.name; the
        // header (or `path`) holds a made-up one.
        let path = match (value("GNU.sparse.name"), value("path"), long_name) {
            (Some(p), _, _) | (None, Some(p), _) => p.to_vec(),
            (None, None, Some(p)) => trim_nul(p),
            (None, None, None) => header.path_bytes().into_owned(),
        };
        let link = match (value("linkpath"), long_link) {
            (Some(p), _) => Some(p.to_vec()),
            (None, Some(p)) => Some(trim_nul(p)),
            (None, None) => header.link_name_bytes().map(|l| l.into_owned()),
        };
        let name = String::from_utf8_lossy(&path).into_owned();
        self.last = Some(name.clone());

        let bad = |what: &str| format!("refusing tar entry {name}: invalid {what}");
        let id = |key: &str, field: std::io::Result<u64>| -> Result<u32> {
            let v = match value(key) {
                Some(v) => parse_u64(v).with_context(|| bad(&format!("PAX {key} record")))?,
                None => field.with_context(|| bad(&format!("{key} in header")))?,
            };
            u32::try_from(v).with_context(|| bad(key))
        };
        let uid = id("uid", header.uid())?;
        let gid = id("gid", header.gid())?;
        let mtime = match value("mtime") {
            Some(v) => parse_time(v).with_context(|| bad("PAX mtime record"))?,
            None => Time {
                secs: header_number(&header.as_old().mtime)
                    .with_context(|| bad("mtime in header"))?,
                nanos: 0,
            },
        };
        let atime = match value("atime") {
            Some(v) => parse_time(v).with_context(|| bad("PAX atime record"))?,
            None => mtime,
        };
        let mode = header.mode().with_context(|| bad("mode in header"))? & 0o7777;
        let size = match value("size") {
            Some(v) => parse_u64(v).with_context(|| bad("PAX size record"))?,
            None => size,
        };
        let device = match (header.device_major(), header.device_minor()) {
            (Ok(Some(major)), Ok(Some(minor))) => Some((major, minor)),
            _ => None,
        };

        let mut xattrs: Vec<(OsString, Vec<u8>)> = Vec::new();
        let mut acl_text: Vec<(&'static str, &[u8])> = Vec::new();
        for (key, v) in &records {
            if let Some(attr) = key.strip_prefix("SCHILY.xattr.") {
                let attr = OsStr::new(attr).to_owned();
                xattrs.retain(|(k, _)| *k != attr);
                xattrs.push((attr, v.clone()));
            } else if key == "SCHILY.acl.access" {
                acl_text.retain(|(k, _)| *k != "system.posix_acl_access");
                acl_text.push(("system.posix_acl_access", v));
            } else if key == "SCHILY.acl.default" {
                acl_text.retain(|(k, _)| *k != "system.posix_acl_default");
                acl_text.push(("system.posix_acl_default", v));
            }
        }
        let mut acls = Vec::new();
        for (attr, text) in acl_text {
            // GNU tar with --xattrs-include='*' stores the same ACL as the
            // exact binary xattr too; that one wins.
            if xattrs.iter().any(|(k, _)| k.as_bytes() == attr.as_bytes()) {
                continue;
            }
            let entries = parse_acl_text(text)
                .with_context(|| format!("refusing tar entry {name}: invalid {attr} ACL text"))?;
            if !entries.is_empty() {
                acls.push((attr, entries));
            }
        }

        let kind = header.entry_type();
        self.remaining = size;
        self.padding = size.div_ceil(BLOCK) * BLOCK - size;
        // Owned: reading a 1.0 map from the data needs `self`.
        let sparse_records: Vec<Record> = records
            .iter()
            .filter(|(k, _)| k.starts_with("GNU.sparse."))
            .map(|&r| r.clone())
            .collect();
        let (sparse, file_size, size) = if kind.is_gnu_sparse() {
            let (regions, real) = self.sparse_map(header, &name, size)?;
            (Some(regions), real, size)
        } else if !sparse_records.is_empty() && kind.is_file() {
            let (regions, real, stored) = self
                .pax_sparse_map(&sparse_records, size)
                .with_context(|| format!("refusing tar entry {name}: invalid PAX sparse map"))?;
            (Some(regions), real, stored)
        } else {
            (None, size, size)
        };

        Ok(Member {
            name,
            path: PathBuf::from(OsString::from_vec(path)),
            link: link.map(|l| PathBuf::from(OsString::from_vec(l))),
            kind,
            mode,
            uid,
            gid,
            mtime,
            atime,
            device,
            size,
            file_size,
            sparse,
            xattrs,
            acls,
        })
    }

    /// Reads and checks the sparse map of an old GNU sparse entry (in its
    /// header and the extension blocks after it); returns the regions and
    /// the real file size.
    fn sparse_map(&mut self, header: &Header, name: &str, size: u64) -> Result<(Vec<Region>, u64)> {
        let bad = |what: &str| anyhow!("refusing tar entry {name}: invalid sparse map: {what}");
        let gnu = header
            .as_gnu()
            .ok_or_else(|| bad("a sparse entry needs a GNU header"))?;
        let real = gnu.real_size().map_err(|e| bad(&e.to_string()))?;
        let mut regions = Vec::new();
        let mut add = |blocks: &[GnuSparseHeader]| -> Result<()> {
            for block in blocks.iter().filter(|b| !b.is_empty()) {
                let offset = block.offset().map_err(|e| bad(&e.to_string()))?;
                let len = block.length().map_err(|e| bad(&e.to_string()))?;
                regions.push(Region { offset, len });
            }
            ensure!(regions.len() <= MAX_SPARSE_REGIONS, bad("too many regions"));
            Ok(())
        };
        add(&gnu.sparse)?;
        let mut extended = gnu.is_extended();
        while extended {
            let mut ext = GnuExtSparseHeader::new();
            let read = self
                .read_block(ext.as_mut_bytes())
                .with_context(|| format!("reading the sparse map of tar entry {name}"))?;
            if !read {
                return Err(bad("the tar stream ends inside it"));
            }
            add(ext.sparse())?;
            extended = ext.is_extended();
        }
        check_regions(&regions, real, size).map_err(|e| bad(&e.to_string()))?;
        Ok((regions, real))
    }

    /// Reads the map of a PAX sparse entry (GNU tar `--format=posix
    /// --sparse`): from `GNU.sparse.offset`/`numbytes` records (0.0),
    /// `GNU.sparse.map` (0.1), or the start of the entry's data (1.0, where
    /// the map fills whole blocks ahead of the file data). Returns the
    /// regions, the real size and the data bytes left after the map.
    fn pax_sparse_map(&mut self, records: &[Record], size: u64) -> Result<(Vec<Region>, u64, u64)> {
        let value = |key: &str| last_value(records.iter(), key);
        let number = |key: &str| -> Result<Option<u64>> {
            value(key)
                .map(|v| parse_u64(v).with_context(|| format!("the {key} record")))
                .transpose()
        };
        let version = (value("GNU.sparse.major"), value("GNU.sparse.minor"));
        let (regions, real, stored) = match version {
            (Some(b"1"), Some(b"0")) => {
                let real =
                    number("GNU.sparse.realsize")?.context("no GNU.sparse.realsize record")?;
                let numbers = self.read_map_in_data()?;
                let (count, pairs) = numbers.split_first().context("the map is empty")?;
                ensure!(
                    pairs.len() as u64 == count.saturating_mul(2),
                    "the map announces {count} regions but lists {}",
                    pairs.len() / 2
                );
                (pairs_to_regions(pairs)?, real, self.remaining)
            }
            (None, None) => {
                let real = number("GNU.sparse.size")?.context("no GNU.sparse.size record")?;
                let numbers: Vec<u64> = if let Some(map) = value("GNU.sparse.map") {
                    let map = std::str::from_utf8(map).context("the map is not text")?;
                    map.split(',')
                        .filter(|s| !s.is_empty())
                        .map(|n| parse_u64(n.as_bytes()))
                        .collect::<Result<_>>()?
                } else {
                    records
                        .iter()
                        .filter(|(k, _)| k == "GNU.sparse.offset" || k == "GNU.sparse.numbytes")
                        .map(|(k, v)| parse_u64(v).with_context(|| format!("the {k} record")))
                        .collect::<Result<_>>()?
                };
                if let Some(n) = number("GNU.sparse.numblocks")? {
                    ensure!(
                        numbers.len() as u64 == n.saturating_mul(2),
                        "GNU.sparse.numblocks says {n} regions, the map lists {}",
                        numbers.len() / 2
                    );
                }
                (pairs_to_regions(&numbers)?, real, size)
            }
            (major, minor) => bail!(
                "PAX sparse format {}.{} is not supported (GNU tar writes 0.0, 0.1 and 1.0)",
                String::from_utf8_lossy(major.unwrap_or(b"?")),
                String::from_utf8_lossy(minor.unwrap_or(b"?"))
            ),
        };
        check_regions(&regions, real, stored)?;
        Ok((regions, real, stored))
    }

    /// Reads the decimal numbers, one a line, of a PAX sparse 1.0 map from
    /// the entry's data: the count of regions, then offset and length of
    /// each; the map is padded to a whole block.
    fn read_map_in_data(&mut self) -> Result<Vec<u64>> {
        let mut numbers = Vec::new();
        let mut current: Option<u64> = None;
        let mut wanted: Option<u64> = None;
        let mut block = [0u8; BLOCK as usize];
        loop {
            ensure!(
                self.remaining >= BLOCK,
                "the entry's data ends inside the map"
            );
            ensure!(
                self.read_block(&mut block)?,
                "the tar stream ends inside the map"
            );
            self.remaining -= BLOCK;
            for &b in &block {
                if wanted.is_some_and(|w| numbers.len() as u64 == w) {
                    break;
                }
                match b {
                    b'0'..=b'9' => {
                        let n = current.unwrap_or(0);
                        current = Some(
                            n.checked_mul(10)
                                .and_then(|n| n.checked_add(u64::from(b - b'0')))
                                .context("a number in the map is out of range")?,
                        );
                    }
                    b'\n' => {
                        let n = current.take().context("an empty line in the map")?;
                        if wanted.is_none() {
                            ensure!(n <= MAX_SPARSE_REGIONS as u64, "too many regions");
                            wanted = Some(1 + 2 * n);
                        }
                        numbers.push(n);
                    }
                    _ => bail!("unexpected byte {b:#04x} in the map"),
                }
            }
            if wanted.is_some_and(|w| numbers.len() as u64 == w) {
                return Ok(numbers);
            }
        }
    }
}

/// The value of the last record named `key`.
fn last_value<'a>(
    records: impl DoubleEndedIterator<Item = &'a Record>,
    key: &str,
) -> Option<&'a [u8]> {
    records
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_slice())
}

/// A GNU long name or link: the data up to its first NUL.
fn trim_nul(mut data: Vec<u8>) -> Vec<u8> {
    if let Some(end) = data.iter().position(|&b| b == 0) {
        data.truncate(end);
    }
    data
}

fn parse_u64(v: &[u8]) -> Result<u64> {
    std::str::from_utf8(v)
        .ok()
        .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{:?} is not a number", String::from_utf8_lossy(v)))
}

/// A PAX time (`[-]seconds[.fraction]`), exact to the nanosecond (further
/// digits are cut, rounding towards the past as GNU tar does).
fn parse_time(v: &[u8]) -> Result<Time> {
    let bad = || format!("{:?} is not a time", String::from_utf8_lossy(v));
    let s = std::str::from_utf8(v).ok().with_context(bad)?;
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = int.strip_prefix('-').unwrap_or(int);
    ensure!(
        !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && frac.bytes().all(|b| b.is_ascii_digit()),
        bad()
    );
    let secs: i64 = int.parse().ok().with_context(bad)?;
    let mut nanos = 0u32;
    for (i, b) in frac.bytes().enumerate() {
        if i == 9 {
            // Below a nanosecond: only matters for rounding negative times.
            if int.starts_with('-') && frac[9..].bytes().any(|b| b != b'0') {
                nanos += 1;
            }
            break;
        }
        nanos = nanos * 10 + u32::from(b - b'0');
    }
    for _ in frac.len()..9 {
        nanos *= 10;
    }
    if int.starts_with('-') && nanos > 0 {
        // -1.25 is 1.25 s before 1970: second -2, plus 0.75 s.
        let secs = secs.checked_sub(1).with_context(bad)?;
        return Ok(Time {
            secs,
            nanos: 1_000_000_000 - nanos,
        });
    }
    Ok(Time { secs, nanos })
}

/// A numeric header field (mtime) as GNU tar reads it: octal, or base-256
/// two's complement when its first byte has the top bit set (GNU tar writes
/// times before 1970 and after 2242 that way).
fn header_number(field: &[u8]) -> Result<i64> {
    match field.first() {
        Some(&first) if first & 0x80 != 0 => {
            let mut v = i128::from(first & 0x3f) - i128::from(first & 0x40);
            for &b in &field[1..] {
                v = v
                    .checked_mul(256)
                    .and_then(|v| v.checked_add(i128::from(b)))
                    .context("the base-256 number is out of range")?;
            }
            i64::try_from(v).context("the base-256 number is out of range")
        }
        _ => {
            let text = std::str::from_utf8(field).context("the field is not ASCII")?;
            let text = text.trim_matches(|c: char| c == ' ' || c == '\0');
            if text.is_empty() {
                return Ok(0);
            }
            i64::from_str_radix(text, 8).with_context(|| format!("{text:?} is not an octal number"))
        }
    }
}

/// Checks a sparse map against the entry: regions in order, not overlapping,
/// inside the file, and holding exactly the `stored` data bytes.
fn check_regions(regions: &[Region], real: u64, stored: u64) -> Result<()> {
    ensure!(regions.len() <= MAX_SPARSE_REGIONS, "too many regions");
    let (mut end, mut total) = (0u64, 0u64);
    for r in regions {
        ensure!(r.offset >= end, "regions overlap or are out of order");
        end = r.offset.checked_add(r.len).context("a region overflows")?;
        total += r.len;
    }
    ensure!(end <= real, "a region ends beyond the file size");
    ensure!(
        total == stored,
        "regions hold {total} bytes, the entry stores {stored}"
    );
    Ok(())
}

/// Pairs of numbers (`offset, length, ...`) as regions.
fn pairs_to_regions(numbers: &[u64]) -> Result<Vec<Region>> {
    ensure!(
        numbers.len().is_multiple_of(2),
        "the map has an odd count of numbers"
    );
    ensure!(numbers.len() / 2 <= MAX_SPARSE_REGIONS, "too many regions");
    Ok(numbers
        .chunks(2)
        .map(|c| Region {
            offset: c[0],
            len: c[1],
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, value: &[u8]) -> Vec<u8> {
        let body = 1 + key.len() + 1 + value.len() + 1;
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        let mut r = format!("{len} {key}=").into_bytes();
        r.extend_from_slice(value);
        r.push(b'\n');
        assert_eq!(r.len(), len);
        r
    }

    #[test]
    fn parses_records_with_newlines_in_values() {
        let mut data = record("mtime", b"1795409514.512196421");
        data.extend(record(
            "SCHILY.acl.access",
            b"user::rw-\nuser:1234:r--\ngroup::r--\nmask::r--\nother::r--\n",
        ));
        data.extend(record("SCHILY.xattr.user.bin", &[0x0a, 0, 0xff, 0x0a]));
        data.extend(record("SCHILY.xattr.user.empty", b""));
        data.extend(record("path", "ünïcode/naïve".as_bytes()));
        let recs = parse_records(&data).unwrap();
        assert_eq!(
            recs,
            vec![
                ("mtime".to_string(), b"1795409514.512196421".to_vec()),
                (
                    "SCHILY.acl.access".to_string(),
                    b"user::rw-\nuser:1234:r--\ngroup::r--\nmask::r--\nother::r--\n".to_vec()
                ),
                (
                    "SCHILY.xattr.user.bin".to_string(),
                    vec![0x0a, 0, 0xff, 0x0a]
                ),
                ("SCHILY.xattr.user.empty".to_string(), Vec::new()),
                ("path".to_string(), "ünïcode/naïve".as_bytes().to_vec()),
            ]
        );
        // Trailing NUL padding is tolerated; nothing is no records.
        data.extend([0; 7]);
        assert_eq!(parse_records(&data).unwrap().len(), 5);
        assert!(parse_records(b"").unwrap().is_empty());
        // A value holding "=" keeps it; the key ends at the first one.
        assert_eq!(
            parse_records(b"11 a=b=c=d\n").unwrap(),
            vec![("a".to_string(), b"b=c=d".to_vec())]
        );
    }

    #[test]
    fn refuses_garbage() {
        let good = record("uid", b"1000");
        for (data, want) in [
            (
                &b"garbage"[..],
                "malformed pax record at byte 0: it does not start with a length",
            ),
            (
                b"12uid=1000\n",
                "malformed pax record at byte 0: no space after the length",
            ),
            (
                b"99 uid=1000\n",
                "malformed pax record at byte 0: length 99 runs past the end",
            ),
            (
                b"3 a\n",
                "malformed pax record at byte 0: length 3 is too short",
            ),
            (
                b"12 uid=1000",
                "malformed pax record at byte 0: length 12 runs past the end",
            ),
            (
                b"10 uid=100x",
                "malformed pax record at byte 0: the record does not end",
            ),
            (
                b"11 uid1000\n",
                "malformed pax record at byte 0: no '=' in the record",
            ),
            (
                b"7 =abc\n",
                "malformed pax record at byte 0: the key is empty",
            ),
            (
                b"99999999999999999999999 a=b\n",
                "malformed pax record at byte 0: the length is out",
            ),
        ] {
            let err = format!("{:#}", parse_records(data).unwrap_err());
            assert!(
                err.starts_with(want),
                "{:?}: {err}",
                String::from_utf8_lossy(data)
            );
        }
        // The offset names the bad record.
        let mut data = good.clone();
        data.extend(b"x\n");
        let err = parse_records(&data).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("malformed pax record at byte {}:", good.len())),
            "{err}"
        );
        // Length counts bytes, so a length one short of the newline fails.
        let err = parse_records(b"9 uid=1000\n").unwrap_err().to_string();
        assert!(err.contains("does not end with a newline"), "{err}");
        let big = vec![b'1'; MAX_EXTENSION as usize + 1];
        let err = parse_records(&big).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
    }

    #[test]
    fn acl_text_round_trips_to_the_xattr_format() {
        // What GNU tar 1.34 writes for `setfacl -m u:1234:rw,m::rw`.
        let text = b"user::rw-\nuser:1234:rw-\ngroup::r--\nmask::rw-\nother::r--\n";
        let entries = parse_acl_text(text).unwrap();
        let xattr = encode_acl(&entries, |_, _| None).unwrap();
        assert_eq!(
            xattr,
            [
                2, 0, 0, 0, //
                0x01, 0, 6, 0, 0xff, 0xff, 0xff, 0xff, //
                0x02, 0, 6, 0, 0xd2, 0x04, 0, 0, //
                0x04, 0, 4, 0, 0xff, 0xff, 0xff, 0xff, //
                0x10, 0, 6, 0, 0xff, 0xff, 0xff, 0xff, //
                0x20, 0, 4, 0, 0xff, 0xff, 0xff, 0xff,
            ]
        );
        // Sorted by tag then id whatever the text order; names resolved;
        // short tags, commas and comments accepted.
        let entries =
            parse_acl_text(b"o::---,g:staff:r-x #effective:r--\nu::rwx,g:7:rw-,m:rwx,g::---,u:0:r")
                .unwrap();
        let xattr = encode_acl(&entries, |user, name| {
            assert!(!user);
            (name == "staff").then_some(50)
        })
        .unwrap();
        let triples: Vec<(u16, u16, u32)> = xattr[4..]
            .chunks(8)
            .map(|c| {
                (
                    u16::from_le_bytes([c[0], c[1]]),
                    u16::from_le_bytes([c[2], c[3]]),
                    u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                )
            })
            .collect();
        assert_eq!(
            triples,
            vec![
                (ACL_USER_OBJ, 7, u32::MAX),
                (ACL_USER, 4, 0),
                (ACL_GROUP_OBJ, 0, u32::MAX),
                (ACL_GROUP, 6, 7),
                (ACL_GROUP, 5, 50),
                (ACL_MASK, 7, u32::MAX),
                (ACL_OTHER, 0, u32::MAX),
            ]
        );

        let err = format!(
            "{:#}",
            encode_acl(&parse_acl_text(b"user:nosuchuser:r--").unwrap(), |_, _| {
                None
            })
            .unwrap_err()
        );
        assert!(
            err.contains("user \"nosuchuser\", which is unknown"),
            "{err}"
        );
        for bad in [
            &b"user:rwx"[..],
            b"bogus::rwx",
            b"mask:1:rwx",
            b"user::rwz",
            b"a:b:c:d",
        ] {
            assert!(
                parse_acl_text(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn parses_pax_times() {
        let t = |secs, nanos| Time { secs, nanos };
        assert_eq!(
            parse_time(b"1795409514.512196421").unwrap(),
            t(1_795_409_514, 512_196_421)
        );
        assert_eq!(parse_time(b"42").unwrap(), t(42, 0));
        assert_eq!(parse_time(b"42.5").unwrap(), t(42, 500_000_000));
        assert_eq!(parse_time(b"42.0000000019").unwrap(), t(42, 1));
        assert_eq!(parse_time(b"-1.5").unwrap(), t(-2, 500_000_000));
        assert_eq!(parse_time(b"-0.25").unwrap(), t(-1, 750_000_000));
        assert_eq!(parse_time(b"-3.000").unwrap(), t(-3, 0));
        // Below a nanosecond, a time before 1970 rounds to the past.
        assert_eq!(parse_time(b"-1.0000000001").unwrap(), t(-2, 999_999_999));
        assert_eq!(parse_time(b"-315619200").unwrap(), t(-315_619_200, 0));
        for bad in [&b""[..], b"1.2.3", b"x", b"1e9", b"-", b".5"] {
            assert!(parse_time(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn parses_gnu_header_numbers() {
        assert_eq!(header_number(b"00000001750\0").unwrap(), 1000);
        assert_eq!(header_number(b"     1750 \0\0").unwrap(), 1000);
        assert_eq!(header_number(&[0; 12]).unwrap(), 0);
        // GNU tar's base-256: 0x80 then the value; negative: two's complement.
        let mut pos = [0u8; 12];
        pos[0] = 0x80;
        pos[8..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(header_number(&pos).unwrap(), 0xffff_ffff);
        let neg = (-315_619_200i128).to_be_bytes();
        assert_eq!(header_number(&neg[4..]).unwrap(), -315_619_200);
        assert_eq!(header_number(&[0xff; 12]).unwrap(), -1);
        assert!(header_number(b"12345678x\0\0\0").is_err());
    }

    /// A ustar header block for `name` of `kind` with `size` data bytes.
    fn header(name: &str, kind: EntryType, size: u64) -> Vec<u8> {
        let mut h = Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_uid(1);
        h.set_gid(2);
        h.set_mtime(1_000);
        h.set_size(size);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn with_data(mut block: Vec<u8>, data: &[u8]) -> Vec<u8> {
        block.extend_from_slice(data);
        block.resize(block.len() + (512 - data.len() % 512) % 512, 0);
        block
    }

    #[test]
    fn reader_applies_pax_records() {
        let mut pax = record("path", b"a/very/long/path\nwith a newline");
        pax.extend(record("uid", b"4000000000"));
        pax.extend(record("gid", b"7"));
        pax.extend(record("mtime", b"1700000000.9"));
        pax.extend(record("size", b"5"));
        pax.extend(record("SCHILY.xattr.user.x", b"1\n2"));
        pax.extend(record("atime", b"1"));
        let mut global = record("comment", b"ignored");
        global.extend(record("gid", b"9"));
        let mut tar = with_data(
            header("g", EntryType::XGlobalHeader, global.len() as u64),
            &global,
        );
        tar.extend(with_data(
            header("x", EntryType::XHeader, pax.len() as u64),
            &pax,
        ));
        // The header says 3 bytes; the PAX size (5) wins.
        tar.extend(with_data(header("short", EntryType::Regular, 3), b"hello"));
        tar.extend(with_data(header("next", EntryType::Regular, 2), b"hi"));
        tar.extend([0; 1024]);
        tar.extend(b"after the end");

        let mut r = TarReader::new(&tar[..]);
        let m = r.next_member().unwrap().unwrap();
        assert_eq!(m.path, PathBuf::from("a/very/long/path\nwith a newline"));
        assert_eq!(
            (m.uid, m.gid, m.mtime, m.size),
            (
                4_000_000_000,
                7,
                Time {
                    secs: 1_700_000_000,
                    nanos: 900_000_000
                },
                5
            )
        );
        assert_eq!(m.xattrs, vec![(OsString::from("user.x"), b"1\n2".to_vec())]);
        assert_eq!(r.data(2).unwrap(), b"he");
        assert_eq!(r.data(u64::MAX).unwrap(), b"llo");
        assert!(r.data(u64::MAX).unwrap().is_empty());
        let m = r.next_member().unwrap().unwrap();
        // Global records stay; local ones do not.
        assert_eq!((m.name.as_str(), m.uid, m.gid, m.size), ("next", 1, 9, 2));
        assert!(r.next_member().unwrap().is_none());
        assert!(r.next_member().unwrap().is_none());
        let mut rest = Vec::new();
        r.into_inner().read_to_end(&mut rest).unwrap();
        assert_eq!(rest.len(), 512 + b"after the end".len());
    }

    #[test]
    fn reader_refuses_broken_streams() {
        let err = |tar: &[u8]| {
            let mut r = TarReader::new(tar);
            loop {
                match r.next_member() {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("no error"),
                    Err(e) => return format!("{e:#}"),
                }
            }
        };
        let mut bad = header("f", EntryType::Regular, 0);
        bad[0] = b'g';
        assert!(err(&bad).contains("checksum mismatch"));
        let truncated = header("f", EntryType::Regular, 10);
        let msg = err(&truncated);
        assert_eq!(
            msg,
            "reading tar entry f: the tar stream ends inside the entry's data"
        );
        let pax = record("uid", b"1");
        let dangling = with_data(header("x", EntryType::XHeader, pax.len() as u64), &pax);
        assert!(err(&dangling).contains("without the entry it describes"));
        let garbage = with_data(header("x", EntryType::XHeader, 5), b"5 a=b");
        assert!(err(&garbage).contains("malformed pax record at byte 0"));
        let huge = header("x", EntryType::XHeader, MAX_EXTENSION + 1);
        assert!(err(&huge).contains("larger than"));
        let sparse = record("GNU.sparse.name", b"./big");
        let mut tar = with_data(
            header("x", EntryType::XHeader, sparse.len() as u64),
            &sparse,
        );
        tar.extend(header("./GNUSparseFile.0/big", EntryType::Regular, 0));
        assert_eq!(
            err(&tar),
            "refusing tar entry ./big: invalid PAX sparse map: no GNU.sparse.size record"
        );
        // A 1.0 map that lists more data than the entry holds.
        let mut pax = record("GNU.sparse.major", b"1");
        pax.extend(record("GNU.sparse.minor", b"0"));
        pax.extend(record("GNU.sparse.name", b"big"));
        pax.extend(record("GNU.sparse.realsize", b"4096"));
        let mut tar = with_data(header("x", EntryType::XHeader, pax.len() as u64), &pax);
        let map = b"1\n0\n600\n";
        tar.extend(with_data(header("big", EntryType::Regular, 512 + 5), &{
            let mut d = map.to_vec();
            d.resize(512, 0);
            d.extend(b"hello");
            d
        }));
        assert_eq!(
            err(&tar),
            "refusing tar entry big: invalid PAX sparse map: regions hold 600 bytes, \
             the entry stores 5"
        );
        // Unknown versions are named.
        let mut pax = record("GNU.sparse.major", b"2");
        pax.extend(record("GNU.sparse.minor", b"0"));
        let mut tar = with_data(header("x", EntryType::XHeader, pax.len() as u64), &pax);
        tar.extend(header("big", EntryType::Regular, 0));
        assert!(
            err(&tar).ends_with(
                "PAX sparse format 2.0 is not supported (GNU tar writes 0.0, 0.1 and 1.0)"
            ),
            "{}",
            err(&tar)
        );
        let uid = record("uid", b"-1");
        let mut tar = with_data(header("x", EntryType::XHeader, uid.len() as u64), &uid);
        tar.extend(header("f", EntryType::Regular, 0));
        assert!(err(&tar).starts_with("refusing tar entry f: invalid PAX uid record"));
    }

    #[test]
    fn reader_applies_gnu_long_names() {
        let name = "d/".repeat(100) + "file";
        let link = "t/".repeat(80) + "target";
        let mut tar = Vec::new();
        for (kind, value) in [
            (EntryType::GNULongName, &name),
            (EntryType::GNULongLink, &link),
        ] {
            let mut h = Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
            h.set_entry_type(kind);
            h.set_size(value.len() as u64 + 1);
            h.set_cksum();
            let mut data = value.clone().into_bytes();
            data.push(0);
            tar.extend(with_data(h.as_bytes().to_vec(), &data));
        }
        tar.extend(header("truncated", EntryType::Symlink, 0));
        let mut r = TarReader::new(&tar[..]);
        let m = r.next_member().unwrap().unwrap();
        assert_eq!(m.path, PathBuf::from(&name));
        assert_eq!(m.link, Some(PathBuf::from(&link)));
        assert!(r.next_member().unwrap().is_none());
    }
}
