//! Sending again what was sent: replaying an event to every webhook
//! subscribed now, or to one webhook.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{PATIENCE, World};

fn webhooks_of(accepted: &Value) -> Vec<String> {
    let mut webhooks: Vec<String> = accepted["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["webhook_id"].as_str().unwrap().to_owned())
        .collect();
    webhooks.sort();
    webhooks
}

#[tokio::test]
async fn an_event_is_replayed_to_webhooks_subscribed_now_or_to_one() {
    let world = World::new().await;
    let (first, _) = world
        .webhook("/first", json!({"event_types": ["order.*"]}))
        .await;
    let accepted = world.publish("order.paid", json!({"n": 1})).await;
    let event = accepted["id"].as_str().unwrap().to_owned();
    world.wait_for(1, PATIENCE).await;

    // Created after the event: one subscribed to it, one not.
    let (later, _) = world.webhook("/later", json!({})).await;
    let (other, _) = world
        .webhook("/other", json!({"event_types": ["user.*"]}))
        .await;
    let replay = world.path(&format!("/events/{event}/replay"));
    let (status, replayed) = world.gateway.post(&replay, json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{replayed}");
    assert_eq!(replayed["id"], event.as_str());
    let mut expected = vec![first.clone(), later.clone()];
    expected.sort();
    assert_eq!(webhooks_of(&replayed), expected);

    let (status, to_one) = world
        .gateway
        .post(&replay, json!({"webhook_id": other}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{to_one}");
    assert_eq!(webhooks_of(&to_one), vec![other.clone()]);

    // The first delivery, the replay to both, and the one to `other`: each
    // signed, each with the event's id as `webhook-id`.
    let got = world.wait_for(4, PATIENCE).await;
    let mut paths: Vec<&str> = got.iter().map(|r| r.path.as_str()).collect();
    paths.sort();
    assert_eq!(paths, vec!["/first", "/first", "/later", "/other"]);
    assert!(got.iter().all(|r| r.header("webhook-id") == Some(&event)));
    world
        .receiver
        .expect_no_more(4, std::time::Duration::from_millis(300))
        .await;

    let (status, error) = world
        .gateway
        .post(&replay, json!({"webhook_id": "wh_nope"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("webhook_id")
    );
    let (status, _) = world
        .gateway
        .post(&world.path("/events/evt_nope/replay"), json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
