//! The NBD client against a scripted in-process server that misbehaves on purpose: replies out
//! of order, unknown cookies, chunks after DONE, extents and data outside the request,
//! malformed bytes, refused GO, endless replies, silence. Real-server behaviour is covered in
//! `nbd_peers.rs`.

use std::time::Duration;

use libcbt::nbd::proto::{
    self, chunk, cmd, errno, handshake, opt, rep, tflag, Greeting, OptReplyHeader, ReplyHeader,
    Request,
};
use libcbt::nbd::{Client, ConnectOptions, ErrorKind, NbdError, Step, Timeouts, Violation};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const SIZE: u64 = 1 << 20;
const CTX: &str = "base:allocation";
const CTX_ID: u32 = 7;

/// What the server does with each request: bytes to send back (possibly nothing yet).
type Respond = Box<dyn FnMut(Request) -> Vec<u8> + Send>;

struct Server {
    _dir: tempfile::TempDir,
    uri: String,
}

/// Starts a server that accepts one connection, negotiates, then answers with `respond`.
fn serve(go_supported: bool, respond: Respond) -> Server {
    serve_inner(go_supported, false, respond)
}

/// Like [`serve`], but the server hangs up right after its first answer.
fn serve_once(respond: Respond) -> Server {
    serve_inner(true, true, respond)
}

fn serve_inner(go_supported: bool, close_after_first: bool, respond: Respond) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        if negotiate(&mut s, go_supported).await.is_ok() {
            let _ = transmission(&mut s, close_after_first, respond).await;
        }
    });
    Server {
        uri: format!("nbd+unix:///?socket={}", path.display()),
        _dir: dir,
    }
}

/// Starts a server that negotiates, reads one request, then sends `chunk(req, i)` for
/// i = 0, 1, ... until the client hangs up: a reply without end.
fn serve_endless(mut chunk: Box<dyn FnMut(Request, u64) -> Vec<u8> + Send>) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        if negotiate(&mut s, true).await.is_err() {
            return;
        }
        let mut h = [0u8; proto::REQUEST_LEN];
        if s.read_exact(&mut h).await.is_err() {
            return;
        }
        let req = Request::decode(&h).expect("client sends valid requests");
        for i in 0.. {
            if s.write_all(&chunk(req, i)).await.is_err() {
                return;
            }
        }
    });
    Server {
        uri: format!("nbd+unix:///?socket={}", path.display()),
        _dir: dir,
    }
}

/// Starts a server that accepts one connection and never says a word (holding it open).
fn serve_silent() -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    });
    Server {
        uri: format!("nbd+unix:///?socket={}", path.display()),
        _dir: dir,
    }
}

fn opt_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = OptReplyHeader {
        option,
        reply,
        len: data.len() as u32,
    }
    .encode()
    .to_vec();
    out.extend_from_slice(data);
    out
}

async fn negotiate(s: &mut UnixStream, go_supported: bool) -> std::io::Result<()> {
    s.write_all(
        &Greeting {
            flags: handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES,
        }
        .encode(),
    )
    .await?;
    let _client_flags = s.read_u32().await?;
    loop {
        let _magic = s.read_u64().await?;
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        let flags = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_WRITE_ZEROES;
        match option {
            opt::STRUCTURED_REPLY => s.write_all(&opt_reply(option, rep::ACK, &[])).await?,
            opt::SET_META_CONTEXT => {
                let mut d = CTX_ID.to_be_bytes().to_vec();
                d.extend_from_slice(CTX.as_bytes());
                s.write_all(&opt_reply(option, rep::META_CONTEXT, &d))
                    .await?;
                s.write_all(&opt_reply(option, rep::ACK, &[])).await?;
            }
            opt::GO if go_supported => {
                let mut d = proto::info::EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&SIZE.to_be_bytes());
                d.extend_from_slice(&flags.to_be_bytes());
                s.write_all(&opt_reply(option, rep::INFO, &d)).await?;
                s.write_all(&opt_reply(option, rep::ACK, &[])).await?;
                return Ok(());
            }
            opt::EXPORT_NAME => {
                s.write_all(&SIZE.to_be_bytes()).await?;
                s.write_all(&flags.to_be_bytes()).await?;
                return Ok(());
            }
            _ => {
                s.write_all(&opt_reply(option, rep::ERR_UNSUP, b"not here"))
                    .await?
            }
        }
    }
}

async fn transmission(
    s: &mut UnixStream,
    close_after_first: bool,
    mut respond: Respond,
) -> std::io::Result<()> {
    loop {
        let mut h = [0u8; proto::REQUEST_LEN];
        s.read_exact(&mut h).await?;
        let req = Request::decode(&h).expect("client sends valid requests");
        if req.kind == cmd::DISC {
            return Ok(());
        }
        if req.kind == cmd::WRITE {
            let mut payload = vec![0u8; req.len as usize];
            s.read_exact(&mut payload).await?;
        }
        let out = respond(req);
        s.write_all(&out).await?;
        if close_after_first && !out.is_empty() {
            return s.shutdown().await;
        }
    }
}

/// The bytes a read of `[offset, +len)` holds in the scripted export.
fn pattern(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| (i / 512 % 251) as u8)
        .collect()
}

fn structured(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = ReplyHeader::Structured {
        flags,
        kind,
        cookie,
        len: payload.len() as u32,
    }
    .encode();
    out.extend_from_slice(payload);
    out
}

fn data_chunk(done: bool, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    structured(
        if done { chunk::FLAG_DONE } else { 0 },
        chunk::OFFSET_DATA,
        cookie,
        &p,
    )
}

fn hole_chunk(done: bool, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    structured(
        if done { chunk::FLAG_DONE } else { 0 },
        chunk::OFFSET_HOLE,
        cookie,
        &p,
    )
}

fn block_status_chunk(cookie: u64, context: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let mut p = context.to_be_bytes().to_vec();
    for (l, f) in descriptors {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    structured(chunk::FLAG_DONE, chunk::BLOCK_STATUS, cookie, &p)
}

fn single(opts_connections: usize) -> ConnectOptions {
    ConnectOptions {
        connections: opts_connections,
        ..ConnectOptions::with_contexts([CTX])
    }
}

fn assert_violation(e: &NbdError, want: impl Fn(&Violation) -> bool) {
    match e.root_cause() {
        NbdError::Protocol(v) if want(v) => {}
        other => panic!("expected a protocol violation, got {other:?} (from {e:?})"),
    }
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("client hung")
}

#[tokio::test]
async fn out_of_order_replies_with_holes_assemble_each_read() {
    // Collect 8 reads, then answer them last-first, each as a hole + data pair.
    let mut held: Vec<Request> = Vec::new();
    let srv = serve(
        true,
        Box::new(move |req| {
            held.push(req);
            if held.len() < 8 {
                return Vec::new();
            }
            let mut out = Vec::new();
            for r in held.drain(..).rev() {
                let half = u64::from(r.len / 2);
                out.extend(data_chunk(
                    false,
                    r.cookie,
                    r.offset + half,
                    &pattern(r.offset + half, half),
                ));
                out.extend(hole_chunk(true, r.cookie, r.offset, r.len / 2));
            }
            out
        }),
    );
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8u64 {
        let c = client.clone();
        set.spawn(async move { (i, c.read(i * 8192, vec![0xff; 8192]).await) });
    }
    within(async {
        while let Some(r) = set.join_next().await {
            let (i, data) = r.expect("task");
            let data = data.expect("read");
            assert!(
                data[..4096].iter().all(|b| *b == 0),
                "hole of read {i} not zeroed"
            );
            assert_eq!(
                &data[4096..],
                &pattern(i * 8192 + 4096, 4096)[..],
                "data of read {i}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn reply_with_unknown_cookie_fails_the_connection() {
    let srv = serve(
        true,
        Box::new(|req| {
            data_chunk(
                true,
                req.cookie + 1000,
                req.offset,
                &pattern(req.offset, u64::from(req.len)),
            )
        }),
    );
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    let e = within(client.read(0, vec![0; 4096]))
        .await
        .expect_err("must fail");
    assert_eq!(e.kind(), ErrorKind::ConnectionLost);
    assert_violation(&e, |v| matches!(v, Violation::UnknownCookie(_)));
    let again = within(client.read(0, vec![0; 4096]))
        .await
        .expect_err("connection is dead");
    assert_eq!(again.kind(), ErrorKind::ConnectionLost);
}

#[tokio::test]
async fn chunk_after_done_fails_later_requests() {
    let srv = serve(
        true,
        Box::new(|req| {
            let mut out = data_chunk(
                true,
                req.cookie,
                req.offset,
                &pattern(req.offset, u64::from(req.len)),
            );
            out.extend(hole_chunk(true, req.cookie, req.offset, req.len));
            out
        }),
    );
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    // The first read may complete before the stray chunk is seen.
    let _ = within(client.read(0, vec![0; 4096])).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = within(client.read(4096, vec![0; 4096]))
        .await
        .expect_err("must fail");
    assert_violation(&e, |v| matches!(v, Violation::ChunkAfterDone(_)));
}

#[tokio::test]
async fn data_outside_the_request_is_a_violation() {
    let srv = serve(
        true,
        Box::new(|req| {
            data_chunk(
                true,
                req.cookie,
                req.offset + 512,
                &pattern(0, u64::from(req.len)),
            )
        }),
    );
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    let e = within(client.read(0, vec![0; 4096]))
        .await
        .expect_err("must fail");
    assert_violation(&e, |v| matches!(v, Violation::DataOutsideRequest { .. }));
}

#[tokio::test]
async fn read_not_fully_covered_is_a_violation() {
    let srv = serve(
        true,
        Box::new(|req| {
            data_chunk(
                true,
                req.cookie,
                req.offset,
                &pattern(req.offset, u64::from(req.len / 2)),
            )
        }),
    );
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    let e = within(client.read(0, vec![0; 4096]))
        .await
        .expect_err("must fail");
    assert_violation(&e, |v| matches!(v, Violation::ReadNotCovered { .. }));
}

#[tokio::test]
async fn block_status_extent_past_the_request_is_a_violation() {
    let srv = serve(
        true,
        Box::new(|req| block_status_chunk(req.cookie, CTX_ID, &[(req.len, 0), (4096, 3)])),
    );
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    let e = within(client.map(CTX, 0..SIZE))
        .await
        .expect_err("must fail");
    assert_violation(&e, |v| matches!(v, Violation::ExtentOutsideRequest { .. }));
}

#[tokio::test]
async fn block_status_for_an_unnegotiated_context_is_a_violation() {
    let srv = serve(
        true,
        Box::new(|req| block_status_chunk(req.cookie, CTX_ID + 1, &[(req.len, 0)])),
    );
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    let e = within(client.map(CTX, 0..SIZE))
        .await
        .expect_err("must fail");
    assert_violation(&e, |v| matches!(v, Violation::UnknownContext(_)));
}

#[tokio::test]
async fn short_block_status_answers_are_walked_to_the_end() {
    // One 4 KiB extent per reply, alternating flags: 256 round trips for 1 MiB.
    let srv = serve(
        true,
        Box::new(|req| {
            let flags = (req.offset / 4096 % 2) as u32 * 3;
            block_status_chunk(req.cookie, CTX_ID, &[(4096, flags)])
        }),
    );
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    let map = within(client.map(CTX, 0..SIZE)).await.expect("map");
    assert_eq!(map.len(), 256);
    assert_eq!(map.total_len(), SIZE);
    for (i, e) in map.iter().enumerate() {
        assert_eq!(
            (e.start, e.len(), e.flags),
            (i as u64 * 4096, 4096, (i % 2) as u32 * 3)
        );
    }
}

#[tokio::test]
async fn malformed_reply_magic_is_reported_as_malformed() {
    let srv = serve(
        true,
        Box::new(|_| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    );
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    let e = within(client.read(0, vec![0; 4096]))
        .await
        .expect_err("must fail");
    assert_eq!(e.root_cause().kind(), ErrorKind::Malformed, "{e:?}");
}

#[tokio::test]
async fn oversized_chunk_length_is_refused_before_allocating() {
    let srv = serve(
        true,
        Box::new(|req| {
            ReplyHeader::Structured {
                flags: chunk::FLAG_DONE,
                kind: chunk::BLOCK_STATUS,
                cookie: req.cookie,
                len: u32::MAX,
            }
            .encode()
        }),
    );
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    let e = within(client.map(CTX, 0..SIZE))
        .await
        .expect_err("must fail");
    assert!(
        matches!(
            e.root_cause(),
            NbdError::Malformed(proto::ProtoError::TooLarge { .. })
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn server_error_chunk_carries_errno_and_message_and_keeps_the_connection() {
    let srv = serve(
        true,
        Box::new(|req| {
            if req.offset == 0 {
                let mut p = errno::EIO.to_be_bytes().to_vec();
                p.extend_from_slice(&9u16.to_be_bytes());
                p.extend_from_slice(b"disk died");
                p.extend_from_slice(&req.offset.to_be_bytes());
                structured(chunk::FLAG_DONE, chunk::ERROR_OFFSET, req.cookie, &p)
            } else {
                data_chunk(
                    true,
                    req.cookie,
                    req.offset,
                    &pattern(req.offset, u64::from(req.len)),
                )
            }
        }),
    );
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    let e = within(client.read(0, vec![0; 4096]))
        .await
        .expect_err("must fail");
    match &e {
        NbdError::Server {
            errno: errno::EIO,
            message,
            offset: Some(0),
        } => assert_eq!(message, "disk died"),
        other => panic!("unexpected {other:?}"),
    }
    let ok = within(client.read(4096, vec![0; 4096]))
        .await
        .expect("next read works");
    assert_eq!(ok, pattern(4096, 4096));
}

#[tokio::test]
async fn refused_go_falls_back_to_export_name() {
    let srv = serve(
        false,
        Box::new(|req| {
            let mut out = ReplyHeader::Simple {
                error: 0,
                cookie: req.cookie,
            }
            .encode();
            if req.kind == cmd::READ {
                out.extend(pattern(req.offset, u64::from(req.len)));
            }
            out
        }),
    );
    let opts = ConnectOptions {
        connections: 1,
        ..ConnectOptions::default()
    };
    let client = Client::connect_with(&srv.uri, &opts)
        .await
        .expect("connect");
    assert!(client.info().used_export_name);
    assert_eq!(client.size(), SIZE);
    let data = within(client.read(65536, vec![0; 65536]))
        .await
        .expect("read");
    assert_eq!(data, pattern(65536, 65536));
    within(client.write_zeroes(0, 8192, false))
        .await
        .expect("write zeroes");
}

#[tokio::test]
async fn eof_in_the_middle_of_a_reply_fails_pending_requests() {
    let srv = serve_once(Box::new(|req| {
        let mut out = data_chunk(
            true,
            req.cookie,
            req.offset,
            &pattern(req.offset, u64::from(req.len)),
        );
        out.truncate(out.len() / 2);
        out
    }));
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    let c2 = client.clone();
    let pending = tokio::spawn(async move { c2.read(8192, vec![0; 4096]).await });
    let e = within(client.read(0, vec![0; 4096]))
        .await
        .expect_err("half a reply, then EOF");
    let e2 = within(pending)
        .await
        .expect("task")
        .expect_err("never answered");
    for e in [e, e2] {
        assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e:?}");
        assert_eq!(e.root_cause().kind(), ErrorKind::Io, "{e:?}");
    }
}

#[tokio::test]
async fn requests_out_of_range_are_refused_locally() {
    let srv = serve(
        true,
        Box::new(|req| {
            data_chunk(
                true,
                req.cookie,
                req.offset,
                &pattern(req.offset, u64::from(req.len)),
            )
        }),
    );
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    for (off, len) in [(SIZE - 4096, 8192usize), (u64::MAX - 10, 4096), (0, 0)] {
        let e = client
            .read(off, vec![0; len])
            .await
            .expect_err("must be refused");
        assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e:?}");
    }
    let e = client
        .read(0, vec![0; 64 << 20])
        .await
        .expect_err("above the maximum request");
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    // The connection was not disturbed.
    within(client.read(0, vec![0; 4096])).await.expect("read");
}

fn assert_too_large(e: &NbdError) {
    assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e:?}");
    assert_eq!(e.root_cause().kind(), ErrorKind::ReplyTooLarge, "{e:?}");
}

#[tokio::test]
async fn endless_overlapping_data_chunks_fail_the_read_at_once() {
    // The same 4 KiB again and again, never DONE: before, each was taken and the reply
    // never ended.
    let srv = serve_endless(Box::new(|req, _| {
        data_chunk(false, req.cookie, req.offset, &pattern(req.offset, 4096))
    }));
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    let e = within(client.read(0, vec![0; 8192]))
        .await
        .expect_err("must fail");
    assert_violation(&e, |v| matches!(v, Violation::ReadOverlap { .. }));
}

#[tokio::test]
async fn endless_error_chunks_end_at_the_reply_bound() {
    // Error chunks may come several to a reply, so each is well-formed: only the aggregate
    // bound stops them.
    let srv = serve_endless(Box::new(|req, i| {
        let mut p = errno::EIO.to_be_bytes().to_vec();
        let msg = format!("error {i}");
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg.as_bytes());
        structured(0, chunk::ERROR, req.cookie, &p)
    }));
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    let e = within(client.read(0, vec![0; 4096]))
        .await
        .expect_err("must fail");
    assert_too_large(&e);
    assert!(
        matches!(
            e.root_cause(),
            NbdError::ReplyTooLarge { what: "chunks", max } if *max == u64::from(proto::MAX_REPLY_CHUNKS)
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn endless_large_error_chunks_to_a_block_status_request_end_at_the_byte_bound() {
    // A second block-status chunk for the requested context is a violation already; what
    // stays well-formed chunk by chunk is error chunks with the longest message: the bound
    // on the reply's payload bytes stops them.
    let srv = serve_endless(Box::new(|req, _| {
        let mut p = errno::EIO.to_be_bytes().to_vec();
        let msg = vec![b'x'; proto::MAX_STRING];
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(&msg);
        structured(0, chunk::ERROR, req.cookie, &p)
    }));
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    let e = within(client.block_status(CTX, 0, SIZE as u32))
        .await
        .expect_err("must fail");
    assert_too_large(&e);
    assert!(
        matches!(
            e.root_cause(),
            NbdError::ReplyTooLarge { what: "payload bytes", max } if *max == proto::MAX_REPLY_METADATA
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn one_byte_block_status_extents_are_kept_up_to_the_reply_bound() {
    // 2^20 one-byte extents in one chunk (the largest chunk accepted): 24 MiB of extents
    // before, at most MAX_REPLY_EXTENTS now; the map walks on from where they end.
    let srv = serve(
        true,
        Box::new(|req| {
            let d: Vec<(u32, u32)> = (0..req.len.min(1 << 20))
                .map(|i| (1, (req.offset + u64::from(i)) as u32 % 2))
                .collect();
            block_status_chunk(req.cookie, CTX_ID, &d)
        }),
    );
    let client = Client::connect_with(&srv.uri, &single(1))
        .await
        .expect("connect");
    let ext = within(client.block_status(CTX, 0, SIZE as u32))
        .await
        .expect("block status");
    assert_eq!(ext.len(), proto::MAX_REPLY_EXTENTS);
    assert_eq!(
        ext.last().map(|e| e.end),
        Some(proto::MAX_REPLY_EXTENTS as u64)
    );
    let ext = within(client.block_status(CTX, 4096, 4096))
        .await
        .expect("small block status");
    assert_eq!(ext.len(), 4096);
}

fn timeouts(ms: u64) -> Timeouts {
    let t = Duration::from_millis(ms);
    Timeouts {
        connect: t,
        handshake: t,
        request: t,
    }
}

#[tokio::test]
async fn silent_peer_in_the_handshake_times_out() {
    let srv = serve_silent();
    let opts = ConnectOptions {
        timeouts: timeouts(300),
        ..single(1)
    };
    let e = within(Client::connect_with(&srv.uri, &opts))
        .await
        .expect_err("must time out");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e:?}");
    assert!(
        matches!(
            e,
            NbdError::Timeout {
                step: Step::Handshake,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("handshake"), "{e}");
}

#[tokio::test]
async fn silent_peer_on_a_read_times_out_and_ends_the_connection() {
    // Negotiates, then never answers a request.
    let srv = serve(true, Box::new(|_| Vec::new()));
    let opts = ConnectOptions {
        timeouts: Timeouts {
            request: Duration::from_millis(300),
            ..Timeouts::default()
        },
        ..single(1)
    };
    let client = Client::connect_with(&srv.uri, &opts)
        .await
        .expect("connect");
    let c2 = client.clone();
    let other = tokio::spawn(async move { c2.read(8192, vec![0; 4096]).await });
    let e = within(client.read(0, vec![0; 4096]))
        .await
        .expect_err("must time out");
    assert!(
        matches!(
            e,
            NbdError::Timeout {
                step: Step::Request,
                ..
            }
        ),
        "{e:?}"
    );
    // The other request in flight, and every later one, fail with the timeout as cause.
    let e2 = within(other)
        .await
        .expect("task")
        .expect_err("never answered");
    assert_eq!(e2.root_cause().kind(), ErrorKind::Timeout, "{e2:?}");
    let e3 = within(client.read(0, vec![0; 4096]))
        .await
        .expect_err("connection is gone");
    assert_eq!(e3.kind(), ErrorKind::ConnectionLost, "{e3:?}");
    assert_eq!(e3.root_cause().kind(), ErrorKind::Timeout, "{e3:?}");
    // Disconnecting from it does not hang either.
    within(client.disconnect()).await;
}
