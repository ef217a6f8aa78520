//! The worker's single step, driven directly: claim a batch, make every
//! attempt against a real receiver on 127.0.0.1, record the results.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use wasmhook::delivery::{ExecutionOutcome, RetryPolicy, Sender, Worker, WorkerConfig};
use wasmhook::domain::{AttemptOutcome, DeliveryStatus, InFlightLimit, NewPlugin, SharePercent};
use wasmhook::plugin::{PluginHost, PluginLimits, Plugins};
use wasmhook::url_safety::UrlPolicy;
use wasmhook_tests::{Receiver, Reply, plugin_wasm, verify_signature};

use crate::{Fixture, SECRET, attached, fields};

fn worker(f: &Fixture) -> Arc<Worker> {
    let loopback = "127.0.0.0/8".parse().expect("cidr");
    let policy = UrlPolicy::new(true, vec![loopback]);
    let host = PluginHost::new(PluginLimits::default(), 2).expect("plugin host");
    Arc::new(Worker {
        store: f.store.clone(),
        sender: Sender::new(policy.clone(), Duration::from_secs(5), 4).expect("sender"),
        policy,
        retry: RetryPolicy::new(vec![Duration::from_secs(1)], Duration::from_secs(3600)),
        config: WorkerConfig {
            concurrency: 8,
            batch_size: 8,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(1),
            default_max_in_flight: InFlightLimit::parse(8).expect("limit"),
            app_share: SharePercent::parse(75).expect("share"),
        },
        wake: Arc::new(Notify::new()),
        plugins: Plugins::new(host, f.store.clone()),
    })
}

#[tokio::test]
async fn a_step_on_an_empty_queue_does_nothing() {
    let f = Fixture::new().await;
    let outcome = worker(&f).try_execute_batch().await.unwrap();
    assert_eq!(outcome, ExecutionOutcome::EmptyQueue);
}

#[tokio::test]
async fn a_step_sends_signed_deliveries_and_records_every_result() {
    let f = Fixture::new().await;
    let receiver = Receiver::start().await;
    receiver.script([Reply::status(500)]);
    let app = f.app("A").await;
    f.webhook(&app, fields(&receiver.url("/hooks"))).await;
    f.warm(&app, "invoice.paid").await;
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(f.publish(&app, "invoice.paid").await);
    }
    let worker = worker(&f);
    let outcome = worker.try_execute_batch().await.unwrap();
    assert_eq!(outcome, ExecutionOutcome::BatchCompleted { deliveries: 3 });
    let got = receiver.received();
    assert_eq!(
        got.len(),
        3,
        "every claimed delivery was sent before the step returned"
    );
    for request in &got {
        verify_signature(SECRET, request).expect("signed");
    }

    let mut statuses = Vec::new();
    for event in &events {
        let delivery = f.only_delivery(&app, event).await;
        assert_eq!(delivery.attempts, 1);
        statuses.push(delivery.status);
    }
    statuses.sort_by_key(|s| s.as_str());
    assert_eq!(
        statuses,
        [
            DeliveryStatus::Failed,
            DeliveryStatus::Succeeded,
            DeliveryStatus::Succeeded
        ]
    );

    // The failed one is due again after its backoff (1 s, ±10%).
    assert_eq!(
        worker.try_execute_batch().await.unwrap(),
        ExecutionOutcome::EmptyQueue
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let retried = worker.try_execute_batch().await.unwrap();
    assert_eq!(retried, ExecutionOutcome::BatchCompleted { deliveries: 1 });
    for event in &events {
        let delivery = f.only_delivery(&app, event).await;
        assert_eq!(delivery.status, DeliveryStatus::Succeeded);
        let attempts = f.store.attempts(&delivery.id).await.unwrap();
        assert_eq!(
            attempts.last().map(|a| a.outcome),
            Some(AttemptOutcome::Success)
        );
    }
    assert_eq!(receiver.count(), 4);
}

#[tokio::test]
async fn a_step_runs_the_webhooks_plugin_before_sending() {
    let f = Fixture::new().await;
    let receiver = Receiver::start().await;
    let app = f.app("A").await;
    let upload = NewPlugin {
        name: "passthrough".into(),
        version: "1".into(),
        sha256: "passthrough-under-test".into(),
        wasm: plugin_wasm("passthrough"),
    };
    let (plugin, _) = f.store.create_plugin(upload).await.unwrap();
    let mut settings = fields(&receiver.url("/raw"));
    settings.plugin = Some(attached(&plugin.id, "null"));
    f.webhook(&app, settings).await;
    f.publish(&app, "invoice.paid").await;

    let outcome = worker(&f).try_execute_batch().await.unwrap();
    assert_eq!(outcome, ExecutionOutcome::BatchCompleted { deliveries: 1 });
    let got = receiver.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        &got[0].body[..],
        br#"{"amount":4200}"#,
        "the payload as published, not the envelope"
    );
    verify_signature(SECRET, &got[0]).expect("signed after the transform");
}
