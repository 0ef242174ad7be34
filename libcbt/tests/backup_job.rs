//! Whole backup jobs (libcbt::job) against qemu-storage-daemon: several disks of two formats
//! at one point in time, restarts, and a sink that fills up.

mod common;

use std::process::Command;

use common::lab::{assert_sink_holds_only, guest_writes, restore_matches, Lab};
use common::*;
use libcbt::engine::{catalog, BackupOptions};
use libcbt::format::{FullReason, Level};
use libcbt::job::{self, DiskSpec, JobError};
use libcbt::sink::local::{Backend, LocalSink};
use libcbt::sink::{Sink, SinkError};
use libcbt::source::qemu::Requested;

const SIZE: u64 = 64 << 20;

fn specs(lab: &Lab) -> Vec<DiskSpec> {
    lab.specs("vm-")
}

/// Takes references of every disk, runs a job, and checks the bitmaps left behind.
async fn job_round<S: Sink>(
    lab: &Lab,
    sink: &S,
    id: &str,
    requested: Requested,
) -> Result<Vec<(String, std::path::PathBuf)>, JobError> {
    let mut refs = Vec::new();
    for (i, d) in lab.disks.iter().enumerate() {
        let r = lab.path(&format!("ref-{id}-{}.raw", d.node));
        lab.reference(i, &r);
        refs.push((format!("vm-{}", d.node), r));
    }
    let opts = BackupOptions {
        chunk_size: 256 << 10,
        segment_size: 4 << 20,
        ..Default::default()
    };
    job::backup_qemu(
        &lab.source,
        sink,
        &id.parse().expect("valid backup id"),
        &specs(lab),
        requested,
        &opts,
    )
    .await?;
    Ok(refs)
}

async fn bitmaps(lab: &Lab) -> Vec<Vec<String>> {
    let nodes = lab.source.nodes().await.expect("nodes");
    assert!(
        nodes.iter().all(|n| !n.node.starts_with("cbt-")),
        "stray nodes"
    );
    lab.disks
        .iter()
        .map(|d| {
            nodes
                .iter()
                .find(|n| n.node == d.node)
                .expect("node")
                .bitmaps
                .iter()
                .map(|b| b.name.clone())
                .collect()
        })
        .collect()
}

async fn restore_and_compare<S: Sink>(sink: &S, id: &str, refs: &[(String, std::path::PathBuf)]) {
    for (disk, r) in refs {
        restore_matches(sink, disk, id, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_disks_of_two_formats_are_frozen_together_and_restore_exactly() {
    let mut rng = rng(seed("two_disks"));
    let mut lab = Lab::new(&[("d0", "qcow2"), ("d1", "raw")], SIZE).await;
    let sink = LocalSink::open(lab.path("sink")).expect("sink");
    let mut all = Vec::new();
    for round in 0..4 {
        for l in &lab.live {
            guest_writes(l, &mut rng, 15).await;
        }
        let id = format!("b{round}");
        let refs = job_round(&lab, &sink, &id, Requested::Auto)
            .await
            .expect("job");
        for (disk, _) in &refs {
            let m = catalog::latest(&sink, disk)
                .await
                .expect("catalog")
                .expect("a backup");
            assert_eq!(m.backup_id, id);
            assert_eq!(
                m.level,
                if round == 0 {
                    Level::Full
                } else {
                    Level::Incremental
                },
                "{disk} round {round}"
            );
        }
        assert_eq!(bitmaps(&lab).await, vec![vec![format!("cbt-{id}")]; 2]);
        all.push((id, refs));
    }
    for (id, refs) in &all {
        restore_and_compare(&sink, id, refs).await;
    }
    // After a kill, the qcow2 bitmap created in that session is gone, and the raw disk's
    // bitmap never survives a restart: both disks get a full, with the reason recorded.
    lab.restart(false).await;
    for l in &lab.live {
        guest_writes(l, &mut rng, 5).await;
    }
    let refs = job_round(&lab, &sink, "b9", Requested::Auto)
        .await
        .expect("job after kill");
    for (disk, _) in &refs {
        let m = catalog::latest(&sink, disk)
            .await
            .expect("catalog")
            .expect("a backup");
        assert_eq!(
            (m.level, m.full_reason),
            (Level::Full, Some(FullReason::BitmapMissing)),
            "{disk}"
        );
    }
    restore_and_compare(&sink, "b9", &refs).await;
    // Incremental requested where impossible is refused, not silently turned into a full.
    lab.restart(false).await;
    let e = job_round(&lab, &sink, "b10", Requested::Incremental)
        .await
        .expect_err("must be refused");
    assert!(matches!(e, JobError::Source(_)), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_to_seaweedfs_restore_exactly_and_leave_only_committed_objects() {
    rounds_to_s3(s3::seaweed().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_to_ceph_rgw_restore_exactly_and_leave_only_committed_objects() {
    rounds_to_s3(s3::ceph().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_to_swift_restore_exactly_and_leave_only_committed_objects() {
    let sw = swift::swift().await;
    let prefix = format!("job-{}", std::process::id());
    let sink = sw.sink(&prefix).await;
    rounds_to(sink.clone()).await;
    // Every upload finished: no marker left, and every SLO segment is a live object's.
    let keys = sink
        .list_all_keys(&format!("{prefix}/.cbt-"))
        .await
        .expect("keys");
    assert!(
        !keys.iter().any(|k| k.contains("/.cbt-uploads/")),
        "upload markers left: {keys:?}"
    );
}

/// The same job rounds to S3 (a real server): fulls and incrementals of two disks at one
/// point in time, with guest writes between rounds, every backup restored from the bucket and
/// `qemu-img compare`d with its reference; the bucket then holds exactly the committed
/// backups (no marker, no stray segment).
async fn rounds_to_s3(server: &s3::S3Server) {
    rounds_to(server.sink(&format!("job-{}", std::process::id())).await).await;
}

/// The rounds of [`rounds_to_s3`] on any remote sink.
async fn rounds_to<S: Sink>(sink: S) {
    let mut rng = rng(seed("s3_rounds"));
    let lab = Lab::new(&[("d0", "qcow2"), ("d1", "raw")], SIZE).await;
    let mut all = Vec::new();
    for round in 0..3 {
        for l in &lab.live {
            guest_writes(l, &mut rng, 15).await;
        }
        let id = format!("s{round}");
        let refs = job_round(&lab, &sink, &id, Requested::Auto)
            .await
            .expect("job");
        for (disk, _) in &refs {
            let m = catalog::latest(&sink, disk)
                .await
                .expect("catalog")
                .expect("a backup");
            let want = if round == 0 {
                Level::Full
            } else {
                Level::Incremental
            };
            assert_eq!(
                (m.backup_id.as_str(), m.level),
                (id.as_str(), want),
                "{disk}"
            );
        }
        all.push((id, refs));
    }
    let mut manifests = Vec::new();
    for (id, refs) in &all {
        restore_and_compare(&sink, id, refs).await;
        for (disk, _) in refs {
            manifests.push(
                catalog::list_backups(&sink, disk)
                    .await
                    .expect("catalog")
                    .into_iter()
                    .find(|m| &m.backup_id == id)
                    .expect("manifest"),
            );
        }
    }
    let refs: Vec<&libcbt::format::Manifest> = manifests.iter().collect();
    assert_sink_holds_only(&sink, &refs).await;
    // A byte flipped in a segment in the bucket: verify names the backup, the object and a
    // position inside it; the restore refuses rather than write bad data.
    let m = &manifests[0];
    let seg = &m.segments[0];
    let mut bytes = sink.get(seg, 1 << 30).await.expect("segment");
    let at = bytes.len() - 100;
    bytes[at] ^= 0x55;
    sink.put(seg, bytes).await.expect("corrupt");
    let report = libcbt::engine::verify_chain(&sink, &m.disk, &m.backup_id)
        .await
        .expect("verify runs");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let p = &report.problems[0];
    assert_eq!(
        (p.backup.as_str(), p.object.as_str()),
        (m.backup_id.as_str(), seg.as_str())
    );
    assert!(p.pos > 0 && p.pos < at as u64, "position {:#x}", p.pos);
    let out = lab.path("corrupt.raw");
    let e = libcbt::engine::restore(
        &sink,
        &m.disk,
        &m.backup_id,
        &libcbt::engine::RestoreTarget::RawFile(out),
        None,
    )
    .await
    .expect_err("a restore of corrupt data");
    assert!(
        matches!(e, libcbt::engine::EngineError::Corrupt { .. }),
        "{e:?}"
    );
}

/// A backup id is never reused: not the newest one's, not an older one's, not one a job is
/// writing (its in-progress marker). Refused before anything is touched, the older backups
/// intact byte for byte and their chain still restoring exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_backup_id_is_refused_and_the_older_backup_is_untouched() {
    use libcbt::engine::EngineError;
    use libcbt::sink::Sink;
    let mut rng = rng(seed("reused_id"));
    let lab = Lab::new(&[("d0", "qcow2")], SIZE).await;
    let sink = LocalSink::open(lab.path("sink")).expect("sink");
    guest_writes(&lab.live[0], &mut rng, 10).await;
    let refs0 = job_round(&lab, &sink, "b0", Requested::Auto)
        .await
        .expect("b0");
    guest_writes(&lab.live[0], &mut rng, 10).await;
    let refs1 = job_round(&lab, &sink, "b1", Requested::Auto)
        .await
        .expect("b1");
    let snapshot = |sink: LocalSink| async move {
        let mut v = Vec::new();
        for o in sink.list("disks/").await.expect("list") {
            v.push((
                o.name.clone(),
                sink.get(&o.name, 1 << 30).await.expect("get"),
            ));
        }
        v
    };
    let before = snapshot(sink.clone()).await;
    let taken = |e: &JobError| {
        matches!(
            e,
            JobError::Engine {
                source: EngineError::BackupExists { .. },
                ..
            }
        )
    };
    // Without job_round: its references of b0 and b1 must stay those of their time.
    let attempt = |id: &'static str| {
        let (lab, sink) = (&lab, &sink);
        async move {
            job::backup_qemu(
                &lab.source,
                sink,
                &id.parse().expect("valid backup id"),
                &specs(lab),
                Requested::Auto,
                &BackupOptions::default(),
            )
            .await
            .map(|_| ())
        }
    };
    guest_writes(&lab.live[0], &mut rng, 10).await;
    for id in ["b0", "b1"] {
        let e = attempt(id).await.expect_err("a taken id");
        assert!(taken(&e), "{id}: {e:?}");
        let msg = std::error::Error::source(&e).map(ToString::to_string);
        assert!(
            msg.as_deref()
                .is_some_and(|m| m.contains(&format!("backup {id} of vm-d0 exists already"))),
            "{msg:?}"
        );
    }
    // Another job is writing b2 (its marker is on the sink): refused too, marker untouched.
    let marker = libcbt::format::layout::marker_name("vm-d0", "b2");
    sink.put_new(&marker, b"{\"someone\":\"else\"}".to_vec())
        .await
        .expect("marker");
    let e = attempt("b2").await.expect_err("an id in use");
    assert!(taken(&e), "{e:?}");
    assert_eq!(
        sink.get(&marker, 100).await.expect("marker kept"),
        b"{\"someone\":\"else\"}"
    );
    sink.delete(&marker).await.expect("delete");
    assert_eq!(
        snapshot(sink.clone()).await,
        before,
        "a refused job changed the sink"
    );
    assert_eq!(bitmaps(&lab).await, vec![vec!["cbt-b1".to_string()]]);
    restore_and_compare(&sink, "b0", &refs0).await;
    restore_and_compare(&sink, "b1", &refs1).await;
    // A fresh id goes on from b1.
    let refs2 = job_round(&lab, &sink, "b2", Requested::Auto)
        .await
        .expect("b2");
    let b2 = catalog::latest(&sink, "vm-d0")
        .await
        .expect("catalog")
        .expect("b2");
    assert_eq!(
        (b2.level, b2.parent.as_deref()),
        (Level::Incremental, Some("b1"))
    );
    restore_and_compare(&sink, "b2", &refs2).await;
    let all = catalog::list_backups(&sink, "vm-d0").await.expect("list");
    assert_sink_holds_only(&sink, &all.iter().collect::<Vec<_>>()).await;
}

/// Unmounts on drop so that a failing test does not leave a mount behind.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mkdir");
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path));
        Tmpfs(path.to_path_buf())
    }
    fn grow(&self, size: &str) {
        run(Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A backup that runs longer than the garbage collector's grace period keeps its objects: it
/// renews its in-progress marker, so a collector running all along (here with a grace period
/// of 100 ms, against a backup made to take several times that) takes it for a live writer.
/// Without the renewal the collector deletes the marker and then the backup's segments, and
/// the restore below fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_longer_than_the_gc_grace_period_keeps_its_segments() {
    use rand::Rng;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let mut rng = rng(seed("long_backup"));
    let size = 2 * SIZE;
    let lab = Lab::new(&[("d0", "qcow2")], size).await;
    // Every byte written with incompressible data: the backup reads and writes all of it.
    for off in (0..size).step_by(1 << 20) {
        let mut data = vec![0u8; 1 << 20];
        rng.fill(&mut data[..]);
        lab.live[0].write(off, data, false).await.expect("write");
    }
    lab.live[0].flush().await.expect("flush");
    let sink = LocalSink::open(lab.path("sink")).expect("sink");
    let reference = lab.path("ref-long.raw");
    lab.reference(0, &reference);
    let grace = Duration::from_millis(100);
    let done = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicUsize::new(0));
    let collector = {
        let (sink, done, passes) = (sink.clone(), done.clone(), passes.clone());
        tokio::spawn(async move {
            let mut deleted = Vec::new();
            while !done.load(Ordering::SeqCst) {
                deleted.extend(
                    catalog::collect_garbage(&sink, "vm-d0", grace)
                        .await
                        .expect("gc"),
                );
                passes.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            deleted
        })
    };
    // Small frames, one connection and one chunk in flight: slow enough to outlast `grace`.
    let opts = BackupOptions {
        chunk_size: 64 << 10,
        segment_size: 1 << 20,
        connections: 1,
        in_flight: 1,
        marker_refresh: Duration::from_millis(15),
        ..Default::default()
    };
    let t = Instant::now();
    job::backup_qemu(
        &lab.source,
        &sink,
        &"long".parse().expect("valid backup id"),
        &specs(&lab),
        Requested::Full,
        &opts,
    )
    .await
    .expect("backup");
    let took = t.elapsed();
    done.store(true, Ordering::SeqCst);
    let deleted = collector.await.expect("collector");
    assert!(
        took > 2 * grace,
        "the backup took {took:?}, not long enough to outlast a grace period of {grace:?}"
    );
    assert!(
        passes.load(Ordering::SeqCst) > 10,
        "the collector hardly ran"
    );
    assert!(
        deleted.is_empty(),
        "collected during the backup: {deleted:?}"
    );
    restore_matches(&sink, "vm-d0", "long", &reference).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_fills_up_fails_the_job_and_loses_nothing_io_uring() {
    sink_fills_up(Backend::Uring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_fills_up_fails_the_job_and_loses_nothing_std() {
    sink_fills_up(Backend::Std).await;
}

async fn sink_fills_up(backend: Backend) {
    let mut rng = rng(seed("sink_full"));
    let lab = Lab::new(&[("d0", "qcow2")], SIZE).await;
    let mnt = lab.path("sink");
    let tmpfs = Tmpfs::mount(&mnt, "6m");
    let sink = LocalSink::open_with(&mnt, Some(backend)).expect("sink");
    guest_writes(&lab.live[0], &mut rng, 3).await;
    let refs0 = job_round(&lab, &sink, "b0", Requested::Auto)
        .await
        .expect("small full fits");
    let b0 = catalog::latest(&sink, "vm-d0")
        .await
        .expect("catalog")
        .expect("b0");
    // Far more random data than the sink can hold.
    for _ in 0..24 {
        let mut data = vec![0u8; 1 << 20];
        rand::Rng::fill(&mut rng, &mut data[..]);
        let off = rand::Rng::gen_range(&mut rng, 0..SIZE / (1 << 20)) << 20;
        lab.live[0].write(off, data, false).await.expect("write");
    }
    let e = job_round(&lab, &sink, "b1", Requested::Auto)
        .await
        .expect_err("the sink is full");
    let mut cause: Option<&dyn std::error::Error> = Some(&e);
    let mut no_space = false;
    while let Some(c) = cause {
        no_space |= matches!(
            c.downcast_ref::<SinkError>(),
            Some(SinkError::NoSpace { .. })
        );
        cause = c.source();
    }
    assert!(no_space, "expected NoSpace in {e:?}");
    // Nothing of b1 is left; b0 is intact and still the parent; the bitmaps rolled back.
    assert_sink_holds_only(&sink, &[&b0]).await;
    assert!(
        std::fs::read_dir(mnt.join("disks/vm-d0/segments"))
            .expect("dir")
            .all(|e| !e
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .starts_with('.')),
        "temp files left"
    );
    assert_eq!(bitmaps(&lab).await, vec![vec!["cbt-b0".to_string()]]);
    restore_and_compare(&sink, "b0", &refs0).await;
    // With room again, the next backup is an incremental from b0 and restores exactly.
    tmpfs.grow("200m");
    let refs2 = job_round(&lab, &sink, "b2", Requested::Auto)
        .await
        .expect("backup after space is freed");
    let b2 = catalog::latest(&sink, "vm-d0")
        .await
        .expect("catalog")
        .expect("b2");
    assert_eq!(
        (b2.level, b2.parent.as_deref()),
        (Level::Incremental, Some("b0"))
    );
    restore_and_compare(&sink, "b2", &refs2).await;
}

/// Prune by folding, on a qcow2 disk (full + incrementals) and a raw one (fulls only):
/// deleting a full under three incrementals makes the first a synthetic full; then a
/// keep-last-2 policy folds that one into the next and drops an older chain whole. After
/// each step every backup that stays restores exactly (`qemu-img compare` with a reference
/// taken at its point in time), verify is clean, the sink holds exactly what the manifests
/// name, no segment byte was written, and a second run finds nothing to do. On a directory
/// and on SeaweedFS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_folds_what_goes_into_what_stays() {
    let lab = Lab::new(&[("d0", "qcow2"), ("d1", "raw")], SIZE).await;
    let sink = LocalSink::open(lab.path("sink")).expect("sink");
    prune_rounds(&lab, &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_folds_what_goes_into_what_stays_on_seaweedfs() {
    let lab = Lab::new(&[("d0", "qcow2"), ("d1", "raw")], SIZE).await;
    let sink = s3::seaweed()
        .await
        .sink(&format!("prune-{}", std::process::id()))
        .await;
    prune_rounds(&lab, &sink).await;
}

type Refs = std::collections::BTreeMap<String, Vec<(String, std::path::PathBuf)>>;

/// Backups p0 ← p1, then p2 (a full) ← p3 ← p4 ← p5, with random guest writes between.
async fn prune_history<S: Sink>(lab: &Lab, sink: &S) -> Refs {
    let mut rng = rng(seed("prune"));
    let mut refs = Refs::new();
    for (id, req) in [
        ("p0", Requested::Auto),
        ("p1", Requested::Auto),
        ("p2", Requested::Full),
        ("p3", Requested::Auto),
        ("p4", Requested::Auto),
        ("p5", Requested::Auto),
    ] {
        for l in &lab.live {
            guest_writes(l, &mut rng, 15).await;
        }
        refs.insert(id.into(), job_round(lab, sink, id, req).await.expect("job"));
    }
    refs
}

/// Every backup of the disks restores exactly and verifies clean; the sink holds exactly
/// their objects. Returns the ids left, oldest first.
async fn all_restore<S: Sink>(sink: &S, disks: &[String], refs: &Refs) -> Vec<String> {
    let mut manifests = Vec::new();
    for d in disks {
        manifests.extend(catalog::list_backups(sink, d).await.expect("list"));
    }
    for m in &manifests {
        restore_matches(
            sink,
            &m.disk,
            &m.backup_id,
            &refs[&m.backup_id]
                .iter()
                .find(|r| r.0 == m.disk)
                .expect("reference")
                .1,
        )
        .await;
        let v = libcbt::engine::verify_chain(sink, &m.disk, &m.backup_id)
            .await
            .expect("verify");
        assert!(v.ok(), "{v:?}");
    }
    assert_sink_holds_only(sink, &manifests.iter().collect::<Vec<_>>()).await;
    let mut ids: Vec<String> = manifests.iter().map(|m| m.backup_id.clone()).collect();
    ids.sort();
    ids.dedup();
    ids
}

async fn prune_rounds<S: Sink>(lab: &Lab, sink: &S) {
    use libcbt::engine::{plan_delete, plan_prune, prune, Hold};
    use libcbt::retention::{KeepPolicy, Rule};
    let refs = prune_history(lab, sink).await;
    let disks: Vec<String> = specs(lab).into_iter().map(|s| s.disk).collect();
    let segments_before = segment_names(sink).await;

    // Delete the full p2: p3 takes it in on both disks (the raw one is tracked by a bitmap
    // in QEMU's memory while the daemon runs).
    let plan = plan_delete(sink, &disks, "p2")
        .await
        .expect("plan")
        .expect("p2 exists");
    let e = plan.iter().find(|e| e.id == "p2").expect("p2");
    assert_eq!(
        (e.hold.clone(), e.folds_into.clone()),
        (None, vec!["p3".to_string()])
    );
    let r = prune(sink, &plan, None).await.expect("delete p2");
    assert_eq!((r.deleted.clone(), r.folds), (vec!["p2".to_string()], 2));
    assert!(r.index_bytes_written > 0 && r.index_bytes_read > 0, "{r:?}");
    let p3 = catalog::read_manifest(sink, "vm-d0", "p3")
        .await
        .expect("read")
        .expect("p3");
    assert_eq!(
        (
            p3.level,
            p3.full_reason,
            p3.parent.as_deref(),
            p3.generation,
            p3.folded.clone()
        ),
        (
            Level::Full,
            Some(FullReason::Folded),
            None,
            1,
            vec!["p2".to_string()]
        )
    );
    assert_eq!(
        all_restore(sink, &disks, &refs).await,
        ["p0", "p1", "p3", "p4", "p5"]
    );

    // Keep the last two: p3 (now a full) folds into p4; p0 ← p1 goes whole.
    let policy = KeepPolicy {
        keep_last: 2,
        ..KeepPolicy::default()
    };
    let plan = plan_prune(sink, &disks, &policy).await.expect("plan");
    let holds: Vec<(&str, Option<Hold>)> = plan
        .iter()
        .map(|e| (e.id.as_str(), e.hold.clone()))
        .collect();
    assert_eq!(
        holds,
        [
            ("p5", Some(Hold::Kept(Rule::Last))),
            ("p4", Some(Hold::Kept(Rule::Last))),
            ("p3", None),
            ("p1", None),
            ("p0", None),
        ]
    );
    // The plan alone changes nothing.
    assert_eq!(all_restore(sink, &disks, &refs).await.len(), 5);
    let before = sink.list("disks/").await.expect("list").len();
    let report = prune(sink, &plan, None).await.expect("prune");
    assert_eq!(report.deleted, ["p3", "p1", "p0"]);
    assert_eq!(report.folds, 2);
    let p4 = catalog::read_manifest(sink, "vm-d0", "p4")
        .await
        .expect("read")
        .expect("p4");
    assert_eq!(
        (p4.level, p4.folded.clone()),
        (Level::Full, vec!["p2".to_string(), "p3".to_string()])
    );
    assert_eq!(all_restore(sink, &disks, &refs).await, ["p4", "p5"]);
    // Folds wrote no segment: the segments left are a subset of those before.
    let after_segments = segment_names(sink).await;
    assert!(after_segments.is_subset(&segments_before));
    let after = sink.list("disks/").await.expect("list").len();
    // Each fold wrote an index and a manifest and deleted the old generation's two.
    assert_eq!(before - after, report.objects, "objects the report counts");
    let again = plan_prune(sink, &disks, &policy).await.expect("plan");
    assert!(again.iter().all(|e| e.hold.is_some()), "{again:?}");
    assert!(prune(sink, &again, None)
        .await
        .expect("prune")
        .deleted
        .is_empty());
}

/// `max_chain = 3`: the backup that would be the fourth of its chain becomes a synthetic full
/// (no data written, its chain left as it was), the next ones chain from it, every backup
/// restores as before, and the old chain can then go without a fold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_chains_become_synthetic_fulls() {
    use libcbt::engine::{ancestors, bound_chain, plan_prune, prune};
    use libcbt::retention::KeepPolicy;
    let lab = Lab::new(&[("d0", "qcow2"), ("d1", "raw")], SIZE).await;
    let sink = LocalSink::open(lab.path("sink")).expect("sink");
    let disks: Vec<String> = specs(&lab).into_iter().map(|s| s.disk).collect();
    let mut rng = rng(seed("bounded"));
    let mut refs = Refs::new();
    let mut bounded = Vec::new();
    for id in ["b0", "b1", "b2", "b3", "b4", "b5", "b6"] {
        for l in &lab.live {
            guest_writes(l, &mut rng, 15).await;
        }
        refs.insert(
            id.into(),
            job_round(&lab, &sink, id, Requested::Auto)
                .await
                .expect("job"),
        );
        let segments = segment_names(&sink).await;
        for d in &disks {
            if let Some(b) = bound_chain(&sink, d, id, 3).await.expect("bound") {
                assert_eq!((b.backup.as_str(), b.depth), (id, 3), "{b:?}");
                bounded.push((d.clone(), id));
            }
            let ms = catalog::list_backups(&sink, d).await.expect("list");
            let chain = ancestors(&ms, id).expect("chain");
            assert!(chain.len() < 3, "{id} of {d} merges {chain:?}");
        }
        // No data written: the segments are the ones the backup wrote.
        assert_eq!(segment_names(&sink).await, segments);
    }
    // b3 and b6 are the fourth of their chains, on both disks.
    assert_eq!(
        bounded,
        [
            ("vm-d0".to_string(), "b3"),
            ("vm-d1".to_string(), "b3"),
            ("vm-d0".to_string(), "b6"),
            ("vm-d1".to_string(), "b6"),
        ]
    );
    let b3 = catalog::read_manifest(&sink, "vm-d1", "b3")
        .await
        .expect("read")
        .expect("b3");
    assert_eq!(
        (b3.level, b3.full_reason, b3.parent, b3.generation),
        (Level::Full, Some(FullReason::ChainBounded), None, 1)
    );
    assert!(b3.folded.is_empty(), "its chain stays: {:?}", b3.folded);
    let b4 = catalog::read_manifest(&sink, "vm-d1", "b4")
        .await
        .expect("read")
        .expect("b4");
    assert_eq!(b4.parent.as_deref(), Some("b3"));
    assert_eq!(all_restore(&sink, &disks, &refs).await.len(), 7);

    // Bounding again does nothing.
    assert_eq!(
        bound_chain(&sink, "vm-d0", "b6", 3).await.expect("again"),
        None
    );
    // The chain b0..b2 goes whole: nothing left depends on it.
    let policy = KeepPolicy {
        keep_last: 4,
        ..KeepPolicy::default()
    };
    let plan = plan_prune(&sink, &disks, &policy).await.expect("plan");
    let r = prune(&sink, &plan, None).await.expect("prune");
    assert_eq!((r.deleted.len(), r.folds), (3, 0), "{r:?}");
    assert_eq!(
        all_restore(&sink, &disks, &refs).await,
        ["b3", "b4", "b5", "b6"]
    );
}

async fn segment_names<S: Sink>(sink: &S) -> std::collections::BTreeSet<String> {
    sink.list("disks/")
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.name)
        .filter(|n| n.ends_with(".seg"))
        .collect()
}

/// A sink that dies at its `n`-th change: every change after that fails, as after a
/// `kill -9` of the process at that step. A change is a put, or the deletion of one object
/// (a batch deletion may stop part way, as an object store's can).
///
/// With [`Dying::meddling`] it never dies; instead another writer commits a new generation of
/// a backup (the same backup, one generation higher) just before the first segment is
/// created: the race of a fold with a compaction.
#[derive(Clone)]
struct Dying {
    inner: LocalSink,
    left: std::sync::Arc<std::sync::atomic::AtomicI64>,
    meddle: Option<(&'static str, &'static str)>,
    meddled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Dying {
    fn new(inner: LocalSink, n: i64) -> Dying {
        Dying {
            inner,
            left: std::sync::Arc::new(std::sync::atomic::AtomicI64::new(n)),
            meddle: None,
            meddled: Default::default(),
        }
    }

    fn meddling(inner: LocalSink, disk: &'static str, backup: &'static str) -> Dying {
        Dying {
            meddle: Some((disk, backup)),
            ..Dying::new(inner, i64::MAX)
        }
    }

    fn step(&self, name: &str) -> Result<(), SinkError> {
        if self.left.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            Ok(())
        } else {
            Err(SinkError::Io {
                op: "dying at",
                name: name.into(),
                source: std::io::Error::other("killed"),
            })
        }
    }
}

impl Sink for Dying {
    type Writer = libcbt::sink::local::LocalWriter;

    async fn create(&self, name: &str) -> Result<Self::Writer, SinkError> {
        self.step(name)?;
        if let Some((disk, backup)) = self.meddle {
            if name.ends_with(".seg")
                && !self.meddled.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                let mut m = catalog::read_manifest(&self.inner, disk, backup)
                    .await
                    .expect("read")
                    .expect("the backup");
                m.generation += 1;
                let name = libcbt::format::layout::manifest_name_gen(disk, backup, m.generation);
                self.inner.put_new(&name, m.encode()).await?;
            }
        }
        self.inner.create(name).await
    }
    async fn put(&self, name: &str, data: Vec<u8>) -> Result<(), SinkError> {
        self.step(name)?;
        self.inner.put(name, data).await
    }
    async fn put_new(&self, name: &str, data: Vec<u8>) -> Result<(), SinkError> {
        self.step(name)?;
        self.inner.put_new(name, data).await
    }
    async fn get_range_into(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        buf: Vec<u8>,
    ) -> Result<Vec<u8>, SinkError> {
        self.inner.get_range_into(name, offset, len, buf).await
    }
    async fn get(&self, name: &str, max: u64) -> Result<Vec<u8>, SinkError> {
        self.inner.get(name, max).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<libcbt::sink::ObjectInfo>, SinkError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, name: &str) -> Result<(), SinkError> {
        self.step(name)?;
        self.inner.delete(name).await
    }
    async fn delete_many(&self, names: &[String]) -> Result<(), SinkError> {
        for n in names {
            self.delete(n).await?;
        }
        Ok(())
    }
    async fn remove_stale_partials(&self, grace: std::time::Duration) -> Result<u64, SinkError> {
        self.inner.remove_stale_partials(grace).await
    }
}

/// A disk range and where a restore takes it from: a frame (segment, position, disk offset
/// of its first raw byte), or zeroes.
type Run = (u64, u64, Option<(u128, u64, u64)>);

/// What restoring backup `id` of `disk` reads, by disk range: the frame (segment, position,
/// disk offset of its first raw byte) or zeroes. Metadata only.
async fn image_map<S: Sink>(
    sink: &S,
    disk: &str,
    id: &str,
) -> Vec<(u64, u64, Option<(u128, u64, u64)>)> {
    let chain = libcbt::engine::load_chain(sink, disk, id)
        .await
        .unwrap_or_else(|e| panic!("chain of {disk} {id}: {}", chain(&e)));
    let idx: Vec<&libcbt::format::Index> = chain.iter().map(|(_, i)| i).collect();
    let plan = libcbt::format::plan_restore(&idx).expect("plan");
    let mut out: Vec<Run> = plan
        .zeros
        .iter()
        .map(|z| (z.start, z.end, None))
        .chain(plan.frames.iter().flat_map(|f| {
            f.pieces
                .iter()
                .map(move |p| (p.start, p.end, Some((f.segment, f.pos, f.offset))))
        }))
        .collect();
    out.sort_unstable();
    // One run per source, however the entries cut it.
    let mut merged: Vec<Run> = Vec::with_capacity(out.len());
    for r in out {
        match merged.last_mut() {
            Some(l) if l.1 == r.0 && l.2 == r.2 => l.1 = r.1,
            _ => merged.push(r),
        }
    }
    merged
}

/// `kill -9` of a prune at every step (the sink dies at its n-th change, for every n until
/// the prune gets through): afterwards every backup left reads exactly what it read before
/// (the same bytes of the same frames, every frame there and sound), those the policy keeps
/// are all there, and the same prune run again (and garbage collection, for what a backup
/// whose manifest had gone left) finishes the work and leaves exactly what the manifests name. Then the kept backups restore exactly (`qemu-img compare`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_killed_at_any_step_loses_nothing_and_finishes_when_run_again() {
    use libcbt::engine::{plan_prune, prune};
    use libcbt::retention::KeepPolicy;
    let lab = Lab::new(&[("d0", "qcow2"), ("d1", "raw")], SIZE).await;
    let pristine = lab.path("pristine");
    let refs = prune_history(&lab, &LocalSink::open(&pristine).expect("sink")).await;
    let disks: Vec<String> = specs(&lab).into_iter().map(|s| s.disk).collect();
    let pristine_sink = LocalSink::open(&pristine).expect("sink");
    let mut before = std::collections::BTreeMap::new();
    for d in &disks {
        for m in catalog::list_backups(&pristine_sink, d)
            .await
            .expect("list")
        {
            let map = image_map(&pristine_sink, d, &m.backup_id).await;
            before.insert((d.clone(), m.backup_id), map);
        }
    }
    // p5 and p4 stay; p3 and the full p2 fold into p4; p1 and p0 go whole.
    let policy = KeepPolicy {
        keep_last: 2,
        ..KeepPolicy::default()
    };
    let dir = lab.path("sink");
    let mut steps = 0;
    loop {
        // Objects are immutable and never rewritten in place: a hard-linked copy is a copy.
        let _ = std::fs::remove_dir_all(&dir);
        run(Command::new("cp").arg("-al").arg(&pristine).arg(&dir));
        let sink = LocalSink::open(&dir).expect("sink");
        let dying = Dying::new(sink.clone(), steps);
        let plan = plan_prune(&dying, &disks, &policy).await.expect("plan");
        let done = prune(&dying, &plan, None).await.is_ok();
        // Whatever is left reads what it read before, and the kept ones are all there.
        let mut left = Vec::new();
        for d in &disks {
            for m in catalog::list_backups(&sink, d).await.expect("list") {
                assert_eq!(
                    image_map(&sink, d, &m.backup_id).await,
                    before[&(d.clone(), m.backup_id.clone())],
                    "{d} {} after dying at step {steps}",
                    m.backup_id
                );
                let v = libcbt::engine::verify_chain(&sink, d, &m.backup_id)
                    .await
                    .expect("verify");
                assert!(
                    v.ok(),
                    "{d} {} after dying at step {steps}: {v:?}",
                    m.backup_id
                );
                left.push(m.backup_id);
            }
        }
        assert!(
            ["p4", "p5"]
                .iter()
                .all(|k| left.iter().filter(|l| l == k).count() == 2),
            "kept backups gone after dying at step {steps}: {left:?}"
        );
        // Run again: it finishes.
        let plan = plan_prune(&sink, &disks, &policy).await.expect("plan");
        prune(&sink, &plan, None)
            .await
            .unwrap_or_else(|e| panic!("prune after dying at step {steps}: {}", chain(&e)));
        // What a backup whose manifest went left (its index, recency entry, segments) is
        // garbage: the collector takes it (no other writer here, so no grace period).
        catalog::collect_sink_garbage(&sink, std::time::Duration::ZERO)
            .await
            .expect("gc");
        let mut kept = Vec::new();
        for d in &disks {
            kept.extend(catalog::list_backups(&sink, d).await.expect("list"));
        }
        for m in &kept {
            assert_eq!(
                image_map(&sink, &m.disk, &m.backup_id).await,
                before[&(m.disk.clone(), m.backup_id.clone())],
                "{} {} after the run again and gc, dying at step {steps}",
                m.disk,
                m.backup_id
            );
            let v = libcbt::engine::verify_chain(&sink, &m.disk, &m.backup_id)
                .await
                .expect("verify");
            assert!(v.ok(), "{v:?}");
        }
        let ids: Vec<&str> = kept.iter().map(|m| m.backup_id.as_str()).collect();
        assert_eq!(ids, ["p4", "p5", "p4", "p5"], "after dying at step {steps}");
        assert_sink_holds_only(&sink, &kept.iter().collect::<Vec<_>>()).await;
        if done {
            break;
        }
        steps += 1;
    }
    assert!(
        steps > 10,
        "a prune of this history takes more steps: {steps}"
    );
    eprintln!("prune killed at each of its {steps} steps");
    let sink = LocalSink::open(&dir).expect("sink");
    assert_eq!(all_restore(&sink, &disks, &refs).await, ["p4", "p5"]);

    // Cancelled before each of its steps in turn (as cbt-hostd's prune jobs are): it stops
    // there having reported the steps done, every backup reads what it read, and the same
    // prune run again finishes.
    use libcbt::engine::{prune_with, EngineError, Progress, Steps};
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut k = 0u64;
    loop {
        let _ = std::fs::remove_dir_all(&dir);
        run(Command::new("cp").arg("-al").arg(&pristine).arg(&dir));
        let sink = LocalSink::open(&dir).expect("sink");
        let cancel = AtomicBool::new(false);
        let seen = std::sync::Mutex::new(Vec::new());
        let progress = |p: Progress| {
            seen.lock().expect("lock").push((p.done, p.total));
            if p.done == k {
                cancel.store(true, Ordering::SeqCst);
            }
        };
        let plan = plan_prune(&sink, &disks, &policy).await.expect("plan");
        let with = Steps {
            progress: Some(&progress),
            cancel: Some(&cancel),
        };
        let r = prune_with(&sink, &plan, None, with).await;
        let seen = seen.into_inner().expect("lock");
        let total = seen.first().map_or(0, |s| s.1);
        assert!(
            seen.iter()
                .enumerate()
                .all(|(i, s)| *s == (i as u64, total)),
            "{seen:?}"
        );
        match r {
            Err(EngineError::Cancelled) => assert_eq!(seen.len() as u64, k + 1),
            Ok(_) => {
                assert_eq!(k, total, "a prune runs to its end only when not cancelled");
                break;
            }
            Err(e) => panic!("cancelled before step {k}: {}", chain(&e)),
        }
        for d in &disks {
            let ms = catalog::list_backups(&sink, d).await.expect("list");
            for m in &ms {
                assert_eq!(
                    image_map(&sink, d, &m.backup_id).await,
                    before[&(d.clone(), m.backup_id.clone())],
                    "{d} {} after a cancel before step {k}",
                    m.backup_id
                );
            }
            assert!(
                ["p4", "p5"]
                    .iter()
                    .all(|id| ms.iter().any(|m| m.backup_id == *id)),
                "{d} after a cancel before step {k}"
            );
        }
        let plan = plan_prune(&sink, &disks, &policy).await.expect("plan");
        prune(&sink, &plan, None)
            .await
            .expect("the prune run again");
        catalog::collect_sink_garbage(&sink, std::time::Duration::ZERO)
            .await
            .expect("gc");
        let mut kept = Vec::new();
        for d in &disks {
            kept.extend(catalog::list_backups(&sink, d).await.expect("list"));
        }
        let ids: Vec<&str> = kept.iter().map(|m| m.backup_id.as_str()).collect();
        assert_eq!(
            ids,
            ["p4", "p5", "p4", "p5"],
            "after a cancel before step {k}"
        );
        assert_sink_holds_only(&sink, &kept.iter().collect::<Vec<_>>()).await;
        k += 1;
    }
    assert!(k >= 5, "folds and deletions of this history: {k} steps");
    eprintln!("prune cancelled before each of its {k} steps");
}

/// What restoring backup `id` of `disk` reads, by disk range: the frame's checksum, disk
/// offset and raw length (read from its header), or zeroes. Unlike [`image_map`], blind to
/// where a frame is: what compaction must keep.
async fn content_map<S: Sink>(
    sink: &S,
    disk: &str,
    id: &str,
) -> Vec<(u64, u64, Option<(u32, u64, u32)>)> {
    let mut out = Vec::new();
    for (a, b, src) in image_map(sink, disk, id).await {
        let src = match src {
            None => None,
            Some((segment, pos, _)) => {
                let name = libcbt::format::segment_name(disk, segment);
                let h = sink.get_range(&name, pos, 32).await.expect("frame header");
                let h = libcbt::format::segment::FrameHeader::decode(&h).expect("header");
                Some((h.crc, h.offset, h.raw_len))
            }
        };
        out.push((a, b, src));
    }
    out
}

async fn segment_bytes<S: Sink>(sink: &S) -> u64 {
    sink.list("disks/")
        .await
        .expect("list")
        .iter()
        .filter(|o| o.name.ends_with(".seg"))
        .map(|o| o.len)
        .sum()
}

/// Compaction: a full whose frames the next backup half overwrote is folded away by a prune,
/// leaving its segments half dead. Compaction copies their live frames into new segments,
/// every backup reads the same frames (by checksum, offset and length) and restores exactly
/// (`qemu-img compare`), and the space comes back as reported. Killed at each of its steps
/// (the sink dies at its n-th change), it loses nothing, and the next run and a collection
/// finish the work: then nothing is sparse and the sink holds exactly the backups' objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_rewrites_sparse_segments_and_a_kill_at_any_step_loses_nothing() {
    use libcbt::engine::{compact, plan_prune, prune, CompactOptions};
    use libcbt::retention::KeepPolicy;
    use rand::Rng;
    let lab = Lab::new(&[("d0", "qcow2")], SIZE).await;
    let pristine = lab.path("pristine");
    let psink = LocalSink::open(&pristine).expect("sink");
    let opts = BackupOptions {
        chunk_size: 256 << 10,
        segment_size: 1 << 20,
        ..Default::default()
    };
    let chunk: u64 = 256 << 10;
    let mut rng = rng(seed("compact"));
    let mut refs = std::collections::BTreeMap::new();
    // k0: 8 MiB of random data; k1: every other chunk of it rewritten; k2: a little more.
    for (id, chunks) in [
        ("k0", (0..32).collect::<Vec<u64>>()),
        ("k1", (0..32).step_by(2).collect()),
        ("k2", vec![40, 41]),
    ] {
        for c in chunks {
            let mut data = vec![0u8; chunk as usize];
            rng.fill(&mut data[..]);
            lab.live[0]
                .write(c * chunk, data, false)
                .await
                .expect("write");
        }
        lab.live[0].flush().await.expect("flush");
        let r = lab.path(&format!("ref-{id}.raw"));
        lab.reference(0, &r);
        refs.insert(id.to_string(), r);
        job::backup_qemu(
            &lab.source,
            &psink,
            &id.parse().expect("id"),
            &specs(&lab),
            Requested::Auto,
            &opts,
        )
        .await
        .expect("backup");
    }
    let disk = "vm-d0";
    let policy = KeepPolicy {
        keep_last: 2,
        ..KeepPolicy::default()
    };
    let plan = plan_prune(&psink, &[disk.to_string()], &policy)
        .await
        .expect("plan");
    let r = prune(&psink, &plan, None).await.expect("prune");
    // k0 folds into k1; its segments with no live frame go (frames land in segments in the
    // order the copy finishes them, not by offset), the others stay, sparse.
    assert_eq!(
        (r.deleted.clone(), r.folds),
        (vec!["k0".to_string()], 1),
        "{r:?}"
    );
    let mut before = std::collections::BTreeMap::new();
    for m in catalog::list_backups(&psink, disk).await.expect("list") {
        before.insert(
            m.backup_id.clone(),
            content_map(&psink, disk, &m.backup_id).await,
        );
    }
    let copts = CompactOptions {
        threshold: 0.7,
        max_bytes: u64::MAX,
        segment_size: 1 << 20,
        ..CompactOptions::default()
    };
    // A run copies no more than its budget: here none, and it says what it left.
    let capped = compact(
        &psink,
        disk,
        &CompactOptions {
            max_bytes: 1,
            ..copts
        },
    )
    .await
    .expect("capped");
    assert_eq!((capped.segments_rewritten, capped.bytes_copied), (0, 0));
    assert!(capped.segments_left >= 2, "{capped:?}");
    let dir = lab.path("sink");
    let mut steps = 0;
    loop {
        let _ = std::fs::remove_dir_all(&dir);
        run(Command::new("cp").arg("-al").arg(&pristine).arg(&dir));
        let sink = LocalSink::open(&dir).expect("sink");
        let bytes_before = segment_bytes(&sink).await;
        let result = compact(&Dying::new(sink.clone(), steps), disk, &copts).await;
        let check = async |when: &str| {
            let ms = catalog::list_backups(&sink, disk).await.expect("list");
            let ids: Vec<&str> = ms.iter().map(|m| m.backup_id.as_str()).collect();
            assert_eq!(ids, ["k1", "k2"], "{when}, dying at step {steps}");
            for m in &ms {
                assert_eq!(
                    content_map(&sink, disk, &m.backup_id).await,
                    before[&m.backup_id],
                    "{} {when}, dying at step {steps}",
                    m.backup_id
                );
                let v = libcbt::engine::verify_chain(&sink, disk, &m.backup_id)
                    .await
                    .expect("verify");
                assert!(v.ok(), "{when}, dying at step {steps}: {v:?}");
            }
            ms
        };
        check("after the kill").await;
        if let Ok(r) = &result {
            assert!(r.segments_rewritten >= 2, "{r:?}");
            assert_eq!(r.backups_rewritten, 1, "only k1 reads k0's frames: {r:?}");
            assert_eq!(r.segments_left, 0);
            assert!(r.bytes_copied >= chunk, "{r:?}");
            eprintln!("compaction: {r:?}");
            assert_eq!(
                bytes_before - segment_bytes(&sink).await,
                r.bytes_reclaimed,
                "the space reported is the space that came back"
            );
            assert!(r.bytes_reclaimed >= chunk, "{r:?}");
        }
        // Run again, then collect (nothing else runs: no grace period): the work is done.
        compact(&sink, disk, &copts)
            .await
            .unwrap_or_else(|e| panic!("compaction after dying at step {steps}: {}", chain(&e)));
        catalog::collect_sink_garbage(&sink, std::time::Duration::ZERO)
            .await
            .expect("gc");
        let ms = check("after running again").await;
        let again = compact(&sink, disk, &copts).await.expect("again");
        assert_eq!(
            again.segments_rewritten, 0,
            "still sparse after dying at step {steps}"
        );
        assert_sink_holds_only(&sink, &ms.iter().collect::<Vec<_>>()).await;
        if result.is_ok() {
            for m in &ms {
                restore_matches(&sink, disk, &m.backup_id, &refs[&m.backup_id]).await;
            }
            break;
        }
        steps += 1;
        assert!(steps < 200, "the compaction never got through");
    }
    assert!(steps > 5, "it died at only {steps} steps");

    // Another writer commits a generation of k1 while the compaction copies: the compaction
    // refuses to commit k1 over it from the generation it read (that would undo the other
    // write), deletes no old segment a manifest lists, and nothing is lost.
    let _ = std::fs::remove_dir_all(&dir);
    run(Command::new("cp").arg("-al").arg(&pristine).arg(&dir));
    let sink = LocalSink::open(&dir).expect("sink");
    let e = compact(&Dying::meddling(sink.clone(), disk, "k1"), disk, &copts)
        .await
        .expect_err("a stale rewrite");
    assert!(chain(&e).contains("changed meanwhile"), "{}", chain(&e));
    catalog::collect_sink_garbage(&sink, std::time::Duration::ZERO)
        .await
        .expect("gc");
    let ms = catalog::list_backups(&sink, disk).await.expect("list");
    assert_eq!(ms[0].generation, 2, "the other writer's generation stands");
    for m in &ms {
        assert_eq!(
            content_map(&sink, disk, &m.backup_id).await,
            before[&m.backup_id]
        );
        restore_matches(&sink, disk, &m.backup_id, &refs[&m.backup_id]).await;
    }
    assert_sink_holds_only(&sink, &ms.iter().collect::<Vec<_>>()).await;
}

/// One retention step of a random sequence.
#[derive(Debug, Clone)]
enum RetentionOp {
    Prune(u32),
    Delete(String),
    Compact(f64),
    Bound(usize),
}

async fn retention_op<S: Sink>(
    sink: &S,
    disks: &[String],
    op: &RetentionOp,
    newest: &str,
) -> Result<(), libcbt::engine::EngineError> {
    use libcbt::engine::{bound_chain, compact, plan_delete, plan_prune, prune, CompactOptions};
    match op {
        RetentionOp::Prune(k) => {
            let policy = libcbt::retention::KeepPolicy {
                keep_last: *k,
                ..Default::default()
            };
            prune(sink, &plan_prune(sink, disks, &policy).await?, None).await?;
        }
        RetentionOp::Delete(id) => {
            if let Some(plan) = plan_delete(sink, disks, id).await? {
                prune(sink, &plan, None).await?;
            }
        }
        RetentionOp::Compact(t) => {
            let opts = CompactOptions {
                threshold: *t,
                max_bytes: u64::MAX,
                segment_size: 1 << 20,
                ..CompactOptions::default()
            };
            for d in disks {
                compact(sink, d, &opts).await?;
            }
        }
        RetentionOp::Bound(n) => {
            for d in disks {
                bound_chain(sink, d, newest, *n).await?;
            }
        }
    }
    Ok(())
}

/// Random sequences: backups at random levels with random writes, each followed by a random
/// retention step (a prune with a random keep-last, the deletion of a random backup, a
/// compaction at a random threshold, bounding the newest chain) and a collection; on the
/// directory, the step first dies at a random change and the sequence checks and finishes it.
/// After every step every backup left restores exactly (`qemu-img compare`), verifies clean,
/// and the sink holds exactly their objects.
async fn retention_sequence<S: Sink>(lab: &Lab, sink: &S, dying: Option<&LocalSink>, name: &str) {
    use rand::Rng;
    let mut rng = rng(seed(name));
    let disks: Vec<String> = specs(lab).into_iter().map(|s| s.disk).collect();
    let mut refs = Refs::new();
    let mut ops = Vec::new();
    for round in 0..10 {
        for l in &lab.live {
            guest_writes(l, &mut rng, 10).await;
        }
        let id = format!("r{round:02}");
        let req = if rng.gen_bool(0.2) {
            Requested::Full
        } else {
            Requested::Auto
        };
        refs.insert(
            id.clone(),
            job_round(lab, sink, &id, req).await.expect("job"),
        );
        let ms = catalog::list_backups(sink, &disks[0]).await.expect("list");
        let op = match rng.gen_range(0..4) {
            // The newest too: the next backup then starts from the one before, or a full.
            0 => RetentionOp::Delete(ms[rng.gen_range(0..ms.len())].backup_id.clone()),
            1 => RetentionOp::Prune(rng.gen_range(1..5)),
            2 => RetentionOp::Compact(rng.gen_range(0.3..1.0)),
            _ => RetentionOp::Bound(rng.gen_range(1..4)),
        };
        if let Some(local) = dying {
            if rng.gen_bool(0.5) {
                let n = rng.gen_range(0..12);
                let _ = retention_op(&Dying::new(local.clone(), n), &disks, &op, &id).await;
                catalog::collect_sink_garbage(sink, std::time::Duration::ZERO)
                    .await
                    .expect("gc");
                all_restore(sink, &disks, &refs).await;
            }
        }
        retention_op(sink, &disks, &op, &id)
            .await
            .unwrap_or_else(|e| panic!("{op:?} after {ops:?}: {}", chain(&e)));
        catalog::collect_sink_garbage(sink, std::time::Duration::ZERO)
            .await
            .expect("gc");
        ops.push(op);
        all_restore(sink, &disks, &refs).await;
    }
    eprintln!("{name}: {ops:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_retention_sequences_with_kills_on_a_directory() {
    let lab = Lab::new(&[("d0", "qcow2"), ("d1", "raw")], SIZE).await;
    let sink = LocalSink::open(lab.path("sink")).expect("sink");
    retention_sequence(&lab, &sink, Some(&sink), "retention_seq_dir").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_retention_sequences_on_seaweedfs() {
    let lab = Lab::new(&[("d0", "qcow2"), ("d1", "raw")], SIZE).await;
    let sink = s3::seaweed()
        .await
        .sink(&format!("retention-{}", std::process::id()))
        .await;
    retention_sequence(&lab, &sink, None, "retention_seq_s3").await;
}

/// The server's own answer to deleting the current version of `key` of `cfg`'s bucket: an
/// oracle apart from the sink (object_store's HEAD for the version id, then a presigned
/// DELETE of that version).
async fn delete_version_status(cfg: &libcbt::sink::s3::S3Config, key: &str) -> u16 {
    use object_store::aws::AmazonS3Builder;
    use object_store::signer::{SignedUrlOptions, Signer};
    use object_store::ObjectStoreExt;
    let store = AmazonS3Builder::new()
        .with_endpoint(&cfg.endpoint)
        .with_bucket_name(&cfg.bucket)
        .with_region(&cfg.region)
        .with_access_key_id(&cfg.access_key)
        .with_secret_access_key(&cfg.secret_key.0)
        .with_allow_http(true)
        .build()
        .expect("client");
    let p = object_store::path::Path::parse(format!("{}/{key}", cfg.prefix)).expect("path");
    let v = store
        .head(&p)
        .await
        .expect("head")
        .version
        .expect("a version id");
    let url = store
        .signed_url_opts(
            http::Method::DELETE,
            &p,
            std::time::Duration::from_secs(60),
            &SignedUrlOptions::new().with_query([("versionId", v)]),
        )
        .await
        .expect("sign");
    reqwest::Client::new()
        .delete(url.as_str())
        .send()
        .await
        .expect("DELETE")
        .status()
        .as_u16()
}

/// Immutable mode on SeaweedFS (S3 Object Lock, governance, a period of 12 s): the server
/// refuses to delete what a backup wrote (403, asked apart from the sink); a prune holds a
/// locked backup whatever the policy says; an incremental that comes later than a quarter
/// period after its parent extends the locks of the chain it reads, so that the full stays
/// locked past its own period; once every lock has ended the prune folds the full away and
/// what stays restores exactly. A bucket without Object Lock is refused at open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immutable_backups_stay_whole_while_locked_on_seaweedfs() {
    use libcbt::engine::{plan_delete, plan_prune, prune, Hold};
    use libcbt::retention::KeepPolicy;
    use libcbt::sink::s3::{LockMode, ObjectLock, S3Sink};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    let server = s3::seaweed().await;
    let period = Duration::from_secs(12);
    let lock = ObjectLock {
        mode: LockMode::Governance,
        period,
    };
    let mut cfg = server.config("imm");
    cfg.bucket = format!("locked-{}", std::process::id());
    cfg.object_lock = Some(lock);

    // The test bucket was made without Object Lock: immutable mode is refused there.
    let mut unlocked = cfg.clone();
    unlocked.bucket = server.bucket.clone();
    let e = S3Sink::open(&unlocked).await.expect_err("no Object Lock");
    let text = chain(&e);
    assert!(
        matches!(e, SinkError::Unsupported(_)) && text.contains("does not have it enabled"),
        "{text}"
    );

    S3Sink::create_bucket(&cfg)
        .await
        .expect("bucket with Object Lock");
    let sink = S3Sink::open(&cfg).await.expect("open an immutable sink");
    assert_eq!(sink.lock_period(), Some(period));
    let lab = Lab::new(&[("d0", "qcow2")], SIZE).await;
    let disks: Vec<String> = specs(&lab).into_iter().map(|s| s.disk).collect();
    let disk = disks[0].as_str();
    let mut rng = rng(seed("immutable"));
    let mut refs = Refs::new();
    guest_writes(&lab.live[0], &mut rng, 15).await;
    refs.insert(
        "l0".into(),
        job_round(&lab, &sink, "l0", Requested::Full)
            .await
            .expect("l0"),
    );
    let l0 = catalog::read_manifest(&sink, disk, "l0")
        .await
        .expect("read")
        .expect("l0");
    let span = (period + period / 4).as_millis() as u64;
    assert_eq!(l0.locked_until_unix_ms, Some(l0.started_unix_ms + span));
    let seg0 = l0.segments[0].clone();
    // The server's refusal, and the sink's reading of it.
    assert_eq!(delete_version_status(&cfg, &seg0).await, 403);
    assert_eq!(delete_version_status(&cfg, &l0.index.name).await, 403);
    match sink.delete(&seg0).await {
        Err(SinkError::Locked { names }) => assert_eq!(names, std::slice::from_ref(&seg0)),
        r => panic!("deleting a locked segment: {r:?}"),
    }

    // More than a quarter period later: l1 must extend the chain's locks.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    guest_writes(&lab.live[0], &mut rng, 15).await;
    refs.insert(
        "l1".into(),
        job_round(&lab, &sink, "l1", Requested::Auto)
            .await
            .expect("l1"),
    );
    let l1 = catalog::read_manifest(&sink, disk, "l1")
        .await
        .expect("read")
        .expect("l1");
    assert_eq!(l1.level, Level::Incremental);
    assert_eq!(l1.locked_until_unix_ms, Some(l1.started_unix_ms + span));

    // Everything locked: keep-last 1 keeps l0 all the same, and it cannot be deleted alone.
    let policy = KeepPolicy {
        keep_last: 1,
        ..KeepPolicy::default()
    };
    let now_ms = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64
    };
    let plan = plan_prune(&sink, &disks, &policy).await.expect("plan");
    match plan
        .iter()
        .find(|e| e.id == "l0")
        .and_then(|e| e.hold.clone())
    {
        Some(Hold::Locked(t)) => assert!(t > now_ms() && t >= l1.started_unix_ms + span - 1_000),
        h => panic!("l0 held by {h:?}"),
    }
    assert!(prune(&sink, &plan, None)
        .await
        .expect("prune")
        .deleted
        .is_empty());
    let plan = plan_delete(&sink, &disks, "l0")
        .await
        .expect("plan")
        .expect("l0");
    assert!(matches!(
        plan.iter()
            .find(|e| e.id == "l0")
            .and_then(|e| e.hold.clone()),
        Some(Hold::Locked(_))
    ));
    assert_eq!(all_restore(&sink, &disks, &refs).await, ["l0", "l1"]);

    // Past l0's own lock, within l1's: l0's objects were extended, the server still refuses.
    let own_end = l0.locked_until_unix_ms.expect("l0 locked");
    let wait = (own_end + 1_000).saturating_sub(now_ms());
    tokio::time::sleep(Duration::from_millis(wait)).await;
    assert!(now_ms() < l1.locked_until_unix_ms.expect("l1 locked"));
    assert_eq!(delete_version_status(&cfg, &seg0).await, 403);
    let l0_manifest = libcbt::format::layout::manifest_name(disk, "l0");
    assert_eq!(delete_version_status(&cfg, &l0_manifest).await, 403);

    // Every lock over: l0 folds into l1 and goes; l1 restores exactly, as a full now. l1's
    // own manifest and index were locked when written, a little after its start (seconds on
    // a loaded machine), so their retention runs past its record: wait for the later of all.
    let mut end = l1.locked_until_unix_ms.expect("l1");
    for name in [
        libcbt::format::layout::manifest_name(disk, "l1"),
        l1.index.name.clone(),
    ] {
        if let Some(t) = sink.locked_until(&name).await.expect("retention") {
            let ms = t
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            end = end.max(ms);
        }
    }
    let wait = (end + 1_000).saturating_sub(now_ms());
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let plan = plan_prune(&sink, &disks, &policy).await.expect("plan");
    let r = prune(&sink, &plan, None).await.expect("prune");
    assert_eq!((r.deleted.clone(), r.folds), (vec!["l0".to_string()], 1));
    catalog::collect_garbage(&sink, disk, Duration::ZERO)
        .await
        .expect("gc");
    assert_eq!(all_restore(&sink, &disks, &refs).await, ["l1"]);
    // The fold's new generation is locked no longer than l1's own record (over by now): a
    // fold never keeps a backup past its retention.
    let g1 = libcbt::format::layout::manifest_name_gen(disk, "l1", 1);
    let until = sink.locked_until(&g1).await.expect("retention");
    assert!(
        until.is_none_or(|t| t <= SystemTime::now()),
        "{g1} locked until {until:?}"
    );
}
