//! Files and directories the root daemon creates for a caller, beneath a directory the
//! operator configured (a restore directory), without ever following a symlink.
//!
//! A lexical check of a path proves nothing: `<restore_dir>/link/x.raw`, where `link` points at
//! `/etc`, is lexically inside the restore directory. Everything here resolves the caller's part
//! of the path with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`
//! relative to an open descriptor of the configured directory, and creates with `O_EXCL`:
//!
//! | step | call | refuses |
//! |---|---|---|
//! | open the configured root | `open(O_PATH \| O_DIRECTORY)` | a root that is not a directory |
//! | open the caller's parent | `openat2(root, parent, O_PATH \| O_DIRECTORY, BENEATH \| NO_SYMLINKS)` | `..` out, any symlink |
//! | create the file | `openat2(parent, name, O_CREAT \| O_EXCL \| O_NOFOLLOW, 0600)` | an existing name, a dangling symlink |
//! | remove it again | `fstatat(NOFOLLOW)` == recorded (dev, ino), then `unlinkat` | anything we did not create |
//!
//! The operator's own path (the root) is trusted and may contain symlinks; the part a caller
//! chose never does. A created file is handed to tools that take a path (`qemu-img`, `qemu-nbd`)
//! as `/proc/<pid>/fd/<n>`: the magic link names exactly the inode we created, whatever happens
//! to the name afterwards.
#![allow(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A file this daemon created, with what identifies it when it has to go again.
#[derive(Debug)]
pub struct Created {
    pub file: File,
    /// The caller's path (for messages and the journal).
    pub path: PathBuf,
    pub id: FileId,
}

/// Device and inode of something we created: removal checks them first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl Created {
    /// A path naming exactly this inode, for a child process (`/proc/<our pid>/fd/<n>`).
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.file.as_raw_fd()
        ))
    }
}

fn cstr(p: &OsStr) -> io::Result<CString> {
    CString::new(p.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL"))
}

/// The caller's part of `path`: below one of `roots`, relative, plain names only.
pub fn split_beneath<'a>(roots: &'a [PathBuf], path: &Path) -> io::Result<(&'a Path, PathBuf)> {
    let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
    if !path.is_absolute() {
        return Err(invalid("path must be absolute"));
    }
    for root in roots {
        if let Ok(rel) = path.strip_prefix(root) {
            if rel.as_os_str().is_empty() {
                continue;
            }
            if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(invalid("path must not contain '..' or '.'"));
            }
            return Ok((root.as_path(), rel.to_path_buf()));
        }
    }
    Err(invalid(
        "path is outside the configured restore directories",
    ))
}

fn open_root(root: &Path) -> io::Result<OwnedFd> {
    let c = cstr(root.as_os_str())?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; the returned
    // descriptor, if any, is owned by nobody else.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat2` beneath `dir`, refusing symlinks anywhere in `rel`.
fn openat2(dir: &OwnedFd, rel: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(rel.as_os_str())?;
    // SAFETY: open_how is plain data; zeroed is a valid value for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        u64::from(mode)
    } else {
        0
    };
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: the pointers are valid for the call (`c` and `how` outlive it), the size is that
    // of the struct passed; the descriptor returned, if any, is ours alone.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::EXDEV) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the path crosses a symlink or leaves the restore directory",
            ));
        }
        return Err(e);
    }
    // SAFETY: a fresh descriptor we own (the syscall returned a non-negative int).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens the directory `rel` beneath `root` (no symlinks).
fn open_dir_beneath(root: &Path, rel: &Path) -> io::Result<OwnedFd> {
    let r = open_root(root)?;
    if rel.as_os_str().is_empty() {
        return Ok(r);
    }
    openat2(&r, rel, libc::O_PATH | libc::O_DIRECTORY, 0)
}

fn parent_and_name(rel: &Path) -> io::Result<(PathBuf, &OsStr)> {
    let name = rel
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    Ok((
        rel.parent().map(Path::to_path_buf).unwrap_or_default(),
        name,
    ))
}

/// Creates the new file `rel` beneath `root`, mode 0600, refusing an existing name, a symlink
/// anywhere in `rel` and a parent that does not exist.
pub fn create_beneath(root: &Path, rel: &Path) -> io::Result<Created> {
    let (parent, name) = parent_and_name(rel)?;
    let dir = open_dir_beneath(root, &parent)?;
    let fd = openat2(
        &dir,
        Path::new(name),
        libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
        0o600,
    )?;
    let file = File::from(fd);
    let m = file.metadata()?;
    Ok(Created {
        file,
        path: root.join(rel),
        id: FileId {
            dev: m.dev(),
            ino: m.ino(),
        },
    })
}

/// Whether `rel` beneath `root` could be created now: its parent resolves without a symlink
/// and nothing (not even a dangling symlink) has its name. The creation itself decides.
pub fn check_new_beneath(root: &Path, rel: &Path) -> io::Result<()> {
    let (parent, name) = parent_and_name(rel)?;
    let dir = open_dir_beneath(root, &parent)?;
    let c = cstr(name)?;
    // SAFETY: stat is plain data, written by fstatat on success.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, C string and out pointer for the duration of the call.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists already",
        ));
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// Creates the new directory `rel` beneath `root` with `mode` (its parent must exist).
pub fn mkdir_beneath(root: &Path, rel: &Path, mode: u32) -> io::Result<FileId> {
    let (parent, name) = parent_and_name(rel)?;
    let dir = open_dir_beneath(root, &parent)?;
    let c = cstr(name)?;
    // SAFETY: `dir` is an open directory descriptor and `c` a valid C string for the call.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let d = openat2(&dir, Path::new(name), libc::O_DIRECTORY | libc::O_RDONLY, 0)?;
    let f = File::from(d);
    // mkdirat's mode is masked by the umask; the staging directory needs what we asked for.
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    let m = f.metadata()?;
    Ok(FileId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// Removes `rel` beneath `root` if it is still the file or (empty) directory `id` we created;
/// anything else under that name is left alone. `Ok(false)`: nothing of ours was there.
pub fn remove_beneath(root: &Path, rel: &Path, id: FileId) -> io::Result<bool> {
    let (parent, name) = parent_and_name(rel)?;
    let dir = match open_dir_beneath(root, &parent) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let c = cstr(name)?;
    // SAFETY: stat is plain data, fully written by a successful fstatat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, C string and out pointer for the duration of the call.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::NotFound {
            Ok(false)
        } else {
            Err(e)
        };
    }
    if st.st_dev != id.dev || st.st_ino != id.ino {
        tracing::warn!(path = %root.join(rel).display(), "not ours any more; left in place");
        return Ok(false);
    }
    let flags = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        libc::AT_REMOVEDIR
    } else {
        0
    };
    // SAFETY: as above.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_refuses_symlinks_dotdot_and_existing_names() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("restores");
        std::fs::create_dir(&root).expect("mkdir");
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("link")).expect("symlink");
        std::os::unix::fs::symlink(outside.join("dangling"), root.join("dangle.raw"))
            .expect("symlink");
        let roots = vec![root.clone()];

        let (r, rel) = split_beneath(&roots, &root.join("link/x.raw")).expect("lexically fine");
        let e = create_beneath(r, &rel).expect_err("through a symlinked directory");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(!outside.join("x.raw").exists());

        let (r, rel) = split_beneath(&roots, &root.join("dangle.raw")).expect("lexically fine");
        assert!(create_beneath(r, &rel).is_err(), "a dangling final symlink");
        assert!(!outside.join("dangling").exists());

        assert!(split_beneath(&roots, &root.join("../outside/y.raw")).is_err());
        assert!(split_beneath(&roots, Path::new("/etc/passwd")).is_err());
        assert!(split_beneath(&roots, Path::new("x.raw")).is_err());
        assert!(split_beneath(&roots, &root).is_err());

        let (r, rel) = split_beneath(&roots, &root.join("ok.raw")).expect("fine");
        let c = create_beneath(r, &rel).expect("create");
        assert_eq!(
            std::fs::metadata(root.join("ok.raw")).expect("meta").mode() & 0o777,
            0o600
        );
        assert!(create_beneath(r, &rel).is_err(), "exists");
        // Only what we created is removed.
        std::fs::remove_file(root.join("ok.raw")).expect("rm");
        std::fs::write(root.join("ok.raw"), b"someone else's").expect("write");
        assert!(!remove_beneath(r, &rel, c.id).expect("remove"));
        assert!(root.join("ok.raw").exists());
        std::fs::remove_file(root.join("ok.raw")).expect("rm");
        let c = create_beneath(r, &rel).expect("create");
        assert!(remove_beneath(r, &rel, c.id).expect("remove"));
        assert!(!root.join("ok.raw").exists());
    }

    #[test]
    fn directories_beneath() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().to_path_buf();
        std::os::unix::fs::symlink("/tmp", root.join("t")).expect("symlink");
        assert!(mkdir_beneath(&root, Path::new("t/x"), 0o755).is_err());
        let id = mkdir_beneath(&root, Path::new("copy"), 0o755).expect("mkdir");
        assert!(mkdir_beneath(&root, Path::new("copy"), 0o755).is_err());
        let c = create_beneath(&root, Path::new("copy/vda.qcow2")).expect("create");
        assert!(remove_beneath(&root, Path::new("copy/vda.qcow2"), c.id).expect("rm"));
        assert!(remove_beneath(&root, Path::new("copy"), id).expect("rmdir"));
    }
}
