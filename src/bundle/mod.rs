//! The update bundle: one file, readable in a single sequential pass (from a
//! pipe, a socket or a file), with the signed manifest first.
//!
//! ```text
//! "ABUPBNDL" | u32 container version (2) | u32 M | manifest (M bytes, JSON)
//!            | u32 S | signature block (S bytes, JSON; S = 0: unsigned)
//!            | hash list of payload 1 | … (32-byte SHA-256 per stored chunk)
//!            | zero padding to a multiple of 4096
//!            | payload 1 stored bytes | payload 2 … | "ABUPEND\0"
//! ```
//!
//! The exact byte format is documented in `FORMAT.md` beside this file.
//!
//! The signature covers the manifest, the manifest pins the SHA-256 of each
//! payload's hash list, and the hash list pins every chunk (1 MiB by default)
//! of the stored bytes. So every chunk is authenticated as it arrives, before
//! any of it reaches a decompressor, the tar extractor or a disk, still in one
//! sequential pass with bounded memory: a corrupted or spliced stream stops at
//! its first bad chunk.
//!
//! * [`manifest`]: the manifest JSON, strictly parsed and validated.
//! * [`keys`]: ed25519 key files, key ids and the manifest signature.
//! * [`create`]: building a bundle from a directory, a tarball or an image.
//! * [`reader`]: reading the header, verifying it, streaming payloads.
//! * [`parallel`]: the same chunk checks on other threads, for installing.
//! * [`pgzip`], [`pzstd`]: compression in independent blocks, so that both
//!   `bundle create` and installing use every CPU.

pub mod create;
pub mod keys;
pub mod manifest;
pub mod parallel;
pub mod pgzip;
pub mod pzstd;
pub mod reader;

pub use create::{create, CreateOptions, Source, DEFAULT_ZSTD_LEVEL};
pub use keys::{generate, key_id, load_signing_key, load_verifying_key};
pub use manifest::{Compression, Manifest, Payload, PayloadKind};
pub use reader::{
    check_payloads, payload_reader, read_header, read_trailer, BundleHeader, Layout, PayloadReader,
    SignatureInfo, Span,
};

/// The first eight bytes of every bundle.
pub const MAGIC: &[u8; 8] = b"ABUPBNDL";

/// The last eight bytes of every bundle; their absence means the bundle was
/// cut short.
pub const TRAILER: &[u8; 8] = b"ABUPEND\0";

/// The only container version this abup writes and reads. Version 1 (payloads
/// verified only at their end) is refused with a message to rebuild.
pub const CONTAINER_VERSION: u32 = 2;

/// The chunk size `abup bundle create` uses: one SHA-256 per MiB of stored
/// bytes (32 bytes of hash list per MiB, 128 KiB for a 4 GiB payload).
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;

/// Smallest chunk size accepted.
pub const MIN_CHUNK_SIZE: u64 = 4096;

/// Largest chunk size accepted: a chunk is held in memory while it is
/// checked, so this bounds the reader's buffers.
pub const MAX_CHUNK_SIZE: u64 = 16 << 20;

/// Largest total of hash lists accepted (4 MiB: 128 Ki chunks, 128 GiB of
/// payload at 1 MiB chunks). The lists are held in memory.
pub const MAX_HASH_LISTS_LEN: u64 = 4 << 20;

/// Payload bytes start at a multiple of this offset (zero padding before),
/// so they can be read with direct I/O and built without a copy.
pub const PAYLOAD_ALIGN: u64 = 4096;

/// Largest manifest accepted (1 MiB), so that a corrupt length field cannot
/// make the reader allocate gigabytes.
pub const MAX_MANIFEST_LEN: u32 = 1024 * 1024;

/// Largest signature block accepted (4 KiB).
pub const MAX_SIGNATURE_LEN: u32 = 4096;

/// The bundle file name used in examples and documentation.
pub const FILE_EXTENSION: &str = "abup";
