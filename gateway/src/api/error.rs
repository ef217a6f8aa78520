//! The API's one error type: every failure becomes
//! `{"error": {"code", "message", "field"?}}` with a fitting status, and
//! bad input is always a 4xx that names what is wrong.

use axum::Json;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<&'static str>,
    /// Seconds after which the same call may work (`Retry-After`).
    retry_after: Option<u32>,
}

/// What a caller is told to wait when the database is unavailable.
const DATABASE_RETRY_AFTER_SECS: u32 = 2;

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// A field of the request failed its checks; the message names it.
    pub fn invalid(field: &'static str, problem: impl std::fmt::Display) -> Self {
        Self {
            field: Some(field),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                format!("{field}: {problem}"),
            )
        }
    }

    pub fn unsafe_url(problem: impl std::fmt::Display) -> Self {
        Self {
            field: Some("url"),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "unsafe_url",
                format!("url {problem}"),
            )
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(what: &str, id: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} `{id}` does not exist"),
        )
    }

    pub fn no_route() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not take that method",
        )
    }

    /// Valid JSON of the wrong shape: here, not an object.
    pub fn invalid_body(message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            format!("the JSON body does not fit: {message}"),
        )
    }

    /// The body could not be read: too large, or the client went away.
    pub fn from_body_rejection(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body is larger than the limit",
            );
        }
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            rejection.body_text(),
        )
    }

    fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::too_large("payload", limit)
    }

    pub fn too_large(field: &'static str, limit: usize) -> Self {
        Self {
            field: Some(field),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("{field}: larger than the limit of {limit} bytes"),
            )
        }
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    /// An upload that is not a usable plugin; the message says why.
    pub fn invalid_plugin(message: impl Into<String>) -> Self {
        Self {
            field: Some("body"),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_plugin", message)
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// The database cannot serve the call now; nothing was changed.
    pub fn database_unavailable(error: impl std::fmt::Display) -> Self {
        tracing::warn!(%error, "the database is unavailable; answering 503");
        Self {
            retry_after: Some(DATABASE_RETRY_AFTER_SECS),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable; nothing was changed, retry after the time in Retry-After",
            )
        }
    }

    /// Stored data that no longer parses: our fault, not the caller's.
    pub fn corrupt(error: impl std::fmt::Display) -> Self {
        Self::internal(StoreError::Corrupt(error.to_string()))
    }

    fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the gateway log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(field) = self.field {
            error["field"] = field.into();
        }
        let mut response = (self.status, Json(json!({ "error": error }))).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// What the store said, told to the user: each conflict is worded here,
/// once, with what the caller can do about it.
impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => {
                Self::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
            }
            StoreError::UidTaken => Self::conflict("an app with this uid already exists"),
            StoreError::PluginInUse { webhooks } => Self::conflict(format!(
                "{webhooks} webhook(s) use this plugin; detach it first (PATCH the webhook with \"plugin\": null)"
            )),
            StoreError::PluginVersionExists { name, version } => Self::conflict(format!(
                "{name} {version} already exists with other content; plugin versions are immutable, upload a new version"
            )),
            StoreError::PluginMissing => Self::conflict("plugin: no such plugin"),
            StoreError::EventIdReused { id } => Self::conflict(format!(
                "event id `{id}` was used by an earlier event; choose a new id"
            )),
            StoreError::DeliveryInFlight => Self::conflict(
                "the delivery is being sent right now; retry after this attempt ends",
            ),
            // A group commit that failed, or a writer that stopped, is the
            // file failing (a full disk, an I/O error), not the call.
            other @ (StoreError::Unavailable(_)
            | StoreError::Commit(_)
            | StoreError::WriterGone) => Self::database_unavailable(other),
            other @ (StoreError::Sqlite(_)
            | StoreError::Postgres(_)
            | StoreError::Open(_)
            | StoreError::Corrupt(_)) => Self::internal(other),
        }
    }
}

/// Names what was not found when the store says "not found".
pub trait OrNotFound<T> {
    fn or_not_found(self, what: &str, id: impl std::fmt::Display) -> ApiResult<T>;
}

impl<T> OrNotFound<T> for Result<T, StoreError> {
    fn or_not_found(self, what: &str, id: impl std::fmt::Display) -> ApiResult<T> {
        self.map_err(|error| match error {
            StoreError::NotFound => ApiError::not_found(what, id),
            other => other.into(),
        })
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::new(
                status,
                "payload_too_large",
                "request body is larger than the limit",
            );
        }
        let code = match rejection {
            JsonRejection::MissingJsonContentType(_) => "unsupported_media_type",
            JsonRejection::JsonSyntaxError(_) => "invalid_json",
            _ => "invalid_body",
        };
        // axum's text names the field: "missing field `url`", "unknown field `urll`".
        let status = if status.is_client_error() {
            status
        } else {
            StatusCode::BAD_REQUEST
        };
        Self::new(status, code, rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            rejection.body_text(),
        )
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_path",
            rejection.body_text(),
        )
    }
}
