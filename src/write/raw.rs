//! Raw image writer: copies a filesystem image onto a slot, byte for byte.
//!
//! Writes are sequential from offset 0, each block of the stream written
//! where it lies (the decompressor's own aligned buffers, 2-4 MiB) with
//! `O_DIRECT` (no page cache, so no giant final `fsync`: the closing
//! `fsync` only flushes the device's cache). A device or filesystem that
//! refuses `O_DIRECT` is written through the page cache instead.
//!
//! Runs of all-zero 64 KiB pieces of at least [`MIN_ZERO_RUN`] (the free
//! space of a filesystem image) are not written but zeroed with
//! `fallocate(PUNCH_HOLE)`: for a block device a write-zeroes or discard
//! that the kernel only does where the device guarantees zeroes, never a
//! slow fallback. Only those runs are zeroed, where they occur in the
//! stream: zeroing the whole slot first made the device drop and then
//! reallocate every data block (a serial step before the first write that
//! grew faster than the image). Where the device cannot, the zeros are
//! written. The slot is not touched beyond the end of the image.

use anyhow::{bail, Context, Result};
use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg, OFlag};
use nix::{ioctl_read_bad, request_code_read};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::pipeline::{AlignedBuf, Blocks, ReadBlocks, ALIGN};
use super::WriteStats;

/// Granularity of zero skipping.
const PIECE: usize = 64 << 10;

/// Shortest run of zeros zeroed on the device instead of written: shorter
/// ones cost less to write than a discard costs the device.
const MIN_ZERO_RUN: u64 = 1 << 20;

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

/// What the raw writer did, for the run report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawStats {
    /// Image bytes put on the slot (written or known zero).
    pub bytes: u64,
    /// Bytes of zero runs not written but zeroed on the device.
    pub zeros_skipped: u64,
    /// Whether the device refused to zero a range (every zero then written).
    pub zeroing_refused: bool,
    /// Whether the writes bypassed the page cache (`O_DIRECT`).
    pub direct: bool,
}

impl RawStats {
    /// How the report says it: "direct I/O, 310 MiB of zeros zeroed on the
    /// device instead of written".
    pub fn describe(&self) -> String {
        let how = if self.direct {
            "direct I/O"
        } else {
            "through the page cache (direct I/O refused)"
        };
        let zeros = if self.zeroing_refused {
            "every byte written (the slot cannot be zeroed cheaply)".to_string()
        } else {
            format!(
                "{} MiB of zeros zeroed on the device instead of written",
                self.zeros_skipped >> 20
            )
        };
        format!("{how}, {zeros}")
    }
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
    let s = write_image(&mut ReadBlocks::new(reader), dev, capacity, None)?;
    Ok(WriteStats {
        bytes: s.bytes,
        files: 0,
    })
}

/// Streams an image of `size` bytes (when known: checked against the
/// capacity before anything is written) from `blocks` onto `dev`, at most
/// `capacity` bytes, then fsyncs. Each block is written where it lies:
/// aligned blocks go to the device with `O_DIRECT` without a copy; long
/// runs of zeros are zeroed on the device instead.
pub fn write_image(
    blocks: &mut dyn Blocks,
    dev: &Path,
    capacity: u64,
    size: Option<u64>,
) -> Result<RawStats> {
    if let Some(size) = size {
        if size > capacity {
            bail!(
                "payload of {size} bytes does not fit slot {} of {capacity} bytes",
                dev.display()
            );
        }
    }
    let mut writer = RawWriter::open(dev, capacity)?;
    let reading = || format!("reading the payload for {}", dev.display());
    loop {
        crate::signal::check()?;
        crate::failpoint!("write-chunk");
        let block = blocks.next_block().with_context(reading)?;
        let n = block.len();
        if n == 0 {
            break;
        }
        if !writer.fits(n) {
            // Count the rest so the error gives the real payload size.
            let mut total = writer.stats.bytes + n as u64;
            loop {
                let more = blocks.next_block().with_context(reading)?.len();
                if more == 0 {
                    break;
                }
                total += more as u64;
            }
            bail!(
                "payload of {total} bytes does not fit slot {} of {} bytes",
                dev.display(),
                capacity
            );
        }
        writer.write(block)?;
    }
    writer.finish()
}

/// Whether `b` is all zeros (an OR over the slice, which vectorizes).
fn is_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |acc, x| acc | x) == 0
}

/// Sequential writer onto one slot: the single place that opens, zeroes,
/// writes and syncs the device.
struct RawWriter {
    file: File,
    dev: PathBuf,
    capacity: u64,
    stats: RawStats,
    /// The run of zeros read but not yet put on the slot: it starts at
    /// `stats.bytes - zeros` and ends at `stats.bytes`.
    zeros: u64,
    /// Whether the file is in `O_DIRECT` mode right now.
    direct: bool,
    /// Zeros to write where a run is not zeroed on the device (allocated
    /// when first needed).
    zero_buf: Option<AlignedBuf>,
}

impl RawWriter {
    /// Opens `dev` for writing without truncating or creating it, with
    /// `O_DIRECT` where accepted. Block devices are opened with `O_EXCL`,
    /// which the kernel refuses while the device is mounted or otherwise
    /// claimed.
    fn open(dev: &Path, capacity: u64) -> Result<RawWriter> {
        let is_block = fs::metadata(dev)
            .with_context(|| format!("reading {}", dev.display()))?
            .file_type()
            .is_block_device();
        let open = |flags: i32| {
            let excl = if is_block { nix::libc::O_EXCL } else { 0 };
            OpenOptions::new()
                .write(true)
                .custom_flags(flags | excl)
                .open(dev)
        };
        let opened = match open(nix::libc::O_DIRECT) {
            Ok(f) => Ok((f, true)),
            // tmpfs and some drivers refuse O_DIRECT: use the page cache.
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => open(0).map(|f| (f, false)),
            Err(e) => Err(e),
        };
        let (file, direct) = opened.with_context(|| {
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
            stats: RawStats {
                direct,
                ..RawStats::default()
            },
            zeros: 0,
            direct,
            zero_buf: None,
        })
    }

    /// Whether `n` more bytes stay within the capacity.
    fn fits(&self, n: usize) -> bool {
        self.stats
            .bytes
            .checked_add(n as u64)
            .is_some_and(|end| end <= self.capacity)
    }

    /// Puts the next `buf` of the image on the slot: its leading all-zero
    /// pieces extend the pending run of zeros, which is then put on the
    /// slot; the rest is written, except its trailing all-zero pieces, which
    /// start the next run. Zeros inside the data are written with it.
    fn write(&mut self, buf: &[u8]) -> Result<()> {
        let start = self.stats.bytes;
        let lead = buf
            .chunks(PIECE)
            .take_while(|p| is_zero(p))
            .map(<[u8]>::len)
            .sum::<usize>();
        if lead == buf.len() {
            self.zeros += buf.len() as u64;
            self.stats.bytes += buf.len() as u64;
            return Ok(());
        }
        self.zeros += lead as u64;
        self.put_zeros(start + lead as u64)?;
        // Whole pieces from the end, so the data keeps its alignment.
        let body = buf.len() - lead;
        let tail = if body.is_multiple_of(PIECE) {
            buf[lead..]
                .rchunks(PIECE)
                .take_while(|p| is_zero(p))
                .count()
                * PIECE
        } else {
            0
        };
        let data = lead..buf.len() - tail;
        let data_at = start + lead as u64;
        if !self.write_in_parallel(&buf[data.clone()], data_at)? {
            self.write_at(&buf[data], data_at)?;
        }
        self.zeros = tail as u64;
        self.stats.bytes += buf.len() as u64;
        Ok(())
    }

    /// Puts the pending run of zeros, which ends at `end`, on the slot:
    /// zeroed by the device when long and the device can (its aligned
    /// part), else written.
    fn put_zeros(&mut self, end: u64) -> Result<()> {
        let len = std::mem::take(&mut self.zeros);
        let start = end - len;
        let mut at = start;
        let whole = match start.is_multiple_of(ALIGN as u64) {
            true => len - len % ALIGN as u64,
            false => 0,
        };
        if whole >= MIN_ZERO_RUN && !self.stats.zeroing_refused {
            let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match fallocate(self.file.as_raw_fd(), flags, start as i64, whole as i64) {
                Ok(()) => {
                    self.stats.zeros_skipped += whole;
                    at += whole;
                }
                // Written below, and every later run too.
                Err(_) => self.stats.zeroing_refused = true,
            }
        }
        if at == end {
            return Ok(());
        }
        let zero = self
            .zero_buf
            .take()
            .unwrap_or_else(|| AlignedBuf::new(MIN_ZERO_RUN as usize));
        let result = loop {
            if at == end {
                break Ok(());
            }
            let n = (end - at).min(zero.capacity() as u64) as usize;
            if let Err(e) = self.write_at(&zero.as_slice()[..n], at) {
                break Err(e);
            }
            at += n as u64;
        };
        self.zero_buf = Some(zero);
        result
    }

    /// Writes `buf` at `start` as two concurrent `O_DIRECT` writes, so
    /// that the device always has the next write queued (one write at a
    /// time leaves it idle between them). Only for aligned, direct writes;
    /// `false` when it did not write it (the caller writes it at once, with
    /// the page cache fallbacks).
    fn write_in_parallel(&mut self, buf: &[u8], start: u64) -> Result<bool> {
        let aligned = buf.as_ptr().align_offset(ALIGN) == 0
            && start.is_multiple_of(ALIGN as u64)
            && buf.len().is_multiple_of(ALIGN);
        if !self.direct || !aligned || buf.len() < 2 * PIECE {
            return Ok(false);
        }
        let (first, second) = buf.split_at((buf.len() / 2).next_multiple_of(PIECE));
        let file = &self.file;
        let result = std::thread::scope(|s| {
            let other = s.spawn(|| file.write_all_at(second, start + first.len() as u64));
            let mine = file.write_all_at(first, start);
            let theirs = other
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("a write thread panicked")));
            mine.and(theirs)
        });
        match result {
            Ok(()) => Ok(true),
            // Refused as direct I/O after all: written again at once.
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("writing rootfs to {}", self.dev.display())),
        }
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        if self.direct && !buf.len().is_multiple_of(ALIGN) {
            // The image's unaligned tail: finish through the page cache.
            self.set_direct(false)?;
        }
        let mut result = self.file.write_all_at(buf, offset);
        if self.direct
            && result
                .as_ref()
                .is_err_and(|e| e.raw_os_error() == Some(nix::libc::EINVAL))
        {
            // Stricter alignment than 4096 (or no O_DIRECT for writes after
            // all): fall back to the page cache for the rest.
            self.set_direct(false)?;
            result = self.file.write_all_at(buf, offset);
        }
        result.with_context(|| format!("writing rootfs to {}", self.dev.display()))
    }

    fn set_direct(&mut self, on: bool) -> Result<()> {
        let fd = self.file.as_raw_fd();
        let flags = fcntl(fd, FcntlArg::F_GETFL)
            .with_context(|| format!("writing rootfs to {}: reading flags", self.dev.display()))?;
        let mut flags = OFlag::from_bits_truncate(flags);
        flags.set(OFlag::O_DIRECT, on);
        fcntl(fd, FcntlArg::F_SETFL(flags))
            .with_context(|| format!("writing rootfs to {}: setting flags", self.dev.display()))?;
        self.direct = on;
        Ok(())
    }

    /// Puts the last run of zeros on the slot and flushes: with `O_DIRECT`
    /// there are no dirty pages, only the device's write cache.
    fn finish(mut self) -> Result<RawStats> {
        self.put_zeros(self.stats.bytes)?;
        self.file
            .sync_all()
            .with_context(|| format!("writing rootfs to {}: syncing", self.dev.display()))?;
        Ok(self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::LoopDevice;
    use crate::write::pipeline::BLOCK;
    use std::io::{self, Cursor};

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

    /// A scrambled loop device, an image with zero regions (one across
    /// blocks, one too short to zero on the device) and an unaligned tail:
    /// the slot ends up byte-identical to the image, the long run was zeroed
    /// on the device instead of written, the writes went around the page
    /// cache, and nothing beyond the image was touched.
    #[test]
    fn zeroes_long_zero_runs_with_direct_io() {
        let img = sparse_file(16 << 20);
        let junk: Vec<u8> = (0..16 << 20)
            .map(|i: usize| (i * 31 + 7) as u8 | 1)
            .collect();
        fs::write(img.path(), &junk).unwrap();
        let lo = LoopDevice::attach(img.path(), None, None, None).unwrap();
        let mut data = pattern(10 * (1 << 20) + 1000);
        data[1 << 20..5 << 20].fill(0);
        data[(7 << 20) + 100..(8 << 20) + 5].fill(0);
        let s = write_image(
            &mut ReadBlocks::new(Cursor::new(&data)),
            lo.path(),
            16 << 20,
            Some(data.len() as u64),
        )
        .unwrap();
        assert_eq!(s.bytes, data.len() as u64);
        assert!(!s.zeroing_refused, "{s:?}");
        assert!(s.direct, "{s:?}");
        assert_eq!(s.zeros_skipped, 4 << 20, "{s:?}");
        let back = fs::read(lo.path()).unwrap();
        assert_eq!(&back[..data.len()], &data[..]);
        // Beyond the image (after its last 4096 block) the slot is as it was.
        let end = data.len().next_multiple_of(4096);
        assert_eq!(&back[end..], &junk[end..]);
        assert_eq!(
            s.describe(),
            "direct I/O, 4 MiB of zeros zeroed on the device instead of written"
        );

        // A run of zeros at the very end (aligned, then unaligned), without
        // a size known up front.
        for len in [12 << 20, (12 << 20) + 512] {
            fs::write(img.path(), &junk).unwrap();
            let lo2 = LoopDevice::attach(img.path(), None, None, None).unwrap();
            let mut data = pattern(len);
            data[(3 << 20) + 4096..].fill(0);
            let mut blocks = ReadBlocks::new(Cursor::new(&data));
            let s = write_image(&mut blocks, lo2.path(), 16 << 20, None).unwrap();
            assert!(s.zeros_skipped >= 8 << 20, "{s:?}");
            let back = fs::read(lo2.path()).unwrap();
            assert_eq!(&back[..data.len()], &data[..], "{len}");
            let end = data.len().next_multiple_of(4096);
            assert_eq!(&back[end..], &junk[end..], "{len}");
        }
    }

    #[test]
    fn writes_exactly_full_slot() {
        let slot = sparse_file(2 * BLOCK as u64);
        let data = pattern(2 * BLOCK);
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
