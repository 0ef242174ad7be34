//! `cbt-hostd` at its edges, with real processes and no libvirt: the TLS listener against
//! slow, idle and too many clients; the modes of what the daemon writes whatever the umask
//! it is started with; and tokens kept out of argv (`cbt-hostd --hash-token`, `cbtctl`).

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostd::config::token_hash;
use support::common::free_port;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const ADMIN: &str = "edge-admin-token-0123456789";

/// A self-signed certificate for `localhost` in `dir` (cert.pem, key.pem); returns its DER.
fn cert(dir: &Path) -> rustls::pki_types::CertificateDer<'static> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).expect("cert");
    std::fs::write(dir.join("key.pem"), ck.key_pair.serialize_pem()).expect("key");
    rustls_pemfile::certs(&mut ck.cert.pem().as_bytes())
        .next()
        .expect("one certificate")
        .expect("PEM")
}

/// A daemon without libvirt on its Unix socket and, with TLS, on 127.0.0.1:`port`; `server`
/// is added to `[server]`.
fn config(port: u16, certdir: &Path, server: &str) -> String {
    format!(
        r#"[server]
unix_socket = "{{dir}}/hostd.sock"
listen = "127.0.0.1:{port}"
tls_cert = "{c}/cert.pem"
tls_key = "{c}/key.pem"
state_dir = "{{dir}}/state"
restore_dirs = ["{{dir}}/restores"]
{server}

[libvirt]
enabled = false

[[sink]]
name = "local"
path = "{{dir}}/sink"

[[token]]
name = "admin"
sha256 = "{h}"
admin = true
"#,
        c = certdir.display(),
        h = token_hash(ADMIN)
    )
}

/// A daemon with TLS on a free port; returns it, its port, the certificate dir and DER.
fn tls_daemon(server: &str) -> (Hostd, u16, tempfile::TempDir, TlsClient) {
    let certdir = tempfile::tempdir().expect("tempdir");
    let der = cert(certdir.path());
    let port = free_port();
    let h = Hostd::start(&config(port, certdir.path(), server));
    (h, port, certdir, TlsClient::new(der, port))
}

struct TlsClient {
    connector: tokio_rustls::TlsConnector,
    port: u16,
}

impl TlsClient {
    fn new(der: rustls::pki_types::CertificateDer<'static>, port: u16) -> TlsClient {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).expect("root");
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        TlsClient {
            connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            port,
        }
    }

    /// A TCP connection and a TLS handshake; `Err` when either fails.
    async fn connect(&self) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        self.connector.connect(name, tcp).await
    }
}

const HEALTH: &[u8] = b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// Reads one response (headers and a Content-Length body); returns its status, or `None` if
/// the connection ended or failed first.
async fn response(s: &mut TlsStream<TcpStream>) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status = head.split(' ').nth(1)?.parse().ok()?;
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some(status);
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Waits up to `limit` for the server to close `s` (EOF or an error, bytes before it
/// ignored); returns how long that took, or `None` if it was still open.
async fn closed_within(s: &mut TlsStream<TcpStream>, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return t.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

#[test]
fn slowloris_half_a_header_is_cut_at_header_read_timeout() {
    let (h, _port, _c, tls) = tls_daemon("header_read_timeout_secs = 2\nidle_timeout_secs = 300");
    let rt = rt();
    rt.block_on(async {
        let mut s = tls.connect().await.expect("TLS connect");
        s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: local")
            .await
            .expect("write");
        s.flush().await.expect("flush");
        let took = closed_within(&mut s, Duration::from_secs(15))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "a half-sent header kept the connection open 15 s (header_read_timeout 2 s): {}",
                    h.log()
                )
            });
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
            "closed after {took:?}, expected about 2 s"
        );
    });
}

#[test]
fn idle_keep_alive_connection_is_closed_after_idle_timeout() {
    // The header timeout (which hyper also applies to the wait for the next request) is
    // long here, so what closes the connection is the idle timeout.
    let (h, _port, _c, tls) = tls_daemon("header_read_timeout_secs = 300\nidle_timeout_secs = 2");
    let rt = rt();
    rt.block_on(async {
        let mut s = tls.connect().await.expect("TLS connect");
        // Keep-alive works: two requests on one connection.
        for _ in 0..2 {
            s.write_all(HEALTH).await.expect("write");
            assert_eq!(response(&mut s).await, Some(200), "{}", h.log());
        }
        let took = closed_within(&mut s, Duration::from_secs(15))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "an idle keep-alive connection stayed open 15 s (idle_timeout 2 s): {}",
                    h.log()
                )
            });
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
            "closed after {took:?}, expected about 2 s"
        );
        // A busy connection is not idle: requests every second for 4 s all succeed.
        let mut s = tls.connect().await.expect("TLS connect");
        for _ in 0..4 {
            s.write_all(HEALTH).await.expect("write");
            assert_eq!(response(&mut s).await, Some(200), "{}", h.log());
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

#[test]
fn connections_beyond_max_connections_are_refused_until_slots_free() {
    let (h, _port, _c, tls) =
        tls_daemon("max_connections = 4\nheader_read_timeout_secs = 300\nidle_timeout_secs = 300");
    let rt = rt();
    rt.block_on(async {
        let mut held = Vec::new();
        for i in 0..4 {
            let mut s = tls.connect().await.expect("TLS connect");
            s.write_all(HEALTH).await.expect("write");
            assert_eq!(
                response(&mut s).await,
                Some(200),
                "connection {i}: {}",
                h.log()
            );
            held.push(s);
        }
        // The fifth: closed at accept, so the handshake (or at the latest the request) fails.
        let fifth = tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = tls.connect().await.ok()?;
            s.write_all(HEALTH).await.ok()?;
            response(&mut s).await
        })
        .await;
        assert!(
            matches!(fifth, Ok(None) | Err(_)),
            "a fifth connection was served with max_connections = 4: {fifth:?}"
        );
        // The four still work.
        for s in &mut held {
            s.write_all(HEALTH).await.expect("write");
            assert_eq!(
                response(s).await,
                Some(200),
                "a held connection: {}",
                h.log()
            );
        }
        drop(held);
        // Their slots free as the daemon sees them close.
        let t = Instant::now();
        loop {
            let served = async {
                let mut s = tls.connect().await.ok()?;
                s.write_all(HEALTH).await.ok()?;
                response(&mut s).await
            }
            .await;
            if served == Some(200) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no connection served 10 s after the four closed: {}",
                h.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn files_are_private_even_when_started_with_umask_022() {
    let certdir = tempfile::tempdir().expect("tempdir");
    cert(certdir.path());
    let h = Hostd::start_with_umask(&config(free_port(), certdir.path(), ""), Some(0o022));
    let d = h.dir.path();
    // Started: the journal is open (its WAL exists while it is).
    let journal = d.join("state/journal.sqlite");
    assert_eq!(mode(&journal), 0o600, "journal");
    let wal = d.join("state/journal.sqlite-wal");
    if wal.exists() {
        assert_eq!(mode(&wal), 0o600, "journal WAL");
    }
    // QEMU's user must traverse these to its scratch sockets and staging images; nobody
    // else may list or write them.
    for dir in ["state", "state/scratch", "restores"] {
        assert_eq!(mode(&d.join(dir)), 0o711, "{dir}");
    }
    // What the daemon creates without a chosen mode follows its own umask, not ours.
    assert_eq!(mode(&d.join("sink")) & 0o077, 0, "sink directory");
}

/// Runs the daemon on `config` expecting it to exit by itself within 20 s; returns (exit
/// code, stderr).
fn run_to_exit(config: &Path) -> (Option<i32>, String) {
    let log = config.with_file_name("refused.log");
    let mut c = Command::new(env!("CARGO_BIN_EXE_cbt-hostd"))
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("cbt-hostd");
    let t = Instant::now();
    loop {
        if let Some(st) = c.try_wait().expect("wait") {
            return (st.code(), std::fs::read_to_string(&log).unwrap_or_default());
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = c.kill();
            let _ = c.wait();
            panic!(
                "cbt-hostd kept running: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_writable_state_dir_is_refused_and_a_readable_one_narrowed() {
    use std::os::unix::fs::PermissionsExt;
    let certdir = tempfile::tempdir().expect("tempdir");
    cert(certdir.path());
    let d = shared_dir();
    let cfg = d.path().join("hostd.toml");
    std::fs::write(
        &cfg,
        config(free_port(), certdir.path(), "").replace("{dir}", &d.path().display().to_string()),
    )
    .expect("config");
    let state = d.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let (code, err) = run_to_exit(&cfg);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("state_dir") && err.contains("writable"),
        "the refusal names the problem: {err}"
    );
    assert!(
        !state.join("journal.sqlite").exists(),
        "journal made anyway"
    );
    assert_eq!(
        mode(&state),
        0o777,
        "the operator's directory is left to the operator"
    );

    // Readable by others (what StateDirectoryMode=0755 made): narrowed, and said so.
    let mut h = Hostd::start(&config(free_port(), certdir.path(), ""));
    h.kill9();
    let st = h.dir.path().join("state");
    std::fs::set_permissions(&st, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    h.spawn();
    assert_eq!(mode(&st), 0o711, "a 0755 state_dir is narrowed");
    assert!(h.log().contains("narrowed"), "and logged: {}", h.log());
}

fn hash_token(args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cbt-hostd"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cbt-hostd");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write");
    c.wait_with_output().expect("output")
}

#[test]
fn hash_token_reads_stdin_or_a_file_and_refuses_argv() {
    let token = "s3cret-Token/with+signs=";
    let want = token_hash(token);
    let out = hash_token(&["--hash-token"], format!("{token}\n").as_bytes());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want);

    let d = tempfile::tempdir().expect("tempdir");
    let f = d.path().join("token");
    std::fs::write(&f, format!("{token}\n")).expect("write");
    let out = hash_token(&["--hash-token-file", f.to_str().expect("utf-8 path")], b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want);

    // In argv: refused, and no hash printed.
    let out = hash_token(&["--hash-token", token], b"");
    assert!(!out.status.success(), "a token in argv was accepted");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&want),
        "{out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stdin"),
        "the refusal says where the token goes: {out:?}"
    );
    // Empty: refused.
    for empty in [&b""[..], b"\n"] {
        let out = hash_token(&["--hash-token"], empty);
        assert!(!out.status.success(), "an empty token was hashed: {out:?}");
    }
}

#[test]
fn cbtctl_takes_the_token_from_env_or_file_never_argv() {
    let certdir = tempfile::tempdir().expect("tempdir");
    cert(certdir.path());
    let h = Hostd::start(&config(free_port(), certdir.path(), ""));
    let sock = h.socket();
    let cbtctl = |args: &[&str], env: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cbtctl"));
        c.arg("--hostd").arg(&sock).arg("--json").args(args);
        c.env_remove("CBT_TOKEN").env_remove("CBT_HOSTD");
        if let Some(t) = env {
            c.env("CBT_TOKEN", t);
        }
        c.output().expect("cbtctl")
    };
    // An authenticated GET (/v1/jobs) needs the token: without one it fails.
    let out = cbtctl(&["jobs"], None);
    assert!(!out.status.success(), "no token, yet served: {out:?}");
    let out = cbtctl(&["jobs"], Some(ADMIN));
    assert!(out.status.success(), "CBT_TOKEN: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("jobs"),
        "{out:?}"
    );

    let f = h.dir.path().join("token");
    std::fs::write(&f, format!("{ADMIN}\n")).expect("write");
    let out = cbtctl(&["--token-file", f.to_str().expect("utf-8"), "jobs"], None);
    assert!(out.status.success(), "--token-file: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("jobs"),
        "{out:?}"
    );

    let out = cbtctl(&["--token", ADMIN, "jobs"], None);
    assert!(
        !out.status.success(),
        "--token in argv was accepted: {out:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CBT_TOKEN") && err.contains("--token-file"),
        "the refusal says where the token goes: {err}"
    );
}
