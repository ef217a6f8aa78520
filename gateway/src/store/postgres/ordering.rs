//! Ordered delivery on PostgreSQL (see [`crate::domain::ordering`]), one
//! named statement per transition. What is PostgreSQL's own: a publish and
//! a record of one key are serialised by a transaction-level advisory lock
//! per (webhook, key) (invariant 2), taken in its own statement so that
//! the statements after it read the queue as the lock's last holder left
//! it (each statement of a READ COMMITTED transaction takes a new
//! snapshot).

use sqlx::PgConnection;

use crate::clock::Millis;
use crate::domain::ordering::{self, OrderingKey, Place};
use crate::domain::{AttemptRecord, DeliveryStatus, Queued, WebhookId};
use crate::store::StoreResult;

/// publish, record: locks the (webhook, key) pairs, each once, in the
/// order of their lock ids (invariant 3): (webhooks, keys).
pub const LOCK: &str = "SELECT count(pg_advisory_xact_lock(k)) FROM ( \
         SELECT DISTINCT hashtextextended(w || '/' || key, 0) AS k \
         FROM UNNEST($1::text[], $2::text[]) AS x(w, key) ORDER BY k) locks";

/// publish: the last delivery of each webhook's key, the only one that can
/// tell whether the key is busy (its unfinished deliveries are the last
/// ones): (webhooks, key).
pub const LAST: &str = "SELECT w.id, last.ordering_seq, last.status \
     FROM UNNEST($1::text[]) AS w(id) LEFT JOIN LATERAL ( \
         SELECT ordering_seq, status FROM deliveries \
         WHERE webhook_id = w.id AND ordering_key = $2 ORDER BY ordering_seq DESC LIMIT 1) last ON TRUE";

/// publish: the deliveries of a keyed event, each in its place: (ids,
/// webhooks, due times (NULL: waiting), places, app, event, now, key).
pub const QUEUE: &str = "INSERT INTO deliveries (id, app_id, event_id, webhook_id, status, due_at, \
         created_at, updated_at, ordering_key, ordering_seq) \
     SELECT d.id, $5, $6, d.webhook_id, 'pending', d.due_at, $7, $7, $8, d.seq \
     FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS d(id, webhook_id, due_at, seq)";

/// record: the delivery after each ended one in its key's order becomes
/// due, if it is waiting: (now, the ended deliveries).
pub const NEXT: &str = "UPDATE deliveries d SET due_at = $1 FROM ( \
         SELECT (SELECT n.id FROM deliveries h JOIN deliveries n \
                 ON n.webhook_id = h.webhook_id AND n.ordering_key = h.ordering_key \
                 AND n.ordering_seq > h.ordering_seq \
                 WHERE h.id = e.id ORDER BY n.ordering_seq LIMIT 1) AS id \
         FROM UNNEST($2::text[]) AS e(id)) next \
     WHERE d.id = next.id AND d.status = 'pending' AND d.due_at IS NULL";

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

/// publish: locks the event's key on each webhook and queues its
/// deliveries, each due now or waiting (`Place`); returns the webhooks
/// whose delivery is due now, whose lanes the caller wakes.
pub async fn queue(
    c: &mut PgConnection,
    deliveries: &[Queued],
    event: (&str, &str),
    key: &OrderingKey,
    now: Millis,
) -> StoreResult<Vec<WebhookId>> {
    let webhooks: Vec<&str> = deliveries.iter().map(|d| d.webhook_id.as_str()).collect();
    lock(c, webhooks.iter().map(|w| (*w, key.as_str()))).await?;
    let rows: Vec<(String, Option<i64>, Option<String>)> = sqlx::query_as(LAST)
        .bind(&webhooks)
        .bind(key.as_str())
        .fetch_all(&mut *c)
        .await?;
    let last: std::collections::HashMap<String, (Option<i64>, Option<String>)> = rows
        .into_iter()
        .map(|(w, seq, status)| (w, (seq, status)))
        .collect();
    let places: Vec<Place> = webhooks
        .iter()
        .map(|w| match last.get(*w) {
            Some((Some(seq), Some(status))) => {
                // An unreadable status counts as unfinished: waiting is safe.
                let status = DeliveryStatus::parse(status).unwrap_or(DeliveryStatus::Pending);
                Place::after(Some((*seq, status)), now)
            }
            _ => Place::after(None, now),
        })
        .collect();
    sqlx::query(QUEUE)
        .bind(deliveries.iter().map(|d| d.id.as_str()).collect::<Vec<_>>())
        .bind(&webhooks)
        .bind(places.iter().map(|p| p.due_at).collect::<Vec<_>>())
        .bind(places.iter().map(|p| p.seq).collect::<Vec<_>>())
        .bind(event.0)
        .bind(event.1)
        .bind(now)
        .bind(key.as_str())
        .execute(&mut *c)
        .await?;
    Ok(deliveries
        .iter()
        .zip(&places)
        .filter(|(_, p)| p.due_at.is_some())
        .map(|(d, _)| d.webhook_id.clone())
        .collect())
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
