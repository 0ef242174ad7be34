//! Running jobs: journaled before they touch anything, run under per-host and per-tenant
//! limits ([`crate::registry`]), observable (status, Server-Sent Events) and cancellable.
//! Their recovery after a crash is in [`crate::recover`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libcbt::engine::{self, BackupOptions, EngineError, RestoreTarget};
use libcbt::job::{self, JobEvent, LibvirtJob, Observer, Phase};
use libcbt::sink::any::AnySink;
use libcbt::sink::Sink;
use libcbt::source::libvirt::{self as lvs, blocking};
use libcbt::source::qemu::Requested;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use libcbt::format::{BackupId, Level};

use crate::journal::{JobKind, JobRow, JobState, Journal};
use crate::recover::BackupPlan;
use crate::registry::{
    new_job_id, Compaction, InstanceClaim, Job, JobStatus, RestoreTo, SubmitError, Work,
};
use crate::safe_fs::{self, FileId};
use crate::state::AppState;

/// Journals and starts a job; returns at once. `held` (an instance's claim and rewriting
/// mark, say) is released when the job ends.
pub async fn submit(
    st: &Arc<AppState>,
    tenant: Option<String>,
    sink: &str,
    work: Work,
    request: Value,
    held: Vec<InstanceClaim>,
) -> Result<Arc<Job>, SubmitError> {
    let id = new_job_id();
    let kind = work.kind();
    let instance = work.instance().to_string();
    // Admission: a place in the queue, and the instance for a backup.
    let jobs = &st.jobs;
    jobs.enqueue()?;
    let unqueue = || jobs.dequeue();
    let mut held = held;
    if let Work::Backup { .. } = &work {
        match jobs.claim(&instance) {
            Ok(c) => held.push(c),
            Err(e) => {
                unqueue();
                return Err(e);
            }
        }
    }
    let row = JobRow {
        id: id.clone(),
        kind,
        tenant: tenant.clone(),
        instance: instance.clone(),
        sink: sink.into(),
        backup_id: work.backup_id().map(|b| b.to_string()).unwrap_or_default(),
        request,
        state: JobState::Queued,
        plan: None,
        error: None,
        result: None,
        created_ms: Journal::now_ms(),
        finished_ms: None,
    };
    let j2 = st.journal.clone();
    let r2 = row.clone();
    let inserted = tokio::task::spawn_blocking(move || j2.insert(&r2))
        .await
        .map_err(|_| crate::journal::JournalError::Sqlite(rusqlite::Error::InvalidQuery))
        .and_then(|r| r);
    if let Err(e) = inserted {
        unqueue();
        return Err(SubmitError::Journal(e));
    }
    let mut status = JobStatus::from_row(&row);
    status.phase = "queued".into();
    let job = Arc::new(Job::new(status));
    st.jobs.insert(job.clone());
    st.metrics.jobs_queued.inc();
    let (st2, job2, sink2) = (st.clone(), job.clone(), sink.to_string());
    let span = tracing::info_span!("job", job = %id, kind = %kind, instance = %instance);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            run(st2.clone(), job2.clone(), sink2, work, held).await;
            st2.jobs.retire(&job2.id);
        },
        span,
    ));
    Ok(job)
}

fn update(job: &Job, f: impl FnOnce(&mut JobStatus)) {
    job.status.send_modify(f);
}

async fn finish(
    st: &AppState,
    job: &Job,
    state: JobState,
    error: Option<String>,
    result: Option<Value>,
) {
    let (j2, id, e2, r2) = (
        st.journal.clone(),
        job.id.clone(),
        error.clone(),
        result.clone(),
    );
    let _ =
        tokio::task::spawn_blocking(move || j2.set_state(&id, state, e2.as_deref(), r2.as_ref()))
            .await;
    let kind = job.snapshot().kind;
    st.metrics.job_ended(kind.as_str(), state.as_str());
    update(job, |s| {
        s.state = state;
        s.phase = state.as_str().into();
        s.error = error;
        s.result = result;
        s.finished_ms = Some(Journal::now_ms());
    });
}

async fn run(st: Arc<AppState>, job: Arc<Job>, sink: String, work: Work, held: Vec<InstanceClaim>) {
    // Queue: one host slot and one slot of the tenant.
    let tenant = job.tenant.clone().unwrap_or_else(|| "-".into());
    // A group's member takes its point in time while the group is held, and its slots after.
    let grouped = matches!(&work, Work::Backup { group: Some(_), .. });
    let permits = if grouped {
        Some(None)
    } else {
        st.jobs.run_slots(&tenant, &job).await.map(Some)
    };
    st.jobs.dequeue();
    st.metrics.jobs_queued.dec();
    let Some(slots) = permits else {
        finish(
            &st,
            &job,
            JobState::Cancelled,
            Some("cancelled while queued".into()),
            None,
        )
        .await;
        return;
    };
    let (j2, id) = (st.journal.clone(), job.id.clone());
    let r =
        tokio::task::spawn_blocking(move || j2.set_state(&id, JobState::Running, None, None)).await;
    if !matches!(r, Ok(Ok(()))) {
        // A job the journal does not know runs is one no recovery would look after.
        tracing::error!(result = ?r, "journaling the job's start failed; not starting it");
        st.metrics.error("journal");
        finish(
            &st,
            &job,
            JobState::Failed,
            Some("journaling the job's start failed; nothing was touched".into()),
            None,
        )
        .await;
        return;
    }
    update(&job, |s| {
        s.state = JobState::Running;
        s.phase = "starting".into();
    });
    st.metrics.jobs_running.inc();
    let t = Instant::now();
    let r = match st.sink(&sink).await {
        Ok(None) => Err((format!("no sink {sink}"), "sink")),
        Ok(Some(s)) => match work {
            Work::Backup {
                backup_id,
                domain_uuid,
                disks,
                requested,
                quiesce,
                labels,
                group,
            } => {
                let max_chain = st
                    .cfg
                    .sinks
                    .iter()
                    .find(|c| c.name == sink)
                    .and_then(|c| c.max_chain);
                run_backup(
                    &st,
                    &job,
                    &s,
                    max_chain,
                    &backup_id,
                    &domain_uuid,
                    disks,
                    requested,
                    quiesce,
                    labels,
                    group,
                )
                .await
            }
            Work::Restore {
                backup_id,
                domain_uuid,
                disks,
                target,
            } => {
                let id = backup_id.as_str();
                run_restore(&st, &job, &s, id, &domain_uuid, &disks, target).await
            }
            Work::Verify {
                backup_id,
                domain_uuid,
                disks,
            } => run_verify(&job, &s, backup_id.as_str(), &domain_uuid, &disks).await,
            Work::Prune { domain_uuid, plan } => {
                run_prune(&st, &job, &s, &sink, &domain_uuid, &plan).await
            }
            Work::Gc { grace, compact } => run_gc(&st, &job, &s, &sink, grace, compact).await,
        },
        Err(e) => Err((format!("sink {sink}: {}", chain(&e)), "sink")),
    };
    st.metrics.jobs_running.dec();
    // The instance is free before the job says it ended: a client that reacts to the end at
    // once is not refused as busy.
    drop(held);
    // A live restore's copy may last hours: it gives back the job's slots first (the mount
    // keeps the backups it reads from being rewritten).
    let r = match r {
        Ok(mut v) if v.get("copy").is_some() => {
            drop(slots);
            match serde_json::from_value::<LiveParams>(v["copy"].take()) {
                Ok(copy) => {
                    if let Some(o) = v.as_object_mut() {
                        o.remove("copy");
                    }
                    return live_phase(&st, &job, &copy, v).await;
                }
                Err(e) => Err((format!("the live copy's parameters: {e}"), "internal")),
            }
        }
        r => r,
    };
    match r {
        Ok(result) => {
            if job.snapshot().kind == JobKind::Backup {
                st.metrics.backup_seconds.observe(t.elapsed().as_secs_f64());
            }
            finish(&st, &job, JobState::Succeeded, None, Some(result)).await
        }
        Err((e, kind)) => {
            let state = if kind != "journal" && job.cancel.load(Ordering::SeqCst) {
                JobState::Cancelled
            } else {
                st.metrics.error(kind);
                JobState::Failed
            };
            tracing::warn!(error = %e, %state, "job ended");
            finish(&st, &job, state, Some(e), None).await
        }
    }
}

type JobResult = Result<Value, (String, &'static str)>;

pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

fn job_err_kind(e: &job::JobError) -> &'static str {
    match e {
        job::JobError::Libvirt(_) => "libvirt",
        job::JobError::Engine {
            source: EngineError::Cancelled,
            ..
        } => "cancelled",
        job::JobError::Engine {
            source: EngineError::Nbd(_),
            ..
        } => "nbd",
        job::JobError::Engine {
            source: EngineError::Sink(_),
            ..
        }
        | job::JobError::Catalog(_) => "sink",
        job::JobError::Engine { .. } => "engine",
        job::JobError::Source(_) => "qemu",
        job::JobError::Refused(_) => "refused",
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_backup(
    st: &Arc<AppState>,
    job: &Arc<Job>,
    sink: &AnySink,
    max_chain: Option<usize>,
    backup_id: &BackupId,
    uuid: &str,
    disks: Option<Vec<String>>,
    requested: Requested,
    quiesce: Option<Duration>,
    labels: BTreeMap<String, String>,
    group: Option<Arc<crate::groups::Group>>,
) -> JobResult {
    let src = st
        .libvirt()
        .await
        .ok_or(("libvirt is disabled or unreachable".to_string(), "libvirt"))?;
    let started = Instant::now();
    let planned: Arc<Mutex<Vec<String>>> = Arc::default();
    let paused = Arc::new(AtomicBool::new(false));
    let (j2, p2, jr, id) = (
        job.clone(),
        planned.clone(),
        st.journal.clone(),
        job.id.clone(),
    );
    let pz = paused.clone();
    let journal_failed: Arc<Mutex<Option<String>>> = Arc::default();
    let jf = journal_failed.clone();
    // A plan that is not durable is a job that cannot be recovered: stop it (the engine rolls
    // back at its next cancellation check) before it touches anything more.
    let durable = move |job: &Job, plan: &BackupPlan| {
        let plan = serde_json::to_value(plan).unwrap_or_default();
        let r = tokio::task::block_in_place(|| jr.set_plan(&id, &plan));
        if let Err(e) = r {
            tracing::error!(error = %e, "journaling the plan failed; stopping the job");
            *jf.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(format!("journaling the job's plan failed: {e}"));
            job.request_cancel();
        }
    };
    let obs = Observer(Arc::new(move |e: JobEvent| {
        match &e {
            JobEvent::Phase { phase } => {
                if *phase == Phase::Starting {
                    // From here libvirt may create a checkpoint and a job that outlive us.
                    durable(&j2, &BackupPlan::Starting);
                }
                if *phase == Phase::Copying {
                    // The plan is durable before any byte is copied: recovery needs it.
                    let plan = BackupPlan::Copying {
                        disks: p2.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                        started_paused: pz.load(Ordering::SeqCst),
                    };
                    durable(&j2, &plan);
                }
                update(&j2, |s| s.phase = phase.as_str().into());
            }
            JobEvent::Disk {
                disk,
                level,
                reason,
            } => {
                p2.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(disk.clone());
                update(&j2, |s| {
                    let d = s.disks.entry(disk.clone()).or_default();
                    d.level = Some(format!("{level:?}").to_lowercase());
                    d.full_reason = reason.map(|r| reason_name(&r));
                });
            }
            JobEvent::Progress { disk, done, total } => update(&j2, |s| {
                s.disk_progress(disk, *done, *total);
                let secs = started.elapsed().as_secs_f64().max(0.001);
                s.rate_bytes_per_sec = (s.bytes_done as f64 / secs) as u64;
            }),
            JobEvent::PointInTime {
                consistency,
                freeze_ms,
                warning,
                started_paused,
            } => {
                pz.store(*started_paused, Ordering::SeqCst);
                update(&j2, |s| {
                    s.consistency = Some(format!("{consistency:?}").to_lowercase());
                    s.freeze_ms = *freeze_ms;
                    s.warnings.extend(warning.clone());
                })
            }
        }
    }));
    let lj = LibvirtJob {
        domain: uuid.into(),
        backup_id: backup_id.clone(),
        disks,
        requested,
        quiesce,
        scratch_root: st.cfg.server.scratch(),
        observer: Some(obs),
        group: group.clone().map(|g| {
            Arc::new(crate::groups::Gate {
                group: g,
                instance: uuid.into(),
                st: st.clone(),
                job: job.clone(),
                slots: Arc::default(),
            }) as Arc<dyn job::GroupHold>
        }),
    };
    let opts = BackupOptions {
        cancel: Some(job.cancel.clone()),
        ..Default::default()
    };
    let r = job::backup_libvirt(&src, sink, &lj, &opts).await;
    if let Some(e) = journal_failed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        return Err((e, "journal"));
    }
    let r = r.map_err(|e| (chain(&e), job_err_kind(&e)))?;
    let mut disks = Vec::new();
    for d in &r.disks {
        let m = &d.manifest;
        st.metrics.bytes_read.inc_by(m.stats.bytes_scanned);
        st.metrics.bytes_data.inc_by(m.stats.bytes_data);
        st.metrics.bytes_stored.inc_by(m.stats.bytes_stored);
        if let Some(reason) = m.full_reason {
            st.metrics.full(&reason_name(&reason));
        }
        let mut disk = json!({
            "disk": m.disk, "level": m.level, "full_reason": m.full_reason, "parent": m.parent,
            "disk_size": m.disk_size, "stats": m.stats, "seconds": d.seconds,
        });
        // The backup has committed: bounding its chain is housekeeping, and a failure leaves
        // the chain as it was (longer), which the next backup bounds.
        if let Some(n) = max_chain.filter(|_| m.level == Level::Incremental) {
            match engine::bound_chain(sink, &m.disk, backup_id.as_str(), n).await {
                Ok(Some(b)) => {
                    st.metrics.folded("max_chain", 1);
                    update(job, |s| {
                        s.disks.entry(m.disk.clone()).or_default().synthetic_full_of =
                            Some(b.depth + 1)
                    });
                    disk["synthetic_full"] = json!({
                        "chain": b.depth + 1, "generation": b.generation,
                        "index_bytes_read": b.index_bytes_read,
                        "index_bytes_written": b.index_bytes_written,
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(disk = %m.disk, error = %chain(&e), "bounding the chain failed");
                    update(job, |s| {
                        s.warnings.push(format!(
                            "{}: the chain was not bounded to {n}: {}",
                            m.disk,
                            chain(&e)
                        ))
                    });
                }
            }
        }
        disks.push(disk);
    }
    if let Some(ms) = r.quiesce.freeze_ms {
        st.metrics.freeze_seconds.observe(ms as f64 / 1000.0);
    }
    let record = json!({
        "backup_id": backup_id, "instance": uuid, "labels": labels,
        "group": group.as_ref().map(|g| json!({"id": g.id, "mode": g.mode})),
        "checkpoint": r.checkpoint, "consistency": r.quiesce.consistency,
        "freeze_ms": r.quiesce.freeze_ms, "warning": r.quiesce.warning,
        "started_paused": r.started_paused, "disks": disks, "warnings": r.warnings,
    });
    if !r.warnings.is_empty() {
        update(job, |s| s.warnings.extend(r.warnings.iter().cloned()));
    }
    // Labels and the job's summary beside the manifests; the manifests stay the commit.
    if let Err(e) = sink
        .put_new(
            &record_name(uuid, backup_id.as_str()),
            record.to_string().into_bytes(),
        )
        .await
    {
        tracing::error!(backup = %backup_id, error = %e, "the job record was not saved");
        update(job, |s| {
            s.warnings
                .push(format!("the job record (labels) was not saved: {e}"))
        });
    }
    Ok(record)
}

/// Takes `instance` for a rewrite of its backups on `sink` (a deletion, a prune, a
/// compaction): its claim (no backup starts), its rewriting mark (no restore or verification
/// is admitted; marked before the running jobs are checked, so one admitted after the check
/// sees it), no job of it may be running on the sink and none of its backups there may be
/// mounted. Held until the claims drop.
pub(crate) fn take_for_rewrite(
    st: &AppState,
    instance: &str,
    sink: &str,
) -> Result<Vec<InstanceClaim>, SubmitError> {
    let claim = st.jobs.claim(instance)?;
    let rewriting = st.jobs.mark_rewriting(instance);
    if st.jobs.all().iter().any(|j| {
        let j = j.snapshot();
        !j.terminal() && j.instance == instance && j.sink == sink
    }) {
        return Err(SubmitError::Running(instance.to_string()));
    }
    // A mount reads the backups' frames: none may go from under it.
    if st.mounts.reads(instance, sink) {
        return Err(SubmitError::Mounted(instance.to_string()));
    }
    // Dropped in order: the mark before the claim, so no other rewrite takes the instance
    // while the mark it would set is still about to be removed.
    Ok(vec![rewriting, claim])
}

fn engine_err(e: &EngineError) -> (String, &'static str) {
    let kind = match e {
        EngineError::Cancelled => "cancelled",
        EngineError::Sink(_) => "sink",
        _ => "engine",
    };
    (chain(e), kind)
}

/// Shows a prune's or a collection's steps on the job.
fn steps(job: &Job, done: u64, total: u64) {
    update(job, |s| {
        s.steps_done = Some(done);
        s.steps_total = Some(total);
    });
}

/// Runs a prune plan (see `libcbt::engine::prune_with`): folds, then the deletions, one step
/// at a time, each complete on its own; a cancel is honoured between two steps, so a
/// cancelled prune leaves every backup whole and the same prune run again finishes it.
async fn run_prune(
    st: &AppState,
    job: &Job,
    sink: &AnySink,
    name: &str,
    uuid: &str,
    plan: &[engine::PruneEntry],
) -> JobResult {
    update(job, |s| s.phase = "pruning".into());
    let progress = |p: engine::Progress| steps(job, p.done, p.total);
    let with = engine::Steps {
        progress: Some(&progress),
        cancel: Some(&job.cancel),
    };
    let report = engine::prune_with(sink, plan, Some(uuid), with)
        .await
        .map_err(|e| engine_err(&e))?;
    let total = job.snapshot().steps_total.unwrap_or(0);
    steps(job, total, total);
    tracing::info!(instance = %uuid, deleted = report.deleted.len(), objects = report.objects,
                   folds = report.folds, "pruned");
    st.metrics.pruned("prune", &report);
    let mut disks: Vec<&String> = plan.iter().flat_map(|e| &e.disks).collect();
    disks.sort();
    disks.dedup();
    Ok(json!({
        "instance": uuid, "sink": name, "dry_run": false, "disks": disks,
        "plan": plan, "deleted": report.deleted, "objects": report.objects,
        "folds": report.folds, "bytes_reclaimed": report.bytes_reclaimed,
        "index_bytes_read": report.index_bytes_read,
        "index_bytes_written": report.index_bytes_written,
    }))
}

/// A sink's garbage now, as the hourly housekeeping collects it (unfinished uploads and
/// unreferenced objects older than `grace`, none covered by a live in-progress marker), then
/// with `compact` the sparse segments of every idle instance's disks, one disk a step.
async fn run_gc(
    st: &AppState,
    job: &Job,
    sink: &AnySink,
    name: &str,
    grace: Duration,
    compact: Option<Compaction>,
) -> JobResult {
    update(job, |s| s.phase = "collecting".into());
    let report = engine::catalog::collect_sink_garbage(sink, grace)
        .await
        .map_err(|e| (chain(&e), "sink"))?;
    st.metrics
        .reclaimed("gc", 0, report.objects.len(), report.bytes);
    tracing::info!(sink = %name, objects = report.objects.len(), bytes = report.bytes,
                   partials = report.partials, "garbage collected");
    // A collection runs to its end once started; a cancel meanwhile stops what follows.
    if compact.is_some() && job.cancel.load(Ordering::SeqCst) {
        return Err((
            format!(
                "cancelled after the collection ({} objects deleted), before compaction",
                report.objects.len()
            ),
            "cancelled",
        ));
    }
    let mut out = json!({
        "sink": name, "grace_secs": grace.as_secs(), "partials": report.partials,
        "objects": report.objects.len(), "bytes": report.bytes,
    });
    if let Some(c) = compact {
        out["compaction"] = compact_sink(st, job, sink, name, c).await?;
    }
    Ok(out)
}

/// Compacts every disk of sink `name` whose instance (`<uuid>.<target>`: the part before the
/// first dot) is idle, taking the instance meanwhile as a prune does: no fold of its disks
/// can run beside the rewrite. Busy disks are listed and left for another run. A cancel is
/// honoured between two disks.
async fn compact_sink(
    st: &AppState,
    job: &Job,
    s: &AnySink,
    name: &str,
    c: Compaction,
) -> JobResult {
    update(job, |s| s.phase = "compacting".into());
    let disks = engine::catalog::list_disks(s)
        .await
        .map_err(|e| (chain(&e), "sink"))?;
    let mut left = c.max_bytes;
    let mut total = engine::CompactReport::default();
    let mut busy = Vec::new();
    let n = disks.len() as u64;
    for (i, d) in disks.into_iter().enumerate() {
        steps(job, i as u64, n);
        if job.cancel.load(Ordering::SeqCst) {
            return Err((
                "cancelled between two disks' compactions".into(),
                "cancelled",
            ));
        }
        let instance = d.split_once('.').map_or(d.as_str(), |(u, _)| u).to_string();
        let Ok(_taken) = take_for_rewrite(st, &instance, name) else {
            busy.push(d);
            continue;
        };
        let opts = engine::CompactOptions {
            threshold: c.threshold,
            max_bytes: left,
            ..Default::default()
        };
        let r = engine::compact(s, &d, &opts)
            .await
            .map_err(|e| engine_err(&e))?;
        left = left.saturating_sub(r.bytes_copied);
        total.segments_rewritten += r.segments_rewritten;
        total.segments_written += r.segments_written;
        total.segments_left += r.segments_left;
        total.segments_locked += r.segments_locked;
        total.bytes_copied += r.bytes_copied;
        total.bytes_reclaimed += r.bytes_reclaimed;
        total.backups_rewritten += r.backups_rewritten;
    }
    steps(job, n, n);
    st.metrics.reclaimed(
        "compact",
        0,
        total.segments_rewritten,
        total.bytes_reclaimed,
    );
    tracing::info!(
        sink = name,
        segments = total.segments_rewritten,
        copied = total.bytes_copied,
        reclaimed = total.bytes_reclaimed,
        busy = busy.len(),
        "compacted"
    );
    let mut v = serde_json::to_value(&total).unwrap_or_default();
    v["busy_disks"] = json!(busy);
    Ok(v)
}

/// Object name of a backup's summary record (labels, consistency) on the sink.
pub fn record_name(uuid: &str, backup_id: &str) -> String {
    libcbt::format::layout::job_record_name(uuid, backup_id)
}

pub fn reason_name(r: &libcbt::format::FullReason) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

async fn run_verify(
    job: &Job,
    sink: &AnySink,
    backup_id: &str,
    uuid: &str,
    disks: &[String],
) -> JobResult {
    let mut out = Vec::new();
    let mut bad = 0;
    for (i, t) in disks.iter().enumerate() {
        update(job, |s| {
            s.phase = format!("verifying {t} ({}/{})", i + 1, disks.len())
        });
        let disk = job::libvirt_disk_id(uuid, t);
        let r = engine::verify_chain_with(
            sink,
            &disk,
            backup_id,
            &engine::VerifyOptions {
                cancel: Some(job.cancel.clone()),
            },
        )
        .await
        .map_err(|e| (chain(&e), "engine"))?;
        bad += r.problems.len();
        out.push(json!({
            "disk": disk, "backups": r.backups, "frames": r.frames, "bytes": r.bytes,
            "problems": r.problems.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>(),
        }));
    }
    if bad > 0 {
        return Err((format!("{bad} problem(s): {}", Value::Array(out)), "verify"));
    }
    Ok(json!({ "ok": true, "disks": out }))
}

/// What a restore created, journaled as it goes: recovery removes exactly these and nothing
/// else (a name someone else reused since is left alone).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RestoreLedger {
    /// The configured restore directory everything below is relative to.
    pub root: PathBuf,
    /// A directory we made for a staging copy.
    #[serde(default)]
    pub dir: Option<Made>,
    /// Files we made, in order.
    #[serde(default)]
    pub files: Vec<Made>,
    /// The staging domain: its UUID is chosen and journaled before it is defined.
    #[serde(default)]
    pub domain: Option<StagingDomain>,
    /// A live restore's copy.
    #[serde(default)]
    pub live: Option<LiveCopy>,
    /// The mount an instant or live copy reads (recorded to be served again after a restart):
    /// journaled before it is made, so that a roll-back forgets it too.
    #[serde(default)]
    pub mount: Option<String>,
}

/// A live restore's copy, journaled with its mount before the copy's domain starts.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LiveCopy {
    /// The mount id: the overlays' backing files are its sockets.
    pub mount: String,
    /// Disk targets of the copy.
    pub targets: Vec<String>,
    pub bandwidth_mib: u64,
    /// The domain runs on the mount: a restart serves the mount again and resumes the copy
    /// instead of removing the copy.
    pub running: bool,
}

/// Something a job made beneath the restore directory.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Made {
    pub rel: PathBuf,
    pub id: FileId,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StagingDomain {
    pub name: String,
    pub uuid: String,
}

/// A random RFC 4122 version 4 UUID.
pub fn new_uuid() -> String {
    use rand::{Rng, SeedableRng};
    let mut b: [u8; 16] = rand::rngs::SmallRng::from_entropy().gen();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Removes what `ledger` says a restore made, newest first, each only if it is still ours.
pub(crate) fn undo_restore(ledger: &RestoreLedger) -> Vec<String> {
    let mut gone = Vec::new();
    for m in ledger.files.iter().rev().chain(ledger.dir.iter()) {
        match safe_fs::remove_beneath(&ledger.root, &m.rel, m.id) {
            Ok(true) => gone.push(m.rel.display().to_string()),
            Ok(false) => {}
            Err(e) => tracing::warn!(path = %m.rel.display(), error = %e, "could not remove"),
        }
    }
    gone
}

async fn run_restore(
    st: &Arc<AppState>,
    job: &Arc<Job>,
    sink: &AnySink,
    backup_id: &str,
    uuid: &str,
    disks: &[String],
    target: RestoreTo,
) -> JobResult {
    let journal_plan = |ledger: &RestoreLedger| {
        let (j, id) = (st.journal.clone(), job.id.clone());
        let plan = serde_json::to_value(ledger).unwrap_or_default();
        async move {
            tokio::task::spawn_blocking(move || j.set_plan(&id, &plan))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
                .map_err(|e| (format!("journaling the restore plan: {e}"), "journal"))
        }
    };
    let progress = |disk: String| {
        let j = job.clone();
        move |p: engine::Progress| update(&j, |s| s.disk_progress(&disk, p.done, p.total))
    };
    let ropts = engine::RestoreOptions {
        cancel: Some(job.cancel.clone()),
        ..Default::default()
    };
    let work_dir = st.cfg.server.state_dir.join("restore-sockets");
    let private_dir = || -> Result<(), (String, &'static str)> {
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new().mode(0o700).create(&work_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err((format!("{}: {e}", work_dir.display()), "io")),
        }
    };
    match target {
        RestoreTo::File { root, rel, qcow2 } => {
            let t = &disks[0];
            let mut ledger = RestoreLedger {
                root: root.clone(),
                ..Default::default()
            };
            let created = blocking_io({
                let (root, rel) = (root.clone(), rel.clone());
                move || safe_fs::create_beneath(&root, &rel)
            })
            .await
            .map_err(|e| {
                (
                    format!("target.path {}: {e}", root.join(&rel).display()),
                    "io",
                )
            })?;
            ledger.files.push(Made {
                rel: rel.clone(),
                id: created.id,
            });
            if let Err(e) = journal_plan(&ledger).await {
                undo_restore(&ledger);
                return Err(e);
            }
            update(job, |s| s.phase = "restoring".into());
            let disk = job::libvirt_disk_id(uuid, t);
            let file = Arc::new(created.file);
            let target = if qcow2 {
                private_dir()?;
                RestoreTarget::Qcow2Opened {
                    file,
                    work_dir: work_dir.clone(),
                }
            } else {
                RestoreTarget::RawOpened(file)
            };
            let p = progress(disk.clone());
            let path = root.join(&rel);
            match engine::restore_with(sink, &disk, backup_id, &target, Some(&p), &ropts).await {
                Ok(s) => Ok(
                    json!({"disk": disk, "path": path, "bytes_written": s.bytes_written, "chain_len": s.chain_len}),
                ),
                Err(e) => {
                    undo_restore(&ledger);
                    Err((chain(&e), "engine"))
                }
            }
        }
        RestoreTo::Nbd { uri } => {
            let t = &disks[0];
            update(job, |s| s.phase = "restoring".into());
            let disk = job::libvirt_disk_id(uuid, t);
            let p = progress(disk.clone());
            let s = engine::restore_with(
                sink,
                &disk,
                backup_id,
                &RestoreTarget::Nbd(uri.clone()),
                Some(&p),
                &ropts,
            )
            .await
            .map_err(|e| (chain(&e), "engine"))?;
            Ok(
                json!({"disk": disk, "uri": uri, "bytes_written": s.bytes_written, "chain_len": s.chain_len}),
            )
        }
        RestoreTo::Domain {
            name,
            root,
            start,
            instant,
            live,
        } => {
            let src = st
                .libvirt()
                .await
                .ok_or(("libvirt is disabled or unreachable".to_string(), "libvirt"))?;
            let xml_obj = job::domain_xml_name(uuid, backup_id);
            let xml = sink
                .get(&xml_obj, 16 << 20)
                .await
                .map_err(|e| (format!("domain XML of the backup: {}", chain(&e)), "sink"))?;
            let xml = String::from_utf8_lossy(&xml).into_owned();
            let new_uuid = new_uuid();
            let mut ledger = RestoreLedger {
                root: root.clone(),
                domain: Some(StagingDomain {
                    name: name.clone(),
                    uuid: new_uuid.clone(),
                }),
                ..Default::default()
            };
            private_dir()?;
            // The staging directory must be searchable by QEMU's user; the images are
            // handed to it by libvirt's labelling.
            let dir_id = blocking_io({
                let (root, name) = (root.clone(), name.clone());
                move || safe_fs::mkdir_beneath(&root, Path::new(&name), 0o711)
            })
            .await
            .map_err(|e| (format!("{}: {e}", root.join(&name).display()), "io"))?;
            ledger.dir = Some(Made {
                rel: PathBuf::from(&name),
                id: dir_id,
            });
            journal_plan(&ledger).await.inspect_err(|_| {
                undo_restore(&ledger);
            })?;
            // An instant copy reads the backup through a mount of it, for the copy's life.
            let mount = if instant {
                update(job, |s| s.phase = "mounting".into());
                let sink_name = job.snapshot().sink;
                let of = crate::mounts::Of {
                    sink,
                    sink_name: &sink_name,
                    instance: uuid,
                    backup_id,
                    tenant: job.tenant.as_deref(),
                };
                let mount_id = new_job_id();
                ledger.mount = Some(mount_id.clone());
                journal_plan(&ledger).await.inspect_err(|_| {
                    undo_restore(&ledger);
                })?;
                match mount_for_qemu(st, &mount_id, &of, disks).await {
                    Ok(m) => Some(m),
                    Err(e) => {
                        undo_restore(&ledger);
                        return Err(e);
                    }
                }
            } else {
                None
            };
            // A live copy's mount is journaled with it: a restart serves it again (the same
            // sockets, which the overlays name) and resumes the copy.
            if let (Some(bw), Some(m)) = (live, &mount) {
                ledger.live = Some(LiveCopy {
                    mount: m.id.clone(),
                    targets: disks.to_vec(),
                    bandwidth_mib: bw,
                    running: false,
                });
                if let Err(e) = journal_plan(&ledger).await {
                    st.mounts.unmount(&m.id);
                    undo_restore(&ledger);
                    return Err(e);
                }
                // Not to be unmounted by hand from now on (the copy will need it).
                st.mounts.set_copying(&m.id, true);
            }
            let undo = |ledger: &RestoreLedger| {
                if let Some(m) = &mount {
                    st.mounts.set_copying(&m.id, false);
                    st.mounts.unmount(&m.id);
                }
                undo_restore(ledger)
            };
            let mut files = Vec::new();
            for t in disks {
                update(job, |s| s.phase = format!("restoring {t}"));
                let rel = Path::new(&name).join(format!("{t}.qcow2"));
                let created = match blocking_io({
                    let (root, rel) = (root.clone(), rel.clone());
                    move || safe_fs::create_beneath(&root, &rel)
                })
                .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        undo(&ledger);
                        return Err((format!("{}: {e}", root.join(&rel).display()), "io"));
                    }
                };
                ledger.files.push(Made {
                    rel: rel.clone(),
                    id: created.id,
                });
                journal_plan(&ledger).await.inspect_err(|_| {
                    undo(&ledger);
                })?;
                files.push(root.join(&rel));
                let disk = job::libvirt_disk_id(uuid, t);
                let p = progress(disk.clone());
                let target = RestoreTarget::Qcow2Opened {
                    file: Arc::new(created.file),
                    work_dir: work_dir.clone(),
                };
                if let Some(m) = &mount {
                    let Some(d) = m.disks.get(t) else {
                        undo(&ledger);
                        return Err((format!("the mount has no disk {t}"), "engine"));
                    };
                    let RestoreTarget::Qcow2Opened { file, .. } = &target else {
                        unreachable!("made above")
                    };
                    if let Err(e) = overlay(file, &d.uri, d.size).await {
                        undo(&ledger);
                        return Err((e, "io"));
                    }
                } else if let Err(e) =
                    engine::restore_with(sink, &disk, backup_id, &target, Some(&p), &ropts).await
                {
                    undo(&ledger);
                    return Err((chain(&e), "engine"));
                }
            }
            update(job, |s| s.phase = "defining".into());
            let restored: Vec<(String, PathBuf)> =
                disks.iter().cloned().zip(files.iter().cloned()).collect();
            // The copy's tenant is recorded in it, never derived again from its name.
            let built = match &job.tenant {
                Some(tenant) => crate::inventory::staging_domain_xml(
                    &xml,
                    &name,
                    &restored,
                    &lvs::xml::StagingMeta {
                        tenant: tenant.clone(),
                        source: uuid.to_string(),
                        backup: backup_id.to_string(),
                    },
                )
                .map_err(|e| e.to_string()),
                None => crate::inventory::staging_xml(&xml, &name, &restored),
            };
            let new_xml = built.map(|x| with_uuid(&x, &new_uuid)).map_err(|e| {
                undo(&ledger);
                (e, "xml")
            })?;
            // A live copy runs from its start on: a restart from here resumes it (or, if the
            // copy never started, leaves it as it is) instead of undoing it.
            if let Some(live) = &mut ledger.live {
                live.running = true;
                journal_plan(&ledger).await.inspect_err(|_| {
                    undo(&ledger);
                })?;
            }
            let (n2, u2) = (name.clone(), new_uuid.clone());
            let r = blocking(move || {
                let d = src.define(&new_xml)?;
                if start {
                    if let Err(e) = d.start() {
                        let _ = d.undefine();
                        tracing::warn!(domain = %n2, "staging copy defined but would not start");
                        return Err(e);
                    }
                }
                let got = d.describe()?.uuid;
                if !got.eq_ignore_ascii_case(&u2) {
                    tracing::error!(domain = %n2, want = %u2, got = %got, "libvirt gave another UUID");
                }
                Ok(got)
            })
            .await;
            match r {
                Ok(new_uuid) => {
                    let mut out =
                        json!({"domain": name, "uuid": new_uuid, "files": files, "started": start});
                    if let Some(m) = &mount {
                        out["mount"] = json!(m.id);
                    }
                    // The copy itself runs after the job gave back its slots (see `run`).
                    if let (Some(live), Some(m)) = (&ledger.live, &mount) {
                        out["copy"] = json!(LiveParams {
                            mount: m.id.clone(),
                            domain_uuid: new_uuid,
                            targets: disks.to_vec(),
                            bandwidth_mib: live.bandwidth_mib,
                        });
                    }
                    Ok(out)
                }
                Err(e) => {
                    undo(&ledger);
                    Err((chain(&e), "libvirt"))
                }
            }
        }
    }
}

/// A mount of `disks` of the backup whose sockets QEMU's user may open (see
/// [`crate::mounts`]); taken like a restore's read: refused while a rewrite of the instance
/// runs, and no rewrite runs while it lasts.
pub(crate) async fn mount_for_qemu(
    st: &AppState,
    id: &str,
    of: &crate::mounts::Of<'_>,
    disks: &[String],
) -> Result<crate::mounts::MountView, (String, &'static str)> {
    let user = &st.cfg.libvirt.qemu_user;
    let owner = user_ids(user).ok_or_else(|| {
        (
            format!("libvirt.qemu_user {user:?} is not in /etc/passwd"),
            "config",
        )
    })?;
    let reading = st
        .mounts
        .mark(id, of.instance, of.sink_name)
        .map_err(|e| (e.to_string(), "refused"))?;
    if st.jobs.rewriting(of.instance) {
        return Err((
            "a deletion, prune or compaction of this instance's backups runs".into(),
            "refused",
        ));
    }
    st.mounts
        .mount(
            &st.cfg.server.state_dir,
            id,
            reading,
            of,
            disks,
            Some(owner),
        )
        .await
        .map_err(|e| (chain(&e), "engine"))
}

/// How often a live copy looks at its block jobs.
const LIVE_POLL: Duration = Duration::from_millis(500);
/// Block pulls of one disk that may end (or fail to start) without its copy before a live
/// copy gives up; the pauses before each new pull double from one second.
const LIVE_RETRIES: u32 = 5;
/// Looks at libvirt in a row that may fail (libvirtd restarting) before a live copy gives up.
const LIVE_WATCH_ERRORS: u32 = 60;

/// What a live restore's copy needs: journaled in the job's plan ([`LiveCopy`], with the
/// domain), handed from the restore to its copy phase.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct LiveParams {
    pub mount: String,
    pub domain_uuid: String,
    pub targets: Vec<String>,
    pub bandwidth_mib: u64,
}

/// How a live copy stopped short.
pub(crate) enum LiveStop {
    Failed(String),
    /// The daemon stops: the pulls go on inside QEMU, the job's row stays open, and the next
    /// start serves the mount again and resumes the copy.
    Shutdown,
}

/// The copy phase of a live restore (`job` runs, without slots): [`live_copy`], then the
/// job's end. `out` is the restore's result so far.
pub(crate) async fn live_phase(st: &AppState, job: &Job, copy: &LiveParams, mut out: Value) {
    st.metrics.jobs_running.inc();
    update(job, |s| {
        s.state = JobState::Running;
        s.phase = "copying".into();
    });
    let r = live_copy(st, copy, job).await;
    st.metrics.jobs_running.dec();
    match r {
        Ok(v) => {
            out["mount"] = Value::Null;
            out["live"] = v;
            finish(st, job, JobState::Succeeded, None, Some(out)).await
        }
        Err(LiveStop::Shutdown) => {
            // In this life only: the journal keeps the job running for the next start.
            update(job, |s| {
                s.state = JobState::Interrupted;
                s.phase = "copy resumed at the next start".into();
            });
        }
        Err(LiveStop::Failed(e)) => {
            let state = if job.cancel.load(Ordering::SeqCst) {
                JobState::Cancelled
            } else {
                st.metrics.error("copy");
                JobState::Failed
            };
            tracing::warn!(job = %job.id, error = %e, %state, "live copy ended");
            finish(st, job, state, Some(e), None).await
        }
    }
}

/// Copies each disk of the running staging domain of `copy` from its mount (its qcow2
/// overlays' backing files) into the overlays, by libvirt's block pull (QEMU `block-stream`,
/// which copies only what the overlay does not hold yet: the guest's own writes stay), at most
/// `bandwidth_mib` MiB/s per disk (0: no limit). A pull that ends without its copy (a read
/// error of the export) is started again after a pause, up to [`LIVE_RETRIES`] times per disk.
/// Once every disk has dropped its backing file, the mount is released.
///
/// Cancelled through `job`, the pulls stop and the domain runs on, reading the rest from the
/// mount, which stays (and may then be unmounted). Progress goes to `job`.
pub(crate) async fn live_copy(
    st: &AppState,
    copy: &LiveParams,
    job: &Job,
) -> Result<Value, LiveStop> {
    let t0 = Instant::now();
    st.mounts.set_copying(&copy.mount, true);
    let r = live_copy_loop(st, copy, job).await;
    if !matches!(r, Err(LiveStop::Shutdown)) {
        st.mounts.set_copying(&copy.mount, false);
    }
    let restarts = r?;
    // Every overlay holds its whole disk: the export is no longer read.
    st.mounts.unmount(&copy.mount);
    tracing::info!(domain = %copy.domain_uuid, mount = %copy.mount, secs = t0.elapsed().as_secs_f64(), "live copy done; mount released");
    Ok(
        json!({"copied": copy.targets, "secs": t0.elapsed().as_secs_f64(),
              "pulls_restarted": restarts, "mount_released": copy.mount}),
    )
}

/// What one look at the domain saw: each pending disk's block job, and whether the disk
/// still reads from the mount; `None` when the domain no longer runs.
type Seen = Option<Vec<(String, Option<(u64, u64)>, bool)>>;

async fn live_copy_loop(st: &AppState, copy: &LiveParams, job: &Job) -> Result<u32, LiveStop> {
    let failed = |m: String| LiveStop::Failed(m);
    let mount = &copy.mount;
    let mut pending: Vec<String> = copy.targets.clone();
    // Per disk: pulls started, and when the next may start.
    let mut tries: HashMap<String, (u32, Instant)> = HashMap::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut watch_errors = 0u32;
    loop {
        if st.shutting_down.load(Ordering::SeqCst) {
            return Err(LiveStop::Shutdown);
        }
        let cancel = job.cancel.load(Ordering::SeqCst);
        let seen = match st.libvirt().await {
            None => Err("libvirt is unreachable".to_string()),
            Some(src) => {
                let (u, m, ts) = (copy.domain_uuid.clone(), mount.clone(), pending.clone());
                blocking(move || -> Result<Seen, lvs::LibvirtError> {
                    let d = src.domain_by_uuid(&u)?;
                    if !d.is_active()? {
                        return Ok(None);
                    }
                    let mut jobs = Vec::new();
                    for t in &ts {
                        if cancel {
                            let _ = d.block_job_abort(t);
                        }
                        jobs.push(d.block_job(t)?);
                    }
                    let xml = d.xml()?;
                    // `xml` is the inactive definition if the domain stopped meanwhile.
                    if !d.is_active()? {
                        return Ok(None);
                    }
                    Ok(Some(
                        ts.iter()
                            .zip(jobs)
                            .map(|(t, j)| {
                                let backed = xml.contains(&format!("/mounts/{m}/{t}.sock"));
                                (t.clone(), j, backed)
                            })
                            .collect(),
                    ))
                })
                .await
                .map_err(|e| chain(&e))
            }
        };
        let seen = match seen {
            Ok(s) => {
                watch_errors = 0;
                s
            }
            Err(e) => {
                watch_errors += 1;
                if watch_errors > LIVE_WATCH_ERRORS {
                    return Err(failed(format!(
                        "watching the copy: {e}; the domain runs on, reading from mount {mount}"
                    )));
                }
                tracing::warn!(error = %e, "watching the live copy; trying again");
                tokio::time::sleep(LIVE_POLL).await;
                continue;
            }
        };
        let Some(disks) = seen else {
            return Err(failed(format!(
                "the domain stopped before its copy ended; its disks still read from mount {mount}"
            )));
        };
        if cancel {
            return Err(failed(format!(
                "cancelled: the copy stopped; the domain runs on, reading the rest from mount {mount}"
            )));
        }
        let mut next = Vec::new();
        for (t, info, backed) in disks {
            match info {
                Some((cur, end)) => {
                    last.insert(t.clone(), end);
                    update(job, |s| s.disk_progress(&t, cur, end));
                    next.push(t);
                }
                None if !backed => {
                    if let Some(&end) = last.get(&t) {
                        update(job, |s| s.disk_progress(&t, end, end));
                    }
                    tracing::info!(target = %t, "live copy of the disk done");
                }
                None => {
                    let (n, at) = tries.get(&t).copied().unwrap_or((0, Instant::now()));
                    next.push(t.clone());
                    if Instant::now() < at {
                        continue;
                    }
                    if n > LIVE_RETRIES {
                        return Err(failed(format!(
                            "the copy of {t} ended {n} times without finishing; the domain runs on, reading from mount {mount}"
                        )));
                    }
                    if n > 0 {
                        tracing::warn!(target = %t, "block pull ended before its copy; starting it again");
                    }
                    let started = match st.libvirt().await {
                        None => Err("libvirt is unreachable".to_string()),
                        Some(src) => {
                            let (u, t2, bw) =
                                (copy.domain_uuid.clone(), t.clone(), copy.bandwidth_mib);
                            blocking(move || src.domain_by_uuid(&u)?.block_pull(&t2, bw))
                                .await
                                .map_err(|e| chain(&e))
                        }
                    };
                    if let Err(e) = started {
                        tracing::warn!(target = %t, error = %e, "starting the block pull; trying again");
                    }
                    // The next pull (if this one ends early or did not start) waits 1, 2, 4 … s.
                    let pause = Duration::from_secs(1 << n.min(6));
                    tries.insert(t.clone(), (n + 1, Instant::now() + pause));
                }
            }
        }
        if next.is_empty() {
            return Ok(tries.values().map(|(n, _)| n.saturating_sub(1)).sum());
        }
        pending = next;
        tokio::time::sleep(LIVE_POLL).await;
    }
}

/// uid and primary gid of local user `name`, from /etc/passwd.
pub(crate) fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        match f.as_slice() {
            [n, _, uid, gid, ..] if *n == name => Some((uid.parse().ok()?, gid.parse().ok()?)),
            _ => None,
        }
    })
}

/// Makes `file` (new, empty, ours) a qcow2 overlay of `size` bytes whose backing file is the
/// raw NBD export `uri`; the backing file is not opened here (QEMU opens it when the copy
/// starts).
async fn overlay(file: &Arc<std::fs::File>, uri: &str, size: u64) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd());
    let out = tokio::process::Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", uri, &path,
        ])
        .arg(size.to_string())
        .output()
        .await
        .map_err(|e| format!("qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img create of the overlay: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// `xml` (a domain without `<uuid>`) with `<uuid>` set right after `<name>`.
fn with_uuid(xml: &str, uuid: &str) -> String {
    match xml.find("</name>") {
        Some(i) => {
            let at = i + "</name>".len();
            format!("{}<uuid>{uuid}</uuid>{}", &xml[..at], &xml[at..])
        }
        None => xml.to_string(),
    }
}

/// Runs blocking file-system work off the runtime.
pub(crate) async fn blocking_io<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}
