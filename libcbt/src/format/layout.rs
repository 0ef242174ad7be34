//! Every object name on a sink, in one place. `libcbt/FORMAT.md` lists the same table for
//! writers of independent readers.
//!
//! | object | name | written |
//! |---|---|---|
//! | segment | `disks/<disk>/segments/<segment-id:032x>.seg` | once, then immutable |
//! | index | `disks/<disk>/backups/<backup-id>.idx` | create-only, before the manifest |
//! | recency entry | `disks/<disk>/recent/<u64::MAX - finished-ms:020>-<backup-id>` (empty) | create-only, just before the manifest: newest first in name order, so the newest backup is found with one listing request |
//! | manifest | `disks/<disk>/backups/<backup-id>.manifest` | create-only, last: its presence is the commit |
//! | folded index, manifest | `disks/<disk>/backups/<backup-id>.g<N>.idx`, `.g<N>.manifest` (N ≥ 1) | create-only, by a fold into the backup: the highest generation's manifest is the backup |
//! | in-progress marker | `inprogress/<disk>/<backup-id>.json` | create-only, before the first segment; deleted after the commit or the rollback |
//! | domain XML | `domains/<domain-uuid>/<backup-id>.xml` | create-only, before the disks (libvirt jobs) |
//! | job record | `domains/<domain-uuid>/<backup-id>.json` | after the commit (`cbt-hostd`: labels, caller, quiesce outcome) |
//!
//! A segment id's high 64 bits are the backup's *segment prefix* (recorded in its in-progress
//! marker), so what an interrupted backup wrote can be told from everything else without
//! looking at ages.

use super::SegmentId;

/// Prefix of everything stored for `disk` except its markers.
pub fn disk_prefix(disk: &str) -> String {
    format!("disks/{disk}/")
}

/// Prefix of the indexes and manifests of `disk`.
pub fn backups_prefix(disk: &str) -> String {
    format!("disks/{disk}/backups/")
}

/// Prefix of every object of backup `backup` of `disk` that is named after it.
pub fn backup_objects_prefix(disk: &str, backup: &str) -> String {
    format!("disks/{disk}/backups/{backup}.")
}

/// Object name of a segment.
pub fn segment_name(disk: &str, id: SegmentId) -> String {
    format!("disks/{disk}/segments/{id:032x}.seg")
}

/// True for a segment's name, `disks/<disk>/segments/<32 hex digits>.seg` (the only objects
/// cbt writes in parts, so the only unfinished uploads that are its to sweep).
pub fn is_segment_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    matches!(parts.as_slice(), ["disks", d, "segments", f]
        if crate::sink::check_name(d).is_ok()
            && f.strip_suffix(".seg")
                .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit())))
}

/// Prefix of the segments written by the backup whose segment prefix is `prefix`.
pub fn segment_prefix_name(disk: &str, prefix: u64) -> String {
    format!("disks/{disk}/segments/{prefix:016x}")
}

/// Object name of a backup's index.
pub fn index_name(disk: &str, backup: &str) -> String {
    format!("disks/{disk}/backups/{backup}.idx")
}

/// Object name of the index of generation `generation` of a backup (0: [`index_name`]).
pub fn index_name_gen(disk: &str, backup: &str, generation: u32) -> String {
    match generation {
        0 => index_name(disk, backup),
        g => format!("disks/{disk}/backups/{backup}.g{g}.idx"),
    }
}

/// Object name of the manifest of generation `generation` of a backup (0: [`manifest_name`]).
pub fn manifest_name_gen(disk: &str, backup: &str, generation: u32) -> String {
    match generation {
        0 => manifest_name(disk, backup),
        g => format!("disks/{disk}/backups/{backup}.g{g}.manifest"),
    }
}

/// What an object under [`backups_prefix`] is: an index or a manifest (`true`), of which
/// backup, of which generation. `None`: a name cbt does not write there.
pub fn parse_backup_object(disk: &str, name: &str) -> Option<(String, u32, bool)> {
    let rest = name.strip_prefix(&backups_prefix(disk))?;
    let (stem, manifest) = if let Some(s) = rest.strip_suffix(".manifest") {
        (s, true)
    } else {
        (rest.strip_suffix(".idx")?, false)
    };
    let (id, generation) = match stem.split_once('.') {
        None => (stem, 0),
        Some((id, g)) => {
            let g = g.strip_prefix('g')?;
            // Canonical decimal only, so that one generation has one name.
            if g.is_empty() || g.starts_with('0') || !g.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (id, g.parse::<u32>().ok().filter(|g| *g > 0)?)
        }
    };
    super::BackupId::parse(id).ok()?;
    Some((id.to_string(), generation, manifest))
}

/// Prefix of the recency entries of `disk`.
pub fn recent_prefix(disk: &str) -> String {
    format!("disks/{disk}/recent/")
}

/// Object name of the recency entry of a backup of `disk` that finished at `finished_ms`:
/// entries sort newest first.
pub fn recent_name(disk: &str, finished_ms: u64, backup: &str) -> String {
    format!(
        "disks/{disk}/recent/{:020}-{backup}",
        u64::MAX - finished_ms
    )
}

/// The finish time and backup id a recency entry names (`None`: not one).
pub fn parse_recent(disk: &str, name: &str) -> Option<(u64, String)> {
    let rest = name.strip_prefix(&recent_prefix(disk))?;
    let (inv, backup) = rest.split_once('-')?;
    // Read from storage: only a valid backup id names a manifest to read.
    if inv.len() != 20 || super::BackupId::parse(backup).is_err() {
        return None;
    }
    let inv: u64 = inv.parse().ok()?;
    Some((u64::MAX - inv, backup.to_string()))
}

/// Object name of a backup's manifest.
pub fn manifest_name(disk: &str, backup: &str) -> String {
    format!("disks/{disk}/backups/{backup}.manifest")
}

/// Object name of the in-progress marker of a backup of `disk`.
pub fn marker_name(disk: &str, backup: &str) -> String {
    format!("inprogress/{disk}/{backup}.json")
}

/// Prefix of the in-progress markers of `disk`.
pub fn markers_prefix(disk: &str) -> String {
    format!("inprogress/{disk}/")
}

/// Object name of the libvirt domain XML saved with a backup.
pub fn domain_xml_name(domain_uuid: &str, backup: &str) -> String {
    format!("domains/{domain_uuid}/{backup}.xml")
}

/// Object name of the job record `cbt-hostd` saves with a backup.
pub fn job_record_name(domain_uuid: &str, backup: &str) -> String {
    format!("domains/{domain_uuid}/{backup}.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_are_told_from_the_rest() {
        assert!(is_segment_name(&segment_name("u.vda", 0xdead_beef)));
        for n in [
            "disks/u.vda/backups/b1.manifest",
            "disks/u.vda/segments/x.seg",
            "other/app/file",
            "disks/u.vda/segments/0123456789abcdef0123456789abcdef.seg/x",
        ] {
            assert!(!is_segment_name(n), "{n}");
        }
    }

    #[test]
    fn generation_names_parse_back_and_nothing_else_does() {
        let d = "u.vda";
        for g in [0, 1, 7, 12, u32::MAX] {
            assert_eq!(
                parse_backup_object(d, &manifest_name_gen(d, "b-1", g)),
                Some(("b-1".into(), g, true))
            );
            assert_eq!(
                parse_backup_object(d, &index_name_gen(d, "b-1", g)),
                Some(("b-1".into(), g, false))
            );
            crate::sink::check_name(&manifest_name_gen(d, "b-1", g)).expect("valid");
        }
        for n in [
            "disks/u.vda/backups/b-1.g0.manifest",
            "disks/u.vda/backups/b-1.g01.idx",
            "disks/u.vda/backups/b-1.g.idx",
            "disks/u.vda/backups/b-1.x1.idx",
            "disks/u.vda/backups/b-1.g1.g2.idx",
            "disks/u.vda/backups/b-1.g99999999999.idx",
            "disks/u.vda/backups/b.1.manifest",
            "disks/u.vda/backups/b-1.json",
            "disks/u.vdb/backups/b-1.idx",
        ] {
            assert_eq!(parse_backup_object(d, n), None, "{n}");
        }
    }

    #[test]
    fn recency_entries_sort_newest_first_and_parse_back() {
        let d = "uuid.vda";
        let old = recent_name(d, 1_000, "b-1");
        let new = recent_name(d, 2_000, "b-2");
        assert!(new < old);
        assert!(new.starts_with(&recent_prefix(d)));
        assert_eq!(parse_recent(d, &new), Some((2_000, "b-2".into())));
        assert_eq!(
            parse_recent(d, &recent_name(d, 0, "x")),
            Some((0, "x".into()))
        );
        assert_eq!(parse_recent(d, "disks/uuid.vda/recent/12-x"), None);
        assert_eq!(parse_recent("other", &new), None);
        crate::sink::check_name(&recent_name(d, u64::MAX, "a_b-c")).expect("valid name");
    }

    #[test]
    fn names_are_valid_object_names_and_share_their_prefixes() {
        let (d, b) = ("0b2c-uuid.vda", "20261202T052841-00ff");
        let seg = segment_name(d, 0x0123_4567_89ab_cdef_0000_0000_0000_0001);
        for n in [
            seg.clone(),
            index_name(d, b),
            manifest_name(d, b),
            marker_name(d, b),
            domain_xml_name("u", b),
            job_record_name("u", b),
        ] {
            crate::sink::check_name(&n).expect(&n);
        }
        assert!(seg.starts_with(&segment_prefix_name(d, 0x0123_4567_89ab_cdef)));
        assert!(index_name(d, b).starts_with(&backup_objects_prefix(d, b)));
        assert!(manifest_name(d, b).starts_with(&backups_prefix(d)));
        assert!(marker_name(d, b).starts_with(&markers_prefix(d)));
        assert!(!marker_name(d, b).starts_with(&disk_prefix(d)));
    }
}
