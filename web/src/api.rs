//! HTTP: one connection's server (HTTP/1.1 with upgrades for WebSockets, or HTTP/2 as ALPN
//! chose), the routes of the JSON API under `/v1/webapi/`, and the embedded page. Every
//! response carries [`guard::security_headers`]; API errors are `{"error": "…"}` with a status
//! that says what went wrong.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Extension, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use bytes::Bytes;
use gatehouse_controlplane::proto;
use gatehouse_dataplane::proxy::BrowserConn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::json;
use tower::ServiceExt as _;

use crate::{App, Session, assets, guard, now_secs, replay, terminal};

/// Request bodies (the login form) are small.
const MAX_BODY: usize = 64 * 1024;
/// An HTTP/1.1 client has this long to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The browser's address, as the proxy accepted it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddr(pub(crate) SocketAddr);

/// An API error: a status and a message for people.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    otp_required: bool,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            otp_required: false,
        }
    }
    pub(crate) fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    pub(crate) fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, m)
    }
    pub(crate) fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, m)
    }
    pub(crate) fn too_many(m: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, m)
    }
    pub(crate) fn unavailable(m: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, m)
    }
    pub(crate) fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, m)
    }

    /// Auth's answer to a call made as the user.
    pub(crate) fn from_status(s: &tonic::Status) -> Self {
        use tonic::Code;
        let status = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable | Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        };
        Self::new(status, s.message())
    }

    /// Auth's answer to a login: a missing code asks the page for one.
    pub(crate) fn from_login_status(s: &tonic::Status) -> Self {
        let mut e = Self::from_status(s);
        if s.code() == tonic::Code::FailedPrecondition {
            e.status = StatusCode::UNAUTHORIZED;
            e.otp_required = s.message() == "one-time code required";
        }
        e
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = if self.otp_required {
            json!({ "error": self.message, "otp_required": true })
        } else {
            json!({ "error": self.message })
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<guard::Refused> for ApiError {
    fn from(r: guard::Refused) -> Self {
        Self::forbidden(r.to_string())
    }
}

/// Serve one browser connection until it closes.
pub(crate) async fn serve_connection(router: Router, conn: BrowserConn) {
    let remote = conn.remote;
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ClientAddr(remote));
        // HTTP/2 names the host in `:authority`: give the checks one place to look.
        if !req.headers().contains_key(header::HOST)
            && let Some(v) = req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, v);
        }
        let api = req.uri().path().starts_with("/v1/");
        let router = router.clone();
        async move {
            let mut resp = match router.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            guard::security_headers(resp.headers_mut(), api);
            Ok::<_, Infallible>(resp)
        }
    });
    let io = TokioIo::new(conn.io);
    let done = if conn.http2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .enable_connect_protocol()
            .max_concurrent_streams(256)
            .keep_alive_interval(Duration::from_secs(30));
        b.serve_connection(io, svc).await
    } else {
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(io, svc)
            .with_upgrades()
            .await
    };
    if let Err(e) = done {
        tracing::debug!(%remote, error = %e, "web: connection ended with an error");
    }
}

/// The routes.
pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/assets/{file}", get(assets::asset))
        .route("/v1/webapi/ping", get(ping))
        .route("/v1/webapi/login", post(login))
        .route("/v1/webapi/logout", post(logout))
        .route("/v1/webapi/session", get(whoami))
        .route("/v1/webapi/nodes", get(nodes))
        .route("/v1/webapi/sessions", get(live_sessions))
        .route("/v1/webapi/recordings", get(recordings))
        .route("/v1/webapi/recordings/{id}/cast", get(replay::cast))
        .route("/v1/webapi/events", get(events))
        // WebSockets: GET + Upgrade (HTTP/1.1) or CONNECT (HTTP/2, RFC 8441).
        .route("/v1/webapi/ws/ssh", any(terminal::upgrade))
        .route("/v1/webapi/ws/join", any(replay::join))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such page or API")
}

/// The request's live web session.
pub(crate) fn session(app: &App, headers: &HeaderMap) -> Result<Arc<Session>, ApiError> {
    let token =
        guard::session_token(headers).ok_or_else(|| ApiError::unauthorized("not logged in"))?;
    app.sessions
        .lock()
        .map_err(|_| ApiError::internal("web sessions"))?
        .get(token, now_secs())
        .ok_or_else(|| {
            ApiError::unauthorized(
                "this web session has expired, was logged out, or is not one of this cluster's: log in again",
            )
        })
}

async fn ping(State(app): State<Arc<App>>) -> Response {
    axum::Json(json!({ "cluster": app.config.cluster })).into_response()
}

fn session_json(s: &Session, cluster: &str) -> serde_json::Value {
    json!({
        "user": s.user,
        "cluster": cluster,
        "roles": s.roles,
        "logins": s.logins,
        "expires": s.expires,
        "csrf": s.csrf,
    })
}

async fn login(
    State(app): State<Arc<App>>,
    Extension(addr): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    guard::check_login(&headers)?;
    let body: crate::login::LoginBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed login body: {e}")))?;
    let done = crate::login::login(&app, body, &addr.0.ip().to_string()).await?;
    let max_age = done.session.expires - now_secs();
    let mut resp = axum::Json(session_json(&done.session, &app.config.cluster)).into_response();
    let cookie = HeaderValue::from_str(&guard::set_cookie(&done.token, max_age))
        .map_err(|_| ApiError::internal("cookie"))?;
    resp.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(resp)
}

async fn logout(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let s = session(&app, &headers)?;
    guard::check_csrf(&headers, &s.csrf)?;
    if let Some(token) = guard::session_token(&headers) {
        app.sessions
            .lock()
            .map_err(|_| ApiError::internal("web sessions"))?
            .remove(token);
    }
    let mut resp = axum::Json(json!({ "ok": true })).into_response();
    if let Ok(v) = HeaderValue::from_str(&guard::clear_cookie()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

async fn whoami(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let s = session(&app, &headers)?;
    Ok(axum::Json(session_json(&s, &app.config.cluster)).into_response())
}

#[derive(Debug, Deserialize)]
struct NodesQuery {
    #[serde(default)]
    q: String,
}

/// Whether a node matches every word of a search: in its name, host id, or a `key=value` label.
pub(crate) fn node_matches(n: &proto::Node, query: &str) -> bool {
    let hay: Vec<String> = std::iter::once(n.name.to_lowercase())
        .chain(std::iter::once(n.host_id.to_lowercase()))
        .chain(
            n.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}").to_lowercase()),
        )
        .collect();
    query.split_whitespace().all(|w| {
        let w = w.to_lowercase();
        hay.iter().any(|h| h.contains(&w))
    })
}

async fn nodes(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<NodesQuery>,
) -> Result<Response, ApiError> {
    let s = session(&app, &headers)?;
    let mut client = app.client(&s).await?;
    let mut list = client
        .list_nodes(proto::ListNodesRequest {})
        .await
        .map_err(|e| ApiError::from_status(&e))?
        .into_inner()
        .nodes;
    list.retain(|n| node_matches(n, &q.q));
    list.sort_by(|a, b| a.name.cmp(&b.name));
    let v: Vec<_> = list
        .iter()
        .map(|n| {
            let mut labels: Vec<(&String, &String)> = n.labels.iter().collect();
            labels.sort();
            json!({
                "name": n.name,
                "host_id": n.host_id,
                "labels": labels.into_iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
                "services": n.services,
                "last_seen": n.last_seen,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "nodes": v, "logins": s.logins })).into_response())
}

pub(crate) fn recording_json(r: &proto::RecordingInfo) -> serde_json::Value {
    json!({
        "id": r.id, "user": r.user, "login": r.login, "node": r.node, "kind": r.kind,
        "command": r.command, "started_unix_ms": r.started_unix_ms, "duration_ms": r.duration_ms,
        "state": r.state, "bytes": r.bytes, "reason": r.reason,
    })
}

#[derive(Debug, Deserialize)]
struct RecordingsQuery {
    #[serde(default)]
    user: String,
    #[serde(default)]
    node: String,
    #[serde(default)]
    limit: u32,
}

async fn list_recordings(
    app: &App,
    headers: &HeaderMap,
    req: proto::ListRecordingsRequest,
) -> Result<Response, ApiError> {
    let s = session(app, headers)?;
    let mut client = app.client(&s).await?;
    let list = client
        .list_recordings(req)
        .await
        .map_err(|e| ApiError::from_status(&e))?
        .into_inner()
        .recordings;
    let v: Vec<_> = list.iter().map(recording_json).collect();
    Ok(axum::Json(json!({ "recordings": v })).into_response())
}

async fn live_sessions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let req = proto::ListRecordingsRequest {
        live: true,
        ..Default::default()
    };
    list_recordings(&app, &headers, req).await
}

async fn recordings(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<RecordingsQuery>,
) -> Result<Response, ApiError> {
    let req = proto::ListRecordingsRequest {
        user: q.user,
        node: q.node,
        limit: q.limit.min(1000),
        ..Default::default()
    };
    list_recordings(&app, &headers, req).await
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    /// Unix milliseconds (0: unbounded).
    #[serde(default)]
    from: i64,
    #[serde(default)]
    to: i64,
    /// Event types, comma-separated.
    #[serde(default, rename = "type")]
    types: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    limit: u32,
}

async fn events(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let s = session(&app, &headers)?;
    let mut client = app.client(&s).await?;
    let ms_to_ns = |ms: i64| ms.saturating_mul(1_000_000);
    let list = client
        .search_events(proto::SearchEventsRequest {
            from_nanos: ms_to_ns(q.from.max(0)),
            to_nanos: ms_to_ns(q.to.max(0)),
            types: q
                .types
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
            limit: if q.limit == 0 { 200 } else { q.limit.min(1000) },
            after_id: 0,
            actor: q.user,
            newest_first: true,
        })
        .await
        .map_err(|e| ApiError::from_status(&e))?
        .into_inner()
        .events;
    let v: Vec<_> = list
        .iter()
        .map(|e| {
            json!({
                "id": e.id,
                "time_ms": e.time_nanos / 1_000_000,
                "type": e.r#type,
                "actor": e.actor,
                "source_addr": e.source_addr,
                "cluster": e.cluster,
                "data": serde_json::from_str::<serde_json::Value>(&e.data_json).unwrap_or_default(),
            })
        })
        .collect();
    Ok(axum::Json(json!({ "events": v })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_search_matches_every_word_in_name_id_or_labels() {
        let n = proto::Node {
            name: "web-01".into(),
            host_id: "abc123".into(),
            labels: [("env".to_string(), "prod".to_string())].into(),
            ..Default::default()
        };
        for yes in ["", "web", "WEB-0", "env=prod", "prod web", "abc"] {
            assert!(node_matches(&n, yes), "{yes}");
        }
        for no in ["db", "env=dev", "web db"] {
            assert!(!node_matches(&n, no), "{no}");
        }
    }
}
