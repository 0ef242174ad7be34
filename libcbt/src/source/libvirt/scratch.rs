//! The scratch directory of a libvirt pull backup: where QEMU puts its copy-before-write
//! images and the Unix socket its NBD server listens on, and where the root daemon connects to
//! read the backup. Whoever can swap that socket chooses the bytes committed as the backup, so
//! nobody but root and QEMU's own user may write anywhere on the way to it.
//!
//! # Layout and ownership
//!
//! | level | created by | owner | mode | why |
//! |---|---|---|---|---|
//! | every ancestor of `<root>` | the operator | root (or us) | not group/other-writable, unless sticky | nobody else can rename a level away |
//! | `<root>/<domain>` (the `scratch_root` of a [`BeginRequest`](super::BeginRequest)) | us, `mkdirat` | us : QEMU's group | `0750` | QEMU must traverse it, nobody else needs to |
//! | `<root>/<domain>/<backup id>` | us, `mkdirat` | QEMU's user : QEMU's group | `0700` | QEMU creates the socket here; root reads anyway |
//! | `…/nbd.sock` | QEMU | QEMU's user (or root) | QEMU's | checked with `lstat` before anyone connects |
//!
//! The two levels we manage are opened with `O_NOFOLLOW | O_DIRECTORY` relative to their
//! parent's descriptor (an `openat` walk), so a symlink planted at either is refused, never
//! followed; an existing domain level must be owned by us, an existing backup level is refused.
//!
//! # QEMU's identity
//!
//! As libvirt runs it: `user` and `group` from `/etc/libvirt/qemu.conf` when set (names, or
//! `+N` for a numeric id, as libvirt reads them), else Debian's `libvirt-qemu` and `kvm`. Names
//! are resolved with `getpwnam_r`/`getgrnam_r`. When libvirt runs QEMU as root, the backup
//! level is root's.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use super::LibvirtError;
use crate::format::BackupId;

/// libvirt's QEMU driver configuration.
pub const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";
/// QEMU's user when `qemu.conf` does not set one (Debian's build of libvirt).
pub const DEFAULT_QEMU_USER: &str = "libvirt-qemu";
/// QEMU's group when `qemu.conf` does not set one (Debian's build of libvirt).
pub const DEFAULT_QEMU_GROUP: &str = "kvm";
/// Largest `qemu.conf` read (the stock file is ~40 KiB, nearly all comments).
pub const MAX_QEMU_CONF: u64 = 1 << 20;
/// Largest buffer handed to `getpwnam_r`/`getgrnam_r` (a group with many members needs more
/// than `sysconf`'s suggestion).
const MAX_NSS_BUF: usize = 1 << 20;
/// Mode of the per-domain level.
pub const DOMAIN_DIR_MODE: u32 = 0o750;
/// Mode of the per-backup level.
pub const BACKUP_DIR_MODE: u32 = 0o700;

/// The user and group libvirt runs QEMU as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuIdentity {
    pub uid: u32,
    pub gid: u32,
}

impl QemuIdentity {
    pub const ROOT: QemuIdentity = QemuIdentity { uid: 0, gid: 0 };

    /// QEMU's identity on this host, from [`QEMU_CONF`] (a missing file means the defaults).
    pub fn of_host() -> Result<QemuIdentity, LibvirtError> {
        Self::from_conf_file(Path::new(QEMU_CONF))
    }

    /// QEMU's identity from the libvirt QEMU driver configuration at `path`.
    pub fn from_conf_file(path: &Path) -> Result<QemuIdentity, LibvirtError> {
        use std::io::Read;
        let err = |source| LibvirtError::QemuConf {
            path: path.to_path_buf(),
            source,
        };
        let mut text = String::new();
        match File::open(path) {
            Ok(f) => {
                f.take(MAX_QEMU_CONF + 1)
                    .read_to_string(&mut text)
                    .map_err(err)?;
                if text.len() as u64 > MAX_QEMU_CONF {
                    return Err(err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("over {MAX_QEMU_CONF} bytes"),
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let (user, group) = conf_user_group(&text);
        Ok(QemuIdentity {
            uid: resolve_user(user.as_deref().unwrap_or(DEFAULT_QEMU_USER))?,
            gid: resolve_group(group.as_deref().unwrap_or(DEFAULT_QEMU_GROUP))?,
        })
    }
}

/// The `user` and `group` settings of a `qemu.conf` (libvirt's `key = "value"` syntax, `#`
/// comments); the last setting of a key wins, as in libvirt.
pub fn conf_user_group(text: &str) -> (Option<String>, Option<String>) {
    let (mut user, mut group) = (None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        // A quoted string; anything after its closing quote is a comment.
        let value = match value.strip_prefix('"') {
            Some(rest) => match rest.split_once('"') {
                Some((v, _)) => v,
                None => continue,
            },
            None => value.split('#').next().unwrap_or("").trim(),
        };
        match key.trim() {
            "user" => user = Some(value.to_string()),
            "group" => group = Some(value.to_string()),
            _ => {}
        }
    }
    (user, group)
}

/// `+N` is a numeric id (libvirt's convention); otherwise a name, else a plain number.
fn numeric(s: &str) -> Option<u32> {
    s.strip_prefix('+').unwrap_or(s).parse().ok()
}

/// Calls a reentrant NSS lookup with a growing buffer until it fits.
fn nss_lookup<T>(
    name: &str,
    what: &'static str,
    mut call: impl FnMut(&CStr, &mut [u8]) -> Result<Option<T>, i32>,
) -> Result<Option<T>, LibvirtError> {
    let unknown = || LibvirtError::QemuUserUnknown {
        what,
        name: name.to_string(),
    };
    let c = CString::new(name).map_err(|_| unknown())?;
    let mut len = 1024usize;
    loop {
        let mut buf = vec![0u8; len];
        match call(&c, &mut buf) {
            Ok(v) => return Ok(v),
            Err(libc::ERANGE) if len < MAX_NSS_BUF => len *= 4,
            Err(_) => return Err(unknown()),
        }
    }
}

/// The uid of user `name` (or `+N`).
pub fn resolve_user(name: &str) -> Result<u32, LibvirtError> {
    let found = if name.starts_with('+') {
        None
    } else {
        nss_lookup(name, "user", |c, buf| {
            // SAFETY: `pwd` and `buf` outlive the call and `buf.len()` is its length; the
            // result points into them and is read before they are dropped.
            unsafe {
                let mut pwd: libc::passwd = std::mem::zeroed();
                let mut out: *mut libc::passwd = std::ptr::null_mut();
                let rc = libc::getpwnam_r(
                    c.as_ptr(),
                    &mut pwd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut out,
                );
                match rc {
                    0 if out.is_null() => Ok(None),
                    0 => Ok(Some(pwd.pw_uid)),
                    e => Err(e),
                }
            }
        })?
    };
    found
        .or_else(|| numeric(name))
        .ok_or_else(|| LibvirtError::QemuUserUnknown {
            what: "user",
            name: name.to_string(),
        })
}

/// The gid of group `name` (or `+N`).
pub fn resolve_group(name: &str) -> Result<u32, LibvirtError> {
    let found = if name.starts_with('+') {
        None
    } else {
        nss_lookup(name, "group", |c, buf| {
            // SAFETY: `grp` and `buf` outlive the call and `buf.len()` is its length; the
            // result points into them and is read before they are dropped.
            unsafe {
                let mut grp: libc::group = std::mem::zeroed();
                let mut out: *mut libc::group = std::ptr::null_mut();
                let rc = libc::getgrnam_r(
                    c.as_ptr(),
                    &mut grp,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut out,
                );
                match rc {
                    0 if out.is_null() => Ok(None),
                    0 => Ok(Some(grp.gr_gid)),
                    e => Err(e),
                }
            }
        })?
    };
    found
        .or_else(|| numeric(name))
        .ok_or_else(|| LibvirtError::QemuUserUnknown {
            what: "group",
            name: name.to_string(),
        })
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn unsafe_dir(path: &Path, reason: impl Into<String>) -> LibvirtError {
    LibvirtError::UnsafeScratch {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> LibvirtError + '_ {
    move |source| LibvirtError::Scratch {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether a level may lead to our scratch: owned by root or us, and writable by nobody else
/// unless sticky (then only the owner of an entry can rename it, and the next level is ours).
fn check_level(path: &Path, md: &std::fs::Metadata) -> Result<(), LibvirtError> {
    if md.uid() != 0 && md.uid() != euid() {
        return Err(unsafe_dir(path, format!("owned by uid {}", md.uid())));
    }
    if md.file_type().is_dir() && md.mode() & 0o022 != 0 && md.mode() & 0o1000 == 0 {
        return Err(unsafe_dir(
            path,
            format!("writable by others (mode {:o})", md.mode() & 0o7777),
        ));
    }
    Ok(())
}

/// Checks every level of `path` (absolute, or relative to the working directory) both as
/// written and as resolved: nobody but root can replace any of them.
fn check_ancestors(path: &Path) -> Result<PathBuf, LibvirtError> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(io_err(path))?.join(path)
    };
    let canonical = std::fs::canonicalize(&abs).map_err(io_err(path))?;
    for p in [&abs, &canonical] {
        let mut cur = PathBuf::new();
        for c in p.components() {
            match c {
                Component::RootDir | Component::Normal(_) => cur.push(c),
                Component::CurDir => continue,
                Component::ParentDir => {
                    return Err(unsafe_dir(path, "'..' in the scratch path"));
                }
                Component::Prefix(_) => continue,
            }
            let md = std::fs::symlink_metadata(&cur).map_err(io_err(&cur))?;
            check_level(&cur, &md)?;
        }
    }
    let md = std::fs::metadata(&canonical).map_err(io_err(&canonical))?;
    if !md.is_dir() {
        return Err(unsafe_dir(&canonical, "not a directory"));
    }
    Ok(canonical)
}

fn cstr(path: &Path, name: &OsStr) -> Result<CString, LibvirtError> {
    CString::new(name.as_bytes()).map_err(|_| unsafe_dir(path, "NUL in a name"))
}

fn open_dir(path: &Path) -> Result<OwnedFd, LibvirtError> {
    let c = cstr(path, path.as_os_str())?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io_err(path)(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a descriptor we just opened and own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `mkdirat` (when `create`) then `openat` with `O_NOFOLLOW | O_DIRECTORY`: a symlink at
/// `name` fails the open instead of being followed. Returns the descriptor and whether we
/// created it.
fn open_level(
    parent: &OwnedFd,
    path: &Path,
    name: &OsStr,
    create: bool,
) -> Result<(OwnedFd, bool), LibvirtError> {
    let c = cstr(path, name)?;
    let mut created = false;
    if create {
        // SAFETY: `parent` is an open directory and `c` a NUL-terminated name; both outlive
        // the call.
        let rc = unsafe { libc::mkdirat(parent.as_raw_fd(), c.as_ptr(), 0o700) };
        if rc == 0 {
            created = true;
        } else {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(io_err(path)(e));
            }
        }
    }
    // SAFETY: as above.
    let fd = unsafe {
        libc::openat(
            parent.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
                unsafe_dir(path, "not a directory (a symlink?)")
            }
            _ => io_err(path)(e),
        });
    }
    // SAFETY: `fd` is a descriptor we just opened and own.
    Ok((unsafe { OwnedFd::from_raw_fd(fd) }, created))
}

fn set_owner_mode(
    fd: &OwnedFd,
    path: &Path,
    uid: u32,
    gid: u32,
    mode: u32,
) -> Result<(), LibvirtError> {
    // SAFETY: `fd` is an open descriptor for the call's duration.
    if unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) } != 0 {
        return Err(io_err(path)(std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode) } != 0 {
        return Err(io_err(path)(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn fstat(fd: &OwnedFd, path: &Path) -> Result<std::fs::Metadata, LibvirtError> {
    // Borrow the descriptor as a File for its metadata, without closing it after.
    let f = std::mem::ManuallyDrop::new(
        // SAFETY: the File never closes `fd` (ManuallyDrop) and lives shorter than it.
        unsafe { File::from_raw_fd(fd.as_raw_fd()) },
    );
    f.metadata().map_err(io_err(path))
}

/// Whether QEMU (`q`) may search a directory with this metadata.
fn searchable_by(md: &std::fs::Metadata, q: QemuIdentity) -> bool {
    let m = md.mode();
    q.uid == 0
        || (md.uid() == q.uid && m & 0o100 != 0)
        || (md.gid() == q.gid && m & 0o010 != 0)
        || m & 0o001 != 0
}

/// Creates the scratch directory `<domain_root>/<backup_id>` for QEMU `qemu`, as the module
/// documentation lays out: checks every ancestor of `domain_root`, creates or reuses
/// `domain_root` (ours, never a symlink), creates `backup_id` (must not exist). Returns the
/// path of the backup level.
pub fn make(
    domain_root: &Path,
    backup_id: &BackupId,
    qemu: QemuIdentity,
) -> Result<PathBuf, LibvirtError> {
    let (Some(parent), Some(name)) = (domain_root.parent(), domain_root.file_name()) else {
        return Err(unsafe_dir(domain_root, "no parent directory"));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    // The configured root is the operator's: created with its parents when missing.
    if !parent.exists() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let canonical = check_ancestors(parent)?;
    for a in canonical.ancestors() {
        let md = std::fs::metadata(a).map_err(io_err(a))?;
        if !searchable_by(&md, qemu) {
            return Err(unsafe_dir(
                a,
                format!(
                    "QEMU (uid {}, gid {}) cannot reach the scratch directory through it (mode {:o})",
                    qemu.uid,
                    qemu.gid,
                    md.mode() & 0o7777
                ),
            ));
        }
    }
    let pfd = open_dir(&canonical)?;
    let (dfd, _) = open_level(&pfd, domain_root, name, true)?;
    let md = fstat(&dfd, domain_root)?;
    if md.uid() != euid() && md.uid() != 0 {
        return Err(unsafe_dir(
            domain_root,
            format!("owned by uid {}, not by us", md.uid()),
        ));
    }
    set_owner_mode(&dfd, domain_root, euid(), qemu.gid, DOMAIN_DIR_MODE)?;
    let dir = domain_root.join(backup_id.as_str());
    let (bfd, created) = open_level(&dfd, &dir, OsStr::new(backup_id.as_str()), true)?;
    if !created {
        return Err(unsafe_dir(&dir, "exists already"));
    }
    set_owner_mode(&bfd, &dir, qemu.uid, qemu.gid, BACKUP_DIR_MODE)?;
    Ok(dir)
}

/// Opens `domain_root` for cleaning: must be a directory of ours (not a symlink) whose
/// ancestors nobody else can replace. `Ok(false)` when it does not exist.
pub fn check_domain_root(domain_root: &Path) -> Result<bool, LibvirtError> {
    let md = match std::fs::symlink_metadata(domain_root) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(domain_root)(e)),
    };
    if !md.file_type().is_dir() {
        return Err(unsafe_dir(domain_root, "not a directory (a symlink?)"));
    }
    if md.uid() != euid() && md.uid() != 0 {
        return Err(unsafe_dir(
            domain_root,
            format!("owned by uid {}, not by us", md.uid()),
        ));
    }
    if let Some(p) = domain_root.parent().filter(|p| !p.as_os_str().is_empty()) {
        check_ancestors(p)?;
    }
    Ok(true)
}

/// Whether what is at `path` may be QEMU's NBD socket: a socket (not a symlink to one),
/// owned by QEMU's user or root. Call it before connecting.
pub fn check_socket(path: &Path, qemu: QemuIdentity) -> Result<(), LibvirtError> {
    let md = std::fs::symlink_metadata(path).map_err(io_err(path))?;
    if !md.file_type().is_socket() {
        return Err(LibvirtError::ForeignSocket {
            path: path.to_path_buf(),
            reason: "not a socket".into(),
        });
    }
    if md.uid() != qemu.uid && md.uid() != 0 {
        return Err(LibvirtError::ForeignSocket {
            path: path.to_path_buf(),
            reason: format!("owned by uid {}, not QEMU's {}", md.uid(), qemu.uid),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> BackupId {
        BackupId::parse(s).expect("valid id")
    }
    use std::os::unix::fs::PermissionsExt;

    fn root_tmp() -> tempfile::TempDir {
        // /var/tmp is root's and sticky; the tempdir is ours and 0700.
        let d = tempfile::Builder::new()
            .prefix("cbt-scratch-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        d
    }

    const Q: QemuIdentity = QemuIdentity {
        uid: 64_123,
        gid: 64_124,
    };

    #[test]
    fn qemu_conf_user_and_group_are_read_like_libvirt() {
        let t = "# user = \"nobody\"\n#group=\"x\"\nuser = \"qemu\" # ours\n group=\"+107\"\n";
        assert_eq!(
            conf_user_group(t),
            (Some("qemu".into()), Some("+107".into()))
        );
        assert_eq!(
            conf_user_group("user = \"a\"\nuser = \"b\""),
            (Some("b".into()), None)
        );
        assert_eq!(conf_user_group("dynamic_ownership = 1\n"), (None, None));
        assert_eq!(conf_user_group("user = \"unterminated\n"), (None, None));
    }

    #[test]
    fn names_and_numeric_ids_resolve() {
        assert_eq!(resolve_user("root").expect("root"), 0);
        assert_eq!(resolve_group("root").expect("root"), 0);
        assert_eq!(resolve_user("+4242").expect("numeric"), 4242);
        assert!(matches!(
            resolve_user("no-such-user-cbt"),
            Err(LibvirtError::QemuUserUnknown { what: "user", .. })
        ));
        assert!(resolve_group("no-such-group-cbt").is_err());
        assert!(resolve_user("a\0b").is_err());
    }

    #[test]
    fn conf_file_sets_the_identity_and_root_stays_root() {
        let d = root_tmp();
        let f = d.path().join("qemu.conf");
        std::fs::write(&f, "user = \"root\"\ngroup = \"root\"\n").expect("write");
        assert_eq!(
            QemuIdentity::from_conf_file(&f).expect("read"),
            QemuIdentity::ROOT
        );
        std::fs::write(&f, "user = \"+77\"\ngroup = \"+78\"\n").expect("write");
        assert_eq!(
            QemuIdentity::from_conf_file(&f).expect("read"),
            QemuIdentity { uid: 77, gid: 78 }
        );
        std::fs::write(&f, "user = \"no-such-user-cbt\"\n").expect("write");
        assert!(QemuIdentity::from_conf_file(&f).is_err());
    }

    #[test]
    fn levels_are_created_owned_and_private() {
        let d = root_tmp();
        let dom = d.path().join("scratch").join("uuid-1");
        let dir = make(&dom, &id("b1"), Q).expect("make");
        assert_eq!(dir, dom.join("b1"));
        let md = std::fs::symlink_metadata(&dom).expect("domain level");
        assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (0, Q.gid, 0o750));
        let md = std::fs::symlink_metadata(&dir).expect("backup level");
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (Q.uid, Q.gid, 0o700)
        );
        // A second backup reuses the domain level; the same backup level is refused.
        make(&dom, &id("b2"), Q).expect("second backup");
        assert!(matches!(
            make(&dom, &id("b1"), Q),
            Err(LibvirtError::UnsafeScratch { .. })
        ));
    }

    #[test]
    fn a_symlink_or_foreign_directory_is_refused_not_followed() {
        let d = root_tmp();
        let root = d.path().join("scratch");
        std::fs::create_dir(&root).expect("root");
        let decoy = d.path().join("decoy");
        std::fs::create_dir(&decoy).expect("decoy");
        std::os::unix::fs::symlink(&decoy, root.join("uuid-1")).expect("symlink");
        let e = make(&root.join("uuid-1"), &id("b1"), Q).expect_err("symlink followed");
        assert!(matches!(e, LibvirtError::UnsafeScratch { .. }), "{e}");
        assert!(std::fs::read_dir(&decoy).expect("decoy").next().is_none());
        assert!(check_domain_root(&root.join("uuid-1")).is_err());
        // A symlink at the backup level.
        std::fs::create_dir(root.join("uuid-2")).expect("dir");
        std::os::unix::fs::symlink(&decoy, root.join("uuid-2").join("b1")).expect("symlink");
        assert!(make(&root.join("uuid-2"), &id("b1"), Q).is_err());
        assert!(std::fs::read_dir(&decoy).expect("decoy").next().is_none());
        // A directory owned by somebody else.
        let foreign = root.join("uuid-3");
        std::fs::create_dir(&foreign).expect("dir");
        std::os::unix::fs::chown(&foreign, Some(Q.uid), Some(Q.gid)).expect("chown");
        let e = make(&foreign, &id("b1"), Q).expect_err("foreign directory used");
        assert!(e.to_string().contains("uuid-3"), "{e}");
        let md = std::fs::symlink_metadata(&foreign).expect("still there");
        assert_eq!(md.uid(), Q.uid, "ownership changed");
        assert!(!foreign.join("b1").exists());
        assert!(check_domain_root(&foreign).is_err());
    }

    #[test]
    fn a_writable_ancestor_is_refused() {
        let d = root_tmp();
        let root = d.path().join("open");
        std::fs::create_dir(&root).expect("root");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = make(&root.join("uuid"), &id("b1"), Q).expect_err("0777 root accepted");
        assert!(e.to_string().contains("writable by others"), "{e}");
        // Sticky is fine: only the owner of an entry can rename it.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        make(&root.join("uuid"), &id("b1"), Q).expect("sticky root");
        // A root QEMU cannot traverse.
        let closed = d.path().join("closed");
        std::fs::create_dir(&closed).expect("dir");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let e = make(&closed.join("uuid"), &id("b1"), Q).expect_err("unreachable root accepted");
        assert!(e.to_string().contains("cannot reach"), "{e}");
        make(&closed.join("uuid"), &id("b1"), QemuIdentity::ROOT).expect("root QEMU reaches it");
    }

    #[test]
    fn only_a_socket_of_qemu_or_root_passes() {
        let d = root_tmp();
        let s = d.path().join("nbd.sock");
        let _l = std::os::unix::net::UnixListener::bind(&s).expect("bind");
        check_socket(&s, Q).expect("root's socket");
        std::os::unix::fs::chown(&s, Some(Q.uid), None).expect("chown");
        check_socket(&s, Q).expect("QEMU's socket");
        std::os::unix::fs::chown(&s, Some(Q.uid + 1), None).expect("chown");
        assert!(matches!(
            check_socket(&s, Q),
            Err(LibvirtError::ForeignSocket { .. })
        ));
        let f = d.path().join("file");
        std::fs::write(&f, b"x").expect("write");
        assert!(check_socket(&f, Q).is_err());
        let l = d.path().join("link");
        std::os::unix::fs::symlink(&s, &l).expect("symlink");
        std::os::unix::fs::chown(&s, Some(Q.uid), None).expect("chown");
        assert!(check_socket(&l, Q).is_err(), "a symlink to a socket passed");
    }
}
