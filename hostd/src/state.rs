//! What every request and job shares.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use libcbt::sink::any::AnySink;
use libcbt::sink::SinkError;
use libcbt::source::libvirt::LibvirtSource;

use crate::config::{Config, SinkCfg};
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::registry::Jobs;

pub struct AppState {
    pub cfg: Config,
    pub journal: Arc<Journal>,
    pub metrics: Metrics,
    pub jobs: Jobs,
    pub mounts: crate::mounts::Mounts,
    pub groups: crate::groups::Groups,
    pub shutting_down: AtomicBool,
    libvirt: Mutex<Option<LibvirtSource>>,
    connecting: tokio::sync::Mutex<()>,
    /// Each configured sink, opened at its first use and shared after.
    sinks: Vec<(SinkCfg, tokio::sync::OnceCell<AnySink>)>,
}

/// How long a libvirt connect may take before the caller is told libvirt is unreachable.
const LIBVIRT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

impl AppState {
    pub fn new(cfg: Config, journal: Arc<Journal>) -> Arc<AppState> {
        Arc::new(AppState {
            jobs: Jobs::new(&cfg.limits),
            mounts: Default::default(),
            groups: Default::default(),
            journal,
            metrics: Metrics::new(),
            shutting_down: AtomicBool::new(false),
            libvirt: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            sinks: cfg
                .sinks
                .iter()
                .map(|s| (s.clone(), tokio::sync::OnceCell::new()))
                .collect(),
            cfg,
        })
    }

    /// A live libvirt connection (reconnects after a libvirtd restart); `None` when libvirt
    /// is disabled or unreachable.
    ///
    /// The connect runs on the blocking pool with a deadline and one at a time (`connecting`);
    /// the std mutex guards only the cached handle and is never held across an await, so a
    /// hung libvirtd stalls neither the runtime nor the handlers that need no libvirt.
    pub async fn libvirt(&self) -> Option<LibvirtSource> {
        if !self.cfg.libvirt.enabled {
            return None;
        }
        let cached = || {
            self.libvirt
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .filter(|c| c.is_alive())
                .cloned()
        };
        if let Some(c) = cached() {
            return Some(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = cached() {
            return Some(c);
        }
        let uri = self.cfg.libvirt.uri.clone();
        let r = tokio::time::timeout(
            LIBVIRT_CONNECT_TIMEOUT,
            tokio::task::spawn_blocking(move || LibvirtSource::connect(&uri)),
        )
        .await;
        let c = match r {
            Ok(Ok(Ok(c))) => Some(c),
            Ok(Ok(Err(e))) => {
                tracing::error!(error = %e, "libvirt unreachable");
                None
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "libvirt connect task failed");
                None
            }
            Err(_) => {
                tracing::error!(
                    secs = LIBVIRT_CONNECT_TIMEOUT.as_secs(),
                    "libvirt did not answer the connect in time"
                );
                None
            }
        };
        *self.libvirt.lock().unwrap_or_else(|e| e.into_inner()) = c.clone();
        c
    }

    /// The configured sink `name` (`Ok(None)`: no such sink), opened once and shared; an
    /// open that failed (an object store down at start) is tried again at the next use.
    pub async fn sink(&self, name: &str) -> Result<Option<AnySink>, SinkError> {
        let Some((cfg, cell)) = self.sinks.iter().find(|(c, _)| c.name == name) else {
            return Ok(None);
        };
        cell.get_or_try_init(|| open_sink(cfg))
            .await
            .cloned()
            .map(Some)
    }

    /// Opens every configured sink once, at start; failures are logged (and retried at use).
    pub async fn open_sinks(&self) {
        for (cfg, _) in &self.sinks {
            match self.sink(&cfg.name).await {
                Ok(Some(s)) => tracing::info!(sink = %cfg.name, at = %s.describe(), "sink opened"),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(sink = %cfg.name, error = %crate::run::chain(&e), "sink unavailable")
                }
            }
        }
    }

    /// Whether a sink may be used by `tenant` (`None`: an admin).
    pub fn sink_allowed(&self, name: &str, tenant: Option<&str>) -> bool {
        self.cfg.sinks.iter().any(|s| {
            s.name == name
                && (tenant.is_none()
                    || s.tenants.is_empty()
                    || s.tenants.iter().any(|t| Some(t.as_str()) == tenant))
        })
    }
}

/// Opens the sink of `cfg`: a directory, an S3 bucket or a Swift container, with the
/// credentials of its file (or of the environment) and the CA it names.
pub async fn open_sink(cfg: &SinkCfg) -> Result<AnySink, SinkError> {
    let opts = cfg.open_options().map_err(SinkError::Config)?;
    AnySink::open(&cfg.address(), &opts).await
}
