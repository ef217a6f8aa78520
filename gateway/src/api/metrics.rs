//! The Prometheus scrape endpoint. Like the probes it needs no token: it
//! shows counts and timings, no ids, payloads or secrets.

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::openapi::ErrorBody;
use crate::clock::now_ms;

const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[utoipa::path(get, path = "/metrics", tag = "operations", security(()),
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 503, description = "The database does not answer (queue gauges)", body = ErrorBody),
    ))]
pub async fn scrape(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    let now = now_ms();
    let queue = state
        .store
        .queue_stats(now)
        .await
        .map_err(|e| ApiError::unavailable(format!("database unreachable: {e}")))?;
    let body = state.metrics.render(&queue, now);
    Ok(([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], body))
}
