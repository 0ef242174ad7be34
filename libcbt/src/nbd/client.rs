//! Async NBD client: fixed newstyle handshake, structured replies, meta contexts, pipelined
//! requests over a pool of connections.
//!
//! # Design
//!
//! ```text
//!  callers ──submit──▶ State{pending: cookie → Pending} ──▶ writer task ──▶ socket
//!     ▲                          ▲                                          │
//!     └──── oneshot ◀── reader task (matches replies by cookie) ◀──────────┘
//! ```
//!
//! - A request is entered in `pending` *before* its header is queued to the writer task, so a
//!   reply can never overtake its entry. The writer batches whatever is queued and flushes once.
//! - The reader task owns the read half. It reads each reply header, takes the matching entry
//!   out of `pending`, reads `OFFSET_DATA` payloads straight into the caller's buffer, and puts
//!   the entry back until the chunk flagged `DONE` arrives.
//! - Each connection bounds its requests in flight with a semaphore whose permit lives in the
//!   pending entry, so a caller that gives up early does not let more onto the wire.
//! - Anything the server does wrong (unknown cookie, chunk after `DONE`, data or extents
//!   outside the request, malformed bytes) ends the connection: every pending request fails
//!   with [`NbdError::ConnectionLost`] naming the cause, and so does every later request. The
//!   same happens on EOF or an I/O error. Nothing waits forever.
//! - A reply is bounded in aggregate, not only per message: at most
//!   [`proto::MAX_REPLY_CHUNKS`] chunks, at most [`proto::MAX_REPLY_METADATA`] payload bytes
//!   beyond the data the request asked for, read chunks that never cover more than the
//!   request, and at most [`proto::MAX_REPLY_EXTENTS`] block-status extents kept. A peer
//!   past a bound ends the connection with [`NbdError::ReplyTooLarge`].
//! - Every step has a deadline ([`Timeouts`]): connecting, the handshake, and each request
//!   from its submission to its last chunk. A request that times out fails with
//!   [`NbdError::Timeout`] and ends its connection (a peer that stops answering one request
//!   is not trusted with the next), so a silent peer never hangs a job.
//! - A [`Client`] holds one connection, or several when the export advertises
//!   `CAN_MULTI_CONN`, and spreads requests round-robin. It is cheap to clone.
//!
//! Locking: `State` sits behind a `std::sync::Mutex` that is never held across an `.await`.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::proto::{self, chunk, cmd, cmd_flag, handshake, opt, rep, tflag};
use super::proto::{
    BlockSize, Chunk, InfoReply, OptReply, OptReplyHeader, ProtoError, ReplyHeader, Request,
};
use super::uri::{Address, NbdUri, UriError};
use crate::extent::{Extent, ExtentMap};

/// What went wrong, for callers that decide between retry, fallback and abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bytes from the server that do not decode.
    Malformed,
    /// A well-formed message the protocol does not allow at that point.
    Protocol,
    /// The server lacks something this client needs.
    Unsupported,
    /// The server refused an option during the handshake.
    Refused,
    /// The server failed a request and said why (errno).
    Server,
    /// The socket failed.
    Io,
    /// The connection is gone; the cause is attached.
    ConnectionLost,
    /// The caller asked for something impossible (out of range, too large, read-only export).
    InvalidRequest,
    /// The URI does not parse.
    InvalidUri,
    /// A step (connect, handshake, request) did not finish within its timeout.
    Timeout,
    /// A reply went past the client's aggregate bounds (chunks, payload bytes).
    ReplyTooLarge,
}

/// The step of a connection that timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Opening the socket.
    Connect,
    /// The option haggling, up to the end of `NBD_OPT_GO`.
    Handshake,
    /// One request, from its submission to its last reply chunk.
    Request,
    /// Putting `NBD_CMD_DISC` on the wire.
    Disconnect,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Connect => "connecting",
            Step::Handshake => "the handshake",
            Step::Request => "a request",
            Step::Disconnect => "the disconnect",
        })
    }
}

/// A server that broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("reply for unknown cookie {0}")]
    UnknownCookie(u64),
    #[error("chunk for cookie {0} after its DONE chunk")]
    ChunkAfterDone(u64),
    #[error("reply to option {got} while waiting for option {expected}")]
    OptionMismatch { expected: &'static str, got: u32 },
    #[error("unexpected option reply {reply:#x} to {option}")]
    UnexpectedOptionReply { option: &'static str, reply: u32 },
    #[error("GO finished without export information")]
    MissingExportInfo,
    #[error("structured reply chunk although structured replies were not negotiated")]
    StructuredNotNegotiated,
    #[error("chunk type {kind} in the reply to command {command}")]
    UnexpectedChunk { kind: u16, command: u16 },
    #[error(
        "data chunk [{offset:#x}, +{len:#x}) outside the request [{req_offset:#x}, +{req_len:#x})"
    )]
    DataOutsideRequest {
        offset: u64,
        len: u64,
        req_offset: u64,
        req_len: u32,
    },
    #[error("read reply covers {covered:#x} of {len:#x} bytes, or chunks overlap")]
    ReadNotCovered { covered: u64, len: u32 },
    #[error("read reply chunks cover {covered:#x} bytes of a {len:#x}-byte request: they overlap")]
    ReadOverlap { covered: u64, len: u32 },
    #[error("block status extent at {offset:#x} starts past the request end {end:#x}")]
    ExtentOutsideRequest { offset: u64, end: u64 },
    #[error("block status extent of length 0")]
    ZeroLengthExtent,
    #[error("block status for context id {0}, which was not negotiated")]
    UnknownContext(u32),
    #[error("block status reply without extents for the requested context")]
    MissingBlockStatus,
    #[error("error chunk with errno 0")]
    ErrorWithoutErrno,
    #[error("NONE chunk without the DONE flag")]
    NoneWithoutDone,
    #[error("connections to the same export disagree on its size or flags")]
    InconsistentConnections,
}

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("malformed data from the NBD server")]
    Malformed(#[from] ProtoError),
    #[error("NBD server violated the protocol")]
    Protocol(#[from] Violation),
    #[error("NBD server does not support {0}")]
    Unsupported(String),
    #[error(
        "NBD server refused {option}: reply {reply:#x}{}",
        fmt_message(message)
    )]
    OptionRefused {
        option: &'static str,
        reply: u32,
        message: String,
    },
    #[error("NBD server failed the request: {} ({errno}){}{}", proto::errno_name(*errno), fmt_offset(offset), fmt_message(message))]
    Server {
        errno: u32,
        message: String,
        offset: Option<u64>,
    },
    #[error("I/O error while {op}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("connection to the NBD server is lost")]
    ConnectionLost(#[source] Arc<NbdError>),
    #[error("invalid request: {what} (offset {offset:#x}, length {len:#x})")]
    InvalidRequest {
        what: &'static str,
        offset: u64,
        len: u64,
    },
    #[error("invalid NBD URI {uri:?}")]
    InvalidUri {
        uri: String,
        #[source]
        source: UriError,
    },
    #[error("NBD server did not answer: {step} timed out after {after:?}")]
    Timeout { step: Step, after: Duration },
    #[error("NBD server sent a reply of more than {max} {what}")]
    ReplyTooLarge { what: &'static str, max: u64 },
}

fn fmt_message(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

fn fmt_offset(o: &Option<u64>) -> String {
    o.map(|o| format!(" at {o:#x}")).unwrap_or_default()
}

impl NbdError {
    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            NbdError::Malformed(_) => ErrorKind::Malformed,
            NbdError::Protocol(_) => ErrorKind::Protocol,
            NbdError::Unsupported(_) => ErrorKind::Unsupported,
            NbdError::OptionRefused { .. } => ErrorKind::Refused,
            NbdError::Server { .. } => ErrorKind::Server,
            NbdError::Io { .. } => ErrorKind::Io,
            NbdError::ConnectionLost(_) => ErrorKind::ConnectionLost,
            NbdError::InvalidRequest { .. } => ErrorKind::InvalidRequest,
            NbdError::InvalidUri { .. } => ErrorKind::InvalidUri,
            NbdError::Timeout { .. } => ErrorKind::Timeout,
            NbdError::ReplyTooLarge { .. } => ErrorKind::ReplyTooLarge,
        }
    }

    /// For a lost connection, the error that ended it; otherwise `self`.
    pub fn root_cause(&self) -> &NbdError {
        match self {
            NbdError::ConnectionLost(c) => c.root_cause(),
            e => e,
        }
    }

    /// The wire errno of a server error.
    pub fn errno(&self) -> Option<u32> {
        match self {
            NbdError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> NbdError {
    move |source| NbdError::Io { op, source }
}

/// Deadlines of a connection's steps. Each must be above zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Opening the socket.
    pub connect: Duration,
    /// The handshake, from the greeting to the end of `NBD_OPT_GO`.
    pub handshake: Duration,
    /// One request, from its submission (including the wait for a slot among the
    /// connection's requests in flight) to its last reply chunk.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            handshake: Duration::from_secs(30),
            request: Duration::from_secs(120),
        }
    }
}

/// Runs `f` for at most `after`; past that, [`NbdError::Timeout`] names `step`.
async fn deadline<T>(
    step: Step,
    after: Duration,
    f: impl std::future::Future<Output = Result<T, NbdError>>,
) -> Result<T, NbdError> {
    tokio::time::timeout(after, f)
        .await
        .unwrap_or_else(|_| Err(NbdError::Timeout { step, after }))
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Meta contexts to negotiate (`base:allocation`, `qemu:dirty-bitmap:NAME`,
    /// `qemu:allocation-depth`). Contexts the server does not grant are simply absent from
    /// [`ExportInfo::contexts`].
    pub meta_contexts: Vec<String>,
    /// Connections to open when the export allows several (`CAN_MULTI_CONN`).
    pub connections: usize,
    /// Requests in flight per connection.
    pub max_in_flight: usize,
    /// Ask for structured replies (needed for meta contexts and sparse reads).
    pub structured_replies: bool,
    /// Deadlines of connecting, the handshake and each request.
    pub timeouts: Timeouts,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            meta_contexts: Vec::new(),
            connections: 4,
            max_in_flight: 16,
            structured_replies: true,
            timeouts: Timeouts::default(),
        }
    }
}

impl ConnectOptions {
    /// Default options plus the given meta contexts.
    pub fn with_contexts<I: IntoIterator<Item = S>, S: Into<String>>(contexts: I) -> Self {
        ConnectOptions {
            meta_contexts: contexts.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

/// What the handshake learned about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags (`proto::tflag`).
    pub flags: u16,
    pub block_size: Option<BlockSize>,
    pub structured_replies: bool,
    /// Negotiated meta contexts, by name, with the id of the first connection.
    pub contexts: Vec<(String, u32)>,
    /// True when `NBD_OPT_GO` was refused and `NBD_OPT_EXPORT_NAME` used instead.
    pub used_export_name: bool,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.flags & tflag::READ_ONLY != 0
    }
    pub fn can_multi_conn(&self) -> bool {
        self.flags & tflag::CAN_MULTI_CONN != 0
    }
    /// Largest read or write in one request.
    pub fn max_request(&self) -> u32 {
        self.block_size.map_or(proto::MAX_IO_REQUEST, |b| {
            b.maximum.min(proto::MAX_IO_REQUEST)
        })
    }
    /// Required alignment of offsets and lengths.
    pub fn min_block(&self) -> u32 {
        self.block_size.map_or(1, |b| b.minimum.max(1))
    }
    /// Preferred request granularity (4096 when unknown).
    pub fn preferred_block(&self) -> u32 {
        self.block_size.map_or(4096, |b| b.preferred.max(1))
    }
    /// True when the meta context was granted.
    pub fn has_context(&self, name: &str) -> bool {
        self.contexts.iter().any(|(n, _)| n == name)
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

async fn open_socket(address: &Address) -> Result<(BoxRead, BoxWrite), NbdError> {
    Ok(match address {
        Address::Unix(path) => {
            let s = UnixStream::connect(path)
                .await
                .map_err(io_err("connecting"))?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
        Address::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(io_err("connecting"))?;
            s.set_nodelay(true).map_err(io_err("setting TCP_NODELAY"))?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
    })
}

struct Negotiator<'a> {
    r: &'a mut BoxRead,
    w: &'a mut BoxWrite,
    export: &'a str,
    no_zeroes: bool,
}

impl Negotiator<'_> {
    /// Greeting and client flags.
    async fn start(r: &mut BoxRead, w: &mut BoxWrite) -> Result<bool, NbdError> {
        let mut g = [0u8; proto::GREETING_LEN];
        r.read_exact(&mut g)
            .await
            .map_err(io_err("reading the greeting"))?;
        let greeting = proto::Greeting::decode(&g)?;
        if greeting.flags & handshake::FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Unsupported("fixed newstyle negotiation".into()));
        }
        let no_zeroes = greeting.flags & handshake::NO_ZEROES != 0;
        let mut flags = handshake::C_FIXED_NEWSTYLE;
        if no_zeroes {
            flags |= handshake::C_NO_ZEROES;
        }
        w.write_all(&flags.to_be_bytes())
            .await
            .map_err(io_err("sending client flags"))?;
        Ok(no_zeroes)
    }

    async fn send(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut buf = Vec::with_capacity(16 + data.len());
        proto::encode_option(&mut buf, option, data)?;
        self.w
            .write_all(&buf)
            .await
            .map_err(io_err("sending an option"))?;
        self.w.flush().await.map_err(io_err("sending an option"))
    }

    async fn reply(&mut self, option: u32) -> Result<OptReply, NbdError> {
        let mut h = [0u8; proto::OPT_REPLY_HEADER_LEN];
        self.r
            .read_exact(&mut h)
            .await
            .map_err(io_err("reading an option reply"))?;
        let h = OptReplyHeader::decode(&h)?;
        if h.option != option {
            return Err(Violation::OptionMismatch {
                expected: proto::option_name(option),
                got: h.option,
            }
            .into());
        }
        // Bounded by MAX_OPTION_REPLY in decode.
        let mut data = vec![0u8; h.len as usize];
        self.r
            .read_exact(&mut data)
            .await
            .map_err(io_err("reading an option reply"))?;
        Ok(proto::decode_opt_reply(&h, &data)?)
    }

    fn refused(option: u32, reply: u32, message: String) -> NbdError {
        NbdError::OptionRefused {
            option: proto::option_name(option),
            reply,
            message,
        }
    }

    fn unexpected(option: u32, r: &OptReply) -> NbdError {
        let reply = match r {
            OptReply::Ack => rep::ACK,
            OptReply::Server { .. } => rep::SERVER,
            OptReply::Info(_) => rep::INFO,
            OptReply::MetaContext { .. } => rep::META_CONTEXT,
            OptReply::Error { reply, .. } => *reply,
        };
        Violation::UnexpectedOptionReply {
            option: proto::option_name(option),
            reply,
        }
        .into()
    }

    /// `NBD_OPT_STRUCTURED_REPLY`: true when granted.
    async fn structured_replies(&mut self) -> Result<bool, NbdError> {
        self.send(opt::STRUCTURED_REPLY, &[]).await?;
        match self.reply(opt::STRUCTURED_REPLY).await? {
            OptReply::Ack => Ok(true),
            OptReply::Error { .. } => Ok(false),
            other => Err(Self::unexpected(opt::STRUCTURED_REPLY, &other)),
        }
    }

    /// `NBD_OPT_SET_META_CONTEXT` or `NBD_OPT_LIST_META_CONTEXT`.
    async fn meta_contexts(
        &mut self,
        option: u32,
        queries: &[&str],
    ) -> Result<Vec<(String, u32)>, NbdError> {
        let data = proto::encode_meta_context_data(self.export, queries)?;
        self.send(option, &data).await?;
        let mut out = Vec::new();
        loop {
            match self.reply(option).await? {
                OptReply::MetaContext { id, name } => {
                    if out.len() >= 4096 {
                        return Err(ProtoError::TooLarge {
                            what: "meta context list",
                            len: 4097,
                            max: 4096,
                        }
                        .into());
                    }
                    out.push((name, id));
                }
                OptReply::Ack => return Ok(out),
                OptReply::Error { reply, message } => {
                    return Err(Self::refused(option, reply, message))
                }
                other => return Err(Self::unexpected(option, &other)),
            }
        }
    }

    /// `NBD_OPT_GO`; `Ok(None)` when the server does not know GO.
    async fn go(&mut self) -> Result<Option<(u64, u16, Option<BlockSize>)>, NbdError> {
        let data = proto::encode_go_data(self.export, &[proto::info::BLOCK_SIZE])?;
        self.send(opt::GO, &data).await?;
        let (mut export, mut block_size) = (None, None);
        loop {
            match self.reply(opt::GO).await? {
                OptReply::Info(InfoReply::Export { size, flags }) => export = Some((size, flags)),
                OptReply::Info(InfoReply::BlockSize(b)) => block_size = Some(b),
                OptReply::Info(_) => {}
                OptReply::Ack => {
                    let (size, flags) = export.ok_or(Violation::MissingExportInfo)?;
                    return Ok(Some((size, flags, block_size)));
                }
                OptReply::Error {
                    reply: rep::ERR_UNSUP,
                    ..
                } => return Ok(None),
                OptReply::Error { reply, message } => {
                    return Err(Self::refused(opt::GO, reply, message))
                }
                other => return Err(Self::unexpected(opt::GO, &other)),
            }
        }
    }

    /// `NBD_OPT_EXPORT_NAME`, the fallback for servers without GO.
    async fn export_name(&mut self) -> Result<(u64, u16), NbdError> {
        let name = self.export.as_bytes();
        if name.len() > proto::MAX_STRING {
            return Err(ProtoError::TooLarge {
                what: "export name",
                len: name.len() as u64,
                max: proto::MAX_STRING as u64,
            }
            .into());
        }
        self.send(opt::EXPORT_NAME, name).await?;
        let mut buf = [0u8; proto::EXPORT_NAME_REPLY_LEN + 124];
        let n = if self.no_zeroes {
            proto::EXPORT_NAME_REPLY_LEN
        } else {
            buf.len()
        };
        self.r
            .read_exact(&mut buf[..n])
            .await
            .map_err(io_err("reading the export name reply"))?;
        Ok(proto::decode_export_name_reply(
            &buf[..proto::EXPORT_NAME_REPLY_LEN],
        )?)
    }
}

/// Runs the handshake; returns the export info and the context ids of this connection.
async fn negotiate(
    r: &mut BoxRead,
    w: &mut BoxWrite,
    export: &str,
    opts: &ConnectOptions,
) -> Result<ExportInfo, NbdError> {
    let no_zeroes = Negotiator::start(r, w).await?;
    let mut n = Negotiator {
        r,
        w,
        export,
        no_zeroes,
    };
    let structured = opts.structured_replies && n.structured_replies().await?;
    let mut contexts = Vec::new();
    if !opts.meta_contexts.is_empty() {
        if !structured {
            return Err(NbdError::Unsupported(
                "structured replies (needed for meta contexts)".into(),
            ));
        }
        let queries: Vec<&str> = opts.meta_contexts.iter().map(String::as_str).collect();
        contexts = n.meta_contexts(opt::SET_META_CONTEXT, &queries).await?;
    }
    let (size, flags, block_size, used_export_name) = match n.go().await? {
        Some((s, f, b)) => (s, f, b, false),
        None => {
            let (s, f) = n.export_name().await?;
            (s, f, None, true)
        }
    };
    Ok(ExportInfo {
        size,
        flags,
        block_size,
        structured_replies: structured,
        contexts,
        used_export_name,
    })
}

/// Lists the meta contexts the server offers for `uri`'s export that match `queries`
/// (e.g. `qemu:dirty-bitmap:` for all bitmaps; an empty list asks for all).
pub async fn list_meta_contexts(uri: &str, queries: &[&str]) -> Result<Vec<String>, NbdError> {
    list_meta_contexts_with(uri, queries, &Timeouts::default()).await
}

/// [`list_meta_contexts`] with the given deadlines (`request` is unused).
pub async fn list_meta_contexts_with(
    uri: &str,
    queries: &[&str],
    timeouts: &Timeouts,
) -> Result<Vec<String>, NbdError> {
    let uri = parse_uri(uri)?;
    let (mut r, mut w) =
        deadline(Step::Connect, timeouts.connect, open_socket(&uri.address)).await?;
    deadline(Step::Handshake, timeouts.handshake, async {
        let no_zeroes = Negotiator::start(&mut r, &mut w).await?;
        let mut n = Negotiator {
            r: &mut r,
            w: &mut w,
            export: &uri.export,
            no_zeroes,
        };
        if !n.structured_replies().await? {
            return Err(NbdError::Unsupported(
                "structured replies (needed for meta contexts)".into(),
            ));
        }
        let found = n.meta_contexts(opt::LIST_META_CONTEXT, queries).await?;
        // Polite end of the negotiation; the server's answer to ABORT does not matter.
        let _ = n.send(opt::ABORT, &[]).await;
        Ok(found.into_iter().map(|(name, _)| name).collect())
    })
    .await
}

fn parse_uri(uri: &str) -> Result<NbdUri, NbdError> {
    NbdUri::parse(uri).map_err(|source| NbdError::InvalidUri {
        uri: uri.to_string(),
        source,
    })
}

// ---------------------------------------------------------------------------------------------
// Transmission: one connection

enum Done {
    Read(Vec<u8>),
    Extents(Vec<Extent>),
    Ok,
}

enum PendingState {
    Read {
        buf: Vec<u8>,
        chunks: Vec<(u64, u64)>,
    },
    BlockStatus {
        context: u32,
        extents: Option<Vec<Extent>>,
    },
    Other,
}

/// What a reply has used so far of its aggregate bounds.
#[derive(Default)]
struct ReplyBudget {
    chunks: u32,
    payload: u64,
    /// Bytes of a read covered by data and hole chunks (each inside the request).
    covered: u64,
}

struct Pending {
    req: Request,
    state: PendingState,
    budget: ReplyBudget,
    error: Option<NbdError>,
    tx: oneshot::Sender<Result<Done, NbdError>>,
    _permit: OwnedSemaphorePermit,
}

impl Pending {
    fn finish(self) {
        let result = match self.error {
            Some(e) => Err(e),
            None => Self::result(self.req, self.state),
        };
        // The caller may have gone away; then nobody wants the answer.
        let _ = self.tx.send(result);
    }

    fn result(req: Request, state: PendingState) -> Result<Done, NbdError> {
        Ok(match state {
            PendingState::Read { buf, mut chunks } => {
                chunks.sort_unstable();
                let mut pos = 0u64;
                for (s, e) in &chunks {
                    if *s != pos {
                        return Err(Violation::ReadNotCovered {
                            covered: pos,
                            len: req.len,
                        }
                        .into());
                    }
                    pos = *e;
                }
                if pos != u64::from(req.len) {
                    return Err(Violation::ReadNotCovered {
                        covered: pos,
                        len: req.len,
                    }
                    .into());
                }
                Done::Read(buf)
            }
            PendingState::BlockStatus { extents, .. } => {
                Done::Extents(extents.ok_or(Violation::MissingBlockStatus)?)
            }
            PendingState::Other => Done::Ok,
        })
    }
}

struct State {
    pending: HashMap<u64, Pending>,
    next_cookie: u64,
    closed: Option<Arc<NbdError>>,
}

struct Shared {
    state: Mutex<State>,
    structured: bool,
    /// Context ids negotiated on this connection.
    context_ids: Vec<u32>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave State inconsistent (every update is a
        // single insert/remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail_all(&self, cause: NbdError) {
        let cause = Arc::new(cause);
        let drained: Vec<Pending> = {
            let mut st = self.lock();
            if st.closed.is_none() {
                st.closed = Some(cause.clone());
            }
            st.pending.drain().map(|(_, p)| p).collect()
        };
        for p in drained {
            let _ = p.tx.send(Err(NbdError::ConnectionLost(cause.clone())));
        }
    }

    fn lost(&self) -> NbdError {
        let cause = self.lock().closed.clone().unwrap_or_else(|| {
            Arc::new(NbdError::Io {
                op: "waiting for a reply",
                source: io::ErrorKind::BrokenPipe.into(),
            })
        });
        NbdError::ConnectionLost(cause)
    }
}

struct Outgoing {
    header: [u8; proto::REQUEST_LEN],
    payload: Option<Vec<u8>>,
    /// Fired once the request has been flushed (used by disconnect).
    flushed: Option<oneshot::Sender<()>>,
}

struct Conn {
    shared: Arc<Shared>,
    request_timeout: Duration,
    tx: mpsc::Sender<Outgoing>,
    permits: Arc<Semaphore>,
    contexts: Vec<(String, u32)>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Conn {
    async fn open(uri: &NbdUri, opts: &ConnectOptions) -> Result<(Conn, ExportInfo), NbdError> {
        let t = &opts.timeouts;
        let (mut r, mut w) = deadline(Step::Connect, t.connect, open_socket(&uri.address)).await?;
        let info = deadline(
            Step::Handshake,
            t.handshake,
            negotiate(&mut r, &mut w, &uri.export, opts),
        )
        .await?;
        let max_in_flight = opts.max_in_flight.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                next_cookie: 1,
                closed: None,
            }),
            structured: info.structured_replies,
            context_ids: info.contexts.iter().map(|(_, id)| *id).collect(),
        });
        let (tx, rx) = mpsc::channel(max_in_flight + 2);
        let reader = tokio::spawn(reader_loop(
            shared.clone(),
            // Small: reply headers and metadata go through it, while data payloads larger
            // than it are read straight into the caller's buffer (a large buffer here made
            // every data reply pass up to its size through an extra copy).
            BufReader::with_capacity(16 << 10, r),
        ));
        let writer = tokio::spawn(writer_loop(shared.clone(), rx, w));
        let conn = Conn {
            shared,
            request_timeout: t.request,
            tx,
            permits: Arc::new(Semaphore::new(max_in_flight)),
            contexts: info.contexts.clone(),
            tasks: vec![reader, writer],
        };
        Ok((conn, info))
    }

    fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }

    /// Sends `req` and waits for its reply, for at most the request timeout. A timeout ends
    /// the connection: every other request on it fails with the timeout as its cause.
    async fn submit(
        &self,
        req: Request,
        payload: Option<Vec<u8>>,
        state: PendingState,
    ) -> Result<Done, NbdError> {
        let after = self.request_timeout;
        match tokio::time::timeout(after, self.submit_inner(req, payload, state)).await {
            Ok(r) => r,
            Err(_) => {
                let e = NbdError::Timeout {
                    step: Step::Request,
                    after,
                };
                self.shared.fail_all(NbdError::Timeout {
                    step: Step::Request,
                    after,
                });
                Err(e)
            }
        }
    }

    async fn submit_inner(
        &self,
        mut req: Request,
        payload: Option<Vec<u8>>,
        state: PendingState,
    ) -> Result<Done, NbdError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.shared.lost())?;
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.lock();
            if let Some(cause) = &st.closed {
                return Err(NbdError::ConnectionLost(cause.clone()));
            }
            req.cookie = st.next_cookie;
            st.next_cookie += 1;
            st.pending.insert(
                req.cookie,
                Pending {
                    req,
                    state,
                    budget: ReplyBudget::default(),
                    error: None,
                    tx,
                    _permit: permit,
                },
            );
        }
        let out = Outgoing {
            header: req.encode(),
            payload,
            flushed: None,
        };
        if self.tx.send(out).await.is_err() {
            self.shared.lock().pending.remove(&req.cookie);
            return Err(self.shared.lost());
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(self.shared.lost()),
        }
    }

    async fn disconnect(&self) {
        let req = Request {
            flags: 0,
            kind: cmd::DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        let (tx, rx) = oneshot::channel();
        let sent = async {
            if self
                .tx
                .send(Outgoing {
                    header: req.encode(),
                    payload: None,
                    flushed: Some(tx),
                })
                .await
                .is_ok()
            {
                let _ = rx.await;
            }
        };
        // A peer that stops reading must not hold the disconnect forever.
        if tokio::time::timeout(self.request_timeout, sent)
            .await
            .is_err()
        {
            tracing::debug!("NBD disconnect timed out");
        }
        let mut st = self.shared.lock();
        if st.closed.is_none() {
            st.closed = Some(Arc::new(NbdError::Io {
                op: "using a disconnected client",
                source: io::ErrorKind::NotConnected.into(),
            }));
        }
    }
}

async fn writer_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<Outgoing>, w: BoxWrite) {
    let mut w = BufWriter::with_capacity(64 << 10, w);
    let result: io::Result<()> = async {
        while let Some(first) = rx.recv().await {
            let mut acks = Vec::new();
            let mut next = Some(first);
            let mut disc = false;
            while let Some(msg) = next {
                w.write_all(&msg.header).await?;
                if let Some(p) = &msg.payload {
                    w.write_all(p).await?;
                }
                disc |= msg.header[6..8] == cmd::DISC.to_be_bytes();
                acks.extend(msg.flushed);
                next = rx.try_recv().ok();
            }
            w.flush().await?;
            for a in acks {
                let _ = a.send(());
            }
            if disc {
                w.shutdown().await?;
                return Ok(());
            }
        }
        Ok(())
    }
    .await;
    if let Err(source) = result {
        shared.fail_all(NbdError::Io {
            op: "sending a request",
            source,
        });
    }
}

async fn reader_loop(shared: Arc<Shared>, mut r: BufReader<BoxRead>) {
    let mut scratch = Vec::new();
    let cause = loop {
        if let Err(e) = read_reply(&shared, &mut r, &mut scratch).await {
            break e;
        }
    };
    tracing::debug!(error = %cause, "NBD connection closed");
    shared.fail_all(cause);
}

/// Reads one reply (or one chunk) and dispatches it.
async fn read_reply(
    shared: &Shared,
    r: &mut BufReader<BoxRead>,
    scratch: &mut Vec<u8>,
) -> Result<(), NbdError> {
    let mut hb = [0u8; proto::STRUCTURED_REPLY_LEN];
    r.read_exact(&mut hb[..4])
        .await
        .map_err(io_err("reading a reply"))?;
    let magic = u32::from_be_bytes([hb[0], hb[1], hb[2], hb[3]]);
    let hlen = ReplyHeader::len_for_magic(magic)?;
    r.read_exact(&mut hb[4..hlen])
        .await
        .map_err(io_err("reading a reply"))?;
    let header = ReplyHeader::decode(&hb[..hlen])?;
    let cookie = header.cookie();
    let mut p = {
        let mut st = shared.lock();
        match st.pending.remove(&cookie) {
            Some(p) => p,
            None if cookie > 0 && cookie < st.next_cookie => {
                return Err(Violation::ChunkAfterDone(cookie).into())
            }
            None => return Err(Violation::UnknownCookie(cookie).into()),
        }
    };
    match process(shared, header, &mut p, r, scratch).await {
        Ok(true) => {
            p.finish();
            Ok(())
        }
        Ok(false) => {
            shared.lock().pending.insert(cookie, p);
            Ok(())
        }
        Err(e) => {
            // Put it back so that fail_all reports the cause to this caller too.
            shared.lock().pending.insert(cookie, p);
            Err(e)
        }
    }
}

/// Handles one reply or chunk for `p`; true when the request is complete.
async fn process(
    shared: &Shared,
    header: ReplyHeader,
    p: &mut Pending,
    r: &mut BufReader<BoxRead>,
    scratch: &mut Vec<u8>,
) -> Result<bool, NbdError> {
    let req = p.req;
    let (flags, kind, len) = match header {
        ReplyHeader::Simple { error, .. } => {
            if error != 0 {
                p.error.get_or_insert(NbdError::Server {
                    errno: error,
                    message: String::new(),
                    offset: None,
                });
                return Ok(true);
            }
            match &mut p.state {
                PendingState::Read { buf, chunks } => {
                    // The request length fits the caller's buffer (checked at submit).
                    r.read_exact(&mut buf[..req.len as usize])
                        .await
                        .map_err(io_err("reading data"))?;
                    chunks.push((0, u64::from(req.len)));
                }
                PendingState::BlockStatus { .. } => {
                    return Err(Violation::UnexpectedChunk {
                        kind: 0,
                        command: req.kind,
                    }
                    .into())
                }
                PendingState::Other => {}
            }
            return Ok(true);
        }
        ReplyHeader::Structured {
            flags, kind, len, ..
        } => (flags, kind, len),
    };
    if !shared.structured {
        return Err(Violation::StructuredNotNegotiated.into());
    }
    charge(&mut p.budget, &p.state, req, len)?;
    let done = flags & chunk::FLAG_DONE != 0;
    let req_end = req.offset + u64::from(req.len);
    if kind == chunk::OFFSET_DATA {
        let PendingState::Read { buf, chunks } = &mut p.state else {
            return Err(Violation::UnexpectedChunk {
                kind,
                command: req.kind,
            }
            .into());
        };
        let mut pre = [0u8; 8];
        r.read_exact(&mut pre)
            .await
            .map_err(io_err("reading data"))?;
        let offset = proto::decode_offset_data_prefix(&pre)?;
        // len >= 9 was checked when the header was decoded.
        let dlen = u64::from(len - 8);
        let outside = Violation::DataOutsideRequest {
            offset,
            len: dlen,
            req_offset: req.offset,
            req_len: req.len,
        };
        let end = offset.checked_add(dlen).ok_or(outside.clone())?;
        if offset < req.offset || end > req_end {
            return Err(outside.into());
        }
        // Bounded by the request length, which fits the caller's buffer.
        let (s, e) = (offset - req.offset, end - req.offset);
        let dst = buf.get_mut(s as usize..e as usize).ok_or(outside)?;
        cover(&mut p.budget, req, e - s)?;
        r.read_exact(dst).await.map_err(io_err("reading data"))?;
        chunks.push((s, e));
        return Ok(done);
    }
    // Every other chunk is small and was bounded when the header was decoded.
    scratch.resize(len as usize, 0);
    r.read_exact(scratch)
        .await
        .map_err(io_err("reading a reply chunk"))?;
    match proto::decode_chunk(kind, scratch)? {
        Chunk::None => {
            if !done {
                return Err(Violation::NoneWithoutDone.into());
            }
        }
        Chunk::Hole { offset, len: hlen } => {
            let PendingState::Read { buf, chunks } = &mut p.state else {
                return Err(Violation::UnexpectedChunk {
                    kind,
                    command: req.kind,
                }
                .into());
            };
            let dlen = u64::from(hlen);
            let outside = Violation::DataOutsideRequest {
                offset,
                len: dlen,
                req_offset: req.offset,
                req_len: req.len,
            };
            let end = offset.checked_add(dlen).ok_or(outside.clone())?;
            if offset < req.offset || end > req_end || hlen == 0 {
                return Err(outside.into());
            }
            let (s, e) = (offset - req.offset, end - req.offset);
            let dst = buf.get_mut(s as usize..e as usize).ok_or(outside)?;
            cover(&mut p.budget, req, e - s)?;
            dst.fill(0);
            chunks.push((s, e));
        }
        Chunk::BlockStatus {
            context,
            descriptors,
        } => {
            let PendingState::BlockStatus {
                context: want,
                extents,
            } = &mut p.state
            else {
                return Err(Violation::UnexpectedChunk {
                    kind,
                    command: req.kind,
                }
                .into());
            };
            if !shared.context_ids.contains(&context) {
                return Err(Violation::UnknownContext(context).into());
            }
            if context == *want {
                if extents.is_some() {
                    return Err(Violation::UnexpectedChunk {
                        kind,
                        command: req.kind,
                    }
                    .into());
                }
                // A prefix of the answer is an answer for less, which the server may give:
                // the caller asks again from where it ends.
                *extents = Some(descriptors_to_extents(
                    req.offset,
                    req.len,
                    descriptors.take(proto::MAX_REPLY_EXTENTS),
                )?);
            }
        }
        Chunk::Error {
            errno,
            message,
            offset,
        } => {
            if errno == 0 {
                return Err(Violation::ErrorWithoutErrno.into());
            }
            p.error.get_or_insert(NbdError::Server {
                errno,
                message,
                offset,
            });
        }
    }
    Ok(done)
}

/// Counts one structured chunk of `len` payload bytes against its reply's bounds.
fn charge(
    b: &mut ReplyBudget,
    state: &PendingState,
    req: Request,
    len: u32,
) -> Result<(), NbdError> {
    b.chunks += 1;
    if b.chunks > proto::MAX_REPLY_CHUNKS {
        return Err(NbdError::ReplyTooLarge {
            what: "chunks",
            max: proto::MAX_REPLY_CHUNKS.into(),
        });
    }
    // Read data counts against the request length; everything else against the metadata
    // bound.
    let data = match state {
        PendingState::Read { .. } => u64::from(req.len),
        _ => 0,
    };
    let max = data + proto::MAX_REPLY_METADATA;
    b.payload += u64::from(len);
    if b.payload > max {
        return Err(NbdError::ReplyTooLarge {
            what: "payload bytes",
            max,
        });
    }
    Ok(())
}

/// Counts `n` bytes of a read covered by one data or hole chunk (inside the request).
/// Chunks may come in any order but must not overlap: more than the request in total is a
/// violation at once, not only when `DONE` arrives.
fn cover(b: &mut ReplyBudget, req: Request, n: u64) -> Result<(), Violation> {
    b.covered += n;
    if b.covered > u64::from(req.len) {
        return Err(Violation::ReadOverlap {
            covered: b.covered,
            len: req.len,
        });
    }
    Ok(())
}

/// Turns block-status descriptors into absolute extents starting at the request offset.
/// The final descriptor may run past the request end (servers may do that); it is clipped.
/// A descriptor that starts past the end, or one of length 0, is a protocol violation.
pub fn descriptors_to_extents(
    offset: u64,
    len: u32,
    descriptors: impl IntoIterator<Item = (u32, u32)>,
) -> Result<Vec<Extent>, Violation> {
    let end = offset + u64::from(len);
    let mut pos = offset;
    let mut out = Vec::new();
    for (l, flags) in descriptors {
        if l == 0 {
            return Err(Violation::ZeroLengthExtent);
        }
        if pos >= end {
            return Err(Violation::ExtentOutsideRequest { offset: pos, end });
        }
        let e = pos.saturating_add(u64::from(l)).min(end);
        out.push(Extent::new(pos, e, flags));
        pos = e;
    }
    if out.is_empty() {
        return Err(Violation::MissingBlockStatus);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The public client: a pool of connections

/// A connected NBD client: one connection, or several when the export allows it. Clone it to
/// share it between tasks; all clones use the same connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    conns: Vec<Conn>,
    next: AtomicUsize,
    info: ExportInfo,
    uri: NbdUri,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("uri", &self.inner.uri.to_string())
            .field("connections", &self.inner.conns.len())
            .field("info", &self.inner.info)
            .finish()
    }
}

/// Largest block-status request: just under 4 GiB, a multiple of 64 KiB.
const MAX_BLOCK_STATUS_LEN: u64 = (u32::MAX as u64) & !0xffff;
/// Block-status windows walked concurrently by [`Client::map`].
const MAP_WINDOW: u64 = 1 << 30;

impl Client {
    /// Connects with default options (no meta contexts, up to 4 connections).
    pub async fn connect(uri: &str) -> Result<Client, NbdError> {
        Self::connect_with(uri, &ConnectOptions::default()).await
    }

    /// Connects with `opts`. Opens one connection, and up to `opts.connections` when the
    /// export advertises `CAN_MULTI_CONN`.
    pub async fn connect_with(uri: &str, opts: &ConnectOptions) -> Result<Client, NbdError> {
        let uri = parse_uri(uri)?;
        let (first, info) = Conn::open(&uri, opts).await?;
        let mut conns = vec![first];
        if info.can_multi_conn() {
            for _ in 1..opts.connections.max(1) {
                let (c, i) = Conn::open(&uri, opts).await?;
                if i.size != info.size || i.flags != info.flags {
                    return Err(Violation::InconsistentConnections.into());
                }
                conns.push(c);
            }
        }
        tracing::debug!(uri = %uri, connections = conns.len(), size = info.size, "NBD connected");
        Ok(Client {
            inner: Arc::new(Inner {
                conns,
                next: AtomicUsize::new(0),
                info,
                uri,
            }),
        })
    }

    /// What the handshake learned.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.inner.conns.len()
    }

    fn conn(&self) -> &Conn {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.conns.len();
        &self.inner.conns[i]
    }

    fn check_range(
        &self,
        what: &'static str,
        offset: u64,
        len: u64,
        max: u64,
    ) -> Result<(), NbdError> {
        let bad = |what| NbdError::InvalidRequest { what, offset, len };
        let end = offset.checked_add(len).ok_or(bad("range overflows"))?;
        if end > self.size() {
            return Err(bad("range past the end of the export"));
        }
        if len == 0 {
            return Err(bad("empty request"));
        }
        if len > max {
            return Err(bad(what));
        }
        let min = u64::from(self.inner.info.min_block());
        if offset % min != 0 || len % min != 0 {
            return Err(bad("not aligned to the export's minimum block size"));
        }
        Ok(())
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        if self.inner.info.read_only() {
            return Err(NbdError::InvalidRequest {
                what: "export is read-only",
                offset,
                len,
            });
        }
        Ok(())
    }

    fn request(kind: u16, flags: u16, offset: u64, len: u64) -> Request {
        // Callers bound len by a u32 maximum first.
        Request {
            flags,
            kind,
            cookie: 0,
            offset,
            len: u32::try_from(len).unwrap_or(u32::MAX),
        }
    }

    /// Reads `buf.len()` bytes at `offset` into `buf` and returns it. Holes read as zeroes.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the buffer; the connection stays usable.
    pub async fn read(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>, NbdError> {
        let len = buf.len() as u64;
        self.read_into(offset, len, buf).await
    }

    /// Reads `len` bytes at `offset` into the start of `buf` (at least `len` long), and gives
    /// `buf` back whole: what lies past `len` is left as it was. Lets a caller reuse buffers
    /// of one size for reads of any smaller size without clearing them.
    pub async fn read_into(
        &self,
        offset: u64,
        len: u64,
        buf: Vec<u8>,
    ) -> Result<Vec<u8>, NbdError> {
        if len > buf.len() as u64 {
            return Err(NbdError::InvalidRequest {
                what: "read longer than its buffer",
                offset,
                len,
            });
        }
        self.check_range(
            "read larger than the export's maximum request",
            offset,
            len,
            self.inner.info.max_request().into(),
        )?;
        let req = Self::request(cmd::READ, 0, offset, len);
        match self
            .conn()
            .submit(
                req,
                None,
                PendingState::Read {
                    buf,
                    chunks: Vec::new(),
                },
            )
            .await?
        {
            Done::Read(b) => Ok(b),
            _ => Err(Violation::UnexpectedChunk {
                kind: 0,
                command: cmd::READ,
            }
            .into()),
        }
    }

    /// Writes `data` at `offset` (with FUA when `fua`).
    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), NbdError> {
        let len = data.len() as u64;
        self.check_writable(offset, len)?;
        self.check_range(
            "write larger than the export's maximum request",
            offset,
            len,
            self.inner.info.max_request().into(),
        )?;
        let flags = if fua { cmd_flag::FUA } else { 0 };
        let req = Self::request(cmd::WRITE, flags, offset, len);
        self.conn()
            .submit(req, Some(data), PendingState::Other)
            .await
            .map(|_| ())
    }

    async fn ranged(
        &self,
        kind: u16,
        flags: u16,
        feature: u16,
        offset: u64,
        len: u64,
    ) -> Result<(), NbdError> {
        self.check_writable(offset, len)?;
        if self.inner.info.flags & feature == 0 {
            return Err(NbdError::Unsupported(format!("command {kind}")));
        }
        // Split into requests of at most 1 GiB, aligned to the minimum block.
        let step = 1u64 << 30;
        let mut pos = offset;
        let end = offset.checked_add(len).ok_or(NbdError::InvalidRequest {
            what: "range overflows",
            offset,
            len,
        })?;
        while pos < end {
            let n = (end - pos).min(step);
            self.check_range("request too large", pos, n, step)?;
            self.conn()
                .submit(
                    Self::request(kind, flags, pos, n),
                    None,
                    PendingState::Other,
                )
                .await?;
            pos += n;
        }
        Ok(())
    }

    /// Writes zeroes over `[offset, offset + len)`; `may_trim` lets the server punch holes.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> Result<(), NbdError> {
        let flags = if may_trim { 0 } else { cmd_flag::NO_HOLE };
        self.ranged(
            cmd::WRITE_ZEROES,
            flags,
            tflag::SEND_WRITE_ZEROES,
            offset,
            len,
        )
        .await
    }

    /// Discards `[offset, offset + len)`.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.ranged(cmd::TRIM, 0, tflag::SEND_TRIM, offset, len)
            .await
    }

    /// Makes completed writes durable. With several connections, a flush on each (the
    /// protocol only promises cross-connection flushes under `CAN_MULTI_CONN`, and we only
    /// open several then; flushing all is cheap and leaves no doubt).
    pub async fn flush(&self) -> Result<(), NbdError> {
        if self.inner.info.flags & tflag::SEND_FLUSH == 0 {
            return Ok(());
        }
        for c in &self.inner.conns {
            c.submit(
                Self::request(cmd::FLUSH, 0, 0, 0),
                None,
                PendingState::Other,
            )
            .await?;
        }
        Ok(())
    }

    /// One `BLOCK_STATUS` request for `context` over `[offset, offset + len)`. The server
    /// may answer for less than asked; the extents returned start at `offset`, are
    /// contiguous, and end at or before `offset + len`.
    pub async fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<Extent>, NbdError> {
        self.check_range(
            "block status too large",
            offset,
            len.into(),
            u32::MAX.into(),
        )?;
        let conn = self.conn();
        let id = conn
            .context_id(context)
            .ok_or_else(|| NbdError::Unsupported(format!("meta context {context}")))?;
        let req = Self::request(cmd::BLOCK_STATUS, 0, offset, len.into());
        match conn
            .submit(
                req,
                None,
                PendingState::BlockStatus {
                    context: id,
                    extents: None,
                },
            )
            .await?
        {
            Done::Extents(e) => Ok(e),
            _ => Err(Violation::MissingBlockStatus.into()),
        }
    }

    /// The map of `context` over `range`, walking short answers and the per-reply extent cap
    /// until the range is covered. Windows of 1 GiB are walked concurrently.
    pub async fn map(&self, context: &str, range: Range<u64>) -> Result<ExtentMap, NbdError> {
        let Range { start, end } = range;
        if start >= end {
            return Ok(ExtentMap::new());
        }
        self.check_range("map range", start, end - start, u64::MAX)?;
        let windows: Vec<Range<u64>> = {
            let mut w = Vec::new();
            let mut pos = start;
            while pos < end {
                let next = ((pos / MAP_WINDOW) + 1).saturating_mul(MAP_WINDOW).min(end);
                w.push(pos..next);
                pos = next;
            }
            w
        };
        let parallel = self.connections() * 4;
        let mut out = ExtentMap::new();
        let mut iter = windows.into_iter();
        let mut running = tokio::task::JoinSet::new();
        let mut index = 0usize;
        let mut next_to_emit = 0usize;
        let mut ready: std::collections::BTreeMap<usize, Vec<Extent>> =
            std::collections::BTreeMap::new();
        loop {
            while running.len() < parallel {
                let Some(w) = iter.next() else { break };
                let me = self.clone();
                let ctx = context.to_string();
                let i = index;
                index += 1;
                running.spawn(async move { (i, me.map_window(&ctx, w).await) });
            }
            let Some(joined) = running.join_next().await else {
                break;
            };
            let (i, res) = joined.map_err(|e| NbdError::Io {
                op: "walking block status",
                source: io::Error::other(e),
            })?;
            ready.insert(i, res?);
            // Windows finish in any order; append them in address order.
            while let Some(ext) = ready.remove(&next_to_emit) {
                next_to_emit += 1;
                for e in ext {
                    // Windows arrive in order and each is contiguous, so push only fails on a
                    // bug; fall back to insert to stay correct regardless.
                    if out.push(e).is_err() {
                        out.insert(e.range(), e.flags);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn map_window(&self, context: &str, w: Range<u64>) -> Result<Vec<Extent>, NbdError> {
        let mut out = Vec::new();
        let mut pos = w.start;
        while pos < w.end {
            let len = (w.end - pos).min(MAX_BLOCK_STATUS_LEN);
            // len <= MAX_BLOCK_STATUS_LEN < u32::MAX.
            let ext = self.block_status(context, pos, len as u32).await?;
            // descriptors_to_extents guarantees at least one extent ending past pos.
            pos = ext.last().map_or(w.end, |e| e.end);
            out.extend(ext);
        }
        Ok(out)
    }

    /// Sends `NBD_CMD_DISC` on every connection and waits until it is on the wire. Later
    /// requests fail.
    pub async fn disconnect(&self) {
        for c in &self.inner.conns {
            c.disconnect().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_clip_the_final_extent() {
        let e = descriptors_to_extents(4096, 8192, [(4096, 0), (65536, 1)]).expect("valid");
        assert_eq!(
            e,
            vec![Extent::new(4096, 8192, 0), Extent::new(8192, 12288, 1)]
        );
    }

    #[test]
    fn block_status_rejects_extent_past_request_end() {
        let e = descriptors_to_extents(0, 4096, [(4096, 0), (512, 1)]);
        assert_eq!(
            e,
            Err(Violation::ExtentOutsideRequest {
                offset: 4096,
                end: 4096
            })
        );
        assert_eq!(
            descriptors_to_extents(0, 4096, [(0, 0)]),
            Err(Violation::ZeroLengthExtent)
        );
        assert_eq!(
            descriptors_to_extents(0, 4096, []),
            Err(Violation::MissingBlockStatus)
        );
    }
}
