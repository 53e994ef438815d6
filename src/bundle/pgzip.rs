//! Parallel gzip compression for `bundle create`, pigz-style: the input is
//! cut into 4 MiB blocks, each compressed on a worker thread into an
//! independent gzip member, and the members are written in order. Any gzip
//! reader that handles multi-member files (RFC 1952, `gzip -d`, flate2's
//! `MultiGzDecoder`) reads the result as one stream.
//!
//! Block `k` goes to worker `k % N` and its member comes back from worker
//! `k % N`, so order is kept with bounded channels and no reordering buffer;
//! at most about `2 N` blocks are in memory.

use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::{self, JoinHandle};

/// Input bytes per gzip member.
const BLOCK: usize = 4 << 20;

/// A `Write` that gzips on worker threads and writes the members to `W`.
pub struct ParallelGzip<W: Write> {
    inner: W,
    block: Vec<u8>,
    ins: Vec<SyncSender<Vec<u8>>>,
    outs: Vec<Receiver<io::Result<Vec<u8>>>>,
    workers: Vec<JoinHandle<()>>,
    sent: usize,
    written: usize,
}

impl<W: Write> ParallelGzip<W> {
    /// Starts one worker per CPU (at most 8).
    pub fn new(inner: W, level: flate2::Compression) -> io::Result<ParallelGzip<W>> {
        let n = thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8));
        let mut ins = Vec::with_capacity(n);
        let mut outs = Vec::with_capacity(n);
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let (tx_in, rx_in) = sync_channel::<Vec<u8>>(1);
            let (tx_out, rx_out) = sync_channel::<io::Result<Vec<u8>>>(1);
            let handle = thread::Builder::new()
                .name(format!("abup-gzip-{i}"))
                .spawn(move || {
                    while let Ok(block) = rx_in.recv() {
                        let out = Vec::with_capacity(block.len() / 2);
                        let mut e = flate2::write::GzEncoder::new(out, level);
                        let member = e.write_all(&block).and_then(|()| e.finish());
                        if tx_out.send(member).is_err() {
                            return;
                        }
                    }
                })?;
            ins.push(tx_in);
            outs.push(rx_out);
            workers.push(handle);
        }
        Ok(ParallelGzip {
            inner,
            block: Vec::with_capacity(BLOCK),
            ins,
            outs,
            workers,
            sent: 0,
            written: 0,
        })
    }

    fn workers_gone() -> io::Error {
        io::Error::other("a gzip worker thread stopped")
    }

    /// Writes the next member in order to `inner`.
    fn write_next(&mut self) -> io::Result<()> {
        let member = self.outs[self.written % self.outs.len()]
            .recv()
            .map_err(|_| Self::workers_gone())??;
        self.inner.write_all(&member)?;
        self.written += 1;
        Ok(())
    }

    /// Hands the current block to its worker.
    fn send_block(&mut self) -> io::Result<()> {
        if self.sent - self.written >= self.ins.len() {
            self.write_next()?;
        }
        let block = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK));
        self.ins[self.sent % self.ins.len()]
            .send(block)
            .map_err(|_| Self::workers_gone())?;
        self.sent += 1;
        Ok(())
    }

    /// Compresses what is left and writes every member; returns `W`.
    pub fn finish(mut self) -> io::Result<W> {
        // An empty input still makes one (empty) member: a valid gzip file.
        if !self.block.is_empty() || self.sent == 0 {
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

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == BLOCK {
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
    use std::io::Read;

    #[test]
    fn round_trips_through_a_multi_member_reader() {
        for len in [0, 10, BLOCK, 3 * BLOCK + 777] {
            let data: Vec<u8> = (0..len).map(|i| (i % 13 + i / 9999) as u8).collect();
            let mut gz = ParallelGzip::new(Vec::new(), flate2::Compression::fast()).unwrap();
            for piece in data.chunks(100_000) {
                gz.write_all(piece).unwrap();
            }
            let out = gz.finish().unwrap();
            let mut back = Vec::new();
            flate2::read::MultiGzDecoder::new(&out[..])
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "{len}");
        }
    }
}
