//! Ordered delivery on PostgreSQL (see [`crate::domain::ordering`]), one
//! named statement per transition. What is PostgreSQL's own: a publish and
//! a record of one key are serialised by a transaction-level advisory lock
//! per (webhook, key) (invariant 2), taken in a statement of its own so
//! that the statements after it read the queue as the lock's last holder
//! left it (each statement of a READ COMMITTED transaction, and of a
//! PL/pgSQL function, takes a new snapshot). A publish does that inside
//! one function, `wasmhook_publish_keyed`, so a keyed event costs one
//! round trip like any other (in a transaction of its own four, it
//! published at 0.59 of the unkeyed rate).

use std::sync::LazyLock;

use sqlx::PgConnection;

use super::lanes;
use crate::clock::Millis;
use crate::domain::ordering::{self, OrderingKey};
use crate::domain::{AttemptRecord, NewEvent, Queued};
use crate::store::StoreResult;

/// record: locks the (webhook, key) pairs, each once, in the order of
/// their lock ids (invariant 3; `wasmhook_publish_keyed` locks alike):
/// (webhooks, keys).
pub const LOCK: &str = "SELECT count(pg_advisory_xact_lock(k)) FROM ( \
         SELECT DISTINCT hashtextextended(w || '/' || key, 0) AS k \
         FROM UNNEST($1::text[], $2::text[]) AS x(w, key) ORDER BY k) locks";

/// publish of a keyed event, one statement: `wasmhook_publish_keyed`
/// (migration 0008) takes the key's locks and then, reading the queue
/// after them, stores the event and queues each delivery in its place
/// (the rule of [`crate::domain::ordering::Place`]); the lanes of the
/// deliveries due now are woken as any publish wakes them. Returns how
/// many deliveries it queued, none for a repeat (or fails with the unique
/// violation, if strict): (app, event id, type, payload, idempotency key,
/// now, delivery ids, webhooks, key, strict).
pub static PUBLISH: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH placed AS (SELECT * FROM wasmhook_publish_keyed($1, $2, $3, $4, $5, $6, $7::text[], $8::text[], $9, $10)), \
         {} SELECT count(*) FROM placed",
        lanes::publish_ctes(
            "$6",
            "ARRAY(SELECT p.webhook_id FROM placed p WHERE p.due_at IS NOT NULL)",
            "EXISTS (SELECT 1 FROM placed)"
        )
    )
});

/// record: the delivery after each ended one in its key's order becomes
/// due, if it is waiting: (now, the ended deliveries). Each next one is
/// one step of the index on (webhook, key, place); found by a join with
/// the ended ones instead, each took a sort of every later one of its
/// key (0.9 against 3.5 ms for 30, 20 per key).
pub const NEXT: &str = "UPDATE deliveries d SET due_at = $1 WHERE d.id = ANY(ARRAY( \
         SELECT next.id FROM deliveries h CROSS JOIN LATERAL ( \
             SELECT n.id FROM deliveries n \
             WHERE n.webhook_id = h.webhook_id AND n.ordering_key = h.ordering_key \
             AND n.ordering_seq > h.ordering_seq ORDER BY n.ordering_seq LIMIT 1) next \
         WHERE h.id = ANY($2::text[]))) \
     AND d.status = 'pending' AND d.due_at IS NULL";

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
    sqlx::query_scalar(&PUBLISH)
        .bind(event.app_id.as_str())
        .bind(event.id.as_str())
        .bind(event.event_type.as_str())
        .bind(&event.payload)
        .bind(&event.idempotency_key)
        .bind(now)
        .bind(super::delivery_ids(deliveries))
        .bind(super::webhook_ids(deliveries))
        .bind(key.as_str())
        .bind(strict)
        .fetch_one(&mut *c)
        .await
}

/// Locks these (webhook, key) pairs until the transaction ends.
async fn lock<'a>(
    c: &mut PgConnection,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> StoreResult<()> {
    let (webhooks, keys): (Vec<&str>, Vec<&str>) = pairs.into_iter().unzip();
    if webhooks.is_empty() {
        return Ok(());
    }
    sqlx::query(LOCK)
        .bind(webhooks)
        .bind(keys)
        .execute(&mut *c)
        .await?;
    Ok(())
}

/// record, before the record's first statement: locks the keys whose
/// heads these records may end.
pub async fn lock_released(c: &mut PgConnection, records: &[AttemptRecord]) -> StoreResult<()> {
    let released = ordering::released(records);
    lock(c, released.into_iter().map(|(w, k)| (w.as_str(), k))).await
}

/// record, after it: the deliveries these applied records end let the
/// next of their keys go.
pub async fn release_next<'a>(
    c: &mut PgConnection,
    applied: impl IntoIterator<Item = &'a AttemptRecord>,
    now: Millis,
) -> StoreResult<()> {
    let ended: Vec<&str> = applied
        .into_iter()
        .filter(|r| r.ordering_key.is_some() && ordering::ends(&r.next))
        .map(|r| r.delivery_id.as_str())
        .collect();
    if ended.is_empty() {
        return Ok(());
    }
    sqlx::query(NEXT)
        .bind(now)
        .bind(ended)
        .execute(&mut *c)
        .await?;
    Ok(())
}
