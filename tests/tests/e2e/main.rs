//! End-to-end tests: the real gateway binary, real receivers on 127.0.0.1,
//! a fresh SQLite file per test, signatures checked with the
//! `standardwebhooks` crate.

mod api;
mod delivery;
mod restart;
mod retries;
mod url_safety;

use std::time::Duration;

use serde_json::{Value, json};
use wasmhook_tests::{Receiver, TestGateway, spawn_app};

/// Long enough for any single delivery on a loaded CI machine.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A gateway with one app and a receiver; the common start of a test.
pub struct World {
    pub gateway: TestGateway,
    pub app: String,
    pub receiver: Receiver,
}

impl World {
    pub async fn new() -> Self {
        Self::with(spawn_app().await).await
    }

    pub async fn with(gateway: TestGateway) -> Self {
        let app = gateway.create_app("Acme").await;
        let receiver = Receiver::start().await;
        Self {
            gateway,
            app,
            receiver,
        }
    }

    /// Registers a webhook to the receiver at `path`; returns (id, secret).
    pub async fn webhook(&self, path: &str, extra: Value) -> (String, String) {
        let mut body = json!({ "url": self.receiver.url(path) });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let created = self.gateway.create_webhook(&self.app, body).await;
        (
            created["id"].as_str().unwrap().to_owned(),
            created["secret"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn publish(&self, event_type: &str, payload: Value) -> Value {
        self.gateway.publish(&self.app, event_type, payload).await
    }

    pub fn path(&self, rest: &str) -> String {
        format!("/v1/apps/{}{rest}", self.app)
    }
}
