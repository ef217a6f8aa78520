//! The REST API: routes, shared state, and the JSON views of stored records.
//!
//! Handlers parse requests into domain values, check the caller's rights,
//! and call the store; they never talk to the database or the network
//! themselves.

mod apps;
mod connection;
mod deliveries;
mod error;
mod events;
mod extract;
mod health;
mod metrics;
mod openapi;
mod plugins;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::get;
use tokio::sync::Notify;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
/// and metrics. With the API come `/openapi.json` and `/docs`.
pub fn router(state: AppState, serve_api: bool) -> Router {
    let body_limit = state.limits.max_payload_bytes + BODY_OVERHEAD;
    let routes = if serve_api {
        let (routes, document) = documented().split_for_parts();
        routes
            .route("/openapi.json", get(move || async move { Json(document) }))
            .route("/docs", get(|| async { Html(DOCS_PAGE) }))
    } else {
        OpenApiRouter::new().merge(probes()).split_for_parts().0
    };
    routes
        .fallback(|| async { ApiError::no_route() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(connection::close_if_body_unread))
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

/// The API's OpenAPI document, as `/openapi.json` serves it.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    documented().split_for_parts().1
}

/// Every route the API serves, each from its annotated handler: the
/// document is generated from this list, so no route goes undescribed.
fn documented() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(probes())
        .nest("/v1", v1())
}

fn probes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::scrape))
}

fn v1() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(apps::create, apps::list))
        .routes(routes!(apps::show, apps::update, apps::remove))
        .routes(routes!(apps::create_key))
        .routes(routes!(apps::delete_key))
        .routes(routes!(webhooks::create, webhooks::list))
        .routes(routes!(webhooks::show, webhooks::update, webhooks::remove))
        .routes(routes!(webhooks::rotate_secret))
        .routes(routes!(deliveries::for_webhook))
        .routes(routes!(events::publish))
        .routes(routes!(events::show))
        .routes(routes!(deliveries::for_event))
        .routes(routes!(deliveries::show))
        .routes(routes!(deliveries::retry))
        // Uploads are read as a stream with their own limit.
        .routes(routes!(plugins::upload, plugins::list))
        .routes(routes!(plugins::show, plugins::remove))
        .routes(routes!(plugins::test))
}

/// The interactive reference: Scalar's page, loading the document from
/// `/openapi.json` (the script comes from Scalar's CDN, so the page needs
/// a browser with internet access; the document itself does not).
const DOCS_PAGE: &str = r#"<!doctype html>
<html>
<head>
  <title>wasmhook API</title>
  <meta charset="utf-8" />
  <meta name="viewport" content="width=device-width, initial-scale=1" />
</head>
<body>
  <script id="api-reference" data-url="/openapi.json"></script>
  <script src="https://cdn.jsdelivr.net/npm/@scalar/api-reference"></script>
</body>
</html>
"#;

/// One span per request: method and path, never headers or bodies.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    tracing::debug_span!("request", method = %request.method(), path = %request.uri().path())
}
