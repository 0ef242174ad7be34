//! Reading a backup by disk offset, as an NBD export serves it ([`crate::nbd::server`]): the
//! chain's indexes merged once (newest wins, as a restore merges them), then each request
//! answered from the frames it touches. Frames are read from the sink in storage order,
//! neighbours in one ranged read, checked (crc, header against index) and decoded; decoded
//! frames stay in a cache bounded by bytes, so a client reading on sequentially, or several
//! connections reading the same region, read each frame from the sink once.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::restore::{coalesce, load_chain, read_frames};
use super::{EngineError, Pool};
use crate::format::{plan_restore, FrameRead};
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
}

/// Backup `backup` of `disk` on a sink, readable by offset.
pub struct BackupExport<S: Sink> {
    sink: S,
    disk: String,
    backup: String,
    size: u64,
    chain_len: usize,
    /// Disk ranges that hold data, sorted and disjoint; what is between reads as zeroes.
    map: Vec<Piece>,
    frames: Vec<FrameRead>,
    cache: Mutex<FrameCache>,
    stats: Mutex<ExportStats>,
}

impl<S: Sink> BackupExport<S> {
    /// Loads and checks the chain of `backup` and merges its indexes; reads no frame.
    pub async fn open(
        sink: S,
        disk: &str,
        backup: &str,
        cache_bytes: usize,
    ) -> Result<Self, EngineError> {
        let chain = load_chain(&sink, disk, backup).await?;
        let indexes: Vec<_> = chain.iter().map(|(_, i)| i).collect();
        let plan = plan_restore(&indexes).map_err(|source| EngineError::Plan {
            object: chain
                .get(source.index())
                .map_or_else(String::new, |(m, _)| m.index.name.clone()),
            offset: source.offset(),
            source: Box::new(source),
        })?;
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
        Ok(BackupExport {
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
            stats: Mutex::default(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn disk(&self) -> &str {
        &self.disk
    }

    pub fn backup(&self) -> &str {
        &self.backup
    }

    /// Backups merged (1: a full).
    pub fn chain_len(&self) -> usize {
        self.chain_len
    }

    pub fn stats(&self) -> ExportStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first piece that ends after `offset`.
    fn first_after(&self, offset: u64) -> usize {
        self.map.partition_point(|p| p.end <= offset)
    }

    /// `offset..offset + len` (inside the disk) as data and holes, in order, covering it.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<Span>, EngineError> {
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

    /// The decoded frames `pieces` take, from the cache or read (neighbours in one read).
    async fn frames_of(
        &self,
        pieces: &[Piece],
    ) -> Result<HashMap<usize, Arc<Vec<u8>>>, EngineError> {
        let mut have = HashMap::new();
        let mut missing: Vec<usize> = Vec::new();
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            for p in pieces {
                if have.contains_key(&p.frame) || missing.contains(&p.frame) {
                    continue;
                }
                match cache.get(p.frame) {
                    Some(b) => {
                        have.insert(p.frame, b);
                    }
                    None => missing.push(p.frame),
                }
            }
        }
        let hits = have.len() as u64;
        // Frame numbers are in storage order: sorted, they group into ranged reads.
        missing.sort_unstable();
        let wanted: Vec<FrameRead> = missing.iter().map(|&i| self.frames[i].clone()).collect();
        let pool = Pool::default();
        let mut reads = 0u64;
        let mut at = 0;
        for group in coalesce(&wanted, &self.sink.read_hint()) {
            let decoded = read_frames(&self.sink, &self.disk, group, &pool).await?;
            reads += 1;
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            for buf in decoded {
                let i = missing[at];
                at += 1;
                let buf = Arc::new(buf);
                cache.put(i, buf.clone());
                have.insert(i, buf);
            }
        }
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        st.cache_hits += hits;
        st.frames_read += missing.len() as u64;
        st.sink_reads += reads;
        Ok(have)
    }

    /// Allocation of `offset..offset + len` (clipped to the disk) from the merged index:
    /// `(length, hole)` runs in order, covering it, at most `max` of them (the last may then
    /// end short of the range: a client asks again from there).
    pub fn allocation(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
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
