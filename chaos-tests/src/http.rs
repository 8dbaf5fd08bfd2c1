//! One plain HTTP/1.1 `GET` to the control API, as `curl` would send it:
//! what tests need to read `/metrics` or `/healthz`, without an HTTP client
//! library. Every step is bounded by [`TIMEOUT`]; any failure (refused,
//! reset, timed out, not HTTP) is `None`. And [`serve`], a fake control API
//! for tests that play a peer replica.

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

/// A fake HTTP/1.1 server on loopback, for tests that play a control API
/// (a peer replica): each request's head (request line and headers) goes
/// to `answer`; `Some(body)` is sent as `200` JSON and the connection
/// closed, `None` holds the connection unanswered (a peer that stalls).
/// Serves until the runtime ends.
pub async fn serve<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(String) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Option<String>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = 0;
                while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) if got + n == buf.len() => return,
                        Ok(n) => got += n,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..got]).into_owned();
                match answer(head).await {
                    Some(body) => {
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.write_all(reply.as_bytes()).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            });
        }
    });
    addr
}
