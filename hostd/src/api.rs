//! The HTTP/JSON API, versioned under `/v1`. See `openapi.rs` for the document served at
//! `/v1/openapi.json`.
//!
//! Authentication: `Authorization: Bearer <token>`; tokens are stored as sha256 in the config.
//! A tenant token sees only its tenant's instances, backups, jobs and sinks (anything else is
//! 404); an admin token sees everything; no or a bad token is 401. Every error is
//! `{"error": {"code": "...", "message": "..."}}`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use libcbt::engine::{self, catalog};
use libcbt::format::{BackupId, BackupStats, Consistency, FullReason, Level, Manifest};
use libcbt::job;
use libcbt::sink::any::AnySink;
use libcbt::sink::Sink;
use libcbt::source::qemu::Requested;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{find_token, valid_name};
use crate::groups;
use crate::inventory::{self, Instance};
use crate::journal::JobState;
use crate::registry::{self, JobStatus, RestoreTo, Work};
use crate::run::{self, blocking_io};
use crate::safe_fs;
use crate::state::AppState;

/// An API error: status, stable code, message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
    fn unavailable(m: &str) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            if let Ok(v) = "Bearer".parse() {
                r.headers_mut().insert("www-authenticate", v);
            }
        }
        r
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = match &r {
            JsonRejection::BytesRejection(_) => StatusCode::PAYLOAD_TOO_LARGE,
            JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_request"
        };
        ApiError::new(status, code, r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad(r.body_text())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token: String,
    /// `None`: admin.
    pub tenant: Option<String>,
}

impl Caller {
    fn sees(&self, tenant: Option<&str>) -> bool {
        match &self.tenant {
            None => true,
            Some(t) => tenant == Some(t.as_str()),
        }
    }
}

fn auth(st: &AppState, headers: &HeaderMap) -> ApiResult<Caller> {
    let unauth = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let h = headers
        .get("authorization")
        .ok_or_else(|| unauth("missing bearer token"))?;
    let token = h
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= 512)
        .ok_or_else(|| unauth("malformed authorization header"))?;
    let t = find_token(&st.cfg.tokens, token).ok_or_else(|| unauth("unknown token"))?;
    Ok(Caller {
        token: t.name.clone(),
        tenant: if t.admin { None } else { t.tenant.clone() },
    })
}

pub fn router(st: Arc<AppState>) -> Router {
    let max = st.cfg.server.max_body_bytes;
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/instances", get(list_instances))
        .route("/v1/instances/{id}", get(show_instance))
        .route("/v1/backups", post(start_backup).get(list_backups))
        .route(
            "/v1/backups/{sink}/{backup_id}",
            get(show_backup).delete(delete_backup),
        )
        .route("/v1/restores", post(start_restore))
        .route("/v1/verifications", post(start_verify))
        .route("/v1/prune", post(prune_backups))
        .route("/v1/gc", post(collect_garbage))
        .route("/v1/mounts", post(create_mount).get(list_mounts))
        .route("/v1/mounts/{id}", get(show_mount).delete(delete_mount))
        .route("/v1/groups", post(create_group).get(list_groups))
        .route("/v1/groups/{id}", get(show_group))
        .route("/v1/groups/{id}/backups", post(group_backups))
        .route("/v1/groups/{id}/release", post(release_group))
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/{id}", get(show_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed",
            )
        })
        .layer(DefaultBodyLimit::max(max))
        .with_state(st)
}

async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}

async fn health(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": if st.shutting_down.load(Ordering::SeqCst) { "stopping" } else { "ok" },
        "version": env!("CARGO_PKG_VERSION"),
        "jobs_active": st.jobs.active(),
    }))
}

async fn metrics(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.render(),
    )
}

async fn instances_of(st: &AppState) -> ApiResult<Vec<Instance>> {
    let src = st
        .libvirt()
        .await
        .ok_or_else(|| ApiError::unavailable("libvirt is unreachable"))?;
    inventory::list(&st.cfg, &src)
        .await
        .map_err(ApiError::internal)
}

/// The instance `id` (name or UUID) if the caller may see it; else 404.
async fn visible_instance(st: &AppState, c: &Caller, id: &str) -> ApiResult<Instance> {
    let src = st
        .libvirt()
        .await
        .ok_or_else(|| ApiError::unavailable("libvirt is unreachable"))?;
    match inventory::get(&st.cfg, &src, id)
        .await
        .map_err(ApiError::internal)?
    {
        Some(i) if c.sees(i.tenant.as_deref()) => Ok(i),
        _ => Err(ApiError::not_found("instance")),
    }
}

async fn list_instances(State(st): State<Arc<AppState>>, h: HeaderMap) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    let all = instances_of(&st).await?;
    let v: Vec<&Instance> = all.iter().filter(|i| c.sees(i.tenant.as_deref())).collect();
    Ok(Json(json!({ "instances": v })))
}

async fn show_instance(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    let i = visible_instance(&st, &c, &id).await?;
    let src = st
        .libvirt()
        .await
        .ok_or_else(|| ApiError::unavailable("libvirt is unreachable"))?;
    let uuid = i.uuid.clone();
    let checkpoints = libcbt::source::libvirt::blocking(move || src.domain(&uuid)?.checkpoints())
        .await
        .map_err(ApiError::internal)?;
    // The last backup of each disk on each sink the caller may use.
    let mut last = BTreeMap::new();
    for s in &st.cfg.sinks {
        if !st.sink_allowed(&s.name, c.tenant.as_deref()) {
            continue;
        }
        let Ok(Some(sink)) = st.sink(&s.name).await else {
            continue;
        };
        for d in &i.disks {
            let id = job::libvirt_disk_id(&i.uuid, &d.target);
            if let Ok(Some(m)) = catalog::latest(&sink, &id).await {
                last.insert(
                    format!("{}/{}", s.name, d.target),
                    json!({"sink": s.name, "disk": d.target, "backup_id": m.backup_id,
                           "level": m.level, "checkpoint": m.checkpoint,
                           "finished_unix_ms": m.finished_unix_ms}),
                );
            }
        }
    }
    Ok(Json(json!({
        "instance": i,
        "checkpoints": checkpoints,
        "last_backups": last.into_values().collect::<Vec<_>>(),
    })))
}

fn valid_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupReq {
    instance: String,
    sink: String,
    #[serde(default)]
    disks: Option<Vec<String>>,
    #[serde(default)]
    level: Option<String>,
    #[serde(default)]
    quiesce: bool,
    #[serde(default)]
    quiesce_timeout_secs: Option<u64>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    backup_id: Option<String>,
}

fn check_sink(st: &AppState, c: &Caller, sink: &str) -> ApiResult<()> {
    if !valid_name(sink) || !st.sink_allowed(sink, c.tenant.as_deref()) {
        return Err(ApiError::not_found("sink"));
    }
    Ok(())
}

fn check_backup_id(id: &str) -> ApiResult<BackupId> {
    BackupId::parse(id).map_err(|e| ApiError::bad(format!("backup_id: {e}")))
}

/// [`run::take_for_rewrite`], refused as a 409.
fn take_for_rewrite(
    st: &AppState,
    instance: &str,
    sink: &str,
) -> ApiResult<Vec<registry::InstanceClaim>> {
    run::take_for_rewrite(st, instance, sink).map_err(submit_error)
}

fn submit_error(e: registry::SubmitError) -> ApiError {
    match e {
        registry::SubmitError::Mounted(_) => {
            ApiError::new(StatusCode::CONFLICT, "mounted", e.to_string())
        }
        registry::SubmitError::InstanceBusy(_) | registry::SubmitError::Running(_) => {
            ApiError::new(StatusCode::CONFLICT, "busy", e.to_string())
        }
        registry::SubmitError::QueueFull(_) => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", e.to_string())
        }
        registry::SubmitError::Journal(_) => ApiError::internal(chain(&e)),
    }
}

/// An error and its causes, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

fn accepting(st: &AppState) -> ApiResult<()> {
    if st.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("the daemon is stopping"));
    }
    Ok(())
}

fn accepted(job: &registry::Job) -> Response {
    let s = job.snapshot();
    (
        StatusCode::ACCEPTED,
        [("location", format!("/v1/jobs/{}", s.id))],
        Json(json!({ "job": s })),
    )
        .into_response()
}

async fn start_backup(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    body: Result<Json<BackupReq>, JsonRejection>,
) -> ApiResult<Response> {
    let c = auth(&st, &h)?;
    accepting(&st)?;
    let Json(r) = body?;
    check_sink(&st, &c, &r.sink)?;
    let i = visible_instance(&st, &c, &r.instance).await?;
    if let Some(d) = &r.disks {
        if d.is_empty() || d.len() > 64 {
            return Err(ApiError::bad("disks: between 1 and 64 targets"));
        }
        for t in d {
            if !i.disks.iter().any(|x| &x.target == t) {
                return Err(ApiError::bad(format!("disks: instance has no disk {t:?}")));
            }
        }
    }
    let requested = parse_level(r.level.as_deref())?;
    let timeout = r.quiesce_timeout_secs.unwrap_or(10);
    if !(1..=300).contains(&timeout) {
        return Err(ApiError::bad("quiesce_timeout_secs: between 1 and 300"));
    }
    check_labels(&r.labels)?;
    let backup_id = match r.backup_id {
        Some(b) => check_backup_id(&b)?,
        None => BackupId::generate(),
    };
    let request = json!({
        "instance": i.uuid, "sink": r.sink, "disks": r.disks, "level": r.level,
        "quiesce": r.quiesce, "labels": r.labels, "caller": c.token,
    });
    let job = run::submit(
        &st,
        i.tenant.clone(),
        &r.sink,
        Work::Backup {
            backup_id,
            domain_uuid: i.uuid.clone(),
            disks: r.disks,
            requested,
            quiesce: r.quiesce.then(|| Duration::from_secs(timeout)),
            labels: r.labels,
            group: None,
        },
        request,
        Vec::new(),
    )
    .await
    .map_err(submit_error)?;
    Ok(accepted(&job))
}

fn parse_level(level: Option<&str>) -> ApiResult<Requested> {
    match level.unwrap_or("auto") {
        "auto" => Ok(Requested::Auto),
        "full" => Ok(Requested::Full),
        "incremental" => Ok(Requested::Incremental),
        other => Err(ApiError::bad(format!(
            "level: {other:?} is not auto, full or incremental"
        ))),
    }
}

fn check_labels(labels: &BTreeMap<String, String>) -> ApiResult<()> {
    if labels.len() > 32
        || labels
            .iter()
            .any(|(k, v)| !valid_label(k) || !valid_label(v))
    {
        return Err(ApiError::bad(
            "labels: at most 32, keys and values 1–128 printable characters",
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupReq {
    #[serde(default)]
    id: Option<String>,
    instances: Vec<String>,
    mode: groups::Mode,
    #[serde(default)]
    hold_timeout_secs: Option<u64>,
}

/// Holds a consistency group: every member frozen or paused, until released or the deadline.
async fn create_group(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    body: Result<Json<GroupReq>, JsonRejection>,
) -> ApiResult<Response> {
    let c = auth(&st, &h)?;
    accepting(&st)?;
    let Json(r) = body?;
    if r.instances.is_empty() || r.instances.len() > 64 {
        return Err(ApiError::bad("instances: between 1 and 64"));
    }
    let timeout = r.hold_timeout_secs.unwrap_or(10);
    if !(1..=300).contains(&timeout) {
        return Err(ApiError::bad("hold_timeout_secs: between 1 and 300"));
    }
    let id = match r.id {
        Some(id) if valid_name(&id) => id,
        Some(_) => return Err(ApiError::bad("id: 1-64 of A-Z a-z 0-9 - _ .")),
        None => registry::new_job_id(),
    };
    let mut members: Vec<(String, String)> = Vec::new();
    for i in &r.instances {
        let inst = visible_instance(&st, &c, i).await?;
        if members.iter().any(|(u, _)| *u == inst.uuid) {
            return Err(ApiError::bad(format!("instances: {i} is named twice")));
        }
        members.push((inst.uuid, inst.name));
    }
    let req = groups::HoldRequest {
        id,
        tenant: c.tenant.clone(),
        mode: r.mode,
        timeout: Duration::from_secs(timeout),
        members,
    };
    // A task of its own: a client that hangs up does not cut a hold short halfway.
    let held = tokio::spawn(groups::hold(st.clone(), req))
        .await
        .map_err(ApiError::internal)?;
    match held {
        Ok(g) => Ok((
            StatusCode::CREATED,
            [("location", format!("/v1/groups/{}", g.id))],
            Json(json!({ "group": g.view() })),
        )
            .into_response()),
        Err(e @ groups::HoldError::Exists(_)) => {
            Err(ApiError::new(StatusCode::CONFLICT, "exists", e.to_string()))
        }
        Err(e @ (groups::HoldError::Busy(_) | groups::HoldError::PausedElsewhere(_))) => {
            Err(ApiError::new(StatusCode::CONFLICT, "busy", e.to_string()))
        }
        Err(groups::HoldError::Stopping) => Err(ApiError::unavailable("the daemon is stopping")),
        Err(groups::HoldError::Libvirt) => Err(ApiError::unavailable("libvirt is unreachable")),
        Err(e @ groups::HoldError::Journal(_)) => Err(ApiError::internal(e)),
        Err(e @ groups::HoldError::Failed(..)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "hold_failed",
            e.to_string(),
        )),
    }
}

fn visible_group(st: &AppState, c: &Caller, id: &str) -> ApiResult<Arc<groups::Group>> {
    st.groups
        .get(c.tenant.as_deref(), id)
        .ok_or_else(|| ApiError::not_found("group"))
}

async fn list_groups(State(st): State<Arc<AppState>>, h: HeaderMap) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    let v: Vec<Value> = st
        .groups
        .all()
        .iter()
        .filter(|g| c.tenant.is_none() || g.tenant == c.tenant)
        .map(|g| g.view())
        .collect();
    Ok(Json(json!({ "groups": v })))
}

async fn show_group(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    Ok(Json(
        json!({ "group": visible_group(&st, &c, &id)?.view() }),
    ))
}

async fn release_group(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    let g = visible_group(&st, &c, &id)?;
    Ok(Json(
        json!({ "group": groups::release(&st, &g, "release").await }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBackupReq {
    sink: String,
    #[serde(default)]
    level: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    backup_id: Option<String>,
}

/// The group's points in time: one backup job per member, under one backup id, each taking
/// its point in time while the group is held (and its queue slots after). Answers when every
/// member has taken its point in time or failed, or the hold has ended.
async fn group_backups(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<GroupBackupReq>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    accepting(&st)?;
    let g = visible_group(&st, &c, &id)?;
    let Json(r) = body?;
    check_sink(&st, &c, &r.sink)?;
    let requested = parse_level(r.level.as_deref())?;
    check_labels(&r.labels)?;
    let backup_id = match r.backup_id {
        Some(b) => check_backup_id(&b)?,
        None => BackupId::generate(),
    };
    g.start_backups()
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "group_state", e))?;
    let mut jobs = Vec::new();
    let mut refused = None;
    for m in g.members() {
        let i = match visible_instance(&st, &c, &m.instance).await {
            Ok(i) => i,
            Err(e) => {
                g.set_error(&m.instance, e.message.clone());
                refused = Some(e);
                break;
            }
        };
        let request = json!({
            "instance": i.uuid, "sink": r.sink, "level": r.level, "labels": r.labels,
            "group": g.id, "caller": c.token,
        });
        let work = Work::Backup {
            backup_id: backup_id.clone(),
            domain_uuid: i.uuid.clone(),
            disks: None,
            requested,
            quiesce: None,
            labels: r.labels.clone(),
            group: Some(g.clone()),
        };
        match run::submit(&st, i.tenant.clone(), &r.sink, work, request, Vec::new()).await {
            Ok(j) => {
                g.set_job(&i.uuid, j.id.clone());
                jobs.push((i.uuid.clone(), j));
            }
            Err(e) => {
                g.set_error(&i.uuid, e.to_string());
                refused = Some(submit_error(e));
                break;
            }
        }
    }
    if let Some(e) = refused {
        // A group backup is every member's or none: the ones started stop (and roll back).
        for (_, j) in &jobs {
            j.request_cancel();
        }
        return Err(e);
    }
    // Until each member has its point in time or has ended; the hold's end ends the wait.
    loop {
        let view = g.members();
        let waiting = jobs.iter().any(|(u, j)| {
            let pit = view
                .iter()
                .any(|m| &m.instance == u && m.point_in_time_ms.is_some());
            !pit && !j.snapshot().terminal()
        });
        if !waiting || g.is_released() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (u, j) in &jobs {
        let s = j.snapshot();
        if s.terminal() {
            if let Some(e) = s.error {
                g.set_error(u, e);
            }
        }
    }
    let members = g.members();
    let complete = members.iter().all(|m| m.point_in_time_ms.is_some());
    Ok(Json(json!({
        "group": g.view(), "backup_id": backup_id, "complete": complete,
        "jobs": jobs.iter().map(|(u, j)| json!({"instance": u, "job": j.id})).collect::<Vec<_>>(),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupsQuery {
    sink: String,
    #[serde(default)]
    instance: Option<String>,
}

/// Tenant of the instance with `uuid`: from libvirt if it still exists, else from the domain
/// XML saved with its newest backup on `sink`.
async fn tenant_of_uuid(st: &AppState, sink: &AnySink, uuid: &str) -> Option<String> {
    if let Some(src) = st.libvirt().await {
        if let Ok(Some(i)) = inventory::get(&st.cfg, &src, uuid).await {
            return i.tenant;
        }
    }
    let objs = sink.list(&format!("domains/{uuid}/")).await.ok()?;
    let newest = objs
        .iter()
        .filter(|o| o.name.ends_with(".xml"))
        .map(|o| &o.name)
        .max()?;
    let x = sink.get(newest, 16 << 20).await.ok()?;
    let d = libcbt::source::libvirt::xml::domain(&String::from_utf8_lossy(&x)).ok()?;
    inventory::tenant_for(&st.cfg, &d.name, uuid, d.project.as_deref())
}

/// The configured sink `name`: 404 when there is none, 503 when it cannot be reached.
async fn open_sink(st: &AppState, name: &str) -> ApiResult<AnySink> {
    match st.sink(name).await {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(ApiError::not_found("sink")),
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "sink_unavailable",
            format!("sink {name}: {}", chain(&e)),
        )),
    }
}

/// Backups on `sink` visible to the caller, grouped by instance and backup id.
async fn backups_on(
    st: &AppState,
    c: &Caller,
    sink_name: &str,
    instance_uuid: Option<&str>,
) -> ApiResult<Vec<BackupView>> {
    let sink = open_sink(st, sink_name).await?;
    let mut by: BTreeMap<(String, String), Vec<Manifest>> = BTreeMap::new();
    let mut tenants: BTreeMap<String, Option<String>> = BTreeMap::new();
    for d in catalog::list_disks(&sink)
        .await
        .map_err(ApiError::internal)?
    {
        let Some((uuid, _target)) = d.split_once('.') else {
            continue;
        };
        if instance_uuid.is_some_and(|u| u != uuid) {
            continue;
        }
        if !tenants.contains_key(uuid) {
            let t = tenant_of_uuid(st, &sink, uuid).await;
            tenants.insert(uuid.to_string(), t);
        }
        if !c.sees(tenants[uuid].as_deref()) {
            continue;
        }
        for m in catalog::list_backups(&sink, &d)
            .await
            .map_err(ApiError::internal)?
        {
            by.entry((uuid.to_string(), m.backup_id.clone()))
                .or_default()
                .push(m);
        }
    }
    let mut out = Vec::new();
    for ((uuid, id), ms) in by {
        // The labels live in the job record; a backup whose record is missing or unreadable
        // is still listed, without them.
        let labels = sink
            .get(&run::record_name(&uuid, &id), 1 << 20)
            .await
            .ok()
            .and_then(|b| serde_json::from_slice::<RecordLabels>(&b).ok())
            .map(|r| r.labels)
            .unwrap_or_default();
        out.push(BackupView {
            finished_unix_ms: ms.iter().map(|m| m.finished_unix_ms).max().unwrap_or(0),
            tenant: tenants.get(&uuid).cloned().flatten(),
            sink: sink_name.to_string(),
            labels,
            consistency: ms.first().map(|m| m.consistency),
            disks: ms.iter().map(DiskView::of).collect(),
            backup_id: id,
            instance: uuid,
        });
    }
    out.sort_by_key(|b| b.finished_unix_ms);
    Ok(out)
}

/// What a client sees of a backup: the disks of one instance committed under one id.
#[derive(Debug, Serialize)]
struct BackupView {
    backup_id: String,
    instance: String,
    tenant: Option<String>,
    sink: String,
    finished_unix_ms: u64,
    labels: BTreeMap<String, String>,
    consistency: Option<Consistency>,
    disks: Vec<DiskView>,
}

impl BackupView {
    /// The disks' device names (`vda`), as restores name them.
    fn targets(&self) -> Vec<String> {
        self.disks.iter().filter_map(|d| d.target.clone()).collect()
    }
}

/// One disk of a [`BackupView`], from its manifest.
#[derive(Debug, Serialize)]
struct DiskView {
    disk: String,
    target: Option<String>,
    level: Level,
    full_reason: Option<FullReason>,
    parent: Option<String>,
    disk_size: u64,
    stats: BackupStats,
    checkpoint: Option<String>,
    freeze_ms: Option<u64>,
    warnings: Vec<String>,
}

impl DiskView {
    fn of(m: &Manifest) -> DiskView {
        DiskView {
            disk: m.disk.clone(),
            target: m.disk.split_once('.').map(|x| x.1.to_string()),
            level: m.level,
            full_reason: m.full_reason,
            parent: m.parent.clone(),
            disk_size: m.disk_size,
            stats: m.stats.clone(),
            checkpoint: m.checkpoint.clone(),
            freeze_ms: m.freeze_ms,
            warnings: m.warnings.clone(),
        }
    }
}

/// The part of a job record (`run::record_name`) that listings show.
#[derive(Debug, Deserialize)]
struct RecordLabels {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

async fn resolve_uuid(st: &AppState, c: &Caller, instance: &str) -> ApiResult<String> {
    // A live instance by name or UUID; else a UUID of an instance that may be gone.
    if let Some(src) = st.libvirt().await {
        if let Ok(Some(i)) = inventory::get(&st.cfg, &src, instance).await {
            if c.sees(i.tenant.as_deref()) {
                return Ok(i.uuid);
            }
            return Err(ApiError::not_found("instance"));
        }
    }
    let ok = instance.len() == 36 && instance.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if ok {
        Ok(instance.to_ascii_lowercase())
    } else {
        Err(ApiError::not_found("instance"))
    }
}

async fn list_backups(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    q: Result<Query<BackupsQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    let Query(q) = q?;
    check_sink(&st, &c, &q.sink)?;
    let uuid = match &q.instance {
        Some(i) => Some(resolve_uuid(&st, &c, i).await?),
        None => None,
    };
    let v = backups_on(&st, &c, &q.sink, uuid.as_deref()).await?;
    Ok(Json(json!({ "backups": v })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceQuery {
    instance: String,
}

async fn find_backup(
    st: &AppState,
    c: &Caller,
    sink: &str,
    id: &str,
    instance: &str,
) -> ApiResult<BackupView> {
    check_sink(st, c, sink)?;
    check_backup_id(id).map_err(|_| ApiError::not_found("backup"))?;
    let uuid = resolve_uuid(st, c, instance).await?;
    backups_on(st, c, sink, Some(&uuid))
        .await?
        .into_iter()
        .find(|b| b.backup_id == id)
        .ok_or_else(|| ApiError::not_found("backup"))
}

async fn show_backup(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    Path((sink, id)): Path<(String, String)>,
    q: Result<Query<InstanceQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    let Query(q) = q?;
    Ok(Json(
        json!({ "backup": find_backup(&st, &c, &sink, &id, &q.instance).await? }),
    ))
}

async fn delete_backup(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    Path((sink, id)): Path<(String, String)>,
    q: Result<Query<InstanceQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    accepting(&st)?;
    let Query(q) = q?;
    let b = find_backup(&st, &c, &sink, &id, &q.instance).await?;
    let uuid = b.instance.clone();
    // No backup, restore or verification of this instance may start while its backups are
    // being deleted.
    let _taken = take_for_rewrite(&st, &uuid, &sink)?;
    let s = open_sink(&st, &sink).await?;
    let disks: Vec<String> = b.disks.into_iter().map(|d| d.disk).collect();
    // Backups that depend on it take its index in (a fold: metadata only), so any backup
    // can go, the full of a chain included.
    let plan = engine::plan_delete(&s, &disks, &id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found("backup"))?;
    if let Some(engine::Hold::Locked(t)) = plan
        .iter()
        .find(|e| e.id == id)
        .and_then(|e| e.hold.clone())
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "locked",
            format!(
                "backup {id} is locked on its sink (S3 Object Lock) until {}",
                chrono::DateTime::from_timestamp_millis(t as i64)
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default()
            ),
        ));
    }
    let report = engine::prune(&s, &plan, Some(&uuid))
        .await
        .map_err(ApiError::internal)?;
    tracing::info!(backup = %id, instance = %uuid, objects = report.objects,
                   folds = report.folds, "backup deleted");
    st.metrics.pruned("delete", &report);
    Ok(Json(json!({
        "deleted": id, "objects": report.objects, "folds": report.folds,
        "bytes_reclaimed": report.bytes_reclaimed,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GcReq {
    sink: String,
    /// Default: `limits.gc_grace_secs`.
    #[serde(default)]
    grace_secs: Option<u64>,
    /// Then compact the sparse segments of every disk whose instance is idle.
    #[serde(default)]
    compact: bool,
    /// Live fraction under which a segment is rewritten (default 0.5).
    #[serde(default)]
    threshold: Option<f64>,
    /// Live bytes copied at most, over all disks, in MiB (default 4096).
    #[serde(default)]
    max_copy_mib: Option<u64>,
    /// Answer 202 with the job at once instead of its result at its end.
    #[serde(default)]
    background: bool,
}

/// `POST /v1/gc` (admin): a job that collects the sink's garbage now, as the hourly
/// housekeeping does: unfinished uploads and unreferenced objects older than the grace period
/// and not covered by a live in-progress marker; safe with backups and prunes running
/// anywhere. With `compact`, then the sparse segments of every idle instance's disks (see
/// `run::compact_sink`).
async fn collect_garbage(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    body: Result<Json<GcReq>, JsonRejection>,
) -> ApiResult<Response> {
    let c = auth(&st, &h)?;
    accepting(&st)?;
    if c.tenant.is_some() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "garbage collection is for admin tokens only: a sink is shared by tenants",
        ));
    }
    let Json(r) = body?;
    let min = 6 * engine::MARKER_REFRESH.as_secs();
    let grace = r.grace_secs.unwrap_or(st.cfg.limits.gc_grace_secs);
    if grace < min {
        return Err(ApiError::bad(format!(
            "grace_secs: at least {min} (six in-progress marker renewals)"
        )));
    }
    let threshold = r.threshold.unwrap_or(0.5);
    if !(threshold > 0.0 && threshold <= 1.0) {
        return Err(ApiError::bad("threshold: a fraction in (0, 1]"));
    }
    // The sink exists and opens before a job is made of it.
    open_sink(&st, &r.sink).await?;
    let compact = r.compact.then(|| registry::Compaction {
        threshold,
        max_bytes: r.max_copy_mib.unwrap_or(4096).saturating_mul(1 << 20),
    });
    let request = json!({"sink": r.sink, "grace_secs": grace, "compact": r.compact,
                         "threshold": threshold, "max_copy_mib": r.max_copy_mib, "caller": c.token});
    let job = run::submit(
        &st,
        None,
        &r.sink,
        Work::Gc {
            grace: Duration::from_secs(grace),
            compact,
        },
        request,
        Vec::new(),
    )
    .await
    .map_err(submit_error)?;
    if r.background {
        return Ok(accepted(&job));
    }
    ended(&st, &job).await
}

/// Waits for `job` to end: its result and id (200), or why it did not succeed (409 when
/// cancelled, 500 when it failed). A job that outlasts half the TLS idle timeout is answered
/// 202 with the job (a silent connection would be closed); a client that leaves meanwhile
/// leaves the job running.
async fn ended(st: &AppState, job: &registry::Job) -> ApiResult<Response> {
    let wait = Duration::from_secs((st.cfg.server.idle_timeout_secs / 2).max(1));
    let mut rx = job.status.subscribe();
    let s = match tokio::time::timeout(wait, rx.wait_for(|s| s.terminal())).await {
        Err(_) => return Ok(accepted(job)),
        Ok(Ok(s)) => s.clone(),
        Ok(Err(_)) => job.snapshot(),
    };
    match s.state {
        JobState::Succeeded => {
            let mut v = s.result.clone().unwrap_or_else(|| json!({}));
            v["job"] = json!(s.id);
            Ok(Json(v).into_response())
        }
        JobState::Cancelled => Err(ApiError::new(
            StatusCode::CONFLICT,
            "cancelled",
            format!(
                "job {} was cancelled: {}",
                s.id,
                s.error.unwrap_or_default()
            ),
        )),
        _ => Err(ApiError::internal(format!(
            "job {} {}: {}",
            s.id,
            s.state,
            s.error.unwrap_or_default()
        ))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneReq {
    instance: String,
    sink: String,
    /// No rule: everything stays.
    #[serde(default)]
    policy: libcbt::retention::KeepPolicy,
    #[serde(default)]
    dry_run: bool,
    /// Answer 202 with the job at once instead of its result at its end.
    #[serde(default)]
    background: bool,
}

/// Prunes an instance's backups on a sink by a keep policy (see `libcbt::engine::prune`).
/// A dry run answers the plan (what keeps each backup) at once. Otherwise the plan is run
/// by a job (progress by steps, cancel between steps) that holds the instance: no backup of
/// it may start meanwhile, and none may be running; the answer is the job's result (the plan
/// and what was deleted) at its end, or with `background` the job at once (202).
async fn prune_backups(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    body: Result<Json<PruneReq>, JsonRejection>,
) -> ApiResult<Response> {
    let c = auth(&st, &h)?;
    accepting(&st)?;
    let Json(r) = body?;
    check_sink(&st, &c, &r.sink)?;
    let uuid = resolve_uuid(&st, &c, &r.instance).await?;
    let s = open_sink(&st, &r.sink).await?;
    // The caller must see the instance's tenant, as in the backup listing.
    let tenant = tenant_of_uuid(&st, &s, &uuid).await;
    if !c.sees(tenant.as_deref()) {
        return Err(ApiError::not_found("backup"));
    }
    let disks = catalog::instance_disks(&s, &uuid)
        .await
        .map_err(|e| ApiError::internal(chain(&e)))?;
    let held = if r.dry_run {
        Vec::new()
    } else {
        take_for_rewrite(&st, &uuid, &r.sink)?
    };
    let plan = engine::plan_prune(&s, &disks, &r.policy)
        .await
        .map_err(|e| match e {
            engine::EngineError::Policy(p) => ApiError::bad(format!("policy: {p}")),
            e => ApiError::internal(chain(&e)),
        })?;
    if plan.is_empty() {
        return Err(ApiError::not_found("backup"));
    }
    if r.dry_run {
        // The disks that hold backups (a disk with only leftovers holds none).
        let mut disks: Vec<&String> = plan.iter().flat_map(|e| &e.disks).collect();
        disks.sort();
        disks.dedup();
        return Ok(Json(json!({
            "instance": uuid, "sink": r.sink, "dry_run": true, "disks": disks,
            "plan": plan, "deleted": [], "objects": 0, "folds": 0, "bytes_reclaimed": 0,
            "index_bytes_read": 0, "index_bytes_written": 0,
        }))
        .into_response());
    }
    let request = json!({"instance": uuid, "sink": r.sink, "policy": r.policy, "caller": c.token});
    let job = run::submit(
        &st,
        tenant.or(c.tenant.clone()),
        &r.sink,
        Work::Prune {
            domain_uuid: uuid,
            plan,
        },
        request,
        held,
    )
    .await
    .map_err(submit_error)?;
    if r.background {
        return Ok(accepted(&job));
    }
    ended(&st, &job).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
enum TargetReq {
    File {
        path: PathBuf,
        #[serde(default)]
        format: Option<String>,
    },
    Nbd {
        uri: String,
    },
    Domain {
        name: String,
        #[serde(default)]
        start: Option<bool>,
        /// Boot from the backup at once (overlays on an NBD export) instead of copying it.
        #[serde(default)]
        instant: bool,
        /// Boot from the backup at once and copy it underneath (see `RestoreTo::Domain`).
        #[serde(default)]
        live: bool,
        /// The live copy's speed limit in MiB/s (0 or absent: none).
        #[serde(default)]
        bandwidth_mib: u64,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreReq {
    instance: String,
    sink: String,
    backup_id: String,
    #[serde(default)]
    disk: Option<String>,
    target: TargetReq,
}

/// A refused target path: exists → 409, a symlink or outside → 403, else 400.
fn path_refused(key: &str, e: std::io::Error) -> ApiError {
    match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            ApiError::new(StatusCode::CONFLICT, "exists", format!("{key}: {e}"))
        }
        std::io::ErrorKind::PermissionDenied => {
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("{key}: {e}"))
        }
        std::io::ErrorKind::NotFound => {
            ApiError::bad(format!("{key}: parent directory does not exist"))
        }
        _ => ApiError::bad(format!("{key}: {e}")),
    }
}

async fn backup_targets(
    st: &AppState,
    c: &Caller,
    sink: &str,
    id: &str,
    instance: &str,
) -> ApiResult<(String, Option<String>, Vec<String>)> {
    let b = find_backup(st, c, sink, id, instance).await?;
    if st.jobs.rewriting(&b.instance) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "busy",
            "a deletion, prune or compaction of this instance's backups runs: try again",
        ));
    }
    let targets = b.targets();
    Ok((b.instance, b.tenant, targets))
}

async fn start_restore(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    body: Result<Json<RestoreReq>, JsonRejection>,
) -> ApiResult<Response> {
    let c = auth(&st, &h)?;
    accepting(&st)?;
    let Json(r) = body?;
    let (uuid, tenant, targets) =
        backup_targets(&st, &c, &r.sink, &r.backup_id, &r.instance).await?;
    let one_disk = || -> ApiResult<Vec<String>> {
        match &r.disk {
            Some(d) if targets.contains(d) => Ok(vec![d.clone()]),
            Some(d) => Err(ApiError::bad(format!("disk: backup has no disk {d:?}"))),
            None if targets.len() == 1 => Ok(targets.clone()),
            None => Err(ApiError::bad(
                "disk: the backup has several disks; name one",
            )),
        }
    };
    let (disks, target) = match &r.target {
        TargetReq::File { path, format } => {
            let qcow2 = match format.as_deref().unwrap_or("raw") {
                "raw" => false,
                "qcow2" => true,
                f => {
                    return Err(ApiError::bad(format!(
                        "target.format: {f:?} is not raw or qcow2"
                    )))
                }
            };
            let (root, rel) = safe_fs::split_beneath(&st.cfg.server.restore_dirs, path)
                .map_err(|e| ApiError::bad(format!("target.path: {e}")))?;
            let (root, rel) = (root.to_path_buf(), rel);
            let (r2, l2) = (root.clone(), rel.clone());
            blocking_io(move || safe_fs::check_new_beneath(&r2, &l2))
                .await
                .map_err(|e| path_refused("target.path", e))?;
            (one_disk()?, RestoreTo::File { root, rel, qcow2 })
        }
        TargetReq::Nbd { uri } => {
            // Raw NBD endpoints are the operator's: a tenant naming one could make the
            // root daemon write into anything the host reaches.
            if c.tenant.is_some() {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "NBD targets are for admin tokens only; restore into a file or a staging domain",
                ));
            }
            if uri.len() > 1024 || libcbt::nbd::uri::NbdUri::parse(uri).is_err() {
                return Err(ApiError::bad("target.uri: not an NBD URI"));
            }
            if !st.cfg.restore.nbd_allowed(uri) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "target.uri: not in restore.nbd_allow of the configuration",
                ));
            }
            (one_disk()?, RestoreTo::Nbd { uri: uri.clone() })
        }
        TargetReq::Domain {
            name,
            start,
            instant,
            live,
            bandwidth_mib,
        } => {
            if *live && *start == Some(false) {
                return Err(ApiError::bad(
                    "target.start: a live restore starts its domain",
                ));
            }
            if *bandwidth_mib != 0 && !*live {
                return Err(ApiError::bad(
                    "target.bandwidth_mib: for a live restore only",
                ));
            }
            if *bandwidth_mib > 1 << 20 {
                return Err(ApiError::bad("target.bandwidth_mib: at most 1048576"));
            }
            if !valid_name(name) {
                return Err(ApiError::bad(
                    "target.name: letters, digits, '-', '_', '.' only",
                ));
            }
            if inventory::reserved_staging_name(name) {
                return Err(ApiError::bad(
                    "target.name: a UUID or a Nova instance name (instance-XXXXXXXX) is reserved",
                ));
            }
            let root = st
                .cfg
                .server
                .restore_dirs
                .first()
                .ok_or_else(|| ApiError::bad("no restore directory configured"))?
                .clone();
            let (r2, n2) = (root.clone(), PathBuf::from(name));
            blocking_io(move || safe_fs::check_new_beneath(&r2, &n2))
                .await
                .map_err(|e| path_refused("target.name", e))?;
            if let Some(src) = st.libvirt().await {
                if let Ok(Some(_)) = inventory::get(&st.cfg, &src, name).await {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "exists",
                        format!("domain {name} exists"),
                    ));
                }
            }
            let disks = match &r.disk {
                Some(_) => one_disk()?,
                None => targets.clone(),
            };
            (
                disks,
                RestoreTo::Domain {
                    name: name.clone(),
                    root,
                    // A live restore boots the copy on the backup and copies underneath.
                    start: start.unwrap_or(false) || *live,
                    instant: *instant || *live,
                    live: live.then_some(*bandwidth_mib),
                },
            )
        }
    };
    let backup_id = check_backup_id(&r.backup_id)?;
    let request = json!({"instance": uuid, "sink": r.sink, "backup_id": r.backup_id, "disks": disks, "caller": c.token});
    let job = run::submit(
        &st,
        tenant,
        &r.sink,
        Work::Restore {
            backup_id,
            domain_uuid: uuid,
            disks,
            target,
        },
        request,
        Vec::new(),
    )
    .await
    .map_err(submit_error)?;
    Ok(accepted(&job))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyReq {
    instance: String,
    sink: String,
    backup_id: String,
}

async fn start_verify(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    body: Result<Json<VerifyReq>, JsonRejection>,
) -> ApiResult<Response> {
    let c = auth(&st, &h)?;
    accepting(&st)?;
    let Json(r) = body?;
    let (uuid, tenant, disks) = backup_targets(&st, &c, &r.sink, &r.backup_id, &r.instance).await?;
    let backup_id = check_backup_id(&r.backup_id)?;
    let request =
        json!({"instance": uuid, "sink": r.sink, "backup_id": r.backup_id, "caller": c.token});
    let job = run::submit(
        &st,
        tenant,
        &r.sink,
        Work::Verify {
            backup_id,
            domain_uuid: uuid,
            disks,
        },
        request,
        Vec::new(),
    )
    .await
    .map_err(submit_error)?;
    Ok(accepted(&job))
}

fn admin_only(c: &Caller, why: &str) -> ApiResult<()> {
    if c.tenant.is_some() {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", why));
    }
    Ok(())
}

const MOUNTS_ADMIN: &str =
    "mounting is for admin tokens only: the sockets are the host's (tenants boot instant copies)";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MountReq {
    instance: String,
    sink: String,
    backup_id: String,
    /// Disk targets (default: every disk of the backup).
    #[serde(default)]
    disks: Option<Vec<String>>,
}

/// `POST /v1/mounts` (admin): serves each disk of a backup read-only over NBD on a Unix
/// socket, straight from the sink (see [`crate::mounts`]). 201 with the mount: each disk's
/// socket, `nbd+unix://` URI and size.
async fn create_mount(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    body: Result<Json<MountReq>, JsonRejection>,
) -> ApiResult<Response> {
    let c = auth(&st, &h)?;
    accepting(&st)?;
    admin_only(&c, MOUNTS_ADMIN)?;
    let Json(r) = body?;
    let b = find_backup(&st, &c, &r.sink, &r.backup_id, &r.instance).await?;
    let all = b.targets();
    let targets = match r.disks {
        None => all,
        Some(d) => {
            if d.is_empty() || d.len() > 64 {
                return Err(ApiError::bad("disks: between 1 and 64 targets"));
            }
            if let Some(t) = d.iter().find(|t| !all.contains(t)) {
                return Err(ApiError::bad(format!(
                    "disks: the backup has no disk {t:?}"
                )));
            }
            let mut d = d;
            d.sort();
            d.dedup();
            d
        }
    };
    let id = registry::new_job_id();
    // Marked before the rewrites are checked (they mark before they check mounts).
    let reading = st.mounts.mark(&id, &b.instance, &r.sink).map_err(|e| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_mounts",
            e.to_string(),
        )
    })?;
    if st.jobs.rewriting(&b.instance) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "busy",
            "a deletion, prune or compaction of this instance's backups runs: try again",
        ));
    }
    let s = open_sink(&st, &r.sink).await?;
    let view = st
        .mounts
        .mount(
            &st.cfg.server.state_dir,
            &id,
            reading,
            &crate::mounts::Of {
                sink: &s,
                sink_name: &r.sink,
                instance: &b.instance,
                backup_id: &r.backup_id,
                tenant: b.tenant.as_deref(),
            },
            &targets,
            None,
        )
        .await
        .map_err(|e| ApiError::internal(chain(&e)))?;
    tracing::info!(mount = %id, instance = %b.instance, backup = %r.backup_id, "mounted");
    Ok((
        StatusCode::CREATED,
        [("location", format!("/v1/mounts/{id}"))],
        Json(json!({ "mount": view })),
    )
        .into_response())
}

/// Mounts the caller sees: all for an admin, a tenant's own (its instant copies') for it.
async fn list_mounts(State(st): State<Arc<AppState>>, h: HeaderMap) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    let v: Vec<_> = st
        .mounts
        .all()
        .into_iter()
        .filter(|m| c.sees(m.tenant.as_deref()))
        .collect();
    Ok(Json(json!({ "mounts": v })))
}

fn visible_mount(st: &AppState, c: &Caller, id: &str) -> ApiResult<crate::mounts::MountView> {
    st.mounts
        .get(id)
        .filter(|m| c.sees(m.tenant.as_deref()))
        .ok_or_else(|| ApiError::not_found("mount"))
}

async fn show_mount(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    Ok(Json(json!({ "mount": visible_mount(&st, &c, &id)? })))
}

/// Stops a mount's exports (open connections end) and removes its sockets; a tenant may
/// unmount its own instant copies' mounts (the copy then loses its disks' backing).
async fn delete_mount(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    // A recorded mount not served again yet (its sink down): an admin may forget it.
    let pending = c.tenant.is_none() && st.mounts.is_pending(&id);
    if !pending {
        visible_mount(&st, &c, &id)?;
    }
    let found = st
        .mounts
        .unmount_unless_copying(&id)
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "copying", e.to_string()))?;
    if !found {
        return Err(ApiError::not_found("mount"));
    }
    tracing::info!(mount = %id, "unmounted");
    Ok(Json(json!({ "unmounted": id })))
}

fn visible_job(st: &AppState, c: &Caller, id: &str) -> ApiResult<JobStatus> {
    if !registry::valid_job_id(id) {
        return Err(ApiError::not_found("job"));
    }
    let s = match st.jobs.get(id) {
        Some(j) => j.snapshot(),
        None => st
            .journal
            .get(id)
            .map_err(ApiError::internal)?
            .map(|r| JobStatus::from_row(&r))
            .ok_or_else(|| ApiError::not_found("job"))?,
    };
    if !c.sees(s.tenant.as_deref()) {
        return Err(ApiError::not_found("job"));
    }
    Ok(s)
}

async fn list_jobs(State(st): State<Arc<AppState>>, h: HeaderMap) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    let mut out: BTreeMap<String, JobStatus> = BTreeMap::new();
    for r in st.journal.recent(200).map_err(ApiError::internal)? {
        out.insert(r.id.clone(), JobStatus::from_row(&r));
    }
    for j in st.jobs.all() {
        let s = j.snapshot();
        out.insert(s.id.clone(), s);
    }
    let mut v: Vec<JobStatus> = out
        .into_values()
        .filter(|s| c.sees(s.tenant.as_deref()))
        .collect();
    v.sort_by_key(|s| std::cmp::Reverse(s.created_ms));
    Ok(Json(json!({ "jobs": v })))
}

async fn show_job(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let c = auth(&st, &h)?;
    Ok(Json(json!({ "job": visible_job(&st, &c, &id)? })))
}

async fn cancel_job(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let c = auth(&st, &h)?;
    let s = visible_job(&st, &c, &id)?;
    if s.terminal() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "finished",
            format!("job is {}", s.state),
        ));
    }
    if let Some(j) = st.jobs.get(&id) {
        j.request_cancel();
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "job": s, "cancel": "requested" })),
    )
        .into_response())
}

async fn job_events(
    State(st): State<Arc<AppState>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let c = auth(&st, &h)?;
    let s = visible_job(&st, &c, &id)?;
    let ev = |s: &JobStatus| -> Result<Event, Infallible> {
        Ok(Event::default()
            .event("status")
            .data(serde_json::to_string(s).unwrap_or_default()))
    };
    let Some(j) = st.jobs.get(&id) else {
        // A job of an earlier daemon life: one event, its final state.
        let one = futures_util::stream::iter(vec![ev(&s)]);
        return Ok(Sse::new(one).into_response());
    };
    let rx = j.status.subscribe();
    // Every change, at most every 200 ms, and always the final one; then the stream ends.
    let stream = futures_util::stream::unfold((rx, 0u8), move |(mut rx, step)| async move {
        if step == 2 {
            return None;
        }
        if step == 1 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = tokio::time::timeout(Duration::from_secs(15), rx.changed()).await;
        }
        let s = rx.borrow_and_update().clone();
        let next = if s.terminal() { 2 } else { 1 };
        Some((s, (rx, next)))
    })
    .map(move |s| ev(&s));
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
