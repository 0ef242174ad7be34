//! Prune: deletes the backups of one instance that a keep policy does not keep, and any
//! single backup on request, the full of a chain included.
//!
//! The instance's disks are kept or dropped together: a backup here is a backup id (shared
//! by the disks one job backed up) and the latest finish time among its disks. The
//! [planner](crate::retention::plan) says which ids the policy keeps; the newest backup of
//! every disk stays too (the parent of that disk's next incremental). Everything else goes.
//!
//! A backup that goes while a backup that stays depends on it is *folded*: on each disk, a
//! backup that stays and whose parent goes gets a new generation of its manifest and index
//! (`<id>.g<N>.manifest`, `.g<N>.idx`, create-only) whose index is its doomed ancestors'
//! indexes overlaid by its own ([`fold_indexes`]), whose parent is its nearest ancestor that
//! stays (none: it becomes a synthetic full), and which lists the segments it now reads.
//! Metadata only: no segment byte is read or written, and it restores byte for byte as before.
//!
//! Order, so that a crash anywhere leaves every backup that should exist restorable and the
//! same prune run again finishes the work:
//! 1. every fold, each committed by its new manifest (until then the old generation, with its
//!    whole chain, is the backup); then the fold's older generations go (hidden already);
//! 2. the doomed backups, children before parents (by the parent links of every disk, not by
//!    time, which ties or steps back), each manifest first ([`catalog::forget_among`]): its
//!    segments go unless a backup that stays lists them (a fold handed them on).
//!
//! This order also keeps a concurrent garbage collector safe: it marks by the manifests it
//! lists and reads, and a manifest deleted between its listing and its read fails the
//! collection. A collector that saw a backup's old generation read it before the fold
//! deleted it, hence before any doomed backup went, so it also saw every backup the new
//! generation reads through.
//!
//! For a libvirt instance, the domain XML and job record saved with a backup go with it. Prune
//! does not look for running jobs: a backup that commits meanwhile has the newest backup of
//! its disk as parent, which stays, and backups the plan does not know of stay.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::restore::load_index;
use super::{catalog, EngineError, Progress, ProgressFn};
use crate::format::{
    fold_indexes, layout, referenced_segments, FullReason, Index, Level, Manifest, ObjectRef,
};
use crate::retention::{self, Candidate, KeepPolicy, Rule};
use crate::sink::Sink;

/// Ids kept in a manifest's `folded` list: the most recent ones (years of nightly folds).
pub const MAX_FOLDED: usize = 1_000;

/// Why a backup stays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "why", content = "by")]
pub enum Hold {
    /// A rule of the policy keeps it.
    Kept(Rule),
    /// The newest backup of a disk: the parent of its next incremental.
    Newest,
    /// Not asked to go (a single backup was deleted).
    Spared,
    /// Locked on the sink (S3 Object Lock) until then (Unix ms): it stays, whole, until its
    /// retention ends, whatever the policy says.
    Locked(u64),
}

/// One backup of the instance in a prune plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PruneEntry {
    pub id: String,
    pub finished_unix_ms: u64,
    /// The instance's disks this backup holds.
    pub disks: Vec<String>,
    /// Why it stays; `None`: it goes.
    pub hold: Option<Hold>,
    /// Backups that stay and will have this one folded into them (on some disk), when it goes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub folds_into: Vec<String>,
    /// Its parents on its disks (what orders the deletions; not part of the answer).
    #[serde(skip)]
    pub parents: Vec<String>,
}

/// What a prune did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Backups deleted (every disk of each).
    pub deleted: Vec<String>,
    /// Objects deleted.
    pub objects: usize,
    /// Folds: new generations written (one per disk of a backup that stays).
    pub folds: usize,
    /// Index bytes read and written by the folds (no segment byte is).
    pub index_bytes_read: u64,
    pub index_bytes_written: u64,
    /// Bytes of the objects of the backups deleted (segments, indexes, manifests) and of
    /// generations a crashed fold left, as listed before; not the generations a fold replaced
    /// (their successors take about as much) nor the domain XML and job records.
    pub bytes_reclaimed: u64,
}

/// One fold on one disk: the backups of `chain` (oldest first) go into `into`, whose parent
/// becomes `parent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fold {
    pub into: String,
    pub chain: Vec<String>,
    pub parent: Option<String>,
    /// The backups of `chain` stay (a bounded chain): not listed in `folded`.
    pub chain_stays: bool,
}

/// The folds that deleting the backups `doomed` of one disk takes (`ms`: the disk's
/// backups): each backup that stays, with a doomed parent, takes its doomed ancestors up to
/// the nearest one that stays (a full ends a chain). A chain that is broken already (a parent missing, a cycle) is
/// refused: folding it would hide the damage.
pub fn plan_folds(
    ms: &[Manifest],
    doomed: &dyn Fn(&str) -> bool,
) -> Result<Vec<Fold>, EngineError> {
    let by_id: HashMap<&str, &Manifest> = ms.iter().map(|m| (m.backup_id.as_str(), m)).collect();
    let mut out = Vec::new();
    for m in ms.iter().filter(|m| !doomed(&m.backup_id)) {
        // A full's chain is itself, whatever parent it names (fulls of a raw disk name the
        // backup before them).
        let parent_of = |m: &'_ Manifest| match m.level {
            Level::Incremental => m.parent.clone(),
            Level::Full => None,
        };
        let mut chain = Vec::new();
        let mut at = parent_of(m);
        let parent = loop {
            match at {
                None => break None,
                Some(p) if !doomed(&p) => break Some(p),
                Some(p) => {
                    let pm = by_id.get(p.as_str()).ok_or_else(|| EngineError::Chain {
                        backup: m.backup_id.clone(),
                        what: format!("parent {p} is missing"),
                    })?;
                    if chain.len() > ms.len() {
                        return Err(EngineError::Chain {
                            backup: m.backup_id.clone(),
                            what: "a cycle of parents".into(),
                        });
                    }
                    chain.push(p);
                    at = parent_of(pm);
                }
            }
        };
        if !chain.is_empty() {
            chain.reverse();
            out.push(Fold {
                into: m.backup_id.clone(),
                chain,
                parent,
                chain_stays: false,
            });
        }
    }
    Ok(out)
}

/// The plan for the instance whose disks are `disks`: one entry per backup id, newest first.
pub async fn plan_prune<S: Sink>(
    sink: &S,
    disks: &[String],
    policy: &KeepPolicy,
) -> Result<Vec<PruneEntry>, EngineError> {
    let by_disk = list_disks(sink, disks).await?;
    let mut plan = plan_from(&by_disk, policy)?;
    hold_locked(sink, &mut plan, &by_disk).await?;
    annotate_folds(&mut plan, &by_disk)?;
    Ok(plan)
}

/// On an immutable sink, holds the backups the plan lets go whose manifest (on any disk)
/// the server still keeps locked: one retention read per manifest.
async fn hold_locked<S: Sink>(
    sink: &S,
    plan: &mut [PruneEntry],
    by_disk: &BTreeMap<&str, Vec<Manifest>>,
) -> Result<(), EngineError> {
    if sink.lock_period().is_none() {
        return Ok(());
    }
    let now = std::time::SystemTime::now();
    for e in plan.iter_mut().filter(|e| e.hold.is_none()) {
        let mut until = None;
        for (disk, ms) in by_disk {
            for m in ms.iter().filter(|m| m.backup_id == e.id) {
                let name = layout::manifest_name_gen(disk, &m.backup_id, m.generation);
                if let Some(t) = sink.locked_until(&name).await?.filter(|t| *t > now) {
                    let ms = t
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                    until = until.max(Some(ms));
                }
            }
        }
        if let Some(t) = until {
            e.hold = Some(Hold::Locked(t));
        }
    }
    Ok(())
}

/// The plan that deletes backup `id` of the instance whose disks are `disks` and nothing
/// else. `None`: no such backup.
pub async fn plan_delete<S: Sink>(
    sink: &S,
    disks: &[String],
    id: &str,
) -> Result<Option<Vec<PruneEntry>>, EngineError> {
    let by_disk = list_disks(sink, disks).await?;
    let mut plan = plan_from(&by_disk, &KeepPolicy::default())?;
    if !plan.iter().any(|e| e.id == id) {
        return Ok(None);
    }
    for e in &mut plan {
        e.hold = (e.id != id).then_some(Hold::Spared);
    }
    hold_locked(sink, &mut plan, &by_disk).await?;
    annotate_folds(&mut plan, &by_disk)?;
    Ok(Some(plan))
}

async fn list_disks<'a, S: Sink>(
    sink: &S,
    disks: &'a [String],
) -> Result<BTreeMap<&'a str, Vec<Manifest>>, EngineError> {
    let mut by_disk = BTreeMap::new();
    for d in disks {
        by_disk.insert(d.as_str(), catalog::list_backups(sink, d).await?);
    }
    Ok(by_disk)
}

/// Fills in `folds_into`, and checks that the folds can be made.
fn annotate_folds(
    plan: &mut [PruneEntry],
    by_disk: &BTreeMap<&str, Vec<Manifest>>,
) -> Result<(), EngineError> {
    let doomed: HashSet<String> = plan
        .iter()
        .filter(|e| e.hold.is_none())
        .map(|e| e.id.clone())
        .collect();
    let mut into: HashMap<String, Vec<String>> = HashMap::new();
    for ms in by_disk.values() {
        for f in plan_folds(ms, &|id| doomed.contains(id))? {
            for c in f.chain {
                let v = into.entry(c).or_default();
                if !v.contains(&f.into) {
                    v.push(f.into.clone());
                }
            }
        }
    }
    for e in plan {
        e.folds_into = into.remove(&e.id).unwrap_or_default();
    }
    Ok(())
}

/// The backups of `doomed` in an order where every child (on any disk) comes before its
/// parent; among those free to go, the newest first. Ids caught in a cycle of parent links
/// (a damaged sink) come last, newest first.
fn children_first<'a>(doomed: &[&'a PruneEntry]) -> Vec<&'a PruneEntry> {
    let mut left: Vec<&PruneEntry> = doomed.to_vec();
    left.sort_by(|a, b| (b.finished_unix_ms, &b.id).cmp(&(a.finished_unix_ms, &a.id)));
    let mut out = Vec::with_capacity(left.len());
    while !left.is_empty() {
        // Ids still waiting that some waiting id names as a parent.
        let needed: HashSet<&str> = left
            .iter()
            .flat_map(|e| e.parents.iter().map(String::as_str))
            .collect();
        let next = left
            .iter()
            .position(|e| !needed.contains(e.id.as_str()))
            .unwrap_or(0);
        out.push(left.remove(next));
    }
    out
}

/// [`plan_prune`] on manifests already read (oldest first per disk, as
/// [`catalog::list_backups`] gives them), before `folds_into` is filled in.
fn plan_from(
    by_disk: &BTreeMap<&str, Vec<Manifest>>,
    policy: &KeepPolicy,
) -> Result<Vec<PruneEntry>, retention::PolicyError> {
    // Backup ids with their latest finish time, disks and parents.
    let mut ids: HashMap<&str, (u64, Vec<String>, Vec<String>)> = HashMap::new();
    for (disk, ms) in by_disk {
        for m in ms {
            let e = ids.entry(&m.backup_id).or_default();
            e.0 = e.0.max(m.finished_unix_ms);
            e.1.push(disk.to_string());
            e.2.extend(m.parent.clone());
        }
    }
    let candidates: Vec<Candidate> = ids
        .iter()
        .map(|(id, (t, _, _))| Candidate {
            id: id.to_string(),
            finished_unix_ms: *t,
            pinned: false,
        })
        .collect();
    let verdicts = retention::plan(&candidates, policy)?;
    let mut hold: HashMap<String, Hold> = verdicts
        .iter()
        .filter_map(|v| Some((v.id.clone(), Hold::Kept(v.kept_by?))))
        .collect();
    for ms in by_disk.values() {
        if let Some(newest) = ms.last() {
            hold.entry(newest.backup_id.clone()).or_insert(Hold::Newest);
        }
    }
    Ok(verdicts
        .into_iter()
        .map(|v| {
            let (_, disks, parents) = ids.remove(v.id.as_str()).unwrap_or_default();
            PruneEntry {
                hold: hold.get(&v.id).cloned(),
                id: v.id,
                finished_unix_ms: v.finished_unix_ms,
                disks,
                folds_into: Vec::new(),
                parents,
            }
        })
        .collect())
}

/// The time `ms` milliseconds after the Unix epoch.
pub(super) fn unix_ms(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

/// What one fold read and wrote.
struct Folded {
    manifest: Manifest,
    read: u64,
    written: u64,
}

/// Makes fold `f` on `disk` (`by_id`: the disk's backups): writes the next generation of
/// `f.into`'s index and manifest, create-only, then deletes its older generations.
async fn fold<S: Sink>(
    sink: &S,
    disk: &str,
    f: &Fold,
    by_id: &HashMap<&str, &Manifest>,
) -> Result<Folded, EngineError> {
    let find = |id: &str| {
        by_id.get(id).copied().ok_or_else(|| EngineError::Chain {
            backup: f.into.clone(),
            what: format!("{id} is gone"),
        })
    };
    let into = find(&f.into)?;
    let mut members: Vec<&Manifest> = Vec::with_capacity(f.chain.len() + 1);
    for id in &f.chain {
        members.push(find(id)?);
    }
    members.push(into);
    let mut indexes: Vec<Index> = Vec::with_capacity(members.len());
    let mut read = 0;
    for m in &members {
        if m.disk_size != into.disk_size {
            return Err(EngineError::Chain {
                backup: f.into.clone(),
                what: format!("{} differs in size", m.backup_id),
            });
        }
        indexes.push(load_index(sink, m).await?);
        read += m.index.len;
    }
    let refs: Vec<&Index> = indexes.iter().collect();
    let merged = fold_indexes(&refs).map_err(|source| EngineError::Plan {
        object: members
            .get(source.index())
            .map_or_else(String::new, |m| m.index.name.clone()),
        offset: source.offset(),
        source: Box::new(source),
    })?;
    let listed: HashSet<&str> = members
        .iter()
        .flat_map(|m| m.segments.iter().map(String::as_str))
        .collect();
    let segments: Vec<String> = referenced_segments(&merged)
        .into_iter()
        .map(|s| layout::segment_name(disk, s))
        .collect();
    if segments.iter().any(|s| !listed.contains(s.as_str())) {
        return Err(EngineError::Mismatch {
            object: into.index.name.clone(),
            pos: 0,
            what: "an index of the chain reads a segment no manifest of it lists",
        });
    }
    let gone = if f.chain_stays {
        &[][..]
    } else {
        &members[..members.len() - 1]
    };
    let mut folded: Vec<String> = gone
        .iter()
        .flat_map(|m| m.folded.iter().cloned().chain([m.backup_id.clone()]))
        .chain(into.folded.iter().cloned())
        .collect();
    folded.drain(..folded.len().saturating_sub(MAX_FOLDED));
    let full = f.parent.is_none();
    let base = Manifest {
        parent: f.parent.clone(),
        level: if full {
            Level::Full
        } else {
            Level::Incremental
        },
        full_reason: if f.chain_stays {
            Some(FullReason::ChainBounded)
        } else if full {
            Some(FullReason::Folded)
        } else {
            into.full_reason
        },
        chunk_size: members.iter().map(|m| m.chunk_size).max().unwrap_or(0),
        folded,
        ..into.clone()
    };
    let (manifest, written) = commit_generation(sink, disk, base, &merged).await?;
    tracing::info!(disk, backup = %into.backup_id, generation = manifest.generation, folded = f.chain.len(), "folded");
    Ok(Folded {
        manifest,
        read,
        written,
    })
}

/// Writes the next generation of backup `base.backup_id` of `disk`: index `index` and a
/// manifest that is `base` with that index, the segments it references and the generation
/// filled in; create-only, index then manifest (the commit); then deletes the older
/// generations (hidden already). Refused before writing anything when readers would refuse
/// the index or the manifest. Returns the manifest and the bytes written.
pub(super) async fn commit_generation<S: Sink>(
    sink: &S,
    disk: &str,
    base: Manifest,
    index: &Index,
) -> Result<(Manifest, u64), EngineError> {
    let backup = base.backup_id.clone();
    // Built from generation `base.generation`: if another writer committed a newer one since
    // (a fold, a compaction), this one would undo it (and may name segments it let go).
    let (current, any) = catalog::generations(sink, disk, &backup).await?;
    if current != Some(base.generation) {
        return Err(EngineError::Invalid(format!(
            "backup {backup} of {disk} changed meanwhile (generation {} read, {current:?} now): \
             run again",
            base.generation
        )));
    }
    // Immutable sinks: the new objects are locked as long as the backup's record says its
    // objects are, no longer (a fold must not keep a backup past its retention).
    let sink = &sink.locking_until(base.locked_until_unix_ms.map(unix_ms));
    // Above every object of it (an index a fold wrote before it died counts too).
    let generation = any.unwrap_or(0).checked_add(1).ok_or_else(|| {
        EngineError::Invalid(format!("backup {backup} of {disk}: generations exhausted"))
    })?;
    let bytes = index.encode();
    let index_ref = ObjectRef {
        name: layout::index_name_gen(disk, &backup, generation),
        len: bytes.len() as u64,
        crc32: crc32fast::hash(&bytes),
    };
    let manifest = Manifest {
        index: index_ref,
        segments: referenced_segments(index)
            .into_iter()
            .map(|s| layout::segment_name(disk, s))
            .collect(),
        generation,
        ..base
    };
    let name = layout::manifest_name_gen(disk, &backup, generation);
    let encoded = manifest.encode();
    if manifest.index.len > super::restore::MAX_INDEX
        || encoded.len() > crate::format::manifest::MAX_MANIFEST
    {
        return Err(EngineError::Invalid(format!(
            "a new generation of {backup} of {disk} would have an index of {} bytes and a \
             manifest of {} bytes, more than readers accept",
            manifest.index.len,
            encoded.len()
        )));
    }
    let written = manifest.index.len + encoded.len() as u64;
    sink.put_new(&manifest.index.name, bytes).await?;
    sink.put_new(&name, encoded).await?;
    let stale: Vec<String> = sink
        .list(&layout::backup_objects_prefix(disk, &backup))
        .await?
        .into_iter()
        .filter(|o| {
            layout::parse_backup_object(disk, &o.name)
                .is_some_and(|(id, g, _)| id == backup && g < generation)
        })
        .map(|o| o.name)
        .collect();
    // Locked older generations stay, hidden, for a collection once free.
    catalog::delete_unlocked(sink, &stale).await?;
    Ok((manifest, written))
}

/// How a caller watches and stops a prune: `progress` after each step (a fold, or the
/// deletion of a backup) with the steps done and in all; `cancel`, checked before each step.
/// Every step is complete on its own, so a cancelled prune leaves every backup whole, and
/// the same plan run again finishes the work.
#[derive(Default, Clone, Copy)]
pub struct Steps<'a> {
    pub progress: Option<&'a ProgressFn<'a>>,
    pub cancel: Option<&'a std::sync::atomic::AtomicBool>,
}

impl Steps<'_> {
    fn next(&self, done: u64, total: u64) -> Result<(), EngineError> {
        if let Some(p) = self.progress {
            p(Progress { done, total });
        }
        if self
            .cancel
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst))
        {
            return Err(EngineError::Cancelled);
        }
        Ok(())
    }
}

/// Deletes what `plan` (from [`plan_prune`] or [`plan_delete`]) lets go: folds first, then
/// the doomed backups, children before parents. With `instance` (a libvirt domain's uuid),
/// the domain XML and job record of each backup go too. The disks are listed afresh: a
/// backup the plan does not name stays; older generations a fold that died left are swept.
pub async fn prune<S: Sink>(
    sink: &S,
    plan: &[PruneEntry],
    instance: Option<&str>,
) -> Result<PruneReport, EngineError> {
    prune_with(sink, plan, instance, Steps::default()).await
}

/// [`prune`], watched and stoppable between steps (see [`Steps`]).
pub async fn prune_with<S: Sink>(
    sink: &S,
    plan: &[PruneEntry],
    instance: Option<&str>,
    steps: Steps<'_>,
) -> Result<PruneReport, EngineError> {
    let doomed: Vec<&PruneEntry> = plan.iter().filter(|e| e.hold.is_none()).collect();
    let doomed_ids: HashSet<&str> = doomed.iter().map(|e| e.id.as_str()).collect();
    let mut report = PruneReport::default();
    let mut disks: Vec<&str> = plan
        .iter()
        .flat_map(|e| e.disks.iter().map(String::as_str))
        .collect();
    disks.sort_unstable();
    disks.dedup();
    // Every disk's backups and folds first: the steps in all.
    let mut listed = Vec::with_capacity(disks.len());
    for d in disks {
        let ms = catalog::list_backups(sink, d).await?;
        let folds = plan_folds(&ms, &|id| doomed_ids.contains(id))?;
        listed.push((d, ms, folds));
    }
    let total = (listed.iter().map(|(_, _, f)| f.len()).sum::<usize>() + doomed.len()) as u64;
    let mut done = 0u64;
    // Each disk's backups after its folds.
    let mut current: BTreeMap<&str, Vec<Manifest>> = BTreeMap::new();
    // Sizes of the disks' objects as listed before any deletion (for the bytes reclaimed).
    let mut sizes: HashMap<String, u64> = HashMap::new();
    for (d, mut ms, folds) in listed {
        let mut made = Vec::with_capacity(folds.len());
        {
            let by_id: HashMap<&str, &Manifest> =
                ms.iter().map(|m| (m.backup_id.as_str(), m)).collect();
            for f in &folds {
                steps.next(done, total)?;
                let r = fold(sink, d, f, &by_id).await?;
                done += 1;
                report.folds += 1;
                report.index_bytes_read += r.read;
                report.index_bytes_written += r.written;
                made.push(r.manifest);
            }
        }
        for m in made {
            if let Some(old) = ms.iter_mut().find(|o| o.backup_id == m.backup_id) {
                *old = m;
            }
        }
        // Older generations a fold that died left behind (hidden already): one listing.
        let generation: HashMap<&str, u32> = ms
            .iter()
            .map(|m| (m.backup_id.as_str(), m.generation))
            .collect();
        let listing = sink.list(&layout::disk_prefix(d)).await?;
        sizes.extend(listing.iter().map(|o| (o.name.clone(), o.len)));
        let stale: Vec<String> = listing
            .into_iter()
            .filter(|o| {
                layout::parse_backup_object(d, &o.name).is_some_and(|(id, g, _)| {
                    generation
                        .get(id.as_str())
                        .is_some_and(|current| g < *current)
                })
            })
            .map(|o| o.name)
            .collect();
        let locked = catalog::delete_unlocked(sink, &stale).await?;
        report.bytes_reclaimed += stale
            .iter()
            .filter(|n| !locked.contains(n))
            .filter_map(|n| sizes.get(n))
            .sum::<u64>();
        current.insert(d, ms);
    }
    for e in children_first(&doomed) {
        steps.next(done, total)?;
        for d in &e.disks {
            let Some(ms) = current.get_mut(d.as_str()) else {
                continue;
            };
            let Some(at) = ms.iter().position(|m| m.backup_id == e.id) else {
                continue;
            };
            let m = ms.remove(at);
            let others: Vec<&Manifest> = ms.iter().collect();
            let gone = match catalog::forget_among(sink, &m, &others).await {
                // Locked since the plan was made (a backup extended its chain's locks):
                // it stays, whole, with its manifest.
                Err(EngineError::Sink(crate::sink::SinkError::Locked { .. })) => {
                    tracing::info!(backup = %e.id, disk = %d, "locked meanwhile: kept");
                    ms.insert(at, m);
                    continue;
                }
                r => r?,
            };
            report.objects += gone.len();
            report.bytes_reclaimed += gone.iter().filter_map(|n| sizes.get(n)).sum::<u64>();
        }
        if let Some(uuid) = instance {
            let extra = [
                layout::domain_xml_name(uuid, &e.id),
                layout::job_record_name(uuid, &e.id),
            ];
            catalog::delete_unlocked(sink, &extra).await?;
        }
        tracing::info!(backup = %e.id, disks = e.disks.len(), "pruned");
        report.deleted.push(e.id.clone());
        done += 1;
    }
    steps.next(done, total).or_else(|e| match e {
        // Finished: a cancel that comes now is too late to matter.
        EngineError::Cancelled => Ok(()),
        e => Err(e),
    })?;
    Ok(report)
}

/// The ancestors of backup `id` among a disk's backups `ms`, oldest (its full) first: what a
/// restore of it merges before its own index. A missing parent or a cycle is refused.
pub fn ancestors(ms: &[Manifest], id: &str) -> Result<Vec<String>, EngineError> {
    let plan = plan_folds(ms, &|b| b != id)?;
    Ok(plan
        .into_iter()
        .find(|f| f.into == id)
        .map(|f| f.chain)
        .unwrap_or_default())
}

/// What bounding a chain did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bounded {
    pub disk: String,
    pub backup: String,
    /// Backups its restore merged before (the full and incrementals it folded in).
    pub depth: usize,
    /// The new generation, a synthetic full.
    pub generation: u32,
    pub index_bytes_read: u64,
    pub index_bytes_written: u64,
}

/// Keeps the chain of backup `id` on `disk` at most `max_chain` backups long (its full
/// included): when it is longer, `id` becomes a synthetic full, a new generation whose index
/// folds its whole chain into its own and that lists the segments it reads. Metadata only: no
/// segment byte is read or written, the backups of the chain stay as they were, and the next
/// incrementals chain from `id`, so no restore merges more than `max_chain` indexes.
///
/// Safe to run again after a crash (the new generation is created only when the old one is
/// the highest, and a backup already bounded has a chain of one); run it where nothing else
/// folds the same disk (the backup job of the instance, which holds it).
pub async fn bound_chain<S: Sink>(
    sink: &S,
    disk: &str,
    id: &str,
    max_chain: usize,
) -> Result<Option<Bounded>, EngineError> {
    if max_chain == 0 {
        return Err(EngineError::Invalid("max_chain must be at least 1".into()));
    }
    let ms = catalog::list_backups(sink, disk).await?;
    if !ms.iter().any(|m| m.backup_id == id) {
        return Err(EngineError::Invalid(format!("no backup {id} of {disk}")));
    }
    let chain = ancestors(&ms, id)?;
    if chain.len() < max_chain {
        return Ok(None);
    }
    let depth = chain.len();
    let f = Fold {
        into: id.to_string(),
        chain,
        parent: None,
        chain_stays: true,
    };
    let by_id: HashMap<&str, &Manifest> = ms.iter().map(|m| (m.backup_id.as_str(), m)).collect();
    let r = fold(sink, disk, &f, &by_id).await?;
    Ok(Some(Bounded {
        disk: disk.to_string(),
        backup: id.to_string(),
        depth,
        generation: r.manifest.generation,
        index_bytes_read: r.read,
        index_bytes_written: r.written,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::manifest::tests::sample;
    use crate::format::Level;

    fn m(disk: &str, id: &str, parent: Option<&str>, t: u64) -> Manifest {
        Manifest {
            backup_id: id.into(),
            disk: disk.into(),
            parent: parent.map(String::from),
            level: if parent.is_some() {
                Level::Incremental
            } else {
                Level::Full
            },
            finished_unix_ms: t,
            ..sample()
        }
    }

    fn holds(plan: &[PruneEntry]) -> Vec<(&str, Option<Hold>)> {
        plan.iter()
            .map(|e| (e.id.as_str(), e.hold.clone()))
            .collect()
    }

    #[test]
    fn what_stays_takes_in_the_chains_of_what_goes_on_every_disk() {
        const DAY: u64 = 86_400_000;
        // vda: a0 ← a1 ← a2, full a3 ← a4; vdb joined at a3 (a full) and stays.
        let mut by_disk = BTreeMap::new();
        by_disk.insert(
            "vda",
            vec![
                m("vda", "a0", None, DAY),
                m("vda", "a1", Some("a0"), 2 * DAY),
                m("vda", "a2", Some("a1"), 3 * DAY),
                m("vda", "a3", None, 4 * DAY),
                m("vda", "a4", Some("a3"), 5 * DAY),
            ],
        );
        by_disk.insert(
            "vdb",
            vec![
                m("vdb", "a3", None, 4 * DAY),
                m("vdb", "a4", Some("a3"), 5 * DAY),
            ],
        );
        let p = KeepPolicy {
            keep_last: 1,
            ..KeepPolicy::default()
        };
        let mut plan = plan_from(&by_disk, &p).expect("plan");
        annotate_folds(&mut plan, &by_disk).expect("folds");
        assert_eq!(
            holds(&plan),
            [
                ("a4", Some(Hold::Kept(Rule::Last))),
                ("a3", None),
                ("a2", None),
                ("a1", None),
                ("a0", None),
            ]
        );
        // The full a3 goes into a4 (on both disks); the old chain has nothing left to serve.
        assert_eq!(plan[1].folds_into, ["a4"]);
        assert!(plan[2..].iter().all(|e| e.folds_into.is_empty()));
        assert_eq!(
            plan_folds(&by_disk["vdb"], &|id| id != "a4").expect("folds"),
            [Fold {
                into: "a4".into(),
                chain: vec!["a3".into()],
                parent: None,
                chain_stays: false
            }]
        );
        // Keeping a2 and a0: a1 goes into a2, whose parent becomes a0.
        let ms = &by_disk["vda"];
        assert_eq!(
            plan_folds(ms, &|id| id == "a1").expect("folds"),
            [Fold {
                into: "a2".into(),
                chain: vec!["a1".into()],
                parent: Some("a0".into()),
                chain_stays: false
            }]
        );

        // vdb instead backed up from a1 to a2 only (then detached): its newest, a2, stays,
        // and takes in a1 on vdb and a0, a1 on vda.
        by_disk.insert(
            "vdb",
            vec![
                m("vdb", "a1", None, 2 * DAY),
                m("vdb", "a2", Some("a1"), 3 * DAY),
            ],
        );
        let mut plan = plan_from(&by_disk, &p).expect("plan");
        annotate_folds(&mut plan, &by_disk).expect("folds");
        assert_eq!(
            holds(&plan),
            [
                ("a4", Some(Hold::Kept(Rule::Last))),
                ("a3", None),
                ("a2", Some(Hold::Newest)),
                ("a1", None),
                ("a0", None),
            ]
        );
        assert_eq!(plan[3].folds_into, ["a2"]);
        assert_eq!(
            plan_folds(&by_disk["vda"], &|id| !["a2", "a4"].contains(&id)).expect("folds"),
            [
                Fold {
                    into: "a2".into(),
                    chain: vec!["a0".into(), "a1".into()],
                    parent: None,
                    chain_stays: false
                },
                Fold {
                    into: "a4".into(),
                    chain: vec!["a3".into()],
                    parent: None,
                    chain_stays: false
                }
            ]
        );
        // A full that names the backup before it (a raw disk's) takes nothing in.
        let raw = vec![
            m("vdb", "r0", None, DAY),
            Manifest {
                parent: Some("r0".into()),
                ..m("vdb", "r1", None, 2 * DAY)
            },
        ];
        assert_eq!(plan_folds(&raw, &|id| id == "r0").expect("folds"), []);
        // A missing parent is refused, not folded over.
        let broken = vec![
            m("vda", "a1", Some("a0"), DAY),
            m("vda", "a2", Some("a1"), 2 * DAY),
        ];
        assert!(matches!(
            plan_folds(&broken, &|id| id != "a2"),
            Err(EngineError::Chain { .. })
        ));
    }

    #[test]
    fn children_go_before_their_parents_whatever_the_clock_said() {
        let e = |id: &str, t: u64, parent: Option<&str>| PruneEntry {
            id: id.into(),
            finished_unix_ms: t,
            disks: vec!["vda".into()],
            hold: None,
            folds_into: vec![],
            parents: parent.into_iter().map(String::from).collect(),
        };
        // b9 ← b10 finished in the same millisecond (b10 sorts first by id); c1 ← c2 with the
        // clock stepped back between them; x ↔ y a cycle (a damaged sink).
        let list = [
            e("b9", 5, None),
            e("b10", 5, Some("b9")),
            e("c1", 9, None),
            e("c2", 7, Some("c1")),
            e("x", 1, Some("y")),
            e("y", 2, Some("x")),
        ];
        let refs: Vec<&PruneEntry> = list.iter().collect();
        let order: Vec<&str> = children_first(&refs)
            .iter()
            .map(|e| e.id.as_str())
            .collect();
        let at = |id: &str| order.iter().position(|o| *o == id).expect("listed");
        assert_eq!(order.len(), 6);
        assert!(at("b10") < at("b9"), "{order:?}");
        assert!(at("c2") < at("c1"), "{order:?}");
        assert_eq!(&order[4..], ["y", "x"], "a cycle last, newest first");
    }

    /// Up to 3 disks and 24 backup ids over about two months; each disk takes part in a
    /// random run of the ids (it joins and may leave), each of its backups a full or an
    /// incremental of its previous one.
    fn history() -> impl proptest::strategy::Strategy<Value = BTreeMap<String, Vec<Manifest>>> {
        use proptest::prelude::*;
        const HOUR: u64 = 3_600_000;
        (
            prop::collection::vec(0u64..60 * 24, 1..24),
            prop::collection::vec(
                (
                    0usize..24,
                    0usize..24,
                    prop::collection::vec(any::<bool>(), 24),
                ),
                1..4,
            ),
        )
            .prop_map(|(mut hours, disks)| {
                hours.sort_unstable();
                let n = hours.len();
                let mut out = BTreeMap::new();
                for (k, (a, b, full)) in disks.into_iter().enumerate() {
                    let (from, to) = (a.min(b) % n, a.max(b) % n);
                    let disk = format!("vd{k}");
                    let mut ms: Vec<Manifest> = Vec::new();
                    for i in from..=to.max(from) {
                        let parent = match ms.last() {
                            Some(prev) if !full[i] => Some(prev.backup_id.clone()),
                            _ => None,
                        };
                        ms.push(m(
                            &disk,
                            &format!("b{i:02}"),
                            parent.as_deref(),
                            hours[i] * HOUR + 1,
                        ));
                    }
                    out.insert(disk, ms);
                }
                out
            })
    }

    proptest::proptest! {
        #[test]
        fn after_the_folds_what_stays_reads_only_what_stays_and_children_go_first(
            h in history(),
            last in 0u32..4,
            daily in 0u32..5,
            weekly in 0u32..3,
        ) {
            let policy = KeepPolicy {
                keep_last: last,
                keep_daily: daily,
                keep_weekly: weekly,
                ..KeepPolicy::default()
            };
            let by_disk: BTreeMap<&str, Vec<Manifest>> =
                h.iter().map(|(d, ms)| (d.as_str(), ms.clone())).collect();
            let mut plan = plan_from(&by_disk, &policy).expect("plan");
            annotate_folds(&mut plan, &by_disk).expect("folds");
            let held = |id: &str| plan.iter().any(|e| e.id == id && e.hold.is_some());
            for ms in by_disk.values() {
                // The newest of every disk stays.
                proptest::prop_assert!(held(&ms.last().expect("one").backup_id));
                // Apply the folds to the parent links: every backup that stays then has a
                // chain of backups that stay, and each fold took exactly the doomed
                // backups between it and that parent, oldest first.
                let mut parent: HashMap<&str, Option<String>> =
                    ms.iter().map(|m| (m.backup_id.as_str(), m.parent.clone())).collect();
                for f in plan_folds(ms, &|id| !held(id)).expect("folds") {
                    let mut at = parent[f.into.as_str()].clone();
                    let mut between = Vec::new();
                    while let Some(p) = at.clone().filter(|p| !held(p)) {
                        at = parent[p.as_str()].clone();
                        between.push(p);
                    }
                    between.reverse();
                    proptest::prop_assert_eq!(&between, &f.chain);
                    proptest::prop_assert_eq!(&at, &f.parent);
                    parent.insert(ms.iter().find(|m| m.backup_id == f.into).map(|m| m.backup_id.as_str()).expect("listed"), f.parent.clone());
                }
                for m in ms.iter().filter(|m| held(&m.backup_id)) {
                    let mut at = parent[m.backup_id.as_str()].clone();
                    while let Some(p) = at {
                        proptest::prop_assert!(held(&p), "{} reads {p}, which goes", m.backup_id);
                        at = parent[p.as_str()].clone();
                    }
                }
            }
            // What the policy keeps is held by it.
            let verdicts = retention::plan(
                &plan
                    .iter()
                    .map(|e| Candidate { id: e.id.clone(), finished_unix_ms: e.finished_unix_ms, pinned: false })
                    .collect::<Vec<_>>(),
                &policy,
            )
            .expect("plan");
            for v in &verdicts {
                if let Some(r) = v.kept_by {
                    let e = plan.iter().find(|e| e.id == v.id).expect("listed");
                    proptest::prop_assert_eq!(&e.hold, &Some(Hold::Kept(r)));
                }
            }
            // Deletion order: no doomed backup goes before a doomed child of it.
            let doomed: Vec<&PruneEntry> = plan.iter().filter(|e| e.hold.is_none()).collect();
            let mut parents: HashMap<String, Vec<String>> = HashMap::new();
            for ms in by_disk.values() {
                for m in ms {
                    parents.entry(m.backup_id.clone()).or_default().extend(m.parent.clone());
                }
            }
            let order: Vec<&str> = children_first(&doomed).iter().map(|e| e.id.as_str()).collect();
            proptest::prop_assert_eq!(order.len(), doomed.len());
            for (i, id) in order.iter().enumerate() {
                for later in &order[i + 1..] {
                    let is_parent_of_later = parents.get(*later).is_some_and(|p| p.iter().any(|p| p == id));
                    proptest::prop_assert!(!is_parent_of_later, "{id} goes before its child {later}");
                }
            }
        }
    }
}
