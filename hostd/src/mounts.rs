//! Backups served read-only over NBD (`POST /v1/mounts`, `cbtctl mount`): each disk of a
//! backup on a Unix socket `state_dir/mounts/<id>/<target>.sock`, read straight from the sink
//! (`libcbt::nbd::server` on `libcbt::engine::export`), for file-level recovery with
//! `qemu-nbd`, `guestmount` or `nbdfuse`, and for a qcow2 overlay whose backing file is the
//! export.
//!
//! A mount's directory is root's alone (0700): its sockets are for the host's operator, and
//! the API is admin-only. An instant staging copy's mount (a restore to a domain with
//! `instant`) gives its sockets to QEMU's user (0600) in a directory it may traverse.
//! Mounts are recorded in the journal until unmounted, and a restarted daemon serves them
//! again under the same ids, at the same sockets ([`serve_recorded`]): an instant copy's
//! overlays name those paths, so the copy's guest reads on after the restart. At start
//! the directory a previous life left is emptied (it holds only what the daemon made). While
//! a backup of an instance is mounted, no prune, deletion or compaction of the instance's
//! backups on that sink runs (they would take frames from under the export): each side marks
//! itself before it checks the other, so one of two that start together always sees the other.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use libcbt::engine::export::{BackupExport, DEFAULT_CACHE_BYTES};
use libcbt::job;
use libcbt::nbd::server::{serve_unix, ServerOptions};
use libcbt::sink::any::AnySink;
use serde::Serialize;

/// Mounts at once on a host.
pub const MAX_MOUNTS: usize = 32;

/// One disk of a mount.
#[derive(Debug, Clone, Serialize)]
pub struct MountDisk {
    pub socket: PathBuf,
    /// `nbd+unix:///<name>?socket=…`.
    pub uri: String,
    pub size: u64,
    /// Backups merged (1: a full).
    pub chain_len: usize,
}

/// What a client sees of a mount.
#[derive(Debug, Clone, Serialize)]
pub struct MountView {
    pub id: String,
    pub tenant: Option<String>,
    pub instance: String,
    pub sink: String,
    pub backup_id: String,
    pub disks: BTreeMap<String, MountDisk>,
    pub created_ms: i64,
}

/// A mount: its exports run until it is dropped, which removes its sockets.
pub struct Mount {
    pub view: MountView,
    dir: PathBuf,
    servers: Vec<tokio::task::AbortHandle>,
}

impl Drop for Mount {
    fn drop(&mut self) {
        for s in &self.servers {
            s.abort();
        }
        // Only what this mount made: its sockets and its directory.
        for d in self.view.disks.values() {
            let _ = std::fs::remove_file(&d.socket);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The mounts of this daemon's life.
#[derive(Default)]
pub struct Mounts {
    live: Mutex<HashMap<String, Arc<Mount>>>,
    /// (instance, sink) of mounts being set up or live: what a rewrite must wait for.
    reading: Mutex<Vec<(String, String, String)>>,
    /// Mounts a live restore copies from: not unmounted by hand meanwhile.
    copying: Mutex<std::collections::HashSet<String>>,
    /// Where mounts are recorded, to be served again after a restart ([`serve_recorded`]).
    journal: std::sync::OnceLock<Arc<crate::journal::Journal>>,
}

/// What a mount serves, as recorded in the journal.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct MountSpec {
    pub tenant: Option<String>,
    pub instance: String,
    pub sink: String,
    pub backup_id: String,
    pub targets: Vec<String>,
    /// Sockets for QEMU's user (an instant copy's backing files).
    pub qemu: bool,
}

/// Why a mount was not made.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0} mounts are live already; unmount one first")]
    Full(usize),
    #[error("a live restore copies from this mount: cancel its job first (its domain then runs on the mount)")]
    Copying,
    #[error("mount {0} exists or is being made")]
    Taken(String),
    #[error("{0}")]
    Engine(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The backup a mount serves, and whose it is.
#[derive(Clone, Copy)]
pub struct Of<'a> {
    pub sink: &'a AnySink,
    pub sink_name: &'a str,
    /// A domain uuid.
    pub instance: &'a str,
    pub backup_id: &'a str,
    /// The instance's tenant: it sees and unmounts the mount (an instant copy's).
    pub tenant: Option<&'a str>,
}

/// Marks (instance, sink) as read by mount `id` until dropped.
pub struct Reading<'a> {
    mounts: &'a Mounts,
    id: String,
    armed: bool,
}

impl Reading<'_> {
    /// Leaves the mark in place (for the mount's life: [`Mounts::unmount`] removes it).
    fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.mounts
            .reading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, ..)| *id != self.id);
    }
}

impl Mounts {
    /// Records mounts in `journal` from now on.
    pub fn record_in(&self, journal: Arc<crate::journal::Journal>) {
        let _ = self.journal.set(journal);
    }

    /// The directory of all mounts, `root/mounts`: 0711 (traversed by QEMU to an instant
    /// copy's sockets, listed by nobody); of what a previous life
    /// left there, only what a mount makes goes (directories named by a mount id holding
    /// sockets `*.sock`), checked without following links and on the directory's own
    /// filesystem (a FUSE mount an operator made below stays); anything else stays, with a
    /// warning. A `mounts` that is not a directory of ours is refused.
    pub fn prepare(root: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
        let dir = root.join("mounts");
        let md = match std::fs::symlink_metadata(&dir) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new().mode(0o711).create(&dir)?;
                // The mode asked of mkdir is masked by the umask (0077 for the daemon).
                return std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711));
            }
            Err(e) => return Err(e),
        };
        if !md.is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a directory (a link?); refusing to use it",
                dir.display()
            )));
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let path = e.path();
            let ours = e
                .file_name()
                .to_str()
                .is_some_and(crate::registry::valid_job_id)
                && std::fs::symlink_metadata(&path)
                    .is_ok_and(|m| m.is_dir() && m.dev() == md.dev());
            if !ours {
                tracing::warn!(path = %path.display(), "left in the mounts directory: not a mount's");
                continue;
            }
            for f in std::fs::read_dir(&path)? {
                let f = f?;
                let sock = f.file_type().is_ok_and(|t| t.is_socket())
                    && f.file_name().to_string_lossy().ends_with(".sock");
                if sock {
                    let _ = std::fs::remove_file(f.path());
                }
            }
            if let Err(err) = std::fs::remove_dir(&path) {
                tracing::warn!(path = %path.display(), error = %err, "a previous mount's directory stays");
            }
        }
        Ok(())
    }

    /// Whether a backup of `instance` on `sink` is mounted or being mounted.
    pub fn reads(&self, instance: &str, sink: &str) -> bool {
        self.reading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(_, i, s)| i == instance && s == sink)
    }

    /// Marks a mount `id` of (instance, sink) as reading, first: see the module's doc.
    pub fn mark(&self, id: &str, instance: &str, sink: &str) -> Result<Reading<'_>, MountError> {
        // Every live mount keeps its mark: the marks count them all.
        let mut r = self.reading.lock().unwrap_or_else(|e| e.into_inner());
        // One mark per id: a second attempt under a live (or pending) mount's id must not
        // take that mount's mark away when it fails.
        if r.iter().any(|(i, ..)| i == id) {
            return Err(MountError::Taken(id.into()));
        }
        if r.len() >= MAX_MOUNTS {
            return Err(MountError::Full(MAX_MOUNTS));
        }
        r.push((id.into(), instance.into(), sink.into()));
        Ok(Reading {
            mounts: self,
            id: id.into(),
            armed: true,
        })
    }

    /// Serves `targets` of the backup `of` under `root/mounts/<id>/`. `reading` (from
    /// [`Mounts::mark`]) is kept for the mount's life. With `owner` (QEMU's uid and gid), the
    /// sockets are that user's (0600) and their directory may be traversed, so that a QEMU
    /// can open them as a backing file.
    pub async fn mount(
        &self,
        root: &Path,
        id: &str,
        reading: Reading<'_>,
        of: &Of<'_>,
        targets: &[String],
        owner: Option<(u32, u32)>,
    ) -> Result<MountView, MountError> {
        let Of {
            sink,
            sink_name,
            instance,
            backup_id,
            tenant,
        } = *of;
        use std::os::unix::fs::DirBuilderExt;
        let dir = root.join("mounts").join(id);
        let mode = if owner.is_some() { 0o711 } else { 0o700 };
        let dir_err = |source| MountError::Io {
            path: dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .mode(mode)
            .create(&dir)
            .map_err(dir_err)?;
        // Masked by the umask at mkdir: set as asked.
        {
            use std::os::unix::fs::PermissionsExt;
            if let Err(e) = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)) {
                let _ = std::fs::remove_dir(&dir);
                return Err(dir_err(e));
            }
        }
        let mut m = Mount {
            view: MountView {
                id: id.into(),
                tenant: tenant.map(str::to_string),
                instance: instance.into(),
                sink: sink_name.into(),
                backup_id: backup_id.into(),
                disks: BTreeMap::new(),
                created_ms: crate::journal::Journal::now_ms(),
            },
            dir: dir.clone(),
            servers: Vec::new(),
        };
        // A failure below drops `m`: what it started stops and its sockets go.
        for t in targets {
            // Targets come from the sink's listing and go into a socket path and an NBD URI
            // (a qcow2 header's backing file): plain names only.
            if !crate::config::valid_name(t) {
                return Err(MountError::Engine(format!(
                    "disk target {t:?} is not a plain name"
                )));
            }
            let disk = job::libvirt_disk_id(instance, t);
            let export = BackupExport::open(sink.clone(), &disk, backup_id, DEFAULT_CACHE_BYTES)
                .await
                .map_err(|e| MountError::Engine(crate::run::chain(&e)))?;
            let socket = dir.join(format!("{t}.sock"));
            let listener =
                tokio::net::UnixListener::bind(&socket).map_err(|source| MountError::Io {
                    path: socket.clone(),
                    source,
                })?;
            if let Some((uid, gid)) = owner {
                use std::os::unix::fs::PermissionsExt;
                let io = |source| MountError::Io {
                    path: socket.clone(),
                    source,
                };
                std::os::unix::fs::chown(&socket, Some(uid), Some(gid)).map_err(io)?;
                std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
                    .map_err(io)?;
            }
            let (size, chain_len) = (export.size(), export.chain_len());
            let opts = ServerOptions {
                name: t.clone(),
                description: format!("backup {backup_id} of {instance} {t}"),
                ..Default::default()
            };
            let served = tokio::spawn(serve_unix(listener, Arc::new(export), Arc::new(opts)));
            m.servers.push(served.abort_handle());
            m.view.disks.insert(
                t.clone(),
                MountDisk {
                    uri: format!("nbd+unix:///{t}?socket={}", socket.display()),
                    socket,
                    size,
                    chain_len,
                },
            );
        }
        // Recorded before it counts as made: a restart serves it again (the instant copies
        // whose backing files its sockets are would otherwise lose their disks).
        if let Some(j) = self.journal.get() {
            let spec = MountSpec {
                tenant: tenant.map(str::to_string),
                instance: instance.into(),
                sink: sink_name.into(),
                backup_id: backup_id.into(),
                targets: m.view.disks.keys().cloned().collect(),
                qemu: owner.is_some(),
            };
            let spec = serde_json::to_value(&spec).unwrap_or_default();
            let (j, id2) = (j.clone(), id.to_string());
            tokio::task::spawn_blocking(move || j.put_mount(&id2, &spec))
                .await
                .map_err(|e| MountError::Engine(format!("recording the mount: {e}")))?
                .map_err(|e| MountError::Engine(format!("recording the mount: {e}")))?;
        }
        let view = m.view.clone();
        {
            // Unmounted meanwhile (its mark is gone): it does not go live, nor stays recorded.
            let marks = self.reading.lock().unwrap_or_else(|e| e.into_inner());
            if !marks.iter().any(|(i, ..)| i == id) {
                drop(marks);
                drop(m);
                if let Some(j) = self.journal.get() {
                    let _ = j.delete_mount(id);
                }
                return Err(MountError::Engine(format!(
                    "mount {id} was unmounted while it was being made"
                )));
            }
            self.live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.into(), Arc::new(m));
        }
        reading.keep();
        Ok(view)
    }

    /// Marks mount `id` as read by a live restore's copy (or no longer).
    pub fn set_copying(&self, id: &str, on: bool) {
        let mut c = self.copying.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            c.insert(id.to_string());
        } else {
            c.remove(id);
        }
    }

    /// Marks mount `id` as reading until [`Mounts::unmount`], without a guard: a recorded
    /// mount waiting to be served again keeps its backup from rewrites between its tries.
    fn hold(&self, id: &str, instance: &str, sink: &str) -> Result<(), MountError> {
        self.mark(id, instance, sink).map(Reading::keep)
    }

    /// A guard for mark `id` held already ([`Mounts::hold`]): kept by a mount that succeeds,
    /// left in place by one that fails.
    fn held(&self, id: &str) -> Reading<'_> {
        Reading {
            mounts: self,
            id: id.into(),
            armed: false,
        }
    }

    /// Whether `id` is a recorded mount not served (yet): marked, not live.
    pub fn is_pending(&self, id: &str) -> bool {
        self.get(id).is_none()
            && self
                .reading
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|(i, ..)| i == id)
    }

    /// Unmounts `id` unless a live restore copies from it; whether there was one.
    pub fn unmount_unless_copying(&self, id: &str) -> Result<bool, MountError> {
        let copying = self.copying.lock().unwrap_or_else(|e| e.into_inner());
        if copying.contains(id) {
            return Err(MountError::Copying);
        }
        Ok(self.unmount(id))
    }

    pub fn get(&self, id: &str) -> Option<MountView> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|m| m.view.clone())
    }

    pub fn all(&self) -> Vec<MountView> {
        let mut v: Vec<MountView> = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|m| m.view.clone())
            .collect();
        v.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        v
    }

    /// Stops mount `id` and removes its sockets; whether there was one.
    pub fn unmount(&self, id: &str) -> bool {
        // Under the marks' lock (then the live map's, the order `mount` takes them in): a
        // mount being made sees its mark gone and does not go live.
        let found = {
            let mut marks = self.reading.lock().unwrap_or_else(|e| e.into_inner());
            let m = self
                .live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            let found = m.is_some() || marks.iter().any(|(i, ..)| i == id);
            // Its exports stop and its sockets go before rewrites may take its frames.
            drop(m);
            marks.retain(|(i, ..)| i != id);
            found
        };
        if let Some(j) = self.journal.get() {
            if let Err(e) = j.delete_mount(id) {
                tracing::warn!(mount = %id, error = %e, "unrecording the mount; it is served again after a restart");
            }
        }
        found
    }
}

/// Why a recorded mount was not served again.
enum Again {
    /// Never will be (its sink is no longer configured, the record is unreadable): forgotten.
    Never(String),
    /// Not now (its sink unreachable, its chain unreadable): tried again later.
    Later(String),
}

/// The longest pause between two tries of serving a recorded mount again.
const AGAIN_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(300);

/// Serves again, under their ids (so at the same sockets: the paths instant copies' overlays
/// name), the mounts a previous life recorded and did not unmount; those served already (a
/// resumed live copy's) are skipped. Runs at start, before the API serves, so no prune of a
/// mounted backup slips in. A mount that cannot be served now is tried again in the
/// background with growing pauses; one that never can be is forgotten with a warning.
pub async fn serve_recorded(st: &Arc<crate::state::AppState>) {
    let rows = match st.journal.mounts() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "reading the recorded mounts; none is served again");
            return;
        }
    };
    for (id, spec) in rows {
        if st.mounts.get(&id).is_some() {
            continue;
        }
        let parsed = serde_json::from_value::<MountSpec>(spec);
        let spec = match parsed {
            Ok(p) if crate::registry::valid_job_id(&id) => p,
            _ => {
                tracing::warn!(mount = %id, "a recorded mount's record is unreadable; forgotten");
                let _ = st.journal.delete_mount(&id);
                continue;
            }
        };
        // Its backup is kept from rewrites from now on, served or not.
        if let Err(e) = st.mounts.hold(&id, &spec.instance, &spec.sink) {
            tracing::warn!(mount = %id, error = %e, "a recorded mount is not served again");
            continue;
        }
        match serve_again(st, &id, &spec).await {
            Ok(()) => tracing::info!(mount = %id, "mount served again"),
            Err(Again::Never(e)) => {
                tracing::warn!(mount = %id, error = %e, "a recorded mount cannot be served again; forgotten");
                st.mounts.unmount(&id);
            }
            Err(Again::Later(e)) => {
                tracing::warn!(mount = %id, error = %e, "a recorded mount is not served yet; trying again");
                let st = st.clone();
                tokio::spawn(async move {
                    let mut delay = std::time::Duration::from_secs(2);
                    loop {
                        tokio::time::sleep(delay).await;
                        // Served meanwhile (a resumed live copy), or unmounted (DELETE).
                        if st.shutting_down.load(std::sync::atomic::Ordering::SeqCst)
                            || !st.mounts.is_pending(&id)
                        {
                            return;
                        }
                        match serve_again(&st, &id, &spec).await {
                            Ok(()) => {
                                tracing::info!(mount = %id, "mount served again");
                                return;
                            }
                            Err(Again::Never(e)) => {
                                tracing::warn!(mount = %id, error = %e, "a recorded mount cannot be served again; forgotten");
                                st.mounts.unmount(&id);
                                return;
                            }
                            Err(Again::Later(e)) => {
                                tracing::warn!(mount = %id, error = %e, "a recorded mount is still not served");
                            }
                        }
                        delay = (delay * 2).min(AGAIN_BACKOFF_MAX);
                    }
                });
            }
        }
    }
}

async fn serve_again(st: &crate::state::AppState, id: &str, spec: &MountSpec) -> Result<(), Again> {
    let sink = st
        .sink(&spec.sink)
        .await
        .map_err(|e| Again::Later(format!("sink {}: {}", spec.sink, crate::run::chain(&e))))?
        .ok_or_else(|| Again::Never(format!("sink {} is no longer configured", spec.sink)))?;
    let owner = if spec.qemu {
        let user = &st.cfg.libvirt.qemu_user;
        Some(crate::run::user_ids(user).ok_or_else(|| {
            Again::Later(format!("libvirt.qemu_user {user:?} is not in /etc/passwd"))
        })?)
    } else {
        None
    };
    // The mark is held already (`hold`); a rewrite that started before it is waited out.
    if st.jobs.rewriting(&spec.instance) {
        return Err(Again::Later(
            "a deletion, prune or compaction of the instance's backups runs".into(),
        ));
    }
    let reading = st.mounts.held(id);
    let of = Of {
        sink: &sink,
        sink_name: &spec.sink,
        instance: &spec.instance,
        backup_id: &spec.backup_id,
        tenant: spec.tenant.as_deref(),
    };
    st.mounts
        .mount(
            &st.cfg.server.state_dir,
            id,
            reading,
            &of,
            &spec.targets,
            owner,
        )
        .await
        .map(|_| ())
        // A backup not found is tried again too: the sink's storage may not be there yet (a
        // filesystem mounted late); an admin forgets the mount with DELETE.
        .map_err(|e| Again::Later(crate::run::chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_mark_of_an_id_is_refused_and_takes_nothing_away() {
        let m = Mounts::default();
        let first = m.mark("0123456789abcdef", "vm", "local").expect("mark");
        assert!(matches!(
            m.mark("0123456789abcdef", "vm", "local"),
            Err(MountError::Taken(_))
        ));
        // The refused attempt is gone; the first mark still keeps rewrites away.
        assert!(m.reads("vm", "local"));
        drop(first);
        assert!(!m.reads("vm", "local"));
        // A held mark (a recorded mount waiting to be served) stays until unmounted.
        m.hold("fedcba9876543210", "vm", "local").expect("hold");
        drop(m.held("fedcba9876543210"));
        assert!(m.reads("vm", "local") && m.is_pending("fedcba9876543210"));
        assert!(m.unmount("fedcba9876543210"));
        assert!(!m.reads("vm", "local") && !m.is_pending("fedcba9876543210"));
    }
}
