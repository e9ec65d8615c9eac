//! PostgreSQL state of runs: a status row per run, the context it started with, and one row
//! per key it wrote since.
//!
//! A run's context is its starting context (`context_data`, as a seed-style client inserts
//! it) overlaid with its *entries* — `(run_id, key) → value` rows, a NULL value hiding a
//! starting key — so a job reads only the keys it uses ([`RunStore::load_keys`]) and writes
//! only its own ([`RunStore::commit_node`]); nothing per job grows with the run. The whole
//! context is assembled in one pass, only when asked for ([`RunStore::load`]: the completed
//! run's result, `status`, the reconciler, a resume asked for by a client). Keys only a run writes ([`is_run_record`]) are never looked up in the
//! starting context, and the keys every job reads come from its `header` column, so a large
//! starting context is not decompressed per job.
//!
//! Every statement takes values as parameters; table names are validated identifiers
//! ([`Tables::new`]). The per-job write is one statement — a CTE that upserts the node's
//! entries and touches the status row — so it commits atomically in one round trip, and it
//! carries the idempotency guard: it applies only if the node's execution has not been
//! committed yet (the first commit wins): for a node that runs once, the insert of its
//! output row; for one that repeats, the iteration added to its bookkeeping row; for a pause,
//! the node added to the run's `_awaitingNodeIds` row.

use std::collections::{BTreeMap, HashMap};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::{Json, ToSql};
use postgres::{Client, NoTls, Row, Statement};
use r2d2::ManageConnection;
use r2d2_postgres::PostgresConnectionManager;
use serde_json::{Map, Value};

use crate::engine::node::{ContextDeltas, ContextMap, KeyLoader};
use crate::services::group::{run_batch, Group, GroupError};
use crate::services::url::mask_url;
use crate::vocabulary::keys::{is_run_record, AWAITING_DETAILS, AWAITING_NODE_IDS, HEADER_KEYS};
use crate::vocabulary::RunStatus;

/// A pool of PostgreSQL connections, each with its own prepared-statement cache.
pub type PgPool = r2d2::Pool<PgConnectionManager>;

/// An r2d2 manager: [`PostgresConnectionManager`] connections, each wrapped with a cache of
/// prepared statements, so the per-job statements are parsed and planned once per
/// connection instead of once per job.
///
/// Its sessions are tuned for this crate's statements, which all find rows by key: a
/// prepared statement keeps its generic plan (`plan_cache_mode = force_generic_plan`) and
/// the planner avoids sequential scans and hash, merge and bitmap plans (`enable_* = off`).
/// Run analytical queries of your own on a pool of your own, or, to share one pool with
/// queries of your own, build it with [`untuned`](PgConnectionManager::untuned) (this
/// crate's statements then take PostgreSQL's default plans: correct, somewhat slower).
#[derive(Debug)]
pub struct PgConnectionManager {
    inner: PostgresConnectionManager<NoTls>,
    tuned: bool,
}

impl PgConnectionManager {
    /// A manager for a connection configuration, with tuned sessions.
    pub fn new(config: postgres::Config) -> PgConnectionManager {
        PgConnectionManager {
            inner: PostgresConnectionManager::new(config, NoTls),
            tuned: true,
        }
    }

    /// Leaves the sessions' planner settings at the server's defaults.
    pub fn untuned(mut self) -> PgConnectionManager {
        self.tuned = false;
        self
    }
}

/// A pooled PostgreSQL connection (derefs to [`postgres::Client`]).
pub struct PgConnection {
    client: Client,
    statements: HashMap<String, Statement>,
}

impl PgConnection {
    /// The prepared statement for `sql`, preparing it on first use.
    pub fn statement(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    /// Runs `sql` as this connection's prepared statement; the rows.
    pub fn query_prepared(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        let stmt = self.statement(sql)?;
        self.client.query(&stmt, params)
    }

    /// Runs `sql` as this connection's prepared statement; at most one row.
    pub fn query_opt_prepared(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        let stmt = self.statement(sql)?;
        self.client.query_opt(&stmt, params)
    }

    /// Runs `sql` as this connection's prepared statement; exactly one row.
    pub fn query_one_prepared(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, postgres::Error> {
        let stmt = self.statement(sql)?;
        self.client.query_one(&stmt, params)
    }

    /// Runs `sql` as this connection's prepared statement; the rows it changed.
    pub fn execute_prepared(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let stmt = self.statement(sql)?;
        self.client.execute(&stmt, params)
    }
}

impl Deref for PgConnection {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for PgConnection {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl ManageConnection for PgConnectionManager {
    type Connection = PgConnection;
    type Error = postgres::Error;

    /// Connects, and sets the session so that prepared statements keep one plan of index
    /// lookups. Every statement of this crate finds rows by key; PostgreSQL's defaults
    /// either re-plan the grouped commit at every execution (0.18–0.37 ms of planning for
    /// 0.03 ms of work, measured with EXPLAIN ANALYZE) or, on young tables without
    /// statistics, cache a plan of sequential scans and hash joins that stays when the
    /// tables grow.
    fn connect(&self) -> Result<PgConnection, postgres::Error> {
        let mut client = self.inner.connect()?;
        if !self.tuned {
            return Ok(PgConnection {
                client,
                statements: HashMap::new(),
            });
        }
        client.batch_execute(
            "SET enable_seqscan = off; SET enable_hashjoin = off; SET enable_mergejoin = off;
             SET enable_bitmapscan = off",
        )?;
        if let Err(e) = client.batch_execute("SET plan_cache_mode = force_generic_plan") {
            // PostgreSQL before 12: statements are re-planned more often, nothing worse.
            log::debug!("plan_cache_mode is not available: {e}");
        }
        Ok(PgConnection {
            client,
            statements: HashMap::new(),
        })
    }

    fn is_valid(&self, conn: &mut PgConnection) -> Result<(), postgres::Error> {
        self.inner.is_valid(&mut conn.client)
    }

    fn has_broken(&self, conn: &mut PgConnection) -> bool {
        self.inner.has_broken(&mut conn.client)
    }
}

/// Errors of the PostgreSQL layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A table name that is not `name` or `schema.name` of letters, digits and underscores.
    #[error("invalid table name '{0}': use letters, digits and underscores (optionally schema.table), at most 63 characters each")]
    InvalidTableName(String),
    /// A connection URL that does not parse.
    #[error("invalid PostgreSQL URL '{url}': {reason}")]
    InvalidUrl {
        /// The URL, with its password masked.
        url: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The pool could not open its connections.
    #[error("cannot connect to PostgreSQL at {url}: {reason}")]
    Connect {
        /// The URL, with its password masked.
        url: String,
        /// Why connecting failed.
        reason: String,
    },
    /// No pooled connection could be had (e.g. none within the 10 s timeout).
    #[error("PostgreSQL pool: {0}")]
    Pool(#[from] r2d2::Error),
    /// A statement failed; shown with the server's severity, message, SQLSTATE, detail and hint.
    #[error("PostgreSQL: {}", describe_pg_error(.0))]
    Query(#[from] postgres::Error),
    /// A run's row holds what the store cannot read.
    #[error("run '{run_id}' has a malformed row: {reason}")]
    Malformed {
        /// The run's id.
        run_id: String,
        /// What is wrong, e.g. an unknown status or a context that is not a JSON object.
        reason: String,
    },
    /// The grouped statement that carried this request failed as a whole (its connection,
    /// or the thread that ran it); the request may be retried.
    #[error("grouped statement: {0}")]
    Grouped(String),
    /// A key a job read on demand could not be fetched.
    #[error("reading the run's context: {0}")]
    Fetch(String),
}

/// A PostgreSQL error as its message says it: the server's severity, message, SQLSTATE,
/// detail and hint (the client's own `Display` says only "db error"), or the client's error
/// with its cause.
fn describe_pg_error(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(detail) = db.detail() {
            text.push_str(&format!("; {detail}"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!("; hint: {hint}"));
        }
        return text;
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Opens a pool. `test_on_check_out` is off: a broken connection surfaces as a query error,
/// which the worker retries, instead of costing a round trip on every check-out.
pub fn connect_pool(url: &str, max_size: u32) -> Result<PgPool, StoreError> {
    let config: postgres::Config =
        url.parse()
            .map_err(|e: postgres::Error| StoreError::InvalidUrl {
                url: mask_url(url),
                reason: e.to_string(),
            })?;
    let manager = PgConnectionManager::new(config);
    r2d2::Pool::builder()
        .max_size(max_size.max(1))
        .min_idle(Some(0))
        .test_on_check_out(false)
        .connection_timeout(Duration::from_secs(10))
        .build(manager)
        .map_err(|e| StoreError::Connect {
            url: mask_url(url),
            reason: e.to_string(),
        })
}

/// Validates a table name: `name` or `schema.name`, each part `[A-Za-z_][A-Za-z0-9_]*`,
/// at most 63 bytes.
pub fn validate_identifier(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.split('.').count() <= 2
        && name.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= 63
                && part
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidTableName(name.to_string()))
    }
}

/// The three table names (validated).
#[derive(Debug, Clone, PartialEq)]
pub struct Tables {
    /// Table of the contexts runs start with, one JSONB row per run (default
    /// `flowcraft_contexts`); what runs write goes to [`entries`](Tables::entries).
    pub contexts: String,
    /// Table of run statuses (default `flowcraft_statuses`).
    pub statuses: String,
    /// Table of registered webhook endpoints (default `flowcraft_webhooks`).
    pub webhooks: String,
}

/// Default table of run contexts.
pub const DEFAULT_CONTEXTS_TABLE: &str = "flowcraft_contexts";
/// Default table of run statuses.
pub const DEFAULT_STATUSES_TABLE: &str = "flowcraft_statuses";
/// Default table of webhook endpoints.
pub const DEFAULT_WEBHOOKS_TABLE: &str = "flowcraft_webhooks";

impl Default for Tables {
    fn default() -> Tables {
        Tables {
            contexts: DEFAULT_CONTEXTS_TABLE.into(),
            statuses: DEFAULT_STATUSES_TABLE.into(),
            webhooks: DEFAULT_WEBHOOKS_TABLE.into(),
        }
    }
}

impl Tables {
    /// Validated table names.
    pub fn new(contexts: &str, statuses: &str, webhooks: &str) -> Result<Tables, StoreError> {
        let tables = Tables {
            contexts: contexts.into(),
            statuses: statuses.into(),
            webhooks: webhooks.into(),
        };
        tables.validate()?;
        Ok(tables)
    }

    /// Checks the names (for values built with struct syntax).
    pub fn validate(&self) -> Result<(), StoreError> {
        for t in [
            &self.contexts,
            &self.statuses,
            &self.webhooks,
            &self.entries(),
        ] {
            validate_identifier(t)?;
        }
        Ok(())
    }

    /// The table of the runs' entries (one row per key a run wrote): the contexts table's
    /// name with `_entries` appended.
    pub fn entries(&self) -> String {
        format!("{}_entries", self.contexts)
    }

    /// The table of the runs' history (one row per node execution): the statuses table's
    /// name with `_history` appended.
    pub fn history(&self) -> String {
        format!("{}_history", self.statuses)
    }
}

/// A run's context and status, read in one round trip.
#[derive(Debug, Clone)]
pub struct RunSnapshot {
    /// The run's context row.
    pub context: ContextMap,
    /// `None` when the run has no status row.
    pub status: Option<RunStatus>,
}

/// The reason a status row holds no status of [`RunStatus`].
pub(super) fn unknown_status(status: &str) -> String {
    format!("unknown status '{status}'")
}

/// A run's status row.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusRow {
    /// The run's id.
    pub run_id: String,
    /// The run's status.
    pub status: RunStatus,
    /// RFC 3339.
    pub updated_at: Option<String>,
    /// The last outcome written (`{"status": "awaiting"|"completed"|"failed"|"cancelled", …}`);
    /// `None` until the run first pauses or ends.
    pub result: Option<Value>,
}

impl StatusRow {
    /// Why the run failed or was cancelled (its result's `reason`), if it says.
    pub fn reason(&self) -> Option<&str> {
        self.result.as_ref()?.get("reason")?.as_str()
    }
}

/// Where a page of awaiting runs ended: the last run's `updated_at` (as PostgreSQL's text)
/// and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwaitingCursor {
    /// The last run's `updated_at`, as PostgreSQL's text.
    pub updated_at: String,
    /// The last run's id (orders runs with the same `updated_at`).
    pub run_id: String,
}

/// An awaiting run of a page, with its paused nodes whose wake-up is overdue.
#[derive(Debug, Clone)]
pub struct AwaitingRun {
    /// The run, and where the page is if it ends here.
    pub cursor: AwaitingCursor,
    /// The run's `blueprintId`, if its context has one.
    pub blueprint_id: Option<String>,
    /// Paused nodes whose wake-up is overdue, with the iteration they paused at.
    pub lost_wake_ups: Vec<(String, u32)>,
}

/// The guard a node commit carries: it applies only to the execution it is for.
#[derive(Debug, Clone)]
pub struct CommitGuard {
    /// `_outputs.<node>`: for nodes that run once, the commit applies only while it is absent.
    pub output_key: String,
    /// `_node.<node>`: for nodes that may repeat, the commit applies only while `iteration` is
    /// not among its committed `iters`; the commit adds it.
    pub meta_key: String,
    /// The execution's loop iteration (0 for nodes that never repeat).
    pub iteration: u32,
    /// Whether the node may repeat (see [`Blueprint::may_repeat`](crate::engine::blueprint::Blueprint::may_repeat)).
    pub repeats: bool,
}

/// One node's effects, applied in one statement.
#[derive(Debug, Clone, Default)]
pub struct NodeCommit {
    /// Keys to set, replacing their values.
    pub set: Map<String, Value>,
    /// Keys set only where absent (the input of an `any` join).
    pub set_if_absent: Map<String, Value>,
    /// Keys to remove.
    pub delete: Vec<String>,
    /// A node that paused the run: its id and `_awaitingDetails` entry.
    pub awaiting: Option<(String, Value)>,
    /// The execution, recorded in the run's history with the commit.
    pub execution: Option<Execution>,
    /// The keys of `set` no other commit of the run writes, so that their rows exist only
    /// if this execution was committed before — a node's bare-id copy, the inputs of
    /// successors it alone feeds — as the caller knows from the blueprint. A plain commit of
    /// a node that runs once inserts them with its guard's row, by plain inserts (cheaper
    /// than inserts that may update); if one is there after all, it commits the usual way
    /// (the plain inserts wrote nothing). A hint: leaving a key out is always safe.
    pub new_keys: Vec<String>,
}

/// One execution of a node, as the run's history records it.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    /// The node (a batch worker's id for a worker).
    pub node_id: String,
    /// The attempt (1-based).
    pub attempt: u32,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_ms: f64,
    /// When it ended, in milliseconds since the Unix epoch.
    pub finished_ms: f64,
    /// The worker process (`host:pid`).
    pub worker: String,
}

impl NodeCommit {
    /// A node's context writes: its sets and deletions.
    pub fn from_deltas(deltas: &ContextDeltas) -> NodeCommit {
        let mut commit = NodeCommit::default();
        for (k, v) in deltas.iter() {
            match v {
                Some(v) => {
                    commit.set.insert(k.to_string(), v.clone());
                }
                None => commit.delete.push(k.to_string()),
            }
        }
        commit
    }

    /// Records a successor's input: set, or — for a target that keeps the first input it
    /// is given (an `any` join outside loops) — set only where absent, the first of this
    /// commit's winning.
    pub fn set_input(&mut self, key: String, input: Value, keeps_first: bool) {
        if keeps_first {
            self.set_if_absent.entry(key).or_insert(input);
        } else {
            self.set.insert(key, input);
        }
    }
}

/// PostgreSQL access for one pair of context/status tables.
///
/// Snapshot reads and node commits of concurrent callers (clones of one store share this)
/// are grouped: one statement, one round trip and one fsync for the batch
/// ([`crate::services::group`]); a lone caller runs alone, at once.
#[derive(Clone)]
pub struct RunStore {
    pool: PgPool,
    tables: Tables,
    sql: Statements,
    groups: Arc<Groups>,
}

/// Batches of concurrent requests (see [`crate::services::group`]).
struct Groups {
    load: Group<KeysRequest, Option<RunSnapshot>, StoreError>,
    commit: Group<CommitRequest, Applied, StoreError>,
}

/// What became of a commit: `None` if it did not apply (its execution was committed
/// before); else the run's status as its statement saw it (`None`: the run has no status
/// row, or one of no known status).
pub(crate) type Applied = Option<Option<RunStatus>>;

/// Most requests one grouped statement carries.
const MAX_BATCH: usize = 64;

impl StoreError {
    /// Whether PostgreSQL refused the data itself — a data exception (SQLSTATE class `22`,
    /// e.g. `\u0000` in `jsonb`) or a program limit (class `54`, e.g. a value too large):
    /// the same write fails every time, so retrying it is pointless.
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Query(e) => e.as_db_error().is_some_and(|db| {
                let code = db.code().code();
                code.starts_with("22") || code.starts_with("54")
            }),
            StoreError::Malformed { .. } | StoreError::InvalidTableName(_) => true,
            _ => false,
        }
    }
}

impl GroupError for StoreError {
    /// No connection, or a broken one: no request of the batch would fare better alone.
    fn fails_every_request(&self) -> bool {
        match self {
            StoreError::Pool(_) => true,
            StoreError::Query(e) => e.is_closed() || e.as_db_error().is_none(),
            _ => false,
        }
    }

    fn for_caller(reason: String) -> Self {
        StoreError::Grouped(reason)
    }
}

/// One [`RunStore::load_keys`] call.
struct KeysRequest {
    run_id: String,
    keys: Vec<String>,
}

/// Where a key is read when the run has no entry for it: nowhere (0, a key only a run
/// writes), the `header` column (its 1-based position there), or the starting context (-1).
pub(crate) fn key_source(key: &str) -> i32 {
    if is_run_record(key) {
        0
    } else if let Some(at) = HEADER_KEYS.iter().position(|h| *h == key) {
        at as i32 + 1
    } else {
        -1
    }
}

/// One [`RunStore::commit_node`] call, as the commit statement's parameters of one row.
struct CommitRequest {
    run_id: String,
    delete: Value,
    set: Value,
    /// The row that tells whether the execution is committed: the node's output, or the
    /// bookkeeping of a node that repeats (a pause checks it; its guard is the awaiting row).
    exec_key: String,
    iteration: i32,
    repeats: bool,
    awaiting_id: Option<String>,
    awaiting_details: Value,
    set_if_absent: Value,
    /// The guard's own row, written first (the commit applies only if it could be): the
    /// output of a node that runs once, the bookkeeping of one that repeats, the run's
    /// awaited nodes for a pause.
    guard_key: String,
    /// The value of the guard's own row: the output of a node that runs once, the
    /// bookkeeping of one that repeats (its `iters` added by the statement).
    guard_value: Option<Value>,
    /// Header keys set and deleted: written to the run's context row (see [`HEADER_KEYS`]).
    header_set: Value,
    header_delete: Value,
    /// The history row of the execution, if it is recorded.
    execution: Option<Execution>,
    /// The keys set that no other commit writes ([`NodeCommit::new_keys`]; not in `set`):
    /// inserted with the guard's row where it is inserted ([`inserts_guard`](Self::inserts_guard)).
    inserts: Value,
}

impl NodeCommit {
    /// Takes the header keys ([`HEADER_KEYS`]) out of the writes — they live in the run's
    /// context row (its `header` column is what jobs read), not among its entries — and
    /// returns them (set, deleted); a keep-first write of one is dropped. Every writer of
    /// a run's keys (commit, resume, [`RunStore::write_keys`]) passes through here.
    fn take_header_keys(&mut self) -> (Value, Value) {
        let mut header_set = Map::new();
        for key in HEADER_KEYS {
            if let Some(value) = self.set.remove(key) {
                header_set.insert(key.to_string(), value);
            }
            self.set_if_absent.remove(key);
        }
        let header_delete: Vec<String> = self
            .delete
            .iter()
            .filter(|k| HEADER_KEYS.contains(&k.as_str()))
            .cloned()
            .collect();
        self.delete.retain(|k| !HEADER_KEYS.contains(&k.as_str()));
        (Value::Object(header_set), Value::from(header_delete))
    }
}

/// One parameter of a batch statement: a value of each commit, as an array.
fn column<'a, T>(rows: &[&'a CommitRequest], f: impl Fn(&'a CommitRequest) -> T) -> Vec<T> {
    rows.iter().map(|&r| f(r)).collect()
}

/// A row of a run's entries: (run, key).
type RowKey<'a> = (&'a str, &'a str);

impl CommitRequest {
    /// Whether the commit writes its output once and sets or deletes keys, and nothing
    /// else: no pause, no repeating node's bookkeeping, no keep-first input, no header key.
    fn is_plain(&self) -> bool {
        let empty = |v: &Value| match v {
            Value::Object(m) => m.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Null => true,
            _ => false,
        };
        self.awaiting_id.is_none()
            && !self.repeats
            && empty(&self.set_if_absent)
            && empty(&self.header_set)
            && empty(&self.header_delete)
    }

    /// The rows (run, key) the commit may write: those no other commit of its statement
    /// may write, and those it sets or deletes, which other commits of the statement may
    /// set or delete too (the last commit's write wins, as if they ran one by one).
    fn rows(&self) -> (Vec<RowKey<'_>>, Vec<RowKey<'_>>) {
        let run = self.run_id.as_str();
        let mut rows = vec![(run, self.guard_key.as_str())];
        if self.awaiting_id.is_some() {
            rows.push((run, AWAITING_DETAILS));
        }
        if let Value::Object(map) = &self.set_if_absent {
            rows.extend(map.keys().map(|k| (run, k.as_str())));
        }
        // (A new key is inserted: no other commit of the statement may write it.)
        if let Value::Object(map) = &self.inserts {
            rows.extend(map.keys().map(|k| (run, k.as_str())));
        }
        let mut shared = Vec::new();
        if let Value::Object(map) = &self.set {
            shared.extend(map.keys().map(|k| (run, k.as_str())));
        }
        if let Value::Array(keys) = &self.delete {
            shared.extend(keys.iter().filter_map(Value::as_str).map(|k| (run, k)));
        }
        // Header keys are the context row's: one statement updates it for one commit only.
        let header_written = self.header_set.as_object().is_some_and(|m| !m.is_empty())
            || self.header_delete.as_array().is_some_and(|d| !d.is_empty());
        if header_written {
            rows.push((run, "\0header"));
        }
        (rows, shared)
    }

    /// The node its history row records (`None`: no history row).
    fn h_node(&self) -> Option<&str> {
        self.execution.as_ref().map(|x| x.node_id.as_str())
    }

    /// The attempt its history row records.
    fn attempt(&self) -> i32 {
        self.execution
            .as_ref()
            .map_or(1, |x| i32::try_from(x.attempt).unwrap_or(i32::MAX))
    }

    /// When the execution its history row records started (ms since the epoch).
    fn h_started(&self) -> f64 {
        self.execution.as_ref().map_or(0.0, |x| x.started_ms)
    }

    /// When the execution its history row records ended (ms since the epoch).
    fn h_finished(&self) -> f64 {
        self.execution.as_ref().map_or(0.0, |x| x.finished_ms)
    }

    /// The worker its history row records.
    fn h_worker(&self) -> Option<&str> {
        self.execution.as_ref().map(|x| x.worker.as_str())
    }

    fn new(run_id: &str, mut commit: NodeCommit, guard: CommitGuard) -> CommitRequest {
        let (header_set, header_delete) = commit.take_header_keys();
        let NodeCommit {
            mut set,
            mut set_if_absent,
            mut delete,
            awaiting,
            execution,
            new_keys,
        } = commit;
        let (awaiting_id, awaiting_details) = match awaiting {
            Some((id, details)) => (Some(id), details),
            None => (None, Value::Null),
        };
        // The awaiting keys are the statement's own; the guard's row is written apart.
        for key in [AWAITING_NODE_IDS, AWAITING_DETAILS] {
            set.remove(key);
            set_if_absent.remove(key);
        }
        // The guard's row, and what the commit writes there.
        let (guard_key, guard_value) = match (&awaiting_id, guard.repeats) {
            (Some(_), _) => (AWAITING_NODE_IDS.to_string(), None),
            (None, true) => {
                let meta = set.remove(&guard.meta_key);
                let meta = meta.unwrap_or_else(|| Value::Object(Map::new()));
                (guard.meta_key.clone(), Some(meta))
            }
            (None, false) => (guard.output_key.clone(), set.remove(&guard.output_key)),
        };
        // One row per key: a set wins over a deletion, and both over a keep-first input.
        delete.retain(|k| {
            !set.contains_key(k)
                && k != AWAITING_NODE_IDS
                && k != AWAITING_DETAILS
                && (awaiting_id.is_some() || (k != &guard.output_key && k != &guard.meta_key))
        });
        delete.sort_unstable();
        delete.dedup();
        set_if_absent.retain(|k, _| !set.contains_key(k) && !delete.contains(k));
        set_if_absent.remove(&guard_key);
        let inserts = new_keys
            .iter()
            .filter_map(|k| set.remove_entry(k))
            .collect::<Map<_, _>>();
        CommitRequest {
            run_id: run_id.to_string(),
            guard_key,
            delete: Value::from(delete),
            set: Value::Object(set),
            exec_key: if guard.repeats {
                guard.meta_key
            } else {
                guard.output_key
            },
            iteration: i32::try_from(guard.iteration).unwrap_or(i32::MAX),
            repeats: guard.repeats,
            awaiting_id,
            awaiting_details,
            set_if_absent: Value::Object(set_if_absent),
            guard_value,
            header_set,
            header_delete,
            execution,
            inserts: Value::Object(inserts),
        }
    }

    /// Whether the commit's guard row is inserted, by a plain insert, with its new keys: a
    /// plain commit of a node that runs once, with an output. (Its row exists only if the
    /// execution was committed before — or if the output was deleted since: then the plain
    /// insert fails, and the commit goes the usual way.)
    fn inserts_guard(&self) -> bool {
        self.is_plain() && self.guard_value.is_some()
    }

    /// Whether it sets keys beside its new ones, or deletes any.
    fn writes_others(&self) -> bool {
        let some = |v: &Value| match v {
            Value::Object(m) => !m.is_empty(),
            Value::Array(a) => !a.is_empty(),
            _ => false,
        };
        some(&self.set) || some(&self.delete)
    }

    /// All the keys it sets, new or not: what the usual statement sets (a copy only where
    /// it has new keys, which a commit goes the usual way with only when its insert failed
    /// or a pause shares its batch).
    fn all_sets(&self) -> std::borrow::Cow<'_, Value> {
        match (&self.set, &self.inserts) {
            (Value::Object(set), Value::Object(inserts)) if !inserts.is_empty() => {
                let mut all = set.clone();
                all.extend(inserts.iter().map(|(k, v)| (k.clone(), v.clone())));
                std::borrow::Cow::Owned(Value::Object(all))
            }
            (set, _) => std::borrow::Cow::Borrowed(set),
        }
    }
}

#[derive(Clone)]
struct Statements {
    load: String,
    load_keys: String,
    commit: String,
    /// `commit` for a batch of plain commits whose guard rows are inserted
    /// ([`CommitRequest::inserts_guard`]): without, then with, keys set or deleted but
    /// for the new ones.
    commit_insert: [String; 2],
    /// `commit_insert` for one commit, its values as plain parameters.
    commit_insert_lone: [String; 2],
    complete: String,
    fail: String,
    set_status: String,
    status: String,
    stalled: String,
    stopped: String,
    awaiting_page: String,
    touch: String,
    mark_stalled: String,
    touch_many: String,
    cancelled_among: String,
    insert_context: String,
    insert_status: String,
    insert_context_if_absent: String,
    insert_status_if_absent: String,
    insert_entries: String,
    resume: String,
    register_webhook: String,
    webhook: String,
    awaiting_details: String,
    ensure_context: String,
    put_entries: String,
    put_header: String,
    lock_awaiting: String,
}

/// The SQL of a status test on runs found by id: `IS TRUE` is no condition an index can
/// serve, so the planner looks the runs up by id instead of scanning every run of that
/// status in the index of statuses (which it does when it underestimates them).
fn status_is(column: &str, status: &str) -> String {
    format!("({column} = '{status}') IS TRUE")
}

/// The SQL that writes header keys (see [`HEADER_KEYS`]) to the context row of `run`: the
/// keys of the JSONB array `delete` removed, the JSONB object `set` merged in. `from` names
/// the rows `run`, `delete` and `set` come from (`FROM ok`), or is empty for parameters.
/// Leaves a row that is not an object, and one nothing is written to, alone.
fn header_update(contexts: &str, from: &str, run: &str, delete: &str, set: &str) -> String {
    format!(
        "UPDATE {contexts} t SET context_data =
           (t.context_data - ARRAY(SELECT jsonb_array_elements_text({delete}))) || {set}
         {from}
         WHERE t.run_id = {run} AND jsonb_typeof(t.context_data) = 'object'
           AND ({set} <> '{{}}'::jsonb OR {delete} <> '[]'::jsonb)"
    )
}

/// The SQL of the value of a key (the SQL `key`) of the run `c` (its contexts row), `x`
/// being the run's entry for it if it has one: that entry, or else, by the key's `source`
/// (see [`key_source`]), the `header` column or the starting context.
pub(crate) fn keyed_value(key: &str, source: &str) -> String {
    format!(
        "CASE WHEN x.run_id IS NOT NULL THEN x.value
              WHEN {source} > 0 THEN NULLIF(c.header[{source}], 'null'::jsonb)
              WHEN {source} < 0 THEN c.context_data -> {key} END"
    )
}

/// The SQL of a timestamp column as RFC 3339 text in UTC, with milliseconds.
pub(crate) fn rfc3339(column: &str) -> String {
    format!("to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
}

/// The SQL of a run's whole context — its starting context (`c.context_data`) overlaid with
/// its entries — read in one pass over them.
pub(crate) fn assembled_context(e: &str) -> String {
    format!(
        "CASE WHEN jsonb_typeof(c.context_data) = 'object' THEN (
           SELECT (c.context_data - COALESCE(array_agg(x.key) FILTER (WHERE x.value IS NULL), '{{}}'))
                  || COALESCE(jsonb_object_agg(x.key, x.value) FILTER (WHERE x.value IS NOT NULL), '{{}}'::jsonb)
           FROM {e} x WHERE x.run_id = c.run_id)
         ELSE c.context_data END"
    )
}

impl RunStore {
    /// A store over validated tables.
    pub fn new(pool: PgPool, tables: Tables) -> Result<RunStore, StoreError> {
        tables.validate()?;
        let (c, s, e, h) = (
            &tables.contexts,
            &tables.statuses,
            &tables.entries(),
            &tables.history(),
        );
        let whole = assembled_context(e);
        // One row of `j` per node commit (no two of them write one row, but for keys they set
        // or delete, where the last one's write is kept; rows written in (run, key) order, so
        // that concurrent statements lock entries in one order). Each applies only if its
        // guard row could be written: `ok` lists those.
        let commit_rows = "WITH j AS (
                   SELECT * FROM unnest($1::text[], $2::jsonb[], $3::jsonb[], $4::text[], $5::int[],
                               $6::bool[], $7::text[], $8::jsonb[], $9::jsonb[], $10::jsonb[],
                               $11::jsonb[], $12::jsonb[], $13::text[], $14::int[], $15::float8[],
                               $16::float8[], $17::text[], $18::text[])
                     WITH ORDINALITY AS u(run_id, del, sets, exec_key, iteration, repeats,
                                          awaiting_id, awaiting_details, set_if_absent, guard_value,
                                          header_set, header_del, h_node, h_attempt, h_started,
                                          h_finished, h_worker, guard_key, ord))";
        // A node that runs once: the row of its output, written while absent.
        let once = format!(
            "once AS (
                   INSERT INTO {e} AS t (run_id, key, value)
                   SELECT run_id, guard_key, guard_value FROM j
                   WHERE awaiting_id IS NULL AND NOT repeats ORDER BY run_id
                   ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value WHERE t.value IS NULL
                   RETURNING t.run_id, t.key)"
        );
        // The execution's history row, with the commit it belongs to (a row of `from`,
        // the execution ending as `outcome` says).
        let history_of = |from: &str, outcome: &str| {
            format!(
                "history AS (
                   INSERT INTO {h} (run_id, node_id, iteration, attempt, outcome, started_at, finished_at, worker)
                   SELECT {from}.run_id, {from}.h_node, {from}.iteration, {from}.h_attempt, {outcome},
                     to_timestamp({from}.h_started / 1000.0), to_timestamp({from}.h_finished / 1000.0), {from}.h_worker
                   FROM {from} WHERE {from}.h_node IS NOT NULL
                   RETURNING 1)"
            )
        };
        let history = history_of(
            "ok",
            "CASE WHEN ok.awaiting_id IS NULL THEN 'completed' ELSE 'awaiting' END",
        );
        // The keys the commits set or delete, `extra` rows (a pause's details), each written
        // as `value` says: the last commit's write of a key several commits write.
        let writes = |from: &str, extra: &str, value: &str| {
            format!(
                "w AS (
                   INSERT INTO {e} AS t (run_id, key, value)
                   SELECT DISTINCT ON (w.run_id, w.key) w.run_id, w.key, w.value FROM (
                     SELECT ok.run_id, x.key, x.value, ok.ord FROM {from} ok, jsonb_each(ok.sets) x
                     UNION ALL
                     SELECT ok.run_id, d.key, NULL, ok.ord FROM {from} ok, jsonb_array_elements_text(ok.del) AS d(key)
                     {extra}) w
                   ORDER BY w.run_id, w.key, w.ord DESC
                   ON CONFLICT (run_id, key) DO UPDATE SET value = {value}
                   RETURNING 1)"
            )
        };
        let w = writes(
            "ok",
            &format!(
                "UNION ALL
                 SELECT ok.run_id, '{AWAITING_DETAILS}', jsonb_build_object(ok.awaiting_id, ok.awaiting_details), ok.ord
                 FROM ok WHERE ok.awaiting_id IS NOT NULL"
            ),
            &format!(
                "CASE WHEN EXCLUDED.key = '{AWAITING_DETAILS}' AND jsonb_typeof(t.value) = 'object'
                   THEN t.value || EXCLUDED.value ELSE EXCLUDED.value END"
            ),
        );
        // The run's status row: `updated_at` (indexed, so each write is an index insert)
        // moves at most once a second; a pause always writes.
        let status = format!(
            "s AS (
                   UPDATE {s} st SET updated_at = NOW(),
                     status = CASE WHEN c.awaiting_id IS NOT NULL AND st.status = 'running' THEN 'awaiting' ELSE st.status END,
                     result = CASE WHEN c.awaiting_id IS NOT NULL AND st.status IN ('running', 'awaiting')
                       THEN jsonb_build_object('status', 'awaiting', 'nodeId', c.awaiting_id, 'details', c.awaiting_details)
                       ELSE st.result END
                   -- (One row per run: a statement holds at most one pause of a run.)
                   FROM (SELECT ok.run_id,
                           (array_agg(ok.awaiting_id) FILTER (WHERE ok.awaiting_id IS NOT NULL))[1] AS awaiting_id,
                           (array_agg(ok.awaiting_details) FILTER (WHERE ok.awaiting_id IS NOT NULL))[1] AS awaiting_details
                         FROM ok GROUP BY ok.run_id) c
                   WHERE st.run_id = c.run_id
                     AND (c.awaiting_id IS NOT NULL OR st.updated_at IS NULL
                          OR st.updated_at < NOW() - interval '1 second')
                   RETURNING 1)"
        );
        let commit_header =
            header_update(c, "FROM ok", "ok.run_id", "ok.header_del", "ok.header_set");
        let commit_ctes = format!(
            "{commit_rows}, {once},
                 -- A node that may repeat: its bookkeeping row, to whose `iters` the
                 -- iteration is added unless it is there already.
                 again AS (
                   INSERT INTO {e} AS t (run_id, key, value)
                   SELECT run_id, guard_key,
                          COALESCE(guard_value, '{{}}'::jsonb) || jsonb_build_object('iters', jsonb_build_array(iteration))
                   FROM j WHERE awaiting_id IS NULL AND repeats ORDER BY run_id
                   ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value || jsonb_build_object('iters',
                       COALESCE(t.value -> 'iters', '[]'::jsonb) || (EXCLUDED.value -> 'iters'))
                   WHERE NOT COALESCE(t.value -> 'iters', '[]'::jsonb) @> (EXCLUDED.value -> 'iters')
                   RETURNING t.run_id, t.key),
                 -- A pause: the node joins the run's awaited nodes, unless it is awaited
                 -- already or this execution is committed.
                 paused AS (
                   INSERT INTO {e} AS t (run_id, key, value)
                   SELECT j.run_id, j.guard_key, jsonb_build_array(j.awaiting_id) FROM j
                   WHERE j.awaiting_id IS NOT NULL AND NOT EXISTS (
                     SELECT 1 FROM {e} x
                     WHERE x.run_id = j.run_id AND x.value IS NOT NULL
                       AND x.key = j.exec_key
                       AND (NOT j.repeats OR COALESCE(x.value -> 'iters', '[]'::jsonb) @> jsonb_build_array(j.iteration)))
                   ORDER BY j.run_id
                   ON CONFLICT (run_id, key) DO UPDATE SET value = COALESCE(t.value, '[]'::jsonb) || EXCLUDED.value
                   WHERE NOT COALESCE(t.value, '[]'::jsonb) @> EXCLUDED.value
                   RETURNING t.run_id, t.key),
                 -- The commits whose guard row was written (a statement writes a row once).
                 ok AS (
                   SELECT j.* FROM j JOIN (
                     SELECT * FROM once UNION ALL SELECT * FROM again UNION ALL SELECT * FROM paused) a
                   ON a.run_id = j.run_id AND a.key = j.guard_key),
                 {w},
                 -- Inputs of `any` joins: the first one written stays.
                 first AS (
                   INSERT INTO {e} AS t (run_id, key, value)
                   SELECT ok.run_id, x.key, x.value FROM ok, jsonb_each(ok.set_if_absent) x
                   ORDER BY 1, 2
                   ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value WHERE t.value IS NULL
                   RETURNING 1),
                 -- The header keys (the first job's stamp of the blueprint) go to the
                 -- context row.
                 header AS ({commit_header} RETURNING 1),
                 {history},
                 {status}"
        );
        // A touch of the status rows that `touched` selects (the SQL of a `FROM ... WHERE` or
        // `WHERE` clause over `st`, the status table), at most once a second.
        let touch = |touched: &str| {
            format!(
                "s AS (
                   UPDATE {s} st SET updated_at = NOW()
                   {touched}
                     AND (st.updated_at IS NULL OR st.updated_at < NOW() - interval '1 second')
                   RETURNING 1)"
            )
        };
        // Plain commits whose guard row is inserted, one row of `j` each
        // ([`CommitRequest::inserts_guard`]): the guard's row and the keys no other commit
        // writes ([`NodeCommit::new_keys`], `inserts`) by plain inserts, the other keys set or
        // deleted as any commit's (`w`: left out where no commit has any, as in a chain,
        // since even empty it costs a tenth of the statement). If a row to insert is there
        // (the execution committed by a copy, most often), the statement fails and writes
        // nothing. The guard rows are locked first, in run order, as the usual statement
        // locks them (its `once` runs first: the main query reads it through `ok`), so that
        // two copies of a job, one on each statement, wait on the guard row instead of
        // deadlocking: the main query reads `n` too, before the writes it does not read,
        // which run after it.
        let insert_ctes = |j: &str, touched: &str, others: bool| {
            let w = if others {
                format!("{}, ", writes("j", "", "EXCLUDED.value"))
            } else {
                String::new()
            };
            format!(
                "WITH j AS ({j}),
                 n AS (
                   INSERT INTO {e} (run_id, key, value)
                   SELECT n.run_id, n.key, n.value FROM (
                     SELECT 0 AS phase, j.run_id, j.guard_key AS key, j.guard_value AS value FROM j
                     UNION ALL
                     SELECT 1, j.run_id, x.key, x.value FROM j, jsonb_each(j.inserts) x) n
                   ORDER BY n.phase, n.run_id, n.key
                   RETURNING 1),
                 {w}{}, {}",
                history_of("j", "'completed'"),
                touch(touched)
            )
        };
        let insert_batch = |others| {
            insert_ctes(
                "SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::jsonb[], $5::jsonb[],
                                      $6::jsonb[], $7::int[], $8::text[], $9::int[], $10::float8[],
                                      $11::float8[], $12::text[])
                   WITH ORDINALITY AS u(run_id, guard_key, guard_value, inserts, sets, del, iteration,
                                        h_node, h_attempt, h_started, h_finished, h_worker, ord)",
                "FROM (SELECT DISTINCT j.run_id FROM j) c WHERE st.run_id = c.run_id",
                others,
            )
        };
        let insert_lone = |others| {
            insert_ctes(
                "SELECT $1::text AS run_id, $2::text AS guard_key, $3::jsonb AS guard_value,
                    $4::jsonb AS inserts, $5::jsonb AS sets, $6::jsonb AS del, $7::int AS iteration,
                    $8::text AS h_node, $9::int AS h_attempt, $10::float8 AS h_started,
                    $11::float8 AS h_finished, $12::text AS h_worker, 1::bigint AS ord",
                "WHERE st.run_id = $1::text",
                others,
            )
        };
        let resume_header = header_update(c, "", "$1", "$6::jsonb", "$7::jsonb");
        // The run's status as the commit statement saw it (before its own writes): what a
        // successor's job would load right after the commit (see `Applied`).
        let status_seen =
            |run: &str| format!("(SELECT st.status FROM {s} st WHERE st.run_id = {run})");
        let sql = Statements {
            load: format!(
                "SELECT c.run_id, {whole}, (SELECT s.status FROM {s} s WHERE s.run_id = c.run_id)
                 FROM {c} c WHERE c.run_id = ANY($1::text[])"
            ),
            // For each run of $1 that exists: its status, whether its starting context is an
            // object (`header` is NULL otherwise), and the value of each of its keys asked
            // for in $2 (`{run: {key: source}}`, see [`key_source`]; each run reads only its
            // own): a header key from the `header` column, another from its entry, or else
            // (where its source allows) from the starting context. A header key looks the
            // entries' index up for NULL, which matches nothing without a search.
            load_keys: format!(
                "SELECT c.run_id, s.status, c.header IS NOT NULL, q.key, {}
                 FROM {c} c
                 LEFT JOIN {s} s ON s.run_id = c.run_id
                 LEFT JOIN LATERAL (SELECT k.key, k.value::int AS source
                                    FROM jsonb_each_text($2::jsonb -> c.run_id) k) q ON true
                 LEFT JOIN {e} x ON x.run_id = c.run_id
                   AND x.key = CASE WHEN q.source <= 0 THEN q.key END
                 WHERE c.run_id = ANY($1::text[])",
                keyed_value("q.key", "q.source")
            ),
            commit: format!(
                "{commit_ctes} SELECT ok.ord, {} FROM ok",
                status_seen("ok.run_id")
            ),
            commit_insert: [false, true].map(|others| {
                format!(
                    "{} SELECT j.ord, {} FROM j, (SELECT count(*) FROM n) inserted",
                    insert_batch(others),
                    status_seen("j.run_id")
                )
            }),
            commit_insert_lone: [false, true].map(|others| {
                format!(
                    "{} SELECT j.ord, {} FROM j, (SELECT count(*) FROM n) inserted",
                    insert_lone(others),
                    status_seen("$1::text")
                )
            }),
            // Completes the runs $1 that are running and await nothing. (`r` is materialized
            // so that each context is assembled once, not once per use.)
            complete: format!(
                "WITH r AS MATERIALIZED (
                   SELECT st.run_id, {whole} AS context
                   FROM (SELECT DISTINCT unnest($1::text[]) AS run_id) ids
                   JOIN {s} st ON st.run_id = ids.run_id
                   JOIN {c} c ON c.run_id = st.run_id
                   WHERE {running}
                     AND NOT EXISTS (SELECT 1 FROM {e} a WHERE a.run_id = st.run_id AND a.key = '{AWAITING_NODE_IDS}'
                                     AND jsonb_typeof(a.value) = 'array' AND a.value <> '[]'::jsonb))
                 UPDATE {s} st SET status = 'completed', updated_at = NOW(),
                   result = jsonb_build_object('status', 'completed', 'context', r.context,
                                               'serializedContext', r.context::text)
                 FROM r WHERE st.run_id = r.run_id AND {running}
                 RETURNING st.run_id, r.context",
                running = status_is("st.status", "running")
            ),
            fail: format!(
                "INSERT INTO {s} (run_id, status, updated_at, result)
                 VALUES ($1, 'failed', NOW(), jsonb_build_object('status', 'failed', 'reason', $2::text))
                 ON CONFLICT (run_id) DO UPDATE SET status = 'failed', updated_at = NOW(), result = EXCLUDED.result
                 WHERE {s}.status IN ('running', 'awaiting')"
            ),
            set_status: format!(
                "UPDATE {s} SET status = $2, updated_at = NOW(), result = COALESCE($3::jsonb, result)
                 WHERE run_id = $1 AND status = ANY($4::text[])"
            ),
            status: format!(
                "SELECT status, {}, result FROM {s} WHERE run_id = $1",
                rfc3339("updated_at")
            ),
            stalled: format!(
                "SELECT run_id FROM {s} WHERE status = 'running'
                   AND updated_at < NOW() - make_interval(secs => $1::float8)
                 ORDER BY updated_at LIMIT $2::bigint"
            ),
            // (The statuses index holds (status, updated_at): two range scans.)
            stopped: format!(
                "SELECT run_id FROM {s} WHERE status IN ('cancelled', 'failed')
                   AND updated_at > NOW() - make_interval(secs => $1::float8)
                 LIMIT $2::bigint"
            ),
            // A page of awaiting runs idle for $1 s, after the cursor ($4, $5), each with
            // its paused nodes whose wake-up is overdue: a sleep past `wakeUpAtMs` by $1 s at
            // $3 (ms), or a subflow whose child run finished more than $1 s ago or does not
            // exist.
            awaiting_page: format!(
                "WITH page AS (
                   SELECT run_id, updated_at FROM {s}
                   WHERE status = 'awaiting' AND updated_at < NOW() - make_interval(secs => $1::float8)
                     AND (updated_at, run_id) > ($4::text::timestamptz, $5::text)
                   ORDER BY updated_at, run_id LIMIT $2::bigint)
                 SELECT p.run_id, p.updated_at::text,
                   c.header[1] #>> '{{}}',
                   COALESCE((
                     SELECT jsonb_agg(jsonb_build_array(d.key, d.value->'iteration'))
                     FROM jsonb_each(CASE WHEN jsonb_typeof(ad.value) = 'object' THEN ad.value ELSE '{{}}'::jsonb END) d
                     WHERE jsonb_typeof(an.value) = 'array' AND an.value @> jsonb_build_array(d.key)
                       AND ((d.value->>'type' = 'sleep' AND jsonb_typeof(d.value->'wakeUpAtMs') = 'number'
                             AND (d.value->>'wakeUpAtMs')::numeric + ($1::float8 * 1000)::numeric
                                 <= $3::float8::numeric)
                         OR (d.value->>'type' = 'subflow' AND jsonb_typeof(d.value->'childRunId') = 'string'
                             AND NOT EXISTS (
                               SELECT 1 FROM {s} cs WHERE cs.run_id = d.value->>'childRunId'
                                 AND (cs.status IN ('running', 'awaiting', 'cancelled')
                                      OR cs.updated_at >= NOW() - make_interval(secs => $1::float8)))))
                   ), '[]'::jsonb)
                 FROM page p LEFT JOIN {c} c ON c.run_id = p.run_id
                   LEFT JOIN {e} an ON an.run_id = p.run_id AND an.key = '{AWAITING_NODE_IDS}'
                   LEFT JOIN {e} ad ON ad.run_id = p.run_id AND ad.key = '{AWAITING_DETAILS}'
                 ORDER BY p.updated_at, p.run_id"
            ),
            touch: format!("UPDATE {s} SET updated_at = NOW() WHERE run_id = $1"),
            mark_stalled: format!(
                "UPDATE {s} SET updated_at = 'epoch' WHERE run_id = $1 AND status = 'running'"
            ),
            touch_many: format!(
                "UPDATE {s} SET updated_at = NOW() WHERE run_id = ANY($1) AND {}",
                status_is("status", "running")
            ),
            cancelled_among: format!(
                "SELECT run_id FROM {s} WHERE run_id = ANY($1) AND {}",
                status_is("status", "cancelled")
            ),
            insert_context: format!("INSERT INTO {c} (run_id, context_data) VALUES ($1, $2)"),
            insert_status: format!("INSERT INTO {s} (run_id, status) VALUES ($1, $2)"),
            insert_context_if_absent: format!(
                "INSERT INTO {c} (run_id, context_data) VALUES ($1, $2) ON CONFLICT (run_id) DO NOTHING"
            ),
            insert_status_if_absent: format!(
                "INSERT INTO {s} (run_id, status) VALUES ($1, $2) ON CONFLICT (run_id) DO NOTHING"
            ),
            insert_entries: format!(
                "INSERT INTO {e} (run_id, key, value)
                 SELECT $1, x.key, x.value FROM jsonb_each($2::jsonb) x ORDER BY x.key
                 ON CONFLICT (run_id, key) DO NOTHING"
            ),
            register_webhook: format!(
                "INSERT INTO {w} (webhook_id, event_name, url) VALUES ($1, $2, $3)
                 ON CONFLICT (webhook_id) DO UPDATE SET event_name = EXCLUDED.event_name, url = EXCLUDED.url",
                w = tables.webhooks
            ),
            webhook: format!("SELECT event_name, url FROM {w} WHERE webhook_id = $1", w = tables.webhooks),
            awaiting_details: format!(
                "UPDATE {e} t SET value = jsonb_set(t.value, ARRAY[$2::text], $3::jsonb)
                 WHERE t.run_id = $1 AND t.key = '{AWAITING_DETAILS}' AND jsonb_typeof(t.value) = 'object'
                   AND EXISTS (SELECT 1 FROM {e} n WHERE n.run_id = $1 AND n.key = '{AWAITING_NODE_IDS}'
                               AND jsonb_typeof(n.value) = 'array' AND n.value @> jsonb_build_array($2::text))"
            ),
            resume: format!(
                "WITH ids AS (
                   -- Remove the resumed nodes from the awaited ones *as they are now*: a
                   -- branch that paused meanwhile stays awaited.
                   UPDATE {e} t SET value = NULLIF(COALESCE(
                       (SELECT jsonb_agg(x) FROM jsonb_array_elements(t.value) x
                        WHERE NOT $2::jsonb @> jsonb_build_array(x)), '[]'::jsonb), '[]'::jsonb)
                   WHERE t.run_id = $1 AND t.key = '{AWAITING_NODE_IDS}'
                     AND jsonb_typeof(t.value) = 'array' AND t.value @> $2::jsonb
                   RETURNING t.value),
                 details AS (
                   UPDATE {e} t SET value = NULLIF(t.value - ARRAY(SELECT jsonb_array_elements_text($2::jsonb)), '{{}}'::jsonb)
                   WHERE t.run_id = $1 AND t.key = '{AWAITING_DETAILS}' AND jsonb_typeof(t.value) = 'object'
                     AND EXISTS (SELECT 1 FROM ids)
                   RETURNING 1),
                 w AS (
                   INSERT INTO {e} AS t (run_id, key, value)
                   SELECT $1::text, w.key, w.value FROM (
                     SELECT x.key, x.value FROM jsonb_each($3::jsonb) x
                     UNION ALL SELECT d, NULL FROM unnest($4::text[]) d) w
                   WHERE EXISTS (SELECT 1 FROM ids) ORDER BY w.key
                   ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value
                   RETURNING 1),
                 first AS (
                   INSERT INTO {e} AS t (run_id, key, value)
                   SELECT $1::text, x.key, x.value FROM jsonb_each($5::jsonb) x
                   WHERE EXISTS (SELECT 1 FROM ids) ORDER BY x.key
                   ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value WHERE t.value IS NULL
                   RETURNING 1),
                 -- Header keys ($6 deleted, $7 set) go to the context row, as a commit's do.
                 header AS ({resume_header} AND EXISTS (SELECT 1 FROM ids) RETURNING 1),
                 s AS (
                   UPDATE {s} SET updated_at = NOW(), status = CASE
                       WHEN (SELECT COALESCE(jsonb_array_length(value), 0) FROM ids) > 0
                       THEN 'awaiting' ELSE 'running' END
                   WHERE run_id = $1 AND status IN ('awaiting', 'running') AND EXISTS (SELECT 1 FROM ids)
                   RETURNING 1)
                 SELECT (SELECT count(*) FROM ids)::int"
            ),
            ensure_context: format!(
                "INSERT INTO {c} (run_id, context_data) VALUES ($1, '{{}}'::jsonb) ON CONFLICT (run_id) DO NOTHING"
            ),
            lock_awaiting: format!(
                "SELECT 1 FROM {e} WHERE run_id = ANY($1::text[]) AND key = '{AWAITING_NODE_IDS}'
                 ORDER BY run_id FOR UPDATE"
            ),
            put_header: header_update(c, "", "$1", "$2::jsonb", "$3::jsonb"),
            put_entries: format!(
                "INSERT INTO {e} AS t (run_id, key, value)
                 SELECT $1::text, k, v FROM unnest($2::text[], $3::jsonb[]) AS x(k, v) ORDER BY k
                 ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value"
            ),
        };
        Ok(RunStore {
            pool,
            tables,
            sql,
            groups: Arc::new(Groups {
                load: Group::new(MAX_BATCH),
                commit: Group::new(MAX_BATCH),
            }),
        })
    }

    fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        Ok(self.pool.get()?.execute_prepared(sql, params)?)
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The table names.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// A run's whole context and status; `None` if it has no context row. Costs what the run
    /// holds: the per-job path reads only the keys it uses ([`load_keys`](Self::load_keys)).
    pub fn load(&self, run_id: &str) -> Result<Option<RunSnapshot>, StoreError> {
        let runs = [run_id];
        let row = self
            .pool
            .get()?
            .query_opt_prepared(&self.sql.load, &[&&runs[..]])?;
        let Some(row) = row else { return Ok(None) };
        let malformed = |reason: String| StoreError::Malformed {
            run_id: run_id.to_string(),
            reason,
        };
        let status = match row.try_get::<_, Option<String>>(2)? {
            Some(status) => {
                Some(RunStatus::parse(&status).ok_or_else(|| malformed(unknown_status(&status)))?)
            }
            None => None,
        };
        match row.try_get::<_, Value>(1)? {
            Value::Object(context) => Ok(Some(RunSnapshot { context, status })),
            _ => Err(malformed("context_data is not a JSON object".into())),
        }
    }

    /// Some keys of a run's context, and its status; `None` if it has no context row. The
    /// snapshot holds the keys that are present among `keys` (absent ones are left out).
    /// Concurrent calls share one query.
    pub fn load_keys(
        &self,
        run_id: &str,
        keys: Vec<String>,
    ) -> Result<Option<RunSnapshot>, StoreError> {
        let request = KeysRequest {
            run_id: run_id.to_string(),
            keys,
        };
        self.groups
            .load
            .submit(request, |_| None, |batch| self.load_keys_batch(batch))
    }

    /// [`load_keys`](RunStore::load_keys) for several runs at once, in one statement per 64,
    /// on this thread (not grouped with other threads' loads). A run whose load failed, or
    /// that does not exist, answers `None`.
    pub fn load_keys_of(&self, requests: Vec<(String, Vec<String>)>) -> Vec<Option<RunSnapshot>> {
        let requests: Vec<KeysRequest> = requests
            .into_iter()
            .map(|(run_id, keys)| KeysRequest { run_id, keys })
            .collect();
        let mut answers = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(MAX_BATCH) {
            match self.load_keys_batch(chunk) {
                Ok(found) => answers.extend(found.into_iter().map(|r| r.ok().flatten())),
                Err(_) => answers.extend(chunk.iter().map(|_| None)),
            }
        }
        answers
    }

    /// One query for a batch of key loads (a malformed row is an error of its run only).
    fn load_keys_batch(
        &self,
        batch: &[KeysRequest],
    ) -> Result<Vec<Result<Option<RunSnapshot>, StoreError>>, StoreError> {
        // Each run's keys, and where each is read if the run has no entry for it.
        let mut asked: BTreeMap<&str, BTreeMap<&str, i32>> = BTreeMap::new();
        for request in batch {
            let keys = asked.entry(request.run_id.as_str()).or_default();
            keys.extend(request.keys.iter().map(|k| (k.as_str(), key_source(k))));
        }
        let runs: Vec<&str> = asked.keys().copied().collect();
        let rows = self
            .pool
            .get()?
            .query_prepared(&self.sql.load_keys, &[&runs, &Json(&asked)])?;
        // Per run: its status, whether its row is well formed, the keys found.
        let mut found: HashMap<String, (Option<String>, bool, ContextMap)> = HashMap::new();
        for row in rows {
            let run_id: String = row.try_get(0)?;
            let entry = found
                .entry(run_id)
                .or_insert_with(|| (None, true, ContextMap::new()));
            entry.0 = row.try_get(1)?;
            entry.1 = row.try_get::<_, Option<bool>>(2)?.unwrap_or(false);
            if let (Some(key), Some(value)) = (
                row.try_get::<_, Option<String>>(3)?,
                row.try_get::<_, Option<Value>>(4)?,
            ) {
                entry.2.insert(key, value);
            }
        }
        let mut answers = Vec::with_capacity(batch.len());
        for (i, request) in batch.iter().enumerate() {
            // A run asked for twice gets a copy; its last request takes the values (a gather
            // may have asked for thousands).
            let asked_again = batch[i + 1..].iter().any(|r| r.run_id == request.run_id);
            let entry = if asked_again {
                found.get(&request.run_id).cloned()
            } else {
                found.remove(&request.run_id)
            };
            answers.push(entry.map_or(Ok(None), |(status, well_formed, mut values)| {
                let malformed = |reason: String| StoreError::Malformed {
                    run_id: request.run_id.clone(),
                    reason,
                };
                if !well_formed {
                    return Err(malformed("context_data is not a JSON object".into()));
                }
                let status = match status {
                    Some(s) => {
                        Some(RunStatus::parse(&s).ok_or_else(|| malformed(unknown_status(&s)))?)
                    }
                    None => None,
                };
                let context = request
                    .keys
                    .iter()
                    .filter_map(|k| values.remove_entry(k))
                    .collect();
                Ok(Some(RunSnapshot { context, status }))
            }));
        }
        Ok(answers)
    }

    /// Applies a node's effects if its guard holds; returns whether they were applied.
    /// Concurrent commits of different runs share one statement (one transaction).
    pub fn commit_node(
        &self,
        run_id: &str,
        commit: NodeCommit,
        guard: CommitGuard,
    ) -> Result<bool, StoreError> {
        self.groups
            .commit
            .submit(
                CommitRequest::new(run_id, commit, guard),
                |r| Some(r.run_id.as_str()),
                |batch| self.commit_batch(batch),
            )
            .map(|applied| applied.is_some())
    }

    /// Applies the commits of a batch its caller gathered itself, in as few statements (each
    /// one transaction) as their rows allow, outside the commit group: for each, whether it
    /// applied. Commits that write a row in common (two copies of a job, two inputs of one
    /// `any` join, two pauses of one run) go to different statements, in order; the others,
    /// of one run or not, share one — also those that only set or delete one key (the inputs
    /// of an `all` join), the last one's write kept, as if they ran one by one. If a
    /// statement fails because of a row, each of its commits runs again alone; if because of
    /// the connection, each gets the error.
    pub(crate) fn commit_nodes(
        &self,
        commits: Vec<(String, NodeCommit, CommitGuard)>,
    ) -> Vec<Result<Applied, StoreError>> {
        let requests: Vec<CommitRequest> = commits
            .into_iter()
            .map(|(run_id, commit, guard)| CommitRequest::new(&run_id, commit, guard))
            .collect();
        // Greedily: each commit joins the first statement where no other commit writes its
        // rows, but for keys that all of them set or delete. (The commits of a statement,
        // and the rows they write: `true` for a row only set or deleted.)
        type Members<'r> = (Vec<usize>, HashMap<RowKey<'r>, bool>);
        let mut statements: Vec<Members> = Vec::new();
        for (i, request) in requests.iter().enumerate() {
            let (own, shared) = request.rows();
            let fits = |taken: &HashMap<RowKey<'_>, bool>| {
                own.iter().all(|row| !taken.contains_key(row))
                    && shared
                        .iter()
                        .all(|row| taken.get(row).copied().unwrap_or(true))
            };
            let rows = own
                .iter()
                .map(|&row| (row, false))
                .chain(shared.iter().map(|&row| (row, true)));
            match statements.iter_mut().find(|(_, taken)| fits(taken)) {
                Some((members, taken)) => {
                    members.push(i);
                    taken.extend(rows);
                }
                None => statements.push((vec![i], rows.collect())),
            }
        }
        let mut results: Vec<Option<Result<Applied, StoreError>>> =
            requests.iter().map(|_| None).collect();
        for (members, _) in statements {
            let batch: Vec<&CommitRequest> = members.iter().map(|&i| &requests[i]).collect();
            let outcomes = run_batch(&batch, &|b: &[&CommitRequest]| self.commit_batch(b));
            for (i, outcome) in members.into_iter().zip(outcomes) {
                results[i] = Some(outcome);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Grouped("no result".into()))))
            .collect()
    }

    /// One statement for a batch of commits no two of which write a row in common, but keys
    /// they set or delete (see [`commit_nodes`](Self::commit_nodes)); for each,
    /// whether it applied.
    fn commit_batch<R: std::borrow::Borrow<CommitRequest>>(
        &self,
        batch: &[R],
    ) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
        // Sorted by run, so that concurrent batches lock rows in one order.
        let mut rows: Vec<&CommitRequest> = batch.iter().map(|r| r.borrow()).collect();
        rows.sort_by(|a, b| a.run_id.cmp(&b.run_id));
        let mut conn = self.pool.get()?;
        let inserted = if rows.iter().all(|r| r.inserts_guard()) {
            match self.insert_guarded(&mut conn, &rows) {
                Ok(returned) => Some(returned),
                // A row was there after all (most often, a copy of the execution committed
                // it): the statement wrote nothing, and the commits go the usual way.
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => None,
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        let returned = match inserted {
            Some(returned) => returned,
            None => self.commit_usual(&mut conn, &rows)?,
        };
        let mut applied: Vec<(&CommitRequest, Option<RunStatus>)> = Vec::with_capacity(rows.len());
        for row in returned {
            let ordinal: i64 = row.try_get(0)?;
            let Some(r) = usize::try_from(ordinal - 1).ok().and_then(|i| rows.get(i)) else {
                continue;
            };
            // (The statement is committed: an unknown status fails nothing now, and reads
            // as no status — the next load reports it.)
            let status: Option<String> = row.try_get(1)?;
            applied.push((r, status.as_deref().and_then(RunStatus::parse)));
        }
        Ok(batch
            .iter()
            .map(|r| {
                Ok(applied
                    .iter()
                    .find(|(a, _)| std::ptr::eq(*a, r.borrow()))
                    .map(|(_, status)| *status))
            })
            .collect())
    }

    /// The usual statement of a batch of commits (`commit`): each applies if its guard row
    /// could be written.
    fn commit_usual(
        &self,
        conn: &mut PgConnection,
        rows: &[&CommitRequest],
    ) -> Result<Vec<Row>, StoreError> {
        let sets: Vec<std::borrow::Cow<'_, Value>> = rows.iter().map(|r| r.all_sets()).collect();
        let sets: Vec<&Value> = sets.iter().map(|s| s.as_ref()).collect();
        let params: &[&(dyn ToSql + Sync)] = &[
            &column(rows, |r| r.run_id.as_str()),
            &column(rows, |r| &r.delete),
            &sets,
            &column(rows, |r| r.exec_key.as_str()),
            &column(rows, |r| r.iteration),
            &column(rows, |r| r.repeats),
            &column(rows, |r| r.awaiting_id.as_deref()),
            &column(rows, |r| &r.awaiting_details),
            &column(rows, |r| &r.set_if_absent),
            &column(rows, |r| r.guard_value.as_ref()),
            &column(rows, |r| &r.header_set),
            &column(rows, |r| &r.header_delete),
            &column(rows, CommitRequest::h_node),
            &column(rows, CommitRequest::attempt),
            &column(rows, CommitRequest::h_started),
            &column(rows, CommitRequest::h_finished),
            &column(rows, CommitRequest::h_worker),
            &column(rows, |r| r.guard_key.as_str()),
        ];
        // A pause decides from more than the row it locks (the node's output must be absent):
        // lock the runs' awaiting rows first, in a transaction, so that the commit statement
        // takes its snapshot after a concurrent resume of the node has committed.
        let pausing: Vec<&str> = rows
            .iter()
            .filter(|r| r.awaiting_id.is_some())
            .map(|r| r.run_id.as_str())
            .collect();
        if pausing.is_empty() {
            return Ok(conn.query_prepared(&self.sql.commit, params)?);
        }
        let commit = conn.statement(&self.sql.commit)?;
        let lock = conn.statement(&self.sql.lock_awaiting)?;
        let mut tx = conn.transaction()?;
        tx.execute(&lock, &[&pausing])?;
        let returned = tx.query(&commit, params)?;
        tx.commit()?;
        Ok(returned)
    }

    /// The statement of a batch of commits whose guard rows are inserted
    /// ([`CommitRequest::inserts_guard`]), which fails (and writes nothing) if a row to insert
    /// is there.
    fn insert_guarded(
        &self,
        conn: &mut PgConnection,
        rows: &[&CommitRequest],
    ) -> Result<Vec<Row>, postgres::Error> {
        let others = usize::from(rows.iter().any(|r| r.writes_others()));
        match rows {
            [lone] => conn.query_prepared(
                &self.sql.commit_insert_lone[others],
                &[
                    &lone.run_id,
                    &lone.guard_key,
                    &lone.guard_value,
                    &lone.inserts,
                    &lone.set,
                    &lone.delete,
                    &lone.iteration,
                    &lone.h_node(),
                    &lone.attempt(),
                    &lone.h_started(),
                    &lone.h_finished(),
                    &lone.h_worker(),
                ],
            ),
            _ => conn.query_prepared(
                &self.sql.commit_insert[others],
                &[
                    &column(rows, |r| r.run_id.as_str()),
                    &column(rows, |r| r.guard_key.as_str()),
                    &column(rows, |r| r.guard_value.as_ref()),
                    &column(rows, |r| &r.inserts),
                    &column(rows, |r| &r.set),
                    &column(rows, |r| &r.delete),
                    &column(rows, |r| r.iteration),
                    &column(rows, CommitRequest::h_node),
                    &column(rows, CommitRequest::attempt),
                    &column(rows, CommitRequest::h_started),
                    &column(rows, CommitRequest::h_finished),
                    &column(rows, CommitRequest::h_worker),
                ],
            ),
        }
    }

    /// Marks a running run `completed` with its final context, unless it awaits a node.
    /// Returns the final context when this call completed the run.
    pub fn complete_run(&self, run_id: &str) -> Result<Option<ContextMap>, StoreError> {
        let mut completed = self.complete_runs(&[run_id.to_string()]);
        completed.pop().unwrap_or(Ok(None))
    }

    /// [`complete_run`](Self::complete_run) for several runs in one statement: for each, its
    /// final context if this call completed it (a run named twice is completed once). If the
    /// statement fails, the failure rules of grouped calls apply.
    pub(crate) fn complete_runs(
        &self,
        runs: &[String],
    ) -> Vec<Result<Option<ContextMap>, StoreError>> {
        run_batch(runs, &|batch| self.complete_batch(batch))
    }

    fn complete_batch(
        &self,
        runs: &[String],
    ) -> Result<Vec<Result<Option<ContextMap>, StoreError>>, StoreError> {
        let rows = self
            .pool
            .get()?
            .query_prepared(&self.sql.complete, &[&runs])?;
        let mut completed: HashMap<String, Result<ContextMap, StoreError>> = HashMap::new();
        for row in rows {
            let run_id: String = row.try_get(0)?;
            let context = match row.try_get::<_, Value>(1)? {
                Value::Object(context) => Ok(context),
                _ => Err(StoreError::Malformed {
                    run_id: run_id.clone(),
                    reason: "context_data is not a JSON object".into(),
                }),
            };
            completed.insert(run_id, context);
        }
        Ok(runs
            .iter()
            .map(|run| completed.remove(run).transpose())
            .collect())
    }

    /// Marks a running or awaiting run `failed` with a reason (creating the status row if
    /// missing).
    pub fn fail_run(&self, run_id: &str, reason: &str) -> Result<bool, StoreError> {
        Ok(self.execute(&self.sql.fail, &[&run_id, &reason])? > 0)
    }

    /// Moves a run to `status` if its current status is one of `from`; returns whether it moved.
    pub fn set_status(
        &self,
        run_id: &str,
        status: RunStatus,
        result: Option<&Value>,
        from: &[RunStatus],
    ) -> Result<bool, StoreError> {
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let status = status.as_str();
        Ok(self.execute(&self.sql.set_status, &[&run_id, &status, &result, &from])? > 0)
    }

    /// Cancels a running or awaiting run (status `cancelled`, result
    /// `{"status": "cancelled"}`); returns whether it was running or awaiting.
    pub fn cancel_run(&self, run_id: &str) -> Result<bool, StoreError> {
        let result = serde_json::json!({"status": "cancelled"});
        self.set_status(
            run_id,
            RunStatus::Cancelled,
            Some(&result),
            &[RunStatus::Running, RunStatus::Awaiting],
        )
    }

    /// A run's status row.
    pub fn status(&self, run_id: &str) -> Result<Option<StatusRow>, StoreError> {
        let row = self
            .pool
            .get()?
            .query_opt_prepared(&self.sql.status, &[&run_id])?;
        let Some(row) = row else { return Ok(None) };
        let status: String = row.try_get(0)?;
        let status = RunStatus::parse(&status).ok_or_else(|| StoreError::Malformed {
            run_id: run_id.to_string(),
            reason: unknown_status(&status),
        })?;
        Ok(Some(StatusRow {
            run_id: run_id.to_string(),
            status,
            updated_at: row.try_get(1)?,
            result: row.try_get(2)?,
        }))
    }

    /// Runs whose status is `running` and that have not moved for `idle`, oldest first.
    pub fn stalled_runs(&self, idle: Duration, limit: i64) -> Result<Vec<String>, StoreError> {
        self.runs_by_span(&self.sql.stalled, idle, limit)
    }

    /// Up to `limit` runs cancelled or failed within the last `within` (by their status
    /// row's `updated_at`).
    pub fn stopped_runs(&self, within: Duration, limit: i64) -> Result<Vec<String>, StoreError> {
        self.runs_by_span(&self.sql.stopped, within, limit)
    }

    /// The run ids a statement selects for a span of time ($1, in seconds) and a limit ($2).
    fn runs_by_span(
        &self,
        sql: &str,
        span: Duration,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let secs = span.as_secs_f64();
        let rows = self.pool.get()?.query_prepared(sql, &[&secs, &limit])?;
        run_ids(&rows)
    }

    /// A page of up to `limit` runs `awaiting` for longer than `overdue`, oldest first after
    /// `after` (a cursor from an earlier page), each with its paused nodes whose wake-up is
    /// overdue at `now_ms`: a `sleep` past its `wakeUpAtMs` by `overdue`, or a `subflow`
    /// whose child run finished more than `overdue` ago or does not exist.
    pub fn awaiting_page(
        &self,
        overdue: Duration,
        now_ms: u64,
        after: Option<&AwaitingCursor>,
        limit: i64,
    ) -> Result<Vec<AwaitingRun>, StoreError> {
        let secs = overdue.as_secs_f64();
        let now = now_ms as f64;
        let (after_time, after_run) = after
            .map(|c| (c.updated_at.as_str(), c.run_id.as_str()))
            .unwrap_or(("-infinity", ""));
        let rows = self.pool.get()?.query_prepared(
            &self.sql.awaiting_page,
            &[&secs, &limit, &now, &after_time, &after_run],
        )?;
        rows.iter()
            .map(|row| {
                let lost: Value = row.try_get(3)?;
                let lost_wake_ups = lost
                    .as_array()
                    .map(|nodes| {
                        nodes
                            .iter()
                            .filter_map(|n| {
                                let node = n.get(0)?.as_str()?.to_string();
                                let iteration = n.get(1).and_then(Value::as_u64).unwrap_or(0);
                                Some((node, u32::try_from(iteration).ok()?))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(AwaitingRun {
                    cursor: AwaitingCursor {
                        run_id: row.try_get(0)?,
                        updated_at: row.try_get(1)?,
                    },
                    blueprint_id: row.try_get(2)?,
                    lost_wake_ups,
                })
            })
            .collect()
    }

    /// Whether PostgreSQL answers (`SELECT 1` on a pooled connection).
    pub fn ping(&self) -> Result<(), StoreError> {
        self.pool.get()?.simple_query("SELECT 1")?;
        Ok(())
    }

    /// Moves a run's `updated_at` to now.
    pub fn touch(&self, run_id: &str) -> Result<(), StoreError> {
        self.execute(&self.sql.touch, &[&run_id]).map(drop)
    }

    /// Makes a running run look stalled since long ago, so the next reconciler pass resumes
    /// it (a run whose start jobs may not have been queued).
    pub fn mark_stalled(&self, run_id: &str) -> Result<(), StoreError> {
        self.execute(&self.sql.mark_stalled, &[&run_id]).map(drop)
    }

    /// Resumes awaited nodes: applies `commit` (their outputs, `_resume.*`, their context
    /// writes and their successors' inputs, header keys going to the run's context row as a
    /// commit's do; its `awaiting` is ignored) and removes them from the awaiting keys —
    /// only while every node of `nodes` is still awaited — and moves the status back to
    /// `running` (or keeps `awaiting` if other nodes still wait). Returns whether it
    /// applied: resuming twice applies once.
    pub fn resume_nodes(
        &self,
        run_id: &str,
        nodes: &[String],
        commit: NodeCommit,
    ) -> Result<bool, StoreError> {
        let nodes = Value::from(nodes.to_vec());
        let mut commit = commit;
        let (header_set, header_delete) = commit.take_header_keys();
        let NodeCommit {
            set,
            set_if_absent,
            delete,
            ..
        } = commit;
        let (set, set_if_absent) = (Value::Object(set), Value::Object(set_if_absent));
        let row = self.pool.get()?.query_one_prepared(
            &self.sql.resume,
            &[
                &run_id,
                &nodes,
                &set,
                &delete,
                &set_if_absent,
                &header_delete,
                &header_set,
            ],
        )?;
        let applied: i32 = row.try_get(0)?;
        Ok(applied > 0)
    }

    /// Moves `updated_at` of several running runs to now (the worker's heartbeat for runs
    /// whose nodes are executing, so a long node is not mistaken for a stalled run).
    pub fn touch_many(&self, run_ids: &[String]) -> Result<(), StoreError> {
        if !run_ids.is_empty() {
            self.execute(&self.sql.touch_many, &[&run_ids])?;
        }
        Ok(())
    }

    /// Which of these runs are cancelled.
    pub fn cancelled_among(&self, runs: &[String]) -> Result<Vec<String>, StoreError> {
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .pool
            .get()?
            .query_prepared(&self.sql.cancelled_among, &[&runs])?;
        run_ids(&rows)
    }

    /// Inserts a new run's context row and `running` status row in one transaction.
    pub fn create_run(&self, run_id: &str, context: &ContextMap) -> Result<(), StoreError> {
        self.insert_run(
            run_id,
            context,
            &self.sql.insert_context,
            &self.sql.insert_status,
        )
        .map(drop)
    }

    /// Like [`create_run`](RunStore::create_run), doing nothing if the run exists (a child
    /// run started again after a redelivery, a start retried with its run id); returns
    /// whether it created the run.
    pub fn create_run_if_absent(
        &self,
        run_id: &str,
        context: &ContextMap,
    ) -> Result<bool, StoreError> {
        self.insert_run(
            run_id,
            context,
            &self.sql.insert_context_if_absent,
            &self.sql.insert_status_if_absent,
        )
    }

    /// Replaces an awaited node's `_awaitingDetails` entry; returns whether the node is still
    /// awaited.
    pub fn update_awaiting_details(
        &self,
        run_id: &str,
        node_id: &str,
        details: &Value,
    ) -> Result<bool, StoreError> {
        Ok(self.execute(&self.sql.awaiting_details, &[&run_id, &node_id, details])? > 0)
    }

    /// Writes keys of a run's context outside any node (`None` deletes the key), creating
    /// the run's context row if it has none; one transaction, and a later write of a key in
    /// `writes` wins.
    pub fn write_keys(
        &self,
        run_id: &str,
        writes: Vec<(String, Option<Value>)>,
    ) -> Result<(), StoreError> {
        let mut latest: HashMap<String, Option<Value>> = HashMap::with_capacity(writes.len());
        for (key, value) in writes {
            latest.insert(key, value);
        }
        let mut commit = NodeCommit::default();
        for (key, value) in latest {
            match value {
                Some(value) => drop(commit.set.insert(key, value)),
                None => commit.delete.push(key),
            }
        }
        // Header keys live in the context row, the others among the entries.
        let (header_set, header_delete) = commit.take_header_keys();
        let (keys, values): (Vec<String>, Vec<Option<Value>>) = commit
            .set
            .into_iter()
            .map(|(k, v)| (k, Some(v)))
            .chain(commit.delete.into_iter().map(|k| (k, None)))
            .unzip();
        let mut conn = self.pool.get()?;
        let ensure = conn.statement(&self.sql.ensure_context)?;
        let put = conn.statement(&self.sql.put_entries)?;
        let header = conn.statement(&self.sql.put_header)?;
        let mut tx = conn.transaction()?;
        tx.execute(&ensure, &[&run_id])?;
        tx.execute(&put, &[&run_id, &keys, &values])?;
        tx.execute(&header, &[&run_id, &header_delete, &header_set])?;
        tx.commit()?;
        Ok(())
    }

    /// Stores a webhook endpoint: `webhook_id` = `<run>:<node>`.
    pub fn register_webhook(
        &self,
        webhook_id: &str,
        event_name: &str,
        url: &str,
    ) -> Result<(), StoreError> {
        self.execute(
            &self.sql.register_webhook,
            &[&webhook_id, &event_name, &url],
        )?;
        Ok(())
    }

    /// A webhook endpoint's `(event_name, url)`.
    pub fn webhook(&self, webhook_id: &str) -> Result<Option<(String, String)>, StoreError> {
        let row = self
            .pool
            .get()?
            .query_opt_prepared(&self.sql.webhook, &[&webhook_id])?;
        match row {
            Some(row) => Ok(Some((row.try_get(0)?, row.try_get(1)?))),
            None => Ok(None),
        }
    }

    fn insert_run(
        &self,
        run_id: &str,
        context: &ContextMap,
        context_sql: &str,
        status_sql: &str,
    ) -> Result<bool, StoreError> {
        // Keys only a run writes (a child's input, say) are entries from the start.
        let (records, starting): (ContextMap, ContextMap) = context
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(k, _)| is_run_record(k));
        let mut conn = self.pool.get()?;
        let insert_context = conn.statement(context_sql)?;
        let insert_status = conn.statement(status_sql)?;
        let mut tx = conn.transaction()?;
        let inserted = tx.execute(&insert_context, &[&run_id, &Value::Object(starting)])? > 0;
        if inserted && !records.is_empty() {
            tx.execute(
                &self.sql.insert_entries,
                &[&run_id, &Value::Object(records)],
            )?;
        }
        tx.execute(&insert_status, &[&run_id, &RunStatus::Running.as_str()])?;
        tx.commit()?;
        Ok(inserted)
    }
}

/// The keys of one run that a job fetches when it reads them ([`KeyLoader`]).
pub struct RunKeys {
    store: RunStore,
    run_id: String,
}

impl RunKeys {
    /// The keys of `run_id` in `store`.
    pub fn new(store: RunStore, run_id: impl Into<String>) -> RunKeys {
        RunKeys {
            store,
            run_id: run_id.into(),
        }
    }
}

impl KeyLoader for RunKeys {
    fn load(&self, keys: &[String]) -> Result<Vec<Option<Value>>, String> {
        let snapshot = self
            .store
            .load_keys(&self.run_id, keys.to_vec())
            .map_err(|e| e.to_string())?;
        let mut context = snapshot.map(|s| s.context).unwrap_or_default();
        Ok(keys.iter().map(|k| context.remove(k)).collect())
    }

    fn load_all(&self) -> Result<ContextMap, String> {
        let snapshot = self.store.load(&self.run_id).map_err(|e| e.to_string())?;
        Ok(snapshot.map(|s| s.context).unwrap_or_default())
    }
}

/// The first column of each row, a run id.
fn run_ids(rows: &[postgres::Row]) -> Result<Vec<String>, StoreError> {
    rows.iter()
        .map(|r| r.try_get(0).map_err(StoreError::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_validated() {
        for ok in ["flowcraft_contexts", "_t1", "app.flowcraft_statuses"] {
            assert!(validate_identifier(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "a-b",
            "x; DROP TABLE y",
            "a.b.c",
            "t\"",
            &"a".repeat(64),
            "a..b",
        ] {
            assert!(validate_identifier(bad).is_err(), "{bad}");
        }
        assert!(Tables::new("ok", "fine", "bad name").is_err());
    }
}
