//! What every request and job shares.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use libcbt::source::libvirt::LibvirtSource;

use crate::config::Config;
use crate::jobs::Jobs;
use crate::journal::Journal;
use crate::metrics::Metrics;

pub struct AppState {
    pub cfg: Config,
    pub journal: Arc<Journal>,
    pub metrics: Metrics,
    pub jobs: Jobs,
    pub shutting_down: AtomicBool,
    libvirt: Mutex<Option<LibvirtSource>>,
}

impl AppState {
    pub fn new(cfg: Config, journal: Arc<Journal>) -> Arc<AppState> {
        Arc::new(AppState {
            jobs: Jobs::new(cfg.limits.max_jobs, cfg.limits.max_jobs_per_tenant),
            cfg,
            journal,
            metrics: Metrics::new(),
            shutting_down: AtomicBool::new(false),
            libvirt: Mutex::new(None),
        })
    }

    /// A live libvirt connection (reconnects after a libvirtd restart); `None` when libvirt
    /// is disabled or unreachable.
    pub fn libvirt(&self) -> Option<LibvirtSource> {
        if !self.cfg.libvirt.enabled {
            return None;
        }
        let mut g = self.libvirt.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = g.as_ref() {
            if c.is_alive() {
                return Some(c.clone());
            }
        }
        match LibvirtSource::connect(&self.cfg.libvirt.uri) {
            Ok(c) => {
                *g = Some(c.clone());
                Some(c)
            }
            Err(e) => {
                tracing::error!(error = %e, "libvirt unreachable");
                *g = None;
                None
            }
        }
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
