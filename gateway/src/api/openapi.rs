//! The OpenAPI 3.1 description of the API, generated from the handlers'
//! annotations: served at `/openapi.json`, with a self-contained reference page at
//! `/docs`. The router is built from the same annotated routes, so nothing
//! is served that the document does not describe.

use std::collections::BTreeMap;

use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

/// Every error answer: `{"error": {"code", "message", "field"?}}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// A stable machine-readable code, e.g. `invalid_field`, `not_found`.
    code: String,
    /// What is wrong, for people; names the field when one is at fault.
    message: String,
    /// The request field at fault, when there is one.
    field: Option<String>,
}

/// The error statuses any operation may answer with, each an [`ErrorBody`].
pub struct ErrorResponses;

impl IntoResponses for ErrorResponses {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        [
            (
                "400",
                "A field, the path or the query is invalid; `field` names it",
            ),
            ("401", "No token, or an unknown one"),
            (
                "403",
                "The token may not do this (an app key outside its app, or an admin-only route)",
            ),
            (
                "404",
                "The app, webhook, event, delivery or plugin does not exist",
            ),
            ("408", "The request took longer than 30 s"),
            (
                "409",
                "It conflicts with what exists (a uid, a plugin version, a plugin in use)",
            ),
            ("413", "The body is larger than the limit"),
            ("415", "The body has the wrong content type"),
            ("422", "The JSON body does not have the expected shape"),
            (
                "503",
                "The database (or the plugin host) is unavailable for now; nothing was changed. \
                 Retry after the seconds in `Retry-After`",
            ),
        ]
        .into_iter()
        .map(|(status, description)| (status.to_owned(), error_response(description)))
        .collect()
    }
}

fn error_response(description: &str) -> RefOr<Response> {
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("ErrorBody")))
        .build();
    ResponseBuilder::new()
        .description(description)
        .content("application/json", content)
        .build()
        .into()
}

/// The document's frame; the paths come from the router.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "wasmhook",
        description = "Self-hosted webhook gateway: durable fan-out, Standard Webhooks signing, WebAssembly transforms.",
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerToken),
    security(("token" = [])),
    tags(
        (name = "apps", description = "Apps (one per customer of the publisher) and their API keys"),
        (name = "webhooks", description = "Endpoints that receive an app's events"),
        (name = "events", description = "Publishing events"),
        (name = "deliveries", description = "Delivery state, attempts and redelivery"),
        (name = "plugins", description = "WebAssembly transform plugins"),
        (name = "operations", description = "Probes and metrics (no token)"),
    )
)]
pub struct ApiDoc;

/// `Authorization: Bearer <token>`: the admin token or an app key.
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
