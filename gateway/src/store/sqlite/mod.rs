//! The SQLite backend: one embedded database file, written through the
//! group-commit writer of [`connection`], read through its reader pool.

mod connection;
mod migrate;

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, params};

use self::connection::{Readers, Writer};
use super::*;
use crate::domain::EventTypeFilter;

const APP_COLUMNS: &str = "id, uid, name, created_at, updated_at";
const WEBHOOK_COLUMNS: &str = "id, app_id, url, description, event_types, enabled, disabled_reason, headers, \
     raw_payload, secret, previous_secret, previous_secret_expires_at, created_at, updated_at, plugin_id, plugin_config";
const DELIVERY_COLUMNS: &str = "id, app_id, event_id, webhook_id, status, attempts, due_at, last_attempt_at, \
     last_status_code, last_error, created_at, updated_at, skip_reason";
const PLUGIN_COLUMNS: &str = "id, name, version, sha256, size, created_at";
/// Claims due deliveries: (lease end, token, now, now, limit).
const CLAIM_SQL: &str = "UPDATE deliveries SET status = 'sending', due_at = ?, claim_token = ?, updated_at = ? \
     WHERE id IN (SELECT id FROM deliveries WHERE due_at IS NOT NULL AND due_at <= ? \
                  ORDER BY due_at LIMIT ?) \
     RETURNING id";
/// An app's enabled webhooks, for fan-out: (app id).
const SUBSCRIBED_SQL: &str =
    "SELECT id, event_types FROM webhooks WHERE app_id = ? AND enabled ORDER BY id";

#[derive(Clone)]
pub struct SqliteStore {
    writer: Writer,
    readers: Readers,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store(sqlite)")
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database and applies migrations.
    pub async fn open(database_url: &str) -> StoreResult<Self> {
        let path = connection::path_of(database_url)?;
        let path_for_writer = path.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut connection = connection::open_writer(&path_for_writer)?;
            migrate::run(&mut connection)?;
            Ok::<_, StoreError>(connection)
        })
        .await
        .map_err(|e| StoreError::Open(e.to_string()))??;
        Ok(Self {
            writer: Writer::start(writer, &path)?,
            readers: Readers::new(&path),
        })
    }

    /// Applies pending migrations and returns.
    pub async fn migrate(database_url: &str) -> StoreResult<()> {
        Self::open(database_url).await?.close().await;
        Ok(())
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.readers.close();
    }

    /// Checks that both the readers and the writer answer.
    pub async fn ping(&self) -> StoreResult<()> {
        self.readers
            .read(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?))
            .await?;
        self.writer
            .write(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }

    // ---- settings ------------------------------------------------------

    pub async fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        let key = key.to_owned();
        self.readers
            .read(move |c| {
                let value = c
                    .prepare_cached("SELECT value FROM settings WHERE key = ?")?
                    .query_row([&key], |r| r.get(0))
                    .optional()?;
                Ok(value)
            })
            .await
    }

    /// Stores `value` unless the key is set; returns the value in force.
    pub async fn setting_insert_if_absent(&self, key: &str, value: &str) -> StoreResult<String> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.writer
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                )?
                .execute([&key, &value])?;
                Ok(
                    c.prepare_cached("SELECT value FROM settings WHERE key = ?")?
                        .query_row([&key], |r| r.get(0))?,
                )
            })
            .await
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
        self.writer
            .write(move |c| {
                c.prepare_cached("INSERT INTO apps (id, uid, name, created_at, updated_at) VALUES (?, ?, ?, ?, ?)")?
                    .execute(params![app.id, app.uid, app.name, now, now])
                    .map_err(|e| unique_conflict(e, "an app with this uid already exists"))?;
                Ok(app)
            })
            .await
    }

    pub async fn list_apps(&self, page: &PageRequest) -> StoreResult<Vec<App>> {
        let (cursor, limit) = (page.cursor.clone().unwrap_or_default(), page.limit);
        self.readers
            .read(move |c| {
                let sql =
                    format!("SELECT {APP_COLUMNS} FROM apps WHERE id > ? ORDER BY id LIMIT ?");
                collect(c, &sql, params![cursor, limit], app_row)
            })
            .await
    }

    /// Finds an app by its id or its uid.
    pub async fn find_app(&self, id_or_uid: &str) -> StoreResult<Option<App>> {
        let key = id_or_uid.to_owned();
        self.readers
            .read(move |c| {
                let sql =
                    format!("SELECT {APP_COLUMNS} FROM apps WHERE id = ?1 OR uid = ?1 LIMIT 1");
                Ok(c.prepare_cached(&sql)?
                    .query_row([&key], app_row)
                    .optional()?)
            })
            .await
    }

    pub async fn update_app(&self, id: &str, name: &str, uid: Option<&str>) -> StoreResult<App> {
        let (id, name, uid) = (id.to_owned(), name.to_owned(), uid.map(str::to_owned));
        self.writer
            .write(move |c| {
                let sql = format!("UPDATE apps SET name = ?, uid = ?, updated_at = ? WHERE id = ? RETURNING {APP_COLUMNS}");
                c.prepare_cached(&sql)?
                    .query_row(params![name, uid, now_ms(), id], app_row)
                    .optional()
                    .map_err(|e| unique_conflict(e, "an app with this uid already exists"))?
                    .ok_or(StoreError::NotFound)
            })
            .await
    }

    pub async fn delete_app(&self, id: &str) -> StoreResult<()> {
        let id = id.to_owned();
        self.writer
            .write(move |c| {
                found(
                    c.prepare_cached("DELETE FROM apps WHERE id = ?")?
                        .execute([&id])?,
                )
            })
            .await
    }

    pub async fn create_app_key(&self, app_id: &str, key_hash: &str) -> StoreResult<String> {
        let (app_id, key_hash) = (app_id.to_owned(), key_hash.to_owned());
        self.writer
            .write(move |c| {
                let id = new_id("key");
                c.prepare_cached(
                    "INSERT INTO app_keys (id, app_id, key_hash, created_at) VALUES (?, ?, ?, ?)",
                )?
                .execute(params![id, app_id, key_hash, now_ms()])?;
                Ok(id)
            })
            .await
    }

    pub async fn delete_app_key(&self, app_id: &str, key_id: &str) -> StoreResult<()> {
        let (app_id, key_id) = (app_id.to_owned(), key_id.to_owned());
        self.writer
            .write(move |c| {
                found(
                    c.prepare_cached("DELETE FROM app_keys WHERE id = ? AND app_id = ?")?
                        .execute([&key_id, &app_id])?,
                )
            })
            .await
    }

    /// The app an app key (by hash) belongs to.
    pub async fn app_for_key(&self, key_hash: &str) -> StoreResult<Option<App>> {
        let key_hash = key_hash.to_owned();
        self.readers
            .read(move |c| {
                let sql = "SELECT apps.id, apps.uid, apps.name, apps.created_at, apps.updated_at \
                           FROM app_keys JOIN apps ON apps.id = app_keys.app_id WHERE key_hash = ?";
                Ok(c.prepare_cached(sql)?
                    .query_row([&key_hash], app_row)
                    .optional()?)
            })
            .await
    }

    // ---- webhooks ------------------------------------------------------

    pub async fn create_webhook(
        &self,
        app_id: &str,
        fields: &WebhookFields,
        secret: &str,
    ) -> StoreResult<Webhook> {
        let (app_id, f, secret) = (app_id.to_owned(), fields.clone(), secret.to_owned());
        self.writer
            .write(move |c| {
                let now = now_ms();
                let id = new_id("wh");
                c.prepare_cached(
                    "INSERT INTO webhooks (id, app_id, url, description, event_types, enabled, headers, raw_payload, \
                     secret, created_at, updated_at, plugin_id, plugin_config) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )?
                .execute(params![
                    id,
                    app_id,
                    f.url,
                    f.description,
                    f.event_types,
                    f.enabled,
                    f.headers,
                    f.raw_payload,
                    secret,
                    now,
                    now,
                    f.plugin.as_ref().map(|p| &p.id),
                    f.plugin.as_ref().map(|p| &p.config)
                ])
                .map_err(|e| foreign_key(e, "plugin: no such plugin"))?;
                webhook_by_id(c, &app_id, &id)?.ok_or(StoreError::NotFound)
            })
            .await
    }

    pub async fn list_webhooks(
        &self,
        app_id: &str,
        page: &PageRequest,
    ) -> StoreResult<Vec<Webhook>> {
        let (app_id, cursor, limit) = (
            app_id.to_owned(),
            page.cursor.clone().unwrap_or_default(),
            page.limit,
        );
        self.readers
            .read(move |c| {
                let sql = format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE app_id = ? AND id > ? ORDER BY id LIMIT ?"
                );
                collect(c, &sql, params![app_id, cursor, limit], webhook_row)
            })
            .await
    }

    pub async fn webhook(&self, app_id: &str, id: &str) -> StoreResult<Option<Webhook>> {
        let (app_id, id) = (app_id.to_owned(), id.to_owned());
        self.readers
            .read(move |c| webhook_by_id(c, &app_id, &id))
            .await
    }

    /// Replaces a webhook's settable fields. Enabling it clears the reason
    /// it was disabled and restarts its failing clock.
    pub async fn update_webhook(
        &self,
        app_id: &str,
        id: &str,
        fields: &WebhookFields,
    ) -> StoreResult<Webhook> {
        let (app_id, id, f) = (app_id.to_owned(), id.to_owned(), fields.clone());
        self.writer
            .write(move |c| {
                let changed = c
                    .prepare_cached(
                        "UPDATE webhooks SET url = ?1, description = ?2, event_types = ?3, headers = ?4, \
                         raw_payload = ?5, \
                         disabled_reason = CASE WHEN ?6 THEN NULL ELSE disabled_reason END, \
                         failing_since = CASE WHEN ?6 AND NOT enabled THEN NULL ELSE failing_since END, \
                         enabled = ?6, updated_at = ?7, plugin_id = ?10, plugin_config = ?11 \
                         WHERE app_id = ?8 AND id = ?9",
                    )?
                    .execute(params![
                        f.url,
                        f.description,
                        f.event_types,
                        f.headers,
                        f.raw_payload,
                        f.enabled,
                        now_ms(),
                        app_id,
                        id,
                        f.plugin.as_ref().map(|p| &p.id),
                        f.plugin.as_ref().map(|p| &p.config)
                    ])
                    .map_err(|e| foreign_key(e, "plugin: no such plugin"))?;
                found(changed)?;
                webhook_by_id(c, &app_id, &id)?.ok_or(StoreError::NotFound)
            })
            .await
    }

    pub async fn delete_webhook(&self, app_id: &str, id: &str) -> StoreResult<()> {
        let (app_id, id) = (app_id.to_owned(), id.to_owned());
        self.writer
            .write(move |c| {
                found(
                    c.prepare_cached("DELETE FROM webhooks WHERE app_id = ? AND id = ?")?
                        .execute([&app_id, &id])?,
                )
            })
            .await
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
        let (app_id, id, secret) = (app_id.to_owned(), id.to_owned(), secret.to_owned());
        self.writer
            .write(move |c| {
                found(
                    c.prepare_cached(
                        "UPDATE webhooks SET previous_secret = secret, previous_secret_expires_at = ?, secret = ?, \
                         updated_at = ? WHERE app_id = ? AND id = ?",
                    )?
                    .execute(params![previous_expires_at, secret, now_ms(), app_id, id])?,
                )
            })
            .await
    }

    // ---- plugins -------------------------------------------------------

    /// Stores an upload. The same bytes under an existing name and version
    /// return the stored plugin (`false`: nothing new); other bytes conflict.
    pub async fn create_plugin(&self, new: NewPlugin) -> StoreResult<(Plugin, bool)> {
        self.writer
            .write(move |c| {
                let sql = format!("SELECT {PLUGIN_COLUMNS} FROM plugins WHERE name = ? AND version = ?");
                let existing = c.prepare_cached(&sql)?.query_row([&new.name, &new.version], plugin_row).optional()?;
                if let Some(existing) = existing {
                    if existing.sha256 == new.sha256 {
                        return Ok((existing, false));
                    }
                    return Err(StoreError::Conflict(format!(
                        "{} {} already exists with other content; plugin versions are immutable, upload a new version",
                        new.name, new.version
                    )));
                }
                let plugin = Plugin {
                    id: new_id("plg"),
                    name: new.name,
                    version: new.version,
                    sha256: new.sha256,
                    size: new.wasm.len() as i64,
                    created_at: now_ms(),
                };
                c.prepare_cached(
                    "INSERT INTO plugins (id, name, version, sha256, size, wasm, created_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?)",
                )?
                .execute(params![
                    plugin.id,
                    plugin.name,
                    plugin.version,
                    plugin.sha256,
                    plugin.size,
                    new.wasm,
                    plugin.created_at
                ])?;
                Ok((plugin, true))
            })
            .await
    }

    pub async fn list_plugins(&self, page: &PageRequest) -> StoreResult<Vec<Plugin>> {
        let (cursor, limit) = (page.cursor.clone().unwrap_or_default(), page.limit);
        self.readers
            .read(move |c| {
                let sql = format!(
                    "SELECT {PLUGIN_COLUMNS} FROM plugins WHERE id > ? ORDER BY id LIMIT ?"
                );
                collect(c, &sql, params![cursor, limit], plugin_row)
            })
            .await
    }

    pub async fn plugin(&self, id: &str) -> StoreResult<Option<Plugin>> {
        let id = id.to_owned();
        self.readers
            .read(move |c| {
                let sql = format!("SELECT {PLUGIN_COLUMNS} FROM plugins WHERE id = ?");
                Ok(c.prepare_cached(&sql)?
                    .query_row([&id], plugin_row)
                    .optional()?)
            })
            .await
    }

    pub async fn plugin_code(&self, id: &str) -> StoreResult<Option<PluginCode>> {
        let id = id.to_owned();
        self.readers
            .read(move |c| {
                let sql = "SELECT sha256, wasm, artifact, artifact_key FROM plugins WHERE id = ?";
                let code = c
                    .prepare_cached(sql)?
                    .query_row([&id], |r| {
                        Ok(PluginCode {
                            sha256: r.get(0)?,
                            wasm: r.get(1)?,
                            artifact: r.get(2)?,
                            artifact_key: r.get(3)?,
                        })
                    })
                    .optional()?;
                Ok(code)
            })
            .await
    }

    /// Stores a plugin's optimised artifact (after its upload, or after a
    /// host of another version compiled it again).
    pub async fn set_plugin_artifact(
        &self,
        sha256: &str,
        artifact: Vec<u8>,
        key: &str,
    ) -> StoreResult<()> {
        let (sha256, key) = (sha256.to_owned(), key.to_owned());
        self.writer
            .write(move |c| {
                c.prepare_cached(
                    "UPDATE plugins SET artifact = ?, artifact_key = ? WHERE sha256 = ?",
                )?
                .execute(params![artifact, key, sha256])?;
                Ok(())
            })
            .await
    }

    /// Deletes a plugin no webhook uses.
    pub async fn delete_plugin(&self, id: &str) -> StoreResult<()> {
        let id = id.to_owned();
        self.writer
            .write(move |c| {
                let users: i64 = c
                    .prepare_cached("SELECT COUNT(*) FROM webhooks WHERE plugin_id = ?")?
                    .query_row([&id], |r| r.get(0))?;
                if users > 0 {
                    return Err(StoreError::Conflict(format!(
                        "{users} webhook(s) use this plugin; detach it first (PATCH the webhook with \"plugin\": null)"
                    )));
                }
                found(c.prepare_cached("DELETE FROM plugins WHERE id = ?")?.execute([&id])?)
            })
            .await
    }

    // ---- events --------------------------------------------------------

    /// Accepts an event: the event row and one pending delivery per
    /// subscribed, enabled webhook, committed together. A repeat (same
    /// idempotency key or event id within the window) returns the first
    /// answer and queues nothing.
    pub async fn publish(&self, event: NewEvent) -> StoreResult<Published> {
        self.writer.write(move |c| publish(c, &event)).await
    }

    pub async fn event(&self, app_id: &str, id: &str) -> StoreResult<Option<Event>> {
        let (app_id, id) = (app_id.to_owned(), id.to_owned());
        self.readers
            .read(move |c| {
                let sql = "SELECT id, app_id, event_type, payload, created_at FROM events WHERE app_id = ? AND id = ?";
                Ok(c.prepare_cached(sql)?.query_row([&app_id, &id], event_row).optional()?)
            })
            .await
    }

    // ---- deliveries ----------------------------------------------------

    pub async fn event_deliveries(
        &self,
        app_id: &str,
        event_id: &str,
    ) -> StoreResult<Vec<Delivery>> {
        let (app_id, event_id) = (app_id.to_owned(), event_id.to_owned());
        self.readers
            .read(move |c| {
                let sql = format!(
                    "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE app_id = ? AND event_id = ? ORDER BY id"
                );
                collect(c, &sql, params![app_id, event_id], delivery_row)
            })
            .await
    }

    pub async fn webhook_deliveries(
        &self,
        webhook_id: &str,
        status: Option<DeliveryStatus>,
        page: &PageRequest,
    ) -> StoreResult<Vec<Delivery>> {
        let (webhook_id, cursor, limit) = (
            webhook_id.to_owned(),
            page.cursor.clone().unwrap_or_default(),
            page.limit,
        );
        let status = status.map(DeliveryStatus::as_str);
        self.readers
            .read(move |c| {
                let sql = format!(
                    "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE webhook_id = ?1 AND id > ?2 \
                     AND (?3 IS NULL OR status = ?3) ORDER BY id LIMIT ?4"
                );
                collect(
                    c,
                    &sql,
                    params![webhook_id, cursor, status, limit],
                    delivery_row,
                )
            })
            .await
    }

    pub async fn delivery(&self, app_id: &str, id: &str) -> StoreResult<Option<Delivery>> {
        let (app_id, id) = (app_id.to_owned(), id.to_owned());
        self.readers
            .read(move |c| delivery_by_id(c, &app_id, &id))
            .await
    }

    pub async fn attempts(&self, delivery_id: &str) -> StoreResult<Vec<Attempt>> {
        let delivery_id = delivery_id.to_owned();
        self.readers
            .read(move |c| {
                let sql = "SELECT id, attempt, started_at, duration_ms, outcome, status_code, response_body, error, \
                           plugin_error FROM attempts WHERE delivery_id = ? ORDER BY attempt, started_at";
                collect(c, sql, params![delivery_id], attempt_row)
            })
            .await
    }

    /// Queues a delivery for an attempt now, whatever its state, unless a
    /// worker is sending it at this moment.
    pub async fn retry_delivery(&self, app_id: &str, id: &str) -> StoreResult<Delivery> {
        let (app_id, id) = (app_id.to_owned(), id.to_owned());
        self.writer
            .write(move |c| {
                let now = now_ms();
                let changed = c
                    .prepare_cached(
                        "UPDATE deliveries SET status = 'pending', due_at = ?, claim_token = NULL, updated_at = ? \
                         WHERE app_id = ? AND id = ? AND status <> 'sending'",
                    )?
                    .execute(params![now, now, app_id, id])?;
                let delivery = delivery_by_id(c, &app_id, &id)?.ok_or(StoreError::NotFound)?;
                if changed == 0 {
                    return Err(StoreError::Conflict(
                        "the delivery is being sent right now; retry after this attempt ends".into(),
                    ));
                }
                Ok(delivery)
            })
            .await
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
        self.writer
            .write(move |c| {
                let now = now_ms();
                let token = new_claim_token();
                let ids: Vec<String> = collect(
                    c,
                    CLAIM_SQL,
                    params![now + lease.as_millis() as Millis, token, now, now, limit],
                    |r| r.get(0),
                )?;
                let mut claimed = Vec::with_capacity(ids.len());
                let mut details = c.prepare_cached(
                    "SELECT d.id, d.claim_token, d.attempts, e.id, e.event_type, e.payload, e.created_at, \
                     w.id, w.url, w.enabled, w.disabled_reason, w.headers, w.raw_payload, w.secret, \
                     w.previous_secret, w.previous_secret_expires_at, a.id, a.uid, \
                     w.plugin_id, w.plugin_config, p.sha256 \
                     FROM deliveries d JOIN events e ON e.app_id = d.app_id AND e.id = d.event_id \
                     JOIN webhooks w ON w.id = d.webhook_id JOIN apps a ON a.id = d.app_id \
                     LEFT JOIN plugins p ON p.id = w.plugin_id WHERE d.id = ?",
                )?;
                for id in ids {
                    claimed.push(details.query_row([&id], claimed_row)?);
                }
                Ok(claimed)
            })
            .await
    }

    /// Applies attempt results. A result whose claim was lost (the lease
    /// ran out and another worker took the delivery) is dropped: the
    /// current holder owns the delivery now.
    pub async fn record_attempts(
        &self,
        records: std::sync::Arc<Vec<AttemptRecord>>,
    ) -> StoreResult<()> {
        self.writer
            .write(move |c| {
                for record in records.iter() {
                    record_attempt(c, record)?;
                }
                Ok(())
            })
            .await
    }

    /// Gives claimed deliveries back to the queue, due now (shutdown).
    pub async fn release(&self, claims: Vec<(String, String)>) -> StoreResult<()> {
        self.writer
            .write(move |c| {
                let now = now_ms();
                let mut release = c.prepare_cached(
                    "UPDATE deliveries SET status = CASE WHEN attempts = 0 THEN 'pending' ELSE 'failed' END, \
                     due_at = ?, claim_token = NULL, updated_at = ? WHERE id = ? AND claim_token = ?",
                )?;
                for (id, token) in &claims {
                    release.execute(params![now, now, id, token])?;
                }
                Ok(())
            })
            .await
    }
}

impl SqliteStore {
    pub async fn queue_stats(&self, now: Millis) -> StoreResult<QueueStats> {
        self.readers
            .read(move |c| {
                let sql = "SELECT COALESCE(SUM(status <> 'sending'), 0), \
                     COALESCE(SUM(status <> 'sending' AND due_at <= ?1), 0), \
                     COALESCE(SUM(status = 'sending'), 0), \
                     MIN(CASE WHEN status <> 'sending' THEN due_at END) \
                     FROM deliveries WHERE due_at IS NOT NULL";
                let stats = c.prepare_cached(sql)?.query_row([now], |r| {
                    Ok(QueueStats {
                        pending: r.get::<_, i64>(0)? as u64,
                        due: r.get::<_, i64>(1)? as u64,
                        in_flight: r.get::<_, i64>(2)? as u64,
                        oldest_due_at: r.get(3)?,
                    })
                })?;
                Ok(stats)
            })
            .await
    }

    pub async fn purge_events(&self, cutoff: Millis, limit: u32) -> StoreResult<u64> {
        self.writer
            .write(move |c| {
                let deleted = c
                    .prepare_cached(PURGE_SQL)?
                    .execute(params![cutoff, limit])?;
                Ok(deleted as u64)
            })
            .await
    }
}

/// Old finished events go with their deliveries and attempts (the foreign
/// keys cascade): (cutoff, limit).
const PURGE_SQL: &str = "DELETE FROM events WHERE rowid IN ( \
     SELECT e.rowid FROM events e WHERE e.created_at < ?1 AND NOT EXISTS ( \
         SELECT 1 FROM deliveries d WHERE d.app_id = e.app_id AND d.event_id = e.id \
         AND (d.due_at IS NOT NULL OR d.updated_at >= ?1)) \
     ORDER BY e.created_at LIMIT ?2)";

fn publish(c: &Connection, event: &NewEvent) -> StoreResult<Published> {
    if let Some(first) = repeat_of(c, event)? {
        let deliveries = collect(
            c,
            "SELECT id, webhook_id FROM deliveries WHERE app_id = ? AND event_id = ? ORDER BY id",
            params![event.app_id, first],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        return Ok(Published {
            event_id: first,
            deliveries,
            replayed: true,
        });
    }
    let now = now_ms();
    c.prepare_cached(
        "INSERT INTO events (app_id, id, event_type, payload, idempotency_key, created_at) VALUES (?, ?, ?, ?, ?, ?)",
    )?
    .execute(params![event.app_id, event.id, event.event_type, event.payload, event.idempotency_key, now])?;
    let mut insert = c.prepare_cached(
        "INSERT INTO deliveries (id, app_id, event_id, webhook_id, status, due_at, created_at, updated_at) \
         VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
    )?;
    let mut deliveries = Vec::new();
    for webhook_id in subscribed_webhooks(c, &event.app_id, &event.event_type)? {
        let delivery_id = new_id("dlv");
        insert.execute(params![
            delivery_id,
            event.app_id,
            event.id,
            webhook_id,
            now,
            now,
            now
        ])?;
        deliveries.push((delivery_id, webhook_id));
    }
    Ok(Published {
        event_id: event.id.clone(),
        deliveries,
        replayed: false,
    })
}

/// The id of the event this one repeats, if it is a repeat within the
/// window. A key seen only before the window is freed; an id is refused.
fn repeat_of(c: &Connection, event: &NewEvent) -> StoreResult<Option<String>> {
    if let Some(key) = &event.idempotency_key {
        let earlier: Option<(String, Millis)> = c
            .prepare_cached(
                "SELECT id, created_at FROM events WHERE app_id = ? AND idempotency_key = ?",
            )?
            .query_row([&event.app_id, key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        match earlier {
            Some((id, at)) if at >= event.dedup_since => return Ok(Some(id)),
            Some((id, _)) => {
                c.prepare_cached(
                    "UPDATE events SET idempotency_key = NULL WHERE app_id = ? AND id = ?",
                )?
                .execute([&event.app_id, &id])?;
            }
            None => {}
        }
    }
    let earlier: Option<Millis> = c
        .prepare_cached("SELECT created_at FROM events WHERE app_id = ? AND id = ?")?
        .query_row([&event.app_id, &event.id], |r| r.get(0))
        .optional()?;
    match earlier {
        Some(at) if at >= event.dedup_since => Ok(Some(event.id.clone())),
        Some(_) => Err(StoreError::Conflict(format!(
            "event id `{}` was used by an earlier event; choose a new id",
            event.id
        ))),
        None => Ok(None),
    }
}

fn subscribed_webhooks(c: &Connection, app_id: &str, event_type: &str) -> StoreResult<Vec<String>> {
    let rows: Vec<(String, Option<String>)> = collect(c, SUBSCRIBED_SQL, params![app_id], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
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

fn record_attempt(c: &Connection, record: &AttemptRecord) -> StoreResult<()> {
    let (status, due_at, error, skip_reason) = match &record.next {
        NextState::Succeeded => ("succeeded", None, None, None),
        NextState::Skipped { reason } => ("skipped", None, None, Some(reason.as_str())),
        NextState::Retry { due_at, error } => ("failed", Some(*due_at), Some(error.as_str()), None),
        NextState::Dead { error } => ("dead", None, Some(error.as_str()), None),
    };
    let attempt = record.attempt.as_ref();
    let changed = c
        .prepare_cached(
            "UPDATE deliveries SET status = ?, due_at = ?, claim_token = NULL, attempts = attempts + ?, \
             last_attempt_at = COALESCE(?, last_attempt_at), last_status_code = ?, last_error = ?, updated_at = ?, \
             skip_reason = ? WHERE id = ? AND claim_token = ?",
        )?
        .execute(params![
            status,
            due_at,
            attempt.map_or(0, |_| 1),
            attempt.map(|a| a.started_at),
            attempt.and_then(|a| a.status_code),
            error,
            record.now,
            skip_reason,
            record.delivery_id,
            record.claim_token
        ])?;
    if changed == 0 {
        return Ok(());
    }
    if let Some(a) = attempt {
        c.prepare_cached(
            "INSERT INTO attempts (id, delivery_id, attempt, started_at, duration_ms, outcome, status_code, \
             response_body, error, plugin_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )?
        .execute(params![
            new_id("atm"),
            record.delivery_id,
            a.number,
            a.started_at,
            a.duration_ms,
            a.outcome,
            a.status_code,
            a.response_body,
            a.error,
            a.plugin_error
        ])?;
    }
    apply_webhook_effect(c, &record.webhook_id, &record.webhook, record.now)
}

fn apply_webhook_effect(
    c: &Connection,
    webhook_id: &str,
    effect: &WebhookEffect,
    now: Millis,
) -> StoreResult<()> {
    match effect {
        WebhookEffect::None => {}
        WebhookEffect::Healthy => {
            c.prepare_cached("UPDATE webhooks SET failing_since = NULL WHERE id = ? AND failing_since IS NOT NULL")?
                .execute([webhook_id])?;
        }
        WebhookEffect::Failing {
            disable_if_failing_since,
        } => {
            c.prepare_cached(
                "UPDATE webhooks SET failing_since = COALESCE(failing_since, ?1), \
                 enabled = CASE WHEN COALESCE(failing_since, ?1) <= ?2 THEN 0 ELSE enabled END, \
                 disabled_reason = CASE WHEN enabled AND COALESCE(failing_since, ?1) <= ?2 \
                     THEN 'every attempt failed since ' || \
                          strftime('%Y-%m-%dT%H:%M:%SZ', COALESCE(failing_since, ?1) / 1000, 'unixepoch') \
                     ELSE disabled_reason END, \
                 updated_at = CASE WHEN enabled AND COALESCE(failing_since, ?1) <= ?2 THEN ?1 ELSE updated_at END \
                 WHERE id = ?3",
            )?
            .execute(params![now, disable_if_failing_since, webhook_id])?;
        }
        WebhookEffect::Disable { reason } => {
            c.prepare_cached("UPDATE webhooks SET enabled = 0, disabled_reason = ?, updated_at = ? WHERE id = ? AND enabled")?
                .execute(params![reason, now, webhook_id])?;
        }
    }
    Ok(())
}

fn webhook_by_id(c: &Connection, app_id: &str, id: &str) -> StoreResult<Option<Webhook>> {
    let sql = format!("SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE app_id = ? AND id = ?");
    Ok(c.prepare_cached(&sql)?
        .query_row([app_id, id], webhook_row)
        .optional()?)
}

fn delivery_by_id(c: &Connection, app_id: &str, id: &str) -> StoreResult<Option<Delivery>> {
    let sql = format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE app_id = ? AND id = ?");
    Ok(c.prepare_cached(&sql)?
        .query_row([app_id, id], delivery_row)
        .optional()?)
}

/// Runs a query and maps every row.
fn collect<T>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> StoreResult<Vec<T>> {
    let mut statement = c.prepare_cached(sql)?;
    let rows = statement
        .query_map(params, map)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

fn app_row(r: &Row<'_>) -> rusqlite::Result<App> {
    Ok(App {
        id: r.get(0)?,
        uid: r.get(1)?,
        name: r.get(2)?,
        created_at: r.get(3)?,
        updated_at: r.get(4)?,
    })
}

fn webhook_row(r: &Row<'_>) -> rusqlite::Result<Webhook> {
    Ok(Webhook {
        id: r.get(0)?,
        app_id: r.get(1)?,
        url: r.get(2)?,
        description: r.get(3)?,
        event_types: r.get(4)?,
        enabled: r.get(5)?,
        disabled_reason: r.get(6)?,
        headers: r.get(7)?,
        raw_payload: r.get(8)?,
        secret: r.get(9)?,
        previous_secret: r.get(10)?,
        previous_secret_expires_at: r.get(11)?,
        created_at: r.get(12)?,
        updated_at: r.get(13)?,
        plugin: AttachedPlugin::from_columns(r.get(14)?, r.get(15)?),
    })
}

fn plugin_row(r: &Row<'_>) -> rusqlite::Result<Plugin> {
    Ok(Plugin {
        id: r.get(0)?,
        name: r.get(1)?,
        version: r.get(2)?,
        sha256: r.get(3)?,
        size: r.get(4)?,
        created_at: r.get(5)?,
    })
}

fn event_row(r: &Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event {
        id: r.get(0)?,
        app_id: r.get(1)?,
        event_type: r.get(2)?,
        payload: r.get(3)?,
        created_at: r.get(4)?,
    })
}

fn delivery_row(r: &Row<'_>) -> rusqlite::Result<Delivery> {
    Ok(Delivery {
        id: r.get(0)?,
        app_id: r.get(1)?,
        event_id: r.get(2)?,
        webhook_id: r.get(3)?,
        status: r.get(4)?,
        attempts: r.get(5)?,
        due_at: r.get(6)?,
        last_attempt_at: r.get(7)?,
        last_status_code: r.get(8)?,
        last_error: r.get(9)?,
        created_at: r.get(10)?,
        updated_at: r.get(11)?,
        skip_reason: r.get(12)?,
    })
}

fn attempt_row(r: &Row<'_>) -> rusqlite::Result<Attempt> {
    Ok(Attempt {
        id: r.get(0)?,
        attempt: r.get(1)?,
        started_at: r.get(2)?,
        duration_ms: r.get(3)?,
        outcome: r.get(4)?,
        status_code: r.get(5)?,
        response_body: r.get(6)?,
        error: r.get(7)?,
        plugin_error: r.get(8)?,
    })
}

fn claimed_row(r: &Row<'_>) -> rusqlite::Result<ClaimedDelivery> {
    Ok(ClaimedDelivery {
        id: r.get(0)?,
        claim_token: r.get(1)?,
        attempts: r.get(2)?,
        event_id: r.get(3)?,
        event_type: r.get(4)?,
        payload: r.get(5)?,
        event_created_at: r.get(6)?,
        webhook_id: r.get(7)?,
        url: r.get(8)?,
        enabled: r.get(9)?,
        disabled_reason: r.get(10)?,
        headers: r.get(11)?,
        raw_payload: r.get(12)?,
        secret: r.get(13)?,
        previous_secret: r.get(14)?,
        previous_secret_expires_at: r.get(15)?,
        app_id: r.get(16)?,
        app_uid: r.get(17)?,
        plugin: AttachedPlugin::from_columns(r.get(18)?, r.get(19)?)
            .zip(r.get::<_, Option<String>>(20)?),
    })
}

fn found(rows: usize) -> StoreResult<()> {
    if rows == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(())
    }
}

fn foreign_key(error: rusqlite::Error, message: &str) -> StoreError {
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => StoreError::Conflict(message.to_owned()),
        _ => StoreError::Sqlite(error),
    }
}

fn unique_conflict(error: rusqlite::Error, message: &str) -> StoreError {
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => StoreError::Conflict(message.to_owned()),
        _ => StoreError::Sqlite(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        (SqliteStore::open(&url).await.unwrap(), dir)
    }

    /// The claim must walk the partial index in due order, not scan the
    /// table: with a million finished deliveries a scan would stall claims.
    #[tokio::test]
    async fn the_claim_query_uses_the_due_index() {
        let (store, _dir) = store().await;
        let plan: Vec<String> = store
            .readers
            .read(|c| {
                collect(
                    c,
                    "EXPLAIN QUERY PLAN SELECT id FROM deliveries WHERE due_at IS NOT NULL AND due_at <= ?1 \
                     ORDER BY due_at LIMIT ?2",
                    params![0, 10],
                    |r| r.get::<_, String>(3),
                )
            })
            .await
            .unwrap();
        let plan = plan.join("; ");
        assert!(plan.contains("USING INDEX deliveries_due"), "{plan}");
        assert!(
            !plan.contains("TEMP B-TREE"),
            "sorts instead of walking the index: {plan}"
        );
    }

    /// The hottest statements stay prepared: without the planner stability
    /// setting SQLite re-prepared both on every run (a third of the
    /// writer's CPU time in a profile).
    #[tokio::test]
    async fn hot_statements_are_not_prepared_again() {
        let (store, _dir) = store().await;
        let app = store.create_app("app", None).await.unwrap();
        for i in 0..3 {
            let event = NewEvent {
                app_id: app.id.clone(),
                id: format!("evt_{i}"),
                event_type: "a.b".into(),
                payload: "{}".into(),
                idempotency_key: None,
                dedup_since: 0,
            };
            store.publish(event).await.unwrap();
            store.claim_due(10, Duration::from_secs(30)).await.unwrap();
        }
        let reprepared = store
            .writer
            .write(|c| {
                let claim = c.prepare_cached(CLAIM_SQL)?;
                let subscribed = c.prepare_cached(SUBSCRIBED_SQL)?;
                Ok([claim, subscribed].map(|s| s.get_status(rusqlite::StatementStatus::RePrepare)))
            })
            .await
            .unwrap();
        assert_eq!(reprepared, [0, 0]);
    }

    /// Writes that run in one group commit fail alone: a unique violation
    /// rolls back its own savepoint, not its neighbours.
    #[tokio::test]
    async fn a_failing_write_does_not_undo_its_group() {
        let (store, _dir) = store().await;
        let mut tasks = Vec::new();
        for i in 0..40 {
            let store = store.clone();
            let uid = if i % 2 == 0 {
                "same".to_owned()
            } else {
                format!("uid-{i}")
            };
            tasks.push(tokio::spawn(async move {
                store.create_app("app", Some(&uid)).await
            }));
        }
        let mut created = 0;
        let mut conflicts = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => created += 1,
                Err(StoreError::Conflict(_)) => conflicts += 1,
                Err(other) => panic!("{other}"),
            }
        }
        assert_eq!((created, conflicts), (21, 19));
        let page = PageRequest {
            cursor: None,
            limit: 100,
        };
        assert_eq!(store.list_apps(&page).await.unwrap().len(), 21);
    }

    #[tokio::test]
    async fn reopening_keeps_data_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        store.create_app("kept", Some("kept")).await.unwrap();
        store.close().await;
        let store = SqliteStore::open(&url).await.unwrap();
        assert!(store.find_app("kept").await.unwrap().is_some());
    }
}
