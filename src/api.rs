//! HTTP on the `--listen` address: `/metrics` for Prometheus, `/healthz` and `/readyz`, and
//! the reports API under `/v1` ([`v1`]), authenticated as the auth server documents
//! ([`auth`]) and described by an OpenAPI document built from the same route table
//! ([`openapi`]).
//!
//! Owns the routes, their limits (body size, time) and their responses: `/metrics` answers in
//! the Prometheus text format, or in OpenMetrics when `Accept` asks for it. It serves on a
//! listener it is given (so tests bind port 0) until its shutdown token fires, reads state
//! through shared handles, and never changes what the pipeline counts. All data comes from
//! [`crate::report`], the query layer the CLI uses too.

pub mod auth;
pub mod error;
pub mod openapi;
pub mod v1;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::keys::KeyCache;
use crate::metrics::{Format, Metrics};
use crate::pipeline::SharedKeys;
use crate::store::Store;
use auth::{AuthSettings, Authenticator};
use error::ApiError;

/// Largest request body accepted (silences and notes are small).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest a request may take before it is answered 503.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What the handlers read.
#[derive(Clone)]
pub struct ApiState {
    pub metrics: Metrics,
    pub store: Store,
    /// The daemon's key cache; without one each request loads the keys.
    pub keys: Option<Arc<SharedKeys>>,
    pub auth: Arc<Authenticator>,
    /// Routes of the HTTP source (`POST /v1/ingest`), when `--source http` is on.
    pub ingest: Option<Router<Arc<ApiState>>>,
    /// Whether the daemon's sources are reading (`/readyz`); `None` outside the daemon.
    pub sources: Option<crate::source::Health>,
}

impl ApiState {
    /// State with no admin token and no HMAC secret; see [`ApiState::with_auth`].
    pub fn new(metrics: Metrics, store: Store) -> ApiState {
        ApiState {
            metrics,
            store,
            keys: None,
            auth: Arc::new(Authenticator::default()),
            ingest: None,
            sources: None,
        }
    }

    /// Reports `health` in `/readyz`.
    pub fn with_sources(mut self, health: crate::source::Health) -> ApiState {
        self.sources = Some(health);
        self
    }

    /// Serves `POST /v1/ingest` with these routes (the HTTP source).
    pub fn with_ingest(mut self, ingest: Option<Router<Arc<ApiState>>>) -> ApiState {
        self.ingest = ingest;
        self
    }

    pub fn with_keys(mut self, keys: Arc<SharedKeys>) -> ApiState {
        self.keys = Some(keys);
        self
    }

    /// Authenticates with `settings`; refused credentials are sent to `refused` as
    /// request-log lines, for the detectors.
    pub fn with_auth(
        mut self,
        settings: AuthSettings,
        refused: Option<tokio::sync::mpsc::Sender<crate::source::Chunk>>,
    ) -> ApiState {
        self.auth = Arc::new(Authenticator::new(settings).with_refused_events(refused));
        self
    }

    /// The keys and organizations to resolve names and check ownership with.
    pub async fn cache(&self) -> Result<Arc<KeyCache>, ApiError> {
        match &self.keys {
            Some(k) => Ok(k.get()),
            None => Ok(Arc::new(self.store.key_cache().await?)),
        }
    }
}

/// The router, for tests that want to drive it without a socket.
pub fn router(state: ApiState) -> Router {
    let mut r = Router::new();
    for route in v1::routes() {
        r = r.route(route.path, route.handler);
    }
    r.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(time_limit))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // After the limits: the ingest source bounds its own bodies (--ingest-max-body) and
        // answers only once its lines are committed.
        .merge(state.ingest.clone().unwrap_or_default())
        .with_state(Arc::new(state))
}

/// Serves until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

async fn time_limit(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint; GET /v1/openapi.json lists them".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

pub(crate) async fn metrics(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> impl IntoResponse {
    if !s.auth.metrics_allowed(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "/metrics needs Authorization: Bearer TOKEN (--metrics-token-sha256)\n".to_owned(),
        );
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::from_accept(accept);
    match s.metrics.render(format) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, format.content_type())],
            body,
        ),
        Err(e) => {
            tracing::warn!(error = %e, "Could not render /metrics.");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("{e}\n"),
            )
        }
    }
}

pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

pub(crate) async fn readyz(State(s): State<Arc<ApiState>>) -> impl IntoResponse {
    let failing = s.sources.as_ref().map(|h| h.failing()).unwrap_or_default();
    // Answered without asking the database, which may take its connect timeout to fail.
    if let Some((for_, why)) = s.sources.as_ref().and_then(|h| h.commits_failing()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "commits have failed for {} s, so the sources are held back: {why}\n",
                for_.as_secs()
            ),
        );
    }
    match s.store.ping().await {
        Ok(()) if failing.is_empty() => (StatusCode::OK, "ready\n".to_owned()),
        Ok(()) => (
            StatusCode::SERVICE_UNAVAILABLE,
            failing
                .iter()
                .map(|(name, why)| format!("source {name} is not reading: {why}\n"))
                .collect(),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "Not ready: the database does not answer.");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "database unreachable\n".to_owned(),
            )
        }
    }
}
