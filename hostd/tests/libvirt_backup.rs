//! The libvirt change source against a real libvirtd (started here when it is not running):
//! domains with qcow2 and raw disks under KVM, simulated guest writes through the monitor's
//! `qemu-io`, a real guest (Debian kernel + busybox initramfs under TCG) that writes
//! continuously and runs qemu-ga, and the failure paths. Every restore is checked with
//! `qemu-img compare` against a copy of the disk taken at the backup's point in time, every
//! dirty map with `nbdinfo --map`.
//!
//! Tests here share one libvirtd and one of them restarts it: they run one at a time.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use libcbt::engine::{self, BackupOptions};
use libcbt::format::{Consistency, FullReason, Level, Manifest};
use libcbt::job;
use libcbt::source::libvirt as lvs;
use support::common::lab::{assert_sink_holds_only, restore_matches};
use support::common::{chain, coalesce, nbdinfo_map, require, rng, run, seed};
use support::*;

#[test]
fn two_disks_full_then_incrementals_restore_exactly() {
    let _g = serial();
    let mut r = rng(seed("two_disks"));
    let dom = Dom::bare(
        "two",
        &[
            Disk {
                target: "vda",
                format: "qcow2",
                size: 64 * MIB,
            },
            Disk {
                target: "vdb",
                format: "raw",
                size: 32 * MIB,
            },
        ],
    );
    let env = Env::new();
    dom.scatter("vda", 64 * MIB, 12, &mut r);
    dom.scatter("vdb", 32 * MIB, 6, &mut r);
    let mut manifests = Vec::new();
    for (i, id) in ["b1", "b2", "b3"].into_iter().enumerate() {
        if i > 0 {
            dom.scatter("vda", 64 * MIB, 5, &mut r);
            dom.scatter("vdb", 32 * MIB, 2, &mut r);
        }
        let ra = dom.reference("vda", id);
        let rb = dom.reference("vdb", id);
        let res = env.backup(&dom, id).expect("backup");
        if i == 0 {
            assert_eq!(
                level(&res, &dom, "vda"),
                (Level::Full, Some(FullReason::FirstBackup))
            );
        } else {
            assert_eq!(level(&res, &dom, "vda"), (Level::Incremental, None));
            // Only what was written: at most 5 writes of up to 192 KiB.
            assert!(manifest(&res, &dom, "vda").stats.bytes_scanned <= 5 * 192 * 1024);
            assert_eq!(
                level(&res, &dom, "vdb"),
                (Level::Full, Some(FullReason::Untracked))
            );
        }
        assert_eq!(res.quiesce.consistency, Some(Consistency::Crash));
        env.rt
            .block_on(restore_matches(&env.sink, &dom.disk_id("vda"), id, &ra));
        env.rt
            .block_on(restore_matches(&env.sink, &dom.disk_id("vdb"), id, &rb));
        // Our checkpoints are plain libvirt checkpoints, and only the newest is kept.
        assert_eq!(dom.checkpoints(), vec![format!("cbt-{id}")]);
        scratch_is_empty(env.scratch.path());
        manifests.extend(res.disks.into_iter().map(|d| d.manifest));
    }
    // The domain XML is kept with each backup, for restores into a new domain.
    use libcbt::sink::Sink;
    let saved = env
        .rt
        .block_on(
            env.sink
                .get(&job::domain_xml_name(&dom.uuid(), "b3"), 1 << 20),
        )
        .expect("domain xml on the sink");
    assert!(String::from_utf8_lossy(&saved).contains(&dom.name));
    // Restoring an older point in time still works after newer incrementals.
    let r1 = dom.path("ref-vda-b1.raw");
    env.rt
        .block_on(restore_matches(&env.sink, &dom.disk_id("vda"), "b1", &r1));
    let refs: Vec<&Manifest> = manifests.iter().collect();
    env.rt.block_on(assert_sink_holds_only(&env.sink, &refs));
}

#[test]
fn writes_during_the_copy_stay_out_and_the_dirty_map_matches_nbdinfo() {
    let _g = serial();
    let mut r = rng(seed("during_copy"));
    let dom = Dom::bare(
        "during",
        &[Disk {
            target: "vda",
            format: "qcow2",
            size: 64 * MIB,
        }],
    );
    let env = Env::new();
    dom.scatter("vda", 64 * MIB, 10, &mut r);
    let first = env.backup(&dom, "b1").expect("b1");
    dom.scatter("vda", 64 * MIB, 8, &mut r);
    let reference = dom.reference("vda", "b2");

    // Begin by hand so that the guest can write between the point in time and the copy.
    let d = env.src.domain(&dom.name).expect("domain");
    let parent = first.disks[0].manifest.clone();
    let session = begin_incremental(&d, "b2", "cbt-b1", env.scratch.path());
    let sd = &session.disks[0];
    let ctx = sd
        .dirty_context
        .clone()
        .expect("incremental export has a bitmap");
    let before = coalesce(nbdinfo_map(&sd.uri, &ctx));
    // The guest writes on, over dirty and clean areas alike, and grows nothing.
    dom.scatter("vda", 64 * MIB, 12, &mut r);
    dom.io("vda", "write -z 0 1M");
    let scan = env
        .rt
        .block_on(engine::scan_export(&sd.uri, Some(&ctx)))
        .expect("scan");
    let ours: Vec<(u64, u64, u32)> = scan
        .dirty
        .as_ref()
        .expect("dirty map")
        .iter()
        .map(|e| (e.start, e.end - e.start, 1))
        .collect();
    let theirs: Vec<(u64, u64, u32)> = before
        .iter()
        .filter(|x| x.2 & 1 == 1)
        .map(|x| (x.0, x.1, 1))
        .collect();
    assert_eq!(
        coalesce(ours),
        coalesce(theirs),
        "dirty map differs from nbdinfo --map"
    );
    let after = coalesce(nbdinfo_map(&sd.uri, &ctx));
    assert_eq!(
        before, after,
        "the frozen dirty map moved with guest writes"
    );
    env.rt
        .block_on(copy_incremental(
            &env.sink,
            &dom.disk_id("vda"),
            &session,
            "b2",
            &parent,
            Some(scan),
        ))
        .expect("copy");
    lvs::end(&d, session, true, &BTreeSet::new()).expect("end");
    env.rt.block_on(restore_matches(
        &env.sink,
        &dom.disk_id("vda"),
        "b2",
        &reference,
    ));
    assert_eq!(dom.checkpoints(), vec!["cbt-b2".to_string()]);
    scratch_is_empty(env.scratch.path());
}

#[test]
fn lost_metadata_offline_domain_broken_bitmap_and_hot_added_disk() {
    let _g = serial();
    let mut r = rng(seed("lost_metadata"));
    let dom = Dom::bare(
        "lost",
        &[Disk {
            target: "vda",
            format: "qcow2",
            size: 64 * MIB,
        }],
    );
    let env = Env::new();
    let backup = |id: &str| {
        env.backup(&dom, id)
            .unwrap_or_else(|e| panic!("backup {id}: {e:?}"))
    };
    dom.scatter("vda", 64 * MIB, 8, &mut r);
    backup("b1");
    dom.scatter("vda", 64 * MIB, 4, &mut r);
    // QEMU exits cleanly on SIGTERM (virsh destroy) and stores the bitmaps in the qcow2.
    virsh(&["destroy", &dom.name]);
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(dom.image("vda")));
    assert!(info.contains("\"cbt-b1\""), "bitmap not stored: {info}");
    // libvirt forgets the checkpoint: the domain is undefined and defined again.
    virsh(&["undefine", "--checkpoints-metadata", &dom.name]);
    virsh(&["define", &dom.path("domain.xml").display().to_string()]);
    assert!(dom.checkpoints().is_empty());
    let reference = dom.reference("vda", "b2");
    // A shut-off domain: started paused for the backup, stopped again after.
    let res = backup("b2");
    assert!(res.started_paused);
    assert_eq!(
        level(&res, &dom, "vda"),
        (Level::Incremental, None),
        "checkpoint was not redefined"
    );
    assert!(
        !virsh(&["domstate", &dom.name]).contains("running"),
        "domain left running"
    );
    env.rt.block_on(restore_matches(
        &env.sink,
        &dom.disk_id("vda"),
        "b2",
        &reference,
    ));
    assert_eq!(dom.checkpoints(), vec!["cbt-b2".to_string()]);

    // The bitmap removed behind libvirt's back: libvirt refuses it; that disk gets a full.
    run(Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(dom.image("vda"))
        .arg("cbt-b2"));
    let res = backup("b3");
    assert_eq!(
        level(&res, &dom, "vda"),
        (Level::Full, Some(FullReason::BitmapInconsistent))
    );
    env.rt.block_on(restore_matches(
        &env.sink,
        &dom.disk_id("vda"),
        "b3",
        &reference,
    ));
    assert_eq!(dom.checkpoints(), vec!["cbt-b3".to_string()]);

    // A disk hot-added to the running domain: a full for it, incremental for the other.
    virsh(&["start", &dom.name]);
    let vdc = dom.path("vdc.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&vdc)
        .arg("32M"));
    virsh(&[
        "attach-disk",
        &dom.name,
        &vdc.display().to_string(),
        "vdc",
        "--driver",
        "qemu",
        "--subdriver",
        "qcow2",
        "--live",
    ]);
    dom.scatter("vda", 64 * MIB, 3, &mut r);
    dom.scatter("vdc", 32 * MIB, 3, &mut r);
    let (ra, rc) = (dom.reference("vda", "b4"), dom.reference("vdc", "b4"));
    let res = backup("b4");
    assert_eq!(level(&res, &dom, "vda"), (Level::Incremental, None));
    assert_eq!(
        level(&res, &dom, "vdc"),
        (Level::Full, Some(FullReason::FirstBackup))
    );
    env.rt
        .block_on(restore_matches(&env.sink, &dom.disk_id("vda"), "b4", &ra));
    env.rt
        .block_on(restore_matches(&env.sink, &dom.disk_id("vdc"), "b4", &rc));
    dom.scatter("vdc", 32 * MIB, 2, &mut r);
    let rc = dom.reference("vdc", "b5");
    let res = backup("b5");
    assert_eq!(level(&res, &dom, "vda"), (Level::Incremental, None));
    assert_eq!(level(&res, &dom, "vdc"), (Level::Incremental, None));
    env.rt
        .block_on(restore_matches(&env.sink, &dom.disk_id("vdc"), "b5", &rc));
    scratch_is_empty(env.scratch.path());
}

#[test]
fn failures_leave_no_stray_checkpoint_scratch_or_object() {
    let _g = serial();
    let mut r = rng(seed("failures"));
    let dom = Dom::bare(
        "fail",
        &[Disk {
            target: "vda",
            format: "qcow2",
            size: 64 * MIB,
        }],
    );
    let env = Env::new();
    dom.scatter("vda", 64 * MIB, 8, &mut r);
    let first = env.backup(&dom, "b1").expect("b1");
    let committed = [first.disks[0].manifest.clone()];
    dom.scatter("vda", 64 * MIB, 5, &mut r);
    let reference = dom.reference("vda", "next");

    // 1. A full scratch file system: the job cannot begin.
    let full = shared_dir();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs"])
        .arg(full.path()));
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "count=1000"])
        .arg(format!("of={}/filler", full.path().display()))
        .output();
    let e = env.rt.block_on(job::backup_libvirt(
        &env.src,
        &env.sink,
        &job(&dom, "b2", full.path()),
        &BackupOptions::default(),
    ));
    let _ = std::fs::remove_file(full.path().join("filler"));
    let left = walk(full.path());
    let _ = Command::new("umount").arg(full.path()).status();
    assert!(e.is_err(), "backup with a full scratch directory succeeded");
    assert!(
        left.is_empty(),
        "scratch left on the full file system: {left:?}"
    );
    assert_eq!(dom.checkpoints(), vec!["cbt-b1".to_string()]);
    env.rt.block_on(assert_sink_holds_only(
        &env.sink,
        &committed.iter().collect::<Vec<_>>(),
    ));

    // 2. The backup job aborted under the copy (an operator's `virsh domjobabort`).
    let d = env.src.domain(&dom.name).expect("domain");
    let session = begin_incremental(&d, "b3", "cbt-b1", &env.scratch.path().join(dom.uuid()));
    virsh(&["domjobabort", &dom.name]);
    // Wait until libvirt has ended the job: QEMU 7.2 can wedge the job's teardown (and with it
    // libvirt's state lock, for minutes) when an NBD client has requests in flight at that
    // moment, which is why our engine closes every connection before a job is ended.
    let t = Instant::now();
    while !virsh(&["domjobinfo", &dom.name]).contains("None") {
        assert!(t.elapsed() < Duration::from_secs(60), "job did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    let copy = env.rt.block_on(copy_incremental(
        &env.sink,
        &dom.disk_id("vda"),
        &session,
        "b3",
        &committed[0],
        None,
    ));
    assert!(copy.is_err(), "copy from an aborted job succeeded");
    lvs::end(&d, session, false, &BTreeSet::new()).expect("rollback");
    assert_eq!(dom.checkpoints(), vec!["cbt-b1".to_string()]);
    scratch_is_empty(env.scratch.path());
    env.rt.block_on(assert_sink_holds_only(
        &env.sink,
        &committed.iter().collect::<Vec<_>>(),
    ));

    // 3. libvirtd restarted between backups: the chain goes on, incremental and exact.
    let _ = Command::new("pkill").args(["-x", "libvirtd"]).status();
    let t = Instant::now();
    while virsh_ok(&["version"]) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    start_libvirtd();
    // A new connection: the old one died with libvirtd.
    let res = env
        .rt
        .block_on(job::backup_libvirt(
            &source(),
            &env.sink,
            &job(&dom, "b4", env.scratch.path()),
            &BackupOptions::default(),
        ))
        .expect("b4 after libvirtd restart");
    assert_eq!(level(&res, &dom, "vda"), (Level::Incremental, None));
    // Nothing written since b1 was lost by the failures in between.
    env.rt.block_on(restore_matches(
        &env.sink,
        &dom.disk_id("vda"),
        "b4",
        &reference,
    ));
    assert_eq!(dom.checkpoints(), vec!["cbt-b4".to_string()]);
    scratch_is_empty(env.scratch.path());
}

/// Defect 19: once every manifest is committed the backup exists, whatever happens to
/// libvirt's job after that. The domain is destroyed at the commit (the observer's
/// `Committing` event comes after the last manifest is written and before the job is ended),
/// so ending libvirt's job fails: the job must still succeed, say what failed, and the
/// backup must restore exactly.
#[test]
fn a_domain_lost_after_the_commit_leaves_a_restorable_backup_and_a_warning() {
    let _g = serial();
    let mut r = rng(seed("lost_after_commit"));
    let dom = Dom::bare(
        "lostcommit",
        &[Disk {
            target: "vda",
            format: "qcow2",
            size: 64 * MIB,
        }],
    );
    let env = Env::new();
    dom.scatter("vda", 64 * MIB, 8, &mut r);
    let reference = dom.reference("vda", "b1");
    let name = dom.name.clone();
    let destroyed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = destroyed.clone();
    let mut lj = job(&dom, "b1", env.scratch.path());
    lj.observer = Some(job::Observer(std::sync::Arc::new(move |e| {
        if let job::JobEvent::Phase {
            phase: job::Phase::Committing,
        } = e
        {
            virsh(&["destroy", &name]);
            d2.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    })));
    let res = env
        .rt
        .block_on(job::backup_libvirt(
            &env.src,
            &env.sink,
            &lj,
            &BackupOptions::default(),
        ))
        .expect("a committed backup is a successful job");
    assert!(destroyed.load(std::sync::atomic::Ordering::SeqCst));
    assert!(
        res.warnings
            .iter()
            .any(|w| w.contains("the backup is committed, but ending libvirt's backup job failed")),
        "no warning about the failed end: {:?}",
        res.warnings
    );
    assert_eq!(res.disks.len(), 1);
    env.rt.block_on(restore_matches(
        &env.sink,
        &dom.disk_id("vda"),
        "b1",
        &reference,
    ));
    let refs: Vec<&Manifest> = res.disks.iter().map(|d| &d.manifest).collect();
    env.rt.block_on(assert_sink_holds_only(&env.sink, &refs));
    scratch_is_empty(env.scratch.path());
}

#[test]
fn checkpoints_coexist_with_virsh_and_virtnbdbackup() {
    let _g = serial();
    require("virtnbdbackup");
    let mut r = rng(seed("interop"));
    let dom = Dom::bare(
        "interop",
        &[Disk {
            target: "vda",
            format: "qcow2",
            size: 64 * MIB,
        }],
    );
    let env = Env::new();
    let vnb = |level: &str, out: &Path| {
        Command::new("virtnbdbackup")
            .args(["-d", &dom.name, "-l", level, "-o"])
            .arg(out)
            .output()
            .expect("run virtnbdbackup")
    };
    // A host that used virtnbdbackup: its checkpoints stay untouched by ours.
    dom.scatter("vda", 64 * MIB, 6, &mut r);
    let o = vnb("full", &dom.path("vnb-full"));
    assert!(
        o.status.success(),
        "virtnbdbackup full: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let theirs: Vec<String> = dom.checkpoints();
    assert!(!theirs.is_empty());
    for id in ["b1", "b2"] {
        dom.scatter("vda", 64 * MIB, 4, &mut r);
        let reference = dom.reference("vda", id);
        let res = env
            .backup(&dom, id)
            .expect("backup next to virtnbdbackup's checkpoints");
        if id == "b2" {
            assert_eq!(level(&res, &dom, "vda"), (Level::Incremental, None));
        }
        env.rt.block_on(restore_matches(
            &env.sink,
            &dom.disk_id("vda"),
            id,
            &reference,
        ));
    }
    let now = dom.checkpoints();
    for t in &theirs {
        assert!(
            now.contains(t),
            "virtnbdbackup's checkpoint {t} is gone: {now:?}"
        );
    }
    assert!(
        now.contains(&"cbt-b2".to_string()),
        "virsh does not list ours: {now:?}"
    );
    // virtnbdbackup's checkpoint-free copy runs beside ours; its chain levels refuse foreign
    // checkpoints by design, so `cbtctl release` hands the domain back.
    let o = vnb("copy", &dom.path("vnb-copy"));
    assert!(
        o.status.success(),
        "virtnbdbackup copy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let gone = env
        .src
        .domain(&dom.name)
        .expect("domain")
        .release()
        .expect("release");
    assert_eq!(gone, vec!["cbt-b2".to_string()]);
    let o = vnb("full", &dom.path("vnb-full2"));
    assert!(
        o.status.success(),
        "virtnbdbackup full after release: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // And we take over again with a full (our checkpoint is gone).
    dom.scatter("vda", 64 * MIB, 2, &mut r);
    let reference = dom.reference("vda", "b3");
    let res = env.backup(&dom, "b3").expect("b3");
    assert_eq!(
        level(&res, &dom, "vda"),
        (Level::Full, Some(FullReason::CheckpointMissing))
    );
    env.rt.block_on(restore_matches(
        &env.sink,
        &dom.disk_id("vda"),
        "b3",
        &reference,
    ));
}

#[test]
fn real_guest_writing_continuously_quiesced_and_exact() {
    let _g = serial();
    let dom = guest("guest", "");
    let env = Env::new();

    // Application-consistent full: the agent's freeze hook runs, then its thaw hook.
    let mut j = job(&dom, "b1", env.scratch.path());
    j.quiesce = Some(Duration::from_secs(10));
    let c0 = counter(&dom);
    let res = env
        .rt
        .block_on(job::backup_libvirt(
            &env.src,
            &env.sink,
            &j,
            &BackupOptions::default(),
        ))
        .expect("quiesced full");
    assert_eq!(res.quiesce.consistency, Some(Consistency::Application));
    let frozen = res.quiesce.freeze_ms.expect("freeze duration reported");
    assert!(frozen < 10_000, "froze {frozen} ms");
    assert_eq!(manifest(&res, &dom, "vda").freeze_ms, Some(frozen));
    assert_eq!(
        manifest(&res, &dom, "vda").consistency,
        Consistency::Application
    );
    assert_eq!(console_count(&dom, "FSFREEZE-HOOK freeze"), 1);
    assert_eq!(console_count(&dom, "FSFREEZE-HOOK thaw"), 1);
    let report = env
        .rt
        .block_on(engine::verify_chain(&env.sink, &dom.disk_id("vda"), "b1"))
        .expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    eprintln!(
        "quiesced full: frozen {frozen} ms, guest wrote {} blocks meanwhile",
        counter(&dom) - c0
    );

    // Incrementals while the guest writes on. The reference is the disk at the point in
    // time: the test (never the backup) suspends the guest, copies the disk, begins the
    // backup, and resumes the guest before the copy runs.
    let d = env.src.domain(&dom.name).expect("domain");
    let mut parent = res.disks[0].manifest.clone();
    for (i, id) in ["b2", "b3", "b4"].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(500 + 300 * i as u64));
        virsh(&["suspend", &dom.name]);
        let reference = dom.reference("vda", id);
        let session = begin_incremental(
            &d,
            id,
            parent.checkpoint.as_deref().expect("checkpoint"),
            env.scratch.path(),
        );
        virsh(&["resume", &dom.name]);
        let at_resume = counter(&dom);
        std::thread::sleep(Duration::from_millis(400)); // let the guest overwrite some blocks
        let m = env
            .rt
            .block_on(copy_incremental(
                &env.sink,
                &dom.disk_id("vda"),
                &session,
                id,
                &parent,
                None,
            ))
            .expect("copy");
        let after_copy = counter(&dom);
        lvs::end(&d, session, true, &BTreeSet::new()).expect("end");
        assert!(
            after_copy > at_resume,
            "the guest did not write during the copy ({at_resume} → {after_copy})"
        );
        assert!(m.stats.bytes_scanned > 0, "no changed blocks in {id}");
        env.rt.block_on(restore_matches(
            &env.sink,
            &dom.disk_id("vda"),
            id,
            &reference,
        ));
        eprintln!(
            "{id}: {} changed bytes, guest wrote {} blocks during the copy",
            m.stats.bytes_scanned,
            after_copy - at_resume
        );
        parent = m;
    }
    assert_eq!(dom.checkpoints(), vec!["cbt-b4".to_string()]);
    scratch_is_empty(env.scratch.path());
}

#[test]
fn a_hung_guest_agent_is_thawed_at_the_deadline_and_the_backup_goes_on() {
    let _g = serial();
    let dom = guest("hang", "cbt.hang_freeze=1");
    let env = Env::new();
    let mut j = job(&dom, "b1", env.scratch.path());
    j.quiesce = Some(Duration::from_secs(3));
    let t = Instant::now();
    let res = env
        .rt
        .block_on(job::backup_libvirt(
            &env.src,
            &env.sink,
            &j,
            &BackupOptions::default(),
        ))
        .expect("backup despite the hung agent");
    let took = t.elapsed();
    assert_eq!(res.quiesce.consistency, Some(Consistency::Crash));
    let w = res.quiesce.warning.clone().expect("a warning");
    assert!(w.contains("crash-consistent"), "{w}");
    assert_eq!(manifest(&res, &dom, "vda").warnings, vec![w]);
    assert_eq!(
        console_count(&dom, "FSFREEZE-HOOK freeze"),
        1,
        "the agent was not asked to freeze"
    );
    assert!(
        took < Duration::from_secs(30),
        "hung agent held the backup for {took:?}"
    );
    // The guest was never stopped: it writes on.
    let c = counter(&dom);
    let t = Instant::now();
    while counter(&dom) <= c {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the guest stopped writing"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = env
        .rt
        .block_on(engine::verify_chain(&env.sink, &dom.disk_id("vda"), "b1"))
        .expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(dom.checkpoints(), vec!["cbt-b1".to_string()]);
}

/// An error and its causes, as one line.
/// QEMU's user and group as libvirt runs it on this host (Debian's default; the test host's
/// qemu.conf does not set them).
fn qemu_ids() -> (u32, u32) {
    user_ids("libvirt-qemu").expect("user libvirt-qemu (package libvirt-daemon-system)")
}

#[test]
fn scratch_belongs_to_qemu_and_planted_paths_are_refused() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let _g = serial();
    let dom = Dom::bare(
        "scratch",
        &[Disk {
            target: "vda",
            format: "qcow2",
            size: 64 * MIB,
        }],
    );
    let env = Env::new();
    let (quid, qgid) = qemu_ids();
    let (luid, lgid) = local_user("cbt-test-user");
    let domain_root = env.scratch.path().join(dom.uuid());

    // A running backup: its directory is QEMU's and private, every level above is closed to
    // other users, and the socket QEMU listens on is QEMU's.
    let d = env.src.domain(&dom.name).expect("domain");
    let session = lvs::begin(
        &d,
        lvs::BeginRequest {
            backup_id: "b1".parse().expect("valid backup id"),
            disks: vec![(
                "vda".into(),
                libcbt::source::qemu::Decision {
                    level: Level::Full,
                    since: None,
                    reason: Some(FullReason::FirstBackup),
                },
            )],
            also_tracked: vec![],
            untracked: vec![],
            scratch_root: domain_root.clone(),
            quiesce: None,
            started_paused: false,
        },
    )
    .expect("begin");
    let dir = session.scratch_dir().to_path_buf();
    assert_eq!(dir, domain_root.join("b1"));
    let md = std::fs::symlink_metadata(&dir).expect("scratch dir");
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777),
        (quid, qgid, 0o700),
        "scratch dir of a running backup"
    );
    let md = std::fs::symlink_metadata(&domain_root).expect("domain level");
    assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (0, qgid, 0o750));
    let md = std::fs::symlink_metadata(env.scratch.path()).expect("root");
    assert_eq!(md.mode() & 0o022, 0, "scratch root writable by others");
    let sock = std::fs::symlink_metadata(dir.join("nbd.sock")).expect("socket");
    assert!(sock.file_type().is_socket());
    assert_eq!(sock.uid(), quid, "the NBD socket is not QEMU's");
    lvs::end(&d, session, false, &BTreeSet::new()).expect("end");
    assert!(dom.checkpoints().is_empty());

    let decoy = shared_dir();
    let untouched = |what: &str| {
        assert!(
            walk(decoy.path()).is_empty(),
            "{what}: something was written through the plant"
        );
        assert!(
            dom.checkpoints().is_empty(),
            "{what}: a checkpoint was left"
        );
    };
    // A symlink planted where the domain's scratch level goes: refused, not followed.
    std::fs::remove_dir(&domain_root).expect("rmdir");
    std::os::unix::fs::symlink(decoy.path(), &domain_root).expect("symlink");
    let e = env
        .backup(&dom, "b2")
        .expect_err("backup through a symlink");
    assert!(
        chain(&e).contains("refusing scratch directory"),
        "{}",
        chain(&e)
    );
    untouched("symlink");
    let e = lvs::begin(
        &d,
        lvs::BeginRequest {
            backup_id: "b2".parse().expect("valid backup id"),
            disks: vec![(
                "vda".into(),
                libcbt::source::qemu::Decision {
                    level: Level::Full,
                    since: None,
                    reason: Some(FullReason::FirstBackup),
                },
            )],
            also_tracked: vec![],
            untracked: vec![],
            scratch_root: domain_root.clone(),
            quiesce: None,
            started_paused: false,
        },
    )
    .expect_err("begin through a symlink");
    assert!(
        matches!(e, lvs::LibvirtError::UnsafeScratch { .. }),
        "{e:?}"
    );
    untouched("symlink, begin");
    assert!(std::fs::symlink_metadata(&domain_root)
        .expect("link")
        .file_type()
        .is_symlink());

    // A directory of another local user there: refused, left as it was.
    std::fs::remove_file(&domain_root).expect("rm link");
    std::fs::create_dir(&domain_root).expect("mkdir");
    std::fs::write(domain_root.join("theirs"), b"x").expect("their file");
    std::fs::create_dir(domain_root.join("b3")).expect("their dir");
    for p in [
        &domain_root,
        &domain_root.join("theirs"),
        &domain_root.join("b3"),
    ] {
        std::os::unix::fs::chown(p, Some(luid), Some(lgid)).expect("chown");
    }
    let e = env
        .backup(&dom, "b3")
        .expect_err("backup into a foreign directory");
    assert!(chain(&e).contains("not by us"), "{}", chain(&e));
    untouched("foreign directory");
    let md = std::fs::symlink_metadata(&domain_root).expect("still there");
    assert_eq!(
        (md.uid(), md.gid()),
        (luid, lgid),
        "its ownership was changed"
    );
    assert!(domain_root.join("theirs").exists() && domain_root.join("b3").exists());

    // Inside our own level, a directory of theirs is not cleaned away, and a backup with its
    // name is refused.
    std::fs::remove_dir_all(&domain_root).expect("rm");
    std::fs::create_dir(&domain_root).expect("mkdir");
    std::fs::create_dir(domain_root.join("b4")).expect("their dir");
    std::os::unix::fs::chown(domain_root.join("b4"), Some(luid), Some(lgid)).expect("chown");
    let e = env
        .backup(&dom, "b4")
        .expect_err("backup into a planted backup level");
    assert!(chain(&e).contains("exists already"), "{}", chain(&e));
    untouched("planted backup level");
    let md = std::fs::symlink_metadata(domain_root.join("b4")).expect("still there");
    assert_eq!(md.uid(), luid);

    // Without the plants, backups work again.
    std::fs::remove_dir(domain_root.join("b4")).expect("rm");
    env.backup(&dom, "b5")
        .expect("backup after the plants are gone");
    scratch_is_empty(env.scratch.path());
}

#[test]
fn a_socket_of_another_local_user_is_not_qemus() {
    let (luid, lgid) = local_user("cbt-test-user");
    let (quid, qgid) = qemu_ids();
    let qemu = lvs::QemuIdentity::of_host().expect("QEMU's identity");
    assert_eq!(
        qemu,
        lvs::QemuIdentity {
            uid: quid,
            gid: qgid
        }
    );
    let dir = shared_dir();
    let s = dir.path().join("nbd.sock");
    // A real socket, handed to the local user.
    let _l = std::os::unix::net::UnixListener::bind(&s).expect("bind");
    std::os::unix::fs::chown(&s, Some(luid), Some(lgid)).expect("chown");
    let e = lvs::check_socket(&s, qemu).expect_err("a local user's socket passed");
    assert!(e.to_string().contains(&format!("uid {luid}")), "{e}");
    // The same socket once it is QEMU's passes.
    std::os::unix::fs::chown(&s, Some(quid), Some(qgid)).expect("chown");
    lvs::check_socket(&s, qemu).expect("QEMU's socket");
    // A symlink to it does not.
    let l = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&s, &l).expect("symlink");
    std::os::unix::fs::lchown(&l, Some(quid), Some(qgid)).expect("lchown");
    assert!(lvs::check_socket(&l, qemu).is_err());
}

#[test]
fn a_staging_copy_of_a_real_guest_defines_boots_and_records_its_tenant() {
    use libcbt::sink::Sink;
    use libcbt::source::libvirt::xml;
    let _g = serial();
    let dom = guest("stage", "");
    let env = Env::new();
    env.backup(&dom, "b1").expect("backup");
    let files = shared_dir();
    let f = files.path().join("vda.qcow2");
    env.rt
        .block_on(engine::restore(
            &env.sink,
            &dom.disk_id("vda"),
            "b1",
            &engine::RestoreTarget::Qcow2(f.clone()),
            None,
        ))
        .expect("restore");
    let saved = env
        .rt
        .block_on(
            env.sink
                .get(&job::domain_xml_name(&dom.uuid(), "b1"), 16 << 20),
        )
        .expect("saved domain XML");
    let saved = String::from_utf8_lossy(&saved).into_owned();
    assert!(saved.contains("console.log") && saved.contains("<kernel>"));
    let record = lvs::StagingMeta {
        tenant: "p-a".into(),
        source: dom.uuid(),
        backup: "b1".into(),
    };
    let name = format!("{}-copy", dom.name);
    let copy = hostd::inventory::staging_domain_xml(&saved, &name, &[("vda".into(), f)], &record)
        .expect("staging XML");
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            for a in [&["destroy", &self.0][..], &["undefine", &self.0][..]] {
                let _ = Command::new("virsh").args(["-c", URI]).args(a).output();
            }
        }
    }
    let _gone = Gone(name.clone());
    let x = files.path().join("copy.xml");
    std::fs::write(&x, &copy).expect("write");
    virsh(&["define", &x.display().to_string()]);
    virsh(&["start", &name]);
    // Booted: the guest's agent answers on the copy's own channel.
    let t = Instant::now();
    while !virsh_ok(&["qemu-agent-command", &name, r#"{"execute":"guest-ping"}"#]) {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the staging copy's guest agent did not answer within 120 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let live = virsh(&["dumpxml", &name]);
    assert!(
        !live.contains("console.log"),
        "shares the original's console log"
    );
    let desc = xml::domain(&live).expect("parses");
    assert_eq!(desc.staging, Some(record), "libvirt kept our record");
    assert_ne!(desc.uuid, dom.uuid());
    // The original runs on, untouched.
    assert!(virsh(&["domstate", &dom.name]).contains("running"));
}
