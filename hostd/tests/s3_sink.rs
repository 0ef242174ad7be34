//! `cbt-hostd` with an object-store sink on a real SeaweedFS, Ceph RGW or Swift with Keystone (started by
//! this binary): backups of a libvirt domain into the bucket through the API, and disaster recovery from the bucket
//! alone: a second daemon with an empty state directory and only the sink's configuration
//! lists the backups, restores each into a file (checked with `qemu-img compare`) and into a
//! staging domain that runs, verifies the chain, and deletes a backup. A sink with wrong
//! credentials is reported unavailable without its secret showing anywhere.

mod support;

use hostd::client::{Client, Endpoint};
use hostd::config::token_hash;
use libcbt::engine::catalog;
use libcbt::format::Manifest;
use libcbt::sink::any::AnySink;
use libcbt::sink::swift::SwiftSink;
use libcbt::sink::Sink;
use serde_json::json;
use std::process::Command;
use support::common::lab::{assert_sink_holds_only, compare};
use support::common::s3::{ceph, seaweed, S3Server};
use support::common::swift::{swift, SwiftServer};
use support::common::{rng, seed};
use support::*;

const ADMIN: &str = "admin-token-s3-0123456789";
const WRONG_SECRET: &str = "wrong-secret-7c1e9d";

/// An object store the test runs on.
#[derive(Clone, Copy)]
enum Remote {
    S3(&'static S3Server),
    Swift(&'static SwiftServer),
}

impl Remote {
    /// The secret that must never show.
    fn secret(&self) -> &str {
        match self {
            Remote::S3(sw) => &sw.secret_key,
            Remote::Swift(sw) => &sw.key,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Remote::S3(sw) if sw.metrics.is_some() => "s3dr-sw",
            Remote::S3(_) => "s3dr-ceph",
            Remote::Swift(_) => "s3dr-swift",
        }
    }

    /// The sink as the test reads it, beside the daemon.
    async fn sink(&self, prefix: &str) -> AnySink {
        match self {
            Remote::S3(sw) => AnySink::S3(sw.sink(prefix).await),
            Remote::Swift(sw) => AnySink::Swift(
                SwiftSink::open(&sw.keystone_config("alice", prefix))
                    .await
                    .expect("open the Keystone sink"),
            ),
        }
    }

    /// A `[[sink]]` named `name` under `prefix`, with the credentials file `cred` holding
    /// `secret`.
    fn sink_toml(&self, name: &str, prefix: &str, cred: &std::path::Path, secret: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let (text, body) = match self {
            Remote::S3(sw) => (
                format!("access_key = {}\nsecret_key = {secret}\n", sw.access_key),
                format!(
                    "type = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\npart_size_mib = 5\n",
                    sw.endpoint, sw.bucket
                ),
            ),
            // Keystone v3 (a member of project `cbt`), the endpoint from the token's catalog.
            Remote::Swift(sw) => (
                format!("password = {secret}\n"),
                format!(
                    "type = \"swift\"\nauth_url = \"{}\"\nuser = \"alice\"\n\
                     user_domain = \"Default\"\nproject = \"cbt\"\nproject_domain = \"Default\"\n\
                     region = \"RegionOne\"\ncontainer = \"{}\"\nsegment_size_mib = 5\n",
                    sw.keystone, sw.container
                ),
            ),
        };
        std::fs::write(cred, text).expect("credentials");
        std::fs::set_permissions(cred, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        format!(
            "[[sink]]\nname = \"{name}\"\nprefix = \"{prefix}\"\ncredentials_file = \"{}\"\n{body}\n",
            cred.display()
        )
    }
}

/// A daemon config with the store as sink `obj` and a sink `bad` with a wrong secret.
fn config(remote: Remote, prefix: &str, creds_dir: &std::path::Path) -> String {
    let good = remote.sink_toml("obj", prefix, &creds_dir.join("good.cred"), remote.secret());
    let bad = remote.sink_toml("bad", "bad", &creds_dir.join("bad.cred"), WRONG_SECRET);
    format!(
        r#"[server]
unix_socket = "{{dir}}/hostd.sock"
state_dir = "{{dir}}/state"
restore_dirs = ["{{dir}}/restores"]

{good}
{bad}
[[token]]
name = "admin"
sha256 = "{hash}"
admin = true
"#,
        hash = token_hash(ADMIN),
    )
}

#[test]
fn seaweedfs_backups_and_disaster_recovery_from_the_bucket_alone() {
    let rt = rt();
    let sw = rt.block_on(seaweed());
    backups_and_disaster_recovery(&rt, Remote::S3(sw));
}

#[test]
fn ceph_rgw_backups_and_disaster_recovery_from_the_bucket_alone() {
    let rt = rt();
    let sw = rt.block_on(ceph());
    backups_and_disaster_recovery(&rt, Remote::S3(sw));
}

#[test]
fn swift_keystone_backups_and_disaster_recovery_from_the_container_alone() {
    let rt = rt();
    let sw = rt.block_on(async {
        let sw = swift().await;
        sw.keystone_up().await;
        sw
    });
    backups_and_disaster_recovery(&rt, Remote::Swift(sw));
}

/// Instant recovery of a real guest: a busybox guest (Debian kernel, qemu-ga) that writes
/// its disk continuously is backed up to a directory sink and to SeaweedFS; from each, an
/// instant copy (qcow2 overlay on the daemon's NBD export of the backup) starts, its guest
/// agent answers, and the guest's own writes land in the overlay while what it does not write
/// is read from the backup.
#[test]
fn a_guest_boots_and_writes_from_its_backup_in_a_directory_and_on_seaweedfs() {
    let rt = rt();
    let sw = rt.block_on(seaweed());
    let _g = serial();
    let t = std::time::Instant::now();
    let dom = guest("boot", "");
    let own_boot = t.elapsed();
    let remote = Remote::S3(sw);
    let prefix = format!("boot-{}-{}", std::process::id(), dom.name);
    let creds = shared_dir();
    let cfg = format!(
        "{}\n[[sink]]\nname = \"dir\"\npath = \"{{dir}}/sink\"\n",
        config(remote, &prefix, creds.path())
    );
    let h = Hostd::start(&cfg);
    let c = Client::new(Endpoint::Unix(h.socket()), Some(ADMIN.into()));
    for sink in ["dir", "obj"] {
        let last = run_job(
            &rt,
            &c,
            "/v1/backups",
            Some(json!({"instance": dom.name, "sink": sink, "level": "full"})),
        );
        assert_eq!(last["state"], "succeeded", "{last}\n{}", h.log());
        let backup = last["backup_id"].as_str().expect("backup id").to_string();
        let copy = format!("{}-{sink}", dom.name);
        let t = std::time::Instant::now();
        let last = run_job(
            &rt,
            &c,
            "/v1/restores",
            Some(
                json!({"instance": dom.name, "sink": sink, "backup_id": backup,
                "target": {"type": "domain", "name": copy, "start": true, "instant": true}}),
            ),
        );
        assert_eq!(last["state"], "succeeded", "{last}\n{}", h.log());
        let started = t.elapsed();
        let mount = last["result"]["mount"].as_str().expect("mount").to_string();
        // The guest is up: its agent (started by its init from the initramfs) answers.
        while !virsh_ok(&["qemu-agent-command", &copy, r#"{"execute":"guest-ping"}"#]) {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(180),
                "the copy's agent never answered\n{}",
                h.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        let agent = t.elapsed();
        // And writes: its random 64 KiB blocks land in the overlay (depth 0), more and more.
        let img = h.dir.path().join("restores").join(&copy).join("vda.qcow2");
        let written = || -> usize {
            let out = Command::new("qemu-img")
                .args(["map", "-U", "--output=json"])
                .arg(&img)
                .output()
                .expect("qemu-img map");
            let map: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            map.as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["depth"] == 0 && e["data"] == true)
                .count()
        };
        let first = loop {
            let n = written();
            if n >= 1 {
                break n;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(240),
                "the copy never wrote"
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        };
        let wrote = t.elapsed();
        while written() <= first + 2 {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(300),
                "the copy stopped writing after {first} extents"
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        eprintln!(
            "instant copy from {sink}: started {:.2} s after the request, agent {:.2} s, \
             first write in the overlay {:.2} s (the original's own boot to its third write: {:.2} s)",
            started.as_secs_f64(),
            agent.as_secs_f64(),
            wrote.as_secs_f64(),
            own_boot.as_secs_f64()
        );
        virsh(&["destroy", &copy]);
        virsh(&["undefine", &copy]);
        let (s, v) = call(&rt, &c, "DELETE", &format!("/v1/mounts/{mount}"), None);
        assert_eq!(s, 200, "{v}");
    }
}

fn backups_and_disaster_recovery(rt: &tokio::runtime::Runtime, remote: Remote) {
    let _g = serial();
    let mut r = rng(seed("s3_dr"));
    let dom = Dom::bare(
        remote.name(),
        &[Disk {
            target: "vda",
            format: "qcow2",
            size: 64 * MIB,
        }],
    );
    let prefix = format!("dr-{}-{}", std::process::id(), dom.name);
    let creds = shared_dir();
    let cfg = config(remote, &prefix, creds.path());

    // --- the first host: two backups of the domain into the bucket ---
    let h1 = Hostd::start(&cfg);
    let c1 = Client::new(Endpoint::Unix(h1.socket()), Some(ADMIN.into()));
    let mut refs = Vec::new();
    for id in ["s1", "s2"] {
        dom.scatter("vda", 64 * MIB, 10, &mut r);
        let reference = dom.reference("vda", id);
        let last = run_job(
            rt,
            &c1,
            "/v1/backups",
            Some(json!({"instance": dom.name, "sink": "obj", "backup_id": id})),
        );
        assert_eq!(last["state"], "succeeded", "{last}\n{}", h1.log());
        refs.push((id, reference));
    }
    // The sink with the wrong secret: unavailable, said so, the secret nowhere.
    let (s, v) = call(rt, &c1, "GET", "/v1/backups?sink=bad", None);
    assert_eq!(s, 503, "{v}");
    assert!(!v.to_string().contains(WRONG_SECRET), "{v}");
    let failed = run_job(
        rt,
        &c1,
        "/v1/backups",
        Some(json!({"instance": dom.name, "sink": "bad"})),
    );
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(!failed.to_string().contains(WRONG_SECRET), "{failed}");
    let log1 = h1.log();
    drop(h1);
    assert!(log1.contains("sink unavailable"), "{log1}");
    assert!(
        !log1.contains(WRONG_SECRET) && !log1.contains(remote.secret()),
        "{log1}"
    );

    // The bucket holds exactly the two committed backups.
    let bucket = rt.block_on(remote.sink(&prefix));
    let disk = dom.disk_id("vda");
    let manifests: Vec<Manifest> = rt
        .block_on(catalog::list_backups(&bucket, &disk))
        .expect("catalog");
    assert_eq!(
        manifests
            .iter()
            .map(|m| m.backup_id.as_str())
            .collect::<Vec<_>>(),
        ["s1", "s2"]
    );
    rt.block_on(assert_sink_holds_only(
        &bucket,
        &manifests.iter().collect::<Vec<_>>(),
    ));

    // --- disaster recovery: a new host, an empty state directory, the sink's config only ---
    // (Hostd::start gives the daemon a directory of its own: its state directory is new.)
    let h2 = Hostd::start(&cfg);
    let c2 = Client::new(Endpoint::Unix(h2.socket()), Some(ADMIN.into()));
    let uuid = dom.uuid();
    let (s, v) = call(
        rt,
        &c2,
        "GET",
        &format!("/v1/backups?sink=obj&instance={uuid}"),
        None,
    );
    assert_eq!(s, 200, "{v}");
    let listed: Vec<&str> = v["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .filter_map(|b| b["backup_id"].as_str())
        .collect();
    assert_eq!(listed, ["s1", "s2"], "{v}");
    let restores = h2.dir.path().join("restores");
    for (id, reference) in &refs {
        let out = restores.join(format!("{id}.raw"));
        let last = run_job(
            rt,
            &c2,
            "/v1/restores",
            Some(json!({"instance": uuid, "sink": "obj", "backup_id": id,
                   "target": {"type": "file", "path": out}})),
        );
        assert_eq!(last["state"], "succeeded", "{last}\n{}", h2.log());
        compare(&out, reference);
    }
    let last = run_job(
        rt,
        &c2,
        "/v1/verifications",
        Some(json!({"instance": uuid, "sink": "obj", "backup_id": "s2"})),
    );
    assert_eq!(last["state"], "succeeded", "{last}");
    // A staging copy of the domain from the XML saved in the bucket, running.
    let staging = format!("{}-dr", dom.name);
    let last = run_job(
        rt,
        &c2,
        "/v1/restores",
        Some(json!({"instance": uuid, "sink": "obj", "backup_id": "s2",
               "target": {"type": "domain", "name": staging, "start": true}})),
    );
    assert_eq!(last["state"], "succeeded", "{last}\n{}", h2.log());
    assert!(virsh(&["domstate", &staging]).contains("running"));
    let _ = virsh_ok(&["destroy", &staging]);
    let _ = virsh_ok(&["undefine", &staging]);
    // Deleting the newest backup removes its objects from the bucket, and only those.
    let (s, v) = call(
        rt,
        &c2,
        "DELETE",
        &format!("/v1/backups/obj/s2?instance={uuid}"),
        None,
    );
    assert_eq!(s, 200, "{v}");
    let left: Vec<Manifest> = rt
        .block_on(catalog::list_backups(&bucket, &disk))
        .expect("catalog");
    assert_eq!(left.len(), 1);
    rt.block_on(assert_sink_holds_only(
        &bucket,
        &left.iter().collect::<Vec<_>>(),
    ));
    assert!(rt
        .block_on(bucket.list("inprogress/"))
        .expect("list")
        .is_empty());
}
