//! Durable state: apps, app keys, webhooks, events, the delivery queue and
//! the attempt history.
//!
//! Handlers and the delivery worker speak to the store only through
//! [`Store`], in the domain's records and commands ([`crate::domain`]); the
//! SQL lives in the backend modules: embedded SQLite for one machine,
//! PostgreSQL for several gateway processes sharing one queue, chosen by
//! the database URL's scheme. What both backends do alike (reading rows
//! into records, deciding repeats and uploads) is written once in [`rows`]
//! and [`rules`]. Every state change that must not be lost (an accepted
//! event and its deliveries, an attempt and the delivery's next state) is
//! one transaction.
//!
//! The store says what happened ([`StoreError`]); the API decides what to
//! tell a user about it.

mod postgres;
mod rows;
mod rules;
mod sqlite;

pub use postgres::{EMPTIED_LANE_RECHECK, PostgresStore};
pub use sqlite::SqliteStore;

use std::sync::Arc;

use crate::clock::Millis;
use crate::domain::lane::{BreakerPolicy, LaneState};
use crate::domain::{
    App, AppId, Attempt, AttemptRecord, ClaimRequest, ClaimedDelivery, Delivery, DeliveryId,
    DeliveryStatus, Event, EventId, HeldClaim, KeyId, NewEvent, NewPlugin, PageRequest, Plugin,
    PluginCode, PluginId, Published, QueueStats, Queued, Upload, Webhook, WebhookFields, WebhookId,
};

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
    /// When a lane's breaker opens (decided as attempts are recorded).
    pub breaker: BreakerPolicy,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            breaker: BreakerPolicy::default(),
        }
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
            Backend::Sqlite => {
                Self::Sqlite(SqliteStore::open(database_url, options.breaker).await?)
            }
            Backend::Postgres => Self::Postgres(
                PostgresStore::open(database_url, options.pool_size, options.breaker).await?,
            ),
        })
    }

    /// Applies pending migrations and returns.
    pub async fn migrate(database_url: &str) -> StoreResult<()> {
        let options = StoreOptions {
            pool_size: 1,
            ..StoreOptions::default()
        };
        Self::open(database_url, &options).await?.close().await;
        Ok(())
    }

    /// Which backend runs, for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// How long a recorder may wait for more attempt records to write in
    /// one transaction, while attempts are in flight. PostgreSQL pays a
    /// round trip and a commit per transaction; SQLite's writer already
    /// commits whatever queued behind the last write together, so waiting
    /// there only delays the lane's freed slots.
    pub fn record_linger(&self) -> std::time::Duration {
        match self {
            Self::Sqlite(_) => std::time::Duration::ZERO,
            Self::Postgres(_) => std::time::Duration::from_millis(2),
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
    /// Fails with [`StoreError::UidTaken`] if another app has the uid.
    fn create_app(&self, name: &str, uid: Option<&str>) -> StoreResult<App>;
    fn list_apps(&self, page: &PageRequest) -> StoreResult<Vec<App>>;
    /// Finds an app by its id or its uid.
    fn find_app(&self, id_or_uid: &str) -> StoreResult<Option<App>>;
    fn update_app(&self, id: &AppId, name: &str, uid: Option<&str>) -> StoreResult<App>;
    /// Deletes the app with everything it owns.
    fn delete_app(&self, id: &AppId) -> StoreResult<()>;
    fn create_app_key(&self, app_id: &AppId, key_hash: &str) -> StoreResult<KeyId>;
    fn delete_app_key(&self, app_id: &AppId, key_id: &KeyId) -> StoreResult<()>;
    /// The app an app key (by hash) belongs to.
    fn app_for_key(&self, key_hash: &str) -> StoreResult<Option<App>>;
    fn create_webhook(&self, app_id: &AppId, fields: &WebhookFields, secret: &str) -> StoreResult<Webhook>;
    fn list_webhooks(&self, app_id: &AppId, page: &PageRequest) -> StoreResult<Vec<Webhook>>;
    fn webhook(&self, app_id: &AppId, id: &WebhookId) -> StoreResult<Option<Webhook>>;
    /// Replaces a webhook's settable fields. Enabling it clears the reason
    /// it was disabled and restarts its failing clock.
    fn update_webhook(&self, app_id: &AppId, id: &WebhookId, fields: &WebhookFields) -> StoreResult<Webhook>;
    /// Deletes the webhook with its deliveries.
    fn delete_webhook(&self, app_id: &AppId, id: &WebhookId) -> StoreResult<()>;
    /// Makes `secret` current; the old one keeps signing until
    /// `previous_expires_at`.
    fn rotate_secret(&self, app_id: &AppId, id: &WebhookId, secret: &str, previous_expires_at: Millis) -> StoreResult<()>;
    /// Stores an upload. The same bytes under an existing name and version
    /// return the stored plugin; other bytes are
    /// [`StoreError::PluginVersionExists`].
    fn create_plugin(&self, new: NewPlugin) -> StoreResult<(Plugin, Upload)>;
    fn list_plugins(&self, page: &PageRequest) -> StoreResult<Vec<Plugin>>;
    fn plugin(&self, id: &PluginId) -> StoreResult<Option<Plugin>>;
    fn plugin_code(&self, id: &PluginId) -> StoreResult<Option<PluginCode>>;
    /// Stores the optimised artifact of every plugin with this code.
    fn set_plugin_artifact(&self, sha256: &str, artifact: Vec<u8>, key: &str) -> StoreResult<()>;
    /// Deletes a plugin no webhook uses ([`StoreError::PluginInUse`]
    /// otherwise).
    fn delete_plugin(&self, id: &PluginId) -> StoreResult<()>;
    /// Accepts an event: the event row and one pending delivery per
    /// subscribed, enabled webhook, committed together. A repeat (same
    /// idempotency key or event id within the window) returns the first
    /// answer and queues nothing; an id used before the window is
    /// [`StoreError::EventIdReused`].
    fn publish(&self, event: NewEvent) -> StoreResult<Published>;
    fn event(&self, app_id: &AppId, id: &EventId) -> StoreResult<Option<Event>>;
    fn event_deliveries(&self, app_id: &AppId, event_id: &EventId) -> StoreResult<Vec<Delivery>>;
    fn webhook_deliveries(&self, webhook_id: &WebhookId, status: Option<DeliveryStatus>, page: &PageRequest) -> StoreResult<Vec<Delivery>>;
    fn delivery(&self, app_id: &AppId, id: &DeliveryId) -> StoreResult<Option<Delivery>>;
    fn attempts(&self, delivery_id: &DeliveryId) -> StoreResult<Vec<Attempt>>;
    /// Queues a delivery for an attempt now, whatever its state, unless a
    /// worker is sending it at this moment ([`StoreError::DeliveryInFlight`]).
    fn retry_delivery(&self, app_id: &AppId, id: &DeliveryId) -> StoreResult<Delivery>;
    /// Queues `event` again, due now, to `webhook` or else to every
    /// webhook subscribed to its type now: new deliveries of the same
    /// event, outside any ordering key's order (an operator asked).
    fn replay_event(&self, event: &Event, webhook: Option<&WebhookId>) -> StoreResult<Vec<Queued>>;
    /// Claims up to `request.limit` due deliveries for `request.lease`,
    /// lane by lane (a lane is one webhook's deliveries), the lane with the
    /// oldest due work first, never more of one webhook's than its
    /// in-flight limit, rate limit and breaker allow across every process
    /// (see [`crate::domain::lane`]), and never more of one app's than
    /// `request.apps` allows ([`crate::domain::share`]). No two workers hold
    /// the same delivery, and one that dies loses its claims when the lease
    /// runs out.
    fn claim_due(&self, request: ClaimRequest) -> StoreResult<Vec<ClaimedDelivery>>;
    /// Applies attempt results. A result whose claim was lost (the lease
    /// ran out and another worker took the delivery) is dropped.
    fn record_attempts(&self, records: Arc<Vec<AttemptRecord>>) -> StoreResult<()>;
    /// Gives claimed deliveries back to the queue, due now (shutdown, or a
    /// claim dropped before its attempt was recorded).
    fn release(&self, claims: Vec<HeldClaim>) -> StoreResult<()>;
    /// Marks due the lanes that are idle or waiting while work of theirs
    /// is due, and returns how many. None should be: each is a wake-up
    /// lost (a process stopped between a publish's commit and its wake),
    /// and the worker runs this now and then so it costs a delay, not a
    /// delivery.
    fn wake_stranded_lanes(&self) -> StoreResult<u64>;
    /// When the next lane becomes due after `now` (a retry's backoff, a
    /// pause, a rate limit's next delivery), so an idle worker claims then
    /// rather than at its next poll.
    fn next_due_at(&self, now: Millis) -> StoreResult<Option<Millis>>;
    /// The lanes of these webhooks (those that exist), for their breakers.
    fn lanes(&self, webhooks: &[WebhookId]) -> StoreResult<Vec<(WebhookId, LaneState)>>;
    /// The queue's shape at `now`, for metrics.
    fn queue_stats(&self, now: Millis) -> StoreResult<QueueStats>;
    /// Deletes up to `limit` events created before `cutoff`, with their
    /// deliveries and attempts, oldest first; an event is kept while any of
    /// its deliveries is unfinished or changed since `cutoff`. Returns how
    /// many events went.
    fn purge_events(&self, cutoff: Millis, limit: u32) -> StoreResult<u64>;
}

/// What went wrong in the store, said as what happened; the API words it
/// for users.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("another app has this uid")]
    UidTaken,
    #[error("{webhooks} webhook(s) use the plugin")]
    PluginInUse { webhooks: i64 },
    #[error("plugin {name} {version} is stored with other content")]
    PluginVersionExists { name: String, version: String },
    #[error("the attached plugin does not exist")]
    PluginMissing,
    #[error("event id `{id}` was used by an event before the idempotency window")]
    EventIdReused { id: EventId },
    #[error("the delivery is being sent")]
    DeliveryInFlight,
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    #[error("database error: {0}")]
    Postgres(sqlx::Error),
    /// The database cannot be reached or cannot take writes now (a lost
    /// connection, a server shutting down, a full disk, a read-only
    /// file): nothing was changed, and the same call may work later.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
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

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        if postgres_unavailable(&error) {
            Self::Unavailable(error.to_string())
        } else {
            Self::Postgres(error)
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        if sqlite_unavailable(&error) {
            Self::Unavailable(error.to_string())
        } else {
            Self::Sqlite(error)
        }
    }
}

/// Whether PostgreSQL failed as a service rather than on the statement:
/// no connection within the acquire timeout, a broken connection, or a
/// server that refuses work for now (SQLSTATE classes 08 connection
/// exception, 53 insufficient resources, 57P operator intervention, and
/// 25006, a read-only transaction on a standby after a failover).
fn postgres_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(e) => e.code().is_some_and(|code| {
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "25006"
        }),
        _ => false,
    }
}

/// Whether SQLite failed on the file rather than on the statement: a full
/// disk, a read-only or unopenable file, an I/O error, or a lock held
/// past the busy timeout.
fn sqlite_unavailable(error: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        error.sqlite_error_code(),
        Some(DiskFull | ReadOnly | CannotOpen | SystemIoFailure | DatabaseBusy | DatabaseLocked)
    )
}

/// `NotFound` when a statement that names one row changed none.
fn found(rows: u64) -> StoreResult<()> {
    if rows == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_failing_as_a_service_is_unavailable() {
        let sqlite = |code| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        assert!(matches!(
            StoreError::from(sqlx::Error::PoolTimedOut),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            StoreError::from(sqlite(rusqlite::ffi::SQLITE_FULL)),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            StoreError::from(sqlite(rusqlite::ffi::SQLITE_READONLY)),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            StoreError::from(sqlite(rusqlite::ffi::SQLITE_CONSTRAINT)),
            StoreError::Sqlite(_)
        ));
        assert!(matches!(
            StoreError::from(sqlx::Error::RowNotFound),
            StoreError::Postgres(_)
        ));
    }

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
