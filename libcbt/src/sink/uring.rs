//! An io_uring engine: one thread owns the ring; async callers send it writes, reads and
//! fsyncs through a bounded channel and get the result (and their buffer) back on a oneshot.
//!
//! # Ownership, and why the `unsafe` is sound
//!
//! The kernel reads from (or writes into) a request's buffer and uses its file descriptor
//! between the submission and the completion of the request. Each request therefore *owns*
//! its buffer (`Vec<u8>` or [`AlignedBuf`]) and an `Arc<File>`, and the ring thread keeps the
//! request in its in-flight table, keyed by the `user_data` of the SQE, until the matching CQE
//! is reaped. Only then is the buffer handed back. A heap buffer does not move when the value
//! that owns it moves, so the pointer given to the kernel stays valid. If the ring thread
//! fails, it exits only after every in-flight request has completed.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use tokio::sync::oneshot;

/// Alignment that O_DIRECT needs on the filesystems we write to.
pub const ALIGN: usize = 4096;
/// Submission queue depth.
const QUEUE_DEPTH: u32 = 64;

/// Allocates disk blocks for `offset..offset + len` of `file` (`fallocate`, mode 0; the range
/// reads as zeroes until written). Lets O_DIRECT writes into a new sparse file run as
/// overwrites, which ext4 does in parallel, instead of allocating writes, which it serializes.
pub fn preallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: a plain syscall on a descriptor the borrowed `File` keeps open; no memory is
    // passed.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, off, n) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A buffer whose usable part starts at an [`ALIGN`]ed address (for O_DIRECT), built from a
/// plain `Vec` with safe code: the slack before the aligned start is simply not used.
#[derive(Debug)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    cap: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `cap` usable bytes (a multiple of [`ALIGN`]).
    pub fn new(cap: usize) -> AlignedBuf {
        let raw = vec![0u8; cap + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        AlignedBuf {
            raw,
            start,
            cap,
            len: 0,
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    pub fn clear(&mut self) {
        self.len = 0;
    }
    /// Copies as much of `data` as fits; returns how much.
    pub fn fill_from(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.cap - self.len);
        let at = self.start + self.len;
        self.raw[at..at + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }
    /// Pads with zeroes up to a multiple of [`ALIGN`].
    pub fn pad_to_align(&mut self) {
        let target = self.len.div_ceil(ALIGN) * ALIGN;
        let at = self.start + self.len;
        self.raw[at..self.start + target].fill(0);
        self.len = target;
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

/// What a request carries to the kernel and back.
enum Buf {
    Aligned(AlignedBuf),
    Plain(Vec<u8>),
    /// `v[start..start + len]` (checked to lie inside `v` when made).
    Part {
        v: Vec<u8>,
        start: usize,
        len: usize,
    },
}

impl Buf {
    fn ptr(&self) -> *const u8 {
        match self {
            Buf::Aligned(b) => b.as_slice().as_ptr(),
            Buf::Plain(v) => v.as_ptr(),
            Buf::Part { v, start, .. } => v[*start..].as_ptr(),
        }
    }
    fn mut_ptr(&mut self) -> *mut u8 {
        match self {
            Buf::Aligned(b) => b.raw[b.start..].as_mut_ptr(),
            Buf::Plain(v) => v.as_mut_ptr(),
            Buf::Part { v, start, .. } => v[*start..].as_mut_ptr(),
        }
    }
    fn len(&self) -> usize {
        match self {
            Buf::Aligned(b) => b.len,
            Buf::Plain(v) => v.len(),
            Buf::Part { len, .. } => *len,
        }
    }
}

enum Kind {
    Write,
    Read,
    Fsync,
}

/// A request as the ring thread keeps it while the kernel works on it.
struct Request {
    kind: Kind,
    file: Arc<File>,
    buf: Option<Buf>,
    offset: u64,
    /// Bytes already done (short reads and writes are resubmitted for the rest).
    done: usize,
    reply: oneshot::Sender<(io::Result<()>, Option<Buf>)>,
}

/// Handle to the ring thread. Dropping every handle stops the thread once its requests are
/// complete.
#[derive(Debug, Clone)]
pub struct Uring {
    tx: SyncSender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("offset", &self.offset)
            .finish()
    }
}

impl Uring {
    /// Creates the ring and its thread; fails where io_uring is unavailable.
    pub fn new() -> io::Result<Uring> {
        let ring = IoUring::new(QUEUE_DEPTH)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE_DEPTH as usize * 2);
        std::thread::Builder::new()
            .name("cbt-uring".into())
            .spawn(move || ring_thread(ring, rx))?;
        Ok(Uring { tx })
    }

    async fn submit(
        &self,
        kind: Kind,
        file: Arc<File>,
        buf: Option<Buf>,
        offset: u64,
    ) -> (io::Result<()>, Option<Buf>) {
        let (reply, rx) = oneshot::channel();
        let req = Request {
            kind,
            file,
            buf,
            offset,
            done: 0,
            reply,
        };
        // The channel is bounded; a full ring thread makes this wait briefly. Sending from the
        // blocking pool keeps the async runtime free.
        let tx = self.tx.clone();
        let sent = tokio::task::spawn_blocking(move || tx.send(req).map_err(|e| e.0)).await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(req)) => return (Err(io::Error::other("io_uring thread is gone")), req.buf),
            Err(e) => return (Err(io::Error::other(e)), None),
        }
        rx.await
            .unwrap_or_else(|_| (Err(io::Error::other("io_uring thread is gone")), None))
    }

    /// Writes all of `buf` at `offset`; gives the buffer back whatever happens.
    pub async fn write(
        &self,
        file: Arc<File>,
        buf: AlignedBuf,
        offset: u64,
    ) -> (io::Result<()>, Option<AlignedBuf>) {
        let (r, b) = self
            .submit(Kind::Write, file, Some(Buf::Aligned(buf)), offset)
            .await;
        (
            r,
            b.and_then(|b| {
                if let Buf::Aligned(a) = b {
                    Some(a)
                } else {
                    None
                }
            }),
        )
    }

    /// Writes `v[range]` at `offset` (for O_DIRECT, the part must start at an aligned address
    /// and be aligned in length); gives `v` back whatever happens.
    pub async fn write_part(
        &self,
        file: Arc<File>,
        v: Vec<u8>,
        range: std::ops::Range<usize>,
        offset: u64,
    ) -> (io::Result<()>, Option<Vec<u8>>) {
        if range.start > range.end || range.end > v.len() {
            return (Err(io::ErrorKind::InvalidInput.into()), Some(v));
        }
        let part = Buf::Part {
            v,
            start: range.start,
            len: range.end - range.start,
        };
        let (r, b) = self.submit(Kind::Write, file, Some(part), offset).await;
        (
            r,
            b.and_then(|b| match b {
                Buf::Part { v, .. } | Buf::Plain(v) => Some(v),
                Buf::Aligned(_) => None,
            }),
        )
    }

    /// Reads exactly `len` bytes at `offset` (an error at end of file).
    pub async fn read(&self, file: Arc<File>, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        self.read_into(file, Vec::new(), len, offset).await
    }

    /// [`read`](Self::read) into `buf`, made exactly `len` long (a reused buffer that is long
    /// enough is not cleared first).
    pub async fn read_into(
        &self,
        file: Arc<File>,
        mut buf: Vec<u8>,
        len: usize,
        offset: u64,
    ) -> io::Result<Vec<u8>> {
        buf.resize(len, 0);
        let (r, b) = self
            .submit(Kind::Read, file, Some(Buf::Plain(buf)), offset)
            .await;
        r?;
        match b {
            Some(Buf::Plain(v)) => Ok(v),
            _ => Err(io::Error::other("io_uring read lost its buffer")),
        }
    }

    /// fsync.
    pub async fn fsync(&self, file: Arc<File>) -> io::Result<()> {
        self.submit(Kind::Fsync, file, None, 0).await.0
    }
}

fn push(ring: &mut IoUring, id: u64, r: &mut Request) -> io::Result<()> {
    let fd = types::Fd(r.file.as_raw_fd());
    let entry = match r.kind {
        Kind::Fsync => opcode::Fsync::new(fd).build(),
        Kind::Write => {
            let buf = r
                .buf
                .as_ref()
                .ok_or_else(|| io::Error::other("write without buffer"))?;
            let len = u32::try_from(buf.len() - r.done).map_err(io::Error::other)?;
            // SAFETY: `buf.ptr().add(r.done)` stays within the buffer (done < len).
            let ptr = unsafe { buf.ptr().add(r.done) };
            opcode::Write::new(fd, ptr, len)
                .offset(r.offset + r.done as u64)
                .build()
        }
        Kind::Read => {
            let buf = r
                .buf
                .as_mut()
                .ok_or_else(|| io::Error::other("read without buffer"))?;
            let len = u32::try_from(buf.len() - r.done).map_err(io::Error::other)?;
            // SAFETY: as above, within the buffer.
            let ptr = unsafe { buf.mut_ptr().add(r.done) };
            opcode::Read::new(fd, ptr, len)
                .offset(r.offset + r.done as u64)
                .build()
        }
    }
    .user_data(id);
    loop {
        // SAFETY: the entry points into the buffer and names the fd of request `id`, which the
        // ring thread keeps in its in-flight table (owning both) until the CQE with user_data
        // `id` is reaped; the buffer is heap memory that does not move meanwhile.
        let pushed = unsafe { ring.submission().push(&entry) }.is_ok();
        if pushed {
            return Ok(());
        }
        // Queue full: hand what is queued to the kernel and try again.
        ring.submit()?;
    }
}

fn ring_thread(mut ring: IoUring, rx: Receiver<Request>) {
    let mut inflight: HashMap<u64, Request> = HashMap::new();
    let mut next_id = 0u64;
    let mut closed = false;
    loop {
        // Take new requests: block when idle, otherwise only what is already queued.
        let mut incoming = Vec::new();
        if inflight.is_empty() {
            if closed {
                return;
            }
            match rx.recv() {
                Ok(r) => incoming.push(r),
                Err(_) => return,
            }
        }
        while inflight.len() + incoming.len() < QUEUE_DEPTH as usize {
            match rx.try_recv() {
                Ok(r) => incoming.push(r),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        for mut r in incoming {
            next_id += 1;
            match push(&mut ring, next_id, &mut r) {
                Ok(()) => {
                    inflight.insert(next_id, r);
                }
                Err(e) => {
                    let _ = r.reply.send((Err(e), r.buf.take()));
                }
            }
        }
        if inflight.is_empty() {
            continue;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Without a working ring nothing completes: fail everything that waits. The
            // kernel may still hold the buffers, so they are leaked, not freed.
            for (_, r) in inflight.drain() {
                let Request { reply, buf, .. } = r;
                std::mem::forget(buf);
                let _ = reply.send((Err(io::Error::new(e.kind(), e.to_string())), None));
            }
            return;
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (id, res) in done {
            let Some(mut r) = inflight.remove(&id) else {
                continue;
            };
            if res < 0 {
                let _ = r
                    .reply
                    .send((Err(io::Error::from_raw_os_error(-res)), r.buf.take()));
                continue;
            }
            let n = usize::try_from(res).unwrap_or(0);
            let total = r.buf.as_ref().map_or(0, Buf::len);
            if matches!(r.kind, Kind::Fsync) || r.done + n >= total {
                let _ = r.reply.send((Ok(()), r.buf.take()));
                continue;
            }
            if n == 0 {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "io_uring read or write made no progress",
                );
                let _ = r.reply.send((Err(e), r.buf.take()));
                continue;
            }
            // Short: resubmit the rest.
            r.done += n;
            next_id += 1;
            match push(&mut ring, next_id, &mut r) {
                Ok(()) => {
                    inflight.insert(next_id, r);
                }
                Err(e) => {
                    let _ = r.reply.send((Err(e), r.buf.take()));
                }
            }
        }
    }
}
