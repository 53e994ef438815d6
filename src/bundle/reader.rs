//! Reading a bundle in one sequential pass: the header (magic, manifest,
//! signature block), then each payload as a decompressing, hashing stream,
//! then the end marker.
//!
//! The reader never seeks and never reads past what it was asked for, so the
//! same `Read` (a file, a pipe, a socket) is passed to [`read_header`], then
//! to [`payload_reader`] once per payload in manifest order, then to
//! [`read_trailer`]. Do not wrap it in a fresh `BufReader` between calls:
//! bytes buffered by a reader that is then dropped would be lost.
//!
//! Trust: [`read_header`] makes no trust decision; call
//! [`BundleHeader::verify`] before acting on the manifest. Payload bytes are
//! handed out as they stream past and are only known good once
//! [`PayloadReader::finish`] returns `Ok`, so consumers must write them
//! somewhere harmless (the spare slot) and commit to them only after that.

use super::keys::{self, key_id};
use super::manifest::{Compression, Manifest, Payload};
use super::{CONTAINER_VERSION, MAGIC, MAX_MANIFEST_LEN, MAX_SIGNATURE_LEN, TRAILER};
use anyhow::{anyhow, bail, ensure, Context, Result};
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Take};
use std::path::Path;

/// Capacity of the buffer between the bundle stream and the decompressor.
const STREAM_BUFFER: usize = 1024 * 1024;

/// The signature algorithm written into every signature block.
const ALGORITHM: &str = "ed25519";

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

/// Everything before the first payload byte.
#[derive(Debug, Clone)]
pub struct BundleHeader {
    /// The parsed, validated (but not yet trusted) manifest.
    pub manifest: Manifest,
    /// The exact manifest bytes, as signed.
    pub manifest_bytes: Vec<u8>,
    /// Hex SHA-256 of `manifest_bytes`. The manifest pins every payload's
    /// hash, so this identifies the whole bundle.
    pub bundle_sha256: String,
    /// The signature block, if the bundle is signed.
    pub signature: Option<SignatureInfo>,
    /// Number of bundle bytes the header took (where the first payload
    /// starts). The whole bundle is `header_len + manifest.stored_size() + 8`
    /// bytes.
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
}

/// Reads `buf.len()` bytes unless the stream ends first; returns how many
/// were read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
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

/// Opens a bundle for one sequential read: the file at `path`, or stdin
/// for `-`. Returns the stream (buffered, 1 MiB) and the file's length when
/// it is a file, so a caller can compare it with what the manifest declares.
pub fn open_bundle(path: &Path) -> Result<(Box<dyn Read>, Option<u64>)> {
    if path == Path::new("-") {
        return Ok((
            Box::new(BufReader::with_capacity(1 << 20, io::stdin())),
            None,
        ));
    }
    let f = File::open(path).with_context(|| format!("opening bundle {}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).ok();
    Ok((Box::new(BufReader::with_capacity(1 << 20, f)), len))
}

/// Reads the bundle header: magic, container version, manifest and signature
/// block, leaving `r` at the first payload byte. Parses and validates the
/// manifest but makes no trust decision (see [`BundleHeader::verify`]).
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

    Ok(BundleHeader {
        bundle_sha256: hex::encode(Sha256::digest(&manifest_bytes)),
        header_len: 8 + 4 + 4 + u64::from(manifest_len) + 4 + u64::from(sig_len),
        manifest,
        manifest_bytes,
        signature,
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

fn payload_error(kind: io::ErrorKind, msg: String) -> io::Error {
    io::Error::new(kind, PayloadError(msg))
}

fn is_payload_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<PayloadError>())
}

/// The stored (compressed) bytes of one payload: at most `expected` bytes of
/// the bundle stream, hashed and counted. Ending early is an error, not EOF.
struct Stored<'a, R: Read> {
    inner: Take<&'a mut R>,
    name: String,
    expected: u64,
    count: u64,
    hasher: Sha256,
}

impl<R: Read> Read for Stored<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::Interrupted {
                e
            } else {
                payload_error(e.kind(), format!("reading payload {}: {e}", self.name))
            }
        })?;
        if n == 0 && self.count < self.expected {
            return Err(payload_error(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "bundle is truncated (payload {}: got {} of {} bytes)",
                    self.name, self.count, self.expected
                ),
            ));
        }
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// The decompressor over the buffered stored bytes.
enum Decoder<'a, R: Read> {
    None(Box<BufReader<Stored<'a, R>>>),
    Gzip(Box<flate2::bufread::GzDecoder<BufReader<Stored<'a, R>>>>),
    Zstd(Box<zstd::stream::read::Decoder<'static, BufReader<Stored<'a, R>>>>),
}

impl<'a, R: Read> Decoder<'a, R> {
    fn stored(&mut self) -> &mut BufReader<Stored<'a, R>> {
        match self {
            Decoder::None(s) => s,
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Zstd(d) => d.get_mut(),
        }
    }
}

impl<R: Read> Read for Decoder<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::None(s) => s.read(buf),
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
        }
    }
}

/// Streams the decompressed bytes of one payload while hashing and counting
/// both the stored and the decompressed bytes.
///
/// Reads at most `stored_size` bytes from the bundle stream. Yielding more
/// decompressed bytes than the manifest's `size` is an `InvalidData` error;
/// the stream ending early is an `UnexpectedEof` error. Hashes are only
/// compared in [`PayloadReader::finish`], which must be called (and must
/// succeed) before the payload is trusted.
pub struct PayloadReader<'a, R: Read> {
    payload: Payload,
    decoder: Decoder<'a, R>,
    /// SHA-256 of the decompressed bytes; `None` for uncompressed payloads,
    /// whose stored hash is the same thing.
    hasher: Option<Sha256>,
    count: u64,
}

/// Starts reading payload `p`, whose stored bytes must come next in `r`.
pub fn payload_reader<'a, R: Read>(r: &'a mut R, p: &Payload) -> Result<PayloadReader<'a, R>> {
    let stored = BufReader::with_capacity(
        STREAM_BUFFER,
        Stored {
            inner: r.take(p.stored_size),
            name: p.name.clone(),
            expected: p.stored_size,
            count: 0,
            hasher: Sha256::new(),
        },
    );
    let (decoder, hasher) = match p.compression {
        Compression::None => (Decoder::None(Box::new(stored)), None),
        Compression::Gzip => (
            Decoder::Gzip(Box::new(flate2::bufread::GzDecoder::new(stored))),
            Some(Sha256::new()),
        ),
        Compression::Zstd => (
            Decoder::Zstd(Box::new(
                zstd::stream::read::Decoder::with_buffer(stored).with_context(|| {
                    format!("setting up zstd decompression of payload {}", p.name)
                })?,
            )),
            Some(Sha256::new()),
        ),
    };
    Ok(PayloadReader {
        payload: p.clone(),
        decoder,
        hasher,
        count: 0,
    })
}

impl<R: Read> Read for PayloadReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.decoder.read(buf).map_err(|e| {
            if is_payload_error(&e) || e.kind() == io::ErrorKind::Interrupted {
                e
            } else {
                payload_error(
                    e.kind(),
                    format!(
                        "decompressing payload {} ({}): {e} (the bundle is corrupt)",
                        self.payload.name, self.payload.compression
                    ),
                )
            }
        })?;
        if self.count + n as u64 > self.payload.size {
            return Err(payload_error(
                io::ErrorKind::InvalidData,
                format!(
                    "payload {} is larger than its manifest declares ({} bytes; the bundle is corrupt)",
                    self.payload.name, self.payload.size
                ),
            ));
        }
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.count += n as u64;
        Ok(n)
    }
}

impl<R: Read> PayloadReader<'_, R> {
    /// The payload being read.
    pub fn payload(&self) -> &Payload {
        &self.payload
    }

    /// Decompressed bytes handed out so far.
    pub fn position(&self) -> u64 {
        self.count
    }

    /// Reads whatever the consumer left unread (a tar reader stops at the
    /// end-of-archive marker, before the padding), then checks the stored and
    /// decompressed sizes and hashes against the manifest. Leaves the bundle
    /// stream exactly at the end of this payload's stored bytes.
    pub fn finish(mut self) -> Result<()> {
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
        // the stored bytes is junk that no hash would otherwise notice.
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

        let stored = stored.get_ref();
        let p = &self.payload;
        ensure!(
            stored.count == p.stored_size,
            "bundle is truncated (payload {name}: got {} of {} bytes)",
            stored.count,
            p.stored_size
        );
        let stored_sha = hex::encode(stored.hasher.clone().finalize());
        ensure!(
            stored_sha == p.stored_sha256,
            "payload {name} stored_sha256 mismatch: expected {}, got {stored_sha} (the bundle is corrupt)",
            p.stored_sha256
        );
        ensure!(
            self.count == p.size,
            "payload {name} is {} bytes uncompressed, but its manifest declares {} (the bundle is corrupt)",
            self.count,
            p.size
        );
        let sha = match self.hasher {
            Some(h) => hex::encode(h.finalize()),
            None => stored_sha,
        };
        ensure!(
            sha == p.sha256,
            "payload {name} sha256 mismatch: expected {}, got {sha} (the bundle is corrupt)",
            p.sha256
        );
        Ok(())
    }
}

/// Reads and checks every payload (discarding the bytes) and the end marker.
/// `r` must be positioned just after the header of the bundle that `manifest`
/// came from. Used to check a whole bundle without installing it.
pub fn check_payloads<R: Read>(r: &mut R, manifest: &Manifest) -> Result<()> {
    for p in &manifest.payloads {
        payload_reader(r, p)?.finish()?;
    }
    read_trailer(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::manifest::{PayloadKind, ROOTFS};

    /// A tiny unsigned bundle built by hand, so these tests do not depend on
    /// `create` (which has its own round-trip tests).
    fn bundle(data: &[u8], compression: Compression, sign: Option<&SigningKey>) -> Vec<u8> {
        let stored = match compression {
            Compression::None => data.to_vec(),
            Compression::Gzip => {
                use std::io::Write;
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
        };
        let manifest = Manifest {
            format: 1,
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
                stored_sha256: hex::encode(Sha256::digest(&stored)),
                installed_size: None,
            }],
        };
        assemble(&manifest.to_bytes().unwrap(), &stored, sign)
    }

    fn assemble(manifest: &[u8], stored: &[u8], sign: Option<&SigningKey>) -> Vec<u8> {
        let sig = sign.map_or(Vec::new(), |k| {
            SignatureInfo::sign(k, manifest).to_bytes().unwrap()
        });
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
        out.extend_from_slice(manifest);
        out.extend_from_slice(&(sig.len() as u32).to_le_bytes());
        out.extend_from_slice(&sig);
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
            let mut pr = payload_reader(r, h.manifest.rootfs())?;
            let mut out = Vec::new();
            pr.read_to_end(&mut out)?;
            pr.finish()?;
            read_trailer(r)?;
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
    fn header_fields() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let b = bundle(b"hello", Compression::None, Some(&key));
        let h = read_header(&mut &b[..]).unwrap();
        assert_eq!(
            h.bundle_sha256,
            hex::encode(Sha256::digest(&h.manifest_bytes))
        );
        assert_eq!(h.header_len + h.manifest.stored_size() + 8, b.len() as u64);
        assert_eq!(
            h.verify(&[key.verifying_key()]).unwrap(),
            key_id(&key.verifying_key())
        );
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
        b[8] = 2;
        assert_eq!(
            read_all(&b).unwrap_err(),
            "unsupported bundle container version 2; upgrade abup"
        );
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
            let header_len = read_header(&mut &b[..]).unwrap().header_len as usize;
            for cut in [
                1,
                10,
                20,
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
    }

    #[test]
    fn flipped_payload_byte_is_detected() {
        for c in ALL {
            let b = bundle(&data(), c, None);
            let h = read_header(&mut &b[..]).unwrap();
            let start = h.header_len as usize;
            let len = h.manifest.rootfs().stored_size as usize;
            for at in [start + 20, start + len / 2, start + len - 3] {
                let mut bad = b.clone();
                bad[at] ^= 0x10;
                let err = read_all(&bad).unwrap_err();
                assert!(
                    err.contains("payload rootfs")
                        && (err.contains("corrupt") || err.contains("larger than its manifest")),
                    "{c} flipped at {at}: {err}"
                );
            }
        }
    }

    #[test]
    fn payload_larger_than_declared() {
        for c in ALL {
            // Declare one byte less than the payload really holds (and keep
            // stored_size/hashes of the real bytes, as a malicious builder
            // could).
            let real = bundle(&data(), c, None);
            let h = read_header(&mut &real[..]).unwrap();
            let stored = &real[h.header_len as usize..real.len() - 8];
            let mut m = h.manifest.clone();
            m.payloads[0].size -= 1;
            if c == Compression::None {
                // Uncompressed payloads must declare equal sizes, so cut the
                // stored size instead; the extra byte then lands where the
                // end marker should be.
                m.payloads[0].stored_size -= 1;
            }
            let b = assemble(&m.to_bytes().unwrap(), stored, None);
            let err = read_all(&b).unwrap_err();
            if c == Compression::None {
                assert!(
                    err.contains("mismatch") || err.contains("end marker"),
                    "{c}: {err}"
                );
            } else {
                assert_eq!(
                    err,
                    format!(
                        "payload rootfs is larger than its manifest declares ({} bytes; the bundle is corrupt)",
                        data().len() - 1
                    ),
                    "{c}"
                );
            }
        }
    }

    #[test]
    fn payload_smaller_than_declared() {
        let real = bundle(&data(), Compression::Zstd, None);
        let h = read_header(&mut &real[..]).unwrap();
        let stored = &real[h.header_len as usize..real.len() - 8];
        let mut m = h.manifest.clone();
        m.payloads[0].size += 1;
        let b = assemble(&m.to_bytes().unwrap(), stored, None);
        let err = read_all(&b).unwrap_err();
        assert!(err.contains("but its manifest declares"), "{err}");
    }

    #[test]
    fn trailing_junk_after_compressed_stream() {
        let real = bundle(&data(), Compression::Gzip, None);
        let h = read_header(&mut &real[..]).unwrap();
        let mut stored = real[h.header_len as usize..real.len() - 8].to_vec();
        stored.extend_from_slice(b"junk");
        let mut m = h.manifest.clone();
        m.payloads[0].stored_size = stored.len() as u64;
        m.payloads[0].stored_sha256 = hex::encode(Sha256::digest(&stored));
        let err = read_all(&assemble(&m.to_bytes().unwrap(), &stored, None)).unwrap_err();
        assert!(
            err.contains("4 bytes after the end of its gzip stream"),
            "{err}"
        );
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
    fn partial_consumer_then_finish() {
        // A consumer that stops early (like tar at its end marker) still
        // leaves the stream at the next payload once finish() drains it.
        let b = bundle(&data(), Compression::Zstd, None);
        let mut r = &b[..];
        let h = read_header(&mut r).unwrap();
        let mut pr = payload_reader(&mut r, h.manifest.rootfs()).unwrap();
        let mut first = [0u8; 100];
        pr.read_exact(&mut first).unwrap();
        assert_eq!(pr.position(), 100);
        pr.finish().unwrap();
        read_trailer(&mut r).unwrap();
        check_payloads(&mut &b[h.header_len as usize..], &h.manifest).unwrap();
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
