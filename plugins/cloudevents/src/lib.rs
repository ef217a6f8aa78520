//! Wraps the event in a CloudEvents 1.0 JSON envelope
//! (structured content mode, `application/cloudevents+json`).
//!
//! Config (all optional):
//! ```json
//! {"source": "https://billing.example.com", "type_prefix": "com.example.", "subject": "/invoice/id"}
//! ```
//! `source` defaults to `/wasmhook/apps/<app>`; `subject` is a JSON pointer
//! into the payload.

use serde::Deserialize;
use wasmhook_sdk::{Config, Error, Event, Outcome, Value, json};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloudEventsConfig {
    source: Option<String>,
    type_prefix: Option<String>,
    subject: Option<String>,
}

pub fn transform(event: Event, config: Config) -> Result<Outcome, Error> {
    let config: CloudEventsConfig = if config.json().is_null() {
        Default::default()
    } else {
        config.get()?
    };
    let payload = event.json()?;
    let source = config.source.unwrap_or_else(|| {
        format!(
            "/wasmhook/apps/{}",
            event.app_uid.as_deref().unwrap_or(&event.app_id)
        )
    });
    let mut envelope = json!({
        "specversion": "1.0",
        "id": event.id,
        "source": source,
        "type": format!("{}{}", config.type_prefix.unwrap_or_default(), event.event_type),
        "time": event.timestamp,
        "datacontenttype": "application/json",
    });
    if let Some(pointer) = config.subject {
        match payload.pointer(&pointer) {
            Some(Value::String(s)) => envelope["subject"] = s.clone().into(),
            Some(other) if !other.is_null() => envelope["subject"] = other.to_string().into(),
            _ => {}
        }
    }
    envelope["data"] = payload;
    Ok(Outcome::deliver_json(&envelope).content_type("application/cloudevents+json"))
}

wasmhook_sdk::export!(transform);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_in_a_cloudevent() {
        let event = Event::new("invoice.paid", json!({"invoice": {"id": "in_7"}}));
        let config = Config::new(json!({"type_prefix": "com.acme.", "subject": "/invoice/id"}));
        let out = transform(event, config).unwrap();
        let body = out.body_json().unwrap();
        assert_eq!(body["specversion"], "1.0");
        assert_eq!(body["id"], "msg_test");
        assert_eq!(body["type"], "com.acme.invoice.paid");
        assert_eq!(body["source"], "/wasmhook/apps/app_test");
        assert_eq!(body["subject"], "in_7");
        assert_eq!(body["time"], "2026-01-01T00:00:00Z");
        assert_eq!(body["data"], json!({"invoice": {"id": "in_7"}}));
        let Outcome::Deliver(delivery) = out else {
            panic!()
        };
        assert_eq!(
            delivery.content_type.as_deref(),
            Some("application/cloudevents+json")
        );
    }
}
