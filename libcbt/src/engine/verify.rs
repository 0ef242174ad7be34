//! Verification of a backup chain: every manifest, index and referenced frame.

use super::restore::{coalesce, load_chain, read_frames};
use super::{cancelled, is_cancelled, CancelToken, EngineError, Pool};
use crate::format::FrameRead;
use crate::sink::Sink;

/// Something wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The backup whose index references the bad object.
    pub backup: String,
    /// The object (segment, index, manifest).
    pub object: String,
    /// Byte position in the object.
    pub pos: u64,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backup {}: {} at {:#x}: {}",
            self.backup, self.object, self.pos, self.what
        )
    }
}

/// How a verification runs.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Set to stop the verification: it fails with [`EngineError::Cancelled`] before the
    /// next group of frames (or within [`super::CANCEL_POLL`] of a stuck read).
    pub cancel: Option<CancelToken>,
}

/// Outcome of a verification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub backups: usize,
    pub frames: u64,
    pub bytes: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn describe(e: &EngineError) -> (String, u64, String) {
    let mut what = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        what.push_str(": ");
        what.push_str(&s.to_string());
        src = s.source();
    }
    match e {
        EngineError::Corrupt { object, pos, .. } | EngineError::Mismatch { object, pos, .. } => {
            (object.clone(), *pos, what)
        }
        _ => (String::new(), 0, what),
    }
}

/// Checks the chain ending at `backup`: manifests and indexes (checksums, sizes, links), then
/// every frame any index of the chain references (header, crc, decompression, agreement with
/// the index). A chain that cannot even be loaded is one problem; otherwise every bad frame is
/// reported with its backup, segment and position. [`verify_chain_with`] with default
/// options (no cancel).
pub async fn verify_chain<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
) -> Result<VerifyReport, EngineError> {
    verify_chain_with(sink, disk, backup, &VerifyOptions::default()).await
}

/// [`verify_chain`] with options (a cancellation token).
///
/// # Cancel safety
/// Dropping the future stops the verification; it writes nothing.
pub async fn verify_chain_with<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
    opts: &VerifyOptions,
) -> Result<VerifyReport, EngineError> {
    let cancel = opts.cancel.as_ref();
    if is_cancelled(cancel) {
        return Err(EngineError::Cancelled);
    }
    tokio::select! {
        r = verify(sink, disk, backup, cancel) => r,
        () = cancelled(cancel) => Err(EngineError::Cancelled),
    }
}

async fn verify<S: Sink>(
    sink: &S,
    disk: &str,
    backup: &str,
    cancel: Option<&CancelToken>,
) -> Result<VerifyReport, EngineError> {
    let mut report = VerifyReport::default();
    let chain = match load_chain(sink, disk, backup).await {
        Ok(c) => c,
        Err(e) => {
            let (object, pos, what) = describe(&e);
            report.problems.push(Problem {
                backup: backup.into(),
                object,
                pos,
                what,
            });
            return Ok(report);
        }
    };
    report.backups = chain.len();
    let pool = Pool::default();
    for (m, idx) in &chain {
        // Each frame once (the slices of one frame in a folded index name it again).
        let mut frames: Vec<FrameRead> =
            idx.entries.iter().filter_map(|e| e.frame_read()).collect();
        frames.sort_by_key(|f| (f.segment, f.pos));
        frames.dedup_by(|b, a| {
            let same = (a.segment, a.pos) == (b.segment, b.pos);
            if same && b.exact_len {
                (a.len, a.exact_len) = (b.len, true);
            } else if same && !a.exact_len {
                a.len = a.len.max(b.len);
            }
            if same {
                a.pieces.append(&mut b.pieces);
            }
            same
        });
        for group in coalesce(&frames, &sink.read_hint()) {
            if is_cancelled(cancel) {
                return Err(EngineError::Cancelled);
            }
            match read_frames(sink, disk, group, &pool).await {
                Ok(raws) => {
                    report.frames += raws.len() as u64;
                    report.bytes += raws.iter().map(|r| r.len() as u64).sum::<u64>();
                    for r in raws {
                        pool.give(r);
                    }
                }
                // Read one by one to name each bad frame.
                Err(_) => {
                    for f in group {
                        match read_frames(sink, disk, std::slice::from_ref(f), &pool).await {
                            Ok(_) => {
                                report.frames += 1;
                                report.bytes += u64::from(f.len);
                            }
                            Err(e) => {
                                let (object, pos, what) = describe(&e);
                                let object = if object.is_empty() {
                                    crate::format::segment_name(disk, f.segment)
                                } else {
                                    object
                                };
                                let pos = if pos == 0 { f.pos } else { pos };
                                report.problems.push(Problem {
                                    backup: m.backup_id.clone(),
                                    object,
                                    pos,
                                    what,
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(report)
}
