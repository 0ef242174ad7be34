//! What ships beside the binaries: the systemd unit, the example configuration, the Vagrant
//! lab. Each is checked by the tool that will read it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn require(tool: &str) {
    assert!(
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false),
        "required tool `{tool}` is not installed; `make test` installs it (scripts/install-deps.sh)"
    );
}

#[test]
fn systemd_unit_verifies() {
    require("systemd-analyze");
    let d = tempfile::tempdir().expect("tempdir");
    let unit =
        std::fs::read_to_string(root().join("hostd/systemd/cbt-hostd.service")).expect("unit");
    assert!(
        unit.contains("Type=notify")
            && unit.contains("WatchdogSec=")
            && unit.contains("LimitMEMLOCK=")
    );
    // The unit names the installed path; point it at the binary under test.
    let unit = unit.replace("/usr/local/bin/cbt-hostd", env!("CARGO_BIN_EXE_cbt-hostd"));
    let f = d.path().join("cbt-hostd.service");
    std::fs::write(&f, unit).expect("write");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&f)
        .output()
        .expect("systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("cbt-hostd")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {err}"
    );
}

#[test]
fn example_config_passes_check_config() {
    let out = Command::new(env!("CARGO_BIN_EXE_cbt-hostd"))
        .arg("--config")
        .arg(root().join("hostd/systemd/hostd.toml.example"))
        .arg("--check-config")
        .output()
        .expect("cbt-hostd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A typo is refused, naming the key.
    let d = tempfile::tempdir().expect("tempdir");
    let bad = d.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nunix_sokcet = \"/x\"\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_cbt-hostd"))
        .arg("--config")
        .arg(&bad)
        .arg("--check-config")
        .output()
        .expect("cbt-hostd");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unix_sokcet"));
}

#[test]
fn vagrant_lab_validates() {
    require("vagrant");
    let out = Command::new("vagrant")
        .arg("validate")
        .current_dir(root().join("vagrant"))
        .env("VAGRANT_CHECKPOINT_DISABLE", "1")
        .output()
        .expect("vagrant");
    assert!(
        out.status.success(),
        "vagrant validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
