//! zstd payloads made of many small frames, decompressed on several threads.
//!
//! One zstd frame can only be decoded from its start, by one thread; a
//! stream of independent frames, each declaring its decompressed size, can
//! be decoded frame by frame on every CPU, each frame straight into its
//! output buffer (no window copy). `bundle create` writes such streams
//! ([`super::pgzip::ParallelEncoder`], 2 MiB of input per frame), and they
//! are ordinary zstd: `zstd -d` reads them as one stream.
//!
//! [`FrameReader`] is the consumer's side: it cuts the verified stored bytes
//! into frames by reading the frame and block headers (RFC 8878; nothing is
//! decoded to find a frame's end), hands frame `k` to worker `k % N`, and
//! reads the outputs back in the same order, so order is kept with bounded
//! channels and no reordering. At most [`in_flight`] frames are out at a
//! time and every buffer is reused, so memory stays at a few frames however
//! large the payload. A stream whose first frame does not declare a size of
//! at most [`MAX_FRAME`] (a single-frame stream from an older abup) is not
//! for this reader: [`FrameReader::suits`] says so before anything is read.

use crate::write::pipeline::{recv_checking_signals, AlignedBuf, Blocks, Current};
use std::io::{self, BufRead, Read};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread;

/// Largest decompressed size of one frame this reader accepts.
pub const MAX_FRAME: usize = 8 << 20;

/// Largest stored size of one frame (incompressible data grows a little).
const MAX_STORED_FRAME: usize = MAX_FRAME + (MAX_FRAME >> 6) + 1024;

const MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// What a frame header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    /// Bytes of the header, magic included.
    len: usize,
    /// Declared decompressed size, if any.
    content_size: Option<u64>,
    checksum: bool,
}

/// Parses a frame header at the start of `b`. `Ok(None)`: `b` is too short
/// to tell.
fn parse_header(b: &[u8]) -> io::Result<Option<Header>> {
    if b.len() < 5 {
        return Ok(None);
    }
    if b[..4] != MAGIC {
        return Err(corrupt(
            "a zstd frame does not start with the zstd magic number",
        ));
    }
    let d = b[4];
    let fcs_flag = d >> 6;
    let single = d & 0x20 != 0;
    if d & 0x08 != 0 {
        return Err(corrupt("a zstd frame header has its reserved bit set"));
    }
    let dict_len = [0, 1, 2, 4][(d & 3) as usize];
    let fcs_len = match fcs_flag {
        0 if single => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let len = 5 + usize::from(!single) + dict_len + fcs_len;
    if b.len() < len {
        return Ok(None);
    }
    let field = &b[len - fcs_len..len];
    let mut v = 0u64;
    for (i, byte) in field.iter().enumerate() {
        v |= u64::from(*byte) << (8 * i);
    }
    let content_size = match fcs_len {
        0 => None,
        2 => Some(v + 256),
        _ => Some(v),
    };
    Ok(Some(Header {
        len,
        content_size,
        checksum: d & 0x04 != 0,
    }))
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Appends exactly `n` bytes of `r` to `out`.
fn take<B: BufRead>(r: &mut B, n: usize, out: &mut Vec<u8>) -> io::Result<()> {
    let mut left = n;
    while left > 0 {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the zstd stream ends inside a frame",
            ));
        }
        let k = avail.len().min(left);
        out.extend_from_slice(&avail[..k]);
        r.consume(k);
        left -= k;
    }
    Ok(())
}

/// Reads the next frame of `r` into `frame` (replacing its contents),
/// skipping skippable frames; returns its declared decompressed size, or
/// `None` at the end of the stream.
fn read_frame<B: BufRead>(r: &mut B, frame: &mut Vec<u8>) -> io::Result<Option<usize>> {
    loop {
        frame.clear();
        if r.fill_buf()?.is_empty() {
            return Ok(None);
        }
        take(r, 4, frame)?;
        if frame[0] & 0xF0 == 0x50 && frame[1..4] == [0x2A, 0x4D, 0x18] {
            // A skippable frame: 4-byte length, then that many bytes.
            take(r, 4, frame)?;
            let n = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
            let mut left = n as usize;
            while left > 0 {
                let avail = r.fill_buf()?.len().min(left);
                if avail == 0 {
                    return Err(corrupt("the zstd stream ends inside a skippable frame"));
                }
                r.consume(avail);
                left -= avail;
            }
            continue;
        }
        // The header: at most 14 bytes follow the magic.
        let header = loop {
            if let Some(h) = parse_header(frame)? {
                break h;
            }
            take(r, 1, frame)?;
        };
        let size = match header.content_size {
            Some(s) if s <= MAX_FRAME as u64 => s as usize,
            _ => {
                return Err(corrupt(
                    "a zstd frame does not declare a size of at most 8 MiB (bundles made by `abup bundle create` always do)",
                ))
            }
        };
        loop {
            let at = frame.len();
            take(r, 3, frame)?;
            let h = u32::from_le_bytes([frame[at], frame[at + 1], frame[at + 2], 0]);
            let last = h & 1 != 0;
            let block = (h >> 3) as usize;
            let body = match (h >> 1) & 3 {
                0 | 2 => block,
                1 => 1,
                _ => return Err(corrupt("a zstd block has the reserved type")),
            };
            if frame.len() + body > MAX_STORED_FRAME {
                return Err(corrupt(
                    "a zstd frame is larger than its declared size allows",
                ));
            }
            take(r, body, frame)?;
            if last {
                break;
            }
        }
        if header.checksum {
            take(r, 4, frame)?;
        }
        return Ok(Some(size));
    }
}

/// A frame's bytes, its declared size and the buffer its output goes into.
type Job = (Vec<u8>, usize, Option<AlignedBuf>);

/// A decoded frame: its output and size (and its input buffer, for reuse).
type Done = io::Result<(AlignedBuf, usize, Vec<u8>)>;

/// Frames out at a time for `n` workers: one each and one more, dispatched
/// again as soon as the consumer takes a frame (more only costs memory).
fn in_flight(n: usize) -> usize {
    n + 1
}

/// Decompressed bytes of a multi-frame zstd stream, decoded on worker
/// threads, in order.
pub struct FrameReader<B> {
    stored: B,
    ins: Vec<SyncSender<Job>>,
    outs: Vec<Receiver<Done>>,
    sent: usize,
    received: usize,
    end: bool,
    /// The decoded frame being consumed.
    cur: Current,
    spare_in: Vec<Vec<u8>>,
    spare_out: Vec<AlignedBuf>,
}

impl<B: BufRead> FrameReader<B> {
    /// Whether `stored` starts with a frame this reader takes (a zstd frame
    /// declaring at most [`MAX_FRAME`] bytes). Reads nothing.
    pub fn suits(stored: &mut B) -> io::Result<bool> {
        let head = stored.fill_buf()?;
        Ok(matches!(
            parse_header(head),
            Ok(Some(Header { content_size: Some(s), .. })) if s <= MAX_FRAME as u64
        ))
    }

    /// Starts one worker per CPU (at most 4) over `stored`.
    pub fn new(stored: B) -> io::Result<FrameReader<B>> {
        let n = thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
        FrameReader::with_workers(stored, n)
    }

    /// Starts `n` workers (at least one) over `stored`: each one more keeps
    /// two more frames in memory.
    pub fn with_workers(stored: B, n: usize) -> io::Result<FrameReader<B>> {
        let n = n.max(1);
        let mut ins = Vec::with_capacity(n);
        let mut outs = Vec::with_capacity(n);
        for i in 0..n {
            let (tx_in, rx_in) = sync_channel::<Job>(1);
            let (tx_out, rx_out) = sync_channel::<Done>(1);
            thread::Builder::new()
                .name(format!("abup-zstd-{i}"))
                .spawn(move || decode_loop(&rx_in, &tx_out))?;
            ins.push(tx_in);
            outs.push(rx_out);
        }
        Ok(FrameReader {
            stored,
            ins,
            outs,
            sent: 0,
            received: 0,
            end: false,
            cur: Current::default(),
            spare_in: Vec::new(),
            spare_out: Vec::new(),
        })
    }

    /// The stored bytes reader (for checks at the end of the payload).
    pub fn get_mut(&mut self) -> &mut B {
        &mut self.stored
    }

    /// The stored bytes reader, after the last frame read.
    pub fn into_inner(self) -> B {
        self.stored
    }

    /// Sends frames to the workers until enough are out or the stream ends.
    fn dispatch(&mut self) -> io::Result<()> {
        while !self.end && self.sent - self.received < in_flight(self.ins.len()) {
            let mut frame = self.spare_in.pop().unwrap_or_default();
            match read_frame(&mut self.stored, &mut frame)? {
                None => self.end = true,
                Some(size) => {
                    let out = self.spare_out.pop();
                    let k = self.sent % self.ins.len();
                    self.ins[k]
                        .send((frame, size, out))
                        .map_err(|_| io::Error::other("a zstd worker thread stopped"))?;
                    self.sent += 1;
                }
            }
        }
        Ok(())
    }
}

impl<B: BufRead> FrameReader<B> {
    /// Makes the next decoded frame current; `false` at the end.
    fn advance(&mut self) -> io::Result<bool> {
        self.dispatch()?;
        if self.received == self.sent {
            return Ok(false);
        }
        let k = self.received % self.outs.len();
        let (out, n, frame) = recv_checking_signals(&self.outs[k])?
            .unwrap_or_else(|| Err(io::Error::other("a zstd worker thread stopped")))?;
        self.received += 1;
        self.spare_in.push(frame);
        if let Some(old) = self.cur.replace((out, n)) {
            self.spare_out.push(old);
        }
        // Keep the workers busy while this frame is consumed.
        self.dispatch()?;
        Ok(true)
    }
}

impl<B: BufRead> Read for FrameReader<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_used_up() {
            if !self.advance()? {
                return Ok(0);
            }
        }
        Ok(self.cur.read_into(buf))
    }
}

impl<B: BufRead> Blocks for FrameReader<B> {
    /// Each decoded frame as it lies in its aligned buffer.
    fn next_block(&mut self) -> io::Result<&[u8]> {
        while self.cur.is_used_up() {
            if !self.advance()? {
                return Ok(&[]);
            }
        }
        Ok(self.cur.take_rest())
    }
}

/// Decodes the frames it is given, each into its output buffer.
fn decode_loop(rx: &Receiver<Job>, tx: &SyncSender<Done>) {
    let mut dec = match zstd::bulk::Decompressor::new() {
        Ok(d) => Some(d),
        Err(e) => {
            let _ = tx.send(Err(e));
            None
        }
    };
    while let Ok((frame, size, out)) = rx.recv() {
        let Some(d) = dec.as_mut() else { return };
        let mut out = match out {
            Some(b) if b.capacity() >= size => b,
            _ => AlignedBuf::new(MAX_FRAME.min(size.next_multiple_of(1 << 20))),
        };
        let done = d
            .decompress_to_buffer(&frame[..], &mut out.as_mut_slice()[..size])
            .and_then(|n| {
                if n == size {
                    Ok((out, n, frame))
                } else {
                    Err(corrupt(
                        "a zstd frame decodes to another size than it declares",
                    ))
                }
            });
        let stop = done.is_err();
        if tx.send(done).is_err() || stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    fn data(len: usize) -> Vec<u8> {
        // Compressible runs, zeros (RLE blocks) and noise (raw blocks).
        let mut v: Vec<u8> = (0..len).map(|i| (i / 7 % 251) as u8).collect();
        let mut x = 12345u32;
        for (i, b) in v.iter_mut().enumerate() {
            if i % (3 << 20) > 2 << 20 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                *b = (x >> 16) as u8;
            } else if i % (1 << 20) < 300_000 {
                *b = 0;
            }
        }
        v
    }

    /// Frames of `block` bytes each, as `bundle create` writes them, with a
    /// skippable frame in between and checksums on.
    fn frames(d: &[u8], block: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, piece) in d.chunks(block).enumerate() {
            let mut c = zstd::bulk::Compressor::new(3).unwrap();
            c.include_checksum(i % 2 == 0).unwrap();
            out.extend(c.compress(piece).unwrap());
            if i == 1 {
                out.extend([0x5A, 0x2A, 0x4D, 0x18, 3, 0, 0, 0, 1, 2, 3]);
            }
        }
        out
    }

    fn decode(stored: &[u8]) -> io::Result<Vec<u8>> {
        let mut r = BufReader::with_capacity(1 << 20, stored);
        assert!(FrameReader::suits(&mut r)?);
        let mut f = FrameReader::new(r)?;
        let mut back = Vec::new();
        f.read_to_end(&mut back)?;
        Ok(back)
    }

    #[test]
    fn decodes_many_frames_in_order() {
        for len in [1, 4 << 20, (13 << 20) + 4321] {
            let d = data(len);
            let z = frames(&d, 4 << 20);
            // It is one zstd stream for any zstd reader, too.
            assert_eq!(zstd::decode_all(&z[..]).unwrap(), d);
            assert_eq!(decode(&z).unwrap(), d, "{len}");
        }
    }

    #[test]
    fn single_frame_streams_are_not_for_it() {
        let d = data(1 << 20);
        // The streaming encoder does not declare the size.
        let z = zstd::encode_all(&d[..], 3).unwrap();
        let mut r = BufReader::new(&z[..]);
        assert!(!FrameReader::suits(&mut r).unwrap());
        assert!(!FrameReader::suits(&mut BufReader::new(&b"\x1f\x8b\x08"[..])).unwrap());
        // A later frame without a size is refused, not decoded unbounded.
        let mut mixed = frames(&d, 1 << 19);
        mixed.extend(&z);
        let err = decode(&mixed).unwrap_err();
        assert!(err.to_string().contains("declare a size"), "{err}");
    }

    #[test]
    fn damaged_streams_are_errors() {
        let d = data(9 << 20);
        let z = frames(&d, 4 << 20);
        // Cut inside the second frame.
        let cut = z.len() - 1000;
        let err = decode(&z[..cut]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        // A flipped byte inside a compressed block.
        let mut bad = z.clone();
        bad[200] ^= 0x40;
        assert!(decode(&bad).is_err() || decode(&bad).unwrap() != d);
        // Garbage after the frames.
        let mut junk = z.clone();
        junk.extend(b"not zstd");
        let err = decode(&junk).unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");
    }

    #[test]
    fn header_fields() {
        let z = zstd::bulk::compress(&[7u8; 300], 3).unwrap();
        let h = parse_header(&z).unwrap().unwrap();
        assert_eq!(h.content_size, Some(300));
        assert_eq!(parse_header(&z[..3]).unwrap(), None);
        assert!(parse_header(b"nope!").is_err());
    }
}
