//! Request extractors: JSON, query and path extractors whose rejections are
//! our JSON errors, the authenticated caller, and list pagination.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::HeaderMap;
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ApiResult};
use crate::domain::{App, PageRequest};

/// A JSON object body. serde would also build a struct from a JSON array
/// (`[null, null]` as an empty patch); every body of this API is an
/// object, so anything else is refused. The body is parsed once.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(request.headers()) {
            return Err(ApiError::unsupported_media_type(
                "expected a request with `Content-Type: application/json`",
            ));
        }
        let body = Bytes::from_request(request, state)
            .await
            .map_err(ApiError::from_body_rejection)?;
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            // Broken JSON stays a syntax error; only valid non-objects are
            // refused for their shape.
            let _ = axum::Json::<IgnoredAny>::from_bytes(&body)?;
            return Err(ApiError::invalid_body("the body must be a JSON object"));
        }
        let axum::Json(value) = axum::Json::from_bytes(&body)?;
        Ok(Self(value))
    }
}

/// `application/json` or a `+json` type, parameters ignored.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// SHA-256 hex of a bearer token: what the store keeps instead of it.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Who is calling: the admin, or the holder of one app's key.
#[derive(Debug, Clone)]
pub enum Caller {
    Admin,
    App(App),
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::unauthorized("missing `Authorization: Bearer <token>` header")
            })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
            })?;
        let hash = token_hash(token);
        if hash == *state.admin_token_hash {
            return Ok(Self::Admin);
        }
        match state.store.app_for_key(&hash).await? {
            Some(app) => Ok(Self::App(app)),
            None => Err(ApiError::unauthorized("the token is not valid")),
        }
    }
}

/// The admin: an extractor that refuses anyone else (401 or 403) before
/// the handler's other extractors run, so a caller who may not use a
/// route learns nothing from how its body would have been judged.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        Caller::from_request_parts(parts, state)
            .await?
            .require_admin()?;
        Ok(Self)
    }
}

impl Caller {
    pub fn require_admin(&self) -> ApiResult<()> {
        match self {
            Self::Admin => Ok(()),
            Self::App(_) => Err(ApiError::forbidden("this requires the admin token")),
        }
    }

    /// The app named in the path (by id or uid), if this caller may touch
    /// it. An app key only ever sees its own app: for any other it gets 403,
    /// whether or not that app exists.
    pub async fn app(&self, state: &AppState, id_or_uid: &str) -> ApiResult<App> {
        match self {
            Self::App(app) if app.id == *id_or_uid || app.uid.as_deref() == Some(id_or_uid) => {
                Ok(app.clone())
            }
            Self::App(_) => Err(ApiError::forbidden("this key belongs to another app")),
            Self::Admin => state
                .store
                .find_app(id_or_uid)
                .await?
                .ok_or_else(|| ApiError::not_found("app", id_or_uid)),
        }
    }
}

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 250;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Items per page (default 50).
    #[param(minimum = 1, maximum = 250)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl ListQuery {
    /// One more than asked, to learn whether another page follows.
    pub fn page(&self) -> ApiResult<PageRequest> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::invalid(
                "limit",
                format!("must be between 1 and {MAX_LIMIT}"),
            ));
        }
        Ok(PageRequest {
            cursor: self.cursor.clone(),
            limit: limit + 1,
        })
    }
}

/// A page of a list; pass `next_cursor` as `cursor` for the next one.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Builds a page from the `limit + 1` rows fetched for `request`.
    pub fn new<R>(
        mut rows: Vec<R>,
        request: &PageRequest,
        id: impl Fn(&R) -> String,
        view: impl Fn(R) -> T,
    ) -> Self {
        let limit = (request.limit - 1) as usize;
        let next_cursor = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(&id)
        } else {
            None
        };
        Self {
            data: rows.into_iter().map(view).collect(),
            next_cursor,
        }
    }
}

/// For PATCH fields where `null` means something (clear) and absence means
/// "leave as is".
pub fn double_option<'de, T, D>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}
