//! The admin CLI: `wasmhook app|webhook|event|delivery|plugin …` run as a
//! separate process against a running gateway, tables and `--json`.

use std::path::Path;

use futures::StreamExt;
use serde_json::{Value, json};
use wasmhook_tests::{TestGateway, gateway_binary};

use crate::{PATIENCE, World};

struct Ran {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

/// Runs `wasmhook <args>` against `gateway` with `token`.
async fn cli(gateway: &TestGateway, token: &str, args: &[&str]) -> Ran {
    let output = tokio::process::Command::new(gateway_binary())
        .args(args)
        .env_clear()
        .env("WASMHOOK_URL", &gateway.base_url)
        .env("WASMHOOK_TOKEN", token)
        .output()
        .await
        .expect("run the CLI");
    Ran {
        ok: output.status.success(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// As the admin; panics with the output unless it succeeded.
async fn admin(gateway: &TestGateway, args: &[&str]) -> Ran {
    let ran = cli(gateway, &gateway.token, args).await;
    assert!(
        ran.ok,
        "wasmhook {args:?} failed:\n{}\n{}",
        ran.stdout, ran.stderr
    );
    ran
}

fn write(dir: &Path, name: &str, value: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, value.to_string()).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn an_admin_runs_the_whole_flow_from_the_command_line() {
    let world = World::new().await;
    let gateway = &world.gateway;
    let dir = tempfile::tempdir().unwrap();

    let app = admin(
        gateway,
        &["app", "create", "Shop", "--uid", "shop", "--json"],
    )
    .await
    .json();
    assert_eq!(app["uid"], "shop");
    let listed = admin(gateway, &["app", "list"]).await.stdout;
    assert!(
        listed.contains("shop") && listed.contains("Shop"),
        "{listed}"
    );

    let url = world.receiver.url("/cli");
    let created = admin(
        gateway,
        &[
            "webhook",
            "create",
            &url,
            "--app",
            "shop",
            "--event-type",
            "order.*",
            "--header",
            "X-Team=ops",
            "--max-in-flight",
            "4",
            "--rate-limit",
            "500",
            "--rate-limit-burst",
            "50",
            "--retry-schedule",
            "10s,5m",
            "--json",
        ],
    )
    .await
    .json();
    let webhook = created["id"].as_str().unwrap().to_owned();
    let secret = created["secret"].as_str().unwrap().to_owned();
    assert_eq!(created["event_types"], json!(["order.*"]));
    assert_eq!(created["max_in_flight"], 4);
    assert_eq!(
        (
            created["rate_limit"].clone(),
            created["rate_limit_burst"].clone()
        ),
        (json!(500), json!(50))
    );
    assert_eq!(created["retry_schedule"], json!(["10s", "5m"]));
    world.remember_secret("/cli", &secret);
    let updated = admin(
        gateway,
        &[
            "webhook",
            "update",
            &webhook,
            "--app",
            "shop",
            "--rate-limit",
            "100",
            "--json",
        ],
    )
    .await
    .json();
    assert_eq!(
        (
            updated["rate_limit"].clone(),
            updated["rate_limit_burst"].clone()
        ),
        (json!(100), json!(10)),
        "a new rate, its burst back to the default"
    );
    assert_eq!(updated["max_in_flight"], 4, "what is not given stays");
    let lifted = admin(
        gateway,
        &[
            "webhook",
            "update",
            &webhook,
            "--app",
            "shop",
            "--no-rate-limit",
            "--default-retry-schedule",
            "--json",
        ],
    )
    .await
    .json();
    assert_eq!(lifted["rate_limit"], serde_json::Value::Null);
    assert_eq!(lifted["retry_schedule"], serde_json::Value::Null);
    let table = admin(gateway, &["webhook", "list", "--app", "shop"])
        .await
        .stdout;
    assert!(table.contains(&webhook) && table.contains(&url), "{table}");

    let published = admin(
        gateway,
        &[
            "event",
            "publish",
            "order.paid",
            "--app",
            "shop",
            "--payload",
            r#"{"total": 42}"#,
            "--idempotency-key",
            "k-1",
            "--ordering-key",
            "customer-7",
        ],
    )
    .await
    .stdout;
    assert!(published.contains("1 deliveries queued"), "{published}");
    let got = world.wait_for(1, PATIENCE).await;
    assert_eq!(got[0].json()["data"], json!({"total": 42}));
    let event_id = got[0].header("webhook-id").unwrap();
    let (_, event) = gateway
        .get(&format!("/v1/apps/shop/events/{event_id}"))
        .await;
    assert_eq!(event["ordering_key"], "customer-7");
    assert_eq!(got[0].header("x-team"), Some("ops"));

    let deliveries = admin(
        gateway,
        &[
            "delivery",
            "list",
            "--app",
            "shop",
            "--webhook",
            &webhook,
            "--json",
        ],
    )
    .await
    .json();
    let delivery = deliveries[0]["id"].as_str().unwrap().to_owned();
    let shown = admin(gateway, &["delivery", "show", &delivery, "--app", "shop"])
        .await
        .stdout;
    assert!(
        shown.contains("attempts:") && shown.contains("success"),
        "{shown}"
    );
    admin(gateway, &["delivery", "retry", &delivery, "--app", "shop"]).await;
    world.wait_for(2, PATIENCE).await;
    let replayed = admin(gateway, &["event", "replay", event_id, "--app", "shop"])
        .await
        .stdout;
    assert!(
        replayed.contains("queued again, 1 deliveries queued"),
        "{replayed}"
    );
    let got = world.wait_for(3, PATIENCE).await;
    assert_eq!(got[2].header("webhook-id"), Some(event_id));

    let rotated = admin(
        gateway,
        &[
            "webhook",
            "rotate-secret",
            &webhook,
            "--app",
            "shop",
            "--json",
        ],
    )
    .await
    .json();
    assert_ne!(rotated["secret"].as_str().unwrap(), secret);

    let wasm = wasmhook_tests::plugin_wasm("redact");
    let wasm_path = dir.path().join("redact.wasm");
    std::fs::write(&wasm_path, wasm).unwrap();
    let pushed = admin(
        gateway,
        &[
            "plugin",
            "push",
            wasm_path.to_str().unwrap(),
            "--name",
            "redact",
            "--version",
            "1.0.0",
            "--json",
        ],
    )
    .await
    .json();
    let plugin = pushed["id"].as_str().unwrap().to_owned();
    let plugins = admin(gateway, &["plugin", "list"]).await.stdout;
    assert!(
        plugins.contains(&plugin) && plugins.contains("redact"),
        "{plugins}"
    );

    let payload = write(
        dir.path(),
        "payload.json",
        &json!({"email": "a@b.c", "total": 1}),
    );
    let config = write(dir.path(), "config.json", &json!({"remove": ["/email"]}));
    let tried = admin(
        gateway,
        &[
            "plugin",
            "test",
            &plugin,
            "--payload",
            &payload,
            "--config",
            &config,
        ],
    )
    .await
    .stdout;
    assert!(
        tried.contains("deliver") && !tried.contains("a@b.c"),
        "{tried}"
    );
    assert!(tried.contains("plugin log ("), "{tried}");

    let attached = admin(
        gateway,
        &[
            "plugin",
            "attach",
            &webhook,
            &plugin,
            "--app",
            "shop",
            "--config",
            &format!("@{config}"),
            "--json",
        ],
    )
    .await
    .json();
    assert_eq!(attached["plugin"]["id"], plugin.as_str());
    admin(
        gateway,
        &[
            "event",
            "publish",
            "order.paid",
            "--app",
            "shop",
            "--payload",
            r#"{"email": "x@y.z", "n": 3}"#,
        ],
    )
    .await;
    // Signed with both secrets now (rotation overlap): not re-verified here.
    let got = world.receiver.wait_for(4, PATIENCE).await;
    assert_eq!(got[3].json()["data"], json!({"n": 3}));

    admin(gateway, &["webhook", "delete", &webhook, "--app", "shop"]).await;
    let gone = cli(
        gateway,
        &gateway.token,
        &["webhook", "show", &webhook, "--app", "shop"],
    )
    .await;
    assert_eq!(gone.code, Some(1));
    assert!(gone.stderr.starts_with("error: 404"), "{}", gone.stderr);
}

/// Mistakes get one clear line on stderr and status 1, before or after
/// reaching the gateway.
#[tokio::test]
async fn mistakes_are_named() {
    let world = World::new().await;
    let gateway = &world.gateway;

    let denied = cli(gateway, "not-a-token", &["app", "list"]).await;
    assert_eq!(denied.code, Some(1));
    assert!(denied.stderr.starts_with("error: 401"), "{}", denied.stderr);

    let no_app = admin_fails(gateway, &["webhook", "list"]).await;
    assert!(no_app.contains("--app"), "{no_app}");

    let bad_json = admin_fails(
        gateway,
        &[
            "event",
            "publish",
            "a.b",
            "--app",
            &world.app,
            "--payload",
            "{oops",
        ],
    )
    .await;
    assert!(bad_json.contains("--payload is not JSON"), "{bad_json}");

    let bad_url = admin_fails(
        gateway,
        &[
            "webhook",
            "create",
            "ftp://example.com",
            "--app",
            &world.app,
        ],
    )
    .await;
    assert!(
        bad_url.starts_with("error: 400") && bad_url.contains("`url`"),
        "{bad_url}"
    );

    let missing = admin_fails(
        gateway,
        &[
            "plugin",
            "push",
            "/nonexistent.wasm",
            "--name",
            "x",
            "--version",
            "1",
        ],
    )
    .await;
    assert!(missing.contains("/nonexistent.wasm"), "{missing}");

    let unreachable = tokio::process::Command::new(gateway_binary())
        .args(["app", "list", "--url", "http://127.0.0.1:9", "--token", "t"])
        .env_clear()
        .output()
        .await
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert!(
        stderr.contains("cannot reach the gateway at http://127.0.0.1:9"),
        "{stderr}"
    );
}

/// Runs as the admin, expects status 1; returns stderr.
async fn admin_fails(gateway: &TestGateway, args: &[&str]) -> String {
    let ran = cli(gateway, &gateway.token, args).await;
    assert_eq!(
        ran.code,
        Some(1),
        "{args:?}: {}\n{}",
        ran.stdout,
        ran.stderr
    );
    assert!(ran.stderr.starts_with("error: "), "{}", ran.stderr);
    ran.stderr
}

/// Lists stop at 1,000 items (a webhook may have millions of deliveries),
/// and say so on stderr.
#[tokio::test]
async fn long_lists_are_cut_at_a_thousand() {
    let world = World::new().await;
    let gateway = &world.gateway;
    futures::stream::iter(0..1050)
        .for_each_concurrent(32, |i| async move {
            let created = gateway
                .request(reqwest::Method::POST, "/v1/apps")
                .json(&json!({ "name": format!("app {i}") }))
                .send()
                .await
                .unwrap();
            assert_eq!(created.status(), reqwest::StatusCode::CREATED);
        })
        .await;
    let ran = admin(gateway, &["app", "list", "--json"]).await;
    assert_eq!(ran.json().as_array().unwrap().len(), 1000);
    assert!(
        ran.stderr.contains("only the first 1000 are shown"),
        "{}",
        ran.stderr
    );
}
