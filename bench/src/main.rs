//! `cbt-bench`: side-by-side benchmarks of libcbt against the reference tools, same disks,
//! same run, alternating A/B.
//!
//! | scenario | ours | peer |
//! |---|---|---|
//! | `nbd-read` | read every allocated byte of an export with libcbt's client | `nbdcopy URI null:` |
//! | `block-status` | walk a dirty bitmap of N scattered extents | `nbdinfo --map=qemu:dirty-bitmap:…` |
//!
//! Each side runs as a child process under `/usr/bin/time`, so wall time, CPU seconds and peak
//! RSS are measured the same way for both. Workloads are generated deterministically from a
//! seed and kept in `--workdir` between invocations.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use libcbt::extent::Extent;
use libcbt::nbd::{self, proto::state, Client, ConnectOptions};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "cbt-bench",
    about = "cbt benchmarks, side by side with the peers"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Full read of an 8 GiB qcow2 (~50% allocated) exported by qemu-nbd: libcbt vs nbdcopy.
    NbdRead(NbdReadArgs),
    /// Dirty-bitmap walk of N scattered extents on a large disk: libcbt vs nbdinfo --map.
    BlockStatus(BlockStatusArgs),
    /// Every scenario; a table on stdout and a JSON file.
    All {
        /// Smaller disks and fewer runs, for a smoke test.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "bench/results/latest.json")]
        out: PathBuf,
        #[arg(long, default_value = "/var/tmp/cbt-bench")]
        workdir: PathBuf,
    },
    /// (internal) Read every data extent of an export; prints a JSON line.
    ReadExport {
        uri: String,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value_t = 32)]
        in_flight: usize,
        #[arg(long, default_value_t = 256 << 10)]
        request: u64,
    },
    /// (internal) Walk one meta context of an export; prints a JSON line.
    MapExport {
        uri: String,
        #[arg(long)]
        context: String,
    },
}

#[derive(clap::Args, Clone)]
struct NbdReadArgs {
    #[arg(long, default_value_t = 8 << 30)]
    size: u64,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value = "/var/tmp/cbt-bench")]
    workdir: PathBuf,
}

#[derive(clap::Args, Clone)]
struct BlockStatusArgs {
    #[arg(long, default_value_t = 100 << 30)]
    size: u64,
    #[arg(long, default_value_t = 100_000)]
    extents: u64,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value = "/var/tmp/cbt-bench")]
    workdir: PathBuf,
}

/// One measured run of one tool.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    wall_s: f64,
    cpu_s: f64,
    max_rss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Stats {
    tool: String,
    runs: usize,
    wall_median_s: f64,
    wall_min_s: f64,
    wall_max_s: f64,
    cpu_median_s: f64,
    max_rss_mib: f64,
    samples: Vec<Sample>,
}

#[derive(Debug, Clone, Serialize)]
struct Scenario {
    name: String,
    workload: String,
    ours: Stats,
    peer: Stats,
    /// ours / peer wall time (lower is better for us).
    ratio_ours_over_peer: f64,
    target: String,
    /// Extra figures (e.g. µs per extent).
    extra: serde_json::Value,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn stats(tool: &str, samples: Vec<Sample>) -> Stats {
    let mut wall: Vec<f64> = samples.iter().map(|s| s.wall_s).collect();
    let mut cpu: Vec<f64> = samples.iter().map(|s| s.cpu_s).collect();
    Stats {
        tool: tool.into(),
        runs: samples.len(),
        wall_median_s: median(&mut wall),
        wall_min_s: wall.first().copied().unwrap_or(0.0),
        wall_max_s: wall.last().copied().unwrap_or(0.0),
        cpu_median_s: median(&mut cpu),
        max_rss_mib: samples.iter().map(|s| s.max_rss_kib).max().unwrap_or(0) as f64 / 1024.0,
        samples,
    }
}

/// Runs `argv` under `/usr/bin/time` and returns what it measured, plus the child's stdout.
fn measure(argv: &[String]) -> Result<(Sample, String)> {
    let tf = tempfile::NamedTempFile::new()?;
    // /usr/bin/time reports wall time in 10 ms steps: time the child here instead, and keep
    // its CPU and peak RSS figures.
    let started = Instant::now();
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%e %U %S %M", "-o"])
        .arg(tf.path())
        .args(argv)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {argv:?} (is /usr/bin/time installed?)"))?;
    let wall = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{argv:?} failed: {}", out.status);
    }
    let t = std::fs::read_to_string(tf.path())?;
    let f: Vec<f64> = t
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() < 4 {
        bail!("cannot parse /usr/bin/time output {t:?}");
    }
    Ok((
        Sample {
            wall_s: wall,
            cpu_s: f[1] + f[2],
            max_rss_kib: f[3] as u64,
        },
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// Alternates ours and the peer `runs` times.
fn alternate(
    runs: usize,
    ours: &[String],
    peer: &[String],
) -> Result<(Vec<Sample>, Vec<Sample>, String)> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut last_ours = String::new();
    // One untimed warm-up of each, so that both see a warm page cache.
    measure(ours)?;
    measure(peer)?;
    for i in 0..runs {
        let (s, out) = measure(ours)?;
        eprintln!("  run {}: ours {:.3}s", i + 1, s.wall_s);
        last_ours = out;
        a.push(s);
        let (s, _) = measure(peer)?;
        eprintln!("  run {}: peer {:.3}s", i + 1, s.wall_s);
        b.push(s);
    }
    Ok((a, b, last_ours))
}

/// A server process, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(path: &Path, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if let Some(st) = child.try_wait()? {
            bail!("server exited: {st}");
        }
        if Instant::now() > deadline {
            bail!("server did not listen on {path:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("{cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn self_exe() -> Result<String> {
    Ok(std::env::current_exe()?.to_string_lossy().into_owned())
}

// ---------------------------------------------------------------------------------------------
// nbd-read

/// Writes the B1 workload through qemu-nbd with our own client: ~50% of the disk allocated in
/// extents of 64 KiB–4 MiB; half of each 512-byte block random, half text.
async fn make_read_workload(path: &Path, size: u64, seed: u64) -> Result<()> {
    let tmp = path.with_extension("partial");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&tmp)
            .arg(size.to_string()),
    )?;
    let sock = tmp.with_extension("sock");
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new("qemu-nbd")
        .args(["-f", "qcow2", "--cache=unsafe", "--shared=4", "-k"])
        .arg(&sock)
        .arg(&tmp)
        .spawn()?;
    wait_socket(&sock, &mut child)?;
    let server = Server(child);
    let uri = nbd::NbdUri::unix(&sock, "").to_string();
    let client = Client::connect(&uri).await?;
    let mut rng = SmallRng::seed_from_u64(seed);
    // Alternate data and gaps of similar mean length: ~50% allocated.
    let mut extents = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let gap = rng.gen_range(1..=64u64) * 65536;
        let len = rng.gen_range(1..=64u64) * 65536;
        pos += gap;
        if pos + len > size {
            break;
        }
        extents.push((pos, len));
        pos += len;
    }
    let text = b"The quick brown fox jumps over the lazy dog; backups are never wrong. ";
    let queue = Arc::new(Mutex::new(
        extents
            .into_iter()
            .flat_map(|(o, l)| {
                (0..l.div_ceil(4 << 20))
                    .map(move |i| (o + i * (4 << 20), (l - i * (4 << 20)).min(4 << 20)))
            })
            .collect::<Vec<_>>(),
    ));
    let mut set = tokio::task::JoinSet::new();
    for w in 0..8u64 {
        let (c, q) = (client.clone(), queue.clone());
        let mut rng = SmallRng::seed_from_u64(seed ^ (w + 1));
        set.spawn(async move {
            loop {
                let next = q.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.pop();
                let Some((off, len)) = next else {
                    return anyhow::Ok(());
                };
                let mut buf = vec![0u8; len as usize];
                for block in buf.chunks_mut(512) {
                    let (r, t) = block.split_at_mut(256.min(block.len()));
                    rng.fill(r);
                    for (i, b) in t.iter_mut().enumerate() {
                        *b = text[i % text.len()];
                    }
                }
                c.write(off, buf, false).await?;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    client.flush().await?;
    client.disconnect().await;
    drop(server);
    let _ = std::fs::remove_file(&sock);
    std::fs::rename(&tmp, path)?;
    Ok(())
}

async fn bench_nbd_read(a: &NbdReadArgs) -> Result<Scenario> {
    std::fs::create_dir_all(&a.workdir)?;
    let img = a.workdir.join(format!("b1-{}-{}.qcow2", a.size, a.seed));
    if !img.exists() {
        eprintln!(
            "nbd-read: generating {} ({} GiB)",
            img.display(),
            a.size >> 30
        );
        make_read_workload(&img, a.size, a.seed).await?;
    }
    let sock = a.workdir.join("b1.sock");
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "--shared=8", "--persistent", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()?;
    wait_socket(&sock, &mut child)?;
    let _server = Server(child);
    let uri = nbd::NbdUri::unix(&sock, "").to_string();
    let ours: Vec<String> = vec![self_exe()?, "read-export".into(), uri.clone()];
    let peer: Vec<String> = vec![
        "nbdcopy".into(),
        "--connections=4".into(),
        uri.clone(),
        "null:".into(),
    ];
    eprintln!("nbd-read: {} runs each, alternating", a.runs);
    let (o, p, out) = alternate(a.runs, &ours, &peer)?;
    let extra: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
    let (ours, peer) = (stats("libcbt read-export", o), stats("nbdcopy → null:", p));
    Ok(Scenario {
        name: "nbd-read".into(),
        workload: format!(
            "{} GiB qcow2, ~50% allocated (64 KiB–4 MiB extents), qemu-nbd --shared=8",
            a.size >> 30
        ),
        ratio_ours_over_peer: ours.wall_median_s / peer.wall_median_s,
        ours,
        peer,
        target: "ratio ≤ 1.0".into(),
        extra,
    })
}

/// The internal `read-export` command: every data extent, many requests in flight.
async fn read_export(uri: &str, connections: usize, in_flight: usize, request: u64) -> Result<()> {
    let start = Instant::now();
    let opts = ConnectOptions {
        connections,
        max_in_flight: in_flight,
        ..ConnectOptions::with_contexts([nbd::BASE_ALLOCATION])
    };
    let client = Client::connect_with(uri, &opts).await?;
    let size = client.size();
    let map = if client.info().has_context(nbd::BASE_ALLOCATION) {
        client
            .map(nbd::BASE_ALLOCATION, 0..size)
            .await?
            .filter(|f| f & (state::HOLE | state::ZERO) == 0)
    } else {
        [Extent::new(0, size, 0)].into_iter().collect()
    };
    let mapped = start.elapsed();
    let request = request.min(u64::from(client.info().max_request()));
    let chunks: Vec<Extent> = map.chunks(request).collect();
    let queue = Arc::new(Mutex::new(chunks.into_iter().rev().collect::<Vec<_>>()));
    let workers = client.connections() * in_flight;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (c, q) = (client.clone(), queue.clone());
        set.spawn(async move {
            let mut buf = Vec::new();
            let mut bytes = 0u64;
            loop {
                let next = q.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.pop();
                let Some(e) = next else {
                    return anyhow::Ok(bytes);
                };
                buf.resize(e.len() as usize, 0);
                buf = c.read(e.start, buf).await?;
                bytes += e.len();
            }
        });
    }
    let mut bytes = 0;
    while let Some(r) = set.join_next().await {
        bytes += r??;
    }
    client.disconnect().await;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "bytes_read": bytes, "seconds": secs, "map_seconds": mapped.as_secs_f64(),
            "gb_per_s": bytes as f64 / secs / 1e9, "connections": client.connections(),
            "in_flight_per_connection": in_flight, "request_bytes": request,
        })
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// block-status

fn make_bitmap_workload(path: &Path, size: u64, extents: u64, seed: u64) -> Result<()> {
    let tmp = path.with_extension("partial");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"])
            .arg(&tmp)
            .arg(size.to_string()),
    )?;
    run_ok(
        Command::new("qemu-img")
            .args(["bitmap", "--add", "-g", "65536"])
            .arg(&tmp)
            .arg("bm0"),
    )?;
    // Extent i lands in its own slot of size/extents bytes, at a random 64 KiB-aligned place
    // in the first half of the slot: no two extents touch.
    let slot = size / extents;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut cmds = String::with_capacity(extents as usize * 40);
    for i in 0..extents {
        let off = i * slot + rng.gen_range(0..(slot / 2 / 65536).max(1)) * 65536;
        cmds += &format!("write -q -P 0x5a {off} 512\n");
    }
    let mut child = Command::new("qemu-io")
        .args(["-t", "unsafe", "-f", "qcow2"])
        .arg(&tmp)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    use std::io::Write;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(cmds.as_bytes())?;
    if !child.wait()?.success() {
        bail!("qemu-io failed");
    }
    run_ok(
        Command::new("qemu-img")
            .args(["bitmap", "--disable"])
            .arg(&tmp)
            .arg("bm0"),
    )?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

async fn bench_block_status(a: &BlockStatusArgs) -> Result<Scenario> {
    std::fs::create_dir_all(&a.workdir)?;
    let img = a
        .workdir
        .join(format!("b5-{}-{}-{}.qcow2", a.size, a.extents, a.seed));
    if !img.exists() {
        eprintln!(
            "block-status: generating {} ({} dirty extents)",
            img.display(),
            a.extents
        );
        make_bitmap_workload(&img, a.size, a.extents, a.seed)?;
    }
    let sock = a.workdir.join("b5.sock");
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new("qemu-nbd")
        .args([
            "-r",
            "-f",
            "qcow2",
            "--shared=8",
            "--persistent",
            "-B",
            "bm0",
            "-k",
        ])
        .arg(&sock)
        .arg(&img)
        .spawn()?;
    wait_socket(&sock, &mut child)?;
    let _server = Server(child);
    let uri = nbd::NbdUri::unix(&sock, "").to_string();
    let ctx = nbd::dirty_bitmap_context("bm0");
    let ours: Vec<String> = vec![
        self_exe()?,
        "map-export".into(),
        uri.clone(),
        "--context".into(),
        ctx.clone(),
    ];
    let peer: Vec<String> = vec![
        "sh".into(),
        "-c".into(),
        format!("nbdinfo --map={ctx} '{uri}' > /dev/null"),
    ];
    eprintln!("block-status: {} runs each, alternating", a.runs);
    let (o, p, out) = alternate(a.runs, &ours, &peer)?;
    let mut extra: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
    let dirty = extra["dirty_extents"].as_u64().unwrap_or(0);
    if dirty != a.extents {
        bail!("expected {} dirty extents, libcbt saw {dirty}", a.extents);
    }
    let (ours, peer) = (stats("libcbt map-export", o), stats("nbdinfo --map", p));
    extra["us_per_dirty_extent_ours_process"] =
        (ours.wall_median_s * 1e6 / a.extents as f64).into();
    extra["us_per_dirty_extent_nbdinfo_process"] =
        (peer.wall_median_s * 1e6 / a.extents as f64).into();
    Ok(Scenario {
        name: "block-status".into(),
        workload: format!(
            "{} GiB qcow2, {} scattered 64 KiB dirty extents, qemu-nbd -B",
            a.size >> 30,
            a.extents
        ),
        ratio_ours_over_peer: ours.wall_median_s / peer.wall_median_s,
        ours,
        peer,
        target: "≤ 1 µs per dirty extent (map walk)".into(),
        extra,
    })
}

/// The internal `map-export` command.
async fn map_export(uri: &str, context: &str) -> Result<()> {
    let start = Instant::now();
    let client = Client::connect_with(uri, &ConnectOptions::with_contexts([context])).await?;
    let connected = start.elapsed();
    let walk = Instant::now();
    let map = client.map(context, 0..client.size()).await?;
    let walk = walk.elapsed();
    let dirty = map.iter().filter(|e| e.flags & nbd::DIRTY != 0).count();
    client.disconnect().await;
    println!(
        "{}",
        serde_json::json!({
            "extents": map.len(), "dirty_extents": dirty,
            "connect_seconds": connected.as_secs_f64(), "walk_seconds": walk.as_secs_f64(),
            "us_per_dirty_extent_walk": walk.as_secs_f64() * 1e6 / dirty.max(1) as f64,
        })
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn print_table(scenarios: &[Scenario]) {
    println!(
        "{:<14} {:<22} {:>9} {:>9} {:>9} {:>8} {:>9}  target",
        "scenario", "tool", "median s", "min s", "max s", "cpu s", "RSS MiB"
    );
    for s in scenarios {
        for t in [&s.ours, &s.peer] {
            println!(
                "{:<14} {:<22} {:>9.3} {:>9.3} {:>9.3} {:>8.2} {:>9.1}",
                s.name,
                t.tool,
                t.wall_median_s,
                t.wall_min_s,
                t.wall_max_s,
                t.cpu_median_s,
                t.max_rss_mib
            );
        }
        println!(
            "{:<14} ratio ours/peer = {:.3}   ({})  {}",
            s.name, s.ratio_ours_over_peer, s.target, s.extra
        );
    }
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let ver = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default()
    };
    serde_json::json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "qemu": ver("qemu-img", "--version"),
        "nbdcopy": ver("nbdcopy", "--version"),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::ReadExport {
            uri,
            connections,
            in_flight,
            request,
        } => read_export(&uri, connections, in_flight, request).await,
        Cmd::MapExport { uri, context } => map_export(&uri, &context).await,
        Cmd::NbdRead(a) => {
            let s = bench_nbd_read(&a).await?;
            print_table(std::slice::from_ref(&s));
            Ok(())
        }
        Cmd::BlockStatus(a) => {
            let s = bench_block_status(&a).await?;
            print_table(std::slice::from_ref(&s));
            Ok(())
        }
        Cmd::All {
            quick,
            out,
            workdir,
        } => {
            let runs = if quick { 3 } else { 5 };
            let read = NbdReadArgs {
                size: if quick { 1 << 30 } else { 8 << 30 },
                runs,
                seed: 1,
                workdir: workdir.clone(),
            };
            let bs = BlockStatusArgs {
                size: 100 << 30,
                extents: if quick { 10_000 } else { 100_000 },
                runs,
                seed: 1,
                workdir,
            };
            let scenarios = vec![bench_nbd_read(&read).await?, bench_block_status(&bs).await?];
            print_table(&scenarios);
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let doc = serde_json::json!({ "machine": machine(), "scenarios": scenarios });
            std::fs::write(&out, serde_json::to_string_pretty(&doc)?)?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
    }
}
