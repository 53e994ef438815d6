//! Reading a bundle in one sequential pass: the header (magic, manifest,
//! signature block, hash lists), then each payload as a stream of verified
//! chunks feeding a decompressor, then the end marker.
//!
//! The reader never seeks and never reads past what it was asked for, so the
//! same `Read` (a file, a pipe, a socket) goes to [`read_header`], then to
//! [`payload_reader`] for each payload in manifest order, then to
//! [`read_trailer`]. Do not wrap it in a fresh `BufReader` between calls:
//! bytes buffered by a reader that is then dropped would be lost.
//!
//! Trust: [`read_header`] checks each hash list against its manifest entry
//! but makes no trust decision; call [`BundleHeader::verify`] before acting on
//! the manifest. After that, every stored chunk is checked against its hash
//! before a single byte of it is handed to the decompressor ([`Chunks`]), so
//! a consumer only ever sees authenticated bytes. [`PayloadReader::finish`]
//! then checks what chunks cannot: the decompressed size and that nothing
//! follows the compressed stream.

use super::keys::{self, key_id};
use super::manifest::{Compression, Manifest, Payload, PayloadKind};
use super::{
    CONTAINER_VERSION, MAGIC, MAX_MANIFEST_LEN, MAX_SIGNATURE_LEN, PAYLOAD_ALIGN, TRAILER,
};
use anyhow::{anyhow, bail, ensure, Context, Result};
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use crate::write::pipeline::{AlignedBuf, Blocks, BLOCK};

/// The signature algorithm written into every signature block.
const ALGORITHM: &str = "ed25519";

/// One SHA-256 digest of a hash list.
pub type ChunkHash = [u8; 32];

/// A bundle signature as stored in the signature block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureInfo {
    /// Always `ed25519` for now.
    pub algorithm: String,
    /// Key id of the key that made the signature (a hint, not trusted).
    pub key_id: String,
    /// The raw 64-byte ed25519 signature.
    pub signature: [u8; 64],
}

/// The signature block as it appears on disk.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureBlock {
    algorithm: String,
    key_id: String,
    signature: String,
}

impl SignatureInfo {
    /// Signs `manifest_bytes` with `key`.
    pub fn sign(key: &SigningKey, manifest_bytes: &[u8]) -> SignatureInfo {
        SignatureInfo {
            algorithm: ALGORITHM.to_string(),
            key_id: key_id(&key.verifying_key()),
            signature: keys::sign_manifest(key, manifest_bytes).to_bytes(),
        }
    }

    /// The signature block bytes (JSON) stored in the bundle.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let block = SignatureBlock {
            algorithm: self.algorithm.clone(),
            key_id: self.key_id.clone(),
            signature: hex::encode(self.signature),
        };
        serde_json::to_vec(&block).context("serializing the signature block")
    }

    /// Parses and checks a signature block.
    pub fn parse(bytes: &[u8]) -> Result<SignatureInfo> {
        let block: SignatureBlock =
            serde_json::from_slice(bytes).context("parsing the signature block JSON")?;
        ensure!(
            block.algorithm == ALGORITHM,
            "unsupported signature algorithm {:?}; upgrade abup",
            block.algorithm
        );
        ensure!(
            block.key_id.len() == 16 && is_lower_hex(&block.key_id),
            "signature key_id {:?} is not 16 lowercase hex digits",
            block.key_id
        );
        ensure!(
            block.signature.len() == 128 && is_lower_hex(&block.signature),
            "the signature is not 128 lowercase hex digits"
        );
        let mut signature = [0u8; 64];
        hex::decode_to_slice(&block.signature, &mut signature)
            .context("decoding the signature hex")?;
        Ok(SignatureInfo {
            algorithm: block.algorithm,
            key_id: block.key_id,
            signature,
        })
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Where one part of a bundle lies, in bytes from the start of the bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Span {
    pub offset: u64,
    pub length: u64,
}

/// Where each part of a bundle lies; computed from the header alone, with
/// checked arithmetic (a manifest whose sizes do not add up is refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub manifest: Span,
    pub signature: Span,
    /// Each payload's hash list, in manifest order (they follow each other).
    pub hash_lists: Vec<Span>,
    /// Zero bytes so that the payloads start at a multiple of 4096.
    pub padding: Span,
    /// Each payload's stored bytes, in manifest order.
    pub payloads: Vec<Span>,
    pub end_marker: Span,
    /// Length of the whole bundle.
    pub length: u64,
}

impl Layout {
    /// The layout of a bundle with this manifest and a manifest of
    /// `manifest_len` and a signature block of `sig_len` bytes.
    pub fn new(m: &Manifest, manifest_len: u64, sig_len: u64) -> Result<Layout> {
        let mut at = Offset(0);
        at.take(16)?;
        let manifest = at.take(manifest_len)?;
        at.take(4)?;
        let signature = at.take(sig_len)?;
        let hash_lists = m
            .payloads
            .iter()
            .map(|p| at.take(p.hash_list_len()))
            .collect::<Result<Vec<_>>>()?;
        let aligned =
            at.0.checked_next_multiple_of(PAYLOAD_ALIGN)
                .ok_or_else(overflow)?;
        let padding = at.take(aligned - at.0)?;
        let payloads = m
            .payloads
            .iter()
            .map(|p| at.take(p.stored_size))
            .collect::<Result<Vec<_>>>()?;
        let end_marker = at.take(TRAILER.len() as u64)?;
        Ok(Layout {
            manifest,
            signature,
            hash_lists,
            padding,
            payloads,
            end_marker,
            length: at.0,
        })
    }
}

impl Layout {
    /// The layout as `bundle info --json` shows it: every part with its
    /// `offset` and `length`, the payloads by name with their hash lists.
    pub fn to_json(&self, m: &Manifest) -> serde_json::Value {
        let all_lists = Span {
            offset: self
                .hash_lists
                .first()
                .map_or(self.padding.offset, |s| s.offset),
            length: self.hash_lists.iter().map(|s| s.length).sum(),
        };
        let payloads: Vec<_> = m
            .payloads
            .iter()
            .zip(self.payloads.iter().zip(&self.hash_lists))
            .map(|(p, (span, list))| {
                serde_json::json!({
                    "name": p.name,
                    "offset": span.offset,
                    "length": span.length,
                    "chunk_size": p.chunk_size,
                    "chunks": p.chunk_count(),
                    "hash_list": list,
                })
            })
            .collect();
        serde_json::json!({
            "length": self.length,
            "manifest": self.manifest,
            "signature": self.signature,
            "hash_list": all_lists,
            "padding": self.padding,
            "payloads": payloads,
            "end_marker": self.end_marker,
        })
    }
}

fn overflow() -> anyhow::Error {
    anyhow!("the bundle's sizes add up to more than 2^64 bytes (the bundle is corrupt)")
}

/// A running offset into the bundle, for [`Layout::new`].
struct Offset(u64);

impl Offset {
    fn take(&mut self, length: u64) -> Result<Span> {
        let span = Span {
            offset: self.0,
            length,
        };
        self.0 = self.0.checked_add(length).ok_or_else(overflow)?;
        Ok(span)
    }
}

/// Everything before the first payload byte.
#[derive(Debug, Clone)]
pub struct BundleHeader {
    /// The parsed, validated (but not yet trusted) manifest.
    pub manifest: Manifest,
    /// The exact manifest bytes, as signed.
    pub manifest_bytes: Vec<u8>,
    /// Hex SHA-256 of `manifest_bytes`. The manifest pins every payload's
    /// chunk hashes, so this identifies the whole bundle.
    pub bundle_sha256: String,
    /// The signature block, if the bundle is signed.
    pub signature: Option<SignatureInfo>,
    /// Each payload's hash list (one SHA-256 per stored chunk), already
    /// checked against the manifest's `chunk_hashes`.
    pub hash_lists: Vec<Vec<ChunkHash>>,
    /// Where every part of the bundle lies.
    pub layout: Layout,
    /// Number of bundle bytes the header took (where the first payload
    /// starts).
    pub header_len: u64,
}

impl BundleHeader {
    /// Checks the signature against the trusted keys and returns the id of
    /// the key that verified it.
    pub fn verify(&self, trusted: &[VerifyingKey]) -> Result<String> {
        let sig = self.signature.as_ref().ok_or_else(|| {
            anyhow!("bundle is not signed; sign it with `abup bundle create --key`")
        })?;
        if trusted.is_empty() {
            bail!(
                "bundle signature cannot be checked: no trusted keys are configured (signed by key {})",
                sig.key_id
            );
        }
        let signature = Signature::from_bytes(&sig.signature);
        for key in trusted {
            let id = key_id(key);
            if id == sig.key_id && keys::verify_manifest(key, &self.manifest_bytes, &signature) {
                return Ok(id);
            }
        }
        bail!(
            "bundle signature does not verify against any trusted key (signed by key {})",
            sig.key_id
        )
    }

    /// The payload called `name` and its hash list.
    pub(crate) fn payload_and_hashes(&self, name: &str) -> Result<(&Payload, Vec<ChunkHash>)> {
        let i = self
            .manifest
            .payloads
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("the bundle has no payload {name:?}"))?;
        Ok((&self.manifest.payloads[i], self.hash_lists[i].clone()))
    }
}

/// Reads `buf.len()` bytes unless the stream ends first; returns how many
/// were read.
pub(crate) fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Fills `buf` or fails with "bundle is truncated (while reading {what})".
fn read_part<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> Result<()> {
    let n = read_full(r, buf).with_context(|| format!("reading {what} of the bundle"))?;
    ensure!(n == buf.len(), "bundle is truncated (while reading {what})");
    Ok(())
}

fn read_u32<R: Read>(r: &mut R, what: &str) -> Result<u32> {
    let mut b = [0u8; 4];
    read_part(r, &mut b, what)?;
    Ok(u32::from_le_bytes(b))
}

/// A bundle opened for one sequential read.
pub type BundleStream = Box<dyn Read + Send>;

/// Opens a bundle for one sequential read: the file at `path`, or stdin
/// for `-`. Returns the stream (buffered, 1 MiB) and the file's length when
/// it is a regular file, so a caller can compare it with what the manifest
/// declares. FIFOs, character devices and sockets are read as streams.
pub fn open_bundle(path: &Path) -> Result<(BundleStream, Option<u64>)> {
    if path == Path::new("-") {
        return Ok((
            Box::new(BufReader::with_capacity(1 << 20, io::stdin())),
            None,
        ));
    }
    let f = File::open(path).with_context(|| format!("opening bundle {}", path.display()))?;
    let len = f
        .metadata()
        .ok()
        .filter(|m| m.file_type().is_file())
        .map(|m| m.len());
    Ok((Box::new(BufReader::with_capacity(1 << 20, f)), len))
}

/// Reads the bundle header: magic, container version, manifest, signature
/// block, hash lists and padding, leaving `r` at the first payload byte.
/// Parses and validates the manifest and checks each hash list against it,
/// but makes no trust decision (see [`BundleHeader::verify`]).
pub fn read_header<R: Read>(r: &mut R) -> Result<BundleHeader> {
    let mut magic = [0u8; 8];
    let n = read_full(r, &mut magic).context("reading the bundle header")?;
    if n == 0 {
        bail!("not an abup bundle (the input is empty)");
    }
    if magic[..n] != MAGIC[..n] {
        bail!("not an abup bundle (bad magic)");
    }
    ensure!(
        n == magic.len(),
        "bundle is truncated (while reading the header)"
    );

    let version = read_u32(r, "the header")?;
    if version == 1 {
        bail!("bundle container version 1 is no longer supported (its payloads were verified only after being written); rebuild the bundle with this abup's `abup bundle create`");
    }
    if version != CONTAINER_VERSION {
        bail!("unsupported bundle container version {version}; upgrade abup");
    }

    let manifest_len = read_u32(r, "the header")?;
    ensure!(
        manifest_len > 0 && manifest_len <= MAX_MANIFEST_LEN,
        "bundle manifest length {manifest_len} is outside 1 byte to 1 MiB (the bundle is corrupt)"
    );
    let mut manifest_bytes = vec![0u8; manifest_len as usize];
    read_part(r, &mut manifest_bytes, "the manifest")?;
    let manifest = Manifest::parse(&manifest_bytes).context("reading the bundle manifest")?;

    let sig_len = read_u32(r, "the signature block")?;
    ensure!(
        sig_len <= MAX_SIGNATURE_LEN,
        "bundle signature block length {sig_len} is over the 4 KiB limit (the bundle is corrupt)"
    );
    let signature = if sig_len == 0 {
        None
    } else {
        let mut block = vec![0u8; sig_len as usize];
        read_part(r, &mut block, "the signature block")?;
        Some(SignatureInfo::parse(&block).context("reading the bundle signature block")?)
    };

    let layout = Layout::new(&manifest, manifest_len.into(), sig_len.into())?;
    let mut hash_lists = Vec::with_capacity(manifest.payloads.len());
    for (p, span) in manifest.payloads.iter().zip(&layout.hash_lists) {
        // The manifest was validated: every list is at most 4 MiB.
        let mut bytes = vec![0u8; span.length as usize];
        read_part(
            r,
            &mut bytes,
            &format!("the hash list of payload {}", p.name),
        )?;
        let sha = hex::encode(Sha256::digest(&bytes));
        ensure!(
            sha == p.chunk_hashes,
            "the hash list of payload {} does not match its manifest (the bundle is corrupt)",
            p.name
        );
        hash_lists.push(
            bytes
                .chunks_exact(32)
                .map(|c| {
                    let mut h = [0u8; 32];
                    h.copy_from_slice(c);
                    h
                })
                .collect(),
        );
    }
    let mut padding = vec![0u8; layout.padding.length as usize];
    read_part(r, &mut padding, "the padding before the payloads")?;
    ensure!(
        padding.iter().all(|b| *b == 0),
        "non-zero bytes in the padding before the payloads (the bundle is corrupt)"
    );

    Ok(BundleHeader {
        bundle_sha256: hex::encode(Sha256::digest(&manifest_bytes)),
        header_len: layout.payloads.first().map_or(0, |s| s.offset),
        manifest,
        manifest_bytes,
        signature,
        hash_lists,
        layout,
    })
}

/// Reads the end marker after the last payload and checks that nothing
/// follows it.
pub fn read_trailer<R: Read>(r: &mut R) -> Result<()> {
    let mut buf = [0u8; 8];
    let n = read_full(r, &mut buf).context("reading the bundle end marker")?;
    if buf[..n] != TRAILER[..n] {
        bail!("garbage where the bundle end marker should be (the bundle is corrupt)");
    }
    ensure!(n == buf.len(), "bundle is truncated (missing end marker)");
    let mut extra = [0u8; 1];
    let n = read_full(r, &mut extra).context("reading past the bundle end marker")?;
    ensure!(
        n == 0,
        "unexpected data after the bundle end marker (the bundle is corrupt)"
    );
    Ok(())
}

/// An I/O error message that already names the payload; marks errors the
/// [`PayloadReader`] must pass through without adding its own prefix.
#[derive(Debug)]
struct PayloadError(String);

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PayloadError {}

pub(crate) fn payload_error(kind: io::ErrorKind, msg: String) -> io::Error {
    io::Error::new(kind, PayloadError(msg))
}

fn is_payload_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<PayloadError>())
}

/// The stored bytes of one payload, read from the bundle stream one chunk at
/// a time, each checked against its hash before it is handed out: the only
/// gate between the bundle stream and everything that uses payload bytes.
///
/// Reading ([`Chunks::read_next`]) and checking ([`ChunkCheck::check`]) are
/// separate so that chunks can be checked on other threads
/// ([`super::parallel`]); [`Chunks::next_chunk`] does both.
pub struct Chunks<R> {
    inner: R,
    check: ChunkCheck,
    chunk_size: u64,
    stored_size: u64,
    /// Index of the next chunk to read.
    next: usize,
    /// Stored bytes read so far.
    done: u64,
}

/// Which chunk of a payload a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkId {
    pub index: usize,
    /// Offset of the chunk in the payload's stored bytes.
    pub offset: u64,
}

/// What checks a chunk: the payload's name and its (already authenticated)
/// hash list. Cheap to clone, shareable between threads.
#[derive(Clone)]
pub struct ChunkCheck {
    name: std::sync::Arc<str>,
    hashes: std::sync::Arc<[ChunkHash]>,
}

impl ChunkCheck {
    /// Checks that `buf` is chunk `id`; the error names the chunk and says
    /// the bundle is corrupt.
    pub fn check(&self, id: ChunkId, buf: &[u8]) -> io::Result<()> {
        let ok = self
            .hashes
            .get(id.index)
            .is_some_and(|want| Sha256::digest(buf).as_slice() == want);
        if ok {
            return Ok(());
        }
        Err(payload_error(
            io::ErrorKind::InvalidData,
            format!(
                "payload {} chunk {} (stored bytes {}..{}) does not match its signed hash (the bundle is corrupt or was tampered with)",
                self.name,
                id.index,
                id.offset,
                id.offset + buf.len() as u64
            ),
        ))
    }
}

impl<R: Read> Chunks<R> {
    /// The chunks of `payload`, whose hash list is `hashes`; `inner` must be
    /// at the payload's first stored byte.
    pub fn new(inner: R, payload: &Payload, hashes: Vec<ChunkHash>) -> Chunks<R> {
        Chunks {
            inner,
            check: ChunkCheck {
                name: payload.name.as_str().into(),
                hashes: hashes.into(),
            },
            chunk_size: payload.chunk_size,
            stored_size: payload.stored_size,
            next: 0,
            done: 0,
        }
    }

    /// Number of chunks in the payload.
    pub fn count(&self) -> usize {
        self.check.hashes.len()
    }

    /// The checker for these chunks.
    pub fn checker(&self) -> ChunkCheck {
        self.check.clone()
    }

    /// Reads the next chunk into `buf` (replacing its contents) WITHOUT
    /// checking it; returns which chunk it is, or `None` (and `buf` empty)
    /// once every chunk has been read. The caller must check the chunk with
    /// [`ChunkCheck::check`] before using a byte of it.
    pub fn read_next(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<ChunkId>> {
        buf.clear();
        if self.next >= self.count() {
            return Ok(None);
        }
        let len = (self.stored_size - self.done).min(self.chunk_size) as usize;
        buf.resize(len, 0);
        let n = read_full(&mut self.inner, buf).map_err(|e| {
            payload_error(
                e.kind(),
                format!("reading payload {}: {e}", self.check.name),
            )
        })?;
        if n < len {
            buf.clear();
            return Err(payload_error(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "bundle is truncated (payload {}: got {} of {} bytes)",
                    self.check.name,
                    self.done + n as u64,
                    self.stored_size
                ),
            ));
        }
        let id = ChunkId {
            index: self.next,
            offset: self.done,
        };
        self.next += 1;
        self.done += len as u64;
        Ok(Some(id))
    }

    /// Reads the next chunk into `buf` (replacing its contents) and checks
    /// it. Returns `false`, with `buf` empty, once every chunk has been read.
    pub fn next_chunk(&mut self, buf: &mut Vec<u8>) -> io::Result<bool> {
        match self.read_next(buf)? {
            None => Ok(false),
            Some(id) => match self.check.check(id, buf) {
                Ok(()) => Ok(true),
                Err(e) => {
                    buf.clear();
                    Err(e)
                }
            },
        }
    }

    /// Number of chunks read so far.
    pub fn verified(&self) -> usize {
        self.next
    }

    /// The bundle stream, after this payload's last chunk once all were read.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// A [`BufRead`] over the verified chunks of one payload: what the
/// decompressor reads from. Never holds more than one chunk.
pub struct Verified<R> {
    chunks: Chunks<R>,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: Read> Verified<R> {
    /// Reads and checks the first chunk right away, so that a bad stream is
    /// refused before its consumer does anything.
    pub fn new(mut chunks: Chunks<R>) -> io::Result<Verified<R>> {
        let mut buf = Vec::new();
        chunks.next_chunk(&mut buf)?;
        Ok(Verified {
            chunks,
            buf,
            pos: 0,
        })
    }

    /// The bundle stream (see [`Chunks::into_inner`]).
    pub fn into_inner(self) -> R {
        self.chunks.into_inner()
    }
}

/// `Read::read` for a reader whose own buffer is its `BufRead`: copies what
/// `fill_buf` holds, so no second buffer sits between the two.
pub(crate) fn read_buffered(src: &mut impl BufRead, out: &mut [u8]) -> io::Result<usize> {
    let avail = src.fill_buf()?;
    let n = avail.len().min(out.len());
    out[..n].copy_from_slice(&avail[..n]);
    src.consume(n);
    Ok(n)
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        read_buffered(self, out)
    }
}

impl<R: Read> BufRead for Verified<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos >= self.buf.len() {
            self.pos = 0;
            self.chunks.next_chunk(&mut self.buf)?;
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }
}

/// The decompressor over verified stored bytes.
enum Decoder<B: BufRead> {
    None(B),
    Gzip(Box<flate2::bufread::MultiGzDecoder<B>>),
    /// One zstd frame (or frames without declared sizes), on this thread.
    Zstd(Box<zstd::stream::read::Decoder<'static, B>>),
    /// Sized zstd frames, as `bundle create` writes them, on every CPU.
    ZstdFrames(Box<super::pzstd::FrameReader<B>>),
}

impl<B: BufRead> Decoder<B> {
    fn new(mut stored: B, compression: Compression, name: &str, threads: usize) -> Result<Self> {
        let setup = || format!("setting up zstd decompression for payload {name}");
        Ok(match compression {
            Compression::None => Decoder::None(stored),
            Compression::Gzip => {
                Decoder::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(stored)))
            }
            Compression::Zstd if super::pzstd::FrameReader::suits(&mut stored)? => {
                Decoder::ZstdFrames(Box::new(
                    super::pzstd::FrameReader::with_workers(stored, threads).with_context(setup)?,
                ))
            }
            Compression::Zstd => Decoder::Zstd(Box::new(
                zstd::stream::read::Decoder::with_buffer(stored).with_context(setup)?,
            )),
        })
    }

    fn stored(&mut self) -> &mut B {
        match self {
            Decoder::None(s) => s,
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Zstd(d) => d.get_mut(),
            Decoder::ZstdFrames(d) => d.get_mut(),
        }
    }

    fn into_stored(self) -> B {
        match self {
            Decoder::None(s) => s,
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::Zstd(d) => d.finish(),
            Decoder::ZstdFrames(d) => d.into_inner(),
        }
    }
}

impl<B: BufRead> Read for Decoder<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::None(s) => s.read(buf),
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
            Decoder::ZstdFrames(d) => d.read(buf),
        }
    }
}

/// Threads that decode (and check) a payload at once. A tarball's install
/// is as fast as its files are made, far slower than one thread decodes, so
/// one thread keeps ahead of it, and each thread fewer keeps two buffers of
/// 1-2 MiB fewer in memory; an image is written as fast as it decodes, on
/// every CPU (at most 4).
pub(crate) fn stage_threads(payload: &Payload) -> usize {
    match payload.kind {
        PayloadKind::Tar => 1,
        PayloadKind::Raw => std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4)),
    }
}

/// Streams the decompressed bytes of one payload from its verified stored
/// bytes `B`, counting them: yielding more than the manifest's `size` is an
/// `InvalidData` error. Every byte handed out comes from chunks that matched
/// the signed hash list.
pub struct PayloadReader<B: BufRead> {
    decoder: Decoder<B>,
    payload: Payload,
    count: u64,
    /// SHA-256 of the decompressed bytes, when asked for
    /// ([`PayloadReader::check_content_hash`]).
    hasher: Option<Sha256>,
    /// The buffer [`Blocks`] reads into for payloads not decoded in blocks.
    block: Option<AlignedBuf>,
}

impl<B: BufRead> PayloadReader<B> {
    /// Decompresses `payload` from its verified stored bytes.
    pub fn new(stored: B, payload: &Payload) -> Result<PayloadReader<B>> {
        Ok(PayloadReader {
            decoder: Decoder::new(
                stored,
                payload.compression,
                &payload.name,
                stage_threads(payload),
            )?,
            payload: payload.clone(),
            count: 0,
            hasher: None,
            block: None,
        })
    }

    /// Also hashes the decompressed bytes and checks them against the
    /// manifest's `sha256` in [`PayloadReader::finish`]. Installing does not
    /// need this (the chunks are the verification); a whole-bundle check
    /// does it to catch a bundle builder that lied.
    pub fn check_content_hash(mut self) -> Self {
        self.hasher = Some(Sha256::new());
        self
    }

    /// Whether decompression already runs ahead on other threads (sized
    /// zstd frames), so that the consumer needs no read-ahead of its own.
    pub fn decodes_ahead(&self) -> bool {
        matches!(self.decoder, Decoder::ZstdFrames(_))
    }

    /// The payload being read.
    pub fn payload(&self) -> &Payload {
        &self.payload
    }

    /// Decompressed bytes handed out so far.
    pub fn position(&self) -> u64 {
        self.count
    }

    /// Reads whatever the consumer left unread (a tar reader stops at the
    /// end-of-archive marker, before the padding), then checks that the
    /// stored bytes are used up and the decompressed size is the declared
    /// one. Returns the stored-bytes reader, at the end of this payload.
    pub fn finish(mut self) -> Result<B> {
        let name = self.payload.name.clone();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match self.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }

        // The decompressor has seen the end of its stream; anything left of
        // the stored bytes is junk (authenticated, but not what was meant).
        let stored = self.decoder.stored();
        let mut extra = 0u64;
        loop {
            let n = stored.fill_buf()?.len();
            if n == 0 {
                break;
            }
            stored.consume(n);
            extra += n as u64;
        }
        ensure!(
            extra == 0,
            "payload {name} has {extra} bytes after the end of its {} stream (the bundle is corrupt)",
            self.payload.compression
        );
        let p = &self.payload;
        ensure!(
            self.count == p.size,
            "payload {name} is {} bytes uncompressed, but its manifest declares {} (the bundle is corrupt)",
            self.count,
            p.size
        );
        if let Some(h) = self.hasher.take() {
            let sha = hex::encode(h.finalize());
            ensure!(
                sha == p.sha256,
                "payload {name} sha256 mismatch: expected {}, got {sha} (the bundle is corrupt)",
                p.sha256
            );
        }
        Ok(self.decoder.into_stored())
    }
}

/// A decompression error as the consumer sees it: naming the payload and
/// saying the bundle is corrupt, unless it is a chunk's own error or a
/// signal.
fn decode_error(p: &Payload, e: io::Error) -> io::Error {
    if is_payload_error(&e)
        || e.kind() == io::ErrorKind::Interrupted
        || e.get_ref()
            .is_some_and(|i| i.is::<crate::signal::Interrupted>())
    {
        return e;
    }
    payload_error(
        e.kind(),
        format!(
            "decompressing payload {} ({}): {e} (the bundle is corrupt)",
            p.name, p.compression
        ),
    )
}

/// Counts (and hashes, when asked) decompressed bytes handed out.
fn count_out(
    p: &Payload,
    count: &mut u64,
    hasher: &mut Option<Sha256>,
    bytes: &[u8],
) -> io::Result<()> {
    if *count + bytes.len() as u64 > p.size {
        return Err(payload_error(
            io::ErrorKind::InvalidData,
            format!(
                "payload {} is larger than its manifest declares ({} bytes; the bundle is corrupt)",
                p.name, p.size
            ),
        ));
    }
    if let Some(h) = hasher {
        h.update(bytes);
    }
    *count += bytes.len() as u64;
    Ok(())
}

impl<B: BufRead> Read for PayloadReader<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self
            .decoder
            .read(buf)
            .map_err(|e| decode_error(&self.payload, e))?;
        count_out(&self.payload, &mut self.count, &mut self.hasher, &buf[..n])?;
        Ok(n)
    }
}

impl<B: BufRead> Blocks for PayloadReader<B> {
    /// Sized zstd frames come out as decoded, in their own aligned buffers;
    /// other payloads are read into one buffer here.
    fn next_block(&mut self) -> io::Result<&[u8]> {
        let PayloadReader {
            decoder,
            payload,
            count,
            hasher,
            block,
        } = self;
        let out: &[u8] = match decoder {
            Decoder::ZstdFrames(d) => d.next_block().map_err(|e| decode_error(payload, e))?,
            _ => {
                let buf = block.get_or_insert_with(|| AlignedBuf::new(BLOCK));
                let n =
                    read_full(decoder, buf.as_mut_slice()).map_err(|e| decode_error(payload, e))?;
                &buf.as_slice()[..n]
            }
        };
        count_out(payload, count, hasher, out)?;
        Ok(out)
    }
}

/// Opens payload `name` of the bundle whose header is `header`, reading from
/// `r`, which must be at that payload's first stored byte (payloads are read
/// in manifest order). Reads and checks the first chunk before returning, so
/// a corrupt or spliced stream is refused before anything is written.
pub fn payload_reader<R: Read>(
    r: R,
    header: &BundleHeader,
    name: &str,
) -> Result<PayloadReader<Verified<R>>> {
    let (p, hashes) = header.payload_and_hashes(name)?;
    let chunks = Chunks::new(r, p, hashes);
    let stored = Verified::new(chunks)?;
    PayloadReader::new(stored, p)
}

/// Reads and checks every payload (every chunk, the decompressed size and
/// SHA-256, discarding the bytes) and the end marker. `r` must be positioned
/// just after `header`. Used to check a whole bundle without installing it.
pub fn check_payloads<R: Read>(r: &mut R, header: &BundleHeader) -> Result<()> {
    for p in &header.manifest.payloads {
        payload_reader(&mut *r, header, &p.name)?
            .check_content_hash()
            .finish()?;
    }
    read_trailer(r)
}

/// Builds hash lists: the SHA-256 of every `chunk_size` bytes written, the
/// last chunk possibly shorter. Used by `bundle create` as the stored bytes
/// stream past, so they are hashed once.
pub struct ChunkHasher {
    chunk_size: u64,
    current: Sha256,
    in_current: u64,
    list: Vec<u8>,
    total: u64,
}

impl ChunkHasher {
    pub fn new(chunk_size: u64) -> ChunkHasher {
        ChunkHasher {
            chunk_size,
            current: Sha256::new(),
            in_current: 0,
            list: Vec::new(),
            total: 0,
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        while !bytes.is_empty() {
            let room = (self.chunk_size - self.in_current) as usize;
            let n = room.min(bytes.len());
            self.current.update(&bytes[..n]);
            self.in_current += n as u64;
            bytes = &bytes[n..];
            if self.in_current == self.chunk_size {
                let digest = std::mem::take(&mut self.current).finalize();
                self.list.extend_from_slice(&digest);
                self.in_current = 0;
            }
        }
    }

    /// Bytes hashed so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The hash list and its hex SHA-256 (the manifest's `chunk_hashes`).
    pub fn finish(mut self) -> (Vec<u8>, String) {
        if self.in_current > 0 {
            self.list.extend_from_slice(&self.current.finalize());
        }
        let sha = hex::encode(Sha256::digest(&self.list));
        (self.list, sha)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::manifest::{PayloadKind, MANIFEST_FORMAT, ROOTFS};

    /// Small chunks, so the test payloads span many of them.
    const CHUNK: u64 = 64 * 1024;

    fn compress(data: &[u8], compression: Compression) -> Vec<u8> {
        match compression {
            Compression::None => data.to_vec(),
            Compression::Gzip => {
                use std::io::Write;
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
        }
    }

    fn manifest_for(data: &[u8], stored: &[u8], compression: Compression) -> Manifest {
        let mut h = ChunkHasher::new(CHUNK);
        h.update(stored);
        Manifest {
            format: MANIFEST_FORMAT,
            compatible: "acme-gw".into(),
            version: semver::Version::new(1, 2, 3),
            created: 1,
            description: None,
            payloads: vec![Payload {
                name: ROOTFS.into(),
                kind: PayloadKind::Raw,
                compression,
                size: data.len() as u64,
                sha256: hex::encode(Sha256::digest(data)),
                stored_size: stored.len() as u64,
                chunk_size: CHUNK,
                chunk_hashes: h.finish().1,
                installed_size: None,
            }],
        }
    }

    /// A bundle built by hand, so these tests do not depend on `create`
    /// (which has its own round-trip tests).
    fn bundle(data: &[u8], compression: Compression, sign: Option<&SigningKey>) -> Vec<u8> {
        let stored = compress(data, compression);
        let m = manifest_for(data, &stored, compression);
        assemble(&m, &stored, sign)
    }

    /// Header, hash list of `stored` (whatever the manifest says), padding,
    /// `stored`, end marker.
    fn assemble(m: &Manifest, stored: &[u8], sign: Option<&SigningKey>) -> Vec<u8> {
        let manifest = m.to_bytes().unwrap();
        let sig = sign.map_or(Vec::new(), |k| {
            SignatureInfo::sign(k, &manifest).to_bytes().unwrap()
        });
        let mut h = ChunkHasher::new(m.payloads[0].chunk_size);
        h.update(stored);
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&CONTAINER_VERSION.to_le_bytes());
        out.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
        out.extend_from_slice(&manifest);
        out.extend_from_slice(&(sig.len() as u32).to_le_bytes());
        out.extend_from_slice(&sig);
        out.extend_from_slice(&h.finish().0);
        out.resize(out.len().next_multiple_of(PAYLOAD_ALIGN as usize), 0);
        out.extend_from_slice(stored);
        out.extend_from_slice(TRAILER);
        out
    }

    fn data() -> Vec<u8> {
        (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    /// Reads the whole bundle; returns the payload bytes or the error text.
    fn read_all(bytes: &[u8]) -> Result<Vec<u8>, String> {
        let mut r = bytes;
        let run = |r: &mut &[u8]| -> Result<Vec<u8>> {
            let h = read_header(r)?;
            let mut pr = payload_reader(&mut *r, &h, ROOTFS)?.check_content_hash();
            let mut out = Vec::new();
            pr.read_to_end(&mut out)?;
            let mut rest = pr.finish()?.into_inner();
            read_trailer(&mut rest)?;
            Ok(out)
        };
        run(&mut r).map_err(|e| format!("{e:#}"))
    }

    const ALL: [Compression; 3] = [Compression::None, Compression::Gzip, Compression::Zstd];

    #[test]
    fn reads_back_every_compression() {
        for c in ALL {
            let b = bundle(&data(), c, None);
            assert_eq!(read_all(&b).unwrap(), data(), "{c}");
        }
    }

    #[test]
    fn header_fields_and_layout() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let b = bundle(&data(), Compression::Zstd, Some(&key));
        let h = read_header(&mut &b[..]).unwrap();
        assert_eq!(
            h.bundle_sha256,
            hex::encode(Sha256::digest(&h.manifest_bytes))
        );
        let l = &h.layout;
        assert_eq!(l.length, b.len() as u64);
        assert_eq!(l.manifest.offset, 16);
        assert_eq!(
            &b[l.manifest.offset as usize..][..l.manifest.length as usize],
            &h.manifest_bytes[..]
        );
        assert_eq!(l.signature.offset, 20 + l.manifest.length);
        let p = h.manifest.rootfs();
        assert_eq!(l.hash_lists[0].length, 32 * p.stored_size.div_ceil(CHUNK));
        assert_eq!(l.payloads[0].offset % PAYLOAD_ALIGN, 0);
        assert_eq!(l.payloads[0].offset, h.header_len);
        let stored = compress(&data(), Compression::Zstd);
        assert_eq!(
            &b[l.payloads[0].offset as usize..][..stored.len()],
            &stored[..]
        );
        assert_eq!(l.end_marker.offset, b.len() as u64 - 8);
        assert_eq!(
            h.verify(&[key.verifying_key()]).unwrap(),
            key_id(&key.verifying_key())
        );
        let json = l.to_json(&h.manifest);
        assert_eq!(json["payloads"][0]["offset"], l.payloads[0].offset);
        assert_eq!(json["hash_list"]["length"], l.hash_lists[0].length);
    }

    #[test]
    fn signature_checks() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let signed = read_header(&mut &bundle(b"x", Compression::None, Some(&key))[..]).unwrap();
        let err = format!("{:#}", signed.verify(&[other.verifying_key()]).unwrap_err());
        assert_eq!(
            err,
            format!(
                "bundle signature does not verify against any trusted key (signed by key {})",
                key_id(&key.verifying_key())
            )
        );
        assert!(signed.verify(&[]).is_err());
        // Right key id, tampered manifest.
        let mut tampered = signed.clone();
        tampered.manifest_bytes[0] ^= 1;
        assert!(tampered.verify(&[key.verifying_key()]).is_err());
        // Signature by one key, relabelled with another's id.
        let mut relabelled = signed.clone();
        relabelled.signature.as_mut().unwrap().key_id = key_id(&other.verifying_key());
        assert!(relabelled.verify(&[other.verifying_key()]).is_err());

        let unsigned = read_header(&mut &bundle(b"x", Compression::None, None)[..]).unwrap();
        assert_eq!(
            format!("{:#}", unsigned.verify(&[key.verifying_key()]).unwrap_err()),
            "bundle is not signed; sign it with `abup bundle create --key`"
        );
    }

    #[test]
    fn bad_magic_and_version() {
        assert_eq!(
            read_all(b"PK\x03\x04 not a bundle").unwrap_err(),
            "not an abup bundle (bad magic)"
        );
        assert_eq!(
            read_all(b"").unwrap_err(),
            "not an abup bundle (the input is empty)"
        );
        assert_eq!(
            read_all(b"ABUP").unwrap_err(),
            "bundle is truncated (while reading the header)"
        );
        let mut b = bundle(b"x", Compression::None, None);
        b[8] = 3;
        assert_eq!(
            read_all(&b).unwrap_err(),
            "unsupported bundle container version 3; upgrade abup"
        );
        b[8] = 1;
        assert!(read_all(&b)
            .unwrap_err()
            .starts_with("bundle container version 1 is no longer supported"));
        let mut b = bundle(b"x", Compression::None, None);
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_all(&b)
            .unwrap_err()
            .contains("outside 1 byte to 1 MiB"));
    }

    #[test]
    fn truncation_anywhere_is_an_error() {
        for c in ALL {
            let b = bundle(&data(), c, Some(&SigningKey::from_bytes(&[7; 32])));
            let h = read_header(&mut &b[..]).unwrap();
            let header_len = h.header_len as usize;
            for cut in [
                1,
                10,
                20,
                h.layout.hash_lists[0].offset as usize + 5,
                header_len - 10,
                header_len + 100,
                b.len() / 2,
                b.len() - 9,
                b.len() - 1,
            ] {
                let err = read_all(&b[..cut]).unwrap_err();
                assert!(
                    err.contains("bundle is truncated"),
                    "{c} cut at {cut}: {err}"
                );
            }
        }
        let b = bundle(&data(), Compression::Zstd, None);
        assert_eq!(
            read_all(&b[..b.len() - 8]).unwrap_err(),
            "bundle is truncated (missing end marker)"
        );
    }

    #[test]
    fn truncated_payload_names_counts() {
        let b = bundle(&data(), Compression::None, None);
        let h = read_header(&mut &b[..]).unwrap();
        let stored = h.manifest.rootfs().stored_size;
        let cut = h.header_len as usize + 1000;
        let err = read_all(&b[..cut]).unwrap_err();
        assert_eq!(
            err,
            format!("bundle is truncated (payload rootfs: got 1000 of {stored} bytes)")
        );
        // A cut on a chunk boundary counts whole chunks.
        let cut = h.header_len as usize + 2 * CHUNK as usize;
        let err = read_all(&b[..cut]).unwrap_err();
        assert!(err.contains(&format!("got {} of", 2 * CHUNK)), "{err}");
    }

    #[test]
    fn flipped_payload_byte_stops_at_its_chunk() {
        for c in ALL {
            let b = bundle(&data(), c, None);
            let h = read_header(&mut &b[..]).unwrap();
            let start = h.header_len as usize;
            let len = h.manifest.rootfs().stored_size as usize;
            for at in [start + 20, start + len / 2, start + len - 3] {
                let mut bad = b.clone();
                bad[at] ^= 0x10;
                let err = read_all(&bad).unwrap_err();
                let chunk = (at - start) / CHUNK as usize;
                assert!(
                    err.starts_with(&format!("payload rootfs chunk {chunk} "))
                        && err.contains("does not match its signed hash"),
                    "{c} flipped at {at}: {err}"
                );
            }
        }
    }

    /// Nothing of a bad chunk reaches the consumer, and the first chunk is
    /// checked before `payload_reader` returns.
    #[test]
    fn bad_chunks_never_reach_the_consumer() {
        let b = bundle(&data(), Compression::None, None);
        let h = read_header(&mut &b[..]).unwrap();
        let start = h.header_len as usize;
        let mut bad = b.clone();
        bad[start + 5] ^= 1;
        let mut r = &bad[start..];
        let err = payload_reader(&mut r, &h, ROOTFS).err().unwrap();
        assert!(format!("{err:#}").contains("chunk 0 "), "{err:#}");

        let mut bad = b.clone();
        bad[start + 3 * CHUNK as usize + 7] ^= 1;
        let mut r = &bad[start..];
        let mut pr = payload_reader(&mut r, &h, ROOTFS).unwrap();
        let mut got = Vec::new();
        let err = pr.read_to_end(&mut got).unwrap_err();
        assert!(err.to_string().contains("chunk 3 "), "{err}");
        assert_eq!(got.len(), 3 * CHUNK as usize);
        assert_eq!(got[..], data()[..got.len()]);
    }

    /// A genuine signed header followed by another payload: refused at the
    /// first chunk, whatever the spliced bytes are.
    #[test]
    fn spliced_stream_is_refused_at_the_first_chunk() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let genuine = bundle(&data(), Compression::Zstd, Some(&key));
        let h = read_header(&mut &genuine[..]).unwrap();
        let evil: Vec<u8> = data().iter().map(|b| b ^ 0x55).collect();
        let other = bundle(&evil, Compression::Zstd, None);
        let oh = read_header(&mut &other[..]).unwrap();
        let mut spliced = genuine[..h.header_len as usize].to_vec();
        spliced.extend_from_slice(&other[oh.header_len as usize..]);
        let err = read_all(&spliced).unwrap_err();
        assert!(err.starts_with("payload rootfs chunk 0 "), "{err}");
    }

    #[test]
    fn hash_list_and_padding_are_checked() {
        let b = bundle(&data(), Compression::Gzip, None);
        let h = read_header(&mut &b[..]).unwrap();
        let mut bad = b.clone();
        bad[h.layout.hash_lists[0].offset as usize + 5] ^= 1;
        assert_eq!(
            read_all(&bad).unwrap_err(),
            "the hash list of payload rootfs does not match its manifest (the bundle is corrupt)"
        );
        assert!(h.layout.padding.length > 0);
        let mut bad = b.clone();
        bad[h.layout.padding.offset as usize] = 1;
        assert!(read_all(&bad).unwrap_err().contains("padding"));
    }

    #[test]
    fn payload_larger_than_declared() {
        for c in [Compression::Gzip, Compression::Zstd] {
            // Declare one byte less than the payload really holds (and keep
            // the real stored bytes and their chunk hashes, as a malicious
            // builder could).
            let stored = compress(&data(), c);
            let mut m = manifest_for(&data(), &stored, c);
            m.payloads[0].size -= 1;
            let err = read_all(&assemble(&m, &stored, None)).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "payload rootfs is larger than its manifest declares ({} bytes; the bundle is corrupt)",
                    data().len() - 1
                ),
                "{c}"
            );
        }
        // Uncompressed: the extra byte lands where the end marker should be.
        let stored = data();
        let mut m = manifest_for(
            &stored[..stored.len() - 1],
            &stored[..stored.len() - 1],
            Compression::None,
        );
        m.payloads[0].sha256 = hex::encode(Sha256::digest(&stored[..stored.len() - 1]));
        let mut b = assemble(&m, &stored[..stored.len() - 1], None);
        let n = b.len();
        b.insert(n - 8, stored[stored.len() - 1]);
        let err = read_all(&b).unwrap_err();
        assert!(err.contains("end marker"), "{err}");
    }

    #[test]
    fn payload_smaller_than_declared() {
        let stored = compress(&data(), Compression::Zstd);
        let mut m = manifest_for(&data(), &stored, Compression::Zstd);
        m.payloads[0].size += 1;
        let err = read_all(&assemble(&m, &stored, None)).unwrap_err();
        assert!(err.contains("but its manifest declares"), "{err}");
    }

    #[test]
    fn wrong_content_hash_is_found_by_a_full_check() {
        let stored = compress(&data(), Compression::Zstd);
        let mut m = manifest_for(&data(), &stored, Compression::Zstd);
        m.payloads[0].sha256 = "0".repeat(64);
        let err = read_all(&assemble(&m, &stored, None)).unwrap_err();
        assert!(err.contains("sha256 mismatch"), "{err}");
    }

    #[test]
    fn trailing_junk_after_compressed_stream() {
        let mut stored = compress(&data(), Compression::Gzip);
        stored.extend_from_slice(b"junk");
        let m = manifest_for(&data(), &stored, Compression::Gzip);
        let err = read_all(&assemble(&m, &stored, None)).unwrap_err();
        // gzip may hold several members: junk is read as a bad member.
        assert!(
            err.starts_with("decompressing payload rootfs (gzip): ") && err.contains("corrupt"),
            "{err}"
        );
        let mut stored = compress(&data(), Compression::Zstd);
        stored.extend_from_slice(b"junk");
        let m = manifest_for(&data(), &stored, Compression::Zstd);
        let err = read_all(&assemble(&m, &stored, None)).unwrap_err();
        assert!(err.contains("corrupt"), "{err}");
    }

    #[test]
    fn garbage_after_the_end_marker() {
        let mut b = bundle(b"x", Compression::None, None);
        b.push(0);
        assert!(read_all(&b)
            .unwrap_err()
            .contains("after the bundle end marker"));
        let mut b = bundle(b"x", Compression::None, None);
        let n = b.len();
        b[n - 2] = b'X';
        assert!(read_all(&b)
            .unwrap_err()
            .starts_with("garbage where the bundle end marker"));
    }

    #[test]
    fn empty_payload() {
        let b = bundle(b"", Compression::None, None);
        assert_eq!(read_all(&b).unwrap(), b"");
    }

    #[test]
    fn partial_consumer_then_finish() {
        // A consumer that stops early (like tar at its end marker) still
        // leaves the stream at the next payload once finish() drains it.
        let b = bundle(&data(), Compression::Zstd, None);
        let mut r = &b[..];
        let h = read_header(&mut r).unwrap();
        let mut pr = payload_reader(&mut r, &h, ROOTFS).unwrap();
        let mut first = [0u8; 100];
        pr.read_exact(&mut first).unwrap();
        assert_eq!(pr.position(), 100);
        pr.finish().unwrap();
        read_trailer(&mut r).unwrap();
        check_payloads(&mut &b[h.header_len as usize..], &h).unwrap();
    }

    /// The threaded reader install uses gives the same bytes and the same
    /// errors at the same places.
    #[test]
    fn parallel_reader_agrees() {
        use crate::bundle::parallel::parallel_payload_reader;
        let open = |b: &[u8]| {
            let h = read_header(&mut &b[..]).unwrap();
            let rest = io::Cursor::new(b[h.header_len as usize..].to_vec());
            (parallel_payload_reader(rest, &h, ROOTFS), h)
        };
        for c in ALL {
            let b = bundle(&data(), c, None);
            let (pr, _) = open(&b);
            let mut pr = pr.unwrap();
            let mut got = Vec::new();
            pr.read_to_end(&mut got).unwrap();
            assert_eq!(got, data(), "{c}");
            let mut rest = pr.finish().unwrap().into_inner().unwrap();
            read_trailer(&mut rest).unwrap();
        }
        let b = bundle(&data(), Compression::None, None);
        let start = read_header(&mut &b[..]).unwrap().header_len as usize;
        let mut bad = b.clone();
        bad[start + 3 * CHUNK as usize + 1] ^= 1;
        let mut pr = open(&bad).0.unwrap();
        let mut got = Vec::new();
        let err = pr.read_to_end(&mut got).unwrap_err();
        assert!(
            err.to_string().starts_with("payload rootfs chunk 3 "),
            "{err}"
        );
        assert_eq!(got[..], data()[..3 * CHUNK as usize]);
        let mut bad = b.clone();
        bad[start + 2] ^= 1;
        let err = open(&bad).0.err().unwrap();
        assert!(format!("{err:#}").contains("chunk 0 "), "{err:#}");
        let err = open(&b[..start + 1000]).0.err().unwrap();
        assert!(format!("{err:#}").contains("truncated"), "{err:#}");
    }

    #[test]
    fn chunk_hasher_matches_one_shot_hashes() {
        let d = data();
        let mut h = ChunkHasher::new(CHUNK);
        for piece in d.chunks(7777) {
            h.update(piece);
        }
        let (list, _) = h.finish();
        let want: Vec<u8> = d
            .chunks(CHUNK as usize)
            .flat_map(|c| Sha256::digest(c).to_vec())
            .collect();
        assert_eq!(list, want);
    }

    #[test]
    fn signature_block_parsing() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let info = SignatureInfo::sign(&key, b"m");
        let bytes = info.to_bytes().unwrap();
        assert_eq!(SignatureInfo::parse(&bytes).unwrap(), info);
        let text = String::from_utf8(bytes).unwrap();
        assert!(SignatureInfo::parse(text.replace("ed25519", "rsa").as_bytes()).is_err());
        assert!(SignatureInfo::parse(text.replace("}", ",\"x\":1}").as_bytes()).is_err());
    }
}
