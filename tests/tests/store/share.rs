//! Fair share between apps: a claim takes no more of an app's deliveries
//! than its room in the worker's slots allows, skips the lanes of an app
//! with none, and leaves those lanes due for a later claim.

use std::collections::HashMap;

use wasmhook::domain::share::{Allotment, FairShare};
use wasmhook::domain::{App, ClaimRequest, ClaimedDelivery, InFlightLimit, SharePercent, Webhook};

use crate::{Fixture, LEASE, fields, filter};

async fn webhook(f: &Fixture, app: &App, name: &str) -> Webhook {
    let mut settings = fields(&format!("https://example.com/{name}"));
    settings.max_in_flight = Some(InFlightLimit::parse(10).unwrap());
    settings.event_types = filter(Some(&[&format!("for.{name}")]));
    let webhook = f.webhook(app, settings).await;
    f.warm(app, &format!("for.{name}")).await;
    webhook
}

async fn queue(f: &Fixture, app: &App, name: &str, n: usize) {
    for _ in 0..n {
        f.publish(app, &format!("for.{name}")).await;
    }
}

async fn claim(f: &Fixture, apps: Allotment) -> Vec<ClaimedDelivery> {
    let request = ClaimRequest {
        limit: 100,
        lease: LEASE,
        default_max_in_flight: InFlightLimit::parse(100).unwrap(),
        apps,
    };
    f.store.claim_due(request).await.expect("claim")
}

fn count(claimed: &[ClaimedDelivery], of: &Webhook) -> usize {
    claimed.iter().filter(|c| c.webhook_id == of.id).count()
}

/// Eight slots, six of them shared between the apps holding some.
fn share() -> FairShare {
    FairShare::new(8, SharePercent::parse(75).unwrap())
}

#[tokio::test]
async fn an_app_at_its_share_is_skipped_and_a_newcomer_is_served() {
    let f = Fixture::new().await;
    let (busy, small) = (f.app("busy").await, f.app("small").await);
    let (a1, a2) = (
        webhook(&f, &busy, "a1").await,
        webhook(&f, &busy, "a2").await,
    );
    let b = webhook(&f, &small, "b").await;
    // The busy app's work is older: by due time alone it would go first.
    queue(&f, &busy, "a1", 5).await;
    queue(&f, &busy, "a2", 5).await;
    queue(&f, &small, "b", 5).await;

    let busy_holds_its_budget = share().allot(&HashMap::from([(busy.id.clone(), 6)]));
    let claimed = claim(&f, busy_holds_its_budget).await;
    assert_eq!(
        (
            count(&claimed, &a1),
            count(&claimed, &a2),
            count(&claimed, &b)
        ),
        (0, 0, 3),
        "the newcomer takes half the budget; the busy app nothing"
    );

    // With four of its slots free, each app may grow to the level that
    // spends the budget with the other counted as it is: the busy app to
    // 3 (the small one holds 3), the small one to 4 (the busy one holds
    // 2). The busy app's room goes to its oldest lane.
    let allotment = share().allot(&HashMap::from([
        (busy.id.clone(), 2),
        (small.id.clone(), 3),
    ]));
    assert_eq!(allotment.room(&busy.id), Some(1));
    assert_eq!(allotment.room(&small.id), Some(1));
    let claimed = claim(&f, allotment).await;
    assert_eq!(
        (
            count(&claimed, &a1),
            count(&claimed, &a2),
            count(&claimed, &b)
        ),
        (1, 0, 1)
    );

    // Nothing skipped was lost: the lanes stayed due.
    let rest = claim(&f, Allotment::unlimited()).await;
    assert_eq!(
        (count(&rest, &a1) + count(&rest, &a2), count(&rest, &b)),
        (9, 1)
    );
}

#[tokio::test]
async fn an_apps_room_is_shared_between_its_lanes_oldest_first() {
    let f = Fixture::new().await;
    let busy = f.app("busy").await;
    let (a1, a2) = (
        webhook(&f, &busy, "a1").await,
        webhook(&f, &busy, "a2").await,
    );
    queue(&f, &busy, "a1", 5).await;
    queue(&f, &busy, "a2", 5).await;
    let allotment = share().allot(&HashMap::from([(busy.id.clone(), 1)]));
    assert_eq!(allotment.room(&busy.id), Some(5));
    let claimed = claim(&f, allotment).await;
    assert_eq!((count(&claimed, &a1), count(&claimed, &a2)), (3, 2));
}
