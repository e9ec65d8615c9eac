//! SQL migrations: `migrations/*.sql`, embedded in the crate, applied in order, once per set
//! of table names, under an advisory lock so several hosts may run them at once.
//!
//! The files name tables as `{contexts}`, `{entries}`, `{statuses}`, `{history}`,
//! `{webhooks}` (and indexes `{statuses_index}`, `{history_index}`, `{history_time_index}`);
//! the configured names — validated identifiers — replace them. What was
//! applied is recorded in `flowcraft_migrations (version, scope)`, `scope` being the table
//! names, so migrating again is a no-op.

use crate::services::postgres::store::{PgPool, StoreError, Tables};

/// The embedded migrations, in order: (version, SQL template).
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_init",
        include_str!("../../../migrations/0001_init.sql"),
    ),
    (
        "0002_entries",
        include_str!("../../../migrations/0002_entries.sql"),
    ),
    (
        "0003_history",
        include_str!("../../../migrations/0003_history.sql"),
    ),
];

/// Lock id for `pg_advisory_xact_lock` (an arbitrary constant: "flowcraft").
const LOCK_ID: i64 = 0x666c_6f77_6372_6166;

/// A migration's SQL for a set of table names.
pub fn render(template: &str, tables: &Tables) -> Result<String, StoreError> {
    tables.validate()?;
    let index = format!("{}_status_updated_idx", tables.statuses.replace('.', "_"));
    let history = tables.history();
    let history_index = |suffix: &str| format!("{}{suffix}", history.replace('.', "_"));
    Ok(template
        .replace("{history_index}", &history_index("_run_idx"))
        .replace("{history_time_index}", &history_index("_time_idx"))
        .replace("{history}", &history)
        .replace("{entries}", &tables.entries())
        .replace("{contexts}", &tables.contexts)
        .replace("{statuses_index}", &index)
        .replace("{statuses}", &tables.statuses)
        .replace("{webhooks}", &tables.webhooks))
}

/// The `scope` under which `flowcraft_migrations` records what was applied for these tables.
pub fn scope(tables: &Tables) -> String {
    format!(
        "{},{},{}",
        tables.contexts, tables.statuses, tables.webhooks
    )
}

/// Applies the migrations not yet applied for these table names; returns the versions it
/// applied (empty when all were).
pub fn migrate(pool: &PgPool, tables: &Tables) -> Result<Vec<String>, StoreError> {
    let scope = scope(tables);
    let mut conn = pool.get()?;
    let mut tx = conn.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_ID])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS flowcraft_migrations (
            version TEXT NOT NULL, scope TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
            PRIMARY KEY (version, scope))",
    )?;
    let mut applied = Vec::new();
    for (version, template) in MIGRATIONS {
        let done = tx
            .query_opt(
                "SELECT 1 FROM flowcraft_migrations WHERE version = $1 AND scope = $2",
                &[version, &scope],
            )?
            .is_some();
        if done {
            continue;
        }
        tx.batch_execute(&render(template, tables)?)?;
        tx.execute(
            "INSERT INTO flowcraft_migrations (version, scope) VALUES ($1, $2)",
            &[version, &scope],
        )?;
        applied.push(version.to_string());
    }
    tx.commit()?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_table_names() {
        let tables = Tables::new("c1", "app.s1", "w1").unwrap();
        let sql = render(MIGRATIONS[0].1, &tables).unwrap();
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS c1 ("));
        assert!(sql.contains(
            "CREATE INDEX IF NOT EXISTS app_s1_status_updated_idx ON app.s1 (status, updated_at)"
        ));
        assert!(!sql.contains('{') || !sql.contains("{contexts}"));
    }
}
