//! NBD wire format: pure encode and decode, no sockets.
//!
//! Reference: the NetworkBlockDevice protocol (`doc/proto.md`), fixed newstyle negotiation,
//! structured replies and the block-status extension. All integers are big-endian.
//!
//! # Byte layouts
//!
//! | message | layout (bytes) |
//! |---|---|
//! | server greeting | `NBDMAGIC` u64 · `IHAVEOPT` u64 · handshake flags u16 |
//! | client flags | u32 |
//! | option | `IHAVEOPT` u64 · option u32 · length u32 · data |
//! | option reply | `OPT_REPLY_MAGIC` u64 · option u32 · reply type u32 · length u32 · data |
//! | `EXPORT_NAME` reply | size u64 · transmission flags u16 · 124 zero bytes unless `NO_ZEROES` |
//! | request | `REQUEST_MAGIC` u32 · flags u16 · type u16 · cookie u64 · offset u64 · length u32 · payload (write) |
//! | simple reply | `SIMPLE_REPLY_MAGIC` u32 · error u32 · cookie u64 · data (successful read) |
//! | structured chunk | `STRUCTURED_REPLY_MAGIC` u32 · flags u16 · type u16 · cookie u64 · length u32 · payload |
//!
//! | chunk payload | layout |
//! |---|---|
//! | `OFFSET_DATA` | offset u64 · data |
//! | `OFFSET_HOLE` | offset u64 · hole size u32 |
//! | `BLOCK_STATUS` | context id u32 · (length u32 · flags u32)* |
//! | `ERROR` | errno u32 · message length u16 · message |
//! | `ERROR_OFFSET` | errno u32 · message length u16 · message · offset u64 |
//!
//! # Bounds
//!
//! Every length that comes from the peer is checked against a named `MAX_*` constant (or, for
//! read data, against the request it answers) before anything is allocated. Decoders return
//! [`ProtoError`]; they never panic, and the fuzz targets in `fuzz/` hold them to that.

use std::fmt;

// Do not change: wire-format constants of the NBD protocol.
/// `"NBDMAGIC"`, first word of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`, second word of the greeting and first word of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// First word of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// First word of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// First word of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// First word of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags sent by the server in the greeting.
pub mod handshake {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after `EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
    /// Client flag: fixed newstyle.
    pub const C_FIXED_NEWSTYLE: u32 = 1 << 0;
    /// Client flag: no zeroes.
    pub const C_NO_ZEROES: u32 = 1 << 1;
}

/// Option numbers.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types. Errors have bit 31 set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_BIT: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    pub const ERR_PLATFORM: u32 = ERR_BIT | 4;
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT | 8;
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
    pub const ERR_EXT_HEADER_REQD: u32 = ERR_BIT | 10;
}

/// `NBD_INFO_*` items of `NBD_OPT_GO` / `NBD_OPT_INFO`.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags of an export.
pub mod tflag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cmd_flag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR_BIT: u16 = 1 << 15;
    pub const ERROR: u16 = ERROR_BIT | 1;
    pub const ERROR_OFFSET: u16 = ERROR_BIT | 2;
}

/// Block status flags of the `base:allocation` context.
pub mod state {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// Error numbers on the wire (they are not the host's errno values).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Longest string (export name, context name, description) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Longest option reply payload we accept: a string plus a little framing.
pub const MAX_OPTION_REPLY: u32 = 2 * MAX_STRING as u32 + 64;
/// Most descriptors we accept in one block-status chunk (QEMU sends at most 131,072).
pub const MAX_BLOCK_STATUS_EXTENTS: u32 = 1 << 20;
/// Longest structured payload other than read data: a full block-status chunk.
pub const MAX_STRUCTURED_PAYLOAD: u32 = 4 + 8 * MAX_BLOCK_STATUS_EXTENTS;
/// Longest read or write we ever put in one request (the protocol's default maximum).
pub const MAX_IO_REQUEST: u32 = 32 << 20;
/// Most chunks we accept in one structured reply. QEMU answers a 32 MiB read of an image
/// whose allocation alternates every 512 bytes with 65,536 data and hole chunks.
pub const MAX_REPLY_CHUNKS: u32 = 1 << 17;
/// Most structured-reply payload bytes we accept for one request beyond the data it asked
/// for (read data counts against the request's length): headers of data chunks, holes,
/// errors, and block-status chunks of every negotiated context (8 of the largest).
pub const MAX_REPLY_METADATA: u64 = 8 * MAX_STRUCTURED_PAYLOAD as u64;
/// Most block-status extents kept from one reply (QEMU sends at most this many). Extents
/// past it are dropped: an answer for less than asked is allowed, and the caller asks again
/// from where it ends.
pub const MAX_REPLY_EXTENTS: usize = 1 << 17;

/// Length of the server greeting.
pub const GREETING_LEN: usize = 18;
/// Length of an option reply header.
pub const OPT_REPLY_HEADER_LEN: usize = 20;
/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Length of the `EXPORT_NAME` reply without the trailing zeroes.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;

/// Bytes that are not a well-formed NBD message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {magic:#x} in {what}")]
    BadMagic { what: &'static str, magic: u64 },
    #[error("{what} is {have} bytes, expected {need}")]
    BadLength {
        what: &'static str,
        have: usize,
        need: usize,
    },
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{what} is not valid UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("{what} has invalid value {value:#x}")]
    BadValue { what: &'static str, value: u64 },
}

/// A cursor over a byte slice whose reads fail with [`ProtoError`] instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
    need: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what, need: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        self.need += n;
        if self.buf.len() < n {
            return Err(ProtoError::BadLength {
                what: self.what,
                have: self.need - n + self.buf.len(),
                need: self.need,
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::BadLength {
                what: self.what,
                have: self.need + self.buf.len(),
                need: self.need,
            })
        }
    }
}

fn utf8(bytes: &[u8], what: &'static str) -> Result<String, ProtoError> {
    if bytes.len() > MAX_STRING {
        return Err(ProtoError::TooLarge {
            what,
            len: bytes.len() as u64,
            max: MAX_STRING as u64,
        });
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| ProtoError::NotUtf8 { what })
}

fn put_string(out: &mut Vec<u8>, s: &str, what: &'static str) -> Result<(), ProtoError> {
    if s.len() > MAX_STRING {
        return Err(ProtoError::TooLarge {
            what,
            len: s.len() as u64,
            max: MAX_STRING as u64,
        });
    }
    // Cannot truncate: bounded by MAX_STRING above.
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// The server's greeting (fixed newstyle only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags (`handshake::FIXED_NEWSTYLE`, `handshake::NO_ZEROES`).
    pub flags: u16,
}

impl Greeting {
    /// Decodes the 18-byte greeting. Oldstyle servers (magic `0x00420281861253`) are refused.
    pub fn decode(buf: &[u8]) -> Result<Greeting, ProtoError> {
        let mut r = Reader::new(buf, "greeting");
        let magic = r.u64()?;
        if magic != NBDMAGIC {
            return Err(ProtoError::BadMagic {
                what: "greeting",
                magic,
            });
        }
        let opt_magic = r.u64()?;
        if opt_magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                what: "greeting (newstyle)",
                magic: opt_magic,
            });
        }
        let flags = r.u16()?;
        r.end()?;
        Ok(Greeting { flags })
    }

    /// Encodes the greeting (for test servers).
    pub fn encode(&self) -> [u8; GREETING_LEN] {
        let mut out = [0u8; GREETING_LEN];
        out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[16..].copy_from_slice(&self.flags.to_be_bytes());
        out
    }
}

/// Appends an option request with its data.
pub fn encode_option(out: &mut Vec<u8>, option: u32, data: &[u8]) -> Result<(), ProtoError> {
    let len = u32::try_from(data.len()).map_err(|_| ProtoError::TooLarge {
        what: "option data",
        len: data.len() as u64,
        max: u32::MAX as u64,
    })?;
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

/// Data of `NBD_OPT_GO` / `NBD_OPT_INFO`: the export name and the info items asked for.
pub fn encode_go_data(export: &str, infos: &[u16]) -> Result<Vec<u8>, ProtoError> {
    let mut out = Vec::with_capacity(8 + export.len() + 2 * infos.len());
    put_string(&mut out, export, "export name")?;
    let n = u16::try_from(infos.len()).map_err(|_| ProtoError::TooLarge {
        what: "info request list",
        len: infos.len() as u64,
        max: u16::MAX as u64,
    })?;
    out.extend_from_slice(&n.to_be_bytes());
    for i in infos {
        out.extend_from_slice(&i.to_be_bytes());
    }
    Ok(out)
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
pub fn encode_meta_context_data(export: &str, queries: &[&str]) -> Result<Vec<u8>, ProtoError> {
    let mut out = Vec::new();
    put_string(&mut out, export, "export name")?;
    let n = u32::try_from(queries.len()).map_err(|_| ProtoError::TooLarge {
        what: "meta context query list",
        len: queries.len() as u64,
        max: u32::MAX as u64,
    })?;
    out.extend_from_slice(&n.to_be_bytes());
    for q in queries {
        put_string(&mut out, q, "meta context query")?;
    }
    Ok(out)
}

/// Header of one option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptReplyHeader {
    /// The option this replies to.
    pub option: u32,
    /// `rep::*`.
    pub reply: u32,
    /// Length of the data that follows, already checked against [`MAX_OPTION_REPLY`].
    pub len: u32,
}

impl OptReplyHeader {
    /// Decodes the 20-byte option reply header and bounds its length.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(buf, "option reply header");
        let magic = r.u64()?;
        if magic != OPT_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "option reply",
                magic,
            });
        }
        let h = OptReplyHeader {
            option: r.u32()?,
            reply: r.u32()?,
            len: r.u32()?,
        };
        r.end()?;
        if h.len > MAX_OPTION_REPLY {
            return Err(ProtoError::TooLarge {
                what: "option reply",
                len: h.len.into(),
                max: MAX_OPTION_REPLY.into(),
            });
        }
        Ok(h)
    }

    /// Encodes a header (for test servers).
    pub fn encode(&self) -> [u8; OPT_REPLY_HEADER_LEN] {
        let mut out = [0u8; OPT_REPLY_HEADER_LEN];
        out[..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.reply.to_be_bytes());
        out[16..].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// Preferred, minimum and maximum block sizes of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize(BlockSize),
    /// An item this client does not know; ignored, as the protocol asks.
    Unknown(u16),
}

/// One decoded option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptReply {
    Ack,
    /// An export name from `NBD_OPT_LIST`.
    Server {
        name: String,
        description: String,
    },
    Info(InfoReply),
    MetaContext {
        id: u32,
        name: String,
    },
    /// An error reply (`rep::ERR_*`) and its optional message.
    Error {
        reply: u32,
        message: String,
    },
}

/// Decodes the data of an option reply whose header is `h`.
pub fn decode_opt_reply(h: &OptReplyHeader, data: &[u8]) -> Result<OptReply, ProtoError> {
    if data.len() != h.len as usize {
        return Err(ProtoError::BadLength {
            what: "option reply",
            have: data.len(),
            need: h.len as usize,
        });
    }
    let mut r = Reader::new(data, "option reply");
    let reply = match h.reply {
        rep::ACK => OptReply::Ack,
        rep::SERVER => {
            let len = r.u32()? as usize;
            if len > MAX_STRING {
                return Err(ProtoError::TooLarge {
                    what: "export name",
                    len: len as u64,
                    max: MAX_STRING as u64,
                });
            }
            let name = utf8(r.take(len)?, "export name")?;
            let description = utf8(r.rest(), "export description")?;
            OptReply::Server { name, description }
        }
        rep::INFO => OptReply::Info(match r.u16()? {
            info::EXPORT => InfoReply::Export {
                size: r.u64()?,
                flags: r.u16()?,
            },
            info::NAME => InfoReply::Name(utf8(r.rest(), "export name")?),
            info::DESCRIPTION => InfoReply::Description(utf8(r.rest(), "description")?),
            info::BLOCK_SIZE => {
                let bs = BlockSize {
                    minimum: r.u32()?,
                    preferred: r.u32()?,
                    maximum: r.u32()?,
                };
                if !bs.minimum.is_power_of_two()
                    || !bs.preferred.is_power_of_two()
                    || bs.maximum < bs.minimum
                {
                    return Err(ProtoError::BadValue {
                        what: "block size constraints",
                        value: (u64::from(bs.minimum) << 32) | u64::from(bs.preferred),
                    });
                }
                InfoReply::BlockSize(bs)
            }
            other => {
                r.rest();
                InfoReply::Unknown(other)
            }
        }),
        rep::META_CONTEXT => {
            let id = r.u32()?;
            OptReply::MetaContext {
                id,
                name: utf8(r.rest(), "meta context name")?,
            }
        }
        e if e & rep::ERR_BIT != 0 => {
            // The message is informational; keep what decodes.
            OptReply::Error {
                reply: e,
                message: String::from_utf8_lossy(r.rest()).into_owned(),
            }
        }
        other => {
            return Err(ProtoError::BadValue {
                what: "option reply type",
                value: other.into(),
            })
        }
    };
    r.end()?;
    Ok(reply)
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size and transmission flags.
pub fn decode_export_name_reply(buf: &[u8]) -> Result<(u64, u16), ProtoError> {
    let mut r = Reader::new(buf, "export name reply");
    let size = r.u64()?;
    let flags = r.u16()?;
    r.end()?;
    Ok((size, flags))
}

/// Human name of an option, for error messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        opt::EXPORT_NAME => "EXPORT_NAME",
        opt::ABORT => "ABORT",
        opt::LIST => "LIST",
        opt::STARTTLS => "STARTTLS",
        opt::INFO => "INFO",
        opt::GO => "GO",
        opt::STRUCTURED_REPLY => "STRUCTURED_REPLY",
        opt::LIST_META_CONTEXT => "LIST_META_CONTEXT",
        opt::SET_META_CONTEXT => "SET_META_CONTEXT",
        opt::EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake, the server's side

/// Length of a client's option request header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Longest option data a server reads (a GO with an export name and many info requests, or a
/// meta-context request with a few queries, are far shorter).
pub const MAX_OPTION_DATA: u32 = 64 << 10;
/// Length of the `EXPORT_NAME` reply's zero padding (left out with `NO_ZEROES`).
pub const EXPORT_NAME_PADDING: usize = 124;

/// Decodes a client's option request header: the option and the length of its data (not yet
/// bounded: a server reads and drops what it will not take).
pub fn decode_option_header(buf: &[u8]) -> Result<(u32, u32), ProtoError> {
    let mut r = Reader::new(buf, "option header");
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "option",
            magic,
        });
    }
    let option = r.u32()?;
    let len = r.u32()?;
    r.end()?;
    Ok((option, len))
}

/// Decodes the data of `NBD_OPT_GO` / `NBD_OPT_INFO`: the export name and the info items asked
/// for.
pub fn decode_go_data(data: &[u8]) -> Result<(String, Vec<u16>), ProtoError> {
    let mut r = Reader::new(data, "go data");
    let n = r.u32()?;
    let name = utf8(r.take(n as usize)?, "export name")?;
    let count = r.u16()?;
    let mut infos = Vec::with_capacity(usize::from(count).min(r.buf.len() / 2));
    for _ in 0..count {
        infos.push(r.u16()?);
    }
    r.end()?;
    Ok((name, infos))
}

/// Decodes the data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: the export
/// name and the queries.
pub fn decode_meta_context_data(data: &[u8]) -> Result<(String, Vec<String>), ProtoError> {
    let mut r = Reader::new(data, "meta context data");
    let n = r.u32()?;
    let name = utf8(r.take(n as usize)?, "export name")?;
    let count = r.u32()?;
    // Each query takes at least its 4-byte length.
    if u64::from(count) * 4 > r.buf.len() as u64 {
        return Err(ProtoError::BadLength {
            what: "meta context queries",
            have: r.buf.len(),
            need: (u64::from(count) * 4).min(usize::MAX as u64) as usize,
        });
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let n = r.u32()?;
        queries.push(utf8(r.take(n as usize)?, "meta context query")?);
    }
    r.end()?;
    Ok((name, queries))
}

/// An option reply: its header and data.
pub fn encode_opt_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let h = OptReplyHeader {
        option,
        reply,
        // Server data is ours and short (strings are bounded by MAX_STRING).
        len: data.len().min(u32::MAX as usize) as u32,
    };
    let mut out = Vec::with_capacity(OPT_REPLY_HEADER_LEN + data.len());
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(data);
    out
}

/// Data of an `NBD_REP_INFO` reply of `NBD_INFO_EXPORT`: size and transmission flags.
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&info::EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// Data of an `NBD_REP_INFO` reply of `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(b: BlockSize) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&b.minimum.to_be_bytes());
    out.extend_from_slice(&b.preferred.to_be_bytes());
    out.extend_from_slice(&b.maximum.to_be_bytes());
    out
}

/// Data of an `NBD_REP_INFO` reply of `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` (`item`).
pub fn encode_info_string(item: u16, s: &str) -> Result<Vec<u8>, ProtoError> {
    if s.len() > MAX_STRING {
        return Err(ProtoError::TooLarge {
            what: "info string",
            len: s.len() as u64,
            max: MAX_STRING as u64,
        });
    }
    let mut out = Vec::with_capacity(2 + s.len());
    out.extend_from_slice(&item.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(out)
}

/// Data of an `NBD_REP_SERVER` reply (one export of `NBD_OPT_LIST`).
pub fn encode_server_name(name: &str) -> Result<Vec<u8>, ProtoError> {
    let mut out = Vec::with_capacity(4 + name.len());
    put_string(&mut out, name, "export name")?;
    Ok(out)
}

/// Data of an `NBD_REP_META_CONTEXT` reply: the context's id and name.
pub fn encode_meta_context(id: u32, name: &str) -> Result<Vec<u8>, ProtoError> {
    if name.len() > MAX_STRING {
        return Err(ProtoError::TooLarge {
            what: "meta context name",
            len: name.len() as u64,
            max: MAX_STRING as u64,
        });
    }
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    Ok(out)
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and the zero padding
/// unless `no_zeroes`.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(EXPORT_NAME_REPLY_LEN + EXPORT_NAME_PADDING);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.resize(EXPORT_NAME_REPLY_LEN + EXPORT_NAME_PADDING, 0);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Transmission

/// One request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Encodes the 28-byte header (a write's payload follows it on the wire).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Decodes a request header (for test servers).
    pub fn decode(buf: &[u8]) -> Result<Request, ProtoError> {
        let mut r = Reader::new(buf, "request");
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "request",
                magic: magic.into(),
            });
        }
        let req = Request {
            flags: r.u16()?,
            kind: r.u16()?,
            cookie: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
        };
        r.end()?;
        Ok(req)
    }
}

/// A reply header: simple, or one chunk of a structured reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Structured {
        flags: u16,
        kind: u16,
        cookie: u64,
        len: u32,
    },
}

impl ReplyHeader {
    /// Cookie of the request this answers.
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Structured { cookie, .. } => cookie,
        }
    }

    /// Length of the whole header that starts with `magic`.
    pub fn len_for_magic(magic: u32) -> Result<usize, ProtoError> {
        match magic {
            SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
            m => Err(ProtoError::BadMagic {
                what: "reply",
                magic: m.into(),
            }),
        }
    }

    /// Decodes a complete header (magic included). Structured payload lengths are bounded
    /// here for every chunk type but `OFFSET_DATA`, whose bound is the request it answers.
    pub fn decode(buf: &[u8]) -> Result<ReplyHeader, ProtoError> {
        let mut r = Reader::new(buf, "reply header");
        let magic = r.u32()?;
        let h = match magic {
            SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
                error: r.u32()?,
                cookie: r.u64()?,
            },
            STRUCTURED_REPLY_MAGIC => {
                let h = ReplyHeader::Structured {
                    flags: r.u16()?,
                    kind: r.u16()?,
                    cookie: r.u64()?,
                    len: r.u32()?,
                };
                if let ReplyHeader::Structured { kind, len, .. } = h {
                    let (min, max) = match kind {
                        chunk::NONE => (0, 0),
                        chunk::OFFSET_DATA => (9, u32::MAX),
                        chunk::OFFSET_HOLE => (12, 12),
                        chunk::BLOCK_STATUS => (12, MAX_STRUCTURED_PAYLOAD),
                        _ => (0, MAX_STRUCTURED_PAYLOAD),
                    };
                    if len > max {
                        return Err(ProtoError::TooLarge {
                            what: "structured reply chunk",
                            len: len.into(),
                            max: max.into(),
                        });
                    }
                    if len < min {
                        return Err(ProtoError::BadLength {
                            what: "structured reply chunk",
                            have: len as usize,
                            need: min as usize,
                        });
                    }
                }
                h
            }
            m => {
                return Err(ProtoError::BadMagic {
                    what: "reply",
                    magic: m.into(),
                })
            }
        };
        r.end()?;
        Ok(h)
    }

    /// Encodes the header (for test servers).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STRUCTURED_REPLY_LEN);
        match *self {
            ReplyHeader::Simple { error, cookie } => {
                out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                out.extend_from_slice(&error.to_be_bytes());
                out.extend_from_slice(&cookie.to_be_bytes());
            }
            ReplyHeader::Structured {
                flags,
                kind,
                cookie,
                len,
            } => {
                out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(&cookie.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
        out
    }
}

/// A decoded structured chunk payload (all kinds but `OFFSET_DATA`, whose data is read
/// straight into the caller's buffer; see [`decode_offset_data_prefix`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    None,
    Hole {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        context: u32,
        descriptors: Descriptors<'a>,
    },
    Error {
        errno: u32,
        message: String,
        offset: Option<u64>,
    },
}

/// The `(length, flags)` descriptors of a block-status chunk, decoded lazily.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Descriptors<'a> {
    raw: &'a [u8],
}

impl fmt::Debug for Descriptors<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(*self).finish()
    }
}

impl Descriptors<'_> {
    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.raw.len() / 8
    }
    /// True when the chunk has no descriptor (a protocol violation the client reports).
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
}

impl Iterator for Descriptors<'_> {
    type Item = (u32, u32);
    fn next(&mut self) -> Option<(u32, u32)> {
        let (head, tail) = self.raw.split_first_chunk::<8>()?;
        self.raw = tail;
        let (len, flags) = head.split_at(4);
        Some((
            u32::from_be_bytes(len.try_into().ok()?),
            u32::from_be_bytes(flags.try_into().ok()?),
        ))
    }
}

/// Decodes the payload of a structured chunk of type `kind`. `OFFSET_DATA` is refused here.
pub fn decode_chunk(kind: u16, payload: &[u8]) -> Result<Chunk<'_>, ProtoError> {
    let mut r = Reader::new(payload, "structured reply chunk");
    let c = match kind {
        chunk::NONE => Chunk::None,
        chunk::OFFSET_HOLE => Chunk::Hole {
            offset: r.u64()?,
            len: r.u32()?,
        },
        chunk::BLOCK_STATUS => {
            let context = r.u32()?;
            let raw = r.rest();
            if raw.len() % 8 != 0 {
                return Err(ProtoError::BadLength {
                    what: "block status descriptors",
                    have: raw.len(),
                    need: raw.len() / 8 * 8 + 8,
                });
            }
            Chunk::BlockStatus {
                context,
                descriptors: Descriptors { raw },
            }
        }
        k if k & chunk::ERROR_BIT != 0 => {
            let errno = r.u32()?;
            let mlen = r.u16()? as usize;
            let message = String::from_utf8_lossy(r.take(mlen)?).into_owned();
            let offset = if k == chunk::ERROR_OFFSET {
                Some(r.u64()?)
            } else {
                None
            };
            // Unknown error types may carry more; only ERROR and ERROR_OFFSET are exact.
            if k != chunk::ERROR && k != chunk::ERROR_OFFSET {
                r.rest();
            }
            Chunk::Error {
                errno,
                message,
                offset,
            }
        }
        other => {
            return Err(ProtoError::BadValue {
                what: "chunk type",
                value: other.into(),
            })
        }
    };
    r.end()?;
    Ok(c)
}

/// Decodes the 8-byte offset that starts an `OFFSET_DATA` payload.
pub fn decode_offset_data_prefix(buf: &[u8]) -> Result<u64, ProtoError> {
    let mut r = Reader::new(buf, "offset data chunk");
    let off = r.u64()?;
    r.end()?;
    Ok(off)
}

/// The header of a structured reply chunk and the start of its payload for an `OFFSET_DATA`
/// chunk of `len` data bytes at `offset` (the data follows on the wire).
pub fn encode_data_chunk_head(flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut out = ReplyHeader::Structured {
        flags,
        kind: chunk::OFFSET_DATA,
        cookie,
        len: len.saturating_add(8),
    }
    .encode();
    out.extend_from_slice(&offset.to_be_bytes());
    out
}

/// A whole `OFFSET_HOLE` chunk.
pub fn encode_hole_chunk(flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut out = ReplyHeader::Structured {
        flags,
        kind: chunk::OFFSET_HOLE,
        cookie,
        len: 12,
    }
    .encode();
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// A whole `NBD_REPLY_TYPE_NONE` chunk (the end of a reply).
pub fn encode_none_chunk(cookie: u64) -> Vec<u8> {
    ReplyHeader::Structured {
        flags: chunk::FLAG_DONE,
        kind: chunk::NONE,
        cookie,
        len: 0,
    }
    .encode()
}

/// A whole `ERROR` chunk, with a message (cut to 4096 bytes on a character boundary).
pub fn encode_error_chunk(flags: u16, cookie: u64, errno: u32, message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_STRING);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut out = ReplyHeader::Structured {
        flags,
        kind: chunk::ERROR,
        cookie,
        // At most 6 + 4096.
        len: 6 + msg.len() as u32,
    }
    .encode();
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// A whole `BLOCK_STATUS` chunk of context `id`: (length, flags) descriptors. At most
/// [`MAX_BLOCK_STATUS_EXTENTS`] are sent; the caller gives no more.
pub fn encode_block_status_chunk(
    flags: u16,
    cookie: u64,
    id: u32,
    extents: &[(u32, u32)],
) -> Vec<u8> {
    let n = extents.len().min(MAX_BLOCK_STATUS_EXTENTS as usize);
    let mut out = ReplyHeader::Structured {
        flags,
        kind: chunk::BLOCK_STATUS,
        cookie,
        // Bounded by MAX_STRUCTURED_PAYLOAD.
        len: 4 + 8 * n as u32,
    }
    .encode();
    out.reserve(4 + 8 * n);
    out.extend_from_slice(&id.to_be_bytes());
    for (len, f) in &extents[..n] {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
    out
}

/// Human name of a wire errno.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        errno::EPERM => "EPERM",
        errno::EIO => "EIO",
        errno::ENOMEM => "ENOMEM",
        errno::EINVAL => "EINVAL",
        errno::ENOSPC => "ENOSPC",
        errno::EOVERFLOW => "EOVERFLOW",
        errno::ENOTSUP => "ENOTSUP",
        errno::ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown errno",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_round_trips_and_rejects_oldstyle() {
        let g = Greeting {
            flags: handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES,
        };
        assert_eq!(Greeting::decode(&g.encode()), Ok(g));
        let mut old = g.encode();
        old[8..16].copy_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
        assert!(matches!(
            Greeting::decode(&old),
            Err(ProtoError::BadMagic { .. })
        ));
        assert!(matches!(
            Greeting::decode(&old[..10]),
            Err(ProtoError::BadLength { .. })
        ));
    }

    #[test]
    fn option_reply_header_rejects_oversized_length() {
        let h = OptReplyHeader {
            option: opt::GO,
            reply: rep::INFO,
            len: MAX_OPTION_REPLY + 1,
        };
        assert!(matches!(
            OptReplyHeader::decode(&h.encode()),
            Err(ProtoError::TooLarge { .. })
        ));
    }

    #[test]
    fn info_export_and_block_size_decode() {
        let mut d = vec![0, 0];
        d.extend_from_slice(&(1u64 << 30).to_be_bytes());
        d.extend_from_slice(&0x0143u16.to_be_bytes());
        let h = OptReplyHeader {
            option: opt::GO,
            reply: rep::INFO,
            len: d.len() as u32,
        };
        assert_eq!(
            decode_opt_reply(&h, &d),
            Ok(OptReply::Info(InfoReply::Export {
                size: 1 << 30,
                flags: 0x0143
            }))
        );
        let mut b = vec![0, 3];
        for v in [1u32, 4096, 32 << 20] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        let h = OptReplyHeader {
            len: b.len() as u32,
            ..h
        };
        assert!(matches!(
            decode_opt_reply(&h, &b),
            Ok(OptReply::Info(InfoReply::BlockSize(BlockSize {
                preferred: 4096,
                ..
            })))
        ));
        // A non-power-of-two minimum is malformed.
        b[2..6].copy_from_slice(&3u32.to_be_bytes());
        assert!(decode_opt_reply(&h, &b).is_err());
    }

    #[test]
    fn meta_context_reply_decodes_and_bounds_name() {
        let mut d = 7u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"qemu:dirty-bitmap:bm0");
        let h = OptReplyHeader {
            option: opt::SET_META_CONTEXT,
            reply: rep::META_CONTEXT,
            len: d.len() as u32,
        };
        assert_eq!(
            decode_opt_reply(&h, &d),
            Ok(OptReply::MetaContext {
                id: 7,
                name: "qemu:dirty-bitmap:bm0".into()
            })
        );
        let long = vec![b'a'; MAX_STRING + 1];
        let mut d = 7u32.to_be_bytes().to_vec();
        d.extend_from_slice(&long);
        let h = OptReplyHeader {
            len: d.len() as u32,
            ..h
        };
        assert!(matches!(
            decode_opt_reply(&h, &d),
            Err(ProtoError::TooLarge { .. })
        ));
    }

    #[test]
    fn structured_header_bounds_non_data_payloads() {
        let h = ReplyHeader::Structured {
            flags: 0,
            kind: chunk::BLOCK_STATUS,
            cookie: 1,
            len: MAX_STRUCTURED_PAYLOAD + 1,
        };
        assert!(matches!(
            ReplyHeader::decode(&h.encode()),
            Err(ProtoError::TooLarge { .. })
        ));
        let h = ReplyHeader::Structured {
            flags: 0,
            kind: chunk::OFFSET_HOLE,
            cookie: 1,
            len: 11,
        };
        assert!(matches!(
            ReplyHeader::decode(&h.encode()),
            Err(ProtoError::BadLength { .. })
        ));
        let h = ReplyHeader::Structured {
            flags: 1,
            kind: chunk::OFFSET_DATA,
            cookie: 1,
            len: 1 << 20,
        };
        assert_eq!(ReplyHeader::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn block_status_chunk_rejects_partial_descriptor() {
        let mut p = 1u32.to_be_bytes().to_vec();
        p.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 1, 0, 0]);
        assert!(decode_chunk(chunk::BLOCK_STATUS, &p).is_err());
        p.truncate(12);
        let Ok(Chunk::BlockStatus {
            context: 1,
            descriptors,
        }) = decode_chunk(chunk::BLOCK_STATUS, &p)
        else {
            panic!("block status chunk did not decode");
        };
        assert_eq!(descriptors.collect::<Vec<_>>(), vec![(512, 1)]);
    }

    #[test]
    fn error_chunk_with_offset_decodes() {
        let mut p = errno::EIO.to_be_bytes().to_vec();
        p.extend_from_slice(&4u16.to_be_bytes());
        p.extend_from_slice(b"oops");
        p.extend_from_slice(&4096u64.to_be_bytes());
        assert_eq!(
            decode_chunk(chunk::ERROR_OFFSET, &p),
            Ok(Chunk::Error {
                errno: errno::EIO,
                message: "oops".into(),
                offset: Some(4096)
            })
        );
        // Message length past the payload end.
        p[5] = 200;
        assert!(decode_chunk(chunk::ERROR_OFFSET, &p).is_err());
    }

    proptest! {
        #[test]
        fn request_round_trips(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
            let r = Request { flags, kind, cookie, offset, len };
            prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn reply_headers_round_trip(error: u32, cookie: u64, flags: u16, len in 12u32..1000) {
            let s = ReplyHeader::Simple { error, cookie };
            prop_assert_eq!(ReplyHeader::decode(&s.encode()), Ok(s));
            let c = ReplyHeader::Structured { flags, kind: chunk::BLOCK_STATUS, cookie, len };
            prop_assert_eq!(ReplyHeader::decode(&c.encode()), Ok(c));
        }

        #[test]
        fn decoders_never_panic(kind: u16, bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = ReplyHeader::decode(&bytes);
            let _ = decode_chunk(kind, &bytes);
            let _ = Greeting::decode(&bytes);
            let _ = OptReplyHeader::decode(&bytes);
            let h = OptReplyHeader { option: 0, reply: u32::from(kind) | if kind & 1 == 1 { rep::ERR_BIT } else { 0 }, len: bytes.len() as u32 };
            let _ = decode_opt_reply(&h, &bytes);
        }
    }
}
