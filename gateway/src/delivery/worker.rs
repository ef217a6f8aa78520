//! The delivery worker: claims due deliveries in batches, runs the plugins
//! of a batch back to back, sends each delivery on its own task (at most
//! `concurrency` at once), and hands results to a recorder task that writes
//! them back in batches, one transaction per batch.
//!
//! On shutdown it stops claiming, lets in-flight attempts finish within the
//! grace period, and gives whatever is still unfinished back to the queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::message;
use super::retry::RetryPolicy;
use super::sender::{SendResult, Sender};
use crate::plugin::{Decision, Delivered, Invocation, Plugins};
use crate::store::{AttemptRecord, ClaimedDelivery, Millis, NextState, Store, now_ms};
use crate::telemetry;
use crate::url_safety::UrlPolicy;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub concurrency: usize,
    /// Most deliveries claimed, or results recorded, per transaction.
    pub batch_size: usize,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub shutdown_grace: Duration,
}

/// Claimed deliveries not yet recorded: (delivery id → claim token).
type InFlight = Arc<Mutex<HashMap<String, String>>>;

/// A delivery worker, built from its parts by the server.
pub struct Worker {
    pub store: Store,
    pub sender: Sender,
    pub policy: UrlPolicy,
    pub retry: RetryPolicy,
    pub config: WorkerConfig,
    /// Notified when deliveries become due in this process.
    pub wake: Arc<Notify>,
    pub plugins: Plugins,
}

impl Worker {
    /// Runs until `shutdown` is cancelled, then drains as described above.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let (results, recorder_rx) = mpsc::channel(this.config.concurrency * 2);
        let recorder = tokio::spawn(record_loop(
            this.store.clone(),
            recorder_rx,
            this.config.batch_size,
        ));
        let slots = Arc::new(Semaphore::new(this.config.concurrency));
        let in_flight: InFlight = Arc::default();
        let mut tasks = JoinSet::new();

        while !shutdown.is_cancelled() {
            while tasks.try_join_next().is_some() {}
            let free = slots.available_permits().min(this.config.batch_size);
            if free == 0 {
                tokio::select! {
                    _ = tasks.join_next() => {}
                    _ = shutdown.cancelled() => {}
                }
                continue;
            }
            let claimed = match this.store.claim_due(free as u32, this.config.lease).await {
                Ok(claimed) => claimed,
                Err(error) => {
                    tracing::error!(%error, "claiming deliveries failed");
                    Vec::new()
                }
            };
            if claimed.is_empty() {
                tokio::select! {
                    _ = this.wake.notified() => {}
                    _ = tokio::time::sleep(this.config.poll_interval) => {}
                    _ = shutdown.cancelled() => {}
                }
                continue;
            }
            let mut to_transform = Vec::new();
            for delivery in claimed {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    // Cannot happen: we claimed no more than the free slots.
                    break;
                };
                in_flight
                    .lock()
                    .expect("in-flight map poisoned")
                    .insert(delivery.id.clone(), delivery.claim_token.clone());
                let claim = Claim {
                    span: attempt_span(&delivery),
                    delivery,
                    permit,
                };
                if claim.delivery.plugin.is_some() && claim.delivery.enabled {
                    to_transform.push(claim);
                } else {
                    let finish =
                        claim.finish(this.clone(), None, results.clone(), in_flight.clone());
                    tasks.spawn(finish);
                }
            }
            if !to_transform.is_empty() {
                let batch = transform_batch(
                    this.clone(),
                    to_transform,
                    results.clone(),
                    in_flight.clone(),
                );
                tasks.spawn(batch);
            }
        }
        self_drain(this, tasks, results, recorder, in_flight).await;
    }

    /// One attempt of one delivery, logged and counted. `invocation` is
    /// its plugin's run, already made, if the webhook has a plugin.
    async fn attempt(
        &self,
        delivery: &ClaimedDelivery,
        invocation: Option<Invocation>,
    ) -> AttemptRecord {
        let record = self.decide(delivery, invocation).await;
        log_outcome(&record);
        telemetry::attempt_recorded(&record);
        record
    }

    /// One attempt of one delivery, start to decision.
    async fn decide(
        &self,
        delivery: &ClaimedDelivery,
        invocation: Option<Invocation>,
    ) -> AttemptRecord {
        let now = now_ms();
        if !delivery.enabled {
            return self.retry.abandon(delivery, now);
        }
        let transformed = match self.transformed(delivery, now, invocation) {
            Ok(transformed) => transformed,
            Err(ended) => return *ended,
        };
        let result = match message::build(delivery, &self.policy, now_ms(), transformed) {
            Ok(request) => self.sender.send(request).await,
            Err(error) => SendResult::refused(error),
        };
        self.retry.decide(delivery, result, now_ms())
    }

    /// What the webhook's plugin, if any, decided: the request it made, or
    /// the record that ends this attempt (a skip, or a plugin failure).
    fn transformed(
        &self,
        delivery: &ClaimedDelivery,
        now: Millis,
        invocation: Option<Invocation>,
    ) -> Result<Option<Delivered>, Box<AttemptRecord>> {
        let Some(invocation) = invocation else {
            return Ok(None);
        };
        telemetry::plugin_ran(invocation.duration);
        // Plugin log lines are the plugin author's; they may quote the
        // payload, so they stay at debug level (and in the playground).
        for line in &invocation.logs {
            tracing::debug!(level = line.level, "plugin: {}", line.message);
        }
        match invocation.result {
            Ok(Decision::Deliver(delivered)) => Ok(Some(delivered)),
            Ok(Decision::Skip(reason)) => {
                let duration_ms = invocation.duration.as_millis() as i64;
                Err(Box::new(self.retry.skip(
                    delivery,
                    reason,
                    now,
                    duration_ms,
                )))
            }
            Err(error) => {
                let failed = SendResult::plugin_failed(&error, now, invocation.duration);
                Err(Box::new(self.retry.decide(delivery, failed, now_ms())))
            }
        }
    }
}

/// A claimed delivery on its way: the worker slot it holds and the span
/// its log lines carry.
struct Claim {
    delivery: ClaimedDelivery,
    permit: OwnedSemaphorePermit,
    span: tracing::Span,
}

impl Claim {
    /// Sends (unless the plugin's run ended the attempt) and hands the
    /// result to the recorder.
    async fn finish(
        self,
        worker: Arc<Worker>,
        invocation: Option<Invocation>,
        results: mpsc::Sender<AttemptRecord>,
        in_flight: InFlight,
    ) {
        let Claim {
            delivery,
            permit,
            span,
        } = self;
        let record = worker.attempt(&delivery, invocation).instrument(span).await;
        // Recorded by the recorder from here on, so no longer ours to
        // release.
        if results.send(record).await.is_ok() {
            in_flight
                .lock()
                .expect("in-flight map poisoned")
                .remove(&delivery.id);
        }
        drop(permit);
    }
}

/// Runs the plugins of one claimed batch back to back on one task, each
/// delivery going on to its own task as soon as its plugin has run.
/// Fresh instances one after another find wasmtime's structures still in
/// the CPU caches: interleaved with HTTP and database work, an invocation
/// cost about twice as much. A plugin that waits (a slow one yields at
/// every epoch tick) does not hold up the others: up to the worker's
/// concurrency run at once, and the plugin host's own limit applies.
async fn transform_batch(
    worker: Arc<Worker>,
    batch: Vec<Claim>,
    results: mpsc::Sender<AttemptRecord>,
    in_flight: InFlight,
) {
    let mut sends = JoinSet::new();
    let lanes = worker.config.concurrency.max(1);
    let mut transformed = futures::stream::iter(batch)
        .map(|claim| {
            let worker = worker.clone();
            async move {
                let run = worker.plugins.transform(&claim.delivery);
                let invocation = run.instrument(claim.span.clone()).await;
                (claim, invocation)
            }
        })
        .buffer_unordered(lanes);
    while let Some((claim, invocation)) = transformed.next().await {
        let finish = claim.finish(
            worker.clone(),
            invocation,
            results.clone(),
            in_flight.clone(),
        );
        sends.spawn(finish);
    }
    while sends.join_next().await.is_some() {}
}

/// The span every log line of one attempt carries: ids, never content.
fn attempt_span(delivery: &ClaimedDelivery) -> tracing::Span {
    tracing::info_span!(
        "attempt",
        delivery = %delivery.id,
        event = %delivery.event_id,
        webhook = %delivery.webhook_id,
        attempt = delivery.attempts + 1,
    )
}

/// A success is routine (debug); a failure is worth an operator's eye
/// (info while retries remain, warn when the delivery is dead).
fn log_outcome(record: &AttemptRecord) {
    let Some(attempt) = &record.attempt else {
        tracing::info!("webhook is disabled; the delivery ends without an attempt");
        return;
    };
    let (outcome, status, ms) = (attempt.outcome, attempt.status_code, attempt.duration_ms);
    match &record.next {
        NextState::Succeeded => tracing::debug!(outcome, status, ms, "delivered"),
        NextState::Skipped { .. } => tracing::debug!(outcome, ms, "skipped by the plugin"),
        NextState::Retry { due_at, .. } => {
            tracing::info!(
                outcome,
                status,
                ms,
                retry_at = due_at,
                "attempt failed; will retry"
            )
        }
        NextState::Dead { .. } => {
            tracing::warn!(
                outcome,
                status,
                ms,
                "attempt failed; no attempts left, delivery is dead"
            )
        }
    }
}

/// Shutdown: wait for in-flight attempts up to the grace period, record
/// what finished, and release the rest so another process (or this one,
/// after restart) sends them at once instead of after the lease.
async fn self_drain(
    this: Arc<Worker>,
    mut tasks: JoinSet<()>,
    results: mpsc::Sender<AttemptRecord>,
    recorder: tokio::task::JoinHandle<()>,
    in_flight: InFlight,
) {
    let grace = this.config.shutdown_grace;
    let finished =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tracing::warn!(
            ?grace,
            "in-flight deliveries did not finish in time; releasing them"
        );
        tasks.shutdown().await;
    }
    drop(results);
    let _ = recorder.await;
    let unfinished: Vec<(String, String)> = in_flight
        .lock()
        .expect("in-flight map poisoned")
        .drain()
        .collect();
    if !unfinished.is_empty()
        && let Err(error) = this.store.release(unfinished).await
    {
        tracing::error!(%error, "releasing deliveries failed; they return when their lease ends");
    }
}

/// Writes results in batches. A failed write is retried a few times: the
/// results are the only record of attempts that already happened. If the
/// database stays away, the deliveries stay claimed and are sent again when
/// their lease ends (at-least-once).
async fn record_loop(store: Store, mut results: mpsc::Receiver<AttemptRecord>, batch_size: usize) {
    const TRIES: u32 = 8;
    let mut received = Vec::with_capacity(batch_size);
    while results.recv_many(&mut received, batch_size).await > 0 {
        let batch = Arc::new(std::mem::take(&mut received));
        let mut backoff = Duration::from_millis(50);
        for tried in 1..=TRIES {
            match store.record_attempts(batch.clone()).await {
                Ok(()) => break,
                Err(error) if tried == TRIES => {
                    tracing::error!(%error, lost = batch.len(), "recording attempts failed; leases will resend them");
                }
                Err(error) => {
                    tracing::warn!(%error, "recording attempts failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
