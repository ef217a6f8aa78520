//! Per-webhook lanes: a claim never hands out more of one webhook's
//! deliveries than its in-flight limit allows, across every claimer, and
//! a webhook at its limit leaves the rest of the claim to the others.

use std::sync::Arc;
use std::time::Duration;

use wasmhook::clock::now_ms;
use wasmhook::domain::{
    App, AttemptOutcome, AttemptRecord, ClaimRequest, ClaimedDelivery, InFlightLimit, NextState,
    Webhook, WebhookEffect,
};

use wasmhook::domain::lane::{self, BreakerPolicy, BreakerState, PACE_AFTER_FAILURES};
use wasmhook::domain::share::Allotment;

use crate::{Fixture, LEASE, fields, succeeded};

/// Pacing alone: a breaker that never opens, so only the pauses hold a
/// failing lane.
fn pacing_only() -> BreakerPolicy {
    BreakerPolicy {
        min_attempts: i64::MAX,
        ..BreakerPolicy::default()
    }
}

async fn limited(f: &Fixture, app: &App, name: &str, max: u64) -> Webhook {
    let mut settings = fields(&format!("https://example.com/{name}"));
    settings.max_in_flight = Some(InFlightLimit::parse(max).unwrap());
    settings.event_types = crate::filter(Some(&[&format!("for.{name}")]));
    f.webhook(app, settings).await
}

/// Publishes `n` events that only the webhook `name` subscribes to.
async fn queue(f: &Fixture, app: &App, name: &str, n: usize) {
    for _ in 0..n {
        f.publish(app, &format!("for.{name}")).await;
    }
}

/// A failed attempt that will be retried in an hour.
fn failed(claimed: &ClaimedDelivery) -> AttemptRecord {
    let mut record = succeeded(claimed);
    if let Some(attempt) = record.attempt.as_mut() {
        attempt.outcome = AttemptOutcome::HttpError;
        attempt.status_code = Some(500);
    }
    record.next = NextState::Retry {
        due_at: now_ms() + 3_600_000,
        error: "HTTP 500".into(),
    };
    record.webhook = WebhookEffect::Failing {
        disable_if_failing_since: 0,
    };
    record
}

fn count_of(claimed: &[ClaimedDelivery], webhook: &Webhook) -> usize {
    claimed
        .iter()
        .filter(|c| c.webhook_id == webhook.id)
        .count()
}

#[tokio::test]
async fn claims_never_exceed_a_webhooks_in_flight_limit() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    limited(&f, &app, "two", 2).await;
    queue(&f, &app, "two", 5).await;

    let first = f.claim(10).await;
    assert_eq!(first.len(), 2, "the limit, not the batch");
    assert!(f.claim(10).await.is_empty(), "both slots are held");

    // A finished attempt frees its slot at once.
    f.store
        .record_attempts(Arc::new(vec![succeeded(&first[0])]))
        .await
        .unwrap();
    assert_eq!(f.claim(10).await.len(), 1);
    assert!(f.claim(10).await.is_empty());

    // So does a claim given back.
    f.store.release(vec![first[1].held()]).await.unwrap();
    assert_eq!(f.claim(10).await.len(), 1);
}

#[tokio::test]
async fn a_webhook_at_its_limit_leaves_the_claim_to_the_others() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    let slow = limited(&f, &app, "slow", 1).await;
    let other = limited(&f, &app, "other", 10).await;
    f.warm(&app, "for.other").await;
    // The slow webhook's backlog is older: it would come first by due time.
    queue(&f, &app, "slow", 50).await;
    queue(&f, &app, "other", 3).await;

    let claimed = f.claim(10).await;
    assert_eq!(
        (count_of(&claimed, &slow), count_of(&claimed, &other)),
        (1, 3)
    );
    assert!(f.claim(10).await.is_empty(), "one at the limit, one empty");
    queue(&f, &app, "other", 2).await;
    let more = f.claim(10).await;
    assert_eq!((count_of(&more, &slow), count_of(&more, &other)), (0, 2));
}

#[tokio::test]
async fn webhooks_without_a_limit_take_the_servers_default() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    let webhook = f.webhook(&app, fields("https://example.com/default")).await;
    assert_eq!(webhook.max_in_flight, None);
    f.warm(&app, "any").await;
    queue(&f, &app, "any", 6).await;
    let request = ClaimRequest {
        limit: 10,
        lease: LEASE,
        default_max_in_flight: InFlightLimit::parse(4).unwrap(),
        apps: Allotment::unlimited(),
    };
    assert_eq!(f.store.claim_due(request).await.unwrap().len(), 4);
}

#[tokio::test]
async fn raising_a_limit_makes_room_at_once() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    let webhook = limited(&f, &app, "grow", 1).await;
    f.warm(&app, "for.grow").await;
    queue(&f, &app, "grow", 5).await;
    assert_eq!(f.claim(10).await.len(), 1);
    let mut raised = fields(&webhook.url);
    raised.event_types = webhook.event_types.clone();
    raised.max_in_flight = Some(InFlightLimit::parse(3).unwrap());
    let updated = f
        .store
        .update_webhook(&app.id, &webhook.id, &raised)
        .await
        .unwrap();
    assert_eq!(updated.max_in_flight.map(InFlightLimit::get), Some(3));
    assert_eq!(f.claim(10).await.len(), 2);
}

#[tokio::test]
async fn an_expired_lease_frees_its_slot_for_the_next_claim() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    limited(&f, &app, "one", 1).await;
    queue(&f, &app, "one", 1).await;
    let lost = f.claim_leased(10, Duration::from_millis(1)).await;
    assert_eq!(lost.len(), 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The dead worker's delivery is taken over, and its slot held again.
    let taken_over = f.claim(10).await;
    assert_eq!(taken_over.len(), 1);
    assert_eq!(taken_over[0].id, lost[0].id);
    assert!(f.claim(10).await.is_empty());
}

#[tokio::test]
async fn work_due_later_is_not_claimed_early_and_a_manual_retry_is_claimed_now() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    limited(&f, &app, "later", 5).await;
    queue(&f, &app, "later", 1).await;
    let claimed = f.claim(10).await.remove(0);
    let mut retry = succeeded(&claimed);
    retry.next = NextState::Retry {
        due_at: now_ms() + 60_000,
        error: "503".into(),
    };
    f.store
        .record_attempts(Arc::new(vec![retry]))
        .await
        .unwrap();
    assert!(f.claim(10).await.is_empty(), "due in a minute");
    f.store.retry_delivery(&app.id, &claimed.id).await.unwrap();
    assert_eq!(f.claim(10).await.len(), 1, "a manual retry is due now");
}

#[tokio::test]
async fn concurrent_claimers_share_one_webhooks_limit() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    limited(&f, &app, "shared", 3).await;
    f.warm(&app, "for.shared").await;
    queue(&f, &app, "shared", 40).await;
    let mut claimers = Vec::new();
    for _ in 0..8 {
        let store = f.store.clone();
        claimers.push(tokio::spawn(async move {
            let request = ClaimRequest {
                limit: 10,
                lease: LEASE,
                default_max_in_flight: InFlightLimit::parse(100).unwrap(),
                apps: Allotment::unlimited(),
            };
            store.claim_due(request).await.expect("claim").len()
        }));
    }
    let mut total = 0;
    for claimer in claimers {
        total += claimer.await.unwrap();
    }
    assert_eq!(
        total, 3,
        "eight claimers at once took {total} of a limit of 3"
    );
}

/// Fails every claimed delivery of the lane until it is paced; returns
/// how many were attempted.
async fn fail_until_paced(f: &Fixture) -> usize {
    let mut failures = 0;
    while failures < PACE_AFTER_FAILURES as usize {
        let claimed = f.claim(100).await;
        assert!(
            !claimed.is_empty(),
            "due work left after {failures} failures"
        );
        failures += claimed.len();
        let records: Vec<AttemptRecord> = claimed.iter().map(failed).collect();
        f.store.record_attempts(Arc::new(records)).await.unwrap();
    }
    failures
}

/// The shortest pause the tests assert holds a lane: longer than a few
/// store calls take on a loaded machine.
const HELD_PAUSE_MS: i64 = 1_000;

/// Fails a paced lane's attempts one at a time, each after the pause
/// before it, until the pause after the last is at least
/// [`HELD_PAUSE_MS`]; returns the failures so far.
async fn fail_while_paced(f: &Fixture, webhook: &Webhook, mut failures: i64) -> i64 {
    loop {
        let pause = lane::pause(-failures).unwrap();
        if pause >= HELD_PAUSE_MS {
            return failures;
        }
        tokio::time::sleep(Duration::from_millis(pause as u64 + 20)).await;
        let paced = f.claim(100).await;
        assert_eq!(paced.len(), 1, "one in flight while paced");
        assert_eq!(count_of(&paced, webhook), 1);
        let records = vec![failed(&paced[0])];
        f.store.record_attempts(Arc::new(records)).await.unwrap();
        failures += 1;
    }
}

#[tokio::test]
async fn a_webhook_starts_with_two_in_flight_and_doubles_with_each_success() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    limited(&f, &app, "new", 10).await;
    queue(&f, &app, "new", 30).await;
    let mut sizes = Vec::new();
    for _ in 0..4 {
        let claimed = f.claim(100).await;
        sizes.push(claimed.len());
        let records: Vec<AttemptRecord> = claimed.iter().map(succeeded).collect();
        f.store.record_attempts(Arc::new(records)).await.unwrap();
    }
    assert_eq!(
        sizes,
        [2, 8, 10, 10],
        "2, then 2 << 2 successes, then the limit"
    );
}

#[tokio::test]
async fn a_webhook_that_keeps_failing_is_paced_until_its_first_success() {
    let f = Fixture::with_breaker(pacing_only()).await;
    let app = f.app("A").await;
    let failing = limited(&f, &app, "failing", 10).await;
    queue(&f, &app, "failing", 40).await;
    let failures = fail_until_paced(&f).await as i64;

    // Paced: one attempt at a time, none during the pause after it.
    let failures = fail_while_paced(&f, &failing, failures).await;
    assert!(f.claim(100).await.is_empty(), "the pause holds the lane");
    let pause = lane::pause(-failures).unwrap() as u64;
    tokio::time::sleep(Duration::from_millis(pause + 50)).await;
    let next = f.claim(100).await;
    assert_eq!(next.len(), 1, "the pause ended");

    // Deliveries held back wait as they are, unclaimed.
    let queue = f.store.queue_stats(now_ms()).await.unwrap();
    assert_eq!((queue.in_flight, queue.pending), (1, 39), "{queue:?}");

    // One success lifts the pacing at once.
    f.store
        .record_attempts(Arc::new(vec![succeeded(&next[0])]))
        .await
        .unwrap();
    assert_eq!(f.claim(100).await.len(), 4, "2 << one success");
}

#[tokio::test]
async fn a_paced_webhook_does_not_hold_up_the_others() {
    let f = Fixture::with_breaker(pacing_only()).await;
    let app = f.app("A").await;
    let failing = limited(&f, &app, "failing", 10).await;
    let healthy = limited(&f, &app, "healthy", 10).await;
    // More than it takes to be paced, so some is still due.
    queue(&f, &app, "failing", 20).await;
    let failures = fail_until_paced(&f).await as i64;
    fail_while_paced(&f, &failing, failures).await;

    queue(&f, &app, "healthy", 2).await;
    let claimed = f.claim(100).await;
    assert_eq!(count_of(&claimed, &healthy), 2);
    assert_eq!(count_of(&claimed, &failing), 0, "paused");
}

#[tokio::test]
async fn a_failing_lane_opens_its_breaker_and_holds_its_deliveries_until_a_probe() {
    let f = Fixture::with_breaker(BreakerPolicy {
        min_attempts: 4,
        first_probe_ms: 1_000,
        ..BreakerPolicy::default()
    })
    .await;
    let app = f.app("A").await;
    let webhook = limited(&f, &app, "down", 10).await;
    queue(&f, &app, "down", 10).await;
    for _ in 0..2 {
        let claimed = f.claim(100).await;
        assert_eq!(claimed.len(), 2, "two in flight without a success");
        let failures = claimed.iter().map(failed).collect();
        f.store.record_attempts(Arc::new(failures)).await.unwrap();
    }
    let lanes = f
        .store
        .lanes(std::slice::from_ref(&webhook.id))
        .await
        .unwrap();
    let (_, lane) = &lanes[0];
    assert!(lane.breaker.open_since.is_some(), "4 of 4 failed: {lane:?}");
    assert_eq!(
        lane.breaker.state(lane.held_until, now_ms()),
        BreakerState::Open
    );
    assert!(f.claim(100).await.is_empty(), "its 6 other deliveries wait");

    tokio::time::sleep(Duration::from_millis(1_050)).await;
    let probe = f.claim(100).await;
    assert_eq!(probe.len(), 1, "one probe");
    assert!(f.claim(100).await.is_empty(), "nothing beside the probe");
    f.store
        .record_attempts(Arc::new(vec![succeeded(&probe[0])]))
        .await
        .unwrap();
    let lanes = f
        .store
        .lanes(std::slice::from_ref(&webhook.id))
        .await
        .unwrap();
    assert_eq!(lanes[0].1.breaker.open_since, None, "closed by the probe");
    assert_eq!(f.claim(100).await.len(), 4, "flowing again, doubling");
}
