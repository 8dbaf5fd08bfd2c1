//! Reading the files the control API's settings come from (PEM files, the
//! token file), within bounds, and noticing when they change.
//!
//! A path can name anything: `/dev/zero`, a FIFO, a huge file by mistake.
//! Each is refused before a byte is buffered beyond the limit. Renewed
//! secrets are swapped in place (a Kubernetes Secret volume points a
//! symlink at new files; an editor rewrites a file), which [`Watched`]
//! notices with a `stat` a file.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// The regular file at `path` (links followed), if it holds at most
/// `max` bytes; at most `max + 1` bytes are ever read. Errors name the path.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| err(&e))?;
    if !meta.is_file() {
        return Err(err(&"not a regular file"));
    }
    // Non-blocking: should a FIFO be swapped in after the check, the read
    // fails instead of waiting.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| err(&e))?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(&e))?;
    if bytes.len() as u64 > max {
        return Err(err(&format!("larger than {max} bytes")));
    }
    Ok(bytes)
}

/// What is known of each file: which file its path names now and when and
/// how it last changed; None: unreadable.
type Stamp = Vec<Option<(u64, u64, i64, i64, u64)>>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
        })
        .collect()
}

/// Files looked at again and again: has any changed since the last look?
pub struct Watched {
    paths: Vec<PathBuf>,
    seen: Mutex<Stamp>,
}

impl Watched {
    /// As they are now (call before reading them, so that a change during
    /// the read is seen at the next look, never missed).
    pub fn new(paths: Vec<PathBuf>) -> Watched {
        let seen = stamp(&paths);
        Watched {
            paths,
            seen: Mutex::new(seen),
        }
    }

    /// Files read before the watch began: the first look reports a change,
    /// so that one replaced in between is read again, not missed.
    pub fn unseen(paths: Vec<PathBuf>) -> Watched {
        Watched {
            paths,
            seen: Mutex::new(Stamp::default()),
        }
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Whether any file changed since the last look (a `stat` each:
    /// blocking, so off the async runtime). A change is reported once.
    pub fn changed(&self) -> bool {
        let now = stamp(&self.paths);
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if *seen == now {
            return false;
        }
        *seen = now;
        true
    }

    /// Forgets the last look: the next one reports a change, and the files
    /// are read again (a certificate refused only because it is not valid
    /// yet must be taken once it is, without waiting for another change).
    pub fn look_again(&self) {
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = Stamp::default();
    }
}

/// What a look at followed files did.
#[derive(Debug, PartialEq, Eq)]
pub enum Refresh {
    /// No file changed (or the new content is the same).
    Unchanged,
    /// A file changed and the new settings are in use.
    Reloaded,
    /// A file changed and the new content is bad: the last good settings
    /// stay in use. Tried again when a file changes again.
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_reads_refuse_what_is_not_a_small_regular_file() {
        let tmp = tempfile::TempDir::with_prefix("agiproxy-files").unwrap();
        let dir = tmp.path();
        let f = dir.join("small");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(read_bounded(&f, 10).unwrap(), b"0123456789");
        assert!(read_bounded(&f, 9)
            .unwrap_err()
            .contains("larger than 9 bytes"));
        assert!(read_bounded(Path::new("/dev/zero"), 10)
            .unwrap_err()
            .contains("not a regular file"));
        assert!(read_bounded(dir, 10)
            .unwrap_err()
            .contains("not a regular file"));
        let w = Watched::new(vec![f.clone()]);
        assert!(!w.changed());
        std::fs::write(&f, b"01234567890").unwrap();
        assert!(w.changed(), "a new length");
        assert!(!w.changed(), "reported once");
        std::fs::remove_file(&f).unwrap();
        assert!(w.changed(), "gone");
    }
}
