//! Network Block Device: the wire format ([`proto`], pure), URIs ([`uri`]), an async,
//! pipelined, multi-connection client ([`client`]) and a read-only server ([`server`]).
//!
//! The `nbd` crate speaks only simple replies, one request at a time, without meta contexts,
//! so it cannot read dirty bitmaps; this client does. It is the only way `libcbt` reads disks.
//!
//! ```no_run
//! # async fn demo() -> Result<(), libcbt::nbd::NbdError> {
//! use libcbt::nbd::{Client, ConnectOptions};
//! let opts = ConnectOptions::with_contexts(["base:allocation", "qemu:dirty-bitmap:bm0"]);
//! let client = Client::connect_with("nbd+unix:///vda?socket=/run/cbt/vda.sock", &opts).await?;
//! let dirty = client.map("qemu:dirty-bitmap:bm0", 0..client.size()).await?;
//! for e in dirty.iter().filter(|e| e.flags & 1 != 0) {
//!     let data = client.read(e.start, vec![0; e.len().min(1 << 20) as usize]).await?;
//!     # let _ = data;
//! }
//! # Ok(()) }
//! ```

pub mod client;
pub mod proto;
pub mod server;
pub mod uri;

pub use client::{
    list_meta_contexts, list_meta_contexts_with, Client, ConnectOptions, ErrorKind, ExportInfo,
    NbdError, Step, Timeouts, Violation,
};
pub use uri::{Address, NbdUri};

/// Name of the allocation context every block-status server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Name of QEMU's allocation-depth context.
pub const QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Flag of a dirty extent in a `qemu:dirty-bitmap:` context.
pub const DIRTY: u32 = 1;

/// Name of the context that exports QEMU dirty bitmap `bitmap`.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}
