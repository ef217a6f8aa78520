//! Apps (tenants) and their API keys.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ApiResult, OrNotFound};
use super::extract::{
    Admin, ApiJson, ApiPath, ApiQuery, Caller, ListQuery, Page, double_option, token_hash,
};
use super::openapi::ErrorResponses;
use crate::clock::rfc3339;
use crate::domain::{App, KeyId};

const MAX_NAME_LEN: usize = 256;

#[derive(Debug, Serialize, ToSchema)]
pub struct AppView {
    id: String,
    uid: Option<String>,
    name: String,
    created_at: String,
    updated_at: String,
}

impl From<App> for AppView {
    fn from(app: App) -> Self {
        Self {
            id: app.id.into(),
            uid: app.uid,
            name: app.name,
            created_at: rfc3339(app.created_at),
            updated_at: rfc3339(app.updated_at),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    /// A label for people (not blank).
    #[schema(min_length = 1, max_length = 256, pattern = r"\S")]
    name: String,
    /// Your own id for the app, usable wherever an app id is.
    #[schema(pattern = r"^(?!app_)[A-Za-z0-9_.\-]{1,256}$")]
    uid: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchApp {
    #[schema(min_length = 1, max_length = 256, pattern = r"\S")]
    name: Option<String>,
    /// A new uid, or null to remove it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    #[schema(pattern = r"^(?!app_)[A-Za-z0-9_.\-]{1,256}$")]
    uid: Option<Option<String>>,
}

fn check_name(name: &str) -> ApiResult<()> {
    if name.trim().is_empty() || name.len() > MAX_NAME_LEN {
        return Err(ApiError::invalid(
            "name",
            format!("must be 1 to {MAX_NAME_LEN} characters"),
        ));
    }
    Ok(())
}

/// A uid is the publisher's own id for the tenant; it must not look like
/// one of ours, or `{app}` in a path would be ambiguous.
fn check_uid(uid: &str) -> ApiResult<()> {
    let valid_chars = uid
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if uid.is_empty() || uid.len() > MAX_NAME_LEN || !valid_chars {
        return Err(ApiError::invalid(
            "uid",
            format!("must be 1 to {MAX_NAME_LEN} letters, digits, or _ - ."),
        ));
    }
    if uid.starts_with("app_") {
        return Err(ApiError::invalid(
            "uid",
            "must not start with `app_`, which app ids use",
        ));
    }
    Ok(())
}

#[utoipa::path(
    post,
    path = "/apps",
    tag = "apps",
    request_body = CreateApp,
    responses((status = 201, description = "The new app", body = AppView), ErrorResponses)
)]
pub async fn create(
    State(state): State<AppState>,
    _admin: Admin,
    ApiJson(body): ApiJson<CreateApp>,
) -> ApiResult<(StatusCode, Json<AppView>)> {
    check_name(&body.name)?;
    if let Some(uid) = &body.uid {
        check_uid(uid)?;
    }
    let app = state
        .store
        .create_app(body.name.trim(), body.uid.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(app.into())))
}

#[utoipa::path(
    get,
    path = "/apps",
    tag = "apps",
    params(ListQuery),
    responses((status = 200, description = "A page of apps", body = Page<AppView>), ErrorResponses)
)]
pub async fn list(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<Page<AppView>>> {
    let page = query.page()?;
    let apps = state.store.list_apps(&page).await?;
    Ok(Json(Page::new(
        apps,
        &page,
        |a| a.id.to_string(),
        AppView::from,
    )))
}

#[utoipa::path(
    get,
    path = "/apps/{app}",
    tag = "apps",
    params(("app" = String, Path, description = "App id or uid")),
    responses((status = 200, description = "The app", body = AppView), ErrorResponses)
)]
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(app): ApiPath<String>,
) -> ApiResult<Json<AppView>> {
    Ok(Json(caller.app(&state, &app).await?.into()))
}

#[utoipa::path(
    patch,
    path = "/apps/{app}",
    tag = "apps",
    params(("app" = String, Path, description = "App id or uid")),
    request_body = PatchApp,
    responses((status = 200, description = "The changed app", body = AppView), ErrorResponses)
)]
pub async fn update(
    State(state): State<AppState>,
    _admin: Admin,
    caller: Caller,
    ApiPath(app): ApiPath<String>,
    ApiJson(body): ApiJson<PatchApp>,
) -> ApiResult<Json<AppView>> {
    let app = caller.app(&state, &app).await?;
    let name = body.name.unwrap_or(app.name);
    check_name(&name)?;
    let uid = body.uid.unwrap_or(app.uid);
    if let Some(uid) = &uid {
        check_uid(uid)?;
    }
    let app = state
        .store
        .update_app(&app.id, name.trim(), uid.as_deref())
        .await?;
    Ok(Json(app.into()))
}

#[utoipa::path(
    delete,
    path = "/apps/{app}",
    tag = "apps",
    params(("app" = String, Path, description = "App id or uid")),
    responses((status = 204, description = "Deleted, with its webhooks, events and deliveries"), ErrorResponses)
)]
pub async fn remove(
    State(state): State<AppState>,
    _admin: Admin,
    caller: Caller,
    ApiPath(app): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let app = caller.app(&state, &app).await?;
    state.store.delete_app(&app.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Creates an app key. The key is in this response only; the store keeps
/// its hash.
#[utoipa::path(
    post,
    path = "/apps/{app}/keys",
    tag = "apps",
    params(("app" = String, Path, description = "App id or uid")),
    responses((status = 201, description = "The key, shown only in this answer", body = KeyCreated), ErrorResponses)
)]
pub async fn create_key(
    State(state): State<AppState>,
    _admin: Admin,
    caller: Caller,
    ApiPath(app): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<KeyCreated>)> {
    let app = caller.app(&state, &app).await?;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let key = format!(
        "whk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let id = state
        .store
        .create_app_key(&app.id, &token_hash(&key))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(KeyCreated {
            id: id.into(),
            app_id: app.id.into(),
            key,
        }),
    ))
}

/// A new app key: `key` is its only appearance.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyCreated {
    id: String,
    app_id: String,
    /// Use as `Authorization: Bearer <key>` for this app's routes.
    key: String,
}

#[utoipa::path(
    delete,
    path = "/apps/{app}/keys/{id}",
    tag = "apps",
    params(("app" = String, Path, description = "App id or uid"), ("id" = String, Path, description = "Key id")),
    responses((status = 204, description = "The key no longer works"), ErrorResponses)
)]
pub async fn delete_key(
    State(state): State<AppState>,
    _admin: Admin,
    caller: Caller,
    ApiPath((app, id)): ApiPath<(String, KeyId)>,
) -> ApiResult<StatusCode> {
    let app = caller.app(&state, &app).await?;
    state
        .store
        .delete_app_key(&app.id, &id)
        .await
        .or_not_found("key", &id)?;
    Ok(StatusCode::NO_CONTENT)
}
