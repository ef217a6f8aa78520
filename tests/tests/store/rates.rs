//! Rate limits: a rate-limited lane hands out its burst, then one delivery
//! per interval, whatever is queued and however often it is claimed or
//! woken; deliveries held back stay pending with no attempt spent, and the
//! lane never holds up the rest of a claim.

use std::sync::Arc;
use std::time::Duration;

use wasmhook::domain::{App, DeliveryStatus, RateLimit, Webhook};

use crate::{Fixture, fields, filter, page, succeeded};

async fn rate_limited(f: &Fixture, app: &App, name: &str, per_second: u64, burst: u64) -> Webhook {
    let mut settings = fields(&format!("https://example.com/{name}"));
    settings.rate_limit = Some(RateLimit::parse(per_second, Some(burst)).unwrap());
    settings.event_types = filter(Some(&[&format!("for.{name}")]));
    f.webhook(app, settings).await
}

async fn queue(f: &Fixture, app: &App, name: &str, n: usize) {
    for _ in 0..n {
        f.publish(app, &format!("for.{name}")).await;
    }
}

#[tokio::test]
async fn a_rate_limited_lane_gives_its_burst_then_one_per_interval() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    // One a second, two at once: long enough apart that a loaded machine's
    // claims and records run well inside an interval.
    let webhook = rate_limited(&f, &app, "paced", 1, 2).await;
    assert_eq!(webhook.rate_limit.map(RateLimit::burst), Some(2));
    queue(&f, &app, "paced", 20).await;

    let burst = f.claim(100).await;
    assert_eq!(burst.len(), 2, "the burst");
    assert!(
        f.claim(100).await.is_empty(),
        "held until the next interval"
    );
    // A finished attempt frees a slot but not the rate.
    f.store
        .record_attempts(Arc::new(burst.iter().map(succeeded).collect()))
        .await
        .unwrap();
    assert!(
        f.claim(100).await.is_empty(),
        "a record does not lift the hold"
    );

    tokio::time::sleep(Duration::from_millis(1_050)).await;
    assert_eq!(f.claim(100).await.len(), 1, "one interval later, one more");
    assert!(f.claim(100).await.is_empty());

    let pending = f
        .store
        .webhook_deliveries(&webhook.id, Some(DeliveryStatus::Pending), &page(None, 100))
        .await
        .unwrap();
    assert_eq!(pending.len(), 17, "held back, still pending");
    assert!(pending.iter().all(|d| d.attempts == 0), "no attempt spent");
}

#[tokio::test]
async fn a_held_lane_leaves_the_claim_to_the_others() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    rate_limited(&f, &app, "slow", 1, 1).await;
    let mut other = fields("https://example.com/other");
    other.event_types = filter(Some(&["for.other"]));
    let other = f.webhook(&app, other).await;
    f.warm(&app, "for.other").await;
    // The limited webhook's backlog is older: it would come first.
    queue(&f, &app, "slow", 50).await;
    queue(&f, &app, "other", 5).await;

    let claimed = f.claim(10).await;
    assert_eq!(claimed.len(), 6, "one of the limited lane's, every other");
    let others = claimed.iter().filter(|c| c.webhook_id == other.id).count();
    assert_eq!(others, 5);
    queue(&f, &app, "slow", 5).await;
    queue(&f, &app, "other", 3).await;
    let more = f.claim(10).await;
    assert_eq!(more.len(), 3, "publishes do not wake a held lane early");
    assert!(more.iter().all(|c| c.webhook_id == other.id));
}

#[tokio::test]
async fn lifting_a_rate_limit_lets_the_lane_flow() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    let webhook = rate_limited(&f, &app, "lifted", 1, 1).await;
    queue(&f, &app, "lifted", 10).await;
    let first = f.claim(100).await;
    assert_eq!(first.len(), 1);
    let mut lifted = fields(&webhook.url);
    lifted.event_types = webhook.event_types.clone();
    let updated = f
        .store
        .update_webhook(&app.id, &webhook.id, &lifted)
        .await
        .unwrap();
    assert_eq!(updated.rate_limit, None);
    // The hold set under the old limit still runs out (within a second);
    // after it only the in-flight limit counts, which starts at two and
    // doubles with each success.
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    let mut sent = first;
    sent.extend(f.claim(100).await);
    f.store
        .record_attempts(Arc::new(sent.iter().map(succeeded).collect()))
        .await
        .unwrap();
    assert_eq!(sent.len(), 2, "one was still in flight");
    assert_eq!(f.claim(100).await.len(), 8, "no hold any more");
}
