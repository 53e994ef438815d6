//! The update bundle: one file, readable in a single sequential pass (from a
//! pipe, a socket or a file), with the signed manifest first.
//!
//! ```text
//! "ABUPBNDL" | u32 container version | u32 M | manifest (M bytes, JSON)
//!            | u32 S | signature block (S bytes, JSON; S = 0: unsigned)
//!            | payload 1 stored bytes | payload 2 … | "ABUPEND\0"
//! ```
//!
//! The exact byte format is documented in `FORMAT.md` beside this file.
//!
//! Because the manifest pins the size and SHA-256 of every payload, and the
//! signature covers the manifest bytes, verifying the signature up front and
//! checking each payload's hashes as it streams past is enough to trust the
//! whole bundle, without ever seeking or buffering a payload.
//!
//! * [`manifest`]: the manifest JSON, strictly parsed and validated.
//! * [`keys`]: ed25519 key files, key ids and the manifest signature.
//! * [`create`]: building a bundle from a directory, a tarball or an image.
//! * [`reader`]: reading the header, verifying it, streaming payloads.

pub mod create;
pub mod keys;
pub mod manifest;
pub mod reader;

pub use create::{create, CreateOptions, Source, DEFAULT_ZSTD_LEVEL};
pub use keys::{generate, key_id, load_signing_key, load_verifying_key};
pub use manifest::{Compression, Manifest, Payload, PayloadKind};
pub use reader::{
    check_payloads, payload_reader, read_header, read_trailer, BundleHeader, PayloadReader,
    SignatureInfo,
};

/// The first eight bytes of every bundle.
pub const MAGIC: &[u8; 8] = b"ABUPBNDL";

/// The last eight bytes of every bundle; their absence means the bundle was
/// cut short.
pub const TRAILER: &[u8; 8] = b"ABUPEND\0";

/// The only container version this abup writes and reads.
pub const CONTAINER_VERSION: u32 = 1;

/// Largest manifest accepted (1 MiB), so that a corrupt length field cannot
/// make the reader allocate gigabytes.
pub const MAX_MANIFEST_LEN: u32 = 1024 * 1024;

/// Largest signature block accepted (4 KiB).
pub const MAX_SIGNATURE_LEN: u32 = 4096;

/// The bundle file name used in examples and documentation.
pub const FILE_EXTENSION: &str = "abup";
