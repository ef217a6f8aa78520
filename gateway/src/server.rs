//! Start-up and shutdown: opens the store, settles the admin token, binds
//! the listener, and runs the API and the delivery worker until the
//! shutdown token is cancelled.

use std::net::SocketAddr;
use std::sync::Arc;

use rand::RngCore;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::listener::HttpLimits;
use crate::api::{self, AppState, Limits, token_hash};
use crate::config::{Role, Settings};
use crate::delivery::{RetryPolicy, Sender, Worker, WorkerConfig};
use crate::plugin::{PluginError, PluginHost, Plugins};
use crate::retention::Retention;
use crate::store::{Store, StoreError, StoreOptions, redacted_url};
use crate::telemetry::Metrics;

const ADMIN_TOKEN_HASH_KEY: &str = "admin_token_sha256";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error(transparent)]
    Sender(#[from] crate::delivery::sender::SenderError),
    #[error("plugin host: {0}")]
    Plugins(#[from] PluginError),
}

/// A gateway ready to run: database open, port bound.
pub struct Gateway {
    listener: TcpListener,
    state: AppState,
    worker: Worker,
    retention: Retention,
    role: Role,
    http: HttpLimits,
    /// Set when this start generated the admin token: shown once.
    pub generated_admin_token: Option<String>,
}

impl Gateway {
    pub async fn build(settings: &Settings) -> Result<Self, StartError> {
        settings.validate().map_err(StartError::Config)?;
        let options = StoreOptions {
            pool_size: settings.database_pool_size,
            breaker: settings.breaker_policy(),
        };
        let store = Store::open(&settings.database_url, &options).await?;
        tracing::info!(
            backend = store.backend(),
            database = %redacted_url(&settings.database_url),
            "store open"
        );
        let (admin_token_hash, generated_admin_token) = admin_token(&store, settings).await?;
        let listener =
            listen(settings.listen).map_err(|e| StartError::Listen(settings.listen, e))?;
        let policy = settings.url_policy();
        let wake = Arc::new(Notify::new());
        let host = PluginHost::new(settings.plugin_limits(), settings.plugin_concurrency())?;
        let plugins = Plugins::new(host, store.clone());
        let state = AppState {
            store: store.clone(),
            policy: policy.clone(),
            admin_token_hash: admin_token_hash.into(),
            wake: wake.clone(),
            limits: Limits {
                max_payload_bytes: settings.max_payload_bytes,
                secret_rotation_overlap: settings.secret_rotation_overlap,
                idempotency_window: settings.idempotency_window,
                max_plugin_bytes: settings.plugin_max_upload_bytes,
            },
            plugins: plugins.clone(),
            metrics: Metrics::global(),
        };
        let sender = Sender::new(
            policy.clone(),
            settings.request_timeout,
            settings.worker_concurrency,
        )?;
        let retry = RetryPolicy::new(settings.retry_schedule.clone(), settings.disable_after);
        let worker_config = WorkerConfig {
            concurrency: settings.worker_concurrency,
            batch_size: settings.batch_size,
            lease: settings.lease,
            poll_interval: settings.poll_interval,
            shutdown_grace: settings.shutdown_grace,
            default_max_in_flight: settings.max_in_flight,
            app_share: settings.app_share,
        };
        let retention = Retention {
            store: store.clone(),
            keep: settings.retention,
            interval: settings.retention_interval,
        };
        let worker = Worker {
            store,
            sender,
            policy,
            retry,
            config: worker_config,
            wake,
            plugins,
        };
        Ok(Self {
            listener,
            state,
            worker,
            retention,
            role: settings.role,
            http: HttpLimits {
                header_read_timeout: settings.header_read_timeout,
                max_connections: settings.max_connections as usize,
            },
            generated_admin_token,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled: the API stops accepting, the
    /// worker stops claiming and drains, then the database is closed.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let store = self.state.store.clone();
        // Compiled plugins come back from their stored artifacts in the
        // background; a delivery that needs one first loads it itself.
        tokio::spawn({
            let plugins = self.state.plugins.clone();
            async move { plugins.warm_up().await }
        });
        let delivers = self.role.delivers();
        let worker = delivers.then(|| tokio::spawn(self.worker.run(shutdown.clone())));
        // Processes that deliver also delete old history; API-only ones
        // stay light.
        let retention = delivers.then(|| tokio::spawn(self.retention.run(shutdown.clone())));
        let app = api::router(self.state, self.role.serves_api());
        api::listener::serve(self.listener, app, self.http, shutdown.clone()).await;
        // The worker may still be draining after the API stopped.
        shutdown.cancel();
        for task in [worker, retention].into_iter().flatten() {
            let _ = task.await;
        }
        store.close().await;
        Ok(())
    }
}

/// The admin token's hash: from the configured token, or from the one
/// generated on the first start (whose hash is all that is stored).
async fn admin_token(
    store: &Store,
    settings: &Settings,
) -> Result<(String, Option<String>), StoreError> {
    if let Some(token) = &settings.admin_token {
        return Ok((token_hash(token), None));
    }
    if let Some(hash) = store.setting(ADMIN_TOKEN_HASH_KEY).await? {
        return Ok((hash, None));
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!("wha_{}", hex::encode(bytes));
    let stored = store
        .setting_insert_if_absent(ADMIN_TOKEN_HASH_KEY, &token_hash(&token))
        .await?;
    let generated = (stored == token_hash(&token)).then_some(token);
    Ok((stored, generated))
}

/// Connections the kernel holds for us while the accept loop is busy
/// (capped by `net.core.somaxconn`): tokio's default is 1,024, and a test
/// opening 1,050 connections at once once saw one reset.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restart may bind while the old
    // process's connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
