//! Crash and shutdown safety: every accepted event is delivered after a
//! SIGKILL; SIGTERM finishes or releases in-flight deliveries.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use wasmhook_tests::{GatewayBuilder, Reply};

use crate::World;

fn received_ids(world: &World) -> BTreeMap<String, usize> {
    let mut ids = BTreeMap::new();
    for request in world.receiver.received() {
        *ids.entry(request.header("webhook-id").unwrap().to_owned())
            .or_default() += 1;
    }
    ids
}

async fn wait_for_ids(world: &World, expected: &BTreeSet<String>, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got: BTreeSet<String> = received_ids(world).into_keys().collect();
        let missing: Vec<_> = expected.difference(&got).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} accepted events never delivered, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn every_accepted_event_is_delivered_after_a_kill() {
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_LEASE", "3s")
        .env("WASMHOOK_REQUEST_TIMEOUT", "2s")
        .env("WASMHOOK_WORKER_CONCURRENCY", "8")
        .spawn()
        .await;
    let world = World::with(gateway).await;
    world.webhook("/crash", json!({})).await;
    // At most 8 in flight for 100 ms each: 80 deliveries a second, which
    // publishers outrun even on a loaded machine, so the kill finds
    // accepted events not yet sent.
    world
        .receiver
        .always(Reply::status(200).delay(Duration::from_millis(100)));

    // Publishers run until the kill makes their requests fail.
    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let mut publishers = Vec::new();
    for p in 0..4 {
        let client = world.gateway.client.clone();
        let url = format!("{}{}", world.gateway.base_url, world.path("/events"));
        let token = world.gateway.token.clone();
        let accepted = accepted.clone();
        publishers.push(tokio::spawn(async move {
            for n in 0..1000 {
                let body = json!({"event_type": "load.tick", "payload": {"p": p, "n": n}});
                let Ok(response) = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                else {
                    return;
                };
                if response.status() != StatusCode::ACCEPTED {
                    return;
                }
                let Ok(body) = response.json::<serde_json::Value>().await else {
                    return;
                };
                accepted
                    .lock()
                    .unwrap()
                    .insert(body["id"].as_str().unwrap().to_owned());
            }
        }));
    }
    while accepted.lock().unwrap().len() < world.receiver.count() + 50
        || world.receiver.count() < 20
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut world = world;
    world.gateway.kill().await;
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    let before_restart = world.receiver.count();
    assert!(
        before_restart < accepted.len(),
        "the kill came too late to test anything"
    );

    let world = world.restarted().await;
    wait_for_ids(&world, &accepted, Duration::from_secs(60)).await;
    world
        .wait_for(world.receiver.count(), crate::PATIENCE)
        .await;
}

#[tokio::test]
async fn sigterm_finishes_in_flight_deliveries() {
    let world = World::new().await;
    world.webhook("/slow", json!({})).await;
    world
        .receiver
        .always(Reply::status(200).delay(Duration::from_millis(800)));
    let mut ids = BTreeSet::new();
    for n in 0..5 {
        ids.insert(
            world.publish("a.b", json!({"n": n})).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    world.wait_for(5, crate::PATIENCE).await;
    let mut world = world;
    let status = world.gateway.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    assert!(world.gateway.log().contains("stopped cleanly"));

    let world = world.restarted().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = received_ids(&world);
    assert_eq!(counts.keys().cloned().collect::<BTreeSet<_>>(), ids);
    assert!(counts.values().all(|n| *n == 1), "sent twice: {counts:?}");
    let (_, event_deliveries) = world
        .gateway
        .get(&world.path(&format!("/events/{}/deliveries", ids.first().unwrap())))
        .await;
    assert_eq!(event_deliveries[0]["status"], "succeeded");
}

#[tokio::test]
async fn sigterm_releases_what_cannot_finish_in_the_grace_period() {
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_SHUTDOWN_GRACE", "200ms")
        .env("WASMHOOK_REQUEST_TIMEOUT", "20s")
        .env("WASMHOOK_LEASE", "120s")
        .spawn()
        .await;
    let world = World::with(gateway).await;
    world.webhook("/stuck", json!({})).await;
    world
        .receiver
        .script([Reply::status(200).delay(Duration::from_secs(30))]);
    let accepted = world.publish("a.b", json!({})).await;
    world.wait_for(1, crate::PATIENCE).await;
    let mut world = world;
    assert!(world.gateway.terminate().await.success());

    // Released, not left to a 120 s lease: sent again right after restart.
    let world = world.restarted().await;
    world.wait_for(2, crate::PATIENCE).await;
    let id = accepted["deliveries"][0]["id"].as_str().unwrap();
    world
        .gateway
        .wait_for_delivery(&world.app, id, "succeeded", crate::PATIENCE)
        .await;
}
