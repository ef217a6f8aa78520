//! Failure handling: retries on the schedule, `Retry-After`, dead-lettering,
//! manual retry, `410 Gone`, automatic disabling, timeouts.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use wasmhook_tests::{GatewayBuilder, Reply, verify_signature};

use crate::{PATIENCE, World};

fn delivery_id(accepted: &Value) -> String {
    accepted["deliveries"][0]["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn retries_after_500s_then_succeeds_and_clears_the_error() {
    let world = World::new().await;
    let (_, secret) = world.webhook("/flaky", json!({})).await;
    world
        .receiver
        .script([Reply::status(500).body("boom"), Reply::status(502)]);
    let accepted = world.publish("a.b", json!({"n": 1})).await;
    let got = world.wait_for(3, PATIENCE).await;
    let ids: Vec<_> = got
        .iter()
        .map(|r| r.header("webhook-id").unwrap())
        .collect();
    assert!(ids.iter().all(|id| *id == accepted["id"]), "{ids:?}");
    for request in &got {
        verify_signature(&secret, request).unwrap();
    }
    let delivery = world
        .gateway
        .wait_for_delivery(&world.app, &delivery_id(&accepted), "succeeded", PATIENCE)
        .await;
    assert_eq!(delivery["attempt_count"], 3);
    assert_eq!(delivery["last_error"], Value::Null);
    assert_eq!(delivery["last_status_code"], 200);
    let attempts = delivery["attempts"].as_array().unwrap();
    let codes: Vec<_> = attempts
        .iter()
        .map(|a| a["status_code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [500, 502, 200]);
    assert_eq!(attempts[0]["response_body"], "boom");
    assert_eq!(attempts[0]["outcome"], "http_error");
    assert!(attempts[0]["error"].as_str().unwrap().contains("500"));
}

/// The time between a first attempt answered with `reply` and the retry,
/// on a gateway with this retry schedule.
async fn retry_gap(schedule: &str, reply: Reply) -> Duration {
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_RETRY_SCHEDULE", schedule)
        .spawn()
        .await;
    let world = World::with(gateway).await;
    world.webhook("/busy", json!({})).await;
    world.receiver.script([reply]);
    world.publish("a.b", json!({})).await;
    let got = world.wait_for(2, PATIENCE).await;
    got[1].at - got[0].at
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let gap = retry_gap("30s,30s", Reply::status(429).header("retry-after", "1")).await;
    assert!(
        gap >= Duration::from_millis(900),
        "retried too early: {gap:?}"
    );
    assert!(
        gap < Duration::from_secs(20),
        "schedule used instead of Retry-After: {gap:?}"
    );
}

#[tokio::test]
async fn retry_after_is_capped_at_the_largest_scheduled_delay() {
    let gap = retry_gap(
        "200ms,300ms",
        Reply::status(503).header("retry-after", "3600"),
    )
    .await;
    assert!(gap < Duration::from_secs(5), "{gap:?}");
}

#[tokio::test]
async fn dead_after_the_last_attempt_then_manual_retry_delivers() {
    let world = World::new().await;
    world.webhook("/down", json!({})).await;
    world.receiver.always(Reply::status(500));
    let accepted = world.publish("a.b", json!({})).await;
    let id = delivery_id(&accepted);
    // Schedule of three delays: four attempts.
    let dead = world
        .gateway
        .wait_for_delivery(&world.app, &id, "dead", PATIENCE)
        .await;
    assert_eq!(dead["attempt_count"], 4);
    assert_eq!(dead["next_attempt_at"], Value::Null);
    assert!(dead["last_error"].as_str().unwrap().contains("500"));
    world
        .receiver
        .expect_no_more(4, Duration::from_millis(500))
        .await;

    world.receiver.always(Reply::status(204));
    let (status, retried) = world
        .gateway
        .post(&world.path(&format!("/deliveries/{id}/retry")), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{retried}");
    let done = world
        .gateway
        .wait_for_delivery(&world.app, &id, "succeeded", PATIENCE)
        .await;
    assert_eq!(done["attempt_count"], 5);
    assert_eq!(done["last_error"], Value::Null);
    assert_eq!(world.receiver.count(), 5);
}

/// A webhook's own `retry_schedule` replaces the server's for its
/// deliveries only; null gives the server's back.
#[tokio::test]
async fn a_webhooks_own_retry_schedule_decides_its_attempts() {
    let world = World::new().await;
    let (own, _) = world
        .webhook("/own", json!({"retry_schedule": ["100ms"]}))
        .await;
    world.webhook("/server", json!({})).await;
    world.receiver.always(Reply::status(500));
    let (_, shown) = world
        .gateway
        .get(&world.path(&format!("/webhooks/{own}")))
        .await;
    assert_eq!(shown["retry_schedule"], json!(["100ms"]));

    let accepted = world.publish("a.b", json!({})).await;
    for delivery in accepted["deliveries"].as_array().unwrap() {
        let id = delivery["id"].as_str().unwrap();
        let dead = world
            .gateway
            .wait_for_delivery(&world.app, id, "dead", PATIENCE)
            .await;
        // One delay: two attempts; the server's three: four.
        let expected = if delivery["webhook_id"] == own { 2 } else { 4 };
        assert_eq!(dead["attempt_count"], expected, "{delivery}");
    }
    world
        .receiver
        .expect_no_more(6, Duration::from_millis(500))
        .await;

    let (status, back) = world
        .gateway
        .patch(
            &world.path(&format!("/webhooks/{own}")),
            json!({"retry_schedule": null}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{back}");
    assert_eq!(back["retry_schedule"], Value::Null);
}

#[tokio::test]
async fn gone_disables_the_webhook_at_once() {
    let world = World::new().await;
    let (webhook, _) = world.webhook("/gone", json!({})).await;
    world.receiver.always(Reply::status(410));
    let accepted = world.publish("a.b", json!({})).await;
    let dead = world
        .gateway
        .wait_for_delivery(&world.app, &delivery_id(&accepted), "dead", PATIENCE)
        .await;
    assert_eq!(dead["attempt_count"], 1);
    let (_, shown) = world
        .gateway
        .get(&world.path(&format!("/webhooks/{webhook}")))
        .await;
    assert_eq!(shown["enabled"], false);
    assert!(
        shown["disabled_reason"].as_str().unwrap().contains("410"),
        "{shown}"
    );
    let next = world.publish("a.b", json!({})).await;
    assert_eq!(next["deliveries"], json!([]));

    // Enabling it again clears the reason.
    let (_, enabled) = world
        .gateway
        .patch(
            &world.path(&format!("/webhooks/{webhook}")),
            json!({"enabled": true}),
        )
        .await;
    assert_eq!(enabled["enabled"], true);
    assert_eq!(enabled["disabled_reason"], Value::Null);
}

#[tokio::test]
async fn a_webhook_failing_for_the_configured_period_is_disabled() {
    let gateway = GatewayBuilder::default()
        .env(
            "WASMHOOK_RETRY_SCHEDULE",
            "150ms,150ms,150ms,150ms,150ms,150ms,150ms,150ms",
        )
        .env("WASMHOOK_DISABLE_AFTER", "500ms")
        .spawn()
        .await;
    let world = World::with(gateway).await;
    let (webhook, _) = world.webhook("/failing", json!({})).await;
    world.receiver.always(Reply::status(500));
    world.publish("a.b", json!({})).await;
    let path = world.path(&format!("/webhooks/{webhook}"));
    let shown = world
        .gateway
        .poll(&path, PATIENCE, |w| w["enabled"] == false)
        .await;
    assert!(
        shown["disabled_reason"]
            .as_str()
            .unwrap()
            .contains("failed"),
        "{shown}"
    );
    // Disabled between attempts, so attempts stopped before the schedule ran out.
    let stopped_at = world.receiver.count();
    assert!(stopped_at < 9, "{stopped_at} attempts");
    world
        .receiver
        .expect_no_more(stopped_at, Duration::from_millis(500))
        .await;
}

#[tokio::test]
async fn timeouts_and_refused_connections_are_recorded() {
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_REQUEST_TIMEOUT", "500ms")
        .env("WASMHOOK_RETRY_SCHEDULE", "10s")
        .spawn()
        .await;
    let world = World::with(gateway).await;
    world.webhook("/slow", json!({})).await;
    world
        .receiver
        .always(Reply::status(200).delay(Duration::from_secs(3)));
    let slow = world.publish("a.b", json!({})).await;

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("http://{}/nobody", closed.local_addr().unwrap());
    drop(closed);
    let other_app = world.gateway.create_app("refused").await;
    world
        .gateway
        .create_webhook(&other_app, json!({"url": closed_url}))
        .await;
    let refused = world.gateway.publish(&other_app, "a.b", json!({})).await;

    for (app, accepted, outcome) in [
        (&world.app, &slow, "timeout"),
        (&other_app, &refused, "connection_error"),
    ] {
        let path = format!("/v1/apps/{app}/deliveries/{}", delivery_id(accepted));
        let d = world
            .gateway
            .poll(&path, PATIENCE, |d| d["status"] == "failed")
            .await;
        assert_eq!(d["attempts"][0]["outcome"], outcome, "{d}");
        assert!(d["last_error"].is_string());
    }
}

#[tokio::test]
async fn redirects_are_not_followed() {
    // No retry before the check, however slow the machine.
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_RETRY_SCHEDULE", "1h")
        .spawn()
        .await;
    let world = World::with(gateway).await;
    world.webhook("/moved", json!({})).await;
    let elsewhere = world.receiver.url("/elsewhere");
    world
        .receiver
        .always(Reply::status(302).header("location", elsewhere));
    let accepted = world.publish("a.b", json!({})).await;
    let path = world.path(&format!("/deliveries/{}", delivery_id(&accepted)));
    let d = world
        .gateway
        .poll(&path, PATIENCE, |d| d["attempt_count"] == 1)
        .await;
    assert_eq!(d["status"], "failed", "{d}");
    assert_eq!(d["attempts"][0]["status_code"], 302);
    assert!(world.receiver.received().iter().all(|r| r.path == "/moved"));
}

#[tokio::test]
async fn only_the_first_4_kib_of_a_response_is_kept() {
    let world = World::new().await;
    world.webhook("/chatty", json!({})).await;
    world
        .receiver
        .script([Reply::status(500).body("é".repeat(10_000))]);
    let accepted = world.publish("a.b", json!({})).await;
    let delivery = world
        .gateway
        .wait_for_delivery(&world.app, &delivery_id(&accepted), "succeeded", PATIENCE)
        .await;
    let kept = delivery["attempts"][0]["response_body"].as_str().unwrap();
    assert!(kept.len() <= 4096, "{} bytes kept", kept.len());
    assert!(kept.len() >= 4000);
    assert!(kept.chars().all(|c| c == 'é'), "cut inside a character");
}
