//! Raw image writer: copies a filesystem image onto a slot, byte for byte.
//!
//! Limits: writes are sequential from offset 0 in fixed 4 MiB chunks through
//! the page cache, with one `fsync` at the end. There is no O_DIRECT and no
//! hole skipping yet: zero chunks are written like any other. Both would live
//! in [`RawWriter`], which is the only code that touches the device. The slot
//! is not cleared beyond the end of the image.

use anyhow::{bail, Context, Result};
use nix::{ioctl_read_bad, request_code_read};
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::WriteStats;

/// Size of one read and one write.
const CHUNK: usize = 4 << 20;

// BLKGETSIZE64 is `_IOR(0x12, 114, size_t)` while the kernel writes a u64:
// the request code uses the size of `size_t`, the buffer is a u64.
ioctl_read_bad!(
    blkgetsize64,
    request_code_read!(0x12, 114, std::mem::size_of::<usize>()),
    u64
);

/// Capacity in bytes of `dev`: a block device (`BLKGETSIZE64`) or a regular
/// file (its length; tests use files as slots).
pub fn device_size(dev: &Path) -> Result<u64> {
    let meta = fs::metadata(dev).with_context(|| format!("reading {}", dev.display()))?;
    let kind = meta.file_type();
    if kind.is_file() {
        return Ok(meta.len());
    }
    if !kind.is_block_device() {
        bail!(
            "{} is neither a block device nor a regular file",
            dev.display()
        );
    }
    let f = File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    let mut size = 0u64;
    // SAFETY: `f` is an open block device and `size` is a valid u64 the
    // kernel writes the device size into.
    unsafe { blkgetsize64(f.as_raw_fd(), &mut size) }
        .with_context(|| format!("reading the size of {}", dev.display()))?;
    Ok(size)
}

/// Streams `reader` onto `dev` from offset 0, refusing payloads larger than
/// `dev` itself (see [`device_size`]), then fsyncs.
pub fn write_raw(reader: &mut dyn Read, dev: &Path) -> Result<WriteStats> {
    let capacity = device_size(dev)?;
    write_raw_limited(reader, dev, capacity)
}

/// Streams `reader` onto `dev` from offset 0 and fsyncs, refusing to write
/// more than `capacity` bytes (the slot size, obtained by the caller).
///
/// The payload size is only known at the end of the stream, so a payload that
/// is too large is detected once `capacity` bytes have already been written:
/// the slot then holds a truncated image and must not be booted. Callers that
/// know the size up front should check it before calling this.
pub fn write_raw_limited(reader: &mut dyn Read, dev: &Path, capacity: u64) -> Result<WriteStats> {
    let mut writer = RawWriter::open(dev, capacity)?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        crate::signal::check()?;
        crate::failpoint!("write-chunk");
        let n = read_full(reader, &mut buf)
            .with_context(|| format!("reading the payload for {}", dev.display()))?;
        if n == 0 {
            break;
        }
        if !writer.fits(n) {
            // Count the rest so the error gives the real payload size.
            let rest = io::copy(reader, &mut io::sink())
                .with_context(|| format!("reading the payload for {}", dev.display()))?;
            bail!(
                "payload of {} bytes does not fit slot {} of {} bytes",
                writer.written + n as u64 + rest,
                dev.display(),
                capacity
            );
        }
        writer.write(&buf[..n])?;
        if n < buf.len() {
            break;
        }
    }
    writer.finish()
}

/// Sequential writer onto one slot: the single place that opens, writes and
/// syncs the device, and so the place for O_DIRECT or hole skipping later.
struct RawWriter {
    file: File,
    dev: PathBuf,
    capacity: u64,
    written: u64,
}

impl RawWriter {
    /// Opens `dev` for writing without truncating or creating it. Block
    /// devices are opened with `O_EXCL`, which the kernel refuses while the
    /// device is mounted or otherwise claimed.
    fn open(dev: &Path, capacity: u64) -> Result<RawWriter> {
        let is_block = fs::metadata(dev)
            .with_context(|| format!("reading {}", dev.display()))?
            .file_type()
            .is_block_device();
        let mut opts = OpenOptions::new();
        opts.write(true);
        if is_block {
            opts.custom_flags(nix::libc::O_EXCL);
        }
        let file = opts.open(dev).with_context(|| {
            if is_block {
                format!("opening {} for writing (is it mounted?)", dev.display())
            } else {
                format!("opening {} for writing", dev.display())
            }
        })?;
        Ok(RawWriter {
            file,
            dev: dev.to_path_buf(),
            capacity,
            written: 0,
        })
    }

    /// Whether `n` more bytes stay within the capacity.
    fn fits(&self, n: usize) -> bool {
        self.written
            .checked_add(n as u64)
            .is_some_and(|end| end <= self.capacity)
    }

    fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.file
            .write_all(buf)
            .with_context(|| format!("writing rootfs to {}", self.dev.display()))?;
        self.written += buf.len() as u64;
        Ok(())
    }

    fn finish(self) -> Result<WriteStats> {
        self.file
            .sync_all()
            .with_context(|| format!("writing rootfs to {}: syncing", self.dev.display()))?;
        Ok(WriteStats {
            bytes: self.written,
            files: 0,
        })
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::LoopDevice;
    use std::io::Cursor;

    /// Deterministic, non-repeating-per-chunk test data.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    fn sparse_file(len: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        f
    }

    #[test]
    fn writes_image_onto_loop_device() {
        let img = sparse_file(64 << 20);
        let lo = LoopDevice::attach(img.path(), None, None, None).unwrap();
        assert_eq!(device_size(lo.path()).unwrap(), 64 << 20);

        // Not a multiple of the chunk size: exercises the short last chunk.
        let data = pattern(9 * (1 << 20) + 12345);
        let stats = write_raw(&mut Cursor::new(&data), lo.path()).unwrap();
        assert_eq!(
            stats,
            WriteStats {
                bytes: data.len() as u64,
                files: 0
            }
        );
        let back = fs::read(lo.path()).unwrap();
        assert_eq!(back.len(), 64 << 20);
        assert_eq!(&back[..data.len()], &data[..]);
        assert!(back[data.len()..].iter().all(|b| *b == 0));
    }

    #[test]
    fn writes_exactly_full_slot() {
        let slot = sparse_file(2 * CHUNK as u64);
        let data = pattern(2 * CHUNK);
        let stats = write_raw(&mut Cursor::new(&data), slot.path()).unwrap();
        assert_eq!(stats.bytes, data.len() as u64);
        assert_eq!(fs::read(slot.path()).unwrap(), data);
    }

    #[test]
    fn refuses_payload_larger_than_slot() {
        let img = sparse_file(8 << 20);
        let lo = LoopDevice::attach(img.path(), None, None, None).unwrap();
        let data = pattern((8 << 20) + 1);
        let err = write_raw(&mut Cursor::new(&data), lo.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "payload of {} bytes does not fit slot {} of {} bytes",
                (8 << 20) + 1,
                lo.path().display(),
                8 << 20
            )
        );
    }

    #[test]
    fn capacity_limit_is_the_callers() {
        let slot = sparse_file(1 << 20);
        let err = write_raw_limited(&mut Cursor::new(pattern(1000)), slot.path(), 999).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("payload of 1000 bytes does not fit slot"),
            "{err:#}"
        );
    }

    #[test]
    fn read_errors_name_the_device() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("hash mismatch"))
            }
        }
        let slot = sparse_file(1 << 20);
        let err = write_raw(&mut Broken, slot.path()).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            format!(
                "reading the payload for {}: hash mismatch",
                slot.path().display()
            )
        );
    }

    #[test]
    fn device_size_rejects_other_file_types() {
        let dir = tempfile::tempdir().unwrap();
        let err = device_size(dir.path()).unwrap_err();
        assert!(err
            .to_string()
            .contains("neither a block device nor a regular file"));
        let err = device_size(&dir.path().join("missing")).unwrap_err();
        assert!(format!("{err:#}").starts_with("reading "), "{err:#}");
    }
}
