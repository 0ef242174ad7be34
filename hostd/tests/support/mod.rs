//! Shared by the integration tests that need libvirt: a libvirtd started when none runs,
//! throwaway domains (bare KVM, or the busybox/TCG guest), monitor writes, references.
#![allow(dead_code)]

#[path = "../../../libcbt/tests/common/mod.rs"]
pub mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{require, run};
use libcbt::format::{BackupId, FullReason, Level, Manifest};
use libcbt::job::{self, LibvirtJob, LibvirtResult};
use libcbt::source::libvirt::LibvirtSource;
use libcbt::source::qemu::Requested;
use rand::Rng;

pub const URI: &str = "qemu:///system";
pub const MIB: u64 = 1 << 20;

pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn virsh(args: &[&str]) -> String {
    require("virsh");
    run(Command::new("virsh").arg("-c").arg(URI).args(args))
}

pub fn virsh_ok(args: &[&str]) -> bool {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Makes sure libvirtd answers; starts virtlogd and libvirtd when it does not.
pub fn libvirtd() {
    if virsh_ok(&["version"]) {
        return;
    }
    start_libvirtd();
}

pub fn start_libvirtd() {
    require("libvirtd");
    require("virtlogd");
    let _ = Command::new("virtlogd").arg("-d").status();
    run(Command::new("libvirtd").arg("-d"));
    let t = Instant::now();
    while !virsh_ok(&["version"]) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "libvirtd did not come up within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A directory QEMU (user libvirt-qemu) can reach.
pub fn shared_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::Builder::new()
        .prefix("cbt-lv-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

pub struct Disk {
    pub target: &'static str,
    pub format: &'static str,
    pub size: u64,
}

/// A persistent test domain, destroyed and undefined (with its checkpoint metadata) on drop.
pub struct Dom {
    pub name: String,
    pub dir: tempfile::TempDir,
}

impl Dom {
    /// A domain without a guest OS under KVM (TCG when /dev/kvm is not usable).
    pub fn bare(test: &str, disks: &[Disk]) -> Dom {
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        Dom::new(test, disks, if kvm { "kvm" } else { "qemu" }, "")
    }

    pub fn new(test: &str, disks: &[Disk], kind: &str, os_extra: &str) -> Dom {
        Dom::new_with(test, disks, kind, os_extra, "")
    }

    /// A bare KVM/TCG domain owned by Nova project `project` (Nova's metadata element).
    pub fn owned(test: &str, disks: &[Disk], project: &str) -> Dom {
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        Dom::new_with(
            test,
            disks,
            if kvm { "kvm" } else { "qemu" },
            "",
            &nova_owner(project),
        )
    }

    pub fn new_with(test: &str, disks: &[Disk], kind: &str, os_extra: &str, metadata: &str) -> Dom {
        libvirtd();
        require("qemu-img");
        let name = format!("cbt-test-{test}-{}", std::process::id());
        let dir = shared_dir();
        let mut devs = String::new();
        for d in disks {
            let path = dir.path().join(format!("{}.{}", d.target, d.format));
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", d.format])
                .arg(&path)
                .arg(d.size.to_string()));
            devs += &format!(
                "<disk type='file' device='disk'><driver name='qemu' type='{}'/>\
                 <source file='{}'/><target dev='{}' bus='virtio'/></disk>",
                d.format,
                path.display(),
                d.target
            );
        }
        let xml = format!(
            "<domain type='{kind}'><name>{name}</name>{metadata}<memory unit='MiB'>256</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type>{os_extra}</os>\
             <features><acpi/></features><on_reboot>destroy</on_reboot><devices>{devs}\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             <serial type='file'><source path='{}/console.log'/><target port='0'/></serial>\
             <controller type='usb' model='none'/><memballoon model='none'/></devices></domain>",
            dir.path().display()
        );
        let _ = Command::new("virsh")
            .args(["-c", URI, "destroy", &name])
            .output();
        let _ = Command::new("virsh")
            .args(["-c", URI, "undefine", "--checkpoints-metadata", &name])
            .output();
        let f = dir.path().join("domain.xml");
        std::fs::write(&f, &xml).expect("write xml");
        virsh(&["define", &f.display().to_string()]);
        // Keep the definition libvirt completed (UUID included): a domain defined again from
        // it is the same domain, as when Nova or an operator redefines it.
        let xml = virsh(&["dumpxml", "--inactive", &name]);
        std::fs::write(&f, &xml).expect("write xml");
        virsh(&["start", &name]);
        Dom { name, dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn image(&self, target: &str) -> PathBuf {
        let q = self.path(&format!("{target}.qcow2"));
        if q.exists() {
            q
        } else {
            self.path(&format!("{target}.raw"))
        }
    }

    pub fn format(&self, target: &str) -> &'static str {
        if self.path(&format!("{target}.qcow2")).exists() {
            "qcow2"
        } else {
            "raw"
        }
    }

    /// `qemu-io` on a disk of the running domain, through the monitor; then a flush so the
    /// image file is current for `qemu-img`.
    pub fn io(&self, target: &str, cmd: &str) {
        let xml = virsh(&["dumpxml", &self.name]);
        let doc = roxmltree::Document::parse(&xml).expect("domain xml");
        let alias = doc
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .find(|d| {
                d.children()
                    .any(|c| c.has_tag_name("target") && c.attribute("dev") == Some(target))
            })
            .and_then(|d| d.children().find(|c| c.has_tag_name("alias")))
            .and_then(|a| a.attribute("name"))
            .unwrap_or_else(|| panic!("no alias for {target}"))
            .to_string();
        for c in [cmd, "flush"] {
            let out = virsh(&[
                "qemu-monitor-command",
                &self.name,
                "--hmp",
                &format!("qemu-io -d /machine/peripheral/{alias}/virtio-backend \"{c}\""),
            ]);
            assert!(
                !out.to_lowercase().contains("error"),
                "qemu-io {c:?} on {target}: {out}"
            );
        }
    }

    /// `n` random 64 KiB-aligned writes of random patterns on `target` of `size` bytes.
    pub fn scatter(&self, target: &str, size: u64, n: usize, r: &mut rand::rngs::SmallRng) {
        for _ in 0..n {
            let len = 65536 * r.gen_range(1..4u64);
            let off = r.gen_range(0..(size - len) / 65536) * 65536;
            let p: u8 = r.gen_range(1..=255);
            self.io(target, &format!("write -P {p} {off} {len}"));
        }
    }

    /// A raw copy of the disk as it is now (the domain must not be writing).
    pub fn reference(&self, target: &str, tag: &str) -> PathBuf {
        let out = self.path(&format!("ref-{target}-{tag}.raw"));
        run(Command::new("qemu-img")
            .args(["convert", "-U", "-f", self.format(target), "-O", "raw"])
            .arg(self.image(target))
            .arg(&out));
        out
    }

    pub fn checkpoints(&self) -> Vec<String> {
        let mut v: Vec<String> = virsh(&["checkpoint-list", &self.name, "--name"])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        v.sort();
        v
    }

    pub fn uuid(&self) -> String {
        virsh(&["domuuid", &self.name]).trim().to_string()
    }

    pub fn disk_id(&self, target: &str) -> String {
        job::libvirt_disk_id(&self.uuid(), target)
    }
}

impl Drop for Dom {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", URI, "destroy", &self.name])
            .output();
        let _ = Command::new("virsh")
            .args(["-c", URI, "undefine", "--checkpoints-metadata", &self.name])
            .output();
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// What a libvirt test backs up with: a sink, a scratch root QEMU can reach, a connection and
/// a runtime.
pub struct Env {
    _sink_dir: tempfile::TempDir,
    pub sink: libcbt::sink::local::LocalSink,
    pub scratch: tempfile::TempDir,
    pub src: LibvirtSource,
    pub rt: tokio::runtime::Runtime,
}

impl Env {
    pub fn new() -> Env {
        let sink_dir = tempfile::tempdir().expect("tempdir");
        Env {
            sink: libcbt::sink::local::LocalSink::open(sink_dir.path()).expect("sink"),
            _sink_dir: sink_dir,
            scratch: shared_dir(),
            src: source(),
            rt: rt(),
        }
    }

    /// A backup of every disk of `dom` as `id`, level auto.
    pub fn backup(&self, dom: &Dom, id: &str) -> Result<LibvirtResult, job::JobError> {
        self.rt.block_on(job::backup_libvirt(
            &self.src,
            &self.sink,
            &job(dom, id, self.scratch.path()),
            &libcbt::engine::BackupOptions::default(),
        ))
    }
}

/// Begins incremental backup `id` of disk `vda` since checkpoint `since` by hand, for tests
/// that act between the point in time and the copy.
pub fn begin_incremental(
    d: &libcbt::source::libvirt::LibvirtDomain,
    id: &str,
    since: &str,
    scratch_root: &Path,
) -> libcbt::source::libvirt::Session {
    libcbt::source::libvirt::begin(
        d,
        libcbt::source::libvirt::BeginRequest {
            backup_id: BackupId::parse(id).expect("valid backup id"),
            disks: vec![(
                "vda".into(),
                libcbt::source::qemu::Decision {
                    level: Level::Incremental,
                    since: Some(since.into()),
                    reason: None,
                },
            )],
            also_tracked: vec![],
            untracked: vec![],
            scratch_root: scratch_root.to_path_buf(),
            quiesce: None,
            started_paused: false,
        },
    )
    .expect("begin")
}

/// Copies the first disk of a hand-begun session as incremental `id` of `disk` on top of
/// `parent`; `scan` when the test read the maps already.
pub async fn copy_incremental(
    sink: &libcbt::sink::local::LocalSink,
    disk: &str,
    session: &libcbt::source::libvirt::Session,
    id: &str,
    parent: &Manifest,
    scan: Option<libcbt::engine::Scan>,
) -> Result<Manifest, libcbt::engine::EngineError> {
    use libcbt::engine;
    let sd = &session.disks[0];
    let scan = match scan {
        Some(s) => s,
        None => engine::scan_export(&sd.uri, sd.dirty_context.as_deref()).await?,
    };
    let dj = engine::DiskBackup {
        disk: disk.into(),
        backup_id: id.into(),
        uri: sd.uri.clone(),
        parent: Some(parent.clone()),
        level: Level::Incremental,
        full_reason: None,
        checkpoint: Some(session.checkpoint.clone()),
        consistency: libcbt::format::Consistency::Crash,
        freeze_ms: None,
        warnings: vec![],
    };
    engine::backup_disk(
        sink,
        &dj,
        &scan,
        &engine::Trusted,
        &engine::BackupOptions::default(),
        None,
    )
    .await
}

pub fn source() -> LibvirtSource {
    LibvirtSource::connect(URI).expect("connect to libvirtd")
}

pub fn job(dom: &Dom, id: &str, scratch: &Path) -> LibvirtJob {
    LibvirtJob {
        domain: dom.name.clone(),
        backup_id: BackupId::parse(id).expect("valid backup id"),
        disks: None,
        requested: Requested::Auto,
        quiesce: None,
        scratch_root: scratch.to_path_buf(),
        observer: None,
        group: None,
    }
}

pub fn manifest<'a>(r: &'a LibvirtResult, dom: &Dom, target: &str) -> &'a Manifest {
    let id = dom.disk_id(target);
    &r.disks
        .iter()
        .find(|d| d.manifest.disk == id)
        .unwrap_or_else(|| panic!("no manifest for {id}"))
        .manifest
}

pub fn level(r: &LibvirtResult, dom: &Dom, target: &str) -> (Level, Option<FullReason>) {
    let m = manifest(r, dom, target);
    (m.level, m.full_reason)
}

pub fn scratch_is_empty(root: &Path) {
    let left: Vec<_> = walk(root);
    assert!(left.is_empty(), "scratch files left behind: {left:?}");
}

pub fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let q = e.path();
            if q.is_dir() {
                out.extend(walk(&q));
            } else {
                out.push(q);
            }
        }
    }
    out
}

/// `qemu-io` `cmd` on the first virtio disk (`virtio-disk0`, a staging copy's `vda`) of the
/// running domain `dom`, through QEMU's block layer as the guest's I/O goes; HMP answers
/// qemu-io's errors, and nothing on success: what it answered.
pub fn qemu_io(dom: &str, cmd: &str) -> String {
    virsh(&[
        "qemu-monitor-command",
        dom,
        "--hmp",
        &format!("qemu-io -d virtio-disk0/virtio-backend \"{cmd}\""),
    ])
}

/// `qemu-img map -U --output=json` of `img` (which a running QEMU may hold).
pub fn image_map(img: &Path) -> Vec<serde_json::Value> {
    let out = run(Command::new("qemu-img")
        .args(["map", "-U", "--output=json"])
        .arg(img));
    serde_json::from_str(&out).expect("qemu-img map json")
}

/// Kernel and initramfs of the test guest (scripts/guest-initramfs.sh), built once per run.
pub fn guest_image() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        // One fixed place, rebuilt by every run (QEMU must be able to read it).
        let dir = PathBuf::from("/var/tmp/cbt-guest");
        std::fs::create_dir_all(&dir).expect("guest dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/guest-initramfs.sh");
        run(Command::new("bash").arg(script).arg(&dir));
        dir
    })
}

pub fn guest(test: &str, cmdline: &str) -> Dom {
    guest_with(test, cmdline, "")
}

/// Nova's metadata element naming `project` as the owner (the instance's tenant).
pub fn nova_owner(project: &str) -> String {
    format!(
        "<metadata><nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'>\
         <nova:owner><nova:project uuid='{project}'>p</nova:project></nova:owner>\
         </nova:instance></metadata>"
    )
}

/// The test guest with domain `metadata` (an owner, say).
pub fn guest_with(test: &str, cmdline: &str, metadata: &str) -> Dom {
    let g = guest_image();
    let os = format!(
        "<kernel>{0}/vmlinuz</kernel><initrd>{0}/initrd.gz</initrd>\
         <cmdline>console=ttyS0 quiet panic=-1 {cmdline}</cmdline>",
        g.display()
    );
    // TCG: a stock Debian kernel does not boot under this host's KVM (HOST-NOTES).
    let dom = Dom::new_with(
        test,
        &[Disk {
            target: "vda",
            format: "qcow2",
            size: 64 * MIB,
        }],
        "qemu",
        &os,
        metadata,
    );
    let t = Instant::now();
    while counter(&dom) < 3 {
        let log = std::fs::read_to_string(dom.path("console.log")).unwrap_or_default();
        assert!(!log.contains("CBT-ERROR"), "guest failed: {log}");
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "guest did not start writing within 120 s: {log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(dom.path("console.log")).unwrap_or_default();
    assert!(
        log.contains("CBT-AGENT started"),
        "guest agent did not start: {log}"
    );
    dom
}

/// The guest's write counter, from its serial console.
pub fn counter(dom: &Dom) -> u64 {
    std::fs::read_to_string(dom.path("console.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("CBT-COUNTER "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

pub fn console_count(dom: &Dom, needle: &str) -> usize {
    std::fs::read_to_string(dom.path("console.log"))
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// A `cbt-hostd` process on a config written into its own directory, killed when dropped.
pub struct Hostd {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub child: Option<std::process::Child>,
    /// The umask the daemon is started with (`sh -c 'umask …; exec cbt-hostd …'`); `None`:
    /// the test's own.
    pub umask: Option<u32>,
}

impl Hostd {
    /// Starts the daemon with `config` (TOML, `{dir}` replaced by its directory).
    pub fn start(config: &str) -> Hostd {
        Hostd::start_with_umask(config, None)
    }

    /// As [`Hostd::start`], the daemon started under `umask`.
    pub fn start_with_umask(config: &str, umask: Option<u32>) -> Hostd {
        let dir = shared_dir();
        let path = dir.path().join("hostd.toml");
        std::fs::write(
            &path,
            config.replace("{dir}", &dir.path().display().to_string()),
        )
        .expect("write config");
        let mut h = Hostd {
            dir,
            config: path,
            child: None,
            umask,
        };
        h.spawn();
        h
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("hostd.sock")
    }

    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("hostd.log"))
            .expect("log");
        let mut cmd = match self.umask {
            None => Command::new(env!("CARGO_BIN_EXE_cbt-hostd")),
            Some(m) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("umask {m:03o} && exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_cbt-hostd"));
                c
            }
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .env("CBT_LOG", "info,hostd=debug")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start cbt-hostd");
        self.child = Some(child);
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("cbt-hostd exited ({st}): {}", self.log());
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "cbt-hostd did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hostd.log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns how long the daemon took to exit.
    pub fn term(&mut self) -> Duration {
        let t = Instant::now();
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
        t.elapsed()
    }
}

impl Drop for Hostd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Fills `target` of `dom` with `mib` MiB of random data from the start (through a host file
/// that the monitor's qemu-io reads).
pub fn fill_random(dom: &Dom, target: &str, mib: u64, r: &mut rand::rngs::SmallRng) {
    let f = dom.path(&format!("random-{target}.bin"));
    let mut buf = vec![0u8; (mib as usize) << 20];
    r.fill(&mut buf[..]);
    std::fs::write(&f, &buf).expect("write random");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    dom.io(target, &format!("write -s {} 0 {}M", f.display(), mib));
    let _ = std::fs::remove_file(&f);
}

/// uid and gid of local user `name`, if it exists.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let o = Command::new("id").arg(flag).arg(name).output().ok()?;
        if !o.status.success() {
            return None;
        }
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// A non-root local user (created with `useradd` when missing): somebody on the host who is
/// neither root nor QEMU.
pub fn local_user(name: &str) -> (u32, u32) {
    if let Some(ids) = user_ids(name) {
        return ids;
    }
    require("useradd");
    run(Command::new("useradd").args([
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        name,
    ]));
    user_ids(name).unwrap_or_else(|| panic!("useradd {name} made no user"))
}

// --- the daemon's API, from a synchronous test ---

/// Sends and returns (status, JSON body).
pub fn call(
    rt: &tokio::runtime::Runtime,
    c: &hostd::client::Client,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let r = rt
        .block_on(c.call(method, path, body.as_ref()))
        .expect("HTTP");
    (r.status, r.json())
}

/// Follows a job over SSE to its end; returns every status seen.
pub fn follow(
    rt: &tokio::runtime::Runtime,
    c: &hostd::client::Client,
    id: &str,
) -> Vec<serde_json::Value> {
    let mut seen = Vec::new();
    let st = rt
        .block_on(c.events(&format!("/v1/jobs/{id}/events"), |v| {
            seen.push(v);
            true
        }))
        .expect("events");
    assert_eq!(st, 200);
    assert!(!seen.is_empty());
    seen
}

/// POSTs a job, expects 202, follows it to its end; returns its final status.
pub fn run_job(
    rt: &tokio::runtime::Runtime,
    c: &hostd::client::Client,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let (s, v) = call(rt, c, "POST", path, body);
    assert_eq!(s, 202, "{v}");
    follow(rt, c, v["job"]["id"].as_str().expect("id"))
        .pop()
        .expect("final")
}
