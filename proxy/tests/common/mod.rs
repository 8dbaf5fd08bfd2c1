//! Helpers shared by the tests that run the `agiproxy` binary.
#![allow(dead_code)]

/// A port free at the time of asking, on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `text` written as `file` in a fresh temporary directory named
/// `agiproxy-{what}-…`, removed when the returned `TempDir` drops: keep it
/// for as long as the file is read.
pub fn config_file(what: &str, file: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("agiproxy-{what}-"))
        .tempdir()
        .unwrap();
    let path = dir.path().join(file);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}
