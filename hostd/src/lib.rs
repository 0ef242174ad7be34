//! `cbt-hostd`: the per-host backup daemon, and the HTTP client `cbtctl` uses to talk to it.
//!
//! | module | what it owns |
//! |---|---|
//! | [`config`] | TOML configuration, validated, errors naming the key |
//! | [`api`] | routes, authentication, tenancy, request validation |
//! | [`jobs`] | job queue, limits, progress, cancel, running backups, restores, verifies |
//! | [`groups`] | consistency groups: members held (frozen or paused) around their points in time, deadlines |
//! | [`recover`] | crash reconciliation from the journal, housekeeping (journal pruning, sink GC) |
//! | [`journal`] | SQLite job journal |
//! | [`inventory`] | instances (libvirt domains) and their tenants |
//! | [`metrics`] | Prometheus metrics |
//! | [`openapi`] | the OpenAPI document |
//! | [`server`] | listeners, TLS, systemd, signals |
//! | [`client`] | HTTP client over the Unix socket or TLS |

pub mod api;
pub mod client;
pub mod config;
pub mod groups;
pub mod inventory;
pub mod journal;
pub mod metrics;
pub mod mounts;
pub mod openapi;
pub mod recover;
pub mod registry;
pub mod run;
pub mod safe_fs;
pub mod server;
pub mod state;
