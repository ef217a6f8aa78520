//! Turns any event into a Slack incoming-webhook message: `text` plus
//! Block Kit blocks, rendered from a template of payload fields.
//!
//! Config:
//! ```json
//! {
//!   "template": "Invoice {{/invoice/id}} paid: {{/invoice/amount}} {{/invoice/currency}}",
//!   "fields": [{"title": "Customer", "value": "{{/customer/name}}"}],
//!   "username": "Billing", "icon_emoji": ":moneybag:"
//! }
//! ```
//! `{{/json/pointer}}` reads the payload; `{{event_type}}`, `{{id}}` and
//! `{{timestamp}}` read the event. A missing field renders as `–`.

use serde::Deserialize;
use wasmhook_sdk::{Config, Error, Event, Outcome, Value, json};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlackConfig {
    template: Option<String>,
    #[serde(default)]
    fields: Vec<Field>,
    username: Option<String>,
    icon_emoji: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Field {
    title: String,
    value: String,
}

const DEFAULT_TEMPLATE: &str = "*{{event_type}}* ({{id}})";
const MISSING: &str = "–";

pub fn transform(event: Event, config: Config) -> Result<Outcome, Error> {
    let config: SlackConfig = if config.json().is_null() {
        SlackConfig::default()
    } else {
        config.get()?
    };
    let payload = event.json()?;
    let text = render(
        config.template.as_deref().unwrap_or(DEFAULT_TEMPLATE),
        &event,
        &payload,
    )?;
    let mut blocks = vec![json!({"type": "section", "text": {"type": "mrkdwn", "text": text}})];
    if !config.fields.is_empty() {
        let fields: Result<Vec<Value>, Error> = config
            .fields
            .iter()
            .map(|f| {
                let value = render(&f.value, &event, &payload)?;
                Ok(json!({"type": "mrkdwn", "text": format!("*{}*\n{value}", f.title)}))
            })
            .collect();
        blocks.push(json!({"type": "section", "fields": fields?}));
    }
    blocks.push(json!({
        "type": "context",
        "elements": [{"type": "mrkdwn", "text": format!("`{}` · {}", event.event_type, event.timestamp)}],
    }));
    let mut message = json!({"text": text, "blocks": blocks});
    if let Some(username) = config.username {
        message["username"] = username.into();
    }
    if let Some(icon) = config.icon_emoji {
        message["icon_emoji"] = icon.into();
    }
    Outcome::deliver_json(&message)
}

/// Replaces each `{{…}}` with the event field or payload value it names.
fn render(template: &str, event: &Event, payload: &Value) -> Result<String, Error> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| {
            Error::new(format!("template: `{{{{` without `}}}}` in `{template}`"))
        })?;
        out.push_str(&lookup(after[..end].trim(), event, payload));
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn lookup(name: &str, event: &Event, payload: &Value) -> String {
    match name {
        "event_type" => event.event_type.clone(),
        "id" => event.id.clone(),
        "timestamp" => event.timestamp.clone(),
        pointer => match payload.pointer(pointer) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => MISSING.to_owned(),
            Some(other) => other.to_string(),
        },
    }
}

wasmhook_sdk::export!(transform);

#[cfg(test)]
mod tests {
    use super::*;

    fn invoice() -> Event {
        Event::new(
            "invoice.paid",
            json!({"invoice": {"id": "in_1", "amount": 4200, "currency": "EUR"}, "customer": {"name": "Acme"}}),
        )
    }

    #[test]
    fn renders_text_fields_and_context() {
        let config = Config::new(json!({
            "template": "Invoice {{/invoice/id}} paid: {{/invoice/amount}} {{/invoice/currency}}",
            "fields": [{"title": "Customer", "value": "{{/customer/name}}"}, {"title": "Plan", "value": "{{/plan}}"}],
            "username": "Billing",
        }));
        let body = transform(invoice(), config).unwrap().body_json().unwrap();
        assert_eq!(body["text"], "Invoice in_1 paid: 4200 EUR");
        assert_eq!(
            body["blocks"][0]["text"]["text"],
            "Invoice in_1 paid: 4200 EUR"
        );
        assert_eq!(body["blocks"][1]["fields"][0]["text"], "*Customer*\nAcme");
        assert_eq!(body["blocks"][1]["fields"][1]["text"], "*Plan*\n–");
        assert_eq!(body["blocks"][2]["type"], "context");
        assert_eq!(body["username"], "Billing");
    }

    #[test]
    fn works_without_config() {
        let body = transform(invoice(), Config::new(Value::Null))
            .unwrap()
            .body_json()
            .unwrap();
        assert_eq!(body["text"], "*invoice.paid* (msg_test)");
        assert_eq!(body["blocks"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn bad_config_is_an_error() {
        assert!(transform(invoice(), Config::new(json!({"templat": "x"}))).is_err());
        assert!(transform(invoice(), Config::new(json!({"template": "{{/x"}))).is_err());
    }
}
