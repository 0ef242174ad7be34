//! `cbtctl` commands that go through a running `cbt-hostd` (its Unix socket, or a remote
//! URL over TLS with a token).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hostd::client::{Client, Endpoint};
use serde_json::{json, Value};

#[derive(Args, Clone)]
pub struct Conn {
    /// The daemon: its Unix socket path, or https://HOST:PORT.
    #[arg(
        long,
        global = true,
        env = "CBT_HOSTD",
        default_value = "/run/cbt/hostd.sock"
    )]
    pub hostd: String,
    /// The controller (workload commands): its Unix socket path, or https://HOST:PORT.
    #[arg(
        long,
        global = true,
        env = "CBT_CONTROLLER",
        default_value = "/run/cbt/controller.sock"
    )]
    pub controller: String,
    /// Refused: a token on the command line is readable by every local user. The token
    /// comes from the CBT_TOKEN environment variable or --token-file.
    #[arg(long = "token", global = true, hide = true, value_name = "REFUSED")]
    pub token_in_argv: Option<String>,
    /// File holding the bearer token (one line); without it, the CBT_TOKEN environment
    /// variable.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) of the daemon's TLS certificate, for https.
    #[arg(long, global = true, env = "CBT_CA")]
    pub ca: Option<PathBuf>,
    /// Print the daemon's JSON instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Args, Clone)]
pub struct HoldArgs {
    /// Members (name or UUID), repeatable.
    #[arg(long = "instance", required = true)]
    instances: Vec<String>,
    /// freeze (filesystems through qemu-ga: application-consistent) or pause (an exact
    /// crash-consistent cut).
    #[arg(long, default_value = "freeze")]
    mode: String,
    /// The daemon releases the group by itself after this long.
    #[arg(long, default_value_t = 10)]
    hold_timeout: u64,
    /// The group's id (default: the daemon picks one).
    #[arg(long)]
    id: Option<String>,
}

impl HoldArgs {
    fn body(&self) -> Value {
        let mut b = json!({"instances": self.instances, "mode": self.mode,
                           "hold_timeout_secs": self.hold_timeout});
        if let Some(id) = &self.id {
            b["id"] = json!(id);
        }
        b
    }
}

fn print_group(g: &Value) {
    println!(
        "group {} {} {} skew={}",
        g["id"].as_str().unwrap_or(""),
        g["mode"].as_str().unwrap_or(""),
        g["state"].as_str().unwrap_or(""),
        g["point_in_time_skew_ms"]
            .as_u64()
            .map_or("-".into(), |s| format!("{s} ms"))
    );
    for m in g["members"].as_array().into_iter().flatten() {
        println!(
            "  {:<24} held={:<5} hold={} job={} {}",
            m["name"].as_str().unwrap_or(""),
            m["held"].as_bool().unwrap_or(false),
            m["hold_ms"]
                .as_u64()
                .map_or("-".into(), |s| format!("{s} ms")),
            m["job"].as_str().unwrap_or("-"),
            m["error"].as_str().unwrap_or("")
        );
    }
}

#[derive(Subcommand, Clone)]
pub enum Remote {
    /// Instances on the host that the token may see.
    Instances,
    /// One instance: disks, checkpoints, last backup per disk and sink.
    Instance { id: String },
    /// Start a backup; with --wait, follow it to the end.
    StartBackup {
        #[arg(long)]
        instance: String,
        #[arg(long)]
        sink: String,
        /// Disk targets (default: all).
        #[arg(long = "disk")]
        disks: Vec<String>,
        #[arg(long, default_value = "auto")]
        level: String,
        /// Freeze the guest's filesystems through qemu-ga for the point in time.
        #[arg(long)]
        quiesce: bool,
        #[arg(long)]
        quiesce_timeout: Option<u64>,
        /// KEY=VALUE, repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long)]
        backup_id: Option<String>,
        #[arg(long)]
        wait: bool,
    },
    /// A consistency-group backup of several instances in one step: hold them all (freeze
    /// their filesystems, or pause them), take every point in time, release, then copy.
    GroupBackup {
        #[command(flatten)]
        hold: HoldArgs,
        #[arg(long)]
        sink: String,
        #[arg(long, default_value = "auto")]
        level: String,
        /// KEY=VALUE, repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long)]
        backup_id: Option<String>,
        /// Follow the members' copies to their end.
        #[arg(long)]
        wait: bool,
    },
    /// Step 1 of a group backup (for orchestrators): hold the instances until released or
    /// the deadline.
    GroupHold {
        #[command(flatten)]
        hold: HoldArgs,
    },
    /// Step 2: each member's point in time, while held (the copies run after).
    GroupBackups {
        id: String,
        #[arg(long)]
        sink: String,
        #[arg(long, default_value = "auto")]
        level: String,
        #[arg(long)]
        backup_id: Option<String>,
    },
    /// Step 3: thaw or resume every member.
    GroupRelease { id: String },
    /// Consistency groups of this daemon's life.
    Groups,
    /// One consistency group.
    Group { id: String },
    /// Workloads the token may see (controller).
    Workloads,
    /// Create a workload: a named set of instances backed up together (controller).
    WorkloadCreate {
        #[arg(long)]
        name: String,
        /// Members (name or UUID), repeatable; found on whichever host runs them.
        #[arg(long = "instance", required = true)]
        instances: Vec<String>,
        /// none, crash (paused together) or application (frozen together through qemu-ga).
        #[arg(long, default_value = "application")]
        consistency: String,
        #[arg(long)]
        sink: String,
        #[arg(long, default_value_t = 10)]
        hold_timeout: u64,
        #[arg(long, default_value = "auto")]
        level: String,
        /// An admin names the workload's tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Run a workload now: one snapshot of all its members (controller).
    WorkloadRun {
        id: String,
        /// Follow the run to its end.
        #[arg(long)]
        wait: bool,
    },
    /// A workload's snapshots, from their records on the sink (controller).
    Snapshots { id: String },
    /// Restore a workload snapshot into staging copies `<member>-<suffix>` (controller).
    WorkloadRestore {
        id: String,
        snapshot: String,
        #[arg(long, default_value = "staging")]
        suffix: String,
        /// Only these members (repeatable); default: all.
        #[arg(long = "member")]
        members: Vec<String>,
        /// Define the copies without starting them.
        #[arg(long)]
        no_start: bool,
    },
    /// The controller's hosts and whether their daemons answer (admin).
    Hosts,
    /// Jobs (newest first).
    Jobs,
    /// One job's status.
    Job { id: String },
    /// Follow a job to its end (progress bar on a terminal).
    Watch { id: String },
    /// Ask a job to stop; it rolls back.
    Cancel { id: String },
    /// Backups on a sink.
    Backups {
        #[arg(long)]
        sink: String,
        #[arg(long)]
        instance: Option<String>,
    },
    /// One backup.
    ShowBackup {
        #[arg(long)]
        sink: String,
        #[arg(long)]
        instance: String,
        backup_id: String,
    },
    /// Delete a backup no incremental depends on.
    DeleteBackup {
        #[arg(long)]
        sink: String,
        #[arg(long)]
        instance: String,
        backup_id: String,
    },
    /// Prune an instance's backups on a sink by keep rules (as `cbtctl prune`, through the
    /// daemon, which keeps the instance's backups from starting meanwhile).
    PruneBackups {
        #[arg(long)]
        sink: String,
        #[arg(long)]
        instance: String,
        #[command(flatten)]
        keep: super::KeepArgs,
        /// Answer the plan; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the prune's job and return; follow it with `watch`, stop it with `cancel`.
        #[arg(long, conflicts_with = "dry_run")]
        background: bool,
    },
    /// Collect a sink's garbage through the daemon (admin; as `cbtctl gc`), then with
    /// --compact rewrite the sparse segments of idle instances' disks.
    CollectGarbage {
        #[arg(long)]
        sink: String,
        /// Leave anything younger (default: the daemon's limits.gc_grace_secs).
        #[arg(long)]
        grace_secs: Option<u64>,
        #[arg(long)]
        compact: bool,
        /// Live fraction of a segment under which it is rewritten (0.5).
        #[arg(long, requires = "compact")]
        threshold: Option<f64>,
        /// Live bytes copied at most, over all disks, in MiB (4096).
        #[arg(long, requires = "compact")]
        max_copy_mib: Option<u64>,
        /// Print the job and return.
        #[arg(long)]
        background: bool,
    },
    /// Restore to a file, an NBD export, or a new (staging) domain.
    StartRestore {
        #[arg(long)]
        sink: String,
        #[arg(long)]
        instance: String,
        #[arg(long)]
        backup_id: String,
        #[arg(long)]
        disk: Option<String>,
        /// A new file in one of the daemon's restore directories.
        #[arg(long, conflicts_with_all = ["to_nbd", "to_domain"])]
        to_file: Option<PathBuf>,
        #[arg(long, default_value = "raw")]
        format: String,
        #[arg(long, conflicts_with = "to_domain")]
        to_nbd: Option<String>,
        /// Name of a new domain defined from the backed-up domain XML.
        #[arg(long)]
        to_domain: Option<String>,
        /// Start the new domain.
        #[arg(long)]
        start: bool,
        /// Boot the new domain from the backup at once, copying nothing: its disks are qcow2
        /// overlays on a mount of the backup (released with `umount`).
        #[arg(long, requires = "to_domain", conflicts_with = "live")]
        instant: bool,
        /// Boot the new domain from the backup at once and copy its disks underneath (live
        /// restore); the job ends, and the mount goes, when the copy is done.
        #[arg(long, requires = "to_domain")]
        live: bool,
        /// The live copy's speed limit, MiB/s per disk.
        #[arg(long, requires = "live")]
        bandwidth_mib: Option<u64>,
        #[arg(long)]
        wait: bool,
    },
    /// Verify a backup's chain on the sink.
    StartVerify {
        #[arg(long)]
        sink: String,
        #[arg(long)]
        instance: String,
        #[arg(long)]
        backup_id: String,
        #[arg(long)]
        wait: bool,
    },
    /// Serve a backup's disks read-only over NBD through the daemon (admin); prints each
    /// disk's nbd+unix URI.
    Mount {
        #[arg(long)]
        sink: String,
        #[arg(long)]
        instance: String,
        #[arg(long)]
        backup_id: String,
        /// Disk targets (default: all).
        #[arg(long = "disk")]
        disks: Vec<String>,
    },
    /// Live mounts.
    Mounts,
    /// Stop a mount: its sockets go, open connections end.
    Umount { id: String },
}

impl Conn {
    /// `--token VALUE` is an error, whatever the command.
    pub fn refuse_token_in_argv(&self) -> Result<()> {
        if self.token_in_argv.is_some() {
            bail!(
                "--token is refused: a token on the command line is readable by every local \
                 user (/proc/<pid>/cmdline); put it in the CBT_TOKEN environment variable or \
                 in a file named by --token-file"
            );
        }
        Ok(())
    }

    /// The bearer token: from `--token-file`, else `CBT_TOKEN`; never from argv, where
    /// every local user could read it in `/proc/<pid>/cmdline`.
    pub fn token(&self) -> Result<Option<String>> {
        self.refuse_token_in_argv()?;
        if let Some(f) = &self.token_file {
            let file =
                std::fs::File::open(f).with_context(|| format!("--token-file {}", f.display()))?;
            return Ok(Some(
                hostd::config::read_token(file)
                    .with_context(|| format!("--token-file {}", f.display()))?,
            ));
        }
        match std::env::var("CBT_TOKEN") {
            Ok(t) if !t.is_empty() => Ok(Some(t)),
            Ok(_) => Ok(None),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => bail!("CBT_TOKEN is not UTF-8"),
        }
    }
}

fn client(c: &Conn) -> Result<Client> {
    Ok(Client::new(
        Endpoint::parse(&c.hostd, c.ca.clone())?,
        c.token()?,
    ))
}

/// Follows a controller run to its end (its phases on stderr with `verbose`).
async fn wait_run(ccl: &Client, rid: &str, verbose: bool) -> Result<Value> {
    let mut last_phase = String::new();
    loop {
        let v = call(ccl, "GET", &format!("/v1/runs/{}", enc(rid)), None).await?;
        let r = v["run"].clone();
        if r["state"] != "running" {
            return Ok(r);
        }
        let phase = r["detail"]["phase"].as_str().unwrap_or("").to_string();
        if phase != last_phase && verbose {
            eprintln!("run {rid}: {phase}");
            last_phase = phase;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// A client of the controller.
fn controller(c: &Conn) -> Result<Client> {
    Ok(Client::new(
        Endpoint::parse(&c.controller, c.ca.clone())?,
        c.token()?,
    ))
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn call(cl: &Client, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let r = cl
        .call(method, path, body.as_ref())
        .await
        .with_context(|| format!("{method} {path}"))?;
    let v = r.json();
    if r.status >= 400 {
        let m = v["error"]["message"].as_str().unwrap_or("").to_string();
        bail!(
            "{} {}: {m}",
            r.status,
            v["error"]["code"].as_str().unwrap_or("error")
        );
    }
    Ok(v)
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

fn print_job(s: &Value) {
    println!(
        "job {} {} {} ({}) backup {} on {}",
        s["id"].as_str().unwrap_or(""),
        s["kind"].as_str().unwrap_or(""),
        s["state"].as_str().unwrap_or(""),
        s["phase"].as_str().unwrap_or(""),
        s["backup_id"].as_str().unwrap_or(""),
        s["sink"].as_str().unwrap_or("")
    );
    if let Some(d) = s["disks"].as_object() {
        for (k, v) in d {
            println!(
                "  {k}: {} {} {:.1}/{:.1} MiB",
                v["level"].as_str().unwrap_or("-"),
                v["full_reason"].as_str().unwrap_or(""),
                mib(v["done"].as_u64().unwrap_or(0)),
                mib(v["total"].as_u64().unwrap_or(0))
            );
        }
    }
    if let Some(e) = s["error"].as_str() {
        println!("  error: {e}");
    }
    for w in s["warnings"].as_array().into_iter().flatten() {
        println!("  warning: {}", w.as_str().unwrap_or(""));
    }
}

/// Follows a job's event stream to its end; returns its final status.
async fn watch(cl: &Client, id: &str, json: bool) -> Result<Value> {
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg:30} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut last = Value::Null;
    let mut last_phase = String::new();
    let mut stepped = false;
    let status = cl
        .events(&format!("/v1/jobs/{}/events", enc(id)), |s| {
            let phase = s["phase"].as_str().unwrap_or("").to_string();
            if let Some(b) = &bar {
                // A prune or a collection counts steps, not bytes.
                if let Some(n) = s["steps_total"].as_u64() {
                    if !stepped {
                        stepped = true;
                        b.set_style(
                            indicatif::ProgressStyle::with_template(
                                "{spinner} {msg:30} [{bar:30}] {pos}/{len} steps",
                            )
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                        );
                    }
                    b.set_length(n);
                    b.set_position(s["steps_done"].as_u64().unwrap_or(0));
                } else {
                    b.set_length(s["bytes_total"].as_u64().unwrap_or(0));
                    b.set_position(s["bytes_done"].as_u64().unwrap_or(0));
                }
                b.set_message(phase.clone());
            } else if !json && phase != last_phase {
                eprintln!("{}: {phase}", s["id"].as_str().unwrap_or(""));
            }
            last_phase = phase;
            last = s;
            true
        })
        .await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if status != 200 {
        bail!("following job {id}: HTTP {status}");
    }
    Ok(last)
}

async fn started(cl: &Client, c: &Conn, v: Value, wait: bool) -> Result<()> {
    let id = v["job"]["id"].as_str().unwrap_or("").to_string();
    if !wait {
        if c.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("job {id} started");
        }
        return Ok(());
    }
    let s = watch(cl, &id, c.json).await?;
    if c.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print_job(&s);
    }
    if s["state"] != "succeeded" {
        bail!("job {id} {}", s["state"].as_str().unwrap_or("ended"));
    }
    Ok(())
}

/// A job the daemon started (its 202 answer `v`): with `background`, prints it and answers
/// `None`; else follows it to its end and answers its result, or fails as it did.
async fn ran(cl: &Client, c: &Conn, v: Value, background: bool) -> Result<Option<Value>> {
    let id = v["job"]["id"].as_str().unwrap_or("").to_string();
    if background {
        if c.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("job {id} started");
        }
        return Ok(None);
    }
    let s = watch(cl, &id, c.json).await?;
    if s["state"] != "succeeded" {
        bail!(
            "job {id} {}: {}",
            s["state"].as_str().unwrap_or("ended"),
            s["error"].as_str().unwrap_or("")
        );
    }
    let mut r = s["result"].clone();
    r["job"] = json!(id);
    Ok(Some(r))
}

/// A time in ms since the epoch, as RFC 3339.
fn chrono_ms(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}

pub async fn run(c: &Conn, cmd: Remote) -> Result<()> {
    let cl = client(c)?;
    let show = |v: &Value| -> Result<()> {
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(())
    };
    match cmd {
        Remote::Instances => {
            let v = call(&cl, "GET", "/v1/instances", None).await?;
            if c.json {
                return show(&v);
            }
            for i in v["instances"].as_array().into_iter().flatten() {
                println!(
                    "{:<30} {} {:<8} tenant={} disks={}",
                    i["name"].as_str().unwrap_or(""),
                    i["uuid"].as_str().unwrap_or(""),
                    if i["active"].as_bool() == Some(true) {
                        "running"
                    } else {
                        "off"
                    },
                    i["tenant"].as_str().unwrap_or("-"),
                    i["disks"].as_array().map_or(0, Vec::len)
                );
            }
        }
        Remote::Instance { id } => {
            show(&call(&cl, "GET", &format!("/v1/instances/{}", enc(&id)), None).await?)?
        }
        Remote::StartBackup {
            instance,
            sink,
            disks,
            level,
            quiesce,
            quiesce_timeout,
            labels,
            backup_id,
            wait,
        } => {
            let mut l = serde_json::Map::new();
            for kv in labels {
                let (k, v) = kv.split_once('=').context("--label takes KEY=VALUE")?;
                l.insert(k.into(), json!(v));
            }
            let mut body = json!({"instance": instance, "sink": sink, "level": level,
                                  "quiesce": quiesce, "labels": l});
            if !disks.is_empty() {
                body["disks"] = json!(disks);
            }
            if let Some(t) = quiesce_timeout {
                body["quiesce_timeout_secs"] = json!(t);
            }
            if let Some(b) = backup_id {
                body["backup_id"] = json!(b);
            }
            let v = call(&cl, "POST", "/v1/backups", Some(body)).await?;
            started(&cl, c, v, wait).await?;
        }
        Remote::GroupBackup {
            hold,
            sink,
            level,
            labels,
            backup_id,
            wait,
        } => {
            let mut l = serde_json::Map::new();
            for kv in labels {
                let (k, v) = kv.split_once('=').context("--label takes KEY=VALUE")?;
                l.insert(k.into(), json!(v));
            }
            let g = call(&cl, "POST", "/v1/groups", Some(hold.body())).await?;
            let id = g["group"]["id"].as_str().unwrap_or("").to_string();
            let path = format!("/v1/groups/{}", enc(&id));
            let mut body = json!({"sink": sink, "level": level, "labels": l});
            if let Some(b) = backup_id {
                body["backup_id"] = json!(b);
            }
            // Released whatever the points in time did.
            let pits = call(&cl, "POST", &format!("{path}/backups"), Some(body)).await;
            let released = call(&cl, "POST", &format!("{path}/release"), None).await?;
            let pits = pits?;
            if c.json {
                show(&json!({"points_in_time": pits, "released": released}))?;
            } else {
                print_group(&released["group"]);
            }
            if pits["complete"] != true {
                bail!("group {id}: not every member took its point in time");
            }
            if wait {
                let mut failed = Vec::new();
                for j in pits["jobs"].as_array().into_iter().flatten() {
                    let jid = j["job"].as_str().unwrap_or("");
                    let s = watch(&cl, jid, c.json).await?;
                    if c.json {
                        show(&s)?;
                    } else {
                        print_job(&s);
                    }
                    if s["state"] != "succeeded" {
                        failed.push(jid.to_string());
                    }
                }
                if !failed.is_empty() {
                    bail!("group {id}: jobs {} did not succeed", failed.join(", "));
                }
            }
        }
        Remote::GroupHold { hold } => {
            let v = call(&cl, "POST", "/v1/groups", Some(hold.body())).await?;
            if c.json {
                return show(&v);
            }
            print_group(&v["group"]);
        }
        Remote::GroupBackups {
            id,
            sink,
            level,
            backup_id,
        } => {
            let mut body = json!({"sink": sink, "level": level});
            if let Some(b) = backup_id {
                body["backup_id"] = json!(b);
            }
            let p = format!("/v1/groups/{}/backups", enc(&id));
            let v = call(&cl, "POST", &p, Some(body)).await?;
            if c.json {
                return show(&v);
            }
            print_group(&v["group"]);
            if v["complete"] != true {
                bail!("group {id}: not every member took its point in time");
            }
        }
        Remote::GroupRelease { id } => {
            let p = format!("/v1/groups/{}/release", enc(&id));
            let v = call(&cl, "POST", &p, None).await?;
            if c.json {
                return show(&v);
            }
            print_group(&v["group"]);
        }
        Remote::Groups => {
            let v = call(&cl, "GET", "/v1/groups", None).await?;
            if c.json {
                return show(&v);
            }
            for g in v["groups"].as_array().into_iter().flatten() {
                print_group(g);
            }
        }
        Remote::Group { id } => {
            let v = call(&cl, "GET", &format!("/v1/groups/{}", enc(&id)), None).await?;
            if c.json {
                return show(&v);
            }
            print_group(&v["group"]);
        }
        Remote::Workloads => {
            let v = call(&controller(c)?, "GET", "/v1/workloads", None).await?;
            if c.json {
                return show(&v);
            }
            for w in v["workloads"].as_array().into_iter().flatten() {
                println!(
                    "{} {:<20} tenant={} {} sink={} members={}",
                    w["id"].as_str().unwrap_or(""),
                    w["name"].as_str().unwrap_or(""),
                    w["tenant"].as_str().unwrap_or(""),
                    w["options"]["consistency"].as_str().unwrap_or(""),
                    w["options"]["sink"].as_str().unwrap_or(""),
                    w["instances"].as_array().map_or(0, Vec::len)
                );
            }
        }
        Remote::WorkloadCreate {
            name,
            instances,
            consistency,
            sink,
            hold_timeout,
            level,
            tenant,
        } => {
            let mut body = json!({"name": name, "instances": instances,
                                  "consistency": consistency, "sink": sink,
                                  "hold_timeout_secs": hold_timeout, "level": level});
            if let Some(t) = tenant {
                body["tenant"] = json!(t);
            }
            let v = call(&controller(c)?, "POST", "/v1/workloads", Some(body)).await?;
            if c.json {
                return show(&v);
            }
            println!(
                "workload {} created",
                v["workload"]["id"].as_str().unwrap_or("")
            );
        }
        Remote::WorkloadRun { id, wait } => {
            let ccl = controller(c)?;
            let p = format!("/v1/workloads/{}/runs", enc(&id));
            let v = call(&ccl, "POST", &p, None).await?;
            let rid = v["run"]["id"].as_str().unwrap_or("").to_string();
            if !wait {
                if c.json {
                    return show(&v);
                }
                println!("run {rid} started");
                return Ok(());
            }
            let run = wait_run(&ccl, &rid, !c.json).await?;
            if c.json {
                show(&run)?;
            } else if run["state"] == "succeeded" {
                let d = &run["detail"];
                println!(
                    "snapshot {} of {} members, {} consistency, skew {} ms",
                    d["snapshot"].as_str().unwrap_or(""),
                    d["members"].as_array().map_or(0, Vec::len),
                    d["consistency"].as_str().unwrap_or(""),
                    d["point_in_time_skew_ms"]
                );
                for m in d["members"].as_array().into_iter().flatten() {
                    println!(
                        "  {:<24} {:<10} hold={} ms",
                        m["name"].as_str().unwrap_or(""),
                        m["host"].as_str().unwrap_or(""),
                        m["hold_ms"]
                    );
                }
            }
            if run["state"] != "succeeded" {
                bail!("run {rid} failed: {}", run["error"].as_str().unwrap_or(""));
            }
        }
        Remote::WorkloadRestore {
            id,
            snapshot,
            suffix,
            members,
            no_start,
        } => {
            let ccl = controller(c)?;
            let mut body = json!({"suffix": suffix, "start": !no_start});
            if !members.is_empty() {
                body["members"] = json!(members);
            }
            let p = format!(
                "/v1/workloads/{}/snapshots/{}/restore",
                enc(&id),
                enc(&snapshot)
            );
            let v = call(&ccl, "POST", &p, Some(body)).await?;
            let rid = v["run"]["id"].as_str().unwrap_or("").to_string();
            let run = wait_run(&ccl, &rid, !c.json).await?;
            if c.json {
                show(&run)?;
            } else {
                for m in run["detail"]["members"].as_array().into_iter().flatten() {
                    println!(
                        "{:<24} -> {:<30} on {} {}",
                        m["name"].as_str().unwrap_or(""),
                        m["staging"].as_str().unwrap_or(""),
                        m["host"].as_str().unwrap_or(""),
                        m["state"].as_str().unwrap_or("")
                    );
                }
            }
            if run["state"] != "succeeded" {
                bail!(
                    "restore {rid} failed: {}",
                    run["error"].as_str().unwrap_or("")
                );
            }
        }
        Remote::Snapshots { id } => {
            let p = format!("/v1/workloads/{}/snapshots", enc(&id));
            let v = call(&controller(c)?, "GET", &p, None).await?;
            if c.json {
                return show(&v);
            }
            for s in v["snapshots"].as_array().into_iter().flatten() {
                println!(
                    "{} {} members={} absent={}",
                    s["snapshot"].as_str().unwrap_or(""),
                    s["consistency"].as_str().unwrap_or(""),
                    s["members"].as_array().map_or(0, Vec::len),
                    s["absent"].as_array().map_or(0, Vec::len)
                );
            }
        }
        Remote::Hosts => {
            let v = call(&controller(c)?, "GET", "/v1/hosts", None).await?;
            if c.json {
                return show(&v);
            }
            for h in v["hosts"].as_array().into_iter().flatten() {
                println!(
                    "{:<20} {} {}",
                    h["name"].as_str().unwrap_or(""),
                    if h["up"] == true { "up" } else { "DOWN" },
                    h["hostd"].as_str().unwrap_or("")
                );
            }
        }
        Remote::Jobs => {
            let v = call(&cl, "GET", "/v1/jobs", None).await?;
            if c.json {
                return show(&v);
            }
            for j in v["jobs"].as_array().into_iter().flatten() {
                println!(
                    "{} {:<8} {:<11} {:<22} {}",
                    j["id"].as_str().unwrap_or(""),
                    j["kind"].as_str().unwrap_or(""),
                    j["state"].as_str().unwrap_or(""),
                    j["backup_id"].as_str().unwrap_or(""),
                    j["instance"].as_str().unwrap_or("")
                );
            }
        }
        Remote::Job { id } => {
            let v = call(&cl, "GET", &format!("/v1/jobs/{}", enc(&id)), None).await?;
            if c.json {
                return show(&v);
            }
            print_job(&v["job"]);
        }
        Remote::Watch { id } => {
            let s = watch(&cl, &id, c.json).await?;
            if c.json {
                show(&s)?;
            } else {
                print_job(&s);
            }
        }
        Remote::Cancel { id } => {
            call(&cl, "POST", &format!("/v1/jobs/{}/cancel", enc(&id)), None).await?;
            println!("cancel of {id} requested");
        }
        Remote::Backups { sink, instance } => {
            let mut p = format!("/v1/backups?sink={}", enc(&sink));
            if let Some(i) = instance {
                p += &format!("&instance={}", enc(&i));
            }
            let v = call(&cl, "GET", &p, None).await?;
            if c.json {
                return show(&v);
            }
            for b in v["backups"].as_array().into_iter().flatten() {
                let levels: Vec<String> = b["disks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| {
                        format!(
                            "{}:{}",
                            d["target"].as_str().unwrap_or(""),
                            d["level"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                println!(
                    "{:<22} {} {:<11} {}",
                    b["backup_id"].as_str().unwrap_or(""),
                    b["instance"].as_str().unwrap_or(""),
                    b["consistency"].as_str().unwrap_or(""),
                    levels.join(" ")
                );
            }
        }
        Remote::ShowBackup {
            sink,
            instance,
            backup_id,
        } => show(
            &call(
                &cl,
                "GET",
                &format!(
                    "/v1/backups/{}/{}?instance={}",
                    enc(&sink),
                    enc(&backup_id),
                    enc(&instance)
                ),
                None,
            )
            .await?,
        )?,
        Remote::DeleteBackup {
            sink,
            instance,
            backup_id,
        } => {
            let v = call(
                &cl,
                "DELETE",
                &format!(
                    "/v1/backups/{}/{}?instance={}",
                    enc(&sink),
                    enc(&backup_id),
                    enc(&instance)
                ),
                None,
            )
            .await?;
            println!("deleted {backup_id} ({} objects)", v["objects"]);
        }
        Remote::PruneBackups {
            sink,
            instance,
            keep,
            dry_run,
            background,
        } => {
            let body = json!({"instance": instance, "sink": sink, "policy": keep.policy(),
                              "dry_run": dry_run, "background": !dry_run});
            let v = call(&cl, "POST", "/v1/prune", Some(body)).await?;
            let v = if dry_run {
                v
            } else {
                match ran(&cl, c, v, background).await? {
                    Some(r) => r,
                    None => return Ok(()),
                }
            };
            if c.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for e in v["plan"].as_array().into_iter().flatten() {
                    let why = match &e["hold"] {
                        Value::Null if dry_run => "would go".to_string(),
                        Value::Null => "deleted".to_string(),
                        h if h["why"] == "locked" => format!(
                            "kept: locked until {}",
                            chrono_ms(h["by"].as_u64().unwrap_or(0))
                        ),
                        h => format!(
                            "kept: {} {}",
                            h["why"].as_str().unwrap_or_default(),
                            h["by"].as_str().unwrap_or_default()
                        ),
                    };
                    println!("{:<18} {why}", e["id"].as_str().unwrap_or_default());
                }
                if !dry_run {
                    println!(
                        "pruned {} backups ({} objects, {} bytes reclaimed, {} folds)",
                        v["deleted"].as_array().map_or(0, Vec::len),
                        v["objects"],
                        v["bytes_reclaimed"],
                        v["folds"]
                    );
                }
            }
        }
        Remote::CollectGarbage {
            sink,
            grace_secs,
            compact,
            threshold,
            max_copy_mib,
            background,
        } => {
            let mut body = json!({"sink": sink, "compact": compact, "background": true});
            for (k, v) in [
                ("grace_secs", grace_secs.map(|g| json!(g))),
                ("threshold", threshold.map(|t| json!(t))),
                ("max_copy_mib", max_copy_mib.map(|m| json!(m))),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            let v = call(&cl, "POST", "/v1/gc", Some(body)).await?;
            let Some(v) = ran(&cl, c, v, background).await? else {
                return Ok(());
            };
            if c.json {
                return show(&v);
            }
            println!(
                "collected {} objects ({} bytes), {} unfinished uploads",
                v["objects"], v["bytes"], v["partials"]
            );
            let k = &v["compaction"];
            if k.is_object() {
                println!(
                    "compacted {} segments into {} ({} bytes copied, {} reclaimed, {} backups rewritten, {} left, {} locked); busy disks: {}",
                    k["segments_rewritten"], k["segments_written"], k["bytes_copied"],
                    k["bytes_reclaimed"], k["backups_rewritten"],
                    k["segments_left"].as_u64().unwrap_or(0),
                    k["segments_locked"].as_u64().unwrap_or(0),
                    k["busy_disks"]
                );
            }
        }
        Remote::StartRestore {
            sink,
            instance,
            backup_id,
            disk,
            to_file,
            format,
            to_nbd,
            to_domain,
            start,
            instant,
            live,
            bandwidth_mib,
            wait,
        } => {
            let target = if let Some(p) = to_file {
                json!({"type": "file", "path": p, "format": format})
            } else if let Some(u) = to_nbd {
                json!({"type": "nbd", "uri": u})
            } else if let Some(n) = to_domain {
                json!({"type": "domain", "name": n, "start": start, "instant": instant,
                       "live": live, "bandwidth_mib": bandwidth_mib.unwrap_or(0)})
            } else {
                bail!("one of --to-file, --to-nbd, --to-domain");
            };
            let mut body = json!({"instance": instance, "sink": sink, "backup_id": backup_id, "target": target});
            if let Some(d) = disk {
                body["disk"] = json!(d);
            }
            let v = call(&cl, "POST", "/v1/restores", Some(body)).await?;
            started(&cl, c, v, wait).await?;
        }
        Remote::Mount {
            sink,
            instance,
            backup_id,
            disks,
        } => {
            let mut body = json!({"instance": instance, "sink": sink, "backup_id": backup_id});
            if !disks.is_empty() {
                body["disks"] = json!(disks);
            }
            let v = call(&cl, "POST", "/v1/mounts", Some(body)).await?;
            if c.json {
                return show(&v);
            }
            println!("mount {}", v["mount"]["id"].as_str().unwrap_or(""));
            for (t, d) in v["mount"]["disks"].as_object().into_iter().flatten() {
                println!(
                    "  {t}: {} ({} bytes)",
                    d["uri"].as_str().unwrap_or(""),
                    d["size"]
                );
            }
        }
        Remote::Mounts => {
            let v = call(&cl, "GET", "/v1/mounts", None).await?;
            if c.json {
                return show(&v);
            }
            for m in v["mounts"].as_array().into_iter().flatten() {
                println!(
                    "{} {} {} {} disks={}",
                    m["id"].as_str().unwrap_or(""),
                    m["instance"].as_str().unwrap_or(""),
                    m["sink"].as_str().unwrap_or(""),
                    m["backup_id"].as_str().unwrap_or(""),
                    m["disks"].as_object().map_or(0, |d| d.len())
                );
            }
        }
        Remote::Umount { id } => {
            let v = call(&cl, "DELETE", &format!("/v1/mounts/{}", enc(&id)), None).await?;
            if c.json {
                return show(&v);
            }
            println!("unmounted {id}");
        }
        Remote::StartVerify {
            sink,
            instance,
            backup_id,
            wait,
        } => {
            let v = call(
                &cl,
                "POST",
                "/v1/verifications",
                Some(json!({"instance": instance, "sink": sink, "backup_id": backup_id})),
            )
            .await?;
            started(&cl, c, v, wait).await?;
        }
    }
    Ok(())
}
