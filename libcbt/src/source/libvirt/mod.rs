//! Change tracking through libvirt (cargo feature `libvirt`): checkpoints and pull-mode backups,
//! the way Nova compute hosts must do it.
//!
//! # Point in time of backup N
//!
//! One `virDomainBackupBegin` with a checkpoint `cbt-<N>`: libvirt adds bitmap `cbt-<N>` to
//! every tracked (qcow2) disk, and for each disk backed up starts copy-before-write into a
//! scratch qcow2 in our scratch directory and exports the frozen view over NBD on a Unix socket
//! there. An incremental disk's export carries `qemu:dirty-bitmap:backup-<disk>`: the merge of
//! the checkpoint bitmaps since the parent. With quiesce, the guest agent freezes filesystems
//! for the `backupBegin` call only, never for the copy.
//!
//! # End
//!
//! | outcome | checkpoints | why |
//! |---|---|---|
//! | committed | delete every other `cbt-` checkpoint no disk's last backup names | the chain needs only the newest |
//! | failed | delete `cbt-<N>` | libvirt merges its bitmap into the parent's, so nothing dirty is lost |
//!
//! The job is aborted (`virDomainAbortJob`) and our scratch directory removed in every case.
//! Checkpoints without the `cbt-` prefix are never touched.
//!
//! # Shut-off domains
//!
//! libvirt runs backup jobs only on running domains, so a shut-off domain is started paused
//! (`VIR_DOMAIN_START_PAUSED`: no guest code runs, its disks do not change), backed up the same
//! way, and destroyed again. The result is crash-consistent and exact.

mod ffi;
pub mod scratch;
pub mod xml;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use crate::format::{BackupId, Consistency, FullReason, Level, Manifest};
use crate::source::qemu::{Decision, Requested};
pub use scratch::{check_socket, QemuIdentity};
pub use xml::{CheckpointDesc, DiskSource, DomainDesc, DomainDisk, StagingMeta};

/// Prefix of the checkpoints (and their bitmaps) this library creates.
pub use crate::format::backup_id::CHECKPOINT_PREFIX;
/// Default connection URI.
pub const DEFAULT_URI: &str = "qemu:///system";
/// How long `virDomainAbortJob` may take to end a backup job.
const JOB_END_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the libvirt change source.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("libvirt failed while {op}: {source}")]
    Libvirt {
        op: String,
        #[source]
        source: virt::error::Error,
    },
    #[error(transparent)]
    Xml(#[from] xml::XmlError),
    #[error("no domain {0:?} on this host")]
    NoSuchDomain(String),
    #[error("domain {domain} has no disk {disk:?}")]
    NoSuchDisk { domain: String, disk: String },
    #[error("checkpoint {0} exists already")]
    CheckpointExists(String),
    #[error("an incremental backup of disk {disk} is impossible: {reason:?}")]
    IncrementalImpossible { disk: String, reason: FullReason },
    #[error("scratch directory {path:?}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read QEMU's user and group from {path:?}")]
    QemuConf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU's {what} {name:?} is unknown on this host")]
    QemuUserUnknown { what: &'static str, name: String },
    #[error("refusing scratch directory {path:?}: {reason}")]
    UnsafeScratch { path: PathBuf, reason: String },
    #[error("refusing NBD socket {path:?}: {reason}")]
    ForeignSocket { path: PathBuf, reason: String },
    #[error("invalid name {0:?} (letters, digits, '-', '_' only; at most 20)")]
    InvalidName(String),
    #[error("the libvirt worker thread failed: {0}")]
    Worker(String),
    #[error("the backup job did not end within {0:?} of its abort")]
    JobStuck(Duration),
}

fn lv(op: impl Into<String>) -> impl FnOnce(virt::error::Error) -> LibvirtError {
    let op = op.into();
    move |source| LibvirtError::Libvirt { op, source }
}

/// Runs a blocking libvirt call off the async runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LibvirtError> + Send + 'static,
) -> Result<T, LibvirtError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LibvirtError::Worker(e.to_string()))?
}

/// A connection to libvirtd.
#[derive(Clone)]
pub struct LibvirtSource {
    conn: Connect,
    uri: String,
}

impl std::fmt::Debug for LibvirtSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtSource")
            .field("uri", &self.uri)
            .finish()
    }
}

impl LibvirtSource {
    /// Connects to `uri` (blocking).
    pub fn connect(uri: &str) -> Result<Self, LibvirtError> {
        // Errors come back as values; libvirt's default handler would also print them.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(lv(format!("connecting to {uri}")))?;
        Ok(LibvirtSource {
            conn,
            uri: uri.to_string(),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether the connection still works (libvirtd may have restarted).
    pub fn is_alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    /// The domain with UUID `id` when `id` parses as a UUID ([`parse_uuid`]), else the domain
    /// named `id`; never both, so a domain named like another's UUID cannot stand in for it
    /// (blocking).
    pub fn domain(&self, id: &str) -> Result<LibvirtDomain, LibvirtError> {
        let dom = if parse_uuid(id).is_some() {
            self.conn.lookup_domain_by_uuid_string(id)
        } else {
            self.conn.lookup_domain_by_name(id)
        }
        .map_err(|_| LibvirtError::NoSuchDomain(id.to_string()))?;
        let name = dom.name().map_err(lv("reading a domain's name"))?;
        Ok(LibvirtDomain { dom, name })
    }

    /// Defines a persistent domain from `xml` (blocking).
    pub fn define(&self, xml: &str) -> Result<LibvirtDomain, LibvirtError> {
        let dom = self
            .conn
            .define_domain_xml(xml)
            .map_err(lv("defining a domain"))?;
        let name = dom.name().map_err(lv("reading a domain's name"))?;
        Ok(LibvirtDomain { dom, name })
    }

    /// The domain with UUID `uuid`, never one merely named so (blocking).
    pub fn domain_by_uuid(&self, uuid: &str) -> Result<LibvirtDomain, LibvirtError> {
        let dom = self
            .conn
            .lookup_domain_by_uuid_string(uuid)
            .map_err(|_| LibvirtError::NoSuchDomain(uuid.to_string()))?;
        let name = dom.name().map_err(lv("reading a domain's name"))?;
        Ok(LibvirtDomain { dom, name })
    }

    /// Every domain of this host, running or not (blocking).
    pub fn domains(&self) -> Result<Vec<LibvirtDomain>, LibvirtError> {
        let all = self
            .conn
            .list_all_domains(0)
            .map_err(lv("listing domains"))?;
        all.into_iter()
            .map(|dom| {
                let name = dom.name().map_err(lv("reading a domain's name"))?;
                Ok(LibvirtDomain { dom, name })
            })
            .collect()
    }
}

/// One domain. All methods block.
#[derive(Clone)]
pub struct LibvirtDomain {
    dom: Domain,
    name: String,
}

impl std::fmt::Debug for LibvirtDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtDomain")
            .field("name", &self.name)
            .finish()
    }
}

/// The 16 bytes of `s` when it parses as a UUID the way libvirt's `virUUIDParse` reads one:
/// leading spaces, 32 hex digits in pairs with any `-` or ` ` between pairs, trailing
/// whitespace. Every string libvirt would look up as a UUID is one here.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.trim_start_matches(' ').as_bytes();
    let mut out = [0u8; 16];
    let (mut i, mut n) = (0usize, 0usize);
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    while n < 16 {
        match b.get(i)? {
            b'-' | b' ' => i += 1,
            &c => {
                let hi = hex(c)?;
                let lo = hex(*b.get(i + 1)?)?;
                out[n] = hi << 4 | lo;
                n += 1;
                i += 2;
            }
        }
    }
    b[i..]
        .iter()
        .all(|c| c.is_ascii_whitespace())
        .then_some(out)
}

/// A bitmap libvirt reported broken when asked to use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenBitmap {
    pub bitmap: String,
    pub disk: String,
}

/// Reads libvirt's "missing or broken bitmap 'B' for disk 'D'" (qemu driver, 6.x–10.x).
pub fn broken_bitmap(message: &str) -> Option<BrokenBitmap> {
    let rest = &message[message.find("missing or broken bitmap '")? + 26..];
    let (bitmap, rest) = rest.split_once('\'')?;
    let rest = &rest[rest.find("for disk '")? + 10..];
    let (disk, _) = rest.split_once('\'')?;
    Some(BrokenBitmap {
        bitmap: bitmap.to_string(),
        disk: disk.to_string(),
    })
}

impl LibvirtDomain {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_active(&self) -> Result<bool, LibvirtError> {
        self.dom.is_active().map_err(lv("reading the domain state"))
    }

    /// The domain's XML: the live definition when running, else the persistent one.
    pub fn xml(&self) -> Result<String, LibvirtError> {
        let flags = if self.is_active()? {
            0
        } else {
            sys::VIR_DOMAIN_XML_INACTIVE
        };
        self.dom
            .xml_desc(flags)
            .map_err(lv(format!("reading the XML of {}", self.name)))
    }

    /// Name, UUID, tenant and disks.
    pub fn describe(&self) -> Result<DomainDesc, LibvirtError> {
        Ok(xml::domain(&self.xml()?)?)
    }

    /// Size of disk `target` as the guest sees it.
    pub fn capacity(&self, target: &str) -> Result<u64, LibvirtError> {
        self.dom
            .block_info(target, 0)
            .map(|b| b.capacity)
            .map_err(lv(format!("reading the size of {target}")))
    }

    /// Every checkpoint, parents before children.
    pub fn checkpoints(&self) -> Result<Vec<CheckpointDesc>, LibvirtError> {
        let names = ffi::checkpoint_names(&self.dom).map_err(lv("listing checkpoints"))?;
        let mut all = Vec::with_capacity(names.len());
        for n in names {
            let x = ffi::checkpoint_xml(&self.dom, &n, sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
                .map_err(lv(format!("reading checkpoint {n}")))?;
            all.push(xml::checkpoint(&x)?);
        }
        Ok(order_parents_first(all))
    }

    /// Creates a checkpoint (`quiesce` asks libvirt to freeze through the guest agent).
    pub fn create_checkpoint(&self, xml: &str, quiesce: bool) -> Result<(), LibvirtError> {
        let flags = if quiesce {
            sys::VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE
        } else {
            0
        };
        ffi::checkpoint_create(&self.dom, xml, flags).map_err(lv("creating a checkpoint"))
    }

    /// Brings back the metadata of a checkpoint libvirt lost; with `validate`, libvirt checks
    /// that the bitmaps are in the images and usable.
    pub fn redefine_checkpoint(&self, xml: &str, validate: bool) -> Result<(), LibvirtError> {
        let mut flags = sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE;
        if validate {
            flags |= sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE;
        }
        ffi::checkpoint_create(&self.dom, xml, flags).map_err(lv("redefining a checkpoint"))
    }

    /// Deletes one of *our* checkpoints (libvirt merges its bitmaps into its parent's).
    pub fn delete_checkpoint(&self, name: &str) -> Result<(), LibvirtError> {
        if !name.starts_with(CHECKPOINT_PREFIX) {
            return Err(LibvirtError::InvalidName(name.to_string()));
        }
        let mut r = ffi::checkpoint_delete(&self.dom, name, 0);
        for _ in 0..3 {
            match &r {
                // The domain is busy ending a job; libvirt waited 30 s already. Again.
                Err(e) if busy(e) => r = ffi::checkpoint_delete(&self.dom, name, 0),
                _ => break,
            }
        }
        match r {
            Ok(()) => Ok(()),
            // Its bitmap is gone already (removed behind libvirt's back, or lost in a crash):
            // only the metadata is left to delete.
            Err(e) if e.message().contains("not found") || e.message().contains("missing") => {
                tracing::warn!(checkpoint = name, error = %e, "bitmap gone: deleting the metadata only");
                ffi::checkpoint_delete(
                    &self.dom,
                    name,
                    sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY,
                )
                .map_err(lv(format!("deleting the metadata of checkpoint {name}")))
            }
            Err(e) => Err(lv(format!("deleting checkpoint {name}"))(e)),
        }
    }

    /// Deletes our checkpoints not in `keep`, children first (so each merge lands in a
    /// checkpoint that still exists). Returns the names deleted.
    pub fn retire_checkpoints(&self, keep: &BTreeSet<String>) -> Result<Vec<String>, LibvirtError> {
        let mut gone = Vec::new();
        for c in self.checkpoints()?.iter().rev() {
            if c.name.starts_with(CHECKPOINT_PREFIX) && !keep.contains(&c.name) {
                self.delete_checkpoint(&c.name)?;
                gone.push(c.name.clone());
            }
        }
        Ok(gone)
    }

    /// Deletes all our checkpoints (and with them their bitmaps): hands the domain over to
    /// another tool (virtnbdbackup refuses to run next to checkpoints it did not create). The
    /// next backup of ours is a full.
    pub fn release(&self) -> Result<Vec<String>, LibvirtError> {
        self.retire_checkpoints(&BTreeSet::new())
    }

    /// Starts the domain.
    pub fn start(&self) -> Result<(), LibvirtError> {
        self.dom.create().map_err(lv("starting the domain"))
    }

    /// Starts the domain with its vCPUs paused.
    pub fn start_paused(&self) -> Result<(), LibvirtError> {
        self.dom
            .create_with_flags(sys::VIR_DOMAIN_START_PAUSED)
            .map_err(lv("starting the domain paused"))
    }

    /// Powers the domain off at once.
    pub fn destroy(&self) -> Result<(), LibvirtError> {
        self.dom.destroy().map_err(lv("stopping the domain"))
    }

    /// `virDomainBackupBegin`.
    pub fn backup_begin(&self, backup: &str, checkpoint: &str) -> Result<(), virt::error::Error> {
        ffi::backup_begin(&self.dom, backup, Some(checkpoint))
    }

    /// The running backup job's exports.
    pub fn backup_exports(&self) -> Result<Vec<xml::BackupExport>, LibvirtError> {
        let x = ffi::backup_xml(&self.dom).map_err(lv("reading the backup job"))?;
        Ok(xml::backup_exports(&x)?)
    }

    /// The socket of the running backup job (to tell ours from somebody else's).
    pub fn backup_socket(&self) -> Result<PathBuf, LibvirtError> {
        let x = ffi::backup_xml(&self.dom).map_err(lv("reading the backup job"))?;
        Ok(xml::backup_socket(&x)?
            .map(PathBuf::from)
            .unwrap_or_default())
    }

    /// Whether the domain is paused.
    pub fn is_paused(&self) -> Result<bool, LibvirtError> {
        self.dom
            .state()
            .map(|(s, _)| s == virt::enumutil::Enum::Known(virt::domain::DomainState::Paused))
            .map_err(lv("reading the domain state"))
    }

    /// Whether the domain runs (neither paused nor shut off).
    pub fn is_running(&self) -> Result<bool, LibvirtError> {
        self.dom
            .state()
            .map(|(s, _)| s == virt::enumutil::Enum::Known(virt::domain::DomainState::Running))
            .map_err(lv("reading the domain state"))
    }

    /// Pauses the guest's CPUs (its in-flight I/O completes first).
    pub fn suspend(&self) -> Result<(), LibvirtError> {
        self.dom.suspend().map_err(lv("pausing the domain"))
    }

    /// Lets a paused guest run again.
    pub fn resume(&self) -> Result<(), LibvirtError> {
        self.dom.resume().map_err(lv("resuming the domain"))
    }

    /// Removes the domain's definition (and our checkpoint metadata with it).
    pub fn undefine(&self) -> Result<(), LibvirtError> {
        self.dom
            .undefine_flags(sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            .map_err(lv("undefining the domain"))
    }

    /// Whether a job (ours or anybody's) runs on the domain.
    pub fn job_active(&self) -> Result<bool, LibvirtError> {
        match ffi::job_type(&self.dom) {
            Ok(t) => Ok(t != sys::VIR_DOMAIN_JOB_NONE as i32),
            // A backup job being set up (or torn down) has no statistics yet: it exists.
            Err(e) if e.message().contains("job data missing") => Ok(true),
            // libvirt is still processing the job's events (state change lock held): busy.
            Err(e) if busy(&e) => Ok(true),
            Err(e) => Err(lv("reading the job state")(e)),
        }
    }

    /// Aborts the running backup job and waits until libvirt reports it gone.
    pub fn end_backup_job(&self) -> Result<(), LibvirtError> {
        if let Err(e) = ffi::abort_job(&self.dom) {
            // No job is not an error here: the job may have died with its export.
            if self.job_active()? {
                return Err(lv("aborting the backup job")(e));
            }
        }
        let t = Instant::now();
        while self.job_active()? {
            if t.elapsed() > JOB_END_TIMEOUT {
                return Err(LibvirtError::JobStuck(JOB_END_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts copying disk `target`'s backing chain into its top image (QEMU `block-stream`
    /// through libvirt's block pull); the chain is dropped from the disk when the copy ends.
    /// At most `mib_per_sec` MiB/s (0: no limit).
    pub fn block_pull(&self, target: &str, mib_per_sec: u64) -> Result<(), LibvirtError> {
        ffi::block_pull(&self.dom, target, mib_per_sec)
            .map_err(lv(format!("starting the block pull of {target}")))
    }

    /// `(cur, end)` of disk `target`'s block job, `None` when it has none.
    pub fn block_job(&self, target: &str) -> Result<Option<(u64, u64)>, LibvirtError> {
        ffi::block_job_info(&self.dom, target)
            .map_err(lv(format!("reading the block job of {target}")))
    }

    /// Asks disk `target`'s block job to stop (it ends soon after).
    pub fn block_job_abort(&self, target: &str) -> Result<(), LibvirtError> {
        ffi::block_job_abort(&self.dom, target)
            .map_err(lv(format!("aborting the block job of {target}")))
    }

    /// Freezes the guest's filesystems through its agent, waiting at most `timeout`.
    pub fn freeze(&self, timeout: Duration) -> Result<u32, LibvirtError> {
        let secs = timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
        ffi::agent_timeout(&self.dom, secs).map_err(lv("setting the agent timeout"))?;
        ffi::fs_freeze(&self.dom).map_err(lv("freezing the guest's filesystems"))
    }

    /// Thaws the guest's filesystems.
    pub fn thaw(&self) -> Result<u32, LibvirtError> {
        let r = ffi::fs_thaw(&self.dom).map_err(lv("thawing the guest's filesystems"));
        // Back to libvirt's default agent timeout for everybody else.
        let _ = ffi::agent_timeout(&self.dom, -2);
        r
    }
}

/// libvirt timed out waiting for the domain's state change lock (another job or its events).
fn busy(e: &virt::error::Error) -> bool {
    e.code() == virt::error::ErrorNumberEnum::Known(virt::error::ErrorNumber::OperationTimeout)
        || e.message().contains("cannot acquire state change lock")
}

fn order_parents_first(mut all: Vec<CheckpointDesc>) -> Vec<CheckpointDesc> {
    // Depth from the root; roots first, creation time breaks ties.
    let parent: BTreeMap<String, Option<String>> = all
        .iter()
        .map(|c| (c.name.clone(), c.parent.clone()))
        .collect();
    let depth = |n: &str| {
        let mut d = 0usize;
        let mut cur = parent.get(n).cloned().flatten();
        while let Some(p) = cur {
            d += 1;
            if d > parent.len() {
                break; // a cycle cannot come from libvirt; do not loop on one
            }
            cur = parent.get(&p).cloned().flatten();
        }
        d
    };
    all.sort_by_key(|c| (depth(&c.name), c.creation_time, c.name.clone()));
    all
}

/// What the tracking of one disk looks like before a backup.
#[derive(Debug, Clone)]
pub struct DiskState<'a> {
    pub disk: &'a DomainDisk,
    pub capacity: u64,
    /// The checkpoint named by the last backup, as libvirt knows it now.
    pub checkpoint: Option<&'a CheckpointDesc>,
    /// libvirt reported this disk's bitmap broken.
    pub broken: bool,
}

/// The full-vs-incremental rule for one disk, with the reason for a full.
pub fn decide(requested: Requested, last: Option<&Manifest>, s: &DiskState<'_>) -> Decision {
    use crate::source::Base;
    crate::source::decide(
        requested,
        last,
        s.disk.trackable(),
        s.capacity,
        FullReason::CheckpointMissing,
        |name| match s.checkpoint.filter(|c| c.name == name) {
            None => Base::Missing(FullReason::CheckpointMissing),
            Some(c) if c.bitmap_for(&s.disk.target).is_none() => {
                Base::Missing(FullReason::DiskAdded)
            }
            Some(_) if s.broken => Base::Broken,
            Some(_) => Base::Usable,
        },
    )
}

/// How the guest was quiesced for a backup.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Quiesce {
    pub consistency: Option<Consistency>,
    /// How long the guest's filesystems were frozen, when they were.
    pub freeze_ms: Option<u64>,
    pub warning: Option<String>,
}

/// One disk of a running backup.
#[derive(Debug, Clone)]
pub struct SessionDisk {
    pub target: String,
    pub size: u64,
    pub uri: String,
    pub dirty_context: Option<String>,
    pub decision: Decision,
}

/// A running pull-mode backup. End it with [`end`].
#[derive(Debug)]
pub struct Session {
    pub checkpoint: String,
    pub disks: Vec<SessionDisk>,
    pub quiesce: Quiesce,
    /// The domain was shut off and was started paused for this backup.
    pub started_paused: bool,
    scratch: PathBuf,
}

impl Session {
    /// The backup's scratch directory (QEMU's NBD socket and copy-before-write images).
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch
    }
}

/// A backup to begin.
#[derive(Debug, Clone)]
pub struct BeginRequest {
    pub backup_id: BackupId,
    /// Per disk to back up: target and decision.
    pub disks: Vec<(String, Decision)>,
    /// Tracked disks not backed up this time (they keep a bitmap in the new checkpoint).
    pub also_tracked: Vec<String>,
    /// Disks that cannot be tracked (raw): no bitmap.
    pub untracked: Vec<String>,
    pub scratch_root: PathBuf,
    /// Freeze through the guest agent, at most this long.
    pub quiesce: Option<Duration>,
    pub started_paused: bool,
}

/// Freezes (optionally), begins the backup job with its checkpoint, thaws. A disk whose
/// bitmap libvirt refuses as broken is switched to a full and the job begun again; `decide`
/// updates are visible in the returned session.
pub fn begin(dom: &LibvirtDomain, req: BeginRequest) -> Result<Session, LibvirtError> {
    let checkpoint = req.backup_id.checkpoint();
    if dom.checkpoints()?.iter().any(|c| c.name == checkpoint) {
        return Err(LibvirtError::CheckpointExists(checkpoint));
    }
    let qemu = QemuIdentity::of_host()?;
    let scratch = scratch::make(&req.scratch_root, &req.backup_id, qemu)?;
    let socket = scratch.join("nbd.sock");
    let mut disks = req.disks.clone();
    let mut tracked: Vec<&str> = disks.iter().map(|(t, _)| t.as_str()).collect();
    tracked.extend(req.also_tracked.iter().map(String::as_str));
    let untracked: Vec<&str> = req.untracked.iter().map(String::as_str).collect();
    tracked.retain(|t| !untracked.contains(t));
    let cxml = xml::checkpoint_xml(&checkpoint, None, &tracked, &untracked);

    let mut quiesce = Quiesce::default();
    let frozen = Arc::new(AtomicBool::new(false));
    let mut freeze_started = None;
    let mut watchdog = None;
    if let Some(limit) = req.quiesce {
        let t = Instant::now();
        match dom.freeze(limit) {
            Ok(n) => {
                tracing::info!(domain = dom.name(), filesystems = n, "guest frozen");
                frozen.store(true, Ordering::SeqCst);
                freeze_started = Some(t);
                // Whatever happens to the calls below, the guest is thawed at the deadline.
                let (d, f) = (dom.clone(), frozen.clone());
                watchdog = Some(std::thread::spawn(move || {
                    let deadline = t + limit;
                    while f.load(Ordering::SeqCst) {
                        if Instant::now() >= deadline {
                            if f.swap(false, Ordering::SeqCst) {
                                tracing::warn!("freeze deadline reached: thawing the guest");
                                let _ = d.thaw();
                            }
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }));
            }
            Err(e) => {
                // A hung or absent agent: make sure nothing stays frozen, go on crash-consistent.
                let _ = dom.thaw();
                let w = format!("quiesce failed, backup is crash-consistent: {e}");
                tracing::warn!(domain = dom.name(), "{w}");
                quiesce.warning = Some(w);
            }
        }
    }
    let mut result = Err(LibvirtError::Worker("no attempt".into()));
    for _ in 0..=disks.len() {
        let scratch_files: Vec<String> = disks
            .iter()
            .map(|(t, _)| scratch.join(format!("{t}.scratch")).display().to_string())
            .collect();
        let reqs: Vec<xml::BackupDiskReq<'_>> = disks
            .iter()
            .zip(&scratch_files)
            .map(|((t, dec), s)| xml::BackupDiskReq {
                target: t,
                incremental: dec.since.as_deref(),
                scratch: s,
            })
            .collect();
        let skipped: Vec<&str> = req
            .also_tracked
            .iter()
            .chain(&req.untracked)
            .map(String::as_str)
            .filter(|s| !disks.iter().any(|(t, _)| t == s))
            .collect();
        let bxml = xml::backup_xml(&socket.display().to_string(), &reqs, &skipped);
        match dom.backup_begin(&bxml, &cxml) {
            Ok(()) => {
                result = Ok(());
                break;
            }
            Err(e) => {
                let broken = broken_bitmap(e.message());
                let fixed = broken.and_then(|b| {
                    disks
                        .iter_mut()
                        .find(|(t, d)| *t == b.disk && d.level == Level::Incremental)
                });
                match fixed {
                    Some((t, d)) => {
                        tracing::warn!(disk = %t, "libvirt refuses the disk's bitmap: full backup");
                        *d = Decision {
                            level: Level::Full,
                            since: None,
                            reason: Some(FullReason::BitmapInconsistent),
                        };
                    }
                    None => {
                        result = Err(lv("beginning the backup job")(e));
                        break;
                    }
                }
            }
        }
    }
    if let Some(t) = freeze_started {
        if frozen.swap(false, Ordering::SeqCst) {
            if let Err(e) = dom.thaw() {
                tracing::error!(error = %e, "thaw failed");
            }
            quiesce.consistency = Some(Consistency::Application);
        } else {
            quiesce.warning = Some(
                "the freeze outlasted its limit and was ended: backup is crash-consistent".into(),
            );
        }
        quiesce.freeze_ms = Some(t.elapsed().as_millis() as u64);
    }
    if let Some(w) = watchdog {
        let _ = w.join();
    }
    if quiesce.consistency.is_none() {
        quiesce.consistency = Some(Consistency::Crash);
    }
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&scratch);
        return Err(e);
    }
    // QEMU made the socket in a directory only it and root can write: it must be QEMU's.
    let exports = match check_socket(&socket, qemu).and_then(|()| dom.backup_exports()) {
        Ok(x) => x,
        Err(e) => {
            let _ = dom.end_backup_job();
            let _ = dom.delete_checkpoint(&checkpoint);
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
    };
    let mut out = Vec::new();
    for (t, decision) in disks {
        let e = exports.iter().find(|e| e.disk == t);
        let export = e.map_or(t.clone(), |e| e.export.clone());
        let size = dom.capacity(&t)?;
        out.push(SessionDisk {
            uri: format!("nbd+unix:///{export}?socket={}", socket.display()),
            dirty_context: if decision.level == Level::Incremental {
                e.and_then(|e| e.bitmap.as_ref())
                    .map(|b| format!("qemu:dirty-bitmap:{b}"))
            } else {
                None
            },
            target: t,
            size,
            decision,
        });
    }
    Ok(Session {
        checkpoint,
        disks: out,
        quiesce,
        started_paused: req.started_paused,
        scratch,
    })
}

/// Ends a backup: the job is aborted and the scratch directory removed; then, if
/// `committed`, our checkpoints other than the new one and those in `keep` are deleted,
/// else the new checkpoint is (its bitmaps merge back into the parent's).
pub fn end(
    dom: &LibvirtDomain,
    session: Session,
    committed: bool,
    keep: &BTreeSet<String>,
) -> Result<(), LibvirtError> {
    let job = dom.end_backup_job();
    let _ = std::fs::remove_dir_all(&session.scratch);
    let r = if committed {
        let mut keep = keep.clone();
        keep.insert(session.checkpoint.clone());
        dom.retire_checkpoints(&keep).map(|gone| {
            tracing::info!(retired = ?gone, "older checkpoints retired");
        })
    } else {
        dom.delete_checkpoint(&session.checkpoint)
    };
    if session.started_paused {
        if let Err(e) = dom.destroy() {
            tracing::error!(error = %e, "the domain started paused for the backup is still running");
        }
    }
    job?;
    r
}

/// Removes what interrupted backups left in a domain's scratch directory. Only when no job
/// runs on the domain: libvirt runs one backup job per domain at a time, and ours live there.
/// A `domain_root` that is a symlink or somebody else's is refused; inside it, only
/// directories owned by QEMU's user or by root are removed (symlinks and anything else stay).
pub fn clean_scratch(
    dom: &LibvirtDomain,
    domain_root: &Path,
) -> Result<Vec<PathBuf>, LibvirtError> {
    use std::os::unix::fs::MetadataExt;
    if !scratch::check_domain_root(domain_root)? {
        return Ok(Vec::new());
    }
    let Ok(rd) = std::fs::read_dir(domain_root) else {
        return Ok(Vec::new());
    };
    if dom.is_active()? && dom.job_active()? {
        return Ok(Vec::new());
    }
    let qemu = QemuIdentity::of_host()?;
    let mut gone = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let ours = md.uid() == qemu.uid || md.uid() == 0;
        if !md.file_type().is_dir() || !ours {
            tracing::warn!(path = %p.display(), uid = md.uid(), "not ours: left in the scratch directory");
            continue;
        }
        if std::fs::remove_dir_all(&p).is_ok() {
            gone.push(p);
        }
    }
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(t: &str, fmt: &str) -> DomainDisk {
        DomainDisk {
            target: t.into(),
            format: Some(fmt.into()),
            source: DiskSource::File {
                path: format!("/x/{t}"),
            },
            readonly: false,
        }
    }

    fn manifest(checkpoint: &str, size: u64) -> Manifest {
        let mut m = crate::format::manifest::tests::sample();
        m.checkpoint = Some(checkpoint.into());
        m.disk_size = size;
        m
    }

    #[test]
    fn uuids_parse_as_libvirt_reads_them() {
        let u = "d164e3bc-ac33-4206-b894-dba491c0a8a4";
        let bytes = parse_uuid(u).expect("canonical");
        assert_eq!(bytes[0], 0xd1);
        assert_eq!(bytes[15], 0xa4);
        for same in [
            "d164e3bcac334206b894dba491c0a8a4",
            "D164E3BC-AC33-4206-B894-DBA491C0A8A4",
            "  d1-64-e3bc ac33 4206b894dba491c0a8a4 \n",
        ] {
            assert_eq!(parse_uuid(same), Some(bytes), "{same:?}");
        }
        for not in [
            "",
            "instance-00000001",
            "d164e3bc-ac33-4206-b894-dba491c0a8a",
            "d164e3bc-ac33-4206-b894-dba491c0a8a4x",
            "d164e3bc-ac33-4206-b894-dba491c0a8a4-",
            "d164e3bc-ac33-4206-b894-dba491c0a8a4a4",
            "d-164e3bc-ac33-4206-b894-dba491c0a8a4",
            "vm-1",
        ] {
            assert_eq!(parse_uuid(not), None, "{not:?}");
        }
    }

    #[test]
    fn broken_bitmap_message() {
        let m = "checkpoint inconsistent: missing or broken bitmap 'cbt-2' for disk 'vda'";
        assert_eq!(
            broken_bitmap(m),
            Some(BrokenBitmap {
                bitmap: "cbt-2".into(),
                disk: "vda".into()
            })
        );
        assert_eq!(broken_bitmap("missing or broken bitmap 'x"), None);
        assert_eq!(broken_bitmap("other"), None);
    }

    #[test]
    fn decisions_and_reasons() {
        let q = disk("vda", "qcow2");
        let raw = disk("vdb", "raw");
        let c = xml::checkpoint(&xml::checkpoint_xml("cbt-1", None, &["vda"], &[])).expect("ok");
        let st = |d, c, broken, cap| DiskState {
            disk: d,
            capacity: cap,
            checkpoint: c,
            broken,
        };
        let m = manifest("cbt-1", 100);
        let r = |d: Decision| d.reason;
        assert_eq!(
            r(decide(Requested::Auto, None, &st(&q, Some(&c), false, 100))),
            Some(FullReason::FirstBackup)
        );
        assert_eq!(
            r(decide(
                Requested::Full,
                Some(&m),
                &st(&q, Some(&c), false, 100)
            )),
            Some(FullReason::Requested)
        );
        assert_eq!(
            r(decide(
                Requested::Auto,
                Some(&m),
                &st(&raw, Some(&c), false, 100)
            )),
            Some(FullReason::Untracked)
        );
        assert_eq!(
            r(decide(Requested::Auto, Some(&m), &st(&q, None, false, 100))),
            Some(FullReason::CheckpointMissing)
        );
        let other = disk("vdc", "qcow2");
        assert_eq!(
            r(decide(
                Requested::Auto,
                Some(&m),
                &st(&other, Some(&c), false, 100)
            )),
            Some(FullReason::DiskAdded)
        );
        assert_eq!(
            r(decide(
                Requested::Auto,
                Some(&m),
                &st(&q, Some(&c), true, 100)
            )),
            Some(FullReason::BitmapInconsistent)
        );
        assert_eq!(
            r(decide(
                Requested::Auto,
                Some(&m),
                &st(&q, Some(&c), false, 200)
            )),
            Some(FullReason::DiskResized)
        );
        let d = decide(
            Requested::Incremental,
            Some(&m),
            &st(&q, Some(&c), false, 100),
        );
        assert_eq!(
            (d.level, d.since.as_deref()),
            (Level::Incremental, Some("cbt-1"))
        );
    }

    #[test]
    fn parents_come_first() {
        let mk = |n: &str, p: Option<&str>, t| CheckpointDesc {
            name: n.into(),
            parent: p.map(String::from),
            creation_time: Some(t),
            disks: vec![],
        };
        let v = order_parents_first(vec![
            mk("c", Some("b"), 1),
            mk("a", None, 1),
            mk("b", Some("a"), 1),
        ]);
        let names: Vec<_> = v.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }
}
