//! Reading a config file within bounds: only a regular file, only up to a size, never blocking
//! on what is not a file.
//!
//! A config file can be replaced by anything: a link to `/dev/zero` or `/dev/urandom` (endless),
//! a FIFO (a read that waits for a writer, for ever), a huge file. Each is refused before a byte
//! is buffered beyond the limit.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a config file was not read. The running config, if any, stays.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read config file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not a regular file (a {kind}); point it at a file, and replace it by writing a new file and renaming it over the old one")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("config file {path} is over limits.max_config_bytes ({max} bytes); raise the limit in the running config first, or make the file smaller")]
    TooLarge { path: PathBuf, max: usize },
    #[error("config file {path} is not UTF-8 text")]
    NotUtf8 { path: PathBuf },
}

/// Reads the regular file at `path` (links followed) if it holds at most `max_bytes`.
///
/// Checked twice: by path before opening, so a FIFO or device is never opened, and on the open
/// file, in case it was swapped in between; the open is non-blocking so that even then a FIFO
/// cannot stall the caller. At most `max_bytes + 1` bytes are ever read.
pub fn read_file(path: &Path, max_bytes: usize) -> Result<String, FileError> {
    let io = |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let regular = |meta: &std::fs::Metadata| -> Result<(), FileError> {
        if meta.is_file() {
            Ok(())
        } else {
            Err(FileError::NotRegular {
                path: path.to_path_buf(),
                kind: kind(meta),
            })
        }
    };
    let too_large = || FileError::TooLarge {
        path: path.to_path_buf(),
        max: max_bytes,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    regular(&meta)?;
    if meta.len() > max_bytes as u64 {
        return Err(too_large());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    regular(&meta)?;
    let mut buf = Vec::with_capacity((meta.len() as usize).min(max_bytes) + 1);
    file.take(max_bytes as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(io)?;
    if buf.len() > max_bytes {
        return Err(too_large());
    }
    String::from_utf8(buf).map_err(|_| FileError::NotUtf8 {
        path: path.to_path_buf(),
    })
}

fn kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory, removed with what it holds when dropped.
    fn temp_dir(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("agiproxy-file-{name}-"))
            .tempdir()
            .unwrap()
    }

    #[test]
    fn reads_a_file_within_the_limit_and_refuses_the_rest() {
        let dir = temp_dir("limits");
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "version: 1\n").unwrap();
        assert_eq!(read_file(&f, 100).unwrap(), "version: 1\n");
        assert!(matches!(read_file(&f, 5), Err(FileError::TooLarge { .. })));
        assert!(matches!(
            read_file(dir.path(), 100),
            Err(FileError::NotRegular {
                kind: "directory",
                ..
            })
        ));
        assert!(matches!(
            read_file(Path::new("/dev/zero"), 100),
            Err(FileError::NotRegular {
                kind: "character device",
                ..
            })
        ));
        std::fs::write(&f, b"\xff\xfe").unwrap();
        assert!(matches!(read_file(&f, 100), Err(FileError::NotUtf8 { .. })));
        // A link to a device is the device.
        let link = dir.path().join("link.yaml");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(
            read_file(&link, 100),
            Err(FileError::NotRegular { .. })
        ));
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = temp_dir("fifo");
        let fifo = dir.path().join("c.yaml");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = std::time::Instant::now();
        assert!(matches!(
            read_file(&fifo, 100),
            Err(FileError::NotRegular { kind: "FIFO", .. })
        ));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
