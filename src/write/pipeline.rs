//! Read-ahead on another thread: the stage between the decompressor and a
//! writer, so that decompressing the next block overlaps with writing this
//! one. With [`crate::bundle::parallel`] (reading and checking chunks on
//! their own threads) an install runs read → check → decompress → write
//! concurrently, and takes about as long as its slowest stage.
//!
//! Blocks travel through a bounded channel and come back to be reused, so
//! memory stays at `depth + 2` blocks. Errors (a bad chunk, a decompression
//! error) reach the consumer in order, after the good blocks before them.

use std::io::{self, Read};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Size of one block handed from the decompressor to the writer.
pub const BLOCK: usize = 2 << 20;

/// Blocks queued between the two threads.
const DEPTH: usize = 2;

/// A `Read` whose bytes are read from `T` on another thread, ahead of time.
pub struct ReadAhead<T> {
    rx: Option<Receiver<io::Result<Vec<u8>>>>,
    back: Sender<Vec<u8>>,
    handle: Option<JoinHandle<T>>,
    buf: Vec<u8>,
    pos: usize,
}

impl<T: Read + Send + 'static> ReadAhead<T> {
    /// Starts reading `inner` on a new thread.
    pub fn start(inner: T) -> io::Result<ReadAhead<T>> {
        let (tx, rx) = sync_channel(DEPTH);
        let (back, recycled) = channel::<Vec<u8>>();
        let handle = thread::Builder::new()
            .name("abup-decompress".into())
            .spawn(move || {
                let mut inner = inner;
                loop {
                    let mut buf = recycled.try_recv().unwrap_or_default();
                    buf.resize(BLOCK, 0);
                    match read_full(&mut inner, &mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            buf.truncate(n);
                            if tx.send(Ok(buf)).is_err() || n < BLOCK {
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
            back,
            handle: Some(handle),
            buf: Vec::new(),
            pos: 0,
        })
    }

    /// Stops reading ahead and returns `T`, positioned after the last byte
    /// read: bytes read ahead but not consumed are dropped (a caller that
    /// checks sizes, like [`crate::bundle::PayloadReader::finish`], has
    /// already counted them).
    pub fn into_inner(mut self) -> io::Result<T> {
        // Unblocks the thread if it is waiting to send.
        self.rx = None;
        self.handle
            .take()
            .ok_or_else(|| io::Error::other("read-ahead thread is gone"))?
            .join()
            .map_err(|_| io::Error::other("the decompression thread panicked"))
    }
}

impl<T> Read for ReadAhead<T> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.buf.len() {
            let Some(rx) = &self.rx else { return Ok(0) };
            match recv_checking_signals(rx)? {
                // The thread is done: the end of the stream.
                None => return Ok(0),
                Some(Err(e)) => return Err(e),
                Some(Ok(buf)) => {
                    let old = std::mem::replace(&mut self.buf, buf);
                    let _ = self.back.send(old);
                    self.pos = 0;
                }
            }
        }
        let n = (self.buf.len() - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
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
