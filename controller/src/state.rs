//! What the controller's requests and runs share.

use std::sync::Arc;

use hostd::client::Client;
use libcbt::sink::any::AnySink;
use libcbt::sink::SinkError;

use crate::config::{Config, HostCfg};
use crate::store::Store;

pub struct State {
    pub cfg: Config,
    pub store: Store,
    /// Each host and a client of its daemon.
    pub hosts: Vec<(HostCfg, Client)>,
    sinks: Vec<tokio::sync::OnceCell<AnySink>>,
}

impl State {
    pub fn new(cfg: Config, store: Store) -> Result<Arc<State>, String> {
        let hosts = cfg
            .hosts
            .iter()
            .map(|h| Ok((h.clone(), h.client()?)))
            .collect::<Result<_, String>>()?;
        Ok(Arc::new(State {
            sinks: cfg.sinks.iter().map(|_| Default::default()).collect(),
            hosts,
            store,
            cfg,
        }))
    }

    /// Sink `name`, opened at its first use.
    pub async fn sink(&self, name: &str) -> Result<AnySink, SinkError> {
        let i = self
            .cfg
            .sinks
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| SinkError::Config(format!("no sink {name}")))?;
        self.sinks[i]
            .get_or_try_init(|| hostd::state::open_sink(&self.cfg.sinks[i]))
            .await
            .cloned()
    }

    /// Whether `tenant` (`None`: an admin) may use sink `name`.
    pub fn sink_allowed(&self, name: &str, tenant: Option<&str>) -> bool {
        self.cfg.sinks.iter().any(|s| {
            s.name == name
                && match tenant {
                    None => true,
                    Some(t) => s.tenants.is_empty() || s.tenants.iter().any(|x| x == t),
                }
        })
    }
}
