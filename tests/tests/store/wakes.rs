//! Work that becomes due while a claim is running is never stranded: a
//! recorded attempt or a manual retry racing a claim on the same lane
//! leaves the lane due, so the next claim takes the work; a racing
//! publish's work is taken at the latest when the lane is looked at again
//! ([`EMPTIED_LANE_RECHECK`]). Each race is run many times, because only
//! some runs overlap the way that once lost a wake-up on PostgreSQL: the
//! claim, reading the queue before the other write committed, marked the
//! lane idle (or full) after it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use wasmhook::domain::{App, ClaimedDelivery, DeliveryId, InFlightLimit, Published, Webhook};
use wasmhook::store::EMPTIED_LANE_RECHECK;

use crate::{Fixture, fields, filter, succeeded};

const ROUNDS: usize = 150;
const EVENT_TYPE: &str = "order.paid";

/// A webhook with two slots whose lane has had its longest run of
/// successes, so that recording one more success changes nothing on it.
async fn steady_webhook(f: &Fixture, app: &App) -> Webhook {
    let mut settings = fields("https://example.com/steady");
    settings.max_in_flight = Some(InFlightLimit::parse(2).expect("limit"));
    settings.event_types = filter(Some(&[EVENT_TYPE]));
    let webhook = f.webhook(app, settings).await;
    for _ in 0..2 * wasmhook::domain::lane::LONGEST_STREAK {
        f.publish(app, EVENT_TYPE).await;
        let claimed = f.claim(10).await;
        assert_eq!(claimed.len(), 1, "one published, one claimed");
        record(f, &claimed).await;
    }
    webhook
}

async fn record(f: &Fixture, claimed: &[ClaimedDelivery]) {
    if claimed.is_empty() {
        return;
    }
    let records = claimed.iter().map(succeeded).collect();
    f.store
        .record_attempts(Arc::new(records))
        .await
        .expect("record");
}

fn delivery_of(published: &Published) -> DeliveryId {
    published.deliveries[0].id.clone()
}

/// The deliveries of `wanted` the racing claim and the claim after it
/// took between them, after recording both so the next round starts
/// with nothing in flight.
async fn taken(
    f: &Fixture,
    racing: Vec<ClaimedDelivery>,
    wanted: &[&DeliveryId],
) -> HashSet<DeliveryId> {
    taken_by(f, racing, f.claim(10).await, wanted).await
}

/// As [`taken`], but when the claim after the racing one misses some of
/// `wanted`, a claim after the lane's recheck may take them.
async fn taken_after_recheck(
    f: &Fixture,
    racing: Vec<ClaimedDelivery>,
    wanted: &[&DeliveryId],
) -> HashSet<DeliveryId> {
    let mut next = f.claim(10).await;
    let got = racing.len() + next.len();
    if got < wanted.len() {
        tokio::time::sleep(EMPTIED_LANE_RECHECK + Duration::from_millis(50)).await;
        next.extend(f.claim(10).await);
    }
    taken_by(f, racing, next, wanted).await
}

async fn taken_by(
    f: &Fixture,
    racing: Vec<ClaimedDelivery>,
    next: Vec<ClaimedDelivery>,
    wanted: &[&DeliveryId],
) -> HashSet<DeliveryId> {
    let got: HashSet<DeliveryId> = racing.iter().chain(&next).map(|c| c.id.clone()).collect();
    record(f, &racing).await;
    record(f, &next).await;
    wanted
        .iter()
        .filter(|id| got.contains(id))
        .map(|id| (*id).clone())
        .collect()
}

#[tokio::test]
async fn an_event_published_during_a_claim_is_claimed_by_the_recheck() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    steady_webhook(&f, &app).await;
    for round in 0..ROUNDS {
        // The lane is due when the racing publish looks at it.
        let first = delivery_of(&f.publish(&app, EVENT_TYPE).await);
        let (second, racing) = tokio::join!(f.publish(&app, EVENT_TYPE), f.claim(10));
        let second = delivery_of(&second);
        let got = taken_after_recheck(&f, racing, &[&first, &second]).await;
        assert_eq!(
            got.len(),
            2,
            "round {round}: stranded {second} after a racing claim"
        );
    }
}

#[tokio::test]
async fn a_slot_freed_during_a_claim_is_used_by_the_next() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    steady_webhook(&f, &app).await;
    for round in 0..ROUNDS {
        // One in flight, two waiting, the lane due: the racing claim
        // takes one, or two if the first's record came before it.
        f.publish(&app, EVENT_TYPE).await;
        let in_flight = f.claim(10).await;
        assert_eq!(in_flight.len(), 1, "round {round}");
        let second = delivery_of(&f.publish(&app, EVENT_TYPE).await);
        let third = delivery_of(&f.publish(&app, EVENT_TYPE).await);
        let ((), racing) = tokio::join!(record(&f, &in_flight), f.claim(10));
        let got = taken(&f, racing, &[&second, &third]).await;
        assert_eq!(got.len(), 2, "round {round}: a free slot went unused");
    }
}

#[tokio::test]
async fn a_delivery_retried_during_a_claim_is_claimed_next() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    steady_webhook(&f, &app).await;
    for round in 0..ROUNDS {
        let done = f.publish(&app, EVENT_TYPE).await;
        record(&f, &f.claim(10).await).await;
        let first = delivery_of(&f.publish(&app, EVENT_TYPE).await);
        let retried = delivery_of(&done);
        let (outcome, racing) =
            tokio::join!(f.store.retry_delivery(&app.id, &retried), f.claim(10));
        outcome.expect("retry");
        let got = taken(&f, racing, &[&first, &retried]).await;
        assert_eq!(got.len(), 2, "round {round}: stranded a manual retry");
    }
}

#[tokio::test]
async fn the_sweep_wakes_a_lane_left_idle_with_work_due() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    steady_webhook(&f, &app).await;
    let queued = delivery_of(&f.publish(&app, EVENT_TYPE).await);
    // What a process stopping between a publish's commit and its wake
    // leaves behind.
    f.workspace
        .execute("UPDATE webhook_lanes SET next_due_at = NULL")
        .await;
    assert!(f.claim(10).await.is_empty(), "the lane looks idle");
    assert_eq!(f.store.wake_stranded_lanes().await.expect("sweep"), 1);
    let claimed = f.claim(10).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, queued);
    assert_eq!(
        f.store.wake_stranded_lanes().await.expect("sweep"),
        0,
        "a lane with its work in flight is not stranded"
    );
}
