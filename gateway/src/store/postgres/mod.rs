//! The PostgreSQL backend: several gateway processes share one database as
//! their queue. Claims take due rows with `FOR UPDATE SKIP LOCKED`, so
//! workers in different processes never wait on, or hold, the same delivery;
//! batches travel as arrays, unnested on the server, so a batch of records
//! is a few statements, not a round trip each.

mod migrate;

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Row};

use super::rows::{self, *};
use super::rules::{self, KeySeen};
use super::{StoreError, StoreResult, found};
use crate::clock::{Millis, millis, now_ms};
use crate::domain::pacing;
use crate::domain::{
    App, AppId, Attempt, AttemptId, AttemptRecord, AttemptRow, ClaimRequest, ClaimToken,
    ClaimedDelivery, Delivery, DeliveryId, DeliveryStatus, Event, EventId, HeldClaim, KeyId,
    NewEvent, NewPlugin, PageRequest, Plugin, PluginCode, PluginId, Published, QueueStats, Queued,
    Upload, Webhook, WebhookEffect, WebhookFields, WebhookId,
};

/// Lanes with due work no other worker is claiming from, oldest first,
/// with their in-flight limits as their streaks allow
/// (`pacing::in_flight`): (now, most lanes, default limit, failures to
/// pace, first in flight).
const LANES_SQL: &str = "SELECT l.webhook_id, CASE WHEN l.streak <= -$4 THEN 1 \
     ELSE LEAST(COALESCE(w.max_in_flight, $3), $5::bigint << LEAST(GREATEST(l.streak, 0), 16)::int) END \
     FROM webhook_lanes l JOIN webhooks w ON w.id = l.webhook_id \
     WHERE l.next_due_at IS NOT NULL AND l.next_due_at <= $1 \
     ORDER BY l.next_due_at LIMIT $2 FOR UPDATE OF l SKIP LOCKED";
/// The claim from locked lanes, ending in `claimed` (the leased
/// deliveries): (now, most deliveries, lanes, their limits, lease end,
/// token, recheck time). A lane left with room is due again at the
/// recheck time ([`EMPTIED_LANE_RECHECK`]). The deliveries' own locks are
/// skipped, never waited for, and a lease is set only where the row is
/// still due when it is written. Each lane offers at most its part of
/// the claim (the claim's size over the lanes', at least one): every row
/// offered is locked, and locking eight from each of 64 lanes to keep 64
/// cost 7 of a claim's 10 ms. The lease is written to the rows `due`
/// locked, found by their `ctid` (a TID scan; locked by this statement,
/// they cannot move before it writes them). Joined by id, the planner
/// guessed `due` at the whole limit and scanned the table with a hash
/// join (5 of a claim's 9 ms with 10,000 queued); matched against an
/// array of ids, a table growing under publishing was planned worse
/// still.
const CLAIM_SQL: &str = "WITH lanes AS ( \
         SELECT * FROM UNNEST($3::text[], $4::bigint[]) AS l(webhook_id, max_in_flight)), \
     room AS ( \
         SELECT lanes.webhook_id, lanes.max_in_flight - ( \
             SELECT count(*) FROM deliveries s \
             WHERE s.webhook_id = lanes.webhook_id AND s.status = 'sending' AND s.due_at > $1) AS room \
         FROM lanes), \
     due AS ( \
         SELECT d.id, d.row, d.webhook_id, d.due_at FROM room CROSS JOIN LATERAL ( \
             SELECT x.id, x.ctid AS row, x.webhook_id, x.due_at FROM deliveries x \
             WHERE x.webhook_id = room.webhook_id AND x.due_at IS NOT NULL AND x.due_at <= $1 \
             ORDER BY x.due_at \
             LIMIT GREATEST(LEAST(room.room, GREATEST($2 / (SELECT count(*) FROM lanes), 1)), 0) \
             FOR UPDATE SKIP LOCKED) d \
         ORDER BY d.due_at LIMIT $2), \
     claimed AS ( \
         UPDATE deliveries d SET status = 'sending', due_at = $5, claim_token = $6, updated_at = $1 \
         WHERE d.ctid = ANY(ARRAY(SELECT row FROM due)) AND d.due_at IS NOT NULL AND d.due_at <= $1 \
         RETURNING d.id, d.claim_token, d.attempts, d.app_id, d.event_id, d.webhook_id), \
     taken AS (SELECT webhook_id, count(*) AS n FROM due GROUP BY webhook_id), \
     rescheduled AS ( \
         UPDATE webhook_lanes l SET \
             parked = r.room <= COALESCE(t.n, 0), \
             emptied = t.n IS NULL AND r.room > 0 AND NOT l.emptied, \
             next_due_at = LEAST( \
                 CASE WHEN t.n > 0 THEN $5 END, \
                 CASE WHEN r.room > COALESCE(t.n, 0) AND (t.n > 0 OR NOT l.emptied) THEN $7 END, \
                 CASE WHEN r.room <= COALESCE(t.n, 0) THEN ( \
                     SELECT s.due_at FROM deliveries s \
                     WHERE s.webhook_id = r.webhook_id AND s.status = 'sending' AND s.due_at > $1 \
                     ORDER BY s.due_at LIMIT 1) \
                 ELSE ( \
                     SELECT x.due_at FROM deliveries x \
                     WHERE x.webhook_id = r.webhook_id AND x.due_at IS NOT NULL \
                     AND NOT EXISTS (SELECT 1 FROM due WHERE due.id = x.id) \
                     ORDER BY x.due_at LIMIT 1) END) \
         FROM room r LEFT JOIN taken t ON t.webhook_id = r.webhook_id \
         WHERE l.webhook_id = r.webhook_id)";
/// The CTE `locked` that every statement writing lanes (other than a
/// claim's, which writes only lanes it already holds) starts with: the
/// lanes `filter` picks, locked in webhook order, so that two such
/// statements never wait on each other in a cycle (they did, when each
/// wrote its lanes in the order its plan found them). After waiting for
/// a lock, the filter is read again on the lane as the holder left it.
fn locked_lanes(filter: &str) -> String {
    format!(
        "locked AS (SELECT webhook_id FROM webhook_lanes WHERE {filter} \
         ORDER BY webhook_id FOR NO KEY UPDATE)"
    )
}

/// New work for lanes that are not at their limit, in a publish's
/// transaction: (now, webhooks). It leaves a lane that is due or full
/// alone, and so neither waits for nor takes its lock: a publish holding
/// every lane it touches until its commit (a WAL flush) would make claims
/// skip a busy lane while anyone publishes to it, and publishes to one
/// endpoint would queue on its lane. A claim running meanwhile may miss
/// the new work; see [`EMPTIED_LANE_RECHECK`].
const WAKE_FOR_WORK: &str = "NOT parked AND (next_due_at IS NULL OR next_due_at > $1 OR emptied)";
static WAKE_FOR_WORK_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {} UPDATE webhook_lanes SET next_due_at = $1 \
         WHERE webhook_id IN (SELECT webhook_id FROM locked)",
        locked_lanes(&format!("webhook_id = ANY($2) AND {WAKE_FOR_WORK}"))
    )
});
/// How soon a lane is looked at again after a claim that left it with
/// room and nothing more it could see. A claim reads the queue as it was
/// when the claim began, so work a publish commits meanwhile is invisible
/// to it, and that publish's wake ([`WAKE_FOR_WORK_SQL`]), which neither
/// waits for nor takes the lane's lock, may have seen the lane due and
/// left it. So such a claim leaves the lane due at this time. A look
/// that then finds nothing marks the lane `emptied` and looks once more;
/// publishes treat an emptied lane as idle and wake it under its lock,
/// so the look after that, which idles the lane, cannot miss them. The
/// work of every publish whose commit took less than this is found; the
/// worker's sweep ([`PostgresStore::wake_stranded_lanes`]) finds any other.
pub const EMPTIED_LANE_RECHECK: Duration = Duration::from_millis(200);
/// A lane's streak after a batch of its attempts, as in
/// `pacing::BatchStreak::applied_to`; `r` is the batch, `$8` the longest
/// streak.
const NEW_STREAK: &str = "GREATEST(-$8, LEAST($8, CASE WHEN r.recent = 0 THEN l.streak \
     WHEN r.broken OR l.streak * r.recent < 0 THEN r.recent ELSE l.streak + r.recent END))";
/// Attempts of these lanes were recorded: each one's streak moves on, and
/// a slot came free, now or, for a paced lane, after its pause (parked
/// until then): (now, failures to pace, first pause, longest pause,
/// webhooks, their recent streaks, broken, longest streak). The streak is computed
/// from the row being updated, so concurrent recorders never lose one.
/// Every lane is written, even one whose state stays as it was: the
/// write waits for a claim holding the lane, which may have counted
/// these attempts as in flight and parked the lane full.
static RECORDED_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {locked} UPDATE webhook_lanes l SET streak = {s}, parked = {s} <= -$2, next_due_at = CASE \
             WHEN {s} <= -$2 THEN $1 + LEAST($3::bigint << LEAST(-({s}) - $2, 16)::int, $4) \
             WHEN l.parked OR l.next_due_at IS NULL OR l.next_due_at > $1 THEN $1 \
             ELSE l.next_due_at END \
         FROM UNNEST($5::text[], $6::bigint[], $7::boolean[]) AS r(webhook_id, recent, broken) \
         WHERE l.webhook_id = r.webhook_id AND l.webhook_id IN (SELECT webhook_id FROM locked)",
        locked = locked_lanes("webhook_id = ANY($5)"),
        s = NEW_STREAK
    )
});
/// Slots of these lanes came free: (now, webhooks). Every lane is
/// written whatever its state, so the write waits for a claim holding
/// the lane, which may have counted the lane full, and then reads the
/// lane as that claim left it.
static WAKE_WITH_ROOM_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {} UPDATE webhook_lanes SET parked = FALSE, next_due_at = CASE \
             WHEN parked OR next_due_at IS NULL OR next_due_at > $1 THEN $1 ELSE next_due_at END \
         WHERE webhook_id IN (SELECT webhook_id FROM locked)",
        locked_lanes("webhook_id = ANY($2)")
    )
});

/// A new event with its deliveries, in one statement and transaction,
/// unless its id or idempotency key is taken; wakes the lanes it can
/// (as [`WAKE_FOR_WORK_SQL`]): (app, event id, type, payload, key, now,
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
         {locked}, \
         woken AS ( \
             UPDATE webhook_lanes SET next_due_at = $6 \
             WHERE webhook_id IN (SELECT webhook_id FROM locked)) \
         SELECT count(*) FROM event",
        locked = locked_lanes(&format!(
            "webhook_id = ANY($8) AND {} AND EXISTS (SELECT 1 FROM event)",
            // The publish's `now` is its sixth parameter.
            WAKE_FOR_WORK.replace("$1", "$6")
        ))
    )
});
/// Claimed deliveries go back, due now, and their lanes have room again:
/// (now, delivery ids, their claim tokens).
static RELEASE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH released AS ( \
             UPDATE deliveries d SET status = CASE WHEN attempts = 0 THEN 'pending' ELSE 'failed' END, \
             due_at = $1, claim_token = NULL, updated_at = $1 \
             FROM UNNEST($2::text[], $3::text[]) AS c(id, token) \
             WHERE d.id = c.id AND d.claim_token = c.token RETURNING d.webhook_id), \
         {} \
         UPDATE webhook_lanes SET parked = FALSE, next_due_at = $1 \
         WHERE webhook_id IN (SELECT webhook_id FROM locked)",
        locked_lanes("webhook_id IN (SELECT webhook_id FROM released)")
    )
});
/// Lanes idle or waiting while work of theirs is due: (now).
static STRANDED_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {} UPDATE webhook_lanes SET next_due_at = $1 \
         WHERE webhook_id IN (SELECT webhook_id FROM locked)",
        locked_lanes(
            "NOT parked AND (next_due_at IS NULL OR next_due_at > $1) \
             AND EXISTS (SELECT 1 FROM deliveries d \
                 WHERE d.webhook_id = webhook_lanes.webhook_id AND d.due_at IS NOT NULL AND d.due_at <= $1)"
        )
    )
});

/// SQLSTATE of a unique or a foreign-key violation.
const UNIQUE_VIOLATION: &str = "23505";
const FOREIGN_KEY_VIOLATION: &str = "23503";

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
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Open(e.to_string()))?;
        migrate::run(&pool).await?;
        // Lazy: a process that neither claims nor publishes to a busy
        // lane (the CLI's migrate, an idle API) never opens it.
        let queue = PgPoolOptions::new()
            .max_connections(QUEUE_POOL_SIZE.min(pool_size.max(1)))
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options.options(QUEUE_SESSION));
        Ok(Self { pool, queue })
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
                 secret, created_at, updated_at, plugin_id, plugin_config, max_in_flight) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11, $12, $13) RETURNING {WEBHOOK_COLUMNS}), \
             lane AS (INSERT INTO webhook_lanes (webhook_id) SELECT id FROM created) \
             SELECT * FROM created"
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
             enabled = $6, updated_at = $7, plugin_id = $10, plugin_config = $11, max_in_flight = $12 \
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
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| on_violation(e, FOREIGN_KEY_VIOLATION, StoreError::PluginMissing))?;
        let webhook = map_row(row, rows::webhook)?.ok_or(StoreError::NotFound)?;
        // Its limit may have risen: look at the lane again now.
        sqlx::query(&WAKE_WITH_ROOM_SQL)
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
        let inserted = sqlx::query_scalar::<_, i64>(&PUBLISH_SQL)
            .bind(event.app_id.as_str())
            .bind(event.id.as_str())
            .bind(event.event_type.as_str())
            .bind(&event.payload)
            .bind(&event.idempotency_key)
            .bind(now_ms())
            .bind(deliveries.iter().map(|d| d.id.as_str()).collect::<Vec<_>>())
            .bind(
                deliveries
                    .iter()
                    .map(|d| d.webhook_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .fetch_one(&mut *c)
            .await;
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

    /// The lane is written whatever its state, so the write waits for a
    /// claim holding the lane and reads it as that claim left it; a retry
    /// is rare enough for its one-statement transaction to hold the lane's
    /// lock.
    pub async fn retry_delivery(&self, app_id: &AppId, id: &DeliveryId) -> StoreResult<Delivery> {
        let now = now_ms();
        let sql = format!(
            "WITH retried AS ( \
                 UPDATE deliveries SET status = 'pending', due_at = $1, claim_token = NULL, updated_at = $1 \
                 WHERE app_id = $2 AND id = $3 AND status <> 'sending' RETURNING {DELIVERY_COLUMNS}), \
             woken AS ( \
                 UPDATE webhook_lanes SET next_due_at = CASE \
                     WHEN NOT parked AND (next_due_at IS NULL OR next_due_at > $1) THEN $1 \
                     ELSE next_due_at END \
                 WHERE webhook_id IN (SELECT webhook_id FROM retried)) \
             SELECT * FROM retried"
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
            Some(_) => Err(StoreError::DeliveryInFlight),
            None => Err(StoreError::NotFound),
        }
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
        let lanes: Vec<(String, i64)> = sqlx::query_as(LANES_SQL)
            .bind(now)
            .bind(i64::from(request.limit))
            .bind(i64::from(request.default_max_in_flight.get()))
            .bind(pacing::PACE_AFTER_FAILURES)
            .bind(pacing::FIRST_IN_FLIGHT)
            .fetch_all(&mut *tx)
            .await?;
        if lanes.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let (webhooks, limits): (Vec<String>, Vec<i64>) = lanes.into_iter().unzip();
        let sql = format!("{CLAIM_SQL} SELECT {CLAIMED_COLUMNS} FROM claimed d {CLAIMED_JOINS}");
        let rows = sqlx::query(&sql)
            .bind(now)
            .bind(i64::from(request.limit))
            .bind(webhooks)
            .bind(limits)
            .bind(now + millis(request.lease))
            .bind(ClaimToken::new().as_str())
            .bind(now + millis(EMPTIED_LANE_RECHECK))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        map_rows(&rows, rows::claimed)
    }

    /// A whole batch in a few statements and one transaction.
    pub async fn record_attempts(&self, records: Arc<Vec<AttemptRecord>>) -> StoreResult<()> {
        let mut tx = self.queue.begin().await?;
        let current = update_deliveries(&mut tx, &records).await?;
        let current: Vec<&AttemptRecord> = records
            .iter()
            .filter(|r| current.contains(r.delivery_id.as_str()))
            .collect();
        insert_attempts(&mut tx, &current).await?;
        // In webhook order for every recorder, so two never wait on each
        // other.
        let streaks = pacing::batch_streaks(current.iter().copied());
        sqlx::query(&RECORDED_SQL)
            .bind(now_ms())
            .bind(pacing::PACE_AFTER_FAILURES)
            .bind(pacing::FIRST_PAUSE_MS)
            .bind(pacing::LONGEST_PAUSE_MS)
            .bind(streaks.keys().map(|w| w.as_str()).collect::<Vec<_>>())
            .bind(streaks.values().map(|s| s.trailing).collect::<Vec<_>>())
            .bind(streaks.values().map(|s| s.broken).collect::<Vec<_>>())
            .bind(pacing::LONGEST_STREAK)
            .execute(&mut *tx)
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
        sqlx::query(&RELEASE_SQL)
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

    pub async fn wake_stranded_lanes(&self) -> StoreResult<u64> {
        let woken = sqlx::query(&STRANDED_SQL)
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
    let deliveries = new_deliveries(c, event).await?;
    sqlx::query(
        "INSERT INTO deliveries (id, app_id, event_id, webhook_id, status, due_at, created_at, updated_at) \
         SELECT d.id, $3, $4, d.webhook_id, 'pending', $5, $5, $5 \
         FROM UNNEST($1::text[], $2::text[]) AS d(id, webhook_id)",
    )
    .bind(deliveries.iter().map(|d| d.id.as_str()).collect::<Vec<_>>())
    .bind(deliveries.iter().map(|d| d.webhook_id.as_str()).collect::<Vec<_>>())
    .bind(event.app_id.as_str())
    .bind(event.id.as_str())
    .bind(now)
    .execute(&mut *c)
    .await?;
    sqlx::query(&WAKE_FOR_WORK_SQL)
        .bind(now)
        .bind(
            deliveries
                .iter()
                .map(|d| d.webhook_id.as_str())
                .collect::<Vec<_>>(),
        )
        .execute(&mut *c)
        .await?;
    let published = Published {
        event_id: event.id.clone(),
        deliveries,
        replayed: false,
    };
    Ok(published)
}

/// One new delivery per subscribed, enabled webhook of the event's app.
async fn new_deliveries(c: &mut PgConnection, event: &NewEvent) -> StoreResult<Vec<Queued>> {
    let sql = format!(
        "SELECT {SUBSCRIPTION_COLUMNS} FROM webhooks WHERE app_id = $1 AND enabled ORDER BY id"
    );
    let rows = sqlx::query(&sql)
        .bind(event.app_id.as_str())
        .fetch_all(&mut *c)
        .await?;
    let webhooks = map_rows(&rows, rows::subscription)?;
    let subscribed = rules::subscribed(webhooks, event.event_type.as_str());
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
/// still holds (a lost lease means another worker owns it now); returns
/// the ids that were updated.
async fn update_deliveries(
    c: &mut PgConnection,
    records: &[AttemptRecord],
) -> StoreResult<HashSet<String>> {
    let column =
        |f: fn(&AttemptRecord) -> Option<Millis>| records.iter().map(f).collect::<Vec<_>>();
    let updated: Vec<String> = sqlx::query_scalar(
        "UPDATE deliveries d SET status = r.status, due_at = r.due_at, claim_token = NULL, \
         attempts = d.attempts + r.attempted, last_attempt_at = COALESCE(r.started_at, d.last_attempt_at), \
         last_status_code = r.status_code, last_error = r.error, updated_at = r.now, skip_reason = r.skip_reason \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], \
                     $7::bigint[], $8::text[], $9::bigint[], $10::text[]) \
              AS r(id, token, status, due_at, attempted, started_at, status_code, error, now, skip_reason) \
         WHERE d.id = r.id AND d.claim_token = r.token RETURNING d.id",
    )
    .bind(records.iter().map(|r| r.delivery_id.as_str()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.claim_token.as_str()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.next.status().as_str()).collect::<Vec<_>>())
    .bind(column(|r| r.next.due_at()))
    .bind(records.iter().map(|r| i64::from(r.attempt.is_some())).collect::<Vec<_>>())
    .bind(column(|r| r.attempt.as_ref().map(|a| a.started_at)))
    .bind(column(|r| r.attempt.as_ref().and_then(|a| a.status_code)))
    .bind(records.iter().map(|r| r.next.error()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.now).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.next.skip_reason()).collect::<Vec<_>>())
    .fetch_all(&mut *c)
    .await?;
    Ok(updated.into_iter().collect())
}

async fn insert_attempts(c: &mut PgConnection, records: &[&AttemptRecord]) -> StoreResult<()> {
    let rows: Vec<(&AttemptRecord, &AttemptRow)> = records
        .iter()
        .filter_map(|r| r.attempt.as_ref().map(|a| (*r, a)))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<AttemptId> = rows.iter().map(|_| AttemptId::new()).collect();
    let number = |f: fn(&AttemptRow) -> i64| rows.iter().map(|(_, a)| f(a)).collect::<Vec<i64>>();
    sqlx::query(
        "INSERT INTO attempts (id, delivery_id, attempt, started_at, duration_ms, outcome, status_code, \
         response_body, error, plugin_error) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[], \
                              $7::bigint[], $8::text[], $9::text[], $10::text[])",
    )
    .bind(ids.iter().map(AttemptId::as_str).collect::<Vec<_>>())
    .bind(rows.iter().map(|(r, _)| r.delivery_id.as_str()).collect::<Vec<_>>())
    .bind(number(|a| a.number))
    .bind(number(|a| a.started_at))
    .bind(number(|a| a.duration_ms))
    .bind(rows.iter().map(|(_, a)| a.outcome.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, a)| a.status_code).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, a)| a.response_body.as_deref()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, a)| a.error.as_deref()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, a)| a.plugin_error.map(|p| p.as_str())).collect::<Vec<_>>())
    .execute(&mut *c)
    .await?;
    Ok(())
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
        StoreError::Postgres(error)
    }
}
