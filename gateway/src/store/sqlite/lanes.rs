//! The lane's transitions on SQLite (see [`crate::domain::lane`]), one
//! named statement each. The one writer runs them one statement at a time,
//! so a lane is never read by one transition while another changes it:
//! nothing here locks, and neither the recheck nor `emptied` of PostgreSQL
//! is needed.

use std::sync::LazyLock;

use rusqlite::{Connection, params};

use super::{collect, first};
use crate::clock::{Millis, millis};
use crate::domain::lane::{self, Batch, BreakerPolicy, ClaimEnd, Gcra};
use crate::domain::{AppId, AttemptRecord, ClaimRequest, ClaimToken, WebhookId};
use crate::store::rows::{LANE_COLUMNS, ReadRow, lane_state, stored_rate};
use crate::store::{StoreError, StoreResult};

/// create: a new webhook's lane, idle: (webhook).
pub const CREATE: &str = "INSERT INTO webhook_lanes (webhook_id) VALUES (?)";
/// publish, retry: new work due now wakes a [`lane::wakeable`] lane:
/// (now, webhook).
pub static WAKE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE webhook_lanes SET next_due_at = {} WHERE webhook_id = ?2 AND {}",
        lane::not_before("?1"),
        lane::wakeable("?1")
    )
});
/// claim: lanes with due work, oldest first, with what decides their
/// limits, but none of an app with no room ([`crate::domain::share`]):
/// (default limit, now, most lanes, apps with no room as a JSON array).
pub const DUE: &str = "SELECT l.webhook_id, l.streak, COALESCE(w.max_in_flight, ?1) AS max_in_flight, \
     w.rate_limit, w.rate_limit_burst, l.rate_tat, l.breaker_open_since IS NOT NULL AS breaker_open, w.app_id \
     FROM webhook_lanes l JOIN webhooks w ON w.id = l.webhook_id \
     WHERE l.next_due_at IS NOT NULL AND l.next_due_at <= ?2 \
     AND w.app_id NOT IN (SELECT value FROM json_each(?4)) ORDER BY l.next_due_at LIMIT ?3";
/// The next time a lane becomes due after now: (now).
pub const NEXT_DUE: &str = "SELECT MIN(next_due_at) FROM webhook_lanes WHERE next_due_at > ?1";
/// claim: a lane's attempts in flight under a live lease: (webhook, now).
pub const LIVE: &str = "SELECT COUNT(*) AS live FROM deliveries \
     WHERE webhook_id = ?1 AND status = 'sending' AND due_at > ?2";
/// claim: a lane's oldest due deliveries (an expired lease is due):
/// (lease end, token, now, webhook, most).
pub const TAKE: &str = "UPDATE deliveries SET status = 'sending', due_at = ?1, claim_token = ?2, updated_at = ?3 \
     WHERE id IN (SELECT id FROM deliveries WHERE webhook_id = ?4 AND due_at IS NOT NULL AND due_at <= ?3 \
                  ORDER BY due_at LIMIT ?5) \
     RETURNING id";
/// claim, [`ClaimEnd::Full`]: parked until the first live lease ends, or
/// its rate limit's hold if later (SQLite's `MAX` is NULL if any argument
/// is): (webhook, now, rate state, hold).
pub const PARK: &str = "UPDATE webhook_lanes SET parked = 1, rate_tat = COALESCE(?3, rate_tat), held_until = ?4, \
     next_due_at = MAX((SELECT MIN(due_at) FROM deliveries \
         WHERE webhook_id = ?1 AND status = 'sending' AND due_at > ?2), COALESCE(?4, 0)) \
     WHERE webhook_id = ?1";
/// claim, [`ClaimEnd::Open`]: due at the next due delivery, the leases
/// just taken included, or the hold if later; idle if none: (webhook, rate
/// state, hold).
pub const NEXT: &str = "UPDATE webhook_lanes SET parked = 0, rate_tat = COALESCE(?2, rate_tat), held_until = ?3, \
     next_due_at = MAX((SELECT MIN(due_at) FROM deliveries WHERE webhook_id = ?1 AND due_at IS NOT NULL), \
         COALESCE(?3, 0)) \
     WHERE webhook_id = ?1";
/// record: the lane as it is: (webhook).
pub static READ: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {LANE_COLUMNS} FROM webhook_lanes WHERE webhook_id = ?"));
/// record: the lane as [`LaneState::recorded`] decided: (webhook, next
/// due, parked, streak, hold, and its breaker's open since, probe wait,
/// window start, attempts and failures).
pub const WRITE: &str = "UPDATE webhook_lanes SET next_due_at = ?2, parked = ?3, streak = ?4, held_until = ?5, \
     breaker_open_since = ?6, probe_ms = ?7, window_start = ?8, window_attempts = ?9, window_failures = ?10 \
     WHERE webhook_id = ?1";
/// The breakers of some webhooks' lanes, for the API: (webhooks as a JSON
/// array).
pub static BREAKERS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {LANE_COLUMNS} FROM webhook_lanes WHERE webhook_id IN (SELECT value FROM json_each(?1))"
    )
});
/// How many lanes' breakers are open, and of those how many are held
/// until a probe: (now).
pub const OPEN_BREAKERS: &str = "SELECT COUNT(*), COALESCE(SUM(held_until > ?1), 0) FROM webhook_lanes \
     WHERE breaker_open_since IS NOT NULL";
/// release, raise limit: a slot came free: (now, webhook).
pub static ROOM: LazyLock<String> = LazyLock::new(|| {
    let now = lane::not_before("?1");
    format!(
        "UPDATE webhook_lanes SET parked = 0, next_due_at = {now} \
         WHERE webhook_id = ?2 AND (parked OR next_due_at IS NULL OR next_due_at > {now})"
    )
});
/// sweep: [`lane::wakeable`] lanes with work due: (now).
pub static SWEEP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE webhook_lanes SET next_due_at = {} WHERE {} \
         AND EXISTS (SELECT 1 FROM deliveries d \
             WHERE d.webhook_id = webhook_lanes.webhook_id AND d.due_at IS NOT NULL AND d.due_at <= ?1)",
        lane::not_before("?1"),
        lane::wakeable("?1")
    )
});

/// publish, retry: these webhooks' lanes have work due `now`.
pub fn wake<'a>(
    c: &Connection,
    now: Millis,
    webhooks: impl IntoIterator<Item = &'a str>,
) -> StoreResult<()> {
    // One statement per lane: a JSON array of ids through json_each cost
    // 17% more CPU per delivery to one webhook than this (measured).
    let mut wake = c.prepare_cached(&WAKE)?;
    for webhook in webhooks {
        wake.execute(params![now, webhook])?;
    }
    Ok(())
}

/// claim: walks the lanes with due work, oldest first, taking from each as
/// many due deliveries as its limit and its app's room leave room for,
/// until the request's limit; returns the ids taken.
pub fn claim(c: &Connection, request: &ClaimRequest, now: Millis) -> StoreResult<Vec<String>> {
    let limit = request.limit as usize;
    let default_max = request.default_max_in_flight.get();
    let full = serde_json::to_string(&request.apps.full())
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let lanes = collect(
        c,
        DUE,
        params![default_max, now, request.limit, full],
        due_lane,
    )?;
    let (lease_end, token) = (now + millis(request.lease), ClaimToken::new());
    let mut ids: Vec<String> = Vec::new();
    let shares = request
        .apps
        .split(&lanes.iter().map(|due| &due.app).collect::<Vec<_>>());
    for (due, share) in lanes.iter().zip(shares) {
        let left = limit - ids.len();
        if left == 0 {
            break;
        }
        // A lane its app has no room left for stays as it is, due.
        if share == Some(0) {
            continue;
        }
        let live: i64 = c
            .prepare_cached(LIVE)?
            .query_row(params![due.webhook, now], |r| r.get(0))?;
        let room = due.in_flight - live;
        let rate = due.rate.map(|(gcra, tat)| (gcra, gcra.allowance(tat, now)));
        let most = room
            .min(left as i64)
            .min(rate.map_or(i64::MAX, |(_, allowed)| allowed.most))
            .min(share.unwrap_or(i64::MAX));
        let taken: Vec<String> = if most > 0 {
            let params = params![lease_end, token.as_str(), now, due.webhook, most];
            collect(c, TAKE, params, |r| r.value("id"))?
        } else {
            Vec::new()
        };
        let n = taken.len() as i64;
        let tat = rate.map(|(gcra, allowed)| gcra.tat_after(allowed, n));
        let held = rate.map(|(gcra, allowed)| gcra.held_until(allowed, n));
        match ClaimEnd::of(room, n) {
            ClaimEnd::Full => {
                c.prepare_cached(PARK)?
                    .execute(params![due.webhook, now, tat, held])?
            }
            ClaimEnd::Open => c
                .prepare_cached(NEXT)?
                .execute(params![due.webhook, tat, held])?,
        };
        ids.extend(taken);
    }
    Ok(ids)
}

/// A row of [`DUE`]: a lane with its limits.
struct DueLane {
    webhook: String,
    app: AppId,
    in_flight: i64,
    /// The rate limit with the lane's rate state, if limited.
    rate: Option<(Gcra, Option<i64>)>,
}

fn due_lane(r: &rusqlite::Row<'_>) -> StoreResult<DueLane> {
    let rate = match r.value::<Option<i64>>("rate_limit")? {
        Some(per_second) => {
            let burst = r.value::<Option<i64>>("rate_limit_burst")?;
            Some((
                Gcra::new(stored_rate(per_second, burst)?),
                r.value("rate_tat")?,
            ))
        }
        None => None,
    };
    let breaker_open: bool = r.value("breaker_open")?;
    Ok(DueLane {
        webhook: r.value("webhook_id")?,
        app: AppId::from(r.value::<String>("app_id")?),
        in_flight: lane::claim_limit(r.value("streak")?, r.value("max_in_flight")?, breaker_open),
        rate,
    })
}

/// record: each lane with attempts in `applied` moves on as
/// [`LaneState::recorded`] decides; a lane whose state stays as it was (a
/// healthy one in its steady state) is not written.
pub fn record<'a>(
    c: &Connection,
    applied: impl IntoIterator<Item = &'a AttemptRecord>,
    now: Millis,
    policy: &BreakerPolicy,
) -> StoreResult<()> {
    for (webhook, batch) in lane::batches(applied) {
        record_lane(c, webhook, batch, now, policy)?;
    }
    Ok(())
}

fn record_lane(
    c: &Connection,
    webhook: &WebhookId,
    batch: Batch,
    now: Millis,
    policy: &BreakerPolicy,
) -> StoreResult<()> {
    // A lane deleted with its webhook since the claim has nothing to write.
    let Some((_, before)) = first(c, &READ, [webhook.as_str()], |r| lane_state(r))? else {
        return Ok(());
    };
    let after = before.recorded(batch, now, policy);
    if after != before {
        let breaker = after.breaker;
        c.prepare_cached(WRITE)?.execute(params![
            webhook.as_str(),
            after.next_due_at,
            after.parked,
            after.streak,
            after.held_until,
            breaker.open_since,
            breaker.probe_ms,
            breaker.window_start,
            breaker.window_attempts,
            breaker.window_failures
        ])?;
    }
    Ok(())
}

/// release, raise limit: a slot of the webhook's lane came free at `now`.
pub fn room(c: &Connection, now: Millis, webhook: &str) -> StoreResult<()> {
    c.prepare_cached(&ROOM)?.execute(params![now, webhook])?;
    Ok(())
}

/// sweep: wakes lanes left idle or waiting with work due; returns how many.
pub fn sweep(c: &Connection, now: Millis) -> StoreResult<u64> {
    Ok(c.prepare_cached(&SWEEP)?.execute(params![now])? as u64)
}
