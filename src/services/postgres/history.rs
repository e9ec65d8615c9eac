//! A run's history and the list of runs: what `flowcraft runs`, `flowcraft inspect`,
//! `flowcraft prune` and the dashboard read.
//!
//! The worker writes a history row per node execution in the statement that commits it
//! ([`Execution`] in a [`NodeCommit`](super::store::NodeCommit)); an attempt that fails, and
//! so commits nothing, is recorded alone ([`RunStore::record_failure`]). These reads are for
//! people and pages, not the job path: each builds its statement when called.

use std::time::Duration;

use postgres::types::ToSql;

use crate::services::postgres::store::{rfc3339, unknown_status, Execution, RunStore, StoreError};
use crate::vocabulary::RunStatus;

/// A run, as `flowcraft runs` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// The run's id.
    pub run_id: String,
    /// Its status.
    pub status: RunStatus,
    /// Its blueprint, if its context names one.
    pub blueprint_id: Option<String>,
    /// When it started (RFC 3339, UTC), if known.
    pub created_at: Option<String>,
    /// When its status last moved (RFC 3339, UTC).
    pub updated_at: Option<String>,
}

/// Which runs to list.
#[derive(Debug, Clone, PartialEq)]
pub struct RunFilter {
    /// Only runs with this status.
    pub status: Option<RunStatus>,
    /// Only runs of this blueprint.
    pub blueprint_id: Option<String>,
    /// At most this many, newest first.
    pub limit: i64,
}

impl Default for RunFilter {
    fn default() -> RunFilter {
        RunFilter {
            status: None,
            blueprint_id: None,
            limit: 50,
        }
    }
}

/// One node execution of a run's history.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeExecution {
    /// The node (a batch worker's id for a worker).
    pub node_id: String,
    /// Its loop iteration.
    pub iteration: u32,
    /// Its attempt (1-based).
    pub attempt: u32,
    /// `completed`, `awaiting` (it paused the run), `retried` (it failed and was retried) or
    /// `failed` (it failed the run).
    pub outcome: String,
    /// Why it failed.
    pub error: Option<String>,
    /// When it started (RFC 3339, UTC, milliseconds).
    pub started_at: String,
    /// The same, in milliseconds since the Unix epoch.
    pub started_ms: f64,
    /// How long it took, in milliseconds.
    pub duration_ms: f64,
    /// The worker process (`host:pid`).
    pub worker: String,
}

/// What [`RunStore::prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Finished runs removed (with their context, entries and history).
    pub runs: u64,
    /// History rows removed.
    pub executions: u64,
}

impl RunStore {
    /// Runs, newest first, filtered.
    pub fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        let tables = self.tables();
        let sql = format!(
            "SELECT s.run_id, s.status, c.header[1] #>> '{{}}', {}, {}
             FROM {s} s LEFT JOIN {c} c ON c.run_id = s.run_id
             WHERE ($1::text IS NULL OR s.status = $1)
               AND ($2::text IS NULL OR c.header[1] #>> '{{}}' = $2)
             ORDER BY s.created_at DESC NULLS LAST, s.run_id LIMIT $3",
            rfc3339("s.created_at"),
            rfc3339("s.updated_at"),
            s = tables.statuses,
            c = tables.contexts,
        );
        let status = filter.status.map(|s| s.as_str());
        let rows = self
            .pool()
            .get()?
            .query_prepared(&sql, &[&status, &filter.blueprint_id, &filter.limit.max(0)])?;
        rows.iter()
            .map(|row| {
                let run_id: String = row.try_get(0)?;
                let status: String = row.try_get(1)?;
                let status = RunStatus::parse(&status).ok_or_else(|| StoreError::Malformed {
                    run_id: run_id.clone(),
                    reason: unknown_status(&status),
                })?;
                Ok(RunSummary {
                    run_id,
                    status,
                    blueprint_id: row.try_get(2)?,
                    created_at: row.try_get(3)?,
                    updated_at: row.try_get(4)?,
                })
            })
            .collect()
    }

    /// How many runs have each status.
    pub fn count_by_status(&self) -> Result<Vec<(RunStatus, i64)>, StoreError> {
        let sql = format!(
            "SELECT status, count(*) FROM {} GROUP BY status ORDER BY status",
            self.tables().statuses
        );
        let rows = self.pool().get()?.query_prepared(&sql, &[])?;
        let mut counts = Vec::new();
        for row in rows {
            let status: String = row.try_get(0)?;
            if let Some(status) = RunStatus::parse(&status) {
                counts.push((status, row.try_get(1)?));
            }
        }
        Ok(counts)
    }

    /// A run's node executions, in the order they started.
    pub fn history(&self, run_id: &str) -> Result<Vec<NodeExecution>, StoreError> {
        let sql = format!(
            "SELECT node_id, iteration, attempt, outcome, error, {},
                    EXTRACT(EPOCH FROM finished_at - started_at)::float8 * 1000, worker,
                    EXTRACT(EPOCH FROM started_at)::float8 * 1000
             FROM {} WHERE run_id = $1 ORDER BY started_at, finished_at",
            rfc3339("started_at"),
            self.tables().history()
        );
        let rows = self.pool().get()?.query_prepared(&sql, &[&run_id])?;
        rows.iter()
            .map(|row| {
                Ok(NodeExecution {
                    node_id: row.try_get(0)?,
                    iteration: u32::try_from(row.try_get::<_, i32>(1)?).unwrap_or(0),
                    attempt: u32::try_from(row.try_get::<_, i32>(2)?).unwrap_or(0),
                    outcome: row.try_get(3)?,
                    error: row.try_get(4)?,
                    started_at: row.try_get(5)?,
                    duration_ms: row.try_get(6)?,
                    worker: row.try_get(7)?,
                    started_ms: row.try_get(8)?,
                })
            })
            .collect()
    }

    /// Node executions that ended in each of the last `minutes` minutes, oldest first
    /// (`(minutes ago, count)`; minutes without any are left out).
    pub fn executions_per_minute(&self, minutes: u32) -> Result<Vec<(u32, i64)>, StoreError> {
        let sql = format!(
            "SELECT (EXTRACT(EPOCH FROM NOW() - finished_at) / 60)::int AS ago, count(*)
             FROM {} WHERE finished_at > NOW() - make_interval(mins => $1)
             GROUP BY ago ORDER BY ago DESC",
            self.tables().history()
        );
        let minutes = i32::try_from(minutes).unwrap_or(i32::MAX);
        let rows = self.pool().get()?.query_prepared(&sql, &[&minutes])?;
        rows.iter()
            .map(|row| {
                let ago: i32 = row.try_get(0)?;
                Ok((u32::try_from(ago).unwrap_or(0), row.try_get(1)?))
            })
            .collect()
    }

    /// Records an attempt that failed: `retried` (another attempt is queued) or `failed`
    /// (it failed the run), with its error.
    pub fn record_failure(
        &self,
        run_id: &str,
        iteration: u32,
        execution: &Execution,
        retried: bool,
        error: &str,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO {} (run_id, node_id, iteration, attempt, outcome, error, started_at, finished_at, worker)
             VALUES ($1, $2, $3::int, $4::int, $5, $6, to_timestamp($7::float8 / 1000), to_timestamp($8::float8 / 1000), $9)",
            self.tables().history()
        );
        let iteration = i32::try_from(iteration).unwrap_or(i32::MAX);
        let attempt = i32::try_from(execution.attempt).unwrap_or(i32::MAX);
        let outcome = if retried { "retried" } else { "failed" };
        let params: [&(dyn ToSql + Sync); 9] = [
            &run_id,
            &execution.node_id,
            &iteration,
            &attempt,
            &outcome,
            &error,
            &execution.started_ms,
            &execution.finished_ms,
            &execution.worker,
        ];
        self.pool().get()?.execute_prepared(&sql, &params)?;
        Ok(())
    }

    /// Removes the runs that finished (completed, failed or cancelled) more than `older_than`
    /// ago, with their context, entries and history, in one transaction.
    pub fn prune(&self, older_than: Duration) -> Result<Pruned, StoreError> {
        let t = self.tables();
        let sql = format!(
            "WITH old AS (
               DELETE FROM {s} WHERE status = ANY($2::text[])
                 AND updated_at < NOW() - make_interval(secs => $1::float8)
               RETURNING run_id),
             c AS (DELETE FROM {c} WHERE run_id IN (SELECT run_id FROM old) RETURNING 1),
             e AS (DELETE FROM {e} WHERE run_id IN (SELECT run_id FROM old) RETURNING 1),
             h AS (DELETE FROM {h} WHERE run_id IN (SELECT run_id FROM old) RETURNING 1)
             SELECT (SELECT count(*) FROM old), (SELECT count(*) FROM h)",
            s = t.statuses,
            c = t.contexts,
            e = t.entries(),
            h = t.history(),
        );
        let secs = older_than.as_secs_f64();
        let finished: Vec<&str> = RunStatus::ALL
            .into_iter()
            .filter(|s| s.is_finished())
            .map(RunStatus::as_str)
            .collect();
        let row = self
            .pool()
            .get()?
            .query_one_prepared(&sql, &[&secs, &finished])?;
        let count = |i: usize| -> Result<u64, StoreError> {
            Ok(u64::try_from(row.try_get::<_, i64>(i)?).unwrap_or(0))
        };
        Ok(Pruned {
            runs: count(0)?,
            executions: count(1)?,
        })
    }
}
