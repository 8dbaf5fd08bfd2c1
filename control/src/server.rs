//! The control API server: axum routes over the `ControlPlane`, a bearer
//! token compared in constant time, optional TLS (and client certificates),
//! a body limit and a request deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::api::{ErrorBody, SplitRequest};
use crate::plane::{ControlError, ControlPlane};
use crate::tls::TlsFiles;

/// How the control API is served.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub address: SocketAddr,
    /// Bearer token for `/v1/*`; None leaves them open (loopback only).
    pub token: Option<String>,
    pub tls: Option<TlsFiles>,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("control.address: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("control.tls: {0}")]
    Tls(String),
}

struct Ctx<P> {
    plane: Arc<P>,
    token: Option<String>,
}

/// A bound control API; `serve` runs it until `shutdown` resolves.
pub struct ControlServer {
    listener: TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    request_timeout: Duration,
}

impl ControlServer {
    pub async fn bind<P: ControlPlane>(
        plane: Arc<P>,
        opts: ServeOptions,
    ) -> Result<ControlServer, ServeError> {
        let tls = match &opts.tls {
            Some(files) => Some(crate::tls::acceptor(files).map_err(ServeError::Tls)?),
            None => None,
        };
        let listener =
            TcpListener::bind(opts.address)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: opts.address,
                    source,
                })?;
        let app = router(plane, opts.token, opts.max_body_bytes, opts.request_timeout);
        Ok(ControlServer {
            listener,
            app,
            tls,
            request_timeout: opts.request_timeout,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves connections until `shutdown` completes.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()> + Send) {
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = &mut shutdown => break,
                r = self.listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "control API accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let app = self.app.clone();
            let tls = self.tls.clone();
            let handshake_timeout = self.request_timeout;
            tokio::spawn(async move {
                let service = TowerToHyperService::new(app);
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new())
                    .header_read_timeout(handshake_timeout);
                let result = match tls {
                    Some(acceptor) => {
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => {
                                http.serve_connection(TokioIo::new(stream), service).await
                            }
                            Ok(Err(e)) => {
                                tracing::info!(%peer, error = %e, "control API TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        }
                    }
                    None => http.serve_connection(TokioIo::new(tcp), service).await,
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "control API connection ended");
                }
            });
        }
    }
}

/// The routes, for serving or for in-process tests.
pub fn router<P: ControlPlane>(
    plane: Arc<P>,
    token: Option<String>,
    max_body: usize,
    timeout: Duration,
) -> Router {
    let ctx = Arc::new(Ctx { plane, token });
    let v1 = Router::new()
        .route("/v1/status", get(status::<P>))
        .route("/v1/config", get(config_get::<P>).put(config_put::<P>))
        .route("/v1/reload", post(reload::<P>))
        .route("/v1/pools", get(pools::<P>))
        .route("/v1/pools/{pool}", get(pool::<P>))
        .route(
            "/v1/pools/{pool}/backends/{backend}/drain",
            post(|s: S<P>, p| backend_draining(s, p, true)),
        )
        .route(
            "/v1/pools/{pool}/backends/{backend}/enable",
            post(|s: S<P>, p| backend_draining(s, p, false)),
        )
        .route("/v1/routes/{route}/split", put(split::<P>))
        .route("/v1/drain", post(drain::<P>))
        .route_layer(middleware::from_fn_with_state(ctx.clone(), auth::<P>));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<P>))
        .route("/metrics", get(metrics::<P>))
        .merge(v1)
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such endpoint; see docs/control-api.md",
            )
        })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        // Outside the timeout, so a request cut by it is counted too.
        .layer(middleware::from_fn_with_state(ctx.clone(), observe::<P>))
        .layer(middleware::from_fn_with_state(
            Limits { max_body, timeout },
            json_errors,
        ))
        .with_state(ctx)
}

/// What the framework's own refusals refer to.
#[derive(Clone, Copy)]
struct Limits {
    max_body: usize,
    timeout: Duration,
}

/// The refusals that axum and tower produce themselves (a body over the
/// limit, a request over time, a method a path does not have, a query or
/// body that does not parse) come as plain text or empty; clients of this
/// API parse one error shape, so they get it here too, naming the setting
/// to change. Headers such as `Allow` are kept.
async fn json_errors(State(limits): State<Limits>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let framework = matches!(
        status,
        StatusCode::BAD_REQUEST
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::REQUEST_TIMEOUT
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNSUPPORTED_MEDIA_TYPE
            | StatusCode::UNPROCESSABLE_ENTITY
    );
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !framework || json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    // The framework's texts are one line; never read more than a little.
    let text = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, 4096))
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
        .unwrap_or_default();
    let msg = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "the request body is over control.max_body_bytes ({} bytes)",
            limits.max_body
        ),
        StatusCode::REQUEST_TIMEOUT => format!(
            "the request took longer than control.request_timeout ({:?})",
            limits.timeout
        ),
        StatusCode::METHOD_NOT_ALLOWED => {
            "method not allowed on this path (see the Allow header and docs/control-api.md)".into()
        }
        _ if text.is_empty() => status.canonical_reason().unwrap_or("bad request").into(),
        _ => text,
    };
    let mut out = error(status, msg);
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

type S<P> = State<Arc<Ctx<P>>>;

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: msg.into(),
            errors: vec![],
            generation: None,
        }),
    )
        .into_response()
}

fn control_error(e: ControlError) -> Response {
    let (status, body) = match &e {
        ControlError::Invalid(errors) => (
            StatusCode::BAD_REQUEST,
            ErrorBody {
                error: "the config is invalid; nothing was changed".into(),
                errors: errors.clone(),
                generation: None,
            },
        ),
        ControlError::Stale { current } => (
            StatusCode::PRECONDITION_FAILED,
            ErrorBody {
                error: e.to_string(),
                errors: vec![],
                generation: Some(*current),
            },
        ),
        ControlError::NotFound(_) => (
            StatusCode::NOT_FOUND,
            ErrorBody {
                error: e.to_string(),
                errors: vec![],
                generation: None,
            },
        ),
        ControlError::Conflict(_) => (
            StatusCode::CONFLICT,
            ErrorBody {
                error: e.to_string(),
                errors: vec![],
                generation: None,
            },
        ),
        ControlError::Unavailable(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody {
                error: e.to_string(),
                errors: vec![],
                generation: None,
            },
        ),
    };
    (status, Json(body)).into_response()
}

async fn auth<P: ControlPlane>(State(ctx): S<P>, req: Request, next: Next) -> Response {
    let Some(token) = &ctx.token else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
        .map(str::trim);
    // Compared as SHA-256 digests, in constant time: equal lengths always,
    // so neither the content nor the length of the token leaks through
    // how fast a wrong one is refused.
    let digest = |b: &str| ring::digest::digest(&ring::digest::SHA256, b.as_bytes());
    let ok =
        presented.is_some_and(|p| bool::from(digest(p).as_ref().ct_eq(digest(token).as_ref())));
    if ok {
        return next.run(req).await;
    }
    let msg = if presented.is_none() {
        "missing bearer token"
    } else {
        "wrong bearer token"
    };
    let mut resp = error(StatusCode::UNAUTHORIZED, msg);
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

async fn observe<P: ControlPlane>(State(ctx): S<P>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |m| m.as_str().to_string());
    let resp = next.run(req).await;
    ctx.plane.observe_request(&endpoint, resp.status().as_u16());
    resp
}

async fn readyz<P: ControlPlane>(State(ctx): S<P>) -> Response {
    if ctx.plane.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics<P: ControlPlane>(State(ctx): S<P>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ctx.plane.metrics_text(),
    )
        .into_response()
}

async fn status<P: ControlPlane>(State(ctx): S<P>) -> Response {
    Json(ctx.plane.status()).into_response()
}

async fn config_get<P: ControlPlane>(State(ctx): S<P>, headers: HeaderMap) -> Response {
    let view = ctx.plane.config();
    let wants_yaml = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("yaml"));
    let mut resp = if wants_yaml {
        (
            [(header::CONTENT_TYPE, "application/yaml")],
            view.text.clone(),
        )
            .into_response()
    } else {
        Json(&view).into_response()
    };
    if let Ok(v) = header::HeaderValue::from_str(&view.generation.to_string()) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

#[derive(Deserialize)]
struct DryRun {
    #[serde(default)]
    dry_run: bool,
}

/// `If-Match: <generation>` (quotes allowed, as for an ETag).
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, Box<Response>> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or("").trim().trim_matches('"');
    text.parse().map(Some).map_err(|_| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("If-Match: {text:?} is not a generation number"),
        ))
    })
}

async fn config_put<P: ControlPlane>(
    State(ctx): S<P>,
    Query(q): Query<DryRun>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let expect = match if_match(&headers) {
        Ok(g) => g,
        Err(resp) => return *resp,
    };
    match ctx.plane.apply_config(body, q.dry_run, expect).await {
        Ok(applied) => Json(applied).into_response(),
        Err(e) => control_error(e),
    }
}

async fn reload<P: ControlPlane>(State(ctx): S<P>) -> Response {
    match ctx.plane.reload_file().await {
        Ok(applied) => Json(applied).into_response(),
        Err(e) => control_error(e),
    }
}

async fn pools<P: ControlPlane>(State(ctx): S<P>) -> Response {
    Json(ctx.plane.pools()).into_response()
}

async fn pool<P: ControlPlane>(State(ctx): S<P>, Path(name): Path<String>) -> Response {
    match ctx.plane.pools().into_iter().find(|p| p.name == name) {
        Some(p) => Json(p).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no pool {name:?}")),
    }
}

/// `drain` (true) or `enable` (false) one backend.
async fn backend_draining<P: ControlPlane>(
    State(ctx): S<P>,
    Path((pool, backend)): Path<(String, String)>,
    draining: bool,
) -> Response {
    match ctx.plane.set_backend_draining(&pool, &backend, draining) {
        Ok(v) => Json(v).into_response(),
        Err(e) => control_error(e),
    }
}

async fn split<P: ControlPlane>(
    State(ctx): S<P>,
    Path(route): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let expect = match if_match(&headers) {
        Ok(g) => g,
        Err(resp) => return *resp,
    };
    let req: SplitRequest = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                "body: {e}; expected {{\"split\": [{{\"pool\": \"blue\", \"weight\": 90}}, ...]}}"
            ),
            )
        }
    };
    match ctx.plane.set_split(&route, req.split, expect).await {
        Ok(applied) => Json(applied).into_response(),
        Err(e) => control_error(e),
    }
}

async fn drain<P: ControlPlane>(State(ctx): S<P>) -> Response {
    ctx.plane.drain();
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "draining": true })),
    )
        .into_response()
}
