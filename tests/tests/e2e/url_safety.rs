//! URL safety: unsafe targets are refused at registration with a clear 400,
//! and checked again at send time.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use wasmhook_tests::{GatewayBuilder, Receiver};

use crate::PATIENCE;

fn strict() -> GatewayBuilder {
    GatewayBuilder::default()
        .without_env("WASMHOOK_ALLOWED_CIDRS")
        .env("WASMHOOK_ALLOW_HTTP", "false")
}

#[tokio::test]
async fn unsafe_urls_are_rejected_with_a_clear_400() {
    let gateway = strict().spawn().await;
    let app = gateway.create_app("Acme").await;
    let unsafe_urls = [
        ("http://example.com/hook", "scheme"),
        ("ftp://example.com/hook", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("javascript:alert(1)", "scheme"),
        ("https://user:pass@example.com/", "password"),
        ("https://user@93.184.216.34/", "username"),
        ("https://127.0.0.1/", "loopback"),
        ("https://127.1/", "loopback"),
        ("https://2130706433/", "loopback"),
        ("https://0x7f.0.0.1/", "loopback"),
        ("https://0177.0.0.1/", "loopback"),
        ("https://[::1]/", "loopback"),
        ("https://[::ffff:127.0.0.1]/", "loopback"),
        ("https://[::ffff:7f00:1]/", "loopback"),
        ("https://localhost/", "local name"),
        ("https://api.localhost/", "local name"),
        (
            "https://metadata.google.internal/computeMetadata/v1/",
            "local name",
        ),
        ("https://10.0.0.1/", "private"),
        ("https://172.16.5.4/", "private"),
        ("https://192.168.1.1/", "private"),
        ("https://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://[64:ff9b::a9fe:a9fe]/", "link-local"),
        ("https://100.64.0.1/", "carrier-grade NAT"),
        ("https://[fd00:ec2::254]/", "unique-local"),
        ("https://[fe80::1]/", "link-local"),
        ("https://224.0.0.1/", "multicast"),
        ("https://[ff02::1]/", "multicast"),
        ("https://0.0.0.0/", "unspecified"),
        ("https://[::]/", "unspecified"),
        ("https://255.255.255.255/", "broadcast"),
        ("https://192.0.2.10/", "documentation"),
        ("https://[2001:db8::1]/", "documentation"),
        ("not a url", "not a valid URL"),
        ("https://:443/hook", "not a valid URL"),
        ("https://intranet/hook", "local name"),
    ];
    assert!(unsafe_urls.len() >= 20);
    for (url, reason) in unsafe_urls {
        let (status, body) = gateway
            .post(&format!("/v1/apps/{app}/webhooks"), json!({"url": url}))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url} accepted: {body}");
        assert_eq!(body["error"]["field"], "url", "{url}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(reason),
            "{url}: `{message}` does not say `{reason}`"
        );
    }
    let (status, body) = gateway.get(&format!("/v1/apps/{app}/webhooks")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"], json!([]));

    // A public address passes, and a PATCH to an unsafe one is refused.
    let created = gateway
        .create_webhook(
            &app,
            json!({"url": "https://93.184.216.34/hook", "enabled": false}),
        )
        .await;
    let path = format!(
        "/v1/apps/{app}/webhooks/{}",
        created["id"].as_str().unwrap()
    );
    let (status, _) = gateway
        .patch(&path, json!({"url": "https://[::1]:8443/"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, shown) = gateway.get(&path).await;
    assert_eq!(shown["url"], "https://93.184.216.34/hook");
}

/// A target allowed when registered is checked again at send time: once
/// the operator removes the exemption, nothing is sent to it.
#[tokio::test]
async fn targets_are_checked_again_at_send_time() {
    let gateway = GatewayBuilder::default().spawn().await;
    let app = gateway.create_app("Acme").await;
    let receiver = Receiver::start().await;
    gateway
        .create_webhook(&app, json!({"url": receiver.url("/h")}))
        .await;
    let database = gateway.workspace.database_url.clone();
    let mut gateway = gateway;
    assert!(gateway.terminate().await.success());

    let strict_again = gateway
        .with_settings(|b| b.without_env("WASMHOOK_ALLOWED_CIDRS"))
        .await;
    assert_eq!(strict_again.workspace.database_url, database);
    let accepted = strict_again.publish(&app, "a.b", json!({})).await;
    let path = format!(
        "/v1/apps/{app}/deliveries/{}",
        accepted["deliveries"][0]["id"].as_str().unwrap()
    );
    let d = strict_again
        .poll(&path, PATIENCE, |d| d["attempt_count"].as_i64() >= Some(1))
        .await;
    assert_eq!(d["attempts"][0]["outcome"], "unsafe_target", "{d}");
    assert!(
        d["last_error"].as_str().unwrap().contains("loopback"),
        "{d}"
    );
    receiver.expect_no_more(0, Duration::from_millis(200)).await;
}
