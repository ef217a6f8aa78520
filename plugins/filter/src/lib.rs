//! Skips deliveries unless conditions on payload fields hold.
//!
//! Config: every condition in `all` must hold, and at least one in `any`
//! (when given). A condition names a JSON pointer and one test:
//! ```json
//! {"all": [{"path": "/amount", "gt": 100}, {"path": "/currency", "in": ["EUR", "USD"]}],
//!  "any": [{"path": "/customer/vip", "equals": true}, {"path": "/priority", "exists": true}]}
//! ```
//! Tests: `equals`, `not_equals`, `in`, `gt`, `gte`, `lt`, `lte`, `exists`.
//! A delivery that passes is sent as the usual envelope.

use serde::Deserialize;
use wasmhook_sdk::{Config, Error, Event, Outcome, Value};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterConfig {
    #[serde(default)]
    all: Vec<Condition>,
    #[serde(default)]
    any: Vec<Condition>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Condition {
    path: String,
    equals: Option<Value>,
    not_equals: Option<Value>,
    #[serde(rename = "in")]
    one_of: Option<Vec<Value>>,
    gt: Option<f64>,
    gte: Option<f64>,
    lt: Option<f64>,
    lte: Option<f64>,
    exists: Option<bool>,
}

impl Condition {
    /// `None` when it holds, or why it does not.
    fn check(&self, payload: &Value) -> Option<String> {
        let value = payload.pointer(&self.path);
        let number = value.and_then(Value::as_f64);
        let compare = |limit: Option<f64>, op: &str, holds: fn(f64, f64) -> bool| {
            let limit = limit?;
            match number {
                Some(n) if holds(n, limit) => None,
                _ => Some(format!("{} {op} {limit} does not hold", self.path)),
            }
        };
        let failures = [
            self.exists.and_then(|want| {
                (value.is_some() != want).then(|| format!("{} exists ≠ {want}", self.path))
            }),
            self.equals
                .as_ref()
                .and_then(|want| (value != Some(want)).then(|| format!("{} ≠ {want}", self.path))),
            self.not_equals
                .as_ref()
                .and_then(|bad| (value == Some(bad)).then(|| format!("{} = {bad}", self.path))),
            self.one_of.as_ref().and_then(|set| {
                (!value.is_some_and(|v| set.contains(v)))
                    .then(|| format!("{} not in {}", self.path, Value::from(set.clone())))
            }),
            compare(self.gt, ">", |n, l| n > l),
            compare(self.gte, ">=", |n, l| n >= l),
            compare(self.lt, "<", |n, l| n < l),
            compare(self.lte, "<=", |n, l| n <= l),
        ];
        failures.into_iter().flatten().next()
    }

    fn has_a_test(&self) -> bool {
        self.exists.is_some()
            || self.equals.is_some()
            || self.not_equals.is_some()
            || self.one_of.is_some()
            || [self.gt, self.gte, self.lt, self.lte]
                .iter()
                .any(Option::is_some)
    }
}

pub fn transform(event: Event, config: Config) -> Result<Outcome, Error> {
    let config: FilterConfig = config.get()?;
    if let Some(empty) = config
        .all
        .iter()
        .chain(&config.any)
        .find(|c| !c.has_a_test())
    {
        return Err(Error::new(format!(
            "condition on `{}` has no test",
            empty.path
        )));
    }
    let payload = event.json()?;
    if let Some(why) = config.all.iter().find_map(|c| c.check(&payload)) {
        return Ok(Outcome::skip(why));
    }
    if !config.any.is_empty() && config.any.iter().all(|c| c.check(&payload).is_some()) {
        return Ok(Outcome::skip("no condition of `any` holds"));
    }
    Outcome::deliver_json(&event.envelope(payload))
}

wasmhook_sdk::export!(transform);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmhook_sdk::json;

    fn run(payload: Value, config: Value) -> Outcome {
        transform(Event::new("invoice.paid", payload), Config::new(config)).unwrap()
    }

    #[test]
    fn all_conditions_must_hold() {
        let config = json!({"all": [{"path": "/amount", "gt": 100}, {"path": "/currency", "in": ["EUR", "USD"]}]});
        assert!(!run(json!({"amount": 150, "currency": "EUR"}), config.clone()).is_skip());
        assert_eq!(
            run(json!({"amount": 50, "currency": "EUR"}), config.clone()),
            Outcome::skip("/amount > 100 does not hold")
        );
        assert!(run(json!({"amount": 150, "currency": "GBP"}), config).is_skip());
    }

    #[test]
    fn any_needs_one_and_exists_and_equals_work() {
        let config = json!({"any": [{"path": "/vip", "equals": true}, {"path": "/priority", "exists": true}]});
        assert!(!run(json!({"vip": true}), config.clone()).is_skip());
        assert!(!run(json!({"priority": 1}), config.clone()).is_skip());
        assert!(run(json!({"vip": false}), config).is_skip());
    }

    #[test]
    fn passing_deliveries_get_the_envelope() {
        let out = run(
            json!({"amount": 1}),
            json!({"all": [{"path": "/amount", "lte": 1}]}),
        );
        assert_eq!(out.body_json().unwrap()["data"], json!({"amount": 1}));
    }

    #[test]
    fn a_condition_without_a_test_is_an_error() {
        let result = transform(
            Event::new("a", json!({})),
            Config::new(json!({"all": [{"path": "/x"}]})),
        );
        assert!(result.is_err());
    }
}
