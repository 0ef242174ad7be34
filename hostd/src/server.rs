//! Listeners (Unix socket, TCP with TLS), start-up reconciliation, systemd notification and
//! the watchdog, and the orderly stop on SIGTERM.
//!
//! The TLS listener faces the network, so every connection is bounded: at most
//! `server.max_connections` at once (a semaphore permit taken at accept, before the
//! handshake; beyond it the connection is closed at once), 10 s for the handshake,
//! `header_read_timeout_secs` for a request header, `idle_timeout_secs` without a byte
//! moving (see `serve_tls`). The Unix socket is root's and has none of these.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::config::Config;
use crate::journal::Journal;
use crate::state::AppState;

fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("tls_cert {}", cert.display()))?,
    ))
    .collect::<Result<_, _>>()
    .with_context(|| format!("tls_cert {}", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("tls_key {}", key.display()))?,
    ))
    .with_context(|| format!("tls_key {}", key.display()))?
    .with_context(|| format!("tls_key {}: no private key", key.display()))?;
    let c = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("TLS certificate and key do not match")?;
    Ok(Arc::new(c))
}

/// Loads what `--check-config` checks beyond the TOML itself: TLS material and sinks.
pub fn check(cfg: &Config) -> Result<()> {
    if let (Some(c), Some(k)) = (&cfg.server.tls_cert, &cfg.server.tls_key) {
        tls_config(c, k)?;
    }
    for s in &cfg.sinks {
        if let Some(p) = s.local_path() {
            if p.exists() && !p.is_dir() {
                anyhow::bail!("sink {}: {} is not a directory", s.name, p.display());
            }
        }
    }
    Ok(())
}

/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// At most one "max_connections reached" warning this often.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// Time limits of one TLS connection, from `[server]`.
#[derive(Clone, Copy)]
struct ConnLimits {
    header_read: Duration,
    idle: Duration,
}

impl ConnLimits {
    fn of(s: &crate::config::Server) -> ConnLimits {
        ConnLimits {
            header_read: Duration::from_secs(s.header_read_timeout_secs),
            idle: Duration::from_secs(s.idle_timeout_secs),
        }
    }
}

/// When bytes last moved on a connection, in milliseconds since `epoch`.
#[derive(Clone)]
struct Activity {
    epoch: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A connection's transport that notes in an [`Activity`] every read or write that moved
/// bytes: the idle timeout counts from the last of them.
struct Tracked<T> {
    inner: T,
    activity: Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves HTTP/1.1 on one TLS connection until it ends or times out.
///
/// - A request header must arrive within `header_read` of the first read for it; on a
///   kept-alive connection hyper starts that clock when the previous response has been
///   written, so it also bounds the wait for the next request.
/// - When no byte has moved for `idle`, the connection is shut down gracefully: closed at
///   once when no request is in flight, else keep-alive is switched off and it closes when
///   the exchange ends (a quiet SSE stream is not cut; it sends a keep-alive every 15 s).
/// - A connection still silent `idle` later (a stalled request body, a client that does not
///   read its response) is dropped.
async fn serve_tls<T>(io: T, router: axum::Router, limits: ConnLimits, peer: SocketAddr)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let io = Tracked {
        inner: io,
        activity: activity.clone(),
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(router));
    tokio::pin!(conn);
    let mut shutting_down = false;
    loop {
        let quiet_limit = if shutting_down {
            limits.idle * 2
        } else {
            limits.idle
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
                return;
            }
            _ = tokio::time::sleep_until((activity.last() + quiet_limit).into()) => {
                if activity.last().elapsed() < quiet_limit {
                    continue; // bytes moved meanwhile
                }
                if shutting_down {
                    tracing::debug!(%peer, "dropping a connection silent for twice the idle timeout");
                    return;
                }
                tracing::debug!(%peer, "idle timeout: closing the connection");
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Mode of the directories QEMU's user must traverse and nobody else may list or write:
/// `state_dir` and the scratch root (QEMU's NBD sockets live below), and the restore
/// directories (staging copies' images live below). Set on the directories the daemon
/// creates, whatever the umask.
pub const TRAVERSE_ONLY_DIR_MODE: u32 = 0o711;

/// Creates `path` and its missing parents; each directory created here gets `mode`. Existing
/// directories keep theirs.
fn create_dirs(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dirs(parent, mode)?;
    }
    match std::fs::create_dir(path) {
        // create_dir's mode is masked by the umask (0077 here): set it as asked.
        Ok(()) => std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates `state_dir` (0711) or checks an existing one.
///
/// A `state_dir` writable by group or others, or owned by another user, is refused: whoever
/// can write there can replace the journal (and so what a restart cleans up) or the scratch
/// root on the way to QEMU's NBD socket; the operator must look at how it got that way.
/// One merely readable by others (0755, what earlier versions and `StateDirectoryMode=0755`
/// made) is narrowed to 0711, with a warning: listing it tells others which instances are
/// being backed up, and nothing needs that.
fn prepare_state_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    create_dirs(dir, TRAVERSE_ONLY_DIR_MODE)
        .with_context(|| format!("state_dir {}", dir.display()))?;
    let md = std::fs::metadata(dir).with_context(|| format!("state_dir {}", dir.display()))?;
    let mode = md.mode() & 0o7777;
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    if md.uid() != euid && md.uid() != 0 {
        anyhow::bail!(
            "state_dir {} is owned by uid {}, not by root or by us (uid {euid}); refusing to \
             start: its owner could replace the journal or the scratch directory",
            dir.display(),
            md.uid()
        );
    }
    if mode & 0o022 != 0 {
        anyhow::bail!(
            "state_dir {} is writable by group or others (mode {mode:04o}); refusing to start: \
             whoever can write there can replace the journal or the scratch directory. Check \
             how it got so, then `chmod 0711` it",
            dir.display()
        );
    }
    if mode & 0o044 != 0 {
        let narrowed = mode & !0o044;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(narrowed))
            .with_context(|| format!("state_dir {}", dir.display()))?;
        tracing::warn!(
            state_dir = %dir.display(),
            "state_dir was readable by group or others (mode {mode:04o}); narrowed to {narrowed:04o}"
        );
    }
    Ok(())
}

pub async fn run(cfg: Config) -> Result<()> {
    let s = &cfg.server;
    prepare_state_dir(&s.state_dir)?;
    create_dirs(&s.scratch(), TRAVERSE_ONLY_DIR_MODE)
        .with_context(|| format!("scratch {}", s.scratch().display()))?;
    for d in &s.restore_dirs {
        create_dirs(d, TRAVERSE_ONLY_DIR_MODE)
            .with_context(|| format!("restore_dir {}", d.display()))?;
    }
    for p in cfg.sinks.iter().filter_map(|k| k.local_path()) {
        std::fs::create_dir_all(p).with_context(|| format!("sink {}", p.display()))?;
    }
    // Mounts of a previous life are gone with it: their sockets too.
    crate::mounts::Mounts::prepare(&s.state_dir)
        .with_context(|| format!("{}/mounts", s.state_dir.display()))?;
    let journal = Journal::open(&s.journal()).context("opening the job journal")?;
    let st = AppState::new(cfg.clone(), journal);
    st.mounts.record_in(st.journal.clone());
    // Each sink opened once (an object store is probed here); one that is down is retried
    // at its first use rather than keeping the daemon from serving the others.
    st.open_sinks().await;

    // Nothing is served before what a previous life left behind is sorted out: first the
    // guests it held (frozen or paused), then its jobs.
    crate::groups::release_recorded(&st).await;
    let unfinished = st.journal.unfinished().context("reading the job journal")?;
    for row in &unfinished {
        crate::recover::reconcile(&st, row).await;
    }
    if !unfinished.is_empty() {
        tracing::info!(jobs = unfinished.len(), "reconciled interrupted jobs");
    }
    // Mounts a previous life left are served again at their sockets (instant copies boot
    // and run from them), before any request could prune what they read.
    crate::mounts::serve_recorded(&st).await;
    // After reconciliation: its roll-backs come before any garbage collection.
    crate::recover::start_housekeeping(&st);

    let router = crate::api::router(st.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    // The TCP listener is bound first: once the Unix socket exists, every door is open (what
    // the tests and a supervisor that waits for the socket rely on).
    let tcp = match s.listen {
        Some(addr) => {
            let (Some(c), Some(k)) = (&s.tls_cert, &s.tls_key) else {
                anyhow::bail!("server.listen needs tls_cert and tls_key");
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls_config(c, k)?);
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            Some((addr, acceptor, l))
        }
        None => None,
    };
    if let Some(path) = &s.unix_socket {
        use std::os::unix::fs::PermissionsExt;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let _ = std::fs::remove_file(path);
        let l = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("binding {}", path.display()))?;
        // Root only: the socket is the admin's door.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let (r, mut rx) = (router.clone(), stop_rx.clone());
        servers.spawn(async move {
            let _ = axum::serve(l, r)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|v| *v).await;
                })
                .await;
        });
        tracing::info!(socket = %path.display(), "listening");
    }
    if let Some((addr, acceptor, l)) = tcp {
        let (r, mut rx) = (router.clone(), stop_rx.clone());
        let limits = ConnLimits::of(s);
        let slots = Arc::new(tokio::sync::Semaphore::new(s.max_connections));
        servers.spawn(async move {
            let mut last_full_warning: Option<Instant> = None;
            loop {
                let conn = tokio::select! {
                    c = l.accept() => c,
                    _ = rx.wait_for(|v| *v) => break,
                };
                let (tcp, peer) = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors (EMFILE) and the like: accept fails again at
                        // once, so back off instead of spinning.
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                };
                // Full: the connection is closed at once rather than left in the backlog,
                // so the accept queue keeps draining and the client learns it now.
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    drop(tcp);
                    if last_full_warning.is_none_or(|t| t.elapsed() >= FULL_WARNING_EVERY) {
                        last_full_warning = Some(Instant::now());
                        tracing::warn!(%peer, "server.max_connections reached; closing new connections");
                    }
                    continue;
                };
                let (acc, r) = (acceptor.clone(), r.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acc.accept(tcp))
                        .await
                    {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    serve_tls(tls, r, limits, peer).await;
                });
            }
        });
        tracing::info!(%addr, "listening (TLS)");
    }

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let period = Duration::from_micros(usec / 2);
        tokio::spawn(async move {
            loop {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                tokio::time::sleep(period).await;
            }
        });
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "cbt-hostd ready");

    shutdown_signal().await;
    tracing::info!("stopping: cancelling running jobs");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    st.shutting_down.store(true, Ordering::SeqCst);
    for j in st.jobs.all() {
        j.cancel.store(true, Ordering::SeqCst);
    }
    crate::groups::release_all(&st).await;
    let grace = Duration::from_secs(st.cfg.server.shutdown_grace_secs);
    let t = Instant::now();
    while st.jobs.active() > 0 && t.elapsed() < grace {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if st.jobs.active() > 0 {
        tracing::warn!(
            jobs = st.jobs.active(),
            "jobs still running at the end of the grace period; the next start reconciles them"
        );
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    if let Some(p) = &st.cfg.server.unix_socket {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!("stopped");
    Ok(())
}
