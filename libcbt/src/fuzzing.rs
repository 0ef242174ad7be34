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
