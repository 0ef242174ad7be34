//! The registry of this daemon's jobs: what clients see of them, the queue, the per-tenant
//! and per-host slots and the per-instance claims. Running them is [`crate::run`]; their
//! recovery after a crash is [`crate::recover`]. Nothing here knows the daemon's state.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libcbt::engine::PruneEntry;
use libcbt::format::BackupId;
use libcbt::source::qemu::Requested;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::journal::{JobKind, JobRow, JobState};

/// What a client sees of a job.
#[derive(Debug, Clone, Serialize, Default)]
pub struct JobStatus {
    pub id: String,
    pub kind: JobKind,
    pub state: JobState,
    pub phase: String,
    pub tenant: Option<String>,
    pub instance: String,
    pub sink: String,
    pub backup_id: String,
    pub disks: BTreeMap<String, DiskStatus>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub rate_bytes_per_sec: u64,
    pub consistency: Option<String>,
    pub freeze_ms: Option<u64>,
    pub warnings: Vec<String>,
    /// A prune's or a collection's steps (folds, deletions, disks compacted): done, in all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps_done: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps_total: Option<u64>,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    pub error: Option<String>,
    pub result: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct DiskStatus {
    pub level: Option<String>,
    pub full_reason: Option<String>,
    pub done: u64,
    pub total: u64,
    /// The backups of the chain this one now stands for, when `max_chain` made it a
    /// synthetic full.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synthetic_full_of: Option<usize>,
}

impl JobStatus {
    /// Records one disk's progress and the job's totals.
    pub(crate) fn disk_progress(&mut self, disk: &str, done: u64, total: u64) {
        let d = self.disks.entry(disk.to_string()).or_default();
        d.done = done;
        d.total = total;
        self.bytes_done = self.disks.values().map(|d| d.done).sum();
        self.bytes_total = self.disks.values().map(|d| d.total).sum();
    }

    pub fn terminal(&self) -> bool {
        !self.state.is_active()
    }

    pub fn from_row(r: &JobRow) -> JobStatus {
        JobStatus {
            id: r.id.clone(),
            kind: r.kind,
            state: r.state,
            phase: String::new(),
            tenant: r.tenant.clone(),
            instance: r.instance.clone(),
            sink: r.sink.clone(),
            backup_id: r.backup_id.clone(),
            created_ms: r.created_ms,
            finished_ms: r.finished_ms,
            error: r.error.clone(),
            result: r.result.clone(),
            ..Default::default()
        }
    }
}

/// A job of this daemon's life.
pub struct Job {
    pub id: String,
    pub tenant: Option<String>,
    pub status: watch::Sender<JobStatus>,
    /// The job's one cancellation flag, shared with the engine.
    pub cancel: Arc<AtomicBool>,
    /// Wakes a queued job when it is cancelled (no polling).
    cancel_wake: Notify,
}

impl Job {
    /// A queued job of `status`.
    pub fn new(status: JobStatus) -> Job {
        Job {
            id: status.id.clone(),
            tenant: status.tenant.clone(),
            status: watch::Sender::new(status),
            cancel: Arc::new(AtomicBool::new(false)),
            cancel_wake: Notify::new(),
        }
    }

    pub fn snapshot(&self) -> JobStatus {
        self.status.borrow().clone()
    }

    /// Asks the job to stop; a queued job ends at once, a running one at its next check.
    pub fn request_cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.cancel_wake.notify_waiters();
    }

    /// Returns once the job is cancelled: woken by [`Job::request_cancel`]; a slow poll
    /// catches a flag set directly.
    pub async fn cancelled(&self) {
        loop {
            let woken = self.cancel_wake.notified();
            if self.cancel.load(Ordering::SeqCst) {
                return;
            }
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// A running job's place: one slot of its tenant, one of the host.
pub type Slots = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// What to run.
#[derive(Debug, Clone)]
pub enum Work {
    Backup {
        backup_id: BackupId,
        domain_uuid: String,
        disks: Option<Vec<String>>,
        requested: Requested,
        quiesce: Option<Duration>,
        labels: BTreeMap<String, String>,
        /// A consistency group holds the guest around the point in time: the job takes its
        /// slots after it (the hold cannot wait in the queue).
        group: Option<Arc<crate::groups::Group>>,
    },
    Restore {
        backup_id: BackupId,
        domain_uuid: String,
        disks: Vec<String>,
        target: RestoreTo,
    },
    Verify {
        backup_id: BackupId,
        domain_uuid: String,
        disks: Vec<String>,
    },
    /// What a prune plan lets go of an instance's backups.
    Prune {
        domain_uuid: String,
        plan: Vec<PruneEntry>,
    },
    /// A sink's garbage older than `grace`, then (with `compact`) its sparse segments.
    Gc {
        grace: Duration,
        compact: Option<Compaction>,
    },
}

/// How a collection compacts: a segment whose live fraction is under `threshold` is
/// rewritten, `max_bytes` live bytes copied at most over all disks.
#[derive(Debug, Clone, Copy)]
pub struct Compaction {
    pub threshold: f64,
    pub max_bytes: u64,
}

impl Work {
    pub fn kind(&self) -> JobKind {
        match self {
            Work::Backup { .. } => JobKind::Backup,
            Work::Restore { .. } => JobKind::Restore,
            Work::Verify { .. } => JobKind::Verify,
            Work::Prune { .. } => JobKind::Prune,
            Work::Gc { .. } => JobKind::Gc,
        }
    }

    /// The instance (a domain uuid) the job works on; none for a whole sink's collection.
    pub fn instance(&self) -> &str {
        match self {
            Work::Backup { domain_uuid, .. }
            | Work::Restore { domain_uuid, .. }
            | Work::Verify { domain_uuid, .. }
            | Work::Prune { domain_uuid, .. } => domain_uuid,
            Work::Gc { .. } => "",
        }
    }

    pub fn backup_id(&self) -> Option<&BackupId> {
        match self {
            Work::Backup { backup_id, .. }
            | Work::Restore { backup_id, .. }
            | Work::Verify { backup_id, .. } => Some(backup_id),
            Work::Prune { .. } | Work::Gc { .. } => None,
        }
    }
}

#[derive(Debug, Clone)]
pub enum RestoreTo {
    /// One disk into a new file (raw or qcow2) `rel` beneath the restore directory `root`.
    File {
        root: PathBuf,
        rel: PathBuf,
        qcow2: bool,
    },
    /// One disk into an NBD export (admin only, from the config's allow-list).
    Nbd { uri: String },
    /// Every disk into a new domain beside the original, its images in `root/<name>/`.
    Domain {
        name: String,
        root: PathBuf,
        start: bool,
        /// Copy nothing: each disk a qcow2 overlay on an NBD export of the backup (a mount
        /// the copy keeps until it is unmounted); the guest's writes go to the overlays.
        instant: bool,
        /// A live restore (implies `instant` and `start`): the running copy's disks are then
        /// copied into their overlays (block pull, at most `bandwidth_mib` MiB/s, 0 for no
        /// limit), after which the mount is released.
        live: Option<u64>,
    },
}

/// Why a job was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("a backup or deletion of instance {0} is in progress")]
    InstanceBusy(String),
    #[error("a job of instance {0} runs on this sink")]
    Running(String),
    #[error("a backup of instance {0} on this sink is mounted; unmount it first")]
    Mounted(String),
    #[error("{0} jobs are queued already; try again later")]
    QueueFull(usize),
    #[error("journaling the job")]
    Journal(#[source] crate::journal::JournalError),
}

/// The jobs of this daemon's life, their queue and the per-instance locks.
///
/// | lock | held by | for |
/// |---|---|---|
/// | `live` (std mutex, never across an await) | registry calls | the job map |
/// | `claims` (std mutex, never across an await) | [`Jobs::claim`] | which instances are taken |
/// | an [`InstanceClaim`] | a backup job from admission to its end, a deletion while it runs | one backup/delete per instance |
/// | `rewriting` (std mutex, never across an await) | [`Jobs::mark_rewriting`] | instances whose backups a deletion, prune or compaction rewrites: no restore or verification starts meanwhile |
pub struct Jobs {
    live: Mutex<HashMap<String, Arc<Job>>>,
    /// Finished job ids, oldest first: dropped from `live` beyond `keep_finished`.
    finished: Mutex<std::collections::VecDeque<String>>,
    keep_finished: usize,
    global: Arc<Semaphore>,
    per_tenant: Mutex<HashMap<String, Arc<Semaphore>>>,
    per_tenant_limit: usize,
    queued: std::sync::atomic::AtomicUsize,
    max_queued: usize,
    claims: Arc<Mutex<std::collections::HashSet<String>>>,
    rewriting: Arc<Mutex<std::collections::HashSet<String>>>,
}

/// An instance taken for a backup or a deletion; released when dropped.
pub struct InstanceClaim {
    claims: Arc<Mutex<std::collections::HashSet<String>>>,
    instance: String,
}

impl Drop for InstanceClaim {
    fn drop(&mut self) {
        self.claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.instance);
    }
}

impl Jobs {
    pub fn new(limits: &crate::config::Limits) -> Jobs {
        Jobs {
            live: Mutex::new(HashMap::new()),
            finished: Mutex::default(),
            keep_finished: limits.keep_finished_jobs,
            global: Arc::new(Semaphore::new(limits.max_jobs)),
            per_tenant: Mutex::new(HashMap::new()),
            per_tenant_limit: limits.max_jobs_per_tenant,
            queued: Default::default(),
            max_queued: limits.max_queued_jobs,
            claims: Arc::default(),
            rewriting: Arc::default(),
        }
    }

    /// Marks `instance` as having its backups deleted, folded or compacted (the caller holds
    /// its claim) until the guard drops: a restore or verification that loaded a generation
    /// about to go would fail half way, so none is admitted meanwhile.
    pub fn mark_rewriting(&self, instance: &str) -> InstanceClaim {
        self.rewriting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(instance.to_string());
        InstanceClaim {
            claims: self.rewriting.clone(),
            instance: instance.to_string(),
        }
    }

    /// Whether [`Jobs::mark_rewriting`] holds `instance` now.
    pub fn rewriting(&self, instance: &str) -> bool {
        self.rewriting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(instance)
    }

    /// Takes `instance` for a backup or a deletion, or says it is taken.
    pub fn claim(&self, instance: &str) -> Result<InstanceClaim, SubmitError> {
        let mut c = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        if !c.insert(instance.to_string()) {
            return Err(SubmitError::InstanceBusy(instance.to_string()));
        }
        Ok(InstanceClaim {
            claims: self.claims.clone(),
            instance: instance.to_string(),
        })
    }

    /// Takes a place in the queue, or says the queue is full.
    pub fn enqueue(&self) -> Result<(), SubmitError> {
        let queued = self.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= self.max_queued {
            self.dequeue();
            return Err(SubmitError::QueueFull(queued));
        }
        Ok(())
    }

    /// Gives back a place taken by [`Jobs::enqueue`].
    pub fn dequeue(&self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
    }

    /// Makes `job` visible to [`Jobs::get`] and [`Jobs::all`].
    pub fn insert(&self, job: Arc<Job>) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job.id.clone(), job);
    }

    /// Waits for a slot of `tenant` and one of the host; `None` if `job` is cancelled first.
    pub async fn run_slots(&self, tenant: &str, job: &Job) -> Option<Slots> {
        let slots = self.tenant_slots(tenant);
        tokio::select! {
            p = async {
                let a = slots.acquire_owned().await.ok()?;
                let b = self.global.clone().acquire_owned().await.ok()?;
                Some((a, b))
            } => p,
            _ = job.cancelled() => None,
        }
    }

    /// A job ended: it stays in memory until `keep_finished` newer ones have ended.
    pub fn retire(&self, id: &str) {
        let mut f = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        f.push_back(id.to_string());
        while f.len() > self.keep_finished {
            if let Some(old) = f.pop_front() {
                self.live
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&old);
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<Job>> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn tenant_slots(&self, tenant: &str) -> Arc<Semaphore> {
        self.per_tenant
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_tenant_limit)))
            .clone()
    }

    /// Jobs not yet ended.
    pub fn active(&self) -> usize {
        self.all()
            .iter()
            .filter(|j| !j.snapshot().terminal())
            .count()
    }
}

pub fn new_job_id() -> String {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::SmallRng::from_entropy();
    format!("{:016x}", r.gen::<u64>())
}

pub fn valid_job_id(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewriting_marks_last_as_long_as_their_guard() {
        let jobs = Jobs::new(&crate::config::Limits::default());
        assert!(!jobs.rewriting("i1"));
        let g = jobs.mark_rewriting("i1");
        assert!(jobs.rewriting("i1") && !jobs.rewriting("i2"));
        // A mark is not a claim: the instance's claim is taken separately.
        assert!(jobs.claim("i1").is_ok());
        drop(g);
        assert!(!jobs.rewriting("i1"));
    }

    #[test]
    fn ids() {
        assert!(valid_job_id(&new_job_id()));
        assert!(!valid_job_id("../etc/passwd0000"));
        assert!(!valid_job_id("ABCDEF0123456789"));
    }
}
