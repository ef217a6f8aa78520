//! Claim latency against queue depth: fills a fresh database (SQLite, or
//! PostgreSQL when `WASMHOOK_TEST_POSTGRES_URL` is set) with N pending
//! deliveries, then times `claim_due` batches through the gateway's store,
//! giving each batch back so the depth stays N. Prints the claim query's
//! plan, and fails unless it walks the `deliveries_due` index: with a deep
//! queue a sequential scan and sort would make every claim slower.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use wasmhook::store::{NewEvent, Store, StoreOptions, WebhookFields, now_ms};
use wasmhook_tests::Workspace;

#[derive(Parser, Debug)]
#[command(about = "Measure claim latency with a shallow and a deep queue")]
struct Args {
    /// Queue depths to measure.
    #[arg(long, value_delimiter = ',', default_value = "1000,1000000")]
    pending: Vec<usize>,
    /// Deliveries per claim.
    #[arg(long, default_value_t = 64)]
    batch: u32,
    /// Claims timed per depth.
    #[arg(long, default_value_t = 300)]
    samples: usize,
}

/// The claim's row selection, as both backends run it.
const CLAIM_SELECT: &str = "SELECT id FROM deliveries WHERE due_at IS NOT NULL AND due_at <= 9000000000000 \
     ORDER BY due_at LIMIT 64";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for &pending in &args.pending {
        let workspace = Workspace::fresh().await;
        let store = Store::open(&workspace.database_url, &StoreOptions::default()).await?;
        println!("{} with {pending} pending deliveries", store.backend());
        let fill = Instant::now();
        fill_queue(&store, &workspace, pending).await?;
        println!("  filled in {:.1?}", fill.elapsed());
        let plan = claim_plan(&workspace).await?;
        println!("  claim plan: {}", plan.join(" / "));
        if !plan.iter().any(|line| line.contains("deliveries_due")) {
            bail!("the claim does not use the deliveries_due index");
        }
        measure(&store, &args).await?;
        store.close().await;
    }
    Ok(())
}

async fn measure(store: &Store, args: &Args) -> anyhow::Result<()> {
    let lease = Duration::from_secs(60);
    let mut samples = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let started = Instant::now();
        let claimed = store.claim_due(args.batch, lease).await?;
        samples.push(started.elapsed());
        if claimed.len() != args.batch as usize {
            bail!("claimed {} of {}", claimed.len(), args.batch);
        }
        let claims = claimed.into_iter().map(|c| (c.id, c.claim_token)).collect();
        store.release(claims).await?;
    }
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "  claim of {} deliveries: p50 {:.2?}  p99 {:.2?}",
        args.batch,
        at(0.50),
        at(0.99)
    );
    Ok(())
}

/// One app, webhook and event through the store; then `pending` delivery
/// rows for them, written in bulk behind the store's back.
async fn fill_queue(store: &Store, workspace: &Workspace, pending: usize) -> anyhow::Result<()> {
    let app = store.create_app("bench", None).await?;
    let fields = WebhookFields {
        url: "http://127.0.0.1:9/bench".into(),
        description: String::new(),
        event_types: None,
        enabled: true,
        headers: "{}".into(),
        raw_payload: false,
        plugin: None,
    };
    let webhook = store
        .create_webhook(&app.id, &fields, "whsec_bench")
        .await?;
    let event = store
        .publish(NewEvent {
            app_id: app.id.clone(),
            id: "msg_bench".into(),
            event_type: "bench.tick".into(),
            payload: "{}".into(),
            idempotency_key: None,
            dedup_since: 0,
        })
        .await?;
    let now = now_ms();
    // Due times spread over the past, so claims walk the index in order.
    let sql = if workspace.is_postgres() {
        format!(
            "INSERT INTO deliveries (id, app_id, event_id, webhook_id, status, due_at, created_at, updated_at) \
             SELECT 'dlv_bench_' || g, '{app}', '{event}', '{webhook}', 'pending', {now} - g, {now}, {now} \
             FROM generate_series(1, {pending}) AS g",
            app = app.id,
            event = event.event_id,
            webhook = webhook.id
        )
    } else {
        format!(
            "WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < {pending}) \
             INSERT INTO deliveries (id, app_id, event_id, webhook_id, status, due_at, created_at, updated_at) \
             SELECT 'dlv_bench_' || g, '{app}', '{event}', '{webhook}', 'pending', {now} - g, {now}, {now} FROM s",
            app = app.id,
            event = event.event_id,
            webhook = webhook.id
        )
    };
    execute(workspace, &sql).await?;
    execute(
        workspace,
        if workspace.is_postgres() {
            "ANALYZE deliveries"
        } else {
            "ANALYZE"
        },
    )
    .await
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
