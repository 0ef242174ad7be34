//! A read-only NBD server for one export: fixed newstyle handshake (`NBD_OPT_GO`, `INFO`,
//! `EXPORT_NAME`, `LIST`, structured replies, the `base:allocation` meta context), then
//! pipelined transmission (reads answered with `OFFSET_DATA` and `OFFSET_HOLE` chunks, block
//! status, flush and cache as no-ops; writes, trims and zeroes refused with `EPERM`). Any
//! number of connections (`CAN_MULTI_CONN`: the export never changes).
//!
//! The wire format is [`super::proto`], shared with the client; what is served is an
//! [`Export`] (a backup: [`crate::engine::export::BackupExport`]). A failed read is an `EIO`
//! answer to that request, never a dropped connection; a client that breaks the protocol is
//! disconnected.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, Semaphore};

use super::proto::{self, chunk, cmd, cmd_flag, errno, handshake, info, opt, rep, tflag};
use super::BASE_ALLOCATION;
use crate::engine::export::Span;

/// What a server serves.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// `offset..offset + len` (inside the export) as data and holes, in order, covering it;
    /// an error becomes an `EIO` answer with the message.
    fn read(&self, offset: u64, len: u64)
        -> impl Future<Output = Result<Vec<Span>, String>> + Send;
    /// Allocation from `offset`: `(length, hole)` runs covering at most `len` bytes, at most
    /// `max` of them, at least one.
    fn allocation(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)>;
}

impl<S: crate::sink::Sink> Export for crate::engine::export::BackupExport<S> {
    fn size(&self) -> u64 {
        crate::engine::export::BackupExport::size(self)
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Vec<Span>, String> {
        crate::engine::export::BackupExport::read(self, offset, len)
            .await
            .map_err(|e| crate::error_chain(&e))
    }

    fn allocation(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        crate::engine::export::BackupExport::allocation(self, offset, len, max)
    }
}

/// How a server behaves.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The export's name; a client may also ask for the default export (`""`).
    pub name: String,
    /// Shown to clients that ask (`NBD_INFO_DESCRIPTION`).
    pub description: String,
    /// Requests of one connection answered at once.
    pub in_flight: usize,
    /// A client must finish its handshake within this.
    pub handshake_timeout: Duration,
    /// Connections of one export at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Bytes of reads in flight over all connections of one export, in KiB (each read holds
    /// its length until its answer is written): what bounds the memory of reads.
    pub read_budget_kib: usize,
    /// A reply the client does not take within this ends its connection.
    pub write_timeout: Duration,
    /// TLS, required of every client when set (`NBD_OPT_STARTTLS` first; anything else is
    /// `NBD_REP_ERR_TLS_REQD`). See [`tls_config`].
    pub tls: Option<Tls>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            name: String::new(),
            description: "cbt backup (read-only)".into(),
            in_flight: 16,
            handshake_timeout: Duration::from_secs(30),
            max_connections: 64,
            read_budget_kib: 256 << 10,
            write_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

/// Why a connection ended other than by the client's `NBD_CMD_DISC` or `NBD_OPT_ABORT`.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] proto::ProtoError),
    #[error("{0}")]
    Refused(String),
    #[error("handshake took longer than {0:?}")]
    Timeout(Duration),
}

/// Most block-status descriptors in one answer.
const MAX_DESCRIPTORS: usize = 1 << 16;
/// Id of `base:allocation` on a connection.
const BASE_ALLOCATION_ID: u32 = 1;
/// Largest request; also the advertised maximum block size.
const MAX_REQUEST: u32 = proto::MAX_IO_REQUEST;

/// What the handshake settled.
struct Session {
    structured: bool,
    base_allocation: bool,
}

fn transmission_flags(structured: bool) -> u16 {
    let mut f = tflag::HAS_FLAGS
        | tflag::READ_ONLY
        | tflag::SEND_FLUSH
        | tflag::SEND_CACHE
        | tflag::CAN_MULTI_CONN;
    if structured {
        f |= tflag::SEND_DF;
    }
    f
}

/// A listening socket the server accepts connections on.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_io(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_io(&self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(c, _)| c)
    }
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_io(&self) -> std::io::Result<Self::Io> {
        let (c, _) = self.accept().await?;
        // Only latency: a failure is no reason to drop the connection.
        let _ = c.set_nodelay(true);
        Ok(c)
    }
}

/// Serves `export` on every connection `listener` accepts, until the future is dropped,
/// which ends every connection too.
pub async fn serve_unix<E: Export>(
    listener: tokio::net::UnixListener,
    export: Arc<E>,
    opts: Arc<ServerOptions>,
) -> std::io::Result<()> {
    serve(listener, export, opts).await
}

/// [`serve_unix`] on TCP: for another host (a remote site's recovery). Refused without TLS
/// that checks client certificates (an export over TCP is the whole disk to whoever connects).
pub async fn serve_tcp<E: Export>(
    listener: tokio::net::TcpListener,
    export: Arc<E>,
    opts: Arc<ServerOptions>,
) -> std::io::Result<()> {
    if !opts.tls.as_ref().is_some_and(|t| t.client_auth) {
        return Err(std::io::Error::other(
            "an NBD export over TCP needs TLS with client certificates",
        ));
    }
    serve(listener, export, opts).await
}

async fn serve<L: Listener, E: Export>(
    listener: L,
    export: Arc<E>,
    opts: Arc<ServerOptions>,
) -> std::io::Result<()> {
    let mut conns = tokio::task::JoinSet::new();
    let budget = Arc::new(Semaphore::new(
        opts.read_budget_kib.max(MAX_REQUEST as usize >> 10),
    ));
    loop {
        let accepted = tokio::select! {
            c = listener.accept_io() => c,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let conn = match accepted {
            Ok(c) => c,
            // Out of descriptors, a connection aborted before it was taken: the export goes
            // on, a little later.
            Err(e) => {
                tracing::warn!(error = %e, "NBD accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if conns.len() >= opts.max_connections {
            tracing::warn!(
                max = opts.max_connections,
                "NBD connection refused: too many"
            );
            drop(conn);
            continue;
        }
        let (e, o, b) = (export.clone(), opts.clone(), budget.clone());
        conns.spawn(async move {
            if let Err(err) = serve_with(conn, e, o, b).await {
                tracing::debug!(error = %err, "NBD connection ended");
            }
        });
    }
}

/// Serves one connection: handshake, then transmission until the client disconnects.
pub async fn serve_connection<E: Export, IO>(
    io: IO,
    export: Arc<E>,
    opts: Arc<ServerOptions>,
) -> Result<(), ServerError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let budget = Arc::new(Semaphore::new(
        opts.read_budget_kib.max(MAX_REQUEST as usize >> 10),
    ));
    serve_with(io, export, opts, budget).await
}

/// [`serve_connection`] with the export's budget of read bytes in flight (KiB permits).
async fn serve_with<E: Export, IO>(
    io: IO,
    export: Arc<E>,
    opts: Arc<ServerOptions>,
    budget: Arc<Semaphore>,
) -> Result<(), ServerError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The whole handshake, TLS included, within one deadline.
    let deadline = tokio::time::Instant::now() + opts.handshake_timeout;
    let late = || ServerError::Timeout(opts.handshake_timeout);
    let (n, t) = (opts.in_flight.max(1), opts.write_timeout);
    let (mut rd, mut wr) = tokio::io::split(io);
    let first = tokio::time::timeout_at(deadline, async {
        let no_zeroes = greet(&mut rd, &mut wr).await?;
        let s = options(&mut rd, &mut wr, export.as_ref(), &opts, no_zeroes, false).await?;
        Ok::<_, ServerError>((no_zeroes, s))
    })
    .await
    .map_err(|_| late())??;
    match first {
        (_, Shake::Aborted) => Ok(()),
        (_, Shake::Go(s)) => transmission(rd, wr, export, s, n, budget, t).await,
        (no_zeroes, Shake::StartTls) => {
            let Some(cfg) = opts.tls.as_ref().map(|t| t.config.clone()) else {
                return Err(ServerError::Refused("STARTTLS without TLS".into()));
            };
            let io = rd.unsplit(wr);
            let tls =
                tokio::time::timeout_at(deadline, tokio_rustls::TlsAcceptor::from(cfg).accept(io))
                    .await
                    .map_err(|_| late())??;
            let (mut rd, mut wr) = tokio::io::split(tls);
            let then = tokio::time::timeout_at(
                deadline,
                options(&mut rd, &mut wr, export.as_ref(), &opts, no_zeroes, true),
            )
            .await
            .map_err(|_| late())??;
            match then {
                Shake::Go(s) => transmission(rd, wr, export, s, n, budget, t).await,
                Shake::Aborted => Ok(()),
                Shake::StartTls => Err(ServerError::Refused("STARTTLS twice".into())),
            }
        }
    }
}

/// How the option haggling ended.
enum Shake {
    /// Transmission begins with what was settled.
    Go(Session),
    /// The client aborted.
    Aborted,
    /// `NBD_OPT_STARTTLS` was acknowledged: TLS starts on the connection, then options again.
    StartTls,
}

/// An export's TLS (see [`tls_config`]).
#[derive(Debug, Clone)]
pub struct Tls {
    pub config: Arc<rustls::ServerConfig>,
    /// Client certificates are required and checked (what [`serve_tcp`] insists on).
    pub client_auth: bool,
}

/// TLS for an export: its certificate chain and key (PEM), and, with `client_ca`, client
/// certificates required and checked against that CA (PEM). No revocation list is read: any
/// certificate the CA signed is let in.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> Result<Tls, String> {
    let open = |p: &std::path::Path| {
        std::fs::File::open(p)
            .map(std::io::BufReader::new)
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let certs: Vec<_> = rustls_pemfile::certs(&mut open(cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", cert.display()));
    }
    let key = rustls_pemfile::private_key(&mut open(key)?)
        .map_err(|e| format!("{}: {e}", key.display()))?
        .ok_or_else(|| format!("{}: no private key", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut open(ca)?) {
                roots
                    .add(c.map_err(|e| format!("{}: {e}", ca.display()))?)
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(v)
        }
    };
    builder
        .with_single_cert(certs, key)
        .map(|c| Tls {
            config: Arc::new(c),
            client_auth: client_ca.is_some(),
        })
        .map_err(|e| format!("the TLS certificate and key: {e}"))
}

async fn read_exact<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut [u8]) -> Result<(), ServerError> {
    rd.read_exact(buf).await?;
    Ok(())
}

/// Reads and drops `n` bytes.
async fn discard<R: AsyncRead + Unpin>(rd: &mut R, n: u64) -> Result<(), ServerError> {
    let got = tokio::io::copy(&mut (&mut *rd).take(n), &mut tokio::io::sink()).await?;
    if got != n {
        return Err(ServerError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

/// The greeting and the client's flags; whether the client asked for no zeroes.
async fn greet<R, W>(rd: &mut R, wr: &mut W) -> Result<bool, ServerError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let greeting = proto::Greeting {
        flags: handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES,
    };
    wr.write_all(&greeting.encode()).await?;
    wr.flush().await?;
    let mut b = [0u8; 4];
    read_exact(rd, &mut b).await?;
    let cflags = u32::from_be_bytes(b);
    if cflags & !(handshake::C_FIXED_NEWSTYLE | handshake::C_NO_ZEROES) != 0 {
        return Err(ServerError::Refused(format!(
            "unknown client flags {cflags:#x}"
        )));
    }
    Ok(cflags & handshake::C_NO_ZEROES != 0)
}

/// The option haggling, before TLS (`tls_on` false) or inside it. With TLS configured and not
/// on yet, only `STARTTLS` and `ABORT` are served.
async fn options<R, W, E>(
    rd: &mut R,
    wr: &mut W,
    export: &E,
    opts: &ServerOptions,
    no_zeroes: bool,
    tls_on: bool,
) -> Result<Shake, ServerError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    E: Export,
{
    let tls_first = opts.tls.is_some() && !tls_on;
    let mut s = Session {
        structured: false,
        base_allocation: false,
    };
    let ours = |name: &str| name.is_empty() || name == opts.name;
    loop {
        let mut h = [0u8; proto::OPTION_HEADER_LEN];
        read_exact(rd, &mut h).await?;
        let (option, len) = proto::decode_option_header(&h)?;
        if len > proto::MAX_OPTION_DATA {
            if option == opt::EXPORT_NAME {
                return Err(ServerError::Refused("export name too long".into()));
            }
            discard(rd, len.into()).await?;
            reply(wr, option, rep::ERR_TOO_BIG, b"option data too long").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        read_exact(rd, &mut data).await?;
        if tls_first && option != opt::STARTTLS && option != opt::ABORT {
            if option == opt::EXPORT_NAME {
                return Err(ServerError::Refused("TLS is required".into()));
            }
            reply(
                wr,
                option,
                rep::ERR_TLS_REQD,
                b"TLS is required: STARTTLS first",
            )
            .await?;
            continue;
        }
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                if !ours(&name) {
                    return Err(ServerError::Refused(format!("no export {name:?}")));
                }
                let flags = transmission_flags(s.structured);
                wr.write_all(&proto::encode_export_name_reply(
                    export.size(),
                    flags,
                    no_zeroes,
                ))
                .await?;
                wr.flush().await?;
                return Ok(Shake::Go(s));
            }
            opt::ABORT => {
                // The client may close first; its ack is best effort.
                let _ = reply(wr, option, rep::ACK, &[]).await;
                return Ok(Shake::Aborted);
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply(wr, option, rep::ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                reply(
                    wr,
                    option,
                    rep::SERVER,
                    &proto::encode_server_name(&opts.name)?,
                )
                .await?;
                reply(wr, option, rep::ACK, &[]).await?;
            }
            opt::INFO | opt::GO => {
                let (name, infos) = match proto::decode_go_data(&data) {
                    Ok(v) => v,
                    Err(e) => {
                        reply(wr, option, rep::ERR_INVALID, e.to_string().as_bytes()).await?;
                        continue;
                    }
                };
                if !ours(&name) {
                    reply(wr, option, rep::ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                let flags = transmission_flags(s.structured);
                reply(
                    wr,
                    option,
                    rep::INFO,
                    &proto::encode_info_export(export.size(), flags),
                )
                .await?;
                if infos.contains(&info::NAME) {
                    let d = proto::encode_info_string(info::NAME, &opts.name)?;
                    reply(wr, option, rep::INFO, &d).await?;
                }
                if infos.contains(&info::DESCRIPTION) {
                    let d = proto::encode_info_string(info::DESCRIPTION, &opts.description)?;
                    reply(wr, option, rep::INFO, &d).await?;
                }
                let bs = proto::BlockSize {
                    minimum: 1,
                    preferred: 4096,
                    maximum: MAX_REQUEST,
                };
                reply(wr, option, rep::INFO, &proto::encode_info_block_size(bs)).await?;
                reply(wr, option, rep::ACK, &[]).await?;
                if option == opt::GO {
                    return Ok(Shake::Go(s));
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(wr, option, rep::ERR_INVALID, b"takes no data").await?;
                    continue;
                }
                s.structured = true;
                reply(wr, option, rep::ACK, &[]).await?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = option == opt::SET_META_CONTEXT;
                // A SET replaces the selection, also when it fails.
                if set {
                    s.base_allocation = false;
                }
                if set && !s.structured {
                    reply(wr, option, rep::ERR_INVALID, b"structured replies first").await?;
                    continue;
                }
                let (name, queries) = match proto::decode_meta_context_data(&data) {
                    Ok(v) => v,
                    Err(e) => {
                        reply(wr, option, rep::ERR_INVALID, e.to_string().as_bytes()).await?;
                        continue;
                    }
                };
                if !ours(&name) {
                    reply(wr, option, rep::ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                let matches =
                    |q: &str| q == BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty()));
                let wanted = if !set && queries.is_empty() {
                    true
                } else {
                    queries.iter().any(|q| matches(q))
                };
                if set {
                    s.base_allocation = wanted;
                }
                if wanted {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    let d = proto::encode_meta_context(id, BASE_ALLOCATION)?;
                    reply(wr, option, rep::META_CONTEXT, &d).await?;
                }
                reply(wr, option, rep::ACK, &[]).await?;
            }
            opt::STARTTLS if tls_on => {
                reply(wr, option, rep::ERR_INVALID, b"TLS is on already").await?
            }
            opt::STARTTLS if opts.tls.is_some() => {
                if !data.is_empty() {
                    reply(wr, option, rep::ERR_INVALID, b"STARTTLS takes no data").await?;
                    continue;
                }
                reply(wr, option, rep::ACK, &[]).await?;
                return Ok(Shake::StartTls);
            }
            opt::STARTTLS => {
                reply(
                    wr,
                    option,
                    rep::ERR_POLICY,
                    b"TLS is not offered on this socket",
                )
                .await?
            }
            _ => reply(wr, option, rep::ERR_UNSUP, b"unsupported option").await?,
        }
    }
}

async fn reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    kind: u32,
    data: &[u8],
) -> Result<(), ServerError> {
    wr.write_all(&proto::encode_opt_reply(option, kind, data))
        .await?;
    wr.flush().await?;
    Ok(())
}

/// A connection's writing half, shared by its requests' answers, and how long one answer
/// may take to write.
struct Out<W> {
    w: Mutex<W>,
    timeout: Duration,
}

type Writer<W> = Arc<Out<W>>;

/// `f` within the connection's write timeout.
async fn timed<W, F>(wr: &Writer<W>, f: F) -> std::io::Result<()>
where
    F: Future<Output = std::io::Result<()>>,
{
    tokio::time::timeout(wr.timeout, f)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Writes one whole reply: its parts in order, with the writer held throughout.
async fn send<W: AsyncWrite + Unpin>(wr: &Writer<W>, parts: &[&[u8]]) -> std::io::Result<()> {
    timed(wr, async {
        let mut w = wr.w.lock().await;
        for p in parts {
            w.write_all(p).await?;
        }
        w.flush().await
    })
    .await
}

/// Answers `cookie` with `error` (0: success, no payload).
async fn send_status<W: AsyncWrite + Unpin>(
    wr: &Writer<W>,
    structured: bool,
    cookie: u64,
    error: u32,
    message: &str,
) -> std::io::Result<()> {
    if !structured {
        let h = proto::ReplyHeader::Simple { error, cookie }.encode();
        return send(wr, &[&h]).await;
    }
    let c = if error == 0 {
        proto::encode_none_chunk(cookie)
    } else {
        proto::encode_error_chunk(chunk::FLAG_DONE, cookie, error, message)
    };
    send(wr, &[&c]).await
}

async fn transmission<R, W, E>(
    mut rd: R,
    wr: W,
    export: Arc<E>,
    s: Session,
    in_flight: usize,
    budget: Arc<Semaphore>,
    write_timeout: Duration,
) -> Result<(), ServerError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    E: Export,
{
    let wr: Writer<W> = Arc::new(Out {
        w: Mutex::new(wr),
        timeout: write_timeout,
    });
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut tasks: tokio::task::JoinSet<std::io::Result<()>> = tokio::task::JoinSet::new();
    let size = export.size();
    let structured = s.structured;
    let result = loop {
        // Finished replies are collected as we go; a write error there ends the connection.
        while let Some(r) = tasks.try_join_next() {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.into()),
                // A request left unanswered: the client would wait for ever.
                Err(e) => return Err(ServerError::Refused(format!("a read failed: {e}"))),
            }
        }
        let mut h = [0u8; proto::REQUEST_LEN];
        match rd.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let req = match proto::Request::decode(&h) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        let known = cmd_flag::FUA
            | cmd_flag::NO_HOLE
            | cmd_flag::DF
            | cmd_flag::REQ_ONE
            | cmd_flag::FAST_ZERO;
        if req.kind == cmd::WRITE {
            // The payload follows: read past it (bounded), then refuse.
            if req.len > MAX_REQUEST {
                break Err(ServerError::Refused(format!(
                    "write of {} bytes past the maximum",
                    req.len
                )));
            }
            discard(&mut rd, req.len.into()).await?;
            send_status(
                &wr,
                structured,
                req.cookie,
                errno::EPERM,
                "read-only export",
            )
            .await?;
            continue;
        }
        if req.kind == cmd::DISC {
            break Ok(());
        }
        let in_range = req
            .offset
            .checked_add(req.len.into())
            .is_some_and(|e| e <= size);
        let bad = |m: &str| (errno::EINVAL, m.to_string());
        // Flags a command does not take (FUA, NO_HOLE and FAST_ZERO are for writes, which
        // are refused below anyway).
        let misplaced = (req.flags & cmd_flag::DF != 0 && req.kind != cmd::READ)
            || (req.flags & cmd_flag::REQ_ONE != 0 && req.kind != cmd::BLOCK_STATUS)
            || (req.flags & (cmd_flag::FUA | cmd_flag::NO_HOLE | cmd_flag::FAST_ZERO) != 0
                && matches!(req.kind, cmd::READ | cmd::BLOCK_STATUS | cmd::CACHE));
        let refused = if req.flags & !known != 0 {
            Some(bad("unknown command flags"))
        } else if misplaced {
            Some(bad("a flag this command does not take"))
        } else if !in_range && matches!(req.kind, cmd::READ | cmd::BLOCK_STATUS | cmd::CACHE) {
            Some(bad("past the export's end"))
        } else if req.len == 0 && matches!(req.kind, cmd::READ | cmd::BLOCK_STATUS) {
            Some(bad("zero length"))
        } else if req.kind == cmd::READ && req.len > MAX_REQUEST {
            Some(bad("read longer than the maximum block size"))
        } else if req.flags & cmd_flag::DF != 0 && !structured {
            Some(bad("DF without structured replies"))
        } else {
            None
        };
        if let Some((e, m)) = refused {
            send_status(&wr, structured, req.cookie, e, &m).await?;
            continue;
        }
        match req.kind {
            cmd::READ => {
                let permit = slots.clone().acquire_owned().await;
                // The read's bytes from the export's budget (at most 32 Ki permits of 1 KiB).
                let kib = req.len.div_ceil(1024).max(1);
                let bytes = budget.clone().acquire_many_owned(kib).await;
                let (wr, export) = (wr.clone(), export.clone());
                tasks.spawn(async move {
                    let _permit = (permit, bytes);
                    answer_read(&wr, export.as_ref(), structured, req).await
                });
            }
            cmd::BLOCK_STATUS => {
                if !s.base_allocation {
                    send_status(
                        &wr,
                        structured,
                        req.cookie,
                        errno::EINVAL,
                        "no meta context",
                    )
                    .await?;
                    continue;
                }
                let max = if req.flags & cmd_flag::REQ_ONE != 0 {
                    1
                } else {
                    MAX_DESCRIPTORS
                };
                let runs: Vec<(u32, u32)> = export
                    .allocation(req.offset, req.len.into(), max)
                    .into_iter()
                    // Each run is inside the request, so within u32.
                    .map(|(n, hole)| {
                        let f = if hole {
                            proto::state::HOLE | proto::state::ZERO
                        } else {
                            0
                        };
                        (n.min(u64::from(u32::MAX)) as u32, f)
                    })
                    .collect();
                let c = proto::encode_block_status_chunk(
                    chunk::FLAG_DONE,
                    req.cookie,
                    BASE_ALLOCATION_ID,
                    &runs,
                );
                send(&wr, &[&c]).await?;
            }
            cmd::FLUSH | cmd::CACHE => send_status(&wr, structured, req.cookie, 0, "").await?,
            cmd::TRIM | cmd::WRITE_ZEROES => {
                send_status(
                    &wr,
                    structured,
                    req.cookie,
                    errno::EPERM,
                    "read-only export",
                )
                .await?
            }
            _ => {
                send_status(
                    &wr,
                    structured,
                    req.cookie,
                    errno::EINVAL,
                    "unknown command",
                )
                .await?
            }
        }
    };
    // Requests in flight are answered before the connection closes.
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(ServerError::Refused(format!("a read failed: {e}"))),
        }
    }
    result
}

/// Answers a read: data and hole chunks (one data chunk, holes as zeroes, with `DF`), or a
/// simple reply with the bytes; a failed read is an `EIO` answer.
async fn answer_read<W: AsyncWrite + Unpin, E: Export>(
    wr: &Writer<W>,
    export: &E,
    structured: bool,
    req: proto::Request,
) -> std::io::Result<()> {
    let spans = match export.read(req.offset, req.len.into()).await {
        Ok(s) => s,
        Err(m) => {
            tracing::warn!(offset = req.offset, len = req.len, error = %m, "NBD read failed");
            return send_status(wr, structured, req.cookie, errno::EIO, &m).await;
        }
    };
    let whole = !structured || req.flags & cmd_flag::DF != 0;
    if whole {
        let mut buf = vec![0u8; req.len as usize];
        for sp in &spans {
            if let Span::Data {
                offset,
                buf: b,
                range,
            } = sp
            {
                let at = offset.saturating_sub(req.offset) as usize;
                // Inside the request by the export's contract; a span that is not is dropped
                // rather than a panic.
                if let (Some(dst), Some(src)) =
                    (buf.get_mut(at..at + range.len()), b.get(range.clone()))
                {
                    dst.copy_from_slice(src);
                }
            }
        }
        if !structured {
            let h = proto::ReplyHeader::Simple {
                error: 0,
                cookie: req.cookie,
            }
            .encode();
            return send(wr, &[&h, &buf]).await;
        }
        let h = proto::encode_data_chunk_head(chunk::FLAG_DONE, req.cookie, req.offset, req.len);
        return send(wr, &[&h, &buf]).await;
    }
    if spans.is_empty() {
        return send(wr, &[&proto::encode_none_chunk(req.cookie)]).await;
    }
    timed(wr, stream_spans(wr, &spans, req.cookie)).await
}

/// The chunks of a read's `spans`, DONE on the last, with the writer held throughout.
async fn stream_spans<W: AsyncWrite + Unpin>(
    wr: &Writer<W>,
    spans: &[Span],
    cookie: u64,
) -> std::io::Result<()> {
    let mut w = wr.w.lock().await;
    let last = spans.len() - 1;
    for (i, sp) in spans.iter().enumerate() {
        let flags = if i == last { chunk::FLAG_DONE } else { 0 };
        match sp {
            Span::Data { offset, buf, range } => {
                // A span is part of the request, so within u32.
                let h = proto::encode_data_chunk_head(flags, cookie, *offset, range.len() as u32);
                let data = buf
                    .get(range.clone())
                    .ok_or_else(|| std::io::Error::other("a span outside its buffer"))?;
                w.write_all(&h).await?;
                w.write_all(data).await?;
            }
            Span::Hole { offset, len } => {
                let c = proto::encode_hole_chunk(flags, cookie, *offset, *len as u32);
                w.write_all(&c).await?;
            }
        }
    }
    w.flush().await
}
