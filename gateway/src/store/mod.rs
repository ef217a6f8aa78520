//! Durable state: apps, app keys, webhooks, events, the delivery queue and
//! the attempt history.
//!
//! Handlers and the delivery worker speak to the store only through the
//! records and commands defined here; the SQL lives in the backend module.
//! Every state change that must not be lost (an accepted event and its
//! deliveries, an attempt and the delivery's next state) is one transaction.

mod sqlite;

pub use sqlite::Store;

use serde::Serialize;

/// Milliseconds since the Unix epoch: the unit of every stored time.
pub type Millis = i64;

pub fn now_ms() -> Millis {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_millis() as Millis
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Conflict(String),
    #[error("not found")]
    NotFound,
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot open the database: {0}")]
    Open(String),
    #[error("the transaction holding this change failed to commit: {0}")]
    Commit(String),
    #[error("the write did not run: the database writer stopped or could not begin a transaction")]
    WriterGone,
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A new, prefixed, time-ordered identifier (`app_01J…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::new())
}

#[derive(Debug, Clone)]
pub struct App {
    pub id: String,
    pub uid: Option<String>,
    pub name: String,
    pub created_at: Millis,
    pub updated_at: Millis,
}

#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: String,
    pub app_id: String,
    pub url: String,
    pub description: String,
    /// JSON array of filters; `None` subscribes to every event type.
    pub event_types: Option<String>,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    /// JSON object of extra request headers.
    pub headers: String,
    pub raw_payload: bool,
    pub secret: String,
    pub previous_secret: Option<String>,
    pub previous_secret_expires_at: Option<Millis>,
    pub plugin: Option<AttachedPlugin>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// A plugin attached to a webhook, with its JSON config text.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachedPlugin {
    pub id: String,
    pub config: String,
}

/// An uploaded plugin, without its code.
#[derive(Debug, Clone)]
pub struct Plugin {
    pub id: String,
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

#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub app_id: String,
    pub event_type: String,
    pub payload: String,
    pub created_at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Pending,
    Sending,
    Succeeded,
    Failed,
    Dead,
    /// A plugin decided not to send it.
    Skipped,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 6] = [
        Self::Pending,
        Self::Sending,
        Self::Succeeded,
        Self::Failed,
        Self::Dead,
        Self::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sending => "sending",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Skipped => "skipped",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    pub app_id: String,
    pub event_id: String,
    pub webhook_id: String,
    pub status: String,
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
    pub id: String,
    pub attempt: i64,
    pub started_at: Millis,
    pub duration_ms: i64,
    pub outcome: String,
    pub status_code: Option<i64>,
    pub response_body: Option<String>,
    pub error: Option<String>,
    pub plugin_error: Option<String>,
}

/// A page of a list ordered by id: items after `cursor`, at most `limit`.
#[derive(Debug, Clone)]
pub struct PageRequest {
    pub cursor: Option<String>,
    pub limit: u32,
}

/// Fields of a new or changed webhook, already validated by the API.
#[derive(Debug, Clone)]
pub struct WebhookFields {
    pub url: String,
    pub description: String,
    pub event_types: Option<String>,
    pub enabled: bool,
    pub headers: String,
    pub raw_payload: bool,
    pub plugin: Option<AttachedPlugin>,
}

/// An event to accept, with what makes a repeat of it recognisable.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub app_id: String,
    pub id: String,
    pub event_type: String,
    pub payload: String,
    pub idempotency_key: Option<String>,
    /// A repeat older than this is not a repeat.
    pub dedup_since: Millis,
}

/// What publishing produced. `replayed` when the event was a repeat and
/// nothing new was queued.
#[derive(Debug, Clone)]
pub struct Published {
    pub event_id: String,
    pub deliveries: Vec<(String, String)>,
    pub replayed: bool,
}

/// A delivery a worker claimed, with all it needs to make the attempt.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub id: String,
    pub claim_token: String,
    pub attempts: i64,
    pub event_id: String,
    pub event_type: String,
    pub payload: String,
    pub event_created_at: Millis,
    pub webhook_id: String,
    pub url: String,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    pub headers: String,
    pub raw_payload: bool,
    pub secret: String,
    pub previous_secret: Option<String>,
    pub previous_secret_expires_at: Option<Millis>,
    pub app_id: String,
    pub app_uid: Option<String>,
    /// The attached plugin, its code hash, and its config.
    pub plugin: Option<(AttachedPlugin, String)>,
}

/// The result of one attempt and what it means for the delivery and its
/// webhook, decided by the delivery module and applied atomically.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub delivery_id: String,
    pub claim_token: String,
    pub webhook_id: String,
    /// `None` when the delivery ended without an attempt (webhook disabled).
    pub attempt: Option<AttemptRow>,
    pub next: NextState,
    pub webhook: WebhookEffect,
    pub now: Millis,
}

#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub number: i64,
    pub started_at: Millis,
    pub duration_ms: i64,
    pub outcome: &'static str,
    pub status_code: Option<i64>,
    pub response_body: Option<String>,
    pub error: Option<String>,
    pub plugin_error: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NextState {
    Succeeded,
    Skipped { reason: String },
    Retry { due_at: Millis, error: String },
    Dead { error: String },
}

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
