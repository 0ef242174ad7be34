//! Backups end to end against a real qemu-storage-daemon: the QMP change source, the engine
//! and the local sink. The oracle is `qemu-img compare` against a copy of the disk taken by
//! `qemu-img convert` at each backup's point in time.

mod common;

use std::path::Path;
use std::process::Command;

use common::lab::{assert_sink_holds_only, compare, guest_writes, restore_matches, Lab};
use common::*;
use libcbt::engine::{self, BackupOptions, RestoreTarget};
use libcbt::format::{BackupId, Level, Manifest};
use libcbt::nbd::{Client, ConnectOptions};
use libcbt::sink::local::LocalSink;
use libcbt::sink::Sink;
use libcbt::source::qemu::{self, QemuSource, Requested};
use rand::rngs::SmallRng;

const SIZE: u64 = 128 << 20;
const DISK: &str = "vm1-d0";

fn bid(s: &str) -> BackupId {
    BackupId::parse(s).expect("valid backup id")
}

async fn lab() -> Lab {
    Lab::new(&[("d0", "qcow2")], SIZE).await
}

/// One backup through the source and the engine; `during` writes happen while it copies.
#[allow(clippy::too_many_arguments)]
async fn take_backup<S: Sink>(
    lab: &Lab,
    sink: &S,
    id: &str,
    requested: Requested,
    parent: Option<Manifest>,
    rng: &mut SmallRng,
    during: usize,
    refpath: &Path,
) -> Manifest {
    let node = lab.source.node("d0").await.expect("node");
    let d = qemu::decide(requested, parent.as_ref(), &node);
    // The disk does not change between this copy and the point in time: only the test writes.
    lab.reference(0, refpath);
    let session = lab
        .source
        .begin(&bid(id), &[("d0".into(), d.since.clone())])
        .await
        .expect("begin");
    let sd = session.disks[0].clone();
    let job = sd.job(DISK, &bid(id), &d, parent.as_ref());
    let opts = BackupOptions {
        chunk_size: 256 << 10,
        segment_size: 8 << 20,
        ..Default::default()
    };
    // Progress never runs backwards or past its total, even when chunks are read twice.
    let last = std::sync::Mutex::new(engine::Progress::default());
    let on_progress = |p: engine::Progress| {
        let mut l = last.lock().expect("progress lock");
        assert!(p.done <= p.total, "progress {p:?} past its total");
        *l = p;
    };
    // The guest writes while the maps are read and the data is copied.
    let fleece = qemu::Fleece {
        source: &lab.source,
        disk: &sd,
    };
    let copy = async {
        let scan = engine::scan_export(&sd.uri, sd.dirty_context.as_deref()).await?;
        engine::backup_disk(sink, &job, &scan, &fleece, &opts, Some(&on_progress)).await
    };
    let writes = guest_writes(&lab.live[0], rng, during);
    let (m, ()) = tokio::join!(copy, writes);
    let m = m.expect("backup");
    let l = *last.lock().expect("progress lock");
    assert_eq!(
        l.done, l.total,
        "a finished backup reports all of its bytes done"
    );
    lab.source.end(session, true).await.expect("end");
    m
}

async fn cbt_state(source: &QemuSource) -> (Vec<String>, Vec<String>) {
    let nodes = source.nodes().await.expect("nodes");
    let bitmaps = nodes
        .iter()
        .find(|n| n.node == "d0")
        .expect("d0")
        .bitmaps
        .iter()
        .map(|b| b.name.clone())
        .collect();
    let stray = nodes
        .iter()
        .filter(|n| n.node.starts_with("cbt-"))
        .map(|n| n.node.clone())
        .collect();
    (bitmaps, stray)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_rounds_restore_exactly_and_writes_during_copy_do_not_leak() {
    let lab = lab().await;
    let sink = LocalSink::open(lab.dir.path().join("sink")).expect("sink");
    randomized_rounds(lab, sink).await;
}

/// The same rounds into a bucket on SeaweedFS (reads shaped for an object store: 8 MiB
/// ranges read through gaps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_rounds_on_seaweedfs_restore_exactly() {
    let lab = lab().await;
    let sink = s3::seaweed()
        .await
        .sink(&format!("rounds-{}", std::process::id()))
        .await;
    randomized_rounds(lab, sink).await;
}

/// The same rounds into a Swift container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_rounds_on_swift_restore_exactly() {
    let lab = lab().await;
    let sink = swift::swift()
        .await
        .sink(&format!("rounds-{}", std::process::id()))
        .await;
    randomized_rounds(lab, sink).await;
}

/// Six rounds (fulls and incrementals) with the guest writing during every copy; every
/// backup restored and `qemu-img compare`d with a copy taken at its point in time, verified,
/// and the newest restored through NBD into a qcow2.
async fn randomized_rounds<S: Sink>(lab: Lab, sink: S) {
    let seed = seed("randomized_rounds");
    let mut rng = rng(seed);
    guest_writes(&lab.live[0], &mut rng, 40).await;
    let mut chain: Vec<Manifest> = Vec::new();
    let mut refs = Vec::new();
    for round in 0..6 {
        let requested = if round == 3 {
            Requested::Full
        } else {
            Requested::Auto
        };
        let id = format!("b{round}");
        let refpath = lab.dir.path().join(format!("ref-{round}.raw"));
        let parent = chain.last().cloned();
        let m = take_backup(&lab, &sink, &id, requested, parent, &mut rng, 25, &refpath).await;
        let expect_level = if round == 0 || round == 3 {
            Level::Full
        } else {
            Level::Incremental
        };
        assert_eq!(m.level, expect_level, "round {round} (seed {seed})");
        if m.level == Level::Incremental {
            assert!(
                m.stats.bytes_scanned < SIZE / 2,
                "incremental copied {} bytes",
                m.stats.bytes_scanned
            );
        }
        // Only this backup's bitmap remains; no temporary node is left.
        let (bitmaps, stray) = cbt_state(&lab.source).await;
        assert_eq!(bitmaps, vec![format!("cbt-{id}")], "round {round}");
        assert!(stray.is_empty(), "stray nodes {stray:?}");
        guest_writes(&lab.live[0], &mut rng, 20).await;
        chain.push(m);
        refs.push(refpath);
    }
    // The guest wrote during every copy, so the second pass must have had work somewhere.
    let redone: u64 = chain.iter().map(|m| m.stats.redone_chunks).sum();
    assert!(
        redone > 0,
        "no chunk was re-read: the writes did not overlap the copies"
    );
    // Every backup restores to exactly its point in time.
    for (m, r) in chain.iter().zip(&refs) {
        let out = lab.dir.path().join(format!("restored-{}.raw", m.backup_id));
        let stats = engine::restore(
            &sink,
            DISK,
            &m.backup_id,
            &RestoreTarget::RawFile(out.clone()),
            None,
        )
        .await
        .expect("restore");
        assert_eq!(stats.disk_size, SIZE);
        compare(&out, r);
        let report = engine::verify_chain(&sink, DISK, &m.backup_id)
            .await
            .expect("verify");
        assert!(report.ok(), "{:?}", report.problems);
    }
    // Restore through NBD into a fresh qcow2 exported by qemu-nbd.
    let target = lab.dir.path().join("target.qcow2");
    qcow2_create(&target, SIZE, 65536);
    let tsock = lab.dir.path().join("target.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "qcow2", "--shared=4", "--persistent", "-k"])
        .arg(&tsock)
        .arg(&target);
    let tgt = Daemon::start("qemu-nbd", cmd, &tsock);
    let last = chain.last().expect("chain");
    engine::restore(
        &sink,
        DISK,
        &last.backup_id,
        &RestoreTarget::Nbd(tgt.uri("")),
        None,
    )
    .await
    .expect("restore to nbd");
    drop(tgt);
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&target)
        .arg(refs.last().expect("ref")));
    // The scratch directory holds nothing but the NBD socket.
    let left: Vec<_> = std::fs::read_dir(lab.dir.path().join("work"))
        .expect("work")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("nbd.sock")]);
    drop(lab.daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_backup_leaves_the_chain_intact_and_the_next_stays_incremental() {
    let mut rng = rng(seed("cancelled_backup"));
    let lab = lab().await;
    let sink = LocalSink::open(lab.dir.path().join("sink")).expect("sink");
    guest_writes(&lab.live[0], &mut rng, 30).await;
    let r0 = lab.dir.path().join("ref0.raw");
    let full = take_backup(&lab, &sink, "b0", Requested::Auto, None, &mut rng, 5, &r0).await;
    guest_writes(&lab.live[0], &mut rng, 30).await;

    // Backup b1 starts, copies a little, and is cancelled (its future dropped).
    let node = lab.source.node("d0").await.expect("node");
    let d = qemu::decide(Requested::Auto, Some(&full), &node);
    assert_eq!(d.level, Level::Incremental);
    let session = lab
        .source
        .begin(&bid("b1"), &[("d0".into(), d.since.clone())])
        .await
        .expect("begin");
    let scan = engine::scan_export(
        &session.disks[0].uri,
        session.disks[0].dirty_context.as_deref(),
    )
    .await
    .expect("scan");
    let job = session.disks[0].job(DISK, &bid("b1"), &d, Some(&full));
    let opts = BackupOptions {
        chunk_size: 64 << 10,
        in_flight: 2,
        ..Default::default()
    };
    // Cancel (drop the future) as soon as the first chunk is copied: on progress, not on a clock.
    let started = tokio::sync::Notify::new();
    let on_progress = |p: engine::Progress| {
        if p.done > 0 && p.done < p.total {
            started.notify_one();
        }
    };
    let fleece = qemu::Fleece {
        source: &lab.source,
        disk: &session.disks[0],
    };
    let finished = tokio::select! {
        r = engine::backup_disk(&sink, &job, &scan, &fleece, &opts, Some(&on_progress)) => Some(r),
        () = started.notified() => None,
    };
    assert!(
        finished.is_none(),
        "the backup finished before it could be cancelled; make it bigger"
    );
    // Writes made while b1 was frozen must not be lost to the next incremental.
    guest_writes(&lab.live[0], &mut rng, 10).await;
    lab.source.end(session, false).await.expect("rollback");
    let (bitmaps, stray) = cbt_state(&lab.source).await;
    assert_eq!(
        bitmaps,
        vec!["cbt-b0".to_string()],
        "the parent's bitmap is kept, b1's removed"
    );
    assert!(stray.is_empty(), "stray nodes {stray:?}");
    assert!(
        sink.list("disks/vm1-d0/backups/b1")
            .await
            .expect("list")
            .is_empty(),
        "no manifest or index of b1"
    );

    // The chain still restores; the next backup is incremental from b0 and exact.
    restore_matches(&sink, DISK, "b0", &r0).await;
    let r2 = lab.dir.path().join("ref2.raw");
    let m2 = take_backup(
        &lab,
        &sink,
        "b2",
        Requested::Auto,
        Some(full),
        &mut rng,
        5,
        &r2,
    )
    .await;
    assert_eq!(m2.level, Level::Incremental);
    assert_eq!(m2.parent.as_deref(), Some("b0"));
    restore_matches(&sink, DISK, "b2", &r2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_and_kills_of_qemu_give_incremental_or_full_with_the_right_reason() {
    use libcbt::format::FullReason;
    let mut rng = rng(seed("qemu_restarts"));
    let mut lab = lab().await;
    let sink = LocalSink::open(lab.dir.path().join("sink")).expect("sink");
    guest_writes(&lab.live[0], &mut rng, 20).await;
    let r0 = lab.dir.path().join("ref0.raw");
    let b0 = take_backup(&lab, &sink, "b0", Requested::Auto, None, &mut rng, 0, &r0).await;

    // Clean restart: the bitmap persists and the next backup is incremental.
    lab.restart(true).await;
    guest_writes(&lab.live[0], &mut rng, 20).await;
    let node = lab.source.node("d0").await.expect("node");
    let d = qemu::decide(Requested::Auto, Some(&b0), &node);
    assert_eq!(
        d.level,
        Level::Incremental,
        "bitmap after a clean restart: {:?}",
        node.bitmaps
    );

    // Killed while the bitmap (loaded from the qcow2) was in use: inconsistent.
    lab.restart(false).await;
    let node = lab.source.node("d0").await.expect("node");
    let bm = node.bitmap("cbt-b0").expect("bitmap still listed");
    assert!(bm.inconsistent, "{bm:?}");
    assert_eq!(
        qemu::decide(Requested::Auto, Some(&b0), &node).reason,
        Some(FullReason::BitmapInconsistent)
    );
    lab.source
        .remove_stale_bitmaps("d0", None)
        .await
        .expect("cleanup");
    let r1 = lab.dir.path().join("ref1.raw");
    let b1 = take_backup(
        &lab,
        &sink,
        "b1",
        Requested::Full,
        Some(b0),
        &mut rng,
        5,
        &r1,
    )
    .await;
    assert_eq!(b1.level, Level::Full);

    // Killed before the bitmap created in that session was ever stored: missing.
    guest_writes(&lab.live[0], &mut rng, 20).await;
    lab.restart(false).await;
    let node = lab.source.node("d0").await.expect("node");
    assert!(node.bitmap("cbt-b1").is_none(), "{:?}", node.bitmaps);
    let d = qemu::decide(Requested::Auto, Some(&b1), &node);
    assert_eq!(d.reason, Some(FullReason::BitmapMissing));
    let r2 = lab.dir.path().join("ref2.raw");
    let b2 = take_backup(
        &lab,
        &sink,
        "b2",
        Requested::Auto,
        Some(b1),
        &mut rng,
        5,
        &r2,
    )
    .await;
    assert_eq!(
        (b2.level, b2.full_reason),
        (Level::Full, Some(FullReason::BitmapMissing))
    );
    for (id, r) in [("b0", &r0), ("b1", &r1), ("b2", &r2)] {
        restore_matches(&sink, DISK, id, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_is_named_by_verify_and_fails_restore() {
    let mut rng = rng(seed("corruption"));
    let lab = lab().await;
    let sink = LocalSink::open(lab.dir.path().join("sink")).expect("sink");
    guest_writes(&lab.live[0], &mut rng, 40).await;
    let r0 = lab.dir.path().join("ref0.raw");
    let m = take_backup(&lab, &sink, "b0", Requested::Auto, None, &mut rng, 0, &r0).await;
    let seg = &m.segments[0];
    let path = sink.root().join(seg);
    let mut bytes = std::fs::read(&path).expect("segment");
    let at = bytes.len() - 100;
    bytes[at] ^= 0x55;
    std::fs::write(&path, &bytes).expect("corrupt");
    let report = engine::verify_chain(&sink, DISK, "b0")
        .await
        .expect("verify runs");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let p = &report.problems[0];
    assert_eq!((p.backup.as_str(), p.object.as_str()), ("b0", seg.as_str()));
    assert!(p.pos > 0 && p.pos < at as u64, "position {:#x}", p.pos);
    let out = lab.dir.path().join("out.raw");
    let e = engine::restore(&sink, DISK, "b0", &RestoreTarget::RawFile(out), None)
        .await
        .expect_err("restore must fail");
    assert!(matches!(e, engine::EngineError::Corrupt { .. }), "{e:?}");
    // A truncated index and a missing segment are named too.
    let idx = sink.root().join(&m.index.name);
    let ib = std::fs::read(&idx).expect("index");
    std::fs::write(&idx, &ib[..ib.len() - 5]).expect("truncate");
    let report = engine::verify_chain(&sink, DISK, "b0")
        .await
        .expect("verify runs");
    assert!(
        report.problems[0].object.ends_with(".idx"),
        "{:?}",
        report.problems
    );
    std::fs::write(&idx, &ib).expect("restore index");
    std::fs::remove_file(&path).expect("remove segment");
    let report = engine::verify_chain(&sink, DISK, "b0")
        .await
        .expect("verify runs");
    assert!(
        !report.ok() && report.problems.iter().all(|p| p.object == *seg),
        "{:?}",
        report.problems
    );
}

/// The QEMU 7.2 facts the QMP source relies on, checked against the real thing: after the
/// point in time the guest rewrites part of a cluster and zeroes another range.
/// - Structured reads of the view return the point-in-time bytes (plain reads do not).
/// - `written_since_point_in_time` covers both ranges, so a scan that trusts nothing there is
///   safe from the view's block-status misreports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleecing_view_facts_the_qmp_source_relies_on() {
    let lab = lab().await;
    let (a, z) = (0x100_0000u64, 0x200_0000u64);
    lab.live[0]
        .write(a, vec![0xab; 256 << 10], false)
        .await
        .expect("write");
    lab.live[0]
        .write(z, vec![0xab; 256 << 10], false)
        .await
        .expect("write");
    lab.live[0].flush().await.expect("flush");
    let s = lab
        .source
        .begin(&bid("f0"), &[("d0".into(), None)])
        .await
        .expect("begin");
    lab.live[0]
        .write(a + 4096, vec![0xcd; 8192], false)
        .await
        .expect("write");
    lab.live[0]
        .write_zeroes(z, 200 << 10, true)
        .await
        .expect("zero");
    lab.live[0].flush().await.expect("flush");
    let d = &s.disks[0];
    let view = Client::connect_with(
        &d.uri,
        &ConnectOptions {
            connections: 1,
            ..Default::default()
        },
    )
    .await
    .expect("view");
    for off in [a, z] {
        let data = view.read(off, vec![0; 256 << 10]).await.expect("read");
        assert!(
            data.iter().all(|b| *b == 0xab),
            "structured read at {off:#x} is not the point in time"
        );
    }
    view.disconnect().await;
    let written = lab
        .source
        .written_since_point_in_time(d)
        .await
        .expect("written");
    for r in [a + 4096..a + 12288, z..z + (200 << 10)] {
        assert!(
            written.overlapping(r.clone()).map(|e| e.len()).sum::<u64>() == r.end - r.start,
            "{r:x?} not covered: {written:?}"
        );
    }
    lab.source.end(s, true).await.expect("end");
}

/// The QEMU 7.2 fact the engine's second pass relies on: whatever the guest did to a cluster
/// after the point in time (partial or full data write, zero write, discard), a read of the
/// view that covers exactly that 64 KiB cluster returns the point-in-time bytes. (Reads that
/// span several clusters do not; see `Revalidate`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_cluster_reads_of_the_view_are_right_after_any_guest_write() {
    let lab = lab().await;
    let live = &lab.live[0];
    for (round, write) in ["data4k", "data64k", "zero4k", "zero128k", "trim128k"]
        .into_iter()
        .enumerate()
    {
        let base = 0x200_0000u64 + round as u64 * 0x40_0000;
        live.write(base, vec![0xab; 1 << 20], false)
            .await
            .expect("write");
        live.flush().await.expect("flush");
        let s = lab
            .source
            .begin(&bid(&format!("c{round}")), &[("d0".into(), None)])
            .await
            .expect("begin");
        let w = base + 65536;
        match write {
            "data4k" => live
                .write(w + 4096, vec![0xcd; 4096], false)
                .await
                .expect("write"),
            "data64k" => live
                .write(w, vec![0xcd; 65536], false)
                .await
                .expect("write"),
            "zero4k" => live.write_zeroes(w + 4096, 4096, true).await.expect("zero"),
            "zero128k" => live.write_zeroes(w, 131072, true).await.expect("zero"),
            _ => live.trim(w, 131072).await.expect("trim"),
        }
        live.flush().await.expect("flush");
        for structured in [true, false] {
            let opts = ConnectOptions {
                connections: 1,
                structured_replies: structured,
                ..Default::default()
            };
            let c = Client::connect_with(&s.disks[0].uri, &opts)
                .await
                .expect("view");
            for k in 0..16u64 {
                let d = c
                    .read(base + k * 65536, vec![0; 65536])
                    .await
                    .expect("read");
                assert!(
                    d.iter().all(|b| *b == 0xab),
                    "{write}: cluster {k} (structured {structured})"
                );
            }
            c.disconnect().await;
        }
        lab.source.end(s, true).await.expect("end");
    }
}

/// QEMU killed in the middle of a backup: the backup fails and leaves nothing on the sink;
/// after a restart the parent's bitmap (loaded from the qcow2 by the killed process) is
/// inconsistent, so the next backup is a full with that reason, and it restores exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_during_a_backup_leaves_no_trace_and_the_next_is_full() {
    use libcbt::format::FullReason;
    let mut rng = rng(seed("killed_during"));
    let mut lab = lab().await;
    let sink = LocalSink::open(lab.path("sink")).expect("sink");
    guest_writes(&lab.live[0], &mut rng, 30).await;
    let r0 = lab.path("ref0.raw");
    let b0 = take_backup(&lab, &sink, "b0", Requested::Auto, None, &mut rng, 0, &r0).await;
    lab.restart(true).await;
    // Lots of dirty data so that the copy is surely running when QEMU dies.
    guest_writes(&lab.live[0], &mut rng, 200).await;
    let node = lab.source.node("d0").await.expect("node");
    let d = qemu::decide(Requested::Auto, Some(&b0), &node);
    assert_eq!(d.level, Level::Incremental);
    let session = lab
        .source
        .begin(&bid("b1"), &[("d0".into(), d.since.clone())])
        .await
        .expect("begin");
    let sd = session.disks[0].clone();
    let scan = engine::scan_export(&sd.uri, sd.dirty_context.as_deref())
        .await
        .expect("scan");
    let job = sd.job(DISK, &bid("b1"), &d, Some(&b0));
    let opts = BackupOptions {
        chunk_size: 64 << 10,
        in_flight: 2,
        ..Default::default()
    };
    let fleece = qemu::Fleece {
        source: &lab.source,
        disk: &sd,
    };
    // Kill QEMU once the copy has made progress: on progress, not on a clock.
    let killed = std::sync::Once::new();
    let on_progress = |p: engine::Progress| {
        if p.done > 0 && p.done < p.total {
            killed.call_once(|| lab.daemon.kill_by_ref());
        }
    };
    let r = engine::backup_disk(&sink, &job, &scan, &fleece, &opts, Some(&on_progress)).await;
    assert!(r.is_err(), "the copy must fail when QEMU dies");
    drop(session);
    assert_sink_holds_only(&sink, &[&b0]).await;
    lab.restart(false).await;
    let node = lab.source.node("d0").await.expect("node");
    let d = qemu::decide(Requested::Auto, Some(&b0), &node);
    assert_eq!(
        d.reason,
        Some(FullReason::BitmapInconsistent),
        "{:?}",
        node.bitmaps
    );
    lab.source
        .remove_stale_bitmaps("d0", None)
        .await
        .expect("cleanup");
    let r2 = lab.path("ref2.raw");
    let b2 = take_backup(
        &lab,
        &sink,
        "b2",
        Requested::Full,
        Some(b0),
        &mut rng,
        5,
        &r2,
    )
    .await;
    assert_eq!(b2.level, Level::Full);
    restore_matches(&sink, DISK, "b2", &r2).await;
}
