//! A sink in an S3 bucket (Ceph RGW, SeaweedFS, AWS S3), through `object_store`.
//!
//! | [`Sink`] call | requests |
//! |---|---|
//! | [`create`](Sink::create) … `finish`, object ≤ one part | one `PutObject` |
//! | [`create`](Sink::create) … `finish`, larger | `CreateMultipartUpload`, `UploadPart` × n (at most [`S3Config::parts_in_flight`] at once), `CompleteMultipartUpload` |
//! | [`put`](Sink::put) | `PutObject` |
//! | [`put_new`](Sink::put_new) | `PutObject` with `If-None-Match: *`; after a refusal, one `GetObject` (see below) |
//! | [`get_range`](Sink::get_range) | one ranged `GetObject` |
//! | [`get`](Sink::get) | `GetObject`, the size checked before the body is read |
//! | [`list`](Sink::list), [`list_first`](Sink::list_first), [`list_dirs`](Sink::list_dirs) | `ListObjectsV2` with the name prefix (and `max-keys`, or the `/` delimiter), 1,000 names a page |
//! | [`delete`](Sink::delete) | `DeleteObject` |
//! | [`delete_many`](Sink::delete_many) | `DeleteObjects`, 1,000 names a request |
//! | [`remove_stale_partials`](Sink::remove_stale_partials) | `ListMultipartUploads` (pages), `AbortMultipartUpload` per stale upload |
//!
//! **Create-only commits.** Indexes, manifests and markers are written with
//! `If-None-Match: *`. `object_store` retries a 5xx even for a conditional PUT, so a refusal
//! after a retry may be our own first attempt: the object is read back and, if it holds
//! exactly our bytes, the write counts as done (the manifests, indexes and markers cbt writes
//! hold times and random segment names: two writers never write the same bytes).
//!
//! **Servers that ignore preconditions** (Swift's s3api answers 501; some gateways answer 200
//! and replace the object) would let a reused id overwrite a committed backup. [`S3Sink::open`]
//! writes a probe object create-only twice and refuses the sink unless the second write is
//! refused by the server.
//!
//! **Immutable mode** ([`S3Config::object_lock`]): every segment, index and manifest written
//! gets its own retention date (`PutObjectRetention` on the version just written: one more
//! request per object); [`delete`](Sink::delete) lists the object's versions
//! (`ListObjectVersions`) and deletes each by version id, a 403 being [`SinkError::Locked`];
//! [`delete_many`](Sink::delete_many) does so 8 objects at a time; `locked_until` is one
//! `GetObjectRetention`, `extend_lock` one `PutObjectRetention` per object (and a read-back
//! when the server refuses to shorten). [`S3Sink::open`] reads the bucket's Object Lock
//! configuration and checks that the server refuses to delete a version it has just locked.
//!
//! Credentials come from [`S3Config`]; they never appear in `Debug` output or error texts.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::multipart::MultipartStore;
use object_store::path::Path as ObjPath;
use object_store::signer::{SignedUrlOptions, Signer};
use object_store::{
    BackoffConfig, Certificate, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, WriteMultipart,
};

use super::{check_name, ObjectInfo, ObjectWriter, Sink, SinkError};
use crate::error_chain;
use crate::format::layout;

/// Smallest part S3 accepts (but for the last).
pub const MIN_PART: usize = 5 << 20;
/// Largest part S3 accepts.
pub const MAX_PART: usize = 5 << 30;

pub use super::Secret;

/// Reads S3 credentials from a file of two lines, `access_key = …` and `secret_key = …`
/// (see [`read_secrets`](super::read_secrets): 0600, quoted values, `#` comments).
pub fn read_credentials(path: &std::path::Path) -> Result<(String, Secret), SinkError> {
    let mut m = super::read_secrets(path, &["access_key", "secret_key"])?;
    match (m.remove("access_key"), m.remove("secret_key")) {
        (Some(k), Some(s)) => Ok((k.0, s)),
        _ => Err(SinkError::Config(format!(
            "credentials {}: needs access_key and secret_key",
            path.display()
        ))),
    }
}

/// S3 credentials from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, when both are set.
pub fn credentials_from_env() -> Option<(String, Secret)> {
    match (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Ok(k), Ok(s)) if !k.is_empty() => Some((k, Secret(s))),
        _ => None,
    }
}

/// Where and how to reach the bucket.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// `http://host:port` or `https://host:port` (path-style requests: `endpoint/bucket/key`).
    pub endpoint: String,
    pub bucket: String,
    /// Objects go under `prefix/` (`""`: at the top of the bucket).
    pub prefix: String,
    pub region: String,
    /// Empty key and secret: anonymous (unsigned) requests.
    pub access_key: String,
    pub secret_key: Secret,
    /// PEM certificates trusted besides the system's (a private CA of the object store).
    pub ca_pem: Option<Vec<u8>>,
    /// Size of multipart parts; also the largest object written with a single PUT.
    pub part_size: usize,
    /// Parts of one object uploading at once (memory: about `part_size` × this per writer).
    pub parts_in_flight: usize,
    /// One request, from connect to the last byte of the answer.
    pub request_timeout: Duration,
    /// Sign requests without hashing their bodies (`UNSIGNED-PAYLOAD`). SigV4's payload hash
    /// costs a SHA-256 of every byte uploaded; cbt's objects carry their own CRC-32 per frame
    /// and per index, checked on every read, and HTTPS protects them in transit.
    pub unsigned_payload: bool,
    /// Retries of a failed request (5xx, timeouts, connection errors), within `retry_timeout`.
    pub max_retries: usize,
    pub retry_timeout: Duration,
    /// Immutable backups: segments, indexes and manifests are locked with S3 Object Lock
    /// (see [`ObjectLock`]). The bucket must have Object Lock enabled, and the server must
    /// enforce it: [`S3Sink::open`] checks both and refuses the sink otherwise.
    pub object_lock: Option<ObjectLock>,
}

/// S3 Object Lock retention mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Users with `s3:BypassGovernanceRetention` may still delete or shorten.
    Governance,
    /// Nobody can delete a locked version or shorten its lock, the root account included.
    Compliance,
}

impl LockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Governance => "GOVERNANCE",
            LockMode::Compliance => "COMPLIANCE",
        }
    }

    /// `governance` or `compliance` (any case).
    pub fn parse(s: &str) -> Option<LockMode> {
        match s.to_ascii_lowercase().as_str() {
            "governance" => Some(LockMode::Governance),
            "compliance" => Some(LockMode::Compliance),
            _ => None,
        }
    }
}

/// Immutable mode of an S3 sink. Every segment, index and manifest is locked when written,
/// for [`lock_span`](super::lock_span)`(period)`, by the object's own retention date (no
/// bucket default is needed, nor used); a backup extends the locks of the older objects it
/// needs (see `engine::backup`), so each backup stays whole for at least `period` after it
/// started. Markers and other overwritten objects are not locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    pub mode: LockMode,
    pub period: Duration,
}

/// How long the open-time probe object stays locked.
const LOCK_PROBE: Duration = Duration::from_secs(60);
/// Name of the probe object of immutable mode (one per prefix, overwritten at every open).
const LOCK_PROBE_NAME: &str = ".cbt-lock-probe";

impl S3Config {
    /// Checks the address and the tuning; on a fault, the field's name and what it must be.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        let e = &self.endpoint;
        if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() > 1024 {
            return Err(("endpoint", "an http:// or https:// URL"));
        }
        let b = &self.bucket;
        if b.is_empty()
            || b.len() > 63
            || !b
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-.".contains(&c))
        {
            return Err(("bucket", "1 to 63 of [a-z0-9.-]"));
        }
        let prefix = self.prefix.trim_matches('/');
        if !prefix.is_empty() && check_name(prefix).is_err() {
            return Err(("prefix", "'/'-separated [A-Za-z0-9._-] names"));
        }
        if !(MIN_PART..=MAX_PART).contains(&self.part_size) {
            return Err(("part_size", "5 MiB to 5 GiB"));
        }
        if !(1..=64).contains(&self.parts_in_flight) {
            return Err(("parts_in_flight", "1 to 64"));
        }
        if let Some(l) = &self.object_lock {
            if !(Duration::from_secs(1)..=Duration::from_secs(100 * 366 * 86_400))
                .contains(&l.period)
            {
                return Err(("object_lock", "a period of 1 second to 100 years"));
            }
        }
        Ok(())
    }
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: String::new(),
            bucket: String::new(),
            prefix: String::new(),
            region: "us-east-1".into(),
            access_key: String::new(),
            secret_key: Secret::default(),
            ca_pem: None,
            part_size: 8 << 20,
            parts_in_flight: 4,
            request_timeout: Duration::from_secs(120),
            unsigned_payload: true,
            max_retries: 8,
            retry_timeout: Duration::from_secs(120),
            object_lock: None,
        }
    }
}

/// A sink in an S3 bucket. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct S3Sink {
    inner: Arc<Inner>,
    /// Immutable mode: the retention date of what this handle writes, when it is not the
    /// lock span from the write (`Some(None)`: not locked). See [`Sink::locking_until`].
    until: Option<Option<SystemTime>>,
}

struct Inner {
    store: AmazonS3,
    bucket: String,
    /// `""` or `"prefix/"`.
    prefix: String,
    part_size: usize,
    parts_in_flight: usize,
    /// For the calls `object_store` does not make (ListMultipartUploads, Object Lock and
    /// version calls), presigned.
    http: reqwest::Client,
    lock: Option<ObjectLock>,
}

impl std::fmt::Debug for S3Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Sink")
            .field("store", &self.inner.store.to_string())
            .field("prefix", &self.inner.prefix)
            .finish()
    }
}

fn invalid(what: &str) -> SinkError {
    SinkError::Config(what.to_string())
}

/// Maps an `object_store` error of operation `op` on object `name`.
fn os_err(op: &'static str, name: &str, e: object_store::Error) -> SinkError {
    match e {
        object_store::Error::NotFound { .. } => SinkError::NotFound { name: name.into() },
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            SinkError::Exists { name: name.into() }
        }
        // A bucket or user quota (RGW, AWS): the sink is full, as a full disk is.
        e if e.to_string().contains("QuotaExceeded") => SinkError::NoSpace {
            name: name.into(),
            source: std::io::Error::new(std::io::ErrorKind::QuotaExceeded, e),
        },
        e => SinkError::Remote {
            op,
            name: name.into(),
            source: Box::new(e),
        },
    }
}

/// The S3 client of `cfg` and a plain HTTP client with the same trust, for presigned
/// requests `object_store` does not make itself.
fn clients(cfg: &S3Config) -> Result<(AmazonS3, reqwest::Client), SinkError> {
    // reqwest is built without a crypto provider: ours is ring, as for the rest of cbt.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = cfg.endpoint.starts_with("http://");
    let mut copts = ClientOptions::new()
        .with_allow_http(http)
        .with_timeout(cfg.request_timeout)
        .with_connect_timeout(Duration::from_secs(10));
    let mut hb = reqwest::Client::builder()
        .timeout(cfg.request_timeout)
        .connect_timeout(Duration::from_secs(10));
    if let Some(pem) = &cfg.ca_pem {
        let c = Certificate::from_pem(pem).map_err(|_| invalid("ca: not a PEM certificate"))?;
        copts = copts.with_root_certificate(c);
        let c = reqwest::Certificate::from_pem(pem)
            .map_err(|_| invalid("ca: not a PEM certificate"))?;
        hb = hb.add_root_certificate(c);
    }
    let anonymous = cfg.access_key.is_empty() && cfg.secret_key.0.is_empty();
    let store = AmazonS3Builder::new()
        .with_endpoint(&cfg.endpoint)
        .with_bucket_name(&cfg.bucket)
        .with_region(&cfg.region)
        .with_access_key_id(&cfg.access_key)
        .with_secret_access_key(&cfg.secret_key.0)
        .with_skip_signature(anonymous)
        .with_unsigned_payload(cfg.unsigned_payload)
        .with_allow_http(http)
        .with_virtual_hosted_style_request(false)
        .with_client_options(copts)
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: cfg.max_retries,
            retry_timeout: cfg.retry_timeout,
        })
        .build()
        .map_err(|e| SinkError::Config(format!("S3 client: {e}")))?;
    let client = hb
        .build()
        .map_err(|e| SinkError::Config(format!("HTTP client: {e}")))?;
    Ok((store, client))
}

impl S3Sink {
    /// Connects to the bucket and probes that the server refuses a second create-only write
    /// (see the module documentation). A missing bucket, wrong credentials or an unreachable
    /// endpoint fail here, with the server's answer.
    pub async fn open(cfg: &S3Config) -> Result<S3Sink, SinkError> {
        cfg.validate()
            .map_err(|(key, why)| invalid(&format!("{key}: {why}")))?;
        let prefix = cfg.prefix.trim_matches('/');
        let (store, http) = clients(cfg)?;
        let sink = S3Sink {
            until: None,
            inner: Arc::new(Inner {
                store,
                bucket: cfg.bucket.clone(),
                prefix: if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}/")
                },
                part_size: cfg.part_size,
                parts_in_flight: cfg.parts_in_flight,
                http,
                lock: cfg.object_lock,
            }),
        };
        // Immutable mode first: a server that ignores locks is named as such.
        if sink.inner.lock.is_some() {
            sink.probe_lock().await?;
        }
        sink.probe().await?;
        Ok(sink)
    }

    /// Creates the bucket of `cfg` (for set-up and tests; operators usually create buckets
    /// with their own tools). A bucket that exists and is ours already is not an error.
    pub async fn create_bucket(cfg: &S3Config) -> Result<(), SinkError> {
        let (store, client) = clients(cfg)?;
        // CreateBucket is a PUT on the bucket itself: a presigned URL of the empty key. With
        // immutable mode, Object Lock is enabled on the new bucket (it cannot be later).
        let lock_header = (
            http::HeaderName::from_static("x-amz-bucket-object-lock-enabled"),
            http::HeaderValue::from_static("true"),
        );
        let mut opts = SignedUrlOptions::new();
        if cfg.object_lock.is_some() {
            opts = opts.with_signed_header(lock_header.0.clone(), lock_header.1.clone());
        }
        let url = store
            .signed_url_opts(
                http::Method::PUT,
                &ObjPath::default(),
                Duration::from_secs(300),
                &opts,
            )
            .await
            .map_err(|e| os_err("creating", "the bucket", e))?;
        let remote = |source: Box<dyn std::error::Error + Send + Sync>| SinkError::Remote {
            op: "creating",
            name: format!("bucket {}", cfg.bucket),
            source,
        };
        let mut req = client.put(url.as_str());
        if cfg.object_lock.is_some() {
            req = req.header(lock_header.0, lock_header.1);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| remote(Box::new(e.without_url())))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if status.is_success() || body.contains("BucketAlreadyOwnedByYou") {
            Ok(())
        } else {
            Err(remote(format!("HTTP {status}").into()))
        }
    }

    /// The object's key in the bucket.
    fn key(&self, name: &str) -> Result<ObjPath, SinkError> {
        check_name(name)?;
        ObjPath::parse(format!("{}{name}", self.inner.prefix))
            .map_err(|_| SinkError::InvalidName { name: name.into() })
    }

    /// Objects whose name starts with `prefix` (and, with `dirs`, the names one level below
    /// it), page by page: ListObjectsV2 with the prefix as the server filters it (a string,
    /// not a directory), at most `limit` objects, one request per 1,000.
    async fn list_pages(
        &self,
        prefix: &str,
        dirs: bool,
        limit: Option<usize>,
    ) -> Result<(Vec<ObjectInfo>, Vec<String>), SinkError> {
        let full = format!("{}{prefix}", self.inner.prefix);
        let (mut objects, mut below) = (Vec::new(), Vec::new());
        let mut token = None;
        // Bounded: ten million names; beyond, an error rather than a partial listing (garbage
        // collection must never see a short one).
        for page_no in 0.. {
            if page_no == 10_000 {
                return Err(SinkError::TooLarge {
                    name: format!("listing of {prefix}"),
                    len: objects.len() as u64,
                    max: 10_000_000,
                });
            }
            let want = limit.map(|n| n.saturating_sub(objects.len()).clamp(1, 1000));
            let page = self
                .inner
                .store
                .list_paginated(
                    Some(&full),
                    PaginatedListOptions {
                        delimiter: dirs.then(|| "/".into()),
                        max_keys: want,
                        page_token: token.take(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| os_err("listing", prefix, e))?;
            objects.extend(
                page.result
                    .objects
                    .iter()
                    .filter_map(|m| self.info(prefix, m)),
            );
            below.extend(page.result.common_prefixes.iter().filter_map(|p| {
                let rest = p.as_ref().strip_prefix(full.as_str())?.trim_matches('/');
                (!rest.is_empty() && check_name(rest).is_ok()).then(|| rest.to_string())
            }));
            if limit.is_some_and(|n| objects.len() >= n) {
                break;
            }
            match page.page_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        objects.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(n) = limit {
            objects.truncate(n);
        }
        below.sort();
        below.dedup();
        Ok((objects, below))
    }

    /// A listed object as the sink names it, if it is one of ours under `prefix`.
    fn info(&self, prefix: &str, m: &object_store::ObjectMeta) -> Option<ObjectInfo> {
        let rel = m
            .location
            .as_ref()
            .strip_prefix(self.inner.prefix.as_str())?;
        if !rel.starts_with(prefix) || check_name(rel).is_err() {
            return None;
        }
        Some(ObjectInfo {
            name: rel.to_string(),
            len: m.size,
            modified: u64::try_from(m.last_modified.timestamp_millis())
                .ok()
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
        })
    }

    /// Two create-only writes of one probe object: the second must be refused.
    async fn probe(&self) -> Result<(), SinkError> {
        let name = format!(
            "{}.cbt-probe-{:032x}",
            self.inner.prefix,
            crate::engine::random_u128()
        );
        let path =
            ObjPath::parse(&name).map_err(|_| SinkError::InvalidName { name: name.clone() })?;
        let create = || PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let store = &self.inner.store;
        store
            .put_opts(&path, PutPayload::from_static(b"1"), create())
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => {
                    SinkError::Config(format!("bucket {} not found", self.inner.bucket))
                }
                // Swift's s3api: "Conditional object PUTs are not supported."
                e if error_chain(&e).contains("501 Not Implemented") => {
                    SinkError::Unsupported(format!(
                        "create-only writes (PUT with If-None-Match: *): the server answered 501 \
                         Not Implemented ({})",
                        error_chain(&e).chars().take(400).collect::<String>()
                    ))
                }
                e => os_err("probing with", &name, e),
            })?;
        let second = store
            .put_opts(&path, PutPayload::from_static(b"2"), create())
            .await;
        let cleaned = match self.inner.lock {
            // Versioned: a plain DELETE would leave the probe's versions behind.
            Some(_) => self.delete_versions_at(&name, &path).await,
            None => {
                let _ = store.delete(&path).await;
                Ok(())
            }
        };
        match second {
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) if cleaned.is_err() => {
                Err(SinkError::Unsupported(format!(
                "Object Lock (immutable mode): deleting the versions of an unlocked probe object \
                 failed (the key needs s3:DeleteObjectVersion and s3:ListBucketVersions): {}",
                cleaned.as_ref().err().map(|e| error_chain(e)).unwrap_or_default()
            )))
            }
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(()),
            Ok(_) => Err(SinkError::Unsupported(
                "create-only writes (PUT with If-None-Match: *): the server replaced an object it \
                 should have refused; committed backups could be overwritten"
                    .into(),
            )),
            Err(e) => Err(SinkError::Unsupported(format!(
                "create-only writes (PUT with If-None-Match: *): the server answered {e}"
            ))),
        }
    }

    /// One page of the bucket's unfinished multipart uploads under the sink's prefix.
    async fn list_uploads(
        &self,
        key_marker: Option<&(String, String)>,
    ) -> Result<UploadsPage, SinkError> {
        let mut q = vec![
            ("uploads".to_string(), String::new()),
            ("prefix".to_string(), self.inner.prefix.clone()),
        ];
        if let Some((k, u)) = key_marker {
            q.push(("key-marker".into(), k.clone()));
            q.push(("upload-id-marker".into(), u.clone()));
        }
        let url = self
            .inner
            .store
            .signed_url_opts(
                http::Method::GET,
                &ObjPath::default(),
                Duration::from_secs(300),
                &SignedUrlOptions::new().with_query(q),
            )
            .await
            .map_err(|e| os_err("listing uploads of", "the bucket", e))?;
        let remote = |e: reqwest::Error| SinkError::Remote {
            op: "listing uploads of",
            name: "the bucket".into(),
            // The URL is presigned: it must not reach a log.
            source: Box::new(e.without_url()),
        };
        let resp = self
            .inner
            .http
            .get(url.as_str())
            .send()
            .await
            .map_err(remote)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(remote)?;
        if !status.is_success() {
            return Err(SinkError::Remote {
                op: "listing uploads of",
                name: "the bucket".into(),
                source: format!("HTTP {status}").into(),
            });
        }
        if body.len() > 16 << 20 {
            return Err(SinkError::TooLarge {
                name: "ListMultipartUploads answer".into(),
                len: body.len() as u64,
                max: 16 << 20,
            });
        }
        parse_uploads(&body)
    }
}

/// The answer of a presigned request: status and body (at most 16 MiB).
struct Answer {
    status: http::StatusCode,
    body: String,
}

/// RFC 3339 in whole seconds, UTC, as S3 writes retention dates; rounded up, so that a
/// lock never ends before the time asked.
fn s3_date(t: SystemTime) -> String {
    let t = t + Duration::from_nanos(999_999_999);
    chrono::DateTime::<chrono::Utc>::from(t)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn parse_s3_date(t: &str) -> Option<SystemTime> {
    let ms = chrono::DateTime::parse_from_rfc3339(t.trim())
        .ok()?
        .timestamp_millis();
    Some(UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).ok()?))
}

/// The text of the first element `tag` of an XML answer.
fn xml_text(body: &str, tag: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(body).ok()?;
    doc.descendants()
        .find(|n| n.tag_name().name() == tag)
        .and_then(|n| n.text())
        .map(str::to_string)
}

/// Whether cbt locks `name` in immutable mode: what restores need and nothing rewrites in
/// place (segments, indexes, manifests). Markers and `recent/` entries are not locked.
fn lockable(name: &str) -> bool {
    layout::is_segment_name(name)
        || (name.starts_with("disks/")
            && name.contains("/backups/")
            && (name.ends_with(".idx") || name.ends_with(".manifest")))
}

impl S3Sink {
    /// A presigned request `method` on `path` (the bucket itself for the default path) with
    /// `query` and `headers` signed, and `body`.
    async fn call(
        &self,
        (op, name): (&'static str, &str),
        method: http::Method,
        path: &ObjPath,
        query: &[(&str, &str)],
        headers: &[(http::HeaderName, String)],
        body: Option<String>,
    ) -> Result<Answer, SinkError> {
        let mut opts = SignedUrlOptions::new().with_query(query.iter().copied());
        let mut hv = Vec::new();
        for (k, v) in headers {
            let v = http::HeaderValue::from_str(v).map_err(|_| invalid("a header value"))?;
            opts = opts.with_signed_header(k.clone(), v.clone());
            hv.push((k.clone(), v));
        }
        let url = self
            .inner
            .store
            .signed_url_opts(method.clone(), path, Duration::from_secs(300), &opts)
            .await
            .map_err(|e| os_err(op, name, e))?;
        let remote = |e: reqwest::Error| SinkError::Remote {
            op,
            name: name.into(),
            // The URL is presigned: it must not reach a log.
            source: Box::new(e.without_url()),
        };
        // These calls are idempotent: a 5xx, a 429 or a lost connection is tried again.
        let mut attempt = 0u32;
        let resp = loop {
            let mut req = self.inner.http.request(method.clone(), url.as_str());
            for (k, v) in &hv {
                req = req.header(k.clone(), v.clone());
            }
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            let r = req.send().await;
            let again = match &r {
                Ok(resp) => {
                    resp.status().is_server_error()
                        || resp.status() == http::StatusCode::TOO_MANY_REQUESTS
                }
                Err(_) => true,
            };
            if !again || attempt >= 4 {
                break r.map_err(remote)?;
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        };
        let status = resp.status();
        if resp.content_length().is_some_and(|l| l > 16 << 20) {
            return Err(SinkError::TooLarge {
                name: format!("answer to {op} {name}"),
                len: resp.content_length().unwrap_or_default(),
                max: 16 << 20,
            });
        }
        let body = resp.bytes().await.map_err(remote)?;
        if body.len() > 16 << 20 {
            return Err(SinkError::TooLarge {
                name: format!("answer to {op} {name}"),
                len: body.len() as u64,
                max: 16 << 20,
            });
        }
        Ok(Answer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    fn refused(op: &'static str, name: &str, a: &Answer) -> SinkError {
        let code = xml_text(&a.body, "Code").unwrap_or_default();
        SinkError::Remote {
            op,
            name: name.into(),
            source: format!("HTTP {} {code}", a.status).into(),
        }
    }

    /// Sets the retention of `path` (its version `version`, else the current one) to
    /// `until` in the sink's lock mode. A server that refuses because the lock is longer
    /// already is fine: the retention is read back and compared.
    async fn lock_object(
        &self,
        name: &str,
        path: &ObjPath,
        version: Option<&str>,
        until: SystemTime,
    ) -> Result<(), SinkError> {
        use base64::Engine;
        use md5::Digest;
        let Some(lock) = self.inner.lock else {
            return Ok(());
        };
        let body = format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>{}</Mode>\
             <RetainUntilDate>{}</RetainUntilDate></Retention>",
            lock.mode.as_str(),
            s3_date(until)
        );
        // AWS wants the body's MD5 on Object Lock calls.
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&body));
        let mut query = vec![("retention", "")];
        if let Some(v) = version {
            query.push(("versionId", v));
        }
        let a = self
            .call(
                ("locking", name),
                http::Method::PUT,
                path,
                &query,
                &[(http::HeaderName::from_static("content-md5"), md5)],
                Some(body),
            )
            .await?;
        if a.status.is_success() {
            return Ok(());
        }
        // Shortening is refused: a lock that is longer already will do.
        if let Some(t) = self.retention(name, path, version).await? {
            if t >= until {
                return Ok(());
            }
        }
        Err(Self::refused("locking", name, &a))
    }

    /// The retention date of `path` (version `version`, else the current one); `None`
    /// when it has none.
    async fn retention(
        &self,
        name: &str,
        path: &ObjPath,
        version: Option<&str>,
    ) -> Result<Option<SystemTime>, SinkError> {
        let mut query = vec![("retention", "")];
        if let Some(v) = version {
            query.push(("versionId", v));
        }
        let a = self
            .call(
                ("reading the retention of", name),
                http::Method::GET,
                path,
                &query,
                &[],
                None,
            )
            .await?;
        if a.status == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !a.status.is_success() {
            return Err(Self::refused("reading the retention of", name, &a));
        }
        Ok(xml_text(&a.body, "RetainUntilDate").and_then(|t| parse_s3_date(&t)))
    }

    /// The version ids of object `key` (the full key), newest first, delete markers
    /// included.
    async fn versions(&self, name: &str, key: &str) -> Result<Vec<String>, SinkError> {
        let mut out = Vec::new();
        let mut marker: Option<(String, String)> = None;
        // Bounded: an object with more than 100,000 versions is cleaned over several calls.
        for _ in 0..100 {
            let mut q = vec![("versions", ""), ("prefix", key)];
            if let Some((k, v)) = &marker {
                q.push(("key-marker", k));
                q.push(("version-id-marker", v));
            }
            let a = self
                .call(
                    ("listing versions of", name),
                    http::Method::GET,
                    &ObjPath::default(),
                    &q,
                    &[],
                    None,
                )
                .await?;
            if !a.status.is_success() {
                return Err(Self::refused("listing versions of", name, &a));
            }
            let doc = roxmltree::Document::parse(&a.body).map_err(|_| SinkError::Remote {
                op: "listing versions of",
                name: name.into(),
                source: "an answer that is not XML".into(),
            })?;
            let child = |n: roxmltree::Node<'_, '_>, t: &str| {
                n.children()
                    .find(|c| c.tag_name().name() == t)
                    .and_then(|c| c.text())
                    .map(str::to_string)
            };
            let root = doc.root_element();
            for v in root
                .children()
                .filter(|c| matches!(c.tag_name().name(), "Version" | "DeleteMarker"))
            {
                if child(v, "Key").as_deref() == Some(key) {
                    if let Some(id) = child(v, "VersionId") {
                        out.push(id);
                    }
                }
            }
            if child(root, "IsTruncated").as_deref() != Some("true") {
                return Ok(out);
            }
            match (
                child(root, "NextKeyMarker"),
                child(root, "NextVersionIdMarker"),
            ) {
                // Past our key: the rest share its prefix only.
                (Some(k), _) if k.as_str() > key => return Ok(out),
                (Some(k), Some(v)) => marker = Some((k, v)),
                _ => break,
            }
        }
        // Part of the versions only: deleting the newest would bring an older one back.
        Err(SinkError::Remote {
            op: "listing versions of",
            name: name.into(),
            source: "the listing was cut short (no next marker, or over 100 pages)".into(),
        })
    }

    /// One DeleteObject of version `v` of `path`.
    async fn delete_version(
        &self,
        what: (&'static str, &str),
        path: &ObjPath,
        v: &str,
    ) -> Result<Answer, SinkError> {
        self.call(
            what,
            http::Method::DELETE,
            path,
            &[("versionId", v)],
            &[],
            None,
        )
        .await
    }

    /// Deletes every version of `name` (immutable mode: a plain DELETE in a versioned
    /// bucket only hides an object behind a delete marker and frees nothing). A version
    /// still locked stops it: [`SinkError::Locked`], and the object stays as it was for
    /// readers (newest versions go first, and the newest is the one locked longest).
    async fn delete_versions(&self, name: &str) -> Result<(), SinkError> {
        self.delete_versions_at(name, &self.key(name)?).await
    }

    async fn delete_versions_at(&self, name: &str, path: &ObjPath) -> Result<(), SinkError> {
        for v in self.versions(name, path.as_ref()).await? {
            let a = self.delete_version(("deleting", name), path, &v).await?;
            match a.status {
                s if s.is_success() || s == http::StatusCode::NOT_FOUND => {}
                http::StatusCode::FORBIDDEN => {
                    // Locked, or refused for another reason (no s3:DeleteObjectVersion, a
                    // bad signature): only a retention date to come is a lock.
                    let until = self.retention(name, path, Some(&v)).await?;
                    if until.is_some_and(|t| t > SystemTime::now()) {
                        return Err(SinkError::Locked {
                            names: vec![name.into()],
                        });
                    }
                    return Err(Self::refused("deleting", name, &a));
                }
                _ => return Err(Self::refused("deleting", name, &a)),
            }
        }
        Ok(())
    }

    /// Immutable mode's checks at open: Object Lock is enabled on the bucket, and the server
    /// refuses to delete a version it has locked (a probe object locked for a minute; its
    /// older versions, unlocked by now, are removed).
    async fn probe_lock(&self) -> Result<(), SinkError> {
        let bucket = &self.inner.bucket;
        let a = self
            .call(
                ("reading the Object Lock configuration of", "the bucket"),
                http::Method::GET,
                &ObjPath::default(),
                &[("object-lock", "")],
                &[],
                None,
            )
            .await?;
        let enabled = xml_text(&a.body, "ObjectLockEnabled");
        let is_config = roxmltree::Document::parse(&a.body)
            .is_ok_and(|d| d.root_element().tag_name().name() == "ObjectLockConfiguration");
        if a.status.is_success() && !is_config {
            return Err(SinkError::Unsupported(format!(
                "Object Lock (immutable mode): asked for the Object Lock configuration of bucket \
                 {bucket}, the server answered {} with something else: it does not know Object \
                 Lock (Swift's s3api answers so, and locks nothing)",
                a.status
            )));
        }
        if !a.status.is_success() || enabled.as_deref() != Some("Enabled") {
            return Err(SinkError::Unsupported(format!(
                "Object Lock (immutable mode): bucket {bucket} does not have it enabled (HTTP \
                 {} {}); create the bucket with Object Lock enabled",
                a.status,
                xml_text(&a.body, "Code").unwrap_or_default()
            )));
        }
        let name = LOCK_PROBE_NAME;
        let key = format!("{}{name}", self.inner.prefix);
        let path =
            ObjPath::parse(&key).map_err(|_| SinkError::InvalidName { name: key.clone() })?;
        let put = self
            .inner
            .store
            .put(&path, PutPayload::from_static(b"cbt object lock probe"))
            .await
            .map_err(|e| os_err("probing with", name, e))?;
        let Some(version) = put.version else {
            return Err(SinkError::Unsupported(format!(
                "Object Lock (immutable mode): the server gave no version id for a write to \
                 bucket {bucket}: it is not versioned, so nothing can be locked"
            )));
        };
        self.lock_object(name, &path, Some(&version), SystemTime::now() + LOCK_PROBE)
            .await
            .map_err(|e| {
                SinkError::Unsupported(format!(
                    "Object Lock (immutable mode): locking a probe object failed: {}",
                    error_chain(&e)
                ))
            })?;
        let a = self
            .delete_version(("probing with", name), &path, &version)
            .await?;
        if a.status != http::StatusCode::FORBIDDEN {
            return Err(SinkError::Unsupported(format!(
                "Object Lock (immutable mode): the server answered HTTP {} to deleting an \
                 object version it had just locked, where it must refuse (403): it does not \
                 enforce Object Lock (Swift's s3api answers the lock calls with 200 and locks \
                 nothing); use a server that does (Ceph RGW, SeaweedFS, AWS S3)",
                a.status
            )));
        }
        // Earlier probes, unlocked a minute after their open: best effort.
        for v in self.versions(name, &key).await.unwrap_or_default() {
            if v != version {
                let _ = self.delete_version(("deleting", name), &path, &v).await;
            }
        }
        Ok(())
    }

    /// After a write of `name` that the server gave `version`: locks it in immutable mode.
    async fn lock_new(&self, name: &str, version: Option<&str>) -> Result<(), SinkError> {
        let Some(lock) = self.inner.lock else {
            return Ok(());
        };
        if !lockable(name) {
            return Ok(());
        }
        let now = SystemTime::now();
        let until = match self.until {
            Some(u) => u,
            None => Some(now + super::lock_span(lock.period)),
        };
        let Some(until) = until.filter(|u| *u > now) else {
            return Ok(());
        };
        let path = self.key(name)?;
        let r = self.lock_object(name, &path, version, until).await;
        if let (Err(_), Some(v)) = (&r, version) {
            // Lock or undo: an object that should be locked and is not must not stay (a
            // committed manifest would promise a lock the server does not keep). Unlocked,
            // the version just written can still go.
            let _ = self.delete_version(("deleting", name), &path, v).await;
        }
        r
    }
}

/// One page of ListMultipartUploads.
#[derive(Debug, Default, PartialEq)]
struct UploadsPage {
    /// Key, upload id, when it was initiated.
    uploads: Vec<(String, String, Option<SystemTime>)>,
    /// Where the next page starts, when there is one.
    next: Option<(String, String)>,
}

fn parse_uploads(body: &[u8]) -> Result<UploadsPage, SinkError> {
    let bad = |why: &str| SinkError::Remote {
        op: "listing uploads of",
        name: "the bucket".into(),
        source: format!("unreadable ListMultipartUploads answer: {why}").into(),
    };
    let text = std::str::from_utf8(body).map_err(|_| bad("not UTF-8"))?;
    let doc = roxmltree::Document::parse(text).map_err(|_| bad("not XML"))?;
    let child = |n: roxmltree::Node<'_, '_>, name: &str| {
        n.children()
            .find(|c| c.tag_name().name() == name)
            .and_then(|c| c.text())
            .map(str::to_string)
    };
    let root = doc.root_element();
    let mut page = UploadsPage::default();
    for u in root.children().filter(|c| c.tag_name().name() == "Upload") {
        let (Some(key), Some(id)) = (child(u, "Key"), child(u, "UploadId")) else {
            return Err(bad("an upload without Key or UploadId"));
        };
        let initiated = child(u, "Initiated")
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
            .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        page.uploads.push((key, id, initiated));
    }
    if child(root, "IsTruncated").as_deref() == Some("true") {
        match (
            child(root, "NextKeyMarker"),
            child(root, "NextUploadIdMarker"),
        ) {
            (Some(k), Some(u)) => page.next = Some((k, u)),
            _ => return Err(bad("truncated without a next marker")),
        }
    }
    Ok(page)
}

impl Sink for S3Sink {
    type Writer = S3Writer;

    fn read_hint(&self) -> super::ReadHint {
        super::ReadHint::OBJECT_STORE
    }

    async fn create(&self, name: &str) -> Result<S3Writer, SinkError> {
        let path = self.key(name)?;
        Ok(S3Writer {
            sink: self.clone(),
            name: name.to_string(),
            path,
            buf: Vec::new(),
            upload: None,
            len: 0,
        })
    }

    async fn put(&self, name: &str, data: Vec<u8>) -> Result<(), SinkError> {
        let path = self.key(name)?;
        self.inner
            .store
            .put(&path, PutPayload::from(data))
            .await
            .map(drop)
            .map_err(|e| os_err("writing", name, e))
    }

    async fn put_new(&self, name: &str, data: Vec<u8>) -> Result<(), SinkError> {
        let path = self.key(name)?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let payload = PutPayload::from(data.clone());
        match self.inner.store.put_opts(&path, payload, opts).await {
            Ok(r) => self.lock_new(name, r.version.as_deref()).await,
            Err(e) => match os_err("writing", name, e) {
                SinkError::Exists { .. } => {
                    // Perhaps our own first attempt, retried after a lost answer.
                    match self.get(name, data.len() as u64).await {
                        Ok(there) if there == data => self.lock_new(name, None).await,
                        _ => Err(SinkError::Exists { name: name.into() }),
                    }
                }
                e => Err(e),
            },
        }
    }

    async fn get_range_into(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>, SinkError> {
        let path = self.key(name)?;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| SinkError::ShortRead {
                name: name.into(),
                offset,
                want: len,
                got: 0,
            })?;
        buf.clear();
        if len == 0 {
            return Ok(buf);
        }
        let bytes = self
            .inner
            .store
            .get_range(&path, offset..end)
            .await
            .map_err(|e| os_err("reading", name, e))?;
        if bytes.len() as u64 != len {
            return Err(SinkError::ShortRead {
                name: name.into(),
                offset,
                want: len,
                got: bytes.len() as u64,
            });
        }
        buf.extend_from_slice(&bytes);
        Ok(buf)
    }

    async fn get(&self, name: &str, max: u64) -> Result<Vec<u8>, SinkError> {
        let path = self.key(name)?;
        let r = self
            .inner
            .store
            .get(&path)
            .await
            .map_err(|e| os_err("reading", name, e))?;
        let too_large = |len| SinkError::TooLarge {
            name: name.into(),
            len,
            max,
        };
        if r.meta.size > max {
            return Err(too_large(r.meta.size));
        }
        let b = r.bytes().await.map_err(|e| os_err("reading", name, e))?;
        if b.len() as u64 > max {
            return Err(too_large(b.len() as u64));
        }
        Ok(b.to_vec())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, SinkError> {
        Ok(self.list_pages(prefix, false, None).await?.0)
    }

    async fn list_first(&self, prefix: &str, n: usize) -> Result<Vec<ObjectInfo>, SinkError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        Ok(self.list_pages(prefix, false, Some(n)).await?.0)
    }

    async fn list_dirs(&self, dir: &str) -> Result<Vec<String>, SinkError> {
        Ok(self.list_pages(dir, true, None).await?.1)
    }

    async fn delete(&self, name: &str) -> Result<(), SinkError> {
        if self.inner.lock.is_some() {
            return self.delete_versions(name).await;
        }
        let path = self.key(name)?;
        match self.inner.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(os_err("deleting", name, e)),
        }
    }

    async fn delete_many(&self, names: &[String]) -> Result<(), SinkError> {
        use futures_util::StreamExt;
        if self.inner.lock.is_some() {
            // By version, 8 at a time; what is locked is reported once the rest is done.
            // Owned futures, built before the stream (a closure in the stream trips the
            // compiler's Send check of this async fn).
            let futs: Vec<_> = names
                .iter()
                .map(|n| {
                    let me = self.clone();
                    let n = n.clone();
                    async move {
                        let r = me.delete_versions(&n).await;
                        (n, r)
                    }
                })
                .collect();
            let mut done = futures_util::stream::iter(futs).buffered(8);
            let mut locked = Vec::new();
            while let Some((n, r)) = done.next().await {
                match r {
                    Ok(()) => {}
                    Err(SinkError::Locked { .. }) => locked.push(n),
                    Err(e) => return Err(e),
                }
            }
            return match locked.is_empty() {
                true => Ok(()),
                false => Err(SinkError::Locked { names: locked }),
            };
        }
        let paths = names
            .iter()
            .map(|n| self.key(n))
            .collect::<Result<Vec<_>, _>>()?;
        let mut done = self
            .inner
            .store
            .delete_stream(futures_util::stream::iter(paths.into_iter().map(Ok)).boxed());
        while let Some(r) = done.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(os_err("deleting", "objects", e)),
            }
        }
        Ok(())
    }

    fn lock_period(&self) -> Option<Duration> {
        self.inner.lock.map(|l| l.period)
    }

    fn locking_until(&self, until: Option<SystemTime>) -> Self {
        S3Sink {
            inner: self.inner.clone(),
            until: Some(until),
        }
    }

    async fn locked_until(&self, name: &str) -> Result<Option<SystemTime>, SinkError> {
        if self.inner.lock.is_none() {
            return Ok(None);
        }
        let path = self.key(name)?;
        self.retention(name, &path, None).await
    }

    async fn extend_lock(&self, names: &[String], until: SystemTime) -> Result<(), SinkError> {
        use futures_util::StreamExt;
        if self.inner.lock.is_none() {
            return Ok(());
        }
        let futs: Vec<_> = names
            .iter()
            .map(|n| {
                let me = self.clone();
                let n = n.clone();
                async move {
                    let path = me.key(&n)?;
                    me.lock_object(&n, &path, None, until).await
                }
            })
            .collect();
        let mut done = futures_util::stream::iter(futs).buffer_unordered(8);
        while let Some(r) = done.next().await {
            r?;
        }
        Ok(())
    }

    async fn remove_stale_partials(&self, grace: Duration) -> Result<u64, SinkError> {
        let now = SystemTime::now();
        let mut removed = 0;
        let mut marker = None;
        // Bounded: a bucket with more than a million unfinished uploads is swept over runs.
        for _ in 0..1000 {
            let page = self.list_uploads(marker.as_ref()).await?;
            for (key, id, initiated) in &page.uploads {
                let Some(rel) = key.strip_prefix(self.inner.prefix.as_str()) else {
                    continue;
                };
                // Only cbt's multipart objects, its segments: a bucket may hold other writers'
                // uploads, and a sink's prefix may contain another sink's.
                if !layout::is_segment_name(rel) || !super::older_than(*initiated, grace, now) {
                    continue;
                }
                let path =
                    ObjPath::parse(key).map_err(|_| SinkError::InvalidName { name: rel.into() })?;
                match self.inner.store.abort_multipart(&path, id).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
                    Err(e) => return Err(os_err("aborting the upload of", rel, e)),
                }
            }
            match page.next {
                Some(n) => marker = Some(n),
                None => break,
            }
        }
        Ok(removed)
    }
}

/// Writer of one object: buffered up to one part, then a multipart upload.
pub struct S3Writer {
    sink: S3Sink,
    name: String,
    path: ObjPath,
    /// What was appended before the upload began (less than one part).
    buf: Vec<u8>,
    upload: Option<WriteMultipart>,
    len: u64,
}

impl ObjectWriter for S3Writer {
    async fn append_prefix(&mut self, data: Vec<u8>, len: usize) -> Result<Vec<u8>, SinkError> {
        let part = &data[..len.min(data.len())];
        self.len += part.len() as u64;
        let inner = &self.sink.inner;
        match &mut self.upload {
            Some(w) => {
                w.wait_for_capacity(inner.parts_in_flight)
                    .await
                    .map_err(|e| os_err("writing", &self.name, e))?;
                w.write(part);
            }
            None => {
                self.buf.extend_from_slice(part);
                if self.buf.len() >= inner.part_size {
                    let up = inner
                        .store
                        .put_multipart(&self.path)
                        .await
                        .map_err(|e| os_err("starting the upload of", &self.name, e))?;
                    let mut w = WriteMultipart::new_with_chunk_size(up, inner.part_size);
                    // Handed over, not copied: the first part uploads from this buffer.
                    w.put(std::mem::take(&mut self.buf).into());
                    self.upload = Some(w);
                }
            }
        }
        Ok(data)
    }

    fn len(&self) -> u64 {
        self.len
    }

    async fn finish(self) -> Result<(), SinkError> {
        let r = match self.upload {
            Some(w) => w.finish().await,
            None => {
                self.sink
                    .inner
                    .store
                    .put(&self.path, PutPayload::from(self.buf))
                    .await
            }
        };
        // A failed completion leaves an unfinished upload: remove_stale_partials sweeps it.
        let r = r.map_err(|e| os_err("finishing", &self.name, e))?;
        self.sink.lock_new(&self.name, r.version.as_deref()).await
    }

    async fn abort(self) {
        if let Some(w) = self.upload {
            let _ = w.abort().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_pages_are_parsed_and_bad_ones_refused() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>b</Bucket><IsTruncated>true</IsTruncated>
  <NextKeyMarker>p/x</NextKeyMarker><NextUploadIdMarker>u2</NextUploadIdMarker>
  <Upload><Key>p/a.seg</Key><UploadId>u1</UploadId><Initiated>2026-12-01T10:00:00.000Z</Initiated></Upload>
  <Upload><Key>p/x</Key><UploadId>u2</UploadId></Upload>
</ListMultipartUploadsResult>"#;
        let p = parse_uploads(xml).expect("page");
        assert_eq!(p.uploads.len(), 2);
        assert_eq!(p.uploads[0].0, "p/a.seg");
        assert_eq!(
            p.uploads[0].2,
            Some(UNIX_EPOCH + Duration::from_secs(1_796_119_200))
        );
        assert_eq!(p.uploads[1].2, None);
        assert_eq!(p.next, Some(("p/x".into(), "u2".into())));
        assert!(parse_uploads(b"<a><IsTruncated>true</IsTruncated></a>").is_err());
        assert!(parse_uploads(b"<a><Upload><Key>k</Key></Upload></a>").is_err());
        assert!(parse_uploads(b"\xff").is_err());
        assert!(parse_uploads(b"<a>").is_err());
    }

    #[test]
    fn credential_files_are_private_and_parsed() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("cred");
        std::fs::write(&p, "# ceph\naccess_key = AK\nsecret_key = \"s3cr3t\"\n").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = read_credentials(&p).expect_err("world-readable");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let (k, s) = read_credentials(&p).expect("read");
        assert_eq!((k.as_str(), s.0.as_str()), ("AK", "s3cr3t"));
        std::fs::write(&p, "access_key = AK\nsecret = s3cr3t\n").expect("write");
        let e = read_credentials(&p).expect_err("unknown key");
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
    }

    #[test]
    fn secrets_do_not_show() {
        let c = S3Config {
            secret_key: Secret("hunter2".into()),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
