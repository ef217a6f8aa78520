//! The store's contract, one suite for both backends: every test drives
//! [`Store`] directly, on a fresh database of the backend the run picks
//! (a SQLite file, or a new PostgreSQL database on the server
//! `WASMHOOK_TEST_POSTGRES_URL` names). `scripts/test` runs it once each
//! way, so SQLite and PostgreSQL keep the same promises.

mod events;
mod lanes;
mod ordering;
mod queue;
mod rates;
mod records;
mod share;
mod wakes;
mod worker;

use std::time::Duration;

use wasmhook::clock::now_ms;
use wasmhook::domain::lane::BreakerPolicy;
use wasmhook::domain::share::Allotment;
use wasmhook::domain::{
    App, AttachedPlugin, AttemptOutcome, AttemptRecord, AttemptRow, ClaimRequest, ClaimedDelivery,
    CustomHeaders, Delivery, EventId, EventType, EventTypeFilter, InFlightLimit, NewEvent,
    NextState, PageRequest, Published, Webhook, WebhookEffect, WebhookFields,
};
use wasmhook::store::{Store, StoreOptions};
use wasmhook_tests::Workspace;

/// A store on a fresh database; the workspace keeps its files alive.
pub struct Fixture {
    pub store: Store,
    pub workspace: Workspace,
}

impl Fixture {
    pub async fn new() -> Self {
        Self::with_breaker(BreakerPolicy::default()).await
    }

    /// A store whose lanes' breakers open as `breaker` says.
    pub async fn with_breaker(breaker: BreakerPolicy) -> Self {
        let workspace = Workspace::fresh().await;
        let options = StoreOptions {
            pool_size: 4,
            breaker,
        };
        let store = Store::open(&workspace.database_url, &options)
            .await
            .expect("store opens");
        Self { store, workspace }
    }

    pub async fn app(&self, name: &str) -> App {
        self.store.create_app(name, None).await.expect("app")
    }

    pub async fn webhook(&self, app: &App, fields: WebhookFields) -> Webhook {
        self.store
            .create_webhook(&app.id, &fields, SECRET)
            .await
            .expect("webhook")
    }

    /// The one delivery a publish queued.
    pub async fn only_delivery(&self, app: &App, published: &Published) -> Delivery {
        let mut deliveries = self
            .store
            .event_deliveries(&app.id, &published.event_id)
            .await
            .expect("deliveries");
        assert_eq!(deliveries.len(), 1, "one webhook, one delivery");
        deliveries.remove(0)
    }

    /// Claims up to `limit` for the usual lease; webhooks without a limit
    /// of their own allow 100 in flight.
    pub async fn claim(&self, limit: u32) -> Vec<ClaimedDelivery> {
        self.claim_leased(limit, LEASE).await
    }

    pub async fn claim_leased(&self, limit: u32, lease: Duration) -> Vec<ClaimedDelivery> {
        let request = ClaimRequest {
            limit,
            lease,
            default_max_in_flight: InFlightLimit::parse(100).expect("limit"),
            apps: Allotment::unlimited(),
        };
        self.store.claim_due(request).await.expect("claim")
    }

    /// Gives the webhooks of `app` subscribed to `event_type` a streak
    /// of successes, so their lanes take their whole in-flight limit at
    /// once rather than starting with two (see `domain::lane`). Runs
    /// before anything else is queued: it records whatever it claims.
    pub async fn warm(&self, app: &App, event_type: &str) {
        for _ in 0..WARM_UP {
            self.publish(app, event_type).await;
        }
        loop {
            let claimed = self.claim(100).await;
            if claimed.is_empty() {
                return;
            }
            let records = claimed.iter().map(succeeded).collect();
            self.store
                .record_attempts(std::sync::Arc::new(records))
                .await
                .expect("record");
        }
    }

    pub async fn publish(&self, app: &App, event_type: &str) -> Published {
        self.store
            .publish(new_event(app, event_type))
            .await
            .expect("publish")
    }
}

/// Deliveries [`Fixture::warm`] makes and records.
pub const WARM_UP: usize = 6;
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const LEASE: Duration = Duration::from_secs(30);

/// A successful attempt of `claimed`.
pub fn succeeded(claimed: &ClaimedDelivery) -> AttemptRecord {
    AttemptRecord {
        delivery_id: claimed.id.clone(),
        claim_token: claimed.claim_token.clone(),
        webhook_id: claimed.webhook_id.clone(),
        attempt: Some(AttemptRow {
            number: 1,
            started_at: now_ms(),
            duration_ms: 1,
            outcome: AttemptOutcome::Success,
            status_code: Some(200),
            response_body: None,
            error: None,
            plugin_error: None,
        }),
        next: NextState::Succeeded,
        webhook: WebhookEffect::Healthy,
        throttled_until: None,
        ordering_key: claimed.ordering_key.clone(),
        now: now_ms(),
    }
}

/// Webhook fields for `url`, subscribed to everything.
pub fn fields(url: &str) -> WebhookFields {
    WebhookFields {
        url: url.to_owned(),
        description: String::new(),
        event_types: filter(None),
        enabled: true,
        headers: CustomHeaders::default(),
        raw_payload: false,
        max_in_flight: None,
        rate_limit: None,
        retry_schedule: None,
        plugin: None,
    }
}

pub fn filter(items: Option<&[&str]>) -> EventTypeFilter {
    let items: Option<Vec<String>> = items.map(|i| i.iter().map(|s| s.to_string()).collect());
    EventTypeFilter::parse(items.as_deref()).expect("filter")
}

/// An event with a fresh id, no idempotency key, a window of a minute.
pub fn new_event(app: &App, event_type: &str) -> NewEvent {
    NewEvent {
        app_id: app.id.clone(),
        id: EventId::new(),
        event_type: EventType::parse(event_type).expect("event type"),
        payload: r#"{"amount":4200}"#.into(),
        idempotency_key: None,
        ordering_key: None,
        dedup_since: now_ms() - 60_000,
    }
}

pub fn page(cursor: Option<String>, limit: u32) -> PageRequest {
    PageRequest { cursor, limit }
}

pub fn attached(id: &wasmhook::domain::PluginId, config: &str) -> AttachedPlugin {
    AttachedPlugin {
        id: id.clone(),
        config: config.to_owned(),
    }
}
