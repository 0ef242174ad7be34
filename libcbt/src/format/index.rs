//! The sparse index of one backup of one disk, and the merge of a chain into a restore plan.
//!
//! | index object | |
//! |---|---|
//! | 0 | magic `CBTIDX01` (8) |
//! | 8 | format version u16 = 1, reserved u16 |
//! | 12 | segment count u32 (S) |
//! | 16 | entry count u64 (E) |
//! | 24 | disk size u64 |
//! | 32 | S segment ids, u128 each |
//! | 32 + 16·S | E entries of 32 bytes |
//! | end − 4 | crc32 of everything before |
//!
//! | entry (32 bytes) | |
//! |---|---|
//! | 0 | disk offset u64 |
//! | 8 | length u32 |
//! | 12 | kind u8: 1 data (one frame), 2 zero, 3 part of a frame |
//! | 13 | reserved (3); kind 3: skip u24, the frame's raw bytes before the entry's first |
//! | 16 | segment number u32 (into the table above; 0 for zero entries) |
//! | 20 | frame length u32 (header + stored bytes; 0 for zero entries) |
//! | 24 | frame position u64 in the segment (0 for zero entries) |
//!
//! Entries are sorted by offset and disjoint. A data entry covers exactly the raw bytes of its
//! frame; a slice entry (kind 3, written by folds, [`overlay`]) covers the raw bytes
//! `skip..skip + len` of its frame, whose first raw byte is at disk offset `offset − skip`; a frame is at least its 32-byte header and ends before 2^64, and every entry of a
//! chain that names a frame agrees with the others on it ([`plan_restore`] checks). Ranges no
//! entry covers were not part of this backup: for a full backup they read as zeroes; for an
//! incremental they come from the parent. The object's exact length follows from its counts,
//! so nothing is allocated beyond the bytes actually read.

use std::ops::Range;

use super::segment::MAX_FRAME_RAW;
use super::FormatError;
use crate::extent::{Extent, ExtentMap};

// Do not change: on-disk format.
pub const INDEX_MAGIC: [u8; 8] = *b"CBTIDX01";
const HEADER_LEN: usize = 32;
const ENTRY_LEN: usize = 32;
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_SLICE: u8 = 3;

/// Identity of a segment object (random, unique per disk).
pub type SegmentId = u128;

/// Where the bytes of an entry are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    Zero,
    Frame {
        segment: SegmentId,
        pos: u64,
        frame_len: u32,
    },
    /// The raw bytes `skip..skip + len` of a frame (the rest of it is another range's, or was
    /// overwritten by a later backup folded into this index).
    Slice {
        segment: SegmentId,
        pos: u64,
        frame_len: u32,
        skip: u32,
    },
}

impl Location {
    /// The frame this location names, and how many of its raw bytes come before it.
    fn frame(&self) -> Option<(SegmentId, u64, u32, u32)> {
        match *self {
            Location::Zero => None,
            Location::Frame {
                segment,
                pos,
                frame_len,
            } => Some((segment, pos, frame_len, 0)),
            Location::Slice {
                segment,
                pos,
                frame_len,
                skip,
            } => Some((segment, pos, frame_len, skip)),
        }
    }
}

/// One range of the disk in a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub offset: u64,
    pub len: u32,
    pub loc: Location,
}

impl IndexEntry {
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }

    /// The frame this entry takes its bytes from, read whole, with the entry's range as the
    /// only piece (`None` for a zero entry). The raw length of the frame of a slice is not
    /// known before it is read: a lower bound stands in (see [`FrameRead::exact_len`]).
    pub fn frame_read(&self) -> Option<FrameRead> {
        let (segment, pos, frame_len, skip) = self.loc.frame()?;
        let header = super::segment::FRAME_HEADER_LEN as u32;
        let exact_len = matches!(self.loc, Location::Frame { .. });
        let len = if exact_len {
            self.len
        } else {
            (skip + self.len).max(frame_len.saturating_sub(header))
        };
        Some(FrameRead {
            segment,
            pos,
            frame_len,
            offset: self.offset - u64::from(skip),
            len,
            exact_len,
            pieces: std::iter::once(self.offset..self.end()).collect(),
        })
    }
}

/// The index of one backup.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Index {
    pub disk_size: u64,
    pub entries: Vec<IndexEntry>,
}

impl Index {
    /// Bytes covered by data frames.
    pub fn data_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.loc != Location::Zero)
            .map(|e| u64::from(e.len))
            .sum()
    }

    /// Encodes the index. Entries must be sorted and disjoint (as [`Index::decode`] checks).
    pub fn encode(&self) -> Vec<u8> {
        let mut segments: Vec<SegmentId> = Vec::new();
        let mut seg_no = std::collections::HashMap::new();
        for e in &self.entries {
            if let Some((segment, ..)) = e.loc.frame() {
                seg_no.entry(segment).or_insert_with(|| {
                    segments.push(segment);
                    segments.len() - 1
                });
            }
        }
        let mut out = Vec::with_capacity(
            HEADER_LEN + 16 * segments.len() + ENTRY_LEN * self.entries.len() + 4,
        );
        out.extend_from_slice(&INDEX_MAGIC);
        out.extend_from_slice(&super::segment::FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        // More than 2^32 segments in one backup is impossible (each holds at least one frame
        // of a disk far smaller than 2^32 × 4 MiB).
        out.extend_from_slice(&(segments.len() as u32).to_be_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_be_bytes());
        out.extend_from_slice(&self.disk_size.to_be_bytes());
        for s in &segments {
            out.extend_from_slice(&s.to_be_bytes());
        }
        for e in &self.entries {
            out.extend_from_slice(&e.offset.to_be_bytes());
            out.extend_from_slice(&e.len.to_be_bytes());
            match e.loc {
                Location::Zero => {
                    out.extend_from_slice(&[KIND_ZERO, 0, 0, 0]);
                    out.extend_from_slice(&[0u8; 16]);
                }
                Location::Frame {
                    segment,
                    pos,
                    frame_len,
                } => {
                    out.extend_from_slice(&[KIND_DATA, 0, 0, 0]);
                    out.extend_from_slice(&(seg_no[&segment] as u32).to_be_bytes());
                    out.extend_from_slice(&frame_len.to_be_bytes());
                    out.extend_from_slice(&pos.to_be_bytes());
                }
                Location::Slice {
                    segment,
                    pos,
                    frame_len,
                    skip,
                } => {
                    // skip < 4 MiB (MAX_FRAME_RAW): it fits the 24 bits.
                    let s = skip.to_be_bytes();
                    out.extend_from_slice(&[KIND_SLICE, s[1], s[2], s[3]]);
                    out.extend_from_slice(&(seg_no[&segment] as u32).to_be_bytes());
                    out.extend_from_slice(&frame_len.to_be_bytes());
                    out.extend_from_slice(&pos.to_be_bytes());
                }
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decodes and checks an index: magic, version, checksum, exact length, sorted disjoint
    /// entries inside the disk, known kinds, valid segment numbers, bounded frame sizes.
    pub fn decode(b: &[u8]) -> Result<Index, FormatError> {
        if b.len() < HEADER_LEN + 4 {
            return Err(FormatError::Truncated { what: "index" });
        }
        if b[..8] != INDEX_MAGIC {
            return Err(FormatError::BadMagic { what: "index" });
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return Err(FormatError::HeaderChecksum { what: "index" });
        }
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(a)
        };
        let version = u16_at(8);
        if version != super::segment::FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                what: "index",
                version: version.into(),
            });
        }
        let nseg = u64::from(u32_at(12));
        let nent = u64_at(16);
        let disk_size = u64_at(24);
        let expect = nseg
            .checked_mul(16)
            .and_then(|s| {
                nent.checked_mul(ENTRY_LEN as u64)
                    .and_then(|e| e.checked_add(s))
            })
            .and_then(|x| x.checked_add(HEADER_LEN as u64 + 4));
        if expect != Some(b.len() as u64) {
            return Err(FormatError::BadValue {
                what: "index length for its counts",
                value: b.len() as u64,
            });
        }
        // Counts are now bounded by the input length.
        let mut segments = Vec::with_capacity(nseg as usize);
        for i in 0..nseg as usize {
            let p = HEADER_LEN + 16 * i;
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[p..p + 16]);
            segments.push(u128::from_be_bytes(a));
        }
        let base = HEADER_LEN + 16 * nseg as usize;
        let mut entries = Vec::with_capacity(nent as usize);
        let mut prev_end = 0u64;
        for i in 0..nent as usize {
            let p = base + ENTRY_LEN * i;
            let offset = u64_at(p);
            let len = u32_at(p + 8);
            let end = offset
                .checked_add(u64::from(len))
                .ok_or(FormatError::BadValue {
                    what: "index entry offset",
                    value: offset,
                })?;
            if len == 0 || offset < prev_end || end > disk_size {
                return Err(FormatError::BadValue {
                    what: "index entry range",
                    value: offset,
                });
            }
            prev_end = end;
            let kind = b[p + 12];
            let loc = match kind {
                KIND_ZERO => Location::Zero,
                KIND_DATA | KIND_SLICE => {
                    let seg = u32_at(p + 16) as usize;
                    let frame_len = u32_at(p + 20);
                    let segment = *segments.get(seg).ok_or(FormatError::BadValue {
                        what: "index segment number",
                        value: seg as u64,
                    })?;
                    let skip = if kind == KIND_SLICE {
                        u32::from_be_bytes([0, b[p + 13], b[p + 14], b[p + 15]])
                    } else {
                        0
                    };
                    // A frame holds at most MAX_FRAME_RAW raw bytes, stored in no more (lz4
                    // is used only where it is shorter), after its header.
                    let header = super::segment::FRAME_HEADER_LEN as u64;
                    let raw_max = if kind == KIND_DATA {
                        u64::from(len)
                    } else {
                        u64::from(MAX_FRAME_RAW)
                    };
                    if u64::from(skip) + u64::from(len) > u64::from(MAX_FRAME_RAW)
                        || u64::from(skip) > offset
                        || u64::from(frame_len) > header + raw_max
                        || u64::from(frame_len) < header
                    {
                        return Err(FormatError::BadValue {
                            what: "index frame length",
                            value: frame_len.into(),
                        });
                    }
                    let pos = u64_at(p + 24);
                    if pos.checked_add(u64::from(frame_len)).is_none() {
                        return Err(FormatError::BadValue {
                            what: "index frame position",
                            value: pos,
                        });
                    }
                    if kind == KIND_DATA {
                        Location::Frame {
                            segment,
                            pos,
                            frame_len,
                        }
                    } else {
                        Location::Slice {
                            segment,
                            pos,
                            frame_len,
                            skip,
                        }
                    }
                }
                k => {
                    return Err(FormatError::BadValue {
                        what: "index entry kind",
                        value: k.into(),
                    })
                }
            };
            entries.push(IndexEntry { offset, len, loc });
        }
        Ok(Index { disk_size, entries })
    }
}

/// One frame to read during a restore, with the disk ranges it supplies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRead {
    pub segment: SegmentId,
    pub pos: u64,
    pub frame_len: u32,
    /// Disk offset of the frame's first raw byte.
    pub offset: u64,
    /// The frame's raw length when `exact_len`; otherwise a lower bound (only slices name the
    /// frame: the furthest raw byte they take, or the stored length if larger) that the
    /// frame's header may exceed.
    pub len: u32,
    pub exact_len: bool,
    /// Disk ranges taken from this frame (inside `offset..offset + len`), in order.
    pub pieces: Vec<Range<u64>>,
}

/// What restoring the newest backup of a chain takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePlan {
    pub disk_size: u64,
    /// Frames to read, each once, in storage order (segment, then position).
    pub frames: Vec<FrameRead>,
    /// Ranges that read as zeroes (zero entries, and whatever no backup covers).
    pub zeros: ExtentMap,
}

impl RestorePlan {
    /// Bytes read from frames into the target.
    pub fn data_bytes(&self) -> u64 {
        self.frames
            .iter()
            .flat_map(|f| &f.pieces)
            .map(|r| r.end - r.start)
            .sum()
    }
}

/// Entries a chain may hold in all (their numbers are kept in `u32` extent flags).
pub const MAX_PLAN_ENTRIES: u64 = u32::MAX as u64;

/// A chain of indexes that cannot be planned: each index decoded, but together they
/// contradict themselves. `index` is the position in the chain (0: the full), `offset` the
/// disk offset of the refused entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "entry at disk offset {offset:#x} of index {index} and the entry at {other_offset:#x} \
         of index {other_index} name the frame at {pos:#x} of segment {segment:032x} but \
         disagree on its disk range or length"
    )]
    FrameConflict {
        index: usize,
        offset: u64,
        other_index: usize,
        other_offset: u64,
        segment: SegmentId,
        pos: u64,
    },
    #[error(
        "entry at disk offset {offset:#x} of index {index}: frame at {pos:#x} of length \
         {frame_len:#x} ends past 2^64"
    )]
    FrameEnd {
        index: usize,
        offset: u64,
        pos: u64,
        frame_len: u32,
    },
    #[error("entry at disk offset {offset:#x} of index {index} ends past 2^64")]
    EntryEnd { index: usize, offset: u64 },
    #[error("the chain holds more than {max} entries")]
    TooManyEntries { index: usize, offset: u64, max: u64 },
}

impl PlanError {
    /// Position in the chain (0: the full) of the index holding the refused entry.
    pub fn index(&self) -> usize {
        match self {
            PlanError::FrameConflict { index, .. }
            | PlanError::FrameEnd { index, .. }
            | PlanError::EntryEnd { index, .. }
            | PlanError::TooManyEntries { index, .. } => *index,
        }
    }

    /// Disk offset of the refused entry.
    pub fn offset(&self) -> u64 {
        match self {
            PlanError::FrameConflict { offset, .. }
            | PlanError::FrameEnd { offset, .. }
            | PlanError::EntryEnd { offset, .. }
            | PlanError::TooManyEntries { offset, .. } => *offset,
        }
    }
}

/// What the entries of a chain say about one frame.
struct FrameClaims {
    /// Index and disk offset of the first entry that named it.
    first: (usize, u64),
    /// Disk offset of its first raw byte.
    start: u64,
    frame_len: u32,
    /// Its raw length, once a whole-frame entry has named it.
    raw: Option<u32>,
    /// The furthest raw byte an entry takes from it.
    reach: u32,
    /// The last index that named it, and the last that named it whole.
    last_index: Option<usize>,
    last_whole: Option<usize>,
}

/// Merges a chain of indexes, oldest (the full) first, newest wins, into a restore plan of
/// the newest. Metadata only: no data is read. The disk size is the newest backup's.
///
/// Every entry that names a frame (segment, position) must agree with every other entry
/// that names it on the frame's disk offset, raw length and frame length, and the frame must
/// end before 2^64: a restore writes the pieces of a frame relative to the frame's entry, so
/// a crafted (crc-valid) index that broke this would make it write outside the decoded
/// bytes. Such chains are refused with the place of the first bad entry.
pub fn plan_restore(chain: &[&Index]) -> Result<RestorePlan, PlanError> {
    let disk_size = chain.last().map_or(0, |i| i.disk_size);
    let mut all: Vec<IndexEntry> = Vec::new();
    let mut map = ExtentMap::new();
    // What the entries seen so far say of each frame, and where each claim came from.
    let mut owner: std::collections::HashMap<(SegmentId, u64), FrameClaims> =
        std::collections::HashMap::new();
    for (index, idx) in chain.iter().enumerate() {
        for e in &idx.entries {
            let end = e
                .offset
                .checked_add(u64::from(e.len))
                .ok_or(PlanError::EntryEnd {
                    index,
                    offset: e.offset,
                })?;
            if let Some((segment, pos, frame_len, skip)) = e.loc.frame() {
                if pos.checked_add(u64::from(frame_len)).is_none() {
                    return Err(PlanError::FrameEnd {
                        index,
                        offset: e.offset,
                        pos,
                        frame_len,
                    });
                }
                let conflict = |other: (usize, u64)| PlanError::FrameConflict {
                    index,
                    offset: e.offset,
                    other_index: other.0,
                    other_offset: other.1,
                    segment,
                    pos,
                };
                let start = e
                    .offset
                    .checked_sub(u64::from(skip))
                    .ok_or(conflict((index, e.offset)))?;
                let reach = skip.saturating_add(e.len);
                let whole = matches!(e.loc, Location::Frame { .. });
                let c = owner.entry((segment, pos)).or_insert(FrameClaims {
                    first: (index, e.offset),
                    start,
                    frame_len,
                    raw: None,
                    reach: 0,
                    last_index: None,
                    last_whole: None,
                });
                // One frame: one disk offset and length; one raw length for its whole
                // entries; no slice past it; and no two entries of one index on the same bytes
                // (disjoint entries of one index may share a frame only as slices).
                let overlap_in_index =
                    c.last_index == Some(index) && (whole || c.last_whole == Some(index));
                if c.start != start
                    || c.frame_len != frame_len
                    || overlap_in_index
                    || (whole && c.raw.is_some_and(|r| r != e.len))
                    || (whole && c.reach > e.len)
                    || c.raw.is_some_and(|r| reach > r)
                {
                    return Err(conflict(c.first));
                }
                if whole {
                    c.raw = Some(e.len);
                    c.last_whole = Some(index);
                }
                c.reach = c.reach.max(reach);
                c.last_index = Some(index);
            }
            // Entries of older backups past the newest disk size are cut off by the clip below.
            let n = u32::try_from(all.len()).map_err(|_| PlanError::TooManyEntries {
                index,
                offset: e.offset,
                max: MAX_PLAN_ENTRIES,
            })?;
            all.push(*e);
            map.insert(e.offset..end, n);
        }
    }
    let covered_all: ExtentMap = [Extent::new(0, disk_size, 0)]
        .into_iter()
        .filter(|e| e.start < e.end)
        .collect();
    let map = map.intersect(&covered_all.with_flags(0));
    let mut zeros = covered_all.subtract(&map);
    let mut frames: std::collections::BTreeMap<(SegmentId, u64), FrameRead> =
        std::collections::BTreeMap::new();
    for piece in map.iter() {
        let e = all[piece.flags as usize];
        match e.loc.frame() {
            None => zeros.insert(piece.range(), 0),
            Some((segment, pos, frame_len, _)) => {
                // Every entry of this frame agrees on where it starts (checked above), and the
                // piece lies inside `e`: so it lies inside the frame's raw bytes.
                let c = &owner[&(segment, pos)];
                let header = super::segment::FRAME_HEADER_LEN as u32;
                let pieces = &mut frames
                    .entry((segment, pos))
                    .or_insert_with(|| FrameRead {
                        segment,
                        pos,
                        frame_len,
                        offset: c.start,
                        len: c
                            .raw
                            .unwrap_or_else(|| c.reach.max(frame_len.saturating_sub(header))),
                        exact_len: c.raw.is_some(),
                        pieces: Vec::new(),
                    })
                    .pieces;
                // Pieces of one frame from entries of several backups may meet: one write.
                match pieces.last_mut() {
                    Some(last) if last.end == piece.start => last.end = piece.end,
                    _ => pieces.push(piece.range()),
                }
            }
        }
    }
    Ok(RestorePlan {
        disk_size,
        frames: frames.into_values().collect(),
        zeros,
    })
}

/// The index of the newest backup of `chain` (oldest first) as it reads through the whole
/// chain: what a fold writes for a backup whose ancestors in `chain` go. Metadata only: the
/// entries name the same frames (a frame that later backups overwrote in part becomes one or
/// more [`Location::Slice`]s of it), and restoring the result alone equals restoring the
/// chain. The chain is checked as [`plan_restore`] checks it; the disk size is the newest's.
pub fn fold_indexes(chain: &[&Index]) -> Result<Index, PlanError> {
    plan_restore(chain)?;
    let disk_size = chain.last().map_or(0, |i| i.disk_size);
    let mut all: Vec<IndexEntry> = Vec::new();
    let mut map = ExtentMap::new();
    for (index, idx) in chain.iter().enumerate() {
        for e in &idx.entries {
            // Bounded and non-overflowing: plan_restore accepted the chain.
            let n = u32::try_from(all.len()).map_err(|_| PlanError::TooManyEntries {
                index,
                offset: e.offset,
                max: MAX_PLAN_ENTRIES,
            })?;
            all.push(*e);
            map.insert(e.offset..e.end(), n);
        }
    }
    let disk: ExtentMap = [Extent::new(0, disk_size, 0)]
        .into_iter()
        .filter(|e| e.start < e.end)
        .collect();
    let map = map.intersect(&disk.with_flags(0));
    let entries = map
        .iter()
        .map(|piece| {
            let e = all[piece.flags as usize];
            // A piece lies inside its entry, which is at most 4 MiB long.
            let cut = (piece.start - e.offset) as u32;
            let len = (piece.end - piece.start) as u32;
            let loc = match e.loc {
                Location::Frame { .. } if cut == 0 && len == e.len => e.loc,
                Location::Zero => Location::Zero,
                Location::Frame {
                    segment,
                    pos,
                    frame_len,
                } => Location::Slice {
                    segment,
                    pos,
                    frame_len,
                    skip: cut,
                },
                Location::Slice {
                    segment,
                    pos,
                    frame_len,
                    skip,
                } => Location::Slice {
                    segment,
                    pos,
                    frame_len,
                    skip: skip + cut,
                },
            };
            IndexEntry {
                offset: piece.start,
                len,
                loc,
            }
        })
        .collect();
    Ok(Index { disk_size, entries })
}

/// The segments `index` reads from, each once, in order.
pub fn referenced_segments(index: &Index) -> Vec<SegmentId> {
    let mut s: Vec<SegmentId> = index
        .entries
        .iter()
        .filter_map(|e| e.loc.frame().map(|f| f.0))
        .collect();
    s.sort_unstable();
    s.dedup();
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_index(disk: u64) -> impl Strategy<Value = Index> {
        prop::collection::vec(
            (0..disk / 512, 1..16u64, any::<bool>(), 0..4u128, 0..1000u64),
            0..30,
        )
        .prop_map(move |raw| {
            let mut entries: Vec<IndexEntry> = Vec::new();
            let mut taken = ExtentMap::new();
            for (blk, n, zero, seg, pos) in raw {
                let (offset, len) = (blk * 512, (n * 512).min(disk - blk * 512));
                if len == 0 || taken.overlapping(offset..offset + len).next().is_some() {
                    continue;
                }
                taken.insert(offset..offset + len, 1);
                let loc = if zero {
                    Location::Zero
                } else {
                    Location::Frame {
                        segment: seg,
                        pos: pos * 4096,
                        frame_len: 32 + len as u32,
                    }
                };
                entries.push(IndexEntry {
                    offset,
                    len: len as u32,
                    loc,
                });
            }
            entries.sort_by_key(|e| e.offset);
            Index {
                disk_size: disk,
                entries,
            }
        })
    }

    proptest! {
        #[test]
        fn index_round_trips(idx in arb_index(1 << 20)) {
            prop_assert_eq!(Index::decode(&idx.encode()).expect("decode"), idx);
        }

        #[test]
        fn index_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = Index::decode(&bytes);
        }

        /// The plan of a random chain against a per-512-byte-block model of "which backup's
        /// entry supplies this block".
        #[test]
        fn plan_restore_matches_newest_wins_model(chain in prop::collection::vec(arb_index(64 << 10), 1..6)) {
            let disk = 64u64 << 10;
            // A (segment, position) names one frame: give each backup its own segment and
            // place frames at their disk offset.
            let mut chain = chain;
            for (i, idx) in chain.iter_mut().enumerate() {
                for e in &mut idx.entries {
                    if let Location::Frame { segment, pos, .. } = &mut e.loc {
                        *segment = i as u128;
                        *pos = e.offset;
                    }
                }
            }
            let refs: Vec<&Index> = chain.iter().collect();
            let plan = plan_restore(&refs).expect("consistent chain");
            // Model: for each block, the newest entry that covers it.
            let mut model: Vec<Option<Location>> = vec![None; (disk / 512) as usize];
            for idx in &chain {
                for e in &idx.entries {
                    for b in e.offset / 512..e.end() / 512 {
                        model[b as usize] = Some(e.loc);
                    }
                }
            }
            let mut got: Vec<Option<Location>> = vec![None; (disk / 512) as usize];
            let mut seen = std::collections::HashSet::new();
            let mut last_key = None;
            for f in &plan.frames {
                prop_assert!(seen.insert((f.segment, f.pos)), "frame read twice");
                prop_assert!(last_key < Some((f.segment, f.pos)), "not in storage order");
                last_key = Some((f.segment, f.pos));
                for r in &f.pieces {
                    prop_assert!(r.start >= f.offset && r.end <= f.offset + u64::from(f.len));
                    for b in r.start / 512..r.end / 512 {
                        prop_assert!(got[b as usize].is_none());
                        got[b as usize] = Some(Location::Frame { segment: f.segment, pos: f.pos, frame_len: f.frame_len });
                    }
                }
            }
            for z in plan.zeros.iter() {
                for b in z.start / 512..z.end / 512 {
                    prop_assert!(got[b as usize].is_none());
                    got[b as usize] = Some(Location::Zero);
                }
            }
            let model: Vec<Option<Location>> = model.into_iter().map(|m| Some(m.unwrap_or(Location::Zero))).collect();
            prop_assert_eq!(got, model);
        }
    }

    /// Per 512-byte block: the frame (segment, position, disk offset of its first raw byte)
    /// a plan takes the block from, or `None` for zeroes; checks each piece lies in its frame.
    fn blocks(plan: &RestorePlan) -> Vec<Option<(u128, u64, u64)>> {
        let mut got = vec![None; (plan.disk_size / 512) as usize];
        for f in &plan.frames {
            for r in &f.pieces {
                assert!(r.start >= f.offset && r.end <= f.offset + u64::from(f.len));
                for b in r.start / 512..r.end / 512 {
                    got[b as usize] = Some((f.segment, f.pos, f.offset));
                }
            }
        }
        got
    }

    /// A random chain whose frames sit at their disk offset in one segment per backup.
    fn arb_chain(disk: u64, depth: Range<usize>) -> impl Strategy<Value = Vec<Index>> {
        prop::collection::vec(arb_index(disk), depth).prop_map(|mut chain| {
            for (i, idx) in chain.iter_mut().enumerate() {
                for e in &mut idx.entries {
                    if let Location::Frame { segment, pos, .. } = &mut e.loc {
                        *segment = i as u128;
                        *pos = e.offset;
                    }
                }
            }
            chain
        })
    }

    proptest! {
        /// Folding any run of a chain into the backup after it, in any number of steps,
        /// restores the same bytes from the same frames as the whole chain; the folded index
        /// survives encoding, and a restore of it alone reads no frame the chain did not.
        #[test]
        fn folded_chains_restore_what_the_chain_did(
            chain in arb_chain(64 << 10, 1..7),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
        ) {
            let refs: Vec<&Index> = chain.iter().collect();
            let want = blocks(&plan_restore(&refs).expect("consistent chain"));
            // Fold the chain at random points, oldest parts first, until one index is left.
            let mut folded: Vec<Index> = chain.clone();
            for c in &cuts {
                if folded.len() < 2 {
                    break;
                }
                // Fold backups at..=at+1 .. into the backup at `to`.
                let to = 1 + c.index(folded.len() - 1);
                let from = c.index(to);
                let part: Vec<&Index> = folded[from..=to].iter().collect();
                let f = fold_indexes(&part).expect("fold");
                prop_assert_eq!(&Index::decode(&f.encode()).expect("decode"), &f);
                folded.splice(from..=to, [f]);
                let refs: Vec<&Index> = folded.iter().collect();
                prop_assert_eq!(&blocks(&plan_restore(&refs).expect("folded chain")), &want);
            }
            let refs: Vec<&Index> = folded.iter().collect();
            let all = fold_indexes(&refs).expect("fold all");
            let plan = plan_restore(&[&all]).expect("folded");
            prop_assert_eq!(&blocks(&plan), &want);
            let used: std::collections::HashSet<u128> =
                chain.iter().flat_map(referenced_segments).collect();
            prop_assert!(referenced_segments(&all).iter().all(|s| used.contains(s)));
        }
    }

    #[test]
    fn a_slice_reaching_past_its_frame_or_overlapping_it_in_one_index_is_refused() {
        let whole = index(vec![data(0, 4096, 1, 0, 100)]);
        let slice = |offset, len, skip| IndexEntry {
            offset,
            len,
            loc: Location::Slice {
                segment: 1,
                pos: 0,
                frame_len: 100,
                skip,
            },
        };
        // The tail of the frame, then a slice running past its end.
        let tail = index(vec![slice(1024, 3072, 1024)]);
        let plan = plan_restore(&[&whole, &tail]).expect("agreeing slice");
        assert_eq!(plan.frames[0].pieces, vec![0..4096]);
        assert!(plan.frames[0].exact_len);
        let past = index(vec![slice(1024, 4096, 1024)]);
        assert!(matches!(
            plan_restore(&[&whole, &past]),
            Err(PlanError::FrameConflict { index: 1, .. })
        ));
        // A slice that puts the frame elsewhere on the disk.
        let moved = index(vec![slice(2048, 1024, 1024)]);
        assert!(plan_restore(&[&whole, &moved]).is_err());
        // Slices alone: the raw length is a lower bound.
        let alone = index(vec![slice(0, 512, 0), slice(2048, 512, 2048)]);
        let plan = plan_restore(&[&alone]).expect("slices");
        assert!(!plan.frames[0].exact_len);
        assert_eq!(plan.frames[0].len, 2560);
        assert_eq!(Index::decode(&alone.encode()).expect("decode"), alone);
        // The whole frame and a slice of it in one index cover its bytes twice.
        let twice = index(vec![data(0, 4096, 1, 0, 100), slice(8192, 512, 8192)]);
        assert!(plan_restore(&[&twice]).is_err());
        // A skip larger than the offset cannot be decoded.
        assert!(Index::decode(&index(vec![slice(512, 512, 1024)]).encode()).is_err());
    }

    fn data(offset: u64, len: u32, segment: u128, pos: u64, frame_len: u32) -> IndexEntry {
        IndexEntry {
            offset,
            len,
            loc: Location::Frame {
                segment,
                pos,
                frame_len,
            },
        }
    }

    fn index(entries: Vec<IndexEntry>) -> Index {
        Index {
            disk_size: 1 << 20,
            entries,
        }
    }

    #[test]
    fn plan_refuses_entries_that_share_a_frame_but_disagree() {
        let full = index(vec![data(0, 4096, 1, 0, 100)]);
        // Another disk range for the same frame: its pieces would be written from bytes the
        // frame does not have (before: an underflow panic, or stale pooled bytes).
        let moved = index(vec![data(8192, 4096, 1, 0, 100)]);
        assert_eq!(
            plan_restore(&[&full, &moved]),
            Err(PlanError::FrameConflict {
                index: 1,
                offset: 8192,
                other_index: 0,
                other_offset: 0,
                segment: 1,
                pos: 0,
            })
        );
        // A longer raw length, or another frame length, for the same frame.
        let longer = index(vec![data(0, 8192, 1, 0, 100)]);
        let err = plan_restore(&[&full, &longer]).expect_err("longer");
        assert_eq!((err.index(), err.offset()), (1, 0));
        let other_len = index(vec![data(0, 4096, 1, 0, 200)]);
        assert!(matches!(
            plan_restore(&[&full, &other_len]),
            Err(PlanError::FrameConflict { index: 1, .. })
        ));
        // Two entries of one index on one frame.
        let twice = index(vec![data(0, 4096, 1, 0, 100), data(4096, 4096, 1, 0, 100)]);
        assert!(matches!(
            plan_restore(&[&twice]),
            Err(PlanError::FrameConflict {
                index: 0,
                offset: 4096,
                ..
            })
        ));
        // Entries that agree may share a frame (the same entry in two backups).
        let plan = plan_restore(&[&full, &full]).expect("agreeing entries");
        assert_eq!(plan.frames.len(), 1);
        assert_eq!(plan.frames[0].pieces, vec![0..4096]);
    }

    #[test]
    fn plan_refuses_frames_and_entries_ending_past_2_64() {
        let far = index(vec![data(0, 4096, 1, u64::MAX - 10, 100)]);
        assert_eq!(
            plan_restore(&[&far]),
            Err(PlanError::FrameEnd {
                index: 0,
                offset: 0,
                pos: u64::MAX - 10,
                frame_len: 100
            })
        );
        let mut wrap = index(vec![data(u64::MAX - 10, 4096, 1, 0, 100)]);
        wrap.disk_size = u64::MAX;
        assert_eq!(
            plan_restore(&[&wrap]),
            Err(PlanError::EntryEnd {
                index: 0,
                offset: u64::MAX - 10
            })
        );
    }

    #[test]
    fn decode_refuses_frames_past_2_64_and_shorter_than_a_header() {
        let far = index(vec![data(0, 4096, 1, u64::MAX - 10, 100)]);
        assert!(matches!(
            Index::decode(&far.encode()),
            Err(FormatError::BadValue {
                what: "index frame position",
                ..
            })
        ));
        let short = index(vec![data(0, 4096, 1, 0, 31)]);
        assert!(matches!(
            Index::decode(&short.encode()),
            Err(FormatError::BadValue {
                what: "index frame length",
                ..
            })
        ));
    }

    proptest! {
        /// Chains whose entries often name the same few frames: a plan is refused, or every
        /// piece lies inside the raw bytes of its frame and every entry naming a planned
        /// frame agrees with it (what the restore relies on to write only decoded bytes).
        #[test]
        fn plan_pieces_stay_inside_their_frame(chain in prop::collection::vec(arb_index(64 << 10), 1..4)) {
            let mut chain = chain;
            for idx in &mut chain {
                for e in &mut idx.entries {
                    if let Location::Frame { segment, pos, .. } = &mut e.loc {
                        *segment %= 2;
                        *pos %= 64 * 4096;
                    }
                }
            }
            let refs: Vec<&Index> = chain.iter().collect();
            let Ok(plan) = plan_restore(&refs) else {
                return Ok(());
            };
            for f in &plan.frames {
                for r in &f.pieces {
                    prop_assert!(r.start >= f.offset && r.end <= f.offset + u64::from(f.len));
                }
                for e in chain.iter().flat_map(|i| &i.entries) {
                    if let Location::Frame { segment, pos, frame_len } = e.loc {
                        if (segment, pos) == (f.segment, f.pos) {
                            prop_assert_eq!((e.offset, e.len, frame_len), (f.offset, f.len, f.frame_len));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn truncated_or_flipped_index_is_refused() {
        let idx = Index {
            disk_size: 1 << 20,
            entries: vec![
                IndexEntry {
                    offset: 0,
                    len: 4096,
                    loc: Location::Frame {
                        segment: 9,
                        pos: 16,
                        frame_len: 100,
                    },
                },
                IndexEntry {
                    offset: 8192,
                    len: 4096,
                    loc: Location::Zero,
                },
            ],
        };
        let b = idx.encode();
        assert!(Index::decode(&b[..b.len() - 1]).is_err());
        let mut f = b.clone();
        f[40] ^= 1;
        assert!(matches!(
            Index::decode(&f),
            Err(FormatError::HeaderChecksum { .. })
        ));
    }
}
