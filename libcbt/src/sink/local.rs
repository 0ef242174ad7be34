//! A sink in a local or NFS-mounted directory.
//!
//! Object `a/b/c` is the file `ROOT/a/b/c`. Objects are written to a temporary file beside
//! their final name (`.cbt-tmp-…`, never listed), fsynced, renamed into place, and the
//! directory is fsynced: after `finish`/`put` returns the object survives a crash, and before
//! it returns the object does not exist under its name. Create-only writes
//! ([`Sink::put_new`]) `link` the temporary file to the name instead of renaming it, which
//! fails when the name is taken, on local filesystems and NFS alike. Directories are created
//! 0700 and fsynced into their parents; files are 0600.
//!
//! Two I/O backends, chosen at run time ([`Backend`], or `CBT_SINK_IO=uring|std`; the default
//! is io_uring where the kernel allows it):
//!
//! | | `Uring` | `Std` |
//! |---|---|---|
//! | segment writes | 1 MiB aligned buffers, up to 8 in flight, O_DIRECT where the filesystem accepts it (tail padded, then truncated) | `pwrite` on the blocking pool |
//! | ranged reads | io_uring reads | `pread` on the blocking pool |
//! | fsync of segments | io_uring | `fsync` |
//!
//! Both give the same objects; the tests run against both.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use std::collections::VecDeque;
use std::os::unix::fs::OpenOptionsExt;

use super::uring::{AlignedBuf, Uring};
use super::{check_name, ObjectInfo, ObjectWriter, Sink, SinkError};

/// Size of the staging buffers of io_uring writes.
const STAGING: usize = 1 << 20;
/// io_uring writes in flight per object.
const MAX_WRITES_IN_FLIGHT: usize = 8;

/// The I/O backend of a [`LocalSink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// io_uring on a thread that owns the ring; O_DIRECT segment writes where possible.
    Uring,
    /// Plain `std::fs` calls on tokio's blocking pool.
    Std,
}

impl Backend {
    /// From `CBT_SINK_IO` (`uring` or `std`); `None` means "io_uring if available".
    pub fn from_env() -> Option<Backend> {
        match std::env::var("CBT_SINK_IO").ok().as_deref() {
            Some("std") => Some(Backend::Std),
            Some("uring") => Some(Backend::Uring),
            _ => None,
        }
    }
}

const TMP_PREFIX: &str = ".cbt-tmp-";

/// True when a complete object (not a temporary file) lies anywhere under `dir`; stops at the
/// first one found.
fn holds_an_object(dir: &Path) -> bool {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() && !e.file_name().to_string_lossy().starts_with('.') => {
                    return true
                }
                _ => {}
            }
        }
    }
    false
}

/// A directory sink.
#[derive(Debug, Clone)]
pub struct LocalSink {
    root: Arc<PathBuf>,
    uring: Option<Uring>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn tmp_path(path: &Path) -> PathBuf {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!("{TMP_PREFIX}{}-{n}-{file}", std::process::id()))
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents (0700), each fsynced into its parent, so that an
/// object reported durable is not lost with a directory entry that was not.
fn make_dirs(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        make_dirs(parent)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => fsync_dir(dir.parent().unwrap_or(Path::new("."))),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens a new temporary file (0600).
fn create_tmp(tmp: &Path, custom_flags: i32) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(custom_flags)
        .open(tmp)
}

async fn blocking<T: Send + 'static>(
    op: &'static str,
    name: &str,
    f: impl FnOnce() -> Result<T, SinkError> + Send + 'static,
) -> Result<T, SinkError> {
    let name = name.to_string();
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SinkError::Io {
            op,
            name,
            source: std::io::Error::other(e),
        })?
}

impl LocalSink {
    /// A sink rooted at `root`, created if missing, with the backend of [`Backend::from_env`].
    pub fn open(root: impl Into<PathBuf>) -> Result<LocalSink, SinkError> {
        Self::open_with(root, Backend::from_env())
    }

    /// A sink with a chosen backend (`None`: io_uring if the kernel allows it, else std).
    /// Asking for io_uring where it is unavailable is an error.
    pub fn open_with(
        root: impl Into<PathBuf>,
        backend: Option<Backend>,
    ) -> Result<LocalSink, SinkError> {
        let root = root.into();
        let name = root.to_string_lossy().into_owned();
        make_dirs(&root).map_err(|e| SinkError::io("creating sink root", &name, e))?;
        let uring = match backend {
            Some(Backend::Std) => None,
            Some(Backend::Uring) => {
                Some(Uring::new().map_err(|e| SinkError::io("starting io_uring for", &name, e))?)
            }
            None => Uring::new().ok(),
        };
        Ok(LocalSink {
            root: Arc::new(root),
            uring,
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        if self.uring.is_some() {
            Backend::Uring
        } else {
            Backend::Std
        }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, name: &str) -> Result<PathBuf, SinkError> {
        check_name(name)?;
        Ok(self.root.join(name))
    }
}

/// Writes `data` under `path` through a temporary file: renamed over whatever is there, or,
/// with `create_only`, linked to the name (EEXIST when taken) and then unlinked.
fn write_atomic(path: &Path, name: &str, data: &[u8], create_only: bool) -> Result<(), SinkError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    make_dirs(dir).map_err(|e| SinkError::io("creating directory for", name, e))?;
    let tmp = tmp_path(path);
    let r = (|| {
        let mut f = create_tmp(&tmp, 0)?;
        f.write_all(data)?;
        f.sync_all()?;
        if create_only {
            fs::hard_link(&tmp, path)?;
            fs::remove_file(&tmp)?;
        } else {
            fs::rename(&tmp, path)?;
        }
        fsync_dir(dir)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r.map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists if create_only => SinkError::Exists { name: name.into() },
        _ => SinkError::io("writing", name, e),
    })
}

impl Sink for LocalSink {
    type Writer = LocalWriter;

    async fn create(&self, name: &str) -> Result<LocalWriter, SinkError> {
        let path = self.path(name)?;
        let n = name.to_string();
        let uring = self.uring.clone();
        blocking("creating", name, move || {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            make_dirs(&dir).map_err(|e| SinkError::io("creating directory for", &n, e))?;
            let tmp = tmp_path(&path);
            let plain = || create_tmp(&tmp, 0).map_err(|e| SinkError::io("creating", &n, e));
            let (file, direct) = match &uring {
                // O_DIRECT where the filesystem takes it (not tmpfs); buffered otherwise.
                Some(_) => match create_tmp(&tmp, libc::O_DIRECT) {
                    Ok(f) => (f, true),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (plain()?, false),
                    Err(e) => return Err(SinkError::io("creating", &n, e)),
                },
                None => (plain()?, false),
            };
            let io = match uring {
                Some(uring) => WriterIo::Uring {
                    uring,
                    direct,
                    staging: None,
                    spare: Vec::new(),
                    submitted: 0,
                    inflight: VecDeque::new(),
                },
                None => WriterIo::Std,
            };
            Ok(LocalWriter {
                file: Some(Arc::new(file)),
                tmp,
                path,
                name: n,
                len: 0,
                io,
            })
        })
        .await
    }

    async fn put(&self, name: &str, data: Vec<u8>) -> Result<(), SinkError> {
        let path = self.path(name)?;
        let n = name.to_string();
        blocking("writing", name, move || {
            write_atomic(&path, &n, &data, false)
        })
        .await
    }

    async fn put_new(&self, name: &str, data: Vec<u8>) -> Result<(), SinkError> {
        let path = self.path(name)?;
        let n = name.to_string();
        blocking("writing", name, move || {
            write_atomic(&path, &n, &data, true)
        })
        .await
    }

    async fn get_range_into(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>, SinkError> {
        let path = self.path(name)?;
        let n = name.to_string();
        let want = usize::try_from(len).map_err(|_| SinkError::TooLarge {
            name: n.clone(),
            len,
            max: usize::MAX as u64,
        })?;
        if let Some(uring) = &self.uring {
            let (p2, n2) = (path.clone(), n.clone());
            let file = blocking("opening", name, move || {
                let f = File::open(&p2).map_err(|e| SinkError::io("opening", &n2, e))?;
                let size = f
                    .metadata()
                    .map_err(|e| SinkError::io("reading", &n2, e))?
                    .len();
                if offset.checked_add(len).is_none_or(|e| e > size) {
                    return Err(SinkError::ShortRead {
                        name: n2,
                        offset,
                        want: len,
                        got: size.saturating_sub(offset),
                    });
                }
                Ok(f)
            })
            .await?;
            return uring
                .read_into(Arc::new(file), buf, want, offset)
                .await
                .map_err(|e| SinkError::io("reading", &n, e));
        }
        blocking("reading", name, move || {
            let f = File::open(&path).map_err(|e| SinkError::io("opening", &n, e))?;
            let size = f
                .metadata()
                .map_err(|e| SinkError::io("reading", &n, e))?
                .len();
            let end = offset.checked_add(len).filter(|e| *e <= size);
            if end.is_none() {
                return Err(SinkError::ShortRead {
                    name: n,
                    offset,
                    want: len,
                    got: size.saturating_sub(offset),
                });
            }
            buf.resize(want, 0);
            f.read_exact_at(&mut buf, offset)
                .map_err(|e| SinkError::io("reading", &n, e))?;
            Ok(buf)
        })
        .await
    }

    async fn get(&self, name: &str, max: u64) -> Result<Vec<u8>, SinkError> {
        let path = self.path(name)?;
        let n = name.to_string();
        blocking("reading", name, move || {
            let f = File::open(&path).map_err(|e| SinkError::io("opening", &n, e))?;
            let len = f
                .metadata()
                .map_err(|e| SinkError::io("reading", &n, e))?
                .len();
            if len > max {
                return Err(SinkError::TooLarge { name: n, len, max });
            }
            // Bounded by max above.
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, 0)
                .map_err(|e| SinkError::io("reading", &n, e))?;
            Ok(buf)
        })
        .await
    }

    async fn list_dirs(&self, dir: &str) -> Result<Vec<String>, SinkError> {
        let root = self.root.clone();
        let dir = dir.to_string();
        blocking("listing", &dir.clone(), move || {
            let base = root.join(dir.trim_end_matches('/'));
            let entries = match fs::read_dir(&base) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(SinkError::io("listing", &dir, e)),
            };
            let mut out = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| SinkError::io("listing", &dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if is_dir && check_name(&name).is_ok() && holds_an_object(&entry.path()) {
                    out.push(name);
                }
            }
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, SinkError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        blocking("listing", &prefix.clone(), move || {
            // Walk from the deepest directory the prefix names completely.
            let dir_part = prefix.rfind('/').map_or("", |i| &prefix[..i]);
            let start = if dir_part.is_empty() {
                root.to_path_buf()
            } else {
                root.join(dir_part)
            };
            let mut out = Vec::new();
            let mut stack = vec![start];
            while let Some(dir) = stack.pop() {
                let entries = match fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(SinkError::io("listing", &prefix, e)),
                };
                for entry in entries {
                    let entry = entry.map_err(|e| SinkError::io("listing", &prefix, e))?;
                    let fname = entry.file_name().to_string_lossy().into_owned();
                    if fname.starts_with(TMP_PREFIX) {
                        continue;
                    }
                    let meta = entry
                        .metadata()
                        .map_err(|e| SinkError::io("listing", &prefix, e))?;
                    let path = entry.path();
                    if meta.is_dir() {
                        stack.push(path);
                        continue;
                    }
                    let rel = path
                        .strip_prefix(root.as_path())
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    if rel.starts_with(&prefix) && check_name(&rel).is_ok() {
                        out.push(ObjectInfo {
                            name: rel,
                            len: meta.len(),
                            modified: meta.modified().ok(),
                        });
                    }
                }
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
        .await
    }

    async fn delete(&self, name: &str) -> Result<(), SinkError> {
        let path = self.path(name)?;
        let n = name.to_string();
        blocking("deleting", name, move || match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SinkError::io("deleting", &n, e)),
        })
        .await
    }

    async fn remove_stale_partials(&self, grace: Duration) -> Result<u64, SinkError> {
        let root = self.root.clone();
        blocking("collecting temporary files in", "", move || {
            let now = SystemTime::now();
            let mut removed = 0;
            let mut stack = vec![root.to_path_buf()];
            while let Some(dir) = stack.pop() {
                let entries = match fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(SinkError::io("listing", "", e)),
                };
                for entry in entries {
                    let entry = entry.map_err(|e| SinkError::io("listing", "", e))?;
                    // lstat: a symlink is neither followed nor, not being ours, removed.
                    let Ok(meta) = entry.metadata() else { continue };
                    if meta.is_dir() {
                        stack.push(entry.path());
                        continue;
                    }
                    let stale = super::older_than(meta.modified().ok(), grace, now);
                    if meta.is_file()
                        && stale
                        && entry.file_name().to_string_lossy().starts_with(TMP_PREFIX)
                    {
                        match fs::remove_file(entry.path()) {
                            Ok(()) => removed += 1,
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => return Err(SinkError::io("deleting a temporary file in", "", e)),
                        }
                    }
                }
            }
            if removed > 0 {
                tracing::info!(files = removed, root = %root.display(), "stale temporary files removed");
            }
            Ok(removed)
        })
        .await
    }
}

type InflightWrite = tokio::task::JoinHandle<(std::io::Result<()>, Option<AlignedBuf>)>;

#[derive(Debug)]
enum WriterIo {
    Std,
    Uring {
        uring: Uring,
        direct: bool,
        /// Bytes appended but not yet submitted.
        staging: Option<AlignedBuf>,
        spare: Vec<AlignedBuf>,
        /// File offset of the next submitted write.
        submitted: u64,
        inflight: VecDeque<InflightWrite>,
    },
}

/// Writer of one object in a [`LocalSink`].
#[derive(Debug)]
pub struct LocalWriter {
    file: Option<Arc<File>>,
    tmp: PathBuf,
    path: PathBuf,
    name: String,
    len: u64,
    io: WriterIo,
}

impl LocalWriter {
    /// True when this object is written with O_DIRECT (io_uring backend on a filesystem that
    /// accepts it).
    pub fn is_direct(&self) -> bool {
        matches!(self.io, WriterIo::Uring { direct: true, .. })
    }

    fn not_open(&self, op: &'static str) -> SinkError {
        SinkError::Io {
            op,
            name: self.name.clone(),
            source: std::io::ErrorKind::NotConnected.into(),
        }
    }

    /// Submits the staging buffer at the next file offset (io_uring backend); `last` pads the
    /// tail for O_DIRECT.
    async fn submit_staging(&mut self, last: bool) -> Result<(), SinkError> {
        let file = self.file.clone().ok_or_else(|| self.not_open("writing"))?;
        let WriterIo::Uring {
            uring,
            direct,
            staging,
            submitted,
            inflight,
            spare,
        } = &mut self.io
        else {
            return Ok(());
        };
        let Some(mut buf) = staging.take() else {
            return Ok(());
        };
        if buf.is_empty() {
            spare.push(buf);
            return Ok(());
        }
        if last && *direct {
            buf.pad_to_align();
        }
        let offset = *submitted;
        *submitted += buf.len() as u64;
        let uring = uring.clone();
        inflight.push_back(tokio::spawn(
            async move { uring.write(file, buf, offset).await },
        ));
        if inflight.len() > MAX_WRITES_IN_FLIGHT {
            self.reap_one().await?;
        }
        Ok(())
    }

    async fn reap_one(&mut self) -> Result<(), SinkError> {
        let WriterIo::Uring {
            inflight, spare, ..
        } = &mut self.io
        else {
            return Ok(());
        };
        let Some(h) = inflight.pop_front() else {
            return Ok(());
        };
        let (r, buf) = h.await.map_err(|e| SinkError::Io {
            op: "writing",
            name: self.name.clone(),
            source: std::io::Error::other(e),
        })?;
        if let Some(mut b) = buf {
            b.clear();
            spare.push(b);
        }
        r.map_err(|e| SinkError::io("writing", &self.name, e))
    }

    /// Waits for every write in flight; returns the first error.
    async fn drain(&mut self) -> Result<(), SinkError> {
        let mut first = Ok(());
        while matches!(&self.io, WriterIo::Uring { inflight, .. } if !inflight.is_empty()) {
            let r = self.reap_one().await;
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        // Neither finished nor aborted (a cancelled job): do not leave the temp file behind.
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl ObjectWriter for LocalWriter {
    async fn append_prefix(&mut self, data: Vec<u8>, len: usize) -> Result<Vec<u8>, SinkError> {
        let len = len.min(data.len());
        if let WriterIo::Uring { .. } = self.io {
            let mut rest = &data[..len];
            while !rest.is_empty() {
                let WriterIo::Uring { staging, spare, .. } = &mut self.io else {
                    break;
                };
                let buf = staging
                    .get_or_insert_with(|| spare.pop().unwrap_or_else(|| AlignedBuf::new(STAGING)));
                let n = buf.fill_from(rest);
                rest = &rest[n..];
                if buf.len() == buf.capacity() {
                    self.submit_staging(false).await?;
                }
            }
            self.len += len as u64;
            return Ok(data);
        }
        let file = self.file.clone().ok_or(SinkError::Io {
            op: "appending to",
            name: self.name.clone(),
            source: std::io::ErrorKind::NotConnected.into(),
        })?;
        let offset = self.len;
        let n = self.name.clone();
        let data = blocking("writing", &self.name, move || {
            file.write_all_at(&data[..len], offset)
                .map_err(|e| SinkError::io("writing", &n, e))?;
            Ok(data)
        })
        .await?;
        self.len += len as u64;
        Ok(data)
    }

    fn len(&self) -> u64 {
        self.len
    }

    async fn finish(mut self) -> Result<(), SinkError> {
        if let WriterIo::Uring { .. } = self.io {
            self.submit_staging(true).await?;
            self.drain().await?;
            let file = self
                .file
                .clone()
                .ok_or_else(|| self.not_open("finishing"))?;
            if let WriterIo::Uring { uring, direct, .. } = &self.io {
                if *direct {
                    // The tail was padded to the O_DIRECT alignment: cut it back.
                    let (f, len, n) = (file.clone(), self.len, self.name.clone());
                    blocking("finishing", &self.name, move || {
                        f.set_len(len)
                            .map_err(|e| SinkError::io("truncating", &n, e))
                    })
                    .await?;
                }
                uring
                    .fsync(file)
                    .await
                    .map_err(|e| SinkError::io("syncing", &self.name, e))?;
            }
        }
        let file = self.file.take();
        let (tmp, path, n) = (self.tmp.clone(), self.path.clone(), self.name.clone());
        blocking("finishing", &self.name, move || {
            let r = (|| {
                if let Some(f) = file {
                    f.sync_all()?;
                }
                fs::rename(&tmp, &path)?;
                fsync_dir(path.parent().unwrap_or(Path::new(".")))
            })();
            if r.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            r.map_err(|e| SinkError::io("finishing", &n, e))
        })
        .await
    }

    async fn abort(mut self) {
        let _ = self.drain().await;
        self.file.take();
        let tmp = self.tmp.clone();
        let _ = tokio::task::spawn_blocking(move || fs::remove_file(tmp)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BACKENDS: [Backend; 2] = [Backend::Std, Backend::Uring];

    #[tokio::test]
    async fn objects_appear_only_when_finished_and_read_back() {
        for backend in BACKENDS {
            let dir = tempfile::tempdir().expect("tempdir");
            let sink = LocalSink::open_with(dir.path(), Some(backend)).expect("open");
            assert_eq!(sink.backend(), backend);
            let mut w = sink.create("disks/d/segments/a.seg").await.expect("create");
            assert_eq!(
                w.is_direct(),
                backend == Backend::Uring,
                "O_DIRECT on ext4 with io_uring"
            );
            w.append(b"hello ".to_vec()).await.expect("append");
            w.append(b"world".to_vec()).await.expect("append");
            assert!(
                sink.list("disks/").await.expect("list").is_empty(),
                "partial object visible"
            );
            w.finish().await.expect("finish");
            sink.put("disks/d/backups/b.manifest", b"m".to_vec())
                .await
                .expect("put");
            let l = sink.list("disks/d/").await.expect("list");
            assert_eq!(
                l.iter()
                    .map(|o| (o.name.as_str(), o.len))
                    .collect::<Vec<_>>(),
                vec![
                    ("disks/d/backups/b.manifest", 1),
                    ("disks/d/segments/a.seg", 11),
                ],
                "{backend:?}"
            );
            assert!(l.iter().all(|o| o.modified.is_some()), "{l:?}");
            assert_eq!(
                sink.get_range("disks/d/segments/a.seg", 6, 5)
                    .await
                    .expect("range"),
                b"world"
            );
            assert!(matches!(
                sink.get_range("disks/d/segments/a.seg", 8, 5).await,
                Err(SinkError::ShortRead { .. })
            ));
            assert!(matches!(
                sink.get("disks/d/segments/a.seg", 4).await,
                Err(SinkError::TooLarge { .. })
            ));
            assert!(matches!(
                sink.get("nope", 4).await,
                Err(SinkError::NotFound { .. })
            ));
            sink.delete("disks/d/segments/a.seg").await.expect("delete");
            sink.delete("disks/d/segments/a.seg")
                .await
                .expect("delete twice");
            assert_eq!(sink.list("disks/d/s").await.expect("list").len(), 0);
            assert!(matches!(
                sink.put("../escape", vec![]).await,
                Err(SinkError::InvalidName { .. })
            ));
        }
    }

    #[tokio::test]
    async fn aborted_and_dropped_writers_leave_nothing() {
        for backend in BACKENDS {
            let dir = tempfile::tempdir().expect("tempdir");
            let sink = LocalSink::open_with(dir.path(), Some(backend)).expect("open");
            let mut w = sink.create("x/a").await.expect("create");
            w.append(vec![1; 3 << 20]).await.expect("append");
            w.abort().await;
            let mut w = sink.create("x/b").await.expect("create");
            w.append(vec![1; 10]).await.expect("append");
            drop(w);
            let left: Vec<_> = fs::read_dir(dir.path().join("x")).expect("dir").collect();
            assert!(left.is_empty(), "{backend:?} left behind: {left:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// The io_uring writer (O_DIRECT, aligned staging, padded tail) against std::fs, on
        /// random sequences of appends of any size, and ranged reads of the result.
        #[test]
        fn uring_writer_matches_std_fs(
            appends in prop::collection::vec((0usize..(2 << 20) + 5000, any::<u8>()), 0..8),
            ranges in prop::collection::vec((any::<u64>(), 0u64..100_000), 1..6),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let dir = tempfile::tempdir().expect("tempdir");
                let mut expect = Vec::new();
                let mut files = Vec::new();
                for backend in BACKENDS {
                    let sink = LocalSink::open_with(dir.path().join(format!("{backend:?}")), Some(backend)).expect("open");
                    let mut w = sink.create("o/seg").await.expect("create");
                    expect.clear();
                    for (k, (len, byte)) in appends.iter().enumerate() {
                        let mut data: Vec<u8> = (0..*len).map(|i| byte.wrapping_add((i / 4093) as u8)).collect();
                        expect.extend_from_slice(&data);
                        // Every other append passes a longer buffer and only a prefix of it,
                        // as the backup does with its reused frame buffers.
                        let junk = if k % 2 == 1 { 1 + (*len * 7 + k) % 5000 } else { 0 };
                        data.extend(std::iter::repeat_n(0xee, junk));
                        let back = w.append_prefix(data, *len).await.expect("append");
                        assert_eq!(back.len(), *len + junk, "buffer given back whole");
                    }
                    assert_eq!(w.len(), expect.len() as u64);
                    w.finish().await.expect("finish");
                    let got = fs::read(dir.path().join(format!("{backend:?}")).join("o/seg")).expect("read");
                    assert!(got == expect, "{backend:?}: file differs from the appended bytes ({} vs {})", got.len(), expect.len());
                    for (off, len) in &ranges {
                        if expect.is_empty() {
                            break;
                        }
                        let off = off % expect.len() as u64;
                        let len = (*len).min(expect.len() as u64 - off);
                        let r = sink.get_range("o/seg", off, len).await.expect("range");
                        assert!(r[..] == expect[off as usize..(off + len) as usize], "{backend:?} range {off}+{len}");
                        // Into a reused buffer longer or shorter than the range, full of junk.
                        let junk = vec![0x77u8; (len as usize * 3 / 2) ^ 5];
                        let r = sink.get_range_into("o/seg", off, len, junk).await.expect("range into");
                        assert!(r[..] == expect[off as usize..(off + len) as usize], "{backend:?} range into {off}+{len}");
                    }
                    files.push(got);
                }
                assert!(files[0] == files[1]);
            });
        }
    }
}
