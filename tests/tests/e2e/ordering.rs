//! Ordered delivery end to end: 500 events over 20 keys, to a receiver
//! that fails the first attempt of each key, arrive in publish order per
//! key; the same after a SIGKILL mid-run, and with two worker processes
//! on PostgreSQL. A key waiting for its retry holds back no other key and
//! no unkeyed event.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use wasmhook_tests::{GatewayBuilder, Received, Reply, TestGateway};

use crate::{PATIENCE, World};

/// Keys whose first attempt fails, and events per key.
const KEYS: usize = 20;
const PER_KEY: usize = 25;
/// How long a failed attempt waits for its retry.
const RETRY: &str = "10s";

/// The ordering key and number of a delivered event.
fn key_and_n(request: &Received) -> Option<(String, u64)> {
    let body = request.json();
    let data = &body["data"];
    Some((data["key"].as_str()?.to_owned(), data["n"].as_u64()?))
}

/// Only the keys of the failing group: `failing-…`.
fn failing_key(request: &Received) -> Option<String> {
    key_and_n(request)
        .map(|(key, _)| key)
        .filter(|key| key.starts_with("failing-"))
}

/// A gateway whose breaker never opens: twenty first attempts failing
/// at once would open it and hold the whole endpoint, calm keys too,
/// which is the breaker's job, not what these tests look at.
fn builder() -> GatewayBuilder {
    GatewayBuilder::default()
        .env("WASMHOOK_BREAKER_MIN_ATTEMPTS", "1000000")
        .env("WASMHOOK_RETRY_SCHEDULE", RETRY)
        .env("WASMHOOK_LEASE", "3s")
        .env("WASMHOOK_REQUEST_TIMEOUT", "2s")
}

/// Publishes each key's events in order (one publisher per key, each
/// waiting for every 202), all keys at once.
async fn publish_keys(world: &World, prefix: &str, keys: usize, per_key: usize) {
    futures::stream::iter(0..keys)
        .for_each_concurrent(keys, |k| async move {
            let key = format!("{prefix}-{k}");
            for n in 0..per_key {
                publish(world, json!({"key": key, "n": n}), Some(&key)).await;
            }
        })
        .await;
}

async fn publish(world: &World, payload: Value, key: Option<&str>) {
    let mut body = json!({"event_type": "order.step", "payload": payload});
    if let Some(key) = key {
        body["ordering_key"] = json!(key);
    }
    let (status, answer) = world.gateway.post(&world.path("/events"), body).await;
    assert_eq!(status, 202, "{answer}");
}

/// Each key's numbers in the order they arrived, a request repeated at
/// once (a failed attempt and its retry, or a delivery sent again after
/// a crash) counted once.
fn arrivals(received: &[Received]) -> BTreeMap<String, Vec<u64>> {
    let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (key, n) in received.iter().filter_map(key_and_n) {
        let seen = by_key.entry(key).or_default();
        if seen.last() != Some(&n) {
            seen.push(n);
        }
    }
    by_key
}

fn assert_in_order(received: &[Received], prefix: &str, keys: usize, per_key: usize) {
    let by_key = arrivals(received);
    let expected: Vec<u64> = (0..per_key as u64).collect();
    for k in 0..keys {
        let key = format!("{prefix}-{k}");
        assert_eq!(by_key.get(&key), Some(&expected), "key {key}");
    }
}

/// Waits until `n` keyed events arrived, and `failed` requests more
/// (their keys' first attempts, which failed), or gives up when nothing
/// new arrives for `PATIENCE`, naming how many came.
async fn wait_for_all(world: &World, n: usize, failed: usize) -> Vec<Received> {
    let mut last = (0, Instant::now());
    loop {
        let received = world.receiver.received();
        let distinct: std::collections::BTreeSet<(String, u64)> =
            received.iter().filter_map(key_and_n).collect();
        let keyed = received.iter().filter(|r| key_and_n(r).is_some()).count();
        if distinct.len() >= n && keyed >= n + failed {
            return received;
        }
        if received.len() > last.0 {
            last = (received.len(), Instant::now());
        }
        assert!(
            last.1.elapsed() < PATIENCE,
            "no progress: {} of {n} events arrived in {} requests",
            distinct.len(),
            received.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ordered_world(gateway: TestGateway) -> World {
    let world = World::with(gateway).await;
    world
        .receiver
        .first_of_each(failing_key, Reply::status(500));
    world.webhook("/ordered", json!({})).await;
    world
}

#[tokio::test]
async fn an_events_ordering_key_is_kept_and_shown() {
    let world = World::new().await;
    let body = json!({"event_type": "order.step", "payload": {}, "ordering_key": "customer-42"});
    let (status, accepted) = world.gateway.post(&world.path("/events"), body).await;
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["id"].as_str().unwrap();
    let (status, event) = world
        .gateway
        .get(&world.path(&format!("/events/{id}")))
        .await;
    assert_eq!(status, 200);
    assert_eq!(event["ordering_key"], "customer-42");
}

#[tokio::test]
async fn keyed_events_arrive_in_publish_order() {
    let world = ordered_world(builder().spawn().await).await;
    publish_keys(&world, "failing", KEYS, PER_KEY).await;
    let received = wait_for_all(&world, KEYS * PER_KEY, KEYS).await;
    assert_in_order(&received, "failing", KEYS, PER_KEY);
    // Each key's first attempt failed once and was repeated before
    // anything later of its key (the order above counts a repeat in
    // place once): one request more per key, no more.
    assert_eq!(received.len(), KEYS * PER_KEY + KEYS);
}

/// Four keys whose first attempt fails (fewer than the failures in a row
/// that pace a webhook, which would hold every key alike), five that
/// never fail and unkeyed events, on one webhook: everything but the
/// failing keys is delivered before their retries come.
#[tokio::test]
async fn a_retrying_key_holds_back_no_other_key() {
    let world = ordered_world(builder().spawn().await).await;
    let calm = async {
        publish_keys(&world, "calm", 5, PER_KEY).await;
        for n in 0..50 {
            publish(&world, json!({"n": n}), None).await;
        }
    };
    tokio::join!(publish_keys(&world, "failing", 4, PER_KEY), calm);
    let received = wait_for_all(&world, 9 * PER_KEY, 4).await;
    assert_in_order(&received, "failing", 4, PER_KEY);
    assert_in_order(&received, "calm", 5, PER_KEY);
    // The retries come 10 s after the failures, less a tenth of jitter.
    let retries_start = received
        .iter()
        .filter(|r| failing_key(r).is_some())
        .map(|r| r.at)
        .min()
        .expect("failing keys arrived")
        + Duration::from_secs(9);
    let others: Vec<&Received> = received
        .iter()
        .filter(|r| failing_key(r).is_none())
        .collect();
    assert_eq!(others.len(), 5 * PER_KEY + 50);
    assert!(
        others.iter().all(|r| r.at < retries_start),
        "calm keys or unkeyed events waited for the failing keys' retries"
    );
}

#[tokio::test]
async fn the_order_survives_a_sigkill() {
    let world = ordered_world(builder().spawn().await).await;
    world
        .receiver
        .always(Reply::status(200).delay(Duration::from_millis(20)));
    publish_keys(&world, "failing", KEYS, PER_KEY).await;
    // Killed while most keys are still on their way.
    world.receiver.wait_for(KEYS * 3, PATIENCE).await;
    let mut world = world;
    world.gateway.kill().await;
    let before = world.receiver.count();
    assert!(before < KEYS * PER_KEY, "the kill came too late");
    let world = world.restarted().await;
    let received = wait_for_all(&world, KEYS * PER_KEY, KEYS).await;
    assert_in_order(&received, "failing", KEYS, PER_KEY);
}

#[tokio::test]
#[ignore = "needs PostgreSQL; scripts/test runs it"]
async fn two_workers_keep_each_keys_order() {
    crate::require_postgres();
    let api = builder().env("WASMHOOK_ROLE", "api").spawn().await;
    let world = ordered_world(api).await;
    let workers = world.workers(2).await;
    publish_keys(&world, "failing", KEYS, PER_KEY).await;
    let received = wait_for_all(&world, KEYS * PER_KEY, KEYS).await;
    assert_in_order(&received, "failing", KEYS, PER_KEY);
    drop(workers);
}
