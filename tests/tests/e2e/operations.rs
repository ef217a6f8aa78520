//! Running the gateway: Prometheus metrics, JSON logs with one span per
//! attempt, and retention of old history.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use wasmhook_tests::{GatewayBuilder, Receiver, Reply, TestGateway};

use crate::{PATIENCE, World};

/// The value of one series (name with its labels, as rendered) on a
/// Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// `GET /metrics`, without any token.
pub async fn scrape(gateway: &TestGateway) -> String {
    let response = gateway
        .client
        .get(format!("{}/metrics", gateway.base_url))
        .send()
        .await
        .expect("scrape");
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    response.text().await.expect("metrics text")
}

/// Scrapes until every series shows its value (counters count before the
/// database records, so a page may run ahead of the queue gauges).
async fn scrape_until(gateway: &TestGateway, wanted: &[(&str, f64)]) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let page = scrape(gateway).await;
        if wanted
            .iter()
            .all(|(series, value)| sample(&page, series) == Some(*value))
        {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "never reached {wanted:?}:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A second receiver that answers every request with 500.
async fn failing_receiver() -> Receiver {
    let failing = Receiver::start().await;
    failing.always(Reply::status(500));
    failing
}

#[tokio::test]
async fn metrics_count_events_attempts_plugins_and_the_queue() {
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_RETRY_SCHEDULE", "1h")
        .spawn()
        .await;
    let world = World::with(gateway).await;
    world.webhook("/ok", json!({})).await;
    let plugin = world.gateway.plugin("passthrough").await;
    world
        .webhook("/plugged", json!({"plugin": {"id": plugin}}))
        .await;
    let failing = failing_receiver().await;
    world
        .gateway
        .create_webhook(&world.app, json!({"url": failing.url("/fail")}))
        .await;
    for i in 0..3 {
        world.publish("order.paid", json!({"n": i})).await;
    }
    world.wait_for(6, PATIENCE).await;
    let page = scrape_until(
        &world.gateway,
        &[
            (r#"wasmhook_attempts_total{outcome="5xx"}"#, 3.0),
            (
                r#"wasmhook_deliveries_finished_total{state="succeeded"}"#,
                6.0,
            ),
            ("wasmhook_queue_pending", 3.0),
            ("wasmhook_queue_in_flight", 0.0),
        ],
    )
    .await;

    let at = |series: &str| sample(&page, series).unwrap_or_else(|| panic!("{series}:\n{page}"));
    assert_eq!(at("wasmhook_events_accepted_total"), 3.0);
    assert_eq!(at(r#"wasmhook_attempts_total{outcome="2xx"}"#), 6.0);
    assert_eq!(at(r#"wasmhook_attempts_total{outcome="5xx"}"#), 3.0);
    assert_eq!(
        at(r#"wasmhook_deliveries_finished_total{state="succeeded"}"#),
        6.0
    );
    assert_eq!(at("wasmhook_attempt_duration_seconds_count"), 9.0);
    assert!(
        page.contains(r#"wasmhook_attempt_duration_seconds_bucket{le="0.005"}"#),
        "{page}"
    );
    assert_eq!(at("wasmhook_plugin_duration_seconds_count"), 3.0);
    let lookups = sample(&page, r#"wasmhook_plugin_cache_total{result="hit"}"#).unwrap_or(0.0)
        + sample(&page, r#"wasmhook_plugin_cache_total{result="miss"}"#).unwrap_or(0.0);
    assert!(lookups >= 3.0, "{page}");
    // The three failed deliveries wait an hour for their next attempt.
    assert_eq!(at("wasmhook_queue_pending"), 3.0);
    assert_eq!(at("wasmhook_queue_due"), 0.0);
    assert_eq!(at("wasmhook_queue_in_flight"), 0.0);
    assert_eq!(at("wasmhook_queue_oldest_due_age_seconds"), 0.0);
    assert!(page.contains("# HELP wasmhook_queue_due"), "{page}");
    if !world.gateway.workspace.is_postgres() {
        // Publishes commit durably; claims and attempt records may not.
        let durable = at(r#"wasmhook_sqlite_commits_total{durability="durable"}"#);
        let relaxed = at(r#"wasmhook_sqlite_commits_total{durability="relaxed"}"#);
        assert!(durable >= 3.0 && relaxed >= 1.0, "{page}");
        assert!(at("wasmhook_sqlite_committed_writes_total") >= durable + relaxed);
    }
}

/// With no worker, published deliveries wait: the gauges say how many and
/// for how long, from any process sharing the database.
#[tokio::test]
async fn queue_gauges_show_what_waits() {
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_ROLE", "api")
        .spawn()
        .await;
    let world = World::with(gateway).await;
    world.webhook("/a", json!({})).await;
    world.webhook("/b", json!({})).await;
    world.publish("order.paid", json!({})).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let page = scrape(&world.gateway).await;
    assert_eq!(sample(&page, "wasmhook_queue_pending"), Some(2.0), "{page}");
    assert_eq!(sample(&page, "wasmhook_queue_due"), Some(2.0), "{page}");
    let age = sample(&page, "wasmhook_queue_oldest_due_age_seconds").unwrap();
    assert!((1.0..60.0).contains(&age), "{age}");
    assert_eq!(sample(&page, "wasmhook_events_accepted_total"), Some(1.0));
}

/// `--log-format json`: one JSON object per line; every line an attempt
/// logs carries the attempt span with its ids; no payload, secret or
/// token appears anywhere, at debug level included.
#[tokio::test]
async fn json_logs_carry_attempt_ids_and_no_secrets() {
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_LOG_FORMAT", "json")
        .env("WASMHOOK_RETRY_SCHEDULE", "1h")
        .spawn()
        .await;
    let world = World::with(gateway).await;
    let (_, ok_secret) = world
        .webhook(
            "/ok",
            json!({"headers": {"x-api-key": "header-secret-7c1f"}}),
        )
        .await;
    let failing = failing_receiver().await;
    let failing_webhook = world
        .gateway
        .create_webhook(&world.app, json!({"url": failing.url("/fail")}))
        .await;
    let (status, key) = world.gateway.post(&world.path("/keys"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let published = world
        .publish("card.added", json!({"card": "PAYLOAD-MARKER-4242"}))
        .await;
    world.wait_for(1, PATIENCE).await;
    failing.wait_for(1, PATIENCE).await;
    let event_id = published["id"].as_str().unwrap();
    let failed_delivery = published["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["webhook_id"] == failing_webhook["id"])
        .and_then(|d| d["id"].as_str())
        .unwrap()
        .to_owned();

    let deadline = Instant::now() + PATIENCE;
    let lines = loop {
        let log = world.gateway.log();
        let lines: Vec<Value> = log
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let logged = |message: &str| lines.iter().any(|l| l["fields"]["message"] == message);
        if logged("delivered") && logged("attempt failed; will retry") {
            break lines;
        }
        assert!(Instant::now() < deadline, "attempt lines missing:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let failed = lines
        .iter()
        .find(|l| l["fields"]["message"] == "attempt failed; will retry")
        .unwrap();
    assert_eq!(failed["span"]["name"], "attempt");
    assert_eq!(failed["span"]["delivery"], failed_delivery.as_str());
    assert_eq!(failed["span"]["event"], event_id);
    assert_eq!(failed["span"]["webhook"], failing_webhook["id"]);
    assert_eq!(failed["span"]["attempt"], 1);
    assert_eq!(failed["fields"]["status"], 500);
    assert_eq!(failed["level"], "INFO");

    let log = world.gateway.log();
    for secret in [
        "PAYLOAD-MARKER-4242",
        ok_secret.as_str(),
        failing_webhook["secret"].as_str().unwrap(),
        "header-secret-7c1f",
        key["key"].as_str().unwrap(),
        world.gateway.token.as_str(),
    ] {
        assert!(!log.contains(secret), "`{secret}` was logged");
    }
}

/// Old events go with their deliveries and attempts; an event with an
/// unfinished delivery stays, and so do recent ones.
#[tokio::test]
async fn retention_deletes_old_finished_history() {
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_RETENTION", "2s")
        .env("WASMHOOK_RETENTION_INTERVAL", "200ms")
        .env("WASMHOOK_IDEMPOTENCY_WINDOW", "1s")
        .env("WASMHOOK_RETRY_SCHEDULE", "1h")
        .spawn()
        .await;
    let world = World::with(gateway).await;
    world
        .webhook("/done", json!({"event_types": ["done.*"]}))
        .await;
    let failing = failing_receiver().await;
    world
        .gateway
        .create_webhook(
            &world.app,
            json!({"url": failing.url("/stuck"), "event_types": ["stuck.*"]}),
        )
        .await;
    let done = world.publish("done.one", json!({})).await;
    let stuck = world.publish("stuck.one", json!({})).await;
    world.wait_for(1, PATIENCE).await;
    failing.wait_for(1, PATIENCE).await;
    let done_id = done["id"].as_str().unwrap();
    let done_delivery = done["deliveries"][0]["id"].as_str().unwrap();
    let attempts_of_done =
        format!("SELECT count(*) FROM attempts WHERE delivery_id = '{done_delivery}'");
    let deadline = Instant::now() + PATIENCE;
    while world.gateway.workspace.count(&attempts_of_done).await != 1 {
        assert!(Instant::now() < deadline, "the attempt was never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let deadline = Instant::now() + PATIENCE;
    while world
        .gateway
        .get(&world.path(&format!("/events/{done_id}")))
        .await
        .0
        != StatusCode::NOT_FOUND
    {
        assert!(Instant::now() < deadline, "the old event was never deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recent = world.publish("done.two", json!({})).await;
    let recent_id = recent["id"].as_str().unwrap();
    let stuck_id = stuck["id"].as_str().unwrap();
    for kept in [stuck_id, recent_id] {
        let (status, body) = world
            .gateway
            .get(&world.path(&format!("/events/{kept}")))
            .await;
        assert_eq!(status, StatusCode::OK, "{kept}: {body}");
    }
    assert_eq!(world.gateway.workspace.count(&attempts_of_done).await, 0);
    let deliveries_of_done =
        format!("SELECT count(*) FROM deliveries WHERE event_id = '{done_id}'");
    assert_eq!(world.gateway.workspace.count(&deliveries_of_done).await, 0);
    let page = scrape(&world.gateway).await;
    assert!(
        sample(&page, "wasmhook_retention_deleted_events_total") >= Some(1.0),
        "{page}"
    );
}
