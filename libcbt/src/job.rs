//! Whole backup jobs: change source + engine + sink, with rollback.
//!
//! [`backup_qemu`] backs up several disks of one QEMU at one point in time:
//!
//! 1. per disk, the parent is the newest committed backup on the sink, and
//!    [`decide`](crate::source::qemu::decide) picks full or incremental (with the reason);
//! 2. one [`begin`](QemuSource::begin) freezes all disks at once;
//! 3. per disk: scan the view's maps, add the ranges written since the point in time
//!    ([`written_since_point_in_time`](QemuSource::written_since_point_in_time)), copy;
//! 4. [`end`](QemuSource::end) commits the bitmaps only if every disk's manifest is written;
//!    otherwise every disk's bitmaps roll back and the manifests already written are removed,
//!    so the job is all or nothing.

use std::time::Instant;

use crate::engine::{self, catalog, BackupOptions, EngineError};
use crate::format::{self, Level, Manifest};
use crate::sink::Sink;
use crate::source::qemu::{self, QemuSource, Requested, SourceError};

/// Errors of a job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("change source failed")]
    Source(#[from] SourceError),
    #[error("backup of disk {disk} failed")]
    Engine {
        disk: String,
        #[source]
        source: EngineError,
    },
    #[error("reading the sink's catalog failed")]
    Catalog(#[source] EngineError),
    #[error("{0}")]
    Refused(String),
}

/// One disk of a QEMU: its block node and its id on the sink.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub node: String,
    pub disk: String,
}

/// The result for one disk.
#[derive(Debug, Clone)]
pub struct DiskResult {
    pub manifest: Manifest,
    pub seconds: f64,
}

/// Backs up `disks` of the QEMU behind `source` to `sink` at one point in time, as
/// `backup_id`. See the module documentation.
pub async fn backup_qemu<S: Sink>(
    source: &QemuSource,
    sink: &S,
    backup_id: &str,
    disks: &[DiskSpec],
    requested: Requested,
    opts: &BackupOptions,
) -> Result<Vec<DiskResult>, JobError> {
    let mut plans = Vec::new();
    for d in disks {
        let node = source.node(&d.node).await?;
        let parent = catalog::latest(sink, &d.disk)
            .await
            .map_err(JobError::Catalog)?;
        if parent.as_ref().is_some_and(|p| p.backup_id == backup_id) {
            return Err(JobError::Refused(format!(
                "backup {backup_id} of {} exists already",
                d.disk
            )));
        }
        let decision = qemu::decide(requested, parent.as_ref(), &node);
        if requested == Requested::Incremental && decision.level == Level::Full {
            return Err(SourceError::IncrementalImpossible {
                node: d.node.clone(),
                reason: decision.reason.unwrap_or(format::FullReason::Requested),
            }
            .into());
        }
        // Our bitmaps other than the parent's checkpoint are leftovers of failed runs.
        source
            .remove_stale_bitmaps(&d.node, decision.since.as_deref())
            .await?;
        tracing::info!(disk = %d.disk, level = ?decision.level, reason = ?decision.reason, "planned");
        plans.push((d, parent, decision));
    }
    let session = source
        .begin(
            backup_id,
            &plans
                .iter()
                .map(|(d, _, dec)| (d.node.clone(), dec.since.clone()))
                .collect::<Vec<_>>(),
        )
        .await?;
    let mut results = Vec::new();
    let mut failure = None;
    for ((d, parent, decision), sd) in plans.iter().zip(&session.disks) {
        let t = Instant::now();
        let r = async {
            let scan = engine::scan_export(&sd.uri, sd.dirty_context.as_deref()).await?;
            let job = sd.job(&d.disk, backup_id, decision, parent.as_ref());
            engine::backup_disk(
                sink,
                &job,
                &scan,
                &qemu::Fleece { source, disk: sd },
                opts,
                None,
            )
            .await
        }
        .await;
        match r {
            Ok(manifest) => results.push(DiskResult {
                manifest,
                seconds: t.elapsed().as_secs_f64(),
            }),
            Err(source) => {
                failure = Some(JobError::Engine {
                    disk: d.disk.clone(),
                    source,
                });
                break;
            }
        }
    }
    if let Some(e) = failure {
        // All or nothing: forget the disks already committed in this job.
        for r in &results {
            let _ = sink
                .delete(&format::manifest_name(
                    &r.manifest.disk,
                    &r.manifest.backup_id,
                ))
                .await;
            let _ = sink.delete(&r.manifest.index.name).await;
            for s in &r.manifest.segments {
                let _ = sink.delete(s).await;
            }
        }
        if let Err(e2) = source.end(session, false).await {
            tracing::error!(error = %e2, "rollback of the bitmaps failed");
        }
        return Err(e);
    }
    source.end(session, true).await?;
    Ok(results)
}
