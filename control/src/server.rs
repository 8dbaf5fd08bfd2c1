//! The control API server: axum routes over the `ControlPlane` on a TCP
//! listener (optional TLS) and/or a Unix socket, a body limit and a budget
//! on the bodies held at once (see `budget`), a request
//! deadline, and bounds on each connection (a share of the cap per peer, a
//! write deadline, a lifetime: see `conn`).
//!
//! Access is decided in one place, [`guard`], laid over every route: only
//! the read-only requests listed in [`OPEN`] are served without a
//! credential (and a method an open path does not serve gets its 405
//! without one); every other route, including any added later, needs one
//! (a bearer token compared in constant time, or the control socket). With
//! no token configured, those routes answer 403 on TCP, on any address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put, MethodRouter};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, UnixListener};

use crate::conn::{Peer, Slot, Slots, Taken, WriteDeadline};
use crate::handlers::{self as h, error, Ctx, S};
use crate::plane::ControlPlane;
use crate::socket::{SocketError, SocketFile};
use crate::tls::{Reloading, TlsFiles};
use crate::token::Tokens;

/// The only requests served without a credential: what probes, Prometheus
/// and a convergence check need, all read-only (HEAD counts as GET).
/// `GET /v1/status` holds version, generation, config hash, sessions and
/// draining, which `/metrics` and `/readyz` publish already. Every other
/// route needs a credential, whatever its method.
pub const OPEN: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/status"),
];

/// Connections served at once (TCP and socket together); beyond it a new
/// connection is closed at once. Idle connections (a flood of 1,000 once
/// took a proxy's last descriptors) then cannot starve calls: the proxy
/// keeps a descriptor reserve above this for the control API and health
/// checks.
pub const MAX_CONNECTIONS: usize = 64;

/// Connections one peer (an IPv4 address, an IPv6 /64, or the control
/// socket) may hold at once: a quarter of [`MAX_CONNECTIONS`], so that one
/// client cannot take every slot and shut out the kubelet's probes or
/// Prometheus. Legitimate clients use one or two.
pub const MAX_CONNECTIONS_PER_PEER: usize = MAX_CONNECTIONS / 4;

/// A connection lives at most this many `request_timeout`s; then it is
/// closed once the answer in flight is written, or `request_timeout` later
/// at the latest. Every time a peer can hold a slot is thus bounded, even
/// for a client that reads its answers a trickle at a time.
pub const LIFETIME_IN_REQUEST_TIMEOUTS: u32 = 10;

/// Why a connection was closed by the server rather than by its client:
/// the TLS handshake failed (no client certificate, a wrong one, plain
/// HTTP to the TLS port) or did not finish within `request_timeout`; the
/// API was at [`MAX_CONNECTIONS`], or the peer at
/// [`MAX_CONNECTIONS_PER_PEER`]; a peer holding fewer took the
/// connection's slot at the cap (`evicted`, see [`Slots`]); or the client stopped taking its answers
/// (no byte for `request_timeout`, or an answer not taken by the end of
/// the connection's life).
pub const REFUSED_REASONS: [&str; 7] = [
    "tls_handshake",
    "tls_timeout",
    "connection_cap",
    "peer_cap",
    "evicted",
    "write_timeout",
    "accept_failed",
];

/// How the control API is served. At least one of `address` and `socket`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The HTTP listener (probes, metrics, `ctl --url`).
    pub address: Option<SocketAddr>,
    /// A Unix socket (mode 0600) accepting every endpoint without a token.
    pub socket: Option<PathBuf>,
    /// Bearer token for every endpoint but [`OPEN`] on `address`; None
    /// refuses them there (403).
    pub token: Option<String>,
    pub tls: Option<TlsFiles>,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    // `error`, not `source`: the message carries it, and anyhow's `{:#}`
    // would print a source a second time.
    #[error(
        "control.address: cannot listen on {addr}: {error}{}",
        if error.kind() == std::io::ErrorKind::AddrInUse {
            "; another process holds that port (another agiproxy on this host?): give each \
             replica its own control.address port, or remove the control block"
        } else {
            ""
        }
    )]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("control.tls: {0}")]
    Tls(String),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("control: set address or socket (or both); the control API has nowhere to listen")]
    Nowhere,
}

/// Marks a request that came over the control socket, with the peer's
/// user id as the kernel reports it (set per connection).
#[derive(Debug, Clone, Copy)]
struct SocketPeer {
    uid: Option<u32>,
}

/// One route: its method and path template (as in `MatchedPath`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
}

impl Endpoint {
    /// Served without a credential (listed in [`OPEN`]).
    pub fn open(&self) -> bool {
        is_open(&self.method, self.path)
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

fn is_open(method: &Method, path: &str) -> bool {
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    OPEN.iter().any(|&(m, p)| m == method && p == path)
}

/// `method` is one that `path`, an open path, does not serve at all (HEAD
/// counts as GET). Its 405 and `Allow` reveal nothing an open path does
/// not publish already, so it needs no credential; a method the path does
/// serve stays guarded unless [`OPEN`] lists it.
fn unserved_on_open_path(served: &[(Method, &str)], method: &Method, path: &str) -> bool {
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    OPEN.iter().any(|&(_, p)| p == path) && !served.iter().any(|(m, p)| *p == path && m == method)
}

/// A bound control API; `serve` runs it until `shutdown` resolves.
pub struct ControlServer {
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, SocketFile)>,
    app: Router,
    endpoints: Vec<Endpoint>,
    has_token: bool,
    tls: Option<Arc<Reloading<tokio_rustls::TlsAcceptor>>>,
    request_timeout: Duration,
    /// Counts a connection refused before any request (the plane's
    /// `observe_refused_connection`).
    refused: Arc<dyn Fn(&'static str) + Send + Sync>,
}

/// A control API whose TLS files are read and whose listener and/or socket are bound, not
/// yet serving: the binary prepares it before it starts the proxy's listeners, so that a bad
/// control config stops it before any call is accepted.
pub struct PreparedControl {
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, SocketFile)>,
    tls: Option<Arc<Reloading<tokio_rustls::TlsAcceptor>>>,
    tokens: Option<Arc<Tokens>>,
    opts: ServeOptions,
}

impl PreparedControl {
    pub async fn bind(opts: ServeOptions) -> Result<PreparedControl, ServeError> {
        if opts.address.is_none() && opts.socket.is_none() {
            return Err(ServeError::Nowhere);
        }
        // The PEM files are read on a blocking thread, not a runtime worker.
        let tls = match &opts.tls {
            Some(files) if opts.address.is_some() => {
                let files = files.clone();
                let built =
                    tokio::task::spawn_blocking(move || crate::tls::reloading_acceptor(&files))
                        .await
                        .map_err(|e| ServeError::Tls(e.to_string()))?;
                let built = built.map_err(ServeError::Tls)?;
                if let Some(why) = built.not_valid_now() {
                    tracing::warn!(cert = %files_cert(&opts), "control API TLS: {why}: served all the same, and every client will refuse it; renew it (it is read again when its files change)");
                }
                Some(Arc::new(built))
            }
            _ => None,
        };
        let tcp = match opts.address {
            Some(addr) => Some(bind_tcp(addr).map_err(|error| ServeError::Bind { addr, error })?),
            None => None,
        };
        let unix = match &opts.socket {
            Some(path) => Some(crate::socket::bind(path).await?),
            None => None,
        };
        let tokens = opts.token.clone().map(|t| Arc::new(Tokens::new(t)));
        Ok(PreparedControl {
            tcp,
            unix,
            tls,
            tokens,
            opts,
        })
    }

    /// The TCP listener's address, if there is one.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bearer tokens it accepts (rotated when its file is followed).
    pub fn tokens(&self) -> Option<Arc<Tokens>> {
        self.tokens.clone()
    }

    /// Its TLS settings, which follow their files when refreshed.
    pub fn tls(&self) -> Option<Arc<Reloading<tokio_rustls::TlsAcceptor>>> {
        self.tls.clone()
    }

    /// The API over `plane`, ready to serve; logs once which endpoints are open and which
    /// need (or, with no token, refuse) a credential.
    pub fn with_plane<P: ControlPlane>(self, plane: Arc<P>) -> ControlServer {
        let opts = self.opts;
        let has_token = opts.token.is_some();
        let counter = plane.clone();
        let (app, endpoints) = build(
            plane,
            self.tokens,
            self.unix.as_ref().map(|(_, f)| f.owner),
            opts.max_body_bytes,
            opts.request_timeout,
        );
        let server = ControlServer {
            tcp: self.tcp,
            unix: self.unix,
            app,
            endpoints,
            has_token,
            tls: self.tls,
            request_timeout: opts.request_timeout,
            refused: Arc::new(move |reason| counter.observe_refused_connection(reason)),
        };
        server.log_access(opts.socket.as_deref());
        server
    }
}

impl ControlServer {
    /// Its TLS settings, which follow their files when refreshed.
    pub fn tls(&self) -> Option<Arc<Reloading<tokio_rustls::TlsAcceptor>>> {
        self.tls.clone()
    }

    /// Binds the listener and/or the socket, and logs once which endpoints
    /// are open and which need (or, with no token, refuse) a credential.
    pub async fn bind<P: ControlPlane>(
        plane: Arc<P>,
        opts: ServeOptions,
    ) -> Result<ControlServer, ServeError> {
        Ok(PreparedControl::bind(opts).await?.with_plane(plane))
    }

    fn log_access(&self, socket: Option<&std::path::Path>) {
        let list = |open: bool| {
            self.endpoints
                .iter()
                .filter(|e| e.open() == open)
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(addr) = self.local_addr() {
            if self.has_token {
                tracing::info!(address = %addr, open = %list(true), token_required = %list(false),
                    "control API: open endpoints, and those that need the bearer token");
            } else {
                tracing::info!(address = %addr, open = %list(true), refused = %list(false),
                    "control API: open endpoints, and those refused with 403 because no \
                     token is configured (set control.token_file or control.token_env, or \
                     use control.socket)");
            }
        }
        if let Some(path) = socket {
            tracing::info!(socket = %path.display(), "control socket (mode 0600): every \
                endpoint, for its owner and root; file permissions are the credential");
        }
    }

    /// The TCP listener's address, if there is one.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Every route, in the order registered.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Serves connections until `shutdown` completes; then removes the
    /// control socket.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()> + Send) {
        tokio::pin!(shutdown);
        let tcp = self.tcp.as_ref();
        let unix = self.unix.as_ref().map(|(l, _)| l);
        let slots = Slots::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER);
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let failed = tokio::select! {
                _ = &mut shutdown => break,
                r = accept_tcp(tcp) => match r {
                    Ok((stream, peer)) => {
                        match self.take_slot(&slots, Peer::of(peer.ip()), &peer) {
                            Some(slot) => self.spawn_tcp(stream, peer, slot),
                            None => drop(stream),
                        }
                        None
                    }
                    Err(e) => Some(e),
                },
                r = accept_unix(unix) => match r {
                    Ok(stream) => {
                        match self.take_slot(&slots, Peer::Socket, &"control socket") {
                            Some(slot) => self.spawn_unix(stream, slot),
                            None => drop(stream),
                        }
                        None
                    }
                    Err(e) => Some(e),
                },
            };
            match failed {
                None => backoff = ACCEPT_BACKOFF_MIN,
                Some(e) => {
                    (self.refused)("accept_failed");
                    accept_failed(e, backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }

    /// A slot for a new connection, or `None` (counted): the connection is
    /// then closed by the caller at once. A slot taken from a greedier
    /// peer's connection is counted as that connection's `evicted`.
    fn take_slot(&self, slots: &Slots, peer: Peer, shown: &dyn std::fmt::Display) -> Option<Slot> {
        match slots.take(peer) {
            Ok(Taken { slot, evicted }) => {
                if evicted {
                    (self.refused)("evicted");
                    tracing::info!(
                        peer = %shown,
                        limit = MAX_CONNECTIONS,
                        "control API at its connection cap: the oldest connection of the \
                         address holding the most was closed for this one"
                    );
                }
                Some(slot)
            }
            Err(reason) => {
                (self.refused)(reason);
                tracing::debug!(
                    peer = %shown,
                    reason,
                    limit = MAX_CONNECTIONS,
                    per_peer = MAX_CONNECTIONS_PER_PEER,
                    "control API connection closed: at the connection cap or the peer's share of it"
                );
                None
            }
        }
    }

    /// `io` with a deadline on every write (see [`WriteDeadline`]).
    fn write_deadline<I>(&self, io: I) -> WriteDeadline<I> {
        let refused = self.refused.clone();
        WriteDeadline::new(io, self.request_timeout, move || refused("write_timeout"))
    }

    fn spawn_tcp(&self, stream: tokio::net::TcpStream, peer: SocketAddr, slot: Slot) {
        let app = self.app.clone();
        let timeout = self.request_timeout;
        let refused = self.refused.clone();
        let stream = self.write_deadline(stream);
        // The settings in use now: a renewed certificate serves the next
        // connection.
        let Some(acceptor) = self.tls.as_ref().map(|t| t.current()) else {
            let conn = serve_connection(stream, app, None, timeout, peer.to_string(), refused);
            spawn_in_slot(slot, peer.to_string(), conn);
            return;
        };
        spawn_in_slot(slot, peer.to_string(), async move {
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => {
                    serve_connection(s, app, None, timeout, peer.to_string(), refused).await
                }
                // A handshake the client stopped reading: counted as such
                // by the write deadline.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                    if HANDSHAKE_LINES.admit("tls_handshake") {
                        tracing::info!(%peer, error = %e, "control API TLS handshake failed")
                    }
                }
                // The client closed first: a TCP probe (kubelet's
                // `tcpSocket`, a balancer's check), not a refusal (audit:
                // each counted and logged at INFO).
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    tracing::debug!(%peer, error = %e, "control API connection closed by its client before TLS")
                }
                Ok(Err(e)) => {
                    refused("tls_handshake");
                    if HANDSHAKE_LINES.admit("tls_handshake") {
                        tracing::info!(%peer, error = %e, "control API TLS handshake failed")
                    }
                }
                Err(_) => {
                    refused("tls_timeout");
                    if HANDSHAKE_LINES.admit("tls_timeout") {
                        tracing::info!(%peer, ?timeout, "control API TLS handshake did not finish within control.request_timeout")
                    }
                }
            }
        });
    }

    fn spawn_unix(&self, stream: tokio::net::UnixStream, slot: Slot) {
        // Who is on the other end, from the kernel: the guard lets only the
        // socket's owner and root in.
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        let peer = format!("control socket, uid {uid:?}");
        let conn = serve_connection(
            self.write_deadline(stream),
            self.app.clone(),
            Some(SocketPeer { uid }),
            self.request_timeout,
            peer.clone(),
            self.refused.clone(),
        );
        spawn_in_slot(slot, peer, conn);
    }
}

/// Serves one connection while it holds its slot: evicted (see [`Slots`]),
/// it is closed at once, wherever it stands.
fn spawn_in_slot(
    slot: Slot,
    peer: String,
    conn: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        tokio::select! {
            () = conn => {}
            () = slot.evicted() => tracing::debug!(
                %peer,
                "control API connection closed: a peer holding fewer connections took its slot"
            ),
        }
    });
}

/// The pause after a failed accept (out of descriptors, most often),
/// doubling while accepts fail: a fixed 50 ms was 20 WARN lines a second
/// for as long as it lasted (audit).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Tells what the control API's throttled lines held back (at exit).
pub fn flush_throttled() {
    ACCEPT_LINES.flush();
    HANDSHAKE_LINES.flush();
}

static ACCEPT_LINES: crate::throttle::Throttle = crate::throttle::Throttle::new(
    Duration::from_secs(10),
    1,
    &["accept"],
    Some(|total, _| {
        tracing::warn!(
            count = total,
            "{total} more control API accepts failed in the last 10 s; see agiproxy_control_connections_refused_total{{reason=\"accept_failed\"}}"
        )
    }),
);

async fn accept_failed(e: std::io::Error, pause: Duration) {
    if ACCEPT_LINES.admit("accept") {
        tracing::warn!(error = %e, "control API accept failed (out of descriptors? see process_open_fds); pausing accepts briefly");
    }
    tokio::time::sleep(pause).await;
}

async fn accept_tcp(
    l: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn accept_unix(l: Option<&UnixListener>) -> std::io::Result<tokio::net::UnixStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// HTTP/1 on one connection, for at most [`LIFETIME_IN_REQUEST_TIMEOUTS`]
/// request timeouts (then closed after the answer in flight, which gets
/// one more `timeout`); on the control socket, every request carries the
/// peer's `SocketPeer`.
async fn serve_connection<I>(
    io: I,
    app: Router,
    socket_peer: Option<SocketPeer>,
    timeout: Duration,
    peer: String,
    refused: Arc<dyn Fn(&'static str) + Send + Sync>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let app = tower::ServiceExt::map_request(app, move |mut req: Request<_>| {
        if let Some(c) = socket_peer {
            req.extensions_mut().insert(c);
        }
        req
    });
    let service = TowerToHyperService::new(app);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(timeout);
    let conn = http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let lifetime = timeout.saturating_mul(LIFETIME_IN_REQUEST_TIMEOUTS);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        _ = tokio::time::sleep(lifetime) => {
            // Idle: closed now; else after the answer in flight.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(timeout, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => {
                    refused("write_timeout");
                    tracing::debug!(%peer, ?lifetime, "control API connection closed at the end of its life with its answer not taken");
                    return;
                }
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "control API connection ended");
    }
}

type AppState<P> = Arc<Ctx<P>>;

/// The route table: axum's router and the list of what it holds, kept
/// together so the list (logged at start, walked by the tests) cannot miss
/// a route.
struct Routes<P: ControlPlane> {
    router: Router<AppState<P>>,
    endpoints: Vec<Endpoint>,
}

impl<P: ControlPlane> Routes<P> {
    fn add(
        mut self,
        method: Method,
        path: &'static str,
        handler: MethodRouter<AppState<P>>,
    ) -> Self {
        self.router = self.router.route(path, handler);
        self.endpoints.push(Endpoint { method, path });
        self
    }
}

/// Every endpoint. A new one goes here, and is guarded unless [`OPEN`]
/// lists it.
fn routes<P: ControlPlane>() -> Routes<P> {
    Routes {
        router: Router::new(),
        endpoints: Vec::new(),
    }
    .add(Method::GET, "/healthz", get(|| async { "ok\n" }))
    .add(Method::GET, "/readyz", get(h::readyz::<P>))
    .add(Method::GET, "/metrics", get(h::metrics::<P>))
    .add(Method::GET, "/v1/status", get(h::status::<P>))
    .add(Method::GET, "/v1/config", get(h::config_get::<P>))
    .add(Method::PUT, "/v1/config", put(h::config_put::<P>))
    .add(Method::POST, "/v1/reload", post(h::reload::<P>))
    .add(Method::GET, "/v1/pools", get(h::pools::<P>))
    .add(Method::GET, "/v1/pools/{pool}", get(h::pool::<P>))
    .add(
        Method::POST,
        "/v1/pools/{pool}/backends/{backend}/drain",
        post(|s: S<P>, p| h::backend_draining(s, p, true)),
    )
    .add(
        Method::POST,
        "/v1/pools/{pool}/backends/{backend}/enable",
        post(|s: S<P>, p| h::backend_draining(s, p, false)),
    )
    .add(Method::PUT, "/v1/routes/{route}/split", put(h::split::<P>))
    .add(Method::GET, "/v1/rollouts", get(h::rollouts::<P>))
    .add(Method::GET, "/v1/rollouts/{route}", get(h::rollout::<P>))
    .add(
        Method::GET,
        "/v1/rollouts/{route}/counts",
        get(h::rollout_counts::<P>),
    )
    .add(
        Method::POST,
        "/v1/rollouts/{route}/{action}",
        post(h::rollout_override::<P>),
    )
    .add(Method::POST, "/v1/drain", post(h::drain::<P>))
}

/// The routes, for serving or for in-process tests (requests count as
/// coming over TCP).
pub fn router<P: ControlPlane>(
    plane: Arc<P>,
    token: Option<String>,
    max_body: usize,
    timeout: Duration,
) -> Router {
    let tokens = token.map(|t| Arc::new(Tokens::new(t)));
    build(plane, tokens, None, max_body, timeout).0
}

fn build<P: ControlPlane>(
    plane: Arc<P>,
    token: Option<Arc<Tokens>>,
    socket_owner: Option<u32>,
    max_body: usize,
    timeout: Duration,
) -> (Router, Vec<Endpoint>) {
    let Routes { router, endpoints } = routes::<P>();
    let ctx = Arc::new(Ctx {
        plane,
        token,
        socket_owner,
        served: endpoints
            .iter()
            .map(|e| (e.method.clone(), e.path))
            .collect(),
        budget: Default::default(),
        max_body,
        timeout,
        views: Arc::new(tokio::sync::Semaphore::new(crate::handlers::VIEWS_AT_ONCE)),
    });
    let app = router
        // Inside the guard: a request without a credential takes no share.
        .route_layer(middleware::from_fn_with_state(
            ctx.clone(),
            crate::handlers::hold_bodies::<P>,
        ))
        // Over every route at once, so none can be added without it.
        .route_layer(middleware::from_fn_with_state(ctx.clone(), guard::<P>))
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
        .with_state(ctx);
    (app, endpoints)
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

/// The one access check, over every route: [`OPEN`] requests pass, and so
/// does a method an open path does not serve (to its 405); any other needs
/// the control socket (its owner or root) or, on TCP, the bearer token.
/// With no token configured, TCP gets 403 and how to set one.
async fn guard<P: ControlPlane>(State(ctx): S<P>, req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    if path.as_deref().is_some_and(|p| {
        is_open(req.method(), p) || unserved_on_open_path(&ctx.served, req.method(), p)
    }) {
        return next.run(req).await;
    }
    let what = format!("{} {}", req.method(), path.as_deref().unwrap_or("?"));
    if let Some(SocketPeer { uid }) = req.extensions().get::<SocketPeer>().copied() {
        // File permissions keep others out; this holds even if the mode
        // was loosened by hand.
        let owner = ctx.socket_owner;
        if uid.is_some_and(|u| u == 0 || Some(u) == owner) {
            return next.run(req).await;
        }
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "{what}: the control socket serves only its owner (uid {}) and root, not uid {}",
                owner.map_or("?".into(), |o| o.to_string()),
                uid.map_or("?".into(), |u| u.to_string())
            ),
        );
    }
    let Some(token) = &ctx.token else {
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "{what} needs a credential and this replica has no control token: set \
                 control.token_file (or control.token_env) and send the token as \
                 \"Authorization: Bearer TOKEN\" (ctl --token-file FILE, or $AGIPROXY_TOKEN), \
                 or set control.socket and use ctl --socket PATH on the replica's host; \
                 see docs/control-api.md#authentication"
            ),
        );
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
        .map(str::trim);
    // Compared in constant time (see `Tokens::accepts`).
    let ok = presented.is_some_and(|p| token.accepts(p));
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

fn files_cert(opts: &ServeOptions) -> String {
    opts.tls
        .as_ref()
        .map_or_else(String::new, |f| f.cert.display().to_string())
}

/// Failed handshakes are a scanner's or a flood's: 500 plain-HTTP
/// connections wrote 500 lines in 0.09 s (audit). Every one is counted in
/// `agiproxy_control_connections_refused_total`; 5 lines per 10 s, and a
/// summary of the rest.
static HANDSHAKE_LINES: crate::throttle::Throttle = crate::throttle::Throttle::new(
    std::time::Duration::from_secs(10),
    5,
    &["tls_handshake", "tls_timeout"],
    Some(|total, by_kind| {
        tracing::info!(
            count = total,
            "{total} more control API TLS handshakes failed in the last 10 s ({by_kind}); see agiproxy_control_connections_refused_total"
        )
    }),
);

/// The control API's TCP listener. `[::]` answers IPv4 as well, as the
/// docs say and the config's port-clash check assumes, whatever the host's
/// `net.ipv6.bindv6only` (tokio's `bind` leaves it to that setting).
fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    // `[::ffff:127.0.0.1]:4574` is 127.0.0.1:4574: an IPv6-only socket
    // cannot bind a mapped address (EINVAL: review).
    let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(!addr.ip().is_unspecified())?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod bind_tests {
    use super::*;

    /// `[::]` is dual-stack by our choice, not the host's sysctl: the
    /// option is read back, and an IPv4 client is answered.
    #[tokio::test]
    async fn a_control_api_on_the_ipv6_any_address_takes_ipv4_too() {
        let l = bind_tcp("[::]:0".parse().unwrap()).unwrap();
        assert!(!socket2::SockRef::from(&l).only_v6().unwrap());
        let port = l.local_addr().unwrap().port();
        let (connected, accepted) = tokio::join!(
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
            l.accept()
        );
        connected.unwrap();
        assert!(accepted.unwrap().1.ip().to_canonical().is_loopback());
        // A given IPv6 address stays IPv6 only.
        let l = bind_tcp("[::1]:0".parse().unwrap()).unwrap();
        assert!(socket2::SockRef::from(&l).only_v6().unwrap());
        // An IPv4-mapped one is its IPv4 address.
        let l = bind_tcp("[::ffff:127.0.0.1]:0".parse().unwrap()).unwrap();
        assert_eq!(l.local_addr().unwrap().ip().to_string(), "127.0.0.1");
    }
}
