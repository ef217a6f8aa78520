//! Claim latency against queue depth: fills a fresh database (SQLite, or
//! PostgreSQL when `WASMHOOK_TEST_POSTGRES_URL` is set) with N pending
//! deliveries spread over W webhooks, then times `claim_due` batches
//! through the gateway's store, giving each batch back so the depth stays
//! N. With `--keys K`, every delivery carries one of K ordering keys and
//! only the first of each (webhook, key) is due, the rest waiting behind
//! it, as ordered delivery queues them. With `--apps A`, the webhooks
//! belong to A apps, and each claim is made as a busy worker makes it:
//! 64 of the apps hold slots, at their fair share, so the claim skips
//! their lanes. Prints the plan of the claim's
//! lane walk, and fails unless it uses
//! the `webhook_lanes_due` index: with a deep queue a sequential scan and
//! sort would make every claim slower.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use wasmhook::clock::now_ms;
use wasmhook::domain::share::{Allotment, FairShare};
use wasmhook::domain::{
    AppId, ClaimRequest, EventId, EventType, InFlightLimit, NewEvent, SharePercent,
};
use wasmhook::store::{Store, StoreOptions};
use wasmhook_tests::Workspace;

#[derive(Parser, Debug)]
#[command(about = "Measure claim latency with a shallow and a deep queue")]
struct Args {
    /// Queue depths to measure.
    #[arg(long, value_delimiter = ',', default_value = "1000,1000000")]
    pending: Vec<usize>,
    /// Webhooks the deliveries are spread over (at most one per delivery).
    #[arg(long, default_value_t = 10_000)]
    webhooks: usize,
    /// Deliveries per claim.
    #[arg(long, default_value_t = 64)]
    batch: u32,
    /// In-flight limit of every webhook.
    #[arg(long, default_value_t = 8)]
    max_in_flight: u64,
    /// Claims timed per depth.
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// Ordering keys the deliveries are spread over (0: none).
    #[arg(long, default_value_t = 0)]
    keys: usize,
    /// Apps the webhooks are spread over (1: all in one, no fair share).
    #[arg(long, default_value_t = 1)]
    apps: usize,
}

/// The claim's walk of the lanes with due work, as both backends run it.
const CLAIM_SELECT: &str = "SELECT webhook_id FROM webhook_lanes \
     WHERE next_due_at IS NOT NULL AND next_due_at <= 9000000000000 ORDER BY next_due_at LIMIT 64";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for &pending in &args.pending {
        let workspace = Workspace::fresh().await;
        let store = Store::open(&workspace.database_url, &StoreOptions::default()).await?;
        let webhooks = args.webhooks.clamp(1, pending.max(1));
        println!(
            "{} with {pending} pending deliveries over {webhooks} webhooks",
            store.backend()
        );
        let fill = Instant::now();
        let shape = Shape {
            pending,
            webhooks,
            keys: args.keys,
            apps: args.apps.clamp(1, webhooks),
        };
        fill_queue(&store, &workspace, &shape).await?;
        println!("  filled in {:.1?}", fill.elapsed());
        let plan = claim_plan(&workspace).await?;
        println!("  claim plan: {}", plan.join(" / "));
        if !plan.iter().any(|line| line.contains("webhook_lanes_due")) {
            bail!("the claim does not use the webhook_lanes_due index");
        }
        measure(&store, &args).await?;
        store.close().await;
    }
    Ok(())
}

async fn measure(store: &Store, args: &Args) -> anyhow::Result<()> {
    let request = ClaimRequest {
        limit: args.batch,
        lease: Duration::from_secs(60),
        default_max_in_flight: InFlightLimit::parse(args.max_in_flight)
            .map_err(anyhow::Error::msg)?,
        apps: allotment(args.apps),
    };
    let mut samples = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let started = Instant::now();
        let claimed = store.claim_due(request.clone()).await?;
        samples.push(started.elapsed());
        if claimed.is_empty() {
            bail!("claimed nothing of {} pending", args.batch);
        }
        let claims = claimed.iter().map(|c| c.held()).collect();
        store.release(claims).await?;
    }
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "  claim of up to {} deliveries: p50 {:.2?}  p99 {:.2?}",
        args.batch,
        at(0.50),
        at(0.99)
    );
    Ok(())
}

/// One app and event through the store; then `webhooks` webhooks with
/// their lanes and `pending` delivery rows spread over them, written in
/// bulk behind the store's back.
async fn fill_queue(store: &Store, workspace: &Workspace, shape: &Shape) -> anyhow::Result<()> {
    let &Shape {
        pending,
        webhooks,
        keys,
        apps,
    } = shape;
    let app = store.create_app("bench", None).await?;
    let event = store
        .publish(NewEvent {
            app_id: app.id.clone(),
            id: EventId::from("msg_bench"),
            event_type: EventType::parse("bench.tick").expect("event type"),
            payload: "{}".into(),
            idempotency_key: None,
            ordering_key: None,
            dedup_since: 0,
        })
        .await?;
    let (app, event, now) = (app.id, event.event_id, now_ms());
    // Due times spread over the past, so claims walk the lanes in order.
    let (series, from) = if workspace.is_postgres() {
        ("generate_series(1, {n}) AS g", "")
    } else {
        (
            "",
            "WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < {n}) ",
        )
    };
    let rows = |n: usize, select: &str| {
        if workspace.is_postgres() {
            format!("{select} FROM {}", series.replace("{n}", &n.to_string()))
        } else {
            format!("{}{select} FROM s", from.replace("{n}", &n.to_string()))
        }
    };
    // With keys, delivery g has key g mod K on webhook 1 + g mod W: the
    // first of each (webhook, key) pair, g up to lcm(W, K), is its head.
    let (due, key, seq) = if keys == 0 {
        (format!("{now} - g"), "NULL".to_owned(), "NULL")
    } else {
        let heads = lcm(webhooks, keys);
        (
            format!("CASE WHEN g <= {heads} THEN {now} - g END"),
            format!("'key-' || (g % {keys})"),
            "g",
        )
    };
    // Webhook g belongs to app g mod A (with one app, the store's own).
    let owner = if apps > 1 {
        format!("'app_bench_' || (1 + g % {apps})")
    } else {
        format!("'{app}'")
    };
    let statements = [
        rows(
            apps,
            &format!(
                "INSERT INTO apps (id, name, created_at, updated_at) \
                 SELECT 'app_bench_' || g, 'bench', {now}, {now}"
            ),
        ),
        rows(
            webhooks,
            &format!(
                "INSERT INTO webhooks (id, app_id, url, description, enabled, headers, raw_payload, secret, \
                 created_at, updated_at) SELECT 'wh_bench_' || g, {owner}, 'http://127.0.0.1:9/bench', '', \
                 TRUE, '{{}}', FALSE, 'whsec_bench', {now}, {now}"
            ),
        ),
        rows(
            pending,
            &format!(
                "INSERT INTO deliveries (id, app_id, event_id, webhook_id, status, due_at, created_at, updated_at, \
                 ordering_key, ordering_seq) \
                 SELECT 'dlv_bench_' || g, '{app}', '{event}', 'wh_bench_' || (1 + g % {webhooks}), 'pending', \
                 {due}, {now}, {now}, {key}, {seq}"
            ),
        ),
        "INSERT INTO webhook_lanes (webhook_id, next_due_at) SELECT webhook_id, MIN(due_at) \
         FROM deliveries WHERE webhook_id LIKE 'wh_bench_%' GROUP BY webhook_id"
            .to_owned(),
    ];
    for sql in statements {
        execute(workspace, &sql).await?;
    }
    execute(workspace, "ANALYZE").await
}

fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    a / gcd(a, b) * b
}

/// What the queue is filled with.
struct Shape {
    pending: usize,
    webhooks: usize,
    keys: usize,
    apps: usize,
}

/// A busy worker's claim with `apps` apps: 64 of them hold two of 128
/// slots each, above their fair share, so the claim skips them.
fn allotment(apps: usize) -> Allotment {
    if apps <= 1 {
        return Allotment::unlimited();
    }
    let share = FairShare::new(128, SharePercent::parse(75).expect("share"));
    let held: HashMap<AppId, u32> = (1..=apps.min(64))
        .map(|n| (AppId::from(format!("app_bench_{n}")), 2))
        .collect();
    share.allot(&held)
}

async fn execute(workspace: &Workspace, sql: &str) -> anyhow::Result<()> {
    if workspace.is_postgres() {
        use sqlx::{Connection, Executor};
        let mut db = sqlx::PgConnection::connect(&workspace.database_url).await?;
        db.execute(sql).await?;
    } else {
        let db = rusqlite::Connection::open(workspace.sqlite_file())?;
        db.execute_batch(sql)?;
    }
    Ok(())
}

async fn claim_plan(workspace: &Workspace) -> anyhow::Result<Vec<String>> {
    if workspace.is_postgres() {
        use sqlx::Connection;
        let mut db = sqlx::PgConnection::connect(&workspace.database_url).await?;
        let sql = format!("EXPLAIN {CLAIM_SELECT} FOR UPDATE SKIP LOCKED");
        Ok(sqlx::query_scalar(&sql).fetch_all(&mut db).await?)
    } else {
        let db = rusqlite::Connection::open(workspace.sqlite_file())?;
        let mut plan = db.prepare(&format!("EXPLAIN QUERY PLAN {CLAIM_SELECT}"))?;
        let rows = plan.query_map([], |row| row.get::<_, String>(3))?;
        rows.collect::<Result<Vec<_>, _>>().context("plan")
    }
}
