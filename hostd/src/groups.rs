//! Consistency groups: a set of instances held together (filesystems frozen through qemu-ga,
//! or the guests paused for an exact cut) while each takes its point in time, then released.
//!
//! Every hold has a deadline that this daemon enforces by itself: a lost orchestrator never
//! leaves a guest frozen or paused for longer. A hold is journaled before any guest is held,
//! so a daemon that died holding guests has the next start end the hold. A point in time the
//! hold did not cover to its end is refused, and its backup rolled back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libcbt::format::Consistency;
use libcbt::job::{GroupHold, HoldFuture};
use libcbt::source::libvirt::{blocking, LibvirtDomain};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::journal::Journal;
use crate::registry::Job;
use crate::state::AppState;

/// How the members are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Filesystems frozen through the guest agent: application-consistent.
    Freeze,
    /// Guests paused: crash-consistent, one exact cut across the group.
    Pause,
}

impl Mode {
    fn consistency(self) -> Consistency {
        match self {
            Mode::Freeze => Consistency::Application,
            Mode::Pause => Consistency::Crash,
        }
    }
}

/// One member's state, as the API shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Member {
    pub instance: String,
    pub name: String,
    /// The domain ran when the group was made: it is to be held (a shut-off domain has
    /// nothing to hold, its disks do not change).
    #[serde(default)]
    pub running: bool,
    /// Its hold succeeded (only a hold this daemon made is ever undone).
    #[serde(default)]
    pub held: bool,
    /// Pause mode: this daemon paused the guest and resumes it.
    #[serde(default)]
    pub paused_by_us: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen_filesystems: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_started_ms: Option<u64>,
    /// From the hold's start to its end (set at release).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// When the backup's point in time was taken (its begin ended), wall clock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub point_in_time_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Released {
    pub at_ms: u64,
    /// `release` (asked), `deadline`, `hold_failed`, `stopping`, `journal`.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    /// Members are being held: no point in time yet.
    Holding,
    /// Every running member is held.
    Held,
    Released,
}

#[derive(Debug)]
struct GroupState {
    phase: Phase,
    members: Vec<Member>,
    released: Option<Released>,
    /// The holding step has ended (each member held, failed, or undone after a release that
    /// came first): from then on the release knows every hold there is.
    hold_done: bool,
    backups_started: bool,
}

#[derive(Debug)]
pub struct Group {
    pub id: String,
    pub tenant: Option<String>,
    pub mode: Mode,
    pub created_ms: u64,
    pub deadline_ms: u64,
    deadline: Instant,
    state: Mutex<GroupState>,
    /// Wakes waiters on the release and on the holding step's end.
    changed: tokio::sync::Notify,
}

/// The groups of this daemon's life (released ones are kept a while to be looked at), by
/// tenant and id: one tenant's ids never collide with (nor reveal) another's.
#[derive(Default)]
pub struct Groups {
    inner: Mutex<GroupsInner>,
}

#[derive(Default)]
struct GroupsInner {
    map: BTreeMap<GroupKey, Arc<Group>>,
    /// Instances in a group not yet released: one group at a time holds an instance.
    busy: BTreeMap<String, GroupKey>,
}

/// (tenant, id); an admin's groups have no tenant.
type GroupKey = (Option<String>, String);

/// How many released groups are kept for `GET`.
const KEEP_RELEASED: usize = 256;

impl Groups {
    fn lock(&self) -> std::sync::MutexGuard<'_, GroupsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Group `id` as `tenant` sees it (`None`: an admin, who sees every tenant's).
    pub fn get(&self, tenant: Option<&str>, id: &str) -> Option<Arc<Group>> {
        let m = self.lock();
        match tenant {
            Some(t) => m.map.get(&(Some(t.to_string()), id.to_string())).cloned(),
            None => m.map.values().find(|g| g.id == id).cloned(),
        }
    }

    pub fn all(&self) -> Vec<Arc<Group>> {
        self.lock().map.values().cloned().collect()
    }

    /// Registers a new group (refused while the daemon stops: checked under the lock
    /// [`release_all`] takes its list under).
    fn add(&self, g: Arc<Group>, stopping: &AtomicBool) -> Result<(), HoldError> {
        let mut m = self.lock();
        if stopping.load(Ordering::SeqCst) {
            return Err(HoldError::Stopping);
        }
        if m.map.contains_key(&g.key()) {
            return Err(HoldError::Exists(g.id.clone()));
        }
        for mb in g.members() {
            if m.busy.contains_key(&mb.instance) {
                return Err(HoldError::Busy(mb.name));
            }
        }
        if m.map.len() >= KEEP_RELEASED {
            let mut old: Vec<_> = m
                .map
                .values()
                .filter(|g| g.is_released())
                .map(|g| (g.created_ms, g.key()))
                .collect();
            old.sort();
            let n = m.map.len() + 1 - KEEP_RELEASED;
            for (_, k) in old.into_iter().take(n) {
                m.map.remove(&k);
            }
        }
        for mb in g.members() {
            m.busy.insert(mb.instance, g.key());
        }
        m.map.insert(g.key(), g);
        Ok(())
    }

    /// The group's instances may join other groups.
    fn free(&self, g: &Group) {
        let mut m = self.lock();
        let k = g.key();
        m.busy.retain(|_, v| *v != k);
    }
}

impl Group {
    fn key(&self) -> GroupKey {
        (self.tenant.clone(), self.id.clone())
    }

    /// The journal's key of its hold.
    fn journal_id(&self) -> String {
        serde_json::to_string(&self.key()).unwrap_or_else(|_| self.id.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_released(&self) -> bool {
        self.lock().released.is_some()
    }

    pub fn members(&self) -> Vec<Member> {
        self.lock().members.clone()
    }

    /// The API's view.
    pub fn view(&self) -> Value {
        let s = self.lock();
        let pits: Vec<u64> = s
            .members
            .iter()
            .filter_map(|m| m.point_in_time_ms)
            .collect();
        let skew = match (pits.iter().min(), pits.iter().max()) {
            (Some(a), Some(b)) if pits.len() == s.members.len() => Some(b - a),
            _ => None,
        };
        json!({
            "id": self.id, "tenant": self.tenant, "mode": self.mode,
            "consistency": self.mode.consistency(),
            "created_ms": self.created_ms, "deadline_ms": self.deadline_ms,
            "state": s.phase, "released": s.released, "members": s.members,
            "point_in_time_skew_ms": skew,
        })
    }

    /// Marks the backups started (once, and only while every member is held).
    pub fn start_backups(&self) -> Result<(), &'static str> {
        let mut s = self.lock();
        match s.phase {
            Phase::Holding => return Err("the group is still being held"),
            Phase::Released => return Err("the group's hold has ended"),
            Phase::Held => {}
        }
        if s.backups_started {
            return Err("the group's backups were started already");
        }
        s.backups_started = true;
        Ok(())
    }

    pub fn set_job(&self, instance: &str, job: String) {
        let mut s = self.lock();
        if let Some(m) = s.members.iter_mut().find(|m| m.instance == instance) {
            m.job = Some(job);
        }
    }

    pub fn set_error(&self, instance: &str, error: String) {
        let mut s = self.lock();
        if let Some(m) = s.members.iter_mut().find(|m| m.instance == instance) {
            m.error.get_or_insert(error);
        }
    }

    /// Waits until `f` holds of the state, or `until`.
    async fn wait(&self, until: Instant, f: impl Fn(&GroupState) -> bool) {
        loop {
            let n = self.changed.notified();
            if f(&self.lock()) || Instant::now() >= until {
                return;
            }
            let _ = tokio::time::timeout_at(until.into(), n).await;
        }
    }
}

fn now_ms() -> u64 {
    Journal::now_ms().max(0) as u64
}

/// A hold to make.
pub struct HoldRequest {
    pub id: String,
    pub tenant: Option<String>,
    pub mode: Mode,
    pub timeout: Duration,
    /// (uuid, name) of each member.
    pub members: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("group {0} exists")]
    Exists(String),
    #[error("{0} is in another group not yet released")]
    Busy(String),
    #[error("the daemon is stopping")]
    Stopping,
    #[error("libvirt is unreachable")]
    Libvirt,
    #[error("{0} is paused by someone else: a group cannot vouch for it")]
    PausedElsewhere(String),
    #[error("journaling the hold failed: {0}")]
    Journal(String),
    /// Some member could not be held; every member held was released.
    #[error("the group could not be held: {0}")]
    Failed(String, Arc<Group>),
}

/// Holds every running member, each at once (in parallel), after journaling the hold and
/// arming its deadline. If any member cannot be held, the others are released and the error
/// says which. Run it as a task of its own: a caller that goes away must not cut it short.
pub async fn hold(st: Arc<AppState>, req: HoldRequest) -> Result<Arc<Group>, HoldError> {
    let src = st.libvirt().await.ok_or(HoldError::Libvirt)?;
    // Which members run: only those are held. A paused one is someone else's pause, which
    // may end at any time: refused.
    let mut doms = Vec::new();
    for (uuid, name) in &req.members {
        let (s2, u2) = (src.clone(), uuid.clone());
        let d = blocking(move || s2.domain(&u2))
            .await
            .map_err(|_| HoldError::Libvirt)?;
        let d2 = d.clone();
        let (active, running) = blocking(move || Ok((d2.is_active()?, d2.is_running()?)))
            .await
            .map_err(|_| HoldError::Libvirt)?;
        if active && !running {
            return Err(HoldError::PausedElsewhere(name.clone()));
        }
        doms.push((uuid.clone(), name.clone(), d, running));
    }
    let created_ms = now_ms();
    let g = Arc::new(Group {
        id: req.id.clone(),
        tenant: req.tenant.clone(),
        mode: req.mode,
        created_ms,
        deadline_ms: created_ms + req.timeout.as_millis() as u64,
        deadline: Instant::now() + req.timeout,
        state: Mutex::new(GroupState {
            phase: Phase::Holding,
            members: doms
                .iter()
                .map(|(u, n, _, running)| Member {
                    instance: u.clone(),
                    name: n.clone(),
                    running: *running,
                    ..Default::default()
                })
                .collect(),
            released: None,
            hold_done: false,
            backups_started: false,
        }),
        changed: tokio::sync::Notify::new(),
    });
    st.groups.add(g.clone(), &st.shutting_down)?;
    // The deadline is armed first: whatever happens below, it ends.
    {
        let (st2, g2) = (st.clone(), g.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until(g2.deadline.into()).await;
            if !g2.is_released() {
                tracing::warn!(group = %g2.id, "hold deadline reached: releasing the group");
                release(&st2, &g2, "deadline").await;
            }
        });
    }
    // Journaled before any guest is held: a restart ends what this life could not.
    let spec = json!({"mode": req.mode, "members": g.members()});
    let (j2, id2) = (st.journal.clone(), g.journal_id());
    let put = tokio::task::spawn_blocking(move || j2.put_hold(&id2, &spec)).await;
    if !matches!(put, Ok(Ok(()))) {
        g.lock().hold_done = true;
        release(&st, &g, "journal").await;
        return Err(HoldError::Journal(format!("{put:?}")));
    }
    let mut tasks = Vec::new();
    for (uuid, _, d, running) in doms {
        if !running {
            continue;
        }
        let (mode, limit) = (req.mode, req.timeout);
        tasks.push((
            uuid,
            tokio::task::spawn_blocking(move || {
                let t = now_ms();
                let r = match mode {
                    Mode::Freeze => d.freeze(limit).map(Some),
                    Mode::Pause => d.suspend().map(|()| None),
                };
                (t, r)
            }),
        ));
    }
    let mut failures = Vec::new();
    // Holds that succeeded after the group was released already (its deadline came first):
    // undone here, the release could not know them.
    let mut late = Vec::new();
    for (uuid, t) in tasks {
        let r = t.await;
        let mut s = g.lock();
        let released = s.released.is_some();
        let Some(m) = s.members.iter_mut().find(|m| m.instance == uuid) else {
            continue;
        };
        match r {
            Ok((t, Ok(n))) => {
                m.held = true;
                m.paused_by_us = req.mode == Mode::Pause;
                m.hold_started_ms = Some(t);
                m.frozen_filesystems = n;
                if released {
                    late.push(m.clone());
                }
            }
            Ok((_, Err(e))) => {
                m.error = Some(crate::run::chain(&e));
                failures.push(format!("{}: {}", m.name, crate::run::chain(&e)));
            }
            Err(e) => failures.push(format!("{}: {e}", m.name)),
        }
    }
    if !late.is_empty() {
        let failed = end_holds(&st, g.mode, &late, Some(&g)).await;
        if !failed.is_empty() {
            retry_in_background(st.clone(), g.clone(), failed);
        }
    }
    {
        let mut s = g.lock();
        s.hold_done = true;
        if s.phase == Phase::Holding && failures.is_empty() {
            s.phase = Phase::Held;
        }
    }
    g.changed.notify_waiters();
    if !failures.is_empty() {
        release(&st, &g, "hold_failed").await;
        return Err(HoldError::Failed(failures.join("; "), g));
    }
    if g.is_released() {
        return Err(HoldError::Failed(
            "the group was released while it was being held".into(),
            g,
        ));
    }
    tracing::info!(group = %g.id, mode = ?g.mode, members = g.members().len(), "group held");
    Ok(g)
}

/// Ends the hold (once): marks it ended first, so that no point in time taken from now on
/// counts as the group's, then thaws or resumes every member this daemon held, and forgets
/// the journaled hold once every member is free (after the holding step has ended: it undoes
/// holds that succeed after the release itself).
pub async fn release(st: &Arc<AppState>, g: &Arc<Group>, reason: &'static str) -> Value {
    let members = {
        let mut s = g.lock();
        if s.released.is_some() {
            drop(s);
            return g.view();
        }
        s.released = Some(Released {
            at_ms: now_ms(),
            reason,
        });
        s.phase = Phase::Released;
        s.members.clone()
    };
    g.changed.notify_waiters();
    let failed = end_holds(st, g.mode, &members, Some(g)).await;
    // Holds still being made end in the holding step (a freeze waits at most its limit).
    g.wait(Instant::now() + Duration::from_secs(330), |s| s.hold_done)
        .await;
    if failed.is_empty() {
        forget(st, g).await;
    } else {
        tracing::error!(group = %g.id, "some members could not be released; retrying");
        retry_in_background(st.clone(), g.clone(), failed);
    }
    tracing::info!(group = %g.id, reason, "group released");
    g.view()
}

/// The journaled hold is gone and the members may join other groups.
async fn forget(st: &Arc<AppState>, g: &Group) {
    let (j2, id2) = (st.journal.clone(), g.journal_id());
    let _ = tokio::task::spawn_blocking(move || j2.delete_hold(&id2)).await;
    st.groups.free(g);
}

/// Keeps ending `failed` (every 10 s) until they are free, then forgets the hold.
fn retry_in_background(st: Arc<AppState>, g: Arc<Group>, mut failed: Vec<Member>) {
    tokio::spawn(async move {
        while !failed.is_empty() {
            tokio::time::sleep(Duration::from_secs(10)).await;
            failed = end_holds(&st, g.mode, &failed, Some(&g)).await;
        }
        forget(&st, &g).await;
        tracing::info!(group = %g.id, "the last members of the group were released");
    });
}

/// Thaws or resumes each member this daemon held (in parallel), retrying for up to 30 s.
/// Answers those it could not free; each member's hold time and errors go into `g`.
async fn end_holds(
    st: &Arc<AppState>,
    mode: Mode,
    members: &[Member],
    g: Option<&Group>,
) -> Vec<Member> {
    let mut tasks = Vec::new();
    for m in members.iter().filter(|m| m.held) {
        let (st2, m2) = (st.clone(), m.clone());
        tasks.push((
            m.clone(),
            tokio::spawn(async move {
                let t = Instant::now();
                let mut last = String::new();
                while t.elapsed() < Duration::from_secs(30) {
                    match end_one(&st2, mode, &m2).await {
                        Ok(()) => return Ok(now_ms()),
                        Err(e) => last = e,
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(last)
            }),
        ));
    }
    let mut failed = Vec::new();
    for (member, t) in tasks {
        let r = t.await.unwrap_or_else(|e| Err(e.to_string()));
        if let Some(g) = g {
            let mut s = g.lock();
            if let Some(m) = s.members.iter_mut().find(|m| m.instance == member.instance) {
                match &r {
                    Ok(at) => m.hold_ms = m.hold_started_ms.map(|s| at.saturating_sub(s)),
                    Err(e) => {
                        m.error
                            .get_or_insert(format!("releasing the hold failed: {e}"));
                    }
                }
            }
        }
        if r.is_err() {
            failed.push(member);
        }
    }
    failed
}

async fn end_one(st: &AppState, mode: Mode, m: &Member) -> Result<(), String> {
    let src = st
        .libvirt()
        .await
        .ok_or_else(|| "libvirt is unreachable".to_string())?;
    let u = m.instance.clone();
    let paused_by_us = m.paused_by_us;
    blocking(move || {
        let d: LibvirtDomain = match src.domain(&u) {
            Ok(d) => d,
            // Gone: nothing is held.
            Err(_) => return Ok(()),
        };
        if !d.is_active()? {
            return Ok(());
        }
        match mode {
            Mode::Freeze => {
                d.thaw()?;
            }
            Mode::Pause if paused_by_us && d.is_paused()? => d.resume()?,
            Mode::Pause => {}
        }
        Ok(())
    })
    .await
    .map_err(|e| crate::run::chain(&e))
}

/// Ends every hold a previous life journaled and could not end (before any request), all at
/// once. The journal says which members were to be held; the dead daemon's freeze or pause
/// may or may not have landed, so each is thawed or resumed as if it had.
pub async fn release_recorded(st: &Arc<AppState>) {
    let holds = match st.journal.holds() {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "reading the journaled holds failed");
            return;
        }
    };
    let mut tasks = Vec::new();
    for (id, spec) in holds {
        let mode: Mode = serde_json::from_value(spec["mode"].clone()).unwrap_or(Mode::Freeze);
        let mut members: Vec<Member> =
            serde_json::from_value(spec["members"].clone()).unwrap_or_default();
        for m in &mut members {
            m.held = m.running;
            m.paused_by_us = m.running && mode == Mode::Pause;
        }
        tracing::warn!(group = %id, "ending the hold of a previous life");
        let st2 = st.clone();
        tasks.push(tokio::spawn(async move {
            if end_holds(&st2, mode, &members, None).await.is_empty() {
                let _ = st2.journal.delete_hold(&id);
            } else {
                tracing::error!(group = %id, "a member of a previous life's hold could not be released");
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Ends every hold (the daemon stops; no new group is made from here on).
pub async fn release_all(st: &Arc<AppState>) {
    for g in st.groups.all() {
        release(st, &g, "stopping").await;
    }
}

/// What a member's backup job asks its group ([`GroupHold`]): whether the hold stands around
/// its point in time, and a place in the job queue before it copies.
pub struct Gate {
    pub group: Arc<Group>,
    pub instance: String,
    pub st: Arc<AppState>,
    pub job: Arc<Job>,
    /// The job's slots, taken after the point in time; dropped with the job.
    pub slots: Arc<Mutex<Option<crate::registry::Slots>>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gate({}, {})", self.group.id, self.instance)
    }
}

impl GroupHold for Gate {
    fn before_point_in_time(&self) -> Result<Consistency, String> {
        let s = self.group.lock();
        if let Some(r) = &s.released {
            return Err(format!(
                "group {}: the hold ended ({}) before this member's point in time",
                self.group.id, r.reason
            ));
        }
        if s.phase != Phase::Held {
            return Err(format!("group {}: not held yet", self.group.id));
        }
        // A member that was shut off is not held: its backup starts it paused, a crash cut.
        let held = s
            .members
            .iter()
            .any(|m| m.instance == self.instance && m.held);
        Ok(if held {
            self.group.mode.consistency()
        } else {
            Consistency::Crash
        })
    }

    fn point_in_time_taken(&self) -> Result<(), String> {
        let mut s = self.group.lock();
        if let Some(r) = &s.released {
            return Err(format!(
                "group {}: the hold ended ({}) while this member's point in time was taken",
                self.group.id, r.reason
            ));
        }
        if let Some(m) = s.members.iter_mut().find(|m| m.instance == self.instance) {
            m.point_in_time_ms = Some(now_ms());
        }
        Ok(())
    }

    fn before_copy(&self) -> HoldFuture<'_> {
        Box::pin(async move {
            let tenant = self.job.tenant.clone().unwrap_or_else(|| "-".into());
            match self.st.jobs.run_slots(&tenant, &self.job).await {
                Some(p) => {
                    *self.slots.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
                    Ok(())
                }
                None => Err("cancelled while queued".into()),
            }
        })
    }
}
