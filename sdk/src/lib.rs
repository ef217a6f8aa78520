//! Guest SDK for wasmhook transform plugins.
//!
//! A plugin is one function from an [`Event`] and its webhook's [`Config`]
//! to an [`Outcome`]: deliver a (re)shaped body, or skip the delivery.
//! [`export!`] turns it into the WebAssembly component the gateway runs;
//! the same code compiles natively, so plugins are unit-tested with plain
//! `cargo test`.
//!
//! ```
//! use wasmhook_sdk::{Config, Error, Event, Outcome, json};
//!
//! fn transform(event: Event, config: Config) -> Result<Outcome, Error> {
//!     let prefix: String = config.get_or("prefix", "event".to_string())?;
//!     let payload = event.json()?;
//!     wasmhook_sdk::info!("renaming {}", event.event_type);
//!     Ok(Outcome::deliver_json(&json!({
//!         "kind": format!("{prefix}:{}", event.event_type),
//!         "body": payload,
//!     }))?
//!     .header("x-source", "wasmhook"))
//! }
//! wasmhook_sdk::export!(transform);
//!
//! let out = transform(Event::new("invoice.paid", json!({"n": 1})), Config::new(json!({}))).unwrap();
//! assert_eq!(out.body_json().unwrap()["kind"], "event:invoice.paid");
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm`
//! in `target/wasm32-wasip2/release/` is the component to upload.

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use serde_json::{Value, json};

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "transform",
        pub_export_macro: true,
        default_bindings_module: "wasmhook_sdk::bindings",
    });
}

/// The event being delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event id, also the `webhook-id` header.
    pub id: String,
    pub event_type: String,
    pub app_id: String,
    pub app_uid: Option<String>,
    pub webhook_id: String,
    /// 1 on the first attempt.
    pub attempt: u32,
    /// When the event was accepted, RFC 3339.
    pub timestamp: String,
    payload: String,
}

impl Event {
    /// An event for tests: the other fields get placeholder values.
    pub fn new(event_type: &str, payload: Value) -> Self {
        Self {
            id: "msg_test".into(),
            event_type: event_type.into(),
            app_id: "app_test".into(),
            app_uid: None,
            webhook_id: "wh_test".into(),
            attempt: 1,
            timestamp: "2026-01-01T00:00:00Z".into(),
            payload: payload.to_string(),
        }
    }

    /// The payload as published, JSON text.
    pub fn payload_text(&self) -> &str {
        &self.payload
    }

    /// The payload as a JSON value.
    pub fn json(&self) -> Result<Value, Error> {
        Ok(serde_json::from_str(&self.payload)?)
    }

    /// The payload as your own type.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, Error> {
        Ok(serde_json::from_str(&self.payload)?)
    }

    /// The Standard Webhooks envelope the gateway sends by default,
    /// around `data` (pass the payload, or a reshaped one).
    pub fn envelope(&self, data: Value) -> Value {
        json!({ "type": self.event_type, "timestamp": self.timestamp, "data": data })
    }
}

/// The JSON config a webhook attached with this plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct Config(Value);

impl Config {
    pub fn new(value: Value) -> Self {
        Self(value)
    }

    /// Parses config text; empty text is `null`.
    pub fn parse(text: &str) -> Result<Self, Error> {
        if text.trim().is_empty() {
            return Ok(Self(Value::Null));
        }
        Ok(Self(serde_json::from_str(text)?))
    }

    /// The whole config as your own type.
    pub fn get<T: DeserializeOwned>(&self) -> Result<T, Error> {
        T::deserialize(&self.0).map_err(|e| Error::new(format!("config: {e}")))
    }

    /// One top-level field, or `default` when it is absent.
    pub fn get_or<T: DeserializeOwned>(&self, field: &str, default: T) -> Result<T, Error> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(value) => {
                T::deserialize(value).map_err(|e| Error::new(format!("config.{field}: {e}")))
            }
        }
    }

    pub fn json(&self) -> &Value {
        &self.0
    }
}

/// A request to send instead of the default body.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Delivery {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
}

/// What the plugin decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Deliver(Delivery),
    /// Send nothing; the reason is recorded on the delivery.
    Skip(String),
}

impl Outcome {
    /// Delivers `value` as a JSON body. A value that cannot be written as
    /// JSON (a map with non-string keys, a failing `Serialize`) is an
    /// error, so the attempt fails instead of sending something else.
    pub fn deliver_json(value: &impl Serialize) -> Result<Self, Error> {
        let body = serde_json::to_vec(value)?;
        Ok(Self::Deliver(Delivery {
            body,
            content_type: Some("application/json".into()),
            headers: Vec::new(),
        }))
    }

    pub fn deliver_bytes(body: impl Into<Vec<u8>>) -> Self {
        Self::Deliver(Delivery {
            body: body.into(),
            ..Delivery::default()
        })
    }

    pub fn skip(reason: impl Into<String>) -> Self {
        Self::Skip(reason.into())
    }

    /// Adds a request header (no effect on a skip).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        if let Self::Deliver(delivery) = &mut self {
            delivery.headers.push((name.into(), value.into()));
        }
        self
    }

    /// Sets the content type (no effect on a skip).
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        if let Self::Deliver(delivery) = &mut self {
            delivery.content_type = Some(content_type.into());
        }
        self
    }

    /// The body parsed as JSON, for tests.
    pub fn body_json(&self) -> Option<Value> {
        match self {
            Self::Deliver(delivery) => serde_json::from_slice(&delivery.body).ok(),
            Self::Skip(_) => None,
        }
    }

    pub fn is_skip(&self) -> bool {
        matches!(self, Self::Skip(_))
    }
}

/// A plugin error: the attempt fails with this message and nothing is sent.
///
/// Any error type converts into it (its message is kept), and so do
/// `String` and `&str`, so `?` works on whatever a plugin calls. It is not
/// itself a `std::error::Error`, which is what lets that conversion exist.
#[derive(Debug, Clone, PartialEq)]
pub struct Error(String);

impl Error {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E> From<E> for Error
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn from(error: E) -> Self {
        Self(error.into().to_string())
    }
}

/// Plugin logging; lines land in the gateway's plugin log (and in the
/// playground's answer). Natively they go to stderr.
pub mod log {
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Level {
        Trace,
        Debug,
        Info,
        Warn,
        Error,
    }

    #[doc(hidden)]
    pub fn write(level: Level, message: &str) {
        #[cfg(target_arch = "wasm32")]
        {
            use crate::bindings::wasmhook::plugin::log as host;
            let level = match level {
                Level::Trace => host::Level::Trace,
                Level::Debug => host::Level::Debug,
                Level::Info => host::Level::Info,
                Level::Warn => host::Level::Warn,
                Level::Error => host::Level::Error,
            };
            host::log(level, message);
        }
        #[cfg(not(target_arch = "wasm32"))]
        eprintln!("[{level:?}] {message}");
    }
}

#[macro_export]
macro_rules! trace { ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Trace, &format!($($arg)*)) } }
#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Debug, &format!($($arg)*)) } }
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Info, &format!($($arg)*)) } }
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Warn, &format!($($arg)*)) } }
#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Error, &format!($($arg)*)) } }

/// Makes `fn(Event, Config) -> Result<Outcome, Error>` the plugin's
/// export. Natively it expands to nothing, so the same file unit-tests.
#[macro_export]
macro_rules! export {
    ($transform:path) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct WasmhookPlugin;
            impl $crate::bindings::Guest for WasmhookPlugin {
                fn transform(
                    event: $crate::bindings::wasmhook::plugin::types::Event,
                    config: ::std::string::String,
                ) -> ::std::result::Result<
                    $crate::bindings::wasmhook::plugin::types::Outcome,
                    ::std::string::String,
                > {
                    $crate::guest::run($transform, event, config)
                }
            }
    $crate::bindings::export!(WasmhookPlugin with_types_in $crate::bindings);
        };
    };
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod guest {
    use crate::bindings::wasmhook::plugin::types as wit;
    use crate::{Config, Error, Event, Outcome};

    /// Converts between the WIT types and the SDK's, and forwards panics
    /// to the plugin log so the host can report the message.
    pub fn run(
        transform: fn(Event, Config) -> Result<Outcome, Error>,
        event: wit::Event,
        config: String,
    ) -> Result<wit::Outcome, String> {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                crate::log::write(
                    crate::log::Level::Error,
                    &format!("plugin panicked: {info}"),
                );
            }))
        });
        let event = Event {
            id: event.id,
            event_type: event.event_type,
            app_id: event.app_id,
            app_uid: event.app_uid,
            webhook_id: event.webhook_id,
            attempt: event.attempt,
            timestamp: event.timestamp,
            payload: event.payload,
        };
        let config = Config::parse(&config).map_err(|e| format!("config is not JSON: {e}"))?;
        match transform(event, config).map_err(|e| e.to_string())? {
            Outcome::Skip(reason) => Ok(wit::Outcome::Skip(reason)),
            Outcome::Deliver(d) => Ok(wit::Outcome::Deliver(wit::Delivery {
                body: d.body,
                content_type: d.content_type,
                headers: d.headers,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_error_converts_with_question_mark() {
        fn parse(text: &str) -> Result<i32, Error> {
            Ok(text.parse::<i32>()?)
        }
        assert_eq!(parse("42"), Ok(42));
        assert_eq!(parse("x"), Err(Error::new("invalid digit found in string")));
        let from_text: Error = "plain".into();
        assert_eq!(from_text.to_string(), "plain");
        let from_io: Error = std::io::Error::other("disk gone").into();
        assert_eq!(from_io.to_string(), "disk gone");
    }

    #[test]
    fn json_that_cannot_be_written_is_an_error() {
        let mut map = std::collections::HashMap::new();
        map.insert((1, 2), "tuple keys are not JSON");
        assert!(Outcome::deliver_json(&map).is_err());
        let out = Outcome::deliver_json(&json!({"ok": true})).unwrap();
        assert_eq!(out.body_json(), Some(json!({"ok": true})));
    }
}
