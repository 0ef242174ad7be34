//! `cbt-hostd` configuration: TOML, unknown keys refused, every error naming its key.
//!
//! ```toml
//! [server]
//! unix_socket = "/run/cbt/hostd.sock"      # root-only (0600)
//! listen = "0.0.0.0:8443"                  # optional; TLS required on TCP
//! tls_cert = "/etc/cbt/tls/cert.pem"
//! tls_key = "/etc/cbt/tls/key.pem"
//! state_dir = "/var/lib/cbt"               # journal.sqlite, scratch/; 0711, refused if
//!                                          # group/world-writable
//! restore_dirs = ["/var/lib/cbt/restores"] # the only places file restores may write
//! header_read_timeout_secs = 10            # TLS listener: a request header (also the wait
//!                                          # for the next one on a kept-alive connection)
//! idle_timeout_secs = 60                   # TLS listener: no bytes moved for this long
//! max_connections = 256                    # TLS listener: beyond it, closed at accept
//!
//! [libvirt]
//! uri = "qemu:///system"
//! default_tenant = "ops"                   # domains without Nova metadata or an override
//! qemu_user = "libvirt-qemu"              # qemu.conf's user: owns instant copies' NBD sockets
//! domains = []                             # only these domains (names, "prefix*"); empty: all
//!
//! [limits]
//! max_jobs = 2
//! max_jobs_per_tenant = 1
//!
//! [[sink]]
//! name = "local"
//! path = "/srv/backups"                    # type = "local" (the default): a directory, NFS
//! tenants = []                             # empty: every tenant
//! max_chain = 14                           # optional: longer chains become synthetic fulls
//!
//! [[sink]]
//! name = "ceph"
//! type = "s3"                              # Ceph RGW, SeaweedFS, AWS S3
//! endpoint = "https://rgw.example:7480"
//! bucket = "backups"
//! prefix = "region1"                       # optional
//! region = "us-east-1"                     # optional
//! credentials_file = "/etc/cbt/ceph.cred"  # 0600: access_key = …, secret_key = …;
//!                                          # without: AWS_ACCESS_KEY_ID/_SECRET_ACCESS_KEY
//! ca_file = "/etc/cbt/rgw-ca.pem"          # optional: a private CA
//! part_size_mib = 8                        # optional: multipart part size (5..5120)
//! parts_in_flight = 4                      # optional: parts uploading at once per object
//! object_lock_mode = "compliance"          # optional, with object_lock_days: immutable
//! object_lock_days = 30                    # backups (S3 Object Lock; the bucket has it on)
//!
//! [[sink]]
//! name = "swift"
//! type = "swift"                           # OpenStack Swift, native API
//! auth_url = "https://keystone.example:5000/v3"  # Keystone v3, or tempauth's …/auth/v1.0
//! user = "cbt"                             # Keystone user (tempauth: account:user)
//! user_domain = "Default"                  # optional
//! project = "backups"                      # the project whose Swift account holds them
//! project_domain = "Default"               # optional
//! application_credential_id = "…"          # optional: log in with it instead of a password
//! region = "RegionOne"                     # optional: catalog region
//! interface = "internal"                   # optional: catalog interface (default public)
//! storage_url = "https://swift/v1/AUTH_x"  # optional: instead of the catalog's
//! container = "backups"
//! prefix = "region1"                       # optional
//! credentials_file = "/etc/cbt/swift.cred" # 0600: password = … (or
//!                                          # application_credential_secret = …, key = …)
//! ca_file = "/etc/cbt/swift-ca.pem"        # optional
//! segment_size_mib = 8                     # optional: SLO segment size (1..5120)
//! segments_in_flight = 4                   # optional
//!
//! [[token]]
//! name = "orchestrator"
//! sha256 = "…64 hex digits…"               # sha256 of the bearer token
//! admin = true
//!
//! [[instance]]
//! domain = "legacy-vm"                     # name or UUID
//! tenant = "ops"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub libvirt: Libvirt,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, rename = "sink")]
    pub sinks: Vec<SinkCfg>,
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenCfg>,
    #[serde(default, rename = "instance")]
    pub instances: Vec<InstanceCfg>,
    #[serde(default)]
    pub restore: RestoreCfg,
}

/// What restores may write to besides files under `server.restore_dirs` and new domains.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestoreCfg {
    /// NBD URIs an admin may restore into: exact URIs, or prefixes ending in `*`
    /// (`nbd+unix:///vol?socket=/run/cbt/nbd/*`). Tenants never name NBD targets.
    pub nbd_allow: Vec<String>,
}

impl RestoreCfg {
    /// Whether `uri` is on the allow-list.
    pub fn nbd_allowed(&self, uri: &str) -> bool {
        self.nbd_allow.iter().any(|a| match a.strip_suffix('*') {
            Some(prefix) => uri.starts_with(prefix) && !uri[prefix.len()..].contains(".."),
            None => a == uri,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    pub unix_socket: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub scratch_dir: Option<PathBuf>,
    pub restore_dirs: Vec<PathBuf>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// How long running jobs get to stop on SIGTERM.
    pub shutdown_grace_secs: u64,
    /// TLS listener: how long a client has to send a whole request header, counted from the
    /// first read (and, on a kept-alive connection, from the end of the previous response).
    pub header_read_timeout_secs: u64,
    /// TLS listener: a connection on which no byte moved for this long is closed at once
    /// when no request is in flight, else once the exchange ends; one still silent after
    /// twice this long is dropped.
    pub idle_timeout_secs: u64,
    /// TLS listener: connections served at once (handshakes included); more are closed as
    /// soon as they are accepted.
    pub max_connections: usize,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            unix_socket: Some(PathBuf::from("/run/cbt/hostd.sock")),
            listen: None,
            tls_cert: None,
            tls_key: None,
            state_dir: PathBuf::from("/var/lib/cbt"),
            scratch_dir: None,
            restore_dirs: vec![PathBuf::from("/var/lib/cbt/restores")],
            max_body_bytes: 64 << 10,
            shutdown_grace_secs: 30,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            max_connections: 256,
        }
    }
}

impl Server {
    pub fn scratch(&self) -> PathBuf {
        self.scratch_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("scratch"))
    }
    pub fn journal(&self) -> PathBuf {
        self.state_dir.join("journal.sqlite")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Libvirt {
    pub enabled: bool,
    pub uri: String,
    pub default_tenant: Option<String>,
    /// The user QEMU runs as (qemu.conf's `user`): an instant staging copy's NBD sockets are
    /// given to it, and to nobody else.
    pub qemu_user: String,
    /// Only these domains are served (names; `prefix*` matches by prefix); empty: all. For
    /// daemons that share a libvirtd (a lab standing in for several hosts).
    pub domains: Vec<String>,
}

impl Libvirt {
    /// Whether domain `name` is served.
    pub fn serves(&self, name: &str) -> bool {
        self.domains.is_empty()
            || self.domains.iter().any(|d| match d.strip_suffix('*') {
                Some(p) => name.starts_with(p),
                None => d == name,
            })
    }
}

impl Default for Libvirt {
    fn default() -> Self {
        Libvirt {
            enabled: true,
            uri: libcbt::source::libvirt::DEFAULT_URI.into(),
            default_tenant: None,
            qemu_user: "libvirt-qemu".into(),
            domains: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_jobs: usize,
    pub max_jobs_per_tenant: usize,
    /// Jobs waiting for a slot, all tenants together; beyond it requests get 429.
    pub max_queued_jobs: usize,
    /// Finished jobs kept in memory (older ones are still in the journal).
    pub keep_finished_jobs: usize,
    /// Finished jobs are dropped from the journal after this many days.
    pub journal_retention_days: u64,
    /// Unreferenced sink objects younger than this are never collected: another host or
    /// process may be writing the backup that will reference them.
    pub gc_grace_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_jobs: 2,
            max_jobs_per_tenant: 1,
            max_queued_jobs: 64,
            keep_finished_jobs: 256,
            journal_retention_days: 30,
            gc_grace_secs: 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkCfg {
    pub name: String,
    #[serde(default, rename = "type")]
    pub kind: SinkKind,
    /// `local`: the directory.
    pub path: Option<PathBuf>,
    /// `s3`: where and how.
    pub endpoint: Option<String>,
    pub bucket: Option<String>,
    #[serde(default)]
    pub prefix: String,
    pub region: Option<String>,
    pub credentials_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub part_size_mib: Option<usize>,
    pub parts_in_flight: Option<usize>,
    /// `swift`: where and how (`prefix`, `region`, `credentials_file`, `ca_file` too).
    pub container: Option<String>,
    pub auth_url: Option<String>,
    pub user: Option<String>,
    pub user_domain: Option<String>,
    pub project: Option<String>,
    pub project_domain: Option<String>,
    pub application_credential_id: Option<String>,
    pub interface: Option<String>,
    pub storage_url: Option<String>,
    pub segment_size_mib: Option<usize>,
    pub segments_in_flight: Option<usize>,
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Bounded chains: a backup that would be the `max_chain + 1`-th of its chain (its full
    /// included) becomes a synthetic full right after it commits (a fold, metadata only), so
    /// no restore merges more than `max_chain` indexes. Unset: chains grow until a full.
    pub max_chain: Option<usize>,
    /// `s3`: immutable backups on S3 Object Lock, `governance` or `compliance`, for
    /// `object_lock_days` (both or neither). The bucket must have Object Lock enabled and the
    /// server must enforce it (checked when the sink opens; Swift's s3api is refused).
    pub object_lock_mode: Option<String>,
    pub object_lock_days: Option<u32>,
}

/// The backend of a sink.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    #[default]
    Local,
    S3,
    Swift,
}

impl SinkCfg {
    /// The directory of a local sink.
    pub fn local_path(&self) -> Option<&Path> {
        match self.kind {
            SinkKind::Local => self.path.as_deref(),
            SinkKind::S3 | SinkKind::Swift => None,
        }
    }

    /// Where the sink is (validated by [`Config::validate`]).
    pub fn address(&self) -> libcbt::sink::any::SinkAddress {
        use libcbt::sink::any::SinkAddress;
        match self.kind {
            SinkKind::Local => SinkAddress::Local(self.path.clone().unwrap_or_default()),
            SinkKind::S3 => SinkAddress::S3 {
                endpoint: self.endpoint.clone().unwrap_or_default(),
                bucket: self.bucket.clone().unwrap_or_default(),
                prefix: self.prefix.clone(),
                region: self.region.clone(),
            },
            SinkKind::Swift => SinkAddress::Swift(libcbt::sink::any::SwiftAddress {
                container: self.container.clone().unwrap_or_default(),
                prefix: self.prefix.clone(),
                auth_url: self.auth_url.clone().unwrap_or_default(),
                user: self.user.clone(),
                user_domain: self.user_domain.clone(),
                project: self.project.clone(),
                project_domain: self.project_domain.clone(),
                application_credential_id: self.application_credential_id.clone(),
                region: self.region.clone(),
                interface: self.interface.clone(),
                storage_url: self.storage_url.clone(),
            }),
        }
    }

    /// How to open the sink besides its address: credentials file, CA, tuning.
    pub fn open_options(&self) -> Result<libcbt::sink::any::OpenOptions, String> {
        let ca_pem = match &self.ca_file {
            Some(ca) => {
                Some(std::fs::read(ca).map_err(|e| format!("ca_file {}: {e}", ca.display()))?)
            }
            None => None,
        };
        Ok(libcbt::sink::any::OpenOptions {
            credentials_file: self.credentials_file.clone(),
            ca_pem,
            s3: self.s3_tuning(),
            swift: self.swift_tuning(),
        })
    }

    /// The Swift settings besides the address (segment size, segments in flight).
    pub fn swift_tuning(&self) -> libcbt::sink::swift::SwiftConfig {
        let d = libcbt::sink::swift::SwiftConfig::default();
        libcbt::sink::swift::SwiftConfig {
            segment_size: self
                .segment_size_mib
                .map_or(d.segment_size, |m| m.saturating_mul(1 << 20)),
            segments_in_flight: self.segments_in_flight.unwrap_or(d.segments_in_flight),
            ..d
        }
    }

    /// The S3 settings besides the address (part size, parts in flight; defaults elsewhere).
    pub fn s3_tuning(&self) -> libcbt::sink::s3::S3Config {
        let d = libcbt::sink::s3::S3Config::default();
        libcbt::sink::s3::S3Config {
            part_size: self
                .part_size_mib
                .map_or(d.part_size, |m| m.saturating_mul(1 << 20)),
            parts_in_flight: self.parts_in_flight.unwrap_or(d.parts_in_flight),
            object_lock: match (&self.object_lock_mode, self.object_lock_days) {
                (Some(m), Some(days)) => {
                    libcbt::sink::s3::LockMode::parse(m).map(|mode| libcbt::sink::s3::ObjectLock {
                        mode,
                        period: std::time::Duration::from_secs(u64::from(days) * 86_400),
                    })
                }
                _ => None,
            },
            ..d
        }
    }

    fn validate(&self, i: usize) -> Result<(), (String, String)> {
        use SinkKind::{Local, Swift, S3};
        let key = |k: &str| format!("sink[{i}].{k}");
        // Each key, whether it is set, and the types it belongs to.
        let keys: [(&str, bool, &[SinkKind]); 21] = [
            ("path", self.path.is_some(), &[Local]),
            ("endpoint", self.endpoint.is_some(), &[S3]),
            ("bucket", self.bucket.is_some(), &[S3]),
            ("prefix", !self.prefix.is_empty(), &[S3, Swift]),
            ("region", self.region.is_some(), &[S3, Swift]),
            (
                "credentials_file",
                self.credentials_file.is_some(),
                &[S3, Swift],
            ),
            ("ca_file", self.ca_file.is_some(), &[S3, Swift]),
            ("part_size_mib", self.part_size_mib.is_some(), &[S3]),
            ("parts_in_flight", self.parts_in_flight.is_some(), &[S3]),
            ("object_lock_mode", self.object_lock_mode.is_some(), &[S3]),
            ("object_lock_days", self.object_lock_days.is_some(), &[S3]),
            ("container", self.container.is_some(), &[Swift]),
            ("auth_url", self.auth_url.is_some(), &[Swift]),
            ("user", self.user.is_some(), &[Swift]),
            ("user_domain", self.user_domain.is_some(), &[Swift]),
            ("project", self.project.is_some(), &[Swift]),
            ("project_domain", self.project_domain.is_some(), &[Swift]),
            (
                "application_credential_id",
                self.application_credential_id.is_some(),
                &[Swift],
            ),
            ("interface", self.interface.is_some(), &[Swift]),
            ("storage_url", self.storage_url.is_some(), &[Swift]),
            (
                "segment_size_mib",
                self.segment_size_mib.is_some(),
                &[Swift],
            ),
        ];
        if self.max_chain == Some(0) {
            return Err((key("max_chain"), "must be at least 1".into()));
        }
        if self.segments_in_flight.is_some() && self.kind != Swift {
            return Err((
                key("segments_in_flight"),
                "only for type = \"swift\"".into(),
            ));
        }
        for (k, set, kinds) in keys {
            if set && !kinds.contains(&self.kind) {
                let names: Vec<String> = kinds
                    .iter()
                    .map(|k| format!("\"{}\"", format!("{k:?}").to_lowercase()))
                    .collect();
                return Err((key(k), format!("only for type = {}", names.join(" or "))));
            }
        }
        match (&self.object_lock_mode, self.object_lock_days) {
            (None, None) => {}
            (Some(m), Some(d)) => {
                if libcbt::sink::s3::LockMode::parse(m).is_none() {
                    return Err((
                        key("object_lock_mode"),
                        "\"governance\" or \"compliance\"".into(),
                    ));
                }
                if !(1..=36_500).contains(&d) {
                    return Err((key("object_lock_days"), "1 to 36500".into()));
                }
            }
            (Some(_), None) => {
                return Err((
                    key("object_lock_days"),
                    "needed with object_lock_mode".into(),
                ))
            }
            (None, Some(_)) => {
                return Err((
                    key("object_lock_mode"),
                    "needed with object_lock_days".into(),
                ))
            }
        }
        for (k, f) in [
            ("credentials_file", &self.credentials_file),
            ("ca_file", &self.ca_file),
        ] {
            if f.as_ref().is_some_and(|f| !f.is_absolute()) {
                return Err((key(k), "must be an absolute path".into()));
            }
        }
        match self.kind {
            Local => match &self.path {
                Some(p) if p.is_absolute() => {}
                _ => return Err((key("path"), "must be an absolute path".into())),
            },
            S3 => {
                // The sink's own rules, named after this file's keys.
                let s3 = libcbt::sink::s3::S3Config {
                    endpoint: self.endpoint.clone().unwrap_or_default(),
                    bucket: self.bucket.clone().unwrap_or_default(),
                    prefix: self.prefix.clone(),
                    ..self.s3_tuning()
                };
                if let Err((k, why)) = s3.validate() {
                    let k = if k == "part_size" { "part_size_mib" } else { k };
                    return Err((key(k), why.into()));
                }
            }
            Swift => {
                let libcbt::sink::any::SinkAddress::Swift(a) = self.address() else {
                    unreachable!("a swift address")
                };
                let cfg = a.config(Default::default(), &self.swift_tuning());
                if let Err((k, why)) = cfg.validate() {
                    let k = match k {
                        "segment_size" => "segment_size_mib",
                        k => k,
                    };
                    return Err((key(k), why.into()));
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCfg {
    pub name: String,
    /// Hex sha256 of the bearer token.
    pub sha256: String,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceCfg {
    pub domain: String,
    pub tenant: String,
}

/// Names of sinks, tenants, tokens: what may appear in URLs and logs.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !s.starts_with('.')
}

impl Config {
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string().trim().to_string(),
        })?;
        c.validate(path)?;
        Ok(c)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::parse(path, &text)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: String, message: &str| ConfigError::Invalid {
            path: path.into(),
            key,
            message: message.into(),
        };
        let s = &self.server;
        if s.unix_socket.is_none() && s.listen.is_none() {
            return Err(bad(
                "server".into(),
                "neither unix_socket nor listen is set",
            ));
        }
        if s.listen.is_some() && (s.tls_cert.is_none() || s.tls_key.is_none()) {
            return Err(bad(
                "server.listen".into(),
                "a TCP listener needs tls_cert and tls_key",
            ));
        }
        if !s.state_dir.is_absolute() {
            return Err(bad("server.state_dir".into(), "must be an absolute path"));
        }
        for (i, d) in s.restore_dirs.iter().enumerate() {
            if !d.is_absolute() || d.components().any(|c| c.as_os_str() == "..") {
                return Err(bad(
                    format!("server.restore_dirs[{i}]"),
                    "must be an absolute path without '..'",
                ));
            }
        }
        if s.max_body_bytes < 1024 || s.max_body_bytes > 16 << 20 {
            return Err(bad(
                "server.max_body_bytes".into(),
                "must be between 1024 and 16777216",
            ));
        }
        if !(1..=3600).contains(&s.header_read_timeout_secs) {
            return Err(bad(
                "server.header_read_timeout_secs".into(),
                "must be between 1 and 3600",
            ));
        }
        if !(1..=86_400).contains(&s.idle_timeout_secs) {
            return Err(bad(
                "server.idle_timeout_secs".into(),
                "must be between 1 and 86400",
            ));
        }
        if !(1..=100_000).contains(&s.max_connections) {
            return Err(bad(
                "server.max_connections".into(),
                "must be between 1 and 100000",
            ));
        }
        if self.limits.max_jobs == 0 || self.limits.max_jobs_per_tenant == 0 {
            return Err(bad("limits".into(), "limits must be at least 1"));
        }
        if !(1..=100_000).contains(&self.limits.max_queued_jobs) {
            return Err(bad(
                "limits.max_queued_jobs".into(),
                "must be between 1 and 100000",
            ));
        }
        if self.limits.keep_finished_jobs > 100_000 {
            return Err(bad(
                "limits.keep_finished_jobs".into(),
                "must be at most 100000",
            ));
        }
        // A running backup renews its marker every MARKER_REFRESH; the grace period must
        // outlast several renewals, or a slow sink could have a live backup collected.
        let min_grace = 6 * libcbt::engine::MARKER_REFRESH.as_secs();
        if self.limits.gc_grace_secs < min_grace {
            return Err(bad(
                "limits.gc_grace_secs".into(),
                &format!("must be at least {min_grace} (six in-progress marker renewals)"),
            ));
        }
        if self.limits.journal_retention_days == 0 {
            return Err(bad(
                "limits.journal_retention_days".into(),
                "must be at least 1",
            ));
        }
        for (i, a) in self.restore.nbd_allow.iter().enumerate() {
            let exact = a.strip_suffix('*').unwrap_or(a);
            if exact.is_empty()
                || a.len() > 1024
                || (!a.ends_with('*') && libcbt::nbd::uri::NbdUri::parse(a).is_err())
            {
                return Err(bad(
                    format!("restore.nbd_allow[{i}]"),
                    "an NBD URI, or a prefix of one ending in '*'",
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, k) in self.sinks.iter().enumerate() {
            if !valid_name(&k.name) {
                return Err(bad(
                    format!("sink[{i}].name"),
                    "letters, digits, '-', '_', '.' only",
                ));
            }
            if !names.insert(&k.name) {
                return Err(bad(format!("sink[{i}].name"), "duplicate sink name"));
            }
            k.validate(i).map_err(|(key, m)| bad(key, &m))?;
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if t.sha256.len() != 64 || hex::decode(&t.sha256).is_err() {
                return Err(bad(format!("token[{i}].sha256"), "must be 64 hex digits"));
            }
            if t.admin == t.tenant.is_some() {
                return Err(bad(
                    format!("token[{i}]"),
                    "a token is either admin = true or bound to a tenant",
                ));
            }
            if t.tenant.as_deref().is_some_and(|x| !valid_name(x)) {
                return Err(bad(format!("token[{i}].tenant"), "invalid tenant name"));
            }
        }
        for (i, t) in self.instances.iter().enumerate() {
            if !valid_name(&t.tenant) {
                return Err(bad(format!("instance[{i}].tenant"), "invalid tenant name"));
            }
        }
        Ok(())
    }

    /// The configuration `make demo` and the tests start from: a Unix socket and a local
    /// sink under `dir`, one admin token.
    pub fn embedded_default(dir: &Path, admin_token_sha256: &str) -> String {
        format!(
            r#"[server]
unix_socket = "{d}/hostd.sock"
state_dir = "{d}/state"
restore_dirs = ["{d}/restores"]

[libvirt]
default_tenant = "demo"

[[sink]]
name = "local"
path = "{d}/sink"

[[token]]
name = "admin"
sha256 = "{admin_token_sha256}"
admin = true
"#,
            d = dir.display()
        )
    }
}

/// Hex sha256 of a token, as the config stores it.
/// The entry of `tokens` whose hash is `token`'s: every entry compared, each in constant
/// time (no early exit to time).
pub fn find_token<'a>(tokens: &'a [TokenCfg], token: &str) -> Option<&'a TokenCfg> {
    let hash = token_hash(token);
    let eq = |a: &[u8], b: &[u8]| {
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    };
    let mut found = None;
    for t in tokens {
        if eq(hash.as_bytes(), t.sha256.to_ascii_lowercase().as_bytes()) {
            found = Some(t);
        }
    }
    found
}

pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// Longest token [`read_token`] accepts.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Why a token could not be read from stdin or a file.
#[derive(Debug, thiserror::Error)]
pub enum TokenReadError {
    #[error("cannot read the token")]
    Io(#[source] std::io::Error),
    #[error("the token is empty")]
    Empty,
    #[error("the token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("the token is more than one line")]
    MultiLine,
    #[error("the token is not UTF-8")]
    NotUtf8,
}

/// Reads a bearer token the way `cbt-hostd --hash-token` and `cbtctl --token-file` take it:
/// one line, its trailing newline (`\n` or `\r\n`) stripped, nothing else changed.
///
/// Tokens come from stdin, a file or the environment, never from argv: a process's command
/// line is readable by every local user in `/proc/<pid>/cmdline`.
pub fn read_token(r: impl std::io::Read) -> Result<String, TokenReadError> {
    use std::io::Read;
    let mut buf = Vec::new();
    r.take(MAX_TOKEN_LEN as u64 + 3)
        .read_to_end(&mut buf)
        .map_err(TokenReadError::Io)?;
    let mut t = buf.as_slice();
    if let Some(x) = t.strip_suffix(b"\n") {
        t = x.strip_suffix(b"\r").unwrap_or(x);
    }
    if t.contains(&b'\n') {
        return Err(TokenReadError::MultiLine);
    }
    if t.len() > MAX_TOKEN_LEN {
        return Err(TokenReadError::TooLong);
    }
    if t.is_empty() {
        return Err(TokenReadError::Empty);
    }
    String::from_utf8(t.to_vec()).map_err(|_| TokenReadError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), t)
    }

    #[test]
    fn defaults_and_embedded() {
        let c = parse(&Config::embedded_default(
            Path::new("/tmp/x"),
            &token_hash("t"),
        ))
        .expect("ok");
        assert_eq!(c.sinks[0].name, "local");
        assert_eq!(c.limits.max_jobs, 2);
        assert_eq!(c.server.scratch(), PathBuf::from("/tmp/x/state/scratch"));
    }

    #[test]
    fn read_token_strips_one_newline_and_refuses_empty_or_several_lines() {
        let r = |b: &[u8]| read_token(b);
        assert_eq!(r(b"abc\n").expect("line"), "abc");
        assert_eq!(r(b"abc\r\n").expect("crlf"), "abc");
        assert_eq!(r(b"abc").expect("no newline"), "abc");
        assert_eq!(r(b" a b ").expect("spaces kept"), " a b ");
        assert!(matches!(r(b""), Err(TokenReadError::Empty)));
        assert!(matches!(r(b"\n"), Err(TokenReadError::Empty)));
        assert!(matches!(r(b"a\nb\n"), Err(TokenReadError::MultiLine)));
        assert!(matches!(r(b"a\n\n"), Err(TokenReadError::MultiLine)));
        assert!(matches!(
            r(&vec![b'x'; MAX_TOKEN_LEN + 1]),
            Err(TokenReadError::TooLong)
        ));
        assert!(matches!(r(b"\xff\n"), Err(TokenReadError::NotUtf8)));
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("[server]\nunix_sockett = \"/x\"\n").expect_err("unknown key");
        assert!(e.to_string().contains("unix_sockett"), "{e}");
        let e = parse("[[sink]]\nname = \"a/b\"\npath = \"/x\"\n").expect_err("bad name");
        assert!(e.to_string().contains("sink[0].name"), "{e}");
        let e = parse("[[sink]]\nname = \"a\"\npath = \"/x\"\nmax_chain = 0\n")
            .expect_err("max_chain 0");
        assert!(e.to_string().contains("sink[0].max_chain"), "{e}");
        let e = parse("[[sink]]\nname = \"a\"\npath = \"/x\"\nbucket = \"b\"\n")
            .expect_err("s3 key on a local sink");
        assert!(e.to_string().contains("sink[0].bucket"), "{e}");
        let s3 = "[[sink]]\nname = \"c\"\ntype = \"s3\"\nendpoint = \"http://h:1\"\n";
        let e = parse(s3).expect_err("no bucket");
        assert!(e.to_string().contains("sink[0].bucket"), "{e}");
        let e = parse(&format!("{s3}bucket = \"b\"\npath = \"/x\"\n")).expect_err("path");
        assert!(e.to_string().contains("sink[0].path"), "{e}");
        let e = parse(&format!("{s3}bucket = \"b\"\npart_size_mib = 1\n")).expect_err("part");
        assert!(e.to_string().contains("sink[0].part_size_mib"), "{e}");
        for (extra, key) in [
            (
                "object_lock_mode = \"strict\"\nobject_lock_days = 3\n",
                "object_lock_mode",
            ),
            ("object_lock_mode = \"compliance\"\n", "object_lock_days"),
            ("object_lock_days = 3\n", "object_lock_mode"),
            (
                "object_lock_mode = \"governance\"\nobject_lock_days = 0\n",
                "object_lock_days",
            ),
        ] {
            let e = parse(&format!("{s3}bucket = \"b\"\n{extra}")).expect_err(extra);
            assert!(e.to_string().contains(&format!("sink[0].{key}")), "{e}");
        }
        let e = parse("[[sink]]\nname = \"a\"\npath = \"/x\"\nobject_lock_days = 3\n")
            .expect_err("a lock on a directory");
        assert!(e.to_string().contains("sink[0].object_lock_days"), "{e}");
        let c = parse(&format!(
            "{s3}bucket = \"b\"\nobject_lock_mode = \"Compliance\"\nobject_lock_days = 30\n"
        ))
        .expect("an immutable sink");
        assert_eq!(
            c.sinks[0].s3_tuning().object_lock,
            Some(libcbt::sink::s3::ObjectLock {
                mode: libcbt::sink::s3::LockMode::Compliance,
                period: std::time::Duration::from_secs(30 * 86_400),
            })
        );
        let e = parse("[[sink]]\nname = \"c\"\ntype = \"nfs\"\n").expect_err("type");
        assert!(e.to_string().contains("swift"), "{e}");
        let c = parse(&format!("{s3}bucket = \"b\"\nprefix = \"p/q\"\n")).expect("s3 sink");
        assert_eq!(c.sinks[0].kind, SinkKind::S3);
        assert!(c.sinks[0].local_path().is_none());
        let swift = "[[sink]]\nname = \"o\"\ntype = \"swift\"\n\
                     auth_url = \"https://k:5000/v3\"\nuser = \"u\"\nproject = \"p\"\n";
        let e = parse(swift).expect_err("no container");
        assert!(e.to_string().contains("sink[0].container"), "{e}");
        let e = parse(&format!("{swift}container = \"c\"\nbucket = \"b\"\n")).expect_err("s3 key");
        assert!(e.to_string().contains("sink[0].bucket"), "{e}");
        let e = parse(&format!("{swift}container = \"c\"\nsegment_size_mib = 0\n"))
            .expect_err("segment size");
        assert!(e.to_string().contains("sink[0].segment_size_mib"), "{e}");
        let e = parse(&format!(
            "{swift}container = \"c\"\ninterface = \"private\"\n"
        ))
        .expect_err("interface");
        assert!(e.to_string().contains("sink[0].interface"), "{e}");
        let e = parse(&format!("{s3}bucket = \"b\"\ncontainer = \"c\"\n")).expect_err("swift key");
        assert!(e.to_string().contains("sink[0].container"), "{e}");
        let c = parse(&format!("{swift}container = \"c\"\nregion = \"R1\"\n")).expect("swift sink");
        assert_eq!(c.sinks[0].kind, SinkKind::Swift);
        let libcbt::sink::any::SinkAddress::Swift(a) = c.sinks[0].address() else {
            panic!("not a swift address")
        };
        assert_eq!(
            (a.container.as_str(), a.region.as_deref(), a.user.as_deref()),
            ("c", Some("R1"), Some("u"))
        );
        let e =
            parse("[[token]]\nname = \"t\"\nsha256 = \"zz\"\nadmin = true\n").expect_err("hash");
        assert!(e.to_string().contains("token[0].sha256"), "{e}");
        let e = parse("[server]\nlisten = \"127.0.0.1:1\"\n").expect_err("tls");
        assert!(e.to_string().contains("server.listen"), "{e}");
        let e = parse("[limits]\nmax_jobs = 0\n").expect_err("limits");
        assert!(e.to_string().contains("limits"), "{e}");
        let e = parse("[server]\nmax_connections = 0\n").expect_err("cap");
        assert!(e.to_string().contains("server.max_connections"), "{e}");
        let e = parse("[server]\nidle_timeout_secs = 0\n").expect_err("idle");
        assert!(e.to_string().contains("server.idle_timeout_secs"), "{e}");
        let e = parse("[server]\nrestore_dirs = [\"/a/../etc\"]\n").expect_err("dotdot");
        assert!(e.to_string().contains("restore_dirs[0]"), "{e}");
        // Shorter than six marker renewals: a live backup could lose its segments.
        let e = parse("[limits]\ngc_grace_secs = 600\n").expect_err("grace");
        assert!(e.to_string().contains("limits.gc_grace_secs"), "{e}");
        parse("[limits]\ngc_grace_secs = 3600\n").expect("an hour of grace");
    }
}
