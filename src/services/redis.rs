//! Redis coordination: fan-in joins, locks, poison/cancel pills and the run's job ledger.
//!
//! [`RedisCoordinationStore`] offers the primitive operations (`increment`,
//! `set_if_not_exist`, `extend_ttl`, `delete`, `get`, and the idempotent [`join_report`](RedisCoordinationStore::join_report)),
//! and the one call the worker makes per job, [`finish_job`](RedisCoordinationStore::finish_job):
//! a Lua script that, in one round trip, reports the job's successors to their joins,
//! registers the ones that became ready, marks the job done and says whether the run has
//! any outstanding work left.
//!
//! The job ledger is two sets per run: `run:<run>:jobs` (every job ever made ready) and
//! `run:<run>:done` (every job finished). Both only grow and every write is idempotent, so a
//! redelivered job changes nothing; the run has no outstanding work exactly when the two
//! sets have the same size.

use std::time::Duration;

use std::sync::Arc;

use redis::{ErrorKind, Script, ScriptInvocation, ServerErrorKind};

use crate::services::group::{run_batch, Group, GroupError};
use crate::services::url::mask_url;

/// A pool of Redis connections.
pub type RedisPool = r2d2::Pool<redis::Client>;

/// Default prefix of every key.
pub const DEFAULT_PREFIX: &str = "flowcraft:";
/// Default lifetime of coordination keys (refreshed whenever a job of the run finishes): a
/// run may stay paused this long and still join correctly when resumed.
pub const DEFAULT_KEY_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Errors of the Redis layer.
#[derive(Debug, thiserror::Error)]
pub enum CoordinationError {
    /// The URL does not parse, or the pool could not open its connections.
    #[error("cannot connect to Redis at {url}: {reason}")]
    Connect {
        /// The URL, with its password masked.
        url: String,
        /// Why connecting failed.
        reason: String,
    },
    /// No pooled connection could be had (e.g. none within the 10 s timeout).
    #[error("Redis pool: {0}")]
    Pool(#[from] r2d2::Error),
    /// A command or script failed, or the connection broke.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The pipeline that carried this request failed as a whole (its connection, or the
    /// thread that ran it); the request may be retried.
    #[error("pipelined Redis call: {0}")]
    Grouped(String),
}

impl GroupError for CoordinationError {
    /// No connection, or a broken one: no call of the pipeline would fare better alone.
    fn fails_every_request(&self) -> bool {
        match self {
            CoordinationError::Pool(_) => true,
            CoordinationError::Redis(e) => e.is_io_error() || e.is_connection_dropped(),
            _ => false,
        }
    }

    fn for_caller(reason: String) -> Self {
        CoordinationError::Grouped(reason)
    }
}

/// Opens a pool (`test_on_check_out` off, as for PostgreSQL).
pub fn connect_pool(url: &str, max_size: u32) -> Result<RedisPool, CoordinationError> {
    let fail = |reason: String| CoordinationError::Connect {
        url: mask_url(url),
        reason,
    };
    let client = redis::Client::open(url).map_err(|e| fail(e.to_string()))?;
    r2d2::Pool::builder()
        .max_size(max_size.max(1))
        .min_idle(Some(0))
        .test_on_check_out(false)
        .connection_timeout(Duration::from_secs(10))
        .build(client)
        .map_err(|e| fail(e.to_string()))
}

/// How a successor of a finished job becomes ready: the engine's
/// [`Readiness`](crate::engine::flow::Readiness) (`All` counts `fanin:<run>:<node>`, `Any` takes
/// `joinlock:<run>:<node>`).
pub use crate::engine::flow::Readiness as JoinRule;

impl JoinRule {
    /// The rule as the join script takes it: 0 immediate, -1 any, n all of n.
    pub fn code(&self) -> i64 {
        match self {
            JoinRule::Immediate => 0,
            JoinRule::Any => -1,
            JoinRule::All(n) => *n as i64,
        }
    }

    /// The rule of a code (see [`code`](JoinRule::code)).
    pub fn from_code(code: i64) -> JoinRule {
        match code {
            0 => JoinRule::Immediate,
            n if n < 0 => JoinRule::Any,
            n => JoinRule::All(n as usize),
        }
    }
}

/// A successor reported by a finished job.
#[derive(Debug, Clone)]
pub struct SuccessorReport {
    /// The successor's job id (`node` or `node@iteration`).
    pub job: String,
    /// The successor's node id and iteration (for the join keys).
    pub node: String,
    /// The successor's loop iteration (0 for nodes that never repeat).
    pub iteration: u32,
    /// Who reports (the edge's source, or a batch worker).
    pub predecessor: String,
    /// How the successor becomes ready: at once, first report wins, or all n reported.
    pub rule: JoinRule,
}

/// What [`RedisCoordinationStore::finish_job`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishOutcome {
    /// Per reported successor: whether this job makes it ready (and must publish it).
    pub ready: Vec<bool>,
    /// Whether the run has no outstanding job left.
    pub run_idle: bool,
    /// Whether the run's ledger goes back to its start jobs. It does not after Redis lost
    /// its state (or the ledger expired): then `run_idle` only covers the jobs registered
    /// since, and the run's context must confirm that nothing is left.
    pub ledger_intact: bool,
}

/// A member of both ledger sets, added with a run's start jobs: its presence tells that the
/// ledger goes back to the run's start. (No job id starts with a NUL byte.)
const LEDGER_ORIGIN: &str = "\0origin";

const FINISH_JOB: &str = r#"
local ttl = tonumber(ARGV[1])
local me = ARGV[2]
redis.call('SADD', KEYS[1], me)
local i = 3
local extra = tonumber(ARGV[i]); i = i + 1
for _ = 1, extra do redis.call('SADD', KEYS[1], ARGV[i]); i = i + 1 end
local origin = "\0origin"
if extra > 0 then
  redis.call('SADD', KEYS[1], origin)
  redis.call('SADD', KEYS[2], origin)
end
local out = {}
local k = 3
while i <= #ARGV do
  local job, pred, mode = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]); i = i + 3
  local set_key, lock_key = KEYS[k], KEYS[k + 1]; k = k + 2
  local fire = 0
  if mode == 0 then
    fire = 1
  else
    local ready = true
    if mode > 0 then
      redis.call('SADD', set_key, pred)
      redis.call('EXPIRE', set_key, ttl)
      ready = redis.call('SCARD', set_key) >= mode
    end
    if ready then
      local owner = redis.call('GET', lock_key)
      if not owner then
        redis.call('SET', lock_key, pred, 'EX', ttl)
        fire = 1
      elseif owner == pred then
        fire = 1
      end
    end
  end
  if fire == 1 then redis.call('SADD', KEYS[1], job) end
  out[#out + 1] = fire
end
redis.call('SADD', KEYS[2], me)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
if redis.call('SCARD', KEYS[1]) == redis.call('SCARD', KEYS[2]) then out[#out + 1] = 1 else out[#out + 1] = 0 end
out[#out + 1] = redis.call('SISMEMBER', KEYS[1], origin)
return out
"#;

/// Redis coordination for one key prefix.
#[derive(Clone)]
pub struct RedisCoordinationStore {
    pool: RedisPool,
    prefix: String,
    ttl: Duration,
    finish: Arc<Script>,
    /// Concurrent `finish_job` calls share one pipelined round trip ([`crate::services::group`]).
    finishing: Arc<Group<FinishRequest, FinishOutcome, CoordinationError>>,
}

/// One [`RedisCoordinationStore::finish_job`] call, queued for a pipelined batch.
struct FinishRequest {
    run: String,
    job: String,
    also_register: Vec<String>,
    successors: Vec<SuccessorReport>,
    /// The lifetime of the keys it touches (each request carries its store's own).
    ttl: Duration,
}

/// Most `finish_job` calls one pipeline carries.
const MAX_PIPELINE: usize = 64;

impl RedisCoordinationStore {
    /// A store over a pool, with a key prefix (default `flowcraft:`).
    pub fn new(pool: RedisPool, prefix: impl Into<String>) -> RedisCoordinationStore {
        RedisCoordinationStore {
            pool,
            prefix: prefix.into(),
            ttl: DEFAULT_KEY_TTL,
            finish: Arc::new(Script::new(FINISH_JOB)),
            finishing: Arc::new(Group::new(MAX_PIPELINE)),
        }
    }

    /// Sets the lifetime of coordination keys.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A prefixed key.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<redis::Client>, CoordinationError> {
        Ok(self.pool.get()?)
    }

    fn secs(ttl: Duration) -> u64 {
        ttl.as_secs().max(1)
    }

    /// INCR with a TTL; returns the new value.
    pub fn increment(&self, key: &str, ttl: Duration) -> Result<i64, CoordinationError> {
        let (n,): (i64,) = redis::pipe()
            .incr(key, 1)
            .expire(key, Self::secs(ttl) as i64)
            .ignore()
            .query(&mut *self.conn()?)?;
        Ok(n)
    }

    /// SET NX with a TTL; returns whether the key was set.
    pub fn set_if_not_exist(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, CoordinationError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("NX")
            .arg("EX")
            .arg(Self::secs(ttl))
            .query(&mut *self.conn()?)?;
        Ok(set.is_some())
    }

    /// Extends a key's TTL; returns whether the key exists.
    pub fn extend_ttl(&self, key: &str, ttl: Duration) -> Result<bool, CoordinationError> {
        let n: i64 = redis::cmd("EXPIRE")
            .arg(key)
            .arg(Self::secs(ttl))
            .query(&mut *self.conn()?)?;
        Ok(n == 1)
    }

    /// Deletes keys.
    pub fn delete(&self, keys: &[String]) -> Result<(), CoordinationError> {
        if keys.is_empty() {
            return Ok(());
        }
        redis::cmd("DEL")
            .arg(keys)
            .query::<()>(&mut *self.conn()?)?;
        Ok(())
    }

    /// Whether Redis answers (`PING`).
    pub fn ping(&self) -> Result<(), CoordinationError> {
        let _: String = redis::cmd("PING").query(&mut *self.conn()?)?;
        Ok(())
    }

    /// GET.
    pub fn get(&self, key: &str) -> Result<Option<String>, CoordinationError> {
        Ok(redis::cmd("GET").arg(key).query(&mut *self.conn()?)?)
    }

    /// Idempotent join report: SADD + SCARD + EXPIRE in one round trip; returns how many
    /// distinct members the set has. Reporting the same member twice counts once.
    pub fn join_report(
        &self,
        key: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<usize, CoordinationError> {
        let (count,): (usize,) = redis::pipe()
            .sadd(key, member)
            .ignore()
            .scard(key)
            .expire(key, Self::secs(ttl) as i64)
            .ignore()
            .query(&mut *self.conn()?)?;
        Ok(count)
    }

    /// Key of an `all` join's reported set.
    pub fn fanin_key(&self, run: &str, node: &str, iteration: u32) -> String {
        with_iteration(self.key(&format!("fanin:{run}:{node}")), iteration)
    }

    /// Key of a join's firing lock.
    pub fn joinlock_key(&self, run: &str, node: &str, iteration: u32) -> String {
        with_iteration(self.key(&format!("joinlock:{run}:{node}")), iteration)
    }

    /// Key of a node's poison pill (an `all` predecessor failed).
    pub fn poison_key(&self, run: &str, node: &str) -> String {
        self.key(&format!("fanin:poison:{run}:{node}"))
    }

    /// Key of a node's cancel pill (an `any` predecessor failed).
    pub fn cancel_key(&self, run: &str, node: &str) -> String {
        self.key(&format!("fanin:cancel:{run}:{node}"))
    }

    /// Key of the short lock the reconciler takes before enqueueing a node.
    pub fn nodelock_key(&self, run: &str, node: &str) -> String {
        self.key(&format!("nodelock:{run}:{node}"))
    }

    fn jobs_key(&self, run: &str) -> String {
        self.key(&format!("run:{run}:jobs"))
    }

    fn done_key(&self, run: &str) -> String {
        self.key(&format!("run:{run}:done"))
    }

    /// Registers jobs as outstanding before they are published by anyone but a finishing job
    /// (the reconciler, resume).
    pub fn register_jobs(&self, run: &str, jobs: &[String]) -> Result<(), CoordinationError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let key = self.jobs_key(run);
        redis::pipe()
            .sadd(&key, jobs)
            .ignore()
            .expire(&key, Self::secs(self.ttl) as i64)
            .ignore()
            .query::<()>(&mut *self.conn()?)?;
        Ok(())
    }

    /// Registers a run's start jobs (and any others) in its ledger, marking the ledger as
    /// going back to the run's start (see [`FinishOutcome::ledger_intact`]).
    pub fn register_start_jobs(&self, run: &str, jobs: &[String]) -> Result<(), CoordinationError> {
        let (jobs_key, done_key) = (self.jobs_key(run), self.done_key(run));
        let ttl = Self::secs(self.ttl) as i64;
        redis::pipe()
            .atomic()
            .sadd(&jobs_key, jobs)
            .ignore()
            .sadd(&jobs_key, LEDGER_ORIGIN)
            .ignore()
            .sadd(&done_key, LEDGER_ORIGIN)
            .ignore()
            .expire(&jobs_key, ttl)
            .ignore()
            .expire(&done_key, ttl)
            .ignore()
            .query::<()>(&mut *self.conn()?)?;
        Ok(())
    }

    /// Whether a node carries a poison or cancel pill.
    pub fn is_poisoned(&self, run: &str, node: &str) -> Result<bool, CoordinationError> {
        let n: i64 = redis::cmd("EXISTS")
            .arg(self.poison_key(run, node))
            .arg(self.cancel_key(run, node))
            .query(&mut *self.conn()?)?;
        Ok(n > 0)
    }

    /// Marks nodes with poison (for `all` joins) or cancel (for `any` joins) pills.
    pub fn poison(
        &self,
        run: &str,
        poisoned: &[String],
        cancelled: &[String],
    ) -> Result<(), CoordinationError> {
        if poisoned.is_empty() && cancelled.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for n in poisoned {
            pipe.cmd("SET")
                .arg(self.poison_key(run, n))
                .arg("1")
                .arg("EX")
                .arg(Self::secs(self.ttl))
                .ignore();
        }
        for n in cancelled {
            pipe.cmd("SET")
                .arg(self.cancel_key(run, n))
                .arg("1")
                .arg("EX")
                .arg(Self::secs(self.ttl))
                .ignore();
        }
        pipe.query::<()>(&mut *self.conn()?)?;
        Ok(())
    }

    /// The per-job call, one round trip: registers `also_register` (the run's start jobs,
    /// when a start job finishes) and `job`, reports each successor to its join, registers the
    /// ones that became ready, marks `job` done, and tells whether the run is idle.
    /// Concurrent calls share one pipelined round trip.
    pub fn finish_job(
        &self,
        run: &str,
        job: &str,
        also_register: &[String],
        successors: &[SuccessorReport],
    ) -> Result<FinishOutcome, CoordinationError> {
        let request = FinishRequest {
            run: run.to_string(),
            job: job.to_string(),
            also_register: also_register.to_vec(),
            successors: successors.to_vec(),
            ttl: self.ttl,
        };
        self.finishing
            .submit(request, |_| None, |batch| self.finish_batch(batch))
    }

    /// [`finish_job`](Self::finish_job) for a batch its caller gathered itself: one
    /// pipelined round trip, outside the group. Each call is `(run, job, also_register,
    /// successors)`; one result per call, with the failure rules of grouped calls.
    pub(crate) fn finish_jobs(
        &self,
        calls: Vec<(String, String, Vec<String>, Vec<SuccessorReport>)>,
    ) -> Vec<Result<FinishOutcome, CoordinationError>> {
        let requests: Vec<FinishRequest> = calls
            .into_iter()
            .map(|(run, job, also_register, successors)| FinishRequest {
                run,
                job,
                also_register,
                successors,
                ttl: self.ttl,
            })
            .collect();
        run_batch(&requests, &|batch| self.finish_batch(batch))
    }

    /// One round trip for a batch of `finish_job` calls: the script itself for one, a
    /// pipeline of script calls for several.
    fn finish_batch(
        &self,
        batch: &[FinishRequest],
    ) -> Result<Vec<Result<FinishOutcome, CoordinationError>>, CoordinationError> {
        let invocations: Vec<ScriptInvocation<'_>> =
            batch.iter().map(|r| self.finish_invocation(r)).collect();
        let mut conn = self.conn()?;
        let all: Vec<Vec<i64>> = if let [invocation] = invocations.as_slice() {
            vec![invocation.invoke(&mut *conn)?]
        } else {
            let mut pipe = redis::pipe();
            for invocation in &invocations {
                pipe.invoke_script(invocation);
            }
            match pipe.query(&mut *conn) {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    // A pipeline does not load scripts by itself (first use, or Redis
                    // restarted): load it, then send the pipeline again.
                    self.finish.load(&mut *conn)?;
                    pipe.query(&mut *conn)?
                }
                other => other?,
            }
        };
        Ok(batch
            .iter()
            .zip(all)
            .map(|(r, flags)| Ok(Self::finish_outcome(r, &flags)))
            .collect())
    }

    fn finish_invocation(&self, r: &FinishRequest) -> ScriptInvocation<'_> {
        let mut invocation = self.finish.prepare_invoke();
        invocation
            .key(self.jobs_key(&r.run))
            .key(self.done_key(&r.run));
        invocation
            .arg(Self::secs(r.ttl))
            .arg(&r.job)
            .arg(r.also_register.len());
        for extra in &r.also_register {
            invocation.arg(extra);
        }
        for s in &r.successors {
            invocation
                .key(self.fanin_key(&r.run, &s.node, s.iteration))
                .key(self.joinlock_key(&r.run, &s.node, s.iteration));
            invocation
                .arg(&s.job)
                .arg(&s.predecessor)
                .arg(s.rule.code());
        }
        invocation
    }

    fn finish_outcome(r: &FinishRequest, flags: &[i64]) -> FinishOutcome {
        FinishOutcome {
            ready: flags
                .iter()
                .take(r.successors.len())
                .map(|&f| f == 1)
                .collect(),
            run_idle: flags.get(r.successors.len()).copied() == Some(1),
            ledger_intact: flags.get(r.successors.len() + 1).copied() == Some(1),
        }
    }

    /// Jobs of a run made ready but not finished (`jobs` minus `done`), and whether the
    /// run has a ledger at all.
    pub fn outstanding_jobs(&self, run: &str) -> Result<(Vec<String>, bool), CoordinationError> {
        let (outstanding, registered): (Vec<String>, i64) = redis::pipe()
            .cmd("SDIFF")
            .arg(self.jobs_key(run))
            .arg(self.done_key(run))
            .cmd("SCARD")
            .arg(self.jobs_key(run))
            .query(&mut *self.conn()?)?;
        let outstanding = outstanding
            .into_iter()
            .filter(|j| j != LEDGER_ORIGIN)
            .collect();
        Ok((outstanding, registered > 0))
    }
}

fn with_iteration(key: String, iteration: u32) -> String {
    if iteration == 0 {
        key
    } else {
        format!("{key}:{iteration}")
    }
}
