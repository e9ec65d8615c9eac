//! [`PostgresContext`]: one run's context as a JSONB row, read and written key by key.
//!
//! Keys are flat top-level JSONB keys (`_outputs.n1` is one key). Keys and values always
//! travel as query parameters, so any key — `a'}; DROP TABLE x; --` included — round-trips
//! as a plain key. The worker does not use this type on its hot path (it reads a snapshot
//! and writes one patch per job); it is the public, blocking context API.

use serde_json::{Map, Value};

use crate::services::postgres::store::{validate_identifier, PgPool, StoreError};

/// One change of a [`PostgresContext::patch`].
#[derive(Debug, Clone, PartialEq)]
pub enum PatchOp {
    /// Sets the key to the value, replacing any value it had.
    Set(String, Value),
    /// Removes the key (nothing happens if it is absent).
    Delete(String),
}

/// One run's context over a JSONB row.
#[derive(Clone)]
pub struct PostgresContext {
    pool: PgPool,
    run_id: String,
    get_sql: String,
    has_sql: String,
    all_sql: String,
    patch_sql: String,
}

impl PostgresContext {
    /// The context of `run_id` in `table` (a validated identifier).
    pub fn new(
        pool: PgPool,
        table: &str,
        run_id: impl Into<String>,
    ) -> Result<PostgresContext, StoreError> {
        validate_identifier(table)?;
        Ok(PostgresContext {
            pool,
            run_id: run_id.into(),
            get_sql: format!("SELECT context_data -> $2 FROM {table} WHERE run_id = $1"),
            has_sql: format!("SELECT jsonb_exists(context_data, $2) FROM {table} WHERE run_id = $1"),
            all_sql: format!("SELECT context_data FROM {table} WHERE run_id = $1"),
            patch_sql: format!(
                "INSERT INTO {table} AS t (run_id, context_data) VALUES ($1, $3::jsonb)
                 ON CONFLICT (run_id) DO UPDATE SET context_data = (t.context_data - $2::text[]) || $3::jsonb"
            ),
        })
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// A key's value (`None` if absent or the run has no row).
    pub fn get(&self, key: &str) -> Result<Option<Value>, StoreError> {
        let row = self
            .pool
            .get()?
            .query_opt_prepared(&self.get_sql, &[&self.run_id, &key])?;
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
        let row = self
            .pool
            .get()?
            .query_opt_prepared(&self.has_sql, &[&self.run_id, &key])?;
        Ok(match row {
            Some(row) => row.try_get::<_, Option<bool>>(0)?.unwrap_or(false),
            None => false,
        })
    }

    /// Deletes a key.
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.patch(&[PatchOp::Delete(key.to_string())])
    }

    /// The whole context (an empty object if the run has no row).
    pub fn to_json(&self) -> Result<Value, StoreError> {
        let row = self
            .pool
            .get()?
            .query_opt_prepared(&self.all_sql, &[&self.run_id])?;
        Ok(match row {
            Some(row) => row.try_get(0)?,
            None => Value::Object(Map::new()),
        })
    }

    /// Applies several changes atomically, in order (a later change of a key wins).
    pub fn patch(&self, ops: &[PatchOp]) -> Result<(), StoreError> {
        let mut set = Map::new();
        let mut delete: Vec<String> = Vec::new();
        for op in ops {
            match op {
                PatchOp::Set(k, v) => {
                    delete.retain(|d| d != k);
                    set.insert(k.clone(), v.clone());
                }
                PatchOp::Delete(k) => {
                    set.remove(k);
                    delete.push(k.clone());
                }
            }
        }
        let set = Value::Object(set);
        self.pool
            .get()?
            .execute_prepared(&self.patch_sql, &[&self.run_id, &delete, &set])?;
        Ok(())
    }
}
