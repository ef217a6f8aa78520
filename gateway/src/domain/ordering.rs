//! Ordered delivery: an event published with an `ordering_key` is
//! delivered, to each webhook, after every earlier event of that key has
//! ended there, one at a time in publish order. Keys are independent of
//! each other; an event without one goes as soon as its lane allows.
//!
//! # How the queue keeps the order
//!
//! Of one webhook's deliveries of one key, only the first unfinished one
//! (the key's **head**) is ever due; the others are `pending` with no due
//! time (**waiting**), invisible to claims, which read only due work.
//! Claims, lanes and every limit on them stay as they are, and a key
//! costs a claim nothing however many deliveries wait behind its head.
//!
//! | transition | effect | statement (PostgreSQL / SQLite, the `ordering` module of each) |
//! |------------|--------|------------------|
//! | publish    | each delivery of a keyed event takes the next place of its (webhook, key) (`ordering_seq`) and is due now if no delivery of the key is unfinished there, waiting otherwise ([`Place`]) | the publish statement upserts the key's row (`ordering_keys`): due if every earlier place has ended / `LAST` per webhook |
//! | record     | a head that ended (succeeded, dead, skipped) makes the next waiting delivery of its key due now; a head that will be retried keeps it waiting | `RECORD_CTES` in the record's statement (and `RELEASE_STRANDED` after it, rarely) / `NEXT` |
//! | retry      | a manual retry of a waiting delivery leaves it waiting for its turn; of an ended one, it is sent again outside the order (the operator asked for it) | – |
//!
//! # Invariants
//!
//! 1. **One head per key.** A delivery is made due by a publish only if
//!    no delivery of its (webhook, key) is unfinished, and by a record
//!    only if every earlier one of its key has ended; an ended delivery
//!    does not come back unless an operator retries it.
//! 2. **No waiting delivery is stranded.** A publish deciding that a
//!    delivery waits, and a record ending the head it waits for, are
//!    serialised per (webhook, key) (PostgreSQL: the key's row, locked by
//!    both until they commit and read at its latest version; SQLite: the
//!    one writer), so whichever comes second sees what the first wrote:
//!    the record finds the delivery that waits, or the publish finds the
//!    head ended. The record's transaction also writes the lane (due now:
//!    a slot came free), so the new head is claimed like any due
//!    delivery.
//! 3. **Lock order: keys, then lanes.** Publishes and records lock keys
//!    first, in (webhook, key) order, then lanes (invariant 4 of
//!    [`super::lane`]); claims take no key lock.
//! 4. **Crash-safe.** Each of those is one transaction: a process killed
//!    mid-way leaves the key as it was, and an expired lease gives the
//!    head back to the queue like any other delivery.
//! 5. **Unfinished is kept.** Retention deletes no event with a waiting
//!    delivery (`pending` without a due time), however old.
//!
//! # Cost
//!
//! Making a waiting delivery due is one more row update per delivery (on
//! top of its insert, claim and record); on PostgreSQL a keyed publish
//! also upserts its key's row and a record updates it. Neither takes a
//! statement of its own. The figures are in `wasmhook-bench
//! --ordering-keys` and the notes.

use super::{AttemptRecord, DeliveryStatus, NextState};
use crate::clock::Millis;

/// What keeps events in order: opaque text of 1 to 256 characters, no
/// control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrderingKey(String);

impl OrderingKey {
    pub const MAX_CHARS: usize = 256;

    pub fn parse(text: &str) -> Result<Self, String> {
        let chars = text.chars().count();
        if chars == 0 || chars > Self::MAX_CHARS {
            return Err(format!(
                "must be 1 to {} characters, not {chars}",
                Self::MAX_CHARS
            ));
        }
        if text.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Where a new delivery of a key goes in its webhook's order: the place
/// after the key's last delivery there, due now unless that one is
/// unfinished (invariant 1: the key's unfinished deliveries are always
/// its last ones, as only the head is ever due).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub seq: i64,
    /// `None`: it waits for the deliveries of its key before it.
    pub due_at: Option<Millis>,
}

impl Place {
    /// After the key's last delivery (`seq`, `status`), if any.
    pub fn after(last: Option<(i64, DeliveryStatus)>, now: Millis) -> Self {
        match last {
            Some((seq, status)) => Self {
                seq: seq + 1,
                due_at: (!status.is_unfinished()).then_some(now),
            },
            None => Self {
                seq: 1,
                due_at: Some(now),
            },
        }
    }
}

/// Whether an attempt's next state ends the delivery, releasing the next
/// one of its key.
pub fn ends(next: &NextState) -> bool {
    !matches!(next, NextState::Retry { .. })
}

/// Whether this record, if applied, lets the next delivery of its key go:
/// it ends a keyed delivery.
pub fn releases(record: &AttemptRecord) -> bool {
    record.ordering_key.is_some() && ends(&record.next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bounded_printable_text() {
        assert!(OrderingKey::parse("customer-42").is_ok());
        assert!(OrderingKey::parse("é".repeat(256).as_str()).is_ok());
        assert!(OrderingKey::parse("").is_err());
        assert!(OrderingKey::parse(&"k".repeat(257)).is_err());
        assert!(OrderingKey::parse("a\nb").is_err());
    }

    #[test]
    fn a_delivery_waits_while_the_last_of_its_key_is_unfinished() {
        assert_eq!(
            Place::after(None, 7),
            Place {
                seq: 1,
                due_at: Some(7)
            }
        );
        for busy in [
            DeliveryStatus::Pending,
            DeliveryStatus::Failed,
            DeliveryStatus::Sending,
        ] {
            assert_eq!(
                Place::after(Some((4, busy)), 7),
                Place {
                    seq: 5,
                    due_at: None
                }
            );
        }
        for ended in [
            DeliveryStatus::Succeeded,
            DeliveryStatus::Dead,
            DeliveryStatus::Skipped,
        ] {
            assert_eq!(
                Place::after(Some((4, ended)), 7),
                Place {
                    seq: 5,
                    due_at: Some(7)
                }
            );
        }
    }

    #[test]
    fn only_an_ended_delivery_releases_its_key() {
        assert!(ends(&NextState::Succeeded));
        assert!(ends(&NextState::Dead { error: "x".into() }));
        assert!(!ends(&NextState::Retry {
            due_at: 1,
            error: "x".into()
        }));
    }
}
