//! Schema migrations for SQLite: the files of `migrations/sqlite/`, applied
//! in order, each in its own transaction; `PRAGMA user_version` records how
//! many have run.

use rusqlite::Connection;

use crate::store::{StoreResult, check_schema_version};

const MIGRATIONS: &[&str] = &[
    include_str!("../../../../migrations/sqlite/0001_init.sql"),
    include_str!("../../../../migrations/sqlite/0002_plugins.sql"),
    include_str!("../../../../migrations/sqlite/0003_retention.sql"),
    include_str!("../../../../migrations/sqlite/0004_lanes.sql"),
    include_str!("../../../../migrations/sqlite/0005_lane_streaks.sql"),
    include_str!("../../../../migrations/sqlite/0006_rate_limits.sql"),
    include_str!("../../../../migrations/sqlite/0007_breakers.sql"),
    include_str!("../../../../migrations/sqlite/0008_ordering.sql"),
    include_str!("../../../../migrations/sqlite/0009_webhook_retry_schedule.sql"),
];

pub fn run(connection: &mut Connection) -> StoreResult<()> {
    let applied: i64 = connection.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let applied = check_schema_version(applied, MIGRATIONS.len())?;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let transaction = connection.transaction()?;
        transaction.execute_batch(sql)?;
        transaction.execute_batch(&format!("PRAGMA user_version = {}", index + 1))?;
        transaction.commit()?;
    }
    Ok(())
}
