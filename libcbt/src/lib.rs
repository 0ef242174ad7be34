//! `libcbt`: changed block tracking for KVM/QEMU hosts.
//!
//! | module | what it owns |
//! |---|---|
//! | [`engine`] | backup, restore and verify pipelines |
//! | [`job`] | whole jobs: source + engine + sink, all or nothing |
//! | [`extent`] | [`ExtentMap`](extent::ExtentMap): sorted disjoint byte ranges with flags |
//! | [`format`] | on-sink format: segments of checksummed lz4 frames, index, manifest |
//! | [`nbd`] | NBD wire format and the async, pipelined, multi-connection client |
//! | [`sink`] | `Sink` trait (object-store shaped) and the local/NFS directory sink |
//! | [`source`] | change tracking: QMP change source (bitmaps, fleecing, NBD export) |
//! | [`qmp`] | async QMP client: commands with ids, typed errors, events, transactions |
//! | [`retention`] | the prune planner: which backups a keep policy keeps, and why |
//! | [`fuzzing`] | entry points for the `fuzz/` targets (not a stable API) |
//!
//! See `ARCHITECTURE.md` in the project's shared notes for the layers still to come
//! (QMP, change sources, format, sinks, engine).

pub mod engine;
pub mod extent;
pub mod format;
pub mod job;
pub mod nbd;
pub mod qmp;
pub mod retention;
pub mod sink;
pub mod source;

#[doc(hidden)]
pub mod fuzzing;

/// An error and its sources, one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out += ": ";
        out += &s.to_string();
        cur = s.source();
    }
    out
}

// Offsets and lengths on 64 TiB disks are converted to `usize` for buffers in many places.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("libcbt supports 64-bit targets only");
