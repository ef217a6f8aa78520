//! Delivery history and manual redelivery.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ApiResult, OrNotFound};
use super::extract::{ApiPath, ApiQuery, Caller, ListQuery, Page};
use super::openapi::ErrorResponses;
use crate::clock::rfc3339;
use crate::domain::{Attempt, Delivery, DeliveryId, DeliveryStatus, EventId, WebhookId};

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    id: String,
    app_id: String,
    event_id: String,
    webhook_id: String,
    status: String,
    attempt_count: i64,
    /// When the next attempt is due (pending or failed deliveries).
    next_attempt_at: Option<String>,
    last_attempt_at: Option<String>,
    last_status_code: Option<i64>,
    last_error: Option<String>,
    /// Why the webhook's plugin skipped it (status `skipped`).
    skip_reason: Option<String>,
    created_at: String,
    updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<Vec<AttemptView>>,
}

impl From<Delivery> for DeliveryView {
    fn from(d: Delivery) -> Self {
        Self {
            next_attempt_at: d.due_at.filter(|_| d.status.is_waiting()).map(rfc3339),
            id: d.id.into(),
            app_id: d.app_id.into(),
            event_id: d.event_id.into(),
            webhook_id: d.webhook_id.into(),
            status: d.status.to_string(),
            attempt_count: d.attempts,
            last_attempt_at: d.last_attempt_at.map(rfc3339),
            last_status_code: d.last_status_code,
            last_error: d.last_error,
            skip_reason: d.skip_reason,
            created_at: rfc3339(d.created_at),
            updated_at: rfc3339(d.updated_at),
            attempts: None,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptView {
    id: String,
    attempt: i64,
    started_at: String,
    duration_ms: i64,
    outcome: String,
    status_code: Option<i64>,
    response_body: Option<String>,
    error: Option<String>,
    /// For outcome `plugin`: timeout, memory_limit, stack_overflow, trap,
    /// invalid_output, plugin_error or unavailable.
    plugin_error: Option<String>,
}

impl From<Attempt> for AttemptView {
    fn from(a: Attempt) -> Self {
        Self {
            id: a.id.into(),
            attempt: a.attempt,
            started_at: rfc3339(a.started_at),
            duration_ms: a.duration_ms,
            outcome: a.outcome.to_string(),
            status_code: a.status_code,
            response_body: a.response_body,
            error: a.error,
            plugin_error: a.plugin_error.map(|p| p.to_string()),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WebhookDeliveriesQuery {
    /// Only deliveries in this state.
    #[param(pattern = "^(pending|sending|succeeded|failed|dead|skipped)$")]
    status: Option<String>,
    /// Items per page (default 50).
    #[param(minimum = 1, maximum = 250)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[utoipa::path(
    get,
    path = "/apps/{app}/events/{id}/deliveries",
    tag = "deliveries",
    params(("app" = String, Path, description = "App id or uid"), ("id" = String, Path, description = "Event id")),
    responses((status = 200, description = "Every delivery of the event", body = Vec<DeliveryView>), ErrorResponses)
)]
pub async fn for_event(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((app, id)): ApiPath<(String, EventId)>,
) -> ApiResult<Json<Vec<DeliveryView>>> {
    let app = caller.app(&state, &app).await?;
    if state.store.event(&app.id, &id).await?.is_none() {
        return Err(ApiError::not_found("event", &id));
    }
    let deliveries = state.store.event_deliveries(&app.id, &id).await?;
    Ok(Json(
        deliveries.into_iter().map(DeliveryView::from).collect(),
    ))
}

#[utoipa::path(
    get,
    path = "/apps/{app}/webhooks/{id}/deliveries",
    tag = "deliveries",
    params(("app" = String, Path, description = "App id or uid"), ("id" = String, Path, description = "Webhook id"), WebhookDeliveriesQuery),
    responses((status = 200, description = "A page of the webhook's deliveries, newest first", body = Page<DeliveryView>), ErrorResponses)
)]
pub async fn for_webhook(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((app, id)): ApiPath<(String, WebhookId)>,
    ApiQuery(query): ApiQuery<WebhookDeliveriesQuery>,
) -> ApiResult<Json<Page<DeliveryView>>> {
    let app = caller.app(&state, &app).await?;
    let status = match query.status.as_deref() {
        None => None,
        Some(text) => Some(DeliveryStatus::parse(text).ok_or_else(|| {
            ApiError::invalid(
                "status",
                "must be one of pending, sending, succeeded, failed, dead, skipped",
            )
        })?),
    };
    let page = ListQuery {
        limit: query.limit,
        cursor: query.cursor,
    }
    .page()?;
    if state.store.webhook(&app.id, &id).await?.is_none() {
        return Err(ApiError::not_found("webhook", &id));
    }
    let deliveries = state.store.webhook_deliveries(&id, status, &page).await?;
    Ok(Json(Page::new(
        deliveries,
        &page,
        |d| d.id.to_string(),
        DeliveryView::from,
    )))
}

#[utoipa::path(
    get,
    path = "/apps/{app}/deliveries/{id}",
    tag = "deliveries",
    params(("app" = String, Path, description = "App id or uid"), ("id" = String, Path, description = "Delivery id")),
    responses((status = 200, description = "The delivery with every attempt", body = DeliveryView), ErrorResponses)
)]
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((app, id)): ApiPath<(String, DeliveryId)>,
) -> ApiResult<Json<DeliveryView>> {
    let app = caller.app(&state, &app).await?;
    let delivery = state
        .store
        .delivery(&app.id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("delivery", &id))?;
    let attempts = state.store.attempts(&delivery.id).await?;
    let mut view = DeliveryView::from(delivery);
    view.attempts = Some(attempts.into_iter().map(AttemptView::from).collect());
    Ok(Json(view))
}

/// Sends a delivery again now, from any state but `sending` (including
/// `dead` and `succeeded`: a redelivery).
#[utoipa::path(
    post,
    path = "/apps/{app}/deliveries/{id}/retry",
    tag = "deliveries",
    params(("app" = String, Path, description = "App id or uid"), ("id" = String, Path, description = "Delivery id")),
    responses((status = 200, description = "Queued to be sent now", body = DeliveryView), ErrorResponses)
)]
pub async fn retry(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((app, id)): ApiPath<(String, DeliveryId)>,
) -> ApiResult<Json<DeliveryView>> {
    let app = caller.app(&state, &app).await?;
    let delivery = state
        .store
        .retry_delivery(&app.id, &id)
        .await
        .or_not_found("delivery", &id)?;
    state.wake.notify_one();
    Ok(Json(delivery.into()))
}
