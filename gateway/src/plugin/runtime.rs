//! Plugins in service: makes a stored plugin ready (from the in-memory
//! cache, its stored artifact, or by compiling) and runs it for a delivery.

use super::host::{PluginHost, Ready};
use super::{Invocation, PluginError, PluginEvent};
use crate::clock::rfc3339;
use crate::domain::{ClaimedDelivery, PageRequest, PluginId};
use crate::store::Store;

#[derive(Clone)]
pub struct Plugins {
    pub host: PluginHost,
    store: Store,
}

impl Plugins {
    pub fn new(host: PluginHost, store: Store) -> Self {
        Self { host, store }
    }

    /// The plugin with this id and code hash, ready to run.
    pub async fn ready(&self, plugin_id: &PluginId, sha256: &str) -> Result<Ready, PluginError> {
        if let Some(ready) = self.host.cached(sha256) {
            crate::telemetry::plugin_cache(true);
            return Ok(ready);
        }
        crate::telemetry::plugin_cache(false);
        let code = self
            .store
            .plugin_code(plugin_id)
            .await
            .map_err(|e| PluginError::Unavailable(e.to_string()))?
            .ok_or_else(|| PluginError::Unavailable(format!("plugin {plugin_id} was deleted")))?;
        let host = self.host.clone();
        let (ready, recompiled) = tokio::task::spawn_blocking(move || {
            let artifact = code.artifact.as_deref().zip(code.artifact_key.as_deref());
            host.load(&code.sha256, &code.wasm, artifact)
        })
        .await
        .map_err(|e| PluginError::Unavailable(e.to_string()))??;
        if let Some(compiled) = recompiled
            && let Err(error) = self
                .store
                .set_plugin_artifact(sha256, compiled.artifact, &compiled.artifact_key)
                .await
        {
            tracing::warn!(%error, "could not store a recompiled plugin artifact");
        }
        Ok(ready)
    }

    /// Compiles a new upload with the optimising compiler off the request
    /// path; its code then replaces the quick tier's in the cache and is
    /// stored as the artifact. If this is lost (a crash), the next start
    /// compiles the plugin again.
    pub fn optimize_in_background(&self, sha256: String, wasm: Vec<u8>) {
        let plugins = self.clone();
        tokio::spawn(async move {
            let host = plugins.host.clone();
            let hash = sha256.clone();
            let compiled = tokio::task::spawn_blocking(move || host.compile(&wasm, &hash)).await;
            let compiled = match compiled {
                Ok(Ok(compiled)) => compiled,
                Ok(Err(error)) => {
                    tracing::error!(%sha256, %error, "optimising compile of a plugin failed");
                    return;
                }
                Err(error) => {
                    tracing::error!(%sha256, %error, "optimising compile of a plugin panicked");
                    return;
                }
            };
            if let Err(error) = plugins
                .store
                .set_plugin_artifact(&sha256, compiled.artifact, &compiled.artifact_key)
                .await
            {
                tracing::warn!(%sha256, %error, "could not store a plugin artifact");
            }
        });
    }

    /// Loads every stored plugin, so the first deliveries after a start
    /// find them ready.
    pub async fn warm_up(&self) {
        let page = PageRequest {
            cursor: None,
            limit: 10_000,
        };
        let Ok(plugins) = self.store.list_plugins(&page).await else {
            return;
        };
        for plugin in plugins {
            if let Err(error) = self.ready(&plugin.id, &plugin.sha256).await {
                tracing::warn!(plugin = %plugin.id, %error, "plugin could not be made ready");
            }
        }
    }

    /// Runs the delivery's plugin, if it has one.
    pub async fn transform(&self, delivery: &ClaimedDelivery) -> Option<Invocation> {
        let plugin = delivery.plugin.as_ref()?;
        let event = PluginEvent {
            id: delivery.event_id.to_string(),
            event_type: delivery.event_type.clone(),
            app_id: delivery.app_id.to_string(),
            app_uid: delivery.app_uid.clone(),
            webhook_id: delivery.webhook_id.to_string(),
            attempt: u32::try_from(delivery.attempts + 1).unwrap_or(u32::MAX),
            timestamp: rfc3339(delivery.event_created_at),
            payload: delivery.payload.clone(),
        };
        let ready = match self.ready(&plugin.id, &plugin.sha256).await {
            Ok(ready) => ready,
            Err(error) => {
                return Some(Invocation {
                    result: Err(error),
                    logs: Vec::new(),
                    duration: std::time::Duration::ZERO,
                });
            }
        };
        let tenant = delivery.webhook_id.as_str();
        Some(
            self.host
                .run(&ready, event, plugin.config.clone(), tenant)
                .await,
        )
    }
}
