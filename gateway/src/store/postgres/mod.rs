//! The PostgreSQL backend: several gateway processes share one database as
//! their queue. Claims take due rows with `FOR UPDATE SKIP LOCKED`, so
//! workers in different processes never wait on, or hold, the same delivery.

mod migrate;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Row};

use super::*;
use crate::domain::EventTypeFilter;

type PgResult<T> = Result<T, sqlx::Error>;

const APP_COLUMNS: &str = "id, uid, name, created_at, updated_at";
const WEBHOOK_COLUMNS: &str = "id, app_id, url, description, event_types, enabled, disabled_reason, headers, \
     raw_payload, secret, previous_secret, previous_secret_expires_at, created_at, updated_at, plugin_id, plugin_config";
const DELIVERY_COLUMNS: &str = "id, app_id, event_id, webhook_id, status, attempts, due_at, last_attempt_at, \
     last_status_code, last_error, created_at, updated_at, skip_reason";
const PLUGIN_COLUMNS: &str = "id, name, version, sha256, size, created_at";
/// SQLSTATE of a unique or a foreign-key violation.
const UNIQUE_VIOLATION: &str = "23505";
const FOREIGN_KEY_VIOLATION: &str = "23503";

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store(postgres)")
    }
}

impl PostgresStore {
    /// Connects (at most `pool_size` connections) and applies migrations.
    pub async fn open(database_url: &str, pool_size: u32) -> StoreResult<Self> {
        let options: PgConnectOptions = database_url
            .parse()
            .map_err(|e| StoreError::Open(format!("bad PostgreSQL URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Open(e.to_string()))?;
        migrate::run(&pool).await?;
        Ok(Self { pool })
    }

    pub async fn close(&self) {
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
        let now = now_ms();
        let app = App {
            id: new_id("app"),
            uid: uid.map(str::to_owned),
            name: name.to_owned(),
            created_at: now,
            updated_at: now,
        };
        sqlx::query(
            "INSERT INTO apps (id, uid, name, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(&app.id)
        .bind(&app.uid)
        .bind(&app.name)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| conflict_on(e, UNIQUE_VIOLATION, "an app with this uid already exists"))?;
        Ok(app)
    }

    pub async fn list_apps(&self, page: &PageRequest) -> StoreResult<Vec<App>> {
        let sql = format!("SELECT {APP_COLUMNS} FROM apps WHERE id > $1 ORDER BY id LIMIT $2");
        let rows = sqlx::query(&sql)
            .bind(page.cursor.as_deref().unwrap_or_default())
            .bind(i64::from(page.limit))
            .fetch_all(&self.pool)
            .await?;
        map_rows(&rows, app_row)
    }

    pub async fn find_app(&self, id_or_uid: &str) -> StoreResult<Option<App>> {
        let sql = format!("SELECT {APP_COLUMNS} FROM apps WHERE id = $1 OR uid = $1 LIMIT 1");
        let row = sqlx::query(&sql)
            .bind(id_or_uid)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(app_row).transpose()?)
    }

    pub async fn update_app(&self, id: &str, name: &str, uid: Option<&str>) -> StoreResult<App> {
        let sql = format!(
            "UPDATE apps SET name = $1, uid = $2, updated_at = $3 WHERE id = $4 RETURNING {APP_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(name)
            .bind(uid)
            .bind(now_ms())
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| conflict_on(e, UNIQUE_VIOLATION, "an app with this uid already exists"))?;
        row.as_ref()
            .map(app_row)
            .transpose()?
            .ok_or(StoreError::NotFound)
    }

    pub async fn delete_app(&self, id: &str) -> StoreResult<()> {
        let done = sqlx::query("DELETE FROM apps WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        found(done.rows_affected())
    }

    pub async fn create_app_key(&self, app_id: &str, key_hash: &str) -> StoreResult<String> {
        let id = new_id("key");
        sqlx::query(
            "INSERT INTO app_keys (id, app_id, key_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&id)
        .bind(app_id)
        .bind(key_hash)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    pub async fn delete_app_key(&self, app_id: &str, key_id: &str) -> StoreResult<()> {
        let done = sqlx::query("DELETE FROM app_keys WHERE id = $1 AND app_id = $2")
            .bind(key_id)
            .bind(app_id)
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
        Ok(row.as_ref().map(app_row).transpose()?)
    }

    // ---- webhooks ------------------------------------------------------

    pub async fn create_webhook(
        &self,
        app_id: &str,
        fields: &WebhookFields,
        secret: &str,
    ) -> StoreResult<Webhook> {
        let (now, id, f) = (now_ms(), new_id("wh"), fields);
        sqlx::query(
            "INSERT INTO webhooks (id, app_id, url, description, event_types, enabled, headers, raw_payload, \
             secret, created_at, updated_at, plugin_id, plugin_config) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11, $12)",
        )
        .bind(&id)
        .bind(app_id)
        .bind(&f.url)
        .bind(&f.description)
        .bind(&f.event_types)
        .bind(f.enabled)
        .bind(&f.headers)
        .bind(f.raw_payload)
        .bind(secret)
        .bind(now)
        .bind(f.plugin.as_ref().map(|p| &p.id))
        .bind(f.plugin.as_ref().map(|p| &p.config))
        .execute(&self.pool)
        .await
        .map_err(|e| conflict_on(e, FOREIGN_KEY_VIOLATION, "plugin: no such plugin"))?;
        self.webhook(app_id, &id).await?.ok_or(StoreError::NotFound)
    }

    pub async fn list_webhooks(
        &self,
        app_id: &str,
        page: &PageRequest,
    ) -> StoreResult<Vec<Webhook>> {
        let sql = format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE app_id = $1 AND id > $2 ORDER BY id LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(app_id)
            .bind(page.cursor.as_deref().unwrap_or_default())
            .bind(i64::from(page.limit))
            .fetch_all(&self.pool)
            .await?;
        map_rows(&rows, webhook_row)
    }

    pub async fn webhook(&self, app_id: &str, id: &str) -> StoreResult<Option<Webhook>> {
        let sql = format!("SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE app_id = $1 AND id = $2");
        let row = sqlx::query(&sql)
            .bind(app_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(webhook_row).transpose()?)
    }

    pub async fn update_webhook(
        &self,
        app_id: &str,
        id: &str,
        fields: &WebhookFields,
    ) -> StoreResult<Webhook> {
        let f = fields;
        let sql = format!(
            "UPDATE webhooks SET url = $1, description = $2, event_types = $3, headers = $4, raw_payload = $5, \
             disabled_reason = CASE WHEN $6 THEN NULL ELSE disabled_reason END, \
             failing_since = CASE WHEN $6 AND NOT enabled THEN NULL ELSE failing_since END, \
             enabled = $6, updated_at = $7, plugin_id = $10, plugin_config = $11 \
             WHERE app_id = $8 AND id = $9 RETURNING {WEBHOOK_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(&f.url)
            .bind(&f.description)
            .bind(&f.event_types)
            .bind(&f.headers)
            .bind(f.raw_payload)
            .bind(f.enabled)
            .bind(now_ms())
            .bind(app_id)
            .bind(id)
            .bind(f.plugin.as_ref().map(|p| &p.id))
            .bind(f.plugin.as_ref().map(|p| &p.config))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| conflict_on(e, FOREIGN_KEY_VIOLATION, "plugin: no such plugin"))?;
        row.as_ref()
            .map(webhook_row)
            .transpose()?
            .ok_or(StoreError::NotFound)
    }

    pub async fn delete_webhook(&self, app_id: &str, id: &str) -> StoreResult<()> {
        let done = sqlx::query("DELETE FROM webhooks WHERE app_id = $1 AND id = $2")
            .bind(app_id)
            .bind(id)
            .execute(&self.pool)
            .await?;
        found(done.rows_affected())
    }

    pub async fn rotate_secret(
        &self,
        app_id: &str,
        id: &str,
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
        .bind(app_id)
        .bind(id)
        .execute(&self.pool)
        .await?;
        found(done.rows_affected())
    }

    // ---- plugins -------------------------------------------------------

    pub async fn create_plugin(&self, new: NewPlugin) -> StoreResult<(Plugin, bool)> {
        let plugin = Plugin {
            id: new_id("plg"),
            name: new.name,
            version: new.version,
            sha256: new.sha256,
            size: new.wasm.len() as i64,
            created_at: now_ms(),
        };
        // ON CONFLICT keeps two concurrent uploads of one name and version
        // from both inserting; the loser reads the winner's row.
        let inserted = sqlx::query(
            "INSERT INTO plugins (id, name, version, sha256, size, wasm, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name, version) DO NOTHING",
        )
        .bind(&plugin.id)
        .bind(&plugin.name)
        .bind(&plugin.version)
        .bind(&plugin.sha256)
        .bind(plugin.size)
        .bind(&new.wasm)
        .bind(plugin.created_at)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 1 {
            return Ok((plugin, true));
        }
        let sql = format!("SELECT {PLUGIN_COLUMNS} FROM plugins WHERE name = $1 AND version = $2");
        let row = sqlx::query(&sql)
            .bind(&plugin.name)
            .bind(&plugin.version)
            .fetch_one(&self.pool)
            .await?;
        let existing = plugin_row(&row)?;
        if existing.sha256 == plugin.sha256 {
            return Ok((existing, false));
        }
        Err(StoreError::Conflict(format!(
            "{} {} already exists with other content; plugin versions are immutable, upload a new version",
            plugin.name, plugin.version
        )))
    }

    pub async fn list_plugins(&self, page: &PageRequest) -> StoreResult<Vec<Plugin>> {
        let sql =
            format!("SELECT {PLUGIN_COLUMNS} FROM plugins WHERE id > $1 ORDER BY id LIMIT $2");
        let rows = sqlx::query(&sql)
            .bind(page.cursor.as_deref().unwrap_or_default())
            .bind(i64::from(page.limit))
            .fetch_all(&self.pool)
            .await?;
        map_rows(&rows, plugin_row)
    }

    pub async fn plugin(&self, id: &str) -> StoreResult<Option<Plugin>> {
        let sql = format!("SELECT {PLUGIN_COLUMNS} FROM plugins WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(plugin_row).transpose()?)
    }

    pub async fn plugin_code(&self, id: &str) -> StoreResult<Option<PluginCode>> {
        let row =
            sqlx::query("SELECT sha256, wasm, artifact, artifact_key FROM plugins WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        let code = |r: &PgRow| -> PgResult<PluginCode> {
            Ok(PluginCode {
                sha256: r.try_get(0)?,
                wasm: r.try_get(1)?,
                artifact: r.try_get(2)?,
                artifact_key: r.try_get(3)?,
            })
        };
        Ok(row.as_ref().map(code).transpose()?)
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

    pub async fn delete_plugin(&self, id: &str) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        // Locks the plugin row, so a webhook cannot attach it meanwhile
        // (attaching checks the foreign key against this row).
        let exists = sqlx::query("SELECT 1 FROM plugins WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound);
        }
        let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhooks WHERE plugin_id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        if users > 0 {
            return Err(StoreError::Conflict(format!(
                "{users} webhook(s) use this plugin; detach it first (PATCH the webhook with \"plugin\": null)"
            )));
        }
        sqlx::query("DELETE FROM plugins WHERE id = $1")
            .bind(id)
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
        let webhooks = subscribed_webhooks(&mut c, &event.app_id, &event.event_type).await?;
        let ids: Vec<String> = webhooks.iter().map(|_| new_id("dlv")).collect();
        let inserted = sqlx::query_scalar::<_, i64>(
            "WITH event AS ( \
                 INSERT INTO events (app_id, id, event_type, payload, idempotency_key, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING app_id, id), \
             queued AS ( \
                 INSERT INTO deliveries (id, app_id, event_id, webhook_id, status, due_at, created_at, updated_at) \
                 SELECT d.id, e.app_id, e.id, d.webhook_id, 'pending', $6, $6, $6 \
                 FROM event e, UNNEST($7::text[], $8::text[]) AS d(id, webhook_id) RETURNING 1) \
             SELECT count(*) FROM event",
        )
        .bind(&event.app_id)
        .bind(&event.id)
        .bind(&event.event_type)
        .bind(&event.payload)
        .bind(&event.idempotency_key)
        .bind(now_ms())
        .bind(&ids)
        .bind(&webhooks)
        .fetch_one(&mut *c)
        .await;
        match inserted {
            Ok(1) => Ok(Some(Published {
                event_id: event.id.clone(),
                deliveries: ids.into_iter().zip(webhooks).collect(),
                replayed: false,
            })),
            Ok(_) => Ok(None),
            Err(e) if is_code(&e, FOREIGN_KEY_VIOLATION) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn event(&self, app_id: &str, id: &str) -> StoreResult<Option<Event>> {
        let row = sqlx::query(
            "SELECT id, app_id, event_type, payload, created_at FROM events WHERE app_id = $1 AND id = $2",
        )
        .bind(app_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(event_row).transpose()?)
    }

    // ---- deliveries ----------------------------------------------------

    pub async fn event_deliveries(
        &self,
        app_id: &str,
        event_id: &str,
    ) -> StoreResult<Vec<Delivery>> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE app_id = $1 AND event_id = $2 ORDER BY id"
        );
        let rows = sqlx::query(&sql)
            .bind(app_id)
            .bind(event_id)
            .fetch_all(&self.pool)
            .await?;
        map_rows(&rows, delivery_row)
    }

    pub async fn webhook_deliveries(
        &self,
        webhook_id: &str,
        status: Option<DeliveryStatus>,
        page: &PageRequest,
    ) -> StoreResult<Vec<Delivery>> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE webhook_id = $1 AND id > $2 \
             AND ($3::text IS NULL OR status = $3) ORDER BY id LIMIT $4"
        );
        let rows = sqlx::query(&sql)
            .bind(webhook_id)
            .bind(page.cursor.as_deref().unwrap_or_default())
            .bind(status.map(DeliveryStatus::as_str))
            .bind(i64::from(page.limit))
            .fetch_all(&self.pool)
            .await?;
        map_rows(&rows, delivery_row)
    }

    pub async fn delivery(&self, app_id: &str, id: &str) -> StoreResult<Option<Delivery>> {
        let sql =
            format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE app_id = $1 AND id = $2");
        let row = sqlx::query(&sql)
            .bind(app_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(delivery_row).transpose()?)
    }

    pub async fn attempts(&self, delivery_id: &str) -> StoreResult<Vec<Attempt>> {
        let rows = sqlx::query(
            "SELECT id, attempt, started_at, duration_ms, outcome, status_code, response_body, error, \
             plugin_error FROM attempts WHERE delivery_id = $1 ORDER BY attempt, started_at",
        )
        .bind(delivery_id)
        .fetch_all(&self.pool)
        .await?;
        map_rows(&rows, attempt_row)
    }

    pub async fn retry_delivery(&self, app_id: &str, id: &str) -> StoreResult<Delivery> {
        let now = now_ms();
        let sql = format!(
            "UPDATE deliveries SET status = 'pending', due_at = $1, claim_token = NULL, updated_at = $1 \
             WHERE app_id = $2 AND id = $3 AND status <> 'sending' RETURNING {DELIVERY_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(now)
            .bind(app_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = row {
            return Ok(delivery_row(&row)?);
        }
        match self.delivery(app_id, id).await? {
            Some(_) => Err(StoreError::Conflict(
                "the delivery is being sent right now; retry after this attempt ends".into(),
            )),
            None => Err(StoreError::NotFound),
        }
    }

    // ---- the queue -----------------------------------------------------

    /// One statement, so one transaction: lock due rows no other worker has
    /// locked (SKIP LOCKED), lease them, and return what the attempts need.
    pub async fn claim_due(
        &self,
        limit: u32,
        lease: Duration,
    ) -> StoreResult<Vec<ClaimedDelivery>> {
        let now = now_ms();
        let rows = sqlx::query(
            "WITH due AS ( \
                 SELECT id FROM deliveries WHERE due_at IS NOT NULL AND due_at <= $1 \
                 ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
             claimed AS ( \
                 UPDATE deliveries d SET status = 'sending', due_at = $3, claim_token = $4, updated_at = $1 \
                 FROM due WHERE d.id = due.id \
                 RETURNING d.id, d.claim_token, d.attempts, d.app_id, d.event_id, d.webhook_id) \
             SELECT c.id, c.claim_token, c.attempts, e.id, e.event_type, e.payload, e.created_at, \
                    w.id, w.url, w.enabled, w.disabled_reason, w.headers, w.raw_payload, w.secret, \
                    w.previous_secret, w.previous_secret_expires_at, a.id, a.uid, \
                    w.plugin_id, w.plugin_config, p.sha256 \
             FROM claimed c JOIN events e ON e.app_id = c.app_id AND e.id = c.event_id \
             JOIN webhooks w ON w.id = c.webhook_id JOIN apps a ON a.id = c.app_id \
             LEFT JOIN plugins p ON p.id = w.plugin_id",
        )
        .bind(now)
        .bind(i64::from(limit))
        .bind(now + lease.as_millis() as Millis)
        .bind(new_claim_token())
        .fetch_all(&self.pool)
        .await?;
        map_rows(&rows, claimed_row)
    }

    /// A whole batch in a few statements (arrays unnested on the server)
    /// and one transaction, rather than round trips per record.
    pub async fn record_attempts(
        &self,
        records: std::sync::Arc<Vec<AttemptRecord>>,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let current = update_deliveries(&mut tx, &records).await?;
        let current: Vec<&AttemptRecord> = records
            .iter()
            .filter(|r| current.contains(&r.delivery_id))
            .collect();
        insert_attempts(&mut tx, &current).await?;
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

    pub async fn release(&self, claims: Vec<(String, String)>) -> StoreResult<()> {
        let (ids, tokens): (Vec<String>, Vec<String>) = claims.into_iter().unzip();
        sqlx::query(
            "UPDATE deliveries d SET status = CASE WHEN attempts = 0 THEN 'pending' ELSE 'failed' END, \
             due_at = $1, claim_token = NULL, updated_at = $1 \
             FROM UNNEST($2::text[], $3::text[]) AS c(id, token) \
             WHERE d.id = c.id AND d.claim_token = c.token",
        )
        .bind(now_ms())
        .bind(ids)
        .bind(tokens)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

impl PostgresStore {
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
        Ok(QueueStats {
            pending: row.try_get::<i64, _>(0)? as u64,
            due: row.try_get::<i64, _>(1)? as u64,
            in_flight: row.try_get::<i64, _>(2)? as u64,
            oldest_due_at: row.try_get(3)?,
        })
    }

    /// Old finished events go with their deliveries and attempts (the
    /// foreign keys cascade). Rows another process is deleting are skipped.
    pub async fn purge_events(&self, cutoff: Millis, limit: u32) -> StoreResult<u64> {
        let deleted = sqlx::query(
            "DELETE FROM events WHERE (app_id, id) IN ( \
                 SELECT e.app_id, e.id FROM events e WHERE e.created_at < $1 AND NOT EXISTS ( \
                     SELECT 1 FROM deliveries d WHERE d.app_id = e.app_id AND d.event_id = e.id \
                     AND (d.due_at IS NOT NULL OR d.updated_at >= $1)) \
                 ORDER BY e.created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(cutoff)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(deleted.rows_affected())
    }
}

async fn publish(c: &mut PgConnection, event: &NewEvent) -> StoreResult<Published> {
    if let Some(first) = repeat_of(c, event).await? {
        let rows = sqlx::query(
            "SELECT id, webhook_id FROM deliveries WHERE app_id = $1 AND event_id = $2 ORDER BY id",
        )
        .bind(&event.app_id)
        .bind(&first)
        .fetch_all(&mut *c)
        .await?;
        let deliveries = map_rows(&rows, |r| Ok((r.try_get(0)?, r.try_get(1)?)))?;
        return Ok(Published {
            event_id: first,
            deliveries,
            replayed: true,
        });
    }
    let now = now_ms();
    sqlx::query(
        "INSERT INTO events (app_id, id, event_type, payload, idempotency_key, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&event.app_id)
    .bind(&event.id)
    .bind(&event.event_type)
    .bind(&event.payload)
    .bind(&event.idempotency_key)
    .bind(now)
    .execute(&mut *c)
    .await?;
    let webhooks = subscribed_webhooks(c, &event.app_id, &event.event_type).await?;
    let ids: Vec<String> = webhooks.iter().map(|_| new_id("dlv")).collect();
    sqlx::query(
        "INSERT INTO deliveries (id, app_id, event_id, webhook_id, status, due_at, created_at, updated_at) \
         SELECT d.id, $3, $4, d.webhook_id, 'pending', $5, $5, $5 \
         FROM UNNEST($1::text[], $2::text[]) AS d(id, webhook_id)",
    )
    .bind(&ids)
    .bind(&webhooks)
    .bind(&event.app_id)
    .bind(&event.id)
    .bind(now)
    .execute(&mut *c)
    .await?;
    Ok(Published {
        event_id: event.id.clone(),
        deliveries: ids.into_iter().zip(webhooks).collect(),
        replayed: false,
    })
}

/// The id of the event this one repeats, if it is a repeat within the
/// window. A key seen only before the window is freed; an id is refused.
async fn repeat_of(c: &mut PgConnection, event: &NewEvent) -> StoreResult<Option<String>> {
    if let Some(key) = &event.idempotency_key {
        let earlier: Option<(String, Millis)> = sqlx::query_as(
            "SELECT id, created_at FROM events WHERE app_id = $1 AND idempotency_key = $2",
        )
        .bind(&event.app_id)
        .bind(key)
        .fetch_optional(&mut *c)
        .await?;
        match earlier {
            Some((id, at)) if at >= event.dedup_since => return Ok(Some(id)),
            Some((id, _)) => {
                sqlx::query(
                    "UPDATE events SET idempotency_key = NULL WHERE app_id = $1 AND id = $2",
                )
                .bind(&event.app_id)
                .bind(&id)
                .execute(&mut *c)
                .await?;
            }
            None => {}
        }
    }
    let earlier: Option<Millis> =
        sqlx::query_scalar("SELECT created_at FROM events WHERE app_id = $1 AND id = $2")
            .bind(&event.app_id)
            .bind(&event.id)
            .fetch_optional(&mut *c)
            .await?;
    match earlier {
        Some(at) if at >= event.dedup_since => Ok(Some(event.id.clone())),
        Some(_) => Err(StoreError::Conflict(format!(
            "event id `{}` was used by an earlier event; choose a new id",
            event.id
        ))),
        None => Ok(None),
    }
}

async fn subscribed_webhooks(
    c: &mut PgConnection,
    app_id: &str,
    event_type: &str,
) -> StoreResult<Vec<String>> {
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT id, event_types FROM webhooks WHERE app_id = $1 AND enabled ORDER BY id",
    )
    .bind(app_id)
    .fetch_all(&mut *c)
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

/// Moves each delivery to its next state, only where the record's claim
/// still holds (a lost lease means another worker owns it now); returns
/// the ids that were updated.
async fn update_deliveries(
    c: &mut PgConnection,
    records: &[AttemptRecord],
) -> StoreResult<std::collections::HashSet<String>> {
    let mut columns = DeliveryColumns::default();
    for record in records {
        columns.push(record);
    }
    let updated: Vec<String> = sqlx::query_scalar(
        "UPDATE deliveries d SET status = r.status, due_at = r.due_at, claim_token = NULL, \
         attempts = d.attempts + r.attempted, last_attempt_at = COALESCE(r.started_at, d.last_attempt_at), \
         last_status_code = r.status_code, last_error = r.error, updated_at = r.now, skip_reason = r.skip_reason \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], \
                     $7::bigint[], $8::text[], $9::bigint[], $10::text[]) \
              AS r(id, token, status, due_at, attempted, started_at, status_code, error, now, skip_reason) \
         WHERE d.id = r.id AND d.claim_token = r.token RETURNING d.id",
    )
    .bind(columns.id)
    .bind(columns.token)
    .bind(columns.status)
    .bind(columns.due_at)
    .bind(columns.attempted)
    .bind(columns.started_at)
    .bind(columns.status_code)
    .bind(columns.error)
    .bind(columns.now)
    .bind(columns.skip_reason)
    .fetch_all(&mut *c)
    .await?;
    Ok(updated.into_iter().collect())
}

/// The records' next delivery states, column by column, for UNNEST.
#[derive(Default)]
struct DeliveryColumns<'a> {
    id: Vec<&'a str>,
    token: Vec<&'a str>,
    status: Vec<&'static str>,
    due_at: Vec<Option<Millis>>,
    attempted: Vec<i64>,
    started_at: Vec<Option<Millis>>,
    status_code: Vec<Option<i64>>,
    error: Vec<Option<&'a str>>,
    now: Vec<Millis>,
    skip_reason: Vec<Option<&'a str>>,
}

impl<'a> DeliveryColumns<'a> {
    fn push(&mut self, record: &'a AttemptRecord) {
        let (status, due_at, error, skip_reason) = match &record.next {
            NextState::Succeeded => ("succeeded", None, None, None),
            NextState::Skipped { reason } => ("skipped", None, None, Some(reason.as_str())),
            NextState::Retry { due_at, error } => {
                ("failed", Some(*due_at), Some(error.as_str()), None)
            }
            NextState::Dead { error } => ("dead", None, Some(error.as_str()), None),
        };
        let attempt = record.attempt.as_ref();
        self.id.push(&record.delivery_id);
        self.token.push(&record.claim_token);
        self.status.push(status);
        self.due_at.push(due_at);
        self.attempted.push(attempt.map_or(0, |_| 1));
        self.started_at.push(attempt.map(|a| a.started_at));
        self.status_code.push(attempt.and_then(|a| a.status_code));
        self.error.push(error);
        self.now.push(record.now);
        self.skip_reason.push(skip_reason);
    }
}

async fn insert_attempts(c: &mut PgConnection, records: &[&AttemptRecord]) -> StoreResult<()> {
    let rows: Vec<(&AttemptRecord, &AttemptRow)> = records
        .iter()
        .filter_map(|r| r.attempt.as_ref().map(|a| (*r, a)))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = rows.iter().map(|_| new_id("atm")).collect();
    let column =
        |f: fn(&(&AttemptRecord, &AttemptRow)) -> i64| rows.iter().map(f).collect::<Vec<i64>>();
    sqlx::query(
        "INSERT INTO attempts (id, delivery_id, attempt, started_at, duration_ms, outcome, status_code, \
         response_body, error, plugin_error) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[], \
                              $7::bigint[], $8::text[], $9::text[], $10::text[])",
    )
    .bind(&ids)
    .bind(rows.iter().map(|(r, _)| r.delivery_id.as_str()).collect::<Vec<_>>())
    .bind(column(|(_, a)| a.number))
    .bind(column(|(_, a)| a.started_at))
    .bind(column(|(_, a)| a.duration_ms))
    .bind(rows.iter().map(|(_, a)| a.outcome).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, a)| a.status_code).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, a)| a.response_body.as_deref()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, a)| a.error.as_deref()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, a)| a.plugin_error).collect::<Vec<_>>())
    .execute(&mut *c)
    .await?;
    Ok(())
}

async fn apply_webhook_effect(
    c: &mut PgConnection,
    webhook_id: &str,
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
            .bind(webhook_id)
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
            .bind(webhook_id)
            .execute(&mut *c)
            .await?;
        }
    }
    Ok(())
}

fn map_rows<T>(rows: &[PgRow], map: impl Fn(&PgRow) -> PgResult<T>) -> StoreResult<Vec<T>> {
    Ok(rows.iter().map(map).collect::<PgResult<Vec<T>>>()?)
}

fn app_row(r: &PgRow) -> PgResult<App> {
    Ok(App {
        id: r.try_get(0)?,
        uid: r.try_get(1)?,
        name: r.try_get(2)?,
        created_at: r.try_get(3)?,
        updated_at: r.try_get(4)?,
    })
}

fn webhook_row(r: &PgRow) -> PgResult<Webhook> {
    Ok(Webhook {
        id: r.try_get(0)?,
        app_id: r.try_get(1)?,
        url: r.try_get(2)?,
        description: r.try_get(3)?,
        event_types: r.try_get(4)?,
        enabled: r.try_get(5)?,
        disabled_reason: r.try_get(6)?,
        headers: r.try_get(7)?,
        raw_payload: r.try_get(8)?,
        secret: r.try_get(9)?,
        previous_secret: r.try_get(10)?,
        previous_secret_expires_at: r.try_get(11)?,
        created_at: r.try_get(12)?,
        updated_at: r.try_get(13)?,
        plugin: AttachedPlugin::from_columns(r.try_get(14)?, r.try_get(15)?),
    })
}

fn plugin_row(r: &PgRow) -> PgResult<Plugin> {
    Ok(Plugin {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        version: r.try_get(2)?,
        sha256: r.try_get(3)?,
        size: r.try_get(4)?,
        created_at: r.try_get(5)?,
    })
}

fn event_row(r: &PgRow) -> PgResult<Event> {
    Ok(Event {
        id: r.try_get(0)?,
        app_id: r.try_get(1)?,
        event_type: r.try_get(2)?,
        payload: r.try_get(3)?,
        created_at: r.try_get(4)?,
    })
}

fn delivery_row(r: &PgRow) -> PgResult<Delivery> {
    Ok(Delivery {
        id: r.try_get(0)?,
        app_id: r.try_get(1)?,
        event_id: r.try_get(2)?,
        webhook_id: r.try_get(3)?,
        status: r.try_get(4)?,
        attempts: r.try_get(5)?,
        due_at: r.try_get(6)?,
        last_attempt_at: r.try_get(7)?,
        last_status_code: r.try_get(8)?,
        last_error: r.try_get(9)?,
        created_at: r.try_get(10)?,
        updated_at: r.try_get(11)?,
        skip_reason: r.try_get(12)?,
    })
}

fn attempt_row(r: &PgRow) -> PgResult<Attempt> {
    Ok(Attempt {
        id: r.try_get(0)?,
        attempt: r.try_get(1)?,
        started_at: r.try_get(2)?,
        duration_ms: r.try_get(3)?,
        outcome: r.try_get(4)?,
        status_code: r.try_get(5)?,
        response_body: r.try_get(6)?,
        error: r.try_get(7)?,
        plugin_error: r.try_get(8)?,
    })
}

fn claimed_row(r: &PgRow) -> PgResult<ClaimedDelivery> {
    Ok(ClaimedDelivery {
        id: r.try_get(0)?,
        claim_token: r.try_get(1)?,
        attempts: r.try_get(2)?,
        event_id: r.try_get(3)?,
        event_type: r.try_get(4)?,
        payload: r.try_get(5)?,
        event_created_at: r.try_get(6)?,
        webhook_id: r.try_get(7)?,
        url: r.try_get(8)?,
        enabled: r.try_get(9)?,
        disabled_reason: r.try_get(10)?,
        headers: r.try_get(11)?,
        raw_payload: r.try_get(12)?,
        secret: r.try_get(13)?,
        previous_secret: r.try_get(14)?,
        previous_secret_expires_at: r.try_get(15)?,
        app_id: r.try_get(16)?,
        app_uid: r.try_get(17)?,
        plugin: AttachedPlugin::from_columns(r.try_get(18)?, r.try_get(19)?)
            .zip(r.try_get::<Option<String>, _>(20)?),
    })
}

fn found(rows: u64) -> StoreResult<()> {
    if rows == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(())
    }
}

fn is_code(error: &sqlx::Error, code: &str) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|c| c == code)
}

/// A constraint violation the caller caused, as a conflict naming it.
fn conflict_on(error: sqlx::Error, code: &str, message: &str) -> StoreError {
    if is_code(&error, code) {
        StoreError::Conflict(message.to_owned())
    } else {
        StoreError::Postgres(error)
    }
}
