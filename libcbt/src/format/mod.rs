//! The on-sink format: segments of self-describing frames, a sparse index per backup, and a
//! manifest written last. Pure: bytes in, values out. Byte layouts are drawn in each
//! submodule; `libcbt/FORMAT.md` puts them together for writers of independent readers.
//!
//! Object names are in [`layout`].

pub mod backup_id;
pub mod index;
pub mod layout;
pub mod manifest;
pub mod marker;
pub mod segment;

pub use backup_id::{BackupId, InvalidBackupId};
pub use layout::{index_name, manifest_name, segment_name};
pub use marker::Marker;

pub use index::{
    fold_indexes, plan_restore, referenced_segments, FrameRead, Index, IndexEntry, Location,
    RestorePlan, SegmentId,
};
pub use manifest::{BackupStats, Consistency, FullReason, Level, Manifest, ObjectRef};

/// Bytes that are not a valid cbt object. Each variant names what was being read; callers add
/// where (backup, segment, position).
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("bad magic in {what}")]
    BadMagic { what: &'static str },
    #[error("{what} is truncated")]
    Truncated { what: &'static str },
    #[error("checksum mismatch in the {what} header")]
    HeaderChecksum { what: &'static str },
    #[error("checksum mismatch in the data of the frame at disk offset {offset:#x}")]
    DataChecksum { offset: u64 },
    #[error("frame at disk offset {offset:#x} does not decompress to its length")]
    Decompress { offset: u64 },
    #[error("{what} of {len} exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{what} has invalid value {value:#x}")]
    BadValue { what: &'static str, value: u64 },
    #[error("{what} has unsupported format version {version}")]
    UnsupportedVersion { what: &'static str, version: u64 },
    #[error("manifest is not valid")]
    Manifest(#[source] serde_json::Error),
}

#[cfg(test)]
mod seeds {
    /// The committed fuzz seeds for `format_objects` are what this code writes; set
    /// `CBT_WRITE_SEEDS=1` to refresh them after a format change.
    #[test]
    fn format_seed_corpus_is_current() {
        use super::*;
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/format_objects");
        let write = std::env::var_os("CBT_WRITE_SEEDS").is_some();
        let check = |name: &str, bytes: Vec<u8>| {
            let path = dir.join(name);
            if write {
                std::fs::create_dir_all(&dir).expect("mkdir");
                std::fs::write(&path, &bytes).expect("write seed");
            } else {
                assert_eq!(
                    std::fs::read(&path).expect("committed seed"),
                    bytes,
                    "{name} is stale: CBT_WRITE_SEEDS=1"
                );
            }
        };
        let mut seg = segment::segment_header().to_vec();
        segment::encode_frame(0, &b"abcd".repeat(300), &mut seg).expect("frame");
        segment::encode_frame(1 << 20, &[0x5a; 700], &mut seg).expect("frame");
        check("segment", seg);
        let idx = Index {
            disk_size: 1 << 30,
            entries: vec![
                IndexEntry {
                    offset: 0,
                    len: 1200,
                    loc: Location::Frame {
                        segment: 1,
                        pos: 16,
                        frame_len: 60,
                    },
                },
                IndexEntry {
                    offset: 4096,
                    len: 4096,
                    loc: Location::Zero,
                },
            ],
        };
        check("index", idx.encode());
        check("manifest", manifest::tests::sample().encode());
    }
}
