//! Publishing events, and reading them back.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiPath, Caller};
use super::openapi::ErrorResponses;
use crate::clock::{millis, now_ms, rfc3339};
use crate::domain::ordering::OrderingKey;
use crate::domain::{AppId, Event, EventId, EventType, NewEvent, WebhookId, parse_event_id};

const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishEvent {
    /// Dot-separated name, e.g. `invoice.paid`.
    #[schema(pattern = r"^[A-Za-z0-9._:/\-]{1,256}$")]
    event_type: String,
    /// Any JSON. Kept as the exact text sent, so a `raw_payload` webhook
    /// receives the bytes the publisher sent.
    #[schema(value_type = Value)]
    payload: Box<RawValue>,
    /// Your id for the event; a repeat within the window is not queued again.
    #[schema(pattern = r"^[A-Za-z0-9_.\-]{1,256}$")]
    id: Option<String>,
    /// Events with the same key go to each webhook one at a time, in the
    /// order they were published: a delivery being retried holds back the
    /// later ones of its key (until it succeeds, is skipped or is dead),
    /// and no other. 1 to 256 characters, no control characters.
    #[schema(pattern = r"^[^\u0000-\u001F\u007F-\u009F]{1,256}$")]
    ordering_key: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Queued {
    id: String,
    webhook_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    id: String,
    deliveries: Vec<Queued>,
}

impl Accepted {
    fn new(event: EventId, queued: Vec<crate::domain::Queued>) -> Self {
        let deliveries = queued
            .into_iter()
            .map(|q| Queued {
                id: q.id.into(),
                webhook_id: q.webhook_id.into(),
            })
            .collect();
        Self {
            id: event.into(),
            deliveries,
        }
    }
}

async fn find(state: &AppState, app_id: &AppId, id: &EventId) -> ApiResult<Event> {
    state
        .store
        .event(app_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("event", id))
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_LEN => {
            Ok(Some(key.to_owned()))
        }
        _ => Err(ApiError::invalid(
            "Idempotency-Key",
            format!("must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"),
        )),
    }
}

/// Accepts an event: stored with its deliveries in one transaction before
/// the 202, so an accepted event survives any crash.
#[utoipa::path(
    post,
    path = "/apps/{app}/events",
    tag = "events",
    params(("app" = String, Path, description = "App id or uid"), ("Idempotency-Key" = Option<String>, Header, description = "A repeat within the idempotency window returns the first answer and queues nothing")),
    request_body = PublishEvent,
    responses((status = 202, description = "Stored with its deliveries before this answer; a repeat carries `idempotent-replayed: true`", body = Accepted), ErrorResponses)
)]
pub async fn publish(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(app): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PublishEvent>,
) -> ApiResult<(StatusCode, HeaderMap, Json<Accepted>)> {
    let app = caller.app(&state, &app).await?;
    let event_type =
        EventType::parse(&body.event_type).map_err(|e| ApiError::invalid("event_type", e))?;
    let payload = body.payload.get();
    if payload.len() > state.limits.max_payload_bytes {
        return Err(ApiError::payload_too_large(state.limits.max_payload_bytes));
    }
    let id = match &body.id {
        Some(id) => parse_event_id(id).map_err(|e| ApiError::invalid("id", e))?,
        None => EventId::new(),
    };
    let ordering_key = body
        .ordering_key
        .as_deref()
        .map(OrderingKey::parse)
        .transpose()
        .map_err(|e| ApiError::invalid("ordering_key", e))?;
    let event = NewEvent {
        app_id: app.id,
        id,
        event_type,
        payload: payload.to_owned(),
        idempotency_key: idempotency_key(&headers)?,
        ordering_key,
        dedup_since: now_ms() - millis(state.limits.idempotency_window),
    };
    let published = state.store.publish(event).await?;
    if !published.replayed {
        crate::telemetry::event_accepted();
    }
    if !published.deliveries.is_empty() && !published.replayed {
        state.wake.notify_one();
    }
    let mut response_headers = HeaderMap::new();
    if published.replayed {
        response_headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    let accepted = Accepted::new(published.event_id, published.deliveries);
    Ok((StatusCode::ACCEPTED, response_headers, Json(accepted)))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    id: String,
    app_id: String,
    event_type: String,
    #[schema(value_type = Value)]
    payload: Box<RawValue>,
    /// The key that orders it among other events, if it was given one.
    ordering_key: Option<String>,
    created_at: String,
}

#[utoipa::path(
    get,
    path = "/apps/{app}/events/{id}",
    tag = "events",
    params(("app" = String, Path, description = "App id or uid"), ("id" = String, Path, description = "Event id")),
    responses((status = 200, description = "The event as published", body = EventView), ErrorResponses)
)]
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((app, id)): ApiPath<(String, EventId)>,
) -> ApiResult<Json<EventView>> {
    let app = caller.app(&state, &app).await?;
    let event = find(&state, &app.id, &id).await?;
    let payload = RawValue::from_string(event.payload).map_err(ApiError::corrupt)?;
    Ok(Json(EventView {
        id: event.id.into(),
        app_id: event.app_id.into(),
        event_type: event.event_type,
        payload,
        ordering_key: event.ordering_key,
        created_at: rfc3339(event.created_at),
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayEvent {
    /// One webhook of the app to send the event to (whatever its event
    /// filter); omit to send it to every webhook subscribed to its type
    /// now, including webhooks created after the event.
    webhook_id: Option<String>,
}

/// Sends an event again: new deliveries, due now, carrying the same
/// `webhook-id` as the first ones so receivers can deduplicate. They go
/// outside the order of the event's ordering key, if it has one.
#[utoipa::path(
    post,
    path = "/apps/{app}/events/{id}/replay",
    tag = "events",
    params(("app" = String, Path, description = "App id or uid"), ("id" = String, Path, description = "Event id")),
    request_body = ReplayEvent,
    responses((status = 202, description = "The new deliveries, queued before this answer", body = Accepted), ErrorResponses)
)]
pub async fn replay(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((app, id)): ApiPath<(String, EventId)>,
    ApiJson(body): ApiJson<ReplayEvent>,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    let app = caller.app(&state, &app).await?;
    let event = find(&state, &app.id, &id).await?;
    let webhook = match &body.webhook_id {
        Some(webhook) => {
            let webhook = WebhookId::from(webhook.as_str());
            state
                .store
                .webhook(&app.id, &webhook)
                .await?
                .ok_or_else(|| {
                    ApiError::invalid("webhook_id", format!("no webhook `{webhook}` in this app"))
                })?;
            Some(webhook)
        }
        None => None,
    };
    let queued = state.store.replay_event(&event, webhook.as_ref()).await?;
    if !queued.is_empty() {
        state.wake.notify_one();
    }
    Ok((StatusCode::ACCEPTED, Json(Accepted::new(event.id, queued))))
}
