//! Liveness and readiness probes; no authentication.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::openapi::ErrorBody;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` (process up) or `ready` (database answers).
    status: &'static str,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, description = "Up", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The database answers.
#[utoipa::path(get, path = "/readyz", tag = "operations", security(()),
    responses(
        (status = 200, description = "Ready to serve", body = Health),
        (status = 503, description = "The database does not answer", body = ErrorBody),
    ))]
pub async fn readyz(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    state
        .store
        .ping()
        .await
        .map_err(|e| ApiError::unavailable(format!("database unreachable: {e}")))?;
    Ok(Json(Health { status: "ready" }))
}
