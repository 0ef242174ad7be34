//! `cbt-hostd` over real HTTP (its Unix socket and TLS on TCP) against libvirt domains:
//! backups, progress, cancel, restore, verify; tenants and tokens; bad input; the OpenAPI
//! document; SIGTERM; and kill -9 at many points of backups.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hostd::client::{Client, Endpoint};
use hostd::config::token_hash;
use libcbt::format::{FullReason, Level, Manifest};
use libcbt::sink::local::LocalSink;
use rand::Rng;
use serde_json::{json, Value};
use support::common::lab::{assert_sink_holds_only, compare};
use support::common::{free_port, require, rng, run, seed};
use support::*;

const ADMIN: &str = "admin-token-0123456789";
const TA: &str = "tenant-a-token";
const TB: &str = "tenant-b-token";

fn config(extra: &str) -> String {
    format!(
        r#"[server]
unix_socket = "{{dir}}/hostd.sock"
state_dir = "{{dir}}/state"
restore_dirs = ["{{dir}}/restores"]
max_body_bytes = 65536
shutdown_grace_secs = 20
{extra}

[libvirt]
default_tenant = "nobody"

[limits]
max_jobs = 2
max_jobs_per_tenant = 1
max_queued_jobs = 3
keep_finished_jobs = 2

[[sink]]
name = "local"
path = "{{dir}}/sink"

[[sink]]
name = "prunes"
path = "{{dir}}/sink-prunes"

[[sink]]
name = "only-b"
path = "{{dir}}/sink-b"
tenants = ["p-b"]

[[sink]]
name = "bounded"
path = "{{dir}}/sink-bounded"
tenants = ["p-b"]
max_chain = 2

[[token]]
name = "admin"
sha256 = "{}"
admin = true

[[token]]
name = "a"
sha256 = "{}"
tenant = "p-a"

[[token]]
name = "b"
sha256 = "{}"
tenant = "p-b"
"#,
        token_hash(ADMIN),
        token_hash(TA),
        token_hash(TB)
    )
}

fn unix(h: &Hostd, token: Option<&str>) -> Client {
    Client::new(Endpoint::Unix(h.socket()), token.map(String::from))
}

fn start_backup(
    rt: &tokio::runtime::Runtime,
    c: &Client,
    instance: &str,
    sink: &str,
    extra: Value,
) -> String {
    let mut body = json!({"instance": instance, "sink": sink});
    if let Some(o) = extra.as_object() {
        for (k, v) in o {
            body[k] = v.clone();
        }
    }
    let (s, v) = call(rt, c, "POST", "/v1/backups", Some(body));
    assert_eq!(s, 202, "{v}");
    v["job"]["id"].as_str().expect("job id").to_string()
}

fn committed(sink: &Path) -> Vec<Manifest> {
    let rt = rt();
    let s = LocalSink::open(sink).expect("sink");
    let mut all = Vec::new();
    for d in rt
        .block_on(libcbt::engine::catalog::list_disks(&s))
        .expect("disks")
    {
        all.extend(
            rt.block_on(libcbt::engine::catalog::list_backups(&s, &d))
                .expect("backups"),
        );
    }
    all
}

/// Checks that the sink at `sink_dir` holds exactly its committed backups (no stray object)
/// and returns their manifests.
fn only_committed(rt: &tokio::runtime::Runtime, sink_dir: &Path) -> Vec<Manifest> {
    let all = committed(sink_dir);
    rt.block_on(assert_sink_holds_only(
        &LocalSink::open(sink_dir).expect("sink"),
        &all.iter().collect::<Vec<_>>(),
    ));
    all
}

/// The checkpoint the newest of `all` names: the one a domain must keep.
fn newest_checkpoint(all: &[Manifest]) -> String {
    all.iter()
        .max_by_key(|m| m.finished_unix_ms)
        .and_then(|m| m.checkpoint.clone())
        .expect("newest backup's checkpoint")
}

#[test]
fn api_backups_restores_tenants_bad_input_and_sigterm() {
    let _g = serial();
    let mut r = rng(seed("api"));
    let a = Dom::owned(
        "api-a",
        &[Disk {
            target: "vda",
            format: "qcow2",
            size: 1024 * MIB,
        }],
        "p-a",
    );
    let b = Dom::owned(
        "api-b",
        &[Disk {
            target: "vda",
            format: "qcow2",
            size: 64 * MIB,
        }],
        "p-b",
    );
    // Tenant a's second instance, for prunes as jobs.
    let pc = Dom::owned(
        "api-c",
        &[Disk {
            target: "vda",
            format: "qcow2",
            size: 64 * MIB,
        }],
        "p-a",
    );
    // TLS on TCP with a certificate for localhost, signed by itself (the client's CA).
    let certdir = shared_dir();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    std::fs::write(certdir.path().join("cert.pem"), ck.cert.pem()).expect("cert");
    std::fs::write(certdir.path().join("key.pem"), ck.key_pair.serialize_pem()).expect("key");
    let port = free_port();
    let mut h = Hostd::start(&config(&format!(
        "listen = \"127.0.0.1:{port}\"\ntls_cert = \"{0}/cert.pem\"\ntls_key = \"{0}/key.pem\"",
        certdir.path().display()
    )));
    let rt = rt();
    let tls = |token: &str| {
        Client::new(
            Endpoint::Https {
                host: "localhost".into(),
                port,
                ca: certdir.path().join("cert.pem"),
            },
            Some(token.into()),
        )
    };
    let (admin, ta, tb) = (unix(&h, Some(ADMIN)), tls(TA), tls(TB));

    // --- authentication and tenancy ---
    assert_eq!(
        call(&rt, &unix(&h, None), "GET", "/v1/instances", None).0,
        401
    );
    assert_eq!(
        call(&rt, &unix(&h, Some("wrong")), "GET", "/v1/instances", None).0,
        401
    );
    assert_eq!(call(&rt, &tls("wrong"), "GET", "/v1/jobs", None).0, 401);
    // Other tests of this binary run at the same time on the same libvirt with the same
    // tenants; judge only this test's domains.
    let names = |c: &Client| -> BTreeSet<String> {
        call(&rt, c, "GET", "/v1/instances", None).1["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .map(|i| i["name"].as_str().unwrap_or("").to_string())
            .filter(|n| n.starts_with("cbt-test-api-"))
            .collect()
    };
    assert!(names(&admin).contains(&a.name) && names(&admin).contains(&b.name));
    assert_eq!(
        names(&ta),
        BTreeSet::from([a.name.clone(), pc.name.clone()])
    );
    assert_eq!(names(&tb), BTreeSet::from([b.name.clone()]));
    assert_eq!(
        call(&rt, &ta, "GET", &format!("/v1/instances/{}", b.name), None).0,
        404
    );
    assert_eq!(
        call(
            &rt,
            &ta,
            "GET",
            &format!("/v1/instances/{}", b.uuid()),
            None
        )
        .0,
        404
    );
    assert_eq!(
        call(&rt, &ta, "GET", &format!("/v1/instances/{}", a.name), None).0,
        200
    );
    let (s, _) = call(
        &rt,
        &tb,
        "POST",
        "/v1/backups",
        Some(json!({"instance": a.name, "sink": "local"})),
    );
    assert_eq!(s, 404, "tenant b may not back up tenant a's instance");
    let (s, _) = call(
        &rt,
        &ta,
        "POST",
        "/v1/backups",
        Some(json!({"instance": a.name, "sink": "only-b"})),
    );
    assert_eq!(s, 404, "tenant a may not use tenant b's sink");

    // --- bad input: 4xx with a message, never a 500 ---
    let bad = |c: &Client, method: &str, path: &str, body: Option<Value>, want: u16| {
        let (s, v) = call(&rt, c, method, path, body.clone());
        assert_eq!(s, want, "{method} {path} {body:?} → {s} {v}");
        assert!(
            !v["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{v}"
        );
    };
    let inst = a.name.as_str();
    bad(
        &ta,
        "POST",
        "/v1/backups",
        Some(json!({"instance": inst, "sink": "local", "colour": "red"})),
        400,
    );
    bad(
        &ta,
        "POST",
        "/v1/backups",
        Some(json!({"instance": inst, "sink": "local", "level": "weekly"})),
        400,
    );
    bad(
        &ta,
        "POST",
        "/v1/backups",
        Some(json!({"instance": inst, "sink": "local", "backup_id": "../../etc"})),
        400,
    );
    bad(
        &ta,
        "POST",
        "/v1/backups",
        Some(json!({"instance": inst, "sink": "local", "disks": ["vdz"]})),
        400,
    );
    bad(
        &ta,
        "POST",
        "/v1/backups",
        Some(json!({"instance": inst, "sink": "local", "quiesce_timeout_secs": 0})),
        400,
    );
    bad(
        &ta,
        "POST",
        "/v1/backups",
        Some(json!({"instance": inst, "sink": "../sink"})),
        404,
    );
    bad(
        &ta,
        "POST",
        "/v1/backups",
        Some(json!({"instance": "../../etc/passwd", "sink": "local"})),
        404,
    );
    bad(&ta, "GET", "/v1/jobs/..%2F..%2Fetc", None, 404);
    bad(&ta, "GET", "/v1/jobs/0123456789abcdef", None, 404);
    bad(&ta, "GET", "/v1/backups", None, 400);
    bad(&ta, "GET", "/v1/no/such/route", None, 404);
    bad(&ta, "PUT", "/v1/jobs", None, 405);
    let many: serde_json::Map<String, Value> =
        (0..40).map(|i| (format!("k{i}"), json!("v"))).collect();
    bad(
        &ta,
        "POST",
        "/v1/backups",
        Some(json!({"instance": inst, "sink": "local", "labels": many})),
        400,
    );
    let big = rt
        .block_on(ta.send_raw("POST", "/v1/backups", vec![b' '; 200_000], true))
        .expect("send");
    assert_eq!(big.status, 413, "{:?}", big.body);
    let junk = rt
        .block_on(ta.send_raw("POST", "/v1/backups", b"{not json".to_vec(), true))
        .expect("send");
    assert_eq!(junk.status, 400);
    let no_ct = rt
        .block_on(ta.send_raw("POST", "/v1/backups", b"{}".to_vec(), false))
        .expect("send");
    assert_eq!(no_ct.status, 415);

    // --- a full and an incremental through TLS, followed over SSE ---
    fill_random(&a, "vda", 192, &mut r);
    a.scatter("vda", 1024 * MIB, 20, &mut r);
    let r1 = a.reference("vda", "api1");
    let id1 = start_backup(
        &rt,
        &ta,
        inst,
        "local",
        json!({"labels": {"ticket": "T-1"}}),
    );
    let seen = follow(&rt, &ta, &id1);
    let last = seen.last().expect("final");
    assert_eq!(last["state"], "succeeded", "{last}");
    assert!(
        seen.iter().any(|s| s["phase"] == "copying"),
        "no copying phase in {seen:?}"
    );
    let disk = last["disks"]
        .as_object()
        .expect("disks")
        .values()
        .next()
        .expect("disk")
        .clone();
    assert_eq!(disk["level"], "full");
    assert_eq!(disk["full_reason"], "first_backup");
    assert!(disk["total"].as_u64().unwrap_or(0) >= 192 * MIB);
    assert_eq!(disk["done"], disk["total"]);
    let backup1 = last["backup_id"].as_str().expect("backup id").to_string();

    a.scatter("vda", 1024 * MIB, 10, &mut r);
    let r2 = a.reference("vda", "api2");
    let id2 = start_backup(&rt, &ta, inst, "local", json!({"level": "incremental"}));
    let last = follow(&rt, &ta, &id2).pop().expect("final");
    assert_eq!(last["state"], "succeeded", "{last}");
    let disk = last["disks"]
        .as_object()
        .expect("disks")
        .values()
        .next()
        .expect("disk")
        .clone();
    assert_eq!(disk["level"], "incremental");
    assert!(disk["total"].as_u64().unwrap_or(u64::MAX) <= 10 * 192 * 1024);
    let backup2 = last["backup_id"].as_str().expect("id").to_string();

    // Listing: tenant a sees both with their labels; tenant b sees none of them.
    let (_, v) = call(
        &rt,
        &ta,
        "GET",
        &format!("/v1/backups?sink=local&instance={inst}"),
        None,
    );
    let list = v["backups"].as_array().expect("backups");
    assert_eq!(list.len(), 2, "{v}");
    assert_eq!(list[0]["labels"]["ticket"], "T-1");
    let (_, v) = call(&rt, &tb, "GET", "/v1/backups?sink=local", None);
    assert_eq!(v["backups"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(
        call(&rt, &tb, "GET", &format!("/v1/jobs/{id1}"), None).0,
        404
    );
    assert_eq!(
        call(
            &rt,
            &tb,
            "GET",
            &format!("/v1/backups/local/{backup1}?instance={}", a.uuid()),
            None
        )
        .0,
        404
    );

    // Prune: a dry run keeps the newer backup by the rule and would fold the older into it,
    // and deletes nothing; another tenant cannot reach the instance; a bad policy is a 400.
    let prune = |who: &Client, policy: Value, dry: bool| {
        call(
            &rt,
            who,
            "POST",
            "/v1/prune",
            Some(json!({"instance": inst, "sink": "local", "policy": policy, "dry_run": dry})),
        )
    };
    let (s, v) = prune(&ta, json!({"keep_last": 1}), true);
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["plan"],
        json!([
            {"id": backup2, "finished_unix_ms": v["plan"][0]["finished_unix_ms"], "disks": v["disks"],
             "hold": {"why": "kept", "by": "last"}},
            {"id": backup1, "finished_unix_ms": v["plan"][1]["finished_unix_ms"], "disks": v["disks"],
             "hold": null, "folds_into": [backup2]},
        ]),
        "{v}"
    );
    assert_eq!(v["deleted"], json!([]));
    assert_eq!(prune(&tb, json!({"keep_last": 1}), true).0, 404);
    let (s, v) = prune(&ta, json!({"keep_last": 1, "utc_offset_secs": 90000}), true);
    assert_eq!(s, 400, "{v}");
    let (s, v) = prune(&ta, json!({"keep_lots": 1}), true);
    assert_eq!(s, 400, "{v}");
    let (_, v) = call(
        &rt,
        &ta,
        "GET",
        &format!("/v1/backups?sink=local&instance={inst}"),
        None,
    );
    assert_eq!(v["backups"].as_array().map(Vec::len), Some(2), "{v}");

    // --- restores: to a file (checked by qemu-img compare), into a staging domain ---
    let restores = h.dir.path().join("restores");
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/restores",
        Some(json!({"instance": inst, "sink": "local",
        "backup_id": backup1, "target": {"type": "file", "path": "/etc/cbt-evil.raw"}})),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/restores",
        Some(json!({"instance": inst, "sink": "local",
        "backup_id": backup1, "target": {"type": "file", "path": format!("{}/../x.raw", restores.display())}})),
    );
    assert_eq!(s, 400, "{v}");
    for (bid, reference) in [(&backup1, &r1), (&backup2, &r2)] {
        let out = restores.join(format!("{bid}.raw"));
        let last = run_job(
            &rt,
            &ta,
            "/v1/restores",
            Some(json!({"instance": inst, "sink": "local",
            "backup_id": bid, "target": {"type": "file", "path": out}})),
        );
        assert_eq!(last["state"], "succeeded", "{last}");
        compare(&out, reference);
    }
    let staging = format!("{}-staging", a.name);
    let last = run_job(
        &rt,
        &ta,
        "/v1/restores",
        Some(json!({"instance": inst, "sink": "local",
        "backup_id": backup2, "target": {"type": "domain", "name": staging, "start": true}})),
    );
    assert_eq!(last["state"], "succeeded", "{last}");
    assert!(virsh(&["domstate", &staging]).contains("running"));
    // The copy runs beside the original, on its own restored disk, and is the same tenant's.
    assert!(names(&ta).contains(&staging));
    let img = restores.join(&staging).join("vda.qcow2");
    let copy = h.dir.path().join("staging.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(&img)
        .arg(&copy));
    compare(&copy, &r2);
    let _ = Command::new("virsh")
        .args(["-c", "qemu:///system", "destroy", &staging])
        .output();
    let _ = Command::new("virsh")
        .args(["-c", "qemu:///system", "undefine", &staging])
        .output();

    // An instant copy: nothing is copied; each disk is a qcow2 overlay whose backing file is
    // an NBD export of the backup (a mount the copy keeps). QEMU opens the whole chain when
    // the copy starts (it would not start otherwise); the chain reads as the backup, and
    // writes go to the overlay.
    let instant = format!("{}-instant", a.name);
    let last = run_job(
        &rt,
        &ta,
        "/v1/restores",
        Some(
            json!({"instance": inst, "sink": "local", "backup_id": backup2,
            "target": {"type": "domain", "name": instant, "start": true, "instant": true}}),
        ),
    );
    assert_eq!(last["state"], "succeeded", "{last}");
    let mid = last["result"]["mount"]
        .as_str()
        .expect("mount id")
        .to_string();
    assert!(virsh(&["domstate", &instant]).contains("running"));
    let img = restores.join(&instant).join("vda.qcow2");
    run(Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "raw"])
        .arg(&img)
        .arg(&r2));
    // The tenant sees its copy's mount; no prune of the instance on that sink meanwhile.
    let (_, v) = call(&rt, &ta, "GET", "/v1/mounts", None);
    assert_eq!(v["mounts"][0]["id"], json!(mid), "{v}");
    assert_eq!(
        call(&rt, &tb, "GET", &format!("/v1/mounts/{mid}"), None).0,
        404
    );
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/prune",
        Some(json!({"instance": inst, "sink": "local", "policy": {"keep_last": 1}})),
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("mounted")),
        "{v}"
    );
    // A write as the guest makes it (through QEMU's block layer) lands in the overlay.
    // (HMP answers qemu-io's errors, and nothing on success; flushed, so that the qcow2 metadata
    // qemu-img reads beside the running QEMU is on disk.)
    for cmd in ["write -P 0x5a 0 65536", "flush"] {
        let out = qemu_io(&instant, cmd);
        assert!(out.trim().is_empty(), "qemu-io {cmd}: {out}");
    }
    let map = image_map(&img);
    assert!(
        map.iter()
            .any(|e| e["start"] == 0 && e["depth"] == 0 && e["data"] == true),
        "the write is not in the overlay: {map:?}"
    );
    let _ = Command::new("virsh")
        .args(["-c", "qemu:///system", "destroy", &instant])
        .output();
    let _ = Command::new("virsh")
        .args(["-c", "qemu:///system", "undefine", &instant])
        .output();
    let (s, v) = call(&rt, &ta, "DELETE", &format!("/v1/mounts/{mid}"), None);
    assert_eq!(s, 200, "{v}");

    // Deleting the full under the incremental folds it in: the incremental becomes a
    // synthetic full that restores exactly as before.
    let (s, v) = call(
        &rt,
        &ta,
        "DELETE",
        &format!("/v1/backups/local/{backup1}?instance={inst}"),
        None,
    );
    assert_eq!(s, 200, "{v}");
    assert!(v["folds"].as_u64() >= Some(1), "{v}");
    let (_, v) = call(
        &rt,
        &ta,
        "GET",
        &format!("/v1/backups?sink=local&instance={inst}"),
        None,
    );
    assert_eq!(v["backups"].as_array().map(Vec::len), Some(1), "{v}");
    let out = restores.join("folded.raw");
    let last = run_job(
        &rt,
        &ta,
        "/v1/restores",
        Some(json!({"instance": inst, "sink": "local",
        "backup_id": backup2, "target": {"type": "file", "path": out}})),
    );
    assert_eq!(last["state"], "succeeded", "{last}");
    compare(&out, &r2);

    // --- verify ---
    let last = run_job(
        &rt,
        &ta,
        "/v1/verifications",
        Some(json!({"instance": inst, "sink": "local", "backup_id": backup2})),
    );
    assert_eq!(last["state"], "succeeded", "{last}");

    // Two backups of tenant a's second instance, on the sink "prunes".
    let mut pc_refs = Vec::new();
    let mut pc_ids = Vec::new();
    for i in 0..2 {
        pc.scatter("vda", 64 * MIB, 5, &mut r);
        pc_refs.push(pc.reference("vda", &format!("pc{i}")));
        let last = run_job(
            &rt,
            &ta,
            "/v1/backups",
            Some(json!({"instance": pc.name, "sink": "prunes"})),
        );
        assert_eq!(last["state"], "succeeded", "{last}");
        pc_ids.push(last["backup_id"].as_str().expect("id").to_string());
    }
    let pc_backups = || -> Vec<String> {
        let (_, v) = call(
            &rt,
            &ta,
            "GET",
            &format!("/v1/backups?sink=prunes&instance={}", pc.name),
            None,
        );
        let mut ids: Vec<String> = v["backups"]
            .as_array()
            .expect("backups")
            .iter()
            .map(|b| b["backup_id"].as_str().expect("id").to_string())
            .collect();
        ids.sort();
        ids
    };
    // Ids made in one second sort by their random part, not by time.
    let pc_sorted = {
        let mut v = pc_ids.clone();
        v.sort();
        v
    };
    assert_eq!(pc_backups(), pc_sorted);

    // --- cancel: jobs queued behind the tenant's limit (a verification, a prune), one running ---
    let running = start_backup(&rt, &ta, inst, "local", json!({"level": "full"}));
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/verifications",
        Some(json!({"instance": inst, "sink": "local", "backup_id": backup2})),
    );
    assert_eq!(s, 202, "{v}");
    let queued = v["job"]["id"].as_str().expect("id").to_string();
    assert_eq!(
        call(&rt, &ta, "GET", &format!("/v1/jobs/{queued}"), None).1["job"]["state"],
        "queued"
    );
    assert_eq!(
        call(&rt, &ta, "POST", &format!("/v1/jobs/{queued}/cancel"), None).0,
        202
    );
    // A prune is a job like any other: it queues behind the tenant's limit, holding its
    // instance meanwhile (no backup of it starts), and a cancel ends it having deleted nothing.
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/prune",
        Some(
            json!({"instance": pc.name, "sink": "prunes", "policy": {"keep_last": 1},
                    "background": true}),
        ),
    );
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["job"]["kind"], "prune", "{v}");
    let queued_prune = v["job"]["id"].as_str().expect("id").to_string();
    assert_eq!(
        call(&rt, &ta, "GET", &format!("/v1/jobs/{queued_prune}"), None).1["job"]["state"],
        "queued"
    );
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/backups",
        Some(json!({"instance": pc.name, "sink": "prunes"})),
    );
    assert_eq!(s, 409, "a backup of an instance whose prune is queued: {v}");
    assert_eq!(
        call(
            &rt,
            &ta,
            "POST",
            &format!("/v1/jobs/{queued_prune}/cancel"),
            None
        )
        .0,
        202
    );
    // Cancel the running full as soon as it copies.
    let t = Instant::now();
    loop {
        let (_, v) = call(&rt, &ta, "GET", &format!("/v1/jobs/{running}"), None);
        if v["job"]["phase"] == "copying"
            || v["job"]["state"] != "running" && v["job"]["state"] != "queued"
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        call(
            &rt,
            &ta,
            "POST",
            &format!("/v1/jobs/{running}/cancel"),
            None
        )
        .0,
        202
    );
    let last = follow(&rt, &ta, &running).pop().expect("final");
    assert_eq!(last["state"], "cancelled", "{last}");
    let last = follow(&rt, &ta, &queued).pop().expect("final");
    assert_eq!(last["state"], "cancelled", "{last}");
    let last = follow(&rt, &ta, &queued_prune).pop().expect("final");
    assert_eq!(last["state"], "cancelled", "{last}");
    assert_eq!(pc_backups(), pc_sorted, "a cancelled prune deletes nothing");
    // Nothing of the cancelled backup is left: checkpoint, scratch, objects.
    let sink_dir = h.dir.path().join("sink");
    let all = only_committed(&rt, &sink_dir);
    assert_eq!(all.len(), 1, "backup2 (backup1 was folded into it)");
    assert_eq!(a.checkpoints(), vec![format!("cbt-{backup2}")]);
    let left = walk(&h.dir.path().join("state/scratch"));
    assert!(left.is_empty(), "{left:?}");

    // --- metrics ---
    let m = rt
        .block_on(unix(&h, None).call("GET", "/metrics", None))
        .expect("metrics");
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains("cbt_jobs_total{kind=\"backup\",state=\"succeeded\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("cbt_jobs_total{kind=\"backup\",state=\"cancelled\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("cbt_backup_fulls_total{reason=\"first_backup\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("cbt_retention_deleted_backups_total{by=\"delete\"} 1"),
        "{text}"
    );
    assert!(text.contains("cbt_folds_total{why=\"prune\"} 1"), "{text}");

    // --- live restore: the copy boots on the backup at once and its disk is copied into its
    // overlay underneath (block pull; throttled here so that the guest writes meanwhile and
    // the daemon dies mid-copy); then the mount goes. The oracle: the backup's reference with
    // the guest's two writes, made independently by qemu-io on a raw copy of it.
    let expect = h.dir.path().join("live-expect.raw");
    std::fs::copy(&r2, &expect).expect("copy of the reference");
    let writes = [("0x5a", 0u64), ("0xa5", 512 * MIB)];
    for (pat, off) in writes {
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("write -P {pat} {off} 65536")])
            .arg(&expect));
    }
    let guest_write = |dom: &str, pat: &str, off: u64| {
        for cmd in [format!("write -P {pat} {off} 65536"), "flush".to_string()] {
            let out = qemu_io(dom, &cmd);
            assert!(out.trim().is_empty(), "qemu-io {cmd}: {out}");
        }
    };
    let live = format!("{}-live", a.name);
    let restore_to = |target: Value| {
        call(
            &rt,
            &ta,
            "POST",
            "/v1/restores",
            Some(
                json!({"instance": inst, "sink": "local", "backup_id": backup2, "target": target}),
            ),
        )
    };
    let start_live = |name: &str, bandwidth: u64| -> String {
        let (s, v) = restore_to(
            json!({"type": "domain", "name": name, "live": true, "bandwidth_mib": bandwidth}),
        );
        assert_eq!(s, 202, "{v}");
        v["job"]["id"].as_str().expect("job id").to_string()
    };
    let job_of = |id: &str| call(&rt, &ta, "GET", &format!("/v1/jobs/{id}"), None).1;
    // Until the job no longer runs (within `secs`): its status then.
    let ended = |id: &str, secs: u64| -> Value {
        let t = Instant::now();
        loop {
            let v = job_of(id);
            if v["job"]["state"] != "running" {
                return v;
            }
            assert!(t.elapsed() < Duration::from_secs(secs), "{v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Until the job copies (and has copied something): its status then.
    let copying = |id: &str| -> Value {
        let t = Instant::now();
        loop {
            let v = job_of(id);
            if v["job"]["phase"] == "copying" && v["job"]["bytes_done"].as_u64() > Some(0) {
                return v;
            }
            assert!(
                v["job"]["state"] == "running" || v["job"]["state"] == "queued",
                "{v}"
            );
            assert!(t.elapsed() < Duration::from_secs(60), "{v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let (s, v) = restore_to(json!({"type": "domain", "name": live, "live": true, "start": false}));
    assert_eq!(s, 400, "{v}");
    let live_job = start_live(&live, 48);
    let status = copying(&live_job);
    assert_eq!(status["job"]["bytes_total"], json!(1024 * MIB), "{status}");
    assert!(virsh(&["domstate", &live]).contains("running"));
    guest_write(&live, writes[0].0, writes[0].1);
    // The mount the copy reads is the tenant's to see, not to pull away.
    let (_, v) = call(&rt, &ta, "GET", "/v1/mounts", None);
    let live_mount = v["mounts"][0]["id"].as_str().expect("mount").to_string();
    let (s, v) = call(
        &rt,
        &ta,
        "DELETE",
        &format!("/v1/mounts/{live_mount}"),
        None,
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("copying")),
        "{v}"
    );
    // The daemon stops (SIGTERM) mid-copy, then dies (SIGKILL) mid-copy: each time the guest
    // runs on, and the next daemon serves the mount again and resumes the copy (the job shows
    // it); the guest's writes on every side of the restarts stay.
    assert_eq!(job_of(&live_job)["job"]["phase"], "copying");
    let took = h.term();
    assert!(took < Duration::from_secs(20), "SIGTERM took {took:?}");
    h.spawn();
    let resumed = copying(&live_job);
    assert_eq!(resumed["job"]["state"], "running", "{resumed}");
    guest_write(&live, writes[1].0, writes[1].1);
    assert_eq!(job_of(&live_job)["job"]["phase"], "copying");
    h.kill9();
    h.spawn();
    let done = ended(&live_job, 120);
    assert_eq!(done["job"]["state"], "succeeded", "{done}\n{}", h.log());
    assert_eq!(done["job"]["result"]["resumed"], true, "{done}");
    assert_eq!(
        done["job"]["bytes_done"], done["job"]["bytes_total"],
        "{done}"
    );
    eprintln!("live restore, copying: {status}\nended: {done}");
    let (_, v) = call(&rt, &ta, "GET", "/v1/mounts", None);
    assert_eq!(v["mounts"], json!([]), "the mount is released: {v}");
    assert!(virsh(&["domstate", &live]).contains("running"));
    let img = restores.join(&live).join("vda.qcow2");
    let info = run(Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&img));
    let info: Value = serde_json::from_str(&info).expect("info json");
    assert!(
        info.get("backing-filename").is_none(),
        "still backed: {info}"
    );
    for cmd in ["destroy", "undefine"] {
        let _ = Command::new("virsh")
            .args(["-c", "qemu:///system", cmd, &live])
            .output();
    }
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&img)
        .arg(&expect));
    // A live restore cancelled mid-copy: the guest runs on, reading the rest from the mount,
    // which stays (and reads as the backup through the overlay); it may then be unmounted.
    let live2 = format!("{}-live2", a.name);
    let live2_job = start_live(&live2, 16);
    copying(&live2_job);
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        &format!("/v1/jobs/{live2_job}/cancel"),
        None,
    );
    assert!(s == 200 || s == 202, "{s} {v}");
    let stopped = ended(&live2_job, 30);
    assert_eq!(stopped["job"]["state"], "cancelled", "{stopped}");
    assert!(virsh(&["domstate", &live2]).contains("running"));
    let (_, v) = call(&rt, &ta, "GET", "/v1/mounts", None);
    let m2 = v["mounts"][0]["id"]
        .as_str()
        .expect("the mount stays")
        .to_string();
    let img2 = restores.join(&live2).join("vda.qcow2");
    run(Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "raw"])
        .arg(&img2)
        .arg(&r2));
    // Mounts outlive the daemon: after a restart the same mount serves the same socket (the
    // overlay's backing file), so the chain reads as the backup again, and the guest reads on.
    let took = h.term();
    assert!(took < Duration::from_secs(20), "SIGTERM took {took:?}");
    h.spawn();
    let (_, v) = call(&rt, &ta, "GET", "/v1/mounts", None);
    assert_eq!(v["mounts"][0]["id"], json!(m2), "{v}");
    run(Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "raw"])
        .arg(&img2)
        .arg(&r2));
    let map = image_map(&img2);
    let tail = 1072693248u64;
    assert!(
        map.iter().any(|e| {
            let (st, len) = (
                e["start"].as_u64().unwrap_or(0),
                e["length"].as_u64().unwrap_or(0),
            );
            st <= tail && tail < st + len && e["depth"].as_u64() >= Some(1)
        }),
        "the disk's end is in the overlay already: {map:?}"
    );
    // Near the disk's end, which the cancelled copy had not reached: read from the mount by
    // the guest's own NBD connection, which reconnects. (HMP answers qemu-io's errors, and
    // nothing on success.)
    let out = qemu_io(&live2, "read 1072693248 1048576");
    assert!(
        out.trim().is_empty(),
        "the guest's read after the restart: {out}"
    );
    for cmd in ["destroy", "undefine"] {
        let _ = Command::new("virsh")
            .args(["-c", "qemu:///system", cmd, &live2])
            .output();
    }
    let (s, v) = call(&rt, &ta, "DELETE", &format!("/v1/mounts/{m2}"), None);
    assert_eq!(s, 200, "{v}");

    // --- prunes and collections as jobs, through cbtctl ---
    let cbtctl = |token: &str, args: &[&str]| -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_cbtctl"))
            .env("CBT_TOKEN", token)
            .arg("--hostd")
            .arg(h.socket())
            .arg("--json")
            .args(args)
            .output()
            .expect("cbtctl");
        assert!(
            out.status.success(),
            "cbtctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    };
    // It waits for the prune's job and prints its result: the older backup folded into the
    // newer and deleted, in two steps.
    let v = cbtctl(
        TA,
        &[
            "prune-backups",
            "--sink",
            "prunes",
            "--instance",
            &pc.name,
            "--keep-last",
            "1",
        ],
    );
    assert_eq!(v["deleted"], json!([pc_ids[0]]), "{v}");
    assert_eq!(v["folds"], 1, "{v}");
    let pruned = v["job"].as_str().expect("job id").to_string();
    let (_, v) = call(&rt, &ta, "GET", &format!("/v1/jobs/{pruned}"), None);
    let j = &v["job"];
    assert_eq!(
        (&j["kind"], &j["state"], &j["steps_done"], &j["steps_total"]),
        (&json!("prune"), &json!("succeeded"), &json!(2), &json!(2)),
        "{v}"
    );
    assert_eq!(pc_backups(), [pc_ids[1].clone()]);
    let restore_pc = |tag: &str| {
        let out = restores.join(format!("pc-{tag}.raw"));
        let last = run_job(
            &rt,
            &ta,
            "/v1/restores",
            Some(json!({"instance": pc.name, "sink": "prunes",
            "backup_id": pc_ids[1], "target": {"type": "file", "path": out}})),
        );
        assert_eq!(last["state"], "succeeded", "{last}");
        compare(&out, &pc_refs[1]);
    };
    restore_pc("pruned");
    // --- mounts: a backup served read-only over NBD straight from the sink (admin only) ---
    let body = json!({"instance": pc.name, "sink": "prunes", "backup_id": pc_ids[1]});
    let (s, v) = call(&rt, &ta, "POST", "/v1/mounts", Some(body.clone()));
    assert_eq!(s, 403, "{v}");
    let (s, v) = call(&rt, &admin, "POST", "/v1/mounts", Some(body));
    assert_eq!(s, 201, "{v}");
    let mid = v["mount"]["id"].as_str().expect("id").to_string();
    let vda = &v["mount"]["disks"]["vda"];
    let uri = vda["uri"].as_str().expect("uri").to_string();
    let socket = std::path::PathBuf::from(vda["socket"].as_str().expect("socket"));
    assert_eq!(vda["chain_len"], 1, "a full since the fold: {v}");
    // QEMU reads it as the backup's point in time.
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&pc_refs[1])
        .arg(&uri));
    // Nothing takes frames from under it: no prune of the instance on that sink meanwhile.
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/prune",
        Some(json!({"instance": pc.name, "sink": "prunes", "policy": {"keep_last": 1}})),
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("mounted")),
        "{v}"
    );
    let v = cbtctl(ADMIN, &["mounts"]);
    assert_eq!(v["mounts"][0]["id"], json!(mid), "{v}");
    cbtctl(ADMIN, &["umount", &mid]);
    assert!(!socket.exists(), "the socket goes with the mount");
    assert_eq!(
        call(&rt, &admin, "GET", &format!("/v1/mounts/{mid}"), None).0,
        404
    );
    // A collection in the background: 202 with the job, followed to its end; compaction
    // (threshold 1 rewrites every segment) counts the sink's disks as its steps.
    let (s, v) = call(
        &rt,
        &admin,
        "POST",
        "/v1/gc",
        Some(json!({"sink": "prunes", "compact": true, "threshold": 1.0, "background": true})),
    );
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["job"]["kind"], "gc", "{v}");
    let gc_id = v["job"]["id"].as_str().expect("id").to_string();
    let seen = follow(&rt, &admin, &gc_id);
    let last = seen.last().expect("final");
    assert_eq!(last["state"], "succeeded", "{last}");
    assert_eq!(
        (&last["steps_done"], &last["steps_total"]),
        (&json!(1), &json!(1)),
        "{last}"
    );
    assert!(
        last["result"]["compaction"]["segments_rewritten"].as_u64() > Some(0),
        "{last}"
    );
    assert_eq!(
        call(&rt, &ta, "GET", &format!("/v1/jobs/{gc_id}"), None).0,
        404,
        "a tenant does not see the sink's collection"
    );
    restore_pc("compacted");
    let v = cbtctl(ADMIN, &["collect-garbage", "--sink", "prunes"]);
    assert!(v["objects"].is_u64() && v["job"].is_string(), "{v}");
    let m = rt
        .block_on(unix(&h, None).call("GET", "/metrics", None))
        .expect("metrics");
    let text = String::from_utf8_lossy(&m.body);
    // Counted since the restart of the live restore above.
    for line in [
        "cbt_jobs_total{kind=\"prune\",state=\"succeeded\"} 1",
        "cbt_jobs_total{kind=\"gc\",state=\"succeeded\"} 2",
        "cbt_folds_total{why=\"prune\"} 1",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }

    // --- bounded chains: the sink "bounded" has max_chain = 2 ---
    let binst = b.name.as_str();
    let mut refs = Vec::new();
    let mut ends = Vec::new();
    for i in 0..4 {
        b.scatter("vda", 64 * MIB, 5, &mut r);
        refs.push(b.reference("vda", &format!("bounded{i}")));
        let id = start_backup(&rt, &tb, binst, "bounded", json!({}));
        let last = follow(&rt, &tb, &id).pop().expect("final");
        assert_eq!(last["state"], "succeeded", "{last}");
        ends.push(last);
    }
    let disk_of = |j: &Value| {
        j["disks"]
            .as_object()
            .expect("disks")
            .values()
            .next()
            .expect("disk")
            .clone()
    };
    let synthetic: Vec<Value> = ends
        .iter()
        .map(|j| disk_of(j)["synthetic_full_of"].clone())
        .collect();
    // The third would be the third of its chain: it becomes a synthetic full standing for
    // the three; the fourth chains from it.
    assert_eq!(synthetic, [Value::Null, Value::Null, json!(3), Value::Null]);
    assert_eq!(disk_of(&ends[2])["level"], "incremental");
    let bounded_dir = h.dir.path().join("sink-bounded");
    let all = only_committed(&rt, &bounded_dir);
    let shape: Vec<(String, Level, Option<FullReason>, u32)> = ends
        .iter()
        .map(|j| {
            let id = j["backup_id"].as_str().expect("id");
            let m = all.iter().find(|m| m.backup_id == id).expect("manifest");
            (id.to_string(), m.level, m.full_reason, m.generation)
        })
        .collect();
    assert_eq!(
        shape.iter().map(|s| (s.1, s.2, s.3)).collect::<Vec<_>>(),
        [
            (Level::Full, Some(FullReason::FirstBackup), 0),
            (Level::Incremental, None, 0),
            (Level::Full, Some(FullReason::ChainBounded), 1),
            (Level::Incremental, None, 0),
        ]
    );
    let restore_all = |tag: &str| {
        for ((id, ..), reference) in shape.iter().zip(&refs) {
            let out = restores.join(format!("{tag}-{id}.raw"));
            let last = run_job(
                &rt,
                &tb,
                "/v1/restores",
                Some(json!({"instance": binst, "sink": "bounded",
                "backup_id": id, "target": {"type": "file", "path": out}})),
            );
            assert_eq!(last["state"], "succeeded", "{last}");
            compare(&out, reference);
        }
    };
    restore_all("bounded");
    let m = rt
        .block_on(unix(&h, None).call("GET", "/metrics", None))
        .expect("metrics");
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains("cbt_folds_total{why=\"max_chain\"} 1"),
        "{text}"
    );

    // --- garbage collection on request: admin only, a grace period of at least an hour ---
    let gc = |who: &Client, body: Value| call(&rt, who, "POST", "/v1/gc", Some(body));
    let (s, v) = gc(&tb, json!({"sink": "bounded"}));
    assert_eq!(s, 403, "{v}");
    let (s, v) = gc(&admin, json!({"sink": "bounded", "grace_secs": 60}));
    assert_eq!(s, 400, "{v}");
    assert_eq!(gc(&admin, json!({"sink": "nowhere"})).0, 404);
    // A segment a crashed job left two days ago goes; a fresh one stays (a job may be
    // writing it), and so does everything committed.
    let segs = bounded_dir
        .join("disks")
        .join(&all[0].disk)
        .join("segments");
    let (old, young) = (
        segs.join(format!("{:032x}.seg", 1)),
        segs.join(format!("{:032x}.seg", 2)),
    );
    std::fs::write(&old, vec![7u8; 1000]).expect("write");
    std::fs::write(&young, vec![7u8; 10]).expect("write");
    run(Command::new("touch").args(["-d", "2 days ago"]).arg(&old));
    let (s, v) = gc(&admin, json!({"sink": "bounded"}));
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["objects"].as_u64(), v["bytes"].as_u64()),
        (Some(1), Some(1000)),
        "{v}"
    );
    assert!(!old.exists() && young.exists());
    std::fs::remove_file(&young).expect("remove");
    assert_eq!(only_committed(&rt, &bounded_dir).len(), 4);
    // Compaction with a threshold of 1 rewrites every segment (each has its header at least
    // beyond its live frames): the backups read the copies and restore exactly as before.
    let (s, v) = gc(
        &admin,
        json!({"sink": "bounded", "compact": true, "threshold": 1.5}),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = gc(
        &admin,
        json!({"sink": "bounded", "compact": true, "threshold": 1.0}),
    );
    assert_eq!(s, 200, "{v}");
    let c = &v["compaction"];
    assert!(c["segments_rewritten"].as_u64() > Some(0), "{v}");
    assert_eq!(c["busy_disks"], json!([]), "{v}");
    assert_eq!(
        c["backups_rewritten"],
        json!(4),
        "every backup read a segment: {v}"
    );
    let all = only_committed(&rt, &bounded_dir);
    assert!(all.iter().all(|m| m.generation >= 1), "new generations");
    restore_all("compacted");

    // --- SIGTERM under a running backup: it stops within the grace period and rolls back ---
    let id = start_backup(&rt, &admin, inst, "local", json!({"level": "full"}));
    let t = Instant::now();
    while call(&rt, &admin, "GET", &format!("/v1/jobs/{id}"), None).1["job"]["phase"] != "copying" {
        assert!(t.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = h.term();
    assert!(took < Duration::from_secs(20), "SIGTERM took {took:?}");
    h.spawn();
    let admin = unix(&h, Some(ADMIN));
    let (_, v) = call(&rt, &admin, "GET", &format!("/v1/jobs/{id}"), None);
    assert!(
        ["cancelled", "succeeded"].contains(&v["job"]["state"].as_str().unwrap_or("")),
        "{v}"
    );
    let all = only_committed(&rt, &sink_dir);
    assert_eq!(a.checkpoints(), vec![newest_checkpoint(&all)]);
    assert!(h.log().contains("stopping"), "{}", h.log());
}

/// Every (METHOD, path) routed in `hostd/src/api.rs`, read from its source.
/// Issue 11 from outside: restore targets that leave the restore directory (symlinks,
/// dangling final symlinks), raw NBD endpoints, reserved staging names, name/UUID confusion,
/// one backup per instance at a time, and the queue cap.
#[test]
fn hardening_restore_targets_names_queue_and_instance_lock() {
    let _g = serial();
    let mut r = rng(seed("hardening"));
    let disk = |size| Disk {
        target: "vda",
        format: "qcow2",
        size,
    };
    let a = Dom::owned("hard-a", &[disk(256 * MIB)], "p-a");
    let b = Dom::owned("hard-b", &[disk(64 * MIB)], "p-b");
    let nbd_dir = shared_dir();
    let mut h = Hostd::start(&config(&format!(
        "[restore]\nnbd_allow = [\"nbd+unix:///?socket={}/*\"]\n",
        nbd_dir.path().display()
    )));
    let _ = &mut h;
    let rt = rt();
    let (admin, ta, tb) = (
        unix(&h, Some(ADMIN)),
        unix(&h, Some(TA)),
        unix(&h, Some(TB)),
    );
    fill_random(&a, "vda", 64, &mut r);
    let ra = a.reference("vda", "hard");
    let last = run_job(
        &rt,
        &ta,
        "/v1/backups",
        Some(json!({"instance": a.name, "sink": "local"})),
    );
    assert_eq!(last["state"], "succeeded", "{last}");
    let bid = last["backup_id"].as_str().expect("id").to_string();
    let last = run_job(
        &rt,
        &tb,
        "/v1/backups",
        Some(json!({"instance": b.name, "sink": "local"})),
    );
    assert_eq!(last["state"], "succeeded", "{last}");
    let restore = |c: &Client, target: Value| {
        call(
            &rt,
            c,
            "POST",
            "/v1/restores",
            Some(json!({"instance": a.name, "sink": "local", "backup_id": bid, "target": target})),
        )
    };

    // (1) A symlinked directory inside the restore directory is not followed.
    let restores = h.dir.path().join("restores");
    let outside = shared_dir();
    std::os::unix::fs::symlink(outside.path(), restores.join("link")).expect("symlink");
    let (s, v) = restore(
        &ta,
        json!({"type": "file", "path": restores.join("link/x.raw")}),
    );
    assert_eq!(s, 403, "{v}");
    // A dangling final symlink is not created through, for raw or qcow2.
    std::os::unix::fs::symlink(outside.path().join("made.qcow2"), restores.join("d.qcow2"))
        .expect("symlink");
    for format in ["raw", "qcow2"] {
        let (s, v) = restore(
            &ta,
            json!({"type": "file", "path": restores.join("d.qcow2"), "format": format}),
        );
        assert_eq!(s, 409, "{v}");
    }
    let (s, v) = restore(
        &ta,
        json!({"type": "file", "path": restores.join("no/such/dir.raw")}),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        walk(outside.path()).is_empty(),
        "written outside: {:?}",
        walk(outside.path())
    );
    // Restores that stay inside: owner-only files, exact content.
    for (name, format) in [("ok.raw", "raw"), ("ok.qcow2", "qcow2")] {
        let out = restores.join(name);
        let last = run_job(
            &rt,
            &ta,
            "/v1/restores",
            Some(
                json!({"instance": a.name, "sink": "local", "backup_id": bid,
                "target": {"type": "file", "path": out, "format": format}}),
            ),
        );
        assert_eq!(last["state"], "succeeded", "{last}");
        use std::os::unix::fs::MetadataExt;
        let mode = std::fs::metadata(&out).expect("restored").mode() & 0o777;
        assert_eq!(mode, 0o600, "{name} has mode {mode:o}");
        let raw = h.dir.path().join(format!("{name}.check.raw"));
        run(Command::new("qemu-img")
            .args(["convert", "-f", format, "-O", "raw"])
            .arg(&out)
            .arg(&raw));
        compare(&raw, &ra);
    }
    assert!(
        std::fs::read_dir(h.dir.path().join("state/restore-sockets"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "qemu-nbd sockets left behind"
    );

    // (2) NBD targets: never a tenant's, an admin's only from the allow-list.
    let host_sock = json!({"type": "nbd", "uri": "nbd+unix:///?socket=/run/libvirt/libvirt-sock"});
    let (s, v) = restore(&ta, host_sock.clone());
    assert_eq!(s, 403, "{v}");
    let (s, v) = restore(&admin, host_sock);
    assert_eq!(s, 403, "{v}");
    let (s, v) = restore(
        &admin,
        json!({"type": "nbd", "uri": format!("nbd+unix:///?socket={}/../x.sock", nbd_dir.path().display())}),
    );
    assert_eq!(s, 403, "{v}");
    let img = nbd_dir.path().join("target.raw");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&img)
        .arg((256 * MIB).to_string()));
    let sock = nbd_dir.path().join("t.sock");
    let mut nbd = Command::new("qemu-nbd")
        .args(["-f", "raw", "--persistent", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .expect("qemu-nbd");
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "qemu-nbd did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let last = run_job(
        &rt,
        &admin,
        "/v1/restores",
        Some(
            json!({"instance": a.name, "sink": "local", "backup_id": bid,
            "target": {"type": "nbd", "uri": format!("nbd+unix:///?socket={}", sock.display())}}),
        ),
    );
    assert_eq!(last["state"], "succeeded", "{last}");
    let _ = nbd.kill();
    let _ = nbd.wait();
    compare(&img, &ra);

    // (4) Staging copies may not be named like an instance is looked up.
    for name in [b.uuid(), "instance-0000abcd".to_string()] {
        let (s, v) = restore(&ta, json!({"type": "domain", "name": name}));
        assert_eq!(s, 400, "{name}: {v}");
    }
    // b's instance leaves this host (migrated, deleted); its backups stay on the shared sink.
    // A domain of tenant a named after b's UUID must not make them a's.
    let b_uuid = b.uuid();
    assert!(virsh_ok(&["destroy", &b.name]));
    assert!(virsh_ok(&["undefine", "--checkpoints-metadata", &b.name]));
    let xml = format!(
        "<domain type='qemu'><name>{b_uuid}</name><memory unit='MiB'>64</memory>\
         <metadata><nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'>\
         <nova:owner><nova:project uuid='p-a'>p</nova:project></nova:owner></nova:instance></metadata>\
         <os><type arch='x86_64'>hvm</type></os></domain>"
    );
    let xml_path = h.dir.path().join("impostor.xml");
    std::fs::write(&xml_path, xml).expect("xml");
    assert!(virsh_ok(&["define", &xml_path.display().to_string()]));
    let instances_of = |c: &Client, q: &str| -> (u16, Vec<String>) {
        let (s, v) = call(&rt, c, "GET", &format!("/v1/backups?sink=local{q}"), None);
        let ids = v["backups"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|b| b["instance"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        (s, ids)
    };
    let by_a = instances_of(&ta, "");
    let by_a_named = instances_of(&ta, &format!("&instance={b_uuid}"));
    let by_b = instances_of(&tb, "");
    let by_b_named = instances_of(&tb, &format!("&instance={b_uuid}"));
    let _ = virsh_ok(&["undefine", &b_uuid]);
    assert!(
        !by_a.1.contains(&b_uuid) && !by_a_named.1.contains(&b_uuid),
        "tenant a saw b's backups through a domain named after b's UUID: {by_a:?} {by_a_named:?}"
    );
    assert!(by_b.1.contains(&b_uuid), "{by_b:?}");
    assert_eq!(by_b_named, (200, vec![b_uuid.clone()]));

    // (9) One backup of an instance at a time: the second request is refused at once.
    let first = start_backup(&rt, &ta, &a.name, "local", json!({}));
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/backups",
        Some(json!({"instance": a.name, "sink": "local"})),
    );
    assert_eq!(s, 409, "{v}");
    let (s, v) = call(
        &rt,
        &ta,
        "DELETE",
        &format!("/v1/backups/local/{bid}?instance={}", a.name),
        None,
    );
    assert_eq!(s, 409, "{v}");
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/prune",
        Some(json!({"instance": a.name, "sink": "local", "policy": {"keep_last": 1}})),
    );
    assert_eq!(s, 409, "a prune while the instance's backup runs: {v}");
    let last = follow(&rt, &ta, &first).pop().expect("final");
    assert_eq!(last["state"], "succeeded", "{last}");

    // (10) The queue is bounded: beyond limits.max_queued_jobs, 429.
    let mut statuses = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..8 {
        let (s, v) = call(
            &rt,
            &ta,
            "POST",
            "/v1/verifications",
            Some(json!({"instance": a.name, "sink": "local", "backup_id": bid})),
        );
        if s == 202 {
            ids.push(v["job"]["id"].as_str().expect("id").to_string());
        } else {
            assert!(
                !v["error"]["message"].as_str().unwrap_or("").is_empty(),
                "{v}"
            );
        }
        statuses.push(s);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 202 || *s == 429),
        "{statuses:?}"
    );
    for id in &ids {
        let last = follow(&rt, &ta, id).pop().expect("final");
        assert_eq!(last["state"], "succeeded", "{last}");
    }
    // Finished jobs beyond limits.keep_finished_jobs leave memory, not the journal.
    assert_eq!(
        call(&rt, &ta, "GET", &format!("/v1/jobs/{}", ids[0]), None).0,
        200
    );
    drop(h);
}

fn routed() -> BTreeSet<(String, String)> {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api.rs"))
        .expect("api.rs");
    let mut out = BTreeSet::new();
    let router = &src[src.find("Router::new()").expect("router")..];
    let router = &router[..router.find(".fallback(").expect("fallback")];
    for part in router.split(".route(").skip(1) {
        let q0 = part.find('"').expect("quote") + 1;
        let q1 = q0 + part[q0..].find('"').expect("quote");
        let path = part[q0..q1].to_string();
        for m in ["get", "post", "delete", "put", "patch"] {
            if part[q1..].contains(&format!("{m}(")) {
                out.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn openapi_document_validates_and_matches_the_routes() {
    let _g = serial();
    require("python3");
    let h = Hostd::start(&config(""));
    let rt = rt();
    let anon = unix(&h, None);
    let doc = rt
        .block_on(anon.call("GET", "/v1/openapi.json", None))
        .expect("get");
    assert_eq!(doc.status, 200);
    let f = h.dir.path().join("openapi.json");
    std::fs::write(&f, &doc.body).expect("write");
    // An independent validator (openapi-spec-validator, installed by install-deps).
    let out = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&f)
        .output()
        .expect("run openapi_spec_validator");
    assert!(
        out.status.success(),
        "OpenAPI document invalid: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let documented: BTreeSet<(String, String)> = hostd::openapi::operations().into_iter().collect();
    assert_eq!(documented, routed(), "document and router disagree");
    // And every documented operation is served: 401 without a token (public ones answer).
    let public = ["/v1/openapi.json", "/v1/health", "/metrics"];
    for (m, p) in &documented {
        let path = p
            .replace("{id}", "0123456789abcdef")
            .replace("{sink}", "local")
            .replace("{backup_id}", "b1");
        let r = rt.block_on(anon.call(m, &path, None)).expect("call");
        let want = if public.contains(&p.as_str()) {
            200
        } else {
            401
        };
        assert_eq!(r.status, want, "{m} {p}");
    }
    let r = rt
        .block_on(anon.call("GET", "/v1/undocumented", None))
        .expect("call");
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (404, json!("no_route"))
    );
}

#[test]
fn kill_9_at_any_point_of_a_backup_loses_nothing() {
    let _g = serial();
    let mut r = rng(seed("kill9"));
    let dom = Dom::owned(
        "kill",
        &[Disk {
            target: "vda",
            format: "qcow2",
            size: 512 * MIB,
        }],
        "p-a",
    );
    fill_random(&dom, "vda", 160, &mut r);
    let mut h = Hostd::start(&config(""));
    let rt = rt();
    let sink_dir = h.dir.path().join("sink");
    let inst = dom.name.clone();
    let backup = |h: &Hostd, extra: Value| -> Value {
        let c = unix(h, Some(ADMIN));
        let id = start_backup(&rt, &c, &inst, "local", extra);
        follow(&rt, &c, &id).pop().expect("final")
    };
    let first = backup(&h, json!({}));
    assert_eq!(first["state"], "succeeded", "{first}");
    // Kills are spread over each kind of job's measured duration.
    let took = |j: &Value| {
        (j["finished_ms"].as_i64().unwrap_or(0) - j["created_ms"].as_i64().unwrap_or(0)).max(20)
            as u64
    };
    let full_ms = took(&first);
    let mut incr_ms = 100;
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    let points = 24;
    for i in 0..points {
        dom.scatter("vda", 512 * MIB, 3, &mut r);
        let reference = dom.reference("vda", &format!("k{i}"));
        // Every other round is a full (long copy), the others incrementals (short): kills
        // land in planning, point in time, copy, commit and after.
        let level = if i % 2 == 0 { "full" } else { "auto" };
        let c = unix(&h, Some(ADMIN));
        let id = start_backup(&rt, &c, &inst, "local", json!({"level": level}));
        let delay =
            Duration::from_millis(r.gen_range(0..if level == "full" { full_ms } else { incr_ms }));
        std::thread::sleep(delay);
        let phase = call(&rt, &c, "GET", &format!("/v1/jobs/{id}"), None).1["job"]["phase"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        h.kill9();
        h.spawn(); // reconciles before it listens
        let c = unix(&h, Some(ADMIN));
        let (_, v) = call(&rt, &c, "GET", &format!("/v1/jobs/{id}"), None);
        let state = v["job"]["state"].as_str().unwrap_or("").to_string();
        assert!(
            ["succeeded", "interrupted"].contains(&state.as_str()),
            "round {i}: {v}"
        );
        *outcomes.entry(format!("{phase}→{state}")).or_default() += 1;
        // Nothing stray: the sink holds exactly its committed backups, the domain exactly the
        // checkpoint of the newest one, no job, no scratch.
        let all = only_committed(&rt, &sink_dir);
        let log = h.log();
        assert_eq!(
            dom.checkpoints(),
            vec![newest_checkpoint(&all)],
            "round {i} ({phase}); daemon log: {}",
            &log[log.len().saturating_sub(4000)..]
        );
        assert!(
            !virsh(&["domjobinfo", &inst]).contains("Backup"),
            "round {i}: job left running"
        );
        let left = walk(&h.dir.path().join("state/scratch"));
        assert!(left.is_empty(), "round {i}: scratch left {left:?}");
        let verify = |bid: &str| {
            let out = h.dir.path().join(format!("restores/{bid}.raw"));
            let last = run_job(
                &rt,
                &c,
                "/v1/restores",
                Some(json!({"instance": inst, "sink": "local",
                "backup_id": bid, "target": {"type": "file", "path": out}})),
            );
            assert_eq!(last["state"], "succeeded", "{last}");
            compare(&out, &reference);
            let _ = std::fs::remove_file(&out);
        };
        if state == "succeeded" {
            verify(v["job"]["backup_id"].as_str().expect("id"));
        }
        // The next backup is right, whatever happened: an incremental restoring exactly.
        let next = backup(&h, json!({}));
        assert_eq!(next["state"], "succeeded", "round {i}: {next}");
        incr_ms = took(&next);
        let d = next["disks"]
            .as_object()
            .expect("disks")
            .values()
            .next()
            .expect("disk")
            .clone();
        assert_eq!(
            d["level"], "incremental",
            "round {i} ({phase}→{state}): {next}"
        );
        verify(next["backup_id"].as_str().expect("id"));
    }
    eprintln!("kill -9 outcomes (phase at kill → job state): {outcomes:?}");
    let succeeded: usize = outcomes
        .iter()
        .filter(|(k, _)| k.ends_with("succeeded"))
        .map(|(_, v)| v)
        .sum();
    assert!(
        succeeded < points,
        "every kill came too late to interrupt anything: {outcomes:?}"
    );
    assert!(
        outcomes.keys().any(|k| k.starts_with("copying")),
        "no kill during a copy: {outcomes:?}"
    );

    // Recovery with libvirt away: the job is neither closed nor forgotten; it settles once
    // libvirt is back (issue 11, item 14).
    let c = unix(&h, Some(ADMIN));
    let id = start_backup(&rt, &c, &inst, "local", json!({"level": "full"}));
    let t = Instant::now();
    loop {
        let (_, v) = call(&rt, &c, "GET", &format!("/v1/jobs/{id}"), None);
        if v["job"]["phase"] == "copying" {
            break;
        }
        assert!(
            v["job"]["state"] == "running" || v["job"]["state"] == "queued",
            "ended before the copy: {v}"
        );
        assert!(t.elapsed() < Duration::from_secs(60), "never copying: {v}");
        std::thread::sleep(Duration::from_millis(5));
    }
    h.kill9();
    let good = std::fs::read_to_string(&h.config).expect("config");
    let away = good.replace(
        "[libvirt]\n",
        "[libvirt]\nuri = \"qemu+unix:///system?socket=/nonexistent/libvirt-sock\"\n",
    );
    assert_ne!(good, away);
    std::fs::write(&h.config, away).expect("config");
    h.spawn();
    let c = unix(&h, Some(ADMIN));
    let (_, v) = call(&rt, &c, "GET", &format!("/v1/jobs/{id}"), None);
    assert_eq!(v["job"]["state"], "recovering", "{v}");
    assert!(
        dom.checkpoints().contains(&format!(
            "cbt-{}",
            v["job"]["backup_id"].as_str().unwrap_or("")
        )),
        "the interrupted backup's checkpoint went without libvirt?"
    );
    h.kill9();
    std::fs::write(&h.config, good).expect("config");
    h.spawn();
    let c = unix(&h, Some(ADMIN));
    let (_, v) = call(&rt, &c, "GET", &format!("/v1/jobs/{id}"), None);
    assert_eq!(v["job"]["state"], "interrupted", "{v}");
    let all = only_committed(&rt, &sink_dir);
    assert_eq!(dom.checkpoints(), vec![newest_checkpoint(&all)]);
    assert!(!virsh(&["domjobinfo", &inst]).contains("Backup"));
}
