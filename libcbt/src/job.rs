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
use crate::format::{self, BackupId, Level, Manifest};
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
    #[cfg(feature = "libvirt")]
    #[error("libvirt change source failed")]
    Libvirt(#[source] crate::source::libvirt::LibvirtError),
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
    backup_id: &BackupId,
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
        refuse_taken_id(sink, &d.disk, backup_id.as_str()).await?;
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
        forget(sink, &results).await;
        if let Err(e2) = source.end(session, false).await {
            tracing::error!(error = %e2, "rollback of the bitmaps failed");
        }
        return Err(e);
    }
    source.end(session, true).await?;
    Ok(results)
}

/// The steps of a libvirt backup job, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reading the domain and the catalog, deciding full or incremental per disk.
    Planning,
    /// Inside libvirt's backupBegin: from here a checkpoint and a job may outlive us.
    Starting,
    /// Copying; nothing is committed before the end of this phase.
    Copying,
    /// Every manifest is written; ending libvirt's job and pruning checkpoints.
    Committing,
}

impl Phase {
    /// The serde name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Planning => "planning",
            Phase::Starting => "starting",
            Phase::Copying => "copying",
            Phase::Committing => "committing",
        }
    }
}

/// What a job reports while it runs.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    Phase {
        phase: Phase,
    },
    /// A disk's level is decided (after the point in time: final).
    Disk {
        disk: String,
        level: Level,
        reason: Option<format::FullReason>,
    },
    /// Bytes of a disk copied out of bytes to copy.
    Progress {
        disk: String,
        done: u64,
        total: u64,
    },
    /// The point in time was taken: how consistent it is.
    PointInTime {
        consistency: format::Consistency,
        freeze_ms: Option<u64>,
        warning: Option<String>,
        /// The domain was shut off and runs paused until the backup ends.
        started_paused: bool,
    },
}

/// Receives a job's [`JobEvent`]s.
#[derive(Clone)]
pub struct Observer(pub std::sync::Arc<dyn Fn(JobEvent) + Send + Sync>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

impl Observer {
    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    fn emit(o: &Option<Observer>, e: JobEvent) {
        if let Some(o) = o {
            (o.0)(e);
        }
    }
}

/// A future a [`GroupHold`] returns.
pub type HoldFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;

/// A consistency group's hold around a backup's point in time: the guest was frozen or paused
/// by someone else (hostd's groups), who tells whether the hold still stands.
pub trait GroupHold: Send + Sync + std::fmt::Debug {
    /// Just before the point in time: the consistency the hold gives, or why the point in
    /// time may not be taken (the hold ended).
    fn before_point_in_time(&self) -> Result<format::Consistency, String>;
    /// The point in time was taken: an error if the hold ended meanwhile (the backup is
    /// then rolled back).
    fn point_in_time_taken(&self) -> Result<(), String>;
    /// Awaited after the point in time, before the copy (a place in a queue, say).
    fn before_copy(&self) -> HoldFuture<'_>;
}

/// A backup of a libvirt domain.
#[cfg(feature = "libvirt")]
#[derive(Debug, Clone)]
pub struct LibvirtJob {
    /// Domain name or UUID.
    pub domain: String,
    pub backup_id: BackupId,
    /// Targets (`vda` …) to back up; `None`: every disk.
    pub disks: Option<Vec<String>>,
    pub requested: Requested,
    /// Freeze through the guest agent around the point in time, at most this long.
    pub quiesce: Option<std::time::Duration>,
    /// Where per-backup scratch directories (scratch images, NBD socket) go.
    pub scratch_root: std::path::PathBuf,
    pub observer: Option<Observer>,
    /// A consistency group holds the guest around the point in time (`quiesce` is then
    /// ignored: the group froze or paused it).
    pub group: Option<std::sync::Arc<dyn GroupHold>>,
}

/// The result of a libvirt backup.
#[cfg(feature = "libvirt")]
#[derive(Debug, Clone)]
pub struct LibvirtResult {
    pub domain_uuid: String,
    pub checkpoint: String,
    pub quiesce: crate::source::libvirt::Quiesce,
    pub started_paused: bool,
    pub disks: Vec<DiskResult>,
    /// What went wrong after the commit and did not undo it (the backup exists).
    pub warnings: Vec<String>,
}

/// Disk id on the sink of disk `target` of the domain with UUID `uuid`.
#[cfg(feature = "libvirt")]
pub fn libvirt_disk_id(uuid: &str, target: &str) -> String {
    format!("{uuid}.{target}")
}

/// Object name of the domain XML saved with a backup.
pub fn domain_xml_name(domain: &str, backup_id: &str) -> String {
    format::layout::domain_xml_name(domain, backup_id)
}

/// A new backup id: the UTC time to the second and 16 random bits, `YYYYMMDDTHHMMSS-xxxx`
/// (20 characters, sorts by time). Two ids taken in the same second differ but for a 1 in
/// 65536 chance, and a taken id is refused before anything is written
/// ([`EngineError::BackupExists`]), never reused.
pub fn new_backup_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}-{:04x}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        (engine::random_u128() >> 112) as u16
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Refuses a backup id `disk` has used before or is using now (see
/// [`catalog::backup_id_taken`]): checked before anything is touched; the create-only writes of
/// the marker, index and manifest close the race with a concurrent job.
async fn refuse_taken_id<S: Sink>(sink: &S, disk: &str, backup_id: &str) -> Result<(), JobError> {
    if catalog::backup_id_taken(sink, disk, backup_id)
        .await
        .map_err(JobError::Catalog)?
    {
        return Err(JobError::Engine {
            disk: disk.into(),
            source: EngineError::BackupExists {
                disk: disk.into(),
                backup: backup_id.into(),
            },
        });
    }
    Ok(())
}

#[cfg(feature = "libvirt")]
impl From<crate::source::libvirt::LibvirtError> for JobError {
    fn from(e: crate::source::libvirt::LibvirtError) -> Self {
        JobError::Libvirt(e)
    }
}

/// Backs up disks of a libvirt domain at one point in time; all or nothing, like
/// [`backup_qemu`]. Checkpoint metadata libvirt lost is redefined from the last backups when
/// the bitmaps are still in the images; our checkpoints that no last backup names (leftovers of
/// a crash) are deleted first, which folds their bitmaps back into their parents'.
#[cfg(feature = "libvirt")]
pub async fn backup_libvirt<S: Sink>(
    src: &crate::source::libvirt::LibvirtSource,
    sink: &S,
    job: &LibvirtJob,
    opts: &BackupOptions,
) -> Result<LibvirtResult, JobError> {
    use std::collections::{BTreeMap, BTreeSet};

    use crate::source::libvirt::{self as lvs, blocking};

    Observer::emit(
        &job.observer,
        JobEvent::Phase {
            phase: Phase::Planning,
        },
    );
    let (src2, name) = (src.clone(), job.domain.clone());
    let dom = blocking(move || src2.domain(&name)).await?;
    let d2 = dom.clone();
    let (desc, active, xml) =
        blocking(move || Ok((d2.describe()?, d2.is_active()?, d2.xml()?))).await?;
    let selected: Vec<&lvs::DomainDisk> = match &job.disks {
        None => desc.disks.iter().collect(),
        Some(want) => want
            .iter()
            .map(|t| {
                desc.disks.iter().find(|d| &d.target == t).ok_or_else(|| {
                    lvs::LibvirtError::NoSuchDisk {
                        domain: desc.name.clone(),
                        disk: t.clone(),
                    }
                })
            })
            .collect::<Result<_, _>>()?,
    };
    if selected.is_empty() {
        return Err(JobError::Refused(format!(
            "domain {} has no disk to back up",
            desc.name
        )));
    }
    // The last committed backup of every disk of the domain (not only the selected ones):
    // their checkpoints are the ones to keep.
    let mut last = BTreeMap::new();
    for d in &desc.disks {
        let id = libvirt_disk_id(&desc.uuid, &d.target);
        let m = catalog::latest(sink, &id)
            .await
            .map_err(JobError::Catalog)?;
        refuse_taken_id(sink, &id, job.backup_id.as_str()).await?;
        last.insert(d.target.clone(), m);
    }
    let keep: BTreeSet<String> = last
        .values()
        .flatten()
        .filter_map(|m| m.checkpoint.clone())
        .collect();

    let started_paused = !active;
    if started_paused {
        let d2 = dom.clone();
        blocking(move || d2.start_paused()).await?;
        tracing::info!(domain = %desc.name, "shut-off domain started paused for the backup");
    }
    let r = backup_libvirt_running(
        sink,
        job,
        opts,
        &dom,
        &desc,
        &xml,
        &selected,
        &last,
        &keep,
        started_paused,
    )
    .await;
    if r.is_err() && started_paused {
        let d2 = dom.clone();
        let _ = blocking(move || d2.destroy()).await;
    }
    r
}

#[cfg(feature = "libvirt")]
#[allow(clippy::too_many_arguments)]
async fn backup_libvirt_running<S: Sink>(
    sink: &S,
    job: &LibvirtJob,
    opts: &BackupOptions,
    dom: &crate::source::libvirt::LibvirtDomain,
    desc: &crate::source::libvirt::DomainDesc,
    domain_xml: &str,
    selected: &[&crate::source::libvirt::DomainDisk],
    last: &std::collections::BTreeMap<String, Option<Manifest>>,
    keep: &std::collections::BTreeSet<String>,
    started_paused: bool,
) -> Result<LibvirtResult, JobError> {
    use crate::source::libvirt::{self as lvs, blocking, xml, DiskState};

    // Bring back checkpoint metadata libvirt lost, from what the last backups recorded.
    let d2 = dom.clone();
    let mut checkpoints = blocking(move || d2.checkpoints()).await?;
    let mut lost: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for d in &desc.disks {
        if let Some(Some(m)) = last.get(&d.target) {
            if let Some(c) = &m.checkpoint {
                if d.trackable() && !checkpoints.iter().any(|k| &k.name == c) {
                    lost.entry(c.clone()).or_default().push(d.target.clone());
                }
            }
        }
    }
    for (name, disks) in lost {
        let when = last
            .values()
            .flatten()
            .find(|m| m.checkpoint.as_ref() == Some(&name))
            .map(|m| m.started_unix_ms / 1000);
        let refs: Vec<&str> = disks.iter().map(String::as_str).collect();
        let x = xml::checkpoint_xml(&name, when, &refs, &[]);
        let d2 = dom.clone();
        match blocking(move || d2.redefine_checkpoint(&x, true)).await {
            Ok(()) => {
                tracing::info!(checkpoint = %name, "checkpoint metadata redefined from the bitmaps")
            }
            Err(e) => {
                tracing::warn!(checkpoint = %name, error = %e, "checkpoint cannot be redefined: full backup")
            }
        }
    }
    // Leftovers of interrupted backups: our checkpoints no last backup names.
    let (d2, k2) = (dom.clone(), keep.clone());
    let gone = blocking(move || d2.retire_checkpoints(&k2)).await?;
    if !gone.is_empty() {
        tracing::warn!(checkpoints = ?gone, "removed checkpoints of interrupted backups");
    }
    let d2 = dom.clone();
    checkpoints = blocking(move || d2.checkpoints()).await?;
    let scratch_root = job.scratch_root.join(&desc.uuid);
    let (d2, r2) = (dom.clone(), scratch_root.clone());
    let stale = blocking(move || lvs::clean_scratch(&d2, &r2)).await?;
    if !stale.is_empty() {
        tracing::warn!(dirs = ?stale, "removed scratch directories of interrupted backups");
    }

    let mut plan = Vec::new();
    for d in selected {
        let (d2, t) = (dom.clone(), d.target.clone());
        let capacity = blocking(move || d2.capacity(&t)).await?;
        let parent = last.get(&d.target).cloned().flatten();
        let state = DiskState {
            disk: d,
            capacity,
            checkpoint: parent
                .as_ref()
                .and_then(|m| m.checkpoint.as_ref())
                .and_then(|c| checkpoints.iter().find(|k| &k.name == c)),
            broken: false,
        };
        let decision = lvs::decide(job.requested, parent.as_ref(), &state);
        plan.push((d.target.clone(), decision, parent));
    }
    let check_incremental = |plan: &[(String, qemu::Decision, Option<Manifest>)]| {
        if job.requested == Requested::Incremental {
            if let Some((t, d, _)) = plan.iter().find(|(_, d, _)| d.level == Level::Full) {
                return Err(JobError::Libvirt(
                    lvs::LibvirtError::IncrementalImpossible {
                        disk: t.clone(),
                        reason: d.reason.unwrap_or(format::FullReason::Requested),
                    },
                ));
            }
        }
        Ok(())
    };
    check_incremental(&plan)?;
    let req = lvs::BeginRequest {
        backup_id: job.backup_id.clone(),
        disks: plan
            .iter()
            .map(|(t, d, _)| (t.clone(), d.clone()))
            .collect(),
        also_tracked: desc
            .disks
            .iter()
            .filter(|d| d.trackable() && !selected.iter().any(|s| s.target == d.target))
            .map(|d| d.target.clone())
            .collect(),
        untracked: desc
            .disks
            .iter()
            .filter(|d| !d.trackable())
            .map(|d| d.target.clone())
            .collect(),
        scratch_root,
        quiesce: job.quiesce.filter(|_| job.group.is_none()),
        started_paused,
    };
    if opts.cancelled() {
        return Err(JobError::Engine {
            disk: String::new(),
            source: EngineError::Cancelled,
        });
    }
    Observer::emit(
        &job.observer,
        JobEvent::Phase {
            phase: Phase::Starting,
        },
    );
    tracing::debug!("planned");
    let held = match &job.group {
        Some(g) => Some(g.before_point_in_time().map_err(JobError::Refused)?),
        None => None,
    };
    let d2 = dom.clone();
    let mut session = blocking(move || lvs::begin(&d2, req)).await?;
    tracing::debug!("point in time taken");
    // Whether the hold stood until now; a point in time after it is no group's.
    let hold_ended = match &job.group {
        Some(g) => g.point_in_time_taken().err(),
        None => None,
    };
    if held.is_some() {
        session.quiesce.consistency = held;
    }
    for (p, s) in plan.iter_mut().zip(&session.disks) {
        p.1 = s.decision.clone();
        Observer::emit(
            &job.observer,
            JobEvent::Disk {
                disk: libvirt_disk_id(&desc.uuid, &p.0),
                level: p.1.level,
                reason: p.1.reason,
            },
        );
    }
    Observer::emit(
        &job.observer,
        JobEvent::PointInTime {
            consistency: session
                .quiesce
                .consistency
                .unwrap_or(format::Consistency::Crash),
            freeze_ms: session.quiesce.freeze_ms,
            warning: session.quiesce.warning.clone(),
            started_paused: session.started_paused,
        },
    );
    let mut failure = check_incremental(&plan)
        .err()
        .or(hold_ended.map(JobError::Refused));
    if let (None, Some(g)) = (&failure, &job.group) {
        failure = g.before_copy().await.err().map(JobError::Refused);
    }
    Observer::emit(
        &job.observer,
        JobEvent::Phase {
            phase: Phase::Copying,
        },
    );
    let mut results = Vec::new();
    let mut xml_written = false;
    if failure.is_none() {
        let name = domain_xml_name(&desc.uuid, job.backup_id.as_str());
        match sink.put_new(&name, domain_xml.as_bytes().to_vec()).await {
            Ok(()) => xml_written = true,
            Err(crate::sink::SinkError::Exists { .. }) => {
                failure = Some(JobError::Engine {
                    disk: String::new(),
                    source: EngineError::BackupExists {
                        disk: desc.uuid.clone(),
                        backup: job.backup_id.to_string(),
                    },
                })
            }
            Err(e) => failure = Some(JobError::Catalog(e.into())),
        }
    }
    for ((target, decision, parent), sd) in plan.iter().zip(&session.disks) {
        if failure.is_some() {
            break;
        }
        let t = Instant::now();
        let disk = libvirt_disk_id(&desc.uuid, target);
        let r = async {
            let scan = engine::scan_export(&sd.uri, sd.dirty_context.as_deref()).await?;
            let dj = engine::DiskBackup {
                disk: disk.clone(),
                backup_id: job.backup_id.to_string(),
                uri: sd.uri.clone(),
                parent: if decision.level == Level::Incremental {
                    parent.clone()
                } else {
                    None
                },
                level: decision.level,
                full_reason: decision.reason,
                checkpoint: Some(session.checkpoint.clone()),
                consistency: session
                    .quiesce
                    .consistency
                    .unwrap_or(format::Consistency::Crash),
                freeze_ms: session.quiesce.freeze_ms,
                warnings: session.quiesce.warning.iter().cloned().collect(),
            };
            let obs = job.observer.clone();
            let d3 = disk.clone();
            let report = move |p: engine::Progress| {
                Observer::emit(
                    &obs,
                    JobEvent::Progress {
                        disk: d3.clone(),
                        done: p.done,
                        total: p.total,
                    },
                )
            };
            engine::backup_disk(sink, &dj, &scan, &engine::Trusted, opts, Some(&report)).await
        }
        .await;
        match r {
            Ok(manifest) => results.push(DiskResult {
                manifest,
                seconds: t.elapsed().as_secs_f64(),
            }),
            Err(source) => failure = Some(JobError::Engine { disk, source }),
        }
    }
    if failure.is_none() {
        // A job that died under the copy (QEMU error, scratch exhausted, someone's abort)
        // makes what was read suspect even if every read succeeded.
        let d2 = dom.clone();
        match blocking(move || d2.job_active()).await {
            Ok(true) => {}
            Ok(false) => {
                failure = Some(JobError::Refused(
                    "the backup job ended during the copy; nothing committed".into(),
                ))
            }
            Err(e) => failure = Some(e.into()),
        }
    }
    let quiesce = session.quiesce.clone();
    let checkpoint = session.checkpoint.clone();
    // Checkpoints still named by the last backups of disks not in this one stay.
    let mut keep2 = std::collections::BTreeSet::new();
    for (t, m) in last {
        if !plan.iter().any(|(p, _, _)| p == t) {
            if let Some(c) = m.as_ref().and_then(|m| m.checkpoint.clone()) {
                keep2.insert(c);
            }
        }
    }
    if let Some(e) = failure {
        forget(sink, &results).await;
        if xml_written {
            let _ = sink
                .delete(&domain_xml_name(&desc.uuid, job.backup_id.as_str()))
                .await;
        }
        let d2 = dom.clone();
        if let Err(e2) = blocking(move || lvs::end(&d2, session, false, &keep2)).await {
            tracing::error!(error = %e2, "rollback of the checkpoint failed");
        }
        return Err(e);
    }
    Observer::emit(
        &job.observer,
        JobEvent::Phase {
            phase: Phase::Committing,
        },
    );
    // Every manifest is committed: the backup exists whatever happens now. A failure to end
    // libvirt's job is reported with it, not as the job's failure (which would hide a backup
    // that is there, and lose its record).
    let d2 = dom.clone();
    let mut warnings = Vec::new();
    if let Err(e) = blocking(move || lvs::end(&d2, session, true, &keep2)).await {
        tracing::error!(error = %e, "ending libvirt's backup job failed after the commit");
        warnings.push(format!(
            "the backup is committed, but ending libvirt's backup job failed ({e}); \
             the next backup of this domain refuses to start until it has ended \
             (virsh domjobabort)"
        ));
    }
    Ok(LibvirtResult {
        domain_uuid: desc.uuid.clone(),
        checkpoint,
        quiesce,
        started_paused,
        disks: results,
        warnings,
    })
}

/// Removes the manifests, indexes and segments of backups committed by a job that failed.
async fn forget<S: Sink>(sink: &S, results: &[DiskResult]) {
    for r in results {
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
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn backup_ids_are_dated_and_differ_within_a_second() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(20_454), (2026, 1, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
        let ids: std::collections::BTreeSet<String> = (0..64).map(|_| new_backup_id()).collect();
        assert!(ids.len() >= 63, "{ids:?}");
        for id in &ids {
            assert_eq!(id.len(), 20, "{id}");
            assert_eq!(&id[8..9], "T", "{id}");
            crate::sink::check_name(id).expect(id);
        }
    }
}
