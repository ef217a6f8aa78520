//! The PostgreSQL backend: several gateway processes share one database as
//! their queue. Claims take due rows with `FOR UPDATE SKIP LOCKED`, so
//! workers in different processes never wait on, or hold, the same delivery;
//! batches travel as arrays, unnested on the server, so a batch of records
//! is a few statements, not a round trip each.

mod lanes;
mod migrate;
mod ordering;

pub use lanes::EMPTIED_LANE_RECHECK;

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Row};

use super::rows::{self, *};
use super::rules::{self, KeySeen};
use super::{StoreError, StoreResult, found};
use crate::clock::{Millis, now_ms};
use crate::domain::lane::{BreakerPolicy, LaneState};
use crate::domain::{
    App, AppId, Attempt, AttemptId, AttemptRecord, AttemptRow, ClaimRequest, ClaimedDelivery,
    Delivery, DeliveryId, DeliveryStatus, Event, EventId, HeldClaim, KeyId, NewEvent, NewPlugin,
    PageRequest, Plugin, PluginCode, PluginId, Published, QueueStats, Queued, RetrySchedule,
    Upload, Webhook, WebhookEffect, WebhookFields, WebhookId,
};

/// A new event with its deliveries, in one statement and transaction,
/// unless its id or idempotency key is taken; wakes the lanes it can
/// ([`lanes::publish_ctes`]): (app, event id, type, payload, key, now,
/// delivery ids, their webhooks); returns whether the event went in.
static PUBLISH_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH event AS ( \
             INSERT INTO events (app_id, id, event_type, payload, idempotency_key, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING app_id, id), \
         queued AS ( \
             INSERT INTO deliveries (id, app_id, event_id, webhook_id, status, due_at, created_at, updated_at) \
             SELECT d.id, e.app_id, e.id, d.webhook_id, 'pending', $6, $6, $6 \
             FROM event e, UNNEST($7::text[], $8::text[]) AS d(id, webhook_id) RETURNING 1), \
         {} \
         SELECT count(*) FROM event",
        lanes::publish_ctes("$6", "$8", "EXISTS (SELECT 1 FROM event)")
    )
});

/// SQLSTATE of a unique or a foreign-key violation.
const UNIQUE_VIOLATION: &str = "23505";
const FOREIGN_KEY_VIOLATION: &str = "23503";

/// How long an API call waits for a connection (a new one included)
/// before it is told the database is unavailable: a caller hears 503 in
/// a second or two while the server is down, instead of waiting for it.
/// (At 1 s, a loaded machine opening a burst of new connections answered
/// a few 503s with the database up.) The queue's connections wait
/// longer: a worker has no caller waiting, and backs off between tries
/// anyway.
const API_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long opening the store waits for its first connection.
const SETUP_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections of the queue's own bookkeeping: one claim loop, one
/// recorder, the occasional release and sweep.
const QUEUE_POOL_SIZE: u32 = 4;
/// Settings of those connections. Commits do not wait for the WAL flush
/// (see [`PostgresStore::queue`]). Joins run in the order the statements
/// write them (each claimed row to its event by the whole primary key):
/// on a table growing under publishing, statistics lag, and the planner,
/// guessing three claimed rows, once looked events up by app alone and
/// filtered 88,000 rows a claim (a fifth of the delivery rate).
const QUEUE_SESSION: [(&str, &str); 2] =
    [("synchronous_commit", "off"), ("join_collapse_limit", "1")];

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Claims, attempt records, releases and lane wakes: their commits do not wait for
    /// the WAL flush (`synchronous_commit = off`). A crash of the database
    /// server may undo the last few hundred milliseconds of them; those
    /// deliveries are attempted again once their lease ends, which
    /// at-least-once delivery allows. Events and everything else a caller
    /// is told was stored go through `pool`, flushed before the answer.
    queue: PgPool,
    breaker: BreakerPolicy,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store(postgres)")
    }
}

impl PostgresStore {
    /// Connects (at most `pool_size` connections) and applies migrations.
    pub async fn open(
        database_url: &str,
        pool_size: u32,
        breaker: BreakerPolicy,
    ) -> StoreResult<Self> {
        let options: PgConnectOptions = database_url
            .parse()
            .map_err(|e| StoreError::Open(format!("bad PostgreSQL URL: {e}")))?;
        // Starting, a slow server is waited for; serving, it is not.
        let setup = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(SETUP_ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Open(e.to_string()))?;
        let migrated = migrate::run(&setup).await;
        setup.close().await;
        migrated?;
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .acquire_timeout(API_ACQUIRE_TIMEOUT)
            .connect_lazy_with(options.clone());
        // Lazy: a process that neither claims nor publishes to a busy
        // lane (the CLI's migrate, an idle API) never opens it.
        let queue = PgPoolOptions::new()
            .max_connections(QUEUE_POOL_SIZE.min(pool_size.max(1)))
            .acquire_timeout(SETUP_ACQUIRE_TIMEOUT)
            .connect_lazy_with(options.options(QUEUE_SESSION));
        Ok(Self {
            pool,
            queue,
            breaker,
        })
    }

    pub async fn close(&self) {
        self.queue.close().await;
        self.pool.close().await;
    }

    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    // ---- settings ------------------------------------------------------

    pub async fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        let value = sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(value)
    }

    pub async fn setting_insert_if_absent(&self, key: &str, value: &str) -> StoreResult<String> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        let value = sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_one(&self.pool)
            .await?;
        Ok(value)
    }

    // ---- apps and keys -------------------------------------------------

    pub async fn create_app(&self, name: &str, uid: Option<&str>) -> StoreResult<App> {
        let app = App::new(name, uid, now_ms());
        sqlx::query(
            "INSERT INTO apps (id, uid, name, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(app.id.as_str())
        .bind(&app.uid)
        .bind(&app.name)
        .bind(app.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| on_violation(e, UNIQUE_VIOLATION, StoreError::UidTaken))?;
        Ok(app)
    }

    pub async fn list_apps(&self, page: &PageRequest) -> StoreResult<Vec<App>> {
        let sql = format!("SELECT {APP_COLUMNS} FROM apps WHERE id > $1 ORDER BY id LIMIT $2");
        let rows = sqlx::query(&sql)
            .bind(page.cursor.as_deref().unwrap_or_default())
            .bind(i64::from(page.limit))
            .fetch_all(&self.pool)
            .await?;
        map_rows(&rows, rows::app)
    }

    pub async fn find_app(&self, id_or_uid: &str) -> StoreResult<Option<App>> {
        let sql = format!("SELECT {APP_COLUMNS} FROM apps WHERE id = $1 OR uid = $1 LIMIT 1");
        let row = sqlx::query(&sql)
            .bind(id_or_uid)
            .fetch_optional(&self.pool)
            .await?;
        map_row(row, rows::app)
    }

    pub async fn update_app(&self, id: &AppId, name: &str, uid: Option<&str>) -> StoreResult<App> {
        let sql = format!(
            "UPDATE apps SET name = $1, uid = $2, updated_at = $3 WHERE id = $4 RETURNING {APP_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(name)
            .bind(uid)
            .bind(now_ms())
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| on_violation(e, UNIQUE_VIOLATION, StoreError::UidTaken))?;
        map_row(row, rows::app)?.ok_or(StoreError::NotFound)
    }

    pub async fn delete_app(&self, id: &AppId) -> StoreResult<()> {
        let done = sqlx::query("DELETE FROM apps WHERE id = $1")
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        found(done.rows_affected())
    }

    pub async fn create_app_key(&self, app_id: &AppId, key_hash: &str) -> StoreResult<KeyId> {
        let id = KeyId::new();
        sqlx::query(
            "INSERT INTO app_keys (id, app_id, key_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id.as_str())
        .bind(app_id.as_str())
        .bind(key_hash)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    pub async fn delete_app_key(&self, app_id: &AppId, key_id: &KeyId) -> StoreResult<()> {
        let done = sqlx::query("DELETE FROM app_keys WHERE id = $1 AND app_id = $2")
            .bind(key_id.as_str())
            .bind(app_id.as_str())
            .execute(&self.pool)
            .await?;
        found(done.rows_affected())
    }

    pub async fn app_for_key(&self, key_hash: &str) -> StoreResult<Option<App>> {
        let row = sqlx::query(
            "SELECT apps.id, apps.uid, apps.name, apps.created_at, apps.updated_at \
             FROM app_keys JOIN apps ON apps.id = app_keys.app_id WHERE key_hash = $1",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await?;
        map_row(row, rows::app)
    }

    // ---- webhooks ------------------------------------------------------

    pub async fn create_webhook(
        &self,
        app_id: &AppId,
        fields: &WebhookFields,
        secret: &str,
    ) -> StoreResult<Webhook> {
        let (now, id, f) = (now_ms(), WebhookId::new(), fields);
        let sql = format!(
            "WITH created AS ( \
                 INSERT INTO webhooks (id, app_id, url, description, event_types, enabled, headers, raw_payload, \
                 secret, created_at, updated_at, plugin_id, plugin_config, max_in_flight, rate_limit, rate_limit_burst, \
                 retry_schedule) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11, $12, $13, $14, $15, $16) \
                 RETURNING {WEBHOOK_COLUMNS}), \
             {} \
             SELECT * FROM created",
            lanes::CREATE
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(app_id.as_str())
            .bind(&f.url)
            .bind(&f.description)
            .bind(f.event_types.to_stored())
            .bind(f.enabled)
            .bind(f.headers.to_stored())
            .bind(f.raw_payload)
            .bind(secret)
            .bind(now)
            .bind(f.plugin.as_ref().map(|p| p.id.as_str()))
            .bind(f.plugin.as_ref().map(|p| &p.config))
            .bind(f.max_in_flight.map(|m| i64::from(m.get())))
            .bind(f.rate_limit.map(|r| i64::from(r.per_second())))
            .bind(f.rate_limit.map(|r| i64::from(r.burst())))
            .bind(f.retry_schedule.as_ref().map(RetrySchedule::to_text))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| on_violation(e, FOREIGN_KEY_VIOLATION, StoreError::PluginMissing))?;
        rows::webhook(&row)
    }

    pub async fn list_webhooks(
        &self,
        app_id: &AppId,
        page: &PageRequest,
    ) -> StoreResult<Vec<Webhook>> {
        let sql = format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE app_id = $1 AND id > $2 ORDER BY id LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(app_id.as_str())
            .bind(page.cursor.as_deref().unwrap_or_default())
            .bind(i64::from(page.limit))
            .fetch_all(&self.pool)
            .await?;
        map_rows(&rows, rows::webhook)
    }

    pub async fn webhook(&self, app_id: &AppId, id: &WebhookId) -> StoreResult<Option<Webhook>> {
        let sql = format!("SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE app_id = $1 AND id = $2");
        let row = sqlx::query(&sql)
            .bind(app_id.as_str())
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        map_row(row, rows::webhook)
    }

    pub async fn update_webhook(
        &self,
        app_id: &AppId,
        id: &WebhookId,
        fields: &WebhookFields,
    ) -> StoreResult<Webhook> {
        let f = fields;
        let sql = format!(
            "UPDATE webhooks SET url = $1, description = $2, event_types = $3, headers = $4, raw_payload = $5, \
             disabled_reason = CASE WHEN $6 THEN NULL ELSE disabled_reason END, \
             failing_since = CASE WHEN $6 AND NOT enabled THEN NULL ELSE failing_since END, \
             enabled = $6, updated_at = $7, plugin_id = $10, plugin_config = $11, max_in_flight = $12, \
             rate_limit = $13, rate_limit_burst = $14, retry_schedule = $15 \
             WHERE app_id = $8 AND id = $9 RETURNING {WEBHOOK_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(&f.url)
            .bind(&f.description)
            .bind(f.event_types.to_stored())
            .bind(f.headers.to_stored())
            .bind(f.raw_payload)
            .bind(f.enabled)
            .bind(now_ms())
            .bind(app_id.as_str())
            .bind(id.as_str())
            .bind(f.plugin.as_ref().map(|p| p.id.as_str()))
            .bind(f.plugin.as_ref().map(|p| &p.config))
            .bind(f.max_in_flight.map(|m| i64::from(m.get())))
            .bind(f.rate_limit.map(|r| i64::from(r.per_second())))
            .bind(f.rate_limit.map(|r| i64::from(r.burst())))
            .bind(f.retry_schedule.as_ref().map(RetrySchedule::to_text))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| on_violation(e, FOREIGN_KEY_VIOLATION, StoreError::PluginMissing))?;
        let webhook = map_row(row, rows::webhook)?.ok_or(StoreError::NotFound)?;
        // Its limit may have risen: look at the lane again now.
        sqlx::query(&lanes::ROOM)
            .bind(now_ms())
            .bind([webhook.id.as_str()].as_slice())
            .execute(&self.pool)
            .await?;
        Ok(webhook)
    }

    pub async fn delete_webhook(&self, app_id: &AppId, id: &WebhookId) -> StoreResult<()> {
        let done = sqlx::query("DELETE FROM webhooks WHERE app_id = $1 AND id = $2")
            .bind(app_id.as_str())
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        found(done.rows_affected())
    }

    pub async fn rotate_secret(
        &self,
        app_id: &AppId,
        id: &WebhookId,
        secret: &str,
        previous_expires_at: Millis,
    ) -> StoreResult<()> {
        let done = sqlx::query(
            "UPDATE webhooks SET previous_secret = secret, previous_secret_expires_at = $1, secret = $2, \
             updated_at = $3 WHERE app_id = $4 AND id = $5",
        )
        .bind(previous_expires_at)
        .bind(secret)
        .bind(now_ms())
        .bind(app_id.as_str())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        found(done.rows_affected())
    }

    // ---- plugins -------------------------------------------------------

    pub async fn create_plugin(&self, new: NewPlugin) -> StoreResult<(Plugin, Upload)> {
        let (plugin, wasm) = new.into_plugin(now_ms());
        // ON CONFLICT keeps two concurrent uploads of one name and version
        // from both inserting; the loser reads the winner's row.
        let inserted = sqlx::query(
            "INSERT INTO plugins (id, name, version, sha256, size, wasm, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name, version) DO NOTHING",
        )
        .bind(plugin.id.as_str())
        .bind(&plugin.name)
        .bind(&plugin.version)
        .bind(&plugin.sha256)
        .bind(plugin.size)
        .bind(&wasm)
        .bind(plugin.created_at)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 1 {
            return Ok((plugin, Upload::Created));
        }
        let sql = format!("SELECT {PLUGIN_COLUMNS} FROM plugins WHERE name = $1 AND version = $2");
        let row = sqlx::query(&sql)
            .bind(&plugin.name)
            .bind(&plugin.version)
            .fetch_one(&self.pool)
            .await?;
        rules::existing_upload(rows::plugin(&row)?, &plugin.sha256)
    }

    pub async fn list_plugins(&self, page: &PageRequest) -> StoreResult<Vec<Plugin>> {
        let sql =
            format!("SELECT {PLUGIN_COLUMNS} FROM plugins WHERE id > $1 ORDER BY id LIMIT $2");
        let rows = sqlx::query(&sql)
            .bind(page.cursor.as_deref().unwrap_or_default())
            .bind(i64::from(page.limit))
            .fetch_all(&self.pool)
            .await?;
        map_rows(&rows, rows::plugin)
    }

    pub async fn plugin(&self, id: &PluginId) -> StoreResult<Option<Plugin>> {
        let sql = format!("SELECT {PLUGIN_COLUMNS} FROM plugins WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        map_row(row, rows::plugin)
    }

    pub async fn plugin_code(&self, id: &PluginId) -> StoreResult<Option<PluginCode>> {
        let sql = format!("SELECT {PLUGIN_CODE_COLUMNS} FROM plugins WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        map_row(row, rows::plugin_code)
    }

    pub async fn set_plugin_artifact(
        &self,
        sha256: &str,
        artifact: Vec<u8>,
        key: &str,
    ) -> StoreResult<()> {
        sqlx::query("UPDATE plugins SET artifact = $1, artifact_key = $2 WHERE sha256 = $3")
            .bind(artifact)
            .bind(key)
            .bind(sha256)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn delete_plugin(&self, id: &PluginId) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        // Locks the plugin row, so a webhook cannot attach it meanwhile
        // (attaching checks the foreign key against this row).
        let exists = sqlx::query("SELECT 1 FROM plugins WHERE id = $1 FOR UPDATE")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound);
        }
        let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhooks WHERE plugin_id = $1")
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await?;
        rules::deletable(users)?;
        sqlx::query("DELETE FROM plugins WHERE id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---- events --------------------------------------------------------

    pub async fn publish(&self, event: NewEvent) -> StoreResult<Published> {
        if let Some(published) = self.publish_new(&event).await? {
            return Ok(published);
        }
        // A repeat, an expired idempotency key, or a webhook deleted
        // meanwhile. Two publishes of one key or id can race past the
        // repeat check; the loser's insert violates a unique index, and
        // its second run finds the winner's event.
        let mut tries = 0;
        loop {
            tries += 1;
            let mut tx = self.pool.begin().await?;
            match publish(&mut tx, &event).await {
                Ok(published) => {
                    tx.commit().await?;
                    return Ok(published);
                }
                Err(StoreError::Postgres(e)) if tries < 3 && is_code(&e, UNIQUE_VIOLATION) => {
                    continue;
                }
                Err(other) => return Err(other),
            }
        }
    }

    /// The common case in two round trips (CPU per event is what limits
    /// a small machine): read the subscribed webhooks, then one statement,
    /// its own transaction, inserts the event and its deliveries unless
    /// its id or idempotency key is taken. `None` sends the caller to the
    /// full path.
    async fn publish_new(&self, event: &NewEvent) -> StoreResult<Option<Published>> {
        let mut c = self.pool.acquire().await?;
        let deliveries = new_deliveries(&mut c, event).await?;
        let inserted = match &event.ordering_key {
            // With no delivery, a keyed event's count cannot tell a repeat.
            Some(_) if deliveries.is_empty() => return Ok(None),
            Some(key) => {
                let queued =
                    ordering::publish(&mut c, event, key, &deliveries, (now_ms(), false)).await;
                queued.map(|n| i64::from(n > 0))
            }
            None => publish_unordered(&mut c, event, &deliveries).await,
        };
        drop(c);
        match inserted {
            Ok(1) => Ok(Some(Published {
                event_id: event.id.clone(),
                deliveries,
                replayed: false,
            })),
            Ok(_) => Ok(None),
            Err(e) if is_code(&e, FOREIGN_KEY_VIOLATION) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn event(&self, app_id: &AppId, id: &EventId) -> StoreResult<Option<Event>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE app_id = $1 AND id = $2");
        let row = sqlx::query(&sql)
            .bind(app_id.as_str())
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        map_row(row, rows::event)
    }

    // ---- deliveries ----------------------------------------------------

    pub async fn event_deliveries(
        &self,
        app_id: &AppId,
        event_id: &EventId,
    ) -> StoreResult<Vec<Delivery>> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE app_id = $1 AND event_id = $2 ORDER BY id"
        );
        let rows = sqlx::query(&sql)
            .bind(app_id.as_str())
            .bind(event_id.as_str())
            .fetch_all(&self.pool)
            .await?;
        map_rows(&rows, rows::delivery)
    }

    pub async fn webhook_deliveries(
        &self,
        webhook_id: &WebhookId,
        status: Option<DeliveryStatus>,
        page: &PageRequest,
    ) -> StoreResult<Vec<Delivery>> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE webhook_id = $1 AND id > $2 \
             AND ($3::text IS NULL OR status = $3) ORDER BY id LIMIT $4"
        );
        let rows = sqlx::query(&sql)
            .bind(webhook_id.as_str())
            .bind(page.cursor.as_deref().unwrap_or_default())
            .bind(status.map(DeliveryStatus::as_str))
            .bind(i64::from(page.limit))
            .fetch_all(&self.pool)
            .await?;
        map_rows(&rows, rows::delivery)
    }

    pub async fn delivery(&self, app_id: &AppId, id: &DeliveryId) -> StoreResult<Option<Delivery>> {
        let sql =
            format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE app_id = $1 AND id = $2");
        let row = sqlx::query(&sql)
            .bind(app_id.as_str())
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        map_row(row, rows::delivery)
    }

    pub async fn attempts(&self, delivery_id: &DeliveryId) -> StoreResult<Vec<Attempt>> {
        let sql = format!(
            "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE delivery_id = $1 ORDER BY attempt, started_at"
        );
        let rows = sqlx::query(&sql)
            .bind(delivery_id.as_str())
            .fetch_all(&self.pool)
            .await?;
        map_rows(&rows, rows::attempt)
    }

    /// The delivery and its lane (`lanes::RETRY`) in one statement.
    pub async fn retry_delivery(&self, app_id: &AppId, id: &DeliveryId) -> StoreResult<Delivery> {
        let now = now_ms();
        let sql = format!(
            "WITH retried AS ( \
                 UPDATE deliveries SET status = 'pending', due_at = $1, claim_token = NULL, updated_at = $1 \
                 WHERE app_id = $2 AND id = $3 AND status <> 'sending' AND {} RETURNING {DELIVERY_COLUMNS}), \
             {} \
             SELECT * FROM retried",
            rules::RETRIABLE,
            *lanes::RETRY
        );
        let row = sqlx::query(&sql)
            .bind(now)
            .bind(app_id.as_str())
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        if let Some(delivery) = map_row(row, rows::delivery)? {
            return Ok(delivery);
        }
        match self.delivery(app_id, id).await? {
            Some(delivery) => rules::unretried(delivery),
            None => Err(StoreError::NotFound),
        }
    }

    pub async fn replay_event(
        &self,
        event: &Event,
        webhook: Option<&WebhookId>,
    ) -> StoreResult<Vec<Queued>> {
        let mut tx = self.pool.begin().await?;
        let deliveries = match webhook {
            Some(webhook) => vec![Queued {
                id: DeliveryId::new(),
                webhook_id: webhook.clone(),
            }],
            None => subscribed_deliveries(&mut tx, &event.app_id, &event.event_type).await?,
        };
        queue_unordered(&mut tx, &deliveries, (&event.app_id, &event.id), now_ms()).await?;
        tx.commit().await?;
        Ok(deliveries)
    }

    // ---- the queue -----------------------------------------------------

    /// Two statements in one transaction: lock lanes with due work that no
    /// other worker holds (SKIP LOCKED); then, in a snapshot taken with the
    /// locks held (so it sees every claim committed on those lanes), take
    /// from each as many due deliveries as its in-flight limit leaves room
    /// for, lease them, park or reschedule each lane, and return what the
    /// attempts need.
    pub async fn claim_due(&self, request: ClaimRequest) -> StoreResult<Vec<ClaimedDelivery>> {
        let now = now_ms();
        let mut tx = self.queue.begin().await?;
        let rows = lanes::claim(&mut tx, &request, now).await?;
        tx.commit().await?;
        map_rows(&rows, rows::claimed)
    }

    /// A whole batch in a few statements and one transaction.
    pub async fn record_attempts(&self, records: Arc<Vec<AttemptRecord>>) -> StoreResult<()> {
        let mut tx = self.queue.begin().await?;
        let keyed = records.iter().any(crate::domain::ordering::releases);
        let (current, locked) = record_deliveries(&mut tx, &records, keyed).await?;
        if let Some(row) = locked.first().filter(|_| keyed) {
            ordering::release_stranded(&mut tx, row, now_ms()).await?;
        }
        let current: Vec<&AttemptRecord> = records
            .iter()
            .filter(|r| current.contains(r.delivery_id.as_str()))
            .collect();
        lanes::record(
            &mut tx,
            &locked,
            current.iter().copied(),
            now_ms(),
            &self.breaker,
        )
        .await?;
        let healthy: Vec<&str> = current
            .iter()
            .filter(|r| r.webhook == WebhookEffect::Healthy)
            .map(|r| r.webhook_id.as_str())
            .collect();
        if !healthy.is_empty() {
            sqlx::query(
                "UPDATE webhooks SET failing_since = NULL WHERE id = ANY($1) AND failing_since IS NOT NULL",
            )
            .bind(&healthy)
            .execute(&mut *tx)
            .await?;
        }
        for record in &current {
            apply_webhook_effect(&mut tx, &record.webhook_id, &record.webhook, record.now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn release(&self, claims: Vec<HeldClaim>) -> StoreResult<()> {
        sqlx::query(&lanes::RELEASE)
            .bind(now_ms())
            .bind(
                claims
                    .iter()
                    .map(|c| c.delivery_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(claims.iter().map(|c| c.token.as_str()).collect::<Vec<_>>())
            .execute(&self.queue)
            .await?;
        Ok(())
    }

    pub async fn next_due_at(&self, now: Millis) -> StoreResult<Option<Millis>> {
        Ok(sqlx::query_scalar(lanes::NEXT_DUE)
            .bind(now)
            .fetch_one(&self.queue)
            .await?)
    }

    pub async fn lanes(&self, webhooks: &[WebhookId]) -> StoreResult<Vec<(WebhookId, LaneState)>> {
        let ids: Vec<&str> = webhooks.iter().map(WebhookId::as_str).collect();
        let rows = sqlx::query(&lanes::BREAKERS)
            .bind(ids)
            .fetch_all(&self.pool)
            .await?;
        map_rows(&rows, rows::lane_state)
    }

    pub async fn wake_stranded_lanes(&self) -> StoreResult<u64> {
        let woken = sqlx::query(&lanes::SWEEP)
            .bind(now_ms())
            .execute(&self.queue)
            .await?;
        Ok(woken.rows_affected())
    }

    pub async fn queue_stats(&self, now: Millis) -> StoreResult<QueueStats> {
        let row = sqlx::query(
            "SELECT COUNT(*) FILTER (WHERE status <> 'sending'), \
             COUNT(*) FILTER (WHERE status <> 'sending' AND due_at <= $1), \
             COUNT(*) FILTER (WHERE status = 'sending'), \
             MIN(due_at) FILTER (WHERE status <> 'sending') \
             FROM deliveries WHERE due_at IS NOT NULL",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        let (open, held): (i64, i64) = sqlx::query_as(lanes::OPEN_BREAKERS)
            .bind(now)
            .fetch_one(&self.pool)
            .await?;
        Ok(QueueStats {
            pending: row.try_get::<i64, _>(0)? as u64,
            due: row.try_get::<i64, _>(1)? as u64,
            in_flight: row.try_get::<i64, _>(2)? as u64,
            oldest_due_at: row.try_get(3)?,
            breakers_open: held as u64,
            breakers_half_open: (open - held) as u64,
        })
    }

    /// Old finished events go with their deliveries and attempts (the
    /// foreign keys cascade), and the rows of keys whose last delivery
    /// went with them ([`ordering::PURGE_KEYS`]). A delivery with a due
    /// time, or `pending` without one (waiting for its key), is
    /// unfinished. Rows another process is deleting are skipped.
    pub async fn purge_events(&self, cutoff: Millis, limit: u32) -> StoreResult<u64> {
        sqlx::query_scalar::<_, i64>(&PURGE_SQL)
            .bind(cutoff)
            .bind(i64::from(limit))
            .fetch_one(&self.pool)
            .await
            .map(|n| n as u64)
            .map_err(Into::into)
    }
}

/// retention: (cutoff, limit); returns how many events went.
static PURGE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH doomed AS ( \
             SELECT e.app_id, e.id FROM events e WHERE e.created_at < $1 AND NOT EXISTS ( \
                 SELECT 1 FROM deliveries d WHERE d.app_id = e.app_id AND d.event_id = e.id \
                 AND (d.due_at IS NOT NULL OR d.status = 'pending' OR d.updated_at >= $1)) \
             ORDER BY e.created_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
         gone AS (DELETE FROM events WHERE (app_id, id) IN (SELECT app_id, id FROM doomed) RETURNING 1), \
         {} \
         SELECT count(*) FROM gone",
        ordering::PURGE_KEYS
    )
});

/// The full publish path, inside the caller's transaction.
async fn publish(c: &mut PgConnection, event: &NewEvent) -> StoreResult<Published> {
    if let Some(first) = repeat_of(c, event).await? {
        let rows = sqlx::query(
            "SELECT id, webhook_id FROM deliveries WHERE app_id = $1 AND event_id = $2 ORDER BY id",
        )
        .bind(event.app_id.as_str())
        .bind(first.as_str())
        .fetch_all(&mut *c)
        .await?;
        let deliveries = map_rows(&rows, |r| {
            Ok(Queued {
                id: r.text("id")?,
                webhook_id: r.text("webhook_id")?,
            })
        })?;
        let published = Published {
            event_id: first,
            deliveries,
            replayed: true,
        };
        return Ok(published);
    }
    let now = now_ms();
    let deliveries = new_deliveries(c, event).await?;
    if let Some(key) = &event.ordering_key {
        ordering::publish(c, event, key, &deliveries, (now, true)).await?;
        return Ok(Published {
            event_id: event.id.clone(),
            deliveries,
            replayed: false,
        });
    }
    sqlx::query(
        "INSERT INTO events (app_id, id, event_type, payload, idempotency_key, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(event.app_id.as_str())
    .bind(event.id.as_str())
    .bind(event.event_type.as_str())
    .bind(&event.payload)
    .bind(&event.idempotency_key)
    .bind(now)
    .execute(&mut *c)
    .await?;
    queue_unordered(c, &deliveries, (&event.app_id, &event.id), now).await?;
    let published = Published {
        event_id: event.id.clone(),
        deliveries,
        replayed: false,
    };
    Ok(published)
}

/// The one statement of [`PostgresStore::publish_new`] for an event
/// without an ordering key: 1 if it went in.
async fn publish_unordered(
    c: &mut PgConnection,
    event: &NewEvent,
    deliveries: &[Queued],
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar::<_, i64>(&PUBLISH_SQL)
        .bind(event.app_id.as_str())
        .bind(event.id.as_str())
        .bind(event.event_type.as_str())
        .bind(&event.payload)
        .bind(&event.idempotency_key)
        .bind(now_ms())
        .bind(delivery_ids(deliveries))
        .bind(webhook_ids(deliveries))
        .fetch_one(&mut *c)
        .await
}

/// The deliveries of an event without an ordering key, due now.
async fn queue_unordered(
    c: &mut PgConnection,
    deliveries: &[Queued],
    (app_id, event_id): (&AppId, &EventId),
    now: Millis,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO deliveries (id, app_id, event_id, webhook_id, status, due_at, created_at, updated_at) \
         SELECT d.id, $3, $4, d.webhook_id, 'pending', $5, $5, $5 \
         FROM UNNEST($1::text[], $2::text[]) AS d(id, webhook_id)",
    )
    .bind(delivery_ids(deliveries))
    .bind(webhook_ids(deliveries))
    .bind(app_id.as_str())
    .bind(event_id.as_str())
    .bind(now)
    .execute(&mut *c)
    .await?;
    sqlx::query(&lanes::WAKE)
        .bind(now)
        .bind(webhook_ids(deliveries))
        .execute(&mut *c)
        .await?;
    Ok(())
}

/// The ids of queued deliveries, as an array to bind.
fn delivery_ids(deliveries: &[Queued]) -> Vec<&str> {
    deliveries.iter().map(|d| d.id.as_str()).collect()
}

/// The webhooks of queued deliveries, as an array to bind.
fn webhook_ids(deliveries: &[Queued]) -> Vec<&str> {
    deliveries.iter().map(|d| d.webhook_id.as_str()).collect()
}

/// One new delivery per subscribed, enabled webhook of the event's app.
async fn new_deliveries(c: &mut PgConnection, event: &NewEvent) -> StoreResult<Vec<Queued>> {
    subscribed_deliveries(c, &event.app_id, event.event_type.as_str()).await
}

/// A new delivery to each webhook of the app subscribed to `event_type`.
async fn subscribed_deliveries(
    c: &mut PgConnection,
    app_id: &AppId,
    event_type: &str,
) -> StoreResult<Vec<Queued>> {
    let sql = format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM webhooks WHERE app_id = $1 AND enabled ORDER BY id"
    );
    let rows = sqlx::query(&sql)
        .bind(app_id.as_str())
        .fetch_all(&mut *c)
        .await?;
    let webhooks = map_rows(&rows, rows::subscription)?;
    let subscribed = rules::subscribed(webhooks, event_type);
    Ok(subscribed
        .into_iter()
        .map(|webhook_id| Queued {
            id: DeliveryId::new(),
            webhook_id,
        })
        .collect())
}

/// The id of the event this one repeats, if it is a repeat within the
/// window (see [`rules::key_seen`] and [`rules::id_seen`]).
async fn repeat_of(c: &mut PgConnection, event: &NewEvent) -> StoreResult<Option<EventId>> {
    if let Some(key) = &event.idempotency_key {
        let earlier: Option<(String, Millis)> = sqlx::query_as(
            "SELECT id, created_at FROM events WHERE app_id = $1 AND idempotency_key = $2",
        )
        .bind(event.app_id.as_str())
        .bind(key)
        .fetch_optional(&mut *c)
        .await?;
        match rules::key_seen(event, earlier.map(|(id, at)| (id.into(), at))) {
            KeySeen::Repeat(id) => return Ok(Some(id)),
            KeySeen::Expired(id) => {
                sqlx::query(
                    "UPDATE events SET idempotency_key = NULL WHERE app_id = $1 AND id = $2",
                )
                .bind(event.app_id.as_str())
                .bind(id.as_str())
                .execute(&mut *c)
                .await?;
            }
            KeySeen::Unused => {}
        }
    }
    let earlier: Option<Millis> =
        sqlx::query_scalar("SELECT created_at FROM events WHERE app_id = $1 AND id = $2")
            .bind(event.app_id.as_str())
            .bind(event.id.as_str())
            .fetch_optional(&mut *c)
            .await?;
    rules::id_seen(event, earlier)
}

/// Moves each delivery to its next state, only where the record's claim
/// still holds (a lost lease means another worker owns it now), writes
/// those deliveries' attempts, lets the next delivery of each ended keyed
/// one go ([`ordering::RECORD_CTES`]), and locks their lanes
/// ([`lanes::LOCK_RECORDED`]), in one statement; returns the ids that were
/// updated, the stranded places of keys ([`ordering::STRANDED`]) and the
/// lanes' rows. The lanes are locked by the transaction's first statement,
/// but only the lanes' write, the webhooks' updates and the commit follow
/// it: with one busy endpoint, every moment its lane is locked is a claim
/// that skips it (locking the lanes before a separate attempts insert cut
/// a one-endpoint drain by a fifth). Only a batch that ends a keyed
/// delivery (`keyed`) carries the ordering CTEs; there, `OFFSET 0` keeps
/// the first row's subquery from being merged into the join, so it is
/// read, and the key rows locked, before the lanes.
fn record_deliveries_sql(keyed: bool) -> String {
    let (ordering, result) = if keyed {
        let ctes = format!("{} {}", ordering::RECORD_CTES, ordering::STRANDED_CTE);
        let result = format!(
            "SELECT (SELECT array_agg(id) FROM updated) AS updated_ids, {} OFFSET 0",
            ordering::STRANDED
        );
        (ctes, result)
    } else {
        (
            String::new(),
            "SELECT array_agg(id) AS updated_ids FROM updated".to_owned(),
        )
    };
    format!(
        "WITH updated AS ( \
             UPDATE deliveries d SET status = r.status, due_at = r.due_at, claim_token = NULL, \
             attempts = d.attempts + r.attempted, last_attempt_at = COALESCE(r.started_at, d.last_attempt_at), \
             last_status_code = r.status_code, last_error = r.error, updated_at = r.now, skip_reason = r.skip_reason \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], \
                         $7::bigint[], $8::text[], $9::bigint[], $10::text[], $21::boolean[]) \
                  AS r(id, token, status, due_at, attempted, started_at, status_code, error, now, skip_reason, \
                       releases) \
             WHERE d.id = r.id AND d.claim_token = r.token \
             RETURNING d.id, d.webhook_id, d.ordering_key, d.ordering_seq, r.releases, r.now), \
         {ordering} \
         inserted AS ( \
             INSERT INTO attempts (id, delivery_id, attempt, started_at, duration_ms, outcome, status_code, \
             response_body, error, plugin_error) \
             SELECT a.* FROM UNNEST($11::text[], $12::text[], $13::bigint[], $14::bigint[], $15::bigint[], \
                                    $16::text[], $17::bigint[], $18::text[], $19::text[], $20::text[]) \
                  AS a(id, delivery_id, attempt, started_at, duration_ms, outcome, status_code, response_body, \
                       error, plugin_error) \
             WHERE a.delivery_id IN (SELECT id FROM updated)), \
         {} \
         SELECT u.*, l.* FROM ({result}) u LEFT JOIN lanes l ON TRUE",
        *lanes::LOCK_RECORDED
    )
}

/// The record statement of a batch that ends no keyed delivery, and of
/// one that does.
static RECORD_DELIVERIES_SQL: LazyLock<[String; 2]> =
    LazyLock::new(|| [record_deliveries_sql(false), record_deliveries_sql(true)]);

async fn record_deliveries(
    c: &mut PgConnection,
    records: &[AttemptRecord],
    keyed: bool,
) -> StoreResult<(HashSet<String>, Vec<PgRow>)> {
    let column =
        |f: fn(&AttemptRecord) -> Option<Millis>| records.iter().map(f).collect::<Vec<_>>();
    let attempts: Vec<(&AttemptRecord, &AttemptRow)> = records
        .iter()
        .filter_map(|r| r.attempt.as_ref().map(|a| (r, a)))
        .collect();
    let ids: Vec<AttemptId> = attempts.iter().map(|_| AttemptId::new()).collect();
    let number =
        |f: fn(&AttemptRow) -> i64| attempts.iter().map(|(_, a)| f(a)).collect::<Vec<i64>>();
    let rows = sqlx::query(&RECORD_DELIVERIES_SQL[usize::from(keyed)])
        .bind(
            records
                .iter()
                .map(|r| r.delivery_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            records
                .iter()
                .map(|r| r.claim_token.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            records
                .iter()
                .map(|r| r.next.status().as_str())
                .collect::<Vec<_>>(),
        )
        .bind(column(|r| r.next.due_at()))
        .bind(
            records
                .iter()
                .map(|r| i64::from(r.attempt.is_some()))
                .collect::<Vec<_>>(),
        )
        .bind(column(|r| r.attempt.as_ref().map(|a| a.started_at)))
        .bind(column(|r| r.attempt.as_ref().and_then(|a| a.status_code)))
        .bind(records.iter().map(|r| r.next.error()).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.now).collect::<Vec<_>>())
        .bind(
            records
                .iter()
                .map(|r| r.next.skip_reason())
                .collect::<Vec<_>>(),
        )
        .bind(ids.iter().map(AttemptId::as_str).collect::<Vec<_>>())
        .bind(
            attempts
                .iter()
                .map(|(r, _)| r.delivery_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(number(|a| a.number))
        .bind(number(|a| a.started_at))
        .bind(number(|a| a.duration_ms))
        .bind(
            attempts
                .iter()
                .map(|(_, a)| a.outcome.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            attempts
                .iter()
                .map(|(_, a)| a.status_code)
                .collect::<Vec<_>>(),
        )
        .bind(
            attempts
                .iter()
                .map(|(_, a)| a.response_body.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            attempts
                .iter()
                .map(|(_, a)| a.error.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            attempts
                .iter()
                .map(|(_, a)| a.plugin_error.map(|p| p.as_str()))
                .collect::<Vec<_>>(),
        )
        .bind(
            records
                .iter()
                .map(crate::domain::ordering::releases)
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *c)
        .await?;
    let updated: Option<Vec<String>> = match rows.first() {
        Some(row) => row.try_get("updated_ids")?,
        None => None,
    };
    Ok((updated.unwrap_or_default().into_iter().collect(), rows))
}

async fn apply_webhook_effect(
    c: &mut PgConnection,
    webhook_id: &WebhookId,
    effect: &WebhookEffect,
    now: Millis,
) -> StoreResult<()> {
    match effect {
        // Healthy webhooks are cleared for a whole batch at once.
        WebhookEffect::None | WebhookEffect::Healthy => {}
        WebhookEffect::Failing {
            disable_if_failing_since,
        } => {
            sqlx::query(
                "UPDATE webhooks SET failing_since = COALESCE(failing_since, $1), \
                 enabled = CASE WHEN COALESCE(failing_since, $1) <= $2 THEN FALSE ELSE enabled END, \
                 disabled_reason = CASE WHEN enabled AND COALESCE(failing_since, $1) <= $2 \
                     THEN 'every attempt failed since ' || to_char(to_timestamp(COALESCE(failing_since, $1) / 1000) \
                          AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
                     ELSE disabled_reason END, \
                 updated_at = CASE WHEN enabled AND COALESCE(failing_since, $1) <= $2 THEN $1 ELSE updated_at END \
                 WHERE id = $3",
            )
            .bind(now)
            .bind(disable_if_failing_since)
            .bind(webhook_id.as_str())
            .execute(&mut *c)
            .await?;
        }
        WebhookEffect::Disable { reason } => {
            sqlx::query(
                "UPDATE webhooks SET enabled = FALSE, disabled_reason = $1, updated_at = $2 \
                 WHERE id = $3 AND enabled",
            )
            .bind(reason)
            .bind(now)
            .bind(webhook_id.as_str())
            .execute(&mut *c)
            .await?;
        }
    }
    Ok(())
}

fn map_rows<T>(rows: &[PgRow], map: impl Fn(&PgRow) -> StoreResult<T>) -> StoreResult<Vec<T>> {
    rows.iter().map(map).collect()
}

fn map_row<T>(
    row: Option<PgRow>,
    map: impl Fn(&PgRow) -> StoreResult<T>,
) -> StoreResult<Option<T>> {
    row.as_ref().map(map).transpose()
}

fn is_code(error: &sqlx::Error, code: &str) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|c| c == code)
}

/// A constraint the caller's input violated, as what it means.
fn on_violation(error: sqlx::Error, code: &str, meaning: StoreError) -> StoreError {
    if is_code(&error, code) {
        meaning
    } else {
        error.into()
    }
}
