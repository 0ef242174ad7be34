//! Entry points for the fuzz targets in `fuzz/` and for replaying their seed corpus in unit
//! tests. Each takes arbitrary bytes and must never panic.

use crate::nbd::client::descriptors_to_extents;
use crate::nbd::proto::{self, Chunk, OptReplyHeader, ReplyHeader};

/// Decodes `data` as a stream of transmission replies (headers followed by chunk payloads), as
/// the client's reader would, for a 1 MiB read at offset 0 or a block-status request.
pub fn nbd_reply(data: &[u8]) {
    let mut rest = data;
    while rest.len() >= 4 {
        let magic = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let Ok(hlen) = ReplyHeader::len_for_magic(magic) else {
            return;
        };
        let Some(hbytes) = rest.get(..hlen) else {
            return;
        };
        let Ok(h) = ReplyHeader::decode(hbytes) else {
            return;
        };
        rest = &rest[hlen..];
        let ReplyHeader::Structured { kind, len, .. } = h else {
            continue;
        };
        let Some(payload) = rest.get(..len as usize) else {
            return;
        };
        rest = &rest[len as usize..];
        if kind == proto::chunk::OFFSET_DATA {
            let _ = payload.get(..8).map(proto::decode_offset_data_prefix);
            continue;
        }
        if let Ok(Chunk::BlockStatus { descriptors, .. }) = proto::decode_chunk(kind, payload) {
            let _ = descriptors_to_extents(0, 1 << 20, descriptors);
        }
    }
}

/// Decodes `data` as the server side of a handshake: greeting, then option replies.
pub fn nbd_handshake(data: &[u8]) {
    let Some(g) = data.get(..proto::GREETING_LEN) else {
        return;
    };
    let _ = proto::Greeting::decode(g);
    let mut rest = &data[proto::GREETING_LEN..];
    if rest.len() >= proto::EXPORT_NAME_REPLY_LEN {
        let _ = proto::decode_export_name_reply(&rest[..proto::EXPORT_NAME_REPLY_LEN]);
    }
    while let Some(hb) = rest.get(..proto::OPT_REPLY_HEADER_LEN) {
        let Ok(h) = OptReplyHeader::decode(hb) else {
            return;
        };
        rest = &rest[proto::OPT_REPLY_HEADER_LEN..];
        let Some(body) = rest.get(..h.len as usize) else {
            return;
        };
        rest = &rest[h.len as usize..];
        let _ = proto::decode_opt_reply(&h, body);
    }
}

/// Parses `data` as one QMP line.
pub fn qmp_line(data: &[u8]) {
    crate::qmp::fuzz_parse(data);
}

/// Decodes `data` as a segment (header, frames) and as an index and a manifest.
pub fn format_objects(data: &[u8]) {
    for r in crate::format::segment::scan(data) {
        if r.is_err() {
            break;
        }
    }
    let _ = crate::format::segment::FrameHeader::decode(data);
    if let Ok(idx) = crate::format::Index::decode(data) {
        let _ = crate::format::plan_restore(&[&idx, &idx]);
    }
    let _ = crate::format::Manifest::decode(data);
}

/// What the `nbd_server` target serves: 1 MiB whose first half is data and second a hole,
/// with a read error at 768 KiB.
struct FuzzExport;

impl crate::nbd::server::Export for FuzzExport {
    fn size(&self) -> u64 {
        1 << 20
    }

    async fn read(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<crate::engine::export::Span>, String> {
        use crate::engine::export::Span;
        let half = 1u64 << 19;
        if offset <= 768 << 10 && offset + len > 768 << 10 {
            return Err("a broken frame".into());
        }
        let mut out = Vec::new();
        let end = offset + len;
        if offset < half {
            let e = end.min(half);
            out.push(Span::Data {
                offset,
                buf: std::sync::Arc::new(vec![0xa5; (e - offset) as usize]),
                range: 0..(e - offset) as usize,
            });
        }
        if end > half {
            let s = offset.max(half);
            out.push(Span::Hole {
                offset: s,
                len: end - s,
            });
        }
        Ok(out)
    }

    fn allocation(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        let half = 1u64 << 19;
        let end = offset.saturating_add(len).min(1 << 20);
        let mut out = Vec::new();
        if offset < half {
            out.push((end.min(half) - offset, false));
        }
        if end > half && out.len() < max {
            out.push((end - offset.max(half), true));
        }
        out
    }
}

/// Feeds `data` to a server connection as everything a client sends (flags, options,
/// requests), reading whatever the server answers: the handshake's and transmission's state
/// machines and every parser on the way must neither panic nor hang.
pub fn nbd_server(data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    let input = data.to_vec();
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(1 << 16);
        let opts = crate::nbd::server::ServerOptions {
            name: "fuzz".into(),
            ..Default::default()
        };
        let served = tokio::spawn(crate::nbd::server::serve_connection(
            server,
            std::sync::Arc::new(FuzzExport),
            std::sync::Arc::new(opts),
        ));
        let (mut r, mut w) = tokio::io::split(client);
        let write = async move {
            let _ = w.write_all(&input).await;
            let _ = w.shutdown().await;
        };
        let read = async move {
            let mut out = Vec::new();
            let _ = r.read_to_end(&mut out).await;
        };
        tokio::join!(write, read);
        let _ = served.await;
    });
}
