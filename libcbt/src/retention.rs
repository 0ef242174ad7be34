//! Retention: which backups of an instance a keep policy keeps, and which rule kept each.
//!
//! The planner is pure (no I/O, no clock): it is given the backups of one instance and a
//! [`KeepPolicy`], and returns a [`Verdict`] per backup. An instance's disks are kept or
//! dropped together, so a backup here is a backup id (shared by the disks of one job) with
//! the time it finished.
//!
//! The rules are those of proxmox-backup's prune, applied in the order `last`, `hourly`,
//! `daily`, `weekly`, `monthly`, `yearly`, each to the backups newest first:
//! - `keep_last = n` keeps the n newest backups.
//! - A calendar rule (`keep_daily = n`, …) walks the periods (days, …) that hold backups,
//!   newest first, and keeps the newest backup of each until n periods are kept. A period
//!   that already holds a backup kept by an earlier rule is passed over without counting,
//!   so the rules add up: `keep_last = 3, keep_daily = 7` keeps the last three and the newest
//!   of the seven days before the ones those three cover.
//! - A pinned backup is always kept, and is outside the policy: the rules keep what they would
//!   keep without the pin (a pinned backup a rule keeps anyway is reported under that rule).
//! - A policy with no rule keeps everything: an empty policy never deletes.
//!
//! Periods are counted in local time at a fixed offset from UTC (`utc_offset_secs`); weeks
//! are ISO weeks (Monday to Sunday, numbered in their ISO year). The verdicts come back newest
//! first, ties broken by id, whatever order the backups were given in.

use std::collections::HashSet;

use chrono::{DateTime, Datelike, FixedOffset, Timelike};
use serde::{Deserialize, Serialize};

/// How many backups of each kind to keep; zero means the rule is not used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeepPolicy {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
    /// Seconds east of UTC of the time zone the calendar rules count in (e.g. 3600 for
    /// UTC+1); less than a day either way (±86,399).
    pub utc_offset_secs: i32,
}

/// Why a backup is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The policy has no rule: everything stays.
    KeepAll,
    /// Pinned by an operator.
    Pinned,
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

/// One backup of an instance, as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub finished_unix_ms: u64,
    pub pinned: bool,
}

/// What the plan says of one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub id: String,
    pub finished_unix_ms: u64,
    /// The rule that keeps it, or `None`: it goes.
    pub kept_by: Option<Rule>,
}

/// A policy the planner cannot apply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("utc_offset_secs {0} is a day or more (±86,399 at most)")]
    Offset(i32),
    #[error("backup {id} is listed twice")]
    Duplicate { id: String },
    #[error("backup {id} finished at {ms} ms, beyond what a calendar holds")]
    Time { id: String, ms: u64 },
}

impl KeepPolicy {
    /// True when no rule is set: the policy keeps everything.
    pub fn keeps_all(&self) -> bool {
        self.rules().iter().all(|(_, n)| *n == 0)
    }

    fn rules(&self) -> [(Rule, u32); 6] {
        [
            (Rule::Last, self.keep_last),
            (Rule::Hourly, self.keep_hourly),
            (Rule::Daily, self.keep_daily),
            (Rule::Weekly, self.keep_weekly),
            (Rule::Monthly, self.keep_monthly),
            (Rule::Yearly, self.keep_yearly),
        ]
    }

    fn offset(&self) -> Result<FixedOffset, PolicyError> {
        FixedOffset::east_opt(self.utc_offset_secs).ok_or(PolicyError::Offset(self.utc_offset_secs))
    }
}

/// The period of `t` under `rule`, as a number unique per period (larger is later). `Last`
/// gives every backup a period of its own (its position).
fn period(rule: Rule, t: &DateTime<FixedOffset>, position: usize) -> i64 {
    let (y, m, d, h) = (
        i64::from(t.year()),
        i64::from(t.month()),
        i64::from(t.day()),
        i64::from(t.hour()),
    );
    match rule {
        Rule::Hourly => ((y * 13 + m) * 32 + d) * 24 + h,
        Rule::Daily => (y * 13 + m) * 32 + d,
        Rule::Weekly => {
            let w = t.iso_week();
            i64::from(w.year()) * 54 + i64::from(w.week())
        }
        Rule::Monthly => y * 13 + m,
        Rule::Yearly => y,
        // Newest first: a smaller position is later.
        Rule::Last | Rule::Pinned | Rule::KeepAll => -(position as i64),
    }
}

/// The plan for the backups of one instance under `policy`: one verdict per backup, newest
/// first (ties by id, descending).
pub fn plan(backups: &[Candidate], policy: &KeepPolicy) -> Result<Vec<Verdict>, PolicyError> {
    let tz = policy.offset()?;
    let mut seen = HashSet::new();
    let mut list: Vec<(&Candidate, DateTime<FixedOffset>)> = Vec::with_capacity(backups.len());
    for b in backups {
        if !seen.insert(b.id.as_str()) {
            return Err(PolicyError::Duplicate { id: b.id.clone() });
        }
        let t = i64::try_from(b.finished_unix_ms)
            .ok()
            .and_then(DateTime::from_timestamp_millis)
            .ok_or_else(|| PolicyError::Time {
                id: b.id.clone(),
                ms: b.finished_unix_ms,
            })?;
        list.push((b, t.with_timezone(&tz)));
    }
    list.sort_by(|(a, _), (b, _)| (b.finished_unix_ms, &b.id).cmp(&(a.finished_unix_ms, &a.id)));
    let mut kept: Vec<Option<Rule>> = vec![None; list.len()];
    if policy.keeps_all() {
        kept.iter_mut().for_each(|k| *k = Some(Rule::KeepAll));
    } else {
        for (rule, n) in policy.rules() {
            if n == 0 {
                continue;
            }
            // Periods that already hold a backup kept by an earlier rule (or a pin).
            let covered: HashSet<i64> = list
                .iter()
                .enumerate()
                .filter(|(i, _)| kept[*i].is_some())
                .map(|(i, (_, t))| period(rule, t, i))
                .collect();
            let mut taken = HashSet::new();
            for (i, (_, t)) in list.iter().enumerate() {
                let p = period(rule, t, i);
                if kept[i].is_some() || covered.contains(&p) || taken.contains(&p) {
                    continue;
                }
                if taken.len() >= n as usize {
                    break;
                }
                taken.insert(p);
                kept[i] = Some(rule);
            }
        }
    }
    // Pins are outside the policy: they neither take a rule's place nor cover a period.
    for (k, (b, _)) in kept.iter_mut().zip(&list) {
        if b.pinned && k.is_none() {
            *k = Some(Rule::Pinned);
        }
    }
    Ok(list
        .iter()
        .zip(kept)
        .map(|((b, _), kept_by)| Verdict {
            id: b.id.clone(),
            finished_unix_ms: b.finished_unix_ms,
            kept_by,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: u64 = 3_600_000;
    const DAY: u64 = 24 * HOUR;
    /// 2026-01-05 00:00 UTC, a Monday.
    const MONDAY: u64 = 1_767_571_200_000;

    fn c(id: &str, ms: u64) -> Candidate {
        Candidate {
            id: id.into(),
            finished_unix_ms: ms,
            pinned: false,
        }
    }

    fn kept(v: &[Verdict]) -> Vec<(&str, Rule)> {
        v.iter()
            .filter_map(|v| v.kept_by.map(|r| (v.id.as_str(), r)))
            .collect()
    }

    #[test]
    fn an_empty_policy_keeps_everything() {
        let b = [c("a", MONDAY), c("b", MONDAY + 1)];
        let v = plan(&b, &KeepPolicy::default()).expect("plan");
        assert_eq!(kept(&v), [("b", Rule::KeepAll), ("a", Rule::KeepAll)]);
    }

    #[test]
    fn nightly_backups_under_last_daily_weekly() {
        // 30 nights at 02:00, a second backup at 14:00 on the last day.
        let mut b: Vec<Candidate> = (0..30)
            .map(|d| c(&format!("n{d:02}"), MONDAY + d * DAY + 2 * HOUR))
            .collect();
        b.push(c("extra", MONDAY + 29 * DAY + 14 * HOUR));
        let p = KeepPolicy {
            keep_last: 2,
            keep_daily: 3,
            keep_weekly: 2,
            ..KeepPolicy::default()
        };
        let v = plan(&b, &p).expect("plan");
        // Day 29 is 2026-02-03, a Tuesday. Last: extra and n29 (day 29 is then covered).
        // Daily: n28, n27, n26. Weekly: the weeks of days 28-29 and 21-27 hold kept backups,
        // so the two weeks kept are those of days 14-20 (n20) and 7-13 (n13).
        assert_eq!(
            kept(&v),
            [
                ("extra", Rule::Last),
                ("n29", Rule::Last),
                ("n28", Rule::Daily),
                ("n27", Rule::Daily),
                ("n26", Rule::Daily),
                ("n20", Rule::Weekly),
                ("n13", Rule::Weekly),
            ]
        );
    }

    #[test]
    fn a_pinned_backup_stays_outside_the_policy() {
        let mut b = vec![
            c("old", MONDAY),
            c("mid", MONDAY + DAY),
            c("new", MONDAY + 2 * DAY),
        ];
        b[0].pinned = true;
        b[2].pinned = true;
        let p = KeepPolicy {
            keep_last: 1,
            ..KeepPolicy::default()
        };
        let v = plan(&b, &p).expect("plan");
        assert_eq!(kept(&v), [("new", Rule::Last), ("old", Rule::Pinned)]);
    }

    #[test]
    fn the_day_boundary_follows_the_offset() {
        // 23:30 and 00:30 UTC are one day at UTC+2 (01:30 and 02:30), two at UTC.
        let b = [c("a", MONDAY - HOUR / 2), c("b", MONDAY + HOUR / 2)];
        let mut p = KeepPolicy {
            keep_daily: 5,
            ..KeepPolicy::default()
        };
        assert_eq!(kept(&plan(&b, &p).expect("plan")).len(), 2);
        p.utc_offset_secs = 7200;
        assert_eq!(kept(&plan(&b, &p).expect("plan")), [("b", Rule::Daily)]);
    }

    #[test]
    fn bad_input_is_refused() {
        let p = KeepPolicy {
            utc_offset_secs: 90_000,
            ..KeepPolicy::default()
        };
        assert_eq!(plan(&[], &p), Err(PolicyError::Offset(90_000)));
        let b = [c("a", 1), c("a", 2)];
        assert!(matches!(
            plan(&b, &KeepPolicy::default()),
            Err(PolicyError::Duplicate { .. })
        ));
        let b = [c("a", u64::MAX)];
        assert!(matches!(
            plan(&b, &KeepPolicy::default()),
            Err(PolicyError::Time { .. })
        ));
    }

    fn policy() -> impl Strategy<Value = KeepPolicy> {
        (
            prop::array::uniform6(prop_oneof![3 => Just(0u32), 2 => 1u32..6]),
            prop_oneof![Just(0i32), -50_400i32..=50_400],
        )
            .prop_map(|(n, off)| KeepPolicy {
                keep_last: n[0],
                keep_hourly: n[1],
                keep_daily: n[2],
                keep_weekly: n[3],
                keep_monthly: n[4],
                keep_yearly: n[5],
                utc_offset_secs: off,
            })
    }

    /// Up to 60 backups over about three years, some close together, a few pinned.
    fn backups() -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::vec(
            (
                prop_oneof![0u64..3 * 365 * DAY, 0u64..3 * DAY],
                prop::bool::weighted(0.05),
            ),
            0..60,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (t, pinned))| Candidate {
                    id: format!("b{i}"),
                    finished_unix_ms: MONDAY + t,
                    pinned,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn the_plan_does_not_depend_on_the_listing_order(
            b in backups(), p in policy(), seed in any::<u64>()
        ) {
            use rand::seq::SliceRandom;
            use rand::SeedableRng;
            let mut shuffled = b.clone();
            shuffled.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(seed));
            prop_assert_eq!(plan(&b, &p).expect("plan"), plan(&shuffled, &p).expect("plan"));
        }

        #[test]
        fn no_rule_drops_what_it_must_keep(b in backups(), p in policy()) {
            let v = plan(&b, &p).expect("plan");
            prop_assert_eq!(v.len(), b.len());
            // Newest first.
            prop_assert!(v.windows(2).all(|w| w[0].finished_unix_ms >= w[1].finished_unix_ms));
            // Pins always stay and change nothing else; an empty policy keeps all.
            let unpinned: Vec<Candidate> =
                b.iter().map(|c| Candidate { pinned: false, ..c.clone() }).collect();
            let without = plan(&unpinned, &p).expect("plan");
            for (x, y) in v.iter().zip(&without) {
                let pinned = b.iter().any(|c| c.id == x.id && c.pinned);
                prop_assert_eq!(&x.id, &y.id);
                prop_assert!(!pinned || x.kept_by.is_some());
                prop_assert!(!p.keeps_all() || x.kept_by.is_some());
                if y.kept_by.is_some() || !pinned {
                    prop_assert_eq!(x.kept_by, y.kept_by);
                }
            }
            let v = without;
            if p.keeps_all() {
                return Ok(());
            }
            let tz = p.offset().expect("offset");
            let when = |x: &Verdict| {
                DateTime::from_timestamp_millis(x.finished_unix_ms as i64)
                    .expect("time")
                    .with_timezone(&tz)
            };
            // keep_last: the n newest stay.
            for x in v.iter().take(p.keep_last as usize) {
                prop_assert!(x.kept_by.is_some(), "{} is among the {} newest", x.id, p.keep_last);
            }
            for (rule, n) in p.rules().into_iter().skip(1) {
                // Each of the n newest periods holding backups keeps one of them, …
                let mut periods: Vec<i64> = v.iter().map(|x| period(rule, &when(x), 0)).collect();
                periods.dedup();
                for per in periods.iter().take(n as usize) {
                    prop_assert!(
                        v.iter().any(|x| x.kept_by.is_some() && period(rule, &when(x), 0) == *per),
                        "{rule:?} period {per} has no kept backup"
                    );
                }
                // … and one the rule kept is the newest of its period.
                for x in v.iter().filter(|x| x.kept_by == Some(rule)) {
                    let per = period(rule, &when(x), 0);
                    let newest = v.iter().find(|y| period(rule, &when(y), 0) == per);
                    prop_assert_eq!(newest.map(|y| &y.id), Some(&x.id));
                }
                // A rule keeps at most n.
                let count = v.iter().filter(|x| x.kept_by == Some(rule)).count();
                prop_assert!(count <= n as usize);
            }
            prop_assert!(v.iter().filter(|x| x.kept_by == Some(Rule::Last)).count()
                <= p.keep_last as usize);
        }
    }
}
