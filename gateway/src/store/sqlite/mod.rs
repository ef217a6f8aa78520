//! The SQLite backend: one embedded database file, written through the
//! group-commit writer of [`connection`], read through its reader pool.

mod connection;
mod lanes;
mod migrate;
mod ordering;

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, Params, Row, params};

use self::connection::{Durability, Readers, Writer};
use super::rows::{self, *};
use super::rules::{self, KeySeen};
use super::{StoreError, StoreResult, found};
use crate::clock::{Millis, now_ms};
use crate::domain::lane::{BreakerPolicy, LaneState};
use crate::domain::ordering::OrderingKey;
use crate::domain::{
    App, AppId, Attempt, AttemptId, AttemptRecord, ClaimRequest, ClaimedDelivery, Delivery,
    DeliveryId, DeliveryStatus, Event, EventId, HeldClaim, InFlightLimit, KeyId, NewEvent,
    NewPlugin, PageRequest, Plugin, PluginCode, PluginId, Published, QueueStats, Queued, RateLimit,
    RetrySchedule, Upload, Webhook, WebhookEffect, WebhookFields, WebhookId,
};

/// An app's enabled webhooks, for fan-out: (app id).
const SUBSCRIBED_SQL: &str =
    "SELECT id, event_types FROM webhooks WHERE app_id = ? AND enabled ORDER BY id";

#[derive(Clone)]
pub struct SqliteStore {
    writer: Writer,
    readers: Readers,
    breaker: BreakerPolicy,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store(sqlite)")
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database and applies migrations.
    pub async fn open(database_url: &str, breaker: BreakerPolicy) -> StoreResult<Self> {
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
            breaker,
        })
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
                first(c, "SELECT value FROM settings WHERE key = ?", [&key], |r| {
                    r.value("value")
                })
            })
            .await
    }

    pub async fn setting_insert_if_absent(&self, key: &str, value: &str) -> StoreResult<String> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.writer
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                )?
                .execute([&key, &value])?;
                let value = first(c, "SELECT value FROM settings WHERE key = ?", [&key], |r| {
                    r.value("value")
                })?;
                value.ok_or(StoreError::NotFound)
            })
            .await
    }

    // ---- apps and keys -------------------------------------------------

    pub async fn create_app(&self, name: &str, uid: Option<&str>) -> StoreResult<App> {
        let app = App::new(name, uid, now_ms());
        self.writer
            .write(move |c| {
                c.prepare_cached("INSERT INTO apps (id, uid, name, created_at, updated_at) VALUES (?, ?, ?, ?, ?)")?
                    .execute(params![app.id.as_str(), app.uid, app.name, app.created_at, app.updated_at])
                    .map_err(|e| on_constraint(e, StoreError::UidTaken))?;
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
                collect(c, &sql, params![cursor, limit], |r| rows::app(r))
            })
            .await
    }

    pub async fn find_app(&self, id_or_uid: &str) -> StoreResult<Option<App>> {
        let key = id_or_uid.to_owned();
        self.readers
            .read(move |c| {
                let sql =
                    format!("SELECT {APP_COLUMNS} FROM apps WHERE id = ?1 OR uid = ?1 LIMIT 1");
                first(c, &sql, [&key], |r| rows::app(r))
            })
            .await
    }

    pub async fn update_app(&self, id: &AppId, name: &str, uid: Option<&str>) -> StoreResult<App> {
        let (id, name, uid) = (id.clone(), name.to_owned(), uid.map(str::to_owned));
        self.writer
            .write(move |c| {
                let sql = format!("UPDATE apps SET name = ?, uid = ?, updated_at = ? WHERE id = ? RETURNING {APP_COLUMNS}");
                first(c, &sql, params![name, uid, now_ms(), id.as_str()], |r| rows::app(r))
                    .map_err(|e| match e {
                        StoreError::Sqlite(e) => on_constraint(e, StoreError::UidTaken),
                        other => other,
                    })?
                    .ok_or(StoreError::NotFound)
            })
            .await
    }

    pub async fn delete_app(&self, id: &AppId) -> StoreResult<()> {
        let id = id.clone();
        self.writer
            .write(move |c| execute_one(c, "DELETE FROM apps WHERE id = ?", [id.as_str()]))
            .await
    }

    pub async fn create_app_key(&self, app_id: &AppId, key_hash: &str) -> StoreResult<KeyId> {
        let (app_id, key_hash) = (app_id.clone(), key_hash.to_owned());
        self.writer
            .write(move |c| {
                let id = KeyId::new();
                c.prepare_cached(
                    "INSERT INTO app_keys (id, app_id, key_hash, created_at) VALUES (?, ?, ?, ?)",
                )?
                .execute(params![
                    id.as_str(),
                    app_id.as_str(),
                    key_hash,
                    now_ms()
                ])?;
                Ok(id)
            })
            .await
    }

    pub async fn delete_app_key(&self, app_id: &AppId, key_id: &KeyId) -> StoreResult<()> {
        let (app_id, key_id) = (app_id.clone(), key_id.clone());
        self.writer
            .write(move |c| {
                execute_one(
                    c,
                    "DELETE FROM app_keys WHERE id = ? AND app_id = ?",
                    [key_id.as_str(), app_id.as_str()],
                )
            })
            .await
    }

    pub async fn app_for_key(&self, key_hash: &str) -> StoreResult<Option<App>> {
        let key_hash = key_hash.to_owned();
        self.readers
            .read(move |c| {
                let sql = "SELECT apps.id, apps.uid, apps.name, apps.created_at, apps.updated_at \
                           FROM app_keys JOIN apps ON apps.id = app_keys.app_id WHERE key_hash = ?";
                first(c, sql, [&key_hash], |r| rows::app(r))
            })
            .await
    }

    // ---- webhooks ------------------------------------------------------

    pub async fn create_webhook(
        &self,
        app_id: &AppId,
        fields: &WebhookFields,
        secret: &str,
    ) -> StoreResult<Webhook> {
        let (app_id, f, secret) = (app_id.clone(), fields.clone(), secret.to_owned());
        self.writer
            .write(move |c| {
                let now = now_ms();
                let id = WebhookId::new();
                c.prepare_cached(
                    "INSERT INTO webhooks (id, app_id, url, description, event_types, enabled, headers, raw_payload, \
                     secret, created_at, updated_at, plugin_id, plugin_config, max_in_flight, rate_limit, \
                     rate_limit_burst, retry_schedule) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )?
                .execute(params![
                    id.as_str(),
                    app_id.as_str(),
                    f.url,
                    f.description,
                    f.event_types.to_stored(),
                    f.enabled,
                    f.headers.to_stored(),
                    f.raw_payload,
                    secret,
                    now,
                    now,
                    f.plugin.as_ref().map(|p| p.id.as_str()),
                    f.plugin.as_ref().map(|p| &p.config),
                    f.max_in_flight.map(InFlightLimit::get),
                    f.rate_limit.map(RateLimit::per_second),
                    f.rate_limit.map(RateLimit::burst),
                    f.retry_schedule.as_ref().map(RetrySchedule::to_text)
                ])
                .map_err(|e| on_constraint(e, StoreError::PluginMissing))?;
                c.prepare_cached(lanes::CREATE)?.execute([id.as_str()])?;
                webhook_by_id(c, &app_id, &id)?.ok_or(StoreError::NotFound)
            })
            .await
    }

    pub async fn list_webhooks(
        &self,
        app_id: &AppId,
        page: &PageRequest,
    ) -> StoreResult<Vec<Webhook>> {
        let (app_id, cursor, limit) = (
            app_id.clone(),
            page.cursor.clone().unwrap_or_default(),
            page.limit,
        );
        self.readers
            .read(move |c| {
                let sql = format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE app_id = ? AND id > ? ORDER BY id LIMIT ?"
                );
                collect(c, &sql, params![app_id.as_str(), cursor, limit], |r| rows::webhook(r))
            })
            .await
    }

    pub async fn webhook(&self, app_id: &AppId, id: &WebhookId) -> StoreResult<Option<Webhook>> {
        let (app_id, id) = (app_id.clone(), id.clone());
        self.readers
            .read(move |c| webhook_by_id(c, &app_id, &id))
            .await
    }

    pub async fn update_webhook(
        &self,
        app_id: &AppId,
        id: &WebhookId,
        fields: &WebhookFields,
    ) -> StoreResult<Webhook> {
        let (app_id, id, f) = (app_id.clone(), id.clone(), fields.clone());
        self.writer
            .write(move |c| {
                let changed = c
                    .prepare_cached(
                        "UPDATE webhooks SET url = ?1, description = ?2, event_types = ?3, headers = ?4, \
                         raw_payload = ?5, \
                         disabled_reason = CASE WHEN ?6 THEN NULL ELSE disabled_reason END, \
                         failing_since = CASE WHEN ?6 AND NOT enabled THEN NULL ELSE failing_since END, \
                         enabled = ?6, updated_at = ?7, plugin_id = ?10, plugin_config = ?11, max_in_flight = ?12, \
                         rate_limit = ?13, rate_limit_burst = ?14, retry_schedule = ?15 \
                         WHERE app_id = ?8 AND id = ?9",
                    )?
                    .execute(params![
                        f.url,
                        f.description,
                        f.event_types.to_stored(),
                        f.headers.to_stored(),
                        f.raw_payload,
                        f.enabled,
                        now_ms(),
                        app_id.as_str(),
                        id.as_str(),
                        f.plugin.as_ref().map(|p| p.id.as_str()),
                        f.plugin.as_ref().map(|p| &p.config),
                        f.max_in_flight.map(InFlightLimit::get),
                        f.rate_limit.map(RateLimit::per_second),
                        f.rate_limit.map(RateLimit::burst),
                        f.retry_schedule.as_ref().map(RetrySchedule::to_text)
                    ])
                    .map_err(|e| on_constraint(e, StoreError::PluginMissing))?;
                found(changed as u64)?;
                // Its limit may have risen: look at the lane again now.
                lanes::room(c, now_ms(), id.as_str())?;
                webhook_by_id(c, &app_id, &id)?.ok_or(StoreError::NotFound)
            })
            .await
    }

    pub async fn delete_webhook(&self, app_id: &AppId, id: &WebhookId) -> StoreResult<()> {
        let (app_id, id) = (app_id.clone(), id.clone());
        self.writer
            .write(move |c| {
                execute_one(
                    c,
                    "DELETE FROM webhooks WHERE app_id = ? AND id = ?",
                    [app_id.as_str(), id.as_str()],
                )
            })
            .await
    }

    pub async fn rotate_secret(
        &self,
        app_id: &AppId,
        id: &WebhookId,
        secret: &str,
        previous_expires_at: Millis,
    ) -> StoreResult<()> {
        let (app_id, id, secret) = (app_id.clone(), id.clone(), secret.to_owned());
        self.writer
            .write(move |c| {
                execute_one(
                    c,
                    "UPDATE webhooks SET previous_secret = secret, previous_secret_expires_at = ?, secret = ?, \
                     updated_at = ? WHERE app_id = ? AND id = ?",
                    params![previous_expires_at, secret, now_ms(), app_id.as_str(), id.as_str()],
                )
            })
            .await
    }

    // ---- plugins -------------------------------------------------------

    pub async fn create_plugin(&self, new: NewPlugin) -> StoreResult<(Plugin, Upload)> {
        self.writer
            .write(move |c| {
                let sql =
                    format!("SELECT {PLUGIN_COLUMNS} FROM plugins WHERE name = ? AND version = ?");
                if let Some(stored) =
                    first(c, &sql, [&new.name, &new.version], |r| rows::plugin(r))?
                {
                    return rules::existing_upload(stored, &new.sha256);
                }
                let (plugin, wasm) = new.into_plugin(now_ms());
                c.prepare_cached(
                    "INSERT INTO plugins (id, name, version, sha256, size, wasm, created_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?)",
                )?
                .execute(params![
                    plugin.id.as_str(),
                    plugin.name,
                    plugin.version,
                    plugin.sha256,
                    plugin.size,
                    wasm,
                    plugin.created_at
                ])?;
                Ok((plugin, Upload::Created))
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
                collect(c, &sql, params![cursor, limit], |r| rows::plugin(r))
            })
            .await
    }

    pub async fn plugin(&self, id: &PluginId) -> StoreResult<Option<Plugin>> {
        let id = id.clone();
        self.readers
            .read(move |c| {
                let sql = format!("SELECT {PLUGIN_COLUMNS} FROM plugins WHERE id = ?");
                first(c, &sql, [id.as_str()], |r| rows::plugin(r))
            })
            .await
    }

    pub async fn plugin_code(&self, id: &PluginId) -> StoreResult<Option<PluginCode>> {
        let id = id.clone();
        self.readers
            .read(move |c| {
                let sql = format!("SELECT {PLUGIN_CODE_COLUMNS} FROM plugins WHERE id = ?");
                first(c, &sql, [id.as_str()], |r| rows::plugin_code(r))
            })
            .await
    }

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

    pub async fn delete_plugin(&self, id: &PluginId) -> StoreResult<()> {
        let id = id.clone();
        self.writer
            .write(move |c| {
                let users: i64 = c
                    .prepare_cached("SELECT COUNT(*) FROM webhooks WHERE plugin_id = ?")?
                    .query_row([id.as_str()], |r| r.get(0))?;
                rules::deletable(users)?;
                execute_one(c, "DELETE FROM plugins WHERE id = ?", [id.as_str()])
            })
            .await
    }

    // ---- events --------------------------------------------------------

    pub async fn publish(&self, event: NewEvent) -> StoreResult<Published> {
        self.writer.write(move |c| publish(c, &event)).await
    }

    pub async fn event(&self, app_id: &AppId, id: &EventId) -> StoreResult<Option<Event>> {
        let (app_id, id) = (app_id.clone(), id.clone());
        self.readers
            .read(move |c| {
                let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE app_id = ? AND id = ?");
                first(c, &sql, [app_id.as_str(), id.as_str()], |r| rows::event(r))
            })
            .await
    }

    // ---- deliveries ----------------------------------------------------

    pub async fn event_deliveries(
        &self,
        app_id: &AppId,
        event_id: &EventId,
    ) -> StoreResult<Vec<Delivery>> {
        let (app_id, event_id) = (app_id.clone(), event_id.clone());
        self.readers
            .read(move |c| {
                let sql = format!(
                    "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE app_id = ? AND event_id = ? ORDER BY id"
                );
                collect(c, &sql, [app_id.as_str(), event_id.as_str()], |r| rows::delivery(r))
            })
            .await
    }

    pub async fn webhook_deliveries(
        &self,
        webhook_id: &WebhookId,
        status: Option<DeliveryStatus>,
        page: &PageRequest,
    ) -> StoreResult<Vec<Delivery>> {
        let (webhook_id, cursor, limit) = (
            webhook_id.clone(),
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
                let params = params![webhook_id.as_str(), cursor, status, limit];
                collect(c, &sql, params, |r| rows::delivery(r))
            })
            .await
    }

    pub async fn delivery(&self, app_id: &AppId, id: &DeliveryId) -> StoreResult<Option<Delivery>> {
        let (app_id, id) = (app_id.clone(), id.clone());
        self.readers
            .read(move |c| delivery_by_id(c, &app_id, &id))
            .await
    }

    pub async fn attempts(&self, delivery_id: &DeliveryId) -> StoreResult<Vec<Attempt>> {
        let delivery_id = delivery_id.clone();
        self.readers
            .read(move |c| {
                let sql = format!(
                    "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE delivery_id = ? ORDER BY attempt, started_at"
                );
                collect(c, &sql, [delivery_id.as_str()], |r| rows::attempt(r))
            })
            .await
    }

    pub async fn retry_delivery(&self, app_id: &AppId, id: &DeliveryId) -> StoreResult<Delivery> {
        let (app_id, id) = (app_id.clone(), id.clone());
        self.writer
            .write(move |c| {
                let now = now_ms();
                let changed = c
                    .prepare_cached(&format!(
                        "UPDATE deliveries SET status = 'pending', due_at = ?, claim_token = NULL, updated_at = ? \
                         WHERE app_id = ? AND id = ? AND status <> 'sending' AND {}",
                        rules::RETRIABLE
                    ))?
                    .execute(params![now, now, app_id.as_str(), id.as_str()])?;
                let delivery = delivery_by_id(c, &app_id, &id)?.ok_or(StoreError::NotFound)?;
                if changed == 0 {
                    return rules::unretried(delivery);
                }
                lanes::wake(c, now, [delivery.webhook_id.as_str()])?;
                Ok(delivery)
            })
            .await
    }

    pub async fn replay_event(
        &self,
        event: &Event,
        webhook: Option<&WebhookId>,
    ) -> StoreResult<Vec<Queued>> {
        let (event, webhook) = (event.clone(), webhook.cloned());
        self.writer
            .write(move |c| {
                let now = now_ms();
                let app_id = event.app_id.as_str();
                let webhooks = match webhook {
                    Some(webhook) => vec![webhook],
                    None => {
                        let webhooks = collect(c, SUBSCRIBED_SQL, [app_id], |r| rows::subscription(r))?;
                        rules::subscribed(webhooks, &event.event_type)
                    }
                };
                let mut insert = c.prepare_cached(
                    "INSERT INTO deliveries (id, app_id, event_id, webhook_id, status, due_at, created_at, \
                     updated_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
                )?;
                let mut deliveries = Vec::with_capacity(webhooks.len());
                for webhook_id in webhooks {
                    let id = DeliveryId::new();
                    insert.execute(params![
                        id.as_str(),
                        app_id,
                        event.id.as_str(),
                        webhook_id.as_str(),
                        now,
                        now,
                        now
                    ])?;
                    deliveries.push(Queued { id, webhook_id });
                }
                lanes::wake(c, now, deliveries.iter().map(|d| d.webhook_id.as_str()))?;
                Ok(deliveries)
            })
            .await
    }

    // ---- the queue -----------------------------------------------------

    /// One writer makes every claim, so two workers never hold the same
    /// delivery; a worker that dies loses it when the lease runs out.
    pub async fn claim_due(&self, request: ClaimRequest) -> StoreResult<Vec<ClaimedDelivery>> {
        self.writer
            .write_with(Durability::Relaxed, move |c| {
                let ids = lanes::claim(c, &request, now_ms())?;
                let sql = format!(
                    "SELECT {CLAIMED_COLUMNS} FROM deliveries d {CLAIMED_JOINS} WHERE d.id = ?"
                );
                let mut claimed = Vec::with_capacity(ids.len());
                for id in ids {
                    claimed.extend(first(c, &sql, [&id], |r| rows::claimed(r))?);
                }
                Ok(claimed)
            })
            .await
    }

    /// A result whose claim was lost (the lease ran out and another worker
    /// took the delivery) is dropped: the current holder owns it now.
    pub async fn record_attempts(&self, records: Arc<Vec<AttemptRecord>>) -> StoreResult<()> {
        let breaker = self.breaker;
        self.writer
            .write_with(Durability::Relaxed, move |c| {
                let mut applied = Vec::with_capacity(records.len());
                for record in records.iter() {
                    if record_attempt(c, record)? {
                        applied.push(record);
                    }
                }
                let now = now_ms();
                ordering::release_next(c, applied.iter().copied(), now)?;
                lanes::record(c, applied, now, &breaker)
            })
            .await
    }

    pub async fn release(&self, claims: Vec<HeldClaim>) -> StoreResult<()> {
        self.writer
            .write_with(Durability::Relaxed, move |c| {
                let now = now_ms();
                let mut release = c.prepare_cached(
                    "UPDATE deliveries SET status = CASE WHEN attempts = 0 THEN 'pending' ELSE 'failed' END, \
                     due_at = ?, claim_token = NULL, updated_at = ? WHERE id = ? AND claim_token = ? \
                     RETURNING webhook_id",
                )?;
                for claim in &claims {
                    let params = params![now, now, claim.delivery_id.as_str(), claim.token.as_str()];
                    let webhook: Option<String> = release.query_row(params, |r| r.get(0)).optional()?;
                    if let Some(webhook) = webhook {
                        lanes::room(c, now, &webhook)?;
                    }
                }
                Ok(())
            })
            .await
    }

    pub async fn next_due_at(&self, now: Millis) -> StoreResult<Option<Millis>> {
        self.readers
            .read(move |c| {
                let next = c
                    .prepare_cached(lanes::NEXT_DUE)?
                    .query_row([now], |r| r.get(0))?;
                Ok(next)
            })
            .await
    }

    pub async fn lanes(&self, webhooks: &[WebhookId]) -> StoreResult<Vec<(WebhookId, LaneState)>> {
        let ids =
            serde_json::to_string(webhooks).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.readers
            .read(move |c| collect(c, &lanes::BREAKERS, [&ids], |r| rows::lane_state(r)))
            .await
    }

    pub async fn wake_stranded_lanes(&self) -> StoreResult<u64> {
        self.writer
            .write_with(Durability::Relaxed, |c| lanes::sweep(c, now_ms()))
            .await
    }

    pub async fn queue_stats(&self, now: Millis) -> StoreResult<QueueStats> {
        self.readers
            .read(move |c| {
                let sql = "SELECT COALESCE(SUM(status <> 'sending'), 0), \
                     COALESCE(SUM(status <> 'sending' AND due_at <= ?1), 0), \
                     COALESCE(SUM(status = 'sending'), 0), \
                     MIN(CASE WHEN status <> 'sending' THEN due_at END) \
                     FROM deliveries WHERE due_at IS NOT NULL";
                let (open, held): (i64, i64) = c
                    .prepare_cached(lanes::OPEN_BREAKERS)?
                    .query_row([now], |r| Ok((r.get(0)?, r.get(1)?)))?;
                let stats = c.prepare_cached(sql)?.query_row([now], |r| {
                    Ok(QueueStats {
                        pending: r.get::<_, i64>(0)? as u64,
                        due: r.get::<_, i64>(1)? as u64,
                        in_flight: r.get::<_, i64>(2)? as u64,
                        oldest_due_at: r.get(3)?,
                        breakers_open: held as u64,
                        breakers_half_open: (open - held) as u64,
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
/// keys cascade): (cutoff, limit). A delivery with a due time, or
/// `pending` without one (waiting for its key), is unfinished.
const PURGE_SQL: &str = "DELETE FROM events WHERE rowid IN ( \
     SELECT e.rowid FROM events e WHERE e.created_at < ?1 AND NOT EXISTS ( \
         SELECT 1 FROM deliveries d WHERE d.app_id = e.app_id AND d.event_id = e.id \
         AND (d.due_at IS NOT NULL OR d.status = 'pending' OR d.updated_at >= ?1)) \
     ORDER BY e.created_at LIMIT ?2)";

fn publish(c: &Connection, event: &NewEvent) -> StoreResult<Published> {
    let app_id = event.app_id.as_str();
    if let Some(first) = repeat_of(c, event)? {
        let deliveries = collect(
            c,
            "SELECT id, webhook_id FROM deliveries WHERE app_id = ? AND event_id = ? ORDER BY id",
            [app_id, first.as_str()],
            queued,
        )?;
        return Ok(Published {
            event_id: first,
            deliveries,
            replayed: true,
        });
    }
    let now = now_ms();
    let key = event.ordering_key.as_ref();
    c.prepare_cached(
        "INSERT INTO events (app_id, id, event_type, payload, idempotency_key, ordering_key, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )?
    .execute(params![
        app_id,
        event.id.as_str(),
        event.event_type.as_str(),
        event.payload,
        event.idempotency_key,
        key.map(OrderingKey::as_str),
        now
    ])?;
    let mut insert = c.prepare_cached(
        "INSERT INTO deliveries (id, app_id, event_id, webhook_id, status, due_at, created_at, updated_at, \
         ordering_key, ordering_seq) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)",
    )?;
    let webhooks = collect(c, SUBSCRIBED_SQL, [app_id], |r| rows::subscription(r))?;
    let subscribed = rules::subscribed(webhooks, event.event_type.as_str());
    let mut due = Vec::with_capacity(subscribed.len());
    let mut deliveries = Vec::with_capacity(subscribed.len());
    for webhook_id in subscribed {
        let id = DeliveryId::new();
        let place = match key {
            Some(key) => Some(ordering::place(c, webhook_id.as_str(), key, now)?),
            None => None,
        };
        let due_at = place.map_or(Some(now), |p| p.due_at);
        insert.execute(params![
            id.as_str(),
            app_id,
            event.id.as_str(),
            webhook_id.as_str(),
            due_at,
            now,
            now,
            key.map(OrderingKey::as_str),
            place.map(|p| p.seq)
        ])?;
        due.push(due_at.is_some());
        deliveries.push(Queued { id, webhook_id });
    }
    let woken = deliveries.iter().zip(&due).filter(|(_, due)| **due);
    lanes::wake(c, now, woken.map(|(d, _)| d.webhook_id.as_str()))?;
    Ok(Published {
        event_id: event.id.clone(),
        deliveries,
        replayed: false,
    })
}

fn queued(r: &Row<'_>) -> StoreResult<Queued> {
    Ok(Queued {
        id: r.text("id")?,
        webhook_id: r.text("webhook_id")?,
    })
}

/// The id of the event this one repeats, if it is a repeat within the
/// window (see [`rules::key_seen`] and [`rules::id_seen`]).
fn repeat_of(c: &Connection, event: &NewEvent) -> StoreResult<Option<EventId>> {
    let app_id = event.app_id.as_str();
    if let Some(key) = &event.idempotency_key {
        let earlier = first(
            c,
            "SELECT id, created_at FROM events WHERE app_id = ? AND idempotency_key = ?",
            [app_id, key],
            |r| Ok((r.text("id")?, r.value("created_at")?)),
        )?;
        match rules::key_seen(event, earlier) {
            KeySeen::Repeat(id) => return Ok(Some(id)),
            KeySeen::Expired(id) => {
                c.prepare_cached(
                    "UPDATE events SET idempotency_key = NULL WHERE app_id = ? AND id = ?",
                )?
                .execute([app_id, id.as_str()])?;
            }
            KeySeen::Unused => {}
        }
    }
    let earlier = first(
        c,
        "SELECT created_at FROM events WHERE app_id = ? AND id = ?",
        [app_id, event.id.as_str()],
        |r| r.value("created_at"),
    )?;
    rules::id_seen(event, earlier)
}

/// Applies one record; `false` when its claim was lost and nothing changed.
fn record_attempt(c: &Connection, record: &AttemptRecord) -> StoreResult<bool> {
    let attempt = record.attempt.as_ref();
    let next = &record.next;
    let changed = c
        .prepare_cached(
            "UPDATE deliveries SET status = ?, due_at = ?, claim_token = NULL, attempts = attempts + ?, \
             last_attempt_at = COALESCE(?, last_attempt_at), last_status_code = ?, last_error = ?, updated_at = ?, \
             skip_reason = ? WHERE id = ? AND claim_token = ?",
        )?
        .execute(params![
            next.status().as_str(),
            next.due_at(),
            attempt.map_or(0, |_| 1),
            attempt.map(|a| a.started_at),
            attempt.and_then(|a| a.status_code),
            next.error(),
            record.now,
            next.skip_reason(),
            record.delivery_id.as_str(),
            record.claim_token.as_str()
        ])?;
    if changed == 0 {
        return Ok(false);
    }
    if let Some(a) = attempt {
        c.prepare_cached(
            "INSERT INTO attempts (id, delivery_id, attempt, started_at, duration_ms, outcome, status_code, \
             response_body, error, plugin_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )?
        .execute(params![
            AttemptId::new().as_str(),
            record.delivery_id.as_str(),
            a.number,
            a.started_at,
            a.duration_ms,
            a.outcome.as_str(),
            a.status_code,
            a.response_body,
            a.error,
            a.plugin_error.map(|p| p.as_str())
        ])?;
    }
    apply_webhook_effect(c, &record.webhook_id, &record.webhook, record.now)?;
    Ok(true)
}

fn apply_webhook_effect(
    c: &Connection,
    webhook_id: &WebhookId,
    effect: &WebhookEffect,
    now: Millis,
) -> StoreResult<()> {
    let webhook_id = webhook_id.as_str();
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

fn webhook_by_id(c: &Connection, app_id: &AppId, id: &WebhookId) -> StoreResult<Option<Webhook>> {
    let sql = format!("SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE app_id = ? AND id = ?");
    first(c, &sql, [app_id.as_str(), id.as_str()], |r| {
        rows::webhook(r)
    })
}

fn delivery_by_id(
    c: &Connection,
    app_id: &AppId,
    id: &DeliveryId,
) -> StoreResult<Option<Delivery>> {
    let sql = format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE app_id = ? AND id = ?");
    first(c, &sql, [app_id.as_str(), id.as_str()], |r| {
        rows::delivery(r)
    })
}

/// Runs a query and maps every row.
fn collect<T>(
    c: &Connection,
    sql: &str,
    params: impl Params,
    map: impl Fn(&Row<'_>) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let mut statement = c.prepare_cached(sql)?;
    let mut rows = statement.query(params)?;
    let mut mapped = Vec::new();
    while let Some(row) = rows.next()? {
        mapped.push(map(row)?);
    }
    Ok(mapped)
}

/// Runs a query and maps its first row, if any.
fn first<T>(
    c: &Connection,
    sql: &str,
    params: impl Params,
    map: impl Fn(&Row<'_>) -> StoreResult<T>,
) -> StoreResult<Option<T>> {
    let mut statement = c.prepare_cached(sql)?;
    let mut rows = statement.query(params)?;
    rows.next()?.map(map).transpose()
}

/// Runs a statement that must change exactly the row it names.
fn execute_one(c: &Connection, sql: &str, params: impl Params) -> StoreResult<()> {
    found(c.prepare_cached(sql)?.execute(params)? as u64)
}

/// A constraint the caller's input violated, as what it means.
fn on_constraint(error: rusqlite::Error, meaning: StoreError) -> StoreError {
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => meaning,
        _ => error.into(),
    }
}
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::share::Allotment;

    fn request() -> ClaimRequest {
        ClaimRequest {
            limit: 10,
            lease: Duration::from_secs(30),
            default_max_in_flight: InFlightLimit::parse(8).unwrap(),
            apps: Allotment::unlimited(),
        }
    }

    async fn store() -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        (
            SqliteStore::open(&url, BreakerPolicy::default())
                .await
                .unwrap(),
            dir,
        )
    }

    /// Every step of a claim walks a partial index in order, never the
    /// table: with a million finished deliveries a scan would stall claims.
    #[tokio::test]
    async fn the_claim_walks_indexes_in_order() {
        let (store, _dir) = store().await;
        let steps = [
            (lanes::DUE, "webhook_lanes_due"),
            (lanes::LIVE, "deliveries_in_flight"),
            (lanes::TAKE, "deliveries_webhook_due"),
            (lanes::PARK, "deliveries_in_flight"),
            (lanes::NEXT, "deliveries_webhook_due"),
        ];
        for (sql, index) in steps {
            let explain = format!("EXPLAIN QUERY PLAN {sql}");
            let plan: Vec<String> = store
                .readers
                .read(move |c| {
                    // The planner's stability guarantee makes the plan the
                    // same whatever is bound.
                    let n = c.prepare(&explain)?.parameter_count();
                    let nulls = std::iter::repeat_n(rusqlite::types::Null, n);
                    let params = rusqlite::params_from_iter(nulls);
                    collect(c, &explain, params, |r| Ok(r.get::<_, String>(3)?))
                })
                .await
                .unwrap();
            let plan = plan.join("; ");
            assert!(plan.contains(index), "{sql}: {plan}");
            assert!(
                !plan.contains("TEMP B-TREE"),
                "sorts instead of walking the index: {plan}"
            );
        }
    }

    /// The hottest statements stay prepared: without the planner stability
    /// setting SQLite re-prepared both on every run (a third of the
    /// writer's CPU time in a profile).
    #[tokio::test]
    async fn hot_statements_are_not_prepared_again() {
        let (store, _dir) = store().await;
        let app = store.create_app("app", None).await.unwrap();
        let fields = WebhookFields {
            url: "https://example.com/hooks".into(),
            description: String::new(),
            event_types: crate::domain::EventTypeFilter::parse(None).unwrap(),
            enabled: true,
            headers: Default::default(),
            raw_payload: false,
            max_in_flight: None,
            rate_limit: None,
            retry_schedule: None,
            plugin: None,
        };
        store
            .create_webhook(&app.id, &fields, "whsec_x")
            .await
            .unwrap();
        for i in 0..3 {
            let event = NewEvent {
                app_id: app.id.clone(),
                id: EventId::from(format!("evt_{i}")),
                event_type: crate::domain::EventType::parse("a.b").unwrap(),
                payload: "{}".into(),
                idempotency_key: None,
                ordering_key: None,
                dedup_since: 0,
            };
            store.publish(event).await.unwrap();
            store.claim_due(request()).await.unwrap();
        }
        let reprepared = store
            .writer
            .write(|c| {
                let statements = [
                    lanes::DUE,
                    lanes::LIVE,
                    lanes::TAKE,
                    SUBSCRIBED_SQL,
                    &lanes::WAKE,
                ]
                .map(|sql| c.prepare_cached(sql));
                let mut reprepared = Vec::new();
                for statement in statements {
                    reprepared.push(statement?.get_status(rusqlite::StatementStatus::RePrepare));
                }
                Ok(reprepared)
            })
            .await
            .unwrap();
        assert_eq!(reprepared, [0; 5]);
    }

    /// Claims and attempt records commit on NORMAL, everything else on
    /// FULL.
    #[tokio::test]
    async fn queue_bookkeeping_commits_without_the_fsync_and_the_rest_with_it() {
        let (store, _dir) = store().await;
        let synchronous = |c: &Connection| Ok(c.query_row("PRAGMA synchronous", [], |r| r.get(0))?);
        let relaxed: i64 = store
            .writer
            .write_with(Durability::Relaxed, synchronous)
            .await
            .unwrap();
        let durable: i64 = store.writer.write(synchronous).await.unwrap();
        // 1 is NORMAL (no fsync on commit in WAL mode), 2 is FULL.
        assert_eq!((relaxed, durable), (1, 2));
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
                Err(StoreError::UidTaken) => conflicts += 1,
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
        let store = SqliteStore::open(&url, BreakerPolicy::default())
            .await
            .unwrap();
        store.create_app("kept", Some("kept")).await.unwrap();
        store.close().await;
        let store = SqliteStore::open(&url, BreakerPolicy::default())
            .await
            .unwrap();
        assert!(store.find_app("kept").await.unwrap().is_some());
    }
}
