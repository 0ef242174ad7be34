//! A sink in an OpenStack Swift container, through Swift's own API (not s3api).
//!
//! | [`Sink`] call | requests |
//! |---|---|
//! | [`create`](Sink::create) … `finish`, object ≤ one segment | one `PUT` |
//! | [`create`](Sink::create) … `finish`, larger | `PUT` of an upload marker, `PUT` × n segments (at most [`SwiftConfig::segments_in_flight`] at once), `PUT ?multipart-manifest=put` (an SLO), `DELETE` of the marker |
//! | [`put`](Sink::put) | `PUT` |
//! | [`put_new`](Sink::put_new) | `PUT` with `If-None-Match: *`; after a refusal, one `GET` (see below) |
//! | [`get_range`](Sink::get_range) | one `GET` with `Range` |
//! | [`get`](Sink::get) | `GET`, the length checked before the body is read |
//! | [`list`](Sink::list), [`list_first`](Sink::list_first), [`list_dirs`](Sink::list_dirs) | container `GET` with `prefix`, `marker` (and `limit`, or the `/` delimiter), 10,000 names a page |
//! | [`delete`](Sink::delete) | `DELETE` (a segment: `?multipart-manifest=delete`, an SLO goes with its segments) |
//! | [`delete_many`](Sink::delete_many) | one bulk delete of up to 1,000 names (segments: as [`delete`](Sink::delete)) |
//! | [`remove_stale_partials`](Sink::remove_stale_partials) | a listing of the upload markers; per stale one, a `HEAD`, a listing of its segments and one bulk delete |
//!
//! **Authentication**: Keystone v3 (password or application credential; the object-store
//! endpoint comes from the token's catalog, by interface and region) or tempauth. A token is
//! renewed before it expires and once when a request is answered 401.
//!
//! **Large objects** are Static Large Objects: segments under `.cbt-slo/<name>/<upload>/` in the
//! same container (names starting with `.` are never cbt objects, so listings skip them),
//! then a manifest under the object's name. An upload marker `.cbt-uploads/<upload>` lives
//! while the upload does: a writer that died leaves its marker, and
//! [`remove_stale_partials`](Sink::remove_stale_partials) deletes the segments of uploads whose
//! marker and newest segment are older than the grace period and whose object does not name
//! them (`X-Object-Meta-Cbt-Upload`).
//!
//! **Create-only commits**: `If-None-Match: *`, which native Swift honours (412) once an object
//! exists, also for SLO manifests. Requests that fail with a 5xx or on the way are retried, so
//! a refusal may be our own earlier attempt: the object is read back, as on S3.
//! [`SwiftSink::open`] probes that the server refuses a second create-only write, and refuses
//! the sink otherwise. (Swift ignores `If-Match`; cbt never relies on it.)
//!
//! The check is not atomic: the object server tests the precondition when a PUT starts, so
//! writers whose PUTs overlap all pass it, and the one with the newest timestamp ends up
//! stored (measured here: 10 of 16 concurrent writers were answered 201). After its 201,
//! [`put_new`](Sink::put_new) reads the object's ETag back and reports
//! [`SinkError::Exists`] when another writer's bytes are there; a writer that overlapped ours
//! but lands after that read can still replace it. So on Swift, create-only protects against
//! a name reused after its commit (a retried job, a reused backup id), not against two writers
//! racing within one request's time: [`Sink::atomic_put_new`] is false, and cbt never has two
//! jobs of one backup id at once (hostd's job registry).
//!
//! Tokens, passwords and keys never appear in `Debug` output or error texts.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use reqwest::{Method, StatusCode, Url};
use tokio::sync::RwLock;

use super::{check_name, ObjectInfo, ObjectWriter, Secret, Sink, SinkError};

/// Smallest SLO segment cbt writes.
pub const MIN_SEGMENT: usize = 1 << 20;
/// Largest object Swift takes in one PUT (its default `max_file_size`).
pub const MAX_SEGMENT: usize = 5 << 30;
/// Segments of one SLO (Swift's default `max_manifest_segments`).
pub const MAX_SEGMENTS: usize = 1000;
/// Names per listing page (Swift's `container_listing_limit`).
const PAGE: usize = 10_000;
/// Largest answer read from a listing or from Keystone.
const MAX_ANSWER: usize = 32 << 20;
/// Where SLO segments and upload markers live, under the sink's prefix.
const SEGMENTS: &str = ".cbt-slo/";
const UPLOADS: &str = ".cbt-uploads/";
const UPLOAD_META: &str = "x-object-meta-cbt-upload";

/// The secret of a Swift login from a 0600 file holding one of `password = …` (Keystone
/// password), `application_credential_secret = …` or `key = …` (tempauth).
pub fn read_secret(path: &std::path::Path) -> Result<Secret, SinkError> {
    let m = super::read_secrets(path, &["password", "application_credential_secret", "key"])?;
    let mut it = m.into_values();
    match (it.next(), it.next()) {
        (Some(s), None) => Ok(s),
        _ => Err(SinkError::Config(format!(
            "credentials {}: needs exactly one of password, application_credential_secret, key",
            path.display()
        ))),
    }
}

/// The secret of a Swift login from the environment, as an OpenStack RC file sets it:
/// `OS_PASSWORD`, `OS_APPLICATION_CREDENTIAL_SECRET` or (tempauth) `ST_KEY`.
pub fn secret_from_env() -> Option<Secret> {
    ["OS_APPLICATION_CREDENTIAL_SECRET", "OS_PASSWORD", "ST_KEY"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .map(Secret)
}

/// How to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwiftAuth {
    /// Keystone v3, password of a user, scoped to a project. `auth_url` ends in `/v3`.
    Password {
        auth_url: String,
        user: String,
        user_domain: String,
        password: Secret,
        project: String,
        project_domain: String,
    },
    /// Keystone v3 application credential (it carries its project).
    ApplicationCredential {
        auth_url: String,
        id: String,
        secret: Secret,
    },
    /// Swift's tempauth (`…/auth/v1.0`), user `account:user`.
    TempAuth {
        auth_url: String,
        user: String,
        key: Secret,
    },
}

impl SwiftAuth {
    fn auth_url(&self) -> &str {
        match self {
            SwiftAuth::Password { auth_url, .. }
            | SwiftAuth::ApplicationCredential { auth_url, .. }
            | SwiftAuth::TempAuth { auth_url, .. } => auth_url,
        }
    }
}

/// Where and how to reach the container.
#[derive(Debug, Clone)]
pub struct SwiftConfig {
    pub auth: SwiftAuth,
    /// The Swift endpoint (`https://host/v1/AUTH_project`) when it is not the catalog's.
    pub storage_url: Option<String>,
    /// Catalog region (first object-store endpoint of the interface when `None`).
    pub region: Option<String>,
    /// Catalog interface: `public`, `internal` or `admin`.
    pub interface: String,
    pub container: String,
    /// Objects go under `prefix/` (`""`: at the top of the container).
    pub prefix: String,
    /// PEM certificates trusted besides the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// Size of SLO segments; also the largest object written with a single PUT.
    pub segment_size: usize,
    /// Segments of one object uploading at once (memory: about `segment_size` × this).
    pub segments_in_flight: usize,
    /// One request, from connect to the last byte of the answer.
    pub request_timeout: Duration,
    /// Retries of a failed request (5xx, 429, timeouts, connection errors), within
    /// `retry_timeout`.
    pub max_retries: usize,
    pub retry_timeout: Duration,
}

impl Default for SwiftConfig {
    fn default() -> Self {
        SwiftConfig {
            auth: SwiftAuth::TempAuth {
                auth_url: String::new(),
                user: String::new(),
                key: Secret::default(),
            },
            storage_url: None,
            region: None,
            interface: "public".into(),
            container: String::new(),
            prefix: String::new(),
            ca_pem: None,
            segment_size: 8 << 20,
            segments_in_flight: 4,
            request_timeout: Duration::from_secs(120),
            max_retries: 8,
            retry_timeout: Duration::from_secs(120),
        }
    }
}

fn is_http_url(u: &str) -> bool {
    (u.starts_with("http://") || u.starts_with("https://")) && u.len() <= 1024
}

impl SwiftConfig {
    /// Checks the address and the tuning; on a fault, the field's name and what it must be.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if !is_http_url(self.auth.auth_url()) {
            return Err(("auth_url", "an http:// or https:// URL"));
        }
        match &self.auth {
            SwiftAuth::Password { user, project, .. } if user.is_empty() || project.is_empty() => {
                return Err(("user", "a user and a project for password login"));
            }
            SwiftAuth::ApplicationCredential { id, .. } if id.is_empty() => {
                return Err(("application_credential_id", "an application credential id"));
            }
            SwiftAuth::TempAuth { user, .. } if !user.contains(':') => {
                return Err(("user", "account:user for tempauth"));
            }
            _ => {}
        }
        if self.storage_url.as_deref().is_some_and(|u| !is_http_url(u)) {
            return Err(("storage_url", "an http:// or https:// URL"));
        }
        if !["public", "internal", "admin"].contains(&self.interface.as_str()) {
            return Err(("interface", "public, internal or admin"));
        }
        let c = &self.container;
        if c.is_empty()
            || c.len() > 256
            || c.starts_with('.')
            || !c
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err((
                "container",
                "1 to 256 of [A-Za-z0-9._-], not starting with .",
            ));
        }
        let prefix = self.prefix.trim_matches('/');
        if !prefix.is_empty() && check_name(prefix).is_err() {
            return Err(("prefix", "'/'-separated [A-Za-z0-9._-] names"));
        }
        if !(MIN_SEGMENT..=MAX_SEGMENT).contains(&self.segment_size) {
            return Err(("segment_size", "1 MiB to 5 GiB"));
        }
        if !(1..=64).contains(&self.segments_in_flight) {
            return Err(("segments_in_flight", "1 to 64"));
        }
        Ok(())
    }
}

/// A token and the endpoint it is for.
struct Session {
    token: Secret,
    storage_url: String,
    /// Renew after this instant (some minutes before the token expires).
    renew_at: Option<Instant>,
}

/// A sink in a Swift container. Cheap to clone (connections and token are shared).
#[derive(Clone)]
pub struct SwiftSink {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    cfg: SwiftConfig,
    /// `""` or `"prefix/"`.
    prefix: String,
    session: RwLock<Option<Arc<Session>>>,
}

impl std::fmt::Debug for SwiftSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwiftSink")
            .field("auth_url", &self.inner.cfg.auth.auth_url())
            .field("container", &self.inner.cfg.container)
            .field("prefix", &self.inner.prefix)
            .finish()
    }
}

fn remote(op: &'static str, name: &str, why: impl Into<String>) -> SinkError {
    SinkError::Remote {
        op,
        name: name.into(),
        source: why.into().into(),
    }
}

/// The error of an answer that is not a success.
fn status_err(op: &'static str, name: &str, status: StatusCode) -> SinkError {
    match status {
        StatusCode::NOT_FOUND => SinkError::NotFound { name: name.into() },
        StatusCode::PRECONDITION_FAILED => SinkError::Exists { name: name.into() },
        // An account or container quota (413 "Upload exceeds quota") or a full cluster (507).
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::INSUFFICIENT_STORAGE => SinkError::NoSpace {
            name: name.into(),
            source: std::io::Error::new(
                std::io::ErrorKind::QuotaExceeded,
                format!("Swift answered {status}"),
            ),
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => remote(
            op,
            name,
            format!("Swift answered {status}: the credentials are not allowed this"),
        ),
        s => remote(op, name, format!("Swift answered {s}")),
    }
}

fn retryable(status: StatusCode) -> bool {
    status.is_server_error() && status != StatusCode::INSUFFICIENT_STORAGE
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// How [`SwiftSink::put_object`] writes.
#[derive(Clone, Copy)]
enum Put<'a> {
    Plain,
    /// `If-None-Match: *`.
    CreateOnly,
    /// The SLO manifest of upload `id`.
    Manifest(&'a str),
}

impl SwiftSink {
    /// Logs in, checks that the container exists and probes that the server refuses a second
    /// create-only write. Wrong credentials, a missing container or an unreachable endpoint
    /// fail here, with the server's answer.
    pub async fn open(cfg: &SwiftConfig) -> Result<SwiftSink, SinkError> {
        let sink = Self::connect(cfg)?;
        let r = sink
            .send(
                "opening",
                "the container",
                Method::HEAD,
                "",
                &[],
                None,
                |_| {},
            )
            .await?;
        match r.status() {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND => {
                return Err(SinkError::Config(format!(
                    "container {} not found",
                    cfg.container
                )))
            }
            s => return Err(status_err("opening", "the container", s)),
        }
        sink.probe().await?;
        Ok(sink)
    }

    /// Creates the container of `cfg` (for set-up and tests); an existing one is fine.
    pub async fn create_container(cfg: &SwiftConfig) -> Result<(), SinkError> {
        let sink = Self::connect(cfg)?;
        let r = sink
            .send(
                "creating",
                "the container",
                Method::PUT,
                "",
                &[],
                None,
                |_| {},
            )
            .await?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(status_err("creating", "the container", r.status()))
        }
    }

    fn connect(cfg: &SwiftConfig) -> Result<SwiftSink, SinkError> {
        cfg.validate()
            .map_err(|(key, why)| SinkError::Config(format!("{key}: {why}")))?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut hb = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .connect_timeout(Duration::from_secs(10));
        if let Some(pem) = &cfg.ca_pem {
            let c = reqwest::Certificate::from_pem(pem)
                .map_err(|_| SinkError::Config("ca: not a PEM certificate".into()))?;
            hb = hb.add_root_certificate(c);
        }
        let http = hb
            .build()
            .map_err(|e| SinkError::Config(format!("HTTP client: {e}")))?;
        let prefix = cfg.prefix.trim_matches('/');
        Ok(SwiftSink {
            inner: Arc::new(Inner {
                http,
                cfg: cfg.clone(),
                prefix: if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}/")
                },
                session: RwLock::new(None),
            }),
        })
    }

    /// The current session, logging in when there is none or it is due for renewal.
    async fn session(&self) -> Result<Arc<Session>, SinkError> {
        let fresh = |s: &Arc<Session>| s.renew_at.is_none_or(|t| Instant::now() < t);
        if let Some(s) = self
            .inner
            .session
            .read()
            .await
            .as_ref()
            .filter(|s| fresh(s))
        {
            return Ok(s.clone());
        }
        let mut slot = self.inner.session.write().await;
        if let Some(s) = slot.as_ref().filter(|s| fresh(s)) {
            return Ok(s.clone());
        }
        let s = Arc::new(self.login().await?);
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Forgets `old` (answered 401), unless another request renewed it already.
    async fn invalidate(&self, old: &Arc<Session>) {
        let mut slot = self.inner.session.write().await;
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, old)) {
            *slot = None;
        }
    }

    async fn login(&self) -> Result<Session, SinkError> {
        let cfg = &self.inner.cfg;
        let fail = |why: String| remote("logging in to", cfg.auth.auth_url(), why);
        let mut session = match &cfg.auth {
            SwiftAuth::TempAuth {
                auth_url,
                user,
                key,
            } => {
                let r = self
                    .retrying("logging in to", auth_url, || {
                        self.inner
                            .http
                            .get(auth_url)
                            .header("X-Auth-User", user)
                            .header("X-Auth-Key", &key.0)
                    })
                    .await?;
                if !r.status().is_success() {
                    return Err(fail(format!(
                        "tempauth answered {} for user {user}",
                        r.status()
                    )));
                }
                let h = |k: &str| {
                    r.headers()
                        .get(k)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                let (Some(token), Some(url)) = (h("x-auth-token"), h("x-storage-url")) else {
                    return Err(fail(
                        "tempauth answered without a token or storage URL".into(),
                    ));
                };
                let renew_at = h("x-auth-token-expires")
                    .and_then(|s| s.parse::<u64>().ok())
                    .map(|secs| Instant::now() + renew_before(Duration::from_secs(secs)));
                Session {
                    token: Secret(token),
                    storage_url: url,
                    renew_at,
                }
            }
            SwiftAuth::Password { auth_url, .. }
            | SwiftAuth::ApplicationCredential { auth_url, .. } => self.keystone(auth_url).await?,
        };
        if let Some(u) = &cfg.storage_url {
            session.storage_url = u.clone();
        }
        if !is_http_url(&session.storage_url) {
            return Err(fail("the storage URL is not an http(s) URL".into()));
        }
        Ok(session)
    }

    /// Keystone v3: a project-scoped token and the object-store endpoint of its catalog.
    async fn keystone(&self, auth_url: &str) -> Result<Session, SinkError> {
        let cfg = &self.inner.cfg;
        let url = format!("{}/auth/tokens", auth_url.trim_end_matches('/'));
        let body = match &cfg.auth {
            SwiftAuth::Password {
                user,
                user_domain,
                password,
                project,
                project_domain,
                ..
            } => serde_json::json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": user, "domain": {"name": user_domain}, "password": password.0}}},
                "scope": {"project": {"name": project, "domain": {"name": project_domain}}}}}),
            SwiftAuth::ApplicationCredential { id, secret, .. } => serde_json::json!({"auth": {
                "identity": {"methods": ["application_credential"],
                    "application_credential": {"id": id, "secret": secret.0}}}}),
            SwiftAuth::TempAuth { .. } => unreachable!("tempauth is not Keystone"),
        };
        let body = Bytes::from(body.to_string());
        let r = self
            .retrying("logging in to", auth_url, || {
                self.inner
                    .http
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .body(body.clone())
            })
            .await?;
        let status = r.status();
        let token = r
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let answer = read_bounded(r, "logging in to", auth_url).await?;
        if !status.is_success() {
            return Err(remote(
                "logging in to",
                auth_url,
                format!("Keystone answered {status}"),
            ));
        }
        let token = token.ok_or_else(|| {
            remote(
                "logging in to",
                auth_url,
                "Keystone answered without a token",
            )
        })?;
        let (storage_url, expires) = parse_token(&answer, &cfg.interface, cfg.region.as_deref())
            .map_err(|why| remote("logging in to", auth_url, why))?;
        let renew_at = expires.map(|e| {
            let left = e.duration_since(SystemTime::now()).unwrap_or_default();
            Instant::now() + renew_before(left)
        });
        Ok(Session {
            token: Secret(token),
            storage_url: storage_url.unwrap_or_default(),
            renew_at,
        })
    }

    /// Sends a request built by `build`, retrying connection errors, timeouts, 5xx and 429
    /// with backoff (at most `max_retries` times within `retry_timeout`).
    async fn retrying(
        &self,
        op: &'static str,
        name: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, SinkError> {
        let cfg = &self.inner.cfg;
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut tries = 0;
        loop {
            let r = build().send().await;
            let again = match &r {
                Ok(resp) => retryable(resp.status()),
                Err(e) => e.is_connect() || e.is_timeout() || e.is_request() || e.is_body(),
            };
            if !again || tries >= cfg.max_retries || start.elapsed() + delay > cfg.retry_timeout {
                return r.map_err(|e| SinkError::Remote {
                    op,
                    name: name.into(),
                    source: Box::new(e),
                });
            }
            tracing::debug!(op, name, tries, "Swift request failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
            tries += 1;
        }
    }

    /// A request with the session's token to the URL `url_of` makes of the session, built
    /// by `build`; retried as [`retrying`](Self::retrying) does, and sent once more with a
    /// new token when answered 401.
    async fn authed(
        &self,
        op: &'static str,
        name: &str,
        url_of: impl Fn(&Session) -> Result<Url, SinkError>,
        build: impl Fn(Url) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, SinkError> {
        let mut renewed = false;
        loop {
            let s = self.session().await?;
            let url = url_of(&s)?;
            let r = self
                .retrying(op, name, || {
                    build(url.clone()).header("X-Auth-Token", &s.token.0)
                })
                .await?;
            if r.status() == StatusCode::UNAUTHORIZED && !renewed {
                self.invalidate(&s).await;
                renewed = true;
                continue;
            }
            return Ok(r);
        }
    }

    /// A request on the container (`path` empty) or on an object of it (`path` is the full
    /// key, prefix included).
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        op: &'static str,
        name: &str,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        // Shared: a retry sends it again without a copy.
        body: Option<Bytes>,
        headers: impl Fn(&mut reqwest::header::HeaderMap),
    ) -> Result<reqwest::Response, SinkError> {
        let url_of = |s: &Session| {
            let mut url = Url::parse(&s.storage_url)
                .map_err(|_| remote(op, name, "the storage URL does not parse"))?;
            {
                let mut segs = url
                    .path_segments_mut()
                    .map_err(|_| remote(op, name, "the storage URL cannot take a path"))?;
                segs.pop_if_empty().push(&self.inner.cfg.container);
                if !path.is_empty() {
                    segs.extend(path.split('/'));
                }
            }
            if !query.is_empty() {
                url.query_pairs_mut().extend_pairs(query);
            }
            Ok(url)
        };
        self.authed(op, name, url_of, |url| {
            let mut h = reqwest::header::HeaderMap::new();
            headers(&mut h);
            let mut b = self.inner.http.request(method.clone(), url).headers(h);
            if let Some(body) = &body {
                // Explicit: reqwest sends none for an empty body, and Swift wants one.
                b = b
                    .header(reqwest::header::CONTENT_LENGTH, body.len())
                    .body(body.clone());
            }
            b
        })
        .await
    }

    /// The key of object `name`.
    fn key(&self, name: &str) -> Result<String, SinkError> {
        check_name(name)?;
        Ok(format!("{}{name}", self.inner.prefix))
    }

    /// Writes the object of key `key`; its ETag.
    async fn put_object(
        &self,
        op: &'static str,
        name: &str,
        key: &str,
        data: Bytes,
        kind: Put<'_>,
    ) -> Result<Option<String>, SinkError> {
        let query: &[(&str, &str)] = match kind {
            Put::Manifest(_) => &[("multipart-manifest", "put")],
            _ => &[],
        };
        let r = self
            .send(
                op,
                name,
                Method::PUT,
                key,
                query,
                Some(data),
                |h| match kind {
                    Put::Plain => {}
                    Put::CreateOnly => {
                        h.insert("If-None-Match", "*".parse().expect("header"));
                    }
                    Put::Manifest(id) => {
                        if let Ok(v) = id.parse() {
                            h.insert(UPLOAD_META, v);
                        }
                    }
                },
            )
            .await?;
        if r.status().is_success() {
            Ok(r.headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .map(|s| s.trim_matches('"').to_string()))
        } else {
            Err(status_err(op, name, r.status()))
        }
    }

    /// Two create-only writes of one probe object: the second must be refused.
    async fn probe(&self) -> Result<(), SinkError> {
        let key = format!(
            "{}.cbt-probe-{:032x}",
            self.inner.prefix,
            crate::engine::random_u128()
        );
        let put = |v: &'static [u8]| {
            self.put_object(
                "probing with",
                &key,
                &key,
                Bytes::from_static(v),
                Put::CreateOnly,
            )
        };
        put(b"1").await?;
        let second = put(b"2").await;
        let _ = self.delete_key(&key, &key).await;
        match second {
            Err(SinkError::Exists { .. }) => Ok(()),
            Ok(_) => Err(SinkError::Unsupported(
                "create-only writes (PUT with If-None-Match: *): the server replaced an object it \
                 should have refused; committed backups could be overwritten"
                    .into(),
            )),
            Err(e) => Err(SinkError::Unsupported(format!(
                "create-only writes (PUT with If-None-Match: *): {e}"
            ))),
        }
    }

    /// Deletes the object of key `key` (missing is fine). A segment may be an SLO: it is
    /// deleted with `multipart-manifest=delete`, which takes its segments along (and answers
    /// 200 with "Not an SLO manifest" in its body for a plain object, deleted plainly then).
    async fn delete_key(&self, name: &str, key: &str) -> Result<(), SinkError> {
        let rel = key.strip_prefix(self.inner.prefix.as_str()).unwrap_or(key);
        if crate::format::layout::is_segment_name(rel) {
            let r = self
                .send(
                    "deleting",
                    name,
                    Method::DELETE,
                    key,
                    &[("multipart-manifest", "delete")],
                    None,
                    |h| {
                        h.insert("Accept", "application/json".parse().expect("header"));
                    },
                )
                .await?;
            let status = r.status();
            if status == StatusCode::NOT_FOUND {
                return Ok(());
            }
            if !status.is_success() {
                return Err(status_err("deleting", name, status));
            }
            let body = read_bounded(r, "deleting", name).await?;
            match bulk_outcome(&body) {
                Ok(()) => return Ok(()),
                Err(why) if why.contains("Not an SLO manifest") => {}
                Err(why) => return Err(remote("deleting", name, why)),
            }
        }
        let r = self
            .send("deleting", name, Method::DELETE, key, &[], None, |_| {})
            .await?;
        match r.status() {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            s => Err(status_err("deleting", name, s)),
        }
    }

    /// Deletes keys (full, prefix included) with bulk deletes of up to 1,000 names; missing
    /// ones are fine.
    async fn bulk_delete(&self, keys: &[String]) -> Result<(), SinkError> {
        for chunk in keys.chunks(1000) {
            let container = &self.inner.cfg.container;
            let mut text = String::new();
            for k in chunk {
                let mut u = Url::parse("http://x/").expect("static URL");
                u.path_segments_mut()
                    .expect("base")
                    .push(container)
                    .extend(k.split('/'));
                text.push_str(u.path());
                text.push('\n');
            }
            let r = self.send_account_bulk(Bytes::from(text)).await?;
            let status = r.status();
            let answer = read_bounded(r, "deleting", "segments").await?;
            if !status.is_success() {
                return Err(status_err("deleting", "segments", status));
            }
            bulk_outcome(&answer).map_err(|why| remote("deleting", "segments", why))?;
        }
        Ok(())
    }

    /// A bulk delete (a POST on the account: the container's parent).
    async fn send_account_bulk(&self, body: Bytes) -> Result<reqwest::Response, SinkError> {
        let url_of = |s: &Session| {
            let mut url = Url::parse(&s.storage_url)
                .map_err(|_| remote("deleting", "segments", "the storage URL does not parse"))?;
            url.query_pairs_mut().append_pair("bulk-delete", "");
            Ok(url)
        };
        self.authed("deleting", "segments", url_of, |url| {
            self.inner
                .http
                .post(url)
                .header("Content-Type", "text/plain")
                .header("Accept", "application/json")
                .body(body.clone())
        })
        .await
    }

    /// Objects under `prefix` (a full key prefix), page by page, at most `limit`; with
    /// `dirs`, the names one level below instead (a `/` delimiter listing). Names are
    /// returned whole (prefix included), foreign ones too; callers filter.
    async fn list_keys(
        &self,
        prefix: &str,
        dirs: bool,
        limit: Option<usize>,
    ) -> Result<(Vec<RawEntry>, Vec<String>), SinkError> {
        let (mut objects, mut below) = (Vec::new(), Vec::new());
        let mut marker = String::new();
        for page_no in 0.. {
            if page_no == 1000 {
                return Err(SinkError::TooLarge {
                    name: format!("listing of {prefix}"),
                    len: (objects.len() + below.len()) as u64,
                    max: 10_000_000,
                });
            }
            let want = limit
                .map(|n| n.saturating_sub(objects.len()).clamp(1, PAGE))
                .unwrap_or(PAGE);
            let want_text = want.to_string();
            let mut q = vec![
                ("format", "json"),
                ("prefix", prefix),
                ("limit", want_text.as_str()),
            ];
            if !marker.is_empty() {
                q.push(("marker", marker.as_str()));
            }
            if dirs {
                q.push(("delimiter", "/"));
            }
            let r = self
                .send("listing", prefix, Method::GET, "", &q, None, |_| {})
                .await?;
            let status = r.status();
            if status == StatusCode::NO_CONTENT {
                break;
            }
            if !status.is_success() {
                return Err(status_err("listing", prefix, status));
            }
            let body = read_bounded(r, "listing", prefix).await?;
            let page = parse_listing(&body).map_err(|why| remote("listing", prefix, why))?;
            let n = page.len();
            let Some(last) = page.last().map(|e| e.name.clone()) else {
                break;
            };
            for e in page {
                if e.dir {
                    below.push(e.name);
                } else {
                    objects.push(e);
                }
            }
            if limit.is_some_and(|l| objects.len() >= l) || n < want {
                break;
            }
            marker = last;
        }
        Ok((objects, below))
    }

    /// Every key of the container under `prefix` (the sink's own prefix not added), the
    /// sink's own bookkeeping included (SLO segments, upload markers): for audits and tests.
    pub async fn list_all_keys(&self, prefix: &str) -> Result<Vec<String>, SinkError> {
        let (raw, _) = self.list_keys(prefix, false, None).await?;
        Ok(raw.into_iter().map(|e| e.name).collect())
    }

    /// A listed key as the sink names it, if it is one of ours under `prefix`.
    fn info(&self, prefix: &str, e: &RawEntry) -> Option<ObjectInfo> {
        let rel = e.name.strip_prefix(self.inner.prefix.as_str())?;
        if !rel.starts_with(prefix) || check_name(rel).is_err() {
            return None;
        }
        Some(ObjectInfo {
            name: rel.to_string(),
            len: e.bytes,
            modified: e.modified,
        })
    }

    async fn list_objects(
        &self,
        prefix: &str,
        limit: Option<usize>,
    ) -> Result<Vec<ObjectInfo>, SinkError> {
        let full = format!("{}{prefix}", self.inner.prefix);
        let (raw, _) = self.list_keys(&full, false, limit).await?;
        let mut out: Vec<ObjectInfo> = raw.iter().filter_map(|e| self.info(prefix, e)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(n) = limit {
            out.truncate(n);
        }
        Ok(out)
    }
}

/// The outcome of a bulk or SLO delete, whose HTTP status is 200 whatever happened: the
/// JSON body says (`Response Status`, `Errors`). Missing objects are not errors.
fn bulk_outcome(body: &[u8]) -> Result<(), String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "unreadable bulk delete answer".to_string())?;
    let code = v["Response Status"].as_str().unwrap_or("");
    if code.starts_with("200") {
        Ok(())
    } else {
        Err(format!(
            "bulk delete answered {code:?}: {}",
            v["Errors"]
                .to_string()
                .chars()
                .take(500)
                .collect::<String>()
        ))
    }
}

/// Renew a token lasting `left` this much sooner: 5 minutes, or half its life if shorter.
fn renew_before(left: Duration) -> Duration {
    left.saturating_sub(Duration::from_secs(300).min(left / 2))
}

/// Reads an answer's body, refusing more than [`MAX_ANSWER`] bytes.
async fn read_bounded(
    r: reqwest::Response,
    op: &'static str,
    name: &str,
) -> Result<Vec<u8>, SinkError> {
    read_at_most(r, op, name, MAX_ANSWER as u64).await
}

/// Reads an answer's body of at most `max` bytes (its announced length checked first):
/// [`SinkError::TooLarge`] naming `name` otherwise.
async fn read_at_most(
    mut r: reqwest::Response,
    op: &'static str,
    name: &str,
    max: u64,
) -> Result<Vec<u8>, SinkError> {
    let too_large = |len| SinkError::TooLarge {
        name: name.into(),
        len,
        max,
    };
    if let Some(l) = r.content_length().filter(|&l| l > max) {
        return Err(too_large(l));
    }
    let mut out = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|e| SinkError::Remote {
        op,
        name: name.into(),
        source: Box::new(e),
    })? {
        if (out.len() + chunk.len()) as u64 > max {
            return Err(too_large((out.len() + chunk.len()) as u64));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// One entry of a container listing.
#[derive(Debug, Clone, PartialEq)]
struct RawEntry {
    name: String,
    bytes: u64,
    modified: Option<SystemTime>,
    /// A `subdir` of a delimiter listing.
    dir: bool,
}

/// A JSON container listing: objects (`name`, `bytes`, `last_modified` in UTC without a
/// zone) and, with a delimiter, `subdir`s.
fn parse_listing(body: &[u8]) -> Result<Vec<RawEntry>, String> {
    let v: Vec<serde_json::Value> =
        serde_json::from_slice(body).map_err(|_| "the listing is not a JSON array".to_string())?;
    v.iter()
        .map(|e| {
            if let Some(d) = e.get("subdir").and_then(|d| d.as_str()) {
                return Ok(RawEntry {
                    name: d.trim_end_matches('/').to_string(),
                    bytes: 0,
                    modified: None,
                    dir: true,
                });
            }
            let name = e["name"]
                .as_str()
                .ok_or("a listed object without a name")?
                .to_string();
            let bytes = e["bytes"]
                .as_u64()
                .ok_or("a listed object without a size")?;
            let modified = e["last_modified"]
                .as_str()
                .and_then(|t| chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f").ok())
                .and_then(|t| u64::try_from(t.and_utc().timestamp_millis()).ok())
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
            Ok(RawEntry {
                name,
                bytes,
                modified,
                dir: false,
            })
        })
        .collect()
}

/// From a Keystone v3 token answer: the object-store endpoint of `interface` (in `region`
/// when given) and the expiry.
fn parse_token(
    body: &[u8],
    interface: &str,
    region: Option<&str>,
) -> Result<(Option<String>, Option<SystemTime>), String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "the token answer is not JSON".to_string())?;
    let t = &v["token"];
    let expires = t["expires_at"]
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .and_then(|d| u64::try_from(d.timestamp_millis()).ok())
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
    let url = t["catalog"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["type"] == "object-store")
        .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
        .find(|e| {
            e["interface"] == interface
                && region.is_none_or(|r| e["region"] == r || e["region_id"] == r)
        })
        .and_then(|e| e["url"].as_str())
        .map(str::to_string);
    Ok((url, expires))
}

impl Sink for SwiftSink {
    type Writer = SwiftWriter;

    fn read_hint(&self) -> super::ReadHint {
        super::ReadHint::OBJECT_STORE
    }

    fn atomic_put_new(&self) -> bool {
        false
    }

    async fn create(&self, name: &str) -> Result<SwiftWriter, SinkError> {
        let key = self.key(name)?;
        Ok(SwiftWriter {
            sink: self.clone(),
            name: name.to_string(),
            key,
            buf: Vec::new(),
            upload: None,
            len: 0,
        })
    }

    async fn put(&self, name: &str, data: Vec<u8>) -> Result<(), SinkError> {
        let key = self.key(name)?;
        self.put_object("writing", name, &key, data.into(), Put::Plain)
            .await
            .map(drop)
    }

    async fn put_new(&self, name: &str, data: Vec<u8>) -> Result<(), SinkError> {
        let key = self.key(name)?;
        let data = Bytes::from(data);
        match self
            .put_object("writing", name, &key, data.clone(), Put::CreateOnly)
            .await
        {
            Ok(ours) => {
                // A writer whose PUT overlapped ours passed the same check: the object is
                // whichever of us has the newer timestamp. Ours only if it still reads so.
                let r = self
                    .send("checking", name, Method::HEAD, &key, &[], None, |_| {})
                    .await?;
                let there = r
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .map(|s| s.trim_matches('"').to_string());
                match (r.status(), ours) {
                    (s, Some(ours)) if s.is_success() && there.as_deref() != Some(&ours) => {
                        Err(SinkError::Exists { name: name.into() })
                    }
                    (s, _) if s.is_success() => Ok(()),
                    (s, _) => Err(status_err("checking", name, s)),
                }
            }
            Err(SinkError::Exists { .. }) => {
                // Perhaps our own first attempt, retried after a lost answer.
                match self.get(name, data.len() as u64).await {
                    Ok(there) if there == data => Ok(()),
                    _ => Err(SinkError::Exists { name: name.into() }),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn get_range_into(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>, SinkError> {
        let key = self.key(name)?;
        let short = |got| SinkError::ShortRead {
            name: name.into(),
            offset,
            want: len,
            got,
        };
        let last = offset
            .checked_add(len)
            .and_then(|e| e.checked_sub(1))
            .ok_or_else(|| short(0))?;
        buf.clear();
        if len == 0 {
            return Ok(buf);
        }
        let range = format!("bytes={offset}-{last}");
        let mut r = self
            .send("reading", name, Method::GET, &key, &[], None, |h| {
                h.insert("Range", range.parse().expect("header"));
            })
            .await?;
        match r.status() {
            StatusCode::PARTIAL_CONTENT => {}
            // A range past the end.
            StatusCode::RANGE_NOT_SATISFIABLE => return Err(short(0)),
            // A whole object answered to a range: only if it is exactly the range.
            StatusCode::OK if offset == 0 => {}
            s if s.is_success() => {
                return Err(remote(
                    "reading",
                    name,
                    format!("Swift answered {s} to a range"),
                ))
            }
            s => return Err(status_err("reading", name, s)),
        }
        if r.content_length().is_some_and(|l| l != len) {
            return Err(short(r.content_length().unwrap_or(0).min(len)));
        }
        buf.reserve(len as usize);
        while let Some(chunk) = r.chunk().await.map_err(|e| SinkError::Remote {
            op: "reading",
            name: name.into(),
            source: Box::new(e),
        })? {
            if buf.len() + chunk.len() > len as usize {
                return Err(short(len));
            }
            buf.extend_from_slice(&chunk);
        }
        if buf.len() as u64 != len {
            return Err(short(buf.len() as u64));
        }
        Ok(buf)
    }

    async fn get(&self, name: &str, max: u64) -> Result<Vec<u8>, SinkError> {
        self.get_key(name, &self.key(name)?, max).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, SinkError> {
        self.list_objects(prefix, None).await
    }

    async fn list_first(&self, prefix: &str, n: usize) -> Result<Vec<ObjectInfo>, SinkError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        self.list_objects(prefix, Some(n)).await
    }

    async fn list_dirs(&self, dir: &str) -> Result<Vec<String>, SinkError> {
        let full = format!("{}{dir}", self.inner.prefix);
        let (_, below) = self.list_keys(&full, true, None).await?;
        let mut out: Vec<String> = below
            .iter()
            .filter_map(|d| {
                let rest = d.strip_prefix(full.as_str())?;
                (!rest.is_empty() && check_name(rest).is_ok()).then(|| rest.to_string())
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    async fn delete(&self, name: &str) -> Result<(), SinkError> {
        let key = self.key(name)?;
        self.delete_key(name, &key).await
    }

    async fn delete_many(&self, names: &[String]) -> Result<(), SinkError> {
        // A segment may be an SLO, whose segments a bulk delete would leave behind: those go
        // one by one, with theirs; everything else in one bulk delete.
        let mut plain = Vec::new();
        for n in names {
            if crate::format::layout::is_segment_name(n) {
                self.delete(n).await?;
            } else {
                plain.push(self.key(n)?);
            }
        }
        self.bulk_delete(&plain).await
    }

    async fn remove_stale_partials(&self, grace: Duration) -> Result<u64, SinkError> {
        let now = SystemTime::now();
        let p = &self.inner.prefix;
        let (markers, _) = self
            .list_keys(&format!("{p}{UPLOADS}"), false, None)
            .await?;
        let mut removed = 0;
        for m in markers {
            let Some(id) = m.name.strip_prefix(&format!("{p}{UPLOADS}")) else {
                continue;
            };
            if !super::older_than(m.modified, grace, now) || !is_upload_id(id) {
                continue;
            }
            // The marker names the object.
            let name = match self.get_key(&m.name, &m.name, MAX_NAME_BYTES).await {
                Ok(b) => String::from_utf8(b).unwrap_or_default(),
                Err(SinkError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            if check_name(&name).is_err() {
                continue;
            }
            let seg_prefix = format!("{p}{SEGMENTS}{name}/{id}/");
            let (segs, _) = self.list_keys(&seg_prefix, false, None).await?;
            if segs
                .iter()
                .any(|s| !super::older_than(s.modified, grace, now))
            {
                continue;
            }
            // Finished, only the marker left behind: the object names this upload.
            let key = format!("{p}{name}");
            let r = self
                .send("checking", &name, Method::HEAD, &key, &[], None, |_| {})
                .await?;
            let ours = r.status().is_success()
                && r.headers().get(UPLOAD_META).and_then(|v| v.to_str().ok()) == Some(id);
            let mut keys: Vec<String> = if ours {
                Vec::new()
            } else {
                segs.into_iter().map(|s| s.name).collect()
            };
            keys.push(m.name.clone());
            self.bulk_delete(&keys).await?;
            removed += u64::from(!ours);
        }
        Ok(removed)
    }
}

/// Longest content of an upload marker (an object name).
const MAX_NAME_BYTES: u64 = 1024;

fn is_upload_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl SwiftSink {
    /// [`Sink::get`] of a full key (`name` for errors).
    async fn get_key(&self, name: &str, key: &str, max: u64) -> Result<Vec<u8>, SinkError> {
        let r = self
            .send("reading", name, Method::GET, key, &[], None, |_| {})
            .await?;
        if !r.status().is_success() {
            return Err(status_err("reading", name, r.status()));
        }
        read_at_most(r, "reading", name, max).await
    }
}

/// An SLO upload in progress.
struct Upload {
    id: String,
    marker: String,
    /// Segments uploaded or uploading: index → (key, etag, size).
    done: Vec<Option<(String, String, usize)>>,
    tasks: tokio::task::JoinSet<Result<(usize, String, String, usize), SinkError>>,
}

/// Writer of one object: buffered up to one segment, then an SLO.
pub struct SwiftWriter {
    sink: SwiftSink,
    name: String,
    key: String,
    buf: Vec<u8>,
    upload: Option<Upload>,
    len: u64,
}

impl SwiftWriter {
    /// Starts uploading `data` as the next segment, after waiting for room.
    async fn push_segment(&mut self, data: Vec<u8>) -> Result<(), SinkError> {
        let sink = self.sink.clone();
        let seg_size = sink.inner.cfg.segment_size;
        let in_flight = sink.inner.cfg.segments_in_flight;
        if self.upload.is_none() {
            let id = format!("{:032x}", crate::engine::random_u128());
            let marker = format!("{}{UPLOADS}{id}", sink.inner.prefix);
            sink.put_object(
                "starting the upload of",
                &self.name,
                &marker,
                Bytes::from(self.name.clone()),
                Put::CreateOnly,
            )
            .await?;
            self.upload = Some(Upload {
                id,
                marker,
                done: Vec::new(),
                tasks: tokio::task::JoinSet::new(),
            });
        }
        let up = self.upload.as_mut().expect("upload");
        if up.done.len() >= MAX_SEGMENTS {
            return Err(SinkError::TooLarge {
                name: self.name.clone(),
                len: self.len,
                max: (MAX_SEGMENTS * seg_size) as u64,
            });
        }
        while up.tasks.len() >= in_flight {
            collect(up, &self.name).await?;
        }
        let idx = up.done.len();
        up.done.push(None);
        let key = format!(
            "{}{SEGMENTS}{}/{}/{idx:08}",
            sink.inner.prefix, self.name, up.id
        );
        let name = self.name.clone();
        up.tasks.spawn(async move {
            let size = data.len();
            let etag = sink
                .put_object("writing a segment of", &name, &key, data.into(), Put::Plain)
                .await?
                .unwrap_or_default();
            Ok((idx, key, etag, size))
        });
        Ok(())
    }
}

/// Waits for one segment upload of `up`.
async fn collect(up: &mut Upload, name: &str) -> Result<(), SinkError> {
    match up.tasks.join_next().await {
        Some(Ok(Ok((idx, key, etag, size)))) => {
            up.done[idx] = Some((key, etag, size));
            Ok(())
        }
        Some(Ok(Err(e))) => Err(e),
        Some(Err(e)) => Err(remote("writing", name, format!("segment task: {e}"))),
        None => Ok(()),
    }
}

impl ObjectWriter for SwiftWriter {
    async fn append_prefix(&mut self, data: Vec<u8>, len: usize) -> Result<Vec<u8>, SinkError> {
        let part = &data[..len.min(data.len())];
        self.len += part.len() as u64;
        let seg = self.sink.inner.cfg.segment_size;
        self.buf.extend_from_slice(part);
        while self.buf.len() >= seg {
            let rest = self.buf.split_off(seg);
            let full = std::mem::replace(&mut self.buf, rest);
            self.push_segment(full).await?;
        }
        Ok(data)
    }

    fn len(&self) -> u64 {
        self.len
    }

    async fn finish(mut self) -> Result<(), SinkError> {
        let sink = self.sink.clone();
        if self.upload.is_none() {
            let buf = std::mem::take(&mut self.buf);
            return sink
                .put_object("finishing", &self.name, &self.key, buf.into(), Put::Plain)
                .await
                .map(drop);
        }
        if !self.buf.is_empty() {
            let last = std::mem::take(&mut self.buf);
            self.push_segment(last).await?;
        }
        let mut up = self.upload.take().expect("upload");
        while !up.tasks.is_empty() {
            collect(&mut up, &self.name).await?;
        }
        let container = &sink.inner.cfg.container;
        let manifest: Vec<serde_json::Value> = up
            .done
            .iter()
            .map(|d| {
                let (key, etag, size) = d.as_ref().expect("every segment uploaded");
                serde_json::json!({
                    "path": format!("/{container}/{key}"),
                    "etag": if etag.is_empty() { serde_json::Value::Null } else { etag.as_str().into() },
                    "size_bytes": size,
                })
            })
            .collect();
        let body = serde_json::to_vec(&manifest)
            .map_err(|e| remote("finishing", &self.name, e.to_string()))?;
        // A failure leaves the marker and the segments: remove_stale_partials sweeps them.
        sink.put_object(
            "finishing",
            &self.name,
            &self.key,
            body.into(),
            Put::Manifest(&up.id),
        )
        .await?;
        // The object names its upload now: a marker left by a failure here is harmless.
        let _ = sink.delete_key(&up.marker, &up.marker).await;
        Ok(())
    }

    async fn abort(mut self) {
        let Some(mut up) = self.upload.take() else {
            return;
        };
        up.tasks.abort_all();
        while up.tasks.join_next().await.is_some() {}
        let p = &self.sink.inner.prefix;
        let seg_prefix = format!("{p}{SEGMENTS}{}/{}/", self.name, up.id);
        if let Ok((segs, _)) = self.sink.list_keys(&seg_prefix, false, None).await {
            let mut keys: Vec<String> = segs.into_iter().map(|s| s.name).collect();
            keys.push(up.marker.clone());
            let _ = self.sink.bulk_delete(&keys).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_are_parsed_and_bad_ones_refused() {
        let body = br#"[{"bytes": 3, "hash": "h", "name": "p/x", "content_type": "a/b",
            "last_modified": "2026-12-02T13:37:40.874080"}, {"subdir": "p/d/"}]"#;
        let l = parse_listing(body).expect("listing");
        assert_eq!(l.len(), 2);
        assert_eq!(
            (l[0].name.as_str(), l[0].bytes, l[0].dir),
            ("p/x", 3, false)
        );
        assert_eq!(
            l[0].modified,
            Some(UNIX_EPOCH + Duration::from_millis(1_796_218_660_874))
        );
        assert_eq!((l[1].name.as_str(), l[1].dir), ("p/d", true));
        assert!(parse_listing(b"{}").is_err());
        assert!(parse_listing(br#"[{"bytes": 1}]"#).is_err());
        assert!(parse_listing(br#"[{"name": "x"}]"#).is_err());
        assert!(parse_listing(b"\xff").is_err());
    }

    #[test]
    fn the_catalog_gives_the_endpoint_of_the_interface_and_region() {
        let body = br#"{"token": {"expires_at": "2026-12-02T14:37:40.000000Z", "catalog": [
            {"type": "identity", "endpoints": [{"interface": "public", "region": "R1", "url": "http://k"}]},
            {"type": "object-store", "endpoints": [
                {"interface": "internal", "region": "R1", "url": "http://int/v1/KEY_p"},
                {"interface": "public", "region": "R2", "url": "http://r2/v1/KEY_p"},
                {"interface": "public", "region": "R1", "url": "http://r1/v1/KEY_p"}]}]}}"#;
        let (u, e) = parse_token(body, "public", Some("R1")).expect("token");
        assert_eq!(u.as_deref(), Some("http://r1/v1/KEY_p"));
        assert_eq!(e, Some(UNIX_EPOCH + Duration::from_secs(1_796_222_260)));
        let (u, _) = parse_token(body, "internal", None).expect("token");
        assert_eq!(u.as_deref(), Some("http://int/v1/KEY_p"));
        let (u, _) = parse_token(body, "admin", None).expect("token");
        assert_eq!(u, None);
        assert!(parse_token(b"nope", "public", None).is_err());
    }

    #[test]
    fn tokens_are_renewed_before_they_expire() {
        assert_eq!(
            renew_before(Duration::from_secs(3600)),
            Duration::from_secs(3300)
        );
        assert_eq!(
            renew_before(Duration::from_secs(60)),
            Duration::from_secs(30)
        );
        assert_eq!(renew_before(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn configurations_are_checked_and_secrets_do_not_show() {
        let ok = SwiftConfig {
            auth: SwiftAuth::Password {
                auth_url: "http://k:5000/v3".into(),
                user: "u".into(),
                user_domain: "Default".into(),
                password: Secret("hunter2".into()),
                project: "p".into(),
                project_domain: "Default".into(),
            },
            container: "backups".into(),
            ..Default::default()
        };
        ok.validate().expect("valid");
        assert!(!format!("{ok:?}").contains("hunter2"));
        for (bad, key) in [
            (
                SwiftConfig {
                    container: "a/b".into(),
                    ..ok.clone()
                },
                "container",
            ),
            (
                SwiftConfig {
                    segment_size: 1,
                    ..ok.clone()
                },
                "segment_size",
            ),
            (
                SwiftConfig {
                    interface: "private".into(),
                    ..ok.clone()
                },
                "interface",
            ),
            (
                SwiftConfig {
                    auth: SwiftAuth::TempAuth {
                        auth_url: "http://s/auth/v1.0".into(),
                        user: "nocolon".into(),
                        key: Secret::default(),
                    },
                    ..ok.clone()
                },
                "user",
            ),
        ] {
            assert_eq!(bad.validate().map_err(|e| e.0), Err(key));
        }
    }
}
