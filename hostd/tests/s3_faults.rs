//! The S3 and Swift sinks under faults, between them and a real SeaweedFS or Swift: a fault proxy in the test (HTTP,
//! request by request) answers `503 SlowDown` in the server's place, forwards a request and
//! loses its answer, delays answers, or plays dead. Retried faults succeed (a create-only write
//! whose answer was lost is recognised as our own), a persistent fault or a silent server fails
//! within the configured time, and a server that dies under a backup fails the job cleanly:
//! no manifest, the previous chain intact, and the next backup works and restores exactly.
//! In front of a real Keystone the proxy counts logins and can shorten the life a login answer
//! states, so that a token's renewal before its expiry is seen.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use libcbt::engine::{catalog, BackupOptions};
use libcbt::job::{self, DiskSpec};
use libcbt::sink::s3::{S3Config, S3Sink};
use libcbt::sink::swift::{SwiftAuth, SwiftSink};
use libcbt::sink::Secret;
use libcbt::sink::{Sink, SinkError};
use libcbt::source::qemu::Requested;
use support::common::lab::{assert_sink_holds_only, guest_writes, restore_matches, Lab};
use support::common::s3::{seaweed, S3Server};
use support::common::swift::swift;
use support::common::{chain, rng, seed};

/// What the proxy does to the requests it sees.
#[derive(Default)]
struct Faults {
    /// Answer this many requests with 503 SlowDown, without forwarding them.
    slow_down: AtomicUsize,
    /// Forward this many requests, then answer 503 in place of the server's answer.
    lose_answer: AtomicUsize,
    /// Hold every answer this long.
    delay_ms: AtomicUsize,
    /// Answer every request with 503 (a persistent fault).
    always_503: AtomicBool,
    /// Close every connection at once, answering nothing (a dead server).
    dead: AtomicBool,
    /// Forward this many manifest writes (PUTs), each time dropping the connection instead
    /// of answering.
    cut_manifest_answer: AtomicUsize,
    /// After this many more forwarded requests, play dead (0: never).
    die_after: AtomicUsize,
    /// Keystone logins seen (`POST …/auth/tokens`).
    logins: AtomicUsize,
    /// Rewrite the `expires_at` of login answers to this many seconds from now (0: leave).
    token_life_secs: AtomicUsize,
    /// Requests seen and faults injected.
    seen: AtomicUsize,
    injected: AtomicUsize,
}

fn take(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

fn slow_down() -> Response<Full<Bytes>> {
    Response::builder()
        .status(503)
        .header("content-type", "application/xml")
        .body(Full::new(Bytes::from_static(
            b"<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>injected</Message></Error>",
        )))
        .expect("response")
}

async fn forward(
    upstream: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, String> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    send(upstream, Request::from_parts(parts, Full::new(body))).await
}

/// Sends `req` to `upstream` on a connection of its own; returns the whole answer.
async fn send(
    upstream: SocketAddr,
    req: Request<Full<Bytes>>,
) -> Result<Response<Full<Bytes>>, String> {
    let s = tokio::net::TcpStream::connect(upstream)
        .await
        .map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}

/// A Keystone login answer whose token's `expires_at` says `secs` from now.
async fn shorten_token_life(r: Response<Full<Bytes>>, secs: i64) -> Response<Full<Bytes>> {
    let (mut parts, body) = r.into_parts();
    let Ok(bytes) = body.collect().await.map(|b| b.to_bytes());
    let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Response::from_parts(parts, Full::new(bytes));
    };
    let at = chrono::Utc::now() + chrono::Duration::seconds(secs);
    doc["token"]["expires_at"] = at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string().into();
    parts.headers.remove(hyper::header::CONTENT_LENGTH);
    Response::from_parts(parts, Full::new(Bytes::from(doc.to_string())))
}

/// The address of a test server's `http://HOST:PORT[/path]` URL.
fn host_of(url: &str) -> SocketAddr {
    let rest = url.strip_prefix("http://").expect("an http URL");
    rest.split('/')
        .next()
        .unwrap_or(rest)
        .parse()
        .expect("HOST:PORT")
}

/// Starts the proxy in front of `upstream`; returns its address.
async fn proxy(upstream: SocketAddr, faults: Arc<Faults>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            if faults.dead.load(Ordering::SeqCst) {
                drop(s);
                continue;
            }
            let f = faults.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let f = f.clone();
                    async move {
                        f.seen.fetch_add(1, Ordering::SeqCst);
                        let login = req.method() == hyper::Method::POST
                            && req.uri().path().ends_with("/auth/tokens");
                        if login {
                            f.logins.fetch_add(1, Ordering::SeqCst);
                            let life = f.token_life_secs.load(Ordering::SeqCst);
                            if life > 0 {
                                return match forward(upstream, req).await {
                                    Ok(r) => Ok(shorten_token_life(r, life as i64).await),
                                    Err(e) => Err(e),
                                };
                            }
                        }
                        if f.dead.load(Ordering::SeqCst) {
                            return Err("dead".to_string());
                        }
                        let delay = f.delay_ms.load(Ordering::SeqCst);
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_millis(delay as u64)).await;
                        }
                        if f.always_503.load(Ordering::SeqCst) || take(&f.slow_down) {
                            f.injected.fetch_add(1, Ordering::SeqCst);
                            return Ok(slow_down());
                        }
                        let manifest = req.method() == hyper::Method::PUT
                            && req.uri().path().ends_with(".manifest");
                        let r = forward(upstream, req).await;
                        if manifest && take(&f.cut_manifest_answer) {
                            f.injected.fetch_add(1, Ordering::SeqCst);
                            return Err("answer cut".to_string());
                        }
                        if f.die_after.load(Ordering::SeqCst) > 0
                            && f.die_after.fetch_sub(1, Ordering::SeqCst) == 1
                        {
                            f.dead.store(true, Ordering::SeqCst);
                        }
                        if take(&f.lose_answer) {
                            f.injected.fetch_add(1, Ordering::SeqCst);
                            return Ok(slow_down());
                        }
                        r
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// The server's config, through a proxy with `faults`.
async fn through_proxy(sw: &S3Server, prefix: &str, faults: &Arc<Faults>) -> S3Config {
    let addr = proxy(host_of(&sw.endpoint), faults.clone()).await;
    S3Config {
        endpoint: format!("http://{addr}"),
        ..sw.config(prefix)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_faults_succeed_and_a_lost_commit_answer_is_recognised() {
    let sw = seaweed().await;
    let faults = Arc::new(Faults::default());
    let cfg = through_proxy(sw, "retries", &faults).await;
    let s = S3Sink::open(&cfg).await.expect("open");
    retries_and_lost_commit_answers(&s, &faults).await;
}

/// 503s are retried; a create-only commit whose answer was lost is recognised as ours, and a
/// rival's object under that name stays a conflict.
async fn retries_and_lost_commit_answers<S: Sink>(s: &S, faults: &Faults) {
    // 503 SlowDown three times: the sink retries, the calls succeed.
    faults.slow_down.store(3, Ordering::SeqCst);
    s.put("a/x", b"one".to_vec()).await.expect("put after 503s");
    assert_eq!(s.get("a/x", 10).await.expect("get"), b"one");
    assert_eq!(s.list("a/").await.expect("list").len(), 1);
    assert_eq!(faults.injected.load(Ordering::SeqCst), 3);
    // A create-only commit that reached the server but whose answer was lost: the retry is
    // refused (412) by the server, and put_new tells its own first attempt from a rival's.
    faults.lose_answer.store(1, Ordering::SeqCst);
    s.put_new("m/b1.manifest", b"ours".to_vec())
        .await
        .expect("a commit whose answer was lost is ours");
    assert_eq!(faults.injected.load(Ordering::SeqCst), 4);
    assert_eq!(s.get("m/b1.manifest", 10).await.expect("get"), b"ours");
    // A rival's object under that name stays a conflict, whatever the retries.
    faults.lose_answer.store(1, Ordering::SeqCst);
    s.put_new("m/b2.manifest", b"rival".to_vec())
        .await
        .expect("first");
    faults.lose_answer.store(1, Ordering::SeqCst);
    assert!(matches!(
        s.put_new("m/b2.manifest", b"mine".to_vec()).await,
        Err(SinkError::Exists { .. })
    ));
    assert_eq!(s.get("m/b2.manifest", 10).await.expect("get"), b"rival");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_fault_or_a_silent_server_fails_within_the_configured_time() {
    let sw = seaweed().await;
    let faults = Arc::new(Faults::default());
    let mut cfg = through_proxy(sw, "persistent", &faults).await;
    cfg.retry_timeout = Duration::from_secs(3);
    cfg.request_timeout = Duration::from_secs(2);
    let s = S3Sink::open(&cfg).await.expect("open");
    faults.always_503.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let e = s.put("a/x", vec![1]).await.expect_err("a persistent 503");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        chain(&e).contains("503") || chain(&e).contains("SlowDown"),
        "{}",
        chain(&e)
    );
    assert!(faults.injected.load(Ordering::SeqCst) >= 2, "no retry");
    faults.always_503.store(false, Ordering::SeqCst);
    // Answers slower than the request timeout: failed in bounded time, not hung.
    faults.delay_ms.store(5_000, Ordering::SeqCst);
    let t = Instant::now();
    let e = s.get("a/none", 10).await.expect_err("a silent server");
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(12),
        "took {took:?}: {}",
        chain(&e)
    );
    // Slow but within the timeout: fine.
    faults.delay_ms.store(300, Ordering::SeqCst);
    s.put("a/y", vec![2]).await.expect("slow answers");
    assert_eq!(s.get("a/y", 10).await.expect("get"), [2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dying_under_a_backup_fails_it_cleanly_and_the_next_one_works() {
    let mut r = rng(seed("s3_dies"));
    let sw = seaweed().await;
    let faults = Arc::new(Faults::default());
    let prefix = format!("dies-{}", std::process::id());
    let mut cfg = through_proxy(sw, &prefix, &faults).await;
    cfg.retry_timeout = Duration::from_secs(3);
    cfg.max_retries = 2;
    let s = S3Sink::open(&cfg).await.expect("open");
    // The same bucket, straight to the server: what is really there.
    let direct = sw.sink(&prefix).await;
    let lab = Lab::new(&[("d0", "qcow2")], 64 << 20).await;
    let specs = vec![DiskSpec {
        node: "d0".into(),
        disk: "vm-d0".into(),
    }];
    let opts = BackupOptions {
        segment_size: 4 << 20,
        ..Default::default()
    };
    let backup = |id: &'static str| {
        let (s, lab, specs, opts) = (&s, &lab, &specs, &opts);
        async move {
            job::backup_qemu(
                &lab.source,
                s,
                &id.parse().expect("id"),
                specs,
                Requested::Auto,
                opts,
            )
            .await
        }
    };
    guest_writes(&lab.live[0], &mut r, 40).await;
    let ref0 = lab.path("ref-b0.raw");
    lab.reference(0, &ref0);
    backup("b0").await.expect("b0");
    // A manifest write that reached the server but whose answers were all cut, the retries'
    // too: the sink reports an error, yet the backup is committed; it must not be rolled back.
    guest_writes(&lab.live[0], &mut r, 20).await;
    let ref_c = lab.path("ref-c.raw");
    lab.reference(0, &ref_c);
    faults.cut_manifest_answer.store(10, Ordering::SeqCst);
    let injected = faults.injected.load(Ordering::SeqCst);
    backup("c1")
        .await
        .expect("a commit whose answer was cut is a commit");
    assert!(
        faults.injected.load(Ordering::SeqCst) > injected + 1,
        "no retry was cut"
    );
    faults.cut_manifest_answer.store(0, Ordering::SeqCst);
    restore_matches(&direct, "vm-d0", "c1", &ref_c).await;
    // The server goes away in the middle of the next backup's upload: after its catalog reads,
    // its marker and a few of its segments.
    guest_writes(&lab.live[0], &mut r, 60).await;
    let before = faults.seen.load(Ordering::SeqCst);
    faults.die_after.store(10, Ordering::SeqCst);
    let t = Instant::now();
    let e = backup("b1").await.expect_err("a backup to a dead server");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
    eprintln!(
        "failed after {} requests: {}",
        faults.seen.load(Ordering::SeqCst) - before,
        chain(&e)
    );
    // It died mid-upload: the marker and some segments of b1 are on the server.
    use libcbt::format::{layout, Marker};
    let marker = direct
        .get(&layout::marker_name("vm-d0", "b1"), 4096)
        .await
        .expect("b1's marker is there");
    let prefix = Marker::decode(&marker)
        .expect("marker")
        .prefix()
        .expect("prefix");
    let written = direct
        .list(&layout::segment_prefix_name("vm-d0", prefix))
        .await
        .expect("list")
        .len();
    assert!(written >= 1, "the server died before any segment of b1");
    // Nothing committed; the previous chain is intact and restores exactly.
    let latest = catalog::latest(&direct, "vm-d0")
        .await
        .expect("catalog")
        .expect("b0");
    assert_eq!(latest.backup_id, "c1");
    assert!(catalog::read_manifest(&direct, "vm-d0", "b1")
        .await
        .expect("read")
        .is_none());
    restore_matches(&direct, "vm-d0", "b0", &ref0).await;
    restore_matches(&direct, "vm-d0", "c1", &ref_c).await;
    // The server is back: what the dead job left is removed by its marker, the next backup
    // works (an incremental on b0) and restores exactly.
    faults.dead.store(false, Ordering::SeqCst);
    catalog::abandon_backup(&direct, "vm-d0", "b1")
        .await
        .expect("abandon");
    let ref2 = lab.path("ref-b2.raw");
    lab.reference(0, &ref2);
    let res = backup("b2").await.expect("b2 after the server is back");
    restore_matches(&direct, "vm-d0", "b2", &ref2).await;
    let all = catalog::list_backups(&direct, "vm-d0").await.expect("list");
    assert_eq!(
        all.iter().map(|m| m.backup_id.as_str()).collect::<Vec<_>>(),
        ["b0", "c1", "b2"]
    );
    assert_eq!(res[0].manifest.parent.as_deref(), Some("c1"));
    assert_sink_holds_only(&direct, &all.iter().collect::<Vec<_>>()).await;
    assert!(direct.list("inprogress/").await.expect("list").is_empty());
}

/// The Swift sink under the same faults, through the proxy (both the login and the storage
/// URL): 503s are retried, a create-only commit whose answer was lost is recognised as ours
/// and a rival's is not, and a persistent fault fails within the configured time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swift_retries_faults_and_recognises_a_lost_commit_answer() {
    let sw = swift().await;
    let faults = Arc::new(Faults::default());
    let addr = proxy(host_of(&sw.proxy), faults.clone()).await;
    let mut cfg = sw.config("faults");
    cfg.auth = SwiftAuth::TempAuth {
        auth_url: format!("http://{addr}/auth/v1.0"),
        user: "cbt:tester".into(),
        key: Secret(sw.key.clone()),
    };
    cfg.storage_url = Some(format!("http://{addr}/v1/AUTH_cbt"));
    let s = SwiftSink::open(&cfg).await.expect("open");
    retries_and_lost_commit_answers(&s, &faults).await;

    cfg.retry_timeout = Duration::from_secs(3);
    cfg.request_timeout = Duration::from_secs(2);
    let s = SwiftSink::open(&cfg).await.expect("open");
    faults.always_503.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let e = s.put("a/y", vec![1]).await.expect_err("a persistent 503");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert!(chain(&e).contains("503"), "{}", chain(&e));
    faults.always_503.store(false, Ordering::SeqCst);
}

/// Keystone tokens are renewed before they expire (at half their life), not after a refusal:
/// the proxy in front of a real Keystone shortens the life its login answers state to 30 s,
/// and a request past half of that logs in again first (two logins seen by the proxy), where
/// a sink that waited for a 401 would have kept the token (it is good for an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swift_keystone_tokens_are_renewed_before_they_expire() {
    let sw = swift().await;
    sw.keystone_up().await;
    let keystone = host_of(&sw.keystone);
    let faults = Arc::new(Faults::default());
    let life = Duration::from_secs(30);
    faults
        .token_life_secs
        .store(life.as_secs() as usize, Ordering::SeqCst);
    let addr = proxy(keystone, faults.clone()).await;
    let mut cfg = sw.keystone_config("alice", &format!("expiry-{}", std::process::id()));
    if let SwiftAuth::Password { auth_url, .. } = &mut cfg.auth {
        *auth_url = format!("http://{addr}/v3");
    }
    let t0 = tokio::time::Instant::now();
    let s = SwiftSink::open(&cfg).await.expect("open");
    s.put("a", b"1".to_vec()).await.expect("put");
    assert_eq!(faults.logins.load(Ordering::SeqCst), 1, "one login at open");
    tokio::time::sleep_until(t0 + life / 4).await;
    s.put("b", b"2".to_vec()).await.expect("put");
    assert_eq!(
        faults.logins.load(Ordering::SeqCst),
        1,
        "a young token is kept"
    );
    tokio::time::sleep_until(t0 + life / 2 + Duration::from_secs(2)).await;
    s.put("c", b"3".to_vec())
        .await
        .expect("put past half the life");
    assert_eq!(
        faults.logins.load(Ordering::SeqCst),
        2,
        "a request past half the token's life logs in again first"
    );
    assert_eq!(s.get("a", 10).await.expect("get"), b"1");
}
