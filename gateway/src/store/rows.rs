//! Reading rows into records, written once for both backends: each
//! driver's row type implements [`ReadRow`], and one mapper per record
//! reads its columns by name, parsing stored text into domain types
//! (statuses, outcomes, filters, headers) on the way.

use super::{StoreError, StoreResult};
use crate::domain::lane::{Breaker, LaneState};
use crate::domain::{
    App, AttachedPlugin, Attempt, AttemptOutcome, ClaimedDelivery, ClaimedPlugin, CustomHeaders,
    Delivery, DeliveryStatus, Event, EventTypeFilter, InFlightLimit, Plugin, PluginCode,
    PluginFailure, RateLimit, RetrySchedule, Webhook, WebhookId,
};

/// A lane's state, as [`lane_state`] reads it.
pub(super) const LANE_COLUMNS: &str = "webhook_id, next_due_at, parked, streak, held_until, \
     breaker_open_since, probe_ms, window_start, window_attempts, window_failures";
pub(super) const APP_COLUMNS: &str = "id, uid, name, created_at, updated_at";
pub(super) const WEBHOOK_COLUMNS: &str = "id, app_id, url, description, event_types, enabled, \
     disabled_reason, headers, raw_payload, secret, previous_secret, previous_secret_expires_at, \
     created_at, updated_at, plugin_id, plugin_config, max_in_flight, rate_limit, rate_limit_burst, \
     retry_schedule";
pub(super) const PLUGIN_COLUMNS: &str = "id, name, version, sha256, size, created_at";
pub(super) const PLUGIN_CODE_COLUMNS: &str = "sha256, wasm, artifact, artifact_key";
pub(super) const EVENT_COLUMNS: &str = "id, app_id, event_type, payload, ordering_key, created_at";
pub(super) const DELIVERY_COLUMNS: &str = "id, app_id, event_id, webhook_id, status, attempts, \
     due_at, last_attempt_at, last_status_code, last_error, created_at, updated_at, skip_reason";
pub(super) const ATTEMPT_COLUMNS: &str = "id, attempt, started_at, duration_ms, outcome, \
     status_code, response_body, error, plugin_error";
/// A claimed delivery `d` with what its attempt needs, joined by
/// [`CLAIMED_JOINS`].
pub(super) const CLAIMED_COLUMNS: &str = "d.id, d.claim_token, d.attempts, \
     e.id AS event_id, e.event_type, e.payload, e.created_at AS event_created_at, d.ordering_key, \
     w.id AS webhook_id, w.url, w.enabled, w.disabled_reason, w.headers, w.raw_payload, w.secret, \
     w.previous_secret, w.previous_secret_expires_at, a.id AS app_id, a.uid AS app_uid, \
     w.plugin_id, w.plugin_config, p.sha256 AS plugin_sha256, w.retry_schedule";
pub(super) const CLAIMED_JOINS: &str = "JOIN events e ON e.app_id = d.app_id AND e.id = d.event_id \
     JOIN webhooks w ON w.id = d.webhook_id JOIN apps a ON a.id = d.app_id \
     LEFT JOIN plugins p ON p.id = w.plugin_id";
/// The columns [`subscription`] reads.
pub(super) const SUBSCRIPTION_COLUMNS: &str = "id, event_types";

/// A value both drivers can decode from a column.
pub(super) trait Column:
    rusqlite::types::FromSql + for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>
{
}

impl<T> Column for T where
    T: rusqlite::types::FromSql
        + for<'r> sqlx::Decode<'r, sqlx::Postgres>
        + sqlx::Type<sqlx::Postgres>
{
}

/// One result row of either driver, read by column name.
pub(super) trait ReadRow {
    fn value<T: Column>(&self, column: &str) -> StoreResult<T>;

    /// A text column as a typed id (or any type made from its text).
    fn text<T: From<String>>(&self, column: &str) -> StoreResult<T> {
        Ok(T::from(self.value::<String>(column)?))
    }
}

impl ReadRow for rusqlite::Row<'_> {
    fn value<T: Column>(&self, column: &str) -> StoreResult<T> {
        Ok(self.get(column)?)
    }
}

impl ReadRow for sqlx::postgres::PgRow {
    fn value<T: Column>(&self, column: &str) -> StoreResult<T> {
        Ok(sqlx::Row::try_get(self, column)?)
    }
}

fn corrupt(column: &str, problem: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{column} column: {problem}"))
}

fn event_types(r: &impl ReadRow) -> StoreResult<EventTypeFilter> {
    let stored: Option<String> = r.value("event_types")?;
    EventTypeFilter::from_stored(stored.as_deref()).map_err(|e| corrupt("event_types", e))
}

fn headers(r: &impl ReadRow) -> StoreResult<CustomHeaders> {
    let stored: String = r.value("headers")?;
    CustomHeaders::from_stored(&stored).map_err(|e| corrupt("headers", e))
}

fn max_in_flight(r: &impl ReadRow) -> StoreResult<Option<InFlightLimit>> {
    let Some(stored) = r.value::<Option<i64>>("max_in_flight")? else {
        return Ok(None);
    };
    let limit = u64::try_from(stored).map_err(|e| corrupt("max_in_flight", e))?;
    Ok(Some(
        InFlightLimit::parse(limit).map_err(|e| corrupt("max_in_flight", e))?,
    ))
}

fn retry_schedule(r: &impl ReadRow) -> StoreResult<Option<RetrySchedule>> {
    r.value::<Option<String>>("retry_schedule")?
        .map(|text| RetrySchedule::from_text(&text).map_err(|e| corrupt("retry_schedule", e)))
        .transpose()
}

fn rate_limit(r: &impl ReadRow) -> StoreResult<Option<RateLimit>> {
    match r.value::<Option<i64>>("rate_limit")? {
        Some(per_second) => Ok(Some(stored_rate(per_second, r.value("rate_limit_burst")?)?)),
        None => Ok(None),
    }
}

/// A rate limit from its stored columns.
pub(super) fn stored_rate(per_second: i64, burst: Option<i64>) -> StoreResult<RateLimit> {
    let per_second = u64::try_from(per_second).map_err(|e| corrupt("rate_limit", e))?;
    let burst = burst
        .map(u64::try_from)
        .transpose()
        .map_err(|e| corrupt("rate_limit_burst", e))?;
    RateLimit::parse(per_second, burst).map_err(|(field, e)| corrupt(field, e))
}

fn attached_plugin(r: &impl ReadRow) -> StoreResult<Option<AttachedPlugin>> {
    let Some(id) = r.value::<Option<String>>("plugin_id")? else {
        return Ok(None);
    };
    let config: Option<String> = r.value("plugin_config")?;
    Ok(Some(AttachedPlugin {
        id: id.into(),
        config: config.unwrap_or_else(|| "null".into()),
    }))
}

pub(super) fn app(r: &impl ReadRow) -> StoreResult<App> {
    Ok(App {
        id: r.text("id")?,
        uid: r.value("uid")?,
        name: r.value("name")?,
        created_at: r.value("created_at")?,
        updated_at: r.value("updated_at")?,
    })
}

pub(super) fn webhook(r: &impl ReadRow) -> StoreResult<Webhook> {
    Ok(Webhook {
        id: r.text("id")?,
        app_id: r.text("app_id")?,
        url: r.value("url")?,
        description: r.value("description")?,
        event_types: event_types(r)?,
        enabled: r.value("enabled")?,
        disabled_reason: r.value("disabled_reason")?,
        headers: headers(r)?,
        raw_payload: r.value("raw_payload")?,
        max_in_flight: max_in_flight(r)?,
        rate_limit: rate_limit(r)?,
        retry_schedule: retry_schedule(r)?,
        secret: r.value("secret")?,
        previous_secret: r.value("previous_secret")?,
        previous_secret_expires_at: r.value("previous_secret_expires_at")?,
        plugin: attached_plugin(r)?,
        created_at: r.value("created_at")?,
        updated_at: r.value("updated_at")?,
    })
}

/// A row of [`LANE_COLUMNS`].
pub(super) fn lane_state(r: &impl ReadRow) -> StoreResult<(WebhookId, LaneState)> {
    let lane = LaneState {
        next_due_at: r.value("next_due_at")?,
        parked: r.value("parked")?,
        streak: r.value("streak")?,
        held_until: r.value("held_until")?,
        breaker: Breaker {
            open_since: r.value("breaker_open_since")?,
            probe_ms: r.value("probe_ms")?,
            window_start: r.value("window_start")?,
            window_attempts: r.value("window_attempts")?,
            window_failures: r.value("window_failures")?,
        },
    };
    Ok((r.text("webhook_id")?, lane))
}

/// A webhook's id and filter, for fan-out.
pub(super) fn subscription(r: &impl ReadRow) -> StoreResult<(WebhookId, EventTypeFilter)> {
    Ok((r.text("id")?, event_types(r)?))
}

pub(super) fn plugin(r: &impl ReadRow) -> StoreResult<Plugin> {
    Ok(Plugin {
        id: r.text("id")?,
        name: r.value("name")?,
        version: r.value("version")?,
        sha256: r.value("sha256")?,
        size: r.value("size")?,
        created_at: r.value("created_at")?,
    })
}

pub(super) fn plugin_code(r: &impl ReadRow) -> StoreResult<PluginCode> {
    Ok(PluginCode {
        sha256: r.value("sha256")?,
        wasm: r.value("wasm")?,
        artifact: r.value("artifact")?,
        artifact_key: r.value("artifact_key")?,
    })
}

pub(super) fn event(r: &impl ReadRow) -> StoreResult<Event> {
    Ok(Event {
        id: r.text("id")?,
        app_id: r.text("app_id")?,
        event_type: r.value("event_type")?,
        payload: r.value("payload")?,
        ordering_key: r.value("ordering_key")?,
        created_at: r.value("created_at")?,
    })
}

pub(super) fn delivery(r: &impl ReadRow) -> StoreResult<Delivery> {
    let status: String = r.value("status")?;
    Ok(Delivery {
        id: r.text("id")?,
        app_id: r.text("app_id")?,
        event_id: r.text("event_id")?,
        webhook_id: r.text("webhook_id")?,
        status: DeliveryStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
        attempts: r.value("attempts")?,
        due_at: r.value("due_at")?,
        last_attempt_at: r.value("last_attempt_at")?,
        last_status_code: r.value("last_status_code")?,
        last_error: r.value("last_error")?,
        skip_reason: r.value("skip_reason")?,
        created_at: r.value("created_at")?,
        updated_at: r.value("updated_at")?,
    })
}

pub(super) fn attempt(r: &impl ReadRow) -> StoreResult<Attempt> {
    let outcome: String = r.value("outcome")?;
    let plugin_error = match r.value::<Option<String>>("plugin_error")? {
        Some(text) => {
            Some(PluginFailure::parse(&text).ok_or_else(|| corrupt("plugin_error", &text))?)
        }
        None => None,
    };
    Ok(Attempt {
        id: r.text("id")?,
        attempt: r.value("attempt")?,
        started_at: r.value("started_at")?,
        duration_ms: r.value("duration_ms")?,
        outcome: AttemptOutcome::parse(&outcome).ok_or_else(|| corrupt("outcome", &outcome))?,
        status_code: r.value("status_code")?,
        response_body: r.value("response_body")?,
        error: r.value("error")?,
        plugin_error,
    })
}

/// A row of [`CLAIMED_COLUMNS`].
pub(super) fn claimed(r: &impl ReadRow) -> StoreResult<ClaimedDelivery> {
    let plugin = match (
        attached_plugin(r)?,
        r.value::<Option<String>>("plugin_sha256")?,
    ) {
        (Some(attached), Some(sha256)) => Some(ClaimedPlugin {
            id: attached.id,
            sha256,
            config: attached.config,
        }),
        _ => None,
    };
    Ok(ClaimedDelivery {
        id: r.text("id")?,
        claim_token: r.text("claim_token")?,
        attempts: r.value("attempts")?,
        event_id: r.text("event_id")?,
        event_type: r.value("event_type")?,
        payload: r.value("payload")?,
        event_created_at: r.value("event_created_at")?,
        webhook_id: r.text("webhook_id")?,
        url: r.value("url")?,
        enabled: r.value("enabled")?,
        disabled_reason: r.value("disabled_reason")?,
        // One unreadable row must fail its own attempt, not every claim.
        headers: headers(r).map_err(|e| e.to_string()),
        raw_payload: r.value("raw_payload")?,
        secret: r.value("secret")?,
        previous_secret: r.value("previous_secret")?,
        previous_secret_expires_at: r.value("previous_secret_expires_at")?,
        app_id: r.text("app_id")?,
        app_uid: r.value("app_uid")?,
        plugin,
        ordering_key: r.value("ordering_key")?,
        // As with headers: an unreadable schedule must not fail every
        // claim; the server's applies, and the log says why.
        retry_schedule: retry_schedule(r).unwrap_or_else(|error| {
            tracing::warn!(%error, "a webhook's stored retry schedule is unreadable; using the server's");
            None
        }),
    })
}
