//! The REST API: routes, shared state, and the JSON views of stored records.
//!
//! Handlers parse requests into domain values, check the caller's rights,
//! and call the store; they never talk to the database or the network
//! themselves.

mod apps;
mod deliveries;
mod error;
mod events;
mod extract;
mod health;
mod metrics;
mod plugins;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use tokio::sync::Notify;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};

pub use error::ApiError;
pub use extract::token_hash;

use crate::plugin::Plugins;
use crate::store::Store;
use crate::telemetry::Metrics;
use crate::url_safety::UrlPolicy;

/// Room for the JSON around an event payload.
const BODY_OVERHEAD: usize = 64 * 1024;
/// A request (body upload included) that takes longer is cut off with 408,
/// so a stalled client cannot hold a handler forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub policy: UrlPolicy,
    pub admin_token_hash: Arc<str>,
    /// Wakes the local delivery worker when work is queued.
    pub wake: Arc<Notify>,
    pub limits: Limits,
    pub plugins: Plugins,
    pub metrics: Metrics,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub secret_rotation_overlap: Duration,
    pub idempotency_window: Duration,
    pub max_plugin_bytes: usize,
}

/// The routes of a process; a worker-only process serves just the probes
/// and metrics.
pub fn router(state: AppState, serve_api: bool) -> Router {
    let body_limit = state.limits.max_payload_bytes + BODY_OVERHEAD;
    let v1 = Router::new()
        .route("/apps", post(apps::create).get(apps::list))
        .route(
            "/apps/{app}",
            get(apps::show).patch(apps::update).delete(apps::remove),
        )
        .route("/apps/{app}/keys", post(apps::create_key))
        .route("/apps/{app}/keys/{id}", delete(apps::delete_key))
        .route(
            "/apps/{app}/webhooks",
            post(webhooks::create).get(webhooks::list),
        )
        .route(
            "/apps/{app}/webhooks/{id}",
            get(webhooks::show)
                .patch(webhooks::update)
                .delete(webhooks::remove),
        )
        .route(
            "/apps/{app}/webhooks/{id}/secret/rotate",
            post(webhooks::rotate_secret),
        )
        .route(
            "/apps/{app}/webhooks/{id}/deliveries",
            get(deliveries::for_webhook),
        )
        .route("/apps/{app}/events", post(events::publish))
        .route("/apps/{app}/events/{id}", get(events::show))
        .route(
            "/apps/{app}/events/{id}/deliveries",
            get(deliveries::for_event),
        )
        .route("/apps/{app}/deliveries/{id}", get(deliveries::show))
        .route("/apps/{app}/deliveries/{id}/retry", post(deliveries::retry))
        // Uploads are read as a stream with their own limit.
        .route("/plugins", post(plugins::upload).get(plugins::list))
        .route("/plugins/{id}", get(plugins::show).delete(plugins::remove))
        .route("/plugins/{id}/test", post(plugins::test));
    let probes = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::scrape));
    let routes = if serve_api {
        probes.nest("/v1", v1)
    } else {
        probes
    };
    routes
        .fallback(|| async { ApiError::no_route() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(body_limit))
        // The answer is logged at debug level, a server error at error level.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(DefaultOnResponse::new().level(tracing::Level::DEBUG))
                .on_failure(DefaultOnFailure::new().level(tracing::Level::ERROR)),
        )
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(state)
}

/// One span per request: method and path, never headers or bodies.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    tracing::debug_span!("request", method = %request.method(), path = %request.uri().path())
}
