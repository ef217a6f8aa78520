//! Faults of the database: while it cannot be reached, the API answers
//! 503 with `Retry-After` in about a second, never a 500 and never after
//! a long wait; when it comes back, API and worker processes resume by
//! themselves, and every event that was accepted is delivered.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::json;
use wasmhook_tests::{GatewayBuilder, TcpProxy, TestGateway, Workspace};

use crate::{PATIENCE, World, require_postgres};

/// What the publisher heard: each answer's status, the `n` of every
/// accepted event, and the slowest 503.
#[derive(Default)]
struct Heard {
    statuses: BTreeSet<u16>,
    accepted: BTreeSet<u64>,
    slowest_unavailable: Duration,
    unavailable: usize,
    last_unavailable: u64,
    without_retry_after: usize,
}

impl Heard {
    fn hear(&mut self, n: u64, response: &reqwest::Response, took: Duration) {
        self.statuses.insert(response.status().as_u16());
        match response.status() {
            StatusCode::ACCEPTED => {
                self.accepted.insert(n);
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                self.unavailable += 1;
                self.last_unavailable = n;
                self.slowest_unavailable = self.slowest_unavailable.max(took);
                if response.headers().get("retry-after").is_none() {
                    self.without_retry_after += 1;
                }
            }
            _ => {}
        }
    }
}

impl Heard {
    /// Waits until every accepted event reached the world's receiver; a
    /// lost one fails the test once [`PATIENCE`] has passed.
    async fn wait_until_delivered(&self, world: &World) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let delivered: BTreeSet<u64> = world
                .receiver
                .received()
                .iter()
                .filter_map(|r| r.json()["data"]["n"].as_u64())
                .collect();
            let lost: Vec<&u64> = self.accepted.difference(&delivered).collect();
            if lost.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "accepted but never delivered: {lost:?} ({} accepted, {} answered 503)",
                self.accepted.len(),
                self.unavailable
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Publishes events `n = 0, 1, …` one after another until `stop`.
async fn publish_until(gateway: &TestGateway, app: &str, heard: &Mutex<Heard>, stop: &AtomicStop) {
    let mut n = 0u64;
    while !stop.is_set() {
        let request = gateway
            .request(Method::POST, &format!("/v1/apps/{app}/events"))
            .json(&json!({ "event_type": "order.paid", "payload": { "n": n } }));
        let started = Instant::now();
        let response = request.send().await.expect("the API answers");
        let took = started.elapsed();
        heard.lock().unwrap().hear(n, &response, took);
        n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Default)]
struct AtomicStop(std::sync::atomic::AtomicBool);

impl AtomicStop {
    fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL; scripts/test runs it"]
async fn postgres_gone_mid_run_gets_503_and_loses_no_accepted_event() {
    require_postgres();
    let workspace = Arc::new(Workspace::fresh().await);
    let (proxy, url) = TcpProxy::for_postgres(&workspace.database_url).await;
    let api = GatewayBuilder::default()
        .env("WASMHOOK_ROLE", "api")
        .env("WASMHOOK_DATABASE_URL", &url)
        .spawn_in(workspace)
        .await;
    let world = Arc::new(World::with(api).await);
    world.webhook("/in", json!({})).await;
    let _worker = world.workers(1).await;

    let heard = Arc::new(Mutex::new(Heard::default()));
    let stop = Arc::new(AtomicStop::default());
    let publisher = {
        let (world, heard, stop) = (world.clone(), heard.clone(), stop.clone());
        tokio::spawn(async move { publish_until(&world.gateway, &world.app, &heard, &stop).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ready, _) = world.gateway.get("/readyz").await;
    assert_eq!(ready, StatusCode::SERVICE_UNAVAILABLE, "readyz while cut");
    proxy.restore();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.set();
    publisher.await.unwrap();

    let heard = std::mem::take(&mut *heard.lock().unwrap());
    assert_eq!(
        heard.statuses,
        BTreeSet::from([202, 503]),
        "only 202 and 503 answers"
    );
    assert_eq!(heard.without_retry_after, 0, "every 503 says Retry-After");
    assert!(
        heard.slowest_unavailable < Duration::from_secs(5),
        "a 503 took {:?}: callers must not wait for the database",
        heard.slowest_unavailable
    );
    assert!(
        heard.accepted.iter().any(|&n| n > heard.last_unavailable),
        "publishes are accepted again after the database came back"
    );
    heard.wait_until_delivered(&world).await;
}

/// The SQLite file holds signing secrets: it and its WAL are created
/// readable by the gateway's user only.
#[tokio::test]
async fn the_database_file_is_private() {
    let world = World::new().await;
    let Some(file) = world.gateway.database_file() else {
        return; // PostgreSQL: the server keeps its files.
    };
    world.webhook("/in", json!({})).await;
    world.publish("order.paid", json!({})).await;
    use std::os::unix::fs::PermissionsExt;
    for path in [file.clone(), file.with_extension("db-wal")] {
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    }
}

/// A full disk (here: a file size limit the gateway's writes hit, as they
/// would hit a full disk) gets 503 with `Retry-After`, never a 500; what
/// was accepted before is delivered once there is room again.
#[tokio::test]
async fn a_full_disk_gets_503_and_loses_no_accepted_event() {
    const LIMIT: u64 = 8 << 20;
    let gateway = GatewayBuilder::default()
        .file_size_limit(Some(LIMIT))
        .spawn()
        .await;
    if gateway.database_file().is_none() {
        return; // PostgreSQL: its own disk, another test cuts it off.
    }
    let world = World::with(gateway).await;
    world.webhook("/in", json!({})).await;
    let filler = "x".repeat(4096);
    let mut heard = Heard::default();
    for n in 0..4 * (LIMIT / 4096) {
        let (status, _) = world
            .gateway
            .post(
                &world.path("/events"),
                json!({ "event_type": "order.paid", "payload": { "n": n, "filler": filler } }),
            )
            .await;
        heard.statuses.insert(status.as_u16());
        match status {
            StatusCode::ACCEPTED => {
                heard.accepted.insert(n);
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                heard.unavailable += 1;
                if heard.unavailable == 20 {
                    break;
                }
            }
            _ => {}
        }
    }
    assert_eq!(
        heard.statuses,
        BTreeSet::from([202, 503]),
        "only 202 and 503 answers; log:\n{}",
        world.gateway.log()
    );

    let world = World {
        gateway: world
            .gateway
            .with_settings(|b| b.file_size_limit(None))
            .await,
        ..world
    };
    heard.wait_until_delivered(&world).await;
}
