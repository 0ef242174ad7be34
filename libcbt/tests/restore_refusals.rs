//! Restore and verify against hand-built backups on a real local sink: chains whose indexes
//! contradict each other are refused (never a panic, never stale bytes), and a restore or a
//! verification in progress stops at its cancellation token.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{require, run};
use libcbt::engine::{
    self, CancelToken, EngineError, RestoreOptions, RestoreTarget, VerifyOptions,
};
use libcbt::format::index::PlanError;
use libcbt::format::segment::{encode_frame, segment_header};
use libcbt::format::{
    self, BackupStats, Consistency, Index, IndexEntry, Level, Location, Manifest, ObjectRef,
};
use libcbt::sink::local::{LocalSink, LocalWriter};
use libcbt::sink::{ObjectInfo, Sink, SinkError};

const DISK: &str = "d0";
const MIB: u64 = 1 << 20;

/// Disk bytes at `offset` of the version `seed` (incompressible enough that frames stay
/// about their raw size, so that a restore has many groups).
fn bytes(offset: u64, len: usize, seed: u64) -> Vec<u8> {
    let mut x = offset ^ (seed << 32) ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes a segment holding one frame per `(offset, len)` of version `seed`; returns its
/// index entries.
async fn write_segment(
    sink: &LocalSink,
    id: u128,
    ranges: &[(u64, usize)],
    seed: u64,
) -> Vec<IndexEntry> {
    let mut seg = segment_header().to_vec();
    let mut entries = Vec::new();
    for &(offset, len) in ranges {
        let pos = seg.len() as u64;
        let h = encode_frame(offset, &bytes(offset, len, seed), &mut seg).expect("frame");
        entries.push(IndexEntry {
            offset,
            len: len as u32,
            loc: Location::Frame {
                segment: id,
                pos,
                frame_len: h.frame_len() as u32,
            },
        });
    }
    sink.put(&format::segment_name(DISK, id), seg)
        .await
        .expect("segment");
    entries
}

/// Writes the index and manifest of backup `id` (the commit).
async fn commit(sink: &LocalSink, id: &str, parent: Option<&str>, size: u64, idx: &Index) {
    let ib = idx.encode();
    let name = format::index_name(DISK, id);
    let m = Manifest {
        format_version: 1,
        backup_id: id.into(),
        disk: DISK.into(),
        parent: parent.map(String::from),
        level: if parent.is_some() {
            Level::Incremental
        } else {
            Level::Full
        },
        full_reason: None,
        checkpoint: None,
        disk_size: size,
        chunk_size: MIB as u32,
        consistency: Consistency::Crash,
        freeze_ms: None,
        warnings: Vec::new(),
        started_unix_ms: 0,
        finished_unix_ms: 0,
        stats: BackupStats::default(),
        index: ObjectRef {
            name: name.clone(),
            len: ib.len() as u64,
            crc32: crc32fast::hash(&ib),
        },
        segments: Vec::new(),
        generation: 0,
        folded: Vec::new(),
        locked_until_unix_ms: None,
    };
    sink.put(&name, ib).await.expect("index");
    sink.put(&format::manifest_name(DISK, id), m.encode())
        .await
        .expect("manifest");
}

fn sink_in(dir: &Path) -> LocalSink {
    LocalSink::open(dir.join("sink")).expect("sink")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_chain_whose_indexes_disagree_on_a_frame() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = sink_in(dir.path());
    let size = 4 * MIB;
    let full = write_segment(&sink, 1, &[(0, 65536), (65536, 65536)], 1).await;
    commit(
        &sink,
        "b0",
        None,
        size,
        &Index {
            disk_size: size,
            entries: full.clone(),
        },
    )
    .await;
    // The incremental names the full's first frame for another disk range (crc-valid: the
    // index is written by the same encoder). Before, its pieces were written relative to the
    // frame's first entry: an underflow panic or bytes from a pooled buffer.
    let mut stolen = full[0];
    stolen.offset = 3 * MIB;
    commit(
        &sink,
        "b1",
        Some("b0"),
        size,
        &Index {
            disk_size: size,
            entries: vec![stolen],
        },
    )
    .await;
    let out = dir.path().join("out.raw");
    let e = engine::restore(
        &sink,
        DISK,
        "b1",
        &RestoreTarget::RawFile(out.clone()),
        None,
    )
    .await
    .expect_err("must be refused");
    match &e {
        EngineError::Plan {
            object,
            offset,
            source,
        } if matches!(**source, PlanError::FrameConflict { .. }) => {
            assert_eq!(object, &format::index_name(DISK, "b1"));
            assert_eq!(*offset, 3 * MIB);
        }
        other => panic!("expected a plan error, got {other:?}"),
    }
    assert!(!out.exists(), "nothing is created for a refused chain");
    // The full alone restores.
    engine::restore(
        &sink,
        DISK,
        "b0",
        &RestoreTarget::RawFile(out.clone()),
        None,
    )
    .await
    .expect("restore of the full");
    let got = std::fs::read(&out).expect("read back");
    assert_eq!(&got[..65536], &bytes(0, 65536, 1)[..]);
}

/// A chain of one full backup of 48 MiB in 1 MiB frames: 24 or more groups to restore.
async fn big_backup(sink: &LocalSink) -> u64 {
    let size = 48 * MIB;
    let ranges: Vec<(u64, usize)> = (0..48).map(|i| (i * MIB, MIB as usize)).collect();
    let entries = write_segment(sink, 7, &ranges, 3).await;
    commit(
        sink,
        "big",
        None,
        size,
        &Index {
            disk_size: size,
            entries,
        },
    )
    .await;
    size
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_in_progress_stops_at_its_cancel_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = sink_in(dir.path());
    let size = big_backup(&sink).await;
    let cancel: CancelToken = Arc::new(AtomicBool::new(false));
    let opts = RestoreOptions {
        cancel: Some(cancel.clone()),
        ..RestoreOptions::default()
    };
    let last = std::sync::Mutex::new(0u64);
    // Cancel once the first group is written: the restore is under way.
    let progress = |p: engine::Progress| {
        *last.lock().expect("lock") = p.done;
        cancel.store(true, Ordering::Relaxed);
    };
    let out = dir.path().join("out.raw");
    let e = engine::restore_with(
        &sink,
        DISK,
        "big",
        &RestoreTarget::RawFile(out.clone()),
        Some(&progress),
        &opts,
    )
    .await
    .expect_err("cancelled");
    assert!(matches!(e, EngineError::Cancelled), "{e:?}");
    let done = *last.lock().expect("lock");
    assert!(done > 0 && done < size, "progress {done} of {size}");
    // A token set before the start stops it at once, with nothing created.
    let out2 = dir.path().join("out2.raw");
    let e = engine::restore_with(
        &sink,
        DISK,
        "big",
        &RestoreTarget::RawFile(out2.clone()),
        None,
        &opts,
    )
    .await
    .expect_err("cancelled");
    assert!(matches!(e, EngineError::Cancelled), "{e:?}");
    assert!(!out2.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_restore_in_progress_stops_at_its_cancel_token_and_stops_its_qemu_nbd() {
    require("qemu-img");
    require("qemu-nbd");
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = sink_in(dir.path());
    big_backup(&sink).await;
    let cancel: CancelToken = Arc::new(AtomicBool::new(false));
    let opts = RestoreOptions {
        cancel: Some(cancel.clone()),
        ..RestoreOptions::default()
    };
    let progress = |_: engine::Progress| cancel.store(true, Ordering::Relaxed);
    let out = dir.path().join("out.qcow2");
    let e = engine::restore_with(
        &sink,
        DISK,
        "big",
        &RestoreTarget::Qcow2(out.clone()),
        Some(&progress),
        &opts,
    )
    .await
    .expect_err("cancelled");
    assert!(matches!(e, EngineError::Cancelled), "{e:?}");
    // Its qemu-nbd is gone (no process serves the image) and the partial image removed.
    assert!(!out.exists(), "partial qcow2 left behind");
    let sock = out.with_extension("restore.sock");
    assert!(!sock.exists(), "socket left behind");
    let ps = run(Command::new("ps").args(["-eo", "args"]));
    assert!(
        !ps.lines().any(|l| l.contains(&*out.to_string_lossy())),
        "qemu-nbd still runs: {ps}"
    );
}

/// A sink that sets a cancel token at its first segment read: a verification is then
/// certainly in progress.
#[derive(Clone)]
struct Tripwire {
    inner: LocalSink,
    cancel: CancelToken,
}

impl Sink for Tripwire {
    type Writer = LocalWriter;

    async fn create(&self, name: &str) -> Result<LocalWriter, SinkError> {
        self.inner.create(name).await
    }
    async fn put(&self, name: &str, data: Vec<u8>) -> Result<(), SinkError> {
        self.inner.put(name, data).await
    }
    async fn put_new(&self, name: &str, data: Vec<u8>) -> Result<(), SinkError> {
        self.inner.put_new(name, data).await
    }
    async fn get_range_into(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        buf: Vec<u8>,
    ) -> Result<Vec<u8>, SinkError> {
        if name.ends_with(".seg") {
            self.cancel.store(true, Ordering::Relaxed);
        }
        self.inner.get_range_into(name, offset, len, buf).await
    }
    async fn get(&self, name: &str, max: u64) -> Result<Vec<u8>, SinkError> {
        self.inner.get(name, max).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, SinkError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, name: &str) -> Result<(), SinkError> {
        self.inner.delete(name).await
    }
    async fn remove_stale_partials(&self, grace: std::time::Duration) -> Result<u64, SinkError> {
        self.inner.remove_stale_partials(grace).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_in_progress_stops_at_its_cancel_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = sink_in(dir.path());
    big_backup(&sink).await;
    // Without a token the whole chain is read and found good.
    let report = engine::verify_chain(&sink, DISK, "big")
        .await
        .expect("verify");
    assert!(report.ok() && report.frames == 48, "{report:?}");
    let cancel: CancelToken = Arc::new(AtomicBool::new(false));
    let trip = Tripwire {
        inner: sink,
        cancel: cancel.clone(),
    };
    let opts = VerifyOptions {
        cancel: Some(cancel),
    };
    let e = engine::verify_chain_with(&trip, DISK, "big", &opts)
        .await
        .expect_err("cancelled");
    assert!(matches!(e, EngineError::Cancelled), "{e:?}");
}
