//! The bundle manifest: what the bundle is for (`compatible`), what it
//! installs (`version`) and, for every payload, its exact sizes, the SHA-256
//! of its uncompressed bytes and the SHA-256 of its chunk hash list (which
//! authenticates every stored chunk before it is used).
//!
//! The manifest is the only part of a bundle that is signed, so it is parsed
//! strictly: unknown fields, a newer `format`, malformed hashes or
//! inconsistent sizes are all errors rather than something to guess around.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The manifest format this abup writes and understands. Format 1 (one
/// hash over the whole stored payload, known only at its end) is refused.
pub const MANIFEST_FORMAT: u32 = 2;

/// The name of the payload holding the root filesystem.
pub const ROOTFS: &str = "rootfs";

/// The name of the optional payload holding files for the shared boot
/// partition (a tar archive, after the rootfs; see [`crate::bootfiles`]).
pub const BOOT_FILES: &str = "boot-files";

/// The manifest of a bundle, as stored (JSON) at the start of the bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format; always [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Which devices may install this bundle; must equal the device's
    /// configured `compatible` string.
    pub compatible: String,
    /// The OS version the bundle installs (SemVer 2.0).
    #[serde(with = "version_string")]
    pub version: semver::Version,
    /// Creation time, Unix seconds.
    pub created: u64,
    /// Free text for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The payloads, in the order their bytes follow in the bundle.
    pub payloads: Vec<Payload>,
}

/// One payload: a blob of bytes stored (possibly compressed) in the bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// Payload name; `rootfs` is the root filesystem.
    pub name: String,
    /// What the uncompressed bytes are.
    pub kind: PayloadKind,
    /// How the bytes are stored in the bundle.
    pub compression: Compression,
    /// Uncompressed size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the uncompressed bytes.
    pub sha256: String,
    /// Size in bytes of the stored (compressed) bytes in the bundle.
    pub stored_size: u64,
    /// The stored bytes are authenticated in chunks of this many bytes (the
    /// last one may be shorter): a power of two from 4 KiB to 16 MiB.
    pub chunk_size: u64,
    /// Lowercase hex SHA-256 of the payload's hash list: the 32-byte SHA-256
    /// of every stored chunk, in order.
    pub chunk_hashes: String,
    /// For tar payloads: an estimate of the space the files take once
    /// extracted (regular files rounded up to 4096 bytes, plus 4096 per
    /// directory, symlink or other entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed_size: Option<u64>,
}

/// What a payload's uncompressed bytes are.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PayloadKind {
    /// A tar archive (POSIX/PAX as written by GNU tar), to be extracted onto a
    /// freshly made filesystem.
    Tar,
    /// A filesystem image, to be written byte for byte onto the partition.
    Raw,
}

/// How a payload is stored in the bundle.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as is.
    None,
    /// One or more gzip members (abup writes one per 4 MiB of input).
    Gzip,
    /// One or more zstd frames.
    Zstd,
}

impl fmt::Display for PayloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PayloadKind::Tar => "tar",
            PayloadKind::Raw => "raw",
        })
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

impl FromStr for Compression {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            other => bail!("unknown compression \"{other}\" (expected none, gzip or zstd)"),
        }
    }
}

impl Manifest {
    /// The root filesystem payload.
    ///
    /// # Panics
    ///
    /// If the manifest has no `rootfs` payload. Every manifest that passed
    /// [`Manifest::parse`] or [`Manifest::to_bytes`] has exactly one.
    pub fn rootfs(&self) -> &Payload {
        self.payload(ROOTFS)
            .expect("a validated manifest always has a rootfs payload")
    }

    /// The payload called `name`, if any.
    pub fn payload(&self, name: &str) -> Option<&Payload> {
        self.payloads.iter().find(|p| p.name == name)
    }

    /// Total number of payload bytes stored in the bundle. Saturates
    /// instead of wrapping; a validated manifest never gets near that.
    pub fn stored_size(&self) -> u64 {
        self.payloads
            .iter()
            .fold(0u64, |sum, p| sum.saturating_add(p.stored_size))
    }

    /// Total length of the hash lists of every payload. Saturates like
    /// [`Manifest::stored_size`].
    pub fn hash_lists_len(&self) -> u64 {
        self.payloads
            .iter()
            .fold(0u64, |sum, p| sum.saturating_add(p.hash_list_len()))
    }

    /// Serializes the manifest (validating it first) to the bytes stored in
    /// the bundle and covered by the signature.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.validate().context("validating the manifest")?;
        let mut bytes = serde_json::to_vec_pretty(self).context("serializing the manifest")?;
        bytes.push(b'\n');
        ensure!(
            bytes.len() <= super::MAX_MANIFEST_LEN as usize,
            "the manifest is {} bytes, more than the {} byte limit",
            bytes.len(),
            super::MAX_MANIFEST_LEN
        );
        Ok(bytes)
    }

    /// Parses and validates manifest bytes as read from a bundle.
    ///
    /// The `format` field is checked before anything else, so that a bundle
    /// from a newer abup says "upgrade abup" instead of "unknown field".
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        let text = std::str::from_utf8(bytes).context("the manifest is not UTF-8")?;
        let value: serde_json::Value =
            serde_json::from_str(text).context("parsing the manifest JSON")?;
        let format = value
            .get("format")
            .context("the manifest is not a JSON object with a \"format\" field")?;
        match format.as_u64() {
            Some(f) if f == u64::from(MANIFEST_FORMAT) => {}
            Some(f) => bail!("unsupported manifest format {f}; upgrade abup"),
            None => bail!("the manifest \"format\" is not an unsigned integer: {format}"),
        }
        let manifest: Manifest = serde_json::from_str(text).context("parsing the manifest JSON")?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks everything the type system does not: supported format, a
    /// sensible `compatible`, unique well-formed payload names, exactly one
    /// `rootfs`, well-formed hashes and sizes consistent with the compression.
    pub fn validate(&self) -> Result<()> {
        if self.format != MANIFEST_FORMAT {
            bail!("unsupported manifest format {}; upgrade abup", self.format);
        }
        ensure!(
            !self.compatible.trim().is_empty(),
            "the manifest \"compatible\" is empty"
        );
        ensure!(
            !self.compatible.chars().any(char::is_control),
            "the manifest \"compatible\" contains control characters: {:?}",
            self.compatible
        );
        ensure!(!self.payloads.is_empty(), "the manifest has no payloads");
        for (i, p) in self.payloads.iter().enumerate() {
            p.validate()
                .with_context(|| format!("checking payload {:?}", p.name))?;
            if self.payloads[..i].iter().any(|q| q.name == p.name) {
                bail!("the manifest lists payload {:?} twice", p.name);
            }
        }
        ensure!(
            self.payload(ROOTFS).is_some(),
            "the manifest has no \"{ROOTFS}\" payload"
        );
        // Installing streams the payloads in order onto their targets: the
        // root slot, then (optionally) the shared boot partition. A bundle
        // with any other payload is refused before anything is read or written.
        let names: Vec<&str> = self.payloads.iter().map(|p| p.name.as_str()).collect();
        ensure!(
            names == [ROOTFS] || names == [ROOTFS, BOOT_FILES],
            "the bundle has {} payloads ({names:?}); this abup installs bundles with exactly one \"{ROOTFS}\", optionally followed by \"{BOOT_FILES}\" (upgrade abup, or rebuild the bundle)",
            self.payloads.len()
        );
        if let Some(b) = self.payload(BOOT_FILES) {
            ensure!(
                b.kind == PayloadKind::Tar,
                "payload \"{BOOT_FILES}\" must be a tar archive, not {}",
                b.kind
            );
        }
        let mut stored = 0u64;
        let mut lists = 0u64;
        for p in &self.payloads {
            stored = stored
                .checked_add(p.stored_size)
                .context("the payloads' stored sizes add up to more than 2^64 bytes")?;
            lists = lists
                .checked_add(p.hash_list_len())
                .filter(|l| *l <= super::MAX_HASH_LISTS_LEN)
                .with_context(|| {
                    format!(
                        "the payloads' hash lists take more than {} bytes; use a larger chunk_size",
                        super::MAX_HASH_LISTS_LEN
                    )
                })?;
        }
        // The whole bundle's length must be a number too.
        stored
            .checked_add(lists)
            .and_then(|n| n.checked_add(u64::from(super::MAX_MANIFEST_LEN) + 64 * 1024))
            .context("the bundle would be more than 2^64 bytes long")?;
        Ok(())
    }
}

impl Payload {
    /// Number of chunks the stored bytes are authenticated in.
    pub fn chunk_count(&self) -> u64 {
        if self.chunk_size == 0 {
            return 0;
        }
        self.stored_size.div_ceil(self.chunk_size)
    }

    /// Length in bytes of this payload's hash list (32 per chunk).
    pub fn hash_list_len(&self) -> u64 {
        self.chunk_count().saturating_mul(32)
    }

    /// Checks one payload entry on its own (see [`Manifest::validate`]).
    fn validate(&self) -> Result<()> {
        ensure!(
            !self.name.is_empty()
                && self.name.len() <= 64
                && self
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)),
            "payload name {:?} is not 1 to 64 characters of a-z, 0-9, '-', '_', '.'",
            self.name
        );
        check_sha256("sha256", &self.sha256)?;
        check_sha256("chunk_hashes", &self.chunk_hashes)?;
        ensure!(
            self.chunk_size.is_power_of_two()
                && (super::MIN_CHUNK_SIZE..=super::MAX_CHUNK_SIZE).contains(&self.chunk_size),
            "chunk_size {} is not a power of two from {} to {}",
            self.chunk_size,
            super::MIN_CHUNK_SIZE,
            super::MAX_CHUNK_SIZE
        );
        if self.compression == Compression::None {
            ensure!(
                self.stored_size == self.size,
                "an uncompressed payload must have stored_size == size"
            );
        }
        if self.kind == PayloadKind::Raw {
            ensure!(
                self.installed_size.is_none(),
                "installed_size is only meaningful for tar payloads"
            );
        }
        Ok(())
    }
}

/// Checks that `value` is 64 lowercase hex digits.
fn check_sha256(field: &str, value: &str) -> Result<()> {
    ensure!(
        value.len() == 64
            && value
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{field} {value:?} is not 64 lowercase hex digits"
    );
    Ok(())
}

/// (De)serializes a [`semver::Version`] as its string form.
mod version_string {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &semver::Version, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<semver::Version, D::Error> {
        let s = String::deserialize(d)?;
        semver::Version::parse(&s)
            .map_err(|e| D::Error::custom(format!("version {s:?} is not SemVer 2.0: {e}")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            compatible: "acme-gw".into(),
            version: semver::Version::parse("2.0.0-rc.1+build.5").unwrap(),
            created: 1_700_000_000,
            description: Some("test".into()),
            payloads: vec![Payload {
                name: "rootfs".into(),
                kind: PayloadKind::Tar,
                compression: Compression::Zstd,
                size: 10240,
                sha256: "a".repeat(64),
                stored_size: 100,
                chunk_size: 1 << 20,
                chunk_hashes: "b".repeat(64),
                installed_size: Some(8192),
            }],
        }
    }

    fn json(m: &Manifest) -> serde_json::Value {
        serde_json::from_slice(&m.to_bytes().unwrap()).unwrap()
    }

    fn parse_value(v: &serde_json::Value) -> Result<Manifest> {
        Manifest::parse(&serde_json::to_vec(v).unwrap())
    }

    fn err(v: &serde_json::Value) -> String {
        format!("{:#}", parse_value(v).unwrap_err())
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = m.to_bytes().unwrap();
        assert_eq!(Manifest::parse(&bytes).unwrap(), m);
        let v = json(&m);
        assert_eq!(v["version"], "2.0.0-rc.1+build.5");
        assert_eq!(v["created"], 1_700_000_000);
        assert_eq!(v["payloads"][0]["kind"], "tar");
        assert_eq!(v["payloads"][0]["compression"], "zstd");
        assert_eq!(m.rootfs().name, "rootfs");
    }

    #[test]
    fn optional_fields_are_omitted() {
        let mut m = sample();
        m.description = None;
        m.payloads[0].installed_size = None;
        let v = json(&m);
        assert!(v.get("description").is_none());
        assert!(v["payloads"][0].get("installed_size").is_none());
        assert_eq!(Manifest::parse(&m.to_bytes().unwrap()).unwrap(), m);
    }

    #[test]
    fn newer_format_says_upgrade() {
        let mut v = json(&sample());
        v["format"] = 3.into();
        // A newer format may well bring new fields; the format wins.
        v["new_field"] = true.into();
        assert_eq!(err(&v), "unsupported manifest format 3; upgrade abup");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut v = json(&sample());
        v["surprise"] = 1.into();
        assert!(err(&v).contains("unknown field `surprise`"), "{}", err(&v));
        let mut v = json(&sample());
        v["payloads"][0]["offset"] = 1.into();
        assert!(err(&v).contains("unknown field `offset`"), "{}", err(&v));
    }

    #[test]
    fn bad_values_are_refused() {
        let cases: &[(&str, serde_json::Value, &str)] = &[
            ("version", "2.0".into(), "not SemVer 2.0"),
            ("compatible", "".into(), "\"compatible\" is empty"),
            ("payloads", serde_json::json!([]), "no payloads"),
        ];
        for (field, value, want) in cases {
            let mut v = json(&sample());
            v[*field] = value.clone();
            assert!(err(&v).contains(want), "{field}: {}", err(&v));
        }
        let payload_cases: &[(&str, serde_json::Value, &str)] = &[
            ("sha256", "abc".into(), "64 lowercase hex"),
            ("chunk_hashes", "A".repeat(64).into(), "64 lowercase hex"),
            ("chunk_size", 1000.into(), "not a power of two"),
            ("chunk_size", (1u64 << 30).into(), "not a power of two"),
            ("kind", "squashfs".into(), "unknown variant"),
            ("compression", "xz".into(), "unknown variant"),
            ("name", "boot".into(), "no \"rootfs\" payload"),
            ("name", "Root FS".into(), "is not 1 to 64 characters"),
            ("size", (-1).into(), "invalid value"),
        ];
        for (field, value, want) in payload_cases {
            let mut v = json(&sample());
            v["payloads"][0][*field] = value.clone();
            assert!(err(&v).contains(want), "{field}: {}", err(&v));
        }
    }

    #[test]
    fn duplicate_payloads_are_refused() {
        let mut m = sample();
        m.payloads.push(m.payloads[0].clone());
        assert!(format!("{:#}", m.to_bytes().unwrap_err()).contains("twice"));
    }

    #[test]
    fn several_payloads_are_refused_in_any_order() {
        let mut aux = sample().payloads[0].clone();
        aux.name = "aux".into();
        for order in [0, 1] {
            let mut m = sample();
            m.payloads.insert(order, aux.clone());
            let e = format!("{:#}", m.to_bytes().unwrap_err());
            assert!(e.contains("has 2 payloads"), "{e}");
        }
    }

    #[test]
    fn boot_files_may_follow_the_rootfs_only() {
        let mut boot = sample().payloads[0].clone();
        boot.name = BOOT_FILES.into();
        let mut m = sample();
        m.payloads.push(boot.clone());
        m.to_bytes().unwrap();
        let mut m = sample();
        m.payloads.insert(0, boot.clone());
        let e = format!("{:#}", m.to_bytes().unwrap_err());
        assert!(e.contains("optionally followed by"), "{e}");
        let mut m = sample();
        boot.kind = PayloadKind::Raw;
        boot.installed_size = None;
        m.payloads.push(boot);
        let e = format!("{:#}", m.to_bytes().unwrap_err());
        assert!(e.contains("must be a tar archive"), "{e}");
    }

    #[test]
    fn huge_sizes_do_not_wrap() {
        let mut m = sample();
        m.payloads[0].stored_size = u64::MAX - 10;
        m.payloads[0].chunk_size = super::super::MAX_CHUNK_SIZE;
        let e = format!("{:#}", m.to_bytes().unwrap_err());
        assert!(e.contains("hash lists take more than"), "{e}");
        let mut m = sample();
        m.payloads[0].installed_size = Some(u64::MAX);
        m.payloads[0].size = u64::MAX;
        m.to_bytes().unwrap();
        assert_eq!(m.stored_size(), 100);
    }

    #[test]
    fn uncompressed_sizes_must_agree() {
        let mut m = sample();
        m.payloads[0].compression = Compression::None;
        assert!(m.to_bytes().is_err());
        m.payloads[0].stored_size = m.payloads[0].size;
        m.to_bytes().unwrap();
    }

    #[test]
    fn not_json_or_not_utf8() {
        assert!(format!("{:#}", Manifest::parse(b"\xff\xfe").unwrap_err()).contains("UTF-8"));
        assert!(format!("{:#}", Manifest::parse(b"[1]").unwrap_err()).contains("\"format\""));
    }

    #[test]
    fn compression_from_str() {
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
        }
        assert!("xz".parse::<Compression>().is_err());
    }
}
