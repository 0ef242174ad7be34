//! Storage sinks: where backups go.
//!
//! The [`Sink`] trait is shaped by what object stores do well, so that S3 and Ceph backends fit
//! without touching the engine:
//!
//! | operation | local directory | S3 |
//! |---|---|---|
//! | [`Sink::create`] → [`ObjectWriter`] (append, finish) | temp file, fsync, rename, fsync dir | multipart upload |
//! | [`Sink::put`] (atomic, small, may replace) | temp + fsync + rename + fsync dir | `PutObject` |
//! | [`Sink::put_new`] (atomic, small, create-only: index, manifest, marker) | temp + fsync + `link` (fails if taken) + fsync dir | `PutObject` with `If-None-Match: *` |
//! | [`Sink::get_range`] | `pread` | ranged `GetObject` |
//! | [`Sink::get`] (bounded) | read | `GetObject` |
//! | [`Sink::list`] (by prefix) | directory walk | `ListObjectsV2` |
//! | [`Sink::delete`] | unlink | `DeleteObject` |
//! | [`Sink::delete_many`] | unlink each | `DeleteObjects` (1,000 a request) |
//!
//! Objects are written once and never modified. An object is visible only once complete
//! (`finish` or `put` returned): a crash leaves temporary files that [`Sink::list`] does not
//! show and [`Sink::remove_stale_partials`] removes once they are older than a grace period.
//! Directories a backend creates are fsynced into their parents before an object in them is
//! reported durable.
//!
//! Object names are relative, `/`-separated, made of `[A-Za-z0-9._-]` components that never
//! start with `.` (so never `.` or `..`, nor a backend's temporary files), at most [`MAX_NAME`]
//! bytes: [`check_name`] enforces it for every backend.

use std::future::Future;
use std::time::{Duration, SystemTime};

#[cfg(all(feature = "s3", feature = "swift"))]
pub mod any;
pub mod local;
#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "swift")]
pub mod swift;
#[allow(unsafe_code)]
pub mod uring;

/// Longest object name.
pub const MAX_NAME: usize = 512;

/// A secret (password, key, token): shown as `***` by `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

/// Reads a credentials file of `key = value` lines, keys among `allowed` (values may be
/// quoted; `#` starts a comment). The file must not be readable by group or others: a secret
/// in a world-readable file is refused, not used. Errors never quote a line (it may hold part
/// of a secret).
pub fn read_secrets(
    path: &std::path::Path,
    allowed: &[&str],
) -> Result<std::collections::BTreeMap<String, Secret>, SinkError> {
    use std::os::unix::fs::MetadataExt;
    let bad = |why: String| SinkError::Config(format!("credentials {}: {why}", path.display()));
    let md = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if md.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "mode {:o}: readable by others; chmod 600 it",
            md.mode() & 0o777
        )));
    }
    if md.len() > 64 << 10 {
        return Err(bad("larger than 64 KiB".into()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut out = std::collections::BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(bad(format!("line {}: not key = value", i + 1)));
        };
        let k = k.trim();
        if !allowed.contains(&k) {
            return Err(bad(format!(
                "line {}: not one of {}",
                i + 1,
                allowed.join(", ")
            )));
        }
        out.insert(
            k.to_string(),
            Secret(v.trim().trim_matches('"').to_string()),
        );
    }
    Ok(out)
}

/// Errors of sinks.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("object {name} not found")]
    NotFound { name: String },
    #[error("object {name} exists already; it was left as it is")]
    Exists { name: String },
    #[error("invalid object name {name:?}")]
    InvalidName { name: String },
    #[error("object {name} is {len} bytes, more than the {max} allowed here")]
    TooLarge { name: String, len: u64, max: u64 },
    #[error("sink is out of space while writing {name}")]
    NoSpace {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error while {op} {name}")]
    Io {
        op: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("object store error while {op} {name}")]
    Remote {
        op: &'static str,
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("sink configuration: {0}")]
    Config(String),
    #[error("the sink's server does not support {0}; refusing to use it")]
    Unsupported(String),
    /// The server refused to delete objects under S3 Object Lock (403): they stay until
    /// their retention ends. `names`: every object refused, in the order asked.
    #[error("{} object(s) under Object Lock, their retention not over (the server refused the deletion): {}", names.len(), names.first().map(String::as_str).unwrap_or(""))]
    Locked { names: Vec<String> },
    #[error("short read of {name} at {offset:#x}: {got} of {want} bytes")]
    ShortRead {
        name: String,
        offset: u64,
        want: u64,
        got: u64,
    },
}

impl SinkError {
    pub(crate) fn io(op: &'static str, name: &str, source: std::io::Error) -> SinkError {
        match source.kind() {
            std::io::ErrorKind::NotFound => SinkError::NotFound { name: name.into() },
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                SinkError::NoSpace {
                    name: name.into(),
                    source,
                }
            }
            _ => SinkError::Io {
                op,
                name: name.into(),
                source,
            },
        }
    }
}

/// An object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub len: u64,
    /// When the object was written, where the backend says (garbage collection never deletes
    /// an object whose age it does not know).
    pub modified: Option<SystemTime>,
}

impl ObjectInfo {
    /// True when the object is known to be older than `grace` at `now`.
    pub fn older_than(&self, grace: Duration, now: SystemTime) -> bool {
        older_than(self.modified, grace, now)
    }
}

/// True when `modified` is known and more than `grace` before `now`: the one age rule of
/// garbage collection (an unknown or future time is never old).
pub fn older_than(modified: Option<SystemTime>, grace: Duration, now: SystemTime) -> bool {
    modified
        .and_then(|m| now.duration_since(m).ok())
        .is_some_and(|age| age > grace)
}

/// How a backend wants its reads shaped: what a restore or a verification asks of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadHint {
    /// Largest range read at once (stored bytes).
    pub max_read: u64,
    /// Largest decoded size of one read (bounds memory for well-compressed frames).
    pub max_decoded: u64,
    /// Bytes between two wanted frames of one object read through rather than split into
    /// two requests.
    pub max_gap: u64,
    /// Reads in flight.
    pub parallel: usize,
}

impl ReadHint {
    /// A local disk: 2 MiB reads, 4 MiB decoded, no gaps read through, 10 in flight (measured
    /// best for O_DIRECT restores of an 8 GiB disk; see `engine::restore`).
    pub const LOCAL: ReadHint = ReadHint {
        max_read: 2 << 20,
        max_decoded: 4 << 20,
        max_gap: 0,
        parallel: 10,
    };
    /// An object store: each request costs a round trip and server work whatever its size,
    /// so ranges of several MiB, gaps of up to 1 MiB read through, 6 in flight. (8 in
    /// flight with 16 MiB decoded peaked at 306-316 MiB RSS restoring a 7-deep chain.)
    pub const OBJECT_STORE: ReadHint = ReadHint {
        max_read: 8 << 20,
        max_decoded: 8 << 20,
        max_gap: 1 << 20,
        parallel: 6,
    };
}

/// How long a sink with locks locks what it writes, and a backup extends its older objects'
/// locks to, for a guaranteed `period`: a quarter more, so that the objects a chain shares
/// need extending at most once a quarter period, not at every backup.
pub fn lock_span(period: Duration) -> Duration {
    period + period / 4
}

/// A storage backend. See the [module documentation](self).
/// Implementations are cheap handles (clone shares the backend).
pub trait Sink: Clone + Send + Sync + 'static {
    type Writer: ObjectWriter;

    /// Starts writing a new object. It becomes visible when [`ObjectWriter::finish`] returns.
    fn create(&self, name: &str) -> impl Future<Output = Result<Self::Writer, SinkError>> + Send;
    /// Writes a whole small object atomically (all or nothing, durable on return), replacing
    /// one of that name. For objects that are written once, use [`put_new`](Sink::put_new).
    fn put(&self, name: &str, data: Vec<u8>) -> impl Future<Output = Result<(), SinkError>> + Send;
    /// Like [`put`](Sink::put), but only if no object `name` exists: otherwise
    /// [`SinkError::Exists`] and the existing object is untouched. Of two writers racing for
    /// one name, exactly one succeeds.
    fn put_new(
        &self,
        name: &str,
        data: Vec<u8>,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
    /// Whether [`put_new`](Sink::put_new) has exactly one winner among writers racing at the
    /// same instant (true of a directory and of S3 servers with conditional writes); false
    /// where the server tests the precondition when a write starts (native Swift): there, a
    /// name written once is refused to later writers, but two overlapping writes may both
    /// succeed, the later replacing the earlier.
    fn atomic_put_new(&self) -> bool {
        true
    }
    /// How reads should be shaped (size, gaps, parallelism) for this backend.
    fn read_hint(&self) -> ReadHint {
        ReadHint::LOCAL
    }
    /// Reads `len` bytes at `offset`; fails rather than return fewer.
    fn get_range(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<u8>, SinkError>> + Send {
        self.get_range_into(name, offset, len, Vec::new())
    }
    /// [`get_range`](Sink::get_range) into `buf`, which comes back exactly `len` long: a
    /// caller reading many ranges reuses its buffers (no allocation, no clearing).
    fn get_range_into(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        buf: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, SinkError>> + Send;
    /// Reads a whole object of at most `max` bytes.
    fn get(&self, name: &str, max: u64) -> impl Future<Output = Result<Vec<u8>, SinkError>> + Send;
    /// Complete objects whose name starts with `prefix`, sorted by name.
    fn list(&self, prefix: &str)
        -> impl Future<Output = Result<Vec<ObjectInfo>, SinkError>> + Send;
    /// The first `n` complete objects whose name starts with `prefix`, in name order: one
    /// listing request on an object store for `n` up to a page (1,000).
    fn list_first(
        &self,
        prefix: &str,
        n: usize,
    ) -> impl Future<Output = Result<Vec<ObjectInfo>, SinkError>> + Send {
        async move {
            let mut all = self.list(prefix).await?;
            all.truncate(n);
            Ok(all)
        }
    }
    /// The names one level below `dir` (which ends with `/`) that hold objects: `a` and `b`
    /// for `dir/a/x` and `dir/b/y/z`, sorted. A delimiter listing on an object store: it
    /// never lists the objects beneath.
    fn list_dirs(&self, dir: &str) -> impl Future<Output = Result<Vec<String>, SinkError>> + Send {
        async move {
            let mut out: Vec<String> = self
                .list(dir)
                .await?
                .into_iter()
                .filter_map(|o| {
                    let rest = o.name.strip_prefix(dir)?;
                    let (first, _) = rest.split_once('/')?;
                    Some(first.to_string())
                })
                .collect();
            out.sort();
            out.dedup();
            Ok(out)
        }
    }
    /// Deletes an object; deleting a missing object is not an error.
    fn delete(&self, name: &str) -> impl Future<Output = Result<(), SinkError>> + Send;
    /// Deletes objects (missing ones are fine) in as few requests as the backend allows: S3
    /// `DeleteObjects` of up to 1,000 names, a Swift bulk delete; one by one in a directory.
    /// After an error some may be gone and others not: calling again finishes the work.
    fn delete_many(&self, names: &[String]) -> impl Future<Output = Result<(), SinkError>> + Send {
        async move {
            for n in names {
                self.delete(n).await?;
            }
            Ok(())
        }
    }
    /// How long this sink locks what cbt writes for good (S3 Object Lock: segments, indexes,
    /// manifests): `None` for sinks without immutable mode. A backup is immutable for at
    /// least this long after it starts; see [`extend_lock`](Sink::extend_lock).
    fn lock_period(&self) -> Option<Duration> {
        None
    }
    /// A handle on the same sink whose writes of lockable objects are locked until `until`
    /// (`None`: not locked) rather than for the lock span from the write: for rewrites (a
    /// fold's new generation, compacted segments), which must not lock a backup longer than
    /// its own lock already runs. Other sinks: the same handle.
    fn locking_until(&self, until: Option<SystemTime>) -> Self {
        let _ = until;
        self.clone()
    }
    /// Until when the server keeps object `name` locked (its retention date), or `None`
    /// when it is not locked (or the sink has no locks).
    fn locked_until(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<SystemTime>, SinkError>> + Send {
        let _ = name;
        async { Ok(None) }
    }
    /// Makes the server keep each of `names` locked until at least `until` (never shortens
    /// a lock). A no-op on sinks without locks.
    fn extend_lock(
        &self,
        names: &[String],
        until: SystemTime,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        let _ = (names, until);
        async { Ok(()) }
    }
    /// Removes what writers that died left behind (temporary files, unfinished uploads)
    /// older than `grace`; returns how many. Never touches a complete object, nor a partial
    /// one that a live writer (in this process, another one or another host) may still finish
    /// within `grace`.
    fn remove_stale_partials(
        &self,
        grace: Duration,
    ) -> impl Future<Output = Result<u64, SinkError>> + Send;
}

/// Sequential writer of one object.
pub trait ObjectWriter: Send + 'static {
    /// Appends `data`; returns the buffer for reuse.
    fn append(&mut self, data: Vec<u8>) -> impl Future<Output = Result<Vec<u8>, SinkError>> + Send {
        let len = data.len();
        self.append_prefix(data, len)
    }
    /// Appends the first `len` bytes of `data` (at most its length); returns the buffer
    /// whole, for reuse at its full length (the backup keeps frame buffers of the worst-case
    /// size and never clears them).
    fn append_prefix(
        &mut self,
        data: Vec<u8>,
        len: usize,
    ) -> impl Future<Output = Result<Vec<u8>, SinkError>> + Send;
    /// Bytes appended so far.
    fn len(&self) -> u64;
    /// True when nothing was appended.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Makes the object durable and visible under its name.
    fn finish(self) -> impl Future<Output = Result<(), SinkError>> + Send;
    /// Drops the partial object.
    fn abort(self) -> impl Future<Output = ()> + Send;
}

/// Checks an object name (see the module documentation).
pub fn check_name(name: &str) -> Result<(), SinkError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.split('/').all(|c| {
            !c.is_empty()
                && !c.starts_with('.')
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(SinkError::InvalidName { name: name.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_escape_or_are_odd_are_refused() {
        for bad in [
            "",
            "/abs",
            "a/../b",
            "a//b",
            "a/./b",
            ".hidden",
            "a b",
            "x/",
            "é",
            &"a".repeat(600),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["disks/vm-1_vda/backups/2026.manifest", "a", "a.b-c_d/e"] {
            check_name(good).expect(good);
        }
    }
}
