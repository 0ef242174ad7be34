//! Change tracking over QMP, for QEMU processes without libvirt (and qemu-storage-daemon).
//!
//! # Point in time of backup N (one transaction for all disks)
//!
//! ```text
//! for each disk:  block-dirty-bitmap-add     NEW   (persistent on qcow2)
//!                 block-dirty-bitmap-disable SINCE (incremental only: freezes the dirty set)
//!                 blockdev-backup sync=none → scratch qcow2, filter node cbw (copy-before-write)
//! then:           blockdev-add snapshot-access over cbw; block-export-add (read-only, NBD,
//!                 bitmap SINCE, allocation depth)
//! ```
//!
//! The guest is never paused: writes go to the live disk, and the old contents of what they
//! overwrite go to the scratch image first, so the export stays at the point in time.
//!
//! # End
//!
//! | outcome | bitmaps | why |
//! |---|---|---|
//! | committed | remove SINCE and any older `cbt-` bitmap, keep NEW | NEW is the only base the chain can use now |
//! | failed, incremental | enable SINCE, merge NEW into SINCE, remove NEW (one transaction) | the last *committed* backup's checkpoint stays valid and nothing dirty is forgotten |
//! | failed, full | remove NEW | the next backup decides again |
//!
//! Temporary nodes, jobs, exports and scratch files are removed in every case. The merge list
//! is never empty (an empty `block-dirty-bitmap-merge` crashes QEMU 7.2).
//!
//! Our bitmaps are named `cbt-<backup id>`; bitmaps without that prefix are never touched.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::format::{BackupId, FullReason, Level, Manifest};
use crate::qmp::{self, Qmp, QmpError};

/// Cluster size of the scratch images, hence of copy-before-write: reads of the view that stay
/// inside one such cluster are right even where the guest wrote after the point in time.
pub const FLEECE_CLUSTER: u64 = 65536;
/// Prefix of the bitmaps this library creates.
pub const BITMAP_PREFIX: &str = "cbt-";
/// Bitmap granularity for new bitmaps.
pub const GRANULARITY: u32 = 65536;
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the QEMU change source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("QMP failed while {op}")]
    Qmp {
        op: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("no block node named {0}")]
    NoSuchNode(String),
    #[error("an incremental backup of {node} is impossible: {reason:?}")]
    IncrementalImpossible { node: String, reason: FullReason },
    #[error("cannot create the scratch image {path:?}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid name {0:?} (letters, digits, '-', '_' only; at most 20)")]
    InvalidName(String),
    #[error("NBD failed while reading a bitmap")]
    Nbd(#[from] crate::nbd::NbdError),
}

fn qmp_err(op: &'static str) -> impl FnOnce(QmpError) -> SourceError {
    move |source| SourceError::Qmp { op, source }
}

/// A dirty bitmap as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BitmapInfo {
    pub name: String,
    #[serde(default)]
    pub recording: bool,
    #[serde(default)]
    pub persistent: bool,
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub inconsistent: bool,
    pub granularity: u32,
    #[serde(default)]
    pub count: u64,
}

#[derive(Debug, Clone, Deserialize)]
struct ImageInfo {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
}

/// A block node (a disk's format node, typically).
#[derive(Debug, Clone, Deserialize)]
pub struct NodeInfo {
    #[serde(rename = "node-name")]
    pub node: String,
    #[serde(rename = "drv")]
    pub driver: String,
    #[serde(rename = "dirty-bitmaps", default)]
    pub bitmaps: Vec<BitmapInfo>,
    image: ImageInfo,
}

impl NodeInfo {
    pub fn size(&self) -> u64 {
        self.image.virtual_size
    }
    /// Bitmaps survive a QEMU restart only in qcow2 images.
    pub fn persistent_bitmaps(&self) -> bool {
        self.driver == "qcow2"
    }
    pub fn bitmap(&self, name: &str) -> Option<&BitmapInfo> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
}

/// What to do for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub level: Level,
    /// For an incremental: the bitmap holding what changed since the parent.
    pub since: Option<String>,
    pub reason: Option<FullReason>,
}

/// What the caller asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    Auto,
    Full,
    Incremental,
}

/// The full-vs-incremental rule: incremental only when the last committed backup's
/// checkpoint bitmap still exists, is consistent, and the disk size is unchanged.
pub fn decide(requested: Requested, last: Option<&Manifest>, node: &NodeInfo) -> Decision {
    super::decide(
        requested,
        last,
        true,
        node.size(),
        FullReason::BitmapMissing,
        |checkpoint| match node.bitmap(checkpoint) {
            None => super::Base::Missing(FullReason::BitmapMissing),
            Some(b) if b.inconsistent => super::Base::Broken,
            Some(_) => super::Base::Usable,
        },
    )
}

/// One disk of a backup in progress.
#[derive(Debug, Clone)]
pub struct SessionDisk {
    pub node: String,
    pub size: u64,
    /// NBD URI of the frozen point-in-time view.
    pub uri: String,
    /// Meta context of the frozen dirty bitmap (incremental only).
    pub dirty_context: Option<String>,
    /// The bitmap created by this backup (the next incremental's base).
    pub new_bitmap: String,
    pub since: Option<String>,
    index: usize,
    scratch: PathBuf,
}

impl SessionDisk {
    /// The engine job for this disk: its id on the sink, the backup id, and the decision and
    /// parent it was begun with (the parent is used only for an incremental).
    pub fn job(
        &self,
        disk: &str,
        backup_id: &BackupId,
        decision: &Decision,
        parent: Option<&Manifest>,
    ) -> crate::engine::DiskBackup {
        crate::engine::DiskBackup {
            disk: disk.to_string(),
            backup_id: backup_id.to_string(),
            uri: self.uri.clone(),
            parent: if decision.level == Level::Incremental {
                parent.cloned()
            } else {
                None
            },
            level: decision.level,
            full_reason: decision.reason,
            checkpoint: Some(self.new_bitmap.clone()),
            consistency: crate::format::Consistency::Crash,
            freeze_ms: None,
            warnings: Vec::new(),
        }
    }
}

/// A backup in progress: exports are live until [`QemuSource::end`].
#[derive(Debug)]
pub struct Session {
    pub disks: Vec<SessionDisk>,
}

/// Change tracking over one QEMU's QMP socket.
#[derive(Debug)]
pub struct QemuSource {
    qmp: Arc<Qmp>,
    work_dir: PathBuf,
    nbd_socket: PathBuf,
}

impl QemuSource {
    /// Takes over `qmp`; starts QEMU's NBD server on a socket in `work_dir`, where scratch
    /// images go too.
    pub async fn new(
        qmp: Arc<Qmp>,
        work_dir: impl Into<PathBuf>,
    ) -> Result<QemuSource, SourceError> {
        let work_dir = work_dir.into();
        std::fs::create_dir_all(&work_dir).map_err(|source| SourceError::Scratch {
            path: work_dir.clone(),
            source,
        })?;
        let nbd_socket = work_dir.join("nbd.sock");
        let _ = std::fs::remove_file(&nbd_socket);
        qmp.run(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": nbd_socket}}}),
        )
        .await
        .map_err(qmp_err("starting the NBD server"))?;
        Ok(QemuSource {
            qmp,
            work_dir,
            nbd_socket,
        })
    }

    /// Stops the NBD server this source started. Call it when done; sessions must be ended.
    pub async fn close(self) -> Result<(), SourceError> {
        self.qmp
            .run("nbd-server-stop", Value::Null)
            .await
            .map_err(qmp_err("stopping the NBD server"))?;
        let _ = std::fs::remove_file(&self.nbd_socket);
        Ok(())
    }

    /// The QMP connection.
    pub fn qmp(&self) -> &Arc<Qmp> {
        &self.qmp
    }

    /// Socket of the NBD server this source started.
    pub fn nbd_socket(&self) -> &Path {
        &self.nbd_socket
    }

    /// All block nodes with an image (format nodes and protocol nodes).
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, SourceError> {
        self.qmp
            .execute("query-named-block-nodes", json!({"flat": true}))
            .await
            .map_err(qmp_err("listing block nodes"))
    }

    /// One node.
    pub async fn node(&self, node: &str) -> Result<NodeInfo, SourceError> {
        self.nodes()
            .await?
            .into_iter()
            .find(|n| n.node == node)
            .ok_or_else(|| SourceError::NoSuchNode(node.into()))
    }

    /// Removes our bitmaps on `node` except `keep` (leftovers of crashed or failed runs).
    pub async fn remove_stale_bitmaps(
        &self,
        node: &str,
        keep: Option<&str>,
    ) -> Result<Vec<String>, SourceError> {
        let info = self.node(node).await?;
        let mut removed = Vec::new();
        for b in info.bitmaps {
            if b.name.starts_with(BITMAP_PREFIX) && Some(b.name.as_str()) != keep && !b.busy {
                self.qmp
                    .run(
                        "block-dirty-bitmap-remove",
                        json!({"node": node, "name": b.name}),
                    )
                    .await
                    .map_err(qmp_err("removing a stale bitmap"))?;
                removed.push(b.name);
            }
        }
        Ok(removed)
    }

    /// Freezes a point in time of `disks` (node, bitmap of the parent backup if incremental)
    /// in one transaction and exports each over NBD. `backup_id` names the new bitmaps.
    ///
    /// On error everything this call created is removed again.
    pub async fn begin(
        &self,
        backup_id: &BackupId,
        disks: &[(String, Option<String>)],
    ) -> Result<Session, SourceError> {
        let nodes = self.nodes().await?;
        let new_bitmap = format!("{BITMAP_PREFIX}{backup_id}");
        let mut session = Session { disks: Vec::new() };
        for (i, (node, since)) in disks.iter().enumerate() {
            let info = nodes
                .iter()
                .find(|n| &n.node == node)
                .ok_or_else(|| SourceError::NoSuchNode(node.clone()))?;
            session.disks.push(SessionDisk {
                node: node.clone(),
                size: info.size(),
                uri: crate::nbd::NbdUri::unix(&self.nbd_socket, node.as_str()).to_string(),
                dirty_context: since.as_ref().map(|s| crate::nbd::dirty_bitmap_context(s)),
                new_bitmap: new_bitmap.clone(),
                since: since.clone(),
                index: i,
                scratch: self.work_dir.join(format!("scratch-{backup_id}-{i}.qcow2")),
            });
        }
        let mut frozen = false;
        match self.begin_inner(&session, &nodes, &mut frozen).await {
            Ok(()) => Ok(session),
            Err(e) => {
                tracing::warn!(error = %e, "backup begin failed; rolling back");
                if frozen {
                    // The transaction ran: bitmaps need the failed-backup rollback too.
                    if let Err(e2) = self.end(session, false).await {
                        tracing::warn!(error = %e2, "rollback after a failed begin");
                    }
                } else {
                    self.teardown(&session).await;
                }
                Err(e)
            }
        }
    }

    async fn begin_inner(
        &self,
        s: &Session,
        nodes: &[NodeInfo],
        frozen: &mut bool,
    ) -> Result<(), SourceError> {
        for d in &s.disks {
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-o"])
                .arg(format!("cluster_size={FLEECE_CLUSTER}"))
                .arg(&d.scratch)
                .arg(d.size.to_string())
                .output()
                .map_err(|source| SourceError::Scratch {
                    path: d.scratch.clone(),
                    source,
                })?;
            if !out.status.success() {
                return Err(SourceError::Scratch {
                    path: d.scratch.clone(),
                    source: std::io::Error::other(
                        String::from_utf8_lossy(&out.stderr).into_owned(),
                    ),
                });
            }
            let i = d.index;
            self.qmp
                .run(
                    "blockdev-add",
                    json!({"driver": "qcow2", "node-name": format!("cbt-s{i}"),
                           "file": {"driver": "file", "node-name": format!("cbt-sf{i}"), "filename": d.scratch}}),
                )
                .await
                .map_err(qmp_err("adding the scratch image"))?;
        }
        let mut actions: Vec<(&str, Value)> = Vec::new();
        for d in &s.disks {
            let i = d.index;
            let persistent = nodes
                .iter()
                .find(|n| n.node == d.node)
                .is_some_and(NodeInfo::persistent_bitmaps);
            actions.push((
                "block-dirty-bitmap-add",
                json!({"node": d.node, "name": d.new_bitmap, "persistent": persistent, "granularity": GRANULARITY}),
            ));
            if let Some(since) = &d.since {
                actions.push((
                    "block-dirty-bitmap-disable",
                    json!({"node": d.node, "name": since}),
                ));
            }
            actions.push((
                "blockdev-backup",
                json!({"job-id": format!("cbt-job{i}"), "device": d.node, "target": format!("cbt-s{i}"),
                       "sync": "none", "filter-node-name": format!("cbt-cbw{i}"), "auto-dismiss": true}),
            ));
        }
        self.qmp
            .transaction(&actions)
            .await
            .map_err(qmp_err("freezing the point in time"))?;
        *frozen = true;
        for d in &s.disks {
            let i = d.index;
            self.qmp
                .run("blockdev-add", json!({"driver": "snapshot-access", "node-name": format!("cbt-snap{i}"), "file": format!("cbt-cbw{i}")}))
                .await
                .map_err(qmp_err("adding the snapshot-access node"))?;
            let bitmaps: Vec<Value> = d
                .since
                .iter()
                .map(|b| json!({"node": d.node, "name": b}))
                .collect();
            self.qmp
                .run(
                    "block-export-add",
                    json!({"type": "nbd", "id": format!("cbt-exp{i}"), "node-name": format!("cbt-snap{i}"),
                           "name": d.node, "writable": false, "bitmaps": bitmaps, "allocation-depth": true}),
                )
                .await
                .map_err(qmp_err("exporting the point in time"))?;
        }
        Ok(())
    }

    /// The ranges the guest wrote since the point in time of `disk`, up to now.
    ///
    /// QEMU 7.2's fleecing view (`snapshot-access` over copy-before-write) misreports block
    /// status for exactly these ranges: a long `BLOCK_STATUS` query can call data that was
    /// copied to the scratch image "zero". Call this *after* reading the view's maps and pass
    /// the result to [`Scan::force_read`](crate::engine::Scan::force_read): every range that
    /// could be misreported is then read. The live bitmap of this backup is merged into a
    /// disabled temporary one, exported read-only for a moment and read with our NBD client.
    pub async fn written_since_point_in_time(
        &self,
        disk: &SessionDisk,
    ) -> Result<crate::extent::ExtentMap, SourceError> {
        let i = disk.index;
        let tmp = format!("{}-w", disk.new_bitmap);
        // One a previous call of this backup could not remove (its export lingered) goes now.
        self.drop_temporary_bitmap(&disk.node, &tmp).await;
        self.qmp
            .transaction(&[
                ("block-dirty-bitmap-add", json!({"node": disk.node, "name": tmp, "persistent": false, "disabled": true, "granularity": GRANULARITY})),
                ("block-dirty-bitmap-merge", json!({"node": disk.node, "target": tmp, "bitmaps": [disk.new_bitmap]})),
            ])
            .await
            .map_err(qmp_err("copying the live bitmap"))?;
        let export = format!("cbt-expw{i}");
        let name = format!("{}-written", disk.node);
        let result = async {
            self.qmp
                .run(
                    "block-export-add",
                    json!({"type": "nbd", "id": export, "node-name": format!("cbt-snap{i}"), "name": name,
                           "writable": false, "bitmaps": [{"node": disk.node, "name": tmp}]}),
                )
                .await
                .map_err(qmp_err("exporting the copied bitmap"))?;
            let ctx = crate::nbd::dirty_bitmap_context(&tmp);
            let uri = crate::nbd::NbdUri::unix(&self.nbd_socket, name.as_str()).to_string();
            let opts = crate::nbd::ConnectOptions { connections: 1, ..crate::nbd::ConnectOptions::with_contexts([ctx.as_str()]) };
            let client = crate::nbd::Client::connect_with(&uri, &opts).await?;
            let map = client.map(&ctx, 0..client.size()).await?;
            client.disconnect().await;
            Ok::<_, SourceError>(map.filter(|f| f & crate::nbd::DIRTY != 0))
        }
        .await;
        self.remove_export(&export).await;
        self.drop_temporary_bitmap(&disk.node, &tmp).await;
        result
    }

    /// Removes a temporary bitmap if it is there (a missing one is fine).
    async fn drop_temporary_bitmap(&self, node: &str, name: &str) {
        let _ = self
            .qmp
            .run(
                "block-dirty-bitmap-remove",
                json!({"node": node, "name": name}),
            )
            .await;
    }

    /// Deletes export `id` and waits for QEMU to confirm. Our clients have disconnected by
    /// now, but QEMU may not have seen it yet ("still in use"): ask again for a moment, then
    /// close what it still counts as connected (`mode: hard`).
    async fn remove_export(&self, id: &str) {
        let mut sub = self.qmp.events();
        let mut deleted = false;
        for attempt in 0..=20 {
            let args = if attempt < 20 {
                json!({"id": id})
            } else {
                json!({"id": id, "mode": "hard"})
            };
            match self.qmp.run("block-export-del", args).await {
                Ok(_) => {
                    deleted = true;
                    break;
                }
                Err(e) if e.to_string().contains("still in use") => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(_) => break,
            }
        }
        if deleted {
            if let Err(e) = qmp::wait_event(&mut sub, "BLOCK_EXPORT_DELETED", EVENT_TIMEOUT, |v| {
                v["id"] == id
            })
            .await
            {
                tracing::warn!(error = %e, export = id, "export deletion not confirmed");
            }
        }
    }

    /// Ends a backup: `committed` says whether its manifest is on the sink. See the module
    /// documentation for what happens to the bitmaps.
    pub async fn end(&self, session: Session, committed: bool) -> Result<(), SourceError> {
        self.teardown(&session).await;
        for d in &session.disks {
            let r = if committed {
                // The parent's bitmap, and after a full any older bitmap of ours, is retired:
                // the new one is the only base the sink's chain can use now.
                self.remove_stale_bitmaps(&d.node, Some(&d.new_bitmap))
                    .await?;
                Ok(())
            } else {
                match &d.since {
                    Some(since) => self
                        .qmp
                        .transaction(&[
                            (
                                "block-dirty-bitmap-enable",
                                json!({"node": d.node, "name": since}),
                            ),
                            (
                                "block-dirty-bitmap-merge",
                                json!({"node": d.node, "target": since, "bitmaps": [d.new_bitmap]}),
                            ),
                            (
                                "block-dirty-bitmap-remove",
                                json!({"node": d.node, "name": d.new_bitmap}),
                            ),
                        ])
                        .await,
                    None => {
                        self.qmp
                            .run(
                                "block-dirty-bitmap-remove",
                                json!({"node": d.node, "name": d.new_bitmap}),
                            )
                            .await
                    }
                }
            };
            r.map_err(qmp_err(if committed {
                "retiring the parent bitmap"
            } else {
                "rolling back the bitmaps"
            }))?;
        }
        Ok(())
    }

    /// Removes exports, jobs, nodes and scratch files of a session, whatever state they are
    /// in. Failures are logged: teardown must get as far as it can.
    async fn teardown(&self, s: &Session) {
        for d in &s.disks {
            let i = d.index;
            self.remove_export(&format!("cbt-expw{i}")).await;
            let _ = self
                .qmp
                .run(
                    "block-dirty-bitmap-remove",
                    json!({"node": d.node, "name": format!("{}-w", d.new_bitmap)}),
                )
                .await;
            self.remove_export(&format!("cbt-exp{i}")).await;
            let _ = self
                .qmp
                .run("blockdev-del", json!({"node-name": format!("cbt-snap{i}")}))
                .await;
            let job = format!("cbt-job{i}");
            let mut sub = self.qmp.events();
            if self
                .qmp
                .run("block-job-cancel", json!({"device": job, "force": true}))
                .await
                .is_ok()
            {
                let wait = qmp::wait_event(&mut sub, "BLOCK_JOB_CANCELLED", EVENT_TIMEOUT, |v| {
                    v["device"] == job.as_str()
                })
                .await;
                if let Err(e) = wait {
                    tracing::warn!(error = %e, "fleecing job cancellation not confirmed");
                }
            }
            let _ = self
                .qmp
                .run("blockdev-del", json!({"node-name": format!("cbt-s{i}")}))
                .await;
            let _ = self
                .qmp
                .run("blockdev-del", json!({"node-name": format!("cbt-sf{i}")}))
                .await;
            let _ = std::fs::remove_file(&d.scratch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{BackupStats, Consistency, ObjectRef};

    fn node(bitmaps: Vec<BitmapInfo>, size: u64) -> NodeInfo {
        NodeInfo {
            node: "d0".into(),
            driver: "qcow2".into(),
            bitmaps,
            image: ImageInfo { virtual_size: size },
        }
    }

    fn bm(name: &str, inconsistent: bool) -> BitmapInfo {
        BitmapInfo {
            name: name.into(),
            recording: true,
            persistent: true,
            busy: false,
            inconsistent,
            granularity: 65536,
            count: 0,
        }
    }

    fn last(checkpoint: Option<&str>, size: u64) -> Manifest {
        Manifest {
            format_version: 1,
            backup_id: "b0".into(),
            disk: "d".into(),
            parent: None,
            level: Level::Full,
            full_reason: Some(FullReason::FirstBackup),
            checkpoint: checkpoint.map(Into::into),
            disk_size: size,
            chunk_size: 1 << 20,
            consistency: Consistency::Crash,
            freeze_ms: None,
            warnings: vec![],
            started_unix_ms: 0,
            finished_unix_ms: 0,
            stats: BackupStats::default(),
            index: ObjectRef {
                name: "i".into(),
                len: 0,
                crc32: 0,
            },
            segments: vec![],
            generation: 0,
            folded: vec![],
            locked_until_unix_ms: None,
        }
    }

    #[test]
    fn decide_follows_the_rule_with_reasons() {
        let n = node(vec![bm("cbt-b0", false)], 100);
        let full = |r| Decision {
            level: Level::Full,
            since: None,
            reason: Some(r),
        };
        assert_eq!(
            decide(Requested::Auto, None, &n),
            full(FullReason::FirstBackup)
        );
        assert_eq!(
            decide(Requested::Full, Some(&last(Some("cbt-b0"), 100)), &n),
            full(FullReason::Requested)
        );
        assert_eq!(
            decide(Requested::Auto, Some(&last(Some("cbt-gone"), 100)), &n),
            full(FullReason::BitmapMissing)
        );
        assert_eq!(
            decide(Requested::Auto, Some(&last(None, 100)), &n),
            full(FullReason::BitmapMissing)
        );
        assert_eq!(
            decide(Requested::Auto, Some(&last(Some("cbt-b0"), 99)), &n),
            full(FullReason::DiskResized)
        );
        let bad = node(vec![bm("cbt-b0", true)], 100);
        assert_eq!(
            decide(Requested::Auto, Some(&last(Some("cbt-b0"), 100)), &bad),
            full(FullReason::BitmapInconsistent)
        );
        assert_eq!(
            decide(Requested::Incremental, Some(&last(Some("cbt-b0"), 100)), &n),
            Decision {
                level: Level::Incremental,
                since: Some("cbt-b0".into()),
                reason: None
            }
        );
    }
}

/// The [`Revalidate`](crate::engine::Revalidate) of one disk of a session: QEMU 7.2's fleecing
/// view is right for clusters the guest has not written since the point in time, and for
/// single-cluster reads of the others.
#[derive(Debug, Clone, Copy)]
pub struct Fleece<'a> {
    pub source: &'a QemuSource,
    pub disk: &'a SessionDisk,
}

impl crate::engine::Revalidate for Fleece<'_> {
    async fn written(&self) -> Result<crate::extent::ExtentMap, crate::engine::EngineError> {
        self.source
            .written_since_point_in_time(self.disk)
            .await
            .map_err(|e| crate::engine::EngineError::Source(Box::new(e)))
    }
    fn safe_read(&self) -> u64 {
        FLEECE_CLUSTER
    }
}
