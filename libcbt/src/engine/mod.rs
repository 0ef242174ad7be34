//! Backup, restore and verify pipelines.
//!
//! ```text
//! backup:  NBD export ─ map (allocation, dirty) ─▶ chunks ─▶ NBD reads (bounded, multi-conn)
//!          ─▶ zero detection ─▶ lz4 + crc32 (blocking pool) ─▶ segment writer ─▶ sink
//!          ─▶ index ─▶ manifest (last: the commit)
//! restore: manifests of the chain ─▶ indexes ─▶ plan_restore (metadata only)
//!          ─▶ each frame read once, in storage order ─▶ crc + decompress ─▶ target
//! verify:  every manifest, index and referenced frame of a chain; problems named by place
//! ```
//!
//! Memory is bounded by the number of chunks in flight, whatever the disk size. Cancelling a
//! backup is dropping its future: writers remove their partial objects, and no manifest is
//! written, so the backup does not exist.
//!
//! Every job kind takes the same [`CancelToken`] (`BackupOptions::cancel`,
//! [`RestoreOptions::cancel`], [`VerifyOptions::cancel`]): set it, and the job fails with
//! [`EngineError::Cancelled`] at its next check (between chunks, groups of frames, or within
//! [`CANCEL_POLL`] of any wait), after cleaning up what it started (a restore's `qemu-nbd`).

mod backup;
pub mod catalog;
mod compact;
pub mod export;
mod prune;
mod restore;
mod verify;

pub use backup::{
    backup_disk, is_zero, scan_export, BackupOptions, DiskBackup, Revalidate, Scan, Trusted,
    MARKER_REFRESH,
};
pub use compact::{compact, CompactOptions, CompactReport};
pub use prune::{
    ancestors, bound_chain, plan_delete, plan_folds, plan_prune, prune, prune_with, Bounded, Fold,
    Hold, PruneEntry, PruneReport, Steps, MAX_FOLDED,
};
pub use restore::{load_chain, restore, restore_with, RestoreOptions, RestoreStats, RestoreTarget};
pub use verify::{verify_chain, verify_chain_with, Problem, VerifyOptions, VerifyReport};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::format::index::PlanError;
use crate::format::FormatError;
use crate::nbd::NbdError;
use crate::sink::SinkError;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("NBD failed")]
    Nbd(#[from] NbdError),
    #[error("sink failed")]
    Sink(#[from] SinkError),
    #[error("keep policy")]
    Policy(#[from] crate::retention::PolicyError),
    #[error("corrupt {object} at {pos:#x}")]
    Corrupt {
        object: String,
        pos: u64,
        #[source]
        source: FormatError,
    },
    #[error("{object} at {pos:#x} does not match its index: {what}")]
    Mismatch {
        object: String,
        pos: u64,
        what: &'static str,
    },
    #[error("backup chain of {backup} is broken: {what}")]
    Chain { backup: String, what: String },
    #[error("I/O error while {op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("index {object}: entry at disk offset {offset:#x} is refused")]
    Plan {
        object: String,
        offset: u64,
        // Boxed: the error is rare, and keeps every Result of the engine small.
        #[source]
        source: Box<PlanError>,
    },
    #[error("backup {backup} of {disk} exists already (committed, or written or begun by another job); choose another id")]
    BackupExists { disk: String, backup: String },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("a worker task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("the change source failed")]
    Source(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cancelled")]
    Cancelled,
}

/// The cancellation token of every job kind: set it to `true` to stop the job.
pub type CancelToken = Arc<AtomicBool>;

/// How often a waiting job looks at its cancellation token.
pub const CANCEL_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// True when `token` is set.
pub(crate) fn is_cancelled(token: Option<&CancelToken>) -> bool {
    token.is_some_and(|c| c.load(Ordering::Relaxed))
}

/// Resolves once `token` is set (never without one): raced against a job's future, it
/// bounds how long a cancel waits for a stuck step.
pub(crate) async fn cancelled(token: Option<&CancelToken>) {
    let Some(c) = token else {
        return std::future::pending().await;
    };
    while !c.load(Ordering::Relaxed) {
        tokio::time::sleep(CANCEL_POLL).await;
    }
}

/// Progress of a job: bytes done out of bytes to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// A callback for progress events.
pub type ProgressFn<'a> = dyn Fn(Progress) + Send + Sync + 'a;

/// Buffers handed around the pipeline and given back, so that the hot path neither allocates
/// nor zero-fills (fresh megabyte buffers cost page faults and memsets on every chunk).
#[derive(Default)]
pub(crate) struct Pool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    /// A buffer of exactly `len` bytes (contents unspecified: it is about to be overwritten).
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let mut v = self.take_at_least(len);
        v.truncate(len);
        v
    }
    /// A buffer of at least `len` bytes, contents unspecified: a pooled buffer that is long
    /// enough is given as it is (no clearing), so a caller that uses only a prefix of it
    /// (see [`crate::nbd::Client::read_into`]) pays nothing for buffers of mixed sizes.
    /// Pooled buffers are kept whatever their size: the caller bounds them (chunks).
    pub(crate) fn take_at_least(&self, len: usize) -> Vec<u8> {
        let mut v = self
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .unwrap_or_default();
        if v.len() < len {
            v.resize(len, 0);
        }
        v
    }
    pub(crate) fn give(&self, v: Vec<u8>) {
        if let Ok(mut f) = self.free.lock() {
            let held: usize = f.iter().map(Vec::capacity).sum();
            if f.len() < MAX_POOLED && held + v.capacity() <= MAX_POOLED_BYTES {
                f.push(v);
            }
        }
    }
}

/// Buffers a [`Pool`] keeps for reuse at most, and their total capacity at most.
const MAX_POOLED: usize = 64;
const MAX_POOLED_BYTES: usize = 32 << 20;

/// A random 128-bit id (segment names), from the standard library's per-process random keys.
pub(crate) fn random_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut out = 0u128;
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        out = (out << 64) | u128::from(h.finish());
    }
    out
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
