//! Publishing: fan-out to subscribed webhooks in one transaction, repeats
//! recognised by idempotency key and by event id, reading events back.

use wasmhook::clock::now_ms;
use wasmhook::domain::{DeliveryStatus, EventId};
use wasmhook::store::StoreError;

use crate::{Fixture, fields, filter, new_event};

#[tokio::test]
async fn an_event_fans_out_to_enabled_subscribed_webhooks_only() {
    let f = Fixture::new().await;
    let (app, other) = (f.app("A").await, f.app("B").await);
    let all = f.webhook(&app, fields("https://example.com/all")).await;
    let mut invoices = fields("https://example.com/invoices");
    invoices.event_types = filter(Some(&["invoice.*"]));
    let invoices = f.webhook(&app, invoices).await;
    let mut users = fields("https://example.com/users");
    users.event_types = filter(Some(&["user.created"]));
    f.webhook(&app, users).await;
    let mut disabled = fields("https://example.com/off");
    disabled.enabled = false;
    f.webhook(&app, disabled).await;
    f.webhook(&other, fields("https://example.com/other")).await;

    let published = f.publish(&app, "invoice.paid").await;
    assert!(!published.replayed);
    let mut hooks: Vec<_> = published
        .deliveries
        .iter()
        .map(|d| d.webhook_id.clone())
        .collect();
    hooks.sort();
    let mut expected = vec![all.id.clone(), invoices.id.clone()];
    expected.sort();
    assert_eq!(hooks, expected);

    let event = f
        .store
        .event(&app.id, &published.event_id)
        .await
        .unwrap()
        .expect("event");
    assert_eq!(
        (event.event_type.as_str(), event.payload.as_str()),
        ("invoice.paid", r#"{"amount":4200}"#)
    );
    let deliveries = f
        .store
        .event_deliveries(&app.id, &published.event_id)
        .await
        .unwrap();
    assert_eq!(deliveries.len(), 2);
    for delivery in &deliveries {
        assert_eq!(delivery.status, DeliveryStatus::Pending);
        assert_eq!(delivery.attempts, 0);
        assert!(delivery.due_at.is_some_and(|due| due <= now_ms()));
    }
    assert!(
        f.store
            .event(&other.id, &published.event_id)
            .await
            .unwrap()
            .is_none(),
        "apps are apart"
    );
}

#[tokio::test]
async fn an_event_with_no_subscriber_is_still_stored() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    let published = f.publish(&app, "nobody.listens").await;
    assert!(published.deliveries.is_empty());
    assert!(
        f.store
            .event(&app.id, &published.event_id)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_answer() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    f.webhook(&app, fields("https://example.com/a")).await;
    let mut first = new_event(&app, "a.b");
    first.idempotency_key = Some("order-1".into());
    let original = f.store.publish(first.clone()).await.unwrap();

    let mut repeat = new_event(&app, "a.b");
    repeat.idempotency_key = Some("order-1".into());
    let replayed = f.store.publish(repeat).await.unwrap();
    assert!(replayed.replayed);
    assert_eq!(replayed.event_id, original.event_id);
    assert_eq!(replayed.deliveries, original.deliveries);
    let deliveries = f
        .store
        .event_deliveries(&app.id, &original.event_id)
        .await
        .unwrap();
    assert_eq!(deliveries.len(), 1, "nothing new was queued");

    // Outside the window the key is free again: a new event.
    let mut later = new_event(&app, "a.b");
    later.idempotency_key = Some("order-1".into());
    later.dedup_since = now_ms() + 60_000;
    let fresh = f.store.publish(later.clone()).await.unwrap();
    assert!(!fresh.replayed);
    assert_eq!(fresh.event_id, later.id);
}

#[tokio::test]
async fn a_repeated_event_id_is_a_repeat_within_the_window_and_refused_after() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    f.webhook(&app, fields("https://example.com/a")).await;
    let mut event = new_event(&app, "a.b");
    event.id = EventId::from("invoice-1001");
    let original = f.store.publish(event.clone()).await.unwrap();
    assert_eq!(original.event_id, event.id);

    let replayed = f.store.publish(event.clone()).await.unwrap();
    assert!(replayed.replayed);
    assert_eq!(replayed.deliveries, original.deliveries);

    event.dedup_since = now_ms() + 60_000;
    match f.store.publish(event).await {
        Err(StoreError::EventIdReused { id }) => assert_eq!(id.as_str(), "invoice-1001"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn concurrent_publishes_of_one_key_queue_once() {
    let f = Fixture::new().await;
    let app = f.app("A").await;
    f.webhook(&app, fields("https://example.com/a")).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut event = new_event(&app, "a.b");
        event.idempotency_key = Some("same".into());
        let store = f.store.clone();
        tasks.push(tokio::spawn(async move { store.publish(event).await }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap().expect("publish").event_id);
    }
    ids.dedup();
    assert_eq!(
        ids.len(),
        1,
        "every publish answers with the one event: {ids:?}"
    );
    let deliveries = f.store.event_deliveries(&app.id, &ids[0]).await.unwrap();
    assert_eq!(deliveries.len(), 1);
}
