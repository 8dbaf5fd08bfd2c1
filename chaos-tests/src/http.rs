//! One plain HTTP/1.1 `GET` to the control API, as `curl` would send it:
//! what tests need to read `/metrics` or `/healthz`, without an HTTP client
//! library. Every step is bounded by [`TIMEOUT`]; any failure (refused,
//! reset, timed out, not HTTP) is `None`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The bound on connecting, and on the whole exchange after it.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A response: its status code and its body as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// `GET path` on `addr`, `Connection: close`.
pub async fn get(addr: SocketAddr, path: &str) -> Option<Response> {
    get_with(addr, path, None).await
}

/// The same, with `Authorization: Bearer TOKEN` when `token` is given.
pub async fn get_with(addr: SocketAddr, path: &str, token: Option<&str>) -> Option<Response> {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    let mut s = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let exchange = async {
        s.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.ok()?;
        Some(raw)
    };
    let raw = tokio::time::timeout(TIMEOUT, exchange).await.ok()??;
    let text = String::from_utf8_lossy(&raw);
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_owned();
    Some(Response { status, body })
}
