//! Change sources: where the point-in-time views and dirty maps of disks come from.
//!
//! - [`qemu`]: QMP directly (qemu-system, qemu-storage-daemon), for hosts without libvirt.
//! - `libvirt` (feature `libvirt`): checkpoints and pull-mode backups through libvirt, for
//!   Nova hosts.

#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod qemu;

use crate::format::{FullReason, Level, Manifest};
use qemu::{Decision, Requested};

/// What a source sees, now, of the checkpoint the last backup of a disk names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// Gone, or not covering this disk: a full, for this reason.
    Missing(FullReason),
    /// There, but its bitmap is reported broken or inconsistent.
    Broken,
    /// There and usable as the base of an incremental.
    Usable,
}

/// The full-vs-incremental rule both sources share. An incremental only when the caller
/// allows it, there is a last backup, the source can track the disk, the last backup names a
/// checkpoint (else a full for `missing`), `base` finds it usable, and the disk size is
/// unchanged; otherwise a full with the first reason that applies, in that order.
pub fn decide(
    requested: Requested,
    last: Option<&Manifest>,
    trackable: bool,
    size: u64,
    missing: FullReason,
    base: impl FnOnce(&str) -> Base,
) -> Decision {
    let full = |reason| Decision {
        level: Level::Full,
        since: None,
        reason: Some(reason),
    };
    let Some(last) = last else {
        return full(FullReason::FirstBackup);
    };
    if requested == Requested::Full {
        return full(FullReason::Requested);
    }
    if !trackable {
        return full(FullReason::Untracked);
    }
    let Some(checkpoint) = &last.checkpoint else {
        return full(missing);
    };
    match base(checkpoint) {
        Base::Missing(reason) => return full(reason),
        Base::Broken => return full(FullReason::BitmapInconsistent),
        Base::Usable => {}
    }
    if last.disk_size != size {
        return full(FullReason::DiskResized);
    }
    Decision {
        level: Level::Incremental,
        since: Some(checkpoint.clone()),
        reason: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_rule_gives_the_first_reason_that_applies() {
        let last = crate::format::manifest::tests::sample(); // checkpoint cbt-1, 1 GiB
        let size = last.disk_size;
        let d = |req, last, trackable, size, base: Base| {
            decide(
                req,
                last,
                trackable,
                size,
                FullReason::CheckpointMissing,
                |_| base,
            )
        };
        let reason = |x: Decision| x.reason;
        assert_eq!(
            reason(d(Requested::Auto, None, false, size, Base::Usable)),
            Some(FullReason::FirstBackup)
        );
        assert_eq!(
            reason(d(Requested::Full, Some(&last), true, size, Base::Usable)),
            Some(FullReason::Requested)
        );
        assert_eq!(
            reason(d(Requested::Auto, Some(&last), false, size, Base::Broken)),
            Some(FullReason::Untracked)
        );
        let mut no_cp = last.clone();
        no_cp.checkpoint = None;
        assert_eq!(
            reason(d(Requested::Auto, Some(&no_cp), true, size, Base::Usable)),
            Some(FullReason::CheckpointMissing)
        );
        assert_eq!(
            reason(d(
                Requested::Auto,
                Some(&last),
                true,
                size + 1,
                Base::Missing(FullReason::DiskAdded)
            )),
            Some(FullReason::DiskAdded)
        );
        assert_eq!(
            reason(d(
                Requested::Auto,
                Some(&last),
                true,
                size + 1,
                Base::Broken
            )),
            Some(FullReason::BitmapInconsistent)
        );
        assert_eq!(
            reason(d(
                Requested::Auto,
                Some(&last),
                true,
                size + 1,
                Base::Usable
            )),
            Some(FullReason::DiskResized)
        );
        let inc = d(
            Requested::Incremental,
            Some(&last),
            true,
            size,
            Base::Usable,
        );
        assert_eq!(
            (inc.level, inc.since.as_deref(), inc.reason),
            (Level::Incremental, Some("cbt-1"), None)
        );
    }
}
