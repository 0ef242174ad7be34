//! The NBD client against real servers: qemu-storage-daemon, qemu-nbd and nbdkit, started by
//! the tests. Oracles are `qemu-img convert` (data) and `nbdinfo --map` (maps).

mod common;

use std::time::Duration;

use common::*;
use libcbt::nbd::proto::errno;
use libcbt::nbd::{self, Client, ConnectOptions, ErrorKind};
use rand::Rng;

/// Reads the whole export in `chunk`-sized pieces, many in flight.
async fn read_all(client: &Client, chunk: u64) -> Vec<u8> {
    let size = client.size();
    let mut set = tokio::task::JoinSet::new();
    let mut off = 0;
    while off < size {
        let len = chunk.min(size - off);
        let c = client.clone();
        set.spawn(async move { (off, c.read(off, vec![0xee; len as usize]).await) });
        off += len;
    }
    let mut image = vec![0u8; size as usize];
    while let Some(r) = set.join_next().await {
        let (off, data) = r.expect("read task");
        let data = data.unwrap_or_else(|e| panic!("read at {off:#x}: {e:?}"));
        image[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    image
}

/// Random reads at 4 KiB-aligned offsets and lengths, compared with the reference.
async fn random_reads_match(
    client: &Client,
    reference: &[u8],
    rng: &mut rand::rngs::SmallRng,
    n: usize,
) {
    let size = reference.len() as u64;
    for _ in 0..n {
        let len = rng.gen_range(1..=256u64) * 4096;
        let off = rng.gen_range(0..=(size - len) / 4096) * 4096;
        let got = client
            .read(off, vec![0xaa; len as usize])
            .await
            .expect("random read");
        assert!(
            got == reference[off as usize..(off + len) as usize],
            "mismatch at {off:#x}+{len:#x}"
        );
        // The same range into a longer, reused buffer: only its prefix is the read, and
        // the tail stays as it was.
        let tail = rng.gen_range(1..=8192usize);
        let got = client
            .read_into(off, len, vec![0x5c; len as usize + tail])
            .await
            .expect("read_into");
        assert_eq!(got.len(), len as usize + tail, "buffer given back whole");
        assert!(
            got[..len as usize] == reference[off as usize..(off + len) as usize],
            "read_into mismatch at {off:#x}+{len:#x}"
        );
        assert!(
            got[len as usize..].iter().all(|b| *b == 0x5c),
            "tail touched"
        );
    }
    // A buffer shorter than the read is refused before anything is sent.
    assert!(client.read_into(0, 8192, vec![0; 4096]).await.is_err());
}

fn assert_same_image(ours: &[u8], reference: &[u8], what: &str) {
    assert_eq!(ours.len(), reference.len(), "{what}: size");
    if let Some(i) = ours.iter().zip(reference).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i:#x}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_equal_qemu_img_convert_for_qsd_and_qemu_nbd() {
    let seed = seed("reads_equal_qemu_img_convert");
    let mut rng = rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("src.raw");
    let img = dir.path().join("disk.qcow2");
    random_raw(&raw, 96 << 20, 120, &mut rng);
    run(std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&img));
    let reference = convert_to_raw(
        img.to_str().expect("utf8 path"),
        "qcow2",
        &dir.path().join("ref.raw"),
    );

    {
        let d = qsd(dir.path(), &img, &[]);
        let client = Client::connect(&d.uri("vda")).await.expect("connect qsd");
        assert_eq!(client.size(), reference.len() as u64);
        assert!(
            client.info().can_multi_conn(),
            "qsd exports advertise CAN_MULTI_CONN"
        );
        assert_eq!(client.connections(), 4);
        assert_same_image(
            &read_all(&client, 1 << 20).await,
            &reference,
            "qsd, 1 MiB reads",
        );
        random_reads_match(&client, &reference, &mut rng, 200).await;
        client.disconnect().await;
    }
    {
        let (_d, uri) = qemu_nbd_tcp(&img, "qcow2");
        let client = Client::connect(&uri)
            .await
            .expect("connect qemu-nbd over TCP");
        assert_eq!(client.connections(), 4);
        assert_same_image(
            &read_all(&client, 2 << 20).await,
            &reference,
            "qemu-nbd over TCP",
        );
    }
    {
        let d = qemu_nbd(dir.path(), &img, "qcow2", None);
        let opts = ConnectOptions {
            connections: 2,
            max_in_flight: 8,
            ..ConnectOptions::default()
        };
        let client = Client::connect_with(&d.uri(""), &opts)
            .await
            .expect("connect qemu-nbd");
        assert_eq!(client.connections(), 2);
        assert_same_image(
            &read_all(&client, 4 << 20).await,
            &reference,
            "qemu-nbd, 4 MiB reads",
        );
        random_reads_match(&client, &reference, &mut rng, 200).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_sparse_random_reads_equal_qemu_img_convert() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = nbdkit(
        dir.path(),
        &["sparse-random", "size=64M", "seed=4242", "percent=30"],
    );
    let reference = convert_to_raw(&d.uri(""), "raw", &dir.path().join("ref.raw"));
    let client = Client::connect(&d.uri("")).await.expect("connect nbdkit");
    assert_same_image(
        &read_all(&client, 1 << 20).await,
        &reference,
        "sparse-random",
    );
    // A structured read of a range with holes still yields exact bytes.
    let mut rng = rng(seed("nbdkit_sparse_random"));
    random_reads_match(&client, &reference, &mut rng, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_zeroes_and_trims_on_nbdkit_memory_read_back_through_qemu_img() {
    let mut rng = rng(seed("nbdkit_memory_writes"));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = nbdkit(dir.path(), &["memory", "size=32M"]);
    let client = Client::connect(&d.uri(""))
        .await
        .expect("connect nbdkit memory");
    assert!(!client.info().read_only());
    let size = client.size();
    let mut model = vec![0u8; size as usize];
    for _ in 0..150 {
        let len = rng.gen_range(1..=64u64) * 4096;
        let off = rng.gen_range(0..=(size - len) / 4096) * 4096;
        let range = off as usize..(off + len) as usize;
        match rng.gen_range(0..4) {
            0 => {
                client
                    .write_zeroes(off, len, rng.gen_bool(0.5))
                    .await
                    .expect("write zeroes");
                model[range].fill(0);
            }
            1 => {
                // nbdkit memory reads trimmed ranges back as zeroes.
                client.trim(off, len).await.expect("trim");
                model[range].fill(0);
            }
            _ => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data[..]);
                model[range].copy_from_slice(&data);
                client
                    .write(off, data, rng.gen_bool(0.2))
                    .await
                    .expect("write");
            }
        }
    }
    client.flush().await.expect("flush");
    assert_same_image(&read_all(&client, 1 << 20).await, &model, "our reads");
    let reference = convert_to_raw(&d.uri(""), "raw", &dir.path().join("ref.raw"));
    assert_same_image(&reference, &model, "qemu-img convert of what we wrote");
}

/// Writes random patterns into a qcow2 with a bitmap, then compares the three maps QEMU
/// exports with `nbdinfo --map` for both qemu-storage-daemon and qemu-nbd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_equal_nbdinfo_on_randomized_writes() {
    let seed = seed("maps_equal_nbdinfo");
    let mut rng = rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.qcow2");
    let size = 1u64 << 30;
    qcow2_create(&img, size, 65536);
    // Some data before the bitmap exists: allocated but not dirty.
    let mut cmds = String::new();
    for _ in 0..40 {
        let off = rng.gen_range(0..size / 4096 - 256) * 4096;
        cmds += &format!(
            "write -q -P 0x5a {off} {}\n",
            rng.gen_range(1..=256u64) * 4096
        );
    }
    qemu_io(&img, "qcow2", &cmds);
    bitmap_add(&img, "bm0", 65536);
    let mut cmds = String::new();
    for _ in 0..300 {
        let len = rng.gen_range(1..=128u64) * 512;
        let off = rng.gen_range(0..(size - len) / 512) * 512;
        cmds += &match rng.gen_range(0..6) {
            0 => format!("write -q -z {off} {len}\n"),
            1 => format!("discard -q {off} {len}\n"),
            _ => format!("write -q -P {} {off} {len}\n", rng.gen_range(1..=255)),
        };
    }
    qemu_io(&img, "qcow2", &cmds);
    bitmap_disable(&img, "bm0");

    let bitmap_ctx = nbd::dirty_bitmap_context("bm0");
    let contexts = [
        nbd::BASE_ALLOCATION,
        bitmap_ctx.as_str(),
        nbd::QEMU_ALLOCATION_DEPTH,
    ];
    for server in ["qemu-storage-daemon", "qemu-nbd"] {
        let d = if server == "qemu-nbd" {
            qemu_nbd(dir.path(), &img, "qcow2", Some("bm0"))
        } else {
            qsd(dir.path(), &img, &["bm0"])
        };
        let uri = d.uri(if server == "qemu-nbd" { "" } else { "vda" });
        let listed = nbd::list_meta_contexts(&uri, &[])
            .await
            .expect("list contexts");
        for c in contexts {
            assert!(
                listed.iter().any(|l| l == c),
                "{server} does not list {c}: {listed:?}"
            );
        }
        // nbdinfo first: qemu-nbd --shared=4 has no room for it once our 4 connections are up.
        let theirs: Vec<_> = contexts
            .iter()
            .map(|c| coalesce(nbdinfo_map(&uri, c)))
            .collect();
        let client = Client::connect_with(&uri, &ConnectOptions::with_contexts(contexts))
            .await
            .expect("connect");
        for (c, theirs) in contexts.iter().zip(theirs) {
            assert!(client.info().has_context(c), "{server} did not grant {c}");
            let ours = client.map(c, 0..size).await.expect("map");
            let ours = coalesce(ours.iter().map(|e| (e.start, e.len(), e.flags)));
            assert_eq!(ours, theirs, "{server} {c} (seed {seed})");
        }
        // The dirty map is not trivial: the writes above made it dirty somewhere.
        let dirty = client.map(&bitmap_ctx, 0..size).await.expect("map");
        assert!(
            dirty.iter().any(|e| e.flags == nbd::DIRTY),
            "no dirty extent at all"
        );
    }
}

/// A dirty map of more than 131,072 extents (QEMU's cap per reply) on a disk larger than one
/// block-status request can cover: several round trips, still equal to nbdinfo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_needing_several_round_trips_equals_nbdinfo() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("big.qcow2");
    let size = 10u64 << 30;
    qcow2_create(&img, size, 65536);
    bitmap_add(&img, "bm0", 512);
    let mut cmds = String::with_capacity(140_000 * 32);
    for i in 0..70_000u64 {
        cmds += &format!("write -q -P 0x11 {} 512\n", i * 1024);
    }
    // Beyond the first 4 GiB request, too.
    for i in 0..2000u64 {
        cmds += &format!("write -q -P 0x22 {} 512\n", (6u64 << 30) + i * 1_048_576);
    }
    qemu_io(&img, "qcow2", &cmds);
    bitmap_disable(&img, "bm0");
    let d = qsd(dir.path(), &img, &["bm0"]);
    let uri = d.uri("vda");
    let ctx = nbd::dirty_bitmap_context("bm0");
    let client = Client::connect_with(&uri, &ConnectOptions::with_contexts([ctx.as_str()]))
        .await
        .expect("connect");
    // One request over the first 4 GiB is answered short: the cap applies.
    let one = client
        .block_status(&ctx, 0, !0xffff)
        .await
        .expect("block status");
    assert!(
        one.len() <= 131_072,
        "server sent {} extents in one reply",
        one.len()
    );
    assert!(
        one.last().expect("extents").end < 140_000 * 1024,
        "reply was not short"
    );
    let ours = client.map(&ctx, 0..size).await.expect("map");
    assert_eq!(
        ours.iter().filter(|e| e.flags == nbd::DIRTY).count(),
        72_000
    );
    let ours = coalesce(ours.iter().map(|e| (e.start, e.len(), e.flags)));
    assert_eq!(ours, coalesce(nbdinfo_map(&uri, &ctx)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_error_filter_surfaces_typed_server_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = nbdkit(
        dir.path(),
        &[
            "--filter=error",
            "memory",
            "size=16M",
            "error-pread=EIO",
            "error-pread-rate=100%",
            "error-pwrite=ENOSPC",
            "error-pwrite-rate=100%",
        ],
    );
    let client = Client::connect(&d.uri("")).await.expect("connect");
    let e = client
        .read(0, vec![0; 65536])
        .await
        .expect_err("read must fail");
    assert_eq!(e.kind(), ErrorKind::Server, "{e:?}");
    assert_eq!(e.errno(), Some(errno::EIO));
    let e = client
        .write(4096, vec![1; 4096], false)
        .await
        .expect_err("write must fail");
    assert_eq!(e.errno(), Some(errno::ENOSPC), "{e:?}");
    // A server error does not break the connection.
    client.flush().await.expect("flush still works");
    let e = client
        .read(8192, vec![0; 4096])
        .await
        .expect_err("read must fail");
    assert_eq!(e.errno(), Some(errno::EIO));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_fails_every_pending_request_promptly() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Each read takes 2 s, so requests are surely in flight when the server dies.
    let mut d = nbdkit(
        dir.path(),
        &["--filter=delay", "memory", "size=64M", "rdelay=2"],
    );
    let opts = ConnectOptions {
        connections: 2,
        max_in_flight: 4,
        ..ConnectOptions::default()
    };
    let client = Client::connect_with(&d.uri(""), &opts)
        .await
        .expect("connect");
    let mut set = tokio::task::JoinSet::new();
    for i in 0..32u64 {
        let c = client.clone();
        set.spawn(async move { c.read(i << 20, vec![0; 1 << 20]).await });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.kill();
    // A hang would be the bug; the timeout only turns it into a failure.
    let all = tokio::time::timeout(Duration::from_secs(30), async {
        let mut n = 0;
        while let Some(r) = set.join_next().await {
            let e = r
                .expect("task")
                .expect_err("read after server death must fail");
            assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e:?}");
            assert_eq!(e.root_cause().kind(), ErrorKind::Io, "{e:?}");
            n += 1;
        }
        n
    })
    .await
    .expect("pending requests hung after the server was killed");
    assert_eq!(all, 32);
    let e = client
        .read(0, vec![0; 4096])
        .await
        .expect_err("later request must fail");
    assert_eq!(e.kind(), ErrorKind::ConnectionLost);
}
