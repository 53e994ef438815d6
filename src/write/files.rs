//! Small regular files of a tarball made on worker threads.
//!
//! Extracting a root filesystem is mostly making small files: most of a
//! Debian `/usr` is files under 64 KiB, and each costs an open, a write,
//! owner, mode, xattrs, times and a close, all kernel time. One thread
//! doing them all leaves the other CPUs idle, and ext4 makes files in
//! parallel well (only entries of one directory share its lock). So the
//! extractor reads each small file's data from the stream and hands it,
//! with its metadata and its parent directory's fd, to a [`FilePool`]; the
//! workers make the file exactly as the extractor would itself.
//!
//! Ordering: the extractor creates every directory before handing out a
//! file in it, waits for all handed-out files ([`FilePool::wait_all`])
//! before a hard link (its target may be one of them) and before setting
//! directory metadata at the end, and nothing else in the archive touches a
//! path a worker makes (the namespace refuses duplicates). The first error
//! a worker meets is returned by the extractor's next check of the pool,
//! naming its entry; the files still queued are made (or fail) before the
//! pool is dropped, never outside the slot.
//!
//! Memory: at most [`QUEUE`] files of at most [`POOL_FILE_MAX`] bytes wait
//! for a worker (2 MiB), whatever the archive.

use anyhow::{Context, Result};
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use super::tar::{make_file, Meta};

/// Largest regular file handed to the workers; larger ones are written by
/// the extractor itself, streamed.
pub const POOL_FILE_MAX: u64 = 64 << 10;

/// Files waiting for a worker at most.
const QUEUE: usize = 32;

/// Worker threads: ext4 makes files in parallel well up to a few CPUs.
fn workers() -> usize {
    thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4))
}

/// A regular file to make: `name` in the directory `parent`, holding
/// `data`, with `meta`.
pub struct Job {
    pub(super) parent: Arc<OwnedFd>,
    pub(super) name: OsString,
    pub(super) data: Vec<u8>,
    pub(super) meta: Meta,
}

/// Worker threads making [`Job`]s, and the results not collected yet.
pub struct FilePool {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Result<()>>,
    /// Jobs handed out whose result was not collected.
    pending: usize,
    threads: Vec<JoinHandle<()>>,
}

impl FilePool {
    /// Starts the workers.
    pub fn start() -> Result<FilePool> {
        let (jobs, queue) = sync_channel::<Job>(QUEUE);
        let queue = Arc::new(Mutex::new(queue));
        let (results, done) = channel();
        let mut threads = Vec::new();
        for i in 0..workers() {
            let queue = Arc::clone(&queue);
            let results = results.clone();
            let handle = thread::Builder::new()
                .name(format!("abup-files-{i}"))
                .spawn(move || work(&queue, &results))
                .context("starting the file-making threads")?;
            threads.push(handle);
        }
        Ok(FilePool {
            jobs: Some(jobs),
            done,
            pending: 0,
            threads,
        })
    }

    /// The first error of the files made since the last call, if any.
    pub fn check(&mut self) -> Result<()> {
        while let Ok(result) = self.done.try_recv() {
            self.pending -= 1;
            result?;
        }
        Ok(())
    }

    /// Hands `job` to a worker (waits while [`QUEUE`] files wait). Its
    /// result comes from a later [`FilePool::check`] or
    /// [`FilePool::wait_all`].
    pub fn submit(&mut self, job: Job) -> Result<()> {
        self.jobs
            .as_ref()
            .context("the file-making threads were stopped")?
            .send(job)
            .ok()
            .context("the file-making threads stopped")?;
        self.pending += 1;
        Ok(())
    }

    /// Waits until every file handed out is made; the first error.
    pub fn wait_all(&mut self) -> Result<()> {
        let mut first = Ok(());
        while self.pending > 0 {
            let result = self
                .done
                .recv()
                .ok()
                .context("the file-making threads stopped")?;
            self.pending -= 1;
            if first.is_ok() {
                first = result;
            }
        }
        first
    }
}

impl Drop for FilePool {
    /// Lets the workers finish what is queued and stop.
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Makes the jobs of the queue until it closes.
fn work(queue: &Mutex<Receiver<Job>>, results: &Sender<Result<()>>) {
    loop {
        let job = {
            let queue = queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.recv()
        };
        let Ok(job) = job else { return };
        let result = make(job);
        if results.send(result).is_err() {
            return;
        }
    }
}

fn make(job: Job) -> Result<()> {
    let Job {
        parent,
        name,
        data,
        meta,
    } = job;
    let entry = meta.name.clone();
    let path: PathBuf = meta.path.clone();
    make_file(&parent, &name, &path, &meta, |file| {
        use std::io::Write;
        file.write_all(&data)
            .with_context(|| format!("writing {}", path.display()))
    })
    .with_context(|| format!("extracting tar entry {entry}"))
}
