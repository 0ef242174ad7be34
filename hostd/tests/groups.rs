//! Consistency groups on real guests (the busybox/TCG test guest, three of them) through a real
//! `cbt-hostd`: a pause-mode cut across the guests proven by a writer outside them, freeze
//! mode stopping the guests' own writes, deadlines the daemon keeps by itself, and a daemon
//! that dies or stops while holding.
//!
//! The cross-VM oracle: a writer on the host writes a global sequence number round-robin into
//! the first MiB of the three guests' disks, each write through the guest agent and confirmed
//! before the next (so write n+1 happens after write n, across guests). In every restored group
//! backup the numbers found must be exactly 0..N for some N: no write present without every
//! earlier one. A paused or frozen guest refuses the agent, so the writer waits for the release.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostd::client::{Client, Endpoint};
use hostd::config::token_hash;
use serde_json::{json, Value};
use support::*;

const ADMIN: &str = "admin-token-groups-0123";
const TA: &str = "tenant-a-token-groups";
const TB: &str = "tenant-b-token-groups";

fn config() -> String {
    format!(
        r#"[server]
unix_socket = "{{dir}}/hostd.sock"
state_dir = "{{dir}}/state"
restore_dirs = ["{{dir}}/restores"]
shutdown_grace_secs = 20

[libvirt]
default_tenant = "nobody"

[limits]
max_jobs = 2
max_jobs_per_tenant = 1

[[sink]]
name = "local"
path = "{{dir}}/sink"

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

fn client(h: &Hostd, token: &str) -> Client {
    Client::new(Endpoint::Unix(h.socket()), Some(token.into()))
}

/// One guest-agent command through libvirt; `None` when refused (a paused or frozen guest).
fn agent(dom: &str, cmd: &Value) -> Option<Value> {
    let o = Command::new("virsh")
        .args(["-c", URI, "qemu-agent-command", "--timeout", "10", dom])
        .arg(cmd.to_string())
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// Writes sequence number `seq` into 512-byte slot `slot` of the guest's disk, through its
/// agent, and returns once the guest says it is on the disk (fsync'd).
fn write_seq(dom: &str, slot: u64, seq: u64) {
    let sh = format!(
        "printf 'CBTSEQ %010d\\n' {seq} | dd of=/dev/vda bs=512 seek={slot} count=1 \
         conv=sync,notrunc,fsync 2>/dev/null"
    );
    let exec = json!({"execute": "guest-exec",
                      "arguments": {"path": "/bin/sh", "arg": ["-c", sh],
                                    "env": ["PATH=/bin:/sbin"]}});
    let t = Instant::now();
    loop {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "write {seq} to {dom} never went through"
        );
        let Some(r) = agent(dom, &exec) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let pid = r["return"]["pid"].as_i64().expect("pid");
        let status = json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
        loop {
            assert!(t.elapsed() < Duration::from_secs(120), "write {seq} hangs");
            match agent(dom, &status) {
                Some(s) if s["return"]["exited"] == true => {
                    assert_eq!(s["return"]["exitcode"], 0, "write {seq} to {dom}: {s}");
                    return;
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// The sequence numbers in the first MiB of a restored image of guest `i` of `n`; each must
/// sit in its own slot.
fn seqs(img: &std::path::Path, i: u64, n: u64) -> BTreeSet<u64> {
    let data = std::fs::read(img).expect("read restored image");
    let mut out = BTreeSet::new();
    for (slot, b) in data[..1 << 20].chunks(512).enumerate() {
        if b.iter().all(|&x| x == 0) {
            continue;
        }
        let s = std::str::from_utf8(&b[..18]).expect("slot text");
        let seq: u64 = s
            .strip_prefix("CBTSEQ ")
            .and_then(|x| x.trim().parse().ok())
            .unwrap_or_else(|| panic!("slot {slot} of guest {i} holds {s:?}"));
        assert_eq!(seq % n, i, "seq {seq} in guest {i}");
        assert_eq!(seq / n, slot as u64, "seq {seq} in slot {slot}");
        out.insert(seq);
    }
    out
}

/// The path of domain `dom`'s (first) disk.
fn disk_path(dom: &str) -> String {
    virsh(&["domblklist", dom])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .find(|p| p.starts_with('/'))
        .expect("disk path")
        .to_string()
}

fn domstate(dom: &str) -> String {
    virsh(&["domstate", dom]).trim().to_string()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

struct Writer {
    stop: Arc<AtomicBool>,
    /// Writes confirmed so far (0..done are on the guests' disks).
    done: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(doms: Vec<String>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (s2, d2) = (stop.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            let n = doms.len() as u64;
            let mut seq = 0;
            while !s2.load(Ordering::SeqCst) && seq / n < 2048 {
                write_seq(&doms[(seq % n) as usize], seq / n, seq);
                seq += 1;
                d2.store(seq, Ordering::SeqCst);
            }
        });
        Writer {
            stop,
            done,
            thread: Some(thread),
        }
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("writer");
        }
        self.done()
    }
}

#[test]
fn consistency_groups_hold_guests_cut_exactly_and_keep_their_deadlines() {
    let _g = serial();
    // Three guests of tenant p-a, booted side by side (libvirtd and the guest image made
    // first, once: three threads starting libvirtd race for its pid file).
    libvirtd();
    guest_image();
    let boots: Vec<_> = (0..3)
        .map(|i| std::thread::spawn(move || guest_with(&format!("grp{i}"), "", &nova_owner("p-a"))))
        .collect();
    let doms: Vec<Dom> = boots.into_iter().map(|b| b.join().expect("boot")).collect();
    let names: Vec<String> = doms.iter().map(|d| d.name.clone()).collect();
    let mut h = Hostd::start(&config());
    let rt = rt();
    let (ta, tb) = (client(&h, TA), client(&h, TB));
    let restores = h.dir.path().join("restores");

    // --- tenancy: another tenant neither holds nor sees the group ---
    let (s, v) = call(
        &rt,
        &tb,
        "POST",
        "/v1/groups",
        Some(json!({"instances": [names[0]], "mode": "pause"})),
    );
    assert_eq!(s, 404, "{v}");
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/groups",
        Some(json!({"instances": [names[0], names[0]], "mode": "pause"})),
    );
    assert_eq!(s, 400, "a member named twice: {v}");
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/groups",
        Some(json!({"instances": [names[0]], "mode": "pause", "hold_timeout_secs": 0})),
    );
    assert_eq!(s, 400, "{v}");

    // A guest paused by someone else is not the group's to vouch for (nor to resume).
    virsh(&["suspend", &names[1]]);
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/groups",
        Some(json!({"instances": names, "mode": "pause"})),
    );
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("busy")), "{v}");
    assert_eq!(
        domstate(&names[0]),
        "running",
        "a refused group held nothing"
    );
    virsh(&["resume", &names[1]]);

    // --- pause mode: an exact cut across the three guests ---
    let mut writer = Writer::start(names.clone());
    wait_for(
        "the writer's first writes",
        Duration::from_secs(120),
        || writer.done() >= 6,
    );
    let mut snapshots = Vec::new();
    for round in 0..3 {
        let before = writer.done();
        let (s, v) = call(
            &rt,
            &ta,
            "POST",
            "/v1/groups",
            Some(
                json!({"instances": names, "mode": "pause", "hold_timeout_secs": 60,
                        "id": format!("cut-{round}")}),
            ),
        );
        assert_eq!(s, 201, "{v}");
        let g = &v["group"];
        assert_eq!(g["state"], "held", "{g}");
        for (m, n) in g["members"].as_array().expect("members").iter().zip(&names) {
            assert_eq!(m["held"], true, "{m}");
            assert_eq!(domstate(n), "paused", "{n}");
        }
        // Tenant B does not see it; no other group takes its members meanwhile.
        let (s, _) = call(&rt, &tb, "GET", &format!("/v1/groups/cut-{round}"), None);
        assert_eq!(s, 404);
        let (s, v) = call(
            &rt,
            &ta,
            "POST",
            "/v1/groups",
            Some(json!({"instances": [names[2]], "mode": "freeze"})),
        );
        assert_eq!((s, v["error"]["code"].as_str()), (409, Some("busy")), "{v}");
        let (s, v) = call(
            &rt,
            &ta,
            "POST",
            &format!("/v1/groups/cut-{round}/backups"),
            Some(json!({"sink": "local"})),
        );
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["complete"], true, "{v}");
        let bid = v["backup_id"].as_str().expect("backup id").to_string();
        let skew = v["group"]["point_in_time_skew_ms"].as_u64().expect("skew");
        // The writer is stopped by the pause: nothing more is confirmed while held.
        let held_done = writer.done();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            writer.done(),
            held_done,
            "a write went through a paused group"
        );
        let (s, v) = call(
            &rt,
            &ta,
            "POST",
            &format!("/v1/groups/cut-{round}/release"),
            None,
        );
        assert_eq!(s, 200, "{v}");
        let g = &v["group"];
        assert_eq!(g["released"]["reason"], "release", "{g}");
        for (m, n) in g["members"].as_array().expect("members").iter().zip(&names) {
            let hold = m["hold_ms"].as_u64().expect("hold_ms");
            assert!(hold < 60_000, "{m}");
            assert_eq!(domstate(n), "running", "{n}");
            let job = m["job"].as_str().expect("job");
            let end = follow(&rt, &ta, job).pop().expect("end");
            assert_eq!(end["state"], "succeeded", "{end}");
            assert_eq!(end["result"]["consistency"], "crash", "{end}");
            assert_eq!(
                end["result"]["group"]["id"],
                format!("cut-{round}"),
                "{end}"
            );
        }
        eprintln!(
            "round {round}: {bid}, skew {skew} ms, holds {:?} ms",
            g["members"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| m["hold_ms"].as_u64().unwrap_or(0))
                .collect::<Vec<_>>()
        );
        snapshots.push((bid, before, held_done));
        wait_for("writes after the release", Duration::from_secs(60), || {
            writer.done() >= held_done + 6
        });
    }
    let total = writer.stop();
    for (bid, before, held_done) in &snapshots {
        let mut all = BTreeSet::new();
        for (i, n) in names.iter().enumerate() {
            let out = restores.join(format!("{bid}-{i}.raw"));
            let end = run_job(
                &rt,
                &ta,
                "/v1/restores",
                Some(json!({"instance": n, "sink": "local", "backup_id": bid,
                            "target": {"type": "file", "path": out}})),
            );
            assert_eq!(end["state"], "succeeded", "{end}");
            all.extend(seqs(&out, i as u64, names.len() as u64));
            let _ = std::fs::remove_file(&out);
        }
        let n = all.len() as u64;
        assert_eq!(
            all,
            (0..n).collect::<BTreeSet<_>>(),
            "snapshot {bid}: not a prefix of the writes"
        );
        // Every write confirmed before the hold is in, none confirmed after the release.
        // (A write that landed just before the pause is confirmed after the release: one more.)
        assert!(
            n >= *before && n <= held_done + 1,
            "{bid}: {n} writes, {before}..={held_done}"
        );
        eprintln!("snapshot {bid}: writes 0..{n} (of {total})");
    }

    // --- freeze mode: the guests' own writes stop while held ---
    let quiesced: Vec<usize> = doms
        .iter()
        .map(|d| console_count(d, "CBT-QUIESCED"))
        .collect();
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/groups",
        Some(json!({"instances": names, "mode": "freeze", "hold_timeout_secs": 60, "id": "app"})),
    );
    assert_eq!(s, 201, "{v}");
    // Each guest's freeze hook waited for its writer to be idle.
    wait_for("the hooks' quiesce", Duration::from_secs(10), || {
        doms.iter()
            .zip(&quiesced)
            .all(|(d, q)| console_count(d, "CBT-QUIESCED") == q + 1)
    });
    std::thread::sleep(Duration::from_millis(500));
    let c1: Vec<u64> = doms.iter().map(counter).collect();
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/groups/app/backups",
        Some(json!({"sink": "local"})),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["complete"], true, "{v}");
    std::thread::sleep(Duration::from_secs(2));
    let c2: Vec<u64> = doms.iter().map(counter).collect();
    assert_eq!(c1, c2, "the guests wrote while frozen");
    let (s, v) = call(&rt, &ta, "POST", "/v1/groups/app/release", None);
    assert_eq!(s, 200, "{v}");
    wait_for("the guests write again", Duration::from_secs(60), || {
        doms.iter().zip(&c2).all(|(d, c)| counter(d) > *c)
    });
    for m in v["group"]["members"].as_array().expect("members") {
        let end = follow(&rt, &ta, m["job"].as_str().expect("job"))
            .pop()
            .expect("end");
        assert_eq!(end["state"], "succeeded", "{end}");
        assert_eq!(end["result"]["consistency"], "application", "{end}");
    }

    // --- deadlines: nobody releases; the daemon does, by itself ---
    for mode in ["pause", "freeze"] {
        let id = format!("lost-{mode}");
        let c0: Vec<u64> = doms.iter().map(counter).collect();
        let t = Instant::now();
        let (s, v) = call(
            &rt,
            &ta,
            "POST",
            "/v1/groups",
            Some(json!({"instances": names, "mode": mode, "hold_timeout_secs": 2, "id": id})),
        );
        assert_eq!(s, 201, "{v}");
        let waited = wait_for("the deadline's release", Duration::from_secs(10), || {
            let (_, v) = call(&rt, &ta, "GET", &format!("/v1/groups/{id}"), None);
            v["group"]["state"] == "released"
        });
        let (_, v) = call(&rt, &ta, "GET", &format!("/v1/groups/{id}"), None);
        assert_eq!(v["group"]["released"]["reason"], "deadline", "{v}");
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "released after {waited:?}"
        );
        for n in &names {
            assert_eq!(domstate(n), "running", "{n}");
        }
        wait_for(
            "the guests write after the deadline",
            Duration::from_secs(60),
            || doms.iter().zip(&c0).all(|(d, c)| counter(d) > *c),
        );
        // A point in time after the hold ended is no group's.
        let (s, v) = call(
            &rt,
            &ta,
            "POST",
            &format!("/v1/groups/{id}/backups"),
            Some(json!({"sink": "local"})),
        );
        assert_eq!(s, 409, "{v}");
    }

    // --- a workload across two hosts, run by the controller ---
    workloads_through_the_controller(&rt, &names);

    // --- the daemon dies holding: the next start releases before it serves ---
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/groups",
        Some(json!({"instances": [names[0], names[1]], "mode": "pause",
                    "hold_timeout_secs": 300, "id": "orphan"})),
    );
    assert_eq!(s, 201, "{v}");
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/groups",
        Some(json!({"instances": [names[2]], "mode": "freeze",
                    "hold_timeout_secs": 300, "id": "orphan-app"})),
    );
    assert_eq!(s, 201, "{v}");
    let c0 = counter(&doms[2]);
    h.kill9();
    assert_eq!(domstate(&names[0]), "paused");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(counter(&doms[2]), c0, "a frozen guest wrote");
    h.spawn();
    // Released before the socket answered.
    assert_eq!(domstate(&names[0]), "running");
    assert_eq!(domstate(&names[1]), "running");
    wait_for("the thawed guest writes", Duration::from_secs(60), || {
        counter(&doms[2]) > c0
    });
    assert!(h.log().contains("ending the hold of a previous life"));

    // --- the daemon stops holding: it releases on its way out ---
    let ta = client(&h, TA);
    let (s, v) = call(
        &rt,
        &ta,
        "POST",
        "/v1/groups",
        Some(json!({"instances": names, "mode": "pause", "hold_timeout_secs": 300})),
    );
    assert_eq!(s, 201, "{v}");
    h.term();
    for n in &names {
        assert_eq!(domstate(n), "running", "{n}");
    }
    h.spawn();
    let (s, v) = call(&rt, &client(&h, ADMIN), "GET", "/v1/groups", None);
    assert_eq!(s, 200);
    assert_eq!(v["groups"], json!([]), "{v}");
    for d in &doms {
        assert!(
            !std::fs::read_to_string(d.path("console.log"))
                .unwrap_or_default()
                .contains("CBT-ERROR"),
            "{}",
            d.name
        );
    }
}

/// The `cbt-controller` binary, built beside the daemon by `cargo test --workspace`.
fn controller_bin() -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_BIN_EXE_cbt-hostd")).with_file_name("cbt-controller");
    assert!(
        p.exists(),
        "{} is missing: build the workspace (cargo test --workspace builds it)",
        p.display()
    );
    p
}

struct Controller {
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl Controller {
    fn start(config: &str) -> Controller {
        let dir = shared_dir();
        std::fs::write(
            dir.path().join("controller.toml"),
            config.replace("{dir}", &dir.path().display().to_string()),
        )
        .expect("config");
        let mut c = Controller { dir, child: None };
        c.spawn();
        c
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("controller.sock")
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("controller.log"))
            .expect("log");
        let child = Command::new(controller_bin())
            .arg("--config")
            .arg(self.dir.path().join("controller.toml"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start cbt-controller");
        self.child = Some(child);
        wait_for("the controller's socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(self.socket()).is_ok()
        });
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn client(&self, token: &str) -> Client {
        Client::new(Endpoint::Unix(self.socket()), Some(token.into()))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Two daemons standing in for two hosts (guests 0 and 2 on one, 1 on the other), one sink
/// they share, a controller over them.
fn workloads_through_the_controller(rt: &tokio::runtime::Runtime, names: &[String]) {
    let shared = shared_dir();
    let sink = shared.path().join("nfs");
    let host_cfg = |domains: &[&String]| {
        // By prefix: a member's staging copies are served where the member is.
        let list: Vec<String> = domains.iter().map(|d| format!("\"{d}*\"")).collect();
        config()
            .replace(
                "[libvirt]\n",
                &format!("[libvirt]\ndomains = [{}]\n", list.join(", ")),
            )
            .replace(
                "[[sink]]\nname = \"local\"\npath = \"{dir}/sink\"",
                &format!("[[sink]]\nname = \"nfs\"\npath = \"{}\"", sink.display()),
            )
    };
    let ha = Hostd::start(&host_cfg(&[&names[0], &names[2]]));
    let hb = Hostd::start(&host_cfg(&[&names[1]]));
    let tokf = shared.path().join("admin.token");
    std::fs::write(&tokf, format!("{ADMIN}\n")).expect("token");
    let mut ctl = Controller::start(&format!(
        r#"[server]
unix_socket = "{{dir}}/controller.sock"
database = "{{dir}}/controller.sqlite"

[[host]]
name = "host-a"
hostd = "{}"
token_file = "{}"

[[host]]
name = "host-b"
hostd = "{}"
token_file = "{}"

[[sink]]
name = "nfs"
path = "{}"

[[token]]
name = "a"
sha256 = "{}"
tenant = "p-a"

[[token]]
name = "b"
sha256 = "{}"
tenant = "p-b"
"#,
        ha.socket().display(),
        tokf.display(),
        hb.socket().display(),
        tokf.display(),
        sink.display(),
        token_hash(TA),
        token_hash(TB)
    ));
    let (ca, cb) = (ctl.client(TA), ctl.client(TB));
    // Each daemon serves its own guests only.
    let (_, v) = call(rt, &client(&ha, ADMIN), "GET", "/v1/instances", None);
    assert_eq!(v["instances"].as_array().map(Vec::len), Some(2), "{v}");

    let (s, v) = call(
        rt,
        &ca,
        "POST",
        "/v1/workloads",
        Some(
            json!({"name": "shop", "instances": [names[0], names[1], names[2], "ghost"],
                    "consistency": "crash", "sink": "nfs", "hold_timeout_secs": 30}),
        ),
    );
    assert_eq!(s, 201, "{v}");
    let wid = v["workload"]["id"].as_str().expect("id").to_string();
    // Tenant B neither sees nor runs it; its own workload naming A's guests finds nothing.
    let (s, _) = call(rt, &cb, "GET", &format!("/v1/workloads/{wid}"), None);
    assert_eq!(s, 404);
    let (s, _) = call(rt, &cb, "POST", &format!("/v1/workloads/{wid}/runs"), None);
    assert_eq!(s, 404);
    let (s, v) = call(
        rt,
        &cb,
        "POST",
        "/v1/workloads",
        Some(
            json!({"name": "steal", "instances": [names[0]], "consistency": "none",
                    "sink": "nfs"}),
        ),
    );
    assert_eq!(s, 201, "{v}");
    let steal = v["workload"]["id"].as_str().expect("id").to_string();
    let run_to_end = |c: &Client, wid: &str| -> Value {
        let (s, v) = call(rt, c, "POST", &format!("/v1/workloads/{wid}/runs"), None);
        assert_eq!(s, 202, "{v}");
        let rid = v["run"]["id"].as_str().expect("run").to_string();
        let mut last = Value::Null;
        wait_for("the run's end", Duration::from_secs(300), || {
            let (_, v) = call(rt, c, "GET", &format!("/v1/runs/{rid}"), None);
            last = v["run"].clone();
            last["state"] != "running"
        });
        last
    };
    let r = run_to_end(&cb, &steal);
    assert_eq!(r["state"], "failed", "{r}");
    assert!(
        r["error"].as_str().unwrap_or("").contains("no member"),
        "{r}"
    );

    // Two runs: the first is every member's full, the second their incrementals.
    let mut snaps = Vec::new();
    for round in 0..2 {
        let r = run_to_end(&ca, &wid);
        assert_eq!(r["state"], "succeeded", "{r}");
        let d = &r["detail"];
        assert_eq!(d["absent"], json!(["ghost"]), "{d}");
        let members = d["members"].as_array().expect("members");
        assert_eq!(members.len(), 3, "{d}");
        let hosts: BTreeSet<&str> = members.iter().filter_map(|m| m["host"].as_str()).collect();
        assert_eq!(hosts, BTreeSet::from(["host-a", "host-b"]), "{d}");
        for m in members {
            assert_eq!(m["consistency"], "crash", "{m}");
            assert!(m["hold_ms"].as_u64().is_some(), "{m}");
            let level = m["disks"][0]["level"].as_str().unwrap_or("");
            assert_eq!(
                level,
                if round == 0 { "full" } else { "incremental" },
                "{m}"
            );
        }
        let skew = d["point_in_time_skew_ms"].as_u64().expect("skew");
        eprintln!(
            "workload run {round}: snapshot {}, skew {skew} ms",
            d["snapshot"]
        );
        snaps.push(d["snapshot"].as_str().expect("snapshot").to_string());
    }
    // The records on the sink are the snapshots.
    let (s, v) = call(
        rt,
        &ca,
        "GET",
        &format!("/v1/workloads/{wid}/snapshots"),
        None,
    );
    assert_eq!(s, 200, "{v}");
    let listed: Vec<&str> = v["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .filter_map(|s| s["snapshot"].as_str())
        .collect();
    assert_eq!(listed, snaps.iter().map(String::as_str).collect::<Vec<_>>());
    for s in &snaps {
        assert!(sink.join(format!("workloads/{wid}/{s}.json")).exists());
    }
    // cbtctl speaks to the controller too.
    let o = Command::new(env!("CARGO_BIN_EXE_cbtctl"))
        .args(["snapshots", &wid, "--controller"])
        .arg(ctl.socket())
        .env("CBT_TOKEN", TA)
        .output()
        .expect("cbtctl");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for s in &snaps {
        assert!(
            out.contains(&format!("{s} crash members=3 absent=1")),
            "{out}"
        );
    }

    // The newest snapshot restored into staging copies (new names, no network), which boot
    // and run their writer: each copy's disk changes under it.
    let (s, _) = call(
        rt,
        &cb,
        "POST",
        &format!("/v1/workloads/{wid}/snapshots/{}/restore", snaps[1]),
        Some(json!({})),
    );
    assert_eq!(s, 404, "tenant B restores nothing of A's");
    let (s, v) = call(
        rt,
        &ca,
        "POST",
        &format!("/v1/workloads/{wid}/snapshots/{}/restore", snaps[1]),
        Some(json!({"suffix": "stg"})),
    );
    assert_eq!(s, 202, "{v}");
    let rid = v["run"]["id"].as_str().expect("run").to_string();
    let mut r = Value::Null;
    wait_for("the restore's end", Duration::from_secs(300), || {
        let (_, v) = call(rt, &ca, "GET", &format!("/v1/runs/{rid}"), None);
        r = v["run"].clone();
        r["state"] != "running"
    });
    assert_eq!(r["state"], "succeeded", "{r}");
    let staged: Vec<String> = r["detail"]["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["staging"].as_str().expect("staging").to_string())
        .collect();
    assert_eq!(staged.len(), 3, "{r}");
    let copies: Vec<(String, std::path::PathBuf)> = staged
        .iter()
        .map(|n| {
            assert_eq!(domstate(n), "running", "{n}");
            let xml = virsh(&["dumpxml", n]);
            assert!(!xml.contains("<interface"), "{n} has a network interface");
            let path = disk_path(n);
            let t0 = shared.path().join(format!("{n}.t0"));
            std::fs::copy(&path, &t0).expect("copy");
            (n.clone(), t0)
        })
        .collect();
    for (n, t0) in &copies {
        wait_for("the copy writes its disk", Duration::from_secs(120), || {
            let path = disk_path(n);
            let st = Command::new("qemu-img")
                .args(["compare", "-U", "-q"])
                .arg(t0)
                .arg(&path)
                .status()
                .expect("qemu-img compare");
            st.code() == Some(1)
        });
        let _ = Command::new("virsh")
            .args(["-c", URI, "destroy", n])
            .output();
        let _ = Command::new("virsh")
            .args(["-c", URI, "undefine", n])
            .output();
    }

    // The controller killed during a run: settled at the next start, no snapshot recorded,
    // the hosts release the hold at its deadline by themselves.
    let (s, v) = call(rt, &ca, "POST", &format!("/v1/workloads/{wid}/runs"), None);
    assert_eq!(s, 202, "{v}");
    let rid = v["run"]["id"].as_str().expect("run").to_string();
    std::thread::sleep(Duration::from_millis(300));
    ctl.kill9();
    ctl.spawn();
    let ca = ctl.client(TA);
    let (_, v) = call(rt, &ca, "GET", &format!("/v1/runs/{rid}"), None);
    assert_eq!(v["run"]["state"], "failed", "{v}");
    wait_for("every guest running again", Duration::from_secs(60), || {
        names.iter().all(|n| domstate(n) == "running")
    });
    // Its member jobs end on the hosts (they commit or roll back); no record names them.
    std::thread::sleep(Duration::from_secs(5));
    let (_, v) = call(
        rt,
        &ca,
        "GET",
        &format!("/v1/workloads/{wid}/snapshots"),
        None,
    );
    assert_eq!(v["snapshots"].as_array().map(Vec::len), Some(2), "{v}");
    drop(ha);
    drop(hb);
}
