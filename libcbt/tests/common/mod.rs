//! Helpers for integration tests against real NBD peers. Every helper that needs an external
//! tool fails the test loudly when the tool is missing: nothing is skipped.
#![allow(dead_code)]

pub mod lab;
pub mod s3;
pub mod swift;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// An error with its sources, `a: b: c`, as a failing test should print it.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

/// Panics unless `tool` is on PATH.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "required tool `{tool}` is not installed; `make test` installs it (scripts/install-deps.sh)"
    );
}

/// Runs a command to completion and panics with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A seed for randomized tests: `CBT_TEST_SEED` when set, else fresh; always printed so a
/// failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("CBT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64 ^ u64::from(std::process::id())
        });
    eprintln!("{test}: CBT_TEST_SEED={seed}");
    seed
}

pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// A background server process, killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    name: String,
}

impl Daemon {
    /// Starts `cmd` and waits until `socket` accepts connections.
    pub fn start(name: &str, mut cmd: Command, socket: &Path) -> Daemon {
        require(cmd.get_program().to_str().unwrap_or(name));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let mut d = Daemon {
            child,
            socket: socket.to_path_buf(),
            name: name.into(),
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited before listening: {status}", self.name);
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen on {:?}",
                self.name,
                self.socket
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `cmd`, which listens on 127.0.0.1:`port`, and waits until it accepts.
    pub fn start_tcp(name: &str, mut cmd: Command, port: u16) -> Daemon {
        require(cmd.get_program().to_str().unwrap_or(name));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name} exited before listening on port {port}: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not listen on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child,
            socket: PathBuf::new(),
            name: name.into(),
        }
    }

    /// `nbd+unix:///EXPORT?socket=…` for this daemon.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// SIGKILL through a shared reference (for tests that race it against other work).
    pub fn kill_by_ref(&self) {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(self.child.id().to_string())
            .status();
    }

    /// SIGKILL, now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `qemu-storage-daemon` exporting a qcow2 read-only as `vda`, with the given bitmaps and the
/// allocation-depth context.
pub fn qsd(dir: &Path, image: &Path, bitmaps: &[&str]) -> Daemon {
    let sock = dir.join("qsd.sock");
    let export = serde_json::json!({
        "type": "nbd", "id": "exp0", "node-name": "fmt0", "name": "vda",
        "writable": false, "bitmaps": bitmaps, "allocation-depth": true,
    });
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},read-only=on",
            image.display()
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=fmt0,file=file0,read-only=on")
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .arg("--export")
        .arg(export.to_string());
    Daemon::start("qemu-storage-daemon", cmd, &sock)
}

/// `qemu-nbd` exporting `image` read-only with `--shared=4`, optional bitmap.
pub fn qemu_nbd(dir: &Path, image: &Path, format: &str, bitmap: Option<&str>) -> Daemon {
    let sock = dir.join("qemu-nbd.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-r", "-f", format, "--shared=4", "--persistent", "-A", "-k"])
        .arg(&sock);
    if let Some(b) = bitmap {
        cmd.args(["-B", b]);
    }
    cmd.arg(image);
    Daemon::start("qemu-nbd", cmd, &sock)
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// `qemu-nbd` exporting `image` read-only over TCP on 127.0.0.1.
pub fn qemu_nbd_tcp(image: &Path, format: &str) -> (Daemon, String) {
    let port = free_port();
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "-r",
        "-f",
        format,
        "--shared=4",
        "--persistent",
        "-b",
        "127.0.0.1",
        "-p",
    ])
    .arg(port.to_string())
    .arg(image);
    (
        Daemon::start_tcp("qemu-nbd", cmd, port),
        format!("nbd://127.0.0.1:{port}/"),
    )
}

/// `nbdkit` in the foreground on a Unix socket with the given arguments (filters, plugin,
/// plugin parameters).
pub fn nbdkit(dir: &Path, args: &[&str]) -> Daemon {
    let sock = dir.join("nbdkit.sock");
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "--exit-with-parent", "-U"])
        .arg(&sock)
        .args(args);
    Daemon::start("nbdkit", cmd, &sock)
}

/// Creates a qcow2 image of `size` bytes.
pub fn qcow2_create(path: &Path, size: u64, cluster: u64) {
    require("qemu-img");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!("cluster_size={cluster}"))
        .arg(path)
        .arg(size.to_string()));
}

/// Runs `qemu-io` commands (one per line) against an image, without syncing each write.
pub fn qemu_io(image: &Path, format: &str, commands: &str) {
    require("qemu-io");
    let mut child = Command::new("qemu-io")
        .args(["-t", "unsafe", "-f", format])
        .arg(image)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-io");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(commands.as_bytes())
        .expect("feed qemu-io");
    let out = child.wait_with_output().expect("qemu-io runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("error"),
        "qemu-io failed: {err}"
    );
}

/// Adds a bitmap (offline) to a qcow2.
pub fn bitmap_add(image: &Path, name: &str, granularity: u64) {
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "-g"])
        .arg(granularity.to_string())
        .arg(image)
        .arg(name));
}

/// Disables a bitmap so that it can be exported read-only.
pub fn bitmap_disable(image: &Path, name: &str) {
    run(Command::new("qemu-img")
        .args(["bitmap", "--disable"])
        .arg(image)
        .arg(name));
}

/// `qemu-img convert` of any source QEMU opens (a file or an NBD URI) to a raw file.
pub fn convert_to_raw(src: &str, src_format: &str, dst: &Path) -> Vec<u8> {
    require("qemu-img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", src_format, "-O", "raw", src])
        .arg(dst));
    std::fs::read(dst).expect("read converted image")
}

/// The map printed by `nbdinfo --map=CONTEXT`, as (offset, length, type) rows.
pub fn nbdinfo_map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    require("nbdinfo");
    let out = run(Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg(uri));
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut f = l.split_whitespace();
            let mut num = || -> u64 {
                f.next()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or_else(|| panic!("unparsable nbdinfo line {l:?}"))
            };
            let (o, n, t) = (num(), num(), num());
            (o, n, u32::try_from(t).expect("type fits u32"))
        })
        .collect()
}

/// Merges touching rows of equal type, so that maps from different clients compare equal
/// regardless of how the server split its replies.
pub fn coalesce(rows: impl IntoIterator<Item = (u64, u64, u32)>) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for (o, n, t) in rows {
        if let Some(last) = out.last_mut() {
            if last.0 + last.1 == o && last.2 == t {
                last.1 += n;
                continue;
            }
        }
        out.push((o, n, t));
    }
    out
}

/// Writes random data in random extents of a sparse raw file of `size` bytes, some of them
/// explicitly zero, and returns the file. Extents are 4 KiB aligned.
pub fn random_raw(path: &Path, size: u64, extents: usize, rng: &mut SmallRng) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create raw");
    f.set_len(size).expect("size raw");
    for _ in 0..extents {
        let len = rng.gen_range(1..=64u64) * 4096;
        let off = rng.gen_range(0..(size - len) / 4096) * 4096;
        let mut buf = vec![0u8; len as usize];
        if rng.gen_bool(0.8) {
            rng.fill(&mut buf[..]);
        }
        f.write_all_at(&buf, off).expect("write raw");
    }
}
