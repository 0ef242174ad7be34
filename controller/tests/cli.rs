//! The controller's command line: a bad configuration is refused with the reason. (The
//! workload runs across real daemons and guests are in `hostd/tests/groups.rs`, beside the
//! guests they use; this test also makes `cargo test --workspace` build the binary for it.)

use std::process::Command;

#[test]
fn a_bad_configuration_is_refused_with_its_reason() {
    let d = tempfile::tempdir().expect("tempdir");
    let f = d.path().join("c.toml");
    std::fs::write(
        &f,
        "[server]\nunix_socket = \"/tmp/x.sock\"\ndatabase = \"/tmp/x.db\"\nunknown = 1\n",
    )
    .expect("write");
    let o = Command::new(env!("CARGO_BIN_EXE_cbt-controller"))
        .arg("--config")
        .arg(&f)
        .output()
        .expect("run");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unknown"), "{err}");
    std::fs::write(
        &f,
        "[server]\nunix_socket = \"/tmp/x.sock\"\ndatabase = \"/tmp/x.db\"\n\
         [[token]]\nname = \"t\"\nsha256 = \"00\"\nadmin = true\n",
    )
    .expect("write");
    let o = Command::new(env!("CARGO_BIN_EXE_cbt-controller"))
        .arg("--config")
        .arg(&f)
        .output()
        .expect("run");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("64 hex digits"), "{err}");
}
