//! The SQLite backend: one embedded database file.
//!
//! SQLite allows one writer at a time, so all writes go through a pool of
//! one connection (in-process queueing instead of `SQLITE_BUSY` retries) and
//! reads use a separate pool that WAL mode lets run beside the writer.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool, Transaction};

use super::*;
use crate::domain::EventTypeFilter;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

const WEBHOOK_COLUMNS: &str = "id, app_id, url, description, event_types, enabled, disabled_reason, headers, \
     raw_payload, secret, previous_secret, previous_secret_expires_at, created_at, updated_at";
const DELIVERY_COLUMNS: &str = "id, app_id, event_id, webhook_id, status, attempts, due_at, last_attempt_at, \
     last_status_code, last_error, created_at, updated_at";

#[derive(Debug, Clone)]
pub struct Store {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the database and applies migrations.
    pub async fn open(database_url: &str) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(database_url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an event we answered 202 for survives power loss too.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self { writer, reader })
    }

    /// Applies pending migrations and returns.
    pub async fn migrate(database_url: &str) -> StoreResult<()> {
        let store = Self::open(database_url).await?;
        store.close().await;
        Ok(())
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    // ---- settings ------------------------------------------------------

    pub async fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        let value = sqlx::query_scalar("SELECT value FROM settings WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.reader)
            .await?;
        Ok(value)
    }

    /// Stores `value` unless the key is set; returns the value in force.
    pub async fn setting_insert_if_absent(&self, key: &str, value: &str) -> StoreResult<String> {
        sqlx::query("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.writer)
            .await?;
        let value = sqlx::query_scalar("SELECT value FROM settings WHERE key = ?")
            .bind(key)
            .fetch_one(&self.writer)
            .await?;
        Ok(value)
    }

    // ---- apps and keys -------------------------------------------------

    pub async fn create_app(&self, name: &str, uid: Option<&str>) -> StoreResult<App> {
        let now = now_ms();
        let app = App {
            id: new_id("app"),
            uid: uid.map(str::to_owned),
            name: name.to_owned(),
            created_at: now,
            updated_at: now,
        };
        sqlx::query(
            "INSERT INTO apps (id, uid, name, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&app.id)
        .bind(&app.uid)
        .bind(&app.name)
        .bind(now)
        .bind(now)
        .execute(&self.writer)
        .await
        .map_err(|e| unique_conflict(e, "an app with this uid already exists"))?;
        Ok(app)
    }

    pub async fn list_apps(&self, page: &PageRequest) -> StoreResult<Vec<App>> {
        let apps = sqlx::query_as("SELECT * FROM apps WHERE id > ? ORDER BY id LIMIT ?")
            .bind(page.cursor.as_deref().unwrap_or(""))
            .bind(page.limit)
            .fetch_all(&self.reader)
            .await?;
        Ok(apps)
    }

    /// Finds an app by its id or its uid.
    pub async fn find_app(&self, id_or_uid: &str) -> StoreResult<Option<App>> {
        let app = sqlx::query_as("SELECT * FROM apps WHERE id = ?1 OR uid = ?1 LIMIT 1")
            .bind(id_or_uid)
            .fetch_optional(&self.reader)
            .await?;
        Ok(app)
    }

    pub async fn update_app(&self, id: &str, name: &str, uid: Option<&str>) -> StoreResult<App> {
        let app = sqlx::query_as(
            "UPDATE apps SET name = ?, uid = ?, updated_at = ? WHERE id = ? RETURNING *",
        )
        .bind(name)
        .bind(uid)
        .bind(now_ms())
        .bind(id)
        .fetch_optional(&self.writer)
        .await
        .map_err(|e| unique_conflict(e, "an app with this uid already exists"))?;
        app.ok_or(StoreError::NotFound)
    }

    pub async fn delete_app(&self, id: &str) -> StoreResult<()> {
        let done = sqlx::query("DELETE FROM apps WHERE id = ?")
            .bind(id)
            .execute(&self.writer)
            .await?;
        found(done.rows_affected())
    }

    pub async fn create_app_key(&self, app_id: &str, key_hash: &str) -> StoreResult<String> {
        let id = new_id("key");
        sqlx::query("INSERT INTO app_keys (id, app_id, key_hash, created_at) VALUES (?, ?, ?, ?)")
            .bind(&id)
            .bind(app_id)
            .bind(key_hash)
            .bind(now_ms())
            .execute(&self.writer)
            .await?;
        Ok(id)
    }

    pub async fn delete_app_key(&self, app_id: &str, key_id: &str) -> StoreResult<()> {
        let done = sqlx::query("DELETE FROM app_keys WHERE id = ? AND app_id = ?")
            .bind(key_id)
            .bind(app_id)
            .execute(&self.writer)
            .await?;
        found(done.rows_affected())
    }

    /// The app an app key (by hash) belongs to.
    pub async fn app_for_key(&self, key_hash: &str) -> StoreResult<Option<App>> {
        let app = sqlx::query_as(
            "SELECT apps.* FROM app_keys JOIN apps ON apps.id = app_keys.app_id WHERE key_hash = ?",
        )
        .bind(key_hash)
        .fetch_optional(&self.reader)
        .await?;
        Ok(app)
    }

    // ---- webhooks ------------------------------------------------------

    pub async fn create_webhook(
        &self,
        app_id: &str,
        fields: &WebhookFields,
        secret: &str,
    ) -> StoreResult<Webhook> {
        let now = now_ms();
        let id = new_id("wh");
        sqlx::query(
            "INSERT INTO webhooks (id, app_id, url, description, event_types, enabled, headers, raw_payload, \
             secret, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(app_id)
        .bind(&fields.url)
        .bind(&fields.description)
        .bind(&fields.event_types)
        .bind(fields.enabled)
        .bind(&fields.headers)
        .bind(fields.raw_payload)
        .bind(secret)
        .bind(now)
        .bind(now)
        .execute(&self.writer)
        .await?;
        self.webhook(app_id, &id).await?.ok_or(StoreError::NotFound)
    }

    pub async fn list_webhooks(
        &self,
        app_id: &str,
        page: &PageRequest,
    ) -> StoreResult<Vec<Webhook>> {
        let sql = format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE app_id = ? AND id > ? ORDER BY id LIMIT ?"
        );
        let webhooks = sqlx::query_as(&sql)
            .bind(app_id)
            .bind(page.cursor.as_deref().unwrap_or(""))
            .bind(page.limit)
            .fetch_all(&self.reader)
            .await?;
        Ok(webhooks)
    }

    pub async fn webhook(&self, app_id: &str, id: &str) -> StoreResult<Option<Webhook>> {
        let sql = format!("SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE app_id = ? AND id = ?");
        let webhook = sqlx::query_as(&sql)
            .bind(app_id)
            .bind(id)
            .fetch_optional(&self.writer)
            .await?;
        Ok(webhook)
    }

    /// Replaces a webhook's settable fields. Enabling it clears the reason
    /// it was disabled and restarts its failing clock.
    pub async fn update_webhook(
        &self,
        app_id: &str,
        id: &str,
        fields: &WebhookFields,
    ) -> StoreResult<Webhook> {
        let done = sqlx::query(
            "UPDATE webhooks SET url = ?, description = ?, event_types = ?, headers = ?, raw_payload = ?, \
             disabled_reason = CASE WHEN ? THEN NULL ELSE disabled_reason END, \
             failing_since = CASE WHEN ? AND NOT enabled THEN NULL ELSE failing_since END, \
             enabled = ?, updated_at = ? WHERE app_id = ? AND id = ?",
        )
        .bind(&fields.url)
        .bind(&fields.description)
        .bind(&fields.event_types)
        .bind(&fields.headers)
        .bind(fields.raw_payload)
        .bind(fields.enabled)
        .bind(fields.enabled)
        .bind(fields.enabled)
        .bind(now_ms())
        .bind(app_id)
        .bind(id)
        .execute(&self.writer)
        .await?;
        found(done.rows_affected())?;
        self.webhook(app_id, id).await?.ok_or(StoreError::NotFound)
    }

    pub async fn delete_webhook(&self, app_id: &str, id: &str) -> StoreResult<()> {
        let done = sqlx::query("DELETE FROM webhooks WHERE app_id = ? AND id = ?")
            .bind(app_id)
            .bind(id)
            .execute(&self.writer)
            .await?;
        found(done.rows_affected())
    }

    /// Makes `secret` current; the old one keeps signing until
    /// `previous_expires_at`.
    pub async fn rotate_secret(
        &self,
        app_id: &str,
        id: &str,
        secret: &str,
        previous_expires_at: Millis,
    ) -> StoreResult<()> {
        let done = sqlx::query(
            "UPDATE webhooks SET previous_secret = secret, previous_secret_expires_at = ?, secret = ?, \
             updated_at = ? WHERE app_id = ? AND id = ?",
        )
        .bind(previous_expires_at)
        .bind(secret)
        .bind(now_ms())
        .bind(app_id)
        .bind(id)
        .execute(&self.writer)
        .await?;
        found(done.rows_affected())
    }

    // ---- events --------------------------------------------------------

    /// Accepts an event: the event row and one pending delivery per
    /// subscribed, enabled webhook, in one transaction. A repeat (same
    /// idempotency key or event id within the window) returns the first
    /// answer and queues nothing.
    pub async fn publish(&self, event: &NewEvent) -> StoreResult<Published> {
        let mut tx = self.writer.begin().await?;
        if let Some(first) = repeat_of(&mut tx, event).await? {
            let deliveries = delivery_pairs(&mut *tx, &event.app_id, &first).await?;
            tx.commit().await?;
            return Ok(Published {
                event_id: first,
                deliveries,
                replayed: true,
            });
        }
        let now = now_ms();
        sqlx::query(
            "INSERT INTO events (app_id, id, event_type, payload, idempotency_key, created_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&event.app_id)
        .bind(&event.id)
        .bind(&event.event_type)
        .bind(&event.payload)
        .bind(&event.idempotency_key)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let mut deliveries = Vec::new();
        for webhook_id in subscribed_webhooks(&mut tx, &event.app_id, &event.event_type).await? {
            let delivery_id = new_id("dlv");
            sqlx::query(
                "INSERT INTO deliveries (id, app_id, event_id, webhook_id, status, due_at, created_at, updated_at) \
                 VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
            )
            .bind(&delivery_id)
            .bind(&event.app_id)
            .bind(&event.id)
            .bind(&webhook_id)
            .bind(now)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            deliveries.push((delivery_id, webhook_id));
        }
        tx.commit().await?;
        Ok(Published {
            event_id: event.id.clone(),
            deliveries,
            replayed: false,
        })
    }

    pub async fn event(&self, app_id: &str, id: &str) -> StoreResult<Option<Event>> {
        let event = sqlx::query_as(
            "SELECT id, app_id, event_type, payload, created_at FROM events WHERE app_id = ? AND id = ?",
        )
        .bind(app_id)
        .bind(id)
        .fetch_optional(&self.reader)
        .await?;
        Ok(event)
    }

    // ---- deliveries ----------------------------------------------------

    pub async fn event_deliveries(
        &self,
        app_id: &str,
        event_id: &str,
    ) -> StoreResult<Vec<Delivery>> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE app_id = ? AND event_id = ? ORDER BY id"
        );
        let deliveries = sqlx::query_as(&sql)
            .bind(app_id)
            .bind(event_id)
            .fetch_all(&self.reader)
            .await?;
        Ok(deliveries)
    }

    pub async fn webhook_deliveries(
        &self,
        webhook_id: &str,
        status: Option<DeliveryStatus>,
        page: &PageRequest,
    ) -> StoreResult<Vec<Delivery>> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE webhook_id = ?1 AND id > ?2 \
             AND (?3 IS NULL OR status = ?3) ORDER BY id LIMIT ?4"
        );
        let deliveries = sqlx::query_as(&sql)
            .bind(webhook_id)
            .bind(page.cursor.as_deref().unwrap_or(""))
            .bind(status.map(DeliveryStatus::as_str))
            .bind(page.limit)
            .fetch_all(&self.reader)
            .await?;
        Ok(deliveries)
    }

    pub async fn delivery(&self, app_id: &str, id: &str) -> StoreResult<Option<Delivery>> {
        let sql = format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE app_id = ? AND id = ?");
        let delivery = sqlx::query_as(&sql)
            .bind(app_id)
            .bind(id)
            .fetch_optional(&self.writer)
            .await?;
        Ok(delivery)
    }

    pub async fn attempts(&self, delivery_id: &str) -> StoreResult<Vec<Attempt>> {
        let attempts = sqlx::query_as(
            "SELECT id, attempt, started_at, duration_ms, outcome, status_code, response_body, error \
             FROM attempts WHERE delivery_id = ? ORDER BY attempt, started_at",
        )
        .bind(delivery_id)
        .fetch_all(&self.reader)
        .await?;
        Ok(attempts)
    }

    /// Queues a delivery for an attempt now, whatever its state, unless a
    /// worker is sending it at this moment.
    pub async fn retry_delivery(&self, app_id: &str, id: &str) -> StoreResult<Delivery> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE deliveries SET status = 'pending', due_at = ?, claim_token = NULL, updated_at = ? \
             WHERE app_id = ? AND id = ? AND status <> 'sending'",
        )
        .bind(now)
        .bind(now)
        .bind(app_id)
        .bind(id)
        .execute(&self.writer)
        .await?;
        let delivery = self
            .delivery(app_id, id)
            .await?
            .ok_or(StoreError::NotFound)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict(
                "the delivery is being sent right now; retry after this attempt ends".into(),
            ));
        }
        Ok(delivery)
    }

    // ---- the queue -----------------------------------------------------

    /// Claims up to `limit` due deliveries, oldest due first, for `lease`.
    /// The claim is one UPDATE, so two workers never hold the same
    /// delivery; a worker that dies loses it when the lease runs out.
    pub async fn claim_due(
        &self,
        limit: u32,
        lease: Duration,
    ) -> StoreResult<Vec<ClaimedDelivery>> {
        let now = now_ms();
        let token = new_id("clm");
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE deliveries SET status = 'sending', due_at = ?, claim_token = ?, updated_at = ? \
             WHERE id IN (SELECT id FROM deliveries WHERE due_at IS NOT NULL AND due_at <= ? \
                          ORDER BY due_at LIMIT ?) \
             RETURNING id",
        )
        .bind(now + lease.as_millis() as Millis)
        .bind(&token)
        .bind(now)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.writer)
        .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT d.id, d.claim_token, d.attempts, e.id AS event_id, e.event_type, e.payload, \
             e.created_at AS event_created_at, w.id AS webhook_id, w.url, w.enabled, w.disabled_reason, \
             w.headers, w.raw_payload, w.secret, w.previous_secret, w.previous_secret_expires_at \
             FROM deliveries d JOIN events e ON e.app_id = d.app_id AND e.id = d.event_id \
             JOIN webhooks w ON w.id = d.webhook_id WHERE d.id IN (",
        );
        let mut list = query.separated(", ");
        for id in &ids {
            list.push_bind(id);
        }
        query.push(") AND d.claim_token = ").push_bind(&token);
        query.push(" ORDER BY d.due_at");
        let claimed = query.build_query_as().fetch_all(&self.writer).await?;
        Ok(claimed)
    }

    /// Applies attempt results in one transaction. A result whose claim was
    /// lost (the lease ran out and another worker took the delivery) is
    /// dropped: the current holder owns the delivery now.
    pub async fn record_attempts(&self, records: &[AttemptRecord]) -> StoreResult<()> {
        let mut tx = self.writer.begin().await?;
        for record in records {
            record_attempt(&mut tx, record).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Gives claimed deliveries back to the queue, due now (shutdown).
    pub async fn release(&self, claims: &[(String, String)]) -> StoreResult<()> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        for (id, token) in claims {
            sqlx::query(
                "UPDATE deliveries SET status = CASE WHEN attempts = 0 THEN 'pending' ELSE 'failed' END, \
                 due_at = ?, claim_token = NULL, updated_at = ? WHERE id = ? AND claim_token = ?",
            )
            .bind(now)
            .bind(now)
            .bind(id)
            .bind(token)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deliveries that are due now, for metrics and benchmarks.
    pub async fn due_count(&self) -> StoreResult<i64> {
        let count = sqlx::query_scalar(
            "SELECT COUNT(*) FROM deliveries WHERE due_at IS NOT NULL AND due_at <= ?",
        )
        .bind(now_ms())
        .fetch_one(&self.reader)
        .await?;
        Ok(count)
    }
}

/// The id of the event this one repeats, if it is a repeat within the
/// window. A key or id seen only before the window is freed or refused.
async fn repeat_of(
    tx: &mut Transaction<'_, Sqlite>,
    event: &NewEvent,
) -> StoreResult<Option<String>> {
    if let Some(key) = &event.idempotency_key {
        let row = sqlx::query(
            "SELECT id, created_at FROM events WHERE app_id = ? AND idempotency_key = ?",
        )
        .bind(&event.app_id)
        .bind(key)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(row) = row {
            let (id, created_at): (String, Millis) = (row.get(0), row.get(1));
            if created_at >= event.dedup_since {
                return Ok(Some(id));
            }
            sqlx::query("UPDATE events SET idempotency_key = NULL WHERE app_id = ? AND id = ?")
                .bind(&event.app_id)
                .bind(&id)
                .execute(&mut **tx)
                .await?;
        }
    }
    let created_at: Option<Millis> =
        sqlx::query_scalar("SELECT created_at FROM events WHERE app_id = ? AND id = ?")
            .bind(&event.app_id)
            .bind(&event.id)
            .fetch_optional(&mut **tx)
            .await?;
    match created_at {
        Some(at) if at >= event.dedup_since => Ok(Some(event.id.clone())),
        Some(_) => Err(StoreError::Conflict(format!(
            "event id `{}` was used by an earlier event; choose a new id",
            event.id
        ))),
        None => Ok(None),
    }
}

async fn subscribed_webhooks(
    tx: &mut Transaction<'_, Sqlite>,
    app_id: &str,
    event_type: &str,
) -> StoreResult<Vec<String>> {
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT id, event_types FROM webhooks WHERE app_id = ? AND enabled ORDER BY id",
    )
    .bind(app_id)
    .fetch_all(&mut **tx)
    .await?;
    let mut ids = Vec::with_capacity(rows.len());
    for (id, filter) in rows {
        let filter =
            EventTypeFilter::from_stored(filter.as_deref()).map_err(StoreError::Corrupt)?;
        if filter.matches(event_type) {
            ids.push(id);
        }
    }
    Ok(ids)
}

async fn delivery_pairs<'e, E>(
    executor: E,
    app_id: &str,
    event_id: &str,
) -> StoreResult<Vec<(String, String)>>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let pairs = sqlx::query_as(
        "SELECT id, webhook_id FROM deliveries WHERE app_id = ? AND event_id = ? ORDER BY id",
    )
    .bind(app_id)
    .bind(event_id)
    .fetch_all(executor)
    .await?;
    Ok(pairs)
}

async fn record_attempt(
    tx: &mut Transaction<'_, Sqlite>,
    record: &AttemptRecord,
) -> StoreResult<()> {
    let (status, due_at, error) = match &record.next {
        NextState::Succeeded => ("succeeded", None, None),
        NextState::Retry { due_at, error } => ("failed", Some(*due_at), Some(error.as_str())),
        NextState::Dead { error } => ("dead", None, Some(error.as_str())),
    };
    let attempt = record.attempt.as_ref();
    let done = sqlx::query(
        "UPDATE deliveries SET status = ?, due_at = ?, claim_token = NULL, attempts = attempts + ?, \
         last_attempt_at = COALESCE(?, last_attempt_at), last_status_code = ?, last_error = ?, updated_at = ? \
         WHERE id = ? AND claim_token = ?",
    )
    .bind(status)
    .bind(due_at)
    .bind(attempt.map_or(0, |_| 1))
    .bind(attempt.map(|a| a.started_at))
    .bind(attempt.and_then(|a| a.status_code))
    .bind(error)
    .bind(record.now)
    .bind(&record.delivery_id)
    .bind(&record.claim_token)
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(());
    }
    if let Some(attempt) = attempt {
        insert_attempt(tx, &record.delivery_id, attempt).await?;
    }
    apply_webhook_effect(tx, &record.webhook_id, &record.webhook, record.now).await
}

async fn insert_attempt(
    tx: &mut Transaction<'_, Sqlite>,
    delivery_id: &str,
    a: &AttemptRow,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO attempts (id, delivery_id, attempt, started_at, duration_ms, outcome, status_code, \
         response_body, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(new_id("atm"))
    .bind(delivery_id)
    .bind(a.number)
    .bind(a.started_at)
    .bind(a.duration_ms)
    .bind(a.outcome)
    .bind(a.status_code)
    .bind(&a.response_body)
    .bind(&a.error)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn apply_webhook_effect(
    tx: &mut Transaction<'_, Sqlite>,
    webhook_id: &str,
    effect: &WebhookEffect,
    now: Millis,
) -> StoreResult<()> {
    match effect {
        WebhookEffect::None => {}
        WebhookEffect::Healthy => {
            sqlx::query("UPDATE webhooks SET failing_since = NULL WHERE id = ? AND failing_since IS NOT NULL")
                .bind(webhook_id)
                .execute(&mut **tx)
                .await?;
        }
        WebhookEffect::Failing {
            disable_if_failing_since,
        } => {
            sqlx::query(
                "UPDATE webhooks SET failing_since = COALESCE(failing_since, ?1), \
                 enabled = CASE WHEN COALESCE(failing_since, ?1) <= ?2 THEN 0 ELSE enabled END, \
                 disabled_reason = CASE WHEN enabled AND COALESCE(failing_since, ?1) <= ?2 \
                     THEN 'every attempt failed since ' || strftime('%Y-%m-%dT%H:%M:%SZ', COALESCE(failing_since, ?1) / 1000, 'unixepoch') \
                     ELSE disabled_reason END \
                 WHERE id = ?3",
            )
            .bind(now)
            .bind(*disable_if_failing_since)
            .bind(webhook_id)
            .execute(&mut **tx)
            .await?;
        }
        WebhookEffect::Disable { reason } => {
            sqlx::query("UPDATE webhooks SET enabled = 0, disabled_reason = ?, updated_at = ? WHERE id = ? AND enabled")
                .bind(reason)
                .bind(now)
                .bind(webhook_id)
                .execute(&mut **tx)
                .await?;
        }
    }
    Ok(())
}

fn found(rows: u64) -> StoreResult<()> {
    if rows == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(())
    }
}

fn unique_conflict(error: sqlx::Error, message: &str) -> StoreError {
    match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Conflict(message.to_owned())
        }
        _ => StoreError::Database(error),
    }
}
