//! Schema migrations for PostgreSQL: the files of `migrations/postgres/`,
//! applied in order in one transaction that holds an advisory lock, so
//! gateway processes starting together do not race; `wasmhook_migrations`
//! records which have run.

use sqlx::PgPool;

use crate::clock::now_ms;
use crate::store::{StoreResult, check_schema_version};

const MIGRATIONS: &[&str] = &[
    include_str!("../../../../migrations/postgres/0001_init.sql"),
    include_str!("../../../../migrations/postgres/0002_retention.sql"),
    include_str!("../../../../migrations/postgres/0003_lanes.sql"),
    include_str!("../../../../migrations/postgres/0004_lane_streaks.sql"),
    include_str!("../../../../migrations/postgres/0005_lane_recheck.sql"),
    include_str!("../../../../migrations/postgres/0006_rate_limits.sql"),
    include_str!("../../../../migrations/postgres/0007_breakers.sql"),
    include_str!("../../../../migrations/postgres/0008_ordering.sql"),
    include_str!("../../../../migrations/postgres/0009_ordering_keys.sql"),
    include_str!("../../../../migrations/postgres/0010_webhook_retry_schedule.sql"),
];
/// Any constant: the key of the advisory lock migrations hold.
const LOCK_KEY: i64 = 0x7761_736d_686f_6f6b;

pub async fn run(pool: &PgPool) -> StoreResult<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS wasmhook_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .execute(&mut *tx)
    .await?;
    let applied: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM wasmhook_migrations")
            .fetch_one(&mut *tx)
            .await?;
    let applied = check_schema_version(applied, MIGRATIONS.len())?;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO wasmhook_migrations (version, applied_at) VALUES ($1, $2)")
            .bind((index + 1) as i64)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}
