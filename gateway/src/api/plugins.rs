//! The plugin registry (admin only): upload, list, show, delete, and the
//! playground that runs a plugin on a sample event.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ApiResult, OrNotFound};
use super::extract::{Admin, ApiJson, ApiPath, ApiQuery, ListQuery, Page};
use super::openapi::ErrorResponses;
use crate::clock::{now_ms, rfc3339};
use crate::domain::{EventType, NewPlugin, Plugin, PluginId, Upload};
use crate::plugin::{Decision, Delivered, PluginEvent};

const MAX_NAME_LEN: usize = 64;

#[derive(Debug, Serialize, ToSchema)]
pub struct PluginView {
    id: String,
    name: String,
    version: String,
    sha256: String,
    size: i64,
    created_at: String,
}

impl From<Plugin> for PluginView {
    fn from(p: Plugin) -> Self {
        Self {
            id: p.id.into(),
            name: p.name,
            version: p.version,
            sha256: p.sha256,
            size: p.size,
            created_at: rfc3339(p.created_at),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// Letters, digits, `-`, `_`, `.`, `+`; at most 64.
    #[param(pattern = r"^[A-Za-z0-9_.+\-]{1,64}$")]
    name: String,
    /// Same characters as the name; name and version are immutable.
    #[param(pattern = r"^[A-Za-z0-9_.+\-]{1,64}$")]
    version: String,
}

/// The raw bytes of a component (`application/wasm`).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct WasmComponent(Vec<u8>);

/// The playground's answer; which fields are present depends on `outcome`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PlaygroundAnswer {
    /// `deliver`, `skip` or `error`.
    outcome: String,
    /// `deliver`: the body (JSON when it parses, else text, else `{base64}`).
    body: Option<Value>,
    /// `deliver`: the content type sent.
    content_type: Option<String>,
    /// `deliver`: the headers the plugin added.
    headers: Option<std::collections::BTreeMap<String, String>>,
    /// `skip`: why.
    reason: Option<String>,
    /// `error`: `{kind, message}`; kind is timeout, memory_limit,
    /// stack_overflow, trap, invalid_output, plugin_error or unavailable.
    error: Option<Value>,
    logs: Vec<crate::plugin::LogLine>,
    duration_us: u64,
}

fn check_label(field: &'static str, value: &str) -> ApiResult<()> {
    let valid = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'));
    if value.is_empty() || value.len() > MAX_NAME_LEN || !valid {
        return Err(ApiError::invalid(
            field,
            format!("must be 1 to {MAX_NAME_LEN} letters, digits, or - _ . +"),
        ));
    }
    Ok(())
}

/// Uploads a component (`application/wasm` body). It is checked and
/// compiled (quick tier) before it is stored, so a stored plugin always
/// runs; the optimised code follows in the background.
#[utoipa::path(
    post,
    path = "/plugins",
    tag = "plugins",
    params(UploadQuery),
    request_body(content = WasmComponent, content_type = "application/wasm", description = "A WebAssembly component of the wasmhook:plugin/transform world"),
    responses((status = 201, description = "Checked, stored, and ready to run", body = PluginView), (status = 200, description = "The same bytes were uploaded under this name and version before", body = PluginView), ErrorResponses)
)]
pub async fn upload(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(query): ApiQuery<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<PluginView>)> {
    check_label("name", &query.name)?;
    check_label("version", &query.version)?;
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.is_empty()
        && !["application/wasm", "application/octet-stream"].contains(&content_type)
    {
        return Err(ApiError::unsupported_media_type(
            "send the component as application/wasm",
        ));
    }
    let wasm = read_limited(body, state.limits.max_plugin_bytes).await?;
    if wasm.is_empty() {
        return Err(ApiError::invalid(
            "body",
            "is empty; send the component's bytes",
        ));
    }
    let sha256 = hex::encode(Sha256::digest(&wasm));
    let host = state.plugins.host.clone();
    let (bytes, hash) = (wasm.clone(), sha256.clone());
    tokio::task::spawn_blocking(move || host.compile_quick(&bytes, &hash))
        .await
        .map_err(|e| ApiError::unavailable(format!("compilation failed to run: {e}")))?
        .map_err(|e| ApiError::invalid_plugin(e.to_string()))?;
    let new = NewPlugin {
        name: query.name,
        version: query.version,
        sha256,
        wasm,
    };
    let wasm = new.wasm.clone();
    let (plugin, upload) = state.store.create_plugin(new).await?;
    let status = match upload {
        Upload::Created => {
            state
                .plugins
                .optimize_in_background(plugin.sha256.clone(), wasm);
            StatusCode::CREATED
        }
        Upload::AlreadyStored => StatusCode::OK,
    };
    Ok((status, Json(plugin.into())))
}

/// Reads an upload up to `limit` bytes. An oversized one is still read
/// (up to four times the limit) before the 413, so the client sees the
/// answer instead of a connection reset mid-upload.
async fn read_limited(body: Body, limit: usize) -> ApiResult<Vec<u8>> {
    let mut chunks = body.into_data_stream();
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = chunks.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::invalid("body", format!("could not be read: {e}")))?;
        seen += chunk.len();
        if seen <= limit {
            kept.extend_from_slice(&chunk);
        } else if seen > limit.saturating_mul(4) {
            break;
        }
    }
    if seen > limit {
        return Err(ApiError::too_large("body", limit));
    }
    Ok(kept)
}

#[utoipa::path(
    get,
    path = "/plugins",
    tag = "plugins",
    params(ListQuery),
    responses((status = 200, description = "A page of plugins", body = Page<PluginView>), ErrorResponses)
)]
pub async fn list(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<Page<PluginView>>> {
    let page = query.page()?;
    let plugins = state.store.list_plugins(&page).await?;
    Ok(Json(Page::new(
        plugins,
        &page,
        |p| p.id.to_string(),
        PluginView::from,
    )))
}

async fn find(state: &AppState, id: &PluginId) -> ApiResult<Plugin> {
    state
        .store
        .plugin(id)
        .await?
        .ok_or_else(|| ApiError::not_found("plugin", id))
}

#[utoipa::path(
    get,
    path = "/plugins/{id}",
    tag = "plugins",
    params(("id" = String, Path, description = "Plugin id")),
    responses((status = 200, description = "The plugin", body = PluginView), ErrorResponses)
)]
pub async fn show(
    State(state): State<AppState>,
    _admin: Admin,
    ApiPath(id): ApiPath<PluginId>,
) -> ApiResult<Json<PluginView>> {
    Ok(Json(find(&state, &id).await?.into()))
}

#[utoipa::path(
    delete,
    path = "/plugins/{id}",
    tag = "plugins",
    params(("id" = String, Path, description = "Plugin id")),
    responses((status = 204, description = "Deleted (refused with 409 while a webhook uses it)"), ErrorResponses)
)]
pub async fn remove(
    State(state): State<AppState>,
    _admin: Admin,
    ApiPath(id): ApiPath<PluginId>,
) -> ApiResult<StatusCode> {
    state
        .store
        .delete_plugin(&id)
        .await
        .or_not_found("plugin", &id)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestRequest {
    #[schema(pattern = r"^[A-Za-z0-9._:/\-]{1,256}$")]
    event_type: String,
    #[schema(value_type = Value)]
    payload: Box<RawValue>,
    #[serde(default)]
    config: Option<Value>,
}

/// The playground: runs the plugin on a sample event exactly as a delivery
/// would, and answers with the outcome, the plugin's log and the time.
#[utoipa::path(
    post,
    path = "/plugins/{id}/test",
    tag = "plugins",
    params(("id" = String, Path, description = "Plugin id")),
    request_body = TestRequest,
    responses((status = 200, description = "What a delivery would see: the outcome, the plugin's log and the time", body = PlaygroundAnswer), ErrorResponses)
)]
pub async fn test(
    State(state): State<AppState>,
    _admin: Admin,
    ApiPath(id): ApiPath<PluginId>,
    ApiJson(body): ApiJson<TestRequest>,
) -> ApiResult<Json<Value>> {
    let plugin = find(&state, &id).await?;
    let event_type =
        EventType::parse(&body.event_type).map_err(|e| ApiError::invalid("event_type", e))?;
    let config = body.config.unwrap_or(Value::Null).to_string();
    let ready = state
        .plugins
        .ready(&plugin.id, &plugin.sha256)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let event = PluginEvent {
        id: "msg_playground".into(),
        event_type: event_type.as_str().to_owned(),
        app_id: "app_playground".into(),
        app_uid: None,
        webhook_id: "wh_playground".into(),
        attempt: 1,
        timestamp: rfc3339(now_ms()),
        payload: body.payload.get().to_owned(),
    };
    // Every playground run shares one tenant's slots: trying plugins out
    // never takes the deliveries' share.
    let invocation = state
        .plugins
        .host
        .run(&ready, event, config, "playground")
        .await;
    let mut answer = match invocation.result {
        Ok(Decision::Skip(reason)) => json!({ "outcome": "skip", "reason": reason }),
        Ok(Decision::Deliver(Delivered {
            body,
            content_type,
            headers,
        })) => {
            let headers: serde_json::Map<String, Value> = headers
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            json!({
                "outcome": "deliver",
                "content_type": content_type,
                "headers": headers,
                "body": body_for_display(&body),
            })
        }
        Err(error) => {
            json!({ "outcome": "error", "error": { "kind": error.kind(), "message": error.to_string() } })
        }
    };
    answer["logs"] = serde_json::to_value(&invocation.logs).unwrap_or_default();
    answer["duration_us"] = (invocation.duration.as_micros() as u64).into();
    Ok(Json(answer))
}

/// JSON bodies as JSON, text as text, anything else as base64.
fn body_for_display(body: &[u8]) -> Value {
    if let Ok(json) = serde_json::from_slice::<Value>(body) {
        return json;
    }
    match std::str::from_utf8(body) {
        Ok(text) => Value::String(text.to_owned()),
        Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(body) }),
    }
}
