//! Two tenants on one gateway, for the fairness tests and the bench's
//! neighbour mode: a healthy app's webhook, whose delivery rate is
//! measured, beside another app's noisy one (an endpoint that hangs, one
//! that fails at once, one that answers 429, a plugin that runs into its
//! deadline every time, or an app with 200 slow endpoints), with a
//! backlog queued for the noisy one before each run beside it.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use crate::{GatewayBuilder, Receiver, Reply, TestGateway};

/// Publishers sending a run's events at once.
const PUBLISHERS: usize = 16;
/// How long a run waits for its receipts.
const PATIENCE: Duration = Duration::from_secs(120);

/// The tenant beside the healthy one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Neighbour {
    /// An endpoint that accepts the request and never answers: every
    /// attempt runs into the request timeout.
    Hang,
    /// An endpoint that answers 500 at once.
    Fail,
    /// A plugin that runs into its deadline on every invocation (beside a
    /// pass-through plugin on the healthy webhook).
    Plugin,
    /// An endpoint that answers 429 with `Retry-After: 2` at once.
    Throttle,
    /// An app with many endpoints that each answer after a second: 200
    /// webhooks, every event fanned out to all of them.
    BusyApp,
}

/// Webhooks of the busy app.
const BUSY_APP_WEBHOOKS: usize = 200;

impl Neighbour {
    /// Deliveries queued for the neighbour before each run beside it.
    pub fn backlog(self) -> usize {
        match self {
            Self::Hang | Self::Fail | Self::Throttle => 1_000,
            Self::Plugin => 200,
            Self::BusyApp => 20 * BUSY_APP_WEBHOOKS,
        }
    }

    /// Events that queue the backlog: one per delivery, or for the busy
    /// app one per round of its fan-out.
    fn backlog_events(self) -> usize {
        match self {
            Self::BusyApp => self.backlog() / BUSY_APP_WEBHOOKS,
            _ => self.backlog(),
        }
    }
}

/// A gateway with both tenants set up.
pub struct Tenants {
    pub gateway: TestGateway,
    pub neighbour: Neighbour,
    pub healthy: Receiver,
    pub noisy: Receiver,
    healthy_app: String,
    noisy_app: String,
}

impl Tenants {
    /// Starts a gateway from `builder` with short timeouts (the request
    /// timeout 2 s, plugin deadline 100 ms) and retries an hour apart, so
    /// the neighbour's backlog is only ever its first attempts.
    pub async fn start(builder: GatewayBuilder, neighbour: Neighbour) -> Self {
        let gateway = builder
            .env("WASMHOOK_RETRY_SCHEDULE", "1h")
            .env("WASMHOOK_REQUEST_TIMEOUT", "2s")
            .env("WASMHOOK_PLUGIN_DEADLINE", "100ms")
            .spawn()
            .await;
        let (healthy_app, noisy_app) = (
            gateway.create_app("Healthy").await,
            gateway.create_app("Noisy").await,
        );
        let (healthy, noisy) = (Receiver::start().await, Receiver::start().await);
        let mut healthy_webhook = json!({ "url": healthy.url("/healthy") });
        let mut noisy_webhook = json!({ "url": noisy.url("/noisy") });
        match neighbour {
            Neighbour::Hang => noisy.always(Reply::status(200).delay(Duration::from_secs(3600))),
            Neighbour::Fail => noisy.always(Reply::status(500)),
            Neighbour::Throttle => noisy.always(Reply::status(429).header("retry-after", "2")),
            Neighbour::BusyApp => noisy.always(Reply::status(200).delay(Duration::from_secs(1))),
            Neighbour::Plugin => {
                let passthrough = gateway.plugin("passthrough").await;
                let hostile = gateway.plugin("hostile").await;
                healthy_webhook["plugin"] = json!({ "id": passthrough });
                noisy_webhook["plugin"] = json!({ "id": hostile, "config": { "mode": "loop" } });
                gateway.wait_for_optimised_plugins(PATIENCE).await;
            }
        }
        gateway.create_webhook(&healthy_app, healthy_webhook).await;
        let noisy_webhooks = match neighbour {
            Neighbour::BusyApp => BUSY_APP_WEBHOOKS,
            _ => 1,
        };
        for _ in 0..noisy_webhooks {
            gateway
                .create_webhook(&noisy_app, noisy_webhook.clone())
                .await;
        }
        Self {
            gateway,
            neighbour,
            healthy,
            noisy,
            healthy_app,
            noisy_app,
        }
    }

    /// Deliveries per second to the healthy webhook, from the first
    /// publish of `events` events to the last receipt.
    pub async fn healthy_rate(&self, events: usize) -> f64 {
        let before = self.healthy.count();
        let started = Instant::now();
        self.publish(&self.healthy_app, "healthy.tick", events)
            .await;
        let got = self.healthy.wait_for(before + events, PATIENCE).await;
        let last = got.iter().map(|r| r.at).max().expect("receipts");
        events as f64 / (last - started).as_secs_f64()
    }

    /// Queues the neighbour's backlog and waits until its endpoint has
    /// been reached (a runaway plugin never reaches it).
    pub async fn queue_backlog(&self) {
        let before = self.noisy.count();
        let events = self.neighbour.backlog_events();
        self.publish(&self.noisy_app, "noisy.tick", events).await;
        if self.neighbour != Neighbour::Plugin {
            self.noisy.wait_for(before + 1, PATIENCE).await;
        }
    }

    async fn publish(&self, app: &str, event_type: &str, n: usize) {
        futures::stream::iter(0..n)
            .for_each_concurrent(PUBLISHERS, |i| async move {
                self.gateway
                    .publish(app, event_type, json!({ "n": i }))
                    .await;
            })
            .await;
    }
}

/// One round's two measurements, each on a fresh gateway.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    /// The healthy webhook's rate alone.
    pub alone: f64,
    /// Its rate beside the neighbour's backlog.
    pub beside: f64,
    /// Requests the neighbour's endpoint got during the run beside it.
    pub noisy_requests: usize,
    /// The most of them in flight at once.
    pub noisy_at_once: usize,
}

impl Round {
    /// The rate kept beside the neighbour.
    pub fn ratio(&self) -> f64 {
        self.beside / self.alone
    }
}

/// `rounds` rounds of two measurements, each on a fresh gateway from
/// `builder` with the same warm-up: the healthy webhook's rate alone, and
/// beside the neighbour with its backlog queued. Their order alternates
/// between rounds, and each ratio compares two neighbouring measurements,
/// so a drift of a shared machine favours neither.
pub async fn rounds(
    builder: impl Fn() -> GatewayBuilder,
    neighbour: Neighbour,
    events: usize,
    rounds: usize,
) -> Vec<Round> {
    let mut measured = Vec::new();
    for round in 1..=rounds.max(1) {
        let (alone, beside) = if round % 2 == 1 {
            let alone = measure(builder(), neighbour, events, false).await;
            (alone, measure(builder(), neighbour, events, true).await)
        } else {
            let beside = measure(builder(), neighbour, events, true).await;
            (measure(builder(), neighbour, events, false).await, beside)
        };
        let round = Round {
            alone: alone.rate,
            beside: beside.rate,
            noisy_requests: beside.noisy_requests,
            noisy_at_once: beside.noisy_at_once,
        };
        println!(
            "round {}: alone {:>7.0}/s, beside {:>7.0}/s, ratio {:.2} \
             (the neighbour got {} requests, at most {} at once)",
            measured.len() + 1,
            round.alone,
            round.beside,
            round.ratio(),
            round.noisy_requests,
            round.noisy_at_once,
        );
        measured.push(round);
    }
    measured
}

struct Measurement {
    rate: f64,
    noisy_requests: usize,
    noisy_at_once: usize,
}

/// One measurement on a fresh gateway: two warm-up runs (connections,
/// caches, the lane's streak), then, `beside` the neighbour, its backlog
/// queued, and the measured run.
async fn measure(
    builder: GatewayBuilder,
    neighbour: Neighbour,
    events: usize,
    beside: bool,
) -> Measurement {
    let tenants = Tenants::start(builder, neighbour).await;
    for _ in 0..2 {
        tenants.healthy_rate(events).await;
    }
    if beside {
        tenants.queue_backlog().await;
    }
    let rate = tenants.healthy_rate(events).await;
    Measurement {
        rate,
        noisy_requests: tenants.noisy.count(),
        noisy_at_once: tenants.noisy.most_at_once(),
    }
}

/// The middle of `rates` (the upper one of an even count).
pub fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}
