//! WebAssembly transform plugins end to end: the registry API, each example
//! plugin shaping real deliveries (signatures verified over the bytes
//! sent), skips, the playground, and hostile plugins stopped by the sandbox
//! while other webhooks keep flowing.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use wasmhook_tests::{GatewayBuilder, plugin_wasm};

use crate::{PATIENCE, World};

async fn event_time(world: &World, accepted: &Value) -> String {
    let path = world.path(&format!("/events/{}", accepted["id"].as_str().unwrap()));
    world.gateway.get(&path).await.1["created_at"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn registry_upload_is_immutable_and_deletion_guarded() {
    let world = World::new().await;
    let gateway = &world.gateway;
    let slack = plugin_wasm("slack");
    let (status, created) = gateway.upload_plugin("slack", "1.0.0", slack.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["size"], slack.len());
    assert_eq!(created["sha256"].as_str().unwrap().len(), 64);
    let id = created["id"].as_str().unwrap();

    let (status, again) = gateway.upload_plugin("slack", "1.0.0", slack).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["id"], id);
    let (status, conflict) = gateway
        .upload_plugin("slack", "1.0.0", plugin_wasm("redact"))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{conflict}");

    let (_, list) = gateway.get("/v1/plugins").await;
    assert_eq!(list["data"][0]["id"], id);
    let (status, shown) = gateway.get(&format!("/v1/plugins/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["name"], "slack");

    let (webhook, _) = world
        .webhook("/s", json!({"plugin": {"id": id, "config": {}}}))
        .await;
    let (status, body) = gateway.delete(&format!("/v1/plugins/{id}")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let path = world.path(&format!("/webhooks/{webhook}"));
    let (_, detached) = gateway.patch(&path, json!({"plugin": null})).await;
    assert_eq!(detached["plugin"], Value::Null);
    let (status, _) = gateway.delete(&format!("/v1/plugins/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = gateway.get(&format!("/v1/plugins/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_uploads_get_a_4xx_saying_why() {
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_PLUGIN_MAX_UPLOAD_BYTES", "100000")
        .spawn()
        .await;
    let empty_component = wat::parse_str("(component)").unwrap();
    let foreign_import =
        wat::parse_str(r#"(component (import "evil:net/socket" (instance)))"#).unwrap();
    let core_module = wat::parse_str("(module)").unwrap();
    let cases: Vec<(Vec<u8>, StatusCode, &str)> = vec![
        (
            b"definitely not wasm".to_vec(),
            StatusCode::BAD_REQUEST,
            "not WebAssembly",
        ),
        (
            core_module,
            StatusCode::BAD_REQUEST,
            "core WebAssembly module",
        ),
        (
            empty_component,
            StatusCode::BAD_REQUEST,
            "does not implement",
        ),
        (foreign_import, StatusCode::BAD_REQUEST, "imports"),
        (plugin_wasm("slack"), StatusCode::PAYLOAD_TOO_LARGE, "limit"),
    ];
    for (bytes, expected, says) in cases {
        let (status, body) = gateway.upload_plugin("p", "1", bytes).await;
        assert_eq!(status, expected, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "`{message}` does not say `{says}`");
    }
    let (status, body) = gateway
        .upload_plugin("bad name!", "1", plugin_wasm("slack"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let app = gateway.create_app("a").await;
    let (_, key) = gateway
        .post(&format!("/v1/apps/{app}/keys"), json!({}))
        .await;
    let request = gateway
        .request_as(
            key["key"].as_str().unwrap(),
            Method::POST,
            "/v1/plugins?name=p&version=1",
        )
        .body(plugin_wasm("slack"));
    assert_eq!(gateway.call(request).await.0, StatusCode::FORBIDDEN);
    let (status, body) = gateway
        .post(
            &format!("/v1/apps/{app}/webhooks"),
            json!({"url": "http://127.0.0.1:9/x", "plugin": {"id": "plg_nope"}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["field"], "plugin.id");
}

#[tokio::test]
async fn slack_plugin_shapes_a_signed_message() {
    let world = World::new().await;
    let plugin = world.gateway.plugin("slack").await;
    let config = json!({
        "template": "Invoice {{/invoice/id}} paid: {{/invoice/amount}} {{/invoice/currency}}",
        "fields": [{"title": "Customer", "value": "{{/customer/name}}"}],
    });
    world
        .webhook(
            "/slack",
            json!({"plugin": {"id": plugin, "config": config}}),
        )
        .await;
    let payload = json!({"invoice": {"id": "in_42", "amount": 4200, "currency": "EUR"}, "customer": {"name": "Acme"}});
    let accepted = world.publish("invoice.paid", payload).await;
    let got = world.wait_for(1, PATIENCE).await;
    let time = event_time(&world, &accepted).await;
    assert_eq!(
        got[0].json(),
        json!({
            "text": "Invoice in_42 paid: 4200 EUR",
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": "Invoice in_42 paid: 4200 EUR"}},
                {"type": "section", "fields": [{"type": "mrkdwn", "text": "*Customer*\nAcme"}]},
                {"type": "context", "elements": [{"type": "mrkdwn", "text": format!("`invoice.paid` · {time}")}]},
            ],
        })
    );
    assert_eq!(got[0].header("webhook-id"), accepted["id"].as_str());
}

#[tokio::test]
async fn redact_and_cloudevents_plugins_shape_deliveries() {
    let world = World::new().await;
    let redact = world.gateway.plugin("redact").await;
    let cloudevents = world.gateway.plugin("cloudevents").await;
    let redact_config = json!({"remove": ["/customer/email"], "mask": ["/card"], "keep_last": 4});
    world
        .webhook(
            "/redact",
            json!({"plugin": {"id": redact, "config": redact_config}}),
        )
        .await;
    let ce_config = json!({"source": "https://billing.example.com", "subject": "/order"});
    world
        .webhook(
            "/ce",
            json!({"plugin": {"id": cloudevents, "config": ce_config}}),
        )
        .await;
    let payload = json!({"order": "o_1", "customer": {"email": "x@y.z", "name": "Ann"}, "card": "4242424242424242"});
    let accepted = world.publish("order.created", payload).await;
    let got = world.wait_for(2, PATIENCE).await;
    let time = event_time(&world, &accepted).await;
    let by_path = |p: &str| got.iter().find(|r| r.path == p).unwrap().clone();
    assert_eq!(
        by_path("/redact").json(),
        json!({"type": "order.created", "timestamp": time, "data": {"order": "o_1", "customer": {"name": "Ann"}, "card": "****4242"}})
    );
    let ce = by_path("/ce");
    assert_eq!(
        ce.header("content-type"),
        Some("application/cloudevents+json")
    );
    assert_eq!(
        ce.json(),
        json!({
            "specversion": "1.0", "id": accepted["id"], "source": "https://billing.example.com",
            "type": "order.created", "time": time, "datacontenttype": "application/json", "subject": "o_1",
            "data": {"order": "o_1", "customer": {"email": "x@y.z", "name": "Ann"}, "card": "4242424242424242"},
        })
    );
}

#[tokio::test]
async fn filter_plugin_skips_without_a_request() {
    let world = World::new().await;
    let filter = world.gateway.plugin("filter").await;
    let config = json!({"all": [{"path": "/amount", "gt": 100}]});
    world
        .webhook("/big", json!({"plugin": {"id": filter, "config": config}}))
        .await;
    let small = world.publish("invoice.paid", json!({"amount": 5})).await;
    let big = world.publish("invoice.paid", json!({"amount": 500})).await;
    let got = world.wait_for(1, PATIENCE).await;
    assert_eq!(got[0].header("webhook-id"), big["id"].as_str());
    assert_eq!(got[0].json()["data"], json!({"amount": 500}));
    let id = small["deliveries"][0]["id"].as_str().unwrap();
    let skipped = world
        .gateway
        .wait_for_delivery(&world.app, id, "skipped", PATIENCE)
        .await;
    assert_eq!(skipped["skip_reason"], "/amount > 100 does not hold");
    world
        .receiver
        .expect_no_more(1, Duration::from_millis(300))
        .await;
}

#[tokio::test]
async fn the_playground_runs_a_plugin_on_a_sample() {
    let world = World::new().await;
    let gateway = &world.gateway;
    let filter = gateway.plugin("filter").await;
    let hostile = gateway.plugin("hostile").await;
    let run = |id: &str, payload: Value, config: Value| {
        let body = json!({"event_type": "invoice.paid", "payload": payload, "config": config});
        let path = format!("/v1/plugins/{id}/test");
        async move { gateway.post(&path, body).await }
    };
    let config = json!({"all": [{"path": "/amount", "gt": 100}]});
    let (status, pass) = run(&filter, json!({"amount": 500}), config.clone()).await;
    assert_eq!(status, StatusCode::OK, "{pass}");
    assert_eq!(pass["outcome"], "deliver");
    assert_eq!(pass["body"]["data"], json!({"amount": 500}));
    let (_, skip) = run(&filter, json!({"amount": 5}), config).await;
    assert_eq!(skip["outcome"], "skip");
    assert_eq!(skip["reason"], "/amount > 100 does not hold");
    let (_, trap) = run(&hostile, json!({}), json!({"mode": "trap"})).await;
    assert_eq!(trap["outcome"], "error");
    assert_eq!(trap["error"]["kind"], "trap");
    assert!(
        trap["error"]["message"].as_str().unwrap().contains("boom"),
        "{trap}"
    );
    assert!(trap["logs"].to_string().contains("panicked"), "{trap}");
    assert!(trap["duration_us"].is_u64());

    // The log is bounded, and the sandbox has no environment to leak.
    let (_, flood) = run(&hostile, json!({}), json!({"mode": "log-flood"})).await;
    let logs = flood["logs"].as_array().unwrap();
    assert!(logs.len() <= 101, "{} log lines kept", logs.len());
    assert!(
        logs.last().unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("dropped"),
        "{flood}"
    );
    let (_, env) = run(&hostile, json!({}), json!({"mode": "env"})).await;
    assert_eq!(env["body"], json!([]), "{env}");
}

#[tokio::test]
async fn hostile_plugins_fail_their_attempt_and_others_keep_flowing() {
    // The deadline is wall-clock time (epochs); leave room for a loaded CI
    // machine so only the runaway hits it.
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_RETRY_SCHEDULE", "1h")
        .env("WASMHOOK_PLUGIN_DEADLINE", "500ms")
        .spawn()
        .await;
    let world = World::with(gateway).await;
    let hostile = world.gateway.plugin("hostile").await;
    let modes = [
        ("loop", "timeout", ""),
        ("alloc", "memory_limit", ""),
        ("recurse", "stack_overflow", ""),
        ("shadow-stack", "trap", "out of bounds"),
        ("big-output", "invalid_output", "limit"),
        ("trap", "trap", "boom"),
        ("forbidden-header", "invalid_output", "webhook-signature"),
        ("read-file", "plugin_error", "read failed"),
        ("socket", "plugin_error", "connect failed"),
    ];
    for (mode, _, _) in modes {
        let config = json!({"mode": mode});
        let extra = json!({"plugin": {"id": hostile, "config": config}, "event_types": [format!("hostile.{mode}")]});
        world.webhook(&format!("/hostile/{mode}"), extra).await;
    }
    let (healthy, _) = world.webhook("/healthy", json!({})).await;

    let mut hostile_deliveries = Vec::new();
    for (mode, kind, says) in modes {
        let accepted = world
            .publish(
                &format!("hostile.{mode}"),
                json!({"secret": "untransformed"}),
            )
            .await;
        let deliveries = accepted["deliveries"].as_array().unwrap();
        assert_eq!(deliveries.len(), 2, "{accepted}");
        let hostile_delivery = deliveries
            .iter()
            .find(|d| d["webhook_id"] != healthy.as_str())
            .unwrap();
        hostile_deliveries.push((
            mode,
            kind,
            says,
            hostile_delivery["id"].as_str().unwrap().to_owned(),
        ));
    }
    // The healthy webhook got every event while the hostile ones failed.
    let got = world.wait_for(modes.len(), PATIENCE).await;
    assert!(
        got.iter().all(|r| r.path == "/healthy"),
        "a hostile webhook received something"
    );

    for (mode, kind, says, id) in hostile_deliveries {
        let path = world.path(&format!("/deliveries/{id}"));
        let d = world
            .gateway
            .poll(&path, PATIENCE, |d| d["attempt_count"] == 1)
            .await;
        let attempt = &d["attempts"][0];
        assert_eq!(d["status"], "failed", "{mode}: {d}");
        assert_eq!(attempt["outcome"], "plugin", "{mode}: {d}");
        assert_eq!(attempt["plugin_error"], kind, "{mode}: {d}");
        assert!(
            attempt["error"].as_str().unwrap().contains(says),
            "{mode}: {d}"
        );
        if mode == "loop" {
            let took = attempt["duration_ms"].as_i64().unwrap();
            assert!(
                (500..2000).contains(&took),
                "the runaway plugin ran {took} ms against a 500 ms deadline"
            );
        }
    }
    world
        .receiver
        .expect_no_more(modes.len(), Duration::from_millis(300))
        .await;
}

/// What a plugin hands back is checked and bounded before it reaches the
/// wire, the database or an answer: malformed or oversized headers and
/// content types fail the attempt with a short message, an 8 MiB error
/// or skip reason is stored cut to a few KiB, and nothing is sent.
#[tokio::test]
async fn malformed_or_oversized_plugin_output_is_a_bounded_plugin_error() {
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_RETRY_SCHEDULE", "1h")
        .env("WASMHOOK_PLUGIN_DEADLINE", "2s")
        .spawn()
        .await;
    let world = World::with(gateway).await;
    let hostile = world.gateway.plugin("hostile").await;
    let modes = [
        ("crlf-header", "invalid_output", "not a valid header value"),
        (
            "space-header-name",
            "invalid_output",
            "not a valid header name",
        ),
        (
            "many-headers",
            "invalid_output",
            "20000 headers; at most 32",
        ),
        ("huge-header-value", "invalid_output", "at most 8192"),
        ("huge-content-type", "invalid_output", "the content type is"),
        ("huge-error", "plugin_error", "bytes cut"),
        ("huge-skip", "", ""),
    ];
    let mut webhooks = Vec::new();
    for (mode, _, _) in modes {
        let extra = json!({"plugin": {"id": hostile, "config": {"mode": mode}}, "event_types": [format!("bad.{mode}")]});
        webhooks.push(world.webhook(&format!("/bad/{mode}"), extra).await.0);
    }
    world.webhook("/healthy", json!({})).await;
    let mut deliveries = Vec::new();
    for ((mode, kind, says), webhook) in modes.into_iter().zip(webhooks) {
        let accepted = world.publish(&format!("bad.{mode}"), json!({"n": 1})).await;
        let id = accepted["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["webhook_id"] == webhook.as_str())
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("{mode}: no delivery to its webhook: {accepted}"));
        deliveries.push((mode, kind, says, id));
    }
    let got = world.wait_for(modes.len(), PATIENCE).await;
    assert!(
        got.iter().all(|r| r.path == "/healthy"),
        "a malformed plugin output reached the wire"
    );
    for (mode, kind, says, id) in deliveries {
        let path = world.path(&format!("/deliveries/{id}"));
        let d = world
            .gateway
            .poll(&path, PATIENCE, |d| d["attempt_count"] == 1)
            .await;
        let text = d.to_string();
        assert!(
            text.len() < 16 * 1024,
            "{mode}: {} bytes stored",
            text.len()
        );
        if mode == "huge-skip" {
            assert_eq!(d["status"], "skipped", "{d}");
            let reason = d["skip_reason"].as_str().unwrap();
            assert!(
                reason.len() <= 1024 && reason.ends_with("bytes cut)"),
                "{reason}"
            );
            continue;
        }
        let attempt = &d["attempts"][0];
        assert_eq!(
            (&d["status"], &attempt["outcome"]),
            (&json!("failed"), &json!("plugin")),
            "{mode}: {d}"
        );
        assert_eq!(attempt["plugin_error"], kind, "{mode}: {d}");
        let error = attempt["error"].as_str().unwrap();
        assert!(error.contains(says), "{mode}: {error}");
        assert!(
            error.len() <= 4096,
            "{mode}: an error of {} bytes",
            error.len()
        );
        assert!(d["last_error"].as_str().unwrap().len() <= 4096, "{mode}");
    }

    // The playground's answer is bounded too.
    for mode in [
        "huge-error",
        "huge-skip",
        "huge-header-value",
        "many-headers",
    ] {
        let body = json!({"event_type": "a.b", "payload": {}, "config": {"mode": mode}});
        let (status, answer) = world
            .gateway
            .post(&format!("/v1/plugins/{hostile}/test"), body)
            .await;
        assert_eq!(status, StatusCode::OK, "{mode}: {answer}");
        let size = answer.to_string().len();
        assert!(
            size < 16 * 1024,
            "{mode}: the playground answered {size} bytes"
        );
    }
    let (status, _) = world.gateway.get("/healthz").await;
    assert_eq!(status, StatusCode::OK, "the gateway keeps running");
}

/// Plugins of one claimed batch run back to back on one task; a runaway
/// among them yields at every epoch tick, so the others are delivered
/// long before its deadline.
#[tokio::test]
async fn a_runaway_plugin_does_not_hold_up_the_plugins_of_its_batch() {
    let deadline = Duration::from_secs(10);
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_RETRY_SCHEDULE", "1h")
        .env("WASMHOOK_PLUGIN_DEADLINE", "10s")
        .spawn()
        .await;
    let world = World::with(gateway).await;
    let hostile = world.gateway.plugin("hostile").await;
    let passthrough = world.gateway.plugin("passthrough").await;
    for i in 0..3 {
        let plugin = json!({"plugin": {"id": hostile, "config": {"mode": "loop"}}});
        world.webhook(&format!("/runaway/{i}"), plugin).await;
    }
    let plugin = json!({"plugin": {"id": passthrough, "config": null}});
    world.webhook("/healthy", plugin).await;
    world.gateway.wait_for_optimised_plugins(PATIENCE).await;

    let published = std::time::Instant::now();
    let accepted = world.publish("order.created", json!({"n": 1})).await;
    assert_eq!(accepted["deliveries"].as_array().unwrap().len(), 4);
    let got = world.wait_for(1, PATIENCE).await;
    assert_eq!(got[0].path, "/healthy");
    let waited = got[0].at - published;
    assert!(
        waited < deadline / 2,
        "the healthy plugin's delivery waited {waited:?} behind runaways with a {deadline:?} deadline"
    );
}

/// A guest built for `wasm32-unknown-unknown` and componentized imports
/// only the plugin log: smaller, and accepted like any other.
#[tokio::test]
async fn components_without_wasi_are_accepted() {
    let world = World::new().await;
    let component = wasmhook_tests::plugin_component_from_core("passthrough");
    assert!(component.len() < plugin_wasm("passthrough").len());
    let (status, uploaded) = world
        .gateway
        .upload_plugin("bare", "1.0.0", component)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{uploaded}");
    world
        .webhook("/bare", json!({"plugin": {"id": uploaded["id"]}}))
        .await;
    world.publish("a.b", json!({"bare": true})).await;
    let got = world.wait_for(1, PATIENCE).await;
    assert_eq!(got[0].json(), json!({"bare": true}));
}

#[tokio::test]
async fn plugins_keep_working_after_a_restart() {
    let world = World::new().await;
    let plugin = world.gateway.plugin("passthrough").await;
    world.webhook("/p", json!({"plugin": {"id": plugin}})).await;
    // The upload answered after the quick compile; the optimised artifact
    // is stored in the background, and a restart loads it.
    world.gateway.wait_for_optimised_plugins(PATIENCE).await;
    let world = world.restarted().await;
    world.publish("a.b", json!({"kept": true})).await;
    let got = world.wait_for(1, PATIENCE).await;
    assert_eq!(got[0].json(), json!({"kept": true}));
}

/// An upload runs on Winch code until Cranelift's is ready: both tiers
/// must enforce the same sandbox and give the same answers.
#[tokio::test]
async fn both_compiler_tiers_run_plugins_within_the_sandbox() {
    use wasmhook::plugin::{Decision, PluginEvent, PluginHost, PluginLimits};

    let limits = PluginLimits {
        deadline: Duration::from_millis(500),
        ..PluginLimits::default()
    };
    let event = PluginEvent {
        id: "msg_tiers".into(),
        event_type: "invoice.paid".into(),
        app_id: "app_tiers".into(),
        app_uid: None,
        webhook_id: "wh_tiers".into(),
        attempt: 1,
        timestamp: "2026-11-29T10:00:00.000Z".into(),
        payload: r#"{"amount":4200}"#.into(),
    };
    let (passthrough, hostile) = (plugin_wasm("passthrough"), plugin_wasm("hostile"));
    let host = PluginHost::new(limits, 2).expect("plugin host");
    for optimized in [false, true] {
        let ready = |wasm: &[u8], name: &str| {
            if optimized {
                host.compile(wasm, name).expect("compiles").ready
            } else {
                host.compile_quick(wasm, name).expect("compiles")
            }
        };
        let (plain, runaway) = (ready(&passthrough, "p"), ready(&hostile, "h"));
        assert_eq!(plain.is_optimized(), optimized);
        assert_eq!(host.cached("p").expect("cached").is_optimized(), optimized);

        let done = host.run(&plain, event.clone(), "{}".into(), "p").await;
        match done.result {
            Ok(Decision::Deliver(d)) => assert_eq!(d.body, event.payload.as_bytes()),
            other => panic!("tier optimized={optimized}: {other:?}"),
        }
        for (mode, kind) in [
            ("loop", "timeout"),
            ("alloc", "memory_limit"),
            ("recurse", "stack_overflow"),
            ("trap", "trap"),
        ] {
            let config = json!({ "mode": mode }).to_string();
            let done = host.run(&runaway, event.clone(), config, "h").await;
            let error = done.result.expect_err(mode);
            assert_eq!(
                error.kind().as_str(),
                kind,
                "{mode}, optimized={optimized}: {error}"
            );
        }
    }
}
