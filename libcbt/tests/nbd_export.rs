//! Backups served over NBD (libcbt::nbd::server on engine::export), from a directory and from
//! SeaweedFS, judged by other tools:
//! `qemu-img compare` and `nbdcopy` against references taken at the backups' points in time,
//! `nbdinfo --map` against the merged index, and libnbd's `nbdsh` for the server's refusals
//! and its answer to a frame the sink lost.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::lab::{compare, guest_writes, Lab};
use common::*;
use libcbt::engine::export::BackupExport;
use libcbt::engine::{load_chain, BackupOptions};
use libcbt::format::plan_restore;
use libcbt::job;
use libcbt::nbd::server::{serve_unix, ServerOptions};
use libcbt::sink::local::LocalSink;
use libcbt::sink::Sink;
use libcbt::source::qemu::Requested;

const SIZE: u64 = 64 << 20;

/// Serves `backup` of `disk` at `socket` in this process; the task ends with the runtime.
async fn serve<S: Sink>(sink: &S, disk: &str, backup: &str, socket: &Path, cache: usize) -> String {
    let export = BackupExport::open(sink.clone(), disk, backup, cache)
        .await
        .expect("export");
    let listener = tokio::net::UnixListener::bind(socket).expect("bind");
    let opts = ServerOptions {
        name: format!("{disk}-{backup}"),
        ..Default::default()
    };
    tokio::spawn(serve_unix(listener, Arc::new(export), Arc::new(opts)));
    format!("nbd+unix:///?socket={}", socket.display())
}

/// libnbd's shell on Debian's python (the one with the `nbd` module), whatever else is first on
/// the PATH (pyenv's, say).
fn nbdsh() -> Command {
    let mut c = Command::new("/usr/bin/python3");
    c.args(["-m", "nbd"]);
    c
}

/// `cmd` run off the runtime's threads (the server answers it on them).
async fn tool(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("spawn"))
        .await
        .expect("join")
}

async fn tool_ok(cmd: Command) -> String {
    let what = format!("{cmd:?}");
    let out = tool(cmd).await;
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nbdinfo --map` of `uri`: (offset, length, hole) runs, adjacent runs of a kind merged.
async fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, bool)> {
    let mut c = Command::new("nbdinfo");
    c.args(["--map", "--json", uri]);
    let v: serde_json::Value = serde_json::from_str(&tool_ok(c).await).expect("json");
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for e in v.as_array().expect("array") {
        let (off, len, ty) = (
            e["offset"].as_u64().expect("offset"),
            e["length"].as_u64().expect("length"),
            e["type"].as_u64().expect("type"),
        );
        assert!(ty == 0 || ty == 3, "type {ty}: {e}");
        push_run(&mut out, off, len, ty == 3);
    }
    out
}

fn push_run(out: &mut Vec<(u64, u64, bool)>, off: u64, len: u64, hole: bool) {
    if len == 0 {
        return;
    }
    match out.last_mut() {
        Some(l) if l.2 == hole && l.0 + l.1 == off => l.1 += len,
        _ => out.push((off, len, hole)),
    }
}

/// The runs the merged index of the chain says: data where a frame piece is, hole elsewhere.
async fn index_map<S: Sink>(sink: &S, disk: &str, backup: &str) -> Vec<(u64, u64, bool)> {
    let chain = load_chain(sink, disk, backup).await.expect("chain");
    let idx: Vec<_> = chain.iter().map(|(_, i)| i).collect();
    let plan = plan_restore(&idx).expect("plan");
    let mut data: Vec<(u64, u64)> = plan
        .frames
        .iter()
        .flat_map(|f| f.pieces.iter().map(|p| (p.start, p.end)))
        .collect();
    data.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0;
    for (s, e) in data {
        push_run(&mut out, at, s - at, true);
        push_run(&mut out, s, e - s, false);
        at = e;
    }
    push_run(&mut out, at, plan.disk_size - at, true);
    out
}

/// A full and two incrementals of the lab's disk, random guest writes between; the reference
/// of each (its point in time).
async fn three_backups<S: Sink>(lab: &Lab, sink: &S) -> Vec<(String, std::path::PathBuf)> {
    let mut rng = rng(seed("nbd-export"));
    let opts = BackupOptions {
        chunk_size: 256 << 10,
        segment_size: 4 << 20,
        ..Default::default()
    };
    let mut refs = Vec::new();
    for (i, req) in [Requested::Full, Requested::Auto, Requested::Auto]
        .into_iter()
        .enumerate()
    {
        guest_writes(&lab.live[0], &mut rng, 25).await;
        let id = format!("b{i}");
        let r = lab.path(&format!("ref-{id}.raw"));
        lab.reference(0, &r);
        job::backup_qemu(
            &lab.source,
            sink,
            &id.parse().expect("id"),
            &lab.specs("vm-"),
            req,
            &opts,
        )
        .await
        .expect("backup");
        refs.push((id, r));
    }
    refs
}

/// Each backup served: `qemu-img compare` and an `nbdcopy` over four connections equal its
/// reference, and `nbdinfo --map` is its merged index.
async fn judge<S: Sink>(lab: &Lab, sink: &S, disk: &str, refs: &[(String, std::path::PathBuf)]) {
    for (id, reference) in refs {
        let socket = lab.path(&format!("{id}.sock"));
        // A small cache: frames are evicted and read again within one copy.
        let uri = serve(sink, disk, id, &socket, 1 << 20).await;
        // qemu-img compare reads it through QEMU's NBD client (structured replies, block
        // status to skip zeroes).
        let mut c = Command::new("qemu-img");
        c.args(["compare", "-f", "raw", "-F", "raw"])
            .arg(reference)
            .arg(&uri);
        tool_ok(c).await;
        // nbdcopy reads it over several connections at once (the export says CAN_MULTI_CONN).
        let out = lab.path(&format!("{id}-copy.raw"));
        let mut c = Command::new("nbdcopy");
        c.args(["--connections=4", "--requests=16"])
            .arg(&uri)
            .arg(&out);
        tool_ok(c).await;
        compare(&out, reference);
        // Its allocation is the merged index's.
        let map = nbdinfo_map(&uri).await;
        assert_eq!(map, index_map(sink, disk, id).await, "{id}");
        assert!(
            map.iter().any(|r| r.2) && map.iter().any(|r| !r.2),
            "{id}: data and holes expected: {map:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_on_seaweedfs_served_over_nbd_read_as_their_point_in_time() {
    for t in ["qemu-img", "nbdcopy", "nbdinfo"] {
        require(t);
    }
    let lab = Lab::new(&[("d0", "qcow2")], SIZE).await;
    let sink = s3::seaweed()
        .await
        .sink(&format!("nbd-export-{}", std::process::id()))
        .await;
    let refs = three_backups(&lab, &sink).await;
    judge(&lab, &sink, "vm-d0", &refs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_served_over_nbd_read_as_their_point_in_time() {
    for t in ["qemu-img", "nbdcopy", "nbdinfo", "nbdsh"] {
        require(t);
    }
    let lab = Lab::new(&[("d0", "qcow2")], SIZE).await;
    let sink = LocalSink::open(lab.path("sink")).expect("sink");
    let disk = "vm-d0";
    let refs = three_backups(&lab, &sink).await;
    judge(&lab, &sink, disk, &refs).await;

    // Four requests for parts of one frame at once (as nbdcopy's connections make them)
    // read it from the sink once: the others wait for that read.
    {
        let export = BackupExport::open(sink.clone(), disk, "b2", 8 << 20)
            .await
            .expect("export");
        let chain = load_chain(&sink, disk, "b2").await.expect("chain");
        let idx: Vec<_> = chain.iter().map(|(_, i)| i).collect();
        let plan = plan_restore(&idx).expect("plan");
        let p = plan
            .frames
            .iter()
            .flat_map(|f| f.pieces.iter())
            .find(|p| p.end - p.start >= 4 << 10)
            .expect("a piece")
            .clone();
        let q = (p.end - p.start) / 4;
        let part = |k: u64| export.read(p.start + k * q, q);
        let (a, b, c, d) = tokio::join!(part(0), part(1), part(2), part(3));
        for r in [a, b, c, d] {
            assert!(r
                .expect("read")
                .iter()
                .all(|s| matches!(s, libcbt::engine::export::Span::Data { .. })));
        }
        // (Read once: the others wait for that read, or, when it ended within their first
        // poll, as a blocking-pool read can on a busy runtime, find its frame cached. Polled
        // one after another, the parts look sequential and may start a read-ahead of the
        // next frame: not this frame's read.)
        let st = export.stats();
        assert_eq!(
            (st.frames_read - st.prefetched, st.shared + st.cache_hits),
            (1, 3),
            "{st:?}"
        );
    }

    // A reader that reads on where it stopped gets the frames ahead read in the background:
    // most of its frames are then found read (cached, or in flight), not read by the request,
    // and what it reads is still the backup's point in time.
    {
        let export = BackupExport::open(sink.clone(), disk, "b2", 32 << 20)
            .await
            .expect("export");
        let reference = std::fs::read(&refs[2].1).expect("reference");
        let step = 256u64 << 10;
        let mut at = 0u64;
        while at < SIZE {
            let mut got = vec![0u8; step as usize];
            for span in export.read(at, step).await.expect("read") {
                if let libcbt::engine::export::Span::Data { offset, buf, range } = span {
                    let o = (offset - at) as usize;
                    got[o..o + range.len()].copy_from_slice(&buf[range]);
                }
            }
            assert!(
                got == reference[at as usize..(at + step) as usize],
                "bytes at {at:#x} differ from the reference"
            );
            at += step;
            // The client's round trip: the read-ahead runs meanwhile.
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let st = export.stats();
        assert!(st.prefetched > 0, "{st:?}");
        assert!(
            st.prefetched * 2 > st.frames_read,
            "most frames are read ahead: {st:?}"
        );
        assert!(st.cache_hits + st.shared > 0, "{st:?}");
        eprintln!("sequential read of b2 in 256 KiB requests: {st:?}");
    }

    // The server's refusals, asked with libnbd's strict mode off (so the requests reach it):
    // writes, trims and zeroes are EPERM, a read past the end EINVAL; the connection stays.
    let socket = lab.path("refusals.sock");
    let uri = serve(&sink, disk, "b2", &socket, 8 << 20).await;
    let script = r#"
import errno, nbd
def code(e):
    # An int, or its name in some libnbd versions.
    return e.errno if isinstance(e.errno, int) else getattr(errno, e.errno)
h.set_strict_mode(0)
def refused(f, want):
    try:
        f()
    except nbd.Error as e:
        assert code(e) == want, (e.string, e.errno)
        return
    raise AssertionError("not refused")
assert h.is_read_only() and h.can_multi_conn() and h.can_df()
refused(lambda: h.pwrite(b"x" * 512, 0), errno.EPERM)
refused(lambda: h.trim(4096, 0), errno.EPERM)
refused(lambda: h.zero(4096, 0), errno.EPERM)
refused(lambda: h.pread(4096, h.get_size()), errno.EINVAL)
assert len(h.pread(1 << 20, 0)) == 1 << 20
print("ok")
"#;
    let mut c = nbdsh();
    c.args(["-u", &uri, "-c", script]);
    assert_eq!(tool_ok(c).await.trim(), "ok");

    // A frame the sink lost is EIO for the reads that need it, and nothing else: other reads
    // on the same connection still answer.
    let broken = lab.path("broken");
    run(Command::new("cp")
        .arg("-a")
        .arg(lab.path("sink"))
        .arg(&broken));
    let bsink = LocalSink::open(&broken).expect("sink");
    let full = load_chain(&bsink, disk, "b0").await.expect("chain");
    let idx: Vec<_> = full.iter().map(|(_, i)| i).collect();
    let plan = plan_restore(&idx).expect("plan");
    let victim = &plan.frames[plan.frames.len() / 2];
    let seg = broken.join(libcbt::format::segment_name(disk, victim.segment));
    // Flip a byte inside the frame's body: its crc no longer holds.
    let mut bytes = std::fs::read(&seg).expect("segment");
    let at = (victim.pos + u64::from(victim.frame_len) - 1) as usize;
    bytes[at] ^= 0xff;
    std::fs::remove_file(&seg).expect("rm");
    std::fs::write(&seg, &bytes).expect("write");
    let bad = victim.pieces[0].start;
    let good = plan
        .frames
        .iter()
        .find(|f| (f.segment, f.pos) != (victim.segment, victim.pos))
        .map(|f| f.pieces[0].start)
        .expect("another frame");
    let socket = lab.path("broken.sock");
    let uri = serve(&bsink, disk, "b0", &socket, 8 << 20).await;
    let script = format!(
        r#"
import errno, nbd
try:
    h.pread(4096, {bad})
    raise AssertionError("a corrupt frame was served")
except nbd.Error as e:
    assert (e.errno if isinstance(e.errno, int) else getattr(errno, e.errno)) == errno.EIO, (e.string, e.errno)
assert len(h.pread(4096, {good})) == 4096
print("ok")
"#
    );
    let mut c = nbdsh();
    c.args(["-u", &uri, "-c", &script]);
    assert_eq!(tool_ok(c).await.trim(), "ok");

    // A client that sends garbage, or leaves in the middle of a request, takes nothing down.
    let socket = lab.path("b1.sock");
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::UnixStream::connect(&socket)
            .await
            .expect("connect");
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.expect("greeting");
        s.write_all(&[0xff; 64]).await.expect("garbage");
        let mut rest = Vec::new();
        // The server closes the connection.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .expect("the server closes a connection that breaks the protocol");
    }
    let script = r#"
import nbd
# Sent, and the client leaves without its answer.
h.aio_pread(nbd.Buffer(1 << 20), 0)
print("ok")
"#;
    let mut c = nbdsh();
    c.args(["-u", &uri, "-c", script]);
    assert_eq!(tool_ok(c).await.trim(), "ok");
    let out = lab.path("after.raw");
    let mut c = Command::new("nbdcopy");
    c.arg(&uri).arg(&out);
    tool_ok(c).await;
    compare(&out, &refs[1].1);
}

/// A CA, a server certificate for localhost and a client certificate, in the file names
/// GnuTLS clients (libnbd, QEMU) look for in a directory: `ca-cert.pem`, `client-cert.pem`,
/// `client-key.pem`; the server's are `server-cert.pem`, `server-key.pem`.
fn certificates(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "cbt test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    let leaf = |names: Vec<String>, cn: &str, eku: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(names).expect("params");
        p.is_ca = IsCa::ExplicitNoCa;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, &ca_cert, &ca_key).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (sc, sk) = leaf(
        vec!["localhost".into()],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (cc, ck) = leaf(
        vec![],
        "cbt test client",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    std::fs::create_dir_all(dir).expect("dir");
    for (name, text) in [
        ("ca-cert.pem", ca_cert.pem()),
        ("server-cert.pem", sc),
        ("server-key.pem", sk),
        ("client-cert.pem", cc),
        ("client-key.pem", ck),
    ] {
        std::fs::write(dir.join(name), text).expect("write");
    }
}

/// Over TCP, TLS with client certificates: libnbd's tools and QEMU (GnuTLS, as a remote site
/// would read it) copy and compare the backup through it; a client without TLS, or without a
/// client certificate, is refused; and there is no TCP export without TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_served_over_tcp_with_tls_and_client_certificates() {
    for t in ["qemu-img", "nbdcopy", "nbdinfo"] {
        require(t);
    }
    let lab = Lab::new(&[("d0", "qcow2")], SIZE).await;
    let sink = LocalSink::open(lab.path("sink")).expect("sink");
    let refs = three_backups(&lab, &sink).await;
    let (id, reference) = &refs[2];
    let certs = lab.path("certs");
    certificates(&certs);
    let tls = libcbt::nbd::server::tls_config(
        &certs.join("server-cert.pem"),
        &certs.join("server-key.pem"),
        Some(&certs.join("ca-cert.pem")),
    )
    .expect("TLS config");
    let export = Arc::new(
        BackupExport::open(sink.clone(), "vm-d0", id, 8 << 20)
            .await
            .expect("export"),
    );
    // No TCP export without TLS, nor with TLS that lets in clients without a certificate.
    let no_client_auth = libcbt::nbd::server::tls_config(
        &certs.join("server-cert.pem"),
        &certs.join("server-key.pem"),
        None,
    )
    .expect("TLS config");
    for tls in [None, Some(no_client_auth)] {
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let opts = ServerOptions {
            tls,
            ..Default::default()
        };
        let refused = libcbt::nbd::server::serve_tcp(plain, export.clone(), Arc::new(opts)).await;
        assert!(
            refused.is_err(),
            "a TCP export without client certificates was served"
        );
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let opts = ServerOptions {
        tls: Some(tls),
        ..Default::default()
    };
    tokio::spawn(libcbt::nbd::server::serve_tcp(
        listener,
        export,
        Arc::new(opts),
    ));
    let uri = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        certs.display()
    );
    // libnbd: the whole disk over TLS equals the reference.
    let out = lab.path("tls-copy.raw");
    let mut c = Command::new("nbdcopy");
    c.arg(&uri).arg(&out);
    tool_ok(c).await;
    compare(&out, reference);
    // QEMU's NBD client with x509 credentials (GnuTLS), through qemu-img compare.
    let mut c = Command::new("qemu-img");
    c.arg("compare")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            certs.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=raw,file.driver=file,file.filename={}",
            reference.display()
        ))
        .arg(format!(
            "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=localhost,file.server.port={port},file.tls-creds=tls0"
        ));
    tool_ok(c).await;
    // Refused: a client that does not start TLS (the server's NBD_REP_ERR_TLS_REQD), and one
    // without a client certificate (the TLS handshake).
    let mut c = Command::new("nbdinfo");
    c.env("LIBNBD_DEBUG", "1")
        .arg(format!("nbd://localhost:{port}/"));
    let o = tool(c).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "served without TLS: {err}");
    assert!(
        err.contains("server error message: TLS is required"),
        "{err}"
    );
    let ca_only = lab.path("ca-only");
    std::fs::create_dir_all(&ca_only).expect("dir");
    std::fs::copy(certs.join("ca-cert.pem"), ca_only.join("ca-cert.pem")).expect("copy");
    let mut c = Command::new("nbdinfo");
    c.arg(format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        ca_only.display()
    ));
    let o = tool(c).await;
    assert!(
        !o.status.success(),
        "served to a client without a certificate: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}
