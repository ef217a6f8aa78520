//! Retention: deletes events older than the configured period, with their
//! deliveries and attempts, in the background and in small batches, so
//! the database stays bounded without long write locks.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::{millis, now_ms};
use crate::store::Store;
use crate::telemetry;

/// Events deleted per transaction: small enough that publishes and
/// attempt records queue behind it for milliseconds, not seconds.
const BATCH: u32 = 500;
/// Breathing room for other writers between two batches.
const PAUSE: Duration = Duration::from_millis(20);

pub struct Retention {
    pub store: Store,
    /// How long events are kept.
    pub keep: Duration,
    /// Time between two sweeps.
    pub interval: Duration,
}

impl Retention {
    /// Sweeps at start and then every `interval` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            self.sweep(&shutdown).await;
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Deletes batch after batch until nothing old is left (or shutdown).
    async fn sweep(&self, shutdown: &CancellationToken) {
        let cutoff = now_ms() - millis(self.keep);
        let mut deleted = 0;
        while !shutdown.is_cancelled() {
            match self.store.purge_events(cutoff, BATCH).await {
                Ok(0) => break,
                Ok(events) => {
                    deleted += events;
                    telemetry::retention_deleted(events);
                    tokio::time::sleep(PAUSE).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "retention could not delete old events; next sweep retries");
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(events = deleted, keep = ?self.keep, "retention deleted old events with their deliveries and attempts");
        }
    }
}
