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
//! | 12 | kind u8: 1 data (one frame), 2 zero |
//! | 13 | reserved (3) |
//! | 16 | segment number u32 (into the table above; 0 for zero entries) |
//! | 20 | frame length u32 (header + stored bytes; 0 for zero entries) |
//! | 24 | frame position u64 in the segment (0 for zero entries) |
//!
//! Entries are sorted by offset and disjoint. A data entry covers exactly the raw bytes of its
//! frame; a frame is at least its 32-byte header and ends before 2^64, and every entry of a
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
            if let Location::Frame { segment, .. } = e.loc {
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
            let loc = match b[p + 12] {
                KIND_ZERO => Location::Zero,
                KIND_DATA => {
                    let seg = u32_at(p + 16) as usize;
                    let frame_len = u32_at(p + 20);
                    let segment = *segments.get(seg).ok_or(FormatError::BadValue {
                        what: "index segment number",
                        value: seg as u64,
                    })?;
                    let header = super::segment::FRAME_HEADER_LEN as u64;
                    if len > MAX_FRAME_RAW
                        || u64::from(frame_len) > header + u64::from(len)
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
                    Location::Frame {
                        segment,
                        pos,
                        frame_len,
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
    pub len: u32,
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
    // The first entry seen for each frame, and where it came from.
    let mut owner: std::collections::HashMap<(SegmentId, u64), (usize, IndexEntry)> =
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
            if let Location::Frame {
                segment,
                pos,
                frame_len,
            } = e.loc
            {
                if pos.checked_add(u64::from(frame_len)).is_none() {
                    return Err(PlanError::FrameEnd {
                        index,
                        offset: e.offset,
                        pos,
                        frame_len,
                    });
                }
                let (other_index, other) = *owner.entry((segment, pos)).or_insert((index, *e));
                if other.offset != e.offset || other.len != e.len || other.loc != e.loc {
                    return Err(PlanError::FrameConflict {
                        index,
                        offset: e.offset,
                        other_index,
                        other_offset: other.offset,
                        segment,
                        pos,
                    });
                }
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
    drop(owner);
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
        match e.loc {
            Location::Zero => zeros.insert(piece.range(), 0),
            Location::Frame {
                segment,
                pos,
                frame_len,
            } => {
                // Every entry of this frame agrees with `e` (checked above), and the piece
                // lies inside `e`: so it lies inside the frame's raw bytes.
                frames
                    .entry((segment, pos))
                    .or_insert_with(|| FrameRead {
                        segment,
                        pos,
                        frame_len,
                        offset: e.offset,
                        len: e.len,
                        pieces: Vec::new(),
                    })
                    .pieces
                    .push(piece.range());
            }
        }
    }
    Ok(RestorePlan {
        disk_size,
        frames: frames.into_values().collect(),
        zeros,
    })
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
