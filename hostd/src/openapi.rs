//! The OpenAPI 3.0 document of the API, served at `/v1/openapi.json`. Tests check that it
//! validates and that its operations are exactly the routes the router serves.

use serde_json::{json, Value};

fn op(summary: &str, tag: &str, ok: &str, body: Option<&str>, params: Value) -> Value {
    let mut responses = json!({
        ok: {"description": "success", "content": {"application/json": {"schema": {"type": "object"}}}},
        "400": {"$ref": "#/components/responses/Error"},
        "401": {"$ref": "#/components/responses/Error"},
        "404": {"$ref": "#/components/responses/Error"},
    });
    if body.is_some() {
        responses["413"] = json!({"$ref": "#/components/responses/Error"});
    }
    let mut o = json!({
        "summary": summary,
        "tags": [tag],
        "operationId": summary.to_lowercase().replace([' ', '\''], "_"),
        "parameters": params,
        "responses": responses,
    });
    if let Some(b) = body {
        o["requestBody"] = json!({
            "required": true,
            "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{b}")}}}
        });
    }
    o
}

/// `o` with more error responses.
fn errors(mut o: Value, codes: &[&str]) -> Value {
    for c in codes {
        o["responses"][*c] = json!({"$ref": "#/components/responses/Error"});
    }
    o
}

/// An operation run as a job: 200 with its result at its end, or 202 with the job at once
/// (`background`, or when it outlasts half the TLS idle timeout); 409 when it was cancelled
/// or the instance is busy; 429 when the queue is full.
fn job_op(mut o: Value) -> Value {
    o["responses"]["202"] = json!({"description": "the job, started (background)",
        "content": {"application/json": {"schema": {"type": "object"}}}});
    o["responses"]["409"] = json!({"$ref": "#/components/responses/Error"});
    o["responses"]["429"] = json!({"$ref": "#/components/responses/Error"});
    o
}

fn path_param(name: &str, desc: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": desc, "schema": {"type": "string", "maxLength": 128}})
}

fn query_param(name: &str, required: bool, desc: &str) -> Value {
    json!({"name": name, "in": "query", "required": required, "description": desc, "schema": {"type": "string", "maxLength": 128}})
}

pub fn document() -> Value {
    let public = |summary: &str, ok_type: &str| {
        json!({"summary": summary, "tags": ["service"], "security": [],
               "operationId": summary.to_lowercase().replace(' ', "_"),
               "responses": {"200": {"description": "success", "content": {ok_type: {"schema": {"type": if ok_type == "application/json" {"object"} else {"string"}}}}}}})
    };
    let job_id = path_param("id", "job id (16 hex digits)");
    let mut d = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "cbt-hostd",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Per-host backup daemon: instances, backups, restores, verifications and jobs. \
                            Long operations answer 202 with a job; follow it at /v1/jobs/{id} or its event stream."
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/openapi.json": {"get": public("OpenAPI document", "application/json")},
            "/v1/health": {"get": public("Health", "application/json")},
            "/metrics": {"get": public("Prometheus metrics", "application/openmetrics-text")},
            "/v1/instances": {"get": op("List instances", "instances", "200", None, json!([]))},
            "/v1/instances/{id}": {"get": op("Show instance", "instances", "200", None,
                json!([path_param("id", "domain name or UUID")]))},
            "/v1/backups": {
                "post": op("Start backup", "backups", "202", Some("BackupRequest"), json!([])),
                "get": op("List backups", "backups", "200", None,
                    json!([query_param("sink", true, "sink name"), query_param("instance", false, "name or UUID")])),
            },
            "/v1/backups/{sink}/{backup_id}": {
                "get": op("Show backup", "backups", "200", None, json!([
                    path_param("sink", "sink name"), path_param("backup_id", "backup id"),
                    query_param("instance", true, "name or UUID")])),
                "delete": op("Delete backup", "backups", "200", None, json!([
                    path_param("sink", "sink name"), path_param("backup_id", "backup id"),
                    query_param("instance", true, "name or UUID")])),
            },
            "/v1/restores": {"post": op("Start restore", "restores", "202", Some("RestoreRequest"), json!([]))},
            "/v1/verifications": {"post": op("Start verification", "verifications", "202", Some("VerifyRequest"), json!([]))},
            "/v1/prune": {"post": job_op(op("Prune backups", "backups", "200", Some("PruneRequest"), json!([])))},
            "/v1/gc": {"post": job_op(op("Collect a sink's garbage (admin)", "backups", "200", Some("GcRequest"), json!([])))},
            "/v1/mounts": {
                "post": op("Mount backup", "mounts", "201", Some("MountRequest"), json!([])),
                "get": op("List mounts", "mounts", "200", None, json!([])),
            },
            "/v1/mounts/{id}": {
                "get": op("Show mount", "mounts", "200", None, json!([path_param("id", "mount id")])),
                "delete": op("Unmount", "mounts", "200", None, json!([path_param("id", "mount id")])),
            },
            "/v1/jobs": {"get": op("List jobs", "jobs", "200", None, json!([]))},
            "/v1/jobs/{id}": {"get": op("Show job", "jobs", "200", None, json!([job_id.clone()]))},
            "/v1/jobs/{id}/cancel": {"post": op("Cancel job", "jobs", "202", None, json!([job_id.clone()]))},
            "/v1/jobs/{id}/events": {"get": {
                "summary": "Job events", "tags": ["jobs"], "operationId": "job_events",
                "parameters": [job_id],
                "responses": {
                    "200": {"description": "Server-Sent Events: `status` events with the job's status until it ends",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                    "401": {"$ref": "#/components/responses/Error"},
                    "404": {"$ref": "#/components/responses/Error"}
                }
            }},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
                "PruneRequest": {"type": "object", "additionalProperties": false,
                    "required": ["instance", "sink"],
                    "properties": {
                        "instance": {"type": "string", "description": "domain name or UUID"},
                        "sink": {"type": "string"},
                        "policy": {"type": "object", "additionalProperties": false,
                            "description": "proxmox-backup's keep rules; none: everything stays",
                            "properties": {
                                "keep_last": {"type": "integer", "minimum": 0},
                                "keep_hourly": {"type": "integer", "minimum": 0},
                                "keep_daily": {"type": "integer", "minimum": 0},
                                "keep_weekly": {"type": "integer", "minimum": 0},
                                "keep_monthly": {"type": "integer", "minimum": 0},
                                "keep_yearly": {"type": "integer", "minimum": 0},
                                "utc_offset_secs": {"type": "integer", "minimum": -86399, "maximum": 86399}}},
                        "dry_run": {"type": "boolean", "description": "answer the plan at once; delete nothing"},
                        "background": {"type": "boolean", "description": "answer 202 with the job at once"}}},
                "GcRequest": {"type": "object", "additionalProperties": false,
                    "required": ["sink"],
                    "properties": {
                        "sink": {"type": "string"},
                        "grace_secs": {"type": "integer", "minimum": 3600,
                            "description": "leave objects younger than this; default limits.gc_grace_secs"},
                        "compact": {"type": "boolean", "description": "then rewrite the sparse segments of idle instances' disks"},
                        "threshold": {"type": "number", "minimum": 0, "exclusiveMinimum": true, "maximum": 1,
                            "description": "live fraction under which a segment is rewritten (0.5)"},
                        "max_copy_mib": {"type": "integer", "minimum": 0,
                            "description": "live bytes copied at most, in MiB (4096)"},
                        "background": {"type": "boolean", "description": "answer 202 with the job at once"}}},
                "BackupRequest": {"type": "object", "additionalProperties": false,
                    "required": ["instance", "sink"],
                    "properties": {
                        "instance": {"type": "string", "description": "domain name or UUID"},
                        "sink": {"type": "string"},
                        "disks": {"type": "array", "items": {"type": "string"}, "maxItems": 64},
                        "level": {"type": "string", "enum": ["auto", "full", "incremental"]},
                        "quiesce": {"type": "boolean"},
                        "quiesce_timeout_secs": {"type": "integer", "minimum": 1, "maximum": 300},
                        "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 128}, "maxProperties": 32},
                        "backup_id": {"type": "string", "maxLength": 20, "pattern": "^[A-Za-z0-9_-]+$"}
                    }},
                "RestoreRequest": {"type": "object", "additionalProperties": false,
                    "required": ["instance", "sink", "backup_id", "target"],
                    "properties": {
                        "instance": {"type": "string"}, "sink": {"type": "string"},
                        "backup_id": {"type": "string"}, "disk": {"type": "string"},
                        "target": {"oneOf": [
                            {"type": "object", "additionalProperties": false, "required": ["type", "path"],
                             "properties": {"type": {"type": "string", "enum": ["file"]}, "path": {"type": "string"},
                                            "format": {"type": "string", "enum": ["raw", "qcow2"]}}},
                            {"type": "object", "additionalProperties": false, "required": ["type", "uri"],
                             "properties": {"type": {"type": "string", "enum": ["nbd"]}, "uri": {"type": "string"}}},
                            {"type": "object", "additionalProperties": false, "required": ["type", "name"],
                             "properties": {"type": {"type": "string", "enum": ["domain"]}, "name": {"type": "string"},
                                            "start": {"type": "boolean"}, "instant": {"type": "boolean"},
                                            "live": {"type": "boolean"}, "bandwidth_mib": {"type": "integer", "minimum": 0, "maximum": 1048576}}}
                        ]}
                    }},
                "MountRequest": {"type": "object", "additionalProperties": false,
                    "required": ["instance", "sink", "backup_id"],
                    "properties": {
                        "instance": {"type": "string"}, "sink": {"type": "string"},
                        "backup_id": {"type": "string"},
                        "disks": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 64}}},
                "VerifyRequest": {"type": "object", "additionalProperties": false,
                    "required": ["instance", "sink", "backup_id"],
                    "properties": {"instance": {"type": "string"}, "sink": {"type": "string"}, "backup_id": {"type": "string"}}}
            }
        }
    });
    groups(&mut d);
    d
}

/// The consistency groups' operations (one `json!` for the whole document is too deep).
fn groups(d: &mut Value) {
    let paths = json!({
            "/v1/groups": {
                "post": errors(op("Hold group", "groups", "201", Some("GroupRequest"), json!([])),
                    &["409", "503"]),
                "get": op("List groups", "groups", "200", None, json!([])),
            },
            "/v1/groups/{id}": {
                "get": op("Show group", "groups", "200", None, json!([path_param("id", "group id")])),
            },
            "/v1/groups/{id}/backups": {
                "post": errors(op("Group points in time", "groups", "200", Some("GroupBackupRequest"),
                    json!([path_param("id", "group id")])), &["409", "429"]),
            },
            "/v1/groups/{id}/release": {
                "post": op("Release group", "groups", "200", None, json!([path_param("id", "group id")])),
            }
    });
    let schemas = json!({
                "GroupRequest": {"type": "object", "additionalProperties": false,
                    "required": ["instances", "mode"],
                    "properties": {
                        "id": {"type": "string", "pattern": "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$",
                               "description": "the group's id (default: one is picked); an orchestrator uses its run's"},
                        "instances": {"type": "array", "minItems": 1, "maxItems": 64,
                                      "items": {"type": "string", "description": "domain name or UUID"}},
                        "mode": {"type": "string", "enum": ["freeze", "pause"],
                                 "description": "freeze: filesystems through qemu-ga (application-consistent); pause: the guests' CPUs (one exact crash-consistent cut)"},
                        "hold_timeout_secs": {"type": "integer", "minimum": 1, "maximum": 300, "default": 10,
                                              "description": "the daemon releases the group by itself at this deadline"}
                    }},
                "GroupBackupRequest": {"type": "object", "additionalProperties": false,
                    "required": ["sink"],
                    "properties": {
                        "sink": {"type": "string"},
                        "level": {"type": "string", "enum": ["auto", "full", "incremental"]},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "backup_id": {"type": "string", "description": "one id for every member (default: generated)"}
                    }}
    });
    for (k, v) in paths.as_object().into_iter().flatten() {
        d["paths"][k] = v.clone();
    }
    for (k, v) in schemas.as_object().into_iter().flatten() {
        d["components"]["schemas"][k] = v.clone();
    }
}

/// (method, path) of every operation, for tests and clients.
pub fn operations() -> Vec<(String, String)> {
    let d = document();
    let mut out = Vec::new();
    if let Some(paths) = d["paths"].as_object() {
        for (p, ops) in paths {
            if let Some(ops) = ops.as_object() {
                for m in ops.keys() {
                    out.push((m.to_uppercase(), p.clone()));
                }
            }
        }
    }
    out
}
