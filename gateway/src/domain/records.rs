//! The records and commands the API, the store and the delivery worker
//! exchange: what is stored (apps, webhooks, plugins, events, deliveries,
//! attempts), what is asked of the store (new webhooks, events, plugins),
//! and what an attempt decided for its delivery and webhook.

use super::ids::{AppId, AttemptId, ClaimToken, DeliveryId, EventId, PluginId, WebhookId};
use super::states::{AttemptOutcome, DeliveryStatus, PluginFailure};
use super::values::{
    CustomHeaders, EventType, EventTypeFilter, InFlightLimit, RateLimit, RetrySchedule,
};
use crate::clock::Millis;

#[derive(Debug, Clone)]
pub struct App {
    pub id: AppId,
    pub uid: Option<String>,
    pub name: String,
    pub created_at: Millis,
    pub updated_at: Millis,
}

impl App {
    /// A new app, created `now`, with a new id.
    pub fn new(name: &str, uid: Option<&str>, now: Millis) -> Self {
        Self {
            id: AppId::new(),
            uid: uid.map(str::to_owned),
            name: name.to_owned(),
            created_at: now,
            updated_at: now,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: WebhookId,
    pub app_id: AppId,
    pub url: String,
    pub description: String,
    pub event_types: EventTypeFilter,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    pub headers: CustomHeaders,
    pub raw_payload: bool,
    /// `None`: the server's default.
    pub max_in_flight: Option<InFlightLimit>,
    /// `None`: no limit.
    pub rate_limit: Option<RateLimit>,
    /// `None`: the server's.
    pub retry_schedule: Option<RetrySchedule>,
    pub secret: String,
    pub previous_secret: Option<String>,
    pub previous_secret_expires_at: Option<Millis>,
    pub plugin: Option<AttachedPlugin>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// Fields of a new or changed webhook, already validated by the API.
#[derive(Debug, Clone)]
pub struct WebhookFields {
    pub url: String,
    pub description: String,
    pub event_types: EventTypeFilter,
    pub enabled: bool,
    pub headers: CustomHeaders,
    pub raw_payload: bool,
    /// `None`: the server's default.
    pub max_in_flight: Option<InFlightLimit>,
    /// `None`: no limit.
    pub rate_limit: Option<RateLimit>,
    /// `None`: the server's.
    pub retry_schedule: Option<RetrySchedule>,
    pub plugin: Option<AttachedPlugin>,
}

/// A plugin attached to a webhook, with its JSON config text.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachedPlugin {
    pub id: PluginId,
    pub config: String,
}

/// An uploaded plugin, without its code.
#[derive(Debug, Clone)]
pub struct Plugin {
    pub id: PluginId,
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub size: i64,
    pub created_at: Millis,
}

/// What a host needs to make a plugin ready.
#[derive(Debug, Clone)]
pub struct PluginCode {
    pub sha256: String,
    pub wasm: Vec<u8>,
    pub artifact: Option<Vec<u8>>,
    pub artifact_key: Option<String>,
}

/// An upload to store: the component (its artifact is added once the
/// optimised compile is done).
#[derive(Debug, Clone)]
pub struct NewPlugin {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub wasm: Vec<u8>,
}

impl NewPlugin {
    /// The plugin this upload becomes, stored `now` under a new id, and
    /// its code.
    pub fn into_plugin(self, now: Millis) -> (Plugin, Vec<u8>) {
        let plugin = Plugin {
            id: PluginId::new(),
            name: self.name,
            version: self.version,
            sha256: self.sha256,
            size: i64::try_from(self.wasm.len()).unwrap_or(i64::MAX),
            created_at: now,
        };
        (plugin, self.wasm)
    }
}

/// Whether storing an upload made a new plugin or found the same bytes
/// under that name and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    Created,
    AlreadyStored,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub id: EventId,
    pub app_id: AppId,
    pub event_type: String,
    pub payload: String,
    pub ordering_key: Option<String>,
    pub created_at: Millis,
}

/// An event to accept, with what makes a repeat of it recognisable.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub app_id: AppId,
    pub id: EventId,
    pub event_type: EventType,
    /// Validated JSON text.
    pub payload: String,
    pub idempotency_key: Option<String>,
    /// Events of one key go to each webhook one at a time, in publish
    /// order ([`super::ordering`]).
    pub ordering_key: Option<super::ordering::OrderingKey>,
    /// A repeat older than this is not a repeat.
    pub dedup_since: Millis,
}

/// What publishing produced. `replayed` when the event was a repeat and
/// nothing new was queued.
#[derive(Debug, Clone)]
pub struct Published {
    pub event_id: EventId,
    pub deliveries: Vec<Queued>,
    pub replayed: bool,
}

/// A delivery queued by a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: DeliveryId,
    pub webhook_id: WebhookId,
}

#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: DeliveryId,
    pub app_id: AppId,
    pub event_id: EventId,
    pub webhook_id: WebhookId,
    pub status: DeliveryStatus,
    pub attempts: i64,
    pub due_at: Option<Millis>,
    pub last_attempt_at: Option<Millis>,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    pub skip_reason: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: AttemptId,
    pub attempt: i64,
    pub started_at: Millis,
    pub duration_ms: i64,
    pub outcome: AttemptOutcome,
    pub status_code: Option<i64>,
    pub response_body: Option<String>,
    pub error: Option<String>,
    pub plugin_error: Option<PluginFailure>,
}

/// A page of a list ordered by id: items after `cursor`, at most `limit`.
#[derive(Debug, Clone)]
pub struct PageRequest {
    pub cursor: Option<String>,
    pub limit: u32,
}

/// Counts of the delivery queue at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Waiting for an attempt, due now or later (not claimed).
    pub pending: u64,
    /// Of those, due now.
    pub due: u64,
    /// Claimed by a worker.
    pub in_flight: u64,
    /// The earliest due time among pending deliveries.
    pub oldest_due_at: Option<Millis>,
    /// Webhooks whose breaker is open and holds their lane.
    pub breakers_open: u64,
    /// Webhooks whose breaker is open with a probe due or on its way.
    pub breakers_half_open: u64,
}

/// What a worker asks of a claim.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// Most deliveries to claim.
    pub limit: u32,
    /// How long the claims hold before another worker may take them over.
    pub lease: std::time::Duration,
    /// The in-flight limit of webhooks that set none.
    pub default_max_in_flight: InFlightLimit,
    /// How many more deliveries of each app the worker may hold.
    pub apps: super::share::Allotment,
}

/// A delivery a worker claimed, with all it needs to make the attempt.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub id: DeliveryId,
    pub claim_token: ClaimToken,
    pub attempts: i64,
    pub event_id: EventId,
    pub event_type: String,
    pub payload: String,
    pub event_created_at: Millis,
    pub webhook_id: WebhookId,
    pub url: String,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    /// The webhook's custom headers, or why the stored ones are unusable
    /// (that attempt fails; the rest of the claim goes on).
    pub headers: Result<CustomHeaders, String>,
    pub raw_payload: bool,
    pub secret: String,
    pub previous_secret: Option<String>,
    pub previous_secret_expires_at: Option<Millis>,
    pub app_id: AppId,
    pub app_uid: Option<String>,
    pub plugin: Option<ClaimedPlugin>,
    /// Its ordering key, if it holds a place in the key's order: ending
    /// it lets the next one of the key go. A replayed delivery has none.
    pub ordering_key: Option<String>,
    /// Its webhook's own retry schedule; `None`: the server's.
    pub retry_schedule: Option<RetrySchedule>,
}

impl ClaimedDelivery {
    /// What gives this claim back to the queue.
    pub fn held(&self) -> HeldClaim {
        HeldClaim {
            delivery_id: self.id.clone(),
            token: self.claim_token.clone(),
        }
    }
}

/// The plugin a claimed delivery runs: which one, its code's hash (the
/// key of the compiled-code cache), and the webhook's config for it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedPlugin {
    pub id: PluginId,
    pub sha256: String,
    pub config: String,
}

/// A claim a worker holds and may give back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HeldClaim {
    pub delivery_id: DeliveryId,
    pub token: ClaimToken,
}

/// The result of one attempt and what it means for the delivery and its
/// webhook, decided by the delivery module and applied atomically.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub delivery_id: DeliveryId,
    pub claim_token: ClaimToken,
    pub webhook_id: WebhookId,
    /// `None` when the delivery ended without an attempt (webhook disabled).
    pub attempt: Option<AttemptRow>,
    pub next: NextState,
    pub webhook: WebhookEffect,
    /// The endpoint asked to be left alone until then (see
    /// [`super::lane::throttle`]): its whole lane waits.
    pub throttled_until: Option<Millis>,
    /// The delivery's ordering key: if this ends it, the next of the key
    /// becomes due ([`super::ordering`]).
    pub ordering_key: Option<String>,
    pub now: Millis,
}

/// An attempt as it is written to the history.
#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub number: i64,
    pub started_at: Millis,
    pub duration_ms: i64,
    pub outcome: AttemptOutcome,
    pub status_code: Option<i64>,
    pub response_body: Option<String>,
    pub error: Option<String>,
    pub plugin_error: Option<PluginFailure>,
}

/// What follows an attempt for its delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum NextState {
    Succeeded,
    Skipped { reason: String },
    Retry { due_at: Millis, error: String },
    Dead { error: String },
}

impl NextState {
    /// The delivery's status once this is applied.
    pub fn status(&self) -> DeliveryStatus {
        match self {
            Self::Succeeded => DeliveryStatus::Succeeded,
            Self::Skipped { .. } => DeliveryStatus::Skipped,
            Self::Retry { .. } => DeliveryStatus::Failed,
            Self::Dead { .. } => DeliveryStatus::Dead,
        }
    }

    /// When the next attempt is due; `None` once the delivery is final.
    pub fn due_at(&self) -> Option<Millis> {
        match self {
            Self::Retry { due_at, .. } => Some(*due_at),
            _ => None,
        }
    }

    /// The error the delivery shows as its last.
    pub fn error(&self) -> Option<&str> {
        match self {
            Self::Retry { error, .. } | Self::Dead { error } => Some(error),
            _ => None,
        }
    }

    pub fn skip_reason(&self) -> Option<&str> {
        match self {
            Self::Skipped { reason } => Some(reason),
            _ => None,
        }
    }
}

/// What an attempt means for its webhook's health.
#[derive(Debug, Clone, PartialEq)]
pub enum WebhookEffect {
    None,
    /// A success: the webhook is healthy again.
    Healthy,
    /// A failure: start the failing clock, and disable the webhook when it
    /// has been failing since before `disable_if_failing_since`.
    Failing {
        disable_if_failing_since: Millis,
    },
    /// Disable at once (the receiver answered 410 Gone).
    Disable {
        reason: String,
    },
}
