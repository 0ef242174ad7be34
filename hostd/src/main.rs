//! `cbt-hostd`: the per-host backup daemon. The HTTP API, job journal and systemd integration
//! are tracked in the project's issues; until they land this binary refuses to start rather
//! than pretend to serve.

fn main() {
    eprintln!(
        "cbt-hostd {}: the daemon is not built yet; use `cbtctl` for NBD inspection",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
