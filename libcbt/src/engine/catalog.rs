//! What is committed on a sink: manifests by disk.

use std::time::{Duration, SystemTime};

use super::EngineError;
use crate::format::{self, layout, Manifest, Marker};
use crate::sink::{ObjectInfo, Sink};

/// Committed backups of `disk`, oldest first (by finish time, then id): the manifest of the
/// highest generation of each. Unreadable manifests are an error: a catalog that silently
/// drops one could pick the wrong parent.
pub async fn list_backups<S: Sink>(sink: &S, disk: &str) -> Result<Vec<Manifest>, EngineError> {
    let mut current: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
    for o in sink.list(&layout::backups_prefix(disk)).await? {
        if !o.name.ends_with(".manifest") {
            continue;
        }
        let Some((id, generation, _)) = layout::parse_backup_object(disk, &o.name) else {
            return Err(EngineError::Mismatch {
                object: o.name,
                pos: 0,
                what: "not a manifest name cbt writes",
            });
        };
        let g = current.entry(id).or_insert(generation);
        *g = (*g).max(generation);
    }
    let mut out = Vec::with_capacity(current.len());
    for (id, generation) in current {
        let name = layout::manifest_name_gen(disk, &id, generation);
        let bytes = sink
            .get(&name, format::manifest::MAX_MANIFEST as u64)
            .await?;
        out.push(check_manifest(&bytes, name, disk, &id, generation)?);
    }
    out.sort_by(|a, b| (a.finished_unix_ms, &a.backup_id).cmp(&(b.finished_unix_ms, &b.backup_id)));
    Ok(out)
}

/// Decodes the manifest stored as `name`, which must be generation `generation` of backup
/// `backup` of `disk`: its id names the objects prune and forget delete, so it must be the
/// very one it is stored under.
fn check_manifest(
    bytes: &[u8],
    name: String,
    disk: &str,
    backup: &str,
    generation: u32,
) -> Result<Manifest, EngineError> {
    let m = Manifest::decode(bytes).map_err(|source| EngineError::Corrupt {
        object: name.clone(),
        pos: 0,
        source,
    })?;
    if m.disk != disk || m.backup_id != backup || m.generation != generation {
        return Err(EngineError::Mismatch {
            object: name,
            pos: 0,
            what: "manifest names another backup, disk or generation",
        });
    }
    Ok(m)
}

/// The generations of backup `backup` of `disk` on the sink: of its manifests, and of any of
/// its objects (an index a fold wrote before it died counts too: a new generation goes above).
pub(crate) async fn generations<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
) -> Result<(Option<u32>, Option<u32>), EngineError> {
    let (mut manifest, mut any) = (None, None);
    for o in sink
        .list(&layout::backup_objects_prefix(disk, backup))
        .await?
    {
        if let Some((id, g, is_manifest)) = layout::parse_backup_object(disk, &o.name) {
            if id == backup {
                any = any.max(Some(g));
                if is_manifest {
                    manifest = manifest.max(Some(g));
                }
            }
        }
    }
    Ok((manifest, any))
}

/// Disks that have objects on the sink: one delimiter listing (a request per 1,000 disks on
/// an object store), never a listing of their backups or segments.
pub async fn list_disks<S: Sink>(sink: &S) -> Result<Vec<String>, EngineError> {
    Ok(sink.list_dirs("disks/").await?)
}

/// The disks of instance `uuid`: those named `<uuid>.<target>`, as libvirt jobs name them
/// (one delimiter listing, as [`list_disks`]).
pub async fn instance_disks<S: Sink>(sink: &S, uuid: &str) -> Result<Vec<String>, EngineError> {
    let prefix = format!("{uuid}.");
    let mut disks = list_disks(sink).await?;
    disks.retain(|d| d.starts_with(&prefix));
    Ok(disks)
}

/// Disks with anything on the sink: objects under `disks/` or only an in-progress marker (a
/// backup that died before its first segment). What garbage collection and recovery visit.
pub async fn disks_with_objects<S: Sink>(sink: &S) -> Result<Vec<String>, EngineError> {
    let mut disks = list_disks(sink).await?;
    for o in sink.list("inprogress/").await? {
        if let Some(d) = o.name.split('/').nth(1) {
            disks.push(d.to_string());
        }
    }
    disks.sort();
    disks.dedup();
    Ok(disks)
}

/// Recency entries read to find the newest backup before reading every manifest instead.
const RECENT_LOOKAHEAD: usize = 16;

/// The newest committed backup of `disk`: the parent of the next incremental.
///
/// Costs one listing and one manifest read whatever the history's length: the recency
/// entries (`layout::recent_name`) sort newest first, and each is written before its
/// manifest, so the first entry whose manifest exists (and names the same finish time) is the
/// newest commit. Entries of backups that never committed are skipped; a disk without entries
/// (written before they existed) or with only such entries up front is read in full.
pub async fn latest<S: Sink>(sink: &S, disk: &str) -> Result<Option<Manifest>, EngineError> {
    let entries = sink
        .list_first(&layout::recent_prefix(disk), RECENT_LOOKAHEAD)
        .await?;
    let mut newest: Option<Manifest> = None;
    for e in &entries {
        let Some((finished, id)) = layout::parse_recent(disk, &e.name) else {
            continue;
        };
        // Past the first commit's finish time: nothing newer follows. Within it, the largest
        // id wins, as in list_backups.
        if newest
            .as_ref()
            .is_some_and(|n| n.finished_unix_ms != finished)
        {
            break;
        }
        if let Some(m) = read_manifest(sink, disk, &id).await? {
            if m.finished_unix_ms == finished
                && newest.as_ref().is_none_or(|n| m.backup_id > n.backup_id)
            {
                newest = Some(m);
            }
        }
    }
    if newest.is_some() {
        return Ok(newest);
    }
    Ok(list_backups(sink, disk).await?.pop())
}

/// The manifest of backup `backup` of `disk` (its highest generation), if it is committed.
/// One listing and one read.
pub async fn read_manifest<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
) -> Result<Option<Manifest>, EngineError> {
    let (Some(generation), _) = generations(sink, disk, backup).await? else {
        return Ok(None);
    };
    let name = layout::manifest_name_gen(disk, backup, generation);
    let bytes = match sink.get(&name, format::manifest::MAX_MANIFEST as u64).await {
        Ok(b) => b,
        // Deleted since the listing: gone, or (a fold racing) read again.
        Err(crate::sink::SinkError::NotFound { .. }) => {
            return read_manifest_once(sink, disk, backup).await
        }
        Err(e) => return Err(e.into()),
    };
    check_manifest(&bytes, name, disk, backup, generation).map(Some)
}

/// [`read_manifest`] without the retry after a race.
async fn read_manifest_once<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
) -> Result<Option<Manifest>, EngineError> {
    let (Some(generation), _) = generations(sink, disk, backup).await? else {
        return Ok(None);
    };
    let name = layout::manifest_name_gen(disk, backup, generation);
    match sink.get(&name, format::manifest::MAX_MANIFEST as u64).await {
        Ok(b) => check_manifest(&b, name, disk, backup, generation).map(Some),
        Err(crate::sink::SinkError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes one committed backup of `disk`, keeping what the disk's other backups still read
/// (a fold hands a backup's segments to its children). The caller makes sure no backup has
/// it as parent. Returns the objects deleted.
pub async fn forget_backup<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
) -> Result<Vec<String>, EngineError> {
    let all = list_backups(sink, disk).await?;
    let Some(m) = all.iter().find(|m| m.backup_id == backup) else {
        return Ok(Vec::new());
    };
    let others: Vec<&Manifest> = all.iter().filter(|o| o.backup_id != backup).collect();
    forget_among(sink, m, &others).await
}

/// Removes backup `m` whose disk's other committed backups are `others`. Its older
/// generations' manifests go first (hidden behind the current one), then the current
/// manifest (so a crash in between leaves an uncommitted backup, never a committed one with
/// missing parts, nor an older generation whose parent a fold removed), then its indexes,
/// recency entry, and the segments it lists that no other backup lists.
pub(crate) async fn forget_among<S: Sink>(
    sink: &S,
    m: &Manifest,
    others: &[&Manifest],
) -> Result<Vec<String>, EngineError> {
    let (disk, backup) = (m.disk.as_str(), m.backup_id.as_str());
    let mut manifests = Vec::new();
    let mut rest = vec![layout::recent_name(disk, m.finished_unix_ms, backup)];
    for o in sink
        .list(&layout::backup_objects_prefix(disk, backup))
        .await?
    {
        match layout::parse_backup_object(disk, &o.name) {
            Some((id, g, true)) if id == backup => manifests.push((g, o.name)),
            Some((id, _, false)) if id == backup => rest.push(o.name),
            _ => {}
        }
    }
    manifests.sort();
    let shared: std::collections::HashSet<&str> = others
        .iter()
        .flat_map(|o| o.segments.iter().map(String::as_str))
        .collect();
    rest.extend(
        m.segments
            .iter()
            .filter(|s| !shared.contains(s.as_str()))
            .cloned(),
    );
    let mut gone = Vec::new();
    for (_, name) in manifests {
        sink.delete(&name).await?;
        gone.push(name);
    }
    // The backup is gone with its manifest: what is locked still stays for a collection.
    let locked = delete_unlocked(sink, &rest).await?;
    gone.extend(rest.into_iter().filter(|n| !locked.contains(n)));
    Ok(gone)
}

/// Deletes `names` but those the sink keeps locked (S3 Object Lock), which are returned:
/// they stay, unreferenced, for a later collection once their lock ends.
pub(crate) async fn delete_unlocked<S: Sink>(
    sink: &S,
    names: &[String],
) -> Result<Vec<String>, EngineError> {
    match sink.delete_many(names).await {
        Ok(()) => Ok(Vec::new()),
        Err(crate::sink::SinkError::Locked { names }) => {
            tracing::info!(objects = names.len(), first = ?names.first(), "locked objects left until their retention ends");
            Ok(names)
        }
        Err(e) => Err(e.into()),
    }
}

/// True when `backup` is a backup id `disk` has used or is using: a committed manifest, an
/// index or an in-progress marker of that name exists (an id is never reused, so that no
/// backup can replace or be confused with another).
pub async fn backup_id_taken<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
) -> Result<bool, EngineError> {
    if !sink
        .list(&layout::backup_objects_prefix(disk, backup))
        .await?
        .is_empty()
    {
        return Ok(true);
    }
    let marker = layout::marker_name(disk, backup);
    Ok(sink.list(&marker).await?.iter().any(|o| o.name == marker))
}

/// Names referenced by the committed manifests of `disk`.
async fn referenced<S: Sink>(
    sink: &S,
    disk: &str,
) -> Result<std::collections::BTreeSet<String>, EngineError> {
    let mut used = std::collections::BTreeSet::new();
    for m in list_backups(sink, disk).await? {
        used.insert(layout::manifest_name_gen(disk, &m.backup_id, m.generation));
        used.insert(layout::recent_name(disk, m.finished_unix_ms, &m.backup_id));
        used.insert(m.index.name.clone());
        used.extend(m.segments.iter().cloned());
    }
    Ok(used)
}

/// Objects under `disks/<disk>/` that no committed manifest references: what interrupted
/// backups wrote, and what running ones are writing. See [`collect_garbage`] for what is safe
/// to delete.
pub async fn orphans<S: Sink>(sink: &S, disk: &str) -> Result<Vec<ObjectInfo>, EngineError> {
    let used = referenced(sink, disk).await?;
    Ok(sink
        .list(&layout::disk_prefix(disk))
        .await?
        .into_iter()
        .filter(|o| !used.contains(&o.name))
        .collect())
}

async fn read_marker<S: Sink>(sink: &S, name: &str) -> Result<Option<Marker>, EngineError> {
    match sink.get(name, format::marker::MAX_MARKER).await {
        Ok(b) => Marker::decode(&b)
            .map(Some)
            .map_err(|source| EngineError::Corrupt {
                object: name.into(),
                pos: 0,
                source,
            }),
        Err(crate::sink::SinkError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the orphans of `disk` that are safe to delete with other writers about: older than
/// `grace` and not covered by an in-progress marker younger than `grace` (the marker's index
/// and segment prefix). Markers older than `grace` are deleted too (their writer is taken to be
/// dead: a running backup renews its marker every
/// [`BackupOptions::marker_refresh`](crate::engine::BackupOptions::marker_refresh)). Temporary
/// files are the sink's own business ([`Sink::remove_stale_partials`]). Returns the names
/// deleted.
pub async fn collect_garbage<S: Sink>(
    sink: &S,
    disk: &str,
    grace: Duration,
) -> Result<Vec<String>, EngineError> {
    Ok(collect_garbage_listed(sink, disk, grace)
        .await?
        .into_iter()
        .map(|o| o.name)
        .collect())
}

/// [`collect_garbage`], returning the objects deleted as they were listed (with their sizes).
pub async fn collect_garbage_listed<S: Sink>(
    sink: &S,
    disk: &str,
    grace: Duration,
) -> Result<Vec<ObjectInfo>, EngineError> {
    let now = SystemTime::now();
    let mut live = Vec::new();
    let mut gone = Vec::new();
    for o in sink.list(&layout::markers_prefix(disk)).await? {
        if o.older_than(grace, now) {
            sink.delete(&o.name).await?;
            gone.push(o);
            continue;
        }
        // Unreadable or odd: covers nothing we can name, but keeps the disk's orphans.
        match read_marker(sink, &o.name).await {
            Ok(Some(m)) if m.disk == disk => live.push(Some(m)),
            Ok(None) => {}
            _ => live.push(None),
        }
    }
    if live.iter().any(Option::is_none) {
        tracing::warn!(
            disk,
            "an unreadable in-progress marker: garbage collection of the disk skipped"
        );
        return Ok(gone);
    }
    let covered = |name: &str| {
        live.iter().flatten().any(|m| {
            name.starts_with(&layout::backup_objects_prefix(disk, &m.backup_id))
                || m.prefix()
                    .is_some_and(|p| name.starts_with(&layout::segment_prefix_name(disk, p)))
        })
    };
    let doomed: Vec<ObjectInfo> = orphans(sink, disk)
        .await?
        .into_iter()
        .filter(|o| o.older_than(grace, now) && !covered(&o.name))
        .collect();
    let names: Vec<String> = doomed.iter().map(|o| o.name.clone()).collect();
    let locked = delete_unlocked(sink, &names).await?;
    gone.extend(doomed.into_iter().filter(|o| !locked.contains(&o.name)));
    if !gone.is_empty() {
        tracing::info!(disk, objects = gone.len(), "garbage collected");
    }
    Ok(gone)
}

/// What [`collect_sink_garbage`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Unfinished uploads and temporary files ([`Sink::remove_stale_partials`]).
    pub partials: u64,
    /// Objects deleted by [`collect_garbage`], over every disk.
    pub objects: Vec<String>,
    /// Their bytes, as listed.
    pub bytes: u64,
}

/// Garbage collection of a whole sink, safe with other writers: stale partial uploads, then
/// [`collect_garbage`] on every disk with anything on the sink.
pub async fn collect_sink_garbage<S: Sink>(
    sink: &S,
    grace: Duration,
) -> Result<GcReport, EngineError> {
    let mut r = GcReport {
        partials: sink.remove_stale_partials(grace).await?,
        ..GcReport::default()
    };
    for d in disks_with_objects(sink).await? {
        for o in collect_garbage_listed(sink, &d, grace).await? {
            r.bytes += o.len;
            r.objects.push(o.name);
        }
    }
    Ok(r)
}

/// Removes what an interrupted backup `backup` of `disk` wrote, whatever its age, when its
/// in-progress marker is there to say what that is: its segments (by the marker's prefix) and
/// index, unless a committed manifest references them, then the marker. Without a marker
/// nothing is deleted (the backup had not begun on this disk, or finished its clean-up).
/// Returns the names deleted.
pub async fn abandon_backup<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
) -> Result<Vec<String>, EngineError> {
    let name = layout::marker_name(disk, backup);
    let Some(m) = read_marker(sink, &name).await? else {
        return Ok(Vec::new());
    };
    if m.disk != disk || m.backup_id != backup {
        return Err(EngineError::Invalid(format!(
            "in-progress marker {name} names backup {} of {}",
            m.backup_id, m.disk
        )));
    }
    let used = referenced(sink, disk).await?;
    let mut gone = Vec::new();
    let mut doomed: Vec<String> = sink
        .list(&layout::backup_objects_prefix(disk, backup))
        .await?
        .into_iter()
        .map(|o| o.name)
        .collect();
    if let Some(p) = m.prefix() {
        doomed.extend(
            sink.list(&layout::segment_prefix_name(disk, p))
                .await?
                .into_iter()
                .map(|o| o.name),
        );
    }
    doomed.extend(
        sink.list(&layout::recent_prefix(disk))
            .await?
            .into_iter()
            .filter(|o| layout::parse_recent(disk, &o.name).is_some_and(|(_, id)| id == backup))
            .map(|o| o.name),
    );
    doomed.retain(|n| !used.contains(n));
    sink.delete_many(&doomed).await?;
    gone.extend(doomed);
    sink.delete(&name).await?;
    gone.push(name);
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::local::LocalSink;
    use std::time::Duration;

    const D: &str = "vm-1.vda";

    /// Sets an object's modification time `age` in the past.
    fn age(sink: &LocalSink, name: &str, age: Duration) {
        let f = std::fs::File::options()
            .write(true)
            .open(sink.root().join(name))
            .expect(name);
        f.set_modified(SystemTime::now() - age).expect("mtime");
    }

    async fn commit(sink: &LocalSink, backup: &str, segs: &[String]) {
        let mut m = format::manifest::tests::sample();
        m.disk = D.into();
        m.backup_id = backup.into();
        m.index.name = format::index_name(D, backup);
        m.segments = segs.to_vec();
        sink.put(&m.index.name, vec![1]).await.expect("idx");
        for s in segs {
            sink.put(s, vec![2]).await.expect("seg");
        }
        sink.put_new(&format::manifest_name(D, backup), m.encode())
            .await
            .expect("manifest");
    }

    async fn marker(sink: &LocalSink, backup: &str, prefix: u64) {
        let m = Marker {
            backup_id: backup.into(),
            disk: D.into(),
            segment_prefix: format!("{prefix:016x}"),
            host: "h".into(),
            pid: 1,
            started_unix_ms: 0,
        };
        sink.put_new(&layout::marker_name(D, backup), m.encode())
            .await
            .expect("marker");
    }

    async fn names(sink: &LocalSink) -> Vec<String> {
        let mut v: Vec<String> = sink
            .list("")
            .await
            .expect("list")
            .into_iter()
            .map(|o| o.name)
            .collect();
        v.sort();
        v
    }

    fn seg(prefix: u64, n: u64) -> String {
        format::segment_name(D, (u128::from(prefix) << 64) | u128::from(n))
    }

    #[tokio::test]
    async fn garbage_collection_spares_young_and_covered_objects_and_committed_backups() {
        let dir = tempfile::tempdir().expect("tmp");
        let sink = LocalSink::open(dir.path()).expect("sink");
        let day = Duration::from_secs(86_400);
        let old = Duration::from_secs(2 * 86_400);
        commit(&sink, "b0", &[seg(1, 1)]).await;
        for n in [
            format::manifest_name(D, "b0"),
            format::index_name(D, "b0"),
            seg(1, 1),
        ] {
            age(&sink, &n, old);
        }
        // A dead backup's leftovers, old: collected.
        sink.put(&seg(2, 1), vec![0]).await.expect("put");
        sink.put(&format::index_name(D, "dead"), vec![0])
            .await
            .expect("put");
        age(&sink, &seg(2, 1), old);
        age(&sink, &format::index_name(D, "dead"), old);
        // Another writer's fresh segment, no marker: young, kept.
        sink.put(&seg(3, 1), vec![0]).await.expect("put");
        // A long backup whose marker is live: its old segment and index are kept.
        marker(&sink, "long", 4).await;
        sink.put(&seg(4, 1), vec![0]).await.expect("put");
        sink.put(&format::index_name(D, "long"), vec![0])
            .await
            .expect("put");
        age(&sink, &seg(4, 1), old);
        age(&sink, &format::index_name(D, "long"), old);
        // A stale marker (its writer died a day ago): removed, covers nothing.
        marker(&sink, "stale", 5).await;
        age(&sink, &layout::marker_name(D, "stale"), old);
        sink.put(&seg(5, 1), vec![0]).await.expect("put");
        age(&sink, &seg(5, 1), old);

        let mut gone = collect_garbage(&sink, D, day).await.expect("gc");
        gone.sort();
        let mut want = vec![
            seg(2, 1),
            format::index_name(D, "dead"),
            layout::marker_name(D, "stale"),
            seg(5, 1),
        ];
        want.sort();
        assert_eq!(gone, want);
        let mut left = vec![
            format::manifest_name(D, "b0"),
            format::index_name(D, "b0"),
            seg(1, 1),
            seg(3, 1),
            layout::marker_name(D, "long"),
            seg(4, 1),
            format::index_name(D, "long"),
        ];
        left.sort();
        assert_eq!(names(&sink).await, left);
        assert_eq!(list_backups(&sink, D).await.expect("list").len(), 1);
        // An unreadable marker stops collection of the disk altogether.
        sink.put(&layout::marker_name(D, "odd"), b"not json".to_vec())
            .await
            .expect("put");
        age(&sink, &seg(3, 1), old);
        assert_eq!(
            collect_garbage(&sink, D, day).await.expect("gc"),
            Vec::<String>::new()
        );
    }

    #[tokio::test]
    async fn abandon_removes_exactly_what_the_marked_backup_wrote() {
        let dir = tempfile::tempdir().expect("tmp");
        let sink = LocalSink::open(dir.path()).expect("sink");
        commit(&sink, "b0", &[seg(1, 1)]).await;
        marker(&sink, "b1", 7).await;
        for n in [seg(7, 1), seg(7, 2), seg(8, 1)] {
            sink.put(&n, vec![0]).await.expect("put");
        }
        sink.put(&format::index_name(D, "b1"), vec![0])
            .await
            .expect("put");
        let mut gone = abandon_backup(&sink, D, "b1").await.expect("abandon");
        gone.sort();
        let mut want = vec![
            seg(7, 1),
            seg(7, 2),
            format::index_name(D, "b1"),
            layout::marker_name(D, "b1"),
        ];
        want.sort();
        assert_eq!(gone, want);
        // Without a marker nothing is touched, not even an index of that name.
        assert!(abandon_backup(&sink, D, "b0")
            .await
            .expect("abandon")
            .is_empty());
        let mut left = vec![
            format::manifest_name(D, "b0"),
            format::index_name(D, "b0"),
            seg(1, 1),
            seg(8, 1),
        ];
        left.sort();
        assert_eq!(names(&sink).await, left);
        assert!(backup_id_taken(&sink, D, "b0").await.expect("taken"));
        assert!(!backup_id_taken(&sink, D, "b1").await.expect("taken"));
        marker(&sink, "b2", 9).await;
        assert!(backup_id_taken(&sink, D, "b2").await.expect("taken"));
        // "b" is a prefix of "b0" but not an id in use.
        assert!(!backup_id_taken(&sink, D, "b").await.expect("taken"));
    }

    /// A manifest stored under another backup's name (or naming an id that is not one) is
    /// refused by the listing, so that nothing deletes by the id it claims.
    #[tokio::test]
    async fn a_manifest_under_another_name_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = LocalSink::open(dir.path()).expect("sink");
        commit(&sink, "b1", &[]).await;
        assert_eq!(list_backups(&sink, D).await.expect("list").len(), 1);
        let bytes = sink
            .get(&format::manifest_name(D, "b1"), 1 << 20)
            .await
            .expect("get");
        sink.put(&format::manifest_name(D, "b2"), bytes)
            .await
            .expect("copy");
        assert!(matches!(
            list_backups(&sink, D).await,
            Err(EngineError::Mismatch { .. })
        ));
    }
}
