//! `cbt-controller`: the central orchestrator. It knows the hosts (their `cbt-hostd`) and the
//! tenants' workloads (named sets of instances), and runs a workload as one consistency group
//! across the hosts its members run on, recording each workload snapshot on the sink.
//!
//! | module | what it owns |
//! |---|---|
//! | [`config`] | TOML configuration: hosts, sinks, tokens |
//! | [`store`] | SQLite state: workloads and runs |
//! | [`api`] | routes, authentication, tenancy |
//! | [`run`] | a workload run across hosts, its snapshot record |
//! | [`state`] | what requests and runs share |

pub mod api;
pub mod config;
pub mod run;
pub mod state;
pub mod store;
