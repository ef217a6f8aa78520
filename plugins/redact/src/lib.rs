//! Removes or masks fields before delivery, so receivers never see them.
//!
//! Config (JSON pointers into the payload):
//! ```json
//! {"remove": ["/customer/email"], "mask": ["/card/number"], "mask_with": "****", "keep_last": 4}
//! ```
//! The body is the usual Standard Webhooks envelope around the redacted
//! payload. A pointer that is absent is ignored.

use serde::Deserialize;
use wasmhook_sdk::{Config, Error, Event, Outcome, Value};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedactConfig {
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default)]
    mask: Vec<String>,
    #[serde(default = "default_mask")]
    mask_with: String,
    /// Characters of a masked string to keep at the end (e.g. last 4 digits).
    #[serde(default)]
    keep_last: usize,
}

fn default_mask() -> String {
    "****".into()
}

pub fn transform(event: Event, config: Config) -> Result<Outcome, Error> {
    let config: RedactConfig = config.get()?;
    for pointer in config.remove.iter().chain(&config.mask) {
        if !pointer.is_empty() && !pointer.starts_with('/') {
            return Err(Error::new(format!(
                "`{pointer}` is not a JSON pointer (start it with /)"
            )));
        }
    }
    let mut payload = event.json()?;
    for pointer in &config.remove {
        remove(&mut payload, pointer);
    }
    for pointer in &config.mask {
        if let Some(value) = payload.pointer_mut(pointer) {
            *value = Value::String(mask(value, &config.mask_with, config.keep_last));
        }
    }
    Outcome::deliver_json(&event.envelope(payload))
}

fn remove(payload: &mut Value, pointer: &str) {
    let Some((parent, key)) = pointer.rsplit_once('/') else {
        return;
    };
    let key = key.replace("~1", "/").replace("~0", "~");
    match payload.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.remove(&key);
        }
        Some(Value::Array(items)) => {
            if let Ok(index) = key.parse::<usize>()
                && index < items.len()
            {
                items.remove(index);
            }
        }
        _ => {}
    }
}

fn mask(value: &Value, mask_with: &str, keep_last: usize) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let chars: Vec<char> = text.chars().collect();
    if keep_last == 0 || keep_last >= chars.len() {
        return mask_with.to_owned();
    }
    let tail: String = chars[chars.len() - keep_last..].iter().collect();
    format!("{mask_with}{tail}")
}

wasmhook_sdk::export!(transform);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmhook_sdk::json;

    fn order() -> Event {
        Event::new(
            "order.created",
            json!({"customer": {"email": "a@b.c", "name": "Ann"}, "card": {"number": "4242424242424242"}, "items": [1, 2]}),
        )
    }

    #[test]
    fn removes_and_masks() {
        let config = Config::new(
            json!({"remove": ["/customer/email", "/items/0", "/nope"], "mask": ["/card/number"], "keep_last": 4}),
        );
        let body = transform(order(), config).unwrap().body_json().unwrap();
        assert_eq!(body["type"], "order.created");
        assert_eq!(body["data"]["customer"], json!({"name": "Ann"}));
        assert_eq!(body["data"]["card"]["number"], "****4242");
        assert_eq!(body["data"]["items"], json!([2]));
    }

    #[test]
    fn refuses_what_is_not_a_pointer() {
        assert!(transform(order(), Config::new(json!({"remove": ["customer.email"]}))).is_err());
    }
}
