//! Building a bundle: pack the source (a directory, a tarball or a
//! filesystem image) into one compressed payload, hashing it on the way, then
//! write header, manifest, signature, payload and end marker.
//!
//! The payload is built in a temporary file beside the output first, because
//! the manifest (which comes first in the bundle) must pin the payload's
//! hashes and sizes; its chunk hashes are computed as the compressed bytes
//! stream past, so every byte is hashed once. The header is then inserted in
//! front of the payload in place (`FALLOC_FL_INSERT_RANGE`, ext4/XFS: no
//! copy), or, where the filesystem cannot, the payload is copied after the
//! header into a second temporary file. The result is renamed into place, so
//! `out` is either the old file or a complete bundle.
//!
//! gzip and zstd cut the input into blocks (4 MiB, 2 MiB) compressed in
//! parallel as independent gzip members or zstd frames, pigz-style ([`super::pgzip`]);
//! the zstd frames are decoded in parallel at install ([`super::pzstd`]).

use super::manifest::{Compression, Manifest, Payload, PayloadKind, MANIFEST_FORMAT, ROOTFS};
use super::reader::{ChunkHasher, Layout, SignatureInfo};
use super::{CONTAINER_VERSION, DEFAULT_CHUNK_SIZE, MAGIC, TRAILER};
use crate::events::Progress;
use crate::write::tar::validate;
use anyhow::{bail, ensure, Context, Result};
use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

/// The zstd level used unless told otherwise: fast to build, and decompression
/// speed on the device hardly depends on it.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Buffer size for reading sources and writing payloads.
const IO_BUFFER: usize = 1024 * 1024;

/// What the rootfs payload is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A directory holding the root filesystem, packed with GNU tar
    /// (numeric owners, xattrs, ACLs, hard links and device nodes kept).
    /// Run as root (or under fakeroot) so every file is readable.
    Dir(PathBuf),
    /// A tar archive, plain or gzip/zstd compressed (detected from its first
    /// bytes). It is recompressed with the chosen compression.
    Tarball(PathBuf),
    /// A filesystem image, written to the slot byte for byte.
    RawImage(PathBuf),
}

impl Source {
    /// The path the source reads from.
    pub fn path(&self) -> &Path {
        match self {
            Source::Dir(p) | Source::Tarball(p) | Source::RawImage(p) => p,
        }
    }

    /// The payload kind this source produces.
    pub fn kind(&self) -> PayloadKind {
        match self {
            Source::Dir(_) | Source::Tarball(_) => PayloadKind::Tar,
            Source::RawImage(_) => PayloadKind::Raw,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            Source::Dir(_) => "directory",
            Source::Tarball(_) => "tarball",
            Source::RawImage(_) => "image",
        };
        write!(f, "{what} {}", self.path().display())
    }
}

/// Everything [`create`] needs to know.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// What the rootfs payload is made from.
    pub source: Source,
    /// The OS version the bundle installs.
    pub version: semver::Version,
    /// The device family the bundle is for.
    pub compatible: String,
    /// How the payload is stored.
    pub compression: Compression,
    /// Signs the manifest when set; unsigned bundles are refused by devices
    /// unless they are configured otherwise.
    pub signing_key: Option<SigningKey>,
    /// Free text stored in the manifest.
    pub description: Option<String>,
    /// zstd level (1 to 22) when `compression` is zstd.
    pub zstd_level: i32,
    /// Told the source bytes read so far, against the source's size.
    pub progress: Option<Progress>,
    /// A directory of files for the shared boot partition, packed as the
    /// optional `boot-files` payload after the rootfs.
    pub boot_files: Option<PathBuf>,
}

impl CreateOptions {
    /// Options with zstd at [`DEFAULT_ZSTD_LEVEL`], no signature and no
    /// description.
    pub fn new(source: Source, version: semver::Version, compatible: impl Into<String>) -> Self {
        CreateOptions {
            source,
            version,
            compatible: compatible.into(),
            compression: Compression::Zstd,
            signing_key: None,
            description: None,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            progress: None,
            boot_files: None,
        }
    }
}

/// Builds a bundle from `opts` and writes it atomically to `out`. Returns
/// the manifest written.
pub fn create(opts: &CreateOptions, out: &Path) -> Result<Manifest> {
    ensure!(
        !opts.compatible.trim().is_empty(),
        "the compatible string is empty; pass the device family the bundle is for"
    );
    if opts.compression == Compression::Zstd {
        let range = zstd::compression_level_range();
        ensure!(
            range.contains(&opts.zstd_level),
            "zstd level {} is outside {}..={}",
            opts.zstd_level,
            range.start(),
            range.end()
        );
    }
    check_source(&opts.source)?;
    let created = created_time()?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };

    if let Source::Dir(src) = &opts.source {
        // The temporary files would end up in the tar stream they are made from.
        let (src, dir_abs) = (fs::canonicalize(src), fs::canonicalize(dir));
        if let (Ok(src), Ok(dir_abs)) = (src, dir_abs) {
            ensure!(
                !dir_abs.starts_with(&src),
                "the output {} is inside the source directory {}; write it elsewhere",
                out.display(),
                src.display()
            );
        }
    }

    let mut payload_file = tempfile::Builder::new()
        .prefix(".abup-payload-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let payload_path = payload_file.path().to_path_buf();
    let built = build_payload(opts, payload_file.as_file_mut(), &payload_path)
        .with_context(|| format!("creating bundle payload from {}", opts.source))?;
    let boot = match &opts.boot_files {
        Some(src) => Some(
            append_boot_files(opts, src, payload_file.as_file_mut(), dir).with_context(|| {
                format!("creating the boot-files payload from {}", src.display())
            })?,
        ),
        None => None,
    };

    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        compatible: opts.compatible.clone(),
        version: opts.version.clone(),
        created,
        description: opts.description.clone(),
        payloads: vec![Payload {
            name: ROOTFS.to_string(),
            kind: opts.source.kind(),
            compression: opts.compression,
            size: built.size,
            sha256: built.sha256,
            stored_size: built.stored_size,
            chunk_size: DEFAULT_CHUNK_SIZE,
            chunk_hashes: built.chunk_hashes,
            installed_size: built.installed_size,
        }],
    };
    let mut manifest = manifest;
    let mut hash_list = built.hash_list;
    let mut stored_size = built.stored_size;
    if let Some(b) = boot {
        manifest.payloads.push(Payload {
            name: crate::bundle::manifest::BOOT_FILES.to_string(),
            kind: PayloadKind::Tar,
            compression: opts.compression,
            size: b.size,
            sha256: b.sha256,
            stored_size: b.stored_size,
            chunk_size: DEFAULT_CHUNK_SIZE,
            chunk_hashes: b.chunk_hashes,
            installed_size: b.installed_size,
        });
        hash_list.extend_from_slice(&b.hash_list);
        stored_size += b.stored_size;
    }
    let manifest_bytes = manifest.to_bytes()?;
    let signature = match &opts.signing_key {
        Some(key) => SignatureInfo::sign(key, &manifest_bytes).to_bytes()?,
        None => Vec::new(),
    };

    let layout = Layout::new(
        &manifest,
        manifest_bytes.len() as u64,
        signature.len() as u64,
    )?;
    let header = header_bytes(
        &manifest_bytes,
        &signature,
        &hash_list,
        layout.padding.length,
    )?;
    // One pass: the payload file becomes the bundle by inserting the header
    // in front of it (the header is a multiple of 4096 bytes). Where the
    // filesystem cannot do that, the payload is copied after the header.
    let bundle_file = match insert_header(payload_file.as_file_mut(), &header, stored_size) {
        Ok(()) => payload_file,
        Err(_) => {
            let mut bundle_file = tempfile::Builder::new()
                .prefix(".abup-bundle-")
                .tempfile_in(dir)
                .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
            write_bundle(
                bundle_file.as_file_mut(),
                &header,
                payload_file.as_file_mut(),
                stored_size,
            )
            .with_context(|| format!("writing bundle {}", out.display()))?;
            bundle_file
        }
    };

    // tempfile creates 0600; a bundle is meant to be shared.
    fs::set_permissions(bundle_file.path(), fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of {}", bundle_file.path().display()))?;
    bundle_file
        .persist(out)
        .with_context(|| format!("renaming the finished bundle to {}", out.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))?;
    Ok(manifest)
}

/// Packs the boot-files directory `src` as a payload of its own and appends
/// its stored bytes to `dest` (after the rootfs payload's).
fn append_boot_files(
    opts: &CreateOptions,
    src: &Path,
    dest: &mut File,
    dir: &Path,
) -> Result<Built> {
    let source = Source::Dir(src.to_path_buf());
    check_source(&source)?;
    crate::bootfiles::check_source(src)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".abup-boot-files-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let tmp_path = tmp.path().to_path_buf();
    let boot_opts = CreateOptions {
        source,
        progress: None,
        boot_files: None,
        ..opts.clone()
    };
    let built = build_payload(&boot_opts, tmp.as_file_mut(), &tmp_path)?;
    tmp.as_file_mut()
        .seek(SeekFrom::Start(0))
        .context("rewinding the boot-files payload")?;
    dest.seek(SeekFrom::End(0))
        .context("seeking to the end of the payloads")?;
    let copied = io::copy(tmp.as_file_mut(), dest).context("appending the boot-files payload")?;
    ensure!(
        copied == built.stored_size,
        "copied {copied} boot-files payload bytes, expected {}",
        built.stored_size
    );
    Ok(built)
}

/// Refuses sources that cannot work before any output is made.
fn check_source(source: &Source) -> Result<()> {
    let path = source.path();
    let meta = fs::metadata(path).with_context(|| format!("reading {source}"))?;
    match source {
        Source::Dir(_) => ensure!(meta.is_dir(), "{} is not a directory", path.display()),
        Source::Tarball(_) | Source::RawImage(_) => {
            ensure!(
                !meta.is_dir(),
                "{} is a directory; pass it as a directory source",
                path.display()
            )
        }
    }
    Ok(())
}

/// Creation time: `SOURCE_DATE_EPOCH` when set (for reproducible builds),
/// else now.
fn created_time() -> Result<u64> {
    if let Some(v) = std::env::var_os("SOURCE_DATE_EPOCH") {
        let s = v.to_string_lossy();
        return s
            .trim()
            .parse()
            .with_context(|| format!("reading SOURCE_DATE_EPOCH {s:?}: not a number of seconds"));
    }
    Ok(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0))
}

/// Everything before the first payload byte: magic, version, manifest,
/// signature block, hash list, zero padding.
fn header_bytes(
    manifest: &[u8],
    signature: &[u8],
    hash_list: &[u8],
    padding: u64,
) -> Result<Vec<u8>> {
    let mut h = Vec::with_capacity(manifest.len() + hash_list.len() + 8192);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&CONTAINER_VERSION.to_le_bytes());
    h.extend_from_slice(&len_u32(manifest)?.to_le_bytes());
    h.extend_from_slice(manifest);
    h.extend_from_slice(&len_u32(signature)?.to_le_bytes());
    h.extend_from_slice(signature);
    h.extend_from_slice(hash_list);
    h.resize(h.len() + padding as usize, 0);
    Ok(h)
}

/// Turns the payload file into the bundle in place: inserts `header.len()`
/// bytes at its start (`FALLOC_FL_INSERT_RANGE`: ext4 and XFS move extents,
/// no data is copied), writes the header there and the end marker after the
/// payload, and syncs. Fails (leaving the file as it was) where the
/// filesystem does not support it.
fn insert_header(file: &mut File, header: &[u8], stored_size: u64) -> Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    ensure!(stored_size > 0, "nothing to insert before");
    fallocate(
        file.as_raw_fd(),
        FallocateFlags::FALLOC_FL_INSERT_RANGE,
        0,
        header.len() as i64,
    )
    .context("inserting the bundle header")?;
    file.write_all_at(header, 0)?;
    file.write_all_at(TRAILER, header.len() as u64 + stored_size)?;
    file.sync_all().context("syncing the bundle")?;
    Ok(())
}

/// Writes the complete bundle to `file` (header, a copy of the payload, end
/// marker) and syncs it.
fn write_bundle(
    file: &mut File,
    header: &[u8],
    payload: &mut File,
    stored_size: u64,
) -> Result<()> {
    let mut w = BufWriter::with_capacity(IO_BUFFER, &mut *file);
    w.write_all(header)?;
    payload
        .seek(SeekFrom::Start(0))
        .context("rewinding the payload file")?;
    let copied = io::copy(payload, &mut w).context("copying the payload")?;
    ensure!(
        copied == stored_size,
        "copied {copied} payload bytes, expected {stored_size}"
    );
    w.write_all(TRAILER)?;
    w.flush()?;
    drop(w);
    file.sync_all().context("syncing the bundle")?;
    Ok(())
}

fn len_u32(bytes: &[u8]) -> Result<u32> {
    u32::try_from(bytes.len()).context("a header block is over 4 GiB")
}

/// Sizes and hashes of a built payload.
struct Built {
    size: u64,
    sha256: String,
    stored_size: u64,
    hash_list: Vec<u8>,
    chunk_hashes: String,
    installed_size: Option<u64>,
}

/// Streams the source through the compressor into `dest`, hashing and
/// counting both sides.
fn build_payload(opts: &CreateOptions, dest: &mut File, dest_path: &Path) -> Result<Built> {
    let sink = HashWriter {
        inner: BufWriter::with_capacity(IO_BUFFER, Writeback::new(dest)),
        path: dest_path,
        hasher: ChunkHasher::new(DEFAULT_CHUNK_SIZE),
    };
    let mut enc = Encoder::new(opts.compression, opts.zstd_level, sink)?;
    let progress = opts.progress.clone().unwrap_or_else(Progress::none);
    let (summary, installed_size) = match &opts.source {
        Source::Dir(dir) => {
            progress.set_total(Some(tree_size(dir)));
            let (s, installed) = pack_dir(dir, &mut enc, &progress)?;
            (s, Some(installed))
        }
        Source::Tarball(path) => {
            let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            progress.set_total(file.metadata().ok().map(|m| m.len()));
            let reader = open_maybe_compressed(progress.reader(file))?;
            let (s, installed) = tee_tar(reader, &mut enc)?;
            (s, Some(installed))
        }
        Source::RawImage(path) => {
            let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            progress.set_total(file.metadata().ok().map(|m| m.len()));
            let mut hasher = Sha256::new();
            let size = enc
                .read_from(&mut progress.reader(file), &mut |b| hasher.update(b))
                .with_context(|| format!("reading {}", path.display()))?;
            ((size, hex::encode(hasher.finalize())), None)
        }
    };
    let mut sink = enc.finish().context("finishing compression")?;
    sink.inner
        .flush()
        .with_context(|| format!("writing {}", dest_path.display()))?;
    progress.flush();
    let stored_size = sink.hasher.total();
    let (hash_list, chunk_hashes) = sink.hasher.finish();
    Ok(Built {
        size: summary.0,
        sha256: summary.1,
        stored_size,
        hash_list,
        chunk_hashes,
        installed_size,
    })
}

/// Uncompressed size and hex SHA-256.
type Summary = (u64, String);

/// Packs `dir` with GNU tar, streaming its stdout through [`tee_tar`].
fn pack_dir<W: Write>(dir: &Path, out: &mut W, progress: &Progress) -> Result<(Summary, u64)> {
    let mut directory = OsString::from("--directory=");
    directory.push(dir);
    let mut cmd = Command::new("tar");
    cmd.arg("--create")
        .arg("--file=-")
        .arg(&directory)
        .args([
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            "--sort=name",
            ".",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("{cmd:?}").replace('"', "");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {shown} (GNU tar is needed to pack a directory)"))?;
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        bail!("starting {shown}: no pipes to the child");
    };
    // Collect stderr on the side so a chatty tar cannot block on a full pipe.
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let result = tee_tar(
        BufReader::with_capacity(IO_BUFFER, progress.reader(stdout)),
        out,
    );
    if result.is_err() {
        // tar may be blocked writing to us; it has nothing more to say.
        let _ = child.kill();
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {shown}"))?;
    let stderr_text = errors.join().unwrap_or_default();
    let result = result?;
    if !status.success() {
        bail!(
            "{shown} exited with {}: {}",
            status
                .code()
                .map_or("a signal".to_string(), |c| c.to_string()),
            stderr_text.trim()
        );
    }
    Ok(result)
}

/// About the size of the tar stream of `dir` (file data plus a 512-byte
/// header per entry), for progress; unreadable entries count as nothing.
fn tree_size(dir: &Path) -> u64 {
    let mut total = 1024;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            total += 512;
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() {
                total += meta.len().div_ceil(512) * 512;
            }
        }
    }
    total
}

/// Opens a tarball that may be gzip or zstd compressed.
fn open_maybe_compressed<R: Read + 'static>(file: R) -> Result<Box<dyn Read>> {
    let mut reader = BufReader::with_capacity(IO_BUFFER, file);
    let head = reader.fill_buf().context("reading the tarball")?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let decoder = zstd::stream::read::Decoder::with_buffer(reader)
            .context("setting up zstd decompression")?;
        Ok(Box::new(decoder))
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) || head.starts_with(b"BZh") {
        bail!("xz and bzip2 tarballs are not supported; pass it uncompressed, gzip or zstd");
    } else {
        Ok(Box::new(reader))
    }
}

/// Copies a tar stream from `source` to `out` unchanged, hashing it and
/// validating it on the way ([`validate`]: every check the installer runs,
/// across entries), which also gives the installed size.
fn tee_tar<R: Read, W: Write>(source: R, out: &mut W) -> Result<(Summary, u64)> {
    // Everything the BufReader holds has already passed through the Tee.
    let mut reader = BufReader::with_capacity(IO_BUFFER, Tee::new(source, out));
    let found = validate(&mut reader)?;
    ensure!(found.entries > 0, "the tar stream has no entries");
    // The end-of-archive blocks and record padding are part of the payload.
    let mut tee = reader.into_inner();
    drain(&mut tee).context("reading the tar stream")?;
    Ok((tee.summary(), found.installed_size))
}

/// Reads `r` to its end, discarding the bytes.
fn drain<R: Read>(r: &mut R) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Passes everything read from `inner` on to `out`, hashing and counting it.
struct Tee<'w, R, W> {
    inner: R,
    out: &'w mut W,
    hasher: Sha256,
    count: u64,
}

impl<'w, R: Read, W: Write> Tee<'w, R, W> {
    fn new(inner: R, out: &'w mut W) -> Self {
        Tee {
            inner,
            out,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    fn summary(self) -> Summary {
        (self.count, hex::encode(self.hasher.finalize()))
    }
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Bytes written between two writeback starts.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// The payload file, written back by the kernel as it grows: every
/// [`WRITEBACK_EVERY`] bytes, writeback of what came before is started
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait), so the
/// sync that makes the bundle durable at the end waits only for the last
/// few MiB, not the whole payload.
struct Writeback<'f> {
    file: &'f mut File,
    written: u64,
    started: u64,
}

impl<'f> Writeback<'f> {
    fn new(file: &'f mut File) -> Self {
        let at = file.stream_position().unwrap_or(0);
        Writeback {
            file,
            written: at,
            started: at,
        }
    }
}

impl Write for Writeback<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.started >= WRITEBACK_EVERY {
            use std::os::fd::AsRawFd;
            let (from, len) = (self.started as i64, (self.written - self.started) as i64);
            // SAFETY: a plain system call on an open descriptor, with no
            // memory passed. Only a hint: where it fails, the final sync
            // writes everything.
            unsafe {
                nix::libc::sync_file_range(
                    self.file.as_raw_fd(),
                    from,
                    len,
                    nix::libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            self.started = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Hashes the stored bytes chunk by chunk on their way to the payload file;
/// write errors name the file.
struct HashWriter<'p, W> {
    inner: W,
    path: &'p Path,
    hasher: ChunkHasher,
}

impl<W: Write> Write for HashWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf).map_err(|e| {
            io::Error::new(e.kind(), format!("writing {}: {e}", self.path.display()))
        })?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The compressor in front of the payload file.
enum Encoder<W: Write> {
    None(W),
    /// gzip members or zstd frames of 4 or 2 MiB of input, compressed on
    /// every CPU. zstd frames carry no checksum of their own: the stored
    /// bytes are pinned by the signed chunk hashes, and `check` compares
    /// the decompressed bytes with the manifest's SHA-256.
    Parallel(super::pgzip::ParallelEncoder<W>),
}

impl<W: Write> Encoder<W> {
    fn new(compression: Compression, zstd_level: i32, w: W) -> Result<Self> {
        use super::pgzip::{Codec, ParallelEncoder};
        let codec = match compression {
            Compression::None => return Ok(Encoder::None(w)),
            Compression::Gzip => Codec::Gzip(flate2::Compression::default()),
            Compression::Zstd => Codec::Zstd(zstd_level),
        };
        Ok(Encoder::Parallel(
            ParallelEncoder::new(w, codec)
                .with_context(|| format!("starting the {compression} compression threads"))?,
        ))
    }

    /// Reads `r` to its end into the compressor (straight into its blocks),
    /// showing each piece read to `seen`; returns the bytes read.
    fn read_from(&mut self, r: &mut dyn Read, seen: &mut dyn FnMut(&[u8])) -> io::Result<u64> {
        match self {
            Encoder::Parallel(e) => e.read_from(r, seen),
            Encoder::None(w) => {
                let mut buf = vec![0u8; IO_BUFFER];
                let mut total = 0;
                loop {
                    let n = match r.read(&mut buf) {
                        Ok(0) => return Ok(total),
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    };
                    seen(&buf[..n]);
                    w.write_all(&buf[..n])?;
                    total += n as u64;
                }
            }
        }
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Parallel(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Parallel(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Parallel(e) => e.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::reader::{payload_reader, read_header, read_trailer};
    use crate::bundle::{key_id, load_signing_key, load_verifying_key};
    use std::os::unix::fs::symlink;

    const ALL: [Compression; 3] = [Compression::None, Compression::Gzip, Compression::Zstd];

    /// A small root filesystem tree: files (one empty, one large enough to
    /// span several reads), a directory, a symlink and a hard link.
    fn rootfs(dir: &Path) -> u64 {
        fs::create_dir_all(dir.join("etc/sub")).unwrap();
        fs::write(dir.join("etc/hostname"), "gw\n").unwrap();
        fs::write(dir.join("etc/empty"), "").unwrap();
        let big: Vec<u8> = (0..700_000u32).map(|i| (i * 7 % 253) as u8).collect();
        fs::write(dir.join("big.bin"), &big).unwrap();
        fs::hard_link(dir.join("big.bin"), dir.join("big.link")).unwrap();
        symlink("etc/hostname", dir.join("hostname")).unwrap();
        // Expected installed size: ".", "etc", "etc/sub" directories, the
        // symlink and the hard link at 4096 each; hostname 4096; empty 0;
        // big.bin rounded up.
        5 * 4096 + 4096 + 700_000u64.div_ceil(4096) * 4096
    }

    struct Unpacked {
        header: crate::bundle::BundleHeader,
        payload: Vec<u8>,
    }

    fn read_bundle(path: &Path) -> Result<Unpacked> {
        let mut f = BufReader::new(File::open(path)?);
        let header = read_header(&mut f)?;
        let mut pr = payload_reader(&mut f, &header, "rootfs")?.check_content_hash();
        let mut payload = Vec::new();
        pr.read_to_end(&mut payload)?;
        pr.finish()?;
        read_trailer(&mut f)?;
        Ok(Unpacked { header, payload })
    }

    fn tar_names(tar_bytes: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn dir_round_trip_every_compression() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("root");
        let expected_installed = rootfs(&src);
        let (sk, pk) = (tmp.path().join("k"), tmp.path().join("k.pub"));
        let id = crate::bundle::generate(&sk, &pk).unwrap();
        for c in ALL {
            let out = tmp.path().join(format!("b-{c}.abup"));
            let mut opts = CreateOptions::new(
                Source::Dir(src.clone()),
                semver::Version::parse("2.0.0").unwrap(),
                "acme-gw",
            );
            opts.compression = c;
            opts.signing_key = Some(load_signing_key(&sk).unwrap());
            opts.description = Some("round trip".into());
            let manifest = create(&opts, &out).unwrap();
            assert_eq!(manifest.rootfs().kind, PayloadKind::Tar);
            assert_eq!(manifest.rootfs().compression, c);
            assert_eq!(manifest.rootfs().installed_size, Some(expected_installed));

            let got = read_bundle(&out).unwrap();
            assert_eq!(got.header.manifest, manifest);
            assert_eq!(
                got.header
                    .verify(&[load_verifying_key(&pk).unwrap()])
                    .unwrap(),
                id
            );
            assert_eq!(got.payload.len() as u64, manifest.rootfs().size);
            assert_eq!(got.payload.len() % 512, 0);
            let names = tar_names(&got.payload);
            for want in [
                "./",
                "./big.bin",
                "./big.link",
                "./etc/",
                "./etc/empty",
                "./hostname",
            ] {
                assert!(
                    names.iter().any(|n| n == want),
                    "{want} missing from {names:?}"
                );
            }
            let mode = fs::metadata(&out).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644);
        }
        // No temporary files left behind.
        let leftovers: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".abup-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn raw_round_trip_every_compression() {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("rootfs.img");
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i % 17 + i / 4096) as u8)
            .collect();
        fs::write(&img, &data).unwrap();
        for c in ALL {
            let out = tmp.path().join(format!("raw-{c}.abup"));
            let mut opts = CreateOptions::new(
                Source::RawImage(img.clone()),
                semver::Version::new(1, 0, 0),
                "acme-gw",
            );
            opts.compression = c;
            let manifest = create(&opts, &out).unwrap();
            let p = manifest.rootfs();
            assert_eq!(
                (p.kind, p.size, p.installed_size),
                (PayloadKind::Raw, data.len() as u64, None)
            );
            assert_eq!(p.sha256, hex::encode(Sha256::digest(&data)));
            let got = read_bundle(&out).unwrap();
            assert_eq!(got.payload, data, "{c}");
            assert!(got.header.signature.is_none());
            let err = format!("{:#}", got.header.verify(&[]).unwrap_err());
            assert!(err.contains("not signed"), "{err}");
            if c != Compression::None {
                assert!(p.stored_size < p.size);
            }
        }
    }

    #[test]
    fn tarball_sources_are_recompressed() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("root");
        let expected_installed = rootfs(&src);
        let plain = tmp.path().join("root.tar");
        let status = Command::new("tar")
            .arg("-cf")
            .arg(&plain)
            .arg("-C")
            .arg(&src)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success());
        let tar_bytes = fs::read(&plain).unwrap();
        let gz = tmp.path().join("root.tar.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar_bytes).unwrap();
        fs::write(&gz, e.finish().unwrap()).unwrap();
        let zst = tmp.path().join("root.tar.zst");
        fs::write(&zst, zstd::encode_all(&tar_bytes[..], 1).unwrap()).unwrap();

        for (input, c) in [
            (&plain, Compression::Gzip),
            (&gz, Compression::Zstd),
            (&zst, Compression::None),
        ] {
            let out = tmp.path().join("t.abup");
            let mut opts = CreateOptions::new(
                Source::Tarball(input.clone()),
                semver::Version::new(3, 1, 4),
                "acme-gw",
            );
            opts.compression = c;
            let manifest = create(&opts, &out).unwrap();
            assert_eq!(manifest.rootfs().installed_size, Some(expected_installed));
            assert_eq!(
                manifest.rootfs().sha256,
                hex::encode(Sha256::digest(&tar_bytes))
            );
            let got = read_bundle(&out).unwrap();
            assert_eq!(got.payload, tar_bytes, "{}", input.display());
        }
    }

    #[test]
    fn wrong_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("img");
        fs::write(&img, b"image").unwrap();
        let mut opts =
            CreateOptions::new(Source::RawImage(img), semver::Version::new(1, 0, 0), "x");
        let signer = SigningKey::from_bytes(&[1; 32]);
        opts.signing_key = Some(signer.clone());
        let out = tmp.path().join("b.abup");
        create(&opts, &out).unwrap();
        let got = read_bundle(&out).unwrap();
        let other = SigningKey::from_bytes(&[2; 32]).verifying_key();
        let err = format!("{:#}", got.header.verify(&[other]).unwrap_err());
        assert!(err.contains(&key_id(&signer.verifying_key())), "{err}");
        assert!(
            err.contains("does not verify against any trusted key"),
            "{err}"
        );
        assert!(got.header.verify(&[other, signer.verifying_key()]).is_ok());
    }

    #[test]
    fn bad_sources_are_refused_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("b.abup");
        let v = semver::Version::new(1, 0, 0);
        let missing = CreateOptions::new(Source::Dir(tmp.path().join("nope")), v.clone(), "x");
        let err = format!("{:#}", create(&missing, &out).unwrap_err());
        assert!(err.starts_with("reading directory "), "{err}");

        let not_tar = tmp.path().join("not.tar");
        fs::write(&not_tar, vec![b'x'; 4096]).unwrap();
        let opts = CreateOptions::new(Source::Tarball(not_tar.clone()), v.clone(), "x");
        let err = format!("{:#}", create(&opts, &out).unwrap_err());
        assert!(
            err.starts_with(&format!(
                "creating bundle payload from tarball {}",
                not_tar.display()
            )),
            "{err}"
        );

        let empty = CreateOptions::new(Source::RawImage(not_tar), v.clone(), " ");
        assert!(format!("{:#}", create(&empty, &out).unwrap_err()).contains("compatible"));

        let mut level = CreateOptions::new(Source::Dir(tmp.path().to_path_buf()), v, "x");
        level.zstd_level = 99;
        assert!(format!("{:#}", create(&level, &out).unwrap_err()).contains("zstd level 99"));

        let inside = CreateOptions::new(
            Source::Dir(tmp.path().to_path_buf()),
            semver::Version::new(1, 0, 0),
            "x",
        );
        let err = format!("{:#}", create(&inside, &out).unwrap_err());
        assert!(err.contains("inside the source directory"), "{err}");

        assert!(!out.exists());
        let leftovers = fs::read_dir(tmp.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".abup-")
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    /// `bundle create` reads tarballs exactly as the installer does: PAX
    /// sparse files are fine (their holes not counted), multi-line PAX
    /// values (ACL text, xattrs with newlines) are fine, and what install
    /// would refuse across entries is refused naming the entry.
    #[test]
    fn tarballs_are_checked_as_the_installer_reads_them() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("root");
        let tree_size = rootfs(&src);
        xattr::set(src.join("etc/hostname"), "user.note", b"one\ntwo").unwrap();
        // u::rw-,u:1234:r--,g::r--,m::r--,o::r--
        let acl: [u8; 44] = [
            2, 0, 0, 0, 1, 0, 6, 0, 255, 255, 255, 255, 2, 0, 4, 0, 0xd2, 4, 0, 0, 4, 0, 4, 0, 255,
            255, 255, 255, 0x10, 0, 4, 0, 255, 255, 255, 255, 0x20, 0, 4, 0, 255, 255, 255, 255,
        ];
        xattr::set(src.join("etc/empty"), "system.posix_acl_access", &acl).unwrap();
        let tarball = |name: &str, args: &[&str]| {
            let path = tmp.path().join(name);
            let status = Command::new("tar")
                .arg("--create")
                .args(args)
                .arg("-f")
                .arg(&path)
                .arg("-C")
                .arg(&src)
                .arg(".")
                .status()
                .unwrap();
            assert!(status.success());
            path
        };
        let out = tmp.path().join("t.abup");
        let v = semver::Version::new(1, 0, 0);

        let acls = tarball("acls.tar", &["--acls", "--xattrs", "--xattrs-include=*"]);
        let opts = CreateOptions::new(Source::Tarball(acls), v.clone(), "x");
        create(&opts, &out).unwrap();

        let f = File::create(src.join("sparse")).unwrap();
        f.set_len(1 << 20).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, b"data", 600_000).unwrap();
        drop(f);
        let sparse = tarball("sparse.tar", &["--format=posix", "--sparse"]);
        let opts = CreateOptions::new(Source::Tarball(sparse), v.clone(), "x");
        let manifest = create(&opts, &out.with_extension("1")).unwrap();
        // The 1 MiB file takes one block: its holes do not count.
        assert_eq!(manifest.rootfs().installed_size, Some(tree_size + 4096));

        // Cross-entry checks run too: a symlink out of the root, then an
        // entry written through it.
        let evil = tmp.path().join("evil.tar");
        let mut b = tar::Builder::new(File::create(&evil).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "etc2", "/etc").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_mode(0o644);
        b.append_data(&mut h, "etc2/passwd", &b"x"[..]).unwrap();
        b.into_inner().unwrap();
        let opts = CreateOptions::new(Source::Tarball(evil), v, "x");
        let err = format!("{:#}", create(&opts, &out.with_extension("2")).unwrap_err());
        assert!(
            err.contains(
                "refusing tar entry etc2/passwd: symlink etc2 -> /etc leads outside the root"
            ),
            "{err}"
        );
        assert!(!out.with_extension("2").exists());
    }
}
