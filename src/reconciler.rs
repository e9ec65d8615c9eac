//! The reconciler: finds `running` runs that have not moved for a while and enqueues their
//! frontier, so a lost message never loses a run; and wakes `awaiting` runs whose wake-up
//! was lost.
//!
//! For each stalled run it computes the frontier from the stored context (start nodes
//! without output; nodes whose predecessors' taken edges satisfy their join), skips nodes
//! carrying a poison or cancel pill, takes a short per-node lock (so two reconcilers do not
//! both enqueue), registers the jobs in the run's ledger and publishes them. A run with an
//! empty frontier and no awaited node is complete, and is marked so.
//!
//! An awaiting run waits for a message too: a sleep's timer, or the notice of a finished
//! child run. For each awaiting run idle past the threshold (found by one query), a paused
//! node whose wake-up is overdue — a sleep past `wakeUpAt` by the threshold, a subflow whose child run finished or
//! was never created — gets its own job again, flagged `recovered`: the worker then repeats
//! what follows the pause (arms the timer, starts or re-notifies the child), as it does for
//! a redelivered pause. Waits for a person or a webhook have nothing to repeat.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use amiquip::Connection;
use serde_json::Value;

use crate::amqp::{self, ConfirmPublisher, JobSink};
use crate::blueprint::Blueprint;
use crate::coordination::{job_id, parse_job_id, RedisCoordinationStore};
use crate::local::AWAITING_NODE_IDS;
use crate::nodes::now_ms;
use crate::protocol::JobPayload;
use crate::scheduling::{awaited_details, frontier, paused_iteration};
use crate::store::RunStore;
use crate::worker::WorkerError;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconciliationStats {
    /// Runs found idle longer than the threshold.
    pub stalled_runs: usize,
    /// Runs that got jobs enqueued, or were found complete.
    pub reconciled_runs: usize,
    /// Runs that could not be reconciled (unknown blueprint, unreadable state).
    pub failed_runs: usize,
    /// Awaiting runs whose overdue wake-up (a sleep's timer, a finished child's notice) was
    /// sent again.
    pub woken_runs: usize,
}

/// Finds and resumes stalled runs.
#[derive(Clone)]
pub struct Reconciler {
    store: RunStore,
    coord: RedisCoordinationStore,
    blueprints: HashMap<String, Arc<Blueprint>>,
    amqp_url: String,
    queue: String,
    stalled_after: Duration,
    lock_ttl: Duration,
    batch: i64,
}

impl Reconciler {
    /// A reconciler over the services a worker uses.
    pub fn new(
        store: RunStore,
        coord: RedisCoordinationStore,
        blueprints: HashMap<String, Arc<Blueprint>>,
        amqp_url: String,
        queue: String,
    ) -> Reconciler {
        Reconciler {
            store,
            coord,
            blueprints,
            amqp_url,
            queue,
            stalled_after: Duration::from_secs(300),
            lock_ttl: Duration::from_secs(30),
            batch: 500,
        }
    }

    /// How long a run may be idle before it counts as stalled (default 300 s); also how long
    /// an awaiting run must be idle, and a sleep overdue, before its wake-up is sent again.
    pub fn stalled_after(mut self, after: Duration) -> Self {
        self.stalled_after = after;
        self
    }

    /// One pass.
    pub fn run(&self) -> Result<ReconciliationStats, WorkerError> {
        let stalled = self.store.stalled_runs(self.stalled_after, self.batch)?;
        let awaiting =
            self.store
                .runs_with_lost_wake_ups(self.stalled_after, now_ms(), self.batch)?;
        let mut stats = ReconciliationStats {
            stalled_runs: stalled.len(),
            ..Default::default()
        };
        let mut publisher = LazyPublisher {
            url: &self.amqp_url,
            queue: &self.queue,
            open: None,
        };
        for run in &stalled {
            match self.reconcile_run(run, &mut publisher) {
                Ok(true) => stats.reconciled_runs += 1,
                Ok(false) => {}
                Err(e) => {
                    log::warn!("reconciler: run {run}: {e}");
                    stats.failed_runs += 1;
                }
            }
        }
        for run in &awaiting {
            match self.wake_run(run, &mut publisher) {
                Ok(true) => stats.woken_runs += 1,
                Ok(false) => {}
                Err(e) => {
                    log::warn!("reconciler: awaiting run {run}: {e}");
                    stats.failed_runs += 1;
                }
            }
        }
        if let Some((connection, publisher)) = publisher.open {
            let _ = publisher.close();
            let _ = connection.close();
        }
        Ok(stats)
    }

    /// Sends again the overdue wake-ups of an idle awaiting run (see the module docs);
    /// returns whether there was one.
    fn wake_run(&self, run: &str, publisher: &mut LazyPublisher<'_>) -> Result<bool, WorkerError> {
        let Some(snapshot) = self.store.load(run)? else {
            return Err(WorkerError::Options(format!(
                "run {run} has a status row but no context row"
            )));
        };
        let blueprint_id = Blueprint::stamped_id(&snapshot.context);
        let Some(bp) = self.blueprints.get(blueprint_id) else {
            return Err(WorkerError::Options(format!(
                "run {run}: blueprint '{blueprint_id}' is not loaded"
            )));
        };
        let awaited: Vec<&str> = snapshot
            .context
            .get(AWAITING_NODE_IDS)
            .and_then(Value::as_array)
            .map(|ids| ids.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut bodies = Vec::new();
        let mut woken = Vec::new();
        for node in awaited {
            let Some(details) = awaited_details(&snapshot.context, node) else {
                continue;
            };
            let iteration = u32::try_from(paused_iteration(details)).unwrap_or(u32::MAX);
            if !self.wake_up_is_lost(details)? {
                continue;
            }
            let lock = self.coord.nodelock_key(run, &job_id(node, iteration));
            if self
                .coord
                .set_if_not_exist(&lock, "reconciler", self.lock_ttl)?
            {
                let mut job = JobPayload::new(run, bp.id(), node, iteration);
                job.recovered = true;
                bodies.push(job.to_body());
                woken.push(node.to_string());
            }
        }
        if !bodies.is_empty() {
            publisher.get()?.publish_jobs("", &self.queue, &bodies)?;
            log::info!("reconciler: run {run}: sent the lost wake-ups of {woken:?} again");
        }
        // Either way the run goes to the back of the line for the next passes.
        self.store.touch(run)?;
        Ok(!bodies.is_empty())
    }

    /// Whether a pause's wake-up is overdue: a sleep past `wakeUpAt` by the threshold, or a
    /// subflow whose child run finished (its notice was lost) or does not exist (it was never
    /// started).
    fn wake_up_is_lost(&self, details: &Value) -> Result<bool, WorkerError> {
        match details.get("type").and_then(Value::as_str) {
            Some("sleep") => {
                let wake_at = details["wakeUpAtMs"].as_u64().unwrap_or(0);
                let grace = u64::try_from(self.stalled_after.as_millis()).unwrap_or(u64::MAX);
                Ok(wake_at.saturating_add(grace) <= now_ms())
            }
            Some("subflow") => {
                let Some(child) = details.get("childRunId").and_then(Value::as_str) else {
                    return Ok(false);
                };
                let status = self.store.status(child)?.map(|row| row.status);
                Ok(matches!(
                    status.as_deref(),
                    None | Some("completed") | Some("failed")
                ))
            }
            _ => Ok(false),
        }
    }

    fn reconcile_run(
        &self,
        run: &str,
        publisher: &mut LazyPublisher<'_>,
    ) -> Result<bool, WorkerError> {
        let Some(snapshot) = self.store.load(run)? else {
            return Err(WorkerError::Options(format!(
                "run {run} has a status row but no context row"
            )));
        };
        let blueprint_id = Blueprint::stamped_id(&snapshot.context);
        let Some(bp) = self.blueprints.get(blueprint_id) else {
            return Err(WorkerError::Options(format!(
                "run {run}: blueprint '{blueprint_id}' is not loaded (or the run's first job never ran)"
            )));
        };
        // What should run: the frontier derived from the context, plus every job the run's
        // ledger says was made ready and never finished (it covers loop iterations too).
        let mut candidates = frontier(bp, &snapshot.context);
        let (outstanding, has_ledger) = self.coord.outstanding_jobs(run)?;
        for job in outstanding {
            let (node, iteration) = parse_job_id(&job);
            if !candidates
                .iter()
                .any(|(n, i)| *n == node && *i == iteration)
            {
                candidates.push((node, iteration));
            }
        }
        let nothing_to_run = candidates.is_empty();
        let mut jobs = Vec::new();
        for (node, iteration) in candidates {
            if self.coord.is_poisoned(run, &node)? {
                continue;
            }
            let lock = self.coord.nodelock_key(run, &job_id(&node, iteration));
            if self
                .coord
                .set_if_not_exist(&lock, "reconciler", self.lock_ttl)?
            {
                jobs.push((node, iteration));
            }
        }
        if jobs.is_empty() {
            // Complete only a run with nothing to run whose ledger confirms it is idle (a run
            // without ledger has never had a job finish; a node locked by another reconciler
            // is being enqueued): otherwise leave it to a later pass.
            let resumer = crate::resume::Resumer {
                store: &self.store,
                coord: &self.coord,
                blueprints: &self.blueprints,
                queue: &self.queue,
            };
            // Completing a subflow child also resumes its parent.
            let completed =
                nothing_to_run && has_ledger && resumer.complete(run, publisher.get()?)?;
            if completed {
                log::info!("reconciler: run {run} had nothing left to do; completed");
            } else {
                self.store.touch(run)?;
            }
            return Ok(completed);
        }
        let ids: Vec<String> = jobs.iter().map(|(n, i)| job_id(n, *i)).collect();
        self.coord.register_jobs(run, &ids)?;
        let bodies: Vec<Vec<u8>> = jobs
            .iter()
            .map(|(n, i)| {
                let mut job = JobPayload::new(run, bp.id(), n, *i);
                job.recovered = true;
                job.to_body()
            })
            .collect();
        publisher.get()?.publish_jobs("", &self.queue, &bodies)?;
        self.store.touch(run)?;
        log::info!("reconciler: run {run}: enqueued {ids:?}");
        Ok(true)
    }
}

/// The pass's AMQP connection, opened on first use: a pass with nothing to publish does not
/// connect.
struct LazyPublisher<'a> {
    url: &'a str,
    queue: &'a str,
    open: Option<(Connection, ConfirmPublisher)>,
}

impl LazyPublisher<'_> {
    fn get(&mut self) -> Result<&mut ConfirmPublisher, WorkerError> {
        let open = match self.open.take() {
            Some(open) => open,
            None => {
                let mut connection = amqp::connect(self.url)?;
                let publisher = ConfirmPublisher::new(connection.open_channel(None)?)?;
                amqp::declare_job_queue(publisher.channel(), self.queue)?;
                (connection, publisher)
            }
        };
        Ok(&mut self.open.insert(open).1)
    }
}
