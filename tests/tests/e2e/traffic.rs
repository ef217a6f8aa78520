//! Traffic control end to end: a webhook's rate limit holds however many
//! deliveries wait and however many worker processes claim them, and what
//! it holds back stays pending without spending attempts.

use std::time::Duration;

use serde_json::json;
use wasmhook_tests::{GatewayBuilder, Reply};

use crate::{PATIENCE, World};

/// Deliveries per second the rate-limited webhook allows.
const RATE: usize = 10;
/// Events queued for it: far more than a test run delivers.
const QUEUED: usize = 2_000;
/// The window counted, after a second of warm-up.
const WINDOW: Duration = Duration::from_secs(10);

/// Publishes `n` events from 16 concurrent publishers.
async fn publish_many(world: &World, n: usize) {
    let gateway = &world.gateway;
    let url = format!("{}{}", gateway.base_url, world.path("/events"));
    let mut publishers = Vec::new();
    for p in 0..16 {
        let (client, url, token) = (gateway.client.clone(), url.clone(), gateway.token.clone());
        publishers.push(tokio::spawn(async move {
            for i in (p..n).step_by(16) {
                let body = json!({"event_type": "order.created", "payload": {"n": i}});
                let response = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await;
                let status = response.expect("the API answers").status();
                assert_eq!(status, reqwest::StatusCode::ACCEPTED);
            }
        }));
    }
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
}

/// Registers the rate-limited webhook, queues `QUEUED` events for it, and
/// checks that over `WINDOW` (after a second of warm-up) it received its
/// rate, give or take a tenth, while the rest waited without attempts.
async fn rate_limit_holds(world: &World) {
    world.receiver.always(Reply::status(200));
    let (id, _) = world.webhook("/limited", json!({"rate_limit": RATE})).await;
    let (status, webhook) = world
        .gateway
        .get(&world.path(&format!("/webhooks/{id}")))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            webhook["rate_limit"].as_u64(),
            webhook["rate_limit_burst"].as_u64()
        ),
        (Some(10), Some(1))
    );

    publish_many(world, QUEUED).await;
    let first = world.receiver.wait_for(1, PATIENCE).await[0].at;
    let (from, to) = (
        first + Duration::from_secs(1),
        first + Duration::from_secs(1) + WINDOW,
    );
    tokio::time::sleep_until((to + Duration::from_millis(200)).into()).await;
    let received = world.receiver.received();
    let in_window = received
        .iter()
        .filter(|r| r.at >= from && r.at < to)
        .count();
    let expected = RATE * WINDOW.as_secs() as usize;
    println!("{in_window} deliveries in {WINDOW:?} at {RATE}/s");
    assert!(
        in_window.abs_diff(expected) <= expected / 10,
        "{in_window} deliveries in {WINDOW:?} at {RATE}/s (all so far: {})",
        received.len()
    );
    let workspace = &world.gateway.workspace;
    let held = workspace
        .count("SELECT count(*) FROM deliveries WHERE status = 'pending' AND attempts = 0")
        .await;
    let spent = workspace
        .count("SELECT count(*) FROM deliveries WHERE status IN ('failed', 'dead')")
        .await;
    assert!(
        held as usize >= QUEUED - received.len() - 2 * RATE,
        "{held} pending untouched of {QUEUED} with {} received",
        received.len()
    );
    assert_eq!(spent, 0, "holding back spends no attempt");
}

#[tokio::test]
async fn a_rate_limit_holds_while_thousands_wait() {
    let world = World::new().await;
    rate_limit_holds(&world).await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL; scripts/test runs it"]
async fn two_workers_keep_a_rate_limit_together() {
    crate::require_postgres();
    let api = GatewayBuilder::default()
        .env("WASMHOOK_ROLE", "api")
        .spawn()
        .await;
    let world = World::with(api).await;
    let workers = world.workers(2).await;
    rate_limit_holds(&world).await;
    drop(workers);
}

/// An endpoint that answers 429 with `Retry-After: 2` gets nothing for two
/// seconds after each such answer: requests come in waves (what was in
/// flight together), each at least the wait after the one before, and
/// deliveries keep being tried, so the endpoint is held, not dropped.
#[tokio::test]
async fn a_throttling_answer_holds_the_whole_endpoint() {
    // Retries far enough apart that the 2 s asked for is not cut short
    // (no wait is longer than a delivery's own).
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_RETRY_SCHEDULE", "10s,10s,10s,10s,10s,10s")
        .spawn()
        .await;
    let world = World::with(gateway).await;
    world
        .receiver
        .always(Reply::status(429).header("retry-after", "2"));
    world.webhook("/busy", json!({})).await;
    for n in 0..50 {
        world.publish("order.created", json!({"n": n})).await;
    }
    let first = world.receiver.wait_for(1, PATIENCE).await[0].at;
    tokio::time::sleep_until((first + Duration::from_millis(7_500)).into()).await;
    let mut arrivals: Vec<_> = world.receiver.received().iter().map(|r| r.at).collect();
    arrivals.sort();
    // Requests sent before an answer was recorded arrive within moments of
    // it; after that, the lane waits.
    let grace = Duration::from_millis(300);
    let mut waves = vec![arrivals[0]];
    for pair in arrivals.windows(2) {
        let gap = pair[1] - pair[0];
        if gap > grace {
            assert!(
                gap >= Duration::from_millis(1_950),
                "a request {gap:?} after the one before, inside its 2 s: {arrivals:?}"
            );
            waves.push(pair[1]);
        }
    }
    println!("{} requests in {} waves", arrivals.len(), waves.len());
    assert!(
        (3..=5).contains(&waves.len()),
        "{} waves in 7.5 s: {arrivals:?}",
        waves.len()
    );
    assert!(
        arrivals.len() <= 2 * waves.len(),
        "two in flight after a throttle"
    );
}

/// An endpoint whose attempts all fail opens its breaker: its deliveries
/// then wait without spending attempts, one probe goes out at growing
/// intervals, and the first that succeeds closes it; the state is on the
/// webhook and in the metrics throughout.
#[tokio::test]
async fn the_breaker_opens_probes_and_closes() {
    let gateway = GatewayBuilder::default()
        .env(
            "WASMHOOK_RETRY_SCHEDULE",
            "100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms",
        )
        .env("WASMHOOK_BREAKER_MIN_ATTEMPTS", "10")
        .env("WASMHOOK_BREAKER_FIRST_PROBE", "700ms")
        .spawn()
        .await;
    let world = World::with(gateway).await;
    world.receiver.always(Reply::status(500));
    let (id, _) = world.webhook("/down", json!({})).await;
    let (status, fresh) = world
        .gateway
        .get(&world.path(&format!("/webhooks/{id}")))
        .await;
    assert_eq!(status, 200);
    assert_eq!(fresh["breaker"]["state"], "closed");
    for n in 0..30 {
        world.publish("order.created", json!({"n": n})).await;
    }

    let path = world.path(&format!("/webhooks/{id}"));
    let open = world
        .gateway
        .poll(&path, PATIENCE, |w| w["breaker"]["state"] == "open")
        .await;
    let sent_when_opened = world.receiver.count();
    assert!(open["breaker"]["since"].is_string(), "{open}");
    assert!(
        open["breaker"]["failure_rate"].as_f64().unwrap() >= 0.7,
        "{open}"
    );
    assert!(
        crate::operations::scrape(&world.gateway)
            .await
            .contains("wasmhook_breakers{state=\"open\"} 1")
    );

    // Probes 0.7 s, then 1.4 s apart: at most two in 1.8 s (and an attempt
    // that was in flight as it opened), where 30 deliveries retrying every
    // 100 ms would have made dozens.
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    let probes = world.receiver.count() - sent_when_opened;
    assert!((1..=3).contains(&probes), "{probes} requests while open");

    world.receiver.always(Reply::status(200));
    let closed = world
        .gateway
        .poll(&path, PATIENCE, |w| w["breaker"]["state"] == "closed")
        .await;
    assert_eq!(closed["breaker"]["since"], serde_json::Value::Null);
    let workspace = &world.gateway.workspace;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while workspace
        .count("SELECT count(*) FROM deliveries WHERE status <> 'succeeded'")
        .await
        > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries left after the breaker closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = crate::operations::scrape(&world.gateway).await;
    assert!(
        metrics.contains("wasmhook_breakers{state=\"open\"} 0"),
        "{metrics}"
    );
}
