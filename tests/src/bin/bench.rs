//! The wasmhook benchmark: starts the (release) gateway on a fresh database
//! and a receiver on 127.0.0.1, publishes events with concurrent publishers
//! to several webhooks, and reports publish rate and latency, end-to-end
//! delivery rate, publish→receipt latency and the gateway's peak RSS.
//!
//! `--backlog` publishes everything to an API-only process first, then
//! starts a full gateway on the same database and measures how it drains
//! the backlog (and how much memory that takes).
//!
//! `--ordering-keys K` publishes every event with one of K ordering keys, to
//! measure what ordered delivery costs.
//!
//! `--neighbour hang|fail|plugin|throttle|busy-app` measures fairness instead: a healthy
//! app's delivery rate beside another app's noisy webhook, as a ratio to
//! its rate alone, in interleaved rounds.
//!
//! With `WASMHOOK_TEST_POSTGRES_URL` set, it runs on a fresh PostgreSQL
//! database on that server; `--workers N` then runs one API-only process
//! and N worker-only processes sharing the queue.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};
use wasmhook_tests::neighbour::{self, Neighbour, Round, median};
use wasmhook_tests::{GatewayBuilder, Receiver, TestGateway};

#[derive(Parser, Debug)]
#[command(about = "Benchmark the wasmhook gateway end to end on this machine")]
struct Args {
    /// Events to publish.
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    /// Concurrent publishers.
    #[arg(long, default_value_t = 16)]
    publishers: usize,
    /// Webhooks subscribed to every event (deliveries = events × webhooks).
    #[arg(long, default_value_t = 1)]
    webhooks: usize,
    /// Cap on the total publish rate in events/s (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Publish with no worker running, then measure draining the backlog.
    #[arg(long)]
    backlog: bool,
    /// Approximate size of each event's JSON payload.
    #[arg(long, default_value_t = 1024)]
    payload_bytes: usize,
    /// Attach this plugin from `plugins/` (e.g. `passthrough`,
    /// `cloudevents`) to every webhook; scripts/test builds them.
    #[arg(long)]
    plugin: Option<String>,
    /// The attached plugin's config (JSON).
    #[arg(long, default_value = "null", value_parser = parse_json)]
    plugin_config: Value,
    /// Worker-only processes beside one API-only process (0: one process
    /// does both). Needs PostgreSQL (`WASMHOOK_TEST_POSTGRES_URL`).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Measure fairness instead: a healthy app's webhook alone, then
    /// beside another app's noisy one (an endpoint that hangs, fails at
    /// once or answers 429, a runaway plugin, or an app with 200 slow
    /// endpoints), on a fresh gateway each round;
    /// prints the healthy rate beside it as a ratio to alone. `--events`
    /// is the healthy events per run.
    #[arg(long, value_enum)]
    neighbour: Option<Neighbour>,
    /// Rounds of the neighbour mode.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Publish every event with an `ordering_key`, event `n` with key
    /// `n mod K`: each webhook gets each key's events one at a time, in
    /// order (0: no keys).
    #[arg(long, default_value_t = 0)]
    ordering_keys: usize,
    /// Extra gateway settings, as KEY=VALUE (repeatable).
    #[arg(long = "gateway-env", value_parser = parse_key_value)]
    gateway_env: Vec<(String, String)>,
}

fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{text}` is not KEY=VALUE"))
}

struct Published {
    id: String,
    started: Instant,
    latency: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.events == 0 || args.publishers == 0 || args.webhooks == 0 {
        bail!("--events, --publishers and --webhooks must be at least 1");
    }
    if let Some(neighbour) = args.neighbour {
        return neighbour_mode(&args, neighbour).await;
    }
    let receiver = Receiver::start().await;
    let mut builder = GatewayBuilder::default()
        .env("WASMHOOK_LOG", "warn")
        .env("WASMHOOK_RETRY_SCHEDULE", "1s,5s,30s");
    for (key, value) in &args.gateway_env {
        builder = builder.env(key, value);
    }
    if args.backlog || args.workers > 0 {
        builder = builder.env("WASMHOOK_ROLE", "api");
    }
    let gateway = builder.spawn().await;
    if args.workers > 0 && !gateway.workspace.is_postgres() {
        bail!("--workers needs PostgreSQL: set WASMHOOK_TEST_POSTGRES_URL");
    }
    let app = gateway.create_app("bench").await;
    let plugin = match &args.plugin {
        Some(name) => {
            let uploaded = Instant::now();
            let id = gateway.plugin(name).await;
            // Measure the steady state: deliveries on the optimised code,
            // with its one-off background compile out of the way.
            gateway
                .wait_for_optimised_plugins(Duration::from_secs(60))
                .await;
            println!(
                "plugin `{name}` uploaded; optimised code stored after {:.0?}",
                uploaded.elapsed()
            );
            json!({ "id": id, "config": args.plugin_config })
        }
        None => Value::Null,
    };
    for i in 0..args.webhooks {
        let url = receiver.url(&format!("/w{i}"));
        gateway
            .create_webhook(&app, json!({ "url": url, "plugin": plugin }))
            .await;
    }
    let expected = args.events * args.webhooks;
    println!(
        "wasmhook bench: {} events × {} webhooks = {expected} deliveries, {} publishers, payload ≈{} B{}{}",
        args.events,
        args.webhooks,
        args.publishers,
        args.payload_bytes,
        if args.rate > 0 {
            format!(", rate cap {}/s", args.rate)
        } else {
            String::new()
        },
        if args.backlog { ", backlog mode" } else { "" },
    );
    if let Some(name) = &args.plugin {
        println!("plugin `{name}` attached to every webhook");
    }
    println!(
        "database: {}{}",
        if gateway.workspace.is_postgres() {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        if args.workers > 0 {
            format!(", 1 API process + {} worker processes", args.workers)
        } else {
            String::new()
        }
    );
    let mut workers = Vec::new();
    if !args.backlog {
        workers = start_workers(&gateway, args.workers).await;
    }

    // What the gateway spent before (start-up, plugin compiles) is not
    // the deliveries' cost.
    let cpu_before = cpu_time(gateway.pid());
    let threads_before = thread_cpu(gateway.pid());
    // Transactions of the whole run, or of the drain alone.
    let mut commits_before = commits(&gateway).await;
    let first_publish = Instant::now();
    let published = publish_all(&gateway, &app, &args).await?;
    let publish_elapsed = first_publish.elapsed();
    report_publishing(&published, publish_elapsed);

    if args.backlog && gateway.workspace.is_postgres() {
        // An idle backend flushes its statistics within 10 s: without the
        // wait, the API process's last publishes counted as the drain's.
        tokio::time::sleep(Duration::from_secs(11)).await;
        commits_before = commits(&gateway).await;
    }
    let (gateway, drain_start) = if args.backlog && args.workers > 0 {
        let start = Instant::now();
        workers = start_workers(&gateway, args.workers).await;
        (gateway, start)
    } else if args.backlog {
        let mut gateway = gateway;
        gateway.terminate().await;
        let gateway = gateway
            .with_settings(|b| b.env("WASMHOOK_ROLE", "all"))
            .await;
        (gateway, Instant::now())
    } else {
        (gateway, first_publish)
    };
    wait_for_receipts(&gateway, &receiver, expected).await?;
    let last_receipt = receiver
        .received()
        .iter()
        .map(|r| r.at)
        .max()
        .context("no receipts")?;
    let drain = last_receipt - drain_start;
    let label = if args.backlog {
        "backlog drain rate"
    } else {
        "end-to-end delivery rate"
    };
    println!(
        "{label:<26} {:>10.0} deliveries/s ({expected} in {:.2?})",
        expected as f64 / drain.as_secs_f64(),
        drain
    );
    if !args.backlog {
        report_receipt_latency(&receiver, &published);
    }
    report_duplicates(&receiver, expected);
    if args.plugin.is_some() {
        let processes: Vec<&TestGateway> = std::iter::once(&gateway).chain(&workers).collect();
        report_plugin_time(&processes).await?;
    }
    report_processes(&gateway, &workers, &args, cpu_before, expected);
    if !args.backlog {
        report_threads(&gateway, &threads_before, expected);
    }
    if !gateway.workspace.is_postgres() {
        report_sqlite_commits(&gateway, expected).await?;
    }
    if let Some(before) = commits_before {
        // Backends flush their statistics when they end.
        let mut gateway = gateway;
        for process in workers.iter_mut().chain(std::iter::once(&mut gateway)) {
            process.terminate().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = commits(&gateway).await.unwrap_or(before);
        let n = after - before;
        println!(
            "PostgreSQL commits        {n:>10} ({:.3} per delivery, {})",
            n as f64 / expected as f64,
            if args.backlog {
                "the drain alone"
            } else {
                "publishing included"
            }
        );
    }
    Ok(())
}

/// Committed transactions in the test database so far (PostgreSQL only).
async fn commits(gateway: &TestGateway) -> Option<i64> {
    if !gateway.workspace.is_postgres() {
        return None;
    }
    let sql = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()";
    Some(gateway.workspace.count(sql).await)
}

/// Each process's peak RSS and CPU time per delivery.
fn report_processes(
    gateway: &TestGateway,
    workers: &[TestGateway],
    args: &Args,
    cpu_before: Duration,
    expected: usize,
) {
    for (label, process) in
        std::iter::once(("gateway", gateway)).chain(workers.iter().map(|w| ("worker", w)))
    {
        let (peak, last) = memory(process.pid());
        println!(
            "{label:<7} peak RSS           {:>10.1} MiB (at the end {:.1} MiB)",
            mib(peak),
            mib(last)
        );
        let mut cpu = cpu_time(process.pid());
        let mut since = "";
        if label == "gateway" && !args.backlog {
            cpu = cpu.saturating_sub(cpu_before);
            since = " since the first publish";
        }
        println!(
            "{label:<7} CPU time           {:>10.2} s ({:.0} µs per delivery){since}",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / expected as f64
        );
    }
}

/// The gateway's CPU per delivery by thread name, since the first publish:
/// where a change of the total went.
fn report_threads(gateway: &TestGateway, before: &BTreeMap<String, Duration>, expected: usize) {
    let shares: Vec<String> = thread_cpu(gateway.pid())
        .into_iter()
        .map(|(name, cpu)| {
            let spent = cpu.saturating_sub(before.get(&name).copied().unwrap_or_default());
            (name, spent.as_secs_f64() * 1e6 / expected as f64)
        })
        .filter(|(_, micros)| *micros >= 1.0)
        .map(|(name, micros)| format!("{name} {micros:.0}"))
        .collect();
    println!(
        "gateway CPU by thread      µs per delivery: {}",
        shares.join(", ")
    );
}

/// The healthy webhook's rate alone and beside the neighbour, in rounds
/// on fresh gateways (see [`neighbour::rounds`]).
async fn neighbour_mode(args: &Args, neighbour: Neighbour) -> anyhow::Result<()> {
    println!(
        "wasmhook bench, neighbour mode: {} healthy events per run beside `{neighbour:?}` \
         ({} queued for it), {} rounds",
        args.events,
        neighbour.backlog(),
        args.rounds
    );
    let builder = || {
        let mut builder = GatewayBuilder::default().env("WASMHOOK_LOG", "warn");
        for (key, value) in &args.gateway_env {
            builder = builder.env(key, value);
        }
        builder
    };
    let rounds = neighbour::rounds(builder, neighbour, args.events, args.rounds).await;
    println!(
        "healthy rate: alone median {:.0}/s, beside median {:.0}/s; ratio median {:.2} (target ≥ 0.9)",
        median(rounds.iter().map(|r| r.alone).collect()),
        median(rounds.iter().map(|r| r.beside).collect()),
        median(rounds.iter().map(Round::ratio).collect())
    );
    Ok(())
}

async fn start_workers(gateway: &TestGateway, n: usize) -> Vec<TestGateway> {
    let mut workers = Vec::with_capacity(n);
    for _ in 0..n {
        workers.push(gateway.another(|b| b.env("WASMHOOK_ROLE", "worker")).await);
    }
    workers
}

/// A payload of about `bytes` bytes that looks like a real event.
fn payload(n: usize, bytes: usize) -> Value {
    let mut value = json!({
        "invoice": { "id": format!("in_{n:08}"), "amount": 4200 + n as u64, "currency": "EUR", "status": "paid" },
        "customer": { "id": format!("cus_{:06}", n % 1000), "email": "billing@example.com", "name": "Acme Corp" },
        "lines": [
            { "sku": "plan-pro", "quantity": 1, "unit_amount": 4000 },
            { "sku": "seat", "quantity": 2, "unit_amount": 100 }
        ],
    });
    let filler = bytes.saturating_sub(value.to_string().len() + 12);
    value["metadata"] = json!({ "note": "x".repeat(filler) });
    value
}

async fn publish_all(
    gateway: &TestGateway,
    app: &str,
    args: &Args,
) -> anyhow::Result<Vec<Published>> {
    let next = Arc::new(AtomicUsize::new(0));
    let url = format!("{}/v1/apps/{app}/events", gateway.base_url);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.publishers {
        let (next, url, client, token) = (
            next.clone(),
            url.clone(),
            gateway.client.clone(),
            gateway.token.clone(),
        );
        let (events, rate, payload_bytes) = (args.events, args.rate, args.payload_bytes);
        let keys = args.ordering_keys;
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= events {
                    return Ok::<_, anyhow::Error>(mine);
                }
                if rate > 0 {
                    tokio::time::sleep_until(
                        (start + Duration::from_secs_f64(n as f64 / rate as f64)).into(),
                    )
                    .await;
                }
                let mut body =
                    json!({ "event_type": "invoice.paid", "payload": payload(n, payload_bytes) });
                if keys > 0 {
                    body["ordering_key"] = json!(format!("customer-{}", n % keys));
                }
                let started = Instant::now();
                let response = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await?;
                let latency = started.elapsed();
                if !response.status().is_success() {
                    bail!(
                        "publish answered {}: {}",
                        response.status(),
                        response.text().await?
                    );
                }
                let accepted: Value = response.json().await?;
                let id = accepted["id"].as_str().context("no id")?.to_owned();
                mine.push(Published {
                    id,
                    started,
                    latency,
                });
            }
        }));
    }
    let mut all = Vec::with_capacity(args.events);
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn report_publishing(published: &[Published], elapsed: Duration) {
    let mut latencies: Vec<Duration> = published.iter().map(|p| p.latency).collect();
    latencies.sort();
    println!(
        "publish rate               {:>10.0} events/s ({} in {:.2?})",
        published.len() as f64 / elapsed.as_secs_f64(),
        published.len(),
        elapsed
    );
    println!(
        "publish latency            p50 {:.2?}  p99 {:.2?}  max {:.2?}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
}

fn report_receipt_latency(receiver: &Receiver, published: &[Published]) {
    let started: HashMap<&str, Instant> = published
        .iter()
        .map(|p| (p.id.as_str(), p.started))
        .collect();
    let mut latencies: Vec<Duration> = receiver
        .received()
        .iter()
        .filter_map(|r| Some(r.at - *started.get(r.header("webhook-id")?)?))
        .collect();
    latencies.sort();
    println!(
        "publish→receipt latency    p50 {:.2?}  p99 {:.2?}  max {:.2?}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
}

/// The process's metrics, as Prometheus text.
async fn metrics(process: &TestGateway) -> anyhow::Result<String> {
    Ok(process
        .client
        .get(format!("{}/metrics", process.base_url))
        .send()
        .await?
        .text()
        .await?)
}

/// The sum of a metric's series in Prometheus text (0 when absent).
fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = rest.rsplit(' ').next()?;
            (rest.starts_with(' ') || rest.starts_with('{')).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The SQLite writer's commits since it started, durable and relaxed, and
/// the writes each carried (the gateway's start-up writes included).
async fn report_sqlite_commits(gateway: &TestGateway, expected: usize) -> anyhow::Result<()> {
    let metrics = metrics(gateway).await?;
    let commits = metric_sum(&metrics, "wasmhook_sqlite_commits_total");
    let durable = metric_sum(
        &metrics,
        "wasmhook_sqlite_commits_total{durability=\"durable\"}",
    );
    let writes = metric_sum(&metrics, "wasmhook_sqlite_committed_writes_total");
    println!(
        "SQLite commits            {commits:>10} ({:.3} per delivery, {:.0} durable; {:.1} writes each)",
        commits / expected as f64,
        durable,
        writes / commits.max(1.0)
    );
    Ok(())
}

/// The gateway's own measure of its plugin invocations (fresh instance,
/// call, checks), wall clock on a busy machine, from the `/metrics` of
/// every process (worker processes run the plugins when there are some).
async fn report_plugin_time(processes: &[&TestGateway]) -> anyhow::Result<()> {
    let (mut sum, mut count) = (0.0, 0.0);
    for process in processes {
        let metrics = metrics(process).await?;
        sum += metric_sum(&metrics, "wasmhook_plugin_duration_seconds_sum");
        count += metric_sum(&metrics, "wasmhook_plugin_duration_seconds_count");
    }
    println!(
        "plugin time in the gateway {:>10.1} µs per invocation, mean of {count}",
        sum * 1e6 / f64::max(count, 1.0)
    );
    Ok(())
}

fn report_duplicates(receiver: &Receiver, expected: usize) {
    let mut seen = std::collections::HashSet::new();
    let received = receiver.received();
    for r in &received {
        seen.insert((
            r.path.clone(),
            r.header("webhook-id").unwrap_or_default().to_owned(),
        ));
    }
    println!(
        "receipts                   {:>10} ({} distinct, {} expected)",
        received.len(),
        seen.len(),
        expected
    );
}

/// Waits for `expected` receipts; gives up, with the queue's state from
/// the gateway's metrics, once none has arrived for 30 s.
async fn wait_for_receipts(
    gateway: &TestGateway,
    receiver: &Receiver,
    expected: usize,
) -> anyhow::Result<()> {
    const STALL: Duration = Duration::from_secs(30);
    let mut last = (receiver.count(), Instant::now());
    while receiver.count() < expected {
        let got = receiver.count();
        if got > last.0 {
            last = (got, Instant::now());
        }
        if last.1.elapsed() > STALL {
            bail!(
                "only {got} of {expected} deliveries arrived, none in the last {STALL:?}; queue: {}",
                queue_state(gateway).await
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The queue's gauges from the gateway's metrics, on one line.
async fn queue_state(gateway: &TestGateway) -> String {
    let url = format!("{}/metrics", gateway.base_url);
    let Ok(response) = gateway.client.get(url).send().await else {
        return "metrics unreachable".into();
    };
    let page = response.text().await.unwrap_or_default();
    page.lines()
        .filter(|line| line.starts_with("wasmhook_queue_") || line.starts_with("wasmhook_breakers"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// CPU time (user + system) a process has used so far, from /proc: less
/// noisy than a rate on a machine the load generator shares.
fn cpu_time(pid: u32) -> Duration {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// CPU time by thread name (threads of one name summed; a thread that
/// ended is missing from the later snapshot).
fn thread_cpu(pid: u32) -> BTreeMap<String, Duration> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let cpu = stat_cpu(&path.join("stat").to_string_lossy());
        *by_name.entry(name.trim().to_owned()).or_default() += cpu;
    }
    by_name
}

/// User and system time from a `/proc/.../stat` file.
fn stat_cpu(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Clock ticks are 1/100 s on Linux.
    Duration::from_millis((ticks(14) + ticks(15)) * 10)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A process's peak resident set size (VmHWM) and current RSS, in bytes,
/// from /proc.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}
