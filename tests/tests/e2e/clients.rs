//! Hostile and slow clients: thousands of connections that send half a
//! request head and then nothing, or nothing at all, neither slow the API
//! down nor stay open, and past the connection cap a new connection is
//! answered 503 at once.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wasmhook_tests::{GatewayBuilder, TestGateway};

fn address(gateway: &TestGateway) -> String {
    gateway
        .base_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// The median time of `n` `GET /healthz`, each a new connection.
async fn health_median(gateway: &TestGateway, n: usize) -> Duration {
    let mut times = Vec::new();
    for _ in 0..n {
        let client = reqwest::Client::new();
        let started = Instant::now();
        let response = client
            .get(format!("{}/healthz", gateway.base_url))
            .send()
            .await
            .expect("healthz answers");
        assert_eq!(response.status(), StatusCode::OK);
        times.push(started.elapsed());
    }
    times.sort();
    times[n / 2]
}

/// Whether the server closed `socket` (end of file or a reset).
async fn closed_by_server(socket: &mut TcpStream) -> bool {
    let mut buffer = [0u8; 1024];
    loop {
        match socket.read(&mut buffer).await {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue,
        }
    }
}

#[tokio::test]
async fn half_sent_requests_neither_slow_the_api_nor_stay_open() {
    const SOCKETS: usize = 3_000;
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_HEADER_READ_TIMEOUT", "3s")
        .spawn()
        .await;
    let before = health_median(&gateway, 21).await;
    let address = address(&gateway);
    let mut sockets = Vec::with_capacity(SOCKETS);
    for n in 0..SOCKETS {
        let mut socket = TcpStream::connect(&address).await.expect("connect");
        if n % 2 == 0 {
            // Half a head; the other half send nothing at all.
            socket
                .write_all(b"POST /v1/apps HTTP/1.1\r\nHost: x\r\nContent-")
                .await
                .expect("write");
        }
        sockets.push(socket);
    }
    let during = health_median(&gateway, 21).await;
    assert!(
        during < before.max(Duration::from_millis(5)) * 20,
        "healthz took {during:?} beside {SOCKETS} idle connections, {before:?} before"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    for socket in &mut sockets {
        let left = deadline.saturating_duration_since(Instant::now());
        let closed = tokio::time::timeout(left, closed_by_server(socket)).await;
        assert!(
            closed.is_ok(),
            "a connection that sent no whole head stayed open"
        );
    }
}

#[tokio::test]
async fn past_the_connection_cap_a_new_connection_gets_503() {
    const CAP: usize = 50;
    let gateway = GatewayBuilder::default()
        .env("WASMHOOK_MAX_CONNECTIONS", &CAP.to_string())
        .spawn()
        .await;
    let address = address(&gateway);
    let mut idle = Vec::new();
    for _ in 0..CAP {
        idle.push(TcpStream::connect(&address).await.expect("connect"));
    }
    // Let the server take them all before the next one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = reqwest::get(format!("{}/healthz", gateway.base_url))
        .await
        .expect("an answer, not a hang");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "too_many_connections");

    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = reqwest::get(format!("{}/healthz", gateway.base_url)).await;
        if response.is_ok_and(|r| r.status() == StatusCode::OK) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "closed connections gave their room back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
