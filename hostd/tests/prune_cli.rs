//! `cbtctl prune` offline on a sink directory, with backups made by real jobs against
//! qemu-storage-daemon: the dry run prints the plan and deletes nothing, the real run deletes
//! what the plan let go (a whole chain), and what stays still verifies; `cbtctl gc` then takes
//! an old unreferenced object and leaves a young one.

mod support;

use std::path::Path;
use std::process::Command;

use libcbt::engine::{catalog, BackupOptions};
use libcbt::job;
use libcbt::sink::local::LocalSink;
use libcbt::source::qemu::Requested;
use support::common::lab::{guest_writes, Lab};
use support::common::{rng, seed};

type Refs = std::collections::BTreeMap<(String, String), std::path::PathBuf>;

/// Every backup on the sink restores exactly (its reference in `refs`, by disk and id) and
/// verifies clean (`what` names the moment in failures); returns their manifests.
async fn all_restore(sink: &LocalSink, refs: &Refs, what: &str) -> Vec<libcbt::format::Manifest> {
    let mut all = Vec::new();
    for d in catalog::list_disks(sink).await.expect("disks") {
        for m in catalog::list_backups(sink, &d).await.expect("list") {
            support::common::lab::restore_matches(
                sink,
                &d,
                &m.backup_id,
                &refs[&(d.clone(), m.backup_id.clone())],
            )
            .await;
            let v = libcbt::engine::verify_chain(sink, &d, &m.backup_id)
                .await
                .expect("verify");
            assert!(v.ok(), "after {what}: {v:?}");
            all.push(m);
        }
    }
    all
}

/// Runs cbtctl with `args`; returns its stdout, failing the test on a non-zero exit.
fn cbtctl(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cbtctl"))
        .args(args)
        .output()
        .expect("run cbtctl");
    assert!(
        out.status.success(),
        "cbtctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn ids(sink: &Path) -> Vec<String> {
    let out = cbtctl(&["--json", "list", "--sink", &sink.display().to_string()]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let mut ids: Vec<String> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|m| m["backup_id"].as_str().expect("id").to_string())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_plans_then_deletes_whole_chains_and_gc_takes_old_leftovers() {
    let mut rng = rng(seed("prune_cli"));
    let lab = Lab::new(&[("d0", "qcow2"), ("d1", "qcow2")], 32 << 20).await;
    let dir = lab.path("sink");
    let sink = LocalSink::open(&dir).expect("sink");
    let specs = lab.specs("inst1.");
    let opts = BackupOptions {
        chunk_size: 256 << 10,
        segment_size: 4 << 20,
        ..Default::default()
    };
    for (id, req) in [
        ("c0", Requested::Auto),
        ("c1", Requested::Auto),
        ("c2", Requested::Full),
        ("c3", Requested::Auto),
        ("c4", Requested::Auto),
    ] {
        for l in &lab.live {
            guest_writes(l, &mut rng, 10).await;
        }
        job::backup_qemu(
            &lab.source,
            &sink,
            &id.parse().expect("id"),
            &specs,
            req,
            &opts,
        )
        .await
        .expect("backup");
    }
    // What a libvirt job saves beside the disks (domain XML, job record), for two backups.
    use libcbt::format::layout;
    use libcbt::sink::Sink;
    for id in ["c0", "c3"] {
        for name in [
            layout::domain_xml_name("inst1", id),
            layout::job_record_name("inst1", id),
        ] {
            sink.put(&name, b"<domain/>".to_vec()).await.expect("put");
        }
    }
    let s = dir.display().to_string();
    let keep = ["--keep-last", "2"];
    let plan_args = |dry: bool| {
        let mut a = vec!["--json", "prune", "--sink", &s, "--instance", "inst1"];
        a.extend(keep);
        if dry {
            a.push("--dry-run");
        }
        a
    };
    let out: serde_json::Value = serde_json::from_str(&cbtctl(&plan_args(true))).expect("json");
    let plan: Vec<(String, serde_json::Value)> = out["plan"]
        .as_array()
        .expect("plan")
        .iter()
        .map(|e| (e["id"].as_str().expect("id").to_string(), e["hold"].clone()))
        .collect();
    assert_eq!(
        plan,
        [
            (
                "c4".into(),
                serde_json::json!({"why": "kept", "by": "last"})
            ),
            (
                "c3".into(),
                serde_json::json!({"why": "kept", "by": "last"})
            ),
            ("c2".into(), serde_json::Value::Null),
            ("c1".into(), serde_json::Value::Null),
            ("c0".into(), serde_json::Value::Null),
        ],
        "{out}"
    );
    assert_eq!(out["disks"], serde_json::json!(["inst1.d0", "inst1.d1"]));
    assert_eq!(
        ids(&dir),
        ["c0", "c1", "c2", "c3", "c4"],
        "a dry run deletes nothing"
    );

    let sizes = || -> std::collections::BTreeMap<String, u64> {
        let mut m = std::collections::BTreeMap::new();
        let mut dirs = vec![dir.join("disks")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
                let md = e.metadata().expect("metadata");
                if md.is_dir() {
                    dirs.push(e.path());
                } else {
                    let name = e
                        .path()
                        .strip_prefix(&dir)
                        .expect("under")
                        .display()
                        .to_string();
                    m.insert(name, md.len());
                }
            }
        }
        m
    };
    let before = sizes();
    let out: serde_json::Value = serde_json::from_str(&cbtctl(&plan_args(false))).expect("json");
    // The bytes reclaimed are those of the doomed backups' objects that went (the kept c3's
    // old generation, replaced by its fold, is not reclaimed space).
    let after = sizes();
    let gone: u64 = before
        .iter()
        .filter(|(n, _)| !after.contains_key(*n) && !n.contains("/backups/c3."))
        .map(|(_, l)| l)
        .sum();
    assert!(gone > 0);
    assert_eq!(out["bytes_reclaimed"], serde_json::json!(gone), "{out}");
    // The full c2 is folded into c3 (which becomes a synthetic full); c1 ← c0 goes whole.
    assert_eq!(
        out["plan"][2]["folds_into"],
        serde_json::json!(["c3"]),
        "{out}"
    );
    assert_eq!(
        out["deleted"],
        serde_json::json!(["c2", "c1", "c0"]),
        "{out}"
    );
    assert_eq!(out["folds"], serde_json::json!(2), "one per disk: {out}");
    assert_eq!(ids(&dir), ["c3", "c4"]);
    let records: Vec<String> = sink
        .list("domains/")
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.name)
        .collect();
    let mut want = vec![
        layout::domain_xml_name("inst1", "c3"),
        layout::job_record_name("inst1", "c3"),
    ];
    want.sort();
    assert_eq!(
        records, want,
        "the pruned backup's records go, the kept one's stay"
    );
    for d in ["inst1.d0", "inst1.d1"] {
        cbtctl(&["verify", "--sink", &s, "--disk", d, "--backup", "c4"]);
        // Nothing stray: the orphan listing of each disk is empty.
        assert!(
            catalog::orphans(&sink, d)
                .await
                .expect("orphans")
                .is_empty(),
            "{d}"
        );
    }
    // Left by an interrupted job: an unreferenced segment two days old goes, a fresh one
    // (a job may be writing it) stays, and so does everything committed.
    let seg = |n: u128| layout::segment_name("inst1.d0", n);
    for n in [1, 2] {
        sink.put(&seg(n), vec![7u8; 100]).await.expect("put");
    }
    let old = dir.join(seg(1));
    let touched = Command::new("touch")
        .args(["-d", "2 days ago"])
        .arg(&old)
        .status()
        .expect("touch");
    assert!(touched.success());
    assert!(
        !Command::new(env!("CARGO_BIN_EXE_cbtctl"))
            .args(["gc", "--sink", &s, "--grace-secs", "60"])
            .status()
            .expect("run")
            .success(),
        "a grace period shorter than the marker renewals is refused"
    );
    let out: serde_json::Value =
        serde_json::from_str(&cbtctl(&["--json", "gc", "--sink", &s])).expect("json");
    assert_eq!(out["objects"], serde_json::json!([seg(1)]), "{out}");
    assert!(!old.exists());
    assert!(dir.join(seg(2)).exists());
    for d in ["inst1.d0", "inst1.d1"] {
        cbtctl(&["verify", "--sink", &s, "--disk", d, "--backup", "c4"]);
    }
    // A policy without rules keeps everything, and says so.
    let out = Command::new(env!("CARGO_BIN_EXE_cbtctl"))
        .args([
            "prune", "--sink", &s, "--disk", "inst1.d0", "--disk", "inst1.d1",
        ])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("everything stays"));
    assert_eq!(ids(&dir), ["c3", "c4"]);
}

/// Prune in one process (cbtctl, instance A) and garbage collection in another (this test,
/// a grace period of 2 s, every 20 ms) while this process backs up instance B to the same
/// sink over and over: every backup of B restores exactly and verifies, A's survivors too,
/// every prune succeeds, and the sink holds exactly the committed backups afterwards. A
/// collection may give up when a prune deletes a manifest under it (it marks by manifests it
/// could not read): that is its designed refusal, and it must still run clean passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_and_gc_in_other_processes_never_break_backups_of_other_instances() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    let mut rng = rng(seed("prune_concurrent"));
    let (la, lb) = (
        Lab::new(&[("d0", "qcow2")], 32 << 20).await,
        Lab::new(&[("d0", "qcow2"), ("d1", "qcow2")], 32 << 20).await,
    );
    let dir = la.path("sink");
    let sink = LocalSink::open(&dir).expect("sink");
    let opts = BackupOptions {
        chunk_size: 256 << 10,
        segment_size: 1 << 20,
        marker_refresh: Duration::from_millis(100),
        ..Default::default()
    };
    let mut refs = Refs::new();
    let mut round = async |lab: &Lab,
                           prefix: &str,
                           id: &str,
                           req: Requested,
                           rng: &mut rand::rngs::SmallRng| {
        for l in &lab.live {
            guest_writes(l, rng, 8).await;
        }
        for (i, spec) in lab.specs(prefix).iter().enumerate() {
            let r = la.path(&format!("ref-{}-{id}.raw", spec.disk));
            lab.reference(i, &r);
            refs.insert((spec.disk.clone(), id.to_string()), r);
        }
        job::backup_qemu(
            &lab.source,
            &sink,
            &id.parse().expect("id"),
            &lab.specs(prefix),
            req,
            &opts,
        )
        .await
        .expect("backup");
    };
    // A: a0 ← a1 ← a2, a3 (full) ← a4 ← a5 ← a6.
    for (i, req) in [
        Requested::Auto,
        Requested::Auto,
        Requested::Auto,
        Requested::Full,
        Requested::Auto,
        Requested::Auto,
        Requested::Auto,
    ]
    .into_iter()
    .enumerate()
    {
        round(&la, "ia.", &format!("a{i}"), req, &mut rng).await;
    }
    // The other process: prunes A a step at a time, each with folds and deletions.
    let s = dir.display().to_string();
    let script = (2..=6)
        .rev()
        .map(|k| {
            format!(
                "{cbtctl} --json prune --sink {s} --instance ia --keep-last {k} >> {s}.prunes || exit 1; sleep 0.2; ",
                cbtctl = env!("CARGO_BIN_EXE_cbtctl")
            )
        })
        .collect::<String>();
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .spawn()
        .expect("spawn");
    // The collector, here, all along.
    let done = Arc::new(AtomicBool::new(false));
    let (clean, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let collector = {
        let (sink, done, clean, refused) =
            (sink.clone(), done.clone(), clean.clone(), refused.clone());
        tokio::spawn(async move {
            let mut deleted = Vec::new();
            while !done.load(Ordering::SeqCst) {
                match catalog::collect_sink_garbage(&sink, Duration::from_secs(2)).await {
                    Ok(r) => {
                        deleted.extend(r.objects);
                        clean.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(libcbt::engine::EngineError::Sink(libcbt::sink::SinkError::NotFound {
                        ..
                    })) => {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => panic!("gc: {e:?}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            deleted
        })
    };
    // B, here, while A is pruned: at least three backups, and on until the pruner is done.
    let mut n = 0;
    let status = loop {
        round(&lb, "ib.", &format!("b{n}"), Requested::Auto, &mut rng).await;
        n += 1;
        if n >= 3 {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
        }
    };
    done.store(true, Ordering::SeqCst);
    let deleted = collector.await.expect("collector");
    assert!(status.success(), "a prune failed: {status}");
    assert!(clean.load(Ordering::SeqCst) > 3, "the collector hardly ran");
    eprintln!(
        "{n} backups of B, {} clean collections, {} refused",
        clean.load(Ordering::SeqCst),
        refused.load(Ordering::SeqCst)
    );
    // The collector took nothing anyone references (it deletes only orphans; a prune
    // deletes what it doomed itself).
    assert!(deleted.is_empty(), "collected: {deleted:?}");
    let prunes = std::fs::read_to_string(format!("{s}.prunes")).expect("prune output");
    assert_eq!(prunes.lines().count(), 5, "{prunes}");
    let all = all_restore(&sink, &refs, "the prunes").await;
    let ids = |prefix: &str| -> Vec<String> {
        let mut v: Vec<String> = all
            .iter()
            .filter(|m| m.disk.starts_with(prefix))
            .map(|m| m.backup_id.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    };
    assert_eq!(ids("ia."), ["a5", "a6"]);
    assert_eq!(ids("ib.").len(), n);
    support::common::lab::assert_sink_holds_only(&sink, &all.iter().collect::<Vec<_>>()).await;
}

/// Crash safety with real processes: `cbtctl prune` (down from keep-last 6 to 2) and
/// `cbtctl gc --compact --threshold 1` (which rewrites every segment) are each killed with
/// SIGKILL at a random moment after each attempt's first change to the sink, up to four times,
/// before a run is let finish. After every kill,
/// every backup the sink lists restores exactly (`qemu-img compare` with the reference taken
/// at its point in time) and verifies clean; in the end the backups are those the last prune
/// keeps, and after a collection the sink holds exactly their objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_and_compaction_killed_at_random_moments_lose_nothing() {
    use rand::Rng;
    use std::os::unix::process::ExitStatusExt;
    use std::time::Duration;
    let mut rng = rng(seed("prune_kill9"));
    let lab = Lab::new(&[("d0", "qcow2"), ("d1", "qcow2")], 32 << 20).await;
    let dir = lab.path("sink");
    let sink = LocalSink::open(&dir).expect("sink");
    let opts = BackupOptions {
        chunk_size: 256 << 10,
        segment_size: 1 << 20,
        ..Default::default()
    };
    let mut refs = Refs::new();
    // k0 ← k1 ← k2, k3 (full) ← k4 ← k5 ← k6.
    for i in 0..7 {
        for l in &lab.live {
            guest_writes(l, &mut rng, 10).await;
        }
        let id = format!("k{i}");
        for (n, spec) in lab.specs("ik.").iter().enumerate() {
            let r = lab.path(&format!("ref-{}-{id}.raw", spec.disk));
            lab.reference(n, &r);
            refs.insert((spec.disk.clone(), id.clone()), r);
        }
        let req = if i == 3 {
            Requested::Full
        } else {
            Requested::Auto
        };
        job::backup_qemu(
            &lab.source,
            &sink,
            &id.parse().expect("id"),
            &lab.specs("ik."),
            req,
            &opts,
        )
        .await
        .expect("backup");
    }
    let s = dir.display().to_string();
    let listing = || -> Vec<String> {
        let mut v: Vec<String> = walk(&dir);
        v.sort();
        v
    };
    let mut runs: Vec<Vec<String>> = (2..=6)
        .rev()
        .map(|k| {
            vec![
                "prune".into(),
                "--sink".into(),
                s.clone(),
                "--instance".into(),
                "ik".into(),
                "--keep-last".into(),
                k.to_string(),
            ]
        })
        .collect();
    runs.push(
        ["gc", "--sink", &s, "--compact", "--threshold", "1"]
            .map(String::from)
            .to_vec(),
    );
    let mut kills = 0;
    for args in &runs {
        // Up to four kills, then a run to the end.
        for attempt in 0..5 {
            let before = listing();
            let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cbtctl"))
                .args(args)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn cbtctl");
            // A kill lands a random moment after the run's first change to the sink.
            let status = loop {
                if let Some(st) = child.try_wait().expect("wait") {
                    break st;
                }
                if attempt < 4 && listing() != before {
                    let ms = rng.gen_range(0..12);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let _ = child.start_kill();
                    break child.wait().await.expect("wait");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            if status.signal() == Some(9) {
                kills += 1;
                all_restore(&sink, &refs, &format!("{args:?} killed")).await;
            } else {
                assert!(status.success(), "cbtctl {args:?}: {status}");
                break;
            }
        }
    }
    eprintln!("{kills} kills, each after the run had changed the sink");
    assert!(
        kills >= 3,
        "only {kills} kills landed before the runs ended"
    );
    catalog::collect_sink_garbage(&sink, Duration::ZERO)
        .await
        .expect("gc");
    let all = all_restore(&sink, &refs, "the last runs").await;
    let mut ids: Vec<String> = all.iter().map(|m| m.backup_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids, ["k5", "k6"]);
    support::common::lab::assert_sink_holds_only(&sink, &all.iter().collect::<Vec<_>>()).await;
}

/// Every file beneath `dir`, relative, with its size (what a kill may have changed).
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push(format!(
                    "{} {len}",
                    p.strip_prefix(dir).unwrap_or(&p).display()
                ));
            }
        }
    }
    out
}
