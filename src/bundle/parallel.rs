//! Checking a payload's chunks on other threads, so that installing runs as
//! a pipeline: one thread reads chunks from the bundle stream, a few threads
//! hash them (chunks are independent, so they are checked in parallel), and
//! the consumer — the decompressor — receives them in order as a
//! [`BufRead`], each one checked before it gets a byte of it.
//!
//! Chunk `i` goes to hasher `i % N` and comes back from hasher `i % N`, so
//! order is kept without any reordering buffer. Channels are bounded and the
//! consumer hands its used buffers back to the reader, so memory stays at a
//! handful of chunks whatever the payload size. If the consumer goes away
//! (an error downstream), every thread stops at its next send.

use super::reader::{payload_error, BundleHeader, ChunkCheck, ChunkId, Chunks, PayloadReader};
use crate::write::pipeline::recv_checking_signals;
use anyhow::Result;
use std::io::{self, BufRead, Read};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::thread::{self, JoinHandle};

/// A checked chunk, or the error that stopped the stream.
type Checked = io::Result<Vec<u8>>;

/// A chunk read but not yet checked.
type Unchecked = io::Result<(ChunkId, Vec<u8>)>;

/// The verified stored bytes of one payload, checked on other threads.
pub struct ParallelChunks<R> {
    outs: Vec<Receiver<Checked>>,
    back: Sender<Vec<u8>>,
    reader: Option<JoinHandle<R>>,
    /// Index of the next chunk to receive.
    next: usize,
    total: usize,
    buf: Vec<u8>,
    pos: usize,
    /// The error that stopped the stream, repeated to every later call.
    failed: Option<(io::ErrorKind, String)>,
}

impl<R: Read + Send + 'static> ParallelChunks<R> {
    /// Starts the reader and `n` hasher threads (at least one) over `chunks`.
    pub fn start(chunks: Chunks<R>, n: usize) -> io::Result<ParallelChunks<R>> {
        let total = chunks.count();
        let check = chunks.checker();
        let n = n.max(1);
        let (back, recycled) = channel::<Vec<u8>>();
        let mut ins: Vec<SyncSender<Unchecked>> = Vec::with_capacity(n);
        let mut outs = Vec::with_capacity(n);
        for h in 0..n {
            let (tx_in, rx_in) = sync_channel::<Unchecked>(1);
            let (tx_out, rx_out) = sync_channel::<Checked>(1);
            let check = check.clone();
            thread::Builder::new()
                .name(format!("abup-hash-{h}"))
                .spawn(move || hash_loop(&check, &rx_in, &tx_out))?;
            ins.push(tx_in);
            outs.push(rx_out);
        }
        let reader = thread::Builder::new()
            .name("abup-read".into())
            .spawn(move || read_loop(chunks, &ins, &recycled))?;
        Ok(ParallelChunks {
            outs,
            back,
            reader: Some(reader),
            next: 0,
            total,
            buf: Vec::new(),
            pos: 0,
            failed: None,
        })
    }

    /// The bundle stream, after this payload's last chunk. Only meaningful
    /// once every chunk was received.
    pub fn into_inner(mut self) -> io::Result<R> {
        if self.next < self.total {
            return Err(io::Error::other(
                "the payload was not read to its end (abup bug)",
            ));
        }
        self.outs.clear();
        self.reader
            .take()
            .ok_or_else(|| io::Error::other("the chunk reader is gone"))?
            .join()
            .map_err(|_| io::Error::other("the chunk reader thread panicked"))
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        self.failed = Some((e.kind(), e.to_string()));
        e
    }
}

/// Opens payload `name` like [`super::reader::payload_reader`], but checks
/// its chunks on other threads. Waits for the first chunk to be read and
/// checked before returning, so a corrupt or spliced stream is refused
/// before anything is written.
pub fn parallel_payload_reader<R: Read + Send + 'static>(
    r: R,
    header: &BundleHeader,
    name: &str,
) -> Result<PayloadReader<ParallelChunks<R>>> {
    let (p, hashes) = header.payload_and_hashes(name)?;
    let threads = super::reader::stage_threads(p);
    let mut stored = ParallelChunks::start(Chunks::new(r, p, hashes), threads)?;
    stored.fill_buf()?;
    PayloadReader::new(stored, p)
}

/// Reads every chunk and deals them out to the hashers in turn.
fn read_loop<R: Read>(
    mut chunks: Chunks<R>,
    ins: &[SyncSender<Unchecked>],
    recycled: &Receiver<Vec<u8>>,
) -> R {
    let mut i = 0;
    loop {
        let mut buf = recycled.try_recv().unwrap_or_default();
        let msg = match chunks.read_next(&mut buf) {
            Ok(None) => break,
            Ok(Some(id)) => Ok((id, buf)),
            Err(e) => Err(e),
        };
        let stop = msg.is_err();
        if ins[i % ins.len()].send(msg).is_err() || stop {
            break;
        }
        i += 1;
    }
    chunks.into_inner()
}

/// Checks the chunks it is given and passes them on (or the first error).
fn hash_loop(check: &ChunkCheck, rx: &Receiver<Unchecked>, tx: &SyncSender<Checked>) {
    while let Ok(msg) = rx.recv() {
        let out = msg.and_then(|(id, buf)| check.check(id, &buf).map(|()| buf));
        let stop = out.is_err();
        if tx.send(out).is_err() || stop {
            return;
        }
    }
}

impl<R> Read for ParallelChunks<R>
where
    R: Read + Send + 'static,
{
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        super::reader::read_buffered(self, out)
    }
}

impl<R> BufRead for ParallelChunks<R>
where
    R: Read + Send + 'static,
{
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if let Some((kind, msg)) = &self.failed {
            return Err(payload_error(*kind, msg.clone()));
        }
        if self.pos >= self.buf.len() {
            if self.next >= self.total {
                return Ok(&[]);
            }
            let rx = &self.outs[self.next % self.outs.len()];
            // A signal is not a failure of the stream: returned, not kept.
            let got = recv_checking_signals(rx)?
                .unwrap_or_else(|| Err(io::Error::other("the chunk checking threads stopped")));
            match got {
                Ok(buf) => {
                    let old = std::mem::replace(&mut self.buf, buf);
                    // The reader may be gone after an error; then the
                    // buffer is simply dropped.
                    let _ = self.back.send(old);
                    self.pos = 0;
                    self.next += 1;
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }
}
