//! Several gateway processes on one PostgreSQL queue: an API-only process
//! and two worker-only processes deliver every event to every webhook, none
//! twice; a worker killed mid-run loses nothing, and only deliveries that
//! were in flight in it when it died (or whose attempt failed, so were
//! retried) may arrive twice; two workers keep a webhook's in-flight limit
//! together.
//!
//! Ignored in the SQLite run; `scripts/test` runs them against PostgreSQL.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::json;
use wasmhook_tests::{GatewayBuilder, Reply, TestGateway};

use crate::World;

const EVENTS: usize = 5_000;
const WEBHOOKS: usize = 5;
const PUBLISHERS: usize = 16;
const PATIENCE: Duration = Duration::from_secs(240);

/// One API process (the world's gateway) and two worker processes.
struct Cluster {
    world: World,
    workers: Vec<TestGateway>,
    /// Receiver path → webhook id.
    webhooks: BTreeMap<String, String>,
}

impl Cluster {
    /// Webhook id → receiver path.
    fn path_of(&self) -> BTreeMap<&String, &String> {
        self.webhooks.iter().map(|(path, id)| (id, path)).collect()
    }

    async fn start() -> Self {
        crate::require_postgres();
        // The lease is long enough that only a dead worker's claims are
        // taken over, even on a loaded machine: a live worker's claim that
        // outlasted it would be sent twice, and the test would blame the
        // gateway for the machine's load.
        let builder = GatewayBuilder::default()
            .env("WASMHOOK_LEASE", "30s")
            .env("WASMHOOK_REQUEST_TIMEOUT", "2s")
            .env("WASMHOOK_LOG", "info");
        let api = builder.env("WASMHOOK_ROLE", "api").spawn().await;
        let world = World::with(api).await;
        let mut webhooks = BTreeMap::new();
        for n in 0..WEBHOOKS {
            let path = format!("/w{n}");
            let (id, _) = world.webhook(&path, json!({})).await;
            webhooks.insert(path, id);
        }
        // A little latency, so deliveries are in flight at any moment.
        world
            .receiver
            .always(Reply::status(200).delay(Duration::from_millis(5)));
        let workers = world.workers(2).await;
        Self {
            world,
            workers,
            webhooks,
        }
    }

    /// Publishes `EVENTS` events through the API process in the
    /// background; the task returns their ids.
    fn start_publishing(&self) -> tokio::task::JoinHandle<BTreeSet<String>> {
        let gateway = &self.world.gateway;
        let url = format!("{}{}", gateway.base_url, self.world.path("/events"));
        let mut publishers = Vec::new();
        for p in 0..PUBLISHERS {
            let (client, url, token) = (gateway.client.clone(), url.clone(), gateway.token.clone());
            publishers.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in (p..EVENTS).step_by(PUBLISHERS) {
                    // An id of the publisher's own makes a retry after a
                    // 503 (a busy database) safe, as for any client.
                    let body = json!({"event_type": "order.created", "payload": {"n": n}, "id": format!("order-{n}")});
                    let mut tries = 0;
                    let response = loop {
                        let response = client
                            .post(&url)
                            .bearer_auth(&token)
                            .json(&body)
                            .send()
                            .await
                            .expect("the API process answers");
                        tries += 1;
                        if response.status() != StatusCode::SERVICE_UNAVAILABLE || tries == 10 {
                            break response;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    };
                    assert_eq!(response.status(), StatusCode::ACCEPTED);
                    let accepted: serde_json::Value = response.json().await.expect("JSON");
                    ids.push(accepted["id"].as_str().expect("event id").to_owned());
                }
                ids
            }));
        }
        tokio::spawn(async move {
            let mut ids = BTreeSet::new();
            for publisher in publishers {
                ids.extend(publisher.await.expect("publisher"));
            }
            assert_eq!(ids.len(), EVENTS);
            ids
        })
    }

    /// How often each (event, receiver path) pair has arrived so far.
    fn seen(&self) -> BTreeMap<(String, String), usize> {
        let mut seen = BTreeMap::new();
        for request in &self.world.receiver.received() {
            let id = request.header("webhook-id").expect("webhook-id").to_owned();
            *seen.entry((id, request.path.clone())).or_default() += 1;
        }
        seen
    }

    /// Waits until no delivery is left unfinished, and every one succeeded.
    async fn wait_until_all_succeeded(&self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let left: Vec<(i64,)> = query_pairs(
                self,
                "SELECT count(*) FROM deliveries WHERE status <> 'succeeded'",
            )
            .await;
            if left[0].0 == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} deliveries never succeeded",
                left[0].0
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for every (event, webhook) pair (repeats do not count),
    /// checking every signature; returns how often each pair arrived.
    async fn wait_for_all(&self, events: &BTreeSet<String>) -> BTreeMap<(String, String), usize> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let seen = self.seen();
            let missing = events
                .iter()
                .flat_map(|event| {
                    self.webhooks
                        .keys()
                        .map(move |path| (event.clone(), path.clone()))
                })
                .find(|pair| !seen.contains_key(pair));
            let Some(missing) = missing else {
                self.world.wait_for(seen.values().sum(), PATIENCE).await;
                return seen;
            };
            assert!(
                tokio::time::Instant::now() < deadline,
                "{missing:?} never arrived ({} of {} pairs did)",
                seen.len(),
                EVENTS * WEBHOOKS
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn twice(seen: &BTreeMap<(String, String), usize>) -> Vec<(String, String)> {
    seen.iter()
        .filter(|(_, n)| **n > 1)
        .map(|(pair, _)| pair.clone())
        .collect()
}

#[tokio::test]
#[ignore = "needs PostgreSQL; scripts/test runs it"]
async fn two_workers_deliver_everything_once() {
    let cluster = Cluster::start().await;
    let events = cluster.start_publishing().await.expect("publishing");
    cluster.wait_for_all(&events).await;
    // Every delivery finished, and nothing late either.
    cluster.wait_until_all_succeeded().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = cluster.seen();
    // A request the gateway gave up on (a timeout on a loaded machine)
    // may have reached the receiver all the same, and was sent again.
    let failed = failed_attempt_pairs(&cluster).await;
    for pair in twice(&seen) {
        let allowed = 1 + failed.get(&pair).unwrap_or(&0);
        assert!(
            seen[&pair] <= allowed,
            "{pair:?} sent {} times, with {} failed attempts",
            seen[&pair],
            allowed - 1
        );
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL; scripts/test runs it"]
async fn a_killed_worker_loses_nothing_and_repeats_only_its_in_flight() {
    let mut cluster = Cluster::start().await;
    let publishing = cluster.start_publishing();
    // Kill one worker in the middle of the run.
    let receiver = &cluster.world.receiver;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while receiver.count() < EVENTS * WEBHOOKS / 4 {
        assert!(tokio::time::Instant::now() < deadline, "deliveries stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed = cluster.workers[0].pid();
    cluster.workers[0].kill().await;
    // What the killed process had claimed and not recorded: its claims
    // (tokens name the process) stay `sending` until their lease ends,
    // well after this snapshot.
    let in_flight = in_flight_pairs(&cluster, killed).await;
    assert!(!in_flight.is_empty(), "nothing was in flight at the kill");
    assert!(
        receiver.count() < EVENTS * WEBHOOKS,
        "the run ended before the kill"
    );

    let events = publishing.await.expect("publishing");
    let seen = cluster.wait_for_all(&events).await;
    let repeated = twice(&seen);
    // An attempt the gateway gave up on (a timeout on a loaded machine)
    // may have reached the receiver all the same; its retry is the
    // at-least-once promise, not a lost claim.
    let failed = failed_attempt_pairs(&cluster).await;
    for pair in &repeated {
        assert!(
            in_flight.contains(pair) || failed.contains_key(pair),
            "{pair:?} arrived twice but was not in flight in the killed worker, \
             nor had a failed attempt"
        );
        let allowed = 1 + usize::from(in_flight.contains(pair)) + failed.get(pair).unwrap_or(&0);
        assert!(
            seen[pair] <= allowed,
            "{pair:?} arrived {} times, more than its {allowed} attempts",
            seen[pair]
        );
    }
    println!(
        "killed a worker with {} deliveries in flight; {} arrived twice; {} had failed attempts",
        in_flight.len(),
        repeated.len(),
        failed.len()
    );
}

/// (event id, receiver path) of every delivery the process `pid` claimed
/// and has not recorded.
async fn in_flight_pairs(cluster: &Cluster, pid: u32) -> BTreeSet<(String, String)> {
    let rows: Vec<(String, String)> = query_pairs(
        cluster,
        &format!(
            "SELECT event_id, webhook_id FROM deliveries \
             WHERE status = 'sending' AND claim_token LIKE 'clm\\_{pid}\\_%'"
        ),
    )
    .await;
    let path_of = cluster.path_of();
    rows.into_iter()
        .map(|(event, webhook)| (event, path_of[&webhook].clone()))
        .collect()
}

async fn query_pairs<T>(cluster: &Cluster, sql: &str) -> Vec<T>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    use sqlx::Connection;
    let url = &cluster.world.gateway.workspace.database_url;
    let mut db = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query_as(sql)
        .fetch_all(&mut db)
        .await
        .expect("query deliveries")
}

/// The (event, receiver path) pairs with failed attempts, and how many.
async fn failed_attempt_pairs(cluster: &Cluster) -> BTreeMap<(String, String), usize> {
    let rows: Vec<(String, String, i64)> = query_pairs(
        cluster,
        "SELECT d.event_id, d.webhook_id, count(*) FROM attempts a \
         JOIN deliveries d ON d.id = a.delivery_id \
         WHERE a.outcome <> 'success' GROUP BY d.event_id, d.webhook_id",
    )
    .await;
    let path_of = cluster.path_of();
    rows.into_iter()
        .map(|(event, webhook, n)| ((event, path_of[&webhook].clone()), n as usize))
        .collect()
}

#[tokio::test]
#[ignore = "needs PostgreSQL; scripts/test runs it"]
async fn two_workers_keep_a_webhooks_in_flight_limit_together() {
    const LIMIT: usize = 3;
    const EVENTS: usize = 200;
    crate::require_postgres();
    let builder = GatewayBuilder::default().env("WASMHOOK_LOG", "info");
    let api = builder.env("WASMHOOK_ROLE", "api").spawn().await;
    let world = World::with(api).await;
    // Slow enough that both workers always have claims waiting.
    world
        .receiver
        .always(Reply::status(200).delay(Duration::from_millis(20)));
    world
        .webhook("/limited", json!({"max_in_flight": LIMIT}))
        .await;
    // The backlog is queued before the workers start, so the limit is
    // what holds them back, not how fast the test publishes.
    futures::stream::iter(0..EVENTS)
        .for_each_concurrent(PUBLISHERS, |n| {
            let world = &world;
            async move {
                world.publish("limited.tick", json!({ "n": n })).await;
            }
        })
        .await;
    let _workers = world.workers(2).await;
    world.wait_for(EVENTS, PATIENCE).await;
    let most = world.receiver.most_at_once();
    assert!(
        most <= LIMIT,
        "{most} requests at once against a limit of {LIMIT}"
    );
    assert_eq!(
        most, LIMIT,
        "the limit was never reached: the test proves nothing"
    );
}
