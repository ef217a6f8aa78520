//! Durable state: apps, app keys, webhooks, events, the delivery queue and
//! the attempt history.
//!
//! Handlers and the delivery worker speak to the store only through
//! [`Store`] and the records and commands defined here; the SQL lives in the
//! backend modules: embedded SQLite for one machine, PostgreSQL for several
//! gateway processes sharing one queue, chosen by the database URL's scheme.
//! Every state change that must not be lost (an accepted event and its
//! deliveries, an attempt and the delivery's next state) is one transaction.

mod postgres;
mod sqlite;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use std::time::Duration;

use serde::Serialize;

/// The one storage interface: the backend the database URL names.
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

/// Settings of a store that are not in its URL.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Connections to a PostgreSQL server (SQLite has one writer and a
    /// small reader pool of its own).
    pub pool_size: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { pool_size: 16 }
    }
}

enum Backend {
    Sqlite,
    Postgres,
}

fn backend_of(database_url: &str) -> StoreResult<Backend> {
    match database_url.split_once("://").map(|(scheme, _)| scheme) {
        Some("sqlite") => Ok(Backend::Sqlite),
        Some("postgres" | "postgresql") => Ok(Backend::Postgres),
        _ => Err(StoreError::Open(format!(
            "unsupported database URL `{}`: use sqlite://path or postgres://user:password@host/database",
            database_url.split("://").next().unwrap_or_default()
        ))),
    }
}

/// Refuses a database migrated by a newer wasmhook: `applied` of the
/// `known` migrations have run.
fn check_schema_version(applied: i64, known: usize) -> StoreResult<usize> {
    let applied = usize::try_from(applied).unwrap_or(usize::MAX);
    if applied > known {
        return Err(StoreError::Open(format!(
            "the database has schema version {applied}, newer than this wasmhook knows ({known}); upgrade wasmhook"
        )));
    }
    Ok(applied)
}

/// The database URL with its password hidden, for logs and messages.
pub fn redacted_url(database_url: &str) -> String {
    match url::Url::parse(database_url) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        Ok(_) => database_url.to_owned(),
        // Unparsable: hide all of the user part rather than risk a password.
        Err(_) => match (
            database_url.split_once("://"),
            database_url.rsplit_once('@'),
        ) {
            (Some((scheme, _)), Some((_, host))) => format!("{scheme}://***@{host}"),
            _ => database_url.to_owned(),
        },
    }
}

impl Store {
    /// Opens the database the URL names and applies pending migrations.
    pub async fn open(database_url: &str, options: &StoreOptions) -> StoreResult<Self> {
        Ok(match backend_of(database_url)? {
            Backend::Sqlite => Self::Sqlite(SqliteStore::open(database_url).await?),
            Backend::Postgres => {
                Self::Postgres(PostgresStore::open(database_url, options.pool_size).await?)
            }
        })
    }

    /// Applies pending migrations and returns.
    pub async fn migrate(database_url: &str) -> StoreResult<()> {
        Self::open(database_url, &StoreOptions { pool_size: 1 })
            .await?
            .close()
            .await;
        Ok(())
    }

    /// Which backend runs, for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// Forwards each listed method to the backend in use.
macro_rules! delegate {
    ($( $(#[$doc:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty; )*) => {
        impl Store {
            $(
                $(#[$doc])*
                pub async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    match self {
                        Self::Sqlite(store) => store.$name($($arg),*).await,
                        Self::Postgres(store) => store.$name($($arg),*).await,
                    }
                }
            )*
        }
    };
}

delegate! {
    fn close(&self) -> ();
    /// Checks that the database answers.
    fn ping(&self) -> StoreResult<()>;
    fn setting(&self, key: &str) -> StoreResult<Option<String>>;
    /// Stores `value` unless the key is set; returns the value in force.
    fn setting_insert_if_absent(&self, key: &str, value: &str) -> StoreResult<String>;
    fn create_app(&self, name: &str, uid: Option<&str>) -> StoreResult<App>;
    fn list_apps(&self, page: &PageRequest) -> StoreResult<Vec<App>>;
    /// Finds an app by its id or its uid.
    fn find_app(&self, id_or_uid: &str) -> StoreResult<Option<App>>;
    fn update_app(&self, id: &str, name: &str, uid: Option<&str>) -> StoreResult<App>;
    fn delete_app(&self, id: &str) -> StoreResult<()>;
    fn create_app_key(&self, app_id: &str, key_hash: &str) -> StoreResult<String>;
    fn delete_app_key(&self, app_id: &str, key_id: &str) -> StoreResult<()>;
    /// The app an app key (by hash) belongs to.
    fn app_for_key(&self, key_hash: &str) -> StoreResult<Option<App>>;
    fn create_webhook(&self, app_id: &str, fields: &WebhookFields, secret: &str) -> StoreResult<Webhook>;
    fn list_webhooks(&self, app_id: &str, page: &PageRequest) -> StoreResult<Vec<Webhook>>;
    fn webhook(&self, app_id: &str, id: &str) -> StoreResult<Option<Webhook>>;
    /// Replaces a webhook's settable fields. Enabling it clears the reason
    /// it was disabled and restarts its failing clock.
    fn update_webhook(&self, app_id: &str, id: &str, fields: &WebhookFields) -> StoreResult<Webhook>;
    fn delete_webhook(&self, app_id: &str, id: &str) -> StoreResult<()>;
    /// Makes `secret` current; the old one keeps signing until
    /// `previous_expires_at`.
    fn rotate_secret(&self, app_id: &str, id: &str, secret: &str, previous_expires_at: Millis) -> StoreResult<()>;
    /// Stores an upload. The same bytes under an existing name and version
    /// return the stored plugin (`false`: nothing new); other bytes conflict.
    fn create_plugin(&self, new: NewPlugin) -> StoreResult<(Plugin, bool)>;
    fn list_plugins(&self, page: &PageRequest) -> StoreResult<Vec<Plugin>>;
    fn plugin(&self, id: &str) -> StoreResult<Option<Plugin>>;
    fn plugin_code(&self, id: &str) -> StoreResult<Option<PluginCode>>;
    /// Stores a plugin's optimised artifact.
    fn set_plugin_artifact(&self, sha256: &str, artifact: Vec<u8>, key: &str) -> StoreResult<()>;
    /// Deletes a plugin no webhook uses.
    fn delete_plugin(&self, id: &str) -> StoreResult<()>;
    /// Accepts an event: the event row and one pending delivery per
    /// subscribed, enabled webhook, committed together. A repeat (same
    /// idempotency key or event id within the window) returns the first
    /// answer and queues nothing.
    fn publish(&self, event: NewEvent) -> StoreResult<Published>;
    fn event(&self, app_id: &str, id: &str) -> StoreResult<Option<Event>>;
    fn event_deliveries(&self, app_id: &str, event_id: &str) -> StoreResult<Vec<Delivery>>;
    fn webhook_deliveries(&self, webhook_id: &str, status: Option<DeliveryStatus>, page: &PageRequest) -> StoreResult<Vec<Delivery>>;
    fn delivery(&self, app_id: &str, id: &str) -> StoreResult<Option<Delivery>>;
    fn attempts(&self, delivery_id: &str) -> StoreResult<Vec<Attempt>>;
    /// Queues a delivery for an attempt now, whatever its state, unless a
    /// worker is sending it at this moment.
    fn retry_delivery(&self, app_id: &str, id: &str) -> StoreResult<Delivery>;
    /// Claims up to `limit` due deliveries, oldest due first, for `lease`:
    /// no two workers (in any process) hold the same delivery, and one
    /// that dies loses its claims when the lease runs out.
    fn claim_due(&self, limit: u32, lease: Duration) -> StoreResult<Vec<ClaimedDelivery>>;
    /// Applies attempt results. A result whose claim was lost (the lease
    /// ran out and another worker took the delivery) is dropped.
    fn record_attempts(&self, records: std::sync::Arc<Vec<AttemptRecord>>) -> StoreResult<()>;
    /// Gives claimed deliveries back to the queue, due now (shutdown).
    fn release(&self, claims: Vec<(String, String)>) -> StoreResult<()>;
    /// The queue's shape at `now`, for metrics.
    fn queue_stats(&self, now: Millis) -> StoreResult<QueueStats>;
    /// Deletes up to `limit` events created before `cutoff`, with their
    /// deliveries and attempts, oldest first; an event is kept while any of
    /// its deliveries is unfinished or changed since `cutoff`. Returns how
    /// many events went.
    fn purge_events(&self, cutoff: Millis, limit: u32) -> StoreResult<u64>;
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
}

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
    #[error("database error: {0}")]
    Postgres(#[from] sqlx::Error),
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

/// A claim's fencing token. It names the claiming process (`clm_<pid>_…`)
/// so an operator, or a test, can tell whose claims a `sending` delivery
/// is held by when several processes share the queue.
pub fn new_claim_token() -> String {
    format!("clm_{}_{}", std::process::id(), ulid::Ulid::new())
}

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

impl AttachedPlugin {
    /// From the webhook's `plugin_id` and `plugin_config` columns.
    fn from_columns(id: Option<String>, config: Option<String>) -> Option<Self> {
        id.map(|id| Self {
            id,
            config: config.unwrap_or_else(|| "null".into()),
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redacted_url("postgres://hook:s3cret@db:5432/wasmhook"),
            "postgres://hook:***@db:5432/wasmhook"
        );
        assert_eq!(redacted_url("sqlite://wasmhook.db"), "sqlite://wasmhook.db");
        assert_eq!(
            redacted_url("postgres://hook:p@ss word@db:99999/x"),
            "postgres://***@db:99999/x"
        );
    }

    #[test]
    fn the_url_scheme_picks_the_backend() {
        assert!(matches!(backend_of("sqlite://x.db"), Ok(Backend::Sqlite)));
        assert!(matches!(
            backend_of("postgres://h/db"),
            Ok(Backend::Postgres)
        ));
        assert!(matches!(
            backend_of("postgresql://h/db"),
            Ok(Backend::Postgres)
        ));
        let Err(StoreError::Open(message)) = backend_of("mysql://h/db") else {
            panic!("mysql accepted");
        };
        assert!(message.contains("mysql"), "{message}");
    }
}
