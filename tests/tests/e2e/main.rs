//! End-to-end tests: the real gateway binary, real receivers on 127.0.0.1,
//! a fresh SQLite file per test, signatures checked with the
//! `standardwebhooks` crate.

mod api;
mod cli;
mod clients;
mod delivery;
mod fairness;
mod faults;
mod openapi;
mod operations;
mod ordering;
mod plugins;
mod receivers;
mod recovery;
mod restart;
mod retries;
mod scale_out;
mod traffic;
mod url_safety;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};
use wasmhook_tests::{Received, Receiver, TestGateway, spawn_app, verify_signature};

/// Long enough for any single delivery on a loaded CI machine: a test
/// that passes never waits it out, so it errs on the long side.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A gateway with one app and a receiver; the common start of a test.
/// It remembers each webhook's secret by receiver path, so every delivery
/// a test waits for is signature-checked.
pub struct World {
    pub gateway: TestGateway,
    pub app: String,
    pub receiver: Receiver,
    secrets: Mutex<HashMap<String, String>>,
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
            secrets: Mutex::default(),
        }
    }

    /// The same world after a restart of the gateway on its database.
    pub async fn restarted(self) -> Self {
        Self {
            gateway: self.gateway.restart().await,
            ..self
        }
    }

    /// The secret deliveries to `path` are signed with from now on.
    pub fn remember_secret(&self, path: &str, secret: &str) {
        self.secrets
            .lock()
            .unwrap()
            .insert(path.to_owned(), secret.to_owned());
    }

    /// Waits for `n` deliveries and checks every signature with the
    /// `standardwebhooks` crate.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let received = self.receiver.wait_for(n, timeout).await;
        let secrets = self.secrets.lock().unwrap();
        for request in &received {
            let secret = secrets
                .get(&request.path)
                .expect("a webhook registered for this path");
            verify_signature(secret, request).unwrap_or_else(|e| panic!("{}: {e}", request.path));
        }
        received
    }

    /// Registers a webhook to the receiver at `path`; returns (id, secret).
    pub async fn webhook(&self, path: &str, extra: Value) -> (String, String) {
        let mut body = json!({ "url": self.receiver.url(path) });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let created = self.gateway.create_webhook(&self.app, body).await;
        let secret = created["secret"].as_str().unwrap().to_owned();
        self.remember_secret(path, &secret);
        (created["id"].as_str().unwrap().to_owned(), secret)
    }

    pub async fn publish(&self, event_type: &str, payload: Value) -> Value {
        self.gateway.publish(&self.app, event_type, payload).await
    }

    pub fn path(&self, rest: &str) -> String {
        format!("/v1/apps/{}{rest}", self.app)
    }

    /// `n` worker-only processes on the world's database.
    pub async fn workers(&self, n: usize) -> Vec<TestGateway> {
        let mut workers = Vec::new();
        for _ in 0..n {
            let worker = self
                .gateway
                .another(|b| b.env("WASMHOOK_ROLE", "worker"))
                .await;
            workers.push(worker);
        }
        workers
    }
}

/// Stops a test that needs PostgreSQL, saying how to give it one.
pub fn require_postgres() {
    assert!(
        std::env::var(wasmhook_tests::TEST_POSTGRES_URL).is_ok_and(|url| !url.is_empty()),
        "needs PostgreSQL: set {} or run scripts/test",
        wasmhook_tests::TEST_POSTGRES_URL
    );
}
