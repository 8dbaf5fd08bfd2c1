//! Helpers shared by the tests that run the `agiproxy` binary.
#![allow(dead_code)]

/// A port free at the time of asking, on loopback.
pub fn free_port() -> u16 {
    chaos_tests::ports::free_port("127.0.0.1")
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

/// A child process that is killed and reaped when this drops, so that a test
/// that panics leaves nothing running. Derefs to the `Child`.
pub struct Running(Option<std::process::Child>);

impl Running {
    /// Spawns `cmd`, panicking if it cannot start.
    pub fn spawn(cmd: &mut std::process::Command) -> Running {
        Running(Some(cmd.spawn().unwrap()))
    }

    /// The child, no longer killed on drop: for a test that reaps it itself
    /// (`wait_with_output`).
    pub fn into_inner(mut self) -> std::process::Child {
        self.0.take().unwrap()
    }
}

impl From<std::process::Child> for Running {
    fn from(child: std::process::Child) -> Running {
        Running(Some(child))
    }
}

impl std::ops::Deref for Running {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        self.0.as_ref().unwrap()
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        self.0.as_mut().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A child the test already waited for is not signalled again: `Child`
        // keeps its status, and both calls just return.
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
