//! `cbtctl`: the operator's command line.
//!
//! Today it inspects NBD exports with libcbt's own client (`info`, `map`); backup, restore,
//! verify and the daemon API arrive with the engine and hostd.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use libcbt::nbd::{self, proto::tflag, Client, ConnectOptions};

#[derive(Parser)]
#[command(name = "cbtctl", version, about = "cbt operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Size, flags, block sizes and meta contexts of an NBD export.
    Info {
        /// nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH
        uri: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The extents of one meta context, in the format of `nbdinfo --map`.
    Map {
        uri: String,
        /// base:allocation, qemu:dirty-bitmap:NAME or qemu:allocation-depth.
        #[arg(long, default_value = nbd::BASE_ALLOCATION)]
        context: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Print totals per type instead of every extent.
        #[arg(long)]
        totals: bool,
    },
}

fn describe(context: &str, flags: u32) -> String {
    if context == nbd::BASE_ALLOCATION {
        match flags {
            0 => "data".into(),
            1 => "hole".into(),
            2 => "zero".into(),
            3 => "hole,zero".into(),
            f => format!("flags {f:#x}"),
        }
    } else if context.starts_with("qemu:dirty-bitmap:") {
        if flags & nbd::DIRTY != 0 {
            "dirty"
        } else {
            "clean"
        }
        .into()
    } else if context == nbd::QEMU_ALLOCATION_DEPTH {
        match flags {
            0 => "absent".into(),
            1 => "local".into(),
            d => format!("backing depth {d}"),
        }
    } else {
        String::new()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Info { uri, json } => {
            let contexts = nbd::list_meta_contexts(&uri, &[]).await.unwrap_or_default();
            let opts = ConnectOptions {
                connections: 1,
                ..ConnectOptions::default()
            };
            let client = Client::connect_with(&uri, &opts)
                .await
                .with_context(|| format!("connecting to {uri}"))?;
            let info = client.info();
            let flag_names: Vec<&str> = [
                (tflag::READ_ONLY, "read-only"),
                (tflag::SEND_FLUSH, "flush"),
                (tflag::SEND_FUA, "fua"),
                (tflag::SEND_TRIM, "trim"),
                (tflag::SEND_WRITE_ZEROES, "write-zeroes"),
                (tflag::CAN_MULTI_CONN, "multi-conn"),
                (tflag::SEND_CACHE, "cache"),
            ]
            .into_iter()
            .filter(|(f, _)| info.flags & f != 0)
            .map(|(_, n)| n)
            .collect();
            if json {
                let v = serde_json::json!({
                    "size": info.size,
                    "flags": flag_names,
                    "structured_replies": info.structured_replies,
                    "block_size": info.block_size.map(|b| serde_json::json!({"minimum": b.minimum, "preferred": b.preferred, "maximum": b.maximum})),
                    "contexts": contexts,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "size:     {} ({:.1} GiB)",
                    info.size,
                    info.size as f64 / f64::from(1u32 << 30)
                );
                println!("flags:    {}", flag_names.join(" "));
                if let Some(b) = info.block_size {
                    println!(
                        "blocks:   minimum {} preferred {} maximum {}",
                        b.minimum, b.preferred, b.maximum
                    );
                }
                println!("contexts: {}", contexts.join(" "));
            }
            client.disconnect().await;
        }
        Command::Map {
            uri,
            context,
            json,
            totals,
        } => {
            let opts = ConnectOptions::with_contexts([context.as_str()]);
            let client = Client::connect_with(&uri, &opts)
                .await
                .with_context(|| format!("connecting to {uri}"))?;
            let map = client
                .map(&context, 0..client.size())
                .await
                .with_context(|| format!("reading {context}"))?;
            if totals {
                let mut sums = std::collections::BTreeMap::<u32, u64>::new();
                for e in &map {
                    *sums.entry(e.flags).or_default() += e.len();
                }
                for (flags, bytes) in sums {
                    let pct = 100.0 * bytes as f64 / client.size().max(1) as f64;
                    println!(
                        "{bytes:>20} {pct:5.1}% {flags:>3} {}",
                        describe(&context, flags)
                    );
                }
            } else if json {
                let rows: Vec<_> = map
                    .iter()
                    .map(|e| serde_json::json!({"offset": e.start, "length": e.len(), "type": e.flags, "description": describe(&context, e.flags)}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for e in &map {
                    println!(
                        "{:>10} {:>10} {:>4}  {}",
                        e.start,
                        e.len(),
                        e.flags,
                        describe(&context, e.flags)
                    );
                }
            }
            client.disconnect().await;
        }
    }
    Ok(())
}
