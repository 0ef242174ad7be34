//! Replays the committed fuzz seed corpus (and any crash reproducers saved beside it) through
//! the same entry points the fuzz targets use, so a regression shows up in `make test`.

use std::path::Path;

fn replay(target: &str, entry: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for f in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {dir:?}: {e}")) {
        let path = f.expect("dir entry").path();
        entry(&std::fs::read(&path).expect("read seed"));
        n += 1;
    }
    assert!(n >= 3, "corpus {target} has only {n} seeds");
}

#[test]
fn nbd_reply_corpus_decodes_without_panic() {
    replay("nbd_reply", libcbt::fuzzing::nbd_reply);
}

#[test]
fn nbd_handshake_corpus_decodes_without_panic() {
    replay("nbd_handshake", libcbt::fuzzing::nbd_handshake);
}

#[test]
fn qmp_line_corpus_parses_without_panic() {
    replay("qmp_line", libcbt::fuzzing::qmp_line);
}

#[test]
fn format_corpus_decodes_without_panic() {
    replay("format_objects", libcbt::fuzzing::format_objects);
}

#[test]
fn nbd_server_corpus_is_served_without_panic() {
    replay("nbd_server", libcbt::fuzzing::nbd_server);
}
