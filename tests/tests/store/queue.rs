//! The delivery queue: claims and their leases, fencing by claim token,
//! recording attempts and their effect on webhooks, release, manual retry,
//! the queue's counts, and retention.

use std::sync::Arc;
use std::time::Duration;

use wasmhook::clock::now_ms;
use wasmhook::domain::{
    AttemptOutcome, AttemptRecord, AttemptRow, ClaimedDelivery, DeliveryId, DeliveryStatus,
    NextState, PluginFailure, WebhookEffect,
};
use wasmhook::store::StoreError;

use crate::{Fixture, SECRET, fields};

fn attempt(claimed: &ClaimedDelivery, outcome: AttemptOutcome, status: Option<i64>) -> AttemptRow {
    AttemptRow {
        number: claimed.attempts + 1,
        started_at: now_ms(),
        duration_ms: 7,
        outcome,
        status_code: status,
        response_body: status.map(|_| "ok".to_owned()),
        error: None,
        plugin_error: None,
    }
}

fn record(
    claimed: &ClaimedDelivery,
    attempt: Option<AttemptRow>,
    next: NextState,
    webhook: WebhookEffect,
) -> AttemptRecord {
    AttemptRecord {
        delivery_id: claimed.id.clone(),
        claim_token: claimed.claim_token.clone(),
        webhook_id: claimed.webhook_id.clone(),
        attempt,
        next,
        webhook,
        throttled_until: None,
        ordering_key: claimed.ordering_key.clone(),
        now: now_ms(),
    }
}

async fn apply(f: &Fixture, records: Vec<AttemptRecord>) {
    f.store
        .record_attempts(Arc::new(records))
        .await
        .expect("recorded");
}

#[tokio::test]
async fn a_claim_carries_what_the_attempt_needs_and_holds_it_for_its_lease() {
    let f = Fixture::new().await;
    let app = f.store.create_app("A", Some("acme")).await.unwrap();
    let webhook = f.webhook(&app, fields("https://example.com/a")).await;
    let published = f.publish(&app, "invoice.paid").await;

    let claimed = f.claim(10).await;
    assert_eq!(claimed.len(), 1);
    let c = &claimed[0];
    assert_eq!(c.id, published.deliveries[0].id);
    assert_eq!(
        (&c.event_id, &c.webhook_id, &c.app_id),
        (&published.event_id, &webhook.id, &app.id)
    );
    assert_eq!(
        (c.event_type.as_str(), c.payload.as_str()),
        ("invoice.paid", r#"{"amount":4200}"#)
    );
    assert_eq!(
        (c.url.as_str(), c.secret.as_str(), c.app_uid.as_deref()),
        ("https://example.com/a", SECRET, Some("acme"))
    );
    assert!(c.enabled && c.plugin.is_none() && c.attempts == 0);
    assert!(c.headers.as_ref().is_ok_and(|h| h.as_map().is_empty()));
    assert!(
        c.claim_token
            .as_str()
            .starts_with(&format!("clm_{}_", std::process::id()))
    );

    assert!(f.claim(10).await.is_empty(), "held by the lease");
    let delivery = f.store.delivery(&app.id, &c.id).await.unwrap().unwrap();
    assert_eq!(delivery.status, DeliveryStatus::Sending);
    let stats = f.store.queue_stats(now_ms()).await.unwrap();
    assert_eq!((stats.pending, stats.due, stats.in_flight), (0, 0, 1));
}

#[tokio::test]
async fn claims_take_the_oldest_due_first_and_at_most_the_limit() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    f.webhook(&app, fields("https://example.com/a")).await;
    f.warm(&app, "a.b").await;
    let mut queued = Vec::new();
    for _ in 0..5 {
        queued.push(f.publish(&app, "a.b").await.deliveries[0].id.clone());
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let first = f.claim(2).await;
    let ids: Vec<DeliveryId> = first.iter().map(|c| c.id.clone()).collect();
    let mut expected = queued[..2].to_vec();
    let mut sorted = ids.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected);
    assert_eq!(f.claim(10).await.len(), 3);
}

#[tokio::test]
async fn an_expired_lease_lets_another_worker_claim_and_fences_the_first() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    f.webhook(&app, fields("https://example.com/a")).await;
    f.publish(&app, "a.b").await;
    let first = f.claim_leased(1, Duration::from_millis(1)).await.remove(0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = f.claim(1).await.remove(0);
    assert_eq!(first.id, second.id);
    assert_ne!(first.claim_token, second.claim_token);

    // The first worker's late result is dropped: the delivery is the
    // second's now.
    let late = record(
        &first,
        Some(attempt(&first, AttemptOutcome::Success, Some(200))),
        NextState::Succeeded,
        WebhookEffect::Healthy,
    );
    apply(&f, vec![late]).await;
    let delivery = f.store.delivery(&app.id, &first.id).await.unwrap().unwrap();
    assert_eq!(
        (delivery.status, delivery.attempts),
        (DeliveryStatus::Sending, 0)
    );
    assert!(f.store.attempts(&first.id).await.unwrap().is_empty());

    let current = record(
        &second,
        Some(attempt(&second, AttemptOutcome::Success, Some(204))),
        NextState::Succeeded,
        WebhookEffect::Healthy,
    );
    apply(&f, vec![current]).await;
    let delivery = f.store.delivery(&app.id, &first.id).await.unwrap().unwrap();
    assert_eq!(
        (delivery.status, delivery.attempts, delivery.due_at),
        (DeliveryStatus::Succeeded, 1, None)
    );
    assert_eq!(delivery.last_status_code, Some(204));
}

#[tokio::test]
async fn each_next_state_is_recorded_with_its_attempt() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    let webhook = f.webhook(&app, fields("https://example.com/a")).await;
    f.warm(&app, "a.b").await;
    for _ in 0..4 {
        f.publish(&app, "a.b").await;
    }
    let claimed = f.claim(4).await;
    let due = now_ms() + 60_000;
    let mut failed = attempt(&claimed[1], AttemptOutcome::HttpError, Some(503));
    failed.error = Some("receiver answered HTTP 503".into());
    let mut plugin = attempt(&claimed[3], AttemptOutcome::Plugin, None);
    plugin.plugin_error = Some(PluginFailure::Timeout);
    let records = vec![
        record(
            &claimed[0],
            Some(attempt(&claimed[0], AttemptOutcome::Success, Some(200))),
            NextState::Succeeded,
            WebhookEffect::Healthy,
        ),
        record(
            &claimed[1],
            Some(failed),
            NextState::Retry {
                due_at: due,
                error: "receiver answered HTTP 503".into(),
            },
            WebhookEffect::None,
        ),
        record(
            &claimed[2],
            Some(attempt(&claimed[2], AttemptOutcome::Skipped, None)),
            NextState::Skipped {
                reason: "not for them".into(),
            },
            WebhookEffect::None,
        ),
        record(
            &claimed[3],
            Some(plugin),
            NextState::Dead {
                error: "the plugin ran past its deadline".into(),
            },
            WebhookEffect::None,
        ),
    ];
    apply(&f, records).await;

    let read = |i: usize| {
        let (store, app_id, id) = (f.store.clone(), app.id.clone(), claimed[i].id.clone());
        async move { store.delivery(&app_id, &id).await.unwrap().unwrap() }
    };
    let ok = read(0).await;
    assert_eq!(
        (ok.status, ok.last_error),
        (DeliveryStatus::Succeeded, None)
    );
    let retrying = read(1).await;
    assert_eq!(
        (retrying.status, retrying.due_at),
        (DeliveryStatus::Failed, Some(due))
    );
    assert_eq!(
        retrying.last_error.as_deref(),
        Some("receiver answered HTTP 503")
    );
    let skipped = read(2).await;
    assert_eq!(
        (skipped.status, skipped.skip_reason.as_deref()),
        (DeliveryStatus::Skipped, Some("not for them"))
    );
    let dead = read(3).await;
    assert_eq!((dead.status, dead.due_at), (DeliveryStatus::Dead, None));

    let attempts = f.store.attempts(&claimed[3].id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        (attempts[0].outcome, attempts[0].plugin_error),
        (AttemptOutcome::Plugin, Some(PluginFailure::Timeout))
    );
    let attempts = f.store.attempts(&claimed[1].id).await.unwrap();
    assert_eq!(
        (
            attempts[0].outcome,
            attempts[0].status_code,
            attempts[0].duration_ms
        ),
        (AttemptOutcome::HttpError, Some(503), 7)
    );

    let failed = f
        .store
        .webhook_deliveries(
            &webhook.id,
            Some(DeliveryStatus::Failed),
            &crate::page(None, 10),
        )
        .await
        .unwrap();
    assert_eq!(
        failed.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
        vec![claimed[1].id.clone()]
    );
    let all = f
        .store
        .webhook_deliveries(&webhook.id, None, &crate::page(None, 10))
        .await
        .unwrap();
    assert_eq!(all.len(), 4 + crate::WARM_UP);
    let stats = f.store.queue_stats(now_ms()).await.unwrap();
    assert_eq!(
        (
            stats.pending,
            stats.due,
            stats.in_flight,
            stats.oldest_due_at
        ),
        (1, 0, 0, Some(due))
    );
}

#[tokio::test]
async fn a_delivery_that_ends_without_an_attempt_records_none() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    f.webhook(&app, fields("https://example.com/a")).await;
    f.publish(&app, "a.b").await;
    let claimed = f.claim(1).await.remove(0);
    let ended = record(
        &claimed,
        None,
        NextState::Dead {
            error: "webhook disabled: by a user".into(),
        },
        WebhookEffect::None,
    );
    apply(&f, vec![ended]).await;
    let delivery = f
        .store
        .delivery(&app.id, &claimed.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (delivery.status, delivery.attempts, delivery.last_attempt_at),
        (DeliveryStatus::Dead, 0, None)
    );
    assert!(f.store.attempts(&claimed.id).await.unwrap().is_empty());
}

#[tokio::test]
async fn failures_disable_a_webhook_failing_too_long_and_410_disables_at_once() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    let failing = f.webhook(&app, fields("https://example.com/failing")).await;
    let gone = f.webhook(&app, fields("https://example.com/gone")).await;
    f.publish(&app, "a.b").await;
    let claimed = f.claim(2).await;
    let of = |id| claimed.iter().find(|c| &c.webhook_id == id).unwrap();
    let dead = || NextState::Dead {
        error: "failed".into(),
    };
    apply(
        &f,
        vec![
            record(
                of(&failing.id),
                Some(attempt(of(&failing.id), AttemptOutcome::Timeout, None)),
                dead(),
                WebhookEffect::Failing {
                    disable_if_failing_since: now_ms() + 1_000,
                },
            ),
            record(
                of(&gone.id),
                Some(attempt(of(&gone.id), AttemptOutcome::HttpError, Some(410))),
                dead(),
                WebhookEffect::Disable {
                    reason: "the receiver answered 410 Gone".into(),
                },
            ),
        ],
    )
    .await;
    let failing = f
        .store
        .webhook(&app.id, &failing.id)
        .await
        .unwrap()
        .unwrap();
    assert!(!failing.enabled);
    let reason = failing.disabled_reason.unwrap_or_default();
    assert!(
        reason.starts_with("every attempt failed since 20"),
        "{reason}"
    );
    let gone = f.store.webhook(&app.id, &gone.id).await.unwrap().unwrap();
    assert_eq!(
        (gone.enabled, gone.disabled_reason.as_deref()),
        (false, Some("the receiver answered 410 Gone"))
    );

    // Disabled webhooks get no new deliveries.
    assert!(f.publish(&app, "a.b").await.deliveries.is_empty());
}

#[tokio::test]
async fn a_success_restarts_the_failing_clock() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    f.webhook(&app, fields("https://example.com/a")).await;
    let cutoff = now_ms() - 60_000;
    for effect in [
        WebhookEffect::Failing {
            disable_if_failing_since: cutoff,
        },
        WebhookEffect::Healthy,
    ] {
        f.publish(&app, "a.b").await;
        let claimed = f.claim(1).await.remove(0);
        let next = match effect {
            WebhookEffect::Healthy => NextState::Succeeded,
            _ => NextState::Dead {
                error: "failed".into(),
            },
        };
        apply(
            &f,
            vec![record(
                &claimed,
                Some(attempt(&claimed, AttemptOutcome::Connection, None)),
                next,
                effect,
            )],
        )
        .await;
    }
    // A failure now, with a cutoff after the first failure: had the
    // success not cleared the clock, this would disable the webhook.
    f.publish(&app, "a.b").await;
    let claimed = f.claim(1).await.remove(0);
    let effect = WebhookEffect::Failing {
        disable_if_failing_since: now_ms() - 1_000,
    };
    apply(
        &f,
        vec![record(
            &claimed,
            Some(attempt(&claimed, AttemptOutcome::Connection, None)),
            NextState::Dead { error: "x".into() },
            effect,
        )],
    )
    .await;
    let webhook = f
        .store
        .webhook(&app.id, &claimed.webhook_id)
        .await
        .unwrap()
        .unwrap();
    assert!(webhook.enabled, "{:?}", webhook.disabled_reason);
}

#[tokio::test]
async fn released_claims_are_due_again_at_once() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    f.webhook(&app, fields("https://example.com/a")).await;
    f.publish(&app, "a.b").await;
    f.publish(&app, "a.b").await;
    let claimed = f.claim(2).await;
    // One had an attempt before: it goes back as failed, the other pending.
    let retry = NextState::Retry {
        due_at: now_ms(),
        error: "503".into(),
    };
    apply(
        &f,
        vec![record(
            &claimed[0],
            Some(attempt(&claimed[0], AttemptOutcome::HttpError, Some(503))),
            retry,
            WebhookEffect::None,
        )],
    )
    .await;
    let reclaimed = f.claim(2).await;
    assert_eq!(reclaimed.len(), 1);
    f.store
        .release(vec![reclaimed[0].held(), claimed[1].held()])
        .await
        .unwrap();
    let again = f.claim(10).await;
    assert_eq!(again.len(), 2, "both are due now");
    f.store
        .release(again.iter().map(ClaimedDelivery::held).collect())
        .await
        .unwrap();
    let statuses: Vec<(DeliveryId, DeliveryStatus)> = {
        let mut v = Vec::new();
        for c in &claimed {
            let d = f.store.delivery(&app.id, &c.id).await.unwrap().unwrap();
            v.push((d.id, d.status));
        }
        v
    };
    assert!(
        statuses.contains(&(claimed[0].id.clone(), DeliveryStatus::Failed)),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&(claimed[1].id.clone(), DeliveryStatus::Pending)),
        "{statuses:?}"
    );

    // A stale token releases nothing.
    let held = f.claim(10).await;
    f.store
        .release(claimed.iter().map(ClaimedDelivery::held).collect())
        .await
        .unwrap();
    assert!(f.claim(10).await.is_empty(), "still held: {}", held.len());
}

#[tokio::test]
async fn a_manual_retry_requeues_any_delivery_not_being_sent() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    f.webhook(&app, fields("https://example.com/a")).await;
    f.publish(&app, "a.b").await;
    let claimed = f.claim(1).await.remove(0);
    let busy = f.store.retry_delivery(&app.id, &claimed.id).await;
    assert!(
        matches!(busy, Err(StoreError::DeliveryInFlight)),
        "{busy:?}"
    );
    apply(
        &f,
        vec![record(
            &claimed,
            Some(attempt(&claimed, AttemptOutcome::Success, Some(200))),
            NextState::Succeeded,
            WebhookEffect::Healthy,
        )],
    )
    .await;

    let requeued = f.store.retry_delivery(&app.id, &claimed.id).await.unwrap();
    assert_eq!(requeued.status, DeliveryStatus::Pending);
    assert!(requeued.due_at.is_some_and(|due| due <= now_ms()));
    assert_eq!(f.claim(1).await[0].attempts, 1);
    let missing = f
        .store
        .retry_delivery(&app.id, &DeliveryId::from("dlv_x"))
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
    let other = f.app("B").await;
    let elsewhere = f.store.retry_delivery(&other.id, &claimed.id).await;
    assert!(
        matches!(elsewhere, Err(StoreError::NotFound)),
        "{elsewhere:?}"
    );
}

#[tokio::test]
async fn retention_deletes_old_finished_events_with_their_history() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    f.webhook(&app, fields("https://example.com/a")).await;
    let finished = f.publish(&app, "a.b").await;
    let unfinished = f.publish(&app, "a.b").await;
    let claimed = f.claim(10).await;
    let done = claimed
        .iter()
        .find(|c| c.event_id == finished.event_id)
        .unwrap();
    apply(
        &f,
        vec![record(
            done,
            Some(attempt(done, AttemptOutcome::Success, Some(200))),
            NextState::Succeeded,
            WebhookEffect::Healthy,
        )],
    )
    .await;

    let cutoff = now_ms() + 1_000;
    assert_eq!(f.store.purge_events(cutoff, 100).await.unwrap(), 1);
    assert!(
        f.store
            .event(&app.id, &finished.event_id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(f.store.delivery(&app.id, &done.id).await.unwrap().is_none());
    assert!(f.store.attempts(&done.id).await.unwrap().is_empty());
    assert!(
        f.store
            .event(&app.id, &unfinished.event_id)
            .await
            .unwrap()
            .is_some(),
        "still being sent"
    );
    assert_eq!(
        f.store.purge_events(now_ms() - 60_000, 100).await.unwrap(),
        0
    );
}
