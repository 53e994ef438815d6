//! Streaming writers: put a payload onto the spare slot in one pass.
//!
//! A bundle payload is read exactly once, as a stream (decompressor → hash →
//! writer), so the writers here never seek back in their input and never
//! hold a whole image in memory. There are two writers, and the tar reader
//! they and `bundle create` share:
//!
//! - [`raw`]: a filesystem image copied byte for byte onto the slot's block
//!   device with direct I/O, skipping zeros once the slot is zeroed, refusing
//!   payloads larger than the slot.
//! - [`pipeline`]: read-ahead on another thread, so decompressing overlaps
//!   with writing.
//! - [`tar`]: a root filesystem as a tar stream, extracted onto a freshly
//!   formatted ext4 with owners, modes, mtimes, xattrs, hard links, symlinks
//!   and device nodes preserved.
//! - `files`: small files of a tarball made on worker threads.
//! - [`pax`]: reads a tar stream block by block, applying PAX records (parsed
//!   by length, so values may hold newlines), GNU long names and GNU sparse
//!   maps; the tar crate only decodes header fields.
//!
//! Limits, stated honestly: writes are expected to be sequential (from offset
//! 0 for raw images, in archive order for tar); nothing is verified here
//! beyond what the writers themselves can see (size limits, unsafe paths) —
//! hashing is the caller's job; and data is made durable once, at the end
//! (`fsync` of the device, `syncfs` of the new root), not per chunk or file.

mod files;
pub mod pax;
pub mod pipeline;
pub mod raw;
pub mod tar;
pub mod tree;

pub use self::raw::{device_size, write_image, write_raw, write_raw_limited, RawStats};
pub use self::tar::{extract_tar, format_ext4, write_tar};

/// What a writer put on the slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Payload bytes written: the whole image for raw writes, the contents of
    /// regular files for tar extraction.
    pub bytes: u64,
    /// Filesystem objects created by tar extraction (files, directories,
    /// links, device nodes, FIFOs); 0 for raw writes.
    pub files: u64,
}
