//! TLS for the control API (rustls, ring provider): the server's
//! certificate, optional client-certificate auth against a CA, and the
//! client side for `ctl`. PEM is read through rustls-pki-types.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

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
    PrivateKeyDer::from_pem_slice(&pem(path)?).map_err(|e| format!("{}: {e}", path.display()))
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
    let config = builder
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(|e| format!("cert/key: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
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
    let Some(ca) = &tls.ca else {
        return Err(
            "https needs --ca FILE (the CA that signed the control API's certificate)".into(),
        );
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca)?);
    let config = match (&tls.cert, &tls.key) {
        (Some(c), Some(k)) => builder
            .with_client_auth_cert(certs(c)?, key(k)?)
            .map_err(|e| format!("client cert: {e}"))?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("a client certificate needs both --cert and --key".into()),
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// TLS settings that follow their PEM files. Certificates are renewed in
/// place (cert-manager, the kubelet's Secret volumes), and a replica that
/// runs for months must not serve, or present, one that has expired.
pub struct Reloading<T> {
    current: ArcSwap<T>,
    files: Watched,
    build: Box<dyn Fn() -> Result<T, String> + Send + Sync>,
}

impl<T> Reloading<T> {
    fn new(
        paths: Vec<PathBuf>,
        build: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Reloading<T>, String> {
        let files = Watched::new(paths);
        let first = build()?;
        Ok(Reloading {
            current: ArcSwap::from_pointee(first),
            files,
            build: Box::new(build),
        })
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
            Ok(t) => {
                self.current.store(Arc::new(t));
                Refresh::Reloaded
            }
            Err(e) => Refresh::Refused(e),
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
    Reloading::new(paths, move || acceptor(&f))
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
    Reloading::new(paths, move || connector(&t))
}
