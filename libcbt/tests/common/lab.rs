//! A qemu-storage-daemon "VM" with one or more disks, for backup tests. The QMP change source
//! owns QEMU's NBD server; a writable export of each live disk stands in for the guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use libcbt::nbd::{Client, ConnectOptions, NbdUri};
use libcbt::qmp::Qmp;
use libcbt::source::qemu::QemuSource;
use rand::rngs::SmallRng;
use rand::Rng;
use serde_json::json;

use super::{qcow2_create, require, run, Daemon};

/// One disk: block node name and image format (`qcow2` or `raw`).
#[derive(Debug, Clone)]
pub struct LabDisk {
    pub node: String,
    pub format: String,
    pub image: PathBuf,
}

pub struct Lab {
    pub dir: tempfile::TempDir,
    pub daemon: Daemon,
    pub source: QemuSource,
    /// A writable client of each live disk, in `disks` order.
    pub live: Vec<Client>,
    pub disks: Vec<LabDisk>,
    pub size: u64,
}

fn start_qsd(dir: &Path, disks: &[LabDisk]) -> Daemon {
    let sock = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--chardev")
        .arg(format!(
            "socket,id=m0,path={},server=on,wait=off",
            sock.display()
        ))
        .args(["--monitor", "chardev=m0"]);
    for (i, d) in disks.iter().enumerate() {
        cmd.arg("--blockdev").arg(format!(
            "driver=file,node-name=file{i},filename={}",
            d.image.display()
        ));
        cmd.arg("--blockdev").arg(format!(
            "driver={},node-name={},file=file{i}",
            d.format, d.node
        ));
    }
    Daemon::start("qemu-storage-daemon", cmd, &sock)
}

async fn attach(dir: &Path, daemon: &Daemon, disks: &[LabDisk]) -> (QemuSource, Vec<Client>) {
    let qmp = Arc::new(Qmp::connect(&daemon.socket).await.expect("qmp"));
    let source = QemuSource::new(qmp.clone(), dir.join("work"))
        .await
        .expect("source");
    let mut live = Vec::new();
    for d in disks {
        let name = format!("live-{}", d.node);
        qmp.run(
            "block-export-add",
            json!({"type": "nbd", "id": name, "node-name": d.node, "name": name, "writable": true}),
        )
        .await
        .expect("live export");
        let uri = NbdUri::unix(source.nbd_socket(), name.as_str()).to_string();
        live.push(
            Client::connect_with(
                &uri,
                &ConnectOptions {
                    connections: 1,
                    ..Default::default()
                },
            )
            .await
            .expect("live client"),
        );
    }
    (source, live)
}

impl Lab {
    /// A lab with `disks` given as (node, format), each of `size` bytes.
    pub async fn new(disks: &[(&str, &str)], size: u64) -> Lab {
        let dir = tempfile::tempdir().expect("tempdir");
        let disks: Vec<LabDisk> = disks
            .iter()
            .map(|(node, format)| {
                let image = dir.path().join(format!("{node}.{format}"));
                match *format {
                    "qcow2" => qcow2_create(&image, size, 65536),
                    _ => {
                        run(Command::new("qemu-img")
                            .args(["create", "-q", "-f", format])
                            .arg(&image)
                            .arg(size.to_string()));
                    }
                };
                LabDisk {
                    node: node.to_string(),
                    format: format.to_string(),
                    image,
                }
            })
            .collect();
        let daemon = start_qsd(dir.path(), &disks);
        let (source, live) = attach(dir.path(), &daemon, &disks).await;
        Lab {
            dir,
            daemon,
            source,
            live,
            disks,
            size,
        }
    }

    /// Replaces the QEMU process by a new one on the same images: cleanly (`quit`, bitmaps
    /// stored) or by SIGKILL.
    pub async fn restart(&mut self, clean: bool) {
        if clean {
            let _ = self.source.qmp().run("quit", serde_json::Value::Null).await;
            let _ = self.daemon.child.wait();
        } else {
            self.daemon.kill();
        }
        self.daemon = start_qsd(self.dir.path(), &self.disks);
        let (source, live) = attach(self.dir.path(), &self.daemon, &self.disks).await;
        self.source = source;
        self.live = live;
    }

    /// NBD URI of the live disk `i`.
    pub fn live_uri(&self, i: usize) -> String {
        NbdUri::unix(
            self.source.nbd_socket(),
            format!("live-{}", self.disks[i].node),
        )
        .to_string()
    }

    /// A `qemu-img convert` copy of live disk `i` now.
    pub fn reference(&self, i: usize, path: &Path) {
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(self.live_uri(i))
            .arg(path));
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A job's disks: every lab disk, named `<prefix><node>` on the sink.
    pub fn specs(&self, prefix: &str) -> Vec<libcbt::job::DiskSpec> {
        self.disks
            .iter()
            .map(|d| libcbt::job::DiskSpec {
                node: d.node.clone(),
                disk: format!("{prefix}{}", d.node),
            })
            .collect()
    }
}

/// Random guest-like writes of up to 1 MiB: data (half of it compressible), zeroes, discards.
pub async fn guest_writes(live: &Client, rng: &mut SmallRng, n: usize) {
    let size = live.size();
    for _ in 0..n {
        let len = rng.gen_range(1..=256u64) * 4096;
        let off = rng.gen_range(0..=(size - len) / 4096) * 4096;
        match rng.gen_range(0..8) {
            0 => live.write_zeroes(off, len, true).await.expect("zeroes"),
            // Raw files on some filesystems refuse discard; that is not what is tested.
            1 => live.trim(off, len).await.unwrap_or(()),
            _ => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data[..]);
                if rng.gen_bool(0.5) {
                    for b in data.iter_mut().skip(1).step_by(2) {
                        *b = b'x';
                    }
                }
                live.write(off, data, false).await.expect("write");
            }
        }
    }
    live.flush().await.expect("flush");
}

/// Restores backup `id` of `disk` to a raw file beside `reference`, checks it with
/// `qemu-img compare` against `reference`, and removes it again.
pub async fn restore_matches<S: libcbt::sink::Sink>(
    sink: &S,
    disk: &str,
    id: &str,
    reference: &Path,
) {
    let out = reference.with_file_name(format!("restored-{disk}-{id}.raw"));
    let _ = std::fs::remove_file(&out);
    libcbt::engine::restore(
        sink,
        disk,
        id,
        &libcbt::engine::RestoreTarget::RawFile(out.clone()),
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("restore of {disk} {id}: {e:?}"));
    compare(&out, reference);
    let _ = std::fs::remove_file(&out);
}

/// Asserts that the sink holds exactly the objects of `backups` (manifests, indexes,
/// segments, of their current generations) and nothing else: what a failed backup or a prune
/// must leave behind.
pub async fn assert_sink_holds_only<S: libcbt::sink::Sink>(
    sink: &S,
    backups: &[&libcbt::format::Manifest],
) {
    let objects: Vec<String> = sink
        .list("disks/")
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.name)
        .collect();
    let mut expect: Vec<String> = Vec::new();
    for m in backups {
        expect.extend(m.segments.iter().cloned());
        expect.push(m.index.name.clone());
        expect.push(libcbt::format::layout::manifest_name_gen(
            &m.disk,
            &m.backup_id,
            m.generation,
        ));
        expect.push(libcbt::format::layout::recent_name(
            &m.disk,
            m.finished_unix_ms,
            &m.backup_id,
        ));
    }
    // A fold hands segments on: two backups may list one.
    expect.sort();
    expect.dedup();
    assert_eq!(
        objects, expect,
        "the sink holds something else than the committed backups"
    );
    let markers = sink.list("inprogress/").await.expect("list");
    assert!(markers.is_empty(), "in-progress markers left: {markers:?}");
}

/// `qemu-img compare` of two raw images; on a difference, both are kept for a post-mortem.
pub fn compare(a: &Path, b: &Path) {
    require("qemu-img");
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .expect("qemu-img compare");
    if !out.status.success() {
        let keep = std::env::temp_dir().join(format!("cbt-mismatch-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&keep);
        for f in [a, b] {
            let _ = std::fs::copy(f, keep.join(f.file_name().unwrap_or_default()));
        }
        panic!(
            "{} differs from {}: {} (copies in {})",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stdout),
            keep.display()
        );
    }
}
