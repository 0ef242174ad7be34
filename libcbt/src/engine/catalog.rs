//! What is committed on a sink: manifests by disk.

use super::EngineError;
use crate::format::{self, Manifest};
use crate::sink::Sink;

/// Committed backups of `disk`, oldest first (by finish time, then id). Unreadable manifests
/// are an error: a catalog that silently drops one could pick the wrong parent.
pub async fn list_backups<S: Sink>(sink: &S, disk: &str) -> Result<Vec<Manifest>, EngineError> {
    let prefix = format!("disks/{disk}/backups/");
    let mut out = Vec::new();
    for o in sink.list(&prefix).await? {
        if !o.name.ends_with(".manifest") {
            continue;
        }
        let bytes = sink
            .get(&o.name, format::manifest::MAX_MANIFEST as u64)
            .await?;
        let m = Manifest::decode(&bytes).map_err(|source| EngineError::Corrupt {
            object: o.name.clone(),
            pos: 0,
            source,
        })?;
        out.push(m);
    }
    out.sort_by(|a, b| (a.finished_unix_ms, &a.backup_id).cmp(&(b.finished_unix_ms, &b.backup_id)));
    Ok(out)
}

/// Disks that have backups on the sink.
pub async fn list_disks<S: Sink>(sink: &S) -> Result<Vec<String>, EngineError> {
    let mut disks: Vec<String> = sink
        .list("disks/")
        .await?
        .into_iter()
        .filter_map(|o| {
            o.name
                .strip_prefix("disks/")
                .and_then(|r| r.split('/').next())
                .map(String::from)
        })
        .collect();
    disks.dedup();
    Ok(disks)
}

/// The newest committed backup of `disk`: the parent of the next incremental.
pub async fn latest<S: Sink>(sink: &S, disk: &str) -> Result<Option<Manifest>, EngineError> {
    Ok(list_backups(sink, disk).await?.pop())
}

/// Removes one committed backup of `disk`: the manifest first (so a crash in between leaves
/// an uncommitted backup, never a committed one with missing parts), then its index and
/// segments. Returns the objects deleted. The caller makes sure no later backup depends on it.
pub async fn forget_backup<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
) -> Result<Vec<String>, EngineError> {
    let name = format::manifest_name(disk, backup);
    let Some(m) = list_backups(sink, disk)
        .await?
        .into_iter()
        .find(|m| m.backup_id == backup)
    else {
        return Ok(Vec::new());
    };
    sink.delete(&name).await?;
    let mut gone = vec![name];
    sink.delete(&m.index.name).await?;
    gone.push(m.index.name.clone());
    for s in &m.segments {
        sink.delete(s).await?;
        gone.push(s.clone());
    }
    Ok(gone)
}

/// Objects under `disks/<disk>/` that no committed manifest references: what an interrupted
/// backup wrote before its manifest. Only safe to delete while no backup of `disk` runs.
pub async fn orphans<S: Sink>(sink: &S, disk: &str) -> Result<Vec<String>, EngineError> {
    let committed = list_backups(sink, disk).await?;
    let mut used = std::collections::BTreeSet::new();
    for m in &committed {
        used.insert(format::manifest_name(disk, &m.backup_id));
        used.insert(m.index.name.clone());
        used.extend(m.segments.iter().cloned());
    }
    Ok(sink
        .list(&format!("disks/{disk}/"))
        .await?
        .into_iter()
        .map(|o| o.name)
        .filter(|n| !used.contains(n))
        .collect())
}
