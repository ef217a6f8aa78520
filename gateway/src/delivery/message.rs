//! The request a delivery attempt sends: body, headers and signatures.

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};

use crate::clock::{Millis, rfc3339};
use crate::domain::ClaimedDelivery;
use crate::plugin::Delivered;
use crate::signing::{Secret, signature_header};
use crate::url_safety::{TargetUrl, UrlPolicy};

/// A fully built, signed request, ready for the sender.
#[derive(Debug)]
pub struct OutgoingRequest {
    pub url: TargetUrl,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why a delivery could not even be attempted.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("target URL {0}")]
    UnsafeTarget(#[from] crate::url_safety::UrlError),
    #[error("stored webhook is unusable: {0}")]
    Corrupt(String),
}

/// The body: the Standard Webhooks envelope, or the payload as published
/// for a webhook with `raw_payload`. The payload is stored as validated JSON
/// text and spliced in unparsed.
pub fn body(delivery: &ClaimedDelivery) -> Bytes {
    if delivery.raw_payload {
        return Bytes::from(delivery.payload.clone());
    }
    let event_type = serde_json::Value::from(delivery.event_type.as_str());
    let envelope = format!(
        r#"{{"type":{event_type},"timestamp":"{}","data":{}}}"#,
        rfc3339(delivery.event_created_at),
        delivery.payload
    );
    Bytes::from(envelope)
}

/// The secrets that sign now: the current one, and the previous one while
/// its rotation overlap lasts.
pub fn active_secrets(delivery: &ClaimedDelivery, now: Millis) -> Result<Vec<Secret>, BuildError> {
    let parse = |text: &str| Secret::parse(text).map_err(|e| BuildError::Corrupt(e.to_string()));
    let mut secrets = vec![parse(&delivery.secret)?];
    if let (Some(previous), Some(until)) = (
        &delivery.previous_secret,
        delivery.previous_secret_expires_at,
    ) && until > now
    {
        secrets.push(parse(previous)?);
    }
    Ok(secrets)
}

/// Builds the signed request for one attempt at `now`. The URL is checked
/// again: the policy may have tightened since the webhook was registered.
/// The signature covers the bytes actually sent, a plugin's included.
pub fn build(
    delivery: &ClaimedDelivery,
    policy: &UrlPolicy,
    now: Millis,
    transformed: Option<Delivered>,
) -> Result<OutgoingRequest, BuildError> {
    let url = policy.parse(&delivery.url)?;
    let (body, content_type, plugin_headers) = match transformed {
        Some(t) => (Bytes::from(t.body), t.content_type, t.headers),
        None => (body(delivery), "application/json".to_owned(), Vec::new()),
    };
    let timestamp = now / 1000;
    let secrets = active_secrets(delivery, now)?;
    let signature = signature_header(&secrets, delivery.event_id.as_str(), timestamp, &body);

    let corrupt = |e: &dyn std::fmt::Display| BuildError::Corrupt(e.to_string());
    let custom = delivery
        .headers
        .as_ref()
        .map_err(|e| BuildError::Corrupt(e.clone()))?
        .as_map()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()));
    let from_plugin = plugin_headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let mut headers = HeaderMap::new();
    for (name, value) in custom.chain(from_plugin) {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| corrupt(&e))?;
        let value = HeaderValue::from_str(value).map_err(|e| corrupt(&e))?;
        headers.insert(name, value);
    }
    let content_type = HeaderValue::from_str(&content_type).map_err(|e| corrupt(&e))?;
    headers.insert(CONTENT_TYPE, content_type);
    let id = HeaderValue::from_str(delivery.event_id.as_str()).map_err(|e| corrupt(&e))?;
    headers.insert("webhook-id", id);
    headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
    let signature = HeaderValue::from_str(&signature).map_err(|e| corrupt(&e))?;
    headers.insert("webhook-signature", signature);
    Ok(OutgoingRequest { url, headers, body })
}
