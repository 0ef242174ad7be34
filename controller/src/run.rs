//! A workload run: find each member's host, hold the members on every host at once (freeze
//! or pause, with each host's own deadline), take every point in time, release, follow the
//! copies, and record the workload snapshot on the sink, create-only and last: a snapshot
//! exists if and only if its record does. A run that fails removes the member backups it
//! made, so no half snapshot is left looking like a whole one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use hostd::client::Client;
use libcbt::format::BackupId;
use libcbt::sink::Sink;
use serde_json::{json, Value};

use crate::state::State;
use crate::store::{now_ms, Consistency, Run, Workload};

/// A member found on a host.
#[derive(Debug, Clone)]
pub struct Located {
    pub host: usize,
    pub uuid: String,
    pub name: String,
}

type Step = Result<Value, String>;

/// How long one request to a host may take (a group's points in time answer within its hold
/// timeout, at most 300 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(330);

async fn call(c: &Client, method: &str, path: &str, body: Option<Value>) -> Step {
    let r = tokio::time::timeout(CALL_TIMEOUT, c.call(method, path, body.as_ref()))
        .await
        .map_err(|_| format!("{method} {path}: no answer within {CALL_TIMEOUT:?}"))?;
    match r {
        Ok(r) if (200..300).contains(&r.status) => Ok(r.json()),
        Ok(r) => {
            let v = r.json();
            Err(format!(
                "{method} {path}: {} {}",
                r.status,
                v["error"]["message"].as_str().unwrap_or("")
            ))
        }
        Err(e) => Err(format!("{method} {path}: {e}")),
    }
}

/// Where each member runs now: every host is asked (a member that migrated is found where it
/// went). Only instances of the workload's tenant count: a workload never reaches another
/// tenant's instance, whatever it names.
pub async fn locate(st: &State, w: &Workload) -> Result<(Vec<Located>, Vec<String>), String> {
    let lists = join_all(
        st.hosts
            .iter()
            .map(|(_, c)| call(c, "GET", "/v1/instances", None)),
    )
    .await;
    let mut found: BTreeMap<String, Vec<Located>> = BTreeMap::new();
    for (h, l) in lists.into_iter().enumerate() {
        let l = l.map_err(|e| format!("host {}: {e}", st.hosts[h].0.name))?;
        for i in l["instances"].as_array().into_iter().flatten() {
            if i["tenant"].as_str() != Some(w.tenant.as_str()) {
                continue;
            }
            let (uuid, name) = (
                i["uuid"].as_str().unwrap_or_default().to_string(),
                i["name"].as_str().unwrap_or_default().to_string(),
            );
            for m in &w.instances {
                if *m == uuid || *m == name {
                    found.entry(m.clone()).or_default().push(Located {
                        host: h,
                        uuid: uuid.clone(),
                        name: name.clone(),
                    });
                }
            }
        }
    }
    let mut out: Vec<Located> = Vec::new();
    let mut absent = Vec::new();
    for m in &w.instances {
        match found.remove(m).unwrap_or_default().as_slice() {
            [] => absent.push(m.clone()),
            [one] if out.iter().any(|o| o.uuid == one.uuid) => {
                return Err(format!("{m} names a member named already"))
            }
            [one] => out.push(one.clone()),
            many => {
                return Err(format!(
                    "{m} is on {} hosts at once; refusing to guess",
                    many.len()
                ))
            }
        }
    }
    Ok((out, absent))
}

/// Runs `run` of `w` to its end, recording progress and the result in the store.
pub async fn run_workload(st: Arc<State>, mut run: Run, w: Workload) {
    let r = execute(&st, &mut run, &w).await;
    match r {
        Ok(record) => {
            run.state = "succeeded".into();
            run.detail = record;
        }
        Err(e) => {
            tracing::warn!(run = %run.id, error = %e, "workload run failed");
            run.state = "failed".into();
            run.error = Some(e);
        }
    }
    run.finished_ms = Some(now_ms());
    if let Err(e) = st.store.update_run(&run) {
        tracing::error!(run = %run.id, error = %e, "recording the run's end failed");
    }
}

fn progress(st: &State, run: &mut Run, phase: &str, extra: Value) {
    run.detail = json!({"phase": phase, "detail": extra});
    let _ = st.store.update_run(run);
}

async fn execute(st: &State, run: &mut Run, w: &Workload) -> Result<Value, String> {
    let o = &w.options;
    let (members, absent) = locate(st, w).await?;
    if members.is_empty() {
        return Err("no member of the workload was found on any host".into());
    }
    let backup_id = BackupId::generate().to_string();
    let labels = json!({"workload": w.id, "run": run.id});
    let mut by_host: BTreeMap<usize, Vec<&Located>> = BTreeMap::new();
    for m in &members {
        by_host.entry(m.host).or_default().push(m);
    }
    let hosts: Vec<usize> = by_host.keys().copied().collect();
    let client = |h: usize| &st.hosts[h].1;
    let group = format!("/v1/groups/{}", run.id);
    let (release_path, backups_path) = (format!("{group}/release"), format!("{group}/backups"));
    // Per member: its job and what the group said of it.
    let mut jobs: Vec<(Located, String, Value)> = Vec::new();
    let started = now_ms();
    match o.consistency {
        Consistency::None => {
            progress(st, run, "starting", json!({"backup_id": backup_id}));
            for m in &members {
                let body = json!({"instance": m.uuid, "sink": o.sink, "level": o.level,
                                  "backup_id": backup_id, "labels": labels});
                match call(client(m.host), "POST", "/v1/backups", Some(body)).await {
                    Ok(v) => jobs.push((
                        m.clone(),
                        v["job"]["id"].as_str().unwrap_or_default().to_string(),
                        Value::Null,
                    )),
                    Err(e) => {
                        cancel(st, &jobs).await;
                        forget(st, o.sink.as_str(), &backup_id, &jobs).await;
                        return Err(format!("{}: {e}", m.name));
                    }
                }
            }
        }
        Consistency::Crash | Consistency::Application => {
            let mode = if o.consistency == Consistency::Crash {
                "pause"
            } else {
                "freeze"
            };
            progress(st, run, "holding", json!({"backup_id": backup_id}));
            let held = join_all(hosts.iter().map(|&h| {
                let body = json!({"id": run.id, "mode": mode,
                                  "hold_timeout_secs": o.hold_timeout_secs,
                                  "instances": by_host[&h].iter().map(|m| &m.uuid).collect::<Vec<_>>()});
                call(client(h), "POST", "/v1/groups", Some(body))
            }))
            .await;
            // Each host's release, asked again for a few seconds when it does not answer (its
            // deadline is the last resort).
            let release_all = || {
                let rp = &release_path;
                join_all(hosts.iter().map(move |&h| async move {
                    let mut r = call(client(h), "POST", rp, None).await;
                    for _ in 0..5 {
                        if r.is_ok() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        r = call(client(h), "POST", rp, None).await;
                    }
                    r
                }))
            };
            if let Some((h, Err(e))) = hosts.iter().zip(&held).find(|(_, r)| r.is_err()) {
                release_all().await;
                return Err(format!("host {}: {e}", st.hosts[*h].0.name));
            }
            progress(st, run, "points_in_time", json!({"backup_id": backup_id}));
            let pits = join_all(hosts.iter().map(|&h| {
                let body = json!({"sink": o.sink, "level": o.level, "backup_id": backup_id,
                                  "labels": labels});
                call(client(h), "POST", &backups_path, Some(body))
            }))
            .await;
            let released = release_all().await;
            let mut failure = None;
            for (&h, p) in hosts.iter().zip(&pits) {
                match p {
                    Ok(v) => {
                        for j in v["jobs"].as_array().into_iter().flatten() {
                            let uuid = j["instance"].as_str().unwrap_or_default();
                            if let Some(m) = by_host[&h].iter().find(|m| m.uuid == uuid) {
                                jobs.push((
                                    (*m).clone(),
                                    j["job"].as_str().unwrap_or_default().to_string(),
                                    Value::Null,
                                ));
                            }
                        }
                        if v["complete"] != true {
                            failure.get_or_insert(format!(
                                "host {}: not every member took its point in time: {}",
                                st.hosts[h].0.name, v["group"]["members"]
                            ));
                        }
                    }
                    Err(e) => {
                        failure.get_or_insert(format!("host {}: {e}", st.hosts[h].0.name));
                    }
                }
            }
            // What each host said of its members at the release: hold times, points in time.
            for (&h, r) in hosts.iter().zip(&released) {
                let Ok(v) = r else {
                    failure
                        .get_or_insert(format!("host {}: the release failed", st.hosts[h].0.name));
                    continue;
                };
                // Released by us, after every host's points in time had answered: each hold
                // covered every point in time. Released by a deadline first: it did not.
                if v["group"]["released"]["reason"] != "release" {
                    failure.get_or_insert(format!(
                        "host {}: its hold ended ({}) before the release: no common cut",
                        st.hosts[h].0.name, v["group"]["released"]["reason"]
                    ));
                }
                for gm in v["group"]["members"].as_array().into_iter().flatten() {
                    if let Some(j) = jobs
                        .iter_mut()
                        .find(|(m, _, _)| m.host == h && gm["instance"] == m.uuid.as_str())
                    {
                        j.2 = gm.clone();
                    }
                }
            }
            if let Some(e) = failure {
                cancel(st, &jobs).await;
                forget(st, o.sink.as_str(), &backup_id, &jobs).await;
                return Err(e);
            }
        }
    }
    // The copies: followed to their end.
    let mut ends = Vec::new();
    for (m, job, _) in &jobs {
        progress(
            st,
            run,
            "copying",
            json!({"backup_id": backup_id, "member": m.name, "job": job}),
        );
        ends.push(follow(client(m.host), job).await);
    }
    if let Some((m, e)) = jobs
        .iter()
        .zip(&ends)
        .find_map(|((m, _, _), e)| e.as_ref().err().map(|e| (m, e)))
    {
        let e = format!("{}: {e}", m.name);
        forget(st, o.sink.as_str(), &backup_id, &jobs).await;
        return Err(e);
    }
    let pits: Vec<u64> = jobs
        .iter()
        .filter_map(|(_, _, g)| g["point_in_time_ms"].as_u64())
        .collect();
    let skew = match (pits.iter().min(), pits.iter().max()) {
        (Some(a), Some(b)) if pits.len() == jobs.len() => Some(b - a),
        _ => None,
    };
    let record = json!({
        "workload": w.id, "name": w.name, "tenant": w.tenant, "snapshot": backup_id,
        "run": run.id, "consistency": o.consistency, "sink": o.sink,
        "started_ms": started, "finished_ms": now_ms(),
        "point_in_time_skew_ms": skew, "absent": absent,
        "members": jobs.iter().zip(&ends).map(|((m, job, g), end)| {
            let end = end.as_ref().ok();
            json!({
                "instance": m.uuid, "name": m.name, "host": st.hosts[m.host].0.name,
                "backup_id": backup_id, "job": job,
                "consistency": end.and_then(|e| e["result"]["consistency"].as_str()),
                "hold_ms": g["hold_ms"], "point_in_time_ms": g["point_in_time_ms"],
                "disks": end.map(|e| e["result"]["disks"].clone()),
            })
        }).collect::<Vec<_>>(),
    });
    let sink = match st.sink(&o.sink).await {
        Ok(s) => s,
        Err(e) => {
            forget(st, o.sink.as_str(), &backup_id, &jobs).await;
            return Err(format!("sink {}: {e}", o.sink));
        }
    };
    let name = format!("workloads/{}/{}.json", w.id, backup_id);
    let bytes = record.to_string().into_bytes();
    if let Err(e) = sink.put_new(&name, bytes.clone()).await {
        // An answer lost after the write landed: the record is there, so is the snapshot.
        let there = matches!(sink.get(&name, 1 << 20).await, Ok(b) if b == bytes);
        if !there {
            forget(st, o.sink.as_str(), &backup_id, &jobs).await;
            return Err(format!("recording the snapshot on {}: {e}", o.sink));
        }
    }
    tracing::info!(workload = %w.id, snapshot = %backup_id, members = jobs.len(), "workload snapshot recorded");
    Ok(record)
}

/// Follows a job on its host to its end: its final status, or why it did not succeed.
async fn follow(c: &Client, job: &str) -> Step {
    let mut errors = 0;
    loop {
        match call(c, "GET", &format!("/v1/jobs/{job}"), None).await {
            Ok(v) => {
                errors = 0;
                match v["job"]["state"].as_str() {
                    Some("succeeded") => return Ok(v["job"].clone()),
                    Some("queued") | Some("running") | Some("recovering") => {}
                    // failed, cancelled, interrupted (its host restarted), or unknown to us.
                    other => {
                        return Err(format!(
                            "job {job} {}: {}",
                            other.unwrap_or("ended"),
                            v["job"]["error"].as_str().unwrap_or("")
                        ))
                    }
                }
            }
            // A host restarting: its journal keeps the job; asked again for a while.
            Err(e) => {
                errors += 1;
                if errors > 120 {
                    return Err(e);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn cancel(st: &State, jobs: &[(Located, String, Value)]) {
    for (m, job, _) in jobs {
        let _ = call(
            &st.hosts[m.host].1,
            "POST",
            &format!("/v1/jobs/{job}/cancel"),
            None,
        )
        .await;
    }
}

/// Removes the member backups a failed run committed (the others were rolled back by their
/// hosts): no snapshot record names them, and none will.
async fn forget(st: &State, sink: &str, backup_id: &str, jobs: &[(Located, String, Value)]) {
    for (m, job, _) in jobs {
        let c = &st.hosts[m.host].1;
        // Wait for the job to end first: a copy still running commits later.
        let _ = follow(c, job).await;
        let path = format!("/v1/backups/{sink}/{backup_id}?instance={}", m.uuid);
        if let Err(e) = call(c, "DELETE", &path, None).await {
            if !e.contains(" 404 ") {
                tracing::warn!(member = %m.name, error = %e, "removing a member backup of a failed run failed");
            }
        }
    }
}

/// A workload snapshot's restore: its members (from the record) into staging copies.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    /// The workload's tenant: every member restored must be its instance.
    pub tenant: String,
    pub sink: String,
    pub snapshot: String,
    pub suffix: String,
    pub start: bool,
    /// The record's members to restore.
    pub members: Vec<Value>,
}

/// Restores every member of `plan` into a staging copy `<name>-<suffix>` on the host that
/// backed it up (new name, UUID and disk paths, no network interface: hostd's staging copy),
/// all at once, and records the run's end.
pub async fn restore_workload(st: Arc<State>, mut run: Run, plan: RestorePlan) {
    let r = restore_members(&st, &plan).await;
    match r {
        Ok(d) => {
            run.state = "succeeded".into();
            run.detail = d;
        }
        Err((e, d)) => {
            run.state = "failed".into();
            run.error = Some(e);
            run.detail = d;
        }
    }
    run.finished_ms = Some(now_ms());
    if let Err(e) = st.store.update_run(&run) {
        tracing::error!(run = %run.id, error = %e, "recording the run's end failed");
    }
}

async fn restore_members(st: &State, plan: &RestorePlan) -> Result<Value, (String, Value)> {
    // The record comes from storage: a member it names is restored (with the host's admin
    // token) only if that host still serves it as an instance of the workload's tenant.
    let lists = join_all(
        st.hosts
            .iter()
            .map(|(_, c)| call(c, "GET", "/v1/instances", None)),
    )
    .await;
    let owned =
        |h: usize, uuid: &Value| {
            lists[h].as_ref().is_ok_and(|l| {
                l["instances"].as_array().into_iter().flatten().any(|i| {
                    i["uuid"] == *uuid && i["tenant"].as_str() == Some(plan.tenant.as_str())
                })
            })
        };
    let mut started = Vec::new();
    let mut out = Vec::new();
    let mut failure = None;
    for m in &plan.members {
        let name = m["name"].as_str().unwrap_or_default();
        let staging = format!("{name}-{}", plan.suffix);
        let Some(h) = st
            .hosts
            .iter()
            .position(|(c, _)| m["host"] == c.name.as_str())
        else {
            failure.get_or_insert(format!("{name}: host {} is not configured", m["host"]));
            continue;
        };
        if !owned(h, &m["instance"]) {
            failure.get_or_insert(format!(
                "{name}: not an instance of the workload's tenant on {}",
                st.hosts[h].0.name
            ));
            continue;
        }
        let body = json!({"instance": m["instance"], "sink": plan.sink,
                          "backup_id": plan.snapshot,
                          "target": {"type": "domain", "name": staging, "start": plan.start}});
        match call(&st.hosts[h].1, "POST", "/v1/restores", Some(body)).await {
            Ok(v) => started.push((
                h,
                name.to_string(),
                staging,
                v["job"]["id"].as_str().unwrap_or_default().to_string(),
            )),
            Err(e) => {
                failure.get_or_insert(format!("{name}: {e}"));
            }
        }
    }
    for (h, name, staging, job) in started {
        let end = follow(&st.hosts[h].1, &job).await;
        if let Err(e) = &end {
            failure.get_or_insert(format!("{name}: {e}"));
        }
        out.push(
            json!({"name": name, "host": st.hosts[h].0.name, "staging": staging,
                        "job": job, "state": if end.is_ok() { "succeeded" } else { "failed" },
                        "domain": end.ok().map(|e| e["result"]["domain"].clone())}),
        );
    }
    let detail = json!({"kind": "restore", "snapshot": plan.snapshot, "members": out});
    match failure {
        None => Ok(detail),
        Some(e) => Err((e, detail)),
    }
}
