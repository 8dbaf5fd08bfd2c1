//! The control socket: a Unix socket with mode 0600, owned by the proxy's
//! user, whose file permissions are the credential (as HAProxy's runtime
//! API). Binding it never replaces anything but a stale socket.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

/// Why the control socket could not be set up; each names `control.socket`.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "control.socket: {path} exists and is not a socket; refusing to replace it: \
         remove it or choose another path"
    )]
    NotASocket { path: PathBuf },
    #[error(
        "control.socket: another process is serving {path} (another agiproxy replica?); \
         give each replica its own control.socket"
    )]
    InUse { path: PathBuf },
    // `error`, not `source`: the message carries it, and anyhow's `{:#}`
    // would print a source a second time.
    #[error("control.socket: {path}: {action}: {error}")]
    Io {
        path: PathBuf,
        action: &'static str,
        error: io::Error,
    },
}

/// The socket file this process created; removed when dropped, unless
/// something else has been put in its place since.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// The file's owner: the proxy's (effective) user.
    pub owner: u32,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds `path` with mode 0600. A socket file nobody serves (left by a
/// process that died) is removed first; a live socket, or anything that is
/// not a socket (a regular file, a symlink, a directory), is refused.
pub async fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    let io = |action: &'static str| {
        let path = path.to_path_buf();
        move |error| SocketError::Io {
            path,
            action,
            error,
        }
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path).await {
            Ok(_) => {
                return Err(SocketError::InUse {
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(io("cannot remove the stale socket"))?;
                tracing::info!(path = %path.display(), "removed a stale control socket");
            }
            Err(e) => return Err(io("cannot tell whether the socket is in use")(e)),
        },
        Ok(_) => {
            return Err(SocketError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot inspect")(e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| {
        let action = if e.kind() == io::ErrorKind::NotFound {
            "cannot listen (create its directory first, e.g. systemd's RuntimeDirectory=)"
        } else {
            "cannot listen"
        };
        io(action)(e)
    })?;
    // The umask may have left the socket open to others for an instant;
    // requests from another user are refused by their peer credentials too.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("cannot set mode 0600"))?;
    let m = std::fs::symlink_metadata(path).map_err(io("cannot inspect"))?;
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            owner: m.uid(),
        },
    ))
}
