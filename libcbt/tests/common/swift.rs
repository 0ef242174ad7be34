//! A real OpenStack Swift for the tests of one binary (scripts/swift.sh: account, container
//! and object servers, a proxy with tempauth, Keystone's authtoken, s3api, bulk and SLO, and
//! memcached), started once on free ports of 127.0.0.1, and the Keystone it trusts
//! (scripts/keystone.sh), started at the first test that logs in through it; both gone when
//! the test binary exits.

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
    /// Keystone v3 (`http://127.0.0.1:PORT/v3`): project `cbt` with users `alice` (member)
    /// and `bob` (reader), password [`key`](Self::key) for both.
    pub keystone: String,
    /// Keystone's port and the address of the proxy that trusts it (its catalog's).
    ks_port: u16,
    ks_proxy: String,
    tag: String,
    /// Keystone once up: its process and alice's application credential (id, secret).
    ks: tokio::sync::OnceCell<(std::process::Child, (String, String))>,
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

    /// Starts Keystone (once) and returns alice's application credential (id, secret); her
    /// project's container `cbt-test` exists then.
    pub async fn keystone_up(&self) -> &(String, String) {
        let (_, cred) = self
            .ks
            .get_or_init(|| async {
                let t = Instant::now();
                let tmp = std::env::temp_dir();
                let (child, out) = start_script(
                    "keystone.sh",
                    vec![
                        tmp.join(format!("cbt-keystone-{}", self.tag))
                            .display()
                            .to_string(),
                        self.ks_port.to_string(),
                        self.key.clone(),
                        self.ks_proxy.clone(),
                    ],
                    vec![],
                    tmp.join(format!("cbt-keystone-{}.log", self.tag)),
                )
                .await;
                let cred = out
                    .iter()
                    .find_map(|l| {
                        let mut w = l.strip_prefix("app_credential ")?.split(' ');
                        Some((w.next()?.to_string(), w.next()?.to_string()))
                    })
                    .expect("an application credential from keystone.sh");
                SwiftSink::create_container(&self.keystone_config("alice", ""))
                    .await
                    .unwrap_or_else(|e| {
                        panic!("create the Keystone container: {e:?}\n{}", self.logs())
                    });
                eprintln!(
                    "Keystone up at {} in {:.1} s",
                    self.keystone,
                    t.elapsed().as_secs_f64()
                );
                (child, cred)
            })
            .await;
        cred
    }

    /// A Keystone configuration of container `cbt-test` in project `cbt`'s account, as `user`
    /// with a password, objects under `prefix`; the endpoint from the token's catalog.
    pub fn keystone_config(&self, user: &str, prefix: &str) -> SwiftConfig {
        SwiftConfig {
            auth: SwiftAuth::Password {
                auth_url: self.keystone.clone(),
                user: user.into(),
                user_domain: "Default".into(),
                password: Secret(self.key.clone()),
                project: "cbt".into(),
                project_domain: "Default".into(),
            },
            region: Some("RegionOne".into()),
            ..self.config(prefix)
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

    /// Sets a metadata header on a container of tempauth's account (as its admin).
    pub async fn set_container_meta(&self, container: &str, header: &str, value: &str) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let host = self.proxy.trim_start_matches("http://").to_string();
        let call = |req: String| {
            let host = host.clone();
            async move {
                let mut c = tokio::net::TcpStream::connect(&host).await.expect("proxy");
                c.write_all(req.as_bytes()).await.expect("request");
                let mut out = Vec::new();
                c.read_to_end(&mut out).await.expect("answer");
                String::from_utf8_lossy(&out).into_owned()
            }
        };
        let auth = call(format!(
            "GET /auth/v1.0 HTTP/1.0\r\nHost: {host}\r\nX-Auth-User: cbt:tester\r\nX-Auth-Key: {}\r\n\r\n",
            self.key
        ))
        .await;
        let token = auth
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("x-auth-token")
                    .then(|| v.trim().to_string())
            })
            .expect("a tempauth token");
        let answer = call(format!(
            "POST /v1/AUTH_cbt/{container} HTTP/1.0\r\nHost: {host}\r\nX-Auth-Token: {token}\r\n\
             {header}: {value}\r\nContent-Length: 0\r\n\r\n"
        ))
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 204") || answer.starts_with("HTTP/1.0 204"),
            "{answer}"
        );
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
        for s in ["proxy", "proxy-keystone", "account", "container", "object"] {
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

/// Runs `script ARGS PARENT_PID` with `env`, its stderr into `log`; returns it and the lines
/// it printed before `ready` (panics if it does not get there within 120 s).
async fn start_script(
    script: &str,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    log: PathBuf,
) -> (std::process::Child, Vec<String>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(script);
    let logf = std::fs::File::create(&log).expect("log");
    let mut c = Command::new("bash");
    c.arg(&script)
        .args(&args)
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("start a server script");
    let stdout = child.stdout.take().expect("stdout");
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut seen = Vec::new();
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if l == "ready" {
                return Some(seen);
            }
            seen.push(l);
        }
        None
    });
    match tokio::time::timeout(Duration::from_secs(120), lines).await {
        Ok(Ok(Some(seen))) => (child, seen),
        _ => panic!(
            "{} did not come up\n{}",
            script.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        ),
    }
}

async fn start() -> SwiftServer {
    for t in [
        "swift-proxy-server",
        "swift-account-server",
        "swift-container-server",
        "swift-object-server",
        "swift-ring-builder",
        "memcached",
        "keystone-manage",
        "uwsgi",
    ] {
        super::require(t);
    }
    let t = Instant::now();
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::SmallRng::from_entropy();
    // Not TempDirs: the scripts remove their directories when they stop (statics never drop).
    let tmp = std::env::temp_dir();
    let tag = format!("{}-{:x}", std::process::id(), r.gen::<u32>());
    let dir = tmp.join(format!("cbt-swift-{tag}"));
    let ports = super::s3::free_ports(3);
    let (port, ks_port, ks_proxy_port) = (ports[0], ports[1], ports[2]);
    let key = format!("k{:024x}", r.gen::<u64>());
    let proxy = format!("http://127.0.0.1:{port}");
    let keystone = format!("http://127.0.0.1:{ks_port}/v3");
    // Swift's authtoken asks Keystone only at the first token it checks: Keystone can come
    // later, when a test needs it.
    let (sw_child, _) = start_script(
        "swift.sh",
        vec![dir.display().to_string(), port.to_string(), key.clone()],
        vec![
            ("KEYSTONE_URL", keystone.clone()),
            ("KEYSTONE_PROXY_PORT", ks_proxy_port.to_string()),
        ],
        tmp.join(format!("cbt-swift-{tag}.log")),
    )
    .await;
    let sw = SwiftServer {
        proxy,
        key,
        container: "cbt-test".into(),
        dir,
        keystone,
        ks_port,
        ks_proxy: format!("http://127.0.0.1:{ks_proxy_port}"),
        tag,
        ks: tokio::sync::OnceCell::new(),
        _child: sw_child,
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
