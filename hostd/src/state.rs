//! What every request and job shares.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use libcbt::source::libvirt::LibvirtSource;

use crate::config::Config;
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::registry::Jobs;

pub struct AppState {
    pub cfg: Config,
    pub journal: Arc<Journal>,
    pub metrics: Metrics,
    pub jobs: Jobs,
    pub shutting_down: AtomicBool,
    libvirt: Mutex<Option<LibvirtSource>>,
    connecting: tokio::sync::Mutex<()>,
}

/// How long a libvirt connect may take before the caller is told libvirt is unreachable.
const LIBVIRT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

impl AppState {
    pub fn new(cfg: Config, journal: Arc<Journal>) -> Arc<AppState> {
        Arc::new(AppState {
            jobs: Jobs::new(&cfg.limits),
            cfg,
            journal,
            metrics: Metrics::new(),
            shutting_down: AtomicBool::new(false),
            libvirt: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
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

    pub fn sink_path(&self, name: &str) -> Option<PathBuf> {
        self.cfg
            .sinks
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.path.clone())
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
