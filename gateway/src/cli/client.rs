//! The CLI's side of the REST API: one authenticated request at a time,
//! API errors turned into [`CliError`]s that name what was wrong.

use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::Value;

/// Most items a list command fetches.
const MAX_LISTED: usize = 1000;

/// Why a CLI command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the gateway at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{status}: {message}{}", field.as_ref().map(|f| format!(" (field `{f}`)")).unwrap_or_default())]
    Api {
        status: StatusCode,
        message: String,
        field: Option<String>,
    },
    #[error("{0}")]
    Input(String),
    #[error("the gateway answered something unexpected: {0}")]
    Response(String),
}

/// A running gateway, reached at `base_url` with a bearer token.
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    token: Option<String>,
}

impl Client {
    pub fn new(base_url: &str, token: Option<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            token,
        }
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self
            .http
            .request(method, format!("{}{path}", self.base_url));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends `request`; a 2xx JSON body is the answer, anything else an error.
    pub async fn send(&self, request: RequestBuilder) -> Result<Value, CliError> {
        let response = request
            .send()
            .await
            .map_err(|source| CliError::Unreachable {
                url: self.base_url.clone(),
                source,
            })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| CliError::Response(e.to_string()))?;
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|_| CliError::Response(format!("{status}, not JSON")))?
        };
        if status.is_success() {
            return Ok(body);
        }
        let error = &body["error"];
        Err(CliError::Api {
            status,
            message: error["message"]
                .as_str()
                .unwrap_or("no error message")
                .to_owned(),
            field: error["field"].as_str().map(str::to_owned),
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        self.send(self.request(Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        self.send(self.request(Method::POST, path).json(body)).await
    }

    /// The items of a paged list, following `next_cursor`, up to
    /// [`MAX_LISTED`] (a webhook may have millions of deliveries).
    pub async fn list_all(&self, path: &str) -> Result<Vec<Value>, CliError> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut request = self.request(Method::GET, path).query(&[("limit", "100")]);
            if let Some(cursor) = &cursor {
                request = request.query(&[("cursor", cursor)]);
            }
            let page = self.send(request).await?;
            match page["data"].as_array() {
                Some(data) => items.extend(data.iter().cloned()),
                None => return Err(CliError::Response("a list without `data`".into())),
            }
            match page["next_cursor"].as_str() {
                Some(_) if items.len() >= MAX_LISTED => {
                    eprintln!("only the first {} are shown", items.len());
                    return Ok(items);
                }
                Some(next) => cursor = Some(next.to_owned()),
                None => return Ok(items),
            }
        }
    }
}
