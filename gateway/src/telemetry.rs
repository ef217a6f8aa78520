//! Telemetry: logs through `tracing` (human-readable or JSON lines) and
//! metrics through the `metrics` facade, rendered in Prometheus text format
//! at `GET /metrics`. Every metric name and label set lives here, so what
//! an operator can graph is listed in one place.
//!
//! Logs carry ids, outcomes and durations, never payloads, secrets, tokens
//! or header values.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::clock::Millis;
use crate::domain::{AttemptOutcome, AttemptRecord, NextState, QueueStats};

const EVENTS_ACCEPTED: &str = "wasmhook_events_accepted_total";
const DELIVERIES_FINISHED: &str = "wasmhook_deliveries_finished_total";
const ATTEMPTS: &str = "wasmhook_attempts_total";
const ATTEMPT_DURATION: &str = "wasmhook_attempt_duration_seconds";
const PLUGIN_DURATION: &str = "wasmhook_plugin_duration_seconds";
const PLUGIN_CACHE: &str = "wasmhook_plugin_cache_total";
const QUEUE_PENDING: &str = "wasmhook_queue_pending";
const QUEUE_DUE: &str = "wasmhook_queue_due";
const QUEUE_IN_FLIGHT: &str = "wasmhook_queue_in_flight";
const QUEUE_OLDEST_DUE_AGE: &str = "wasmhook_queue_oldest_due_age_seconds";
const BREAKERS: &str = "wasmhook_breakers";
const RETENTION_DELETED: &str = "wasmhook_retention_deleted_events_total";
const SQLITE_COMMITS: &str = "wasmhook_sqlite_commits_total";
const SQLITE_COMMITTED_WRITES: &str = "wasmhook_sqlite_committed_writes_total";

/// Receivers answer in milliseconds to tens of seconds.
const ATTEMPT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// A plugin call takes tens of microseconds; its deadline is 100 ms.
const PLUGIN_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025, 0.1, 0.25,
];

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, with the current span's fields.
    Json,
}

/// Installs the global log subscriber; the level filter comes from
/// `WASMHOOK_LOG` (default `info`).
pub fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_env("WASMHOOK_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// The process's metrics registry, rendered for scrapes.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    /// The process-wide recorder, installed on first use (a process has one
    /// global recorder, however many gateways a test builds in it).
    pub fn global() -> Self {
        static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
        let handle = HANDLE.get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(ATTEMPT_DURATION.into()), ATTEMPT_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(PLUGIN_DURATION.into()), PLUGIN_BUCKETS)
                })
                .and_then(|b| b.install_recorder())
                .expect("installing the metrics recorder: buckets are non-empty and it runs once");
            describe();
            handle
        });
        Self {
            handle: handle.clone(),
        }
    }

    /// The current values in Prometheus text format, queue gauges set from
    /// `queue` first.
    pub fn render(&self, queue: &QueueStats, now: Millis) -> String {
        gauge!(QUEUE_PENDING).set(queue.pending as f64);
        gauge!(QUEUE_DUE).set(queue.due as f64);
        gauge!(QUEUE_IN_FLIGHT).set(queue.in_flight as f64);
        let oldest_age = queue
            .oldest_due_at
            .map_or(0, |due_at| (now - due_at).max(0));
        gauge!(QUEUE_OLDEST_DUE_AGE).set(oldest_age as f64 / 1000.0);
        gauge!(BREAKERS, "state" => "open").set(queue.breakers_open as f64);
        gauge!(BREAKERS, "state" => "half_open").set(queue.breakers_half_open as f64);
        self.handle.render()
    }
}

fn describe() {
    describe_counter!(
        EVENTS_ACCEPTED,
        "Events accepted (repeats of an idempotency key or id not counted)."
    );
    describe_counter!(
        DELIVERIES_FINISHED,
        "Deliveries that reached a final state, by state."
    );
    describe_counter!(ATTEMPTS, "Delivery attempts, by outcome.");
    describe_histogram!(
        ATTEMPT_DURATION,
        metrics::Unit::Seconds,
        "Time from request to response of attempts that reached the network."
    );
    describe_histogram!(
        PLUGIN_DURATION,
        metrics::Unit::Seconds,
        "Plugin run time per delivery: fresh instance and call."
    );
    describe_counter!(
        PLUGIN_CACHE,
        "Lookups of a plugin's compiled code in the in-memory cache, by result (hit, miss)."
    );
    describe_gauge!(
        QUEUE_PENDING,
        "Deliveries waiting for an attempt (due now or later), at scrape time."
    );
    describe_gauge!(
        QUEUE_DUE,
        "Deliveries whose next attempt is due now, at scrape time."
    );
    describe_gauge!(
        QUEUE_IN_FLIGHT,
        "Deliveries claimed by a worker, at scrape time."
    );
    describe_gauge!(
        QUEUE_OLDEST_DUE_AGE,
        metrics::Unit::Seconds,
        "How long the oldest due delivery has waited past its due time (0 when none)."
    );
    describe_gauge!(
        BREAKERS,
        "Webhooks whose circuit breaker is open, by state (open: holding the endpoint's deliveries; half_open: a probe due or on its way), at scrape time."
    );
    describe_counter!(
        RETENTION_DELETED,
        "Events deleted by retention, with their deliveries and attempts."
    );
    describe_counter!(
        SQLITE_COMMITS,
        "Transactions the SQLite writer committed, by durability (durable: fsynced)."
    );
    describe_counter!(
        SQLITE_COMMITTED_WRITES,
        "Writes the SQLite writer committed; over its commits, the writes each commit carried."
    );
}

pub fn event_accepted() {
    counter!(EVENTS_ACCEPTED).increment(1);
}

/// Counts what one attempt record says: its outcome, its latency if it
/// reached the network, and the delivery's final state if it has one.
pub fn attempt_recorded(record: &AttemptRecord) {
    if let Some(attempt) = &record.attempt {
        let outcome = outcome_label(attempt.outcome, attempt.status_code);
        counter!(ATTEMPTS, "outcome" => outcome).increment(1);
        if attempt.outcome.reached_network() {
            let seconds = attempt.duration_ms as f64 / 1000.0;
            histogram!(ATTEMPT_DURATION).record(seconds);
        }
    }
    let finished = match record.next {
        NextState::Succeeded => Some("succeeded"),
        NextState::Skipped { .. } => Some("skipped"),
        NextState::Dead { .. } => Some("dead"),
        NextState::Retry { .. } => None,
    };
    if let Some(state) = finished {
        counter!(DELIVERIES_FINISHED, "state" => state).increment(1);
    }
}

pub fn plugin_ran(duration: Duration) {
    histogram!(PLUGIN_DURATION).record(duration.as_secs_f64());
}

pub fn plugin_cache(hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    counter!(PLUGIN_CACHE, "result" => result).increment(1);
}

pub fn retention_deleted(events: u64) {
    counter!(RETENTION_DELETED).increment(events);
}

/// One SQLite group commit of `writes` writes.
pub fn sqlite_committed(writes: usize, durable: bool) {
    let durability = if durable { "durable" } else { "relaxed" };
    counter!(SQLITE_COMMITS, "durability" => durability).increment(1);
    counter!(SQLITE_COMMITTED_WRITES).increment(writes as u64);
}

/// The outcome label: HTTP answers by class, everything else by kind.
fn outcome_label(outcome: AttemptOutcome, status_code: Option<i64>) -> &'static str {
    match (outcome, status_code) {
        (AttemptOutcome::Success, _) => "2xx",
        (AttemptOutcome::HttpError, Some(400..=499)) => "4xx",
        (AttemptOutcome::HttpError, Some(500..=599)) => "5xx",
        (AttemptOutcome::HttpError, _) => "other_status",
        (AttemptOutcome::Timeout, _) => "timeout",
        (AttemptOutcome::Connection, _) => "connection_error",
        (AttemptOutcome::Plugin, _) => "plugin_error",
        (AttemptOutcome::Skipped, _) => "skipped",
        (AttemptOutcome::UnsafeTarget | AttemptOutcome::InvalidWebhook, _) => "refused",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_labelled_by_class() {
        use AttemptOutcome::*;
        assert_eq!(outcome_label(Success, Some(204)), "2xx");
        assert_eq!(outcome_label(HttpError, Some(404)), "4xx");
        assert_eq!(outcome_label(HttpError, Some(503)), "5xx");
        assert_eq!(outcome_label(HttpError, Some(302)), "other_status");
        assert_eq!(outcome_label(Timeout, None), "timeout");
        assert_eq!(outcome_label(Connection, None), "connection_error");
        assert_eq!(outcome_label(Plugin, None), "plugin_error");
        assert_eq!(outcome_label(UnsafeTarget, None), "refused");
    }
}
