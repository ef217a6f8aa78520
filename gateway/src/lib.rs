//! wasmhook: a self-hosted webhook gateway.
//!
//! Publishers register webhooks and publish events over the REST API
//! ([`api`]); each accepted event is stored with one delivery per subscribed
//! webhook ([`store`]); workers send the deliveries, signed per Standard
//! Webhooks ([`signing`]), to targets that passed the URL-safety checks
//! ([`url_safety`]), retrying with backoff ([`delivery`]). [`server`] wires
//! these together and runs them until shutdown.

pub mod api;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod plugin;
pub mod server;
pub mod signing;
pub mod store;
pub mod url_safety;
