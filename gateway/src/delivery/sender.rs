//! The HTTP client of the delivery path: one POST per attempt, no
//! redirects, no proxies, names resolved through the URL-safety resolver,
//! and only the first 4 KiB of a response kept.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::RETRY_AFTER;

use super::message::{BuildError, OutgoingRequest};
use crate::clock::{Millis, now_ms};
use crate::domain::{AttemptOutcome, MAX_FOREIGN_TEXT, PluginFailure, bounded};
use crate::url_safety::{SafeResolver, UrlPolicy};

const RESPONSE_KEEP_BYTES: usize = 4096;

/// What happened on the wire.
#[derive(Debug, Clone)]
pub struct SendResult {
    pub kind: AttemptOutcome,
    pub started_at: Millis,
    pub duration: Duration,
    pub status_code: Option<u16>,
    pub response_body: Option<String>,
    pub error: Option<String>,
    pub retry_after: Option<Duration>,
    /// The plugin error class, for a failed plugin.
    pub plugin_error: Option<PluginFailure>,
}

impl SendResult {
    /// An attempt whose plugin failed: nothing reached the network.
    pub fn plugin_failed(
        error: &crate::plugin::PluginError,
        started_at: Millis,
        duration: Duration,
    ) -> Self {
        Self {
            kind: AttemptOutcome::Plugin,
            started_at,
            duration,
            status_code: None,
            response_body: None,
            error: Some(bounded(error.to_string(), MAX_FOREIGN_TEXT)),
            retry_after: None,
            plugin_error: Some(error.kind()),
        }
    }

    /// A one-line description for the delivery's `last_error`.
    pub fn summary(&self) -> String {
        match (&self.error, self.status_code) {
            (Some(error), _) => error.clone(),
            (None, Some(code)) => format!("receiver answered HTTP {code}"),
            (None, None) => self.kind.as_str().to_owned(),
        }
    }

    /// An attempt that never reached the network.
    pub fn refused(error: BuildError) -> Self {
        let kind = match error {
            BuildError::UnsafeTarget(_) => AttemptOutcome::UnsafeTarget,
            BuildError::Corrupt(_) => AttemptOutcome::InvalidWebhook,
        };
        Self {
            kind,
            started_at: now_ms(),
            duration: Duration::ZERO,
            status_code: None,
            response_body: None,
            error: Some(bounded(error.to_string(), MAX_FOREIGN_TEXT)),
            retry_after: None,
            plugin_error: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot build the delivery HTTP client: {0}")]
pub struct SenderError(#[from] reqwest::Error);

impl Sender {
    pub fn new(
        policy: UrlPolicy,
        timeout: Duration,
        max_idle_per_host: usize,
    ) -> Result<Self, SenderError> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("wasmhook/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(SafeResolver::new(policy)))
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(max_idle_per_host)
            .build()?;
        Ok(Self { client })
    }

    pub async fn send(&self, request: OutgoingRequest) -> SendResult {
        let started_at = now_ms();
        let clock = Instant::now();
        let response = self
            .client
            .post(request.url.as_url().clone())
            .headers(request.headers)
            .body(request.body)
            .send()
            .await;
        let mut result = match response {
            Ok(response) => read_response(response).await,
            Err(error) => failure(&error),
        };
        result.started_at = started_at;
        result.duration = clock.elapsed();
        result
    }
}

async fn read_response(mut response: reqwest::Response) -> SendResult {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let mut kept = Vec::new();
    let mut error = None;
    while kept.len() < RESPONSE_KEEP_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => kept.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(_) if status.is_success() => break,
            Err(e) => {
                error = Some(describe(&e));
                break;
            }
        }
    }
    kept.truncate(RESPONSE_KEEP_BYTES);
    // Do not end on half a character: the cut should not add a U+FFFD.
    while std::str::from_utf8(&kept).is_err_and(|e| e.error_len().is_none()) {
        kept.pop();
    }
    let kind = if status.is_success() {
        AttemptOutcome::Success
    } else {
        AttemptOutcome::HttpError
    };
    SendResult {
        kind,
        started_at: 0,
        duration: Duration::ZERO,
        status_code: Some(status.as_u16()),
        response_body: Some(String::from_utf8_lossy(&kept).into_owned()),
        error: error.or_else(|| (!status.is_success()).then(|| status_error(status))),
        retry_after,
        plugin_error: None,
    }
}

fn status_error(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("receiver answered HTTP {} {reason}", status.as_u16()),
        None => format!("receiver answered HTTP {}", status.as_u16()),
    }
}

fn failure(error: &reqwest::Error) -> SendResult {
    let kind = if error.is_timeout() {
        AttemptOutcome::Timeout
    } else {
        AttemptOutcome::Connection
    };
    SendResult {
        kind,
        started_at: 0,
        duration: Duration::ZERO,
        status_code: None,
        response_body: None,
        error: Some(describe(error)),
        retry_after: None,
        plugin_error: None,
    }
}

/// The error with its causes, which is where the useful part ("connection
/// refused", "host … is a loopback address") lives; bounded, as it may
/// quote what the receiver sent.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    bounded(text, MAX_FOREIGN_TEXT)
}

/// `Retry-After` as delay-seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
