//! Backup ids, validated in one place, with the names derived from them.

use serde::{Deserialize, Serialize};

/// A backup's id: 1 to [`BackupId::MAX_LEN`] characters of `[A-Za-z0-9_-]`. Unique per disk
/// for ever (see [`crate::engine::catalog::backup_id_taken`]). It names the backup's objects
/// ([`super::layout`]), its libvirt checkpoint and QEMU bitmap, and its scratch directory, so
/// its alphabet is the intersection of what all of those accept.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackupId(String);

/// A string that is not a valid [`BackupId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backup id {0:?}: 1 to 20 letters, digits, '-' or '_'")]
pub struct InvalidBackupId(pub String);

/// Prefix of the libvirt checkpoints and QEMU bitmaps cbt owns.
pub const CHECKPOINT_PREFIX: &str = "cbt-";

impl BackupId {
    /// Longest id.
    pub const MAX_LEN: usize = 20;

    /// Validates `s`.
    pub fn parse(s: &str) -> Result<BackupId, InvalidBackupId> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(BackupId(s.to_string()))
        } else {
            Err(InvalidBackupId(s.to_string()))
        }
    }

    /// A new id from the clock: see [`crate::job::new_backup_id`].
    pub fn generate() -> BackupId {
        BackupId(crate::job::new_backup_id())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The libvirt checkpoint (and QEMU bitmap) this backup creates: `cbt-<id>`.
    pub fn checkpoint(&self) -> String {
        format!("{CHECKPOINT_PREFIX}{}", self.0)
    }
}

impl TryFrom<String> for BackupId {
    type Error = InvalidBackupId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        BackupId::parse(&s)
    }
}

impl From<BackupId> for String {
    fn from(b: BackupId) -> String {
        b.0
    }
}

impl std::fmt::Display for BackupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for BackupId {
    type Err = InvalidBackupId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackupId::parse(s)
    }
}

impl AsRef<str> for BackupId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_once_and_name_their_checkpoint() {
        for bad in ["", "a.b", "../x", "a b", "é", &"a".repeat(21), "a/b"] {
            assert!(BackupId::parse(bad).is_err(), "{bad:?}");
            assert!(serde_json::from_value::<BackupId>(serde_json::json!(bad)).is_err());
        }
        let id = BackupId::parse("20261202T052841-00ff").expect("valid");
        assert_eq!(id.checkpoint(), "cbt-20261202T052841-00ff");
        assert_eq!(
            serde_json::to_value(&id).expect("json"),
            "20261202T052841-00ff"
        );
        let g = BackupId::generate();
        assert_eq!(BackupId::parse(g.as_str()), Ok(g.clone()));
        crate::sink::check_name(&super::super::layout::manifest_name("d", g.as_str()))
            .expect("an object name");
    }
}
