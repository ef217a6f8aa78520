//! The lane's transitions on PostgreSQL (see [`crate::domain::lane`]), one
//! named statement each. What is PostgreSQL's own: claims lock lanes with
//! `FOR UPDATE SKIP LOCKED`, so several processes never wait on, or hold,
//! one lane; batches travel as arrays (`UNNEST`); and, because a claim
//! reads the queue in a snapshot taken when it starts, the recheck and
//! `emptied` of invariant 5 ([`EMPTIED_LANE_RECHECK`]).

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use sqlx::PgConnection;
use sqlx::postgres::PgRow;

use crate::clock::{Millis, millis};
use crate::domain::lane::{self, Batch, BreakerPolicy, Gcra, LaneState};
use crate::domain::{AppId, AttemptRecord, ClaimRequest, ClaimToken};
use crate::store::StoreResult;
use crate::store::rows::{
    CLAIMED_COLUMNS, CLAIMED_JOINS, LANE_COLUMNS, ReadRow, lane_state, stored_rate,
};

/// How soon a lane is looked at again after a claim that left it with
/// room and nothing more it could see. A claim reads the queue as it was
/// when the claim began, so work a publish commits meanwhile is invisible
/// to it, and that publish's wake (`wakeable`), which neither waits for
/// nor takes the lane's lock, may have seen the lane due and left it. So
/// such a claim leaves the lane due at this time. A look that then finds
/// nothing marks the lane `emptied` and looks once more; publishes treat
/// an emptied lane as idle and wake it under its lock, so the look after
/// that, which idles the lane, cannot miss them. The work of every
/// publish whose commit took less than this is found; the worker's sweep
/// (`SWEEP`) finds any other.
pub const EMPTIED_LANE_RECHECK: Duration = Duration::from_millis(200);

/// The lanes a publish wakes (`now` is an SQL expression): those
/// [`lane::wakeable`], and emptied ones, which a publish wakes as if idle
/// (see [`EMPTIED_LANE_RECHECK`]). A lane that is due or full is left
/// alone, and so its lock is neither waited for nor taken: a publish
/// holding every lane it touches until its commit (a WAL flush) would make
/// claims skip a busy lane while anyone publishes to it, and publishes to
/// one endpoint would queue on its lane.
pub fn wakeable(now: &str) -> String {
    format!("({}) OR (NOT parked AND emptied)", lane::wakeable(now))
}

/// The CTE `locked` that every statement writing lanes (other than a
/// claim's, which writes only lanes it already holds) starts with: the
/// lanes `filter` picks, locked in webhook order (invariant 4). After
/// waiting for a lock, the filter is read again on the lane as the holder
/// left it.
pub fn locked(filter: &str) -> String {
    format!(
        "locked AS (SELECT webhook_id FROM webhook_lanes WHERE {filter} \
         ORDER BY webhook_id FOR NO KEY UPDATE)"
    )
}

/// create: the CTE inserting a new webhook's lane, idle, for the webhook
/// the CTE `created` returns.
pub const CREATE: &str = "lane AS (INSERT INTO webhook_lanes (webhook_id) SELECT id FROM created)";

/// publish: the CTEs that wake the lanes of a publish's deliveries, in the
/// publish's one statement; `now` and `webhooks` are SQL expressions and
/// `inserted` a condition that the event went in.
pub fn publish_ctes(now: &str, webhooks: &str, inserted: &str) -> String {
    format!(
        "{}, woken AS (UPDATE webhook_lanes SET next_due_at = {} \
         WHERE webhook_id IN (SELECT webhook_id FROM locked))",
        locked(&format!(
            "webhook_id = ANY({webhooks}) AND ({}) AND {inserted}",
            wakeable(now)
        )),
        lane::not_before(now)
    )
}

/// publish (its path for repeats and races): (now, webhooks).
pub static WAKE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {} UPDATE webhook_lanes SET next_due_at = {} \
         WHERE webhook_id IN (SELECT webhook_id FROM locked)",
        locked(&format!("webhook_id = ANY($2) AND ({})", wakeable("$1"))),
        lane::not_before("$1")
    )
});

/// retry: the CTE that wakes the lane of the delivery the CTE `retried`
/// returns, at `$1`. The lane is written whatever its state, so the write
/// waits for a claim holding the lane and reads it as that claim left it;
/// a retry is rare enough for its one-statement transaction to hold the
/// lane's lock.
pub static RETRY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "woken AS (UPDATE webhook_lanes SET next_due_at = CASE WHEN {} THEN {} ELSE next_due_at END \
         WHERE webhook_id IN (SELECT webhook_id FROM retried))",
        lane::wakeable("$1"),
        lane::not_before("$1")
    )
});

/// The next time a lane becomes due after now: (now).
pub const NEXT_DUE: &str = "SELECT MIN(next_due_at) FROM webhook_lanes WHERE next_due_at > $1";

/// claim: lanes with due work no other worker is claiming from, oldest
/// first, locked, with what decides their limits, but none of an app with
/// no room ([`crate::domain::share`]): (now, most lanes, default limit,
/// apps with no room).
pub const DUE: &str = "SELECT l.webhook_id, l.streak, COALESCE(w.max_in_flight, $3), \
     w.rate_limit, w.rate_limit_burst, l.rate_tat, l.breaker_open_since IS NOT NULL, w.app_id \
     FROM webhook_lanes l JOIN webhooks w ON w.id = l.webhook_id \
     WHERE l.next_due_at IS NOT NULL AND l.next_due_at <= $1 AND NOT (w.app_id = ANY($4::text[])) \
     ORDER BY l.next_due_at LIMIT $2 FOR UPDATE OF l SKIP LOCKED";

/// claim: from the locked lanes, ending in `claimed` (the leased
/// deliveries): (now, most deliveries, lanes, their [`lane::claim_limit`]
/// limits, lease end, token, recheck time, and per lane, from its
/// [`lane::Gcra`], the most its rate limit allows, the base of its rate
/// state, its interval, and the base of its hold; NULL where unlimited).
/// A rate-limited lane takes at most what its limit allows, moves its
/// rate state on by what it took (`base + taken × interval`, as
/// [`lane::Gcra::tat_after`]) and is held until its next delivery may go
/// (as [`lane::Gcra::held_until`]). Each lane ends as
/// [`lane::ClaimEnd`] says (full when what it took filled its room,
/// parked until its first live lease ends), applied here rather than in a
/// third round trip while the lanes are locked; a lane left with room is
/// due again at the recheck time ([`EMPTIED_LANE_RECHECK`]). The
/// deliveries' own locks are skipped, never waited for, and a lease is set
/// only where the row is still due when it is written. Each lane offers at
/// most its part of the claim (the claim's size over the lanes', at least
/// one): every row offered is locked, and locking eight from each of 64
/// lanes to keep 64 cost 7 of a claim's 10 ms. The lease is written to the
/// rows `due` locked, found by their `ctid` (a TID scan; locked by this
/// statement, they cannot move before it writes them). Joined by id, the
/// planner guessed `due` at the whole limit and scanned the table with a
/// hash join (5 of a claim's 9 ms with 10,000 queued); matched against an
/// array of ids, a table growing under publishing was planned worse still.
pub const CLAIM: &str = "WITH lanes AS ( \
         SELECT * FROM UNNEST($3::text[], $4::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[]) \
         AS l(webhook_id, max_in_flight, most, rate_base, rate_interval, hold_base)), \
     room AS ( \
         SELECT lanes.*, lanes.max_in_flight - ( \
             SELECT count(*) FROM deliveries s \
             WHERE s.webhook_id = lanes.webhook_id AND s.status = 'sending' AND s.due_at > $1) AS room \
         FROM lanes), \
     due AS ( \
         SELECT d.id, d.row, d.webhook_id, d.due_at FROM room CROSS JOIN LATERAL ( \
             SELECT x.id, x.ctid AS row, x.webhook_id, x.due_at FROM deliveries x \
             WHERE x.webhook_id = room.webhook_id AND x.due_at IS NOT NULL AND x.due_at <= $1 \
             ORDER BY x.due_at \
             LIMIT GREATEST(LEAST(room.room, room.most, GREATEST($2 / (SELECT count(*) FROM lanes), 1)), 0) \
             FOR UPDATE SKIP LOCKED) d \
         ORDER BY d.due_at LIMIT $2), \
     claimed AS ( \
         UPDATE deliveries d SET status = 'sending', due_at = $5, claim_token = $6, updated_at = $1 \
         WHERE d.ctid = ANY(ARRAY(SELECT row FROM due)) AND d.due_at IS NOT NULL AND d.due_at <= $1 \
         RETURNING d.id, d.claim_token, d.attempts, d.app_id, d.event_id, d.webhook_id, d.ordering_key), \
     taken AS (SELECT webhook_id, count(*) AS n FROM due GROUP BY webhook_id), \
     rescheduled AS ( \
         UPDATE webhook_lanes l SET \
             parked = r.room <= COALESCE(t.n, 0), \
             emptied = t.n IS NULL AND r.room > 0 AND NOT l.emptied, \
             rate_tat = COALESCE(r.rate_base + COALESCE(t.n, 0) * r.rate_interval, l.rate_tat), \
             held_until = (r.hold_base + COALESCE(t.n, 0) * r.rate_interval + 999) / 1000, \
             next_due_at = (SELECT CASE WHEN v < h THEN h ELSE v END FROM (SELECT LEAST( \
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
                     ORDER BY x.due_at LIMIT 1) END) AS v, \
                 (r.hold_base + COALESCE(t.n, 0) * r.rate_interval + 999) / 1000 AS h) AS candidate) \
         FROM room r LEFT JOIN taken t ON t.webhook_id = r.webhook_id \
         WHERE l.webhook_id = r.webhook_id)";

/// record: the CTE `lanes`, following the CTE `updated` (the recorded
/// deliveries' ids and webhooks) in the recorder's first statement: their
/// lanes, locked in webhook order (invariant 4), as the claim holding any
/// of them left it. Locked in the same statement that writes the
/// deliveries, it costs the recorder no round trip of its own.
pub static LOCK_RECORDED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "lanes AS (SELECT {LANE_COLUMNS} FROM webhook_lanes \
         WHERE webhook_id IN (SELECT webhook_id FROM updated) ORDER BY webhook_id FOR NO KEY UPDATE)"
    )
});
/// record: the lanes as [`LaneState::recorded`] decided: (webhooks, next
/// due, parked, streak, hold, and their breakers' open since, probe wait,
/// window start, attempts and failures).
pub const WRITE: &str = "UPDATE webhook_lanes l SET next_due_at = w.next_due_at, parked = w.parked, \
     streak = w.streak, held_until = w.held_until, breaker_open_since = w.open_since, probe_ms = w.probe_ms, \
     window_start = w.window_start, window_attempts = w.attempts, window_failures = w.failures \
     FROM UNNEST($1::text[], $2::bigint[], $3::boolean[], $4::bigint[], $5::bigint[], $6::bigint[], \
                 $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[]) \
          AS w(webhook_id, next_due_at, parked, streak, held_until, open_since, probe_ms, window_start, \
               attempts, failures) \
     WHERE l.webhook_id = w.webhook_id";
/// The breakers of some webhooks' lanes, for the API: (webhooks).
pub static BREAKERS: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {LANE_COLUMNS} FROM webhook_lanes WHERE webhook_id = ANY($1)")
});
/// How many lanes' breakers are open, and of those how many are held
/// until a probe: (now).
pub const OPEN_BREAKERS: &str = "SELECT count(*), count(*) FILTER (WHERE held_until > $1) \
     FROM webhook_lanes WHERE breaker_open_since IS NOT NULL";

/// raise limit: slots of these lanes came free: (now, webhooks). Every
/// lane is written whatever its state, so the write waits for a claim
/// holding the lane, which may have counted the lane full, and then reads
/// the lane as that claim left it.
pub static ROOM: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {} UPDATE webhook_lanes SET parked = FALSE, next_due_at = CASE \
             WHEN parked OR next_due_at IS NULL OR next_due_at > {now} THEN {now} ELSE next_due_at END \
         WHERE webhook_id IN (SELECT webhook_id FROM locked)",
        locked("webhook_id = ANY($2)"),
        now = lane::not_before("$1")
    )
});

/// release: claimed deliveries go back, due now, and their lanes have room
/// again: (now, delivery ids, their claim tokens).
pub static RELEASE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH released AS ( \
             UPDATE deliveries d SET status = CASE WHEN attempts = 0 THEN 'pending' ELSE 'failed' END, \
             due_at = $1, claim_token = NULL, updated_at = $1 \
             FROM UNNEST($2::text[], $3::text[]) AS c(id, token) \
             WHERE d.id = c.id AND d.claim_token = c.token RETURNING d.webhook_id), \
         {} \
         UPDATE webhook_lanes SET parked = FALSE, next_due_at = {} \
         WHERE webhook_id IN (SELECT webhook_id FROM locked)",
        locked("webhook_id IN (SELECT webhook_id FROM released)"),
        lane::not_before("$1")
    )
});

/// sweep: [`lane::wakeable`] lanes with work due: (now).
pub static SWEEP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {} UPDATE webhook_lanes SET next_due_at = {} \
         WHERE webhook_id IN (SELECT webhook_id FROM locked)",
        locked(&format!(
            "{} AND EXISTS (SELECT 1 FROM deliveries d \
                 WHERE d.webhook_id = webhook_lanes.webhook_id AND d.due_at IS NOT NULL AND d.due_at <= $1)",
            lane::wakeable("$1")
        )),
        lane::not_before("$1")
    )
});

/// claim: locks the due lanes, decides their limits, and takes from them
/// ([`CLAIM`]); returns the claimed rows.
pub async fn claim(
    c: &mut PgConnection,
    request: &ClaimRequest,
    now: Millis,
) -> StoreResult<Vec<PgRow>> {
    let rows: Vec<DueRow> = sqlx::query_as(DUE)
        .bind(now)
        .bind(i64::from(request.limit))
        .bind(i64::from(request.default_max_in_flight.get()))
        .bind(request.apps.full())
        .fetch_all(&mut *c)
        .await?;
    let apps: Vec<AppId> = rows.iter().map(|row| AppId::from(row.7.as_str())).collect();
    let shares = request.apps.split(&apps.iter().collect::<Vec<_>>());
    let mut lanes = DueLanes::default();
    for ((webhook, streak, limit, per_second, burst, tat, breaker_open, _), share) in
        rows.into_iter().zip(shares)
    {
        // A lane its app has no room left for stays as it is, due.
        if share == Some(0) {
            continue;
        }
        let rate = per_second.map(|n| stored_rate(n, burst)).transpose()?;
        let in_flight = lane::claim_limit(streak, limit, breaker_open);
        lanes.push(webhook, in_flight, rate.map(Gcra::new), tat, share, now);
    }
    if lanes.webhooks.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!("{CLAIM} SELECT {CLAIMED_COLUMNS} FROM claimed d {CLAIMED_JOINS}");
    Ok(sqlx::query(&sql)
        .bind(now)
        .bind(i64::from(request.limit))
        .bind(lanes.webhooks)
        .bind(lanes.in_flight)
        .bind(now + millis(request.lease))
        .bind(ClaimToken::new().as_str())
        .bind(now + millis(EMPTIED_LANE_RECHECK))
        .bind(lanes.most)
        .bind(lanes.rate_base)
        .bind(lanes.rate_interval)
        .bind(lanes.hold_base)
        .fetch_all(&mut *c)
        .await?)
}

/// A row of [`DUE`]: webhook, streak, in-flight limit, rate limit, burst,
/// rate state, breaker open, app.
type DueRow = (
    String,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    bool,
    String,
);

/// The locked due lanes, column by column, with what was decided for
/// each: its in-flight limit, the most it may take (its app's share of
/// the claim, and, if rate-limited, its [`Gcra`] allowance).
#[derive(Default)]
struct DueLanes {
    webhooks: Vec<String>,
    in_flight: Vec<i64>,
    most: Vec<Option<i64>>,
    rate_base: Vec<Option<i64>>,
    rate_interval: Vec<Option<i64>>,
    hold_base: Vec<Option<i64>>,
}

impl DueLanes {
    fn push(
        &mut self,
        webhook: String,
        in_flight: i64,
        rate: Option<Gcra>,
        tat: Option<i64>,
        share: Option<i64>,
        now: Millis,
    ) {
        let allowed = rate.map(|gcra| (gcra, gcra.allowance(tat, now)));
        let rate_most = allowed.map(|(_, a)| a.most);
        self.webhooks.push(webhook);
        self.in_flight.push(in_flight);
        self.most.push(match (rate_most, share) {
            (Some(rate), Some(share)) => Some(rate.min(share)),
            (rate, share) => rate.or(share),
        });
        self.rate_base.push(allowed.map(|(_, a)| a.base_us));
        self.rate_interval.push(rate.map(Gcra::interval_us));
        self.hold_base
            .push(allowed.map(|(gcra, a)| a.base_us - gcra.tolerance_us()));
    }
}

/// record: each lane with attempts in `applied` moves on as
/// [`LaneState::recorded`] decides, from `locked`, the rows of
/// [`LOCK_RECORDED`] (rows without a lane are passed over). The lanes were
/// locked and read whatever their state, so the recorder waited for a
/// claim holding one, which may have counted these attempts as in flight
/// and parked the lane full, and read the lane as that claim left it;
/// lanes whose state stays as it was are not written.
pub async fn record<'a>(
    c: &mut PgConnection,
    locked: &[PgRow],
    applied: impl IntoIterator<Item = &'a AttemptRecord>,
    now: Millis,
    policy: &BreakerPolicy,
) -> StoreResult<()> {
    let batches: HashMap<&str, Batch> = lane::batches(applied)
        .into_iter()
        .map(|(w, b)| (w.as_str(), b))
        .collect();
    let mut written = LaneColumns::default();
    for row in locked {
        if row.value::<Option<String>>("webhook_id")?.is_none() {
            continue;
        }
        let (webhook, before) = lane_state(row)?;
        let Some(&batch) = batches.get(webhook.as_str()) else {
            continue;
        };
        let after = before.recorded(batch, now, policy);
        if after != before {
            written.push(webhook.into(), after);
        }
    }
    if written.webhooks.is_empty() {
        return Ok(());
    }
    sqlx::query(WRITE)
        .bind(written.webhooks)
        .bind(written.next_due_at)
        .bind(written.parked)
        .bind(written.streak)
        .bind(written.held_until)
        .bind(written.open_since)
        .bind(written.probe_ms)
        .bind(written.window_start)
        .bind(written.window_attempts)
        .bind(written.window_failures)
        .execute(&mut *c)
        .await?;
    Ok(())
}

/// Lanes to [`WRITE`], column by column.
#[derive(Default)]
struct LaneColumns {
    webhooks: Vec<String>,
    next_due_at: Vec<Option<Millis>>,
    parked: Vec<bool>,
    streak: Vec<i64>,
    held_until: Vec<Option<Millis>>,
    open_since: Vec<Option<Millis>>,
    probe_ms: Vec<Millis>,
    window_start: Vec<Millis>,
    window_attempts: Vec<i64>,
    window_failures: Vec<i64>,
}

impl LaneColumns {
    fn push(&mut self, webhook: String, lane: LaneState) {
        self.webhooks.push(webhook);
        self.next_due_at.push(lane.next_due_at);
        self.parked.push(lane.parked);
        self.streak.push(lane.streak);
        self.held_until.push(lane.held_until);
        let breaker = lane.breaker;
        self.open_since.push(breaker.open_since);
        self.probe_ms.push(breaker.probe_ms);
        self.window_start.push(breaker.window_start);
        self.window_attempts.push(breaker.window_attempts);
        self.window_failures.push(breaker.window_failures);
    }
}
