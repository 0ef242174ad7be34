//! The backup pipeline of one disk.

use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::{now_ms, random_u128, EngineError, Pool, Progress, ProgressFn};
use crate::extent::{Extent, ExtentMap};
use crate::format::segment::{self, FrameHeader, MAX_FRAME_RAW};
use crate::format::{
    self, layout, BackupStats, Consistency, FullReason, Index, IndexEntry, Level, Location,
    Manifest, Marker, ObjectRef, SegmentId,
};
use crate::nbd::proto::state;
use crate::nbd::{self, Client, ConnectOptions};
use crate::sink::{ObjectWriter, Sink, SinkError};

/// Tuning of the backup pipeline.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Largest raw frame (and NBD read); a power of two ≤ 4 MiB.
    pub chunk_size: u32,
    /// A segment is closed once it reaches this size.
    pub segment_size: u64,
    /// NBD connections (when the export allows several).
    pub connections: usize,
    /// Chunks in flight (read, compressed or waiting for the writer): bounds memory.
    pub in_flight: usize,
    /// Set to stop the backup: it fails with [`EngineError::Cancelled`] at the next chunk and
    /// leaves nothing on the sink.
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// How often the backup's in-progress marker is rewritten while it runs, so that a backup
    /// longer than the garbage collector's grace period keeps its objects (the collector
    /// takes a marker older than the grace period for one whose writer died). Keep it a small
    /// fraction of the grace period.
    pub marker_refresh: std::time::Duration,
}

/// Default of [`BackupOptions::marker_refresh`].
pub const MARKER_REFRESH: std::time::Duration = std::time::Duration::from_secs(600);

impl BackupOptions {
    pub fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            chunk_size: 1 << 20,
            segment_size: 256 << 20,
            connections: 4,
            in_flight: 32,
            cancel: None,
            marker_refresh: MARKER_REFRESH,
        }
    }
}

/// One disk to back up from an NBD export of its point in time.
#[derive(Debug, Clone)]
pub struct DiskBackup {
    /// Disk id on the sink.
    pub disk: String,
    pub backup_id: String,
    /// NBD URI of the point-in-time view.
    pub uri: String,
    pub parent: Option<Manifest>,
    pub level: Level,
    pub full_reason: Option<FullReason>,
    /// Bitmap or checkpoint that marks this point in time.
    pub checkpoint: Option<String>,
    pub consistency: Consistency,
    pub freeze_ms: Option<u64>,
    pub warnings: Vec<String>,
}

enum Item {
    Zero {
        offset: u64,
        len: u64,
    },
    /// The frame is `bytes[..len]`; `bytes` is a pooled worst-case buffer.
    Frame {
        header: FrameHeader,
        bytes: Vec<u8>,
        len: usize,
    },
}

/// The maps of a point-in-time view, read before any data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub disk_size: u64,
    /// `base:allocation` of the view (flags `HOLE`/`ZERO`).
    pub alloc: ExtentMap,
    /// Dirty ranges since the parent (incremental only).
    pub dirty: Option<ExtentMap>,
}

impl Scan {
    /// Marks `ranges` as data that must be read, whatever the allocation map says. A source
    /// whose block status cannot be trusted somewhere (QEMU 7.2's fleecing view misreports
    /// ranges the guest wrote after the point in time) passes those ranges here.
    pub fn force_read(&mut self, ranges: &ExtentMap) {
        let inside: ExtentMap = ranges
            .overlapping(0..self.disk_size)
            .map(|e| Extent { flags: 0, ..e })
            .collect();
        self.alloc = self.alloc.subtract(&inside).union(&inside);
    }

    /// What the backup copies: `(zero ranges, data ranges)`.
    fn plan(&self) -> (ExtentMap, ExtentMap) {
        let scan = match &self.dirty {
            // Dirty ranges that now read as zero must be recorded as zero, not skipped.
            Some(dirty) => dirty.with_flags(0).intersect(&self.alloc),
            None => self.alloc.filter(|f| f & state::ZERO == 0),
        };
        (
            scan.filter(|f| f & state::ZERO != 0),
            scan.filter(|f| f & state::ZERO == 0),
        )
    }
}

/// What a change source knows about the trustworthiness of its point-in-time view.
///
/// QEMU 7.2's fleecing view answers correctly for clusters the guest has not written since the
/// point in time; for clusters it has, block status can be wrong and reads spanning several
/// clusters can return wrong bytes, while single-cluster reads stay right. The engine asks
/// [`written`](Revalidate::written) before copying (those ranges are read whatever block status
/// says) and again after (chunks touching them are read again, one cluster at a time, and
/// replace what the first pass stored).
pub trait Revalidate: Send + Sync {
    /// Ranges the guest wrote since the point in time, up to now.
    fn written(&self) -> impl std::future::Future<Output = Result<ExtentMap, EngineError>> + Send;
    /// Largest read that is right even over written ranges (aligned to itself).
    fn safe_read(&self) -> u64;
}

/// A view that is always right (a stopped disk, a snapshot, a test export).
#[derive(Debug, Clone, Copy, Default)]
pub struct Trusted;

impl Revalidate for Trusted {
    async fn written(&self) -> Result<ExtentMap, EngineError> {
        Ok(ExtentMap::new())
    }
    fn safe_read(&self) -> u64 {
        u64::MAX
    }
}

/// Reads the allocation map (and the dirty map of `dirty_context`) of an export.
pub async fn scan_export(uri: &str, dirty_context: Option<&str>) -> Result<Scan, EngineError> {
    let mut contexts = vec![nbd::BASE_ALLOCATION.to_string()];
    contexts.extend(dirty_context.map(String::from));
    let opts = ConnectOptions {
        meta_contexts: contexts,
        connections: 1,
        ..ConnectOptions::default()
    };
    let client = Client::connect_with(uri, &opts).await?;
    let size = client.size();
    let alloc = client.map(nbd::BASE_ALLOCATION, 0..size).await?;
    let dirty = match dirty_context {
        Some(ctx) => Some(
            client
                .map(ctx, 0..size)
                .await?
                .filter(|f| f & nbd::DIRTY != 0),
        ),
        None => None,
    };
    client.disconnect().await;
    Ok(Scan {
        disk_size: size,
        alloc,
        dirty,
    })
}

/// Backs up one disk and commits its manifest. On any error nothing is committed and the
/// segments this backup wrote are deleted (best effort; garbage collection catches the rest).
///
/// Data is read with structured replies. Do not turn them off for QEMU 7.2 fleecing exports:
/// there, plain (simple-reply) reads return what the guest wrote *after* the point in time in
/// partly rewritten clusters (seen with our client and with libnbd alike), while structured
/// reads return the point-in-time bytes.
///
/// # Cancel safety
/// Dropping the future abandons the backup: partial segments are removed by their writers,
/// finished ones are left for garbage collection, and no manifest exists.
pub async fn backup_disk<S: Sink, R: Revalidate>(
    sink: &S,
    job: &DiskBackup,
    scan: &Scan,
    revalidate: &R,
    opts: &BackupOptions,
    progress: Option<&ProgressFn<'_>>,
) -> Result<Manifest, EngineError> {
    if opts.cancelled() {
        return Err(EngineError::Cancelled);
    }
    if !opts.chunk_size.is_power_of_two()
        || opts.chunk_size > MAX_FRAME_RAW
        || opts.chunk_size < 4096
    {
        return Err(EngineError::Invalid(format!(
            "chunk size {} (a power of two, 4 KiB..4 MiB)",
            opts.chunk_size
        )));
    }
    if (job.level == Level::Incremental) != (job.parent.is_some() && scan.dirty.is_some()) {
        return Err(EngineError::Invalid(
            "an incremental needs a parent and a dirty map, a full neither".into(),
        ));
    }
    let taken = || EngineError::BackupExists {
        disk: job.disk.clone(),
        backup: job.backup_id.clone(),
    };
    if super::catalog::backup_id_taken(sink, &job.disk, &job.backup_id).await? {
        return Err(taken());
    }
    // The marker comes before the first segment: from here on, what this backup writes is
    // covered (never collected by others) and can be named (removed by its reconciler).
    let seg_prefix = (random_u128() >> 64) as u64;
    let marker_name = layout::marker_name(&job.disk, &job.backup_id);
    let marker = Marker::here(&job.backup_id, &job.disk, seg_prefix, now_ms());
    match sink.put_new(&marker_name, marker.encode()).await {
        Ok(()) => {}
        Err(SinkError::Exists { .. }) => return Err(taken()),
        Err(e) => return Err(e.into()),
    }
    let work = backup_disk_marked(sink, job, scan, revalidate, opts, progress, seg_prefix);
    under_marker(sink, &marker_name, &marker, opts.marker_refresh, work).await
}

/// Runs `work` while renewing the in-progress marker `marker` (written already) every
/// `every`: rewriting it renews its age, so collectors take its writer for a live one (a
/// failed renewal only shortens its life). Then deletes it: committed or rolled back, it has
/// done its work (a marker left behind only delays collection until it is older than the
/// grace period).
pub(super) async fn under_marker<S: Sink, T>(
    sink: &S,
    marker_name: &str,
    marker: &Marker,
    every: std::time::Duration,
    work: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(work);
    let every = every.max(std::time::Duration::from_millis(1));
    let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let r = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = refresh.tick() => {
                if let Err(e) = sink.put(marker_name, marker.encode()).await {
                    tracing::warn!(marker = marker_name, error = %e, "refreshing the in-progress marker failed");
                }
            }
        }
    };
    if let Err(e) = sink.delete(marker_name).await {
        tracing::warn!(marker = marker_name, error = %e, "in-progress marker left behind");
    }
    r
}

async fn backup_disk_marked<S: Sink, R: Revalidate>(
    sink: &S,
    job: &DiskBackup,
    scan: &Scan,
    revalidate: &R,
    opts: &BackupOptions,
    progress: Option<&ProgressFn<'_>>,
    seg_prefix: u64,
) -> Result<Manifest, EngineError> {
    let started = now_ms();
    let copts = ConnectOptions {
        connections: opts.connections,
        max_in_flight: opts.in_flight.div_ceil(opts.connections.max(1)).max(2),
        ..ConnectOptions::default()
    };
    let client = Client::connect_with(&job.uri, &copts).await?;
    let size = client.size();
    if size != scan.disk_size {
        return Err(EngineError::Invalid(format!(
            "export is {size} bytes, the scan {}",
            scan.disk_size
        )));
    }
    if let Some(p) = &job.parent {
        if p.disk_size != size {
            return Err(EngineError::Invalid(format!(
                "disk size {size} differs from the parent's {}: take a full",
                p.disk_size
            )));
        }
    }
    let mut scan = scan.clone();
    scan.force_read(&revalidate.written().await?);
    let (zero_ranges, data_ranges) = scan.plan();
    let total = zero_ranges.total_len() + data_ranges.total_len();
    tracing::info!(disk = %job.disk, backup = %job.backup_id, level = ?job.level, bytes = total, "backup started");

    let mut entries: Vec<IndexEntry> = Vec::new();
    let mut stats = BackupStats {
        bytes_scanned: total,
        ..BackupStats::default()
    };
    for z in zero_ranges.chunks(u64::from(opts.chunk_size)) {
        entries.push(IndexEntry {
            offset: z.start,
            len: chunk_len(&z),
            loc: Location::Zero,
        });
        stats.bytes_zero += z.len();
    }
    let mut done = stats.bytes_zero;
    report(progress, done, total);

    let mut segments: Vec<SegmentId> = Vec::new();
    let chunk = u64::from(opts.chunk_size);
    let result = async {
        copy_data(sink, job, opts, seg_prefix, &client, data_ranges.chunks(chunk).collect(), u64::MAX, &mut entries, &mut segments, &mut stats, &mut done, total, progress).await?;
        // Second pass: chunks touching what the guest wrote meanwhile, read one safe piece
        // at a time; their new frames replace the first pass's entries.
        let written = revalidate.written().await?;
        let redo: Vec<Extent> = data_ranges.chunks(chunk).filter(|c| written.overlapping(c.range()).next().is_some()).collect();
        if !redo.is_empty() {
            tracing::debug!(disk = %job.disk, chunks = redo.len(), "re-reading chunks written during the copy");
            let starts: std::collections::HashSet<u64> = redo.iter().map(|c| c.start).collect();
            entries.retain(|e| !starts.contains(&e.offset));
            stats.redone_chunks = redo.len() as u64;
            // These bytes were counted once already; progress must not pass the total.
            done = done.saturating_sub(redo.iter().map(Extent::len).sum());
            copy_data(sink, job, opts, seg_prefix, &client, redo, revalidate.safe_read(), &mut entries, &mut segments, &mut stats, &mut done, total, progress).await?;
        }
        Ok::<_, EngineError>(())
    }
    .await;
    client.disconnect().await;
    if let Err(e) = result {
        for s in &segments {
            let _ = sink.delete(&format::segment_name(&job.disk, *s)).await;
        }
        return Err(e);
    }
    // Data and zero bytes as the index finally records them.
    stats.bytes_data = entries
        .iter()
        .filter(|e| e.loc != Location::Zero)
        .map(|e| u64::from(e.len))
        .sum();
    stats.bytes_zero = entries
        .iter()
        .filter(|e| e.loc == Location::Zero)
        .map(|e| u64::from(e.len))
        .sum();
    stats.frames = entries.iter().filter(|e| e.loc != Location::Zero).count() as u64;

    entries.sort_by_key(|e| e.offset);
    let index = Index {
        disk_size: size,
        entries,
    };
    let index_bytes = index.encode();
    let index_ref = ObjectRef {
        name: format::index_name(&job.disk, &job.backup_id),
        len: index_bytes.len() as u64,
        crc32: crc32fast::hash(&index_bytes),
    };
    let mut index_written = false;
    let finished = now_ms();
    let recent = layout::recent_name(&job.disk, finished, &job.backup_id);
    let mut recent_written = false;
    let mut manifest_sent = None;
    let commit = async {
        let locked_until_unix_ms = lock_chain(sink, job, started).await?;
        let manifest = Manifest {
            format_version: u32::from(segment::FORMAT_VERSION),
            backup_id: job.backup_id.clone(),
            disk: job.disk.clone(),
            parent: job.parent.as_ref().map(|p| p.backup_id.clone()),
            level: job.level,
            full_reason: job.full_reason,
            checkpoint: job.checkpoint.clone(),
            disk_size: size,
            chunk_size: opts.chunk_size,
            consistency: job.consistency,
            freeze_ms: job.freeze_ms,
            warnings: job.warnings.clone(),
            started_unix_ms: started,
            finished_unix_ms: finished,
            stats: stats.clone(),
            index: index_ref.clone(),
            segments: segments
                .iter()
                .map(|s| format::segment_name(&job.disk, *s))
                .collect(),
            generation: 0,
            folded: Vec::new(),
            locked_until_unix_ms,
        };
        let encoded = manifest.encode();
        // What readers refuse must not be committed: the data goes again (roll-back below).
        if index_ref.len > super::restore::MAX_INDEX
            || encoded.len() > format::manifest::MAX_MANIFEST
        {
            return Err(EngineError::Invalid(format!(
                "{} of {}: the index ({} bytes) or the manifest ({} bytes, {} segments) would \
                 be larger than readers accept; use larger chunks or segments",
                job.backup_id,
                job.disk,
                index_ref.len,
                encoded.len(),
                segments.len()
            )));
        }
        // Create-only, all: an id that is taken fails here rather than replace a backup.
        sink.put_new(&index_ref.name, index_bytes).await?;
        index_written = true;
        // Before the manifest: the newest committed backup always has its entry (an entry
        // without a manifest is skipped by readers and collected with the orphans).
        sink.put_new(&recent, Vec::new()).await?;
        recent_written = true;
        manifest_sent = Some(manifest.clone());
        sink.put_new(&format::manifest_name(&job.disk, &job.backup_id), encoded)
            .await?;
        Ok::<_, EngineError>(manifest)
    };
    match commit.await {
        Ok(m) => {
            tracing::info!(disk = %job.disk, backup = %job.backup_id, stored = m.stats.bytes_stored, "backup committed");
            Ok(m)
        }
        Err(e) => {
            // A manifest write that failed without a refusal (a timeout, a connection lost
            // after the request left) may have committed the backup all the same: rolling
            // back would delete the data of a committed backup. Only a manifest known to be
            // absent allows the roll-back; when that cannot be known, everything stays for
            // recovery and garbage collection (which keep what a manifest references).
            if let Some(sent) = manifest_sent {
                if !matches!(e, EngineError::Sink(SinkError::Exists { .. })) {
                    match super::catalog::read_manifest(sink, &job.disk, &job.backup_id).await {
                        Ok(Some(m)) if m == sent => {
                            tracing::warn!(disk = %job.disk, backup = %job.backup_id, error = %e, "the manifest write failed but the manifest is there: committed");
                            // Immutable sinks: the manifest promises a lock; make sure the
                            // server keeps it (the write's own lock may be what failed).
                            if let Some(until) = m.locked_until_unix_ms {
                                let names = [
                                    format::manifest_name(&job.disk, &job.backup_id),
                                    m.index.name.clone(),
                                ];
                                if let Err(e2) =
                                    sink.extend_lock(&names, super::prune::unix_ms(until)).await
                                {
                                    tracing::error!(disk = %job.disk, backup = %job.backup_id, error = %e2, "the committed manifest could not be locked: nothing rolled back");
                                    return Err(e);
                                }
                            }
                            return Ok(m);
                        }
                        Ok(_) => {}
                        Err(e2) => {
                            tracing::error!(disk = %job.disk, backup = %job.backup_id, error = %e2, "whether the manifest was written is unknown: nothing rolled back");
                            return Err(e);
                        }
                    }
                }
            }
            if index_written {
                let _ = sink.delete(&index_ref.name).await;
            }
            if recent_written {
                let _ = sink.delete(&recent).await;
            }
            for s in &segments {
                let _ = sink.delete(&format::segment_name(&job.disk, *s)).await;
            }
            Err(e)
        }
    }
}

/// On an immutable sink ([`Sink::lock_period`]): the time until which every object the
/// backup of `job` started at `started_ms` needs is locked (its manifest records it). Its own
/// objects were locked when written; the older ones it reads (its ancestors' manifests,
/// indexes and segments) are extended when the parent's record ends less than a period from
/// now, to [`lock_span`](crate::sink::lock_span) after the start, so that extensions happen
/// about once a quarter period, not at every backup. `None` on other sinks.
async fn lock_chain<S: Sink>(
    sink: &S,
    job: &DiskBackup,
    started_ms: u64,
) -> Result<Option<u64>, EngineError> {
    let Some(period) = sink.lock_period() else {
        return Ok(None);
    };
    let ms_of = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let own = started_ms.saturating_add(ms_of(crate::sink::lock_span(period)));
    let parent = match (&job.parent, job.level) {
        (Some(p), Level::Incremental) => p,
        _ => return Ok(Some(own)),
    };
    if let Some(p) = parent.locked_until_unix_ms {
        if p >= started_ms.saturating_add(ms_of(period)) {
            return Ok(Some(p.min(own)));
        }
    }
    let ms = super::catalog::list_backups(sink, &job.disk).await?;
    let mut chain = super::prune::ancestors(&ms, &parent.backup_id)?;
    chain.push(parent.backup_id.clone());
    let mut names = std::collections::BTreeSet::new();
    for m in ms.iter().filter(|m| chain.contains(&m.backup_id)) {
        names.insert(layout::manifest_name_gen(
            &job.disk,
            &m.backup_id,
            m.generation,
        ));
        names.insert(m.index.name.clone());
        names.extend(m.segments.iter().cloned());
    }
    let names: Vec<String> = names.into_iter().collect();
    tracing::info!(disk = %job.disk, backup = %job.backup_id, objects = names.len(), "extending the locks of the chain");
    sink.extend_lock(
        &names,
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(own),
    )
    .await?;
    Ok(Some(own))
}

fn chunk_len(e: &Extent) -> u32 {
    // Chunks are at most chunk_size <= 4 MiB.
    u32::try_from(e.len()).unwrap_or(u32::MAX)
}

fn report(progress: Option<&ProgressFn<'_>>, done: u64, total: u64) {
    if let Some(p) = progress {
        p(Progress { done, total });
    }
}

#[allow(clippy::too_many_arguments)]
async fn copy_data<S: Sink>(
    sink: &S,
    job: &DiskBackup,
    opts: &BackupOptions,
    seg_prefix: u64,
    client: &Client,
    chunks: Vec<Extent>,
    piece: u64,
    entries: &mut Vec<IndexEntry>,
    segments: &mut Vec<SegmentId>,
    stats: &mut BackupStats,
    done: &mut u64,
    total: u64,
    progress: Option<&ProgressFn<'_>>,
) -> Result<(), EngineError> {
    let (tx, mut rx) =
        mpsc::channel::<Result<(Item, OwnedSemaphorePermit), EngineError>>(opts.in_flight.max(1));
    let permits = Arc::new(Semaphore::new(opts.in_flight.max(1)));
    let (reads, frames) = (Arc::new(Pool::default()), Arc::new(Pool::default()));
    let producer = {
        let (client, reads, frames) = (client.clone(), reads.clone(), frames.clone());
        tokio::spawn(async move {
            // The chunk tasks live in this set: aborting the producer aborts them, so no read
            // (and no client handle) outlives a failed copy. A source may need every
            // connection closed before it can end its export cleanly.
            let mut tasks = tokio::task::JoinSet::new();
            for c in chunks {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (client, tx, reads, frames) =
                    (client.clone(), tx.clone(), reads.clone(), frames.clone());
                tasks.spawn(async move {
                    let r = read_and_encode(&client, c, piece, reads, frames)
                        .await
                        .map(|item| (item, permit));
                    let _ = tx.send(r).await;
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    // Abort the producer (and so stop reading) if this future is dropped or fails.
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _producer = AbortOnDrop(producer);

    let mut writer: Option<(SegmentId, S::Writer)> = None;
    let mut finishing = tokio::task::JoinSet::new();
    let result: Result<(), EngineError> = async {
        while let Some(msg) = rx.recv().await {
            let (item, permit) = msg?;
            match item {
                Item::Zero { offset, len } => {
                    entries.push(IndexEntry {
                        offset,
                        len: u32::try_from(len).unwrap_or(u32::MAX),
                        loc: Location::Zero,
                    });
                    stats.bytes_zero += len;
                    *done += len;
                }
                Item::Frame { header, bytes, len } => {
                    let frame_len = len as u64;
                    if writer
                        .as_ref()
                        .is_some_and(|(_, w)| w.len() + frame_len > opts.segment_size)
                    {
                        if let Some((_, w)) = writer.take() {
                            // fsync + rename in the background; the manifest waits for all.
                            finishing.spawn(w.finish());
                        }
                    }
                    if writer.is_none() {
                        let id = (u128::from(seg_prefix) << 64) | (random_u128() >> 64);
                        let mut w = sink.create(&format::segment_name(&job.disk, id)).await?;
                        segments.push(id);
                        stats.segments += 1;
                        w.append(segment::segment_header().to_vec()).await?;
                        writer = Some((id, w));
                    }
                    let Some((id, w)) = writer.as_mut() else {
                        unreachable!("a segment writer was just opened")
                    };
                    let pos = w.len();
                    // The frame's own buffer goes to the sink, and comes back for reuse.
                    frames.give(w.append_prefix(bytes, len).await?);
                    entries.push(IndexEntry {
                        offset: header.offset,
                        len: header.raw_len,
                        loc: Location::Frame {
                            segment: *id,
                            pos,
                            frame_len: u32::try_from(frame_len).unwrap_or(u32::MAX),
                        },
                    });
                    stats.bytes_data += u64::from(header.raw_len);
                    stats.bytes_stored += frame_len;
                    stats.frames += 1;
                    *done += u64::from(header.raw_len);
                }
            }
            drop(permit);
            report(progress, *done, total);
            if opts.cancelled() {
                return Err(EngineError::Cancelled);
            }
        }
        if let Some((_, w)) = writer.take() {
            finishing.spawn(w.finish());
        }
        while let Some(r) = finishing.join_next().await {
            r.map_err(EngineError::Task)??;
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        if let Some((_, w)) = writer.take() {
            w.abort().await;
        }
        // Let background finishes land before the caller deletes this backup's segments,
        // so that no rename comes after the delete.
        while finishing.join_next().await.is_some() {}
    }
    result
}

/// Reads chunk `c` in reads that never cross a multiple of `piece`, and encodes it.
async fn read_and_encode(
    client: &Client,
    c: Extent,
    piece: u64,
    reads: Arc<Pool>,
    frames: Arc<Pool>,
) -> Result<Item, EngineError> {
    let len = c.len();
    // Chunks are at most 4 MiB. Read buffers keep their length in the pool; only the first
    // `len` bytes of one are this chunk.
    let n = len as usize;
    let buf = if c.start / piece == (c.end - 1) / piece {
        client
            .read_into(c.start, len, reads.take_at_least(n))
            .await?
    } else {
        let mut buf = reads.take_at_least(n);
        let one: ExtentMap = [c].into_iter().collect();
        for p in one.chunks(piece) {
            let part = client.read(p.start, vec![0u8; p.len() as usize]).await?;
            buf[(p.start - c.start) as usize..(p.end - c.start) as usize].copy_from_slice(&part);
        }
        buf
    };
    // Small chunks (the scattered 64 KiB of an incremental) are encoded right here: tens of
    // microseconds, less than the hand-off to the blocking pool and back costs.
    if n <= INLINE_ENCODE {
        return encode_chunk(c, buf, n, &reads, &frames);
    }
    tokio::task::spawn_blocking(move || encode_chunk(c, buf, n, &reads, &frames))
        .await
        .map_err(EngineError::Task)?
}

/// Largest chunk encoded on the async runtime rather than the blocking pool.
const INLINE_ENCODE: usize = 128 << 10;

/// Encodes the first `n` bytes of `buf` (chunk `c`) and gives `buf` back to `reads`.
fn encode_chunk(
    c: Extent,
    buf: Vec<u8>,
    n: usize,
    reads: &Pool,
    frames: &Pool,
) -> Result<Item, EngineError> {
    let len = c.len();
    let raw = &buf[..n];
    let item = if is_zero(raw) {
        Item::Zero {
            offset: c.start,
            len,
        }
    } else {
        let mut bytes = frames.take_at_least(0);
        let (header, len) =
            segment::encode_frame_in_place(c.start, raw, &mut bytes).map_err(|source| {
                EngineError::Corrupt {
                    object: "frame being encoded".into(),
                    pos: c.start,
                    source,
                }
            })?;
        Item::Frame { header, bytes, len }
    };
    reads.give(buf);
    Ok(item)
}

/// True when every byte is zero. OR-folds 256-byte blocks (which the compiler vectorizes)
/// and stops at the first block that is not zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(256);
    for b in &mut blocks {
        if b.iter().fold(0u8, |acc, x| acc | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|x| *x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_finds_a_single_set_byte_anywhere() {
        let mut buf = vec![0u8; 4096 + 77];
        assert!(is_zero(&buf));
        for i in [0, 255, 256, 4095, 4096, 4096 + 76] {
            buf[i] = 1;
            assert!(!is_zero(&buf), "byte {i}");
            buf[i] = 0;
        }
        assert!(is_zero(&[]));
    }
}
