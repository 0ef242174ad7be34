//! A real OpenStack Swift for the tests of one binary (scripts/swift.sh: account, container
//! and object servers, a proxy with tempauth, s3api, bulk and SLO, and memcached), started once
//! on free ports of 127.0.0.1 and gone when the test binary exits.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use libcbt::sink::s3::S3Config;
use libcbt::sink::swift::{SwiftAuth, SwiftConfig, SwiftSink};
use libcbt::sink::Secret;

/// A running Swift with one container, `cbt-test`, in account `AUTH_cbt`.
pub struct SwiftServer {
    /// `http://127.0.0.1:PORT`.
    pub proxy: String,
    /// The key of tempauth's users `cbt:tester` (admin) and `cbt:guest` (no rights).
    pub key: String,
    pub container: String,
    pub dir: PathBuf,
    _child: std::process::Child,
}

impl SwiftServer {
    /// A tempauth configuration of the container, objects under `prefix`; small segments, so
    /// that SLOs happen at test sizes.
    pub fn config(&self, prefix: &str) -> SwiftConfig {
        SwiftConfig {
            auth: SwiftAuth::TempAuth {
                auth_url: format!("{}/auth/v1.0", self.proxy),
                user: "cbt:tester".into(),
                key: Secret(self.key.clone()),
            },
            container: self.container.clone(),
            prefix: prefix.into(),
            segment_size: 5 << 20,
            request_timeout: Duration::from_secs(30),
            retry_timeout: Duration::from_secs(30),
            ..SwiftConfig::default()
        }
    }

    /// The same account through s3api (access key `cbt:tester`, secret the tempauth key).
    pub fn s3_config(&self, prefix: &str) -> S3Config {
        S3Config {
            endpoint: self.proxy.clone(),
            bucket: self.container.clone(),
            prefix: prefix.into(),
            access_key: "cbt:tester".into(),
            secret_key: Secret(self.key.clone()),
            request_timeout: Duration::from_secs(30),
            retry_timeout: Duration::from_secs(10),
            max_retries: 2,
            ..S3Config::default()
        }
    }

    /// A sink under a prefix of its own.
    pub async fn sink(&self, prefix: &str) -> SwiftSink {
        SwiftSink::open(&self.config(prefix))
            .await
            .unwrap_or_else(|e| panic!("open the Swift sink: {e:?}\n{}", self.logs()))
    }

    /// Forgets every token (flushes tempauth's memcached), as a revocation would.
    pub async fn flush_tokens(&self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let port = std::fs::read_to_string(self.dir.join("memcached.port")).expect("port");
        let mut c = tokio::net::TcpStream::connect(format!("127.0.0.1:{}", port.trim()))
            .await
            .expect("memcached");
        c.write_all(b"flush_all\r\n").await.expect("flush");
        let mut ok = [0u8; 4];
        c.read_exact(&mut ok).await.expect("answer");
        assert_eq!(&ok, b"OK\r\n");
    }

    /// The last lines of the servers' logs.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for s in ["proxy", "account", "container", "object"] {
            let t =
                std::fs::read_to_string(self.dir.join(format!("log/{s}.log"))).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            out += &format!(
                "== {s}\n{}\n",
                lines[lines.len().saturating_sub(15)..].join("\n")
            );
        }
        out
    }
}

/// The Swift of this test binary, started at the first call.
pub async fn swift() -> &'static SwiftServer {
    static CELL: tokio::sync::OnceCell<SwiftServer> = tokio::sync::OnceCell::const_new();
    CELL.get_or_init(start).await
}

async fn start() -> SwiftServer {
    for t in [
        "swift-proxy-server",
        "swift-account-server",
        "swift-container-server",
        "swift-object-server",
        "swift-ring-builder",
        "memcached",
    ] {
        super::require(t);
    }
    let t = Instant::now();
    // Not a TempDir: the script removes its directory when it stops (statics never drop).
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::SmallRng::from_entropy();
    let dir = std::env::temp_dir().join(format!(
        "cbt-swift-{}-{:x}",
        std::process::id(),
        r.gen::<u32>()
    ));
    let port = super::s3::free_ports(1)[0];
    let key = format!("k{:024x}", r.gen::<u64>());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/swift.sh");
    let log = std::env::temp_dir().join(format!("cbt-swift-{}.log", std::process::id()));
    let logf = std::fs::File::create(&log).expect("log");
    let mut child = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .arg(port.to_string())
        .arg(&key)
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf)
        .spawn()
        .expect("start scripts/swift.sh");
    let stdout = child.stdout.take().expect("stdout");
    let ready = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l == "ready")
    });
    let ok = tokio::time::timeout(Duration::from_secs(90), ready).await;
    assert!(
        matches!(ok, Ok(Ok(true))),
        "Swift did not come up\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let sw = SwiftServer {
        proxy: format!("http://127.0.0.1:{port}"),
        key,
        container: "cbt-test".into(),
        dir,
        _child: child,
    };
    SwiftSink::create_container(&sw.config(""))
        .await
        .unwrap_or_else(|e| panic!("create the container: {e:?}\n{}", sw.logs()));
    eprintln!(
        "Swift up at {} in {:.1} s",
        sw.proxy,
        t.elapsed().as_secs_f64()
    );
    sw
}
