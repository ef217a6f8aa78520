//! The integrator's side: real deliveries verified with the official
//! Standard Webhooks library for Python, as the README's receiver guide
//! shows.

use std::io::Write;
use std::process::{Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::StatusCode;
use serde_json::{Map, Value, json};
use wasmhook_tests::{Received, python, python_script};

use crate::{PATIENCE, World};

/// What the Python script gets for one delivery.
fn case(secret: &str, received: &Received, body: &[u8]) -> Value {
    let headers: Map<String, Value> = received
        .headers
        .iter()
        .map(|(name, value)| (name.to_string(), json!(value.to_str().unwrap())))
        .collect();
    json!({"secret": secret, "headers": headers, "body_base64": STANDARD.encode(body)})
}

/// Runs `tests/python/verify_deliveries.py`: one verdict per case.
fn verify_in_python(cases: &[Value]) -> Vec<String> {
    let mut child = Command::new(python())
        .arg(python_script("verify_deliveries.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    let input = serde_json::to_vec(cases).unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_official_python_library_verifies_real_deliveries() {
    let world = World::new().await;
    let (envelope_id, envelope_secret) = world.webhook("/envelope", json!({})).await;
    let (_, raw_secret) = world.webhook("/raw", json!({"raw_payload": true})).await;
    let plugin = world.gateway.plugin("cloudevents").await;
    let (_, plugged_secret) = world
        .webhook("/plugged", json!({"plugin": {"id": plugin}}))
        .await;
    // Non-ASCII text and a number whose spelling JSON parsers change: the
    // signature covers the bytes as sent.
    world
        .publish("order.paid", json!({"name": "Zoë ✓", "total": 1.50e3}))
        .await;
    let mut got = world.wait_for(3, PATIENCE).await;
    got.sort_by(|a, b| a.path.cmp(&b.path));
    let secret_of = |path: &str| match path {
        "/envelope" => &envelope_secret,
        "/raw" => &raw_secret,
        _ => &plugged_secret,
    };
    let mut cases: Vec<Value> = got
        .iter()
        .map(|r| case(secret_of(&r.path), r, &r.body))
        .collect();
    // What must not verify: a changed body, and the wrong secret.
    let mut tampered = got[0].body.to_vec();
    tampered[0] ^= 0x20;
    cases.push(case(secret_of(&got[0].path), &got[0], &tampered));
    cases.push(case(&raw_secret, &got[0], &got[0].body));
    let verdicts = verify_in_python(&cases);
    assert_eq!(&verdicts[..3], ["ok", "ok", "ok"], "{verdicts:?}");
    assert!(verdicts[3].starts_with("invalid"), "{verdicts:?}");
    assert!(verdicts[4].starts_with("invalid"), "{verdicts:?}");
    assert_eq!(verdicts.len(), 5);

    // During a rotation a delivery carries both signatures: receivers with
    // either secret accept it.
    let (status, rotated) = world
        .gateway
        .post(
            &world.path(&format!("/webhooks/{envelope_id}/secret/rotate")),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    let before = world.receiver.count();
    world.publish("order.shipped", json!({"n": 2})).await;
    let got = world.receiver.wait_for(before + 3, PATIENCE).await;
    let rotated_delivery = got[before..]
        .iter()
        .find(|r| r.path == "/envelope")
        .expect("a delivery to the rotated webhook");
    let verdicts = verify_in_python(&[
        case(&envelope_secret, rotated_delivery, &rotated_delivery.body),
        case(&new_secret, rotated_delivery, &rotated_delivery.body),
    ]);
    assert_eq!(verdicts, ["ok", "ok"]);
}
