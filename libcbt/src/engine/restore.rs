//! Restore of any backup in a chain.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::{cancelled, is_cancelled, CancelToken, EngineError, Pool, Progress, ProgressFn};
use crate::format::segment::{self, FrameHeader, FRAME_HEADER_LEN};
use crate::format::{self, plan_restore, FrameRead, Index, Level, Manifest, RestorePlan};
use crate::nbd::{Client, ConnectOptions, Timeouts};
use crate::sink::{ReadHint, Sink, SinkError};

/// Deepest chain accepted (a cycle or a runaway chain is refused).
pub const MAX_CHAIN: usize = 10_000;
/// Largest index object read (32 bytes an entry: 2^25 entries).
pub const MAX_INDEX: u64 = 1 << 30;
/// Concurrent writes into a raw-file target (mostly O_DIRECT through io_uring: the disk
/// needs several in flight; synchronous O_DIRECT writes into a sparse ext4 file serialize on
/// its inode lock).
const FILE_WRITERS: usize = 32;
/// Alignment of O_DIRECT writes (memory, offset and length).
const ALIGN: usize = 4096;
// Groups of frames being read, decoded and written at once come from the sink's
// [`ReadHint`](crate::sink::ReadHint). On a local disk, with O_DIRECT writes, the disk wants
// depth: 10 smaller groups (2 MiB read, 4 MiB decoded) against 6 of twice the size restored a
// 31-deep chain of an 8 GiB disk in 4.8-5.4 s instead of 4.9-5.3 s by hand, and peaked at
// 150-168 MiB RSS instead of 168-212 MiB.

/// Where a restore writes.
#[derive(Debug, Clone)]
pub enum RestoreTarget {
    /// A new sparse raw file (refused if it exists). Ranges that are zero stay holes.
    RawFile(PathBuf),
    /// An NBD export at least as large as the disk (a `qemu-nbd` export of a new volume,
    /// say). Zero ranges are written with `WRITE_ZEROES`.
    Nbd(String),
    /// A new qcow2 file (refused if it exists), written through a `qemu-nbd` started for it.
    Qcow2(PathBuf),
    /// A raw file the caller has just created (empty, opened read-write): the engine sizes it
    /// and writes through this descriptor, never through a name. The caller owns its removal.
    /// hostd creates such files beneath a restore directory without following symlinks.
    RawOpened(Arc<std::fs::File>),
    /// The same for a qcow2 image, made by `qemu-img`/`qemu-nbd` through `/proc/<pid>/fd/<n>`
    /// (exactly this inode); `work_dir` is a private directory for `qemu-nbd`'s socket.
    Qcow2Opened {
        file: Arc<std::fs::File>,
        work_dir: PathBuf,
    },
}

/// How a restore runs.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Set to stop the restore: it fails with [`EngineError::Cancelled`] before the next
    /// group of frames (or within [`super::CANCEL_POLL`] of a stuck step). What it wrote
    /// stays: the caller removes the target it created.
    pub cancel: Option<CancelToken>,
    /// Deadlines of the NBD connection to an [`RestoreTarget::Nbd`] target and of the
    /// private `qemu-nbd` of a [`RestoreTarget::Qcow2`] one.
    pub nbd_timeouts: Timeouts,
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreStats {
    pub disk_size: u64,
    pub chain_len: usize,
    pub frames_read: u64,
    pub bytes_read_from_sink: u64,
    pub bytes_written: u64,
    pub bytes_zero: u64,
}

/// Reads the index of manifest `m` and checks it against the manifest (length, crc32, disk
/// size).
pub(crate) async fn load_index<S: Sink>(sink: &S, m: &Manifest) -> Result<Index, EngineError> {
    let ibytes = sink.get(&m.index.name, m.index.len.min(MAX_INDEX)).await?;
    if ibytes.len() as u64 != m.index.len || crc32fast::hash(&ibytes) != m.index.crc32 {
        return Err(EngineError::Mismatch {
            object: m.index.name.clone(),
            pos: 0,
            what: "index length or checksum differs from the manifest",
        });
    }
    let idx = Index::decode(&ibytes).map_err(|source| EngineError::Corrupt {
        object: m.index.name.clone(),
        pos: 0,
        source,
    })?;
    if idx.disk_size != m.disk_size {
        return Err(EngineError::Mismatch {
            object: m.index.name.clone(),
            pos: 0,
            what: "index disk size differs from the manifest",
        });
    }
    Ok(idx)
}

/// Loads and checks the manifests and indexes of the chain ending at `backup`, oldest (the
/// full) first.
pub async fn load_chain<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
) -> Result<Vec<(Manifest, Index)>, EngineError> {
    let mut chain = Vec::new();
    let mut seen = HashSet::new();
    let mut next = Some(backup.to_string());
    while let Some(id) = next {
        if !seen.insert(id.clone()) || chain.len() >= MAX_CHAIN {
            return Err(EngineError::Chain {
                backup: backup.into(),
                what: format!("cycle or chain deeper than {MAX_CHAIN} at {id}"),
            });
        }
        let m = super::catalog::read_manifest(sink, disk, &id)
            .await?
            .ok_or_else(|| SinkError::NotFound {
                name: format::manifest_name(disk, &id),
            })?;
        let idx = load_index(sink, &m).await?;
        if let Some((child, _)) = chain.last() {
            let child: &Manifest = child;
            if child.disk_size != m.disk_size {
                return Err(EngineError::Chain {
                    backup: backup.into(),
                    what: format!("{} and its parent {id} differ in size", child.backup_id),
                });
            }
        }
        next = match m.level {
            Level::Full => None,
            Level::Incremental => Some(m.parent.clone().ok_or_else(|| EngineError::Chain {
                backup: backup.into(),
                what: format!("incremental {id} has no parent"),
            })?),
        };
        chain.push((m, idx));
    }
    chain.reverse();
    Ok(chain)
}

/// The chain of `backup` ([`load_chain`]) and what restoring it takes: its indexes merged,
/// newest wins.
pub(crate) async fn chain_plan<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
) -> Result<(Vec<(Manifest, Index)>, RestorePlan), EngineError> {
    let chain = load_chain(sink, disk, backup).await?;
    let indexes: Vec<&Index> = chain.iter().map(|(_, i)| i).collect();
    let plan = plan_restore(&indexes).map_err(|source| EngineError::Plan {
        object: chain
            .get(source.index())
            .map_or_else(String::new, |(m, _)| m.index.name.clone()),
        offset: source.offset(),
        source: Box::new(source),
    })?;
    Ok((chain, plan))
}

/// Reads and checks frames `group` (adjacent in one segment) with one ranged read; returns
/// each frame's raw bytes.
pub(crate) async fn read_frames<S: Sink>(
    sink: &S,
    disk: &str,
    group: &[FrameRead],
    pool: &Pool,
) -> Result<Vec<Vec<u8>>, EngineError> {
    Ok(
        read_frames_at(sink, disk, group, pool, &Pool::default(), false)
            .await?
            .into_iter()
            .map(|d| d.buf)
            .collect(),
    )
}

/// A decoded frame: its raw bytes are `buf[start..start + len]`.
pub(crate) struct Decoded {
    pub buf: Vec<u8>,
    pub start: usize,
    pub len: usize,
}

impl Decoded {
    pub fn raw(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// [`read_frames`], decoding each frame at an [`ALIGN`]ed address when `aligned` (for
/// O_DIRECT writes), else at the start of its buffer.
async fn read_frames_at<S: Sink>(
    sink: &S,
    disk: &str,
    group: &[FrameRead],
    pool: &Pool,
    reads: &Pool,
    aligned: bool,
) -> Result<Vec<Decoded>, EngineError> {
    let first = &group[0];
    let object = format::segment_name(disk, first.segment);
    // plan_restore and Index::decode refuse frames that end past 2^64.
    let end = group
        .iter()
        .map(|f| f.pos.saturating_add(u64::from(f.frame_len)))
        .max()
        .unwrap_or(first.pos);
    // Read buffers come from the pool too: a fresh 4 MiB buffer per group cost a page
    // fault and a clear per page.
    let bytes = sink
        .get_range_into(&object, first.pos, end - first.pos, reads.take_at_least(0))
        .await?;
    let mut out = Vec::with_capacity(group.len());
    for f in group {
        let corrupt = |source| EngineError::Corrupt {
            object: object.clone(),
            pos: f.pos,
            source,
        };
        // Inside `bytes` by construction of the group, and the sink returns what was asked;
        // checked all the same, as a short frame rather than a panic.
        let at = (f.pos - first.pos) as usize;
        let frame = bytes
            .get(at..at.saturating_add(f.frame_len as usize))
            .ok_or_else(|| corrupt(format::FormatError::Truncated { what: "frame" }))?;
        let h = FrameHeader::decode(frame).map_err(corrupt)?;
        // A frame only slices name may be longer than the plan knows (`exact_len`).
        let len_ok = if f.exact_len {
            h.raw_len == f.len
        } else {
            h.raw_len >= f.len
        };
        if h.offset != f.offset || !len_ok || h.frame_len() != u64::from(f.frame_len) {
            return Err(EngineError::Mismatch {
                object: object.clone(),
                pos: f.pos,
                what: "frame header differs from the index entry",
            });
        }
        let len = h.raw_len as usize;
        let (buf, start) = if aligned {
            let mut buf = pool.take_at_least(len + ALIGN);
            let start = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
            segment::decode_frame_body(
                &h,
                &frame[FRAME_HEADER_LEN..],
                &mut buf[start..start + len],
            )
            .map_err(corrupt)?;
            (buf, start)
        } else {
            let mut buf = pool.take(len);
            segment::decode_frame_body(&h, &frame[FRAME_HEADER_LEN..], &mut buf)
                .map_err(corrupt)?;
            (buf, 0)
        };
        out.push(Decoded { buf, start, len });
    }
    reads.give(bytes);
    Ok(out)
}

/// Groups frames that follow each other in one segment (adjacent, or apart by at most
/// `hint.max_gap` bytes, read through and dropped), up to `hint.max_read` stored bytes and
/// `hint.max_decoded` decoded bytes: a group is one read and is decoded at once, and
/// well-compressed frames would otherwise make a 4 MiB read decode to gigabytes (seen: 3,276
/// 64 KiB frames of a 10% incremental in one group, 205 MiB).
pub(crate) fn coalesce<'a>(frames: &'a [FrameRead], hint: &ReadHint) -> Vec<&'a [FrameRead]> {
    let mut groups = Vec::new();
    let mut start = 0;
    let mut raw = 0u64;
    for i in 0..=frames.len() {
        let split = i == frames.len()
            || i > start && {
                let (a, b) = (&frames[i - 1], &frames[i]);
                let a_end = a.pos.saturating_add(u64::from(a.frame_len));
                b.segment != a.segment
                    || b.pos < a_end
                    || b.pos - a_end > hint.max_gap
                    || b.pos.saturating_add(u64::from(b.frame_len)) - frames[start].pos
                        > hint.max_read
                    || raw + u64::from(b.len) > hint.max_decoded
            };
        if split && i > start {
            groups.push(&frames[start..i]);
            start = i;
            raw = 0;
        }
        if let Some(f) = frames.get(i) {
            raw += u64::from(f.len);
        }
    }
    groups
}

/// Checks that `pieces` lie inside the `len` decoded bytes of the frame at `base`.
/// [`plan_restore`] guarantees it; a write outside would take stale pooled bytes, so it is
/// checked again where it matters.
fn check_pieces(base: u64, len: usize, pieces: &[std::ops::Range<u64>]) -> Result<(), EngineError> {
    let end = base.saturating_add(len as u64);
    match pieces
        .iter()
        .find(|p| p.start < base || p.end > end || p.start > p.end)
    {
        Some(p) => Err(EngineError::Invalid(format!(
            "restore piece {:#x}..{:#x} outside its frame {base:#x}..{end:#x}",
            p.start, p.end
        ))),
        None => Ok(()),
    }
}

enum Target {
    /// The file opened twice: with O_DIRECT for pieces aligned to [`ALIGN`] (nearly all:
    /// extents are cluster-aligned), buffered for the rest, and a limit on concurrent writes.
    /// Buffered writes of a whole disk cost more system time than the restore's decoding
    /// (page-cache allocation, reclaim on a host whose cache is full, inode-lock spinning:
    /// 9-10 s of system time for a 7-deep chain of an 8 GiB disk, against 2.4 s with
    /// O_DIRECT, also for its tens of thousands of 64 KiB pieces) and left most of the disk
    /// writing to the final fsync.
    /// No page is written both ways: a direct write covers whole pages that no other piece
    /// touches.
    File {
        direct: Option<(Arc<std::fs::File>, crate::sink::uring::Uring)>,
        buffered: Arc<std::fs::File>,
        writers: Arc<Semaphore>,
    },
    Nbd(Client),
}

impl Target {
    /// A new sparse raw file of `size` at `path` (refused if it exists), with blocks
    /// allocated for the `data` ranges when O_DIRECT is available.
    fn raw_file(
        path: &std::path::Path,
        size: u64,
        data: &crate::extent::ExtentMap,
    ) -> Result<Target, EngineError> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io("creating", path))?;
        Target::raw_opened(Arc::new(f), path, size, data)
    }

    /// A raw target on a file already open for writing; `path` names it in errors only.
    fn raw_opened(
        f: Arc<std::fs::File>,
        path: &std::path::Path,
        size: u64,
        data: &crate::extent::ExtentMap,
    ) -> Result<Target, EngineError> {
        use std::os::fd::AsRawFd;
        f.set_len(size).map_err(io("sizing", path))?;
        // The second handle, with O_DIRECT, opened through our own descriptor (the same inode
        // whatever happened to the name); a filesystem without it (tmpfs) gets buffered
        // writes only.
        let direct = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
                .ok()
                .zip(crate::sink::uring::Uring::new().ok())
                .map(|(f, ring)| (Arc::new(f), ring))
        };
        if direct.is_some() {
            // Best effort: without it the writes are only slower.
            for e in data.iter() {
                if crate::sink::uring::preallocate(&f, e.start, e.len()).is_err() {
                    break;
                }
            }
        }
        Ok(Target::File {
            direct,
            buffered: f,
            writers: Arc::new(Semaphore::new(FILE_WRITERS)),
        })
    }

    /// Writes the `pieces` (disk ranges inside the frame at `base`) of one decoded frame and
    /// gives the frame's buffer back.
    async fn write_pieces(
        &self,
        base: u64,
        d: Decoded,
        pieces: Vec<std::ops::Range<u64>>,
    ) -> Result<Vec<u8>, EngineError> {
        match self {
            Target::File {
                direct,
                buffered,
                writers,
            } => {
                let _turn = writers
                    .acquire()
                    .await
                    .map_err(|_| EngineError::Invalid("restore cancelled".into()))?;
                let io_err = |source| EngineError::Io {
                    op: "writing",
                    path: "restore target".into(),
                    source,
                };
                let a = ALIGN as u64;
                check_pieces(base, d.len, &pieces)?;
                let mut buf = d.buf;
                for p in pieces {
                    // Inside the frame's decoded bytes (checked above).
                    let range =
                        d.start + (p.start - base) as usize..d.start + (p.end - base) as usize;
                    let aligned = p.start % a == 0
                        && (p.end - p.start) % a == 0
                        && (buf[range.start..].as_ptr() as usize) % ALIGN == 0;
                    if let (Some((f, ring)), true) = (direct, aligned) {
                        let (r, back) = ring
                            .write_part(f.clone(), buf, range.clone(), p.start)
                            .await;
                        buf = back.ok_or_else(|| {
                            io_err(std::io::Error::other("io_uring write lost its buffer"))
                        })?;
                        match r {
                            // A filesystem may refuse O_DIRECT for some ranges: those go
                            // through the page cache below.
                            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                            r => {
                                r.map_err(io_err)?;
                                continue;
                            }
                        }
                    }
                    let f = buffered.clone();
                    buf = tokio::task::spawn_blocking(move || {
                        f.write_all_at(&buf[range], p.start).map(|()| buf)
                    })
                    .await
                    .map_err(EngineError::Task)?
                    .map_err(io_err)?;
                }
                Ok(buf)
            }
            Target::Nbd(c) => {
                check_pieces(base, d.len, &pieces)?;
                let max = u64::from(c.info().max_request());
                let whole = pieces.len() == 1
                    && pieces[0].start == base
                    && pieces[0].end - base == d.len as u64;
                if whole && d.start == 0 && d.len as u64 <= max {
                    let mut raw = d.buf;
                    raw.truncate(d.len);
                    c.write(base, raw, false).await?;
                    return Ok(Vec::new());
                }
                let raw = d.raw();
                for p in &pieces {
                    let mut at = p.start;
                    while at < p.end {
                        let n = (p.end - at).min(max);
                        let s = (at - base) as usize;
                        c.write(at, raw[s..s + n as usize].to_vec(), false).await?;
                        at += n;
                    }
                }
                Ok(d.buf)
            }
        }
    }
}

/// Restores `backup` of `disk` to `target`: merges the chain's indexes newest-wins, then reads
/// each needed frame once, in storage order, checks its crc, decompresses it and writes the
/// pieces the plan takes from it. [`restore_with`] with default options (no cancel, default
/// NBD timeouts).
pub async fn restore<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
    target: &RestoreTarget,
    progress: Option<&ProgressFn<'_>>,
) -> Result<RestoreStats, EngineError> {
    restore_with(
        sink,
        disk,
        backup,
        target,
        progress,
        &RestoreOptions::default(),
    )
    .await
}

/// [`restore`] with options: a cancellation token and NBD timeouts.
///
/// # Cancel safety
/// Dropping the future stops the restore, but a qcow2 restore then leaves its `qemu-nbd`
/// running: cancel through [`RestoreOptions::cancel`] instead.
pub async fn restore_with<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
    target: &RestoreTarget,
    progress: Option<&ProgressFn<'_>>,
    opts: &RestoreOptions,
) -> Result<RestoreStats, EngineError> {
    if is_cancelled(opts.cancel.as_ref()) {
        return Err(EngineError::Cancelled);
    }
    match target {
        RestoreTarget::Qcow2(path) => {
            if path.exists() {
                return Err(EngineError::Invalid(format!("{} exists", path.display())));
            }
            let sock = path.with_extension("restore.sock");
            let _ = std::fs::remove_file(&sock);
            return restore_qcow2(sink, disk, backup, path, &sock, true, progress, opts).await;
        }
        RestoreTarget::Qcow2Opened { file, work_dir } => {
            use std::os::fd::AsRawFd;
            let (pid, fd) = (std::process::id(), file.as_raw_fd());
            let path = PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
            let sock = work_dir.join(format!("qcow2-{pid}-{fd}-{:x}.sock", unique()));
            return restore_qcow2(sink, disk, backup, &path, &sock, false, progress, opts).await;
        }
        _ => {}
    }
    tokio::select! {
        r = restore_direct(sink, disk, backup, target, progress, opts) => r,
        () = cancelled(opts.cancel.as_ref()) => Err(EngineError::Cancelled),
    }
}

/// A restore to a raw file or an NBD export.
async fn restore_direct<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
    target: &RestoreTarget,
    progress: Option<&ProgressFn<'_>>,
    opts: &RestoreOptions,
) -> Result<RestoreStats, EngineError> {
    let (chain, plan) = chain_plan(sink, disk, backup).await?;
    let mut stats = RestoreStats {
        disk_size: plan.disk_size,
        chain_len: chain.len(),
        bytes_zero: plan.zeros.total_len(),
        ..Default::default()
    };
    let tgt = match target {
        RestoreTarget::RawFile(_) | RestoreTarget::RawOpened(_) => {
            let data: crate::extent::ExtentMap = plan
                .frames
                .iter()
                .flat_map(|f| &f.pieces)
                .map(|r| crate::extent::Extent {
                    start: r.start,
                    end: r.end,
                    flags: 0,
                })
                .collect();
            match target {
                RestoreTarget::RawOpened(f) => Target::raw_opened(
                    f.clone(),
                    std::path::Path::new("the target file"),
                    plan.disk_size,
                    &data,
                )?,
                RestoreTarget::RawFile(path) => Target::raw_file(path, plan.disk_size, &data)?,
                _ => unreachable!("a raw file target"),
            }
        }
        RestoreTarget::Qcow2(_) | RestoreTarget::Qcow2Opened { .. } => {
            unreachable!("handled above")
        }
        RestoreTarget::Nbd(uri) => {
            let copts = ConnectOptions {
                timeouts: opts.nbd_timeouts,
                ..ConnectOptions::default()
            };
            let c = Client::connect_with(uri, &copts).await?;
            if c.size() < plan.disk_size {
                return Err(EngineError::Invalid(format!(
                    "target {uri} is {} bytes, the disk {}",
                    c.size(),
                    plan.disk_size
                )));
            }
            for z in plan.zeros.iter() {
                if is_cancelled(opts.cancel.as_ref()) {
                    return Err(EngineError::Cancelled);
                }
                c.write_zeroes(z.start, z.len(), true).await?;
            }
            Target::Nbd(c)
        }
    };
    let total = plan.data_bytes();
    let aligned = matches!(
        tgt,
        Target::File {
            direct: Some(_),
            ..
        }
    );
    let tgt = Arc::new(tgt);
    let hint = sink.read_hint();
    let sem = Arc::new(Semaphore::new(hint.parallel.max(1)));
    let (pool, reads) = (Arc::new(Pool::default()), Arc::new(Pool::default()));
    let mut tasks = tokio::task::JoinSet::new();
    let groups: Vec<Vec<FrameRead>> = coalesce(&plan.frames, &hint)
        .into_iter()
        .map(<[FrameRead]>::to_vec)
        .collect();
    let mut done = 0u64;
    for group in groups {
        if is_cancelled(opts.cancel.as_ref()) {
            // Dropping `tasks` aborts the groups in flight.
            return Err(EngineError::Cancelled);
        }
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EngineError::Invalid("restore cancelled".into()))?;
        // Reap what finished, so errors surface early and memory stays bounded.
        while let Some(r) = tasks.try_join_next() {
            let (n, bytes, frames) = r.map_err(EngineError::Task)??;
            done += n;
            stats.bytes_read_from_sink += bytes;
            stats.frames_read += frames;
            if let Some(p) = progress {
                p(Progress { done, total });
            }
        }
        let (tgt, disk) = (tgt.clone(), disk.to_string());
        let (sink, pool, reads) = (sink.clone(), pool.clone(), reads.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let raws = read_frames_at(&sink, &disk, &group, &pool, &reads, aligned).await?;
            let mut written = 0;
            let bytes: u64 = group.iter().map(|f| u64::from(f.frame_len)).sum();
            // The group's frames are written concurrently: O_DIRECT writes want a deep queue.
            let mut writes = tokio::task::JoinSet::new();
            for (f, raw) in group.iter().zip(raws) {
                written += f.pieces.iter().map(|p| p.end - p.start).sum::<u64>();
                let (tgt, offset, pieces) = (tgt.clone(), f.offset, f.pieces.clone());
                writes.spawn(async move { tgt.write_pieces(offset, raw, pieces).await });
            }
            while let Some(r) = writes.join_next().await {
                pool.give(r.map_err(EngineError::Task)??);
            }
            Ok::<_, EngineError>((written, bytes, group.len() as u64))
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (n, bytes, frames) = r.map_err(EngineError::Task)??;
        done += n;
        stats.bytes_read_from_sink += bytes;
        stats.frames_read += frames;
        if let Some(p) = progress {
            p(Progress { done, total });
        }
    }
    stats.bytes_written = done;
    match &*tgt {
        Target::File { buffered, .. } => {
            // One fsync covers both handles' writes (same inode).
            let f = buffered.clone();
            tokio::task::spawn_blocking(move || f.sync_all())
                .await
                .map_err(EngineError::Task)?
                .map_err(|source| EngineError::Io {
                    op: "syncing",
                    path: "restore target".into(),
                    source,
                })?;
        }
        Target::Nbd(c) => {
            c.flush().await?;
            c.disconnect().await;
        }
    }
    Ok(stats)
}

fn io<'a>(
    op: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> EngineError + 'a {
    move |source| EngineError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// A number that differs between calls of one process (socket names).
fn unique() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Restores into a new qcow2: `qemu-img create`, a private `qemu-nbd` on `sock`, an NBD
/// restore, flush, then `qemu-nbd` is stopped with SIGTERM so that it closes the image cleanly.
/// `remove_on_error`: the image is ours to delete if the restore fails.
#[allow(clippy::too_many_arguments)]
async fn restore_qcow2<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
    path: &std::path::Path,
    sock: &std::path::Path,
    remove_on_error: bool,
    progress: Option<&ProgressFn<'_>>,
    opts: &RestoreOptions,
) -> Result<RestoreStats, EngineError> {
    use std::process::Command;
    let chain = load_chain(sink, disk, backup).await?;
    let size = chain.last().map_or(0, |(m, _)| m.disk_size);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .output()
        .map_err(io("running qemu-img for", path))?;
    if !out.status.success() {
        return Err(EngineError::Io {
            op: "creating",
            path: path.display().to_string(),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()),
        });
    }
    let mut child = Command::new("qemu-nbd")
        .args(["-f", "qcow2", "--shared=8", "--persistent", "-k"])
        .arg(sock)
        .arg(path)
        // Its only chatter is about our readiness probe; failures show as a restore error.
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(io("starting qemu-nbd for", path))?;
    let result = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while tokio::net::UnixStream::connect(sock).await.is_err() {
            if is_cancelled(opts.cancel.as_ref()) {
                return Err(EngineError::Cancelled);
            }
            if std::time::Instant::now() > deadline
                || child
                    .try_wait()
                    .map_err(io("waiting for qemu-nbd on", path))?
                    .is_some()
            {
                return Err(EngineError::Invalid(format!(
                    "qemu-nbd did not serve {}",
                    path.display()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let uri = crate::nbd::NbdUri::unix(sock, "").to_string();
        Box::pin(restore_with(
            sink,
            disk,
            backup,
            &RestoreTarget::Nbd(uri),
            progress,
            opts,
        ))
        .await
    }
    .await;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    let _ = std::fs::remove_file(sock);
    if result.is_err() && remove_on_error {
        let _ = std::fs::remove_file(path);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::Range;

    fn frame(pos: u64, frame_len: u32, len: u32) -> FrameRead {
        FrameRead {
            segment: 1,
            pos,
            frame_len,
            offset: pos * 1000,
            len,
            exact_len: true,
            pieces: vec![],
        }
    }

    #[test]
    fn groups_are_bounded_in_stored_and_in_decoded_bytes() {
        // 3,000 adjacent frames of 64 KiB that compressed to 100 bytes each.
        let frames: Vec<FrameRead> = (0..3000).map(|i| frame(i * 100, 100, 65536)).collect();
        let local = ReadHint::LOCAL;
        let groups = coalesce(&frames, &local);
        assert_eq!(groups.iter().map(|g| g.len()).sum::<usize>(), 3000);
        for g in &groups {
            let raw: u64 = g.iter().map(|f| u64::from(f.len)).sum();
            assert!(raw <= local.max_decoded, "group decodes to {raw} bytes");
        }
        assert_eq!(groups.len(), 3000 * 65536 / local.max_decoded as usize + 1);
        // Incompressible 1 MiB frames: the stored bound applies.
        let frames: Vec<FrameRead> = (0..10).map(|i| frame(i << 20, 1 << 20, 1 << 20)).collect();
        assert!(coalesce(&frames, &local).iter().all(|g| g.len() <= 2));
        let remote = ReadHint::OBJECT_STORE;
        assert!(coalesce(&frames, &remote).iter().all(|g| g.len() <= 8));
        // Another segment splits; a gap splits locally, and is read through on an object
        // store up to its bound; a frame before the last one's end splits; a single frame
        // is a group.
        let mut f = vec![
            frame(0, 10, 10),
            frame(10, 10, 10),
            frame(30, 10, 10),
            frame(30 + (2 << 20), 10, 10),
            frame(5, 10, 10),
        ];
        assert_eq!(coalesce(&f, &local).len(), 4);
        assert_eq!(
            coalesce(&f, &remote)
                .iter()
                .map(|g| g.len())
                .collect::<Vec<_>>(),
            [3, 1, 1]
        );
        f[2].segment = 2;
        assert_eq!(coalesce(&f[..3], &local).len(), 2);
        assert_eq!(coalesce(&f[..1], &local).len(), 1);
        assert!(coalesce(&[], &local).is_empty());
    }
    /// A decoded frame of `len` bytes (byte i = (seed + i) % 251) at an aligned address.
    fn decoded(len: usize, seed: usize) -> Decoded {
        let mut buf = vec![0u8; len + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        for (i, b) in buf[start..start + len].iter_mut().enumerate() {
            *b = ((seed + i) % 251) as u8;
        }
        Decoded { buf, start, len }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raw_file_target_writes_aligned_pieces_directly_and_the_rest_buffered() {
        // In the source tree, not /tmp: tmpfs (a common /tmp) has no O_DIRECT, and the direct
        // path is what this tests.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let path = dir.path().join("out.raw");
        let size = 2 << 20;
        // Frame A at 0 (1 MiB): aligned pieces (direct) and unaligned ones (buffered) side
        // by side; frame B at an unaligned base, whole.
        let a: Vec<Range<u64>> = vec![
            0..4096,
            4608..9216,
            16384..278_528,
            278_628..278_728,
            282_624..(1 << 20),
        ];
        let (b_base, b_len) = (1_300_001u64, 10_000usize);
        let b: Vec<Range<u64>> = std::iter::once(b_base..b_base + b_len as u64).collect();
        let data: crate::extent::ExtentMap = a
            .iter()
            .chain(&b)
            .map(|r| crate::extent::Extent {
                start: r.start,
                end: r.end,
                flags: 0,
            })
            .collect();
        let tgt = Target::raw_file(&path, size, &data).expect("target");
        let Target::File {
            direct, buffered, ..
        } = &tgt
        else {
            panic!("not a file target")
        };
        assert!(
            direct.is_some(),
            "no O_DIRECT/io_uring on the filesystem of {}: the direct path is untested",
            dir.path().display()
        );
        let buffered = buffered.clone();
        tgt.write_pieces(0, decoded(1 << 20, 0), a.clone())
            .await
            .expect("frame A");
        tgt.write_pieces(b_base, decoded(b_len, 7), b.clone())
            .await
            .expect("frame B");
        buffered.sync_all().expect("fsync");
        let got = std::fs::read(&path).expect("read back");
        assert_eq!(got.len() as u64, size);
        for (i, byte) in got.iter().enumerate() {
            let i = i as u64;
            let want = if a.iter().any(|r| r.contains(&i)) {
                (i % 251) as u8
            } else if b[0].contains(&i) {
                ((7 + i - b_base) % 251) as u8
            } else {
                0
            };
            assert_eq!(*byte, want, "byte {i}");
        }
        // Refused when the file exists: a restore never overwrites.
        assert!(Target::raw_file(&path, size, &data).is_err());
    }
}
