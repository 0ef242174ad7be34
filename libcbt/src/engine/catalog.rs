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
