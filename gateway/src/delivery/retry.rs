//! The retry policy: what an attempt's result means for its delivery and
//! its webhook.

use std::time::Duration;

use rand::Rng;

use super::sender::SendResult;
use crate::clock::{Millis, millis, now_ms};
use crate::domain::{
    AttemptOutcome, AttemptRecord, AttemptRow, ClaimedDelivery, NextState, WebhookEffect, lane,
};

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Delay before attempt n+1 after attempt n failed.
    schedule: Vec<Duration>,
    /// A webhook failing for this long is disabled.
    disable_after: Duration,
}

impl RetryPolicy {
    pub fn new(schedule: Vec<Duration>, disable_after: Duration) -> Self {
        Self {
            schedule,
            disable_after,
        }
    }

    /// Attempts a delivery gets before it is dead, on the server's
    /// schedule.
    pub fn max_attempts(&self) -> i64 {
        self.schedule.len() as i64 + 1
    }

    /// On the server's schedule, see [`delay_after`].
    pub fn delay_after(&self, number: i64, retry_after: Option<Duration>) -> Option<Duration> {
        delay_after(&self.schedule, number, retry_after)
    }

    /// The delays that apply to `delivery`: its webhook's own, or else the
    /// server's.
    fn schedule_for<'a>(&'a self, delivery: &'a ClaimedDelivery) -> &'a [Duration] {
        match &delivery.retry_schedule {
            Some(own) => own.delays(),
            None => &self.schedule,
        }
    }

    /// Turns one attempt's result into the record the store applies.
    pub fn decide(
        &self,
        delivery: &ClaimedDelivery,
        result: SendResult,
        now: Millis,
    ) -> AttemptRecord {
        let number = delivery.attempts + 1;
        let schedule = self.schedule_for(delivery);
        let throttled_until = lane::throttle(
            result.status_code,
            result.retry_after,
            max_delay(schedule),
            now,
        );
        let (next, webhook) = match result.kind {
            AttemptOutcome::Success => (NextState::Succeeded, WebhookEffect::Healthy),
            _ if result.status_code == Some(410) => (
                NextState::Dead {
                    error: result.summary(),
                },
                WebhookEffect::Disable {
                    reason: "the receiver answered 410 Gone".into(),
                },
            ),
            _ => {
                let error = result.summary();
                let next = match delay_after(schedule, number, result.retry_after) {
                    Some(delay) => NextState::Retry {
                        due_at: now + millis(delay),
                        error,
                    },
                    None => NextState::Dead { error },
                };
                let cutoff = now - millis(self.disable_after);
                (
                    next,
                    WebhookEffect::Failing {
                        disable_if_failing_since: cutoff,
                    },
                )
            }
        };
        let attempt = AttemptRow {
            number,
            started_at: result.started_at,
            duration_ms: result.duration.as_millis() as i64,
            outcome: result.kind,
            status_code: result.status_code.map(i64::from),
            response_body: result.response_body,
            error: result.error,
            plugin_error: result.plugin_error,
        };
        let mut record = record(delivery, Some(attempt), next, webhook, now);
        record.throttled_until = throttled_until;
        record
    }

    /// The plugin decided not to send: the delivery ends as `skipped`,
    /// with the decision recorded as an attempt that sent nothing.
    pub fn skip(
        &self,
        delivery: &ClaimedDelivery,
        reason: String,
        started_at: Millis,
        duration_ms: i64,
    ) -> AttemptRecord {
        let attempt = AttemptRow {
            number: delivery.attempts + 1,
            started_at,
            duration_ms,
            outcome: AttemptOutcome::Skipped,
            status_code: None,
            response_body: None,
            error: None,
            plugin_error: None,
        };
        let next = NextState::Skipped { reason };
        record(delivery, Some(attempt), next, WebhookEffect::None, now_ms())
    }

    /// A delivery whose webhook was disabled ends without an attempt; a
    /// manual retry after re-enabling sends it.
    pub fn abandon(&self, delivery: &ClaimedDelivery, now: Millis) -> AttemptRecord {
        let reason = delivery
            .disabled_reason
            .as_deref()
            .unwrap_or("disabled by a user");
        let next = NextState::Dead {
            error: format!("webhook disabled: {reason}"),
        };
        record(delivery, None, next, WebhookEffect::None, now)
    }
}

fn max_delay(schedule: &[Duration]) -> Duration {
    schedule.iter().copied().max().unwrap_or_default()
}

/// How long to wait after failed attempt `number` (1-based), or `None`
/// when it was the last. The receiver's `Retry-After` wins, capped at the
/// schedule's largest delay; otherwise the schedule, with ±10% jitter so a
/// recovering receiver is not hit by every retry at once.
fn delay_after(
    schedule: &[Duration],
    number: i64,
    retry_after: Option<Duration>,
) -> Option<Duration> {
    let scheduled = *schedule.get(usize::try_from(number - 1).ok()?)?;
    if let Some(asked) = retry_after {
        return Some(asked.min(max_delay(schedule)));
    }
    Some(scheduled.mul_f64(rand::rng().random_range(0.9..=1.1)))
}

/// The record for `delivery`'s current claim.
fn record(
    delivery: &ClaimedDelivery,
    attempt: Option<AttemptRow>,
    next: NextState,
    webhook: WebhookEffect,
    now: Millis,
) -> AttemptRecord {
    AttemptRecord {
        delivery_id: delivery.id.clone(),
        claim_token: delivery.claim_token.clone(),
        webhook_id: delivery.webhook_id.clone(),
        attempt,
        next,
        webhook,
        throttled_until: None,
        ordering_key: delivery.ordering_key.clone(),
        now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        let s = Duration::from_secs;
        RetryPolicy::new(vec![s(5), s(300), s(1800)], s(5 * 86400))
    }

    #[test]
    fn schedule_with_jitter_then_dead() {
        let p = policy();
        assert_eq!(p.max_attempts(), 4);
        let first = p.delay_after(1, None).unwrap();
        assert!(
            first >= Duration::from_millis(4500) && first <= Duration::from_millis(5500),
            "{first:?}"
        );
        let third = p.delay_after(3, None).unwrap();
        assert!(third >= Duration::from_secs(1620) && third <= Duration::from_secs(1980));
        assert_eq!(p.delay_after(4, None), None);
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let p = policy();
        assert_eq!(
            p.delay_after(1, Some(Duration::from_secs(42))),
            Some(Duration::from_secs(42))
        );
        assert_eq!(
            p.delay_after(1, Some(Duration::from_secs(99_999))),
            Some(Duration::from_secs(1800))
        );
        assert_eq!(p.delay_after(4, Some(Duration::from_secs(1))), None);
    }
}
