//! TLS for the control API (rustls, ring provider): the server's
//! certificate, optional client-certificate auth against a CA, and the
//! client side for `ctl`. PEM is read through rustls-pki-types.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};

use arc_swap::{ArcSwap, ArcSwapOption};

pub use crate::files::Refresh;
use crate::files::{read_bounded, Watched};
/// The types the settings are built into, for crates that hold them.
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA.
    pub client_ca: Option<PathBuf>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The largest PEM file read: a chain of a dozen certificates is a few
/// tens of KiB. A path that names something else (a device, a FIFO, a huge
/// file by mistake) is refused before it is read.
pub const MAX_PEM_BYTES: u64 = 1 << 20;

fn pem(path: &Path) -> Result<Vec<u8>, String> {
    read_bounded(path, MAX_PEM_BYTES)
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = pem(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = pem(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        // rustls-pki-types says "no items found" for both.
        if bytes.windows(21).any(|w| w == b"ENCRYPTED PRIVATE KEY") {
            format!(
                "{}: the key is encrypted, which is not supported; write it unencrypted \
                 (e.g. openssl pkcs8 -in KEY -out KEY.plain), readable by the proxy only",
                path.display()
            )
        } else {
            format!("{}: no private key in the file ({e})", path.display())
        }
    })
}

/// When a certificate may be used, in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    /// The leaf's (the first certificate of a chain); None when it cannot
    /// be read as X.509 (rustls then refuses it on its own).
    pub fn of(cert: &CertificateDer<'_>) -> Option<Validity> {
        let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        Some(Validity {
            not_before: c.validity().not_before.timestamp(),
            not_after: c.validity().not_after.timestamp(),
        })
    }

    /// Whether it is valid at `now` (seconds since the epoch).
    pub fn holds_at(&self, now: i64) -> bool {
        (self.not_before..=self.not_after).contains(&now)
    }
}

impl std::fmt::Display for Validity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = |s: i64| {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.max(0) as u64);
            humantime::format_rfc3339_seconds(t).to_string()
        };
        write!(
            f,
            "valid from {} to {}",
            at(self.not_before),
            at(self.not_after)
        )
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for c in certs(path)? {
        store
            .add(c)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(store)
}

/// The server side.
pub fn acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, String> {
    acceptor_and_validity(files).map(|(a, _)| a)
}

/// The server side, and its certificate's validity.
fn acceptor_and_validity(
    files: &TlsFiles,
) -> Result<(tokio_rustls::TlsAcceptor, Option<Validity>), String> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| format!("client_ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let chain = certs(&files.cert)?;
    let validity = Validity::of(&chain[0]);
    let config = builder
        .with_single_cert(chain, key(&files.key)?)
        .map_err(|e| {
            format!(
                "cert {} / key {}: {e} (the key must be the certificate's, and the \
                 certificate first in its file, before its chain)",
                files.cert.display(),
                files.key.display()
            )
        })?;
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), validity))
}

/// What `ctl` trusts and presents.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// CA that signed the server's certificate.
    pub ca: Option<PathBuf>,
    /// Client certificate and key, for client-certificate auth.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The client side.
pub fn connector(tls: &ClientTls) -> Result<tokio_rustls::TlsConnector, String> {
    connector_and_validity(tls).map(|(c, _)| c)
}

/// The client side, and the validity of the certificate it presents.
fn connector_and_validity(
    tls: &ClientTls,
) -> Result<(tokio_rustls::TlsConnector, Option<Validity>), String> {
    let Some(ca) = &tls.ca else {
        return Err(
            "https needs --ca FILE (the CA that signed the control API's certificate)".into(),
        );
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca)?);
    let (config, validity) = match (&tls.cert, &tls.key) {
        (Some(c), Some(k)) => {
            let chain = certs(c)?;
            let validity = Validity::of(&chain[0]);
            let config = builder
                .with_client_auth_cert(chain, key(k)?)
                .map_err(|e| format!("client cert {} / key {}: {e}", c.display(), k.display()))?;
            (config, validity)
        }
        (None, None) => (builder.with_no_client_auth(), None),
        _ => return Err("a client certificate needs both --cert and --key".into()),
    };
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), validity))
}

/// TLS settings that follow their PEM files. Certificates are renewed in
/// place (cert-manager, the kubelet's Secret volumes), and a replica that
/// runs for months must not serve, or present, one that has expired.
pub struct Reloading<T> {
    current: ArcSwap<T>,
    /// The validity of the certificate `current` serves or presents.
    validity: ArcSwapOption<Validity>,
    files: Watched,
    build: Builder<T>,
    /// The certificate refused as not valid yet, read again at every look
    /// until it is: refused (counted, warned of) once, not at every look.
    waiting: std::sync::Mutex<Option<Validity>>,
}

type Builder<T> = Box<dyn Fn() -> Result<(T, Option<Validity>), String> + Send + Sync>;

impl<T> Reloading<T> {
    fn new(
        paths: Vec<PathBuf>,
        build: impl Fn() -> Result<(T, Option<Validity>), String> + Send + Sync + 'static,
    ) -> Result<Reloading<T>, String> {
        let files = Watched::new(paths);
        let (first, validity) = build()?;
        Ok(Reloading {
            current: ArcSwap::from_pointee(first),
            validity: ArcSwapOption::from(validity.map(Arc::new)),
            files,
            build: Box::new(build),
            waiting: std::sync::Mutex::new(None),
        })
    }

    /// The validity of the certificate in use (None: no certificate, or
    /// one that could not be read as X.509).
    pub fn validity(&self) -> Option<Validity> {
        self.validity.load().as_deref().copied()
    }

    /// Why the certificate in use is not valid now, if it is not: said at
    /// start, where it is used all the same (refusing it would take the
    /// replica down for its control API), and by the metric of its expiry.
    pub fn not_valid_now(&self) -> Option<String> {
        self.validity()
            .filter(|v| !v.holds_at(now_secs()))
            .map(|v| format!("the certificate is not valid now ({v})"))
    }

    /// The settings in use.
    pub fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// The files it follows.
    pub fn paths(&self) -> &[PathBuf] {
        self.files.paths()
    }

    /// Reads the files again if any changed since the last look. Blocking
    /// (`stat`, and reading the files): call it off the async runtime.
    pub fn refresh(&self) -> Refresh {
        if !self.files.changed() {
            return Refresh::Unchanged;
        }
        match (self.build)() {
            // A renewal that put an expired (or not yet valid) certificate
            // in place of a valid one would break every client at once
            // (audit): the one in use stays until the files hold a usable one.
            Ok((_, Some(new))) if !new.holds_at(now_secs()) && self.not_valid_now().is_none() => {
                // Not valid yet (a renewal picked up a moment before its
                // start, a CA's clock ahead): read again at every look
                // until it is, not only when the files change again (review).
                let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
                let again = *waiting == Some(new);
                *waiting = None;
                if now_secs() < new.not_before {
                    self.files.look_again();
                    *waiting = Some(new);
                }
                if again {
                    // The same certificate, still not valid: said already.
                    return Refresh::Unchanged;
                }
                Refresh::Refused(format!(
                    "the new certificate is not valid now ({new}); the one in use is kept"
                ))
            }
            Ok((t, validity)) => {
                *self.waiting.lock().unwrap_or_else(PoisonError::into_inner) = None;
                self.current.store(Arc::new(t));
                self.validity.store(validity.map(Arc::new));
                Refresh::Reloaded
            }
            Err(e) => {
                *self.waiting.lock().unwrap_or_else(PoisonError::into_inner) = None;
                Refresh::Refused(e)
            }
        }
    }
}

/// The server side, following its files.
pub fn reloading_acceptor(
    files: &TlsFiles,
) -> Result<Reloading<tokio_rustls::TlsAcceptor>, String> {
    let f = files.clone();
    let paths = [Some(&f.cert), Some(&f.key), f.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    Reloading::new(paths, move || acceptor_and_validity(&f))
}

/// The client side, following its files.
pub fn reloading_connector(
    tls: &ClientTls,
) -> Result<Reloading<tokio_rustls::TlsConnector>, String> {
    let t = tls.clone();
    let paths = [t.ca.as_ref(), t.cert.as_ref(), t.key.as_ref()]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    Reloading::new(paths, move || connector_and_validity(&t))
}
