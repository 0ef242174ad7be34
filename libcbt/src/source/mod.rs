//! Change sources: where the point-in-time views and dirty maps of disks come from.
//!
//! - [`qemu`]: QMP directly (qemu-system, qemu-storage-daemon), for hosts without libvirt.
//! - `libvirt` (feature `libvirt`): checkpoints and pull-mode backups through libvirt, for
//!   Nova hosts.

#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod qemu;
