//! The REST API: CRUD, authentication and authorization, pagination, and
//! clear 4xx errors for bad input.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use wasmhook_tests::{GatewayBuilder, spawn_app};

use crate::World;

#[tokio::test]
async fn health_and_readiness_need_no_token() {
    let gateway = spawn_app().await;
    for path in ["/healthz", "/readyz"] {
        let response = gateway
            .client
            .get(format!("{}{path}", gateway.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn app_crud_by_id_and_uid() {
    let gateway = spawn_app().await;
    let (status, app) = gateway
        .post("/v1/apps", json!({"name": "Acme", "uid": "acme-co"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{app}");
    let id = app["id"].as_str().unwrap();
    assert!(id.starts_with("app_"));

    let (status, by_uid) = gateway.get("/v1/apps/acme-co").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(by_uid["id"], id);

    let (status, patched) = gateway
        .patch(&format!("/v1/apps/{id}"), json!({"name": "Acme Inc"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["name"], "Acme Inc");
    assert_eq!(patched["uid"], "acme-co");

    let (status, dup) = gateway
        .post("/v1/apps", json!({"name": "Other", "uid": "acme-co"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{dup}");

    let (status, _) = gateway.delete("/v1/apps/acme-co").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, missing) = gateway.get(&format!("/v1/apps/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(missing["error"]["code"], "not_found");
}

#[tokio::test]
async fn apps_list_pages_with_a_cursor() {
    let gateway = spawn_app().await;
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(gateway.create_app(&format!("app {i}")).await);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("/v1/apps?limit=2&cursor={c}"),
            None => "/v1/apps?limit=2".to_owned(),
        };
        let (status, page) = gateway.get(&query).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 2);
        seen.extend(data.iter().map(|a| a["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, created);
    let (status, body) = gateway.get("/v1/apps?limit=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"].as_str().unwrap().contains("limit"));
}

#[tokio::test]
async fn webhook_crud_shows_the_secret_once() {
    let world = World::new().await;
    let gateway = &world.gateway;
    let created = gateway
        .create_webhook(
            &world.app,
            json!({
                "url": world.receiver.url("/a"),
                "description": "billing",
                "event_types": ["invoice.*", "user.created"],
                "headers": {"X-Tenant": "acme"},
            }),
        )
        .await;
    let id = created["id"].as_str().unwrap();
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"));
    assert_eq!(created["enabled"], true);
    assert_eq!(created["raw_payload"], false);
    assert_eq!(created["headers"]["x-tenant"], "acme");

    let (status, shown) = gateway.get(&world.path(&format!("/webhooks/{id}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(shown.get("secret").is_none(), "secret shown again: {shown}");
    assert!(!shown.to_string().contains(secret));
    assert!(
        shown["secret_masked"]
            .as_str()
            .unwrap()
            .starts_with("whsec_****")
    );
    assert_eq!(shown["event_types"], json!(["invoice.*", "user.created"]));

    let (status, list) = gateway.get(&world.path("/webhooks")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(secret));

    let (status, patched) = gateway
        .patch(
            &world.path(&format!("/webhooks/{id}")),
            json!({"event_types": null, "enabled": false, "description": "all"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["event_types"], Value::Null);
    assert_eq!(patched["enabled"], false);
    assert_eq!(patched["url"], world.receiver.url("/a"));

    // A rate limit is set, its burst changed alone, then lifted.
    let path = world.path(&format!("/webhooks/{id}"));
    let (_, limited) = gateway.patch(&path, json!({"rate_limit": 20})).await;
    assert_eq!(
        (
            limited["rate_limit"].as_u64(),
            limited["rate_limit_burst"].as_u64()
        ),
        (Some(20), Some(2))
    );
    let (_, burst) = gateway.patch(&path, json!({"rate_limit_burst": 7})).await;
    assert_eq!(
        (
            burst["rate_limit"].as_u64(),
            burst["rate_limit_burst"].as_u64()
        ),
        (Some(20), Some(7))
    );
    let (_, lifted) = gateway.patch(&path, json!({"rate_limit": null})).await;
    assert_eq!(
        (
            lifted["rate_limit"].clone(),
            lifted["rate_limit_burst"].clone()
        ),
        (Value::Null, Value::Null)
    );
    assert_eq!(lifted["breaker"]["state"], "closed");

    let (status, _) = gateway
        .delete(&world.path(&format!("/webhooks/{id}")))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = gateway.get(&world.path(&format!("/webhooks/{id}"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn tokens_are_checked_and_app_keys_stay_in_their_app() {
    let world = World::new().await;
    let gateway = &world.gateway;
    let other_app = gateway.create_app("Other").await;

    let (status, body) = gateway
        .call(gateway.client.get(format!("{}/v1/apps", gateway.base_url)))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _) = gateway
        .call(gateway.request_as("nope", Method::GET, "/v1/apps"))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, key) = gateway.post(&world.path("/keys"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let key_id = key["id"].as_str().unwrap().to_owned();
    let key = key["key"].as_str().unwrap().to_owned();

    // Its own app: webhooks and events are fine.
    let webhook = json!({"url": world.receiver.url("/k")});
    let own = gateway
        .request_as(&key, Method::POST, &world.path("/webhooks"))
        .json(&webhook);
    assert_eq!(gateway.call(own).await.0, StatusCode::CREATED);
    let event = json!({"event_type": "a.b", "payload": {}});
    let publish = gateway
        .request_as(&key, Method::POST, &world.path("/events"))
        .json(&event);
    assert_eq!(gateway.call(publish).await.0, StatusCode::ACCEPTED);

    // Another app, and admin-only routes: forbidden.
    let other = gateway.request_as(&key, Method::GET, &format!("/v1/apps/{other_app}/webhooks"));
    let (status, body) = gateway.call(other).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let missing = gateway.request_as(&key, Method::GET, "/v1/apps/app_does_not_exist");
    assert_eq!(gateway.call(missing).await.0, StatusCode::FORBIDDEN);
    for (method, path) in [
        (Method::GET, "/v1/apps".to_owned()),
        (Method::POST, world.path("/keys")),
    ] {
        let (status, _) = gateway
            .call(
                gateway
                    .request_as(&key, method, &path)
                    .json(&json!({"name": "x"})),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
    }
    // Authorisation comes before the body: an app key gets 403 on an
    // admin-only route whatever it sends, never a judgement of the body.
    for (method, path) in [
        (Method::POST, "/v1/apps".to_owned()),
        (Method::PATCH, world.path("")),
        (Method::POST, world.path("/keys")),
        (Method::POST, "/v1/plugins/plg_x/test".to_owned()),
    ] {
        let (status, body) = gateway
            .call(
                gateway
                    .request_as(&key, method, &path)
                    .header("content-type", "application/json")
                    .body("{\"name\": 42, broken"),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
    }

    // A deleted key stops working.
    let (status, _) = gateway
        .delete(&world.path(&format!("/keys/{key_id}")))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let again = gateway.request_as(&key, Method::GET, &world.path("/webhooks"));
    assert_eq!(gateway.call(again).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn bad_input_gets_a_4xx_naming_the_problem() {
    let world = World::new().await;
    let gateway = &world.gateway;
    let url = world.receiver.url("/x");
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        (
            "/webhooks",
            json!({}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "url",
        ),
        (
            "/webhooks",
            json!({"url": url, "urll": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "urll",
        ),
        (
            "/webhooks",
            json!({"url": 42}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "url",
        ),
        (
            "/webhooks",
            json!({"url": url, "event_types": []}),
            StatusCode::BAD_REQUEST,
            "event_types",
        ),
        (
            "/webhooks",
            json!({"url": url, "event_types": ["bad type"]}),
            StatusCode::BAD_REQUEST,
            "event_types",
        ),
        (
            "/webhooks",
            json!({"url": url, "headers": {"webhook-id": "x"}}),
            StatusCode::BAD_REQUEST,
            "headers",
        ),
        (
            "/webhooks",
            json!({"url": url, "headers": {"bad name": "x"}}),
            StatusCode::BAD_REQUEST,
            "headers",
        ),
        (
            "/webhooks",
            json!({"url": "not a url"}),
            StatusCode::BAD_REQUEST,
            "url",
        ),
        (
            "/webhooks",
            json!({"url": url, "rate_limit": 0}),
            StatusCode::BAD_REQUEST,
            "rate_limit",
        ),
        (
            "/webhooks",
            json!({"url": url, "rate_limit": 10, "rate_limit_burst": 10_001}),
            StatusCode::BAD_REQUEST,
            "rate_limit_burst",
        ),
        (
            "/webhooks",
            json!({"url": url, "rate_limit_burst": 5}),
            StatusCode::BAD_REQUEST,
            "rate_limit_burst",
        ),
        (
            "/webhooks",
            json!({"url": url, "retry_schedule": ["5s", "soon"]}),
            StatusCode::BAD_REQUEST,
            "retry_schedule",
        ),
        (
            "/webhooks",
            json!({"url": url, "retry_schedule": ["0s"]}),
            StatusCode::BAD_REQUEST,
            "retry_schedule",
        ),
        (
            "/webhooks",
            json!({"url": url, "retry_schedule": vec!["1s"; 31]}),
            StatusCode::BAD_REQUEST,
            "retry_schedule",
        ),
        (
            "/webhooks",
            json!({"url": url, "retry_schedule": ["5d", "5d"]}),
            StatusCode::BAD_REQUEST,
            "retry_schedule",
        ),
        (
            "/events",
            json!({"payload": {}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "event_type",
        ),
        (
            "/events",
            json!({"event_type": "a"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "payload",
        ),
        (
            "/events",
            json!({"event_type": "", "payload": {}}),
            StatusCode::BAD_REQUEST,
            "event_type",
        ),
        (
            "/events",
            json!({"event_type": "a", "payload": {}, "id": "has space"}),
            StatusCode::BAD_REQUEST,
            "id",
        ),
        (
            "/events",
            json!({"event_type": "a", "payload": {}, "ordering_key": ""}),
            StatusCode::BAD_REQUEST,
            "ordering_key",
        ),
        (
            "/events",
            json!({"event_type": "a", "payload": {}, "ordering_key": "k".repeat(257)}),
            StatusCode::BAD_REQUEST,
            "ordering_key",
        ),
        (
            "/events",
            json!({"event_type": "a", "payload": {}, "ordering_key": "a\u{1}b"}),
            StatusCode::BAD_REQUEST,
            "ordering_key",
        ),
    ];
    for (path, body, expected, names) in cases {
        let (status, error) = gateway.post(&world.path(path), body.clone()).await;
        assert_eq!(status, expected, "{path} {body}: {error}");
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(names),
            "{path} {body}: message `{message}` does not name `{names}`"
        );
    }

    let raw = gateway
        .request(Method::POST, &world.path("/events"))
        .header("content-type", "application/json")
        .body("{not json");
    let (status, error) = gateway.call(raw).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["code"], "invalid_json");

    let (status, error) = gateway.get(&world.path("/webhooks?limit=abc")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    let (status, _) = gateway.get(&world.path("/deliveries/dlv_nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = gateway.get(&world.path("/events/msg_nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, error) = gateway
        .get(&world.path("/webhooks/wh_nope/deliveries?status=lost"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
}

#[tokio::test]
async fn payloads_over_the_limit_get_413() {
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_MAX_PAYLOAD_BYTES", "1000")
        .spawn()
        .await;
    let world = crate::World::with(gateway).await;
    let big = "x".repeat(2000);
    let (status, error) = world
        .gateway
        .post(
            &world.path("/events"),
            json!({"event_type": "a", "payload": {"big": big}}),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("payload")
    );
    let huge = "x".repeat(200_000);
    let (status, _) = world
        .gateway
        .post(
            &world.path("/events"),
            json!({"event_type": "a", "payload": huge}),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn a_generated_admin_token_is_printed_once_and_works() {
    let gateway = GatewayBuilder::default()
        .without_env("WASMHOOK_ADMIN_TOKEN")
        .spawn()
        .await;
    let line = gateway
        .banner
        .iter()
        .find(|l| l.contains("admin token"))
        .expect("token printed on first start")
        .clone();
    let token = line.rsplit(' ').next().unwrap().to_owned();
    let (status, _) = gateway
        .call(gateway.request_as(&token, Method::GET, "/v1/apps"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let in_clear = format!("SELECT count(*) FROM settings WHERE value LIKE '%{token}%'");
    assert_eq!(
        gateway.workspace.count(&in_clear).await,
        0,
        "token stored in clear"
    );
    for suffix in ["", "-wal"] {
        let Some(file) = gateway.database_file() else {
            break;
        };
        let stored = std::fs::read(format!("{}{suffix}", file.display())).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&stored).contains(&token),
            "token stored in clear"
        );
    }

    let gateway = gateway.restart().await;
    assert!(
        !gateway.banner.iter().any(|l| l.contains("admin token")),
        "printed again"
    );
    let (status, _) = gateway
        .call(gateway.request_as(&token, Method::GET, "/v1/apps"))
        .await;
    assert_eq!(status, StatusCode::OK);
}

/// `wasmhook migrate` prepares a fresh database (SQLite or PostgreSQL),
/// may run again, never prints a password, and names a bad URL.
#[tokio::test]
async fn migrate_prepares_the_database_and_may_run_again() {
    let workspace = std::sync::Arc::new(wasmhook_tests::Workspace::fresh().await);
    let migrate = |url: &str| {
        std::process::Command::new(wasmhook_tests::gateway_binary())
            .arg("migrate")
            .env_clear()
            .env("WASMHOOK_DATABASE_URL", url)
            .output()
            .expect("run wasmhook migrate")
    };
    let password = reqwest::Url::parse(&workspace.database_url)
        .ok()
        .and_then(|url| url.password().map(str::to_owned));
    for _ in 0..2 {
        let out = migrate(&workspace.database_url);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("migrations applied"), "{stdout}");
        if let Some(password) = &password {
            assert!(
                !stdout.contains(&format!(":{password}@")),
                "password printed: {stdout}"
            );
        }
    }
    let tables = "SELECT count(*) FROM apps";
    assert_eq!(workspace.count(tables).await, 0);

    let gateway = GatewayBuilder::default().spawn_in(workspace).await;
    gateway.create_app("after migrate").await;

    let out = migrate("mysql://root@127.0.0.1/wasmhook");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unsupported database URL `mysql`"),
        "{stderr}"
    );
}

/// An answer given before the request body was read (here a refused
/// upload name, and a wrong token) says `Connection: close`, so the client
/// does not send its next request on a connection the server is closing;
/// an answer after the body was read keeps the connection.
#[tokio::test]
async fn answers_before_the_body_was_read_close_the_connection() {
    let gateway = spawn_app().await;
    let big = vec![0u8; 256 * 1024];
    let refused = gateway
        .request(Method::POST, "/v1/plugins?name=bad%20name&version=1")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(refused.headers()["connection"], "close");
    let unauthorized = gateway
        .request_as("wrong", Method::POST, "/v1/apps")
        .json(&json!({"name": "x".repeat(100_000)}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(unauthorized.headers()["connection"], "close");
    let created = gateway
        .request(Method::POST, "/v1/apps")
        .json(&json!({"name": "read"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    assert!(created.headers().get("connection").is_none());
}
