//! The in-progress marker: a small JSON object a backup writes (create-only) before its first
//! segment and deletes after its commit or rollback. While it is younger than the garbage
//! collector's grace period, what it covers is never collected; its segment prefix lets the
//! one who reconciles the backup remove exactly what the backup wrote.

use serde::{Deserialize, Serialize};

/// Largest marker read back.
pub const MAX_MARKER: u64 = 4096;

/// An in-progress marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Marker {
    pub backup_id: String,
    pub disk: String,
    /// High 64 bits of every segment id of this backup, 16 hex digits.
    pub segment_prefix: String,
    /// Who writes: host name and process id, for the operator who finds a stale marker.
    pub host: String,
    pub pid: u32,
    pub started_unix_ms: u64,
}

impl Marker {
    /// A marker written by this process (host name, pid) for `backup_id` of `disk`, whose
    /// segments have the high 64 bits `prefix`.
    pub fn here(backup_id: &str, disk: &str, prefix: u64, started_unix_ms: u64) -> Marker {
        Marker {
            backup_id: backup_id.to_string(),
            disk: disk.to_string(),
            segment_prefix: format!("{prefix:016x}"),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            pid: std::process::id(),
            started_unix_ms,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a marker serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Marker, super::FormatError> {
        if bytes.len() as u64 > MAX_MARKER {
            return Err(super::FormatError::TooLarge {
                what: "in-progress marker",
                len: bytes.len() as u64,
                max: MAX_MARKER,
            });
        }
        serde_json::from_slice(bytes).map_err(super::FormatError::Manifest)
    }

    /// The segment prefix as a number, if it is one.
    pub fn prefix(&self) -> Option<u64> {
        (self.segment_prefix.len() == 16)
            .then(|| u64::from_str_radix(&self.segment_prefix, 16).ok())
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let m = Marker {
            backup_id: "b1".into(),
            disk: "d".into(),
            segment_prefix: format!("{:016x}", 0xdead_beef_u64),
            host: "h".into(),
            pid: 7,
            started_unix_ms: 1,
        };
        let back = Marker::decode(&m.encode()).expect("decode");
        assert_eq!(back, m);
        assert_eq!(back.prefix(), Some(0xdead_beef));
        assert!(Marker::decode(b"{}").is_err());
        assert!(Marker::decode(&vec![b' '; 5000]).is_err());
        let mut odd = m;
        odd.segment_prefix = "xyz".into();
        assert_eq!(odd.prefix(), None);
    }
}
