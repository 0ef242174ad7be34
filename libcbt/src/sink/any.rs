//! One closed type over every backend, for callers that pick the backend at run time (the
//! daemon's configured sinks, `cbtctl`'s sink URLs), and the text form of a sink's address.

use std::path::PathBuf;
use std::time::Duration;

use super::local::{LocalSink, LocalWriter};
use super::s3::{S3Config, S3Sink, S3Writer};
use super::swift::{SwiftAuth, SwiftConfig, SwiftSink, SwiftWriter};
use super::{ObjectInfo, ObjectWriter, Sink, SinkError};

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnySink::Local($s) => $e,
            AnySink::S3($s) => $e,
            AnySink::Swift($s) => $e,
        }
    };
}

/// A sink of any backend.
#[derive(Clone, Debug)]
pub enum AnySink {
    Local(LocalSink),
    S3(S3Sink),
    Swift(SwiftSink),
}

/// A writer of an [`AnySink`].
pub enum AnyWriter {
    Local(LocalWriter),
    S3(S3Writer),
    Swift(SwiftWriter),
}

/// Where a sink is, as an operator writes it: a directory,
/// `s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]`, or
/// `swift://CONTAINER[/PREFIX][?auth_url=URL&user=U&project=P…]` (credentials come
/// separately).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkAddress {
    Local(PathBuf),
    S3 {
        endpoint: String,
        bucket: String,
        prefix: String,
        region: Option<String>,
    },
    Swift(SwiftAddress),
}

/// A Swift container and the identity to reach it (the secret comes separately).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwiftAddress {
    pub container: String,
    pub prefix: String,
    /// Keystone v3 (`…/v3`) or tempauth (`…/auth/v1.0`).
    pub auth_url: String,
    /// Keystone user name, or tempauth's `account:user`.
    pub user: Option<String>,
    pub user_domain: Option<String>,
    pub project: Option<String>,
    pub project_domain: Option<String>,
    /// Log in with this application credential rather than a password.
    pub application_credential_id: Option<String>,
    pub region: Option<String>,
    pub interface: Option<String>,
    /// The Swift endpoint, when not the catalog's.
    pub storage_url: Option<String>,
}

/// The OpenStack RC variable of each Swift address parameter.
const SWIFT_PARAMS: [(&str, &str); 9] = [
    ("auth_url", "OS_AUTH_URL"),
    ("user", "OS_USERNAME"),
    ("user_domain", "OS_USER_DOMAIN_NAME"),
    ("project", "OS_PROJECT_NAME"),
    ("project_domain", "OS_PROJECT_DOMAIN_NAME"),
    ("application_credential_id", "OS_APPLICATION_CREDENTIAL_ID"),
    ("region", "OS_REGION_NAME"),
    ("interface", "OS_INTERFACE"),
    ("storage_url", "OS_STORAGE_URL"),
];

impl SwiftAddress {
    fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        Some(match key {
            "user" => &mut self.user,
            "user_domain" => &mut self.user_domain,
            "project" => &mut self.project,
            "project_domain" => &mut self.project_domain,
            "application_credential_id" => &mut self.application_credential_id,
            "region" => &mut self.region,
            "interface" => &mut self.interface,
            "storage_url" => &mut self.storage_url,
            _ => return None,
        })
    }

    /// The sink's configuration with `secret` (password, application credential secret or
    /// tempauth key, after the auth URL's kind) over the tuning of `base`.
    pub fn config(&self, secret: super::Secret, base: &SwiftConfig) -> SwiftConfig {
        let or = |v: &Option<String>, d: &str| v.clone().unwrap_or_else(|| d.to_string());
        let auth = if self.auth_url.trim_end_matches('/').ends_with("/auth/v1.0") {
            SwiftAuth::TempAuth {
                auth_url: self.auth_url.clone(),
                user: or(&self.user, ""),
                key: secret,
            }
        } else if let Some(id) = &self.application_credential_id {
            SwiftAuth::ApplicationCredential {
                auth_url: self.auth_url.clone(),
                id: id.clone(),
                secret,
            }
        } else {
            SwiftAuth::Password {
                auth_url: self.auth_url.clone(),
                user: or(&self.user, ""),
                user_domain: or(&self.user_domain, "Default"),
                password: secret,
                project: or(&self.project, ""),
                project_domain: or(&self.project_domain, "Default"),
            }
        };
        SwiftConfig {
            auth,
            storage_url: self.storage_url.clone(),
            region: self.region.clone(),
            interface: or(&self.interface, &base.interface),
            container: self.container.clone(),
            prefix: self.prefix.clone(),
            ..base.clone()
        }
    }
}

fn unknown_parameter(allowed: &str) -> SinkError {
    // The address is not echoed: a parameter there may be a secret.
    SinkError::Config(format!(
        "sink: unknown parameter (only {allowed}; credentials go in a file)"
    ))
}

impl SinkAddress {
    /// Parses a sink address (see the type's documentation).
    pub fn parse(s: &str) -> Result<SinkAddress, SinkError> {
        Self::parse_with(s, |_| None)
    }

    /// [`parse`](Self::parse), a Swift address's missing parameters taken from `env` (the
    /// `OS_*` variables of an OpenStack RC file: `OS_AUTH_URL`, `OS_USERNAME`, …).
    pub fn parse_with(
        s: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<SinkAddress, SinkError> {
        if let Some(rest) = s.strip_prefix("swift://") {
            return Self::parse_swift(rest, env);
        }
        let Some(rest) = s.strip_prefix("s3://") else {
            if s.contains("://") {
                return Err(SinkError::Config(
                    "sink: a directory, s3://bucket/prefix?endpoint=URL or \
                     swift://container/prefix"
                        .into(),
                ));
            }
            return Ok(SinkAddress::Local(PathBuf::from(s)));
        };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        let mut endpoint = None;
        let mut region = None;
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            match kv.split_once('=') {
                Some(("endpoint", v)) => endpoint = Some(v.to_string()),
                Some(("region", v)) => region = Some(v.to_string()),
                _ => return Err(unknown_parameter("endpoint and region")),
            }
        }
        let endpoint = endpoint
            .ok_or_else(|| SinkError::Config("sink: no endpoint=http(s)://host:port".into()))?;
        Ok(SinkAddress::S3 {
            endpoint,
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            region,
        })
    }

    fn parse_swift(
        rest: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<SinkAddress, SinkError> {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (container, prefix) = path.split_once('/').unwrap_or((path, ""));
        let mut a = SwiftAddress {
            container: container.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            ..Default::default()
        };
        let mut auth_url = None;
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            match kv.split_once('=') {
                Some(("auth_url", v)) => auth_url = Some(v.to_string()),
                Some((k, v)) => match a.slot(k) {
                    Some(slot) => *slot = Some(v.to_string()),
                    None => {
                        return Err(unknown_parameter(
                            "auth_url, user, user_domain, project, project_domain, \
                             application_credential_id, region, interface, storage_url",
                        ))
                    }
                },
                None => return Err(unknown_parameter("key=value pairs")),
            }
        }
        for (k, var) in SWIFT_PARAMS {
            if k == "auth_url" {
                if auth_url.is_none() {
                    auth_url = env(var);
                }
            } else if let Some(slot) = a.slot(k).filter(|s| s.is_none()) {
                *slot = env(var);
            }
        }
        a.auth_url = auth_url.ok_or_else(|| {
            SinkError::Config("sink: no auth_url=URL (nor OS_AUTH_URL) for Swift".into())
        })?;
        Ok(SinkAddress::Swift(a))
    }
}

/// How [`AnySink::open`] opens a sink besides its address.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// A 0600 credentials file: `access_key`/`secret_key` for S3; one of `password`,
    /// `application_credential_secret` or `key` for Swift. Without: the environment
    /// (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`; `OS_PASSWORD`,
    /// `OS_APPLICATION_CREDENTIAL_SECRET` or `ST_KEY`), or anonymous S3.
    pub credentials_file: Option<PathBuf>,
    /// PEM certificates of a private CA of the object store.
    pub ca_pem: Option<Vec<u8>>,
    /// S3 tuning (part size, parts in flight, timeouts, default region).
    pub s3: S3Config,
    /// Swift tuning (segment size, segments in flight, timeouts).
    pub swift: SwiftConfig,
}

impl AnySink {
    /// Opens the sink at `addr`.
    pub async fn open(addr: &SinkAddress, opts: &OpenOptions) -> Result<AnySink, SinkError> {
        match addr {
            SinkAddress::Local(p) => Ok(AnySink::Local(LocalSink::open(p)?)),
            SinkAddress::S3 {
                endpoint,
                bucket,
                prefix,
                region,
            } => {
                let (access_key, secret_key) = match &opts.credentials_file {
                    Some(f) => super::s3::read_credentials(f)?,
                    None => super::s3::credentials_from_env().unwrap_or_default(),
                };
                let cfg = S3Config {
                    endpoint: endpoint.clone(),
                    bucket: bucket.clone(),
                    prefix: prefix.clone(),
                    region: region.clone().unwrap_or_else(|| opts.s3.region.clone()),
                    access_key,
                    secret_key,
                    ca_pem: opts.ca_pem.clone(),
                    ..opts.s3.clone()
                };
                Ok(AnySink::S3(S3Sink::open(&cfg).await?))
            }
            SinkAddress::Swift(a) => {
                let secret = match &opts.credentials_file {
                    Some(f) => super::swift::read_secret(f)?,
                    None => super::swift::secret_from_env().ok_or_else(|| {
                        SinkError::Config(
                            "Swift: no credentials file, and none of OS_PASSWORD, \
                             OS_APPLICATION_CREDENTIAL_SECRET, ST_KEY set"
                                .into(),
                        )
                    })?,
                };
                let cfg = SwiftConfig {
                    ca_pem: opts.ca_pem.clone(),
                    ..a.config(secret, &opts.swift)
                };
                Ok(AnySink::Swift(SwiftSink::open(&cfg).await?))
            }
        }
    }

    /// A short description for logs and errors (no credentials).
    pub fn describe(&self) -> String {
        each!(self, s => format!("{s:?}"))
    }
}

impl Sink for AnySink {
    type Writer = AnyWriter;

    async fn create(&self, name: &str) -> Result<AnyWriter, SinkError> {
        match self {
            AnySink::Local(s) => s.create(name).await.map(AnyWriter::Local),
            AnySink::S3(s) => s.create(name).await.map(AnyWriter::S3),
            AnySink::Swift(s) => s.create(name).await.map(AnyWriter::Swift),
        }
    }
    fn read_hint(&self) -> super::ReadHint {
        each!(self, s => s.read_hint())
    }
    fn atomic_put_new(&self) -> bool {
        each!(self, s => s.atomic_put_new())
    }
    async fn put(&self, name: &str, data: Vec<u8>) -> Result<(), SinkError> {
        each!(self, s => s.put(name, data).await)
    }
    async fn put_new(&self, name: &str, data: Vec<u8>) -> Result<(), SinkError> {
        each!(self, s => s.put_new(name, data).await)
    }
    async fn get_range_into(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        buf: Vec<u8>,
    ) -> Result<Vec<u8>, SinkError> {
        each!(self, s => s.get_range_into(name, offset, len, buf).await)
    }
    async fn get(&self, name: &str, max: u64) -> Result<Vec<u8>, SinkError> {
        each!(self, s => s.get(name, max).await)
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, SinkError> {
        each!(self, s => s.list(prefix).await)
    }
    async fn list_first(&self, prefix: &str, n: usize) -> Result<Vec<ObjectInfo>, SinkError> {
        each!(self, s => s.list_first(prefix, n).await)
    }
    async fn list_dirs(&self, dir: &str) -> Result<Vec<String>, SinkError> {
        each!(self, s => s.list_dirs(dir).await)
    }
    async fn delete(&self, name: &str) -> Result<(), SinkError> {
        each!(self, s => s.delete(name).await)
    }
    async fn delete_many(&self, names: &[String]) -> Result<(), SinkError> {
        each!(self, s => s.delete_many(names).await)
    }
    async fn remove_stale_partials(&self, grace: Duration) -> Result<u64, SinkError> {
        each!(self, s => s.remove_stale_partials(grace).await)
    }
    fn lock_period(&self) -> Option<Duration> {
        each!(self, s => s.lock_period())
    }
    fn locking_until(&self, until: Option<std::time::SystemTime>) -> Self {
        match self {
            AnySink::S3(s) => AnySink::S3(s.locking_until(until)),
            other => other.clone(),
        }
    }
    async fn locked_until(&self, name: &str) -> Result<Option<std::time::SystemTime>, SinkError> {
        each!(self, s => s.locked_until(name).await)
    }
    async fn extend_lock(
        &self,
        names: &[String],
        until: std::time::SystemTime,
    ) -> Result<(), SinkError> {
        each!(self, s => s.extend_lock(names, until).await)
    }
}

impl ObjectWriter for AnyWriter {
    async fn append_prefix(&mut self, data: Vec<u8>, len: usize) -> Result<Vec<u8>, SinkError> {
        match self {
            AnyWriter::Local(w) => w.append_prefix(data, len).await,
            AnyWriter::S3(w) => w.append_prefix(data, len).await,
            AnyWriter::Swift(w) => w.append_prefix(data, len).await,
        }
    }
    fn len(&self) -> u64 {
        match self {
            AnyWriter::Local(w) => w.len(),
            AnyWriter::S3(w) => w.len(),
            AnyWriter::Swift(w) => w.len(),
        }
    }
    async fn finish(self) -> Result<(), SinkError> {
        match self {
            AnyWriter::Local(w) => w.finish().await,
            AnyWriter::S3(w) => w.finish().await,
            AnyWriter::Swift(w) => w.finish().await,
        }
    }
    async fn abort(self) {
        match self {
            AnyWriter::Local(w) => w.abort().await,
            AnyWriter::S3(w) => w.abort().await,
            AnyWriter::Swift(w) => w.abort().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            SinkAddress::parse("/srv/backups").expect("dir"),
            SinkAddress::Local("/srv/backups".into())
        );
        assert_eq!(
            SinkAddress::parse("s3://b/p/q?endpoint=http://h:1&region=r1").expect("s3"),
            SinkAddress::S3 {
                endpoint: "http://h:1".into(),
                bucket: "b".into(),
                prefix: "p/q".into(),
                region: Some("r1".into()),
            }
        );
        assert!(SinkAddress::parse("s3://b/p").is_err(), "no endpoint");
        let e = SinkAddress::parse("s3://b?endpoint=x&secret=hunter2").expect_err("secret");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(SinkAddress::parse("swift://c").is_err(), "no auth_url");
        let env = |k: &str| match k {
            "OS_AUTH_URL" => Some("http://k:5000/v3".to_string()),
            "OS_USERNAME" => Some("alice".to_string()),
            "OS_PROJECT_NAME" => Some("from-env".to_string()),
            _ => None,
        };
        let SinkAddress::Swift(a) =
            SinkAddress::parse_with("swift://c/p/q?project=demo&region=R1", env).expect("swift")
        else {
            panic!("not swift")
        };
        assert_eq!(
            (a.container.as_str(), a.prefix.as_str(), a.auth_url.as_str()),
            ("c", "p/q", "http://k:5000/v3")
        );
        assert_eq!(
            (a.user.as_deref(), a.project.as_deref(), a.region.as_deref()),
            (Some("alice"), Some("demo"), Some("R1"))
        );
        let cfg = a.config(crate::sink::Secret("pw".into()), &SwiftConfig::default());
        assert!(matches!(&cfg.auth, SwiftAuth::Password { project, .. } if project == "demo"));
        let e = SinkAddress::parse("swift://c?auth_url=http://x/v3&password=hunter2")
            .expect_err("a secret in the address");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let SinkAddress::Swift(t) =
            SinkAddress::parse("swift://c?auth_url=http://s:8080/auth/v1.0&user=a:b")
                .expect("tempauth")
        else {
            panic!("not swift")
        };
        let cfg = t.config(crate::sink::Secret("k".into()), &SwiftConfig::default());
        assert!(matches!(cfg.auth, SwiftAuth::TempAuth { .. }));
    }
}
