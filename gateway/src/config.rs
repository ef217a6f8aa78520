//! Configuration: every setting of `wasmhook serve`, as a flag with an
//! environment-variable equivalent, parsed once at start into typed values.

use std::net::SocketAddr;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, ValueEnum};
use ipnet::IpNet;

use crate::clock::millis;
use crate::domain::lane::BreakerPolicy;
use crate::domain::{InFlightLimit, SharePercent};
use crate::plugin::PluginLimits;
use crate::url_safety::UrlPolicy;

#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Database to use: `sqlite://path` (created when missing), or
    /// `postgres://user:password@host:port/database` to share one queue
    /// between several gateway processes.
    #[arg(
        long,
        env = "WASMHOOK_DATABASE_URL",
        hide_env_values = true,
        default_value = "sqlite://wasmhook.db"
    )]
    pub database_url: String,

    /// What this process runs: the REST API and the delivery worker
    /// (`all`), only the API (`api`), or only the worker (`worker`, which
    /// still answers /healthz and /readyz).
    #[arg(long, env = "WASMHOOK_ROLE", value_enum, default_value_t = Role::All)]
    pub role: Role,

    /// Address the REST API listens on (port 0 picks a free port).
    #[arg(long, env = "WASMHOOK_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Admin bearer token. When unset, one is generated on first start,
    /// printed once, and only its hash is stored.
    #[arg(long, env = "WASMHOOK_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Allow `http://` webhook targets (otherwise only `https://`).
    #[arg(long, env = "WASMHOOK_ALLOW_HTTP", default_value = "false",
          value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub allow_http: bool,

    /// Comma-separated CIDRs exempt from the private-address block,
    /// e.g. `127.0.0.0/8` for local testing.
    #[arg(long, env = "WASMHOOK_ALLOWED_CIDRS", value_delimiter = ',')]
    pub allowed_cidrs: Vec<IpNet>,

    /// Delays between attempts; one more attempt than delays is made.
    #[arg(long, env = "WASMHOOK_RETRY_SCHEDULE", value_delimiter = ',',
          default_value = "5s,5m,30m,2h,5h,10h,10h", value_parser = parse_duration)]
    pub retry_schedule: Vec<Duration>,

    /// Timeout of one delivery attempt, connecting included.
    #[arg(long, env = "WASMHOOK_REQUEST_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Largest accepted event payload, in bytes of JSON.
    #[arg(long, env = "WASMHOOK_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,

    /// Deliveries sent at once by this process.
    #[arg(long, env = "WASMHOOK_WORKER_CONCURRENCY", default_value_t = 128)]
    pub worker_concurrency: usize,

    /// Attempts in flight at once to one webhook, across every process,
    /// for webhooks that set no `max_in_flight` of their own: a slow
    /// endpoint holds at most this many of the workers' slots.
    #[arg(long, env = "WASMHOOK_MAX_IN_FLIGHT", default_value = "32", value_parser = parse_in_flight_limit)]
    pub max_in_flight: InFlightLimit,

    /// The part of this process's delivery slots, in percent, that apps
    /// with deliveries in flight share fairly between them; the rest stays
    /// free, so an app that starts publishing is served at once beside
    /// another app's hundreds of slow webhooks. 100 keeps nothing free.
    #[arg(long, env = "WASMHOOK_APP_SHARE", default_value = "75", value_parser = parse_share)]
    pub app_share: SharePercent,

    /// Most deliveries claimed, or attempt results written, in one
    /// transaction.
    #[arg(long, env = "WASMHOOK_BATCH_SIZE", default_value_t = 256)]
    pub batch_size: usize,

    /// Connections to a PostgreSQL database, per process.
    #[arg(long, env = "WASMHOOK_DATABASE_POOL_SIZE", default_value_t = 16)]
    pub database_pool_size: u32,

    /// How long a claimed delivery stays with its worker before another
    /// may take it over; must exceed the request timeout.
    #[arg(long, env = "WASMHOOK_LEASE", default_value = "60s", value_parser = parse_duration)]
    pub lease: Duration,

    /// How often an idle worker looks for due deliveries (publishes in this
    /// process wake it at once).
    #[arg(long, env = "WASMHOOK_POLL_INTERVAL", default_value = "200ms", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// How long both the old and the new secret sign after a rotation.
    #[arg(long, env = "WASMHOOK_SECRET_ROTATION_OVERLAP", default_value = "24h", value_parser = parse_duration)]
    pub secret_rotation_overlap: Duration,

    /// A webhook whose every attempt failed for this long is disabled.
    #[arg(long, env = "WASMHOOK_DISABLE_AFTER", default_value = "5d", value_parser = parse_duration)]
    pub disable_after: Duration,

    /// A webhook's circuit breaker opens when at least this share of its
    /// attempts (in percent) failed ...
    #[arg(long, env = "WASMHOOK_BREAKER_FAILURE_PERCENT", default_value_t = 70, value_parser = clap::value_parser!(i64).range(1..=100))]
    pub breaker_failure_percent: i64,

    /// ... of at least this many attempts ...
    #[arg(long, env = "WASMHOOK_BREAKER_MIN_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(i64).range(1..))]
    pub breaker_min_attempts: i64,

    /// ... within a window this long.
    #[arg(long, env = "WASMHOOK_BREAKER_WINDOW", default_value = "5m", value_parser = parse_duration)]
    pub breaker_window: Duration,

    /// How long an open breaker holds the endpoint's deliveries before its
    /// first probe; each failed probe doubles it, up to 5 minutes.
    #[arg(long, env = "WASMHOOK_BREAKER_FIRST_PROBE", default_value = "5s", value_parser = parse_duration)]
    pub breaker_first_probe: Duration,

    /// Window in which a repeated idempotency key or event id returns the
    /// first answer.
    #[arg(long, env = "WASMHOOK_IDEMPOTENCY_WINDOW", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_window: Duration,

    /// Deadline of one plugin invocation (wall clock), instantiation included.
    #[arg(long, env = "WASMHOOK_PLUGIN_DEADLINE", default_value = "100ms", value_parser = parse_duration)]
    pub plugin_deadline: Duration,

    /// Linear memory one plugin invocation may use, in bytes.
    #[arg(long, env = "WASMHOOK_PLUGIN_MEMORY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub plugin_memory_bytes: usize,

    /// Largest body a plugin may produce, in bytes.
    #[arg(long, env = "WASMHOOK_PLUGIN_MAX_OUTPUT_BYTES", default_value_t = 1024 * 1024)]
    pub plugin_max_output_bytes: usize,

    /// Largest plugin upload, in bytes.
    #[arg(long, env = "WASMHOOK_PLUGIN_MAX_UPLOAD_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub plugin_max_upload_bytes: usize,

    /// Plugin invocations run at once (0: twice the number of CPUs).
    #[arg(long, env = "WASMHOOK_PLUGIN_CONCURRENCY", default_value_t = 0)]
    pub plugin_concurrency: usize,

    /// How long events and their delivery history are kept: older events
    /// whose deliveries are all finished are deleted in the background.
    #[arg(long, env = "WASMHOOK_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub retention: Duration,

    /// Time between two retention sweeps.
    #[arg(long, env = "WASMHOOK_RETENTION_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub retention_interval: Duration,

    /// How long a client may take to send a request's head, and how long
    /// an idle keep-alive connection stays open.
    #[arg(long, env = "WASMHOOK_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Open API connections at most; past it a new one is answered 503
    /// and closed. Keep it below the process's open-file limit.
    #[arg(long, env = "WASMHOOK_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// How long shutdown waits for in-flight deliveries before releasing
    /// them back to the queue.
    #[arg(long, env = "WASMHOOK_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    All,
    Api,
    Worker,
}

impl Role {
    pub fn serves_api(self) -> bool {
        matches!(self, Self::All | Self::Api)
    }

    pub fn delivers(self) -> bool {
        matches!(self, Self::All | Self::Worker)
    }
}

impl Settings {
    pub fn plugin_limits(&self) -> PluginLimits {
        PluginLimits {
            deadline: self.plugin_deadline,
            max_memory_bytes: self.plugin_memory_bytes,
            max_output_bytes: self.plugin_max_output_bytes,
            ..PluginLimits::default()
        }
    }

    pub fn plugin_concurrency(&self) -> usize {
        match self.plugin_concurrency {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get() * 2),
            n => n,
        }
    }

    pub fn breaker_policy(&self) -> BreakerPolicy {
        BreakerPolicy {
            failure_percent: self.breaker_failure_percent,
            min_attempts: self.breaker_min_attempts,
            window_ms: millis(self.breaker_window),
            first_probe_ms: millis(self.breaker_first_probe),
        }
    }

    pub fn url_policy(&self) -> UrlPolicy {
        UrlPolicy::new(self.allow_http, self.allowed_cidrs.clone())
    }

    /// Rejects combinations that would misbehave at run time.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease <= self.request_timeout {
            return Err(format!(
                "--lease ({:?}) must be longer than --request-timeout ({:?}), or a slow receiver would get the same delivery twice",
                self.lease, self.request_timeout
            ));
        }
        if self.retention < self.idempotency_window {
            return Err(format!(
                "--retention ({:?}) must be at least --idempotency-window ({:?}), or a repeated key could queue its event again",
                self.retention, self.idempotency_window
            ));
        }
        if self.batch_size == 0 {
            return Err("--batch-size must be at least 1".into());
        }
        if self.database_pool_size == 0 {
            return Err("--database-pool-size must be at least 1".into());
        }
        if self.worker_concurrency == 0 {
            return Err("--worker-concurrency must be at least 1".into());
        }
        Ok(())
    }
}

/// Parses `250ms`, `5s`, `30m`, `2h`, `5d` and combinations such as `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("`{text}` is not a duration: {e}"))
}

fn parse_share(text: &str) -> Result<SharePercent, String> {
    let n: u64 = text
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number"))?;
    SharePercent::parse(n)
}

fn parse_in_flight_limit(text: &str) -> Result<InFlightLimit, String> {
    let n: u64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number"))?;
    InFlightLimit::parse(n)
}
