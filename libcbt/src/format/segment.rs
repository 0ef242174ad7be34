//! Segments and frames: where backup data lives.
//!
//! A segment is an immutable object: a header, then frames back to back. Each frame carries
//! enough to be found, checked and decoded on its own, so a segment can be scanned and
//! verified without its index.
//!
//! | segment header (16 bytes) | |
//! |---|---|
//! | 0 | magic `CBTSEG01` (8) |
//! | 8 | format version u16 = 1 |
//! | 10 | reserved u16 = 0 |
//! | 12 | crc32 of bytes 0..12 |
//!
//! | frame header (32 bytes) | |
//! |---|---|
//! | 0 | magic u32 `CBTF` |
//! | 4 | codec u8: 0 none, 1 lz4 block |
//! | 5 | reserved u8, u16 = 0 |
//! | 8 | disk offset u64 of the first raw byte |
//! | 16 | raw length u32 (≤ [`MAX_FRAME_RAW`]) |
//! | 20 | stored length u32 (≤ raw length) |
//! | 24 | crc32 of the stored bytes |
//! | 28 | crc32 of bytes 0..28 of this header |
//!
//! The stored bytes follow the header. lz4 is used only when it shrinks the block; otherwise
//! the raw bytes are stored (codec 0). Zero blocks are never stored: the index records them.
//! All integers are big-endian.

use super::FormatError;

// Do not change: on-disk format.
/// Segment magic, "CBTSEG01".
pub const SEGMENT_MAGIC: [u8; 8] = *b"CBTSEG01";
/// Segment header length.
pub const SEGMENT_HEADER_LEN: usize = 16;
/// Frame magic, "CBTF".
pub const FRAME_MAGIC: u32 = u32::from_be_bytes(*b"CBTF");
/// Frame header length.
pub const FRAME_HEADER_LEN: usize = 32;
/// Largest raw block in one frame.
pub const MAX_FRAME_RAW: u32 = 4 << 20;
/// Format version written by this code.
pub const FORMAT_VERSION: u16 = 1;

/// Codec of a frame's stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None = 0,
    Lz4 = 1,
}

/// Encodes the segment header.
pub fn segment_header() -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..].copy_from_slice(&crc.to_be_bytes());
    h
}

/// Checks a segment header.
pub fn check_segment_header(h: &[u8]) -> Result<(), FormatError> {
    if h.len() < SEGMENT_HEADER_LEN {
        return Err(FormatError::Truncated {
            what: "segment header",
        });
    }
    if h[..8] != SEGMENT_MAGIC {
        return Err(FormatError::BadMagic { what: "segment" });
    }
    let crc = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    if crc != crc32fast::hash(&h[..12]) {
        return Err(FormatError::HeaderChecksum { what: "segment" });
    }
    let version = u16::from_be_bytes([h[8], h[9]]);
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion {
            what: "segment",
            version: version.into(),
        });
    }
    Ok(())
}

/// A decoded, checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub codec: Codec,
    pub offset: u64,
    pub raw_len: u32,
    pub stored_len: u32,
    pub crc: u32,
}

impl FrameHeader {
    /// Bytes of the whole frame (header + stored bytes).
    pub fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + u64::from(self.stored_len)
    }

    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[..4].copy_from_slice(&FRAME_MAGIC.to_be_bytes());
        h[4] = self.codec as u8;
        h[8..16].copy_from_slice(&self.offset.to_be_bytes());
        h[16..20].copy_from_slice(&self.raw_len.to_be_bytes());
        h[20..24].copy_from_slice(&self.stored_len.to_be_bytes());
        h[24..28].copy_from_slice(&self.crc.to_be_bytes());
        let hc = crc32fast::hash(&h[..28]);
        h[28..].copy_from_slice(&hc.to_be_bytes());
        h
    }

    /// Decodes and checks a frame header: magic, header checksum, codec, bounded lengths.
    pub fn decode(h: &[u8]) -> Result<FrameHeader, FormatError> {
        let h: &[u8; FRAME_HEADER_LEN] = h
            .get(..FRAME_HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(FormatError::Truncated {
                what: "frame header",
            })?;
        let be32 = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        if be32(0) != FRAME_MAGIC {
            return Err(FormatError::BadMagic { what: "frame" });
        }
        if be32(28) != crc32fast::hash(&h[..28]) {
            return Err(FormatError::HeaderChecksum { what: "frame" });
        }
        let codec = match h[4] {
            0 => Codec::None,
            1 => Codec::Lz4,
            c => {
                return Err(FormatError::BadValue {
                    what: "frame codec",
                    value: c.into(),
                })
            }
        };
        let mut off = [0u8; 8];
        off.copy_from_slice(&h[8..16]);
        let f = FrameHeader {
            codec,
            offset: u64::from_be_bytes(off),
            raw_len: be32(16),
            stored_len: be32(20),
            crc: be32(24),
        };
        if f.raw_len == 0 || f.raw_len > MAX_FRAME_RAW {
            return Err(FormatError::TooLarge {
                what: "frame raw length",
                len: f.raw_len.into(),
                max: MAX_FRAME_RAW.into(),
            });
        }
        let stored_ok = match codec {
            Codec::None => f.stored_len == f.raw_len,
            Codec::Lz4 => f.stored_len > 0 && f.stored_len < f.raw_len,
        };
        if !stored_ok {
            return Err(FormatError::BadValue {
                what: "frame stored length",
                value: f.stored_len.into(),
            });
        }
        f.offset
            .checked_add(f.raw_len.into())
            .ok_or(FormatError::BadValue {
                what: "frame disk offset",
                value: f.offset,
            })?;
        Ok(f)
    }
}

/// Encodes `raw` (the disk bytes at `offset`) as one frame appended to `out`: lz4 when that
/// shrinks it, raw otherwise. `raw` must be 1..=[`MAX_FRAME_RAW`] bytes.
pub fn encode_frame(
    offset: u64,
    raw: &[u8],
    out: &mut Vec<u8>,
) -> Result<FrameHeader, FormatError> {
    let mut frame = Vec::new();
    let (header, n) = encode_frame_in_place(offset, raw, &mut frame)?;
    out.extend_from_slice(&frame[..n]);
    Ok(header)
}

/// Encodes `raw` as one frame at the start of `buf` and returns its header and length; `buf`
/// keeps its length (grown to the worst case when shorter, never shrunk), and what lies past
/// the frame is unspecified. With a buffer that has reached the worst case once, encoding
/// neither allocates nor clears nor copies the compressed bytes again (the backup's hot path).
pub fn encode_frame_in_place(
    offset: u64,
    raw: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(FrameHeader, usize), FormatError> {
    let raw_len = u32::try_from(raw.len())
        .ok()
        .filter(|l| *l > 0 && *l <= MAX_FRAME_RAW)
        .ok_or(FormatError::TooLarge {
            what: "frame raw length",
            len: raw.len() as u64,
            max: MAX_FRAME_RAW.into(),
        })?;
    // lz4_flex wants room for its worst case; whatever does not shrink is stored raw.
    let room = lz4_flex::block::get_maximum_output_size(raw.len());
    if buf.len() < FRAME_HEADER_LEN + room {
        buf.resize(FRAME_HEADER_LEN + room, 0);
    }
    let body = &mut buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + room];
    let (codec, stored_len) = match lz4_flex::block::compress_into(raw, body) {
        Ok(n) if n > 0 && n < raw.len() => (Codec::Lz4, n),
        _ => {
            body[..raw.len()].copy_from_slice(raw);
            (Codec::None, raw.len())
        }
    };
    let header = FrameHeader {
        codec,
        offset,
        raw_len,
        // stored_len <= raw_len, which fits u32.
        stored_len: stored_len as u32,
        crc: crc32fast::hash(&body[..stored_len]),
    };
    buf[..FRAME_HEADER_LEN].copy_from_slice(&header.encode());
    Ok((header, FRAME_HEADER_LEN + stored_len))
}

/// Checks the stored bytes of a frame against its header and decodes them into `out`, which
/// must be exactly `raw_len` bytes.
pub fn decode_frame_body(
    h: &FrameHeader,
    stored: &[u8],
    out: &mut [u8],
) -> Result<(), FormatError> {
    if stored.len() != h.stored_len as usize {
        return Err(FormatError::Truncated { what: "frame body" });
    }
    if out.len() != h.raw_len as usize {
        return Err(FormatError::BadValue {
            what: "frame output length",
            value: out.len() as u64,
        });
    }
    if crc32fast::hash(stored) != h.crc {
        return Err(FormatError::DataChecksum { offset: h.offset });
    }
    match h.codec {
        Codec::None => out.copy_from_slice(stored),
        Codec::Lz4 => {
            let n = lz4_flex::block::decompress_into(stored, out)
                .map_err(|_| FormatError::Decompress { offset: h.offset })?;
            if n != out.len() {
                return Err(FormatError::Decompress { offset: h.offset });
            }
        }
    }
    Ok(())
}

/// Scans a whole segment held in memory: yields each frame header with its position, checking
/// every header and body. Stops at the first error.
pub fn scan(segment: &[u8]) -> impl Iterator<Item = Result<(u64, FrameHeader), FormatError>> + '_ {
    let mut pos = SEGMENT_HEADER_LEN;
    let mut failed = check_segment_header(segment).err();
    let mut scratch = Vec::new();
    std::iter::from_fn(move || {
        if let Some(e) = failed.take() {
            pos = segment.len();
            return Some(Err(e));
        }
        if pos >= segment.len() {
            return None;
        }
        let r = (|| {
            let h = FrameHeader::decode(&segment[pos..])?;
            let body_start = pos + FRAME_HEADER_LEN;
            let body = segment
                .get(body_start..body_start + h.stored_len as usize)
                .ok_or(FormatError::Truncated { what: "frame body" })?;
            scratch.resize(h.raw_len as usize, 0);
            decode_frame_body(&h, body, &mut scratch)?;
            Ok((pos as u64, h))
        })();
        match &r {
            Ok((_, h)) => pos += h.frame_len() as usize,
            Err(_) => pos = segment.len(),
        }
        Some(r)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compressible_block_uses_lz4_and_random_block_stays_raw() {
        let mut out = Vec::new();
        let text = b"backups are never wrong ".repeat(1000);
        let h = encode_frame(4096, &text, &mut out).expect("encode");
        assert_eq!(h.codec, Codec::Lz4);
        assert!(h.stored_len < h.raw_len / 4);
        let mut random = vec![0u8; 65536];
        rand::Rng::fill(
            &mut <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(7),
            &mut random[..],
        );
        let h2 = encode_frame(0, &random, &mut out).expect("encode");
        assert_eq!(h2.codec, Codec::None);
        assert_eq!(h2.stored_len, h2.raw_len);
    }

    #[test]
    fn flipped_byte_is_caught_by_the_checksum() {
        let mut seg = segment_header().to_vec();
        encode_frame(1 << 20, &b"abc".repeat(5000), &mut seg).expect("encode");
        let last = seg.len() - 1;
        seg[last] ^= 0x40;
        let r: Vec<_> = scan(&seg).collect();
        assert!(
            matches!(r[..], [Err(FormatError::DataChecksum { offset: 0x100000 })]),
            "{r:?}"
        );
        // A flipped header byte is caught by the header checksum.
        let mut seg2 = segment_header().to_vec();
        encode_frame(0, &[7u8; 4096], &mut seg2).expect("encode");
        seg2[SEGMENT_HEADER_LEN + 10] ^= 1;
        assert!(matches!(
            scan(&seg2).next(),
            Some(Err(FormatError::HeaderChecksum { .. }))
        ));
    }

    proptest! {
        #[test]
        fn frames_round_trip_through_a_segment(blocks in prop::collection::vec((any::<u32>(), prop::collection::vec(0u8..4, 1..3000)), 1..12)) {
            let mut seg = segment_header().to_vec();
            let mut expect = Vec::new();
            for (off, raw) in &blocks {
                let pos = seg.len() as u64;
                let h = encode_frame(u64::from(*off), raw, &mut seg).expect("encode");
                expect.push((pos, h, raw.clone()));
            }
            let got: Vec<_> = scan(&seg).collect::<Result<_, _>>().expect("scan");
            prop_assert_eq!(got.len(), expect.len());
            for ((pos, h), (epos, eh, raw)) in got.iter().zip(&expect) {
                prop_assert_eq!(pos, epos);
                prop_assert_eq!(h, eh);
                let start = *pos as usize + FRAME_HEADER_LEN;
                let mut out = vec![0u8; h.raw_len as usize];
                decode_frame_body(h, &seg[start..start + h.stored_len as usize], &mut out).expect("decode");
                prop_assert_eq!(&out, raw);
            }
        }

        #[test]
        fn in_place_encoding_into_a_dirty_reused_buffer_matches_encode_frame(
            blocks in prop::collection::vec(prop::collection::vec(0u8..3, 1..70_000), 1..6),
            garbage in any::<u8>(),
        ) {
            // One buffer reused across frames of different sizes, as the backup does, and
            // full of garbage to begin with: what lies past a frame must not matter.
            let mut buf = vec![garbage; 3 << 16];
            for (i, raw) in blocks.iter().enumerate() {
                let before = buf.len();
                let (h, n) = encode_frame_in_place(i as u64 * 4096, raw, &mut buf).expect("encode");
                prop_assert!(buf.len() >= before, "the buffer shrank");
                let mut want = Vec::new();
                let wh = encode_frame(i as u64 * 4096, raw, &mut want).expect("encode");
                prop_assert_eq!(h, wh);
                prop_assert_eq!(&buf[..n], &want[..]);
            }
        }

        #[test]
        fn frame_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = FrameHeader::decode(&bytes);
            let _ = scan(&bytes).count();
        }
    }
}
