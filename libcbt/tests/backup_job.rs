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

/// Prune with a keep-last policy on a chain, a second full and an incremental of it: the
/// older chain goes whole (the incremental first), the kept incremental keeps its full, and
/// both restore exactly; the sink then holds exactly what the two manifests name, and a
/// second run finds nothing to do. On a directory and on SeaweedFS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_drops_whole_chains_the_policy_does_not_keep() {
    let lab = Lab::new(&[("d0", "qcow2"), ("d1", "raw")], SIZE).await;
    let sink = LocalSink::open(lab.path("sink")).expect("sink");
    prune_rounds(&lab, &sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_drops_whole_chains_the_policy_does_not_keep_on_seaweedfs() {
    let lab = Lab::new(&[("d0", "qcow2"), ("d1", "raw")], SIZE).await;
    let sink = s3::seaweed()
        .await
        .sink(&format!("prune-{}", std::process::id()))
        .await;
    prune_rounds(&lab, &sink).await;
}

async fn prune_rounds<S: Sink>(lab: &Lab, sink: &S) {
    use libcbt::engine::{plan_prune, prune, Hold};
    use libcbt::retention::{KeepPolicy, Rule};
    let mut rng = rng(seed("prune"));
    let mut refs = Vec::new();
    for (id, req) in [
        ("p0", Requested::Auto),
        ("p1", Requested::Auto),
        ("p2", Requested::Full),
        ("p3", Requested::Auto),
    ] {
        for l in &lab.live {
            guest_writes(l, &mut rng, 15).await;
        }
        refs.push(job_round(lab, sink, id, req).await.expect("job"));
    }
    let disks: Vec<String> = specs(lab).into_iter().map(|s| s.disk).collect();
    let policy = KeepPolicy {
        keep_last: 1,
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
            ("p3", Some(Hold::Kept(Rule::Last))),
            ("p2", Some(Hold::BaseOf("p3".into()))),
            ("p1", None),
            ("p0", None),
        ]
    );
    // The plan alone changes nothing.
    for d in &disks {
        assert_eq!(catalog::list_backups(sink, d).await.expect("list").len(), 4);
    }
    let before = sink.list("disks/").await.expect("list").len();
    let report = prune(sink, &plan, None).await.expect("prune");
    assert_eq!(report.deleted, ["p1", "p0"]);
    let mut kept = Vec::new();
    for (i, id) in [(2, "p2"), (3, "p3")] {
        restore_and_compare(sink, id, &refs[i]).await;
        for d in &disks {
            kept.push(
                catalog::read_manifest(sink, d, id)
                    .await
                    .expect("read")
                    .expect("kept"),
            );
        }
    }
    let kept_refs: Vec<&libcbt::format::Manifest> = kept.iter().collect();
    assert_sink_holds_only(sink, &kept_refs).await;
    let after = sink.list("disks/").await.expect("list").len();
    assert_eq!(before - after, report.objects, "objects the report counts");
    let again = plan_prune(sink, &disks, &policy).await.expect("plan");
    assert!(again.iter().all(|e| e.hold.is_some()), "{again:?}");
    assert!(prune(sink, &again, None)
        .await
        .expect("prune")
        .deleted
        .is_empty());
}
