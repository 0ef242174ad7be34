//! Reading a backup by disk offset, as an NBD export serves it ([`crate::nbd::server`]): the
//! chain's indexes merged once (newest wins, as a restore merges them), then each request
//! answered from the frames it touches. Frames are read from the sink in storage order,
//! neighbours in one ranged read, checked (crc, header against index) and decoded; decoded
//! frames stay in a cache bounded by bytes, so a client reading on sequentially, or several
//! connections reading the same region, read each frame from the sink once.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::restore::{chain_plan, coalesce, read_frames};
use super::{EngineError, Pool};
use crate::format::FrameRead;
use crate::sink::Sink;

/// Default bound of the decoded-frame cache of one export.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// A piece of a read: data (a range of a decoded frame, shared with the cache) or a hole that
/// reads as zeroes.
#[derive(Debug, Clone)]
pub enum Span {
    Data {
        offset: u64,
        buf: Arc<Vec<u8>>,
        range: Range<usize>,
    },
    Hole {
        offset: u64,
        len: u64,
    },
}

impl Span {
    pub fn offset(&self) -> u64 {
        match self {
            Span::Data { offset, .. } | Span::Hole { offset, .. } => *offset,
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            Span::Data { range, .. } => range.len() as u64,
            Span::Hole { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A disk range taken from frame `frame` (an index into the plan's frames).
#[derive(Debug, Clone, Copy)]
struct Piece {
    start: u64,
    end: u64,
    frame: usize,
}

/// Decoded frames, evicted oldest first beyond `limit` bytes. A frame larger than the limit
/// is used and not kept.
#[derive(Default)]
struct FrameCache {
    frames: HashMap<usize, Arc<Vec<u8>>>,
    order: VecDeque<usize>,
    bytes: usize,
    limit: usize,
}

impl FrameCache {
    fn get(&self, i: usize) -> Option<Arc<Vec<u8>>> {
        self.frames.get(&i).cloned()
    }

    fn put(&mut self, i: usize, buf: Arc<Vec<u8>>) {
        if buf.len() > self.limit || self.frames.contains_key(&i) {
            return;
        }
        while self.bytes + buf.len() > self.limit {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.frames.remove(&old) {
                self.bytes -= b.len();
            }
        }
        self.bytes += buf.len();
        self.order.push_back(i);
        self.frames.insert(i, buf);
    }
}

/// What an export did, for its owner's metrics and notes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Frames read from the sink (a frame read twice, after its eviction, counts twice).
    pub frames_read: u64,
    /// Ranged reads of the sink.
    pub sink_reads: u64,
    /// Frames served from the cache.
    pub cache_hits: u64,
    /// Frames taken from another request's read of them, in flight.
    pub shared: u64,
    /// Frames read ahead of a sequential reader (also in `frames_read`).
    pub prefetched: u64,
}

/// Backup `backup` of `disk` on a sink, readable by offset. A client that reads on where its
/// last read ended (a copy, a block stream, a sequential scan) gets the frames ahead of it
/// read in the background ([`PREFETCH_BYTES`]), so that its next request finds them in the
/// cache or in flight.
pub struct BackupExport<S: Sink> {
    inner: Arc<Inner<S>>,
}

/// The most bytes of frames read ahead of a sequential reader (a quarter of the cache at
/// most, so that what is read ahead is still there when it is asked for).
pub const PREFETCH_BYTES: u64 = 8 << 20;
/// Read-aheads running at once, per export.
const PREFETCH_TASKS: usize = 2;
/// Sequential readers followed at once, per export (nbdcopy's connections read one stream
/// between them; each QEMU block job or guest scan is one more).
const STREAMS: usize = 8;

/// Where the readers followed will read next.
#[derive(Default)]
struct Streams {
    /// (where the reader's last read ended, how far ahead frames are read for it).
    ends: [(u64, u64); STREAMS],
    next: usize,
}

struct Inner<S: Sink> {
    sink: S,
    disk: String,
    backup: String,
    size: u64,
    chain_len: usize,
    /// Disk ranges that hold data, sorted and disjoint; what is between reads as zeroes.
    map: Vec<Piece>,
    frames: Vec<FrameRead>,
    cache: Mutex<FrameCache>,
    /// Frames being read, by whom reads them: a request that needs one waits for that read
    /// instead of reading it again (several connections read one frame's parts at once).
    inflight: Mutex<HashMap<usize, Pending>>,
    stats: Mutex<ExportStats>,
    streams: Mutex<Streams>,
    prefetching: std::sync::atomic::AtomicUsize,
    /// Read-aheads running (aborted when the export is dropped).
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Reads in flight.
    reading: std::sync::atomic::AtomicUsize,
}

/// The outcome of a frame's read, once known.
type Outcome = Option<Result<Arc<Vec<u8>>, String>>;
type Pending = tokio::sync::watch::Receiver<Outcome>;

/// The frames a request reads itself: each one's outcome is sent to the requests waiting for
/// it; any not sent when this is dropped (the request failed or was dropped) is withdrawn, and
/// its waiters read it themselves.
struct Reading<'a> {
    inflight: &'a Mutex<HashMap<usize, Pending>>,
    senders: HashMap<usize, tokio::sync::watch::Sender<Outcome>>,
}

impl Reading<'_> {
    fn done(&mut self, i: usize, r: Result<Arc<Vec<u8>>, String>) {
        if let Some(tx) = self.senders.remove(&i) {
            self.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&i);
            let _ = tx.send(Some(r));
        }
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let mut m = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for i in self.senders.keys() {
            m.remove(i);
        }
        // The senders drop here: waiters see the channel closed.
    }
}

impl<S: Sink> BackupExport<S> {
    /// Loads and checks the chain of `backup` and merges its indexes; reads no frame.
    pub async fn open(
        sink: S,
        disk: &str,
        backup: &str,
        cache_bytes: usize,
    ) -> Result<Self, EngineError> {
        Ok(BackupExport {
            inner: Arc::new(Inner::open(sink, disk, backup, cache_bytes).await?),
        })
    }

    pub fn size(&self) -> u64 {
        self.inner.size
    }

    pub fn disk(&self) -> &str {
        &self.inner.disk
    }

    pub fn backup(&self) -> &str {
        &self.inner.backup
    }

    /// Backups merged (1: a full).
    pub fn chain_len(&self) -> usize {
        self.inner.chain_len
    }

    pub fn stats(&self) -> ExportStats {
        *self.inner.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `offset..offset + len` (inside the disk) as data and holes, in order, covering it.
    /// A read that starts where an earlier one ended starts a read-ahead of the frames after
    /// it first (it runs beside this read).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<Span>, EngineError> {
        use std::sync::atomic::Ordering;
        let end = offset.saturating_add(len);
        // Readers that keep several requests in flight (nbdcopy's connections) are ahead of
        // the sink already: a read-ahead would only add work (measured: 10% more CPU, 10%
        // slower on the B1 full). It is for readers that wait for each answer.
        let busy = Busy::enter(&self.inner);
        let shallow = busy.before < SHALLOW;
        // A read-ahead slot first, so that a reader is never marked as read ahead for when
        // no read-ahead could start.
        let slot = (shallow
            && self.inner.prefetching.fetch_add(1, Ordering::SeqCst) < PREFETCH_TASKS)
            .then(|| Slot(self.inner.clone()));
        if shallow && slot.is_none() {
            self.inner.prefetching.fetch_sub(1, Ordering::SeqCst);
        }
        match (self.inner.sequential(offset, end, slot.is_some()), slot) {
            (Some(ahead), Some(slot)) => {
                // This request's own frames are asked for first (the one across `end` too),
                // then the read-ahead starts behind them.
                let mine = self.inner.read(offset, len);
                let ((), r) = tokio::join!(
                    async {
                        tokio::task::yield_now().await;
                        self.prefetch(ahead, slot);
                    },
                    mine
                );
                r
            }
            _ => self.inner.read(offset, len).await,
        }
    }

    /// Allocation of `offset..offset + len` (clipped to the disk) from the merged index:
    /// `(length, hole)` runs in order, covering it, at most `max` of them (the last may then
    /// end short of the range: a client asks again from there).
    pub fn allocation(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        self.inner.allocation(offset, len, max)
    }

    /// Reads in the background the frames of `ahead` that are neither cached nor being read,
    /// at most a window's decoded bytes of them; requests that need them meanwhile wait for
    /// this read. `slot` is the read-ahead's place among [`PREFETCH_TASKS`].
    fn prefetch(&self, ahead: Range<u64>, slot: Slot<S>) {
        let inner = &self.inner;
        let (from, end) = (ahead.start, ahead.end.min(inner.size));
        let budget = ahead.end - ahead.start;
        let mut frames: Vec<usize> = inner.map[inner.first_after(from)..]
            .iter()
            .take_while(|p| p.start < end)
            .map(|p| p.frame)
            .collect();
        frames.sort_unstable();
        frames.dedup();
        let mut wanted = Vec::new();
        let mut senders = HashMap::new();
        {
            let cache = inner.cache.lock().unwrap_or_else(|e| e.into_inner());
            let mut inflight = inner.inflight.lock().unwrap_or_else(|e| e.into_inner());
            let mut bytes = 0u64;
            for i in frames {
                if cache.frames.contains_key(&i) || inflight.contains_key(&i) {
                    continue;
                }
                // Decoded bytes, not disk bytes: a deep chain's frames overlap in the window.
                bytes += u64::from(inner.frames[i].len);
                if bytes > budget && !wanted.is_empty() {
                    break;
                }
                let (tx, rx) = tokio::sync::watch::channel(None);
                inflight.insert(i, rx);
                senders.insert(i, tx);
                wanted.push(i);
            }
        }
        if wanted.is_empty() {
            return;
        }
        let task_inner = inner.clone();
        let task = tokio::spawn(async move {
            let _slot = slot;
            let inner = task_inner;
            let mut mine = Reading {
                inflight: &inner.inflight,
                senders,
            };
            let r = inner.fetch(&mut wanted, &mut mine, None, false).await;
            drop(mine);
            match r {
                Ok((reads, frames)) => {
                    let mut st = inner.stats.lock().unwrap_or_else(|e| e.into_inner());
                    st.sink_reads += reads;
                    st.frames_read += frames;
                    st.prefetched += frames;
                }
                Err(e) => tracing::debug!(disk = %inner.disk, error = %e, "read-ahead failed"),
            }
        });
        let mut tasks = inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
    }
}

impl<S: Sink> Drop for BackupExport<S> {
    fn drop(&mut self) {
        // Read-aheads stop with their export (a mount's end lets rewrites in).
        for t in self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

/// Reads in flight at once below which a sequential reader gets read-ahead.
const SHALLOW: usize = 2;

/// A read in flight on an export, counted while it lasts.
struct Busy<'a, S: Sink> {
    inner: &'a Inner<S>,
    /// Reads in flight when this one began.
    before: usize,
}

impl<'a, S: Sink> Busy<'a, S> {
    fn enter(inner: &'a Inner<S>) -> Self {
        let before = inner
            .reading
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Busy { inner, before }
    }
}

impl<S: Sink> Drop for Busy<'_, S> {
    fn drop(&mut self) {
        self.inner
            .reading
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A read-ahead's place among [`PREFETCH_TASKS`], given back when dropped (the task ended,
/// panicked or was aborted).
struct Slot<S: Sink>(Arc<Inner<S>>);

impl<S: Sink> Drop for Slot<S> {
    fn drop(&mut self) {
        self.0
            .prefetching
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl<S: Sink> Inner<S> {
    /// Follows the reader of `offset..end`: one whose last read ended at `offset` goes on
    /// (a new one is followed instead of the oldest). Answers what to read ahead for it: once
    /// less than half the window is read ahead of `end`, the range from there to a full
    /// window past `end` (so read-aheads come in half-window batches, not a frame per read).
    fn sequential(&self, offset: u64, end: u64, can_prefetch: bool) -> Option<Range<u64>> {
        let window = PREFETCH_BYTES
            .min(self.cache.lock().unwrap_or_else(|e| e.into_inner()).limit as u64 / 4);
        let mut s = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let found = if offset == 0 {
            None
        } else {
            s.ends.iter().position(|e| e.0 == offset)
        };
        let Some(i) = found else {
            let n = s.next;
            s.ends[n] = (end, end);
            s.next = (n + 1) % STREAMS;
            return None;
        };
        let e = &mut s.ends[i];
        e.0 = end;
        let ahead = e.1.max(end);
        if !can_prefetch || window == 0 || ahead >= end.saturating_add(window / 2) {
            return None;
        }
        e.1 = end.saturating_add(window);
        Some(ahead..e.1)
    }

    async fn open(
        sink: S,
        disk: &str,
        backup: &str,
        cache_bytes: usize,
    ) -> Result<Self, EngineError> {
        let (chain, plan) = chain_plan(&sink, disk, backup).await?;
        let mut map: Vec<Piece> = plan
            .frames
            .iter()
            .enumerate()
            .flat_map(|(frame, f)| {
                f.pieces.iter().map(move |p| Piece {
                    start: p.start,
                    end: p.end,
                    frame,
                })
            })
            .filter(|p| p.end > p.start)
            .collect();
        map.sort_unstable_by_key(|p| p.start);
        if let Some(w) = map.windows(2).find(|w| w[0].end > w[1].start) {
            return Err(EngineError::Invalid(format!(
                "backup {backup} of {disk}: pieces {:#x}..{:#x} and {:#x}..{:#x} overlap",
                w[0].start, w[0].end, w[1].start, w[1].end
            )));
        }
        if map.last().is_some_and(|p| p.end > plan.disk_size) {
            return Err(EngineError::Invalid(format!(
                "backup {backup} of {disk}: data past the disk's end"
            )));
        }
        Ok(Inner {
            sink,
            disk: disk.into(),
            backup: backup.into(),
            size: plan.disk_size,
            chain_len: chain.len(),
            map,
            frames: plan.frames,
            cache: Mutex::new(FrameCache {
                limit: cache_bytes,
                ..Default::default()
            }),
            inflight: Mutex::default(),
            stats: Mutex::default(),
            streams: Mutex::default(),
            prefetching: Default::default(),
            tasks: Mutex::default(),
            reading: Default::default(),
        })
    }

    /// The first piece that ends after `offset`.
    fn first_after(&self, offset: u64) -> usize {
        self.map.partition_point(|p| p.end <= offset)
    }

    /// `offset..offset + len` (inside the disk) as data and holes, in order, covering it.
    async fn read(&self, offset: u64, len: u64) -> Result<Vec<Span>, EngineError> {
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| {
                EngineError::Invalid(format!(
                    "read {offset:#x}+{len:#x} past the disk's end {:#x}",
                    self.size
                ))
            })?;
        let first = self.first_after(offset);
        let pieces: Vec<Piece> = self.map[first..]
            .iter()
            .take_while(|p| p.start < end)
            .copied()
            .collect();
        let frames = self.frames_of(&pieces).await?;
        let mut out = Vec::with_capacity(2 * pieces.len() + 1);
        let mut at = offset;
        for p in &pieces {
            let (s, e) = (p.start.max(offset), p.end.min(end));
            if s > at {
                out.push(Span::Hole {
                    offset: at,
                    len: s - at,
                });
            }
            let f = &self.frames[p.frame];
            let buf = frames
                .get(&p.frame)
                .cloned()
                .ok_or_else(|| EngineError::Invalid("a frame went missing".into()))?;
            // A piece lies inside its frame's decoded bytes by the plan; checked again, as
            // an error rather than a panic.
            let range = (s - f.offset) as usize..(e - f.offset) as usize;
            if range.end > buf.len() {
                return Err(EngineError::Invalid(format!(
                    "piece {s:#x}..{e:#x} outside its frame at {:#x} of {} bytes",
                    f.offset,
                    buf.len()
                )));
            }
            out.push(Span::Data {
                offset: s,
                buf,
                range,
            });
            at = e;
        }
        if at < end {
            out.push(Span::Hole {
                offset: at,
                len: end - at,
            });
        }
        Ok(out)
    }

    /// The decoded frames `pieces` take: from the cache, from another request's read of them,
    /// or read here (neighbours in one read).
    async fn frames_of(
        &self,
        pieces: &[Piece],
    ) -> Result<HashMap<usize, Arc<Vec<u8>>>, EngineError> {
        let mut have = HashMap::new();
        let mut waits: Vec<(usize, Pending)> = Vec::new();
        let mut mine = Reading {
            inflight: &self.inflight,
            senders: HashMap::new(),
        };
        let mut missing: Vec<usize> = Vec::new();
        {
            // Cache, then in-flight reads: a frame leaves `inflight` only after it entered the
            // cache, so one of the two has it, or nobody reads it.
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            for p in pieces {
                let i = p.frame;
                if have.contains_key(&i) || missing.contains(&i) || waits.iter().any(|w| w.0 == i) {
                    continue;
                }
                if let Some(b) = cache.get(i) {
                    have.insert(i, b);
                } else if let Some(rx) = inflight.get(&i) {
                    waits.push((i, rx.clone()));
                } else {
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    inflight.insert(i, rx);
                    mine.senders.insert(i, tx);
                    missing.push(i);
                }
            }
        }
        let hits = have.len() as u64;
        let shared = waits.len() as u64;
        let read = self
            .fetch(&mut missing, &mut mine, Some(&mut have), true)
            .await;
        drop(mine);
        let (mut reads, mut frames) = read?;
        // Frames another request was reading: its outcome, or (it gave up) read here.
        let mut again = Vec::new();
        for (i, mut rx) in waits {
            let outcome = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|v| v.clone());
            match outcome {
                Some(Ok(b)) => {
                    have.insert(i, b);
                }
                Some(Err(m)) => return Err(EngineError::Invalid(m)),
                None => again.push(i),
            }
        }
        if !again.is_empty() {
            let mut solo = Reading {
                inflight: &self.inflight,
                senders: HashMap::new(),
            };
            let (r, f) = self
                .fetch(&mut again, &mut solo, Some(&mut have), true)
                .await?;
            reads += r;
            frames += f;
        }
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        st.cache_hits += hits;
        st.shared += shared;
        st.frames_read += frames;
        st.sink_reads += reads;
        Ok(have)
    }

    /// Reads frames `wanted` (sorted here: frame numbers are in storage order, so they group
    /// into ranged reads), caches them, tells their waiters (through `mine`) and adds them to
    /// `have` (if given). Answers the reads and frames read. When a read fails, the waiters of
    /// that read's frames get its error if `publish_errors` (a client's own request: they would
    /// have failed the same way); the frames not read yet are withdrawn (their waiters read
    /// them themselves), and so are the failed ones otherwise (a read-ahead's error is nobody
    /// else's).
    async fn fetch(
        &self,
        wanted: &mut [usize],
        mine: &mut Reading<'_>,
        mut have: Option<&mut HashMap<usize, Arc<Vec<u8>>>>,
        publish_errors: bool,
    ) -> Result<(u64, u64), EngineError> {
        wanted.sort_unstable();
        let list: Vec<FrameRead> = wanted.iter().map(|&i| self.frames[i].clone()).collect();
        let pool = Pool::default();
        let mut reads = 0u64;
        let mut at = 0;
        for group in coalesce(&list, &self.sink.read_hint()) {
            let decoded = match read_frames(&self.sink, &self.disk, group, &pool).await {
                Ok(d) => d,
                Err(e) => {
                    if publish_errors {
                        let m = e.to_string();
                        for &i in &wanted[at..at + group.len()] {
                            mine.done(i, Err(m.clone()));
                        }
                    }
                    // The rest is withdrawn when `mine` is dropped.
                    return Err(e);
                }
            };
            reads += 1;
            for buf in decoded {
                let i = wanted[at];
                at += 1;
                let buf = Arc::new(buf);
                self.cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .put(i, buf.clone());
                mine.done(i, Ok(buf.clone()));
                if let Some(h) = have.as_deref_mut() {
                    h.insert(i, buf);
                }
            }
        }
        Ok((reads, wanted.len() as u64))
    }

    /// Allocation of `offset..offset + len` (clipped to the disk) from the merged index:
    /// `(length, hole)` runs in order, covering it, at most `max` of them (the last may then
    /// end short of the range: a client asks again from there).
    fn allocation(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let push = |n: u64, hole: bool, out: &mut Vec<(u64, bool)>| {
            if n == 0 {
                return;
            }
            match out.last_mut() {
                Some((m, h)) if *h == hole => *m += n,
                _ => out.push((n, hole)),
            }
        };
        let mut at = offset;
        for p in &self.map[self.first_after(offset)..] {
            if p.start >= end || out.len() > max {
                break;
            }
            let (s, e) = (p.start.max(at), p.end.min(end));
            push(s - at, true, &mut out);
            push(e - s, false, &mut out);
            at = e;
        }
        if at < end && out.len() <= max {
            push(end - at, true, &mut out);
        }
        out.truncate(max.max(1));
        out
    }
}
