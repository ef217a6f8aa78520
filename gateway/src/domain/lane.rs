//! The lane: one webhook's part of the delivery queue, as a state machine.
//! This module owns its states, its transitions and the rules that decide
//! them; the stores keep the state in a row per webhook (`webhook_lanes`)
//! and apply each transition with one named statement (the `lanes`
//! module of each backend), using the decisions made here.
//!
//! # State
//!
//! A lane's row holds `next_due_at` (when a claim should look at it next),
//! `parked`, `streak` (consecutive successes, positive, or failures,
//! negative; see [`Batch`]), `held_until` (no claim before then),
//! `rate_tat` (its rate limit's state, see [`Gcra`]), its circuit
//! breaker ([`Breaker`]: `breaker_open_since`, `probe_ms` and the
//! `window_*` counts) and, on PostgreSQL only, `emptied`. Read at a time `now`, a lane is in one of these
//! states:
//!
//! | state    | `next_due_at` | `parked` | meaning |
//! |----------|---------------|----------|---------|
//! | idle     | NULL          | false    | nothing queued, as far as the lane knows |
//! | due      | ≤ now         | false    | a claim takes from it now |
//! | waiting  | > now         | false    | its earliest work is due then (a retry's backoff, a recheck) |
//! | full     | a lease's end | true     | at its in-flight limit: only a finished attempt, a release or that lease running out makes room |
//! | paused   | the pause's end | true   | paced after failures ([`pause`]): one attempt, then this pause |
//! | held     | `held_until` > now | false | its rate limit's next delivery, a throttling answer's wait ([`throttle`]) or its open breaker's next probe is not yet due |
//!
//! Whatever the state, `next_due_at` is never before `held_until`: every
//! transition that sets it sets it to [`not_before`] the time it means.
//!
//! A claim looks only at lanes with `next_due_at ≤ now` (an index on
//! `next_due_at`), so a full or paused lane costs no claim anything until
//! its time comes.
//!
//! # Transitions
//!
//! | transition | when | effect | statement (PostgreSQL / SQLite) |
//! |------------|------|--------|---------------------------------|
//! | create     | a webhook is created | idle, streak 0 | `CREATE` |
//! | publish    | an event queues work for the lane | [`wakeable`] lanes become due now ([`not_before`] their hold); others are left as they are | `publish_ctes` in the publish's statement, `WAKE` on its slow path / `WAKE` |
//! | retry      | a manual retry queues a delivery due now | as publish | `RETRY` / `WAKE` |
//! | claim      | a worker takes up to the lane's room ([`claim_limit`] less live leases), its rate limit's allowance ([`Gcra`]) and its app's part of the worker's room ([`super::share`]; the lanes of an app with none are not looked at, and stay as they are) | [`ClaimEnd`]: full at its first live lease end, or due at its next due delivery; held until its rate limit's next delivery | `DUE` + `CLAIM` / `DUE`, `LIVE`, `TAKE`, `PARK` or `NEXT` |
//! | record     | a batch of its attempts is written | [`LaneState::recorded`]: the streak and the breaker's counts move on; held while a throttling answer asked, or until the next probe when the breaker opens or a probe fails; closed by a success; paused, or due now | `LOCK_RECORDED` (in the recorder's first statement) + `WRITE` / `READ` + `WRITE` |
//! | release    | claims are given back unattempted | due now, not parked | `RELEASE` / `ROOM` |
//! | raise limit | the webhook is updated (its limit may have risen) | as release, unless already due | `ROOM` |
//! | lease end  | a worker died holding claims | nothing is written: a full lane is due at its first lease end, where a claim counts the expired lease as room and takes the delivery over | – |
//! | sweep      | every worker, every 15 s | [`wakeable`] lanes with a due delivery become due now ([`not_before`] their hold) | `SWEEP` |
//!
//! # Invariants
//!
//! 1. **Limits hold across processes.** At most [`in_flight`] deliveries of
//!    a lane are `sending` under a live lease. A claim counts live leases
//!    and takes deliveries while it holds the lane (PostgreSQL: the lane
//!    row locked `FOR UPDATE`, other claims skip it; SQLite: the one
//!    writer), in a snapshot taken after the lock, so it sees every claim
//!    committed before it on that lane.
//! 2. **Rules are decided here, under the lane's lock.** Limits
//!    ([`in_flight`]), rate allowances ([`Gcra`]), pauses ([`pause`]),
//!    throttling ([`throttle`]) and streaks ([`LaneState::recorded`]) are
//!    computed in Rust from the lane as read with its lock held; the
//!    statements only write what was decided (a claim's, which cannot know
//!    what it takes before it runs, applies the linear results
//!    [`Gcra::tat_after`] and [`Gcra::held_until`] describe). Two
//!    recorders of one lane are serialised by that lock, so neither loses
//!    the other's streak or hold, and two claims never spend one rate
//!    allowance twice.
//! 3. **A parked lane is woken only by what frees room**: a record, a
//!    release, a raised limit, or its own `next_due_at` (the first lease
//!    end, or the pause's end). Publishes, retries and sweeps leave it
//!    alone, so a hanging endpoint is not looked at on every claim; a
//!    held lane is left at `held_until` by all of them alike.
//! 4. **Lanes are locked in webhook order.** Every statement that writes
//!    several lanes locks them ordered by `webhook_id`, so two never wait
//!    on each other in a cycle; claims skip locked lanes and wait for
//!    nothing.
//! 5. **No work is stranded.** Every transition that makes work due, or
//!    frees room, leaves its lane due. Records, releases, retries and
//!    raised limits write the lane under its lock, after any claim holding
//!    it, and so read the lane as that claim left it. A publish does not
//!    wait for a claim (publishes to a busy endpoint would queue behind its
//!    claims): on PostgreSQL a claim reads the queue in a snapshot taken
//!    when it starts and can miss a publish committed meanwhile, so a claim
//!    that leaves a lane with room looks again after a recheck delay
//!    (`EMPTIED_LANE_RECHECK`), and a look that finds nothing marks the
//!    lane `emptied` and looks once more; publishes wake an emptied lane
//!    (under its lock) as if idle, so the look that finally idles the lane
//!    cannot miss them. SQLite's one writer runs one statement at a time
//!    and needs neither. The sweep is the backstop for a wake-up lost to a
//!    process stopping between a publish's commit and its wake, or a
//!    publish whose commit outlasted the recheck: a delay, never a loss.
//! 6. **Held-back deliveries spend nothing.** A delivery waits in the queue
//!    while its lane is full or paused; only a claim starts an attempt,
//!    and only an attempt is counted against the retry schedule.
//!
//! # Why the lane lives in the database, not with a leasing worker
//!
//! The alternative (Hatchet's one process per queue, awa's run leases) is
//! to lease each lane to one worker for a few seconds and keep its limits
//! in that worker's memory, fenced by the lease. It was not taken: every
//! claim here already holds the lanes it takes from, under a row lock a
//! transaction long (invariant 1), so limits are exact across processes
//! without a second kind of lease; a lane held by one process would cap a
//! busy endpoint at what that process can send, and hand its backlog over
//! only when the lease lapses; and SQLite has one process, where a lease
//! buys nothing. What the lease would save, writing lane state with each
//! claim and record, is a few rows per batch of deliveries, one statement
//! each, on rows the transaction locks anyway.
//!
//! # Pacing
//!
//! A webhook that has not just succeeded (a new one, or one whose last
//! attempt failed) gets two attempts in flight, doubling with every
//! success up to its limit, so a first batch never floods an endpoint
//! nobody knows yet. One whose attempts keep failing (its endpoint answers
//! errors or hangs, or its plugin keeps failing) gets one attempt at a
//! time and a pause after each, doubling with every further failure up to
//! a cap; its first success lifts both. A receiver that is down for a
//! while is neither hammered nor burns its retries, and its neighbours
//! keep the workers' time.

use std::collections::BTreeMap;

use super::{AttemptRecord, RateLimit, WebhookEffect, WebhookId};
use crate::clock::Millis;

/// Consecutive failed attempts after which a webhook is paced.
pub const PACE_AFTER_FAILURES: i64 = 5;
/// The pause after the first paced attempt, in milliseconds.
pub const FIRST_PAUSE_MS: i64 = 10;
/// The longest pause between two paced attempts, in milliseconds.
pub const LONGEST_PAUSE_MS: i64 = 1_000;
/// Attempts in flight to a webhook without a success streak.
pub const FIRST_IN_FLIGHT: i64 = 2;
/// The longest streak kept: two in flight doubled this often exceeds any
/// in-flight limit, and a pause this often doubled exceeds the longest, so
/// a lane in its steady state (healthy, or paced at the longest pause) is
/// not written again for every batch.
pub const LONGEST_STREAK: i64 = 16;

/// A lane's stored state (see the module's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LaneState {
    pub next_due_at: Option<Millis>,
    pub parked: bool,
    pub streak: i64,
    /// No claim looks at the lane before this time: its rate limit's next
    /// delivery, the end of a throttling answer's wait ([`throttle`]), or
    /// its open breaker's next probe.
    pub held_until: Option<Millis>,
    pub breaker: Breaker,
}

impl LaneState {
    /// The lane after a batch of its attempts was recorded at `now`: the
    /// streak moves on; a paced lane pauses (parked until the pause ends),
    /// any other is due now unless it is already, since a slot came free.
    pub fn recorded(self, batch: Batch, now: Millis, policy: &BreakerPolicy) -> Self {
        let streak = batch.applied_to(self.streak);
        let probe_due = self.held_until.is_none_or(|held| held <= now);
        let (breaker, armed) = self.breaker.recorded(&batch, now, probe_due, policy);
        let probe_at = armed.then_some(now + breaker.probe_ms);
        let held_until = self.held_until.max(batch.throttled_until).max(probe_at);
        let held = Self { held_until, ..self };
        if let Some(pause) = pause(streak) {
            return Self {
                next_due_at: Some(held.not_before(now + pause)),
                parked: true,
                streak,
                held_until,
                breaker,
            };
        }
        let next_due_at = match self.next_due_at {
            Some(due) if !self.parked && due <= now => held.not_before(due),
            _ => held.not_before(now),
        };
        Self {
            next_due_at: Some(next_due_at),
            parked: false,
            streak,
            held_until,
            breaker,
        }
    }

    /// Whether work that became due at `now` makes this lane due (see
    /// [`wakeable`]).
    pub fn wakeable(&self, now: Millis) -> bool {
        !self.parked
            && self
                .next_due_at
                .is_none_or(|due| due > self.not_before(now))
    }

    /// The earliest time the lane may be due from `at` on: not before its
    /// hold ends.
    pub fn not_before(&self, at: Millis) -> Millis {
        self.held_until.map_or(at, |held| held.max(at))
    }
}

/// When an endpoint's circuit breaker opens, and how it probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// The share of failed attempts, in percent, that opens it ...
    pub failure_percent: i64,
    /// ... of at least this many attempts ...
    pub min_attempts: i64,
    /// ... within a window this long.
    pub window_ms: Millis,
    /// How long after opening it sends its first probe; each failed probe
    /// doubles the wait, up to [`LONGEST_PROBE_MS`].
    pub first_probe_ms: Millis,
}

/// The longest an open breaker waits between two probes.
pub const LONGEST_PROBE_MS: Millis = 300_000;

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failure_percent: 70,
            min_attempts: 10,
            window_ms: 300_000,
            first_probe_ms: 5_000,
        }
    }
}

/// A lane's circuit breaker, built on its hold: an endpoint whose recent
/// attempts mostly failed ([`BreakerPolicy`]) opens it, and then its lane
/// is held (its deliveries wait, spending no attempts) until a probe is
/// due; the claim then lets one attempt through ([`claim_limit`]). A
/// probe that succeeds closes the breaker; one that fails holds the lane
/// again, twice as long. Attempts are counted in windows of the policy's
/// length, each starting with the first attempt after the last ended.
/// Throttling answers ([`throttle`]) and skips are not counted: they hold
/// or leave the lane on their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Breaker {
    /// Since when it is open; `None`: closed.
    pub open_since: Option<Millis>,
    /// The wait before the next probe while open.
    pub probe_ms: Millis,
    pub window_start: Millis,
    pub window_attempts: i64,
    pub window_failures: i64,
}

/// What a breaker shows: `closed`, `open` (holding its lane until the next
/// probe) or `half_open` (a probe may go, or is on its way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

impl Breaker {
    /// The breaker after a batch of its lane's attempts at `now`, and
    /// whether it holds its lane from now until its next probe: when it
    /// opens, and when a probe fails. `probe_due`: the lane's hold had
    /// ended, so a failure is a probe's, not one of the attempts that were
    /// in flight when it opened (those leave it as it is).
    pub fn recorded(
        self,
        batch: &Batch,
        now: Millis,
        probe_due: bool,
        policy: &BreakerPolicy,
    ) -> (Self, bool) {
        let (successes, failures) = (batch.successes, batch.failures);
        if successes + failures == 0 {
            return (self, false);
        }
        if self.open_since.is_some() {
            return match (successes > 0, probe_due) {
                (true, _) => (Self::closed_at(now), false),
                (false, true) => {
                    let probe_ms = (self.probe_ms * 2).clamp(1, LONGEST_PROBE_MS);
                    (Self { probe_ms, ..self }, true)
                }
                (false, false) => (self, false),
            };
        }
        let mut next = if now - self.window_start >= policy.window_ms {
            Self::closed_at(now)
        } else {
            self
        };
        next.window_attempts += successes + failures;
        next.window_failures += failures;
        let opens = next.window_attempts >= policy.min_attempts
            && next.window_failures * 100 >= policy.failure_percent * next.window_attempts;
        if opens {
            next.open_since = Some(now);
            next.probe_ms = policy.first_probe_ms.clamp(1, LONGEST_PROBE_MS);
        }
        (next, opens)
    }

    fn closed_at(now: Millis) -> Self {
        Self {
            window_start: now,
            ..Self::default()
        }
    }

    /// What it shows at `now`, for a lane held until `held_until`.
    pub fn state(&self, held_until: Option<Millis>, now: Millis) -> BreakerState {
        match self.open_since {
            None => BreakerState::Closed,
            Some(_) if held_until.is_some_and(|held| held > now) => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// The share of the current window's attempts that failed, if any were
    /// made.
    pub fn failure_rate(&self) -> Option<f64> {
        (self.window_attempts > 0)
            .then(|| self.window_failures as f64 / self.window_attempts as f64)
    }
}

/// Attempts in flight allowed at once to a lane: [`in_flight`], or one
/// (the probe) while its breaker is open.
pub fn claim_limit(streak: i64, limit: i64, breaker_open: bool) -> i64 {
    if breaker_open {
        1
    } else {
        in_flight(streak, limit)
    }
}

/// In SQL both backends run: the earliest time a lane may be due from
/// `at` (an SQL expression) on, as [`LaneState::not_before`].
pub fn not_before(at: &str) -> String {
    format!("CASE WHEN held_until > {at} THEN held_until ELSE {at} END")
}

/// The condition, in SQL both backends run, of a lane that work becoming
/// due at `now` (an SQL expression) makes due, at [`not_before`]`(now)`:
/// one neither parked (invariant 3) nor due as early as it may be already.
/// Mirrors [`LaneState::wakeable`].
pub fn wakeable(now: &str) -> String {
    format!(
        "NOT parked AND (next_due_at IS NULL OR next_due_at > {})",
        not_before(now)
    )
}

/// A webhook's rate limit as its lane applies it: the generic cell rate
/// algorithm, whose whole state is one time kept on the lane, `rate_tat`
/// (the theoretical arrival time of the next delivery, in microseconds).
/// Deliveries are spaced `interval` apart on average, and `tolerance`
/// lets up to the burst go at once; over any window of `w` seconds at
/// most `burst + w × rate` go. Claims read and write `rate_tat` with the
/// lane locked (invariant 1), so the limit holds across processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    interval_us: i64,
    tolerance_us: i64,
}

/// What a rate limit allows one claim: at most `most` deliveries, counted
/// from `base_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateAllowance {
    pub most: i64,
    pub base_us: i64,
}

impl Gcra {
    pub fn new(limit: RateLimit) -> Self {
        let interval_us = (1_000_000 / i64::from(limit.per_second())).max(1);
        Self {
            interval_us,
            tolerance_us: interval_us * (i64::from(limit.burst()) - 1),
        }
    }

    pub fn interval_us(self) -> i64 {
        self.interval_us
    }

    pub fn tolerance_us(self) -> i64 {
        self.tolerance_us
    }

    /// How many deliveries may go at `now`, given the lane's `rate_tat`.
    pub fn allowance(self, tat_us: Option<i64>, now: Millis) -> RateAllowance {
        let now_us = now.saturating_mul(1000);
        let base_us = tat_us.map_or(now_us, |tat| tat.max(now_us));
        let slack = now_us + self.tolerance_us - base_us;
        let most = if slack < 0 {
            0
        } else {
            slack / self.interval_us + 1
        };
        RateAllowance { most, base_us }
    }

    /// The lane's `rate_tat` after `taken` of `allowance` went.
    pub fn tat_after(self, allowance: RateAllowance, taken: i64) -> i64 {
        allowance.base_us + taken * self.interval_us
    }

    /// When the next delivery may go after `taken` of `allowance` went:
    /// the lane's hold.
    pub fn held_until(self, allowance: RateAllowance, taken: i64) -> Millis {
        ceil_ms(self.tat_after(allowance, taken) - self.tolerance_us)
    }
}

/// Microseconds as milliseconds, rounded up, so that a lane held until
/// then finds the next delivery allowed.
fn ceil_ms(us: i64) -> Millis {
    us.div_euclid(1000) + i64::from(us.rem_euclid(1000) > 0)
}

/// How a claim leaves a lane it held, from its room (its limit less the
/// live leases it counted) and what it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimEnd {
    /// At its limit: parked until its first live lease ends.
    Full,
    /// Room left: due at its next due delivery (idle if none).
    Open,
}

impl ClaimEnd {
    pub fn of(room: i64, taken: i64) -> Self {
        if taken >= room {
            Self::Full
        } else {
            Self::Open
        }
    }
}

/// The longest a throttling answer holds its lane, whatever it asks.
pub const LONGEST_THROTTLE_MS: Millis = 60_000;
/// How long a 429 that does not say how long to wait holds its lane.
pub const DEFAULT_THROTTLE_MS: Millis = 1_000;

/// Whether an answer throttles its whole endpoint, and until when: a 429,
/// or a 502, 503 or 504 that says when to come back (`Retry-After`), holds
/// the webhook's lane that long (a 429 without it, a second), at most
/// [`LONGEST_THROTTLE_MS`] and at most `cap` (the longest a delivery waits
/// for its retry: the lane never waits longer than its deliveries). The
/// lane's streak takes the failure as any other, so after the hold it
/// starts again at two in flight and doubles with each success.
pub fn throttle(
    status: Option<u16>,
    retry_after: Option<std::time::Duration>,
    cap: std::time::Duration,
    now: Millis,
) -> Option<Millis> {
    let asked = retry_after.map(crate::clock::millis);
    let wait = match (status?, asked) {
        (429, asked) => asked.unwrap_or(DEFAULT_THROTTLE_MS),
        (502..=504, Some(asked)) => asked,
        _ => return None,
    };
    Some(now + wait.min(LONGEST_THROTTLE_MS).min(crate::clock::millis(cap)))
}

/// What one batch of recorded attempts says about a webhook's lane: the
/// streak it ends on (`trailing`: successes positive, failures negative),
/// whether that streak began inside the batch (`broken`), so it replaces
/// the lane's streak instead of extending it, and the latest a throttling
/// answer in it asked the lane to wait until.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Batch {
    pub trailing: i64,
    pub broken: bool,
    pub throttled_until: Option<Millis>,
    /// Attempts that succeeded, and that failed other than by throttling,
    /// for the [`Breaker`].
    pub successes: i64,
    pub failures: i64,
}

impl Batch {
    fn add(&mut self, record: &AttemptRecord) {
        self.throttled_until = self.throttled_until.max(record.throttled_until);
        match &record.webhook {
            WebhookEffect::Healthy => self.successes += 1,
            WebhookEffect::Failing { .. } | WebhookEffect::Disable { .. }
                if record.throttled_until.is_none() =>
            {
                self.failures += 1
            }
            _ => {}
        }
        self.step(&record.webhook);
    }

    fn step(&mut self, effect: &WebhookEffect) {
        let step = match effect {
            WebhookEffect::Healthy => 1,
            WebhookEffect::Failing { .. } | WebhookEffect::Disable { .. } => -1,
            // A skip or a disabled webhook says nothing about the endpoint.
            WebhookEffect::None => return,
        };
        if self.trailing * step < 0 {
            self.trailing = step;
            self.broken = true;
        } else {
            self.trailing += step;
        }
    }

    /// The lane's streak after this batch, from its streak before.
    pub fn applied_to(self, streak: i64) -> i64 {
        let next = if self.trailing == 0 {
            streak
        } else if self.broken || streak * self.trailing < 0 {
            self.trailing
        } else {
            streak + self.trailing
        };
        next.clamp(-LONGEST_STREAK, LONGEST_STREAK)
    }
}

/// Each webhook in `records` (in their order) with what its attempts
/// there say about its lane ([`Batch`]), in webhook order so that every recorder locks
/// lanes in the same order (invariant 4).
pub fn batches<'a>(
    records: impl IntoIterator<Item = &'a AttemptRecord>,
) -> BTreeMap<&'a WebhookId, Batch> {
    let mut batches: BTreeMap<&WebhookId, Batch> = BTreeMap::new();
    for record in records {
        batches.entry(&record.webhook_id).or_default().add(record);
    }
    batches
}

/// Attempts in flight allowed at once to a webhook with this streak and
/// this configured limit.
pub fn in_flight(streak: i64, limit: i64) -> i64 {
    if streak <= -PACE_AFTER_FAILURES {
        return 1;
    }
    let doublings = streak.clamp(0, LONGEST_STREAK);
    (FIRST_IN_FLIGHT << doublings).min(limit)
}

/// The pause after an attempt that left this streak, if paced.
pub fn pause(streak: i64) -> Option<Millis> {
    let failures = streak.checked_neg()?;
    let doublings = failures.checked_sub(PACE_AFTER_FAILURES)?;
    if doublings < 0 {
        return None;
    }
    Some((FIRST_PAUSE_MS << doublings.min(LONGEST_STREAK)).min(LONGEST_PAUSE_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(effects: &[i64]) -> Batch {
        let mut streak = Batch::default();
        for &step in effects {
            streak.step(&match step {
                1 => WebhookEffect::Healthy,
                -1 => WebhookEffect::Failing {
                    disable_if_failing_since: 0,
                },
                _ => WebhookEffect::None,
            });
        }
        streak
    }

    #[test]
    fn a_batch_extends_or_replaces_the_streak() {
        assert_eq!(batch(&[1, 1]).applied_to(3), 5);
        assert_eq!(batch(&[1, 1]).applied_to(-7), 2);
        assert_eq!(batch(&[-1]).applied_to(40), -1);
        assert_eq!(batch(&[-1, -1, 1]).applied_to(9), 1, "broken in the batch");
        assert_eq!(
            batch(&[1, -1, -1]).applied_to(-3),
            -2,
            "broken in the batch"
        );
        assert_eq!(batch(&[0, 0]).applied_to(-6), -6, "skips change nothing");
        assert_eq!(batch(&[1]).applied_to(LONGEST_STREAK), LONGEST_STREAK);
    }

    #[test]
    fn in_flight_starts_small_doubles_with_successes_and_drops_to_one() {
        assert_eq!(in_flight(0, 32), FIRST_IN_FLIGHT);
        assert_eq!(in_flight(-1, 32), FIRST_IN_FLIGHT);
        assert_eq!(in_flight(1, 32), FIRST_IN_FLIGHT * 2);
        assert_eq!(in_flight(4, 32), 32);
        let most = i64::from(crate::domain::InFlightLimit::MAX);
        assert_eq!(in_flight(LONGEST_STREAK, most), most);
        assert_eq!(in_flight(LONGEST_STREAK, 32), 32);
        assert_eq!(in_flight(0, 1), 1);
        assert_eq!(in_flight(-PACE_AFTER_FAILURES, 32), 1);
    }

    #[test]
    fn pauses_double_from_the_threshold_up_to_the_cap() {
        assert_eq!(pause(1), None);
        assert_eq!(pause(1 - PACE_AFTER_FAILURES), None);
        assert_eq!(pause(-PACE_AFTER_FAILURES), Some(FIRST_PAUSE_MS));
        assert_eq!(pause(-PACE_AFTER_FAILURES - 1), Some(FIRST_PAUSE_MS * 2));
        assert_eq!(pause(-PACE_AFTER_FAILURES - 40), Some(LONGEST_PAUSE_MS));
        assert_eq!(
            pause(-LONGEST_STREAK - PACE_AFTER_FAILURES),
            Some(LONGEST_PAUSE_MS)
        );
    }

    const NOW: Millis = 1_000_000;

    fn lane(next_due_at: Option<Millis>, parked: bool, streak: i64) -> LaneState {
        LaneState {
            next_due_at,
            parked,
            streak,
            held_until: None,
            breaker: Breaker::default(),
        }
    }

    #[test]
    fn a_record_frees_a_slot_now() {
        let due_now = lane(Some(NOW), false, 3);
        for before in [
            lane(None, false, 2),
            lane(Some(NOW + 200), false, 2),
            lane(Some(NOW + 30_000), true, 2),
        ] {
            assert_eq!(
                before.recorded(batch(&[1]), NOW, &BreakerPolicy::default()),
                due_now,
                "{before:?}"
            );
        }
        let due_earlier = lane(Some(NOW - 5), false, 2);
        assert_eq!(
            due_earlier.recorded(batch(&[1]), NOW, &BreakerPolicy::default()),
            lane(Some(NOW - 5), false, 3),
            "a lane already due keeps its place"
        );
    }

    #[test]
    fn a_record_that_leaves_the_lane_paced_pauses_it() {
        let before = lane(Some(NOW - 5), false, 1 - PACE_AFTER_FAILURES);
        assert_eq!(
            before.recorded(batch(&[-1]), NOW, &BreakerPolicy::default()),
            lane(Some(NOW + FIRST_PAUSE_MS), true, -PACE_AFTER_FAILURES)
        );
        let paced = lane(Some(NOW + 9), true, -PACE_AFTER_FAILURES - 2);
        assert_eq!(
            paced.recorded(batch(&[1]), NOW, &BreakerPolicy::default()),
            lane(Some(NOW), false, 1),
            "one success lifts the pause"
        );
        assert_eq!(
            paced.recorded(batch(&[0]), NOW, &BreakerPolicy::default()),
            lane(
                Some(NOW + FIRST_PAUSE_MS * 4),
                true,
                -PACE_AFTER_FAILURES - 2
            ),
            "a skip frees the slot but the lane stays paced"
        );
    }

    #[test]
    fn only_lanes_neither_parked_nor_due_are_woken() {
        assert!(lane(None, false, 0).wakeable(NOW));
        assert!(lane(Some(NOW + 1), false, 0).wakeable(NOW));
        assert!(!lane(Some(NOW), false, 0).wakeable(NOW));
        assert!(!lane(Some(NOW + 1), true, 0).wakeable(NOW));
        assert!(!lane(None, true, 0).wakeable(NOW));
    }

    #[test]
    fn a_claim_that_takes_its_room_leaves_the_lane_full() {
        assert_eq!(ClaimEnd::of(4, 4), ClaimEnd::Full);
        assert_eq!(ClaimEnd::of(0, 0), ClaimEnd::Full);
        assert_eq!(ClaimEnd::of(-2, 0), ClaimEnd::Full, "a lowered limit");
        assert_eq!(ClaimEnd::of(4, 3), ClaimEnd::Open);
    }

    #[test]
    fn a_held_lane_is_not_due_before_its_hold_ends() {
        let held = LaneState {
            held_until: Some(NOW + 70),
            ..lane(None, false, 3)
        };
        assert!(held.wakeable(NOW));
        let woken = LaneState {
            next_due_at: Some(NOW + 70),
            ..held
        };
        assert!(!woken.wakeable(NOW), "due as early as it may be already");
        assert_eq!(
            held.recorded(batch(&[1]), NOW, &BreakerPolicy::default())
                .next_due_at,
            Some(NOW + 70)
        );
        let paused = LaneState {
            held_until: Some(NOW + 70),
            ..lane(Some(NOW - 1), false, -PACE_AFTER_FAILURES)
        };
        assert_eq!(
            paused
                .recorded(batch(&[-1]), NOW, &BreakerPolicy::default())
                .next_due_at,
            Some(NOW + 70),
            "the pause ends before the hold"
        );
    }

    fn gcra(per_second: u64, burst: Option<u64>) -> Gcra {
        Gcra::new(RateLimit::parse(per_second, burst).unwrap())
    }

    #[test]
    fn a_rate_limit_lets_its_burst_go_then_spaces_the_rest() {
        let limit = gcra(10, Some(5));
        let first = limit.allowance(None, NOW);
        assert_eq!(first.most, 5, "a fresh lane's burst");
        let tat = limit.tat_after(first, 5);
        assert_eq!(limit.held_until(first, 5), NOW + 100, "one interval on");
        assert_eq!(limit.allowance(Some(tat), NOW + 99).most, 0);
        assert_eq!(limit.allowance(Some(tat), NOW + 100).most, 1);
        assert_eq!(limit.allowance(Some(tat), NOW + 300).most, 3);
        assert_eq!(
            limit.allowance(Some(tat), NOW + 60_000).most,
            5,
            "no more than the burst after a rest"
        );
        let some = limit.allowance(None, NOW);
        assert_eq!(limit.held_until(some, 2), NOW - 200, "tokens left: no hold");
    }

    /// Claims as often as the lane's hold allows, taking all they may, and
    /// counts what went in every window.
    #[test]
    fn over_any_window_a_rate_limit_sends_its_rate_and_at_most_a_burst_more() {
        for (per_second, burst) in [(10, None), (7, Some(3)), (1_000, None), (3, Some(1))] {
            let limit = gcra(per_second, burst);
            let burst = RateLimit::parse(per_second, burst).unwrap().burst() as i64;
            let (mut tat, mut at, mut sent) = (None, NOW, Vec::new());
            while at < NOW + 20_000 {
                let allowance = limit.allowance(tat, at);
                assert!(allowance.most >= 1, "held until {at} but nothing allowed");
                sent.extend(std::iter::repeat_n(at, allowance.most as usize));
                tat = Some(limit.tat_after(allowance, allowance.most));
                at = limit.held_until(allowance, allowance.most);
            }
            let per_second = per_second as i64;
            for start in (NOW..NOW + 10_000).step_by(37) {
                let n = sent
                    .iter()
                    .filter(|&&t| t >= start && t < start + 10_000)
                    .count() as i64;
                assert!(
                    (10 * per_second - 1..=10 * per_second + burst).contains(&n),
                    "{per_second}/s burst {burst}: {n} in the 10 s from {start}"
                );
            }
        }
    }

    #[test]
    fn throttling_answers_hold_the_lane_as_long_as_they_ask_within_a_cap() {
        let secs = std::time::Duration::from_secs;
        let cap = secs(36_000);
        let at = |status, asked: Option<u64>| throttle(Some(status), asked.map(secs), cap, NOW);
        assert_eq!(at(429, Some(2)), Some(NOW + 2_000));
        assert_eq!(at(429, None), Some(NOW + DEFAULT_THROTTLE_MS));
        assert_eq!(at(503, Some(3)), Some(NOW + 3_000));
        assert_eq!(at(503, None), None, "a 503 that does not ask");
        assert_eq!(at(500, Some(3)), None);
        assert_eq!(throttle(None, None, cap, NOW), None);
        assert_eq!(at(429, Some(86_400)), Some(NOW + LONGEST_THROTTLE_MS));
        assert_eq!(
            throttle(Some(429), Some(secs(3_600)), secs(1), NOW),
            Some(NOW + 1_000),
            "never longer than a delivery's retry"
        );
        let throttled = Batch {
            throttled_until: Some(NOW + 2_000),
            ..batch(&[-1])
        };
        let after =
            lane(Some(NOW - 3), false, 4).recorded(throttled, NOW, &BreakerPolicy::default());
        assert_eq!(
            (after.next_due_at, after.held_until, after.streak),
            (Some(NOW + 2_000), Some(NOW + 2_000), -1),
            "held, and back to two in flight"
        );
    }

    fn outcomes(successes: i64, failures: i64) -> Batch {
        Batch {
            successes,
            failures,
            trailing: if failures > 0 { -failures } else { successes },
            ..Batch::default()
        }
    }

    #[test]
    fn a_breaker_opens_on_mostly_failing_attempts_probes_and_closes() {
        let policy = BreakerPolicy {
            first_probe_ms: 500,
            ..BreakerPolicy::default()
        };
        let mut lane = lane(Some(NOW), false, 0);
        lane = lane.recorded(outcomes(3, 0), NOW, &policy);
        lane = lane.recorded(outcomes(0, 6), NOW + 1, &policy);
        assert_eq!(lane.breaker.open_since, None, "9 attempts are too few");
        lane = lane.recorded(outcomes(0, 1), NOW + 2, &policy);
        assert_eq!(lane.breaker.open_since, Some(NOW + 2), "7 of 10 failed");
        assert_eq!(lane.held_until, Some(NOW + 502));
        assert_eq!(lane.next_due_at, Some(NOW + 502), "its deliveries wait");
        assert_eq!(
            lane.breaker.state(lane.held_until, NOW + 3),
            BreakerState::Open
        );
        assert_eq!(claim_limit(lane.streak, 32, true), 1);

        // Attempts that were in flight when it opened do not push the probe.
        let straggler = lane.recorded(outcomes(0, 3), NOW + 10, &policy);
        assert_eq!(straggler.held_until, Some(NOW + 502));
        assert_eq!(straggler.breaker.probe_ms, 500);

        // The probe fails: held twice as long.
        let failed = straggler.recorded(outcomes(0, 1), NOW + 600, &policy);
        assert_eq!(
            failed.breaker.state(failed.held_until, NOW + 600),
            BreakerState::Open
        );
        assert_eq!(failed.held_until, Some(NOW + 1_600));
        // The next probe succeeds: closed, counting afresh.
        assert_eq!(
            failed.breaker.state(failed.held_until, NOW + 1_600),
            BreakerState::HalfOpen
        );
        let closed = failed.recorded(outcomes(1, 0), NOW + 1_700, &policy);
        assert_eq!(closed.breaker.open_since, None);
        assert_eq!(closed.breaker.failure_rate(), None);
        assert_eq!(closed.next_due_at, Some(NOW + 1_700));
    }

    #[test]
    fn a_breaker_counts_each_window_afresh() {
        let policy = BreakerPolicy::default();
        let mut lane = lane(Some(NOW), false, 0);
        lane = lane.recorded(outcomes(0, 9), NOW, &policy);
        lane = lane.recorded(outcomes(0, 9), NOW + policy.window_ms, &policy);
        assert_eq!(lane.breaker.open_since, None, "9 and 9, in two windows");
        assert_eq!(lane.breaker.failure_rate(), Some(1.0));
        let throttled = Batch {
            throttled_until: Some(NOW + 5),
            ..Batch::default()
        };
        assert_eq!(throttled.successes + throttled.failures, 0);
    }
}
