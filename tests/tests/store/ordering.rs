//! Ordered delivery: of one webhook's deliveries of one key, only the
//! first unfinished one is ever claimed; ending it (succeeded, dead,
//! skipped) lets the next go, a retry holds the later ones back, and
//! other keys and unkeyed events are never held.

use std::sync::Arc;

use wasmhook::clock::now_ms;
use wasmhook::domain::ordering::OrderingKey;
use wasmhook::domain::{
    App, AttemptRecord, ClaimedDelivery, DeliveryStatus, EventId, InFlightLimit, NextState,
};

use crate::{Fixture, fields, new_event, succeeded};

async fn publish(f: &Fixture, app: &App, key: Option<&str>) -> EventId {
    let mut event = new_event(app, "order.tick");
    event.ordering_key = key.map(|k| OrderingKey::parse(k).unwrap());
    f.store.publish(event).await.expect("publish").event_id
}

async fn record(f: &Fixture, records: Vec<AttemptRecord>) {
    f.store
        .record_attempts(Arc::new(records))
        .await
        .expect("record");
}

fn with_next(claimed: &ClaimedDelivery, next: NextState) -> AttemptRecord {
    AttemptRecord {
        next,
        ..succeeded(claimed)
    }
}

fn events(claimed: &[ClaimedDelivery]) -> Vec<EventId> {
    let mut ids: Vec<EventId> = claimed.iter().map(|c| c.event_id.clone()).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn deliveries_of_one_key_go_one_at_a_time_in_publish_order() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    let mut settings = fields("https://example.com/ordered");
    settings.max_in_flight = Some(InFlightLimit::parse(10).unwrap());
    f.webhook(&app, settings).await;
    f.warm(&app, "warm.up").await;

    let mut k1 = Vec::new();
    for _ in 0..3 {
        k1.push(publish(&f, &app, Some("customer-1")).await);
    }
    let k2 = publish(&f, &app, Some("customer-2")).await;
    let free = publish(&f, &app, None).await;

    let claimed = f.claim(100).await;
    let mut expected = vec![k1[0].clone(), k2.clone(), free.clone()];
    expected.sort();
    assert_eq!(
        events(&claimed),
        expected,
        "one head per key, and the unkeyed"
    );
    assert!(
        f.claim(100).await.is_empty(),
        "the rest of customer-1 waits"
    );
    let head = claimed.iter().find(|c| c.event_id == k1[0]).unwrap();
    assert_eq!(head.ordering_key.as_deref(), Some("customer-1"));

    // A failed head to be retried holds the later ones back.
    let retry = NextState::Retry {
        due_at: now_ms() + 3_600_000,
        error: "HTTP 500".into(),
    };
    let others: Vec<AttemptRecord> = claimed
        .iter()
        .filter(|c| c.event_id != k1[0])
        .map(succeeded)
        .collect();
    record(&f, others).await;
    record(&f, vec![with_next(head, retry)]).await;
    assert!(f.claim(100).await.is_empty(), "the retry holds its key");

    // A manual retry of a waiting delivery leaves it to its turn.
    let waiting = f.store.event_deliveries(&app.id, &k1[1]).await.unwrap();
    let unchanged = f
        .store
        .retry_delivery(&app.id, &waiting[0].id)
        .await
        .unwrap();
    assert_eq!(
        (unchanged.status, unchanged.due_at),
        (DeliveryStatus::Pending, None)
    );
    assert!(f.claim(100).await.is_empty());

    // The head sent again and delivered: the second goes, then the third
    // once the second is dead.
    f.store.retry_delivery(&app.id, &head.id).await.unwrap();
    let again = f.claim(100).await;
    assert_eq!(events(&again), vec![k1[0].clone()]);
    record(&f, vec![succeeded(&again[0])]).await;
    let second = f.claim(100).await;
    assert_eq!(events(&second), vec![k1[1].clone()]);
    let dead = NextState::Dead {
        error: "HTTP 500".into(),
    };
    record(&f, vec![with_next(&second[0], dead)]).await;
    let third = f.claim(100).await;
    assert_eq!(events(&third), vec![k1[2].clone()]);
    record(&f, vec![succeeded(&third[0])]).await;

    // An ended key takes a new event at once.
    let later = publish(&f, &app, Some("customer-1")).await;
    assert_eq!(events(&f.claim(100).await), vec![later]);
}

#[tokio::test]
async fn a_lost_claims_record_does_not_release_the_key() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    f.webhook(&app, fields("https://example.com/ordered")).await;
    let first = publish(&f, &app, Some("k")).await;
    let second = publish(&f, &app, Some("k")).await;
    let lost = f
        .claim_leased(10, std::time::Duration::from_millis(1))
        .await;
    assert_eq!(events(&lost), vec![first.clone()]);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    // Another worker took the head over: the first worker's late record
    // is dropped, and the key stays with the head.
    let taken_over = f.claim(10).await;
    assert_eq!(events(&taken_over), vec![first]);
    record(&f, vec![succeeded(&lost[0])]).await;
    assert!(f.claim(10).await.is_empty());
    record(&f, vec![succeeded(&taken_over[0])]).await;
    assert_eq!(events(&f.claim(10).await), vec![second]);
}

#[tokio::test]
async fn a_repeated_keyed_event_queues_nothing_more() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    f.webhook(&app, fields("https://example.com/ordered")).await;
    let mut event = new_event(&app, "order.tick");
    event.ordering_key = Some(OrderingKey::parse("k").unwrap());
    let first = f.store.publish(event.clone()).await.unwrap();
    let again = f.store.publish(event).await.unwrap();
    assert!(!first.replayed && again.replayed);
    assert_eq!(again.event_id, first.event_id);
    let deliveries = f
        .store
        .event_deliveries(&app.id, &first.event_id)
        .await
        .unwrap();
    assert_eq!(deliveries.len(), 1);
    let shown = f
        .store
        .event(&app.id, &first.event_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(shown.ordering_key.as_deref(), Some("k"));
}

/// Publishes of a key racing the records that end its heads, on two
/// webhooks and with two deliverers: every delivery is claimed, once, in
/// its key's publish order on each webhook. On PostgreSQL this is the
/// race a record settles by releasing a stranded place (see
/// `store/postgres/ordering.rs`); a stranded delivery would wait for ever,
/// so the deliverers give up when nothing is claimed for a few seconds.
#[tokio::test]
async fn publishes_racing_records_strand_nothing() {
    const EVENTS: usize = 300;
    let f = Arc::new(Fixture::new().await);
    let app = f.app("A").await;
    for url in ["https://example.com/a", "https://example.com/b"] {
        f.webhook(&app, fields(url)).await;
    }
    f.warm(&app, "warm.up").await;

    let publisher = {
        let (f, app) = (f.clone(), app.clone());
        tokio::spawn(async move {
            let mut published = Vec::new();
            for n in 0..EVENTS {
                let key = format!("k{}", n % 2);
                published.push((key.clone(), publish(&f, &app, Some(&key)).await));
            }
            published
        })
    };
    let claimed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let deliverers: Vec<_> = (0..2)
        .map(|_| {
            let (f, claimed) = (f.clone(), claimed.clone());
            tokio::spawn(async move {
                let mut last_progress = std::time::Instant::now();
                while claimed.lock().unwrap().len() < 2 * EVENTS {
                    let batch = f.claim(50).await;
                    if batch.is_empty() {
                        if last_progress.elapsed() > std::time::Duration::from_secs(5) {
                            return;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        continue;
                    }
                    last_progress = std::time::Instant::now();
                    claimed.lock().unwrap().extend(batch.iter().map(|c| {
                        let key = c.ordering_key.clone().unwrap_or_default();
                        (c.webhook_id.clone(), key, c.event_id.clone())
                    }));
                    record(&f, batch.iter().map(succeeded).collect()).await;
                }
            })
        })
        .collect();
    let published = publisher.await.unwrap();
    for deliverer in deliverers {
        deliverer.await.unwrap();
    }

    let claimed = claimed.lock().unwrap().clone();
    assert_eq!(
        claimed.len(),
        2 * EVENTS,
        "every delivery claimed once; {} waiting",
        2 * EVENTS - claimed.len().min(2 * EVENTS)
    );
    let webhooks: std::collections::BTreeSet<_> = claimed.iter().map(|c| c.0.clone()).collect();
    for webhook in &webhooks {
        for key in ["k0", "k1"] {
            let order: Vec<&EventId> = claimed
                .iter()
                .filter(|c| &c.0 == webhook && c.1 == key)
                .map(|c| &c.2)
                .collect();
            let expected: Vec<&EventId> = published
                .iter()
                .filter(|p| p.0 == key)
                .map(|p| &p.1)
                .collect();
            assert_eq!(order, expected, "{key} on {webhook:?} in publish order");
        }
    }
}

/// Retention deletes only finished events: a delivery waiting for its
/// key's head, however old, is unfinished.
#[tokio::test]
async fn retention_keeps_a_waiting_delivery() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    f.webhook(&app, fields("https://example.com/ordered")).await;
    let first = publish(&f, &app, Some("k")).await;
    let second = publish(&f, &app, Some("k")).await;
    let head = f.claim(10).await;
    assert_eq!(events(&head), vec![first.clone()]);
    let later = now_ms() + 60_000;
    assert_eq!(f.store.purge_events(later, 100).await.unwrap(), 0);

    record(&f, vec![succeeded(&head[0])]).await;
    assert_eq!(f.store.purge_events(later, 100).await.unwrap(), 1);
    assert!(f.store.event(&app.id, &first).await.unwrap().is_none());
    assert_eq!(events(&f.claim(10).await), vec![second]);
}

/// Retention takes a key's bookkeeping with its last delivery (on
/// PostgreSQL, the key's row), and the key starts afresh.
#[tokio::test]
async fn retention_forgets_a_key_with_nothing_left() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    f.webhook(&app, fields("https://example.com/ordered")).await;
    publish(&f, &app, Some("k")).await;
    publish(&f, &app, Some("k")).await;
    for _ in 0..2 {
        let head = f.claim(10).await;
        assert_eq!(head.len(), 1);
        record(&f, vec![succeeded(&head[0])]).await;
    }
    assert_eq!(
        f.store.purge_events(now_ms() + 60_000, 100).await.unwrap(),
        2
    );
    if f.workspace.is_postgres() {
        use sqlx::Connection;
        let mut db = sqlx::PgConnection::connect(&f.workspace.database_url)
            .await
            .unwrap();
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ordering_keys")
            .fetch_one(&mut db)
            .await
            .unwrap();
        assert_eq!(rows, 0, "the key's row went with its last delivery");
    }
    let again = publish(&f, &app, Some("k")).await;
    assert_eq!(events(&f.claim(10).await), vec![again]);
}
