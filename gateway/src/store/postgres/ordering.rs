//! Ordered delivery on PostgreSQL (see [`crate::domain::ordering`]), one
//! named statement per transition.
//!
//! What is PostgreSQL's own: each (webhook, key) has a row in
//! `ordering_keys` with the last place given out (`last_seq`) and the place
//! up to which every delivery of the key has ended (`done_seq`), so a
//! delivery is the head exactly when its place is `done_seq + 1`. A
//! publish takes its places with an upsert and a record moves `done_seq`
//! on with an update. Both act on the row's latest committed version,
//! whatever their snapshot, and lock it until they commit: that is what
//! serialises a publish and a record of one key (invariant 2).
//!
//! One race is left to the snapshot: a record that waited for a publish's
//! lock on the key row sees that publish's place (`last_seq`) but not its
//! delivery, which committed after the record's statement began. The
//! record then returns that place as **stranded** and makes it due in a
//! statement of its own ([`RELEASE_STRANDED`]), whose snapshot has it.
//!
//! Lock order (invariant 3): a publish locks its key rows in webhook
//! order, then its lanes; a record locks its key rows in (webhook, key)
//! order ([`RECORD_CTES`]), before its lanes, because the record
//! statement's result reads the key rows' CTEs before it joins the lanes.
//!
//! An earlier form serialised the two with transaction-level advisory
//! locks. A lock gives no snapshot after it, so each needed a statement
//! of its own after the lock (a PL/pgSQL function per publish, one more
//! statement per record, holding the record's lanes locked longer) and a
//! lookup of the key's last delivery: keyed delivery ran well short of
//! the ordering-cost target. A row read at its latest version needs none
//! of that.

use std::sync::LazyLock;

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use super::lanes;
use crate::clock::Millis;
use crate::domain::ordering::OrderingKey;
use crate::domain::{NewEvent, Queued};
use crate::store::StoreResult;

/// publish of a keyed event, one statement (`strict`: a taken event id or
/// idempotency key is a unique violation, not a silent repeat). Each
/// delivery takes the next place of its (webhook, key) and is due now if
/// it is the key's head (the rule of [`crate::domain::ordering::Place`]),
/// waiting otherwise; the lanes of the deliveries due now are woken as any
/// publish wakes them. Returns how many deliveries it queued, none for a
/// repeat: (app, event id, type, payload, idempotency key, now, delivery
/// ids, webhooks, key).
fn publish_sql(strict: bool) -> String {
    let on_conflict = if strict { "" } else { "ON CONFLICT DO NOTHING" };
    format!(
        "WITH event AS ( \
             INSERT INTO events (app_id, id, event_type, payload, idempotency_key, ordering_key, created_at) \
             VALUES ($1, $2, $3, $4, $5, $9, $6) {on_conflict} RETURNING app_id, id), \
         places AS ( \
             INSERT INTO ordering_keys AS k (webhook_id, ordering_key, last_seq, done_seq) \
             SELECT w, $9, 1, 0 FROM UNNEST($8::text[]) AS w WHERE EXISTS (SELECT 1 FROM event) ORDER BY w \
             ON CONFLICT (webhook_id, ordering_key) DO UPDATE SET last_seq = k.last_seq + 1 \
             RETURNING k.webhook_id, k.last_seq, k.done_seq), \
         placed AS ( \
             INSERT INTO deliveries (id, app_id, event_id, webhook_id, status, due_at, created_at, updated_at, \
                                     ordering_key, ordering_seq) \
             SELECT d.id, e.app_id, e.id, d.webhook_id, 'pending', \
                    CASE WHEN p.last_seq = p.done_seq + 1 THEN $6 END, $6, $6, $9, p.last_seq \
             FROM event e, UNNEST($7::text[], $8::text[]) AS d(id, webhook_id) \
             JOIN places p ON p.webhook_id = d.webhook_id \
             RETURNING webhook_id, due_at), \
         {} SELECT count(*) FROM placed",
        lanes::publish_ctes(
            "$6",
            "ARRAY(SELECT p.webhook_id FROM placed p WHERE p.due_at IS NOT NULL)",
            "EXISTS (SELECT 1 FROM placed)"
        )
    )
}

static PUBLISH: LazyLock<String> = LazyLock::new(|| publish_sql(false));
static PUBLISH_STRICT: LazyLock<String> = LazyLock::new(|| publish_sql(true));

/// record: CTEs of the record's statement, after `updated` (which returns
/// each applied record's delivery with its key, place, `now`, and whether
/// it [`releases`](crate::domain::ordering::releases) its key).
/// `key_rows` locks the rows of the keys ended, in (webhook, key) order,
/// reading their latest versions; `advanced` moves a key's `done_seq` on
/// when the ended delivery is its head (an operator's retry of an old one
/// moves nothing); `released` makes the next place due if it is waiting.
/// A key that has a next place but whose delivery the statement could not
/// see is stranded (see the module doc); the statement's result names
/// those with [`STRANDED`].
pub const RECORD_CTES: &str = "key_rows AS ( \
         SELECT k.webhook_id, k.ordering_key, k.done_seq, h.ordering_seq AS seq, h.now \
         FROM ordering_keys k JOIN updated h \
             ON k.webhook_id = h.webhook_id AND k.ordering_key = h.ordering_key AND h.releases \
         ORDER BY k.webhook_id, k.ordering_key FOR NO KEY UPDATE OF k), \
     advanced AS ( \
         UPDATE ordering_keys k SET done_seq = r.seq FROM key_rows r \
         WHERE k.webhook_id = r.webhook_id AND k.ordering_key = r.ordering_key AND r.done_seq = r.seq - 1 \
         RETURNING k.webhook_id, k.ordering_key, k.done_seq, k.last_seq, r.now), \
     released AS ( \
         UPDATE deliveries d SET due_at = a.now FROM advanced a \
         WHERE a.last_seq > a.done_seq AND d.webhook_id = a.webhook_id \
         AND d.ordering_key = a.ordering_key AND d.ordering_seq = a.done_seq + 1 \
         AND d.status = 'pending' AND d.due_at IS NULL \
         RETURNING d.webhook_id, d.ordering_key),";

/// record: the stranded places as three columns of the statement's one
/// row (`stranded_webhooks`, `stranded_keys`, `stranded_seqs`). Reading
/// `advanced` here, before the lanes are joined, is what locks the key
/// rows before the lanes.
pub const STRANDED: &str = "(SELECT array_agg(a.webhook_id) FROM stranded a) AS stranded_webhooks, \
     (SELECT array_agg(a.ordering_key) FROM stranded a) AS stranded_keys, \
     (SELECT array_agg(a.done_seq + 1) FROM stranded a) AS stranded_seqs";

/// The CTE `stranded` that [`STRANDED`] reads.
pub const STRANDED_CTE: &str = "stranded AS MATERIALIZED ( \
         SELECT a.* FROM advanced a WHERE a.last_seq > a.done_seq AND NOT EXISTS ( \
             SELECT 1 FROM released r \
             WHERE r.webhook_id = a.webhook_id AND r.ordering_key = a.ordering_key)),";

/// record, after its statement: the stranded places become due if they
/// are waiting: (now, webhooks, keys, places).
pub const RELEASE_STRANDED: &str = "UPDATE deliveries d SET due_at = $1 \
     FROM UNNEST($2::text[], $3::text[], $4::bigint[]) AS s(webhook_id, ordering_key, seq) \
     WHERE d.webhook_id = s.webhook_id AND d.ordering_key = s.ordering_key AND d.ordering_seq = s.seq \
     AND d.status = 'pending' AND d.due_at IS NULL";

/// retention: the CTE that deletes the rows of keys with nothing left to
/// order, after the CTE `doomed` picked the events to delete: a key row
/// whose every place has ended goes when the last of its deliveries is
/// among `doomed` (the statement's snapshot still shows those). A publish
/// that took a place meanwhile made the row's latest version unfinished,
/// which the delete reads again, so the row stays; one that comes after
/// the delete starts the key afresh at place 1, which is as good as any:
/// places only order the deliveries that exist.
pub const PURGE_KEYS: &str = "purged_keys AS ( \
         DELETE FROM ordering_keys k USING ( \
             SELECT DISTINCT d.webhook_id, d.ordering_key FROM deliveries d \
             JOIN doomed x ON d.app_id = x.app_id AND d.event_id = x.id \
             WHERE d.ordering_key IS NOT NULL) o \
         WHERE k.webhook_id = o.webhook_id AND k.ordering_key = o.ordering_key AND k.done_seq = k.last_seq \
         AND NOT EXISTS (SELECT 1 FROM deliveries d \
             WHERE d.webhook_id = k.webhook_id AND d.ordering_key = k.ordering_key \
             AND (d.app_id, d.event_id) NOT IN (SELECT app_id, id FROM doomed)))";

/// publish: stores a keyed event with its deliveries ([`PUBLISH`]);
/// returns how many deliveries it queued, 0 for a repeat, which `strict`
/// makes a unique violation.
pub async fn publish(
    c: &mut PgConnection,
    event: &NewEvent,
    key: &OrderingKey,
    deliveries: &[Queued],
    (now, strict): (Millis, bool),
) -> Result<i64, sqlx::Error> {
    let sql: &str = if strict { &PUBLISH_STRICT } else { &PUBLISH };
    sqlx::query_scalar(sql)
        .bind(event.app_id.as_str())
        .bind(event.id.as_str())
        .bind(event.event_type.as_str())
        .bind(&event.payload)
        .bind(&event.idempotency_key)
        .bind(now)
        .bind(super::delivery_ids(deliveries))
        .bind(super::webhook_ids(deliveries))
        .bind(key.as_str())
        .fetch_one(&mut *c)
        .await
}

/// record, after its statement (`row`, its first row): makes the stranded
/// places it names due.
pub async fn release_stranded(c: &mut PgConnection, row: &PgRow, now: Millis) -> StoreResult<()> {
    let webhooks: Option<Vec<String>> = row.try_get("stranded_webhooks")?;
    let Some(webhooks) = webhooks else {
        return Ok(());
    };
    let keys: Option<Vec<String>> = row.try_get("stranded_keys")?;
    let seqs: Option<Vec<i64>> = row.try_get("stranded_seqs")?;
    sqlx::query(RELEASE_STRANDED)
        .bind(now)
        .bind(webhooks)
        .bind(keys.unwrap_or_default())
        .bind(seqs.unwrap_or_default())
        .execute(&mut *c)
        .await?;
    Ok(())
}
