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
    /// Read a token from stdin (one line) and print the sha256 to put in its `[[token]]`
    /// entry, then exit. A token given here on the command line is refused: every local user
    /// can read a process's arguments.
    #[arg(long, value_name = "REFUSED", conflicts_with = "hash_token_file")]
    hash_token: Option<Option<String>>,
    /// As --hash-token, reading the token from FILE (one line).
    #[arg(long, value_name = "FILE")]
    hash_token_file: Option<PathBuf>,
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

/// `--hash-token` / `--hash-token-file`: the hash of a token read from stdin or a file.
fn hash_token(arg: Option<String>, file: Option<PathBuf>) -> Result<()> {
    use anyhow::Context;
    if arg.is_some() {
        anyhow::bail!(
            "--hash-token takes no value: a token on the command line is readable by every \
             local user (/proc/<pid>/cmdline). Pipe it on stdin (`cbt-hostd --hash-token < \
             FILE`) or use --hash-token-file FILE"
        );
    }
    let token = match &file {
        Some(f) => hostd::config::read_token(
            std::fs::File::open(f).with_context(|| format!("{}", f.display()))?,
        )
        .with_context(|| format!("{}", f.display()))?,
        None => {
            use std::io::{BufRead, IsTerminal, Read};
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprint!("token (one line): ");
            }
            let mut line = String::new();
            stdin
                .lock()
                .take(hostd::config::MAX_TOKEN_LEN as u64 + 3)
                .read_line(&mut line)
                .context("reading the token from stdin")?;
            hostd::config::read_token(line.as_bytes()).context("stdin")?
        }
    };
    println!("{}", hostd::config::token_hash(&token));
    Ok(())
}

fn main() -> Result<()> {
    private_umask();
    let args = Args::parse();
    if args.hash_token.is_some() || args.hash_token_file.is_some() {
        if let Err(e) = hash_token(args.hash_token.flatten(), args.hash_token_file) {
            eprintln!("cbt-hostd: {e:#}");
            std::process::exit(2);
        }
        return Ok(());
    }
    if let Some(d) = args.print_default_config {
        print!(
            "{}",
            hostd::config::Config::embedded_default(
                &d,
                "<sha256 of your admin token: cbt-hostd --hash-token < TOKEN-FILE>"
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
