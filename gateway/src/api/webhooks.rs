//! Webhooks: registration, changes, secret rotation.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ApiResult, OrNotFound};
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller, ListQuery, Page, double_option};
use super::openapi::ErrorResponses;
use crate::clock::{Millis, millis, now_ms, rfc3339};
use crate::domain::lane::LaneState;
use crate::domain::{
    AppId, AttachedPlugin, CustomHeaders, EventTypeFilter, InFlightLimit, PluginId, RateLimit,
    RetrySchedule, Webhook, WebhookFields, WebhookId,
};
use crate::signing::Secret;

const MAX_DESCRIPTION_LEN: usize = 1024;
const MAX_PLUGIN_CONFIG_LEN: usize = 64 * 1024;

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookView {
    id: String,
    app_id: String,
    url: String,
    description: String,
    event_types: Option<Vec<String>>,
    enabled: bool,
    disabled_reason: Option<String>,
    headers: BTreeMap<String, String>,
    raw_payload: bool,
    /// Attempts in flight at once to this webhook; null: the server's
    /// default (`WASMHOOK_MAX_IN_FLIGHT`).
    max_in_flight: Option<u32>,
    /// Deliveries per second this webhook's endpoint receives at most,
    /// across every gateway process; null: no limit.
    rate_limit: Option<u32>,
    /// How many deliveries may arrive at once within the rate limit; null
    /// when there is no limit.
    rate_limit_burst: Option<u32>,
    /// The delays between attempts (one more attempt than delays); null:
    /// the server's (`WASMHOOK_RETRY_SCHEDULE`).
    retry_schedule: Option<Vec<String>>,
    secret_masked: String,
    breaker: BreakerView,
    /// `{id, config}` of the attached plugin, or null.
    #[schema(value_type = Option<PluginAttachment>)]
    plugin: Option<Value>,
    created_at: String,
    updated_at: String,
}

/// A webhook's circuit breaker: whether it holds the endpoint's
/// deliveries after most recent attempts failed.
#[derive(Debug, Serialize, ToSchema)]
pub struct BreakerView {
    /// `closed`; `open`: the endpoint's deliveries wait, spending no
    /// attempts, until the next probe; `half_open`: a probe is due or on
    /// its way, and its success closes the breaker.
    #[schema(example = "closed")]
    state: &'static str,
    /// When it opened; null when closed.
    since: Option<String>,
    /// The share of failed attempts in its current window (0 to 1); null
    /// before any.
    failure_rate: Option<f64>,
    /// Attempts counted in its current window.
    window_attempts: i64,
}

impl BreakerView {
    fn of(lane: &LaneState, now: Millis) -> Self {
        let breaker = &lane.breaker;
        Self {
            state: breaker.state(lane.held_until, now).as_str(),
            since: breaker.open_since.map(rfc3339),
            failure_rate: breaker.failure_rate(),
            window_attempts: breaker.window_attempts,
        }
    }
}

/// Views of `webhooks` with their lanes' breakers, read in one query.
async fn views(state: &AppState, webhooks: Vec<Webhook>) -> ApiResult<Vec<WebhookView>> {
    let ids: Vec<WebhookId> = webhooks.iter().map(|w| w.id.clone()).collect();
    let lanes: HashMap<WebhookId, LaneState> = state.store.lanes(&ids).await?.into_iter().collect();
    let now = now_ms();
    webhooks
        .into_iter()
        .map(|w| {
            let lane = lanes.get(&w.id).copied().unwrap_or_default();
            WebhookView::new(w, BreakerView::of(&lane, now))
        })
        .collect()
}

async fn view(state: &AppState, webhook: Webhook) -> ApiResult<WebhookView> {
    let mut views = views(state, vec![webhook]).await?;
    views
        .pop()
        .ok_or_else(|| ApiError::corrupt("a webhook without its view"))
}

impl WebhookView {
    fn new(w: Webhook, breaker: BreakerView) -> ApiResult<Self> {
        let secret = Secret::parse(&w.secret).map_err(ApiError::corrupt)?;
        Ok(Self {
            id: w.id.into(),
            app_id: w.app_id.into(),
            url: w.url,
            description: w.description,
            event_types: w.event_types.items().map(<[String]>::to_vec),
            enabled: w.enabled,
            disabled_reason: w.disabled_reason,
            headers: w.headers.as_map().clone(),
            raw_payload: w.raw_payload,
            max_in_flight: w.max_in_flight.map(InFlightLimit::get),
            rate_limit: w.rate_limit.map(RateLimit::per_second),
            rate_limit_burst: w.rate_limit.map(RateLimit::burst),
            retry_schedule: w.retry_schedule.as_ref().map(RetrySchedule::steps),
            secret_masked: secret.masked(),
            breaker,
            plugin: match &w.plugin {
                Some(p) => Some(json!({
                    "id": p.id,
                    "config": serde_json::from_str::<Value>(&p.config).map_err(ApiError::corrupt)?,
                })),
                None => None,
            },
            created_at: rfc3339(w.created_at),
            updated_at: rfc3339(w.updated_at),
        })
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    url: String,
    description: Option<String>,
    event_types: Option<Vec<String>>,
    enabled: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
    raw_payload: Option<bool>,
    /// Attempts in flight at once to this webhook, across every gateway
    /// process; omit or null for the server's default.
    #[schema(minimum = 1, maximum = 10000)]
    max_in_flight: Option<u32>,
    /// Deliveries per second the endpoint receives at most, across every
    /// gateway process; deliveries held back wait in the queue without
    /// spending attempts. Omit or null for no limit.
    #[schema(minimum = 1, maximum = 10000)]
    rate_limit: Option<u32>,
    /// How many may arrive at once within the rate limit (default: a tenth
    /// of a second's worth, at least 1). Needs `rate_limit`.
    #[schema(minimum = 1, maximum = 10000)]
    rate_limit_burst: Option<u32>,
    /// This webhook's delays between attempts, such as `["10s", "5m",
    /// "1h 30m"]` (one more attempt than delays; at most 30, adding up to
    /// at most 7 days); omit or null for the server's.
    #[schema(max_items = 30)]
    retry_schedule: Option<Vec<String>>,
    plugin: Option<PluginAttachment>,
}

/// `plugin: {id, config}` on a webhook.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PluginAttachment {
    /// The plugin's id.
    id: String,
    /// Any JSON, given to the plugin with every delivery (at most 64 KiB).
    #[serde(default)]
    config: Value,
}

impl PluginAttachment {
    fn stored(&self) -> AttachedPlugin {
        AttachedPlugin {
            id: PluginId::from(self.id.as_str()),
            config: self.config.to_string(),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchWebhook {
    url: Option<String>,
    description: Option<String>,
    /// New filters, or null for every event type.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<Vec<String>>)]
    event_types: Option<Option<Vec<String>>>,
    enabled: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
    raw_payload: Option<bool>,
    /// A new in-flight limit, or null for the server's default.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 10000)]
    max_in_flight: Option<Option<u32>>,
    /// A new rate limit (its burst back to the default unless
    /// `rate_limit_burst` is given too), or null for none.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 10000)]
    rate_limit: Option<Option<u32>>,
    /// A new burst for the rate limit the webhook has or is given.
    #[schema(minimum = 1, maximum = 10000)]
    rate_limit_burst: Option<u32>,
    /// New delays between attempts, or null for the server's.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<Vec<String>>, max_items = 30)]
    retry_schedule: Option<Option<Vec<String>>>,
    /// A plugin to attach, or null to detach the current one.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<PluginAttachment>)]
    plugin: Option<Option<PluginAttachment>>,
}

/// Checks every field; the URL check resolves host names.
async fn validate(state: &AppState, fields: Unchecked<'_>) -> ApiResult<WebhookFields> {
    let url = state
        .policy
        .parse_and_resolve(fields.url)
        .await
        .map_err(ApiError::unsafe_url)?;
    if fields.description.len() > MAX_DESCRIPTION_LEN {
        return Err(ApiError::invalid(
            "description",
            format!("must be at most {MAX_DESCRIPTION_LEN} characters"),
        ));
    }
    let filter = EventTypeFilter::parse(fields.event_types)
        .map_err(|e| ApiError::invalid("event_types", e))?;
    let headers =
        CustomHeaders::parse(fields.headers).map_err(|e| ApiError::invalid("headers", e))?;
    let max_in_flight = fields
        .max_in_flight
        .map(|n| InFlightLimit::parse(u64::from(n)))
        .transpose()
        .map_err(|e| ApiError::invalid("max_in_flight", e))?;
    let rate_limit = match (fields.rate_limit, fields.rate_limit_burst) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ApiError::invalid(
                "rate_limit_burst",
                "needs a rate_limit".to_owned(),
            ));
        }
        (Some(per_second), burst) => Some(
            RateLimit::parse(u64::from(per_second), burst.map(u64::from))
                .map_err(|(field, e)| ApiError::invalid(field, e))?,
        ),
    };
    let retry_schedule = fields
        .retry_schedule
        .map(RetrySchedule::parse)
        .transpose()
        .map_err(|e| ApiError::invalid("retry_schedule", e))?;
    if let Some(plugin) = &fields.plugin {
        if plugin.config.len() > MAX_PLUGIN_CONFIG_LEN {
            return Err(ApiError::invalid(
                "plugin.config",
                format!(
                    "is {} bytes of JSON; at most {MAX_PLUGIN_CONFIG_LEN}",
                    plugin.config.len()
                ),
            ));
        }
        if state.store.plugin(&plugin.id).await?.is_none() {
            return Err(ApiError::invalid(
                "plugin.id",
                format!("no plugin `{}`", plugin.id),
            ));
        }
    }
    Ok(WebhookFields {
        url: url.to_string(),
        description: fields.description.to_owned(),
        event_types: filter,
        enabled: fields.enabled,
        headers,
        raw_payload: fields.raw_payload,
        max_in_flight,
        rate_limit,
        retry_schedule,
        plugin: fields.plugin,
    })
}

/// A webhook's fields as requested, before [`validate`].
struct Unchecked<'a> {
    url: &'a str,
    description: &'a str,
    event_types: Option<&'a [String]>,
    enabled: bool,
    headers: &'a BTreeMap<String, String>,
    raw_payload: bool,
    max_in_flight: Option<u32>,
    rate_limit: Option<u32>,
    rate_limit_burst: Option<u32>,
    retry_schedule: Option<&'a [String]>,
    plugin: Option<AttachedPlugin>,
}

async fn find(state: &AppState, app_id: &AppId, id: &WebhookId) -> ApiResult<Webhook> {
    state
        .store
        .webhook(app_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook", id))
}

/// Registers a webhook. The response is the only one that shows the secret.
#[utoipa::path(
    post,
    path = "/apps/{app}/webhooks",
    tag = "webhooks",
    params(("app" = String, Path, description = "App id or uid")),
    request_body = CreateWebhook,
    responses((status = 201, description = "The webhook with its signing secret, shown only in this answer", body = WebhookCreated), ErrorResponses)
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(app): ApiPath<String>,
    ApiJson(body): ApiJson<CreateWebhook>,
) -> ApiResult<(StatusCode, Json<WebhookCreated>)> {
    let app = caller.app(&state, &app).await?;
    let no_headers = BTreeMap::new();
    let fields = validate(
        &state,
        Unchecked {
            url: &body.url,
            description: body.description.as_deref().unwrap_or(""),
            event_types: body.event_types.as_deref(),
            enabled: body.enabled.unwrap_or(true),
            headers: body.headers.as_ref().unwrap_or(&no_headers),
            raw_payload: body.raw_payload.unwrap_or(false),
            max_in_flight: body.max_in_flight,
            rate_limit: body.rate_limit,
            rate_limit_burst: body.rate_limit_burst,
            retry_schedule: body.retry_schedule.as_deref(),
            plugin: body.plugin.as_ref().map(PluginAttachment::stored),
        },
    )
    .await?;
    let secret = Secret::generate();
    let webhook = state
        .store
        .create_webhook(&app.id, &fields, secret.expose())
        .await?;
    let created = WebhookCreated {
        webhook: view(&state, webhook).await?,
        secret: secret.expose().to_owned(),
    };
    Ok((StatusCode::CREATED, Json(created)))
}

/// A new webhook: the only answer that shows its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookCreated {
    #[serde(flatten)]
    webhook: WebhookView,
    /// `whsec_...`: give it to the receiver to verify signatures.
    secret: String,
}

/// A rotated secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct SecretRotated {
    secret: String,
    /// Until then deliveries carry a signature with the previous secret too.
    previous_secret_expires_at: String,
}

#[utoipa::path(
    get,
    path = "/apps/{app}/webhooks",
    tag = "webhooks",
    params(("app" = String, Path, description = "App id or uid"), ListQuery),
    responses((status = 200, description = "A page of webhooks", body = Page<WebhookView>), ErrorResponses)
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(app): ApiPath<String>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<Page<WebhookView>>> {
    let app = caller.app(&state, &app).await?;
    let page = query.page()?;
    let webhooks = state.store.list_webhooks(&app.id, &page).await?;
    let page = Page::new(webhooks, &page, |w| w.id.to_string(), |w| w);
    Ok(Json(Page {
        data: views(&state, page.data).await?,
        next_cursor: page.next_cursor,
    }))
}

#[utoipa::path(
    get,
    path = "/apps/{app}/webhooks/{id}",
    tag = "webhooks",
    params(("app" = String, Path, description = "App id or uid"), ("id" = String, Path, description = "Webhook id")),
    responses((status = 200, description = "The webhook", body = WebhookView), ErrorResponses)
)]
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((app, id)): ApiPath<(String, WebhookId)>,
) -> ApiResult<Json<WebhookView>> {
    let app = caller.app(&state, &app).await?;
    Ok(Json(view(&state, find(&state, &app.id, &id).await?).await?))
}

#[utoipa::path(
    patch,
    path = "/apps/{app}/webhooks/{id}",
    tag = "webhooks",
    params(("app" = String, Path, description = "App id or uid"), ("id" = String, Path, description = "Webhook id")),
    request_body = PatchWebhook,
    responses((status = 200, description = "The changed webhook", body = WebhookView), ErrorResponses)
)]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((app, id)): ApiPath<(String, WebhookId)>,
    ApiJson(body): ApiJson<PatchWebhook>,
) -> ApiResult<Json<WebhookView>> {
    let app = caller.app(&state, &app).await?;
    let current = find(&state, &app.id, &id).await?;
    let event_types = match &body.event_types {
        Some(requested) => requested.as_deref(),
        None => current.event_types.items(),
    };
    let (rate_limit, rate_limit_burst) = match (body.rate_limit, body.rate_limit_burst) {
        (Some(requested), burst) => (requested, burst),
        (None, burst) => (
            current.rate_limit.map(RateLimit::per_second),
            burst.or(current.rate_limit.map(RateLimit::burst)),
        ),
    };
    let current_schedule = current.retry_schedule.as_ref().map(RetrySchedule::steps);
    let fields = validate(
        &state,
        Unchecked {
            url: body.url.as_deref().unwrap_or(&current.url),
            description: body.description.as_deref().unwrap_or(&current.description),
            event_types,
            enabled: body.enabled.unwrap_or(current.enabled),
            headers: body.headers.as_ref().unwrap_or(current.headers.as_map()),
            raw_payload: body.raw_payload.unwrap_or(current.raw_payload),
            max_in_flight: body
                .max_in_flight
                .unwrap_or(current.max_in_flight.map(InFlightLimit::get)),
            rate_limit,
            rate_limit_burst,
            retry_schedule: match &body.retry_schedule {
                Some(requested) => requested.as_deref(),
                None => current_schedule.as_deref(),
            },
            plugin: match &body.plugin {
                Some(requested) => requested.as_ref().map(PluginAttachment::stored),
                None => current.plugin.clone(),
            },
        },
    )
    .await?;
    let webhook = state
        .store
        .update_webhook(&app.id, &id, &fields)
        .await
        .or_not_found("webhook", &id)?;
    Ok(Json(view(&state, webhook).await?))
}

#[utoipa::path(
    delete,
    path = "/apps/{app}/webhooks/{id}",
    tag = "webhooks",
    params(("app" = String, Path, description = "App id or uid"), ("id" = String, Path, description = "Webhook id")),
    responses((status = 204, description = "Deleted, with its deliveries"), ErrorResponses)
)]
pub async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((app, id)): ApiPath<(String, WebhookId)>,
) -> ApiResult<StatusCode> {
    let app = caller.app(&state, &app).await?;
    state
        .store
        .delete_webhook(&app.id, &id)
        .await
        .or_not_found("webhook", &id)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Issues a new secret. Until the overlap ends, deliveries are signed with
/// both, so receivers can switch without rejecting anything.
#[utoipa::path(
    post,
    path = "/apps/{app}/webhooks/{id}/secret/rotate",
    tag = "webhooks",
    params(("app" = String, Path, description = "App id or uid"), ("id" = String, Path, description = "Webhook id")),
    responses((status = 200, description = "The new secret; the old one signs too until the overlap ends", body = SecretRotated), ErrorResponses)
)]
pub async fn rotate_secret(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((app, id)): ApiPath<(String, WebhookId)>,
) -> ApiResult<Json<SecretRotated>> {
    let app = caller.app(&state, &app).await?;
    let secret = Secret::generate();
    let overlap_ends = now_ms() + millis(state.limits.secret_rotation_overlap);
    state
        .store
        .rotate_secret(&app.id, &id, secret.expose(), overlap_ends)
        .await
        .or_not_found("webhook", &id)?;
    Ok(Json(SecretRotated {
        secret: secret.expose().to_owned(),
        previous_secret_expires_at: rfc3339(overlap_ends),
    }))
}
