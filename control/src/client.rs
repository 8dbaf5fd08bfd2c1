//! A small HTTP/1 client for the control API (plain, TLS, or over the
//! control socket), used by `ctl`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpStream, UnixStream};

/// Where a replica's control API is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `control.address`.
    Tcp(SocketAddr),
    /// `control.socket` (plain HTTP; the file's permissions are the credential).
    Unix(PathBuf),
}

impl From<SocketAddr> for Address {
    fn from(a: SocketAddr) -> Self {
        Address::Tcp(a)
    }
}

/// One replica's control API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: Address,
    pub https: bool,
    /// The name its TLS certificate carries (and the Host header).
    pub host: String,
}

impl Target {
    /// Plain HTTP to `addr`.
    pub fn http(addr: SocketAddr) -> Target {
        Target {
            addr: Address::Tcp(addr),
            https: false,
            host: addr.ip().to_string(),
        }
    }

    /// HTTPS to `addr`, whose certificate must carry `name` (a DNS name or
    /// an IP address).
    pub fn https(addr: SocketAddr, name: impl Into<String>) -> Target {
        Target {
            addr: Address::Tcp(addr),
            https: true,
            host: name.into(),
        }
    }

    /// The control socket at `path`.
    pub fn socket(path: impl Into<PathBuf>) -> Target {
        Target {
            addr: Address::Unix(path.into()),
            https: false,
            host: "localhost".into(),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.addr {
            Address::Tcp(a) => write!(f, "{}://{a}", if self.https { "https" } else { "http" }),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{target}: cannot connect: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("{target}: TLS: {msg}")]
    Tls { target: String, msg: String },
    #[error("{target}: HTTP: {msg}")]
    Http { target: String, msg: String },
    #[error("{target}: no answer within {timeout:?}")]
    Timeout { target: String, timeout: Duration },
    #[error("{target}: the answer's body is over {limit} bytes, the most a client reads")]
    TooLarge { target: String, limit: usize },
}

/// The largest answer body read: the largest config text there can be
/// (`limits.max_config_bytes` at most 64 MiB), which `GET /v1/config`
/// returns. A server (or a peer of the rollout judge) sending more cannot
/// make the client buffer without bound.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

pub struct Client {
    pub token: Option<String>,
    pub tls: Option<tokio_rustls::TlsConnector>,
    pub timeout: Duration,
}

impl Client {
    pub async fn call(
        &self,
        target: &Target,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Response, ClientError> {
        self.call_within(MAX_RESPONSE_BYTES, target, method, path, headers, body)
            .await
    }

    /// [`call`](Self::call), reading at most `limit` bytes of the answer's
    /// body (a smaller bound for answers that are small when they come from
    /// an agiproxy: a peer's counters, its status).
    pub async fn call_within(
        &self,
        limit: usize,
        target: &Target,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Response, ClientError> {
        let t = target.to_string();
        match tokio::time::timeout(
            self.timeout,
            self.call_inner(limit, target, method, path, headers, body),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                target: t,
                timeout: self.timeout,
            }),
        }
    }

    async fn call_inner(
        &self,
        limit: usize,
        target: &Target,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Response, ClientError> {
        let t = target.to_string();
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, target.host.as_str());
        if let Some(token) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Http {
                target: t.clone(),
                msg: e.to_string(),
            })?;
        let connect = |source| ClientError::Connect {
            target: t.clone(),
            source,
        };
        let tcp = match &target.addr {
            Address::Tcp(a) => TcpStream::connect(a).await.map_err(connect)?,
            // Plain HTTP only: the file's permissions are the protection.
            Address::Unix(p) => {
                let unix = UnixStream::connect(p).await.map_err(connect)?;
                return send(TokioIo::new(unix), req, &t, limit).await;
            }
        };
        if target.https {
            let connector = self.tls.as_ref().ok_or_else(|| ClientError::Tls {
                target: t.clone(),
                msg: "no TLS settings (--ca)".into(),
            })?;
            let name = ServerName::try_from(target.host.clone()).map_err(|e| ClientError::Tls {
                target: t.clone(),
                msg: e.to_string(),
            })?;
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|e| ClientError::Tls {
                    target: t.clone(),
                    msg: e.to_string(),
                })?;
            send(TokioIo::new(stream), req, &t, limit).await
        } else {
            send(TokioIo::new(tcp), req, &t, limit).await
        }
    }
}

async fn send<I>(
    io: I,
    req: hyper::Request<Full<Bytes>>,
    t: &str,
    limit: usize,
) -> Result<Response, ClientError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let http = |e: hyper::Error| ClientError::Http {
        target: t.to_string(),
        msg: explain(&e),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(http)?;
    let conn = tokio::spawn(conn);
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            // The connection's own error (a TLS alert from a server that
            // wants a client certificate) says more than the request's
            // "connection was not ready", which races with it.
            let own = tokio::time::timeout(Duration::from_millis(500), conn).await;
            return Err(match own {
                Ok(Ok(Err(c))) => http(c),
                _ => http(e),
            });
        }
    };
    let status = resp.status().as_u16();
    let body = http_body_util::Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ClientError::TooLarge {
                    target: t.to_string(),
                    limit,
                }
            } else {
                ClientError::Http {
                    target: t.to_string(),
                    msg: e.to_string(),
                }
            }
        })?
        .to_bytes()
        .to_vec();
    Ok(Response { status, body })
}

/// An error with its causes ("connection error" alone hid a TLS alert),
/// and what to do when the server refused our certificate or its absence.
fn explain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut hint = None;
    let mut cause = e.source();
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        // A TLS error reaches hyper inside an io::Error.
        let tls = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .or_else(|| c.downcast_ref::<rustls::Error>());
        if let Some(rustls::Error::AlertReceived(alert)) = tls {
            use rustls::AlertDescription as A;
            hint = match alert {
                A::CertificateRequired | A::HandshakeFailure => Some(
                    "the control API asks for a client certificate (its tls.client_ca): \
                     ctl takes --cert FILE --key FILE, a replica reading its peers \
                     control.tls.peers.cert and key (default: its own tls.cert and key)",
                ),
                A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::DecryptError => Some(
                    "the control API refused the client certificate: give one its \
                         tls.client_ca signed (ctl: --cert FILE --key FILE; a replica \
                         reading its peers: control.tls.peers.cert and key)",
                ),
                A::CertificateExpired => Some("the client certificate has expired"),
                _ => hint,
            };
        }
        cause = c.source();
    }
    if let Some(h) = hint {
        msg.push_str(" (");
        msg.push_str(h);
        msg.push(')');
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that sends more than [`MAX_RESPONSE_BYTES`]: a clear error
    /// once the limit is passed, not the whole body buffered.
    #[tokio::test]
    async fn an_answer_over_the_limit_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = [0; 1024];
            let _ = s.read(&mut head).await.unwrap();
            let len = MAX_RESPONSE_BYTES + 1;
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
            s.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![b'x'; 1 << 16];
            let mut sent = 0;
            // Until the client hangs up (or the whole body is out).
            while sent < len {
                let n = chunk.len().min(len - sent);
                if s.write_all(&chunk[..n]).await.is_err() {
                    break;
                }
                sent += n;
            }
        });
        let client = Client {
            token: None,
            tls: None,
            timeout: Duration::from_secs(20),
        };
        let err = client
            .call(&Target::http(addr), "GET", "/v1/config", &[], None)
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(err, ClientError::TooLarge { limit, .. } if limit == MAX_RESPONSE_BYTES),
            "{err}"
        );
        assert!(err.to_string().contains("over 67108864 bytes"), "{err}");
        server.abort();
    }
}
