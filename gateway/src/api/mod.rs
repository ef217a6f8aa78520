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
pub mod listener;
mod metrics;
mod openapi;
mod plugins;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, header};
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
        // Serialised once: axum clones a handler for every request its
        // middleware sees, and a handler holding the document itself
        // copied it each time (31 MiB of the heap's peak under load).
        let document = Bytes::from(serde_json::to_vec(&document).expect("the document serialises"));
        let json = [(header::CONTENT_TYPE, "application/json")];
        routes
            .route(
                "/openapi.json",
                get(move || async move { (json, document) }),
            )
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
        .routes(routes!(events::replay))
        .routes(routes!(deliveries::for_event))
        .routes(routes!(deliveries::show))
        .routes(routes!(deliveries::retry))
        // Uploads are read as a stream with their own limit.
        .routes(routes!(plugins::upload, plugins::list))
        .routes(routes!(plugins::show, plugins::remove))
        .routes(routes!(plugins::test))
}

/// The reference page: renders `/openapi.json` in the browser with a
/// few lines of its own script, loading nothing from other hosts.
const DOCS_PAGE: &str = include_str!("docs.html");

/// One span per request: method and path, never headers or bodies.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    tracing::debug_span!("request", method = %request.method(), path = %request.uri().path())
}
