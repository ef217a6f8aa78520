//! The admin CLI: subcommands of `wasmhook` that talk to a running gateway
//! over its REST API (`--url`/`WASMHOOK_URL`, `--token`/`WASMHOOK_TOKEN`).
//! Lists print as tables and single records as field tables for people;
//! `--json` prints the API's JSON for scripts. Errors name what was wrong
//! and end the process with status 1.

mod client;
mod output;

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

pub use client::CliError;
use client::Client;
use output::Output;

/// Where the gateway is and how to talk to it; valid after any subcommand.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// The gateway's base URL.
    #[arg(
        long = "url",
        id = "gateway_url",
        global = true,
        env = "WASMHOOK_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// Bearer token: the admin token, or an app key for app-scoped commands.
    #[arg(long, global = true, env = "WASMHOOK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

/// The app an app-scoped command works in.
#[derive(Debug, Clone, Args)]
pub struct AppScope {
    /// The app's id or uid.
    #[arg(long, global = true, env = "WASMHOOK_APP")]
    app: Option<String>,
}

impl AppScope {
    /// `/v1/apps/{app}`, or an error saying how to name the app.
    fn path(&self) -> Result<String, CliError> {
        match &self.app {
            Some(app) => Ok(format!("/v1/apps/{}", segment(app))),
            None => Err(CliError::Input(
                "which app? give --app <id or uid> or set WASMHOOK_APP".into(),
            )),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Create an app (admin token).
    Create {
        name: String,
        /// Your own id for it, usable wherever an app id is.
        #[arg(long)]
        uid: Option<String>,
    },
    /// List apps (admin token).
    List,
}

#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Register a webhook; its signing secret is shown this once.
    Create {
        /// Where deliveries go (https, or http when the gateway allows it).
        #[arg(value_name = "URL")]
        target: String,
        /// Event types it receives (repeatable; `invoice.*` for a prefix);
        /// all when none is given.
        #[arg(long = "event-type")]
        event_types: Vec<String>,
        #[arg(long)]
        description: Option<String>,
        /// Extra request header, `Name=value` (repeatable).
        #[arg(long = "header", value_parser = key_value)]
        headers: Vec<(String, String)>,
        /// Send the published payload as it is, without the envelope.
        #[arg(long)]
        raw_payload: bool,
        /// Attempts in flight at once to this webhook (default: the
        /// gateway's `WASMHOOK_MAX_IN_FLIGHT`).
        #[arg(long)]
        max_in_flight: Option<u32>,
        /// Deliveries per second the endpoint receives at most (default:
        /// no limit).
        #[arg(long)]
        rate_limit: Option<u32>,
        /// How many may arrive at once within `--rate-limit` (default: a
        /// tenth of a second's worth).
        #[arg(long, requires = "rate_limit")]
        rate_limit_burst: Option<u32>,
        /// This webhook's delays between attempts, comma-separated, e.g.
        /// `10s,5m,1h` (default: the gateway's `WASMHOOK_RETRY_SCHEDULE`).
        #[arg(long, value_delimiter = ',')]
        retry_schedule: Option<Vec<String>>,
    },
    /// The app's webhooks.
    List,
    /// One webhook (its secret masked).
    Show { webhook: String },
    /// Change a webhook's traffic settings; what is not given stays.
    Update {
        webhook: String,
        /// Attempts in flight at once to this webhook.
        #[arg(long)]
        max_in_flight: Option<u32>,
        /// Deliveries per second the endpoint receives at most (its burst
        /// back to the default unless `--rate-limit-burst` is given too).
        #[arg(long, conflicts_with = "no_rate_limit")]
        rate_limit: Option<u32>,
        /// How many may arrive at once within the rate limit.
        #[arg(long, conflicts_with = "no_rate_limit")]
        rate_limit_burst: Option<u32>,
        /// Lift the rate limit.
        #[arg(long)]
        no_rate_limit: bool,
        /// New delays between attempts, comma-separated, e.g. `10s,5m,1h`.
        #[arg(long, value_delimiter = ',', conflicts_with = "default_retry_schedule")]
        retry_schedule: Option<Vec<String>>,
        /// Go back to the gateway's retry schedule.
        #[arg(long)]
        default_retry_schedule: bool,
        /// Enable (`true`) or disable (`false`) the webhook.
        #[arg(long)]
        enabled: Option<bool>,
    },
    /// Delete a webhook with its deliveries.
    Delete { webhook: String },
    /// New secret; the old one keeps signing during the overlap.
    RotateSecret { webhook: String },
}

#[derive(Debug, Subcommand)]
pub enum EventCommand {
    /// Publish an event to every subscribed webhook.
    Publish(PublishArgs),
    /// Send an event again: to one webhook, or to every webhook subscribed
    /// now (with the same `webhook-id`, so receivers can deduplicate).
    Replay {
        event: String,
        /// Only this webhook (whatever its event filter).
        #[arg(long)]
        webhook: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    event_type: String,
    /// The payload, JSON text.
    #[arg(
        long,
        conflicts_with = "payload_file",
        required_unless_present = "payload_file"
    )]
    payload: Option<String>,
    /// The payload, from a JSON file.
    #[arg(long)]
    payload_file: Option<PathBuf>,
    /// Your id for the event (repeats within the window are ignored).
    #[arg(long)]
    id: Option<String>,
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Events with the same key reach each webhook one at a time, in
    /// publish order.
    #[arg(long)]
    ordering_key: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DeliveryCommand {
    /// Deliveries of one event, or of one webhook.
    List {
        #[arg(long, conflicts_with = "webhook", required_unless_present = "webhook")]
        event: Option<String>,
        #[arg(long)]
        webhook: Option<String>,
        /// Only this status (with --webhook): pending, sending, succeeded,
        /// failed, dead, skipped.
        #[arg(long, requires = "webhook")]
        status: Option<String>,
    },
    /// One delivery with every attempt.
    Show { delivery: String },
    /// Send it again now, also when dead.
    Retry { delivery: String },
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Upload a WebAssembly component (admin token).
    Push {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
    },
    /// Uploaded plugins.
    List,
    /// Run a plugin on a sample event, as a delivery would: prints the
    /// outcome and the plugin's log.
    Test {
        plugin: String,
        /// The sample payload, a JSON file.
        #[arg(long)]
        payload: PathBuf,
        /// The config, a JSON file.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "test.event")]
        event_type: String,
    },
    /// Attach a plugin to a webhook, with its config.
    Attach {
        webhook: String,
        plugin: String,
        /// The config: JSON text, or `@file.json`.
        #[arg(long)]
        config: Option<String>,
        /// The webhook's app (id or uid).
        #[arg(long, env = "WASMHOOK_APP")]
        app: String,
    },
    /// Take the plugin off a webhook.
    Detach {
        webhook: String,
        #[arg(long, env = "WASMHOOK_APP")]
        app: String,
    },
}

/// One admin command, ready to run.
#[derive(Debug)]
pub enum Request {
    App(AppCommand),
    Webhook(AppScope, WebhookCommand),
    Event(AppScope, EventCommand),
    Delivery(AppScope, DeliveryCommand),
    Plugin(PluginCommand),
}

/// Runs `request` against the gateway and prints the result on stdout.
pub async fn run(remote: &Remote, request: Request) -> Result<(), CliError> {
    let client = Client::new(&remote.url, remote.token.clone());
    let out = Output { json: remote.json };
    match request {
        Request::App(command) => app(&client, &out, command).await,
        Request::Webhook(scope, command) => webhook(&client, &out, &scope, command).await,
        Request::Event(scope, command) => event(&client, &out, &scope, command).await,
        Request::Delivery(scope, command) => delivery(&client, &out, &scope, command).await,
        Request::Plugin(command) => plugin(&client, &out, command).await,
    }
}

const APP_COLUMNS: &[&str] = &["id", "uid", "name", "created_at"];
const WEBHOOK_COLUMNS: &[&str] = &["id", "url", "enabled", "event_types", "plugin"];
const DELIVERY_COLUMNS: &[&str] = &[
    "id",
    "event_id",
    "webhook_id",
    "status",
    "attempt_count",
    "last_status_code",
    "next_attempt_at",
];
const PLUGIN_COLUMNS: &[&str] = &["id", "name", "version", "size", "sha256", "created_at"];

async fn app(client: &Client, out: &Output, command: AppCommand) -> Result<(), CliError> {
    match command {
        AppCommand::Create { name, uid } => {
            let body = json!({ "name": name, "uid": uid });
            out.record(&client.post("/v1/apps", &body).await?);
        }
        AppCommand::List => out.list(&client.list_all("/v1/apps").await?, APP_COLUMNS),
    }
    Ok(())
}

async fn webhook(
    client: &Client,
    out: &Output,
    scope: &AppScope,
    command: WebhookCommand,
) -> Result<(), CliError> {
    let base = format!("{}/webhooks", scope.path()?);
    let one = |id: &str| format!("{base}/{}", segment(id));
    match command {
        WebhookCommand::Create {
            target,
            event_types,
            description,
            headers,
            raw_payload,
            max_in_flight,
            rate_limit,
            rate_limit_burst,
            retry_schedule,
        } => {
            let mut body = json!({ "url": target, "raw_payload": raw_payload });
            if let Some(schedule) = retry_schedule {
                body["retry_schedule"] = json!(schedule);
            }
            if let Some(max_in_flight) = max_in_flight {
                body["max_in_flight"] = json!(max_in_flight);
            }
            if let Some(rate_limit) = rate_limit {
                body["rate_limit"] = json!(rate_limit);
            }
            if let Some(burst) = rate_limit_burst {
                body["rate_limit_burst"] = json!(burst);
            }
            if !event_types.is_empty() {
                body["event_types"] = json!(event_types);
            }
            if let Some(description) = description {
                body["description"] = json!(description);
            }
            if !headers.is_empty() {
                body["headers"] = headers
                    .into_iter()
                    .map(|(name, value)| (name, Value::String(value)))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
            }
            let created = client.post(&base, &body).await?;
            out.record(&created);
            out.note("The secret is shown only now: give it to the receiver.");
        }
        WebhookCommand::List => out.list(&client.list_all(&base).await?, WEBHOOK_COLUMNS),
        WebhookCommand::Show { webhook } => out.record(&client.get(&one(&webhook)).await?),
        WebhookCommand::Update {
            webhook,
            max_in_flight,
            rate_limit,
            rate_limit_burst,
            no_rate_limit,
            retry_schedule,
            default_retry_schedule,
            enabled,
        } => {
            let mut body = json!({});
            if let Some(schedule) = retry_schedule {
                body["retry_schedule"] = json!(schedule);
            }
            if default_retry_schedule {
                body["retry_schedule"] = Value::Null;
            }
            if let Some(max_in_flight) = max_in_flight {
                body["max_in_flight"] = json!(max_in_flight);
            }
            if let Some(rate_limit) = rate_limit {
                body["rate_limit"] = json!(rate_limit);
            }
            if no_rate_limit {
                body["rate_limit"] = Value::Null;
            }
            if let Some(burst) = rate_limit_burst {
                body["rate_limit_burst"] = json!(burst);
            }
            if let Some(enabled) = enabled {
                body["enabled"] = json!(enabled);
            }
            let request = client.request(Method::PATCH, &one(&webhook)).json(&body);
            out.record(&client.send(request).await?);
        }
        WebhookCommand::Delete { webhook } => {
            client
                .send(client.request(Method::DELETE, &one(&webhook)))
                .await?;
            out.done(&format!("webhook {webhook} deleted"));
        }
        WebhookCommand::RotateSecret { webhook } => {
            let rotated = client
                .post(&format!("{}/secret/rotate", one(&webhook)), &json!({}))
                .await?;
            out.record(&rotated);
            out.note("The old secret keeps signing until the overlap ends.");
        }
    }
    Ok(())
}

async fn event(
    client: &Client,
    out: &Output,
    scope: &AppScope,
    command: EventCommand,
) -> Result<(), CliError> {
    let args = match command {
        EventCommand::Publish(args) => args,
        EventCommand::Replay { event, webhook } => {
            let body = match webhook {
                Some(webhook) => json!({ "webhook_id": webhook }),
                None => json!({}),
            };
            let path = format!("{}/events/{event}/replay", scope.path()?);
            let accepted = client.post(&path, &body).await?;
            report_queued(out, &accepted, "queued again");
            return Ok(());
        }
    };
    let PublishArgs {
        event_type,
        payload,
        payload_file,
        id,
        idempotency_key,
        ordering_key,
    } = args;
    let payload = match (payload, payload_file) {
        (Some(text), _) => parse_json("--payload", &text)?,
        (None, Some(file)) => read_json(&file)?,
        (None, None) => return Err(CliError::Input("give --payload or --payload-file".into())),
    };
    let mut body = json!({ "event_type": event_type, "payload": payload });
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    if let Some(key) = ordering_key {
        body["ordering_key"] = json!(key);
    }
    let path = format!("{}/events", scope.path()?);
    let mut request = client.request(Method::POST, &path).json(&body);
    if let Some(key) = idempotency_key {
        request = request.header("idempotency-key", key);
    }
    let accepted = client.send(request).await?;
    report_queued(out, &accepted, "accepted");
    Ok(())
}

/// An event's id and the deliveries an answer says were queued.
fn report_queued(out: &Output, accepted: &Value, what: &str) {
    if out.json {
        out.record(accepted);
        return;
    }
    let deliveries = accepted["deliveries"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    out.done(&format!(
        "event {} {what}, {} deliveries queued",
        accepted["id"].as_str().unwrap_or("?"),
        deliveries.len()
    ));
    if !deliveries.is_empty() {
        out.list(&deliveries, &["id", "webhook_id"]);
    }
}

async fn delivery(
    client: &Client,
    out: &Output,
    scope: &AppScope,
    command: DeliveryCommand,
) -> Result<(), CliError> {
    let app = scope.path()?;
    match command {
        DeliveryCommand::List {
            event: Some(event), ..
        } => {
            let found = client
                .get(&format!("{app}/events/{}/deliveries", segment(&event)))
                .await?;
            let deliveries = found.as_array().cloned().unwrap_or_default();
            out.list(&deliveries, DELIVERY_COLUMNS);
        }
        DeliveryCommand::List {
            webhook: Some(webhook),
            status,
            ..
        } => {
            let mut path = format!("{app}/webhooks/{}/deliveries", segment(&webhook));
            if let Some(status) = status {
                path = format!("{path}?status={}", segment(&status));
            }
            out.list(&client.list_all(&path).await?, DELIVERY_COLUMNS);
        }
        DeliveryCommand::List { .. } => {
            return Err(CliError::Input("give --event or --webhook".into()));
        }
        DeliveryCommand::Show { delivery } => {
            let found = client
                .get(&format!("{app}/deliveries/{}", segment(&delivery)))
                .await?;
            out.delivery(&found);
        }
        DeliveryCommand::Retry { delivery } => {
            let path = format!("{app}/deliveries/{}/retry", segment(&delivery));
            let retried = client.post(&path, &json!({})).await?;
            if out.json {
                out.record(&retried);
            } else {
                out.done(&format!("delivery {delivery} queued to be sent again now"));
            }
        }
    }
    Ok(())
}

async fn plugin(client: &Client, out: &Output, command: PluginCommand) -> Result<(), CliError> {
    match command {
        PluginCommand::Push {
            file,
            name,
            version,
        } => {
            let wasm = std::fs::read(&file)
                .map_err(|e| CliError::Input(format!("{}: {e}", file.display())))?;
            let request = client
                .request(Method::POST, "/v1/plugins")
                .query(&[("name", &name), ("version", &version)])
                .header("content-type", "application/wasm")
                .body(wasm);
            out.record(&client.send(request).await?);
        }
        PluginCommand::List => out.list(&client.list_all("/v1/plugins").await?, PLUGIN_COLUMNS),
        PluginCommand::Test {
            plugin,
            payload,
            config,
            event_type,
        } => {
            let config = match config {
                Some(file) => read_json(&file)?,
                None => Value::Null,
            };
            let body = json!({
                "event_type": event_type,
                "payload": read_json(&payload)?,
                "config": config,
            });
            let path = format!("/v1/plugins/{}/test", segment(&plugin));
            out.outcome(&client.post(&path, &body).await?);
        }
        PluginCommand::Attach {
            webhook,
            plugin,
            config,
            app,
        } => {
            let config = match config.as_deref() {
                Some(text) => match text.strip_prefix('@') {
                    Some(file) => read_json(Path::new(file))?,
                    None => parse_json("--config", text)?,
                },
                None => Value::Null,
            };
            let body = json!({ "plugin": { "id": plugin, "config": config } });
            out.record(&patch_webhook(client, &app, &webhook, &body).await?);
        }
        PluginCommand::Detach { webhook, app } => {
            let body = json!({ "plugin": null });
            out.record(&patch_webhook(client, &app, &webhook, &body).await?);
        }
    }
    Ok(())
}

async fn patch_webhook(
    client: &Client,
    app: &str,
    webhook: &str,
    body: &Value,
) -> Result<Value, CliError> {
    let path = format!("/v1/apps/{}/webhooks/{}", segment(app), segment(webhook));
    client
        .send(client.request(Method::PATCH, &path).json(body))
        .await
}

/// A path segment or query value, percent-encoded.
fn segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn parse_json(what: &str, text: &str) -> Result<Value, CliError> {
    serde_json::from_str(text).map_err(|e| CliError::Input(format!("{what} is not JSON: {e}")))
}

fn read_json(file: &Path) -> Result<Value, CliError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| CliError::Input(format!("{}: {e}", file.display())))?;
    parse_json(&file.display().to_string(), &text)
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{text}` is not Name=value"))
}
