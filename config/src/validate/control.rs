//! The control API block: where it listens, how callers authenticate, limits.
//! No block, no control API: nothing is opened that the file does not ask for.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::duration;
use crate::error::Errors;
use crate::model::{Control, ControlTls, Limits, PeerTls, Peers, Route, TokenSource};
use crate::raw::{RawControl, RawPeerTls};

use super::checks;

pub(super) fn compile(raw: Option<&RawControl>, limits: &Limits, errs: &mut Errors) -> Control {
    // A config PUT is a config text: by default the body may be as large as a config may be.
    let mut c = Control {
        max_body_bytes: limits.max_config_bytes,
        ..Control::default()
    };
    let Some(raw) = raw else { return c };
    c.enabled = raw.enabled.unwrap_or(true);
    if let Some(text) = &raw.address {
        match checks::control_address(text) {
            Ok(a) => c.address = Some(a),
            Err(m) => errs.push("control.address", m),
        }
    }
    if let Some(text) = &raw.socket {
        match socket_path(text) {
            Ok(p) => c.socket = Some(p),
            Err(m) => errs.push("control.socket", m),
        }
    }
    c.token = match (&raw.token_file, &raw.token_env) {
        (Some(_), Some(_)) => {
            errs.push("control", "both token_file and token_env are set; keep one");
            None
        }
        (Some(f), None) if f.trim().is_empty() => {
            errs.push(
                "control.token_file",
                "empty; name the file that holds the token",
            );
            None
        }
        (Some(f), None) => Some(TokenSource::File(PathBuf::from(f))),
        (None, Some(v)) if !valid_env_name(v) => {
            errs.push(
                "control.token_env",
                format!("{v:?} is not an environment variable name (letters, digits, _)"),
            );
            None
        }
        (None, Some(v)) => Some(TokenSource::Env(v.clone())),
        (None, None) => None,
    };
    if let Some(tls) = &raw.tls {
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                let (cert, key) = (PathBuf::from(cert), PathBuf::from(key));
                let client_ca = tls.client_ca.as_ref().map(PathBuf::from);
                let peers = peer_tls(tls.peers.as_ref(), &cert, &key, client_ca.as_ref(), errs);
                c.tls = Some(ControlTls {
                    cert,
                    key,
                    client_ca,
                    peers,
                })
            }
            _ => errs.push(
                "control.tls",
                "needs both cert and key (PEM files); client_ca is optional",
            ),
        }
    }
    if let Some(n) = raw.max_body_bytes {
        if !(1024..=64 << 20).contains(&n) {
            errs.push(
                "control.max_body_bytes",
                format!("{n} is out of range; use 1024 to 67108864"),
            );
        } else {
            c.max_body_bytes = n as usize;
        }
    }
    if let Some(t) = &raw.request_timeout {
        match duration::parse(&t.0) {
            Ok(d) if d >= Duration::from_millis(100) => c.request_timeout = d,
            Ok(_) => errs.push("control.request_timeout", "too short; use at least 100ms"),
            Err(m) => errs.push("control.request_timeout", m),
        }
    }
    // No default port (see docs/control-api.md): a block that enables the
    // API must say where it listens. Checked only when neither was given or
    // mistyped, so a typo is not reported twice.
    if c.enabled && raw.address.is_none() && raw.socket.is_none() {
        errs.push(
            "control",
            "no address and no socket: add address: \"127.0.0.1:PORT\" (HTTP: probes, \
             metrics, ctl --url) and/or socket: /run/agiproxy/control.sock (local admin, \
             ctl --socket), or remove the control block to run without a control API",
        );
    }
    if c.tls.is_some() && raw.address.is_none() && raw.socket.is_some() {
        errs.push(
            "control.tls",
            "TLS applies to control.address, which is not set (the socket is plain HTTP)",
        );
    }
    c
}

/// How rollout judgement reads the other replicas, which serve TLS as this
/// one does: their CA defaults to `client_ca` (one fleet CA), the
/// certificate presented to them to this replica's own when `client_ca`
/// asks callers for one.
fn peer_tls(
    raw: Option<&RawPeerTls>,
    cert: &Path,
    key: &Path,
    client_ca: Option<&PathBuf>,
    errs: &mut Errors,
) -> PeerTls {
    let empty = RawPeerTls::default();
    let raw = raw.unwrap_or(&empty);
    let client_cert = match (&raw.cert, &raw.key) {
        (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
        (None, None) => client_ca.map(|_| (cert.to_path_buf(), key.to_path_buf())),
        _ => {
            errs.push(
                "control.tls.peers",
                "cert and key go together (the certificate this replica presents to its peers)",
            );
            None
        }
    };
    let server_name = raw.server_name.as_deref().and_then(|text| {
        let text = text.trim();
        if text.parse::<std::net::IpAddr>().is_ok() {
            return Some(text.to_string());
        }
        match checks::dns_name(text) {
            Ok(n) => Some(n.trim_end_matches('.').to_string()),
            Err(m) => {
                errs.push(
                    "control.tls.peers.server_name",
                    format!("{m}; write the name every replica's certificate carries, e.g. agiproxy-control.ivr.svc"),
                );
                None
            }
        }
    });
    PeerTls {
        ca: raw
            .ca
            .as_ref()
            .map(PathBuf::from)
            .or_else(|| client_ca.cloned()),
        client_cert,
        server_name,
    }
}

/// Peers serve TLS as this replica does: judgement and the start's
/// adoption that read peers must be able to verify them, or a bad green
/// could go on unjudged (no replica alone may reach `min_sessions`), and
/// the token is never sent to an unverified peer.
pub(super) fn check_rollout_peers(c: &Control, routes: &[Route], errs: &mut Errors) {
    let Some(tls) = &c.tls else { return };
    if tls.peers.ca.is_some() {
        return;
    }
    for (i, r) in routes.iter().enumerate() {
        let Some(ro) = &r.rollout else { continue };
        // Judged or not: a replica that starts asks them for the rollout's
        // overrides (`rollout::adopt`).
        if ro.judge.peers != Peers::None {
            errs.push(
                format!("routes[{i}].rollout.judge.peers"),
                "the peers' control APIs serve TLS (control.tls), and nothing says which CA \
                 signed their certificates: set control.tls.peers.ca (or control.tls.client_ca)",
            );
        }
    }
}

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes
/// on Linux, with its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

fn socket_path(text: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(text);
    if text.trim().is_empty() {
        return Err("is empty; write a path, e.g. /run/agiproxy/control.sock".into());
    }
    if !p.is_absolute() {
        // `run` and `ctl` usually start in different directories.
        return Err(format!(
            "{text:?} is relative; write an absolute path, e.g. /run/agiproxy/control.sock"
        ));
    }
    if text.len() > MAX_SOCKET_PATH {
        return Err(format!(
            "{} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}",
            text.len()
        ));
    }
    Ok(p)
}

fn valid_env_name(v: &str) -> bool {
    !v.is_empty()
        && !v.starts_with(|ch: char| ch.is_ascii_digit())
        && v.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}
