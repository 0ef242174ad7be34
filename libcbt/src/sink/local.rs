//! A sink in a local or NFS-mounted directory.
//!
//! Object `a/b/c` is the file `ROOT/a/b/c`. Objects are written to a temporary file beside
//! their final name (`.cbt-tmp-…`, never listed), fsynced, renamed into place, and the
//! directory is fsynced: after `finish`/`put` returns the object survives a crash, and before
//! it returns the object does not exist under its name.
//!
//! Blocking file calls run on tokio's blocking pool.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{check_name, ObjectInfo, ObjectWriter, Sink, SinkError};

const TMP_PREFIX: &str = ".cbt-tmp-";

/// A directory sink.
#[derive(Debug, Clone)]
pub struct LocalSink {
    root: Arc<PathBuf>,
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
    /// A sink rooted at `root`, created if missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<LocalSink, SinkError> {
        let root = root.into();
        fs::create_dir_all(&root)
            .map_err(|e| SinkError::io("creating sink root", &root.to_string_lossy(), e))?;
        Ok(LocalSink {
            root: Arc::new(root),
        })
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

fn write_atomic(path: &Path, name: &str, data: &[u8]) -> Result<(), SinkError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| SinkError::io("creating directory for", name, e))?;
    let tmp = tmp_path(path);
    let r = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fsync_dir(dir)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r.map_err(|e| SinkError::io("writing", name, e))
}

impl Sink for LocalSink {
    type Writer = LocalWriter;

    async fn create(&self, name: &str) -> Result<LocalWriter, SinkError> {
        let path = self.path(name)?;
        let n = name.to_string();
        blocking("creating", name, move || {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            fs::create_dir_all(&dir).map_err(|e| SinkError::io("creating directory for", &n, e))?;
            let tmp = tmp_path(&path);
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| SinkError::io("creating", &n, e))?;
            Ok(LocalWriter {
                file: Some(Arc::new(file)),
                tmp,
                path,
                name: n,
                len: 0,
            })
        })
        .await
    }

    async fn put(&self, name: &str, data: Vec<u8>) -> Result<(), SinkError> {
        let path = self.path(name)?;
        let n = name.to_string();
        blocking("writing", name, move || write_atomic(&path, &n, &data)).await
    }

    async fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, SinkError> {
        let path = self.path(name)?;
        let n = name.to_string();
        let want = usize::try_from(len).map_err(|_| SinkError::TooLarge {
            name: n.clone(),
            len,
            max: usize::MAX as u64,
        })?;
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
            let mut buf = vec![0u8; want];
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
}

/// Writer of one object in a [`LocalSink`].
#[derive(Debug)]
pub struct LocalWriter {
    file: Option<Arc<File>>,
    tmp: PathBuf,
    path: PathBuf,
    name: String,
    len: u64,
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
    async fn append(&mut self, data: Vec<u8>) -> Result<Vec<u8>, SinkError> {
        let file = self.file.clone().ok_or(SinkError::Io {
            op: "appending to",
            name: self.name.clone(),
            source: std::io::ErrorKind::NotConnected.into(),
        })?;
        let offset = self.len;
        let n = self.name.clone();
        let len = data.len() as u64;
        let data = blocking("writing", &self.name, move || {
            file.write_all_at(&data, offset)
                .map_err(|e| SinkError::io("writing", &n, e))?;
            Ok(data)
        })
        .await?;
        self.len += len;
        Ok(data)
    }

    fn len(&self) -> u64 {
        self.len
    }

    async fn finish(mut self) -> Result<(), SinkError> {
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
        self.file.take();
        let tmp = self.tmp.clone();
        let _ = tokio::task::spawn_blocking(move || fs::remove_file(tmp)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn objects_appear_only_when_finished_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = LocalSink::open(dir.path()).expect("open");
        let mut w = sink.create("disks/d/segments/a.seg").await.expect("create");
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
            l,
            vec![
                ObjectInfo {
                    name: "disks/d/backups/b.manifest".into(),
                    len: 1
                },
                ObjectInfo {
                    name: "disks/d/segments/a.seg".into(),
                    len: 11
                },
            ]
        );
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

    #[tokio::test]
    async fn aborted_and_dropped_writers_leave_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = LocalSink::open(dir.path()).expect("open");
        let mut w = sink.create("x/a").await.expect("create");
        w.append(vec![1; 10]).await.expect("append");
        w.abort().await;
        let mut w = sink.create("x/b").await.expect("create");
        w.append(vec![1; 10]).await.expect("append");
        drop(w);
        let left: Vec<_> = fs::read_dir(dir.path().join("x")).expect("dir").collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
