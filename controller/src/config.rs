//! The controller's TOML configuration: where it listens and keeps its database, the hosts
//! (their `cbt-hostd`), the sinks workload snapshots are recorded on, and the tokens.
//!
//! ```toml
//! [server]
//! unix_socket = "/run/cbt/controller.sock"
//! database = "/var/lib/cbt/controller.sqlite"
//!
//! [[host]]
//! name = "compute-1"
//! hostd = "https://compute-1.example:8443"   # or a Unix socket path
//! ca = "/etc/cbt/hostd-ca.pem"                # for https
//! token_file = "/etc/cbt/compute-1.token"     # an admin token of that daemon, 0600
//!
//! [[sink]]                                    # as in hostd.toml: the same sinks, same names
//! name = "nfs"
//! path = "/srv/backups"
//!
//! [[token]]
//! name = "tenant-a"
//! sha256 = "…"                                # cbt-hostd --hash-token < TOKEN
//! tenant = "project-a"
//! ```

use std::path::{Path, PathBuf};

use hostd::client::{Client, Endpoint};
use hostd::config::{valid_name, SinkCfg, TokenCfg};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: Server,
    #[serde(default, rename = "host")]
    pub hosts: Vec<HostCfg>,
    #[serde(default, rename = "sink")]
    pub sinks: Vec<SinkCfg>,
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenCfg>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub unix_socket: PathBuf,
    pub database: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostCfg {
    pub name: String,
    /// A Unix socket path, or `https://host:port`.
    pub hostd: String,
    pub ca: Option<PathBuf>,
    pub token_file: PathBuf,
}

impl HostCfg {
    /// A client of the host's daemon with its token.
    pub fn client(&self) -> Result<Client, String> {
        let f = std::fs::File::open(&self.token_file)
            .map_err(|e| format!("host {}: {}: {e}", self.name, self.token_file.display()))?;
        let token = hostd::config::read_token(f)
            .map_err(|e| format!("host {}: {}: {e}", self.name, self.token_file.display()))?;
        let endpoint = match self.hostd.strip_prefix("https://") {
            Some(rest) => {
                let (host, port) = rest
                    .trim_end_matches('/')
                    .rsplit_once(':')
                    .ok_or_else(|| format!("host {}: hostd needs a port", self.name))?;
                Endpoint::Https {
                    host: host.into(),
                    port: port
                        .parse()
                        .map_err(|_| format!("host {}: bad port {port:?}", self.name))?,
                    ca: self
                        .ca
                        .clone()
                        .ok_or_else(|| format!("host {}: https needs ca", self.name))?,
                }
            }
            None => Endpoint::Unix(PathBuf::from(&self.hostd)),
        };
        Ok(Client::new(endpoint, Some(token)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let bad = |message: String| ConfigError::Invalid {
            path: path.into(),
            message,
        };
        let c: Config = toml::from_str(&text).map_err(|e| bad(e.to_string().trim().into()))?;
        let mut names = std::collections::BTreeSet::new();
        for h in &c.hosts {
            if !valid_name(&h.name) || !names.insert(h.name.clone()) {
                return Err(bad(format!("host {:?}: a bad or repeated name", h.name)));
            }
            h.client().map_err(bad)?;
        }
        for t in &c.tokens {
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("token {}: sha256 is 64 hex digits", t.name)));
            }
            if t.admin == t.tenant.is_some() {
                return Err(bad(format!(
                    "token {}: a tenant or admin, one of them",
                    t.name
                )));
            }
        }
        Ok(c)
    }
}
