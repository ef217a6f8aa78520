//! One tenant cannot take the others' share of the workers: beside
//! another app's endpoint that hangs (every request runs into the
//! timeout) or fails at once, with a backlog of 1,000 deliveries queued
//! for it, or beside another app's plugin that runs into its deadline on
//! every invocation (200 queued), a healthy webhook keeps its delivery
//! rate, measured as the median of three rounds' ratios, each round a
//! run alone and a run beside the neighbour on fresh gateways, in
//! alternating order (see `neighbour::rounds`). Without per-webhook lanes
//! the hanging endpoint held every slot and the ratio was 0.01; without
//! pacing, the failing endpoint cut it to 0.65. Those two causes are also
//! asserted where a shared machine's load cannot move them much: how many
//! of the neighbour's requests were in flight at once, and how many it got.
//! Beside another app with 200 endpoints that each answer after a second
//! and 4,000 deliveries queued for them, the busy app held every slot
//! and the ratio was 0.00; with the slots shared between apps it keeps
//! three quarters of them at most, and the rest serves the other app.

use wasmhook_tests::GatewayBuilder;
use wasmhook_tests::neighbour::{self, Neighbour, Round, median};

/// Healthy deliveries per run.
const RUN: usize = 400;

/// Alone on this machine each measures 0.9-1.0 with the release build
/// (the target is 0.9; `wasmhook-bench --neighbour` measures it);
/// the suite runs a debug build beside other tests, whose load moves
/// single runs by ±30%, so the bar here only catches a collapse; the
/// structural assertions below catch the known causes of one.
const BAR: f64 = 0.5;

async fn rounds_beside(neighbour: Neighbour) -> Vec<Round> {
    let builder = || GatewayBuilder::default().env("WASMHOOK_LOG", "info");
    let rounds = neighbour::rounds(builder, neighbour, RUN, 3).await;
    let ratio = median(rounds.iter().map(Round::ratio).collect());
    assert!(
        ratio >= BAR,
        "the healthy webhook kept {ratio:.2} of its rate"
    );
    rounds
}

#[tokio::test]
async fn a_hanging_endpoint_does_not_slow_another_apps_endpoint() {
    for round in rounds_beside(Neighbour::Hang).await {
        // Its lane lets 2 attempts be in flight at once (a timeout only
        // lowers that); the receiver still counts an attempt the gateway
        // gave up on at its 2 s timeout until it notices the closed
        // connection, so a run of a few seconds may show a few more.
        // Without lanes it held every one of the 128 slots.
        assert!(round.noisy_at_once <= 8, "{round:?}");
        assert!(round.noisy_requests >= 1, "{round:?}");
    }
}

#[tokio::test]
async fn an_endpoint_that_fails_at_once_does_not_slow_another_apps_endpoint() {
    for round in rounds_beside(Neighbour::Fail).await {
        // Paced, a lane that fails at once is tried a few times a second;
        // unpaced, it would run through its backlog of 1,000 during the
        // run.
        assert!(round.noisy_requests < 250, "{round:?}");
        assert!(round.noisy_requests >= 5, "{round:?}");
    }
}

#[tokio::test]
async fn an_endpoint_that_throttles_does_not_slow_another_apps_endpoint() {
    for round in rounds_beside(Neighbour::Throttle).await {
        // Each 429 holds its lane for the 2 s it asks, and the lane starts
        // again at two in flight: a run of a few seconds sees a few pairs.
        // Unheld, its backlog of 1,000 would go through during the run.
        assert!(round.noisy_requests <= 12, "{round:?}");
        assert!(round.noisy_requests >= 1, "{round:?}");
    }
}

#[tokio::test]
async fn a_runaway_plugin_does_not_slow_another_apps_plugin() {
    for round in rounds_beside(Neighbour::Plugin).await {
        // A plugin that fails leaks nothing to the endpoint.
        assert_eq!(round.noisy_requests, 0, "{round:?}");
    }
}

#[tokio::test]
async fn an_app_with_hundreds_of_slow_endpoints_does_not_slow_another_app() {
    for round in rounds_beside(Neighbour::BusyApp).await {
        // The busy app may hold the apps' share of the 128 slots (75%),
        // never all of them; its 200 lanes could take every one.
        assert!(round.noisy_at_once <= 96, "{round:?}");
        assert!(round.noisy_at_once >= 48, "{round:?}");
    }
}
