//! How hard a webhook's endpoint is driven, from its recent attempts. Each
//! lane keeps a streak: consecutive successes (positive) or failures
//! (negative). A webhook that has not just succeeded (a new one, or one
//! whose last attempt failed) gets two attempts in flight, doubling with
//! every success up to its limit, so a first batch never floods an
//! endpoint nobody knows yet. One whose attempts keep failing (its
//! endpoint answers errors or hangs, or its plugin keeps failing) gets one
//! attempt at a time and a pause after each, doubling with every further
//! failure up to a cap; its first success lifts both. Deliveries held back
//! wait as they are, spending no attempts, so a receiver that is down for
//! a while is neither hammered nor burns its retries, and its neighbours
//! keep the workers' time.
//!
//! The stores apply these rules in SQL; the functions here say the same
//! for tests and docs.

use std::collections::BTreeMap;

use super::{AttemptRecord, WebhookEffect, WebhookId};

/// Consecutive failed attempts after which a webhook is paced.
pub const PACE_AFTER_FAILURES: i64 = 5;
/// The pause after the first paced attempt, in milliseconds.
pub const FIRST_PAUSE_MS: i64 = 10;
/// The longest pause between two paced attempts, in milliseconds.
pub const LONGEST_PAUSE_MS: i64 = 1_000;
/// Attempts in flight to a webhook without a success streak.
pub const FIRST_IN_FLIGHT: i64 = 2;
/// The longest streak kept: two in flight doubled this often exceeds any
/// in-flight limit, and a pause this often doubled exceeds the longest, so
/// a lane in its steady state (healthy, or paced at the longest pause) is
/// not written again for every batch.
pub const LONGEST_STREAK: i64 = 16;

/// What one batch of recorded attempts says about a webhook: the streak it
/// ends on (`trailing`: successes positive, failures negative), and
/// whether that streak began inside the batch (`broken`), so it replaces
/// the lane's streak instead of extending it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchStreak {
    pub trailing: i64,
    pub broken: bool,
}

impl BatchStreak {
    fn add(&mut self, effect: &WebhookEffect) {
        let step = match effect {
            WebhookEffect::Healthy => 1,
            WebhookEffect::Failing { .. } | WebhookEffect::Disable { .. } => -1,
            // A skip or a disabled webhook says nothing about the endpoint.
            WebhookEffect::None => return,
        };
        if self.trailing * step < 0 {
            *self = Self {
                trailing: step,
                broken: true,
            };
        } else {
            self.trailing += step;
        }
    }

    /// The lane's streak after this batch, from its streak before.
    pub fn applied_to(self, streak: i64) -> i64 {
        let next = if self.trailing == 0 {
            streak
        } else if self.broken || streak * self.trailing < 0 {
            self.trailing
        } else {
            streak + self.trailing
        };
        next.clamp(-LONGEST_STREAK, LONGEST_STREAK)
    }
}

/// Each webhook in `records` (in their order) with the streak its
/// attempts there end on, in webhook order so that every recorder locks
/// lanes in the same order.
pub fn batch_streaks<'a>(
    records: impl IntoIterator<Item = &'a AttemptRecord>,
) -> BTreeMap<&'a WebhookId, BatchStreak> {
    let mut streaks: BTreeMap<&WebhookId, BatchStreak> = BTreeMap::new();
    for record in records {
        streaks
            .entry(&record.webhook_id)
            .or_default()
            .add(&record.webhook);
    }
    streaks
}

/// Attempts in flight allowed at once to a webhook with this streak and
/// this configured limit.
pub fn in_flight(streak: i64, limit: i64) -> i64 {
    if streak <= -PACE_AFTER_FAILURES {
        return 1;
    }
    let doublings = streak.clamp(0, LONGEST_STREAK);
    (FIRST_IN_FLIGHT << doublings).min(limit)
}

/// The pause after an attempt that left this streak, if paced.
pub fn pause_ms(streak: i64) -> Option<i64> {
    let failures = streak.checked_neg()?;
    let doublings = failures.checked_sub(PACE_AFTER_FAILURES)?;
    if doublings < 0 {
        return None;
    }
    Some((FIRST_PAUSE_MS << doublings.min(LONGEST_STREAK)).min(LONGEST_PAUSE_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(effects: &[i64]) -> BatchStreak {
        let mut streak = BatchStreak::default();
        for &step in effects {
            streak.add(&match step {
                1 => WebhookEffect::Healthy,
                -1 => WebhookEffect::Failing {
                    disable_if_failing_since: 0,
                },
                _ => WebhookEffect::None,
            });
        }
        streak
    }

    #[test]
    fn a_batch_extends_or_replaces_the_streak() {
        assert_eq!(batch(&[1, 1]).applied_to(3), 5);
        assert_eq!(batch(&[1, 1]).applied_to(-7), 2);
        assert_eq!(batch(&[-1]).applied_to(40), -1);
        assert_eq!(batch(&[-1, -1, 1]).applied_to(9), 1, "broken in the batch");
        assert_eq!(
            batch(&[1, -1, -1]).applied_to(-3),
            -2,
            "broken in the batch"
        );
        assert_eq!(batch(&[0, 0]).applied_to(-6), -6, "skips change nothing");
        assert_eq!(batch(&[1]).applied_to(LONGEST_STREAK), LONGEST_STREAK);
    }

    #[test]
    fn in_flight_starts_small_doubles_with_successes_and_drops_to_one() {
        assert_eq!(in_flight(0, 32), FIRST_IN_FLIGHT);
        assert_eq!(in_flight(-1, 32), FIRST_IN_FLIGHT);
        assert_eq!(in_flight(1, 32), FIRST_IN_FLIGHT * 2);
        assert_eq!(in_flight(4, 32), 32);
        let most = i64::from(crate::domain::InFlightLimit::MAX);
        assert_eq!(in_flight(LONGEST_STREAK, most), most);
        assert_eq!(in_flight(LONGEST_STREAK, 32), 32);
        assert_eq!(in_flight(0, 1), 1);
        assert_eq!(in_flight(-PACE_AFTER_FAILURES, 32), 1);
    }

    #[test]
    fn pauses_double_from_the_threshold_up_to_the_cap() {
        assert_eq!(pause_ms(1), None);
        assert_eq!(pause_ms(1 - PACE_AFTER_FAILURES), None);
        assert_eq!(pause_ms(-PACE_AFTER_FAILURES), Some(FIRST_PAUSE_MS));
        assert_eq!(pause_ms(-PACE_AFTER_FAILURES - 1), Some(FIRST_PAUSE_MS * 2));
        assert_eq!(pause_ms(-PACE_AFTER_FAILURES - 40), Some(LONGEST_PAUSE_MS));
        assert_eq!(
            pause_ms(-LONGEST_STREAK - PACE_AFTER_FAILURES),
            Some(LONGEST_PAUSE_MS)
        );
    }
}
