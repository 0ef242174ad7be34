//! Recovery after a crash, and housekeeping: what an interrupted job left behind is brought
//! back to a consistent state from its journal row before the daemon serves requests; old
//! journal rows and sink garbage are collected hourly.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libcbt::engine::catalog;
use libcbt::format::BackupId;
use libcbt::job;
use libcbt::sink::any::AnySink;
use libcbt::sink::Sink;
use libcbt::source::libvirt::blocking;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::journal::{JobKind, JobRow, JobState, Journal};
use crate::run::{chain, record_name, undo_restore, RestoreLedger};
use crate::state::AppState;

/// Now and every hour while the daemon runs: drops jobs that ended more than
/// `limits.journal_retention_days` ago from the journal, and collects the garbage of every
/// configured sink (see [`collect_sink_garbage`]).
pub fn start_housekeeping(st: &Arc<AppState>) {
    let st = st.clone();
    tokio::spawn(async move {
        loop {
            if st.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            for s in &st.cfg.sinks {
                if let Err(e) = collect_sink_garbage(&st, &s.name).await {
                    tracing::error!(sink = %s.name, error = %e, "garbage collection failed");
                }
            }
            let keep_ms = i64::try_from(st.cfg.limits.journal_retention_days)
                .unwrap_or(i64::MAX / 86_400_000)
                .saturating_mul(86_400_000);
            let before = Journal::now_ms().saturating_sub(keep_ms);
            let j = st.journal.clone();
            match tokio::task::spawn_blocking(move || j.prune_finished(before)).await {
                Ok(Ok(n)) if n > 0 => tracing::info!(jobs = n, "old jobs dropped from the journal"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "pruning the journal failed"),
                Err(e) => tracing::error!(error = %e, "pruning the journal failed"),
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    });
}

/// Garbage collection of one sink, safe with other writers (this daemon's jobs, other hosts
/// sharing the sink): temporary files and unreferenced objects older than
/// `limits.gc_grace_secs` and not covered by a live in-progress marker (a running backup
/// renews its marker, so it may outlast the grace period).
pub async fn collect_sink_garbage(st: &Arc<AppState>, name: &str) -> Result<usize, String> {
    let grace = Duration::from_secs(st.cfg.limits.gc_grace_secs);
    let sink = match st.sink(name).await {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(0),
        Err(e) => return Err(chain(&e)),
    };
    let r = catalog::collect_sink_garbage(&sink, grace)
        .await
        .map_err(|e| chain(&e))?;
    st.metrics.reclaimed("gc", 0, r.objects.len(), r.bytes);
    Ok(usize::try_from(r.partials)
        .unwrap_or(usize::MAX)
        .saturating_add(r.objects.len()))
}

/// Brings what an interrupted job left behind back to a consistent state. Called for every
/// journaled job still queued, running or recovering when the daemon starts, before it serves
/// requests.
///
/// A recovery that cannot finish now (libvirt unreachable, a libvirt call failing) does not
/// close the row: it stays `recovering`, the instance stays claimed (no new backup of it), and
/// the recovery is retried in the background with backoff until it settles. Returns the state
/// the row has now.
pub async fn reconcile(st: &Arc<AppState>, row: &JobRow) -> JobState {
    match reconcile_once(st, row).await {
        Some(state) => state,
        None => {
            let claim = st.jobs.claim(&row.instance).ok();
            let (st, row) = (st.clone(), row.clone());
            tokio::spawn(async move {
                let _claim = claim;
                let mut delay = Duration::from_secs(2);
                loop {
                    tokio::time::sleep(delay).await;
                    if st.shutting_down.load(Ordering::SeqCst) {
                        return;
                    }
                    if reconcile_once(&st, &row).await.is_some() {
                        return;
                    }
                    delay = (delay * 2).min(RECOVERY_BACKOFF_MAX);
                }
            });
            JobState::Recovering
        }
    }
}

/// What a backup job journals for its recovery, before the step it covers: `Starting` before
/// libvirt's backupBegin (a checkpoint and a job may outlive us), `Copying` before the first
/// byte is copied. Stored as JSON (`{"phase": "copying", "disks": […], "started_paused": b}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub(crate) enum BackupPlan {
    Starting,
    Copying {
        /// Disk ids on the sink this backup commits.
        disks: Vec<String>,
        /// The domain was started paused for the backup and is to be destroyed again.
        started_paused: bool,
    },
}

/// What a recovery found: the job had in fact committed everything, or was rolled back (how).
#[derive(Debug)]
enum Recovered {
    Committed,
    RolledBack(String),
    /// The job goes on in the background (a live restore's copy) and closes its row itself.
    Resumed,
}

impl From<&str> for Recovered {
    fn from(s: &str) -> Self {
        Recovered::RolledBack(s.into())
    }
}

impl From<String> for Recovered {
    fn from(s: String) -> Self {
        Recovered::RolledBack(s)
    }
}

/// The longest pause between two tries of a recovery.
const RECOVERY_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// One try: `Some(state)` once the row is closed, `None` when it is to be tried again.
async fn reconcile_once(st: &Arc<AppState>, row: &JobRow) -> Option<JobState> {
    let outcome = match row.kind {
        JobKind::Backup => reconcile_backup(st, row).await,
        JobKind::Restore => reconcile_restore(st, row).await,
        JobKind::Verify => Ok(Recovered::RolledBack(
            "a verification writes nothing".into(),
        )),
        // Every step of a prune (a fold, a deletion) and of a collection or compaction is
        // complete on its own and leaves every backup whole; what a step that died left is
        // swept by the next prune or collection.
        JobKind::Prune => Ok(Recovered::RolledBack(
            "every backup is whole; the same prune run again finishes it".into(),
        )),
        JobKind::Gc => Ok(Recovered::RolledBack(
            "every backup is whole; the next collection finishes it".into(),
        )),
    };
    tracing::info!(job = %row.id, outcome = ?outcome, "reconciliation");
    let (state, error) = match outcome {
        Ok(Recovered::Resumed) => return Some(JobState::Running),
        Ok(Recovered::Committed) => (JobState::Succeeded, None),
        Ok(Recovered::RolledBack(s)) => (
            JobState::Interrupted,
            Some(format!("interrupted by a daemon restart; {s}")),
        ),
        Err(e) => {
            tracing::warn!(job = %row.id, error = %e, "recovery not finished; will retry");
            let (j, id) = (st.journal.clone(), row.id.clone());
            let msg = format!("recovery pending: {e}");
            let _ = tokio::task::spawn_blocking(move || {
                j.set_state(&id, JobState::Recovering, Some(&msg), None)
            })
            .await;
            return None;
        }
    };
    let (j, id) = (st.journal.clone(), row.id.clone());
    let r =
        tokio::task::spawn_blocking(move || j.set_state(&id, state, error.as_deref(), None)).await;
    if !matches!(r, Ok(Ok(()))) {
        tracing::error!(job = %row.id, "journaling the recovery's outcome failed; will retry");
        return None;
    }
    st.metrics.job_ended(row.kind.as_str(), state.as_str());
    tracing::info!(job = %row.id, kind = %row.kind, state = %state, "reconciled");
    Some(state)
}

async fn reconcile_backup(st: &Arc<AppState>, row: &JobRow) -> Result<Recovered, String> {
    let quiesced = row
        .request
        .get("quiesce")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // Whatever else waits, a guest frozen by the dead daemon is thawed first.
    let src = if st.cfg.libvirt.enabled {
        let src = st
            .libvirt()
            .await
            .ok_or("libvirt is unreachable: its checkpoint, job and guest are still to settle")?;
        if quiesced {
            let (s2, u2) = (src.clone(), row.instance.clone());
            let _ = blocking(move || {
                if let Ok(dom) = s2.domain_by_uuid(&u2) {
                    if dom.is_active()? {
                        let _ = dom.thaw();
                    }
                }
                Ok(())
            })
            .await;
        }
        Some(src)
    } else {
        None
    };
    let sink = match st.sink(&row.sink).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Ok("its sink is no longer configured; nothing on it was touched".into())
        }
        // Kept pending: retried with backoff until the sink answers.
        Err(e) => return Err(chain(&e)),
    };
    let uuid = row.instance.clone();
    let prefix = format!("{uuid}.");
    let disks: Vec<String> = catalog::disks_with_objects(&sink)
        .await
        .map_err(|e| chain(&e))?
        .into_iter()
        .filter(|d| d.starts_with(&prefix))
        .collect();
    // This job's commits: its id, begun after the job was submitted (an older backup of the
    // same id, which the job was refused for, is not this job's to roll back).
    let since = u64::try_from(row.created_ms).unwrap_or(0);
    let mut committed = Vec::new();
    for d in &disks {
        if catalog::read_manifest(&sink, d, &row.backup_id)
            .await
            .map_err(|e| chain(&e))?
            .is_some_and(|m| m.started_unix_ms >= since)
        {
            committed.push(d.clone());
        }
    }
    let plan: Option<BackupPlan> = row
        .plan
        .clone()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| format!("journaled backup plan: {e}"))?;
    let (planned, started_paused) = match &plan {
        Some(BackupPlan::Copying {
            disks,
            started_paused,
        }) => (disks.clone(), *started_paused),
        _ => (Vec::new(), false),
    };
    let complete = !planned.is_empty() && planned.iter().all(|d| committed.contains(d));
    // Killed inside backupBegin: libvirtd finishes the call on its own, maybe after we are
    // back. Give it a moment to leave its checkpoint and job where we can see them.
    let in_begin = matches!(plan, Some(BackupPlan::Starting));
    let checkpoint = BackupId::parse(&row.backup_id)
        .map_err(|e| format!("journaled {e}"))?
        .checkpoint();
    let scratch = st.cfg.server.scratch().join(&uuid);

    if !complete {
        for d in &committed {
            catalog::forget_backup(&sink, d, &row.backup_id)
                .await
                .map_err(|e| chain(&e))?;
        }
        for name in [
            job::domain_xml_name(&uuid, &row.backup_id),
            record_name(&uuid, &row.backup_id),
        ] {
            delete_if_written_since(&sink, &name, since).await;
        }
    }
    // What a backup of this instance still needs: the newest backups' checkpoints.
    let mut keep = std::collections::BTreeSet::new();
    for d in &disks {
        if let Some(m) = catalog::latest(&sink, d).await.map_err(|e| chain(&e))? {
            keep.extend(m.checkpoint);
        }
        // What this job wrote (its in-progress marker names it), whatever its age; then what
        // others left, past the grace period and not covered by a live marker.
        catalog::abandon_backup(&sink, d, &row.backup_id)
            .await
            .map_err(|e| chain(&e))?;
        catalog::collect_garbage(&sink, d, Duration::from_secs(st.cfg.limits.gc_grace_secs))
            .await
            .map_err(|e| chain(&e))?;
    }
    if let Some(src) = src {
        let (u2, cp, scr) = (uuid.clone(), checkpoint.clone(), scratch.clone());
        let r = blocking(move || {
            let Ok(dom) = src.domain_by_uuid(&u2) else {
                return Ok(()); // domain gone: nothing of ours left in libvirt
            };
            if quiesced && dom.is_active()? {
                // A freeze the dead daemon could not end must not outlive it.
                let _ = dom.thaw();
            }
            if in_begin && dom.is_active()? {
                // Settled when the begin has visibly finished (checkpoint and a readable
                // job), or when no job has shown up for 3 s.
                let t = Instant::now();
                loop {
                    let job = dom.job_active()?;
                    let cp_there = dom.checkpoints()?.iter().any(|c| c.name == cp);
                    let settled = if job {
                        cp_there && dom.backup_socket().is_ok()
                    } else {
                        cp_there || t.elapsed() > Duration::from_secs(3)
                    };
                    if settled || t.elapsed() > Duration::from_secs(60) {
                        tracing::info!(
                            job,
                            cp_there,
                            waited_ms = t.elapsed().as_millis() as u64,
                            "backupBegin settled"
                        );
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            // The job outlives a killed daemon; it is ours if its socket is in our scratch.
            if dom.is_active()? && dom.job_active()? {
                if let Ok(x) = dom.backup_socket() {
                    if x.starts_with(&scr) {
                        dom.end_backup_job()?;
                    }
                }
            }
            if complete {
                dom.retire_checkpoints(&keep)?;
            } else if dom.checkpoints()?.iter().any(|c| c.name == cp) {
                dom.delete_checkpoint(&cp)?;
            }
            if started_paused && dom.is_active()? && dom.is_paused()? {
                dom.destroy()?;
            }
            Ok(())
        })
        .await;
        r.map_err(|e| chain(&e))?;
    }
    let _ = std::fs::remove_dir_all(scratch.join(&row.backup_id));
    Ok(if complete {
        Recovered::Committed
    } else {
        Recovered::RolledBack(format!(
            "rolled back ({} disk(s) had committed, removed)",
            committed.len()
        ))
    })
}

async fn reconcile_restore(st: &Arc<AppState>, row: &JobRow) -> Result<Recovered, String> {
    let Some(plan) = &row.plan else {
        return Ok("nothing was written".into());
    };
    let ledger: RestoreLedger =
        serde_json::from_value(plan.clone()).map_err(|e| format!("journaled restore plan: {e}"))?;
    if let (Some(live), Some(d)) = (&ledger.live, &ledger.domain) {
        if live.running {
            return resume_live_copy(st, row, live, &d.uuid).await;
        }
    }
    if let Some(d) = &ledger.domain {
        // Only the domain with the UUID we chose: a name may have been taken since.
        let src = st
            .libvirt()
            .await
            .ok_or("libvirt is unreachable; the staging domain is still to be removed")?;
        let u = d.uuid.clone();
        blocking(move || {
            if let Ok(dom) = src.domain_by_uuid(&u) {
                let _ = dom.destroy();
                dom.undefine()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| chain(&e))?;
    }
    // The copy's mount goes with it (it is not served again: nothing reads it).
    for m in ledger
        .mount
        .iter()
        .chain(ledger.live.as_ref().map(|l| &l.mount))
    {
        st.mounts.unmount(m);
        st.journal
            .delete_mount(m)
            .map_err(|e| format!("forgetting mount {m}: {e}"))?;
    }
    let gone = tokio::task::spawn_blocking(move || undo_restore(&ledger))
        .await
        .map_err(|e| e.to_string())?;
    Ok(format!("partial restore output removed ({} item(s))", gone.len()).into())
}

/// A live restore whose copy ran when the daemon stopped: its domain runs on, reading what
/// is not copied yet from the mount's sockets (QEMU's NBD client connects again at its next
/// read). The mount is served again under the same id (the same sockets), and the copy goes
/// on in the background (a block pull copies only what the overlays lack); the job stays
/// `running` until it ends. A copy whose domain no longer runs is not resumed.
async fn resume_live_copy(
    st: &Arc<AppState>,
    row: &JobRow,
    live: &crate::run::LiveCopy,
    dom_uuid: &str,
) -> Result<Recovered, String> {
    let src = st
        .libvirt()
        .await
        .ok_or("libvirt is unreachable; the live copy is still to be resumed")?;
    let u = dom_uuid.to_string();
    let running = blocking(move || match src.domain_by_uuid(&u) {
        Ok(d) => d.is_active(),
        Err(_) => Ok(false),
    })
    .await
    .map_err(|e| chain(&e))?;
    if !running {
        return Ok(format!(
            "the live copy's domain no longer runs; its disks need backup {} mounted again",
            row.backup_id
        )
        .into());
    }
    let sink = st
        .sink(&row.sink)
        .await
        .map_err(|e| format!("sink {}: {}", row.sink, chain(&e)))?
        .ok_or_else(|| format!("sink {} is no longer configured", row.sink))?;
    let of = crate::mounts::Of {
        sink: &sink,
        sink_name: &row.sink,
        instance: &row.instance,
        backup_id: &row.backup_id,
        tenant: row.tenant.as_deref(),
    };
    // Served again already (by `mounts::serve_recorded`, when this recovery is a retry), or
    // being served again: reused, or waited for.
    if st.mounts.get(&live.mount).is_none() {
        if st.mounts.is_pending(&live.mount) {
            return Err(format!("mount {} is not served again yet", live.mount));
        }
        crate::run::mount_for_qemu(st, &live.mount, &of, &live.targets)
            .await
            .map_err(|(e, _)| format!("serving mount {} again: {e}", live.mount))?;
    }
    st.mounts.set_copying(&live.mount, true);
    tracing::info!(job = %row.id, mount = %live.mount, "live copy resumed");
    // The job lives again in this daemon: its progress shows, and it can be cancelled.
    let (j, id) = (st.journal.clone(), row.id.clone());
    let _ =
        tokio::task::spawn_blocking(move || j.set_state(&id, JobState::Running, None, None)).await;
    let mut status = crate::registry::JobStatus::from_row(row);
    status.state = JobState::Running;
    status.phase = "copying".into();
    let job = Arc::new(crate::registry::Job::new(status));
    st.jobs.insert(job.clone());
    let copy = crate::run::LiveParams {
        mount: live.mount.clone(),
        domain_uuid: dom_uuid.to_string(),
        targets: live.targets.clone(),
        bandwidth_mib: live.bandwidth_mib,
    };
    let st2 = st.clone();
    tokio::spawn(async move {
        let out = json!({"uuid": copy.domain_uuid, "mount": copy.mount, "resumed": true});
        crate::run::live_phase(&st2, &job, &copy, out).await;
    });
    Ok(Recovered::Resumed)
}

/// Deletes object `name` if it was written at or after `since_ms` (by the job being
/// reconciled, not by an older job that used the name).
async fn delete_if_written_since(sink: &AnySink, name: &str, since_ms: u64) {
    let since = std::time::UNIX_EPOCH + Duration::from_millis(since_ms);
    let ours = sink.list(name).await.ok().is_some_and(|l| {
        l.iter()
            .any(|o| o.name == name && o.modified.is_some_and(|m| m >= since))
    });
    if ours {
        let _ = sink.delete(name).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_plans_keep_their_journal_format() {
        let p = BackupPlan::Copying {
            disks: vec!["u.vda".into()],
            started_paused: true,
        };
        let v = serde_json::to_value(&p).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"phase": "copying", "disks": ["u.vda"], "started_paused": true})
        );
        assert_eq!(serde_json::from_value::<BackupPlan>(v).expect("back"), p);
        assert_eq!(
            serde_json::from_value::<BackupPlan>(serde_json::json!({"phase": "starting"}))
                .expect("starting"),
            BackupPlan::Starting
        );
        assert!(serde_json::from_value::<BackupPlan>(serde_json::json!({"phase": "x"})).is_err());
    }
}
