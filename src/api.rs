//! HTTP: `/metrics` for Prometheus and `/healthz` for liveness, on the `--listen` address.
//!
//! Owns the routes and their responses: `/metrics` answers in the Prometheus text format, or
//! in OpenMetrics when `Accept` asks for it. It serves on a listener it is given (so tests bind
//! port 0) until its shutdown token fires, reads state through shared handles, and never
//! changes what the pipeline counts.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Format, Metrics};
use crate::store::Store;

/// What the handlers read.
#[derive(Clone)]
pub struct ApiState {
    pub metrics: Metrics,
    pub store: Store,
    /// Routes of the HTTP source (`POST /v1/ingest`), when `--source http` is on.
    pub ingest: Option<Router<Arc<ApiState>>>,
}

/// The router, for tests that want to drive it without a socket.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(state.ingest.clone().unwrap_or_default())
        .with_state(Arc::new(state))
}

/// Serves until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn metrics(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> impl IntoResponse {
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

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<ApiState>>) -> impl IntoResponse {
    match s.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("database unreachable: {e}\n"),
        ),
    }
}
