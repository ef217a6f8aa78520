//! Ordered delivery on SQLite (see [`crate::domain::ordering`]), one named
//! statement per transition. The one writer runs publishes and records one
//! at a time, so no statement here locks a key.

use rusqlite::{Connection, OptionalExtension, params};

use crate::clock::Millis;
use crate::domain::ordering::{self, OrderingKey, Place};
use crate::domain::{AttemptRecord, DeliveryStatus};
use crate::store::StoreResult;

/// publish: the last delivery of a (webhook, key), the only one that can
/// tell whether the key is busy (its unfinished deliveries are the last
/// ones): (webhook, key).
pub const LAST: &str = "SELECT ordering_seq, status FROM deliveries \
     WHERE webhook_id = ?1 AND ordering_key = ?2 ORDER BY ordering_seq DESC LIMIT 1";

/// record: the delivery after an ended one in its key's order becomes due,
/// if it is waiting: (now, the ended delivery).
pub const NEXT: &str = "UPDATE deliveries SET due_at = ?1 WHERE id = ( \
         SELECT n.id FROM deliveries h JOIN deliveries n \
         ON n.webhook_id = h.webhook_id AND n.ordering_key = h.ordering_key AND n.ordering_seq > h.ordering_seq \
         WHERE h.id = ?2 ORDER BY n.ordering_seq LIMIT 1) \
     AND status = 'pending' AND due_at IS NULL";

/// publish: where the webhook's delivery of an event with `key` goes.
pub fn place(c: &Connection, webhook: &str, key: &OrderingKey, now: Millis) -> StoreResult<Place> {
    let last: Option<(i64, String)> = c
        .prepare_cached(LAST)?
        .query_row(params![webhook, key.as_str()], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let last = last.map(|(seq, status)| {
        // An unreadable status counts as unfinished: waiting is safe.
        (
            seq,
            DeliveryStatus::parse(&status).unwrap_or(DeliveryStatus::Pending),
        )
    });
    Ok(Place::after(last, now))
}

/// record: the deliveries these applied records end let the next of
/// their keys go.
pub fn release_next<'a>(
    c: &Connection,
    applied: impl IntoIterator<Item = &'a AttemptRecord>,
    now: Millis,
) -> StoreResult<()> {
    for record in applied {
        if ordering::releases(record) {
            c.prepare_cached(NEXT)?
                .execute(params![now, record.delivery_id.as_str()])?;
        }
    }
    Ok(())
}
