//! Sends the published payload as it is: the smallest useful plugin, and
//! the baseline for measuring plugin overhead.

use wasmhook_sdk::{Config, Error, Event, Outcome};

pub fn transform(event: Event, _config: Config) -> Result<Outcome, Error> {
    Ok(Outcome::deliver_bytes(event.payload_text()).content_type("application/json"))
}

wasmhook_sdk::export!(transform);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmhook_sdk::json;

    #[test]
    fn sends_the_payload_unchanged() {
        let out = transform(
            Event::new("a.b", json!({"k": [1, 2]})),
            Config::new(json!(null)),
        )
        .unwrap();
        assert_eq!(out.body_json().unwrap(), json!({"k": [1, 2]}));
    }
}
