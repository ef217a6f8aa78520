//! The delivery path: envelope and raw bodies, Standard Webhooks headers
//! verified by the `standardwebhooks` crate, custom headers, fan-out with
//! filters, idempotency, and secret rotation.

use std::collections::BTreeSet;

use reqwest::StatusCode;
use serde_json::json;
use wasmhook_tests::verify_signature;

use crate::{PATIENCE, World};

#[tokio::test]
async fn delivers_a_signed_standard_webhooks_envelope() {
    let world = World::new().await;
    let (webhook, secret) = world
        .webhook("/hook", json!({"headers": {"X-Tenant": "acme"}}))
        .await;
    let accepted = world
        .publish("invoice.paid", json!({"amount": 1250, "currency": "EUR"}))
        .await;
    let event_id = accepted["id"].as_str().unwrap();
    assert_eq!(accepted["deliveries"][0]["webhook_id"], webhook.as_str());

    let got = world.wait_for(1, PATIENCE).await;
    let request = &got[0];
    verify_signature(&secret, request).unwrap();
    assert_eq!(request.path, "/hook");
    assert_eq!(request.header("webhook-id"), Some(event_id));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert!(
        request
            .header("user-agent")
            .unwrap()
            .starts_with("wasmhook/")
    );
    assert_eq!(request.header("x-tenant"), Some("acme"));
    let body = request.json();
    assert_eq!(body["type"], "invoice.paid");
    assert_eq!(body["data"], json!({"amount": 1250, "currency": "EUR"}));
    let (_, event) = world
        .gateway
        .get(&world.path(&format!("/events/{event_id}")))
        .await;
    assert_eq!(body["timestamp"], event["created_at"]);
    let sent_at: i64 = request
        .header("webhook-timestamp")
        .unwrap()
        .parse()
        .unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now - sent_at).abs() < 30);

    let delivery = accepted["deliveries"][0]["id"].as_str().unwrap();
    let shown = world
        .gateway
        .wait_for_delivery(&world.app, delivery, "succeeded", PATIENCE)
        .await;
    assert_eq!(shown["attempt_count"], 1);
    assert_eq!(shown["attempts"][0]["status_code"], 200);
    assert_eq!(shown["last_error"], serde_json::Value::Null);
}

#[tokio::test]
async fn raw_payload_webhooks_get_the_bytes_published() {
    let world = World::new().await;
    let (_, secret) = world.webhook("/raw", json!({"raw_payload": true})).await;
    let body = r#"{"event_type":"a.b","payload":{ "spaced" :  [1, 2.50, "é"] }}"#;
    let request = world
        .gateway
        .request(reqwest::Method::POST, &world.path("/events"))
        .header("content-type", "application/json")
        .body(body);
    let (status, _) = world.gateway.call(request).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let got = world.wait_for(1, PATIENCE).await;
    assert_eq!(
        &got[0].body[..],
        r#"{ "spaced" :  [1, 2.50, "é"] }"#.as_bytes()
    );
    verify_signature(&secret, &got[0]).unwrap();
}

#[tokio::test]
async fn fans_out_to_matching_webhooks_only() {
    let world = World::new().await;
    world.webhook("/all", json!({})).await;
    world
        .webhook("/invoices", json!({"event_types": ["invoice.*"]}))
        .await;
    world
        .webhook("/exact", json!({"event_types": ["user.created"]}))
        .await;
    world.webhook("/disabled", json!({"enabled": false})).await;

    let cases = [
        ("invoice.paid", 2),
        ("invoice.line.added", 2),
        ("user.created", 2),
        ("user.deleted", 1),
    ];
    let mut expected = 0;
    for (event_type, fanout) in cases {
        let accepted = world.publish(event_type, json!({"t": event_type})).await;
        assert_eq!(
            accepted["deliveries"].as_array().unwrap().len(),
            fanout,
            "{event_type}"
        );
        expected += fanout;
    }
    let got = world.wait_for(expected, PATIENCE).await;
    let pairs: BTreeSet<(String, String)> = got
        .iter()
        .map(|r| {
            (
                r.path.clone(),
                r.json()["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> = [
        ("/all", "invoice.paid"),
        ("/all", "invoice.line.added"),
        ("/all", "user.created"),
        ("/all", "user.deleted"),
        ("/invoices", "invoice.paid"),
        ("/invoices", "invoice.line.added"),
        ("/exact", "user.created"),
    ]
    .iter()
    .map(|(p, t)| (p.to_string(), t.to_string()))
    .collect();
    assert_eq!(pairs, want);
    world
        .receiver
        .expect_no_more(expected, std::time::Duration::from_millis(300))
        .await;
}

#[tokio::test]
async fn repeated_idempotency_keys_and_event_ids_queue_nothing_new() {
    let world = World::new().await;
    world.webhook("/idem", json!({})).await;
    let gateway = &world.gateway;
    let publish = |key: &'static str, payload: serde_json::Value| {
        gateway
            .request(reqwest::Method::POST, &world.path("/events"))
            .header("Idempotency-Key", key)
            .json(&json!({"event_type": "order.created", "payload": payload}))
    };
    let (status, first) = gateway.call(publish("order-42", json!({"n": 1}))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, second) = gateway.call(publish("order-42", json!({"n": 2}))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(first, second);
    let (_, third) = gateway.call(publish("order-43", json!({"n": 3}))).await;
    assert_ne!(third["id"], first["id"]);

    let by_id = json!({"event_type": "order.created", "payload": {"n": 4}, "id": "evt_fixed_1"});
    let (_, a) = gateway.post(&world.path("/events"), by_id.clone()).await;
    let (_, b) = gateway.post(&world.path("/events"), by_id).await;
    assert_eq!(a["id"], "evt_fixed_1");
    assert_eq!(a, b);

    let got = world.wait_for(3, PATIENCE).await;
    world
        .receiver
        .expect_no_more(3, std::time::Duration::from_millis(300))
        .await;
    let ids: BTreeSet<_> = got
        .iter()
        .map(|r| r.header("webhook-id").unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 3);
}

/// Publishers retrying at once (several gateway processes on PostgreSQL
/// see this) still get one event and one delivery per webhook.
#[tokio::test]
async fn concurrent_repeats_of_a_key_queue_one_event() {
    let world = World::new().await;
    world.webhook("/race", json!({})).await;
    let mut publishes = Vec::new();
    for n in 0..8 {
        let request = world
            .gateway
            .request(reqwest::Method::POST, &world.path("/events"))
            .header("Idempotency-Key", "race-1")
            .json(&json!({"event_type": "order.created", "payload": {"n": n}}));
        publishes.push(tokio::spawn(request.send()));
    }
    let mut ids = BTreeSet::new();
    for publish in publishes {
        let response = publish.await.unwrap().expect("gateway answers");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(
            body["deliveries"].as_array().map(Vec::len),
            Some(1),
            "{body}"
        );
        ids.insert(body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "one key, several events: {ids:?}");
    world.wait_for(1, PATIENCE).await;
    world
        .receiver
        .expect_no_more(1, std::time::Duration::from_millis(300))
        .await;
}

#[tokio::test]
async fn rotation_signs_with_both_secrets_during_the_overlap() {
    let world = World::new().await;
    let (webhook, old_secret) = world.webhook("/rot", json!({})).await;
    let (status, rotated) = world
        .gateway
        .post(
            &world.path(&format!("/webhooks/{webhook}/secret/rotate")),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap();
    assert_ne!(new_secret, old_secret);

    world.publish("a.b", json!({"x": 1})).await;
    let got = world.wait_for(1, PATIENCE).await;
    let signatures = got[0].header("webhook-signature").unwrap();
    assert_eq!(signatures.split(' ').count(), 2, "{signatures}");
    assert!(signatures.split(' ').all(|s| s.starts_with("v1,")));
    verify_signature(&old_secret, &got[0]).unwrap();
    verify_signature(new_secret, &got[0]).unwrap();
}

#[tokio::test]
async fn after_the_overlap_only_the_new_secret_signs() {
    let gateway = wasmhook_tests::GatewayBuilder::default()
        .env("WASMHOOK_SECRET_ROTATION_OVERLAP", "1ms")
        .spawn()
        .await;
    let world = World::with(gateway).await;
    let (webhook, old_secret) = world.webhook("/rot", json!({})).await;
    let (_, rotated) = world
        .gateway
        .post(
            &world.path(&format!("/webhooks/{webhook}/secret/rotate")),
            json!({}),
        )
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    world.remember_secret("/rot", rotated["secret"].as_str().unwrap());
    world.publish("a.b", json!({})).await;
    let got = world.wait_for(1, PATIENCE).await;
    assert_eq!(
        got[0]
            .header("webhook-signature")
            .unwrap()
            .split(' ')
            .count(),
        1
    );
    verify_signature(rotated["secret"].as_str().unwrap(), &got[0]).unwrap();
    assert!(verify_signature(&old_secret, &got[0]).is_err());
}

#[tokio::test]
async fn event_and_its_deliveries_can_be_read_back() {
    let world = World::new().await;
    let (webhook, _) = world.webhook("/read", json!({})).await;
    let accepted = world.publish("a.b", json!({"k": [1, 2]})).await;
    let event_id = accepted["id"].as_str().unwrap();
    let (status, event) = world
        .gateway
        .get(&world.path(&format!("/events/{event_id}")))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(event["payload"], json!({"k": [1, 2]}));
    assert_eq!(event["event_type"], "a.b");
    world.wait_for(1, PATIENCE).await;
    let delivery = accepted["deliveries"][0]["id"].as_str().unwrap();
    world
        .gateway
        .wait_for_delivery(&world.app, delivery, "succeeded", PATIENCE)
        .await;

    let (_, list) = world
        .gateway
        .get(&world.path(&format!("/events/{event_id}/deliveries")))
        .await;
    assert_eq!(list[0]["id"], delivery);
    let (_, by_webhook) = world
        .gateway
        .get(&world.path(&format!("/webhooks/{webhook}/deliveries?status=succeeded")))
        .await;
    assert_eq!(by_webhook["data"][0]["id"], delivery);
    let (_, none) = world
        .gateway
        .get(&world.path(&format!("/webhooks/{webhook}/deliveries?status=dead")))
        .await;
    assert_eq!(none["data"], json!([]));
}
