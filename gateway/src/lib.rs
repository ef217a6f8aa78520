//! wasmhook: a self-hosted webhook gateway.
//!
//! Publishers register webhooks and publish events over the REST API
//! ([`api`]); each accepted event is stored with one delivery per subscribed
//! webhook ([`store`]); workers send the deliveries, signed per Standard
//! Webhooks ([`signing`]), to targets that passed the URL-safety checks
//! ([`url_safety`]), retrying with backoff ([`delivery`]). [`server`] wires
//! these together and runs them until shutdown; [`telemetry`] reports
//! what happens as logs and metrics, and [`retention`] deletes old
//! history. The records all of them exchange live in [`domain`], the
//! stored time and its text in [`clock`].

pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod plugin;
pub mod retention;
pub mod server;
pub mod signing;
pub mod store;
pub mod telemetry;
pub mod url_safety;
