//! Typed identifiers: one type per kind of record, so a webhook id can
//! never be passed where a delivery id is meant. Ids the gateway makes are
//! prefixed and time-ordered (`wh_01J…`); an id read from a request is
//! taken as given, and the store answers "not found" for one that is not
//! there.

/// Declares an id type: a string newtype with a prefix for new ids.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A new, prefixed, time-ordered id.
            pub fn new() -> Self {
                Self(format!("{}_{}", $prefix, ulid::Ulid::new()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl From<String> for $name {
            fn from(text: String) -> Self {
                Self(text)
            }
        }

        impl From<&str> for $name {
            fn from(text: &str) -> Self {
                Self(text.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
    };
}

id_type!(
    /// A tenant: one per customer of the publisher.
    AppId,
    "app"
);
id_type!(
    /// An app's API key (the key itself is never stored).
    KeyId,
    "key"
);
id_type!(
    /// A webhook endpoint of an app.
    WebhookId,
    "wh"
);
id_type!(
    /// An event; a client may choose it, and it becomes the `webhook-id`
    /// header receivers deduplicate on.
    EventId,
    "msg"
);
id_type!(
    /// One event's delivery to one webhook.
    DeliveryId,
    "dlv"
);
id_type!(
    /// One attempt of a delivery.
    AttemptId,
    "atm"
);
id_type!(
    /// An uploaded plugin (one name and version).
    PluginId,
    "plg"
);

/// A claim's fencing token: a record applies only while the delivery is
/// still held under it. It names the claiming process (`clm_<pid>_…`) so
/// an operator, or a test, can tell whose claims a `sending` delivery is
/// held by when several processes share the queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClaimToken(String);

impl ClaimToken {
    pub fn new() -> Self {
        Self(format!("clm_{}_{}", std::process::id(), ulid::Ulid::new()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for ClaimToken {
    fn default() -> Self {
        Self::new()
    }
}

impl From<String> for ClaimToken {
    fn from(text: String) -> Self {
        Self(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_carry_their_prefix_and_sort_by_time() {
        let first = WebhookId::new();
        // Ordered by millisecond; within one, the random part decides.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = WebhookId::new();
        assert!(first.as_str().starts_with("wh_"), "{first}");
        assert!(first <= second);
        assert!(DeliveryId::new().as_str().starts_with("dlv_"));
        let token = ClaimToken::new();
        let pid = format!("clm_{}_", std::process::id());
        assert!(token.as_str().starts_with(&pid));
    }

    #[test]
    fn ids_are_json_strings() {
        let id = AppId::from("app_1");
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""app_1""#);
        let back: AppId = serde_json::from_str(r#""app_1""#).unwrap();
        assert_eq!(back, id);
    }
}
