//! Real S3 servers for the tests of one binary: SeaweedFS (`weed mini`) and Ceph RGW (a mon,
//! a memstore OSD and radosgw, scripts/ceph-rgw.sh), each started once, on free ports of
//! 127.0.0.1, with credentials checked, and gone when the test binary exits (a watchdog kills
//! the server once our process is gone, whatever way it ended).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use libcbt::sink::s3::{S3Config, S3Sink, Secret};

/// A running S3 server with one bucket.
pub struct S3Server {
    /// `SeaweedFS` or `Ceph RGW`.
    pub kind: &'static str,
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    pub log: PathBuf,
    /// SeaweedFS's Prometheus endpoint: the server's own count of the requests it served.
    pub metrics: Option<String>,
    /// Ceph's configuration, for `radosgw-admin`.
    pub ceph_conf: Option<PathBuf>,
    /// The watchdog shell (it outlives this process by at most half a second).
    _watchdog: std::process::Child,
    _dir: tempfile::TempDir,
}

impl S3Server {
    /// A configuration of the bucket with objects under `prefix`; small parts, so that
    /// multipart uploads happen at test sizes.
    pub fn config(&self, prefix: &str) -> S3Config {
        S3Config {
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
            prefix: prefix.into(),
            access_key: self.access_key.clone(),
            secret_key: Secret(self.secret_key.clone()),
            part_size: libcbt::sink::s3::MIN_PART,
            request_timeout: Duration::from_secs(30),
            retry_timeout: Duration::from_secs(30),
            ..S3Config::default()
        }
    }

    /// S3 requests the server has answered so far, by type (`GET`, `PUT`, `LIST`, …), from
    /// its `SeaweedFS_s3_request_total` counters: an oracle independent of our client.
    pub async fn requests(&self) -> std::collections::BTreeMap<String, u64> {
        let url = self
            .metrics
            .as_deref()
            .expect("request counters (SeaweedFS only)");
        let text = http_get(url).await;
        let mut by = std::collections::BTreeMap::new();
        for l in text
            .lines()
            .filter(|l| l.starts_with("SeaweedFS_s3_request_total{"))
        {
            let Some((labels, n)) = l.rsplit_once(' ') else {
                continue;
            };
            let kind = labels
                .split("type=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("?");
            *by.entry(kind.to_string()).or_insert(0) += n.parse::<f64>().unwrap_or(0.0) as u64;
        }
        by
    }

    /// Requests served while `f` ran, by type, and their total.
    pub async fn count<T>(
        &self,
        f: impl std::future::Future<Output = T>,
    ) -> (T, std::collections::BTreeMap<String, u64>, u64) {
        let before = self.requests().await;
        let out = f.await;
        let after = self.requests().await;
        let mut delta = std::collections::BTreeMap::new();
        for (k, v) in after {
            let d = v - before.get(&k).copied().unwrap_or(0);
            if d > 0 {
                delta.insert(k, d);
            }
        }
        let total = delta.values().sum();
        (out, delta, total)
    }

    /// Runs `radosgw-admin ARGS` on this Ceph (panics on another server or a failure).
    pub fn radosgw_admin(&self, args: &[&str]) -> String {
        let conf = self.ceph_conf.as_ref().expect("a Ceph server");
        super::run(
            Command::new("radosgw-admin")
                .env("CEPH_CONF", conf)
                .args(args),
        )
    }

    /// A sink under a prefix of its own.
    pub async fn sink(&self, prefix: &str) -> S3Sink {
        S3Sink::open(&self.config(prefix))
            .await
            .unwrap_or_else(|e| panic!("open the S3 sink: {e:?}\n{}", tail(&self.log)))
    }
}

/// The body of a plain `GET http://127.0.0.1:PORT/PATH` (HTTP/1.0: the server closes).
async fn http_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_once('/').expect("path");
    let mut c = tokio::net::TcpStream::connect(host).await.expect("connect");
    c.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.expect("response");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    body.to_string()
}

/// Where `weed` is: on PATH, or in the scripts directory of the python3 that installed it
/// (scripts/install-deps.sh). Panics when it is not installed.
fn weed() -> PathBuf {
    if let Some(p) = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("weed"))
            .find(|f| f.is_file())
    }) {
        return p;
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output();
    if let Ok(o) = out {
        let p = Path::new(String::from_utf8_lossy(&o.stdout).trim()).join("weed");
        if p.is_file() {
            return p;
        }
    }
    panic!("SeaweedFS (`weed`) is not installed; `make test` installs it (scripts/install-deps.sh)")
}

/// Free TCP ports of 127.0.0.1 (bound and released: another process could take one in
/// between, which would fail the start loudly, never silently).
pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    ls.iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Starts `args` under a watchdog that kills it once this test process is gone.
fn spawn_tied(
    program: &Path,
    dir: &Path,
    args: &[String],
    env: &[(&str, &str)],
    log: &Path,
) -> std::process::Child {
    // The server's directory goes with it: statics are never dropped, so no TempDir would.
    let script = r#"prog=$1; parent=$2; dir=$3; shift 3
"$prog" "$@" & child=$!
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.5; done
kill "$child" 2>/dev/null; wait "$child" 2>/dev/null; rm -rf "$dir""#;
    let logf = std::fs::File::create(log).expect("log");
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(script)
        .arg("watchdog")
        .arg(program)
        .arg(std::process::id().to_string())
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf);
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().expect("start the server")
}

/// The SeaweedFS of this test binary, started at the first call.
pub async fn seaweed() -> &'static S3Server {
    static CELL: tokio::sync::OnceCell<S3Server> = tokio::sync::OnceCell::const_new();
    CELL.get_or_init(start_seaweed).await
}

/// The Ceph RGW of this test binary, started at the first call (its OSD holds up to 4 GiB).
pub async fn ceph() -> &'static S3Server {
    ceph_sized(4).await
}

/// [`ceph`], its OSD holding up to `gib` GiB in memory if this call starts it.
pub async fn ceph_sized(gib: u32) -> &'static S3Server {
    static CELL: tokio::sync::OnceCell<S3Server> = tokio::sync::OnceCell::const_new();
    CELL.get_or_init(|| start_ceph(gib)).await
}

fn random_keys() -> (String, String) {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::SmallRng::from_entropy();
    (
        format!("CBT{:016X}", r.gen::<u64>()),
        format!("s{:032x}", r.gen::<u128>()),
    )
}

/// Creates the bucket, retrying until the server takes it (its readiness: a signed write).
async fn make_bucket(sw: &S3Server, t: Instant) {
    loop {
        match S3Sink::create_bucket(&sw.config("")).await {
            Ok(()) => break,
            Err(e) if t.elapsed() > Duration::from_secs(90) => {
                panic!("{} did not come up: {e:?}\n{}", sw.kind, tail(&sw.log))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    eprintln!(
        "{} up at {} in {:.1} s",
        sw.kind,
        sw.endpoint,
        t.elapsed().as_secs_f64()
    );
}

async fn start_ceph(memstore_gib: u32) -> S3Server {
    for t in ["ceph-mon", "ceph-osd", "radosgw", "radosgw-admin"] {
        super::require(t);
    }
    let t = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("ceph-rgw.log");
    let p = free_ports(2);
    let (access_key, secret_key) = random_keys();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-rgw.sh");
    let logf = std::fs::File::create(&log).expect("log");
    let mut child = Command::new("bash")
        .arg(&script)
        .arg(dir.path())
        .args([p[0].to_string(), p[1].to_string()])
        .args([&access_key, &secret_key])
        .arg(std::process::id().to_string())
        .env("CEPH_MEMSTORE_GIB", memstore_gib.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf)
        .spawn()
        .expect("start scripts/ceph-rgw.sh");
    let stdout = child.stdout.take().expect("stdout");
    let ready = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l == "ready")
    });
    let ok = tokio::time::timeout(Duration::from_secs(120), ready).await;
    assert!(
        matches!(ok, Ok(Ok(true))),
        "Ceph RGW did not come up\n{}",
        tail(&log)
    );
    let sw = S3Server {
        kind: "Ceph RGW",
        endpoint: format!("http://127.0.0.1:{}", p[1]),
        bucket: "cbt-test".into(),
        access_key,
        secret_key,
        log,
        metrics: None,
        ceph_conf: Some(dir.path().join("ceph.conf")),
        _watchdog: child,
        _dir: dir,
    };
    make_bucket(&sw, t).await;
    sw
}

async fn start_seaweed() -> S3Server {
    let weed = weed();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("weed.log");
    let p = free_ports(17);
    let flags = [
        "admin.port",
        "admin.port.grpc",
        "debug.port",
        "filer.port",
        "filer.port.grpc",
        "master.port",
        "master.port.grpc",
        "metricsPort",
        "volume.port",
        "volume.port.grpc",
        "webdav.port",
        "s3.port.grpc",
        "s3.port.iceberg",
        "s3.port.lance",
        "s3.debug.port",
        "s3.metricsPort",
        "s3.port",
    ];
    let mut args = vec![
        "mini".to_string(),
        format!("-dir={}", dir.path().join("data").display()),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        "-admin.ui=false".into(),
        // Real S3 answers NoSuchBucket; weed mini would create the bucket on the first PUT.
        "-s3.autoCreateBucket=false".into(),
    ];
    args.extend(flags.iter().zip(&p).map(|(f, port)| format!("-{f}={port}")));
    let s3_port = p[16];
    let (access_key, secret_key) = random_keys();
    std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
    let watchdog = spawn_tied(
        &weed,
        dir.path(),
        &args,
        &[
            ("AWS_ACCESS_KEY_ID", &access_key),
            ("AWS_SECRET_ACCESS_KEY", &secret_key),
        ],
        &log,
    );
    let sw = S3Server {
        kind: "SeaweedFS",
        endpoint: format!("http://127.0.0.1:{s3_port}"),
        bucket: "cbt-test".into(),
        access_key,
        secret_key,
        log,
        metrics: Some(format!("http://127.0.0.1:{}/metrics", p[7])),
        ceph_conf: None,
        _watchdog: watchdog,
        _dir: dir,
    };
    let t = Instant::now();
    make_bucket(&sw, t).await;
    sw
}
