//! Backups of a running qemu-system-x86_64 (KVM when /dev/kvm is usable, else TCG; firmware
//! only, no guest OS): two virtio disks, qcow2 and raw; guest-like writes through the
//! monitor's qemu-io, also while each backup copies; every backup of both disks restored and
//! compared by `qemu-img compare` with a copy taken at its point in time.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::lab::restore_matches;
use common::*;
use libcbt::engine::{self, BackupOptions};
use libcbt::format::{Level, Manifest};
use libcbt::nbd::NbdUri;
use libcbt::qmp::Qmp;
use libcbt::sink::local::LocalSink;
use libcbt::source::qemu::{self, QemuSource, Requested};
use rand::rngs::SmallRng;
use rand::Rng;
use serde_json::json;

const SIZE: u64 = 64 << 20;
const DISKS: [(&str, &str, &str); 2] = [("vda", "qcow2", "vd0"), ("vdb", "raw", "vd1")];

struct Vm {
    _daemon: Daemon,
    qmp: Arc<Qmp>,
    source: QemuSource,
    random: std::path::PathBuf,
}

async fn start_vm(dir: &Path) -> Vm {
    let accel = if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        "kvm"
    } else {
        "tcg"
    };
    eprintln!("qemu-system-x86_64 -accel {accel}");
    let sock = dir.join("qmp.sock");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        accel,
        "-machine",
        "q35",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        "128",
    ])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", sock.display()));
    for (i, (node, format, dev)) in DISKS.iter().enumerate() {
        let image = dir.join(format!("{node}.{format}"));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(&image)
            .arg(SIZE.to_string()));
        cmd.arg("-blockdev")
            .arg(format!(
                "driver=file,node-name=file{i},filename={}",
                image.display()
            ))
            .arg("-blockdev")
            .arg(format!("driver={format},node-name={node},file=file{i}"))
            .arg("-device")
            .arg(format!("virtio-blk-pci,drive={node},id={dev}"));
    }
    // The monitor's qemu-io prints to QEMU's stdout.
    cmd.stdout(Stdio::null());
    let daemon = Daemon::start("qemu-system-x86_64", cmd, &sock);
    let qmp = Arc::new(Qmp::connect(&sock).await.expect("qmp"));
    let source = QemuSource::new(qmp.clone(), dir.join("work"))
        .await
        .expect("source");
    for (node, _, _) in DISKS {
        qmp.run("block-export-add", json!({"type": "nbd", "id": format!("ref-{node}"), "node-name": node, "name": format!("ref-{node}"), "writable": false}))
            .await
            .expect("reference export");
    }
    let random = dir.join("random.bin");
    let mut data = vec![0u8; 1 << 20];
    rng(7).fill(&mut data[..]);
    std::fs::write(&random, data).expect("random file");
    Vm {
        _daemon: daemon,
        qmp,
        source,
        random,
    }
}

/// Guest-like writes into disk `dev` through the monitor: random data, patterns, zeroes,
/// discards, in 4 KiB..1 MiB pieces.
async fn guest_io(vm: &Vm, dev: &str, rng: &mut SmallRng, n: usize) {
    for _ in 0..n {
        let len = rng.gen_range(1..=256u64) * 4096;
        let off = rng.gen_range(0..=(SIZE - len) / 4096) * 4096;
        let cmd = match rng.gen_range(0..6) {
            0 => format!("write -z {off} {len}"),
            1 => format!("discard {off} {len}"),
            2 => format!("write -P {} {off} {len}", rng.gen_range(1..=255)),
            _ => format!("write -s {} {off} {len}", vm.random.display()),
        };
        vm.qmp
            .run(
                "human-monitor-command",
                json!({"command-line": format!("qemu-io -d {dev}/virtio-backend \"{cmd}\"")}),
            )
            .await
            .expect("hmp qemu-io");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_vm_backups_of_two_formats_restore_exactly() {
    let seed = seed("running_vm");
    let mut rng = rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let vm = start_vm(dir.path()).await;
    let sink = LocalSink::open(dir.path().join("sink")).expect("sink");
    let mut chains: Vec<Vec<(Manifest, std::path::PathBuf)>> = vec![Vec::new(), Vec::new()];
    for round in 0..4 {
        for (_, _, dev) in DISKS {
            guest_io(&vm, dev, &mut rng, 12).await;
        }
        let id: libcbt::format::BackupId = format!("v{round}").parse().expect("valid backup id");
        let mut plan = Vec::new();
        for (i, (node, _, _)) in DISKS.iter().enumerate() {
            let info = vm.source.node(node).await.expect("node");
            let parent = chains[i].last().map(|(m, _)| m.clone());
            let d = qemu::decide(
                if round == 2 {
                    Requested::Full
                } else {
                    Requested::Auto
                },
                parent.as_ref(),
                &info,
            );
            // Only this test writes, through the monitor: the copy equals the point in time.
            let r = dir.path().join(format!("ref-{id}-{node}.raw"));
            let uri = NbdUri::unix(vm.source.nbd_socket(), format!("ref-{node}")).to_string();
            run(Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw", &uri])
                .arg(&r));
            plan.push((d, parent, r));
        }
        let session = vm
            .source
            .begin(
                &id,
                &DISKS
                    .iter()
                    .zip(&plan)
                    .map(|((node, _, _), (d, _, _))| (node.to_string(), d.since.clone()))
                    .collect::<Vec<_>>(),
            )
            .await
            .expect("begin");
        let copies = async {
            let mut out = Vec::new();
            for (sd, (d, parent, _)) in session.disks.iter().zip(&plan) {
                let scan = engine::scan_export(&sd.uri, sd.dirty_context.as_deref())
                    .await
                    .expect("scan");
                let job = sd.job(&format!("vm-{}", sd.node), &id, d, parent.as_ref());
                let opts = BackupOptions {
                    chunk_size: 256 << 10,
                    ..Default::default()
                };
                out.push(
                    engine::backup_disk(
                        &sink,
                        &job,
                        &scan,
                        &qemu::Fleece {
                            source: &vm.source,
                            disk: sd,
                        },
                        &opts,
                        None,
                    )
                    .await
                    .expect("backup"),
                );
            }
            out
        };
        // The guest keeps writing while the copies run.
        let mut wrng = rand::SeedableRng::seed_from_u64(seed ^ round);
        let writes = async {
            for (_, _, dev) in DISKS {
                guest_io(&vm, dev, &mut wrng, 10).await;
            }
        };
        let (manifests, ()) = tokio::join!(copies, writes);
        vm.source.end(session, true).await.expect("end");
        for (i, m) in manifests.into_iter().enumerate() {
            let expect = if round == 0 || round == 2 {
                Level::Full
            } else {
                Level::Incremental
            };
            assert_eq!(m.level, expect, "{} round {round} (seed {seed})", m.disk);
            if m.level == Level::Incremental {
                assert!(
                    m.stats.bytes_scanned > 0,
                    "the guest's writes must show up as dirty"
                );
            }
            chains[i].push((m, plan[i].2.clone()));
        }
    }
    for chain in &chains {
        for (m, r) in chain {
            restore_matches(&sink, &m.disk, &m.backup_id, r).await;
        }
    }
    // The VM ran throughout; only the last backup's bitmaps are left; no temporary node.
    let status: serde_json::Value = vm
        .qmp
        .execute("query-status", serde_json::Value::Null)
        .await
        .expect("status");
    assert_eq!(status["status"], "running");
    let nodes = vm.source.nodes().await.expect("nodes");
    assert!(nodes.iter().all(|n| !n.node.starts_with("cbt-")));
    for (node, _, _) in DISKS {
        let names: Vec<_> = nodes
            .iter()
            .find(|n| n.node == node)
            .expect("node")
            .bitmaps
            .iter()
            .map(|b| b.name.clone())
            .collect();
        assert_eq!(names, vec!["cbt-v3".to_string()], "{node}");
    }
}
