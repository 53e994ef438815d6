//! Parallel compression for `bundle create`, pigz-style: the input is cut
//! into blocks (4 MiB for gzip, 2 MiB for zstd), each compressed on a worker
//! thread into an independent gzip member or zstd frame, and these are written in order. Any reader of
//! the format reads the result as one stream (multi-member gzip per RFC
//! 1952, `gzip -d`, flate2's `MultiGzDecoder`; concatenated zstd frames,
//! `zstd -d`). The zstd frames declare their decompressed size, so installs
//! decode them in parallel too ([`super::pzstd`]).
//!
//! Block `k` goes to worker `k % N` and its output comes back from worker
//! `k % N`, so order is kept with bounded channels and no reordering buffer;
//! at most `N + 1` blocks are out (and `N + 2` block buffers in memory).

use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::{self, JoinHandle};

/// Input bytes per gzip member.
const BLOCK: usize = 4 << 20;

/// Input bytes per zstd frame: what an install holds per frame in flight
/// (a few of them, see [`super::pzstd`]), so smaller than a gzip member.
pub const ZSTD_FRAME: usize = 2 << 20;

impl Codec {
    /// Input bytes per member or frame.
    fn block(&self) -> usize {
        match self {
            Codec::Gzip(_) => BLOCK,
            Codec::Zstd(_) => ZSTD_FRAME,
        }
    }
}

/// How each block is compressed.
#[derive(Debug, Clone, Copy)]
pub enum Codec {
    Gzip(flate2::Compression),
    /// A zstd level.
    Zstd(i32),
}

/// The per-thread state of a codec.
enum Worker {
    Gzip(flate2::Compression),
    Zstd(Box<zstd::bulk::Compressor<'static>>),
}

impl Worker {
    fn new(codec: Codec) -> io::Result<Worker> {
        Ok(match codec {
            Codec::Gzip(level) => Worker::Gzip(level),
            Codec::Zstd(level) => Worker::Zstd(Box::new(zstd::bulk::Compressor::new(level)?)),
        })
    }

    /// Compresses `block` into `out` (its old contents dropped, its memory
    /// reused).
    fn compress(&mut self, block: &[u8], mut out: Vec<u8>) -> io::Result<Vec<u8>> {
        out.clear();
        match self {
            Worker::Gzip(level) => {
                let mut e = flate2::write::GzEncoder::new(out, *level);
                e.write_all(block).and_then(|()| e.finish())
            }
            // One frame, declaring its size (zstd does when it knows it).
            Worker::Zstd(c) => {
                out.reserve(zstd::zstd_safe::compress_bound(block.len()));
                c.compress_to_buffer(block, &mut out)?;
                Ok(out)
            }
        }
    }
}

/// A block to compress: its buffer, how many bytes of it are input, and the
/// buffer to compress it into.
type Job = (Vec<u8>, usize, Vec<u8>);

/// A compressed block, and the input buffer back for reuse.
type Done = io::Result<(Vec<u8>, Vec<u8>)>;

/// A `Write` that compresses on worker threads and writes the members or
/// frames to `W`. Buffers go round (input blocks and outputs come back for
/// the next blocks), so nothing is allocated per block.
pub struct ParallelEncoder<W: Write> {
    inner: W,
    /// The block being filled: always `block_size` long, `filled` of it
    /// input.
    block: Vec<u8>,
    filled: usize,
    block_size: usize,
    ins: Vec<SyncSender<Job>>,
    outs: Vec<Receiver<Done>>,
    workers: Vec<JoinHandle<()>>,
    sent: usize,
    written: usize,
    spare_blocks: Vec<Vec<u8>>,
    spare_outs: Vec<Vec<u8>>,
}

/// Blocks out at a time for `n` workers: one each and one more, so a
/// worker finding its next block waiting rarely idles (more only costs
/// memory: gzip blocks are 4 MiB).
fn in_flight(n: usize) -> usize {
    n + 1
}

impl<W: Write> ParallelEncoder<W> {
    /// Starts one worker per CPU (at most 8).
    pub fn new(inner: W, codec: Codec) -> io::Result<ParallelEncoder<W>> {
        let n = thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8));
        let mut ins = Vec::with_capacity(n);
        let mut outs = Vec::with_capacity(n);
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let (tx_in, rx_in) = sync_channel::<Job>(1);
            let (tx_out, rx_out) = sync_channel::<Done>(1);
            let handle = thread::Builder::new()
                .name(format!("abup-compress-{i}"))
                .spawn(move || {
                    let mut worker = Worker::new(codec);
                    while let Ok((block, filled, out)) = rx_in.recv() {
                        let member = match &mut worker {
                            Ok(w) => w.compress(&block[..filled], out).map(|m| (m, block)),
                            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                        };
                        if tx_out.send(member).is_err() {
                            return;
                        }
                    }
                })?;
            ins.push(tx_in);
            outs.push(rx_out);
            workers.push(handle);
        }
        let block_size = codec.block();
        Ok(ParallelEncoder {
            inner,
            block: vec![0; block_size],
            filled: 0,
            block_size,
            ins,
            outs,
            workers,
            sent: 0,
            written: 0,
            spare_blocks: Vec::new(),
            spare_outs: Vec::new(),
        })
    }

    fn workers_gone() -> io::Error {
        io::Error::other("a compression thread stopped")
    }

    /// Writes the next member in order to `inner`.
    fn write_next(&mut self) -> io::Result<()> {
        let (member, block) = self.outs[self.written % self.outs.len()]
            .recv()
            .map_err(|_| Self::workers_gone())??;
        self.inner.write_all(&member)?;
        self.written += 1;
        self.spare_blocks.push(block);
        self.spare_outs.push(member);
        Ok(())
    }

    /// Hands the current block to its worker.
    fn send_block(&mut self) -> io::Result<()> {
        if self.sent - self.written >= in_flight(self.ins.len()) {
            self.write_next()?;
        }
        let next = self
            .spare_blocks
            .pop()
            .unwrap_or_else(|| vec![0; self.block_size]);
        let block = std::mem::replace(&mut self.block, next);
        let out = self.spare_outs.pop().unwrap_or_default();
        let filled = std::mem::take(&mut self.filled);
        self.ins[self.sent % self.ins.len()]
            .send((block, filled, out))
            .map_err(|_| Self::workers_gone())?;
        self.sent += 1;
        Ok(())
    }

    /// Reads `r` to its end straight into the blocks (no copy in between),
    /// showing each piece read to `seen` first; returns the bytes read.
    pub fn read_from(&mut self, r: &mut dyn Read, seen: &mut dyn FnMut(&[u8])) -> io::Result<u64> {
        let mut total = 0;
        loop {
            if self.filled == self.block_size {
                self.send_block()?;
            }
            let n = match r.read(&mut self.block[self.filled..]) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            seen(&self.block[self.filled..self.filled + n]);
            self.filled += n;
            total += n as u64;
        }
    }

    /// Compresses what is left and writes every member; returns `W`.
    pub fn finish(mut self) -> io::Result<W> {
        // An empty input still makes one (empty) member or frame: a valid
        // gzip or zstd file.
        if self.filled > 0 || self.sent == 0 {
            self.send_block()?;
        }
        while self.written < self.sent {
            self.write_next()?;
        }
        self.ins.clear();
        for w in self.workers.drain(..) {
            w.join().map_err(|_| Self::workers_gone())?;
        }
        Ok(self.inner)
    }
}

impl<W: Write> Write for ParallelEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.block_size - self.filled);
        self.block[self.filled..self.filled + n].copy_from_slice(&buf[..n]);
        self.filled += n;
        if self.filled == self.block_size {
            self.send_block()?;
        }
        Ok(n)
    }

    /// Members are only complete at block boundaries; flushing forces
    /// nothing out early.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_a_multi_member_reader() {
        for len in [0, 10, BLOCK, 3 * BLOCK + 777] {
            let data: Vec<u8> = (0..len).map(|i| (i % 13 + i / 9999) as u8).collect();
            let gzip = Codec::Gzip(flate2::Compression::fast());
            let mut gz = ParallelEncoder::new(Vec::new(), gzip).unwrap();
            for piece in data.chunks(100_000) {
                gz.write_all(piece).unwrap();
            }
            let out = gz.finish().unwrap();
            let mut back = Vec::new();
            flate2::read::MultiGzDecoder::new(&out[..])
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "{len}");

            let mut z = ParallelEncoder::new(Vec::new(), Codec::Zstd(3)).unwrap();
            for piece in data.chunks(100_000) {
                z.write_all(piece).unwrap();
            }
            let out = z.finish().unwrap();
            // One stream for the zstd tool's decoder; frames for the
            // parallel one.
            assert_eq!(zstd::decode_all(&out[..]).unwrap(), data, "{len}");
            let mut r = std::io::BufReader::new(&out[..]);
            assert!(crate::bundle::pzstd::FrameReader::suits(&mut r).unwrap());
            let mut back = Vec::new();
            crate::bundle::pzstd::FrameReader::new(r)
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "{len}");
        }
    }
}
