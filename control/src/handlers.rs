//! The control API's endpoints: each reads its request, calls the
//! [`ControlPlane`] and answers JSON (errors as [`ErrorBody`]). Who may
//! call which is decided before them, by the guard in `server.rs` (this crate's).

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use crate::api::{ErrorBody, RolloutOverrideRequest, SplitRequest};
use crate::plane::{ControlError, ControlPlane};

/// What every handler shares: the runtime, the token, the socket's owner.
pub(crate) struct Ctx<P> {
    pub(crate) plane: Arc<P>,
    /// The accepted bearer tokens (see [`crate::token`]).
    pub(crate) token: Option<Arc<crate::token::Tokens>>,
    /// The control socket's owner, whose requests (and root's) need no token.
    pub(crate) socket_owner: Option<u32>,
    /// Every route's method and path, for the guard to tell a method a
    /// path does not serve.
    pub(crate) served: Vec<(axum::http::Method, &'static str)>,
    /// The bytes of request bodies held at once (see [`crate::budget`]).
    pub(crate) budget: Arc<crate::budget::BodyBudget>,
    /// `control.max_body_bytes`.
    pub(crate) max_body: usize,
    /// `control.request_timeout`.
    pub(crate) timeout: std::time::Duration,
    /// Views and metrics built on blocking threads at once: a request the
    /// timeout cut leaves its work running, so a flood that reconnects
    /// could pile up CPU-bound threads against the runtime's (review).
    pub(crate) views: Arc<tokio::sync::Semaphore>,
}

/// Views (and `/metrics`) built at once, each on a blocking thread.
pub(crate) const VIEWS_AT_ONCE: usize = 2;

/// `work` on a blocking thread: views that walk the whole config (every
/// rollout, every listener) are asked by anyone in a loop, and a runtime
/// thread busy with them holds up calls (audit: 500 rollouts took a
/// `--workers 1` proxy's calls from 0.9 ms to 74 ms).
async fn off_runtime<P: ControlPlane, T: Send + 'static>(
    ctx: &Ctx<P>,
    work: impl FnOnce(&P) -> T + Send + 'static,
) -> Result<T, Response> {
    let plane = ctx.plane.clone();
    // Held by the work itself, to its end, also when the request is gone.
    let Ok(turn) = ctx.views.clone().acquire_owned().await else {
        return Err(error(StatusCode::SERVICE_UNAVAILABLE, "shutting down"));
    };
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        work(&plane)
    })
    .await
    .map_err(|_| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the view could not be built",
        )
    })
}

pub(crate) type S<P> = State<Arc<Ctx<P>>>;

pub(crate) fn error(status: StatusCode, msg: impl Into<String>) -> Response {
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

pub(crate) fn control_error(e: ControlError) -> Response {
    let (status, body) = match &e {
        ControlError::Invalid(errors) => (
            StatusCode::BAD_REQUEST,
            ErrorBody {
                // A rollout action refused for its `at` (missing, past, late):
                // nothing in the config is invalid (walkthrough).
                error: if !errors.is_empty() && errors.iter().all(|e| e.path == "at") {
                    "override refused; nothing was changed".into()
                } else {
                    "the config is invalid; nothing was changed".into()
                },
                errors: errors.clone(),
                generation: None,
            },
        ),
        ControlError::Stale { current, .. } => (
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

pub(crate) async fn readyz<P: ControlPlane>(State(ctx): S<P>) -> Response {
    if ctx.plane.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

pub(crate) async fn metrics<P: ControlPlane>(State(ctx): S<P>) -> Response {
    // Rendering walks every series (every backend of every pool): off the
    // runtime's threads, so that scrapes, or a client asking for /metrics
    // in a loop, do not hold up calls.
    let Ok(text) = off_runtime(&ctx, |p| p.metrics_text()).await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable\n").into_response();
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

pub(crate) async fn status<P: ControlPlane>(State(ctx): S<P>) -> Response {
    match off_runtime(&ctx, |p| p.status()).await {
        Ok(status) => Json(status).into_response(),
        Err(e) => e,
    }
}

pub(crate) async fn config_get<P: ControlPlane>(State(ctx): S<P>, headers: HeaderMap) -> Response {
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
pub(crate) struct DryRun {
    #[serde(default)]
    dry_run: bool,
}

/// `If-Match: <generation>` (quotes allowed, as for an ETag); `None` when
/// absent. A value that is not a generation number is refused with 400
/// before the handler runs.
pub(crate) struct IfMatch(Option<u64>);

impl<St: Send + Sync> FromRequestParts<St> for IfMatch {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &St) -> Result<Self, Response> {
        let Some(v) = parts.headers.get(header::IF_MATCH) else {
            return Ok(IfMatch(None));
        };
        let text = v.to_str().unwrap_or("").trim().trim_matches('"');
        text.parse().map(|g| IfMatch(Some(g))).map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                format!("If-Match: {text:?} is not a generation number"),
            )
        })
    }
}

pub(crate) async fn config_put<P: ControlPlane>(
    State(ctx): S<P>,
    Query(q): Query<DryRun>,
    IfMatch(expect): IfMatch,
    body: String,
) -> Response {
    match ctx.plane.apply_config(body, q.dry_run, expect).await {
        Ok(applied) => Json(applied).into_response(),
        Err(e) => control_error(e),
    }
}

pub(crate) async fn reload<P: ControlPlane>(State(ctx): S<P>) -> Response {
    match ctx.plane.reload_file().await {
        Ok(applied) => Json(applied).into_response(),
        Err(e) => control_error(e),
    }
}

pub(crate) async fn pools<P: ControlPlane>(State(ctx): S<P>) -> Response {
    Json(ctx.plane.pools()).into_response()
}

pub(crate) async fn pool<P: ControlPlane>(State(ctx): S<P>, Path(name): Path<String>) -> Response {
    match ctx.plane.pool(&name) {
        Some(p) => Json(p).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no pool {name:?}")),
    }
}

/// `drain` (true) or `enable` (false) one backend.
pub(crate) async fn backend_draining<P: ControlPlane>(
    State(ctx): S<P>,
    Path((pool, backend)): Path<(String, String)>,
    draining: bool,
) -> Response {
    match ctx.plane.set_backend_draining(&pool, &backend, draining) {
        Ok(v) => Json(v).into_response(),
        Err(e) => control_error(e),
    }
}

pub(crate) async fn split<P: ControlPlane>(
    State(ctx): S<P>,
    Path(route): Path<String>,
    IfMatch(expect): IfMatch,
    body: String,
) -> Response {
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

pub(crate) async fn rollouts<P: ControlPlane>(State(ctx): S<P>) -> Response {
    // Encoded on the blocking thread too: megabytes for thousands of
    // rollouts (review).
    match off_runtime(&ctx, |p| serde_json::to_vec(&p.rollouts())).await {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => e,
    }
}

pub(crate) async fn rollout<P: ControlPlane>(
    State(ctx): S<P>,
    Path(route): Path<String>,
) -> Response {
    let found = {
        let route = route.clone();
        off_runtime(&ctx, move |p| {
            p.rollout(&route).ok_or_else(|| p.rollout_routes())
        })
        .await
    };
    match found {
        Err(e) => e,
        Ok(Ok(r)) => Json(r).into_response(),
        Ok(Err(names)) => {
            // Which routes have one: a typo names a route with none (walkthrough).
            let have = if names.is_empty() {
                "no route has a rollout".to_string()
            } else {
                format!("routes with a rollout: {}", names.join(", "))
            };
            error(
                StatusCode::NOT_FOUND,
                format!("no rollout on route {route:?}; {have}"),
            )
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct TickQuery {
    tick: i64,
}

pub(crate) async fn rollout_counts<P: ControlPlane>(
    State(ctx): S<P>,
    Path(route): Path<String>,
    Query(q): Query<TickQuery>,
) -> Response {
    match ctx.plane.rollout_tick(&route, q.tick) {
        Ok(t) => Json(t).into_response(),
        Err(e) => control_error(e),
    }
}

pub(crate) async fn rollout_override<P: ControlPlane>(
    State(ctx): S<P>,
    Path((route, action)): Path<(String, String)>,
    body: String,
) -> Response {
    let req: RolloutOverrideRequest = if body.trim().is_empty() {
        RolloutOverrideRequest::default()
    } else {
        match serde_json::from_str(&body) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("body: {e}; expected {{\"at\": \"2026-12-06T01:00:00Z\", \"identity\": \"5d0c3a9e41b7f268\"}} (both optional) or nothing"),
                )
            }
        }
    };
    match ctx.plane.rollout_override(&route, &action, req).await {
        Ok(applied) => Json(applied).into_response(),
        Err(e) => control_error(e),
    }
}

pub(crate) async fn drain<P: ControlPlane>(State(ctx): S<P>) -> Response {
    ctx.plane.drain();
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "draining": true })),
    )
        .into_response()
}

/// Holds a share of the budget for a request that may carry a body, from
/// before its body is read to its answer (the handler holds the text
/// until then). Laid inside the access guard: a request without a
/// credential never takes a share.
pub(crate) async fn hold_bodies<P: ControlPlane>(
    State(ctx): S<P>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use crate::budget::BODIES_AT_ONCE;
    let max_body = ctx.max_body;
    // `Content-Length` when given (hyper holds the body to it), else the
    // body limit; nothing for a request with no body.
    let bytes = axum::body::HttpBody::size_hint(req.body())
        .exact()
        .map_or(max_body, |n| usize::try_from(n).unwrap_or(usize::MAX))
        .min(max_body);
    if bytes == 0
        || req.method() == axum::http::Method::GET
        || req.method() == axum::http::Method::HEAD
    {
        return next.run(req).await;
    }
    let unit = ctx
        .plane
        .config_bytes_limit()
        .unwrap_or(max_body)
        .min(max_body);
    let cap = crate::budget::BODIES_AT_ONCE.saturating_mul(unit);
    let share = match ctx.budget.try_take(bytes, cap) {
        Some(share) => share,
        None => match tokio::time::timeout(ctx.timeout / 2, ctx.budget.take(bytes, cap)).await {
            Ok(share) => share,
            Err(_) => {
                tracing::debug!(
                    bytes,
                    budget = cap,
                    "control API request refused: the bodies of other requests fill the budget"
                );
                let mut resp = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "other requests' bodies fill this replica's budget for them \
                         ({cap} bytes: {BODIES_AT_ONCE} times limits.max_config_bytes); \
                         nothing was read or changed: send it again"
                    ),
                );
                resp.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::header::HeaderValue::from_static("1"),
                );
                return resp;
            }
        },
    };
    let resp = next.run(req).await;
    drop(share);
    resp
}
