//! What both backends decide alike, apart from how they ask the database:
//! which webhooks an event fans out to, whether a publish repeats an
//! earlier one, what an upload under a taken name and version means, and
//! what a manual retry that changed nothing means.

use super::{StoreError, StoreResult};
use crate::clock::Millis;
use crate::domain::{
    Delivery, DeliveryStatus, EventId, EventTypeFilter, NewEvent, Plugin, Upload, WebhookId,
};

/// The deliveries a manual retry may queue now: not one waiting for an
/// earlier delivery of its ordering key, which goes in its turn
/// ([`crate::domain::ordering`]).
pub(super) const RETRIABLE: &str = "NOT (status = 'pending' AND due_at IS NULL)";

/// A manual retry changed nothing: the delivery is being sent, or waits
/// for its turn in its key's order (answered as it is).
pub(super) fn unretried(delivery: Delivery) -> StoreResult<Delivery> {
    if delivery.status == DeliveryStatus::Pending && delivery.due_at.is_none() {
        Ok(delivery)
    } else {
        Err(StoreError::DeliveryInFlight)
    }
}

/// The webhooks (enabled, of the event's app, with their filters) that
/// receive an event of `event_type`.
pub(super) fn subscribed(
    webhooks: Vec<(WebhookId, EventTypeFilter)>,
    event_type: &str,
) -> Vec<WebhookId> {
    webhooks
        .into_iter()
        .filter(|(_, filter)| filter.matches(event_type))
        .map(|(id, _)| id)
        .collect()
}

/// What an earlier event with the publish's idempotency key means.
pub(super) enum KeySeen {
    /// Within the window: the publish repeats that event.
    Repeat(EventId),
    /// Before the window: the key is free again once taken off that event.
    Expired(EventId),
    Unused,
}

pub(super) fn key_seen(event: &NewEvent, earlier: Option<(EventId, Millis)>) -> KeySeen {
    match earlier {
        Some((id, at)) if at >= event.dedup_since => KeySeen::Repeat(id),
        Some((id, _)) => KeySeen::Expired(id),
        None => KeySeen::Unused,
    }
}

/// What an earlier event with the publish's id means: a repeat within
/// the window, refused before it (the id is the receivers' dedup key).
pub(super) fn id_seen(event: &NewEvent, earlier: Option<Millis>) -> StoreResult<Option<EventId>> {
    match earlier {
        Some(at) if at >= event.dedup_since => Ok(Some(event.id.clone())),
        Some(_) => Err(StoreError::EventIdReused {
            id: event.id.clone(),
        }),
        None => Ok(None),
    }
}

/// An upload whose name and version are stored already: the same bytes
/// are the stored plugin; other bytes conflict (versions are immutable).
pub(super) fn existing_upload(stored: Plugin, sha256: &str) -> StoreResult<(Plugin, Upload)> {
    if stored.sha256 == sha256 {
        return Ok((stored, Upload::AlreadyStored));
    }
    Err(StoreError::PluginVersionExists {
        name: stored.name,
        version: stored.version,
    })
}

/// A plugin may go only when no webhook uses it.
pub(super) fn deletable(users: i64) -> StoreResult<()> {
    if users > 0 {
        return Err(StoreError::PluginInUse { webhooks: users });
    }
    Ok(())
}
