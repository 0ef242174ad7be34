//! The controller's HTTP/JSON API. Every request carries a bearer token bound to a tenant
//! (or admin); a tenant sees and runs only its own workloads, runs and snapshots, and anything
//! else is a 404, never a hint that it exists.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hostd::config::{find_token, valid_name};
use libcbt::sink::Sink;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::state::State;
use crate::store::{now_ms, Run, RunOptions, Workload};

type St = AxState<Arc<State>>;

pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad(m: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m)
    }

    fn not_found(what: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError::bad(r.body_text())
    }
}

type ApiResult<T> = Result<T, ApiError>;

struct Caller {
    /// `None`: admin.
    tenant: Option<String>,
}

impl Caller {
    fn sees(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }
}

fn auth(st: &State, h: &HeaderMap) -> ApiResult<Caller> {
    let unauth = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let token = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= 512)
        .ok_or_else(|| unauth("missing or malformed bearer token"))?;
    let t = find_token(&st.cfg.tokens, token).ok_or_else(|| unauth("unknown token"))?;
    Ok(Caller {
        tenant: if t.admin { None } else { t.tenant.clone() },
    })
}

pub fn router(st: Arc<State>) -> Router {
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(json!({"status": "ok"})) }),
        )
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/workloads", post(create_workload).get(list_workloads))
        .route(
            "/v1/workloads/{id}",
            get(show_workload).delete(delete_workload),
        )
        .route("/v1/workloads/{id}/runs", post(start_run))
        .route("/v1/workloads/{id}/snapshots", get(list_snapshots))
        .route(
            "/v1/workloads/{id}/snapshots/{snapshot}/restore",
            post(restore_snapshot),
        )
        .route("/v1/runs/{id}", get(show_run))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such route") })
        .layer(axum::extract::DefaultBodyLimit::max(64 << 10))
        .with_state(st)
}

/// Hosts and whether their daemon answers (admin only).
async fn list_hosts(AxState(st): St, h: HeaderMap) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    if c.tenant.is_some() {
        return Err(ApiError::not_found("route"));
    }
    let mut out = Vec::new();
    for (cfg, client) in &st.hosts {
        let up = matches!(client.call("GET", "/v1/health", None).await, Ok(r) if r.status == 200);
        out.push(json!({"name": cfg.name, "hostd": cfg.hostd, "up": up}));
    }
    Ok(Json(json!({ "hosts": out })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadReq {
    name: String,
    instances: Vec<String>,
    /// An admin names the tenant; a tenant's workloads are its own.
    #[serde(default)]
    tenant: Option<String>,
    #[serde(flatten)]
    options: RunOptions,
}

fn visible(st: &State, c: &Caller, id: &str) -> ApiResult<Workload> {
    match st.store.workload(id).map_err(ApiError::internal)? {
        Some(w) if c.sees(&w.tenant) => Ok(w),
        _ => Err(ApiError::not_found("workload")),
    }
}

async fn create_workload(
    AxState(st): St,
    h: HeaderMap,
    body: Result<Json<WorkloadReq>, JsonRejection>,
) -> ApiResult<Response> {
    let c = auth(&st, &h)?;
    let Json(r) = body?;
    if !valid_name(&r.name) {
        return Err(ApiError::bad("name: 1-64 of A-Z a-z 0-9 - _ ."));
    }
    if r.instances.is_empty() || r.instances.len() > 64 {
        return Err(ApiError::bad("instances: between 1 and 64"));
    }
    if r.instances.iter().any(|i| {
        i.is_empty() || i.len() > 128 || i.contains('/') || i.chars().any(char::is_control)
    }) {
        return Err(ApiError::bad("instances: names or UUIDs"));
    }
    let distinct: std::collections::BTreeSet<&String> = r.instances.iter().collect();
    if distinct.len() != r.instances.len() {
        return Err(ApiError::bad("instances: each once"));
    }
    if !(1..=300).contains(&r.options.hold_timeout_secs) {
        return Err(ApiError::bad("hold_timeout_secs: between 1 and 300"));
    }
    if !["auto", "full", "incremental"].contains(&r.options.level.as_str()) {
        return Err(ApiError::bad("level: auto, full or incremental"));
    }
    let tenant = match (&c.tenant, r.tenant) {
        (Some(t), None) => t.clone(),
        (Some(_), Some(_)) => return Err(ApiError::bad("tenant: only an admin names one")),
        (None, Some(t)) if !t.is_empty() && t.len() <= 128 && !t.chars().any(char::is_control) => t,
        (None, _) => {
            return Err(ApiError::bad(
                "tenant: an admin names the workload's tenant",
            ))
        }
    };
    if !st.sink_allowed(&r.options.sink, Some(&tenant)) {
        return Err(ApiError::not_found("sink"));
    }
    let w = Workload {
        id: hostd::registry::new_job_id(),
        tenant,
        name: r.name,
        instances: r.instances,
        options: r.options,
        created_ms: now_ms(),
    };
    st.store.put_workload(&w).map_err(ApiError::internal)?;
    Ok((
        StatusCode::CREATED,
        [("location", format!("/v1/workloads/{}", w.id))],
        Json(json!({ "workload": w })),
    )
        .into_response())
}

async fn list_workloads(AxState(st): St, h: HeaderMap) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    let v = st
        .store
        .workloads(c.tenant.as_deref())
        .map_err(ApiError::internal)?;
    Ok(Json(json!({ "workloads": v })))
}

async fn show_workload(
    AxState(st): St,
    h: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    let w = visible(&st, &c, &id)?;
    let runs = st.store.runs(&w.id).map_err(ApiError::internal)?;
    Ok(Json(json!({ "workload": w, "runs": runs })))
}

async fn delete_workload(
    AxState(st): St,
    h: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    let w = visible(&st, &c, &id)?;
    st.store
        .delete_workload(&w.id)
        .map_err(ApiError::internal)?;
    Ok(Json(json!({ "deleted": w.id })))
}

async fn start_run(AxState(st): St, h: HeaderMap, Path(id): Path<String>) -> ApiResult<Response> {
    let c = auth(&st, &h)?;
    let w = visible(&st, &c, &id)?;
    let runs = st.store.runs(&w.id).map_err(ApiError::internal)?;
    if let Some(r) = runs.iter().find(|r| r.state == "running") {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "busy",
            format!("run {} of this workload is running", r.id),
        ));
    }
    let run = Run::start(&w, json!({"phase": "queued"}));
    // Journaled before anything is asked of a host.
    st.store.insert_run(&run).map_err(ApiError::internal)?;
    tokio::spawn(crate::run::run_workload(st.clone(), run.clone(), w));
    Ok((
        StatusCode::ACCEPTED,
        [("location", format!("/v1/runs/{}", run.id))],
        Json(json!({ "run": run })),
    )
        .into_response())
}

async fn show_run(AxState(st): St, h: HeaderMap, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    match st.store.run(&id).map_err(ApiError::internal)? {
        Some(r) if c.sees(&r.tenant) => Ok(Json(json!({ "run": r }))),
        _ => Err(ApiError::not_found("run")),
    }
}

/// The workload's snapshots: the records on its sink (the truth, whatever the database says).
async fn list_snapshots(
    AxState(st): St,
    h: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    let w = visible(&st, &c, &id)?;
    let sink = st
        .sink(&w.options.sink)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "sink", e.to_string()))?;
    let prefix = format!("workloads/{}/", w.id);
    let objs = sink.list(&prefix).await.map_err(ApiError::internal)?;
    let mut out = Vec::new();
    for o in objs {
        if !o.name.ends_with(".json") {
            continue;
        }
        let b = sink
            .get(&o.name, 1 << 20)
            .await
            .map_err(ApiError::internal)?;
        match serde_json::from_slice::<Value>(&b) {
            // A record names its workload and tenant: another's is never shown.
            Ok(v) if v["workload"] == w.id.as_str() && v["tenant"] == w.tenant.as_str() => {
                out.push(v)
            }
            _ => tracing::warn!(object = %o.name, "not a snapshot record of this workload"),
        }
    }
    out.sort_by(|a, b| a["snapshot"].as_str().cmp(&b["snapshot"].as_str()));
    Ok(Json(json!({ "snapshots": out })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreReq {
    /// The staging copies are named `<member>-<suffix>`.
    #[serde(default = "default_suffix")]
    suffix: String,
    /// Start the copies once restored.
    #[serde(default = "default_true")]
    start: bool,
    /// Only these members (names or UUIDs); default: all.
    #[serde(default)]
    members: Option<Vec<String>>,
}

fn default_suffix() -> String {
    "staging".into()
}

fn default_true() -> bool {
    true
}

/// Restores a workload snapshot: every member (or those named) into a staging copy on the host
/// that backed it up, as a run (followed like a backup run).
async fn restore_snapshot(
    AxState(st): St,
    h: HeaderMap,
    Path((id, snapshot)): Path<(String, String)>,
    body: Result<Json<RestoreReq>, JsonRejection>,
) -> ApiResult<Response> {
    let c = auth(&st, &h)?;
    let w = visible(&st, &c, &id)?;
    let Json(r) = body?;
    if !valid_name(&r.suffix) || r.suffix.len() > 32 {
        return Err(ApiError::bad("suffix: 1-32 of A-Z a-z 0-9 - _ ."));
    }
    if libcbt::format::BackupId::parse(&snapshot).is_err() {
        return Err(ApiError::not_found("snapshot"));
    }
    let sink = st
        .sink(&w.options.sink)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "sink", e.to_string()))?;
    let name = format!("workloads/{}/{snapshot}.json", w.id);
    let record: Value = match sink.get(&name, 1 << 20).await {
        Ok(b) => serde_json::from_slice(&b).map_err(ApiError::internal)?,
        Err(_) => return Err(ApiError::not_found("snapshot")),
    };
    if record["workload"] != w.id.as_str() || record["tenant"] != w.tenant.as_str() {
        return Err(ApiError::not_found("snapshot"));
    }
    let mut members: Vec<Value> = record["members"].as_array().cloned().unwrap_or_default();
    if let Some(want) = &r.members {
        for m in want {
            if !members
                .iter()
                .any(|x| x["name"] == m.as_str() || x["instance"] == m.as_str())
            {
                return Err(ApiError::bad(format!(
                    "members: {m} is not in the snapshot"
                )));
            }
        }
        members.retain(|x| {
            want.iter()
                .any(|m| x["name"] == m.as_str() || x["instance"] == m.as_str())
        });
    }
    let run = Run::start(
        &w,
        json!({"phase": "queued", "kind": "restore", "snapshot": snapshot}),
    );
    st.store.insert_run(&run).map_err(ApiError::internal)?;
    let plan = crate::run::RestorePlan {
        tenant: w.tenant.clone(),
        sink: w.options.sink.clone(),
        snapshot,
        suffix: r.suffix,
        start: r.start,
        members,
    };
    tokio::spawn(crate::run::restore_workload(st.clone(), run.clone(), plan));
    Ok((
        StatusCode::ACCEPTED,
        [("location", format!("/v1/runs/{}", run.id))],
        Json(json!({ "run": run })),
    )
        .into_response())
}
