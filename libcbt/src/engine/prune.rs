//! Prune: deletes the backups of one instance that a keep policy does not keep.
//!
//! The instance's disks are kept or dropped together: a backup here is a backup id (shared
//! by the disks one job backed up) and the latest finish time among its disks. The
//! [planner](crate::retention::plan) says which ids the policy keeps; on top of that a backup
//! stays while something depends on it:
//! - the parent chain of every kept backup (until folding exists, a kept incremental keeps
//!   its whole chain, the full included);
//! - the newest backup of every disk: the parent of that disk's next incremental.
//!
//! Everything else goes: whole chains, or the tails of chains a rule cut (a rule may keep an
//! incremental and not its children). Children go before their parents (by the parent links
//! of every disk, not by time, which ties or steps back), so that a crash part way leaves
//! every remaining backup's chain whole, and each backup goes manifest first
//! ([`catalog::forget_backup`]): a crash leaves it uncommitted, never committed with parts
//! missing, and garbage collection takes the rest. Running the same prune again finishes the
//! work. For a libvirt instance, the domain XML and job record saved with a backup go with it.
//!
//! Prune does not look for running jobs: a backup that commits meanwhile has the newest
//! backup of its disk as parent, which the plan holds.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::{catalog, EngineError};
use crate::format::{layout, Manifest};
use crate::retention::{self, Candidate, KeepPolicy, Rule};
use crate::sink::Sink;

/// Why a backup stays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "why", content = "by")]
pub enum Hold {
    /// A rule of the policy keeps it.
    Kept(Rule),
    /// A held backup's chain goes through it: the id of the one whose chain reached it first
    /// (its nearest descendant held by a rule or as a disk's newest).
    BaseOf(String),
    /// The newest backup of a disk: the parent of its next incremental.
    Newest,
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
}

/// The plan for the instance whose disks are `disks`: one entry per backup id, newest first.
pub async fn plan_prune<S: Sink>(
    sink: &S,
    disks: &[String],
    policy: &KeepPolicy,
) -> Result<Vec<PruneEntry>, EngineError> {
    let mut by_disk: BTreeMap<&str, Vec<Manifest>> = BTreeMap::new();
    for d in disks {
        by_disk.insert(d, catalog::list_backups(sink, d).await?);
    }
    Ok(plan_from(&by_disk, policy)?)
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
        let needed: std::collections::HashSet<&str> = left
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
/// [`catalog::list_backups`] gives them).
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
    // Every chain through a held backup, on every disk it has: a backup held for one disk's
    // sake is held on all of them, so its chains there are held too. A walk stops at the
    // first backup held already, so `BaseOf` names the nearest held descendant.
    let order: HashMap<&str, usize> = verdicts
        .iter()
        .enumerate()
        .map(|(i, v)| (v.id.as_str(), i))
        .collect();
    let mut work: Vec<(String, String)> = hold.keys().map(|id| (id.clone(), id.clone())).collect();
    // Popped from the end: the newest first.
    work.sort_by_key(|(id, _)| std::cmp::Reverse(order.get(id.as_str()).copied()));
    let by_id: Vec<HashMap<&str, &Manifest>> = by_disk
        .values()
        .map(|ms| ms.iter().map(|m| (m.backup_id.as_str(), m)).collect())
        .collect();
    while let Some((id, root)) = work.pop() {
        for disk in &by_id {
            let mut at = disk.get(id.as_str()).and_then(|m| m.parent.as_deref());
            // A cycle of parents (a damaged sink) ends where it meets a held backup.
            while let Some(p) = at {
                if hold.contains_key(p) {
                    break;
                }
                hold.insert(p.to_string(), Hold::BaseOf(root.clone()));
                work.push((p.to_string(), root.clone()));
                at = disk.get(p).and_then(|m| m.parent.as_deref());
            }
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
                parents,
            }
        })
        .collect())
}

/// Deletes what `plan` (from [`plan_prune`]) lets go, children before parents. With
/// `instance` (a libvirt domain's uuid), the domain XML and job record of each backup go too.
pub async fn prune<S: Sink>(
    sink: &S,
    plan: &[PruneEntry],
    instance: Option<&str>,
) -> Result<PruneReport, EngineError> {
    let doomed: Vec<&PruneEntry> = plan.iter().filter(|e| e.hold.is_none()).collect();
    let mut report = PruneReport::default();
    for e in children_first(&doomed) {
        for d in &e.disks {
            report.objects += catalog::forget_backup(sink, d, &e.id).await?.len();
        }
        if let Some(uuid) = instance {
            let extra = [
                layout::domain_xml_name(uuid, &e.id),
                layout::job_record_name(uuid, &e.id),
            ];
            sink.delete_many(&extra).await?;
        }
        tracing::info!(backup = %e.id, disks = e.disks.len(), "pruned");
        report.deleted.push(e.id.clone());
    }
    Ok(report)
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
    fn kept_backups_keep_their_chains_on_every_disk_and_the_newest_of_every_disk_stays() {
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
        let plan = plan_from(&by_disk, &p).expect("plan");
        assert_eq!(
            holds(&plan),
            [
                ("a4", Some(Hold::Kept(Rule::Last))),
                ("a3", Some(Hold::BaseOf("a4".into()))),
                ("a2", None),
                ("a1", None),
                ("a0", None),
            ]
        );
        assert_eq!(plan[1].disks, ["vda", "vdb"]);
        // Keeping a1 keeps a0 under it.
        let p = KeepPolicy {
            keep_last: 4,
            ..KeepPolicy::default()
        };
        let plan = plan_from(&by_disk, &p).expect("plan");
        assert_eq!(plan[4].hold, Some(Hold::BaseOf("a1".into())));

        // vdb instead backed up from a1 to a2 only (then detached): its newest, a2, stays,
        // and with it a2's chain on vda, a1 and a0, held for a2.
        by_disk.insert(
            "vdb",
            vec![
                m("vdb", "a1", None, 2 * DAY),
                m("vdb", "a2", Some("a1"), 3 * DAY),
            ],
        );
        let p = KeepPolicy {
            keep_last: 1,
            ..KeepPolicy::default()
        };
        let plan = plan_from(&by_disk, &p).expect("plan");
        assert_eq!(
            holds(&plan),
            [
                ("a4", Some(Hold::Kept(Rule::Last))),
                ("a3", Some(Hold::BaseOf("a4".into()))),
                ("a2", Some(Hold::Newest)),
                ("a1", Some(Hold::BaseOf("a2".into()))),
                ("a0", Some(Hold::BaseOf("a2".into()))),
            ]
        );
    }

    #[test]
    fn children_go_before_their_parents_whatever_the_clock_said() {
        let e = |id: &str, t: u64, parent: Option<&str>| PruneEntry {
            id: id.into(),
            finished_unix_ms: t,
            disks: vec!["vda".into()],
            hold: None,
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
        fn nothing_held_loses_a_parent_and_children_go_first(
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
            let plan = plan_from(&by_disk, &policy).expect("plan");
            let held = |id: &str| plan.iter().any(|e| e.id == id && e.hold.is_some());
            for ms in by_disk.values() {
                // The newest of every disk stays, and every held backup's parent too.
                proptest::prop_assert!(held(&ms.last().expect("one").backup_id));
                for m in ms {
                    if let (true, Some(p)) = (held(&m.backup_id), &m.parent) {
                        proptest::prop_assert!(held(p), "{} held, its parent {p} not", m.backup_id);
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
