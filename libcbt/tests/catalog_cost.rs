//! What the catalog costs on an object store, counted by the server (SeaweedFS's own request
//! counters, not our client): finding a disk's newest backup and listing the disks take the
//! same few requests after 4 backups and after 24, and a backup job's requests are reported.
//! One test: the counters are the server's, so nothing else may run against it meanwhile.

mod common;

use libcbt::sink::Sink;

use common::lab::{guest_writes, restore_matches, Lab};
use common::s3::seaweed;
use common::{rng, seed};
use libcbt::engine::{catalog, BackupOptions};
use libcbt::job;
use libcbt::source::qemu::Requested;

const SIZE: u64 = 8 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_backup_and_disk_list_cost_the_same_whatever_the_history() {
    let mut r = rng(seed("catalog_cost"));
    let lab = Lab::new(&[("d0", "qcow2"), ("d1", "qcow2")], SIZE).await;
    let sw = seaweed().await;
    let sink = sw.sink(&format!("cost-{}", std::process::id())).await;
    let specs = lab.specs("vm-");
    let mut costs = Vec::new();
    let mut job_requests = Vec::new();
    for round in 0..24 {
        for l in &lab.live {
            guest_writes(l, &mut r, 4).await;
        }
        let id = format!("c{round:02}");
        let (res, by, total) = sw
            .count(job::backup_qemu(
                &lab.source,
                &sink,
                &id.parse().expect("valid backup id"),
                &specs,
                Requested::Auto,
                &BackupOptions::default(),
            ))
            .await;
        res.expect("backup");
        job_requests.push((round, total, by));
        if round == 3 || round == 23 {
            let (m, by_latest, latest) = sw.count(catalog::latest(&sink, "vm-d0")).await;
            let m = m.expect("latest").expect("a backup");
            assert_eq!(m.backup_id, id, "the newest backup");
            let (disks, by_disks, list) = sw.count(catalog::list_disks(&sink)).await;
            assert_eq!(disks.expect("disks"), ["vm-d0", "vm-d1"]);
            eprintln!(
                "after {} backups: latest {latest} requests {by_latest:?}, list_disks {list} {by_disks:?}",
                round + 1
            );
            costs.push((latest, list));
        }
    }
    // Two listings (the recency entries; the newest backup's generations) and one manifest
    // read; one delimiter listing.
    assert_eq!(costs[0], (3, 1), "after 4 backups");
    assert_eq!(costs[1], costs[0], "the cost grew with the history");
    for (round, total, by) in &job_requests {
        eprintln!("backup job {round}: {total} requests {by:?}");
    }
    // Garbage collection deletes in batches: 300 orphan segments of a disk, a handful of
    // requests (listings and one DeleteObjects), not 300 DELETEs.
    let orphans: Vec<String> = (0..300u32)
        .map(|i| format!("disks/vm-orphan/segments/{:032x}.seg", 0xabc0_0000 + i))
        .collect();
    for n in &orphans {
        sink.put(n, vec![1]).await.expect("orphan");
    }
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let (gone, by_gc, gc) = sw
        .count(catalog::collect_garbage(
            &sink,
            "vm-orphan",
            std::time::Duration::from_millis(1),
        ))
        .await;
    assert_eq!(gone.expect("gc").len(), 300);
    eprintln!("garbage collection of 300 orphans: {gc} requests {by_gc:?}");
    assert!(gc <= 8, "{gc} requests: {by_gc:?}");
    assert!(sink
        .list("disks/vm-orphan/")
        .await
        .expect("list")
        .is_empty());
    // The newest restores exactly from the bucket (what was found is what was written).
    let reference = lab.path("ref-last.raw");
    lab.reference(0, &reference);
    restore_matches(&sink, "vm-d0", "c23", &reference).await;
}
