//! `cbt-controller`: see the `controller` library.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "cbt-controller",
    version,
    about = "cbt central orchestrator of workloads"
)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, default_value = "/etc/cbt/controller.toml")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CBT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = controller::config::Config::load(&args.config)?;
    let store = controller::store::Store::open(&cfg.server.database)
        .with_context(|| format!("{}", cfg.server.database.display()))?;
    let settled = store.settle_unfinished()?;
    if settled > 0 {
        tracing::warn!(runs = settled, "runs of a previous life settled as failed");
    }
    let socket = cfg.server.unix_socket.clone();
    let st = controller::state::State::new(cfg, store).map_err(anyhow::Error::msg)?;
    let router = controller::api::router(st);
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(&socket);
    let l = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    }
    tracing::info!(socket = %socket.display(), "cbt-controller ready");
    axum::serve(l, router)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
