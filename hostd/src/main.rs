//! `cbt-hostd`: the per-host backup daemon. See the `hostd` library for what it serves.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(name = "cbt-hostd", version, about = "cbt per-host backup daemon")]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, default_value = "/etc/cbt/hostd.toml")]
    config: PathBuf,
    /// Check the configuration (and its TLS files and sinks) and exit.
    #[arg(long)]
    check_config: bool,
    /// Print the sha256 to put in a `[[token]]` entry for TOKEN, and exit.
    #[arg(long, value_name = "TOKEN")]
    hash_token: Option<String>,
    /// Print a default configuration rooted at DIR, and exit.
    #[arg(long, value_name = "DIR")]
    print_default_config: Option<PathBuf>,
}

/// Everything the daemon creates is its own: journal, restores, sockets' directories.
/// Directories others must traverse (`state_dir`, scratch, restore directories) get their
/// mode set explicitly. Set before anything is created, so it holds outside systemd too.
#[allow(unsafe_code)]
fn private_umask() {
    // SAFETY: umask(2) cannot fail and touches no memory; no other thread exists yet that
    // could be creating files with the old mask.
    unsafe {
        libc::umask(0o077);
    }
}

fn main() -> Result<()> {
    private_umask();
    let args = Args::parse();
    if let Some(t) = args.hash_token {
        println!("{}", hostd::config::token_hash(&t));
        return Ok(());
    }
    if let Some(d) = args.print_default_config {
        print!(
            "{}",
            hostd::config::Config::embedded_default(
                &d,
                "<sha256 of your admin token: cbt-hostd --hash-token TOKEN>"
            )
        );
        return Ok(());
    }
    // Under systemd (journald), no timestamps and no colours: journald adds its own.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CBT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if journald {
        b.without_time().with_ansi(false).init();
    } else {
        b.init();
    }
    let cfg = match hostd::config::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cbt-hostd: {e}");
            std::process::exit(2);
        }
    };
    if args.check_config {
        if let Err(e) = hostd::server::check(&cfg) {
            eprintln!("cbt-hostd: {}: {e:#}", args.config.display());
            std::process::exit(2);
        }
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(hostd::server::run(cfg))
}
