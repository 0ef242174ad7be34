//! The local sink's guarantees that keep committed backups safe: create-only writes that no
//! racing writer can get round, private modes, durable directories, and temporary files that
//! are collected only once no live writer can own them. Run against both I/O backends.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use libcbt::sink::local::{Backend, LocalSink};
use libcbt::sink::{ObjectWriter, Sink, SinkError};

fn sinks(dir: &std::path::Path) -> Vec<(Backend, LocalSink)> {
    [Backend::Std, Backend::Uring]
        .into_iter()
        .map(|b| {
            let root = dir.join(format!("{b:?}"));
            (b, LocalSink::open_with(&root, Some(b)).expect("sink"))
        })
        .collect()
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(p)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_new_never_replaces_and_exactly_one_racer_wins() {
    let dir = tempfile::tempdir().expect("tmp");
    for (b, sink) in sinks(dir.path()) {
        let name = "disks/d/backups/b1.manifest";
        sink.put_new(name, b"first".to_vec()).await.expect("create");
        let e = sink
            .put_new(name, b"second".to_vec())
            .await
            .expect_err("taken");
        assert!(matches!(e, SinkError::Exists { .. }), "{b:?}: {e:?}");
        assert_eq!(sink.get(name, 100).await.expect("get"), b"first");
        // 16 writers race for one name: one wins, the others are told, nothing is mixed.
        let race = "disks/d/backups/b2.idx";
        let mut tasks = Vec::new();
        for i in 0..16u8 {
            let s = sink.clone();
            tasks.push(tokio::spawn(async move {
                s.put_new(race, vec![i; 4096]).await.map(|()| i)
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            match t.await.expect("task") {
                Ok(i) => winners.push(i),
                Err(SinkError::Exists { .. }) => {}
                Err(e) => panic!("{b:?}: {e:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "{b:?}: {winners:?}");
        assert_eq!(
            sink.get(race, 1 << 20).await.expect("get"),
            vec![winners[0]; 4096]
        );
        // No temporary file of the losers is left.
        let left: Vec<_> = std::fs::read_dir(sink.root().join("disks/d/backups"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(left.iter().all(|n| !n.starts_with('.')), "{b:?}: {left:?}");
        // put (replace) is still there for what may be rewritten.
        sink.put(name, b"third".to_vec()).await.expect("put");
        assert_eq!(sink.get(name, 100).await.expect("get"), b"third");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(unsafe_code)]
async fn objects_are_private_whatever_the_umask() {
    // A permissive umask, as a daemon started by hand may have.
    // SAFETY: umask is process-wide and this binary's tests only create files the same way.
    let old = unsafe { libc::umask(0o022) };
    let dir = tempfile::tempdir().expect("tmp");
    for (b, sink) in sinks(dir.path()) {
        sink.put("disks/d/backups/b.idx", vec![1])
            .await
            .expect("put");
        sink.put_new("disks/d/backups/b.manifest", vec![1])
            .await
            .expect("put_new");
        let mut w = sink.create("disks/d/segments/s.seg").await.expect("create");
        w.append(vec![7; 10_000]).await.expect("append");
        w.finish().await.expect("finish");
        for f in [
            "disks/d/backups/b.idx",
            "disks/d/backups/b.manifest",
            "disks/d/segments/s.seg",
        ] {
            assert_eq!(mode(&sink.root().join(f)), 0o600, "{b:?} {f}");
        }
        for d in [
            "",
            "disks",
            "disks/d",
            "disks/d/backups",
            "disks/d/segments",
        ] {
            assert_eq!(mode(&sink.root().join(d)), 0o700, "{b:?} {d:?}");
        }
    }
    unsafe { libc::umask(old) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_temporary_files_are_collected_after_the_grace_period_only() {
    let dir = tempfile::tempdir().expect("tmp");
    let outside = dir.path().join("outside-file");
    std::fs::write(&outside, b"not the sink's").expect("write");
    for (b, sink) in sinks(dir.path()) {
        let seg_dir = sink.root().join("disks/d/segments");
        std::fs::create_dir_all(&seg_dir).expect("mkdir");
        let old = seg_dir.join(".cbt-tmp-1-0-dead.seg");
        let young = seg_dir.join(".cbt-tmp-1-1-live.seg");
        std::fs::write(&old, b"x").expect("write");
        std::fs::write(&young, b"x").expect("write");
        let two_days = SystemTime::now() - Duration::from_secs(2 * 86_400);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .expect("open")
            .set_modified(two_days)
            .expect("mtime");
        // A symlink with a temporary file's name is neither followed nor removed.
        let link = seg_dir.join(".cbt-tmp-1-2-link.seg");
        std::os::unix::fs::symlink(&outside, &link).expect("symlink");
        // A live writer's partial object.
        let mut w = sink.create("disks/d/segments/w.seg").await.expect("create");
        w.append(vec![1; 100]).await.expect("append");
        let n = sink
            .remove_stale_partials(Duration::from_secs(86_400))
            .await
            .expect("collect");
        assert_eq!(n, 1, "{b:?}");
        assert!(!old.exists(), "{b:?}");
        assert!(young.exists(), "{b:?}");
        assert!(std::fs::symlink_metadata(&link).is_ok(), "{b:?}");
        assert!(outside.exists());
        // The live writer still finishes.
        w.finish().await.expect("finish");
        assert_eq!(
            sink.get("disks/d/segments/w.seg", 1000)
                .await
                .expect("get")
                .len(),
            100
        );
        // The listing carries the age that garbage collection judges by.
        let l = sink.list("disks/d/segments/").await.expect("list");
        assert!(
            l.iter()
                .all(|o| o.modified.is_some_and(|m| m <= SystemTime::now())),
            "{l:?}"
        );
    }
}
