//! [`PostgresContext`]: one run's context, read and written key by key.
//!
//! A run's context is the context it started with overlaid with one row per key written
//! since (see [`crate::services::postgres::store`]); this type reads and writes those keys
//! through the same statements as the worker. Keys and values always travel as query
//! parameters, so any key — `a'}; DROP TABLE x; --` included — round-trips as a plain key.

use serde_json::{Map, Value};

use crate::services::postgres::store::{
    assembled_context, key_source, keyed_value, PgPool, RunStore, StoreError, Tables,
};

/// One change of a [`PostgresContext::patch`].
#[derive(Debug, Clone, PartialEq)]
pub enum PatchOp {
    /// Sets the key to the value, replacing any value it had.
    Set(String, Value),
    /// Removes the key (nothing happens if it is absent).
    Delete(String),
}

/// One run's context in PostgreSQL.
#[derive(Clone)]
pub struct PostgresContext {
    store: RunStore,
    run_id: String,
    get_sql: String,
    all_sql: String,
}

impl PostgresContext {
    /// The context of `run_id` whose starting context is in `table` (a validated
    /// identifier; the keys written since are in `<table>_entries`).
    pub fn new(
        pool: PgPool,
        table: &str,
        run_id: impl Into<String>,
    ) -> Result<PostgresContext, StoreError> {
        let tables = Tables {
            contexts: table.to_string(),
            ..Tables::default()
        };
        let (c, e) = (&tables.contexts, tables.entries());
        Ok(PostgresContext {
            get_sql: format!(
                "SELECT {} FROM {c} c
                 LEFT JOIN {e} x ON $3::int <= 0 AND x.run_id = c.run_id AND x.key = $2::text
                 WHERE c.run_id = $1",
                keyed_value("$2::text", "$3::int")
            ),
            all_sql: format!(
                "SELECT {} FROM {c} c WHERE c.run_id = $1",
                assembled_context(&e)
            ),
            store: RunStore::new(pool, tables)?,
            run_id: run_id.into(),
        })
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// A key's value (`None` if absent or the run has no row).
    pub fn get(&self, key: &str) -> Result<Option<Value>, StoreError> {
        let row = self
            .store
            .pool()
            .get()?
            .query_opt_prepared(&self.get_sql, &[&self.run_id, &key, &key_source(key)])?;
        Ok(match row {
            Some(row) => row.try_get::<_, Option<Value>>(0)?,
            None => None,
        })
    }

    /// Sets a key (creating the row if needed).
    pub fn set(&self, key: &str, value: Value) -> Result<(), StoreError> {
        self.patch(&[PatchOp::Set(key.to_string(), value)])
    }

    /// Whether a key is present.
    pub fn has(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.get(key)?.is_some())
    }

    /// Deletes a key.
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.patch(&[PatchOp::Delete(key.to_string())])
    }

    /// The whole context (an empty object if the run has no row).
    pub fn to_json(&self) -> Result<Value, StoreError> {
        let row = self
            .store
            .pool()
            .get()?
            .query_opt_prepared(&self.all_sql, &[&self.run_id])?;
        Ok(match row {
            Some(row) => row.try_get(0)?,
            None => Value::Object(Map::new()),
        })
    }

    /// Applies several changes atomically, in order (a later change of a key wins).
    pub fn patch(&self, ops: &[PatchOp]) -> Result<(), StoreError> {
        let writes = ops
            .iter()
            .map(|op| match op {
                PatchOp::Set(k, v) => (k.clone(), Some(v.clone())),
                PatchOp::Delete(k) => (k.clone(), None),
            })
            .collect();
        self.store.write_keys(&self.run_id, writes)
    }
}
