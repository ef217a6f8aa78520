//! The states and outcomes the gateway records, as enums: a delivery's
//! status, an attempt's outcome, and the class of a plugin failure. Each
//! has one stored (and shown) name; reading an unknown name back is
//! corrupt data, not a new state.

/// Declares a fieldless enum with one snake_case name per variant.
macro_rules! named_enum {
    ($(#[$doc:meta])* $name:ident { $( $(#[$vdoc:meta])* $variant:ident = $text:literal ),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vdoc])* $variant ),*
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$( $name::$variant ),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $text ),*
                }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text {
                    $( $text => Some(Self::$variant), )*
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }
    };
}

named_enum!(
    /// Where a delivery is in its life.
    DeliveryStatus {
        /// Queued, never attempted.
        Pending = "pending",
        /// Claimed by a worker: an attempt is under way.
        Sending = "sending",
        Succeeded = "succeeded",
        /// An attempt failed; another is scheduled.
        Failed = "failed",
        /// No attempts left, or the webhook is gone or disabled.
        Dead = "dead",
        /// A plugin decided not to send it.
        Skipped = "skipped",
    }
);

impl DeliveryStatus {
    /// Waiting for an attempt (its due time says when).
    pub fn is_waiting(self) -> bool {
        matches!(self, Self::Pending | Self::Failed)
    }

    /// Not ended: waiting, or being sent.
    pub fn is_unfinished(self) -> bool {
        self.is_waiting() || self == Self::Sending
    }
}

named_enum!(
    /// What one attempt came to.
    AttemptOutcome {
        /// The receiver answered 2xx.
        Success = "success",
        /// The receiver answered something else.
        HttpError = "http_error",
        Timeout = "timeout",
        Connection = "connection_error",
        /// The target failed the URL-safety checks at send time.
        UnsafeTarget = "unsafe_target",
        /// The stored webhook could not be turned into a request.
        InvalidWebhook = "invalid_webhook",
        /// The webhook's plugin failed; nothing was sent.
        Plugin = "plugin",
        /// The webhook's plugin decided not to send.
        Skipped = "skipped",
    }
);

impl AttemptOutcome {
    /// Whether the request went out (a duration worth graphing).
    pub fn reached_network(self) -> bool {
        matches!(self, Self::Success | Self::HttpError | Self::Timeout)
    }
}

named_enum!(
    /// Why a plugin invocation failed, as recorded on its attempt.
    PluginFailure {
        Timeout = "timeout",
        MemoryLimit = "memory_limit",
        StackOverflow = "stack_overflow",
        Trap = "trap",
        InvalidOutput = "invalid_output",
        /// The plugin returned an error of its own.
        Returned = "plugin_error",
        /// The plugin could not be loaded.
        Unavailable = "unavailable",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for status in DeliveryStatus::ALL {
            assert_eq!(DeliveryStatus::parse(status.as_str()), Some(*status));
        }
        for outcome in AttemptOutcome::ALL {
            assert_eq!(AttemptOutcome::parse(outcome.as_str()), Some(*outcome));
        }
        for failure in PluginFailure::ALL {
            assert_eq!(PluginFailure::parse(failure.as_str()), Some(*failure));
        }
        assert_eq!(DeliveryStatus::parse("lost"), None);
    }
}
