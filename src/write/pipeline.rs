//! Read-ahead on another thread: the stage between the decompressor and a
//! writer, so that decompressing the next block overlaps with writing this
//! one. With [`crate::bundle::parallel`] (reading and checking chunks on
//! their own threads) an install runs read → check → decompress → write
//! concurrently, and takes about as long as its slowest stage.
//!
//! Blocks travel through a bounded channel and come back to be reused, so
//! memory stays at `depth + 2` blocks. Errors (a bad chunk, a decompression
//! error) reach the consumer in order, after the good blocks before them.
//!
//! Blocks are [`AlignedBuf`]s, and a consumer that takes whole blocks
//! ([`Blocks`]) gets them as they are: the raw writer hands them to an
//! `O_DIRECT` write without copying them first.

use std::io::{self, Read};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Size of one block handed from the decompressor to the writer.
pub const BLOCK: usize = 2 << 20;

/// Blocks queued between the two threads.
const DEPTH: usize = 2;

/// Alignment of block buffers: what `O_DIRECT` needs of a buffer address.
pub const ALIGN: usize = 4096;

/// A heap buffer whose usable part starts on an [`ALIGN`] boundary, as
/// `O_DIRECT` needs, without any unsafe code.
pub struct AlignedBuf {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` usable bytes.
    pub fn new(len: usize) -> AlignedBuf {
        let v = vec![0u8; len + ALIGN];
        let off = v.as_ptr().align_offset(ALIGN).min(ALIGN);
        AlignedBuf { v, off, len }
    }

    /// The usable bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.v[self.off..self.off + self.len]
    }

    /// The usable bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }

    /// Number of usable bytes.
    pub fn capacity(&self) -> usize {
        self.len
    }
}

/// A stream handed out in whole blocks, for a consumer that uses each block
/// where it lies (no copy into a buffer of its own).
pub trait Blocks {
    /// The next block of the stream, empty at its end. Valid until the next
    /// call; it starts on an [`ALIGN`] boundary unless a partial `read`
    /// came before.
    fn next_block(&mut self) -> io::Result<&[u8]>;
}

impl<T: Blocks + ?Sized> Blocks for &mut T {
    fn next_block(&mut self) -> io::Result<&[u8]> {
        (**self).next_block()
    }
}

/// A stream read both ways: whole blocks (raw images) or bytes (tar).
pub trait BlockRead: Read + Blocks {}

impl<T: Read + Blocks> BlockRead for T {}

/// Blocks of any `Read`, read into one aligned buffer (one copy).
pub struct ReadBlocks<R> {
    inner: R,
    buf: AlignedBuf,
}

impl<R: Read> ReadBlocks<R> {
    pub fn new(inner: R) -> ReadBlocks<R> {
        ReadBlocks {
            inner,
            buf: AlignedBuf::new(BLOCK),
        }
    }
}

impl<R: Read> Read for ReadBlocks<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.inner.read(out)
    }
}

impl<R: Read> Blocks for ReadBlocks<R> {
    fn next_block(&mut self) -> io::Result<&[u8]> {
        let n = read_full(&mut self.inner, self.buf.as_mut_slice())?;
        Ok(&self.buf.as_slice()[..n])
    }
}

/// A filled block: the buffer and how many of its bytes hold data.
pub type Filled = (AlignedBuf, usize);

/// The block a consumer is working through, and how far it got: shared by
/// every stage that hands out blocks ([`ReadAhead`],
/// [`crate::bundle::pzstd::FrameReader`]).
#[derive(Default)]
pub struct Current {
    block: Option<Filled>,
    pos: usize,
}

impl Current {
    /// Whether every byte of the current block was handed out.
    pub fn is_used_up(&self) -> bool {
        self.block.as_ref().is_none_or(|(_, n)| self.pos >= *n)
    }

    /// Makes `next` current; returns the previous buffer, for reuse.
    pub fn replace(&mut self, next: Filled) -> Option<AlignedBuf> {
        self.pos = 0;
        self.block.replace(next).map(|(b, _)| b)
    }

    /// Copies unread bytes into `out`; returns how many.
    pub fn read_into(&mut self, out: &mut [u8]) -> usize {
        let rest = self.take_rest();
        let (left, n) = (rest.len(), rest.len().min(out.len()));
        out[..n].copy_from_slice(&rest[..n]);
        // Only `n` of them were used.
        self.pos -= left - n;
        n
    }

    /// Hands out every unread byte.
    pub fn take_rest(&mut self) -> &[u8] {
        let Some((b, n)) = &self.block else {
            return &[];
        };
        let start = self.pos.min(*n);
        self.pos = *n;
        &b.as_slice()[start..*n]
    }
}

/// A `Read` whose bytes are read from `T` on another thread, ahead of time
/// (or, [`ReadAhead::inline`], on the caller's thread).
pub struct ReadAhead<T> {
    rx: Option<Receiver<io::Result<Filled>>>,
    back: Option<Sender<AlignedBuf>>,
    handle: Option<JoinHandle<T>>,
    /// `T` read on the caller's thread.
    inline: Option<T>,
    cur: Current,
}

impl<T> ReadAhead<T> {
    /// Reads `inner` on the caller's thread: for a reader that already runs
    /// ahead on threads of its own, where another thread would only add a
    /// copy.
    pub fn inline(inner: T) -> ReadAhead<T> {
        ReadAhead {
            rx: None,
            back: None,
            handle: None,
            inline: Some(inner),
            cur: Current::default(),
        }
    }

    /// Makes the next block from the thread current; `false` at the end.
    fn advance(&mut self) -> io::Result<bool> {
        let Some(rx) = &self.rx else { return Ok(false) };
        match recv_checking_signals(rx)? {
            // The thread is done: the end of the stream.
            None => Ok(false),
            Some(Err(e)) => Err(e),
            Some(Ok(next)) => {
                if let (Some(old), Some(back)) = (self.cur.replace(next), &self.back) {
                    let _ = back.send(old);
                }
                Ok(true)
            }
        }
    }
}

impl<T: Read + Send + 'static> ReadAhead<T> {
    /// Starts reading `inner` on a new thread.
    pub fn start(inner: T) -> io::Result<ReadAhead<T>> {
        let (tx, rx) = sync_channel(DEPTH);
        let (back, recycled) = channel::<AlignedBuf>();
        let handle = thread::Builder::new()
            .name("abup-decompress".into())
            .spawn(move || {
                let mut inner = inner;
                loop {
                    let mut buf = recycled
                        .try_recv()
                        .unwrap_or_else(|_| AlignedBuf::new(BLOCK));
                    match read_full(&mut inner, buf.as_mut_slice()) {
                        Ok(0) => break,
                        Ok(n) => {
                            if tx.send(Ok((buf, n))).is_err() || n < BLOCK {
                                break;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            break;
                        }
                    }
                }
                inner
            })?;
        Ok(ReadAhead {
            rx: Some(rx),
            back: Some(back),
            handle: Some(handle),
            inline: None,
            cur: Current::default(),
        })
    }

    /// Stops reading ahead and returns `T`, positioned after the last byte
    /// read: bytes read ahead but not consumed are dropped (a caller that
    /// checks sizes, like [`crate::bundle::PayloadReader::finish`], has
    /// already counted them).
    pub fn into_inner(mut self) -> io::Result<T> {
        if let Some(inner) = self.inline.take() {
            return Ok(inner);
        }
        // Unblocks the thread if it is waiting to send.
        self.rx = None;
        self.handle
            .take()
            .ok_or_else(|| io::Error::other("read-ahead thread is gone"))?
            .join()
            .map_err(|_| io::Error::other("the decompression thread panicked"))
    }
}

impl<T: Read> Read for ReadAhead<T> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Some(inner) = &mut self.inline {
            crate::signal::check_io()?;
            return inner.read(out);
        }
        if out.is_empty() {
            return Ok(0);
        }
        if self.cur.is_used_up() && !self.advance()? {
            return Ok(0);
        }
        Ok(self.cur.read_into(out))
    }
}

impl<T: Blocks> Blocks for ReadAhead<T> {
    fn next_block(&mut self) -> io::Result<&[u8]> {
        if self.inline.is_some() {
            crate::signal::check_io()?;
            return match &mut self.inline {
                Some(inner) => inner.next_block(),
                None => Ok(&[]),
            };
        }
        if self.cur.is_used_up() && !self.advance()? {
            return Ok(&[]);
        }
        Ok(self.cur.take_rest())
    }
}

/// How often a consumer waiting for the next block looks for a signal.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// Waits for the next message, but stops with the [`crate::signal`] error
/// (inside an `io::Error`, see [`crate::signal::interrupted_by`]) when a
/// signal asks the run to stop: the producer may be stuck in a read that
/// never returns (a stalled stdin), and the consumer is the safe point.
/// `None` once the producer is gone.
pub(crate) fn recv_checking_signals<M>(rx: &Receiver<M>) -> io::Result<Option<M>> {
    loop {
        crate::signal::check_io()?;
        match rx.recv_timeout(SIGNAL_POLL) {
            Ok(m) => return Ok(Some(m)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(None),
        }
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub(crate) fn read_full<R: Read + ?Sized>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_every_byte_in_order() {
        let data: Vec<u8> = (0..(3 * BLOCK + 12345)).map(|i| (i % 251) as u8).collect();
        let mut ra = ReadAhead::start(io::Cursor::new(data.clone())).unwrap();
        let mut got = Vec::new();
        ra.read_to_end(&mut got).unwrap();
        assert_eq!(got, data);
        assert_eq!(ra.into_inner().unwrap().position(), data.len() as u64);
    }

    /// Blocks of a `ReadAhead` are its own buffers, aligned, in order; a
    /// partial read first leaves the rest of its block to the next one.
    #[test]
    fn blocks_are_aligned_and_in_order() {
        let data: Vec<u8> = (0..(2 * BLOCK + 777)).map(|i| (i % 253) as u8).collect();
        let mut ra = ReadAhead::start(ReadBlocks::new(io::Cursor::new(data.clone()))).unwrap();
        let mut first = [0u8; 10];
        ra.read_exact(&mut first).unwrap();
        let mut got = first.to_vec();
        let mut sizes = Vec::new();
        loop {
            let b = ra.next_block().unwrap();
            if b.is_empty() {
                break;
            }
            if !sizes.is_empty() {
                assert_eq!(b.as_ptr().align_offset(ALIGN), 0);
            }
            sizes.push(b.len());
            got.extend_from_slice(b);
        }
        assert_eq!(sizes, vec![BLOCK - 10, BLOCK, 777]);
        assert_eq!(got, data);
    }

    #[test]
    fn errors_come_after_the_good_bytes() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("bad chunk"));
                }
                let n = buf.len().min(self.0).min(1000);
                buf[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let mut ra = ReadAhead::start(Failing(BLOCK + 10)).unwrap();
        let mut got = Vec::new();
        let err = ra.read_to_end(&mut got).unwrap_err();
        assert_eq!(err.to_string(), "bad chunk");
        assert_eq!(got.len(), BLOCK);
    }

    #[test]
    fn stopping_early_still_returns_the_inner_reader() {
        let data = vec![1u8; 5 * BLOCK];
        let mut ra = ReadAhead::start(io::Cursor::new(data)).unwrap();
        let mut first = [0u8; 10];
        ra.read_exact(&mut first).unwrap();
        let inner = ra.into_inner().unwrap();
        assert!(inner.position() >= BLOCK as u64);
    }
}
