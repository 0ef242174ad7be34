//! The QMP client against a real qemu-storage-daemon started by the test.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use libcbt::qmp::{self, Qmp, QmpError};
use serde_json::{json, Value};

fn qsd_with_monitor(dir: &std::path::Path) -> (Daemon, std::path::PathBuf) {
    let img = dir.join("d.qcow2");
    qcow2_create(&img, 64 << 20, 65536);
    let sock = dir.join("qmp.sock");
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--chardev")
        .arg(format!(
            "socket,id=m0,path={},server=on,wait=off",
            sock.display()
        ))
        .args(["--monitor", "chardev=m0"])
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            img.display()
        ))
        .args(["--blockdev", "driver=qcow2,node-name=d0,file=f0"]);
    let d = Daemon::start("qemu-storage-daemon", cmd, &sock);
    (d, sock)
}

fn bitmaps_of(nodes: &Value, node: &str) -> Vec<Value> {
    nodes
        .as_array()
        .expect("node list")
        .iter()
        .find(|n| n["node-name"] == node)
        .and_then(|n| n["dirty-bitmaps"].as_array().cloned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_errors_transactions_and_events_against_qsd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_d, sock) = qsd_with_monitor(dir.path());
    let q = Qmp::connect(&sock).await.expect("connect");
    assert_eq!(
        (q.version().major, q.version().minor),
        (7, 2),
        "HOST-NOTES facts are for QEMU 7.2"
    );

    // A typed error with its class.
    let e = q
        .run("no-such-command", Value::Null)
        .await
        .expect_err("must fail");
    assert_eq!(e.class(), Some("CommandNotFound"), "{e:?}");
    let e = q
        .run(
            "block-dirty-bitmap-add",
            json!({"node": "nope", "name": "x"}),
        )
        .await
        .expect_err("must fail");
    assert!(matches!(e, QmpError::Command { .. }), "{e:?}");

    // A transaction: two bitmaps at once, one disabled.
    q.run(
        "block-dirty-bitmap-add",
        json!({"node": "d0", "name": "bm0", "persistent": true, "granularity": 65536}),
    )
    .await
    .expect("bitmap add");
    q.transaction(&[
        (
            "block-dirty-bitmap-add",
            json!({"node": "d0", "name": "bm1", "persistent": true, "granularity": 65536}),
        ),
        (
            "block-dirty-bitmap-disable",
            json!({"node": "d0", "name": "bm0"}),
        ),
    ])
    .await
    .expect("transaction");
    let nodes: Value = q
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .expect("query");
    let bms = bitmaps_of(&nodes, "d0");
    let recording = |name: &str| {
        bms.iter()
            .find(|b| b["name"] == name)
            .map(|b| b["recording"].as_bool())
    };
    assert_eq!(recording("bm0"), Some(Some(false)));
    assert_eq!(recording("bm1"), Some(Some(true)));
    // A failing transaction changes nothing.
    let e = q
        .transaction(&[
            (
                "block-dirty-bitmap-add",
                json!({"node": "d0", "name": "bm2"}),
            ),
            (
                "block-dirty-bitmap-add",
                json!({"node": "d0", "name": "bm1"}),
            ),
        ])
        .await
        .expect_err("duplicate name");
    assert_eq!(e.class(), Some("GenericError"));
    let nodes: Value = q
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .expect("query");
    assert_eq!(
        bitmaps_of(&nodes, "d0").len(),
        2,
        "bm2 must not exist after the failed transaction"
    );

    // Events arrive on a subscription made before the command.
    let nbd = dir.path().join("nbd.sock");
    q.run(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
    )
    .await
    .expect("nbd server");
    q.run(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "d0", "writable": false}),
    )
    .await
    .expect("export");
    let mut sub = q.events();
    q.run("block-export-del", json!({"id": "e0"}))
        .await
        .expect("export del");
    let ev = qmp::wait_event(
        &mut sub,
        "BLOCK_EXPORT_DELETED",
        Duration::from_secs(10),
        |d| d["id"] == "e0",
    )
    .await
    .expect("event");
    assert_eq!(ev.data["id"], "e0");

    // Many commands in flight at once all get their own answers.
    let q = std::sync::Arc::new(q);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let q = q.clone();
        set.spawn(async move {
            q.execute::<_, Value>("query-block-exports", Value::Null)
                .await
        });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.expect("task").expect("query"), json!([]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_fail_promptly_when_qemu_dies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut d, sock) = qsd_with_monitor(dir.path());
    let q = Qmp::connect(&sock).await.expect("connect");
    d.kill();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        q.run("query-block-exports", Value::Null),
    )
    .await
    .expect("command hung after QEMU died");
    assert!(
        matches!(r, Err(QmpError::Disconnected) | Err(QmpError::Io { .. })),
        "{r:?}"
    );
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        q.run("query-block-exports", Value::Null),
    )
    .await
    .expect("command hung after QEMU died");
    assert!(r.is_err());
}
