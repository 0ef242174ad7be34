//! The manifest of one backup of one disk: written last, its presence is the commit.
//!
//! A manifest is a JSON object (one line) followed by a trailer line
//! `cbt-manifest-crc32 XXXXXXXX` holding the crc32 of the JSON bytes and their newline. It is
//! readable with `head -1 | jq`, and a torn or edited manifest is refused. Unknown fields are
//! refused too: a newer writer must bump `format_version`.

use serde::{Deserialize, Serialize};

use super::FormatError;

/// Largest manifest accepted.
pub const MAX_MANIFEST: usize = 1 << 20;
const TRAILER: &str = "cbt-manifest-crc32 ";

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Full,
    Incremental,
}

/// Why a disk was backed up in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullReason {
    /// No committed backup of this disk on the sink.
    FirstBackup,
    /// The caller asked for a full.
    Requested,
    /// The bitmap the last backup recorded is gone (QEMU restarted with a raw disk, migration,
    /// or it was removed).
    BitmapMissing,
    /// The bitmap exists but QEMU marks it inconsistent (unclean shutdown).
    BitmapInconsistent,
    /// The disk size differs from the last backup's.
    DiskResized,
    /// The hypervisor no longer knows the checkpoint the last backup recorded (and its
    /// metadata could not be brought back from the bitmaps).
    CheckpointMissing,
    /// The disk is not in the last backup's checkpoint: it was added since.
    DiskAdded,
    /// The disk's format cannot hold a bitmap (raw): every backup of it is full.
    Untracked,
    /// An incremental whose whole chain was folded into it by retention: a synthetic full,
    /// no data copied (see `folded`).
    Folded,
    /// An incremental whose chain reached the sink's `max_chain`: a synthetic full whose index
    /// folds its chain (no data copied; the backups of that chain stay as they were).
    ChainBounded,
}

/// Crash- or application-consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    Crash,
    Application,
}

/// Name, length and checksum of an object the manifest depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectRef {
    pub name: String,
    pub len: u64,
    pub crc32: u32,
}

/// Counters of a backup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupStats {
    /// Bytes the backup was asked to copy (dirty ∩ allocated, or allocated).
    pub bytes_scanned: u64,
    /// Bytes stored as data frames (raw size).
    pub bytes_data: u64,
    /// Bytes recorded as zero extents.
    pub bytes_zero: u64,
    /// Bytes written to segments (compressed frames and headers).
    pub bytes_stored: u64,
    pub frames: u64,
    pub segments: u64,
    /// Chunks read a second time because the guest wrote them during the copy.
    #[serde(default)]
    pub redone_chunks: u64,
}

/// The manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub backup_id: String,
    pub disk: String,
    pub parent: Option<String>,
    pub level: Level,
    pub full_reason: Option<FullReason>,
    /// The bitmap (QEMU) or checkpoint (libvirt) that marks this backup's point in time: the
    /// base of the next incremental.
    pub checkpoint: Option<String>,
    pub disk_size: u64,
    /// Largest raw frame size used.
    pub chunk_size: u32,
    pub consistency: Consistency,
    /// How long the guest's filesystems were frozen for the point in time (quiesced backups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_ms: Option<u64>,
    /// What an operator should know (e.g. a quiesce that failed and fell back to crash).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub started_unix_ms: u64,
    pub finished_unix_ms: u64,
    pub stats: BackupStats,
    pub index: ObjectRef,
    /// Segments this backup's index reads from: those it wrote, and after a fold those of
    /// the backups folded into it that it still reads.
    pub segments: Vec<String>,
    /// Generation of this manifest: 0 as the backup wrote it, one more at every fold into it
    /// (`<id>.g<N>.manifest`, with its index `<id>.g<N>.idx`). The highest one is the backup.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u32,
    /// Backups folded into this one (deleted by retention), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub folded: Vec<String>,
    /// Immutable sinks (S3 Object Lock): every object this backup needs (its own, and the
    /// manifests, indexes and segments of its ancestors) is locked at least until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until_unix_ms: Option<u64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Manifest {
    /// JSON line + checksum trailer.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data structures to JSON cannot fail.
        let mut out = serde_json::to_vec(self).unwrap_or_default();
        out.push(b'\n');
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(format!("{TRAILER}{crc:08x}\n").as_bytes());
        out
    }

    /// Checks the trailer, then parses the JSON.
    pub fn decode(b: &[u8]) -> Result<Manifest, FormatError> {
        if b.len() > MAX_MANIFEST {
            return Err(FormatError::TooLarge {
                what: "manifest",
                len: b.len() as u64,
                max: MAX_MANIFEST as u64,
            });
        }
        let body_end = b
            .iter()
            .position(|c| *c == b'\n')
            .map(|i| i + 1)
            .ok_or(FormatError::Truncated { what: "manifest" })?;
        let (body, trailer) = b.split_at(body_end);
        let trailer = std::str::from_utf8(trailer).map_err(|_| FormatError::BadMagic {
            what: "manifest trailer",
        })?;
        let hex = trailer
            .strip_prefix(TRAILER)
            .and_then(|t| t.strip_suffix('\n'))
            .ok_or(FormatError::BadMagic {
                what: "manifest trailer",
            })?;
        let crc = u32::from_str_radix(hex, 16).map_err(|_| FormatError::BadMagic {
            what: "manifest trailer",
        })?;
        if crc != crc32fast::hash(body) {
            return Err(FormatError::HeaderChecksum { what: "manifest" });
        }
        let m: Manifest = serde_json::from_slice(body).map_err(FormatError::Manifest)?;
        if m.format_version != u32::from(super::segment::FORMAT_VERSION) {
            return Err(FormatError::UnsupportedVersion {
                what: "manifest",
                version: m.format_version.into(),
            });
        }
        Ok(m)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format_version: 1,
            backup_id: "b1".into(),
            disk: "vm1/vda".into(),
            parent: None,
            level: Level::Full,
            full_reason: Some(FullReason::FirstBackup),
            checkpoint: Some("cbt-1".into()),
            disk_size: 1 << 30,
            chunk_size: 1 << 20,
            consistency: Consistency::Crash,
            freeze_ms: None,
            warnings: vec![],
            started_unix_ms: 1,
            finished_unix_ms: 2,
            stats: BackupStats::default(),
            index: ObjectRef {
                name: "x.idx".into(),
                len: 36,
                crc32: 7,
            },
            segments: vec!["a.seg".into()],
            generation: 0,
            folded: vec![],
            locked_until_unix_ms: None,
        }
    }

    #[test]
    fn manifest_round_trips_and_refuses_edits() {
        let m = sample();
        let b = m.encode();
        assert_eq!(Manifest::decode(&b).expect("decode"), m);
        let edited = String::from_utf8(b.clone()).expect("utf8").replacen(
            "\"disk_size\":1073741824",
            "\"disk_size\":1073741825",
            1,
        );
        assert!(matches!(
            Manifest::decode(edited.as_bytes()),
            Err(FormatError::HeaderChecksum { .. })
        ));
        assert!(Manifest::decode(&b[..b.len() - 3]).is_err());
        assert!(Manifest::decode(b"{}\n").is_err());
    }
}
