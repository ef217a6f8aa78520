//! Values that parse instead of validate: an event type, a webhook's
//! event-type filter, custom delivery headers, a client-chosen event id.
//! Each type can only hold a value that passed its checks (or was read
//! back from the store, which only ever stored checked values).

use std::collections::BTreeMap;

use reqwest::header::{HeaderName, HeaderValue};

use super::ids::EventId;

const MAX_EVENT_TYPE_LEN: usize = 256;
const MAX_FILTERS: usize = 256;
const MAX_HEADERS: usize = 32;
const MAX_ID_LEN: usize = 256;

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/')
}

/// An event type such as `invoice.paid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventType(String);

impl EventType {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() || text.len() > MAX_EVENT_TYPE_LEN {
            return Err(format!("must be 1 to {MAX_EVENT_TYPE_LEN} characters"));
        }
        if let Some(bad) = text.chars().find(|c| !is_name_char(*c)) {
            return Err(format!(
                "contains `{bad}`; use letters, digits and . _ - : /"
            ));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Which event types a webhook receives: exact names and prefix wildcards
/// (`invoice.*`); `*` or no filter at all means every type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTypeFilter(Option<Vec<String>>);

impl EventTypeFilter {
    /// Parses what a client sent; `None` subscribes to everything.
    pub fn parse(items: Option<&[String]>) -> Result<Self, String> {
        let Some(items) = items else {
            return Ok(Self(None));
        };
        if items.is_empty() {
            return Err("must list at least one event type; omit it or send null for all".into());
        }
        if items.len() > MAX_FILTERS {
            return Err(format!("may hold at most {MAX_FILTERS} entries"));
        }
        for item in items {
            let name = item.strip_suffix('*').unwrap_or(item);
            let prefix_ok = name.is_empty() || name.ends_with('.') || !item.ends_with('*');
            if !prefix_ok {
                return Err(format!(
                    "`{item}`: a wildcard must follow a dot, as in `invoice.*`"
                ));
            }
            if !name.is_empty() {
                EventType::parse(name).map_err(|e| format!("`{item}` {e}"))?;
            }
        }
        Ok(Self(Some(items.to_vec())))
    }

    /// Reads the stored form (a JSON array, or NULL).
    pub fn from_stored(stored: Option<&str>) -> Result<Self, String> {
        match stored {
            None => Ok(Self(None)),
            Some(json) => serde_json::from_str(json)
                .map(|items| Self(Some(items)))
                .map_err(|e| format!("event_types column: {e}")),
        }
    }

    pub fn to_stored(&self) -> Option<String> {
        self.0
            .as_ref()
            .map(|items| serde_json::Value::from(items.clone()).to_string())
    }

    pub fn items(&self) -> Option<&[String]> {
        self.0.as_deref()
    }

    pub fn matches(&self, event_type: &str) -> bool {
        let Some(items) = &self.0 else {
            return true;
        };
        items.iter().any(|item| match item.strip_suffix('*') {
            Some(prefix) => event_type.starts_with(prefix),
            None => item == event_type,
        })
    }
}

/// Extra request headers a webhook sends with every delivery. Names that
/// the gateway sets itself, or that would corrupt the request, are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CustomHeaders(BTreeMap<String, String>);

/// Headers only the gateway may set.
pub fn is_reserved_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.starts_with("webhook-")
        || matches!(
            name.as_str(),
            "content-length"
                | "content-type"
                | "host"
                | "transfer-encoding"
                | "connection"
                | "user-agent"
                | "te"
                | "upgrade"
                | "keep-alive"
                | "proxy-connection"
                | "trailer"
        )
}

impl CustomHeaders {
    pub fn parse(map: &BTreeMap<String, String>) -> Result<Self, String> {
        if map.len() > MAX_HEADERS {
            return Err(format!("may hold at most {MAX_HEADERS} headers"));
        }
        let mut headers = BTreeMap::new();
        for (name, value) in map {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("`{name}` is not a valid header name"))?;
            HeaderValue::from_str(value)
                .map_err(|_| format!("the value of `{name}` is not a valid header value"))?;
            if is_reserved_header(name) {
                return Err(format!(
                    "`{name}` is set by the gateway and cannot be overridden"
                ));
            }
            headers.insert(name.to_ascii_lowercase(), value.clone());
        }
        Ok(Self(headers))
    }

    pub fn from_stored(json: &str) -> Result<Self, String> {
        serde_json::from_str(json)
            .map(Self)
            .map_err(|e| format!("headers column: {e}"))
    }

    pub fn to_stored(&self) -> String {
        serde_json::to_string(&self.0).unwrap_or_else(|_| "{}".into())
    }

    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

/// How many attempts may be in flight to one webhook at once, across every
/// gateway process: what keeps one slow endpoint from taking every slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct InFlightLimit(u32);

impl InFlightLimit {
    pub const MAX: u32 = 10_000;

    pub fn parse(n: u64) -> Result<Self, String> {
        match u32::try_from(n) {
            Ok(n @ 1..=Self::MAX) => Ok(Self(n)),
            _ => Err(format!("must be between 1 and {}", Self::MAX)),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// The part of a worker's slots, in percent, that apps with deliveries in
/// flight share between them; the rest stays free for an app that starts
/// publishing (see [`super::share`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharePercent(u8);

impl SharePercent {
    pub fn parse(n: u64) -> Result<Self, String> {
        match u8::try_from(n) {
            Ok(n @ 1..=100) => Ok(Self(n)),
            _ => Err("must be a percentage between 1 and 100".into()),
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

/// How many deliveries per second a webhook's endpoint receives at most,
/// across every gateway process, and how many of them may arrive at once
/// (the burst). Without a burst given, it is a tenth of a second's worth
/// (at least one), so that over any window of a few seconds the endpoint
/// receives its rate and hardly more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    per_second: u32,
    burst: u32,
}

impl RateLimit {
    pub const MAX: u32 = 10_000;

    /// `Err` names the field at fault: `rate_limit` or `rate_limit_burst`.
    pub fn parse(per_second: u64, burst: Option<u64>) -> Result<Self, (&'static str, String)> {
        let range = || format!("must be between 1 and {}", Self::MAX);
        let per_second = match u32::try_from(per_second) {
            Ok(n @ 1..=Self::MAX) => n,
            _ => return Err(("rate_limit", range())),
        };
        let burst = match burst.map(u32::try_from) {
            None => (per_second / 10).max(1),
            Some(Ok(n @ 1..=Self::MAX)) => n,
            Some(_) => return Err(("rate_limit_burst", range())),
        };
        Ok(Self { per_second, burst })
    }

    pub fn per_second(self) -> u32 {
        self.per_second
    }

    pub fn burst(self) -> u32 {
        self.burst
    }
}

/// The delays between a delivery's attempts: one more attempt is made
/// than there are delays. A webhook may carry its own in place of the
/// server's (`WASMHOOK_RETRY_SCHEDULE`). Bounded in steps and in total, so
/// that a delivery ends, delivered or dead, well within retention's
/// default 30 days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule(Vec<std::time::Duration>);

impl RetrySchedule {
    pub const MAX_STEPS: usize = 30;
    pub const MAX_TOTAL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

    /// Each step a duration such as `5s`, `10m` or `1h 30m`; none zero.
    pub fn parse<S: AsRef<str>>(steps: &[S]) -> Result<Self, String> {
        if steps.len() > Self::MAX_STEPS {
            return Err(format!(
                "has {} steps; at most {}",
                steps.len(),
                Self::MAX_STEPS
            ));
        }
        let mut delays = Vec::with_capacity(steps.len());
        for step in steps {
            let step = step.as_ref().trim();
            let delay = humantime::parse_duration(step)
                .map_err(|e| format!("`{}` is not a duration: {e}", quoted(step)))?;
            if delay.is_zero() {
                return Err("a step of zero would retry at once; give each a delay".into());
            }
            delays.push(delay);
        }
        let total: std::time::Duration = delays.iter().sum();
        if total > Self::MAX_TOTAL {
            return Err(format!(
                "adds up to {}; at most {}",
                humantime::format_duration(total),
                humantime::format_duration(Self::MAX_TOTAL)
            ));
        }
        Ok(Self(delays))
    }

    /// The stored form: the steps joined by commas.
    pub fn from_text(text: &str) -> Result<Self, String> {
        let steps: Vec<&str> = text.split(',').filter(|s| !s.trim().is_empty()).collect();
        Self::parse(&steps)
    }

    pub fn to_text(&self) -> String {
        self.steps().join(",")
    }

    /// Each delay as a duration string (`5s`, `1h 30m`).
    pub fn steps(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|d| humantime::format_duration(*d).to_string())
            .collect()
    }

    pub fn delays(&self) -> &[std::time::Duration] {
        &self.0
    }
}

/// The most bytes kept of any text a receiver or a plugin hands us that is
/// stored, logged or returned: attempt errors, plugin error messages.
pub const MAX_FOREIGN_TEXT: usize = 4096;

/// `text` cut to at most `max` bytes, on a character boundary, ending with
/// a note of how much was cut. Text from outside passes through here
/// before it is stored, so no one can grow the database through it.
pub fn bounded(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let note = format!(" … ({} bytes cut)", text.len());
    let mut keep = max.saturating_sub(note.len());
    while !text.is_char_boundary(keep) {
        keep -= 1;
    }
    text.truncate(keep);
    text.push_str(&note);
    text
}

/// The start of `text`, for quoting untrusted names in a message.
pub fn quoted(text: &str) -> String {
    const QUOTE: usize = 64;
    bounded(text.to_owned(), QUOTE + 24)
}

/// A client-chosen event id; it becomes the `webhook-id` header.
pub fn parse_event_id(text: &str) -> Result<EventId, String> {
    if text.is_empty() || text.len() > MAX_ID_LEN {
        return Err(format!("must be 1 to {MAX_ID_LEN} characters"));
    }
    if let Some(bad) = text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!("contains `{bad}`; use letters, digits and _ - ."));
    }
    Ok(EventId::from(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(items: &[&str]) -> EventTypeFilter {
        let items: Vec<String> = items.iter().map(|s| s.to_string()).collect();
        EventTypeFilter::parse(Some(&items)).unwrap()
    }

    #[test]
    fn exact_and_prefix_filters() {
        let f = filter(&["invoice.*", "user.created"]);
        assert!(f.matches("invoice.paid"));
        assert!(f.matches("invoice.line.added"));
        assert!(f.matches("user.created"));
        assert!(!f.matches("user.deleted"));
        assert!(!f.matches("invoices.paid"));
        assert!(filter(&["*"]).matches("anything"));
        assert!(EventTypeFilter::parse(None).unwrap().matches("x"));
    }

    #[test]
    fn bad_filters_are_refused() {
        for bad in [
            vec![],
            vec!["invoice*".to_string()],
            vec!["in voice".to_string()],
        ] {
            assert!(EventTypeFilter::parse(Some(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn foreign_text_is_cut_on_a_character_boundary() {
        assert_eq!(bounded("short".into(), 16), "short");
        let long = "é".repeat(10_000);
        let cut = bounded(long, MAX_FOREIGN_TEXT);
        assert!(cut.len() <= MAX_FOREIGN_TEXT, "{}", cut.len());
        assert!(cut.ends_with("(20000 bytes cut)"), "{cut}");
        assert!(cut.starts_with("éé"));
        assert!(quoted(&"x".repeat(1 << 20)).len() <= 88);
    }

    #[test]
    fn a_retry_schedule_is_bounded_and_round_trips() {
        let schedule = RetrySchedule::parse(&["5s", "10m", "1h 30m"]).unwrap();
        assert_eq!(schedule.steps(), vec!["5s", "10m", "1h 30m"]);
        assert_eq!(RetrySchedule::from_text(&schedule.to_text()), Ok(schedule));
        assert!(
            RetrySchedule::parse::<&str>(&[])
                .unwrap()
                .delays()
                .is_empty()
        );
        assert!(
            RetrySchedule::parse(&["soon"])
                .unwrap_err()
                .contains("soon")
        );
        assert!(RetrySchedule::parse(&["0s"]).is_err());
        assert!(
            RetrySchedule::parse(&["1s"; 31])
                .unwrap_err()
                .contains("31 steps")
        );
        assert!(
            RetrySchedule::parse(&["4days", "4days"])
                .unwrap_err()
                .contains("adds up")
        );
    }

    #[test]
    fn a_rate_limit_bursts_a_tenth_of_a_second_unless_told() {
        let limit = RateLimit::parse(10, None).unwrap();
        assert_eq!((limit.per_second(), limit.burst()), (10, 1));
        assert_eq!(RateLimit::parse(2_000, None).unwrap().burst(), 200);
        assert_eq!(RateLimit::parse(5, Some(40)).unwrap().burst(), 40);
        assert_eq!(RateLimit::parse(0, None).unwrap_err().0, "rate_limit");
        assert_eq!(RateLimit::parse(10_001, None).unwrap_err().0, "rate_limit");
        assert_eq!(
            RateLimit::parse(10, Some(0)).unwrap_err().0,
            "rate_limit_burst"
        );
    }

    #[test]
    fn reserved_headers_are_refused() {
        for name in [
            "webhook-signature",
            "Webhook-Id",
            "Host",
            "content-length",
            "Connection",
        ] {
            let map = BTreeMap::from([(name.to_string(), "x".to_string())]);
            assert!(CustomHeaders::parse(&map).is_err(), "{name}");
        }
        let map = BTreeMap::from([("X-Tenant".to_string(), "acme".to_string())]);
        assert_eq!(
            CustomHeaders::parse(&map).unwrap().as_map()["x-tenant"],
            "acme"
        );
    }
}
