//! `cbtctl`: the operator's command line.
//!
//! Through a running `cbt-hostd` (Unix socket, or https with a token): every API operation
//! (`instances`, `start-backup`, `jobs`, `watch`, `cancel`, `backups`, `start-restore`,
//! `start-verify` …). Without a daemon: `backup` (QMP), `backup-domain` (libvirt), and on a
//! sink `restore`, `verify`, `list`, `prune`, `gc`; `info` and `map` inspect NBD exports with
//! libcbt's own client; `qmp` sends one raw QMP command.

mod remote;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use libcbt::engine::{self, catalog, BackupOptions, RestoreTarget};
use libcbt::format::BackupId;
use libcbt::job::{self, DiskSpec};
use libcbt::nbd::{self, proto::tflag, Client, ConnectOptions};
use libcbt::qmp::Qmp;
use libcbt::retention::KeepPolicy;
use libcbt::sink::any::{AnySink, OpenOptions, SinkAddress};
use libcbt::source::qemu::{QemuSource, Requested};

#[derive(Parser)]
#[command(name = "cbtctl", version, about = "cbt operator CLI")]
struct Cli {
    #[command(flatten)]
    conn: remote::Conn,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LevelArg {
    Auto,
    Full,
    Incremental,
}

/// Tuning of the copy (the defaults suit most hosts).
#[derive(clap::Args, Clone)]
struct Tuning {
    /// Largest NBD read and stored frame, in bytes: a power of two, 4 KiB..4 MiB.
    #[arg(long, default_value_t = BackupOptions::default().chunk_size)]
    chunk_size: u32,
    /// NBD connections to the export (when it allows several).
    #[arg(long, default_value_t = BackupOptions::default().connections)]
    connections: usize,
    /// Chunks being read, compressed or written at once (bounds memory: about
    /// in-flight × chunk size × 2).
    #[arg(long, default_value_t = BackupOptions::default().in_flight)]
    in_flight: usize,
    /// Bounded chains: a backup that would be the (N+1)-th of its chain becomes a synthetic
    /// full right after it commits (a fold of its chain: metadata only).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_chain: Option<u32>,
}

/// Bounds the chain of each incremental just committed to `max_chain` (see
/// [`engine::bound_chain`]); returns what it did by disk. The backups committed already: a
/// failure is reported and leaves the chain as it was (the next backup bounds it).
async fn bound_chains<S: libcbt::sink::Sink>(
    sink: &S,
    manifests: &[&libcbt::format::Manifest],
    max_chain: Option<u32>,
) -> std::collections::BTreeMap<String, engine::Bounded> {
    let mut out = std::collections::BTreeMap::new();
    let Some(n) = max_chain else {
        return out;
    };
    for m in manifests {
        if m.level != libcbt::format::Level::Incremental {
            continue;
        }
        match engine::bound_chain(sink, &m.disk, &m.backup_id, n as usize).await {
            Ok(Some(b)) => {
                out.insert(m.disk.clone(), b);
            }
            Ok(None) => {}
            Err(e) => eprintln!(
                "warning: {}: the chain was not bounded to {n}: {e:#}",
                m.disk
            ),
        }
    }
    out
}

impl Tuning {
    fn options(&self) -> BackupOptions {
        BackupOptions {
            chunk_size: self.chunk_size,
            connections: self.connections.max(1),
            in_flight: self.in_flight.max(1),
            ..BackupOptions::default()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Remote(remote::Remote),
    /// Back up disks of a running QEMU (through its QMP socket) to a sink directory.
    Backup {
        /// QMP socket of the QEMU (qemu-system or qemu-storage-daemon).
        #[arg(long)]
        qmp: PathBuf,
        /// NODE=DISK: block node name in QEMU, and the disk's id on the sink. Repeat for
        /// several disks; all are frozen at one point in time.
        #[arg(long = "disk", required = true, value_parser = parse_disk)]
        disks: Vec<(String, String)>,
        #[command(flatten)]
        sink: SinkArgs,
        #[arg(long, value_enum, default_value = "auto")]
        level: LevelArg,
        /// Backup id (default: a UTC timestamp and 16 random bits, unique without waiting).
        #[arg(long)]
        id: Option<BackupId>,
        /// Where scratch images and QEMU's NBD socket go (on the QEMU host).
        #[arg(long, default_value = "/var/lib/cbt/work")]
        work_dir: PathBuf,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Back up disks of a libvirt domain (running or shut off) through libvirt checkpoints
    /// and a pull-mode backup job. Disk ids on the sink are `<domain uuid>.<target>`.
    BackupDomain {
        /// Domain name or UUID.
        #[arg(long)]
        domain: String,
        /// Disk targets to back up (`vda` …); default: all.
        #[arg(long = "disk")]
        disks: Vec<String>,
        #[command(flatten)]
        sink: SinkArgs,
        #[arg(long, value_enum, default_value = "auto")]
        level: LevelArg,
        #[arg(long)]
        id: Option<BackupId>,
        /// Freeze the guest's filesystems through qemu-ga for the point in time, at most
        /// this many seconds; without an agent the backup is crash-consistent.
        #[arg(long)]
        quiesce: Option<u64>,
        /// Where scratch images and the NBD socket go; QEMU's user must reach it.
        #[arg(long, default_value = "/var/lib/cbt/scratch")]
        scratch_dir: PathBuf,
        #[arg(long, default_value = libcbt::source::libvirt::DEFAULT_URI)]
        connect: String,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Delete every checkpoint cbt created on a libvirt domain (to hand it over to another
    /// tool); the next cbt backup of it is a full.
    Release {
        #[arg(long)]
        domain: String,
        #[arg(long, default_value = libcbt::source::libvirt::DEFAULT_URI)]
        connect: String,
    },
    /// A libvirt domain's disks and checkpoints.
    Domain {
        #[arg(long)]
        domain: String,
        #[arg(long, default_value = libcbt::source::libvirt::DEFAULT_URI)]
        connect: String,
    },
    /// Restore a backup of a disk to a new raw or qcow2 file, or to an NBD export.
    Restore {
        #[command(flatten)]
        sink: SinkArgs,
        #[arg(long)]
        disk: String,
        /// Backup id (default: the newest).
        #[arg(long)]
        backup: Option<String>,
        /// raw:PATH, qcow2:PATH or an NBD URI.
        #[arg(long)]
        to: String,
    },
    /// Serve a backup of a disk, read-only, as an NBD export on a Unix socket until stopped
    /// (SIGINT or SIGTERM): `qemu-img`, `nbdcopy`, `nbdinfo --map`, `guestmount` or a qcow2
    /// overlay's backing file read it straight from the sink, without a restore. On TCP
    /// (`--listen`, for another host) only with TLS and client certificates.
    Export {
        #[command(flatten)]
        sink: SinkArgs,
        #[arg(long)]
        disk: String,
        /// Backup id (default: the newest).
        #[arg(long)]
        backup: Option<String>,
        /// The Unix socket to create (refused if it exists); removed on exit.
        #[arg(long, required_unless_present = "listen", conflicts_with = "listen")]
        socket: Option<PathBuf>,
        /// A TCP address to listen on instead (needs --tls-cert, --tls-key, --tls-client-ca).
        #[arg(long, requires_all = ["tls_cert", "tls_key", "tls_client_ca"])]
        listen: Option<std::net::SocketAddr>,
        /// TLS certificate chain (PEM): every client must then start TLS.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// CA (PEM) that client certificates must be signed by.
        #[arg(long, requires = "tls_cert")]
        tls_client_ca: Option<PathBuf>,
        /// The export's name (clients may also ask for the default, "").
        #[arg(long, default_value = "")]
        name: String,
        /// Decoded frames kept in memory, in MiB.
        #[arg(long, default_value_t = 64)]
        cache_mib: usize,
    },
    /// Check every manifest, index and frame of a backup's chain.
    Verify {
        #[command(flatten)]
        sink: SinkArgs,
        #[arg(long)]
        disk: String,
        #[arg(long)]
        backup: Option<String>,
    },
    /// Backups on a sink.
    List {
        #[command(flatten)]
        sink: SinkArgs,
        #[arg(long)]
        disk: Option<String>,
    },
    /// Delete the backups of one instance that a keep policy does not keep, and print the
    /// plan: what stays and why, what goes. A kept incremental keeps its whole chain and the
    /// newest backup of every disk stays (the next incremental's parent), so what goes are
    /// whole chains or their tails; children go before their parents.
    Prune {
        #[command(flatten)]
        sink: SinkArgs,
        /// A disk of the instance; all of them, since an instance's disks are kept or
        /// dropped together (or --instance).
        #[arg(long = "disk", required_unless_present = "instance")]
        disks: Vec<String>,
        /// Every disk named `INSTANCE.*` on the sink (libvirt jobs name disks
        /// `<domain uuid>.<target>`).
        #[arg(long, conflicts_with = "disks")]
        instance: Option<String>,
        #[command(flatten)]
        keep: KeepArgs,
        /// Print the plan; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Garbage-collect a sink, safe with backups running anywhere: unfinished uploads and
    /// objects no committed backup references, older than the grace period and not covered
    /// by a live in-progress marker (what a crash or a prune interrupted left behind).
    Gc {
        #[command(flatten)]
        sink: SinkArgs,
        /// Leave anything younger than this (at least six in-progress marker renewals, as
        /// for cbt-hostd's limits.gc_grace_secs).
        #[arg(long, default_value_t = 24 * 3600)]
        grace_secs: u64,
        /// Then compact: copy the live frames of sparse segments into new ones, give the
        /// backups that read them a new generation, delete the old segments (the only data
        /// rewrite). Run it when no prune or max_chain backup of the sink's instances runs.
        #[arg(long)]
        compact: bool,
        /// Live fraction of a segment under which it is rewritten.
        #[arg(long, default_value_t = 0.5, requires = "compact")]
        threshold: f64,
        /// Live bytes copied at most, over all disks, in MiB.
        #[arg(long, default_value_t = 4096, requires = "compact")]
        max_copy_mib: u64,
    },
    /// Send one QMP command and print its result (for operators).
    Qmp {
        socket: PathBuf,
        command: String,
        /// Arguments as a JSON object.
        args: Option<String>,
    },
    /// Size, flags, block sizes and meta contexts of an NBD export.
    Info {
        /// nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH
        uri: String,
    },
    /// The extents of one meta context, in the format of `nbdinfo --map`.
    Map {
        uri: String,
        /// base:allocation, qemu:dirty-bitmap:NAME or qemu:allocation-depth.
        #[arg(long, default_value = nbd::BASE_ALLOCATION)]
        context: String,
        /// Print totals per type instead of every extent.
        #[arg(long)]
        totals: bool,
    },
}

/// A keep policy (proxmox-backup's rules; none given: everything stays).
#[derive(clap::Args, Clone)]
struct KeepArgs {
    /// Keep the N newest backups.
    #[arg(long, default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest backup of each of the N newest hours that have one.
    #[arg(long, default_value_t = 0)]
    keep_hourly: u32,
    /// Keep the newest backup of each of the N newest days that have one.
    #[arg(long, default_value_t = 0)]
    keep_daily: u32,
    /// Keep the newest backup of each of the N newest ISO weeks that have one.
    #[arg(long, default_value_t = 0)]
    keep_weekly: u32,
    /// Keep the newest backup of each of the N newest months that have one.
    #[arg(long, default_value_t = 0)]
    keep_monthly: u32,
    /// Keep the newest backup of each of the N newest years that have one.
    #[arg(long, default_value_t = 0)]
    keep_yearly: u32,
    /// The time zone the calendar rules count in, as seconds east of UTC (e.g. 3600).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-86_399..=86_399))]
    utc_offset_secs: i32,
}

impl KeepArgs {
    fn policy(&self) -> KeepPolicy {
        KeepPolicy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            utc_offset_secs: self.utc_offset_secs,
        }
    }
}

/// Where the backups are: a directory, an S3 bucket or a Swift container.
#[derive(clap::Args)]
struct SinkArgs {
    /// A directory (local or NFS), s3://BUCKET[/PREFIX]?endpoint=URL[&region=R], or
    /// swift://CONTAINER[/PREFIX][?auth_url=URL&user=U&project=P&region=R…] (parameters not
    /// given come from an OpenStack RC file's OS_AUTH_URL, OS_USERNAME, OS_PROJECT_NAME, …).
    #[arg(long = "sink")]
    address: String,
    /// A 0600 credentials file: `access_key = …` and `secret_key = …` for S3 (default:
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or anonymous); `password = …`,
    /// `application_credential_secret = …` or `key = …` for Swift (default: OS_PASSWORD,
    /// OS_APPLICATION_CREDENTIAL_SECRET or ST_KEY).
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// PEM file of a private CA of the object store.
    #[arg(long)]
    ca: Option<PathBuf>,
}

impl SinkArgs {
    async fn open(&self) -> Result<AnySink> {
        let addr = SinkAddress::parse_with(&self.address, |k| std::env::var(k).ok())?;
        let mut opts = OpenOptions {
            credentials_file: self.credentials.clone(),
            ..Default::default()
        };
        if let Some(ca) = &self.ca {
            opts.ca_pem =
                Some(std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?);
        }
        AnySink::open(&addr, &opts)
            .await
            .with_context(|| format!("opening the sink {}", self.address))
    }
}

fn parse_disk(s: &str) -> Result<(String, String), String> {
    let (node, disk) = s.split_once('=').ok_or("expected NODE=DISK")?;
    Ok((node.to_string(), disk.to_string()))
}

async fn newest(sink: &AnySink, disk: &str, backup: Option<String>) -> Result<String> {
    match backup {
        Some(b) => Ok(b),
        None => Ok(catalog::latest(sink, disk)
            .await?
            .with_context(|| format!("no backup of {disk} on the sink"))?
            .backup_id),
    }
}

fn requested(level: LevelArg) -> Requested {
    match level {
        LevelArg::Auto => Requested::Auto,
        LevelArg::Full => Requested::Full,
        LevelArg::Incremental => Requested::Incremental,
    }
}

fn print_disk(m: &libcbt::format::Manifest, seconds: f64) {
    println!(
        "  {:<16} {:<11} {:<20} scanned {:>9.1} MiB  data {:>9.1} MiB  zero {:>8.1} MiB  stored {:>9.1} MiB  {:.2}s",
        m.disk,
        format!("{:?}", m.level).to_lowercase(),
        m.full_reason.map(|r| format!("{r:?}")).unwrap_or_default(),
        mib(m.stats.bytes_scanned),
        mib(m.stats.bytes_data),
        mib(m.stats.bytes_zero),
        mib(m.stats.bytes_stored),
        seconds
    );
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 20)
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

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    cli.conn.refuse_token_in_argv()?;
    // CBT_LOG=debug shows what the library does, with timestamps, on stderr.
    if let Ok(f) = tracing_subscriber::EnvFilter::try_from_env("CBT_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(f)
            .with_writer(std::io::stderr)
            .init();
    }
    let json = cli.conn.json;
    match cli.command {
        Command::Remote(r) => remote::run(&cli.conn, r).await?,
        Command::Backup {
            qmp,
            disks,
            sink,
            level,
            id,
            work_dir,
            tuning,
        } => {
            let sink = sink.open().await?;
            let q = Arc::new(
                Qmp::connect(&qmp)
                    .await
                    .with_context(|| format!("connecting to QMP at {}", qmp.display()))?,
            );
            let source = QemuSource::new(q, &work_dir).await?;
            let specs: Vec<DiskSpec> = disks
                .into_iter()
                .map(|(node, disk)| DiskSpec { node, disk })
                .collect();
            let requested = requested(level);
            let id = id.unwrap_or_else(BackupId::generate);
            let t = Instant::now();
            let result =
                job::backup_qemu(&source, &sink, &id, &specs, requested, &tuning.options()).await;
            source.close().await?;
            let results = result?;
            let ms: Vec<_> = results.iter().map(|r| &r.manifest).collect();
            let bounded = bound_chains(&sink, &ms, tuning.max_chain).await;
            if json {
                let v: Vec<_> = results
                    .iter()
                    .map(|r| {
                        serde_json::json!({"manifest": r.manifest, "seconds": r.seconds,
                                                "synthetic_full": bounded.get(&r.manifest.disk)})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("backup {id} in {:.2}s", t.elapsed().as_secs_f64());
                for r in &results {
                    print_disk(&r.manifest, r.seconds);
                    if let Some(b) = bounded.get(&r.manifest.disk) {
                        println!("    now a synthetic full of its chain of {}", b.depth + 1);
                    }
                }
            }
        }
        Command::BackupDomain {
            domain,
            disks,
            sink,
            level,
            id,
            quiesce,
            scratch_dir,
            connect,
            tuning,
        } => {
            use libcbt::source::libvirt::{blocking, LibvirtSource};
            let sink = sink.open().await?;
            let src = blocking(move || LibvirtSource::connect(&connect)).await?;
            let id = id.unwrap_or_else(BackupId::generate);
            let job = job::LibvirtJob {
                domain,
                backup_id: id.clone(),
                disks: (!disks.is_empty()).then_some(disks),
                requested: requested(level),
                quiesce: quiesce.map(std::time::Duration::from_secs),
                scratch_root: scratch_dir,
                observer: None,
                group: None,
            };
            let t = Instant::now();
            let r = job::backup_libvirt(&src, &sink, &job, &tuning.options()).await?;
            let ms: Vec<_> = r.disks.iter().map(|d| &d.manifest).collect();
            let bounded = bound_chains(&sink, &ms, tuning.max_chain).await;
            if json {
                let v: Vec<_> = r
                    .disks
                    .iter()
                    .map(|d| {
                        serde_json::json!({"manifest": d.manifest, "seconds": d.seconds,
                                                "synthetic_full": bounded.get(&d.manifest.disk)})
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "backup_id": id,
                        "domain_uuid": r.domain_uuid,
                        "checkpoint": r.checkpoint,
                        "quiesce": r.quiesce,
                        "started_paused": r.started_paused,
                        "disks": v,
                    }))?
                );
            } else {
                println!(
                    "backup {id} of {} in {:.2}s ({:?}{})",
                    r.domain_uuid,
                    t.elapsed().as_secs_f64(),
                    r.quiesce
                        .consistency
                        .unwrap_or(libcbt::format::Consistency::Crash),
                    r.quiesce
                        .freeze_ms
                        .map(|m| format!(", frozen {m} ms"))
                        .unwrap_or_default()
                );
                if let Some(w) = &r.quiesce.warning {
                    println!("  warning: {w}");
                }
                for d in &r.disks {
                    print_disk(&d.manifest, d.seconds);
                    if let Some(b) = bounded.get(&d.manifest.disk) {
                        println!("    now a synthetic full of its chain of {}", b.depth + 1);
                    }
                }
            }
        }
        Command::Release { domain, connect } => {
            use libcbt::source::libvirt::{blocking, LibvirtSource};
            let gone =
                blocking(move || LibvirtSource::connect(&connect)?.domain(&domain)?.release())
                    .await?;
            println!("deleted checkpoints: {}", gone.join(" "));
        }
        Command::Domain { domain, connect } => {
            use libcbt::source::libvirt::{blocking, LibvirtSource};
            let v = blocking(move || {
                let src = LibvirtSource::connect(&connect)?;
                let d = src.domain(&domain)?;
                Ok(serde_json::json!({
                    "domain": d.describe()?,
                    "active": d.is_active()?,
                    "checkpoints": d.checkpoints()?,
                }))
            })
            .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Command::Restore {
            sink,
            disk,
            backup,
            to,
        } => {
            let sink = sink.open().await?;
            let backup = newest(&sink, &disk, backup).await?;
            let target = if let Some(p) = to.strip_prefix("raw:") {
                RestoreTarget::RawFile(p.into())
            } else if let Some(p) = to.strip_prefix("qcow2:") {
                RestoreTarget::Qcow2(p.into())
            } else if to.starts_with("nbd") {
                RestoreTarget::Nbd(to.clone())
            } else {
                bail!("--to takes raw:PATH, qcow2:PATH or an NBD URI");
            };
            let t = Instant::now();
            let st = engine::restore(&sink, &disk, &backup, &target, None).await?;
            println!(
                "restored {disk} {backup} (chain of {}) to {to}: {:.1} MiB written, {:.1} MiB zero, {} frames, {:.2}s",
                st.chain_len,
                mib(st.bytes_written),
                mib(st.bytes_zero),
                st.frames_read,
                t.elapsed().as_secs_f64()
            );
        }
        Command::Export {
            sink,
            disk,
            backup,
            socket,
            listen,
            tls_cert,
            tls_key,
            tls_client_ca,
            name,
            cache_mib,
        } => {
            let tls = match (&tls_cert, &tls_key) {
                (Some(c), Some(k)) => Some(
                    nbd::server::tls_config(c, k, tls_client_ca.as_deref())
                        .map_err(anyhow::Error::msg)?,
                ),
                _ => None,
            };
            let sink = sink.open().await?;
            let backup = newest(&sink, &disk, backup).await?;
            let export = engine::export::BackupExport::open(
                sink,
                &disk,
                &backup,
                cache_mib.saturating_mul(1 << 20),
            )
            .await?;
            let size = export.size();
            let chain = export.chain_len();
            let export = Arc::new(export);
            let scheme = if tls.is_some() { "nbds" } else { "nbd" };
            let opts = Arc::new(nbd::server::ServerOptions {
                name: name.clone(),
                description: format!("cbt backup {backup} of {disk}"),
                tls,
                ..Default::default()
            });
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            // Bound before anything can fail: only a socket made here is removed at the end.
            enum Bound {
                Unix(tokio::net::UnixListener, PathBuf),
                Tcp(tokio::net::TcpListener),
            }
            let bound = match (&socket, listen) {
                (Some(socket), _) => Bound::Unix(
                    tokio::net::UnixListener::bind(socket)
                        .with_context(|| format!("binding {}", socket.display()))?,
                    socket.clone(),
                ),
                (None, Some(addr)) => Bound::Tcp(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding {addr}"))?,
                ),
                (None, None) => anyhow::bail!("--socket or --listen"),
            };
            let at = match &bound {
                Bound::Unix(_, p) => format!("{scheme}+unix:///{name}?socket={}", p.display()),
                Bound::Tcp(l) => format!("{scheme}://{}/{name}", l.local_addr()?),
            };
            eprintln!("serving {disk} {backup} (chain of {chain}, {size} bytes) read-only at {at}");
            let made = match &bound {
                Bound::Unix(_, p) => Some(p.clone()),
                Bound::Tcp(_) => None,
            };
            let serving = async {
                match bound {
                    Bound::Unix(l, _) => nbd::server::serve_unix(l, export.clone(), opts).await,
                    Bound::Tcp(l) => nbd::server::serve_tcp(l, export.clone(), opts).await,
                }
            };
            let served = tokio::select! {
                r = serving => r.map_err(anyhow::Error::from),
                _ = tokio::signal::ctrl_c() => Ok(()),
                _ = term.recv() => Ok(()),
            };
            if let Some(p) = made {
                let _ = std::fs::remove_file(p);
            }
            let st = export.stats();
            eprintln!(
                "stopped: {} frames read in {} sink reads, {} from the cache, {} from another request's read",
                st.frames_read, st.sink_reads, st.cache_hits, st.shared
            );
            served?;
        }
        Command::Verify { sink, disk, backup } => {
            let sink = sink.open().await?;
            let backup = newest(&sink, &disk, backup).await?;
            let r = engine::verify_chain(&sink, &disk, &backup).await?;
            if json {
                let problems: Vec<String> = r.problems.iter().map(ToString::to_string).collect();
                println!(
                    "{}",
                    serde_json::json!({"backups": r.backups, "frames": r.frames, "bytes": r.bytes, "problems": problems})
                );
            } else {
                println!(
                    "verified {disk} {backup}: {} backups, {} frames, {:.1} MiB",
                    r.backups,
                    r.frames,
                    mib(r.bytes)
                );
                for p in &r.problems {
                    println!("  PROBLEM {p}");
                }
            }
            if !r.ok() {
                std::process::exit(1);
            }
        }
        Command::List { sink, disk } => {
            let sink = sink.open().await?;
            let disks = match disk {
                Some(d) => vec![d],
                None => catalog::list_disks(&sink).await?,
            };
            let mut all = Vec::new();
            for d in disks {
                all.extend(catalog::list_backups(&sink, &d).await?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                for m in &all {
                    println!(
                        "{:<16} {:<18} {:<11} parent {:<18} stored {:>9.1} MiB  {}",
                        m.disk,
                        m.backup_id,
                        format!("{:?}", m.level).to_lowercase(),
                        m.parent.as_deref().unwrap_or("-"),
                        mib(m.stats.bytes_stored),
                        m.full_reason
                            .map(|r| format!("full: {r:?}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        Command::Prune {
            sink,
            disks,
            instance,
            keep,
            dry_run,
        } => {
            let sink = sink.open().await?;
            let disks = match &instance {
                Some(i) => {
                    let d = catalog::instance_disks(&sink, i).await?;
                    if d.is_empty() {
                        bail!("no disk of instance {i} on the sink");
                    }
                    d
                }
                None => disks,
            };
            let policy = keep.policy();
            if policy.keeps_all() {
                eprintln!("the policy has no rule: everything stays");
            }
            let plan = engine::plan_prune(&sink, &disks, &policy).await?;
            if instance.is_none() {
                if let Some(d) = disks
                    .iter()
                    .find(|d| !plan.iter().any(|e| e.disks.contains(d)))
                {
                    bail!("no backup of disk {d} on the sink");
                }
            }
            let report = if dry_run {
                engine::PruneReport::default()
            } else {
                engine::prune(&sink, &plan, instance.as_deref()).await?
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"disks": disks, "dry_run": dry_run, "plan": plan,
                                       "deleted": report.deleted, "objects": report.objects,
                                       "folds": report.folds,
                                       "bytes_reclaimed": report.bytes_reclaimed,
                                       "index_bytes_read": report.index_bytes_read,
                                       "index_bytes_written": report.index_bytes_written})
                );
            } else {
                for e in &plan {
                    let into = if e.folds_into.is_empty() {
                        String::new()
                    } else {
                        format!(", folded into {}", e.folds_into.join(", "))
                    };
                    let why = match &e.hold {
                        None if dry_run => format!("would go{into}"),
                        None => format!("deleted{into}"),
                        Some(engine::Hold::Kept(r)) => format!(
                            "kept: {}",
                            serde_json::to_value(r)?.as_str().unwrap_or_default()
                        ),
                        Some(engine::Hold::Newest) => "kept: newest of a disk".to_string(),
                        Some(engine::Hold::Spared) => "kept".to_string(),
                        Some(engine::Hold::Locked(t)) => format!(
                            "kept: locked until {}",
                            chrono::DateTime::from_timestamp_millis(*t as i64)
                                .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                                .unwrap_or_default()
                        ),
                    };
                    println!(
                        "{:<18} {} {:>2} disk(s)  {why}",
                        e.id,
                        chrono::DateTime::from_timestamp_millis(e.finished_unix_ms as i64)
                            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                            .unwrap_or_default(),
                        e.disks.len()
                    );
                }
                if !dry_run {
                    println!(
                        "pruned {} backups ({} objects, {} bytes reclaimed, {} folds writing {} index bytes)",
                        report.deleted.len(),
                        report.objects,
                        report.bytes_reclaimed,
                        report.folds,
                        report.index_bytes_written
                    );
                }
            }
        }
        Command::Gc {
            sink,
            grace_secs,
            compact,
            threshold,
            max_copy_mib,
        } => {
            let min = 6 * engine::MARKER_REFRESH.as_secs();
            if grace_secs < min {
                bail!("--grace-secs must be at least {min} (six in-progress marker renewals)");
            }
            let sink = sink.open().await?;
            let r =
                catalog::collect_sink_garbage(&sink, std::time::Duration::from_secs(grace_secs))
                    .await?;
            let mut compacted = Vec::new();
            if compact {
                let mut left = max_copy_mib.saturating_mul(1 << 20);
                for d in catalog::list_disks(&sink).await? {
                    let opts = engine::CompactOptions {
                        threshold,
                        max_bytes: left,
                        ..Default::default()
                    };
                    let c = engine::compact(&sink, &d, &opts).await?;
                    left = left.saturating_sub(c.bytes_copied);
                    compacted.push((d, c));
                }
            }
            if json {
                let mut v = serde_json::to_value(&r)?;
                if compact {
                    v["compaction"] = compacted
                        .iter()
                        .map(|(d, c)| Ok((d.clone(), serde_json::to_value(c)?)))
                        .collect::<Result<serde_json::Map<_, _>>>()?
                        .into();
                }
                println!("{v}");
            } else {
                println!(
                    "removed {} unfinished uploads and {} unreferenced objects ({} bytes)",
                    r.partials,
                    r.objects.len(),
                    r.bytes
                );
                for (d, c) in &compacted {
                    println!(
                        "compacted {d}: {} sparse segments into {} ({} bytes copied, {} reclaimed, {} backups rewritten, {} left)",
                        c.segments_rewritten,
                        c.segments_written,
                        c.bytes_copied,
                        c.bytes_reclaimed,
                        c.backups_rewritten,
                        c.segments_left
                    );
                }
            }
        }
        Command::Qmp {
            socket,
            command,
            args,
        } => {
            let q = Qmp::connect(&socket)
                .await
                .with_context(|| format!("connecting to {}", socket.display()))?;
            let args: serde_json::Value = match args {
                Some(a) => serde_json::from_str(&a).context("arguments must be a JSON object")?,
                None => serde_json::Value::Null,
            };
            let v = q.execute_value(&command, args).await?;
            match v {
                serde_json::Value::String(s) => print!("{s}"),
                v => println!("{}", serde_json::to_string_pretty(&v)?),
            }
        }
        Command::Info { uri } => {
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
