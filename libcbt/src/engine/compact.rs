//! Compaction: the only rewrite of backup data in retention.
//!
//! Folds and prunes never touch a segment byte, so a segment stays as long as one of its
//! frames is live, however few: after a prune, the segments of a folded full hold mostly
//! frames later backups overwrote. Compaction copies the live frames of such *sparse*
//! segments (live bytes under a threshold of the segment's size) into new segments, gives
//! every backup that reads them a new generation whose index names the copies, then deletes
//! the old segments. The copies are byte for byte the frames (a frame carries its disk offset
//! and checksums, not its place), checked before they are written; no backup changes what it
//! restores. A run copies at most `max_bytes` and says what it copied and reclaimed.
//!
//! Order, so that a crash anywhere loses nothing and the next run finishes the work:
//! 1. an in-progress marker with the new segments' prefix (the collector leaves them alone
//!    while it lives), then the new segments;
//! 2. each backup's new generation, create-only, index then manifest (until the manifest
//!    exists, the old generation, reading the old segments, is the backup);
//! 3. the old segments, once nothing lists them, then the marker.
//!
//! After a crash in 1 or 2, the new segments no manifest lists are the collector's (the
//! marker ages out), the backups not yet rewritten still read the old segments, and the next
//! run compacts what is still sparse. After a crash in 3, the old segments are orphans.
//!
//! Writers of new generations (folds, compactions) refuse to commit over a generation newer
//! than the one they read, and the old segments go only when no manifest lists them after
//! the rewrite; still, run it where nothing else folds the same disk (cbt-hostd claims the
//! instance, as for a prune): a fold that read the old generation and commits between this
//! run's last listing and its deletions would name segments that go. Backups of the disk
//! without `max_chain` may run: they write segments of their own and never read old ones.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::prune::commit_generation;
use super::restore::load_index;
use super::{catalog, now_ms, random_u128, EngineError};
use crate::format::index::Location;
use crate::format::segment::{self, FrameHeader, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::format::{layout, Index, Manifest, Marker, SegmentId};
use crate::sink::{ObjectWriter, Sink};

/// What compaction rewrites.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompactOptions {
    /// A segment whose live frames are less than this fraction of its bytes is rewritten.
    pub threshold: f64,
    /// At most this many live bytes copied per run (a segment is taken whole or not at all).
    pub max_bytes: u64,
    /// Size of the new segments.
    pub segment_size: u64,
    /// How often the run's in-progress marker is renewed (keep it well under the collectors'
    /// grace period, as for a backup).
    pub marker_refresh: std::time::Duration,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions {
            threshold: 0.5,
            max_bytes: 4 << 30,
            segment_size: 64 << 20,
            marker_refresh: super::MARKER_REFRESH,
        }
    }
}

/// What a compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CompactReport {
    /// Sparse segments rewritten (and deleted).
    pub segments_rewritten: usize,
    /// Segments written.
    pub segments_written: usize,
    /// Live frame bytes copied: the only data compaction reads and writes.
    pub bytes_copied: u64,
    /// Bytes of the old segments less those of the new ones.
    pub bytes_reclaimed: u64,
    /// Backups given a new generation.
    pub backups_rewritten: usize,
    /// Sparse segments left for another run (over `max_bytes`).
    pub segments_left: usize,
    /// Sparse segments left because they are locked (S3 Object Lock): they could not be
    /// deleted, so copying them would only cost space.
    #[serde(skip_serializing_if = "is_zero")]
    pub segments_locked: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The live frames of one segment: length by position.
type Frames = BTreeMap<u64, u32>;

fn frame_of(loc: &Location) -> Option<(SegmentId, u64, u32)> {
    match *loc {
        Location::Zero => None,
        Location::Frame {
            segment,
            pos,
            frame_len,
        }
        | Location::Slice {
            segment,
            pos,
            frame_len,
            ..
        } => Some((segment, pos, frame_len)),
    }
}

/// Compacts the sparse segments of `disk` (see the module).
pub async fn compact<S: Sink>(
    sink: &S,
    disk: &str,
    opts: &CompactOptions,
) -> Result<CompactReport, EngineError> {
    if !(opts.threshold > 0.0 && opts.threshold <= 1.0) {
        return Err(EngineError::Invalid(
            "the compaction threshold is a fraction in (0, 1]".into(),
        ));
    }
    let mut report = CompactReport::default();
    let ms = catalog::list_backups(sink, disk).await?;
    let mut indexes = Vec::with_capacity(ms.len());
    for m in &ms {
        indexes.push(load_index(sink, m).await?);
    }
    // Live frames, by segment.
    let mut live: HashMap<SegmentId, Frames> = HashMap::new();
    for idx in &indexes {
        for (segment, pos, len) in idx.entries.iter().filter_map(|e| frame_of(&e.loc)) {
            live.entry(segment).or_default().insert(pos, len);
        }
    }
    let sizes: HashMap<String, u64> = sink
        .list(&format!("{}segments/", layout::disk_prefix(disk)))
        .await?
        .into_iter()
        .map(|o| (o.name, o.len))
        .collect();
    let mut sparse: Vec<(u64, SegmentId, u64)> = Vec::new(); // (reclaimable, id, live)
    for (id, frames) in &live {
        let name = layout::segment_name(disk, *id);
        let Some(&size) = sizes.get(&name) else {
            return Err(EngineError::Mismatch {
                object: name,
                pos: 0,
                what: "a segment a backup reads is missing",
            });
        };
        let bytes: u64 = frames.values().map(|l| u64::from(*l)).sum();
        if (bytes as f64) < opts.threshold * size as f64 {
            sparse.push((size.saturating_sub(bytes), *id, bytes));
        }
    }
    // The most space for the least copying first.
    sparse.sort_by(|a, b| (b.0, a.1).cmp(&(a.0, b.1)));
    let mut chosen: BTreeSet<SegmentId> = BTreeSet::new();
    let mut budget = opts.max_bytes;
    let now = std::time::SystemTime::now();
    for (_, id, bytes) in &sparse {
        if sink.lock_period().is_some()
            && sink
                .locked_until(&layout::segment_name(disk, *id))
                .await?
                .is_some_and(|t| t > now)
        {
            report.segments_locked += 1;
            continue;
        }
        if *bytes <= budget {
            budget -= bytes;
            chosen.insert(*id);
        } else {
            report.segments_left += 1;
        }
    }
    if chosen.is_empty() {
        return Ok(report);
    }

    // 1. The marker, then the copies.
    let prefix = (random_u128() >> 64) as u64;
    let run_id = format!("compact-{prefix:016x}");
    let marker_name = layout::marker_name(disk, &run_id);
    let marker = Marker::here(&run_id, disk, prefix, now_ms());
    sink.put_new(&marker_name, marker.encode()).await?;
    let work = compact_marked(
        sink, disk, opts, prefix, &ms, &indexes, &live, &chosen, &sizes, report,
    );
    super::backup::under_marker(sink, &marker_name, &marker, opts.marker_refresh, work).await
}

#[allow(clippy::too_many_arguments)]
async fn compact_marked<S: Sink>(
    sink: &S,
    disk: &str,
    opts: &CompactOptions,
    prefix: u64,
    ms: &[Manifest],
    indexes: &[Index],
    live: &HashMap<SegmentId, Frames>,
    chosen: &BTreeSet<SegmentId>,
    sizes: &HashMap<String, u64>,
    mut report: CompactReport,
) -> Result<CompactReport, EngineError> {
    // Immutable sinks: the copies are locked as long as the longest lock recorded by a
    // backup that reads the old segments (those are unlocked, so normally not at all).
    let chosen_names: BTreeSet<String> = chosen
        .iter()
        .map(|id| layout::segment_name(disk, *id))
        .collect();
    let until = ms
        .iter()
        .filter(|m| m.segments.iter().any(|s| chosen_names.contains(s)))
        .filter_map(|m| m.locked_until_unix_ms)
        .max()
        .map(super::prune::unix_ms);
    let seg_sink = sink.locking_until(until);
    let mut moved: HashMap<(SegmentId, u64), (SegmentId, u64)> = HashMap::new();
    let mut n: u64 = 0;
    let mut writer: Option<(SegmentId, S::Writer)> = None;
    let mut written_bytes = 0u64;
    for old in chosen {
        let old_name = layout::segment_name(disk, *old);
        let Some(frames) = live.get(old) else {
            continue;
        };
        for (&pos, &len) in frames {
            let frame = sink.get_range(&old_name, pos, u64::from(len)).await?;
            check_frame(&frame, &old_name, pos)?;
            if writer
                .as_ref()
                .is_some_and(|(_, w)| w.len() >= opts.segment_size)
            {
                if let Some((_, w)) = writer.take() {
                    written_bytes += w.len();
                    w.finish().await?;
                }
            }
            if writer.is_none() {
                let id = (u128::from(prefix) << 64) | u128::from(n);
                n += 1;
                let mut w = seg_sink.create(&layout::segment_name(disk, id)).await?;
                w.append(segment::segment_header().to_vec()).await?;
                writer = Some((id, w));
                report.segments_written += 1;
            }
            if let Some((id, w)) = writer.as_mut() {
                moved.insert((*old, pos), (*id, w.len()));
                w.append(frame).await?;
            }
            report.bytes_copied += u64::from(len);
        }
    }
    if let Some((_, w)) = writer.take() {
        written_bytes += w.len();
        w.finish().await?;
    }
    // The copies are all there (a collector that took the marker for a dead writer's would
    // have taken them too): only then may backups name them.
    let there = sink
        .list(&layout::segment_prefix_name(disk, prefix))
        .await?
        .len();
    if there as u64 != n {
        return Err(EngineError::Invalid(format!(
            "{disk}: {there} of the {n} segments this compaction wrote are left; nothing \
             rewritten (is a collector's grace period shorter than the marker renewal?)"
        )));
    }

    // 2. New generations of the backups that read the old segments.
    let chosen_names: BTreeSet<String> = chosen
        .iter()
        .map(|s| layout::segment_name(disk, *s))
        .collect();
    for (m, idx) in ms.iter().zip(indexes) {
        let reads = idx
            .entries
            .iter()
            .filter_map(|e| frame_of(&e.loc))
            .any(|(s, _, _)| chosen.contains(&s));
        if !reads && !m.segments.iter().any(|s| chosen_names.contains(s)) {
            continue;
        }
        let mut new = idx.clone();
        for e in &mut new.entries {
            match &mut e.loc {
                Location::Zero => {}
                Location::Frame { segment, pos, .. } | Location::Slice { segment, pos, .. } => {
                    if let Some(&(s, p)) = moved.get(&(*segment, *pos)) {
                        (*segment, *pos) = (s, p);
                    }
                }
            }
        }
        commit_generation(sink, disk, m.clone(), &new).await?;
        report.backups_rewritten += 1;
        tracing::info!(disk, backup = %m.backup_id, "rewritten by compaction");
    }

    // 3. The old segments, but any a manifest still lists (a backup that changed since the
    // listing above, whose rewrite was refused) stays.
    let listed: BTreeSet<String> = catalog::list_backups(sink, disk)
        .await?
        .into_iter()
        .flat_map(|m| m.segments)
        .collect();
    let old: Vec<String> = chosen_names
        .into_iter()
        .filter(|n| !listed.contains(n))
        .collect();
    // One locked since it was chosen stays, unreferenced: a collection takes it once free.
    let locked = catalog::delete_unlocked(sink, &old).await?;
    let old: Vec<String> = old.into_iter().filter(|n| !locked.contains(n)).collect();
    let old_bytes: u64 = old.iter().filter_map(|n| sizes.get(n)).sum();
    report.segments_rewritten = old.len();
    report.bytes_reclaimed = old_bytes.saturating_sub(written_bytes);
    tracing::info!(
        disk,
        segments = report.segments_rewritten,
        copied = report.bytes_copied,
        reclaimed = report.bytes_reclaimed,
        "compacted"
    );
    Ok(report)
}

/// A frame read back whole: its header and stored bytes check out, so a damaged frame is
/// never copied under a fresh name.
fn check_frame(frame: &[u8], segment: &str, pos: u64) -> Result<(), EngineError> {
    let corrupt = |source| EngineError::Corrupt {
        object: segment.to_string(),
        pos,
        source,
    };
    let h = FrameHeader::decode(frame).map_err(corrupt)?;
    if h.frame_len() != frame.len() as u64 || pos < SEGMENT_HEADER_LEN as u64 {
        return Err(EngineError::Mismatch {
            object: segment.to_string(),
            pos,
            what: "a frame's length differs from its index entry",
        });
    }
    if crc32fast::hash(&frame[FRAME_HEADER_LEN..]) != h.crc {
        return Err(corrupt(crate::format::FormatError::DataChecksum {
            offset: h.offset,
        }));
    }
    Ok(())
}
